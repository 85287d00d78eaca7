//! Shared by loadgen's integration tests: where the binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The loadgen binary under test.
pub const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// The coremq binary of this workspace: beside loadgen's own binary (cargo
/// builds it there for `cargo test --workspace --all-targets --release`),
/// built with `cargo build --release -p coremq` when it is missing.
pub fn coremq_bin() -> PathBuf {
    let sibling = Path::new(LOADGEN).with_file_name("coremq");
    if sibling.exists() {
        return sibling;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "coremq"])
        .current_dir(manifest.join(".."))
        .status()
        .expect("run cargo build for coremq");
    assert!(st.success(), "cargo build --release -p coremq failed");
    if sibling.exists() {
        return sibling;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    target.join("release/coremq")
}

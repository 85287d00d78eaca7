//! Shared by loadgen's integration tests: where the binaries are, a server
//! killed by its PID when the test ends, and a bounded loadgen run.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// Kills the server when the test ends, however it ends.
pub struct Server(pub Child);

impl Server {
    /// The server's PID, as `--broker-pid` takes it.
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most 20 s) until something accepts on `port`.
pub fn wait_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// coremq on a free loopback port with `extra` flags; its address.
pub fn coremq_with(extra: &[&str]) -> (Server, String) {
    let port = free_port();
    let child = Command::new(coremq_bin())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    wait_listening(port);
    (s, format!("127.0.0.1:{port}"))
}

/// coremq with one shard.
pub fn coremq() -> (Server, String) {
    coremq_with(&["--shards", "1"])
}

/// The mosquitto binary: `LOADGEN_MOSQUITTO`, else /usr/sbin/mosquitto.
/// Panics when it is not there: the README's test command installs it, and
/// a test never passes without the tool it needs.
pub fn mosquitto_bin() -> PathBuf {
    let p = std::env::var_os("LOADGEN_MOSQUITTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
    assert!(
        p.exists(),
        "mosquitto not found at {} (./scripts/test.sh installs it)",
        p.display()
    );
    p
}

/// mosquitto (it speaks 3.1.1 and 5.0) on a free loopback port, from a
/// temporary config as `loadgen compare` writes it; its address.
pub fn mosquitto() -> (Server, String) {
    let bin = mosquitto_bin();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("loadgen-test-mosq-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
             persistence false\nconnection_messages false\nlog_dest none\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    wait_listening(port);
    let _ = std::fs::remove_dir_all(&dir);
    (s, format!("127.0.0.1:{port}"))
}

/// Runs loadgen with `--quiet --json`; returns the process output and the
/// report. Panics (after killing it) when it runs past `limit`.
pub fn loadgen(args: &[&str], limit: Duration) -> (Output, Option<Value>) {
    let dir = std::env::temp_dir().join(format!(
        "loadgen-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let mut cmd = Command::new(LOADGEN);
    cmd.args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadgen {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let report = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    (out, report)
}

/// [`loadgen`] for a run that must succeed: its report.
pub fn loadgen_ok(args: &[&str], limit: Duration) -> Value {
    let (out, r) = loadgen(args, limit);
    let r = r.unwrap_or_else(|| panic!("no report: {}", explain(&out)));
    assert!(out.status.success(), "{}", explain(&out));
    r
}

/// [`loadgen`] for a run that must fail (exit non-zero) and still report
/// why: its report.
pub fn loadgen_failing(args: &[&str], limit: Duration) -> Value {
    let (out, r) = loadgen(args, limit);
    let r = r.unwrap_or_else(|| panic!("no report: {}", explain(&out)));
    assert!(!out.status.success(), "{}", explain(&out));
    r
}

/// A pubsub report in which every QoS 1 message was acknowledged and
/// delivered once.
pub fn assert_every_message_delivered(r: &Value) {
    let p = &r["pubsub"];
    assert!(u(p, "published") > 0, "{p}");
    assert_eq!(u(p, "acked"), u(p, "published"), "{p}");
    assert_eq!(u(p, "delivered"), u(p, "expected"), "{p}");
    assert_eq!(u(p, "lost"), 0, "{p}");
}

/// `v[k]` as a u64, or a panic naming it.
pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// stdout and stderr, for assertion messages.
pub fn explain(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

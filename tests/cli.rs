//! The command line: help, one-line errors with exit code 2, and the
//! `coremq passwd` subcommand.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Broker, ConnectOpts, RawClient, TempDir, COREMQ};

const SEC: Duration = Duration::from_secs(1);

fn coremq(args: &[&str]) -> (Option<i32>, String, String) {
    run_bounded(Command::new(COREMQ).args(args), 20 * SEC)
}

#[test]
fn help_exits_0_and_explains_every_flag_with_its_default() {
    let (code, out, err) = coremq(&["--help"]);
    assert_eq!(code, Some(0), "{err}");
    for (flag, default) in [
        ("--config", "[default: none]"),
        ("--listen", "[default: 0.0.0.0:1883]"),
        ("--shards", "[default: number of CPUs]"),
        ("--io", "[default: auto]"),
        ("--ring-buffers", "[default: 1024]"),
        ("--ring-batch-usec", "[default: 0]"),
        ("--password-file", "[default: none]"),
        (
            "--allow-anonymous",
            "[default: true without --password-file",
        ),
        ("--max-connections", "[default: 0]"),
        ("--connect-timeout", "[default: 10]"),
        ("--max-packet-size", "[default: 1048576]"),
        ("--stats-interval", "[default: 60]"),
        ("--max-inflight", "[default: 20]"),
        ("--max-queued", "[default: 1000]"),
        ("--queue-full", "[default: backpressure]"),
        ("--queue-full-timeout", "[default: 10]"),
        ("--acl-file", "[default: none]"),
        ("--data-dir", "[default: none: nothing is kept]"),
        ("--fsync", "[default: batch]"),
        ("--snapshot-mib", "[default: 64]"),
        ("--commit-interval-usec", "[default: 2000]"),
        ("--metrics-listen", "[default: none]"),
        ("--tls-listen", "[default: none]"),
        ("--ws-listen", "[default: none]"),
        ("--wss-listen", "[default: none]"),
        ("--ws-path", "[default: none: any path]"),
        ("--cert", "[default: none]"),
        ("--key", "[default: none]"),
        ("--client-ca", "[default: none"),
        ("--require-client-cert", "[default: off]"),
        ("--use-identity-as-username", "[default: off]"),
        ("--sys-interval", "[default: 10]"),
        ("--log-level", "[default: info]"),
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("--help lacks {flag}:\n{out}"));
        assert!(
            line.contains(default),
            "{flag} does not say {default}: {line}"
        );
    }
}

/// One line on stderr naming the flag, exit code 2, and no broker started.
fn assert_one_line_error(args: &[&str], names: &str) {
    let (code, out, err) = coremq(args);
    assert_eq!(code, Some(2), "{args:?}: stdout {out:?} stderr {err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: stderr {err:?}");
    assert!(
        lines[0].contains(names),
        "{args:?}: {err:?} does not name {names}"
    );
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    assert_one_line_error(&["--shards", "0"], "--shards");
    assert_one_line_error(&["--shards", "two"], "--shards");
    assert_one_line_error(&["--connect-timeout", "0"], "--connect-timeout");
    assert_one_line_error(&["--max-packet-size", "1"], "--max-packet-size");
    assert_one_line_error(&["--listen", "nope"], "--listen");
    assert_one_line_error(&["--io", "kqueue"], "--io");
    assert_one_line_error(&["--ring-buffers", "1000"], "--ring-buffers");
    assert_one_line_error(&["--ring-buffers", "65536"], "--ring-buffers");
    assert_one_line_error(&["--fsync", "sometimes"], "--fsync");
    assert_one_line_error(&["--snapshot-mib", "0"], "--snapshot-mib");
    assert_one_line_error(&["--commit-interval-usec", "x"], "--commit-interval-usec");
    assert_one_line_error(&["--metrics-listen", "nope"], "--metrics-listen");
    assert_one_line_error(&["--no-such-flag"], "--no-such-flag");
}

#[test]
fn config_file_unknown_key_exits_2_naming_it() {
    let dir = TempDir::new("cli-config");
    let file = dir.path("coremq.toml");
    std::fs::write(&file, "shards = 2\nmax_conections = 5\n").unwrap();
    assert_one_line_error(&["--config", file.to_str().unwrap()], "max_conections");
    std::fs::write(&file, "shards = \"two\"\n").unwrap();
    assert_one_line_error(&["--config", file.to_str().unwrap()], "shards");
    assert_one_line_error(
        &["--config", "/nonexistent/coremq.toml"],
        "/nonexistent/coremq.toml",
    );
    // Not TOML at all: the line is named.
    std::fs::write(&file, "shards = 2\nlisten = \n").unwrap();
    assert_one_line_error(&["--config", file.to_str().unwrap()], "line 2");
}

#[test]
fn bad_acl_file_exits_2_with_one_line_naming_file_and_line() {
    let dir = TempDir::new("cli-acl");
    let file = dir.path("acl");
    std::fs::write(&file, "user alice\ntopic read a/#/b\n").unwrap();
    let path = file.to_str().unwrap();
    assert_one_line_error(&["--acl-file", path], "line 2");
    assert_one_line_error(&["--acl-file", path], path);
    assert_one_line_error(&["--acl-file", "/nonexistent/acl"], "/nonexistent/acl");
    assert_one_line_error(&["--sys-interval", "ten"], "--sys-interval");
}

#[test]
fn bad_password_file_exits_2_with_one_line_naming_it() {
    let dir = TempDir::new("cli-passwords");
    let file = dir.path("passwords");
    std::fs::write(&file, "alice:plain-text\n").unwrap();
    let path = file.to_str().unwrap();
    assert_one_line_error(&["--password-file", path], "line 1");
    assert_one_line_error(&["--password-file", "/nonexistent/pw"], "/nonexistent/pw");
    // The same from a config file.
    let conf = dir.path("coremq.toml");
    std::fs::write(&conf, format!("password_file = \"{path}\"\n")).unwrap();
    assert_one_line_error(&["--config", conf.to_str().unwrap()], path);
}

#[test]
fn config_file_values_are_used() {
    let dir = TempDir::new("cli-config-ok");
    let file = dir.path("coremq.toml");
    std::fs::write(&file, "max-connections = 1\nconnect_timeout = 7\n").unwrap();
    let broker = Broker::start(&["--config", file.to_str().unwrap()]);
    let (_first, _) = RawClient::connect(broker.port(), &ConnectOpts::id("cfg-1"));
    let mut second = RawClient::tcp(broker.port());
    second.send(&ConnectOpts::id("cfg-2").bytes());
    assert_eq!(second.expect_closed(2 * SEC), [0x20, 0x02, 0x00, 0x03]);
}

#[test]
fn passwd_round_trip() {
    let dir = TempDir::new("cli-passwd");
    let file = dir.path("pw");
    let f = file.to_str().unwrap();
    let ok = |args: &[&str]| {
        let (code, out, err) = coremq(args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    };
    ok(&["passwd", "-c", f, "alice", "--password", "secret"]);
    ok(&["passwd", f, "bob", "--password", "hunter2"]);
    let text = std::fs::read_to_string(&file).unwrap();
    let users: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(users, ["alice", "bob"], "{text}");
    for l in text.lines() {
        assert!(
            l.contains(":$7$101$"),
            "mosquitto 2 PBKDF2-SHA512 format: {l}"
        );
    }
    // The password from stdin when not a terminal.
    let mut cmd = Command::new(COREMQ);
    cmd.args(["passwd", f, "carol"]);
    let out = {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"from-stdin\n")
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(out.status.success(), "{out:?}");
    // Change bob's password, delete alice.
    ok(&["passwd", f, "bob", "--password", "changed"]);
    ok(&["passwd", "-D", f, "alice"]);
    let text = std::fs::read_to_string(&file).unwrap();
    let users: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(users, ["bob", "carol"], "{text}");

    // The broker verifies what passwd wrote.
    let broker = Broker::start(&["--password-file", f]);
    let code_for = |user: &str, pass: &str| {
        let mut c = RawClient::tcp(broker.port());
        c.send(&common::connect_packet(
            &format!("pw-{user}-{pass}"),
            true,
            0,
            None,
            Some((user, pass.as_bytes())),
        ));
        c.expect_connack(5 * SEC).code
    };
    assert_eq!(code_for("bob", "changed"), 0);
    assert_eq!(code_for("bob", "hunter2"), 4);
    assert_eq!(code_for("carol", "from-stdin"), 0);
    assert_eq!(code_for("alice", "secret"), 4);
    // Without -c, a missing file is an error (exit 1, not a new file).
    let (code, _, err) = coremq(&[
        "passwd",
        dir.path("missing").to_str().unwrap(),
        "x",
        "--password",
        "y",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!dir.path("missing").exists());
}

/// The CPUs in a `Cpus_allowed_list` line of /proc/.../status ("0-3,6").
fn cpu_list(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

/// Shards are pinned to the CPUs the process may use (here, under
/// `taskset`, the last one this test may use), not to CPUs 0..n.
#[test]
fn shards_are_pinned_inside_the_allowed_cpu_set() {
    let mine = cpu_list(&std::fs::read_to_string("/proc/self/status").unwrap());
    let cpu = *mine.last().unwrap();
    let cpu_arg = cpu.to_string();
    let broker = Broker::start_with(&["taskset", "-c", &cpu_arg], &["--shards", "1"]);
    let (_c, _) = RawClient::connect(broker.port(), &ConnectOpts::id("pinned"));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", broker.pid())).unwrap();
    let mut found = false;
    for t in tasks {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        // glommio suffixes the name; the kernel keeps 15 bytes of it.
        if comm.trim().starts_with("coremq-shard-0") {
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            assert_eq!(cpu_list(&status), vec![cpu], "shard 0's CPUs");
            found = true;
        }
    }
    assert!(found, "no coremq-shard-0 thread");
}

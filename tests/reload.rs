//! SIGHUP (issue 12, item 4) against the real binary: the password file and
//! the ACL file are reread, connections already open stay up, and a bad
//! file keeps the old one in force (the log says why). Clients:
//! mosquitto_pub/sub (real clients) and raw sockets for the held ones.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, tools, wait_until, Broker, ConnectOpts, RawClient, TempDir, COREMQ};

const SEC: Duration = Duration::from_secs(1);

/// Writes a password file at `path` holding `user` with `pass` only.
fn passwords(path: &Path, user: &str, pass: &str) {
    let p = path.to_str().unwrap();
    let (code, out, err) = run_bounded(
        Command::new(COREMQ).args(["passwd", "-c", p, user, "--password", pass]),
        20 * SEC,
    );
    assert_eq!(code, Some(0), "coremq passwd: {out}{err}");
}

/// `kill -HUP` to the broker, then waits for its log to say `what` for
/// the `n`-th time.
fn sighup(broker: &Broker, what: &str, n: usize) {
    let rc = unsafe { libc::kill(broker.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP");
    assert!(
        wait_until(5 * SEC, || broker.log_lines_with(what).len() >= n),
        "no {what:?} in the log:\n{}",
        broker.log_text()
    );
}

/// mosquitto_pub with `user`/`pass`: its exit code and output.
fn mosquitto_pub(port: u16, user: &str, pass: &str, topic: &str) -> (Option<i32>, String) {
    let (code, out, err) = run_bounded(
        Command::new(&tools().mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-u", user, "-P", pass, "-q", "1", "-t", topic, "-m", "x"]),
        10 * SEC,
    );
    (code, format!("{out}{err}"))
}

fn as_user(id: &str, user: &str, pass: &str) -> ConnectOpts {
    ConnectOpts {
        username: Some(user.into()),
        password: Some(pass.as_bytes().to_vec()),
        ..ConnectOpts::id(id)
    }
}

/// A changed password file takes effect at SIGHUP: the new user gets in,
/// the removed one is refused (CONNACK 4 / 0x86 is what mosquitto_pub
/// reports as an error), and a client connected before it stays
/// connected and keeps working. A broken file is refused and the last
/// good one stays in force.
#[test]
fn sighup_rereads_the_password_file_and_keeps_connections() {
    let tmp = TempDir::new("reload-pw");
    let pw = tmp.path("passwords");
    passwords(&pw, "alice", "a-pw");
    let broker = Broker::start(&["--password-file", pw.to_str().unwrap()]);
    let port = broker.port();
    let (mut held, _) = RawClient::connect(port, &as_user("held", "alice", "a-pw"));
    held.subscribe("r/#", 1);
    assert_eq!(mosquitto_pub(port, "alice", "a-pw", "r/1").0, Some(0));
    held.expect_publish("r/1", b"x", 5 * SEC);

    passwords(&pw, "bob", "b-pw");
    sighup(&broker, "SIGHUP: reloaded", 1);
    let (code, out) = mosquitto_pub(port, "bob", "b-pw", "r/2");
    assert_eq!(code, Some(0), "the new user gets in: {out}");
    let (code, out) = mosquitto_pub(port, "alice", "a-pw", "r/3");
    assert_ne!(code, Some(0), "the removed user is refused: {out}");
    // The connection made before the reload is still up and served.
    held.expect_publish("r/2", b"x", 5 * SEC);

    std::fs::write(&pw, "this is not a password file\n").unwrap();
    sighup(&broker, "SIGHUP: reload failed", 1);
    let (code, out) = mosquitto_pub(port, "bob", "b-pw", "r/4");
    assert_eq!(code, Some(0), "the last good file stays in force: {out}");
    held.expect_publish("r/4", b"x", 5 * SEC);
}

/// A changed ACL file takes effect at SIGHUP: a topic clients could only
/// read becomes writable (a subscription made before the reload gets what
/// is published after it); a broken file is refused with the file and the
/// line in the log, and the rules in force stay.
#[test]
fn sighup_rereads_the_acl_file() {
    let tmp = TempDir::new("reload-acl");
    let acl = tmp.path("acl");
    std::fs::write(&acl, "topic readwrite open/#\ntopic read more/#\n").unwrap();
    let broker = Broker::start(&["--shards", "2", "--acl-file", acl.to_str().unwrap()]);
    let port = broker.port();
    let mut sub = RawClient::subscriber(port, "acl-sub", "more/#", 1);
    sub.subscribe("open/#", 1);
    let publish = |topic: &str| {
        let (mut p, _) = RawClient::connect(port, &ConnectOpts::id(""));
        p.publish(topic, b"x", 1, false);
    };
    // Not writable yet: dropped (the next message through is open/1).
    publish("more/1");
    publish("open/1");
    sub.expect_publish("open/1", b"x", 5 * SEC);
    assert_eq!(broker.fresh_stats()["acl_denied"], 1);

    std::fs::write(&acl, "topic readwrite open/#\ntopic readwrite more/#\n").unwrap();
    sighup(&broker, "SIGHUP: reloaded", 1);
    publish("more/2");
    sub.expect_publish("more/2", b"x", 5 * SEC);

    std::fs::write(&acl, "topic sometimes more/#\n").unwrap();
    sighup(&broker, "SIGHUP: reload failed", 1);
    let why = broker.log_lines_with("SIGHUP: reload failed").join("\n");
    assert!(
        why.contains(acl.to_str().unwrap()) && why.contains("line 1"),
        "{why}"
    );
    publish("more/3");
    sub.expect_publish("more/3", b"x", 5 * SEC);
}

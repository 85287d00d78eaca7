//! loadgen end to end: against its own null broker and against coremq.
//! Every run is bounded (small counts, short holds, a wall-clock limit), and
//! every server a test starts is killed by its PID when the test ends.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{coremq_bin, LOADGEN};

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn null_broker() -> (Server, String) {
    let port = free_port();
    let child = Command::new(LOADGEN)
        .args(["null-broker", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    wait_listening(port);
    (s, format!("127.0.0.1:{port}"))
}

fn coremq() -> (Server, String) {
    let port = free_port();
    let child = Command::new(coremq_bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shards", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    wait_listening(port);
    (s, format!("127.0.0.1:{port}"))
}

/// Runs loadgen with a JSON report; returns the process output and the report.
fn loadgen(args: &[&str], limit: Duration) -> (Output, Option<Value>) {
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

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn explain(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn conn_against_null_broker_counts_are_exact_over_two_workers_and_two_ips() {
    let (_s, addr) = null_broker();
    let (out, r) = loadgen(
        &[
            "conn",
            "-b",
            &addr,
            "-n",
            "2000",
            "--workers",
            "2",
            "--source-ips",
            "2",
            "--hold",
            "1",
            "--keepalive",
            "1",
            "--plot",
            "/dev/null",
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r, "attempted"), 2000);
    assert_eq!(u(&r, "connected"), 2000);
    assert_eq!(u(&r, "disconnected"), 2000);
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(u(&r, "workers"), 2);
    assert_eq!(u(&r, "source_ips"), 2);
    assert_eq!(u(&r["latency"]["connack"], "count"), 2000);
    assert!(u(&r, "pings") > 0 && u(&r, "pings") == u(&r, "pongs"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("p99.9"), "{table}");
}

#[test]
fn churn_against_null_broker_cycles_without_failures() {
    let (s, addr) = null_broker();
    let pid = s.0.id().to_string();
    let (out, r) = loadgen(
        &[
            "churn",
            "-b",
            &addr,
            "-c",
            "10",
            "--duration",
            "1",
            "--broker-pid",
            &pid,
        ],
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert!(u(&r, "cycles") >= 100, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(u(&r, "cycles"), u(&r["latency"]["cycle"], "count"));
    assert!(r["broker_cost"]["cpu_us_per_cycle"].is_number(), "{r}");
}

#[test]
fn conn_with_nothing_listening_fails_fast_with_refused() {
    let port = free_port(); // bound, then released: nothing listens there
    let start = Instant::now();
    let (out, r) = loadgen(
        &[
            "conn",
            "-b",
            &format!("127.0.0.1:{port}"),
            "-n",
            "500",
            "--hold",
            "30",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(start.elapsed() < Duration::from_secs(10));
    let r = r.unwrap();
    assert_eq!(r["failures"]["refused"].as_u64(), Some(500), "{r}");
    assert_eq!(u(&r, "connected"), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused=500"));
}

#[test]
fn bad_arguments_get_one_line_and_exit_2() {
    for args in [
        vec!["conn", "--no-such-flag"],
        vec!["conn", "-b", "127.0.0.1:1", "-n", "0"],
        vec!["conn", "-b", "127.0.0.1:1", "--clean", "maybe"],
        vec!["churn", "-b", "127.0.0.1:1", "--timeout", "0"],
        vec![
            "conn",
            "-b",
            "127.0.0.1:1",
            "-n",
            "100000",
            "--workers",
            "1",
        ],
    ] {
        let out = Command::new(LOADGEN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn against_coremq_conn_keepalive_and_takeover() {
    let (s, addr) = coremq();
    let pid = s.0.id().to_string();

    let (out, r) = loadgen(
        &[
            "conn",
            "-b",
            &addr,
            "-n",
            "2000",
            "--workers",
            "2",
            "--source-ips",
            "2",
            "--hold",
            "1",
            "--broker-pid",
            &pid,
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r, "attempted"), 2000);
    assert_eq!(u(&r, "connected"), 2000);
    assert_eq!(u(&r, "disconnected"), 2000);
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    let cost = &r["broker_cost"];
    assert!(cost["cpu_us_per_connect"].is_number(), "{cost}");
    assert!(cost["bytes_per_held_connection"].is_number(), "{cost}");

    let (out, r) = loadgen(
        &[
            "keepalive",
            "-b",
            &addr,
            "-n",
            "50",
            "--silent",
            "20",
            "--keepalive",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", explain(&out));
    let k = &r.unwrap()["keepalive"];
    assert_eq!(u(k, "silent"), 20, "{k}");
    assert_eq!(u(k, "closed"), 20, "{k}");
    assert_eq!(u(k, "wills"), 20, "{k}");
    assert_eq!(u(k, "closed_early"), 0, "{k}");

    let (out, r) = loadgen(
        &[
            "takeover",
            "-b",
            &addr,
            "-n",
            "200",
            "--rate",
            "100",
            "--duration",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert!(u(&r, "takeovers") >= 50, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(
        u(&r["latency"]["takeover_old_close"], "count"),
        u(&r, "takeovers")
    );
    assert_eq!(u(&r, "disconnected"), 200);
}

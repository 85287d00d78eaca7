//! loadgen end to end: against its own null broker and against coremq.
//! Every run is bounded (small counts, short holds, a wall-clock limit), and
//! every server a test starts is killed by its PID when the test ends.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{coremq, explain, free_port, loadgen, u, wait_listening, Server, LOADGEN};

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

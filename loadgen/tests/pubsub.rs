//! `loadgen pubsub` end to end against the real coremq binary: small
//! bounded runs (tens of clients, one second of publishing), exact counts
//! where the QoS guarantees them. Every broker a test starts is killed by its
//! PID when the test ends; every loadgen run has a wall-clock limit.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{coremq, coremq_with, explain, free_port, loadgen, u, LOADGEN};

const LIMIT: Duration = Duration::from_secs(30);

fn pubsub_of(r: &Value) -> &Value {
    let p = &r["pubsub"];
    assert!(p.is_object(), "no pubsub section in {r}");
    p
}

/// Percentiles present, ordered, and counting what they should.
fn sane_latency(r: &Value, name: &str, count: u64) {
    let l = &r["latency"][name];
    assert_eq!(u(l, "count"), count, "{name}: {l}");
    let (p50, p90, p99, p999, max) = (
        u(l, "p50_us"),
        u(l, "p90_us"),
        u(l, "p99_us"),
        u(l, "p999_us"),
        u(l, "max_us"),
    );
    assert!(
        0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "{name}: {l}"
    );
    // One second of loopback traffic: nothing takes anywhere near 30 s.
    assert!(max < 30_000_000, "{name}: {l}");
}

/// QoS 1/2: every message reaches every subscriber once, in order.
fn exact(p: &Value, fanout: u64) {
    let published = u(p, "published");
    assert!(published > 0, "{p}");
    assert_eq!(u(p, "expected"), published * fanout, "{p}");
    assert_eq!(u(p, "delivered"), u(p, "expected"), "{p}");
    assert_eq!(u(p, "unique"), u(p, "expected"), "{p}");
    assert_eq!(u(p, "lost"), 0, "{p}");
    assert_eq!(u(p, "duplicates"), 0, "{p}");
    assert_eq!(u(p, "out_of_order"), 0, "{p}");
    assert_eq!(u(p, "misrouted"), 0, "{p}");
    assert_eq!(u(p, "acked"), published, "{p}");
    assert_eq!(u(p, "unacked"), 0, "{p}");
    assert_eq!(p["drain_timed_out"], false, "{p}");
}

#[test]
fn pairs_qos1_paced_delivers_every_message_once_with_broker_cost() {
    let (s, addr) = coremq();
    let pid = s.pid();
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &addr,
            "--pairs",
            "20",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "4000",
            "--broker-pid",
            &pid,
            "--plot",
            "/dev/null",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(r["mode"], "pubsub");
    assert_eq!(u(&r, "attempted"), 40);
    assert_eq!(u(&r, "connected"), 40);
    assert_eq!(u(&r, "disconnected"), 40);
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    let p = pubsub_of(&r);
    exact(p, 1);
    assert_eq!(u(p, "subscribed"), 20);
    assert_eq!(u(p, "publishers_connected"), 20);
    assert_eq!(u(p, "streams"), 20);
    // Paced at 4,000/s for a second, on a machine that may be busy.
    let published = u(p, "published");
    assert!((1000..=4100).contains(&published), "{p}");
    assert!(p["deliveries_per_s"].as_f64().unwrap() > 0.0, "{p}");
    sane_latency(&r, "e2e", published);
    sane_latency(&r, "puback", published);
    sane_latency(&r, "suback", 20);
    let cost = &r["broker_cost"];
    assert!(cost["cpu_us_per_delivery"].is_number(), "{cost}");
    assert!(cost["cpu_s_main"].is_number(), "{cost}");
    assert!(u(&cost["samples"]["before"], "rss_bytes") > 0, "{cost}");
    assert!(u(&cost["samples"]["after"], "rss_bytes") > 0, "{cost}");
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "deliveries/s",
        "e2e",
        "p99.9",
        "delivered message",
        "lost 0",
    ] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }
}

#[test]
fn fan_out_qos2_is_exactly_once_to_every_subscriber() {
    let (_s, addr) = coremq();
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &addr,
            "--fan-out",
            "10",
            "--qos",
            "2",
            "--duration",
            "1",
            "--rate",
            "1000",
            "--payload",
            "200",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    let p = pubsub_of(&r);
    exact(p, 10);
    assert_eq!(p["exactly_once_violated"], false);
    assert_eq!(u(p, "publishers"), 1);
    assert_eq!(u(p, "subscribers"), 10);
    assert_eq!(u(p, "payload_bytes"), 200);
    sane_latency(&r, "e2e", u(p, "expected"));
    sane_latency(&r, "pubcomp", u(p, "published"));
}

#[test]
fn fan_in_qos0_paced_counts_add_up_and_losses_are_no_failure() {
    let (_s, addr) = coremq();
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &addr,
            "--fan-in",
            "10",
            "--qos",
            "0",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
        LIMIT,
    );
    // QoS 0 may lose messages: that is a figure, not a failure.
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    let p = pubsub_of(&r);
    let published = u(p, "published");
    assert!((500..=2100).contains(&published), "{p}");
    assert_eq!(u(p, "expected"), published, "{p}");
    assert_eq!(u(p, "subscribers"), 1);
    assert_eq!(u(p, "streams"), 10);
    assert_eq!(
        u(p, "unique") + u(p, "lost"),
        u(p, "expected"),
        "unique + lost = expected: {p}"
    );
    assert_eq!(u(p, "duplicates"), 0, "{p}");
    assert_eq!(u(p, "misrouted"), 0, "{p}");
    // At 2,000 messages a second to one subscriber nothing should be lost.
    assert!(u(p, "unique") * 10 >= published * 9, "{p}");
    sane_latency(&r, "e2e", u(p, "unique"));
    assert!(r["latency"]["puback"].is_null(), "no acks at QoS 0");
}

#[test]
fn unpaced_qos1_and_qos2_across_two_shards_are_exact() {
    // A queue deep enough for everything one second can publish: the run
    // goes as fast as it can and still every message must arrive, in order.
    let (_s, addr) = coremq_with(&["--shards", "2", "--max-queued", "1000000"]);
    for (shape, qos, fanout) in [("--pairs", "1", 1), ("--fan-out", "2", 5)] {
        let n = if shape == "--pairs" { "10" } else { "5" };
        let (out, r) = loadgen(
            &[
                "pubsub",
                "-b",
                &addr,
                shape,
                n,
                "--qos",
                qos,
                "--duration",
                "1",
                "--window",
                "8",
            ],
            LIMIT,
        );
        assert!(out.status.success(), "{shape} {n}: {}", explain(&out));
        let r = r.unwrap();
        assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
        exact(pubsub_of(&r), fanout);
    }
}

#[test]
fn nothing_listening_fails_fast_with_every_socket_counted() {
    let port = free_port();
    let start = Instant::now();
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &format!("127.0.0.1:{port}"),
            "--pairs",
            "20",
            "--duration",
            "30",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(start.elapsed() < Duration::from_secs(10));
    let r = r.unwrap();
    assert_eq!(r["failures"]["refused"].as_u64(), Some(40), "{r}");
    assert_eq!(u(&r, "connected"), 0);
    let p = pubsub_of(&r);
    assert_eq!(u(p, "published"), 0);
    assert_eq!(u(p, "subscribed"), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused=40"));
}

#[test]
fn bad_arguments_get_one_line_and_exit_2() {
    for (args, needle) in [
        (vec!["pubsub", "-b", "127.0.0.1:1"], "--pairs"),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--fan-in",
                "2",
            ],
            "cannot be used with",
        ),
        (
            vec!["pubsub", "-b", "127.0.0.1:1", "--pairs", "2", "--qos", "3"],
            "--qos",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--payload",
                "8",
            ],
            "--payload",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--window",
                "0",
            ],
            "--window",
        ),
        (
            vec!["pubsub", "-b", "127.0.0.1:1", "--fan-out", "0"],
            "--fan-out",
        ),
        (
            vec!["pubsub", "-b", "127.0.0.1:1", "--pairs", "2", "--rate", "0"],
            "--rate",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--duration",
                "0",
            ],
            "--duration",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--prefix",
                "a/#",
            ],
            "--prefix",
        ),
        (
            vec!["pubsub", "-b", "127.0.0.1:1", "--pairs", "100000"],
            "open-file limit",
        ),
    ] {
        let out = Command::new(LOADGEN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Every byte of shard logs under `dir`.
fn data_dir_logs(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for n in 0..2 {
        if let Ok(b) = std::fs::read(dir.join(format!("shard-{n}/log"))) {
            all.extend_from_slice(&b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn persistent_subscribers_are_stored_by_a_broker_with_a_data_dir() {
    // --persistent: subscribers (3.1.1 cleanSession=0; 5.0 Session Expiry
    // Interval) leave their sessions in coremq's --data-dir logs, publishers
    // (clean) do not; every message still arrives once, in order.
    let dir = std::env::temp_dir().join(format!("loadgen-test-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (s, addr) = coremq_with(&["--shards", "2", "--data-dir", dir.to_str().unwrap()]);
    for (protocol, prefix) in [("4", "pp4"), ("5", "pp5")] {
        let (out, r) = loadgen(
            &[
                "pubsub",
                "-b",
                &addr,
                "--pairs",
                "10",
                "--qos",
                "1",
                "--duration",
                "1",
                "--rate",
                "1000",
                "--persistent",
                "--protocol",
                protocol,
                "--prefix",
                prefix,
            ],
            LIMIT,
        );
        assert!(out.status.success(), "{protocol}: {}", explain(&out));
        let r = r.unwrap();
        assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
        let p = pubsub_of(&r);
        exact(p, 1);
        assert_eq!(p["persistent"], true, "{p}");
        assert_eq!(r["params"]["persistent"], true, "{r}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("(persistent sessions)"),
            "{}",
            explain(&out)
        );
    }
    drop(s);
    let logs = data_dir_logs(&dir);
    for id in ["pp4-sub-0", "pp4-sub-9", "pp5-sub-0", "pp5-sub-9"] {
        assert!(contains(&logs, id), "no session {id} in the logs");
    }
    assert!(!contains(&logs, "pp4-pub-"), "a clean publisher was stored");
    assert!(!contains(&logs, "pp5-pub-"), "a clean publisher was stored");
    let _ = std::fs::remove_dir_all(&dir);
}

//! `--protocol 5`: loadgen's clients speaking MQTT 5.0, end to end, against
//! coremq, mosquitto (the test command installs it; a missing one fails
//! the test) and the null broker. Every server a test starts is killed by
//! its PID when the test ends; every loadgen run has a wall-clock limit.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{coremq, explain, free_port, loadgen, mosquitto, u, wait_listening, Server, LOADGEN};

const LIMIT: Duration = Duration::from_secs(30);

/// QoS 1/2: every message reaches every subscriber once, in order, and every
/// flow completed.
fn exact(p: &Value, fanout: u64) {
    let published = u(p, "published");
    assert!(published > 0, "{p}");
    assert_eq!(u(p, "expected"), published * fanout, "{p}");
    assert_eq!(u(p, "delivered"), u(p, "expected"), "{p}");
    assert_eq!(u(p, "unique"), u(p, "expected"), "{p}");
    for k in ["lost", "duplicates", "out_of_order", "misrouted", "unacked"] {
        assert_eq!(u(p, k), 0, "{k}: {p}");
    }
    assert_eq!(u(p, "acked"), published, "{p}");
    assert_eq!(p["drain_timed_out"], false, "{p}");
}

#[test]
fn pubsub_protocol_5_against_mosquitto_delivers_every_message_once() {
    let (s, addr) = mosquitto();
    let pid = s.pid();
    // QoS 1 pairs (PUBACK), then QoS 2 fan-out (PUBREC → PUBREL → PUBCOMP),
    // each spelling of the flag once.
    for (flag, shape, n, qos, fanout, ack) in [
        ("5", "--pairs", "20", "1", 1, "puback"),
        ("5.0", "--fan-out", "5", "2", 5, "pubcomp"),
    ] {
        let prefix = format!("lg5q{qos}");
        let (out, r) = loadgen(
            &[
                "pubsub",
                "-b",
                &addr,
                "--protocol",
                flag,
                shape,
                n,
                "--qos",
                qos,
                "--duration",
                "1",
                "--rate",
                "2000",
                "--prefix",
                &prefix,
                "--broker-pid",
                &pid,
            ],
            LIMIT,
        );
        assert!(out.status.success(), "{flag} {shape}: {}", explain(&out));
        let r = r.unwrap();
        assert_eq!(u(&r, "protocol"), 5, "{r}");
        assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
        let p = &r["pubsub"];
        exact(p, fanout);
        let published = u(p, "published");
        assert!((500..=2100).contains(&published), "{p}");
        assert_eq!(u(&r["latency"][ack], "count"), published, "{r}");
        assert_eq!(u(&r["latency"]["e2e"], "count"), published * fanout, "{r}");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.lines().next().unwrap().contains("MQTT 5.0"),
            "{table}"
        );
    }
}

#[test]
fn pubsub_unpaced_protocol_5_and_4_against_mosquitto_side_by_side() {
    let (_s, addr) = mosquitto();
    // Unpaced: batched template PUBLISHes, patched per message.
    for flag in ["5", "4"] {
        let prefix = format!("lgu{flag}");
        let (out, r) = loadgen(
            &[
                "pubsub",
                "-b",
                &addr,
                "--protocol",
                flag,
                "--pairs",
                "10",
                "--qos",
                "1",
                "--duration",
                "1",
                "--window",
                "8",
                "--prefix",
                &prefix,
            ],
            LIMIT,
        );
        assert!(out.status.success(), "--protocol {flag}: {}", explain(&out));
        let r = r.unwrap();
        assert_eq!(r["protocol"].as_u64(), Some(flag.parse().unwrap()), "{r}");
        assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
        // mosquitto queues at most 1,000 per subscriber by default, but
        // with a window of 8 per publisher nothing should queue that deep.
        exact(&r["pubsub"], 1);
    }
}

#[test]
fn conn_protocol_5_holds_connections_and_reports_bytes_per_connection() {
    let (s, addr) = mosquitto();
    let pid = s.pid();
    let (out, r) = loadgen(
        &[
            "conn",
            "-b",
            &addr,
            "--protocol",
            "5",
            "-n",
            "200",
            "--hold",
            "1",
            "--keepalive",
            "1",
            "--broker-pid",
            &pid,
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r, "protocol"), 5, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(u(&r, "connected"), 200);
    assert_eq!(u(&r, "disconnected"), 200);
    assert!(
        u(&r, "pings") > 0 && u(&r, "pongs") == u(&r, "pings"),
        "{r}"
    );
    assert!(
        r["broker_cost"]["bytes_per_held_connection"].is_number(),
        "{}",
        r["broker_cost"]
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("bytes per held connection"), "{table}");
}

#[test]
fn conn_protocol_5_against_the_null_broker_gets_5_0_connacks() {
    let port = free_port();
    let child = Command::new(LOADGEN)
        .args(["null-broker", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _s = Server(child);
    wait_listening(port);
    let addr = format!("127.0.0.1:{port}");
    for flag in ["5", "3.1.1"] {
        let (out, r) = loadgen(
            &[
                "conn",
                "-b",
                &addr,
                "--protocol",
                flag,
                "-n",
                "100",
                "--hold",
                "0",
            ],
            LIMIT,
        );
        assert!(out.status.success(), "{flag}: {}", explain(&out));
        let r = r.unwrap();
        assert_eq!(u(&r, "connected"), 100, "{flag}: {r}");
        assert_eq!(u(&r, "failed_total"), 0, "{flag}: {}", r["failures"]);
    }
}

#[test]
fn coremq_speaks_5_0_to_loadgen_connections_and_messages() {
    let (_s, addr) = coremq();
    let (out, r) = loadgen(
        &[
            "conn",
            "-b",
            &addr,
            "--protocol",
            "5",
            "-n",
            "20",
            "--hold",
            "0",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r, "connected"), 20, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    let (out, p) = loadgen(
        &[
            "pubsub",
            "-b",
            &addr,
            "--protocol",
            "5",
            "--pairs",
            "5",
            "--qos",
            "2",
            "--rate",
            "200",
            "--duration",
            "2",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    exact(&p.unwrap()["pubsub"], 1);
}

#[test]
fn a_bad_protocol_gets_one_line_and_exit_2() {
    for args in [
        vec![
            "pubsub",
            "-b",
            "127.0.0.1:1",
            "--pairs",
            "2",
            "--protocol",
            "3",
        ],
        vec!["conn", "-b", "127.0.0.1:1", "--protocol", "6"],
    ] {
        let out = Command::new(LOADGEN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("--protocol"), "{args:?}: {err}");
    }
}

//! The options for benchmarking a broker that runs as several processes (a
//! coremq cluster): `pubsub --sub-broker`, which sends the subscribers to
//! another address than the publishers, and `--broker-pid` given more than
//! once, whose CPU and RSS are summed. Against the real coremq binary, on
//! loopback: one coremq listening on two ports stands in for two nodes (a
//! lone node delivers between its own listeners as a cluster does between
//! nodes), and a second, idle coremq for the second process. Every broker a
//! test starts is killed by its PID when the test ends; every loadgen run
//! has a wall-clock limit.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{
    assert_every_message_delivered, coremq, coremq_with, explain, free_port, loadgen,
    loadgen_failing, loadgen_ok, u, wait_listening, Server, LOADGEN,
};

const LIMIT: Duration = Duration::from_secs(60);

/// coremq with one shard listening on two loopback ports; its two addresses.
fn coremq_two_listeners() -> (Server, String, String) {
    let port = free_port();
    let second = format!("127.0.0.1:{port}");
    let (server, first) = coremq_with(&["--shards", "1", "--listen", &second]);
    wait_listening(port);
    (server, first, second)
}

/// VmRSS of `pid` in bytes, from /proc.
fn rss_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// QoS 1 pairs: every message acknowledged and delivered once, in order.
fn every_pair_delivered(r: &Value, pairs: u64) {
    assert_eq!(u(r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(u(r, "attempted"), 2 * pairs, "{r}");
    assert_eq!(u(r, "connected"), 2 * pairs, "{r}");
    let p = &r["pubsub"];
    assert_eq!(u(p, "subscribed"), pairs, "{p}");
    assert_eq!(u(p, "publishers_connected"), pairs, "{p}");
    assert_every_message_delivered(r);
    assert_eq!(u(p, "expected"), u(p, "published"), "{p}");
    assert_eq!(u(p, "duplicates"), 0, "{p}");
    assert_eq!(u(p, "out_of_order"), 0, "{p}");
}

#[test]
fn sub_broker_carries_the_subscribers_and_is_reported() {
    let (_s, pub_addr, sub_addr) = coremq_two_listeners();
    // Paced, so that no session queue fills on a busy machine.
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &pub_addr,
            "--sub-broker",
            &sub_addr,
            "--pairs",
            "20",
            "--qos",
            "1",
            "--duration",
            "2",
            "--rate",
            "4000",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    every_pair_delivered(&r, 20);
    assert_eq!(r["broker"], pub_addr.as_str(), "{r}");
    assert_eq!(r["sub_broker"], sub_addr.as_str(), "{r}");
    assert_eq!(r["params"]["sub_broker"], sub_addr.as_str(), "{r}");
    let table = String::from_utf8_lossy(&out.stdout);
    let head = format!("{pub_addr} (publishers), {sub_addr} (subscribers)");
    assert!(table.contains(&head), "no {head:?} in:\n{table}");

    // Without it: the one broker, and sub_broker null.
    let r = loadgen_ok(
        &[
            "pubsub",
            "-b",
            &pub_addr,
            "--pairs",
            "5",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "1000",
            "--prefix",
            "solo",
        ],
        LIMIT,
    );
    every_pair_delivered(&r, 5);
    assert_eq!(r["broker"], pub_addr.as_str(), "{r}");
    assert!(r["sub_broker"].is_null(), "{r}");
}

#[test]
fn sub_broker_takes_every_subscriber_and_no_publisher() {
    // Nothing listens at --sub-broker: each subscriber, and only they,
    // are refused; the publishers connect to --broker.
    let (_s, addr) = coremq();
    let nobody = format!("127.0.0.1:{}", free_port());
    for shape in [
        vec!["--pairs", "20"],
        vec!["--fan-in", "20"],
        vec!["--fan-out", "20"],
        vec!["--pairs", "20", "--share-group", "g"],
    ] {
        let mut args = vec![
            "pubsub",
            "-b",
            &addr,
            "--sub-broker",
            &nobody,
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "1000",
        ];
        args.extend(&shape);
        let r = loadgen_failing(&args, LIMIT);
        let subs = if shape[0] == "--fan-in" { 1 } else { 20 };
        let pubs = if shape[0] == "--fan-out" { 1 } else { 20 };
        assert_eq!(
            r["failures"]["refused"].as_u64(),
            Some(subs),
            "{shape:?}: {r}"
        );
        assert_eq!(u(&r, "failed_total"), subs, "{shape:?}: {r}");
        assert_eq!(u(&r, "connected"), pubs, "{shape:?}: {r}");
        assert_eq!(
            u(&r["pubsub"], "publishers_connected"),
            pubs,
            "{shape:?}: {r}"
        );
        assert_eq!(u(&r["pubsub"], "subscribed"), 0, "{shape:?}: {r}");
        assert_eq!(r["sub_broker"], nobody.as_str(), "{shape:?}: {r}");
    }
}

#[test]
fn sub_broker_over_websocket_uses_the_same_transport() {
    // Two WebSocket listeners of one coremq, and its plain one.
    let (ws_a, ws_b) = (free_port(), free_port());
    let (a, b) = (format!("127.0.0.1:{ws_a}"), format!("127.0.0.1:{ws_b}"));
    let (_s, plain) = coremq_with(&["--shards", "1", "--ws-listen", &a, "--ws-listen", &b]);
    wait_listening(ws_a);
    wait_listening(ws_b);
    let run = |sub: &str| {
        loadgen(
            &[
                "pubsub",
                "-b",
                &a,
                "--sub-broker",
                sub,
                "--ws",
                "/mqtt",
                "--pairs",
                "10",
                "--qos",
                "1",
                "--duration",
                "1",
                "--rate",
                "1000",
            ],
            LIMIT,
        )
    };
    let (out, r) = run(&b);
    assert!(out.status.success(), "{}", explain(&out));
    every_pair_delivered(&r.unwrap(), 10);
    // The subscribers speak WebSocket to --sub-broker too: a plain MQTT
    // listener there drops every one of them.
    let (out, r) = run(&plain);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let r = r.unwrap();
    assert_eq!(u(&r["pubsub"], "subscribed"), 0, "{r}");
    assert_eq!(u(&r["pubsub"], "publishers_connected"), 10, "{r}");
}

#[test]
fn two_broker_pids_are_summed() {
    let (s, addr) = coremq();
    // A second coremq, idle: the other process of a two-process broker.
    let (idle, _idle_addr) = coremq();
    let (pid, idle_pid) = (s.pid(), idle.pid());
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
            "2",
            "--rate",
            "4000",
            "--broker-pid",
            &pid,
            "--broker-pid",
            &idle_pid,
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    every_pair_delivered(&r, 20);
    let cost = &r["broker_cost"];
    let (p1, p2): (u64, u64) = (pid.parse().unwrap(), idle_pid.parse().unwrap());
    assert_eq!(u(cost, "pid"), p1, "{cost}");
    assert_eq!(cost["pids"], serde_json::json!([p1, p2]), "{cost}");
    assert!(cost["cpu_s_main"].is_number(), "{cost}");
    assert!(cost["cpu_us_per_delivery"].is_number(), "{cost}");
    // The RSS is the sum: more than the idle process's own.
    let after = u(&cost["samples"]["after"], "rss_bytes");
    let idle_rss = rss_bytes(&idle_pid);
    assert!(after > idle_rss, "{after} ≤ idle {idle_rss}: {cost}");
    let table = String::from_utf8_lossy(&out.stdout);
    let who = format!("broker pids {pid}+{idle_pid} (summed)");
    assert!(table.contains(&who), "no {who:?} in:\n{table}");

    // One PID: as before, `pid` and a list of one.
    let r = loadgen_ok(
        &[
            "pubsub",
            "-b",
            &addr,
            "--pairs",
            "5",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "1000",
            "--prefix",
            "one",
            "--broker-pid",
            &pid,
        ],
        LIMIT,
    );
    assert_eq!(u(&r["broker_cost"], "pid"), p1, "{r}");
    assert_eq!(r["broker_cost"]["pids"], serde_json::json!([p1]), "{r}");
}

#[test]
fn bad_cluster_options_get_one_line_and_exit_2() {
    let me = std::process::id().to_string();
    for args in [
        vec![
            "pubsub",
            "-b",
            "127.0.0.1:1",
            "--pairs",
            "1",
            "--sub-broker",
            "[::1]:1883",
        ],
        vec![
            "pubsub",
            "-b",
            "127.0.0.1:1",
            "--pairs",
            "1",
            "--broker-pid",
            &me,
            "--broker-pid",
            &me,
        ],
        vec![
            "conn",
            "-b",
            "127.0.0.1:1",
            "--broker-pid",
            &me,
            "--broker-pid",
            "0",
        ],
        vec!["conn", "-b", "127.0.0.1:1", "--sub-broker", "127.0.0.1:2"],
    ] {
        let out = Command::new(LOADGEN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

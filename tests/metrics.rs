//! `--metrics-listen` (issue 12, item 3) against the real binary: what a
//! Prometheus scraper and an operator's health check see, parsed with the
//! Prometheus project's Python text parser (`prometheus_client.parser`),
//! after real clients (mosquitto_pub/sub) did known things.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{
    disconnect_packet, json, python_script, run_bounded, tools, unused_port, Broker, ConnectOpts,
    RawClient,
};

const SEC: Duration = Duration::from_secs(1);

/// One raw HTTP exchange with the endpoint: the whole answer as text.
fn http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .expect("the endpoint answers and closes");
    out
}

/// `/metrics` through the Prometheus parser: samples by `name{labels}`,
/// and family types as `t:family`.
fn scrape(port: u16) -> HashMap<String, json::Value> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let (code, out, err) = run_bounded(&mut python_script("prom_scrape.py", &[&url]), 20 * SEC);
    assert_eq!(
        code,
        Some(0),
        "the Prometheus parser refused /metrics: {out}{err}"
    );
    json::parse_object(&out).unwrap_or_else(|| panic!("not JSON: {out}"))
}

fn sample(m: &HashMap<String, json::Value>, key: &str) -> u64 {
    m.get(&format!("s:{key}"))
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no sample {key} in {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_count_what_clients_did_and_parse_as_prometheus_text() {
    let mport = unused_port();
    let maddr = format!("127.0.0.1:{mport}");
    // No $SYS topics: only what the clients retained is counted.
    let broker = Broker::start(&[
        "--shards",
        "2",
        "--sys-interval",
        "0",
        "--metrics-listen",
        &maddr,
    ]);
    let port = broker.port();
    let before = scrape(mport);
    assert_eq!(before.get("status").and_then(|v| v.as_u64()), Some(200));
    let content_type = before["content_type"].as_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(before["t:coremq_connects"].as_str(), Some("counter"));
    assert_eq!(before["t:coremq_connections"].as_str(), Some("gauge"));

    // Known traffic from a real client: 3 connections, 3 QoS 1 retained
    // publishes on 3 topics; and a CONNECT with a bad protocol level.
    for i in 0..3 {
        let (code, out, err) = run_bounded(
            Command::new(&tools().mosquitto_pub)
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-q", "1", "-r", "-t", &format!("m/{i}"), "-m", "x"]),
            10 * SEC,
        );
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let mut bad = RawClient::tcp(port);
    bad.send(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 10, 0, 0]);
    bad.expect_closed(5 * SEC);
    // One connection held open, seen as a gauge.
    let (_held, _) = RawClient::connect(port, &ConnectOpts::id("held"));

    // The counters reach the shared tallies within a tick or two.
    let mut after = scrape(mport);
    for _ in 0..50 {
        if sample(&after, "coremq_publishes_received_total") >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = scrape(mport);
    }
    let delta = |k: &str| sample(&after, k) - sample(&before, k);
    assert_eq!(delta("coremq_connects_total"), 4, "3 mosquitto_pub + held");
    assert_eq!(delta("coremq_connacks_total{code=0}"), 4);
    assert_eq!(
        delta("coremq_connacks_total{code=1}"),
        1,
        "protocol level 9"
    );
    assert_eq!(delta("coremq_publishes_received_total"), 3);
    assert_eq!(sample(&after, "coremq_retained_messages"), 3);
    assert_eq!(
        sample(&after, "coremq_connections"),
        1,
        "only `held` is open"
    );
    assert!(
        sample(&after, "coremq_bytes_received_total")
            > sample(&before, "coremq_bytes_received_total")
    );
    let build = format!("coremq_build_info{{version={}}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&after, &build), 1);

    // By QoS, per shard, queued, and the CONNACK latency histogram.
    assert_eq!(delta("coremq_publishes_received_by_qos_total{qos=1}"), 3);
    assert_eq!(delta("coremq_publishes_received_by_qos_total{qos=0}"), 0);
    assert_eq!(sample(&after, "coremq_messages_queued"), 0);
    // io_uring: each shard's buffer ring starts with 64 buffers and nothing
    // here read in a burst that emptied one; the epoll loop has none.
    let ring_buffers = match std::env::var("COREMQ_TEST_IO").as_deref() {
        Ok("epoll") => 0,
        _ => 2 * 64,
    };
    assert_eq!(sample(&after, "coremq_ring_buffers"), ring_buffers);
    assert_eq!(
        after["t:coremq_connack_latency_seconds"].as_str(),
        Some("histogram")
    );
    assert_eq!(
        delta("coremq_connack_latency_seconds_count"),
        4,
        "one observation per accepted CONNECT"
    );
    assert_eq!(delta("coremq_connack_latency_seconds_bucket{le=+Inf}"), 4);
    // The per-shard gauges follow each shard's tick: `held` shows on one.
    let per_shard = |m: &HashMap<String, json::Value>| {
        sample(m, "coremq_shard_connections{shard=0}")
            + sample(m, "coremq_shard_connections{shard=1}")
    };
    for _ in 0..50 {
        if per_shard(&after) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = scrape(mport);
    }
    assert_eq!(
        per_shard(&after),
        1,
        "only `held` is open, on one of 2 shards"
    );

    // Two QoS 1 messages for an offline persistent session wait in its
    // queue, and leave it when the client comes back for them.
    let away = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("away")
    };
    let (mut c, _) = RawClient::connect(port, &away);
    c.subscribe("q/#", 1);
    c.send(&disconnect_packet());
    c.expect_closed(5 * SEC);
    for m in ["a", "b"] {
        let (code, out, err) = run_bounded(
            Command::new(&tools().mosquitto_pub)
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-q", "1", "-t", "q/x", "-m", m]),
            10 * SEC,
        );
        assert_eq!(code, Some(0), "{out}{err}");
    }
    assert_eq!(sample(&scrape(mport), "coremq_messages_queued"), 2);
    let (mut c, present) = RawClient::connect(port, &away);
    assert!(present);
    c.expect_publish("q/x", b"a", 5 * SEC);
    c.expect_publish("q/x", b"b", 5 * SEC);
    assert_eq!(sample(&scrape(mport), "coremq_messages_queued"), 0);
}

#[test]
fn healthz_answers_and_bad_requests_get_http_errors() {
    let mport = unused_port();
    let maddr = format!("127.0.0.1:{mport}");
    let _broker = Broker::start(&["--metrics-listen", &maddr]);
    let ok = http(mport, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nok\n"),
        "{ok}"
    );
    let missing = http(mport, "GET /nope HTTP/1.1\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    let post = http(mport, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"),
        "{post}"
    );
    let junk = http(mport, "\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\r\n\r\n");
    assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
    let head = http(mport, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    // The endpoint still serves after all that.
    assert!(http(mport, "GET /metrics HTTP/1.0\r\n\r\n").contains("coremq_uptime_seconds "));
}

#[test]
fn a_metrics_port_in_use_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, out, err) = run_bounded(
        Command::new(common::COREMQ).args([
            "--listen",
            &format!("127.0.0.1:{}", unused_port()),
            "--metrics-listen",
            &addr,
        ]),
        10 * SEC,
    );
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains(&format!("--metrics-listen {addr}")), "{err}");
}

/// A full session queue is visible (issue 14, item 2): the deepest queues
/// by clientId in `/metrics` and in `$SYS/broker/queues/deepest`, and each
/// `--queue-full` outcome counted. An offline persistent session's full
/// queue drops the newest at once, whatever the policy.
#[test]
fn the_deepest_queues_and_full_queue_outcomes_are_visible() {
    let mport = unused_port();
    let broker = Broker::start(&[
        "--shards",
        "1",
        "--max-queued",
        "10",
        "--sys-interval",
        "1",
        "--metrics-listen",
        &format!("127.0.0.1:{mport}"),
    ]);
    let port = broker.port();
    let away = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("slow-away")
    };
    let (mut c, _) = RawClient::connect(port, &away);
    c.subscribe("q/#", 1);
    c.send(&disconnect_packet());
    c.expect_closed(5 * SEC);
    let (code, out, err) = run_bounded(
        &mut python_script(
            "paho_messaging.py",
            &[&port.to_string(), "publish_many", "q/x", "15", "20"],
        ),
        30 * SEC,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("\"acked\": 15"), "{out}");

    // Reported once a second.
    let depth = "coremq_session_queue_depth{client_id=slow-away,shard=0}";
    let mut m = scrape(mport);
    for _ in 0..30 {
        if m.contains_key(&format!("s:{depth}")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        m = scrape(mport);
    }
    assert_eq!(sample(&m, depth), 10);
    assert_eq!(
        sample(&m, "coremq_queue_full_total{outcome=dropped_newest}"),
        5
    );
    assert_eq!(sample(&m, "coremq_queue_full_total{outcome=held}"), 0);
    assert_eq!(
        m.get("t:coremq_queue_full").and_then(|v| v.as_str()),
        Some("counter")
    );

    // The same in $SYS (retained, published every --sys-interval).
    let (code, out, err) = run_bounded(
        Command::new(&tools().mosquitto_sub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", "$SYS/broker/queues/deepest", "-C", "1", "-W", "10"]),
        15 * SEC,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "10 slow-away");
}

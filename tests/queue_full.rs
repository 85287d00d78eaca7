//! `--queue-full` with real clients (Python paho-mqtt 2.x): what a PUBACK
//! means when a subscriber cannot keep up. Under backpressure (the
//! default) every acknowledged message arrives, in order, and the publisher
//! runs at the subscriber's pace; under drop-newest a 5.0 publisher gets
//! 0x97 (Quota exceeded) on exactly the messages that were dropped; a
//! subscriber that never reads holds its publisher for at most
//! `--queue-full-timeout`, and the broker's memory stays bounded.

mod common;

use std::time::{Duration, Instant};

use coremq::proto::handshake::owner_of;

use common::{json, python_script, run_bounded, Broker, RawClient};

const SEC: Duration = Duration::from_secs(1);

/// A clientId starting with `prefix` that lands on `shard` of `shards`.
fn id_on(prefix: &str, shard: u16, shards: u16) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| owner_of(id, shards).0 == shard)
        .expect("some id lands on every shard")
}

/// What `paho_slow_consumer.py` saw.
struct Run {
    acked: Vec<u64>,
    refused: Vec<u64>,
    code: Option<u64>,
    received: Vec<u64>,
    publish_secs: f64,
}

fn numbers(raw: Option<&json::Value>) -> Vec<u64> {
    let Some(json::Value::Other(text)) = raw else {
        panic!("not a list: {raw:?}");
    };
    text.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("a number"))
        .collect()
}

/// A slow subscriber on one shard, a publisher on the other.
fn slow_consumer(broker: &Broker, protocol: &str, count: u32, delay_ms: u32) -> Run {
    let sub = id_on("slow-sub", 1, 2);
    let publisher = id_on("fast-pub", 0, 2);
    let (code, out, err) = run_bounded(
        &mut python_script(
            "paho_slow_consumer.py",
            &[
                &broker.port().to_string(),
                protocol,
                &count.to_string(),
                &sub,
                &publisher,
                &delay_ms.to_string(),
            ],
        ),
        200 * SEC,
    );
    assert_eq!(code, Some(0), "paho_slow_consumer.py: {out}{err}");
    let r = json::parse_object(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|| panic!("not JSON: {out}{err}"));
    Run {
        acked: numbers(r.get("acked")),
        refused: numbers(r.get("refused")),
        code: r.get("code").and_then(json::Value::as_u64),
        received: numbers(r.get("received")),
        publish_secs: match r.get("publish_secs") {
            Some(json::Value::Num(n)) => *n,
            other => panic!("publish_secs: {other:?}"),
        },
    }
}

/// The case: a fast QoS 1 publisher and a subscriber slower than
/// it, on different shards. With backpressure nothing acknowledged is lost
/// (MQTT-4.3.2: a PUBACK means the server has taken ownership), every
/// message arrives once and in order (MQTT-4.6.0-2 for one publisher's
/// topic), and the publisher's rate falls to the subscriber's.
#[test]
fn backpressure_delivers_every_acknowledged_message_in_order_across_shards() {
    let broker = Broker::start(&[
        "--shards",
        "2",
        "--max-queued",
        "50",
        "--max-inflight",
        "10",
    ]);
    let count = 1_500;
    let run = slow_consumer(&broker, "311", count, 2);
    let stats = broker.fresh_stats();
    println!(
        "backpressure: {} acknowledged in {:.2} s ({:.0}/s), {} received, held {} times, dropped {}",
        run.acked.len(),
        run.publish_secs,
        run.acked.len() as f64 / run.publish_secs,
        run.received.len(),
        common::counter(&stats, "queue_full_held"),
        common::counter(&stats, "dropped"),
    );
    assert_eq!(run.acked, (0..u64::from(count)).collect::<Vec<_>>());
    assert!(run.refused.is_empty());
    assert_eq!(run.received, run.acked, "every one, once, in order");
    assert_eq!(common::counter(&stats, "dropped"), 0);
    assert!(
        common::counter(&stats, "queue_full_held") > 0,
        "the queue filled, so the policy was exercised"
    );
    // 2 ms per message for the subscriber: the 1,440 beyond its window and
    // queue could not be acknowledged faster than ~2.9 s; without the
    // backpressure the publisher was done in a fraction of a second.
    assert!(
        run.publish_secs > 1.5,
        "publisher not slowed: {} s",
        run.publish_secs
    );
    broker.assert_no_panic();
}

/// Under drop-newest, a 5.0 publisher's PUBACK carries 0x97 on exactly the
/// messages that were not queued: those are the ones the subscriber never
/// gets, and every message acknowledged with success arrives.
#[test]
fn drop_newest_tells_a_v5_publisher_0x97_on_exactly_the_dropped_messages() {
    let broker = Broker::start(&[
        "--shards",
        "2",
        "--max-queued",
        "50",
        "--max-inflight",
        "10",
        "--queue-full",
        "drop-newest",
    ]);
    let run = slow_consumer(&broker, "5", 1_000, 2);
    let stats = broker.fresh_stats();
    println!(
        "drop-newest: {} acknowledged, {} refused with {:?}, {} received in {:.2} s",
        run.acked.len(),
        run.refused.len(),
        run.code,
        run.received.len(),
        run.publish_secs
    );
    assert!(!run.refused.is_empty(), "the queue never filled");
    assert_eq!(run.code, Some(0x97));
    assert_eq!(run.acked.len() + run.refused.len(), 1_000);
    assert_eq!(
        run.received, run.acked,
        "exactly the accepted ones, in order"
    );
    let refused = run.refused.len() as u64;
    assert_eq!(
        common::counter(&stats, "queue_full_dropped_newest"),
        refused
    );
    assert_eq!(common::counter(&stats, "quota_exceeded_acks"), refused);
    broker.assert_no_panic();
}

/// A subscriber that never reads at all: its publisher is held for at most
/// the timeout, then the messages that meet its full queue are dropped
/// (counted), the publisher goes on at full speed, and the broker's memory
/// stays bounded.
#[test]
fn a_subscriber_that_never_reads_holds_its_publisher_only_for_the_timeout() {
    let broker = Broker::start(&[
        "--max-queued",
        "50",
        "--max-inflight",
        "10",
        "--queue-full-timeout",
        "2",
    ]);
    // Subscribes, then never reads its socket again.
    let _stuck = RawClient::subscriber(broker.port(), "never-reads", "slow/t", 1);
    let rss_before = broker.rss_kib();
    let started = Instant::now();
    let (code, out, err) = run_bounded(
        &mut python_script(
            "paho_messaging.py",
            &[
                &broker.port().to_string(),
                "publish_many",
                "slow/t",
                "3000",
                "1024",
            ],
        ),
        60 * SEC,
    );
    let elapsed = started.elapsed();
    assert_eq!(code, Some(0), "{out}{err}");
    let stats = broker.fresh_stats();
    let rss_after = broker.rss_kib();
    println!(
        "never-reads: 3000 x 1 KiB acknowledged in {:.2} s; timeouts {}, dropped {}; RSS {} -> {} KiB",
        elapsed.as_secs_f64(),
        common::counter(&stats, "queue_full_timeouts"),
        common::counter(&stats, "dropped"),
        rss_before,
        rss_after
    );
    assert!(out.contains("\"acked\": 3000"), "{out}");
    assert!(
        elapsed >= Duration::from_millis(1_900),
        "held for the timeout"
    );
    assert!(elapsed < 30 * SEC, "held once, not for every message");
    // What waited when the timeout came (at most the publisher's 100 in
    // flight) was dropped then; the rest met a stalled queue.
    let timed_out = common::counter(&stats, "queue_full_timeouts");
    assert!((1..=100).contains(&timed_out), "{timed_out}");
    assert!(common::counter(&stats, "dropped") >= 3_000 - 10 - 50 - 1);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    broker.assert_no_panic();
}

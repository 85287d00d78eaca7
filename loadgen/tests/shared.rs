//! `loadgen pubsub --share-group`: shared subscriptions end to end, against
//! coremq with its members spread over 4 shards and against mosquitto (the
//! test command installs it; a missing one fails the test). Each message must
//! reach the group exactly once — not once per member — with nothing lost,
//! and every member must take a share. Every server a test starts is killed
//! by its PID when the test ends; every loadgen run has a wall-clock limit.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{coremq_with, explain, loadgen, mosquitto, u, LOADGEN};

const LIMIT: Duration = Duration::from_secs(30);
const MEMBERS: u64 = 8;
const PUBLISHERS: u64 = 3;

/// A short paced run of PUBLISHERS publishers on one topic and a group of
/// MEMBERS members; the report's pubsub section.
fn run_shared(addr: &str, protocol: &str, qos: &str, prefix: &str) -> Value {
    let members = MEMBERS.to_string();
    let publishers = PUBLISHERS.to_string();
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            addr,
            "--fan-out",
            &members,
            "--publishers",
            &publishers,
            "--share-group",
            "lg-group",
            "--qos",
            qos,
            "--rate",
            "3000",
            "--duration",
            "1",
            "--protocol",
            protocol,
            "--prefix",
            prefix,
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("shared subscriptions $share/lg-group/"),
        "{table}"
    );
    let r = r.unwrap();
    assert_eq!(u(&r, "failed_total"), 0, "{}", r["failures"]);
    assert_eq!(u(&r, "connected"), MEMBERS + PUBLISHERS, "{r}");
    assert_eq!(r["params"]["share_group"], "lg-group", "{r}");
    r["pubsub"].clone()
}

/// Exactly once to the group: expected = published (not × members), every
/// message arrived once, none twice, in order at each member, and the
/// deliveries spread over every member.
fn once_per_group(p: &Value) {
    let published = u(p, "published");
    // Paced at 3,000/s for a second, on a machine that may be busy.
    assert!((1000..=3100).contains(&published), "{p}");
    assert_eq!(u(p, "publishers"), PUBLISHERS, "{p}");
    assert_eq!(u(p, "subscribers"), MEMBERS, "{p}");
    assert_eq!(u(p, "subscribed"), MEMBERS, "{p}");
    assert_eq!(u(p, "expected"), published, "{p}");
    assert_eq!(u(p, "delivered"), published, "{p}");
    assert_eq!(u(p, "unique"), published, "{p}");
    for k in ["lost", "duplicates", "out_of_order", "misrouted", "unacked"] {
        assert_eq!(u(p, k), 0, "{k}: {p}");
    }
    assert_eq!(u(p, "acked"), published, "{p}");
    assert_eq!(u(p, "streams"), MEMBERS * PUBLISHERS, "{p}");
    assert_eq!(p["drain_timed_out"], false, "{p}");
    let g = &p["shared"];
    assert_eq!(g["group"], "lg-group", "{p}");
    assert_eq!(u(g, "groups"), 1, "{p}");
    assert_eq!(u(g, "members_per_group"), MEMBERS, "{p}");
    let (min, max) = (u(g, "member_deliveries_min"), u(g, "member_deliveries_max"));
    assert_eq!(u(g, "members_without_delivery"), 0, "{p}");
    assert!(0 < min && min <= max, "{p}");
    // MEMBERS members share `published` deliveries.
    assert!(
        min * MEMBERS <= published && published <= max * MEMBERS,
        "{p}"
    );
}

#[test]
fn shared_group_on_4_shards_gets_each_message_once() {
    let (_s, addr) = coremq_with(&["--shards", "4"]);
    once_per_group(&run_shared(&addr, "4", "1", "c4"));
    let p = run_shared(&addr, "5", "2", "c5");
    once_per_group(&p);
    assert_eq!(p["exactly_once_violated"], false, "{p}");
}

#[test]
fn shared_group_against_mosquitto_gets_each_message_once() {
    let (_s, addr) = mosquitto();
    once_per_group(&run_shared(&addr, "4", "1", "m4"));
    let p = run_shared(&addr, "5", "2", "m5");
    once_per_group(&p);
    assert_eq!(p["exactly_once_violated"], false, "{p}");
}

#[test]
fn plain_fan_out_with_publishers_owes_every_subscriber() {
    // Without a group the same shape owes each message to every subscriber.
    let (_s, addr) = coremq_with(&["--shards", "4"]);
    let (out, r) = loadgen(
        &[
            "pubsub",
            "-b",
            &addr,
            "--fan-out",
            "4",
            "--publishers",
            "2",
            "--qos",
            "1",
            "--rate",
            "1000",
            "--duration",
            "1",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", explain(&out));
    let r = r.unwrap();
    let p = &r["pubsub"];
    let published = u(p, "published");
    assert!(published > 0, "{p}");
    assert_eq!(u(p, "expected"), published * 4, "{p}");
    assert_eq!(u(p, "unique"), published * 4, "{p}");
    assert_eq!(u(p, "streams"), 8, "{p}");
    assert!(p["shared"].is_null(), "{p}");
}

#[test]
fn bad_share_arguments_get_one_line_and_exit_2() {
    for (args, needle) in [
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--fan-out",
                "2",
                "--share-group",
                "a/b",
            ],
            "--share-group",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--fan-out",
                "2",
                "--share-group",
                "",
            ],
            "--share-group",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--fan-out",
                "2",
                "--publishers",
                "0",
            ],
            "--publishers",
        ),
        (
            vec![
                "pubsub",
                "-b",
                "127.0.0.1:1",
                "--pairs",
                "2",
                "--publishers",
                "2",
            ],
            "--fan-out",
        ),
    ] {
        let out = Command::new(LOADGEN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

//! MQTT 5.0 with Python paho-mqtt 2.x (MQTTv5) against coremq on 4 shards:
//! CONNACK properties and refusal codes, session expiry, will delay and will
//! properties, Receive Maximum, Maximum Packet Size, topic aliases both
//! ways, message expiry and forwarded properties, subscription options and
//! identifiers, SUBACK / UNSUBACK / PUBACK reason codes, shared
//! subscriptions, server DISCONNECT reason codes, request / response, and
//! 3.1.1 and 5.0 clients meeting.
//!
//! Each test runs one scenario of `tests/scripts/paho_v5.py`, which prints
//! what its clients saw as one flat JSON line; the assertions are here.
//! Client ids are picked with the broker's own hash so that the clients of a
//! scenario sit on different shards. Timed checks use intervals of 1-2 s and
//! bound both sides (no earlier than the rule allows, not much later).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::json::{self, Value};
use common::{python_script, run_bounded, Broker, LineProc, TempDir, COREMQ};
use coremq::proto::handshake::owner_of;

const SEC: Duration = Duration::from_secs(1);
const SHARDS: u16 = 4;

type Obj = HashMap<String, Value>;

/// `n` (at most 4) client ids starting with `prefix`, each owned by a
/// different one of the broker's 4 shards.
fn ids(prefix: &str, n: usize) -> Vec<String> {
    assert!(n <= usize::from(SHARDS));
    let mut out: Vec<String> = Vec::new();
    let mut taken = Vec::new();
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let shard = owner_of(&id, SHARDS);
        if !taken.contains(&shard) {
            taken.push(shard);
            out.push(id);
            if out.len() == n {
                break;
            }
        }
    }
    out
}

/// Runs one paho_v5.py scenario to completion and returns its JSON lines.
fn paho_lines(port: u16, scenario: &str, args: &[&str]) -> Vec<Obj> {
    let mut argv = vec![port.to_string(), scenario.to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (code, out, err) = run_bounded(&mut python_script("paho_v5.py", &argv), 30 * SEC);
    assert_eq!(code, Some(0), "paho_v5.py {argv:?}: {out}{err}");
    let lines: Vec<Obj> = out
        .lines()
        .map(|l| json::parse_object(l).unwrap_or_else(|| panic!("not JSON: {l}; stderr {err}")))
        .collect();
    assert!(
        !lines.is_empty(),
        "paho_v5.py {argv:?} printed nothing; {err}"
    );
    lines
}

/// Runs one paho_v5.py scenario and returns its (last) JSON line.
fn paho(port: u16, scenario: &str, args: &[&str]) -> Obj {
    let mut lines = paho_lines(port, scenario, args);
    let r = lines.pop().unwrap();
    eprintln!("{scenario}: {r:?}");
    r
}

fn s<'a>(r: &'a Obj, k: &str) -> &'a str {
    r.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {k:?} in {r:?}"))
}

/// A number, `None` for null or absent.
fn n(r: &Obj, k: &str) -> Option<u64> {
    r.get(k).and_then(Value::as_u64)
}

fn f(r: &Obj, k: &str) -> Option<f64> {
    match r.get(k) {
        Some(Value::Num(x)) => Some(*x),
        _ => None,
    }
}

fn b(r: &Obj, k: &str) -> bool {
    r.get(k)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("no bool {k:?} in {r:?}"))
}

fn is_null(r: &Obj, k: &str) -> bool {
    matches!(r.get(k), None | Some(Value::Null))
}

/// One CONNACK per spec (see paho_v5.py `connack`), clients kept connected
/// until the last is answered.
fn connack(port: u16, specs: &str) -> Vec<Obj> {
    let lines = paho_lines(port, "connack", &[specs]);
    for l in &lines {
        assert!(is_null(l, "error"), "{l:?}");
    }
    lines
}

fn password_file(dir: &TempDir) -> String {
    let file = dir.path("passwords");
    let file_s = file.to_str().unwrap().to_string();
    for (user, pass, create) in [("alice", "a-pw", true), ("bob", "b-pw", false)] {
        let mut args = vec!["passwd"];
        if create {
            args.push("-c");
        }
        args.extend([file_s.as_str(), user, "--password", pass]);
        let (code, out, err) = run_bounded(Command::new(COREMQ).args(&args), 20 * SEC);
        assert_eq!(code, Some(0), "coremq passwd: {out}{err}");
    }
    file_s
}

const ACL: &str = "\
# anonymous clients: read the public topics
topic read public/#

user alice
topic readwrite fleet/#
topic deny fleet/secret/#

user bob
topic read fleet/+/temp
";

fn acl_broker(dir: &TempDir) -> Broker {
    let acl = dir.path("acl");
    std::fs::write(&acl, ACL).unwrap();
    let pw = password_file(dir);
    Broker::start(&[
        "--acl-file",
        acl.to_str().unwrap(),
        "--password-file",
        &pw,
        "--allow-anonymous",
        "true",
    ])
}

// ---------------------------------------------------------------- CONNECT / CONNACK

/// A v5 CONNACK carries the broker's limits and capabilities (Receive
/// Maximum, Maximum Packet Size, Topic Alias Maximum, Retain / Wildcard /
/// Subscription Identifier / Shared Subscription Available), and an empty
/// clientId — with Clean Start 1 or 0, both allowed in 5.0 — gets a new
/// Assigned Client Identifier (MQTT-3.2.2-16, MQTT-3.1.3-7).
#[test]
fn connack_properties_and_assigned_client_identifier_mqtt_3_2_2_16() {
    let broker = Broker::start(&[
        "--receive-maximum",
        "10",
        "--max-packet-size",
        "5000",
        "--max-topic-alias",
        "7",
    ]);
    let acks = connack(
        broker.port(),
        r#"[{"id": "props-a"}, {"id": "", "clean": true}, {"id": "", "clean": false}]"#,
    );
    assert_eq!(acks.len(), 3);
    for a in &acks {
        assert_eq!(n(a, "rc"), Some(0), "{a:?}");
        assert!(!b(a, "present"), "{a:?}");
        assert_eq!(n(a, "ReceiveMaximum"), Some(10), "{a:?}");
        assert_eq!(n(a, "MaximumPacketSize"), Some(5000), "{a:?}");
        assert_eq!(n(a, "TopicAliasMaximum"), Some(7), "{a:?}");
        assert_eq!(n(a, "RetainAvailable"), Some(1), "{a:?}");
        assert_eq!(n(a, "WildcardSubscriptionAvailable"), Some(1), "{a:?}");
        assert_eq!(n(a, "SubscriptionIdentifierAvailable"), Some(1), "{a:?}");
        assert_eq!(n(a, "SharedSubscriptionAvailable"), Some(1), "{a:?}");
        // Not asked for, no cap set: none of these.
        assert!(is_null(a, "ResponseInformation"), "{a:?}");
        assert!(is_null(a, "ServerKeepAlive"), "{a:?}");
        assert!(is_null(a, "AuthenticationMethod"), "{a:?}");
    }
    assert!(
        is_null(&acks[0], "AssignedClientIdentifier"),
        "{:?}",
        acks[0]
    );
    let id1 = s(&acks[1], "AssignedClientIdentifier");
    let id2 = s(&acks[2], "AssignedClientIdentifier");
    assert!(!id1.is_empty() && !id2.is_empty());
    assert_ne!(id1, id2, "assigned identifiers must be unique");
    assert_eq!(broker.fresh_stats()["takeovers"], 0);
}

/// --max-keepalive: a v5 client asking for more, or for 0, is told Server
/// Keep Alive = the cap; one asking for less is not raised to it
/// (MQTT-3.2.2-21/22).
#[test]
fn server_keep_alive_caps_keep_alive_mqtt_3_2_2_21() {
    let broker = Broker::start(&["--max-keepalive", "5"]);
    let acks = connack(
        broker.port(),
        r#"[{"id": "ka-60", "keepalive": 60}, {"id": "ka-0", "keepalive": 0},
            {"id": "ka-3", "keepalive": 3}]"#,
    );
    assert_eq!(n(&acks[0], "ServerKeepAlive"), Some(5), "{:?}", acks[0]);
    assert_eq!(n(&acks[1], "ServerKeepAlive"), Some(5), "{:?}", acks[1]);
    let ka3 = n(&acks[2], "ServerKeepAlive");
    assert!(ka3.is_none() || ka3 == Some(3), "{:?}", acks[2]);
}

/// A v5 client held to Server Keep Alive 1 (it asked for 60) that then
/// sends nothing is disconnected with DISCONNECT 0x8D after 1.5 s, not
/// before (MQTT-3.1.2-22).
#[test]
fn keep_alive_timeout_disconnect_0x8d_mqtt_3_1_2_22() {
    let broker = Broker::start(&["--max-keepalive", "1"]);
    let r = paho(
        broker.port(),
        "keepalive_silence",
        &["ka-silent", "60", "1.3", "4"],
    );
    assert_eq!(n(&r, "server_keepalive"), Some(1), "{r:?}");
    assert!(
        !b(&r, "early"),
        "closed before 1.5 x Server Keep Alive: {r:?}"
    );
    let at = f(&r, "ended_at").unwrap_or_else(|| panic!("never closed: {r:?}"));
    assert!(at < 2.3, "closed {at} s after the last packet: {r:?}");
    assert_eq!(n(&r, "disconnect"), Some(0x8D), "{r:?}");
}

/// --max-keepalive is MQTT 5 only: a 3.1.1 client with keepAlive 0 that
/// stays silent for 2.5 s (over 1.5 x the cap of 1 s) is not closed.
#[test]
fn max_keepalive_does_not_apply_to_v311_mqtt_3_1_2_22() {
    let broker = Broker::start(&["--max-keepalive", "1"]);
    let r = paho(
        broker.port(),
        "keepalive_silence",
        &["ka-v311", "0", "2.5", "2.5", "311"],
    );
    assert!(is_null(&r, "ended_at"), "3.1.1 client closed: {r:?}");
    assert!(!b(&r, "early"), "{r:?}");
}

/// --max-session-expiry caps what a client asks for: CONNACK Session Expiry
/// Interval says the cap, and the session goes after the cap.
#[test]
fn session_expiry_capped_by_max_session_expiry_mqtt_3_1_2_23() {
    let broker = Broker::start(&["--max-session-expiry", "1"]);
    let [sub, publ] = <[String; 2]>::try_from(ids("cap", 2)).unwrap();
    let r = paho(
        broker.port(),
        "session",
        &[&sub, &publ, "100", "0.4", "1.9"],
    );
    assert_eq!(n(&r, "connack_expiry"), Some(1), "{r:?}");
    assert!(b(&r, "present1"), "{r:?}");
    assert_eq!(s(&r, "got1"), "q1,q2,q3,live");
    assert!(!b(&r, "present2"), "kept past the capped interval: {r:?}");
    assert_eq!(s(&r, "got2"), "");
}

/// --response-information is sent only to a client that sets Request
/// Response Information = 1 (MQTT-3.1.2-28).
#[test]
fn response_information_only_when_requested_mqtt_3_1_2_28() {
    let broker = Broker::start(&["--response-information", "coremq/rsp/"]);
    let acks = connack(
        broker.port(),
        r#"[{"id": "ri-1", "props": {"RequestResponseInformation": 1}},
            {"id": "ri-0", "props": {"RequestResponseInformation": 0}},
            {"id": "ri-none"}]"#,
    );
    assert_eq!(s(&acks[0], "ResponseInformation"), "coremq/rsp/");
    assert!(is_null(&acks[1], "ResponseInformation"), "{:?}", acks[1]);
    assert!(is_null(&acks[2], "ResponseInformation"), "{:?}", acks[2]);
}

/// With a password file: a wrong password or unknown user gets CONNACK 0x86,
/// an anonymous client 0x87 when anonymous clients are refused; refusals
/// have session present 0 (MQTT-3.1.4-2, MQTT-3.2.2-6).
#[test]
fn bad_password_0x86_and_anonymous_0x87_mqtt_3_1_4_2() {
    let dir = TempDir::new("v5-auth");
    let file = password_file(&dir);
    let broker = Broker::start(&["--password-file", &file, "--allow-anonymous", "false"]);
    let acks = connack(
        broker.port(),
        r#"[{"id": "pw-ok", "user": "alice", "password": "a-pw"},
            {"id": "pw-bad", "user": "alice", "password": "wrong"},
            {"id": "pw-unknown", "user": "mallory", "password": "a-pw"},
            {"id": "pw-anon"}]"#,
    );
    let rcs: Vec<_> = acks.iter().map(|a| n(a, "rc")).collect();
    assert_eq!(rcs, [Some(0), Some(0x86), Some(0x86), Some(0x87)]);
    for a in &acks {
        assert!(!b(a, "present"), "{a:?}");
    }
}

/// An Authentication Method (enhanced authentication, which coremq does
/// not support) gets CONNACK 0x8C (MQTT-4.12.0-1).
#[test]
fn authentication_method_refused_0x8c_mqtt_4_12_0_1() {
    let broker = Broker::start(&[]);
    let acks = connack(
        broker.port(),
        r#"[{"id": "auth-m", "props": {"AuthenticationMethod": "SCRAM-SHA-1"}},
            {"id": "auth-none"}]"#,
    );
    assert_eq!(n(&acks[0], "rc"), Some(0x8C), "{:?}", acks[0]);
    assert!(is_null(&acks[0], "AuthenticationMethod"), "{:?}", acks[0]);
    assert_eq!(n(&acks[1], "rc"), Some(0));
}

/// At --max-connections a v5 client gets CONNACK 0x97 Quota exceeded.
#[test]
fn max_connections_gives_quota_exceeded_0x97_mqtt_3_2_2_8() {
    let broker = Broker::start(&["--max-connections", "1"]);
    let acks = connack(broker.port(), r#"[{"id": "q-1"}, {"id": "q-2"}]"#);
    assert_eq!(n(&acks[0], "rc"), Some(0));
    assert_eq!(n(&acks[1], "rc"), Some(0x97), "{:?}", acks[1]);
}

// ---------------------------------------------------------------- sessions

/// Session Expiry Interval 2: a reconnect after 1.4 s resumes the session
/// (session present, subscription kept, the QoS 1 messages queued while
/// offline delivered in order); a reconnect 2.7 s after the next close finds
/// none (MQTT-3.1.2-23, MQTT-3.2.2-3, MQTT-4.1.0-2).
#[test]
fn session_expiry_keeps_then_discards_session_mqtt_3_1_2_23() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("sess", 2)).unwrap();
    let r = paho(broker.port(), "session", &[&sub, &publ, "2", "1.4", "2.7"]);
    // Granted as asked: no CONNACK property, or the same value.
    let granted = n(&r, "connack_expiry");
    assert!(granted.is_none() || granted == Some(2), "{r:?}");
    assert!(b(&r, "present1"), "session gone within its interval: {r:?}");
    assert_eq!(s(&r, "got1"), "q1,q2,q3,live", "{r:?}");
    assert!(!b(&r, "present2"), "session kept past its interval: {r:?}");
    assert_eq!(s(&r, "got2"), "", "subscription kept past expiry: {r:?}");
}

/// No Session Expiry Interval (0): the session ends with the connection; a
/// Clean Start 0 reconnect gets session present 0 and no old subscription
/// (MQTT-3.1.2-23, MQTT-3.2.2-3).
#[test]
fn session_expiry_0_ends_session_with_connection_mqtt_3_2_2_3() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("sess0", 2)).unwrap();
    let r = paho(broker.port(), "session", &[&sub, &publ, "0", "0.2", "0.2"]);
    assert!(!b(&r, "present1"), "{r:?}");
    assert_eq!(s(&r, "got1"), "", "{r:?}");
}

/// Clean Start 0 resumes a stored session (session present, queued message
/// delivered); Clean Start 1 discards it: session present 0, neither its
/// subscription nor what was queued for it survive (MQTT-3.1.2-4,
/// MQTT-3.1.2-5, MQTT-3.2.2-2, MQTT-3.2.2-3).
#[test]
fn clean_start_discards_stored_session_mqtt_3_1_2_4_mqtt_3_2_2_2() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("cs", 2)).unwrap();
    let r = paho(broker.port(), "clean_start", &[&sub, &publ]);
    assert!(b(&r, "present_resume"), "{r:?}");
    assert_eq!(s(&r, "got_resume"), "queued", "{r:?}");
    assert!(!b(&r, "present_clean"), "{r:?}");
    assert_eq!(s(&r, "got_clean"), "", "{r:?}");
}

// ---------------------------------------------------------------- wills

fn assert_will_properties(r: &Obj) {
    assert_eq!(s(r, "payload"), "gone", "{r:?}");
    assert_eq!(s(r, "will_content_type"), "text/plain", "{r:?}");
    assert_eq!(s(r, "will_response_topic"), "will/reply", "{r:?}");
    assert_eq!(s(r, "will_correlation"), "000177696c6cff", "{r:?}");
    assert_eq!(n(r, "will_pfi"), Some(1), "{r:?}");
    assert_eq!(s(r, "will_user"), "k=1,a=2,k=3", "{r:?}");
    let expiry = n(r, "will_expiry").unwrap_or_else(|| panic!("no expiry: {r:?}"));
    assert!((55..=60).contains(&expiry), "{r:?}");
}

/// Will Delay Interval 2: after an abnormal close the will arrives no
/// earlier than 2 s (and not much later), with its properties — content
/// type, response topic, correlation data, payload format, user properties
/// in order, message expiry — at a v5 subscriber on another shard
/// (MQTT-3.1.2-8, MQTT-3.3.2-4/15/16/17/18/20).
#[test]
fn will_delay_interval_and_will_properties_mqtt_3_1_2_8() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("wd", 2)).unwrap();
    let r = paho(broker.port(), "will", &[&watch, &dev, "drop", "2", "60"]);
    let at = f(&r, "will_after").unwrap_or_else(|| panic!("no will: {r:?}"));
    assert!(
        (2.0..3.2).contains(&at),
        "will {at} s after the close: {r:?}"
    );
    assert_eq!(n(&r, "wills"), Some(1), "{r:?}");
    assert_eq!(s(&r, "topic"), format!("will/{dev}"));
    assert_will_properties(&r);
}

/// A reconnect (Clean Start 0) 0.5 s into a 2 s Will Delay Interval cancels
/// the will (MQTT-3.1.3-9). The session expiry (3 s) is close behind the
/// delay, so a will wrongly kept would go out, at the delay or at the
/// session's end, within the 3.5 s watched.
#[test]
fn will_cancelled_by_reconnect_within_delay_mqtt_3_1_3_9() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("wr", 2)).unwrap();
    let r = paho(
        broker.port(),
        "will",
        &[&watch, &dev, "reconnect", "2", "3", "0.5"],
    );
    assert_eq!(
        n(&r, "wills"),
        Some(0),
        "will sent despite the reconnect: {r:?}"
    );
}

/// DISCONNECT 0x04 (Disconnect with Will Message) publishes the will at
/// once, whatever its delay (5 s here).
#[test]
fn disconnect_with_will_0x04_publishes_will_at_once_mqtt_3_14_2_1() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("w4", 2)).unwrap();
    let r = paho(
        broker.port(),
        "will",
        &[&watch, &dev, "disconnect_with_will", "5", "60"],
    );
    let at = f(&r, "will_after").unwrap_or_else(|| panic!("no will: {r:?}"));
    assert!(at < 1.0, "will {at} s after DISCONNECT 0x04: {r:?}");
    assert_will_properties(&r);
}

/// DISCONNECT 0x00 discards the will (MQTT-3.14.4-3, MQTT-3.1.2-10).
#[test]
fn normal_disconnect_discards_will_mqtt_3_14_4_3() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("w0", 2)).unwrap();
    let r = paho(
        broker.port(),
        "will",
        &[&watch, &dev, "disconnect_normal", "0", "60"],
    );
    assert_eq!(n(&r, "wills"), Some(0), "{r:?}");
}

/// A session that ends (expiry 1 s) before the will delay (10 s) has
/// passed publishes the will when it ends (MQTT-3.1.2-8).
#[test]
fn will_published_when_session_ends_before_delay_mqtt_3_1_2_8() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("we", 2)).unwrap();
    let r = paho(broker.port(), "will", &[&watch, &dev, "drop", "10", "1"]);
    let at = f(&r, "will_after").unwrap_or_else(|| panic!("no will: {r:?}"));
    assert!(
        (1.0..2.5).contains(&at),
        "will {at} s after the close: {r:?}"
    );
}

/// Session Expiry Interval 0 at CONNECT and non-zero on DISCONNECT is a
/// Protocol Error (MQTT 5.0 3.14.2.2.2): the DISCONNECT does not count as a
/// normal one, so the will goes out, and no session is kept.
#[test]
fn disconnect_raising_session_expiry_from_0_is_protocol_error_will_published() {
    let broker = Broker::start(&[]);
    let [watch, dev] = <[String; 2]>::try_from(ids("wse", 2)).unwrap();
    let r = paho(
        broker.port(),
        "will",
        &[&watch, &dev, "disconnect_set_expiry", "0", "0"],
    );
    assert_eq!(n(&r, "wills"), Some(1), "{r:?}");
    let at = f(&r, "will_after").unwrap();
    assert!(at < 1.0, "will {at} s after the DISCONNECT: {r:?}");
    assert!(!b(&r, "present_after"), "{r:?}");
}

// ---------------------------------------------------------------- flow control

/// A client with Receive Maximum 2 that holds its PUBACKs never has more
/// than 2 QoS 1 messages in flight from the broker; as it acknowledges, the
/// rest come, all 10 in order (MQTT-3.3.4-9).
#[test]
fn receive_maximum_bounds_unacknowledged_deliveries_mqtt_3_3_4_9() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("rm", 2)).unwrap();
    let r = paho(broker.port(), "receive_max", &[&sub, &publ, "2", "10"]);
    assert_eq!(n(&r, "first_batch"), Some(2), "{r:?}");
    assert!(n(&r, "max_unacked").unwrap() <= 2, "{r:?}");
    assert_eq!(s(&r, "received"), "0,1,2,3,4,5,6,7,8,9", "{r:?}");
}

/// --receive-maximum 2: a client with 2 incoming QoS 2 PUBLISHes awaiting
/// PUBREL is fine; a third gets DISCONNECT 0x93 Receive Maximum exceeded
/// (the client broke MQTT-3.3.4-7).
#[test]
fn receive_maximum_exceeded_disconnect_0x93_mqtt_3_3_4_7() {
    let broker = Broker::start(&["--receive-maximum", "2"]);
    let port = broker.port();
    let r = paho(port, "receive_max_exceeded", &["rmx-2", "2"]);
    assert!(is_null(&r, "disconnect"), "{r:?}");
    let r = paho(port, "receive_max_exceeded", &["rmx-3", "3"]);
    assert_eq!(n(&r, "disconnect"), Some(0x93), "{r:?}");
    assert!(b(&r, "from_server"), "{r:?}");
}

/// A client advertising Maximum Packet Size 200 is not sent a 400-byte
/// message (and is not disconnected); the small ones before and after reach
/// it, and another subscriber gets all three (MQTT-3.1.2-24, MQTT-3.1.2-25).
#[test]
fn client_maximum_packet_size_skips_larger_messages_mqtt_3_1_2_25() {
    let broker = Broker::start(&[]);
    let [small, other, publ] = <[String; 3]>::try_from(ids("mps", 3)).unwrap();
    let r = paho(broker.port(), "max_packet", &[&small, &other, &publ, "200"]);
    assert_eq!(s(&r, "small"), "small-1,small-2", "{r:?}");
    assert_eq!(s(&r, "other"), "small-1,big400,small-2", "{r:?}");
    assert!(!b(&r, "small_disconnected"), "{r:?}");
}

/// A PUBLISH larger than --max-packet-size gets DISCONNECT 0x95.
#[test]
fn packet_over_max_packet_size_gets_disconnect_0x95_mqtt_3_2_2_15() {
    let broker = Broker::start(&["--max-packet-size", "1000"]);
    let r = paho(broker.port(), "too_large", &["big-pub", "2000"]);
    assert_eq!(n(&r, "disconnect"), Some(0x95), "{r:?}");
    assert!(b(&r, "from_server"), "{r:?}");
}

// ---------------------------------------------------------------- topic aliases

/// PUBLISHes with Topic Alias (topic + alias, then alias with an empty
/// topic, then a remapped alias) reach a subscriber on another shard under
/// the right topics; that subscriber did not offer aliases, so it gets none
/// (MQTT-3.3.2-12, MQTT-3.1.2-27).
#[test]
fn topic_alias_from_client_resolved_mqtt_3_3_2_12() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("ta", 2)).unwrap();
    let r = paho(broker.port(), "topic_alias", &[&sub, &publ]);
    assert_eq!(
        s(&r, "received"),
        "ta/one:p1,ta/one:p2,ta/two:p3,ta/two:p4,ta/one:p5,ta/three:p6,ta/three:p7,ta/plain:p8",
        "{r:?}"
    );
    assert_eq!(s(&r, "aliases_to_sub"), "", "{r:?}");
    assert!(!b(&r, "pub_disconnected"), "{r:?}");
}

/// With --max-topic-alias 4: alias 5 and alias 0 get DISCONNECT 0x94 Topic
/// Alias invalid (MQTT-3.3.2-8, MQTT-3.3.2-9); an alias with an empty topic
/// and no mapping yet is a Protocol Error, 0x82.
#[test]
fn invalid_topic_alias_disconnect_0x94_mqtt_3_3_2_9() {
    let broker = Broker::start(&["--max-topic-alias", "4"]);
    let port = broker.port();
    let acks = connack(port, r#"[{"id": "tam"}]"#);
    assert_eq!(n(&acks[0], "TopicAliasMaximum"), Some(4));
    for (alias, topic, want) in [("5", "ta/x", 0x94), ("0", "ta/x", 0x94), ("3", "-", 0x82)] {
        let r = paho(port, "topic_alias_bad", &["ta-bad", alias, topic]);
        assert_eq!(n(&r, "disconnect"), Some(want), "alias {alias}: {r:?}");
        assert!(b(&r, "from_server"), "alias {alias}: {r:?}");
    }
}

/// A subscriber offering Topic Alias Maximum 2 gets aliases no greater than
/// 2, uses of them with an empty topic, and every message under the right
/// topic once resolved (MQTT-3.3.2-11, MQTT-3.1.2-26).
#[test]
fn topic_alias_to_client_within_its_maximum_mqtt_3_3_2_11() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("tao", 2)).unwrap();
    let r = paho(broker.port(), "topic_alias_out", &[&sub, &publ, "2"]);
    assert_eq!(s(&r, "resolved"), s(&r, "sent"), "{r:?}");
    assert_eq!(s(&r, "payloads"), "0,1,2,3,4,5,6", "{r:?}");
    assert_eq!(n(&r, "unresolved"), Some(0), "{r:?}");
    let max = n(&r, "max_alias").unwrap();
    assert!(max <= 2, "alias {max} over the client's maximum: {r:?}");
    assert!(
        max >= 1 && n(&r, "min_alias").unwrap() >= 1,
        "no aliases used: {r:?}"
    );
    assert!(
        n(&r, "empty_topic").unwrap() > 0,
        "aliases never used: {r:?}"
    );
}

// ---------------------------------------------------------------- messages

/// Message Expiry Interval: a message with 1 s left is not delivered to a
/// persistent session that comes back 2.2 s later; one with 100 s is, with
/// its interval reduced by the wait; one without expiry is, without the
/// property. Live deliveries carry the interval, never more than sent
/// (MQTT-3.3.2-5, MQTT-3.3.2-6).
#[test]
fn message_expiry_interval_mqtt_3_3_2_5_mqtt_3_3_2_6() {
    let broker = Broker::start(&[]);
    let [sub, live, publ] = <[String; 3]>::try_from(ids("mei", 3)).unwrap();
    let r = paho(broker.port(), "message_expiry", &[&sub, &live, &publ]);
    assert_eq!(s(&r, "live"), "short,long,none", "{r:?}");
    let live_long = n(&r, "live_long_expiry").unwrap();
    assert!((99..=100).contains(&live_long), "{r:?}");
    assert_eq!(n(&r, "live_short_expiry"), Some(1), "{r:?}");
    assert!(is_null(&r, "live_none_expiry"), "{r:?}");
    assert!(b(&r, "present"), "{r:?}");
    assert_eq!(
        s(&r, "queued"),
        "long,none",
        "expired message delivered: {r:?}"
    );
    let queued_long = n(&r, "queued_long_expiry").unwrap();
    assert!(
        (95..=98).contains(&queued_long),
        "remaining interval after 2.2 s: {r:?}"
    );
    assert!(is_null(&r, "queued_none_expiry"), "{r:?}");
}

/// Payload Format Indicator, Content Type, Response Topic, Correlation Data
/// and User Properties (a repeated key among them) reach subscribers
/// unaltered and in order, live and from a session queue (MQTT-3.3.2-4,
/// MQTT-3.3.2-15/16/17/18/20).
#[test]
fn publish_properties_forwarded_unaltered_mqtt_3_3_2_17_mqtt_3_3_2_18() {
    let broker = Broker::start(&[]);
    let [sub, live, publ] = <[String; 3]>::try_from(ids("props", 3)).unwrap();
    let r = paho(broker.port(), "message_expiry", &[&sub, &live, &publ]);
    for path in ["live", "queued"] {
        let k = |x: &str| format!("{path}_long_{x}");
        assert_eq!(n(&r, &k("pfi")), Some(1), "{path}: {r:?}");
        assert_eq!(s(&r, &k("content_type")), "application/json", "{path}");
        assert_eq!(s(&r, &k("response_topic")), "me/reply", "{path}");
        assert_eq!(s(&r, &k("correlation")), "0001feff", "{path}");
        assert_eq!(s(&r, &k("user")), "b=2,a=1,b=3", "{path}");
        // The plain one gets none of them.
        let k = |x: &str| format!("{path}_none_{x}");
        assert!(
            is_null(&r, &k("pfi")) && is_null(&r, &k("content_type")),
            "{r:?}"
        );
        assert_eq!(s(&r, &k("user")), "", "{path}");
    }
}

/// A retained message past its expiry is not sent to a new subscription;
/// one still alive is, with what is left of its interval
/// (MQTT-3.3.2-5, MQTT-3.3.2-6).
#[test]
fn retained_message_expiry_mqtt_3_3_2_5() {
    let broker = Broker::start(&[]);
    let [s1, s2, publ] = <[String; 3]>::try_from(ids("rex", 3)).unwrap();
    let r = paho(broker.port(), "retained_expiry", &[&s1, &s2, &publ]);
    assert_eq!(s(&r, "sub1"), "re/a,re/b", "{r:?}");
    assert_eq!(
        s(&r, "sub2"),
        "re/b",
        "expired retained message sent: {r:?}"
    );
    let left = n(&r, "sub2_b_expiry").unwrap();
    assert!((96..=99).contains(&left), "{r:?}");
    assert!(b(&r, "sub2_b_retain"), "{r:?}");
}

// ---------------------------------------------------------------- subscription options

/// No Local: a client's own PUBLISH does not come back on a No Local
/// subscription; another client's does, and its own does on a plain one
/// (MQTT-3.8.3-3).
#[test]
fn no_local_mqtt_3_8_3_3() {
    let broker = Broker::start(&[]);
    let [a, other] = <[String; 2]>::try_from(ids("nl", 2)).unwrap();
    let r = paho(broker.port(), "no_local", &[&a, &other]);
    assert_eq!(s(&r, "got"), "nl/a:other-a,nl/b:self-b", "{r:?}");
}

/// Retain As Published 1 keeps the RETAIN flag of live deliveries, 0 clears
/// it; retained messages sent for a new subscription have RETAIN 1 either
/// way (MQTT-3.3.1-12, MQTT-3.3.1-13).
#[test]
fn retain_as_published_mqtt_3_3_1_12_mqtt_3_3_1_13() {
    let broker = Broker::start(&[]);
    let [a, publ] = <[String; 2]>::try_from(ids("rap", 2)).unwrap();
    let r = paho(broker.port(), "retain_as_published", &[&a, &publ]);
    assert_eq!(
        s(&r, "got"),
        "rap/0:n0:0,rap/0:old:1,rap/0:r0:0,rap/1:n1:0,rap/1:r1:1",
        "{r:?}"
    );
}

/// Retain Handling 0 sends retained messages on every SUBSCRIBE, 1 only
/// when the subscription is new (again after an UNSUBSCRIBE), 2 never
/// (MQTT-3.3.1-9, MQTT-3.3.1-10, MQTT-3.3.1-11).
#[test]
fn retain_handling_mqtt_3_3_1_9_mqtt_3_3_1_10_mqtt_3_3_1_11() {
    let broker = Broker::start(&[]);
    let [a, publ] = <[String; 2]>::try_from(ids("rh", 2)).unwrap();
    let r = paho(broker.port(), "retain_handling", &[&a, &publ]);
    assert_eq!(s(&r, "first"), "rh/0:1,rh/1:1", "{r:?}");
    assert_eq!(s(&r, "again"), "rh/0:1", "{r:?}");
    assert_eq!(s(&r, "after_unsubscribe"), "rh/1:1", "{r:?}");
}

/// Overlapping subscriptions with identifiers 7 (sid/#, QoS 0) and 42
/// (sid/+/x, QoS 1): one copy carrying both identifiers at QoS 1; a message
/// matching only one carries only its identifier; a matching subscription
/// without an identifier adds none (MQTT-3.3.4-3, MQTT-3.3.4-4,
/// MQTT-3.3.4-2).
#[test]
fn subscription_identifiers_of_overlapping_subscriptions_mqtt_3_3_4_4() {
    let broker = Broker::start(&[]);
    let [a, publ] = <[String; 2]>::try_from(ids("sid", 2)).unwrap();
    let r = paho(broker.port(), "subscription_ids", &[&a, &publ]);
    assert_eq!(s(&r, "got"), "x,y,z", "one copy each: {r:?}");
    assert_eq!(s(&r, "x_ids"), "7+42", "{r:?}");
    assert_eq!(s(&r, "x_qos"), "1", "{r:?}");
    assert_eq!(s(&r, "y_ids"), "7", "{r:?}");
    assert_eq!(s(&r, "y_qos"), "0", "{r:?}");
    assert_eq!(s(&r, "z_ids"), "7", "{r:?}");
    assert_eq!(s(&r, "z_qos"), "1", "{r:?}");
}

/// With an ACL file, a v5 SUBACK says 0x87 Not authorized for each refused
/// filter and the granted QoS for the others (MQTT-3.9.3-1, MQTT-3.9.3-2).
#[test]
fn suback_0x87_for_filters_the_acl_refuses_mqtt_3_9_3_2() {
    let dir = TempDir::new("v5-acl-sub");
    let broker = acl_broker(&dir);
    let port = broker.port();
    let r = paho(
        port,
        "sub_unsub",
        &["alice", "a-pw", "fleet/#,#,fleet/secret/#,public/x", ""],
    );
    assert_eq!(s(&r, "sub"), "1,135,135,135", "{r:?}");
    let r = paho(
        port,
        "sub_unsub",
        &["bob", "b-pw", "fleet/7/temp,fleet/+/temp,fleet/#", ""],
    );
    assert_eq!(s(&r, "sub"), "1,1,135", "{r:?}");
    let r = paho(port, "sub_unsub", &["-", "-", "public/#,fleet/#", ""]);
    assert_eq!(s(&r, "sub"), "1,135", "{r:?}");
}

/// A shared subscription with an invalid ShareName (empty, or not followed
/// by a topic filter) gets SUBACK 0x8F Topic Filter invalid
/// (MQTT-4.8.2-1, MQTT-4.8.2-2).
#[test]
fn suback_0x8f_for_invalid_share_name_mqtt_4_8_2_2() {
    let broker = Broker::start(&[]);
    let r = paho(
        broker.port(),
        "sub_unsub",
        &["-", "-", "ok/t,$share//sh/t,$share/g", ""],
    );
    assert_eq!(s(&r, "sub"), "1,143,143", "{r:?}");
    assert!(!b(&r, "disconnected"), "{r:?}");
}

/// UNSUBACK v5: 0x00 for a subscription that existed, 0x11 No subscription
/// existed for one that did not (MQTT-3.11.3-1, MQTT-3.11.3-2).
#[test]
fn unsuback_0x11_when_no_subscription_existed_mqtt_3_11_3_2() {
    let broker = Broker::start(&[]);
    let r = paho(
        broker.port(),
        "sub_unsub",
        &["-", "-", "a/b", "a/b,never/x,a/b"],
    );
    assert_eq!(s(&r, "sub"), "1", "{r:?}");
    assert_eq!(s(&r, "unsub"), "0,17,17", "{r:?}");
}

/// PUBACK v5 says 0x87 Not authorized when the ACL does not let the client
/// write the topic; when it does and nobody subscribes, 0x10
/// (MQTT-3.4.2-1).
#[test]
fn puback_0x87_when_acl_refuses_publish_mqtt_3_4_2_1() {
    let dir = TempDir::new("v5-acl-pub");
    let broker = acl_broker(&dir);
    let port = broker.port();
    let r = paho(port, "puback", &["bob", "b-pw", "fleet/1/temp"]);
    assert_eq!(s(&r, "codes"), "135", "{r:?}");
    let r = paho(
        port,
        "puback",
        &[
            "alice",
            "a-pw",
            "fleet/2/temp",
            "fleet/secret/k",
            "nobody/listens",
        ],
    );
    assert_eq!(s(&r, "codes"), "16,135,135", "{r:?}");
}

/// PUBACK v5 says 0x10 No matching subscribers for a topic nobody
/// subscribes to, on one shard and on four (each shard knows the others'
/// filters).
#[test]
fn puback_0x10_no_matching_subscribers_mqtt_3_4_2_1() {
    for shards in ["1", "4"] {
        let broker = Broker::start(&["--shards", shards]);
        let r = paho(broker.port(), "puback", &["-", "-", "nobody/here"]);
        assert_eq!(s(&r, "codes"), "16", "--shards {shards}: {r:?}");
    }
}

// ---------------------------------------------------------------- shared subscriptions

/// Three members of $share/g/sh/t on three shards, one of them a 3.1.1
/// client: each of 30 messages goes to exactly one member, every member
/// gets some; none gets the topic's retained message on subscribing, while
/// a plain subscriber gets it and all 30.
#[test]
fn shared_subscription_each_message_to_one_member_mqtt_4_8_2() {
    let broker = Broker::start(&[]);
    let members = ids("share", 3);
    let [plain, publ] = <[String; 2]>::try_from(ids("share-x", 2)).unwrap();
    let r = paho(
        broker.port(),
        "shared",
        &[&members[0], &members[1], &members[2], &plain, &publ, "30"],
    );
    assert_eq!(s(&r, "granted"), "1,1,1", "{r:?}");
    assert_eq!(n(&r, "retained_to_members"), Some(0), "{r:?}");
    assert_eq!(n(&r, "total"), Some(30), "each message once: {r:?}");
    assert_eq!(n(&r, "distinct"), Some(30), "{r:?}");
    assert_eq!(n(&r, "missing"), Some(0), "{r:?}");
    let counts: Vec<u64> = s(&r, "counts")
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(counts.iter().all(|&c| c > 0), "a member got nothing: {r:?}");
    assert_eq!(n(&r, "plain"), Some(31), "{r:?}");
    assert_eq!(n(&r, "plain_retained"), Some(1), "{r:?}");
}

/// No Local on a shared subscription is a Protocol Error: DISCONNECT 0x82
/// (MQTT-3.8.3-4).
#[test]
fn shared_subscription_with_no_local_is_protocol_error_mqtt_3_8_3_4() {
    let broker = Broker::start(&[]);
    let r = paho(broker.port(), "shared_no_local", &["snl"]);
    assert_eq!(n(&r, "disconnect"), Some(0x82), "{r:?}");
    assert!(b(&r, "from_server"), "{r:?}");
}

// ---------------------------------------------------------------- server DISCONNECT

/// A second connection with the same clientId takes over: the old one gets
/// DISCONNECT 0x8E Session taken over, the new one CONNACK 0 (MQTT-3.1.4-3).
#[test]
fn takeover_disconnects_old_connection_0x8e_mqtt_3_1_4_3() {
    let broker = Broker::start(&[]);
    let r = paho(broker.port(), "takeover", &["tk-dev"]);
    assert_eq!(n(&r, "old_disconnect"), Some(0x8E), "{r:?}");
    assert!(b(&r, "from_server"), "{r:?}");
    assert_eq!(n(&r, "new_rc"), Some(0), "{r:?}");
    assert!(!b(&r, "new_disconnected"), "{r:?}");
    assert_eq!(broker.fresh_stats()["takeovers"], 1);
}

/// SIGTERM: a v5 client gets DISCONNECT 0x8B Server shutting down; a 3.1.1
/// client's connection is just closed; the broker exits 0.
#[test]
fn sigterm_disconnects_v5_clients_0x8b() {
    let mut broker = Broker::start(&[]);
    let [c5, c3] = <[String; 2]>::try_from(ids("stop", 2)).unwrap();
    let mut p = LineProc::spawn(&mut python_script(
        "paho_v5.py",
        &[&broker.port().to_string(), "sigterm", &c5, &c3],
    ));
    p.wait_line(10 * SEC, |l| l.contains("\"ready\""));
    broker.signal(libc::SIGTERM);
    let line = p.wait_line(15 * SEC, |l| l.contains("v5_disconnect"));
    let r = json::parse_object(&line).expect("JSON");
    assert_eq!(n(&r, "v5_disconnect"), Some(0x8B), "{r:?}");
    assert!(b(&r, "v5_from_server"), "{r:?}");
    assert!(b(&r, "v311_closed"), "{r:?}");
    assert!(
        !b(&r, "v311_from_server"),
        "DISCONNECT sent to 3.1.1: {r:?}"
    );
    assert_eq!(broker.wait_exit(5 * SEC), Some(0));
}

/// An AUTH packet from a client that gave no Authentication Method gets
/// DISCONNECT 0x82 Protocol Error (the client broke MQTT-4.12.0-7).
#[test]
fn auth_packet_without_authentication_method_disconnect_0x82_mqtt_4_12_0_7() {
    let broker = Broker::start(&[]);
    let r = paho(broker.port(), "auth_packet", &["auth-pkt"]);
    assert_eq!(n(&r, "disconnect"), Some(0x82), "{r:?}");
    assert!(b(&r, "from_server"), "{r:?}");
}

// ---------------------------------------------------------------- request / response

/// Request / response across shards: the responder sees the request's
/// Response Topic and Correlation Data unaltered and answers on that topic
/// with the same Correlation Data, which the requester gets back
/// (MQTT-3.3.2-15, MQTT-3.3.2-16).
#[test]
fn request_response_across_shards_mqtt_3_3_2_15_mqtt_3_3_2_16() {
    let broker = Broker::start(&[]);
    let [req, resp] = <[String; 2]>::try_from(ids("rr", 2)).unwrap();
    let r = paho(broker.port(), "request_response", &[&req, &resp]);
    let reply = format!("svc/reply/{req}");
    assert_eq!(
        s(&r, "responder_saw"),
        format!("q-1:{reply}:00636f72722d31ff,q-2:{reply}:636f72722d32"),
        "{r:?}"
    );
    assert_eq!(
        s(&r, "replies"),
        format!("{reply}:answer:q-1:00636f72722d31ff,{reply}:answer:q-2:636f72722d32"),
        "{r:?}"
    );
}

// ---------------------------------------------------------------- 3.1.1 meets 5.0

/// A 3.1.1 publisher's message reaches a v5 subscriber with its
/// subscription identifier and no other property.
#[test]
fn v311_publisher_to_v5_subscriber_with_subscription_identifier_mqtt_3_3_4_3() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("x35", 2)).unwrap();
    let r = paho(broker.port(), "v311_to_v5", &[&sub, &publ]);
    assert_eq!(s(&r, "got"), "mx/a:from-v311", "{r:?}");
    assert_eq!(s(&r, "ids"), "5", "{r:?}");
    assert_eq!(s(&r, "props"), "SubscriptionIdentifier", "{r:?}");
    assert_eq!(n(&r, "qos"), Some(1), "{r:?}");
}

/// A v5 publisher's messages with properties, and with a topic alias,
/// reach a 3.1.1 subscriber as plain 3.1.1 PUBLISHes: full topic, payload
/// intact.
#[test]
fn v5_publisher_with_properties_to_v311_subscriber() {
    let broker = Broker::start(&[]);
    let [sub, publ] = <[String; 2]>::try_from(ids("x53", 2)).unwrap();
    let r = paho(broker.port(), "v5_to_v311", &[&sub, &publ]);
    assert_eq!(
        s(&r, "got"),
        "mx/b:from-v5:1,mx/c:alias-1:1,mx/c:alias-2:1",
        "{r:?}"
    );
    assert_eq!(s(&r, "props"), "", "{r:?}");
}

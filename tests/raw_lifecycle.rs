//! The connection lifecycle of README "Connection lifecycle", byte by byte
//! over raw sockets against the real binary (4 shards).

mod common;

use std::time::{Duration, Instant};

use common::{disconnect_packet, mqtt_str, raw_connect, Broker, ConnectOpts, RawClient};

const SEC: Duration = Duration::from_secs(1);

/// Sends `bytes` as the first thing on a new socket and expects the broker to
/// close without sending anything, and to count it as malformed.
fn assert_closed_as_malformed(bytes: &[u8]) {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port());
    c.send(bytes);
    let got = c.expect_closed(2 * SEC);
    assert!(got.is_empty(), "expected no CONNACK, got {got:02x?}");
    broker.wait_for_stat("malformed", |n| n == 1, 5 * SEC);
    assert_eq!(broker.stat("connack_0"), 0);
}

/// The payload of a 3.1.1 CONNECT with just a client id.
fn id(s: &str) -> Vec<u8> {
    mqtt_str(s.as_bytes())
}

#[test]
fn connect_reserved_flag_closes_mqtt_3_1_2_3() {
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x03, 0, &id("r1")));
}

#[test]
fn connect_bad_protocol_name_closes_mqtt_3_1_2_1() {
    assert_closed_as_malformed(&raw_connect(b"MQTX", 4, 0x02, 0, &id("n1")));
}

#[test]
fn connect_fixed_header_flags_set_close_mqtt_2_2_2_2() {
    let mut bytes = raw_connect(b"MQTT", 4, 0x02, 0, &id("h1"));
    bytes[0] = 0x12; // CONNECT with flag bits 0001
    assert_closed_as_malformed(&bytes);
}

#[test]
fn connect_will_topic_with_wildcard_closes_mqtt_3_3_2_2() {
    for topic in ["dev/+/status", "dev/#", ""] {
        let mut payload = id("w1");
        payload.extend(mqtt_str(topic.as_bytes()));
        payload.extend(mqtt_str(b"gone"));
        assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x04, 0, &payload));
    }
}

#[test]
fn connect_invalid_utf8_username_closes_mqtt_1_5_3_1() {
    let mut payload = id("u1");
    payload.extend(mqtt_str(b"al\xffce"));
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x80, 0, &payload));
}

#[test]
fn connect_will_qos_without_will_flag_closes_mqtt_3_1_2_11_13() {
    // Will QoS 1 (0x08) without the Will Flag (0x04).
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x08, 0, &id("w1")));
}

#[test]
fn connect_will_retain_without_will_flag_closes_mqtt_3_1_2_15() {
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x20, 0, &id("w2")));
}

#[test]
fn connect_will_qos_3_closes_mqtt_3_1_2_14() {
    let mut payload = id("w3");
    payload.extend(mqtt_str(b"will/topic"));
    payload.extend(mqtt_str(b"bye"));
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x04 | 0x18, 0, &payload));
}

#[test]
fn connect_password_without_username_closes_mqtt_3_1_2_22() {
    let mut payload = id("p1");
    payload.extend(mqtt_str(b"secret"));
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02 | 0x40, 0, &payload));
}

#[test]
fn connect_invalid_utf8_client_id_closes_mqtt_1_5_3_1() {
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02, 0, &mqtt_str(b"ab\xff\xfe")));
}

#[test]
fn connect_surrogate_in_client_id_closes_mqtt_1_5_3_1() {
    // U+D800 encoded in UTF-8 form is ill-formed UTF-8.
    assert_closed_as_malformed(&raw_connect(
        b"MQTT",
        4,
        0x02,
        0,
        &mqtt_str(b"a\xed\xa0\x80"),
    ));
}

#[test]
fn connect_nul_in_client_id_closes_mqtt_1_5_3_2() {
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02, 0, &mqtt_str(b"a\0b")));
}

#[test]
fn connect_trailing_bytes_close() {
    let mut payload = id("t1");
    payload.extend_from_slice(b"xyz");
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02, 0, &payload));
}

#[test]
fn connect_truncated_field_closes() {
    // The client id claims 10 bytes; the packet ends after 2.
    let mut payload = 10u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"ab");
    assert_closed_as_malformed(&raw_connect(b"MQTT", 4, 0x02, 0, &payload));
}

/// Unknown levels (and a known name with an unknown level) get exactly
/// CONNACK 1 in 3.1.1 form, `20 02 00 01`, and a close.
#[test]
fn unsupported_protocol_level_gets_connack_1_mqtt_3_1_2_2() {
    let broker = Broker::start(&[]);
    for (name, level) in [
        (&b"MQTT"[..], 9u8),
        (b"MQTT", 0),
        (b"MQTT", 255),
        (b"MQIsdp", 7),
        // A level that exists, but not under this name.
        (b"MQTT", 3),
        (b"MQIsdp", 4),
    ] {
        let mut c = RawClient::tcp(broker.port());
        c.send(&raw_connect(name, level, 0x02, 0, &id("v9")));
        let got = c.expect_closed(2 * SEC);
        assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "level {level}");
    }
    broker.wait_for_stat("connack_1", |n| n == 6, 5 * SEC);
}

#[test]
fn first_packet_not_connect_closes_mqtt_3_1_0_1() {
    let broker = Broker::start(&[]);
    let firsts: [&[u8]; 4] = [
        &[0xc0, 0x00],                    // PINGREQ
        &[0xe0, 0x00],                    // DISCONNECT
        b"\x30\x05\x00\x01ahi",           // PUBLISH
        b"\x82\x06\x00\x01\x00\x01a\x00", // SUBSCRIBE
    ];
    for first in firsts {
        let mut c = RawClient::tcp(broker.port());
        c.send(first);
        let got = c.expect_closed(2 * SEC);
        assert!(got.is_empty(), "{first:02x?} got {got:02x?}");
    }
    assert_eq!(broker.fresh_stats()["connack_0"], 0);
}

#[test]
fn second_connect_closes_and_publishes_will_mqtt_3_1_0_2() {
    let broker = Broker::start(&[]);
    let mut watcher = RawClient::subscriber(broker.port(), "watch-2nd", "w/second", 0);
    let opts = ConnectOpts::id("twice").will("w/second", b"gone", 0, false);
    let (mut c, _) = RawClient::connect(broker.port(), &opts);
    c.send(&ConnectOpts::id("twice").bytes());
    let got = c.expect_closed(2 * SEC);
    assert!(got.is_empty(), "a second CONNECT got {got:02x?}");
    watcher.expect_publish("w/second", b"gone", 2 * SEC);
    broker.wait_for_stat("malformed", |n| n >= 1, 5 * SEC);
}

#[test]
fn connack_bytes_exact_clean_and_resumed_mqtt_3_2_2_1_2() {
    let broker = Broker::start(&[]);
    // cleanSession=1: `20 02 00 00`.
    let mut c = RawClient::tcp(broker.port());
    c.send(&ConnectOpts::id("bytes-clean").bytes());
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
    c.send(&disconnect_packet());
    c.expect_closed(2 * SEC);

    // cleanSession=0, no stored session: `20 02 00 00` (MQTT-3.2.2-3) ...
    let persistent = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("bytes-persist")
    };
    let mut c = RawClient::tcp(broker.port());
    c.send(&persistent.bytes());
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
    c.send(&disconnect_packet());
    c.expect_closed(2 * SEC);

    // ... then resumed: `20 02 01 00` (MQTT-3.2.2-2).
    let mut c = RawClient::tcp(broker.port());
    c.send(&persistent.bytes());
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x01, 0x00]);
    c.send(&disconnect_packet());
    c.expect_closed(2 * SEC);

    // cleanSession=1 on that id discards the session: sessionPresent=0 ...
    let mut c = RawClient::tcp(broker.port());
    c.send(&ConnectOpts::id("bytes-persist").bytes());
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
    c.send(&disconnect_packet());
    c.expect_closed(2 * SEC);
    // ... and it is gone afterwards (MQTT-3.1.2-6).
    let mut c = RawClient::tcp(broker.port());
    c.send(&persistent.bytes());
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
}

#[test]
fn empty_client_id_clean_is_accepted_mqtt_3_1_3_6() {
    let broker = Broker::start(&[]);
    // Several, so they are given distinct ids and do not take each other over.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = RawClient::tcp(broker.port());
        c.send(&raw_connect(b"MQTT", 4, 0x02, 0, &mqtt_str(b"")));
        assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
        clients.push(c);
    }
    // They are all still connected and working.
    clients[0].subscribe("anon/t", 0);
    clients[5].publish("anon/t", b"x", 1, false);
    clients[0].expect_publish("anon/t", b"x", 2 * SEC);
    for c in &mut clients {
        c.send(&[0xc0, 0x00]);
        assert_eq!(c.read_bytes(2, 2 * SEC), [0xd0, 0x00]);
    }
    assert_eq!(broker.fresh_stats()["takeovers"], 0);
}

#[test]
fn empty_client_id_persistent_is_rejected_mqtt_3_1_3_8() {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port());
    c.send(&raw_connect(b"MQTT", 4, 0x00, 0, &mqtt_str(b"")));
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x02, 0x00, 0x02]);
    broker.wait_for_stat("connack_2", |n| n == 1, 5 * SEC);
}

#[test]
fn mqtt31_client_id_over_23_chars_is_rejected() {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port());
    c.send(&raw_connect(b"MQIsdp", 3, 0x02, 0, &id(&"x".repeat(24))));
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x02, 0x00, 0x02]);
    // 23 is fine.
    let mut c = RawClient::tcp(broker.port());
    c.send(&raw_connect(b"MQIsdp", 3, 0x02, 0, &id(&"y".repeat(23))));
    assert_eq!(c.read_bytes(4, 2 * SEC), [0x20, 0x02, 0x00, 0x00]);
}

#[test]
fn connect_timeout_closes_silent_and_partial_sockets() {
    let broker = Broker::start(&["--connect-timeout", "1"]);
    let full = ConnectOpts::id("slowpoke").bytes();
    let start = Instant::now();
    let mut silent = RawClient::tcp(broker.port());
    let mut partial = RawClient::tcp(broker.port());
    partial.send(&full[..full.len() / 2]);
    let mut header_only = RawClient::tcp(broker.port());
    header_only.send(&full[..1]);
    for (name, c) in [
        ("silent", &mut silent),
        ("half a CONNECT", &mut partial),
        ("one byte", &mut header_only),
    ] {
        let got = c.expect_closed(4 * SEC);
        let t = start.elapsed();
        assert!(got.is_empty(), "{name}: got {got:02x?}");
        assert!(
            t >= SEC && t < 3 * SEC,
            "{name}: closed after {t:?}, expected 1..3 s"
        );
    }
    broker.wait_for_stat("connect_timeouts", |n| n == 3, 5 * SEC);
    // A client that does connect in time is not affected by the timer.
    let (mut ok, _) = RawClient::connect(broker.port(), &ConnectOpts::id("prompt"));
    ok.expect_silence(Duration::from_millis(1500));
}

/// Takeover with several ids so that, with 4 shards, old and new connections
/// are accepted on different shards for at least some of them.
#[test]
fn takeover_closes_old_connection_and_publishes_its_will_mqtt_3_1_4_2() {
    let broker = Broker::start(&[]);
    let mut watcher = RawClient::subscriber(broker.port(), "tk-watch", "tk/+/will", 0);
    const N: usize = 12;
    for i in 0..N {
        let cid = format!("tk-{i}");
        let topic = format!("tk/{i}/will");
        let old_opts = ConnectOpts::id(&cid).will(&topic, b"taken", 0, false);
        let (mut old, _) = RawClient::connect(broker.port(), &old_opts);
        let mut new = RawClient::tcp(broker.port());
        new.send(&ConnectOpts::id(&cid).bytes());
        let ack = new.expect_connack(2 * SEC);
        assert_eq!((ack.code, ack.session_present), (0, false), "{cid}");
        let got = old.expect_closed(2 * SEC);
        assert!(got.is_empty(), "{cid}: old connection got {got:02x?}");
        watcher.expect_publish(&topic, b"taken", 2 * SEC);
        // The new connection works.
        new.send(&[0xc0, 0x00]);
        assert_eq!(new.read_bytes(2, 2 * SEC), [0xd0, 0x00], "{cid}");
    }
    broker.wait_for_stat("takeovers", |n| n == N as u64, 5 * SEC);
    broker.wait_for_stat("wills", |n| n == N as u64, 5 * SEC);
}

#[test]
fn takeover_resumes_persistent_session_with_session_present() {
    let broker = Broker::start(&[]);
    let opts = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("tk-persist")
    };
    let (mut old, sp) = RawClient::connect(broker.port(), &opts);
    assert!(!sp);
    old.subscribe("tkp/t", 1);
    let (mut new, sp) = RawClient::connect(broker.port(), &opts);
    assert!(sp, "takeover of a persistent session has sessionPresent=1");
    old.expect_closed(2 * SEC);
    // The subscription came along.
    let (mut publ, _) = RawClient::connect(broker.port(), &ConnectOpts::id("tkp-pub"));
    publ.publish("tkp/t", b"still here", 1, false);
    new.expect_publish("tkp/t", b"still here", 2 * SEC);
}

/// keepAlive 2: the broker closes at 1.5 × 2 = 3 s after the last packet, and
/// within 0.1 s of that per the README (we allow up to 1 s).
#[test]
fn keepalive_expiry_publishes_will_after_one_and_a_half_keepalive_mqtt_3_1_2_24() {
    let broker = Broker::start(&[]);
    let mut watcher = RawClient::subscriber(broker.port(), "ka-watch", "ka/will", 0);
    let opts = ConnectOpts {
        keep_alive: 2,
        ..ConnectOpts::id("ka-client").will("ka/will", b"expired", 0, false)
    };
    let mut c = RawClient::tcp(broker.port());
    let start = Instant::now();
    c.send(&opts.bytes());
    assert_eq!(c.expect_connack(2 * SEC).code, 0);
    watcher.expect_publish("ka/will", b"expired", 5 * SEC);
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(3000) && t < Duration::from_millis(4000),
        "will after {t:?}, expected 3.0..4.0 s"
    );
    assert!(
        c.closed_within(SEC).is_some(),
        "expired connection is closed"
    );
    broker.wait_for_stat("keepalive_expiries", |n| n == 1, 5 * SEC);
}

#[test]
fn pingreq_keeps_connection_alive_and_gets_pingresp() {
    let broker = Broker::start(&[]);
    let opts = ConnectOpts {
        keep_alive: 2,
        ..ConnectOpts::id("pinger")
    };
    let (mut c, _) = RawClient::connect(broker.port(), &opts);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        c.send(&[0xc0, 0x00]);
        assert_eq!(c.read_bytes(2, SEC), [0xd0, 0x00]);
        std::thread::sleep(SEC);
    }
    c.send(&[0xc0, 0x00]);
    assert_eq!(c.read_bytes(2, SEC), [0xd0, 0x00]);
    assert_eq!(broker.fresh_stats()["keepalive_expiries"], 0);
}

#[test]
fn keepalive_zero_is_never_expired() {
    let broker = Broker::start(&[]);
    let (mut c, _) = RawClient::connect(broker.port(), &ConnectOpts::id("forever"));
    c.expect_silence(Duration::from_secs(5));
    c.send(&[0xc0, 0x00]);
    assert_eq!(c.read_bytes(2, SEC), [0xd0, 0x00]);
}

#[test]
fn disconnect_discards_will_mqtt_3_14_4_3() {
    let broker = Broker::start(&[]);
    let mut watcher = RawClient::subscriber(broker.port(), "dc-watch", "dc/will", 0);
    let opts = ConnectOpts::id("dc-client").will("dc/will", b"should not", 1, true);
    let (mut c, _) = RawClient::connect(broker.port(), &opts);
    c.send(&disconnect_packet());
    let got = c.expect_closed(2 * SEC);
    assert!(got.is_empty(), "DISCONNECT got a reply: {got:02x?}");
    watcher.expect_silence(Duration::from_millis(1500));
    // Nor was the retained will stored.
    let mut late = RawClient::subscriber(broker.port(), "dc-late", "dc/will", 0);
    late.expect_silence(Duration::from_millis(500));
    assert_eq!(broker.fresh_stats()["wills"], 0);
}

#[test]
fn network_close_publishes_will() {
    let broker = Broker::start(&[]);
    let mut watcher = RawClient::subscriber(broker.port(), "nc-watch", "nc/will", 1);
    let opts = ConnectOpts::id("nc-client").will("nc/will", b"lost", 1, false);
    let (c, _) = RawClient::connect(broker.port(), &opts);
    drop(c);
    let p = watcher.expect_publish("nc/will", b"lost", 2 * SEC);
    assert_eq!(p.qos as u8, 1, "delivered at min(will QoS, sub QoS)");
}

#[test]
fn refused_connack_has_session_present_0_and_closes_mqtt_3_2_2_4() {
    let broker = Broker::start(&["--allow-anonymous", "false"]);
    // A stored session would not matter: every refusal is `20 02 00 rc`.
    let mut c = RawClient::tcp(broker.port());
    c.send(
        &ConnectOpts {
            clean: false,
            ..ConnectOpts::id("anon")
        }
        .bytes(),
    );
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x02, 0x00, 0x05]);
    broker.wait_for_stat("connack_5", |n| n == 1, 5 * SEC);
}

/// SIGTERM and SIGINT shut the broker down cleanly: the wills of connected
/// clients go out to subscribers still connected (as mosquitto does), every
/// client then sees its connection closed, and the process exits 0.
#[test]
fn sigterm_and_sigint_publish_wills_close_clients_and_exit_0() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut broker = Broker::start(&[]);
        let mut watcher = RawClient::subscriber(broker.port(), "stop-watch", "stop/#", 0);
        let mut devices: Vec<RawClient> = (0..8)
            .map(|i| {
                let opts = ConnectOpts::id(&format!("stop-{i}")).will(
                    &format!("stop/{i}"),
                    b"offline",
                    0,
                    false,
                );
                RawClient::connect(broker.port(), &opts).0
            })
            .collect();
        let start = Instant::now();
        broker.signal(sig);
        let mut got: Vec<String> = (0..8)
            .map(|_| {
                let p = watcher
                    .next_publish(3 * SEC)
                    .unwrap_or_else(|| panic!("signal {sig}: a will is missing"));
                assert_eq!(&p.payload[..], b"offline");
                p.topic.to_string()
            })
            .collect();
        got.sort();
        let mut want: Vec<String> = (0..8).map(|i| format!("stop/{i}")).collect();
        want.sort();
        assert_eq!(got, want, "signal {sig}: every will, once");
        assert!(watcher.expect_closed(3 * SEC).is_empty());
        for d in &mut devices {
            assert!(d.expect_closed(3 * SEC).is_empty());
        }
        assert_eq!(broker.wait_exit(5 * SEC), Some(0), "signal {sig}");
        assert!(start.elapsed() < 3 * SEC, "took {:?}", start.elapsed());
        // Its last stderr line may still be on its way to the thread that
        // reads it when the exit is seen.
        assert!(common::wait_until(2 * SEC, || broker
            .log_contains("shutting down; final stats")));
    }
}

//! MQTT 5.0 rules on the harness: sessions that expire, delayed wills,
//! flow control, topic aliases, message expiry, subscription options and
//! identifiers, shared subscriptions across shards, and the reason codes of
//! every close the broker decides. Time-dependent rules are checked to the
//! 100 ms tick.

use super::*;
use crate::proto::codec::{reason, Properties};

fn v5(client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        ..connect(client_id, clean, keep_alive)
    }
}

fn props(f: impl FnOnce(&mut Properties)) -> Option<Box<Properties>> {
    let mut p = Properties::default();
    f(&mut p);
    Some(Box::new(p))
}

/// A 5.0 CONNECT with Session Expiry Interval `expiry`.
fn v5_expiring(client_id: &str, clean: bool, expiry: u32) -> Connect {
    Connect {
        properties: props(|p| p.session_expiry_interval = Some(expiry)),
        ..v5(client_id, clean, 0)
    }
}

fn sub_opts(filter: &str, qos: QoS, f: impl FnOnce(&mut SubscriptionOptions)) -> Packet {
    let mut o = SubscriptionOptions::qos(qos);
    f(&mut o);
    Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        filters: vec![(TopicFilter::new(filter.to_string()).unwrap(), o)],
        properties: None,
    })
}

fn with_sub_id(mut p: Packet, id: u32) -> Packet {
    if let Packet::Subscribe(s) = &mut p {
        s.properties = props(|p| p.subscription_identifiers = vec![id]);
    }
    p
}

fn publish_props(
    topic: &str,
    payload: &str,
    qos: QoS,
    id: Option<u16>,
    f: impl FnOnce(&mut Properties),
) -> Packet {
    let mut p = publish(topic, payload, qos, false, id);
    if let Packet::Publish(p) = &mut p {
        p.properties = props(f);
    }
    p
}

fn publishes_of(packets: Vec<Packet>) -> Vec<Publish> {
    packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn disconnect_code(packets: &[Packet]) -> Option<u8> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    })
}

#[test]
fn connack_properties_and_assigned_client_identifier_mqtt_3_2_2_16() {
    let mut h = Harness::new(1);
    let shard = 0;
    let mut c = v5("", true, 30);
    c.client_id = ByteString::from("auto-1");
    let conn = h.brokers[shard].connect_assigned(c, true, h.now);
    h.versions.insert((shard, conn), ProtocolVersion::V5);
    h.pump();
    let packets = h.recv(Client { shard, conn });
    let Some(Packet::ConnAck(ack)) = packets.first() else {
        panic!("{packets:?}")
    };
    assert_eq!(ack.code, reason::SUCCESS);
    let p = ack.properties.as_deref().expect("5.0 CONNACK properties");
    assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-1"));
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_packet_size, Some(1 << 20));
    assert_eq!(p.topic_alias_maximum, Some(u16::MAX));
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifier_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    // Nothing capped: no Server Keep Alive, no Session Expiry Interval.
    assert_eq!(p.server_keep_alive, None);
    assert_eq!(p.session_expiry_interval, None);
}

#[test]
fn server_keep_alive_replaces_the_clients_mqtt_3_2_2_21() {
    let mut h = Harness::with_config(1, |c| c.max_keepalive = 2);
    for asked in [0u16, 60] {
        let id = format!("ska-{asked}");
        let (c, ack) = h.connect(v5(&id, true, asked));
        let p = ack.properties.expect("properties");
        assert_eq!(p.server_keep_alive, Some(2), "asked {asked}");
        // Held to 2 s: silent, it is closed after 3 s (1.5 × 2), not before.
        h.advance(2_900);
        assert!(!h.is_closed(c), "asked {asked}: closed before 1.5 × 2 s");
        h.advance(200);
        assert!(h.is_closed(c), "asked {asked}: not closed after 1.5 × 2 s");
        // 0x8D: keep alive timeout (§4.13).
        assert_eq!(
            disconnect_code(&h.recv(c)),
            Some(reason::KEEP_ALIVE_TIMEOUT)
        );
    }
    // A client asking for less keeps its own value and gets no property.
    let (_, ack) = h.connect(v5("ska-1", true, 1));
    assert_eq!(ack.properties.unwrap().server_keep_alive, None);
}

#[test]
fn session_expiry_is_capped_and_the_client_told_mqtt_3_2_2_3_2() {
    let mut h = Harness::with_config(1, |c| c.max_session_expiry = 10);
    let (_, ack) = h.connect(v5_expiring("cap", true, 3600));
    assert_eq!(ack.properties.unwrap().session_expiry_interval, Some(10));
}

#[test]
fn session_outlives_its_connection_by_the_expiry_interval_mqtt_3_1_2_23() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5_expiring("exp", true, 2));
    h.send(c, subscribe("t", QoS::AtLeastOnce));
    h.drop_socket(c);
    // A QoS 1 message while it is away is kept for it.
    let (p, _) = h.connect(v5("pub", true, 0));
    h.send(p, publish("t", "kept", QoS::AtLeastOnce, false, Some(1)));
    h.advance(1_900);
    assert_eq!(h.brokers[0].session_count(), 2);
    let (c, ack) = h.connect(v5_expiring("exp", false, 2));
    assert!(ack.session_present, "resumed within the interval");
    let got = publishes_of(h.recv(c));
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"kept");
    // Gone again: this time it is discarded at 2 s, to the tick.
    h.drop_socket(c);
    h.advance(1_900);
    assert_eq!(h.brokers[0].session_count(), 2, "still there at 1.9 s");
    h.advance(200);
    assert_eq!(h.brokers[0].session_count(), 1, "discarded by 2.1 s");
    let (_, ack) = h.connect(v5_expiring("exp", false, 2));
    assert!(!ack.session_present);
    assert_eq!(get(&h.counters.sessions_expired), 1);
}

#[test]
fn session_expiry_zero_ends_with_the_connection_and_clean_start_discards() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5("zero", false, 0));
    h.send(c, subscribe("t", QoS::AtLeastOnce));
    h.send(c, disconnect());
    let (c, ack) = h.connect(v5_expiring("zero", false, 60));
    assert!(!ack.session_present, "expiry 0 ended the session");
    h.send(c, subscribe("t", QoS::AtLeastOnce));
    h.drop_socket(c);
    // MQTT-3.1.2-4: Clean Start discards the stored session.
    let (_, ack) = h.connect(v5_expiring("zero", true, 60));
    assert!(!ack.session_present);
}

#[test]
fn disconnect_may_not_raise_session_expiry_from_zero_mqtt_3_14_2_2() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5("dz", true, 0));
    h.send(
        c,
        Packet::Disconnect(Disconnect {
            reason: 0,
            properties: props(|p| p.session_expiry_interval = Some(30)),
        }),
    );
    assert!(h.is_closed(c));
    assert_eq!(disconnect_code(&h.recv(c)), Some(reason::PROTOCOL_ERROR));
    // From non-zero to another value is fine: the session then lives 1 s.
    let (c, _) = h.connect(v5_expiring("dn", true, 300));
    h.send(
        c,
        Packet::Disconnect(Disconnect {
            reason: 0,
            properties: props(|p| p.session_expiry_interval = Some(1)),
        }),
    );
    assert_eq!(h.brokers[0].session_count(), 1);
    h.advance(1_100);
    assert_eq!(h.brokers[0].session_count(), 0);
}

fn v5_with_will(id: &str, expiry: u32, delay: u32) -> Connect {
    let mut c = with_will(v5_expiring(id, true, expiry), "will/t", b"gone", false);
    if let Some(w) = &mut c.will {
        w.properties = props(|p| {
            p.will_delay_interval = Some(delay);
            p.content_type = Some(ByteString::from("text/plain"));
            p.user_properties = vec![
                (ByteString::from("a"), ByteString::from("1")),
                (ByteString::from("b"), ByteString::from("2")),
            ];
        });
    }
    c
}

#[test]
fn will_waits_for_its_delay_with_its_properties_mqtt_3_1_3_9() {
    let mut h = Harness::new(2);
    let watcher = subscribed(
        &mut h,
        v5("watcher", true, 0),
        subscribe("will/t", QoS::AtMostOnce),
    );
    let (c, _) = h.connect(v5_with_will("dev", 60, 3));
    h.drop_socket(c);
    h.advance(2_900);
    assert!(publishes_of(h.recv(watcher)).is_empty(), "early will");
    h.advance(200);
    let got = publishes_of(h.recv(watcher));
    assert_eq!(got.len(), 1, "will after its 3 s delay");
    let p = got[0].properties.as_deref().expect("will properties");
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    let users: Vec<(&str, &str)> = p
        .user_properties
        .iter()
        .map(|(k, v)| (&**k, &**v))
        .collect();
    assert_eq!(users, [("a", "1"), ("b", "2")], "in order (MQTT-3.3.2-18)");
    assert_eq!(p.will_delay_interval, None, "the delay is not forwarded");
}

#[test]
fn reconnect_before_the_delay_cancels_the_will_mqtt_3_1_3_9() {
    let mut h = Harness::new(1);
    let watcher = subscriber(&mut h, "watcher", "will/t");
    let (c, _) = h.connect(v5_with_will("dev", 60, 3));
    h.drop_socket(c);
    h.advance(2_000);
    let (_, ack) = h.connect(v5_expiring("dev", false, 60));
    assert!(ack.session_present);
    h.advance(5_000);
    assert!(h.publishes(watcher).is_empty(), "cancelled will was sent");
}

#[test]
fn will_goes_when_the_session_ends_if_that_is_sooner() {
    let mut h = Harness::new(1);
    let watcher = subscriber(&mut h, "watcher", "will/t");
    let (c, _) = h.connect(v5_with_will("dev", 1, 30));
    h.drop_socket(c);
    h.advance(900);
    assert!(h.publishes(watcher).is_empty());
    h.advance(200);
    assert_eq!(h.publishes(watcher).len(), 1, "at session end, 1 s");
    // Expiry 0: at once, whatever the delay.
    let (c, _) = h.connect(v5_with_will("dev0", 0, 30));
    h.drop_socket(c);
    assert_eq!(h.publishes(watcher).len(), 1);
}

#[test]
fn a_will_delay_past_the_wheels_ring_still_lands_on_time() {
    // 500 s is more than the wheel's 409.6 s ring: the entry is looked at
    // once a lap before it is due, and must survive that look.
    let mut h = Harness::new(1);
    let watcher = subscriber(&mut h, "watcher", "will/t");
    let (c, _) = h.connect(v5_with_will("dev", u32::MAX, 500));
    h.drop_socket(c);
    h.advance(499_900);
    assert!(h.publishes(watcher).is_empty());
    h.advance(200);
    assert_eq!(h.publishes(watcher).len(), 1);
    assert_eq!(h.brokers[0].session_count(), 2, "the session never expires");
}

#[test]
fn disconnect_0x04_publishes_the_will_at_once_0x00_discards_it() {
    let mut h = Harness::new(1);
    let watcher = subscriber(&mut h, "watcher", "will/t");
    let (c, _) = h.connect(v5_with_will("dev", 60, 30));
    h.send(
        c,
        Packet::Disconnect(Disconnect {
            reason: reason::DISCONNECT_WITH_WILL,
            properties: None,
        }),
    );
    assert_eq!(h.publishes(watcher).len(), 1);
    let (c, _) = h.connect(v5_with_will("dev", 60, 0));
    h.send(c, disconnect());
    h.advance(1_000);
    assert!(h.publishes(watcher).is_empty(), "MQTT-3.14.4-3");
}

#[test]
fn takeover_tells_the_old_client_0x8e_mqtt_3_1_4_3() {
    let mut h = Harness::new(1);
    let (old, _) = h.connect(v5("dup", true, 0));
    let (_, ack) = h.connect(v5("dup", true, 0));
    assert_eq!(ack.code, 0);
    assert!(h.is_closed(old));
    assert_eq!(
        disconnect_code(&h.recv(old)),
        Some(reason::SESSION_TAKEN_OVER)
    );
}

#[test]
fn shutdown_tells_clients_0x8b_and_3_1_1_clients_get_no_disconnect() {
    let mut h = Harness::new(1);
    let (a, _) = h.connect(v5("a5", true, 0));
    let (b, _) = h.connect(connect("b3", true, 0));
    h.brokers[0].close_all(h.now);
    h.pump();
    assert_eq!(
        disconnect_code(&h.recv(a)),
        Some(reason::SERVER_SHUTTING_DOWN)
    );
    assert_eq!(disconnect_code(&h.recv(b)), None);
}

#[test]
fn client_receive_maximum_bounds_what_is_in_flight_mqtt_3_3_4_7() {
    let mut h = Harness::new(1);
    let c = subscribed(
        &mut h,
        Connect {
            properties: props(|p| p.receive_maximum = Some(2)),
            ..v5("slow", true, 0)
        },
        subscribe("t", QoS::AtLeastOnce),
    );
    let (p, _) = h.connect(v5("pub", true, 0));
    for i in 0..5u16 {
        h.send(
            p,
            publish("t", i.to_string(), QoS::AtLeastOnce, false, Some(i + 1)),
        );
    }
    let first = h.recv(c);
    assert_eq!(payloads(&first), ["0", "1"], "only 2 in flight");
    ack(&mut h, c, &first);
    assert_eq!(payloads(&h.recv(c)), ["2", "3"]);
}

#[test]
fn too_many_qos2_awaiting_pubrel_is_0x93_mqtt_3_3_4_9() {
    let mut h = Harness::with_config(1, |c| c.receive_maximum = 2);
    let (c, _) = h.connect(v5("flood", true, 0));
    for i in 1..=2u16 {
        h.send(c, publish("t", "x", QoS::ExactlyOnce, false, Some(i)));
    }
    assert!(!h.is_closed(c));
    h.send(c, publish("t", "x", QoS::ExactlyOnce, false, Some(3)));
    assert!(h.is_closed(c));
    assert_eq!(
        disconnect_code(&h.recv(c)),
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );
}

#[test]
fn nothing_larger_than_the_clients_maximum_packet_size_mqtt_3_1_2_25() {
    let mut h = Harness::new(1);
    let small = subscribed(
        &mut h,
        Connect {
            properties: props(|p| p.maximum_packet_size = Some(64)),
            ..v5("small", true, 0)
        },
        subscribe("t", QoS::AtLeastOnce),
    );
    let big = subscribed(&mut h, v5("big", true, 0), subscribe("t", QoS::AtLeastOnce));
    let (p, _) = h.connect(v5("pub", true, 0));
    h.send(p, publish("t", "a", QoS::AtLeastOnce, false, Some(1)));
    h.send(
        p,
        publish("t", "b".repeat(100), QoS::AtLeastOnce, false, Some(2)),
    );
    h.send(p, publish("t", "c", QoS::AtLeastOnce, false, Some(3)));
    let got = h.recv(small);
    assert_eq!(payloads(&got), ["a", "c"], "the big one is skipped");
    for packet in &got {
        assert!(encode_as(packet, ProtocolVersion::V5).len() <= 64);
    }
    assert_eq!(h.recv(big).len(), 3, "others still get it");
    assert_eq!(get(&h.counters.oversize_dropped), 1);
}

#[test]
fn oversized_incoming_packet_gets_disconnect_0x95() {
    let mut h = Harness::with_config(1, |c| c.max_packet_size = 100);
    let (c, _) = h.connect(v5("big", true, 0));
    h.send(
        c,
        publish("t", "x".repeat(200), QoS::AtMostOnce, false, None),
    );
    assert!(h.is_closed(c));
    assert_eq!(disconnect_code(&h.recv(c)), Some(reason::PACKET_TOO_LARGE));
}

#[test]
fn client_topic_aliases_set_used_and_refused_mqtt_3_3_2_9_to_12() {
    let mut h = Harness::with_config(1, |c| c.max_topic_alias = 5);
    let s = subscriber(&mut h, "s", "dev/#");
    let (p, _) = h.connect(v5("aliaser", true, 0));
    h.send(
        p,
        publish_props("dev/1/temp", "20", QoS::AtMostOnce, None, |p| {
            p.topic_alias = Some(3)
        }),
    );
    let mut by_alias = publish_props("x", "21", QoS::AtMostOnce, None, |p| {
        p.topic_alias = Some(3)
    });
    if let Packet::Publish(p) = &mut by_alias {
        p.topic = TopicName::alias_only();
    }
    h.send(p, by_alias.clone());
    let got = h.publishes(s);
    let topics: Vec<&str> = got.iter().map(|(t, ..)| t.as_str()).collect();
    assert_eq!(topics, ["dev/1/temp", "dev/1/temp"]);
    // An alias never set: Protocol Error.
    let (q, _) = h.connect(v5("unset", true, 0));
    h.send(q, by_alias);
    assert_eq!(disconnect_code(&h.recv(q)), Some(reason::PROTOCOL_ERROR));
    // 0 is never an alias (MQTT-3.3.2-8): 0x94, decided by the codec.
    let (z, _) = h.connect(v5("zero", true, 0));
    h.send_bytes(z, b"\x30\x08\x00\x01t\x03\x23\x00\x00x");
    assert_eq!(
        disconnect_code(&h.recv(z)),
        Some(reason::TOPIC_ALIAS_INVALID)
    );
    // Above the maximum we offered: 0x94.
    let (r, _) = h.connect(v5("over", true, 0));
    h.send(
        r,
        publish_props("a", "1", QoS::AtMostOnce, None, |p| p.topic_alias = Some(6)),
    );
    assert_eq!(
        disconnect_code(&h.recv(r)),
        Some(reason::TOPIC_ALIAS_INVALID)
    );
}

#[test]
fn server_topic_aliases_replace_repeated_topics() {
    let mut h = Harness::new(1);
    let s = subscribed(
        &mut h,
        Connect {
            properties: props(|p| p.topic_alias_maximum = Some(1)),
            ..v5("s", true, 0)
        },
        subscribe("dev/#", QoS::AtMostOnce),
    );
    let (p, _) = h.connect(v5("pub", true, 0));
    for t in ["dev/a", "dev/a", "dev/b", "dev/a"] {
        h.send(p, publish(t, "x", QoS::AtMostOnce, false, None));
    }
    let got = publishes_of(h.recv(s));
    let seen: Vec<(&str, Option<u16>)> = got
        .iter()
        .map(|p| {
            (
                p.topic.as_str(),
                p.properties.as_ref().and_then(|p| p.topic_alias),
            )
        })
        .collect();
    // One alias allowed: dev/a gets it, dev/b goes by name.
    assert_eq!(
        seen,
        [
            ("dev/a", Some(1)),
            ("", Some(1)),
            ("dev/b", None),
            ("", Some(1))
        ]
    );
}

/// What server-to-client topic aliases save on the wire: 1,000 QoS 0
/// deliveries of 64-byte payloads over 10 fleet-shaped topics, to a
/// subscriber that allows 10 aliases and to one that allows none.
#[test]
fn server_topic_aliases_save_bytes_on_the_wire() {
    let mut h = Harness::new(1);
    let aliased = subscribed(
        &mut h,
        Connect {
            properties: props(|p| p.topic_alias_maximum = Some(10)),
            ..v5("aliased", true, 0)
        },
        subscribe("fleet/#", QoS::AtMostOnce),
    );
    let plain = subscribed(
        &mut h,
        v5("plain", true, 0),
        subscribe("fleet/#", QoS::AtMostOnce),
    );
    let (p, _) = h.connect(v5("pub", true, 0));
    let payload = [b'x'; 64];
    for i in 0..1000 {
        let topic = format!("fleet/eu-west-1/dev-{:05}/telemetry", i % 10);
        h.send(p, publish(&topic, payload, QoS::AtMostOnce, false, None));
    }
    let bytes = |h: &mut Harness, c: Client| -> usize {
        let packets = h.recv(c);
        assert_eq!(packets.len(), 1000);
        packets
            .iter()
            .map(|p| encode_as(p, ProtocolVersion::V5).len())
            .sum()
    };
    let (with, without) = (bytes(&mut h, aliased), bytes(&mut h, plain));
    // 104 bytes a message by name (35 of them the topic). The first
    // delivery of each topic adds a 3-byte alias property (107); every
    // later one carries an empty topic and the alias (72): 32 bytes, 30.8 %
    // of each message, saved.
    assert_eq!(without, 1000 * 104);
    assert_eq!(with, 10 * 107 + 990 * 72);
    eprintln!(
        "topic aliases: {with} bytes instead of {without} ({:.1} % saved)",
        100.0 * (without - with) as f64 / without as f64
    );
}

#[test]
fn message_expiry_drops_stale_messages_and_forwards_what_is_left_mqtt_3_3_2_5_and_6() {
    let mut h = Harness::new(2);
    let (c, _) = h.connect(v5_expiring("away", true, 600));
    h.send(c, subscribe("t", QoS::AtLeastOnce));
    h.drop_socket(c);
    let (p, _) = h.connect(v5("pub", true, 0));
    h.send(
        p,
        publish_props("t", "short", QoS::AtLeastOnce, Some(1), |p| {
            p.message_expiry_interval = Some(2)
        }),
    );
    h.send(
        p,
        publish_props("t", "long", QoS::AtLeastOnce, Some(2), |p| {
            p.message_expiry_interval = Some(10)
        }),
    );
    h.advance(3_000);
    let (c, _) = h.connect(v5_expiring("away", false, 600));
    let got = publishes_of(h.recv(c));
    assert_eq!(got.len(), 1, "the 2 s message expired while queued");
    assert_eq!(&got[0].payload[..], b"long");
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert_eq!(left, Some(7), "10 s less the 3 s it waited");
    assert_eq!(get(&h.counters.messages_expired), 1);
}

#[test]
fn retained_message_expires_mqtt_3_3_2_5() {
    let mut h = Harness::new(1);
    let (p, _) = h.connect(v5("pub", true, 0));
    let mut m = publish_props("r", "v", QoS::AtMostOnce, None, |p| {
        p.message_expiry_interval = Some(1)
    });
    if let Packet::Publish(p) = &mut m {
        p.retain = true;
    }
    h.send(p, m);
    let s = subscriber(&mut h, "early", "r");
    assert_eq!(h.publishes(s).len(), 1);
    h.advance(1_100);
    let late = subscriber(&mut h, "late", "r");
    assert!(
        h.publishes(late).is_empty(),
        "expired retained message sent"
    );
}

#[test]
fn properties_forwarded_unchanged_mqtt_3_3_2_17_and_18() {
    let mut h = Harness::new(3);
    let s = subscribed(&mut h, v5("s", true, 0), subscribe("req", QoS::AtMostOnce));
    let old = subscriber(&mut h, "old3", "req");
    let (p, _) = h.connect(v5("pub", true, 0));
    h.send(
        p,
        publish_props("req", "q", QoS::AtMostOnce, None, |p| {
            p.payload_format_indicator = Some(1);
            p.content_type = Some(ByteString::from("application/json"));
            p.response_topic = Some(ByteString::from("resp/pub"));
            p.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
            p.user_properties = vec![
                (ByteString::from("z"), ByteString::from("1")),
                (ByteString::from("a"), ByteString::from("2")),
                (ByteString::from("z"), ByteString::from("3")),
            ];
        }),
    );
    let got = publishes_of(h.recv(s));
    let p = got[0].properties.as_deref().expect("forwarded properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.response_topic.as_deref(), Some("resp/pub"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
    let users: Vec<(&str, &str)> = p
        .user_properties
        .iter()
        .map(|(k, v)| (&**k, &**v))
        .collect();
    assert_eq!(users, [("z", "1"), ("a", "2"), ("z", "3")]);
    // A 3.1.1 subscriber gets the message, without what it cannot carry.
    assert_eq!(h.publishes(old).len(), 1);
}

#[test]
fn no_local_and_retain_as_published_mqtt_3_8_3_3_and_3_3_1_12() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5("self", true, 0));
    h.send(c, sub_opts("t", QoS::AtMostOnce, |o| o.no_local = true));
    h.send(
        c,
        sub_opts("r", QoS::AtMostOnce, |o| o.retain_as_published = true),
    );
    h.recv(c);
    h.send(c, publish("t", "mine", QoS::AtMostOnce, false, None));
    assert!(publishes_of(h.recv(c)).is_empty(), "No Local");
    let (other, _) = h.connect(v5("other", true, 0));
    h.send(other, publish("t", "theirs", QoS::AtMostOnce, false, None));
    assert_eq!(publishes_of(h.recv(c)).len(), 1);
    h.send(other, publish("r", "kept", QoS::AtMostOnce, true, None));
    let got = publishes_of(h.recv(c));
    assert!(got[0].retain, "Retain As Published keeps RETAIN=1");
    // Without it, a live delivery has RETAIN=0 (MQTT-3.3.1-12).
    let plain = subscriber(&mut h, "plain", "r");
    h.publishes(plain);
    h.send(other, publish("r", "again", QoS::AtMostOnce, true, None));
    assert!(!h.publishes(plain)[0].3);
}

#[test]
fn retain_handling_0_1_2_mqtt_3_3_1_9_to_11() {
    let mut h = Harness::new(1);
    let (p, _) = h.connect(v5("pub", true, 0));
    h.send(p, publish("r", "v", QoS::AtMostOnce, true, None));
    let (c, _) = h.connect(v5("rh", true, 0));
    let count = |h: &mut Harness, rh: u8| {
        h.send(
            c,
            sub_opts("r", QoS::AtMostOnce, |o| o.retain_handling = rh),
        );
        publishes_of(h.recv(c)).len()
    };
    assert_eq!(count(&mut h, 2), 0, "2: never");
    assert_eq!(count(&mut h, 1), 0, "1: the subscription existed");
    assert_eq!(count(&mut h, 0), 1, "0: always");
    h.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(2),
            filters: vec![TopicFilter::new("r".to_string()).unwrap()],
            properties: None,
        }),
    );
    h.recv(c);
    assert_eq!(count(&mut h, 1), 1, "1: a new subscription");
}

#[test]
fn every_matching_subscription_identifier_on_one_copy_mqtt_3_3_4_3() {
    let mut h = Harness::new(2);
    let (c, _) = h.connect(v5("ids", true, 0));
    h.send(c, with_sub_id(subscribe("a/+", QoS::AtMostOnce), 7));
    h.send(c, with_sub_id(subscribe("a/#", QoS::AtLeastOnce), 9));
    h.send(c, subscribe("+/b", QoS::AtMostOnce));
    h.recv(c);
    // From a 3.1.1 publisher on (maybe) another shard.
    let (p, _) = h.connect(connect("old-pub", true, 0));
    h.send(p, publish("a/b", "x", QoS::AtLeastOnce, false, Some(1)));
    let got = publishes_of(h.recv(c));
    assert_eq!(got.len(), 1, "one copy");
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "the highest QoS");
    let mut ids = got[0]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    ids.sort_unstable();
    assert_eq!(ids, [7, 9]);
}

#[test]
fn reason_codes_on_acknowledgements() {
    let mut h = Harness::with_acl(1, Some("topic readwrite open/#\n"));
    let (c, _) = h.connect(v5("rc", true, 0));
    // Nobody subscribes: 0x10.
    h.send(c, publish("open/x", "1", QoS::AtLeastOnce, false, Some(1)));
    // The ACL refuses: 0x87, and nothing is delivered.
    h.send(
        c,
        publish("closed/x", "1", QoS::AtLeastOnce, false, Some(2)),
    );
    h.send(
        c,
        publish("closed/x", "1", QoS::ExactlyOnce, false, Some(3)),
    );
    // PUBREL for an id we never saw: PUBCOMP 0x92.
    h.send(c, Packet::PubRel(pub_resp(9)));
    h.send(c, sub_opts("closed/#", QoS::AtMostOnce, |_| {}));
    h.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(4),
            filters: vec![TopicFilter::new("never".to_string()).unwrap()],
            properties: None,
        }),
    );
    let codes: Vec<(String, u8)> = h
        .recv(c)
        .into_iter()
        .map(|p| match p {
            Packet::PubAck(a) => ("puback".into(), a.reason),
            Packet::PubRec(a) => ("pubrec".into(), a.reason),
            Packet::PubComp(a) => ("pubcomp".into(), a.reason),
            Packet::SubAck(a) => ("suback".into(), a.codes[0]),
            Packet::UnsubAck(a) => ("unsuback".into(), a.codes[0]),
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<(String, u8)> = [
        ("puback", reason::NO_MATCHING_SUBSCRIBERS),
        ("puback", reason::NOT_AUTHORIZED),
        ("pubrec", reason::NOT_AUTHORIZED),
        ("pubcomp", reason::PACKET_IDENTIFIER_NOT_FOUND),
        ("suback", reason::NOT_AUTHORIZED),
        ("unsuback", reason::NO_SUBSCRIPTION_EXISTED),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(codes, want);
}

fn pub_resp(id: u16) -> PubResp {
    PubResp {
        packet_id: pid(id),
        reason: 0,
        properties: None,
    }
}

#[test]
fn shared_subscription_delivers_each_message_to_one_member_across_shards_mqtt_4_8_2() {
    let shards = 4;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("member", shards);
    let members: Vec<Client> = ids
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, id)| {
            // A 3.1.1 member among 5.0 ones.
            let c = if i == 2 {
                connect(id, true, 0)
            } else {
                v5(id, true, 0)
            };
            subscribed(&mut h, c, subscribe("$share/g/jobs/+", QoS::AtLeastOnce))
        })
        .collect();
    let plain = subscriber(&mut h, &ids[3], "jobs/+");
    let (p, _) = h.connect(v5("producer", true, 0));
    for i in 0..30u16 {
        h.send(
            p,
            publish(
                "jobs/x",
                i.to_string(),
                QoS::AtLeastOnce,
                false,
                Some(i + 1),
            ),
        );
    }
    let mut all = Vec::new();
    for &m in &members {
        let got = h.recv(m);
        let mine = payloads(&got);
        assert_eq!(mine.len(), 10, "round robin: an equal share each");
        ack(&mut h, m, &got);
        all.extend(mine);
    }
    all.sort_by_key(|s| s.parse::<u32>().unwrap());
    let want: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    assert_eq!(all, want, "each message exactly once to the group");
    // Ordinary subscribers get all (20 in flight, the rest after acks).
    let first = h.recv(plain);
    ack(&mut h, plain, &first);
    assert_eq!(first.len() + h.recv(plain).len(), 30);
}

#[test]
fn shared_group_passes_over_a_member_whose_window_is_full() {
    let shards = 3;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("win", shards);
    // `slow` takes one message at a time and never acknowledges.
    let slow = subscribed(
        &mut h,
        Connect {
            properties: props(|p| p.receive_maximum = Some(1)),
            ..v5(&ids[0], true, 0)
        },
        subscribe("$share/g/jobs", QoS::AtLeastOnce),
    );
    let fast = subscribed(
        &mut h,
        v5(&ids[1], true, 0),
        subscribe("$share/g/jobs", QoS::AtLeastOnce),
    );
    let (p, _) = h.connect(v5(&ids[2], true, 0));
    for i in 1..=12u16 {
        h.send(
            p,
            publish("jobs", i.to_string(), QoS::AtLeastOnce, false, Some(i)),
        );
    }
    // Round robin gives `slow` the first and the third; the third waits in
    // its queue, its shard tells the group's owner, and everything after
    // goes to the member with room.
    let slow_got = h.recv(slow);
    assert_eq!(payloads(&slow_got), ["1"]);
    let fast_got = h.recv(fast);
    assert_eq!(payloads(&fast_got).len(), 10);
    ack(&mut h, fast, &fast_got);
    // Once `slow` acknowledges, its queued message goes out (its window is
    // full again); when that one is acknowledged too, it has room and is
    // back in the rotation: the next two messages go one to each.
    ack(&mut h, slow, &slow_got);
    let third = h.recv(slow);
    assert_eq!(payloads(&third), ["3"]);
    ack(&mut h, slow, &third);
    h.send(p, publish("jobs", "13", QoS::AtLeastOnce, false, Some(13)));
    h.send(p, publish("jobs", "14", QoS::AtLeastOnce, false, Some(14)));
    assert_eq!(payloads(&h.recv(slow)).len(), 1);
    assert_eq!(payloads(&h.recv(fast)).len(), 1);
}

#[test]
fn shared_group_prefers_connected_members_and_sends_no_retained() {
    let mut h = Harness::new(2);
    let (p, _) = h.connect(v5("producer", true, 0));
    h.send(p, publish("jobs/r", "old", QoS::AtMostOnce, true, None));
    let a = subscribed(
        &mut h,
        v5_expiring("a", true, 600),
        subscribe("$share/g/jobs/#", QoS::AtLeastOnce),
    );
    assert!(h.recv(a).is_empty(), "no retained on a shared subscription");
    let b = subscribed(
        &mut h,
        v5("b", true, 0),
        subscribe("$share/g/jobs/#", QoS::AtLeastOnce),
    );
    h.drop_socket(a);
    for i in 1..=4u16 {
        h.send(p, publish("jobs/x", "m", QoS::AtLeastOnce, false, Some(i)));
    }
    assert_eq!(payloads(&h.recv(b)).len(), 4, "all to the connected member");
    // The group goes with its members: b leaves, a's session ends.
    h.send(b, disconnect());
    let (a, _) = h.connect(v5("a", true, 0));
    h.send(a, disconnect());
    h.send(p, publish("jobs/x", "m", QoS::AtLeastOnce, false, Some(9)));
    let acks: Vec<u8> = h
        .recv(p)
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect();
    // Four delivered to the group; the last finds no group and no
    // subscriber anywhere any more: 0x10.
    assert_eq!(acks, [0, 0, 0, 0, reason::NO_MATCHING_SUBSCRIBERS]);
}

#[test]
fn shared_subscription_with_no_local_is_a_protocol_error_mqtt_3_8_3_4() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5("nl", true, 0));
    h.send(
        c,
        sub_opts("$share/g/t", QoS::AtMostOnce, |o| o.no_local = true),
    );
    assert!(h.is_closed(c));
    assert_eq!(disconnect_code(&h.recv(c)), Some(reason::PROTOCOL_ERROR));
    let (c, _) = h.connect(v5("bad", true, 0));
    h.send(c, sub_opts("$share//t", QoS::AtMostOnce, |_| {}));
    match h.recv(c).first() {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, [reason::TOPIC_FILTER_INVALID]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn auth_packet_without_an_exchange_is_a_protocol_error() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(v5("auth", true, 0));
    h.send(
        c,
        Packet::Auth(codec::Auth {
            reason: 0x18,
            properties: props(|p| p.authentication_method = Some(ByteString::from("x"))),
        }),
    );
    assert!(h.is_closed(c));
    assert_eq!(disconnect_code(&h.recv(c)), Some(reason::PROTOCOL_ERROR));
}

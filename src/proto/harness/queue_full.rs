//! `--queue-full` on the harness: what a QoS 1/2 message does when its
//! subscriber's session queue is full. Under backpressure the publisher's
//! PUBACK waits (and its reads stop) until the queue has room, so every
//! acknowledged message is delivered; past the timeout, or under a drop
//! policy, a 5.0 publisher is told 0x97 on exactly the dropped messages.
//! On one shard and across two (the answer travels over the mesh).

use super::*;
use crate::proto::broker::QueueFull;
use crate::proto::codec::reason;

/// Small limits so a test fills them: 5 in flight, 10 queued, 2 s wait.
fn harness(shards: u16, policy: QueueFull) -> Harness {
    Harness::with_config(shards, |c| {
        c.max_inflight = 5;
        c.max_queued = 10;
        c.queue_full = policy;
        c.queue_full_timeout_ms = 2_000;
    })
}

fn v5(client_id: &str, keep_alive: u16) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        ..connect(client_id, true, keep_alive)
    }
}

/// A subscriber on the last shard and a publisher on the first (the same
/// shard when there is one).
fn pair(h: &mut Harness, shards: u16, publisher: impl Fn(&str) -> Connect) -> (Client, Client) {
    let subscribers = ids_on_shards("sub", shards);
    let publishers = ids_on_shards("pub", shards);
    let s = subscriber(h, &subscribers[usize::from(shards) - 1], "t");
    let (p, _) = h.connect(publisher(&publishers[0]));
    (s, p)
}

/// QoS 1 PUBLISHes with packet ids and payloads `range`, in one read.
fn burst(h: &mut Harness, p: Client, range: std::ops::RangeInclusive<u16>, qos: QoS) {
    let version = h.version_of(p);
    let mut bytes = BytesMut::new();
    for i in range {
        publish("t", i.to_string(), qos, false, Some(i)).encode(version, &mut bytes);
    }
    h.send_bytes(p, &bytes);
}

/// The PUBACKs (or PUBRECs) `p` has received: packet id and reason code.
fn acks(h: &mut Harness, p: Client) -> Vec<(u16, u8)> {
    h.recv(p)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::PubAck(r) | Packet::PubRec(r) => Some((r.packet_id.get(), r.reason)),
            _ => None,
        })
        .collect()
}

fn ids(acks: &[(u16, u8)]) -> Vec<u16> {
    acks.iter().map(|(id, _)| *id).collect()
}

/// The subscriber reads and acknowledges everything it is sent until
/// nothing more comes; the payloads in the order they arrived.
fn drain(h: &mut Harness, s: Client) -> Vec<u16> {
    let mut got = Vec::new();
    loop {
        let publishes: Vec<Publish> = h
            .recv(s)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect();
        if publishes.is_empty() {
            return got;
        }
        for p in publishes {
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
            let id = p.packet_id.expect("QoS 1");
            h.send(s, Packet::PubAck(PubResp::new(id)));
        }
    }
}

#[test]
fn backpressure_acknowledges_only_what_it_can_deliver_and_loses_nothing() {
    for shards in [1, 2] {
        let mut h = harness(shards, QueueFull::Backpressure);
        let (s, p) = pair(&mut h, shards, |id| connect(id, true, 0));
        burst(&mut h, p, 1..=40, QoS::AtLeastOnce);
        // 5 in flight and 10 queued: the 16th waits for room, and its
        // PUBACK with it; the publisher's reads are held.
        assert_eq!(ids(&acks(&mut h, p)), (1..=15).collect::<Vec<_>>());
        assert!(h.brokers[p.shard].reads_held(p.conn), "{shards} shards");
        assert_eq!(get(&h.counters.messages_dropped), 0);

        // As the subscriber takes messages, the rest are acknowledged and
        // delivered: every one, once, in order.
        let got = drain(&mut h, s);
        assert_eq!(got, (1..=40).collect::<Vec<_>>(), "{shards} shards");
        assert_eq!(ids(&acks(&mut h, p)), (16..=40).collect::<Vec<_>>());
        assert!(!h.brokers[p.shard].reads_held(p.conn));
        assert_eq!(get(&h.counters.messages_dropped), 0);
        assert!(get(&h.counters.queue_full_held) >= 25);
    }
}

#[test]
fn a_publisher_held_past_the_timeout_is_told_0x97_and_keeps_its_connection() {
    for shards in [1, 2] {
        let mut h = harness(shards, QueueFull::Backpressure);
        // Keep-alive 1 s: held for 2 s, it is not closed for the silence.
        let (s, p) = pair(&mut h, shards, |id| v5(id, 1));
        burst(&mut h, p, 1..=16, QoS::AtLeastOnce);
        let first = acks(&mut h, p);
        assert_eq!(ids(&first), (1..=15).collect::<Vec<_>>());
        assert!(first.iter().all(|(_, code)| *code == reason::SUCCESS));
        h.advance(1_900);
        assert!(acks(&mut h, p).is_empty(), "still waiting for room");
        h.advance(200);
        // The subscriber took nothing for the timeout: dropped, and said.
        assert_eq!(acks(&mut h, p), [(16, reason::QUOTA_EXCEEDED)]);
        assert!(!h.is_closed(p), "held, not silent");
        assert_eq!(get(&h.counters.queue_full_timeouts), 1);
        // Stalled: what meets its full queue now is dropped at once ...
        burst(&mut h, p, 17..=17, QoS::AtLeastOnce);
        assert_eq!(acks(&mut h, p), [(17, reason::QUOTA_EXCEEDED)]);
        assert_eq!(get(&h.counters.messages_dropped), 2);
        // ... until it reads again.
        let got = drain(&mut h, s);
        assert_eq!(got, (1..=15).collect::<Vec<_>>());
        burst(&mut h, p, 18..=18, QoS::AtLeastOnce);
        assert_eq!(acks(&mut h, p), [(18, reason::SUCCESS)]);
        assert_eq!(drain(&mut h, s), [18]);
    }
}

#[test]
fn drop_newest_tells_a_v5_publisher_0x97_on_exactly_the_dropped_messages() {
    for shards in [1, 2] {
        let mut h = harness(shards, QueueFull::DropNewest);
        let (s, p) = pair(&mut h, shards, |id| v5(id, 0));
        burst(&mut h, p, 1..=20, QoS::AtLeastOnce);
        let got = acks(&mut h, p);
        assert_eq!(ids(&got), (1..=20).collect::<Vec<_>>(), "none held");
        for (id, code) in got {
            let want = if id <= 15 {
                reason::SUCCESS
            } else {
                reason::QUOTA_EXCEEDED
            };
            assert_eq!(code, want, "PUBACK {id}, {shards} shards");
        }
        assert_eq!(get(&h.counters.messages_dropped), 5);
        assert_eq!(get(&h.counters.queue_full_dropped_newest), 5);
        assert_eq!(get(&h.counters.quota_exceeded_acks), 5);
        assert_eq!(drain(&mut h, s), (1..=15).collect::<Vec<_>>());
    }
}

#[test]
fn drop_oldest_keeps_the_newest_messages() {
    let mut h = harness(1, QueueFull::DropOldest);
    let (s, p) = pair(&mut h, 1, |id| v5(id, 0));
    burst(&mut h, p, 1..=20, QoS::AtLeastOnce);
    // Each was queued when acknowledged; older ones made way later.
    assert!(acks(&mut h, p)
        .iter()
        .all(|(_, code)| *code == reason::SUCCESS));
    let mut want: Vec<u16> = (1..=5).collect();
    want.extend(11..=20);
    assert_eq!(drain(&mut h, s), want);
    assert_eq!(get(&h.counters.queue_full_dropped_oldest), 5);
}

#[test]
fn a_subscriber_that_leaves_releases_its_held_publishers() {
    let mut h = harness(1, QueueFull::Backpressure);
    let (s, p) = pair(&mut h, 1, |id| v5(id, 0));
    burst(&mut h, p, 1..=18, QoS::AtLeastOnce);
    assert_eq!(acks(&mut h, p).len(), 15);
    assert!(h.brokers[p.shard].reads_held(p.conn));
    // An offline session cannot hold publishers: the message that waited
    // is dropped and said; the two unread behind it meet a queue that is
    // gone with its clean session, so they are simply delivered nowhere.
    h.drop_socket(s);
    let rest = acks(&mut h, p);
    assert_eq!(rest[0], (16, reason::QUOTA_EXCEEDED));
    assert_eq!(ids(&rest), [16, 17, 18]);
    assert!(!h.brokers[p.shard].reads_held(p.conn));
}

#[test]
fn a_qos2_message_refused_with_0x97_frees_its_packet_id_mqtt_4_3_3() {
    let mut h = harness(1, QueueFull::DropNewest);
    let (s, p) = pair(&mut h, 1, |id| v5(id, 0));
    burst(&mut h, p, 1..=15, QoS::AtLeastOnce);
    assert_eq!(acks(&mut h, p).len(), 15);
    h.send(p, publish("t", "99", QoS::ExactlyOnce, false, Some(99)));
    assert_eq!(acks(&mut h, p), [(99, reason::QUOTA_EXCEEDED)]);
    // The flow ended with that PUBREC (no PUBREL follows): the id is free,
    // and a new message under it is a new message, not a resend.
    assert_eq!(drain(&mut h, s), (1..=15).collect::<Vec<_>>());
    h.send(p, publish("t", "100", QoS::ExactlyOnce, false, Some(99)));
    assert_eq!(acks(&mut h, p), [(99, reason::SUCCESS)]);
    let delivered: Vec<Bytes> = h
        .recv(s)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p.payload),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, [Bytes::from_static(b"100")]);
}

#[test]
fn the_deepest_queues_are_reported_deepest_first() {
    let mut h = harness(1, QueueFull::Backpressure);
    // Three offline persistent sessions on their own topics.
    for (id, topic) in [("a", "q/a"), ("b", "q/b"), ("c", "q/c")] {
        let (c, _) = h.connect(connect(id, false, 0));
        h.send(c, subscribe(topic, QoS::AtLeastOnce));
        h.send(c, disconnect());
    }
    let (p, _) = h.connect(connect("p", true, 0));
    for (topic, n) in [("q/a", 5u16), ("q/b", 12), ("q/c", 7)] {
        for i in 1..=n {
            h.send(p, publish(topic, "m", QoS::AtLeastOnce, false, Some(i)));
        }
    }
    let deepest = h.brokers[0].deepest_queues(2);
    let named: Vec<(&str, u64)> = deepest.iter().map(|(id, d)| (&id[..], *d)).collect();
    // b's queue holds its limit of 10 (2 were dropped: it is offline).
    assert_eq!(named, [("b", 10), ("c", 7)]);
    assert_eq!(get(&h.counters.queue_full_dropped_newest), 2);
}

/// A held publisher's acknowledgements and PINGREQs are taken from behind
/// its waiting PUBLISH: a client that fills its own subscription's queue
/// frees itself by acknowledging what it was sent, and its keep-alive is
/// answered while it waits.
#[test]
fn a_held_client_is_still_heard_acknowledging_and_pinging() {
    let mut h = harness(1, QueueFull::Backpressure);
    let x = subscribed(
        &mut h,
        connect("self-loop", true, 0),
        subscribe("t", QoS::AtLeastOnce),
    );
    burst(&mut h, x, 1..=16, QoS::AtLeastOnce);
    let mut delivered = Vec::new();
    let mut acked = Vec::new();
    for p in h.recv(x) {
        match p {
            Packet::Publish(p) => delivered.push(p.packet_id.expect("QoS 1")),
            Packet::PubAck(r) => acked.push(r.packet_id.get()),
            _ => {}
        }
    }
    assert_eq!(acked, (1..=15).collect::<Vec<_>>());
    assert_eq!(delivered.len(), 5, "its own window's worth");
    assert!(h.brokers[0].reads_held(x.conn));
    // Another PUBLISH, then its acknowledgements of what it got, then a
    // PINGREQ: the last two are heard although the PUBLISH waits.
    let mut bytes = BytesMut::new();
    publish("t", "17", QoS::AtLeastOnce, false, Some(17))
        .encode(ProtocolVersion::V3_1_1, &mut bytes);
    for id in delivered {
        Packet::PubAck(PubResp::new(id)).encode(ProtocolVersion::V3_1_1, &mut bytes);
    }
    Packet::PingReq.encode(ProtocolVersion::V3_1_1, &mut bytes);
    h.send_bytes(x, &bytes);
    let after = h.recv(x);
    assert!(after.contains(&Packet::PingResp), "{after:?}");
    let acked: Vec<u16> = after
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(r) => Some(r.packet_id.get()),
            _ => None,
        })
        .collect();
    assert_eq!(acked, [16, 17], "freed by its own acknowledgements");
    assert!(!h.brokers[0].reads_held(x.conn));
    assert_eq!(get(&h.counters.messages_dropped), 0);
}

//! A deterministic harness: N clients stepped through the sans-IO brokers of
//! several shards on a fake clock. The shell's job (routing a CONNECT to its
//! owner shard, forwarding broadcasts, closing sockets) is played here by a
//! few lines, so every lifecycle rule is checked without sockets or sleeps.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::HashSet;

use super::broker::{Broker, BrokerConfig, Event, ShardMsg};
use super::codec::{
    self, Connect, Disconnect, LastWill, Packet, PacketId, ProtocolVersion, PubResp, Publish, QoS,
    Subscribe, SubscriptionOptions, Unsubscribe,
};
use super::handshake::owner_of;
use super::topic::{TopicFilter, TopicName};
use super::{ConnId, Millis, ShardId};
use crate::metrics::{get, Counters};

/// A client of the harness: which shard holds it, and its connection there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Client {
    shard: usize,
    conn: ConnId,
}

struct Harness {
    brokers: Vec<Broker>,
    counters: Arc<Counters>,
    now: Millis,
    /// Connections the broker asked to close (socket closed by the "shell").
    closed: HashSet<(usize, ConnId)>,
    /// Bytes each connection was sent, kept until read by `recv`.
    inbox: hashbrown::HashMap<(usize, ConnId), BytesMut>,
    /// Messages between shards, per receiving shard, in the order sent (the
    /// shell's mesh is FIFO per sender; one queue per receiver is stricter).
    mesh: Vec<std::collections::VecDeque<ShardMsg>>,
    /// While set, `pump` leaves `mesh` alone, so a test can interleave what
    /// shards do before they hear from each other.
    hold_mesh: bool,
    /// The protocol each client connected with (its packets are decoded by
    /// it even after the broker released the connection).
    versions: hashbrown::HashMap<(usize, ConnId), ProtocolVersion>,
    /// What each shard committed to its log (`--data-dir`), for restarts.
    disk: Vec<BytesMut>,
    /// Bytes a connection sent that its broker left unread (its reads are
    /// held for full queues), fed again on [`Event::Resume`].
    unread: hashbrown::HashMap<(usize, ConnId), BytesMut>,
}

impl Harness {
    fn new(shards: u16) -> Self {
        Harness::with_acl(shards, None)
    }

    fn with_acl(shards: u16, acl: Option<&str>) -> Self {
        let acl = acl.map(|text| Arc::new(super::acl::Acl::parse(text).expect("valid ACL")));
        Harness::with_config(shards, |c| {
            c.acl = acl.clone();
            c.max_queued = 100;
        })
    }

    /// `shards` brokers whose configuration `tune` adjusts from the defaults.
    fn with_config(shards: u16, tune: impl Fn(&mut BrokerConfig)) -> Self {
        let counters = Arc::new(Counters::default());
        let brokers = (0..shards)
            .map(|i| {
                let mut config = BrokerConfig::new(ShardId(i), shards);
                tune(&mut config);
                Broker::new(config, counters.clone(), Millis(0))
            })
            .collect();
        Harness {
            brokers,
            counters,
            now: Millis(0),
            closed: HashSet::new(),
            inbox: hashbrown::HashMap::new(),
            mesh: (0..shards).map(|_| Default::default()).collect(),
            hold_mesh: false,
            versions: hashbrown::HashMap::new(),
            disk: (0..shards).map(|_| BytesMut::new()).collect(),
            unread: hashbrown::HashMap::new(),
        }
    }

    /// Delivers what shards sent each other, in the order `order` gives the
    /// receiving shards (each one's queue whole), then pumps as usual.
    fn release_mesh(&mut self, order: &[usize]) {
        self.hold_mesh = false;
        for &shard in order {
            while let Some(msg) = self.mesh[shard].pop_front() {
                self.brokers[shard].handle_remote(msg, self.now);
            }
        }
        self.pump();
    }

    fn connect(&mut self, connect: Connect) -> (Client, codec::ConnAck) {
        let shard = owner_of(&connect.client_id, self.brokers.len() as u16).0 as usize;
        let version = connect.protocol;
        let conn = self.brokers[shard].connect(connect, self.now);
        self.versions.insert((shard, conn), version);
        self.pump();
        let client = Client { shard, conn };
        let mut packets = self.recv(client);
        assert!(!packets.is_empty(), "no CONNACK");
        match packets.remove(0) {
            Packet::ConnAck(ack) => {
                // Anything after the CONNACK (resent messages) goes back to the inbox.
                self.requeue(client, packets);
                (client, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, client: Client, packet: Packet) {
        let version = self.version_of(client);
        let mut buf = BytesMut::new();
        packet.encode(version, &mut buf);
        self.send_bytes(client, &buf);
    }

    fn send_bytes(&mut self, client: Client, bytes: &[u8]) {
        let key = (client.shard, client.conn);
        let mut buf = self.unread.remove(&key).unwrap_or_default();
        buf.extend_from_slice(bytes);
        self.feed(key, buf);
        self.pump();
    }

    /// Hands bytes to the broker as the shell does, keeping what it
    /// leaves unread.
    fn feed(&mut self, (shard, conn): (usize, ConnId), mut buf: BytesMut) {
        self.brokers[shard].handle_read(conn, &mut buf, self.now);
        if !buf.is_empty() {
            self.unread.insert((shard, conn), buf);
        }
    }

    /// The socket of `client` drops without DISCONNECT.
    fn drop_socket(&mut self, client: Client) {
        self.brokers[client.shard].connection_lost(client.conn, self.now);
        self.closed.insert((client.shard, client.conn));
        self.pump();
    }

    fn advance(&mut self, ms: u64) {
        // Tick every 100 ms, as the shell does.
        let end = self.now.0 + ms;
        while self.now.0 < end {
            self.now = Millis((self.now.0 + 100).min(end));
            for b in &mut self.brokers {
                b.tick(self.now);
            }
            self.pump();
        }
    }

    /// Plays the shell: moves outgoing bytes into inboxes, forwards
    /// broadcasts to the other shards, closes and releases connections.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            for shard in 0..self.brokers.len() {
                while let Some(event) = self.brokers[shard].poll_event() {
                    progressed = true;
                    match event {
                        Event::Transmit(conn) => {
                            let out = self.brokers[shard].take_outgoing(conn);
                            self.inbox
                                .entry((shard, conn))
                                .or_default()
                                .extend_from_slice(&out);
                        }
                        Event::Close(conn) => {
                            let out = self.brokers[shard].take_outgoing(conn);
                            self.inbox
                                .entry((shard, conn))
                                .or_default()
                                .extend_from_slice(&out);
                            self.brokers[shard].release(conn);
                            self.closed.insert((shard, conn));
                        }
                        Event::Broadcast(msg) => {
                            for other in 0..self.brokers.len() {
                                if other != shard {
                                    self.mesh[other].push_back(msg.clone());
                                }
                            }
                        }
                        Event::SendTo(peer, msg) => {
                            self.mesh[usize::from(peer.0)].push_back(msg);
                        }
                        Event::Resume(conn) => {
                            if let Some(buf) = self.unread.remove(&(shard, conn)) {
                                self.feed((shard, conn), buf);
                            }
                        }
                    }
                }
            }
            if !self.hold_mesh {
                for shard in 0..self.brokers.len() {
                    while let Some(msg) = self.mesh[shard].pop_front() {
                        progressed = true;
                        self.brokers[shard].handle_remote(msg, self.now);
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn recv(&mut self, client: Client) -> Vec<Packet> {
        let mut buf = self
            .inbox
            .remove(&(client.shard, client.conn))
            .unwrap_or_default();
        let mut out = Vec::new();
        let version = self.version_of(client);
        while let Some(p) =
            codec::decode(&mut buf, version, usize::MAX).expect("broker sends well-formed packets")
        {
            out.push(p);
        }
        assert!(buf.is_empty(), "partial packet left: {buf:?}");
        out
    }

    fn version_of(&self, client: Client) -> ProtocolVersion {
        self.versions
            .get(&(client.shard, client.conn))
            .copied()
            .unwrap_or(ProtocolVersion::V3_1_1)
    }

    /// Puts packets back at the front of `client`'s inbox, unread.
    fn requeue(&mut self, client: Client, packets: Vec<Packet>) {
        let mut bytes = BytesMut::new();
        let version = self.version_of(client);
        for p in packets {
            p.encode(version, &mut bytes);
        }
        if let Some(later) = self.inbox.remove(&(client.shard, client.conn)) {
            bytes.extend_from_slice(&later);
        }
        if !bytes.is_empty() {
            self.inbox.insert((client.shard, client.conn), bytes);
        }
    }

    fn is_closed(&self, client: Client) -> bool {
        self.closed.contains(&(client.shard, client.conn))
    }

    fn publishes(&mut self, client: Client) -> Vec<(String, Bytes, QoS, bool)> {
        self.recv(client)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic.to_string(), p.payload, p.qos, p.retain)),
                _ => None,
            })
            .collect()
    }
}

fn connect(client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: clean,
        keep_alive,
        client_id: ByteString::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: None,
    }
}

fn with_will(mut c: Connect, topic: &str, payload: &'static [u8], retain: bool) -> Connect {
    c.will = Some(LastWill {
        topic: TopicName::new(topic.to_string()).unwrap(),
        payload: Bytes::from_static(payload),
        qos: QoS::AtMostOnce,
        retain,
        properties: None,
    });
    c
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    subscribe_many(&[(filter, qos)])
}

fn subscribe_many(filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        filters: filters
            .iter()
            .map(|(f, q)| {
                (
                    TopicFilter::new(f.to_string()).unwrap(),
                    SubscriptionOptions::qos(*q),
                )
            })
            .collect(),
        properties: None,
    })
}

fn publish(
    topic: &str,
    payload: impl AsRef<[u8]>,
    qos: QoS,
    retain: bool,
    id: Option<u16>,
) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: TopicName::new(topic.to_string()).unwrap(),
        packet_id: id.map(pid),
        payload: Bytes::copy_from_slice(payload.as_ref()),
        properties: None,
    })
}

fn disconnect() -> Packet {
    Packet::Disconnect(Disconnect::default())
}

/// Subscribes a fresh clean client to `filter` and discards its SUBACK.
fn subscriber(h: &mut Harness, id: &str, filter: &str) -> Client {
    subscribed(h, connect(id, true, 0), subscribe(filter, QoS::AtLeastOnce))
}

/// Connects with `c`, sends `sub`, and discards its SUBACK.
fn subscribed(h: &mut Harness, c: Connect, sub: Packet) -> Client {
    let (c, _) = h.connect(c);
    h.send(c, sub);
    let mut packets = h.recv(c);
    assert!(
        matches!(packets.first(), Some(Packet::SubAck(_))),
        "{packets:?}"
    );
    packets.remove(0);
    // Retained messages sent after the SUBACK stay for the test to read.
    h.requeue(c, packets);
    c
}

#[test]
fn clean_session_gets_session_present_0_mqtt_3_2_2_1() {
    let mut h = Harness::new(1);
    for _ in 0..2 {
        let (c, ack) = h.connect(connect("c1", true, 0));
        assert!(!ack.session_present);
        assert_eq!(ack.code, 0);
        h.send(c, disconnect());
    }
}

#[test]
fn persistent_session_resumed_with_its_subscriptions_mqtt_3_2_2_2() {
    let mut h = Harness::new(4);
    let (c, ack) = h.connect(connect("mqtt_sample_id_1", false, 0));
    assert!(
        !ack.session_present,
        "first connect has no stored session (MQTT-3.2.2-3)"
    );
    h.send(c, subscribe("a/b", QoS::AtMostOnce));
    h.recv(c);
    h.send(c, disconnect());
    assert!(h.is_closed(c));

    let (c, ack) = h.connect(connect("mqtt_sample_id_1", false, 0));
    assert!(ack.session_present);
    // The subscription survived: a publish from another client arrives
    // without subscribing again.
    let (p, _) = h.connect(connect("publisher", true, 0));
    h.send(p, publish("a/b", b"hi", QoS::AtMostOnce, false, None));
    assert_eq!(
        h.publishes(c),
        [(
            "a/b".into(),
            Bytes::from_static(b"hi"),
            QoS::AtMostOnce,
            false
        )]
    );
}

#[test]
fn clean_session_discards_stored_session_mqtt_3_1_2_6() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(connect("c", false, 0));
    h.send(c, subscribe("a", QoS::AtMostOnce));
    h.send(c, disconnect());
    let (c, ack) = h.connect(connect("c", true, 0));
    assert!(!ack.session_present);
    h.recv(c);
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("a", b"x", QoS::AtMostOnce, false, None));
    assert!(h.publishes(c).is_empty(), "old subscription must be gone");
    h.send(c, disconnect());
    // A clean session ends with its connection (MQTT-3.1.2-6): a persistent
    // reconnect then finds nothing.
    let (_, ack) = h.connect(connect("c", false, 0));
    assert!(!ack.session_present);
}

#[test]
fn disconnect_discards_the_will_mqtt_3_14_4_3() {
    let mut h = Harness::new(2);
    let s = subscriber(&mut h, "watcher", "will/#");
    let (c, _) = h.connect(with_will(
        connect("dev", true, 0),
        "will/dev",
        b"gone",
        false,
    ));
    h.send(c, disconnect());
    assert!(h.is_closed(c));
    assert!(h.recv(c).is_empty(), "nothing is sent back to a DISCONNECT");
    assert!(h.publishes(s).is_empty());
    assert_eq!(get(&h.counters.wills_published), 0);
}

#[test]
fn network_loss_publishes_the_will_to_every_shard() {
    let mut h = Harness::new(4);
    let watchers: Vec<Client> = (0..8)
        .map(|i| subscriber(&mut h, &format!("watcher-{i}"), "will/+"))
        .collect();
    assert!(
        watchers
            .iter()
            .map(|w| w.shard)
            .collect::<HashSet<_>>()
            .len()
            > 1
    );
    let (c, _) = h.connect(with_will(
        connect("dev", true, 0),
        "will/dev",
        b"gone",
        false,
    ));
    h.drop_socket(c);
    for w in watchers {
        assert_eq!(
            h.publishes(w),
            [(
                "will/dev".into(),
                Bytes::from_static(b"gone"),
                QoS::AtMostOnce,
                false
            )]
        );
    }
}

#[test]
fn keepalive_closes_after_one_and_a_half_times_and_publishes_will_mqtt_3_1_2_24() {
    let mut h = Harness::new(2);
    let s = subscriber(&mut h, "watcher", "will/#");
    let (c, _) = h.connect(with_will(
        connect("dev", true, 2),
        "will/dev",
        b"timeout",
        false,
    ));
    h.advance(2_900);
    assert!(!h.is_closed(c), "closed before 1.5 × keep-alive");
    h.advance(200);
    assert!(
        h.is_closed(c),
        "not closed within 1.5 × keep-alive + one tick"
    );
    assert_eq!(h.publishes(s).len(), 1);
    assert_eq!(get(&h.counters.keepalive_expiries), 1);
}

#[test]
fn any_packet_resets_the_keepalive_and_pingreq_gets_pingresp_mqtt_3_12_4_1() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(connect("dev", true, 2));
    for _ in 0..5 {
        h.advance(2_000);
        h.send_bytes(c, b"\xc0\x00");
        assert_eq!(h.recv(c), [Packet::PingResp]);
    }
    assert!(!h.is_closed(c));
    h.advance(3_100);
    assert!(h.is_closed(c));
}

#[test]
fn keepalive_zero_never_expires_mqtt_3_1_2_10() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(connect("dev", true, 0));
    h.advance(200_000);
    assert!(!h.is_closed(c));
}

#[test]
fn takeover_closes_the_old_connection_and_publishes_its_will_mqtt_3_1_4_2() {
    let mut h = Harness::new(4);
    let s = subscriber(&mut h, "watcher", "status/#");
    let (old, _) = h.connect(with_will(
        connect("mqtt_identical_1", false, 0),
        "status/x",
        b"old-gone",
        false,
    ));
    h.send(old, subscribe("t", QoS::AtMostOnce));
    h.recv(old);
    let (new, ack) = h.connect(connect("mqtt_identical_1", false, 0));
    assert!(h.is_closed(old));
    assert!(!h.is_closed(new));
    assert!(
        ack.session_present,
        "persistent session carried over to the new connection"
    );
    assert_eq!(h.publishes(s).len(), 1);
    assert_eq!(get(&h.counters.takeovers), 1);
}

#[test]
fn flapping_clients_never_leak_sessions_or_connections() {
    let mut h = Harness::new(4);
    let mut last = None;
    for i in 0..1_000 {
        let clean = i % 3 == 0;
        let (c, _) = h.connect(connect("mqtt_identical_1", clean, 10));
        if let Some(prev) = last {
            assert!(h.is_closed(prev));
        }
        last = Some(c);
    }
    let total_conns: usize = h.brokers.iter().map(Broker::connection_count).sum();
    let total_sessions: usize = h.brokers.iter().map(Broker::session_count).sum();
    assert_eq!(total_conns, 1);
    assert_eq!(total_sessions, 1);
    assert_eq!(get(&h.counters.connections_current), 1);
}

#[test]
fn second_connect_is_a_protocol_violation_mqtt_3_1_0_2() {
    let mut h = Harness::new(1);
    let (c, _) = h.connect(with_will(connect("c", true, 0), "w", b"x", false));
    let s = subscriber(&mut h, "s", "w");
    h.send(c, Packet::Connect(Box::new(connect("c", true, 0))));
    assert!(h.is_closed(c));
    assert_eq!(
        h.publishes(s).len(),
        1,
        "a protocol error publishes the will"
    );
    assert_eq!(get(&h.counters.malformed_packets), 1);
}

#[test]
fn malformed_packet_closes_only_that_connection() {
    let mut h = Harness::new(1);
    let (bad, _) = h.connect(connect("bad", true, 0));
    let good = subscriber(&mut h, "good", "t");
    h.send_bytes(bad, b"\x00\x00"); // packet type 0 is reserved
    assert!(h.is_closed(bad));
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("t", b"still here", QoS::AtMostOnce, false, None));
    assert_eq!(h.publishes(good).len(), 1);
}

#[test]
fn retained_will_replaces_retained_message_for_late_subscribers() {
    let mut h = Harness::new(4);
    let (dev, _) = h.connect(with_will(
        connect("dev1", true, 0),
        "dev/1/status",
        b"offline",
        true,
    ));
    h.send(
        dev,
        publish("dev/1/status", b"online", QoS::AtMostOnce, true, None),
    );
    h.drop_socket(dev);
    let late = subscriber(&mut h, "late", "dev/+/status");
    assert_eq!(
        h.publishes(late),
        [(
            "dev/1/status".into(),
            Bytes::from_static(b"offline"),
            QoS::AtMostOnce,
            true
        )]
    );
}

#[test]
fn retained_set_replaced_cleared_and_flagged_mqtt_3_3_1_6_and_9() {
    let mut h = Harness::new(4);
    let live = subscriber(&mut h, "live", "r/#");
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("r/1", b"one", QoS::AtMostOnce, true, None));
    h.send(p, publish("r/1", b"two", QoS::AtMostOnce, true, None));
    // MQTT-3.3.1-9: established subscriptions get RETAIN=0.
    assert!(h.publishes(live).iter().all(|m| !m.3));
    let late = subscriber(&mut h, "late", "r/#");
    // MQTT-3.3.1-6/-8: a new subscription gets the retained message, RETAIN=1.
    assert_eq!(
        h.publishes(late),
        [(
            "r/1".into(),
            Bytes::from_static(b"two"),
            QoS::AtMostOnce,
            true
        )]
    );
    h.send(p, publish("r/1", b"", QoS::AtMostOnce, true, None));
    // MQTT-3.3.1-12: the clearing PUBLISH itself is delivered as usual to
    // the subscribers there are, empty and with RETAIN=0.
    assert_eq!(
        h.publishes(live).last(),
        Some(&("r/1".into(), Bytes::new(), QoS::AtMostOnce, false))
    );
    let later = subscriber(&mut h, "later", "r/#");
    assert!(
        h.publishes(later).is_empty(),
        "empty payload clears (MQTT-3.3.1-10)"
    );
}

#[test]
fn overlapping_subscriptions_deliver_one_copy_at_highest_qos_mqtt_3_3_5_1() {
    let mut h = Harness::new(1);
    let (s, _) = h.connect(connect("s", true, 0));
    h.send(
        s,
        subscribe_many(&[
            ("a/+", QoS::AtMostOnce),
            ("a/#", QoS::ExactlyOnce),
            ("a/b", QoS::AtLeastOnce),
        ]),
    );
    h.recv(s);
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("a/b", b"x", QoS::ExactlyOnce, false, Some(7)));
    let got = h.publishes(s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, QoS::ExactlyOnce);
}

#[test]
fn delivery_qos_is_min_of_publish_and_subscription_mqtt_3_8_4_6() {
    let mut h = Harness::new(1);
    let (s, _) = h.connect(connect("s", true, 0));
    h.send(s, subscribe("t", QoS::AtMostOnce));
    h.recv(s);
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("t", b"x", QoS::AtLeastOnce, false, Some(1)));
    assert_eq!(
        h.recv(p),
        [Packet::PubAck(PubResp {
            packet_id: pid(1),
            reason: 0,
            properties: None
        })]
    );
    assert_eq!(h.publishes(s)[0].2, QoS::AtMostOnce);
}

#[test]
fn qos2_publish_resent_before_pubrel_is_delivered_once_mqtt_4_3_3() {
    let mut h = Harness::new(1);
    let s = subscriber(&mut h, "s", "t");
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("t", b"once", QoS::ExactlyOnce, false, Some(9)));
    h.send(p, publish("t", b"once", QoS::ExactlyOnce, false, Some(9)));
    let acks = h.recv(p);
    assert_eq!(acks.len(), 2);
    assert!(acks
        .iter()
        .all(|a| matches!(a, Packet::PubRec(r) if r.packet_id == pid(9))));
    h.send(
        p,
        Packet::PubRel(PubResp {
            packet_id: pid(9),
            reason: 0,
            properties: None,
        }),
    );
    assert_eq!(
        h.recv(p),
        [Packet::PubComp(PubResp {
            packet_id: pid(9),
            reason: 0,
            properties: None
        })]
    );
    assert_eq!(h.publishes(s).len(), 1);
}

#[test]
fn unsubscribe_stops_delivery_and_is_acknowledged_mqtt_3_10_4_4() {
    let mut h = Harness::new(1);
    let s = subscriber(&mut h, "s", "t");
    h.send(
        s,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(3),
            filters: vec![TopicFilter::new("t").unwrap()],
            properties: None,
        }),
    );
    assert!(matches!(&h.recv(s)[..], [Packet::UnsubAck(a)] if a.packet_id == pid(3)));
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("t", b"x", QoS::AtMostOnce, false, None));
    assert!(h.publishes(s).is_empty());
}

#[test]
fn unacknowledged_qos1_resent_with_dup_on_resume_mqtt_4_4_0_1() {
    let mut h = Harness::new(1);
    let (s, _) = h.connect(connect("s", false, 0));
    h.send(s, subscribe("t", QoS::AtLeastOnce));
    h.recv(s);
    let (p, _) = h.connect(connect("p", true, 0));
    h.send(p, publish("t", b"x", QoS::AtLeastOnce, false, Some(1)));
    let first = h.recv(s);
    assert!(matches!(&first[..], [Packet::Publish(p)] if !p.dup));
    h.drop_socket(s);
    let (s, ack) = h.connect(connect("s", false, 0));
    assert!(ack.session_present);
    let again = h.recv(s);
    assert!(
        matches!(&again[..], [Packet::Publish(p)] if p.dup && &p.payload[..] == b"x"),
        "{again:?}"
    );
}

#[test]
fn subscriber_that_never_reads_is_bounded_and_others_carry_on() {
    let mut h = Harness::new(1);
    let stuck = subscriber(&mut h, "stuck", "t");
    let (p, _) = h.connect(connect("p", true, 0));
    // Nobody drains `stuck`'s socket: the broker keeps at most
    // MAX_PENDING_OUTGOING bytes for it and counts the rest as dropped.
    let stuck_conn = stuck.conn;
    let shard = stuck.shard;
    let payload: &'static [u8] = &[7u8; 1000];
    for _ in 0..3_000 {
        h.brokers[p.shard].handle_read(
            p.conn,
            &mut encode(&publish("t", payload, QoS::AtMostOnce, false, None)),
            h.now,
        );
        // Simulate a socket that accepts nothing: leave outgoing bytes in the broker.
        while h.brokers[shard].poll_event().is_some() {}
    }
    assert!(h.brokers[shard].has_outgoing(stuck_conn));
    let pending = h.brokers[shard].take_outgoing(stuck_conn).len();
    assert!(
        pending <= super::broker::MAX_PENDING_OUTGOING + 1100,
        "{pending}"
    );
    assert!(get(&h.counters.messages_dropped) > 1_000);
    assert!(!h.is_closed(p));
}

fn encode(packet: &Packet) -> BytesMut {
    encode_as(packet, ProtocolVersion::V3_1_1)
}

/// `packet`'s wire bytes in `version`.
fn encode_as(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf);
    buf
}

fn ack(h: &mut Harness, c: Client, packets: &[Packet]) {
    for p in packets {
        if let Packet::Publish(p) = p {
            if let Some(id) = p.packet_id {
                h.send(
                    c,
                    Packet::PubAck(PubResp {
                        packet_id: id,
                        reason: 0,
                        properties: None,
                    }),
                );
            }
        }
    }
}

fn payloads(packets: &[Packet]) -> Vec<String> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn offline_persistent_session_gets_queued_qos1_in_order_on_reconnect_mqtt_4_6_0() {
    let mut h = Harness::new(4);
    let (s, _) = h.connect(connect("sleeper", false, 0));
    h.send(s, subscribe_many(&[("q/#", QoS::AtLeastOnce)]));
    h.recv(s);
    h.send(s, disconnect());
    let (p, _) = h.connect(connect("p", true, 0));
    for i in 0..3u16 {
        h.send(
            p,
            publish("q/a", format!("m{i}"), QoS::AtLeastOnce, false, Some(i + 1)),
        );
    }
    // QoS 0 is not queued for an offline session.
    h.send(p, publish("q/a", b"zero", QoS::AtMostOnce, false, None));
    let (s, ack_) = h.connect(connect("sleeper", false, 0));
    assert!(ack_.session_present);
    let got = h.recv(s);
    assert_eq!(payloads(&got), ["m0", "m1", "m2"]);
    assert!(got
        .iter()
        .all(|p| matches!(p, Packet::Publish(p) if p.qos == QoS::AtLeastOnce && !p.dup)));
}

#[test]
fn inflight_window_holds_the_rest_in_order_until_acknowledged() {
    let mut h = Harness::new(1);
    let (s, _) = h.connect(connect("s", true, 0));
    h.send(s, subscribe("w", QoS::AtLeastOnce));
    h.recv(s);
    let (p, _) = h.connect(connect("p", true, 0));
    for i in 0..30u16 {
        h.send(
            p,
            publish("w", i.to_string(), QoS::AtLeastOnce, false, Some(i + 1)),
        );
    }
    let first = h.recv(s);
    assert_eq!(first.len(), 20, "max_inflight is 20");
    ack(&mut h, s, &first);
    let rest = h.recv(s);
    let all: Vec<String> = payloads(&first)
        .into_iter()
        .chain(payloads(&rest))
        .collect();
    assert_eq!(all, (0..30).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(get(&h.counters.messages_dropped), 0);
}

#[test]
fn session_queue_is_bounded_and_drops_are_counted() {
    let mut h = Harness::new(1);
    let (s, _) = h.connect(connect("s", false, 0));
    h.send(s, subscribe("b", QoS::AtLeastOnce));
    h.send(s, disconnect());
    let (p, _) = h.connect(connect("p", true, 0));
    for i in 0..150u16 {
        h.send(p, publish("b", b"x", QoS::AtLeastOnce, false, Some(i + 1)));
    }
    assert_eq!(get(&h.counters.messages_dropped), 50, "max_queued is 100");
    let (s, _) = h.connect(connect("s", false, 0));
    assert_eq!(h.recv(s).len(), 20, "the window's worth first");
}

/// The clientIds of the first `n` clients (by a numbered prefix) that
/// `owner_of` puts on each shard: tests that need a client on a given shard.
fn ids_on_shards(prefix: &str, shards: u16) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; usize::from(shards)];
    for i in 0.. {
        let id = format!("{prefix}{i}");
        let s = owner_of(&id, shards).0 as usize;
        if found[s].is_none() {
            found[s] = Some(id);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// Two clients on two shards set the same retained topic at the same time:
/// whatever order the shards hear of each other, every later subscriber, on
/// every shard, reads the same message (MQTT-3.3.1-5: the new one replaces
/// the one there). With a replica per shard, each shard kept the other's.
#[test]
fn concurrent_retained_sets_on_two_shards_agree_everywhere_mqtt_3_3_1_5() {
    for order in [[0usize, 1, 2, 3], [3, 2, 1, 0]] {
        let mut h = Harness::new(4);
        let ids = ids_on_shards("setter-", 4);
        let (a, _) = h.connect(connect(&ids[0], true, 0));
        let (b, _) = h.connect(connect(&ids[1], true, 0));
        h.hold_mesh = true;
        h.send(
            a,
            publish("cfg/mode", b"from-a", QoS::AtMostOnce, true, None),
        );
        h.send(
            b,
            publish("cfg/mode", b"from-b", QoS::AtMostOnce, true, None),
        );
        h.release_mesh(&order);
        let mut seen = HashSet::new();
        for id in ids_on_shards(&format!("reader-{}-", order[0]), 4) {
            let r = subscriber(&mut h, &id, "cfg/#");
            let got = h.publishes(r);
            assert_eq!(got.len(), 1, "{id}: {got:?}");
            seen.insert(got[0].1.clone());
        }
        assert_eq!(seen.len(), 1, "order {order:?}: shards disagree: {seen:?}");
    }
}

/// A subscription on one shard gets the retained messages that other shards
/// own, for a wildcard filter (asking every shard) and an exact one (asking
/// the topic's owner), each once, with RETAIN=1 and at min(QoS).
#[test]
fn retained_messages_owned_elsewhere_reach_new_subscriptions_mqtt_3_3_1_6() {
    let mut h = Harness::new(4);
    let (p, _) = h.connect(connect("pub", true, 0));
    let topics: Vec<String> = (0..40).map(|i| format!("fleet/{i}/status")).collect();
    for t in &topics {
        h.send(p, publish(t, t.as_bytes(), QoS::AtLeastOnce, true, Some(9)));
        let _ = h.recv(p);
    }
    // The topics are spread over the shards' stores.
    let owners: HashSet<usize> = (0..4)
        .filter(|&s| h.brokers[s].retained_count() > 0)
        .collect();
    assert!(owners.len() > 1, "all on one shard: {owners:?}");
    for id in ids_on_shards("wild-", 4) {
        let c = subscriber(&mut h, &id, "fleet/+/status");
        // Acknowledged as they come: 40 is past the inflight window of 20.
        let mut got = Vec::new();
        loop {
            let packets = h.recv(c);
            if packets.is_empty() {
                break;
            }
            ack(&mut h, c, &packets);
            for p in packets {
                let Packet::Publish(p) = p else { continue };
                assert!(p.retain, "MQTT-3.3.1-8: RETAIN=1 for a new subscription");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_eq!(p.topic.as_str().as_bytes(), &p.payload[..]);
                got.push(p.topic.to_string());
            }
        }
        got.sort();
        let mut want = topics.clone();
        want.sort();
        assert_eq!(got, want, "{id}");
    }
    for id in ids_on_shards("exact-", 4) {
        let (c, _) = h.connect(connect(&id, true, 0));
        h.send(c, subscribe("fleet/17/status", QoS::AtMostOnce));
        let got = h.publishes(c);
        assert_eq!(
            got,
            [(
                "fleet/17/status".to_string(),
                Bytes::from_static(b"fleet/17/status"),
                QoS::AtMostOnce,
                true
            )],
            "{id}"
        );
    }
}

/// An answer that arrives after the subscription is gone delivers nothing.
#[test]
fn retained_answer_for_a_dropped_subscription_is_ignored() {
    let mut h = Harness::new(4);
    let (p, _) = h.connect(connect("pub", true, 0));
    for i in 0..20 {
        h.send(
            p,
            publish(&format!("x/{i}"), b"r", QoS::AtMostOnce, true, None),
        );
    }
    let (c, _) = h.connect(connect("quick", true, 0));
    h.hold_mesh = true;
    h.send(c, subscribe("x/#", QoS::AtMostOnce));
    h.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(2),
            filters: vec![TopicFilter::new("x/#").unwrap()],
            properties: None,
        }),
    );
    let local = h.publishes(c).len();
    h.release_mesh(&[0, 1, 2, 3]);
    assert_eq!(
        h.publishes(c),
        [],
        "only the {local} local ones, before the UNSUBSCRIBE"
    );
}

const ACL: &str = "\
topic read public/#
user alice
topic readwrite fleet/#
topic deny fleet/secret/#
pattern write dev/%c/status
";

fn connect_as(client_id: &str, user: &str) -> Connect {
    let mut c = connect(client_id, true, 0);
    c.username = Some(ByteString::from(user));
    c
}

/// With an ACL, each SUBSCRIBE filter gets its own SUBACK code: the granted
/// QoS where a read rule covers it, 0x80 where none does (MQTT-3.9.3).
#[test]
fn acl_refuses_filters_one_by_one_with_suback_0x80_mqtt_3_9_3() {
    let mut h = Harness::with_acl(2, Some(ACL));
    let (alice, _) = h.connect(connect_as("alice-1", "alice"));
    h.send(
        alice,
        subscribe_many(&[
            ("fleet/+/temp", QoS::AtLeastOnce),
            ("#", QoS::AtMostOnce),
            ("fleet/secret/#", QoS::AtMostOnce),
            ("public/news", QoS::ExactlyOnce),
        ]),
    );
    match h.recv(alice).as_slice() {
        [Packet::SubAck(a)] => assert_eq!(a.codes, [1, 0x80, 0x80, 0x80]),
        other => panic!("{other:?}"),
    }
    let (anon, _) = h.connect(connect("anon-1", true, 0));
    h.send(
        anon,
        subscribe_many(&[
            ("public/news", QoS::ExactlyOnce),
            ("fleet/#", QoS::AtMostOnce),
        ]),
    );
    match h.recv(anon).as_slice() {
        [Packet::SubAck(a)] => assert_eq!(a.codes, [2, 0x80]),
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&h.counters.acl_denied), 4);
}

/// Publishes (and wills) the ACL does not allow are acknowledged and
/// dropped; a deny inside a broader grant holds messages back on delivery.
#[test]
fn acl_drops_unwritable_publishes_and_holds_back_denied_deliveries() {
    let mut h = Harness::with_acl(2, Some(ACL));
    let (alice, _) = h.connect(connect_as("alice-1", "alice"));
    h.send(alice, subscribe("fleet/#", QoS::AtMostOnce));
    let _ = h.recv(alice);
    let (dev, _) = h.connect(with_will(
        connect_as("d9", "alice"),
        "fleet/d9/will",
        b"gone",
        false,
    ));
    // alice may write fleet/#, so device d9 (logged in as alice) reaches her.
    h.send(
        dev,
        publish("fleet/1/temp", b"20", QoS::AtLeastOnce, false, Some(3)),
    );
    assert!(matches!(h.recv(dev).as_slice(), [Packet::PubAck(_)]));
    assert_eq!(h.publishes(alice).len(), 1);
    // A secret one is written (alice may write fleet/#... but deny wins).
    h.send(
        dev,
        publish("fleet/secret/k", b"s", QoS::AtLeastOnce, false, Some(4)),
    );
    assert!(
        matches!(h.recv(dev).as_slice(), [Packet::PubAck(_)]),
        "acknowledged anyway"
    );
    assert_eq!(h.publishes(alice), [], "denied: never delivered");
    // An anonymous client may write nothing but its pattern topic.
    let (anon, _) = h.connect(connect("anon-1", true, 0));
    h.send(
        anon,
        publish("fleet/1/temp", b"x", QoS::AtMostOnce, false, None),
    );
    h.send(
        anon,
        publish("dev/anon-1/status", b"ok", QoS::AtMostOnce, false, None),
    );
    assert_eq!(h.publishes(alice), []);
    // The will is alice's to write: it arrives.
    h.drop_socket(dev);
    assert_eq!(h.publishes(alice).len(), 1);
    assert!(get(&h.counters.acl_denied) >= 2);
}

#[test]
fn clients_may_not_publish_or_leave_wills_on_sys_topics() {
    let mut h = Harness::new(4);
    let watcher = subscriber(&mut h, "watcher", "$SYS/#");
    let dollar = subscriber(&mut h, "dollar", "$app/#");
    let (dev, _) = h.connect(with_will(
        connect("dev-sys", true, 0),
        "$SYS/broker/uptime",
        b"0 seconds",
        true,
    ));
    h.send(
        dev,
        publish(
            "$SYS/broker/uptime",
            b"forged",
            QoS::AtLeastOnce,
            true,
            Some(1),
        ),
    );
    assert!(
        matches!(h.recv(dev).as_slice(), [Packet::PubAck(_)]),
        "acknowledged as usual"
    );
    // Other `$` topics are the clients' to use.
    h.send(dev, publish("$app/x", b"ok", QoS::AtMostOnce, false, None));
    assert_eq!(h.publishes(dollar).len(), 1);
    h.drop_socket(dev);
    assert_eq!(h.publishes(watcher), [], "neither the PUBLISH nor the will");
    let late = subscriber(&mut h, "late", "$SYS/broker/uptime");
    assert_eq!(h.publishes(late), [], "nothing retained");
    assert_eq!(get(&h.counters.acl_denied), 2);
}

mod interest;
mod persist;
mod queue_full;
mod v5;

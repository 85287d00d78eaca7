//! `--data-dir` on the harness: acknowledgements wait for the records they
//! promise, on every shard involved, and a restart from what was committed
//! (or from a snapshot, or with another shard count) gives every session,
//! message and retained topic back.

use std::sync::Arc;

use bytes::BytesMut;

use super::*;
use crate::proto::broker::Broker;
use crate::proto::codec::PubResp;
use crate::proto::persist::{self, Recovered};

fn durable(shards: u16) -> Harness {
    Harness::with_config(shards, |c| {
        c.persist = true;
        c.wall_epoch_ms = 1_700_000_000_000;
        c.max_queued = 100;
    })
}

impl Harness {
    /// The shell's end of turn on `shard`: its records go to "disk", then
    /// the broker hears they are durable.
    fn commit(&mut self, shard: usize) {
        if let Some((records, generation)) = self.brokers[shard].take_log() {
            self.disk[shard].extend_from_slice(&records);
            self.brokers[shard].committed(generation);
        }
        self.pump();
    }

    fn commit_all(&mut self) {
        for _ in 0..3 {
            for shard in 0..self.brokers.len() {
                self.commit(shard);
            }
        }
    }

    /// kill -9, then a start with `shards` shards from what each shard
    /// committed (or from a snapshot of each shard's state): records not
    /// committed are lost, every connection is gone.
    fn restart(&mut self, shards: u16, from_snapshot: bool) {
        let mut all = Recovered::default();
        let mut each = Vec::new();
        for (shard, broker) in self.brokers.iter().enumerate() {
            let data = if from_snapshot {
                let mut out = BytesMut::new();
                broker.snapshot(&mut out);
                out
            } else {
                self.disk[shard].clone()
            };
            let scan = persist::scan(&data);
            assert_eq!(scan.tail, None);
            let mut r = Recovered::default();
            for rec in scan.records {
                r.apply(rec);
            }
            each.push(r.clone());
            all.merge(r);
        }
        // The same shard count loads each shard's own files, as the shell
        // does; another one re-homes.
        let parts = if usize::from(shards) == each.len() {
            each
        } else {
            all.split(shards)
        };
        let template = self.brokers[0].config().clone();
        self.counters = Arc::new(Counters::default());
        self.brokers = parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| {
                let mut config = template.clone();
                config.shard = ShardId(i as u16);
                config.shards = shards;
                let mut b = Broker::new(config, self.counters.clone(), self.now);
                b.restore(part, self.now);
                b
            })
            .collect();
        // The new start's logs begin with the state it loaded.
        self.disk = self
            .brokers
            .iter()
            .map(|b| {
                let mut out = BytesMut::new();
                b.snapshot(&mut out);
                out
            })
            .collect();
        self.mesh = (0..shards).map(|_| Default::default()).collect();
        self.inbox.clear();
        self.closed.clear();
        self.versions.clear();
        self.pump();
    }
}

/// A QoS 2 PUBLISH sent again by its client: DUP=1 (MQTT-3.3.1-1).
fn resend_q2(topic: &str, payload: &'static [u8], id: u16) -> Packet {
    match publish(topic, payload, QoS::ExactlyOnce, false, Some(id)) {
        Packet::Publish(mut p) => {
            p.dup = true;
            Packet::Publish(p)
        }
        _ => unreachable!(),
    }
}

/// One shard: "dev", a persistent session subscribed to `cmd/#` at QoS 2
/// (SUBACK durable) and online, and "ctl", a clean publisher.
fn device_and_controller() -> (Harness, Client, Client) {
    let mut h = durable(1);
    let (dev, _) = h.connect(connect("dev", false, 0));
    h.send(dev, subscribe("cmd/#", QoS::ExactlyOnce));
    h.commit_all();
    h.recv(dev);
    let (publ, _) = h.connect(connect("ctl", true, 0));
    (h, dev, publ)
}

fn pubrec(id: PacketId) -> Packet {
    Packet::PubRec(PubResp {
        packet_id: id,
        reason: 0,
        properties: None,
    })
}

fn pubrel(n: u16) -> Packet {
    Packet::PubRel(PubResp {
        packet_id: pid(n),
        reason: 0,
        properties: None,
    })
}

fn acks(packets: &[Packet]) -> Vec<(u8, u16)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some((4, a.packet_id.get())),
            Packet::PubRec(a) => Some((5, a.packet_id.get())),
            Packet::PubComp(a) => Some((7, a.packet_id.get())),
            Packet::SubAck(a) => Some((9, a.packet_id.get())),
            _ => None,
        })
        .collect()
}

/// A persistent subscriber to `filter` (QoS 2), its SUBACK durable, then
/// offline.
fn offline_subscriber(h: &mut Harness, id: &str, filter: &str) {
    let (c, _) = h.connect(connect(id, false, 0));
    h.send(c, subscribe(filter, QoS::ExactlyOnce));
    assert_eq!(acks(&h.recv(c)), [], "SUBACK waits for the session record");
    h.commit_all();
    assert_eq!(acks(&h.recv(c)), [(9, 1)]);
    h.send(c, disconnect());
}

#[test]
fn puback_waits_until_every_shard_that_stored_the_message_has_it_on_disk() {
    let mut h = durable(2);
    let ids = ids_on_shards("p", 2);
    // The publisher on shard 0, the persistent subscriber on shard 1.
    offline_subscriber(&mut h, &ids[1], "cmd/#");
    let (publ, _) = h.connect(connect(&ids[0], true, 0));
    h.send(
        publ,
        publish("cmd/a", b"1", QoS::AtLeastOnce, false, Some(1)),
    );
    assert_eq!(acks(&h.recv(publ)), [], "shard 1 has not written it yet");
    h.commit(0);
    assert_eq!(
        acks(&h.recv(publ)),
        [],
        "the publisher's shard stored nothing"
    );
    h.commit(1);
    assert_eq!(acks(&h.recv(publ)), [(4, 1)], "shard 1 said Stored");
    // Nobody to store it for: acknowledged at once, as without --data-dir.
    h.send(
        publ,
        publish("other", b"2", QoS::AtLeastOnce, false, Some(2)),
    );
    assert_eq!(acks(&h.recv(publ)), [(4, 2)]);
}

#[test]
fn acknowledgements_keep_publish_order_while_one_waits_mqtt_4_6_0_2() {
    let mut h = durable(1);
    offline_subscriber(&mut h, "sub", "stored/#");
    let (publ, _) = h.connect(connect("pub", true, 0));
    h.send(
        publ,
        publish("stored/a", b"1", QoS::AtLeastOnce, false, Some(1)),
    );
    h.send(
        publ,
        publish("free", b"2", QoS::AtLeastOnce, false, Some(2)),
    );
    h.send(
        publ,
        publish("free", b"3", QoS::ExactlyOnce, false, Some(3)),
    );
    assert_eq!(acks(&h.recv(publ)), [], "2 and 3 wait behind 1");
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(4, 1), (4, 2), (5, 3)]);
}

#[test]
fn what_was_acknowledged_survives_a_crash_and_what_was_not_is_not_promised() {
    let mut h = durable(2);
    offline_subscriber(&mut h, "dev-7", "cmd/#");
    let (publ, _) = h.connect(connect("ctl", true, 0));
    for i in 1..=3u16 {
        h.send(
            publ,
            publish("cmd/x", [b'0' + i as u8], QoS::AtLeastOnce, false, Some(i)),
        );
    }
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(4, 1), (4, 2), (4, 3)]);
    h.send(
        publ,
        publish("cmd/x", b"4", QoS::AtLeastOnce, false, Some(4)),
    );
    h.send(
        publ,
        publish("status/x", b"on", QoS::AtLeastOnce, true, Some(5)),
    );
    assert_eq!(acks(&h.recv(publ)), [], "not durable, not acknowledged");
    h.restart(2, false);
    let (dev, ack) = h.connect(connect("dev-7", false, 0));
    assert!(ack.session_present, "MQTT-3.2.2-2: the session is resumed");
    let got = payloads(&h.recv(dev));
    assert_eq!(got, ["1", "2", "3"], "the acknowledged ones, in order");
    let late = subscriber(&mut h, "late", "status/#");
    assert_eq!(
        h.publishes(late),
        [],
        "the unacknowledged retained set is gone"
    );
}

#[test]
fn inflight_messages_are_resent_with_their_ids_after_a_restart_mqtt_4_4_0_1() {
    for from_snapshot in [false, true] {
        let (mut h, dev, publ) = device_and_controller();
        h.send(
            publ,
            publish("cmd/a", b"a", QoS::AtLeastOnce, false, Some(1)),
        );
        h.send(
            publ,
            publish("cmd/b", b"b", QoS::ExactlyOnce, false, Some(2)),
        );
        h.send(
            publ,
            publish("cmd/c", b"c", QoS::ExactlyOnce, false, Some(3)),
        );
        h.commit_all();
        let sent: Vec<(u16, String)> = h
            .recv(dev)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((
                    p.packet_id.unwrap().get(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), 3);
        // b is released (PUBREC came, PUBREL sent); a and c await acks.
        h.send(dev, pubrec(pid(sent[1].0)));
        h.commit_all();
        h.restart(1, from_snapshot);
        let (dev, ack) = h.connect(connect("dev", false, 0));
        assert!(ack.session_present);
        let again: Vec<String> = h
            .recv(dev)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => {
                    assert!(p.dup, "resent with DUP=1");
                    format!(
                        "publish {} {}",
                        p.packet_id.unwrap().get(),
                        String::from_utf8_lossy(&p.payload).into_owned()
                    )
                }
                Packet::PubRel(r) => format!("pubrel {}", r.packet_id.get()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            again,
            [
                format!("publish {} a", sent[0].0),
                format!("pubrel {}", sent[1].0),
                format!("publish {} c", sent[2].0),
            ],
            "in their first order (from_snapshot={from_snapshot})"
        );
    }
}

#[test]
fn a_resent_qos2_publish_after_a_crash_is_not_delivered_twice_mqtt_4_3_3() {
    let mut h = durable(2);
    offline_subscriber(&mut h, "sub", "t");
    let (publ, _) = h.connect(connect("pub", false, 0));
    h.send(
        publ,
        publish("t", b"once", QoS::ExactlyOnce, false, Some(9)),
    );
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 9)]);
    h.restart(2, false);
    // The publisher never saw the PUBREC: it resends the PUBLISH.
    let (publ, ack) = h.connect(connect("pub", false, 0));
    assert!(ack.session_present);
    let again = resend_q2("t", b"once", 9);
    h.send(publ, again);
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 9)]);
    h.send(publ, pubrel(9));
    h.commit_all();
    assert_eq!(
        acks(&h.recv(publ)),
        [(7, 9)],
        "PUBCOMP once the id is free on disk"
    );
    let (sub, _) = h.connect(connect("sub", false, 0));
    assert_eq!(payloads(&h.recv(sub)), ["once"], "exactly once");
    h.restart(2, false);
    // The id is free again after a restart: a new message with it is new.
    let (publ, _) = h.connect(connect("pub", false, 0));
    h.send(
        publ,
        publish("t", b"next", QoS::ExactlyOnce, false, Some(9)),
    );
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 9)]);
    let (sub, _) = h.connect(connect("sub", false, 0));
    let got = payloads(&h.recv(sub));
    assert_eq!(got.last().map(String::as_str), Some("next"));
}

#[test]
fn sessions_and_retained_topics_are_rehomed_to_a_new_shard_count() {
    let mut h = durable(3);
    let ids: Vec<String> = (0..12).map(|i| format!("dev-{i}")).collect();
    for id in &ids {
        offline_subscriber(&mut h, id, &format!("cmd/{id}"));
    }
    let (publ, _) = h.connect(connect("ctl", true, 0));
    for (i, id) in ids.iter().enumerate() {
        let n = i as u16 + 1;
        h.send(
            publ,
            publish(&format!("cmd/{id}"), id, QoS::AtLeastOnce, false, Some(n)),
        );
        h.send(
            publ,
            publish(&format!("st/{id}"), id, QoS::AtMostOnce, true, None),
        );
    }
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)).len(), ids.len());
    for shards in [2, 1, 4] {
        h.restart(shards, false);
        let watcher = subscriber(&mut h, "watch", "st/#");
        assert_eq!(h.publishes(watcher).len(), ids.len(), "{shards} shards");
        for id in &ids {
            let (c, ack) = h.connect(connect(id, false, 0));
            assert!(ack.session_present, "{id} with {shards} shards");
            assert_eq!(
                payloads(&h.recv(c)),
                [id.as_str()],
                "{id} with {shards} shards"
            );
            // Not acknowledged: resent after every restart.
            h.drop_socket(c);
        }
        h.commit_all();
    }
}

#[test]
fn the_will_of_a_client_connected_at_the_crash_goes_out_once_unless_it_returns() {
    let mut h = durable(2);
    let (watch, _) = h.connect(connect("watch", false, 0));
    h.send(watch, subscribe("wills/#", QoS::AtLeastOnce));
    h.commit_all();
    h.recv(watch);
    h.send(watch, disconnect());
    // QoS 1 wills: the watcher is offline, its session queues them.
    for id in ["dev", "back"] {
        let mut c = with_will(
            connect(id, false, 0),
            &format!("wills/{id}"),
            b"gone",
            false,
        );
        c.will.as_mut().unwrap().qos = QoS::AtLeastOnce;
        h.connect(c);
    }
    h.commit_all();
    h.restart(2, false);
    // "back" reconnects before the first tick: MQTT-3.1.3-9.
    let (_back, connack) = h.connect(connect("back", false, 0));
    assert!(connack.session_present);
    h.advance(1000);
    h.commit_all();
    let (watch, _) = h.connect(connect("watch", false, 0));
    let got = h.recv(watch);
    assert_eq!(
        payloads(&got),
        ["gone"],
        "once, and not for the client that came back"
    );
    assert!(matches!(&got[0], Packet::Publish(p) if p.topic.as_str() == "wills/dev"));
    ack(&mut h, watch, &got);
    h.commit_all();
    // Published and recorded as such: a second restart sends it no more.
    h.restart(2, false);
    h.advance(1000);
    let (watch, _) = h.connect(connect("watch", false, 0));
    h.advance(1000);
    assert_eq!(h.publishes(watch), []);
}

#[test]
fn without_data_dir_nothing_is_logged_and_nothing_waits() {
    let mut h = Harness::new(2);
    let (sub, _) = h.connect(connect("sub", false, 0));
    h.send(sub, subscribe("t", QoS::AtLeastOnce));
    assert_eq!(acks(&h.recv(sub)), [(9, 1)]);
    h.send(sub, disconnect());
    let (publ, _) = h.connect(connect("pub", false, 0));
    h.send(publ, publish("t", b"x", QoS::AtLeastOnce, true, Some(1)));
    assert_eq!(acks(&h.recv(publ)), [(4, 1)]);
    for b in &mut h.brokers {
        assert!(b.take_log().is_none());
    }
}

#[test]
fn clean_sessions_write_nothing() {
    let mut h = durable(1);
    for i in 0..20 {
        let (c, _) = h.connect(connect(&format!("c{i}"), true, 0));
        h.send(c, subscribe("t/#", QoS::AtLeastOnce));
        h.send(c, publish("t/x", b"x", QoS::AtLeastOnce, false, Some(1)));
        h.send(c, disconnect());
    }
    assert!(h.brokers[0].take_log().is_none());
}

/// The publisher's shard wrote its copy and the packet id's record; the
/// other shard's copy was not on disk yet when the process died. The
/// resent PUBLISH must reach that shard's subscriber, and only it.
#[test]
fn a_cross_shard_qos2_cut_by_a_crash_is_completed_by_the_resend_exactly_once_mqtt_4_3_3() {
    let mut h = durable(2);
    let ids = ids_on_shards("x", 2);
    let subs = ids_on_shards("s", 2);
    offline_subscriber(&mut h, &subs[0], "t");
    offline_subscriber(&mut h, &subs[1], "t");
    let (publ, _) = h.connect(connect(&ids[0], false, 0));
    h.send(
        publ,
        publish("t", b"once", QoS::ExactlyOnce, false, Some(7)),
    );
    h.commit(0);
    assert_eq!(acks(&h.recv(publ)), [], "shard 1 has not said Stored");
    h.restart(2, false);
    let (publ, ack) = h.connect(connect(&ids[0], false, 0));
    assert!(ack.session_present);
    let again = resend_q2("t", b"once", 7);
    h.send(publ, again.clone());
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 7)]);
    // Once the PUBREC was due, a further resend is not routed again.
    h.send(publ, again);
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 7)]);
    for id in &subs {
        let (c, _) = h.connect(connect(id, false, 0));
        assert_eq!(payloads(&h.recv(c)), ["once"], "{id}: exactly once");
    }
    h.send(publ, pubrel(7));
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(7, 7)]);
    for b in &h.brokers {
        let mut snap = BytesMut::new();
        b.snapshot(&mut snap);
        let mut r = Recovered::default();
        persist::scan_each(&snap, |rec| r.apply(rec));
        assert!(
            r.applied.is_empty(),
            "the flow's id is forgotten everywhere"
        );
    }
}

/// The client reconnects and resends while its PUBREC still waits for the
/// other shard: the resend waits too, and nothing is delivered twice.
#[test]
fn a_resend_while_the_pubrec_waits_is_not_delivered_twice() {
    let mut h = durable(2);
    let ids = ids_on_shards("y", 2);
    let subs = ids_on_shards("z", 2);
    offline_subscriber(&mut h, &subs[1], "t");
    let watcher = subscriber(&mut h, &subs[0], "t");
    let (publ, _) = h.connect(connect(&ids[0], false, 0));
    h.send(publ, publish("t", b"one", QoS::ExactlyOnce, false, Some(3)));
    h.commit(0);
    let (publ, _) = h.connect(connect(&ids[0], false, 0));
    let again = resend_q2("t", b"one", 3);
    h.send(publ, again);
    h.commit(0);
    assert_eq!(acks(&h.recv(publ)), [], "shard 1's copy is not durable yet");
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 3)]);
    assert_eq!(
        payloads(&h.recv(watcher)),
        ["one"],
        "the online subscriber: once"
    );
    let (c, _) = h.connect(connect(&subs[1], false, 0));
    assert_eq!(payloads(&h.recv(c)), ["one"], "the offline one: once");
}

/// The PUBREL to a persistent subscriber goes out only once the record of
/// its PUBREC is durable: a crash before that sends the PUBLISH again (the
/// client, which got no PUBREL, still holds it), a crash after it sends the
/// PUBREL again, never the PUBLISH, which a client that completed the flow
/// would take as a new message (MQTT-4.3.3-2, MQTT-4.4.0-1).
#[test]
fn the_pubrel_to_a_subscriber_waits_for_its_record_mqtt_4_3_3() {
    for crash_before_commit in [true, false] {
        let (mut h, dev, publ) = device_and_controller();
        h.send(
            publ,
            publish("cmd/a", b"a", QoS::ExactlyOnce, false, Some(1)),
        );
        h.commit_all();
        let id = match h.recv(dev).as_slice() {
            [Packet::Publish(p)] => p.packet_id.unwrap(),
            other => panic!("{other:?}"),
        };
        h.send(dev, pubrec(id));
        assert_eq!(h.recv(dev), [], "no PUBREL before the record is durable");
        if !crash_before_commit {
            h.commit(0);
            assert_eq!(h.recv(dev), [pubrel(id.get())]);
        }
        h.restart(1, false);
        let (dev, ack) = h.connect(connect("dev", false, 0));
        assert!(ack.session_present);
        match (crash_before_commit, h.recv(dev).as_slice()) {
            (true, [Packet::Publish(p)]) => {
                assert!(p.dup);
                assert_eq!(p.packet_id, Some(id));
            }
            (false, [Packet::PubRel(r)]) => assert_eq!(r.packet_id, id),
            (_, other) => panic!("crash before commit {crash_before_commit}: {other:?}"),
        }
    }
}

/// A persistent client's QoS 2 PUBLISH reaches another shard only once the
/// record of its inbound id (`AwaitRel`) is durable on the publisher's
/// shard: the other shard can never store a copy that a crash leaves
/// without its id. (With the io_uring loop's commits in flight, a copy used
/// to get there first: the crash kept the copy and its `Applied` record,
/// lost the id, and the client's resend, routed under a new one, was
/// stored again: a QoS 2 duplicate, MQTT-4.3.3.)
#[test]
fn a_cross_shard_qos2_copy_waits_for_the_origins_record_of_its_id_mqtt_4_3_3() {
    let mut h = durable(2);
    let ids = ids_on_shards("o", 2);
    let subs = ids_on_shards("w", 2);
    offline_subscriber(&mut h, &subs[1], "t");
    let watcher = subscriber(&mut h, &ids_on_shards("v", 2)[1], "t");
    let (publ, _) = h.connect(connect(&ids[0], false, 0));
    h.commit_all();
    h.send(publ, publish("t", b"q2", QoS::ExactlyOnce, false, Some(9)));
    // Shard 1 commits whatever reached it; the publisher's shard has not.
    h.commit(1);
    assert_eq!(
        payloads(&h.recv(watcher)),
        Vec::<String>::new(),
        "nothing crossed before the id was durable"
    );
    h.restart(2, false);
    let (publ, ack) = h.connect(connect(&ids[0], false, 0));
    assert!(ack.session_present);
    let again = resend_q2("t", b"q2", 9);
    h.send(publ, again);
    h.commit_all();
    assert_eq!(acks(&h.recv(publ)), [(5, 9)]);
    let (c, _) = h.connect(connect(&subs[1], false, 0));
    assert_eq!(payloads(&h.recv(c)), ["q2"], "exactly once");
}

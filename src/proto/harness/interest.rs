//! Interest-routed publishes on the harness: a PUBLISH goes only to the
//! shards with a matching subscription (and to a retained topic's owner),
//! and a SUBACK is sent only once every shard routes to the subscriber, so
//! a publish that follows a SUBACK anywhere is delivered.

use super::*;
use crate::proto::codec::reason;

/// The shards (other than `from`) that hold a PUBLISH in their mesh queue.
fn publish_targets(h: &Harness) -> Vec<usize> {
    (0..h.brokers.len())
        .filter(|&s| h.mesh[s].iter().any(|m| matches!(m, ShardMsg::Publish(_))))
        .collect()
}

#[test]
fn publish_goes_only_to_shards_with_a_matching_subscription() {
    let shards = 4;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("route", shards);
    let _s1 = subscriber(&mut h, &ids[1], "telemetry/+/temp");
    let _s3 = subscriber(&mut h, &ids[3], "cmd/dev-7");
    let (p, _) = h.connect(connect(&ids[0], true, 0));
    h.hold_mesh = true;
    h.send(
        p,
        publish("telemetry/a/temp", "1", QoS::AtMostOnce, false, None),
    );
    assert_eq!(publish_targets(&h), [1], "only shard 1 subscribes to it");
    h.release_mesh(&[0, 1, 2, 3]);
    h.hold_mesh = true;
    h.send(p, publish("cmd/dev-7", "2", QoS::AtMostOnce, false, None));
    assert_eq!(publish_targets(&h), [3]);
    h.release_mesh(&[0, 1, 2, 3]);
    h.hold_mesh = true;
    h.send(
        p,
        publish("nobody/listens", "3", QoS::AtMostOnce, false, None),
    );
    assert!(publish_targets(&h).is_empty());
    h.release_mesh(&[0, 1, 2, 3]);
}

#[test]
fn a_retained_publish_also_reaches_its_topics_owner() {
    let shards = 4;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("ret", shards);
    let (p, _) = h.connect(connect(&ids[0], true, 0));
    // Nobody subscribes: the retained owner must still store it.
    let topic = (0..)
        .map(|i| format!("r/{i}"))
        .find(|t| crate::proto::retained::retained_owner(t, shards).0 == 2)
        .unwrap();
    h.hold_mesh = true;
    h.send(p, publish(&topic, "kept", QoS::AtMostOnce, true, None));
    assert_eq!(publish_targets(&h), [2]);
    h.release_mesh(&[0, 1, 2, 3]);
    let late = subscriber(&mut h, &ids[3], &topic);
    assert_eq!(h.publishes(late).len(), 1, "stored by its owner");
}

#[test]
fn suback_waits_until_every_shard_routes_to_the_subscriber() {
    let shards = 4;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("race", shards);
    let (p, _) = h.connect(connect(&ids[0], true, 0));
    let (s, _) = h.connect(connect(&ids[2], true, 0));
    h.hold_mesh = true;
    h.send(s, subscribe("race/t", QoS::AtMostOnce));
    assert!(
        h.recv(s).is_empty(),
        "no SUBACK before the other shards know the filter"
    );
    // The announcement reaches the other shards; their acknowledgements
    // come back; then the SUBACK.
    h.release_mesh(&[0, 1, 3, 2]);
    match h.recv(s).first() {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, [0]),
        other => panic!("{other:?}"),
    }
    // A publish the moment after the SUBACK, on another shard, arrives.
    h.send(p, publish("race/t", "after", QoS::AtMostOnce, false, None));
    assert_eq!(h.publishes(s).len(), 1);
}

#[test]
fn unsubscribed_and_ended_filters_stop_being_routed() {
    let shards = 3;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("gone", shards);
    let (p, _) = h.connect(connect(&ids[0], true, 0));
    let a = subscriber(&mut h, &ids[1], "g/t");
    let b = subscriber(&mut h, &ids[2], "g/t");
    h.send(
        a,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(2),
            filters: vec![TopicFilter::new("g/t").unwrap()],
            properties: None,
        }),
    );
    h.drop_socket(b);
    h.hold_mesh = true;
    h.send(p, publish("g/t", "x", QoS::AtMostOnce, false, None));
    assert!(publish_targets(&h).is_empty(), "{:?}", publish_targets(&h));
    h.release_mesh(&[0, 1, 2]);
}

#[test]
fn no_matching_subscribers_is_exact_across_shards_mqtt_3_4_2_1() {
    let shards = 4;
    let mut h = Harness::new(shards);
    let ids = ids_on_shards("nm", shards);
    let (p, _) = h.connect(Connect {
        protocol: ProtocolVersion::V5,
        ..connect(&ids[0], true, 0)
    });
    let _s = subscriber(&mut h, &ids[3], "nm/yes");
    h.send(p, publish("nm/no", "1", QoS::AtLeastOnce, false, Some(1)));
    h.send(p, publish("nm/yes", "2", QoS::AtLeastOnce, false, Some(2)));
    let codes: Vec<u8> = h
        .recv(p)
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect();
    assert_eq!(codes, [reason::NO_MATCHING_SUBSCRIBERS, reason::SUCCESS]);
}

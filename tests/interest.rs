//! Interest-routed publishes against the real binary: a PUBLISH goes only
//! to the shards with a matching subscription, yet a subscriber that has
//! its SUBACK gets every PUBLISH sent after it, whichever shard the
//! publisher is on (the subscribe-then-publish race of issue 10).

mod common;

use std::time::Duration;

use common::{Broker, ConnectOpts, RawClient};
use coremq::proto::handshake::owner_of;

const SEC: Duration = Duration::from_secs(1);

/// A clientId owned by each of `shards` shards.
fn ids_on_shards(prefix: &str, shards: u16) -> Vec<String> {
    (0..shards)
        .map(|s| {
            (0..)
                .map(|i| format!("{prefix}-{i}"))
                .find(|id| owner_of(id, shards).0 == s)
                .expect("some id lands on every shard")
        })
        .collect()
}

#[test]
fn publish_right_after_a_suback_on_another_shard_arrives_every_time() {
    let shards = 4;
    let broker = Broker::start(&["--shards", "4"]);
    let port = broker.port();
    let ids = ids_on_shards("race", shards);
    // The publisher on shard 0, fresh subscribers on shards 1..3 in turn,
    // each to a filter no shard knew: its SUBACK must wait for every shard.
    let (mut publ, _) = RawClient::connect(port, &ConnectOpts::id(&ids[0]));
    for round in 0..60 {
        let shard = 1 + round % 3;
        let id = format!("{}-{round}", ids[shard]);
        let id = (0..)
            .map(|i| format!("{id}-{i}"))
            .find(|c| owner_of(c, shards).0 as usize == shard)
            .unwrap();
        let (mut sub, _) = RawClient::connect(port, &ConnectOpts::id(&id));
        let topic = format!("race/{round}/t");
        sub.subscribe(&topic, 0);
        // The instant the SUBACK is in, publish from the other shard.
        publ.publish(&topic, b"after-suback", 0, false);
        sub.expect_publish(&topic, b"after-suback", 5 * SEC);
    }
    broker.assert_no_panic();
}

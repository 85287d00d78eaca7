//! Fuzzes the sans-IO broker: arbitrary bytes from connected clients of
//! every protocol version, on two shards, with time passing.
//!
//! Byte 0 picks the client's version (low two bits: 3.1, 3.1.1, 5.0) and
//! whether a second, 5.0, client subscribed to `#`, `$share/g/#` and an
//! aliasing topic is there to receive (bit 2). The rest is cut into chunks at
//! every 0xFF byte: each chunk is fed to the client's connection as bytes
//! read from its socket, and between chunks the clock moves on 700 ms. The
//! broker must never panic, whatever a client sends, and must leave no
//! connection or session behind once everyone is gone and time has passed.

#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use bytestring::ByteString;
use coremq::metrics::Counters;
use coremq::proto::broker::{Broker, BrokerConfig, Event};
use coremq::proto::codec::{
    Connect, Packet, PacketId, Properties, ProtocolVersion, QoS, Subscribe, SubscriptionOptions,
};
use coremq::proto::handshake::owner_of;
use coremq::proto::topic::TopicFilter;
use coremq::proto::{ConnId, Millis, ShardId};
use libfuzzer_sys::fuzz_target;

struct World {
    brokers: Vec<Broker>,
    now: Millis,
}

impl World {
    /// Plays the shell: drops what is sent, releases what is closed,
    /// carries messages between the shards.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            for shard in 0..self.brokers.len() {
                while let Some(event) = self.brokers[shard].poll_event() {
                    progressed = true;
                    match event {
                        Event::Transmit(conn) => {
                            self.brokers[shard].take_outgoing(conn);
                        }
                        Event::Close(conn) => {
                            self.brokers[shard].take_outgoing(conn);
                            self.brokers[shard].release(conn);
                        }
                        Event::Broadcast(msg) => {
                            let other = 1 - shard;
                            self.brokers[other].handle_remote(msg, self.now);
                        }
                        Event::SendTo(peer, msg) => {
                            self.brokers[usize::from(peer.0)].handle_remote(msg, self.now);
                        }
                        // This shell keeps no bytes a held connection left
                        // unread (each input is fed once): nothing to resume.
                        Event::Resume(_) => {}
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn connect(&mut self, c: Connect) -> (usize, ConnId) {
        let shard = owner_of(&c.client_id, 2).0 as usize;
        let conn = self.brokers[shard].connect(c, self.now);
        self.pump();
        (shard, conn)
    }

    fn feed(&mut self, (shard, conn): (usize, ConnId), bytes: &[u8]) {
        let mut buf = BytesMut::from(bytes);
        self.brokers[shard].handle_read(conn, &mut buf, self.now);
        self.pump();
    }

    fn advance(&mut self, ms: u64) {
        let end = self.now.0 + ms;
        while self.now.0 < end {
            self.now = Millis((self.now.0 + 100).min(end));
            for b in &mut self.brokers {
                b.tick(self.now);
            }
            self.pump();
        }
    }
}

fn connect(version: ProtocolVersion, id: &str, expiry: u32) -> Connect {
    Connect {
        protocol: version,
        // 3.x: a clean session, so it ends with the connection; 5.0: a
        // session that outlives it by `expiry` seconds.
        clean_start: !version.is_v5(),
        keep_alive: 2,
        client_id: ByteString::from(id),
        will: None,
        username: None,
        password: None,
        properties: version.is_v5().then(|| {
            Box::new(Properties {
                session_expiry_interval: Some(expiry),
                topic_alias_maximum: Some(2),
                receive_maximum: Some(3),
                maximum_packet_size: Some(200),
                ..Properties::default()
            })
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let version = match sel & 0b11 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let counters = Arc::new(Counters::default());
    let brokers = (0..2)
        .map(|i| {
            let mut config = BrokerConfig::new(ShardId(i), 2);
            config.max_packet_size = 4096;
            config.max_topic_alias = 4;
            config.receive_maximum = 4;
            // A DISCONNECT may ask for any expiry: keep the end in sight.
            config.max_session_expiry = 5;
            Broker::new(config, counters.clone(), Millis(0))
        })
        .collect();
    let mut w = World {
        brokers,
        now: Millis(0),
    };
    if sel & 0b100 != 0 {
        let watcher = w.connect(connect(ProtocolVersion::V5, "watcher", 3));
        let filters = ["#", "$share/g/#", "a/+"]
            .iter()
            .map(|f| {
                let mut o = SubscriptionOptions::qos(QoS::ExactlyOnce);
                o.retain_as_published = true;
                (TopicFilter::new(f.to_string()).expect("valid"), o)
            })
            .collect();
        let mut out = BytesMut::new();
        Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).expect("1"),
            filters,
            properties: Some(Box::new(Properties {
                subscription_identifiers: vec![5],
                ..Properties::default()
            })),
        })
        .encode(ProtocolVersion::V5, &mut out);
        w.feed(watcher, &out);
    }
    let client = w.connect(connect(version, "fuzzed", 1));
    for chunk in rest.split(|&b| b == 0xff) {
        w.feed(client, chunk);
        w.advance(700);
    }
    // Everyone gone: after every expiry and keep-alive, nothing is left.
    for b in &mut w.brokers {
        b.close_all(w.now);
    }
    w.pump();
    w.advance(10_000);
    for b in &w.brokers {
        assert_eq!(b.connection_count(), 0);
        assert_eq!(b.session_count(), 0, "sessions outlived their expiry");
    }
});

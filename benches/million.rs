//! A million connections, simulated: one shard's sans-IO broker driven with
//! N connected clients, without sockets (this machine holds ~19,900), to
//! show the broker's side of fleet scale.
//!
//! Each client's CONNECT (keep-alive 60, clean, a 3.1.1 or 5.0 client in
//! turn) and SUBSCRIBE (its own command topic, and for one in a hundred a
//! fleet-wide broadcast topic) go through the real codec: bytes in, as a
//! socket read would hand them over. Reported:
//!
//! - the broker's heap bytes per connection (allocations counted by a
//!   global allocator wrapper: the broker's own state, not the kernel's
//!   sockets, not the shell's epoll or buffers);
//! - an idle tick (nothing due), and the tick at which every connection's
//!   keep-alive comes due after all of them pinged (each is re-filed);
//! - a takeover (a new CONNECT for a connected clientId), a PUBLISH to one
//!   device, and a PUBLISH to the broadcast topic (N / 100 deliveries).
//!
//! `cargo bench --bench million` runs 1,000,000 clients; set
//! `COREMQ_MILLION=10000000` for ten million. Without `--bench` (as
//! `cargo test --all-targets` runs it) it is a smoke run of 20,000.
//! Figures and context: BENCHMARKS.md, "A million connections, simulated".

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use coremq::metrics::Counters;
use coremq::proto::broker::{Broker, BrokerConfig, Event};
use coremq::proto::codec::{
    self, Connect, Packet, PacketId, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};
use coremq::proto::{ConnId, Millis, ShardId};

#[path = "support/fleet.rs"]
mod fleet;
use fleet::{client_id, encode, version};

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

fn command_topic(i: u32) -> String {
    format!("fleet/r{}/dev-{i:08}/cmd", i % 1000)
}

fn connect_bytes(i: u32) -> BytesMut {
    encode(
        &Packet::Connect(Box::new(Connect {
            protocol: version(i),
            clean_start: true,
            keep_alive: 60,
            client_id: ByteString::from(client_id(i)),
            will: None,
            username: None,
            password: None,
            properties: None,
        })),
        version(i),
    )
}

fn subscribe_bytes(i: u32) -> BytesMut {
    let mut filters = vec![(
        TopicFilter::new(command_topic(i)).expect("valid"),
        SubscriptionOptions::qos(QoS::AtLeastOnce),
    )];
    if i % 100 == 0 {
        filters.push((
            TopicFilter::new("fleet/broadcast".to_string()).expect("valid"),
            SubscriptionOptions::qos(QoS::AtMostOnce),
        ));
    }
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).expect("1"),
            filters,
            properties: None,
        }),
        version(i),
    )
}

/// Carries out the broker's events as a shell would, without sockets:
/// what it writes is dropped, what it closes is released.
fn drain(b: &mut Broker) {
    while let Some(e) = b.poll_event() {
        match e {
            Event::Transmit(c) => {
                b.take_outgoing(c);
            }
            Event::Close(c) => {
                b.take_outgoing(c);
                b.release(c);
            }
            // One shard, and no full queues: reads are never held.
            Event::Broadcast(_) | Event::SendTo(..) | Event::Resume(_) => {}
        }
    }
}

/// Decodes a CONNECT from its bytes, as the handshake does.
fn decode_connect(mut bytes: BytesMut) -> Connect {
    match codec::decode(&mut bytes, ProtocolVersion::V3_1_1, usize::MAX) {
        Ok(Some(Packet::Connect(c))) => *c,
        other => panic!("not a CONNECT: {other:?}"),
    }
}

fn per(d: std::time::Duration, n: u64) -> String {
    let ns = d.as_nanos() as f64 / n.max(1) as f64;
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u32 = if full {
        std::env::var("COREMQ_MILLION")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    } else {
        20_000
    };
    let counters = Arc::new(Counters::default());
    let before = counting::live();
    let mut b = Broker::new(BrokerConfig::new(ShardId(0), 1), counters, Millis(0));
    let mut now = Millis(0);

    // Connect everyone over 10 s of the broker's clock (100 ticks of
    // 100 ms; at least 10,000 connects a tick), then subscribe everyone.
    let per_tick = (n / 100).max(10_000);
    let mut conns: Vec<ConnId> = Vec::with_capacity(n as usize);
    let table = std::mem::size_of_val(conns.spare_capacity_mut());
    let start = Instant::now();
    for i in 0..n {
        let id = b.connect(decode_connect(connect_bytes(i)), now);
        drain(&mut b);
        conns.push(id);
        if i % per_tick == per_tick - 1 {
            now = Millis(now.0 + 100);
            b.tick(now);
            drain(&mut b);
        }
    }
    let connecting = start.elapsed();
    // The broker's clock at the end of the ramp: deadlines run from 90 s to
    // 90 s plus this.
    let ramp_end = now;
    let connected = counting::live() - before - table;
    let start = Instant::now();
    for (i, &id) in conns.iter().enumerate() {
        b.handle_read(id, &mut subscribe_bytes(i as u32), now);
        drain(&mut b);
    }
    let subscribing = start.elapsed();
    let subscribed = counting::live() - before - table;
    assert_eq!(b.connection_count(), n as usize);
    let per_conn = |bytes: usize| bytes / n as usize;
    println!("{n} connections on one shard (half 3.1.1, half 5.0; keep-alive 60; 1 or 2 subscriptions each)");
    println!(
        "  CONNECT through the codec: {} each ({:.0} per second); SUBSCRIBE: {} each",
        per(connecting, u64::from(n)),
        f64::from(n) / connecting.as_secs_f64(),
        per(subscribing, u64::from(n))
    );
    println!(
        "  broker heap: {:.1} MiB connected ({} bytes per connection: connection, session, wheel entry), \
         {:.1} MiB subscribed ({} bytes per connection: + its own filter, in the session and the trie)",
        connected as f64 / (1 << 20) as f64,
        per_conn(connected),
        subscribed as f64 / (1 << 20) as f64,
        per_conn(subscribed)
    );

    // An idle tick: nothing is due for a minute.
    now = Millis(now.0 + 100);
    let t = Instant::now();
    b.tick(now);
    println!("  idle tick: {}", per(t.elapsed(), 1));

    // Everyone pings at 60 s; at 90 s + their connect time every entry
    // comes due, is found alive and re-filed.
    let ping = Bytes::from_static(b"\xc0\x00");
    now = Millis(60_000);
    for &c in &conns {
        b.handle_read(c, &mut BytesMut::from(&ping[..]), now);
    }
    drain(&mut b);
    let mut due_ticks = std::time::Duration::ZERO;
    let end = Millis(90_000 + ramp_end.0 + 200);
    let mut t_now = Millis(89_900);
    while t_now < end {
        t_now = Millis(t_now.0 + 100);
        let t = Instant::now();
        b.tick(t_now);
        due_ticks += t.elapsed();
        drain(&mut b);
    }
    assert_eq!(b.connection_count(), n as usize, "nobody may expire");
    println!(
        "  ticks re-filing all {n} pinged connections: {} in total, {} per connection",
        per(due_ticks, 1),
        per(due_ticks, u64::from(n))
    );
    now = t_now;

    // PUBLISH to one device's command topic, QoS 1.
    let rounds = 10_000u32.min(n);
    let t = Instant::now();
    for k in 0..rounds {
        let i = (k * 7919) % n;
        let publ = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicName::new(command_topic(i)).expect("valid"),
            packet_id: None,
            payload: Bytes::from_static(b"reboot"),
            properties: None,
        });
        let from = conns[((k + 1) % n) as usize];
        b.handle_read(from, &mut encode(&publ, version(k + 1)), now);
        drain(&mut b);
    }
    println!(
        "  PUBLISH to one device (decode, match among {} filters, deliver): {}",
        n + n / 100,
        per(t.elapsed(), u64::from(rounds))
    );

    // PUBLISH to the broadcast topic: n / 100 deliveries.
    let broadcast = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicName::new("fleet/broadcast".to_string()).expect("valid"),
        packet_id: None,
        payload: Bytes::from_static(&[0x5a; 64]),
        properties: None,
    });
    let t = Instant::now();
    b.handle_read(conns[1], &mut encode(&broadcast, version(1)), now);
    drain(&mut b);
    let d = t.elapsed();
    println!(
        "  PUBLISH to fleet/broadcast: {} for {} deliveries ({} each)",
        per(d, 1),
        n / 100,
        per(d, u64::from(n / 100).max(1))
    );

    // Takeovers: a new CONNECT for a connected clientId closes the old one
    // (its session is clean, so the new connection starts afresh).
    let rounds = 10_000u32.min(n);
    let t = Instant::now();
    for k in 0..rounds {
        let i = (k * 104_729) % n;
        let id = b.connect(decode_connect(connect_bytes(i)), now);
        drain(&mut b);
        conns[i as usize] = id;
    }
    println!(
        "  takeover (close the old connection, new session, CONNACK): {}",
        per(t.elapsed(), u64::from(rounds))
    );
    assert_eq!(b.connection_count(), n as usize);
}

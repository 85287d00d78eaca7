//! Codec micro-benchmarks: decode and encode of the packets a broker sees
//! most (CONNECT, PUBLISH 64 B / 1 KiB at QoS 0 and 1, SUBSCRIBE).
//!
//! What a decode iteration includes: reading the fixed header, the size
//! check, `split_to` + `freeze` of the packet off the read buffer, every
//! validation, building the `Packet`, and dropping it (the atomic decrements
//! of its `Bytes` slices; a CONNECT also frees its `Box`, a SUBSCRIBE its
//! `Vec`). What it excludes: filling the read buffer. Like a connection after
//! a `recv`, the buffer holds many packets back to back (up to 64 KiB of
//! them) and is decoded to the end; refilling it is outside the timing. The
//! buffer is in `bytes`' shared mode, as a connection's read buffer is from
//! its second packet on, so no iteration pays the one-off promotion.
//!
//! An encode iteration writes into a cleared, already-sized `BytesMut`, as a
//! connection's write buffer is reused; `encoded_len` (one pass over the
//! packet to size it) is included.
//!
//! Allocations go to mimalloc, the broker's global allocator.
//!
//! Run: `cargo bench --bench codec`. Record the commit, `uname -r`, the CPU
//! and its load next to any numbers you quote.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use criterion::{criterion_group, criterion_main, Criterion};

use coremq::proto::codec::{
    decode, Connect, Packet, PacketId, ProtocolVersion, Publish, QoS, Subscribe,
    SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};

// The broker runs on mimalloc (src/main.rs); a CONNECT's `Box` and a
// SUBSCRIBE's `Vec` come from it there, so they do here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const V: ProtocolVersion = ProtocolVersion::V3_1_1;
const MAX: usize = 1 << 20;

fn connect() -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: V,
        clean_start: true,
        keep_alive: 60,
        client_id: ByteString::from_static("sensor-0042-7f3a9c"),
        will: None,
        username: Some(ByteString::from_static("fleet-device")),
        password: Some(Bytes::from_static(b"s3cr3t-t0ken-0042")),
        properties: None,
    }))
}

fn publish(len: usize, qos: QoS) -> Packet {
    let mut p = Publish::new(
        TopicName::new("fleet/eu-west/sensor-0042/telemetry").expect("valid topic"),
        vec![0x5a; len],
    );
    p.qos = qos;
    p.packet_id = (qos != QoS::AtMostOnce).then(|| PacketId::new(42).expect("non-zero"));
    Packet::Publish(p)
}

fn subscribe() -> Packet {
    let f = |s: &'static str| TopicFilter::new(s).expect("valid filter");
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(7).expect("non-zero"),
        filters: vec![
            (
                f("fleet/eu-west/+/cmd"),
                SubscriptionOptions::qos(QoS::AtLeastOnce),
            ),
            (
                f("fleet/broadcast/#"),
                SubscriptionOptions::qos(QoS::AtMostOnce),
            ),
            (
                f("$SYS/broker/uptime"),
                SubscriptionOptions::qos(QoS::AtMostOnce),
            ),
        ],
        properties: None,
    })
}

fn cases() -> Vec<(&'static str, Packet)> {
    vec![
        ("connect_v311", connect()),
        ("publish_qos0_64B", publish(64, QoS::AtMostOnce)),
        ("publish_qos1_64B", publish(64, QoS::AtLeastOnce)),
        ("publish_qos0_1KiB", publish(1024, QoS::AtMostOnce)),
        ("publish_qos1_1KiB", publish(1024, QoS::AtLeastOnce)),
        ("subscribe_3_filters", subscribe()),
    ]
}

/// A read buffer holding `n` copies of `wire`, already in shared mode.
fn read_buffer(wire: &[u8], n: u64) -> BytesMut {
    let mut buf = BytesMut::with_capacity(wire.len() * n as usize);
    for _ in 0..n {
        buf.extend_from_slice(wire);
    }
    drop(buf.split_to(0));
    buf
}

fn bench(c: &mut Criterion) {
    let cases = cases();
    let mut g = c.benchmark_group("decode");
    for (name, p) in &cases {
        let mut wire = BytesMut::new();
        p.encode(V, &mut wire);
        assert_eq!(
            decode(&mut read_buffer(&wire, 1), V, MAX),
            Ok(Some(p.clone()))
        );
        let per_fill = (64 * 1024 / wire.len()).max(1) as u64;
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(per_fill);
                    let mut buf = read_buffer(&wire, n);
                    let start = Instant::now();
                    for _ in 0..n {
                        black_box(decode(black_box(&mut buf), V, MAX).expect("valid packet"));
                    }
                    total += start.elapsed();
                    left -= n;
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("encode");
    for (name, p) in &cases {
        let mut out = BytesMut::with_capacity(4096);
        g.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                black_box(p).encode(V, &mut out);
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);

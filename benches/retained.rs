//! Retained store benchmarks at fleet scale: memory per retained topic with
//! 100,000 and 1,000,000 topics, and the cost of storing, replacing, exact
//! lookups and wildcard walks.
//!
//! Topics are `fleet/{region}/{device}/status` (10 regions) with a 64-byte
//! payload, the "last known state" pattern retained messages are used for.
//! Memory is counted by a wrapping allocator: every heap byte the store
//! holds (tree nodes, maps, the topic and payload copies), divided by the
//! topics in it. The store is one shard's: with several shards each topic
//! lives on exactly one of them, so the process total is the same.
//!
//! `cargo bench --bench retained`; run without `--bench` (as `cargo test
//! --all-targets` does) it builds the 100,000 set only and checks it.

use bytes::Bytes;
use coremq::proto::codec::QoS;
use coremq::proto::retained::{RetainedMessage, RetainedStore};
use coremq::proto::topic::{TopicFilter, TopicName};
use criterion::{criterion_group, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

const REGIONS: u32 = 10;
const PAYLOAD: &[u8; 64] =
    b"{\"state\":\"online\",\"fw\":\"4.2.1\",\"rssi\":-67,\"battery\":88,\"t\":9999}";

fn status(region: u32, device: u32) -> RetainedMessage {
    RetainedMessage {
        topic: TopicName::new(format!("fleet/r{region}/dev{device:07}/status")).unwrap(),
        // A fresh buffer, as a decoded packet's payload would be.
        payload: Bytes::copy_from_slice(PAYLOAD),
        qos: QoS::AtLeastOnce,
        props: None,
        expires_at: None,
    }
}

/// Builds a store of `n` topics; prints its memory and build rate.
fn build(n: u32) -> RetainedStore {
    let before = counting::live();
    let start = Instant::now();
    let mut store = RetainedStore::default();
    for d in 0..n {
        store.set(status(d % REGIONS, d / REGIONS));
    }
    let took = start.elapsed();
    let bytes = counting::live() - before;
    println!(
        "retained: {n} topics, {} heap bytes ({:.0} B per topic, {} of it payload), \
         stored at {:.0} ns per set",
        bytes,
        bytes as f64 / f64::from(n),
        PAYLOAD.len(),
        took.as_nanos() as f64 / f64::from(n)
    );
    assert_eq!(store.len(), n as usize);
    store
}

fn bench(c: &mut Criterion) {
    for n in [100_000u32, 1_000_000] {
        let mut store = build(n);
        let per_region = n / REGIONS;
        let mut g = c.benchmark_group(format!("retained_{n}"));
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(3));
        let exact = TopicFilter::new(format!("fleet/r3/dev{:07}/status", per_region / 2)).unwrap();
        g.bench_function("exact_filter", |b| {
            b.iter(|| {
                let mut hits = 0;
                store.for_each_match(black_box(&exact), |_| hits += 1);
                assert_eq!(hits, 1);
            })
        });
        let one_device = TopicFilter::new(format!("fleet/+/dev{:07}/#", per_region / 3)).unwrap();
        g.bench_function("wildcard_one_device_all_regions", |b| {
            b.iter(|| {
                let mut hits = 0;
                store.for_each_match(black_box(&one_device), |_| hits += 1);
                assert_eq!(hits, REGIONS);
            })
        });
        let region = TopicFilter::new("fleet/r7/+/status".to_string()).unwrap();
        g.sample_size(10);
        g.bench_function("wildcard_whole_region", |b| {
            b.iter(|| {
                let mut hits = 0u32;
                store.for_each_match(black_box(&region), |_| hits += 1);
                assert_eq!(hits, per_region);
            })
        });
        g.sample_size(100);
        let mut d = 0u32;
        g.bench_function("replace_existing", |b| {
            b.iter(|| {
                d = (d + 7919) % n;
                store.set(status(d % REGIONS, d / REGIONS));
            })
        });
        g.finish();
        drop(store);
    }
}

criterion_group!(benches, bench);

fn main() {
    // `cargo test --all-targets` runs benches without `--bench`: build the
    // smaller set, check what it should, and stop.
    if !std::env::args().any(|a| a == "--bench") {
        let store = build(100_000);
        let mut hits = 0;
        let f = TopicFilter::new("fleet/r1/+/status".to_string()).unwrap();
        store.for_each_match(&f, |_| hits += 1);
        assert_eq!(hits, 10_000);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

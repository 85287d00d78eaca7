//! Subscription trie benchmarks: matching against 100,000 filters, and the
//! cost of subscribe / unsubscribe.
//!
//! The filter set is a fleet: 10 regions × 9,000 devices each subscribed to
//! its own `fleet/{region}/{device}/cmd`, 5,000 `fleet/{region}/{device}/#`,
//! 4,000 dashboards on the 10 `fleet/{region}/+/status` filters (400
//! subscribers each), 900 `fleet/+/{device}/cmd`, and 100 service
//! subscriptions (`fleet/{region}/+/cmd`, `fleet/#`, `+/+/+/cmd`, `$SYS/#`).
//! A `cmd` topic then matches about 5.5 subscriptions, a `status` topic
//! about 403 (the fan-out case). Target: ≤ 1 µs per match.
//!
//! Context is printed at start (filters, nodes, heap bytes per filter).
//!
//! Recorded when this file was committed (branch `trie`): AMD EPYC, 2 cores
//! shared with three other builds, kernel 6.18, rustc 1.95, bench profile,
//! no tuning, no baseline beside it; criterion medians:
//!
//! | bench                                   | time     |
//! |-----------------------------------------|----------|
//! | for_each_match/cmd (≈5.5 hits)          | 198 ns   |
//! | collect_matches/cmd                     | 225 ns   |
//! | collect_matches/status_fanout_400       | 3.9 µs   |
//! | has_match/hit                           | 18 ns    |
//! | has_match/miss                          | 36 ns    |
//! | subscribe+unsubscribe/new_filter        | 402 ns   |
//! | subscribe/replace_existing              | 181 ns   |
//! | subscribe+unsubscribe/existing, new key | 253 ns   |
//!
//! Memory: 337 heap bytes per filter (95,747 filters, 182,216 nodes).

use coremq::proto::topic::trie::SubscriptionTrie;
use coremq::proto::topic::{TopicFilter, TopicName};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

const REGIONS: u32 = 10;
const DEVICES_PER_REGION: u32 = 10_000;

/// A small deterministic generator, so runs are comparable.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

fn filter(s: String) -> TopicFilter {
    TopicFilter::new(s).expect("bench filters are valid")
}
fn topic(s: String) -> TopicName {
    TopicName::new(s).expect("bench topics are valid")
}

/// 100,000 `(filter, key, qos)` subscriptions of the mix in the module docs.
fn fleet() -> Vec<(TopicFilter, u32, u8)> {
    let mut v = Vec::with_capacity(100_000);
    let mut key = 0u32;
    for r in 0..REGIONS {
        for d in 0..9_000 {
            v.push((filter(format!("fleet/r{r}/d{d}/cmd")), key, 1));
            key += 1;
        }
    }
    let mut rng = Lcg(7);
    for _ in 0..5_000 {
        let (r, d) = (rng.next() % REGIONS, rng.next() % DEVICES_PER_REGION);
        v.push((filter(format!("fleet/r{r}/d{d}/#")), key, 0));
        key += 1;
    }
    for i in 0..4_000 {
        v.push((filter(format!("fleet/r{}/+/status", i % REGIONS)), key, 1));
        key += 1;
    }
    for _ in 0..900 {
        let d = rng.next() % DEVICES_PER_REGION;
        v.push((filter(format!("fleet/+/d{d}/cmd")), key, 2));
        key += 1;
    }
    // 100 service subscriptions: a command listener per region, two
    // archivers on everything, one auditor, and monitoring on `$SYS`.
    for r in 0..REGIONS {
        v.push((filter(format!("fleet/r{r}/+/cmd")), key, 1));
        key += 1;
    }
    for f in ["fleet/#", "fleet/#", "+/+/+/cmd"] {
        v.push((filter(f.to_string()), key, 0));
        key += 1;
    }
    for _ in 0..87 {
        v.push((filter("$SYS/#".to_string()), key, 0));
        key += 1;
    }
    v
}

fn bench(c: &mut Criterion) {
    let subs = fleet();
    let before = counting::live();
    let mut trie = SubscriptionTrie::new();
    for (f, k, q) in &subs {
        trie.subscribe(f, *k, *q);
    }
    let bytes = counting::live() - before;
    println!(
        "trie: {} subscriptions, {} filters, {} nodes, {} heap bytes = {:.0} B/filter, {:.0} B/subscription",
        trie.len(),
        trie.filter_count(),
        trie.node_count(),
        bytes,
        bytes as f64 / trie.filter_count() as f64,
        bytes as f64 / trie.len() as f64,
    );

    let mut rng = Lcg(42);
    let cmd_topics: Vec<TopicName> = (0..1024)
        .map(|_| {
            topic(format!(
                "fleet/r{}/d{}/cmd",
                rng.next() % REGIONS,
                rng.next() % DEVICES_PER_REGION
            ))
        })
        .collect();
    let status_topics: Vec<TopicName> = (0..1024)
        .map(|_| {
            topic(format!(
                "fleet/r{}/d{}/status",
                rng.next() % REGIONS,
                rng.next() % DEVICES_PER_REGION
            ))
        })
        .collect();
    let miss_topics: Vec<TopicName> = (0..1024)
        .map(|i| topic(format!("plant/line{}/temp", i % 50)))
        .collect();

    let mut g = c.benchmark_group("trie_match_100k");
    let mut i = 0;
    g.bench_function("for_each_match/cmd", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let mut n = 0u32;
            trie.for_each_match(&cmd_topics[i], |_, k, q| {
                n = n.wrapping_add(k ^ u32::from(*q))
            });
            black_box(n)
        })
    });
    let mut out = hashbrown::HashMap::new();
    g.bench_function("collect_matches/cmd", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            trie.collect_matches(&cmd_topics[i], &mut out, |a, b| *a = (*a).max(*b));
            black_box(out.len())
        })
    });
    g.bench_function("collect_matches/status_fanout_400", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            trie.collect_matches(&status_topics[i], &mut out, |a, b| *a = (*a).max(*b));
            black_box(out.len())
        })
    });
    g.bench_function("has_match/hit", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(trie.has_match(&cmd_topics[i]))
        })
    });
    g.bench_function("has_match/miss", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(trie.has_match(&miss_topics[i]))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("trie_update_100k");
    let fresh: Vec<TopicFilter> = (0..1024)
        .map(|i| filter(format!("fleet/r{}/new{i}/cmd", i % REGIONS)))
        .collect();
    g.bench_function("subscribe+unsubscribe/new_filter", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            trie.subscribe(&fresh[i], 1_000_000, 1);
            black_box(trie.unsubscribe(&fresh[i], 1_000_000))
        })
    });
    g.bench_function("subscribe/replace_existing", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (f, k, q) = &subs[(i * 97) % subs.len()];
            black_box(trie.subscribe(f, *k, *q))
        })
    });
    g.bench_function("subscribe+unsubscribe/existing_filter_new_key", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (f, _, _) = &subs[(i * 97) % subs.len()];
            trie.subscribe(f, 2_000_000, 1);
            black_box(trie.unsubscribe(f, 2_000_000))
        })
    });
    g.finish();
    assert_eq!(trie.len(), subs.len());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);

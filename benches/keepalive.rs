//! Keep-alive wheel benchmarks.
//!
//! - `touch`: one `KeepAlive::touch` into a slab of 1,000,000 connection
//!   states, at random slots (target ≤ 10 ns).
//! - `advance_all_expire`: 1,000,000 silent connections all due in one
//!   second; time per expired entry (target ≤ 50 ns), with slots in
//!   registration order and shuffled.
//! - `advance_one_second`: 1,000,000 and 10,000,000 busy connections with a
//!   60 s timeout, so 1/60 come due each second and are re-filed: the cost
//!   of the shard's one-second tick.
//!
//! Memory per registered connection is printed at start (counted by a
//! global allocator wrapper).
//!
//! Recorded when this file was committed (branch `trie`): AMD EPYC, 2 cores
//! shared with three other builds, kernel 6.18, rustc 1.95, bench profile,
//! no tuning, no baseline beside it; criterion medians:
//!
//! | bench                                   | time              |
//! |-----------------------------------------|-------------------|
//! | touch_random_1M                         | 1.2 ns / touch    |
//! | advance_all_expire_1M/sequential        | 0.76 ns / expired |
//! | advance_all_expire_1M/shuffled          | 12.5 ns / expired |
//! | advance_one_second/1M_busy (16,667 due) | 101 µs            |
//! | advance_one_second/10M_busy (166,667)   | 7.6 ms            |
//!
//! Memory: 11.8 B per entry in the wheel (8 B entry + bucket growth slack)
//! plus 8 B `KeepAlive` in the connection; 96 KiB fixed per wheel. The same
//! after a whole lap of the ring with every connection re-filed (a wheel
//! that kept each drained bucket's capacity held ~46 entries' worth per
//! connection by then).

use coremq::proto::keepalive::{KeepAlive, KeepAliveWheel, Secs, Verdict};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

const M: u32 = 1_000_000;

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

fn shuffled(n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut rng = Lcg(1);
    for i in (1..v.len()).rev() {
        let j = rng.next() as usize % (i + 1);
        v.swap(i, j);
    }
    v
}

fn memory() {
    let before = counting::live();
    let mut wheel: KeepAliveWheel<u32> = KeepAliveWheel::new(Secs(0));
    let fixed = counting::live() - before;
    // A realistic spread: timeouts of 90 s registered over 90 seconds.
    for i in 0..M {
        wheel.register(i, 0, Secs(1 + i % 90));
    }
    let total = counting::live() - before;
    println!(
        "wheel: fixed {fixed} B; {M} entries: {} B = {:.1} B/entry in the wheel (+ {} B KeepAlive per connection)",
        total - fixed,
        (total - fixed) as f64 / f64::from(M),
        std::mem::size_of::<KeepAlive>()
    );
    // A lap of the ring (4,096 s) and a timeout more, every connection
    // heard from just now whenever its entry comes up: each is re-filed 90 s
    // ahead, about 46 times.
    for now in 1..=4096 + 90 {
        let advanced = wheel.advance(Secs(now), |_, _| Verdict::Alive {
            deadline: Secs(now + 90),
        });
        black_box(advanced);
    }
    let lapped = counting::live() - before;
    println!(
        "wheel after a lap, every entry re-filed: {} B = {:.1} B/entry",
        lapped - fixed,
        (lapped - fixed) as f64 / f64::from(M)
    );
}

fn bench(c: &mut Criterion) {
    memory();
    let mut g = c.benchmark_group("keepalive");

    // touch: 1,000 random-slot stores per iteration.
    let mut states = vec![KeepAlive::new(90, Secs(0)); M as usize];
    let order = shuffled(M);
    let mut at = 0usize;
    g.throughput(Throughput::Elements(1000));
    g.bench_function("touch_random_1M/x1000", |b| {
        b.iter(|| {
            for &slot in &order[at..at + 1000] {
                states[slot as usize].touch(Secs(5));
            }
            at = (at + 1000) % (M as usize - 1000);
        })
    });
    black_box(&states);

    // advance: 1,000,000 silent connections due at the same second.
    g.throughput(Throughput::Elements(u64::from(M)));
    g.sample_size(10);
    for (name, keys) in [
        ("sequential", (0..M).collect::<Vec<_>>()),
        ("shuffled", shuffled(M)),
    ] {
        let states = vec![KeepAlive::new(90, Secs(0)); M as usize];
        g.bench_function(format!("advance_all_expire_1M/{name}"), |b| {
            b.iter_batched(
                || {
                    let mut w = KeepAliveWheel::new(Secs(0));
                    for &k in &keys {
                        w.register(k, 0, Secs(91));
                    }
                    w
                },
                |mut w| {
                    let done = w.advance(Secs(91), |k, _| states[k as usize].verdict(Secs(91)));
                    assert_eq!(done.expired, M as usize);
                    w
                },
                BatchSize::PerIteration,
            )
        });
    }

    // The one-second tick with n busy connections, timeout 60 s: each
    // second the 1/60 that come due are re-filed 60 s on.
    for n in [M, 10 * M] {
        let mut states: Vec<KeepAlive> = (0..n).map(|i| KeepAlive::new(60, Secs(i % 60))).collect();
        let mut wheel = KeepAliveWheel::new(Secs(0));
        for (i, ka) in states.iter().enumerate() {
            wheel.register(i as u32, 0, ka.deadline());
        }
        let mut now = 0u32;
        g.throughput(Throughput::Elements(u64::from(n / 60)));
        g.bench_function(format!("advance_one_second/{}M_busy", n / M), |b| {
            b.iter(|| {
                now += 1;
                let now = Secs(now);
                wheel.advance(now, |k, _| {
                    let ka = &mut states[k as usize];
                    // The client sent something a second ago.
                    ka.touch(Secs(now.0 - 1));
                    let v = ka.verdict(now);
                    debug_assert!(matches!(v, Verdict::Alive { .. }));
                    v
                })
            })
        });
        assert_eq!(wheel.len(), n as usize);
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

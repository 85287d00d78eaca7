//! The lazy one-second keep-alive wheel: a million idle connections cost
//! nothing per packet and almost nothing per second.
//!
//! # The problem
//!
//! MQTT-3.1.2-24: a server that hears nothing from a client for 1.5 × its
//! Keep Alive must disconnect it. A timer per connection, reset on every
//! packet, costs a tree operation per packet (glommio keeps timers in a
//! `BTreeMap`). Instead, as in FlashMQ and Mosquitto 2.1, nothing happens per
//! packet except one store, and the deadline is only *checked* when it comes.
//!
//! # The design, and why
//!
//! - **The connection owns its [`KeepAlive`]** (8 bytes: `last_seen` and the
//!   timeout). A packet calls [`KeepAlive::touch`]: one `u32` store into the
//!   connection's own state, which is in cache anyway because the packet is
//!   being handled. That is why `last_seen` is *not* a slab inside the wheel:
//!   a slab slot for a connection that has been idle for a minute is a cache
//!   miss (~80 ns at a million connections) on every packet, while the
//!   connection's own cache line is free. The wheel never moves an entry on a
//!   touch.
//! - **The wheel holds `(key, generation)` entries in per-second buckets.**
//!   [`KeepAliveWheel::register`] files an entry under its deadline second.
//!   [`KeepAliveWheel::advance`] empties each bucket whose second has come and
//!   asks the caller about every entry, passing `(key, generation)`: the
//!   caller answers with a [`Verdict`] from the connection's `KeepAlive`
//!   ([`KeepAlive::verdict`] does this): [`Verdict::Expired`] (close it),
//!   [`Verdict::Alive`] (it was touched: re-file at its new deadline), or
//!   [`Verdict::Gone`] (no such connection, or the slot now holds a later
//!   connection with another generation: drop the entry). So a connection
//!   that talks is looked at once per timeout period, not once per packet.
//! - **Generations instead of unregister.** When a connection closes nothing
//!   is removed from the wheel; its entry is dropped lazily when its second
//!   comes and the caller answers `Gone`. Because the caller reuses a key
//!   (a slab slot) for later connections, each registration carries the
//!   connection's generation, and the caller answers `Gone` when the
//!   generation differs: an entry left by an earlier connection in the same
//!   slot can never expire the client that holds it now. There is therefore
//!   no `unregister`.
//! - **A hashed ring of 4,096 buckets**, indexed by `second mod 4096`. Keep
//!   Alive goes up to 65,535 s (timeout 98,303 s), but a ring that long would
//!   be 2.4 MB of empty `Vec` headers per shard. An entry whose deadline is
//!   more than 4,096 s away is filed in the bucket of `deadline mod 4096` and
//!   simply looked at early: the caller answers `Alive` with the same
//!   deadline and it is re-filed, at most 24 times over the longest Keep
//!   Alive. The usual Keep Alives (30 s … 20 min) never lap.
//! - **Catch-up.** `advance(now)` processes every second from the last one
//!   processed up to `now`, so a shard that stalled still expires everyone
//!   who is due (at most one lap of the ring is walked: that visits every
//!   entry).
//! - **Allocation reuse, without hoarding.** A drained bucket is left with
//!   no allocation; its `Vec` goes to a small pool of spares, and an entry
//!   filed into a bucket that has none takes one from there. Entries move
//!   from the bucket being drained to one a timeout ahead, so the spares
//!   circulate and a steady state allocates nothing. Leaving the capacity
//!   in the drained bucket instead (as this wheel once did) fills every
//!   bucket of the ring with a `Vec` sized for its busiest moment: over a
//!   lap that held ring ÷ timeout entries' worth per connection (~440 B at
//!   a 5 s Keep Alive in 100 ms ticks), a leak that grew for the first
//!   seven minutes.
//!
//! # Cost
//!
//! Per registered connection: one 8-byte entry in the wheel for `u32` keys
//! (plus `Vec` growth slack, at most 2× while a bucket grows) and the
//! connection's 8-byte [`KeepAlive`]. Fixed: 4,096 × 24 bytes of bucket
//! headers, 96 KiB per shard, and up to [`MAX_SPARES`] spare `Vec`s.
//!
//! # Time
//!
//! Time is a [`Secs`] argument — monotonic whole seconds since the shard
//! started; only the shell reads a clock. Keep Alive 0 turns the mechanism
//! off (MQTT-3.1.2-23): the caller does not register such a connection
//! ([`timeout_secs`] returns `None` for it).

use std::fmt;

/// Monotonic whole seconds since the shard started (the shell floors its
/// clock reading; nothing in `proto` reads a clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Secs(pub u32);

impl Secs {
    /// `self + secs`, stopping at `u32::MAX` (136 years) instead of wrapping.
    pub fn saturating_add(self, secs: u32) -> Secs {
        Secs(self.0.saturating_add(secs))
    }
}

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

/// The server's allowance for a client's Keep Alive: 1.5 × `keep_alive`
/// seconds, rounded up (MQTT-3.1.2-24); `None` for 0, which turns keep-alive
/// off (MQTT-3.1.2-23), so the caller does not register the connection.
pub fn timeout_secs(keep_alive: u16) -> Option<u32> {
    match keep_alive {
        0 => None,
        ka => Some((u32::from(ka) * 3).div_ceil(2)),
    }
}

/// A connection's keep-alive state, owned by the connection: when it last
/// heard from its client, and how long it may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    last_seen: Secs,
    timeout: u32,
}

impl KeepAlive {
    /// State for a connection accepted at `now`; `timeout_secs` is already
    /// 1.5 × Keep Alive, rounded up (see [`timeout_secs`]).
    pub fn new(timeout_secs: u32, now: Secs) -> Self {
        KeepAlive {
            last_seen: now,
            timeout: timeout_secs,
        }
    }

    /// Records that a packet arrived at `now`: one store, no wheel access.
    #[inline]
    pub fn touch(&mut self, now: Secs) {
        self.last_seen = now;
    }

    /// The second of the last packet.
    pub fn last_seen(&self) -> Secs {
        self.last_seen
    }

    /// The allowed silence in seconds (1.5 × Keep Alive).
    pub fn timeout_secs(&self) -> u32 {
        self.timeout
    }

    /// The first second at which the connection counts as expired:
    /// `last_seen + timeout + 1`. The `+ 1` is because `last_seen` is floored:
    /// a packet at 10.9 s reads as 10, and expiring at 10 + timeout could cut
    /// the client short by up to a second. Expiring one tick later
    /// guarantees at least `timeout` real seconds of silence (MQTT-3.1.2-24),
    /// at the price of closing up to a second late — what Mosquitto's
    /// `now - last > timeout` does too.
    #[inline]
    pub fn deadline(&self) -> Secs {
        self.last_seen
            .saturating_add(self.timeout)
            .saturating_add(1)
    }

    /// The answer for [`KeepAliveWheel::advance`] at `now` (the caller checks
    /// the generation first and answers [`Verdict::Gone`] on a mismatch).
    #[inline]
    pub fn verdict(&self, now: Secs) -> Verdict {
        let deadline = self.deadline();
        if now >= deadline {
            Verdict::Expired
        } else {
            Verdict::Alive { deadline }
        }
    }
}

/// The caller's answer about a due wheel entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Silent past its deadline: the caller closes it; the entry is dropped.
    Expired,
    /// Heard from since it was filed: re-file the entry at `deadline`.
    Alive {
        /// The new deadline; one not after `now` is treated as `now + 1`.
        deadline: Secs,
    },
    /// Closed, or its key now holds a later connection (another
    /// generation): the entry is stale and is dropped.
    Gone,
}

/// What one [`KeepAliveWheel::advance`] did, for counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advanced {
    /// Entries the caller answered [`Verdict::Expired`] for.
    pub expired: usize,
    /// Entries re-filed at a later deadline.
    pub refiled: usize,
    /// Stale entries dropped ([`Verdict::Gone`]).
    pub dropped: usize,
}

/// Number of one-second buckets in the ring; a power of two so the bucket of
/// a second is a mask. See the module docs for why not 98,304.
const RING: usize = 4096;
const MASK: u32 = RING as u32 - 1;

/// Drained bucket `Vec`s kept for reuse. Each turn of `advance` drains one
/// bucket and usually fills one empty bucket a timeout ahead, so a few
/// suffice; the rest are freed.
const MAX_SPARES: usize = 8;

/// A drained bucket whose capacity exceeds this many times what it held
/// (and [`SMALL_BUCKET`]) is freed rather than kept: the one left by a
/// connection storm should not be reused for every bucket after it.
const OVERSIZE: usize = 4;
/// Capacities up to this are always worth keeping.
const SMALL_BUCKET: usize = 64;

/// The shard's keep-alive wheel: `(key, generation)` entries filed by
/// deadline second, checked lazily when their second comes.
pub struct KeepAliveWheel<K> {
    buckets: Box<[Vec<(K, u32)>]>,
    /// Emptied buckets' allocations, kept so their capacity is reused.
    spares: Vec<Vec<(K, u32)>>,
    /// The first second not yet processed by `advance`.
    next: Secs,
    len: usize,
}

impl<K> fmt::Debug for KeepAliveWheel<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAliveWheel")
            .field("next", &self.next)
            .field("len", &self.len)
            .finish()
    }
}

impl<K: Copy> KeepAliveWheel<K> {
    /// An empty wheel whose first unprocessed second is `now`.
    pub fn new(now: Secs) -> Self {
        KeepAliveWheel {
            buckets: (0..RING).map(|_| Vec::new()).collect(),
            spares: Vec::new(),
            next: now,
            len: 0,
        }
    }

    /// Files `(key, generation)` to be checked at `deadline` (normally
    /// [`KeepAlive::deadline`]); a deadline already processed is filed at the
    /// next unprocessed second. Connections with Keep Alive 0 are not
    /// registered (MQTT-3.1.2-23).
    pub fn register(&mut self, key: K, generation: u32, deadline: Secs) {
        let second = deadline.max(self.next);
        self.file(second, (key, generation));
        self.len += 1;
    }

    /// Puts `entry` in the bucket of `second`, giving an empty bucket a
    /// spare allocation first.
    fn file(&mut self, second: Secs, entry: (K, u32)) {
        let bucket = &mut self.buckets[(second.0 & MASK) as usize];
        if bucket.capacity() == 0 {
            if let Some(spare) = self.spares.pop() {
                *bucket = spare;
            }
        }
        bucket.push(entry);
    }

    /// Processes every second up to and including `now`: asks `check(key,
    /// generation)` about each due entry, drops those answered `Expired` or
    /// `Gone`, and re-files those answered `Alive`. On `Expired` the caller
    /// closes the connection (from inside `check`, or by noting the key).
    pub fn advance(&mut self, now: Secs, mut check: impl FnMut(K, u32) -> Verdict) -> Advanced {
        let mut done = Advanced::default();
        if now < self.next {
            return done;
        }
        // One lap of the ring visits every entry; more would only revisit.
        let first = self.next.0.max(now.0.saturating_sub(MASK));
        let soonest = now.saturating_add(1);
        self.next = soonest;
        for second in first..=now.0 {
            let i = (second & MASK) as usize;
            // Take the due bucket out, so that entries re-filed into this
            // same bucket (a lap) land in a fresh one and are not revisited.
            let mut due = std::mem::take(&mut self.buckets[i]);
            let held = due.len();
            let mut refiled = 0;
            for (key, generation) in due.drain(..) {
                match check(key, generation) {
                    Verdict::Expired => done.expired += 1,
                    Verdict::Gone => done.dropped += 1,
                    Verdict::Alive { deadline } => {
                        self.file(deadline.max(soonest), (key, generation));
                        refiled += 1;
                    }
                }
            }
            done.refiled += refiled;
            // The drained bucket's allocation waits for the next empty
            // bucket to be filed into (see the module docs).
            let oversized = due.capacity() > SMALL_BUCKET.max(OVERSIZE * held);
            if due.capacity() > 0 && !oversized && self.spares.len() < MAX_SPARES {
                self.spares.push(due);
            }
        }
        self.len -= done.expired + done.dropped;
        done
    }

    /// Entries filed, stale ones included (they leave when their second
    /// comes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is filed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first second the next [`KeepAliveWheel::advance`] will process.
    pub fn next_second(&self) -> Secs {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A fake shard: connection slots with a generation each, `None` when
    /// closed.
    struct Conns {
        slots: Vec<Option<(u32, KeepAlive)>>,
        closed: Vec<u32>,
    }

    impl Conns {
        fn new(n: usize) -> Self {
            Conns {
                slots: vec![None; n],
                closed: Vec::new(),
            }
        }

        fn connect(
            &mut self,
            wheel: &mut KeepAliveWheel<u32>,
            slot: u32,
            generation: u32,
            ka: u16,
            now: Secs,
        ) {
            let timeout = timeout_secs(ka).expect("tests use a non-zero keep-alive");
            let state = KeepAlive::new(timeout, now);
            self.slots[slot as usize] = Some((generation, state));
            wheel.register(slot, generation, state.deadline());
        }

        fn advance(&mut self, wheel: &mut KeepAliveWheel<u32>, now: Secs) -> Advanced {
            let slots = &mut self.slots;
            let closed = &mut self.closed;
            wheel.advance(now, |slot, generation| match &slots[slot as usize] {
                Some((g, ka)) if *g == generation => {
                    let v = ka.verdict(now);
                    if v == Verdict::Expired {
                        slots[slot as usize] = None;
                        closed.push(slot);
                    }
                    v
                }
                _ => Verdict::Gone,
            })
        }

        fn touch(&mut self, slot: u32, now: Secs) {
            if let Some((_, ka)) = &mut self.slots[slot as usize] {
                ka.touch(now);
            }
        }
    }

    #[test]
    fn timeout_is_one_and_a_half_keep_alive_rounded_up_mqtt_3_1_2_24() {
        assert_eq!(timeout_secs(0), None);
        assert_eq!(timeout_secs(1), Some(2));
        assert_eq!(timeout_secs(10), Some(15));
        assert_eq!(timeout_secs(11), Some(17));
        assert_eq!(timeout_secs(60), Some(90));
        assert_eq!(timeout_secs(u16::MAX), Some(98_303));
    }

    #[test]
    fn expires_exactly_at_deadline_not_before_mqtt_3_1_2_24() {
        let mut wheel = KeepAliveWheel::new(Secs(100));
        let mut conns = Conns::new(1);
        conns.connect(&mut wheel, 0, 1, 10, Secs(100));
        // timeout 15: more than 15 whole seconds since 100 means second 116.
        for s in 100..=115 {
            assert_eq!(conns.advance(&mut wheel, Secs(s)).expired, 0, "second {s}");
        }
        assert_eq!(conns.advance(&mut wheel, Secs(116)).expired, 1);
        assert_eq!(conns.closed, vec![0]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn touched_connection_survives_and_is_refiled_mqtt_3_1_2_24() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        let mut conns = Conns::new(1);
        conns.connect(&mut wheel, 0, 1, 10, Secs(0));
        conns.touch(0, Secs(5)); // new deadline 21
        let a = conns.advance(&mut wheel, Secs(16));
        assert_eq!((a.expired, a.refiled), (0, 1));
        assert_eq!(wheel.len(), 1);
        for s in 17..=20 {
            assert_eq!(conns.advance(&mut wheel, Secs(s)).expired, 0);
        }
        assert_eq!(conns.advance(&mut wheel, Secs(21)).expired, 1);
    }

    /// The wheel holds what is filed in it, not a `Vec` per bucket it has
    /// passed: 1,000 connections pinging every 5 s (Keep Alive 5) over two
    /// laps of the ring hold no more after the second lap than after the
    /// first, and little beyond the bucket headers and the entries
    /// themselves. (A wheel that left each drained bucket its capacity grew
    /// by a bucket's worth every second for a whole lap: ~8 MiB here.)
    #[test]
    fn memory_follows_the_entries_not_the_ring() {
        const N: u32 = 1000;
        let mut conns = Conns::new(N as usize);
        conns.closed.reserve(N as usize);
        let start = crate::test_alloc::net_bytes();
        let mut wheel = KeepAliveWheel::new(Secs(0));
        for slot in 0..N {
            conns.connect(&mut wheel, slot, 1, 5, Secs(0));
        }
        let mut held_after_lap = Vec::new();
        for now in 1..=2 * RING as u32 {
            // Each client pings in its own second of five.
            for slot in (now % 5..N).step_by(5) {
                conns.touch(slot, Secs(now));
            }
            let a = conns.advance(&mut wheel, Secs(now));
            assert_eq!(a.expired, 0, "nobody is silent");
            if now % RING as u32 == 0 {
                held_after_lap.push(crate::test_alloc::net_bytes() - start);
            }
        }
        assert_eq!(wheel.len(), N as usize);
        let headers = (RING * std::mem::size_of::<Vec<(u32, u32)>>()) as isize;
        let entries = N as isize * 8;
        let (first, second) = (held_after_lap[0], held_after_lap[1]);
        assert!(
            second - first < 1024,
            "grew over the second lap: {first} -> {second}"
        );
        assert!(
            second - headers < 8 * entries,
            "{} bytes beyond the headers for {entries} bytes of entries",
            second - headers
        );
    }

    #[test]
    fn touch_is_only_a_store() {
        let mut ka = KeepAlive::new(15, Secs(0));
        ka.touch(Secs(7));
        assert_eq!(ka.last_seen(), Secs(7));
        assert_eq!(ka.deadline(), Secs(23));
        assert_eq!(ka.verdict(Secs(22)), Verdict::Alive { deadline: Secs(23) });
        assert_eq!(ka.verdict(Secs(23)), Verdict::Expired);
        assert_eq!(std::mem::size_of::<KeepAlive>(), 8);
    }

    #[test]
    fn stale_generation_never_expires_reconnected_client() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        let mut conns = Conns::new(1);
        conns.connect(&mut wheel, 0, 1, 10, Secs(0)); // entry due at 16
                                                      // The client goes away at 3 and a new one takes the slot at 10 with a
                                                      // long keep-alive; the old entry stays in the wheel.
        conns.slots[0] = None;
        conns.connect(&mut wheel, 0, 2, 100, Secs(10)); // due at 161
        let a = conns.advance(&mut wheel, Secs(16));
        assert_eq!((a.expired, a.dropped), (0, 1));
        assert_eq!(conns.advance(&mut wheel, Secs(160)).expired, 0);
        assert_eq!(conns.advance(&mut wheel, Secs(161)).expired, 1);
        assert_eq!(conns.closed, vec![0]);
    }

    #[test]
    fn keep_alive_zero_is_not_registered_mqtt_3_1_2_23() {
        // The caller's rule: no timeout, no registration; the wheel never
        // hears of it, so it can never expire it.
        let wheel: KeepAliveWheel<u32> = KeepAliveWheel::new(Secs(0));
        assert_eq!(timeout_secs(0), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn catches_up_over_skipped_seconds() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        let mut conns = Conns::new(3);
        conns.connect(&mut wheel, 0, 1, 10, Secs(0)); // due 16
        conns.connect(&mut wheel, 1, 1, 20, Secs(0)); // due 31
        conns.connect(&mut wheel, 2, 1, 60, Secs(0)); // due 91
        conns.touch(1, Secs(30)); // due 61
        let a = conns.advance(&mut wheel, Secs(40));
        assert_eq!((a.expired, a.refiled), (1, 1));
        assert_eq!(conns.advance(&mut wheel, Secs(40)), Advanced::default());
        // A stall longer than the whole ring still expires everyone due.
        let a = conns.advance(&mut wheel, Secs(40 + 3 * RING as u32));
        assert_eq!(a.expired, 2);
        assert!(wheel.is_empty());
        assert_eq!(conns.closed, vec![0, 1, 2]);
    }

    #[test]
    fn registering_in_the_past_is_checked_at_next_advance() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        wheel.advance(Secs(50), |_, _| Verdict::Gone);
        wheel.register(7u32, 1, Secs(10));
        assert_eq!(wheel.next_second(), Secs(51));
        let a = wheel.advance(Secs(51), |_, _| Verdict::Expired);
        assert_eq!(a.expired, 1);
    }

    #[test]
    fn long_keep_alive_laps_the_ring_and_expires_on_time() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        let mut conns = Conns::new(1);
        conns.connect(&mut wheel, 0, 1, u16::MAX, Secs(0)); // due 98,304
        let mut expired_at = None;
        for s in (0..=100_000).step_by(7) {
            if conns.advance(&mut wheel, Secs(s)).expired == 1 {
                expired_at = Some(s);
            }
        }
        // Checked every 7 s: the first check at or after 98,304.
        assert_eq!(expired_at, Some(98_308));
    }

    #[test]
    fn alive_with_a_past_deadline_is_refiled_for_next_second() {
        let mut wheel = KeepAliveWheel::new(Secs(0));
        wheel.register(1u32, 0, Secs(5));
        let a = wheel.advance(Secs(5), |_, _| Verdict::Alive { deadline: Secs(3) });
        assert_eq!(a.refiled, 1);
        assert_eq!(wheel.advance(Secs(6), |_, _| Verdict::Expired).expired, 1);
    }

    #[test]
    fn a_million_connections_only_the_silent_half_expire() {
        const N: u32 = 1_000_000;
        let mut wheel = KeepAliveWheel::new(Secs(0));
        // Lean state: one KeepAlive per slot, all of generation 0.
        let mut states: Vec<KeepAlive> = (0..N)
            .map(|i| KeepAlive::new(timeout_secs(60).unwrap_or(90), Secs(i % 10)))
            .collect();
        for (i, ka) in states.iter().enumerate() {
            wheel.register(i as u32, 0, ka.deadline());
        }
        assert_eq!(wheel.len(), N as usize);
        for ka in states.iter_mut().step_by(2) {
            ka.touch(Secs(50));
        }
        let mut expired = vec![false; N as usize];
        let mut count = 0;
        // Deadlines of the silent half: 91..=100; the touched: 141.
        let a = wheel.advance(Secs(140), |k, _| {
            let v = states[k as usize].verdict(Secs(140));
            if v == Verdict::Expired {
                expired[k as usize] = true;
                count += 1;
            }
            v
        });
        assert_eq!(a.expired, N as usize / 2);
        assert_eq!(a.refiled, N as usize / 2);
        assert_eq!(count, N as usize / 2);
        assert!(expired.iter().enumerate().all(|(i, &e)| e == (i % 2 == 1)));
        assert_eq!(wheel.len(), N as usize / 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect { slot: u32, keep_alive: u16 },
        Touch { slot: u32 },
        Close { slot: u32 },
        Advance { secs: u32 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..16, 1u16..40).prop_map(|(slot, keep_alive)| Op::Connect { slot, keep_alive }),
            (0u32..16).prop_map(|slot| Op::Touch { slot }),
            (0u32..16).prop_map(|slot| Op::Close { slot }),
            (0u32..80).prop_map(|secs| Op::Advance { secs }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// After every advance, exactly the connections whose deadline has
        /// come are closed (MQTT-3.1.2-24), whatever the mix of reconnects,
        /// touches and skipped seconds.
        #[test]
        fn wheel_expires_exactly_the_due_connections_mqtt_3_1_2_24(
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let mut wheel = KeepAliveWheel::new(Secs(0));
            let mut conns = Conns::new(16);
            let mut generation = 0;
            let mut now = Secs(0);
            for op in ops {
                match op {
                    Op::Connect { slot, keep_alive } => {
                        generation += 1;
                        conns.connect(&mut wheel, slot, generation, keep_alive, now);
                    }
                    Op::Touch { slot } => conns.touch(slot, now),
                    Op::Close { slot } => conns.slots[slot as usize] = None,
                    Op::Advance { secs } => {
                        now = now.saturating_add(secs);
                        let due: Vec<u32> = (0..16u32)
                            .filter(|&s| {
                                conns.slots[s as usize].is_some_and(|(_, ka)| ka.deadline() <= now)
                            })
                            .collect();
                        conns.closed.clear();
                        conns.advance(&mut wheel, now);
                        conns.closed.sort_unstable();
                        prop_assert_eq!(&conns.closed, &due);
                    }
                }
            }
        }
    }
}

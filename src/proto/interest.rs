//! Which shards want a topic: each shard's summary of the other shards'
//! subscription filters, so a PUBLISH travels only to the shards with a
//! subscription that can match it (and to the topic's retained owner when
//! it is retained), instead of to every shard.
//!
//! # What is replicated
//!
//! A shard counts its own filters ([`Interest::local_add`] /
//! [`Interest::local_remove`]: ordinary subscriptions, and the filters of
//! the shared-subscription groups it owns) and tells every other shard only
//! when a filter goes from nobody to somebody (`InterestAdd`) and back
//! (`InterestRemove`): a fleet where a million devices each subscribe to
//! their own command topic sends one message per device, not per packet.
//!
//! Receivers keep, per other shard, exact filters as 64-bit hashes with a
//! count (a topic is looked up by its own hash: a filter without wildcards
//! matches exactly one topic) and wildcard filters in a trie. A hash
//! collision can only send a PUBLISH to a shard that does not need it,
//! never keep it from one that does, because adds and removes are counted.
//!
//! # Ordering: a SUBACK means every shard knows
//!
//! A subscriber that got its SUBACK must get every PUBLISH that arrives
//! anywhere after it (the client may tell a publisher on another shard to
//! go). So a SUBSCRIBE that makes a filter new to its shard sends its
//! `InterestAdd` with a ticket, and the SUBACK waits until every other shard
//! has acknowledged that ticket (`InterestAck`): by then each of them routes
//! matching publishes here. Removals need no acknowledgement (a publish
//! sent to a shard that no longer wants it is dropped there). Messages from
//! one shard to another arrive in the order sent, so an add, a remove and
//! an add again of one filter land in that order.
//!
//! Up to 64 shards: a shard set is one `u64`. With more, the broker sends
//! every publish to every shard, as before this summary existed.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap};

use super::topic::trie::SubscriptionTrie;
use super::topic::{TopicFilter, TopicName};
use super::ShardId;

/// The most shards a [`ShardSet`] holds.
pub const MAX_ROUTED_SHARDS: u16 = 64;

/// A set of shards, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSet(pub u64);

impl ShardSet {
    /// Adds `shard`.
    pub fn insert(&mut self, shard: ShardId) {
        self.0 |= 1 << shard.0;
    }

    /// Takes `shard` out.
    pub fn remove(&mut self, shard: ShardId) {
        self.0 &= !(1 << shard.0);
    }

    /// Whether `shard` is in the set.
    pub fn contains(self, shard: ShardId) -> bool {
        self.0 & (1 << shard.0) != 0
    }

    /// The shards in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = ShardId> {
        (0..MAX_ROUTED_SHARDS)
            .filter(move |&s| self.0 & (1 << s) != 0)
            .map(ShardId)
    }
}

/// One shard's view: its own filters' counts and the other shards' filters.
pub struct Interest {
    hasher: DefaultHashBuilder,
    /// This shard's filters: hash → subscriptions (and owned groups) using it.
    local: HashMap<u64, u32>,
    /// Other shards' exact filters: hash → (shard, count) for each shard
    /// that has it.
    exact: HashMap<u64, Vec<(u16, u32)>>,
    /// Other shards' wildcard filters, with a count per shard.
    wild: SubscriptionTrie<u16, u32>,
}

impl Default for Interest {
    fn default() -> Self {
        Interest {
            hasher: DefaultHashBuilder::default(),
            local: HashMap::new(),
            exact: HashMap::new(),
            wild: SubscriptionTrie::new(),
        }
    }
}

impl Interest {
    fn hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    /// One more local subscription to `filter`; true when the filter is new
    /// to this shard (the other shards must be told).
    pub fn local_add(&mut self, filter: &TopicFilter) -> bool {
        let count = self.local.entry(self.hash(filter.as_str())).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// One local subscription to `filter` fewer; true when none is left
    /// (the other shards may forget it).
    pub fn local_remove(&mut self, filter: &TopicFilter) -> bool {
        let h = self.hash(filter.as_str());
        match self.local.get_mut(&h) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.local.remove(&h);
                true
            }
            None => false,
        }
    }

    /// Shard `from` has a subscription to `filter` now.
    pub fn remote_add(&mut self, from: ShardId, filter: &TopicFilter) {
        if filter.has_wildcards() {
            let count = self.wild.get(filter, from.0).copied().unwrap_or(0);
            self.wild.subscribe(filter, from.0, count + 1);
            return;
        }
        let shards = self.exact.entry(self.hash(filter.as_str())).or_default();
        match shards.iter_mut().find(|(s, _)| *s == from.0) {
            Some((_, count)) => *count += 1,
            None => shards.push((from.0, 1)),
        }
    }

    /// Shard `from` has no subscription to `filter` any more.
    pub fn remote_remove(&mut self, from: ShardId, filter: &TopicFilter) {
        if filter.has_wildcards() {
            match self.wild.get(filter, from.0).copied() {
                Some(count) if count > 1 => {
                    self.wild.subscribe(filter, from.0, count - 1);
                }
                Some(_) => {
                    self.wild.unsubscribe(filter, from.0);
                }
                None => {}
            }
            return;
        }
        let h = self.hash(filter.as_str());
        let Some(shards) = self.exact.get_mut(&h) else {
            return;
        };
        if let Some(i) = shards.iter().position(|(s, _)| *s == from.0) {
            shards[i].1 -= 1;
            if shards[i].1 == 0 {
                shards.swap_remove(i);
            }
        }
        if shards.is_empty() {
            self.exact.remove(&h);
        }
    }

    /// The other shards with a filter that matches `topic`.
    pub fn shards_for(&self, topic: &TopicName) -> ShardSet {
        let mut set = ShardSet::default();
        if let Some(shards) = self.exact.get(&self.hash(topic.as_str())) {
            for &(s, _) in shards {
                set.insert(ShardId(s));
            }
        }
        self.wild
            .for_each_match(topic, |_, s, _| set.insert(ShardId(s)));
        set
    }

    /// Distinct filters of this shard (for tests and counters).
    pub fn local_len(&self) -> usize {
        self.local.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }

    fn t(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }

    #[test]
    fn local_counts_announce_only_the_first_and_the_last() {
        let mut i = Interest::default();
        assert!(i.local_add(&f("a/b")));
        assert!(!i.local_add(&f("a/b")));
        assert!(!i.local_remove(&f("a/b")));
        assert!(i.local_remove(&f("a/b")));
        assert!(!i.local_remove(&f("a/b")), "nothing left to remove");
        assert_eq!(i.local_len(), 0);
    }

    #[test]
    fn remote_filters_route_exact_and_wildcard_topics() {
        let mut i = Interest::default();
        i.remote_add(ShardId(1), &f("dev/1/cmd"));
        i.remote_add(ShardId(2), &f("dev/+/cmd"));
        i.remote_add(ShardId(3), &f("#"));
        i.remote_add(ShardId(4), &f("other"));
        let set = i.shards_for(&t("dev/1/cmd"));
        assert_eq!(set.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
        let set = i.shards_for(&t("dev/2/cmd"));
        assert_eq!(set.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 3]);
        // `#` does not match `$` topics (MQTT-4.7.2-1).
        assert_eq!(i.shards_for(&t("$SYS/x")), ShardSet::default());
    }

    #[test]
    fn remote_counts_keep_a_filter_until_its_last_removal() {
        let mut i = Interest::default();
        for _ in 0..2 {
            i.remote_add(ShardId(1), &f("a"));
            i.remote_add(ShardId(1), &f("a/+"));
        }
        i.remote_remove(ShardId(1), &f("a"));
        i.remote_remove(ShardId(1), &f("a/+"));
        assert!(i.shards_for(&t("a")).contains(ShardId(1)));
        assert!(i.shards_for(&t("a/x")).contains(ShardId(1)));
        i.remote_remove(ShardId(1), &f("a"));
        i.remote_remove(ShardId(1), &f("a/+"));
        assert_eq!(i.shards_for(&t("a")), ShardSet::default());
        assert_eq!(i.shards_for(&t("a/x")), ShardSet::default());
    }
}

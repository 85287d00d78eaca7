//! The subscription trie: which subscribers' filters match a topic.
//!
//! One trie per shard, holding that shard's sessions' subscriptions; no locks,
//! and deliberately `!Sync` (a `Cell` holds the match scratch stack).
//!
//! # Shape
//!
//! A node stands for a filter prefix. Each node has
//!
//! - literal children keyed by level (`fleet`, `eu`, …): a short `Vec` while a
//!   node has few children (a linear scan of ≤ 8 short strings beats hashing),
//!   a `hashbrown` map once it has many (a region with 10,000 device ids);
//! - one `+` child slot, so a `+` never costs a map lookup;
//! - one `#` subscriber slot: `#` is always the last level (MQTT-4.7.1-2), so
//!   it needs no node of its own, only its subscribers;
//! - the subscribers of the filter that ends exactly here.
//!
//! Subscribers of one filter are a small `Vec<(K, V)>` (most filters have one
//! subscriber: a device's own command topic) that turns into a hash map past
//! 16 entries, so that 100,000 clients on one broadcast filter still
//! subscribe and unsubscribe in O(1).
//!
//! # Why an arena
//!
//! Nodes live in one `Vec`, linked by `u32` index, not in nested `Box`es.
//! Filters come from peers and may have thousands of levels (the 65,535-byte
//! limit allows 32,768); a recursive walk or a recursive `Drop` over such a
//! chain would overflow the shard's stack. With an arena the match walk uses
//! an explicit stack of `(node, byte offset)` pairs, which has no lifetimes and
//! can therefore be kept in the trie and reused: matching allocates nothing.
//! Freed nodes go on a free list and are reused; each freed slot keeps only
//! its fixed-size node (no maps or vectors), and the whole arena is released
//! when the last filter goes.
//!
//! # Keys and copies
//!
//! On the first subscription to a filter the trie copies the filter into its
//! own allocation, and the level keys of the nodes it creates are slices of
//! that copy (`ByteString` shares, it does not copy). The one copy matters: a
//! filter decoded from a packet may be a slice of a whole read buffer, and an
//! index that lives for days must not pin read buffers.
//!
//! # Matching rules (MQTT 3.1.1 §4.7, MQTT 5 §4.7)
//!
//! `+` matches exactly one level (possibly empty); `#` matches the rest,
//! zero levels included, so `a/#` matches `a` (MQTT-4.7.1-2); a topic that
//! begins with `$` is not matched by a filter whose first level is `+` or `#`
//! (MQTT-4.7.2-1). [`TopicFilter::matches`] is the reference this is tested
//! against.

use super::{TopicFilter, TopicName};
use bytestring::ByteString;
use hashbrown::hash_map::Entry;
use hashbrown::HashMap;
use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU32;
use std::ops::ControlFlow;

/// Index of a non-root node in the arena; the root is index 0 and is never a
/// child, which lets `Option<NodeId>` stay four bytes.
type NodeId = NonZeroU32;

const ROOT: usize = 0;
/// Above this many literal children a node switches from a scanned `Vec` to a
/// hash map; it switches back at half, so a node at the edge does not flap.
const FEW_CHILDREN: usize = 8;
/// Above this many subscribers a filter switches from a scanned `Vec` to a
/// hash map (and back at half).
const FEW_SUBSCRIBERS: usize = 16;
/// Marks "no levels left" in a match walk; real offsets are ≤ 65,535.
const DONE: u32 = u32::MAX;

enum Children {
    Few(Vec<(ByteString, NodeId)>),
    /// Boxed: most nodes have few children, and an unboxed map would make
    /// every node 16 bytes bigger.
    Many(Box<HashMap<ByteString, NodeId>>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    #[inline]
    fn get(&self, level: &str) -> Option<NodeId> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| &**k == level).map(|&(_, id)| id),
            Children::Many(m) => m.get(level).copied(),
        }
    }

    /// Inserts a child the caller has just looked up and found absent.
    fn insert(&mut self, level: ByteString, id: NodeId) {
        match self {
            Children::Few(v) if v.len() < FEW_CHILDREN => {
                // Grow by one: `push` would jump to 4 slots (160 bytes) for
                // the typical node with a single child.
                v.reserve_exact(1);
                v.push((level, id));
            }
            Children::Few(v) => {
                let mut m: HashMap<ByteString, NodeId> = v.drain(..).collect();
                m.insert(level, id);
                *self = Children::Many(Box::new(m));
            }
            Children::Many(m) => {
                m.insert(level, id);
            }
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(k, _)| &**k == level) {
                    v.swap_remove(i);
                }
                v.shrink_to_fit();
            }
            Children::Many(m) => {
                m.remove(level);
                if m.len() <= FEW_CHILDREN / 2 {
                    *self = Children::Few(m.drain().collect());
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }
}

/// The subscribers of one filter, sized for the common case of one.
enum Entries<K, V> {
    One(K, V),
    /// Empty only transiently, or when the filter is about to be removed.
    Few(Vec<(K, V)>),
    Many(Box<HashMap<K, V>>),
}

impl<K: Copy + Eq + Hash, V> Entries<K, V> {
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Entries::One(k, v) if *k == key => Some(std::mem::replace(v, value)),
            Entries::One(..) => {
                if let Entries::One(k, v) = std::mem::replace(self, Entries::Few(Vec::new())) {
                    *self = Entries::Few(vec![(k, v), (key, value)]);
                }
                None
            }
            Entries::Few(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(old, value));
                }
                if v.len() < FEW_SUBSCRIBERS {
                    v.reserve_exact(1);
                    v.push((key, value));
                } else {
                    let mut m: HashMap<K, V> = v.drain(..).collect();
                    m.insert(key, value);
                    *self = Entries::Many(Box::new(m));
                }
                None
            }
            Entries::Many(m) => m.insert(key, value),
        }
    }

    fn remove(&mut self, key: K) -> Option<V> {
        match self {
            Entries::One(k, _) if *k == key => {
                match std::mem::replace(self, Entries::Few(Vec::new())) {
                    Entries::One(_, v) => Some(v),
                    _ => None,
                }
            }
            Entries::One(..) => None,
            Entries::Few(v) => {
                let i = v.iter().position(|(k, _)| *k == key)?;
                let (_, old) = v.swap_remove(i);
                if v.len() == 1 {
                    if let Some((k, v)) = v.pop() {
                        *self = Entries::One(k, v);
                    }
                } else {
                    v.shrink_to_fit();
                }
                Some(old)
            }
            Entries::Many(m) => {
                let old = m.remove(&key)?;
                if m.len() <= FEW_SUBSCRIBERS / 2 {
                    *self = Entries::Few(m.drain().collect());
                }
                Some(old)
            }
        }
    }

    fn get(&self, key: K) -> Option<&V> {
        match self {
            Entries::One(k, v) => (*k == key).then_some(v),
            Entries::Few(v) => v.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            Entries::Many(m) => m.get(&key),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Entries::One(..) => false,
            Entries::Few(v) => v.is_empty(),
            Entries::Many(m) => m.is_empty(),
        }
    }

    #[inline]
    fn for_each(&self, mut f: impl FnMut(K, &V)) {
        match self {
            Entries::One(k, v) => f(*k, v),
            Entries::Few(v) => v.iter().for_each(|(k, v)| f(*k, v)),
            Entries::Many(m) => m.iter().for_each(|(k, v)| f(*k, v)),
        }
    }
}

/// The subscribers of one filter. Invariant: never empty while in the trie.
struct Subscribers<K, V> {
    filter: TopicFilter,
    entries: Entries<K, V>,
}

struct Node<K, V> {
    children: Children,
    plus: Option<NodeId>,
    /// Subscribers of the filter that ends at this node.
    exact: Option<Box<Subscribers<K, V>>>,
    /// Subscribers of the filter that is this node's prefix followed by `#`.
    hash: Option<Box<Subscribers<K, V>>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: Children::default(),
            plus: None,
            exact: None,
            hash: None,
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.exact.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }
}

/// A shard's subscriptions: `(filter, subscriber key) → value`, matched
/// against topics by the MQTT wildcard rules.
///
/// `K` identifies a subscriber (a session or connection id); `V` is what the
/// broker keeps per subscription (granted QoS, MQTT 5 options).
pub struct SubscriptionTrie<K, V> {
    /// `nodes[0]` is the root; the rest are reached from it or on `free`.
    nodes: Vec<Node<K, V>>,
    free: Vec<NodeId>,
    subscriptions: usize,
    filters: usize,
    /// Scratch for `unsubscribe`: `(parent, level start, level end)` per level.
    path: Vec<(usize, usize, usize)>,
    /// Scratch for the match walk: pending `(node, topic offset)` branches.
    /// Taken and put back, so a callback that matches again re-enters safely
    /// (it just gets an empty stack of its own).
    stack: Cell<Vec<(u32, u32)>>,
}

impl<K, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        SubscriptionTrie {
            nodes: vec![Node::default()],
            free: Vec::new(),
            subscriptions: 0,
            filters: 0,
            path: Vec::new(),
            stack: Cell::new(Vec::new()),
        }
    }
}

impl<K, V> fmt::Debug for SubscriptionTrie<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionTrie")
            .field("subscriptions", &self.subscriptions)
            .field("filters", &self.filters)
            .field("nodes", &self.node_count())
            .finish()
    }
}

impl<K, V> SubscriptionTrie<K, V> {
    /// Number of `(filter, key)` subscriptions.
    pub fn len(&self) -> usize {
        self.subscriptions
    }

    /// True when there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.subscriptions == 0
    }

    /// Number of distinct filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Number of nodes below the root; 0 again once every filter is gone.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }
}

impl<K: Copy + Eq + Hash, V: Clone> SubscriptionTrie<K, V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes `key` to `filter` with `value`; if `key` already had this
    /// filter, replaces its value and returns the old one (MQTT-3.8.4-3).
    pub fn subscribe(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        // The compact copy of the filter, made only if a node or a subscriber
        // list has to be created (see the module docs).
        let mut owned: Option<ByteString> = None;
        let src = filter.as_str();
        let mut node = ROOT;
        let mut start = 0;
        let mut hash = false;
        for level in filter.levels() {
            let end = start + level.len();
            if level == "#" {
                hash = true;
                break;
            }
            let found = if level == "+" {
                self.nodes[node].plus
            } else {
                self.nodes[node].children.get(level)
            };
            node = match found {
                Some(id) => id.get() as usize,
                None => {
                    let id = self.alloc();
                    if level == "+" {
                        self.nodes[node].plus = Some(id);
                    } else {
                        let copy = owned.get_or_insert_with(|| ByteString::from(src.to_owned()));
                        let key = copy.slice_ref(&copy[start..end]);
                        self.nodes[node].children.insert(key, id);
                    }
                    id.get() as usize
                }
            };
            start = end + 1;
        }
        let n = &mut self.nodes[node];
        let slot = if hash { &mut n.hash } else { &mut n.exact };
        match slot {
            Some(subs) => {
                let old = subs.entries.insert(key, value);
                if old.is_none() {
                    self.subscriptions += 1;
                }
                old
            }
            None => {
                let copy = owned.unwrap_or_else(|| ByteString::from(src.to_owned()));
                *slot = Some(Box::new(Subscribers {
                    filter: TopicFilter(copy),
                    entries: Entries::One(key, value),
                }));
                self.subscriptions += 1;
                self.filters += 1;
                None
            }
        }
    }

    /// Removes `key`'s subscription to `filter`, returning its value, and
    /// frees the nodes no other filter needs.
    pub fn unsubscribe(&mut self, filter: &TopicFilter, key: K) -> Option<V> {
        self.path.clear();
        let mut node = ROOT;
        let mut start = 0;
        let mut hash = false;
        for level in filter.levels() {
            let end = start + level.len();
            if level == "#" {
                hash = true;
                break;
            }
            let child = if level == "+" {
                self.nodes[node].plus
            } else {
                self.nodes[node].children.get(level)
            }?;
            self.path.push((node, start, end));
            node = child.get() as usize;
            start = end + 1;
        }
        let n = &mut self.nodes[node];
        let slot = if hash { &mut n.hash } else { &mut n.exact };
        let subs = slot.as_mut()?;
        let old = subs.entries.remove(key)?;
        self.subscriptions -= 1;
        if subs.entries.is_empty() {
            *slot = None;
            self.filters -= 1;
        }
        // Prune upwards while nodes are left with nothing: memory follows
        // the subscriptions down.
        while let Some((parent, start, end)) = self.path.pop() {
            if !self.nodes[node].is_empty() {
                break;
            }
            self.nodes[node] = Node::default();
            let id = u32::try_from(node)
                .ok()
                .and_then(NodeId::new)
                .expect("pruned node is a child, so its index is a non-zero u32");
            self.free.push(id);
            let level = &filter.as_str()[start..end];
            if level == "+" {
                self.nodes[parent].plus = None;
            } else {
                self.nodes[parent].children.remove(level);
            }
            node = parent;
        }
        if self.node_count() == 0 {
            self.nodes.truncate(1);
            self.nodes.shrink_to_fit();
            self.free = Vec::new();
            self.path = Vec::new();
        }
        Some(old)
    }

    /// The value of `key`'s subscription to exactly `filter`, if any.
    pub fn get(&self, filter: &TopicFilter, key: K) -> Option<&V> {
        let mut node = ROOT;
        let mut hash = false;
        for level in filter.levels() {
            if level == "#" {
                hash = true;
                break;
            }
            let child = if level == "+" {
                self.nodes[node].plus
            } else {
                self.nodes[node].children.get(level)
            }?;
            node = child.get() as usize;
        }
        let n = &self.nodes[node];
        let subs = if hash { &n.hash } else { &n.exact };
        subs.as_ref()?.entries.get(key)
    }

    /// Calls `f(filter, key, value)` for every subscription whose filter
    /// matches `topic`; a key subscribed through several filters is visited
    /// once per filter. Allocates nothing.
    pub fn for_each_match(&self, topic: &TopicName, mut f: impl FnMut(&TopicFilter, K, &V)) {
        let _ = self.walk(topic, |subs| {
            subs.entries.for_each(|k, v| f(&subs.filter, k, v));
            ControlFlow::Continue(())
        });
    }

    /// Fills `out` (cleared first, capacity kept) with one entry per key that
    /// has any filter matching `topic`, folding a key's several matching
    /// subscriptions with `merge(kept, other)` — e.g. keep the highest QoS,
    /// which is what MQTT-3.3.5-1 asks for.
    pub fn collect_matches<S: BuildHasher>(
        &self,
        topic: &TopicName,
        out: &mut HashMap<K, V, S>,
        mut merge: impl FnMut(&mut V, &V),
    ) {
        out.clear();
        self.for_each_match(topic, |_, k, v| match out.entry(k) {
            Entry::Occupied(mut e) => merge(e.get_mut(), v),
            Entry::Vacant(e) => {
                e.insert(v.clone());
            }
        });
    }

    /// The matching keys of `topic`, each with the greatest value among its
    /// matching subscriptions (MQTT-3.3.5-1). Allocates a map; the hot path
    /// uses [`SubscriptionTrie::collect_matches`] with a reused one.
    pub fn matches(&self, topic: &TopicName) -> HashMap<K, V>
    where
        V: Ord,
    {
        let mut out = HashMap::new();
        self.collect_matches(topic, &mut out, |kept, other| {
            if *other > *kept {
                *kept = other.clone();
            }
        });
        out
    }

    /// Whether any subscription matches `topic`; stops at the first one.
    pub fn has_match(&self, topic: &TopicName) -> bool {
        // Every subscriber list in the trie is non-empty, so reaching one is
        // enough.
        self.walk(topic, |_| ControlFlow::Break(())).is_break()
    }

    /// Visits the subscriber list of every filter that matches `topic`, until
    /// `visit` breaks.
    fn walk(
        &self,
        topic: &TopicName,
        mut visit: impl FnMut(&Subscribers<K, V>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let t = topic.as_str();
        if t.is_empty() {
            // An alias-only topic is resolved before routing; it names nothing.
            return ControlFlow::Continue(());
        }
        // MQTT-4.7.2-1: at the root, `+` and `#` do not match a `$` level.
        let dollar = topic.is_dollar();
        let mut stack = self.stack.take();
        stack.clear();
        let mut result = ControlFlow::Continue(());
        let (mut id, mut pos) = (ROOT as u32, 0u32);
        'walk: loop {
            let node = &self.nodes[id as usize];
            let wild = !(dollar && id as usize == ROOT);
            if wild {
                if let Some(subs) = &node.hash {
                    if visit(subs).is_break() {
                        result = ControlFlow::Break(());
                        break 'walk;
                    }
                }
            }
            let next = if pos == DONE {
                if let Some(subs) = &node.exact {
                    if visit(subs).is_break() {
                        result = ControlFlow::Break(());
                        break 'walk;
                    }
                }
                None
            } else {
                let rest = &t[pos as usize..];
                let (level, after) = match rest.as_bytes().iter().position(|&b| b == b'/') {
                    // `/` is ASCII, so these are char boundaries; the topic
                    // is ≤ 65,535 bytes, so offsets fit in u32.
                    Some(i) => (&rest[..i], pos + i as u32 + 1),
                    None => (rest, DONE),
                };
                let plus = if wild { node.plus } else { None };
                match (node.children.get(level), plus) {
                    (Some(c), Some(p)) => {
                        stack.push((p.get(), after));
                        Some((c.get(), after))
                    }
                    (Some(c), None) => Some((c.get(), after)),
                    (None, Some(p)) => Some((p.get(), after)),
                    (None, None) => None,
                }
            };
            match next.or_else(|| stack.pop()) {
                Some((n, p)) => (id, pos) = (n, p),
                None => break 'walk,
            }
        }
        self.stack.set(stack);
        result
    }

    fn alloc(&mut self) -> NodeId {
        if let Some(id) = self.free.pop() {
            return id;
        }
        self.nodes.push(Node::default());
        u32::try_from(self.nodes.len() - 1)
            .ok()
            .and_then(NodeId::new)
            .expect("fewer than 2^32 nodes, and index 0 is the root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }

    /// Sorted `(filter, key, value)` triples the trie reports for `topic`.
    fn hits(trie: &SubscriptionTrie<u32, u8>, topic: &str) -> Vec<(String, u32, u8)> {
        let mut v = Vec::new();
        trie.for_each_match(&t(topic), |f, k, v2| v.push((f.to_string(), k, *v2)));
        v.sort();
        v
    }

    /// Whether the single filter `filter` matches `topic` in a trie.
    fn trie_matches(filter: &str, topic: &str) -> bool {
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f(filter), 1u32, 0u8);
        let found = !hits(&trie, topic).is_empty();
        assert_eq!(found, trie.has_match(&t(topic)), "{filter} vs {topic}");
        assert_eq!(
            found,
            f(filter).matches(&t(topic)),
            "reference: {filter} vs {topic}"
        );
        found
    }

    #[test]
    fn multi_level_wildcard_examples_mqtt_4_7_1_2() {
        // The spec's examples for `sport/tennis/player1/#`.
        assert!(trie_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1"
        ));
        assert!(trie_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(trie_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        // `sport/#` also matches the singular `sport` (its parent level).
        assert!(trie_matches("sport/#", "sport"));
        assert!(trie_matches("#", "sport/tennis"));
        assert!(trie_matches("#", "/"));
        assert!(!trie_matches("sport/tennis/#", "sport"));
        assert!(!trie_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player2"
        ));
    }

    #[test]
    fn single_level_wildcard_examples_mqtt_4_7_1_3() {
        assert!(trie_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(trie_matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!trie_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        // `sport/+` does not match `sport` but does match `sport/`.
        assert!(!trie_matches("sport/+", "sport"));
        assert!(trie_matches("sport/+", "sport/"));
        assert!(trie_matches("+", "sport"));
        assert!(trie_matches("+/tennis/#", "sport/tennis/player1"));
        assert!(trie_matches("+/+", "/finance"));
        assert!(trie_matches("/+", "/finance"));
        assert!(!trie_matches("+", "/finance"));
        assert!(trie_matches("sport/+/player1", "sport/tennis/player1"));
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcard_mqtt_4_7_2_1() {
        assert!(!trie_matches("#", "$SYS"));
        assert!(!trie_matches("#", "$SYS/broker/uptime"));
        assert!(!trie_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!trie_matches("+", "$SYS"));
        assert!(!trie_matches("+/#", "$SYS/x"));
        assert!(trie_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(trie_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(trie_matches("$SYS/#", "$SYS"));
        // Only the first level is special: `$` further down is an ordinary
        // character.
        assert!(trie_matches("a/+", "a/$b"));
        assert!(trie_matches("a/#", "a/$b"));
    }

    #[test]
    fn empty_levels_are_levels_mqtt_4_7_1_1() {
        assert!(trie_matches("a//b", "a//b"));
        assert!(trie_matches("a/+/b", "a//b"));
        assert!(!trie_matches("a/b", "a//b"));
        assert!(!trie_matches("a//b", "a/b"));
        assert!(trie_matches("/", "/"));
        assert!(trie_matches("+/+", "/"));
        assert!(!trie_matches("+", "/"));
        assert!(trie_matches("/#", "/"));
        assert!(trie_matches("/#", "/a/b"));
        assert!(!trie_matches("/#", "a"));
        assert!(trie_matches("a/", "a/"));
        assert!(!trie_matches("a/", "a"));
        assert!(trie_matches("a/+/+", "a//"));
    }

    #[test]
    fn topic_levels_are_case_sensitive_mqtt_4_7_3_4() {
        assert!(!trie_matches("ACCOUNTS", "Accounts"));
        assert!(trie_matches("Accounts payable", "Accounts payable"));
    }

    #[test]
    fn resubscribe_replaces_value_mqtt_3_8_4_3() {
        let mut trie = SubscriptionTrie::new();
        assert_eq!(trie.subscribe(&f("a/+"), 7u32, 0u8), None);
        assert_eq!(trie.subscribe(&f("a/+"), 7, 2), Some(0));
        assert_eq!(trie.len(), 1);
        assert_eq!(trie.filter_count(), 1);
        assert_eq!(trie.get(&f("a/+"), 7), Some(&2));
        assert_eq!(hits(&trie, "a/b"), vec![("a/+".to_string(), 7, 2)]);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_max_qos_mqtt_3_3_5_1() {
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f("a/b"), 1u32, 0u8);
        trie.subscribe(&f("a/+"), 1, 2);
        trie.subscribe(&f("#"), 1, 1);
        trie.subscribe(&f("a/#"), 2, 1);
        trie.subscribe(&f("+/b"), 2, 0);
        trie.subscribe(&f("c"), 3, 2);
        assert_eq!(hits(&trie, "a/b").len(), 5);
        let m = trie.matches(&t("a/b"));
        assert_eq!(m.len(), 2);
        assert_eq!(m[&1], 2);
        assert_eq!(m[&2], 1);
        // The reused-map form keeps capacity and clears old results.
        let mut out = HashMap::new();
        trie.collect_matches(&t("c"), &mut out, |a, b| *a = (*a).max(*b));
        assert_eq!(out.len(), 2);
        assert_eq!((out[&1], out[&3]), (1, 2));
        trie.collect_matches(&t("a/b"), &mut out, |a, b| *a = (*a).max(*b));
        assert_eq!(out.len(), 2);
        assert_eq!(out[&1], 2);
    }

    #[test]
    fn unsubscribe_returns_value_and_only_removes_that_key_mqtt_3_10_4_1() {
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f("a/#"), 1u32, 1u8);
        trie.subscribe(&f("a/#"), 2, 2);
        assert_eq!(trie.unsubscribe(&f("a/#"), 3), None);
        assert_eq!(trie.unsubscribe(&f("a/+"), 1), None);
        assert_eq!(trie.unsubscribe(&f("a/b/c"), 1), None);
        assert_eq!(trie.unsubscribe(&f("a/#"), 1), Some(1));
        assert_eq!(trie.unsubscribe(&f("a/#"), 1), None);
        assert_eq!(hits(&trie, "a"), vec![("a/#".to_string(), 2, 2)]);
        assert_eq!(trie.len(), 1);
    }

    #[test]
    fn memory_returns_after_unsubscribing_everything() {
        let mut trie = SubscriptionTrie::new();
        let mut filters = Vec::new();
        for r in 0..20 {
            for d in 0..50 {
                filters.push(f(&format!("fleet/r{r}/d{d}/cmd")));
                filters.push(f(&format!("fleet/r{r}/+/status/#")));
            }
        }
        filters.push(f("#"));
        filters.push(f("+"));
        for (i, filter) in filters.iter().enumerate() {
            trie.subscribe(filter, i as u32 % 40, 0u8);
        }
        assert!(trie.node_count() > 1000);
        for (i, filter) in filters.iter().enumerate() {
            trie.unsubscribe(filter, i as u32 % 40);
        }
        assert_eq!(trie.len(), 0);
        assert_eq!(trie.filter_count(), 0);
        assert_eq!(trie.node_count(), 0);
        assert!(trie.is_empty());
        assert!(!trie.has_match(&t("fleet/r1/d1/cmd")));
        // Partial pruning: a branch shared with a live filter stays.
        trie.subscribe(&f("a/b/c"), 1, 0);
        trie.subscribe(&f("a/b/d/e"), 1, 0);
        assert_eq!(trie.node_count(), 5);
        trie.unsubscribe(&f("a/b/d/e"), 1);
        assert_eq!(trie.node_count(), 3);
        assert!(trie.has_match(&t("a/b/c")));
    }

    #[test]
    fn many_subscribers_on_one_filter_and_many_children() {
        let mut trie = SubscriptionTrie::new();
        for k in 0..1000u32 {
            trie.subscribe(&f("broadcast"), k, (k % 3) as u8);
            trie.subscribe(&f(&format!("dev/{k}")), k, 1);
        }
        assert_eq!(trie.len(), 2000);
        assert_eq!(trie.matches(&t("broadcast")).len(), 1000);
        assert_eq!(
            hits(&trie, "dev/999"),
            vec![("dev/999".to_string(), 999, 1)]
        );
        for k in 0..1000u32 {
            assert_eq!(trie.unsubscribe(&f("broadcast"), k), Some((k % 3) as u8));
            if k < 999 {
                assert_eq!(trie.unsubscribe(&f(&format!("dev/{k}")), k), Some(1));
            }
        }
        assert_eq!(
            hits(&trie, "dev/999"),
            vec![("dev/999".to_string(), 999, 1)]
        );
        assert!(!trie.has_match(&t("broadcast")));
        assert_eq!(trie.node_count(), 2);
    }

    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        // 32,000 levels: the most a 65,535-byte filter can hold, near enough.
        let deep = vec!["a"; 32_000].join("/");
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f(&deep), 1u32, 0u8);
        trie.subscribe(&f(&format!("{deep}/#")), 2, 0);
        trie.subscribe(&f(&vec!["+"; 32_000].join("/")), 3, 0);
        assert_eq!(trie.matches(&t(&deep)).len(), 3);
        trie.unsubscribe(&f(&deep), 1);
        assert_eq!(trie.matches(&t(&deep)).len(), 2);
        drop(trie);
    }

    #[test]
    fn alias_only_topic_matches_nothing() {
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f("#"), 1u32, 0u8);
        assert!(!trie.has_match(&TopicName::alias_only()));
    }

    #[test]
    fn callback_may_match_again() {
        let mut trie = SubscriptionTrie::new();
        trie.subscribe(&f("a/+"), 1u32, 0u8);
        trie.subscribe(&f("a/b"), 2, 0);
        let mut n = 0;
        trie.for_each_match(&t("a/b"), |_, _, _| {
            trie.for_each_match(&t("a/c"), |_, _, _| n += 1);
        });
        assert_eq!(n, 2);
    }

    // --- property test against the reference matcher -----------------------

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "", "+", "$s"]);
        let last = prop::sample::select(vec!["a", "b", "", "+", "#", "$s"]);
        (prop::collection::vec(level, 0..4), last).prop_map(|(mut v, l)| {
            v.push(l);
            v.join("/")
        })
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$s"]), 1..6)
            .prop_map(|v| v.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn trie_agrees_with_reference_mqtt_4_7(
            subs in prop::collection::vec((filter_strategy(), 0u32..4, any::<u8>()), 0..40),
            drop_mask in prop::collection::vec(any::<bool>(), 40),
            topics in prop::collection::vec(topic_strategy(), 1..20),
        ) {
            let subs: Vec<_> = subs
                .into_iter()
                .filter_map(|(fs, k, v)| TopicFilter::new(fs).ok().map(|f| (f, k, v)))
                .collect();
            let topics: Vec<_> = topics.into_iter().filter_map(|s| TopicName::new(s).ok()).collect();
            let mut trie = SubscriptionTrie::new();
            let mut model: BTreeMap<(String, u32), u8> = BTreeMap::new();
            for (filter, k, v) in &subs {
                let old = model.insert((filter.to_string(), *k), *v);
                prop_assert_eq!(trie.subscribe(filter, *k, *v), old);
            }
            for (i, (filter, k, _)) in subs.iter().enumerate() {
                if drop_mask[i] {
                    let old = model.remove(&(filter.to_string(), *k));
                    prop_assert_eq!(trie.unsubscribe(filter, *k), old);
                }
            }
            prop_assert_eq!(trie.len(), model.len());
            let distinct: BTreeSet<_> = model.keys().map(|(f, _)| f.clone()).collect();
            prop_assert_eq!(trie.filter_count(), distinct.len());
            for topic in &topics {
                let mut expected: Vec<(String, u32, u8)> = model
                    .iter()
                    .filter(|((fs, _), _)| f(fs).matches(topic))
                    .map(|((fs, k), v)| (fs.clone(), *k, *v))
                    .collect();
                expected.sort();
                let got = hits(&trie, topic);
                prop_assert_eq!(&got, &expected, "topic {}", topic);
                prop_assert_eq!(trie.has_match(topic), !expected.is_empty());
                let mut max: BTreeMap<u32, u8> = BTreeMap::new();
                for (_, k, v) in &expected {
                    let e = max.entry(*k).or_insert(*v);
                    *e = (*e).max(*v);
                }
                let collapsed: BTreeMap<u32, u8> = trie.matches(topic).into_iter().collect();
                prop_assert_eq!(collapsed, max);
            }
            for (filter, k) in model.keys().cloned().collect::<Vec<_>>() {
                prop_assert!(trie.unsubscribe(&f(&filter), k).is_some());
            }
            prop_assert_eq!(trie.node_count(), 0);
            prop_assert!(trie.is_empty());
        }
    }
}

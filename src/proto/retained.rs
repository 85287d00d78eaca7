//! Retained messages (MQTT-3.3.1-5 .. -12): the last retained PUBLISH per
//! topic, replaced by the next, removed by an empty payload, and sent with
//! RETAIN=1 to every new matching subscription.
//!
//! # Which shard stores what
//!
//! Each topic's retained message lives on exactly one shard, its *retained
//! owner* ([`retained_owner`]: a hash of the topic), so there is one copy in
//! the process and one order of updates per topic: two clients on two shards
//! setting the same topic at once end with the same message for everyone.
//! Every PUBLISH already travels to every shard (for live delivery); the
//! owner is the one that stores it when RETAIN is set.
//!
//! A new subscription on shard S is answered from S's own part at once, and
//! asks the other shards for theirs: an exact filter names one topic, so it
//! asks only that topic's owner; a wildcard filter asks every shard, each of
//! which walks its own tree and replies with what matches. Replies arrive
//! after the SUBACK, as the spec allows (MQTT-3.3.1-6 only asks that they
//! are sent).
//!
//! # Shape
//!
//! A tree of topic levels in one arena (`dev` → `42` → `status`), so that a
//! wildcard filter walks only the branches it can match instead of testing
//! every retained topic: `dev/+/status` over a million devices visits the
//! million `+` branches once each, `dev/42/#` one subtree. Iterative walks:
//! topics may have thousands of levels.
//!
//! Stored messages are copies: a decoded topic and payload are slices of the
//! connection's read buffer, and a store that lives for days must not pin
//! read buffers. The copy is paid once per retained PUBLISH stored, not per
//! delivery (deliveries share it).

use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;
use hashbrown::HashMap;

use super::codec::{Properties, QoS};
use super::topic::{TopicFilter, TopicName};
use super::{Millis, ShardId};

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    /// The topic it was published to.
    pub topic: TopicName,
    /// Its payload (never empty: an empty one clears the topic).
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// Its MQTT 5 properties, sent with it to new subscribers.
    pub props: Option<Arc<Properties>>,
    /// When it expires (Message Expiry Interval): after that the broker no
    /// longer sends it (MQTT-3.3.2-5); it is replaced or cleared as usual.
    pub expires_at: Option<Millis>,
}

/// A copy of `p` whose strings own their bytes: decoded properties are
/// slices of a connection's read buffer, which a stored message must not pin.
fn owned_properties(p: &Properties) -> Properties {
    let s = |v: &ByteString| ByteString::from(String::from(&**v));
    let mut out = p.clone();
    out.content_type = p.content_type.as_ref().map(s);
    out.response_topic = p.response_topic.as_ref().map(s);
    out.correlation_data = p
        .correlation_data
        .as_ref()
        .map(|b| Bytes::copy_from_slice(b));
    out.user_properties = p
        .user_properties
        .iter()
        .map(|(k, v)| (s(k), s(v)))
        .collect();
    out
}

/// The shard that stores `topic`'s retained message (FNV-1a of the topic,
/// like the clientId owner).
pub fn retained_owner(topic: &str, shards: u16) -> ShardId {
    super::handshake::owner_of(topic, shards)
}

/// Above this many children, a node's children are found by hash instead of
/// by scanning.
const FEW_CHILDREN: usize = 8;

const ROOT: u32 = 0;

enum Children {
    /// Indices of the children; their level names are in the nodes.
    Few(Vec<u32>),
    /// Level name → index, for wide levels (a fleet's device ids).
    Many(HashMap<ByteString, u32>),
}

struct Node {
    /// The level name, a slice of the first stored topic that passed here.
    key: ByteString,
    parent: u32,
    children: Children,
    /// Boxed: most nodes are levels on the way, without a message.
    msg: Option<Box<RetainedMessage>>,
}

impl Node {
    fn new(key: ByteString, parent: u32) -> Node {
        Node {
            key,
            parent,
            children: Children::Few(Vec::new()),
            msg: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.msg.is_none()
            && match &self.children {
                Children::Few(v) => v.is_empty(),
                Children::Many(m) => m.is_empty(),
            }
    }
}

/// The retained messages one shard owns.
pub struct RetainedStore {
    nodes: Vec<Node>,
    free: Vec<u32>,
    len: usize,
}

impl Default for RetainedStore {
    fn default() -> Self {
        RetainedStore {
            nodes: vec![Node::new(ByteString::new(), ROOT)],
            free: Vec::new(),
            len: 0,
        }
    }
}

impl std::fmt::Debug for RetainedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedStore")
            .field("topics", &self.len)
            .field("nodes", &(self.nodes.len() - self.free.len()))
            .finish()
    }
}

impl RetainedStore {
    /// Stores `msg` for its topic, replacing what was there, or clears the
    /// topic when the payload is empty (MQTT-3.3.1-10, -11).
    pub fn set(&mut self, msg: RetainedMessage) {
        if msg.payload.is_empty() {
            self.clear(&msg.topic);
            return;
        }
        // One copy of the topic: the level keys made below are slices of it.
        let topic = ByteString::from(String::from(msg.topic.as_str()));
        let mut node = ROOT;
        for level in topic.split('/') {
            node = match self.child(node, level) {
                Some(c) => c,
                None => {
                    let key = topic.slice_ref(level);
                    self.add_child(node, key)
                }
            };
        }
        let stored = Box::new(RetainedMessage {
            topic: TopicName::new(topic).expect("a copy of a valid topic name"),
            payload: Bytes::copy_from_slice(&msg.payload),
            qos: msg.qos,
            props: msg.props.map(|p| Arc::new(owned_properties(&p))),
            expires_at: msg.expires_at,
        });
        if self.nodes[node as usize].msg.replace(stored).is_none() {
            self.len += 1;
        }
    }

    fn clear(&mut self, topic: &TopicName) {
        let Some(mut node) = self.find(topic.as_str()) else {
            return;
        };
        if self.nodes[node as usize].msg.take().is_none() {
            return;
        }
        self.len -= 1;
        if self.len == 0 {
            // Everything is gone: give the arena back.
            *self = RetainedStore::default();
            return;
        }
        // Prune the levels nothing else needs, bottom up.
        while node != ROOT && self.nodes[node as usize].is_empty() {
            let parent = self.nodes[node as usize].parent;
            self.remove_child(parent, node);
            node = parent;
        }
    }

    /// The retained message of exactly `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<&RetainedMessage> {
        let node = self.find(topic)?;
        self.nodes[node as usize].msg.as_deref()
    }

    fn find(&self, topic: &str) -> Option<u32> {
        let mut node = ROOT;
        for level in topic.split('/') {
            node = self.child(node, level)?;
        }
        Some(node)
    }

    /// The number of retained topics.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` for every retained message `filter` matches: `+` one level,
    /// `#` the level it stands at and everything below (MQTT-4.7.1-2), and
    /// neither matching a first level that begins with `$` (MQTT-4.7.2-1).
    pub fn for_each_match(&self, filter: &TopicFilter, mut f: impl FnMut(&RetainedMessage)) {
        let levels: Vec<&str> = filter.as_str().split('/').collect();
        // (node, index of the filter level to match under it)
        let mut stack: Vec<(u32, usize)> = vec![(ROOT, 0)];
        while let Some((node, i)) = stack.pop() {
            let Some(&level) = levels.get(i) else {
                if let Some(m) = &self.nodes[node as usize].msg {
                    f(m);
                }
                continue;
            };
            let at_root = node == ROOT;
            match level {
                "#" => {
                    // The parent level itself (`a/#` matches `a`), except at
                    // the root, which stands for no level at all.
                    if !at_root {
                        if let Some(m) = &self.nodes[node as usize].msg {
                            f(m);
                        }
                    }
                    self.each_child(node, |c, key| {
                        if !(at_root && key.starts_with('$')) {
                            self.for_each_below(c, &mut f);
                        }
                    });
                }
                "+" => self.each_child(node, |c, key| {
                    if !(at_root && key.starts_with('$')) {
                        stack.push((c, i + 1));
                    }
                }),
                literal => {
                    if let Some(c) = self.child(node, literal) {
                        stack.push((c, i + 1));
                    }
                }
            }
        }
    }

    /// Every stored message, `$` topics included (a snapshot).
    pub fn for_each(&self, mut f: impl FnMut(&RetainedMessage)) {
        self.for_each_below(ROOT, &mut f);
    }

    /// Every message at `node` and below.
    fn for_each_below(&self, node: u32, f: &mut impl FnMut(&RetainedMessage)) {
        let mut stack = vec![node];
        while let Some(n) = stack.pop() {
            if let Some(m) = &self.nodes[n as usize].msg {
                f(m);
            }
            self.each_child(n, |c, _| stack.push(c));
        }
    }

    fn each_child(&self, node: u32, mut f: impl FnMut(u32, &str)) {
        match &self.nodes[node as usize].children {
            Children::Few(v) => {
                for &c in v {
                    f(c, &self.nodes[c as usize].key);
                }
            }
            Children::Many(m) => {
                for (key, &c) in m {
                    f(c, key);
                }
            }
        }
    }

    fn child(&self, node: u32, level: &str) -> Option<u32> {
        match &self.nodes[node as usize].children {
            Children::Few(v) => v
                .iter()
                .copied()
                .find(|&c| &*self.nodes[c as usize].key == level),
            Children::Many(m) => m.get(level).copied(),
        }
    }

    fn add_child(&mut self, parent: u32, key: ByteString) -> u32 {
        let node = Node::new(key.clone(), parent);
        let index = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let few_full = matches!(&self.nodes[parent as usize].children,
            Children::Few(v) if v.len() >= FEW_CHILDREN);
        if few_full {
            let Children::Few(v) = std::mem::replace(
                &mut self.nodes[parent as usize].children,
                Children::Many(HashMap::new()),
            ) else {
                unreachable!("checked above")
            };
            let map: HashMap<ByteString, u32> = v
                .into_iter()
                .map(|c| (self.nodes[c as usize].key.clone(), c))
                .collect();
            self.nodes[parent as usize].children = Children::Many(map);
        }
        match &mut self.nodes[parent as usize].children {
            Children::Few(v) => v.push(index),
            Children::Many(m) => {
                m.insert(key, index);
            }
        }
        index
    }

    fn remove_child(&mut self, parent: u32, child: u32) {
        let key = std::mem::take(&mut self.nodes[child as usize].key);
        match &mut self.nodes[parent as usize].children {
            Children::Few(v) => v.retain(|&c| c != child),
            Children::Many(m) => {
                m.remove(&*key);
                if m.is_empty() {
                    self.nodes[parent as usize].children = Children::Few(Vec::new());
                }
            }
        }
        self.nodes[child as usize] = Node::new(ByteString::new(), ROOT);
        self.free.push(child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &'static [u8]) -> RetainedMessage {
        RetainedMessage {
            topic: TopicName::new(topic.to_string()).unwrap(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            props: None,
            expires_at: None,
        }
    }

    fn matches(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.for_each_match(&TopicFilter::new(filter.to_string()).unwrap(), |m| {
            out.push(format!(
                "{}={}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            ))
        });
        out.sort();
        out
    }

    #[test]
    fn retained_replaced_and_cleared_by_empty_payload_mqtt_3_3_1_10_and_11() {
        let mut s = RetainedStore::default();
        s.set(msg("dev/1/status", b"online"));
        s.set(msg("dev/1/status", b"offline"));
        assert_eq!(matches(&s, "dev/1/status"), ["dev/1/status=offline"]);
        assert_eq!(s.len(), 1);
        s.set(msg("dev/1/status", b""));
        assert!(s.is_empty());
        assert_eq!(s.nodes.len(), 1, "the tree is pruned back to its root");
        // Clearing what is not there is nothing.
        s.set(msg("dev/9", b""));
        assert!(s.is_empty());
    }

    #[test]
    fn wildcard_filter_gets_every_matching_topic_but_not_dollar_topics_mqtt_4_7_2_1() {
        let mut s = RetainedStore::default();
        s.set(msg("dev/1/status", b"a"));
        s.set(msg("dev/2/status", b"b"));
        s.set(msg("dev/2/other", b"c"));
        s.set(msg("$SYS/x", b"d"));
        s.set(msg("dev", b"e"));
        assert_eq!(
            matches(&s, "dev/+/status"),
            ["dev/1/status=a", "dev/2/status=b"]
        );
        assert_eq!(matches(&s, "#").len(), 4);
        assert_eq!(matches(&s, "+/+/status").len(), 2);
        assert_eq!(matches(&s, "$SYS/#"), ["$SYS/x=d"]);
        assert_eq!(matches(&s, "+/x"), Vec::<String>::new());
        // `dev/#` matches `dev` itself (MQTT-4.7.1-2).
        assert_eq!(matches(&s, "dev/#").len(), 4);
        assert_eq!(matches(&s, "dev/2/#").len(), 2);
    }

    #[test]
    fn empty_levels_and_wide_levels() {
        let mut s = RetainedStore::default();
        s.set(msg("/a", b"1"));
        s.set(msg("a/", b"2"));
        s.set(msg("a//b", b"3"));
        assert_eq!(matches(&s, "+/a"), ["/a=1"]);
        assert_eq!(matches(&s, "a/+"), ["a/=2"]);
        assert_eq!(matches(&s, "a/+/b"), ["a//b=3"]);
        // Past FEW_CHILDREN a level switches to a map; removal still prunes.
        for i in 0..100 {
            s.set(RetainedMessage {
                topic: TopicName::new(format!("fleet/{i}/status")).unwrap(),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                props: None,
                expires_at: None,
            });
        }
        assert_eq!(matches(&s, "fleet/+/status").len(), 100);
        assert_eq!(matches(&s, "fleet/57/status"), ["fleet/57/status=x"]);
        for i in 0..100 {
            s.set(msg(&format!("fleet/{i}/status"), b""));
        }
        assert_eq!(s.len(), 3);
        assert!(s.get("fleet/57/status").is_none());
    }

    #[test]
    fn stored_messages_are_copies_that_free_the_read_buffer() {
        let buffer = Bytes::from(b"dev/1/statusonline".to_vec());
        let mut s = RetainedStore::default();
        s.set(RetainedMessage {
            topic: TopicName::new(ByteString::try_from(buffer.slice(0..12)).unwrap()).unwrap(),
            payload: buffer.slice(12..),
            qos: QoS::AtMostOnce,
            props: None,
            expires_at: None,
        });
        // Only our handle is left on the buffer: the store holds none.
        assert!(buffer.is_unique());
        assert_eq!(&s.get("dev/1/status").unwrap().payload[..], b"online");
    }

    #[test]
    fn matches_agree_with_filter_matches_on_random_sets() {
        // A deterministic mix of topics and filters, checked against the
        // reference matcher `TopicFilter::matches`.
        let levels = ["a", "b", "$c", "", "dd"];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut s = RetainedStore::default();
        let mut topics = Vec::new();
        for _ in 0..300 {
            let n = 1 + next() % 4;
            let t: Vec<&str> = (0..n).map(|_| levels[(next() % 5) as usize]).collect();
            let t = t.join("/");
            if t.is_empty() {
                continue;
            }
            s.set(msg(&t, b"p"));
            topics.push(t);
        }
        topics.sort();
        topics.dedup();
        let filters = [
            "#", "+", "+/+", "a/#", "+/b/#", "$c/#", "a/+/dd", "/#", "+/", "b",
        ];
        for f in filters {
            let filter = TopicFilter::new(f.to_string()).unwrap();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| filter.matches(&TopicName::new(t.to_string()).unwrap()))
                .map(|t| format!("{t}=p"))
                .collect();
            want.sort();
            assert_eq!(matches(&s, f), want, "filter {f}");
        }
    }
}

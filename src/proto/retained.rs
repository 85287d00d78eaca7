//! Retained messages (MQTT-3.3.1-5 .. -11): the last retained PUBLISH per topic,
//! replaced by the next, removed by an empty payload, and sent with RETAIN=1 to
//! every new matching subscription.
//!
//! Every shard keeps a full replica: a retained PUBLISH is broadcast to all
//! shards, so a wildcard subscription on any shard is answered from local
//! memory without a cross-shard round trip. Payloads are `Bytes`, shared with
//! the messages in flight.

use bytes::Bytes;
use hashbrown::HashMap;

use super::codec::QoS;
use super::topic::{TopicFilter, TopicName};

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    /// The topic it was published to.
    pub topic: TopicName,
    /// Its payload (never empty: an empty one clears the topic).
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
}

/// The retained messages of one shard.
#[derive(Debug, Default)]
pub struct RetainedStore {
    by_topic: HashMap<TopicName, RetainedMessage>,
}

impl RetainedStore {
    /// Stores `msg` for its topic, or clears the topic when the payload is
    /// empty (MQTT-3.3.1-10, -11).
    pub fn set(&mut self, msg: RetainedMessage) {
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
        } else {
            self.by_topic.insert(msg.topic.clone(), msg);
        }
    }

    /// The number of retained topics.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Calls `f` for every retained message `filter` matches. An exact filter
    /// is one lookup; a wildcard filter scans the store.
    pub fn for_each_match(&self, filter: &TopicFilter, mut f: impl FnMut(&RetainedMessage)) {
        if !filter.has_wildcards() {
            if let Ok(topic) = TopicName::new(filter.as_bytestring().clone()) {
                if let Some(msg) = self.by_topic.get(&topic) {
                    f(msg);
                }
            }
            return;
        }
        for msg in self.by_topic.values() {
            if filter.matches(&msg.topic) {
                f(msg);
            }
        }
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
        s.set(msg("dev/1/status", b""));
        assert!(s.is_empty());
    }

    #[test]
    fn wildcard_filter_gets_every_matching_topic_but_not_dollar_topics() {
        let mut s = RetainedStore::default();
        s.set(msg("dev/1/status", b"a"));
        s.set(msg("dev/2/status", b"b"));
        s.set(msg("dev/2/other", b"c"));
        s.set(msg("$SYS/x", b"d"));
        assert_eq!(
            matches(&s, "dev/+/status"),
            ["dev/1/status=a", "dev/2/status=b"]
        );
        assert_eq!(matches(&s, "#").len(), 3);
        assert_eq!(matches(&s, "$SYS/#"), ["$SYS/x=d"]);
    }
}

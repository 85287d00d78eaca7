//! A client session: what the broker keeps for one clientId, connected or not
//! (MQTT 3.1.1 §3.1.2.4): its subscriptions, the QoS 1/2 messages in flight to
//! it, and the QoS 2 packet ids it has sent us that await PUBREL.

use std::collections::VecDeque;

use bytes::Bytes;
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};

use super::codec::{PacketId, Publish, QoS};
use super::topic::{TopicFilter, TopicName};
use super::ConnId;

/// Index of a session in its shard's session table; the trie's subscriber key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(pub u32);

/// One client's session.
#[derive(Debug)]
pub struct Session {
    /// The clientId it belongs to.
    pub client_id: ByteString,
    /// cleanSession of the connection that made it: a clean session ends with
    /// its connection (MQTT-3.1.2-6); a persistent one outlives it.
    pub clean: bool,
    /// The connection attached now, if any.
    pub conn: Option<ConnId>,
    /// Subscriptions and their granted QoS, restored on a resumed session
    /// (MQTT-3.2.2-2 and §3.1.2.4).
    pub subscriptions: HashMap<TopicFilter, QoS>,
    /// QoS 1/2 PUBLISHes sent to the client and not yet acknowledged, keyed by
    /// packet id. A PUBLISH whose PUBREC arrived is kept as `released`.
    pub inflight: HashMap<u16, Inflight>,
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL:
    /// a resent PUBLISH with one of these ids is not routed again (MQTT-4.3.3).
    pub awaiting_rel: HashSet<u16>,
    /// QoS 1/2 messages owed to the client that are not yet in flight: it is
    /// offline (a persistent session), or its inflight window is full. Sent in
    /// order, after the messages in flight (MQTT-4.6.0).
    pub queue: VecDeque<QueuedMessage>,
    next_packet_id: u16,
}

/// A message waiting in a session's queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Topic published to.
    pub topic: TopicName,
    /// Payload, shared with every other delivery of the message.
    pub payload: Bytes,
    /// Delivery QoS: already the minimum of publish and subscription.
    pub qos: QoS,
    /// RETAIN as it will be sent (1 only for retained messages sent because
    /// of a new subscription).
    pub retain: bool,
}

/// An outgoing QoS 1/2 message awaiting its acknowledgement.
#[derive(Debug, Clone)]
pub enum Inflight {
    /// Sent; awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Publish),
    /// QoS 2: PUBREC received and PUBREL sent; awaiting PUBCOMP.
    Released,
}

impl Session {
    /// A fresh session with no subscriptions.
    pub fn new(client_id: ByteString, clean: bool) -> Self {
        Session {
            client_id,
            clean,
            conn: None,
            subscriptions: HashMap::new(),
            inflight: HashMap::new(),
            awaiting_rel: HashSet::new(),
            queue: VecDeque::new(),
            next_packet_id: 1,
        }
    }

    /// The next packet id not in flight (MQTT-2.3.1-2: an id is reusable only
    /// once its flow is complete). `None` when all 65,535 are in use.
    pub fn allocate_packet_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return PacketId::new(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap_mqtt_2_3_1_2() {
        let mut s = Session::new(ByteString::from("c"), true);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
        s.inflight.insert(2, Inflight::Released);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(3));
        s.next_packet_id = u16::MAX;
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(u16::MAX));
        // Wraps past 0, which is never an id (MQTT-2.3.1-1).
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
    }

    #[test]
    fn no_id_when_all_are_in_flight() {
        let mut s = Session::new(ByteString::from("c"), true);
        for id in 1..=u16::MAX {
            s.inflight.insert(id, Inflight::Released);
        }
        assert_eq!(s.allocate_packet_id(), None);
    }
}

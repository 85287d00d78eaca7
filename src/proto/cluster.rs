//! The sans-IO half of `--cluster`: what nodes say to each other over NATS
//! ([`NodeMsg`], its byte format) and the cluster link's routing tables
//! ([`Routes`]): which of this node's shards want a topic, which other
//! nodes do, and what changes must be told to whom.
//!
//! # Routes between nodes
//!
//! The link is one more peer on the node's mesh. Shards announce their
//! filters to it as they announce them to each other (`InterestAdd` /
//! `InterestRemove`, see [`super::interest`]); the link counts them per
//! node and tells the other nodes only when a filter goes from no shard of
//! this node to some ([`NodeMsg::RouteAdd`]) and back
//! ([`NodeMsg::RouteRemove`]). In the other direction it keeps, per peer
//! node, the filters that node announced, and announces their union to its
//! own shards as if it were a shard: a publish then reaches the link only
//! when some other node wants it.
//!
//! A `RouteAdd` is a request: the peer answers once every one of its shards
//! routes the filter's publishes to its link. The SUBACK waits for those
//! answers (the shard's announcement is acknowledged by the link only
//! then), so a subscriber that got its SUBACK gets every publish sent
//! anywhere in the cluster after it, as within one node.
//!
//! # Shared subscriptions
//!
//! The owner shard of a shared group also announces the group itself
//! (`$share/GROUP/FILTER`) to the link, which passes it on like a filter;
//! peers keep it apart from their routes. A publish matching a group goes
//! to the group's members here when this node has some (its shards route
//! it as on a lone node), and otherwise to one of the nodes that have
//! members, in turn ([`Routes::pick_group_nodes`]); the message names the
//! groups the receiving node delivers it to, and its other groups leave it
//! alone. Each message reaches one member of each group, once.
//!
//! A node that (re)joins asks each peer for its whole filter set
//! ([`NodeMsg::RouteDump`]); the peer counts the asker as live from then
//! on, so every later change reaches it too.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};

use super::codec::properties;
use super::codec::wire::{self, Reader};
use super::codec::{Properties, QoS};
use super::interest::{Interest, ShardSet};
use super::shared::{self, Shared};
use super::topic::{TopicFilter, TopicName};
use super::ShardId;

/// A node as its messages name it: its name and the random number it drew
/// at start (a restarted node is a new incarnation: what the old one
/// announced is forgotten).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    /// `--node-name`.
    pub name: ByteString,
    /// Drawn at start.
    pub incarnation: u64,
}

/// A publish travelling between nodes. Its expiry travels as time left,
/// not as a point in time: nodes' clocks are not compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePublish {
    /// Topic.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// RETAIN as published: every node stores it.
    pub retain: bool,
    /// MQTT 5 properties forwarded with it.
    pub props: Option<Arc<Properties>>,
    /// Milliseconds left of its Message Expiry Interval.
    pub expires_in_ms: Option<u64>,
    /// The shared groups (`$share/GROUP/FILTER`) the receiving node
    /// delivers it to: the sender chose that node for them. Its other
    /// groups do not get it (another node's members did, or the sender's).
    pub shares: Vec<ByteString>,
}

/// What one node says to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMsg {
    /// The heartbeat, every second on the cluster's hello subject.
    Hello(NodeId),
    /// A clean shutdown: forget this node now.
    Bye(NodeId),
    /// Filters new to the sender (a request: answered once applied).
    RouteAdd(NodeId, Vec<TopicFilter>),
    /// Filters the sender has no subscription to any more.
    RouteRemove(NodeId, Vec<TopicFilter>),
    /// Asks for the receiver's whole filter set (a request, answered with
    /// a `RouteAdd`); the receiver counts the asker as live from now on.
    RouteDump(NodeId),
    /// Deliver to this node's subscribers. A request when the sender waits
    /// for it (QoS 1/2): the answer is one byte, 1 if a copy was dropped
    /// for a full queue.
    Publish(NodePublish),
    /// The sender took client `.0` over (its entry in the session registry
    /// names the sender now): close its connection here and, with `.1`,
    /// answer with its session as records (empty: none).
    Kick(ByteString, bool),
}

const HELLO: u8 = 1;
const BYE: u8 = 2;
const ROUTE_ADD: u8 = 3;
const ROUTE_REMOVE: u8 = 4;
const ROUTE_DUMP: u8 = 5;
const PUBLISH: u8 = 6;
const KICK: u8 = 7;

/// The first byte of every message: a node of another format is ignored,
/// not misread.
pub const WIRE_VERSION: u8 = 1;

impl NodeMsg {
    /// The message's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_u8(WIRE_VERSION);
        match self {
            NodeMsg::Hello(n) => {
                out.put_u8(HELLO);
                put_node(&mut out, n);
            }
            NodeMsg::Bye(n) => {
                out.put_u8(BYE);
                put_node(&mut out, n);
            }
            NodeMsg::RouteAdd(n, filters) | NodeMsg::RouteRemove(n, filters) => {
                let tag = if matches!(self, NodeMsg::RouteAdd(..)) {
                    ROUTE_ADD
                } else {
                    ROUTE_REMOVE
                };
                out.put_u8(tag);
                put_node(&mut out, n);
                out.put_u32(filters.len() as u32);
                for f in filters {
                    wire::put_str(&mut out, f.as_str().as_bytes());
                }
            }
            NodeMsg::RouteDump(n) => {
                out.put_u8(ROUTE_DUMP);
                put_node(&mut out, n);
            }
            NodeMsg::Kick(client_id, export) => {
                out.put_u8(KICK);
                wire::put_str(&mut out, client_id.as_bytes());
                out.put_u8(u8::from(*export));
            }
            NodeMsg::Publish(p) => {
                out.put_u8(PUBLISH);
                let flags = p.qos as u8
                    | u8::from(p.retain) << 2
                    | u8::from(p.expires_in_ms.is_some()) << 3;
                out.put_u8(flags);
                wire::put_str(&mut out, p.topic.as_str().as_bytes());
                if let Some(ms) = p.expires_in_ms {
                    put_u64(&mut out, ms);
                }
                match &p.props {
                    None => out.put_u8(0),
                    Some(props) => properties::encode(&Some(Box::new((**props).clone())), &mut out),
                }
                out.put_u16(p.shares.len() as u16);
                for s in &p.shares {
                    wire::put_str(&mut out, s.as_bytes());
                }
                out.put_slice(&p.payload);
            }
        }
        out.freeze()
    }

    /// Reads a message; `None` for anything malformed or of another
    /// version (a peer is never trusted to be well-formed).
    pub fn decode(buf: &Bytes) -> Option<NodeMsg> {
        let mut r = Reader::new(buf, 0);
        if r.u8().ok()? != WIRE_VERSION {
            return None;
        }
        let msg = match r.u8().ok()? {
            HELLO => NodeMsg::Hello(node(&mut r)?),
            BYE => NodeMsg::Bye(node(&mut r)?),
            tag @ (ROUTE_ADD | ROUTE_REMOVE) => {
                let n = node(&mut r)?;
                let count = r.u32().ok()? as usize;
                // Each filter takes at least 3 bytes: no huge allocation
                // from a forged count.
                let mut filters = Vec::with_capacity(count.min(r.remaining() / 3));
                for _ in 0..count {
                    filters.push(r.topic_filter().ok()?);
                }
                if tag == ROUTE_ADD {
                    NodeMsg::RouteAdd(n, filters)
                } else {
                    NodeMsg::RouteRemove(n, filters)
                }
            }
            ROUTE_DUMP => NodeMsg::RouteDump(node(&mut r)?),
            KICK => {
                let client_id = r.string().ok()?;
                match r.u8().ok()? {
                    0 => NodeMsg::Kick(client_id, false),
                    1 => NodeMsg::Kick(client_id, true),
                    _ => return None,
                }
            }
            PUBLISH => {
                let flags = r.u8().ok()?;
                let qos = QoS::from_u8(flags & 3)?;
                let topic = wire::topic_name(r.raw_topic().ok()?).ok()?;
                if topic.is_empty() {
                    return None;
                }
                let expires_in_ms = if flags & 8 != 0 {
                    Some(get_u64(&mut r)?)
                } else {
                    None
                };
                let props = properties::decode(&mut r, properties::PUBLISH, true)
                    .ok()?
                    .map(|b| Arc::new(*b));
                let count = r.u16().ok()?;
                let mut shares = Vec::with_capacity(usize::from(count).min(r.remaining() / 2));
                for _ in 0..count {
                    shares.push(r.string().ok()?);
                }
                let payload = r.bytes(r.remaining()).ok()?;
                return Some(NodeMsg::Publish(NodePublish {
                    topic,
                    payload,
                    qos,
                    retain: flags & 4 != 0,
                    props,
                    expires_in_ms,
                    shares,
                }));
            }
            _ => return None,
        };
        r.is_empty().then_some(msg)
    }
}

/// One more holder of `f` (a shard, or a peer); true when it is the first.
fn count_up(counts: &mut HashMap<ByteString, u32>, f: &TopicFilter) -> bool {
    let count = counts.entry(f.as_bytestring().clone()).or_insert(0);
    *count += 1;
    *count == 1
}

/// One holder of `f` fewer; true when it was the last.
fn count_down(counts: &mut HashMap<ByteString, u32>, f: &TopicFilter) -> bool {
    match counts.get_mut(f.as_bytestring()) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            counts.remove(f.as_bytestring());
            true
        }
        None => false,
    }
}

/// A `$share/GROUP/FILTER` filter: a shared group, not a route.
fn is_share(f: &TopicFilter) -> bool {
    f.as_str().starts_with(shared::SHARE_PREFIX)
}

fn put_u64(out: &mut BytesMut, v: u64) {
    out.put_u64(v);
}

fn get_u64(r: &mut Reader<'_>) -> Option<u64> {
    let hi = r.u32().ok()?;
    let lo = r.u32().ok()?;
    Some(u64::from(hi) << 32 | u64::from(lo))
}

fn put_node(out: &mut BytesMut, n: &NodeId) {
    wire::put_str(out, n.name.as_bytes());
    put_u64(out, n.incarnation);
}

fn node(r: &mut Reader<'_>) -> Option<NodeId> {
    let name = r.string().ok()?;
    let incarnation = get_u64(r)?;
    Some(NodeId { name, incarnation })
}

/// A peer node the link knows of.
#[derive(Debug)]
struct Peer {
    id: NodeId,
    /// The filters it announced.
    filters: HashSet<ByteString>,
    /// When its last heartbeat (or any message) came, in the link's clock.
    last_seen_ms: u64,
}

/// What [`Routes::peer_seen`] learned.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// A node not known before: ask it for its filters.
    New(u16),
    /// A node known under an earlier incarnation (the third field): what
    /// it announced then is forgotten (the filters listed went from some
    /// node to none); ask it again.
    Restarted(u16, Vec<TopicFilter>, u64),
    /// Nothing new.
    Known(u16),
}

/// The most peer nodes a link tracks: a node set is one `u64`.
pub const MAX_PEERS: usize = 64;

/// A shared group some peer nodes have members of.
#[derive(Debug)]
struct Group {
    /// FILTER of `$share/GROUP/FILTER`.
    filter: TopicFilter,
    /// The peers with members.
    nodes: ShardSet,
    /// Round robin among them.
    next: u32,
}

/// The cluster link's tables (see the module notes).
#[derive(Default)]
pub struct Routes {
    /// Shared groups of peers, by `$share/GROUP/FILTER`: a publish for one
    /// goes to a single node (see [`Routes::pick_group_nodes`]).
    groups: HashMap<ByteString, Group>,
    /// This node's shards' filters, by shard.
    local: Interest,
    /// How many of this node's shards have each filter.
    local_count: HashMap<ByteString, u32>,
    /// Peer nodes by index (an index is reused once its node is gone).
    peers: Vec<Option<Peer>>,
    /// The peers' filters, by peer index.
    remote: Interest,
    /// How many peers have each filter.
    remote_count: HashMap<ByteString, u32>,
}

impl Routes {
    /// Shard `from` announced `filters`; returns those new to this node
    /// (the peers must be told).
    pub fn local_add(&mut self, from: ShardId, filters: &[TopicFilter]) -> Vec<TopicFilter> {
        let mut new = Vec::new();
        for f in filters {
            if !is_share(f) {
                self.local.remote_add(from, f);
            }
            if count_up(&mut self.local_count, f) {
                new.push(f.clone());
            }
        }
        new
    }

    /// Shard `from` has no subscription to `filter` any more; true when no
    /// shard of this node has (the peers may forget it).
    pub fn local_remove(&mut self, from: ShardId, filter: &TopicFilter) -> bool {
        if !is_share(filter) {
            self.local.remote_remove(from, filter);
        }
        count_down(&mut self.local_count, filter)
    }

    /// Every filter some shard of this node has (a peer's dump).
    pub fn local_filters(&self) -> Vec<TopicFilter> {
        self.local_count
            .keys()
            .filter_map(|f| TopicFilter::new(f.clone()).ok())
            .collect()
    }

    /// This node's shards with a filter matching `topic`.
    pub fn shards_for(&self, topic: &TopicName) -> ShardSet {
        self.local.shards_for(topic)
    }

    /// A message from node `id` arrived at `now_ms`.
    pub fn peer_seen(&mut self, id: &NodeId, now_ms: u64) -> Seen {
        let found = self
            .peers
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.id.name == id.name));
        match found {
            Some(i) => {
                let peer = self.peers[i].as_mut().expect("found above");
                peer.last_seen_ms = now_ms;
                if peer.id.incarnation == id.incarnation {
                    return Seen::Known(i as u16);
                }
                let old = std::mem::replace(&mut peer.id.incarnation, id.incarnation);
                let gone = self.forget_filters_of(i);
                Seen::Restarted(i as u16, gone, old)
            }
            None => {
                let peer = Peer {
                    id: id.clone(),
                    filters: HashSet::new(),
                    last_seen_ms: now_ms,
                };
                let i = match self.peers.iter().position(Option::is_none) {
                    Some(i) => {
                        self.peers[i] = Some(peer);
                        i
                    }
                    None if self.peers.len() < MAX_PEERS => {
                        self.peers.push(Some(peer));
                        self.peers.len() - 1
                    }
                    // Past 64 peers the node routes to the first 64 only:
                    // refused loudly at the link, never silently.
                    None => return Seen::Known(u16::MAX),
                };
                Seen::New(i as u16)
            }
        }
    }

    /// The peer index of the node named `name`, if it is known.
    pub fn peer_index(&self, id: &NodeId) -> Option<u16> {
        self.peers
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.id == *id))
            .map(|i| i as u16)
    }

    /// Peer `index` as its messages name it.
    pub fn peer_id(&self, index: u16) -> Option<&NodeId> {
        self.peers
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .map(|p| &p.id)
    }

    /// The name of peer `index`.
    pub fn peer_name(&self, index: u16) -> Option<&str> {
        self.peers
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .map(|p| &*p.id.name)
    }

    /// Every live peer: (index, name).
    pub fn peers(&self) -> impl Iterator<Item = (u16, &str)> + '_ {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as u16, &*p.id.name)))
    }

    /// Peer `index` announced `filters`; returns those new to the union of
    /// peers (this node's shards must be told).
    pub fn peer_add(&mut self, index: u16, filters: &[TopicFilter]) -> Vec<TopicFilter> {
        let mut new = Vec::new();
        let Some(Some(peer)) = self.peers.get_mut(usize::from(index)) else {
            return new;
        };
        for f in filters {
            if !peer.filters.insert(f.as_bytestring().clone()) {
                continue;
            }
            if let Shared::Yes(inner) = shared::parse(f) {
                let group = self
                    .groups
                    .entry(f.as_bytestring().clone())
                    .or_insert_with(|| Group {
                        filter: TopicFilter::new(String::from(inner.as_str()))
                            .expect("a copy of a valid filter"),
                        nodes: ShardSet::default(),
                        next: 0,
                    });
                group.nodes.insert(ShardId(index));
                continue;
            }
            self.remote.remote_add(ShardId(index), f);
            if count_up(&mut self.remote_count, f) {
                new.push(f.clone());
            }
        }
        new
    }

    /// Peer `index` dropped `filters`; returns those no peer has now.
    pub fn peer_remove(&mut self, index: u16, filters: &[TopicFilter]) -> Vec<TopicFilter> {
        let mut gone = Vec::new();
        let Some(Some(peer)) = self.peers.get_mut(usize::from(index)) else {
            return gone;
        };
        let mut removed = Vec::new();
        for f in filters {
            if peer.filters.remove(f.as_bytestring()) {
                removed.push(f.clone());
            }
        }
        for f in removed {
            if self.remote_drop(index, &f) {
                gone.push(f);
            }
        }
        gone
    }

    fn remote_drop(&mut self, index: u16, f: &TopicFilter) -> bool {
        if is_share(f) {
            if let Some(group) = self.groups.get_mut(f.as_bytestring()) {
                group.nodes.remove(ShardId(index));
                if group.nodes == ShardSet::default() {
                    self.groups.remove(f.as_bytestring());
                }
            }
            return false;
        }
        self.remote.remote_remove(ShardId(index), f);
        count_down(&mut self.remote_count, f)
    }

    fn forget_filters_of(&mut self, i: usize) -> Vec<TopicFilter> {
        let Some(Some(peer)) = self.peers.get_mut(i) else {
            return Vec::new();
        };
        let filters: Vec<ByteString> = peer.filters.drain().collect();
        let mut gone = Vec::new();
        for f in filters {
            let Ok(f) = TopicFilter::new(f) else { continue };
            if self.remote_drop(i as u16, &f) {
                gone.push(f);
            }
        }
        gone
    }

    /// Peer `index` left (a `Bye`, or silence): its filters are forgotten;
    /// returns those no peer has now.
    pub fn peer_gone(&mut self, index: u16) -> Vec<TopicFilter> {
        let gone = self.forget_filters_of(usize::from(index));
        if let Some(slot) = self.peers.get_mut(usize::from(index)) {
            *slot = None;
        }
        gone
    }

    /// Peers silent since before `deadline_ms`.
    pub fn silent_since(&self, deadline_ms: u64) -> Vec<u16> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.as_ref()
                    .filter(|p| p.last_seen_ms < deadline_ms)
                    .map(|_| i as u16)
            })
            .collect()
    }

    /// The peers with a filter matching `topic`.
    pub fn nodes_for(&self, topic: &TopicName) -> ShardSet {
        self.remote.shards_for(topic)
    }

    /// For each peers' shared group matching `topic` that this node has no
    /// members of, the one peer that delivers it (round robin among those
    /// with members). A group this node has members of is delivered here
    /// alone: every message reaches one member of each group once.
    pub fn pick_group_nodes(&mut self, topic: &TopicName) -> Vec<(ByteString, u16)> {
        let mut picks = Vec::new();
        for (share, group) in self.groups.iter_mut() {
            if self.local_count.contains_key(share) || !group.filter.matches(topic) {
                continue;
            }
            let nodes: Vec<ShardId> = group.nodes.iter().collect();
            if nodes.is_empty() {
                continue;
            }
            let node = nodes[group.next as usize % nodes.len()];
            group.next = group.next.wrapping_add(1);
            picks.push((share.clone(), node.0));
        }
        picks
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

    fn id(name: &str, incarnation: u64) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation,
        }
    }

    #[test]
    fn every_message_round_trips_and_garbage_is_refused() {
        let props = Properties {
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let msgs = [
            NodeMsg::Hello(id("a", 7)),
            NodeMsg::Bye(id("b", u64::MAX)),
            NodeMsg::RouteAdd(id("a", 1), vec![f("x/+/y"), f("#"), f("plain")]),
            NodeMsg::RouteRemove(id("a", 1), vec![f("x/#")]),
            NodeMsg::RouteDump(id("node-1", 3)),
            NodeMsg::Kick("meter-17".into(), true),
            NodeMsg::Kick("".into(), false),
            NodeMsg::Publish(NodePublish {
                topic: t("dev/1/cmd"),
                payload: Bytes::from_static(b"on"),
                qos: QoS::ExactlyOnce,
                retain: true,
                props: Some(Arc::new(props)),
                expires_in_ms: Some(1500),
                shares: vec!["$share/g/dev/+/cmd".into()],
            }),
            NodeMsg::Publish(NodePublish {
                topic: t("a"),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                props: None,
                expires_in_ms: None,
                shares: Vec::new(),
            }),
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(NodeMsg::decode(&bytes).as_ref(), Some(&m));
            // Every truncation of a message is refused, never a panic
            // (a publish's payload may be cut anywhere: it is the rest).
            if !matches!(m, NodeMsg::Publish(_)) {
                for n in 0..bytes.len() {
                    assert_eq!(NodeMsg::decode(&bytes.slice(..n)), None, "{m:?} cut at {n}");
                }
            }
        }
        assert_eq!(NodeMsg::decode(&Bytes::from_static(&[2, 1])), None);
        assert_eq!(NodeMsg::decode(&Bytes::from_static(&[1, 99])), None);
        // A forged filter count does not allocate for it.
        let mut forged = BytesMut::new();
        forged.put_slice(&[WIRE_VERSION, ROUTE_ADD, 0, 1, b'a']);
        forged.put_u64(1);
        forged.put_u32(u32::MAX);
        assert_eq!(NodeMsg::decode(&forged.freeze()), None);
    }

    #[test]
    fn a_filter_is_told_to_peers_when_the_first_shard_takes_it_and_the_last_drops_it() {
        let mut r = Routes::default();
        assert_eq!(
            r.local_add(ShardId(0), &[f("a/#"), f("b")]),
            [f("a/#"), f("b")]
        );
        assert_eq!(
            r.local_add(ShardId(1), &[f("a/#")]),
            Vec::<TopicFilter>::new()
        );
        assert!(!r.local_remove(ShardId(0), &f("a/#")));
        assert_eq!(
            r.shards_for(&t("a/x")).iter().collect::<Vec<_>>(),
            [ShardId(1)]
        );
        assert!(r.local_remove(ShardId(1), &f("a/#")));
        assert_eq!(r.local_filters(), [f("b")]);
    }

    #[test]
    fn peers_filters_are_counted_and_forgotten_with_the_peer_or_its_old_incarnation() {
        let mut r = Routes::default();
        assert_eq!(r.peer_seen(&id("a", 1), 0), Seen::New(0));
        assert_eq!(r.peer_seen(&id("b", 1), 0), Seen::New(1));
        assert_eq!(r.peer_add(0, &[f("x/+"), f("y")]), [f("x/+"), f("y")]);
        assert_eq!(r.peer_add(1, &[f("x/+")]), Vec::<TopicFilter>::new());
        // A repeated add (a dump after a RouteAdd) counts once.
        assert_eq!(r.peer_add(1, &[f("x/+")]), Vec::<TopicFilter>::new());
        let both: Vec<_> = r.nodes_for(&t("x/1")).iter().map(|s| s.0).collect();
        assert_eq!(both, [0, 1]);
        assert_eq!(r.peer_remove(1, &[f("x/+")]), Vec::<TopicFilter>::new());
        assert_eq!(r.peer_seen(&id("a", 1), 5), Seen::Known(0));
        // Node a restarted: what it had is gone.
        assert_eq!(
            r.peer_seen(&id("a", 2), 6).sorted(),
            Seen::Restarted(0, vec![f("x/+"), f("y")], 1)
        );
        assert_eq!(r.nodes_for(&t("x/1")), ShardSet::default());
        assert_eq!(r.silent_since(6), [1]);
        assert_eq!(r.peer_gone(1), Vec::<TopicFilter>::new());
        assert_eq!(
            r.peers()
                .map(|(i, n)| (i, n.to_string()))
                .collect::<Vec<_>>(),
            [(0, "a".to_string())]
        );
        // The freed index is reused.
        assert_eq!(r.peer_seen(&id("c", 1), 7), Seen::New(1));
    }

    #[test]
    fn a_peers_shared_group_gets_a_publish_at_one_node_unless_this_node_has_members() {
        let mut r = Routes::default();
        r.peer_seen(&id("a", 1), 0);
        r.peer_seen(&id("b", 1), 0);
        let g = f("$share/g/jobs/#");
        // A group is not a route: it is not announced to this node's shards.
        assert_eq!(r.peer_add(0, &[g.clone(), f("jobs/#")]), [f("jobs/#")]);
        assert_eq!(
            r.peer_add(1, std::slice::from_ref(&g)),
            Vec::<TopicFilter>::new()
        );
        let picks: Vec<u16> = (0..4)
            .flat_map(|_| r.pick_group_nodes(&t("jobs/1")))
            .map(|(share, node)| {
                assert_eq!(share, g.as_str());
                node
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 1], "round robin between the two nodes");
        assert!(r.pick_group_nodes(&t("other")).is_empty());
        // Members here: this node's group delivers, no peer is picked.
        r.local_add(ShardId(0), std::slice::from_ref(&g));
        assert!(r.pick_group_nodes(&t("jobs/1")).is_empty());
        r.local_remove(ShardId(0), &g);
        // Node b leaves the group; a dies: no group left.
        r.peer_remove(1, std::slice::from_ref(&g));
        assert_eq!(
            r.pick_group_nodes(&t("jobs/1")),
            [(g.as_bytestring().clone(), 0)]
        );
        r.peer_gone(0);
        assert!(r.pick_group_nodes(&t("jobs/1")).is_empty());
    }

    impl Seen {
        fn sorted(self) -> Seen {
            match self {
                Seen::Restarted(i, mut v, old) => {
                    v.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                    Seen::Restarted(i, v, old)
                }
                other => other,
            }
        }
    }
}

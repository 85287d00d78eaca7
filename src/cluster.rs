//! `--cluster`: the cluster link, the one thread that connects this node to
//! the other coremq nodes through NATS.
//!
//! # Where it sits
//!
//! The link is one more peer on the node's mesh (the index after the last
//! shard, see [`crate::shard::mesh::build_with_link`]): shards send it what
//! they send each other — filter announcements and the publishes its
//! announced filters match — and it answers as a shard would. It runs the
//! NATS client (async-nats) on a current-thread tokio runtime of its own;
//! shards never wait on it or on the network: a message to it is a push on
//! a channel, as to another shard, and its bells are eventfds that its
//! runtime watches. It wakes a shard the way shards wake each other (an
//! eventfd write, or on the io_uring loop a `MSG_RING` posted from a small
//! ring of its own).
//!
//! # What crosses nodes (see [`crate::proto::cluster`] for the format)
//!
//! - Every second each node publishes a heartbeat on `coremq.hello`; a node
//!   silent for [`PEER_SILENCE`] is forgotten with its routes. A new (or
//!   restarted) node is asked for its whole filter set.
//! - Filters new to a node go to every peer as a request on the peer's
//!   subject `coremq.node.NAME`; the SUBACK waits for every peer's answer
//!   (or [`REQUEST_TIMEOUT`]), so a publish on any node after the SUBACK
//!   reaches the subscriber.
//! - A publish goes only to the nodes with a matching filter (retained
//!   ones to every node, which all keep the retained set). Retained
//!   messages are also written to the `coremq_retained` bucket (one entry
//!   per topic; a clear purges it), which a node loads when it joins,
//!   before it accepts connections. QoS 0 is sent
//!   once; QoS 1/2 as a request, answered once the receiving node queued it
//!   for every matching session: the publisher's PUBACK/PUBREC waits for
//!   those answers, so an acknowledged message is queued on every node
//!   that wants it. A node that does not answer in [`REQUEST_TIMEOUT`]
//!   counts as a drop (a 5.0 publisher gets 0x97).
//!
//! Every message from this link goes out through one queue in the order it
//! was produced, so that messages between two nodes keep their order
//! (MQTT-4.6.0: ordered topics).
//!
//! # Sessions: one live session per clientId in the cluster
//!
//! A JetStream KV bucket, `coremq_sessions`, names the node that holds each
//! clientId (key: a SHA-256 of the id; value: node name and incarnation).
//! It changes only by compare-and-set on the entry's revision, which orders
//! every claim without clocks.
//!
//! - Each shard remembers the clientIds it claimed (a 64-bit digest each):
//!   a device that reconnects to the same node (the common case) is
//!   admitted at once, with no cluster-wide read or write and no trip to
//!   the link, while the registry answers. A kick clears the entry, through
//!   the shard, before it closes the session.
//! - Otherwise the CONNECT waits, unread, while the owner shard asks the
//!   link ([`ClusterMsg::Claim`]). The link reads the entry, and creates it, or replaces another
//!   node's claim with a compare-and-set (retrying when it lost a race).
//!   When another node held the client, that node is told
//!   ([`NodeMsg::Kick`]): it closes the connection as a takeover (5.0:
//!   DISCONNECT 0x8E) and, unless the CONNECT asked for a clean start,
//!   answers with the session's records (subscriptions, queued and
//!   in-flight messages; the format of `--data-dir`'s log), which the new
//!   shard installs before it admits the CONNECT (sessionPresent=1).
//! - A kick that arrives while this node's own claim of the same client is
//!   in flight waits for it, and then closes what the claim admitted: two
//!   racing CONNECTs end with exactly one session, the one whose
//!   compare-and-set came last.
//!
//! # Wills of a node that dies
//!
//! A client that connects with a will has it kept in a second bucket,
//! `coremq_wills`, under its node's name and incarnation, until its
//! connection ends on that node (where the will is published or discarded
//! as on a lone broker). When a node goes silent (or comes back as a new
//! incarnation), the first surviving node to create the bucket's entry
//! `d.NODE.INCARNATION` publishes every will left under that node, once,
//! and removes them. A Will Delay Interval is not kept: such a will goes
//! out when the death is noticed.
//!
//! The link writes its own heartbeat entry every second; while that write
//!   fails (no JetStream quorum, NATS unreachable) every claim is refused,
//!   and the CONNECT gets CONNACK 3 (5.0: 0x88), rather than risk two
//!   sessions. Connections already open stay.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use futures_lite::StreamExt;
use hashbrown::HashMap;

use crate::metrics::Counters;
use crate::proto::broker::{RoutedPublish, ShardMsg};
use crate::proto::cluster::{NodeId, NodeMsg, NodePublish, Routes, Seen};
use crate::proto::handshake::owner_of;
use crate::proto::interest::ShardSet;
use crate::proto::retained::retained_owner;
use crate::proto::topic::TopicFilter;
use crate::proto::{Millis, ShardId};
use crate::shard::mesh::{Bell, ClusterMsg, Mesh, MeshEnds, MeshMsg, Wake};

/// How long a peer may stay silent (no heartbeat) before it is forgotten.
pub const PEER_SILENCE: Duration = Duration::from_secs(3);

/// How long a request to a peer (a route change, a QoS 1/2 publish) waits
/// for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a claim waits for the node that held the client to hand its
/// session over.
pub const KICK_TIMEOUT: Duration = Duration::from_secs(4);

/// The session registry's bucket.
pub const SESSIONS_BUCKET: &str = "coremq_sessions";

/// The bucket of the wills of connected clients.
pub const WILLS_BUCKET: &str = "coremq_wills";

/// The bucket of the retained messages, one entry per topic.
pub const RETAINED_BUCKET: &str = "coremq_retained";

/// Messages waiting for the NATS connection beyond which QoS 0 publishes
/// are dropped and QoS 1/2 ones answered as dropped at once: a NATS outage
/// costs bounded memory.
const MAX_QUEUED_OUT: usize = 100_000;

/// What the link needs from the shell.
pub struct LinkSetup {
    /// NATS server URLs.
    pub servers: Vec<String>,
    /// This node's name.
    pub node: String,
    /// The number of shards; the link is the peer after them.
    pub shards: u16,
    /// The link's ends of the mesh.
    pub ends: MeshEnds,
    /// How the shards' bells are rung.
    pub wake: Wake,
    /// The shards' clock epoch (expiry times travel on it).
    pub started: Instant,
    /// Process-wide counters.
    pub counters: Arc<Counters>,
    /// Set on SIGINT/SIGTERM.
    pub shutdown: Arc<AtomicBool>,
}

/// Starts the link thread.
pub fn spawn(setup: LinkSetup) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("coremq-cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cluster link: cannot start its runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(setup));
            // Tasks still there (a claim, a watch) hold NATS subscriptions,
            // whose drop spawns their unsubscribe onto the runtime: drop
            // them inside it, or the exit would panic.
            let _inside = rt.enter();
            drop(local);
        })
}

fn subject_of(node: &str) -> String {
    format!("coremq.node.{node}")
}

const HELLO_SUBJECT: &str = "coremq.hello";

/// A message for NATS, in the order produced.
struct Out {
    subject: String,
    reply: Option<String>,
    payload: Bytes,
}

/// What an answer to one of our requests settles.
enum Pending {
    /// A copy of a publish sent to a peer: one less answer for this wait.
    Copy(u64),
    /// A RouteAdd sent to a peer: one less answer for this round.
    Round(u64),
    /// A peer's filter set.
    Dump,
}

/// A publish sent to peers with the ticket of the shard that waits.
struct CopyWait {
    left: u32,
    dropped: bool,
    origin: (ShardId, u64),
}

/// Something that goes ahead once `left` tickets or rounds completed.
struct Barrier {
    left: u32,
    then: Then,
}

enum Then {
    /// Acknowledge a shard's announcement.
    AckShard(ShardId, u64),
    /// Answer a peer's request.
    Reply(String),
}

/// Announcements to shards, or route rounds to peers, in flight.
struct InFlight {
    left: u32,
    barriers: Vec<u64>,
}

/// A kick from another node, waiting for this node's own claim of the same
/// client, or for the shard that carries it out.
struct Kick {
    client_id: ByteString,
    export: bool,
    reply: Option<String>,
}

/// The 64-bit digest of a clientId that each shard's set of claimed
/// clients holds (on every CONNECT of a cluster node: no key built).
pub fn client_digest(client_id: &str) -> u64 {
    use sha2::Digest;
    short_digest(&sha2::Sha256::digest(client_id.as_bytes()))
}

fn short_digest(sha256: &[u8]) -> u64 {
    u64::from_le_bytes(sha256[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

/// The registry key of a clientId, and its [`client_digest`].
fn session_key(client_id: &str) -> (String, u64) {
    use sha2::Digest;
    use std::fmt::Write;
    let digest = sha2::Sha256::digest(client_id.as_bytes());
    let mut key = String::with_capacity(2 + 32);
    key.push_str("s.");
    for b in &digest[..16] {
        let _ = write!(key, "{b:02x}");
    }
    (key, short_digest(&digest))
}

/// A publish from a peer handed to shards with the link's ticket.
struct Delivery {
    left: u32,
    dropped: bool,
    reply: Option<String>,
}

struct Link {
    me: NodeId,
    shards: u16,
    link_id: ShardId,
    mesh: Mesh,
    routes: Routes,
    started: Instant,
    counters: Arc<Counters>,
    /// Out to NATS, in order; the sender task drains it.
    out: VecDeque<Out>,
    out_wake: Rc<tokio::sync::Notify>,
    next_id: u64,
    /// Our requests awaiting answers, with when they time out.
    pending: HashMap<u64, (Pending, Instant)>,
    copies: HashMap<u64, CopyWait>,
    barriers: HashMap<u64, Barrier>,
    /// Announcements to our shards (by ticket) and route rounds to peers
    /// (by round id) not yet complete.
    shard_announces: HashMap<u64, InFlight>,
    rounds: HashMap<u64, InFlight>,
    /// Filters whose announcement to our shards / to peers is in flight.
    filters_to_shards: HashMap<ByteString, u64>,
    filters_to_peers: HashMap<ByteString, u64>,
    deliveries: HashMap<u64, Delivery>,
    /// MSG_RING for shards on the io_uring loop.
    ring: Option<io_uring::IoUring>,
    /// The session registry, once JetStream answered.
    kv: Option<async_nats::jetstream::kv::Store>,
    /// The wills bucket, opened with the registry.
    wills: Option<async_nats::jetstream::kv::Store>,
    /// Will writes waiting behind one in flight for the same key (the
    /// latest only: a put then a delete is a delete), and the keys with
    /// one in flight.
    kv_ops: HashMap<String, Option<Bytes>>,
    kv_busy: hashbrown::HashSet<String>,
    /// The retained bucket, opened with the registry.
    retained: Option<async_nats::jetstream::kv::Store>,
    /// Bucket writes to start (they need the link's `Rc`).
    kv_queue: Vec<(Bucket, String, Option<Bytes>)>,
    /// Nodes found dead (or restarted) whose wills may be left to publish.
    dead: Vec<NodeId>,
    /// The last write to the registry succeeded: claims may be answered.
    healthy: bool,
    /// Claims in flight by client digest: how many, and kicks waiting for
    /// them.
    claiming: HashMap<u64, (u32, Vec<Kick>)>,
    /// Kicks carried out by shards, by ticket: whom to answer.
    kicks: HashMap<u64, Option<String>>,
}

/// Adds one to a cluster counter.
fn count(
    counters: &Counters,
    which: impl Fn(&crate::metrics::ClusterCounters) -> &std::sync::atomic::AtomicU64,
) {
    if let Some(c) = &counters.cluster {
        crate::metrics::bump(which(c));
    }
}

impl Link {
    fn now(&self) -> Millis {
        Millis(self.started.elapsed().as_millis() as u64)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn reply_subject(&self, id: u64) -> String {
        format!("coremq.reply.{}.{}.{id}", self.me.name, self.me.incarnation)
    }

    fn push_out(&mut self, subject: String, reply: Option<String>, payload: Bytes) {
        self.out.push_back(Out {
            subject,
            reply,
            payload,
        });
        self.out_wake.notify_one();
    }

    fn request(&mut self, subject: String, payload: Bytes, what: Pending) {
        let id = self.next_id();
        let reply = self.reply_subject(id);
        self.pending
            .insert(id, (what, Instant::now() + REQUEST_TIMEOUT));
        self.push_out(subject, Some(reply), payload);
    }

    fn send_shard(&mut self, shard: ShardId, msg: ShardMsg) {
        self.mesh.send(shard, MeshMsg::Broker(msg));
    }

    /// Rings the bells this turn's sends armed (MSG_RING on the io_uring
    /// loop; eventfds were written already).
    fn post_rings(&mut self) {
        let Some(ring) = &mut self.ring else {
            self.mesh.take_rings(|_, _| {});
            return;
        };
        let mut posted = 0;
        self.mesh.take_rings(|fd, bell| {
            let token = match bell {
                Bell::Data => crate::shard::net::Token::DataBell,
                Bell::Room => crate::shard::net::Token::RoomBell,
            }
            .encode();
            let sqe = io_uring::opcode::MsgRingData::new(io_uring::types::Fd(fd), 0, token, None)
                .build()
                .user_data(0);
            // SAFETY: the SQE refers to no memory of ours.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                posted += 1;
            }
        });
        if posted > 0 {
            if let Err(e) = ring.submit_and_wait(posted) {
                tracing::warn!("cluster link: MSG_RING failed: {e}");
            }
            ring.completion().for_each(drop);
        }
    }

    // ------------------------------------------------------------ sessions

    /// A kick for a client whose claim here is not in flight: the owner
    /// shard closes its connection (and hands its session over).
    fn forward_kick(&mut self, kick: Kick) {
        let ticket = self.next_id();
        self.kicks.insert(ticket, kick.reply);
        let owner = owner_of(&kick.client_id, self.shards);
        self.mesh.send(
            owner,
            MeshMsg::Cluster(ClusterMsg::Kick {
                client_id: kick.client_id,
                export: kick.export,
                ticket,
            }),
        );
    }

    fn kicked(&mut self, ticket: u64, session: Option<Bytes>) {
        if let Some(Some(reply)) = self.kicks.remove(&ticket) {
            self.push_out(reply, None, session.unwrap_or_default());
        }
    }

    /// Another node took client `client_id` over.
    fn kick_in(&mut self, client_id: ByteString, export: bool, reply: Option<String>) {
        count(&self.counters, |c| &c.takeovers_out);
        let digest = client_digest(&client_id);
        let kick = Kick {
            client_id,
            export,
            reply,
        };
        match self.claiming.get_mut(&digest) {
            Some((_, waiting)) => waiting.push(kick),
            None => self.forward_kick(kick),
        }
    }

    /// A claim of client `digest` ended: the shard hears, then any kick
    /// that waited for it goes on.
    fn claim_done(
        &mut self,
        digest: u64,
        from: ShardId,
        ticket: u64,
        outcome: Result<Option<Bytes>, ()>,
    ) {
        self.mesh.send(
            from,
            MeshMsg::Cluster(ClusterMsg::Claimed { ticket, outcome }),
        );
        let done = match self.claiming.get_mut(&digest) {
            Some((left, _)) => {
                *left -= 1;
                *left == 0
            }
            None => false,
        };
        if done {
            let (_, kicks) = self.claiming.remove(&digest).expect("looked up above");
            // The claim that won here may have lost since: the shard admits
            // first, then carries the kick out.
            for kick in kicks {
                self.forward_kick(kick);
            }
        }
    }

    // ------------------------------------------------------------ barriers

    fn barrier(&mut self, waits_on: Vec<(bool, u64)>, then: Then) {
        if waits_on.is_empty() {
            self.release(then);
            return;
        }
        let id = self.next_id();
        self.barriers.insert(
            id,
            Barrier {
                left: waits_on.len() as u32,
                then,
            },
        );
        for (to_shards, key) in waits_on {
            let table = if to_shards {
                &mut self.shard_announces
            } else {
                &mut self.rounds
            };
            if let Some(f) = table.get_mut(&key) {
                f.barriers.push(id);
            }
        }
    }

    fn release(&mut self, then: Then) {
        match then {
            Then::AckShard(shard, ticket) => {
                self.send_shard(shard, ShardMsg::InterestAck { ticket })
            }
            Then::Reply(subject) => self.push_out(subject, None, Bytes::new()),
        }
    }

    fn completed(&mut self, barriers: Vec<u64>) {
        for b in barriers {
            let Some(barrier) = self.barriers.get_mut(&b) else {
                continue;
            };
            barrier.left -= 1;
            if barrier.left == 0 {
                let barrier = self.barriers.remove(&b).expect("looked up above");
                self.release(barrier.then);
            }
        }
    }

    /// Starts an announcement of `filters` to this node's shards
    /// (`to_shards`) or a route round to the peers, done after `left`
    /// answers; its key.
    fn begin_in_flight(&mut self, to_shards: bool, filters: &[TopicFilter], left: u32) -> u64 {
        let key = self.next_id();
        let (by_filter, table) = if to_shards {
            (&mut self.filters_to_shards, &mut self.shard_announces)
        } else {
            (&mut self.filters_to_peers, &mut self.rounds)
        };
        for f in filters {
            by_filter.insert(f.as_bytestring().clone(), key);
        }
        table.insert(
            key,
            InFlight {
                left,
                barriers: Vec::new(),
            },
        );
        key
    }

    /// One answer (or timeout) for announcement or round `key`.
    fn in_flight_answered(&mut self, to_shards: bool, key: u64) {
        let table = if to_shards {
            &mut self.shard_announces
        } else {
            &mut self.rounds
        };
        let Some(f) = table.get_mut(&key) else { return };
        f.left = f.left.saturating_sub(1);
        if f.left > 0 {
            return;
        }
        let f = table.remove(&key).expect("looked up above");
        let filters = if to_shards {
            &mut self.filters_to_shards
        } else {
            &mut self.filters_to_peers
        };
        filters.retain(|_, k| *k != key);
        self.completed(f.barriers);
    }

    // ------------------------------------------------------- from shards

    fn handle_shard_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::InterestAdd {
                from,
                filters,
                ticket,
            } => self.shard_announced(from, filters, ticket),
            ShardMsg::InterestRemove { from, filter } => {
                if self.routes.local_remove(from, &filter) {
                    let msg = NodeMsg::RouteRemove(self.me.clone(), vec![filter]).encode();
                    for subject in self.peer_subjects() {
                        self.push_out(subject, None, msg.clone());
                    }
                }
            }
            ShardMsg::InterestAck { ticket } => self.in_flight_answered(true, ticket),
            ShardMsg::Publish(p) => self.publish_out(p),
            ShardMsg::Stored { ticket, dropped } => self.delivered(ticket, dropped),
            ShardMsg::StoredMany(answers) => {
                for (ticket, dropped) in answers {
                    self.delivered(ticket, dropped);
                }
            }
            // Retained messages are kept on every node: a new subscription
            // finds them on its own node's shards. The rest is between
            // shards.
            ShardMsg::RetainedQuery(_)
            | ShardMsg::RetainedReply(_)
            | ShardMsg::Parked { .. }
            | ShardMsg::Forget { .. }
            | ShardMsg::ShareJoin { .. }
            | ShardMsg::ShareJoined { .. }
            | ShardMsg::ShareLeave { .. }
            | ShardMsg::ShareOnline { .. }
            | ShardMsg::ShareDeliver(_) => {}
        }
    }

    fn peer_subjects(&self) -> Vec<String> {
        self.routes.peers().map(|(_, n)| subject_of(n)).collect()
    }

    /// A shard's new filters: the ones new to this node go to every peer,
    /// and the shard is acknowledged once every peer applied them (and any
    /// earlier round carrying the same filters completed).
    fn shard_announced(&mut self, from: ShardId, filters: Vec<TopicFilter>, ticket: u64) {
        let mut waits: Vec<(bool, u64)> = filters
            .iter()
            .filter_map(|f| self.filters_to_peers.get(f.as_bytestring()))
            .map(|&round| (false, round))
            .collect();
        let new = self.routes.local_add(from, &filters);
        let peers = self.peer_subjects();
        if !new.is_empty() && !peers.is_empty() {
            let round = self.begin_in_flight(false, &new, peers.len() as u32);
            let msg = NodeMsg::RouteAdd(self.me.clone(), new).encode();
            for subject in peers {
                self.request(subject, msg.clone(), Pending::Round(round));
            }
            waits.push((false, round));
        }
        waits.sort_unstable();
        waits.dedup();
        self.barrier(waits, Then::AckShard(from, ticket));
    }

    /// A publish some peer wants: sent to those peers; with a ticket, the
    /// shard hears back once all of them answered.
    fn publish_out(&mut self, p: RoutedPublish) {
        let now = self.now();
        let settle = |link: &mut Link, dropped: bool| {
            if let Some((shard, ticket)) = p.ticket {
                link.send_shard(shard, ShardMsg::Stored { ticket, dropped });
            }
        };
        // `$` topics are each node's own (`$SYS`).
        if p.topic.is_dollar() {
            return settle(self, false);
        }
        let expires_in_ms = match p.expires_at {
            Some(at) if at.0 <= now.0 => return settle(self, false),
            Some(at) => Some(at.0 - now.0),
            None => None,
        };
        if p.retain {
            // Kept for nodes that join later (a clear is a purge).
            let value = (!p.payload.is_empty()).then(|| {
                let deadline = expires_in_ms.map_or(0, |ms| wall_ms() + ms);
                let msg = NodeMsg::Publish(NodePublish {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: true,
                    props: p.props.clone(),
                    expires_in_ms: None,
                    shares: Vec::new(),
                });
                let mut v = bytes::BytesMut::with_capacity(8 + p.payload.len() + 32);
                v.extend_from_slice(&deadline.to_be_bytes());
                v.extend_from_slice(&msg.encode());
                v.freeze()
            });
            self.kv_queue
                .push((Bucket::Retained, retained_key(p.topic.as_str()), value));
        }
        // Each target node with the shared groups it delivers to.
        let mut nodes: Vec<(u16, Vec<ByteString>)> = if p.retain {
            self.routes.peers().map(|(i, _)| (i, Vec::new())).collect()
        } else {
            let set = self.routes.nodes_for(&p.topic);
            set.iter().map(|i| (i.0, Vec::new())).collect()
        };
        for (share, node) in self.routes.pick_group_nodes(&p.topic) {
            match nodes.iter_mut().find(|(i, _)| *i == node) {
                Some((_, shares)) => shares.push(share),
                None => nodes.push((node, vec![share])),
            }
        }
        let targets: Vec<(String, Vec<ByteString>)> = nodes
            .into_iter()
            .filter_map(|(i, shares)| self.routes.peer_name(i).map(|n| (subject_of(n), shares)))
            .collect();
        if targets.is_empty() {
            return settle(self, false);
        }
        if self.out.len() > MAX_QUEUED_OUT {
            crate::metrics::bump(&self.counters.messages_dropped);
            return settle(self, true);
        }
        let encode = |shares: Vec<ByteString>| {
            NodeMsg::Publish(NodePublish {
                topic: p.topic.clone(),
                payload: p.payload.clone(),
                qos: p.qos,
                retain: p.retain,
                props: p.props.clone(),
                expires_in_ms,
                shares,
            })
            .encode()
        };
        if let Some(c) = &self.counters.cluster {
            c.publishes_sent
                .fetch_add(targets.len() as u64, Ordering::Relaxed);
        }
        match p.ticket {
            None => {
                for (subject, shares) in targets {
                    self.push_out(subject, None, encode(shares));
                }
            }
            Some(origin) => {
                let wait = self.next_id();
                self.copies.insert(
                    wait,
                    CopyWait {
                        left: targets.len() as u32,
                        dropped: false,
                        origin,
                    },
                );
                for (subject, shares) in targets {
                    self.request(subject, encode(shares), Pending::Copy(wait));
                }
            }
        }
    }

    fn copy_answered(&mut self, wait: u64, dropped: bool) {
        let Some(w) = self.copies.get_mut(&wait) else {
            return;
        };
        w.left -= 1;
        w.dropped |= dropped;
        if w.left == 0 {
            let w = self.copies.remove(&wait).expect("looked up above");
            let (shard, ticket) = w.origin;
            self.send_shard(
                shard,
                ShardMsg::Stored {
                    ticket,
                    dropped: w.dropped,
                },
            );
        }
    }

    // -------------------------------------------------------- from peers

    /// A message on this node's subject.
    fn handle_node_msg(&mut self, msg: NodeMsg, reply: Option<String>) {
        match msg {
            NodeMsg::Publish(p) => self.publish_in(p, reply),
            NodeMsg::RouteAdd(id, filters) => {
                let index = self.peer_index_seen(&id);
                let new = match index {
                    Some(i) => self.routes.peer_add(i, &filters),
                    None => Vec::new(),
                };
                let mut waits: Vec<(bool, u64)> = filters
                    .iter()
                    .filter_map(|f| self.filters_to_shards.get(f.as_bytestring()))
                    .map(|&t| (true, t))
                    .collect();
                if let Some(t) = self.announce_to_shards(new) {
                    waits.push((true, t));
                }
                waits.sort_unstable();
                waits.dedup();
                if let Some(reply) = reply {
                    self.barrier(waits, Then::Reply(reply));
                }
            }
            NodeMsg::RouteRemove(id, filters) => {
                if let Some(i) = self.peer_index_seen(&id) {
                    let gone = self.routes.peer_remove(i, &filters);
                    self.withdraw_from_shards(gone);
                }
            }
            NodeMsg::RouteDump(id) => {
                self.peer_index_seen(&id);
                if let Some(reply) = reply {
                    let all = NodeMsg::RouteAdd(self.me.clone(), self.routes.local_filters());
                    self.push_out(reply, None, all.encode());
                }
            }
            NodeMsg::Hello(id) => {
                self.peer_index_seen(&id);
            }
            NodeMsg::Kick(client_id, export) => self.kick_in(client_id, export, reply),
            NodeMsg::Bye(id) => {
                if let Some(i) = self.routes.peer_index(&id) {
                    tracing::info!("cluster: node {} left", id.name);
                    let gone = self.routes.peer_gone(i);
                    self.withdraw_from_shards(gone);
                }
            }
        }
    }

    /// Notes a message from node `id`; a node new (or restarted) is asked
    /// for its filters. `None` for this node itself.
    fn peer_index_seen(&mut self, id: &NodeId) -> Option<u16> {
        if id.name == self.me.name {
            return None;
        }
        let now = self.started.elapsed().as_millis() as u64;
        match self.routes.peer_seen(id, now) {
            Seen::Known(u16::MAX) => {
                tracing::error!(
                    "cluster: node {} ignored: more than {} peers",
                    id.name,
                    crate::proto::cluster::MAX_PEERS
                );
                None
            }
            Seen::Known(i) => Some(i),
            Seen::New(i) => {
                tracing::info!("cluster: node {} joined", id.name);
                self.ask_for_routes(&id.name);
                Some(i)
            }
            Seen::Restarted(i, gone, old) => {
                tracing::info!("cluster: node {} restarted", id.name);
                self.dead.push(NodeId {
                    name: id.name.clone(),
                    incarnation: old,
                });
                self.withdraw_from_shards(gone);
                self.ask_for_routes(&id.name);
                Some(i)
            }
        }
    }

    fn ask_for_routes(&mut self, name: &str) {
        let msg = NodeMsg::RouteDump(self.me.clone()).encode();
        self.request(subject_of(name), msg, Pending::Dump);
    }

    /// Filters now wanted by some peer: every shard routes them here once
    /// it acknowledged the returned ticket.
    fn announce_to_shards(&mut self, filters: Vec<TopicFilter>) -> Option<u64> {
        if filters.is_empty() {
            return None;
        }
        let ticket = self.begin_in_flight(true, &filters, u32::from(self.shards));
        for s in 0..self.shards {
            self.send_shard(
                ShardId(s),
                ShardMsg::InterestAdd {
                    from: self.link_id,
                    filters: filters.clone(),
                    ticket,
                },
            );
        }
        Some(ticket)
    }

    fn withdraw_from_shards(&mut self, filters: Vec<TopicFilter>) {
        for filter in filters {
            for s in 0..self.shards {
                self.send_shard(
                    ShardId(s),
                    ShardMsg::InterestRemove {
                        from: self.link_id,
                        filter: filter.clone(),
                    },
                );
            }
        }
    }

    /// A publish from a peer: to this node's shards with a matching
    /// subscription (and the topic's retained owner when it is retained);
    /// a request is answered once every one of them has queued it.
    fn publish_in(&mut self, p: NodePublish, reply: Option<String>) {
        count(&self.counters, |c| &c.publishes_received);
        let mut to = self.routes.shards_for(&p.topic);
        if p.retain {
            to.insert(retained_owner(p.topic.as_str(), self.shards));
        }
        let now = self.now();
        let ticket = match (&reply, p.qos) {
            (Some(_), q)
                if q != crate::proto::codec::QoS::AtMostOnce && to != ShardSet::default() =>
            {
                let t = self.next_id();
                self.deliveries.insert(
                    t,
                    Delivery {
                        left: to.iter().count() as u32,
                        dropped: false,
                        reply: reply.clone(),
                    },
                );
                Some((self.link_id, t))
            }
            _ => None,
        };
        let routed = RoutedPublish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: p.props,
            expires_at: p.expires_in_ms.map(|ms| Millis(now.0 + ms)),
            ticket,
            uid: 0,
            shares: Some(p.shares.into()),
        };
        for shard in to.iter() {
            self.send_shard(shard, ShardMsg::Publish(routed.clone()));
        }
        if ticket.is_none() {
            if let Some(reply) = reply {
                self.push_out(reply, None, Bytes::from_static(&[0]));
            }
        }
    }

    fn delivered(&mut self, ticket: u64, dropped: bool) {
        let Some(d) = self.deliveries.get_mut(&ticket) else {
            return;
        };
        d.left -= 1;
        d.dropped |= dropped;
        if d.left == 0 {
            let d = self.deliveries.remove(&ticket).expect("looked up above");
            if let Some(reply) = d.reply {
                self.push_out(reply, None, Bytes::from(vec![u8::from(d.dropped)]));
            }
        }
    }

    /// An answer to one of our requests (`None`: it timed out, or nobody
    /// listens on the subject any more).
    fn answered(&mut self, id: u64, payload: Option<Bytes>) {
        let Some((what, _)) = self.pending.remove(&id) else {
            return;
        };
        match what {
            Pending::Copy(wait) => {
                let dropped = payload.as_deref().is_none_or(|p| p.first() == Some(&1));
                self.copy_answered(wait, dropped);
            }
            Pending::Round(round) => self.in_flight_answered(false, round),
            Pending::Dump => {
                let Some(payload) = payload else { return };
                if let Some(NodeMsg::RouteAdd(id, filters)) = NodeMsg::decode(&payload) {
                    if let Some(i) = self.routes.peer_index(&id) {
                        let new = self.routes.peer_add(i, &filters);
                        self.announce_to_shards(new);
                    }
                }
            }
        }
    }

    /// Once a second: the heartbeat, silent peers forgotten, requests
    /// timed out.
    fn tick(&mut self) {
        if let Some(c) = &self.counters.cluster {
            let names = self.routes.peers().map(|(_, n)| n.to_owned()).collect();
            *c.peers.lock().unwrap_or_else(|e| e.into_inner()) = names;
        }
        let hello = NodeMsg::Hello(self.me.clone()).encode();
        self.push_out(HELLO_SUBJECT.into(), None, hello);
        let now_ms = self.started.elapsed().as_millis() as u64;
        let deadline = now_ms.saturating_sub(PEER_SILENCE.as_millis() as u64);
        for i in self.routes.silent_since(deadline) {
            let name = self.routes.peer_name(i).unwrap_or("?").to_owned();
            tracing::warn!("cluster: node {name} silent for {PEER_SILENCE:?}, forgotten");
            if let Some(id) = self.routes.peer_id(i) {
                self.dead.push(id.clone());
            }
            let gone = self.routes.peer_gone(i);
            self.withdraw_from_shards(gone);
        }
        let now = Instant::now();
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (_, due))| *due <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.answered(id, None);
        }
    }
}

/// One of the link's bells (an eventfd), watched by the runtime through a
/// duplicate descriptor it owns.
fn watch(fd: RawFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an eventfd of the link's mesh ends, open while the
    // link runs; it is only borrowed to be duplicated.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: the AsyncFd owns `dup`, which stays open as long as it does.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

async fn run(setup: LinkSetup) {
    let LinkSetup {
        servers,
        node,
        shards,
        ends,
        wake,
        started,
        counters,
        shutdown,
    } = setup;
    let link_id = ShardId(shards);
    let mesh = Mesh::new(link_id, ends);
    let Some((data_fd, room_fd)) = mesh.bell_fds() else {
        tracing::error!("cluster link: its bells are not eventfds");
        return;
    };
    let mut incarnation = [0u8; 8];
    let _ = getrandom::getrandom(&mut incarnation);
    let me = NodeId {
        name: ByteString::from(node.clone()),
        incarnation: u64::from_le_bytes(incarnation),
    };
    let ring = match wake {
        Wake::Ring => match io_uring::IoUring::new(64) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!("cluster link: no ring to wake shards with: {e}");
                return;
            }
        },
        Wake::Eventfd => None,
    };
    let client = match async_nats::ConnectOptions::new()
        .name(format!("coremq {node}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .connect(servers.as_slice())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cluster: cannot use the NATS servers {servers:?}: {e}");
            return;
        }
    };
    let inbox = client.subscribe(subject_of(&node)).await;
    let hello = client.subscribe(HELLO_SUBJECT).await;
    let replies = client
        .subscribe(format!("coremq.reply.{}.{}.*", me.name, me.incarnation))
        .await;
    let (Ok(mut inbox), Ok(mut hello), Ok(mut replies)) = (inbox, hello, replies) else {
        tracing::error!("cluster: cannot subscribe on the NATS servers {servers:?}");
        return;
    };
    tracing::info!(node = %node, servers = ?servers, "cluster: joined");
    let out_wake = Rc::new(tokio::sync::Notify::new());
    let link = Rc::new(RefCell::new(Link {
        me: me.clone(),
        shards,
        link_id,
        mesh,
        routes: Routes::default(),
        started,
        counters,
        out: VecDeque::new(),
        out_wake: out_wake.clone(),
        next_id: 0,
        pending: HashMap::new(),
        copies: HashMap::new(),
        barriers: HashMap::new(),
        shard_announces: HashMap::new(),
        rounds: HashMap::new(),
        filters_to_shards: HashMap::new(),
        filters_to_peers: HashMap::new(),
        deliveries: HashMap::new(),
        ring,
        kv: None,
        wills: None,
        kv_ops: HashMap::new(),
        kv_busy: hashbrown::HashSet::new(),
        retained: None,
        kv_queue: Vec::new(),
        dead: Vec::new(),
        healthy: false,
        claiming: HashMap::new(),
        kicks: HashMap::new(),
    }));
    // Say hello at once: peers ask for our routes, we for theirs.
    link.borrow_mut().tick();

    // The sender: the one place that writes to NATS, in order.
    let sender = {
        let link = link.clone();
        let client = client.clone();
        tokio::task::spawn_local(async move {
            loop {
                let next = link.borrow_mut().out.pop_front();
                let Some(out) = next else {
                    out_wake.notified().await;
                    continue;
                };
                let sent = match out.reply {
                    Some(reply) => {
                        client
                            .publish_with_reply(out.subject, reply, out.payload)
                            .await
                    }
                    None => client.publish(out.subject, out.payload).await,
                };
                if let Err(e) = sent {
                    tracing::debug!("cluster: publish failed: {e}");
                }
            }
        })
    };
    // The session registry: opened (or made) once JetStream answers, and
    // written every second, which says whether claims may be answered.
    let registry = {
        let link = link.clone();
        let client = client.clone();
        let me = me.clone();
        let servers = servers.len();
        tokio::task::spawn_local(async move {
            let js = async_nats::jetstream::new(client.clone());
            let key = format!("n.{}", me.name);
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let kv = link.borrow().kv.clone();
                let kv = match kv {
                    Some(kv) => kv,
                    None => match open_registry(&js, &client, servers).await {
                        Ok((kv, wills, retained)) => {
                            load_retained(&link, &retained).await;
                            let mut l = link.borrow_mut();
                            l.kv = Some(kv.clone());
                            l.wills = Some(wills);
                            l.retained = Some(retained);
                            kv
                        }
                        Err(e) => {
                            set_health(&link, false, &e);
                            continue;
                        }
                    },
                };
                let beat = Bytes::from(me.incarnation.to_string());
                let put = tokio::time::timeout(Duration::from_secs(2), kv.put(&key, beat)).await;
                match put {
                    Ok(Ok(_)) => set_health(&link, true, ""),
                    Ok(Err(e)) => set_health(&link, false, &e.to_string()),
                    Err(_) => set_health(&link, false, "timed out"),
                }
            }
        })
    };
    // Peers' messages to this node, and their heartbeats.
    let from_peers = {
        let link = link.clone();
        tokio::task::spawn_local(async move {
            loop {
                let msg = tokio::select! {
                    m = inbox.next() => m,
                    m = hello.next() => m,
                };
                let Some(msg) = msg else { return };
                let Some(decoded) = NodeMsg::decode(&msg.payload) else {
                    tracing::debug!("cluster: malformed message on {}", msg.subject);
                    continue;
                };
                let mut l = link.borrow_mut();
                l.handle_node_msg(decoded, msg.reply.map(|r| r.to_string()));
                l.post_rings();
            }
        })
    };
    // Answers to our requests.
    let answers = {
        let link = link.clone();
        tokio::task::spawn_local(async move {
            while let Some(msg) = replies.next().await {
                let Some(id) = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                // No responders (503): the peer is gone.
                let payload = msg.status.is_none().then_some(msg.payload);
                let mut l = link.borrow_mut();
                l.answered(id, payload);
                l.post_rings();
            }
        })
    };
    // The mesh: what the shards send, woken by our bells.
    let (Ok(data), Ok(room)) = (watch(data_fd), watch(room_fd)) else {
        tracing::error!("cluster link: cannot watch its bells");
        return;
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown_check = tokio::time::interval(Duration::from_millis(100));
    loop {
        {
            let mut msgs = Vec::new();
            link.borrow().mesh.receive(usize::MAX, |m| msgs.push(m));
            for m in msgs {
                match m {
                    MeshMsg::Broker(msg) => link.borrow_mut().handle_shard_msg(msg),
                    MeshMsg::Batch(batch) => {
                        let mut l = link.borrow_mut();
                        batch.into_iter().for_each(|msg| l.handle_shard_msg(msg));
                    }
                    MeshMsg::Cluster(msg) => cluster_msg(&link, &client, msg),
                    MeshMsg::Handoff(_) => {}
                }
            }
            let armed = {
                let mut l = link.borrow_mut();
                l.post_rings();
                l.mesh.arm_before_block()
            };
            flush_kv(&link);
            if !armed {
                // More came meanwhile: let the sender and the NATS tasks
                // run before taking it (one thread runs them all).
                tokio::task::yield_now().await;
                continue;
            }
        }
        tokio::select! {
            ready = data.readable() => {
                if let Ok(mut g) = ready { g.clear_ready(); }
            }
            ready = room.readable() => {
                if let Ok(mut g) = ready { g.clear_ready(); }
                let l = link.borrow();
                l.mesh.drain_overflow();
            }
            _ = ticker.tick() => {
                let mut l = link.borrow_mut();
                l.tick();
                l.post_rings();
                let dead = std::mem::take(&mut l.dead);
                let wills = l.wills.clone();
                drop(l);
                if let Some(wills) = wills {
                    for node in dead {
                        let job = publish_wills_of(link.clone(), wills.clone(), node, me.clone());
                        tokio::task::spawn_local(job);
                    }
                }
            }
            _ = shutdown_check.tick() => {
                if shutdown.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        link.borrow().mesh.disarm();
    }
    // A clean shutdown: the peers forget us at once.
    let bye = NodeMsg::Bye(me).encode();
    let _ = client.publish(HELLO_SUBJECT, bye).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    sender.abort();
    from_peers.abort();
    answers.abort();
    registry.abort();
}

/// Opens the session registry, making it the first time: one entry per
/// key, replicated on up to three NATS servers (as many as the cluster
/// has: the servers given, or those the server we reached told of).
async fn open_registry(
    js: &async_nats::jetstream::Context,
    client: &async_nats::Client,
    servers: usize,
) -> Result<
    (
        async_nats::jetstream::kv::Store,
        async_nats::jetstream::kv::Store,
        async_nats::jetstream::kv::Store,
    ),
    String,
> {
    let known = client.server_info().connect_urls.len() + 1;
    let replicas = servers.max(known).min(3);
    let open = |bucket: &'static str, description: &'static str| async move {
        if let Ok(kv) = js.get_key_value(bucket).await {
            return Ok(kv);
        }
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: bucket.into(),
            description: description.into(),
            history: 1,
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("{bucket}: {e}"))
    };
    let sessions = open(
        SESSIONS_BUCKET,
        "coremq: the node that holds each clientId's session",
    )
    .await?;
    let wills = open(
        WILLS_BUCKET,
        "coremq: the wills of connected clients, by node",
    )
    .await?;
    let retained = open(RETAINED_BUCKET, "coremq: the retained messages, by topic").await?;
    Ok((sessions, wills, retained))
}

/// The wills bucket's key of `client_id`'s will on node `node`.
fn will_key(node: &NodeId, client_id: &str) -> String {
    let (session, _) = session_key(client_id);
    format!("w.{}.{}.{}", node.name, node.incarnation, &session[2..])
}

/// The retained bucket's key of `topic`.
fn retained_key(topic: &str) -> String {
    let (digest, _) = session_key(topic);
    format!("r.{}", &digest[2..])
}

/// Which bucket a queued write goes to.
#[derive(Debug, Clone, Copy)]
enum Bucket {
    Wills,
    Retained,
}

/// Carries out the bucket writes the link queued (`Link::kv_queue`).
fn flush_kv(link: &Rc<RefCell<Link>>) {
    let queued = std::mem::take(&mut link.borrow_mut().kv_queue);
    for (bucket, key, value) in queued {
        kv_op(link, bucket, key, value);
    }
}

/// Writes (`Some`) or removes (`None`) an entry of a bucket; writes for one
/// key go one at a time, in order, the latest waiting one replacing older
/// ones (keys of the two buckets differ by their first letter).
fn kv_op(link: &Rc<RefCell<Link>>, bucket: Bucket, key: String, value: Option<Bytes>) {
    let mut l = link.borrow_mut();
    let store = match bucket {
        Bucket::Wills => l.wills.clone(),
        Bucket::Retained => l.retained.clone(),
    };
    let Some(store) = store else {
        return;
    };
    if !l.kv_busy.insert(key.clone()) {
        l.kv_ops.insert(key, value);
        return;
    }
    drop(l);
    let link = link.clone();
    tokio::task::spawn_local(async move {
        let mut value = value;
        loop {
            let done = match &value {
                Some(v) => store
                    .put(&key, v.clone())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                None => store.purge(&key).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = done {
                tracing::debug!("cluster: writing {bucket:?} entry {key}: {e}");
            }
            let mut l = link.borrow_mut();
            match l.kv_ops.remove(&key) {
                Some(next) => value = next,
                None => {
                    l.kv_busy.remove(&key);
                    return;
                }
            }
        }
    });
}

/// Wall-clock milliseconds now.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Loads the cluster's retained messages into this node's shards (each to
/// its topic's retained owner), before the node accepts connections.
async fn load_retained(link: &Rc<RefCell<Link>>, store: &async_nats::jetstream::kv::Store) {
    use async_nats::jetstream::kv::Operation;
    let Ok(mut watch) = store.watch_with_history("r.>").await else {
        return;
    };
    let mut loaded = 0usize;
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
        let Ok(Some(Ok(entry))) = next else { break };
        if entry.operation == Operation::Put && entry.value.len() > 8 {
            let deadline = u64::from_be_bytes(entry.value[..8].try_into().expect("8 bytes"));
            let left = deadline.checked_sub(wall_ms());
            let live = deadline == 0 || left.is_some_and(|l| l > 0);
            let decoded = NodeMsg::decode(&entry.value.slice(8..));
            if let (true, Some(NodeMsg::Publish(p))) = (live, decoded) {
                let mut l = link.borrow_mut();
                let now = l.now();
                let owner = retained_owner(p.topic.as_str(), l.shards);
                let publish = RoutedPublish {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: true,
                    props: p.props,
                    expires_at: (deadline != 0).then(|| Millis(now.0 + left.unwrap_or(0))),
                    ticket: None,
                    uid: 0,
                    shares: None,
                };
                l.send_shard(owner, ShardMsg::Publish(publish));
                l.post_rings();
                loaded += 1;
            }
        }
        if entry.delta == 0 {
            break;
        }
    }
    tracing::info!("cluster: loaded {loaded} retained messages");
}

/// Node `dead` is gone: if this node is the first to say it will, it
/// publishes the wills left under that node, once.
async fn publish_wills_of(
    link: Rc<RefCell<Link>>,
    wills: async_nats::jetstream::kv::Store,
    dead: NodeId,
    me: NodeId,
) {
    use async_nats::jetstream::kv::Operation;
    let claim = format!("d.{}.{}", dead.name, dead.incarnation);
    if wills
        .create(&claim, Bytes::from(me.name.to_string()))
        .await
        .is_err()
    {
        // Another node took it (or the bucket is unreachable: then nobody
        // can, and the wills wait in it).
        return;
    }
    let pattern = format!("w.{}.{}.>", dead.name, dead.incarnation);
    let Ok(mut watch) = wills.watch_with_history(&pattern).await else {
        return;
    };
    let mut published = 0usize;
    loop {
        // Only what is there now: the watch ends on a quiet half second
        // or at the last entry it had when it began.
        let next = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
        let Ok(Some(Ok(entry))) = next else { break };
        if entry.operation == Operation::Put {
            {
                let mut l = link.borrow_mut();
                let shard = ShardId((published % usize::from(l.shards)) as u16);
                l.mesh
                    .send(shard, MeshMsg::Cluster(ClusterMsg::LostWill(entry.value)));
                l.post_rings();
            }
            let _ = wills.purge(&entry.key).await;
            published += 1;
            count(&link.borrow().counters, |c| &c.lost_wills_published);
        }
        if entry.delta == 0 {
            break;
        }
    }
    tracing::info!(
        "cluster: node {} is gone: published {published} of its clients' wills",
        dead.name
    );
}

fn set_health(link: &Rc<RefCell<Link>>, healthy: bool, why: &str) {
    let mut l = link.borrow_mut();
    if l.healthy != healthy {
        if healthy {
            tracing::info!("cluster: session registry reachable: accepting connections");
        } else {
            tracing::warn!(
                "cluster: session registry unreachable ({why}): refusing new connections"
            );
        }
    }
    l.healthy = healthy;
    if let Some(c) = &l.counters.cluster {
        c.registry_up.store(u64::from(healthy), Ordering::Relaxed);
    }
}

/// A claim or kick answer from a shard.
fn cluster_msg(link: &Rc<RefCell<Link>>, client: &async_nats::Client, msg: ClusterMsg) {
    match msg {
        ClusterMsg::Claim {
            from,
            ticket,
            client_id,
            clean_start,
        } => {
            let (key, digest) = session_key(&client_id);
            let mut l = link.borrow_mut();
            let kv = match (&l.kv, l.healthy) {
                (Some(kv), true) => kv.clone(),
                _ => {
                    count(&l.counters, |c| &c.claims_refused);
                    l.mesh.send(
                        from,
                        MeshMsg::Cluster(ClusterMsg::Claimed {
                            ticket,
                            outcome: Err(()),
                        }),
                    );
                    return;
                }
            };
            count(&l.counters, |c| &c.claims_registry);
            l.claiming.entry(digest).or_default().0 += 1;
            let me = l.me.clone();
            let counters = l.counters.clone();
            drop(l);
            let link = link.clone();
            let client = client.clone();
            tokio::task::spawn_local(async move {
                let outcome =
                    claim(&kv, &client, &me, &key, &client_id, !clean_start, &counters).await;
                if outcome.is_err() {
                    count(&counters, |c| &c.claims_refused);
                }
                let mut l = link.borrow_mut();
                l.claim_done(digest, from, ticket, outcome);
                l.post_rings();
            });
        }
        ClusterMsg::Kicked { ticket, session } => link.borrow_mut().kicked(ticket, session),
        ClusterMsg::WillSet { client_id, will } => {
            let key = will_key(&link.borrow().me, &client_id);
            kv_op(link, Bucket::Wills, key, Some(will));
        }
        ClusterMsg::WillClear { client_id } => {
            let key = will_key(&link.borrow().me, &client_id);
            kv_op(link, Bucket::Wills, key, None);
        }
        ClusterMsg::Claimed { .. } | ClusterMsg::Kick { .. } | ClusterMsg::LostWill(_) => {}
    }
}

/// Makes this node the holder of `client_id` in the registry (see
/// "Sessions" above); the session that moved here, if one did.
async fn claim(
    kv: &async_nats::jetstream::kv::Store,
    client: &async_nats::Client,
    me: &NodeId,
    key: &str,
    client_id: &ByteString,
    want_session: bool,
    counters: &Counters,
) -> Result<Option<Bytes>, ()> {
    use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
    let value = Bytes::from(format!("{}\n{}", me.name, me.incarnation));
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!("cluster: claiming a session: {what}: {e}");
    };
    // Each lost race means another node's claim landed; a handful in a row
    // means the registry is too contended to say.
    for _ in 0..8 {
        let entry = match kv.entry(key).await {
            Ok(e) => e.filter(|e| e.operation == Operation::Put),
            Err(e) => {
                failed("reading the registry", &e);
                return Err(());
            }
        };
        let Some(entry) = entry else {
            match kv.create(key, value.clone()).await {
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                Err(e) => {
                    failed("writing the registry", &e);
                    return Err(());
                }
            }
        };
        let holder = String::from_utf8_lossy(&entry.value).into_owned();
        let (node, incarnation) = holder.split_once('\n').unwrap_or((&holder, ""));
        if node == &*me.name && incarnation == me.incarnation.to_string() {
            return Ok(None);
        }
        match kv.update(key, value.clone(), entry.revision).await {
            Ok(_) => {}
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => {
                failed("writing the registry", &e);
                return Err(());
            }
        }
        if node == &*me.name {
            // This node before a restart: what it held is gone.
            return Ok(None);
        }
        count(counters, |c| &c.takeovers_in);
        let kick = NodeMsg::Kick(client_id.clone(), want_session).encode();
        let request = async_nats::Request::new()
            .payload(kick)
            .timeout(Some(KICK_TIMEOUT));
        return match client.send_request(subject_of(node), request).await {
            Ok(reply) if !reply.payload.is_empty() && reply.status.is_none() => {
                Ok(Some(reply.payload))
            }
            // No session there, or the node is gone (no responders, or
            // silence): nothing moves.
            _ => Ok(None),
        };
    }
    tracing::warn!("cluster: claiming a session: lost 8 races in a row");
    Err(())
}

//! The glommio shell: one executor per shard, each pinned to a core when there
//! are enough cores, each accepting on every listen address (SO_REUSEPORT),
//! owning the connections and sessions whose clientId hashes to it.
//!
//! A shard runs one loop: its sockets on its own io_uring ([`uring`], the
//! loop in `ring_loop`) or, with `--io epoll` or a kernel without io_uring,
//! in one epoll set ([`poller`]); messages from other shards ([`mesh`]); and
//! a tick every 100 ms (keep-alive, connect timeouts, stats). Both loops
//! share the socket table and CONNECT handshake ([`net`]); each event calls
//! into the shard's sans-IO [`Broker`] and then [`Shard::dispatch`], which
//! carries out what it asks for at once.
//!
//! With `--data-dir`, a turn's records go to the shard's log ([`store`])
//! before the acknowledgements that wait for them are released: the epoll
//! loop ends each turn with [`Shard::commit_log`] (and waits for the disk);
//! the ring loop submits the commit on its ring and goes on serving
//! sockets until it completes, the next turns' records gathering for the
//! commit after it.
//!
//! Everything shard-local is `Rc`/`RefCell` (`!Send`): only [`mesh::MeshMsg`]
//! crosses threads. This module is the only place that reads the clock.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::auth::Authenticator;
use crate::config::{Config, IoMode};
use crate::metrics::Counters;
use bytes::Bytes;

use crate::proto::acl::Acl;
use crate::proto::broker::{Broker, BrokerConfig, Event, ShardMsg};
use crate::proto::codec::QoS;
use crate::proto::handshake::Authenticate;
use crate::proto::topic::TopicName;
use crate::proto::{Millis, ShardId};

pub(crate) mod layer;
pub mod listener;
pub mod mesh;
pub mod net;
pub mod poller;
mod ring_loop;
pub mod store;
pub mod uring;

use mesh::{Mesh, MeshEnds, MeshMsg, Wake};
use net::Net;
use poller::Epoll;
use uring::Uring;

/// What carries a shard's bytes (`--io`, resolved at start).
pub(crate) enum Io {
    /// One epoll set, one system call per socket operation.
    Epoll(Epoll),
    /// One io_uring, one `io_uring_enter` per turn of the loop (boxed: the
    /// ring's handle is some 300 bytes, an epoll set's is a descriptor).
    Uring(Box<RefCell<Uring>>),
}

/// Bytes read from a socket at once into the shard's shared scratch buffer.
const SCRATCH_SIZE: usize = 64 * 1024;

/// How often a shard advances its keep-alive wheel and checks for shutdown.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// Ticks between looks at whether the io_uring buffer ring can shrink
/// (5 s): long enough that a ring is not shrunk between the bursts of one
/// storm, short enough that the memory comes back soon after it.
pub(crate) const RING_TRIM_TICKS: u64 = 50;

/// One shard's state, shared by its tasks.
pub struct Shard {
    /// This shard.
    pub id: ShardId,
    /// Number of shards.
    pub shards: u16,
    /// The broker configuration.
    pub config: Config,
    /// Process-wide counters.
    pub counters: Arc<Counters>,
    /// Credentials check, shared read-only by all shards.
    pub auth: RefCell<Arc<Authenticator>>,
    /// TLS settings for new connections on `--tls-listen`/`--wss-listen`
    /// (SIGHUP may replace them).
    tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    /// How WebSocket upgrades are judged (`--ws-path`).
    ws_rules: layer::WsRules,
    /// The password and ACL files in force (SIGHUP rereads them), and the
    /// generation of them this shard uses.
    reload: Arc<crate::reload::Reloadable>,
    reload_seen: Cell<u64>,
    /// Random per process; part of assigned clientIds.
    pub nonce: u64,
    /// Sockets the process may hold before accepts are refused: the
    /// open-file limit less the descriptors shards need for themselves.
    pub socket_ceiling: u64,
    /// Client connections held before CONNECT is refused with return code 3:
    /// `--max-connections`, or the socket ceiling when that is 0.
    pub connection_ceiling: u64,
    /// The protocol state machine of this shard.
    pub broker: RefCell<Broker>,
    /// What every socket of this shard (listeners, handshakes,
    /// connections) is watched and driven with.
    io: Io,
    /// Broker messages for each other shard, sent at the end of the loop's
    /// turn ([`Shard::flush_outbox`]).
    outbox: RefCell<Vec<Vec<ShardMsg>>>,
    net: RefCell<Net>,
    /// The one buffer every socket of the shard is read into.
    scratch: RefCell<Box<[u8]>>,
    mesh: Option<Mesh>,
    /// `--cluster`: the link's place on the mesh.
    link: Option<ShardId>,
    /// `--cluster`: CONNECTs waiting for the link to say this node holds
    /// their client's session, by ticket.
    claims: RefCell<hashbrown::HashMap<u64, mesh::Handoff>>,
    /// `--cluster`: digests of the clientIds this shard holds in the
    /// cluster's session registry ([`crate::cluster::client_digest`]).
    claimed: RefCell<hashbrown::HashSet<u64>>,
    /// `--cluster`: connections whose will the link keeps, with their
    /// clientIds (cleared there when they close).
    cluster_wills: RefCell<hashbrown::HashMap<crate::proto::ConnId, bytestring::ByteString>>,
    serial: Cell<u64>,
    started: Instant,
    last_stats: Cell<Instant>,
    /// When the `$SYS` topics were last published (shard 0 only), and what.
    last_sys: Cell<Option<Instant>>,
    sys_values: RefCell<hashbrown::HashMap<&'static str, String>>,
    /// Bytes read and written since the last tick, added to the shared
    /// counters then (one atomic add per tick, not per syscall).
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    /// Ticks since start.
    ticks: Cell<u64>,
    shutdown: Arc<AtomicBool>,
    /// `--data-dir`: this shard's log (taken out while a commit awaits it).
    log: RefCell<Option<store::ShardLog>>,
    /// `--data-dir` on the `--io uring` loop: the commit the ring is
    /// carrying (see `ring_loop`); at most one at a time.
    ring_commit: RefCell<Option<store::RingCommit>>,
    /// When the last commit (on the ring, or spaced on the epoll loop)
    /// started.
    last_commit: Cell<Option<Instant>>,
    /// `--fsync always`: commit after every completion (read) that wrote
    /// records, not once per turn.
    sync_each_read: bool,
}

impl Authenticate for Authenticator {
    fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<(), u8> {
        use crate::auth::AuthDecision;
        use crate::proto::codec::return_code;
        match self.check(username, password) {
            AuthDecision::Accept => Ok(()),
            AuthDecision::BadCredentials => Err(return_code::BAD_USERNAME_OR_PASSWORD),
            AuthDecision::NotAuthorized => Err(return_code::NOT_AUTHORIZED),
        }
    }
}

impl Shard {
    /// Monotonic time since the process started its shards (one epoch for
    /// all of them).
    pub fn now(&self) -> Millis {
        Millis(self.started.elapsed().as_millis() as u64)
    }

    fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    fn next_serial(&self) -> u64 {
        let n = self.serial.get();
        self.serial.set(n + 1);
        n
    }

    /// Carries out the broker's events: write to sockets, close them, send
    /// to peers.
    pub fn dispatch(&self) {
        loop {
            let event = self.broker.borrow_mut().poll_event();
            match event {
                None => return,
                Some(Event::Transmit(id)) => self.transmit(id),
                Some(Event::Close(id)) => self.close_conn(id),
                Some(Event::Resume(id)) => self.resume_held_reads(id),
                Some(Event::Broadcast(msg)) => {
                    let mut outbox = self.outbox.borrow_mut();
                    for (peer, batch) in outbox.iter_mut().enumerate() {
                        if peer != usize::from(self.id.0) {
                            batch.push(msg.clone());
                        }
                    }
                }
                Some(Event::SendTo(peer, msg)) => {
                    if let Some(batch) = self.outbox.borrow_mut().get_mut(usize::from(peer.0)) {
                        batch.push(msg);
                    }
                }
            }
        }
    }

    /// True while messages to shard `peer` wait for room in its full inbox.
    fn mesh_backlogged_to(&self, peer: ShardId) -> bool {
        self.mesh.as_ref().is_some_and(|m| m.backlogged_to(peer))
    }

    /// Sends what this turn of the loop produced for other shards, one
    /// batch per peer: a burst of publishes costs each peer one channel
    /// message and at most one doorbell, not one per publish.
    fn flush_outbox(&self) {
        let Some(mesh) = &self.mesh else { return };
        let mut outbox = self.outbox.borrow_mut();
        for (peer, batch) in outbox.iter_mut().enumerate() {
            match batch.len() {
                0 => {}
                1 => mesh.send(
                    ShardId(peer as u16),
                    MeshMsg::Broker(batch.pop().expect("one")),
                ),
                _ => mesh.send(ShardId(peer as u16), MeshMsg::Batch(std::mem::take(batch))),
            }
        }
    }

    fn handle_mesh_msg(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Handoff(handoff) => net::accept_handoff(self, handoff),
            MeshMsg::Broker(msg) => {
                let now = self.now();
                self.broker.borrow_mut().handle_remote(msg, now);
                self.dispatch();
            }
            MeshMsg::Cluster(msg) => net::cluster_msg(self, msg),
            MeshMsg::Batch(msgs) => {
                let now = self.now();
                for msg in msgs {
                    self.broker.borrow_mut().handle_remote(msg, now);
                }
                self.dispatch();
            }
        }
    }

    /// The shard's periodic work: keep-alive expiry, connect timeouts and
    /// lingering closes, the stats line.
    fn tick(&self) {
        self.take_reload();
        let now = self.now();
        self.broker.borrow_mut().tick(now);
        self.expire_sockets(now);
        self.resume_listeners();
        self.dispatch();
        self.broker.borrow_mut().flush_counts();
        let c = &self.counters;
        c.bytes_received
            .fetch_add(self.bytes_in.replace(0), Ordering::Relaxed);
        c.bytes_sent
            .fetch_add(self.bytes_out.replace(0), Ordering::Relaxed);
        if let Some(gauge) = c.shard_connections.get(usize::from(self.id.0)) {
            let open = self.broker.borrow().connection_count() as u64;
            gauge.store(open, Ordering::Relaxed);
        }
        c.connections_maximum.fetch_max(
            crate::metrics::get(&c.connections_current),
            Ordering::Relaxed,
        );
        if self.id.0 == 0 {
            self.publish_sys();
        }
        let ticks = self.ticks.get() + 1;
        self.ticks.set(ticks);
        if ticks % RING_TRIM_TICKS == 0 {
            self.trim_ring();
        }
        if ticks % 10 == 0 {
            self.net.borrow_mut().shrink_handshake_slots();
            crate::sys::release_freed_memory();
            self.report_deepest_queues();
        }
        let stats_every = self.config.stats_interval;
        if self.id.0 == 0
            && !stats_every.is_zero()
            && self.last_stats.get().elapsed() >= stats_every
        {
            self.last_stats.set(Instant::now());
            tracing::info!("stats {}", self.counters);
        }
    }

    /// Once a second: this shard's deepest session queues, for the metrics
    /// endpoint and `$SYS/broker/queues/deepest`.
    fn report_deepest_queues(&self) {
        let Some(slot) = self.counters.deepest_queues.get(usize::from(self.id.0)) else {
            return;
        };
        let deepest = self
            .broker
            .borrow_mut()
            .deepest_queues(crate::metrics::DEEPEST_QUEUES);
        let list = deepest
            .into_iter()
            .map(|(id, depth)| (id.to_string(), depth))
            .collect();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// Every `--sys-interval`, publishes the `$SYS/broker/...` topics whose
    /// value changed, retained (as mosquitto does), through the same path as
    /// any PUBLISH: every shard's subscribers get them, and a new subscriber
    /// gets the latest at once.
    fn publish_sys(&self) {
        let every = self.config.sys_interval;
        if every.is_zero() || self.last_sys.get().is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_sys.set(Some(Instant::now()));
        let uptime = self.started.elapsed().as_secs();
        let mut last = self.sys_values.borrow_mut();
        for (topic, value) in self.counters.sys_topics(uptime) {
            if last.get(topic) == Some(&value) {
                continue;
            }
            let name = TopicName::new(topic).expect("$SYS topic names are valid");
            self.broker.borrow_mut().publish(
                name,
                Bytes::from(value.clone().into_bytes()),
                QoS::AtMostOnce,
                true,
            );
            last.insert(topic, value);
        }
        drop(last);
        self.dispatch();
    }

    /// With `--data-dir`: writes the records this turn produced (one write,
    /// one fdatasync) through glommio's file API, tells the broker they are
    /// durable, and sends the acknowledgements that waited for them;
    /// snapshots the shard when the log has grown enough. The loop waits
    /// here (its own disk only). The epoll loop commits this way, and the
    /// ring loop with `--fsync always` and at shutdown; otherwise the ring
    /// loop carries its commits on its own ring without waiting
    /// (`ring_loop`).
    ///
    /// A log that cannot be written ends the process: an acknowledgement
    /// is a promise the disk must keep, so none is sent for records that
    /// are not on it.
    pub(crate) async fn commit_log(&self) {
        debug_assert!(self.ring_commit.borrow().is_none());
        let Some((records, generation)) = self.broker.borrow_mut().take_log() else {
            return;
        };
        let Some(mut log) = self.log.borrow_mut().take() else {
            return;
        };
        if let Err(e) = log.commit(&records).await {
            fatal_disk_error(self.id, "writing", &e);
        }
        *self.log.borrow_mut() = Some(log);
        self.broker.borrow_mut().committed(generation);
        self.dispatch();
        self.snapshot_if_due().await;
    }

    /// SIGHUP, at shard 0's tick: rereads the password and ACL files (a bad
    /// one keeps the old ones, and the log says why). Connections stay
    /// open.
    fn take_reload(&self) {
        if self.id.0 == 0 {
            match self.reload.reload_if_requested(&self.config) {
                Some(Ok(what)) => tracing::info!("SIGHUP: reloaded {what}"),
                Some(Err(why)) => {
                    tracing::error!("SIGHUP: reload failed, the files in force stay: {why}")
                }
                None => {}
            }
        }
        self.refresh_reload();
    }

    /// At the start of every turn (one atomic load): the files in force
    /// since a reload, so that whatever a client sends after the reload
    /// was logged meets them on every shard.
    pub(crate) fn refresh_reload(&self) {
        if let Some((generation, now)) = self.reload.newer_than(self.reload_seen.get()) {
            self.reload_seen.set(generation);
            *self.auth.borrow_mut() = now.auth;
            *self.tls.borrow_mut() = now.tls;
            self.broker.borrow_mut().set_acl(now.acl);
        }
    }

    /// `--commit-interval-usec`: when the next commit may start, if not
    /// now. Each commit costs the process ~100 µs of CPU here (the write,
    /// the fdatasync in an io_uring worker, the device's requests),
    /// whatever it carries; back to back under a steady stream they came
    /// every ~0.5 ms and doubled the CPU per message. Spaced, each gathers
    /// the interval's records; after a quiet spell one starts at once.
    pub(crate) fn commit_not_before(&self, now: Instant) -> Option<Instant> {
        let last = self.last_commit.get()?;
        let due = last + Duration::from_micros(u64::from(self.config.commit_interval_usec));
        (now < due).then_some(due)
    }

    /// The epoll loop's end of turn with `--data-dir` (`--fsync
    /// batch|never`): [`Shard::commit_log`], unless the last commit started
    /// less than `--commit-interval-usec` ago: then the records wait until
    /// the time returned.
    pub(crate) async fn commit_log_spaced(&self) -> Option<Instant> {
        if self.broker.borrow().log_len() == 0 {
            return None;
        }
        let now = Instant::now();
        if let Some(due) = self.commit_not_before(now) {
            return Some(due);
        }
        self.last_commit.set(Some(now));
        self.commit_log().await;
        None
    }

    /// Replaces the log with a snapshot of the shard's state once it has
    /// grown enough ([`store::ShardLog::wants_snapshot`]). Only between
    /// commits.
    pub(crate) async fn snapshot_if_due(&self) {
        // Not while the ring writes zeros ahead into the file it replaces.
        let due = self
            .log
            .borrow()
            .as_ref()
            .is_some_and(|l| l.wants_snapshot() && !l.is_filling());
        if !due {
            return;
        }
        let Some(mut log) = self.log.borrow_mut().take() else {
            return;
        };
        let mut state = bytes::BytesMut::new();
        self.broker.borrow().snapshot(&mut state);
        if let Err(e) = log.snapshot(&state).await {
            fatal_disk_error(self.id, "snapshotting", &e);
        }
        *self.log.borrow_mut() = Some(log);
    }

    /// Sends `msg` to shard `peer` over the mesh (never blocks, never drops).
    fn send_to(&self, peer: ShardId, msg: MeshMsg) {
        if let Some(mesh) = &self.mesh {
            mesh.send(peer, msg);
        }
    }
}

/// Ends the process after a failed log write (see [`Shard::commit_log`]).
pub(crate) fn fatal_disk_error(shard: ShardId, doing: &str, e: &io::Error) -> ! {
    tracing::error!("{shard}: {doing} its --data-dir log failed: {e}; exiting so that no acknowledgement promises what is not on disk");
    std::process::exit(1)
}

/// Runs the broker until SIGINT or SIGTERM.
/// `tls`: the TLS settings' files and what was loaded from them, when there
/// is a TLS listener.
pub fn run(
    config: Config,
    auth: Authenticator,
    acl: Option<Acl>,
    tls: Option<(crate::tls::TlsFiles, Arc<rustls::ServerConfig>)>,
) -> io::Result<()> {
    let acl = acl.map(Arc::new);
    let shards = config.shards;
    let shutdown = Arc::new(AtomicBool::new(false));
    // The first SIGINT or SIGTERM starts a clean shutdown (wills out,
    // connections flushed and closed, exit 0 within ~1.3 s); a second one
    // while it runs exits at once with status 1. The conditional handler is
    // registered first so that the first signal only sets the flag.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, shutdown.clone())?;
        signal_hook::flag::register(sig, shutdown.clone())?;
    }

    let auth = Arc::new(auth);
    let (tls_files, tls) = match tls {
        Some((files, loaded)) => (Some(files), Some(loaded)),
        None => (None, None),
    };
    // SIGHUP: reread the password, ACL and TLS files (see `crate::reload`).
    let reload = Arc::new(crate::reload::Reloadable::new(
        crate::reload::InForce {
            auth: auth.clone(),
            acl: acl.clone(),
            tls: tls.clone(),
        },
        tls_files,
    )?);
    let mut counters = Counters::for_shards(shards);
    if !config.cluster.is_empty() {
        counters.cluster = Some(crate::metrics::ClusterCounters::new(config.node()));
    }
    let counters = Arc::new(counters);
    let nofile = crate::sys::raise_nofile_limit()?;
    // Up to 4 Mi descriptors (32 MiB of kernel table): past that, a limit
    // is more likely a setting nobody will reach than a plan.
    crate::sys::reserve_fd_table(nofile.min(1 << 22));
    let socket_ceiling = nofile.saturating_sub(config.fd_reserve()).max(1);
    let connection_ceiling = config.connection_ceiling(nofile) as u64;
    let mut nonce_bytes = [0u8; 8];
    getrandom::getrandom(&mut nonce_bytes).map_err(|e| io::Error::other(e.to_string()))?;
    let nonce = u64::from_le_bytes(nonce_bytes);

    // The CPUs this process may run on (taskset, cgroup cpusets), not CPUs
    // 0..n: pinning shard i to CPU i would put shards outside the allowed set.
    // One epoch for every shard: a message's expiry time travels between
    // shards, so their clocks must agree.
    let started = Instant::now();
    if let Some(addr) = config.metrics_listen {
        crate::http::spawn(addr, counters.clone(), started)?;
    }
    let cpus = crate::sys::allowed_cpus();
    let use_uring = choose_io(config.io)?;
    // Stored times are wall-clock: what the monotonic epoch `started` is
    // in Unix milliseconds.
    let wall_epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .saturating_sub(started.elapsed().as_millis() as u64);
    // The data dir is locked, checked and replayed before any shard runs.
    let (data_dir, mut starts) = match &config.data_dir {
        Some(dir) => {
            let (d, s) = store::open(dir, shards, &counters)?;
            (Some(d), s.into_iter().map(Some).collect())
        }
        None => (None, Vec::new()),
    };
    let data_path = data_dir.as_ref().map(|d| d.path().to_path_buf());
    // Two completions per connection per turn at most (its recv and its
    // send), for this shard's share of the sockets and some slack for
    // uneven spreading; the kernel's overflow list takes any excess.
    let cq_entries = u32::try_from(socket_ceiling / shards as u64 * 4).unwrap_or(u32::MAX);
    let wake = if use_uring { Wake::Ring } else { Wake::Eventfd };
    // With --cluster the link is one more peer on the mesh, after the shards.
    let clustered = !config.cluster.is_empty();
    let link = clustered.then_some(ShardId(shards as u16));
    let mesh_peers = if shards > 1 || clustered { shards } else { 0 };
    let mut mesh_ends = mesh::build_with_link(mesh_peers, clustered, wake)?.into_iter();
    let peers = shards + usize::from(clustered);
    let mut handles = Vec::with_capacity(shards);
    for i in 0..shards {
        // Pin one shard per core; with more shards than cores (tests run
        // --shards 4 on 2 cores) let the kernel place them.
        let placement = if shards <= cpus.len() {
            Placement::Fixed(cpus[i])
        } else {
            Placement::Unbound
        };
        let config = config.clone();
        let counters = counters.clone();
        let auth = auth.clone();
        let acl = acl.clone();
        let tls = tls.clone();
        let reload = reload.clone();
        let ends: Option<MeshEnds> = mesh_ends.next();
        let start: Option<store::ShardStart> = starts.get_mut(i).and_then(Option::take);
        let data_path = data_path.clone();
        let shutdown = shutdown.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("coremq-shard-{i}"))
            // Sockets need no DMA buffers; glommio's default pins 10 MiB per ring.
            .io_memory(64 * 1024)
            .ring_depth(1024)
            // The shard is one task that blocks in its own ring or in
            // epoll_wait; nothing else runs on its executor, so there is
            // nobody to preempt it for.
            // glommio's default 100 ms timer would interrupt that wait ten
            // times a second (EINTR, then two io_uring_enter to re-arm):
            // measured, it doubled an idle shard's wakeups.
            .preempt_timer(Duration::from_secs(60))
            .spawn(move || async move {
                // Made on the shard's own thread: the ring is SINGLE_ISSUER.
                let io = if use_uring {
                    let ring = Uring::new(cq_entries, config.ring_buffers, config.ring_batch_usec)?;
                    counters
                        .ring_buffers
                        .fetch_add(u64::from(ring.buffers()), Ordering::Relaxed);
                    Io::Uring(Box::new(RefCell::new(ring)))
                } else {
                    Io::Epoll(Epoll::new()?)
                };
                let mesh = ends.map(|e| Mesh::new(ShardId(i as u16), e));
                let mut listeners = Vec::new();
                for (addr, transport) in config.listeners() {
                    let fd = listener::bind(addr).map_err(|e| {
                        io::Error::new(e.kind(), format!("listening on {addr}: {e}"))
                    })?;
                    listeners.push((fd, transport));
                }
                let sync_each_read =
                    config.data_dir.is_some() && config.fsync == crate::config::FsyncMode::Always;
                let ws_rules = layer::WsRules {
                    path: config.ws_path.clone(),
                };
                let shard = Rc::new(Shard {
                    id: ShardId(i as u16),
                    shards: shards as u16,
                    broker: RefCell::new(Broker::new(
                        BrokerConfig {
                            shard: ShardId(i as u16),
                            shards: shards as u16,
                            max_packet_size: config.max_packet_size,
                            max_inflight: usize::from(config.max_inflight),
                            max_queued: config.max_queued,
                            queue_full: config.queue_full,
                            queue_full_timeout_ms: config.queue_full_timeout.as_millis() as u64,
                            acl: acl.clone(),
                            max_keepalive: config.max_keepalive,
                            max_session_expiry: config.max_session_expiry,
                            max_topic_alias: config.max_topic_alias,
                            receive_maximum: config.receive_maximum,
                            response_information: config
                                .response_information
                                .as_deref()
                                .map(bytestring::ByteString::from),
                            persist: config.data_dir.is_some(),
                            wall_epoch_ms,
                            link,
                        },
                        counters.clone(),
                        Millis(0),
                    )),
                    config,
                    counters,
                    auth: RefCell::new(auth),
                    tls: RefCell::new(tls),
                    ws_rules,
                    reload,
                    reload_seen: Cell::new(0),
                    nonce,
                    socket_ceiling,
                    connection_ceiling,
                    io,
                    outbox: RefCell::new(vec![Vec::new(); peers]),
                    net: RefCell::new(Net::new(listeners)),
                    scratch: RefCell::new(vec![0u8; SCRATCH_SIZE].into_boxed_slice()),
                    mesh,
                    link,
                    claims: RefCell::new(hashbrown::HashMap::new()),
                    claimed: RefCell::new(hashbrown::HashSet::new()),
                    cluster_wills: RefCell::new(hashbrown::HashMap::new()),
                    serial: Cell::new(0),
                    started,
                    last_stats: Cell::new(Instant::now()),
                    last_sys: Cell::new(None),
                    sys_values: RefCell::new(hashbrown::HashMap::new()),
                    bytes_in: Cell::new(0),
                    bytes_out: Cell::new(0),
                    ticks: Cell::new(0),
                    shutdown,
                    log: RefCell::new(None),
                    ring_commit: RefCell::new(None),
                    last_commit: Cell::new(None),
                    sync_each_read,
                });
                if let (Some(dir), Some(start)) = (&data_path, start) {
                    let log = store::ShardLog::open(
                        dir,
                        i,
                        start.log_len,
                        shard.config.fsync,
                        shard.config.snapshot_mib,
                        shard.counters.clone(),
                    )
                    .await
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("--data-dir: opening shard {i}'s log: {e}"),
                        )
                    })?;
                    *shard.log.borrow_mut() = Some(log);
                    let now = shard.now();
                    shard.broker.borrow_mut().restore(start.recovered, now);
                    shard.dispatch();
                }
                shard_main(shard).await
            })
            .map_err(|e| io::Error::other(format!("starting shard {i}: {e}")))?;
        handles.push(handle);
    }
    let link_thread = match mesh_ends.next() {
        Some(ends) if clustered => Some(crate::cluster::spawn(crate::cluster::LinkSetup {
            servers: config.cluster.clone(),
            node: config.node(),
            shards: shards as u16,
            ends,
            wake,
            started,
            counters: counters.clone(),
            shutdown: shutdown.clone(),
        })?),
        _ => None,
    };
    let mut result = Ok(());
    // Held until every shard is done with the directory.
    let _data_dir = data_dir;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(io::Error::other(e.to_string())),
        }
    }
    if let Some(link) = link_thread {
        let _ = link.join();
    }
    result
}

/// Resolves `--io`: true for the io_uring loop. `auto` falls back to epoll
/// with one log line saying why; `uring` refuses to start without it.
/// Either way the process needs io_uring itself (glommio runs on it): a
/// system that refuses it gets a one-line error, not a failing executor.
fn choose_io(mode: IoMode) -> io::Result<bool> {
    uring::setup_allowed().map_err(|why| {
        io::Error::other(format!(
            "io_uring is refused here ({why}); the shards' executor (glommio) needs it \
             whatever --io says: allow io_uring_setup, io_uring_enter and io_uring_register \
             (see tuning/container.md for containers, or set kernel.io_uring_disabled=0)"
        ))
    })?;
    resolve_io(mode, uring::probe)
}

/// [`choose_io`] with the kernel's answer given by `probe`.
fn resolve_io(mode: IoMode, probe: impl FnOnce() -> Result<(), String>) -> io::Result<bool> {
    match mode {
        IoMode::Epoll => Ok(false),
        IoMode::Uring => probe()
            .map(|()| true)
            .map_err(|why| io::Error::other(format!("--io uring: io_uring unavailable: {why}"))),
        IoMode::Auto => match probe() {
            Ok(()) => Ok(true),
            Err(why) => {
                tracing::warn!("io_uring unavailable ({why}); using the epoll loop");
                Ok(false)
            }
        },
    }
}

async fn shard_main(shard: Rc<Shard>) -> io::Result<()> {
    if shard.id.0 == 0 {
        tracing::info!(
            shards = shard.shards,
            io = if matches!(shard.io, Io::Uring(_)) { "uring" } else { "epoll" },
            listen = ?shard.config.listen,
            "coremq {} ready",
            env!("CARGO_PKG_VERSION")
        );
    }
    net::run(shard).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_auto_falls_back_to_epoll_and_uring_refuses_without_io_uring() {
        let refused = || Err("io_uring_setup: Operation not permitted".to_string());
        assert!(!resolve_io(IoMode::Auto, refused).unwrap());
        let e = resolve_io(IoMode::Uring, refused).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--io uring: io_uring unavailable: io_uring_setup: Operation not permitted"
        );
        assert!(resolve_io(IoMode::Auto, || Ok(())).unwrap());
        assert!(resolve_io(IoMode::Uring, || Ok(())).unwrap());
        assert!(!resolve_io(IoMode::Epoll, || panic!("epoll asks nothing")).unwrap());
        // This kernel has everything the loop uses (CI must run both loops).
        assert_eq!(uring::probe(), Ok(()));
    }
}

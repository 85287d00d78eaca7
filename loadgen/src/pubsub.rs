//! `loadgen pubsub`: message throughput and end-to-end latency through a
//! broker, in this one process, over one mio (epoll) event loop.
//!
//! Phases: connect every subscriber and SUBSCRIBE (every SUBACK must grant
//! the QoS asked); connect the publishers; publish for `--duration`; stop
//! publishing and wait (up to `--timeout`) for what is in flight; DISCONNECT
//! everyone and wait for the broker's closes.
//!
//! Every PUBLISH payload starts with a 16-byte header — send time (µs,
//! CLOCK_MONOTONIC, big-endian u64), publisher number (u32), sequence number
//! (u32) — and the rest is filler. A subscriber checks each arrival against
//! its (publisher, subscriber) stream: new, duplicate, or late (after a
//! higher sequence number of the same stream: out of order).
//!
//! Per connection: a small [`Conn`] (socket, state, two timestamps, buffers
//! that exist only while a packet is partly read or written). Per publisher:
//! its PUBLISH encoded once (by `coremq::proto::codec`), patched per message,
//! and `--window` slots for QoS 1/2 flows, whose packet id is one more than
//! the slot number, so an id is never reused while its flow is open. Per stream: the
//! lowest sequence number not yet seen and the few seen above it. No timer
//! per message: timeouts are one FIFO (they all have the same length), the
//! rate is a count of messages due since the start.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use clap::{ArgGroup, Args};
use coremq::proto::codec::{
    self, Connect, Packet, PacketId, ProtocolVersion, PubResp, Publish, QoS, Subscribe,
    SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::engine::{cause_of, open_socket, sockaddr};
use crate::protocol::{self, Protocol};
use crate::report::{self, BrokerSamples, PubsubReport, Report, SharedReport};
use crate::spec::{hist_to_b64, new_hist, Mode, WorkerResult};
use crate::sys::{mono_us, proc_sample, rusage_cpu_s, self_max_rss_kb, source_ip, ProcSample};
use crate::{usage_error, Common};

const MAX_PACKET: usize = 1 << 20;
/// Send time (8) + publisher number (4) + sequence number (4).
pub const HEADER: usize = 16;
const READ_CHUNK: usize = 64 * 1024;
/// Reads of READ_CHUNK per readiness event before other sockets get a turn.
const READS_PER_TURN: usize = 8;
/// QoS 0 without --rate: messages a publisher writes per turn.
const QOS0_BATCH: usize = 32;
/// Sequence numbers a stream remembers above a gap before it gives the gap up.
const STREAM_TRACK: usize = 256;
/// --fan-out: (publisher, subscriber) streams at most.
const MAX_STREAMS: u64 = 4_000_000;
/// File descriptors kept for the process itself.
const FD_RESERVE: u64 = 100;
const DISCONNECT: [u8; 2] = [0xE0, 0x00];
const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// `loadgen pubsub`.
#[derive(Args, Debug, Clone)]
#[command(group(
    ArgGroup::new("shape")
        .required(true)
        .args(["pairs", "fan_in", "fan_out"])
))]
pub struct PubsubArgs {
    /// N publishers, N subscribers: publisher i → PREFIX/p2p/{i} → subscriber i.
    #[arg(long, value_name = "N")]
    pub pairs: Option<u32>,
    /// N publishers on PREFIX/in/{i}, one subscriber on PREFIX/in/+.
    #[arg(long, value_name = "N")]
    pub fan_in: Option<u32>,
    /// One publisher (or --publishers P) on PREFIX/out, N subscribers on it.
    #[arg(long, value_name = "N")]
    pub fan_out: Option<u32>,
    /// --fan-out: publishers on PREFIX/out (P-pub-0 … P-pub-{P-1}).
    #[arg(long, value_name = "P")]
    pub publishers: Option<u32>,
    /// Subscribe to $share/NAME/FILTER instead of FILTER: the subscribers of
    /// each topic form one shared-subscription group, and each message must
    /// reach the group exactly once (with --fan-out N: one group of N members).
    #[arg(long, value_name = "NAME")]
    pub share_group: Option<String>,
    /// QoS of every PUBLISH and every subscription: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// PUBLISH payload bytes (at least 16: send time, publisher, sequence number).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub payload: usize,
    /// Seconds of publishing.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// PUBLISHes per second, all publishers together (default: as fast as they go).
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub rate: Option<f64>,
    /// QoS 1/2: messages each publisher may have unacknowledged.
    #[arg(long, value_name = "W", default_value_t = 16)]
    pub window: u32,
    /// Outstanding handshakes (CONNECT → CONNACK → SUBSCRIBE → SUBACK) at most.
    #[arg(long, default_value_t = 512)]
    pub inflight: u32,
    /// keepAlive seconds in every CONNECT; with K > 0 every connection pings every K/2 s.
    #[arg(long, default_value_t = 0)]
    pub keepalive: u16,
    /// clientIds PREFIX-pub-{i} / PREFIX-sub-{i}; topics under PREFIX/.
    #[arg(long, default_value = "lg")]
    pub prefix: String,
    #[command(flatten)]
    pub common: Common,
}

/// Who sends to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Publisher i → subscriber i.
    Pairs,
    /// N publishers → one subscriber.
    FanIn,
    /// One publisher → N subscribers.
    FanOut,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Pairs => "pairs",
            Shape::FanIn => "fan-in",
            Shape::FanOut => "fan-out",
        }
    }
}

struct Cfg {
    shape: Shape,
    n: u32,
    pubs: u32,
    subs: u32,
    qos: QoS,
    payload: usize,
    duration_us: u64,
    /// Messages per second over all publishers; 0: unbounded.
    rate: f64,
    window: u16,
    inflight: u32,
    keepalive: u16,
    prefix: String,
    broker: SocketAddrV4,
    source_ips: u32,
    source_skip: u32,
    timeout_us: u64,
    quiet: bool,
    broker_pid: Option<u32>,
    protocol: Protocol,
    /// --share-group: the share name of every subscription.
    group: Option<String>,
}

impl Cfg {
    /// One group of many members (--fan-out with --share-group): a message
    /// is owed once to the group, not once per subscriber.
    fn shared_fan_out(&self) -> bool {
        self.group.is_some() && self.shape == Shape::FanOut
    }
}

/// `loadgen pubsub`: validate, run, report. Exit code 0 when nothing failed.
pub fn pubsub(a: PubsubArgs) -> Result<i32> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::coord::check_common(&a.common);
    crate::coord::check_rate("--rate", a.rate);
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        usage_error("--duration must be a positive number of seconds");
    }
    if a.payload < HEADER {
        usage_error(format!(
            "--payload must be at least {HEADER} bytes (send time, publisher, sequence number)"
        ));
    }
    if a.payload > 256 * 1024 {
        usage_error("--payload must be at most 262144 bytes");
    }
    if a.window == 0 || a.window > 65535 {
        usage_error("--window must be 1 to 65535 (packet ids per publisher)");
    }
    if a.inflight == 0 {
        usage_error("--inflight must be at least 1");
    }
    if a.prefix.is_empty() || a.prefix.contains(['+', '#', '\0']) {
        usage_error("--prefix must be non-empty, without + # or NUL");
    }
    if a.common.workers.is_some_and(|w| w != 1) {
        usage_error("--workers: pubsub runs in one process (leave --workers out)");
    }
    let (shape, n) = match (a.pairs, a.fan_in, a.fan_out) {
        (Some(n), None, None) => (Shape::Pairs, n),
        (None, Some(n), None) => (Shape::FanIn, n),
        (None, None, Some(n)) => (Shape::FanOut, n),
        _ => usage_error("give exactly one of --pairs, --fan-in, --fan-out"),
    };
    if n == 0 {
        usage_error(format!("--{} must be at least 1", shape.name()));
    }
    if let Some(g) = &a.share_group {
        // MQTT-4.8.2-1/-2: a non-empty share name without / + # (nor NUL).
        if g.is_empty() || g.contains(['/', '+', '#', '\0']) {
            usage_error("--share-group must be non-empty, without / + # or NUL");
        }
    }
    if a.publishers.is_some() && shape != Shape::FanOut {
        usage_error("--publishers goes with --fan-out (pairs and fan-in have one per topic)");
    }
    let fan_out_pubs = a.publishers.unwrap_or(1);
    if fan_out_pubs == 0 {
        usage_error("--publishers must be at least 1");
    }
    let (pubs, subs) = match shape {
        Shape::Pairs => (n, n),
        Shape::FanIn => (n, 1),
        Shape::FanOut => (fan_out_pubs, n),
    };
    if shape == Shape::FanOut && u64::from(pubs) * u64::from(subs) > MAX_STREAMS {
        usage_error(format!(
            "--publishers × --fan-out must be at most {MAX_STREAMS} \
             (a stream per publisher and subscriber)"
        ));
    }
    let sockets = u64::from(pubs) + u64::from(subs);
    let limit = crate::sys::raise_nofile();
    if sockets + FD_RESERVE > limit {
        usage_error(format!(
            "{sockets} sockets: over this process's open-file limit {limit} less {FD_RESERVE} \
             (pubsub runs in one process)"
        ));
    }
    let broker = crate::resolve_v4(&a.common.broker).unwrap_or_else(|e| usage_error(e));
    let source_ips = a
        .common
        .source_ips
        .unwrap_or_else(|| sockets.div_ceil(crate::coord::SOCKETS_PER_SOURCE_IP).max(1) as u32);
    let cfg = Cfg {
        shape,
        n,
        pubs,
        subs,
        qos: QoS::from_u8(a.qos).expect("checked by clap"),
        payload: a.payload,
        duration_us: (a.duration * 1e6) as u64,
        rate: a.rate.unwrap_or(0.0),
        window: a.window as u16,
        inflight: a.inflight,
        keepalive: a.keepalive,
        prefix: a.prefix.clone(),
        broker,
        source_ips,
        source_skip: a.common.source_skip,
        timeout_us: (a.common.timeout * 1e6) as u64,
        quiet: a.common.quiet,
        broker_pid: a.common.broker_pid,
        protocol: a.common.protocol,
        group: a.share_group.clone(),
    };
    let params = serde_json::json!({
        "shape": shape.name(), "n": n, "qos": a.qos, "payload": a.payload,
        "duration": a.duration, "rate": a.rate, "window": a.window, "inflight": a.inflight,
        "keepalive": a.keepalive, "prefix": a.prefix, "timeout": a.common.timeout,
        "publishers": pubs, "share_group": a.share_group,
    });
    let t0 = std::time::Instant::now();
    let mut run = Run::new(cfg)?;
    run.run()?;
    let (wr, ps, samples) = run.finish();
    let rep = Report::build(
        report::RunInfo {
            mode: Mode::Pubsub,
            broker: a.common.broker.clone(),
            broker_pid: a.common.broker_pid,
            workers: 1,
            source_ips,
            keepalive: a.keepalive,
            params,
            started_unix,
            total_wall_s: t0.elapsed().as_secs_f64(),
            main_secs: a.duration,
            parent_cpu_s: rusage_cpu_s(libc::RUSAGE_SELF),
            children_cpu_s: 0.0,
            protocol: a.common.protocol,
            pubsub: Some(ps),
        },
        &[wr],
        samples,
    )?;
    print!("{}", rep.table());
    if let Some(path) = &a.common.json {
        let s = serde_json::to_string_pretty(&rep)?;
        std::fs::write(path, s + "\n").with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &a.common.plot {
        std::fs::write(path, crate::plot::svg(&rep))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(if rep.failed_total > 0 { 1 } else { 0 })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Pub,
    Sub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Not started yet.
    Idle,
    Connecting,
    AwaitConnack,
    AwaitSuback,
    /// Subscribed (subscriber) or connected (publisher).
    Active,
    /// DISCONNECT sent; waiting for the broker's close.
    AwaitClose,
    /// Closed, for good.
    Closed,
}

struct Conn {
    stream: Option<TcpStream>,
    /// Bytes of a packet not yet whole.
    rbuf: Vec<u8>,
    /// Bytes the socket did not take yet.
    wbuf: Vec<u8>,
    /// connect() called, µs.
    t_start: u64,
    /// CONNECT / SUBSCRIBE written, µs.
    t_sent: u64,
    /// Index among publishers or subscribers.
    idx: u32,
    role: Role,
    st: St,
    /// In the runnable queue (publishers).
    queued: bool,
    /// In the read-again list.
    read_queued: bool,
}

/// A QoS 1/2 flow a publisher has open.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// PUBLISH written, µs.
    t: u64,
    seq: u32,
    /// 0 free, 1 waiting for PUBACK (QoS 1) / PUBREC (QoS 2), 2 waiting for PUBCOMP.
    st: u8,
}

struct PubSt {
    topic: String,
    /// The PUBLISH as the codec encodes it, packet id 1 and payload zero.
    tmpl: Vec<u8>,
    pid_off: usize,
    pay_off: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Next sequence number = messages published.
    seq: u32,
    /// Highest sequence number acknowledged + 1 (order check).
    ack_hi: u32,
    /// Subscribers each of its messages should reach.
    fanout: u32,
    active: bool,
}

struct SubSt {
    active: bool,
    /// Its SUBACK granted the QoS asked (stays set after the close).
    subscribed: bool,
    /// QoS 2 packet ids PUBREC'd, waiting for PUBREL.
    qos2: Vec<u16>,
}

/// What a stream made of an arrival.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// First time; `late` when a higher sequence number came first.
    New {
        late: bool,
    },
    Dup,
    /// Below a gap the stream gave up on: a duplicate or a very late one.
    Untracked,
}

/// One (publisher, subscriber) stream.
#[derive(Default)]
struct Stream {
    /// Lowest sequence number not seen yet.
    next: u32,
    /// Highest seen + 1.
    hi: u32,
    /// Seen, above `next`, ascending.
    above: Vec<u32>,
    /// A gap below `next` was given up (more than STREAM_TRACK seen above it).
    forced: bool,
    /// Any arrival out of order.
    any_late: bool,
}

impl Stream {
    fn see(&mut self, seq: u32) -> Seen {
        if seq < self.next {
            return if self.forced {
                Seen::Untracked
            } else {
                Seen::Dup
            };
        }
        let late = u64::from(seq) + 1 < u64::from(self.hi);
        if seq == self.next {
            self.next += 1;
            self.settle();
        } else {
            match self.above.binary_search(&seq) {
                Ok(_) => return Seen::Dup,
                Err(pos) => self.above.insert(pos, seq),
            }
            if self.above.len() > STREAM_TRACK {
                self.forced = true;
                self.next = self.above[0];
                self.settle();
            }
        }
        self.hi = self.hi.max(seq + 1);
        self.any_late |= late;
        Seen::New { late }
    }

    fn settle(&mut self) {
        let mut k = 0;
        while k < self.above.len() && self.above[k] == self.next {
            self.next += 1;
            k += 1;
        }
        self.above.drain(..k);
        if self.above.is_empty() && self.above.capacity() > 32 {
            self.above = Vec::new();
        }
    }
}

/// One publisher's messages as a shared group saw them: a bit per sequence
/// number, so a duplicate is told from a new message however far apart the
/// members run (one member's queue may lag the others' by thousands of
/// messages, more than a [`Stream`] keeps above a gap). 1 bit per message.
#[derive(Default)]
struct GroupSeen {
    bits: Vec<u64>,
}

impl GroupSeen {
    /// Whether `seq` is new to the group (and now seen).
    fn see(&mut self, seq: u32) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize((w + 1).next_power_of_two(), 0);
        }
        let new = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        new
    }
}

/// One (publisher, member) stream of a shared group: [`GroupSeen`] says new
/// or duplicate; this one only whether a member got a publisher's messages
/// in the order they were sent (MQTT-4.6.0-6 holds per receiving client;
/// across members no order is owed).
#[derive(Default, Clone, Copy)]
struct MemberOrder {
    /// Highest sequence number this member got + 1.
    hi: u32,
    any_late: bool,
}

impl MemberOrder {
    /// A message new to the group arrived at this member: whether it came
    /// after a higher sequence number from the same publisher.
    fn see(&mut self, seq: u32) -> bool {
        let late = seq < self.hi;
        self.hi = self.hi.max(seq + 1);
        self.any_late |= late;
        late
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Handshake,
    Suback,
    Close,
}

struct Deadline {
    tok: u32,
    kind: Wait,
    at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Subscribe,
    Connect,
    Publish,
    Drain,
    Disconnect,
    Done,
}

/// The run's state.
struct Run {
    cfg: Cfg,
    /// `cfg.protocol`, as the codec takes it.
    v: ProtocolVersion,
    poll: Poll,
    dst: libc::sockaddr_in,
    /// Subscribers are tokens 0..subs, publishers subs..subs+pubs.
    conns: Vec<Conn>,
    pubs: Vec<PubSt>,
    subs: Vec<SubSt>,
    /// Per (publisher, subscriber): new, duplicate or late (empty for a
    /// shared fan-out group).
    streams: Vec<Stream>,
    /// `cfg.shared_fan_out()`.
    shared_fan_out: bool,
    /// Shared fan-out: per publisher, new or duplicate to the group.
    group_seen: Vec<GroupSeen>,
    /// Shared fan-out: per (publisher, member), the order check.
    member_order: Vec<MemberOrder>,
    /// --share-group: PUBLISHes each subscriber received (empty without).
    member_deliveries: Vec<u64>,
    deadlines: VecDeque<Deadline>,
    runnable: VecDeque<u32>,
    read_again: Vec<u32>,
    scratch: BytesMut,
    chunk: Vec<u8>,
    /// Replies (acks, PUBREL) gathered while one socket's packets are handled.
    obuf: BytesMut,
    /// PUBLISHes of one batch.
    pbuf: Vec<u8>,
    phase: Phase,
    next_start: u32,
    hs_inflight: u32,
    awaiting_close: u64,
    // counters
    attempted: u64,
    connected: u64,
    subscribed: u64,
    pubs_connected: u64,
    disconnected: u64,
    pings: u64,
    pongs: u64,
    published: u64,
    acked: u64,
    pub_inflight: u64,
    unacked_closed: u64,
    sub_qos2_pending: u64,
    expected: u64,
    delivered: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    untracked: u64,
    misrouted: u64,
    in_window: u64,
    rate_sent: u64,
    rate_behind: u64,
    /// 5.0: the lowest Receive Maximum a broker's CONNACK gave a publisher,
    /// when below --window.
    receive_maximum: Option<u16>,
    rr: u32,
    failures: BTreeMap<String, u64>,
    failed: u64,
    // histograms (µs)
    h_e2e: Histogram<u64>,
    h_connack: Histogram<u64>,
    h_suback: Histogram<u64>,
    h_ack: Histogram<u64>,
    h_tcp: Histogram<u64>,
    /// Deliveries per second since publishing began.
    series: Vec<u64>,
    // times (µs) and CPU (s)
    t0: u64,
    cpu0: f64,
    setup_wall_s: f64,
    setup_cpu_s: f64,
    pub_start: u64,
    pub_end: u64,
    main_cpu0: f64,
    window_wall_s: f64,
    window_cpu_s: f64,
    drain_start: u64,
    drain_deadline: u64,
    drain_s: f64,
    drain_timed_out: bool,
    last_delivery: u64,
    next_ping: u64,
    unacked: u64,
    samples: BrokerSamples,
    peak_rss: u64,
    last_tick: u64,
    last_published: u64,
    last_delivered: u64,
}

impl Run {
    fn new(cfg: Cfg) -> Result<Run> {
        let poll = Poll::new().context("epoll")?;
        let total = cfg.subs + cfg.pubs;
        let mut conns = Vec::with_capacity(total as usize);
        for tok in 0..total {
            let (role, idx) = if tok < cfg.subs {
                (Role::Sub, tok)
            } else {
                (Role::Pub, tok - cfg.subs)
            };
            conns.push(Conn {
                stream: None,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                t_start: 0,
                t_sent: 0,
                idx,
                role,
                st: St::Idle,
                queued: false,
                read_queued: false,
            });
        }
        let pubs = (0..cfg.pubs)
            .map(|i| {
                let topic = match cfg.shape {
                    Shape::Pairs => format!("{}/p2p/{i}", cfg.prefix),
                    Shape::FanIn => format!("{}/in/{i}", cfg.prefix),
                    Shape::FanOut => format!("{}/out", cfg.prefix),
                };
                let (tmpl, pid_off, pay_off) =
                    publish_template(&topic, cfg.qos, cfg.payload, cfg.protocol.version())?;
                Ok(PubSt {
                    topic,
                    tmpl,
                    pid_off,
                    pay_off,
                    slots: Vec::new(),
                    free: Vec::new(),
                    seq: 0,
                    ack_hi: 0,
                    fanout: 0,
                    active: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let subs = (0..cfg.subs)
            .map(|_| SubSt {
                active: false,
                subscribed: false,
                qos2: Vec::new(),
            })
            .collect();
        let shared_fan_out = cfg.shared_fan_out();
        let n_streams = match cfg.shape {
            Shape::Pairs | Shape::FanIn => cfg.n as usize,
            Shape::FanOut if shared_fan_out => 0,
            Shape::FanOut => cfg.pubs as usize * cfg.subs as usize,
        };
        let streams = (0..n_streams).map(|_| Stream::default()).collect();
        let (group_seen, member_order) = if shared_fan_out {
            (
                (0..cfg.pubs).map(|_| GroupSeen::default()).collect(),
                vec![MemberOrder::default(); cfg.pubs as usize * cfg.subs as usize],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let member_deliveries = if cfg.group.is_some() {
            vec![0; cfg.subs as usize]
        } else {
            Vec::new()
        };
        Ok(Run {
            v: cfg.protocol.version(),
            dst: sockaddr(cfg.broker),
            poll,
            conns,
            pubs,
            subs,
            streams,
            shared_fan_out,
            group_seen,
            member_order,
            member_deliveries,
            deadlines: VecDeque::new(),
            runnable: VecDeque::new(),
            read_again: Vec::new(),
            scratch: BytesMut::with_capacity(READ_CHUNK * 2),
            chunk: vec![0; READ_CHUNK],
            obuf: BytesMut::with_capacity(4096),
            pbuf: Vec::with_capacity(8192),
            phase: Phase::Subscribe,
            next_start: 0,
            hs_inflight: 0,
            awaiting_close: 0,
            attempted: 0,
            connected: 0,
            subscribed: 0,
            pubs_connected: 0,
            disconnected: 0,
            pings: 0,
            pongs: 0,
            published: 0,
            acked: 0,
            pub_inflight: 0,
            unacked_closed: 0,
            sub_qos2_pending: 0,
            expected: 0,
            delivered: 0,
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
            untracked: 0,
            misrouted: 0,
            in_window: 0,
            rate_sent: 0,
            rate_behind: 0,
            receive_maximum: None,
            rr: 0,
            failures: BTreeMap::new(),
            failed: 0,
            h_e2e: new_hist(),
            h_connack: new_hist(),
            h_suback: new_hist(),
            h_ack: new_hist(),
            h_tcp: new_hist(),
            series: Vec::new(),
            t0: 0,
            cpu0: 0.0,
            setup_wall_s: 0.0,
            setup_cpu_s: 0.0,
            pub_start: 0,
            pub_end: 0,
            main_cpu0: 0.0,
            window_wall_s: 0.0,
            window_cpu_s: 0.0,
            drain_start: 0,
            drain_deadline: 0,
            drain_s: 0.0,
            drain_timed_out: false,
            last_delivery: 0,
            next_ping: 0,
            unacked: 0,
            samples: BrokerSamples::default(),
            peak_rss: 0,
            last_tick: 0,
            last_published: 0,
            last_delivered: 0,
            cfg,
        })
    }

    fn fail(&mut self, cause: &str) {
        self.fail_n(cause, 1);
    }

    fn fail_n(&mut self, cause: &str, k: u64) {
        if k == 0 {
            return;
        }
        self.failed += k;
        *self.failures.entry(cause.to_string()).or_default() += k;
    }

    fn sample(&self) -> Option<ProcSample> {
        self.cfg.broker_pid.and_then(proc_sample)
    }

    fn client_id(&self, tok: u32) -> String {
        let c = &self.conns[tok as usize];
        match c.role {
            Role::Pub => format!("{}-pub-{}", self.cfg.prefix, c.idx),
            Role::Sub => format!("{}-sub-{}", self.cfg.prefix, c.idx),
        }
    }

    fn filter(&self, sub: u32) -> String {
        let f = match self.cfg.shape {
            Shape::Pairs => format!("{}/p2p/{sub}", self.cfg.prefix),
            Shape::FanIn => format!("{}/in/+", self.cfg.prefix),
            Shape::FanOut => format!("{}/out", self.cfg.prefix),
        };
        match &self.cfg.group {
            Some(g) => format!("$share/{g}/{f}"),
            None => f,
        }
    }

    /// Opens the connection of token `tok` (its number for the source address).
    fn start(&mut self, tok: u32) {
        let now = mono_us();
        self.attempted += 1;
        let src = source_ip(self.cfg.source_skip + tok % self.cfg.source_ips);
        let mut stream = match open_socket(Some(src), &self.dst) {
            Ok(s) => s,
            Err(e) => {
                self.fail(&cause_of(&e));
                self.conns[tok as usize].st = St::Closed;
                return;
            }
        };
        // Small PUBLISHes and acks must not wait for Nagle (40 ms behind a
        // delayed ACK on loopback).
        if let Err(e) = stream.set_nodelay(true) {
            self.fail(&cause_of(&e));
            self.conns[tok as usize].st = St::Closed;
            return;
        }
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(tok as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.fail(&cause_of(&e));
            self.conns[tok as usize].st = St::Closed;
            return;
        }
        let c = &mut self.conns[tok as usize];
        c.stream = Some(stream);
        c.st = St::Connecting;
        c.t_start = now;
        self.hs_inflight += 1;
        self.deadlines.push_back(Deadline {
            tok,
            kind: Wait::Handshake,
            at: now + self.cfg.timeout_us,
        });
        // On loopback the TCP handshake is usually done by now.
        self.send_connect(tok);
    }

    fn send_connect(&mut self, tok: u32) {
        let p = Packet::Connect(Box::new(Connect {
            protocol: self.v,
            clean_start: true,
            keep_alive: self.cfg.keepalive,
            client_id: ByteString::from(self.client_id(tok)),
            will: None,
            username: None,
            password: None,
            properties: None,
        }));
        let mut buf = BytesMut::new();
        p.encode(self.v, &mut buf);
        let res = {
            let s = self.conns[tok as usize]
                .stream
                .as_mut()
                .expect("connecting socket");
            loop {
                match s.write(&buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        let now = mono_us();
        match res {
            Ok(k) => {
                let c = &mut self.conns[tok as usize];
                if k < buf.len() {
                    c.wbuf.extend_from_slice(&buf[k..]);
                }
                c.st = St::AwaitConnack;
                c.t_sent = now;
                self.h_tcp
                    .saturating_record(now.saturating_sub(c.t_start).max(1));
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => self.on_close(tok, Some(&e)),
        }
    }

    /// Writes `bytes`, or keeps what the socket does not take for its next
    /// writable event. Err: the connection is broken.
    fn write(&mut self, tok: u32, bytes: &[u8]) -> io::Result<()> {
        let c = &mut self.conns[tok as usize];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        if !c.wbuf.is_empty() {
            c.wbuf.extend_from_slice(bytes);
            return Ok(());
        }
        let mut off = 0;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off < bytes.len() {
            c.wbuf.extend_from_slice(&bytes[off..]);
        }
        Ok(())
    }

    fn send(&mut self, tok: u32, bytes: &[u8]) {
        if let Err(e) = self.write(tok, bytes) {
            self.on_close(tok, Some(&e));
        }
    }

    fn flush(&mut self, tok: u32) -> io::Result<()> {
        let c = &mut self.conns[tok as usize];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        let mut off = 0;
        while off < c.wbuf.len() {
            match s.write(&c.wbuf[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off == c.wbuf.len() {
            c.wbuf = Vec::new();
        } else {
            c.wbuf.drain(..off);
        }
        Ok(())
    }

    fn on_event(&mut self, tok: u32, ev: &mio::event::Event) {
        let Some(c) = self.conns.get(tok as usize) else {
            return;
        };
        if matches!(c.st, St::Idle | St::Closed) {
            return;
        }
        if c.st == St::Connecting {
            let err = match c.stream.as_ref().map(|s| s.take_error()) {
                Some(Ok(Some(e))) | Some(Err(e)) => Some(e),
                _ => None,
            };
            if let Some(e) = err {
                self.on_close(tok, Some(&e));
                return;
            }
            if ev.is_writable() || ev.is_readable() {
                self.send_connect(tok);
            }
            if self.conns[tok as usize].st == St::Connecting {
                return;
            }
        }
        if ev.is_writable() && !self.conns[tok as usize].wbuf.is_empty() {
            if let Err(e) = self.flush(tok) {
                self.on_close(tok, Some(&e));
                return;
            }
            let (role, idx, empty) = {
                let c = &self.conns[tok as usize];
                (c.role, c.idx, c.wbuf.is_empty())
            };
            if role == Role::Pub && empty {
                self.make_runnable(idx);
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(tok, ev.is_read_closed() || ev.is_error());
        }
    }

    fn live(&self, tok: u32) -> bool {
        !matches!(self.conns[tok as usize].st, St::Idle | St::Closed)
    }

    fn read(&mut self, tok: u32, closed_hint: bool) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        {
            let c = &mut self.conns[tok as usize];
            if !c.rbuf.is_empty() {
                buf.extend_from_slice(&c.rbuf);
                c.rbuf = Vec::new();
            }
        }
        self.obuf.clear();
        let mut eof = false;
        let mut err = None;
        let mut again = false;
        let mut reads = 0;
        loop {
            let res = {
                let c = &mut self.conns[tok as usize];
                let Some(s) = c.stream.as_mut() else { break };
                s.read(&mut self.chunk)
            };
            match res {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(k) => {
                    buf.extend_from_slice(&self.chunk[..k]);
                    let now = mono_us();
                    self.decode_all(tok, &mut buf, now);
                    if !self.live(tok) {
                        break;
                    }
                    reads += 1;
                    // A short read drained the socket: new data raises a new edge.
                    if k < READ_CHUNK && !closed_hint {
                        break;
                    }
                    if reads >= READS_PER_TURN {
                        again = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        if self.live(tok) {
            if !self.obuf.is_empty() && self.conns[tok as usize].st != St::AwaitClose {
                let out = std::mem::take(&mut self.obuf);
                self.send(tok, &out);
                self.obuf = out;
            }
            self.obuf.clear();
        }
        if self.live(tok) {
            if !buf.is_empty() {
                self.conns[tok as usize].rbuf = buf.to_vec();
            }
            if let Some(e) = err {
                self.on_close(tok, Some(&e));
            } else if eof {
                self.on_close(tok, None);
            } else if again && !self.conns[tok as usize].read_queued {
                self.conns[tok as usize].read_queued = true;
                self.read_again.push(tok);
            }
        }
        buf.clear();
        self.scratch = buf;
    }

    fn decode_all(&mut self, tok: u32, buf: &mut BytesMut, now: u64) {
        if self.conns[tok as usize].st == St::AwaitConnack {
            // A broker without 5.0 refuses a level-5 CONNECT in 3.1.1 form.
            if let Some(code) = protocol::v3_refusal(self.v, buf) {
                buf.clear();
                self.broken(tok, &format!("connack_{code}"));
                return;
            }
        }
        while self.live(tok) {
            match codec::decode(buf, self.v, MAX_PACKET) {
                Ok(Some(p)) => self.on_packet(tok, p, now),
                Ok(None) => break,
                Err(_) => {
                    buf.clear();
                    self.broken(tok, "protocol_error");
                    break;
                }
            }
        }
    }

    fn ack(&mut self, p: Packet) {
        p.encode(self.v, &mut self.obuf);
    }

    fn on_packet(&mut self, tok: u32, p: Packet, now: u64) {
        let (role, st, idx) = {
            let c = &self.conns[tok as usize];
            (c.role, c.st, c.idx)
        };
        let qos = self.cfg.qos;
        match (role, st, p) {
            (_, St::AwaitConnack, Packet::ConnAck(a)) => {
                if a.code != 0 {
                    self.broken(tok, &format!("connack_{}", a.code));
                    return;
                }
                self.connected += 1;
                let t_sent = self.conns[tok as usize].t_sent;
                self.h_connack
                    .saturating_record(now.saturating_sub(t_sent).max(1));
                match role {
                    Role::Sub => {
                        let Ok(filter) = TopicFilter::new(self.filter(idx)) else {
                            self.broken(tok, "bad_filter");
                            return;
                        };
                        let sub = Packet::Subscribe(Subscribe {
                            packet_id: PacketId::new(1).expect("non-zero"),
                            filters: vec![(filter, SubscriptionOptions::qos(qos))],
                            properties: None,
                        });
                        let mut b = BytesMut::new();
                        sub.encode(self.v, &mut b);
                        let c = &mut self.conns[tok as usize];
                        c.st = St::AwaitSuback;
                        c.t_sent = now;
                        self.deadlines.push_back(Deadline {
                            tok,
                            kind: Wait::Suback,
                            at: now + self.cfg.timeout_us,
                        });
                        self.send(tok, &b);
                    }
                    Role::Pub => {
                        self.hs_inflight -= 1;
                        self.conns[tok as usize].st = St::Active;
                        self.pubs_connected += 1;
                        // 5.0: no more QoS 1/2 flows open than the broker's
                        // Receive Maximum (MQTT-3.3.4-7).
                        let mut w = self.cfg.window;
                        if let Some(rm) = a.properties.as_ref().and_then(|p| p.receive_maximum) {
                            if rm < w {
                                w = rm;
                                self.receive_maximum =
                                    Some(self.receive_maximum.map_or(rm, |m| m.min(rm)));
                            }
                        }
                        let ps = &mut self.pubs[idx as usize];
                        ps.active = true;
                        if qos != QoS::AtMostOnce {
                            ps.slots = vec![Slot::default(); usize::from(w)];
                            ps.free = (0..w).rev().collect();
                        }
                    }
                }
            }
            (Role::Sub, St::AwaitSuback, Packet::SubAck(a)) => {
                let t_sent = self.conns[tok as usize].t_sent;
                self.h_suback
                    .saturating_record(now.saturating_sub(t_sent).max(1));
                let want = qos as u8;
                match a.codes.as_slice() {
                    [c] if *c == want => {
                        self.hs_inflight -= 1;
                        self.conns[tok as usize].st = St::Active;
                        self.subs[idx as usize].active = true;
                        self.subs[idx as usize].subscribed = true;
                        self.subscribed += 1;
                    }
                    [c] if *c >= 0x80 => self.broken(tok, "suback_refused"),
                    [c] => self.broken(tok, &format!("suback_granted_qos_{c}")),
                    _ => self.broken(tok, "suback_malformed"),
                }
            }
            // A broker may send matching PUBLISHes before the SUBACK (§3.8.4).
            (Role::Sub, St::AwaitSuback | St::Active | St::AwaitClose, Packet::Publish(p)) => {
                self.on_delivery(idx, p, now);
            }
            (Role::Sub, St::Active | St::AwaitClose, Packet::PubRel(r))
                if qos == QoS::ExactlyOnce =>
            {
                if protocol::refused(r.reason) {
                    self.fail(&protocol::reason_failure("pubrel", r.reason));
                }
                let id = r.packet_id.get();
                let q = &mut self.subs[idx as usize].qos2;
                if let Some(i) = q.iter().position(|&x| x == id) {
                    q.swap_remove(i);
                    if q.is_empty() {
                        *q = Vec::new();
                    }
                    self.sub_qos2_pending -= 1;
                } else {
                    self.fail("unexpected_pubrel");
                }
                // PUBCOMP even for an id not known (MQTT-4.3.3-2 leaves none open).
                self.ack(Packet::PubComp(resp(id)));
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubAck(r))
                if qos == QoS::AtLeastOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 1, r.reason, now);
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubRec(r))
                if qos == QoS::ExactlyOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 1, r.reason, now);
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubComp(r))
                if qos == QoS::ExactlyOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 2, r.reason, now);
            }
            // 5.0: the broker says why before it closes.
            (_, _, Packet::Disconnect(d)) => {
                self.fail(&protocol::reason_failure("broker_disconnect", d.reason));
            }
            (_, _, Packet::PingResp) => self.pongs += 1,
            (_, St::AwaitConnack | St::AwaitSuback, _) => self.broken(tok, "unexpected_packet"),
            (_, _, p) => self.fail(&format!("unexpected_{}", p.name().to_lowercase())),
        }
    }

    /// PUBACK / PUBREC (`stage` 1) or PUBCOMP (`stage` 2) for `id` at
    /// publisher `idx`, with its 5.0 `reason` (0 in 3.1.1).
    fn pub_ack(&mut self, idx: u32, id: u16, stage: u8, reason: u8, now: u64) {
        let qos = self.cfg.qos;
        let slot = usize::from(id).wrapping_sub(1);
        let s = self.pubs[idx as usize].slots.get(slot).copied();
        let name = match (qos, stage) {
            (QoS::AtLeastOnce, _) => "puback",
            (_, 1) => "pubrec",
            _ => "pubcomp",
        };
        let Some(s) = s.filter(|s| s.st == stage) else {
            self.fail(&format!("unexpected_{name}"));
            return;
        };
        if stage == 1 {
            let ps = &mut self.pubs[idx as usize];
            // PUBACK (QoS 1) and PUBREC (QoS 2) come in the order of the
            // PUBLISHes (MQTT-4.6.0-2, MQTT-4.6.0-3).
            let late = u64::from(s.seq) + 1 < u64::from(ps.ack_hi);
            ps.ack_hi = ps.ack_hi.max(s.seq + 1);
            if late {
                self.fail(&format!("{name}_out_of_order"));
            }
        }
        let ps = &mut self.pubs[idx as usize];
        if protocol::refused(reason) {
            // 5.0: the broker refused the message. Its flow ends here (no
            // PUBREL after a refusing PUBREC, §4.3.3); not counted as acked.
            ps.slots[slot].st = 0;
            ps.free.push(slot as u16);
            self.pub_inflight -= 1;
            self.fail(&protocol::reason_failure(name, reason));
            self.make_runnable(idx);
            return;
        }
        if qos == QoS::ExactlyOnce && stage == 1 {
            ps.slots[slot].st = 2;
            self.ack(Packet::PubRel(resp(id)));
            return;
        }
        ps.slots[slot].st = 0;
        ps.free.push(slot as u16);
        self.pub_inflight -= 1;
        self.acked += 1;
        self.h_ack.saturating_record(now.saturating_sub(s.t).max(1));
        self.make_runnable(idx);
    }

    fn on_delivery(&mut self, sub: u32, p: Publish, now: u64) {
        self.delivered += 1;
        if let Some(n) = self.member_deliveries.get_mut(sub as usize) {
            *n += 1;
        }
        self.last_delivery = now;
        if now <= self.pub_end {
            self.in_window += 1;
        }
        if self.phase >= Phase::Publish {
            let sec = (now.saturating_sub(self.pub_start) / 1_000_000) as usize;
            if self.series.len() <= sec {
                self.series.resize(sec + 1, 0);
            }
            self.series[sec] += 1;
        }
        if p.qos != self.cfg.qos {
            self.fail("wrong_qos");
        }
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.ack(Packet::PubAck(resp(id.get()))),
            (QoS::ExactlyOnce, Some(id)) => {
                let id = id.get();
                let q = &mut self.subs[sub as usize].qos2;
                if q.contains(&id) {
                    // The broker reused an id before our PUBCOMP (or resent
                    // without a reconnect): the stream check below says
                    // whether the message itself was a duplicate.
                    self.fail("qos2_id_reused");
                } else {
                    q.push(id);
                    self.sub_qos2_pending += 1;
                }
                self.ack(Packet::PubRec(resp(id)));
            }
            _ => {}
        }
        let b = &p.payload[..];
        if b.len() < HEADER {
            self.fail("foreign_message");
            return;
        }
        let ts = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let from = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        let seq = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
        let Some(ps) = self.pubs.get(from as usize) else {
            self.fail("foreign_message");
            return;
        };
        if seq >= ps.seq || ts > now {
            self.fail("foreign_message");
            return;
        }
        let routed = ps.topic == p.topic.as_str()
            && match self.cfg.shape {
                Shape::Pairs => from == sub,
                Shape::FanIn => sub == 0,
                // Every publisher of --fan-out is on the one topic.
                Shape::FanOut => true,
            };
        if !routed {
            self.misrouted += 1;
            self.fail("misrouted");
            return;
        }
        self.h_e2e.saturating_record(now.saturating_sub(ts).max(1));
        if self.shared_fan_out {
            // Once to the group, whichever member; in order at each member.
            if self.group_seen[from as usize].see(seq) {
                self.unique += 1;
                let m = from as usize * self.cfg.subs as usize + sub as usize;
                if self.member_order[m].see(seq) {
                    self.out_of_order += 1;
                }
            } else {
                self.duplicates += 1;
            }
            return;
        }
        let stream = match self.cfg.shape {
            Shape::Pairs => sub as usize,
            Shape::FanIn => from as usize,
            Shape::FanOut => from as usize * self.cfg.subs as usize + sub as usize,
        };
        match self.streams[stream].see(seq) {
            Seen::New { late } => {
                self.unique += 1;
                if late {
                    self.out_of_order += 1;
                }
            }
            Seen::Dup => self.duplicates += 1,
            Seen::Untracked => self.untracked += 1,
        }
    }

    /// A protocol-level failure: counted, and the connection closed.
    fn broken(&mut self, tok: u32, cause: &str) {
        self.fail(cause);
        self.close(tok);
    }

    /// The peer closed (`err` None: EOF) or the socket failed.
    fn on_close(&mut self, tok: u32, err: Option<&io::Error>) {
        let (st, role) = {
            let c = &self.conns[tok as usize];
            (c.st, c.role)
        };
        match st {
            St::Idle | St::Closed => return,
            St::Connecting | St::AwaitConnack | St::AwaitSuback => {
                let cause = err.map(cause_of).unwrap_or_else(|| "closed".into());
                self.fail(&cause);
            }
            St::Active => self.fail(match role {
                Role::Sub => "closed_while_subscribed",
                Role::Pub => "closed_while_publishing",
            }),
            St::AwaitClose => self.disconnected += 1,
        }
        self.close(tok);
    }

    /// Drops the socket and everything that hangs on it.
    fn close(&mut self, tok: u32) {
        let (st, role, idx) = {
            let c = &mut self.conns[tok as usize];
            c.stream = None;
            c.rbuf = Vec::new();
            c.wbuf = Vec::new();
            let st = c.st;
            c.st = St::Closed;
            (st, c.role, c.idx)
        };
        match st {
            St::Connecting | St::AwaitConnack | St::AwaitSuback => self.hs_inflight -= 1,
            St::AwaitClose => self.awaiting_close -= 1,
            _ => {}
        }
        match role {
            Role::Pub => {
                let ps = &mut self.pubs[idx as usize];
                ps.active = false;
                let open = (ps.slots.len() - ps.free.len()) as u64;
                ps.slots = Vec::new();
                ps.free = Vec::new();
                self.pub_inflight -= open;
                if self.phase <= Phase::Drain {
                    self.unacked_closed += open;
                }
            }
            Role::Sub => {
                let s = &mut self.subs[idx as usize];
                s.active = false;
                self.sub_qos2_pending -= s.qos2.len() as u64;
                s.qos2 = Vec::new();
            }
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(d) = self.deadlines.front() {
            if d.at > now {
                break;
            }
            let d = self.deadlines.pop_front().expect("front exists");
            match (d.kind, self.conns[d.tok as usize].st) {
                (Wait::Handshake, St::Connecting) => self.broken(d.tok, "timeout_connect"),
                (Wait::Handshake, St::AwaitConnack) => self.broken(d.tok, "timeout_connack"),
                (Wait::Suback, St::AwaitSuback) => self.broken(d.tok, "timeout_suback"),
                (Wait::Close, St::AwaitClose) => self.broken(d.tok, "timeout_close"),
                _ => {}
            }
        }
    }

    fn can_send(&self, idx: u32) -> bool {
        let ps = &self.pubs[idx as usize];
        let c = &self.conns[(self.cfg.subs + idx) as usize];
        ps.active
            && c.st == St::Active
            && c.wbuf.is_empty()
            && (self.cfg.qos == QoS::AtMostOnce || !ps.free.is_empty())
    }

    /// Queues publisher `idx` for a turn (no --rate, while publishing).
    fn make_runnable(&mut self, idx: u32) {
        if self.phase != Phase::Publish || self.cfg.rate > 0.0 {
            return;
        }
        let tok = (self.cfg.subs + idx) as usize;
        if !self.conns[tok].queued && self.can_send(idx) {
            self.conns[tok].queued = true;
            self.runnable.push_back(idx);
        }
    }

    /// Writes up to `max` PUBLISHes of publisher `idx` in one write; returns
    /// how many.
    fn publish(&mut self, idx: u32, max: usize) -> usize {
        let qos = self.cfg.qos;
        let now = mono_us();
        let mut buf = std::mem::take(&mut self.pbuf);
        buf.clear();
        let ps = &mut self.pubs[idx as usize];
        let k = if qos == QoS::AtMostOnce {
            max
        } else {
            max.min(ps.free.len())
        };
        for _ in 0..k {
            let at = buf.len();
            buf.extend_from_slice(&ps.tmpl);
            let seq = ps.seq;
            ps.seq += 1;
            if qos != QoS::AtMostOnce {
                let slot = ps.free.pop().expect("a free slot");
                ps.slots[usize::from(slot)] = Slot { t: now, seq, st: 1 };
                let id = slot + 1;
                buf[at + ps.pid_off..at + ps.pid_off + 2].copy_from_slice(&id.to_be_bytes());
            }
            let h = at + ps.pay_off;
            buf[h..h + 8].copy_from_slice(&now.to_be_bytes());
            buf[h + 8..h + 12].copy_from_slice(&idx.to_be_bytes());
            buf[h + 12..h + 16].copy_from_slice(&seq.to_be_bytes());
        }
        let fanout = u64::from(ps.fanout);
        self.published += k as u64;
        self.expected += k as u64 * fanout;
        if qos != QoS::AtMostOnce {
            self.pub_inflight += k as u64;
        }
        let tok = self.cfg.subs + idx;
        self.send(tok, &buf);
        buf.clear();
        self.pbuf = buf;
        k
    }

    /// No --rate: every runnable publisher gets one turn.
    fn service_runnable(&mut self) {
        let batch = if self.cfg.qos == QoS::AtMostOnce {
            QOS0_BATCH
        } else {
            usize::from(self.cfg.window)
        };
        for _ in 0..self.runnable.len() {
            let Some(idx) = self.runnable.pop_front() else {
                break;
            };
            self.conns[(self.cfg.subs + idx) as usize].queued = false;
            if self.can_send(idx) {
                self.publish(idx, batch);
                self.make_runnable(idx);
            }
        }
    }

    /// --rate: the messages due since publishing began, round-robin over the
    /// publishers that can take one.
    fn rate_step(&mut self, now: u64) {
        let secs = now.saturating_sub(self.pub_start) as f64 / 1e6;
        let due = (secs * self.cfg.rate) as u64 + 1;
        let mut debt = due.saturating_sub(self.rate_sent);
        // When no publisher could send for a while, do not burst to catch up
        // by more than 10 ms worth: count the rest as behind.
        let cap = ((self.cfg.rate / 100.0) as u64).max(16);
        if debt > cap {
            self.rate_behind += debt - cap;
            self.rate_sent += debt - cap;
            debt = cap;
        }
        let n = self.cfg.pubs;
        let mut tries = 0;
        while debt > 0 && tries < n {
            let idx = self.rr;
            self.rr = (self.rr + 1) % n;
            if self.can_send(idx) {
                let per = (debt / u64::from(n)).clamp(1, QOS0_BATCH as u64) as usize;
                let k = self.publish(idx, per) as u64;
                debt -= k.min(debt);
                self.rate_sent += k;
                tries = 0;
            } else {
                tries += 1;
            }
        }
    }

    fn ping(&mut self, now: u64) {
        if self.cfg.keepalive == 0 || self.phase >= Phase::Disconnect {
            return;
        }
        let period = u64::from(self.cfg.keepalive) * 500_000;
        if self.next_ping == 0 {
            self.next_ping = now + period;
        }
        if now < self.next_ping {
            return;
        }
        self.next_ping = now + period;
        for tok in 0..self.conns.len() as u32 {
            if matches!(self.conns[tok as usize].st, St::Active | St::AwaitSuback) {
                self.pings += 1;
                self.send(tok, &PINGREQ);
            }
        }
    }

    fn ramp(&mut self, end: u32) {
        let mut budget = 4096;
        while self.next_start < end && self.hs_inflight < self.cfg.inflight && budget > 0 {
            budget -= 1;
            let tok = self.next_start;
            self.next_start += 1;
            self.start(tok);
        }
    }

    fn begin_publish(&mut self, now: u64) {
        self.setup_wall_s = now.saturating_sub(self.t0) as f64 / 1e6;
        self.setup_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.cpu0;
        self.samples.after_ramp = self.sample();
        let active_subs = self.subs.iter().filter(|s| s.active).count() as u32;
        for i in 0..self.cfg.pubs as usize {
            self.pubs[i].fanout = match self.cfg.shape {
                Shape::Pairs => u32::from(self.subs[i].active),
                Shape::FanIn => u32::from(self.subs[0].active),
                // A shared group is owed each message once, whatever its size.
                Shape::FanOut if self.shared_fan_out => u32::from(active_subs > 0),
                Shape::FanOut => active_subs,
            };
        }
        let any = active_subs > 0 && self.pubs.iter().any(|p| p.active);
        self.pub_start = mono_us();
        self.pub_end = if any {
            self.pub_start + self.cfg.duration_us
        } else {
            // Nobody to publish or nobody to deliver to: nothing to measure.
            self.pub_start
        };
        self.main_cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
        self.phase = Phase::Publish;
        for i in 0..self.cfg.pubs {
            self.make_runnable(i);
        }
    }

    fn end_window(&mut self, now: u64) {
        self.window_wall_s = now.saturating_sub(self.pub_start) as f64 / 1e6;
        self.window_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.main_cpu0;
        for idx in std::mem::take(&mut self.runnable) {
            self.conns[(self.cfg.subs + idx) as usize].queued = false;
        }
        self.phase = Phase::Drain;
        self.drain_start = now;
        self.drain_deadline = now + self.cfg.timeout_us;
    }

    fn drain_done(&self, now: u64) -> bool {
        if self.pub_inflight > 0 || self.sub_qos2_pending > 0 {
            return false;
        }
        if self.unique >= self.expected {
            return true;
        }
        if self.cfg.qos != QoS::AtMostOnce {
            return false;
        }
        // QoS 0 may lose messages: done when the publishers have written
        // everything and nothing has arrived for a while.
        let quiet = self.cfg.timeout_us.min(1_000_000);
        let since = self.last_delivery.max(self.drain_start);
        now.saturating_sub(since) >= quiet
            && (0..self.cfg.pubs).all(|i| self.conns[(self.cfg.subs + i) as usize].wbuf.is_empty())
    }

    fn begin_disconnect(&mut self, now: u64) {
        self.drain_s = now.saturating_sub(self.drain_start) as f64 / 1e6;
        self.samples.end_main = self.sample();
        self.unacked = self.pub_inflight + self.unacked_closed;
        self.phase = Phase::Disconnect;
        for tok in 0..self.conns.len() as u32 {
            if self.conns[tok as usize].st == St::Active {
                self.conns[tok as usize].st = St::AwaitClose;
                self.awaiting_close += 1;
                self.deadlines.push_back(Deadline {
                    tok,
                    kind: Wait::Close,
                    at: now + self.cfg.timeout_us,
                });
                self.send(tok, &DISCONNECT);
            }
        }
    }

    fn progress(&mut self, now: u64) {
        if let Some(s) = self.sample() {
            self.peak_rss = self.peak_rss.max(s.rss_bytes);
        }
        if self.cfg.quiet {
            return;
        }
        let el = now.saturating_sub(self.t0) as f64 / 1e6;
        let name = match self.phase {
            Phase::Subscribe => "subscribe",
            Phase::Connect => "connect",
            Phase::Publish => "publish",
            Phase::Drain => "drain",
            Phase::Disconnect | Phase::Done => "disconnect",
        };
        if self.phase < Phase::Publish {
            eprintln!(
                "[{el:6.1}s] {name:<10} connected {}/{}  subscribed {}/{}  errors {}",
                self.connected,
                self.cfg.pubs + self.cfg.subs,
                self.subscribed,
                self.cfg.subs,
                self.failed
            );
        } else {
            eprintln!(
                "[{el:6.1}s] {name:<10} published {} ({}/s)  delivered {} ({}/s)  e2e p99 {}  errors {}",
                self.published,
                self.published - self.last_published,
                self.delivered,
                self.delivered - self.last_delivered,
                report::fmt_us(self.h_e2e.value_at_quantile(0.99)),
                self.failed
            );
        }
        self.last_published = self.published;
        self.last_delivered = self.delivered;
    }

    fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(4096);
        self.t0 = mono_us();
        self.last_tick = self.t0;
        self.cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
        self.samples.before = self.sample();
        self.peak_rss = self.samples.before.map(|s| s.rss_bytes).unwrap_or(0);
        let (subs, total) = (self.cfg.subs, self.cfg.subs + self.cfg.pubs);
        loop {
            let timeout_ms = if !self.runnable.is_empty() || !self.read_again.is_empty() {
                0
            } else if self.phase == Phase::Publish && self.cfg.rate > 0.0 {
                1
            } else {
                10
            };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout_ms)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            for ev in events.iter() {
                self.on_event(ev.token().0 as u32, ev);
            }
            for tok in std::mem::take(&mut self.read_again) {
                self.conns[tok as usize].read_queued = false;
                if self.live(tok) {
                    self.read(tok, false);
                }
            }
            let now = mono_us();
            self.expire(now);
            self.ping(now);
            match self.phase {
                Phase::Subscribe => {
                    self.ramp(subs);
                    if self.next_start >= subs && self.hs_inflight == 0 {
                        self.phase = Phase::Connect;
                    }
                }
                Phase::Connect => {
                    self.ramp(total);
                    if self.next_start >= total && self.hs_inflight == 0 {
                        self.begin_publish(now);
                    }
                }
                Phase::Publish => {
                    if now >= self.pub_end {
                        self.end_window(now);
                    } else if self.cfg.rate > 0.0 {
                        self.rate_step(now);
                    } else {
                        self.service_runnable();
                    }
                }
                Phase::Drain => {
                    let done = self.drain_done(now);
                    if done || now >= self.drain_deadline {
                        self.drain_timed_out = !done;
                        self.begin_disconnect(now);
                    }
                }
                Phase::Disconnect => {
                    if self.awaiting_close == 0 {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => break,
            }
            if now.saturating_sub(self.last_tick) >= 1_000_000 {
                self.last_tick = now;
                self.progress(now);
            }
        }
        // Let the broker finish the closes it has been handed.
        if self.cfg.broker_pid.is_some() {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.samples.after = self.sample();
        Ok(())
    }

    /// --share-group: the groups and how the deliveries spread over their
    /// members (the subscribers whose SUBACK came).
    fn shared_report(&self, group: &str) -> SharedReport {
        let (groups, members) = match self.cfg.shape {
            Shape::Pairs => (self.cfg.n, 1),
            Shape::FanIn => (1, 1),
            Shape::FanOut => (1, self.cfg.subs),
        };
        let got = || {
            self.member_deliveries
                .iter()
                .zip(&self.subs)
                .filter(|(_, s)| s.subscribed)
                .map(|(&n, _)| n)
        };
        SharedReport {
            group: group.to_string(),
            groups,
            members_per_group: members,
            member_deliveries_min: got().min().unwrap_or(0),
            member_deliveries_max: got().max().unwrap_or(0),
            members_without_delivery: got().filter(|&n| n == 0).count() as u64,
        }
    }

    /// The run as a worker result (for the shared report), the pubsub
    /// figures, and the broker samples.
    fn finish(mut self) -> (WorkerResult, PubsubReport, BrokerSamples) {
        let qos = self.cfg.qos;
        let lost = self.expected.saturating_sub(self.unique);
        if qos != QoS::AtMostOnce {
            self.fail_n("lost", lost);
            self.fail_n("unacked", self.unacked);
        }
        if qos == QoS::ExactlyOnce {
            self.fail_n("qos2_duplicates", self.duplicates);
        }
        // MQTT-4.6.0-6: one publisher, one topic, one QoS: an ordered stream.
        self.fail_n("out_of_order", self.out_of_order);
        let window = self.window_wall_s;
        let per_s = |n: u64| {
            if window > 0.0 {
                (n as f64 / window).round()
            } else {
                0.0
            }
        };
        let ps = PubsubReport {
            shape: self.cfg.shape.name().to_string(),
            n: self.cfg.n,
            publishers: self.cfg.pubs,
            subscribers: self.cfg.subs,
            qos: qos as u8,
            payload_bytes: self.cfg.payload,
            window: u32::from(self.cfg.window),
            rate: (self.cfg.rate > 0.0).then_some(self.cfg.rate),
            subscribed: self.subscribed,
            publishers_connected: self.pubs_connected,
            published: self.published,
            acked: self.acked,
            unacked: self.unacked,
            delivered: self.delivered,
            unique: self.unique,
            expected: self.expected,
            lost,
            lost_pct: if self.expected > 0 {
                (lost as f64 * 1e5 / self.expected as f64).round() / 1e3
            } else {
                0.0
            },
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            streams: if self.shared_fan_out {
                self.member_order.len()
            } else {
                self.streams.len()
            } as u64,
            streams_out_of_order: if self.shared_fan_out {
                self.member_order.iter().filter(|m| m.any_late).count()
            } else {
                self.streams.iter().filter(|s| s.any_late).count()
            } as u64,
            misrouted: self.misrouted,
            untracked: self.untracked,
            exactly_once_violated: qos == QoS::ExactlyOnce && self.duplicates > 0,
            setup_s: (self.setup_wall_s * 1000.0).round() / 1000.0,
            publish_s: (window * 1000.0).round() / 1000.0,
            drain_s: (self.drain_s * 1000.0).round() / 1000.0,
            drain_timed_out: self.drain_timed_out,
            publishes_per_s: per_s(self.published),
            deliveries_in_window: self.in_window,
            deliveries_per_s: per_s(self.in_window),
            rate_behind: self.rate_behind,
            receive_maximum: self.receive_maximum,
            shared: self.cfg.group.as_ref().map(|g| self.shared_report(g)),
        };
        let mut hists = BTreeMap::new();
        let ack_name = if qos == QoS::ExactlyOnce {
            "pubcomp"
        } else {
            "puback"
        };
        for (name, h) in [
            ("e2e", &self.h_e2e),
            ("connack", &self.h_connack),
            ("suback", &self.h_suback),
            (ack_name, &self.h_ack),
            ("tcp_connect", &self.h_tcp),
        ] {
            if !h.is_empty() {
                hists.insert(name.to_string(), hist_to_b64(h));
            }
        }
        let wr = WorkerResult {
            index: 0,
            attempted: self.attempted,
            connected: self.connected,
            disconnected: self.disconnected,
            pings: self.pings,
            pongs: self.pongs,
            failures: std::mem::take(&mut self.failures),
            hists,
            series: std::mem::take(&mut self.series),
            ramp_wall_s: self.setup_wall_s,
            ramp_cpu_s: self.setup_cpu_s,
            main_wall_s: window,
            main_cpu_s: self.window_cpu_s,
            cpu_s: rusage_cpu_s(libc::RUSAGE_SELF),
            max_rss_kb: self_max_rss_kb(),
            ..Default::default()
        };
        let mut samples = std::mem::take(&mut self.samples);
        samples.peak_rss = [
            samples.before,
            samples.after_ramp,
            samples.end_main,
            samples.after,
        ]
        .iter()
        .flatten()
        .map(|s| s.rss_bytes)
        .fold(self.peak_rss, u64::max);
        (wr, ps, samples)
    }
}

fn resp(id: u16) -> PubResp {
    PubResp {
        packet_id: PacketId::new(id).expect("packet ids are never 0"),
        reason: 0,
        properties: None,
    }
}

/// A PUBLISH on `topic` encoded by the codec in `v`, with packet id 1 (at
/// QoS 1 and 2) and a zero payload; returns it with the offsets of the packet
/// id and of the payload, which [`Run::publish`] patches per message. In 5.0
/// a Property Length byte (0) sits between the two.
fn publish_template(
    topic: &str,
    qos: QoS,
    payload: usize,
    v: ProtocolVersion,
) -> Result<(Vec<u8>, usize, usize)> {
    let topic_len = topic.len();
    let topic =
        TopicName::new(topic.to_string()).map_err(|e| anyhow::anyhow!("topic {topic}: {e:?}"))?;
    let p = Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("non-zero")),
        payload: Bytes::from(vec![0u8; payload]),
        properties: None,
    });
    let mut b = BytesMut::new();
    p.encode(v, &mut b);
    let pay_off = b.len() - payload;
    // Fixed header: the type byte, then the Remaining Length varint.
    let fixed = 1
        + b[1..]
            .iter()
            .position(|&x| x & 0x80 == 0)
            .expect("a whole Remaining Length")
        + 1;
    let pid_off = if qos == QoS::AtMostOnce {
        0
    } else {
        fixed + 2 + topic_len
    };
    Ok((b.to_vec(), pid_off, pay_off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_template_decodes_to_the_message() {
        use ProtocolVersion::{V3_1_1, V5};
        for (v, qos) in [V3_1_1, V5]
            .into_iter()
            .flat_map(|v| [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].map(|q| (v, q)))
        {
            let (mut t, pid_off, pay_off) = publish_template("lg/p2p/7", qos, 100, v).unwrap();
            // 5.0: Property Length 0 between the packet id (or topic) and the payload.
            let props = usize::from(v == V5);
            if qos != QoS::AtMostOnce {
                assert_eq!(pid_off + 2 + props, pay_off, "{v:?} {qos:?}");
            }
            if v == V5 {
                assert_eq!(t[pay_off - 1], 0, "{v:?} {qos:?}");
            }
            if qos != QoS::AtMostOnce {
                t[pid_off..pid_off + 2].copy_from_slice(&513u16.to_be_bytes());
            }
            t[pay_off..pay_off + 8].copy_from_slice(&123_456u64.to_be_bytes());
            t[pay_off + 8..pay_off + 12].copy_from_slice(&7u32.to_be_bytes());
            t[pay_off + 12..pay_off + 16].copy_from_slice(&42u32.to_be_bytes());
            let mut b = BytesMut::from(&t[..]);
            let Ok(Some(Packet::Publish(p))) = codec::decode(&mut b, v, MAX_PACKET) else {
                panic!("not a PUBLISH");
            };
            assert!(b.is_empty());
            assert_eq!(p.qos, qos);
            assert_eq!(p.topic.as_str(), "lg/p2p/7");
            assert_eq!(p.payload.len(), 100);
            assert_eq!(
                p.packet_id.map(|i| i.get()),
                (qos != QoS::AtMostOnce).then_some(513)
            );
            assert_eq!(&p.payload[0..8], &123_456u64.to_be_bytes());
            assert_eq!(&p.payload[8..12], &7u32.to_be_bytes());
            assert_eq!(&p.payload[12..16], &42u32.to_be_bytes());
        }
    }

    #[test]
    fn stream_tells_new_duplicate_and_late() {
        let mut s = Stream::default();
        assert_eq!(s.see(0), Seen::New { late: false });
        assert_eq!(s.see(1), Seen::New { late: false });
        assert_eq!(s.see(1), Seen::Dup);
        assert_eq!(s.see(0), Seen::Dup);
        assert_eq!(s.see(3), Seen::New { late: false });
        assert_eq!(s.see(3), Seen::Dup);
        assert_eq!(s.see(2), Seen::New { late: true });
        assert_eq!(s.next, 4);
        assert!(s.above.is_empty());
        assert!(s.any_late);
    }

    #[test]
    fn group_seen_tells_new_from_duplicate_however_far_apart() {
        let mut g = GroupSeen::default();
        assert!(g.see(5000));
        assert!(g.see(0));
        assert!(!g.see(5000));
        assert!(g.see(63));
        assert!(g.see(64));
        assert!(!g.see(0));
        assert!(!g.see(64));
        assert!(g.see(4999));
        assert!(g.see(1 << 20));
        assert!(!g.see(1 << 20));
        // One bit per sequence number, in whole powers of two of words.
        assert_eq!(g.bits.len(), ((1 << 20) / 64 + 1usize).next_power_of_two());
    }

    #[test]
    fn member_order_flags_only_a_later_arrival_below_the_highest() {
        let mut m = MemberOrder::default();
        // Gaps are other members' shares, not disorder.
        assert!(!m.see(3));
        assert!(!m.see(7));
        assert!(!m.any_late);
        assert!(m.see(5));
        assert!(m.any_late);
        assert!(!m.see(8));
    }

    #[test]
    fn stream_gives_up_a_gap_and_stays_small() {
        let mut s = Stream::default();
        assert_eq!(s.see(0), Seen::New { late: false });
        // 1 is lost: everything after it waits above the gap, up to a point.
        for seq in 2..2 + STREAM_TRACK as u32 + 10 {
            assert_eq!(s.see(seq), Seen::New { late: false });
        }
        assert!(s.forced);
        assert!(s.above.len() <= STREAM_TRACK);
        assert_eq!(s.next, 2 + STREAM_TRACK as u32 + 10);
        assert_eq!(s.see(1), Seen::Untracked);
        assert_eq!(s.see(5), Seen::Untracked);
    }
}

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
//! Per connection: a small [`run::Conn`] (socket, state, two timestamps,
//! buffers that exist only while a packet is partly read or written). Per
//! publisher: its PUBLISH encoded once (by `coremq::proto::codec`), patched
//! per message, and `--window` slots for QoS 1/2 flows, whose packet id is
//! one more than the slot number, so an id is never reused while its flow is
//! open. Per stream: the lowest sequence number not yet seen and the few seen
//! above it. No timer per message: timeouts are one FIFO (they all have the
//! same length), the rate is a count of messages due since the start.
//!
//! This module owns the command line ([`PubsubArgs`]), its checks, the
//! resolved configuration the run works from, and the entry point
//! [`pubsub`]. The rest, one job a file:
//! - `run`: per-connection state and the event loop (connect, subscribe,
//!   publish and pace, acknowledgements, pings, timeouts, drain, disconnect);
//! - `accounting`: what each delivery counts as (new, duplicate, late,
//!   untracked, misrouted), per stream or, for a shared group, per group;
//! - `report`: the run's figures as the shared report, printed and written
//!   as JSON (and SVG).

use std::net::SocketAddrV4;

use anyhow::Result;
use clap::{ArgGroup, Args};
use coremq::proto::codec::QoS;

use crate::protocol::Protocol;
use crate::{usage_error, Common};

use run::Run;

mod accounting;
mod report;
mod run;

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
/// --persistent with --protocol 5: the subscribers' Session Expiry Interval (s).
pub const PERSISTENT_EXPIRY: u32 = 3600;

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
    /// Subscribers keep a persistent session: cleanSession=0 (3.1.1), or
    /// Clean Start 0 with a Session Expiry Interval of PERSISTENT_EXPIRY
    /// seconds (5.0). The sessions outlive the run: give each run its own
    /// --prefix. Publishers stay clean.
    #[arg(long)]
    pub persistent: bool,
    /// Each subscriber acknowledges at most this many messages a second (its
    /// PUBACK/PUBREC waits until due, and the broker's inflight window then
    /// holds further deliveries back): a consumer slower than its
    /// publishers, to see what a broker does when session queues fill.
    /// Unpaced publishers then outrun it; `lost` counts what a broker
    /// acknowledged and never delivered.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub slow_subscribers: Option<f64>,
    /// Subscribers connect to this broker (IPv4 HOST:PORT) instead of
    /// --broker, with the same transport (--tls-ca, --ws); publishers still
    /// connect to --broker. Another node of a cluster: cross-node delivery.
    #[arg(long, value_name = "HOST:PORT")]
    pub sub_broker: Option<String>,
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
    /// --broker: where the publishers (and, without --sub-broker, the
    /// subscribers) connect.
    broker: SocketAddrV4,
    /// --sub-broker: where the subscribers connect instead.
    sub_broker: Option<SocketAddrV4>,
    source_ips: u32,
    source_skip: u32,
    timeout_us: u64,
    quiet: bool,
    /// --broker-pid, each one given: samples are their sum.
    broker_pids: Vec<u32>,
    protocol: Protocol,
    /// --share-group: the share name of every subscription.
    group: Option<String>,
    /// --persistent: subscribers keep their session.
    persistent: bool,
    /// --slow-subscribers: acknowledgements per second per subscriber; 0:
    /// at once.
    sub_rate: f64,
    /// --tls-ca and --tls-server-name: every connection over TLS.
    tls: Option<(std::path::PathBuf, String)>,
    /// --ws PATH: every connection over WebSocket.
    ws_path: Option<String>,
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
    crate::coord::check_rate("--slow-subscribers", a.slow_subscribers);
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
    let sub_broker = a
        .sub_broker
        .as_deref()
        .map(|s| crate::resolve_v4_flag("--sub-broker", s).unwrap_or_else(|e| usage_error(e)));
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
        sub_broker,
        source_ips,
        source_skip: a.common.source_skip,
        timeout_us: (a.common.timeout * 1e6) as u64,
        quiet: a.common.quiet,
        broker_pids: a.common.broker_pid.clone(),
        protocol: a.common.protocol,
        group: a.share_group.clone(),
        persistent: a.persistent,
        sub_rate: a.slow_subscribers.unwrap_or(0.0),
        tls: a
            .common
            .tls_ca
            .clone()
            .map(|ca| (ca, a.common.tls_server_name.clone())),
        ws_path: a.common.ws.clone(),
    };
    let params = serde_json::json!({
        "shape": shape.name(), "n": n, "qos": a.qos, "payload": a.payload,
        "duration": a.duration, "rate": a.rate, "window": a.window, "inflight": a.inflight,
        "keepalive": a.keepalive, "prefix": a.prefix, "timeout": a.common.timeout,
        "publishers": pubs, "share_group": a.share_group, "persistent": a.persistent,
        "slow_subscribers": a.slow_subscribers, "tls": a.common.tls_ca.is_some(),
        "ws": a.common.ws, "sub_broker": a.sub_broker,
    });
    let t0 = std::time::Instant::now();
    let mut run = Run::new(cfg)?;
    run.run()?;
    report::write(&a, run, params, started_unix, t0, source_ips)
}

//! Process-wide counters, shared by every shard and logged as one summary
//! line at a fixed interval.
//!
//! Relaxed atomics: each is an independent tally, read only for reporting, so
//! no ordering between them is needed and an increment costs one locked add.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How many of the deepest session queues the metrics endpoint and `$SYS`
/// report.
pub const DEEPEST_QUEUES: usize = 10;

/// The broker's counters. One instance per process, behind an `Arc`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections that completed CONNECT with return code 0 and are open now.
    pub connections_current: AtomicU64,
    /// Connections accepted with return code 0 since start.
    pub connections_total: AtomicU64,
    /// Sockets open now, including those still in the CONNECT handshake.
    pub sockets_current: AtomicU64,
    /// Sessions held now: connected, and persistent ones whose client is
    /// away.
    pub sessions_current: AtomicU64,
    /// Retained topics held now (all shards).
    pub retained_current: AtomicU64,
    /// CONNACKs sent, by 3.x return code 0..=5.
    pub connacks: [AtomicU64; 6],
    /// Connections closed because a new CONNECT took over their clientId.
    pub takeovers: AtomicU64,
    /// Wills published.
    pub wills_published: AtomicU64,
    /// Connections closed for keep-alive expiry.
    pub keepalive_expiries: AtomicU64,
    /// Sockets closed for not completing CONNECT within the connect timeout.
    pub connect_timeouts: AtomicU64,
    /// Connections closed for a malformed packet or a protocol violation.
    pub malformed_packets: AtomicU64,
    /// Connections refused before CONNECT was read (accept failing with
    /// EMFILE/ENFILE, or the process at its socket ceiling).
    pub accept_refused: AtomicU64,
    /// Subscriptions held now (a filter of a session counts once).
    pub subscriptions_current: AtomicU64,
    /// Most client connections open at once since start.
    pub connections_maximum: AtomicU64,
    /// MQTT packets received from and sent to clients (all types).
    pub packets_received: AtomicU64,
    /// See `packets_received`.
    pub packets_sent: AtomicU64,
    /// Bytes read from and written to client sockets.
    pub bytes_received: AtomicU64,
    /// See `bytes_received`.
    pub bytes_sent: AtomicU64,
    /// PUBLISH packets received from clients.
    pub publishes_received: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub publishes_sent: AtomicU64,
    /// Messages dropped: QoS 0 for an offline or stuck client, QoS 1/2 for
    /// a full session queue (whichever `--queue-full` outcome dropped it).
    pub messages_dropped: AtomicU64,
    /// `--queue-full backpressure`: QoS 1/2 messages that met a full queue
    /// of a connected client and waited for room, their publisher held.
    pub queue_full_held: AtomicU64,
    /// Of those, dropped because the client took nothing from its queue
    /// for `--queue-full-timeout`.
    pub queue_full_timeouts: AtomicU64,
    /// Messages dropped as the newest for a full queue: `drop-newest`, an
    /// offline session's full queue, or a waiting message whose client went
    /// away.
    pub queue_full_dropped_newest: AtomicU64,
    /// Queued messages dropped as the oldest to make room (`drop-oldest`).
    pub queue_full_dropped_oldest: AtomicU64,
    /// PUBACKs and PUBRECs sent to 5.0 publishers with 0x97 (Quota
    /// exceeded): their message was not queued for every subscriber.
    pub quota_exceeded_acks: AtomicU64,
    /// SUBSCRIBE filters refused (SUBACK 0x80), PUBLISHes and wills dropped,
    /// because the ACL does not allow them.
    pub acl_denied: AtomicU64,
    /// Messages not delivered because their Message Expiry Interval passed
    /// while they waited (MQTT 5, MQTT-3.3.2-5).
    pub messages_expired: AtomicU64,
    /// Messages and other packets not sent to a client because they exceed
    /// the Maximum Packet Size it set (MQTT 5, MQTT-3.1.2-25).
    pub oversize_dropped: AtomicU64,
    /// Sessions discarded when their Session Expiry Interval ran out.
    pub sessions_expired: AtomicU64,
    /// Times a client's socket stopped being read because the replies owed to
    /// it (over 1 MiB) were not being read by it.
    pub reads_paused: AtomicU64,
    /// io_uring: reads that found the shard's provided-buffer ring empty
    /// (ENOBUFS); the bytes waited in the socket and the read was re-armed
    /// once the turn's buffers were back, and the ring doubled (up to
    /// `--ring-buffers`).
    pub ring_empty: AtomicU64,
    /// io_uring: completions the kernel dropped because the completion
    /// queue and its overflow list were full (should stay 0; logged).
    pub cq_dropped: AtomicU64,
    /// io_uring: 4 KiB buffers in use in the shards' provided-buffer rings
    /// now; each ring starts small, doubles when a turn's reads empty it,
    /// up to `--ring-buffers`, and shrinks back once no turn for 5 s took
    /// more than a quarter of it (its resident memory is these × 4 KiB,
    /// plus a shrink's leftovers until the ring has cycled past them).
    pub ring_buffers: AtomicU64,
    /// `--data-dir`: log commits (one write, and one fdatasync unless
    /// `--fsync never`; each carries the records gathered since the last).
    pub log_commits: AtomicU64,
    /// `--data-dir`: bytes of records appended to the shards' logs.
    pub log_bytes: AtomicU64,
    /// `--data-dir`: snapshots written (each replaces a shard's log).
    pub log_snapshots: AtomicU64,
    /// `--data-dir`: logs whose torn or corrupt tail was cut off at start.
    pub log_tails_dropped: AtomicU64,
    /// TLS handshakes completed, full or resumed.
    pub tls_handshakes: AtomicU64,
    /// Of `tls_handshakes`, those that resumed a session (a ticket or a
    /// session id): no certificate sent, no key exchange signed.
    pub tls_resumed: AtomicU64,
    /// TLS handshakes that failed (a certificate refused, not TLS at all).
    pub tls_handshake_failures: AtomicU64,
    /// WebSocket upgrades accepted.
    pub ws_upgrades: AtomicU64,
    /// WebSocket upgrade requests refused with an HTTP error.
    pub ws_upgrade_failures: AtomicU64,
    /// PUBLISH packets received from clients, by QoS 0..=2.
    pub publishes_received_by_qos: [AtomicU64; 3],
    /// PUBLISH packets sent to clients, by QoS 0..=2.
    pub publishes_sent_by_qos: [AtomicU64; 3],
    /// QoS 1/2 messages waiting in session queues now (for offline
    /// clients, or behind a full inflight window).
    pub messages_queued: AtomicU64,
    /// Client connections open now on each shard (updated every tick), so
    /// an imbalance shows; empty until [`Counters::for_shards`].
    pub shard_connections: Vec<AtomicU64>,
    /// Each shard's deepest session queues (clientId, messages queued and
    /// waiting), deepest first, updated every second: the slow consumers.
    pub deepest_queues: Vec<Mutex<Vec<(String, u64)>>>,
    /// Time from a socket's accept to its CONNECT being accepted (CONNACK
    /// queued): TLS handshake, hand-off to the owner shard and takeover
    /// included.
    pub connack_latency: Histogram,
    /// `--cluster`: what the cluster link does (`None` on a lone node).
    pub cluster: Option<ClusterCounters>,
}

/// `--cluster`: the node, its peers, and the traffic between them.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// This node's name.
    pub node: String,
    /// The peer nodes heard from, by name (the link updates it each second).
    pub peers: Mutex<Vec<String>>,
    /// 1 while the session registry answers (CONNECTs are accepted).
    pub registry_up: AtomicU64,
    /// Publishes sent to other nodes (one per node).
    pub publishes_sent: AtomicU64,
    /// Publishes received from other nodes.
    pub publishes_received: AtomicU64,
    /// CONNECTs whose clientId this node was known to hold: answered from
    /// memory, no cluster-wide read or write.
    pub claims_remembered: AtomicU64,
    /// CONNECTs that went to the session registry.
    pub claims_registry: AtomicU64,
    /// CONNECTs refused (CONNACK 3 / 0x88) without a working registry.
    pub claims_refused: AtomicU64,
    /// Clients taken over from other nodes (their session moved here when
    /// they had one).
    pub takeovers_in: AtomicU64,
    /// Clients other nodes took over from this one.
    pub takeovers_out: AtomicU64,
    /// Wills of clients of dead nodes published by this node.
    pub lost_wills_published: AtomicU64,
}

/// Upper bounds of [`Histogram`] buckets, in microseconds (the exposition
/// gives them in seconds).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A fixed-bucket latency histogram of relaxed atomics: recording is two
/// adds and a short scan, reading it needs no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or under each bound of [`LATENCY_BUCKETS_US`]
    /// (not cumulative; the exposition sums them).
    buckets: [AtomicU64; 14],
    /// All observations, the +Inf bucket.
    count: AtomicU64,
    /// Their sum, microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe_us(&self, us: u64) {
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&b| us <= b) {
            bump(&self.buckets[i]);
        }
        bump(&self.count);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        get(&self.count)
    }
}

/// Adds one to a counter.
#[inline]
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
#[inline]
pub fn drop_one(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

/// Reads a counter.
#[inline]
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Counters {
    /// Counters with one per-shard gauge slot for each of `shards`.
    pub fn for_shards(shards: usize) -> Counters {
        Counters {
            shard_connections: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            deepest_queues: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            ..Counters::default()
        }
    }

    /// The deepest session queues of all shards, deepest first, at most
    /// [`DEEPEST_QUEUES`]: (clientId, depth, shard).
    pub fn deepest_queues(&self) -> Vec<(String, u64, usize)> {
        let mut all = Vec::new();
        for (shard, m) in self.deepest_queues.iter().enumerate() {
            let list = m.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(list.iter().map(|(id, depth)| (id.clone(), *depth, shard)));
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(DEEPEST_QUEUES);
        all
    }

    /// The `$SYS/broker/...` topics and their values, mosquitto's names
    /// (what dashboards and monitoring scripts written for it read).
    pub fn sys_topics(&self, uptime_secs: u64) -> Vec<(&'static str, String)> {
        let connected = get(&self.connections_current);
        let sessions = get(&self.sessions_current);
        let mut topics = vec![
            (
                "$SYS/broker/version",
                format!("coremq {}", env!("CARGO_PKG_VERSION")),
            ),
            ("$SYS/broker/uptime", format!("{uptime_secs} seconds")),
            ("$SYS/broker/clients/connected", connected.to_string()),
            ("$SYS/broker/clients/active", connected.to_string()),
            (
                "$SYS/broker/clients/disconnected",
                sessions.saturating_sub(connected).to_string(),
            ),
            (
                "$SYS/broker/clients/inactive",
                sessions.saturating_sub(connected).to_string(),
            ),
            ("$SYS/broker/clients/total", sessions.to_string()),
            (
                "$SYS/broker/clients/maximum",
                get(&self.connections_maximum).to_string(),
            ),
            (
                "$SYS/broker/messages/received",
                get(&self.packets_received).to_string(),
            ),
            (
                "$SYS/broker/messages/sent",
                get(&self.packets_sent).to_string(),
            ),
            (
                "$SYS/broker/publish/messages/received",
                get(&self.publishes_received).to_string(),
            ),
            (
                "$SYS/broker/publish/messages/sent",
                get(&self.publishes_sent).to_string(),
            ),
            (
                "$SYS/broker/publish/messages/dropped",
                get(&self.messages_dropped).to_string(),
            ),
            (
                "$SYS/broker/bytes/received",
                get(&self.bytes_received).to_string(),
            ),
            ("$SYS/broker/bytes/sent", get(&self.bytes_sent).to_string()),
            (
                "$SYS/broker/subscriptions/count",
                get(&self.subscriptions_current).to_string(),
            ),
            (
                "$SYS/broker/retained messages/count",
                get(&self.retained_current).to_string(),
            ),
            // Not mosquitto's: the queues, and the slow consumers.
            (
                "$SYS/broker/messages/queued",
                get(&self.messages_queued).to_string(),
            ),
            (
                "$SYS/broker/queues/deepest",
                self.deepest_queues()
                    .iter()
                    .map(|(id, depth, _)| format!("{depth} {id}\n"))
                    .collect(),
            ),
        ];
        if let Some(c) = &self.cluster {
            topics.extend([
                ("$SYS/broker/cluster/node", c.node.clone()),
                (
                    "$SYS/broker/cluster/peers",
                    c.peers.lock().unwrap_or_else(|e| e.into_inner()).join("\n"),
                ),
                (
                    "$SYS/broker/cluster/messages/sent",
                    get(&c.publishes_sent).to_string(),
                ),
                (
                    "$SYS/broker/cluster/messages/received",
                    get(&c.publishes_received).to_string(),
                ),
            ]);
        }
        topics
    }
}

impl fmt::Display for Counters {
    /// The one summary line: `key=value` pairs, stable order, grep-friendly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections={} sockets={} sessions={} connections_total={} connack_0={} connack_1={} \
             connack_2={} connack_3={} connack_4={} connack_5={} takeovers={} wills={} \
             keepalive_expiries={} connect_timeouts={} malformed={} accept_refused={} \
             publishes_in={} publishes_out={} dropped={} acl_denied={} reads_paused={} \
             retained={} expired={} oversize_dropped={} sessions_expired={} ring_empty={} \
             ring_buffers={} cq_dropped={} log_commits={} log_bytes={} log_snapshots={} log_tails_dropped={} \
             tls_handshakes={} tls_resumed={} tls_handshake_failures={} ws_upgrades={} \
             ws_upgrade_failures={} queue_full_held={} queue_full_timeouts={} \
             queue_full_dropped_newest={} queue_full_dropped_oldest={} quota_exceeded_acks={}",
            get(&self.connections_current),
            get(&self.sockets_current),
            get(&self.sessions_current),
            get(&self.connections_total),
            get(&self.connacks[0]),
            get(&self.connacks[1]),
            get(&self.connacks[2]),
            get(&self.connacks[3]),
            get(&self.connacks[4]),
            get(&self.connacks[5]),
            get(&self.takeovers),
            get(&self.wills_published),
            get(&self.keepalive_expiries),
            get(&self.connect_timeouts),
            get(&self.malformed_packets),
            get(&self.accept_refused),
            get(&self.publishes_received),
            get(&self.publishes_sent),
            get(&self.messages_dropped),
            get(&self.acl_denied),
            get(&self.reads_paused),
            get(&self.retained_current),
            get(&self.messages_expired),
            get(&self.oversize_dropped),
            get(&self.sessions_expired),
            get(&self.ring_empty),
            get(&self.ring_buffers),
            get(&self.cq_dropped),
            get(&self.log_commits),
            get(&self.log_bytes),
            get(&self.log_snapshots),
            get(&self.log_tails_dropped),
            get(&self.tls_handshakes),
            get(&self.tls_resumed),
            get(&self.tls_handshake_failures),
            get(&self.ws_upgrades),
            get(&self.ws_upgrade_failures),
            get(&self.queue_full_held),
            get(&self.queue_full_timeouts),
            get(&self.queue_full_dropped_newest),
            get(&self.queue_full_dropped_oldest),
            get(&self.quota_exceeded_acks),
        )
    }
}

impl Counters {
    /// The labelled families [`Counters::prometheus`] writes after the plain
    /// samples: by QoS, by shard, and the CONNACK latency histogram.
    fn write_families(&self, out: &mut String) {
        use fmt::Write;
        for (name, help, by_qos) in [
            (
                "coremq_publishes_received_by_qos_total",
                "PUBLISH packets received from clients, by QoS.",
                &self.publishes_received_by_qos,
            ),
            (
                "coremq_publishes_sent_by_qos_total",
                "PUBLISH packets sent to clients, by QoS.",
                &self.publishes_sent_by_qos,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (qos, c) in by_qos.iter().enumerate() {
                let _ = writeln!(out, "{name}{{qos=\"{qos}\"}} {}", get(c));
            }
        }
        if !self.shard_connections.is_empty() {
            let name = "coremq_shard_connections";
            let _ = writeln!(
                out,
                "# HELP {name} Client connections open now on each shard (as of its last tick).\n# TYPE {name} gauge"
            );
            for (shard, c) in self.shard_connections.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", get(c));
            }
        }
        let name = "coremq_connack_latency_seconds";
        let h = &self.connack_latency;
        let _ = writeln!(
            out,
            "# HELP {name} From a socket's accept to its CONNECT accepted (CONNACK queued), TLS handshake and hand-off included.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, c) in LATENCY_BUCKETS_US.iter().zip(&h.buckets) {
            cumulative += get(c);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = get(&h.count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", get(&h.sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

impl Counters {
    /// What a full session queue did (`--queue-full`), by outcome, and the
    /// deepest queues now, by clientId.
    fn write_queue_families(&self, out: &mut String) {
        use fmt::Write;
        let name = "coremq_queue_full_total";
        let _ = writeln!(
            out,
            "# HELP {name} QoS 1/2 messages that met a full session queue, by outcome: held (waited for room, publisher held), timeout (dropped after --queue-full-timeout), dropped_newest, dropped_oldest.\n# TYPE {name} counter"
        );
        for (outcome, c) in [
            ("held", &self.queue_full_held),
            ("timeout", &self.queue_full_timeouts),
            ("dropped_newest", &self.queue_full_dropped_newest),
            ("dropped_oldest", &self.queue_full_dropped_oldest),
        ] {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", get(c));
        }
        let name = "coremq_session_queue_depth";
        let _ = writeln!(
            out,
            "# HELP {name} The deepest session queues now (messages queued and waiting for room), at most {DEEPEST_QUEUES}, updated every second.\n# TYPE {name} gauge"
        );
        for (id, depth, shard) in self.deepest_queues() {
            let _ = writeln!(
                out,
                "{name}{{client_id=\"{}\",shard=\"{shard}\"}} {depth}",
                escape_label(&id)
            );
        }
    }
}

/// A label value as the text format wants it: backslash, double quote and
/// newline escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One sample of the Prometheus exposition: name, type, help, labels and
/// value.
struct Sample {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    labels: Option<(&'static str, &'static str)>,
    value: u64,
}

impl Counters {
    /// The counters in the Prometheus text exposition format (version
    /// 0.0.4): what `GET /metrics` serves (see [`crate::http`]). Counters
    /// end in `_total`; gauges are what is held now. Reading them is one
    /// relaxed load each: a scrape costs the shards nothing.
    pub fn prometheus(&self, uptime_secs: u64) -> String {
        let counter = |name, help, c: &AtomicU64| Sample {
            name,
            kind: "counter",
            help,
            labels: None,
            value: get(c),
        };
        let gauge = |name, help, c: &AtomicU64| Sample {
            name,
            kind: "gauge",
            help,
            labels: None,
            value: get(c),
        };
        const CODES: [&str; 6] = ["0", "1", "2", "3", "4", "5"];
        let mut samples = vec![
            gauge(
                "coremq_connections",
                "Client connections open now (CONNECT accepted).",
                &self.connections_current,
            ),
            gauge(
                "coremq_connections_maximum",
                "Most client connections open at once since start.",
                &self.connections_maximum,
            ),
            gauge(
                "coremq_sockets",
                "Sockets open now, including those still before CONNECT.",
                &self.sockets_current,
            ),
            gauge(
                "coremq_sessions",
                "Sessions held now: connected, and persistent ones whose client is away.",
                &self.sessions_current,
            ),
            gauge(
                "coremq_subscriptions",
                "Subscriptions held now.",
                &self.subscriptions_current,
            ),
            gauge(
                "coremq_retained_messages",
                "Retained topics held now.",
                &self.retained_current,
            ),
            gauge(
                "coremq_ring_buffers",
                "io_uring: 4 KiB buffers in the shards' provided-buffer rings (each follows the largest burst of reads of the last 5 to 10 s, up to --ring-buffers).",
                &self.ring_buffers,
            ),
            gauge(
                "coremq_messages_queued",
                "QoS 1/2 messages waiting in session queues now (offline clients, full inflight windows).",
                &self.messages_queued,
            ),
            counter(
                "coremq_connects_total",
                "Connections accepted with CONNACK code 0 since start.",
                &self.connections_total,
            ),
        ];
        for (code, c) in CODES.iter().zip(&self.connacks) {
            samples.push(Sample {
                name: "coremq_connacks_total",
                kind: "counter",
                help: "CONNACKs sent, by MQTT 3.x return code (a 5.0 reason code counts under the nearest one).",
                labels: Some(("code", code)),
                value: get(c),
            });
        }
        samples.extend([
            counter(
                "coremq_takeovers_total",
                "Connections closed because a new CONNECT took over their clientId.",
                &self.takeovers,
            ),
            counter(
                "coremq_wills_published_total",
                "Will messages published.",
                &self.wills_published,
            ),
            counter(
                "coremq_keepalive_expiries_total",
                "Connections closed after 1.5 x keep-alive of silence.",
                &self.keepalive_expiries,
            ),
            counter(
                "coremq_connect_timeouts_total",
                "Sockets closed for not sending CONNECT in time.",
                &self.connect_timeouts,
            ),
            counter(
                "coremq_malformed_packets_total",
                "Connections closed for a malformed packet or a protocol violation.",
                &self.malformed_packets,
            ),
            counter(
                "coremq_accept_refused_total",
                "Connections refused before CONNECT (descriptor limit or socket ceiling).",
                &self.accept_refused,
            ),
            counter(
                "coremq_packets_received_total",
                "MQTT packets received from clients.",
                &self.packets_received,
            ),
            counter(
                "coremq_packets_sent_total",
                "MQTT packets sent to clients.",
                &self.packets_sent,
            ),
            counter(
                "coremq_bytes_received_total",
                "Bytes read from client sockets (added once per 100 ms tick).",
                &self.bytes_received,
            ),
            counter(
                "coremq_bytes_sent_total",
                "Bytes written to client sockets (added once per 100 ms tick).",
                &self.bytes_sent,
            ),
            counter(
                "coremq_publishes_received_total",
                "PUBLISH packets received from clients.",
                &self.publishes_received,
            ),
            counter(
                "coremq_publishes_sent_total",
                "PUBLISH packets sent to clients.",
                &self.publishes_sent,
            ),
            counter(
                "coremq_messages_dropped_total",
                "Messages not delivered: QoS 0 to a full or offline client, QoS 1/2 past a full session queue.",
                &self.messages_dropped,
            ),
            counter(
                "coremq_publishes_quota_exceeded_total",
                "PUBACKs/PUBRECs sent to MQTT 5 publishers with 0x97: the message was not queued for every subscriber.",
                &self.quota_exceeded_acks,
            ),
            counter(
                "coremq_messages_expired_total",
                "Messages not delivered because their Message Expiry Interval passed.",
                &self.messages_expired,
            ),
            counter(
                "coremq_oversize_dropped_total",
                "Packets not sent because they exceed the client's Maximum Packet Size.",
                &self.oversize_dropped,
            ),
            counter(
                "coremq_acl_denied_total",
                "Subscriptions, publishes and wills the ACL refused.",
                &self.acl_denied,
            ),
            counter(
                "coremq_sessions_expired_total",
                "Sessions discarded when their Session Expiry Interval ran out.",
                &self.sessions_expired,
            ),
            counter(
                "coremq_reads_paused_total",
                "Times a socket stopped being read because its client did not read its replies.",
                &self.reads_paused,
            ),
            counter(
                "coremq_ring_empty_total",
                "io_uring reads that found the provided-buffer ring empty (re-armed, nothing lost).",
                &self.ring_empty,
            ),
            counter(
                "coremq_cq_dropped_total",
                "io_uring completions the kernel dropped (should stay 0).",
                &self.cq_dropped,
            ),
            counter(
                "coremq_log_commits_total",
                "--data-dir log commits (a write, and an fdatasync unless --fsync never).",
                &self.log_commits,
            ),
            counter(
                "coremq_log_bytes_total",
                "--data-dir bytes of records appended to the logs.",
                &self.log_bytes,
            ),
            counter(
                "coremq_log_snapshots_total",
                "--data-dir snapshots written.",
                &self.log_snapshots,
            ),
            counter(
                "coremq_log_tails_dropped_total",
                "--data-dir logs whose torn or corrupt tail was cut off at start.",
                &self.log_tails_dropped,
            ),
            counter(
                "coremq_tls_handshakes_total",
                "TLS handshakes completed, full or resumed.",
                &self.tls_handshakes,
            ),
            counter(
                "coremq_tls_resumed_total",
                "TLS handshakes that resumed a session (ticket or session id).",
                &self.tls_resumed,
            ),
            counter(
                "coremq_tls_handshake_failures_total",
                "TLS handshakes that failed (certificate refused, not TLS).",
                &self.tls_handshake_failures,
            ),
            counter(
                "coremq_ws_upgrades_total",
                "WebSocket upgrades accepted.",
                &self.ws_upgrades,
            ),
            counter(
                "coremq_ws_upgrade_failures_total",
                "WebSocket upgrade requests refused with an HTTP error.",
                &self.ws_upgrade_failures,
            ),
        ]);
        samples.push(Sample {
            name: "coremq_uptime_seconds",
            kind: "gauge",
            help: "Seconds since the broker started.",
            labels: None,
            value: uptime_secs,
        });
        let mut out = String::with_capacity(8 * 1024);
        let mut last = "";
        for s in &samples {
            use fmt::Write;
            if s.name != last {
                let _ = writeln!(out, "# HELP {} {}", s.name, s.help);
                let _ = writeln!(out, "# TYPE {} {}", s.name, s.kind);
                last = s.name;
            }
            match s.labels {
                Some((k, v)) => {
                    let _ = writeln!(out, "{}{{{k}=\"{v}\"}} {}", s.name, s.value);
                }
                None => {
                    let _ = writeln!(out, "{} {}", s.name, s.value);
                }
            }
        }
        self.write_families(&mut out);
        self.write_queue_families(&mut out);
        if let Some(c) = &self.cluster {
            c.write_families(&mut out);
        }
        let _ = fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "# HELP coremq_build_info The running coremq's version.\n\
                 # TYPE coremq_build_info gauge\n\
                 coremq_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            ),
        );
        out
    }
}

impl ClusterCounters {
    /// A node named `node`.
    pub fn new(node: String) -> ClusterCounters {
        ClusterCounters {
            node,
            ..ClusterCounters::default()
        }
    }

    fn write_families(&self, out: &mut String) {
        use fmt::Write;
        let node = &self.node;
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(
            out,
            "# HELP coremq_cluster_node_info This node's name in its cluster.\n\
             # TYPE coremq_cluster_node_info gauge\n\
             coremq_cluster_node_info{{node=\"{node}\"}} 1"
        );
        let _ = writeln!(
            out,
            "# HELP coremq_cluster_peer_info The other nodes this one hears from.\n\
             # TYPE coremq_cluster_peer_info gauge"
        );
        for p in &peers {
            let _ = writeln!(out, "coremq_cluster_peer_info{{peer=\"{p}\"}} 1");
        }
        let _ = writeln!(
            out,
            "# HELP coremq_cluster_peers Other nodes this one hears from.\n\
             # TYPE coremq_cluster_peers gauge\ncoremq_cluster_peers {}",
            peers.len()
        );
        let plain: [(&str, &str, &str, &AtomicU64); 5] = [
            (
                "coremq_cluster_registry_up",
                "gauge",
                "1 while the session registry answers and CONNECTs are accepted.",
                &self.registry_up,
            ),
            (
                "coremq_cluster_publishes_sent_total",
                "counter",
                "Publishes sent to other nodes (one per node).",
                &self.publishes_sent,
            ),
            (
                "coremq_cluster_publishes_received_total",
                "counter",
                "Publishes received from other nodes.",
                &self.publishes_received,
            ),
            (
                "coremq_cluster_lost_wills_published_total",
                "counter",
                "Wills of clients of dead nodes published by this node.",
                &self.lost_wills_published,
            ),
            (
                "coremq_cluster_takeovers_out_total",
                "counter",
                "Clients other nodes took over from this one.",
                &self.takeovers_out,
            ),
        ];
        for (name, kind, help, c) in plain {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                get(c)
            );
        }
        let name = "coremq_cluster_claims_total";
        let _ = writeln!(
            out,
            "# HELP {name} CONNECTs by how this node came to hold the clientId: remembered (no cluster-wide write), registry (read or written there), refused (no registry).\n# TYPE {name} counter"
        );
        for (how, c) in [
            ("remembered", &self.claims_remembered),
            ("registry", &self.claims_registry),
            ("refused", &self.claims_refused),
        ] {
            let _ = writeln!(out, "{name}{{how=\"{how}\"}} {}", get(c));
        }
        let _ = writeln!(
            out,
            "# HELP coremq_cluster_takeovers_in_total Clients taken over from other nodes.\n\
             # TYPE coremq_cluster_takeovers_in_total counter\n\
             coremq_cluster_takeovers_in_total {}",
            get(&self.takeovers_in)
        );
    }
}

//! The merged result of a run: the summary table and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::protocol::Protocol;
use crate::spec::{hist_from_b64, new_hist, Mode, WorkerResult};
use crate::sys::ProcSample;

/// Broker samples between phases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerSamples {
    /// Before the first connect.
    pub before: Option<ProcSample>,
    /// When every worker finished its ramp (all connections up).
    pub after_ramp: Option<ProcSample>,
    /// When every worker finished the main phase (end of hold / churn / takeovers).
    pub end_main: Option<ProcSample>,
    /// After every worker disconnected and exited.
    pub after: Option<ProcSample>,
    /// Largest RSS seen, bytes (sampled each second and between phases).
    pub peak_rss: u64,
}

/// Facts about the run that are not measurements.
pub struct RunInfo {
    pub mode: Mode,
    pub broker: String,
    /// pubsub `--sub-broker`: where the subscribers connected, when not to
    /// `broker`.
    pub sub_broker: Option<String>,
    /// `--broker-pid`, each one given (none: no broker figures).
    pub broker_pids: Vec<u32>,
    pub workers: u32,
    pub source_ips: u32,
    pub keepalive: u16,
    pub params: serde_json::Value,
    pub started_unix: u64,
    pub total_wall_s: f64,
    /// Configured length of the main phase, seconds.
    pub main_secs: f64,
    pub parent_cpu_s: f64,
    pub children_cpu_s: f64,
    /// `--protocol`.
    pub protocol: Protocol,
    /// The message figures of a pubsub run.
    pub pubsub: Option<PubsubReport>,
    /// Machine-wide kernel slab memory before the first connect and at the
    /// end of the main phase (all connections still held), bytes.
    pub slab: (Option<u64>, Option<u64>),
}

/// Kernel memory the held connections cost, from /proc/meminfo `Slab:`.
/// Machine-wide: loadgen's own client sockets, and anything else the
/// machine did meanwhile, are counted too; two brokers measured the same
/// way on one machine still compare.
#[derive(Debug, Clone, Serialize)]
pub struct KernelSlab {
    /// Says what the figure covers, for whoever reads the JSON alone.
    pub scope: &'static str,
    /// Before the first connect, bytes.
    pub before_bytes: u64,
    /// At the end of the hold, every connection still open, bytes.
    pub held_bytes: u64,
    /// (held − before) ÷ connections held; negative when the machine freed
    /// more slab meanwhile than the connections took.
    pub bytes_per_held_connection: Option<f64>,
}

/// What a pubsub run sent and what arrived.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PubsubReport {
    /// "pairs", "fan-in" or "fan-out".
    pub shape: String,
    /// The N of --pairs / --fan-in / --fan-out.
    pub n: u32,
    pub publishers: u32,
    pub subscribers: u32,
    pub qos: u8,
    pub payload_bytes: usize,
    /// QoS 1/2 flows each publisher may have open.
    pub window: u32,
    /// --rate, when given.
    pub rate: Option<f64>,
    /// --persistent: the subscribers kept a persistent session.
    pub persistent: bool,
    /// Subscribers whose SUBACK granted the QoS asked.
    pub subscribed: u64,
    /// Publishers that got CONNACK 0.
    pub publishers_connected: u64,
    /// PUBLISHes written by the publishers.
    pub published: u64,
    /// QoS 1/2 flows the publishers completed (PUBACK, or PUBREC → PUBREL → PUBCOMP).
    pub acked: u64,
    /// QoS 1/2 flows still open when the drain ended (or on a connection that closed).
    pub unacked: u64,
    /// PUBLISHes the subscribers received, duplicates included.
    pub delivered: u64,
    /// Distinct (publisher, sequence number) arrivals per subscriber (per
    /// group with --share-group).
    pub unique: u64,
    /// published × subscribers per message (those subscribed when publishing
    /// began); with --share-group, × groups.
    pub expected: u64,
    /// expected − unique.
    pub lost: u64,
    pub lost_pct: f64,
    /// The same publisher + sequence number seen again by one subscriber (by
    /// any member of one group, with --share-group).
    pub duplicates: u64,
    /// Arrivals after a higher sequence number of the same (publisher, subscriber) stream.
    pub out_of_order: u64,
    /// (publisher, subscriber) streams.
    pub streams: u64,
    /// Streams with at least one arrival out of order.
    pub streams_out_of_order: u64,
    /// Messages that reached a subscriber whose subscription does not match them.
    pub misrouted: u64,
    /// Arrivals below a gap a stream gave up on (QoS 0 losses): duplicate or very late.
    pub untracked: u64,
    /// QoS 2 and a duplicate: MQTT-4.3.3 broken.
    pub exactly_once_violated: bool,
    /// Connecting and subscribing everyone, seconds.
    pub setup_s: f64,
    /// The publishing window, seconds.
    pub publish_s: f64,
    /// From the end of publishing until everything arrived (or --timeout), seconds.
    pub drain_s: f64,
    pub drain_timed_out: bool,
    /// published ÷ publish_s.
    pub publishes_per_s: f64,
    /// Deliveries that arrived during the publishing window.
    pub deliveries_in_window: u64,
    /// deliveries_in_window ÷ publish_s.
    pub deliveries_per_s: f64,
    /// --rate: messages due that no publisher could take (window full, socket full).
    pub rate_behind: u64,
    /// 5.0: the lowest Receive Maximum the broker gave a publisher in its
    /// CONNACK, when below `window` (each publisher then opens no more flows
    /// than its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_maximum: Option<u16>,
    /// --share-group: the subscriptions were `$share/GROUP/FILTER`, and
    /// `expected`, `unique`, `lost` and `duplicates` count per group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedReport>,
}

/// Shared subscriptions (`--share-group`): a message is owed once to each
/// group, and any one member may take it.
#[derive(Debug, Clone, Serialize)]
pub struct SharedReport {
    /// The share name.
    pub group: String,
    /// Groups: one per topic filter (pairs N, fan-in 1, fan-out 1).
    pub groups: u32,
    /// Members of each group (pairs and fan-in 1, fan-out N).
    pub members_per_group: u32,
    /// PUBLISHes received by the member that got the fewest / the most
    /// (duplicates included; over the members whose SUBACK came).
    pub member_deliveries_min: u64,
    pub member_deliveries_max: u64,
    /// Members (SUBACK came) that got no message at all.
    pub members_without_delivery: u64,
}

/// Percentiles of one histogram, µs.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// (percentile, µs) points for plotting.
    #[serde(skip)]
    pub curve: Vec<(f64, u64)>,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let mut curve = Vec::new();
        if !h.is_empty() {
            for v in h.iter_quantiles(2) {
                curve.push((v.quantile_iterated_to() * 100.0, v.value_iterated_to()));
            }
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            curve,
        }
    }
}

/// Broker cost, derived from the samples.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerCost {
    /// The first `--broker-pid`.
    pub pid: u32,
    /// Every `--broker-pid`: the samples and figures are the sum over
    /// these processes (one, unless the broker runs as a cluster).
    pub pids: Vec<u32>,
    pub samples: BrokerSamples,
    /// CPU seconds from `before` to `after_ramp` (the connects).
    pub cpu_s_ramp: Option<f64>,
    /// CPU seconds of the main phase.
    pub cpu_s_main: Option<f64>,
    /// CPU seconds of the disconnects.
    pub cpu_s_disconnect: Option<f64>,
    pub cpu_us_per_connect: Option<f64>,
    pub cpu_us_per_ping: Option<f64>,
    pub cpu_us_per_cycle: Option<f64>,
    pub cpu_us_per_takeover: Option<f64>,
    pub cpu_us_per_disconnect: Option<f64>,
    /// pubsub: CPU from the start of publishing to the end of the drain ÷ messages delivered.
    pub cpu_us_per_delivery: Option<f64>,
    /// pubsub: the same CPU ÷ messages published (the broker also pays for
    /// what it drops).
    pub cpu_us_per_publish: Option<f64>,
    /// (RSS at end of hold − RSS before) ÷ connections held.
    pub bytes_per_held_connection: Option<f64>,
    /// (RSS when the ramp ended − RSS before) ÷ connections held.
    pub bytes_per_connection_after_ramp: Option<f64>,
}

/// The keep-alive detection figures (keepalive subcommand).
#[derive(Debug, Clone, Serialize)]
pub struct KeepaliveReport {
    pub keepalive_s: u16,
    /// 1.5 × keepAlive.
    pub deadline_s: f64,
    pub silent: u64,
    pub closed: u64,
    /// Closed within 1.5 × K + 1 s of the client's last packet.
    pub closed_in_time: u64,
    pub closed_in_time_pct: f64,
    /// Closed before 1.5 × K (too early: a spec violation).
    pub closed_early: u64,
    pub wills: u64,
    pub wills_in_time: u64,
    pub wills_in_time_pct: f64,
    pub close_after_last_packet: Option<Latency>,
    pub will_after_last_packet: Option<Latency>,
}

/// loadgen's own cost.
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenCost {
    /// Coordinator + workers, seconds.
    pub cpu_s: f64,
    pub workers: Vec<WorkerCost>,
    /// True when loadgen, not the broker, was the bottleneck.
    pub loadgen_bound: bool,
    pub why: String,
}

/// One worker's CPU use.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerCost {
    pub index: u32,
    pub cpu_s: f64,
    /// CPU ÷ wall during the busy phase (ramp, or main for churn / takeover).
    pub busy_util: f64,
    pub max_rss_kb: u64,
}

/// Everything, for people and machines.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub loadgen_version: String,
    pub command_line: Vec<String>,
    pub kernel: String,
    pub cpus: usize,
    /// /proc/loadavg when the report was made: the machine is shared.
    pub loadavg: String,
    pub started_unix: u64,
    pub mode: String,
    /// The broker every client connected to (pubsub with `--sub-broker`:
    /// the publishers).
    pub broker: String,
    /// pubsub `--sub-broker`: the broker the subscribers connected to
    /// (another node of a cluster); null when they used `broker`.
    pub sub_broker: Option<String>,
    /// MQTT protocol level of every client: 4 (3.1.1) or 5 (5.0).
    pub protocol: Protocol,
    pub workers: u32,
    pub source_ips: u32,
    pub params: serde_json::Value,
    pub attempted: u64,
    pub connected: u64,
    pub disconnected: u64,
    pub cycles: u64,
    pub pings: u64,
    pub pongs: u64,
    pub takeovers: u64,
    pub failures: BTreeMap<String, u64>,
    pub failed_total: u64,
    /// Longest worker ramp, seconds.
    pub ramp_s: f64,
    /// Longest worker main phase, seconds.
    pub main_s: f64,
    pub total_wall_s: f64,
    /// CONNACKs per second over the ramp.
    pub connect_rate_per_s: f64,
    pub cycles_per_s: f64,
    pub takeovers_per_s: f64,
    /// Per second since start: CONNACKs (churn: completed cycles).
    pub series: Vec<u64>,
    pub latency: BTreeMap<String, Latency>,
    pub broker_cost: Option<BrokerCost>,
    /// conn, keepalive, takeover: kernel slab per held connection.
    pub kernel_slab: Option<KernelSlab>,
    pub keepalive: Option<KeepaliveReport>,
    pub pubsub: Option<PubsubReport>,
    pub loadgen: LoadgenCost,
}

fn per_op_us(cpu: Option<f64>, ops: u64) -> Option<f64> {
    let cpu = cpu?;
    (ops > 0).then(|| (cpu * 1e6 / ops as f64 * 10.0).round() / 10.0)
}

fn diff(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    Some(b?.cpu_s - a?.cpu_s)
}

impl Report {
    /// Merges the workers' results.
    pub fn build(info: RunInfo, rs: &[WorkerResult], samples: BrokerSamples) -> Result<Report> {
        let mut failures = BTreeMap::new();
        let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
        let mut series: Vec<u64> = Vec::new();
        let sum = |f: fn(&WorkerResult) -> u64| rs.iter().map(f).sum::<u64>();
        for r in rs {
            for (k, v) in &r.failures {
                *failures.entry(k.clone()).or_insert(0) += v;
            }
            for (k, b64) in &r.hists {
                let h = hist_from_b64(b64)?;
                hists.entry(k.clone()).or_insert_with(new_hist).add(&h)?;
            }
            if series.len() < r.series.len() {
                series.resize(r.series.len(), 0);
            }
            for (i, v) in r.series.iter().enumerate() {
                series[i] += v;
            }
        }
        let attempted = sum(|r| r.attempted);
        let connected = sum(|r| r.connected);
        let disconnected = sum(|r| r.disconnected);
        let cycles = sum(|r| r.cycles);
        let pings = sum(|r| r.pings);
        let pongs = sum(|r| r.pongs);
        let takeovers = sum(|r| r.takeovers);
        let failed_total = failures.values().sum();
        let ramp_s = rs.iter().map(|r| r.ramp_wall_s).fold(0.0, f64::max);
        let main_s = rs.iter().map(|r| r.main_wall_s).fold(0.0, f64::max);
        let rate = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };

        let mut latency = BTreeMap::new();
        for (k, h) in &hists {
            latency.insert(k.clone(), Latency::of(h));
        }

        // Keep-alive detection: join the silent cohort with the wills.
        let keepalive = (info.mode == Mode::Keepalive).then(|| {
            let k = info.keepalive;
            let deadline_us = (1.5 * f64::from(k) * 1e6) as u64;
            let grace_us = deadline_us + 1_000_000;
            let mut sent_at: BTreeMap<u32, u64> = BTreeMap::new();
            let mut close_h = new_hist();
            let (mut silent, mut closed, mut in_time, mut early) = (0, 0, 0, 0);
            for r in rs {
                for &(n, sent_ns, close_ns) in &r.silent {
                    silent += 1;
                    sent_at.insert(n, sent_ns);
                    if close_ns > 0 {
                        closed += 1;
                        let d = close_ns.saturating_sub(sent_ns) / 1000;
                        close_h.saturating_record(d.max(1));
                        if d <= grace_us {
                            in_time += 1;
                        }
                        if d < deadline_us {
                            early += 1;
                        }
                    }
                }
            }
            let mut will_h = new_hist();
            let (mut wills, mut wills_in_time) = (0, 0);
            for r in rs {
                for &(n, at_ns) in &r.wills {
                    if let Some(&sent) = sent_at.get(&n) {
                        wills += 1;
                        let d = at_ns.saturating_sub(sent) / 1000;
                        will_h.saturating_record(d.max(1));
                        if d <= grace_us {
                            wills_in_time += 1;
                        }
                    }
                }
            }
            let pct = |a: u64, b: u64| {
                if b == 0 {
                    0.0
                } else {
                    (a as f64 * 1000.0 / b as f64).round() / 10.0
                }
            };
            KeepaliveReport {
                keepalive_s: k,
                deadline_s: 1.5 * f64::from(k),
                silent,
                closed,
                closed_in_time: in_time,
                closed_in_time_pct: pct(in_time, silent),
                closed_early: early,
                wills,
                wills_in_time,
                wills_in_time_pct: pct(wills_in_time, silent),
                close_after_last_packet: (!close_h.is_empty()).then(|| Latency::of(&close_h)),
                will_after_last_packet: (!will_h.is_empty()).then(|| Latency::of(&will_h)),
            }
        });

        let broker_cost = info.broker_pids.first().map(|&pid| {
            let s = &samples;
            let cpu_ramp = diff(s.before, s.after_ramp);
            let cpu_main = diff(s.after_ramp, s.end_main);
            let cpu_disc = diff(s.end_main, s.after);
            let held = connected.saturating_sub(sum(|r| r.takeovers));
            BrokerCost {
                pid,
                pids: info.broker_pids.clone(),
                samples: samples.clone(),
                cpu_s_ramp: cpu_ramp,
                cpu_s_main: cpu_main,
                cpu_s_disconnect: cpu_disc,
                cpu_us_per_connect: match info.mode {
                    Mode::Churn => None,
                    _ => per_op_us(cpu_ramp, connected.min(attempted)),
                },
                cpu_us_per_ping: match info.mode {
                    Mode::Conn | Mode::Keepalive => per_op_us(cpu_main, pings),
                    _ => None,
                },
                cpu_us_per_cycle: match info.mode {
                    Mode::Churn => per_op_us(cpu_main, cycles),
                    _ => None,
                },
                cpu_us_per_takeover: match info.mode {
                    Mode::Takeover => per_op_us(cpu_main, takeovers),
                    _ => None,
                },
                cpu_us_per_disconnect: match info.mode {
                    Mode::Churn => None,
                    _ => per_op_us(cpu_disc, disconnected),
                },
                cpu_us_per_delivery: match (&info.pubsub, info.mode) {
                    (Some(p), Mode::Pubsub) => per_op_us(cpu_main, p.delivered),
                    _ => None,
                },
                cpu_us_per_publish: match (&info.pubsub, info.mode) {
                    (Some(p), Mode::Pubsub) => per_op_us(cpu_main, p.published),
                    _ => None,
                },
                bytes_per_held_connection: match (info.mode, s.before, s.end_main) {
                    (Mode::Churn | Mode::Pubsub, _, _) => None,
                    (_, Some(a), Some(b)) if held > 0 => {
                        Some(((b.rss_bytes as f64 - a.rss_bytes as f64) / held as f64).round())
                    }
                    _ => None,
                },
                bytes_per_connection_after_ramp: match (info.mode, s.before, s.after_ramp) {
                    (Mode::Churn | Mode::Pubsub, _, _) => None,
                    (_, Some(a), Some(b)) if held > 0 => {
                        Some(((b.rss_bytes as f64 - a.rss_bytes as f64) / held as f64).round())
                    }
                    _ => None,
                },
            }
        });

        // Churn and pubsub hold no steady population of connections.
        let held = connected.saturating_sub(takeovers);
        let kernel_slab = match (info.mode, info.slab) {
            (Mode::Churn | Mode::Pubsub, _) => None,
            (_, (Some(before), Some(at_hold))) => Some(KernelSlab {
                scope: "machine-wide /proc/meminfo Slab: (loadgen's client sockets included)",
                before_bytes: before,
                held_bytes: at_hold,
                bytes_per_held_connection: (held > 0)
                    .then(|| ((at_hold as f64 - before as f64) / held as f64).round()),
            }),
            _ => None,
        };

        // loadgen's own cost and whether it was the bottleneck.
        let busy = |r: &WorkerResult| match info.mode {
            Mode::Churn | Mode::Takeover | Mode::Pubsub => (r.main_cpu_s, r.main_wall_s),
            _ => (r.ramp_cpu_s, r.ramp_wall_s),
        };
        let workers: Vec<WorkerCost> = rs
            .iter()
            .map(|r| {
                let (c, w) = busy(r);
                WorkerCost {
                    index: r.index,
                    cpu_s: (r.cpu_s * 1000.0).round() / 1000.0,
                    busy_util: if w > 0.05 {
                        (c / w * 100.0).round() / 100.0
                    } else {
                        0.0
                    },
                    max_rss_kb: r.max_rss_kb,
                }
            })
            .collect();
        let cores = crate::sys::affinity_cpus().min(workers.len().max(1)) as f64;
        let busy_cpu: f64 = rs.iter().map(|r| busy(r).0).sum();
        let busy_wall = rs.iter().map(|r| busy(r).1).fold(0.0, f64::max);
        let total_util = if busy_wall > 0.05 {
            busy_cpu / busy_wall
        } else {
            0.0
        };
        let hot = workers.iter().filter(|w| w.busy_util >= 0.9).count();
        let (bound, why) = if hot > 0 {
            (
                true,
                format!("{hot} worker(s) at ≥ 90% of a core during the busy phase"),
            )
        } else if total_util >= 0.9 * cores {
            (
                true,
                format!("workers used {total_util:.2} of {cores} available core(s)"),
            )
        } else {
            (
                false,
                format!("workers peaked at {total_util:.2} core(s) of {cores}"),
            )
        };

        Ok(Report {
            loadgen_version: env!("CARGO_PKG_VERSION").to_string(),
            command_line: std::env::args().collect(),
            kernel: crate::sys::kernel(),
            cpus: crate::sys::affinity_cpus(),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            started_unix: info.started_unix,
            mode: info.mode.name().to_string(),
            broker: info.broker,
            sub_broker: info.sub_broker,
            protocol: info.protocol,
            workers: info.workers,
            source_ips: info.source_ips,
            params: info.params,
            attempted,
            connected,
            disconnected,
            cycles,
            pings,
            pongs,
            takeovers,
            failures,
            failed_total,
            ramp_s: (ramp_s * 1000.0).round() / 1000.0,
            main_s: (main_s * 1000.0).round() / 1000.0,
            total_wall_s: (info.total_wall_s * 1000.0).round() / 1000.0,
            connect_rate_per_s: rate(connected.saturating_sub(takeovers), ramp_s),
            cycles_per_s: rate(cycles, main_s),
            takeovers_per_s: rate(takeovers, main_s.min(info.main_secs)),
            series,
            latency,
            broker_cost,
            kernel_slab,
            keepalive,
            pubsub: info.pubsub,
            loadgen: LoadgenCost {
                cpu_s: ((info.parent_cpu_s + info.children_cpu_s) * 1000.0).round() / 1000.0,
                workers,
                loadgen_bound: bound,
                why,
            },
        })
    }

    /// The summary for people.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let procs = if self.mode == "pubsub" {
            "one process".to_string()
        } else {
            format!("{} worker(s)", self.workers)
        };
        let brokers = match &self.sub_broker {
            Some(sub) => format!("{} (publishers), {sub} (subscribers)", self.broker),
            None => self.broker.clone(),
        };
        let _ = writeln!(
            o,
            "loadgen {} {} → {brokers} {}  ({procs}, {} source IP(s), kernel {}, {} cpu(s), loadavg {})",
            self.loadgen_version,
            self.mode,
            self.protocol,
            self.source_ips,
            self.kernel,
            self.cpus,
            self.loadavg
                .split(' ')
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(
            o,
            "  attempted {}  connected {}  disconnected {}",
            self.attempted, self.connected, self.disconnected
        );
        match self.mode.as_str() {
            "churn" => {
                let _ = writeln!(
                    o,
                    "  cycles {} in {:.2} s  →  {} cycles/s",
                    self.cycles, self.main_s, self.cycles_per_s
                );
            }
            "pubsub" => {
                if let Some(p) = &self.pubsub {
                    pubsub_lines(&mut o, p);
                }
            }
            "takeover" => {
                let _ = writeln!(
                    o,
                    "  ramp {:.2} s ({} connects/s)  takeovers {} in {:.2} s → {}/s",
                    self.ramp_s,
                    self.connect_rate_per_s,
                    self.takeovers,
                    self.main_s,
                    self.takeovers_per_s
                );
            }
            _ => {
                let _ = writeln!(
                    o,
                    "  ramp {:.2} s  →  {} connects/s   hold {:.2} s  pings {} / pongs {}",
                    self.ramp_s, self.connect_rate_per_s, self.main_s, self.pings, self.pongs
                );
            }
        }
        if self.failures.is_empty() {
            let _ = writeln!(o, "  failures: none");
        } else {
            let list: Vec<String> = self
                .failures
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(o, "  failures: {}", list.join(" "));
        }
        let _ = writeln!(
            o,
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut rows: Vec<(&str, &Latency)> =
            self.latency.iter().map(|(k, v)| (k.as_str(), v)).collect();
        // pubsub: the end-to-end latency first.
        rows.sort_by_key(|(k, _)| *k != "e2e");
        if let Some(k) = &self.keepalive {
            if let Some(l) = &k.close_after_last_packet {
                rows.push(("silent→broker close", l));
            }
            if let Some(l) = &k.will_after_last_packet {
                rows.push(("silent→will", l));
            }
        }
        for (name, l) in rows {
            let _ = writeln!(
                o,
                "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                name,
                l.count,
                fmt_us(l.p50_us),
                fmt_us(l.p90_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us)
            );
        }
        if let Some(k) = &self.keepalive {
            let _ = writeln!(
                o,
                "  keep-alive K={} s: {} silent, closed {} ({}% within 1.5K+1 s = {:.1} s, {} before 1.5K), wills {} ({}% within)",
                k.keepalive_s,
                k.silent,
                k.closed,
                k.closed_in_time_pct,
                k.deadline_s + 1.0,
                k.closed_early,
                k.wills,
                k.wills_in_time_pct
            );
        }
        if let Some(b) = &self.broker_cost {
            let f = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_else(|| "-".into());
            let mb = |s: Option<ProcSample>| {
                s.map(|s| format!("{:.1} MiB", s.rss_bytes as f64 / 1048576.0))
                    .unwrap_or_else(|| "-".into())
            };
            let pubsub = self.mode == "pubsub";
            let (l_ramp, l_main, l_after_ramp, l_end_main) = if pubsub {
                ("setup", "publish+drain", "after-setup", "end-drain")
            } else {
                ("ramp", "main", "after-ramp", "end-main")
            };
            let who = if b.pids.len() > 1 {
                let list: Vec<String> = b.pids.iter().map(u32::to_string).collect();
                format!("pids {} (summed)", list.join("+"))
            } else {
                format!("pid {}", b.pid)
            };
            let _ = writeln!(
                o,
                "  broker {who}: CPU s {l_ramp} {} {l_main} {} disconnect {}",
                f(b.cpu_s_ramp.map(|x| (x * 100.0).round() / 100.0)),
                f(b.cpu_s_main.map(|x| (x * 100.0).round() / 100.0)),
                f(b.cpu_s_disconnect.map(|x| (x * 100.0).round() / 100.0)),
            );
            let _ = writeln!(
                o,
                "  broker RSS before {} {l_after_ramp} {} {l_end_main} {} after {} peak {:.1} MiB",
                mb(b.samples.before),
                mb(b.samples.after_ramp),
                mb(b.samples.end_main),
                mb(b.samples.after),
                b.samples.peak_rss as f64 / 1048576.0
            );
            let mut per = Vec::new();
            for (name, v) in [
                ("delivered message", b.cpu_us_per_delivery),
                ("published message", b.cpu_us_per_publish),
                (
                    if pubsub {
                        "connect+subscribe"
                    } else {
                        "connect"
                    },
                    b.cpu_us_per_connect,
                ),
                ("ping", b.cpu_us_per_ping),
                ("cycle", b.cpu_us_per_cycle),
                ("takeover", b.cpu_us_per_takeover),
                ("disconnect", b.cpu_us_per_disconnect),
            ] {
                if let Some(v) = v {
                    per.push(format!("{name} {v}"));
                }
            }
            let _ = writeln!(o, "  broker CPU µs per op: {}", per.join("  "));
            if let Some(v) = b.bytes_per_held_connection {
                let _ = writeln!(
                    o,
                    "  broker bytes per held connection: {v} at end of hold ({} when the ramp ended)",
                    f(b.bytes_per_connection_after_ramp)
                );
            }
        }
        if let Some(k) = &self.kernel_slab {
            let per = k
                .bytes_per_held_connection
                .map(|v| format!("{v} B per held connection"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                o,
                "  kernel slab (machine-wide, loadgen's sockets included): {:.1} → {:.1} MiB at end of hold: {per}",
                k.before_bytes as f64 / 1048576.0,
                k.held_bytes as f64 / 1048576.0
            );
        }
        let _ = writeln!(
            o,
            "  loadgen CPU {:.2} s; {}{}",
            self.loadgen.cpu_s,
            self.loadgen.why,
            if self.loadgen.loadgen_bound {
                "  ** LOADGEN-BOUND: loadgen, not the broker, was the bottleneck **"
            } else {
                ""
            }
        );
        o
    }
}

/// The message figures of a pubsub run, for the table.
fn pubsub_lines(o: &mut String, p: &PubsubReport) {
    let rate = p
        .rate
        .map(|r| format!("rate {r}/s"))
        .unwrap_or_else(|| "no rate limit".into());
    let window = if p.qos > 0 {
        match p.receive_maximum {
            Some(rm) => format!(", window {} (broker's Receive Maximum {rm})", p.window),
            None => format!(", window {}", p.window),
        }
    } else {
        String::new()
    };
    let persistent = if p.persistent {
        " (persistent sessions)"
    } else {
        ""
    };
    let _ = writeln!(
        o,
        "  {} {}: {} publisher(s) → {} subscriber(s){persistent} ({} subscribed), QoS {}, payload {} B{window}, {rate}",
        p.shape, p.n, p.publishers, p.subscribers, p.subscribed, p.qos, p.payload_bytes
    );
    if let Some(g) = &p.shared {
        let _ = writeln!(
            o,
            "  shared subscriptions $share/{}/…: {} group(s) of {} member(s), each message owed once per group; \
             deliveries per member min {} max {}{}",
            g.group,
            g.groups,
            g.members_per_group,
            g.member_deliveries_min,
            g.member_deliveries_max,
            if g.members_without_delivery > 0 {
                format!(" ({} member(s) got none)", g.members_without_delivery)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "  setup {:.2} s   published {} in {:.2} s → {} msgs/s   delivered in window {} → {} deliveries/s   drain {:.2} s{}",
        p.setup_s,
        p.published,
        p.publish_s,
        p.publishes_per_s,
        p.deliveries_in_window,
        p.deliveries_per_s,
        p.drain_s,
        if p.drain_timed_out { " (timed out)" } else { "" }
    );
    let lost_note = if p.qos == 0 && p.lost > 0 {
        " (QoS 0: allowed)"
    } else {
        ""
    };
    let _ = writeln!(
        o,
        "  delivered {} of {} expected: lost {} ({}%){lost_note}  duplicates {}  out of order {} ({} of {} streams)  misrouted {}{}",
        p.delivered,
        p.expected,
        p.lost,
        p.lost_pct,
        p.duplicates,
        p.out_of_order,
        p.streams_out_of_order,
        p.streams,
        p.misrouted,
        if p.untracked > 0 {
            format!("  untracked {}", p.untracked)
        } else {
            String::new()
        }
    );
    if p.qos > 0 {
        let _ = writeln!(
            o,
            "  publisher flows completed {} of {} (unacked {}){}",
            p.acked,
            p.published,
            p.unacked,
            if p.rate_behind > 0 {
                format!("   rate behind by {} message(s)", p.rate_behind)
            } else {
                String::new()
            }
        );
    } else if p.rate_behind > 0 {
        let _ = writeln!(o, "  rate behind by {} message(s)", p.rate_behind);
    }
    if p.exactly_once_violated {
        let _ = writeln!(
            o,
            "  ** EXACTLY-ONCE VIOLATED: {} duplicate(s) at QoS 2 (MQTT-4.3.3) **",
            p.duplicates
        );
    }
    if p.out_of_order > 0 {
        let _ = writeln!(
            o,
            "  ** ORDER VIOLATED: {} message(s) out of order within a publisher's topic (MQTT-4.6.0-6) **",
            p.out_of_order
        );
    }
}

/// µs as a short human figure.
pub fn fmt_us(us: u64) -> String {
    if us >= 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

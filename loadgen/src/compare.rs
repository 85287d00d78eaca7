//! `loadgen compare`: starts coremq, mosquitto and the null broker in turn,
//! runs the same loadgen scenarios against each (a fresh broker for every
//! scenario, brokers interleaved within every run), and prints per-scenario
//! tables of medians over the runs with the ratios coremq/mosquitto and
//! coremq/null.
//!
//! Every scenario is run as a child `loadgen <scenario> … --json FILE`
//! pinned to `--loadgen-cpu` (its workers inherit the pinning); every broker
//! is a child pinned to `--broker-cpu`, stopped by its PID when its scenario
//! ends.
//!
//! `--io uring,epoll` runs coremq once per socket loop (`coremq-uring`,
//! `coremq-epoll`: one row each, and a uring/epoll ratio); `--syscalls` runs
//! every coremq under `strace -f -c` and reports its system calls per unit
//! of the scenario's work, from strace's summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::usage_error;

/// Ports a comparison never uses: the usual MQTT port and a port other
/// sessions on these machines keep for their own broker.
const RESERVED_PORTS: [u16; 2] = [1883, 2024];

/// keepalive: pinging connections, silent cohort, keepAlive.
const KA_N: u32 = 2000;
const KA_SILENT: u32 = 200;
const KA_K: u16 = 2;
/// takeover: clientIds, takeovers per second, seconds.
const TO_N: u32 = 1000;
const TO_RATE: u32 = 500;
const TO_DURATION: f64 = 5.0;

/// Source addresses set aside for each loadgen run (see `--source-skip`):
/// enough for 320,000 connections at loadgen's one address per 5,000.
const SOURCE_IPS_PER_RUN: u32 = 64;

/// A broker under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Broker {
    /// This workspace's broker.
    Coremq,
    /// Eclipse Mosquitto, as Debian ships it.
    Mosquitto,
    /// `loadgen null-broker`: the machine's ceiling.
    #[value(alias = "null-broker")]
    Null,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Coremq => "coremq",
            Broker::Mosquitto => "mosquitto",
            Broker::Null => "null",
        }
    }
}

/// A coremq socket loop (`coremq --io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum IoMode {
    /// io_uring.
    Uring,
    /// epoll.
    Epoll,
    /// coremq's choice: io_uring when the kernel has all it needs, else epoll.
    Auto,
}

impl IoMode {
    /// The value `coremq --io` takes.
    fn name(self) -> &'static str {
        match self {
            IoMode::Uring => "uring",
            IoMode::Epoll => "epoll",
            IoMode::Auto => "auto",
        }
    }
}

/// One column of the comparison: a broker, and for coremq the socket loop
/// it was told to run (`None`: started without `--io`, its default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Variant {
    broker: Broker,
    io: Option<IoMode>,
}

impl Variant {
    /// The row name: the broker's, with the loop after a dash.
    fn name(self) -> &'static str {
        match (self.broker, self.io) {
            (Broker::Coremq, Some(IoMode::Uring)) => "coremq-uring",
            (Broker::Coremq, Some(IoMode::Epoll)) => "coremq-epoll",
            (Broker::Coremq, Some(IoMode::Auto)) => "coremq-auto",
            (b, _) => b.name(),
        }
    }
}

/// The brokers in turn within a round: `--brokers` in its order, with
/// coremq replaced by one variant per `--io` mode (in `--io`'s order) so
/// that the loops interleave with the other brokers as brokers always have.
fn variants(brokers: &[Broker], io: &[IoMode]) -> Vec<Variant> {
    let mut out = Vec::new();
    for &broker in brokers {
        if broker == Broker::Coremq && !io.is_empty() {
            out.extend(io.iter().map(|&m| Variant {
                broker,
                io: Some(m),
            }));
        } else {
            out.push(Variant { broker, io: None });
        }
    }
    out
}

/// The pairs of coremq loops whose ratio the tables show: uring/epoll,
/// uring/auto, epoll/auto, those of them whose both sides run, whatever
/// order `--io` lists them in (so uring/epoll always reads "uring's figure
/// ÷ epoll's").
fn io_pairs(io: &[IoMode]) -> Vec<(IoMode, IoMode)> {
    let all = [IoMode::Uring, IoMode::Epoll, IoMode::Auto];
    let mut out = Vec::new();
    for (i, &x) in all.iter().enumerate() {
        for &y in &all[i + 1..] {
            if io.contains(&x) && io.contains(&y) {
                out.push((x, y));
            }
        }
    }
    out
}

/// A loadgen scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// connect → CONNACK → DISCONNECT → close loops.
    Churn,
    /// Open N, hold pinging, disconnect all.
    Conn,
    /// Ping latency and dead-client detection.
    Keepalive,
    /// Reconnecting existing clientIds.
    Takeover,
    /// Message throughput and end-to-end latency, publisher → subscriber pairs.
    Pubsub,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Churn => "churn",
            Scenario::Conn => "conn",
            Scenario::Keepalive => "keepalive",
            Scenario::Takeover => "takeover",
            Scenario::Pubsub => "pubsub",
        }
    }
}

/// `loadgen compare`.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// coremq binary (default: beside this loadgen, then PATH).
    #[arg(long, value_name = "PATH")]
    pub coremq: Option<PathBuf>,
    /// mosquitto binary (default: PATH, then /usr/sbin/mosquitto).
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// Brokers, in the order they take turns within a run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "coremq,mosquitto,null",
        value_name = "LIST"
    )]
    pub brokers: Vec<Broker>,
    /// Scenarios, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "churn,conn,keepalive,takeover,pubsub",
        value_name = "LIST"
    )]
    pub scenarios: Vec<Scenario>,
    /// Rounds; every round runs every scenario against every broker.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// coremq --shards.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// coremq socket loops to compare (uring, epoll, auto): coremq runs once
    /// per mode in every round, with `--io MODE`, as its own row
    /// (coremq-uring, coremq-epoll, coremq-auto), with ratios to the other
    /// brokers and uring/epoll (default: one coremq, started without --io).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub io: Vec<IoMode>,
    /// Run coremq under `strace -f -c` and report its system calls per
    /// scenario unit (cycle, connection, ping, takeover, delivered message),
    /// with the top 5 by name in the JSON. strace slows coremq: its CPU
    /// figures read "(strace)", its rates and latencies are slowed.
    #[arg(long)]
    pub syscalls: bool,
    /// The CPU the broker is pinned to.
    #[arg(long, default_value_t = 1)]
    pub broker_cpu: usize,
    /// The CPU loadgen (coordinator and workers) is pinned to.
    #[arg(long, default_value_t = 0)]
    pub loadgen_cpu: usize,
    /// conn: connections to open and hold.
    #[arg(long, default_value_t = 19000)]
    pub conn_n: u32,
    /// conn: seconds to hold them (the idle upkeep is measured over the hold).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub conn_hold: f64,
    /// conn: their keepAlive in seconds (each pings at this period).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub conn_keepalive: u16,
    /// churn: concurrent connect/disconnect loops.
    #[arg(long, default_value_t = 50)]
    pub churn_concurrency: u32,
    /// churn: seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// pubsub: publisher → subscriber pairs.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub pubsub_pairs: u32,
    /// pubsub: QoS of every PUBLISH and subscription.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub pubsub_qos: u8,
    /// pubsub: payload bytes (at least 16).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub pubsub_payload: usize,
    /// pubsub: seconds of publishing.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub pubsub_duration: f64,
    /// pubsub: PUBLISHes per second over all publishers (default: as fast as they go).
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub pubsub_rate: Option<f64>,
    /// pubsub: each subscriber acknowledges at most this many messages a
    /// second (`loadgen pubsub --slow-subscribers`): what each broker does
    /// when its session queues fill.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub pubsub_slow_subscribers: Option<f64>,
    /// Write the raw per-run results (every loadgen report) and the medians as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the tables as a Markdown section for BENCHMARKS.md.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

/// How a figure is shown.
#[derive(Clone, Copy)]
enum Fmt {
    /// A whole number with thousands separators.
    Int,
    /// Microseconds, shown as µs / ms / s.
    Us,
    /// One decimal.
    F1,
    /// Two decimals.
    F2,
    /// Bytes, shown in MiB.
    Mib,
    /// A percentage.
    Pct,
}

/// What a ratio of this figure means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ratio {
    None,
    /// Higher is better.
    Rate,
    /// Lower is better.
    Cost,
}

/// Where a figure comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    /// loadgen's JSON report, at `ptr`.
    Report,
    /// strace's count of the broker's system calls ÷ the scenario's unit
    /// (`--syscalls`; coremq only).
    Syscalls,
}

/// One column of a scenario's table: a figure from loadgen's JSON report
/// (or, for the syscall column, from strace's summary).
struct Metric {
    key: &'static str,
    head: &'static str,
    ptr: &'static str,
    fmt: Fmt,
    ratio: Ratio,
    /// The null broker has no such behaviour: shown as "n/a".
    null_na: bool,
    /// Broker CPU: not valid from a broker run under strace.
    cpu: bool,
    src: Src,
}

/// A column from loadgen's report, shown as is, without a ratio.
const fn m(key: &'static str, head: &'static str, ptr: &'static str, fmt: Fmt) -> Metric {
    Metric {
        key,
        head,
        ptr,
        fmt,
        ratio: Ratio::None,
        null_na: false,
        cpu: false,
        src: Src::Report,
    }
}

/// Ratios of it read "higher is better".
const fn rate(mut x: Metric) -> Metric {
    x.ratio = Ratio::Rate;
    x
}

/// Ratios of it read "lower is better".
const fn cost(mut x: Metric) -> Metric {
    x.ratio = Ratio::Cost;
    x
}

/// Not a behaviour of the null broker.
const fn na(mut x: Metric) -> Metric {
    x.null_na = true;
    x
}

/// Broker CPU: shown as "(strace)" for a broker run under strace.
const fn cpu(mut x: Metric) -> Metric {
    x.cpu = true;
    x
}

/// The syscall column: system calls per `unit` (lower is better).
const fn sys(head: &'static str) -> Metric {
    let mut x = cost(m("syscalls_per_unit", head, "", Fmt::F2));
    x.src = Src::Syscalls;
    x
}

const PEAK_RSS: Metric = cost(m(
    "peak_rss",
    "peak RSS MiB",
    "/broker_cost/samples/peak_rss",
    Fmt::Mib,
));

const CHURN: &[Metric] = &[
    rate(m("rate", "cycles/s", "/cycles_per_s", Fmt::Int)),
    m("p50", "cycle p50", "/latency/cycle/p50_us", Fmt::Us),
    m("p99", "cycle p99", "/latency/cycle/p99_us", Fmt::Us),
    cpu(cost(m(
        "cpu_per_cycle",
        "CPU µs/cycle",
        "/broker_cost/cpu_us_per_cycle",
        Fmt::F1,
    ))),
    PEAK_RSS,
];

const CONN: &[Metric] = &[
    rate(m("rate", "connects/s", "/connect_rate_per_s", Fmt::Int)),
    m("p50", "CONNACK p50", "/latency/connack/p50_us", Fmt::Us),
    m("p99", "CONNACK p99", "/latency/connack/p99_us", Fmt::Us),
    cpu(cost(m(
        "cpu_per_connect",
        "CPU µs/connect",
        "/broker_cost/cpu_us_per_connect",
        Fmt::F1,
    ))),
    cpu(cost(m(
        "cpu_per_ping",
        "CPU µs/ping",
        "/broker_cost/cpu_us_per_ping",
        Fmt::F1,
    ))),
    cpu(cost(m(
        "cpu_per_disconnect",
        "CPU µs/disconnect",
        "/broker_cost/cpu_us_per_disconnect",
        Fmt::F1,
    ))),
    cost(m(
        "bytes_per_conn",
        "bytes/held conn",
        "/broker_cost/bytes_per_held_connection",
        Fmt::Int,
    )),
    // Machine-wide (loadgen's client sockets too): see the caption.
    cost(m(
        "kernel_slab_per_conn",
        "kernel slab B/conn",
        "/kernel_slab/bytes_per_held_connection",
        Fmt::Int,
    )),
    PEAK_RSS,
];

const KEEPALIVE: &[Metric] = &[
    m("p50", "ping p50", "/latency/ping/p50_us", Fmt::Us),
    m("p99", "ping p99", "/latency/ping/p99_us", Fmt::Us),
    cpu(cost(m(
        "cpu_per_ping",
        "CPU µs/ping",
        "/broker_cost/cpu_us_per_ping",
        Fmt::F1,
    ))),
    na(m(
        "closed_in_time",
        "closed ≤1.5K+1s",
        "/keepalive/closed_in_time_pct",
        Fmt::Pct,
    )),
    na(m(
        "closed_early",
        "closed <1.5K",
        "/keepalive/closed_early",
        Fmt::Int,
    )),
    na(m(
        "close_p50",
        "close p50",
        "/keepalive/close_after_last_packet/p50_us",
        Fmt::Us,
    )),
    na(m(
        "wills_in_time",
        "wills ≤1.5K+1s",
        "/keepalive/wills_in_time_pct",
        Fmt::Pct,
    )),
    PEAK_RSS,
];

const TAKEOVER: &[Metric] = &[
    rate(m("rate", "takeovers/s", "/takeovers_per_s", Fmt::Int)),
    m(
        "p50",
        "CONNACK p50",
        "/latency/takeover_connack/p50_us",
        Fmt::Us,
    ),
    m(
        "p99",
        "CONNACK p99",
        "/latency/takeover_connack/p99_us",
        Fmt::Us,
    ),
    m(
        "old_close_p99",
        "old close p99",
        "/latency/takeover_old_close/p99_us",
        Fmt::Us,
    ),
    cpu(cost(m(
        "cpu_per_takeover",
        "CPU µs/takeover",
        "/broker_cost/cpu_us_per_takeover",
        Fmt::F1,
    ))),
    PEAK_RSS,
];

const PUBSUB: &[Metric] = &[
    rate(m(
        "rate",
        "deliveries/s",
        "/pubsub/deliveries_per_s",
        Fmt::Int,
    )),
    m("p50", "e2e p50", "/latency/e2e/p50_us", Fmt::Us),
    m("p99", "e2e p99", "/latency/e2e/p99_us", Fmt::Us),
    cpu(cost(m(
        "cpu_per_msg",
        "CPU µs/msg",
        "/broker_cost/cpu_us_per_delivery",
        Fmt::F1,
    ))),
    m("lost_pct", "lost", "/pubsub/lost_pct", Fmt::Pct),
    PEAK_RSS,
];

/// The columns loadgen's report gives every scenario.
fn metrics(s: Scenario) -> &'static [Metric] {
    match s {
        Scenario::Churn => CHURN,
        Scenario::Conn => CONN,
        Scenario::Keepalive => KEEPALIVE,
        Scenario::Takeover => TAKEOVER,
        Scenario::Pubsub => PUBSUB,
    }
}

const SYS_CHURN: Metric = sys("syscalls/cycle");
const SYS_CONN: Metric = sys("syscalls/conn");
const SYS_KEEPALIVE: Metric = sys("syscalls/ping");
const SYS_TAKEOVER: Metric = sys("syscalls/takeover");
const SYS_PUBSUB: Metric = sys("syscalls/msg");

/// A scenario's unit of work, which the syscall count is divided by: the
/// figure the scenario's rate or latency columns count (its JSON pointer in
/// loadgen's report) and its name.
fn syscall_unit(s: Scenario) -> (&'static str, &'static str, &'static Metric) {
    match s {
        Scenario::Churn => ("/cycles", "cycle", &SYS_CHURN),
        // A connection's whole life: connect, pings while held, disconnect.
        Scenario::Conn => ("/connected", "connection", &SYS_CONN),
        // Pings are keepalive's traffic; its 2,200 connects are counted in
        // too (the count is of the broker's whole run).
        Scenario::Keepalive => ("/pings", "ping", &SYS_KEEPALIVE),
        Scenario::Takeover => ("/takeovers", "takeover", &SYS_TAKEOVER),
        Scenario::Pubsub => ("/pubsub/delivered", "delivered message", &SYS_PUBSUB),
    }
}

/// A scenario's table columns: the report's, then with `--syscalls` the
/// syscall count.
fn columns(s: Scenario, a: &CompareArgs) -> Vec<&'static Metric> {
    let mut v: Vec<&'static Metric> = metrics(s).iter().collect();
    if a.syscalls {
        v.push(syscall_unit(s).2);
    }
    v
}

/// The binaries a comparison runs.
struct Bins {
    loadgen: PathBuf,
    coremq: Option<PathBuf>,
    mosquitto: Option<PathBuf>,
    /// `--syscalls` only.
    strace: Option<PathBuf>,
}

/// One row of strace's `-c` summary.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct SyscallRow {
    name: String,
    calls: u64,
    errors: u64,
    /// calls ÷ the scenario's units.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_unit: Option<f64>,
}

/// What strace's `-c` summary says: every syscall's calls and errors, and
/// its "total" line.
#[derive(Debug, Clone, PartialEq)]
struct StraceSummary {
    /// Most calls first.
    rows: Vec<SyscallRow>,
    total_calls: u64,
    total_errors: u64,
}

/// The system calls of one broker run (`--syscalls`).
#[derive(Debug, Clone, serde::Serialize)]
struct SyscallCount {
    /// Every call of every thread, from start to stop (start-up, loadgen's
    /// TCP probe and shutdown included: a few hundred calls).
    total: u64,
    errors: u64,
    /// What the count is divided by ("cycle", "connection", ...).
    unit: &'static str,
    /// How many of them loadgen's report counted.
    units: Option<u64>,
    /// total ÷ units.
    per_unit: Option<f64>,
    /// The 5 syscalls with the most calls.
    top: Vec<SyscallRow>,
    /// Every syscall's calls, for the breakdown pooled over runs.
    #[serde(skip)]
    all: Vec<SyscallRow>,
}

/// Parses strace's `-c` summary table:
///
/// ```text
/// % time     seconds  usecs/call     calls    errors syscall
/// ------ ----------- ----------- --------- --------- ----------------
///  24.49    0.001622          15       104        45 openat
///   0.00    0.000000           0         2           close
/// ------ ----------- ----------- --------- --------- ----------------
/// 100.00    0.006622          13       483        82 total
/// ```
///
/// The columns are cut where the dashes under the header say: an empty
/// errors cell (no errors) and, in older straces, an empty usecs/call cell
/// on the total line would shift whitespace-split fields. strace writes one
/// table per personality (64- and 32-bit): the tables are summed.
fn parse_strace_summary(text: &str) -> Result<StraceSummary> {
    let lines: Vec<&str> = text.lines().collect();
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let (mut total_calls, mut total_errors, mut totals) = (0u64, 0u64, 0);
    let mut i = 0;
    while i < lines.len() {
        let head = lines[i];
        let Some(sep) = lines.get(i + 1) else { break };
        if !(head.contains("calls") && head.contains("syscall") && sep.starts_with('-')) {
            i += 1;
            continue;
        }
        // Column spans: the runs of dashes.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut start = None;
        for (j, ch) in sep.char_indices() {
            match (ch, start) {
                ('-', None) => start = Some(j),
                ('-', Some(_)) => {}
                (_, Some(st)) => {
                    spans.push((st, j));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(st) = start {
            spans.push((st, sep.len()));
        }
        let cell = |l: &str, (a, b): (usize, usize), last: bool| -> String {
            let b = if last { l.len() } else { b.min(l.len()) };
            l.get(a.min(b)..b).unwrap_or("").trim().to_string()
        };
        let nspans = spans.len();
        let names: Vec<String> = spans
            .iter()
            .enumerate()
            .map(|(k, &sp)| cell(head, sp, k + 1 == nspans))
            .collect();
        let col = |want: &str| names.iter().position(|n| n == want);
        let (Some(c_calls), Some(c_name)) = (col("calls"), col("syscall")) else {
            bail!("strace summary: no calls/syscall columns in {head:?}");
        };
        let c_errors = col("errors");
        i += 2;
        while i < lines.len() {
            let l = lines[i];
            i += 1;
            if l.starts_with('-') {
                continue;
            }
            // (No test for "syscall" here: restart_syscall is a row.)
            if l.trim().is_empty() {
                break;
            }
            let get = |c: usize| cell(l, spans[c], c + 1 == nspans);
            let name = get(c_name);
            let calls: u64 = get(c_calls)
                .parse()
                .with_context(|| format!("strace summary: calls in {l:?}"))?;
            let errors: u64 = match c_errors.map(get) {
                Some(e) if !e.is_empty() => e
                    .parse()
                    .with_context(|| format!("strace summary: errors in {l:?}"))?,
                _ => 0,
            };
            if name == "total" {
                total_calls += calls;
                total_errors += errors;
                totals += 1;
                break;
            }
            let e = by_name.entry(name).or_default();
            e.0 += calls;
            e.1 += errors;
        }
    }
    if totals == 0 {
        bail!("strace summary: no total line");
    }
    let mut rows: Vec<SyscallRow> = by_name
        .into_iter()
        .map(|(name, (calls, errors))| SyscallRow {
            name,
            calls,
            errors,
            per_unit: None,
        })
        .collect();
    rows.sort_by(|x, y| y.calls.cmp(&x.calls).then_with(|| x.name.cmp(&y.name)));
    Ok(StraceSummary {
        rows,
        total_calls,
        total_errors,
    })
}

/// Rounds a per-unit figure to 3 decimals, for the JSON.
fn per(n: u64, units: Option<u64>) -> Option<f64> {
    units
        .filter(|&u| u > 0)
        .map(|u| (n as f64 / u as f64 * 1000.0).round() / 1000.0)
}

impl SyscallCount {
    /// strace's summary of a broker run, divided by the scenario's units
    /// from loadgen's report.
    fn of(sum: &StraceSummary, s: Scenario, report: Option<&Value>) -> SyscallCount {
        let (ptr, unit, _) = syscall_unit(s);
        let units = report.and_then(|v| get(v, ptr)).map(|x| x as u64);
        SyscallCount {
            total: sum.total_calls,
            errors: sum.total_errors,
            unit,
            units,
            per_unit: per(sum.total_calls, units),
            top: sum
                .rows
                .iter()
                .take(5)
                .map(|r| SyscallRow {
                    per_unit: per(r.calls, units),
                    ..r.clone()
                })
                .collect(),
            all: sum.rows.clone(),
        }
    }
}

/// One scenario against one broker in one run.
#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    run: u32,
    scenario: &'static str,
    /// The row name: "coremq", "coremq-uring", "mosquitto", "null".
    broker: &'static str,
    /// coremq's `--io`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    io: Option<&'static str>,
    /// The loadgen command line (the broker address differs per run).
    command: Vec<String>,
    /// The broker's command line.
    broker_command: Vec<String>,
    /// loadgen's exit status: 0, or 1 when the report counts failures.
    exit_code: Option<i32>,
    /// Why there is no report (broker did not start, loadgen crashed...).
    error: Option<String>,
    /// "n/a" reason when the scenario does not apply to this broker.
    skipped: Option<String>,
    wall_s: f64,
    /// loadgen's JSON report.
    report: Option<Value>,
    /// `--syscalls`, coremq: strace's count.
    #[serde(skip_serializing_if = "Option::is_none")]
    syscalls: Option<SyscallCount>,
    /// `--syscalls`, coremq: why there is no count (the report may still be).
    #[serde(skip_serializing_if = "Option::is_none")]
    syscalls_error: Option<String>,
}

/// `loadgen compare`.
pub fn compare(a: CompareArgs) -> Result<i32> {
    let a = validate(a);
    let bins = find_bins(&a);
    // Brokers inherit this process's open-file limit: take the hard one.
    crate::sys::raise_nofile();
    let dir = std::env::temp_dir().join(format!("loadgen-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let res = run_all(&a, &bins, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// Checks the arguments; exits with a one-line usage error on the first
/// bad one.
fn validate(mut a: CompareArgs) -> CompareArgs {
    dedup(&mut a.brokers);
    dedup(&mut a.scenarios);
    dedup(&mut a.io);
    if a.brokers.is_empty() {
        usage_error("--brokers: name at least one of coremq, mosquitto, null");
    }
    // Both only change how coremq runs: without it they would silently do
    // nothing.
    if !a.brokers.contains(&Broker::Coremq) {
        if !a.io.is_empty() {
            usage_error("--io: applies to coremq, which --brokers does not name");
        }
        if a.syscalls {
            usage_error("--syscalls: counts coremq's, which --brokers does not name");
        }
    }
    if a.scenarios.is_empty() {
        usage_error("--scenarios: name at least one of churn, conn, keepalive, takeover, pubsub");
    }
    if a.runs == 0 {
        usage_error("--runs must be at least 1");
    }
    if a.shards == 0 {
        usage_error("--shards must be at least 1");
    }
    if a.conn_n == 0 {
        usage_error("--conn-n must be at least 1");
    }
    if !(a.conn_hold.is_finite() && a.conn_hold > 0.0) {
        usage_error("--conn-hold must be a positive number of seconds");
    }
    if a.churn_concurrency == 0 {
        usage_error("--churn-concurrency must be at least 1");
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        usage_error("--duration must be a positive number of seconds");
    }
    if a.pubsub_pairs == 0 {
        usage_error("--pubsub-pairs must be at least 1");
    }
    if a.pubsub_payload < crate::pubsub::HEADER {
        usage_error(format!(
            "--pubsub-payload must be at least {} bytes",
            crate::pubsub::HEADER
        ));
    }
    if !(a.pubsub_duration > 0.0 && a.pubsub_duration.is_finite()) {
        usage_error("--pubsub-duration must be a positive number of seconds");
    }
    if a.pubsub_rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        usage_error("--pubsub-rate must be a positive number per second");
    }
    if a.pubsub_slow_subscribers
        .is_some_and(|r| !(r > 0.0 && r.is_finite()))
    {
        usage_error("--pubsub-slow-subscribers must be a positive number per second");
    }
    for (flag, cpu) in [
        ("--broker-cpu", a.broker_cpu),
        ("--loadgen-cpu", a.loadgen_cpu),
    ] {
        if !cpu_allowed(cpu) {
            usage_error(format!(
                "{flag} {cpu}: not a CPU this process may run on (allowed: {})",
                allowed_cpus()
            ));
        }
    }
    for (flag, p) in [("--json", &a.json), ("--markdown", &a.markdown)] {
        if let Some(p) = p {
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
            if parent.is_some_and(|d| !d.is_dir()) {
                usage_error(format!("{flag} {}: no such directory", p.display()));
            }
        }
    }
    a
}

/// Drops repeats, keeping the first of each.
fn dedup<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::new();
    for x in v.iter() {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    *v = out;
}

/// Finds every binary the comparison runs; exits with a usage error when
/// one is missing.
fn find_bins(a: &CompareArgs) -> Bins {
    let loadgen = std::env::current_exe()
        .unwrap_or_else(|e| usage_error(format!("cannot find own executable: {e}")));
    let want = |b: Broker| a.brokers.contains(&b);
    let coremq = want(Broker::Coremq).then(|| match &a.coremq {
        Some(p) if is_executable(p) => p.clone(),
        Some(p) => usage_error(format!("--coremq {}: no such executable", p.display())),
        None => {
            let sibling = loadgen.with_file_name("coremq");
            if is_executable(&sibling) {
                sibling
            } else {
                in_path("coremq").unwrap_or_else(|| {
                    usage_error(
                        "coremq not found beside loadgen nor in PATH: run scripts/compare.sh \
                         (cargo build --release --workspace), or pass --coremq PATH",
                    )
                })
            }
        }
    });
    let mosquitto = want(Broker::Mosquitto).then(|| match &a.mosquitto {
        Some(p) if is_executable(p) => p.clone(),
        Some(p) => usage_error(format!(
            "--mosquitto {}: no such executable; run scripts/compare.sh (it installs mosquitto) \
             or pass --brokers without mosquitto",
            p.display()
        )),
        None => in_path("mosquitto")
            .or_else(|| {
                let p = PathBuf::from("/usr/sbin/mosquitto");
                is_executable(&p).then_some(p)
            })
            .unwrap_or_else(|| {
                usage_error(
                    "mosquitto not found (PATH, /usr/sbin): run scripts/compare.sh, which \
                     installs it, or pass --brokers without mosquitto (e.g. --brokers coremq,null)",
                )
            }),
    });
    let strace = a.syscalls.then(|| {
        in_path("strace")
            .or_else(|| {
                let p = PathBuf::from("/usr/bin/strace");
                is_executable(&p).then_some(p)
            })
            .unwrap_or_else(|| {
                usage_error(
                    "--syscalls: strace not found (PATH, /usr/bin): install it (apt-get install strace)",
                )
            })
    });
    Bins {
        loadgen,
        coremq,
        mosquitto,
        strace,
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn affinity_set() -> Option<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is valid; the call fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

fn cpu_allowed(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `cpu` is below CPU_SETSIZE.
    affinity_set().is_some_and(|s| unsafe { libc::CPU_ISSET(cpu, &s) })
}

fn allowed_cpus() -> String {
    let v: Vec<String> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| cpu_allowed(c))
        .map(|c| c.to_string())
        .collect();
    v.join(",")
}

/// Makes the child run on `cpu` only (set between fork and exec; threads and
/// children it starts inherit it).
fn pin(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure only fills a stack cpu_set_t and makes one syscall,
    // both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A free loopback port, never 1883 or 2024.
fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !RESERVED_PORTS.contains(&p) {
            return Ok(p);
        }
    }
    bail!("no free port on 127.0.0.1")
}

/// The broker strace started for us: its PID and, to tell it from a later
/// process that reuses the PID, its start time.
#[derive(Clone, Copy)]
struct Tracee {
    pid: u32,
    start_ticks: u64,
}

/// A broker child (or strace, with the broker its child); stopped by its
/// PID when dropped.
struct RunningBroker {
    child: Child,
    log: PathBuf,
    /// `--syscalls`: `child` is strace and this is the broker.
    tracee: Option<Tracee>,
}

impl RunningBroker {
    /// The broker's PID (not strace's), for loadgen's `--broker-pid`.
    fn pid(&self) -> u32 {
        self.tracee.map_or(self.child.id(), |t| t.pid)
    }

    /// Whether `child` exits within `limit`; reaps it when it does.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL; always reaped. Under
    /// strace: SIGINT to the broker, whose exit makes strace write its
    /// summary and exit; if it has not within 5 s, SIGINT to strace (which
    /// detaches and still writes it), then SIGKILL to both.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let Some(t) = self.tracee else {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if !self.exits_within(Duration::from_secs(3)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            return;
        };
        // strace reaps the broker just before it exits itself: check that
        // the PID still names the broker.
        if proc_start_ticks(t.pid) == Some(t.start_ticks) {
            // SAFETY: plain kill(2) on the broker strace started for us.
            unsafe { libc::kill(t.pid as libc::pid_t, libc::SIGINT) };
        }
        if self.exits_within(Duration::from_secs(5)) {
            return;
        }
        // SAFETY: plain kill(2) on our own, not yet reaped, child (strace).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        if !self.exits_within(Duration::from_secs(3)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Detached, the broker may still run; it is no longer our child's
        // child, so kill it only while its PID still names it.
        if proc_start_ticks(t.pid) == Some(t.start_ticks) {
            // SAFETY: plain kill(2) on the broker we started (checked above).
            unsafe { libc::kill(t.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A process's parent PID and start time (clock ticks since boot), from
/// /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')', at field 3 (state); ppid is field 4, starttime field 22.
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// A process's start time, to tell it from a later one with its PID.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// The child strace (`parent`) forked for the broker: a child of strace
/// that runs `exe`. strace also forks short-lived children of its own to
/// probe what ptrace can do, so a child counts only once it has exec'd the
/// broker. Waits up to 5 s.
fn traced_child(parent: u32, exe: &Path) -> Option<Tracee> {
    let exe = std::fs::canonicalize(exe).ok()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Some((ppid, start_ticks)) = proc_stat(pid) else {
                    continue;
                };
                if ppid == parent
                    && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
                {
                    return Some(Tracee { pid, start_ticks });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last 3 non-blank lines of a log, on one line.
fn tail(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(3);
    lines[from..].join(" | ")
}

/// The broker's command line on `port` (mosquitto: and its config file,
/// written to `dir`).
fn broker_command(
    v: Variant,
    bins: &Bins,
    a: &CompareArgs,
    port: u16,
    dir: &Path,
    tag: &str,
) -> Result<Vec<String>> {
    let addr = format!("127.0.0.1:{port}");
    let s = |p: &Path| p.display().to_string();
    Ok(match v.broker {
        Broker::Coremq => {
            let mut argv = vec![
                s(bins.coremq.as_deref().expect("coremq found")),
                "--listen".into(),
                addr,
                "--shards".into(),
                a.shards.to_string(),
                "--log-level".into(),
                "warn".into(),
                "--stats-interval".into(),
                "0".into(),
            ];
            if let Some(io) = v.io {
                argv.extend(["--io".to_string(), io.name().to_string()]);
            }
            argv
        }
        Broker::Mosquitto => {
            let conf = dir.join(format!("{tag}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
                     persistence false\nconnection_messages false\nlog_dest none\n"
                ),
            )
            .with_context(|| format!("write {}", conf.display()))?;
            vec![
                s(bins.mosquitto.as_deref().expect("mosquitto found")),
                "-c".into(),
                s(&conf),
            ]
        }
        Broker::Null => vec![
            s(&bins.loadgen),
            "null-broker".into(),
            "--listen".into(),
            addr,
        ],
    })
}

/// Starts the broker pinned to `cpu` and waits until it accepts TCP.
/// `traced`: `argv` starts strace, which starts the broker (pinned too,
/// as strace's child), the binary after `--`.
fn start_broker(
    argv: &[String],
    port: u16,
    cpu: usize,
    log: PathBuf,
    traced: bool,
) -> Result<RunningBroker> {
    let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    pin(&mut cmd, cpu);
    let child = cmd.spawn().with_context(|| format!("start {}", argv[0]))?;
    let mut rb = RunningBroker {
        child,
        log,
        tracee: None,
    };
    if traced {
        let exe = argv
            .iter()
            .position(|x| x == "--")
            .and_then(|i| argv.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_default();
        match traced_child(rb.child.id(), &exe) {
            Some(t) => rb.tracee = Some(t),
            None => {
                rb.stop();
                bail!(
                    "{} started no broker within 5 s: {}",
                    argv[0],
                    tail(&rb.log)
                );
            }
        }
    }
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = rb.child.try_wait() {
            bail!("{} exited at start ({st}): {}", argv[0], tail(&rb.log));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            rb.stop();
            bail!(
                "{} did not accept on {addr} within 10 s: {}",
                argv[0],
                tail(&rb.log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let start-up work settle before the "before" sample.
    std::thread::sleep(Duration::from_millis(300));
    Ok(rb)
}

/// The loadgen arguments of a scenario against a broker (without -b, pid,
/// json, quiet), or why it does not apply, and the scenario's wall-clock bound.
fn scenario_args(s: Scenario, b: Broker, a: &CompareArgs) -> (Result<Vec<String>, String>, f64) {
    let v = |x: &[&str]| Ok(x.iter().map(|s| s.to_string()).collect());
    match s {
        Scenario::Churn => (
            v(&[
                "churn",
                "-c",
                &a.churn_concurrency.to_string(),
                "--duration",
                &a.duration.to_string(),
            ]),
            a.duration + 60.0,
        ),
        Scenario::Conn => (
            v(&[
                "conn",
                "-n",
                &a.conn_n.to_string(),
                "--hold",
                &a.conn_hold.to_string(),
                "--keepalive",
                &a.conn_keepalive.to_string(),
            ]),
            a.conn_hold + 120.0 + f64::from(a.conn_n) / 500.0,
        ),
        // The null broker neither closes silent clients nor publishes wills
        // (nor answers SUBSCRIBE): the same pinging load as `conn`, for the
        // ping figures only.
        Scenario::Keepalive if b == Broker::Null => (
            v(&[
                "conn",
                "-n",
                &KA_N.to_string(),
                "--hold",
                &keepalive_hold().to_string(),
                "--keepalive",
                &KA_K.to_string(),
            ]),
            keepalive_hold() + 60.0,
        ),
        Scenario::Keepalive => (
            v(&[
                "keepalive",
                "-n",
                &KA_N.to_string(),
                "--silent",
                &KA_SILENT.to_string(),
                "--keepalive",
                &KA_K.to_string(),
            ]),
            keepalive_hold() + 60.0,
        ),
        Scenario::Takeover if b == Broker::Null => {
            (Err("n/a: the null broker has no takeover".into()), 0.0)
        }
        Scenario::Pubsub if b == Broker::Null => {
            (Err("n/a: the null broker routes no messages".into()), 0.0)
        }
        // Publishing, then up to loadgen's drain and its timeouts, plus
        // connecting 2 × pairs sockets.
        Scenario::Pubsub => (
            Ok(pubsub_args(a)),
            a.pubsub_duration + 60.0 + slow_drain(a) + f64::from(a.pubsub_pairs) / 250.0,
        ),
        Scenario::Takeover => (
            v(&[
                "takeover",
                "-n",
                &TO_N.to_string(),
                "--rate",
                &TO_RATE.to_string(),
                "--duration",
                &TO_DURATION.to_string(),
            ]),
            TO_DURATION + 60.0,
        ),
    }
}

/// pubsub's command line (without -b, pid, json, quiet, source-skip).
fn pubsub_args(a: &CompareArgs) -> Vec<String> {
    let mut v: Vec<String> = [
        "pubsub",
        "--pairs",
        &a.pubsub_pairs.to_string(),
        "--qos",
        &a.pubsub_qos.to_string(),
        "--payload",
        &a.pubsub_payload.to_string(),
        "--duration",
        &a.pubsub_duration.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(r) = a.pubsub_rate {
        v.extend(["--rate".to_string(), r.to_string()]);
    }
    if let Some(r) = a.pubsub_slow_subscribers {
        v.extend(["--slow-subscribers".to_string(), r.to_string()]);
        v.extend(["--timeout".to_string(), slow_drain(a).to_string()]);
    }
    v
}

/// `--pubsub-slow-subscribers R`: the drain a full queue needs — both
/// brokers' default 1,000 queued plus 20 in flight and the publisher's
/// window, acknowledged at R a second — plus 5 s.
fn slow_drain(a: &CompareArgs) -> f64 {
    a.pubsub_slow_subscribers
        .map_or(0.0, |r| (1_100.0 / r + 5.0).ceil())
}

/// loadgen keepalive's default hold: ⌈1.5 K⌉ + 3 s.
fn keepalive_hold() -> f64 {
    (1.5 * f64::from(KA_K)).ceil() + 3.0
}

/// The line above a scenario's table: the loadgen command and what the
/// figures mean.
fn scenario_caption(s: Scenario, a: &CompareArgs) -> String {
    match s {
        Scenario::Churn => format!(
            "churn: `loadgen churn -c {} --duration {}` (cycle = connect → CONNACK → DISCONNECT → broker's close)",
            a.churn_concurrency, a.duration
        ),
        Scenario::Conn => format!(
            "conn: `loadgen conn -n {} --hold {} --keepalive {}` (no --rate: 512 handshakes in flight; \
             kernel slab B/conn = growth of /proc/meminfo Slab: from before the connects to the end of the hold ÷ connections held, \
             machine-wide: loadgen's client sockets are in it too)",
            a.conn_n, a.conn_hold, a.conn_keepalive
        ),
        Scenario::Keepalive => format!(
            "keepalive: `loadgen keepalive -n {KA_N} --silent {KA_SILENT} --keepalive {KA_K}` \
             (null: `loadgen conn -n {KA_N} --hold {} --keepalive {KA_K}`, pings only; it never closes silent clients)",
            keepalive_hold()
        ),
        Scenario::Takeover => format!(
            "takeover: `loadgen takeover -n {TO_N} --rate {TO_RATE} --duration {TO_DURATION}` (null: n/a, it has no takeover)"
        ),
        Scenario::Pubsub => format!(
            "pubsub: `loadgen {}` (deliveries/s in the publishing window; e2e = PUBLISH written → received by the subscriber; CPU per delivered message; null: n/a, it routes nothing)",
            pubsub_args(a).join(" ")
        ),
    }
}

/// `argv` under `strace -f -c -o summary`: every thread's system calls
/// counted, the table written to `summary` when the broker exits.
fn straced(strace: &Path, summary: &Path, argv: Vec<String>) -> Vec<String> {
    let mut v = vec![
        strace.display().to_string(),
        "-f".into(),
        "-c".into(),
        "-o".into(),
        summary.display().to_string(),
        "--".into(),
    ];
    v.extend(argv);
    v
}

/// Runs loadgen pinned to `cpu`; returns its exit code and JSON report.
fn run_loadgen(
    bins: &Bins,
    argv: &[String],
    cpu: usize,
    limit: Duration,
    json_path: &Path,
    log: &Path,
) -> Result<(i32, Value)> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&bins.loadgen);
    cmd.args(argv).stdin(Stdio::null()).stdout(out).stderr(err);
    pin(&mut cmd, cpu);
    let mut child = cmd.spawn().context("start loadgen")?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("loadgen ran past {} s and was killed", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let code = status.code().unwrap_or(-1);
    if code != 0 && code != 1 {
        bail!("loadgen exited with {status}: {}", tail(log));
    }
    let text = std::fs::read_to_string(json_path)
        .map_err(|e| anyhow!("loadgen wrote no report ({e}): {}", tail(log)))?;
    let v: Value = serde_json::from_str(&text).context("loadgen's JSON report")?;
    Ok((code, v))
}

/// One scenario against one broker: fresh broker, loadgen, broker stopped
/// (and, under strace, its system calls counted).
fn run_one(
    a: &CompareArgs,
    bins: &Bins,
    dir: &Path,
    run: u32,
    s: Scenario,
    v: Variant,
    step: u32,
) -> RunResult {
    let mut r = RunResult {
        run,
        scenario: s.name(),
        broker: v.name(),
        io: v.io.map(IoMode::name),
        command: Vec::new(),
        broker_command: Vec::new(),
        exit_code: None,
        error: None,
        skipped: None,
        wall_s: 0.0,
        report: None,
        syscalls: None,
        syscalls_error: None,
    };
    let traced = traced(a, v);
    let (args, bound) = scenario_args(s, v.broker, a);
    let args = match args {
        Ok(v) => v,
        Err(why) => {
            r.skipped = Some(why);
            return r;
        }
    };
    let t0 = Instant::now();
    let tag = format!("r{run}-{}-{}", s.name(), v.name());
    let summary = dir.join(format!("{tag}.strace"));
    let res = (|| -> Result<(i32, Value)> {
        let port = free_port()?;
        let mut argv = broker_command(v, bins, a, port, dir, &tag)?;
        if traced {
            argv = straced(
                bins.strace.as_deref().expect("strace found"),
                &summary,
                argv,
            );
        }
        r.broker_command = argv;
        let mut broker = start_broker(
            &r.broker_command,
            port,
            a.broker_cpu,
            dir.join(format!("{tag}.broker.log")),
            traced,
        )?;
        let json_path = dir.join(format!("{tag}.json"));
        let mut argv = args.clone();
        argv.extend([
            "-b".to_string(),
            format!("127.0.0.1:{port}"),
            "--broker-pid".to_string(),
            broker.pid().to_string(),
            "--json".to_string(),
            json_path.display().to_string(),
            "--quiet".to_string(),
            // Fresh source addresses for every run: a churn run leaves
            // ~100,000 sockets in TIME_WAIT for a minute, and connects from
            // addresses whose ports they hold slowed to ~3,500/s for every
            // broker alike (520 us per connect() in the kernel's port search).
            "--source-skip".to_string(),
            (step * SOURCE_IPS_PER_RUN).to_string(),
        ]);
        r.command = std::iter::once("loadgen".to_string())
            .chain(argv.iter().cloned())
            .collect();
        let out = run_loadgen(
            bins,
            &argv,
            a.loadgen_cpu,
            Duration::from_secs_f64(bound),
            &json_path,
            &dir.join(format!("{tag}.loadgen.log")),
        );
        broker.stop();
        out
    })();
    r.wall_s = (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    match res {
        Ok((code, v)) => {
            r.exit_code = Some(code);
            r.report = Some(v);
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    // strace wrote its summary when the broker stopped (above).
    if traced && r.report.is_some() {
        let sum = std::fs::read_to_string(&summary)
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_strace_summary(&t));
        match sum {
            Ok(sum) => r.syscalls = Some(SyscallCount::of(&sum, s, r.report.as_ref())),
            Err(e) => r.syscalls_error = Some(format!("strace summary: {e:#}")),
        }
    }
    r
}

/// Whether this variant runs under strace: coremq with `--syscalls`.
fn traced(a: &CompareArgs, v: Variant) -> bool {
    a.syscalls && v.broker == Broker::Coremq
}

/// Every round, scenario and broker; then the tables, Markdown and JSON.
fn run_all(a: &CompareArgs, bins: &Bins, dir: &Path) -> Result<i32> {
    let ctx_start = context_start(a, bins);
    let vs = variants(&a.brokers, &a.io);
    let total = a.runs as usize * a.scenarios.len() * vs.len();
    let mut results: Vec<RunResult> = Vec::new();
    let mut step = 0;
    for run in 1..=a.runs {
        for &s in &a.scenarios {
            for &v in &vs {
                step += 1;
                let r = run_one(a, bins, dir, run, s, v, step as u32);
                eprintln!(
                    "[{step:>2}/{total}] run {run} {:<9} {:<12} {}",
                    s.name(),
                    v.name(),
                    progress_line(s, &r)
                );
                results.push(r);
            }
        }
    }
    let loadavg_end = loadavg();
    let mut ctx = ctx_start;
    ctx.insert("loadavg_end".into(), json!(loadavg_end));

    let med = medians(a, &vs, &results);
    let text = render(a, &ctx, &results, &med, false);
    print!("{text}");
    if let Some(p) = &a.markdown {
        let md = render(a, &ctx, &results, &med, true);
        std::fs::write(p, md).with_context(|| format!("write {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        let doc = json!({
            "context": ctx,
            "args": {
                "brokers": a.brokers.iter().map(|b| b.name()).collect::<Vec<_>>(),
                "scenarios": a.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
                "runs": a.runs, "shards": a.shards, "broker_cpu": a.broker_cpu,
                "loadgen_cpu": a.loadgen_cpu, "conn_n": a.conn_n,
                "churn_concurrency": a.churn_concurrency, "duration": a.duration,
                "pubsub_pairs": a.pubsub_pairs, "pubsub_qos": a.pubsub_qos,
                "pubsub_payload": a.pubsub_payload, "pubsub_duration": a.pubsub_duration,
                "pubsub_rate": a.pubsub_rate,
                "pubsub_slow_subscribers": a.pubsub_slow_subscribers,
                "io": a.io.iter().map(|m| m.name()).collect::<Vec<_>>(),
                "syscalls": a.syscalls,
                "variants": vs.iter().map(|v| v.name()).collect::<Vec<_>>(),
            },
            "medians": med_json(&med),
            "runs": results,
        });
        let s = serde_json::to_string_pretty(&doc)? + "\n";
        std::fs::write(p, s).with_context(|| format!("write {}", p.display()))?;
    }
    let errors = results.iter().filter(|r| r.error.is_some()).count();
    if errors > 0 {
        eprintln!("loadgen: compare: {errors} of {total} runs produced no report (see above)");
        return Ok(1);
    }
    // --syscalls asked for the count: a run without it did not do its job.
    let uncounted = results
        .iter()
        .filter(|r| r.syscalls_error.is_some())
        .count();
    if uncounted > 0 {
        eprintln!(
            "loadgen: compare: {uncounted} run(s) under strace gave no syscall count (see above)"
        );
        return Ok(1);
    }
    Ok(0)
}

/// The progress line of one run, for stderr.
fn progress_line(s: Scenario, r: &RunResult) -> String {
    if let Some(why) = &r.skipped {
        return why.clone();
    }
    if let Some(e) = &r.error {
        return format!("ERROR: {e}");
    }
    let Some(v) = &r.report else {
        return String::new();
    };
    let first = &metrics(s)[0];
    let fig = get(v, first.ptr)
        .map(|x| show(x, first.fmt))
        .unwrap_or_else(|| "-".into());
    let sys = match (&r.syscalls, &r.syscalls_error) {
        (Some(c), _) => format!(
            ", {} syscalls/{}",
            c.per_unit
                .map(|x| show(x, Fmt::F2))
                .unwrap_or_else(|| "-".into()),
            c.unit
        ),
        (None, Some(e)) => format!(", syscalls: ERROR: {e}"),
        (None, None) => String::new(),
    };
    format!(
        "{} {fig}, failures {}{}{sys}  ({:.1} s)",
        first.head,
        get(v, "/failed_total").unwrap_or(0.0),
        if bound(v) { ", LOADGEN-BOUND" } else { "" },
        r.wall_s
    )
}

/// A run's figure for a column: from loadgen's report, or strace's count.
fn value(r: &RunResult, mt: &Metric) -> Option<f64> {
    match mt.src {
        Src::Report => r.report.as_ref().and_then(|v| get(v, mt.ptr)),
        Src::Syscalls => r.syscalls.as_ref().and_then(|c| c.per_unit),
    }
}

/// A number in a JSON document, by JSON pointer.
fn get(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr).and_then(Value::as_f64)
}

/// Whether loadgen flagged itself as the bottleneck.
fn bound(v: &Value) -> bool {
    v.pointer("/loadgen/loadgen_bound")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Medians and counts of one broker in one scenario.
#[derive(Default)]
struct Cell {
    /// Runs with a report.
    ok: usize,
    /// Runs without one.
    errors: usize,
    skipped: Option<String>,
    /// Metric key → median.
    median: BTreeMap<&'static str, f64>,
    /// Metric key → per-run values.
    values: BTreeMap<&'static str, Vec<f64>>,
    failures: u64,
    bound_runs: usize,
    /// Ran under strace (`--syscalls`): CPU figures left out.
    traced: bool,
    /// Under strace: the 5 syscalls with the most calls, as calls per unit
    /// over all runs pooled (Σ calls ÷ Σ units).
    syscalls_top: Vec<(String, f64)>,
}

type Medians = BTreeMap<(Scenario, Variant), Cell>;

/// The median; the mean of the middle two for an even count.
fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Every (scenario, broker) cell: medians over the runs, per column.
fn medians(a: &CompareArgs, vs: &[Variant], results: &[RunResult]) -> Medians {
    let mut out = Medians::new();
    for &s in &a.scenarios {
        for &b in vs {
            let mut c = Cell {
                traced: traced(a, b),
                ..Cell::default()
            };
            let mut pooled: BTreeMap<&str, u64> = BTreeMap::new();
            let mut pooled_units = 0u64;
            for r in results
                .iter()
                .filter(|r| r.scenario == s.name() && r.broker == b.name())
            {
                if let Some(why) = &r.skipped {
                    c.skipped = Some(why.clone());
                    continue;
                }
                let Some(v) = &r.report else {
                    c.errors += 1;
                    continue;
                };
                c.ok += 1;
                c.failures += get(v, "/failed_total").unwrap_or(0.0) as u64;
                c.bound_runs += usize::from(bound(v));
                for mt in columns(s, a) {
                    if (b.broker == Broker::Null && mt.null_na) || (c.traced && mt.cpu) {
                        continue;
                    }
                    if let Some(x) = value(r, mt) {
                        c.values.entry(mt.key).or_default().push(x);
                    }
                }
                if let Some(sc) = r.syscalls.as_ref().filter(|sc| sc.units.is_some()) {
                    pooled_units += sc.units.unwrap_or(0);
                    for row in &sc.all {
                        *pooled.entry(row.name.as_str()).or_default() += row.calls;
                    }
                }
            }
            for (k, vals) in &c.values {
                if let Some(x) = median(vals) {
                    c.median.insert(k, x);
                }
            }
            let mut top: Vec<(&str, u64)> = pooled.into_iter().collect();
            top.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(y.0)));
            c.syscalls_top = top
                .into_iter()
                .take(5)
                .filter_map(|(name, n)| Some((name.to_string(), per(n, Some(pooled_units))?)))
                .collect();
            out.insert((s, b), c);
        }
    }
    out
}

/// The medians as JSON: scenario → broker → column key → median.
fn med_json(med: &Medians) -> Value {
    let mut o = serde_json::Map::new();
    for ((s, b), c) in med {
        let e = o
            .entry(s.name())
            .or_insert_with(|| Value::Object(Default::default()));
        let mut m = serde_json::Map::new();
        for (k, v) in &c.median {
            m.insert(k.to_string(), json!(v));
        }
        m.insert("runs_ok".into(), json!(c.ok));
        m.insert("runs_failed_to_report".into(), json!(c.errors));
        m.insert("failures_all_runs".into(), json!(c.failures));
        m.insert("loadgen_bound_runs".into(), json!(c.bound_runs));
        if let Some(why) = &c.skipped {
            m.insert("skipped".into(), json!(why));
        }
        if c.traced {
            m.insert(
                "under_strace".into(),
                json!("CPU figures left out; rates and latencies slowed by strace"),
            );
            let top: Vec<Value> = c
                .syscalls_top
                .iter()
                .map(|(name, x)| json!({ "name": name, "per_unit": x }))
                .collect();
            m.insert("syscalls_top5_pooled".into(), Value::Array(top));
        }
        if let Value::Object(e) = e {
            e.insert(b.name().to_string(), Value::Object(m));
        }
    }
    Value::Object(o)
}

/// An integer with thousands separators.
fn thousands(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A figure as its column shows it.
fn show(x: f64, f: Fmt) -> String {
    match f {
        Fmt::Int => thousands(x.round() as i64),
        Fmt::Us => crate::report::fmt_us(x.round().max(0.0) as u64),
        Fmt::F1 => format!("{x:.1}"),
        Fmt::F2 => format!("{x:.2}"),
        Fmt::Mib => format!("{:.1}", x / 1048576.0),
        Fmt::Pct => format!("{x}%"),
    }
}

/// Lays out rows as an aligned text table (first column left-aligned) or a
/// Markdown table.
fn table(rows: &[Vec<String>], markdown: bool) -> String {
    let mut o = String::new();
    if markdown {
        for (i, r) in rows.iter().enumerate() {
            let _ = writeln!(o, "| {} |", r.join(" | "));
            if i == 0 {
                let _ = writeln!(o, "|{}", "---|".repeat(r.len()));
            }
        }
        return o;
    }
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut w = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::from("  ");
        for (i, c) in r.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i == 0 {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            }
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    o
}

/// The report: the context, then per scenario its table, its ratios and
/// (`--syscalls`) coremq's top syscalls; as aligned text or as Markdown.
fn render(
    a: &CompareArgs,
    ctx: &serde_json::Map<String, Value>,
    results: &[RunResult],
    med: &Medians,
    md: bool,
) -> String {
    let mut o = String::new();
    let c = |k: &str| {
        ctx.get(k)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    };
    let context: Vec<(&str, String)> = vec![
        ("commit", c("commit")),
        ("coremq", c("coremq")),
        ("mosquitto", c("mosquitto")),
        ("loadgen", c("loadgen")),
        ("kernel", c("kernel")),
        ("cpu", c("cpu")),
        ("shards", c("shards")),
        ("syscalls", c("syscalls")),
        ("pinning", c("pinning")),
        ("runs", c("runs")),
        ("date", c("date")),
        (
            "loadavg",
            format!("start {}  end {}", c("loadavg_start"), c("loadavg_end")),
        ),
    ];
    if md {
        let _ = writeln!(o, "## Broker comparison ({})\n", c("date"));
        let _ = writeln!(
            o,
            "`loadgen compare` (rerun: `scripts/compare.sh`). Medians over runs, taken per column, so a row's figures may come from different runs.\n"
        );
        for (k, v) in &context {
            if !v.is_empty() {
                let _ = writeln!(o, "- **{k}**: {v}");
            }
        }
        let _ = writeln!(o);
    } else {
        let _ = writeln!(o, "loadgen compare: {}", c("brokers"));
        for (k, v) in &context {
            if !v.is_empty() {
                let _ = writeln!(o, "  {k:<10} {v}");
            }
        }
        let _ = writeln!(o);
    }

    let vs = variants(&a.brokers, &a.io);
    let pairs = ratio_pairs(&vs, &a.io);
    for &s in &a.scenarios {
        let ms = columns(s, a);
        let caption = scenario_caption(s, a);
        if md {
            let _ = writeln!(o, "### {caption}\n");
        } else {
            let _ = writeln!(o, "{}", caption.replace('`', ""));
        }
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut head = vec!["broker".to_string()];
        for (i, mt) in ms.iter().enumerate() {
            head.push(mt.head.to_string());
            if i == 0 && a.runs > 1 {
                head.push("(runs)".into());
            }
        }
        head.push("failures".into());
        head.push("loadgen-bound".into());
        rows.push(head);
        for &b in &vs {
            let cell = &med[&(s, b)];
            let mut row = vec![if md {
                format!("**{}**", b.name())
            } else {
                b.name().to_string()
            }];
            if let Some(why) = &cell.skipped {
                row.push(why.clone());
                rows.push(row);
                continue;
            }
            if cell.ok == 0 {
                row.push(format!("no report ({} error(s))", cell.errors));
                rows.push(row);
                continue;
            }
            for (i, mt) in ms.iter().enumerate() {
                let v = if b.broker == Broker::Null && mt.null_na {
                    "n/a".to_string()
                } else if mt.src == Src::Syscalls && !cell.traced {
                    // Only coremq runs under strace.
                    "n/a".to_string()
                } else if mt.cpu && cell.traced {
                    "(strace)".to_string()
                } else {
                    cell.median
                        .get(mt.key)
                        .map(|&x| show(x, mt.fmt))
                        .unwrap_or_else(|| "-".into())
                };
                row.push(v);
                if i == 0 && a.runs > 1 {
                    let runs: Vec<String> = results
                        .iter()
                        .filter(|r| r.scenario == s.name() && r.broker == b.name())
                        .map(|r| {
                            value(r, mt)
                                .map(|x| show(x, mt.fmt))
                                .unwrap_or_else(|| "err".into())
                        })
                        .collect();
                    row.push(runs.join(if md { " · " } else { " " }));
                }
            }
            let mut f = cell.failures.to_string();
            if cell.errors > 0 {
                f.push_str(&format!(" +{} no report", cell.errors));
            }
            row.push(f);
            row.push(format!("{}/{}", cell.bound_runs, cell.ok));
            rows.push(row);
        }
        o.push_str(&table(&rows, md));
        if md {
            let _ = writeln!(o);
        }

        // Ratios of the medians: each coremq ÷ the others, and between
        // coremq's loops.
        if !pairs.is_empty() {
            let mut rr: Vec<Vec<String>> = Vec::new();
            let mut h = vec!["ratio".to_string()];
            h.extend(pairs.iter().map(|(_, _, label)| label.clone()));
            rr.push(h);
            for mt in ms.iter().filter(|mt| mt.ratio != Ratio::None) {
                // With --io the pairs are not all coremq ÷ another broker.
                let who = if a.io.is_empty() { "coremq" } else { "first" };
                let mut row = vec![format!(
                    "{} ({})",
                    mt.head,
                    if mt.ratio == Ratio::Rate {
                        format!("higher: {who} faster")
                    } else {
                        format!("lower: {who} cheaper")
                    }
                )];
                for &(x, y, _) in &pairs {
                    row.push(ratio_cell(mt, x, &med[&(s, x)], y, &med[&(s, y)]));
                }
                rr.push(row);
            }
            o.push_str(&table(&rr, md));
        }

        // Which syscalls coremq's count is made of.
        if a.syscalls {
            let unit = syscall_unit(s).1;
            if md {
                let _ = writeln!(o);
            }
            for &b in vs.iter().filter(|v| v.broker == Broker::Coremq) {
                let top = &med[&(s, b)].syscalls_top;
                if top.is_empty() {
                    continue;
                }
                let list: Vec<String> = top
                    .iter()
                    .map(|(name, x)| {
                        if md {
                            format!("`{name}` {}", show(*x, Fmt::F2))
                        } else {
                            format!("{name} {}", show(*x, Fmt::F2))
                        }
                    })
                    .collect();
                if md {
                    let _ = writeln!(
                        o,
                        "- **{}** syscalls per {unit}, top 5 (all runs pooled): {}",
                        b.name(),
                        list.join(", ")
                    );
                } else {
                    let _ = writeln!(
                        o,
                        "  {} syscalls per {unit}, top 5 (all runs pooled): {}",
                        b.name(),
                        list.join(", ")
                    );
                }
            }
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "{}",
        if md {
            "Broker CPU comes in 10 ms ticks; loadgen-bound = runs where loadgen, not the broker, set the pace (k/n); failures summed over all runs."
        } else {
            "Medians over runs (per column). Broker CPU comes in 10 ms ticks; loadgen-bound = runs flagged LOADGEN-BOUND (k/n); failures summed over all runs."
        }
    );
    if a.syscalls {
        let _ = writeln!(
            o,
            "{}coremq ran under strace: its CPU reads (strace), its rates and latencies are slowed by strace (their ratios read (strace)); syscalls per unit count every call of every thread from the broker's start to its stop, start-up and shutdown included. Compare speed and CPU from a run without --syscalls.",
            if md { "\n" } else { "" }
        );
    }
    o
}

/// The ratio columns: each coremq row ÷ mosquitto and ÷ null (those
/// compared), then uring/epoll and the other pairs of `--io` loops.
fn ratio_pairs(vs: &[Variant], io: &[IoMode]) -> Vec<(Variant, Variant, String)> {
    let others: Vec<Variant> = [Broker::Mosquitto, Broker::Null]
        .into_iter()
        .filter_map(|b| vs.iter().copied().find(|v| v.broker == b))
        .collect();
    let mut out = Vec::new();
    for &x in vs.iter().filter(|v| v.broker == Broker::Coremq) {
        for &y in &others {
            out.push((x, y, format!("{}/{}", x.name(), y.name())));
        }
    }
    for (p, q) in io_pairs(io) {
        let v = |m| Variant {
            broker: Broker::Coremq,
            io: Some(m),
        };
        out.push((v(p), v(q), format!("{}/{}", p.name(), q.name())));
    }
    out
}

/// One ratio: x's median ÷ y's, or why there is none.
fn ratio_cell(mt: &Metric, x: Variant, cx: &Cell, y: Variant, cy: &Cell) -> String {
    let null = x.broker == Broker::Null || y.broker == Broker::Null;
    if cx.skipped.is_some() || cy.skipped.is_some() || (null && mt.null_na) {
        return "n/a".into();
    }
    if mt.src == Src::Syscalls && !(cx.traced && cy.traced) {
        return "n/a".into();
    }
    // strace slows the broker's every system call: its CPU and its speed
    // say more about strace than about the broker.
    if (mt.cpu || mt.ratio == Ratio::Rate) && (cx.traced || cy.traced) {
        return "(strace)".into();
    }
    match (cx.median.get(mt.key), cy.median.get(mt.key)) {
        (Some(&p), Some(&q)) if q > 0.0 => format!("{:.2}×", p / q),
        _ => "-".to_string(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn first_line_of(cmd: &Path, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn git_commit() -> String {
    let git = |dir: &Path, args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in [cwd, built] {
        if let Some(c) = git(&dir, &["rev-parse", "--short", "HEAD"]) {
            let dirty = git(&dir, &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            return if dirty { format!("{c} (dirty)") } else { c };
        }
    }
    "unknown".into()
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let online = info.lines().filter(|l| l.starts_with("processor")).count();
    format!(
        "{model}, {online} CPU(s) online, {} usable here",
        crate::sys::affinity_cpus()
    )
}

/// The context's "shards" line: coremq's flags, with `--io` the loop of
/// each coremq row.
fn shards_context(a: &CompareArgs) -> String {
    let mut s = format!("coremq --shards {}", a.shards);
    if !a.io.is_empty() {
        let each: Vec<String> =
            a.io.iter()
                .map(|&m| {
                    let v = Variant {
                        broker: Broker::Coremq,
                        io: Some(m),
                    };
                    format!("{} = --io {}", v.name(), m.name())
                })
                .collect();
        let _ = write!(s, "; one coremq per socket loop: {}", each.join(", "));
    }
    s
}

/// UTC date and time of a Unix timestamp, ISO 8601.
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What the reader needs to weigh the figures: versions, machine, method.
fn context_start(a: &CompareArgs, bins: &Bins) -> serde_json::Map<String, Value> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let vs = variants(&a.brokers, &a.io);
    let names = |sep: &str| vs.iter().map(|v| v.name()).collect::<Vec<_>>().join(sep);
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), Value::String(v));
    };
    put("brokers", names(" vs "));
    put("commit", git_commit());
    if let Some(p) = &bins.coremq {
        put(
            "coremq",
            format!("{} ({})", first_line_of(p, &["--version"]), p.display()),
        );
    }
    if let Some(p) = &bins.mosquitto {
        put(
            "mosquitto",
            format!(
                "{} ({}); listener on 127.0.0.1, allow_anonymous true, max_connections -1, \
                 persistence false, connection_messages false, log_dest none",
                first_line_of(p, &["-h"]),
                p.display()
            ),
        );
    }
    put(
        "loadgen",
        format!(
            "loadgen {} ({})",
            env!("CARGO_PKG_VERSION"),
            bins.loadgen.display()
        ),
    );
    put("kernel", crate::sys::kernel());
    put("cpu", cpu_model());
    put("shards", shards_context(a));
    if let Some(p) = &bins.strace {
        put(
            "syscalls",
            format!(
                "coremq under `strace -f -c` ({}): every system call of every thread from the broker's start to its stop, \
                 ÷ the scenario's unit (churn: cycle; conn: connection, connect to disconnect; keepalive: ping; \
                 takeover: takeover; pubsub: delivered message); coremq's CPU figures are left out and its rates \
                 and latencies are slowed by strace",
                first_line_of(p, &["-V"])
            ),
        );
    }
    put(
        "pinning",
        format!(
            "broker on CPU {}, loadgen (coordinator and workers) on CPU {} (sched_setaffinity)",
            a.broker_cpu, a.loadgen_cpu
        ),
    );
    put(
        "runs",
        format!(
            "{} round(s); in each, every scenario against {} in turn, a fresh broker each time",
            a.runs,
            names(" → ")
        ),
    );
    put("date", utc(now));
    put("loadavg_start", loadavg());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59 UTC");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(12829), "12,829");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    /// `strace -f -c -o FILE -- true`, strace 6.1.
    const STRACE_TRUE: &str = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
  0.00    0.000000           0         1           read
  0.00    0.000000           0         2           close
  0.00    0.000000           0         8           mmap
  0.00    0.000000           0         3           mprotect
  0.00    0.000000           0         1           munmap
  0.00    0.000000           0         1           brk
  0.00    0.000000           0         2           pread64
  0.00    0.000000           0         1         1 access
  0.00    0.000000           0         1           execve
  0.00    0.000000           0         1           arch_prctl
  0.00    0.000000           0         1           set_tid_address
  0.00    0.000000           0         2           openat
  0.00    0.000000           0         2           newfstatat
  0.00    0.000000           0         1           set_robust_list
  0.00    0.000000           0         1           prlimit64
  0.00    0.000000           0         1           rseq
------ ----------- ----------- --------- --------- ----------------
100.00    0.000000           0        29         1 total
";

    #[test]
    fn strace_summary_of_true_parses_rows_and_total() {
        let sum = parse_strace_summary(STRACE_TRUE).unwrap();
        assert_eq!(sum.total_calls, 29);
        assert_eq!(sum.total_errors, 1);
        assert_eq!(sum.rows.len(), 16);
        assert_eq!(sum.rows.iter().map(|r| r.calls).sum::<u64>(), 29);
        // Most calls first; ties by name.
        let names: Vec<&str> = sum.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            &names[..5],
            &["mmap", "mprotect", "close", "newfstatat", "openat"]
        );
        let access = sum.rows.iter().find(|r| r.name == "access").unwrap();
        assert_eq!((access.calls, access.errors), (1, 1));
    }

    #[test]
    fn strace_summary_without_usecs_on_total_and_with_two_personalities() {
        // Older straces leave usecs/call empty on the total line; a 32-bit
        // child adds a second table; restart_syscall is a row, not a header.
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 60.00    0.000600           2       300        12 io_uring_enter
 40.00    0.000400           4       100           restart_syscall
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000                   400        12 total
System call usage summary for 32 bit mode:
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
100.00    0.000010          10         1           restart_syscall
------ ----------- ----------- --------- --------- ----------------
100.00    0.000010                     1           total
";
        let sum = parse_strace_summary(text).unwrap();
        assert_eq!((sum.total_calls, sum.total_errors), (401, 12));
        assert_eq!(
            sum.rows,
            vec![
                SyscallRow {
                    name: "io_uring_enter".into(),
                    calls: 300,
                    errors: 12,
                    per_unit: None
                },
                SyscallRow {
                    name: "restart_syscall".into(),
                    calls: 101,
                    errors: 0,
                    per_unit: None
                },
            ]
        );
    }

    #[test]
    fn strace_summary_without_a_table_is_an_error() {
        assert!(parse_strace_summary("").is_err());
        assert!(parse_strace_summary("strace: exec: No such file or directory\n").is_err());
        // Cut short before the total line.
        let cut: String = STRACE_TRUE
            .lines()
            .take(5)
            .map(|l| l.to_string() + "\n")
            .collect();
        assert!(parse_strace_summary(&cut).is_err());
    }

    #[test]
    fn syscall_count_divides_by_the_scenarios_unit() {
        let sum = parse_strace_summary(STRACE_TRUE).unwrap();
        let report = json!({ "cycles": 4, "connected": 2, "pubsub": { "delivered": 29 } });
        let c = SyscallCount::of(&sum, Scenario::Churn, Some(&report));
        assert_eq!(
            (c.unit, c.units, c.per_unit),
            ("cycle", Some(4), Some(7.25))
        );
        assert_eq!(c.top.len(), 5);
        assert_eq!(c.top[0].name, "mmap");
        assert_eq!(c.top[0].per_unit, Some(2.0));
        let c = SyscallCount::of(&sum, Scenario::Pubsub, Some(&report));
        assert_eq!((c.unit, c.per_unit), ("delivered message", Some(1.0)));
        // No report, or a zero count: no figure rather than infinity.
        let c = SyscallCount::of(&sum, Scenario::Keepalive, Some(&json!({ "pings": 0 })));
        assert_eq!(c.per_unit, None);
        assert_eq!(SyscallCount::of(&sum, Scenario::Conn, None).per_unit, None);
    }

    #[test]
    fn io_list_expands_coremq_in_place_and_in_order() {
        use Broker::*;
        let names = |b: &[Broker], io: &[IoMode]| -> Vec<&str> {
            variants(b, io).into_iter().map(Variant::name).collect()
        };
        assert_eq!(
            names(&[Coremq, Mosquitto, Null], &[]),
            ["coremq", "mosquitto", "null"]
        );
        assert_eq!(
            names(&[Coremq, Mosquitto, Null], &[IoMode::Uring, IoMode::Epoll]),
            ["coremq-uring", "coremq-epoll", "mosquitto", "null"]
        );
        assert_eq!(
            names(&[Mosquitto, Coremq], &[IoMode::Epoll, IoMode::Auto]),
            ["mosquitto", "coremq-epoll", "coremq-auto"]
        );
        assert_eq!(names(&[Null], &[IoMode::Uring]), ["null"]);
    }

    #[test]
    fn io_pairs_read_uring_over_epoll_whatever_the_order() {
        use IoMode::*;
        assert_eq!(io_pairs(&[Epoll, Uring]), [(Uring, Epoll)]);
        assert_eq!(io_pairs(&[Uring]), []);
        assert_eq!(io_pairs(&[]), []);
        assert_eq!(
            io_pairs(&[Auto, Epoll, Uring]),
            [(Uring, Epoll), (Uring, Auto), (Epoll, Auto)]
        );
        let vs = variants(&[Broker::Coremq, Broker::Mosquitto], &[Epoll, Uring]);
        let labels: Vec<String> = ratio_pairs(&vs, &[Epoll, Uring])
            .into_iter()
            .map(|(_, _, l)| l)
            .collect();
        assert_eq!(
            labels,
            [
                "coremq-epoll/mosquitto",
                "coremq-uring/mosquitto",
                "uring/epoll"
            ]
        );
        // Without --io, the ratios are what they always were.
        let vs = variants(&[Broker::Null, Broker::Coremq, Broker::Mosquitto], &[]);
        let labels: Vec<String> = ratio_pairs(&vs, &[])
            .into_iter()
            .map(|(_, _, l)| l)
            .collect();
        assert_eq!(labels, ["coremq/mosquitto", "coremq/null"]);
    }

    /// `loadgen compare`'s arguments, parsed as the command line would.
    fn parse(args: &[&str]) -> CompareArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: CompareArgs,
        }
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("compare").chain(args.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn io_and_syscalls_flags_parse_and_reach_the_command_lines() {
        let a = parse(&[]);
        assert!(a.io.is_empty() && !a.syscalls);
        let a = parse(&["--io", "uring,epoll", "--syscalls"]);
        assert_eq!(a.io, [IoMode::Uring, IoMode::Epoll]);
        assert!(a.syscalls);
        let bins = Bins {
            loadgen: "/x/loadgen".into(),
            coremq: Some("/x/coremq".into()),
            mosquitto: None,
            strace: Some("/usr/bin/strace".into()),
        };
        let dir = std::env::temp_dir();
        let vs = variants(&a.brokers, &a.io);
        let argv = broker_command(vs[1], &bins, &a, 4000, &dir, "t").unwrap();
        assert_eq!(argv[0], "/x/coremq");
        assert_eq!(&argv[argv.len() - 2..], ["--io", "epoll"]);
        // Started without --io, coremq picks its own loop, as before.
        let plain = Variant {
            broker: Broker::Coremq,
            io: None,
        };
        let argv = broker_command(plain, &bins, &a, 4000, &dir, "t").unwrap();
        assert!(!argv.iter().any(|x| x == "--io"), "{argv:?}");
        let wrapped = straced(
            Path::new("/usr/bin/strace"),
            Path::new("/t/s"),
            argv.clone(),
        );
        assert_eq!(
            &wrapped[..6],
            ["/usr/bin/strace", "-f", "-c", "-o", "/t/s", "--"]
        );
        assert_eq!(&wrapped[6..], &argv[..]);
        assert!(traced(&a, vs[0]) && !traced(&a, vs[2]));
        assert!(shards_context(&a).contains("coremq-uring = --io uring, coremq-epoll = --io epoll"));
        assert_eq!(shards_context(&parse(&[])), "coremq --shards 1");
    }

    #[test]
    fn strace_voids_cpu_and_speed_ratios_and_syscalls_need_both_sides() {
        let v = |broker, io| Variant { broker, io };
        let (ur, ep, mq) = (
            v(Broker::Coremq, Some(IoMode::Uring)),
            v(Broker::Coremq, Some(IoMode::Epoll)),
            v(Broker::Mosquitto, None),
        );
        let cell = |traced: bool, pairs: &[(&'static str, f64)]| Cell {
            ok: 1,
            traced,
            median: pairs.iter().copied().collect(),
            ..Cell::default()
        };
        let cu = cell(
            true,
            &[("rate", 2.0), ("syscalls_per_unit", 1.0), ("peak_rss", 4.0)],
        );
        let ce = cell(
            true,
            &[("rate", 1.0), ("syscalls_per_unit", 8.0), ("peak_rss", 2.0)],
        );
        let cm = cell(
            false,
            &[("rate", 1.0), ("cpu_per_cycle", 3.0), ("peak_rss", 2.0)],
        );
        let [rate, _, _, cpu, rss] = CHURN else {
            panic!("churn has 5 columns")
        };
        assert_eq!(ratio_cell(&SYS_CHURN, ur, &cu, ep, &ce), "0.12×");
        assert_eq!(ratio_cell(&SYS_CHURN, ur, &cu, mq, &cm), "n/a");
        assert_eq!(ratio_cell(cpu, ur, &cu, mq, &cm), "(strace)");
        assert_eq!(ratio_cell(rate, ur, &cu, ep, &ce), "(strace)");
        assert_eq!(ratio_cell(rss, ur, &cu, mq, &cm), "2.00×");
        // Untraced, as today.
        let cc = cell(false, &[("rate", 3.0)]);
        assert_eq!(
            ratio_cell(rate, v(Broker::Coremq, None), &cc, mq, &cm),
            "3.00×"
        );
    }

    #[test]
    fn proc_stat_reads_own_parent() {
        let (ppid, start) = proc_stat(std::process::id()).unwrap();
        // SAFETY: getppid has no preconditions.
        assert_eq!(ppid, unsafe { libc::getppid() } as u32);
        assert!(start > 0);
        assert_eq!(proc_start_ticks(std::process::id()), Some(start));
    }

    #[test]
    fn text_table_aligns_columns() {
        let t = table(
            &[
                vec!["broker".into(), "rate".into()],
                vec!["coremq".into(), "9,005".into()],
            ],
            false,
        );
        assert_eq!(t, "  broker   rate\n  coremq  9,005\n");
    }
}

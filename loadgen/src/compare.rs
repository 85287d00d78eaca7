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

/// conn: seconds to hold, keepAlive.
const CONN_HOLD: f64 = 10.0;
const CONN_KEEPALIVE: u16 = 60;
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
    /// The CPU the broker is pinned to.
    #[arg(long, default_value_t = 1)]
    pub broker_cpu: usize,
    /// The CPU loadgen (coordinator and workers) is pinned to.
    #[arg(long, default_value_t = 0)]
    pub loadgen_cpu: usize,
    /// conn: connections to open and hold.
    #[arg(long, default_value_t = 19000)]
    pub conn_n: u32,
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

/// One column of a scenario's table: a figure from loadgen's JSON report.
struct Metric {
    key: &'static str,
    head: &'static str,
    ptr: &'static str,
    fmt: Fmt,
    ratio: Ratio,
    /// The null broker has no such behaviour: shown as "n/a".
    null_na: bool,
}

const fn m(key: &'static str, head: &'static str, ptr: &'static str, fmt: Fmt) -> Metric {
    Metric {
        key,
        head,
        ptr,
        fmt,
        ratio: Ratio::None,
        null_na: false,
    }
}

const fn rate(mut x: Metric) -> Metric {
    x.ratio = Ratio::Rate;
    x
}

const fn cost(mut x: Metric) -> Metric {
    x.ratio = Ratio::Cost;
    x
}

const fn na(mut x: Metric) -> Metric {
    x.null_na = true;
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
    cost(m(
        "cpu_per_cycle",
        "CPU µs/cycle",
        "/broker_cost/cpu_us_per_cycle",
        Fmt::F1,
    )),
    PEAK_RSS,
];

const CONN: &[Metric] = &[
    rate(m("rate", "connects/s", "/connect_rate_per_s", Fmt::Int)),
    m("p50", "CONNACK p50", "/latency/connack/p50_us", Fmt::Us),
    m("p99", "CONNACK p99", "/latency/connack/p99_us", Fmt::Us),
    cost(m(
        "cpu_per_connect",
        "CPU µs/connect",
        "/broker_cost/cpu_us_per_connect",
        Fmt::F1,
    )),
    cost(m(
        "cpu_per_ping",
        "CPU µs/ping",
        "/broker_cost/cpu_us_per_ping",
        Fmt::F1,
    )),
    cost(m(
        "cpu_per_disconnect",
        "CPU µs/disconnect",
        "/broker_cost/cpu_us_per_disconnect",
        Fmt::F1,
    )),
    cost(m(
        "bytes_per_conn",
        "bytes/held conn",
        "/broker_cost/bytes_per_held_connection",
        Fmt::Int,
    )),
    PEAK_RSS,
];

const KEEPALIVE: &[Metric] = &[
    m("p50", "ping p50", "/latency/ping/p50_us", Fmt::Us),
    m("p99", "ping p99", "/latency/ping/p99_us", Fmt::Us),
    cost(m(
        "cpu_per_ping",
        "CPU µs/ping",
        "/broker_cost/cpu_us_per_ping",
        Fmt::F1,
    )),
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
    cost(m(
        "cpu_per_takeover",
        "CPU µs/takeover",
        "/broker_cost/cpu_us_per_takeover",
        Fmt::F1,
    )),
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
    cost(m(
        "cpu_per_msg",
        "CPU µs/msg",
        "/broker_cost/cpu_us_per_delivery",
        Fmt::F1,
    )),
    m("lost_pct", "lost", "/pubsub/lost_pct", Fmt::Pct),
    PEAK_RSS,
];

fn metrics(s: Scenario) -> &'static [Metric] {
    match s {
        Scenario::Churn => CHURN,
        Scenario::Conn => CONN,
        Scenario::Keepalive => KEEPALIVE,
        Scenario::Takeover => TAKEOVER,
        Scenario::Pubsub => PUBSUB,
    }
}

/// The binaries a comparison runs.
struct Bins {
    loadgen: PathBuf,
    coremq: Option<PathBuf>,
    mosquitto: Option<PathBuf>,
}

/// One scenario against one broker in one run.
#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    run: u32,
    scenario: &'static str,
    broker: &'static str,
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

fn validate(mut a: CompareArgs) -> CompareArgs {
    dedup(&mut a.brokers);
    dedup(&mut a.scenarios);
    if a.brokers.is_empty() {
        usage_error("--brokers: name at least one of coremq, mosquitto, null");
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

fn dedup<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::new();
    for x in v.iter() {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    *v = out;
}

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
    Bins {
        loadgen,
        coremq,
        mosquitto,
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

/// A broker child; stopped by its PID when dropped.
struct RunningBroker {
    child: Child,
    log: PathBuf,
}

impl RunningBroker {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL; always reaped.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(3);
    lines[from..].join(" | ")
}

fn broker_command(
    b: Broker,
    bins: &Bins,
    a: &CompareArgs,
    port: u16,
    dir: &Path,
    tag: &str,
) -> Result<Vec<String>> {
    let addr = format!("127.0.0.1:{port}");
    let s = |p: &Path| p.display().to_string();
    Ok(match b {
        Broker::Coremq => vec![
            s(bins.coremq.as_deref().expect("coremq found")),
            "--listen".into(),
            addr,
            "--shards".into(),
            a.shards.to_string(),
            "--log-level".into(),
            "warn".into(),
            "--stats-interval".into(),
            "0".into(),
        ],
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
fn start_broker(argv: &[String], port: u16, cpu: usize, log: PathBuf) -> Result<RunningBroker> {
    let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    pin(&mut cmd, cpu);
    let child = cmd.spawn().with_context(|| format!("start {}", argv[0]))?;
    let mut rb = RunningBroker { child, log };
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
                &CONN_HOLD.to_string(),
                "--keepalive",
                &CONN_KEEPALIVE.to_string(),
            ]),
            CONN_HOLD + 120.0 + f64::from(a.conn_n) / 500.0,
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
        // Publishing, then up to loadgen's 5 s drain and its timeouts, plus
        // connecting 2 × pairs sockets.
        Scenario::Pubsub => (
            Ok(pubsub_args(a)),
            a.pubsub_duration + 60.0 + f64::from(a.pubsub_pairs) / 250.0,
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
    v
}

/// loadgen keepalive's default hold: ⌈1.5 K⌉ + 3 s.
fn keepalive_hold() -> f64 {
    (1.5 * f64::from(KA_K)).ceil() + 3.0
}

fn scenario_caption(s: Scenario, a: &CompareArgs) -> String {
    match s {
        Scenario::Churn => format!(
            "churn: `loadgen churn -c {} --duration {}` (cycle = connect → CONNACK → DISCONNECT → broker's close)",
            a.churn_concurrency, a.duration
        ),
        Scenario::Conn => format!(
            "conn: `loadgen conn -n {} --hold {CONN_HOLD} --keepalive {CONN_KEEPALIVE}` (no --rate: 512 handshakes in flight)",
            a.conn_n
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

/// One scenario against one broker: fresh broker, loadgen, broker stopped.
fn run_one(
    a: &CompareArgs,
    bins: &Bins,
    dir: &Path,
    run: u32,
    s: Scenario,
    b: Broker,
    step: u32,
) -> RunResult {
    let mut r = RunResult {
        run,
        scenario: s.name(),
        broker: b.name(),
        command: Vec::new(),
        broker_command: Vec::new(),
        exit_code: None,
        error: None,
        skipped: None,
        wall_s: 0.0,
        report: None,
    };
    let (args, bound) = scenario_args(s, b, a);
    let args = match args {
        Ok(v) => v,
        Err(why) => {
            r.skipped = Some(why);
            return r;
        }
    };
    let t0 = Instant::now();
    let tag = format!("r{run}-{}-{}", s.name(), b.name());
    let res = (|| -> Result<(i32, Value)> {
        let port = free_port()?;
        r.broker_command = broker_command(b, bins, a, port, dir, &tag)?;
        let mut broker = start_broker(
            &r.broker_command,
            port,
            a.broker_cpu,
            dir.join(format!("{tag}.broker.log")),
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
    r
}

fn run_all(a: &CompareArgs, bins: &Bins, dir: &Path) -> Result<i32> {
    let ctx_start = context_start(a, bins);
    let total = a.runs as usize * a.scenarios.len() * a.brokers.len();
    let mut results: Vec<RunResult> = Vec::new();
    let mut step = 0;
    for run in 1..=a.runs {
        for &s in &a.scenarios {
            for &b in &a.brokers {
                step += 1;
                let r = run_one(a, bins, dir, run, s, b, step as u32);
                eprintln!(
                    "[{step:>2}/{total}] run {run} {:<9} {:<9} {}",
                    s.name(),
                    b.name(),
                    progress_line(s, &r)
                );
                results.push(r);
            }
        }
    }
    let loadavg_end = loadavg();
    let mut ctx = ctx_start;
    ctx.insert("loadavg_end".into(), json!(loadavg_end));

    let med = medians(a, &results);
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
    Ok(0)
}

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
    format!(
        "{} {fig}, failures {}{}  ({:.1} s)",
        first.head,
        get(v, "/failed_total").unwrap_or(0.0),
        if bound(v) { ", LOADGEN-BOUND" } else { "" },
        r.wall_s
    )
}

fn get(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr).and_then(Value::as_f64)
}

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
}

type Medians = BTreeMap<(Scenario, Broker), Cell>;

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

fn medians(a: &CompareArgs, results: &[RunResult]) -> Medians {
    let mut out = Medians::new();
    for &s in &a.scenarios {
        for &b in &a.brokers {
            let mut c = Cell::default();
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
                for mt in metrics(s) {
                    if b == Broker::Null && mt.null_na {
                        continue;
                    }
                    if let Some(x) = get(v, mt.ptr) {
                        c.values.entry(mt.key).or_default().push(x);
                    }
                }
            }
            for (k, vals) in &c.values {
                if let Some(x) = median(vals) {
                    c.median.insert(k, x);
                }
            }
            out.insert((s, b), c);
        }
    }
    out
}

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
        if let Value::Object(e) = e {
            e.insert(b.name().to_string(), Value::Object(m));
        }
    }
    Value::Object(o)
}

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

fn show(x: f64, f: Fmt) -> String {
    match f {
        Fmt::Int => thousands(x.round() as i64),
        Fmt::Us => crate::report::fmt_us(x.round().max(0.0) as u64),
        Fmt::F1 => format!("{x:.1}"),
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

    let has = |b: Broker| a.brokers.contains(&b);
    for &s in &a.scenarios {
        let ms = metrics(s);
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
        for &b in &a.brokers {
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
                let v = if b == Broker::Null && mt.null_na {
                    "n/a".to_string()
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
                            r.report
                                .as_ref()
                                .and_then(|v| get(v, mt.ptr))
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

        // Ratios of the medians: coremq ÷ the others.
        let others: Vec<Broker> = [Broker::Mosquitto, Broker::Null]
            .into_iter()
            .filter(|&b| has(b))
            .collect();
        if has(Broker::Coremq) && !others.is_empty() {
            let mut rr: Vec<Vec<String>> = Vec::new();
            let mut h = vec!["ratio".to_string()];
            for b in &others {
                h.push(format!("coremq/{}", b.name()));
            }
            rr.push(h);
            let core = &med[&(s, Broker::Coremq)];
            for mt in ms.iter().filter(|mt| mt.ratio != Ratio::None) {
                let mut row = vec![format!(
                    "{} ({})",
                    mt.head,
                    if mt.ratio == Ratio::Rate {
                        "higher: coremq faster"
                    } else {
                        "lower: coremq cheaper"
                    }
                )];
                for &b in &others {
                    let other = &med[&(s, b)];
                    let v = if other.skipped.is_some() || (b == Broker::Null && mt.null_na) {
                        "n/a".to_string()
                    } else {
                        match (core.median.get(mt.key), other.median.get(mt.key)) {
                            (Some(&x), Some(&y)) if y > 0.0 => format!("{:.2}×", x / y),
                            _ => "-".to_string(),
                        }
                    };
                    row.push(v);
                }
                rr.push(row);
            }
            o.push_str(&table(&rr, md));
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
    o
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

fn context_start(a: &CompareArgs, bins: &Bins) -> serde_json::Map<String, Value> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), Value::String(v));
    };
    put(
        "brokers",
        a.brokers
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(" vs "),
    );
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
    put("shards", format!("coremq --shards {}", a.shards));
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
            a.brokers
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(" → ")
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

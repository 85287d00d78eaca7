//! The coordinating process: splits the run over worker processes, steps
//! them through their phases together, samples the broker between phases,
//! shows a live line, and merges the workers' results into one report.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Connections per source address by default (see `source_ips` below).
pub const SOCKETS_PER_SOURCE_IP: u64 = 5_000;

use anyhow::{bail, Context, Result};

use crate::report::{self, BrokerSamples, Report};
use crate::spec::{Mode, Phase, Progress, WorkerMsg, WorkerResult, WorkerSpec};
use crate::sys::{proc_sample, proc_sample_sum, raise_nofile, ProcSample};
use crate::{usage_error, ChurnArgs, ClientOpts, Common, ConnArgs, KeepaliveArgs, TakeoverArgs};

/// File descriptors a worker keeps for itself (epoll, pipes, stdio...).
const FD_RESERVE: u64 = 100;

/// What the coordinator runs, before it is split.
struct Plan {
    mode: Mode,
    /// Sockets the run holds at once (to size workers and source addresses).
    sockets: u64,
    /// Clients (conn, keepalive, takeover) or loops (churn).
    count: u32,
    silent: u32,
    rate: f64,
    takeover_rate: f64,
    inflight: u32,
    client: ClientOpts,
    keepalive: u16,
    will_topic: Option<String>,
    will_payload: String,
    main_secs: f64,
    common: Common,
    params: serde_json::Value,
}

pub(crate) fn check_common(c: &Common) {
    if !(c.timeout > 0.0 && c.timeout.is_finite()) {
        usage_error("--timeout must be a positive number of seconds");
    }
    if c.workers == Some(0) {
        usage_error("--workers must be at least 1");
    }
    if c.source_ips == Some(0) {
        usage_error("--source-ips must be at least 1");
    }
    if let Some(ips) = c.source_ips {
        if u64::from(ips) + u64::from(c.source_skip) > 254 * 256 * 254 {
            usage_error(
                "--source-ips plus --source-skip: at most 16,516,096 addresses in 127.1.0.1 and up",
            );
        }
    }
    if let Err(e) = crate::resolve_v4(&c.broker) {
        usage_error(e);
    }
    for (i, &pid) in c.broker_pid.iter().enumerate() {
        if c.broker_pid[..i].contains(&pid) {
            usage_error(format!(
                "--broker-pid {pid} given twice (its CPU and RSS would count twice)"
            ));
        }
        if proc_sample(pid).is_none() {
            usage_error(format!("--broker-pid {pid}: no such process"));
        }
    }
}

fn check_secs(name: &str, v: f64) {
    if !(v >= 0.0 && v.is_finite()) {
        usage_error(format!("{name} must be a number of seconds ≥ 0"));
    }
}

pub(crate) fn check_rate(name: &str, v: Option<f64>) {
    if let Some(r) = v {
        if !(r > 0.0 && r.is_finite()) {
            usage_error(format!("{name} must be a positive number per second"));
        }
    }
}

/// `loadgen conn`.
pub fn conn(a: ConnArgs) -> Result<i32> {
    check_common(&a.common);
    check_secs("--hold", a.hold);
    check_rate("--rate", a.rate);
    if a.n == 0 {
        usage_error("-n must be at least 1");
    }
    if let Some(t) = &a.will_topic {
        if t.is_empty() || t.contains(['+', '#']) {
            usage_error("--will-topic must be a topic name without wildcards");
        }
    }
    let params = serde_json::json!({
        "n": a.n, "rate": a.rate, "inflight": a.inflight, "hold": a.hold,
        "keepalive": a.keepalive, "client_id": a.client.client_id, "clean": a.client.clean,
        "will_topic": a.will_topic, "will_payload": a.will_payload,
    });
    run(Plan {
        mode: Mode::Conn,
        sockets: u64::from(a.n),
        count: a.n,
        silent: 0,
        rate: a.rate.unwrap_or(0.0),
        takeover_rate: 0.0,
        inflight: a.inflight,
        client: a.client,
        keepalive: a.keepalive,
        will_topic: a.will_topic,
        will_payload: a.will_payload,
        main_secs: a.hold,
        common: a.common,
        params,
    })
}

/// `loadgen churn`.
pub fn churn(a: ChurnArgs) -> Result<i32> {
    check_common(&a.common);
    check_secs("--duration", a.duration);
    if a.concurrency == 0 {
        usage_error("--concurrency must be at least 1");
    }
    let params = serde_json::json!({
        "concurrency": a.concurrency, "duration": a.duration, "keepalive": a.keepalive,
        "client_id": a.client.client_id, "clean": a.client.clean,
    });
    run(Plan {
        mode: Mode::Churn,
        sockets: u64::from(a.concurrency),
        count: a.concurrency,
        silent: 0,
        rate: 0.0,
        takeover_rate: 0.0,
        inflight: 0,
        client: a.client,
        keepalive: a.keepalive,
        will_topic: None,
        will_payload: String::new(),
        main_secs: a.duration,
        common: a.common,
        params,
    })
}

/// `loadgen keepalive`.
pub fn keepalive(a: KeepaliveArgs) -> Result<i32> {
    check_common(&a.common);
    check_rate("--rate", a.rate);
    if a.keepalive == 0 {
        usage_error("--keepalive must be at least 1 second");
    }
    if a.n == 0 && a.silent == 0 {
        usage_error("-n and --silent cannot both be 0");
    }
    let hold = a
        .hold
        .unwrap_or_else(|| (1.5 * f64::from(a.keepalive)).ceil() + 3.0);
    check_secs("--hold", hold);
    let params = serde_json::json!({
        "n": a.n, "silent": a.silent, "keepalive": a.keepalive, "hold": hold, "rate": a.rate,
        "inflight": a.inflight, "client_id": a.client.client_id, "clean": a.client.clean,
    });
    run(Plan {
        mode: Mode::Keepalive,
        sockets: u64::from(a.n) + u64::from(a.silent) + 1,
        count: a.n,
        silent: a.silent,
        rate: a.rate.unwrap_or(0.0),
        takeover_rate: 0.0,
        inflight: a.inflight,
        client: a.client,
        keepalive: a.keepalive,
        will_topic: None,
        will_payload: a.will_payload,
        main_secs: hold,
        common: a.common,
        params,
    })
}

/// `loadgen takeover`.
pub fn takeover(a: TakeoverArgs) -> Result<i32> {
    check_common(&a.common);
    check_secs("--duration", a.duration);
    check_rate("--rate", Some(a.rate));
    if a.n == 0 {
        usage_error("-n must be at least 1");
    }
    if !a.client.client_id.contains("{n}") {
        usage_error("--client-id must contain {n} for takeover");
    }
    let params = serde_json::json!({
        "n": a.n, "rate": a.rate, "duration": a.duration, "keepalive": a.keepalive,
        "inflight": a.inflight, "client_id": a.client.client_id, "clean": a.client.clean,
    });
    // Old and new connection overlap for up to a timeout per takeover.
    let overlap = (a.rate * a.common.timeout).ceil() as u64;
    run(Plan {
        mode: Mode::Takeover,
        sockets: u64::from(a.n) + overlap.min(u64::from(a.n)),
        count: a.n,
        silent: 0,
        rate: 0.0,
        takeover_rate: a.rate,
        inflight: a.inflight,
        client: a.client,
        keepalive: a.keepalive,
        will_topic: None,
        will_payload: String::new(),
        main_secs: a.duration,
        common: a.common,
        params,
    })
}

/// `[start, start+len)` of part `i` of `total` split into `parts`.
fn split(total: u32, parts: u32, i: u32) -> (u32, u32) {
    let t = u64::from(total);
    let p = u64::from(parts);
    let a = t * u64::from(i) / p;
    let b = t * (u64::from(i) + 1) / p;
    (a as u32, (b - a) as u32)
}

struct Worker {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    progress: Progress,
    result: Option<WorkerResult>,
    gone: bool,
}

enum Event {
    Msg(usize, WorkerMsg),
    Eof(usize),
}

fn run(plan: Plan) -> Result<i32> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let fd_limit = raise_nofile();
    let per_worker = fd_limit.saturating_sub(FD_RESERVE).max(1);
    let need_workers = plan.sockets.div_ceil(per_worker).max(1) as u32;
    let workers = match plan.common.workers {
        Some(w) if w < need_workers => usage_error(format!(
            "{} sockets need --workers ≥ {need_workers} (open-file limit {fd_limit} per process)",
            plan.sockets
        )),
        Some(w) => w,
        None => need_workers,
    };
    let source_ips = plan.common.source_ips.unwrap_or_else(|| match plan.mode {
        Mode::Churn => 4,
        // The kernel's port search in connect() slows as an address's
        // ~28,000 ephemeral ports fill: 19,000 connections from one address
        // ran at 3,800/s, from two at 22,900/s (null broker, this machine).
        _ => plan.sockets.div_ceil(SOCKETS_PER_SOURCE_IP).max(1) as u32,
    });

    let exe = std::env::current_exe().context("own executable")?;
    let mut ws: Vec<Worker> = Vec::new();
    let (tx, rx) = mpsc::channel::<Event>();
    let silent_first = plan.count;
    for i in 0..workers {
        let (first, count) = split(plan.count, workers, i);
        let (sf, sc) = split(plan.silent, workers, i);
        let spec = WorkerSpec {
            index: i,
            mode: plan.mode,
            broker: plan.common.broker.clone(),
            source_ips,
            source_skip: plan.common.source_skip,
            first,
            count,
            silent_first: silent_first + sf,
            silent_count: sc,
            rate: plan.rate / f64::from(workers),
            takeover_rate: plan.takeover_rate / f64::from(workers),
            inflight: plan.inflight,
            client_id: plan.client.client_id.clone(),
            clean: plan.client.clean,
            keepalive: plan.keepalive,
            will_topic: plan.will_topic.clone(),
            will_payload: plan.will_payload.clone(),
            main_secs: plan.main_secs,
            timeout_secs: plan.common.timeout,
            will_subscriber: plan.mode == Mode::Keepalive && i == 0,
            protocol: plan.common.protocol,
            tls_ca: plan.common.tls_ca.clone(),
            tls_server_name: plan.common.tls_server_name.clone(),
            ws_path: plan.common.ws.clone(),
        };
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--spec")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn worker")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let tx = tx.clone();
        let idx = ws.len();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<WorkerMsg>(&line) {
                    Ok(m) => {
                        if tx.send(Event::Msg(idx, m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("loadgen: worker {idx}: bad line ({e}): {line}"),
                }
            }
            let _ = tx.send(Event::Eof(idx));
        });
        ws.push(Worker {
            child,
            stdin,
            progress: Progress::default(),
            result: None,
            gone: false,
        });
    }
    drop(tx);

    let pids = plan.common.broker_pid.clone();
    let sample = || proc_sample_sum(&pids);
    let mut samples = BrokerSamples {
        before: sample(),
        ..Default::default()
    };
    let mut peak_rss = samples.before.map(|s| s.rss_bytes).unwrap_or(0);
    // Machine-wide kernel slab before the connects and while all are held:
    // what the held sockets cost the kernel, which the broker's RSS misses.
    let mut slab_before = crate::sys::slab_bytes();
    let mut slab_held = None;
    let t0 = Instant::now();
    let mut go_at: Option<Instant> = None;
    let mut stage = Phase::Ready;
    let mut last_tick = Instant::now();
    let mut last_connected = 0u64;
    let mut last_cycles = 0u64;
    let mut err: Option<String> = None;
    let total_target = u64::from(plan.count) + u64::from(plan.silent);

    let send_all = |ws: &mut Vec<Worker>, cmd: &str| {
        for w in ws.iter_mut() {
            if let Some(s) = w.stdin.as_mut() {
                let _ = writeln!(s, "{cmd}");
                let _ = s.flush();
            }
        }
    };

    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Msg(i, WorkerMsg::Progress(p))) => ws[i].progress = p,
            Ok(Event::Msg(i, WorkerMsg::Result(r))) => ws[i].result = Some(*r),
            Ok(Event::Eof(i)) => {
                ws[i].gone = true;
                if ws[i].result.is_none() && err.is_none() {
                    err = Some(format!("worker {i} ended without a result"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if err.is_some() {
            break;
        }
        let all_at = |ws: &Vec<Worker>, ph: Phase| {
            ws.iter()
                .all(|w| w.result.is_some() || w.progress.phase.is_some_and(|p| p >= ph))
        };
        match stage {
            Phase::Ready if all_at(&ws, Phase::Ready) => {
                samples.before = sample().or(samples.before);
                slab_before = crate::sys::slab_bytes().or(slab_before);
                go_at = Some(Instant::now());
                send_all(&mut ws, "go");
                stage = Phase::Ramp;
            }
            Phase::Ramp if all_at(&ws, Phase::Ramped) => {
                samples.after_ramp = sample();
                send_all(&mut ws, "next");
                stage = Phase::Main;
            }
            Phase::Main if all_at(&ws, Phase::MainDone) => {
                samples.end_main = sample();
                slab_held = crate::sys::slab_bytes();
                send_all(&mut ws, "next");
                stage = Phase::Disconnect;
            }
            _ => {}
        }
        if ws.iter().all(|w| w.result.is_some()) {
            break;
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            if let Some(s) = sample() {
                peak_rss = peak_rss.max(s.rss_bytes);
            }
            if !plan.common.quiet {
                let connected: u64 = ws.iter().map(|w| w.progress.connected).sum();
                let cycles: u64 = ws.iter().map(|w| w.progress.cycles).sum();
                let open: u64 = ws.iter().map(|w| w.progress.open).sum();
                let failed: u64 = ws.iter().map(|w| w.progress.failed).sum();
                let p99 = ws.iter().map(|w| w.progress.p99_us).max().unwrap_or(0);
                let elapsed = go_at.map(|g| g.elapsed()).unwrap_or_default();
                let what = if plan.mode == Mode::Churn {
                    format!(
                        "cycles {cycles}  rate {}/s",
                        cycles.saturating_sub(last_cycles)
                    )
                } else {
                    format!(
                        "connected {open}/{total_target}  rate {}/s",
                        connected.saturating_sub(last_connected)
                    )
                };
                last_connected = connected;
                last_cycles = cycles;
                eprintln!(
                    "[{:6.1}s] {:<10} {what}  p99 {}  errors {failed}",
                    elapsed.as_secs_f64(),
                    phase_name(stage),
                    report::fmt_us(p99),
                );
            }
        }
    }
    if let Some(e) = err {
        for w in ws.iter_mut() {
            if !w.gone {
                let _ = w.child.kill();
            }
            let _ = w.child.wait();
        }
        bail!("{e}");
    }
    for w in ws.iter_mut() {
        w.stdin = None;
        let _ = w.child.wait();
    }
    // Let the broker finish the closes it has been handed.
    if !pids.is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
    samples.after = sample();
    samples.peak_rss = peak_rss.max(
        [samples.after_ramp, samples.end_main, samples.after]
            .iter()
            .flatten()
            .map(|s: &ProcSample| s.rss_bytes)
            .max()
            .unwrap_or(0),
    );
    let results: Vec<WorkerResult> = ws.into_iter().filter_map(|w| w.result).collect();
    let total_wall = t0.elapsed().as_secs_f64();
    let rep = Report::build(
        report::RunInfo {
            mode: plan.mode,
            broker: plan.common.broker.clone(),
            sub_broker: None,
            broker_pids: pids,
            workers,
            source_ips,
            keepalive: plan.keepalive,
            params: plan.params,
            started_unix,
            total_wall_s: total_wall,
            main_secs: plan.main_secs,
            parent_cpu_s: crate::sys::rusage_cpu_s(libc::RUSAGE_SELF),
            children_cpu_s: crate::sys::rusage_cpu_s(libc::RUSAGE_CHILDREN),
            protocol: plan.common.protocol,
            pubsub: None,
            slab: (slab_before, slab_held),
        },
        &results,
        samples,
    )?;
    print!("{}", rep.table());
    if let Some(path) = &plan.common.json {
        let s = serde_json::to_string_pretty(&rep)?;
        std::fs::write(path, s + "\n").with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &plan.common.plot {
        std::fs::write(path, crate::plot::svg(&rep))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(if rep.failed_total > 0 { 1 } else { 0 })
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Ready => "starting",
        Phase::Ramp => "ramp",
        Phase::Ramped | Phase::Main => "main",
        Phase::MainDone | Phase::Disconnect => "disconnect",
        Phase::Done => "done",
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_covers_everything_once() {
        let mut next = 0;
        let mut sum = 0;
        for i in 0..7 {
            let (a, n) = split(1000, 7, i);
            assert_eq!(a, next);
            next = a + n;
            sum += n;
        }
        assert_eq!(sum, 1000);
    }
}

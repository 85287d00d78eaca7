//! `loadgen compare` end to end, small: the null broker and coremq, churn
//! only, one one-second run each. Every broker it starts, compare stops by
//! its PID; the test itself has a wall-clock limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{coremq_bin, LOADGEN};

/// The CPUs this process may run on (Cpus_allowed_list, e.g. "0-3,6").
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("0")
        .trim()
        .to_string();
    let mut out = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                out.extend(a..=b);
            }
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

fn run(args: &[&str], limit: Duration) -> Output {
    let start = Instant::now();
    let mut child = Command::new(LOADGEN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadgen {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A short `loadgen compare` churn run against null and coremq with
/// `extra` arguments, broker and loadgen pinned apart, Markdown and JSON
/// written into `dir`. Returns the output, the two files' paths and how
/// long it took; fails the test unless it exits 0.
fn compare_churn(
    coremq: &Path,
    dir: &Path,
    extra: &[&str],
) -> (String, PathBuf, PathBuf, Duration) {
    let cpus = allowed_cpus();
    let broker_cpu = cpus.get(1).copied().unwrap_or(cpus[0]).to_string();
    let loadgen_cpu = cpus[0].to_string();
    std::fs::create_dir_all(dir).unwrap();
    let md = dir.join("c.md");
    let json = dir.join("c.json");
    let mut args = vec![
        "compare",
        "--coremq",
        coremq.to_str().unwrap(),
        "--brokers",
        "null,coremq",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--scenarios",
        "churn",
        "--runs",
        "1",
        "--duration",
        "1",
        "--churn-concurrency",
        "4",
        "--broker-cpu",
        &broker_cpu,
        "--loadgen-cpu",
        &loadgen_cpu,
        "--markdown",
        md.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let start = Instant::now();
    let out = run(&args, Duration::from_secs(60));
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, md, json, took)
}

#[test]
fn compare_null_and_coremq_churn_prints_both_rows_and_the_ratio() {
    let coremq = coremq_bin();
    let dir = std::env::temp_dir().join(format!("loadgen-compare-test-{}", std::process::id()));
    let (stdout, md, json, took) = compare_churn(&coremq, &dir, &[]);
    // The scenario's table starts at its header row ("broker  cycles/s ...").
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("broker "))
        .collect();
    assert!(!table.is_empty(), "no table in:\n{stdout}");
    let row = |name: &str| {
        table
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
            .to_string()
    };
    // Both rows carry a cycle rate (digits) and a loadgen-bound count (k/1).
    for name in ["null", "coremq"] {
        let r = row(name);
        assert!(r.contains("/1"), "{name} row: {r}");
        assert!(!r.contains("no report"), "{name} row: {r}");
    }
    assert!(stdout.contains("cycles/s"), "{stdout}");
    assert!(stdout.contains("coremq/null"), "no ratio column:\n{stdout}");
    let ratio = row("cycles/s");
    assert!(ratio.contains('×'), "ratio row: {ratio}");
    assert!(!stdout.contains("coremq/mosquitto"), "{stdout}");
    for k in ["commit", "kernel", "cpu", "pinning", "loadavg"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(k)),
            "no {k} in the context block:\n{stdout}"
        );
    }
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("| **coremq** |") && md.contains("| **null** |"),
        "{md}"
    );
    assert!(md.contains("| ratio | coremq/null |"), "{md}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["runs"].as_array().unwrap().len(), 2);
    assert!(doc["medians"]["churn"]["coremq"]["rate"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn compare_without_mosquitto_or_with_bad_arguments_says_one_line_and_exits_2() {
    for (args, needle) in [
        (
            vec!["compare", "--mosquitto", "/nonexistent/mosquitto"],
            "scripts/compare.sh",
        ),
        (vec!["compare", "--runs", "0"], "--runs"),
        (vec!["compare", "--brokers", "hivemq"], "--brokers"),
        (vec!["compare", "--scenarios", "publish"], "--scenarios"),
        (
            vec!["compare", "--brokers", "null", "--broker-cpu", "100000"],
            "--broker-cpu",
        ),
        (vec!["compare", "--io", "kqueue"], "--io"),
        (
            vec!["compare", "--brokers", "null", "--io", "uring"],
            "--io",
        ),
        (
            vec!["compare", "--brokers", "null", "--syscalls"],
            "--syscalls",
        ),
    ] {
        let out = run(&args, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn compare_pubsub_gives_coremq_a_row_and_the_null_broker_n_a() {
    let coremq = coremq_bin();
    let cpus = allowed_cpus();
    let broker_cpu = cpus.get(1).copied().unwrap_or(cpus[0]).to_string();
    let loadgen_cpu = cpus[0].to_string();
    let dir = std::env::temp_dir().join(format!("loadgen-compare-ps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("c.json");
    let start = Instant::now();
    let out = run(
        &[
            "compare",
            "--coremq",
            coremq.to_str().unwrap(),
            "--brokers",
            "null,coremq",
            "--scenarios",
            "pubsub",
            "--runs",
            "1",
            "--pubsub-pairs",
            "10",
            "--pubsub-duration",
            "1",
            "--pubsub-rate",
            "2000",
            "--broker-cpu",
            &broker_cpu,
            "--loadgen-cpu",
            &loadgen_cpu,
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("loadgen pubsub --pairs 10 --qos 1 --payload 64 --duration 1 --rate 2000"),
        "{stdout}"
    );
    for head in ["deliveries/s", "e2e p50", "e2e p99", "CPU µs/msg", "lost"] {
        assert!(stdout.contains(head), "no {head} column:\n{stdout}");
    }
    // The table starts at its header row, after the context block.
    let row = |name: &str| {
        stdout
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("broker "))
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
            .to_string()
    };
    let core = row("coremq");
    assert!(
        core.contains("0/1") && !core.contains("no report"),
        "{core}"
    );
    assert!(row("null").contains("n/a"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let med = &doc["medians"]["pubsub"]["coremq"];
    assert!(med["rate"].as_f64().unwrap() > 0.0, "{med}");
    assert!(med["p99"].as_f64().unwrap() > 0.0, "{med}");
    assert_eq!(med["lost_pct"].as_f64(), Some(0.0), "{med}");
    assert_eq!(med["failures_all_runs"].as_u64(), Some(0), "{med}");
    assert!(doc["medians"]["pubsub"]["null"]["skipped"].is_string());
    // Every run connects from its own source addresses.
    let runs = doc["runs"].as_array().unwrap();
    let cmd = runs
        .iter()
        .find(|r| r["broker"] == "coremq")
        .map(|r| r["command"].to_string())
        .unwrap();
    assert!(cmd.contains("--source-skip"), "{cmd}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// strace must be here and allowed to trace a child: a test that needs it
/// fails without it, never skips (scripts/test.sh's tools include it).
fn assert_strace_works() {
    let ok = Command::new("strace")
        .args(["-f", "-c", "-o", "/dev/null", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "strace is missing or may not trace here (ptrace refused)"
    );
}

#[test]
fn compare_io_loops_side_by_side_counts_their_syscalls() {
    let coremq = coremq_bin();
    assert_strace_works();
    let dir = std::env::temp_dir().join(format!("loadgen-compare-io-{}", std::process::id()));
    let (stdout, md, json, took) =
        compare_churn(&coremq, &dir, &["--io", "epoll,uring", "--syscalls"]);
    let row = |name: &str| {
        stdout
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("broker "))
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
            .to_string()
    };
    // Both loops have a row; under strace their CPU is not a figure.
    for name in ["coremq-epoll", "coremq-uring"] {
        let r = row(name);
        assert!(r.contains("(strace)") && r.contains("0/1"), "{name}: {r}");
    }
    assert!(row("null").contains("n/a"), "null has no syscall count");
    assert!(stdout.contains("syscalls/cycle"), "{stdout}");
    for label in ["coremq-epoll/null", "coremq-uring/null", "uring/epoll"] {
        assert!(stdout.contains(label), "no {label} ratio:\n{stdout}");
    }
    assert!(
        row("syscalls/cycle").contains('×'),
        "uring/epoll of syscalls:\n{stdout}"
    );
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(md.contains("| **coremq-uring** |"), "{md}");
    assert!(md.contains("coremq-uring = --io uring"), "{md}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for r in runs.iter().filter(|r| r["broker"] != "null") {
        let cmd = r["broker_command"].to_string();
        assert!(cmd.contains("strace") && cmd.contains("--io"), "{cmd}");
        let sc = &r["syscalls"];
        assert!(sc["total"].as_u64().unwrap() > 0, "{sc}");
        let top = sc["top"].as_array().unwrap();
        assert!(!top.is_empty() && top.len() <= 5, "{sc}");
    }
    let med = &doc["medians"]["churn"]["coremq-uring"];
    assert!(med["syscalls_per_unit"].as_f64().unwrap() > 0.0, "{med}");
    assert!(med.get("cpu_per_cycle").is_none(), "{med}");
    assert_eq!(doc["args"]["io"], serde_json::json!(["epoll", "uring"]));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

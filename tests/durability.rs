//! `--data-dir` (issue 11, durability) against the real binary: what a user
//! notices when the broker is stopped, crashes (SIGKILL) or finds damaged
//! files, with real clients (Python paho-mqtt, mosquitto_sub/pub) and raw
//! sockets.
//!
//! Every restart here is a new process on the same port and data dir
//! ([`Broker::restart`]); clients that reconnect meet what the old process
//! acknowledged. The MQTT rules in play: a resumed session says so in
//! CONNACK (MQTT-3.2.2-2 / 3.2.2-3 in 5.0), QoS 1/2 messages owed to it are
//! delivered (MQTT-4.4.0-1), QoS 2 at most once (MQTT-4.3.3), retained
//! messages stay (MQTT-3.3.1-5), a will is published once unless the client
//! comes back first (MQTT-3.1.2-8, MQTT-3.1.3-9).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use coremq::proto::codec::{
    Connect, LastWill, Packet, PacketId, Properties, ProtocolVersion, QoS, Subscribe,
    SubscriptionOptions,
};
use coremq::proto::handshake::owner_of;
use coremq::proto::persist;
use coremq::proto::topic::{TopicFilter, TopicName};

use common::{
    json, mosquitto_sub_ready, paho_session, python_script, read_retained, run_bounded, tools,
    unused_port, Broker, ConnectOpts, LineProc, RawClient, TempDir, COREMQ,
};

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- helpers

/// The broker's flags: `--data-dir DIR` (when given) and `extra`.
fn flags<'a>(data: Option<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    if let Some(d) = data {
        v.extend(["--data-dir", d]);
    }
    v.extend_from_slice(extra);
    v
}

/// The data dir of a test: `TMP/data` (created by the broker).
fn data_dir(tmp: &TempDir) -> String {
    tmp.path("data")
        .to_str()
        .expect("utf-8 temp path")
        .to_string()
}

/// A persistent 3.1.1 session (cleanSession=0) for `id`.
fn persistent(id: &str) -> ConnectOpts {
    ConnectOpts {
        clean: false,
        ..ConnectOpts::id(id)
    }
}

/// Connects `id` with a persistent session; returns the client and the
/// CONNACK's sessionPresent.
fn resume(port: u16, id: &str) -> (RawClient, bool) {
    RawClient::connect(port, &persistent(id))
}

/// Creates a persistent session for `id` subscribed to `filter` (SUBACK
/// received), then disconnects normally: the session stays, offline.
fn park_session(port: u16, id: &str, filter: &str, qos: u8) {
    let (mut c, present) = resume(port, id);
    assert!(!present, "{id}: a fresh session, sessionPresent=0");
    c.subscribe(filter, qos);
    c.send(&common::disconnect_packet());
    c.expect_closed(5 * SEC);
}

/// A clean publisher: sends one QoS 1 message and waits for its PUBACK.
fn publish_q1(port: u16, topic: &str, payload: &str, retain: bool) {
    let (mut p, _) = RawClient::connect(port, &ConnectOpts::id(""));
    p.publish(topic, payload.as_bytes(), 1, retain);
    p.send(&common::disconnect_packet());
}

/// mosquitto_pub with `args`; asserts it exits 0 (for QoS 1/2: acknowledged).
fn mosquitto_pub(port: u16, args: &[&str]) {
    let (code, out, err) = run_bounded(
        Command::new(&tools().mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        10 * SEC,
    );
    assert_eq!(code, Some(0), "mosquitto_pub {args:?}: {out}{err}");
}

/// `--data-dir DIR: state loaded sessions=S messages=M retained=R`.
fn assert_state_loaded(broker: &Broker, sessions: usize, messages: usize, retained: usize) {
    let want = format!("state loaded sessions={sessions} messages={messages} retained={retained}");
    let lines = broker.log_lines_with("state loaded");
    assert!(
        lines.iter().any(|l| l.contains(&want)),
        "expected a log line with {want:?}; got {lines:?}"
    );
}

/// Every record of every shard's log under `data`, one per line, for a
/// failure message.
fn log_records(data: &Path) -> String {
    let mut out = String::new();
    for n in 0.. {
        let Ok(bytes) = std::fs::read(data.join(format!("shard-{n}")).join("log")) else {
            break;
        };
        let scan = persist::scan(&bytes);
        out.push_str(&format!(
            "shard-{n}/log: {} bytes, tail {:?}\n",
            bytes.len(),
            scan.tail
        ));
        for r in scan.records {
            out.push_str(&format!("  {r:?}\n"));
        }
    }
    out
}

/// A client id, starting with `prefix`, that coremq puts on `shard` of
/// `shards`.
fn id_on_shard(prefix: &str, shard: u16, shards: u16) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| owner_of(id, shards).0 == shard)
        .expect("some id lands on every shard")
}

/// The frames of a log, `(start, body length)`: each commit's frames are
/// followed by zeros up to the next 4096-byte block (the format's `BLOCK`),
/// and the log ends at the end of the file or at the first frame that does
/// not fit.
fn frames(log: &[u8]) -> Vec<(usize, usize)> {
    const BLOCK: usize = 4096;
    let mut v = Vec::new();
    let mut pos = 0;
    while pos + 8 <= log.len() {
        let len = u32::from_le_bytes(log[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            // Padding: on to the next block.
            pos = (pos / BLOCK + 1) * BLOCK;
            continue;
        }
        if pos + 8 + len > log.len() {
            break;
        }
        v.push((pos, len));
        pos += 8 + len;
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The number in `dropped N bytes` of the broker's WARN line about `log`,
/// asserting that the line names the file.
fn dropped_bytes_warning(broker: &Broker, log: &Path) -> u64 {
    let lines = broker.log_lines_with("dropped");
    let line = lines
        .iter()
        .find(|l| l.contains("WARN") && l.contains(log.to_str().unwrap()))
        .unwrap_or_else(|| {
            panic!(
                "no WARN line naming {} and what was dropped; stderr:\n{}",
                log.display(),
                broker.log_text()
            )
        });
    let n = line
        .split("dropped ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    assert!(line.contains(&format!("dropped {n} bytes")), "{line}");
    n
}

/// A small xorshift generator for the kill delays; the seed is printed and
/// can be set with `COREMQ_TEST_SEED` to replay a run.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("COREMQ_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("COREMQ_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A 5.0 CONNECT with Clean Start 0, a Session Expiry Interval and a QoS 1
/// will with a Will Delay Interval.
fn v5_connect_with_will(id: &str, expiry: u32, will_topic: &str, delay: u32) -> Vec<u8> {
    let c = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive: 0,
        client_id: ByteString::from(id),
        will: Some(LastWill {
            topic: TopicName::new(ByteString::from(will_topic)).unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Some(Box::new(Properties {
                will_delay_interval: Some(delay),
                ..Properties::default()
            })),
        }),
        username: None,
        password: None,
        properties: Some(Box::new(Properties {
            session_expiry_interval: Some(expiry),
            ..Properties::default()
        })),
    };
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(c)).encode(ProtocolVersion::V5, &mut out);
    out.to_vec()
}

/// SUBSCRIBE `filter` at QoS 1 with packet id `id` (3.1.1 bytes).
fn subscribe_packet(filter: &str, id: u16) -> Vec<u8> {
    common::encode(&Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(id).unwrap(),
        filters: vec![(
            TopicFilter::new(ByteString::from(filter)).unwrap(),
            SubscriptionOptions::qos(QoS::AtLeastOnce),
        )],
        properties: None,
    }))
}

// ------------------------------------------------- 1. real clients, restarts

/// paho 3.1.1 (cleanSession=0), paho 5.0 (Session Expiry 3600) and
/// `mosquitto_sub -c` keep their sessions across a SIGTERM restart and then
/// across a SIGKILL: sessionPresent=1 (MQTT-3.2.2-2), the QoS 1 and 2
/// messages published while they were offline arrive once each
/// (MQTT-4.4.0-1, MQTT-4.3.3), and retained topics are still there.
#[test]
fn real_clients_keep_sessions_across_sigterm_and_kill9_mqtt_3_2_2_2() {
    let tmp = TempDir::new("dur-clients");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "2"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();

    let r = paho_session(port, "paho311-dur", "311", "dur/p311/#", 2, 0, 0);
    assert!(!r.session_present && r.granted == Some(2), "{r:?}");
    let r = paho_session(port, "paho5-dur", "5", "dur/p5/#", 1, 0, 0);
    assert!(!r.session_present && r.granted == Some(1), "{r:?}");
    // mosquitto_sub -c: SIGINT makes it send DISCONNECT; the session stays.
    let mut msub = mosquitto_sub_ready(port, &["-c", "-i", "msub-dur", "-q", "1", "-t", "dur/m/#"]);
    msub.signal(libc::SIGINT);
    msub.wait_exit(5 * SEC);
    drop(msub);

    for (round, how) in ["sigterm", "kill9"].into_iter().enumerate() {
        // Published while every subscriber is offline: owed to them.
        for (topic, qos) in [
            ("dur/p311/x", "1"),
            ("dur/p311/x", "2"),
            ("dur/p5/x", "1"),
            ("dur/p5/x", "2"),
            ("dur/m/x", "1"),
            ("dur/m/x", "2"),
        ] {
            let msg = format!("{how}-q{qos}");
            mosquitto_pub(port, &["-t", topic, "-q", qos, "-m", &msg]);
        }
        let retained = format!("{how}-retained");
        mosquitto_pub(
            port,
            &[
                "-t",
                &format!("dur/ret/{how}"),
                "-q",
                "1",
                "-r",
                "-m",
                &retained,
            ],
        );

        if how == "sigterm" {
            broker.terminate();
        } else {
            broker.kill9();
        }
        // What the stopped process left, kept for the failure message below.
        let left = log_records(Path::new(&data));
        let stopped_log = broker.log_text();
        broker = broker.restart(&args);
        let want = format!("state loaded sessions=3 messages=6 retained={}", round + 1);
        if broker.log_lines_with(&want).is_empty() {
            panic!(
                "after {how}: expected a log line with {want:?}; got {:?}\n\
                 records the stopped process left:\n{left}\n\
                 its stderr:\n{stopped_log}",
                broker.log_lines_with("state loaded")
            );
        }

        let r = paho_session(port, "paho311-dur", "311", "-", 0, 2, 10);
        assert!(r.session_present, "paho 3.1.1 after {how}: {r:?}");
        assert_eq!(
            r.messages,
            [
                format!("dur/p311/x={how}-q1@1"),
                format!("dur/p311/x={how}-q2@2")
            ],
            "paho 3.1.1 after {how}: each queued message once, at its QoS"
        );
        let r = paho_session(port, "paho5-dur", "5", "-", 0, 2, 10);
        assert!(r.session_present, "paho 5.0 after {how}: {r:?}");
        assert_eq!(
            r.messages,
            [
                format!("dur/p5/x={how}-q1@1"),
                format!("dur/p5/x={how}-q2@1")
            ],
            "paho 5.0 after {how} (subscribed at QoS 1)"
        );
        // mosquitto_sub resumes with a different -t: what arrives on dur/m/x
        // can only come from the subscription its session kept.
        let (code, out, err) = run_bounded(
            Command::new(&tools().mosquitto_sub).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-c",
                "-i",
                "msub-dur",
                "-q",
                "1",
                "-t",
                "dur/unrelated",
                "-v",
                "-C",
                "2",
                "-W",
                "10",
            ]),
            15 * SEC,
        );
        assert_eq!(code, Some(0), "mosquitto_sub -c after {how}: {out}{err}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [format!("dur/m/x {how}-q1"), format!("dur/m/x {how}-q2")],
            "mosquitto_sub -c after {how}"
        );
        // Every retained message so far, set before this or an earlier
        // restart (MQTT-3.3.1-5).
        for earlier in ["sigterm", "kill9"].iter().take(round + 1) {
            assert_eq!(
                read_retained(port, &format!("dur/ret/{earlier}"), 5),
                format!("{earlier}-retained"),
                "retained dur/ret/{earlier} after {how}"
            );
        }
        println!("after {how}: 3 sessions resumed with sessionPresent=1, 6 queued messages delivered once, retained kept");
    }
    let s = broker.fresh_stats();
    assert!(s["log_commits"] > 0 && s["log_bytes"] > 0, "{s:?}");
}

/// The control: without `--data-dir` a restart forgets sessions, queued
/// messages and retained messages (sessionPresent=0), so the tests above
/// see the flag at work, not some other memory.
#[test]
fn without_data_dir_nothing_survives_a_restart() {
    let args = ["--shards", "2"];
    let mut broker = Broker::start(&args);
    let port = broker.port();
    let r = paho_session(port, "paho-nodir", "311", "nodir/#", 1, 0, 0);
    assert!(!r.session_present, "{r:?}");
    mosquitto_pub(port, &["-t", "nodir/x", "-q", "1", "-m", "queued"]);
    mosquitto_pub(port, &["-t", "nodir/ret", "-q", "1", "-r", "-m", "kept?"]);
    assert_eq!(read_retained(port, "nodir/ret", 5), "kept?");
    broker.terminate();
    let broker = broker.restart(&args);
    assert!(!broker.log_contains("state loaded"));
    let r = paho_session(broker.port(), "paho-nodir", "311", "-", 0, 1, 2);
    assert!(
        !r.session_present,
        "no --data-dir: the session is gone: {r:?}"
    );
    assert!(r.messages.is_empty(), "{r:?}");
    assert_eq!(read_retained(broker.port(), "nodir/ret", 1), "");
}

// ---------------------------------------------------------- 2. kill -9 under load

/// QoS 1 and QoS 2 publishers (retained, sequence-numbered payloads) and
/// two persistent subscribers, on clients spread over 2 shards, while the
/// broker is SIGKILLed 4 times at random moments and restarted on the same
/// port and data dir. Afterwards every message whose PUBACK / PUBCOMP the
/// publisher got has reached every subscriber (MQTT-4.4.0-1: QoS 1 may be
/// duplicated, QoS 2 never, MQTT-4.3.3), every reconnection found its
/// session (MQTT-3.2.2-2), and each retained topic holds an acknowledged
/// message or a later one. Messages never acknowledged are not counted as
/// lost.
#[test]
fn kill9_under_load_loses_no_acknowledged_message_mqtt_4_3_3() {
    let started = Instant::now();
    let tmp = TempDir::new("dur-load");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "2", "--max-queued", "100000"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();
    // Each publisher's subscribers: one on its shard, one on the other.
    let pub1 = id_on_shard("ld-pub-q1", 0, 2);
    let pub2 = id_on_shard("ld-pub-q2", 1, 2);
    let sub_a = id_on_shard("ld-sub-a", 0, 2);
    let sub_b = id_on_shard("ld-sub-b", 1, 2);
    let stop = tmp.path("stop");
    let pubs = format!("{pub1}:1,{pub2}:2");
    let subs = format!("{sub_a},{sub_b}");
    let mut load = LineProc::spawn(&mut python_script(
        "paho_durable.py",
        &[
            &port.to_string(),
            "load",
            stop.to_str().unwrap(),
            "200",
            &pubs,
            &subs,
        ],
    ));
    load.wait_line(20 * SEC, |l| l.contains("\"ready\""));

    let mut rng = Rng::from_env();
    let kills = 4;
    for k in 0..kills {
        let delay = 200 + rng.below(1300);
        thread::sleep(Duration::from_millis(delay));
        broker.kill9();
        let down = rng.below(300);
        thread::sleep(Duration::from_millis(down));
        broker = broker.restart(&args);
        println!(
            "kill {}: SIGKILL after {delay} ms of load, restarted after {down} ms",
            k + 1
        );
    }
    // Load on the last process too, then drain.
    thread::sleep(SEC);
    std::fs::write(&stop, b"").unwrap();

    let mut pubs_out: HashMap<String, (u64, u64, Vec<u64>)> = HashMap::new();
    let mut subs_out: HashMap<String, Vec<(String, u64, u64)>> = HashMap::new();
    let deadline = Instant::now() + 60 * SEC;
    while pubs_out.len() + subs_out.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = load.next_line(left).unwrap_or_else(|| {
            panic!(
                "the load script gave no results; stdout {:?}; stderr {}",
                load.seen,
                load.stderr()
            )
        });
        let o = json::parse_object(&line).unwrap_or_else(|| panic!("not JSON: {line}"));
        assert!(!o.contains_key("error"), "{line}; stderr {}", load.stderr());
        let n = |k: &str| o[k].as_u64().unwrap_or_else(|| panic!("{k} in {line}"));
        let sessions_lost = n("session_lost");
        let connects = n("connects");
        if let Some(id) = o.get("pub").and_then(|v| v.as_str()) {
            assert_eq!(
                sessions_lost, 0,
                "{id}: a reconnection got sessionPresent=0 (MQTT-3.2.2-2)"
            );
            let acked: Vec<u64> = o["acked"]
                .as_str()
                .unwrap()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            println!(
                "{id}: {connects} connections, sent {}, acknowledged {}",
                n("sent"),
                acked.len()
            );
            pubs_out.insert(id.to_string(), (n("qos"), n("sent"), acked));
        } else if let Some(id) = o.get("sub").and_then(|v| v.as_str()) {
            assert_eq!(
                sessions_lost, 0,
                "{id}: a reconnection got sessionPresent=0 (MQTT-3.2.2-2)"
            );
            println!("{id}: {connects} connections");
            let got = o["received"]
                .as_str()
                .unwrap()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|r| {
                    // pub:seq:qos:dup
                    let f: Vec<&str> = r.split(':').collect();
                    assert_eq!(f.len(), 4, "{r}");
                    (
                        f[0].to_string(),
                        f[1].parse().unwrap(),
                        f[2].parse().unwrap(),
                    )
                })
                .collect();
            subs_out.insert(id.to_string(), got);
        } else {
            panic!("unexpected line {line}");
        }
    }

    let mut problems = Vec::new();
    for (pid, (qos, sent, acked)) in &pubs_out {
        assert!(
            acked.len() as u64 >= sent / 2 && !acked.is_empty(),
            "{pid}: only {} of {sent} acknowledged after the drain",
            acked.len()
        );
        let unacked = sent - acked.len() as u64;
        for (sid, got) in &subs_out {
            let mut count: HashMap<u64, u64> = HashMap::new();
            for (p, seq, q) in got {
                if p == pid {
                    *count.entry(*seq).or_default() += 1;
                    assert!(
                        *q == *qos,
                        "{sid}: {pid}:{seq} delivered at QoS {q}, published at {qos}"
                    );
                    assert!(*seq < *sent, "{sid}: {pid}:{seq} was never sent");
                }
            }
            let missing: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|s| !count.contains_key(s))
                .collect();
            let dups: Vec<u64> = count
                .iter()
                .filter(|(_, &c)| c > 1)
                .map(|(s, _)| *s)
                .collect();
            let extra = count.keys().filter(|s| !acked.contains(s)).count();
            println!(
                "{pid} (QoS {qos}) -> {sid}: acknowledged {}, delivered {} distinct, \
                 missing {}, duplicates {}, unacknowledged-in-flight {unacked}, delivered-but-unacked {extra}",
                acked.len(),
                count.len(),
                missing.len(),
                dups.len()
            );
            if !missing.is_empty() {
                let mut m = missing.clone();
                m.sort_unstable();
                problems.push(format!(
                    "{sid} never got {} acknowledged message(s) of {pid} (QoS {qos}), e.g. {:?}",
                    m.len(),
                    &m[..m.len().min(10)]
                ));
            }
            if *qos == 2 && !dups.is_empty() {
                let mut d = dups.clone();
                d.sort_unstable();
                problems.push(format!(
                    "{sid} got {} QoS 2 message(s) of {pid} more than once (MQTT-4.3.3), e.g. {:?}",
                    d.len(),
                    &d[..d.len().min(10)]
                ));
            }
        }
        // The retained message on load/PID: an acknowledged one or a later
        // one, never an older one.
        let ret = read_retained(port, &format!("load/{pid}"), 5);
        let seq: u64 = ret
            .strip_prefix(&format!("{pid}:"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("retained load/{pid} is {ret:?}"));
        let last_acked = acked.iter().max().copied().unwrap_or(0);
        println!("retained load/{pid}: seq {seq} (last acknowledged {last_acked}, sent {sent})");
        if seq < last_acked || seq >= *sent {
            problems.push(format!(
                "retained load/{pid} holds seq {seq}; last acknowledged {last_acked}, sent {sent}"
            ));
        }
    }
    if !problems.is_empty() {
        // COREMQ_TEST_KEEP=DIR keeps the data dir (and, with PAHO_LOG_DIR,
        // the script writes each client's packet log) for a look.
        if let Ok(keep) = std::env::var("COREMQ_TEST_KEEP") {
            let _ = Command::new("cp").args(["-a", &data, &keep]).status();
            println!("data dir copied to {keep}");
        }
    }
    assert!(
        problems.is_empty(),
        "after {kills} SIGKILLs:\n{}\nbroker stderr (last process):\n{}",
        problems.join("\n"),
        broker.log_text()
    );
    let s = broker.fresh_stats();
    println!(
        "last process: log_commits={} log_bytes={}; whole test {:?}",
        s["log_commits"],
        s["log_bytes"],
        started.elapsed()
    );
}

// ------------------------------------------------------------ 3. damaged files

/// A log cut in the middle of its last record (a torn write): the broker
/// starts, says which file lost how many bytes, counts it in
/// `log_tails_dropped`, and the sessions written before the tear resume
/// with their queued message.
#[test]
fn truncated_log_tail_is_cut_and_earlier_sessions_survive() {
    let tmp = TempDir::new("dur-cut");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "1"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();
    park_session(port, "cut-a", "cut/a", 1);
    publish_q1(port, "cut/a", "for-a", false);
    publish_q1(port, "cut/ret", "kept", true);
    park_session(port, "cut-b", "cut/b", 1);
    publish_q1(port, "cut/b", "for-b", false);
    broker.kill9();

    let log = tmp.path("data/shard-0/log");
    let bytes = std::fs::read(&log).unwrap();
    let f = frames(&bytes);
    let (start, len) = *f.last().expect("records in the log");
    let cut = start + 8 + len / 2;
    std::fs::write(&log, &bytes[..cut]).unwrap();
    println!(
        "{} frames; log cut to {cut} bytes, inside the last record",
        f.len()
    );

    let broker = broker.restart(&args);
    let n = dropped_bytes_warning(&broker, &log);
    assert!(n > 0, "dropped {n} bytes");
    broker.wait_for_stat("log_tails_dropped", |n| n >= 1, 5 * SEC);
    let (mut a, present) = resume(port, "cut-a");
    assert!(present, "cut-a's session was written before the tear");
    a.expect_publish("cut/a", b"for-a", 5 * SEC);
    assert_eq!(read_retained(port, "cut/ret", 5), "kept");
}

/// One byte flipped inside a record in the middle of the log: the broker
/// starts, says what it dropped, and everything before that record
/// survives. The log is cut there for good: a second restart finds nothing
/// to drop, and what was written after the first restart is kept.
#[test]
fn flipped_byte_mid_log_drops_from_there_and_keeps_what_came_before() {
    let tmp = TempDir::new("dur-flip");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "1"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();
    for i in 1..=6 {
        park_session(port, &format!("flip-{i}"), &format!("flip/{i}"), 1);
        publish_q1(port, &format!("flip/{i}"), &format!("m{i}"), false);
    }
    broker.kill9();

    let log = tmp.path("data/shard-0/log");
    let mut bytes = std::fs::read(&log).unwrap();
    let f = frames(&bytes);
    let (start, len) = *f
        .iter()
        .find(|(s, l)| contains(&bytes[s + 8..s + 8 + l], b"flip-4"))
        .expect("a record of flip-4");
    let at = start + 8 + len / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    println!(
        "{} frames; flipped byte {at}, in the first record of flip-4",
        f.len()
    );

    let mut broker = broker.restart(&args);
    let n = dropped_bytes_warning(&broker, &log);
    assert!(
        n > len as u64,
        "dropped {n} bytes: the bad record and the rest"
    );
    broker.wait_for_stat("log_tails_dropped", |n| n >= 1, 5 * SEC);
    for i in 1..=3 {
        let (mut c, present) = resume(port, &format!("flip-{i}"));
        assert!(present, "flip-{i} was written before the flipped byte");
        c.expect_publish(&format!("flip/{i}"), format!("m{i}").as_bytes(), 5 * SEC);
        c.send(&common::disconnect_packet());
    }
    // Written after the cut: must be read back.
    park_session(port, "flip-new", "flip/new", 1);
    publish_q1(port, "flip/new", "after", false);
    broker.terminate();
    let broker = broker.restart(&args);
    assert!(!broker.log_contains("dropped"), "{}", broker.log_text());
    assert_eq!(broker.fresh_stats()["log_tails_dropped"], 0);
    let (mut c, present) = resume(port, "flip-new");
    assert!(present);
    c.expect_publish("flip/new", b"after", 5 * SEC);
}

/// An empty log file, a shard dir without a log, a log of zeros (padding
/// only), and an empty data dir: all start cleanly with nothing dropped,
/// and then keep sessions as usual.
#[test]
fn empty_log_and_empty_dirs_start_fine() {
    let tmp = TempDir::new("dur-empty");
    let data = tmp.path("data");
    std::fs::create_dir_all(data.join("shard-0")).unwrap();
    std::fs::create_dir_all(data.join("shard-1")).unwrap();
    std::fs::create_dir_all(data.join("shard-2")).unwrap();
    std::fs::write(data.join("meta"), "coremq-data 1\nshards 3\n").unwrap();
    std::fs::write(data.join("shard-0/log"), b"").unwrap();
    std::fs::write(data.join("shard-2/log"), vec![0u8; 4096]).unwrap();
    let data_s = data.to_str().unwrap();
    let args = flags(Some(data_s), &["--shards", "3"]);
    let mut broker = Broker::start(&args);
    assert_state_loaded(&broker, 0, 0, 0);
    assert!(!broker.log_contains("dropped"), "{}", broker.log_text());
    assert_eq!(broker.fresh_stats()["log_tails_dropped"], 0);
    let port = broker.port();
    park_session(port, "empty-a", "empty/a", 1);
    broker.terminate();
    let broker = broker.restart(&args);
    assert!(
        resume(port, "empty-a").1,
        "the session written after the empty start"
    );
    drop(broker);

    // A data dir that exists but is empty (no meta).
    let empty = TempDir::new("dur-empty-dir");
    let dir_s = empty.0.to_str().unwrap();
    let broker = Broker::start(&flags(Some(dir_s), &["--shards", "2"]));
    assert_state_loaded(&broker, 0, 0, 0);
    assert!(empty.path("meta").exists());
}

// -------------------------------------------------------------- 4. the lock

/// A second coremq on a data dir in use exits non-zero with one error line
/// saying so (and the first keeps serving); a data dir written by a newer
/// format is refused, and its meta left as it was.
#[test]
fn second_broker_and_newer_format_are_refused() {
    let tmp = TempDir::new("dur-lock");
    let data = data_dir(&tmp);
    let broker = Broker::start(&flags(Some(&data), &["--shards", "2"]));
    let second = |data: &str| {
        let listen = format!("127.0.0.1:{}", unused_port());
        run_bounded(
            Command::new(COREMQ).args(["--listen", &listen, "--data-dir", data, "--shards", "2"]),
            10 * SEC,
        )
    };
    let (code, _out, err) = second(&data);
    assert!(
        matches!(code, Some(c) if c != 0),
        "second coremq: exit {code:?}; {err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(
        errors[0].contains("in use by another coremq") && errors[0].contains(&data),
        "{err}"
    );
    assert!(
        errors[0].contains(&format!("pid {}", broker.pid())),
        "{err}"
    );
    // The first is untouched.
    park_session(broker.port(), "lock-a", "lock/a", 1);
    drop(broker);

    let newer = TempDir::new("dur-newer");
    let meta = "coremq-data 99\nshards 2\n";
    std::fs::write(newer.path("meta"), meta).unwrap();
    let (code, _out, err) = second(newer.0.to_str().unwrap());
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}; {err}");
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains("written by a newer coremq"), "{err}");
    assert_eq!(std::fs::read_to_string(newer.path("meta")).unwrap(), meta);
}

// ------------------------------------------------------------- 5. re-homing

/// Sessions and retained messages written with 3 shards come back with 2,
/// then with 1: every session resumes (sessionPresent=1) and gets the
/// message queued for it, and the retained topics are still there.
#[test]
fn shard_count_change_rehomes_sessions_and_retained() {
    let tmp = TempDir::new("dur-rehome");
    let data = data_dir(&tmp);
    let ids: Vec<String> = (0..3)
        .flat_map(|s| (0..3).map(move |k| id_on_shard(&format!("rh{k}"), s, 3)))
        .collect();
    let mut broker = Broker::start(&flags(Some(&data), &["--shards", "3"]));
    let port = broker.port();
    for id in &ids {
        park_session(port, id, &format!("rh/{id}"), 1);
    }
    for t in 0..6 {
        publish_q1(port, &format!("rh/ret/{t}"), &format!("r{t}"), true);
    }
    let mut queued = "shards-3";
    for id in &ids {
        publish_q1(port, &format!("rh/{id}"), queued, false);
    }
    for shards in ["2", "1"] {
        broker.terminate();
        broker = broker.restart(&flags(Some(&data), &["--shards", shards]));
        assert!(broker.log_contains("re-homed"), "{}", broker.log_text());
        assert_state_loaded(&broker, ids.len(), ids.len(), 6);
        for id in &ids {
            let (mut c, present) = resume(port, id);
            assert!(present, "{id} after re-homing to {shards} shard(s)");
            c.expect_publish(&format!("rh/{id}"), queued.as_bytes(), 5 * SEC);
            c.send(&common::disconnect_packet());
            c.expect_closed(5 * SEC);
        }
        for t in 0..6 {
            assert_eq!(
                read_retained(port, &format!("rh/ret/{t}"), 5),
                format!("r{t}")
            );
        }
        queued = if shards == "2" {
            "shards-2"
        } else {
            "shards-1"
        };
        for id in &ids {
            publish_q1(port, &format!("rh/{id}"), queued, false);
        }
        println!(
            "{} sessions and 6 retained re-homed to {shards} shard(s)",
            ids.len()
        );
    }
    // Crash with 1 shard, back to 3: the messages queued last are there.
    broker.kill9();
    let broker = broker.restart(&flags(Some(&data), &["--shards", "3"]));
    assert!(broker.log_contains("re-homed"));
    for id in &ids {
        let (mut c, present) = resume(port, id);
        assert!(present, "{id} back on 3 shards");
        c.expect_publish(&format!("rh/{id}"), queued.as_bytes(), 5 * SEC);
    }
}

// --------------------------------------------------------- 6. wills after a crash

/// A persistent client with a will is connected when the broker is
/// SIGKILLed: after the restart its will is published once (MQTT-3.1.2-8:
/// the connection ended without DISCONNECT), to a persistent subscriber
/// that was offline, and not again after a further restart.
#[test]
fn will_of_client_connected_at_crash_is_published_once() {
    let tmp = TempDir::new("dur-will");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "2"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();
    park_session(port, "will-watch", "will/#", 1);
    let (mut dev, _) = RawClient::connect(
        port,
        &persistent("will-dev").will("will/dev", b"offline", 1, false),
    );
    // A SUBACK waits for the disk: the session (and its will) is written.
    dev.subscribe("dev/cmd", 1);
    broker.kill9();
    drop(dev);

    let mut broker = broker.restart(&args);
    let (mut w, present) = resume(port, "will-watch");
    assert!(present);
    w.expect_publish("will/dev", b"offline", 5 * SEC);
    w.expect_silence(SEC);
    broker.wait_for_stat("wills", |n| n == 1, 5 * SEC);
    w.send(&common::disconnect_packet());
    w.expect_closed(5 * SEC);

    broker.terminate();
    let broker = broker.restart(&args);
    let (mut w, present) = resume(port, "will-watch");
    assert!(present);
    w.expect_silence(2 * SEC);
    assert_eq!(
        broker.fresh_stats()["wills"],
        0,
        "published once, not at every start"
    );
    // The device's session itself was kept (offline).
    assert!(resume(port, "will-dev").1);
}

/// 5.0 wills with a Will Delay Interval, clients connected at the crash:
/// one comes back within its delay, so its will is not published
/// (MQTT-3.1.3-9); the other does not, and its will comes after the delay.
#[test]
fn will_delay_after_crash_reconnect_in_time_cancels_mqtt_3_1_3_9() {
    let tmp = TempDir::new("dur-will5");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "2"]);
    let mut broker = Broker::start(&args);
    let port = broker.port();
    park_session(port, "will5-watch", "will5/#", 1);
    let mut devs = Vec::new();
    for (id, delay) in [("will5-back", 3), ("will5-gone", 1)] {
        let mut c = RawClient::tcp(port).v5();
        c.send(&v5_connect_with_will(
            id,
            600,
            &format!("will5/{id}"),
            delay,
        ));
        let ack = c.expect_connack(5 * SEC);
        assert_eq!(ack.code, 0);
        // SUBACK: on disk.
        let mut sub = BytesMut::new();
        Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            filters: vec![(
                TopicFilter::new(ByteString::from("x/y")).unwrap(),
                SubscriptionOptions::qos(QoS::AtLeastOnce),
            )],
            properties: None,
        })
        .encode(ProtocolVersion::V5, &mut sub);
        c.send(&sub);
        match c.next_packet(5 * SEC) {
            Ok(Packet::SubAck(_)) => {}
            other => panic!("{id}: expected SUBACK, got {other:?}"),
        }
        devs.push(c);
    }
    broker.kill9();
    drop(devs);

    let restarted = Instant::now();
    let broker = broker.restart(&args);
    let mut back = RawClient::tcp(port).v5();
    back.send(&v5_connect_with_will(
        "will5-back",
        600,
        "will5/will5-back",
        3,
    ));
    let ack = back.expect_connack(5 * SEC);
    assert_eq!(ack.code, 0);
    assert!(ack.session_present, "MQTT-3.2.2-2: its session was kept");
    let reconnected = restarted.elapsed();
    assert!(reconnected < 2 * SEC, "reconnected after {reconnected:?}");

    let (mut w, present) = resume(port, "will5-watch");
    assert!(present);
    let p = w
        .next_publish(5 * SEC)
        .expect("the will of the client that stayed away");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_ref()),
        ("will5/will5-gone", &b"gone"[..])
    );
    // Past will5-back's 3 s delay (counted from the restart at the latest).
    let quiet = (4 * SEC).saturating_sub(restarted.elapsed());
    w.expect_silence(quiet.max(SEC));
    assert_eq!(broker.fresh_stats()["wills"], 1);
    drop(back);
}

// ---------------------------------------------------------- 7. SUBACK durability

/// SUBACK for a persistent session is sent once the subscription is on
/// disk: a SIGKILL right after it does not lose the subscription, and a
/// message published after the restart reaches the resumed session.
#[test]
fn subscription_acknowledged_before_kill9_is_kept() {
    let tmp = TempDir::new("dur-suback");
    let data = data_dir(&tmp);
    let args = flags(Some(&data), &["--shards", "2"]);
    let mut broker = Broker::start(&args);
    let ids = [id_on_shard("sa", 0, 2), id_on_shard("sa", 1, 2)];
    for round in 0..3 {
        let port = broker.port();
        let mut clients = Vec::new();
        for id in &ids {
            let (mut c, _) = resume(port, id);
            c.send(&subscribe_packet(&format!("sa/{id}/{round}"), 1));
            clients.push(c);
        }
        for c in &mut clients {
            match c.next_packet(5 * SEC) {
                Ok(Packet::SubAck(a)) => assert_eq!(a.codes, vec![1]),
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
        // At once: no time for anything but what SUBACK promised.
        broker.kill9();
        drop(clients);
        broker = broker.restart(&args);
        let port = broker.port();
        for id in &ids {
            publish_q1(port, &format!("sa/{id}/{round}"), "after", false);
        }
        for id in &ids {
            let (mut c, present) = resume(port, id);
            assert!(present, "{id}, round {round}");
            c.expect_publish(&format!("sa/{id}/{round}"), b"after", 5 * SEC);
            c.send(&common::disconnect_packet());
            c.expect_closed(5 * SEC);
        }
    }
}

// ---------------------------------------------------- 5. group commit spacing

/// Commits of a shard under a steady trickle of QoS 1 publishes to a
/// persistent subscriber (one every 5 ms for 0.5 s), with
/// `--commit-interval-usec USEC`: every PUBACK arrives, the subscriber gets
/// every message after a kill -9, and the number of commits is returned.
fn commits_under_trickle(interval_usec: &str) -> u64 {
    let tmp = TempDir::new("dur-spacing");
    let data = data_dir(&tmp);
    let args = flags(
        Some(&data),
        &["--shards", "1", "--commit-interval-usec", interval_usec],
    );
    let mut broker = Broker::start(&args);
    let port = broker.port();
    park_session(port, "spaced-sub", "spaced/#", 1);
    let before = broker.fresh_stats()["log_commits"];
    let (mut publ, _) = RawClient::connect(port, &ConnectOpts::id("spaced-pub"));
    const N: u16 = 100;
    for i in 1..=N {
        publ.send(&common::publish_packet(
            "spaced/t",
            &i.to_be_bytes(),
            1,
            false,
            i,
        ));
        thread::sleep(Duration::from_millis(5));
    }
    for i in 1..=N {
        match publ.next_packet(5 * SEC) {
            Ok(Packet::PubAck(a)) => assert_eq!(a.packet_id.get(), i),
            other => panic!("interval {interval_usec}: expected PUBACK {i}, got {other:?}"),
        }
    }
    let commits = broker.fresh_stats()["log_commits"] - before;
    broker.kill9();
    broker = broker.restart(&args);
    let (mut sub, present) = resume(broker.port(), "spaced-sub");
    assert!(present);
    for i in 1..=N {
        sub.expect_publish("spaced/t", &i.to_be_bytes(), 5 * SEC);
    }
    commits
}

/// `--commit-interval-usec` spaces a shard's commits: at 100 ms a trickle
/// of 100 publishes over 0.5 s goes down in a handful of commits, at 0 in
/// many more (each as soon as the last is durable); either way every
/// acknowledged message survives a kill -9.
#[test]
fn commit_interval_gathers_a_trickle_into_few_commits() {
    let spaced = commits_under_trickle("100000");
    let eager = commits_under_trickle("0");
    println!("commits: {spaced} at 100 ms apart, {eager} at 0");
    assert!(spaced <= 10, "{spaced} commits at 100 ms apart over 0.5 s");
    assert!(
        eager > 3 * spaced,
        "{eager} commits at 0 against {spaced} at 100 ms"
    );
}

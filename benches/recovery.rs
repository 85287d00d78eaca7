//! Recovery with `--data-dir`: how long the real broker takes to load a
//! large durable state at start, and what that state costs on disk and in
//! memory.
//!
//! The state is made by the sans-IO broker itself, two shards driven side
//! by side (their mesh messages carried between them, every log commit
//! acknowledged at once), through the codec, bytes in as a socket read
//! would hand them over:
//!
//! - `RECOVERY_SESSIONS` persistent sessions (default 1,000,000; half
//!   3.1.1 with cleanSession=0, half 5.0 with a 7-day Session Expiry
//!   Interval), each connecting to the shard that owns its clientId,
//!   SUBSCRIBEing to 2 filters (its own `cmd/dev-N/#` and a region's
//!   `fleet/rR/cfg`, QoS 1), then DISCONNECTing;
//! - `RECOVERY_RETAINED` retained messages (default 100,000) of
//!   `RECOVERY_PAYLOAD` bytes (default 64), QoS 1, on `state/dev-N`,
//!   published on the shard that owns each topic (no subscription matches
//!   them: no message is queued to any session).
//!
//! What each shard's broker then says is written as `DIR/shard-K/log`:
//! its `snapshot()` (`RECOVERY_FORM=snapshot`, the default: a log right
//! after compaction) or every record `take_log()` returned while the state
//! was built (`RECOVERY_FORM=log`: the log as written, no compaction), and
//! `DIR/meta`. Then `target/release/coremq --data-dir DIR --shards 2` is
//! started (`COREMQ_BIN` to name another binary) and timed: to its
//! `state loaded ... ms=` line (the replay of both logs, in parallel), to
//! its `ready` line, and to a CONNACK with sessionPresent=1 for a clientId
//! of each shard (every shard has restored its state and serves). Its RSS
//! is read then, and it is killed by its pid.
//!
//! `cargo bench --bench recovery` runs the full size. Without `--bench`
//! (as `cargo test --all-targets` runs it) it is a smoke run of 20,000
//! sessions and 2,000 retained messages, loaded in-process with
//! `shard::store::open` instead of starting the binary.
//! `RECOVERY_DIR` puts the data dir elsewhere than the temporary
//! directory; `RECOVERY_KEEP=1` leaves it in place.
//! Figures and context: BENCHMARKS.md, "Durability (issue 11)".

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use coremq::metrics::Counters;
use coremq::proto::broker::{Broker, BrokerConfig, Event, ShardMsg};
use coremq::proto::codec::{
    self, Connect, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, Subscribe,
    SubscriptionOptions,
};
use coremq::proto::handshake::owner_of;
use coremq::proto::persist::FORMAT_VERSION;
use coremq::proto::retained::retained_owner;
use coremq::proto::topic::{TopicFilter, TopicName};
use coremq::proto::{Millis, ShardId};

#[path = "support/fleet.rs"]
mod fleet;
use fleet::{client_id, encode, version};

const SHARDS: u16 = 2;
/// 5.0 sessions' Session Expiry Interval: a week.
const EXPIRY_SECS: u32 = 7 * 86_400;
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A persistent session's CONNECT, as the handshake hands it to the broker.
fn connect_packet(id: &str, v: ProtocolVersion) -> Connect {
    let properties = (v == ProtocolVersion::V5).then(|| {
        Box::new(Properties {
            session_expiry_interval: Some(EXPIRY_SECS),
            ..Properties::default()
        })
    });
    let mut bytes = encode(
        &Packet::Connect(Box::new(Connect {
            protocol: v,
            clean_start: false,
            keep_alive: 60,
            client_id: ByteString::from(id),
            will: None,
            username: None,
            password: None,
            properties,
        })),
        v,
    );
    match codec::decode(&mut bytes, ProtocolVersion::V3_1_1, usize::MAX) {
        Ok(Some(Packet::Connect(c))) => *c,
        other => panic!("not a CONNECT: {other:?}"),
    }
}

fn subscribe_bytes(i: u32) -> BytesMut {
    let filters = vec![
        (
            TopicFilter::new(format!("cmd/{}/#", client_id(i))).expect("valid"),
            SubscriptionOptions::qos(QoS::AtLeastOnce),
        ),
        (
            TopicFilter::new(format!("fleet/r{}/cfg", i % 1000)).expect("valid"),
            SubscriptionOptions::qos(QoS::AtLeastOnce),
        ),
    ];
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).expect("1"),
            filters,
            properties: None,
        }),
        version(i),
    )
}

fn retained_topic(t: u32) -> String {
    format!("state/dev-{t:08}")
}

/// Two shards' brokers with their mesh carried by hand, every log commit
/// durable at once; what they log is kept when `keep_log`.
struct Cluster {
    brokers: Vec<Broker>,
    inbox: Vec<VecDeque<ShardMsg>>,
    logs: Vec<BytesMut>,
    keep_log: bool,
    now: Millis,
}

impl Cluster {
    fn new(keep_log: bool) -> Cluster {
        let counters = Arc::new(Counters::default());
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let brokers = (0..SHARDS)
            .map(|k| {
                let mut cfg = BrokerConfig::new(ShardId(k), SHARDS);
                cfg.persist = true;
                cfg.wall_epoch_ms = wall;
                Broker::new(cfg, counters.clone(), Millis(0))
            })
            .collect();
        Cluster {
            brokers,
            inbox: (0..SHARDS).map(|_| VecDeque::new()).collect(),
            logs: (0..SHARDS).map(|_| BytesMut::new()).collect(),
            keep_log,
            now: Millis(0),
        }
    }

    /// Until nothing moves: mesh messages delivered, events carried out
    /// (writes dropped, closes released), logs committed.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for k in 0..self.brokers.len() {
                while let Some(m) = self.inbox[k].pop_front() {
                    self.brokers[k].handle_remote(m, self.now);
                    moved = true;
                }
                while let Some(e) = self.brokers[k].poll_event() {
                    moved = true;
                    let b = &mut self.brokers[k];
                    match e {
                        Event::Transmit(c) => {
                            b.take_outgoing(c);
                        }
                        Event::Close(c) => {
                            b.take_outgoing(c);
                            b.release(c);
                        }
                        Event::Broadcast(m) => {
                            for (j, inbox) in self.inbox.iter_mut().enumerate() {
                                if j != k {
                                    inbox.push_back(m.clone());
                                }
                            }
                        }
                        Event::SendTo(to, m) => self.inbox[to.0 as usize].push_back(m),
                        // Queues fill only for offline sessions here, which
                        // drop at once: reads are never held.
                        Event::Resume(_) => {}
                    }
                }
                if let Some((records, generation)) = self.brokers[k].take_log() {
                    if self.keep_log {
                        self.logs[k].extend_from_slice(&records);
                    }
                    self.brokers[k].committed(generation);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn snapshots(&self) -> Vec<BytesMut> {
        self.brokers
            .iter()
            .map(|b| {
                let mut out = BytesMut::new();
                b.snapshot(&mut out);
                out
            })
            .collect()
    }
}

/// What is written as the shards' logs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Snapshot,
    Log,
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn write_dir(dir: &Path, logs: &[BytesMut]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create the data dir");
    std::fs::write(
        dir.join("meta"),
        format!("coremq-data {FORMAT_VERSION}\nshards {SHARDS}\n"),
    )
    .expect("write meta");
    for (k, log) in logs.iter().enumerate() {
        let sdir = dir.join(format!("shard-{k}"));
        std::fs::create_dir_all(&sdir).expect("create shard dir");
        let mut f = std::fs::File::create(sdir.join("log")).expect("create log");
        f.write_all(log).expect("write log");
        f.sync_all().expect("sync log");
    }
}

fn coremq_bin() -> PathBuf {
    std::env::var_os("COREMQ_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/coremq"),
        PathBuf::from,
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Connects `id` (3.1.1, cleanSession=0) and returns when its CONNACK
/// comes, with its sessionPresent flag; DISCONNECTs after.
fn session_present(port: u16, id: &str, deadline: Instant) -> bool {
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                let c = connect_packet(id, ProtocolVersion::V3_1_1);
                let bytes = encode(&Packet::Connect(Box::new(c)), ProtocolVersion::V3_1_1);
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                s.write_all(&bytes).expect("write CONNECT");
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).expect("read CONNACK");
                assert_eq!(ack[0], 0x20, "not a CONNACK: {ack:?}");
                assert_eq!(ack[3], 0, "CONNACK refused: {ack:?}");
                let _ = s.write_all(&DISCONNECT);
                return ack[2] & 1 == 1;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connecting to the broker: {e}"),
        }
    }
}

/// Kills the broker by its pid when dropped.
struct Broker0(Child);

impl Drop for Broker0 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on `dir` and times its start; `sessions` 0: an empty
/// directory, only its RSS once ready (KiB) is wanted.
fn start_binary(dir: &Path, sessions: u32) -> Option<u64> {
    let bin = coremq_bin();
    if !bin.exists() {
        println!(
            "  {} not found: build it first (cargo build --release), or set COREMQ_BIN",
            bin.display()
        );
        return None;
    }
    let port = free_port();
    let t0 = Instant::now();
    let child = Command::new(&bin)
        .args([
            "--data-dir",
            dir.to_str().expect("utf-8 path"),
            "--shards",
            &SHARDS.to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "info",
            "--stats-interval",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coremq");
    let mut child = Broker0(child);
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    for pipe in [
        child
            .0
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .0
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = t0 + Duration::from_secs(120);
    let mut loaded: Option<(Duration, String)> = None;
    let mut ready: Option<Duration> = None;
    while ready.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if line.contains("state loaded") {
                    loaded = Some((at - t0, line));
                } else if line.contains(" ready") {
                    ready = Some(at - t0);
                } else if line.contains("ERROR") || line.contains("error") {
                    println!("  coremq: {line}");
                }
            }
            Err(_) => {
                println!("  coremq gave no ready line within 120 s (or exited)");
                return None;
            }
        }
    }
    if sessions == 0 {
        std::thread::sleep(Duration::from_millis(200));
        return Some(rss_kib(pid));
    }
    // The first client id each shard owns: its CONNACK comes once that
    // shard has restored its state.
    let mut serving = Vec::new();
    for k in 0..SHARDS {
        let i = (0..sessions)
            .find(|&i| owner_of(&client_id(i), SHARDS) == ShardId(k))
            .expect("a session on every shard");
        let present = session_present(port, &client_id(i), deadline);
        serving.push((k, t0.elapsed(), present));
    }
    let rss = rss_kib(pid);
    let (loaded_at, line) = loaded.expect("a state loaded line before ready");
    let ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .unwrap_or("?");
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("?")
            .to_string()
    };
    println!("  coremq --data-dir --shards {SHARDS} (pid {pid}):");
    println!(
        "    state loaded: sessions={} messages={} retained={}; replay ms={ms} (its own figure), \
         line at {:.0} ms after exec",
        field("sessions="),
        field("messages="),
        field("retained="),
        loaded_at.as_secs_f64() * 1e3
    );
    println!(
        "    ready line at {:.0} ms after exec",
        ready.expect("ready").as_secs_f64() * 1e3
    );
    for (k, at, present) in serving {
        println!(
            "    shard {k}: CONNACK sessionPresent={} at {:.0} ms after exec",
            u8::from(present),
            at.as_secs_f64() * 1e3
        );
        assert!(present, "shard {k}'s session was not restored");
    }
    drop(child);
    Some(rss)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sessions, retained) = if full {
        (
            env_u32("RECOVERY_SESSIONS", 1_000_000),
            env_u32("RECOVERY_RETAINED", 100_000),
        )
    } else {
        (20_000, 2_000)
    };
    let payload = env_u32("RECOVERY_PAYLOAD", 64) as usize;
    let form = match std::env::var("RECOVERY_FORM").as_deref() {
        Ok("log") => Form::Log,
        _ => Form::Snapshot,
    };
    let dir = std::env::var_os("RECOVERY_DIR").map_or_else(
        || std::env::temp_dir().join(format!("coremq-recovery-{}", std::process::id())),
        PathBuf::from,
    );

    let mut c = Cluster::new(form == Form::Log);
    let start = Instant::now();
    for i in 0..sessions {
        let id = client_id(i);
        let k = owner_of(&id, SHARDS).0 as usize;
        let now = c.now;
        let conn = c.brokers[k].connect(connect_packet(&id, version(i)), now);
        c.brokers[k].handle_read(conn, &mut subscribe_bytes(i), now);
        c.pump();
        c.brokers[k].handle_read(conn, &mut BytesMut::from(&DISCONNECT[..]), now);
        c.pump();
        if i % 10_000 == 9_999 {
            c.now = Millis(c.now.0 + 100);
            for b in &mut c.brokers {
                b.tick(c.now);
            }
            c.pump();
        }
    }
    let made_sessions = start.elapsed();
    let sessions_bytes: u64 = match form {
        Form::Snapshot => c.snapshots().iter().map(|s| s.len() as u64).sum(),
        Form::Log => c.logs.iter().map(|l| l.len() as u64).sum(),
    };

    // One clean publisher per shard, each publishing the topics its shard
    // owns.
    let start = Instant::now();
    let mut pubs = Vec::new();
    for k in 0..SHARDS {
        let id = (0u32..)
            .map(|j| format!("retainer-{j}"))
            .find(|id| owner_of(id, SHARDS) == ShardId(k))
            .expect("an id");
        let mut connect = connect_packet(&id, ProtocolVersion::V3_1_1);
        connect.clean_start = true;
        let now = c.now;
        pubs.push(c.brokers[k as usize].connect(connect, now));
    }
    c.pump();
    let body = Bytes::from(vec![0x5a; payload]);
    for t in 0..retained {
        let topic = retained_topic(t);
        let k = retained_owner(&topic, SHARDS).0 as usize;
        let publ = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: TopicName::new(topic).expect("valid"),
            packet_id: PacketId::new((t % 65_535 + 1) as u16),
            payload: body.clone(),
            properties: None,
        });
        let now = c.now;
        c.brokers[k].handle_read(pubs[k], &mut encode(&publ, ProtocolVersion::V3_1_1), now);
        c.pump();
    }
    for (k, &p) in pubs.iter().enumerate() {
        let now = c.now;
        c.brokers[k].handle_read(p, &mut BytesMut::from(&DISCONNECT[..]), now);
    }
    c.pump();
    let made_retained = start.elapsed();
    let in_brokers: (usize, usize) = c.brokers.iter().fold((0, 0), |(s, r), b| {
        (s + b.session_count(), r + b.retained_count())
    });
    assert_eq!(in_brokers.0, sessions as usize, "sessions in the brokers");
    assert_eq!(in_brokers.1, retained as usize, "retained in the brokers");

    let start = Instant::now();
    let logs = match form {
        Form::Snapshot => c.snapshots(),
        Form::Log => std::mem::take(&mut c.logs),
    };
    let total: u64 = logs.iter().map(|l| l.len() as u64).sum();
    let retained_bytes = total - sessions_bytes;
    drop(c);
    write_dir(&dir, &logs);
    drop(logs);
    let written = start.elapsed();

    println!(
        "{sessions} persistent sessions (half 3.1.1 cleanSession=0, half 5.0 expiry {EXPIRY_SECS} s; \
         2 QoS 1 subscriptions each, offline) and {retained} retained messages of {payload} B, \
         {SHARDS} shards"
    );
    println!(
        "  built in-process: sessions {:.1} s, retained {:.1} s; written as {} in {:.1} s to {}",
        made_sessions.as_secs_f64(),
        made_retained.as_secs_f64(),
        match form {
            Form::Snapshot => "each shard's snapshot()",
            Form::Log => "every record take_log() returned",
        },
        written.as_secs_f64(),
        dir.display()
    );
    println!(
        "  on disk: {:.1} MiB; {:.0} bytes per session, {:.0} bytes per retained message",
        mib(total),
        sessions_bytes as f64 / f64::from(sessions.max(1)),
        retained_bytes as f64 / f64::from(retained.max(1))
    );

    if full {
        let empty = dir.with_extension("empty");
        let _ = std::fs::remove_dir_all(&empty);
        let base = start_binary(&empty, 0);
        let _ = std::fs::remove_dir_all(&empty);
        if let (Some(base), Some(rss)) = (base, start_binary(&dir, sessions)) {
            println!(
                "    RSS after load: {:.1} MiB; {:.1} MiB on an empty --data-dir: {:.0} bytes \
                 per session (its retained share included)",
                rss as f64 / 1024.0,
                base as f64 / 1024.0,
                (rss.saturating_sub(base)) as f64 * 1024.0 / f64::from(sessions.max(1))
            );
        }
    } else {
        // Smoke: the broker's own loader, in-process.
        let counters = Arc::new(Counters::default());
        let t = Instant::now();
        let (held, starts) =
            coremq::shard::store::open(&dir, usize::from(SHARDS), &counters).expect("open");
        let s: usize = starts.iter().map(|s| s.recovered.sessions.len()).sum();
        let r: usize = starts.iter().map(|s| s.recovered.retained.len()).sum();
        println!(
            "  shard::store::open (in-process): {s} sessions, {r} retained in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(s, sessions as usize);
        assert_eq!(r, retained as usize);
        drop(held);
    }
    if std::env::var_os("RECOVERY_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

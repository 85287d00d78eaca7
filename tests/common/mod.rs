//! Shared harness for the integration tests: starts the real `coremq` binary
//! on a free loopback port, reads its counters from the log, talks raw MQTT to
//! it over `std::net`, and finds the real clients (mosquitto, paho, MQTT.js)
//! that `tests/support/ensure-tools.sh` installs.
//!
//! Every wait here is bounded: a test that hangs is a failed test, not a
//! stuck CI job. Processes are killed by the PID we spawned, never by name.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use coremq::proto::codec::{
    self, ConnAck, Connect, Disconnect, LastWill, Packet, PacketId, ProtocolVersion, Publish, QoS,
    Subscribe, SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};

pub mod certs;
pub mod json;

/// The broker binary cargo built for these tests.
pub const COREMQ: &str = env!("CARGO_BIN_EXE_coremq");

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/coremq-itest-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("coremq-itest-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- ports

/// Reserves a free loopback port for a broker.
///
/// The kernel picks the port (bind to port 0). The probe socket is bound with
/// SO_REUSEPORT and kept for the broker's lifetime without listening: the
/// broker's own SO_REUSEPORT listeners can still bind beside it, but nothing
/// else on the machine (another test's probe, another engineer's broker) can
/// take the port in between. A bound, non-listening socket never receives
/// connections, so it does not steal any from the broker.
fn reserve_port() -> (u16, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    for _ in 0..50 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.set_reuse_port(true).expect("SO_REUSEPORT");
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        s.bind(&addr.into()).expect("bind 127.0.0.1:0");
        let port = s
            .local_addr()
            .expect("local_addr")
            .as_socket()
            .expect("inet")
            .port();
        // Never the MQTT port, nor 2024 (another engineer's fixed port).
        if port != 1883 && port != 2024 {
            return (port, s);
        }
    }
    panic!("no free port found");
}

/// Waits up to `timeout` until something listens on `port` (any local
/// address, IPv4 or IPv6), by reading /proc/net/tcp{,6}: no probe
/// connection, so a TLS or WebSocket listener's counters (handshake and
/// upgrade failures) are not disturbed.
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    // local_address ADDR:PPPP (hex) in state 0A (LISTEN).
    let suffix = format!(":{port:04X}");
    wait_until(timeout, || {
        ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
                })
            })
        })
    })
}

/// One counter of a stats map ([`Broker::fresh_stats`]); a missing one
/// panics with the whole map (a counter that does not exist is not 0).
pub fn counter(stats: &HashMap<String, u64>, key: &str) -> u64 {
    *stats
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in the stats line: {stats:?}"))
}

/// A free port nobody listens on (for "connection refused" checks).
pub fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------- broker

/// The broker's log, shared with the thread that drains its stderr.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    eof: bool,
}

/// A running `coremq` process on 127.0.0.1, killed (by its PID) on drop.
pub struct Broker {
    child: Child,
    port: u16,
    log: Arc<Mutex<Log>>,
    reader: Option<JoinHandle<()>>,
    // Shared so that [`Broker::restart`] can hand it to the next process on
    // the same port.
    _port_guard: Arc<socket2::Socket>,
}

impl Broker {
    /// Starts `coremq --listen 127.0.0.1:PORT --shards 4 [--io $COREMQ_TEST_IO]
    /// --log-level info --stats-interval 1 EXTRA...` and waits (up to 10 s) until it says it
    /// is ready and accepts a TCP connection.
    pub fn start(extra_args: &[&str]) -> Broker {
        Broker::start_with(&[], extra_args)
    }

    /// Like [`Broker::start`], with `wrapper` put in front of the binary
    /// (e.g. `["prlimit", "--nofile=300:300", "--"]`). The wrapper must exec
    /// the broker so that the PID we hold is the broker's.
    pub fn start_with(wrapper: &[&str], extra_args: &[&str]) -> Broker {
        let (port, guard) = reserve_port();
        Broker::spawn_on(wrapper, port, Arc::new(guard), extra_args)
    }

    /// Starts a broker like [`Broker::start`] on the port this one used,
    /// after this one has exited (the test killed or stopped it; it is
    /// killed here if not). With `--data-dir`, the new process recovers what
    /// the old one left there. This broker's log is checked for a panic, as
    /// on drop.
    pub fn restart(self, extra_args: &[&str]) -> Broker {
        let port = self.port;
        let guard = Arc::clone(&self._port_guard);
        drop(self);
        Broker::spawn_on(&[], port, guard, extra_args)
    }

    /// SIGKILL (no chance to flush or clean up) and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
    }

    /// SIGTERM, then waits (up to 10 s) for a clean exit with status 0.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let code = self.wait_exit(Duration::from_secs(10));
        assert_eq!(
            code,
            Some(0),
            "exit status after SIGTERM; stderr:\n{}",
            self.log_text()
        );
    }

    /// Every stderr line so far that contains `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    fn spawn_on(
        wrapper: &[&str],
        port: u16,
        guard: Arc<socket2::Socket>,
        extra_args: &[&str],
    ) -> Broker {
        let listen = format!("127.0.0.1:{port}");
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.push(COREMQ.to_string());
        // Four shards, so cross-shard paths run, unless the test picks.
        let shards = if extra_args.contains(&"--shards") {
            &[][..]
        } else {
            &["--shards", "4"][..]
        };
        argv.extend(shards.iter().map(|s| s.to_string()));
        // The socket loop under test: scripts/test.sh runs the suite once
        // per loop (COREMQ_TEST_IO=uring, then epoll).
        if let Ok(io) = std::env::var("COREMQ_TEST_IO") {
            if !extra_args.contains(&"--io") {
                argv.extend(["--io".to_string(), io]);
            }
        }
        for a in [
            "--listen",
            &listen,
            "--log-level",
            "info",
            "--stats-interval",
            "1",
        ] {
            argv.push(a.to_string());
        }
        argv.extend(extra_args.iter().map(|s| s.to_string()));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Log::default()));
        let log2 = Arc::clone(&log);
        let reader = thread::spawn(move || {
            // Drained continuously so the broker never blocks on a full pipe.
            for line in BufReader::new(stderr).lines() {
                match line {
                    Ok(l) => log2.lock().unwrap().lines.push(l),
                    Err(_) => break,
                }
            }
            log2.lock().unwrap().eof = true;
        });
        let mut broker = Broker {
            child,
            port,
            log,
            reader: Some(reader),
            _port_guard: guard,
        };
        let ready = wait_until(Duration::from_secs(10), || {
            if broker.log_contains(" ready ") {
                return TcpStream::connect_timeout(&broker.addr(), Duration::from_millis(200))
                    .is_ok();
            }
            broker.log.lock().unwrap().eof
        });
        if !ready || !broker.is_running() {
            let status = broker.child.try_wait();
            panic!(
                "coremq {argv:?} did not become ready on port {port} within 10 s \
                 (exit: {status:?}); stderr:\n{}",
                broker.log_text()
            );
        }
        broker
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the broker (by its PID).
    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    /// Waits up to `timeout` for the broker to exit; its exit code (`None`
    /// if a signal ended it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "the broker did not exit within {timeout:?}; stderr:\n{}",
                self.log_text()
            )
        })
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it has written to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().lines.join("\n")
    }

    /// Whether any stderr line so far contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .lines
            .iter()
            .any(|l| l.contains(needle))
    }

    /// How many `stats` lines it has logged.
    fn stats_lines(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|l| stats_part(l).is_some())
            .count()
    }

    /// The latest periodic `stats k=v ...` line, parsed; empty before the
    /// first one.
    pub fn stats(&self) -> HashMap<String, u64> {
        let log = self.log.lock().unwrap();
        log.lines
            .iter()
            .rev()
            .find_map(|l| stats_part(l))
            .map(parse_stats)
            .unwrap_or_default()
    }

    /// One counter from the latest stats line (0 before the first line).
    pub fn stat(&self, key: &str) -> u64 {
        self.stats().get(key).copied().unwrap_or(0)
    }

    /// Waits for a stats line that is logged after this call (so it reflects
    /// everything done before it), and returns it.
    pub fn fresh_stats(&self) -> HashMap<String, u64> {
        let seen = self.stats_lines();
        assert!(
            wait_until(Duration::from_secs(5), || self.stats_lines() >= seen + 2),
            "no new stats line within 5 s; stderr:\n{}",
            self.log_text()
        );
        self.stats()
    }

    /// Waits until counter `key` in the latest stats line satisfies `pred`;
    /// returns its value, or panics with the log after `timeout`.
    pub fn wait_for_stat(&self, key: &str, pred: impl Fn(u64) -> bool, timeout: Duration) -> u64 {
        let mut last = None;
        let ok = wait_until(timeout, || {
            let s = self.stats();
            last = s.get(key).copied();
            last.is_some_and(&pred)
        });
        if !ok {
            panic!(
                "stat {key} never satisfied the condition within {timeout:?} (last value {last:?}); \
                 latest stats: {:?}",
                self.stats()
            );
        }
        last.expect("checked above")
    }

    /// The broker's resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Panics if the broker has logged a panic.
    pub fn assert_no_panic(&self) {
        let text = self.log_text();
        assert!(
            !text.contains("panicked"),
            "the broker panicked; stderr:\n{text}"
        );
    }

    /// Kills the broker and returns its whole stderr.
    fn shutdown(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.log_text()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let text = self.shutdown();
        // Every test also checks that the broker never panicked; skipped when
        // the test is already failing, where a second panic would abort.
        if !thread::panicking() && text.contains("panicked") {
            panic!("the broker panicked; stderr:\n{text}");
        }
    }
}

/// The `k=v ...` part of a periodic stats line (not the final one).
fn stats_part(line: &str) -> Option<&str> {
    if line.contains("final stats") {
        return None;
    }
    let i = line.find(" stats ")?;
    Some(&line[i + " stats ".len()..])
}

fn parse_stats(s: &str) -> HashMap<String, u64> {
    s.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------- raw MQTT

/// What a CONNECT carries; build with struct update syntax from `default()`.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Client identifier (may be empty).
    pub client_id: String,
    /// cleanSession.
    pub clean: bool,
    /// Keep-alive seconds.
    pub keep_alive: u16,
    /// Will: topic, payload, QoS, retain.
    pub will: Option<(String, Vec<u8>, u8, bool)>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Vec<u8>>,
    /// Protocol version.
    pub protocol: ProtocolVersion,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            client_id: String::new(),
            clean: true,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
            protocol: ProtocolVersion::V3_1_1,
        }
    }
}

impl ConnectOpts {
    /// A clean 3.1.1 CONNECT for `client_id` with keep-alive off.
    pub fn id(client_id: &str) -> ConnectOpts {
        ConnectOpts {
            client_id: client_id.to_string(),
            ..ConnectOpts::default()
        }
    }

    /// Adds a will.
    pub fn will(mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> ConnectOpts {
        self.will = Some((topic.to_string(), payload.to_vec(), qos, retain));
        self
    }

    /// The CONNECT's wire bytes, written by coremq's own codec.
    pub fn bytes(&self) -> Vec<u8> {
        let will = self.will.as_ref().map(|(t, p, q, r)| LastWill {
            topic: TopicName::new(ByteString::from(t.as_str())).expect("valid will topic"),
            payload: Bytes::copy_from_slice(p),
            qos: QoS::from_u8(*q).expect("will QoS 0..2"),
            retain: *r,
            properties: None,
        });
        let c = Connect {
            protocol: self.protocol,
            clean_start: self.clean,
            keep_alive: self.keep_alive,
            client_id: ByteString::from(self.client_id.as_str()),
            will,
            username: self.username.as_deref().map(ByteString::from),
            password: self.password.as_deref().map(Bytes::copy_from_slice),
            properties: None,
        };
        encode(&Packet::Connect(Box::new(c)))
    }
}

/// The brief's shorthand for [`ConnectOpts::bytes`].
pub fn connect_packet(
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    will: Option<(&str, &[u8], u8, bool)>,
    user_pass: Option<(&str, &[u8])>,
) -> Vec<u8> {
    ConnectOpts {
        client_id: client_id.to_string(),
        clean,
        keep_alive,
        will: will.map(|(t, p, q, r)| (t.to_string(), p.to_vec(), q, r)),
        username: user_pass.map(|(u, _)| u.to_string()),
        password: user_pass.map(|(_, p)| p.to_vec()),
        protocol: ProtocolVersion::V3_1_1,
    }
    .bytes()
}

/// A packet's 3.1.1 wire bytes.
pub fn encode(p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.encode(ProtocolVersion::V3_1_1, &mut out);
    out.to_vec()
}

/// An MQTT string / binary field: 2-byte length, then the bytes.
pub fn mqtt_str(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// Remaining Length as a Variable Byte Integer.
pub fn var_int(mut n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            return v;
        }
    }
}

/// A hand-built CONNECT: name, level, flags and keep-alive as given, then
/// `payload` verbatim (client id, will, user, password fields, or garbage).
pub fn raw_connect(name: &[u8], level: u8, flags: u8, keep_alive: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = mqtt_str(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(payload);
    let mut out = vec![0x10];
    out.extend(var_int(body.len()));
    out.extend(body);
    out
}

/// A PUBLISH's 3.1.1 wire bytes.
pub fn publish_packet(topic: &str, payload: &[u8], qos: u8, retain: bool, id: u16) -> Vec<u8> {
    let qos = QoS::from_u8(qos).expect("QoS 0..2");
    encode(&Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: TopicName::new(ByteString::from(topic)).expect("valid topic"),
        packet_id: if qos == QoS::AtMostOnce {
            None
        } else {
            Some(PacketId::new(id).expect("non-zero packet id"))
        },
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    }))
}

/// DISCONNECT (3.1.1): `e0 00`.
pub fn disconnect_packet() -> Vec<u8> {
    encode(&Packet::Disconnect(Disconnect::default()))
}

/// Why a read ended without a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// Nothing (complete) arrived in time.
    Timeout,
    /// The broker closed the connection (EOF or reset).
    Closed,
}

/// A raw MQTT connection over a blocking `TcpStream`.
pub struct RawClient {
    /// The socket.
    pub stream: TcpStream,
    buf: BytesMut,
    /// The protocol its packets are decoded by (set by [`RawClient::v5`]).
    version: ProtocolVersion,
}

impl RawClient {
    /// Opens a TCP connection to `port` on 127.0.0.1 (sends nothing).
    pub fn tcp(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        RawClient {
            stream,
            buf: BytesMut::new(),
            version: ProtocolVersion::V3_1_1,
        }
    }

    /// Decodes what the broker sends as MQTT 5.0 from now on.
    pub fn v5(mut self) -> RawClient {
        self.version = ProtocolVersion::V5;
        self
    }

    /// Connects with `opts` and asserts CONNACK return code 0; returns the
    /// client and the CONNACK's sessionPresent.
    pub fn connect(port: u16, opts: &ConnectOpts) -> (RawClient, bool) {
        let mut c = RawClient::tcp(port);
        c.send(&opts.bytes());
        let ack = c.expect_connack(Duration::from_secs(5));
        assert_eq!(ack.code, 0, "CONNACK for {:?}", opts.client_id);
        (c, ack.session_present)
    }

    /// A connected subscriber on `filter` at `qos` (SUBACK awaited).
    pub fn subscriber(port: u16, client_id: &str, filter: &str, qos: u8) -> RawClient {
        let (mut c, _) = RawClient::connect(port, &ConnectOpts::id(client_id));
        c.subscribe(filter, qos);
        c
    }

    /// Writes raw bytes; panics on error.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// Writes raw bytes, returning the error instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads more bytes into the buffer until `deadline`; `Ok(n)` with n > 0
    /// on data.
    fn fill(&mut self, deadline: Instant) -> Result<usize, ReadEnd> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadEnd::Timeout);
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set_read_timeout");
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ReadEnd::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(ReadEnd::Timeout)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(_) => Err(ReadEnd::Closed),
        }
    }

    /// The next packet, or why none came within `timeout`.
    pub fn next_packet(&mut self, timeout: Duration) -> Result<Packet, ReadEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            match codec::decode(&mut self.buf, self.version, 64 << 20) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => panic!("broker sent a packet coremq's codec cannot decode: {e}"),
            }
            self.fill(deadline)?;
        }
    }

    /// The next packet, or `None` on timeout or close.
    pub fn read_packet(&mut self, timeout: Duration) -> Option<Packet> {
        self.next_packet(timeout).ok()
    }

    /// Exactly `n` raw bytes; panics if they do not come within `timeout`.
    pub fn read_bytes(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        while self.buf.len() < n {
            if let Err(e) = self.fill(deadline) {
                panic!(
                    "wanted {n} bytes, got {:02x?} then {e:?}",
                    self.buf.as_ref()
                );
            }
        }
        self.buf.split_to(n).to_vec()
    }

    /// Waits for a CONNACK (panics on anything else, a close or a timeout).
    pub fn expect_connack(&mut self, timeout: Duration) -> ConnAck {
        match self.next_packet(timeout) {
            Ok(Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection, at most `within`;
    /// returns whatever bytes arrived before the close.
    pub fn expect_closed(&mut self, within: Duration) -> Vec<u8> {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadEnd::Closed) => return self.buf.split().to_vec(),
                Err(ReadEnd::Timeout) => panic!(
                    "connection still open after {within:?} (received {:02x?})",
                    self.buf.as_ref()
                ),
            }
        }
    }

    /// Waits up to `within` for a close; `Some(elapsed)` if it came.
    pub fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadEnd::Closed) => return Some(start.elapsed()),
                Err(ReadEnd::Timeout) => return None,
            }
        }
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK granting it.
    pub fn subscribe(&mut self, filter: &str, qos: u8) {
        let p = Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            filters: vec![(
                TopicFilter::new(ByteString::from(filter)).expect("valid filter"),
                SubscriptionOptions::qos(QoS::from_u8(qos).expect("QoS 0..2")),
            )],
            properties: None,
        });
        self.send(&encode(&p));
        match self.next_packet(Duration::from_secs(5)) {
            Ok(Packet::SubAck(a)) => assert_eq!(a.codes, vec![qos], "SUBACK for {filter}"),
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    /// Publishes; for QoS 1 waits for the PUBACK.
    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        self.send(&publish_packet(topic, payload, qos, retain, 7));
        if qos == 1 {
            match self.next_packet(Duration::from_secs(5)) {
                Ok(Packet::PubAck(a)) => assert_eq!(a.packet_id.get(), 7),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }

    /// Waits for the next PUBLISH (acknowledging QoS 1), skipping nothing:
    /// any other packet is a failure. `None` on timeout or close.
    pub fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        match self.next_packet(timeout) {
            Ok(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    let id = p.packet_id.expect("QoS 1 has an id").get();
                    self.send(&[0x40, 0x02, (id >> 8) as u8, id as u8]);
                }
                Some(p)
            }
            Ok(other) => panic!("expected PUBLISH, got {other:?}"),
            Err(_) => None,
        }
    }

    /// Asserts the next PUBLISH is `topic` / `payload`.
    pub fn expect_publish(&mut self, topic: &str, payload: &[u8], timeout: Duration) -> Publish {
        let p = self
            .next_publish(timeout)
            .unwrap_or_else(|| panic!("no PUBLISH on {topic} within {timeout:?}"));
        assert_eq!(
            (p.topic.as_str(), p.payload.as_ref()),
            (topic, payload),
            "unexpected PUBLISH"
        );
        p
    }

    /// Asserts nothing arrives for `quiet` (and the connection stays open).
    pub fn expect_silence(&mut self, quiet: Duration) {
        match self.next_packet(quiet) {
            Err(ReadEnd::Timeout) => {}
            other => panic!("expected silence for {quiet:?}, got {other:?}"),
        }
    }
}

/// Checks that `sub` (subscribed to `topic`) gets a fresh message from `publ`.
pub fn assert_pubsub_works(publ: &mut RawClient, sub: &mut RawClient, topic: &str, tag: &str) {
    publ.publish(topic, tag.as_bytes(), 1, false);
    sub.expect_publish(topic, tag.as_bytes(), Duration::from_secs(5));
}

// ---------------------------------------------------------------- tools

/// Paths of the real MQTT clients, from `tests/support/ensure-tools.sh`.
#[derive(Debug, Clone)]
pub struct Tools {
    /// mosquitto_pub.
    pub mosquitto_pub: PathBuf,
    /// mosquitto_sub.
    pub mosquitto_sub: PathBuf,
    /// The mosquitto broker (unused by default; for comparisons).
    pub mosquitto: PathBuf,
    /// Python with paho-mqtt 2.x.
    pub python: PathBuf,
    /// node.
    pub node: PathBuf,
    /// The folder holding MQTT.js's node_modules.
    pub node_dir: PathBuf,
    /// nats-server (JetStream), for the cluster tests.
    pub nats_server: PathBuf,
}

/// The repository's `tests/` folder.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Runs ensure-tools.sh once per test binary; panics (never skips) if a tool
/// cannot be installed.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = tests_dir().join("support/ensure-tools.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !out.status.success() {
            panic!(
                "{} failed ({}): the integration tests need mosquitto, paho-mqtt and MQTT.js.\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kv: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| -> PathBuf {
            let v = kv
                .get(k)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| panic!("ensure-tools.sh printed no {k}=...: {kv:?}"));
            let p = PathBuf::from(v);
            assert!(p.exists(), "{k}={} does not exist", p.display());
            p
        };
        Tools {
            mosquitto_pub: get("MOSQUITTO_PUB"),
            mosquitto_sub: get("MOSQUITTO_SUB"),
            mosquitto: get("MOSQUITTO"),
            python: get("PYTHON"),
            nats_server: get("NATS_SERVER"),
            node: get("NODE"),
            node_dir: get("NODE_DIR"),
        }
    })
}

/// `node tests/scripts/NAME ARGS...` with MQTT.js on NODE_PATH.
pub fn node_script(name: &str, args: &[&str]) -> Command {
    let t = tools();
    let mut c = Command::new(&t.node);
    c.arg(tests_dir().join("scripts").join(name))
        .args(args)
        .env("NODE_PATH", t.node_dir.join("node_modules"))
        .stdin(Stdio::null());
    c
}

/// `python tests/scripts/NAME ARGS...` with paho-mqtt.
pub fn python_script(name: &str, args: &[&str]) -> Command {
    let t = tools();
    let mut c = Command::new(&t.python);
    c.arg(tests_dir().join("scripts").join(name))
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` to completion within `timeout` (killed after it); returns
/// (exit code or None if killed, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break st.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    (code, t_out.join().unwrap(), t_err.join().unwrap())
}

/// A child process whose stdout lines are read on a thread, so a test can
/// wait for a line with a timeout. Killed (SIGKILL, by PID) on drop.
pub struct LineProc {
    /// The process.
    pub child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    name: String,
}

impl LineProc {
    /// Spawns `cmd` with stdout (and stderr) piped.
    pub fn spawn(cmd: &mut Command) -> LineProc {
        let name = format!("{cmd:?}");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr2 = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = stderr2.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        LineProc {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
            name,
        }
    }

    /// The next stdout line within `timeout`; `None` on timeout or EOF.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.seen.push(l.clone());
                Some(l)
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads lines until one satisfies `pred`; panics (with the output so far)
    /// if none does within `timeout`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(l) if pred(&l) => return l,
                Some(_) => {}
                None => panic!(
                    "{}: no matching line within {timeout:?}; stdout so far: {:?}; stderr: {}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Every line that arrives within `quiet`.
    pub fn drain(&mut self, quiet: Duration) -> Vec<String> {
        let deadline = Instant::now() + quiet;
        let mut v = Vec::new();
        while let Some(l) = self.next_line(deadline.saturating_duration_since(Instant::now())) {
            v.push(l);
        }
        v
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to this process (by its PID).
    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout)
            .unwrap_or_else(|| panic!("{} did not exit within {timeout:?}", self.name))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LineProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mosquitto_sub in debug mode (`-d -v`) that has received its SUBACK, so
/// it is subscribed by the time this returns.
pub fn mosquitto_sub_ready(port: u16, args: &[&str]) -> LineProc {
    // stdbuf: mosquitto_sub's debug lines go through stdio, which a pipe
    // would buffer; line buffering lets us see the SUBACK as it happens.
    // stdbuf execs mosquitto_sub, so the PID we hold is mosquitto_sub's.
    let mut cmd = Command::new("stdbuf");
    cmd.arg("-oL")
        .arg(&tools().mosquitto_sub)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-d", "-v"])
        .args(args)
        .stdin(Stdio::null());
    let mut p = LineProc::spawn(&mut cmd);
    // "Subscribed (mid: ...)" comes from the on_subscribe callback, after the
    // SUBACK has been handled: mosquitto_sub is fully set up by then.
    p.wait_line(Duration::from_secs(10), |l| {
        l.starts_with("Subscribed (mid")
    });
    p
}

/// The next non-debug line of a `mosquitto_sub -d -v` (a `topic payload`
/// message line), or `None` within `timeout`.
pub fn next_message_line(p: &mut LineProc, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = p.next_line(left)?;
        if !l.starts_with("Client ") && !l.starts_with("Subscribed (mid") {
            return Some(l);
        }
    }
}

/// Sends `sig` to a child we spawned (by its PID).
fn signal_child(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Waits up to `timeout` for `child` to exit: `Some(exit code)` (the code is
/// `None` if a signal ended it), or `None` if it is still running.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st.code());
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- sessions

/// What a fresh clean `mosquitto_sub -C 1 -W SECS` on `topic` prints (the
/// retained message); empty if nothing comes within `secs`.
pub fn read_retained(port: u16, topic: &str, secs: u32) -> String {
    let (code, out, err) = run_bounded(
        Command::new(&tools().mosquitto_sub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", topic, "-C", "1", "-W", &secs.to_string()]),
        Duration::from_secs(u64::from(secs) + 5),
    );
    match code {
        Some(0) => out.trim_end().to_string(),
        // 27: -W timed out with no message.
        Some(27) => String::new(),
        other => panic!("mosquitto_sub -t {topic} exited {other:?}: {out}{err}"),
    }
}

/// What `paho_durable.py session` reported.
#[derive(Debug)]
pub struct PahoSession {
    /// The CONNACK's sessionPresent.
    pub session_present: bool,
    /// The SUBACK's granted QoS, if it subscribed.
    pub granted: Option<u64>,
    /// `topic=payload@qos` of each message, in arrival order.
    pub messages: Vec<String>,
}

/// Runs `paho_durable.py session`: connects `id` (proto "311" or "5") with a
/// persistent session, subscribes to `filter` ("-": none), collects up to
/// `expect` messages (within `wait_s`), disconnects normally.
pub fn paho_session(
    port: u16,
    id: &str,
    proto: &str,
    filter: &str,
    qos: u8,
    expect: usize,
    wait_s: u32,
) -> PahoSession {
    let args = [
        port.to_string(),
        "session".to_string(),
        id.to_string(),
        proto.to_string(),
        filter.to_string(),
        qos.to_string(),
        expect.to_string(),
        wait_s.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_bounded(
        &mut python_script("paho_durable.py", &args),
        Duration::from_secs(u64::from(wait_s) + 20),
    );
    assert_eq!(code, Some(0), "paho_durable.py {args:?}: {out}{err}");
    let mut r = PahoSession {
        session_present: false,
        granted: None,
        messages: Vec::new(),
    };
    for line in out.lines() {
        let o = json::parse_object(line).unwrap_or_else(|| panic!("not JSON: {line}"));
        match o.get("event").and_then(|v| v.as_str()) {
            Some("connack") => {
                assert_eq!(o["rc"].as_u64(), Some(0), "{id}: CONNACK {line}");
                r.session_present = o["session_present"].as_bool().expect("bool");
            }
            Some("suback") => r.granted = o["granted"].as_u64(),
            Some("messages") => {
                let m = o["messages"].as_str().expect("string");
                r.messages = m
                    .split('|')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
            }
            _ => panic!("unexpected line from paho_durable.py: {line}"),
        }
    }
    r
}

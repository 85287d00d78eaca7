//! One worker process: one mio event loop over non-blocking client sockets.
//!
//! Per connection the worker keeps a small [`Conn`] (socket, state, client
//! number, three timestamps) and allocates a buffer only while a packet is
//! partly read or partly written. Keep-alive pings are driven by one list of
//! 100 ms slots (`keepalive × 10` of them): a connection sits in slot
//! `n mod slots` and is pinged each time its slot comes round, i.e. every K
//! seconds, spread evenly. Timeouts (handshake, close after DISCONNECT, old
//! connection after a takeover) are one FIFO, since they all have the same
//! length.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::FromRawFd;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use bytestring::ByteString;
use coremq::proto::codec::{
    self, Connect, LastWill, Packet, PacketId, QoS, Subscribe, SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;

use crate::protocol;
use crate::spec::{
    hist_to_b64, new_hist, Mode, Phase, Progress, WorkerMsg, WorkerResult, WorkerSpec,
};
use crate::sys::{mono_us, rusage_cpu_s, self_max_rss_kb, source_ip};
use crate::ws::{WsClient, WsEvent};

const STDIN: Token = Token(usize::MAX - 1);
const MAX_PACKET: usize = 1 << 20;
const SLOT_US: u64 = 100_000;
const PINGREQ: [u8; 2] = [0xC0, 0x00];
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    Connecting,
    AwaitConnack,
    Held,
    Silent,
    AwaitClose,
    TakenOver,
    SubAwaitSuback,
    SubActive,
}

const F_SILENT: u8 = 1;
const F_TAKEOVER: u8 = 2;
const F_SUB: u8 = 4;

/// Bytes of a packet not yet whole (read) or not yet sent (write).
#[derive(Default)]
struct Partial {
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

struct Conn {
    stream: Option<TcpStream>,
    /// `--tls-ca`: the TLS client of this connection; MQTT bytes go through
    /// it (the socket then carries only TLS records).
    tls: Option<Box<rustls::ClientConnection>>,
    /// `--ws`: the WebSocket client; MQTT bytes are framed by it (then go
    /// through TLS with `--tls-ca`).
    ws: Option<Box<WsClient>>,
    partial: Option<Box<Partial>>,
    /// connect() called (µs, CLOCK_MONOTONIC).
    t_start: u64,
    /// CONNECT written.
    t_sent: u64,
    /// PINGREQ written (0: none outstanding) / takeover started.
    t_aux: u64,
    gen: u32,
    n: u32,
    st: St,
    flags: u8,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Handshake,
    Close,
    OldClose,
}

struct Deadline {
    tok: u32,
    gen: u32,
    kind: Wait,
    at: u64,
}

/// Maps an errno to a failure cause.
pub fn cause_of(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "closed".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_files".into(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "addr_unavailable".into(),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "no_memory".into(),
        Some(n) => format!("errno_{n}"),
        // `--tls-ca`: the TLS client refused the exchange (a certificate
        // it does not trust, an alert from the broker).
        None if e.kind() == io::ErrorKind::InvalidData => "tls".into(),
        None => format!("io_{:?}", e.kind()).to_lowercase(),
    }
}

pub(crate) fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// socket() + IP_BIND_ADDRESS_NO_PORT + bind(src:0) + non-blocking connect().
pub(crate) fn open_socket(src: Option<Ipv4Addr>, dst: &libc::sockaddr_in) -> io::Result<TcpStream> {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscalls on an fd we own; closed on every error path.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd: i32| {
            let e = io::Error::last_os_error();
            libc::close(fd);
            Err(e)
        };
        if let Some(ip) = src {
            let one: libc::c_int = 1;
            // IP_BIND_ADDRESS_NO_PORT = 24: pick the port at connect() time,
            // by the whole 4-tuple, instead of at bind() time.
            if libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return fail(fd);
            }
            let sa = sockaddr(SocketAddrV4::new(ip, 0));
            if libc::bind(
                fd,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                len,
            ) != 0
            {
                return fail(fd);
            }
        }
        if libc::connect(
            fd,
            dst as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        ) != 0
        {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                libc::close(fd);
                return Err(e);
            }
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

fn pattern(pat: &str, n: u32) -> String {
    pat.replace("{n}", &n.to_string())
}

/// The worker's state.
pub struct Engine {
    spec: WorkerSpec,
    /// `--tls-ca`: the client configuration and the broker's name.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    poll: Poll,
    dst: libc::sockaddr_in,
    conns: Vec<Conn>,
    free: Vec<u32>,
    deadlines: VecDeque<Deadline>,
    slots: Vec<Vec<(u32, u32)>>,
    slot_idx: usize,
    next_slot_at: u64,
    scratch: BytesMut,
    wscratch: BytesMut,
    /// `--ws`: where MQTT bytes are framed on their way out.
    wsframe: Vec<u8>,
    rbuf: Vec<u8>,
    phase: Phase,
    stdin_buf: Vec<u8>,
    commands: VecDeque<String>,
    stdin_closed: bool,
    // counters
    attempted: u64,
    connected: u64,
    disconnected: u64,
    cycles: u64,
    pings: u64,
    pongs: u64,
    takeovers: u64,
    failures: BTreeMap<String, u64>,
    failed: u64,
    inflight: u64,
    open: u64,
    awaiting_close: u64,
    pending_takeovers: u64,
    // histograms (µs)
    h_connack: Histogram<u64>,
    h_tcp: Histogram<u64>,
    h_cycle: Histogram<u64>,
    h_ping: Histogram<u64>,
    h_to_close: Histogram<u64>,
    h_to_connack: Histogram<u64>,
    series: Vec<u64>,
    go_us: u64,
    // ramp / main bookkeeping
    next_idx: u32,
    ramp_total: u32,
    ramp_start: u64,
    ramp_cpu0: f64,
    ramp_wall_s: f64,
    ramp_cpu_s: f64,
    main_start: u64,
    main_end: u64,
    main_cpu0: f64,
    main_wall_s: f64,
    main_cpu_s: f64,
    running: bool,
    takeover_rr: u32,
    takeover_started: u64,
    holders: Vec<(u32, u32)>,
    silent_log: Vec<(u32, u64, u64)>,
    wills: Vec<(u32, u64)>,
    sub_ready: bool,
    last_progress: u64,
    last_closed_n: Option<u32>,
    restart: Vec<u32>,
}

/// The TLS client configuration of `--tls-ca`: the CA's certificates as
/// the only roots, the ring provider, TLS 1.2 and 1.3, resumption on (an
/// in-memory ticket cache per worker, as a client library keeps).
pub(crate) fn tls_client(
    ca: &std::path::Path,
    name: &str,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("--tls-ca {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("--tls-ca {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--tls-ca {}: a certificate", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(name.to_string())
        .with_context(|| format!("--tls-server-name {name}"))?;
    Ok((Arc::new(config), name))
}

impl Engine {
    /// Sets up the poller and stdin.
    pub fn new(spec: WorkerSpec) -> Result<Engine> {
        crate::sys::raise_nofile();
        let broker: SocketAddrV4 = crate::resolve_v4(&spec.broker)?;
        let poll = Poll::new().context("epoll")?;
        // SAFETY: fcntl on our own stdin.
        unsafe {
            let fl = libc::fcntl(0, libc::F_GETFL);
            libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        poll.registry()
            .register(&mut SourceFd(&0), STDIN, Interest::READABLE)
            .context("register stdin")?;
        let nslots = usize::from(spec.keepalive.max(1)) * 10;
        let ramp_total = match spec.mode {
            Mode::Churn => 0,
            _ => spec.count + spec.silent_count,
        };
        let holders = if spec.mode == Mode::Takeover {
            vec![(u32::MAX, 0); spec.count as usize]
        } else {
            Vec::new()
        };
        let tls = match &spec.tls_ca {
            Some(ca) => Some(tls_client(ca, &spec.tls_server_name)?),
            None => None,
        };
        Ok(Engine {
            tls,
            dst: sockaddr(broker),
            poll,
            conns: Vec::new(),
            free: Vec::new(),
            deadlines: VecDeque::new(),
            slots: vec![Vec::new(); nslots],
            slot_idx: 0,
            next_slot_at: 0,
            scratch: BytesMut::with_capacity(8192),
            wscratch: BytesMut::with_capacity(512),
            wsframe: Vec::with_capacity(512),
            rbuf: vec![0; 16384],
            phase: Phase::Ready,
            stdin_buf: Vec::new(),
            commands: VecDeque::new(),
            stdin_closed: false,
            attempted: 0,
            connected: 0,
            disconnected: 0,
            cycles: 0,
            pings: 0,
            pongs: 0,
            takeovers: 0,
            failures: BTreeMap::new(),
            failed: 0,
            inflight: 0,
            open: 0,
            awaiting_close: 0,
            pending_takeovers: 0,
            h_connack: new_hist(),
            h_tcp: new_hist(),
            h_cycle: new_hist(),
            h_ping: new_hist(),
            h_to_close: new_hist(),
            h_to_connack: new_hist(),
            series: Vec::new(),
            go_us: 0,
            next_idx: 0,
            ramp_total,
            ramp_start: 0,
            ramp_cpu0: 0.0,
            ramp_wall_s: 0.0,
            ramp_cpu_s: 0.0,
            main_start: 0,
            main_end: 0,
            main_cpu0: 0.0,
            main_wall_s: 0.0,
            main_cpu_s: 0.0,
            running: false,
            takeover_rr: 0,
            takeover_started: 0,
            holders,
            silent_log: Vec::new(),
            wills: Vec::new(),
            sub_ready: false,
            last_progress: 0,
            last_closed_n: None,
            restart: Vec::new(),
            spec,
        })
    }

    fn timeout_us(&self) -> u64 {
        (self.spec.timeout_secs * 1e6) as u64
    }

    fn fail(&mut self, cause: &str) {
        self.failed += 1;
        *self.failures.entry(cause.to_string()).or_default() += 1;
    }

    fn live(&self, tok: u32, gen: u32) -> bool {
        self.conns
            .get(tok as usize)
            .is_some_and(|c| c.gen == gen && c.st != St::Free)
    }

    fn bump_series(&mut self, now: u64) {
        let sec = (now.saturating_sub(self.go_us) / 1_000_000) as usize;
        if self.series.len() <= sec {
            self.series.resize(sec + 1, 0);
        }
        self.series[sec] += 1;
    }

    fn alloc(&mut self) -> u32 {
        if let Some(t) = self.free.pop() {
            return t;
        }
        self.conns.push(Conn {
            stream: None,
            tls: None,
            ws: None,
            partial: None,
            t_start: 0,
            t_sent: 0,
            t_aux: 0,
            gen: 0,
            n: 0,
            st: St::Free,
            flags: 0,
        });
        (self.conns.len() - 1) as u32
    }

    fn close(&mut self, tok: u32) {
        let c = &mut self.conns[tok as usize];
        if c.flags & F_SUB == 0 {
            self.last_closed_n = Some(c.n);
        }
        // Closing the fd removes it from epoll.
        c.stream = None;
        c.tls = None;
        c.ws = None;
        c.partial = None;
        c.st = St::Free;
        c.flags = 0;
        c.t_aux = 0;
        c.gen = c.gen.wrapping_add(1);
        self.free.push(tok);
    }

    /// Opens a connection for client `n`; returns false when the socket could
    /// not even be created (the failure is counted).
    fn start(&mut self, n: u32, flags: u8) -> bool {
        let now = mono_us();
        self.attempted += 1;
        let src = (self.spec.source_ips > 0)
            .then(|| source_ip(self.spec.source_skip + n % self.spec.source_ips));
        let mut stream = match open_socket(src, &self.dst) {
            Ok(s) => s,
            Err(e) => {
                let c = cause_of(&e);
                self.fail(&c);
                self.last_closed_n = Some(n);
                self.after_cycle_end();
                return false;
            }
        };
        let tok = self.alloc();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(tok as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let c = cause_of(&e);
            self.fail(&c);
            self.free.push(tok);
            return false;
        }
        let timeout = self.timeout_us();
        let c = &mut self.conns[tok as usize];
        c.stream = Some(stream);
        c.st = St::Connecting;
        c.n = n;
        c.flags = flags;
        c.t_start = now;
        c.t_sent = 0;
        c.t_aux = 0;
        let gen = c.gen;
        self.inflight += 1;
        self.deadlines.push_back(Deadline {
            tok,
            gen,
            kind: Wait::Handshake,
            at: now + timeout,
        });
        // On loopback the handshake is usually done by the time connect()
        // returns: try the CONNECT at once and save a trip through epoll.
        self.send_connect(tok);
        true
    }

    fn connect_packet(&self, n: u32, flags: u8) -> Packet {
        let sub = flags & F_SUB != 0;
        let client_id = if sub {
            format!("lg-will-sub-{}", std::process::id())
        } else {
            pattern(&self.spec.client_id, n)
        };
        let will_topic = if flags & F_SILENT != 0 {
            Some(format!("lg/will/{n}"))
        } else if sub || self.spec.mode == Mode::Keepalive {
            None
        } else {
            self.spec.will_topic.as_ref().map(|t| pattern(t, n))
        };
        let will = will_topic.and_then(|t| {
            Some(LastWill {
                topic: TopicName::new(t).ok()?,
                payload: bytes::Bytes::from(self.spec.will_payload.clone().into_bytes()),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
            })
        });
        Packet::Connect(Box::new(Connect {
            protocol: self.spec.protocol.version(),
            clean_start: if sub { true } else { self.spec.clean },
            keep_alive: if sub { 0 } else { self.spec.keepalive },
            client_id: ByteString::from(client_id),
            will,
            username: None,
            password: None,
            properties: None,
        }))
    }

    /// Writes MQTT `bytes` (framed with `--ws`) or keeps the rest for the
    /// next writable event. Err: the connection is broken.
    fn write(&mut self, tok: u32, bytes: &[u8]) -> io::Result<()> {
        let Some(ws) = self.conns[tok as usize].ws.as_mut() else {
            return self.write_wire(tok, bytes);
        };
        let mut framed = std::mem::take(&mut self.wsframe);
        framed.clear();
        ws.frame(bytes, &mut framed);
        let result = self.write_wire(tok, &framed);
        self.wsframe = framed;
        result
    }

    /// Writes `bytes` as they are (through TLS with `--tls-ca`) or keeps the
    /// rest for the next writable event. Err: the connection is broken.
    fn write_wire(&mut self, tok: u32, bytes: &[u8]) -> io::Result<()> {
        if let Some(t) = self.conns[tok as usize].tls.as_mut() {
            t.writer().write_all(bytes)?;
            return self.tls_out(tok);
        }
        let c = &mut self.conns[tok as usize];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        if let Some(p) = c.partial.as_mut().filter(|p| !p.wbuf.is_empty()) {
            p.wbuf.extend_from_slice(bytes);
            return Ok(());
        }
        let mut off = 0;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off < bytes.len() {
            c.partial
                .get_or_insert_with(Default::default)
                .wbuf
                .extend_from_slice(&bytes[off..]);
        }
        Ok(())
    }

    /// `--tls-ca`: writes the TLS records the connection has ready (the
    /// handshake's, or MQTT bytes encrypted) until the socket is full; the
    /// rest waits in the TLS client for the next writable event.
    fn tls_out(&mut self, tok: u32) -> io::Result<()> {
        let c = &mut self.conns[tok as usize];
        let (Some(s), Some(t)) = (c.stream.as_mut(), c.tls.as_mut()) else {
            return Ok(());
        };
        while t.wants_write() {
            match t.write_tls(s) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush(&mut self, tok: u32) -> io::Result<()> {
        if self.conns[tok as usize].tls.is_some() {
            return self.tls_out(tok);
        }
        let c = &mut self.conns[tok as usize];
        let (Some(s), Some(p)) = (c.stream.as_mut(), c.partial.as_mut()) else {
            return Ok(());
        };
        while !p.wbuf.is_empty() {
            match s.write(&p.wbuf) {
                Ok(k) => {
                    p.wbuf.drain(..k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if p.wbuf.is_empty() && p.rbuf.is_empty() {
            c.partial = None;
        }
        Ok(())
    }

    /// Sends CONNECT on a socket in `Connecting`; leaves it there when the
    /// TCP handshake is not done yet.
    fn send_connect(&mut self, tok: u32) {
        let (n, flags) = {
            let c = &self.conns[tok as usize];
            (c.n, c.flags)
        };
        let mut buf = std::mem::take(&mut self.wscratch);
        buf.clear();
        self.connect_packet(n, flags)
            .encode(self.spec.protocol.version(), &mut buf);
        if let Some(path) = &self.spec.ws_path {
            // `--ws`: the upgrade request goes first; the CONNECT waits,
            // framed, for the broker's 101 (RFC 6455 §4.1: nothing before
            // it), and CONNACK latency then includes the upgrade.
            let c = &mut self.conns[tok as usize];
            let ws = c.ws.get_or_insert_with(|| Box::new(WsClient::new(n)));
            let request = ws.upgrade(&buf, &self.spec.broker, path);
            buf.clear();
            buf.extend_from_slice(&request);
        }
        if self.tls.is_some() {
            self.send_connect_tls(tok, n, flags, &buf);
            self.wscratch = buf;
            return;
        }
        let res = {
            let c = &mut self.conns[tok as usize];
            let s = c.stream.as_mut().expect("connecting socket");
            loop {
                match s.write(&buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        let now = mono_us();
        match res {
            Ok(k) => {
                if k < buf.len() {
                    self.conns[tok as usize]
                        .partial
                        .get_or_insert_with(Default::default)
                        .wbuf
                        .extend_from_slice(&buf[k..]);
                }
                self.connect_sent(tok, n, flags, now);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => self.conn_error(tok, &e),
        }
        self.wscratch = buf;
    }

    /// [`Engine::send_connect`] over TLS: the ClientHello goes first (its
    /// write says whether the TCP handshake is done); the CONNECT waits in
    /// the TLS client until the TLS handshake is, and CONNACK latency then
    /// includes it.
    fn send_connect_tls(&mut self, tok: u32, n: u32, flags: u8, connect: &[u8]) {
        let res = {
            let c = &mut self.conns[tok as usize];
            let s = c.stream.as_mut().expect("connecting socket");
            if c.tls.is_none() {
                let (config, name) = self.tls.as_ref().expect("TLS run");
                match rustls::ClientConnection::new(config.clone(), name.clone()) {
                    Ok(t) => c.tls = Some(Box::new(t)),
                    Err(e) => {
                        self.broken(tok, &format!("tls_{e}"));
                        return;
                    }
                }
            }
            let t = c.tls.as_mut().expect("made above");
            loop {
                match t.write_tls(s) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        let now = mono_us();
        match res {
            Ok(_) => {
                let queued = self.conns[tok as usize]
                    .tls
                    .as_mut()
                    .expect("made above")
                    .writer()
                    .write_all(connect);
                if let Err(e) = queued.and_then(|()| self.tls_out(tok)) {
                    self.conn_error(tok, &e);
                    return;
                }
                self.connect_sent(tok, n, flags, now);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => self.conn_error(tok, &e),
        }
    }

    /// The CONNECT of client `n` went (or waits in the TLS client): now
    /// awaiting CONNACK; the TCP handshake's time is recorded, and a
    /// takeover's old connection is marked.
    fn connect_sent(&mut self, tok: u32, n: u32, flags: u8, now: u64) {
        let c = &mut self.conns[tok as usize];
        c.st = St::AwaitConnack;
        c.t_sent = now;
        let tcp = now.saturating_sub(c.t_start).max(1);
        self.h_tcp.saturating_record(tcp);
        if flags & F_TAKEOVER != 0 {
            self.mark_taken_over(n, now);
        }
    }

    fn mark_taken_over(&mut self, n: u32, now: u64) {
        let i = (n - self.spec.first) as usize;
        let (otok, ogen) = self.holders[i];
        if self.live(otok, ogen) && self.conns[otok as usize].st == St::Held {
            let c = &mut self.conns[otok as usize];
            c.st = St::TakenOver;
            c.t_aux = now;
            self.pending_takeovers += 1;
            self.deadlines.push_back(Deadline {
                tok: otok,
                gen: ogen,
                kind: Wait::OldClose,
                at: now + self.timeout_us(),
            });
        }
    }

    fn on_event(&mut self, tok: u32, ev: &mio::event::Event) {
        let Some(c) = self.conns.get_mut(tok as usize) else {
            return;
        };
        if c.st == St::Free {
            return;
        }
        if c.st == St::Connecting {
            let err = match c.stream.as_ref().map(|s| s.take_error()) {
                Some(Ok(Some(e))) | Some(Err(e)) => Some(e),
                _ => None,
            };
            if let Some(e) = err {
                self.conn_error(tok, &e);
                return;
            }
            if ev.is_writable() || ev.is_readable() {
                self.send_connect(tok);
            }
            if self.conns[tok as usize].st == St::Connecting {
                return;
            }
        }
        if ev.is_writable() {
            if let Err(e) = self.flush(tok) {
                self.conn_error(tok, &e);
                return;
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(tok, ev.is_read_closed() || ev.is_error());
        }
    }

    fn read(&mut self, tok: u32, closed_hint: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        if let Some(p) = self.conns[tok as usize].partial.as_mut() {
            scratch.extend_from_slice(&p.rbuf);
            p.rbuf.clear();
        }
        // Where this read's bytes start (after an incomplete packet's).
        let carried = scratch.len();
        let mut eof = false;
        let mut err = None;
        if self.conns[tok as usize].tls.is_some() {
            let c = &mut self.conns[tok as usize];
            let s = c.stream.as_mut().expect("open socket");
            let t = c.tls.as_mut().expect("checked");
            'socket: loop {
                // Edge-triggered: read until the socket would block,
                // decrypting as we go (rustls takes a record at a time).
                let drained = match t.read_tls(s) {
                    Ok(0) => {
                        eof = true;
                        true
                    }
                    Ok(_) => false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                };
                if let Err(e) = t.process_new_packets() {
                    err = Some(io::Error::new(io::ErrorKind::InvalidData, e));
                    break;
                }
                loop {
                    match t.reader().read(&mut self.rbuf) {
                        // The broker's close_notify.
                        Ok(0) => {
                            eof = true;
                            break 'socket;
                        }
                        Ok(k) => scratch.extend_from_slice(&self.rbuf[..k]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // A TCP close without close_notify: the broker's
                        // ordinary close after DISCONNECT or a refusal.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            eof = true;
                            break 'socket;
                        }
                        Err(e) => {
                            err = Some(e);
                            break 'socket;
                        }
                    }
                }
                if drained {
                    break;
                }
            }
            if err.is_none() {
                if let Err(e) = self.tls_out(tok) {
                    err = Some(e);
                }
            }
        } else {
            let c = &mut self.conns[tok as usize];
            let s = c.stream.as_mut().expect("open socket");
            loop {
                match s.read(&mut self.rbuf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => {
                        scratch.extend_from_slice(&self.rbuf[..k]);
                        // A short read drained the socket: later data or a
                        // FIN raises a new edge, so stop here unless the
                        // event said the peer has closed.
                        if k < self.rbuf.len() && !closed_hint {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
        }
        let gen = self.conns[tok as usize].gen;
        if self.conns[tok as usize].ws.is_some() && err.is_none() {
            let wire = scratch.split_off(carried);
            match self.ws_input(tok, &wire, &mut scratch) {
                Ok(closed) => eof |= closed,
                Err(cause) => {
                    self.broken(tok, &cause);
                    scratch.clear();
                    self.scratch = scratch;
                    return;
                }
            }
        }
        let v = self.spec.protocol.version();
        if self.conns[tok as usize].st == St::AwaitConnack {
            // A broker without 5.0 refuses a level-5 CONNECT in 3.1.1 form.
            if let Some(code) = protocol::v3_refusal(v, &scratch) {
                scratch.clear();
                self.broken(tok, &format!("connack_{code}"));
            }
        }
        loop {
            if !self.live(tok, gen) {
                break;
            }
            match codec::decode(&mut scratch, v, MAX_PACKET) {
                Ok(Some(p)) => self.on_packet(tok, p),
                Ok(None) => break,
                Err(_) => {
                    scratch.clear();
                    self.broken(tok, "protocol_error");
                    break;
                }
            }
        }
        if self.live(tok, gen) {
            if !scratch.is_empty() {
                self.conns[tok as usize]
                    .partial
                    .get_or_insert_with(Default::default)
                    .rbuf
                    .extend_from_slice(&scratch);
            } else if let Some(p) = &self.conns[tok as usize].partial {
                if p.rbuf.is_empty() && p.wbuf.is_empty() {
                    self.conns[tok as usize].partial = None;
                }
            }
            if let Some(e) = err {
                self.conn_error(tok, &e);
            } else if eof {
                self.on_close(tok, None);
            }
        }
        scratch.clear();
        self.scratch = scratch;
    }

    /// `--ws`: the WebSocket bytes of one read; MQTT bytes are appended to
    /// `mqtt`. Sends the CONNECT once the upgrade is answered, and a pong or
    /// a close as the broker asks. `Ok(true)`: the broker closed;
    /// `Err(cause)`: the upgrade was refused or a frame was bad.
    fn ws_input(&mut self, tok: u32, wire: &[u8], mqtt: &mut BytesMut) -> Result<bool, String> {
        let ws = self.conns[tok as usize].ws.as_mut().expect("checked");
        let mut replies = Vec::new();
        let event = ws.input(wire, mqtt, &mut replies)?;
        if !replies.is_empty() {
            self.write_wire(tok, &replies).map_err(|e| cause_of(&e))?;
        }
        Ok(event == WsEvent::Closed)
    }

    fn on_packet(&mut self, tok: u32, p: Packet) {
        let now = mono_us();
        let st = self.conns[tok as usize].st;
        match (st, p) {
            (St::AwaitConnack, Packet::ConnAck(a)) => {
                self.inflight -= 1;
                let (flags, t_sent, n, gen) = {
                    let c = &self.conns[tok as usize];
                    (c.flags, c.t_sent, c.n, c.gen)
                };
                if a.code != 0 {
                    self.fail(&format!("connack_{}", a.code));
                    self.close(tok);
                    self.after_cycle_end();
                    return;
                }
                self.connected += 1;
                let lat = now.saturating_sub(t_sent).max(1);
                self.h_connack.saturating_record(lat);
                if self.spec.mode != Mode::Churn && flags & F_SUB == 0 {
                    self.bump_series(now);
                }
                if flags & F_SUB != 0 {
                    let sub = Packet::Subscribe(Subscribe {
                        packet_id: PacketId::new(1).expect("non-zero"),
                        filters: vec![(
                            TopicFilter::new("lg/will/#").expect("valid filter"),
                            SubscriptionOptions::qos(QoS::AtMostOnce),
                        )],
                        properties: None,
                    });
                    let mut b = BytesMut::new();
                    sub.encode(self.spec.protocol.version(), &mut b);
                    self.conns[tok as usize].st = St::SubAwaitSuback;
                    if let Err(e) = self.write(tok, &b) {
                        self.conn_error(tok, &e);
                    }
                    return;
                }
                if self.spec.mode == Mode::Churn {
                    self.conns[tok as usize].st = St::AwaitClose;
                    self.awaiting_close += 1;
                    self.deadlines.push_back(Deadline {
                        tok,
                        gen,
                        kind: Wait::Close,
                        at: now + self.timeout_us(),
                    });
                    if let Err(e) = self.write(tok, &DISCONNECT) {
                        self.conn_error(tok, &e);
                    }
                    return;
                }
                self.open += 1;
                if flags & F_SILENT != 0 {
                    self.conns[tok as usize].st = St::Silent;
                    return;
                }
                self.conns[tok as usize].st = St::Held;
                if self.spec.mode == Mode::Takeover {
                    let i = (n - self.spec.first) as usize;
                    self.holders[i] = (tok, gen);
                    if flags & F_TAKEOVER != 0 {
                        self.h_to_connack.saturating_record(lat);
                    }
                }
                if self.spec.keepalive > 0 {
                    let slot = n as usize % self.slots.len();
                    self.slots[slot].push((tok, gen));
                }
            }
            // A PINGREQ written just before the hold ended is answered
            // ahead of the DISCONNECT that followed it on the same stream:
            // count that answer too, so pings == pongs for a broker that
            // answers every ping.
            (St::Held, Packet::PingResp) | (St::AwaitClose, Packet::PingResp)
                if st == St::Held || self.conns[tok as usize].t_aux != 0 =>
            {
                self.pongs += 1;
                let c = &mut self.conns[tok as usize];
                if c.t_aux != 0 {
                    let lat = now.saturating_sub(c.t_aux).max(1);
                    c.t_aux = 0;
                    self.h_ping.saturating_record(lat);
                }
            }
            (St::SubAwaitSuback, Packet::SubAck(_)) => {
                self.conns[tok as usize].st = St::SubActive;
                self.sub_ready = true;
            }
            (St::SubActive, Packet::Publish(p)) => {
                if let Some(n) = p
                    .topic
                    .as_str()
                    .strip_prefix("lg/will/")
                    .and_then(|s| s.parse::<u32>().ok())
                {
                    self.wills.push((n, now * 1000));
                }
            }
            (St::AwaitConnack, _) => self.broken(tok, "unexpected_packet"),
            _ => {}
        }
    }

    /// A protocol-level failure: counted, and the connection closed.
    fn broken(&mut self, tok: u32, cause: &str) {
        let st = self.conns[tok as usize].st;
        match st {
            St::Connecting | St::AwaitConnack => self.inflight -= 1,
            St::Held | St::Silent => self.open -= 1,
            St::TakenOver => {
                self.open -= 1;
                self.pending_takeovers -= 1;
            }
            St::AwaitClose => self.awaiting_close -= 1,
            _ => {}
        }
        self.fail(cause);
        self.close(tok);
        self.after_cycle_end();
    }

    fn conn_error(&mut self, tok: u32, e: &io::Error) {
        self.on_close(tok, Some(e));
    }

    /// The peer closed (`err` None: EOF) or the socket failed.
    fn on_close(&mut self, tok: u32, err: Option<&io::Error>) {
        let now = mono_us();
        let (st, n, t_start, t_sent, t_aux) = {
            let c = &self.conns[tok as usize];
            (c.st, c.n, c.t_start, c.t_sent, c.t_aux)
        };
        match st {
            St::Free => return,
            St::Connecting | St::AwaitConnack => {
                self.inflight -= 1;
                let cause = err.map(cause_of).unwrap_or_else(|| "closed".into());
                self.fail(&cause);
            }
            St::Held => {
                self.open -= 1;
                self.fail("closed_while_held");
            }
            St::Silent => {
                self.open -= 1;
                self.silent_log.push((n, t_sent * 1000, now * 1000));
            }
            St::AwaitClose => {
                self.awaiting_close -= 1;
                if self.conns[tok as usize].flags & F_SUB == 0 {
                    self.disconnected += 1;
                }
                if self.spec.mode == Mode::Churn {
                    self.cycles += 1;
                    self.h_cycle
                        .saturating_record(now.saturating_sub(t_start).max(1));
                    self.bump_series(now);
                }
            }
            St::TakenOver => {
                self.open -= 1;
                self.pending_takeovers -= 1;
                self.h_to_close
                    .saturating_record(now.saturating_sub(t_aux).max(1));
            }
            St::SubAwaitSuback | St::SubActive => self.fail("subscriber_closed"),
        }
        self.close(tok);
        self.after_cycle_end();
    }

    /// A churn loop whose connection ended starts its next cycle, from the
    /// main loop (never from inside an event handler: a refused connect would
    /// recurse).
    fn after_cycle_end(&mut self) {
        if self.spec.mode == Mode::Churn && self.running {
            if let Some(n) = self.last_closed_n.take() {
                self.restart.push(n);
            }
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(d) = self.deadlines.front() {
            if d.at > now {
                break;
            }
            let d = self.deadlines.pop_front().expect("front exists");
            if !self.live(d.tok, d.gen) {
                continue;
            }
            let st = self.conns[d.tok as usize].st;
            match (d.kind, st) {
                (Wait::Handshake, St::Connecting) => self.broken(d.tok, "timeout_connect"),
                (Wait::Handshake, St::AwaitConnack) => self.broken(d.tok, "timeout_connack"),
                (Wait::Close, St::AwaitClose) => self.broken(d.tok, "timeout_close"),
                (Wait::OldClose, St::TakenOver) => self.broken(d.tok, "takeover_old_not_closed"),
                _ => {}
            }
        }
    }

    fn ping_slots(&mut self, now: u64) {
        if self.spec.keepalive == 0 {
            return;
        }
        if self.next_slot_at == 0 {
            self.next_slot_at = now + SLOT_US;
        }
        while now >= self.next_slot_at {
            self.next_slot_at += SLOT_US;
            let idx = self.slot_idx;
            self.slot_idx = (self.slot_idx + 1) % self.slots.len();
            let mut bucket = std::mem::take(&mut self.slots[idx]);
            bucket.retain(|&(tok, gen)| {
                self.conns
                    .get(tok as usize)
                    .is_some_and(|c| c.gen == gen && c.st == St::Held)
            });
            for &(tok, _) in &bucket {
                self.pings += 1;
                self.conns[tok as usize].t_aux = now;
                if let Err(e) = self.write(tok, &PINGREQ) {
                    self.conn_error(tok, &e);
                }
            }
            self.slots[idx] = bucket;
        }
    }

    fn emit(&self, msg: &WorkerMsg) {
        let line = serde_json::to_string(msg).expect("serializable");
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn progress(&mut self, now: u64) {
        self.last_progress = now;
        let p = Progress {
            phase: Some(self.phase),
            attempted: self.attempted,
            connected: self.connected,
            open: self.open,
            failed: self.failed,
            cycles: self.cycles,
            p99_us: self.h_connack.value_at_quantile(0.99),
        };
        self.emit(&WorkerMsg::Progress(p));
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.progress(mono_us());
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a stack buffer from our stdin.
            let k = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if k == 0 {
                self.stdin_closed = true;
                break;
            }
            if k < 0 {
                break;
            }
            self.stdin_buf.extend_from_slice(&buf[..k as usize]);
        }
        while let Some(i) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=i).collect();
            let s = String::from_utf8_lossy(&line).trim().to_string();
            self.commands.push_back(s);
        }
    }

    fn take_command(&mut self, want: &str) -> bool {
        if self.commands.front().is_some_and(|c| c == want) {
            self.commands.pop_front();
            true
        } else {
            false
        }
    }

    fn ramp_step(&mut self, now: u64) {
        let due = if self.spec.rate > 0.0 {
            let secs = now.saturating_sub(self.ramp_start) as f64 / 1e6;
            ((secs * self.spec.rate) as u64 + 1).min(u64::from(self.ramp_total)) as u32
        } else {
            self.ramp_total
        };
        let window = if self.spec.rate > 0.0 {
            u64::MAX
        } else {
            u64::from(self.spec.inflight.max(1))
        };
        let mut budget = 4096;
        while self.next_idx < due && self.inflight < window && budget > 0 {
            budget -= 1;
            let i = self.next_idx;
            self.next_idx += 1;
            if i < self.spec.count {
                self.start(self.spec.first + i, 0);
            } else {
                self.start(self.spec.silent_first + (i - self.spec.count), F_SILENT);
            }
        }
    }

    fn takeover_step(&mut self, now: u64) {
        if self.spec.count == 0 || self.spec.takeover_rate <= 0.0 {
            return;
        }
        let secs = now.saturating_sub(self.main_start) as f64 / 1e6;
        let due = (secs * self.spec.takeover_rate) as u64 + 1;
        let mut budget = 4096;
        while self.takeover_started < due && budget > 0 {
            budget -= 1;
            self.takeover_started += 1;
            // Round-robin over this worker's clients; skip one whose previous
            // takeover has not settled.
            for _ in 0..self.spec.count {
                let i = self.takeover_rr % self.spec.count;
                self.takeover_rr = self.takeover_rr.wrapping_add(1);
                let (t, g) = self.holders[i as usize];
                if self.live(t, g) && self.conns[t as usize].st == St::Held {
                    self.takeovers += 1;
                    self.start(self.spec.first + i, F_TAKEOVER);
                    break;
                }
            }
        }
    }

    fn begin_disconnect(&mut self) {
        let now = mono_us();
        let timeout = self.timeout_us();
        for tok in 0..self.conns.len() as u32 {
            let st = self.conns[tok as usize].st;
            if matches!(
                st,
                St::Held | St::Silent | St::SubActive | St::SubAwaitSuback
            ) {
                if st == St::Silent {
                    let c = &self.conns[tok as usize];
                    self.silent_log.push((c.n, c.t_sent * 1000, 0));
                }
                if matches!(st, St::Held | St::Silent) {
                    self.open -= 1;
                }
                let gen = self.conns[tok as usize].gen;
                self.conns[tok as usize].st = St::AwaitClose;
                self.awaiting_close += 1;
                self.deadlines.push_back(Deadline {
                    tok,
                    gen,
                    kind: Wait::Close,
                    at: now + timeout,
                });
                if let Err(e) = self.write(tok, &DISCONNECT) {
                    self.conn_error(tok, &e);
                }
            }
        }
    }

    /// Runs the worker to the end and prints its result line.
    pub fn run(mut self) -> Result<()> {
        let mut events = Events::with_capacity(4096);
        if self.spec.will_subscriber {
            self.start(0, F_SUB);
        }
        let setup_deadline = mono_us() + self.timeout_us();
        loop {
            let timeout_ms = match self.phase {
                Phase::Ramp if self.spec.rate > 0.0 => 1,
                Phase::Main if self.spec.mode == Mode::Takeover => 1,
                _ => 20,
            };
            match self.poll.poll(
                &mut events,
                Some(std::time::Duration::from_millis(timeout_ms)),
            ) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            for ev in events.iter() {
                if ev.token() == STDIN {
                    self.read_stdin();
                } else {
                    self.on_event(ev.token().0 as u32, ev);
                }
            }
            let now2 = mono_us();
            self.expire(now2);
            if self.phase < Phase::Disconnect {
                self.ping_slots(now2);
            }
            if self.stdin_closed && self.commands.is_empty() {
                bail!("coordinator went away");
            }
            match self.phase {
                Phase::Ready => {
                    if self.spec.will_subscriber && !self.sub_ready {
                        if self.failed > 0 || now2 > setup_deadline {
                            bail!(
                                "will subscriber could not subscribe to lg/will/#: {:?}",
                                self.failures
                            );
                        }
                        continue;
                    }
                    if self.last_progress == 0 {
                        self.progress(now2);
                    }
                    if self.take_command("go") {
                        self.go_us = now2;
                        self.ramp_start = now2;
                        self.ramp_cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
                        self.set_phase(Phase::Ramp);
                    }
                }
                Phase::Ramp => {
                    self.ramp_step(now2);
                    if self.next_idx >= self.ramp_total && self.inflight == 0 {
                        self.ramp_wall_s = (mono_us() - self.ramp_start) as f64 / 1e6;
                        self.ramp_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.ramp_cpu0;
                        self.set_phase(Phase::Ramped);
                    }
                }
                Phase::Ramped => {
                    if self.take_command("next") {
                        self.main_start = mono_us();
                        // Nothing to hold: no reason to wait out the hold.
                        let secs = if self.spec.mode != Mode::Churn && self.open == 0 {
                            0.0
                        } else {
                            self.spec.main_secs
                        };
                        self.main_end = self.main_start + (secs * 1e6) as u64;
                        self.main_cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
                        self.set_phase(Phase::Main);
                        if self.spec.mode == Mode::Churn {
                            self.running = true;
                            for i in 0..self.spec.count {
                                self.start(self.spec.first + i, 0);
                            }
                        }
                    }
                }
                Phase::Main => {
                    if self.running && !self.restart.is_empty() {
                        for n in std::mem::take(&mut self.restart) {
                            self.start(n, 0);
                        }
                    }
                    if self.spec.mode == Mode::Takeover && now2 < self.main_end {
                        self.takeover_step(now2);
                    }
                    if now2 >= self.main_end {
                        self.running = false;
                        self.restart.clear();
                        if self.inflight == 0
                            && (self.spec.mode != Mode::Churn || self.awaiting_close == 0)
                            && self.pending_takeovers == 0
                        {
                            self.main_wall_s = (mono_us() - self.main_start) as f64 / 1e6;
                            self.main_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.main_cpu0;
                            self.set_phase(Phase::MainDone);
                        }
                    }
                }
                Phase::MainDone => {
                    if self.take_command("next") {
                        self.set_phase(Phase::Disconnect);
                        self.begin_disconnect();
                    }
                }
                Phase::Disconnect => {
                    if self.awaiting_close == 0 {
                        self.phase = Phase::Done;
                        break;
                    }
                }
                Phase::Done => break,
            }
            if now2.saturating_sub(self.last_progress) >= 1_000_000 && self.last_progress != 0 {
                self.progress(now2);
            }
        }
        self.progress(mono_us());
        let res = self.result();
        self.emit(&WorkerMsg::Result(Box::new(res)));
        Ok(())
    }

    fn result(&mut self) -> WorkerResult {
        let mut hists = BTreeMap::new();
        for (name, h) in [
            ("connack", &self.h_connack),
            ("tcp_connect", &self.h_tcp),
            ("cycle", &self.h_cycle),
            ("ping", &self.h_ping),
            ("takeover_old_close", &self.h_to_close),
            ("takeover_connack", &self.h_to_connack),
        ] {
            if !h.is_empty() {
                hists.insert(name.to_string(), hist_to_b64(h));
            }
        }
        WorkerResult {
            index: self.spec.index,
            attempted: self.attempted,
            connected: self.connected,
            disconnected: self.disconnected,
            cycles: self.cycles,
            pings: self.pings,
            pongs: self.pongs,
            takeovers: self.takeovers,
            failures: std::mem::take(&mut self.failures),
            hists,
            series: std::mem::take(&mut self.series),
            ramp_wall_s: self.ramp_wall_s,
            ramp_cpu_s: self.ramp_cpu_s,
            main_wall_s: self.main_wall_s,
            main_cpu_s: self.main_cpu_s,
            cpu_s: rusage_cpu_s(libc::RUSAGE_SELF),
            max_rss_kb: self_max_rss_kb(),
            silent: std::mem::take(&mut self.silent_log),
            wills: std::mem::take(&mut self.wills),
        }
    }
}

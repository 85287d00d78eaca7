//! The run itself: per-connection state ([`Conn`], and per publisher
//! [`PubSt`] with its PUBLISH template and `--window` slots, per subscriber
//! [`SubSt`]), the phases, and the one mio event loop that drives them —
//! connecting and subscribing under `--inflight`, reading and decoding
//! packets, writing with backpressure, publishing (unpaced turns or
//! `--rate`), acknowledgements and QoS 2 flows, keep-alive pings, timeouts,
//! the drain and the DISCONNECTs. What an arriving PUBLISH means is left to
//! `accounting`; what the counters add up to, to `report`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use coremq::proto::codec::{
    self, Connect, Packet, PacketId, Properties, ProtocolVersion, PubResp, Publish, QoS, Subscribe,
    SubscriptionOptions,
};
use coremq::proto::topic::{TopicFilter, TopicName};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::accounting::{GroupSeen, MemberOrder, Stream};
use super::{Cfg, Shape, DISCONNECT, MAX_PACKET, PINGREQ, QOS0_BATCH, READS_PER_TURN, READ_CHUNK};
use crate::engine::{cause_of, open_socket, sockaddr};
use crate::protocol;
use crate::report::{self, BrokerSamples};
use crate::spec::new_hist;
use crate::sys::{mono_us, proc_sample_sum, rusage_cpu_s, source_ip, ProcSample};
use crate::ws::{WsClient, WsEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Pub,
    Sub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum St {
    /// Not started yet.
    Idle,
    Connecting,
    AwaitConnack,
    AwaitSuback,
    /// Subscribed (subscriber) or connected (publisher).
    Active,
    /// DISCONNECT sent; waiting for the broker's close.
    AwaitClose,
    /// Closed, for good.
    Closed,
}

pub(super) struct Conn {
    pub(super) stream: Option<TcpStream>,
    /// `--tls-ca`: the TLS client; `wbuf` then holds TLS records.
    pub(super) tls: Option<Box<rustls::ClientConnection>>,
    /// `--ws`: the WebSocket client; MQTT bytes are framed by it.
    pub(super) ws: Option<Box<WsClient>>,
    /// Bytes of a packet not yet whole.
    pub(super) rbuf: Vec<u8>,
    /// Bytes the socket did not take yet.
    pub(super) wbuf: Vec<u8>,
    /// connect() called, µs.
    pub(super) t_start: u64,
    /// CONNECT / SUBSCRIBE written, µs.
    pub(super) t_sent: u64,
    /// Index among publishers or subscribers.
    pub(super) idx: u32,
    pub(super) role: Role,
    pub(super) st: St,
    /// In the runnable queue (publishers).
    pub(super) queued: bool,
    /// In the read-again list.
    pub(super) read_queued: bool,
}

/// A QoS 1/2 flow a publisher has open.
#[derive(Clone, Copy, Default)]
pub(super) struct Slot {
    /// PUBLISH written, µs.
    pub(super) t: u64,
    pub(super) seq: u32,
    /// 0 free, 1 waiting for PUBACK (QoS 1) / PUBREC (QoS 2), 2 waiting for PUBCOMP.
    pub(super) st: u8,
}

pub(super) struct PubSt {
    pub(super) topic: String,
    /// The PUBLISH as the codec encodes it, packet id 1 and payload zero.
    pub(super) tmpl: Vec<u8>,
    pub(super) pid_off: usize,
    pub(super) pay_off: usize,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u16>,
    /// Next sequence number = messages published.
    pub(super) seq: u32,
    /// Highest sequence number acknowledged + 1 (order check).
    pub(super) ack_hi: u32,
    /// Subscribers each of its messages should reach.
    pub(super) fanout: u32,
    pub(super) active: bool,
}

pub(super) struct SubSt {
    pub(super) active: bool,
    /// Its SUBACK granted the QoS asked (stays set after the close).
    pub(super) subscribed: bool,
    /// QoS 2 packet ids PUBREC'd, waiting for PUBREL.
    pub(super) qos2: Vec<u16>,
    /// --slow-subscribers: acknowledgements not yet due, with when they are.
    pub(super) acks: VecDeque<(u64, Packet)>,
    /// --slow-subscribers: when its next acknowledgement may go.
    pub(super) next_ack: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    Handshake,
    Suback,
    Close,
}

pub(super) struct Deadline {
    tok: u32,
    kind: Wait,
    at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    Subscribe,
    Connect,
    Publish,
    Drain,
    Disconnect,
    Done,
}

/// The run's state.
pub(super) struct Run {
    pub(super) cfg: Cfg,
    /// `--tls-ca`: the client configuration and the broker's name.
    tls: Option<(
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// `cfg.protocol`, as the codec takes it.
    pub(super) v: ProtocolVersion,
    pub(super) poll: Poll,
    /// --broker: where the publishers connect.
    pub(super) dst: libc::sockaddr_in,
    /// Where the subscribers connect: --sub-broker, else --broker.
    pub(super) sub_dst: libc::sockaddr_in,
    /// Subscribers are tokens 0..subs, publishers subs..subs+pubs.
    pub(super) conns: Vec<Conn>,
    pub(super) pubs: Vec<PubSt>,
    pub(super) subs: Vec<SubSt>,
    /// --slow-subscribers: the subscribers with acknowledgements not yet
    /// sent.
    pub(super) slow_pending: Vec<u32>,
    /// Per (publisher, subscriber): new, duplicate or late (empty for a
    /// shared fan-out group).
    pub(super) streams: Vec<Stream>,
    /// `cfg.shared_fan_out()`.
    pub(super) shared_fan_out: bool,
    /// Shared fan-out: per publisher, new or duplicate to the group.
    pub(super) group_seen: Vec<GroupSeen>,
    /// Shared fan-out: per (publisher, member), the order check.
    pub(super) member_order: Vec<MemberOrder>,
    /// --share-group: PUBLISHes each subscriber received (empty without).
    pub(super) member_deliveries: Vec<u64>,
    pub(super) deadlines: VecDeque<Deadline>,
    pub(super) runnable: VecDeque<u32>,
    pub(super) read_again: Vec<u32>,
    pub(super) scratch: BytesMut,
    /// `--ws`: where MQTT bytes are framed on their way out.
    wsframe: Vec<u8>,
    pub(super) chunk: Vec<u8>,
    /// Replies (acks, PUBREL) gathered while one socket's packets are handled.
    pub(super) obuf: BytesMut,
    /// PUBLISHes of one batch.
    pub(super) pbuf: Vec<u8>,
    pub(super) phase: Phase,
    pub(super) next_start: u32,
    pub(super) hs_inflight: u32,
    pub(super) awaiting_close: u64,
    // counters
    pub(super) attempted: u64,
    pub(super) connected: u64,
    pub(super) subscribed: u64,
    pub(super) pubs_connected: u64,
    pub(super) disconnected: u64,
    pub(super) pings: u64,
    pub(super) pongs: u64,
    pub(super) published: u64,
    pub(super) acked: u64,
    pub(super) pub_inflight: u64,
    pub(super) unacked_closed: u64,
    pub(super) sub_qos2_pending: u64,
    pub(super) expected: u64,
    pub(super) delivered: u64,
    pub(super) unique: u64,
    pub(super) duplicates: u64,
    pub(super) out_of_order: u64,
    pub(super) untracked: u64,
    pub(super) misrouted: u64,
    pub(super) in_window: u64,
    pub(super) rate_sent: u64,
    pub(super) rate_behind: u64,
    /// 5.0: the lowest Receive Maximum a broker's CONNACK gave a publisher,
    /// when below --window.
    pub(super) receive_maximum: Option<u16>,
    pub(super) rr: u32,
    pub(super) failures: BTreeMap<String, u64>,
    pub(super) failed: u64,
    // histograms (µs)
    pub(super) h_e2e: Histogram<u64>,
    pub(super) h_connack: Histogram<u64>,
    pub(super) h_suback: Histogram<u64>,
    pub(super) h_ack: Histogram<u64>,
    pub(super) h_tcp: Histogram<u64>,
    /// Deliveries per second since publishing began.
    pub(super) series: Vec<u64>,
    // times (µs) and CPU (s)
    pub(super) t0: u64,
    pub(super) cpu0: f64,
    pub(super) setup_wall_s: f64,
    pub(super) setup_cpu_s: f64,
    pub(super) pub_start: u64,
    pub(super) pub_end: u64,
    pub(super) main_cpu0: f64,
    pub(super) window_wall_s: f64,
    pub(super) window_cpu_s: f64,
    pub(super) drain_start: u64,
    pub(super) drain_deadline: u64,
    pub(super) drain_s: f64,
    pub(super) drain_timed_out: bool,
    pub(super) last_delivery: u64,
    pub(super) next_ping: u64,
    pub(super) unacked: u64,
    pub(super) samples: BrokerSamples,
    pub(super) peak_rss: u64,
    pub(super) last_tick: u64,
    pub(super) last_published: u64,
    pub(super) last_delivered: u64,
}

impl Run {
    pub(super) fn new(cfg: Cfg) -> Result<Run> {
        let poll = Poll::new().context("epoll")?;
        let total = cfg.subs + cfg.pubs;
        let mut conns = Vec::with_capacity(total as usize);
        for tok in 0..total {
            let (role, idx) = if tok < cfg.subs {
                (Role::Sub, tok)
            } else {
                (Role::Pub, tok - cfg.subs)
            };
            conns.push(Conn {
                stream: None,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                tls: None,
                ws: None,
                t_start: 0,
                t_sent: 0,
                idx,
                role,
                st: St::Idle,
                queued: false,
                read_queued: false,
            });
        }
        let pubs = (0..cfg.pubs)
            .map(|i| {
                let topic = match cfg.shape {
                    Shape::Pairs => format!("{}/p2p/{i}", cfg.prefix),
                    Shape::FanIn => format!("{}/in/{i}", cfg.prefix),
                    Shape::FanOut => format!("{}/out", cfg.prefix),
                };
                let (tmpl, pid_off, pay_off) =
                    publish_template(&topic, cfg.qos, cfg.payload, cfg.protocol.version())?;
                Ok(PubSt {
                    topic,
                    tmpl,
                    pid_off,
                    pay_off,
                    slots: Vec::new(),
                    free: Vec::new(),
                    seq: 0,
                    ack_hi: 0,
                    fanout: 0,
                    active: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let subs = (0..cfg.subs)
            .map(|_| SubSt {
                active: false,
                subscribed: false,
                qos2: Vec::new(),
                acks: VecDeque::new(),
                next_ack: 0,
            })
            .collect();
        let shared_fan_out = cfg.shared_fan_out();
        let n_streams = match cfg.shape {
            Shape::Pairs | Shape::FanIn => cfg.n as usize,
            Shape::FanOut if shared_fan_out => 0,
            Shape::FanOut => cfg.pubs as usize * cfg.subs as usize,
        };
        let streams = (0..n_streams).map(|_| Stream::default()).collect();
        let (group_seen, member_order) = if shared_fan_out {
            (
                (0..cfg.pubs).map(|_| GroupSeen::default()).collect(),
                vec![MemberOrder::default(); cfg.pubs as usize * cfg.subs as usize],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let member_deliveries = if cfg.group.is_some() {
            vec![0; cfg.subs as usize]
        } else {
            Vec::new()
        };
        let tls = match &cfg.tls {
            Some((ca, name)) => Some(crate::engine::tls_client(ca, name)?),
            None => None,
        };
        Ok(Run {
            tls,
            v: cfg.protocol.version(),
            dst: sockaddr(cfg.broker),
            sub_dst: sockaddr(cfg.sub_broker.unwrap_or(cfg.broker)),
            poll,
            conns,
            pubs,
            subs,
            slow_pending: Vec::new(),
            streams,
            shared_fan_out,
            group_seen,
            member_order,
            member_deliveries,
            deadlines: VecDeque::new(),
            runnable: VecDeque::new(),
            read_again: Vec::new(),
            scratch: BytesMut::with_capacity(READ_CHUNK * 2),
            wsframe: Vec::new(),
            chunk: vec![0; READ_CHUNK],
            obuf: BytesMut::with_capacity(4096),
            pbuf: Vec::with_capacity(8192),
            phase: Phase::Subscribe,
            next_start: 0,
            hs_inflight: 0,
            awaiting_close: 0,
            attempted: 0,
            connected: 0,
            subscribed: 0,
            pubs_connected: 0,
            disconnected: 0,
            pings: 0,
            pongs: 0,
            published: 0,
            acked: 0,
            pub_inflight: 0,
            unacked_closed: 0,
            sub_qos2_pending: 0,
            expected: 0,
            delivered: 0,
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
            untracked: 0,
            misrouted: 0,
            in_window: 0,
            rate_sent: 0,
            rate_behind: 0,
            receive_maximum: None,
            rr: 0,
            failures: BTreeMap::new(),
            failed: 0,
            h_e2e: new_hist(),
            h_connack: new_hist(),
            h_suback: new_hist(),
            h_ack: new_hist(),
            h_tcp: new_hist(),
            series: Vec::new(),
            t0: 0,
            cpu0: 0.0,
            setup_wall_s: 0.0,
            setup_cpu_s: 0.0,
            pub_start: 0,
            pub_end: 0,
            main_cpu0: 0.0,
            window_wall_s: 0.0,
            window_cpu_s: 0.0,
            drain_start: 0,
            drain_deadline: 0,
            drain_s: 0.0,
            drain_timed_out: false,
            last_delivery: 0,
            next_ping: 0,
            unacked: 0,
            samples: BrokerSamples::default(),
            peak_rss: 0,
            last_tick: 0,
            last_published: 0,
            last_delivered: 0,
            cfg,
        })
    }

    pub(super) fn fail(&mut self, cause: &str) {
        self.fail_n(cause, 1);
    }

    pub(super) fn fail_n(&mut self, cause: &str, k: u64) {
        if k == 0 {
            return;
        }
        self.failed += k;
        *self.failures.entry(cause.to_string()).or_default() += k;
    }

    fn sample(&self) -> Option<ProcSample> {
        proc_sample_sum(&self.cfg.broker_pids)
    }

    /// The broker token `tok` connects to: --sub-broker for a subscriber
    /// when given, else --broker.
    fn broker_of(&self, tok: u32) -> std::net::SocketAddrV4 {
        match self.conns[tok as usize].role {
            Role::Sub => self.cfg.sub_broker.unwrap_or(self.cfg.broker),
            Role::Pub => self.cfg.broker,
        }
    }

    fn client_id(&self, tok: u32) -> String {
        let c = &self.conns[tok as usize];
        match c.role {
            Role::Pub => format!("{}-pub-{}", self.cfg.prefix, c.idx),
            Role::Sub => format!("{}-sub-{}", self.cfg.prefix, c.idx),
        }
    }

    fn filter(&self, sub: u32) -> String {
        let f = match self.cfg.shape {
            Shape::Pairs => format!("{}/p2p/{sub}", self.cfg.prefix),
            Shape::FanIn => format!("{}/in/+", self.cfg.prefix),
            Shape::FanOut => format!("{}/out", self.cfg.prefix),
        };
        match &self.cfg.group {
            Some(g) => format!("$share/{g}/{f}"),
            None => f,
        }
    }

    /// Opens the connection of token `tok` (its number for the source address).
    fn start(&mut self, tok: u32) {
        let now = mono_us();
        self.attempted += 1;
        let src = source_ip(self.cfg.source_skip + tok % self.cfg.source_ips);
        let dst = match self.conns[tok as usize].role {
            Role::Pub => &self.dst,
            Role::Sub => &self.sub_dst,
        };
        let mut stream = match open_socket(Some(src), dst) {
            Ok(s) => s,
            Err(e) => {
                self.fail(&cause_of(&e));
                self.conns[tok as usize].st = St::Closed;
                return;
            }
        };
        // Small PUBLISHes and acks must not wait for Nagle (40 ms behind a
        // delayed ACK on loopback).
        if let Err(e) = stream.set_nodelay(true) {
            self.fail(&cause_of(&e));
            self.conns[tok as usize].st = St::Closed;
            return;
        }
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(tok as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.fail(&cause_of(&e));
            self.conns[tok as usize].st = St::Closed;
            return;
        }
        let c = &mut self.conns[tok as usize];
        c.stream = Some(stream);
        c.st = St::Connecting;
        c.t_start = now;
        self.hs_inflight += 1;
        self.deadlines.push_back(Deadline {
            tok,
            kind: Wait::Handshake,
            at: now + self.cfg.timeout_us,
        });
        // On loopback the TCP handshake is usually done by now.
        self.send_connect(tok);
    }

    fn send_connect(&mut self, tok: u32) {
        // --persistent: subscribers keep their session (publishers stay clean).
        let persistent = self.cfg.persistent && self.conns[tok as usize].role == Role::Sub;
        let properties = (persistent && self.v == ProtocolVersion::V5).then(|| {
            Box::new(Properties {
                session_expiry_interval: Some(super::PERSISTENT_EXPIRY),
                ..Properties::default()
            })
        });
        let p = Packet::Connect(Box::new(Connect {
            protocol: self.v,
            clean_start: !persistent,
            keep_alive: self.cfg.keepalive,
            client_id: ByteString::from(self.client_id(tok)),
            will: None,
            username: None,
            password: None,
            properties,
        }));
        let mut buf = BytesMut::new();
        p.encode(self.v, &mut buf);
        if let Some(path) = &self.cfg.ws_path {
            // `--ws`: the upgrade request goes first; the CONNECT waits,
            // framed, for the broker's 101 (RFC 6455 §4.1).
            let host = self.broker_of(tok).to_string();
            let c = &mut self.conns[tok as usize];
            let ws = c.ws.get_or_insert_with(|| Box::new(WsClient::new(tok)));
            let request = ws.upgrade(&buf, &host, path);
            buf.clear();
            buf.extend_from_slice(&request);
        }
        if self.tls.is_some() {
            return self.send_connect_tls(tok, &buf);
        }
        let res = {
            let s = self.conns[tok as usize]
                .stream
                .as_mut()
                .expect("connecting socket");
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
                let c = &mut self.conns[tok as usize];
                if k < buf.len() {
                    c.wbuf.extend_from_slice(&buf[k..]);
                }
                self.connect_sent(tok, now);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => self.on_close(tok, Some(&e)),
        }
    }

    /// The CONNECT went (or waits in the TLS client): now awaiting
    /// CONNACK, and the TCP handshake's time is recorded.
    fn connect_sent(&mut self, tok: u32, now: u64) {
        let c = &mut self.conns[tok as usize];
        c.st = St::AwaitConnack;
        c.t_sent = now;
        self.h_tcp
            .saturating_record(now.saturating_sub(c.t_start).max(1));
    }

    /// [`Run::send_connect`] over TLS: the CONNECT waits in the TLS client
    /// until the handshake is done; the ClientHello waits in `wbuf` until
    /// the TCP handshake is (its write says so).
    fn send_connect_tls(&mut self, tok: u32, connect: &[u8]) {
        let c = &mut self.conns[tok as usize];
        if c.tls.is_none() {
            let (config, name) = self.tls.as_ref().expect("TLS run");
            let made = rustls::ClientConnection::new(config.clone(), name.clone())
                .map_err(io::Error::other)
                .and_then(|mut t| {
                    t.writer().write_all(connect)?;
                    let hello = tls_records(&mut t)?;
                    Ok((t, hello))
                });
            match made {
                Ok((t, hello)) => {
                    c.tls = Some(Box::new(t));
                    c.wbuf = hello;
                }
                Err(e) => return self.on_close(tok, Some(&e)),
            }
        }
        let res = {
            let c = &mut self.conns[tok as usize];
            let s = c.stream.as_mut().expect("connecting socket");
            loop {
                match s.write(&c.wbuf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        let now = mono_us();
        match res {
            Ok(k) => {
                self.conns[tok as usize].wbuf.drain(..k);
                self.connect_sent(tok, now);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => self.on_close(tok, Some(&e)),
        }
    }

    /// `--tls-ca`: `k` bytes read into `chunk` go through the TLS client;
    /// the MQTT bytes in them are appended to `buf`, and what the client
    /// has to say (its handshake) is written. True when the broker closed
    /// the TLS session.
    fn tls_in(&mut self, tok: u32, k: usize, buf: &mut BytesMut) -> io::Result<bool> {
        let (closed, records) = {
            let t = self.conns[tok as usize]
                .tls
                .as_mut()
                .expect("a TLS connection");
            let mut input = &self.chunk[..k];
            let mut closed = false;
            while !input.is_empty() {
                t.read_tls(&mut input)?;
                t.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let mut plain = Vec::new();
                match t.reader().read_to_end(&mut plain) {
                    Ok(_) => closed = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => closed = true,
                    Err(e) => return Err(e),
                }
                buf.extend_from_slice(&plain);
            }
            (closed, tls_records(t)?)
        };
        if !records.is_empty() {
            self.write_plain(tok, &records)?;
        }
        Ok(closed)
    }

    /// Writes MQTT `bytes` (framed with `--ws`), or keeps what the socket
    /// does not take for its next writable event. Err: the connection is
    /// broken.
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

    /// Writes `bytes` as they are (through TLS with `--tls-ca`).
    fn write_wire(&mut self, tok: u32, bytes: &[u8]) -> io::Result<()> {
        if let Some(t) = self.conns[tok as usize].tls.as_mut() {
            t.writer().write_all(bytes)?;
            let records = tls_records(t)?;
            return self.write_plain(tok, &records);
        }
        self.write_plain(tok, bytes)
    }

    /// [`Run::write`] of bytes as they go on the wire.
    fn write_plain(&mut self, tok: u32, bytes: &[u8]) -> io::Result<()> {
        let c = &mut self.conns[tok as usize];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        if !c.wbuf.is_empty() {
            c.wbuf.extend_from_slice(bytes);
            return Ok(());
        }
        let mut off = 0;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off < bytes.len() {
            c.wbuf.extend_from_slice(&bytes[off..]);
        }
        Ok(())
    }

    fn send(&mut self, tok: u32, bytes: &[u8]) {
        if let Err(e) = self.write(tok, bytes) {
            self.on_close(tok, Some(&e));
        }
    }

    fn flush(&mut self, tok: u32) -> io::Result<()> {
        let c = &mut self.conns[tok as usize];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        let mut off = 0;
        while off < c.wbuf.len() {
            match s.write(&c.wbuf[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off == c.wbuf.len() {
            c.wbuf = Vec::new();
        } else {
            c.wbuf.drain(..off);
        }
        Ok(())
    }

    fn on_event(&mut self, tok: u32, ev: &mio::event::Event) {
        let Some(c) = self.conns.get(tok as usize) else {
            return;
        };
        if matches!(c.st, St::Idle | St::Closed) {
            return;
        }
        if c.st == St::Connecting {
            let err = match c.stream.as_ref().map(|s| s.take_error()) {
                Some(Ok(Some(e))) | Some(Err(e)) => Some(e),
                _ => None,
            };
            if let Some(e) = err {
                self.on_close(tok, Some(&e));
                return;
            }
            if ev.is_writable() || ev.is_readable() {
                self.send_connect(tok);
            }
            if self.conns[tok as usize].st == St::Connecting {
                return;
            }
        }
        if ev.is_writable() && !self.conns[tok as usize].wbuf.is_empty() {
            if let Err(e) = self.flush(tok) {
                self.on_close(tok, Some(&e));
                return;
            }
            let (role, idx, empty) = {
                let c = &self.conns[tok as usize];
                (c.role, c.idx, c.wbuf.is_empty())
            };
            if role == Role::Pub && empty {
                self.make_runnable(idx);
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(tok, ev.is_read_closed() || ev.is_error());
        }
    }

    fn live(&self, tok: u32) -> bool {
        !matches!(self.conns[tok as usize].st, St::Idle | St::Closed)
    }

    fn read(&mut self, tok: u32, closed_hint: bool) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        {
            let c = &mut self.conns[tok as usize];
            if !c.rbuf.is_empty() {
                buf.extend_from_slice(&c.rbuf);
                c.rbuf = Vec::new();
            }
        }
        self.obuf.clear();
        let mut eof = false;
        let mut err = None;
        let mut again = false;
        let mut reads = 0;
        loop {
            let res = {
                let c = &mut self.conns[tok as usize];
                let Some(s) = c.stream.as_mut() else { break };
                s.read(&mut self.chunk)
            };
            match res {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(k) => {
                    let start = buf.len();
                    if self.conns[tok as usize].tls.is_some() {
                        match self.tls_in(tok, k, &mut buf) {
                            Ok(false) => {}
                            Ok(true) => eof = true,
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    } else {
                        buf.extend_from_slice(&self.chunk[..k]);
                    }
                    if self.conns[tok as usize].ws.is_some() {
                        let wire = buf.split_off(start);
                        match self.ws_input(tok, &wire, &mut buf) {
                            Ok(closed) => eof |= closed,
                            Err(cause) => {
                                buf.clear();
                                self.broken(tok, &cause);
                                break;
                            }
                        }
                    }
                    let now = mono_us();
                    self.decode_all(tok, &mut buf, now);
                    if !self.live(tok) {
                        break;
                    }
                    reads += 1;
                    // A short read drained the socket: new data raises a new edge.
                    if k < READ_CHUNK && !closed_hint {
                        break;
                    }
                    if reads >= READS_PER_TURN {
                        again = true;
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
        if self.live(tok) {
            if !self.obuf.is_empty() && self.conns[tok as usize].st != St::AwaitClose {
                let out = std::mem::take(&mut self.obuf);
                self.send(tok, &out);
                self.obuf = out;
            }
            self.obuf.clear();
        }
        if self.live(tok) {
            if !buf.is_empty() {
                self.conns[tok as usize].rbuf = buf.to_vec();
            }
            if let Some(e) = err {
                self.on_close(tok, Some(&e));
            } else if eof {
                self.on_close(tok, None);
            } else if again && !self.conns[tok as usize].read_queued {
                self.conns[tok as usize].read_queued = true;
                self.read_again.push(tok);
            }
        }
        buf.clear();
        self.scratch = buf;
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

    fn decode_all(&mut self, tok: u32, buf: &mut BytesMut, now: u64) {
        if self.conns[tok as usize].st == St::AwaitConnack {
            // A broker without 5.0 refuses a level-5 CONNECT in 3.1.1 form.
            if let Some(code) = protocol::v3_refusal(self.v, buf) {
                buf.clear();
                self.broken(tok, &format!("connack_{code}"));
                return;
            }
        }
        while self.live(tok) {
            match codec::decode(buf, self.v, MAX_PACKET) {
                Ok(Some(p)) => self.on_packet(tok, p, now),
                Ok(None) => break,
                Err(_) => {
                    buf.clear();
                    self.broken(tok, "protocol_error");
                    break;
                }
            }
        }
    }

    pub(super) fn ack(&mut self, p: Packet) {
        p.encode(self.v, &mut self.obuf);
    }

    /// A subscriber's PUBACK / PUBREC: at once, or with
    /// `--slow-subscribers` when its turn comes ([`Run::release_acks`]).
    pub(super) fn sub_ack(&mut self, sub: u32, p: Packet, now: u64) {
        if self.cfg.sub_rate <= 0.0 {
            return self.ack(p);
        }
        let gap = (1e6 / self.cfg.sub_rate) as u64;
        let s = &mut self.subs[sub as usize];
        let due = s.next_ack.max(now);
        s.next_ack = due + gap;
        if s.acks.is_empty() {
            self.slow_pending.push(sub);
        }
        s.acks.push_back((due, p));
    }

    /// `--slow-subscribers`: sends the acknowledgements that are due.
    fn release_acks(&mut self, now: u64) {
        let mut i = 0;
        while i < self.slow_pending.len() {
            let sub = self.slow_pending[i];
            let mut out = BytesMut::new();
            let acks = &mut self.subs[sub as usize].acks;
            while acks.front().is_some_and(|(due, _)| *due <= now) {
                let (_, p) = acks.pop_front().expect("looked at");
                p.encode(self.v, &mut out);
            }
            let empty = acks.is_empty();
            // Subscribers are the first tokens: subscriber i is token i.
            if !out.is_empty() && self.live(sub) {
                self.send(sub, &out);
            }
            if empty {
                self.slow_pending.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn on_packet(&mut self, tok: u32, p: Packet, now: u64) {
        let (role, st, idx) = {
            let c = &self.conns[tok as usize];
            (c.role, c.st, c.idx)
        };
        let qos = self.cfg.qos;
        match (role, st, p) {
            (_, St::AwaitConnack, Packet::ConnAck(a)) => {
                if a.code != 0 {
                    self.broken(tok, &format!("connack_{}", a.code));
                    return;
                }
                self.connected += 1;
                let t_sent = self.conns[tok as usize].t_sent;
                self.h_connack
                    .saturating_record(now.saturating_sub(t_sent).max(1));
                match role {
                    Role::Sub => {
                        let Ok(filter) = TopicFilter::new(self.filter(idx)) else {
                            self.broken(tok, "bad_filter");
                            return;
                        };
                        let sub = Packet::Subscribe(Subscribe {
                            packet_id: PacketId::new(1).expect("non-zero"),
                            filters: vec![(filter, SubscriptionOptions::qos(qos))],
                            properties: None,
                        });
                        let mut b = BytesMut::new();
                        sub.encode(self.v, &mut b);
                        let c = &mut self.conns[tok as usize];
                        c.st = St::AwaitSuback;
                        c.t_sent = now;
                        self.deadlines.push_back(Deadline {
                            tok,
                            kind: Wait::Suback,
                            at: now + self.cfg.timeout_us,
                        });
                        self.send(tok, &b);
                    }
                    Role::Pub => {
                        self.hs_inflight -= 1;
                        self.conns[tok as usize].st = St::Active;
                        self.pubs_connected += 1;
                        // 5.0: no more QoS 1/2 flows open than the broker's
                        // Receive Maximum (MQTT-3.3.4-7).
                        let mut w = self.cfg.window;
                        if let Some(rm) = a.properties.as_ref().and_then(|p| p.receive_maximum) {
                            if rm < w {
                                w = rm;
                                self.receive_maximum =
                                    Some(self.receive_maximum.map_or(rm, |m| m.min(rm)));
                            }
                        }
                        let ps = &mut self.pubs[idx as usize];
                        ps.active = true;
                        if qos != QoS::AtMostOnce {
                            ps.slots = vec![Slot::default(); usize::from(w)];
                            ps.free = (0..w).rev().collect();
                        }
                    }
                }
            }
            (Role::Sub, St::AwaitSuback, Packet::SubAck(a)) => {
                let t_sent = self.conns[tok as usize].t_sent;
                self.h_suback
                    .saturating_record(now.saturating_sub(t_sent).max(1));
                let want = qos as u8;
                match a.codes.as_slice() {
                    [c] if *c == want => {
                        self.hs_inflight -= 1;
                        self.conns[tok as usize].st = St::Active;
                        self.subs[idx as usize].active = true;
                        self.subs[idx as usize].subscribed = true;
                        self.subscribed += 1;
                    }
                    [c] if *c >= 0x80 => self.broken(tok, "suback_refused"),
                    [c] => self.broken(tok, &format!("suback_granted_qos_{c}")),
                    _ => self.broken(tok, "suback_malformed"),
                }
            }
            // A broker may send matching PUBLISHes before the SUBACK (§3.8.4).
            (Role::Sub, St::AwaitSuback | St::Active | St::AwaitClose, Packet::Publish(p)) => {
                self.on_delivery(idx, p, now);
            }
            (Role::Sub, St::Active | St::AwaitClose, Packet::PubRel(r))
                if qos == QoS::ExactlyOnce =>
            {
                if protocol::refused(r.reason) {
                    self.fail(&protocol::reason_failure("pubrel", r.reason));
                }
                let id = r.packet_id.get();
                let q = &mut self.subs[idx as usize].qos2;
                if let Some(i) = q.iter().position(|&x| x == id) {
                    q.swap_remove(i);
                    if q.is_empty() {
                        *q = Vec::new();
                    }
                    self.sub_qos2_pending -= 1;
                } else {
                    self.fail("unexpected_pubrel");
                }
                // PUBCOMP even for an id not known (MQTT-4.3.3-2 leaves none open).
                self.ack(Packet::PubComp(resp(id)));
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubAck(r))
                if qos == QoS::AtLeastOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 1, r.reason, now);
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubRec(r))
                if qos == QoS::ExactlyOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 1, r.reason, now);
            }
            (Role::Pub, St::Active | St::AwaitClose, Packet::PubComp(r))
                if qos == QoS::ExactlyOnce =>
            {
                self.pub_ack(idx, r.packet_id.get(), 2, r.reason, now);
            }
            // 5.0: the broker says why before it closes.
            (_, _, Packet::Disconnect(d)) => {
                self.fail(&protocol::reason_failure("broker_disconnect", d.reason));
            }
            (_, _, Packet::PingResp) => self.pongs += 1,
            (_, St::AwaitConnack | St::AwaitSuback, _) => self.broken(tok, "unexpected_packet"),
            (_, _, p) => self.fail(&format!("unexpected_{}", p.name().to_lowercase())),
        }
    }

    /// PUBACK / PUBREC (`stage` 1) or PUBCOMP (`stage` 2) for `id` at
    /// publisher `idx`, with its 5.0 `reason` (0 in 3.1.1).
    fn pub_ack(&mut self, idx: u32, id: u16, stage: u8, reason: u8, now: u64) {
        let qos = self.cfg.qos;
        let slot = usize::from(id).wrapping_sub(1);
        let s = self.pubs[idx as usize].slots.get(slot).copied();
        let name = match (qos, stage) {
            (QoS::AtLeastOnce, _) => "puback",
            (_, 1) => "pubrec",
            _ => "pubcomp",
        };
        let Some(s) = s.filter(|s| s.st == stage) else {
            self.fail(&format!("unexpected_{name}"));
            return;
        };
        if stage == 1 {
            let ps = &mut self.pubs[idx as usize];
            // PUBACK (QoS 1) and PUBREC (QoS 2) come in the order of the
            // PUBLISHes (MQTT-4.6.0-2, MQTT-4.6.0-3).
            let late = u64::from(s.seq) + 1 < u64::from(ps.ack_hi);
            ps.ack_hi = ps.ack_hi.max(s.seq + 1);
            if late {
                self.fail(&format!("{name}_out_of_order"));
            }
        }
        let ps = &mut self.pubs[idx as usize];
        if protocol::refused(reason) {
            // 5.0: the broker refused the message. Its flow ends here (no
            // PUBREL after a refusing PUBREC, §4.3.3); not counted as acked.
            ps.slots[slot].st = 0;
            ps.free.push(slot as u16);
            self.pub_inflight -= 1;
            self.fail(&protocol::reason_failure(name, reason));
            self.make_runnable(idx);
            return;
        }
        if qos == QoS::ExactlyOnce && stage == 1 {
            ps.slots[slot].st = 2;
            self.ack(Packet::PubRel(resp(id)));
            return;
        }
        ps.slots[slot].st = 0;
        ps.free.push(slot as u16);
        self.pub_inflight -= 1;
        self.acked += 1;
        self.h_ack.saturating_record(now.saturating_sub(s.t).max(1));
        self.make_runnable(idx);
    }

    /// A protocol-level failure: counted, and the connection closed.
    fn broken(&mut self, tok: u32, cause: &str) {
        self.fail(cause);
        self.close(tok);
    }

    /// The peer closed (`err` None: EOF) or the socket failed.
    fn on_close(&mut self, tok: u32, err: Option<&io::Error>) {
        let (st, role) = {
            let c = &self.conns[tok as usize];
            (c.st, c.role)
        };
        match st {
            St::Idle | St::Closed => return,
            St::Connecting | St::AwaitConnack | St::AwaitSuback => {
                let cause = err.map(cause_of).unwrap_or_else(|| "closed".into());
                self.fail(&cause);
            }
            St::Active => self.fail(match role {
                Role::Sub => "closed_while_subscribed",
                Role::Pub => "closed_while_publishing",
            }),
            St::AwaitClose => self.disconnected += 1,
        }
        self.close(tok);
    }

    /// Drops the socket and everything that hangs on it.
    fn close(&mut self, tok: u32) {
        let (st, role, idx) = {
            let c = &mut self.conns[tok as usize];
            c.stream = None;
            c.tls = None;
            c.ws = None;
            c.rbuf = Vec::new();
            c.wbuf = Vec::new();
            let st = c.st;
            c.st = St::Closed;
            (st, c.role, c.idx)
        };
        match st {
            St::Connecting | St::AwaitConnack | St::AwaitSuback => self.hs_inflight -= 1,
            St::AwaitClose => self.awaiting_close -= 1,
            _ => {}
        }
        match role {
            Role::Pub => {
                let ps = &mut self.pubs[idx as usize];
                ps.active = false;
                let open = (ps.slots.len() - ps.free.len()) as u64;
                ps.slots = Vec::new();
                ps.free = Vec::new();
                self.pub_inflight -= open;
                if self.phase <= Phase::Drain {
                    self.unacked_closed += open;
                }
            }
            Role::Sub => {
                let s = &mut self.subs[idx as usize];
                s.active = false;
                self.sub_qos2_pending -= s.qos2.len() as u64;
                s.qos2 = Vec::new();
            }
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(d) = self.deadlines.front() {
            if d.at > now {
                break;
            }
            let d = self.deadlines.pop_front().expect("front exists");
            match (d.kind, self.conns[d.tok as usize].st) {
                (Wait::Handshake, St::Connecting) => self.broken(d.tok, "timeout_connect"),
                (Wait::Handshake, St::AwaitConnack) => self.broken(d.tok, "timeout_connack"),
                (Wait::Suback, St::AwaitSuback) => self.broken(d.tok, "timeout_suback"),
                (Wait::Close, St::AwaitClose) => self.broken(d.tok, "timeout_close"),
                _ => {}
            }
        }
    }

    fn can_send(&self, idx: u32) -> bool {
        let ps = &self.pubs[idx as usize];
        let c = &self.conns[(self.cfg.subs + idx) as usize];
        ps.active
            && c.st == St::Active
            && c.wbuf.is_empty()
            && (self.cfg.qos == QoS::AtMostOnce || !ps.free.is_empty())
    }

    /// Queues publisher `idx` for a turn (no --rate, while publishing).
    fn make_runnable(&mut self, idx: u32) {
        if self.phase != Phase::Publish || self.cfg.rate > 0.0 {
            return;
        }
        let tok = (self.cfg.subs + idx) as usize;
        if !self.conns[tok].queued && self.can_send(idx) {
            self.conns[tok].queued = true;
            self.runnable.push_back(idx);
        }
    }

    /// Writes up to `max` PUBLISHes of publisher `idx` in one write; returns
    /// how many.
    fn publish(&mut self, idx: u32, max: usize) -> usize {
        let qos = self.cfg.qos;
        let now = mono_us();
        let mut buf = std::mem::take(&mut self.pbuf);
        buf.clear();
        let ps = &mut self.pubs[idx as usize];
        let k = if qos == QoS::AtMostOnce {
            max
        } else {
            max.min(ps.free.len())
        };
        for _ in 0..k {
            let at = buf.len();
            buf.extend_from_slice(&ps.tmpl);
            let seq = ps.seq;
            ps.seq += 1;
            if qos != QoS::AtMostOnce {
                let slot = ps.free.pop().expect("a free slot");
                ps.slots[usize::from(slot)] = Slot { t: now, seq, st: 1 };
                let id = slot + 1;
                buf[at + ps.pid_off..at + ps.pid_off + 2].copy_from_slice(&id.to_be_bytes());
            }
            let h = at + ps.pay_off;
            buf[h..h + 8].copy_from_slice(&now.to_be_bytes());
            buf[h + 8..h + 12].copy_from_slice(&idx.to_be_bytes());
            buf[h + 12..h + 16].copy_from_slice(&seq.to_be_bytes());
        }
        let fanout = u64::from(ps.fanout);
        self.published += k as u64;
        self.expected += k as u64 * fanout;
        if qos != QoS::AtMostOnce {
            self.pub_inflight += k as u64;
        }
        let tok = self.cfg.subs + idx;
        self.send(tok, &buf);
        buf.clear();
        self.pbuf = buf;
        k
    }

    /// No --rate: every runnable publisher gets one turn.
    fn service_runnable(&mut self) {
        let batch = if self.cfg.qos == QoS::AtMostOnce {
            QOS0_BATCH
        } else {
            usize::from(self.cfg.window)
        };
        for _ in 0..self.runnable.len() {
            let Some(idx) = self.runnable.pop_front() else {
                break;
            };
            self.conns[(self.cfg.subs + idx) as usize].queued = false;
            if self.can_send(idx) {
                self.publish(idx, batch);
                self.make_runnable(idx);
            }
        }
    }

    /// --rate: the messages due since publishing began, round-robin over the
    /// publishers that can take one.
    fn rate_step(&mut self, now: u64) {
        let secs = now.saturating_sub(self.pub_start) as f64 / 1e6;
        let due = (secs * self.cfg.rate) as u64 + 1;
        let mut debt = due.saturating_sub(self.rate_sent);
        // When no publisher could send for a while, do not burst to catch up
        // by more than 10 ms worth: count the rest as behind.
        let cap = ((self.cfg.rate / 100.0) as u64).max(16);
        if debt > cap {
            self.rate_behind += debt - cap;
            self.rate_sent += debt - cap;
            debt = cap;
        }
        let n = self.cfg.pubs;
        let mut tries = 0;
        while debt > 0 && tries < n {
            let idx = self.rr;
            self.rr = (self.rr + 1) % n;
            if self.can_send(idx) {
                let per = (debt / u64::from(n)).clamp(1, QOS0_BATCH as u64) as usize;
                let k = self.publish(idx, per) as u64;
                debt -= k.min(debt);
                self.rate_sent += k;
                tries = 0;
            } else {
                tries += 1;
            }
        }
    }

    fn ping(&mut self, now: u64) {
        if self.cfg.keepalive == 0 || self.phase >= Phase::Disconnect {
            return;
        }
        let period = u64::from(self.cfg.keepalive) * 500_000;
        if self.next_ping == 0 {
            self.next_ping = now + period;
        }
        if now < self.next_ping {
            return;
        }
        self.next_ping = now + period;
        for tok in 0..self.conns.len() as u32 {
            if matches!(self.conns[tok as usize].st, St::Active | St::AwaitSuback) {
                self.pings += 1;
                self.send(tok, &PINGREQ);
            }
        }
    }

    fn ramp(&mut self, end: u32) {
        let mut budget = 4096;
        while self.next_start < end && self.hs_inflight < self.cfg.inflight && budget > 0 {
            budget -= 1;
            let tok = self.next_start;
            self.next_start += 1;
            self.start(tok);
        }
    }

    fn begin_publish(&mut self, now: u64) {
        self.setup_wall_s = now.saturating_sub(self.t0) as f64 / 1e6;
        self.setup_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.cpu0;
        self.samples.after_ramp = self.sample();
        let active_subs = self.subs.iter().filter(|s| s.active).count() as u32;
        for i in 0..self.cfg.pubs as usize {
            self.pubs[i].fanout = match self.cfg.shape {
                Shape::Pairs => u32::from(self.subs[i].active),
                Shape::FanIn => u32::from(self.subs[0].active),
                // A shared group is owed each message once, whatever its size.
                Shape::FanOut if self.shared_fan_out => u32::from(active_subs > 0),
                Shape::FanOut => active_subs,
            };
        }
        let any = active_subs > 0 && self.pubs.iter().any(|p| p.active);
        self.pub_start = mono_us();
        self.pub_end = if any {
            self.pub_start + self.cfg.duration_us
        } else {
            // Nobody to publish or nobody to deliver to: nothing to measure.
            self.pub_start
        };
        self.main_cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
        self.phase = Phase::Publish;
        for i in 0..self.cfg.pubs {
            self.make_runnable(i);
        }
    }

    fn end_window(&mut self, now: u64) {
        self.window_wall_s = now.saturating_sub(self.pub_start) as f64 / 1e6;
        self.window_cpu_s = rusage_cpu_s(libc::RUSAGE_SELF) - self.main_cpu0;
        for idx in std::mem::take(&mut self.runnable) {
            self.conns[(self.cfg.subs + idx) as usize].queued = false;
        }
        self.phase = Phase::Drain;
        self.drain_start = now;
        self.drain_deadline = now + self.cfg.timeout_us;
    }

    fn drain_done(&self, now: u64) -> bool {
        if self.pub_inflight > 0 || self.sub_qos2_pending > 0 {
            return false;
        }
        if self.unique >= self.expected {
            return true;
        }
        if self.cfg.qos != QoS::AtMostOnce {
            return false;
        }
        // QoS 0 may lose messages: done when the publishers have written
        // everything and nothing has arrived for a while.
        let quiet = self.cfg.timeout_us.min(1_000_000);
        let since = self.last_delivery.max(self.drain_start);
        now.saturating_sub(since) >= quiet
            && (0..self.cfg.pubs).all(|i| self.conns[(self.cfg.subs + i) as usize].wbuf.is_empty())
    }

    fn begin_disconnect(&mut self, now: u64) {
        self.drain_s = now.saturating_sub(self.drain_start) as f64 / 1e6;
        self.samples.end_main = self.sample();
        self.unacked = self.pub_inflight + self.unacked_closed;
        self.phase = Phase::Disconnect;
        for tok in 0..self.conns.len() as u32 {
            if self.conns[tok as usize].st == St::Active {
                self.conns[tok as usize].st = St::AwaitClose;
                self.awaiting_close += 1;
                self.deadlines.push_back(Deadline {
                    tok,
                    kind: Wait::Close,
                    at: now + self.cfg.timeout_us,
                });
                self.send(tok, &DISCONNECT);
            }
        }
    }

    fn progress(&mut self, now: u64) {
        if let Some(s) = self.sample() {
            self.peak_rss = self.peak_rss.max(s.rss_bytes);
        }
        if self.cfg.quiet {
            return;
        }
        let el = now.saturating_sub(self.t0) as f64 / 1e6;
        let name = match self.phase {
            Phase::Subscribe => "subscribe",
            Phase::Connect => "connect",
            Phase::Publish => "publish",
            Phase::Drain => "drain",
            Phase::Disconnect | Phase::Done => "disconnect",
        };
        if self.phase < Phase::Publish {
            eprintln!(
                "[{el:6.1}s] {name:<10} connected {}/{}  subscribed {}/{}  errors {}",
                self.connected,
                self.cfg.pubs + self.cfg.subs,
                self.subscribed,
                self.cfg.subs,
                self.failed
            );
        } else {
            eprintln!(
                "[{el:6.1}s] {name:<10} published {} ({}/s)  delivered {} ({}/s)  e2e p99 {}  errors {}",
                self.published,
                self.published - self.last_published,
                self.delivered,
                self.delivered - self.last_delivered,
                report::fmt_us(self.h_e2e.value_at_quantile(0.99)),
                self.failed
            );
        }
        self.last_published = self.published;
        self.last_delivered = self.delivered;
    }

    pub(super) fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(4096);
        self.t0 = mono_us();
        self.last_tick = self.t0;
        self.cpu0 = rusage_cpu_s(libc::RUSAGE_SELF);
        self.samples.before = self.sample();
        self.peak_rss = self.samples.before.map(|s| s.rss_bytes).unwrap_or(0);
        let (subs, total) = (self.cfg.subs, self.cfg.subs + self.cfg.pubs);
        loop {
            let timeout_ms = if !self.runnable.is_empty() || !self.read_again.is_empty() {
                0
            } else if (self.phase == Phase::Publish && self.cfg.rate > 0.0)
                || !self.slow_pending.is_empty()
            {
                1
            } else {
                10
            };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout_ms)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            for ev in events.iter() {
                self.on_event(ev.token().0 as u32, ev);
            }
            for tok in std::mem::take(&mut self.read_again) {
                self.conns[tok as usize].read_queued = false;
                if self.live(tok) {
                    self.read(tok, false);
                }
            }
            let now = mono_us();
            self.expire(now);
            self.ping(now);
            self.release_acks(now);
            match self.phase {
                Phase::Subscribe => {
                    self.ramp(subs);
                    if self.next_start >= subs && self.hs_inflight == 0 {
                        self.phase = Phase::Connect;
                    }
                }
                Phase::Connect => {
                    self.ramp(total);
                    if self.next_start >= total && self.hs_inflight == 0 {
                        self.begin_publish(now);
                    }
                }
                Phase::Publish => {
                    if now >= self.pub_end {
                        self.end_window(now);
                    } else if self.cfg.rate > 0.0 {
                        self.rate_step(now);
                    } else {
                        self.service_runnable();
                    }
                }
                Phase::Drain => {
                    let done = self.drain_done(now);
                    if done || now >= self.drain_deadline {
                        self.drain_timed_out = !done;
                        self.begin_disconnect(now);
                    }
                }
                Phase::Disconnect => {
                    if self.awaiting_close == 0 {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => break,
            }
            if now.saturating_sub(self.last_tick) >= 1_000_000 {
                self.last_tick = now;
                self.progress(now);
            }
        }
        // Let the broker finish the closes it has been handed.
        if !self.cfg.broker_pids.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.samples.after = self.sample();
        Ok(())
    }
}

pub(super) fn resp(id: u16) -> PubResp {
    PubResp {
        packet_id: PacketId::new(id).expect("packet ids are never 0"),
        reason: 0,
        properties: None,
    }
}

/// A PUBLISH on `topic` encoded by the codec in `v`, with packet id 1 (at
/// QoS 1 and 2) and a zero payload; returns it with the offsets of the packet
/// id and of the payload, which [`Run::publish`] patches per message. In 5.0
/// a Property Length byte (0) sits between the two.
pub(super) fn publish_template(
    topic: &str,
    qos: QoS,
    payload: usize,
    v: ProtocolVersion,
) -> Result<(Vec<u8>, usize, usize)> {
    let topic_len = topic.len();
    let topic =
        TopicName::new(topic.to_string()).map_err(|e| anyhow::anyhow!("topic {topic}: {e:?}"))?;
    let p = Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("non-zero")),
        payload: Bytes::from(vec![0u8; payload]),
        properties: None,
    });
    let mut b = BytesMut::new();
    p.encode(v, &mut b);
    let pay_off = b.len() - payload;
    // Fixed header: the type byte, then the Remaining Length varint.
    let fixed = 1
        + b[1..]
            .iter()
            .position(|&x| x & 0x80 == 0)
            .expect("a whole Remaining Length")
        + 1;
    let pid_off = if qos == QoS::AtMostOnce {
        0
    } else {
        fixed + 2 + topic_len
    };
    Ok((b.to_vec(), pid_off, pay_off))
}

/// The TLS records a client has ready (handshake, or MQTT bytes it
/// encrypted), taken out of it to go on the wire like plain bytes.
fn tls_records(t: &mut rustls::ClientConnection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while t.wants_write() {
        t.write_tls(&mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_template_decodes_to_the_message() {
        use ProtocolVersion::{V3_1_1, V5};
        for (v, qos) in [V3_1_1, V5]
            .into_iter()
            .flat_map(|v| [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].map(|q| (v, q)))
        {
            let (mut t, pid_off, pay_off) = publish_template("lg/p2p/7", qos, 100, v).unwrap();
            // 5.0: Property Length 0 between the packet id (or topic) and the payload.
            let props = usize::from(v == V5);
            if qos != QoS::AtMostOnce {
                assert_eq!(pid_off + 2 + props, pay_off, "{v:?} {qos:?}");
            }
            if v == V5 {
                assert_eq!(t[pay_off - 1], 0, "{v:?} {qos:?}");
            }
            if qos != QoS::AtMostOnce {
                t[pid_off..pid_off + 2].copy_from_slice(&513u16.to_be_bytes());
            }
            t[pay_off..pay_off + 8].copy_from_slice(&123_456u64.to_be_bytes());
            t[pay_off + 8..pay_off + 12].copy_from_slice(&7u32.to_be_bytes());
            t[pay_off + 12..pay_off + 16].copy_from_slice(&42u32.to_be_bytes());
            let mut b = BytesMut::from(&t[..]);
            let Ok(Some(Packet::Publish(p))) = codec::decode(&mut b, v, MAX_PACKET) else {
                panic!("not a PUBLISH");
            };
            assert!(b.is_empty());
            assert_eq!(p.qos, qos);
            assert_eq!(p.topic.as_str(), "lg/p2p/7");
            assert_eq!(p.payload.len(), 100);
            assert_eq!(
                p.packet_id.map(|i| i.get()),
                (qos != QoS::AtMostOnce).then_some(513)
            );
            assert_eq!(&p.payload[0..8], &123_456u64.to_be_bytes());
            assert_eq!(&p.payload[8..12], &7u32.to_be_bytes());
            assert_eq!(&p.payload[12..16], &42u32.to_be_bytes());
        }
    }
}

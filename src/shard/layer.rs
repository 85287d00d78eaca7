//! What sits between a connection's socket and the broker on a
//! `--tls-listen`, `--ws-listen` or `--wss-listen` listener: TLS (rustls),
//! WebSocket (the upgrade, then frames), or TLS then WebSocket.
//!
//! Sans-IO, like the broker: [`Layer::input`] takes the bytes a read gave
//! and hands back the MQTT bytes in them; [`Layer::wrap`] turns the MQTT
//! bytes the broker has for the client into what goes on the wire. What the
//! layer must say on its own (TLS handshake records, the HTTP upgrade
//! answer, a pong, a close) waits in [`Layer::out`] until the socket loop
//! sends it with the next write. No task, thread or timer per connection;
//! a plain `--listen` connection has no layer at all.
//!
//! TLS uses rustls's unbuffered connection: rustls keeps the keys and the
//! protocol state and no buffer of its own (~2.5 KiB per idle connection
//! after the handshake, counted, against ~7.5 KiB for its buffered
//! connection, whose receive buffer stays allocated); a record that came in
//! part waits in [`Tls::partial`], which is freed once the record is whole.
//! The records themselves are sealed and opened by `crate::tls::record`,
//! whose keys stay unexpanded while a connection is idle.
//!
//! The WebSocket side uses tungstenite's frame-header codec and accept-key
//! derivation and httparse for the upgrade request; the frame payloads are
//! unmasked straight into the MQTT buffer, so a frame is never held whole
//! and MQTT packets may be split over frames or joined in one, as the
//! client chooses (MQTT 6.0).

use std::io::Cursor;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::ServerConfig;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::http;

/// Longest WebSocket upgrade request taken (as the metrics endpoint).
const MAX_UPGRADE_REQUEST: usize = 8 * 1024;

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// WebSocket close codes we send (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;

/// Why a layer ended the connection. What it had to say last (a TLS alert,
/// an HTTP error, a close frame) is in [`Layer::out`].
#[derive(Debug)]
pub(crate) enum Fail {
    /// The TLS handshake failed (bad certificate, wrong protocol, not TLS
    /// at all).
    TlsHandshake(String),
    /// TLS failed after the handshake (a bad record).
    Tls(String),
    /// The WebSocket upgrade was refused with this HTTP status.
    WsUpgrade(u16),
    /// A WebSocket frame broke the protocol (a text frame, MQTT-6.0.0-1; an
    /// unmasked frame; a reserved opcode).
    WsProtocol(&'static str),
    /// The peer closed: a TLS close_notify or a WebSocket close frame.
    PeerClosed,
}

/// What one [`Layer::input`] completed, for the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The TLS handshake finished: `Some(resumed)`.
    pub tls_handshake: Option<bool>,
    /// The WebSocket upgrade was accepted.
    pub ws_upgraded: bool,
}

/// How WebSocket upgrades are judged.
#[derive(Debug, Clone, Default)]
pub(crate) struct WsRules {
    /// The only path allowed (`--ws-path`); `None` takes any.
    pub path: Option<String>,
}

/// One connection's layers.
pub(crate) struct Layer {
    /// Boxed: rustls's connection is ~1.1 KiB, which a WebSocket-only
    /// connection should not carry.
    tls: Option<Box<Tls>>,
    ws: Option<Ws>,
    /// Bytes for the socket that the layer produced on its own.
    pub out: BytesMut,
    /// A close (TLS close_notify, WebSocket close frame) was queued.
    close_queued: bool,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("tls", &self.tls.is_some())
            .field("ws", &self.ws.is_some())
            .field("out", &self.out.len())
            .finish()
    }
}

enum Ws {
    /// Reading the HTTP upgrade request.
    Upgrade(BytesMut),
    /// Upgraded: reading frames.
    Open(Frames),
    /// A close frame went out or came in: nothing more is read.
    Closed,
}

/// Where the frame reader is.
#[derive(Default)]
struct Frames {
    /// Bytes not yet consumed: a partial header or control frame.
    buf: BytesMut,
    /// Payload bytes of the current data frame still to come.
    data_left: u64,
    mask: [u8; 4],
    /// Position in the mask of the next payload byte.
    mask_pos: usize,
}

impl Layer {
    /// The layers of a connection accepted on a TLS and/or WebSocket
    /// listener; `None` when TLS is asked for without settings.
    pub(crate) fn new(tls: Option<&Arc<ServerConfig>>, ws: bool) -> Result<Layer, String> {
        let tls = match tls {
            Some(config) => Some(Box::new(Tls {
                conn: UnbufferedServerConnection::new(config.clone()).map_err(|e| e.to_string())?,
                partial: Vec::new(),
            })),
            None => None,
        };
        Ok(Layer {
            tls,
            ws: ws.then(|| Ws::Upgrade(BytesMut::new())),
            out: BytesMut::new(),
            close_queued: false,
        })
    }

    /// Whether TLS or the WebSocket upgrade is still under way (nothing of
    /// MQTT has come yet).
    pub(crate) fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.is_handshaking())
            || matches!(self.ws, Some(Ws::Upgrade(_)))
    }

    /// Whether the connection speaks WebSocket.
    pub(crate) fn is_ws(&self) -> bool {
        self.ws.is_some()
    }

    /// Whether the connection is over TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The client certificate's subject CN, once TLS verified it.
    pub(crate) fn peer_common_name(&self) -> Option<String> {
        let certs = self.tls.as_ref()?.conn.peer_certificates()?;
        crate::tls::common_name(certs.first()?)
    }

    /// Bytes read from the socket: the MQTT bytes in them are appended to
    /// `mqtt`; what the layer answers waits in [`Layer::out`].
    pub(crate) fn input(
        &mut self,
        raw: &[u8],
        mqtt: &mut BytesMut,
        rules: &WsRules,
    ) -> Result<Progress, Fail> {
        let mut progress = Progress::default();
        let Some(tls) = self.tls.as_mut() else {
            match self.ws.as_mut() {
                Some(ws) => ws.input(raw, mqtt, rules, &mut progress, &mut self.out)?,
                None => mqtt.extend_from_slice(raw),
            }
            return Ok(progress);
        };
        let was_handshaking = tls.conn.is_handshaking();
        let mut plain = BytesMut::new();
        let target = if self.ws.is_some() {
            &mut plain
        } else {
            &mut *mqtt
        };
        // Handshake records, tickets, an alert after a failure: whatever
        // TLS has to send goes to `out`.
        let peer_closed = match tls.input(raw, target, &mut self.out) {
            Ok(closed) => closed,
            Err(e) if was_handshaking || tls.conn.is_handshaking() => {
                return Err(Fail::TlsHandshake(e));
            }
            Err(e) => return Err(Fail::Tls(e)),
        };
        if was_handshaking && !tls.conn.is_handshaking() {
            progress.tls_handshake =
                Some(tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        }
        if let Some(ws) = self.ws.as_mut() {
            let mut replies = BytesMut::new();
            let result = ws.input(&plain, mqtt, rules, &mut progress, &mut replies);
            if !replies.is_empty() {
                tls.encrypt(&replies, &mut self.out);
            }
            result?;
        }
        if peer_closed {
            return Err(Fail::PeerClosed);
        }
        Ok(progress)
    }

    /// Appends to `out` what the layer has to send, then `mqtt` as the
    /// client is to get it (framed, encrypted).
    pub(crate) fn wrap(&mut self, mqtt: &[u8], out: &mut BytesMut) {
        if !self.out.is_empty() {
            out.extend_from_slice(&self.out);
            // Freed, not cleared: the handshake's flights and the session
            // ticket would otherwise keep ~1-2 KiB per idle connection.
            self.out = BytesMut::new();
        }
        if mqtt.is_empty() {
            return;
        }
        let mut framed = BytesMut::new();
        let payload: &[u8] = if self.ws.is_some() {
            binary_frame(mqtt, &mut framed);
            &framed
        } else {
            mqtt
        };
        match self.tls.as_mut() {
            Some(tls) => tls.encrypt(payload, out),
            None => out.extend_from_slice(payload),
        }
    }

    /// The connection is being closed by us: a WebSocket close frame and a
    /// TLS close_notify, once, into [`Layer::out`].
    pub(crate) fn queue_close(&mut self) {
        if self.close_queued || self.is_handshaking() {
            return;
        }
        self.close_queued = true;
        if let Some(ws) = self.ws.as_mut() {
            if matches!(ws, Ws::Open(_)) {
                *ws = Ws::Closed;
                let mut frame = BytesMut::new();
                close_frame(CLOSE_NORMAL, &mut frame);
                match self.tls.as_mut() {
                    Some(tls) => tls.encrypt(&frame, &mut self.out),
                    None => self.out.extend_from_slice(&frame),
                }
            }
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.close_notify(&mut self.out);
        }
    }

    /// Whether [`Layer::out`] has bytes to send.
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }
}

/// A connection's TLS: rustls's unbuffered server connection, and the
/// bytes of a record not all received yet.
struct Tls {
    conn: UnbufferedServerConnection,
    /// The start of a record whose end has not come; empty (no allocation)
    /// between records, which is where an idle connection sits.
    partial: Vec<u8>,
}

/// Bound on the states one call steps through (each record takes one or
/// two); a safety net against a loop that would not end, never reached.
const MAX_TLS_STEPS: usize = 1 << 16;

impl Tls {
    /// Feeds `raw` to rustls: the plaintext goes to `plain`, what TLS has
    /// to send (handshake, tickets, a key update, an alert after a failure)
    /// to `out`. `Ok(true)` when the peer sent close_notify.
    fn input(
        &mut self,
        raw: &[u8],
        plain: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<bool, String> {
        self.partial.extend_from_slice(raw);
        let mut closed = false;
        let mut failed = None;
        for _ in 0..MAX_TLS_STEPS {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.partial);
            let more = match state {
                Err(e) => {
                    failed = Some(e.to_string());
                    false
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                plain.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    failed.is_none()
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(out, &mut encode);
                    true
                }
                // What was encoded goes out with the socket's next write.
                Ok(ConnectionState::TransmitTlsData(sent)) => {
                    sent.done();
                    true
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    closed = true;
                    false
                }
                // Waiting for the peer's next flight, or for data: all that
                // came is taken. (Early data is not offered, so rustls never
                // stops in ReadEarlyData.)
                Ok(_) => false,
            };
            self.partial.drain(..discard);
            if !more {
                break;
            }
        }
        if self.partial.is_empty() {
            // An idle connection holds no receive buffer.
            self.partial = Vec::new();
        }
        match failed {
            Some(e) => {
                // The fatal alert rustls queued for the peer.
                self.drain_encoded(out);
                Err(e)
            }
            None => Ok(closed),
        }
    }

    /// Encrypts `plain` into `out`. Nothing is written while the handshake
    /// is under way or after a close (the broker writes only after CONNECT,
    /// which comes after the handshake).
    fn encrypt(&mut self, plain: &[u8], out: &mut BytesMut) {
        self.with_write_traffic(out, |traffic, out| {
            // Each record of up to 16 KiB adds a header, a content type and
            // a tag (at most 29 bytes, TLS 1.2 AES-GCM).
            let room = plain.len() + (plain.len() / 16384 + 1) * 32;
            append(out, room, |buf| {
                traffic.encrypt(plain, buf).map_err(insufficient)
            });
        });
    }

    /// A close_notify alert into `out`.
    fn close_notify(&mut self, out: &mut BytesMut) {
        self.with_write_traffic(out, |traffic, out| {
            append(out, 64, |buf| {
                traffic.queue_close_notify(buf).map_err(insufficient)
            });
        });
    }

    /// Steps rustls to the state where application data may be written
    /// (writing out first what it has to send, e.g. an answer to a key
    /// update) and runs `write` there.
    fn with_write_traffic(
        &mut self,
        out: &mut BytesMut,
        write: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut BytesMut),
    ) {
        let mut write = Some(write);
        for _ in 0..MAX_TLS_STEPS {
            // No received bytes: a partial record stays in `partial`.
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    if let Some(write) = write.take() {
                        write(&mut traffic, out);
                    }
                    return;
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(out, &mut encode);
                }
                Ok(ConnectionState::TransmitTlsData(sent)) => sent.done(),
                _ => return,
            }
        }
    }

    /// What rustls queued after a failure (the fatal alert): the steps of
    /// [`Tls::with_write_traffic`] with nothing to write (after a failure
    /// rustls never reaches the write state).
    fn drain_encoded(&mut self, out: &mut BytesMut) {
        self.with_write_traffic(out, |_, _| {});
    }
}

/// A handshake record (or alert) rustls encoded, appended to `out`.
fn encode_into(out: &mut BytesMut, encode: &mut EncodeTlsData<'_, ServerConnectionData>) {
    append(out, 1024, |buf| {
        encode.encode(buf).map_err(|e| match e {
            EncodeError::InsufficientSize(s) => Some(s.required_size),
            EncodeError::AlreadyEncoded => None,
        })
    });
}

/// How much room an encryption needs, for [`append`].
fn insufficient(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        // The record sequence numbers ran out: not in practice, as rustls
        // updates TLS 1.3 keys and closes TLS 1.2 connections long before.
        EncryptError::EncryptExhausted => None,
    }
}

/// Runs `fill` on room at the end of `out` (first `room` bytes): rustls
/// writes records into a slice and answers how much it needs when the
/// slice is too short.
fn append(
    out: &mut BytesMut,
    mut room: usize,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
    }
}

/// One final binary frame (server frames are not masked).
fn binary_frame(payload: &[u8], out: &mut BytesMut) {
    frame(OpCode::Data(Data::Binary), payload, out);
}

fn close_frame(code: u16, out: &mut BytesMut) {
    frame(OpCode::Control(Control::Close), &code.to_be_bytes(), out);
}

fn frame(opcode: OpCode, payload: &[u8], out: &mut BytesMut) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    let len = payload.len() as u64;
    out.reserve(header.len(len) + payload.len());
    // Formatting into memory cannot fail.
    let _ = header.format(len, &mut out.writer());
    out.extend_from_slice(payload);
}

impl Ws {
    /// Plaintext from the client: the upgrade request, then frames. Answers
    /// go to `replies` (before TLS).
    fn input(
        &mut self,
        data: &[u8],
        mqtt: &mut BytesMut,
        rules: &WsRules,
        progress: &mut Progress,
        replies: &mut BytesMut,
    ) -> Result<(), Fail> {
        match self {
            Ws::Closed => Ok(()),
            Ws::Open(frames) => {
                let result = frames.input(data, mqtt, replies);
                if result.is_err() {
                    *self = Ws::Closed;
                }
                result
            }
            Ws::Upgrade(request) => {
                request.extend_from_slice(data);
                match upgrade(request, rules) {
                    Upgrade::Partial => Ok(()),
                    Upgrade::Refused { status, why, extra } => {
                        replies.extend_from_slice(&http::response(
                            status,
                            extra,
                            "text/plain; charset=utf-8",
                            format!("{why}\n").as_bytes(),
                        ));
                        *self = Ws::Closed;
                        Err(Fail::WsUpgrade(status_code(status)))
                    }
                    Upgrade::Accepted { answer, used } => {
                        replies.extend_from_slice(answer.as_bytes());
                        progress.ws_upgraded = true;
                        let rest = request.split_off(used);
                        let mut frames = Frames::default();
                        let result = frames.input(&rest, mqtt, replies);
                        *self = Ws::Open(frames);
                        if result.is_err() {
                            *self = Ws::Closed;
                        }
                        result
                    }
                }
            }
        }
    }
}

enum Upgrade {
    /// The request is not all in yet.
    Partial,
    /// An HTTP error: status line, why (the body), extra header lines.
    Refused {
        status: &'static str,
        why: &'static str,
        extra: &'static str,
    },
    /// The 101 answer; the request was `used` bytes long.
    Accepted { answer: String, used: usize },
}

/// Judges an upgrade request (RFC 6455 §4.2.1; MQTT 6.0).
fn upgrade(request: &[u8], rules: &WsRules) -> Upgrade {
    const BAD: &str = "400 Bad Request";
    let refuse = |status, why| Upgrade::Refused {
        status,
        why,
        extra: "",
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(request) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_UPGRADE_REQUEST => n,
        Ok(httparse::Status::Partial) if request.len() < MAX_UPGRADE_REQUEST => {
            return Upgrade::Partial
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return refuse("431 Request Header Fields Too Large", "request too large")
        }
        Err(_) => return refuse(BAD, "not an HTTP request"),
    };
    if req.method != Some("GET") {
        return Upgrade::Refused {
            status: "405 Method Not Allowed",
            why: "a WebSocket upgrade is a GET",
            extra: "Allow: GET\r\n",
        };
    }
    if req.version != Some(1) {
        return refuse(BAD, "a WebSocket upgrade needs HTTP/1.1");
    }
    if let Some(want) = &rules.path {
        let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
        if path != want {
            return refuse("404 Not Found", "no WebSocket endpoint at this path");
        }
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect::<Vec<&str>>()
    };
    // Comma-separated tokens of every header line `name` (case-insensitive
    // compare is the caller's).
    let tokens = |name: &str| -> Vec<String> {
        header(name)
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    };
    if !tokens("upgrade")
        .iter()
        .any(|t| t.eq_ignore_ascii_case("websocket"))
    {
        return refuse(BAD, "no Upgrade: websocket header");
    }
    if !tokens("connection")
        .iter()
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
    {
        return refuse(BAD, "no Connection: Upgrade header");
    }
    if header("sec-websocket-version").first().map(|v| v.trim()) != Some("13") {
        return Upgrade::Refused {
            status: "426 Upgrade Required",
            why: "Sec-WebSocket-Version must be 13",
            extra: "Sec-WebSocket-Version: 13\r\n",
        };
    }
    let key = match header("sec-websocket-key").as_slice() {
        [key] if key_is_valid(key.trim()) => key.trim().to_owned(),
        _ => return refuse(BAD, "no valid Sec-WebSocket-Key"),
    };
    // MQTT-6.0.0-3/-4: the client offers "mqtt" and the server answers it
    // ("mqttv3.1" is what MQTT 3.1 clients offer).
    let offered = tokens("sec-websocket-protocol");
    let Some(protocol) = ["mqtt", "mqttv3.1"]
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
    else {
        return refuse(BAD, "Sec-WebSocket-Protocol must offer mqtt (MQTT-6.0.0-3)");
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Upgrade::Accepted {
        answer: format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        ),
        used,
    }
}

/// The number of a status line.
fn status_code(status: &str) -> u16 {
    status.get(..3).and_then(|c| c.parse().ok()).unwrap_or(400)
}

/// A Sec-WebSocket-Key is 16 random bytes in base64 (RFC 6455 §4.1).
fn key_is_valid(key: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

impl Frames {
    /// Frames from the client: data payloads are unmasked into `mqtt`,
    /// pings answered and a close returned in `replies`.
    fn input(
        &mut self,
        data: &[u8],
        mqtt: &mut BytesMut,
        replies: &mut BytesMut,
    ) -> Result<(), Fail> {
        self.buf.extend_from_slice(data);
        loop {
            if self.data_left > 0 {
                let n = self.buf.len().min(self.data_left as usize);
                if n == 0 {
                    return Ok(());
                }
                let start = mqtt.len();
                mqtt.extend_from_slice(&self.buf[..n]);
                self.unmask(&mut mqtt[start..]);
                self.buf.advance(n);
                self.data_left -= n as u64;
                continue;
            }
            let mut cursor = Cursor::new(&self.buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    self.release_if_empty();
                    return Ok(());
                }
                Err(_) => return Err(self.protocol_error("a bad frame header", replies)),
            };
            let header_len = cursor.position() as usize;
            // RFC 6455 §5.1: a client masks every frame.
            let Some(mask) = header.mask else {
                return Err(self.protocol_error("an unmasked frame", replies));
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(self.protocol_error("reserved bits set", replies));
            }
            match header.opcode {
                OpCode::Data(Data::Binary | Data::Continue) => {
                    self.buf.advance(header_len);
                    self.data_left = len;
                    self.mask = mask;
                    self.mask_pos = 0;
                }
                OpCode::Data(Data::Text) => {
                    // MQTT-6.0.0-1: MQTT travels in binary frames only.
                    close_frame(CLOSE_UNSUPPORTED_DATA, replies);
                    return Err(Fail::WsProtocol("a text frame (MQTT-6.0.0-1)"));
                }
                OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                    return Err(self.protocol_error("a reserved opcode", replies));
                }
                OpCode::Control(control) => {
                    if len > MAX_CONTROL_PAYLOAD || !header.is_final {
                        return Err(
                            self.protocol_error("a long or fragmented control frame", replies)
                        );
                    }
                    let whole = header_len + len as usize;
                    if self.buf.len() < whole {
                        return Ok(());
                    }
                    self.buf.advance(header_len);
                    let mut payload = self.buf.split_to(len as usize);
                    self.mask = mask;
                    self.mask_pos = 0;
                    self.unmask(&mut payload);
                    match control {
                        Control::Ping => frame(OpCode::Control(Control::Pong), &payload, replies),
                        Control::Pong => {}
                        Control::Close => {
                            // Echo the code it sent (RFC 6455 §5.5.1).
                            let code = if payload.len() >= 2 {
                                u16::from_be_bytes([payload[0], payload[1]])
                            } else {
                                CLOSE_NORMAL
                            };
                            close_frame(code, replies);
                            return Err(Fail::PeerClosed);
                        }
                        Control::Reserved(_) => unreachable!("matched above"),
                    }
                }
            }
        }
    }

    fn unmask(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            *b ^= self.mask[self.mask_pos];
            self.mask_pos = (self.mask_pos + 1) & 3;
        }
    }

    /// An idle connection keeps no frame buffer.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    fn protocol_error(&mut self, what: &'static str, replies: &mut BytesMut) -> Fail {
        close_frame(CLOSE_PROTOCOL_ERROR, replies);
        Fail::WsProtocol(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![0x80 | opcode];
        assert!(payload.len() < 126);
        v.push(0x80 | payload.len() as u8);
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn open_ws() -> Layer {
        let mut l = Layer::new(None, true).unwrap();
        let req = "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: mqtt\r\n\r\n";
        let mut mqtt = BytesMut::new();
        let p = l
            .input(req.as_bytes(), &mut mqtt, &WsRules::default())
            .unwrap();
        assert!(p.ws_upgraded);
        let answer = String::from_utf8(l.out.split().to_vec()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        // RFC 6455 §1.3's own example key and answer.
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(answer.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        l
    }

    #[test]
    fn frames_split_and_joined_carry_the_mqtt_bytes() {
        let mut l = open_ws();
        let mut mqtt = BytesMut::new();
        let mut wire = masked(0x2, b"abc");
        wire.extend(masked(0x0, b"de"));
        wire.extend(masked(0x9, b"hi"));
        // One byte at a time: headers and payloads split anywhere.
        for b in &wire {
            l.input(std::slice::from_ref(b), &mut mqtt, &WsRules::default())
                .unwrap();
        }
        assert_eq!(&mqtt[..], b"abcde");
        // The ping's pong, unmasked, same payload.
        assert_eq!(&l.out[..], &[0x8a, 2, b'h', b'i']);
        let mut out = BytesMut::new();
        l.wrap(b"xyz", &mut out);
        assert_eq!(&out[..], &[0x8a, 2, b'h', b'i', 0x82, 3, b'x', b'y', b'z']);
    }

    #[test]
    fn a_text_frame_closes_mqtt_6_0_0_1() {
        let mut l = open_ws();
        let mut mqtt = BytesMut::new();
        let e = l.input(&masked(0x1, b"{}"), &mut mqtt, &WsRules::default());
        assert!(matches!(e, Err(Fail::WsProtocol(_))), "{e:?}");
        assert_eq!(&l.out[..], &[0x88, 2, 0x03, 0xeb]);
    }

    #[test]
    fn a_close_frame_is_answered_with_its_code() {
        let mut l = open_ws();
        let e = l.input(
            &masked(0x8, &[0x03, 0xe9]),
            &mut BytesMut::new(),
            &WsRules::default(),
        );
        assert!(matches!(e, Err(Fail::PeerClosed)));
        assert_eq!(&l.out[..], &[0x88, 2, 0x03, 0xe9]);
    }

    #[test]
    fn an_unmasked_frame_is_a_protocol_error() {
        let mut l = open_ws();
        let e = l.input(&[0x82, 1, b'x'], &mut BytesMut::new(), &WsRules::default());
        assert!(matches!(e, Err(Fail::WsProtocol(_))));
        assert_eq!(&l.out[..], &[0x88, 2, 0x03, 0xea]);
    }

    #[test]
    fn upgrades_are_judged_mqtt_6_0_0_3() {
        let base = |extra: &str, proto: &str| {
            format!(
                "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}{proto}\r\n"
            )
        };
        let status = |req: &str, rules: &WsRules| match upgrade(req.as_bytes(), rules) {
            Upgrade::Refused { status, .. } => status_code(status),
            Upgrade::Accepted { .. } => 101,
            Upgrade::Partial => 0,
        };
        let any = WsRules::default();
        let v13 = "Sec-WebSocket-Version: 13\r\n";
        assert_eq!(
            status(&base(v13, "Sec-WebSocket-Protocol: mqtt\r\n"), &any),
            101
        );
        assert_eq!(
            status(
                &base(v13, "Sec-WebSocket-Protocol: chat, mqttv3.1\r\n"),
                &any
            ),
            101
        );
        assert_eq!(
            status(&base(v13, "Sec-WebSocket-Protocol: chat\r\n"), &any),
            400
        );
        assert_eq!(status(&base(v13, ""), &any), 400);
        assert_eq!(
            status(
                &base(
                    "Sec-WebSocket-Version: 8\r\n",
                    "Sec-WebSocket-Protocol: mqtt\r\n"
                ),
                &any
            ),
            426
        );
        let only = WsRules {
            path: Some("/ws".into()),
        };
        assert_eq!(
            status(&base(v13, "Sec-WebSocket-Protocol: mqtt\r\n"), &only),
            404
        );
        assert_eq!(status("POST /mqtt HTTP/1.1\r\n\r\n", &any), 405);
        assert_eq!(status("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c", &any), 400);
        assert_eq!(status("GET /mqtt HTTP/1.1\r\nHost: x\r\n", &any), 0);
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_UPGRADE_REQUEST)
        );
        assert_eq!(status(&huge, &any), 431);
    }

    /// A server layer on the suites the broker offers and a rustls client
    /// of `version`, with a certificate made here.
    fn tls_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Layer, rustls::ClientConnection) {
        let (server, client) =
            crate::tls::test_configs(crate::tls::record::LEAN_SUITES.clone(), &[version]);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let client = rustls::ClientConnection::new(client, name).unwrap();
        (Layer::new(Some(&server), false).unwrap(), client)
    }

    /// What the client has to send.
    fn client_out(client: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Server bytes into the client; the plaintext it yields.
    fn client_in(client: &mut rustls::ClientConnection, mut wire: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut plain = Vec::new();
        while !wire.is_empty() {
            client.read_tls(&mut wire).unwrap();
            client.process_new_packets().unwrap();
            // WouldBlock (nothing more yet) or the peer's close: both fine.
            let _ = client.reader().read_to_end(&mut plain);
        }
        plain
    }

    #[test]
    fn tls_records_split_anywhere_carry_the_mqtt_bytes_and_an_idle_layer_holds_no_buffer() {
        use std::io::Write;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut layer, mut client) = tls_pair(version);
            let mut mqtt = BytesMut::new();
            let mut handshaken = None;
            for _ in 0..10 {
                let wire = client_out(&mut client);
                let p = layer.input(&wire, &mut mqtt, &WsRules::default()).unwrap();
                handshaken = handshaken.or(p.tls_handshake);
                let answer = std::mem::take(&mut layer.out);
                client_in(&mut client, &answer);
                if !layer.is_handshaking() && !client.is_handshaking() && !client.wants_write() {
                    break;
                }
            }
            assert_eq!(handshaken, Some(false), "{version:?}: one full handshake");
            assert!(mqtt.is_empty());

            // Two records, fed one byte at a time: a record's start waits
            // for its end.
            client.writer().write_all(b"\x10\x02ab").unwrap();
            let mut wire = client_out(&mut client);
            client.writer().write_all(b"cd").unwrap();
            wire.extend(client_out(&mut client));
            for b in &wire {
                layer
                    .input(std::slice::from_ref(b), &mut mqtt, &WsRules::default())
                    .unwrap();
            }
            assert_eq!(&mqtt[..], b"\x10\x02abcd", "{version:?}");

            // Between records nothing of ours stays allocated.
            let tls = layer.tls.as_ref().unwrap();
            assert_eq!(tls.partial.capacity(), 0, "{version:?}");
            assert_eq!(layer.out.capacity(), 0, "{version:?}");

            // The broker's bytes, encrypted, then a close_notify.
            let mut out = BytesMut::new();
            layer.wrap(&vec![7u8; 40_000], &mut out);
            layer.queue_close();
            layer.wrap(&[], &mut out);
            assert_eq!(
                client_in(&mut client, &out),
                vec![7u8; 40_000],
                "{version:?}"
            );
            assert!(client.process_new_packets().unwrap().peer_has_closed());
        }
    }

    /// Heap bytes each of `n` server layers holds after a TLS 1.3 handshake
    /// with a rustls client, on `suites`, the clients dropped.
    fn held_after_handshake(suites: Vec<rustls::SupportedCipherSuite>, n: usize) -> isize {
        use rustls::pki_types::ServerName;
        let (server, client) = crate::tls::test_configs(suites, &[&rustls::version::TLS13]);
        let before = crate::test_alloc::net_bytes();
        let mut layers = Vec::with_capacity(n);
        for _ in 0..n {
            let mut layer = Layer::new(Some(&server), false).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut mqtt = BytesMut::new();
            while layer.is_handshaking() || c.is_handshaking() || c.wants_write() {
                let wire = client_out(&mut c);
                layer.input(&wire, &mut mqtt, &WsRules::default()).unwrap();
                client_in(&mut c, &std::mem::take(&mut layer.out));
            }
            layers.push(layer);
        }
        (crate::test_alloc::net_bytes() - before) / n as isize
    }

    /// Issue 12's memory target: an idle TLS connection holds its traffic
    /// keys unexpanded (`tls::record`): two 544-byte AES key schedules less
    /// than with rustls's own record layer (3,532 against 2,556 bytes asked
    /// of the allocator, rustls 0.23.46). Heap bytes counted on this
    /// thread, the cache of expanded keys filled beforehand so that its
    /// slots are not counted.
    #[test]
    fn an_idle_tls_connection_holds_no_expanded_keys() {
        crate::tls::record::fill_cache();
        let stock = held_after_handshake(crate::tls::SUITES_IN_OUR_ORDER.to_vec(), 200);
        let lean = held_after_handshake(crate::tls::record::LEAN_SUITES.clone(), 200);
        println!("bytes held per idle TLS connection: rustls's records {stock}, ours {lean}");
        assert!(stock - lean >= 900, "stock {stock}, lean {lean}");
        assert!(lean <= 2_800, "lean {lean}");
    }

    #[test]
    fn a_client_that_does_not_speak_tls_fails_the_handshake_and_gets_an_alert() {
        let (mut layer, _client) = tls_pair(&rustls::version::TLS13);
        let mut mqtt = BytesMut::new();
        let connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        match layer.input(connect, &mut mqtt, &WsRules::default()) {
            Err(Fail::TlsHandshake(_)) => {}
            other => panic!("{other:?}"),
        }
        // A TLS alert record: content type 21.
        assert_eq!(layer.out.first(), Some(&21), "{:?}", &layer.out[..]);
        assert!(mqtt.is_empty());
    }
}

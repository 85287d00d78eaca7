//! `--ws PATH`: MQTT over WebSocket from the client's side (RFC 6455, MQTT
//! 6.0), sans-IO like the rest of the engine's byte handling: the upgrade
//! request, MQTT bytes out as masked binary frames, the broker's frames in.
//!
//! Written here rather than taken from tungstenite: a load generator needs
//! only this small subset (no extensions, no text, no fragmentation of its
//! own), and it runs per packet in the hot loop, so it frames into the
//! caller's buffer without allocating.

use bytes::BytesMut;

/// Longest upgrade answer taken before giving up on the broker.
const MAX_ANSWER: usize = 8 * 1024;

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// What one [`WsClient::input`] found besides MQTT bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WsEvent {
    /// Nothing but MQTT bytes (or nothing yet).
    Data,
    /// The broker answered the upgrade with 101: MQTT may flow.
    Upgraded,
    /// The broker sent a close frame.
    Closed,
}

/// One connection's WebSocket state.
pub(crate) struct WsClient {
    upgraded: bool,
    /// The upgrade answer while it is incomplete, then the unparsed start of
    /// a frame header or of a control frame.
    buf: Vec<u8>,
    /// Payload bytes of the current data frame still to come.
    data_left: u64,
    /// Masking keys: a per-connection xorshift (RFC 6455 §5.3 asks for
    /// unpredictable keys against proxies' caches; a load generator on
    /// loopback needs only that they vary).
    mask_state: u32,
    /// The framed CONNECT, sent once the upgrade is answered.
    connect: Vec<u8>,
}

impl WsClient {
    /// A client for connection number `n` (which seeds its masks).
    pub(crate) fn new(n: u32) -> WsClient {
        WsClient {
            upgraded: false,
            buf: Vec::new(),
            data_left: 0,
            mask_state: n.wrapping_mul(0x9E37_79B9) | 1,
            connect: Vec::new(),
        }
    }

    /// What to send first on a connection whose CONNECT is `connect`: the
    /// HTTP upgrade request. The CONNECT waits, framed, for the broker's
    /// 101 (RFC 6455 §4.1: nothing before it), and [`WsClient::input`]
    /// hands it back then.
    pub(crate) fn upgrade(&mut self, connect: &[u8], host: &str, path: &str) -> Vec<u8> {
        if self.connect.is_empty() {
            let mut framed = Vec::new();
            self.frame(connect, &mut framed);
            self.connect = framed;
        }
        self.request(host, path)
    }

    /// The HTTP upgrade request (RFC 6455 §4.1) for `path` on `host`, with
    /// subprotocol `mqtt` (MQTT-6.0.0-3).
    fn request(&mut self, host: &str, path: &str) -> Vec<u8> {
        use base64::Engine as _;
        let mut nonce = [0u8; 16];
        for chunk in nonce.chunks_mut(4) {
            chunk.copy_from_slice(&self.next_mask());
        }
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
        .into_bytes()
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_ne_bytes()
    }

    /// Appends `payload` to `out` as one final, masked binary frame.
    pub(crate) fn frame(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        self.frame_op(0x2, payload, out);
    }

    fn frame_op(&mut self, opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
        let len = payload.len();
        out.push(0x80 | opcode);
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let mask = self.next_mask();
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }

    /// Bytes from the broker: MQTT bytes go to `mqtt`; what goes back to
    /// the broker to `replies` (the CONNECT once the upgrade is answered,
    /// then a pong, a close). An error names what was wrong (a refused
    /// upgrade: "ws_http_404"; a broken frame: "ws_protocol").
    pub(crate) fn input(
        &mut self,
        wire: &[u8],
        mqtt: &mut BytesMut,
        replies: &mut Vec<u8>,
    ) -> Result<WsEvent, String> {
        let mut event = WsEvent::Data;
        if !self.upgraded {
            self.buf.extend_from_slice(wire);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.buf.len() > MAX_ANSWER {
                    return Err("ws_answer_too_long".into());
                }
                return Ok(event);
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            let status = head.split_whitespace().nth(1).unwrap_or("none").to_string();
            if status != "101" {
                return Err(format!("ws_http_{status}"));
            }
            // MQTT-6.0.0-4: the broker names the subprotocol it took.
            if !head
                .lines()
                .any(|l| l.starts_with("sec-websocket-protocol:") && l.contains("mqtt"))
            {
                return Err("ws_no_mqtt_subprotocol".into());
            }
            self.upgraded = true;
            event = WsEvent::Upgraded;
            replies.append(&mut self.connect);
            let rest = self.buf.split_off(end + 4);
            self.buf = Vec::new();
            return match self.frames(&rest, mqtt, replies)? {
                WsEvent::Closed => Ok(WsEvent::Closed),
                _ => Ok(event),
            };
        }
        if self.buf.is_empty() {
            return self.frames(wire, mqtt, replies);
        }
        // A header or control frame split by the socket: join it.
        let mut joined = std::mem::take(&mut self.buf);
        joined.extend_from_slice(wire);
        self.frames(&joined, mqtt, replies)
    }

    /// Frames from the start of a header; what does not make a whole
    /// header (or whole control frame) waits in `buf`.
    fn frames(
        &mut self,
        mut wire: &[u8],
        mqtt: &mut BytesMut,
        replies: &mut Vec<u8>,
    ) -> Result<WsEvent, String> {
        if self.data_left > 0 {
            let take = wire.len().min(self.data_left as usize);
            mqtt.extend_from_slice(&wire[..take]);
            self.data_left -= take as u64;
            wire = &wire[take..];
        }
        while !wire.is_empty() {
            let Some((opcode, len, header)) = parse_header(wire)? else {
                self.buf.extend_from_slice(wire);
                return Ok(WsEvent::Data);
            };
            match opcode {
                // Continuation or binary: MQTT bytes, however split.
                0x0 | 0x2 => {
                    let body = &wire[header..];
                    let take = body.len().min(usize::try_from(len).unwrap_or(usize::MAX));
                    mqtt.extend_from_slice(&body[..take]);
                    self.data_left = len - take as u64;
                    wire = &body[take..];
                }
                0x8..=0xA => {
                    if len > MAX_CONTROL {
                        return Err("ws_protocol".into());
                    }
                    let end = header + len as usize;
                    if wire.len() < end {
                        self.buf.extend_from_slice(wire);
                        return Ok(WsEvent::Data);
                    }
                    let payload = &wire[header..end];
                    match opcode {
                        0x8 => {
                            // Echo the close code (RFC 6455 §5.5.1).
                            let code = payload.get(..2).unwrap_or(&[0x03, 0xE8]).to_vec();
                            self.frame_op(0x8, &code, replies);
                            return Ok(WsEvent::Closed);
                        }
                        0x9 => self.frame_op(0xA, payload, replies),
                        _ => {} // a pong: nothing to do
                    }
                    wire = &wire[end..];
                }
                // Text (MQTT-6.0.0-1) or reserved opcodes.
                _ => return Err("ws_protocol".into()),
            }
        }
        Ok(WsEvent::Data)
    }
}

/// A server frame's opcode, payload length and header length; `None` when
/// the header is not all here. Server frames are not masked (RFC 6455
/// §5.1).
fn parse_header(wire: &[u8]) -> Result<Option<(u8, u64, usize)>, String> {
    if wire.len() < 2 {
        return Ok(None);
    }
    if wire[1] & 0x80 != 0 || wire[0] & 0x70 != 0 {
        return Err("ws_protocol".into());
    }
    let opcode = wire[0] & 0x0F;
    let (len, header) = match wire[1] & 0x7F {
        126 => match wire.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match wire.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    Ok(Some((opcode, len, header)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgraded() -> WsClient {
        let mut ws = WsClient::new(7);
        let mut mqtt = BytesMut::new();
        let mut replies = Vec::new();
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
        // Split anywhere: the answer waits for its blank line.
        assert_eq!(
            ws.input(&answer[..20], &mut mqtt, &mut replies),
            Ok(WsEvent::Data)
        );
        assert_eq!(
            ws.input(&answer[20..], &mut mqtt, &mut replies),
            Ok(WsEvent::Upgraded)
        );
        ws
    }

    #[test]
    fn frames_split_anywhere_carry_the_mqtt_bytes() {
        let mut ws = upgraded();
        let mut wire = vec![0x82, 3, b'a', b'b', b'c'];
        wire.extend([0x80, 2, b'd', b'e']);
        wire.extend([0x82, 126, 0, 200]);
        wire.extend(std::iter::repeat_n(b'x', 200));
        let mut mqtt = BytesMut::new();
        let mut replies = Vec::new();
        for b in &wire {
            assert_eq!(
                ws.input(std::slice::from_ref(b), &mut mqtt, &mut replies),
                Ok(WsEvent::Data)
            );
        }
        assert_eq!(&mqtt[..5], b"abcde");
        assert_eq!(mqtt.len(), 205);
        assert!(replies.is_empty());
    }

    #[test]
    fn pings_are_answered_and_a_close_is_echoed() {
        let mut ws = upgraded();
        let mut mqtt = BytesMut::new();
        let mut replies = Vec::new();
        let ping = [0x89, 2, b'h', b'i'];
        assert_eq!(ws.input(&ping, &mut mqtt, &mut replies), Ok(WsEvent::Data));
        // A masked pong with the same payload.
        assert_eq!(replies[0], 0x8A);
        assert_eq!(replies[1], 0x80 | 2);
        let mask = &replies[2..6];
        assert_eq!([replies[6] ^ mask[0], replies[7] ^ mask[1]], *b"hi");
        replies.clear();
        assert_eq!(
            ws.input(&[0x88, 2, 0x03, 0xE8], &mut mqtt, &mut replies),
            Ok(WsEvent::Closed)
        );
        assert_eq!(replies[0], 0x88);
    }

    #[test]
    fn a_refused_upgrade_and_a_masked_server_frame_are_errors() {
        let mut ws = WsClient::new(1);
        let mut mqtt = BytesMut::new();
        let mut replies = Vec::new();
        assert_eq!(
            ws.input(b"HTTP/1.1 404 Not Found\r\n\r\n", &mut mqtt, &mut replies),
            Err("ws_http_404".into())
        );
        let mut ws = upgraded();
        assert_eq!(
            ws.input(&[0x82, 0x81, 1, 2, 3, 4, 5], &mut mqtt, &mut replies),
            Err("ws_protocol".into())
        );
    }

    #[test]
    fn frames_out_are_masked_binary_frames() {
        let mut ws = WsClient::new(3);
        let mut out = Vec::new();
        let payload = vec![0x30u8; 300];
        ws.frame(&payload, &mut out);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 300);
        let mask = [out[4], out[5], out[6], out[7]];
        let unmasked: Vec<u8> = out[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, payload);
    }
}

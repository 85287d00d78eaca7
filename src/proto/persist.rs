//! What a shard keeps on disk with `--data-dir`, as records: how they are
//! framed and encoded, how a log is scanned (stopping at a torn or corrupt
//! tail), and how a scan is replayed into the state a shard starts from.
//! No files here (the shell's `shard::store` reads and writes them) and no
//! clock reads: times are stored as wall-clock milliseconds, which the
//! broker converts from its own clock with the epoch the shell gives it.
//!
//! A log is a sequence of commits, each a run of frames
//! `[len: u32 LE][crc32: u32 LE][body]` padded with zeros to the next
//! [`BLOCK`] (at least a header's worth of zeros, see [`padded_len`]): the
//! writer never rewrites a block it has synced, so a torn write can only
//! hurt the commit it was part of. A zero header skips to the next block; a frame whose CRC is wrong, or that runs past the end,
//! is a torn write, and it and everything after it are dropped.
//!
//! The records are state changes keyed by clientId (or topic), so that a
//! replay can hand each session to whichever shard owns it now: a log
//! written with 4 shards loads into 2.
//!
//! | record      | written when                                          |
//! |-------------|-------------------------------------------------------|
//! | `Session`   | a persistent session connects, changes subscriptions, goes offline, or its will is published |
//! | `SessionGone` | it ends (expiry, clean start, expiry set to 0)      |
//! | `Message`   | a QoS 1/2 message is owed to it                        |
//! | `Sent`      | that message goes in flight with a packet id           |
//! | `Released`  | its QoS 2 PUBREC came (PUBREL sent)                    |
//! | `Done`      | its flow ended (PUBACK, PUBCOMP, expired, dropped)     |
//! | `AwaitRel` / `RelDone` | a QoS 2 PUBLISH of its client awaits PUBREL (with the id it is routed under) / got it |
//! | `Retain` / `Unretain` | a retained message is set / cleared on its owner |
//! | `MaxId`     | first in a snapshot: the ids given so far (ids are never reused) |
//! | `Applied` / `Forget` | a shard stored copies of an inbound QoS 2 message (so a resend after a crash is not stored twice) / its flow ended |
//!
//! A snapshot is the same records describing the whole state, written to a
//! fresh file that then replaces the log (compaction).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::HashMap;

use super::codec::properties::{self, Allowed};
use super::codec::wire::{self, Reader};
use super::codec::{LastWill, Properties, QoS};
use super::handshake::owner_of;
use super::retained::retained_owner;
use super::session::SubOpts;
use super::topic::{TopicFilter, TopicName};

/// The on-disk format this build writes and reads. A data dir written by a
/// later format is refused, never guessed at.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before each record body: length and CRC-32.
pub const FRAME_HEADER: usize = 8;

/// Every commit starts on a multiple of this (O_DIRECT's alignment on any
/// device), and is padded with zeros up to the next one.
pub const BLOCK: usize = 4096;

/// The length a commit of `len` bytes of records is padded to with zeros
/// (and so where the next commit starts, after a log whose records end at
/// `len`): the next [`BLOCK`] boundary, or one block further when fewer
/// bytes than a [`FRAME_HEADER`] would be left, so that the padding always
/// reads as a zero header and never as the start of a frame that runs
/// into the next commit.
pub fn padded_len(len: usize) -> usize {
    let short = len.next_multiple_of(BLOCK) - len;
    if short == 0 || short >= FRAME_HEADER {
        len + short
    } else {
        len + short + BLOCK
    }
}

/// The largest record body a scan believes; a longer length is corruption.
const MAX_RECORD: usize = 256 << 20;

const SESSION: u8 = 1;
const SESSION_GONE: u8 = 2;
const MESSAGE: u8 = 3;
const SENT: u8 = 4;
const RELEASED: u8 = 5;
const DONE: u8 = 6;
const AWAIT_REL: u8 = 7;
const REL_DONE: u8 = 8;
const RETAIN: u8 = 9;
const UNRETAIN: u8 = 10;
const APPLIED: u8 = 11;
const FORGET: u8 = 12;
const MAX_ID: u8 = 13;

/// The low bits of a message id or an inbound QoS 2 id that count; the
/// bits above hold the shard that gave an inbound id.
pub const ID_COUNTER: u64 = (1 << 48) - 1;

/// "No time": a session that never expires, or one that is connected.
pub const NO_TIME: u64 = u64::MAX;

/// A will kept with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// The will.
    pub will: LastWill,
    /// When it is due (wall ms), for a will already waiting for its delay;
    /// `NO_TIME` for the will of a connected client.
    pub due: u64,
}

/// A persistent session as a `Session` record describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// Its clientId.
    pub client_id: ByteString,
    /// Session Expiry Interval, seconds (`NEVER_EXPIRES` for 3.x).
    pub expiry_secs: u32,
    /// True while a client is connected.
    pub connected: bool,
    /// When it ends (wall ms) while offline; `NO_TIME` otherwise.
    pub expires_at: u64,
    /// The username its client connected with (kept for the ACL).
    pub username: Option<Box<str>>,
    /// Subscriptions with their options.
    pub subscriptions: Vec<(TopicFilter, SubOpts)>,
    /// The will of its connection, or one waiting for its delay.
    pub will: Option<StoredWill>,
}

/// A message owed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Topic.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// Delivery QoS (1 or 2).
    pub qos: QoS,
    /// RETAIN as it will be sent.
    pub retain: bool,
    /// Forwarded 5.0 properties.
    pub props: Option<Arc<Properties>>,
    /// Expiry, wall ms.
    pub expires_at: Option<u64>,
    /// Subscription Identifiers.
    pub sub_ids: Vec<u32>,
}

/// Where a stored message's flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Waiting in the session's queue.
    Queued,
    /// Sent with this packet id; awaiting PUBACK / PUBREC.
    Sent(u16),
    /// QoS 2, PUBREC received and PUBREL sent with this id; awaiting PUBCOMP.
    Released(u16),
}

/// A retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRetained {
    /// Topic.
    pub topic: TopicName,
    /// Payload (never empty).
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// 5.0 properties.
    pub props: Option<Arc<Properties>>,
    /// Expiry, wall ms.
    pub expires_at: Option<u64>,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A session's settings, subscriptions and will (replaces the last).
    Session(SessionState),
    /// The session ended.
    SessionGone(ByteString),
    /// A message owed to a session, under a shard-unique id.
    Message(ByteString, u64, StoredMessage),
    /// The message went in flight with this packet id.
    Sent(ByteString, u64, u16),
    /// Its PUBREC came.
    Released(ByteString, u64),
    /// Its flow ended.
    Done(ByteString, u64),
    /// The client's QoS 2 PUBLISH with this packet id awaits PUBREL; it is
    /// routed under this inbound id (0: none).
    AwaitRel(ByteString, u16, u64),
    /// ... and got it.
    RelDone(ByteString, u16),
    /// A retained message set.
    Retain(StoredRetained),
    /// A retained topic cleared.
    Unretain(ByteString),
    /// This shard stored copies of the inbound QoS 2 message with this id.
    Applied(u64),
    /// The flow of that message ended: its id will not come again.
    Forget(u64),
    /// Message and inbound ids up to this one were given out.
    MaxId(u64),
}

// ---------------------------------------------------------------- encoding

/// Starts a frame in `out`; [`end_frame`] fills in its header.
fn begin_frame(out: &mut BytesMut, kind: u8) -> usize {
    let start = out.len();
    out.put_bytes(0, FRAME_HEADER);
    out.put_u8(kind);
    start
}

fn end_frame(out: &mut BytesMut, start: usize) {
    let body = &out[start + FRAME_HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_blob(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn put_props(out: &mut BytesMut, p: Option<&Properties>) {
    match p {
        None => out.put_u8(0),
        Some(p) => properties::encode(&Some(Box::new(p.clone())), out),
    }
}

fn put_time(out: &mut BytesMut, t: Option<u64>) {
    out.put_u64(t.unwrap_or(NO_TIME));
}

/// Appends a `Session` record.
pub fn put_session(out: &mut BytesMut, s: &SessionState) {
    let at = begin_frame(out, SESSION);
    put_str(out, &s.client_id);
    out.put_u32(s.expiry_secs);
    out.put_u8(u8::from(s.connected));
    out.put_u64(s.expires_at);
    match &s.username {
        Some(u) => {
            out.put_u8(1);
            put_str(out, u);
        }
        None => out.put_u8(0),
    }
    out.put_u32(s.subscriptions.len() as u32);
    for (filter, o) in &s.subscriptions {
        put_str(out, filter.as_str());
        out.put_u8(o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3);
        out.put_u32(o.id);
    }
    match &s.will {
        None => out.put_u8(0),
        Some(w) => {
            out.put_u8(1);
            put_str(out, w.will.topic.as_str());
            put_blob(out, &w.will.payload);
            out.put_u8(w.will.qos as u8 | u8::from(w.will.retain) << 2);
            put_props(out, w.will.properties.as_deref());
            out.put_u64(w.due);
        }
    }
    end_frame(out, at);
}

/// Appends a `SessionGone` record.
pub fn put_session_gone(out: &mut BytesMut, client_id: &str) {
    let at = begin_frame(out, SESSION_GONE);
    put_str(out, client_id);
    end_frame(out, at);
}

/// Appends a `Message` record.
pub fn put_message(out: &mut BytesMut, client_id: &str, id: u64, m: &StoredMessageRef<'_>) {
    let at = begin_frame(out, MESSAGE);
    put_str(out, client_id);
    out.put_u64(id);
    put_str(out, m.topic);
    put_blob(out, m.payload);
    out.put_u8(m.qos as u8 | u8::from(m.retain) << 2);
    put_props(out, m.props);
    put_time(out, m.expires_at);
    out.put_u16(m.sub_ids.len() as u16);
    for &i in m.sub_ids {
        out.put_u32(i);
    }
    end_frame(out, at);
}

/// A message to encode, borrowed from wherever it lives.
#[derive(Debug, Clone, Copy)]
pub struct StoredMessageRef<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN as sent.
    pub retain: bool,
    /// Properties.
    pub props: Option<&'a Properties>,
    /// Expiry, wall ms.
    pub expires_at: Option<u64>,
    /// Subscription Identifiers.
    pub sub_ids: &'a [u32],
}

impl StoredMessage {
    /// A borrowed view for [`put_message`].
    pub fn as_ref(&self) -> StoredMessageRef<'_> {
        StoredMessageRef {
            topic: self.topic.as_str(),
            payload: &self.payload,
            qos: self.qos,
            retain: self.retain,
            props: self.props.as_deref(),
            expires_at: self.expires_at,
            sub_ids: &self.sub_ids,
        }
    }
}

fn put_id_record(out: &mut BytesMut, kind: u8, client_id: &str, id: u64, extra: Option<u16>) {
    let at = begin_frame(out, kind);
    put_str(out, client_id);
    out.put_u64(id);
    if let Some(x) = extra {
        out.put_u16(x);
    }
    end_frame(out, at);
}

/// Appends a `Sent` record.
pub fn put_sent(out: &mut BytesMut, client_id: &str, id: u64, packet_id: u16) {
    put_id_record(out, SENT, client_id, id, Some(packet_id));
}

/// Appends a `Released` record.
pub fn put_released(out: &mut BytesMut, client_id: &str, id: u64) {
    put_id_record(out, RELEASED, client_id, id, None);
}

/// Appends a `Done` record.
pub fn put_done(out: &mut BytesMut, client_id: &str, id: u64) {
    put_id_record(out, DONE, client_id, id, None);
}

/// Appends an `AwaitRel` record: `packet_id` routed under inbound id `uid`.
pub fn put_await_rel(out: &mut BytesMut, client_id: &str, packet_id: u16, uid: u64) {
    let at = begin_frame(out, AWAIT_REL);
    put_str(out, client_id);
    out.put_u16(packet_id);
    out.put_u64(uid);
    end_frame(out, at);
}

/// Appends a `RelDone` record.
pub fn put_rel_done(out: &mut BytesMut, client_id: &str, packet_id: u16) {
    let at = begin_frame(out, REL_DONE);
    put_str(out, client_id);
    out.put_u16(packet_id);
    end_frame(out, at);
}

/// Appends a `MaxId` record.
pub fn put_max_id(out: &mut BytesMut, max_id: u64) {
    let at = begin_frame(out, MAX_ID);
    out.put_u64(max_id);
    end_frame(out, at);
}

/// Appends an `Applied` (`applied`) or `Forget` record for inbound id `uid`.
pub fn put_applied(out: &mut BytesMut, uid: u64, applied: bool) {
    let at = begin_frame(out, if applied { APPLIED } else { FORGET });
    out.put_u64(uid);
    end_frame(out, at);
}

/// Appends a `Retain` record.
pub fn put_retain(out: &mut BytesMut, r: &StoredRetainedRef<'_>) {
    let at = begin_frame(out, RETAIN);
    put_str(out, r.topic);
    put_blob(out, r.payload);
    out.put_u8(r.qos as u8);
    put_props(out, r.props);
    put_time(out, r.expires_at);
    end_frame(out, at);
}

/// A retained message to encode, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct StoredRetainedRef<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS.
    pub qos: QoS,
    /// Properties.
    pub props: Option<&'a Properties>,
    /// Expiry, wall ms.
    pub expires_at: Option<u64>,
}

/// Appends an `Unretain` record.
pub fn put_unretain(out: &mut BytesMut, topic: &str) {
    let at = begin_frame(out, UNRETAIN);
    put_str(out, topic);
    end_frame(out, at);
}

// ---------------------------------------------------------------- decoding

/// Why a scan stopped before the end of the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailError {
    /// A frame runs past the end of the data (a write cut short).
    Short,
    /// A frame's CRC does not match its body.
    BadCrc,
    /// A frame whose body does not decode (or an implausible length).
    Malformed(&'static str),
}

impl std::fmt::Display for TailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TailError::Short => f.write_str("a record cut short"),
            TailError::BadCrc => f.write_str("a record whose CRC does not match"),
            TailError::Malformed(what) => write!(f, "a record that does not decode ({what})"),
        }
    }
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Records, in order.
    pub records: Vec<Record>,
    /// How many good records were read.
    pub kept: usize,
    /// Where the last good frame ends (the next commit goes at the next
    /// [`BLOCK`] from here).
    pub good_len: usize,
    /// Why it stopped early, if it did; the bytes from `good_len` on that
    /// are not zero padding are dropped.
    pub tail: Option<TailError>,
    /// Bytes dropped after `good_len` (up to the last non-zero byte).
    pub dropped_bytes: usize,
}

/// Reads frames from `data` until the end marker, the end of the data, or a
/// bad frame.
pub fn scan(data: &[u8]) -> Scan {
    let mut records = Vec::new();
    let mut out = scan_each(data, |r| records.push(r));
    out.records = records;
    out
}

/// [`scan`] handing each record to `f` as it is read (a start-up replay
/// keeps no list of a million records); `records` stays empty, `kept`
/// counts them.
pub fn scan_each(data: &[u8], mut f: impl FnMut(Record)) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0;
    // The end of the last good frame.
    let mut end = 0;
    while data.len() - pos >= FRAME_HEADER {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            // The padding after a commit: zeros to the block's end.
            let next = (pos / BLOCK + 1) * BLOCK;
            if data[pos..next.min(data.len())].iter().any(|&b| b != 0) {
                out.tail = Some(TailError::Malformed("bytes in a commit's padding"));
                break;
            }
            pos = next;
            continue;
        }
        let framed = if len == 0 || len > MAX_RECORD {
            Err(TailError::Malformed("impossible length"))
        } else {
            match data.get(pos + FRAME_HEADER..pos + FRAME_HEADER + len) {
                None => Err(TailError::Short),
                Some(body) if crc32fast::hash(body) != crc => Err(TailError::BadCrc),
                Some(body) => Ok(body),
            }
        };
        let body = match framed {
            Ok(body) => body,
            Err(why) => {
                // Fewer zeros than a header before the block's end: the
                // padding of a commit from a build before `padded_len`
                // (a record starting there would have framed).
                let block_end = (pos / BLOCK + 1) * BLOCK;
                if block_end - pos < FRAME_HEADER
                    && block_end <= data.len()
                    && data[pos..block_end].iter().all(|&b| b == 0)
                {
                    pos = block_end;
                    continue;
                }
                out.tail = Some(why);
                break;
            }
        };
        match decode(body) {
            Ok(r) => {
                out.kept += 1;
                f(r);
            }
            Err(what) => {
                out.tail = Some(TailError::Malformed(what));
                break;
            }
        }
        pos += FRAME_HEADER + len;
        end = pos;
    }
    if pos < data.len() && data.len() - pos < FRAME_HEADER && out.tail.is_none() {
        // A header cut short, unless it is padding.
        if data[pos..].iter().any(|&b| b != 0) {
            out.tail = Some(TailError::Short);
        }
    }
    out.good_len = end;
    if out.tail.is_some() {
        let last = data.iter().rposition(|&b| b != 0).map_or(end, |i| i + 1);
        out.dropped_bytes = last.saturating_sub(end);
    }
    out
}

type Decoded<T> = Result<T, &'static str>;

/// One record body. The body is copied once, so everything decoded out of
/// it (payloads, topics) shares that copy and nothing pins the file buffer.
fn decode(body: &[u8]) -> Decoded<Record> {
    let buf = Bytes::copy_from_slice(body);
    let mut r = Reader::new(&buf, 0);
    let e = |_| "truncated field";
    let kind = r.u8().map_err(e)?;
    let rec = match kind {
        SESSION => {
            let client_id = r.string().map_err(e)?;
            let expiry_secs = r.u32().map_err(e)?;
            let connected = r.u8().map_err(e)? != 0;
            let expires_at = get_u64(&mut r)?;
            let username = match r.u8().map_err(e)? {
                0 => None,
                _ => Some(Box::from(&*r.string().map_err(e)?)),
            };
            let n = r.u32().map_err(e)? as usize;
            let mut subscriptions = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let filter = r.topic_filter().map_err(|_| "bad topic filter")?;
                let flags = r.u8().map_err(e)?;
                let id = r.u32().map_err(e)?;
                subscriptions.push((
                    filter,
                    SubOpts {
                        qos: qos(flags & 3)?,
                        no_local: flags & 4 != 0,
                        retain_as_published: flags & 8 != 0,
                        id,
                    },
                ));
            }
            let will = match r.u8().map_err(e)? {
                0 => None,
                _ => {
                    let topic = topic(&mut r)?;
                    let payload = blob(&mut r)?;
                    let flags = r.u8().map_err(e)?;
                    let props = properties::decode(&mut r, properties::WILL, false)
                        .map_err(|_| "bad will properties")?;
                    let due = get_u64(&mut r)?;
                    Some(StoredWill {
                        will: LastWill {
                            topic,
                            payload,
                            qos: qos(flags & 3)?,
                            retain: flags & 4 != 0,
                            properties: props,
                        },
                        due,
                    })
                }
            };
            Record::Session(SessionState {
                client_id,
                expiry_secs,
                connected,
                expires_at,
                username,
                subscriptions,
                will,
            })
        }
        SESSION_GONE => Record::SessionGone(r.string().map_err(e)?),
        MESSAGE => {
            let client_id = r.string().map_err(e)?;
            let id = get_u64(&mut r)?;
            let topic = topic(&mut r)?;
            let payload = blob(&mut r)?;
            let flags = r.u8().map_err(e)?;
            let props = msg_props(&mut r, properties::PUBLISH)?;
            let expires_at = time(get_u64(&mut r)?);
            let n = r.u16().map_err(e)?;
            let sub_ids = (0..n)
                .map(|_| r.u32().map_err(e))
                .collect::<Decoded<Vec<u32>>>()?;
            Record::Message(
                client_id,
                id,
                StoredMessage {
                    topic,
                    payload,
                    qos: qos(flags & 3)?,
                    retain: flags & 4 != 0,
                    props,
                    expires_at,
                    sub_ids,
                },
            )
        }
        SENT => {
            let client_id = r.string().map_err(e)?;
            let id = get_u64(&mut r)?;
            Record::Sent(client_id, id, r.u16().map_err(e)?)
        }
        RELEASED | DONE => {
            let client_id = r.string().map_err(e)?;
            let id = get_u64(&mut r)?;
            if kind == RELEASED {
                Record::Released(client_id, id)
            } else {
                Record::Done(client_id, id)
            }
        }
        AWAIT_REL => {
            let client_id = r.string().map_err(e)?;
            let pid = r.u16().map_err(e)?;
            Record::AwaitRel(client_id, pid, get_u64(&mut r)?)
        }
        REL_DONE => {
            let client_id = r.string().map_err(e)?;
            Record::RelDone(client_id, r.u16().map_err(e)?)
        }
        APPLIED => Record::Applied(get_u64(&mut r)?),
        FORGET => Record::Forget(get_u64(&mut r)?),
        MAX_ID => Record::MaxId(get_u64(&mut r)?),
        RETAIN => {
            let topic = topic(&mut r)?;
            let payload = blob(&mut r)?;
            let q = qos(r.u8().map_err(e)? & 3)?;
            let props = msg_props(&mut r, properties::PUBLISH)?;
            let expires_at = time(get_u64(&mut r)?);
            Record::Retain(StoredRetained {
                topic,
                payload,
                qos: q,
                props,
                expires_at,
            })
        }
        UNRETAIN => Record::Unretain(r.string().map_err(e)?),
        _ => return Err("unknown record kind"),
    };
    if !r.is_empty() {
        return Err("trailing bytes");
    }
    Ok(rec)
}

fn get_u64(r: &mut Reader<'_>) -> Decoded<u64> {
    let hi = r.u32().map_err(|_| "truncated field")?;
    let lo = r.u32().map_err(|_| "truncated field")?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}

fn time(t: u64) -> Option<u64> {
    (t != NO_TIME).then_some(t)
}

fn qos(v: u8) -> Decoded<QoS> {
    QoS::from_u8(v).ok_or("bad QoS")
}

fn topic(r: &mut Reader<'_>) -> Decoded<TopicName> {
    let s = r.raw_topic().map_err(|_| "truncated field")?;
    wire::topic_name(s).map_err(|_| "bad topic name")
}

fn blob(r: &mut Reader<'_>) -> Decoded<Bytes> {
    let n = r.u32().map_err(|_| "truncated field")? as usize;
    r.bytes(n).map_err(|_| "truncated field")
}

fn msg_props(r: &mut Reader<'_>, allowed: Allowed) -> Decoded<Option<Arc<Properties>>> {
    let p = properties::decode(r, allowed, true).map_err(|_| "bad properties")?;
    Ok(p.map(|b| Arc::new(*b)))
}

// ---------------------------------------------------------------- replay

/// A session as a replay leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    /// Its settings, subscriptions and will.
    pub state: SessionState,
    /// Messages owed, by id (send order), with where each flow stands.
    pub messages: BTreeMap<u64, (StoredMessage, Flow)>,
    /// Packet ids of the client's QoS 2 PUBLISHes awaiting PUBREL, with
    /// the inbound id each was routed under.
    pub awaiting_rel: Vec<(u16, u64)>,
}

/// What a shard starts from: the replay of its files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Persistent sessions by clientId.
    pub sessions: HashMap<ByteString, RecoveredSession>,
    /// Retained messages by topic.
    pub retained: HashMap<ByteString, StoredRetained>,
    /// The largest message id seen: new ids start above it.
    pub max_id: u64,
    /// Inbound QoS 2 ids whose copies this shard stored and whose flow has
    /// not ended.
    pub applied: hashbrown::HashSet<u64>,
}

impl Recovered {
    /// Applies one record. Records about a session the replay does not
    /// know (it ended, or was never persistent) are ignored.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Session(state) => {
                let key = state.client_id.clone();
                match self.sessions.get_mut(&key) {
                    Some(s) => s.state = state,
                    None => {
                        self.sessions.insert(
                            key,
                            RecoveredSession {
                                state,
                                messages: BTreeMap::new(),
                                awaiting_rel: Vec::new(),
                            },
                        );
                    }
                }
            }
            Record::SessionGone(client_id) => {
                self.sessions.remove(&client_id);
            }
            Record::Message(client_id, id, msg) => {
                self.max_id = self.max_id.max(id);
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.messages.insert(id, (msg, Flow::Queued));
                }
            }
            Record::Sent(client_id, id, pid) => self.flow(&client_id, id, Flow::Sent(pid)),
            Record::Released(client_id, id) => {
                let pid = self
                    .sessions
                    .get(&client_id)
                    .and_then(|s| s.messages.get(&id))
                    .and_then(|(_, f)| match f {
                        Flow::Sent(p) | Flow::Released(p) => Some(*p),
                        Flow::Queued => None,
                    });
                if let Some(pid) = pid {
                    self.flow(&client_id, id, Flow::Released(pid));
                }
            }
            Record::Done(client_id, id) => {
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.messages.remove(&id);
                }
            }
            Record::AwaitRel(client_id, pid, uid) => {
                self.max_id = self.max_id.max(uid & ID_COUNTER);
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.awaiting_rel.retain(|&(p, _)| p != pid);
                    s.awaiting_rel.push((pid, uid));
                }
            }
            Record::RelDone(client_id, pid) => {
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.awaiting_rel.retain(|&(p, _)| p != pid);
                }
            }
            Record::Applied(uid) => {
                self.max_id = self.max_id.max(uid & ID_COUNTER);
                self.applied.insert(uid);
            }
            Record::Forget(uid) => {
                self.applied.remove(&uid);
            }
            Record::MaxId(id) => self.max_id = self.max_id.max(id),
            Record::Retain(r) => {
                self.retained.insert(r.topic.as_bytestring().clone(), r);
            }
            Record::Unretain(topic) => {
                self.retained.remove(&topic);
            }
        }
    }

    fn flow(&mut self, client_id: &ByteString, id: u64, flow: Flow) {
        if let Some((_, f)) = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.messages.get_mut(&id))
        {
            *f = flow;
        }
    }

    /// Adds another replay's state (a shard's files written with a
    /// different shard count); sessions and topics are disjoint between
    /// the shards of one layout.
    pub fn merge(&mut self, other: Recovered) {
        self.sessions.extend(other.sessions);
        self.retained.extend(other.retained);
        self.applied.extend(other.applied);
        self.max_id = self.max_id.max(other.max_id);
    }

    /// Splits the state by the shard that owns each session and retained
    /// topic with `shards` shards. Applied inbound ids are left behind:
    /// which old shard stored a copy no longer says which sessions of a
    /// new shard have it, so a QoS 2 resend whose fan-out a crash cut is
    /// delivered to every subscriber again — at least once, where keeping
    /// the ids could lose it for some.
    pub fn split(self, shards: u16) -> Vec<Recovered> {
        let mut out: Vec<Recovered> = (0..shards.max(1))
            .map(|_| Recovered {
                max_id: self.max_id,
                ..Recovered::default()
            })
            .collect();
        for (k, s) in self.sessions {
            out[usize::from(owner_of(&k, shards).0)]
                .sessions
                .insert(k, s);
        }
        for (k, r) in self.retained {
            out[usize::from(retained_owner(&k, shards).0)]
                .retained
                .insert(k, r);
        }
        out
    }

    /// Writes the whole state as records (a snapshot).
    pub fn encode(&self, out: &mut BytesMut) {
        put_max_id(out, self.max_id);
        for s in self.sessions.values() {
            put_session(out, &s.state);
            let cid = &s.state.client_id;
            for (&id, (m, flow)) in &s.messages {
                put_message(out, cid, id, &m.as_ref());
                match *flow {
                    Flow::Queued => {}
                    Flow::Sent(pid) => put_sent(out, cid, id, pid),
                    Flow::Released(pid) => {
                        put_sent(out, cid, id, pid);
                        put_released(out, cid, id);
                    }
                }
            }
            for &(pid, uid) in &s.awaiting_rel {
                put_await_rel(out, cid, pid, uid);
            }
        }
        for &uid in &self.applied {
            put_applied(out, uid, true);
        }
        for r in self.retained.values() {
            put_retain(
                out,
                &StoredRetainedRef {
                    topic: r.topic.as_str(),
                    payload: &r.payload,
                    qos: r.qos,
                    props: r.props.as_deref(),
                    expires_at: r.expires_at,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, subs: &[&str]) -> SessionState {
        SessionState {
            client_id: ByteString::from(id.to_string()),
            expiry_secs: 300,
            connected: true,
            expires_at: NO_TIME,
            username: Some(Box::from("alice")),
            subscriptions: subs
                .iter()
                .map(|f| {
                    (
                        TopicFilter::new(f.to_string()).unwrap(),
                        SubOpts::qos(QoS::ExactlyOnce),
                    )
                })
                .collect(),
            will: Some(StoredWill {
                will: LastWill {
                    topic: TopicName::new("status/dev").unwrap(),
                    payload: Bytes::from_static(b"offline"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Some(Box::new(Properties {
                        will_delay_interval: Some(5),
                        ..Properties::default()
                    })),
                },
                due: NO_TIME,
            }),
        }
    }

    fn message(topic: &str, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            topic: TopicName::new(topic.to_string()).unwrap(),
            payload: Bytes::from_static(payload),
            qos: QoS::ExactlyOnce,
            retain: false,
            props: Some(Arc::new(Properties {
                content_type: Some(ByteString::from_static("text/plain")),
                ..Properties::default()
            })),
            expires_at: Some(1_700_000_000_000),
            sub_ids: vec![7, 9],
        }
    }

    fn sample_log() -> BytesMut {
        let mut out = BytesMut::new();
        put_session(&mut out, &session("dev-1", &["cmd/dev-1/#", "all"]));
        put_message(
            &mut out,
            "dev-1",
            1,
            &message("cmd/dev-1/a", b"one").as_ref(),
        );
        put_message(
            &mut out,
            "dev-1",
            2,
            &message("cmd/dev-1/b", b"two").as_ref(),
        );
        put_message(
            &mut out,
            "dev-1",
            3,
            &message("cmd/dev-1/c", b"three").as_ref(),
        );
        put_sent(&mut out, "dev-1", 1, 10);
        put_sent(&mut out, "dev-1", 2, 11);
        put_released(&mut out, "dev-1", 2);
        put_done(&mut out, "dev-1", 1);
        put_await_rel(&mut out, "dev-1", 40, 0);
        put_await_rel(&mut out, "dev-1", 41, (1 << 48) | 5);
        put_rel_done(&mut out, "dev-1", 40);
        put_applied(&mut out, (1 << 48) | 5, true);
        put_applied(&mut out, 6, true);
        put_applied(&mut out, 6, false);
        put_session(&mut out, &session("gone", &["x"]));
        put_session_gone(&mut out, "gone");
        put_retain(
            &mut out,
            &StoredRetainedRef {
                topic: "status/a",
                payload: b"online",
                qos: QoS::AtLeastOnce,
                props: None,
                expires_at: None,
            },
        );
        put_retain(
            &mut out,
            &StoredRetainedRef {
                topic: "status/b",
                payload: b"online",
                qos: QoS::AtMostOnce,
                props: None,
                expires_at: Some(5),
            },
        );
        put_unretain(&mut out, "status/b");
        out
    }

    fn replay(data: &[u8]) -> (Recovered, Scan) {
        let mut scan = scan(data);
        let mut r = Recovered::default();
        for rec in std::mem::take(&mut scan.records) {
            r.apply(rec);
        }
        (r, scan)
    }

    #[test]
    fn records_round_trip_and_replay_to_the_live_state() {
        let log = sample_log();
        let (r, scan) = replay(&log);
        assert_eq!(scan.tail, None);
        assert_eq!(scan.good_len, log.len());
        assert_eq!(r.max_id, 6, "inbound ids count, without their shard bits");
        assert_eq!(r.sessions.len(), 1);
        let s = &r.sessions["dev-1"];
        assert_eq!(s.state, session("dev-1", &["cmd/dev-1/#", "all"]));
        let flows: Vec<(u64, Flow)> = s.messages.iter().map(|(&i, (_, f))| (i, *f)).collect();
        assert_eq!(flows, vec![(2, Flow::Released(11)), (3, Flow::Queued)]);
        assert_eq!(s.messages[&3].0, message("cmd/dev-1/c", b"three"));
        assert_eq!(s.awaiting_rel, vec![(41, (1 << 48) | 5)]);
        assert_eq!(
            r.applied.iter().copied().collect::<Vec<_>>(),
            [(1 << 48) | 5]
        );
        assert_eq!(r.retained.len(), 1);
        assert_eq!(&r.retained["status/a"].payload[..], b"online");
    }

    #[test]
    fn a_snapshot_replays_to_the_same_state() {
        let (r, _) = replay(&sample_log());
        let mut snap = BytesMut::new();
        r.encode(&mut snap);
        let (again, scan) = replay(&snap);
        assert_eq!(scan.tail, None);
        assert_eq!(again, r);
    }

    #[test]
    fn zero_padding_ends_the_log_quietly() {
        let mut log = sample_log();
        let good = log.len();
        log.put_bytes(0, 4096 - good % 4096);
        let (_, scan) = replay(&log);
        assert_eq!(
            (scan.tail, scan.good_len, scan.dropped_bytes),
            (None, good, 0)
        );
    }

    #[test]
    fn commits_padded_to_blocks_read_as_one_log() {
        let one = sample_log();
        let mut log = BytesMut::new();
        for _ in 0..3 {
            log.extend_from_slice(&one);
            log.put_bytes(0, BLOCK - log.len() % BLOCK);
        }
        let s = scan(&log);
        assert_eq!(s.tail, None);
        assert_eq!(s.records.len(), 3 * scan(&one).records.len());
        assert_eq!(s.good_len, 2 * BLOCK + one.len());
        // Garbage in a commit's padding is corruption, not more padding.
        let mut bad = log.to_vec();
        bad[one.len() + 100] = 1;
        let s = scan(&bad);
        assert_eq!(
            s.tail,
            Some(TailError::Malformed("bytes in a commit's padding"))
        );
        assert_eq!(s.good_len, one.len());
    }

    #[test]
    fn padding_always_holds_a_zero_header() {
        for len in 0..3 * BLOCK {
            let padded = padded_len(len);
            let pad = padded - len;
            assert_eq!(padded % BLOCK, 0, "{len}");
            assert!(pad == 0 || pad >= FRAME_HEADER, "{len}: {pad} bytes");
            assert!(pad < BLOCK + FRAME_HEADER, "{len}: {pad} bytes");
        }
    }

    /// A commit of one message whose payload makes it `len` bytes.
    fn commit_of_len(len: usize) -> BytesMut {
        let base = {
            let mut b = BytesMut::new();
            put_message(&mut b, "dev-1", 7, &message("t", b"").as_ref());
            b.len()
        };
        let mut out = BytesMut::new();
        let m = StoredMessage {
            payload: Bytes::from(vec![b'x'; len - base]),
            ..message("t", b"")
        };
        put_message(&mut out, "dev-1", 7, &m.as_ref());
        assert_eq!(out.len(), len);
        out
    }

    /// A commit ending 1 to 7 bytes before a block's end left too few
    /// zeros for a header; the scan read a "header" running into the next
    /// commit and dropped everything after it (a kill -9 test lost a
    /// megabyte of acknowledged state that way). Both the padding written
    /// now and the short padding of logs written before read whole.
    #[test]
    fn a_commit_ending_just_before_a_block_end_is_followed_by_the_next() {
        let next = sample_log();
        let per_commit = scan(&next).records.len();
        for short in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100] {
            for old_writer in [false, true] {
                let first = commit_of_len(2 * BLOCK - short);
                let mut log = BytesMut::new();
                log.extend_from_slice(&first);
                let to = if old_writer {
                    first.len().next_multiple_of(BLOCK)
                } else {
                    padded_len(first.len())
                };
                log.put_bytes(0, to - log.len());
                log.extend_from_slice(&next);
                log.put_bytes(0, padded_len(log.len()) - log.len());
                let s = scan(&log);
                let what = format!("{short} bytes short, old writer {old_writer}");
                assert_eq!(s.tail, None, "{what}");
                assert_eq!(s.records.len(), 1 + per_commit, "{what}");
                assert_eq!(s.good_len, to + next.len(), "{what}");
            }
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_good_record() {
        let log = sample_log();
        let full = scan(&log);
        let n = full.records.len();
        // Every cut inside the last record loses that record only.
        let last_start = {
            let mut pos = 0;
            let mut starts = Vec::new();
            while pos < log.len() {
                starts.push(pos);
                let len = u32::from_le_bytes(log[pos..pos + 4].try_into().unwrap()) as usize;
                pos += FRAME_HEADER + len;
            }
            *starts.last().unwrap()
        };
        for cut in last_start + 1..log.len() {
            let s = scan(&log[..cut]);
            assert_eq!(s.records.len(), n - 1, "cut at {cut}");
            assert_eq!(s.good_len, last_start);
            assert_eq!(s.tail, Some(TailError::Short));
            // Counted up to the last non-zero byte (zeros may be padding).
            assert!(s.dropped_bytes > 0 && s.dropped_bytes <= cut - last_start);
        }
    }

    #[test]
    fn a_flipped_byte_stops_the_scan_there() {
        let log = sample_log();
        let full = scan(&log).records;
        for at in (0..log.len()).step_by(7) {
            let mut bad = log.to_vec();
            bad[at] ^= 0x40;
            let s = scan(&bad);
            // Whatever was kept is a prefix of the true records.
            assert!(s.records.len() < full.len(), "flip at {at} went unnoticed");
            assert_eq!(s.records[..], full[..s.records.len()]);
            assert!(s.tail.is_some());
        }
    }

    proptest::proptest! {
        /// Whatever a damaged file holds, a scan never panics, and what it
        /// keeps of a real log is a prefix of that log's records.
        #[test]
        fn any_damage_keeps_a_prefix_and_never_panics(
            cuts in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..8),
            garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let log = sample_log();
            let full = scan(&log).records;
            let mut bad = log.to_vec();
            for (at, byte) in cuts {
                if let Some(b) = bad.get_mut(at) {
                    *b = byte;
                }
            }
            bad.extend_from_slice(&garbage);
            let s = scan(&bad);
            proptest::prop_assert!(s.good_len <= bad.len());
            let n = s.records.len().min(full.len());
            proptest::prop_assert_eq!(&s.records[..n], &full[..n]);
            let _ = scan(&garbage);
        }
    }

    #[test]
    fn split_sends_each_session_and_topic_to_its_owner() {
        let mut r = Recovered::default();
        for i in 0..50 {
            let id = format!("c{i}");
            r.apply(Record::Session(session(&id, &["a/b"])));
            r.apply(Record::Retain(StoredRetained {
                topic: TopicName::new(format!("t/{i}")).unwrap(),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtMostOnce,
                props: None,
                expires_at: None,
            }));
        }
        r.max_id = 77;
        let parts = r.clone().split(3);
        assert_eq!(parts.len(), 3);
        let mut merged = Recovered::default();
        for (i, p) in parts.into_iter().enumerate() {
            assert_eq!(p.max_id, 77);
            assert!(p.sessions.keys().all(|k| owner_of(k, 3).0 as usize == i));
            assert!(p
                .retained
                .keys()
                .all(|k| retained_owner(k, 3).0 as usize == i));
            merged.merge(p);
        }
        assert_eq!(merged, r);
    }
}

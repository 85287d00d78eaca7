//! Accounting of what the subscribers received: each arriving PUBLISH is
//! acknowledged as its QoS asks, checked (payload header, topic, routing)
//! and counted as new, duplicate, late (out of order) or untracked, per
//! (publisher, subscriber) [`Stream`]; with `--share-group --fan-out` a
//! message is owed once to the group, so [`GroupSeen`] tells new from
//! duplicate per publisher and [`MemberOrder`] checks order per member.
//! Also the per-second delivery series and the per-member delivery counts
//! the shared-group report reads. Lost = expected − unique, tallied in
//! `report`.

use coremq::proto::codec::{Packet, Publish, QoS};

use super::run::{resp, Phase, Run};
use super::{Shape, HEADER, STREAM_TRACK};

/// What a stream made of an arrival.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// First time; `late` when a higher sequence number came first.
    New {
        late: bool,
    },
    Dup,
    /// Below a gap the stream gave up on: a duplicate or a very late one.
    Untracked,
}

/// One (publisher, subscriber) stream.
#[derive(Default)]
pub(super) struct Stream {
    /// Lowest sequence number not seen yet.
    pub(super) next: u32,
    /// Highest seen + 1.
    pub(super) hi: u32,
    /// Seen, above `next`, ascending.
    pub(super) above: Vec<u32>,
    /// A gap below `next` was given up (more than STREAM_TRACK seen above it).
    pub(super) forced: bool,
    /// Any arrival out of order.
    pub(super) any_late: bool,
}

impl Stream {
    pub(super) fn see(&mut self, seq: u32) -> Seen {
        if seq < self.next {
            return if self.forced {
                Seen::Untracked
            } else {
                Seen::Dup
            };
        }
        let late = u64::from(seq) + 1 < u64::from(self.hi);
        if seq == self.next {
            self.next += 1;
            self.settle();
        } else {
            match self.above.binary_search(&seq) {
                Ok(_) => return Seen::Dup,
                Err(pos) => self.above.insert(pos, seq),
            }
            if self.above.len() > STREAM_TRACK {
                self.forced = true;
                self.next = self.above[0];
                self.settle();
            }
        }
        self.hi = self.hi.max(seq + 1);
        self.any_late |= late;
        Seen::New { late }
    }

    fn settle(&mut self) {
        let mut k = 0;
        while k < self.above.len() && self.above[k] == self.next {
            self.next += 1;
            k += 1;
        }
        self.above.drain(..k);
        if self.above.is_empty() && self.above.capacity() > 32 {
            self.above = Vec::new();
        }
    }
}

/// One publisher's messages as a shared group saw them: a bit per sequence
/// number, so a duplicate is told from a new message however far apart the
/// members run (one member's queue may lag the others' by thousands of
/// messages, more than a [`Stream`] keeps above a gap). 1 bit per message.
#[derive(Default)]
pub(super) struct GroupSeen {
    pub(super) bits: Vec<u64>,
}

impl GroupSeen {
    /// Whether `seq` is new to the group (and now seen).
    pub(super) fn see(&mut self, seq: u32) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize((w + 1).next_power_of_two(), 0);
        }
        let new = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        new
    }
}

/// One (publisher, member) stream of a shared group: [`GroupSeen`] says new
/// or duplicate; this one only whether a member got a publisher's messages
/// in the order they were sent (MQTT-4.6.0-6 holds per receiving client;
/// across members no order is owed).
#[derive(Default, Clone, Copy)]
pub(super) struct MemberOrder {
    /// Highest sequence number this member got + 1.
    pub(super) hi: u32,
    pub(super) any_late: bool,
}

impl MemberOrder {
    /// A message new to the group arrived at this member: whether it came
    /// after a higher sequence number from the same publisher.
    pub(super) fn see(&mut self, seq: u32) -> bool {
        let late = seq < self.hi;
        self.hi = self.hi.max(seq + 1);
        self.any_late |= late;
        late
    }
}

impl Run {
    pub(super) fn on_delivery(&mut self, sub: u32, p: Publish, now: u64) {
        self.delivered += 1;
        if let Some(n) = self.member_deliveries.get_mut(sub as usize) {
            *n += 1;
        }
        self.last_delivery = now;
        if now <= self.pub_end {
            self.in_window += 1;
        }
        if self.phase >= Phase::Publish {
            let sec = (now.saturating_sub(self.pub_start) / 1_000_000) as usize;
            if self.series.len() <= sec {
                self.series.resize(sec + 1, 0);
            }
            self.series[sec] += 1;
        }
        if p.qos != self.cfg.qos {
            self.fail("wrong_qos");
        }
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.sub_ack(sub, Packet::PubAck(resp(id.get())), now),
            (QoS::ExactlyOnce, Some(id)) => {
                let id = id.get();
                let q = &mut self.subs[sub as usize].qos2;
                if q.contains(&id) {
                    // The broker reused an id before our PUBCOMP (or resent
                    // without a reconnect): the stream check below says
                    // whether the message itself was a duplicate.
                    self.fail("qos2_id_reused");
                } else {
                    q.push(id);
                    self.sub_qos2_pending += 1;
                }
                self.sub_ack(sub, Packet::PubRec(resp(id)), now);
            }
            _ => {}
        }
        let b = &p.payload[..];
        if b.len() < HEADER {
            self.fail("foreign_message");
            return;
        }
        let ts = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let from = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        let seq = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
        let Some(ps) = self.pubs.get(from as usize) else {
            self.fail("foreign_message");
            return;
        };
        if seq >= ps.seq || ts > now {
            self.fail("foreign_message");
            return;
        }
        let routed = ps.topic == p.topic.as_str()
            && match self.cfg.shape {
                Shape::Pairs => from == sub,
                Shape::FanIn => sub == 0,
                // Every publisher of --fan-out is on the one topic.
                Shape::FanOut => true,
            };
        if !routed {
            self.misrouted += 1;
            self.fail("misrouted");
            return;
        }
        self.h_e2e.saturating_record(now.saturating_sub(ts).max(1));
        if self.shared_fan_out {
            // Once to the group, whichever member; in order at each member.
            if self.group_seen[from as usize].see(seq) {
                self.unique += 1;
                let m = from as usize * self.cfg.subs as usize + sub as usize;
                if self.member_order[m].see(seq) {
                    self.out_of_order += 1;
                }
            } else {
                self.duplicates += 1;
            }
            return;
        }
        let stream = match self.cfg.shape {
            Shape::Pairs => sub as usize,
            Shape::FanIn => from as usize,
            Shape::FanOut => from as usize * self.cfg.subs as usize + sub as usize,
        };
        match self.streams[stream].see(seq) {
            Seen::New { late } => {
                self.unique += 1;
                if late {
                    self.out_of_order += 1;
                }
            }
            Seen::Dup => self.duplicates += 1,
            Seen::Untracked => self.untracked += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tells_new_duplicate_and_late() {
        let mut s = Stream::default();
        assert_eq!(s.see(0), Seen::New { late: false });
        assert_eq!(s.see(1), Seen::New { late: false });
        assert_eq!(s.see(1), Seen::Dup);
        assert_eq!(s.see(0), Seen::Dup);
        assert_eq!(s.see(3), Seen::New { late: false });
        assert_eq!(s.see(3), Seen::Dup);
        assert_eq!(s.see(2), Seen::New { late: true });
        assert_eq!(s.next, 4);
        assert!(s.above.is_empty());
        assert!(s.any_late);
    }

    #[test]
    fn group_seen_tells_new_from_duplicate_however_far_apart() {
        let mut g = GroupSeen::default();
        assert!(g.see(5000));
        assert!(g.see(0));
        assert!(!g.see(5000));
        assert!(g.see(63));
        assert!(g.see(64));
        assert!(!g.see(0));
        assert!(!g.see(64));
        assert!(g.see(4999));
        assert!(g.see(1 << 20));
        assert!(!g.see(1 << 20));
        // One bit per sequence number, in whole powers of two of words.
        assert_eq!(g.bits.len(), ((1 << 20) / 64 + 1usize).next_power_of_two());
    }

    #[test]
    fn member_order_flags_only_a_later_arrival_below_the_highest() {
        let mut m = MemberOrder::default();
        // Gaps are other members' shares, not disorder.
        assert!(!m.see(3));
        assert!(!m.see(7));
        assert!(!m.any_late);
        assert!(m.see(5));
        assert!(m.any_late);
        assert!(!m.see(8));
    }

    #[test]
    fn stream_gives_up_a_gap_and_stays_small() {
        let mut s = Stream::default();
        assert_eq!(s.see(0), Seen::New { late: false });
        // 1 is lost: everything after it waits above the gap, up to a point.
        for seq in 2..2 + STREAM_TRACK as u32 + 10 {
            assert_eq!(s.see(seq), Seen::New { late: false });
        }
        assert!(s.forced);
        assert!(s.above.len() <= STREAM_TRACK);
        assert_eq!(s.next, 2 + STREAM_TRACK as u32 + 10);
        assert_eq!(s.see(1), Seen::Untracked);
        assert_eq!(s.see(5), Seen::Untracked);
    }
}

//! Shared subscriptions: `$share/GROUP/FILTER` (MQTT 5 §4.8.2, offered to
//! 3.1.1 clients too, as mosquitto and EMQX do). Each message matching
//! FILTER goes to exactly one member of each group.
//!
//! # Across shards
//!
//! Members are sessions, and sessions live on the shard that owns their
//! clientId, so one group's members are spread over shards. Each group has
//! one *owner shard* ([`share_owner`]: a hash of `$share/GROUP/FILTER`),
//! which keeps the group's member list here. A member's shard tells the
//! owner when the member joins, leaves, connects and disconnects
//! (`ShareJoin`, `ShareLeave`, `ShareOnline` in `broker`). Every PUBLISH
//! already reaches every shard; the owner matches it against its groups,
//! picks one member per group, and sends the message to that member's shard
//! (`ShareDeliver`), which delivers it with the member's own subscription
//! options. One owner per group means one decision per message, without
//! locks or a second round trip, and a group whose members are all on one
//! shard costs no cross-shard traffic when that shard owns it.
//!
//! # Balancing
//!
//! Round robin, in join order, over the members that are connected and have
//! room in their inflight window; failing that, over the connected ones
//! (the message waits in the chosen member's session queue); only when no
//! member is connected, over the offline members' persistent sessions
//! (queued for them, as for any QoS 1/2 subscription). A group with no
//! member left drops the message. Room is known on the member's shard: it
//! tells the owner when the member's window fills (a message had to wait)
//! and when it has room again (its queue drained), one message per change,
//! not per delivery.

use bytestring::ByteString;
use hashbrown::HashMap;

use super::session::SessionKey;
use super::topic::trie::SubscriptionTrie;
use super::topic::{TopicFilter, TopicName};
use super::ShardId;

/// The prefix of a shared subscription's filter.
pub const SHARE_PREFIX: &str = "$share/";

/// A filter split into its share name and the filter it subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// An ordinary filter.
    No,
    /// `$share/GROUP/FILTER`, with FILTER parsed.
    Yes(TopicFilter),
    /// Starts with `$share/` but is not a valid shared subscription: an empty
    /// share name, one with `+` or `#`, or no filter (MQTT-4.8.2-1, -2).
    Invalid,
}

/// Whether `filter` is a shared subscription, and to what.
pub fn parse(filter: &TopicFilter) -> Shared {
    let Some(rest) = filter.as_str().strip_prefix(SHARE_PREFIX) else {
        return Shared::No;
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Shared::Invalid;
    };
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return Shared::Invalid;
    }
    match TopicFilter::new(filter.as_bytestring().slice_ref(inner)) {
        Ok(f) => Shared::Yes(f),
        Err(_) => Shared::Invalid,
    }
}

/// The shard that keeps the member list of the group `share` names.
pub fn share_owner(share: &TopicFilter, shards: u16) -> ShardId {
    super::handshake::owner_of(share.as_str(), shards)
}

/// One member of a group, as its owner shard knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Where the session lives.
    pub shard: ShardId,
    /// The session there.
    pub session: SessionKey,
    /// Its clientId: a session key can be reused by a later session.
    pub client_id: ByteString,
    /// Whether its client is connected now.
    pub online: bool,
    /// Whether its inflight window is full (messages wait in its queue).
    pub busy: bool,
}

impl Member {
    fn is(&self, other: &Member) -> bool {
        self.shard == other.shard
            && self.session == other.session
            && self.client_id == other.client_id
    }
}

struct Group {
    share: TopicFilter,
    filter: TopicFilter,
    members: Vec<Member>,
    next: usize,
}

/// The groups one shard owns.
#[derive(Default)]
pub struct SharedGroups {
    groups: Vec<Option<Group>>,
    free: Vec<u32>,
    by_share: HashMap<ByteString, u32>,
    trie: SubscriptionTrie<u32, ()>,
}

impl SharedGroups {
    /// Groups with at least one member.
    pub fn len(&self) -> usize {
        self.by_share.len()
    }

    /// True when this shard owns no group.
    pub fn is_empty(&self) -> bool {
        self.by_share.is_empty()
    }

    /// Adds `member` to the group of `share` (created if new), or updates
    /// it if it is there already. True when the group is new.
    pub fn join(&mut self, share: &TopicFilter, filter: &TopicFilter, member: Member) -> bool {
        let mut created = false;
        let index = match self.by_share.get(share.as_bytestring()) {
            Some(&i) => i,
            None => {
                let group = Group {
                    share: share.clone(),
                    filter: filter.clone(),
                    members: Vec::new(),
                    next: 0,
                };
                let i = match self.free.pop() {
                    Some(i) => {
                        self.groups[i as usize] = Some(group);
                        i
                    }
                    None => {
                        self.groups.push(Some(group));
                        (self.groups.len() - 1) as u32
                    }
                };
                self.by_share.insert(share.as_bytestring().clone(), i);
                self.trie.subscribe(filter, i, ());
                created = true;
                i
            }
        };
        if let Some(group) = self.groups[index as usize].as_mut() {
            match group.members.iter_mut().find(|m| m.is(&member)) {
                Some(m) => *m = member,
                None => group.members.push(member),
            }
        }
        created
    }

    /// Removes `member` from the group of `share`; the group goes with its
    /// last member, and then its filter is returned.
    pub fn leave(&mut self, share: &TopicFilter, member: &Member) -> Option<TopicFilter> {
        let &index = self.by_share.get(share.as_bytestring())?;
        let group = self.groups[index as usize].as_mut()?;
        group.members.retain(|m| !m.is(member));
        if !group.members.is_empty() {
            return None;
        }
        let group = self.groups[index as usize].take().expect("checked above");
        self.trie.unsubscribe(&group.filter, index);
        self.by_share.remove(group.share.as_bytestring());
        self.free.push(index);
        Some(group.filter)
    }

    /// Records whether `member`'s client is connected, and whether its
    /// window is full.
    pub fn set_online(&mut self, share: &TopicFilter, member: &Member) {
        let Some(&index) = self.by_share.get(share.as_bytestring()) else {
            return;
        };
        if let Some(group) = self.groups[index as usize].as_mut() {
            if let Some(m) = group.members.iter_mut().find(|m| m.is(member)) {
                m.online = member.online;
                m.busy = member.busy;
            }
        }
    }

    /// For each group whose filter matches `topic`, the member that gets
    /// this message (see the module docs for the policy), appended to `out`
    /// with the group's share filter.
    pub fn pick(&mut self, topic: &TopicName, out: &mut Vec<(TopicFilter, Member)>) {
        let mut matched = Vec::new();
        self.trie.for_each_match(topic, |_, i, _| matched.push(i));
        for i in matched {
            let Some(group) = self.groups[i as usize].as_mut() else {
                continue;
            };
            let n = group.members.len();
            if n == 0 {
                continue;
            }
            let start = group.next % n;
            let order = || (0..n).map(|k| (start + k) % n);
            let members = &group.members;
            let chosen = order()
                .find(|&j| members[j].online && !members[j].busy)
                .or_else(|| order().find(|&j| members[j].online))
                .unwrap_or(start);
            group.next = chosen + 1;
            out.push((group.share.clone(), group.members[chosen].clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }

    fn member(shard: u16, key: u32, online: bool) -> Member {
        Member {
            shard: ShardId(shard),
            session: SessionKey(key),
            client_id: ByteString::from(format!("c{shard}-{key}")),
            online,
            busy: false,
        }
    }

    #[test]
    fn share_names_parse_mqtt_4_8_2_1_and_2() {
        assert_eq!(parse(&f("a/b")), Shared::No);
        assert_eq!(parse(&f("$share/g/a/+")), Shared::Yes(f("a/+")));
        assert_eq!(parse(&f("$share/g/#")), Shared::Yes(f("#")));
        assert_eq!(parse(&f("$share/g")), Shared::Invalid);
        assert_eq!(parse(&f("$share//a")), Shared::Invalid);
        assert_eq!(parse(&f("$share/+/a")), Shared::Invalid);
        assert_eq!(parse(&f("$share/g/")), Shared::Invalid);
    }

    #[test]
    fn one_member_per_group_round_robin_over_connected_ones() {
        let mut g = SharedGroups::default();
        let share = f("$share/g/t/+");
        let filter = f("t/+");
        g.join(&share, &filter, member(0, 1, true));
        g.join(&share, &filter, member(1, 2, false));
        g.join(&share, &filter, member(2, 3, true));
        let topic = TopicName::new("t/x".to_string()).unwrap();
        let mut picked = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            g.pick(&topic, &mut out);
            assert_eq!(out.len(), 1, "exactly one member per group");
            picked.push(out[0].1.session.0);
        }
        assert_eq!(picked, [1, 3, 1, 3], "the offline member is skipped");
        // A connected member whose window is full is passed over while
        // another has room.
        g.set_online(
            &share,
            &Member {
                busy: true,
                ..member(0, 1, true)
            },
        );
        let mut out = Vec::new();
        for _ in 0..3 {
            g.pick(&topic, &mut out);
        }
        let keys: Vec<u32> = out.iter().map(|(_, m)| m.session.0).collect();
        assert_eq!(keys, [3, 3, 3]);
        // All busy: the connected ones still take turns (their queues wait).
        g.set_online(
            &share,
            &Member {
                busy: true,
                ..member(2, 3, true)
            },
        );
        let mut out = Vec::new();
        g.pick(&topic, &mut out);
        g.pick(&topic, &mut out);
        assert_ne!(out[0].1.session, out[1].1.session);
        // Nobody connected: the offline ones take turns.
        g.set_online(&share, &member(0, 1, false));
        g.set_online(&share, &member(2, 3, false));
        let mut out = Vec::new();
        g.pick(&topic, &mut out);
        g.pick(&topic, &mut out);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].1.session, out[1].1.session);
    }

    #[test]
    fn group_goes_with_its_last_member() {
        let mut g = SharedGroups::default();
        let share = f("$share/g/t");
        assert!(g.join(&share, &f("t"), member(0, 1, true)), "a new group");
        assert!(!g.join(&share, &f("t"), member(0, 1, true)));
        assert_eq!(g.len(), 1);
        assert_eq!(g.leave(&share, &member(0, 1, true)), Some(f("t")));
        assert!(g.is_empty());
        let mut out = Vec::new();
        g.pick(&TopicName::new("t".to_string()).unwrap(), &mut out);
        assert!(out.is_empty());
    }
}

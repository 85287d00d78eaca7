//! The sans-IO protocol core: no sockets, no glommio, no clock reads. Time is
//! always an argument, so every rule can be tested on a fake clock and fuzzed.

use std::fmt;

pub mod acl;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod handshake;
pub mod interest;
pub mod keepalive;
pub mod persist;
pub mod retained;
pub mod session;
pub mod shared;
pub mod topic;

#[cfg(test)]
mod harness;

/// A shard: one thread, one core, one slice of the clientId space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}

/// A connection on one shard: a slot index and the generation of its
/// occupant, so a stale id (a keep-alive entry, a queued wake-up) never
/// reaches the connection that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Slot in the shard's connection table.
    pub index: u32,
    /// Incremented each time the slot is reused.
    pub generation: u32,
}

/// Monotonic milliseconds since the shard started. Only `shard/` reads the
/// clock; everything in `proto` is handed one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

//! The sans-IO protocol core: no sockets, no glommio, no clock reads. Time is
//! always an argument, so every rule can be tested on a fake clock and fuzzed.

pub mod codec;
pub mod keepalive;
pub mod topic;

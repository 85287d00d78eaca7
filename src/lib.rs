//! coremq: an MQTT 3.1 / 3.1.1 / 5.0 broker for very large device fleets.
//!
//! Module map — where each thing lives:
//!
//! - [`proto`]: the sans-IO protocol core; no sockets, no clock reads.
//!   - [`proto::codec`]: the wire format of every packet of every version.
//!   - [`proto::topic`]: `TopicName` / `TopicFilter` and the subscription trie.
//!   - [`proto::keepalive`]: the lazy one-second keep-alive wheel.
//! - [`config`]: CLI flags + optional TOML file → a validated `Config`.
//! - [`auth`]: the mosquitto-format password file and the CONNECT credentials check.
//! - [`sys`]: process-wide OS settings (the open-file limit, terminal echo).

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod auth;
pub mod config;
pub mod proto;
pub mod sys;

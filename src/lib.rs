//! coremq: an MQTT 3.1 / 3.1.1 / 5.0 broker for very large device fleets.
//!
//! Module map — where each thing lives:
//!
//! - [`proto`]: the sans-IO protocol core; no sockets, no clock reads.
//!   - [`proto::acl`]: topic access rules (mosquitto's `acl_file` format).
//!   - [`proto::codec`]: the wire format of every packet of every version.
//!   - [`proto::topic`]: `TopicName` / `TopicFilter` and the subscription trie.
//!   - [`proto::keepalive`]: the lazy bucket wheel that finds silent connections.
//!   - [`proto::handshake`]: the first packet: CONNACK return code, owner shard.
//!   - [`proto::broker`]: one shard's connections, sessions, wills, routing.
//!   - [`proto::session`]: a client's session: subscriptions and their options, expiry, packet ids, inflight.
//!   - [`proto::retained`]: retained messages, each topic on one owner shard.
//!   - [`proto::shared`]: shared subscription groups (`$share/...`), each on one owner shard.
//!   - [`proto::interest`]: which shards want a topic, so a PUBLISH goes only there.
//!   - [`proto::persist`]: `--data-dir` records: framing, CRC, scanning a log, replaying it.
//! - [`shard`]: the glommio shell: executors, the tick, dispatching the broker's events.
//!   - [`shard::net`]: accept, the CONNECT handshake, hand-off, reading and writing sockets; the epoll loop.
//!   - `shard::layer`: a connection's TLS and WebSocket layers, sans-IO, between its socket and the broker.
//!   - [`shard::uring`]: the shard's io_uring, its provided-buffer ring, and why each operation.
//!   - [`shard::poller`]: the epoll loop's epoll set, and the history of both loops.
//!   - [`shard::mesh`]: messages between shards and how they travel.
//!   - [`shard::store`]: `--data-dir` files: lock, format, start-up replay and re-homing, each shard's log and snapshots.
//! - [`cluster`]: `--cluster`: the link thread that joins this node to the others over NATS.
//!   - [`proto::cluster`]: what nodes say to each other, and the link's route tables.
//! - [`metrics`]: process-wide counters, the periodic summary line, the Prometheus exposition.
//! - [`http`]: `--metrics-listen`: `GET /metrics` and `GET /healthz`.
//! - [`config`]: CLI flags + optional TOML file → a validated `Config`.
//! - [`auth`]: the mosquitto-format password file and the CONNECT credentials check.
//! - [`reload`]: SIGHUP rereads the password, ACL and TLS files, connections stay.
//! - [`tls`]: the rustls settings of the TLS listeners, from `--cert`, `--key`, `--client-ca`.
//!   - [`tls::record`]: sealing and opening TLS records with keys expanded on use, not held.
//! - [`sys`]: process-wide OS settings (the open-file limit, terminal echo).

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod shard;
pub mod sys;
pub mod tls;

#[cfg(test)]
mod test_alloc;

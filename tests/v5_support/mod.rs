//! Helpers shared by the MQTT 5 client tests (`v5_mqttjs.rs`,
//! `v5_mosquitto.rs`): the broker under test, clientIds placed on chosen
//! shards, and the JSON lines the client scripts print.
//!
//! `COREMQ_V5_REFERENCE=mosquitto cargo test --test v5_...` runs the same
//! tests against mosquitto 2 (a reference MQTT 5 broker) instead of coremq,
//! to check the tests themselves. coremq flags are not passed to it, so the
//! tests that check flag-driven values, and those that check a choice
//! coremq's contract makes where MQTT 5 allows several (one copy per client
//! for overlapping subscriptions, round-robin shared delivery), may fail
//! there.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coremq::proto::handshake::owner_of;

use crate::common::{self, json, tools, wait_until, Broker, TempDir};

/// The shard count every test here runs the broker with.
pub const SHARDS: u16 = 4;

/// One parsed JSON line of a client script.
pub type Event = HashMap<String, json::Value>;

/// The broker under test: coremq, or mosquitto when
/// `COREMQ_V5_REFERENCE=mosquitto`.
pub enum Server {
    /// coremq with the test's flags.
    Coremq(Broker),
    /// A mosquitto 2 reference broker, killed by its PID on drop.
    Mosquitto {
        /// The process.
        child: Child,
        /// Its port.
        port: u16,
        /// Holds its config file.
        _dir: TempDir,
    },
}

impl Server {
    /// Starts the broker under test (coremq with `--shards 4` unless the
    /// flags say otherwise); `coremq_flags` go to coremq only.
    pub fn start(coremq_flags: &[&str]) -> Server {
        if std::env::var("COREMQ_V5_REFERENCE").as_deref() == Ok("mosquitto") {
            return Server::mosquitto();
        }
        // Broker::start adds `--shards 4` unless the test picks a count.
        Server::Coremq(Broker::start(coremq_flags))
    }

    fn mosquitto() -> Server {
        let dir = TempDir::new("mosquitto-ref");
        let port = common::unused_port();
        let conf = dir.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(&tools().mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        assert!(
            wait_until(Duration::from_secs(5), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "mosquitto did not listen on {port}"
        );
        Server::Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        match self {
            Server::Coremq(b) => b.port(),
            Server::Mosquitto { port, .. } => *port,
        }
    }

    /// The coremq broker, if that is what runs.
    pub fn coremq(&self) -> Option<&Broker> {
        match self {
            Server::Coremq(b) => Some(b),
            Server::Mosquitto { .. } => None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The shard coremq gives `client_id` (of [`SHARDS`]).
pub fn shard_of(client_id: &str) -> u16 {
    owner_of(client_id, SHARDS).0
}

/// `n` clientIds `PREFIX-0..` that coremq puts on `n` different shards
/// (`n` <= 4), so that messages between them cross shards.
pub fn ids_on_distinct_shards(prefix: &str, n: usize) -> Vec<String> {
    assert!(n <= usize::from(SHARDS));
    let mut ids: Vec<String> = Vec::new();
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        if ids.iter().all(|o| shard_of(o) != shard_of(&id)) {
            ids.push(id);
            if ids.len() == n {
                return ids;
            }
        }
    }
    unreachable!()
}

/// Parses one script line; panics on a line that is not a JSON object.
pub fn event(line: &str) -> Event {
    json::parse_object(line).unwrap_or_else(|| panic!("not a JSON object: {line}"))
}

/// Every JSON line of `stdout`.
pub fn events(stdout: &str) -> Vec<Event> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(event)
        .collect()
}

/// The `"event"` of a parsed line.
pub fn kind(e: &Event) -> &str {
    e.get("event").and_then(|v| v.as_str()).unwrap_or("")
}

/// A string field, or `None`.
pub fn str_field<'a>(e: &'a Event, k: &str) -> Option<&'a str> {
    e.get(k).and_then(|v| v.as_str())
}

/// A number field, or `None`.
pub fn num_field(e: &Event, k: &str) -> Option<u64> {
    e.get(k).and_then(|v| v.as_u64())
}

/// A boolean field, or `None`.
pub fn bool_field(e: &Event, k: &str) -> Option<bool> {
    e.get(k).and_then(|v| v.as_bool())
}

/// The raw text of an array / object field (`[1,2]`), or `None`.
pub fn raw_field<'a>(e: &'a Event, k: &str) -> Option<&'a str> {
    match e.get(k) {
        Some(json::Value::Other(s)) => Some(s),
        _ => None,
    }
}

/// A JSON string literal for `s` (quotes and backslashes escaped).
pub fn jstr(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

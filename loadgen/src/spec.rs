//! What the coordinator tells a worker process, and what a worker says back
//! (one JSON object per line on its stdout).

use std::collections::BTreeMap;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::protocol::Protocol;

/// The load a worker generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Open, hold, disconnect.
    Conn,
    /// connect → CONNACK → DISCONNECT → close, in a loop.
    Churn,
    /// Pinging connections plus a silent cohort with wills.
    Keepalive,
    /// Reconnect existing clientIds.
    Takeover,
    /// Publishers and subscribers: message throughput and latency (one
    /// process, no workers: see `pubsub/`).
    Pubsub,
}

impl Mode {
    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Conn => "conn",
            Mode::Churn => "churn",
            Mode::Keepalive => "keepalive",
            Mode::Takeover => "takeover",
            Mode::Pubsub => "pubsub",
        }
    }
}

/// One worker's share of a run. Client numbers `n` are global, so clientIds
/// and source addresses do not depend on how the run is split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Index of this worker, 0-based.
    pub index: u32,
    /// The load.
    pub mode: Mode,
    /// Broker address.
    pub broker: String,
    /// Number of source addresses used by the whole run.
    pub source_ips: u32,
    /// Source addresses skipped before the first one used.
    #[serde(default)]
    pub source_skip: u32,
    /// First client number of this worker (held / pinging clients).
    pub first: u32,
    /// How many clients this worker opens (conn, keepalive, takeover) or
    /// concurrent loops it runs (churn).
    pub count: u32,
    /// First client number of the silent cohort (keepalive).
    pub silent_first: u32,
    /// Size of this worker's silent cohort (keepalive).
    pub silent_count: u32,
    /// Connect rate for this worker per second (0: as fast as accepted).
    pub rate: f64,
    /// Takeover rate for this worker per second.
    pub takeover_rate: f64,
    /// Outstanding handshakes at most when no rate is set.
    pub inflight: u32,
    /// clientId pattern; `{n}` is replaced by the client number.
    pub client_id: String,
    /// cleanSession.
    pub clean: bool,
    /// keepAlive seconds (0: no pings).
    pub keepalive: u16,
    /// Will topic pattern (`{n}` replaced), if any.
    pub will_topic: Option<String>,
    /// Will payload.
    pub will_payload: String,
    /// Length of the main phase in seconds (hold, churn, takeover).
    pub main_secs: f64,
    /// Connect / CONNACK / close timeout in seconds.
    pub timeout_secs: f64,
    /// This worker runs the will subscriber (keepalive, worker 0).
    pub will_subscriber: bool,
    /// MQTT version of every packet (`--protocol`).
    #[serde(default)]
    pub protocol: Protocol,
    /// `--tls-ca`: connect over TLS, verifying with this CA.
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// `--tls-server-name`.
    #[serde(default)]
    pub tls_server_name: String,
    /// `--ws PATH`: connect over WebSocket to PATH.
    #[serde(default)]
    pub ws_path: Option<String>,
}

/// Run phases a worker goes through. The coordinator moves all workers from
/// one to the next together, so the broker can be sampled between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Set up (subscriber connected), waiting for `go`.
    Ready,
    /// Opening connections.
    Ramp,
    /// Ramp finished; waiting for `next`.
    Ramped,
    /// Hold / churn / takeovers.
    Main,
    /// Main phase over; waiting for `next`.
    MainDone,
    /// Sending DISCONNECT, waiting for the broker's close.
    Disconnect,
    /// Finished.
    Done,
}

/// A line a worker writes on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum WorkerMsg {
    /// Sent about every second and at each phase change.
    Progress(Progress),
    /// The last line.
    Result(Box<WorkerResult>),
}

/// Counters so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The worker's phase.
    pub phase: Option<Phase>,
    /// CONNECTs sent or sockets opened.
    pub attempted: u64,
    /// CONNACK 0 received (cumulative).
    pub connected: u64,
    /// Connections open now, past their CONNACK.
    pub open: u64,
    /// Failures of any cause.
    pub failed: u64,
    /// Churn cycles completed.
    pub cycles: u64,
    /// p99 CONNECT→CONNACK so far, µs.
    pub p99_us: u64,
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    /// Worker index.
    pub index: u32,
    /// Connections attempted.
    pub attempted: u64,
    /// CONNACK 0 received.
    pub connected: u64,
    /// DISCONNECT sent and the broker's close seen.
    pub disconnected: u64,
    /// Churn cycles completed.
    pub cycles: u64,
    /// PINGREQs sent.
    pub pings: u64,
    /// PINGRESPs received.
    pub pongs: u64,
    /// Takeovers attempted.
    pub takeovers: u64,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Histograms (µs), V2-serialized and base64-encoded.
    pub hists: BTreeMap<String, String>,
    /// Successful connects (or cycles for churn) per second since `go`.
    pub series: Vec<u64>,
    /// Wall and CPU seconds of the ramp (from `go` to ramped).
    pub ramp_wall_s: f64,
    /// CPU seconds during the ramp.
    pub ramp_cpu_s: f64,
    /// Wall seconds of the main phase.
    pub main_wall_s: f64,
    /// CPU seconds during the main phase.
    pub main_cpu_s: f64,
    /// CPU seconds of the whole worker.
    pub cpu_s: f64,
    /// Peak RSS of the worker, KiB.
    pub max_rss_kb: u64,
    /// Silent cohort: (n, CONNECT sent, broker close) in CLOCK_MONOTONIC ns;
    /// close 0 when it did not come.
    pub silent: Vec<(u32, u64, u64)>,
    /// Wills received: (n, arrival) in CLOCK_MONOTONIC ns.
    pub wills: Vec<(u32, u64)>,
}

/// A latency histogram in µs, 1 µs to 1 hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// V2 + base64.
pub fn hist_to_b64(h: &Histogram<u64>) -> String {
    let mut v = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut v)
        .expect("serialize into a Vec");
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// Inverse of [`hist_to_b64`].
pub fn hist_from_b64(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_round_trips_through_base64() {
        let mut h = new_hist();
        for v in [1u64, 10, 100, 1000, 123_456] {
            h.record(v).unwrap();
        }
        let back = hist_from_b64(&hist_to_b64(&h)).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        let mut merged = new_hist();
        merged.add(&back).unwrap();
        merged.add(&h).unwrap();
        assert_eq!(merged.len(), 10);
    }

    #[test]
    fn worker_messages_are_one_json_line() {
        let m = WorkerMsg::Progress(Progress {
            phase: Some(Phase::Ramp),
            attempted: 3,
            ..Default::default()
        });
        let s = serde_json::to_string(&m).unwrap();
        assert!(!s.contains('\n'));
        let back: WorkerMsg = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, WorkerMsg::Progress(p) if p.attempted == 3));
    }
}

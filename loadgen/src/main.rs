//! loadgen: the load generator for coremq. See README.md beside this crate.

mod compare;
mod coord;
mod engine;
mod null_broker;
mod plot;
mod protocol;
mod pubsub;
mod report;
mod spec;
mod sys;
mod ws;

use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{ArgAction, Args, Parser, Subcommand};

/// MQTT load generator: connection rate, churn, keep-alive, takeover and
/// publish/subscribe throughput at fleet scale, over many source addresses
/// and worker processes.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N connections, hold them (pinging), then DISCONNECT all.
    Conn(ConnArgs),
    /// C concurrent loops of connect → CONNACK → DISCONNECT → close.
    Churn(ChurnArgs),
    /// Pinging connections plus a silent cohort whose wills must arrive.
    Keepalive(KeepaliveArgs),
    /// Connect N clientIds, then reconnect them at R per second.
    Takeover(TakeoverArgs),
    /// Publishers and subscribers: message throughput and end-to-end latency.
    Pubsub(pubsub::PubsubArgs),
    /// A server that only answers CONNECT and PINGREQ: the machine's ceiling.
    NullBroker(NullArgs),
    /// Run the same scenarios against coremq, mosquitto and the null broker; print ratios.
    Compare(compare::CompareArgs),
    /// Internal: one worker process (spawned by the others).
    #[command(hide = true)]
    Worker {
        /// The worker's share of the run, as JSON.
        #[arg(long)]
        spec: String,
    },
}

/// Flags every load subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Broker address, IPv4 HOST:PORT.
    #[arg(short = 'b', long)]
    pub broker: String,
    /// Worker processes (default: one per 19,000 connections).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Source addresses from 127.1.0.1 up (default: one per 5,000 connections).
    #[arg(long)]
    pub source_ips: Option<u32>,
    /// Skip this many source addresses first: runs in a row then use fresh
    /// ones, whose ports no earlier run's TIME_WAIT sockets hold.
    #[arg(long, default_value_t = 0)]
    pub source_skip: u32,
    /// Timeout in seconds for each connect, CONNACK wait and close wait.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// The broker's PID: report its CPU and RSS per operation. Repeat it
    /// for a broker of several processes (a cluster): the CPU and RSS
    /// reported are then the sum over all of them.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Vec<u32>,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw connect rate over time and the latency distribution to FILE.svg.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// No live line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// MQTT version every client speaks: 4 (3.1.1; also 311, 3.1.1) or 5 (5.0; also 5.0).
    #[arg(long, value_name = "4|5", default_value = "4", value_parser = protocol::Protocol::parse)]
    pub protocol: protocol::Protocol,
    /// Connect over TLS (1.2 or 1.3), verifying the broker's certificate
    /// with this CA (PEM). Sessions resume (TLS 1.3 tickets) as a real
    /// client's would.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the broker's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub tls_server_name: String,
    /// Connect over WebSocket to PATH (e.g. /mqtt): an HTTP upgrade with
    /// subprotocol mqtt, then MQTT in masked binary frames; with --tls-ca,
    /// WebSocket over TLS.
    #[arg(long, value_name = "PATH")]
    pub ws: Option<String>,
}

/// How clients identify themselves.
#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// clientId pattern; `{n}` becomes the client number.
    #[arg(long, default_value = "lg-{n}")]
    pub client_id: String,
    /// cleanSession: true or false.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub clean: bool,
}

/// `loadgen conn`.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub n: u32,
    /// Connects per second, all workers together (default: as fast as the broker takes them).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Outstanding handshakes per worker when no --rate is given.
    #[arg(long, default_value_t = 512)]
    pub inflight: u32,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// keepAlive seconds; a PINGREQ every K seconds per connection (0: none).
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Will topic (`{n}` becomes the client number).
    #[arg(long)]
    pub will_topic: Option<String>,
    /// Will payload.
    #[arg(long, default_value = "offline")]
    pub will_payload: String,
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(flatten)]
    pub common: Common,
}

/// `loadgen churn`.
#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Concurrent connect/disconnect loops.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub concurrency: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// keepAlive announced in each CONNECT.
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(flatten)]
    pub common: Common,
}

/// `loadgen keepalive`.
#[derive(Args, Debug, Clone)]
pub struct KeepaliveArgs {
    /// Connections that ping every K seconds.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub n: u32,
    /// Connections that go silent after CONNECT, each with a will on lg/will/{n}.
    #[arg(long, default_value_t = 100)]
    pub silent: u32,
    /// keepAlive seconds.
    #[arg(long, default_value_t = 10)]
    pub keepalive: u16,
    /// Seconds to hold after the ramp (default: ceil(1.5 × K) + 3).
    #[arg(long)]
    pub hold: Option<f64>,
    /// Connects per second (default: as fast as the broker takes them).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Outstanding handshakes per worker when no --rate is given.
    #[arg(long, default_value_t = 512)]
    pub inflight: u32,
    /// Will payload of the silent cohort.
    #[arg(long, default_value = "offline")]
    pub will_payload: String,
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(flatten)]
    pub common: Common,
}

/// `loadgen takeover`.
#[derive(Args, Debug, Clone)]
pub struct TakeoverArgs {
    /// clientIds to connect first.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub n: u32,
    /// Takeovers per second, all workers together.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of takeovers.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// keepAlive seconds.
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Outstanding handshakes per worker during the initial ramp.
    #[arg(long, default_value_t = 512)]
    pub inflight: u32,
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(flatten)]
    pub common: Common,
}

/// `loadgen null-broker`.
#[derive(Args, Debug, Clone)]
pub struct NullArgs {
    /// Address to listen on, IP:PORT.
    #[arg(long)]
    pub listen: String,
    /// Threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Resolves an IPv4 HOST:PORT given as `--broker`.
pub fn resolve_v4(s: &str) -> Result<SocketAddrV4> {
    resolve_v4_flag("--broker", s)
}

/// Resolves an IPv4 HOST:PORT given as `flag` (named in the error).
pub fn resolve_v4_flag(flag: &str, s: &str) -> Result<SocketAddrV4> {
    let addrs = s
        .to_socket_addrs()
        .map_err(|e| anyhow!("{flag} {s}: {e}"))?;
    for a in addrs {
        if let SocketAddr::V4(v4) = a {
            return Ok(v4);
        }
    }
    Err(anyhow!("{flag} {s}: no IPv4 address"))
}

/// Prints a one-line usage error and exits with 2.
pub fn usage_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("loadgen: error: {msg}");
    std::process::exit(2)
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
                _ => {
                    let text = e.to_string();
                    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
                    let first = lines.next().unwrap_or("bad arguments");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    // "the following required arguments were not provided:"
                    // lists them on the indented lines below: keep them.
                    let listed: Vec<&str> = if first.ends_with(':') {
                        lines
                            .take_while(|l| l.starts_with(' '))
                            .map(str::trim)
                            .collect()
                    } else {
                        Vec::new()
                    };
                    if listed.is_empty() {
                        usage_error(first);
                    }
                    usage_error(format!("{first} {}", listed.join(" ")));
                }
            }
        }
    };
    let res = match cli.cmd {
        Cmd::Worker { spec } => {
            let spec: spec::WorkerSpec = match serde_json::from_str(&spec) {
                Ok(s) => s,
                Err(e) => usage_error(format!("worker spec: {e}")),
            };
            engine::Engine::new(spec).and_then(|e| e.run()).map(|()| 0)
        }
        Cmd::NullBroker(a) => null_broker::run(&a.listen, a.threads).map(|()| 0),
        Cmd::Conn(a) => coord::conn(a),
        Cmd::Churn(a) => coord::churn(a),
        Cmd::Keepalive(a) => coord::keepalive(a),
        Cmd::Takeover(a) => coord::takeover(a),
        Cmd::Pubsub(a) => pubsub::pubsub(a),
        Cmd::Compare(a) => compare::compare(a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}

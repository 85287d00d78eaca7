//! The broker's settings: command-line flags, an optional TOML file, and the
//! rules that make a [`Config`] valid.
//!
//! Every setting has one long flag and one TOML key of the same name; the file
//! accepts both `snake_case` and `kebab-case` (`max_connections` or
//! `max-connections`). Flags override the file, and `--listen` given on the
//! command line replaces the file's list rather than adding to it.
//!
//! ```toml
//! listen = ["127.0.0.1:1883", "[::1]:1883"]   # or one string
//! shards = 2
//! io = "auto"                                 # uring, epoll or auto
//! password_file = "passwords"                 # relative to this file's folder
//! acl_file = "acl"                            # mosquitto's acl_file format
//! allow_anonymous = false
//! data_dir = "/var/lib/coremq"                # keep sessions across restarts
//! fsync = "batch"                             # always, batch or never
//! connect_timeout = 10                        # seconds
//! ```
//!
//! The range of each numeric setting is written once, in [`Key::range`]; both
//! the parser and [`Config::validate`] read it, so an error names the flag or
//! key the user actually wrote.
//!
//! The module is split by concern: [`Config`] and its errors here, the
//! settings' names and ranges in `keys`, the command line in `flags`, and
//! the conversion of values from either source (and the TOML file format)
//! in `values`.

mod flags;
mod keys;
mod values;

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use flags::{clap_error, passwd_command, run_command, Cli, SubCommand};
pub use keys::Key;
use values::{check_listen, check_log_level};

pub use crate::proto::broker::QueueFull;
/// The port MQTT listens on when none is given (IANA-assigned, unencrypted).
pub const DEFAULT_PORT: u16 = 1883;

/// The PBKDF2 iteration count `coremq passwd` uses unless told otherwise:
/// mosquitto_passwd's default, so files stay interchangeable.
pub const DEFAULT_PASSWD_ITERATIONS: u32 = 101;

/// When the `--data-dir` log is flushed to the device (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncMode {
    /// One write and fdatasync for each socket read that produced records
    /// (no batching across clients): the most fsyncs, the shortest wait
    /// for a lone publisher.
    Always,
    /// One write and fdatasync per commit for all the records gathered
    /// since the last, whichever clients they came from (group commit,
    /// spaced by `commit_interval_usec`).
    #[default]
    Batch,
    /// Records are written but never flushed: acknowledgements wait for the
    /// write only, and a crash of the machine (not of the process) may lose
    /// what the OS had not written yet.
    Never,
}

impl std::str::FromStr for FsyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<FsyncMode, String> {
        match s.trim() {
            "always" => Ok(FsyncMode::Always),
            "batch" => Ok(FsyncMode::Batch),
            "never" => Ok(FsyncMode::Never),
            other => Err(format!("must be always, batch or never, got {other:?}")),
        }
    }
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsyncMode::Always => "always",
            FsyncMode::Batch => "batch",
            FsyncMode::Never => "never",
        })
    }
}

/// The socket loop a shard runs (`--io`): both drive the same sans-IO
/// broker; they differ in how bytes reach it (see `shard::poller` and
/// `shard::uring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring when the kernel offers every operation the loop uses (probed
    /// at start), else epoll with one log line saying why.
    #[default]
    Auto,
    /// io_uring, or refuse to start when the kernel cannot.
    Uring,
    /// epoll and one system call per socket operation.
    Epoll,
}

impl std::str::FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<IoMode, String> {
        match s.trim() {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            other => Err(format!("must be uring, epoll or auto, got {other:?}")),
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "uring",
            IoMode::Epoll => "epoll",
        })
    }
}

/// What a listening address speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TCP (`--listen`).
    Tcp,
    /// MQTT over TLS (`--tls-listen`).
    Tls,
    /// MQTT over WebSocket (`--ws-listen`).
    Ws,
    /// MQTT over WebSocket over TLS (`--wss-listen`).
    Wss,
}

impl Transport {
    /// Whether connections start with a TLS handshake.
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether connections start with a WebSocket upgrade.
    pub fn is_ws(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

/// Everything the broker needs to start; built by [`parse_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Addresses to accept MQTT connections on; every shard binds each one
    /// with SO_REUSEPORT. Default: `[0.0.0.0:1883]`.
    pub listen: Vec<SocketAddr>,
    /// Number of shards (executor threads, one pinned per core), 1..=1024.
    /// Default: the number of CPUs this process may run on.
    pub shards: usize,
    /// Which socket loop the shards run (see [`IoMode`]). Default: `auto`.
    pub io: IoMode,
    /// io_uring: buffers (4 KiB each) in each shard's provided-buffer ring,
    /// a power of two, 1..=32768. Default: 1024.
    pub ring_buffers: u16,
    /// io_uring: microseconds a shard's wait collects completions before it
    /// wakes for fewer than a batch, 0..=10000 (0: wake for each). Needs
    /// kernel 6.12+ (ignored before). Default: 0.
    pub ring_batch_usec: u32,
    /// mosquitto-format password file (see [`crate::auth`]). Default: none.
    pub password_file: Option<PathBuf>,
    /// mosquitto-format ACL file (see [`crate::proto::acl`]); with one, what
    /// it does not grant is refused. Default: none (everything allowed).
    pub acl_file: Option<PathBuf>,
    /// Where persistent sessions, queued messages and retained messages are
    /// kept (see `shard::store`); `None` keeps nothing. Default: none.
    pub data_dir: Option<PathBuf>,
    /// When the data dir's log is flushed. Default: batch.
    pub fsync: FsyncMode,
    /// MiB of log growth after which a shard writes a snapshot and drops
    /// its log, 1..=65536. Default: 64.
    pub snapshot_mib: u32,
    /// Least microseconds between the starts of two log commits of a
    /// shard (group commit under steady load), 0..=100000. Default: 2000.
    pub commit_interval_usec: u32,
    /// Addresses to accept MQTT over TLS on (see [`crate::tls`]); needs
    /// `cert` and `key`. Default: none.
    pub tls_listen: Vec<SocketAddr>,
    /// Addresses to accept MQTT over WebSocket on. Default: none.
    pub ws_listen: Vec<SocketAddr>,
    /// Addresses to accept MQTT over WebSocket over TLS on; needs `cert`
    /// and `key`. Default: none.
    pub wss_listen: Vec<SocketAddr>,
    /// The one path a WebSocket upgrade may ask for; `None` takes any.
    pub ws_path: Option<String>,
    /// TLS certificate chain (PEM). Default: none.
    pub cert: Option<PathBuf>,
    /// TLS private key (PEM). Default: none.
    pub key: Option<PathBuf>,
    /// CA certificates client certificates are verified against (PEM);
    /// `None` asks for no client certificate. Default: none.
    pub client_ca: Option<PathBuf>,
    /// A TLS client must present a certificate `client_ca` verifies.
    /// Default: false.
    pub require_client_cert: bool,
    /// The client certificate's subject CN is the username. Default: false.
    pub use_identity_as_username: bool,
    /// Where `GET /metrics` and `GET /healthz` are served (see
    /// [`crate::http`]); `None` serves nothing. Default: none.
    pub metrics_listen: Option<SocketAddr>,
    /// NATS servers of the cluster this node joins (see `crate::cluster`);
    /// empty: a lone node. Default: none.
    pub cluster: Vec<String>,
    /// This node's name in the cluster. Default: the host name and the
    /// first listen port ([`Config::node`]).
    pub node_name: Option<String>,
    /// Whether a client that sends no username may connect. Default: true
    /// without a password file, false with one.
    pub allow_anonymous: bool,
    /// Most client connections the whole process holds at once; 0 means
    /// limited only by the open-file limit. Default: 0.
    pub max_connections: usize,
    /// How long a new socket may take to send its CONNECT before it is
    /// closed; must be > 0. Default: 10 s.
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted, in bytes, fixed header included
    /// (2..=268_435_460, the protocol's own maximum). Default: 1_048_576 (1 MiB).
    pub max_packet_size: usize,
    /// Period of the counters summary log line; zero disables it.
    /// Default: 60 s.
    pub stats_interval: Duration,
    /// Most QoS 1/2 messages in flight to one client, 1..=65535 (MQTT 5's
    /// Receive Maximum may not be 0). Default: 20 messages.
    pub max_inflight: u16,
    /// Most messages queued for one offline or slow session; beyond it
    /// `queue_full` decides. Default: 1000 messages.
    pub max_queued: usize,
    /// What a QoS 1/2 message meeting a full session queue does.
    /// Default: backpressure.
    pub queue_full: QueueFull,
    /// How long a message may wait for a full queue under backpressure,
    /// 1..=3600 s. Default: 10 s.
    pub queue_full_timeout: Duration,
    /// Period of the `$SYS/broker/...` statistics topics; zero disables
    /// them. Default: 10 s.
    pub sys_interval: Duration,
    /// MQTT 5 Server Keep Alive, seconds, 0..=65535: a 5.0 client asking
    /// for more, or for 0, is told this and held to it; 0 caps nothing.
    /// Default: 0.
    pub max_keepalive: u16,
    /// Longest MQTT 5 Session Expiry Interval granted, seconds;
    /// 4294967295 ("never expires") caps nothing. Default: 4294967295.
    pub max_session_expiry: u32,
    /// MQTT 5 Topic Alias Maximum offered to clients, 0..=65535 (0: none).
    /// Default: 65535.
    pub max_topic_alias: u16,
    /// MQTT 5 Receive Maximum offered to clients: QoS 2 PUBLISHes of one
    /// client that may await PUBREL at once, 1..=65535. Default: 1024.
    pub receive_maximum: u16,
    /// MQTT 5 Response Information sent to clients that ask for it.
    /// Default: none.
    pub response_information: Option<String>,
    /// tracing filter: error|warn|info|debug|trace|off, or an env-filter
    /// directive such as `coremq=debug,info`. Default: `info`.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            listen: vec![SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                DEFAULT_PORT,
            )],
            shards: cpus.clamp(1, 1024),
            io: IoMode::Auto,
            ring_buffers: 1024,
            ring_batch_usec: 0,
            password_file: None,
            acl_file: None,
            data_dir: None,
            fsync: FsyncMode::Batch,
            snapshot_mib: 64,
            commit_interval_usec: 2000,
            tls_listen: Vec::new(),
            ws_listen: Vec::new(),
            wss_listen: Vec::new(),
            ws_path: None,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            use_identity_as_username: false,
            metrics_listen: None,
            cluster: Vec::new(),
            node_name: None,
            allow_anonymous: true,
            max_connections: 0,
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1_048_576,
            stats_interval: Duration::from_secs(60),
            max_inflight: 20,
            max_queued: 1000,
            queue_full: QueueFull::Backpressure,
            queue_full_timeout: Duration::from_secs(10),
            sys_interval: Duration::from_secs(10),
            max_keepalive: 0,
            max_session_expiry: u32::MAX,
            max_topic_alias: u16::MAX,
            receive_maximum: 1024,
            response_information: None,
            log_level: "info".to_owned(),
        }
    }
}

impl Config {
    /// Checks every rule; [`parse_args`] already did, this is for a `Config`
    /// built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail =
            |key: Key, problem: String| ConfigError::Invalid(format!("{}: {problem}", key.flag()));
        check_listen(&self.listen).map_err(|p| fail(Key::Listen, p))?;
        self.check_listeners().map_err(|(key, p)| fail(key, p))?;
        let numbers: [(Key, u64); 16] = [
            (Key::Shards, self.shards as u64),
            (Key::RingBuffers, u64::from(self.ring_buffers)),
            (Key::RingBatchUsec, u64::from(self.ring_batch_usec)),
            (Key::MaxConnections, self.max_connections as u64),
            // Rounded up: 0.5 s is a valid (if odd) timeout set in code.
            (
                Key::ConnectTimeout,
                self.connect_timeout.as_secs() + u64::from(self.connect_timeout.subsec_nanos() > 0),
            ),
            (Key::MaxPacketSize, self.max_packet_size as u64),
            (Key::StatsInterval, self.stats_interval.as_secs()),
            (Key::MaxInflight, u64::from(self.max_inflight)),
            (Key::MaxQueued, self.max_queued as u64),
            // Rounded up, as the connect timeout.
            (
                Key::QueueFullTimeout,
                self.queue_full_timeout.as_secs()
                    + u64::from(self.queue_full_timeout.subsec_nanos() > 0),
            ),
            (Key::MaxKeepalive, u64::from(self.max_keepalive)),
            (Key::MaxSessionExpiry, u64::from(self.max_session_expiry)),
            (Key::MaxTopicAlias, u64::from(self.max_topic_alias)),
            (Key::ReceiveMaximum, u64::from(self.receive_maximum)),
            (Key::SnapshotMib, u64::from(self.snapshot_mib)),
            (
                Key::CommitIntervalUsec,
                u64::from(self.commit_interval_usec),
            ),
        ];
        for (key, value) in numbers {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            key.check_range(value).map_err(|p| fail(key, p))?;
        }
        if !self.ring_buffers.is_power_of_two() {
            let problem = format!("must be a power of two, got {}", self.ring_buffers);
            return Err(fail(Key::RingBuffers, problem));
        }
        check_log_level(&self.log_level).map_err(|p| fail(Key::LogLevel, p))?;
        if self.node_name.is_some() && self.cluster.is_empty() {
            return Err(fail(Key::NodeName, "needs --cluster".into()));
        }
        // The link is one more peer in a shard set of 64 (`proto::interest`).
        if !self.cluster.is_empty() && self.shards > 63 {
            let problem = format!("at most 63 with --cluster, got {}", self.shards);
            return Err(fail(Key::Shards, problem));
        }
        Ok(())
    }

    /// This node's name in a cluster: `--node-name`, or the host name and
    /// the first listen port (two nodes on one machine differ by port).
    pub fn node(&self) -> String {
        if let Some(name) = &self.node_name {
            return name.clone();
        }
        let host = crate::sys::host_name();
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(56)
            .collect();
        let port = self.listen.first().map_or(0, |a| a.port());
        format!("{host}-{port}")
    }

    /// Every MQTT listening address with what it speaks, in the order the
    /// shards open them.
    pub fn listeners(&self) -> Vec<(SocketAddr, Transport)> {
        let kinds = [
            (&self.listen, Transport::Tcp),
            (&self.tls_listen, Transport::Tls),
            (&self.ws_listen, Transport::Ws),
            (&self.wss_listen, Transport::Wss),
        ];
        kinds
            .into_iter()
            .flat_map(|(addrs, t)| addrs.iter().map(move |a| (*a, t)))
            .collect()
    }

    /// The TLS settings and listeners agree with each other; the error
    /// names the setting at fault.
    fn check_listeners(&self) -> Result<(), (Key, String)> {
        let all = self.listeners();
        for (i, (a, _)) in all.iter().enumerate() {
            if all[..i].iter().any(|(b, _)| b == a) {
                let key = match all[i].1 {
                    Transport::Tcp => Key::Listen,
                    Transport::Tls => Key::TlsListen,
                    Transport::Ws => Key::WsListen,
                    Transport::Wss => Key::WssListen,
                };
                return Err((key, format!("\"{a}\" is already a listening address")));
            }
        }
        let tls = !self.tls_listen.is_empty() || !self.wss_listen.is_empty();
        if tls {
            if self.cert.is_none() {
                return Err((
                    Key::Cert,
                    "--tls-listen and --wss-listen need a certificate".into(),
                ));
            }
            if self.key.is_none() {
                return Err((
                    Key::PrivateKey,
                    "--tls-listen and --wss-listen need a private key".into(),
                ));
            }
        } else {
            let stray = [
                (Key::Cert, self.cert.is_some()),
                (Key::PrivateKey, self.key.is_some()),
                (Key::ClientCa, self.client_ca.is_some()),
                (Key::RequireClientCert, self.require_client_cert),
                (Key::UseIdentityAsUsername, self.use_identity_as_username),
            ];
            if let Some((key, _)) = stray.into_iter().find(|(_, set)| *set) {
                return Err((
                    key,
                    "is for TLS, but there is no --tls-listen or --wss-listen".into(),
                ));
            }
        }
        if self.require_client_cert && self.client_ca.is_none() {
            return Err((
                Key::RequireClientCert,
                "needs --client-ca to verify certificates with".into(),
            ));
        }
        if self.use_identity_as_username && !self.require_client_cert {
            return Err((
                Key::UseIdentityAsUsername,
                "needs --require-client-cert (every TLS client must then have an identity)".into(),
            ));
        }
        if self.ws_path.is_some() && self.ws_listen.is_empty() && self.wss_listen.is_empty() {
            return Err((
                Key::WsPath,
                "is for WebSocket, but there is no --ws-listen or --wss-listen".into(),
            ));
        }
        Ok(())
    }

    /// File descriptors kept back from clients: each shard's io_uring rings,
    /// eventfds and one listening socket per address, plus stdio and the
    /// password file.
    pub fn fd_reserve(&self) -> u64 {
        32 + self.shards as u64 * (8 + self.listeners().len() as u64)
    }

    /// The most client connections this process can hold given its open-file
    /// limit `nofile` (see [`crate::sys::raise_nofile_limit`]) and
    /// `max_connections`.
    pub fn connection_ceiling(&self, nofile: u64) -> usize {
        let by_fds =
            usize::try_from(nofile.saturating_sub(self.fd_reserve())).unwrap_or(usize::MAX);
        match self.max_connections {
            0 => by_fds,
            n => n.min(by_fds),
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the broker (boxed: a `Config` is some 300 bytes).
    Run(Box<Config>),
    /// Edit a password file (`coremq passwd`).
    Passwd(PasswdCommand),
}

/// `coremq passwd [-c] FILE USER [--password PW]` or `coremq passwd -D FILE USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdCommand {
    /// The password file to edit.
    pub file: PathBuf,
    /// The user to add, change or delete; already checked by
    /// [`crate::auth::check_username`].
    pub user: String,
    /// What to do to that user.
    pub action: PasswdAction,
}

/// The edit `coremq passwd` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswdAction {
    /// Add the user or replace their password.
    Set {
        /// The password; `None` means read one line from stdin.
        password: Option<String>,
        /// Start a new file, replacing any that exists.
        create: bool,
        /// PBKDF2 iterations for the new hash.
        iterations: u32,
    },
    /// Remove the user.
    Delete,
}

/// Why the command line or config file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `--help` or `--version`: not a failure. Print the text to stdout and
    /// exit 0.
    Display(String),
    /// A bad flag, value or config file, in one line without the `coremq: `
    /// prefix. Exit 2.
    Invalid(String),
}

impl ConfigError {
    /// The process exit code for this outcome: 0 for help/version, 2 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Display(_) => 0,
            ConfigError::Invalid(_) => 2,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Display(text) | ConfigError::Invalid(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses the process arguments (the first is the program name) and the
/// config file they name, and validates the result.
pub fn parse_args<I, T>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(clap_error)?;
    match cli.command {
        Some(SubCommand::Passwd(p)) => passwd_command(p),
        None => run_command(cli.run).map(|c| Command::Run(Box::new(c))),
    }
}

#[cfg(test)]
mod tests;

//! The command line: clap's definition of the flags and the `passwd`
//! subcommand, and how they become a [`Command`].

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use super::values::{parse_toml, Builder, Raw};
use super::{
    Command, Config, ConfigError, Key, PasswdAction, PasswdCommand, DEFAULT_PASSWD_ITERATIONS,
};

// ---------------------------------------------------------------------------
// The command line.

/// The clap definition. Values are taken as strings and converted in
/// [`Builder::set`], so a flag and a TOML key share one error message.
#[derive(Parser, Debug)]
#[command(
    name = "coremq",
    version,
    about = "An MQTT 3.1 / 3.1.1 / 5.0 broker: thread-per-core shards on io_uring.",
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Option<SubCommand>,
    #[command(flatten)]
    pub(super) run: RunArgs,
}

#[derive(Args, Debug, Default)]
pub(super) struct RunArgs {
    /// Read settings from this TOML file (keys as the long flags, snake_case
    /// or kebab-case); flags given here override it [default: none]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Accept MQTT connections on HOST:PORT, :PORT or PORT (= 0.0.0.0:PORT);
    /// repeat for several [default: 0.0.0.0:1883]
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Number of shards, one thread pinned per core, 1..=1024 [default: number of CPUs]
    #[arg(long, value_name = "N")]
    shards: Option<String>,
    /// Socket loop: uring (io_uring with multishot accept/recv and a provided-buffer
    /// ring), epoll, or auto (io_uring when the kernel offers every operation the
    /// loop uses, else epoll, saying why in one log line) [default: auto]
    #[arg(long, value_name = "uring|epoll|auto")]
    io: Option<String>,
    /// io_uring: the most 4 KiB buffers in each shard's provided-buffer ring,
    /// a power of two up to 32768: the reads one turn of a shard's loop can
    /// take before it re-arms the rest. A ring starts with 64, doubles when a
    /// burst empties it and shrinks back (to 64 at least) once no turn for 5 s
    /// took more than a quarter of it [default: 1024]
    #[arg(long, value_name = "N")]
    ring_buffers: Option<String>,
    /// io_uring: once a shard has waited this many microseconds, it wakes for
    /// the first completion; before that, only for a batch of them (kernel
    /// 6.12+; 0 wakes for every completion) [default: 0]
    #[arg(long, value_name = "USECS")]
    ring_batch_usec: Option<String>,
    /// mosquitto-format password file (write one with `coremq passwd`) [default: none]
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// mosquitto-format ACL file: once given, only what it grants is allowed [default: none]
    #[arg(long, value_name = "FILE")]
    acl_file: Option<PathBuf>,
    /// Keep persistent sessions, the QoS 1/2 messages owed to them and
    /// retained messages in this directory (one log per shard), across
    /// restarts and crashes; acknowledgements then wait for the disk
    /// [default: none: nothing is kept]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// With --data-dir: always (one fdatasync per client read that wrote
    /// records), batch (one fdatasync per commit for every client's records
    /// gathered since the last; see --commit-interval-usec), never (write, no fdatasync: a machine crash may lose what
    /// the OS had not written; a process crash loses nothing) [default: batch]
    #[arg(long, value_name = "always|batch|never")]
    fsync: Option<String>,
    /// With --data-dir: a shard snapshots its state and drops its log once the
    /// log has grown by this many MiB since the last snapshot, 1..=65536 [default: 64]
    #[arg(long, value_name = "MIB")]
    snapshot_mib: Option<String>,
    /// With --data-dir: the least time between the starts of two log commits of
    /// a shard; under steady load each commit gathers this long's records, so
    /// fewer fdatasyncs cost less CPU, and acknowledgements wait up to this
    /// long more. 0 = the next as soon as the last is durable, 0..=100000
    /// [default: 2000]
    #[arg(long, value_name = "USEC")]
    commit_interval_usec: Option<String>,
    /// Accept MQTT over TLS (1.2 and 1.3) on HOST:PORT, :PORT or PORT; repeat
    /// for several; needs --cert and --key [default: none]
    #[arg(long, value_name = "ADDR")]
    tls_listen: Vec<String>,
    /// Accept MQTT over WebSocket (subprotocol mqtt) on HOST:PORT, :PORT or
    /// PORT; repeat for several [default: none]
    #[arg(long, value_name = "ADDR")]
    ws_listen: Vec<String>,
    /// Accept MQTT over WebSocket over TLS on HOST:PORT, :PORT or PORT;
    /// repeat for several; needs --cert and --key [default: none]
    #[arg(long, value_name = "ADDR")]
    wss_listen: Vec<String>,
    /// The only HTTP path a WebSocket upgrade may ask for (others get 404)
    /// [default: none: any path]
    #[arg(long, value_name = "PATH")]
    ws_path: Option<String>,
    /// TLS: the server's certificate chain, PEM, leaf first [default: none]
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// TLS: the server's private key, PEM (PKCS#8, SEC1 or PKCS#1) [default: none]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// TLS: verify client certificates against these CA certificates (PEM);
    /// a client may still connect without one unless --require-client-cert
    /// [default: none: no client certificates asked for]
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// TLS: refuse the handshake of a client without a certificate that
    /// --client-ca verifies [default: off]
    #[arg(long)]
    require_client_cert: bool,
    /// TLS: the client certificate's subject CN is the client's username
    /// (the CONNECT's username and password are not used; the ACL applies to
    /// the CN); needs --require-client-cert [default: off]
    #[arg(long)]
    use_identity_as_username: bool,
    /// Serve GET /metrics (Prometheus text format) and GET /healthz over HTTP
    /// on HOST:PORT, :PORT or PORT [default: none]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Join a cluster of coremq nodes through these NATS servers (JetStream
    /// enabled), nats://HOST:PORT, comma-separated or repeated
    /// [default: none: a lone node]
    #[arg(long, value_name = "URLS")]
    cluster: Vec<String>,
    /// With --cluster: this node's name, unique in the cluster, 1..=64 of
    /// A-Z a-z 0-9 _ - [default: the host name and the first --listen port]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Let clients without a username connect (true|false; alone means true)
    /// [default: true without --password-file, false with one]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<String>,
    /// Most client connections held at once; 0 = only the open-file limit [default: 0]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// Seconds a new connection has to send CONNECT, > 0 [default: 10]
    #[arg(long, value_name = "SECS")]
    connect_timeout: Option<String>,
    /// Largest packet accepted, in bytes, 2..=268435460 [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    max_packet_size: Option<String>,
    /// Seconds between counters summary log lines; 0 disables [default: 60]
    #[arg(long, value_name = "SECS")]
    stats_interval: Option<String>,
    /// Most QoS 1/2 messages in flight to one client, 1..=65535 [default: 20]
    #[arg(long, value_name = "N")]
    max_inflight: Option<String>,
    /// Most messages queued for one offline or slow session [default: 1000]
    #[arg(long, value_name = "N")]
    max_queued: Option<String>,
    /// What a QoS 1/2 message meeting a full session queue does:
    /// backpressure (it waits for room, and its publisher's PUBACK/PUBREC
    /// and reads wait with it, up to --queue-full-timeout; an offline
    /// session's full queue drops it at once), drop-newest, drop-oldest;
    /// a dropped message's MQTT 5 publisher gets reason 0x97
    /// [default: backpressure]
    #[arg(long, value_name = "POLICY")]
    queue_full: Option<String>,
    /// Seconds a message may wait for a full queue under backpressure
    /// before it is dropped as with drop-newest, 1..=3600 [default: 10]
    #[arg(long, value_name = "SECS")]
    queue_full_timeout: Option<String>,
    /// Seconds between updates of the $SYS/broker/... topics; 0 disables [default: 10]
    #[arg(long, value_name = "SECS")]
    sys_interval: Option<String>,
    /// MQTT 5 Server Keep Alive: a v5 client asking for more, or for 0, is
    /// held to this many seconds; 0 caps nothing [default: 0]
    #[arg(long, value_name = "SECS")]
    max_keepalive: Option<String>,
    /// Longest MQTT 5 Session Expiry Interval granted, in seconds;
    /// 4294967295 means sessions may never expire [default: 4294967295]
    #[arg(long, value_name = "SECS")]
    max_session_expiry: Option<String>,
    /// MQTT 5 Topic Alias Maximum offered to clients; 0 allows none [default: 65535]
    #[arg(long, value_name = "N")]
    max_topic_alias: Option<String>,
    /// MQTT 5 Receive Maximum: QoS 2 publishes of one client awaiting PUBREL
    /// at once, 1..=65535; more get DISCONNECT 0x93 [default: 1024]
    #[arg(long, value_name = "N")]
    receive_maximum: Option<String>,
    /// MQTT 5 Response Information sent to clients that request it [default: none]
    #[arg(long, value_name = "STR")]
    response_information: Option<String>,
    /// error|warn|info|debug|trace|off, or a tracing env-filter directive
    /// such as coremq=debug,info [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(super) enum SubCommand {
    /// Add, change or delete a user in a password file (mosquitto_passwd compatible)
    Passwd(PasswdArgs),
}

#[derive(Args, Debug)]
pub(super) struct PasswdArgs {
    /// Create FILE, overwriting one that exists
    #[arg(short = 'c', long)]
    create: bool,
    /// Delete USER from FILE instead of setting a password
    #[arg(short = 'D', long, conflicts_with_all = ["create", "password", "iterations"])]
    delete: bool,
    /// The password; without it one line is read from stdin (prompted, not
    /// echoed, on a terminal)
    #[arg(short = 'p', long, value_name = "PW")]
    password: Option<String>,
    /// PBKDF2-SHA512 iterations [default: 101, as mosquitto_passwd]
    #[arg(short = 'I', long, value_name = "N")]
    iterations: Option<String>,
    /// The password file
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The user name
    #[arg(value_name = "USER")]
    user: String,
}

/// Turns a clap error into one line: its message, any continuation lines
/// (clap lists missing arguments on the next lines) and its tip, without the
/// usage block.
pub(super) fn clap_error(e: clap::Error) -> ConfigError {
    use clap::error::ErrorKind;
    let text = e.render().to_string();
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return ConfigError::Display(text);
    }
    let mut line = String::new();
    for l in text.lines() {
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        let t = l.trim();
        if t.is_empty() {
            continue;
        }
        if line.is_empty() {
            line.push_str(t.strip_prefix("error: ").unwrap_or(t));
        } else if t.starts_with("tip:") {
            line.push_str("; ");
            line.push_str(t);
        } else {
            line.push(' ');
            line.push_str(t);
        }
    }
    ConfigError::Invalid(line)
}

pub(super) fn passwd_command(p: PasswdArgs) -> Result<Command, ConfigError> {
    let invalid =
        |flag: &str, problem: String| ConfigError::Invalid(format!("passwd: {flag}: {problem}"));
    crate::auth::check_username(&p.user).map_err(|e| invalid("USER", e.to_string()))?;
    let action = if p.delete {
        PasswdAction::Delete
    } else {
        let iterations = match p.iterations {
            None => DEFAULT_PASSWD_ITERATIONS,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(invalid(
                        "--iterations",
                        format!("must be between 1 and {}, got {s:?}", u32::MAX),
                    ))
                }
            },
        };
        if let Some(pw) = &p.password {
            crate::auth::check_password(pw.as_bytes())
                .map_err(|e| invalid("--password", e.to_string()))?;
        }
        PasswdAction::Set {
            password: p.password,
            create: p.create,
            iterations,
        }
    };
    Ok(Command::Passwd(PasswdCommand {
        file: p.file,
        user: p.user,
        action,
    }))
}

pub(super) fn run_command(args: RunArgs) -> Result<Config, ConfigError> {
    let mut b = Builder::default();
    if let Some(path) = &args.config {
        let label = format!("config file {}", path.display());
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Invalid(format!("{label}: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for (key, value) in
            parse_toml(&text).map_err(|p| ConfigError::Invalid(format!("{label}: {p}")))?
        {
            b.set(key, Raw::Toml { value: &value, dir }).map_err(|p| {
                ConfigError::Invalid(format!("{label}: key \"{}\": {p}", key.name()))
            })?;
        }
    }
    let list = |l: Vec<String>| (!l.is_empty()).then_some(Raw::List(l));
    let switch = |on: bool| on.then(|| Raw::Str("true".into()));
    let flags: [(Key, Option<Raw<'_>>); 39] = [
        (
            Key::Listen,
            (!args.listen.is_empty()).then(|| Raw::List(args.listen.clone())),
        ),
        (Key::Shards, args.shards.map(Raw::Str)),
        (Key::Io, args.io.map(Raw::Str)),
        (Key::RingBuffers, args.ring_buffers.map(Raw::Str)),
        (Key::RingBatchUsec, args.ring_batch_usec.map(Raw::Str)),
        (Key::PasswordFile, args.password_file.map(Raw::Path)),
        (Key::AclFile, args.acl_file.map(Raw::Path)),
        (Key::DataDir, args.data_dir.map(Raw::Path)),
        (Key::Fsync, args.fsync.map(Raw::Str)),
        (Key::SnapshotMib, args.snapshot_mib.map(Raw::Str)),
        (
            Key::CommitIntervalUsec,
            args.commit_interval_usec.map(Raw::Str),
        ),
        (Key::TlsListen, list(args.tls_listen)),
        (Key::WsListen, list(args.ws_listen)),
        (Key::WssListen, list(args.wss_listen)),
        (Key::WsPath, args.ws_path.map(Raw::Str)),
        (Key::Cert, args.cert.map(Raw::Path)),
        (Key::PrivateKey, args.key.map(Raw::Path)),
        (Key::ClientCa, args.client_ca.map(Raw::Path)),
        (Key::RequireClientCert, switch(args.require_client_cert)),
        (
            Key::UseIdentityAsUsername,
            switch(args.use_identity_as_username),
        ),
        (Key::MetricsListen, args.metrics_listen.map(Raw::Str)),
        (Key::Cluster, list(args.cluster)),
        (Key::NodeName, args.node_name.map(Raw::Str)),
        (Key::AllowAnonymous, args.allow_anonymous.map(Raw::Str)),
        (Key::MaxConnections, args.max_connections.map(Raw::Str)),
        (Key::ConnectTimeout, args.connect_timeout.map(Raw::Str)),
        (Key::MaxPacketSize, args.max_packet_size.map(Raw::Str)),
        (Key::StatsInterval, args.stats_interval.map(Raw::Str)),
        (Key::MaxInflight, args.max_inflight.map(Raw::Str)),
        (Key::MaxQueued, args.max_queued.map(Raw::Str)),
        (Key::QueueFull, args.queue_full.map(Raw::Str)),
        (Key::QueueFullTimeout, args.queue_full_timeout.map(Raw::Str)),
        (Key::SysInterval, args.sys_interval.map(Raw::Str)),
        (Key::MaxKeepalive, args.max_keepalive.map(Raw::Str)),
        (Key::MaxSessionExpiry, args.max_session_expiry.map(Raw::Str)),
        (Key::MaxTopicAlias, args.max_topic_alias.map(Raw::Str)),
        (Key::ReceiveMaximum, args.receive_maximum.map(Raw::Str)),
        (
            Key::ResponseInformation,
            args.response_information.map(Raw::Str),
        ),
        (Key::LogLevel, args.log_level.map(Raw::Str)),
    ];
    for (key, raw) in flags {
        if let Some(raw) = raw {
            b.set(key, raw)
                .map_err(|p| ConfigError::Invalid(format!("{}: {p}", key.flag())))?;
        }
    }
    let config = b.finish();
    config.validate()?;
    Ok(config)
}

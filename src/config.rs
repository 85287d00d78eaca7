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
//! password_file = "passwords"                 # relative to this file's folder
//! acl_file = "acl"                            # mosquitto's acl_file format
//! allow_anonymous = false
//! connect_timeout = 10                        # seconds
//! ```
//!
//! The range of each numeric setting is written once, in [`Key::range`]; both
//! the parser and [`Config::validate`] read it, so an error names the flag or
//! key the user actually wrote.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The port MQTT listens on when none is given (IANA-assigned, unencrypted).
pub const DEFAULT_PORT: u16 = 1883;

/// The PBKDF2 iteration count `coremq passwd` uses unless told otherwise:
/// mosquitto_passwd's default, so files stay interchangeable.
pub const DEFAULT_PASSWD_ITERATIONS: u32 = 101;

/// Everything the broker needs to start; built by [`parse_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Addresses to accept MQTT connections on; every shard binds each one
    /// with SO_REUSEPORT. Default: `[0.0.0.0:1883]`.
    pub listen: Vec<SocketAddr>,
    /// Number of shards (executor threads, one pinned per core), 1..=1024.
    /// Default: the number of CPUs this process may run on.
    pub shards: usize,
    /// mosquitto-format password file (see [`crate::auth`]). Default: none.
    pub password_file: Option<PathBuf>,
    /// mosquitto-format ACL file (see [`crate::proto::acl`]); with one, what
    /// it does not grant is refused. Default: none (everything allowed).
    pub acl_file: Option<PathBuf>,
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
    /// Most messages queued for one offline or slow session; beyond it new
    /// QoS 1/2 messages are dropped. 0 queues nothing. Default: 1000 messages.
    pub max_queued: usize,
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
            password_file: None,
            acl_file: None,
            allow_anonymous: true,
            max_connections: 0,
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1_048_576,
            stats_interval: Duration::from_secs(60),
            max_inflight: 20,
            max_queued: 1000,
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
        let numbers: [(Key, u64); 11] = [
            (Key::Shards, self.shards as u64),
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
            (Key::MaxKeepalive, u64::from(self.max_keepalive)),
            (Key::MaxSessionExpiry, u64::from(self.max_session_expiry)),
            (Key::MaxTopicAlias, u64::from(self.max_topic_alias)),
            (Key::ReceiveMaximum, u64::from(self.receive_maximum)),
        ];
        for (key, value) in numbers {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            key.check_range(value).map_err(|p| fail(key, p))?;
        }
        check_log_level(&self.log_level).map_err(|p| fail(Key::LogLevel, p))?;
        Ok(())
    }

    /// File descriptors kept back from clients: each shard's io_uring rings,
    /// eventfds and one listening socket per address, plus stdio and the
    /// password file.
    pub fn fd_reserve(&self) -> u64 {
        32 + self.shards as u64 * (8 + self.listen.len() as u64)
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
    /// Run the broker.
    Run(Config),
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
        None => run_command(cli.run).map(Command::Run),
    }
}

/// One setting: its TOML key, its flag, and its allowed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `listen`
    Listen,
    /// `shards`
    Shards,
    /// `password_file`
    PasswordFile,
    /// `acl_file`
    AclFile,
    /// `allow_anonymous`
    AllowAnonymous,
    /// `max_connections`
    MaxConnections,
    /// `connect_timeout`
    ConnectTimeout,
    /// `max_packet_size`
    MaxPacketSize,
    /// `stats_interval`
    StatsInterval,
    /// `max_inflight`
    MaxInflight,
    /// `max_queued`
    MaxQueued,
    /// `sys_interval`
    SysInterval,
    /// `max_keepalive`
    MaxKeepalive,
    /// `max_session_expiry`
    MaxSessionExpiry,
    /// `max_topic_alias`
    MaxTopicAlias,
    /// `receive_maximum`
    ReceiveMaximum,
    /// `response_information`
    ResponseInformation,
    /// `log_level`
    LogLevel,
}

impl Key {
    /// Every setting, in `--help` order.
    pub const ALL: [Key; 18] = [
        Key::Listen,
        Key::Shards,
        Key::PasswordFile,
        Key::AclFile,
        Key::AllowAnonymous,
        Key::MaxConnections,
        Key::ConnectTimeout,
        Key::MaxPacketSize,
        Key::StatsInterval,
        Key::MaxInflight,
        Key::MaxQueued,
        Key::SysInterval,
        Key::MaxKeepalive,
        Key::MaxSessionExpiry,
        Key::MaxTopicAlias,
        Key::ReceiveMaximum,
        Key::ResponseInformation,
        Key::LogLevel,
    ];

    /// The TOML key, in snake_case.
    pub fn name(self) -> &'static str {
        match self {
            Key::Listen => "listen",
            Key::Shards => "shards",
            Key::PasswordFile => "password_file",
            Key::AclFile => "acl_file",
            Key::AllowAnonymous => "allow_anonymous",
            Key::MaxConnections => "max_connections",
            Key::ConnectTimeout => "connect_timeout",
            Key::MaxPacketSize => "max_packet_size",
            Key::StatsInterval => "stats_interval",
            Key::MaxInflight => "max_inflight",
            Key::MaxQueued => "max_queued",
            Key::SysInterval => "sys_interval",
            Key::MaxKeepalive => "max_keepalive",
            Key::MaxSessionExpiry => "max_session_expiry",
            Key::MaxTopicAlias => "max_topic_alias",
            Key::ReceiveMaximum => "receive_maximum",
            Key::ResponseInformation => "response_information",
            Key::LogLevel => "log_level",
        }
    }

    /// The command-line flag, e.g. `--max-connections`.
    pub fn flag(self) -> String {
        format!("--{}", self.name().replace('_', "-"))
    }

    /// The key a TOML name refers to, in either spelling.
    pub fn from_name(name: &str) -> Option<Key> {
        let snake = name.replace('-', "_");
        Key::ALL.into_iter().find(|k| k.name() == snake)
    }

    /// Inclusive bounds of a numeric setting (`None` above means no upper
    /// bound); `None` for settings that are not numbers.
    pub fn range(self) -> Option<(i64, Option<i64>)> {
        match self {
            // Past ~1k shards the replicated filter index and mesh
            // (shards² channels) cost more than another thread gains.
            Key::Shards => Some((1, Some(1024))),
            Key::MaxConnections | Key::StatsInterval | Key::MaxQueued | Key::SysInterval => {
                Some((0, None))
            }
            Key::ConnectTimeout => Some((1, None)),
            // 2 bytes is the smallest packet (PINGREQ); 268_435_455 is the
            // largest Remaining Length plus a 5-byte fixed header (MQTT 2.2.3).
            Key::MaxPacketSize => Some((2, Some(268_435_460))),
            Key::MaxInflight | Key::ReceiveMaximum => Some((1, Some(i64::from(u16::MAX)))),
            Key::MaxKeepalive | Key::MaxTopicAlias => Some((0, Some(i64::from(u16::MAX)))),
            Key::MaxSessionExpiry => Some((0, Some(i64::from(u32::MAX)))),
            Key::Listen
            | Key::PasswordFile
            | Key::AclFile
            | Key::AllowAnonymous
            | Key::ResponseInformation
            | Key::LogLevel => None,
        }
    }

    fn check_range(self, value: i64) -> Result<i64, String> {
        let Some((min, max)) = self.range() else {
            return Ok(value);
        };
        match max {
            Some(max) if value < min || value > max => {
                Err(format!("must be between {min} and {max}, got {value}"))
            }
            None if value < min => Err(format!("must be at least {min}, got {value}")),
            _ => Ok(value),
        }
    }
}

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
struct Cli {
    #[command(subcommand)]
    command: Option<SubCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Default)]
struct RunArgs {
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
    /// mosquitto-format password file (write one with `coremq passwd`) [default: none]
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// mosquitto-format ACL file: once given, only what it grants is allowed [default: none]
    #[arg(long, value_name = "FILE")]
    acl_file: Option<PathBuf>,
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
enum SubCommand {
    /// Add, change or delete a user in a password file (mosquitto_passwd compatible)
    Passwd(PasswdArgs),
}

#[derive(Args, Debug)]
struct PasswdArgs {
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
fn clap_error(e: clap::Error) -> ConfigError {
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

fn passwd_command(p: PasswdArgs) -> Result<Command, ConfigError> {
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

fn run_command(args: RunArgs) -> Result<Config, ConfigError> {
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
    let flags: [(Key, Option<Raw<'_>>); 18] = [
        (
            Key::Listen,
            (!args.listen.is_empty()).then(|| Raw::List(args.listen.clone())),
        ),
        (Key::Shards, args.shards.map(Raw::Str)),
        (Key::PasswordFile, args.password_file.map(Raw::Path)),
        (Key::AclFile, args.acl_file.map(Raw::Path)),
        (Key::AllowAnonymous, args.allow_anonymous.map(Raw::Str)),
        (Key::MaxConnections, args.max_connections.map(Raw::Str)),
        (Key::ConnectTimeout, args.connect_timeout.map(Raw::Str)),
        (Key::MaxPacketSize, args.max_packet_size.map(Raw::Str)),
        (Key::StatsInterval, args.stats_interval.map(Raw::Str)),
        (Key::MaxInflight, args.max_inflight.map(Raw::Str)),
        (Key::MaxQueued, args.max_queued.map(Raw::Str)),
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

/// Parses the TOML text into (key, value) pairs, rejecting unknown keys and a
/// key given in both spellings.
fn parse_toml(text: &str) -> Result<Vec<(Key, toml::Value)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().trim_end().replace('\n', "; ");
        match line {
            Some(line) => format!("line {line}: {msg}"),
            None => msg,
        }
    })?;
    let mut out: Vec<(Key, toml::Value)> = Vec::with_capacity(table.len());
    for (name, value) in table {
        let Some(key) = Key::from_name(&name) else {
            let known: Vec<&str> = Key::ALL.iter().map(|k| k.name()).collect();
            return Err(format!(
                "key \"{name}\": unknown key (known: {})",
                known.join(", ")
            ));
        };
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!(
                "key \"{name}\": given twice (as {} and {})",
                key.name(),
                key.name().replace('_', "-")
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A value as one source gave it, before conversion.
enum Raw<'a> {
    /// From the config file; relative paths are taken from `dir`.
    Toml {
        value: &'a toml::Value,
        dir: &'a Path,
    },
    /// A flag's value.
    Str(String),
    /// A path flag's value (paths need not be UTF-8).
    Path(PathBuf),
    /// A repeatable flag's values.
    List(Vec<String>),
}

impl Raw<'_> {
    fn int(&self) -> Result<i64, String> {
        match self {
            Raw::Toml {
                value: toml::Value::Integer(i),
                ..
            } => Ok(*i),
            Raw::Toml { value, .. } => Err(format!("expected an integer, got {value}")),
            Raw::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {s:?}")),
            Raw::Path(p) => Err(format!("expected an integer, got {p:?}")),
            Raw::List(l) => Err(format!("expected an integer, got {l:?}")),
        }
    }

    fn string(&self) -> Result<String, String> {
        match self {
            Raw::Toml {
                value: toml::Value::String(s),
                ..
            }
            | Raw::Str(s) => Ok(s.clone()),
            Raw::Toml { value, .. } => Err(format!("expected a string, got {value}")),
            Raw::Path(p) => Ok(p.to_string_lossy().into_owned()),
            Raw::List(l) => Err(format!("expected a string, got {l:?}")),
        }
    }

    fn boolean(&self) -> Result<bool, String> {
        match self {
            Raw::Toml {
                value: toml::Value::Boolean(b),
                ..
            } => Ok(*b),
            Raw::Toml { value, .. } => Err(format!("expected true or false, got {value}")),
            Raw::Str(s) => match s.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("expected true or false, got {s:?}")),
            },
            Raw::Path(p) => Err(format!("expected true or false, got {p:?}")),
            Raw::List(l) => Err(format!("expected true or false, got {l:?}")),
        }
    }

    fn path(&self) -> Result<PathBuf, String> {
        match self {
            Raw::Toml {
                value: toml::Value::String(s),
                dir,
            } => Ok(dir.join(s)),
            Raw::Toml { value, .. } => Err(format!("expected a path string, got {value}")),
            Raw::Path(p) => Ok(p.clone()),
            Raw::Str(s) => Ok(PathBuf::from(s)),
            Raw::List(l) => Err(format!("expected a path, got {l:?}")),
        }
    }

    fn list(&self) -> Result<Vec<String>, String> {
        match self {
            Raw::Toml {
                value: toml::Value::String(s),
                ..
            } => Ok(vec![s.clone()]),
            Raw::Toml {
                value: toml::Value::Array(a),
                ..
            } => a
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(format!("expected address strings, got {other}")),
                })
                .collect(),
            Raw::Toml { value, .. } => Err(format!(
                "expected an address string or an array of them, got {value}"
            )),
            Raw::Str(s) => Ok(vec![s.clone()]),
            Raw::Path(p) => Ok(vec![p.to_string_lossy().into_owned()]),
            Raw::List(l) => Ok(l.clone()),
        }
    }
}

/// Defaults, overwritten by each source in turn.
#[derive(Default)]
struct Builder {
    config: Config,
    /// Kept apart because its default depends on `password_file`.
    allow_anonymous: Option<bool>,
}

impl Builder {
    /// Converts and checks one value; the error is the problem only, the
    /// caller says where the value came from.
    fn set(&mut self, key: Key, raw: Raw<'_>) -> Result<(), String> {
        let c = &mut self.config;
        // Every numeric key passes through its one range check here.
        let int = |raw: &Raw<'_>| raw.int().and_then(|v| key.check_range(v));
        match key {
            Key::Listen => {
                let addrs = raw
                    .list()?
                    .iter()
                    .map(|s| parse_listen(s))
                    .collect::<Result<Vec<_>, _>>()?;
                check_listen(&addrs)?;
                c.listen = addrs;
            }
            Key::Shards => c.shards = int(&raw)? as usize,
            Key::PasswordFile => {
                let p = raw.path()?;
                if p.as_os_str().is_empty() {
                    return Err("must not be empty".into());
                }
                c.password_file = Some(p);
            }
            Key::AclFile => {
                let p = raw.path()?;
                if p.as_os_str().is_empty() {
                    return Err("must not be empty".into());
                }
                c.acl_file = Some(p);
            }
            Key::AllowAnonymous => self.allow_anonymous = Some(raw.boolean()?),
            Key::MaxConnections => c.max_connections = to_usize(int(&raw)?),
            Key::ConnectTimeout => c.connect_timeout = Duration::from_secs(int(&raw)? as u64),
            Key::MaxPacketSize => c.max_packet_size = int(&raw)? as usize,
            Key::StatsInterval => c.stats_interval = Duration::from_secs(int(&raw)? as u64),
            Key::MaxInflight => c.max_inflight = int(&raw)? as u16,
            Key::MaxQueued => c.max_queued = to_usize(int(&raw)?),
            Key::SysInterval => c.sys_interval = Duration::from_secs(int(&raw)? as u64),
            Key::MaxKeepalive => c.max_keepalive = int(&raw)? as u16,
            Key::MaxSessionExpiry => c.max_session_expiry = int(&raw)? as u32,
            Key::MaxTopicAlias => c.max_topic_alias = int(&raw)? as u16,
            Key::ReceiveMaximum => c.receive_maximum = int(&raw)? as u16,
            Key::ResponseInformation => {
                let s = raw.string()?;
                if s.is_empty() || s.len() > usize::from(u16::MAX) || s.contains('\0') {
                    return Err("must be 1..=65535 bytes without NUL".into());
                }
                c.response_information = Some(s);
            }
            Key::LogLevel => {
                let s = raw.string()?;
                check_log_level(&s)?;
                c.log_level = s.trim().to_owned();
            }
        }
        Ok(())
    }

    fn finish(self) -> Config {
        let mut config = self.config;
        // mosquitto's rule: with a password file, anonymous access is off
        // unless asked for.
        config.allow_anonymous = self
            .allow_anonymous
            .unwrap_or(config.password_file.is_none());
        config
    }
}

/// A range-checked (non-negative) i64 as usize; saturates on 32-bit targets.
fn to_usize(v: i64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Parses `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`. A host name is
/// resolved now and its first address used, so the shards all bind the same
/// address.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let bad = |why: &str| format!("{s:?} is not HOST:PORT, :PORT or PORT ({why})");
    let addr = if let Ok(addr) = s.parse::<SocketAddr>() {
        addr
    } else if let Some(port) = Some(s.strip_prefix(':').unwrap_or(s))
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if host.is_empty() || host.contains(':') {
            return Err(bad("write an IPv6 address as [ADDR]:PORT"));
        }
        (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s:?}: {host:?} has no address"))?
    };
    if addr.port() == 0 {
        // Each shard binds the address itself (SO_REUSEPORT); port 0 would
        // give every shard a different port.
        return Err(format!("{s:?}: port must be between 1 and 65535"));
    }
    Ok(addr)
}

fn check_listen(addrs: &[SocketAddr]) -> Result<(), String> {
    if addrs.is_empty() {
        return Err("needs at least one address".into());
    }
    for (i, a) in addrs.iter().enumerate() {
        if a.port() == 0 {
            return Err(format!("\"{a}\": port must be between 1 and 65535"));
        }
        if addrs[..i].contains(a) {
            return Err(format!("\"{a}\" is listed twice"));
        }
    }
    Ok(())
}

/// A bare word must be a level: `EnvFilter` would take a typo such as
/// `inof` as a target name and silently log nothing.
fn check_log_level(s: &str) -> Result<(), String> {
    let s = s.trim();
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_directive = s.contains(['=', ',', '[']);
    if !is_directive && !LEVELS.contains(&s.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "expected error, warn, info, debug, trace, off or a filter directive such as \"coremq=debug,info\", got {s:?}"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map(drop)
        .map_err(|e| format!("bad filter directive {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn parse(args: &[&str]) -> Result<Command, ConfigError> {
        parse_args(std::iter::once("coremq").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> Config {
        match parse(args) {
            Ok(Command::Run(c)) => c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Err(ConfigError::Invalid(msg)) => msg,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// A config file in a fresh temp folder, removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let dir = std::env::temp_dir()
                .join(format!("coremq-config-test-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("coremq.toml");
            std::fs::File::create(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            TempFile(path)
        }
        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_args_gives_defaults() {
        let c = run(&[]);
        assert_eq!(c, Config::default());
        assert_eq!(c.listen, vec![sa("0.0.0.0:1883")]);
        assert!(c.allow_anonymous);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.max_packet_size, 1_048_576);
        assert_eq!(c.stats_interval, Duration::from_secs(60));
        assert_eq!(
            (c.max_inflight, c.max_queued, c.max_connections),
            (20, 1000, 0)
        );
        assert_eq!(c.log_level, "info");
        assert!((1..=1024).contains(&c.shards));
        c.validate().unwrap();
    }

    #[test]
    fn every_flag_is_applied() {
        let c = run(&[
            "--listen",
            "127.0.0.1:1884",
            "--listen",
            ":1885",
            "--listen",
            "1886",
            "--listen",
            "[::1]:1887",
            "--shards",
            "3",
            "--password-file",
            "/etc/pw",
            "--allow-anonymous",
            "--max-connections",
            "5000",
            "--connect-timeout",
            "3",
            "--max-packet-size",
            "4096",
            "--stats-interval",
            "0",
            "--max-inflight",
            "7",
            "--max-queued",
            "0",
            "--log-level",
            "coremq=debug,warn",
        ]);
        assert_eq!(
            c.listen,
            vec![
                sa("127.0.0.1:1884"),
                sa("0.0.0.0:1885"),
                sa("0.0.0.0:1886"),
                sa("[::1]:1887")
            ]
        );
        assert_eq!(c.shards, 3);
        assert_eq!(c.password_file, Some(PathBuf::from("/etc/pw")));
        assert!(
            c.allow_anonymous,
            "explicit flag beats the password-file default"
        );
        assert_eq!(c.max_connections, 5000);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.max_packet_size, 4096);
        assert_eq!(c.stats_interval, Duration::ZERO);
        assert_eq!((c.max_inflight, c.max_queued), (7, 0));
        assert_eq!(c.log_level, "coremq=debug,warn");
    }

    #[test]
    fn password_file_turns_anonymous_off_unless_asked() {
        assert!(!run(&["--password-file", "pw"]).allow_anonymous);
        assert!(run(&["--password-file", "pw", "--allow-anonymous", "true"]).allow_anonymous);
        assert!(!run(&["--allow-anonymous", "false"]).allow_anonymous);
        assert!(run(&["--allow-anonymous=true"]).allow_anonymous);
        assert_eq!(
            err(&["--allow-anonymous", "maybe"]),
            "--allow-anonymous: expected true or false, got \"maybe\""
        );
    }

    #[test]
    fn shards_must_be_1_to_1024() {
        assert_eq!(
            err(&["--shards", "0"]),
            "--shards: must be between 1 and 1024, got 0"
        );
        assert_eq!(
            err(&["--shards", "1025"]),
            "--shards: must be between 1 and 1024, got 1025"
        );
        assert_eq!(
            err(&["--shards", "two"]),
            "--shards: expected an integer, got \"two\""
        );
        assert_eq!(
            err(&["--shards=-1"]),
            "--shards: must be between 1 and 1024, got -1"
        );
        assert_eq!(run(&["--shards", "1024"]).shards, 1024);
        assert_eq!(run(&["--shards", "1"]).shards, 1);
    }

    #[test]
    fn connect_timeout_must_be_positive() {
        assert_eq!(
            err(&["--connect-timeout", "0"]),
            "--connect-timeout: must be at least 1, got 0"
        );
        let c = Config {
            connect_timeout: Duration::from_millis(500),
            ..Config::default()
        };
        c.validate().unwrap();
        let c = Config {
            connect_timeout: Duration::ZERO,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--connect-timeout:"));
    }

    #[test]
    fn max_packet_size_is_2_to_protocol_max() {
        assert_eq!(
            err(&["--max-packet-size", "1"]),
            "--max-packet-size: must be between 2 and 268435460, got 1"
        );
        assert_eq!(
            err(&["--max-packet-size", "268435461"]),
            "--max-packet-size: must be between 2 and 268435460, got 268435461"
        );
        assert_eq!(
            run(&["--max-packet-size", "268435460"]).max_packet_size,
            268_435_460
        );
        assert_eq!(run(&["--max-packet-size", "2"]).max_packet_size, 2);
    }

    #[test]
    fn mqtt_5_limits_parse_with_their_ranges() {
        let c = run(&[
            "--max-keepalive",
            "30",
            "--max-session-expiry",
            "4294967295",
            "--max-topic-alias",
            "0",
            "--receive-maximum",
            "65535",
            "--response-information",
            "resp/",
        ]);
        assert_eq!(
            (c.max_keepalive, c.max_session_expiry, c.max_topic_alias),
            (30, u32::MAX, 0)
        );
        assert_eq!(c.receive_maximum, 65535);
        assert_eq!(c.response_information.as_deref(), Some("resp/"));
        let d = run(&[]);
        assert_eq!(
            (d.max_keepalive, d.max_session_expiry, d.max_topic_alias),
            (0, u32::MAX, 65535)
        );
        assert_eq!((d.receive_maximum, d.response_information), (1024, None));
        assert_eq!(
            err(&["--receive-maximum", "0"]),
            "--receive-maximum: must be between 1 and 65535, got 0"
        );
        assert_eq!(
            err(&["--max-keepalive", "65536"]),
            "--max-keepalive: must be between 0 and 65535, got 65536"
        );
        assert_eq!(
            err(&["--max-session-expiry", "4294967296"]),
            "--max-session-expiry: must be between 0 and 4294967295, got 4294967296"
        );
        assert_eq!(
            err(&["--response-information", ""]),
            "--response-information: must be 1..=65535 bytes without NUL"
        );
    }

    #[test]
    fn max_inflight_is_1_to_65535() {
        assert_eq!(
            err(&["--max-inflight", "0"]),
            "--max-inflight: must be between 1 and 65535, got 0"
        );
        assert_eq!(
            err(&["--max-inflight", "65536"]),
            "--max-inflight: must be between 1 and 65535, got 65536"
        );
        assert_eq!(run(&["--max-inflight", "65535"]).max_inflight, 65535);
    }

    #[test]
    fn counts_and_intervals_may_be_zero_not_negative() {
        assert_eq!(
            err(&["--max-connections=-5"]),
            "--max-connections: must be at least 0, got -5"
        );
        assert_eq!(
            err(&["--max-queued", "x"]),
            "--max-queued: expected an integer, got \"x\""
        );
        assert_eq!(
            err(&["--stats-interval=-1"]),
            "--stats-interval: must be at least 0, got -1"
        );
    }

    #[test]
    fn listen_forms_and_errors() {
        assert_eq!(parse_listen("1883").unwrap(), sa("0.0.0.0:1883"));
        assert_eq!(parse_listen(":1883").unwrap(), sa("0.0.0.0:1883"));
        assert_eq!(parse_listen("10.1.2.3:1").unwrap(), sa("10.1.2.3:1"));
        assert_eq!(parse_listen("[::]:1883").unwrap(), sa("[::]:1883"));
        assert_eq!(parse_listen("localhost:1883").unwrap().port(), 1883);
        assert!(parse_listen("0")
            .unwrap_err()
            .contains("port must be between 1 and 65535"));
        assert!(parse_listen("1.2.3.4:70000")
            .unwrap_err()
            .contains("bad port"));
        assert!(parse_listen("1.2.3.4").unwrap_err().contains("no port"));
        assert!(parse_listen("::1:1883")
            .unwrap_err()
            .contains("[ADDR]:PORT"));
        assert_eq!(
            err(&["--listen", "1883", "--listen", ":1883"]),
            "--listen: \"0.0.0.0:1883\" is listed twice"
        );
        let e = err(&["--listen", "nope"]);
        assert!(e.starts_with("--listen: \"nope\" is not HOST:PORT"), "{e}");
    }

    #[test]
    fn log_level_must_be_a_level_or_directive() {
        assert_eq!(run(&["--log-level", "debug"]).log_level, "debug");
        assert_eq!(run(&["--log-level", "WARN"]).log_level, "WARN");
        let e = err(&["--log-level", "inof"]);
        assert!(e.starts_with("--log-level: expected error, warn,"), "{e}");
        let e = err(&["--log-level", "coremq=loud"]);
        assert!(e.starts_with("--log-level: bad filter directive"), "{e}");
    }

    #[test]
    fn good_toml_file_in_both_spellings() {
        let f = TempFile::new(
            "good",
            r#"
            # a comment
            listen = ["127.0.0.1:1883", ":1884"]
            shards = 2
            allow-anonymous = false
            max_connections = 100
            connect-timeout = 5
            max_packet_size = 65536
            stats-interval = 10
            max_inflight = 10
            max-queued = 50
            log_level = "debug"
            password_file = "pw"
            "#,
        );
        let c = run(&["--config", f.arg()]);
        assert_eq!(c.listen, vec![sa("127.0.0.1:1883"), sa("0.0.0.0:1884")]);
        assert_eq!(c.shards, 2);
        assert!(!c.allow_anonymous);
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.max_packet_size, 65536);
        assert_eq!(c.stats_interval, Duration::from_secs(10));
        assert_eq!((c.max_inflight, c.max_queued), (10, 50));
        assert_eq!(c.log_level, "debug");
        // Relative to the config file's folder, not the working directory.
        assert_eq!(c.password_file, Some(f.0.parent().unwrap().join("pw")));
    }

    #[test]
    fn flags_override_the_file() {
        let f = TempFile::new(
            "override",
            "listen = \"127.0.0.1:1999\"\nshards = 2\npassword_file = \"/pw\"\n",
        );
        let c = run(&["--config", f.arg(), "--shards", "4", "--listen", "2000"]);
        assert_eq!(c.shards, 4);
        assert_eq!(
            c.listen,
            vec![sa("0.0.0.0:2000")],
            "flag list replaces the file's"
        );
        assert_eq!(c.password_file, Some(PathBuf::from("/pw")));
        assert!(
            !c.allow_anonymous,
            "password file from the config still sets the default"
        );
        let c = run(&["--config", f.arg(), "--allow-anonymous"]);
        assert!(c.allow_anonymous);
    }

    #[test]
    fn toml_unknown_key_is_an_error() {
        let f = TempFile::new("unknown", "shards = 2\nmax_conections = 5\n");
        let e = err(&["--config", f.arg()]);
        assert!(
            e.starts_with(&format!(
                "config file {}: key \"max_conections\": unknown key (known: listen, shards,",
                f.arg()
            )),
            "{e}"
        );
    }

    #[test]
    fn toml_wrong_type_is_an_error() {
        let f = TempFile::new("type", "shards = \"two\"\n");
        assert_eq!(
            err(&["--config", f.arg()]),
            format!(
                "config file {}: key \"shards\": expected an integer, got \"two\"",
                f.arg()
            )
        );
        let f = TempFile::new("type2", "allow_anonymous = 1\n");
        assert_eq!(
            err(&["--config", f.arg()]),
            format!(
                "config file {}: key \"allow_anonymous\": expected true or false, got 1",
                f.arg()
            )
        );
        let f = TempFile::new("type3", "listen = [1883]\n");
        assert_eq!(
            err(&["--config", f.arg()]),
            format!(
                "config file {}: key \"listen\": expected address strings, got 1883",
                f.arg()
            )
        );
    }

    #[test]
    fn toml_out_of_range_value_is_an_error() {
        let f = TempFile::new("range", "max-packet-size = 1\n");
        assert_eq!(
            err(&["--config", f.arg()]),
            format!(
                "config file {}: key \"max_packet_size\": must be between 2 and 268435460, got 1",
                f.arg()
            )
        );
        let f = TempFile::new("range2", "listen = []\n");
        assert_eq!(
            err(&["--config", f.arg()]),
            format!(
                "config file {}: key \"listen\": needs at least one address",
                f.arg()
            )
        );
    }

    #[test]
    fn toml_key_in_both_spellings_is_an_error() {
        let f = TempFile::new("twice", "max_queued = 1\nmax-queued = 2\n");
        let e = err(&["--config", f.arg()]);
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn toml_syntax_error_names_the_line() {
        let f = TempFile::new("syntax", "shards = 2\nlisten = [\n");
        let e = err(&["--config", f.arg()]);
        assert!(
            e.starts_with(&format!("config file {}: line ", f.arg())),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn missing_config_file_names_path_and_os_error() {
        let e = err(&["--config", "/nonexistent/coremq.toml"]);
        assert_eq!(
            e,
            "config file /nonexistent/coremq.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn clap_errors_are_one_line_and_exit_2() {
        let e = parse(&["--shard", "2"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.starts_with("unexpected argument '--shard' found"),
            "{msg}"
        );
        let msg = parse(&["passwd", "f"]).unwrap_err().to_string();
        assert!(msg.contains("<USER>") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn help_and_version_are_not_errors() {
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let text = help.to_string();
        for key in Key::ALL {
            assert!(text.contains(&key.flag()), "help lacks {}", key.flag());
        }
        // The defaults written in the help text match Config::default().
        let d = Config::default();
        for default in [
            format!("[default: {}]", d.listen[0]),
            format!("[default: {}]", d.connect_timeout.as_secs()),
            format!("[default: {}]", d.max_packet_size),
            format!("[default: {}]", d.stats_interval.as_secs()),
            format!("[default: {}]", d.max_inflight),
            format!("[default: {}]", d.max_queued),
            format!("[default: {}]", d.max_connections),
            format!("[default: {}]", d.max_session_expiry),
            format!("[default: {}]", d.max_topic_alias),
            format!("[default: {}]", d.receive_maximum),
            format!("[default: {}]", d.log_level),
        ] {
            assert!(text.contains(&default), "help lacks {default}");
        }
        let v = parse(&["--version"]).unwrap_err();
        assert_eq!(v.exit_code(), 0);
        assert!(v.to_string().contains(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn passwd_subcommand_forms() {
        let p = |args: &[&str]| match parse(args) {
            Ok(Command::Passwd(p)) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            p(&["passwd", "-c", "f", "alice", "--password", "pw"]),
            PasswdCommand {
                file: "f".into(),
                user: "alice".into(),
                action: PasswdAction::Set {
                    password: Some("pw".into()),
                    create: true,
                    iterations: DEFAULT_PASSWD_ITERATIONS
                },
            }
        );
        assert_eq!(
            p(&["passwd", "-D", "f", "alice"]).action,
            PasswdAction::Delete
        );
        assert_eq!(
            p(&["passwd", "--delete", "f", "alice"]).action,
            PasswdAction::Delete
        );
        assert_eq!(
            p(&["passwd", "-I", "1000", "f", "bob"]).action,
            PasswdAction::Set {
                password: None,
                create: false,
                iterations: 1000
            }
        );
        assert_eq!(
            err(&["passwd", "f", "a:b"]),
            "passwd: USER: user name must not contain ':'"
        );
        assert_eq!(
            err(&["passwd", "-I", "0", "f", "bob"]),
            "passwd: --iterations: must be between 1 and 4294967295, got \"0\""
        );
        assert!(err(&["passwd", "-D", "-c", "f", "bob"]).contains("cannot be used with"));
        assert_eq!(
            err(&["--shards", "2", "passwd", "f", "bob"]),
            "the subcommand 'passwd' cannot be used with '--shards <N>'"
        );
    }

    #[test]
    fn connection_ceiling_keeps_a_reserve() {
        let c = Config {
            shards: 2,
            ..Config::default()
        };
        let reserve = c.fd_reserve();
        assert_eq!(reserve, 32 + 2 * 9);
        assert_eq!(c.connection_ceiling(20_000), 20_000 - reserve as usize);
        assert_eq!(c.connection_ceiling(10), 0);
        let c = Config {
            max_connections: 100,
            ..c
        };
        assert_eq!(c.connection_ceiling(20_000), 100);
        let c = Config {
            max_connections: 50_000,
            ..c
        };
        assert_eq!(c.connection_ceiling(20_000), 20_000 - reserve as usize);
    }
}

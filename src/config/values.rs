//! Values from a flag or the TOML file, converted and checked one key at a
//! time into a [`Config`]; the TOML file's format.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, Key};

/// Parses the TOML text into (key, value) pairs, rejecting unknown keys and a
/// key given in both spellings.
pub(super) fn parse_toml(text: &str) -> Result<Vec<(Key, toml::Value)>, String> {
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
pub(super) enum Raw<'a> {
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
pub(super) struct Builder {
    config: Config,
    /// Kept apart because its default depends on `password_file`.
    allow_anonymous: Option<bool>,
}

impl Builder {
    /// Converts and checks one value; the error is the problem only, the
    /// caller says where the value came from.
    pub(super) fn set(&mut self, key: Key, raw: Raw<'_>) -> Result<(), String> {
        let c = &mut self.config;
        // Every numeric key passes through its one range check here.
        let int = |raw: &Raw<'_>| raw.int().and_then(|v| key.check_range(v));
        match key {
            Key::Listen | Key::TlsListen | Key::WsListen | Key::WssListen => {
                let addrs = raw
                    .list()?
                    .iter()
                    .map(|s| parse_listen(s))
                    .collect::<Result<Vec<_>, _>>()?;
                check_listen(&addrs)?;
                match key {
                    Key::Listen => c.listen = addrs,
                    Key::TlsListen => c.tls_listen = addrs,
                    Key::WsListen => c.ws_listen = addrs,
                    _ => c.wss_listen = addrs,
                }
            }
            Key::WsPath => {
                let p = raw.string()?;
                if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace()) {
                    return Err(format!("must start with / and have no spaces, got {p:?}"));
                }
                c.ws_path = Some(p);
            }
            Key::Cert | Key::PrivateKey | Key::ClientCa => {
                let p = raw.path()?;
                if p.as_os_str().is_empty() {
                    return Err("must not be empty".into());
                }
                match key {
                    Key::Cert => c.cert = Some(p),
                    Key::PrivateKey => c.key = Some(p),
                    _ => c.client_ca = Some(p),
                }
            }
            Key::RequireClientCert => c.require_client_cert = raw.boolean()?,
            Key::UseIdentityAsUsername => c.use_identity_as_username = raw.boolean()?,
            Key::MetricsListen => {
                let addr = parse_listen(&raw.string()?)?;
                check_listen(&[addr])?;
                c.metrics_listen = Some(addr);
            }
            Key::Cluster => {
                let mut urls = Vec::new();
                for item in raw.list()? {
                    for url in item.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                        urls.push(parse_nats_url(url)?);
                    }
                }
                if urls.is_empty() {
                    return Err("needs at least one NATS server URL".into());
                }
                c.cluster = urls;
            }
            Key::NodeName => {
                let name = raw.string()?;
                check_node_name(&name)?;
                c.node_name = Some(name);
            }
            Key::Shards => c.shards = int(&raw)? as usize,
            Key::Io => c.io = raw.string()?.parse()?,
            Key::RingBuffers => {
                let n = int(&raw)?;
                if !(n as u64).is_power_of_two() {
                    return Err(format!("must be a power of two, got {n}"));
                }
                c.ring_buffers = n as u16;
            }
            Key::RingBatchUsec => c.ring_batch_usec = int(&raw)? as u32,
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
            Key::DataDir => {
                let p = raw.path()?;
                if p.as_os_str().is_empty() {
                    return Err("must not be empty".into());
                }
                c.data_dir = Some(p);
            }
            Key::Fsync => c.fsync = raw.string()?.parse()?,
            Key::SnapshotMib => c.snapshot_mib = int(&raw)? as u32,
            Key::CommitIntervalUsec => c.commit_interval_usec = int(&raw)? as u32,
            Key::AllowAnonymous => self.allow_anonymous = Some(raw.boolean()?),
            Key::MaxConnections => c.max_connections = to_usize(int(&raw)?),
            Key::ConnectTimeout => c.connect_timeout = Duration::from_secs(int(&raw)? as u64),
            Key::MaxPacketSize => c.max_packet_size = int(&raw)? as usize,
            Key::StatsInterval => c.stats_interval = Duration::from_secs(int(&raw)? as u64),
            Key::MaxInflight => c.max_inflight = int(&raw)? as u16,
            Key::MaxQueued => c.max_queued = to_usize(int(&raw)?),
            Key::QueueFull => c.queue_full = raw.string()?.parse()?,
            Key::QueueFullTimeout => c.queue_full_timeout = Duration::from_secs(int(&raw)? as u64),
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

    pub(super) fn finish(self) -> Config {
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
pub(super) fn to_usize(v: i64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Parses `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT`. A host name is
/// resolved now and its first address used, so the shards all bind the same
/// address.
pub(super) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
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

pub(super) fn check_listen(addrs: &[SocketAddr]) -> Result<(), String> {
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

/// A NATS server as `nats://HOST:PORT` or `HOST:PORT` (nats:// assumed).
pub(super) fn parse_nats_url(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("nats://").unwrap_or(s);
    let bad = |why: &str| format!("{s:?} is not nats://HOST:PORT ({why})");
    if rest.contains("://") {
        return Err(bad("only nats:// is supported"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
        return Err(bad("bad host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("nats://{rest}")),
        _ => Err(bad("bad port")),
    }
}

/// A node name is a token of NATS subjects: 1..=64 of A-Z a-z 0-9 _ -.
pub(super) fn check_node_name(s: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("must be 1 to 64 of A-Z a-z 0-9 _ -, got {s:?}"))
    }
}

/// A bare word must be a level: `EnvFilter` would take a typo such as
/// `inof` as a target name and silently log nothing.
pub(super) fn check_log_level(s: &str) -> Result<(), String> {
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

//! Every setting's TOML key, its flag, and the range of a numeric one,
//! written once: the parser and [`super::Config::validate`] both read it.

/// One setting: its TOML key, its flag, and its allowed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `listen`
    Listen,
    /// `shards`
    Shards,
    /// `io`
    Io,
    /// `ring_buffers`
    RingBuffers,
    /// `ring_batch_usec`
    RingBatchUsec,
    /// `password_file`
    PasswordFile,
    /// `acl_file`
    AclFile,
    /// `data_dir`
    DataDir,
    /// `fsync`
    Fsync,
    /// `snapshot_mib`
    SnapshotMib,
    /// `commit_interval_usec`
    CommitIntervalUsec,
    /// `tls_listen`
    TlsListen,
    /// `ws_listen`
    WsListen,
    /// `wss_listen`
    WssListen,
    /// `ws_path`
    WsPath,
    /// `cert`
    Cert,
    /// `key`
    PrivateKey,
    /// `client_ca`
    ClientCa,
    /// `require_client_cert`
    RequireClientCert,
    /// `use_identity_as_username`
    UseIdentityAsUsername,
    /// `metrics_listen`
    MetricsListen,
    /// `cluster`
    Cluster,
    /// `node_name`
    NodeName,
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
    /// `queue_full`
    QueueFull,
    /// `queue_full_timeout`
    QueueFullTimeout,
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
    pub const ALL: [Key; 39] = [
        Key::Listen,
        Key::Shards,
        Key::Io,
        Key::RingBuffers,
        Key::RingBatchUsec,
        Key::PasswordFile,
        Key::AclFile,
        Key::DataDir,
        Key::Fsync,
        Key::SnapshotMib,
        Key::CommitIntervalUsec,
        Key::TlsListen,
        Key::WsListen,
        Key::WssListen,
        Key::WsPath,
        Key::Cert,
        Key::PrivateKey,
        Key::ClientCa,
        Key::RequireClientCert,
        Key::UseIdentityAsUsername,
        Key::MetricsListen,
        Key::Cluster,
        Key::NodeName,
        Key::AllowAnonymous,
        Key::MaxConnections,
        Key::ConnectTimeout,
        Key::MaxPacketSize,
        Key::StatsInterval,
        Key::MaxInflight,
        Key::MaxQueued,
        Key::QueueFull,
        Key::QueueFullTimeout,
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
            Key::Io => "io",
            Key::RingBuffers => "ring_buffers",
            Key::RingBatchUsec => "ring_batch_usec",
            Key::PasswordFile => "password_file",
            Key::AclFile => "acl_file",
            Key::DataDir => "data_dir",
            Key::Fsync => "fsync",
            Key::SnapshotMib => "snapshot_mib",
            Key::CommitIntervalUsec => "commit_interval_usec",
            Key::TlsListen => "tls_listen",
            Key::WsListen => "ws_listen",
            Key::WssListen => "wss_listen",
            Key::WsPath => "ws_path",
            Key::Cert => "cert",
            Key::PrivateKey => "key",
            Key::ClientCa => "client_ca",
            Key::RequireClientCert => "require_client_cert",
            Key::UseIdentityAsUsername => "use_identity_as_username",
            Key::MetricsListen => "metrics_listen",
            Key::Cluster => "cluster",
            Key::NodeName => "node_name",
            Key::AllowAnonymous => "allow_anonymous",
            Key::MaxConnections => "max_connections",
            Key::ConnectTimeout => "connect_timeout",
            Key::MaxPacketSize => "max_packet_size",
            Key::StatsInterval => "stats_interval",
            Key::MaxInflight => "max_inflight",
            Key::MaxQueued => "max_queued",
            Key::QueueFull => "queue_full",
            Key::QueueFullTimeout => "queue_full_timeout",
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
            // Past an hour a held publisher would have given up long
            // before; 0 would make backpressure a drop.
            Key::QueueFullTimeout => Some((1, Some(3600))),
            // The kernel's limit for one provided-buffer ring.
            Key::RingBuffers => Some((1, Some(32_768))),
            // Past 10 ms a batch would hold a reply back longer than a
            // client's round trip is worth.
            Key::RingBatchUsec => Some((0, Some(10_000))),
            // 2 bytes is the smallest packet (PINGREQ); 268_435_455 is the
            // largest Remaining Length plus a 5-byte fixed header (MQTT 2.2.3).
            Key::MaxPacketSize => Some((2, Some(268_435_460))),
            Key::MaxInflight | Key::ReceiveMaximum => Some((1, Some(i64::from(u16::MAX)))),
            Key::MaxKeepalive | Key::MaxTopicAlias => Some((0, Some(i64::from(u16::MAX)))),
            Key::MaxSessionExpiry => Some((0, Some(i64::from(u32::MAX)))),
            // 1 MiB .. 64 GiB of log between snapshots.
            Key::SnapshotMib => Some((1, Some(65_536))),
            // Past 100 ms an acknowledgement would wait longer than any
            // client's retry is worth.
            Key::CommitIntervalUsec => Some((0, Some(100_000))),
            Key::Listen
            | Key::TlsListen
            | Key::WsListen
            | Key::WssListen
            | Key::WsPath
            | Key::Cert
            | Key::PrivateKey
            | Key::ClientCa
            | Key::RequireClientCert
            | Key::UseIdentityAsUsername
            | Key::MetricsListen
            | Key::Cluster
            | Key::NodeName
            | Key::Io
            | Key::PasswordFile
            | Key::AclFile
            | Key::DataDir
            | Key::Fsync
            | Key::QueueFull
            | Key::AllowAnonymous
            | Key::ResponseInformation
            | Key::LogLevel => None,
        }
    }

    pub(super) fn check_range(self, value: i64) -> Result<i64, String> {
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

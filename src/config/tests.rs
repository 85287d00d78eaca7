use super::values::parse_listen;
use super::*;
use std::io::Write;

fn parse(args: &[&str]) -> Result<Command, ConfigError> {
    parse_args(std::iter::once("coremq").chain(args.iter().copied()))
}

fn run(args: &[&str]) -> Config {
    match parse(args) {
        Ok(Command::Run(c)) => *c,
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
        let dir =
            std::env::temp_dir().join(format!("coremq-config-test-{}-{name}", std::process::id()));
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

#[test]
fn io_loop_and_ring_buffers_from_flags_and_file() {
    let d = run(&[]);
    assert_eq!(
        (d.io, d.ring_buffers, d.ring_batch_usec),
        (IoMode::Auto, 1024, 0)
    );
    let c = run(&[
        "--io",
        "epoll",
        "--ring-buffers",
        "4",
        "--ring-batch-usec",
        "200",
    ]);
    assert_eq!(
        (c.io, c.ring_buffers, c.ring_batch_usec),
        (IoMode::Epoll, 4, 200)
    );
    assert_eq!(
        err(&["--ring-batch-usec", "10001"]),
        "--ring-batch-usec: must be between 0 and 10000, got 10001"
    );
    assert_eq!(run(&["--io", "uring"]).io, IoMode::Uring);
    let f = TempFile::new("io", "io = \"uring\"\nring-buffers = 32768\n");
    let c = run(&["--config", f.arg()]);
    assert_eq!((c.io, c.ring_buffers), (IoMode::Uring, 32768));
    // The flag wins over the file.
    assert_eq!(run(&["--config", f.arg(), "--io", "auto"]).io, IoMode::Auto);
    assert_eq!(
        err(&["--io", "kqueue"]),
        "--io: must be uring, epoll or auto, got \"kqueue\""
    );
    assert_eq!(
        err(&["--ring-buffers", "1000"]),
        "--ring-buffers: must be a power of two, got 1000"
    );
    assert_eq!(
        err(&["--ring-buffers", "0"]),
        "--ring-buffers: must be between 1 and 32768, got 0"
    );
    let bad = Config {
        ring_buffers: 3,
        ..Config::default()
    };
    assert!(bad.validate().is_err());
}

#[test]
fn data_dir_fsync_and_snapshot_size_from_flags_and_file() {
    let d = run(&[]);
    assert_eq!(
        (
            d.data_dir.clone(),
            d.fsync,
            d.snapshot_mib,
            d.commit_interval_usec
        ),
        (None, FsyncMode::Batch, 64, 2000)
    );
    let c = run(&[
        "--data-dir",
        "/var/lib/coremq",
        "--fsync",
        "always",
        "--snapshot-mib",
        "8",
        "--commit-interval-usec",
        "0",
    ]);
    assert_eq!(
        (c.data_dir, c.fsync, c.snapshot_mib, c.commit_interval_usec),
        (
            Some(PathBuf::from("/var/lib/coremq")),
            FsyncMode::Always,
            8,
            0
        )
    );
    // A relative data_dir in a file is relative to the file's folder.
    let f = TempFile::new(
        "data",
        "data_dir = \"state\"\nfsync = \"never\"\ncommit_interval_usec = 500\n",
    );
    let c = run(&["--config", f.arg()]);
    let folder = std::path::Path::new(f.arg()).parent().unwrap();
    assert_eq!(c.data_dir, Some(folder.join("state")));
    assert_eq!(c.fsync, FsyncMode::Never);
    assert_eq!(c.commit_interval_usec, 500);
    assert_eq!(
        err(&["--commit-interval-usec", "100001"]),
        "--commit-interval-usec: must be between 0 and 100000, got 100001"
    );
    assert_eq!(
        err(&["--fsync", "sometimes"]),
        "--fsync: must be always, batch or never, got \"sometimes\""
    );
    assert_eq!(
        err(&["--snapshot-mib", "0"]),
        "--snapshot-mib: must be between 1 and 65536, got 0"
    );
    assert_eq!(
        err(&["--data-dir", ""]),
        "a value is required for '--data-dir <DIR>' but none was supplied"
    );
}

/// `tuning/coremq.toml`, the example every operator starts from: it names
/// every setting (set, or commented out where the default is none or
/// depends on the machine), and loading it changes nothing.
#[test]
fn the_example_toml_names_every_key_at_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/coremq.toml");
    let text = std::fs::read_to_string(path).unwrap();
    // `key = value`, or `# key = value` (commented out); not prose.
    let setting = |l: &str| {
        let l = l.strip_prefix("# ").unwrap_or(l);
        l.split_once(" = ")
            .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map(|(k, _)| k.to_string())
    };
    let named: Vec<String> = text.lines().filter_map(setting).collect();
    for key in Key::ALL {
        assert!(
            named.iter().any(|n| n == key.name()),
            "tuning/coremq.toml does not name {}",
            key.name()
        );
    }
    for n in &named {
        assert!(
            Key::from_name(n).is_some(),
            "tuning/coremq.toml names {n}, no such key"
        );
    }
    assert_eq!(run(&["--config", path]), Config::default());
    // Every commented-out example is a valid value too.
    let uncommented: String = text
        .lines()
        .map(|l| match setting(l) {
            Some(_) => l.strip_prefix("# ").unwrap_or(l),
            None => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let f = TempFile::new("example", &uncommented);
    let all = run(&["--config", f.arg()]);
    assert_eq!(all.shards, 8);
    assert!(all.metrics_listen.is_some() && all.data_dir.is_some());
}

#[test]
fn tls_and_websocket_settings_must_agree() {
    let tls = ["--tls-listen", "8883", "--cert", "s.pem", "--key", "s.key"];
    let c = run(&[
        &tls[..],
        &[
            "--wss-listen",
            "127.0.0.1:9443",
            "--ws-listen",
            "9001",
            "--ws-path",
            "/mqtt",
            "--client-ca",
            "ca.pem",
            "--require-client-cert",
            "--use-identity-as-username",
        ],
    ]
    .concat());
    assert_eq!(c.tls_listen, vec![sa("0.0.0.0:8883")]);
    assert_eq!(c.wss_listen, vec![sa("127.0.0.1:9443")]);
    assert_eq!(c.ws_listen, vec![sa("0.0.0.0:9001")]);
    assert_eq!(c.ws_path.as_deref(), Some("/mqtt"));
    assert!(c.require_client_cert && c.use_identity_as_username);
    assert_eq!(
        c.listeners().iter().map(|(_, t)| *t).collect::<Vec<_>>(),
        [
            Transport::Tcp,
            Transport::Tls,
            Transport::Ws,
            Transport::Wss
        ]
    );

    assert_eq!(
        err(&["--tls-listen", "8883"]),
        "--cert: --tls-listen and --wss-listen need a certificate"
    );
    assert_eq!(
        err(&["--wss-listen", "9443", "--cert", "s.pem"]),
        "--key: --tls-listen and --wss-listen need a private key"
    );
    assert_eq!(
        err(&["--cert", "s.pem"]),
        "--cert: is for TLS, but there is no --tls-listen or --wss-listen"
    );
    assert_eq!(
        err(&[&tls[..], &["--require-client-cert"]].concat()),
        "--require-client-cert: needs --client-ca to verify certificates with"
    );
    assert!(err(&[
        &tls[..],
        &["--client-ca", "ca.pem", "--use-identity-as-username"]
    ]
    .concat())
    .starts_with("--use-identity-as-username: needs --require-client-cert"));
    assert_eq!(
        err(&["--ws-path", "/mqtt"]),
        "--ws-path: is for WebSocket, but there is no --ws-listen or --wss-listen"
    );
    assert!(err(&["--ws-listen", "9001", "--ws-path", "mqtt"])
        .starts_with("--ws-path: must start with /"));
    assert_eq!(
        err(&["--listen", "1883", "--ws-listen", "1883"]),
        "--ws-listen: \"0.0.0.0:1883\" is already a listening address"
    );
}

#[test]
fn queue_full_policy_and_timeout_from_flags_and_file() {
    let d = run(&[]);
    assert_eq!(
        (d.queue_full, d.queue_full_timeout),
        (QueueFull::Backpressure, Duration::from_secs(10))
    );
    let c = run(&["--queue-full", "drop-oldest", "--queue-full-timeout", "3"]);
    assert_eq!(
        (c.queue_full, c.queue_full_timeout),
        (QueueFull::DropOldest, Duration::from_secs(3))
    );
    let f = TempFile::new(
        "queue-full",
        "queue_full = \"drop-newest\"\nqueue-full-timeout = 60\n",
    );
    let c = run(&["--config", f.arg()]);
    assert_eq!(
        (c.queue_full, c.queue_full_timeout),
        (QueueFull::DropNewest, Duration::from_secs(60))
    );
    assert_eq!(
        err(&["--queue-full", "block"]),
        "--queue-full: must be backpressure, drop-newest or drop-oldest, got \"block\""
    );
    assert_eq!(
        err(&["--queue-full-timeout", "0"]),
        "--queue-full-timeout: must be between 1 and 3600, got 0"
    );
}

#[test]
fn cluster_servers_and_node_name_from_flags_and_file() {
    let c = run(&[
        "--cluster",
        "10.0.0.1:4222,nats://10.0.0.2:4222",
        "--cluster",
        "nats://h3:4222",
        "--node-name",
        "broker-1",
    ]);
    assert_eq!(
        c.cluster,
        [
            "nats://10.0.0.1:4222",
            "nats://10.0.0.2:4222",
            "nats://h3:4222"
        ]
    );
    assert_eq!(c.node(), "broker-1");
    let f = TempFile::new("cluster", "cluster = [\"n1:4222\"]\nnode_name = \"x_2\"\n");
    let c = run(&["--config", f.arg()]);
    assert_eq!(
        (c.cluster, c.node_name),
        (vec!["nats://n1:4222".to_string()], Some("x_2".into()))
    );
    // Without --node-name: the host name and the first listen port.
    let c = run(&["--cluster", "n1:4222", "--listen", "127.0.0.1:1999"]);
    assert!(c.node().ends_with("-1999"), "{}", c.node());
    assert_eq!(
        err(&["--cluster", "tls://n1:4222"]),
        "--cluster: \"tls://n1:4222\" is not nats://HOST:PORT (only nats:// is supported)"
    );
    assert_eq!(
        err(&["--cluster", "n1"]),
        "--cluster: \"n1\" is not nats://HOST:PORT (no port)"
    );
    assert_eq!(
        err(&["--cluster", "n1:4222", "--node-name", "a.b"]),
        "--node-name: must be 1 to 64 of A-Z a-z 0-9 _ -, got \"a.b\""
    );
    assert_eq!(err(&["--node-name", "a"]), "--node-name: needs --cluster");
    assert_eq!(
        err(&["--cluster", "n1:4222", "--shards", "64"]),
        "--shards: at most 63 with --cluster, got 64"
    );
}

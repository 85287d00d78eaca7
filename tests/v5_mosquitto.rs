//! MQTT 5 with the real mosquitto_pub / mosquitto_sub / mosquitto_rr
//! (`-V mqttv5`, properties set with `-D`, printed with `-F` specifiers)
//! against coremq on 4 shards: forwarded properties, session and message
//! expiry, subscription identifiers, Retain As Published, server topic
//! aliases, request / response, and will properties and delay.
//!
//! mosquitto_sub 2.0 has no option for No Local or Retain Handling; those are
//! covered in `v5_mqttjs.rs`.

mod common;
mod v5_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{mosquitto_sub_ready, next_message_line, run_bounded, tools, LineProc};
use v5_support::{ids_on_distinct_shards, Server};

const SEC: Duration = Duration::from_secs(1);

fn pub_cmd(port: u16) -> Command {
    let mut c = Command::new(&tools().mosquitto_pub);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"]);
    c
}

fn sub_cmd(port: u16) -> Command {
    let mut c = Command::new(&tools().mosquitto_sub);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"]);
    c
}

/// mosquitto_pub -V mqttv5 with `args`; asserts it exits 0.
fn pub5(port: u16, args: &[&str]) {
    let (code, out, err) = run_bounded(pub_cmd(port).args(args), 10 * SEC);
    assert_eq!(code, Some(0), "mosquitto_pub {args:?}: {out}{err}");
}

/// A `mosquitto_sub -V mqttv5 ARGS` that has its SUBACK.
fn sub5(port: u16, args: &[&str]) -> LineProc {
    let mut all = vec!["-V", "mqttv5"];
    all.extend_from_slice(args);
    mosquitto_sub_ready(port, &all)
}

/// A one-shot `mosquitto_sub -V mqttv5 ARGS` (give it -C / -W): its exit
/// code and stdout lines.
fn sub5_run(port: u16, args: &[&str], limit: Duration) -> (Option<i32>, Vec<String>) {
    let (code, out, err) = run_bounded(sub_cmd(port).args(args), limit);
    assert!(
        matches!(code, Some(0) | Some(27)),
        "mosquitto_sub {args:?} exited {code:?}: {out}{err}"
    );
    (code, out.lines().map(str::to_string).collect())
}

/// The next message line of a `sub5`, or a panic naming `what`.
fn next_msg(p: &mut LineProc, what: &str) -> String {
    next_message_line(p, 5 * SEC).unwrap_or_else(|| {
        panic!(
            "no message ({what}) within 5 s; stdout {:?}; stderr {}",
            p.seen,
            p.stderr()
        )
    })
}

// ------------------------------------------------------------- properties

#[test]
fn user_properties_forwarded_in_order_mqtt_3_3_2_17_18() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-userprop", 2);
    let mut sub = sub5(
        port,
        &["-i", &ids[0], "-q", "1", "-t", "mq5/up/#", "-F", "%t|%p|%P"],
    );
    // Repeated and interleaved keys, and a value with a colon.
    pub5(
        port,
        &[
            "-i",
            &ids[1],
            "-q",
            "1",
            "-t",
            "mq5/up/a",
            "-m",
            "hello",
            "-D",
            "publish",
            "user-property",
            "k1",
            "v1",
            "-D",
            "publish",
            "user-property",
            "k2",
            "v2",
            "-D",
            "publish",
            "user-property",
            "k1",
            "v3",
            "-D",
            "publish",
            "user-property",
            "a",
            "x:y",
            "-D",
            "publish",
            "user-property",
            "k1",
            "v1",
        ],
    );
    assert_eq!(
        next_msg(&mut sub, "user properties"),
        "mq5/up/a|hello|k1:v1 k2:v2 k1:v3 a:x:y k1:v1"
    );
    // At QoS 0 too, and none on a message that had none.
    pub5(
        port,
        &[
            "-i",
            &ids[1],
            "-t",
            "mq5/up/b",
            "-m",
            "q0",
            "-D",
            "publish",
            "user-property",
            "z",
            "1",
            "-D",
            "publish",
            "user-property",
            "a",
            "2",
        ],
    );
    assert_eq!(next_msg(&mut sub, "QoS 0"), "mq5/up/b|q0|z:1 a:2");
    pub5(port, &["-i", &ids[1], "-t", "mq5/up/c", "-m", "bare"]);
    assert_eq!(next_msg(&mut sub, "bare"), "mq5/up/c|bare|");
}

#[test]
fn content_type_correlation_data_response_topic_forwarded_mqtt_3_3_2_4_15_16_20() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-props", 2);
    let mut sub = sub5(
        port,
        &[
            "-i",
            &ids[0],
            "-q",
            "2",
            "-t",
            "mq5/props/+",
            "-F",
            "%t|%p|C=%C|D=%D|R=%R|F=%F|q=%q",
        ],
    );
    for q in ["0", "1", "2"] {
        pub5(
            port,
            &[
                "-i",
                &ids[1],
                "-q",
                q,
                "-t",
                &format!("mq5/props/q{q}"),
                "-m",
                "{\"v\":1}",
                "-D",
                "publish",
                "content-type",
                "application/json",
                "-D",
                "publish",
                "correlation-data",
                "req-0042",
                "-D",
                "publish",
                "response-topic",
                "mq5/reply/client-9",
                "-D",
                "publish",
                "payload-format-indicator",
                "1",
            ],
        );
        assert_eq!(
            next_msg(&mut sub, q),
            format!(
                "mq5/props/q{q}|{{\"v\":1}}|C=application/json|D=req-0042|\
                 R=mq5/reply/client-9|F=1|q={q}"
            )
        );
    }
}

#[test]
fn request_response_round_trip_with_mosquitto_rr_mqtt_3_3_2_15_16() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-rr", 2);
    // The responder sees the request's Response Topic and Correlation Data.
    let mut responder = sub5(
        port,
        &[
            "-i",
            &ids[0],
            "-q",
            "1",
            "-t",
            "mq5/rr/req",
            "-F",
            "%R|%D|%p",
        ],
    );
    // mosquitto_rr comes in the same package as mosquitto_pub.
    let rr_bin = tools().mosquitto_pub.with_file_name("mosquitto_rr");
    let mut rr = LineProc::spawn(Command::new(&rr_bin).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-V",
        "mqttv5",
        "-i",
        &ids[1],
        "-q",
        "1",
        "-t",
        "mq5/rr/req",
        "-e",
        "mq5/rr/resp/1",
        "-m",
        "ping",
        "-D",
        "publish",
        "correlation-data",
        "corr-77",
        "-W",
        "8",
    ]));
    let req = next_msg(&mut responder, "request");
    assert_eq!(req, "mq5/rr/resp/1|corr-77|ping");
    // Answer on the Response Topic with the Correlation Data.
    pub5(
        port,
        &[
            "-q",
            "1",
            "-t",
            "mq5/rr/resp/1",
            "-m",
            "pong",
            "-D",
            "publish",
            "correlation-data",
            "corr-77",
        ],
    );
    let l = rr.wait_line(8 * SEC, |l| !l.trim().is_empty());
    assert_eq!(l, "pong", "mosquitto_rr: {:?} {}", rr.seen, rr.stderr());
    assert_eq!(rr.wait_exit(5 * SEC), Some(0));
}

// ------------------------------------------------------------- expiry

#[test]
fn persistent_session_expires_after_interval_mqtt_3_1_2_23() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-session", 2);
    let (sid, pid) = (&ids[0], &ids[1]);
    let session = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "-i",
            sid.as_str(),
            // -c with -x: libmosquitto 2.0 refuses -c with `-D connect
            // session-expiry-interval` (it adds the property for -c itself).
            "-c",
            "-x",
            "2",
            "-q",
            "1",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str], limit: Duration| {
        let a = session(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        sub5_run(port, &a, limit)
    };
    // Subscribe, then leave (-E: exit once subscribed).
    let (code, _) = run(&["-t", "mq5/se/t", "-E"], 10 * SEC);
    assert_eq!(code, Some(0));
    pub5(
        port,
        &["-i", pid, "-q", "1", "-t", "mq5/se/t", "-m", "queued"],
    );
    // Back within 2 s: the session and its queued message are there.
    let (code, lines) = run(&["-t", "mq5/se/other", "-C", "1", "-W", "3"], 10 * SEC);
    assert_eq!(
        (code, lines),
        (Some(0), vec!["queued".to_string()]),
        "resumed within the interval"
    );
    // Gone 2 s after that disconnect: a message for the old subscription
    // finds no session to queue it in, and a reconnect finds nothing.
    std::thread::sleep(Duration::from_millis(3500));
    pub5(
        port,
        &["-i", pid, "-q", "1", "-t", "mq5/se/t", "-m", "too-late"],
    );
    let (code, lines) = run(&["-t", "mq5/se/other", "-C", "1", "-W", "2"], 10 * SEC);
    assert_eq!(
        (code, lines),
        (Some(27), vec![]),
        "the session outlived its 2 s expiry"
    );
}

#[test]
fn message_expiry_for_offline_session_mqtt_3_3_2_5_6() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-msgexp", 2);
    let base = [
        "-i",
        ids[0].as_str(),
        "-c",
        "-x",
        "60",
        "-q",
        "1",
        "-t",
        "mq5/me/t",
    ];
    let mut first = base.to_vec();
    first.push("-E");
    assert_eq!(sub5_run(port, &first, 10 * SEC).0, Some(0));
    for (payload, expiry) in [("short", Some("1")), ("long", Some("20")), ("none", None)] {
        let mut a = vec![
            "-i",
            ids[1].as_str(),
            "-q",
            "1",
            "-t",
            "mq5/me/t",
            "-m",
            payload,
        ];
        if let Some(e) = expiry {
            a.extend_from_slice(&["-D", "publish", "message-expiry-interval", e]);
        }
        pub5(port, &a);
    }
    std::thread::sleep(Duration::from_millis(2300));
    let mut again = base.to_vec();
    again.extend_from_slice(&["-C", "3", "-W", "2", "-F", "%p|%E"]);
    let (code, lines) = sub5_run(port, &again, 10 * SEC);
    // MQTT-3.3.2-5: "short" expired while queued; only two come.
    assert_eq!(code, Some(27), "{lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (p, e) = lines[0].split_once('|').unwrap();
    assert_eq!(p, "long", "{lines:?}");
    // MQTT-3.3.2-6: 20 s less the 2.3 s it waited.
    let e: u32 = e
        .parse()
        .unwrap_or_else(|_| panic!("no Message Expiry Interval: {lines:?}"));
    assert!((16..=18).contains(&e), "remaining interval {e}: {lines:?}");
    assert_eq!(lines[1], "none|", "{lines:?}");
}

#[test]
fn retained_message_expires_mqtt_3_3_2_5() {
    let server = Server::start(&[]);
    let port = server.port();
    pub5(
        port,
        &[
            "-t",
            "mq5/rexp/t",
            "-m",
            "brief",
            "-r",
            "-q",
            "1",
            "-D",
            "publish",
            "message-expiry-interval",
            "2",
        ],
    );
    // Within its life it is served, with what is left of the interval.
    let (code, lines) = sub5_run(
        port,
        &["-t", "mq5/rexp/t", "-C", "1", "-W", "2", "-F", "%p|%r|%E"],
        10 * SEC,
    );
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(
        lines == ["brief|1|2"] || lines == ["brief|1|1"],
        "{lines:?}"
    );
    // Past it, a new subscriber gets nothing (MQTT-3.3.2-5).
    std::thread::sleep(Duration::from_millis(2500));
    let (code, lines) = sub5_run(port, &["-t", "mq5/rexp/t", "-C", "1", "-W", "1"], 10 * SEC);
    assert_eq!(
        (code, lines),
        (Some(27), vec![]),
        "expired retained message served"
    );
}

// ------------------------------------------------------------- subscriptions

#[test]
fn subscription_identifier_on_delivery_mqtt_3_3_4_3() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-subid", 3);
    let mut with_id = sub5(
        port,
        &[
            "-i",
            &ids[0],
            "-t",
            "mq5/si/#",
            "-D",
            "subscribe",
            "subscription-identifier",
            "42",
            "-F",
            "%t|%p|S=%S",
        ],
    );
    let mut without = sub5(port, &["-i", &ids[1], "-t", "mq5/si/#", "-F", "%t|%p|S=%S"]);
    pub5(
        port,
        &["-i", &ids[2], "-t", "mq5/si/x", "-m", "m1", "-q", "1"],
    );
    assert_eq!(next_msg(&mut with_id, "live"), "mq5/si/x|m1|S=42");
    assert_eq!(next_msg(&mut without, "live"), "mq5/si/x|m1|S=");
    pub5(port, &["-i", &ids[2], "-t", "mq5/si/r", "-m", "kept", "-r"]);
    assert_eq!(
        next_msg(&mut with_id, "retained publish"),
        "mq5/si/r|kept|S=42"
    );
    // A retained message sent at subscribe time carries the new
    // subscription's identifier.
    let mut late = sub5(
        port,
        &[
            "-i",
            "mq5-subid-late",
            "-t",
            "mq5/si/r",
            "-D",
            "subscribe",
            "subscription-identifier",
            "7",
            "-F",
            "%t|%p|%r|S=%S",
        ],
    );
    assert_eq!(next_msg(&mut late, "retained"), "mq5/si/r|kept|1|S=7");
}

#[test]
fn retain_as_published_with_mosquitto_sub_mqtt_3_3_1_12_13() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-rap", 3);
    let mut rap = sub5(
        port,
        &[
            "-i",
            &ids[0],
            "-t",
            "mq5/rap/t",
            "--retain-as-published",
            "-F",
            "%p|r=%r",
        ],
    );
    let mut plain = sub5(port, &["-i", &ids[1], "-t", "mq5/rap/t", "-F", "%p|r=%r"]);
    pub5(port, &["-i", &ids[2], "-t", "mq5/rap/t", "-m", "ret", "-r"]);
    pub5(port, &["-i", &ids[2], "-t", "mq5/rap/t", "-m", "live"]);
    assert_eq!(next_msg(&mut rap, "retained"), "ret|r=1");
    assert_eq!(next_msg(&mut rap, "live"), "live|r=0");
    assert_eq!(next_msg(&mut plain, "retained"), "ret|r=0");
    assert_eq!(next_msg(&mut plain, "live"), "live|r=0");
}

#[test]
fn shared_subscription_mixes_v311_and_v5_members_4_8_2() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-share", 3);
    let filter = "$share/grp/mq5/sh/#";
    // A 3.1.1 member and an MQTT 5 member of the same group.
    let mut v3 = mosquitto_sub_ready(
        port,
        &["-V", "mqttv311", "-i", &ids[0], "-q", "1", "-t", filter],
    );
    let mut v5 = sub5(port, &["-i", &ids[1], "-q", "1", "-t", filter]);
    let n = 12;
    for i in 0..n {
        pub5(
            port,
            &[
                "-i",
                &ids[2],
                "-q",
                "1",
                "-t",
                "mq5/sh/t",
                "-m",
                &format!("m{i}"),
            ],
        );
    }
    let mut got3 = Vec::new();
    let mut got5 = Vec::new();
    let deadline = Instant::now() + 10 * SEC;
    while got3.len() + got5.len() < n && Instant::now() < deadline {
        got3.extend(next_message_line(&mut v3, Duration::from_millis(100)));
        got5.extend(next_message_line(&mut v5, Duration::from_millis(100)));
    }
    while let Some(l) = next_message_line(&mut v3, Duration::from_millis(300)) {
        got3.push(l);
    }
    while let Some(l) = next_message_line(&mut v5, Duration::from_millis(100)) {
        got5.push(l);
    }
    let mut all: Vec<String> = got3.iter().chain(&got5).cloned().collect();
    all.sort_by_key(|l| l.rsplit('m').next().and_then(|n| n.parse::<u32>().ok()));
    let want: Vec<String> = (0..n).map(|i| format!("mq5/sh/t m{i}")).collect();
    assert_eq!(
        all, want,
        "exactly once across the group: 3.1.1 {got3:?}, 5 {got5:?}"
    );
    assert!(
        got3.len() >= 3 && got5.len() >= 3,
        "round robin: 3.1.1 member {got3:?}, v5 member {got5:?}"
    );
}

// ------------------------------------------------------------- topic aliases

/// libmosquitto 2.0 advertises `-D connect topic-alias-maximum N` but cannot
/// take an alias-only PUBLISH (it reads a zero-length topic as a protocol
/// error and drops the connection), so this sends each topic once: the
/// deliveries that set up aliases are what mosquitto_sub can show (`%A`).
/// MQTT.js resolves alias-only deliveries; see `v5_mqttjs.rs`.
#[test]
fn server_topic_aliases_within_client_maximum_mosquitto_sub_mqtt_3_1_2_26() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-alias", 2);
    let mut sub = sub5(
        port,
        &[
            "-i",
            &ids[0],
            "-q",
            "1",
            "-t",
            "mq5/ta/#",
            "-D",
            "connect",
            "topic-alias-maximum",
            "2",
            "-F",
            "%t|%p|A=%A",
        ],
    );
    let mut aliases = Vec::new();
    for i in 0..3 {
        let t = format!("mq5/ta/{i}");
        pub5(
            port,
            &["-i", &ids[1], "-q", "1", "-t", &t, "-m", &format!("m{i}")],
        );
        let l = next_msg(&mut sub, &t);
        let (head, alias) = l.rsplit_once("|A=").expect("the -F format");
        assert_eq!(head, format!("{t}|m{i}"), "{l}");
        aliases.push(alias.to_string());
    }
    // The first two topics get aliases 1..=2 (distinct); the third, with
    // the client's 2 used up, is sent with its name alone (MQTT-3.1.2-26).
    for a in &aliases[..2] {
        let n: u32 = a
            .parse()
            .unwrap_or_else(|_| panic!("no alias on a first delivery: {aliases:?}"));
        assert!((1..=2).contains(&n), "alias {n} above the maximum 2");
    }
    assert_ne!(aliases[0], aliases[1], "{aliases:?}");
    assert_eq!(aliases[2], "", "{aliases:?}");
}

// ------------------------------------------------------------- wills

/// A device: mosquitto_sub as `id` with a v5 will on `mq5/will/ID` and
/// `extra` options (will properties, session expiry), subscribed.
fn device(port: u16, id: &str, extra: &[&str]) -> LineProc {
    let topic = format!("mq5/will/{id}");
    let mut a = vec![
        "-i",
        id,
        "-t",
        "mq5/dev/nothing",
        "--will-topic",
        &topic,
        "--will-payload",
        "gone",
        "--will-qos",
        "1",
    ];
    a.extend_from_slice(extra);
    sub5(port, &a)
}

#[test]
fn will_properties_forwarded_in_order_mqtt_3_1_3_10() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-will", 2);
    let mut watcher = sub5(
        port,
        &[
            "-i",
            &ids[1],
            "-q",
            "1",
            "-t",
            "mq5/will/#",
            "-F",
            "%t|%p|%P|C=%C|R=%R|D=%D",
        ],
    );
    let dev = device(
        port,
        &ids[0],
        &[
            "-D",
            "will",
            "user-property",
            "why",
            "crash",
            "-D",
            "will",
            "user-property",
            "at",
            "boot",
            "-D",
            "will",
            "user-property",
            "why",
            "again",
            "-D",
            "will",
            "content-type",
            "text/plain",
            "-D",
            "will",
            "response-topic",
            "mq5/ack",
            "-D",
            "will",
            "correlation-data",
            "w1",
        ],
    );
    dev.signal(libc::SIGKILL);
    assert_eq!(
        next_msg(&mut watcher, "will"),
        format!(
            "mq5/will/{}|gone|why:crash at:boot why:again|C=text/plain|R=mq5/ack|D=w1",
            ids[0]
        )
    );
}

#[test]
fn will_delay_interval_postpones_the_will_mqtt_3_1_2_8() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-wdelay", 2);
    let mut watcher = sub5(port, &["-i", &ids[1], "-t", "mq5/will/#"]);
    // Session kept 30 s, will delayed 2 s.
    let dev = device(
        port,
        &ids[0],
        &[
            "-D",
            "connect",
            "session-expiry-interval",
            "30",
            "-D",
            "will",
            "will-delay-interval",
            "2",
        ],
    );
    dev.signal(libc::SIGKILL);
    let killed = Instant::now();
    let l = next_message_line(&mut watcher, 6 * SEC).expect("the will, after its delay");
    let after = killed.elapsed();
    assert_eq!(l, format!("mq5/will/{} gone", ids[0]));
    assert!(
        after >= Duration::from_millis(1800) && after <= Duration::from_millis(3500),
        "will published {after:?} after the close, delay was 2 s"
    );
}

#[test]
fn will_delay_longer_than_session_publishes_when_session_ends_mqtt_3_1_2_8() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-wnow", 2);
    let mut watcher = sub5(port, &["-i", &ids[1], "-t", "mq5/will/#"]);
    // The session ends with the connection, before the 10 s delay.
    let dev = device(port, &ids[0], &["-D", "will", "will-delay-interval", "10"]);
    dev.signal(libc::SIGKILL);
    let killed = Instant::now();
    let l = next_message_line(&mut watcher, 5 * SEC).expect("the will when the session ends");
    assert_eq!(l, format!("mq5/will/{} gone", ids[0]));
    assert!(
        killed.elapsed() < Duration::from_millis(1500),
        "{:?}",
        killed.elapsed()
    );
}

#[test]
fn reconnect_within_will_delay_cancels_will_mqtt_3_1_3_9() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("mq5-wcancel", 2);
    let mut watcher = sub5(port, &["-i", &ids[1], "-t", "mq5/will/#"]);
    let extra = ["-c", "-x", "30", "-D", "will", "will-delay-interval", "2"];
    let dev = device(port, &ids[0], &extra);
    dev.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    // Back before the 2 s are up: the will is not published.
    let back = device(port, &ids[0], &extra);
    assert_eq!(next_message_line(&mut watcher, 3 * SEC), None);
    drop(back);
}

//! Messaging end to end against the real binary (4 shards): QoS 1 and 2 with
//! paho-mqtt, offline queues and retained messages with the mosquitto
//! clients, the ACL file, `$SYS`, slow consumers, and the QoS 2 and
//! redelivery flows byte by byte over raw sockets.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    encode, json, publish_packet, python_script, run_bounded, tools, Broker, ConnectOpts,
    RawClient, TempDir, COREMQ,
};
use coremq::proto::codec::{Packet, PacketId, PubResp};
use coremq::proto::handshake::owner_of;

const SEC: Duration = Duration::from_secs(1);

/// Two clientIds that the broker (4 shards) puts on different shards, so
/// the publish crosses the mesh.
fn ids_on_two_shards(prefix: &str) -> (String, String) {
    let a = format!("{prefix}-a");
    let home = owner_of(&a, 4);
    let b = (0..)
        .map(|i| format!("{prefix}-b{i}"))
        .find(|b| owner_of(b, 4) != home)
        .expect("some id lands elsewhere");
    (a, b)
}

fn paho_exactly_once(port: u16, qos: u8, count: usize) -> (u64, Vec<String>) {
    let (sub, publ) = ids_on_two_shards(&format!("paho-q{qos}"));
    let (code, out, err) = run_bounded(
        &mut python_script(
            "paho_messaging.py",
            &[
                &port.to_string(),
                "exactly_once",
                &qos.to_string(),
                &count.to_string(),
                &sub,
                &publ,
            ],
        ),
        30 * SEC,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let r = json::parse_object(out.lines().last().unwrap_or("")).expect("one JSON line");
    let received = r["received"]
        .as_str()
        .expect("received")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    (r["granted"].as_u64().unwrap(), received)
}

/// QoS 2 across shards: every message once, in order (MQTT-4.3.3,
/// MQTT-4.6.0-2 .. -5).
#[test]
fn qos2_with_paho_is_exactly_once_and_in_order_across_shards_mqtt_4_3_3() {
    let broker = Broker::start(&[]);
    let (granted, received) = paho_exactly_once(broker.port(), 2, 300);
    assert_eq!(granted, 2);
    let want: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(received, want);
}

/// QoS 1 across shards: every message, in order (duplicates would be
/// allowed, MQTT-4.3.2, but none is expected without a reconnect).
#[test]
fn qos1_with_paho_is_at_least_once_and_in_order_across_shards_mqtt_4_3_2() {
    let broker = Broker::start(&[]);
    let (granted, received) = paho_exactly_once(broker.port(), 1, 300);
    assert_eq!(granted, 1);
    let want: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(received, want);
}

fn mosquitto(bin: &std::path::Path, port: u16) -> Command {
    let mut c = Command::new(bin);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    c
}

/// A persistent session's QoS 1 messages wait while it is away and arrive in
/// order when it comes back (MQTT-3.1.2-5, MQTT-4.6.0), with the mosquitto
/// clients: `mosquitto_sub -c` subscribes and leaves, `mosquitto_pub -l`
/// publishes 50 lines, `mosquitto_sub -c` again receives them.
#[test]
fn offline_persistent_session_gets_its_queue_in_order_with_mosquitto_clients() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let t = tools();
    let (code, out, err) = run_bounded(
        mosquitto(&t.mosquitto_sub, port)
            .args(["-c", "-i", "keeper", "-q", "1", "-t", "q/t", "-E"]),
        10 * SEC,
    );
    assert_eq!(code, Some(0), "mosquitto_sub -E: {out}{err}");
    let mut publ = mosquitto(&t.mosquitto_pub, port)
        .args(["-i", "feeder", "-q", "1", "-t", "q/t", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        let mut stdin = publ.stdin.take().unwrap();
        for i in 0..50 {
            writeln!(stdin, "m{i}").unwrap();
        }
    }
    assert!(publ.wait().unwrap().success(), "mosquitto_pub -l");
    broker.wait_for_stat("publishes_in", |n| n >= 50, 5 * SEC);
    let (code, out, err) = run_bounded(
        mosquitto(&t.mosquitto_sub, port).args([
            "-c", "-i", "keeper", "-q", "1", "-t", "q/t", "-C", "50", "-W", "5",
        ]),
        15 * SEC,
    );
    assert_eq!(code, Some(0), "mosquitto_sub resumed: {out}{err}");
    let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
}

/// Retained messages set from clients on every shard reach one wildcard
/// subscriber, each once, flagged retained (MQTT-3.3.1-6, -8), and
/// `mosquitto_sub --retained-only` sees exactly them.
#[test]
fn retained_from_every_shard_reach_a_wildcard_subscriber_with_mosquitto_sub() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let mut publishers: Vec<RawClient> = (0..8)
        .map(|i| RawClient::connect(port, &ConnectOpts::id(&format!("ret-pub-{i}"))).0)
        .collect();
    for i in 0..200 {
        let p = &mut publishers[i % 8];
        p.publish(
            &format!("fleet/{i}/status"),
            format!("s{i}").as_bytes(),
            1,
            true,
        );
    }
    broker.wait_for_stat("retained", |n| n >= 200, 5 * SEC);
    let (code, out, err) = run_bounded(
        mosquitto(&tools().mosquitto_sub, port).args([
            "-t",
            "fleet/+/status",
            "-v",
            "--retained-only",
            "-W",
            "3",
        ]),
        15 * SEC,
    );
    // -W ends it: 27 after the timeout.
    assert_eq!(code, Some(27), "{out}{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<String> = (0..200).map(|i| format!("fleet/{i}/status s{i}")).collect();
    want.sort();
    assert_eq!(got, want);
}

const ACL: &str = "\
# anonymous clients: the public topics and $SYS
topic read public/#
topic read $SYS/#

user alice
topic readwrite fleet/#
topic deny fleet/secret/#

user bob
topic read fleet/+/temp
";

fn paho(port: u16, args: &[&str]) -> std::collections::HashMap<String, json::Value> {
    let mut argv = vec![port.to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (code, out, err) = run_bounded(&mut python_script("paho_messaging.py", &argv), 20 * SEC);
    assert_eq!(code, Some(0), "paho {args:?}: {out}{err}");
    json::parse_object(out.lines().last().unwrap_or("")).expect("JSON")
}

fn acl_broker(dir: &TempDir) -> Broker {
    let acl = dir.path("acl");
    std::fs::write(&acl, ACL).unwrap();
    let pw = dir.path("passwords");
    for (user, pass, create) in [("alice", "a-pw", true), ("bob", "b-pw", false)] {
        let mut args = vec!["passwd"];
        if create {
            args.push("-c");
        }
        let pw_s = pw.to_str().unwrap();
        args.extend([pw_s, user, "--password", pass]);
        let (code, out, err) = run_bounded(Command::new(COREMQ).args(&args), 20 * SEC);
        assert_eq!(code, Some(0), "coremq passwd: {out}{err}");
    }
    Broker::start(&[
        "--acl-file",
        acl.to_str().unwrap(),
        "--password-file",
        pw.to_str().unwrap(),
        "--allow-anonymous",
        "true",
    ])
}

/// An ACL file (mosquitto's format) decides per filter: SUBACK carries the
/// granted QoS where a read rule covers the filter and 0x80 where none does
/// (MQTT-3.9.3), as paho reports it.
#[test]
fn acl_file_grants_and_refuses_subscriptions_per_filter_with_paho() {
    let dir = TempDir::new("acl-sub");
    let broker = acl_broker(&dir);
    let port = broker.port();
    let codes = |user: &str, pass: &str, filters: &[&str]| -> Vec<u64> {
        let mut args = vec!["subscribe", user, pass];
        args.extend(filters);
        paho(port, &args)["codes"]
            .as_str()
            .unwrap()
            .split(',')
            .map(|c| c.parse().unwrap())
            .collect()
    };
    assert_eq!(
        codes(
            "alice",
            "a-pw",
            &["fleet/#", "#", "fleet/secret/#", "public/x"]
        ),
        [1, 0x80, 0x80, 0x80]
    );
    assert_eq!(
        codes("bob", "b-pw", &["fleet/7/temp", "fleet/+/temp", "fleet/#"]),
        [1, 1, 0x80]
    );
    assert_eq!(codes("-", "-", &["public/#", "fleet/#"]), [1, 0x80]);
    broker.wait_for_stat("acl_denied", |n| n == 5, 5 * SEC);
}

/// A PUBLISH the ACL does not allow is acknowledged and dropped; an allowed
/// one is delivered; a deny rule inside a broader grant holds deliveries
/// back.
#[test]
fn acl_file_drops_what_a_client_may_not_publish_or_read() {
    let dir = TempDir::new("acl-pub");
    let broker = acl_broker(&dir);
    let port = broker.port();
    let mut alice = RawClient::connect(
        port,
        &ConnectOpts {
            username: Some("alice".into()),
            password: Some(b"a-pw".to_vec()),
            ..ConnectOpts::id("alice-watch")
        },
    )
    .0;
    alice.subscribe("fleet/#", 0);
    // bob may read but not write fleet/...: acknowledged, never delivered.
    let r = paho(
        port,
        &["publish", "bob", "b-pw", "fleet/1/temp", "from-bob"],
    );
    assert_eq!(r["acked"].as_bool(), Some(true));
    // alice's own secret topic is denied even to her.
    let r = paho(
        port,
        &["publish", "alice", "a-pw", "fleet/secret/k", "hidden"],
    );
    assert_eq!(r["acked"].as_bool(), Some(true));
    let r = paho(
        port,
        &["publish", "alice", "a-pw", "fleet/2/temp", "from-alice"],
    );
    assert_eq!(r["acked"].as_bool(), Some(true));
    let p = alice.next_publish(3 * SEC).expect("alice's own message");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("fleet/2/temp", &b"from-alice"[..])
    );
    alice.expect_silence(Duration::from_millis(500));
    broker.wait_for_stat("acl_denied", |n| n == 2, 5 * SEC);
}

/// `$SYS/broker/...` carries mosquitto's statistics topics, retained and
/// refreshed every --sys-interval; `#` does not match them (MQTT-4.7.2-1).
#[test]
fn sys_topics_report_the_broker_and_are_not_matched_by_hash() {
    let broker = Broker::start(&["--sys-interval", "1"]);
    let port = broker.port();
    let mut everything = RawClient::subscriber(port, "hash-sub", "#", 0);
    let (code, out, err) = run_bounded(
        mosquitto(&tools().mosquitto_sub, port).args(["-t", "$SYS/broker/#", "-v", "-W", "3"]),
        10 * SEC,
    );
    assert_eq!(code, Some(27), "{out}{err}");
    let value = |topic: &str| -> String {
        out.lines()
            .filter_map(|l| l.strip_prefix(&format!("{topic} ")))
            .next_back()
            .unwrap_or_else(|| panic!("no {topic} in:\n{out}"))
            .to_string()
    };
    assert_eq!(
        value("$SYS/broker/version"),
        format!("coremq {}", env!("CARGO_PKG_VERSION"))
    );
    let uptime = value("$SYS/broker/uptime");
    assert!(uptime.ends_with(" seconds"), "{uptime}");
    // The hash subscriber and mosquitto_sub itself are connected.
    let connected: u64 = value("$SYS/broker/clients/connected").parse().unwrap();
    assert!(connected >= 1, "{connected}");
    for topic in [
        "$SYS/broker/clients/total",
        "$SYS/broker/clients/maximum",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/publish/messages/received",
        "$SYS/broker/publish/messages/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
        "$SYS/broker/subscriptions/count",
        "$SYS/broker/retained messages/count",
    ] {
        value(topic)
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{topic}: {e}"));
    }
    everything.expect_silence(Duration::from_millis(300));
}

/// A subscriber that stops reading: QoS 0 messages for it are dropped once
/// its buffers are full (counted), the publisher is acknowledged at full
/// speed, another subscriber gets every message, and the broker's memory
/// stays bounded.
#[test]
fn stuck_subscriber_costs_bounded_memory_and_slows_nobody() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    // Subscribed, then never read again.
    let _stuck = RawClient::subscriber(port, "stuck", "flood/t", 0);
    let mut healthy = RawClient::subscriber(port, "healthy", "flood/t", 1);
    let (mut publ, _) = RawClient::connect(port, &ConnectOpts::id("flooder"));
    let rss_before = broker.rss_kib();
    let payload = vec![0x5au8; 4096];
    const N: u16 = 5000;
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut got = 0u32;
        while got < u32::from(N) {
            let p = healthy
                .next_publish(10 * SEC)
                .expect("the healthy subscriber keeps getting them");
            assert_eq!(p.payload.len(), 4096);
            got += 1;
        }
        got
    });
    for i in 1..=N {
        publ.send(&publish_packet("flood/t", &payload, 1, false, i));
        match publ.next_packet(5 * SEC) {
            Ok(Packet::PubAck(a)) => assert_eq!(a.packet_id.get(), i),
            other => panic!("expected PUBACK {i}, got {other:?}"),
        }
    }
    let publish_time = start.elapsed();
    assert_eq!(reader.join().unwrap(), u32::from(N));
    // 20 MB went to a reader that took nothing: most of it was dropped.
    broker.wait_for_stat("dropped", |n| n > 1000, 5 * SEC);
    let rss_after = broker.rss_kib();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} KiB before, {rss_after} KiB after 20 MB to a stuck subscriber"
    );
    assert!(
        publish_time < 20 * SEC,
        "publisher slowed to {publish_time:?}"
    );
}

fn pub_resp(id: u16) -> PubResp {
    PubResp {
        packet_id: PacketId::new(id).unwrap(),
        reason: 0,
        properties: None,
    }
}

/// A QoS 2 PUBLISH sent again (DUP=1) before its PUBREL is acknowledged
/// again with PUBREC but delivered only once; its PUBREL after a reconnect
/// (the flow interrupted by the network) still completes with PUBCOMP
/// (MQTT-4.3.3, MQTT-4.4.0-1).
#[test]
fn incoming_qos2_resent_and_interrupted_is_delivered_once_mqtt_4_3_3() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let mut sub = RawClient::subscriber(port, "q2-watch", "q2/t", 2);
    let persistent = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("q2-sender")
    };
    let (mut c, _) = RawClient::connect(port, &persistent);
    c.send(&publish_packet("q2/t", b"once", 2, false, 5));
    assert!(matches!(c.next_packet(2 * SEC), Ok(Packet::PubRec(r)) if r.packet_id.get() == 5));
    // The same PUBLISH again, with DUP set (first byte 0x34 | 0x08).
    let mut dup = publish_packet("q2/t", b"once", 2, false, 5);
    dup[0] |= 0x08;
    c.send(&dup);
    assert!(matches!(c.next_packet(2 * SEC), Ok(Packet::PubRec(r)) if r.packet_id.get() == 5));
    // The network drops before PUBREL; the client comes back and finishes.
    drop(c);
    let (mut c, present) = RawClient::connect(port, &persistent);
    assert!(present, "session present");
    c.send(&encode(&Packet::PubRel(pub_resp(5))));
    assert!(matches!(c.next_packet(2 * SEC), Ok(Packet::PubComp(r)) if r.packet_id.get() == 5));
    // The subscriber got it once.
    let p = sub.next_publish(2 * SEC).expect("delivered");
    assert_eq!(&p.payload[..], b"once");
    // Its own QoS 2 flow, completed so nothing is resent.
    let id = p.packet_id.unwrap().get();
    sub.send(&encode(&Packet::PubRec(pub_resp(id))));
    assert!(matches!(sub.next_packet(2 * SEC), Ok(Packet::PubRel(_))));
    sub.send(&encode(&Packet::PubComp(pub_resp(id))));
    sub.expect_silence(Duration::from_millis(500));
}

/// Outgoing QoS 2 to a persistent subscriber that drops mid-flow: on
/// reconnect the unacknowledged PUBLISH comes again with DUP=1; after its
/// PUBREC and another drop, the PUBREL comes again (MQTT-4.4.0-1).
#[test]
fn outgoing_qos2_is_resent_with_dup_then_pubrel_after_reconnects_mqtt_4_4_0_1() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let opts = ConnectOpts {
        clean: false,
        ..ConnectOpts::id("q2-receiver")
    };
    let (mut r, _) = RawClient::connect(port, &opts);
    r.subscribe("q2/out", 2);
    let (mut publ, _) = RawClient::connect(port, &ConnectOpts::id("q2-pub"));
    publ.send(&publish_packet("q2/out", b"hello", 2, false, 1));
    assert!(matches!(publ.next_packet(2 * SEC), Ok(Packet::PubRec(_))));
    publ.send(&encode(&Packet::PubRel(pub_resp(1))));
    assert!(matches!(publ.next_packet(2 * SEC), Ok(Packet::PubComp(_))));

    let first = r.next_publish(2 * SEC).expect("first delivery");
    assert!(!first.dup);
    let id = first.packet_id.unwrap().get();
    drop(r);
    let (mut r, present) = RawClient::connect(port, &opts);
    assert!(present);
    let again = r.next_publish(2 * SEC).expect("resent");
    assert!(again.dup, "MQTT-3.3.1-1: DUP on a resend");
    assert_eq!(
        (again.packet_id.unwrap().get(), &again.payload[..]),
        (id, &b"hello"[..])
    );
    r.send(&encode(&Packet::PubRec(pub_resp(id))));
    assert!(matches!(r.next_packet(2 * SEC), Ok(Packet::PubRel(p)) if p.packet_id.get() == id));
    drop(r);
    let (mut r, _) = RawClient::connect(port, &opts);
    assert!(
        matches!(r.next_packet(2 * SEC), Ok(Packet::PubRel(p)) if p.packet_id.get() == id),
        "the PUBREL again, not the PUBLISH"
    );
    r.send(&encode(&Packet::PubComp(pub_resp(id))));
    r.expect_silence(Duration::from_millis(500));
}

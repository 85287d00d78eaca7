//! MQTT.js (the npm `mqtt` package) against coremq: session present, client
//! id takeover storms, and pub/sub across clients.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{json, node_script, run_bounded, Broker, LineProc, RawClient};

const SEC: Duration = Duration::from_secs(1);

/// Parses `{"event": ..., ...}` lines; panics on anything else.
fn events(stdout: &str) -> Vec<HashMap<String, json::Value>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| json::parse_object(l).unwrap_or_else(|| panic!("not JSON: {l}")))
        .collect()
}

/// Runs mqttjs_connect.js and returns the CONNACK's sessionPresent.
fn connect_session_present(port: u16, client_id: &str, clean: bool) -> bool {
    let (code, out, err) = run_bounded(
        &mut node_script(
            "mqttjs_connect.js",
            &[&port.to_string(), client_id, &clean.to_string()],
        ),
        15 * SEC,
    );
    assert_eq!(code, Some(0), "mqttjs_connect.js: {out}{err}");
    let ev = events(&out);
    assert_eq!(ev.len(), 1, "{out}");
    assert_eq!(ev[0]["event"].as_str(), Some("connect"), "{out}");
    assert_eq!(ev[0]["returnCode"].as_u64(), Some(0), "{out}");
    ev[0]["sessionPresent"]
        .as_bool()
        .unwrap_or_else(|| panic!("no sessionPresent: {out}"))
}

#[test]
fn session_present_persistent_then_resumed_mqtt_3_2_2_2() {
    let broker = Broker::start(&[]);
    let p = broker.port();
    assert!(!connect_session_present(p, "mqtt_sample_id_1", false));
    assert!(connect_session_present(p, "mqtt_sample_id_1", false));
    assert!(connect_session_present(p, "mqtt_sample_id_1", false));
}

#[test]
fn session_present_always_false_with_clean_session_mqtt_3_2_2_1() {
    let broker = Broker::start(&[]);
    let p = broker.port();
    // Even when a persistent session was stored for the id first.
    assert!(!connect_session_present(p, "mqtt_sample_id_2", false));
    assert!(!connect_session_present(p, "mqtt_sample_id_2", true));
    assert!(!connect_session_present(p, "mqtt_sample_id_2", true));
    // The clean session discarded the stored one (MQTT-3.1.2-6).
    assert!(!connect_session_present(p, "mqtt_sample_id_2", false));
}

fn count(p: &LineProc, event: &str) -> usize {
    let needle = format!("\"event\":\"{event}\"");
    p.seen.iter().filter(|l| l.contains(&needle)).count()
}

#[test]
fn identical_client_ids_take_each_other_over_without_leaking_mqtt_3_1_4_2() {
    let broker = Broker::start(&[]);
    let port = broker.port().to_string();
    let mut a = LineProc::spawn(&mut node_script(
        "mqttjs_identical.js",
        &[&port, "mqtt_identical_1", "150"],
    ));
    let mut b = LineProc::spawn(&mut node_script(
        "mqttjs_identical.js",
        &[&port, "mqtt_identical_1", "120"],
    ));
    std::thread::sleep(4 * SEC);
    a.drain(Duration::from_millis(50));
    b.drain(Duration::from_millis(50));
    a.kill();
    b.kill();
    for (name, p) in [("a", &a), ("b", &b)] {
        let (connects, closes, offlines) =
            (count(p, "connect"), count(p, "close"), count(p, "offline"));
        assert!(
            connects >= 3 && closes >= 2 && offlines >= 2,
            "client {name}: connect={connects} close={closes} offline={offlines}; {:?} {}",
            p.seen,
            p.stderr()
        );
    }
    // Both are gone: no connection or socket is left behind.
    broker.wait_for_stat("connections", |n| n == 0, 5 * SEC);
    broker.wait_for_stat("sockets", |n| n == 0, 5 * SEC);
    let takeovers = broker.fresh_stats()["takeovers"];
    assert!(takeovers >= 4, "only {takeovers} takeovers");

    // A third client with that id connects and pub/subs fine.
    let mut sub = LineProc::spawn(&mut node_script(
        "mqttjs_sub.js",
        &[&port, "mqtt_identical_1", "ident/t", "1", "1"],
    ));
    sub.wait_line(10 * SEC, |l| l.contains("\"ready\""));
    let mut publ = RawClient::connect(broker.port(), &common::ConnectOpts::id("ident-pub")).0;
    publ.publish("ident/t", b"after the storm", 1, false);
    let l = sub.wait_line(10 * SEC, |l| l.contains("\"message\""));
    assert!(l.contains("after the storm"), "{l}");
    assert_eq!(sub.wait_exit(10 * SEC), Some(0));
    // The third client took nobody over.
    assert_eq!(broker.fresh_stats()["takeovers"], takeovers);
}

fn pubsub_across_clients(qos: &str) {
    let broker = Broker::start(&[]);
    let port = broker.port().to_string();
    // Several subscribers, so that with 4 shards they sit on different ones.
    let mut subs: Vec<LineProc> = (0..3)
        .map(|i| {
            let id = format!("js-sub-{qos}-{i}");
            LineProc::spawn(&mut node_script(
                "mqttjs_sub.js",
                &[&port, &id, "js/+/data", qos, "3"],
            ))
        })
        .collect();
    for s in &mut subs {
        let l = s.wait_line(10 * SEC, |l| l.contains("\"ready\""));
        assert!(l.contains(&format!("\"granted\":[{qos}]")), "{l}");
    }
    let pub_id = format!("js-pub-{qos}");
    let (code, out, err) = run_bounded(
        &mut node_script(
            "mqttjs_pub.js",
            &[&port, &pub_id, "js/1/data", qos, "one", "two", "three"],
        ),
        15 * SEC,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    for s in &mut subs {
        let mut got = Vec::new();
        for _ in 0..3 {
            let l = s.wait_line(10 * SEC, |l| l.contains("\"message\""));
            let ev = json::parse_object(&l).expect("JSON");
            assert_eq!(ev["topic"].as_str(), Some("js/1/data"));
            assert_eq!(ev["qos"].as_u64(), qos.parse().ok(), "{l}");
            assert_eq!(ev["retain"].as_bool(), Some(false), "{l}");
            got.push(ev["payload"].as_str().unwrap().to_string());
        }
        assert_eq!(got, ["one", "two", "three"], "in order");
        assert_eq!(s.wait_exit(10 * SEC), Some(0));
    }
}

#[test]
fn pubsub_across_clients_qos0() {
    pubsub_across_clients("0");
}

#[test]
fn pubsub_across_clients_qos1() {
    pubsub_across_clients("1");
}

#[test]
fn pubsub_across_clients_qos2() {
    pubsub_across_clients("2");
}

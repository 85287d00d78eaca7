//! MQTT 5 with MQTT.js (`protocolVersion: 5`) against coremq on 4 shards:
//! CONNACK properties, session expiry, forwarded message properties and
//! expiry, subscription identifiers and options, server-to-client topic
//! aliases, shared subscriptions, Receive Maximum and Maximum Packet Size,
//! PUBACK reason codes, DISCONNECT in both directions (will, takeover,
//! shutdown, keep-alive). Clients that exchange messages get clientIds on
//! different shards, so the messages cross shards. The client is
//! `tests/scripts/mqttjs_v5.js`, which prints one flat JSON line per event
//! with the MQTT 5 properties as MQTT.js reports them.

mod common;
mod v5_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{node_script, run_bounded, LineProc};
use v5_support::{
    bool_field, event, events, ids_on_distinct_shards, jstr, kind, num_field, raw_field, str_field,
    Event, Server,
};

const SEC: Duration = Duration::from_secs(1);

/// `node mqttjs_v5.js MODE PORT SPEC`.
fn js(mode: &str, port: u16, spec: &str) -> std::process::Command {
    node_script("mqttjs_v5.js", &[mode, &port.to_string(), spec])
}

/// Runs the script to its end (at most 20 s); asserts exit 0; its events.
fn run_js(port: u16, mode: &str, spec: &str) -> Vec<Event> {
    let (code, out, err) = run_bounded(&mut js(mode, port, spec), 20 * SEC);
    assert_eq!(code, Some(0), "mqttjs_v5.js {mode} {spec}: {out}{err}");
    events(&out)
}

/// Starts the script; the caller reads its lines.
fn spawn_js(port: u16, mode: &str, spec: &str) -> LineProc {
    LineProc::spawn(&mut js(mode, port, spec))
}

/// The first event of kind `k` in `evs`.
fn first<'a>(evs: &'a [Event], k: &str) -> &'a Event {
    evs.iter()
        .find(|e| kind(e) == k)
        .unwrap_or_else(|| panic!("no {k:?} event in {evs:?}"))
}

/// Reads lines until an event of kind `k` (panics on an "error" or
/// "timeout" event first, or after `timeout`).
fn wait_event(p: &mut LineProc, k: &str, timeout: Duration) -> Event {
    let l = p.wait_line(timeout, |l| {
        l.contains(&format!("\"event\":\"{k}\""))
            || l.contains("\"event\":\"error\"")
            || l.contains("\"event\":\"timeout\"")
    });
    let e = event(&l);
    assert_eq!(kind(&e), k, "waiting for {k:?}: {l}; before: {:?}", p.seen);
    e
}

/// Every "message" event the process has printed so far (including those
/// read while waiting for other lines); panics on an "error" / "timeout".
fn seen_messages(p: &LineProc) -> Vec<Event> {
    let evs: Vec<Event> = p.seen.iter().map(|l| event(l)).collect();
    if let Some(e) = evs
        .iter()
        .find(|e| kind(e) == "error" || kind(e) == "timeout")
    {
        panic!("{e:?}; seen: {:?}; stderr: {}", p.seen, p.stderr());
    }
    evs.into_iter().filter(|e| kind(e) == "message").collect()
}

/// Reads lines until the process has printed `n` "message" events in all;
/// returns all of them.
fn messages(p: &mut LineProc, n: usize, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = seen_messages(p);
        if got.len() >= n {
            return got;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if p.next_line(left).is_none() {
            panic!(
                "only {} of {n} messages within {timeout:?}: {:?}; stderr: {}",
                got.len(),
                p.seen,
                p.stderr()
            );
        }
    }
}

/// Waits `quiet` for more lines; returns every "message" event so far.
fn all_messages_after(p: &mut LineProc, quiet: Duration) -> Vec<Event> {
    p.drain(quiet);
    seen_messages(p)
}

/// Payloads of message events.
fn payloads(ms: &[Event]) -> Vec<String> {
    ms.iter()
        .map(|m| str_field(m, "payload").unwrap_or("?").to_string())
        .collect()
}

/// Publishes `msgs` (JSON array of {topic, payload, qos, retain,
/// properties}) as `client_id`, waiting for each acknowledgement.
/// Each message's (topic, payload), as the client resolved them.
fn topics_and_payloads(ms: &[Event]) -> Vec<(String, String)> {
    ms.iter()
        .map(|m| {
            (
                str_field(m, "topic").unwrap_or("?").to_string(),
                str_field(m, "payload").unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn publish(port: u16, client_id: &str, msgs: &str) {
    let evs = run_js(
        port,
        "pub",
        &format!(r#"{{"clientId":{},"publish":{msgs}}}"#, jstr(client_id)),
    );
    first(&evs, "done");
}

/// A subscriber that has its SUBACKs (the "ready" line read).
fn subscriber(port: u16, spec: &str) -> (LineProc, Event) {
    let mut p = spawn_js(port, "sub", spec);
    let ready = wait_event(&mut p, "ready", 10 * SEC);
    (p, ready)
}

// ------------------------------------------------------------- CONNACK

#[test]
fn connack_properties_and_assigned_client_id_mqtt_3_2_2_16() {
    let server = Server::start(&[]);
    let port = server.port();
    let mut assigned = BTreeSet::new();
    for _ in 0..2 {
        let evs = run_js(port, "connect", r#"{"clientId":""}"#);
        let c = first(&evs, "connect");
        assert_eq!(num_field(c, "reasonCode"), Some(0), "{c:?}");
        assert_eq!(bool_field(c, "sessionPresent"), Some(false), "{c:?}");
        // The contract's defaults, always sent.
        assert_eq!(num_field(c, "receiveMaximum"), Some(1024), "{c:?}");
        assert_eq!(num_field(c, "maximumPacketSize"), Some(1_048_576), "{c:?}");
        assert_eq!(num_field(c, "topicAliasMaximum"), Some(65535), "{c:?}");
        for flag in [
            "retainAvailable",
            "wildcardSubscriptionAvailable",
            "subscriptionIdentifiersAvailable",
            "sharedSubscriptionAvailable",
        ] {
            assert_eq!(bool_field(c, flag), Some(true), "{flag}: {c:?}");
        }
        // MQTT-3.2.2-16: an empty clientId gets a new, unused one.
        let id = str_field(c, "assignedClientIdentifier")
            .unwrap_or_else(|| panic!("no Assigned Client Identifier: {c:?}"));
        assert!(!id.is_empty(), "{c:?}");
        assert!(assigned.insert(id.to_string()), "{id} assigned twice");
    }
    // A client that names itself is not assigned anything.
    let evs = run_js(port, "connect", r#"{"clientId":"connack-named"}"#);
    let c = first(&evs, "connect");
    assert_eq!(str_field(c, "assignedClientIdentifier"), None, "{c:?}");
}

#[test]
fn connack_properties_follow_flags_mqtt_3_1_2_21_28() {
    let server = Server::start(&[
        "--receive-maximum",
        "50",
        "--max-topic-alias",
        "7",
        "--max-packet-size",
        "65536",
        "--max-keepalive",
        "30",
        "--max-session-expiry",
        "100",
        "--response-information",
        "resp/base/",
    ]);
    let port = server.port();
    // Keep-alive 0 and an expiry above the cap, asking for response info.
    let evs = run_js(
        port,
        "connect",
        r#"{"clientId":"connack-capped","keepalive":0,
            "properties":{"sessionExpiryInterval":1000,"requestResponseInformation":true}}"#,
    );
    let c = first(&evs, "connect");
    assert_eq!(num_field(c, "reasonCode"), Some(0), "{c:?}");
    assert_eq!(num_field(c, "receiveMaximum"), Some(50), "{c:?}");
    assert_eq!(num_field(c, "topicAliasMaximum"), Some(7), "{c:?}");
    assert_eq!(num_field(c, "maximumPacketSize"), Some(65536), "{c:?}");
    // MQTT-3.1.2-21: the Server Keep Alive the client must then use.
    assert_eq!(num_field(c, "serverKeepAlive"), Some(30), "{c:?}");
    assert_eq!(num_field(c, "sessionExpiryInterval"), Some(100), "{c:?}");
    assert_eq!(
        str_field(c, "responseInformation"),
        Some("resp/base/"),
        "{c:?}"
    );

    // MQTT-3.1.2-28: no Response Information unless it was requested.
    let evs = run_js(
        port,
        "connect",
        r#"{"clientId":"connack-plain","keepalive":20}"#,
    );
    let c = first(&evs, "connect");
    assert_eq!(num_field(c, "reasonCode"), Some(0), "{c:?}");
    assert_eq!(str_field(c, "responseInformation"), None, "{c:?}");
    // Within the cap: any Server Keep Alive sent is the client's own value.
    if let Some(ka) = num_field(c, "serverKeepAlive") {
        assert_eq!(ka, 20, "{c:?}");
    }
}

// ------------------------------------------------------------- sessions

/// Wall-clock milliseconds, as the script's `t`.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// mosquitto_pub (quick to start, unlike node) publishes one QoS 1 message.
fn quick_publish(port: u16, client_id: &str, topic: &str, payload: &str) {
    let (code, out, err) = run_bounded(
        std::process::Command::new(&common::tools().mosquitto_pub).args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-i",
            client_id,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ]),
        10 * SEC,
    );
    assert_eq!(code, Some(0), "mosquitto_pub: {out}{err}");
}

#[test]
fn session_resumed_within_expiry_and_lost_after_it_mqtt_3_1_2_23() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-expiry", 2);
    let (sub, publ) = (&ids[0], &ids[1]);
    const EXPIRY_MS: u64 = 3000;
    let spec = |extra: &str| {
        format!(
            r#"{{"clientId":{},"clean":false,"properties":{{"sessionExpiryInterval":{}}}{extra}}}"#,
            jstr(sub),
            EXPIRY_MS / 1000
        )
    };
    let t = |evs: &[Event], k: &str| num_field(first(evs, k), "t").expect("t");

    let evs = run_js(
        port,
        "connect",
        &spec(r#","subs":[{"filter":"js5/expiry/t","qos":1}]"#),
    );
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(false)
    );
    assert_eq!(raw_field(first(&evs, "subscribed"), "granted"), Some("[1]"));
    let left = t(&evs, "close");

    // Offline, within the interval: the message is queued for the session.
    quick_publish(port, publ, "js5/expiry/t", "while-away");
    let evs = run_js(port, "sub", &spec(r#","count":1"#));
    let offline = t(&evs, "connect").saturating_sub(left);
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(true),
        "back after {offline} ms, within the {EXPIRY_MS} ms interval: {evs:?}"
    );
    assert_eq!(
        str_field(first(&evs, "message"), "payload"),
        Some("while-away")
    );
    let left = t(&evs, "close");

    // Past the interval the session, its subscription included, is gone.
    let wake = left + EXPIRY_MS + 1500;
    std::thread::sleep(Duration::from_millis(wake.saturating_sub(now_ms())));
    quick_publish(port, publ, "js5/expiry/t", "after-expiry");
    let evs = run_js(port, "sub", &spec(r#","quietMs":800"#));
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(false),
        "expired: {evs:?}"
    );
    let got: Vec<&Event> = evs.iter().filter(|e| kind(e) == "message").collect();
    assert!(got.is_empty(), "expired session still delivered {got:?}");
}

#[test]
fn disconnect_session_expiry_interval_replaces_connects_3_14_2_2_2() {
    let server = Server::start(&[]);
    let port = server.port();
    // CONNECT asks for 60 s; the DISCONNECT cuts it to 1 s.
    let evs = run_js(
        port,
        "connect",
        r#"{"clientId":"js5-disc-expiry","clean":false,
            "properties":{"sessionExpiryInterval":60},
            "subs":[{"filter":"js5/disc/t","qos":1}],
            "disconnect":{"reasonCode":0,"properties":{"sessionExpiryInterval":1}}}"#,
    );
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(false)
    );
    std::thread::sleep(Duration::from_millis(2500));
    let evs = run_js(
        port,
        "connect",
        r#"{"clientId":"js5-disc-expiry","clean":false,
            "properties":{"sessionExpiryInterval":60}}"#,
    );
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(false),
        "the session outlived the DISCONNECT's 1 s: {evs:?}"
    );
    // And with the CONNECT's interval left alone it is kept.
    std::thread::sleep(Duration::from_millis(1500));
    let evs = run_js(
        port,
        "connect",
        r#"{"clientId":"js5-disc-expiry","clean":false,
            "properties":{"sessionExpiryInterval":60}}"#,
    );
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(true),
        "{evs:?}"
    );
}

// ------------------------------------------------------------- properties

#[test]
fn user_properties_forwarded_in_order_mqtt_3_3_2_17_18() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-userprop", 2);
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/up/#","qos":2}}]}}"#,
            jstr(&ids[0])
        ),
    );
    // MQTT.js writes an object's keys in order, a repeated key's values in
    // array order: region, tag, tag, tag, ünï, then z.
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/up/1","payload":"q1","qos":1,
             "properties":{"userProperties":{"region":"eu-west","tag":["z","a","m"],"ünï":"cödé","z":""}}},
            {"topic":"js5/up/2","payload":"q0","qos":0,
             "properties":{"userProperties":{"b":"2","a":"1"}}},
            {"topic":"js5/up/3","payload":"q2","qos":2,
             "properties":{"userProperties":{"k":["v2","v1","v2"]}}}]"#,
    );
    let ms = messages(&mut sub, 3, 10 * SEC);
    let got: Vec<(&str, Option<&str>)> = ms
        .iter()
        .map(|m| {
            (
                str_field(m, "payload").unwrap_or("?"),
                str_field(m, "userProperties"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "q1",
                Some(r#"{"region":"eu-west","tag":["z","a","m"],"ünï":"cödé","z":""}"#)
            ),
            ("q0", Some(r#"{"b":"2","a":"1"}"#)),
            ("q2", Some(r#"{"k":["v2","v1","v2"]}"#)),
        ]
    );
}

#[test]
fn content_type_response_topic_correlation_data_forwarded_mqtt_3_3_2_4_15_16_20() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-reqresp", 2);
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/req/+","qos":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/req/a","payload":"{\"op\":1}","qos":1,
             "properties":{"contentType":"application/json; charset=utf-8",
                           "responseTopic":"js5/resp/client-7",
                           "correlationDataHex":"00ff10fe7f80",
                           "payloadFormatIndicator":true}},
            {"topic":"js5/req/b","payload":"plain","qos":0,
             "properties":{"contentType":"text/plain"}},
            {"topic":"js5/req/c","payload":"bare","qos":1}]"#,
    );
    let ms = messages(&mut sub, 3, 10 * SEC);
    assert_eq!(payloads(&ms), ["{\"op\":1}", "plain", "bare"]);
    let m = &ms[0];
    // MQTT-3.3.2-20 / -15 / -16 / -4: sent on unaltered.
    assert_eq!(
        str_field(m, "contentType"),
        Some("application/json; charset=utf-8"),
        "{m:?}"
    );
    assert_eq!(
        str_field(m, "responseTopic"),
        Some("js5/resp/client-7"),
        "{m:?}"
    );
    assert_eq!(
        str_field(m, "correlationDataHex"),
        Some("00ff10fe7f80"),
        "{m:?}"
    );
    assert_eq!(bool_field(m, "payloadFormatIndicator"), Some(true), "{m:?}");
    assert_eq!(str_field(&ms[1], "contentType"), Some("text/plain"));
    // Nothing is invented for a message that had none.
    for k in [
        "contentType",
        "responseTopic",
        "correlationDataHex",
        "payloadFormatIndicator",
        "userProperties",
        "messageExpiryInterval",
    ] {
        assert!(!ms[2].contains_key(k), "{k} on a bare message: {:?}", ms[2]);
    }
    // Only message 0 had a response topic / correlation data.
    assert!(!ms[1].contains_key("responseTopic"), "{:?}", ms[1]);
    assert!(!ms[1].contains_key("correlationDataHex"), "{:?}", ms[1]);
}

#[test]
fn message_expiry_on_queued_messages_mqtt_3_3_2_5_6() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-msgexp", 2);
    let sub_spec = |extra: &str| {
        format!(
            r#"{{"clientId":{},"clean":false,"properties":{{"sessionExpiryInterval":30}}{extra}}}"#,
            jstr(&ids[0])
        )
    };
    run_js(
        port,
        "connect",
        &sub_spec(r#","subs":[{"filter":"js5/exp/t","qos":1}]"#),
    );
    // Queued for the offline session: one lives 1 s, one 10 s, one forever.
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/exp/t","payload":"short","qos":1,"properties":{"messageExpiryInterval":1}},
            {"topic":"js5/exp/t","payload":"long","qos":1,"properties":{"messageExpiryInterval":10}},
            {"topic":"js5/exp/t","payload":"forever","qos":1}]"#,
    );
    std::thread::sleep(Duration::from_millis(2300));
    let evs = run_js(port, "sub", &sub_spec(r#","quietMs":800,"publish":[]"#));
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(true)
    );
    let ms: Vec<Event> = evs.into_iter().filter(|e| kind(e) == "message").collect();
    // MQTT-3.3.2-5: the expired one is not delivered.
    assert_eq!(payloads(&ms), ["long", "forever"], "{ms:?}");
    // MQTT-3.3.2-6: the interval less the time it waited (2.3 s).
    let left = num_field(&ms[0], "messageExpiryInterval")
        .unwrap_or_else(|| panic!("no Message Expiry Interval: {:?}", ms[0]));
    assert!(
        (6..=8).contains(&left),
        "10 s less 2.3 s waited, got {left}"
    );
    assert!(!ms[1].contains_key("messageExpiryInterval"), "{:?}", ms[1]);
}

// ------------------------------------------------------------- subscriptions

#[test]
fn subscription_identifiers_on_deliveries_mqtt_3_3_4_3_4() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-subid", 2);
    let (mut sub, ready) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[
                {{"filter":"js5/si/#","qos":1,"id":5}},
                {{"filter":"js5/si/+","qos":0,"id":268435455}},
                {{"filter":"js5/si/a/+","qos":0}},
                {{"filter":"js5/other/#","qos":1,"id":3}}]}}"#,
            jstr(&ids[0])
        ),
    );
    assert_eq!(raw_field(&ready, "granted"), Some("[1,0,0,1]"));
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/si/a","payload":"two-ids","qos":1},
            {"topic":"js5/si/a/b","payload":"one-id","qos":1},
            {"topic":"js5/other/x","payload":"other","qos":0}]"#,
    );
    messages(&mut sub, 3, 10 * SEC);
    let ms = all_messages_after(&mut sub, Duration::from_millis(700));
    // One copy per message (coremq's contract), each with the identifiers of
    // every matching subscription that has one (MQTT-3.3.4-3/4), at the
    // highest QoS of the matching subscriptions.
    assert_eq!(
        payloads(&ms),
        ["two-ids", "one-id", "other"],
        "one copy each: {ms:?}"
    );
    let ids_of = |m: &Event| -> BTreeSet<u64> {
        if let Some(n) = num_field(m, "subscriptionIdentifier") {
            return BTreeSet::from([n]);
        }
        // Several identifiers: the script prints MQTT.js's array as text.
        str_field(m, "subscriptionIdentifier")
            .unwrap_or_else(|| panic!("no Subscription Identifier: {m:?}"))
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.trim().parse().expect("a number"))
            .collect()
    };
    assert_eq!(
        ids_of(&ms[0]),
        BTreeSet::from([5, 268_435_455]),
        "{:?}",
        ms[0]
    );
    assert_eq!(num_field(&ms[0], "qos"), Some(1), "{:?}", ms[0]);
    assert_eq!(ids_of(&ms[1]), BTreeSet::from([5]), "{:?}", ms[1]);
    assert_eq!(ids_of(&ms[2]), BTreeSet::from([3]), "{:?}", ms[2]);
    assert_eq!(num_field(&ms[2], "qos"), Some(0), "{:?}", ms[2]);
}

#[test]
fn no_local_keeps_own_messages_from_the_publisher_mqtt_3_8_3_3() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-nolocal", 2);
    // The subscriber publishes on both topics itself, then another client
    // (on another shard) publishes on the No Local one.
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},
                "subs":[{{"filter":"js5/nl/a","qos":1,"nl":true}},
                        {{"filter":"js5/nl/b","qos":1,"nl":false}}],
                "publish":[{{"topic":"js5/nl/a","payload":"own-a","qos":1}},
                           {{"topic":"js5/nl/b","payload":"own-b","qos":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    wait_event(&mut sub, "done", 10 * SEC);
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/nl/a","payload":"other-a","qos":1}]"#,
    );
    messages(&mut sub, 2, 10 * SEC);
    let ms = all_messages_after(&mut sub, Duration::from_millis(700));
    let got: BTreeSet<String> = payloads(&ms).into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from(["own-b".to_string(), "other-a".to_string()]),
        "No Local: own-a must not come back, the rest must: {ms:?}"
    );
    assert_eq!(ms.len(), 2, "{ms:?}");
}

#[test]
fn retain_handling_0_and_2_mqtt_3_3_1_9_11() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-rh", 3);
    publish(
        port,
        &ids[2],
        r#"[{"topic":"js5/rh/t","payload":"stored","qos":1,"retain":true}]"#,
    );
    let spec = |id: &str, rh: u8| {
        format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/rh/#","qos":1,"rh":{rh}}}]}}"#,
            jstr(id)
        )
    };
    // Retain Handling 2: no retained message on subscribe (MQTT-3.3.1-11).
    let (mut never, _) = subscriber(port, &spec(&ids[0], 2));
    // Retain Handling 0: the retained message (MQTT-3.3.1-9).
    let (mut always, _) = subscriber(port, &spec(&ids[1], 0));
    let m = &messages(&mut always, 1, 5 * SEC)[0];
    assert_eq!(str_field(m, "payload"), Some("stored"), "{m:?}");
    assert_eq!(bool_field(m, "retain"), Some(true), "{m:?}");
    let early = all_messages_after(&mut never, Duration::from_millis(800));
    assert!(early.is_empty(), "Retain Handling 2 got {early:?}");
    // It is subscribed all the same.
    publish(
        port,
        &ids[2],
        r#"[{"topic":"js5/rh/t","payload":"live","qos":1}]"#,
    );
    let m = &messages(&mut never, 1, 5 * SEC)[0];
    assert_eq!(str_field(m, "payload"), Some("live"), "{m:?}");
    assert_eq!(bool_field(m, "retain"), Some(false), "{m:?}");
}

#[test]
fn retain_handling_1_only_for_a_new_subscription_mqtt_3_3_1_10() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-rh1", 2);
    publish(
        port,
        &ids[1],
        r#"[{"topic":"js5/rh1/t","payload":"stored","qos":1,"retain":true}]"#,
    );
    // The same filter twice with Retain Handling 1: only the first SUBSCRIBE
    // makes a new subscription, so the retained message comes once.
    let (mut sub, ready) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/rh1/#","qos":1,"rh":1}},
                                     {{"filter":"js5/rh1/#","qos":1,"rh":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    assert_eq!(raw_field(&ready, "granted"), Some("[1,1]"));
    messages(&mut sub, 1, 5 * SEC);
    let ms = all_messages_after(&mut sub, Duration::from_millis(800));
    assert_eq!(payloads(&ms), ["stored"], "{ms:?}");
}

#[test]
fn retain_as_published_on_live_delivery_mqtt_3_3_1_12_13() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-rap", 3);
    let spec = |id: &str, rap: bool| {
        format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/rap/t","qos":1,"rap":{rap}}}]}}"#,
            jstr(id)
        )
    };
    let (mut kept, _) = subscriber(port, &spec(&ids[0], true));
    let (mut cleared, _) = subscriber(port, &spec(&ids[1], false));
    publish(
        port,
        &ids[2],
        r#"[{"topic":"js5/rap/t","payload":"r1","qos":1,"retain":true},
            {"topic":"js5/rap/t","payload":"n1","qos":1,"retain":false}]"#,
    );
    let flags = |ms: &[Event]| -> Vec<(String, Option<bool>)> {
        ms.iter()
            .map(|m| {
                (
                    str_field(m, "payload").unwrap_or("?").to_string(),
                    bool_field(m, "retain"),
                )
            })
            .collect()
    };
    // MQTT-3.3.1-13: Retain As Published keeps the publisher's RETAIN.
    assert_eq!(
        flags(&messages(&mut kept, 2, 5 * SEC)),
        [
            ("r1".to_string(), Some(true)),
            ("n1".to_string(), Some(false))
        ]
    );
    // MQTT-3.3.1-12: without it, live deliveries have RETAIN 0.
    assert_eq!(
        flags(&messages(&mut cleared, 2, 5 * SEC)),
        [
            ("r1".to_string(), Some(false)),
            ("n1".to_string(), Some(false))
        ]
    );
}

// ------------------------------------------------------------- topic aliases

/// Publishes `rounds` messages round robin over `topics` topics (payload
/// `TOPIC#N`) to a subscriber connected with `connect_props`; returns what
/// it received, in order.
fn alias_run(server: &Server, prefix: &str, connect_props: &str, topics: usize) -> Vec<Event> {
    let port = server.port();
    let ids = ids_on_distinct_shards(prefix, 2);
    let rounds = 8;
    let n = topics * rounds;
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"properties":{connect_props},"subs":[{{"filter":"{prefix}/#","qos":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    let msgs: Vec<String> = (0..n)
        .map(|i| {
            let topic = format!("{prefix}/topic-{}", i % topics);
            format!(r#"{{"topic":"{topic}","payload":"{topic}#{i}","qos":1}}"#)
        })
        .collect();
    publish(port, &ids[1], &format!("[{}]", msgs.join(",")));
    let ms = messages(&mut sub, n, 10 * SEC);
    let extra = sub.drain(Duration::from_millis(300));
    assert!(
        extra.iter().all(|l| !l.contains("\"error\"")),
        "MQTT.js reported an error: {extra:?}"
    );
    // Every message arrives, in order, under its own topic name.
    let got = topics_and_payloads(&ms);
    let want: Vec<(String, String)> = (0..n)
        .map(|i| {
            let topic = format!("{prefix}/topic-{}", i % topics);
            (topic.clone(), format!("{topic}#{i}"))
        })
        .collect();
    assert_eq!(got, want);
    ms
}

#[test]
fn server_topic_aliases_within_client_maximum_mqtt_3_1_2_26() {
    let server = Server::start(&[]);
    // 5 topics, and the client takes at most 3 aliases.
    let ms = alias_run(&server, "js5ta", r#"{"topicAliasMaximum":3}"#, 5);
    let mut alias_of: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut alias_only = 0;
    for m in &ms {
        let Some(a) = num_field(m, "topicAlias") else {
            continue;
        };
        assert!(
            (1..=3).contains(&a),
            "alias {a} beyond the maximum 3: {m:?}"
        );
        let topic = str_field(m, "topic").unwrap().to_string();
        match str_field(m, "wireTopic") {
            Some("") => alias_only += 1,
            Some(t) => assert_eq!(t, topic, "{m:?}"),
            None => panic!("{m:?}"),
        }
        alias_of.entry(a).or_default().insert(topic);
    }
    // The broker uses aliases (contract: the first topics it sends get one,
    // later deliveries carry only the alias).
    assert!(
        alias_only >= 10,
        "only {alias_only} of {} deliveries used an alias alone: {ms:?}",
        ms.len()
    );
    assert!(alias_of.len() <= 3, "{alias_of:?}");
}

#[test]
fn no_topic_aliases_without_client_maximum_mqtt_3_1_2_27() {
    let server = Server::start(&[]);
    for props in ["{}", r#"{"topicAliasMaximum":0}"#] {
        let prefix = if props == "{}" { "js5noa" } else { "js5zeroa" };
        let ms = alias_run(&server, prefix, props, 3);
        for m in &ms {
            assert!(!m.contains_key("topicAlias"), "alias sent: {m:?}");
            assert_eq!(str_field(m, "wireTopic"), str_field(m, "topic"), "{m:?}");
        }
    }
}

// ------------------------------------------------------------- shared subscriptions

#[test]
fn shared_subscription_each_message_to_one_member_4_8_2() {
    let server = Server::start(&[]);
    let port = server.port();
    // Two members and a plain subscriber on three shards, publisher on the
    // fourth.
    let ids = ids_on_distinct_shards("js5-share", 4);
    publish(
        port,
        &ids[3],
        r#"[{"topic":"js5/sh/t","payload":"old","qos":1,"retain":true}]"#,
    );
    let member = |id: &str| {
        subscriber(
            port,
            &format!(
                r#"{{"clientId":{},"subs":[{{"filter":"$share/g/js5/sh/+","qos":1}}]}}"#,
                jstr(id)
            ),
        )
    };
    let (mut m1, r1) = member(&ids[0]);
    let (mut m2, r2) = member(&ids[1]);
    assert_eq!(raw_field(&r1, "granted"), Some("[1]"));
    assert_eq!(raw_field(&r2, "granted"), Some("[1]"));
    let (mut plain, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/sh/+","qos":1}}]}}"#,
            jstr(&ids[2])
        ),
    );
    // The plain subscription gets the retained message; shared ones do not.
    let old = messages(&mut plain, 1, 5 * SEC);
    assert_eq!(payloads(&old), ["old"]);

    let n = 20;
    let msgs: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"topic":"js5/sh/t","payload":"m{i}","qos":1}}"#))
        .collect();
    publish(port, &ids[3], &format!("[{}]", msgs.join(",")));

    let all = payloads(&messages(&mut plain, n + 1, 10 * SEC));
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(all[1..], want, "the plain subscriber gets everything");

    let deadline = Instant::now() + 10 * SEC;
    while seen_messages(&m1).len() + seen_messages(&m2).len() < n && Instant::now() < deadline {
        m1.drain(Duration::from_millis(100));
        m2.drain(Duration::from_millis(100));
    }
    let got1 = payloads(&all_messages_after(&mut m1, Duration::from_millis(500)));
    let got2 = payloads(&all_messages_after(&mut m2, Duration::from_millis(100)));
    let mut union: Vec<String> = got1.iter().chain(&got2).cloned().collect();
    union.sort_by_key(|p| p.trim_start_matches('m').parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(
        union, want,
        "each message exactly once across the group (no retained 'old'): m1={got1:?} m2={got2:?}"
    );
    // Round robin over the connected members (coremq's contract).
    assert!(
        got1.len() >= 5 && got2.len() >= 5,
        "round robin: m1 got {}, m2 got {}",
        got1.len(),
        got2.len()
    );
}

// ------------------------------------------------------------- takeover

#[test]
fn takeover_sends_disconnect_0x8e_to_old_connection_mqtt_3_1_4_3() {
    let server = Server::start(&[]);
    let port = server.port();
    let (mut old, _) = subscriber(
        port,
        r#"{"clientId":"js5-takeover","subs":[{"filter":"js5/take/t","qos":0}]}"#,
    );
    let evs = run_js(port, "connect", r#"{"clientId":"js5-takeover"}"#);
    assert_eq!(num_field(first(&evs, "connect"), "reasonCode"), Some(0));
    let d = wait_event(&mut old, "disconnect", 5 * SEC);
    assert_eq!(
        num_field(&d, "reasonCode"),
        Some(0x8E),
        "Session taken over: {d:?}"
    );
    wait_event(&mut old, "close", 5 * SEC);
}

// ------------------------------------------------------------- flow control

#[test]
fn receive_maximum_limits_unacknowledged_deliveries_mqtt_3_3_4_9() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-recvmax", 2);
    // The subscriber takes 3 unacknowledged QoS 1/2 PUBLISHes at a time and
    // holds its acknowledgements for 1 s after the first one arrives.
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"properties":{{"receiveMaximum":3}},"holdAcksMs":1000,
                "subs":[{{"filter":"js5/rm/t","qos":2}}]}}"#,
            jstr(&ids[0])
        ),
    );
    let n = 10;
    let msgs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"topic":"js5/rm/t","payload":"m{i}","qos":{}}}"#,
                1 + i % 2
            )
        })
        .collect();
    publish(port, &ids[1], &format!("[{}]", msgs.join(",")));
    let released = wait_event(&mut sub, "released", 10 * SEC);
    let before: Vec<Event> = sub
        .seen
        .iter()
        .map(|l| event(l))
        .take_while(|e| kind(e) != "released")
        .filter(|e| kind(e) == "arrived")
        .collect();
    assert_eq!(
        num_field(&released, "held"),
        Some(before.len() as u64),
        "{:?}",
        sub.seen
    );
    assert!(
        (1..=3).contains(&before.len()),
        "{} PUBLISHes awaited acknowledgement at once; the client's Receive Maximum is 3: {:?}",
        before.len(),
        sub.seen
    );
    // Once acknowledged, the rest follow, in order (as they reach the
    // client: MQTT.js reports a QoS 2 message only at PUBREL).
    messages(&mut sub, n, 10 * SEC);
    let arrived: Vec<String> = sub
        .seen
        .iter()
        .map(|l| event(l))
        .filter(|e| kind(e) == "arrived")
        .map(|e| str_field(&e, "payload").unwrap_or("?").to_string())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(arrived, want);
}

#[test]
fn nothing_above_client_maximum_packet_size_mqtt_3_1_2_24() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-maxpkt", 3);
    let sub_spec = |id: &str, props: &str| {
        format!(
            r#"{{"clientId":{},"properties":{props},"subs":[{{"filter":"js5/mp/+","qos":1}}]}}"#,
            jstr(id)
        )
    };
    let (mut small, _) = subscriber(port, &sub_spec(&ids[0], r#"{"maximumPacketSize":256}"#));
    let (mut big, _) = subscriber(port, &sub_spec(&ids[1], "{}"));
    let large = "x".repeat(600);
    publish(
        port,
        &ids[2],
        &format!(
            r#"[{{"topic":"js5/mp/a","payload":"small","qos":1}},
                {{"topic":"js5/mp/b","payload":"{large}","qos":1}},
                {{"topic":"js5/mp/c","payload":"after","qos":0}}]"#
        ),
    );
    let all = payloads(&messages(&mut big, 3, 10 * SEC));
    assert_eq!(all, ["small", large.as_str(), "after"]);
    // The 600-byte PUBLISH is skipped for the 256-byte client, which stays
    // connected and gets what fits.
    messages(&mut small, 2, 10 * SEC);
    let got = payloads(&all_messages_after(&mut small, Duration::from_millis(500)));
    assert_eq!(got, ["small", "after"]);
    assert!(
        !small.seen.iter().any(|l| l.contains("\"disconnect\"")),
        "{:?}",
        small.seen
    );
}

// ------------------------------------------------------------- reason codes

/// The reason codes of the PUBACK / PUBREC lines in `evs`.
fn ack_codes(evs: &[Event]) -> Vec<(String, u64)> {
    evs.iter()
        .filter(|e| kind(e) == "ack" && str_field(e, "cmd") != Some("pubcomp"))
        .map(|e| {
            (
                str_field(e, "cmd").unwrap_or("?").to_string(),
                num_field(e, "reasonCode").unwrap_or(u64::MAX),
            )
        })
        .collect()
}

#[test]
fn puback_pubrec_0x10_no_matching_subscribers_single_shard_3_4_2_1() {
    let server = Server::start(&["--shards", "1"]);
    let port = server.port();
    let two = r#"[{"topic":"js5/nm/t","payload":"a","qos":1},
                  {"topic":"js5/nm/t","payload":"b","qos":2}]"#;
    let spec = format!(r#"{{"clientId":"js5-nomatch-pub","logAcks":true,"publish":{two}}}"#);
    let evs = run_js(port, "pub", &spec);
    assert_eq!(
        ack_codes(&evs),
        [("puback".to_string(), 0x10), ("pubrec".to_string(), 0x10)],
        "{evs:?}"
    );
    // With a subscriber: Success.
    let (mut sub, _) = subscriber(
        port,
        r#"{"clientId":"js5-nomatch-sub","subs":[{"filter":"js5/nm/#","qos":1}]}"#,
    );
    let evs = run_js(port, "pub", &spec);
    assert_eq!(
        ack_codes(&evs),
        [("puback".to_string(), 0), ("pubrec".to_string(), 0)],
        "{evs:?}"
    );
    messages(&mut sub, 2, 5 * SEC);
}

#[test]
fn puback_codes_know_subscribers_on_other_shards_3_4_2_1() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-acks", 2);
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/ak/#","qos":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    // The publisher's shard knows the other shards' filters: 0x00 for a
    // subscriber elsewhere, 0x10 for a topic nobody anywhere subscribes to.
    let evs = run_js(
        port,
        "pub",
        &format!(
            r#"{{"clientId":{},"logAcks":true,"publish":[
                {{"topic":"js5/ak/t","payload":"a","qos":1}},
                {{"topic":"js5/ak/t","payload":"b","qos":2}},
                {{"topic":"js5/nobody/t","payload":"c","qos":1}}]}}"#,
            jstr(&ids[1])
        ),
    );
    assert_eq!(
        ack_codes(&evs),
        [
            ("puback".to_string(), 0),
            ("pubrec".to_string(), 0),
            ("puback".to_string(), 0x10)
        ],
        "{evs:?}"
    );
    assert_eq!(payloads(&messages(&mut sub, 2, 5 * SEC)), ["a", "b"]);
}

// ------------------------------------------------------------- DISCONNECT

#[test]
fn disconnect_0x04_publishes_will_0x00_discards_it_mqtt_3_14_4_3() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-disc", 4);
    let (mut watcher, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/will/#","qos":1}}]}}"#,
            jstr(&ids[3])
        ),
    );
    let client = |id: &str, how: &str| {
        let spec = format!(
            r#"{{"clientId":{},"will":{{"topic":"js5/will/{id}","payload":"gone","qos":1}},{how}}}"#,
            jstr(id)
        );
        run_js(port, "connect", &spec);
    };
    // 0x04 Disconnect with Will Message: the will is published.
    client(&ids[0], r#""disconnect":{"reasonCode":4}"#);
    // 0x00 Normal disconnection: discarded (MQTT-3.14.4-3).
    client(&ids[1], r#""disconnect":{"reasonCode":0}"#);
    // No DISCONNECT at all: published.
    client(&ids[2], r#""abort":true"#);
    messages(&mut watcher, 2, 5 * SEC);
    let ms = all_messages_after(&mut watcher, Duration::from_millis(800));
    let mut topics: Vec<&str> = ms.iter().filter_map(|m| str_field(m, "topic")).collect();
    topics.sort();
    let mut want = vec![
        format!("js5/will/{}", ids[0]),
        format!("js5/will/{}", ids[2]),
    ];
    want.sort();
    assert_eq!(topics, want, "{ms:?}");
}

#[test]
fn disconnect_raising_zero_session_expiry_is_protocol_error_mqtt_3_14_2_2() {
    let server = Server::start(&[]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-disc82", 2);
    let (mut watcher, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/will82/#","qos":1}}]}}"#,
            jstr(&ids[1])
        ),
    );
    // CONNECT without a Session Expiry Interval (0), DISCONNECT with 30: a
    // Protocol Error, so the connection closes as on an error and the will
    // is published although the DISCONNECT said 0x00.
    run_js(
        port,
        "connect",
        &format!(
            r#"{{"clientId":{},"will":{{"topic":"js5/will82/x","payload":"w","qos":1}},
                "disconnect":{{"reasonCode":0,"properties":{{"sessionExpiryInterval":30}}}}}}"#,
            jstr(&ids[0])
        ),
    );
    let m = &messages(&mut watcher, 1, 5 * SEC)[0];
    assert_eq!(str_field(m, "topic"), Some("js5/will82/x"), "{m:?}");
    // And no session was kept for it.
    let evs = run_js(
        port,
        "connect",
        &format!(
            r#"{{"clientId":{},"clean":false,"properties":{{"sessionExpiryInterval":30}}}}"#,
            jstr(&ids[0])
        ),
    );
    assert_eq!(
        bool_field(first(&evs, "connect"), "sessionPresent"),
        Some(false),
        "{evs:?}"
    );
}

#[test]
fn shared_subscription_with_no_local_is_protocol_error_mqtt_3_8_3_4() {
    let server = Server::start(&[]);
    let port = server.port();
    let mut p = spawn_js(
        port,
        "sub",
        r#"{"clientId":"js5-share-nl","subs":[{"filter":"$share/g/js5/x","qos":1,"nl":true}]}"#,
    );
    let l = p.wait_line(10 * SEC, |l| {
        l.contains("\"disconnect\"") || l.contains("\"ready\"") || l.contains("\"close\"")
    });
    let d = event(&l);
    assert_eq!(kind(&d), "disconnect", "{:?}", p.seen);
    assert_eq!(num_field(&d, "reasonCode"), Some(0x82), "{d:?}");
}

#[test]
fn sigterm_sends_disconnect_0x8b_server_shutting_down() {
    let server = Server::start(&[]);
    let Some(broker) = server.coremq() else {
        return; // coremq's shutdown only
    };
    let (mut sub, _) = subscriber(
        server.port(),
        r#"{"clientId":"js5-shutdown","subs":[{"filter":"js5/sd/t","qos":1}]}"#,
    );
    broker.signal(libc::SIGTERM);
    let d = wait_event(&mut sub, "disconnect", 5 * SEC);
    assert_eq!(num_field(&d, "reasonCode"), Some(0x8B), "{d:?}");
}

#[test]
fn server_keep_alive_enforced_with_disconnect_0x8d_mqtt_3_1_2_21_22() {
    let server = Server::start(&["--max-keepalive", "1"]);
    let port = server.port();
    // Keep-alive 0 asks for none: the broker imposes 1 s. MQTT.js pings only
    // when it asked for a keep-alive itself, so this client stays silent.
    let mut silent = spawn_js(
        port,
        "sub",
        r#"{"clientId":"js5-ka-silent","keepalive":0,"subs":[{"filter":"js5/ka/t","qos":0}]}"#,
    );
    let c = wait_event(&mut silent, "connect", 10 * SEC);
    assert_eq!(num_field(&c, "serverKeepAlive"), Some(1), "{c:?}");
    // Asking for 5 s gets 1 s too; MQTT.js then pings every second.
    let (mut pinging, _) = subscriber(
        port,
        r#"{"clientId":"js5-ka-ping","keepalive":5,"subs":[{"filter":"js5/ka/t","qos":0}]}"#,
    );
    let ready = wait_event(&mut silent, "ready", 10 * SEC);
    let d = wait_event(&mut silent, "disconnect", 5 * SEC);
    assert_eq!(num_field(&d, "reasonCode"), Some(0x8D), "{d:?}");
    // The SUBSCRIBE (just before "ready") was its last packet.
    let after = num_field(&d, "t").unwrap() - num_field(&ready, "t").unwrap();
    assert!(
        (1400..=2500).contains(&after),
        "closed {after} ms after the last packet; 1.5 x 1 s expected"
    );
    // The pinging client is still there (3 s > 1.5 x 1 s).
    std::thread::sleep(Duration::from_millis(1500));
    let lines = pinging.drain(Duration::from_millis(100));
    assert!(
        !pinging
            .seen
            .iter()
            .any(|l| l.contains("\"disconnect\"") || l.contains("\"close\"")),
        "{:?} {lines:?}",
        pinging.seen
    );
}

#[test]
fn unsuback_reason_codes_success_and_no_subscription_existed_3_11_3() {
    let server = Server::start(&[]);
    let evs = run_js(
        server.port(),
        "connect",
        r#"{"clientId":"js5-unsub","subs":[{"filter":"js5/un/a","qos":1}],
            "unsubs":["js5/un/a","js5/un/a","js5/un/never"]}"#,
    );
    let codes: Vec<(&str, &str)> = evs
        .iter()
        .filter(|e| kind(e) == "unsubscribed")
        .map(|e| {
            (
                str_field(e, "filter").unwrap_or("?"),
                str_field(e, "codes").unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("js5/un/a", "[0]"),
            ("js5/un/a", "[17]"),
            ("js5/un/never", "[17]")
        ],
        "{evs:?}"
    );
}

#[test]
fn client_topic_aliases_resolved_and_not_forwarded_3_3_2_3_4() {
    // The server takes 2 aliases; MQTT.js reassigns them over 4 topics.
    let server = Server::start(&["--max-topic-alias", "2"]);
    let port = server.port();
    let ids = ids_on_distinct_shards("js5-calias", 3);
    // The subscriber accepts no aliases, so none may reach it.
    let (mut sub, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":"js5/ca/#","qos":1}}]}}"#,
            jstr(&ids[0])
        ),
    );
    let topics = 4;
    let n = topics * 5;
    let msgs: Vec<String> = (0..n)
        .map(|i| {
            let t = format!("js5/ca/{}", i % topics);
            // The last one is retained.
            let retain = i == n - 1;
            format!(r#"{{"topic":"{t}","payload":"{t}#{i}","qos":1,"retain":{retain}}}"#)
        })
        .collect();
    let evs = run_js(
        port,
        "pub",
        &format!(
            r#"{{"clientId":{},"autoAlias":true,"publish":[{}]}}"#,
            jstr(&ids[1]),
            msgs.join(",")
        ),
    );
    let max = num_field(first(&evs, "connect"), "topicAliasMaximum");
    if server.coremq().is_some() {
        assert_eq!(max, Some(2));
    }
    let ms = messages(&mut sub, n, 10 * SEC);
    let got = topics_and_payloads(&ms);
    let want: Vec<(String, String)> = (0..n)
        .map(|i| {
            let t = format!("js5/ca/{}", i % topics);
            (t.clone(), format!("{t}#{i}"))
        })
        .collect();
    assert_eq!(got, want);
    for m in &ms {
        assert!(!m.contains_key("topicAlias"), "{m:?}");
    }
    // The retained message is kept under its topic name, not the alias.
    let last = format!("js5/ca/{}", (n - 1) % topics);
    let (mut late, _) = subscriber(
        port,
        &format!(
            r#"{{"clientId":{},"subs":[{{"filter":{},"qos":1}}]}}"#,
            jstr(&ids[2]),
            jstr(&last)
        ),
    );
    let m = &messages(&mut late, 1, 5 * SEC)[0];
    assert_eq!(str_field(m, "topic"), Some(last.as_str()), "{m:?}");
    assert_eq!(bool_field(m, "retain"), Some(true), "{m:?}");
    assert!(!m.contains_key("topicAlias"), "{m:?}");
}

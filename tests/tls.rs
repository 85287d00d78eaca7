//! TLS listeners against the real binary: `--tls-listen`, `--cert`/`--key`,
//! `--client-ca`, `--require-client-cert` and `--use-identity-as-username`,
//! with real clients: mosquitto_pub/sub over TLS beside plain-TCP clients,
//! paho-mqtt with and without client certificates
//! (tests/scripts/paho_tls.py), Python's `ssl` module for session
//! resumption (tests/scripts/tls_resume.py), and a raw socket sending a
//! plain MQTT CONNECT to the TLS port.
//!
//! Every certificate is generated inside the test with rcgen
//! (tests/common/certs.rs): a test CA, a server certificate for localhost
//! and 127.0.0.1, client certificates by CN, an unrelated CA and expired
//! certificates. Refusals must be clean: the client fails, the broker
//! carries on serving and never panics (checked on drop).
//!
//! The TLS counters (`tls_handshakes`, `tls_handshake_failures`,
//! `tls_resumed`) are read in one place per test, so a rename is one edit.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::certs::{path_str, CertFiles, Pki, Validity};
use common::{
    counter, json, mosquitto_sub_ready, next_message_line, python_script, run_bounded, tools,
    unused_port, wait_listening, wait_until, Broker, ConnectOpts, LineProc, RawClient, TempDir,
    COREMQ,
};

const SEC: Duration = Duration::from_secs(1);

/// A broker with its plain listener (harness) and `--tls-listen` on a
/// second port, serving `server`; returns it and the TLS port.
fn start_tls(server: &CertFiles, extra: &[&str]) -> (Broker, u16) {
    let tls_port = unused_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let mut args = vec![
        "--tls-listen",
        &listen,
        "--cert",
        server.cert(),
        "--key",
        server.key(),
    ];
    args.extend_from_slice(extra);
    let broker = Broker::start(&args);
    assert!(
        wait_listening(tls_port, 5 * SEC),
        "nothing listens on --tls-listen {listen}; stderr:\n{}",
        broker.log_text()
    );
    (broker, tls_port)
}

/// mosquitto's TLS options: trust `ca`, and present `client` if given.
fn tls_opts<'a>(ca: &'a str, client: Option<&'a CertFiles>) -> Vec<&'a str> {
    let mut v = vec!["--cafile", ca];
    if let Some(c) = client {
        v.extend(["--cert", c.cert(), "--key", c.key()]);
    }
    v
}

/// mosquitto_pub to 127.0.0.1:`port` (the server certificate's IP SAN)
/// with `args`: its exit code and output.
fn mosquitto_pub(port: u16, args: &[&str]) -> (Option<i32>, String) {
    let (code, out, err) = run_bounded(
        Command::new(&tools().mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        15 * SEC,
    );
    (code, format!("{out}{err}"))
}

/// mosquitto_pub that must succeed.
fn mosquitto_pub_ok(port: u16, args: &[&str]) {
    let (code, out) = mosquitto_pub(port, args);
    assert_eq!(code, Some(0), "mosquitto_pub {args:?}: {out}");
}

/// mosquitto_pub that must fail (non-zero exit, or killed at the bound).
fn mosquitto_pub_refused(port: u16, args: &[&str], why: &str) {
    let (code, out) = mosquitto_pub(port, args);
    assert_ne!(
        code,
        Some(0),
        "{why}: mosquitto_pub {args:?} succeeded: {out}"
    );
}

/// The next `n` message lines of a `mosquitto_sub -v`, sorted.
fn messages(sub: &mut LineProc, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n)
        .map(|i| {
            next_message_line(sub, 5 * SEC)
                .unwrap_or_else(|| panic!("message {i} of {n} missing; stdout {:?}", sub.seen))
        })
        .collect();
    v.sort();
    v
}

/// Message lines (not `-d` debug lines) that arrive within `quiet`.
fn stray_messages(sub: &mut LineProc, quiet: Duration) -> Vec<String> {
    sub.drain(quiet)
        .into_iter()
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid"))
        .collect()
}

fn is_null(v: &json::Value) -> bool {
    matches!(v, json::Value::Null)
}

/// Runs tests/scripts/paho_tls.py and parses its one JSON line.
fn paho_tls(args: &[&str]) -> HashMap<String, json::Value> {
    let (code, out, err) = run_bounded(&mut python_script("paho_tls.py", args), 30 * SEC);
    assert_eq!(code, Some(0), "paho_tls.py {args:?}: {out}{err}");
    let line = out.lines().last().unwrap_or_default();
    json::parse_object(line).unwrap_or_else(|| panic!("not JSON: {out}{err}"))
}

/// TLS and plain-TCP clients share one broker: mosquitto_pub over TLS at
/// QoS 0, 1 and 2 reaches a TLS subscriber and a plain one alike (the QoS 2
/// flow runs over TLS), and a plain publish reaches the TLS subscriber.
#[test]
fn mosquitto_over_tls_and_plain_tcp_share_the_broker() {
    let dir = TempDir::new("tls-mosq");
    let pki = Pki::new(&dir);
    let (broker, tls) = start_tls(&pki.server, &[]);
    let ca = pki.ca.pem();
    let mut tls_opts_sub = tls_opts(ca, None);
    tls_opts_sub.extend(["-t", "mix/#", "-q", "2"]);
    let mut tls_sub = mosquitto_sub_ready(tls, &tls_opts_sub);
    let mut tcp_sub = mosquitto_sub_ready(broker.port(), &["-t", "mix/#", "-q", "2"]);

    for q in ["0", "1", "2"] {
        let payload = format!("tls-q{q}");
        let mut args = tls_opts(ca, None);
        args.extend(["-t", "mix/tls", "-m", &payload, "-q", q]);
        mosquitto_pub_ok(tls, &args);
    }
    mosquitto_pub_ok(broker.port(), &["-t", "mix/tcp", "-m", "tcp-q1", "-q", "1"]);

    let want = [
        "mix/tcp tcp-q1",
        "mix/tls tls-q0",
        "mix/tls tls-q1",
        "mix/tls tls-q2",
    ];
    assert_eq!(messages(&mut tls_sub, 4), want, "TLS subscriber");
    assert_eq!(messages(&mut tcp_sub, 4), want, "plain subscriber");
    assert!(
        tls_sub
            .seen
            .iter()
            .any(|l| l.contains("received PUBLISH (d0, q2")),
        "the QoS 2 message reached the TLS subscriber at QoS 2: {:?}",
        tls_sub.seen
    );

    let stats = broker.fresh_stats();
    assert!(counter(&stats, "tls_handshakes") >= 4, "1 sub + 3 pubs");
    assert_eq!(counter(&stats, "tls_handshake_failures"), 0);
}

/// paho-mqtt with a client certificate from `--client-ca` gets in and
/// exchanges QoS 0/1/2 messages under `--require-client-cert`; without a
/// certificate the handshake fails and no CONNACK 0 ever comes.
#[test]
fn paho_with_a_client_certificate_gets_in_and_without_one_is_refused() {
    let dir = TempDir::new("tls-paho");
    let pki = Pki::new(&dir);
    let client = pki
        .ca
        .client(&dir, "paho-client", "paho-client", Validity::Current);
    let ca = pki.ca.pem();
    let (_broker, tls) = start_tls(&pki.server, &["--client-ca", ca, "--require-client-cert"]);
    let port = tls.to_string();

    let r = paho_tls(&[
        "pubsub",
        &port,
        "localhost",
        ca,
        client.cert(),
        client.key(),
        "paho/tls",
    ]);
    assert_eq!(r["connack"].as_u64(), Some(0), "{r:?}");
    assert_eq!(r["received"].as_str(), Some("q0,q1,q2"), "{r:?}");

    let r = paho_tls(&["connect", &port, "localhost", ca, "-", "-"]);
    assert!(
        is_null(&r["connack"]) && !is_null(&r["error"]),
        "a client without a certificate must fail the handshake: {r:?}"
    );
    // A certificate the client CA did not sign is no better than none.
    let stranger = pki
        .wrong_ca
        .client(&dir, "stranger", "paho-client", Validity::Current);
    let r = paho_tls(&[
        "connect",
        &port,
        "localhost",
        ca,
        stranger.cert(),
        stranger.key(),
    ]);
    assert!(
        is_null(&r["connack"]),
        "untrusted client certificate: {r:?}"
    );
}

/// `--client-ca` without `--require-client-cert`: a client may come
/// without a certificate, one with a good certificate gets in too, and a
/// certificate the CA did not sign is still refused (it is verified).
#[test]
fn client_ca_without_require_makes_the_certificate_optional_but_verified() {
    let dir = TempDir::new("tls-optional");
    let pki = Pki::new(&dir);
    let ca = pki.ca.pem();
    let good = pki.ca.client(&dir, "good", "device-1", Validity::Current);
    let stranger = pki
        .wrong_ca
        .client(&dir, "stranger", "device-1", Validity::Current);
    let (_broker, tls) = start_tls(&pki.server, &["--client-ca", ca]);
    let port = tls.to_string();

    let r = paho_tls(&["connect", &port, "localhost", ca, "-", "-"]);
    assert_eq!(r["connack"].as_u64(), Some(0), "no certificate: {r:?}");
    let r = paho_tls(&["connect", &port, "localhost", ca, good.cert(), good.key()]);
    assert_eq!(r["connack"].as_u64(), Some(0), "good certificate: {r:?}");
    let r = paho_tls(&[
        "connect",
        &port,
        "localhost",
        ca,
        stranger.cert(),
        stranger.key(),
    ]);
    assert!(
        is_null(&r["connack"]),
        "untrusted client certificate: {r:?}"
    );
}

/// `--use-identity-as-username`: the client certificate's CN is the MQTT
/// user the ACL file is applied to, whatever the CONNECT says (its
/// username and password are ignored; the password file is not consulted
/// even with `--allow-anonymous false`). device-7 may read and write
/// devices/device-7/# only; `watcher` may read devices/#.
#[test]
fn identity_as_username_applies_the_acl_of_the_certificate_cn() {
    let dir = TempDir::new("tls-identity");
    let pki = Pki::new(&dir);
    let ca = pki.ca.pem();
    let dev7 = pki
        .ca
        .client(&dir, "device-7", "device-7", Validity::Current);
    let dev8 = pki
        .ca
        .client(&dir, "device-8", "device-8", Validity::Current);
    let watcher = pki.ca.client(&dir, "watcher", "watcher", Validity::Current);
    let acl = dir.path("acl");
    std::fs::write(
        &acl,
        "user device-7\ntopic readwrite devices/device-7/#\n\n\
         user device-8\ntopic readwrite devices/device-8/#\n\n\
         user watcher\ntopic read devices/#\n",
    )
    .unwrap();
    // One user with a password nobody below uses: the file must not matter.
    let pw = dir.path("passwords");
    let (code, out, err) = run_bounded(
        Command::new(COREMQ).args([
            "passwd",
            "-c",
            path_str(&pw),
            "watcher",
            "--password",
            "the-real-password",
        ]),
        20 * SEC,
    );
    assert_eq!(code, Some(0), "coremq passwd: {out}{err}");
    let (broker, tls) = start_tls(
        &pki.server,
        &[
            "--client-ca",
            ca,
            "--require-client-cert",
            "--use-identity-as-username",
            "--acl-file",
            path_str(&acl),
            "--password-file",
            path_str(&pw),
            "--allow-anonymous",
            "false",
        ],
    );

    let sub = |cert: &CertFiles, filter: &str| {
        let mut args = tls_opts(ca, Some(cert));
        args.extend(["-t", filter, "-q", "1"]);
        mosquitto_sub_ready(tls, &args)
    };
    let mut watch = sub(&watcher, "devices/#");
    let mut own = sub(&dev7, "devices/device-7/#");
    // device-8 tries to read device-7's topics.
    let mut snoop = sub(&dev8, "devices/device-7/#");

    // Not device-7's topic: dropped, though the watcher could read it.
    let mut args = tls_opts(ca, Some(&dev7));
    args.extend(["-t", "devices/other/x", "-m", "forbidden", "-q", "1"]);
    let _ = mosquitto_pub(tls, &args);
    // Its own topic, with a CONNECT claiming to be `watcher` with a wrong
    // password: accepted as device-7 (a watcher could not write at all).
    let mut args = tls_opts(ca, Some(&dev7));
    args.extend(["-u", "watcher", "-P", "not-the-password"]);
    args.extend(["-t", "devices/device-7/x", "-m", "hello", "-q", "1"]);
    mosquitto_pub_ok(tls, &args);
    // device-8 writes its own topic (CN device-8, not any certificate = device-7).
    let mut args = tls_opts(ca, Some(&dev8));
    args.extend(["-t", "devices/device-8/y", "-m", "eight", "-q", "1"]);
    mosquitto_pub_ok(tls, &args);

    assert_eq!(
        messages(&mut own, 1),
        ["devices/device-7/x hello"],
        "device-7 reads its own topic"
    );
    assert_eq!(
        messages(&mut watch, 2),
        ["devices/device-7/x hello", "devices/device-8/y eight"],
        "the watcher gets what device-7 and device-8 may write"
    );
    assert_eq!(stray_messages(&mut watch, SEC), Vec::<String>::new());
    assert_eq!(
        stray_messages(&mut snoop, Duration::ZERO),
        Vec::<String>::new(),
        "device-8 reads nothing of device-7's"
    );
    assert!(broker.fresh_stats().get("acl_denied").copied().unwrap_or(0) >= 1);
}

/// Refusals end cleanly and the broker carries on: a client trusting
/// another CA, an expired client certificate, one from another CA, none at
/// all (under `--require-client-cert`), and plain MQTT bytes on the TLS
/// port (no CONNACK; closed within seconds, at most a TLS alert sent).
/// A good TLS client still works afterwards.
#[test]
fn refused_handshakes_end_cleanly_and_the_broker_carries_on() {
    let dir = TempDir::new("tls-refused");
    let pki = Pki::new(&dir);
    let ca = pki.ca.pem();
    let good = pki.ca.client(&dir, "good", "device-1", Validity::Current);
    let expired = pki
        .ca
        .client(&dir, "expired-client", "device-1", Validity::Expired);
    let stranger = pki
        .wrong_ca
        .client(&dir, "stranger", "device-1", Validity::Current);
    let (broker, tls) = start_tls(&pki.server, &["--client-ca", ca, "--require-client-cert"]);
    let publish = |trust: &str, cert: Option<&CertFiles>, why: &str| {
        let mut args = tls_opts(trust, cert);
        args.extend(["-t", "refused/t", "-m", why, "-q", "1"]);
        mosquitto_pub_refused(tls, &args, why);
    };

    publish(pki.wrong_ca.pem(), Some(&good), "client trusts another CA");
    publish(ca, Some(&expired), "expired client certificate");
    publish(ca, Some(&stranger), "client certificate from another CA");
    publish(ca, None, "no client certificate");

    let mut plain = RawClient::tcp(tls);
    plain.send(&ConnectOpts::id("plain-on-tls").bytes());
    let got = plain.expect_closed(5 * SEC);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "plain CONNECT on the TLS port: nothing but a TLS alert record may come back, got {got:02x?}"
    );

    let mut args = tls_opts(ca, Some(&good));
    args.extend(["-t", "refused/#", "-q", "1"]);
    let mut sub = mosquitto_sub_ready(tls, &args);
    let mut args = tls_opts(ca, Some(&good));
    args.extend(["-t", "refused/t", "-m", "still-serving", "-q", "1"]);
    mosquitto_pub_ok(tls, &args);
    assert_eq!(messages(&mut sub, 1), ["refused/t still-serving"]);
    assert_eq!(
        stray_messages(&mut sub, Duration::ZERO),
        Vec::<String>::new()
    );

    let stats = broker.fresh_stats();
    // Expired, untrusted, missing certificate and the plain bytes fail in
    // the broker's handshake (the client that distrusts us may count too).
    assert!(counter(&stats, "tls_handshake_failures") >= 4, "{stats:?}");
    assert!(counter(&stats, "tls_handshakes") >= 2, "{stats:?}");
    broker.assert_no_panic();
}

/// A broker serving an expired certificate starts, and clients refuse it:
/// mosquitto_pub and paho both fail verification.
#[test]
fn an_expired_server_certificate_is_refused_by_clients() {
    let dir = TempDir::new("tls-expired-server");
    let pki = Pki::new(&dir);
    let ca = pki.ca.pem();
    let expired = pki.ca.server(&dir, "expired-server", Validity::Expired);
    let (broker, tls) = start_tls(&expired, &[]);
    let mut args = tls_opts(ca, None);
    args.extend(["-t", "x", "-m", "x", "-q", "1"]);
    mosquitto_pub_refused(tls, &args, "expired server certificate");
    let r = paho_tls(&["connect", &tls.to_string(), "localhost", ca, "-", "-"]);
    assert!(
        is_null(&r["connack"]) && r["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{r:?}"
    );
    // The plain listener is unaffected.
    RawClient::connect(broker.port(), &ConnectOpts::id("plain"));
}

/// Session resumption: five connections from one Python SSLContext, each
/// offering the session of the one before; every one after the first is
/// resumed (whichever shard accepts it), and `tls_resumed` counts them.
/// The broker picks the suite: AES-128-GCM-SHA256, though OpenSSL's client
/// lists AES-256-GCM-SHA384 first (README "TLS").
#[test]
fn tls_sessions_are_resumed() {
    let dir = TempDir::new("tls-resume");
    let pki = Pki::new(&dir);
    let (broker, tls) = start_tls(&pki.server, &[]);
    let (code, out, err) = run_bounded(
        &mut python_script(
            "tls_resume.py",
            &[&tls.to_string(), "localhost", pki.ca.pem(), "-", "-", "5"],
        ),
        30 * SEC,
    );
    assert_eq!(code, Some(0), "tls_resume.py: {out}{err}");
    let r = json::parse_object(out.trim()).unwrap_or_else(|| panic!("not JSON: {out}{err}"));
    assert_eq!(
        r["reused"].as_str(),
        Some("false,true,true,true,true"),
        "{r:?}"
    );
    assert_eq!(
        r["connacks"].as_str(),
        Some(["20020000"; 5].join(",").as_str()),
        "every connection got CONNACK 0: {r:?}"
    );
    assert_eq!(r["version"].as_str(), Some("TLSv1.3"), "{r:?}");
    assert_eq!(
        r["cipher"].as_str(),
        Some("TLS_AES_128_GCM_SHA256"),
        "{r:?}"
    );

    let stats = broker.fresh_stats();
    assert_eq!(counter(&stats, "tls_resumed"), 4, "{stats:?}");
}

/// Every suite the broker offers, TLS 1.3 and 1.2, with an OpenSSL client
/// (Python's ssl module) that offers only that one: the handshake ends on
/// it and a 40,000-byte message (three records each way) comes back
/// intact. The broker seals and opens records itself (`tls::record`,
/// README "TLS"), so this holds its records to OpenSSL's.
#[test]
fn every_offered_suite_carries_mqtt_with_an_openssl_client() {
    let dir = TempDir::new("tls-suites");
    let pki = Pki::new(&dir);
    let (_broker, tls) = start_tls(&pki.server, &[]);
    let suites = [
        ("1.3", "TLS_AES_128_GCM_SHA256"),
        ("1.3", "TLS_CHACHA20_POLY1305_SHA256"),
        ("1.3", "TLS_AES_256_GCM_SHA384"),
        ("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        ("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    ];
    for (version, suite) in suites {
        let (code, out, err) = run_bounded(
            &mut python_script(
                "tls_suites.py",
                &[&tls.to_string(), "localhost", pki.ca.pem(), version, suite],
            ),
            30 * SEC,
        );
        assert_eq!(code, Some(0), "tls_suites.py {version} {suite}: {out}{err}");
        let r = json::parse_object(out.trim()).unwrap_or_else(|| panic!("not JSON: {out}{err}"));
        assert_eq!(
            r["version"].as_str(),
            Some(format!("TLSv{version}").as_str()),
            "{r:?}"
        );
        assert_eq!(r["cipher"].as_str(), Some(suite), "{r:?}");
        assert_eq!(r["connack"].as_str(), Some("20020000"), "{r:?}");
        assert_eq!(r["suback"].as_str(), Some("9003000100"), "{r:?}");
        assert_eq!(
            r["echo"].as_bool(),
            Some(true),
            "{suite}: the message came back changed"
        );
        println!("{version} {suite}: handshake, SUBACK and 40,000 bytes back intact");
    }
}

/// SIGHUP rereads `--cert` and `--key` (README "Live reload"): new
/// connections get the new certificate (clients trusting only the old CA
/// are refused), a connection made before the reload stays up and keeps
/// getting messages, and a certificate file that no longer parses keeps
/// the one in force, with a log line that says why.
#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = TempDir::new("tls-reload");
    let pki = Pki::new(&dir);
    // The broker reads the certificate from files the test rewrites.
    let live = CertFiles {
        cert: dir.path("live.pem"),
        key: dir.path("live.key"),
    };
    std::fs::copy(&pki.server.cert, &live.cert).unwrap();
    std::fs::copy(&pki.server.key, &live.key).unwrap();
    let (broker, tls) = start_tls(&live, &[]);
    let old_ca = pki.ca.pem();
    let new_ca = pki.wrong_ca.pem();

    let mut sub_args = tls_opts(old_ca, None);
    sub_args.extend(["-t", "reload/#", "-q", "1"]);
    let mut sub = mosquitto_sub_ready(tls, &sub_args);

    // The new certificate, from the other CA, then SIGHUP.
    let next = pki.wrong_ca.server(&dir, "next", Validity::Current);
    std::fs::copy(&next.cert, &live.cert).unwrap();
    std::fs::copy(&next.key, &live.key).unwrap();
    broker.signal(libc::SIGHUP);
    assert!(
        wait_until(5 * SEC, || broker.log_contains("SIGHUP: reloaded")),
        "no reload line; stderr:\n{}",
        broker.log_text()
    );
    let mut args = tls_opts(new_ca, None);
    args.extend(["-t", "reload/new", "-m", "after", "-q", "1"]);
    mosquitto_pub_ok(tls, &args);
    let mut args = tls_opts(old_ca, None);
    args.extend(["-t", "reload/old", "-m", "refused", "-q", "1"]);
    mosquitto_pub_refused(tls, &args, "trusting only the old CA after the reload");
    assert_eq!(
        messages(&mut sub, 1),
        ["reload/new after"],
        "the subscriber connected before the reload is still served"
    );

    // A broken certificate file: the reload fails, the new one stays.
    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    broker.signal(libc::SIGHUP);
    assert!(
        wait_until(5 * SEC, || broker.log_contains("reload failed")),
        "no failure line; stderr:\n{}",
        broker.log_text()
    );
    assert!(
        broker.log_contains("--cert"),
        "the failure names the file: {}",
        broker.log_text()
    );
    let mut args = tls_opts(new_ca, None);
    args.extend(["-t", "reload/new", "-m", "still", "-q", "1"]);
    mosquitto_pub_ok(tls, &args);
    assert_eq!(messages(&mut sub, 1), ["reload/new still"]);
}

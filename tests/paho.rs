//! CONNACK return codes with Python paho-mqtt 2.x: authentication against a
//! password file written by `coremq passwd`, the connection ceiling, and
//! client id rules.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{json, python_script, run_bounded, Broker, TempDir, COREMQ};

const SEC: Duration = Duration::from_secs(1);

/// One paho connection attempt: (client id, protocol "311"/"31", clean,
/// username, password).
struct Spec<'a>(&'a str, &'a str, bool, Option<&'a str>, Option<&'a str>);

/// Runs paho_connect.py (each client stays connected until the last one is
/// answered) and returns, per spec, its 3.x CONNACK return code.
fn paho_connect(port: u16, specs: &[Spec]) -> Vec<u64> {
    let items: Vec<String> = specs
        .iter()
        .map(|Spec(id, proto, clean, user, pass)| {
            let opt = |v: &Option<&str>| v.map_or("null".to_string(), |s| format!("{s:?}"));
            format!(
                r#"{{"client_id": {id:?}, "protocol": "{proto}", "clean": {clean}, "username": {}, "password": {}}}"#,
                opt(user),
                opt(pass)
            )
        })
        .collect();
    let spec_json = format!("[{}]", items.join(", "));
    let (code, out, err) = run_bounded(
        &mut python_script("paho_connect.py", &[&port.to_string(), &spec_json]),
        20 * SEC,
    );
    assert_eq!(code, Some(0), "paho_connect.py {spec_json}: {out}{err}");
    let results: Vec<_> = out
        .lines()
        .map(|l| json::parse_object(l).unwrap_or_else(|| panic!("not JSON: {l}")))
        .collect();
    assert_eq!(results.len(), specs.len(), "{out}{err}");
    results
        .iter()
        .map(|r| {
            r.get("rc")
                .and_then(|v| v.as_u64())
                .unwrap_or_else(|| panic!("no CONNACK: {r:?}; stderr {err}"))
        })
        .collect()
}

fn password_file(dir: &TempDir) -> String {
    let file = dir.path("passwords");
    let file_s = file.to_str().unwrap().to_string();
    let (code, out, err) = run_bounded(
        Command::new(COREMQ).args(["passwd", "-c", &file_s, "alice", "--password", "secret"]),
        20 * SEC,
    );
    assert_eq!(code, Some(0), "coremq passwd: {out}{err}");
    file_s
}

#[test]
fn password_file_return_codes_0_4_5() {
    let dir = TempDir::new("paho-auth");
    let file = password_file(&dir);
    let broker = Broker::start(&["--password-file", &file, "--allow-anonymous", "false"]);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("auth-ok", "311", true, Some("alice"), Some("secret")),
            Spec("auth-bad", "311", true, Some("alice"), Some("wrong")),
            Spec("auth-nopw", "311", true, Some("alice"), None),
            Spec("auth-unknown", "311", true, Some("mallory"), Some("secret")),
            Spec("auth-anon", "311", true, None, None),
            Spec("auth-ok31", "31", true, Some("alice"), Some("secret")),
            Spec("auth-bad31", "31", true, Some("alice"), Some("Secret")),
        ],
    );
    assert_eq!(rcs, [0, 4, 4, 4, 5, 0, 4]);
    let s = broker.fresh_stats();
    assert_eq!((s["connack_0"], s["connack_4"], s["connack_5"]), (2, 4, 1));
}

#[test]
fn anonymous_allowed_beside_password_file_when_asked() {
    let dir = TempDir::new("paho-anon");
    let file = password_file(&dir);
    let broker = Broker::start(&["--password-file", &file, "--allow-anonymous", "true"]);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("anon-ok", "311", true, None, None),
            // A username is still checked.
            Spec("anon-bad", "311", true, Some("alice"), Some("nope")),
            Spec("anon-alice", "311", true, Some("alice"), Some("secret")),
        ],
    );
    assert_eq!(rcs, [0, 4, 0]);
}

#[test]
fn max_connections_gives_server_unavailable_3() {
    let broker = Broker::start(&["--max-connections", "2"]);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("cap-1", "311", true, None, None),
            Spec("cap-2", "311", true, None, None),
            Spec("cap-3", "311", true, None, None),
            Spec("cap-4", "31", true, None, None),
        ],
    );
    assert_eq!(rcs, [0, 0, 3, 3]);
    broker.wait_for_stat("connack_3", |n| n == 2, 5 * SEC);
    // Once they are gone, there is room again.
    broker.wait_for_stat("connections", |n| n == 0, 5 * SEC);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("cap-5", "311", true, None, None),
            Spec("cap-6", "311", true, None, None),
        ],
    );
    assert_eq!(rcs, [0, 0]);
}

#[test]
fn mqtt31_client_id_of_24_chars_is_rejected_2() {
    let broker = Broker::start(&[]);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("abcdefghijklmnopqrstuvwx", "31", true, None, None),
            Spec("abcdefghijklmnopqrstuvw", "31", true, None, None),
            // 3.1.1 allows longer ids.
            Spec("abcdefghijklmnopqrstuvwx-and-more", "311", true, None, None),
        ],
    );
    assert_eq!(rcs, [2, 0, 0]);
}

/// paho 2.x refuses to build a client with an empty id and clean_session
/// False, so the broker side of MQTT-3.1.3-8 is checked with raw bytes in
/// raw_lifecycle.rs; here, an empty id with a clean session is given one.
#[test]
fn empty_client_id_with_clean_session_accepted_mqtt_3_1_3_6() {
    let broker = Broker::start(&[]);
    let rcs = paho_connect(
        broker.port(),
        &[
            Spec("", "311", true, None, None),
            Spec("", "311", true, None, None),
        ],
    );
    assert_eq!(rcs, [0, 0]);
    assert_eq!(broker.fresh_stats()["takeovers"], 0);
}

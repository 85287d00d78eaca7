//! Wills and retained messages with the real mosquitto_pub / mosquitto_sub.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{mosquitto_sub_ready, next_message_line, run_bounded, tools, Broker, LineProc};

const SEC: Duration = Duration::from_secs(1);

fn pub_cmd(port: u16) -> Command {
    let mut c = Command::new(&tools().mosquitto_pub);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    c
}

fn sub_cmd(port: u16) -> Command {
    let mut c = Command::new(&tools().mosquitto_sub);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    c
}

/// mosquitto_pub with `args`; asserts it exits 0.
fn mosquitto_pub(port: u16, args: &[&str]) {
    let (code, out, err) = run_bounded(pub_cmd(port).args(args), 10 * SEC);
    assert_eq!(code, Some(0), "mosquitto_pub {args:?}: {out}{err}");
}

/// What a fresh `mosquitto_sub -C 1 -W SECS` on `topic` prints (the retained
/// message, if any); empty if nothing comes within `secs`.
fn read_retained(port: u16, topic: &str, secs: u32) -> String {
    let (code, out, err) = run_bounded(
        sub_cmd(port).args(["-t", topic, "-C", "1", "-W", &secs.to_string()]),
        Duration::from_secs(u64::from(secs) + 5),
    );
    match code {
        Some(0) => out.trim_end().to_string(),
        // 27: -W timed out with no message.
        Some(27) => {
            assert!(out.is_empty(), "{out}");
            String::new()
        }
        other => panic!("mosquitto_sub exited {other:?}: {out}{err}"),
    }
}

/// The device: mosquitto_sub as `dev1` with a retained QoS 1 will, subscribed
/// (SUBACK received) when this returns.
fn device(port: u16) -> LineProc {
    mosquitto_sub_ready(
        port,
        &[
            "-i",
            "dev1",
            "--will-topic",
            "dev/1/status",
            "--will-payload",
            "offline",
            "--will-retain",
            "--will-qos",
            "1",
            "-t",
            "something",
            "-k",
            "60",
        ],
    )
}

#[test]
fn will_published_when_client_is_killed() {
    let broker = Broker::start(&[]);
    let mut watcher = mosquitto_sub_ready(broker.port(), &["-t", "dev/+/status"]);
    let dev = device(broker.port());
    dev.signal(libc::SIGKILL);
    let line = next_message_line(&mut watcher, 5 * SEC).expect("will within 5 s");
    assert_eq!(line, "dev/1/status offline");
    broker.wait_for_stat("wills", |n| n == 1, 5 * SEC);
}

#[test]
fn sigint_sends_disconnect_so_no_will_mqtt_3_14_4_3() {
    let broker = Broker::start(&[]);
    let mut watcher = mosquitto_sub_ready(broker.port(), &["-t", "dev/+/status"]);
    let mut dev = device(broker.port());
    dev.signal(libc::SIGINT);
    dev.wait_line(5 * SEC, |l| l.contains("sending DISCONNECT"));
    dev.wait_exit(5 * SEC);
    assert_eq!(next_message_line(&mut watcher, 2 * SEC), None);
    broker.wait_for_stat("connections", |n| n == 1, 5 * SEC);
    assert_eq!(broker.stat("wills"), 0);
    // The retained will was not stored either.
    assert_eq!(read_retained(broker.port(), "dev/1/status", 1), "");
}

#[test]
fn retained_set_replace_clear_mqtt_3_3_1_10_11() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    mosquitto_pub(port, &["-t", "ret/a", "-m", "first", "-r"]);
    assert_eq!(read_retained(port, "ret/a", 5), "first");
    mosquitto_pub(port, &["-t", "ret/a", "-m", "second", "-r", "-q", "1"]);
    assert_eq!(read_retained(port, "ret/a", 5), "second");
    // Through a wildcard, with the topic shown.
    let (code, out, _) = run_bounded(
        sub_cmd(port).args(["-t", "ret/#", "-C", "1", "-W", "5", "-v"]),
        10 * SEC,
    );
    assert_eq!((code, out.trim_end()), (Some(0), "ret/a second"));
    // An empty retained payload clears it (MQTT-3.3.1-10) and is not itself
    // stored (MQTT-3.3.1-11).
    mosquitto_pub(port, &["-t", "ret/a", "-n", "-r"]);
    assert_eq!(read_retained(port, "ret/a", 1), "");
    // A non-retained publish does not set or replace anything.
    mosquitto_pub(port, &["-t", "ret/a", "-m", "fleeting"]);
    assert_eq!(read_retained(port, "ret/a", 1), "");
}

#[test]
fn retained_will_replaces_online_when_device_dies() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let mut watcher = mosquitto_sub_ready(port, &["-t", "dev/1/status"]);
    // The device: connects with the retained will `offline`, then publishes
    // `online` retained, and stays connected (-l reads lines from stdin).
    let mut dev_cmd = pub_cmd(port);
    dev_cmd
        .args([
            "-i",
            "dev1",
            "--will-topic",
            "dev/1/status",
            "--will-payload",
            "offline",
            "--will-retain",
            "--will-qos",
            "1",
            "-t",
            "dev/1/status",
            "-r",
            "-q",
            "1",
            "-l",
        ])
        .stdin(Stdio::piped());
    let mut dev = LineProc::spawn(&mut dev_cmd);
    let mut stdin = dev.child.stdin.take().expect("piped stdin");
    stdin.write_all(b"online\n").unwrap();
    stdin.flush().unwrap();
    assert_eq!(
        next_message_line(&mut watcher, 5 * SEC).as_deref(),
        Some("dev/1/status online")
    );
    assert_eq!(read_retained(port, "dev/1/status", 5), "online");

    dev.signal(libc::SIGKILL);
    assert_eq!(
        next_message_line(&mut watcher, 5 * SEC).as_deref(),
        Some("dev/1/status offline")
    );
    drop(stdin);
    // Whoever subscribes after the device died learns it is offline.
    assert_eq!(read_retained(port, "dev/1/status", 5), "offline");
}

#[test]
fn qos_delivered_is_min_of_publish_and_subscription_mqtt_3_8_4_6() {
    let broker = Broker::start(&[]);
    let port = broker.port();
    let mut sub = mosquitto_sub_ready(port, &["-t", "q/t", "-q", "1"]);
    for q in ["0", "1", "2"] {
        mosquitto_pub(port, &["-t", "q/t", "-m", &format!("m{q}"), "-q", q, "-d"]);
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        let l = sub
            .next_line(5 * SEC)
            .unwrap_or_else(|| panic!("only {received:?}; stdout {:?}", sub.seen));
        if l.contains("received PUBLISH") {
            received.push(l);
        }
    }
    // mosquitto_sub -d: "received PUBLISH (d0, qN, ...)".
    let qos: Vec<&str> = received
        .iter()
        .map(|l| {
            if l.contains(", q1,") {
                "1"
            } else if l.contains(", q0,") {
                "0"
            } else {
                "?"
            }
        })
        .collect();
    assert_eq!(qos, ["0", "1", "1"], "{received:?}");
}

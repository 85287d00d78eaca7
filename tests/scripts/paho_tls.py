"""paho-mqtt 2.x over TLS (client.tls_set), printing one JSON line.

    python paho_tls.py connect PORT HOST CA CERT KEY
        One connection trusting CA (presenting CERT/KEY unless they are -)
        to HOST:PORT; prints {"connack": rc, "error": null} on a CONNACK, or
        {"connack": null, "error": "..."} if the handshake or the
        connection failed first. Never retries.

    python paho_tls.py pubsub PORT HOST CA CERT KEY TOPIC
        A subscriber on TOPIC (QoS 2) and a publisher, both with those
        credentials; the publisher sends "q0", "q1", "q2" at QoS 0, 1, 2.
        Prints {"connack": 0, "received": "q0,q1,q2"} (in arrival order)
        once all arrived or 10 s passed.
"""
import json
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt


def out(obj):
    print(json.dumps(obj), flush=True)


def connect(port, host, ca, cert, key, client_id):
    """(client, rc, error): rc is the CONNACK code, or None with error set."""
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    c.tls_set(
        ca_certs=ca,
        certfile=None if cert == "-" else cert,
        keyfile=None if key == "-" else key,
        cert_reqs=ssl.CERT_REQUIRED,
    )
    result = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["rc"] = 0 if not reason_code.is_failure else int(reason_code.value)

    c.on_connect = on_connect
    try:
        c.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as e:
        return None, None, f"{type(e).__name__}: {e}"
    # The handshake may only fail on the first read (TLS 1.3 client
    # certificates are checked after the client's Finished): run the loop
    # by hand, so a lost connection ends it instead of a reconnect.
    deadline = time.monotonic() + 8
    while "rc" not in result and time.monotonic() < deadline:
        try:
            rc = c.loop(timeout=0.2)
        except (OSError, ssl.SSLError) as e:
            return None, None, f"{type(e).__name__}: {e}"
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return None, None, mqtt.error_string(rc)
    if "rc" not in result:
        return None, None, "no CONNACK within 8 s"
    return c, result["rc"], None


def main():
    mode, port, host, ca, cert, key = sys.argv[1:7]
    port = int(port)
    if mode == "connect":
        c, rc, error = connect(port, host, ca, cert, key, "paho-tls")
        out({"connack": rc, "error": error})
        if c is not None:
            c.disconnect()
        return
    assert mode == "pubsub", mode
    topic = sys.argv[7]
    sub, rc, error = connect(port, host, ca, cert, key, "paho-tls-sub")
    if rc != 0:
        out({"connack": rc, "error": error})
        return
    received = []
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c, _u, msg):
        received.append(msg.payload.decode())
        if len(received) >= 3:
            done.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.loop_start()
    sub.subscribe(topic, qos=2)
    if not subscribed.wait(5):
        out({"connack": 0, "error": "no SUBACK"})
        return
    pub, rc, error = connect(port, host, ca, cert, key, "paho-tls-pub")
    if rc != 0:
        out({"connack": rc, "error": f"publisher: {error}"})
        return
    pub.loop_start()
    infos = [pub.publish(topic, f"q{q}", qos=q) for q in range(3)]
    for info in infos:
        info.wait_for_publish(10)
    done.wait(10)
    out({"connack": 0, "error": None, "received": ",".join(received)})
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()


if __name__ == "__main__":
    main()

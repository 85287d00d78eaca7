"""Messaging checks with Python paho-mqtt 2.x, printing one JSON line.

    python paho_messaging.py PORT exactly_once QOS COUNT SUB_ID PUB_ID
        A subscriber at QOS on qos/t, a publisher sending COUNT messages
        ("0", "1", ...) at QOS; prints {"granted": q, "received": "0,1,...",
        "published": n} once all arrived or 10 s passed.

    python paho_messaging.py PORT subscribe USER PASSWORD FILTER...
        Subscribes to each FILTER (QoS 1) as USER (use - for anonymous) and
        prints {"codes": "1,128,..."}: the SUBACK return code per filter.

    python paho_messaging.py PORT publish USER PASSWORD TOPIC PAYLOAD
        Publishes one QoS 1 message as USER and prints {"acked": true} once
        its PUBACK arrived.

    python paho_messaging.py PORT publish_many TOPIC COUNT SIZE
        Publishes COUNT QoS 1 messages of SIZE bytes (up to 100 in flight)
        and prints {"acked": n} once every PUBACK arrived (at most 50 s).
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def out(obj):
    print(json.dumps(obj), flush=True)


def client(port, client_id, user=None, password=None):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    if user not in (None, "-"):
        c.username_pw_set(user, password)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not connected.wait(5):
        out({"error": f"{client_id}: no CONNACK"})
        sys.exit(1)
    return c


def exactly_once(port, qos, count, sub_id, pub_id):
    received = []
    done = threading.Event()
    subscribed = threading.Event()
    granted = []

    sub = client(port, sub_id)

    def on_message(_c, _u, msg):
        received.append(msg.payload.decode())
        if len(received) >= count:
            done.set()

    def on_subscribe(_c, _u, _mid, codes, _props):
        granted.extend(int(getattr(rc, "value", rc)) for rc in codes)
        subscribed.set()

    sub.on_message = on_message
    sub.on_subscribe = on_subscribe
    sub.subscribe("qos/t", qos=qos)
    if not subscribed.wait(5):
        out({"error": "no SUBACK"})
        sys.exit(1)

    pub = client(port, pub_id)
    infos = [pub.publish("qos/t", str(i), qos=qos) for i in range(count)]
    for info in infos:
        info.wait_for_publish(10)
    done.wait(10)
    # A late duplicate would show up here.
    time.sleep(0.3)
    out({"granted": granted[0], "received": ",".join(received), "published": len(infos)})
    pub.disconnect()
    sub.disconnect()


def subscribe(port, user, password, filters):
    codes = []
    done = threading.Event()
    c = client(port, "paho-acl-sub", user, password)

    def on_subscribe(_c, _u, _mid, rcs, _props):
        codes.extend(int(getattr(rc, "value", rc)) for rc in rcs)
        done.set()

    c.on_subscribe = on_subscribe
    c.subscribe([(f, 1) for f in filters])
    if not done.wait(5):
        out({"error": "no SUBACK"})
        sys.exit(1)
    out({"codes": ",".join(str(c) for c in codes)})
    c.disconnect()


def publish(port, user, password, topic, payload):
    c = client(port, "paho-acl-pub", user, password)
    info = c.publish(topic, payload, qos=1)
    info.wait_for_publish(5)
    out({"acked": info.is_published()})
    c.disconnect()


def publish_many(port, topic, count, size):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="paho-publish-many",
        protocol=mqtt.MQTTv311,
    )
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    acked = []
    done = threading.Event()

    def on_publish(_c, _u, mid, _rc, _props):
        acked.append(mid)
        if len(acked) >= count:
            done.set()

    connected = threading.Event()
    c.on_publish = on_publish
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not connected.wait(5):
        out({"error": "no CONNACK"})
        sys.exit(1)
    payload = b"x" * size
    for _ in range(count):
        c.publish(topic, payload, qos=1)
    done.wait(50)
    out({"acked": len(acked)})
    c.disconnect()
    c.loop_stop()


def main():
    port = int(sys.argv[1])
    mode = sys.argv[2]
    if mode == "exactly_once":
        exactly_once(port, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif mode == "subscribe":
        subscribe(port, sys.argv[3], sys.argv[4], sys.argv[5:])
    elif mode == "publish":
        publish(port, sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
    elif mode == "publish_many":
        publish_many(port, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        out({"error": f"unknown mode {mode}"})
        sys.exit(2)


main()

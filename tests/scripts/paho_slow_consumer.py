"""A fast QoS 1 publisher and a slow subscriber, with Python paho-mqtt 2.x;
prints one JSON line.

    python paho_slow_consumer.py PORT PROTOCOL COUNT SUB_ID PUB_ID DELAY_MS

The subscriber (3.1.1, clean session, QoS 1 on slow/t) takes DELAY_MS per
message in its callback, so its PUBACKs, and with them the broker's room
for it, come at most 1000/DELAY_MS a second. The publisher (PROTOCOL "311"
or "5") sends COUNT QoS 1 messages "0", "1", ... with up to 100 in flight,
as fast as its PUBACKs allow. Once every PUBACK is in, the subscriber gets
until the messages acknowledged with success have arrived (at most 60 s).

Printed: {"acked": [ids acknowledged with success], "refused": [ids
acknowledged with a reason code >= 0x80, "code": the first such code],
"received": [ids in arrival order], "publish_secs": time from the first
publish to the last PUBACK}.
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def out(obj):
    print(json.dumps(obj), flush=True)


def main():
    port, protocol, count, sub_id, pub_id, delay_ms = sys.argv[1:7]
    port, count, delay = int(port), int(count), int(delay_ms) / 1000.0

    received = []
    subscribed = threading.Event()
    sub = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=sub_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )

    def on_message(_c, _u, msg):
        time.sleep(delay)
        received.append(int(msg.payload.decode()))

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe("slow/t", qos=1)
    sub.connect("127.0.0.1", port, keepalive=60)
    sub.loop_start()
    if not subscribed.wait(10):
        out({"error": "subscriber: no SUBACK"})
        sys.exit(1)

    v5 = protocol == "5"
    pub = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=pub_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    # No lock of ours around publish(): paho calls on_publish holding its
    # own, and publish() takes that one too. Dict updates are atomic.
    seq_of = {}
    results = {}
    all_acked = threading.Event()

    def on_publish(_c, _u, mid, reason_code, _props):
        results[mid] = reason_code
        if len(results) >= count:
            all_acked.set()

    connected = threading.Event()
    pub.on_publish = on_publish
    pub.on_connect = lambda *a: connected.set()
    pub.connect("127.0.0.1", port, keepalive=60)
    pub.loop_start()
    if not connected.wait(10):
        out({"error": "publisher: no CONNACK"})
        sys.exit(1)

    start = time.monotonic()
    for seq in range(count):
        info = pub.publish("slow/t", str(seq), qos=1)
        seq_of[info.mid] = seq
    if not all_acked.wait(120):
        out({"error": f"only {len(results)} of {count} acknowledged"})
        sys.exit(1)
    publish_secs = time.monotonic() - start
    acked, refused, codes = [], [], []
    for mid, reason_code in results.items():
        if reason_code.is_failure:
            refused.append(seq_of[mid])
            codes.append(reason_code.value)
        else:
            acked.append(seq_of[mid])

    want = set(acked)
    deadline = time.monotonic() + 60
    while not want.issubset(received) and time.monotonic() < deadline:
        time.sleep(0.05)
    # What else arrives shortly after (a message that should not) counts too.
    time.sleep(0.3)
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()
    out(
        {
            "acked": sorted(acked),
            "refused": sorted(refused),
            "code": codes[0] if codes else None,
            "received": list(received),
            "publish_secs": round(publish_secs, 3),
        }
    )


if __name__ == "__main__":
    main()

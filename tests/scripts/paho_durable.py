"""Persistent sessions with Python paho-mqtt 2.x, for tests/durability.rs.
Prints one JSON object per line.

    python paho_durable.py PORT session CLIENT_ID PROTO FILTER QOS EXPECT WAIT
        Connects with a persistent session (PROTO 311: cleanSession=0; 5:
        Clean Start 0 and Session Expiry Interval 3600) and prints
        {"event": "connack", "session_present": b, "rc": n}. With FILTER not
        "-", subscribes to it at QOS and prints {"event": "suback",
        "granted": q}. Then collects messages until EXPECT arrived (and 0.5 s
        more, so a duplicate would show) or WAIT seconds passed, prints
        {"event": "messages", "messages": "topic=payload@qos|..."}, and
        disconnects normally (the session stays on the broker). Messages are
        acknowledged (PUBACK, PUBCOMP) from the main thread just before the
        DISCONNECT, so every acknowledgement goes out ahead of it: paho's
        own acknowledgements leave from its network thread, and one that a
        busy machine delays until after the DISCONNECT does not count
        (MQTT-3.14.4-2), which would leave the message owed.

    python paho_durable.py PORT load STOP_FILE RATE PUBS SUBS
        Load across broker kills. PUBS is "id:qos,id:qos,..." (each
        publisher sends "id:seq" payloads, retained, on load/ID, at most 40
        unacknowledged at once, RATE publishes per second), SUBS "id,id,..."
        (each subscribes to load/# at QoS 2 once, on its first connection,
        and relies on its session after that). Every client has a persistent
        3.1.1 session and reconnects by itself (paho's loop) whenever the
        broker goes away. Prints {"event": "ready"} once every subscriber
        has its SUBACK; once STOP_FILE exists, stops publishing, waits (at
        most 20 s) for every publish to be acknowledged and then (at most
        15 s) for every subscriber to have every acknowledged message, waits
        1 s more for stray duplicates, and prints one line per client:
          {"pub": id, "qos": q, "sent": n, "acked": "0,1,...",
           "connects": n, "session_lost": n}
          {"sub": id, "received": "pub:seq:qos:dup,...", "connects": n,
           "session_lost": n}
        session_lost counts reconnections whose CONNACK said
        sessionPresent=0 (MQTT-3.2.2-2 wants 1: the session was kept).
"""
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes


def out(obj):
    print(json.dumps(obj), flush=True)


def fail(msg):
    out({"error": msg})
    sys.exit(1)


def reason_value(rc):
    return int(getattr(rc, "value", rc))


def session(port, client_id, proto, filt, qos, expect, wait):
    v5 = proto == "5"
    if v5:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
    else:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
    connected = threading.Event()
    subscribed = threading.Event()
    got_all = threading.Event()
    messages = []
    to_ack = []
    connack = {}
    granted = []

    def on_connect(_c, _u, flags, rc, _props):
        connack["session_present"] = bool(flags.session_present)
        connack["rc"] = reason_value(rc)
        connected.set()

    def on_message(_c, _u, msg):
        messages.append(f"{msg.topic}={msg.payload.decode()}@{msg.qos}")
        if msg.qos > 0:
            to_ack.append((msg.mid, msg.qos))
        if len(messages) >= expect:
            got_all.set()

    def on_subscribe(_c, _u, _mid, codes, _props):
        granted.extend(reason_value(rc) for rc in codes)
        subscribed.set()

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
    else:
        c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not connected.wait(10):
        fail(f"{client_id}: no CONNACK")
    out({"event": "connack", **connack})
    if filt != "-":
        c.subscribe(filt, qos=qos)
        if not subscribed.wait(10):
            fail(f"{client_id}: no SUBACK")
        out({"event": "suback", "granted": granted[0]})
    if expect > 0:
        got_all.wait(wait)
        time.sleep(0.5)
    out({"event": "messages", "messages": "|".join(messages)})
    for mid, qos in list(to_ack):
        c.ack(mid, qos)
    c.disconnect()
    c.loop_stop()


def keep_pubrel_on_retries(c):
    """Works around a paho-mqtt 2.x client bug that would show up as QoS 2
    duplicates: each reconnection attempt (also one that fails because the
    broker is still down) runs _messages_reconnect_reset_out, which turns an
    outgoing QoS 2 message whose PUBREC came (wait_for_pubcomp) into
    resend_pubrel, and, on the next attempt, resend_pubrel into publish: the
    client then sends the PUBLISH again (DUP=0) instead of the PUBREL, and a
    broker that already completed that packet id rightly takes it as a new
    message (MQTT-4.3.3). Putting resend_pubrel back to wait_for_pubcomp
    before each reset keeps the PUBREL."""
    orig = c._messages_reconnect_reset_out

    def reset_out():
        with c._out_message_mutex:
            for m in c._out_messages.values():
                if m.state == mqtt.mqtt_ms_resend_pubrel:
                    m.state = mqtt.mqtt_ms_wait_for_pubcomp
        orig()

    c._messages_reconnect_reset_out = reset_out


class Tracked:
    """A persistent 3.1.1 client that reconnects by itself and counts its
    CONNACKs."""

    def __init__(self, port, client_id):
        self.id = client_id
        self.connects = 0
        self.session_lost = 0
        self.first = threading.Event()
        self.lock = threading.Lock()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        c.reconnect_delay_set(min_delay=0.05, max_delay=0.4)
        keep_pubrel_on_retries(c)
        c.on_connect = self.on_connect
        # PAHO_LOG_DIR=DIR: each client's packet log in DIR/ID.log (for
        # looking into a failure).
        self.log = lambda _line: None
        log_dir = os.environ.get("PAHO_LOG_DIR")
        if log_dir:
            f = open(os.path.join(log_dir, f"{client_id}.log"), "w", buffering=1)
            self.log = lambda line: f.write(f"{time.time():.6f} {line}\n")
            c.on_log = lambda _c, _u, _lvl, buf: self.log(buf)
        self.client = c
        self.port = port

    def on_connect(self, _c, _u, flags, rc, _props):
        if reason_value(rc) != 0:
            return
        with self.lock:
            self.connects += 1
            if self.connects > 1 and not flags.session_present:
                self.session_lost += 1
        self.first.set()

    def start(self):
        # connect_async + loop_start: paho's thread connects, and retries
        # (also the first connection) while the broker is down.
        self.client.connect_async("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self.first.wait(10):
            fail(f"{self.id}: no CONNACK")


def load(port, stop_file, rate, pubs_spec, subs_spec):
    pubs = []
    for item in pubs_spec.split(","):
        pid, q = item.split(":")
        pubs.append((Tracked(port, pid), int(q)))
    subs = [Tracked(port, sid) for sid in subs_spec.split(",")]
    received = {s.id: [] for s in subs}

    for s in subs:
        def on_message(_c, _u, msg, sid=s.id, log=s.log):
            log(f"message m{msg.mid} {msg.payload.decode()}")
            received[sid].append(f"{msg.payload.decode()}:{msg.qos}:{int(msg.dup)}")

        s.client.on_message = on_message
        subscribed = threading.Event()
        s.client.on_subscribe = lambda *a, ev=subscribed: ev.set()
        s.start()
        s.client.subscribe("load/#", qos=2)
        if not subscribed.wait(10):
            fail(f"{s.id}: no SUBACK")
    for p, _ in pubs:
        p.start()
    out({"event": "ready"})

    sent = {p.id: [] for p, _ in pubs}  # (seq, MQTTMessageInfo)
    stop = threading.Event()

    def publisher(p, qos):
        infos = sent[p.id]
        seq = 0
        oldest = 0
        interval = 1.0 / rate
        while not stop.is_set():
            # At most 40 unacknowledged at once.
            while oldest < len(infos) and infos[oldest][1]._published:
                oldest += 1
            if len(infos) - oldest >= 40:
                time.sleep(0.005)
                continue
            # While disconnected, paho queues the message and sends it on
            # the next connection.
            info = p.client.publish(f"load/{p.id}", f"{p.id}:{seq}", qos=qos, retain=True)
            infos.append((seq, info))
            seq += 1
            time.sleep(interval)

    threads = [threading.Thread(target=publisher, args=pq, daemon=True) for pq in pubs]
    for t in threads:
        t.start()
    while not os.path.exists(stop_file):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()

    def all_acked():
        return all(i._published for infos in sent.values() for _, i in infos)

    deadline = time.time() + 20
    while not all_acked() and time.time() < deadline:
        time.sleep(0.05)
    acked = {pid: [s for s, i in infos if i._published] for pid, infos in sent.items()}
    want = {f"{pid}:{s}" for pid, seqs in acked.items() for s in seqs}

    def all_delivered():
        for sid in received:
            got = {r.rsplit(":", 2)[0] for r in list(received[sid])}
            if not want <= got:
                return False
        return True

    deadline = time.time() + 15
    while not all_delivered() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    for p, qos in pubs:
        with p.lock:
            out({
                "pub": p.id,
                "qos": qos,
                "sent": len(sent[p.id]),
                "acked": ",".join(str(s) for s in acked[p.id]),
                "connects": p.connects,
                "session_lost": p.session_lost,
            })
    for s in subs:
        with s.lock:
            out({
                "sub": s.id,
                "received": ",".join(list(received[s.id])),
                "connects": s.connects,
                "session_lost": s.session_lost,
            })
    for c in [p for p, _ in pubs] + subs:
        c.client.disconnect()
        c.client.loop_stop()


def main():
    port = int(sys.argv[1])
    mode = sys.argv[2]
    a = sys.argv[3:]
    if mode == "session":
        session(port, a[0], a[1], a[2], int(a[3]), int(a[4]), float(a[5]))
    elif mode == "load":
        load(port, a[0], float(a[1]), a[2], a[3])
    else:
        fail(f"unknown mode {mode}")


main()

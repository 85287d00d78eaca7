"""MQTT 5.0 scenarios with Python paho-mqtt 2.x, for tests/v5_paho.rs.

    python paho_v5.py PORT SCENARIO ARGS...

Each scenario drives real paho clients (MQTTv5 unless it says 3.1.1) against
the broker on 127.0.0.1:PORT and prints ONE flat JSON line with what it
observed (lists are comma-joined strings); the Rust test asserts on it.
`connack` prints one line per client instead (as paho_connect.py does), and
`sigterm` prints a {"ready": true} line first. Nothing here decides pass or
fail except "the scenario could not run at all" (exit 1 with {"error": ...}).

Scenarios (client ids are chosen by the caller, so it can put them on
different shards):

    connack SPECS_JSON
        SPECS_JSON: [{"id", "clean", "user", "password", "keepalive",
        "props": {PAHO_CONNECT_PROPERTY: value}}]; one line per client:
        {"id", "rc", "present", and each CONNACK property by paho name}.
    session SUB PUB EXPIRY RESUME_AFTER EXPIRE_AFTER
    will WATCH DEV MODE DELAY EXPIRY [RECONNECT_AFTER]
        MODE: drop | reconnect | disconnect_with_will | disconnect_normal |
        disconnect_set_expiry
    receive_max SUB PUB RECEIVE_MAXIMUM COUNT
    max_packet SMALL OTHER PUB LIMIT
    too_large ID SIZE
    topic_alias SUB PUB
    topic_alias_bad ID ALIAS TOPIC          (TOPIC "-" = empty)
    topic_alias_out SUB PUB MAX
    message_expiry SUB LIVE PUB
    retained_expiry SUB1 SUB2 PUB
    no_local A B
    retain_as_published A PUB
    retain_handling A PUB
    subscription_ids A PUB
    sub_unsub USER PASSWORD SUB_FILTERS UNSUB_FILTERS   (comma-separated)
    puback USER PASSWORD TOPIC...
    shared M1 M2 M3_V311 PLAIN PUB COUNT
    shared_no_local ID
    takeover ID
    sigterm ID ID_V311
    keepalive_silence ID KEEPALIVE PEEK_AT WAIT [311]
    request_response REQ RESP
    receive_max_exceeded ID COUNT
    clean_start SUB PUB
    auth_packet ID
    v311_to_v5 SUB PUB
    v5_to_v311 SUB PUB
"""
import json
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST = "127.0.0.1"
PORT = 0

# CONNACK properties reported by `connack`, by paho name.
CONNACK_PROPS = [
    "SessionExpiryInterval",
    "ReceiveMaximum",
    "MaximumQoS",
    "RetainAvailable",
    "MaximumPacketSize",
    "AssignedClientIdentifier",
    "TopicAliasMaximum",
    "WildcardSubscriptionAvailable",
    "SubscriptionIdentifierAvailable",
    "SharedSubscriptionAvailable",
    "ServerKeepAlive",
    "ResponseInformation",
    "ServerReference",
    "AuthenticationMethod",
]


def out(obj):
    print(json.dumps(obj), flush=True)


def fail(msg):
    out({"error": msg})
    sys.exit(1)


def props(packet_type, **kw):
    p = Properties(packet_type)
    for k, v in kw.items():
        p.__setattr__(k, v)
    return p


def code(rc):
    """A paho ReasonCode (or int) as an int."""
    return int(getattr(rc, "value", rc))


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Msg:
    """What a client received: topic, payload, flags and properties."""

    def __init__(self, m):
        self.at = time.monotonic()
        self.topic = m.topic
        self.payload = m.payload
        self.qos = m.qos
        self.retain = bool(m.retain)
        self.mid = m.mid
        p = m.properties
        get = (lambda n: getattr(p, n, None)) if p is not None else (lambda n: None)
        self.alias = get("TopicAlias")
        self.sub_ids = sorted(get("SubscriptionIdentifier") or [])
        self.expiry = get("MessageExpiryInterval")
        self.content_type = get("ContentType")
        self.response_topic = get("ResponseTopic")
        self.correlation = get("CorrelationData")
        self.pfi = get("PayloadFormatIndicator")
        self.user = get("UserProperty") or []
        self.prop_names = sorted(
            n for n in (p.json().keys() if p is not None else []) if n != "TopicAlias"
        )

    @property
    def text(self):
        return self.payload.decode(errors="replace")

    def flat(self, prefix):
        """This message's properties as flat JSON fields."""
        return {
            prefix + "expiry": self.expiry,
            prefix + "content_type": self.content_type,
            prefix + "response_topic": self.response_topic,
            prefix + "correlation": self.correlation.hex() if self.correlation is not None else None,
            prefix + "pfi": self.pfi,
            prefix + "user": ",".join(f"{k}={v}" for k, v in self.user),
            prefix + "qos": self.qos,
            prefix + "retain": self.retain,
        }


class Client:
    """One paho client on its own network thread, never reconnecting by
    itself, recording everything it is told."""

    def __init__(
        self,
        cid,
        v5=True,
        clean=True,
        expiry=None,
        connect_props=None,
        will=None,
        user=None,
        password=None,
        keepalive=30,
        manual_ack=False,
        wait=True,
        threaded=True,
    ):
        self.cid = cid
        self.v5 = v5
        self.lock = threading.Lock()
        self.connack = None
        self.messages = []
        self.disconnects = []
        self.subacks = {}
        self.unsubacks = {}
        self.pubacks = {}
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean,
            manual_ack=manual_ack,
            reconnect_on_failure=False,
        )
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        if user not in (None, "-"):
            self.c.username_pw_set(user, password)
        if will is not None:
            topic, payload, qos, retain, wprops = will
            wp = props(PacketTypes.WILLMESSAGE, **wprops) if (v5 and wprops) else None
            self.c.will_set(topic, payload, qos, retain, properties=wp)
        kw = {}
        if v5:
            cp = dict(connect_props or {})
            if expiry:
                cp["SessionExpiryInterval"] = expiry
            kw["clean_start"] = clean
            kw["properties"] = props(PacketTypes.CONNECT, **cp) if cp else None
        self.c.connect(HOST, PORT, keepalive, **kw)
        if threaded:
            self.c.loop_start()
        else:
            # No network thread: the caller runs c.loop() itself, and until
            # it does, what it publishes is written at once and nothing is
            # read.
            deadline = time.monotonic() + 5
            while self.connack is None and time.monotonic() < deadline:
                self.c.loop(0.05)
        if wait:
            if not wait_for(lambda: self.connack is not None, 5):
                fail(f"{cid}: no CONNACK within 5 s")
            if self.connack["rc"] != 0:
                fail(f"{cid}: CONNACK {self.connack['rc']}")

    # ------------------------------------------------------------ callbacks

    def _on_connect(self, _c, _u, flags, rc, p):
        info = {"rc": code(rc), "present": bool(flags.session_present)}
        for n in CONNACK_PROPS:
            v = getattr(p, n, None) if p is not None else None
            info[n] = v
        with self.lock:
            self.connack = info

    def _on_message(self, _c, _u, m):
        with self.lock:
            self.messages.append(Msg(m))

    def _on_disconnect(self, _c, _u, flags, rc, _p):
        with self.lock:
            self.disconnects.append(
                {
                    "rc": code(rc),
                    "from_server": bool(flags.is_disconnect_packet_from_server),
                    "at": time.monotonic(),
                }
            )

    def _on_subscribe(self, _c, _u, mid, rcs, _p):
        with self.lock:
            self.subacks[mid] = [code(r) for r in rcs]

    def _on_unsubscribe(self, _c, _u, mid, rcs, _p):
        with self.lock:
            self.unsubacks[mid] = [code(r) for r in (rcs if isinstance(rcs, list) else [rcs])]

    def _on_publish(self, _c, _u, mid, rc, _p):
        with self.lock:
            self.pubacks[mid] = code(rc)

    # ------------------------------------------------------------ actions

    def subscribe(self, topics, sub_id=None, wait=True):
        """topics: [(filter, qos or SubscribeOptions)]; returns the SUBACK codes."""
        p = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=sub_id) if sub_id else None
        if self.v5:
            items = [(t, o if isinstance(o, SubscribeOptions) else SubscribeOptions(qos=o)) for t, o in topics]
        else:
            items = list(topics)
        rc, mid = self.c.subscribe(items, properties=p) if self.v5 else self.c.subscribe(items)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            fail(f"{self.cid}: subscribe {topics}: {rc}")
        if not wait:
            return None
        if not wait_for(lambda: mid in self.subacks, 5):
            fail(f"{self.cid}: no SUBACK for {topics}")
        return self.subacks[mid]

    def unsubscribe(self, filters):
        rc, mid = self.c.unsubscribe(filters)
        if not wait_for(lambda: mid in self.unsubacks, 5):
            fail(f"{self.cid}: no UNSUBACK for {filters}")
        return self.unsubacks[mid]

    def publish(self, topic, payload, qos=1, retain=False, wait=True, **pprops):
        p = props(PacketTypes.PUBLISH, **pprops) if (self.v5 and pprops) else None
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=p)
        if wait and qos > 0:
            if not wait_for(lambda: info.mid in self.pubacks, 5):
                fail(f"{self.cid}: no PUBACK for {topic}")
        return info

    def got(self, n, timeout):
        return wait_for(lambda: len(self.messages) >= n, timeout)

    def texts(self):
        with self.lock:
            return [m.text for m in self.messages]

    def disconnected(self, timeout):
        """The first on_disconnect within `timeout`, or None."""
        if wait_for(lambda: len(self.disconnects) > 0, timeout):
            return self.disconnects[0]
        return None

    def disconnect(self, reason=None, **dprops):
        p = props(PacketTypes.DISCONNECT, **dprops) if dprops else None
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason) if reason is not None else None
        self.c.disconnect(reasoncode=rc, properties=p)
        self.c.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT: an abnormal close."""
        s = self.c.socket()
        # Shut down first: the network thread wakes at once, sees the
        # connection gone and stops (it never reconnects, nor sends a
        # DISCONNECT).
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.c.loop_stop()
        s.close()

    def stop(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


def opts(qos=1, **kw):
    return SubscribeOptions(qos=qos, **kw)


def join(xs):
    return ",".join(str(x) for x in xs)


# ---------------------------------------------------------------- scenarios


def connack(specs_json):
    specs = json.loads(specs_json)
    clients = []
    for s in specs:
        c = Client(
            s["id"],
            clean=s.get("clean", True),
            connect_props=s.get("props"),
            user=s.get("user"),
            password=s.get("password"),
            keepalive=s.get("keepalive", 30),
            wait=False,
        )
        if not wait_for(lambda: c.connack is not None, 5):
            out({"id": s["id"], "error": "no CONNACK within 5 s"})
        else:
            out(dict(id=s["id"], **c.connack))
        clients.append(c)
    for c in clients:
        c.stop()


def session(sub_id, pub_id, expiry, resume_after, expire_after):
    expiry, resume_after, expire_after = int(expiry), float(resume_after), float(expire_after)
    sub = Client(sub_id, clean=True, expiry=expiry)
    connack_expiry = sub.connack["SessionExpiryInterval"]
    sub.subscribe([("se/t", 1)])
    sub.disconnect()
    t0 = time.monotonic()
    pub = Client(pub_id)
    for p in ("q1", "q2", "q3"):
        pub.publish("se/t", p)
    time.sleep(max(0.0, t0 + resume_after - time.monotonic()))
    sub = Client(sub_id, clean=False, expiry=expiry)
    present1 = sub.connack["present"]
    sub.got(3, 2 if present1 else 0.5)
    pub.publish("se/t", "live")
    sub.got(4, 2 if present1 else 0.5)
    got1 = sub.texts()
    sub.disconnect()
    t1 = time.monotonic()
    time.sleep(max(0.0, t1 + expire_after - time.monotonic()))
    sub = Client(sub_id, clean=False, expiry=expiry)
    present2 = sub.connack["present"]
    pub.publish("se/t", "after")
    time.sleep(0.7)
    got2 = sub.texts()
    out(
        {
            "connack_expiry": connack_expiry,
            "present1": present1,
            "got1": join(got1),
            "present2": present2,
            "got2": join(got2),
        }
    )
    sub.stop()
    pub.stop()


WILL_PROPS = {
    "ContentType": "text/plain",
    "ResponseTopic": "will/reply",
    "CorrelationData": b"\x00\x01will\xff",
    "PayloadFormatIndicator": 1,
    "MessageExpiryInterval": 60,
    "UserProperty": [("k", "1"), ("a", "2"), ("k", "3")],
}


def will(watch_id, dev_id, mode, delay, expiry, reconnect_after="0"):
    delay, expiry, reconnect_after = int(delay), int(expiry), float(reconnect_after)
    watch = Client(watch_id)
    watch.subscribe([("will/#", 1)])
    wprops = dict(WILL_PROPS)
    if delay:
        wprops["WillDelayInterval"] = delay
    dev = Client(
        dev_id,
        expiry=expiry,
        will=(f"will/{dev_id}", b"gone", 1, False, wprops),
    )
    # Time runs from just before the close or DISCONNECT: the broker cannot
    # have seen it earlier, so a will_after below the delay is a will sent
    # too early.
    t0 = time.monotonic()
    if mode == "drop":
        dev.drop()
    elif mode == "reconnect":
        dev.drop()
        time.sleep(reconnect_after)
        dev = Client(dev_id, clean=False, expiry=expiry)
    elif mode == "disconnect_with_will":
        dev.disconnect(reason=0x04)
    elif mode == "disconnect_normal":
        dev.disconnect(reason=0x00)
    elif mode == "disconnect_set_expiry":
        # Session Expiry 0 at CONNECT, non-zero on DISCONNECT: a Protocol
        # Error, so the will is not discarded.
        dev.disconnect(reason=0x00, SessionExpiryInterval=60)
    else:
        fail(f"unknown will mode {mode}")
    watch.got(1, delay + 3 if mode in ("drop", "disconnect_with_will", "disconnect_set_expiry") else delay + 1.5)
    res = {"will_after": None, "wills": len(watch.messages)}
    if watch.messages:
        m = watch.messages[0]
        res["will_after"] = round(m.at - t0, 3)
        res["topic"] = m.topic
        res["payload"] = m.text
        res.update(m.flat("will_"))
    if mode == "disconnect_set_expiry":
        # The session was not kept either.
        dev = Client(dev_id, clean=False, expiry=60)
        res["present_after"] = dev.connack["present"]
        dev.stop()
    out(res)
    watch.stop()
    if mode == "reconnect":
        dev.stop()


def receive_max(sub_id, pub_id, rm, count):
    rm, count = int(rm), int(count)
    sub = Client(sub_id, connect_props={"ReceiveMaximum": rm}, manual_ack=True)
    sub.subscribe([("rm/t", 1)])
    pub = Client(pub_id)
    for i in range(count):
        pub.publish("rm/t", str(i), wait=False)
    acked = 0
    max_unacked = 0
    first_batch = None
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.3)
        with sub.lock:
            pending = sub.messages[acked:]
        if first_batch is None:
            first_batch = len(pending)
        max_unacked = max(max_unacked, len(pending))
        for m in pending:
            sub.c.ack(m.mid, m.qos)
        acked += len(pending)
        if acked >= count:
            break
    time.sleep(0.3)
    out(
        {
            "first_batch": first_batch,
            "max_unacked": max_unacked,
            "received": join(sub.texts()),
        }
    )
    sub.stop()
    pub.stop()


def max_packet(small_id, other_id, pub_id, limit):
    limit = int(limit)
    small = Client(small_id, connect_props={"MaximumPacketSize": limit})
    small.subscribe([("mp/t", 1)])
    other = Client(other_id)
    other.subscribe([("mp/t", 1)])
    pub = Client(pub_id)
    big = b"B" * (limit * 2)
    for p in (b"small-1", big, b"small-2"):
        pub.publish("mp/t", p)
    other.got(3, 5)
    small.got(3, 1.0)

    def names(c):
        return join(m.text if len(m.payload) < 100 else f"big{len(m.payload)}" for m in c.messages)

    out(
        {
            "small": names(small),
            "other": names(other),
            "small_disconnected": len(small.disconnects) > 0,
        }
    )
    for c in (small, other, pub):
        c.stop()


def too_large(cid, size):
    c = Client(cid)
    c.publish("tl/t", b"x" * int(size), wait=False)
    d = c.disconnected(3)
    out({"disconnect": d["rc"] if d else None, "from_server": d["from_server"] if d else None})
    c.stop()


def topic_alias(sub_id, pub_id):
    sub = Client(sub_id)
    sub.subscribe([("ta/#", 1)])
    pub = Client(pub_id)
    seq = [
        ("ta/one", 1, "p1"),
        ("", 1, "p2"),
        ("ta/two", 2, "p3"),
        ("", 2, "p4"),
        ("", 1, "p5"),
        ("ta/three", 1, "p6"),
        ("", 1, "p7"),
        ("ta/plain", None, "p8"),
    ]
    for topic, alias, payload in seq:
        if alias is None:
            pub.publish(topic, payload)
        else:
            pub.publish(topic, payload, TopicAlias=alias)
    sub.got(len(seq), 5)
    time.sleep(0.2)
    out(
        {
            "received": join(f"{m.topic}:{m.text}" for m in sub.messages),
            "aliases_to_sub": join(m.alias for m in sub.messages if m.alias is not None),
            "pub_disconnected": len(pub.disconnects) > 0,
        }
    )
    sub.stop()
    pub.stop()


def topic_alias_bad(cid, alias, topic):
    c = Client(cid)
    p = Properties(PacketTypes.PUBLISH)
    # Bypasses paho's own range check, so alias 0 can be sent.
    object.__setattr__(p, "TopicAlias", int(alias))
    c.c.publish("" if topic == "-" else topic, b"x", qos=1, properties=p)
    d = c.disconnected(3)
    out({"disconnect": d["rc"] if d else None, "from_server": d["from_server"] if d else None})
    c.stop()


def topic_alias_out(sub_id, pub_id, maximum):
    maximum = int(maximum)
    sub = Client(sub_id, connect_props={"TopicAliasMaximum": maximum})
    sub.subscribe([("ao/#", 1)])
    pub = Client(pub_id)
    sent = ["ao/a", "ao/b", "ao/c", "ao/a", "ao/b", "ao/c", "ao/a"]
    for i, t in enumerate(sent):
        pub.publish(t, str(i))
    sub.got(len(sent), 5)
    time.sleep(0.2)
    table = {}
    resolved = []
    raw = []
    unresolved = 0
    for m in sub.messages:
        raw.append(f"{m.topic}@{m.alias if m.alias is not None else '-'}")
        if m.alias is not None and m.topic:
            table[m.alias] = m.topic
        if m.topic:
            resolved.append(m.topic)
        elif m.alias in table:
            resolved.append(table[m.alias])
        else:
            unresolved += 1
            resolved.append("?")
    aliases = [m.alias for m in sub.messages if m.alias is not None]
    out(
        {
            "sent": join(sent),
            "resolved": join(resolved),
            "payloads": join(sub.texts()),
            "raw": join(raw),
            "max_alias": max(aliases) if aliases else 0,
            "min_alias": min(aliases) if aliases else 0,
            "empty_topic": sum(1 for m in sub.messages if not m.topic),
            "unresolved": unresolved,
        }
    )
    sub.stop()
    pub.stop()


RICH = {
    "PayloadFormatIndicator": 1,
    "ContentType": "application/json",
    "ResponseTopic": "me/reply",
    "CorrelationData": b"\x00\x01\xfe\xff",
    "UserProperty": [("b", "2"), ("a", "1"), ("b", "3")],
}


def message_expiry(sub_id, live_id, pub_id):
    sub = Client(sub_id, expiry=60)
    sub.subscribe([("me/t", 1)])
    sub.disconnect()
    live = Client(live_id)
    live.subscribe([("me/t", 1)])
    pub = Client(pub_id)
    pub.publish("me/t", "short", MessageExpiryInterval=1)
    pub.publish("me/t", "long", MessageExpiryInterval=100, **RICH)
    pub.publish("me/t", "none")
    t0 = time.monotonic()
    live.got(3, 5)
    res = {"live": join(live.texts())}
    for m in live.messages:
        res.update(m.flat(f"live_{m.text}_"))
    time.sleep(max(0.0, t0 + 2.2 - time.monotonic()))
    sub = Client(sub_id, clean=False, expiry=60)
    res["present"] = sub.connack["present"]
    sub.got(3, 1.5)
    res["queued"] = join(sub.texts())
    for m in sub.messages:
        res.update(m.flat(f"queued_{m.text}_"))
    out(res)
    for c in (sub, live, pub):
        c.stop()


def retained_expiry(sub1_id, sub2_id, pub_id):
    pub = Client(pub_id)
    pub.publish("re/a", "a", retain=True, MessageExpiryInterval=1)
    pub.publish("re/b", "b", retain=True, MessageExpiryInterval=100)
    t0 = time.monotonic()
    sub1 = Client(sub1_id)
    sub1.subscribe([("re/#", 1)])
    sub1.got(2, 3)
    time.sleep(max(0.0, t0 + 1.8 - time.monotonic()))
    sub2 = Client(sub2_id)
    sub2.subscribe([("re/#", 1)])
    sub2.got(2, 1.0)
    res = {
        "sub1": join(sorted(m.topic for m in sub1.messages)),
        "sub2": join(sorted(m.topic for m in sub2.messages)),
    }
    for m in sub1.messages:
        res[f"sub1_{m.text}_expiry"] = m.expiry
    for m in sub2.messages:
        res[f"sub2_{m.text}_expiry"] = m.expiry
        res[f"sub2_{m.text}_retain"] = m.retain
    out(res)
    for c in (pub, sub1, sub2):
        c.stop()


def no_local(a_id, b_id):
    a = Client(a_id)
    a.subscribe([("nl/a", opts(noLocal=True))])
    a.subscribe([("nl/b", opts(noLocal=False))])
    b = Client(b_id)
    a.publish("nl/a", "self-a")
    a.publish("nl/b", "self-b")
    b.publish("nl/a", "other-a")
    a.got(2, 3)
    # Time for a wrong copy of "self-a" to show up.
    time.sleep(0.5)
    out({"got": join(sorted(f"{m.topic}:{m.text}" for m in a.messages))})
    a.stop()
    b.stop()


def retain_as_published(a_id, pub_id):
    pub = Client(pub_id)
    pub.publish("rap/0", "old", retain=True)
    a = Client(a_id)
    a.subscribe([("rap/1", opts(retainAsPublished=True)), ("rap/0", opts(retainAsPublished=False))])
    a.got(1, 2)
    pub.publish("rap/1", "r1", retain=True)
    pub.publish("rap/0", "r0", retain=True)
    pub.publish("rap/1", "n1")
    pub.publish("rap/0", "n0")
    a.got(5, 3)
    time.sleep(0.2)
    out({"got": join(sorted(f"{m.topic}:{m.text}:{int(m.retain)}" for m in a.messages))})
    a.stop()
    pub.stop()


def retain_handling(a_id, pub_id):
    pub = Client(pub_id)
    for i in range(3):
        pub.publish(f"rh/{i}", f"r{i}", retain=True)
    a = Client(a_id)
    subs = [(f"rh/{i}", opts(retainHandling=i)) for i in range(3)]

    def phase(n_before):
        time.sleep(0.8)
        with a.lock:
            ms = a.messages[n_before:]
        return join(sorted(f"{m.topic}:{int(m.retain)}" for m in ms))

    a.subscribe(subs)
    p1 = phase(0)
    n = len(a.messages)
    a.subscribe(subs)
    p2 = phase(n)
    n = len(a.messages)
    a.unsubscribe(["rh/1"])
    a.subscribe([("rh/1", opts(retainHandling=1))])
    p3 = phase(n)
    out({"first": p1, "again": p2, "after_unsubscribe": p3})
    a.stop()
    pub.stop()


def subscription_ids(a_id, pub_id):
    a = Client(a_id)
    a.subscribe([("sid/#", 0)], sub_id=7)
    a.subscribe([("sid/+/x", 1)], sub_id=42)
    a.subscribe([("sid/+/z", 1)])
    pub = Client(pub_id)
    for t in ("x", "y", "z"):
        pub.publish(f"sid/a/{t}", t)
    a.got(3, 3)
    time.sleep(0.4)
    res = {"got": join(sorted(a.texts()))}
    for t in ("x", "y", "z"):
        copies = [m for m in a.messages if m.text == t]
        res[f"{t}_copies"] = len(copies)
        # Per copy: its identifiers joined with "+"; copies joined with "|".
        res[f"{t}_ids"] = "|".join("+".join(str(i) for i in m.sub_ids) for m in copies)
        res[f"{t}_qos"] = "|".join(str(m.qos) for m in copies)
    out(res)
    a.stop()
    pub.stop()


def sub_unsub(user, password, sub_filters, unsub_filters):
    c = Client("paho5-acl-sub", user=user, password=password)
    subs = [f for f in sub_filters.split(",") if f]
    unsubs = [f for f in unsub_filters.split(",") if f]
    res = {}
    if subs:
        res["sub"] = join(c.subscribe([(f, 1) for f in subs]))
    if unsubs:
        res["unsub"] = join(c.unsubscribe(unsubs))
    res["disconnected"] = len(c.disconnects) > 0
    out(res)
    c.stop()


def puback(user, password, topics):
    c = Client("paho5-acl-pub", user=user, password=password)
    codes = []
    for t in topics:
        info = c.publish(t, "x")
        codes.append(c.pubacks[info.mid])
    out({"codes": join(codes)})
    c.stop()


def shared(m1_id, m2_id, m3_id, plain_id, pub_id, count):
    count = int(count)
    pub = Client(pub_id)
    pub.publish("sh/t", "retained", retain=True)
    members = [Client(m1_id), Client(m2_id), Client(m3_id, v5=False)]
    codes = [m.subscribe([("$share/g/sh/t", 1)])[0] for m in members]
    plain = Client(plain_id)
    plain.subscribe([("sh/t", 1)])
    time.sleep(0.5)
    retained_to_members = sum(1 for m in members for x in m.messages if x.text == "retained")
    for i in range(count):
        pub.publish("sh/t", str(i), wait=False)
    wait_for(lambda: sum(len(m.messages) for m in members) >= count + retained_to_members, 8)
    plain.got(count + 1, 3)
    time.sleep(0.5)
    all_payloads = [x.text for m in members for x in m.messages if x.text != "retained"]
    want = [str(i) for i in range(count)]
    out(
        {
            "granted": join(codes),
            "retained_to_members": retained_to_members,
            "counts": join(sum(1 for x in m.messages if x.text != "retained") for m in members),
            "total": len(all_payloads),
            "distinct": len(set(all_payloads)),
            "missing": len(set(want) - set(all_payloads)),
            "plain": len(plain.messages),
            "plain_retained": sum(1 for x in plain.messages if x.text == "retained"),
        }
    )
    for c in members + [plain, pub]:
        c.stop()


def shared_no_local(cid):
    c = Client(cid)
    c.subscribe([("$share/g/snl/t", opts(noLocal=True))], wait=False)
    d = c.disconnected(3)
    out(
        {
            "disconnect": d["rc"] if d else None,
            "from_server": d["from_server"] if d else None,
            "suback": join(next(iter(c.subacks.values()), [])),
        }
    )
    c.stop()


def takeover(cid):
    old = Client(cid)
    new = Client(cid)
    d = old.disconnected(3)
    out(
        {
            "old_disconnect": d["rc"] if d else None,
            "from_server": d["from_server"] if d else None,
            "new_rc": new.connack["rc"],
            "new_disconnected": len(new.disconnects) > 0,
        }
    )
    new.stop()
    old.stop()


def sigterm(cid, cid311):
    c5 = Client(cid)
    c3 = Client(cid311, v5=False)
    out({"ready": True})
    d5 = c5.disconnected(8)
    d3 = c3.disconnected(3)
    out(
        {
            "v5_disconnect": d5["rc"] if d5 else None,
            "v5_from_server": d5["from_server"] if d5 else None,
            "v311_closed": d3 is not None,
            "v311_from_server": d3["from_server"] if d3 else None,
        }
    )


def keepalive_silence(cid, keepalive, peek_at, wait, protocol="5"):
    """Connects (MQTT 5, or 3.1.1 with PROTOCOL 311) asking for KEEPALIVE,
    then goes silent (no network loop, so no PINGREQ) and reads the socket
    itself: whether the broker ended the connection before PEEK_AT seconds,
    when it did (within WAIT), and the reason code of the DISCONNECT it sent
    first, if any."""
    keepalive, peek_at, wait = int(keepalive), float(peek_at), float(wait)
    c = Client(cid, keepalive=keepalive, v5=protocol != "311")
    server_keepalive = c.connack["ServerKeepAlive"]
    c.c.loop_stop()
    t0 = time.monotonic()
    s = c.c.socket()
    s.setblocking(False)
    buf = b""
    ended_at = None
    eof = False
    disconnect = None
    early = None
    while time.monotonic() < t0 + wait and ended_at is None:
        if early is None and time.monotonic() >= t0 + peek_at:
            early = False
        try:
            chunk = s.recv(4096)
            if chunk == b"":
                eof = True
            buf += chunk
        except BlockingIOError:
            pass
        except OSError:
            eof = True
        # Skip PINGRESPs (d0 00) answering paho's last ping.
        while buf[:2] == b"\xd0\x00":
            buf = buf[2:]
        if buf[:1] == b"\xe0" and len(buf) >= 2:
            disconnect = buf[2] if buf[1] >= 1 and len(buf) >= 3 else 0
        if disconnect is not None or eof:
            ended_at = round(time.monotonic() - t0, 3)
            if early is None:
                early = True
        time.sleep(0.005)
    out(
        {
            "server_keepalive": server_keepalive,
            "early": bool(early),
            "ended_at": ended_at,
            "disconnect": disconnect,
            "leftover": buf.hex(),
        }
    )


def receive_max_exceeded(cid, count):
    """Sends COUNT QoS 2 PUBLISHes in one burst, reading nothing (so no
    PUBREL goes out), then reads: the DISCONNECT, if any."""
    c = Client(cid, threaded=False)
    for i in range(int(count)):
        c.c.publish("rmx/t", str(i), qos=2)
    c.c.loop_start()
    d = c.disconnected(2)
    out({"disconnect": d["rc"] if d else None, "from_server": d["from_server"] if d else None})
    c.stop()


def clean_start(sub_id, pub_id):
    sub = Client(sub_id, expiry=60)
    sub.subscribe([("cs/t", 1)])
    sub.disconnect()
    pub = Client(pub_id)
    pub.publish("cs/t", "queued")
    resumed = Client(sub_id, clean=False, expiry=60)
    present_resume = resumed.connack["present"]
    resumed.got(1, 2)
    got_resume = resumed.texts()
    resumed.disconnect()
    pub.publish("cs/t", "queued-2")
    fresh = Client(sub_id, clean=True, expiry=60)
    present_clean = fresh.connack["present"]
    pub.publish("cs/t", "live")
    time.sleep(0.7)
    out(
        {
            "present_resume": present_resume,
            "got_resume": join(got_resume),
            "present_clean": present_clean,
            "got_clean": join(fresh.texts()),
        }
    )
    fresh.stop()
    pub.stop()


def auth_packet(cid):
    """An AUTH packet (f0 00) after a CONNECT without Authentication Method."""
    c = Client(cid)
    c.c.socket().send(b"\xf0\x00")
    d = c.disconnected(3)
    out({"disconnect": d["rc"] if d else None, "from_server": d["from_server"] if d else None})
    c.stop()


def request_response(req_id, resp_id):
    responder = Client(resp_id)

    def answer(_c, _u, m):
        responder._on_message(_c, _u, m)
        p = m.properties
        rp = Properties(PacketTypes.PUBLISH)
        if getattr(p, "CorrelationData", None) is not None:
            rp.CorrelationData = p.CorrelationData
        responder.c.publish(p.ResponseTopic, b"answer:" + m.payload, qos=1, properties=rp)

    responder.c.on_message = answer
    responder.subscribe([("svc/req", 1)])
    requester = Client(req_id)
    reply_to = f"svc/reply/{req_id}"
    requester.subscribe([(reply_to, 1)])
    requester.publish("svc/req", "q-1", ResponseTopic=reply_to, CorrelationData=b"\x00corr-1\xff")
    requester.publish("svc/req", "q-2", ResponseTopic=reply_to, CorrelationData=b"corr-2")
    requester.got(2, 5)
    time.sleep(0.2)
    req_seen = responder.messages
    out(
        {
            "responder_saw": join(f"{m.text}:{m.response_topic}:{m.correlation.hex()}" for m in req_seen),
            "replies": join(f"{m.topic}:{m.text}:{m.correlation.hex() if m.correlation else ''}" for m in requester.messages),
        }
    )
    requester.stop()
    responder.stop()


def v311_to_v5(sub_id, pub_id):
    sub = Client(sub_id)
    sub.subscribe([("mx/#", 1)], sub_id=5)
    pub = Client(pub_id, v5=False)
    pub.publish("mx/a", "from-v311")
    sub.got(1, 3)
    time.sleep(0.2)
    m = sub.messages[0] if sub.messages else None
    out(
        {
            "got": join(f"{x.topic}:{x.text}" for x in sub.messages),
            "ids": join(m.sub_ids) if m else None,
            "props": join(m.prop_names) if m else None,
            "qos": m.qos if m else None,
        }
    )
    sub.stop()
    pub.stop()


def v5_to_v311(sub_id, pub_id):
    sub = Client(sub_id, v5=False)
    sub.subscribe([("mx/#", 1)])
    pub = Client(pub_id)
    pub.publish("mx/b", "from-v5", MessageExpiryInterval=100, **RICH)
    pub.publish("mx/c", "alias-1", TopicAlias=1)
    pub.publish("", "alias-2", TopicAlias=1)
    sub.got(3, 3)
    time.sleep(0.2)
    out(
        {
            "got": join(f"{m.topic}:{m.text}:{m.qos}" for m in sub.messages),
            "props": join(str(m.prop_names) for m in sub.messages if m.prop_names),
        }
    )
    sub.stop()
    pub.stop()


SCENARIOS = {
    "connack": connack,
    "session": session,
    "will": will,
    "receive_max": receive_max,
    "max_packet": max_packet,
    "too_large": too_large,
    "topic_alias": topic_alias,
    "topic_alias_bad": topic_alias_bad,
    "topic_alias_out": topic_alias_out,
    "message_expiry": message_expiry,
    "retained_expiry": retained_expiry,
    "no_local": no_local,
    "retain_as_published": retain_as_published,
    "retain_handling": retain_handling,
    "subscription_ids": subscription_ids,
    "sub_unsub": sub_unsub,
    "shared": shared,
    "shared_no_local": shared_no_local,
    "takeover": takeover,
    "sigterm": sigterm,
    "keepalive_silence": keepalive_silence,
    "request_response": request_response,
    "receive_max_exceeded": receive_max_exceeded,
    "clean_start": clean_start,
    "auth_packet": auth_packet,
    "v311_to_v5": v311_to_v5,
    "v5_to_v311": v5_to_v311,
}


def main():
    global PORT
    PORT = int(sys.argv[1])
    name = sys.argv[2]
    args = sys.argv[3:]
    if name == "puback":
        puback(args[0], args[1], args[2:])
    elif name in SCENARIOS:
        SCENARIOS[name](*args)
    else:
        fail(f"unknown scenario {name}")


main()

#!/usr/bin/env python3
"""Broker memory per retained topic, measured from the outside.

    scripts/retained_memory.py PORT BROKER_PID COUNT [PAYLOAD_BYTES]

Connects one MQTT 3.1.1 client to 127.0.0.1:PORT, publishes COUNT retained
QoS 1 messages to fleet/r{i % 10}/dev{i // 10:07}/status (the topics of
benches/retained.rs) with a window of 64 unacknowledged PUBLISHes, waits for
every PUBACK, then reads the broker's VmRSS from /proc/BROKER_PID/status
and prints one JSON line: RSS before and after, and bytes per topic. Works
against any broker; use a fresh broker for each run. Standard library only.
"""
import json
import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def mqtt_str(s):
    return struct.pack(">H", len(s)) + s


def main():
    port, pid, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    payload = b"x" * (int(sys.argv[4]) if len(sys.argv) > 4 else 64)
    before = rss_kib(pid)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect = mqtt_str(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + mqtt_str(b"retained-mem")
    s.sendall(packet(0x10, connect))
    buf = b""
    while len(buf) < 4:
        buf += s.recv(4 - len(buf))
    assert buf[:2] == b"\x20\x02" and buf[3] == 0, f"CONNACK {buf!r}"
    buf = b""
    sent = acked = 0
    window = 64
    start = time.monotonic()
    while acked < count:
        out = bytearray()
        while sent < count and sent - acked < window:
            i = sent
            topic = f"fleet/r{i % 10}/dev{i // 10:07}/status".encode()
            pid_ = (i % 65535) + 1
            out += packet(0x33, mqtt_str(topic) + struct.pack(">H", pid_) + payload)
            sent += 1
        if out:
            s.sendall(out)
        buf += s.recv(65536)
        # Count whole PUBACKs (40 02 id id).
        n = len(buf) // 4
        acked += n
        buf = buf[n * 4:]
    took = time.monotonic() - start
    # Let the broker settle (allocator purges) before sampling.
    time.sleep(2)
    after = rss_kib(pid)
    print(json.dumps({
        "topics": count,
        "payload_bytes": len(payload),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_topic": round((after - before) * 1024 / count, 1),
        "publish_s": round(took, 2),
    }))
    s.sendall(b"\xe0\x00")
    s.close()


main()

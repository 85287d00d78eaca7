#!/usr/bin/env python3
"""The io_uring buffer ring growing for a burst and shrinking back after it
(BENCHMARKS.md, "the ring shrinks back").

usage: scripts/ring-burst.py [COREMQ_BINARY] [PORT]

Starts the broker (`--io uring --shards 1`, pinned to CPU 1) on 127.0.0.1,
holds 5,000 loadgen connections pinging every 5 s (CPU 0), then has 300
more clients each write 100 PUBLISHes (~21 KiB) while the broker is held
with SIGSTOP, so that it reads them all in one turn on SIGCONT (how far the
holders' ramp already grew the ring varies from run to run). Prints the
broker's RSS and `ring_buffers` (its stats line, every second) before the
burst and for 30 s after. Stops everything it started.
"""
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/coremq")
port = int(sys.argv[2]) if len(sys.argv) > 2 else 24999
loadgen = os.path.join(ROOT, "target/release/loadgen")

log = tempfile.NamedTemporaryFile("w+", prefix="ring-burst-", suffix=".log")
broker = subprocess.Popen(
    ["taskset", "-c", "1", binary, "--io", "uring", "--shards", "1",
     "--listen", f"127.0.0.1:{port}", "--stats-interval", "1"],
    stderr=log,
)


def rss_kib():
    with open(f"/proc/{broker.pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def ring_buffers():
    with open(log.name) as f:
        found = re.findall(r"ring_buffers=(\d+)", f.read())
    return found[-1] if found else "?"


def mqtt_str(b):
    return struct.pack(">H", len(b)) + b


def packet(first_byte, body):
    n, length = len(body), b""
    while True:
        digit, n = n % 128, n // 128
        length += bytes([digit | (128 if n else 0)])
        if not n:
            return bytes([first_byte]) + length + body


holders = None
clients = []
try:
    time.sleep(1)
    holders = subprocess.Popen(
        ["taskset", "-c", "0", loadgen, "conn", "-n", "5000", "--hold", "45",
         "--keepalive", "5", "-b", f"127.0.0.1:{port}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(8)
    for i in range(300):
        c = socket.create_connection(("127.0.0.1", port))
        connect = mqtt_str(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60)
        c.sendall(packet(0x10, connect + mqtt_str(f"burst-{i}".encode())))
        assert c.recv(4)[:2] == b"\x20\x02", "no CONNACK"
        clients.append(c)
    burst = packet(0x30, mqtt_str(b"burst/x") + b"0" * 200) * 100
    print(f"before the burst: RSS {rss_kib()} KiB, ring {ring_buffers()}")
    os.kill(broker.pid, signal.SIGSTOP)
    for c in clients:
        c.sendall(burst)
    os.kill(broker.pid, signal.SIGCONT)
    started = time.time()
    for _ in range(12):
        time.sleep(2.5)
        print(f"+{time.time() - started:.0f} s: RSS {rss_kib()} KiB, ring {ring_buffers()}")
finally:
    for c in clients:
        c.close()
    if holders:
        holders.wait()
    os.kill(broker.pid, signal.SIGCONT)
    broker.terminate()
    broker.wait()

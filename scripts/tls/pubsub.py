# Broker CPU per QoS 1 message, one publisher -> broker -> one subscriber,
# over TLS or plain TCP, from /proc/PID of the broker (BENCHMARKS.md, "TLS").
#   python pubsub.py PORT BROKER_PID tls|plain N
# The publisher keeps at most 200 unacknowledged and 500 undelivered
# messages, so the broker never has to drop; the run fails if the
# subscriber does not get all N. ca.pem in the current directory verifies
# the server's certificate for "localhost". Loopback only; ends by itself.
import socket, ssl, sys, time, os, threading
port, pid, mode, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tck = os.sysconf("SC_CLK_TCK")
def cpu_s():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
ctx = ssl.create_default_context(cafile="ca.pem")
def conn(cid):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "tls": s = ctx.wrap_socket(s, server_hostname="localhost")
    c = cid.encode(); var = b"\x00\x04MQTT\x04\x02\x00\x3c"; pl = len(c).to_bytes(2,"big")+c
    s.sendall(bytes([0x10, len(var)+len(pl)]) + var + pl)
    assert s.recv(4)[:2] == b"\x20\x02"
    return s
def packets(s):
    buf = b""
    while True:
        d = s.recv(65536)
        if not d: return
        buf += d
        while len(buf) >= 2:
            rl, mul, i = 0, 1, 1
            while True:
                b = buf[i]; rl += (b & 127) * mul; mul *= 128; i += 1
                if b < 128: break
            if len(buf) < i + rl: break
            yield buf[0], buf[i:i+rl]; buf = buf[i+rl:]
sub = conn("ps-sub")
topic = b"bench/t"
sub.sendall(bytes([0x82, 2+2+len(topic)+1, 0, 1, 0, len(topic)]) + topic + b"\x01")
assert sub.recv(5)[0] == 0x90
pub = conn("ps-pub")
payload = b"x" * 64
done = threading.Event()
received = [0]
def subscriber():
    got = 0; buf = b""
    while got < n:
        d = sub.recv(65536)
        if not d: return
        buf += d; acks = []
        while len(buf) >= 2:
            rl, mul, i = 0, 1, 1
            while i < len(buf):
                b = buf[i]; rl += (b & 127) * mul; mul *= 128; i += 1
                if b < 128: break
            else:
                break
            if len(buf) < i + rl: break
            t, body = buf[0], buf[i:i+rl]; buf = buf[i+rl:]
            if t >> 4 == 3:
                tl = int.from_bytes(body[:2], "big")
                acks.append(b"\x40\x02" + body[2+tl:4+tl]); got += 1
        if acks: sub.sendall(b"".join(acks))
        received[0] = got
    done.set()
threading.Thread(target=subscriber, daemon=True).start()
def publish(i):
    pid_ = (i % 65000 + 1).to_bytes(2, "big")
    var = len(topic).to_bytes(2,"big") + topic + pid_
    return bytes([0x32, len(var)+len(payload)]) + var + payload
c0 = cpu_s(); t0 = time.time()
acked = 0; it = packets(pub); window = 200
sent = 0
while acked < n:
    batch = []
    while sent < n and sent - acked < window and sent - received[0] < 500:
        batch.append(publish(sent)); sent += 1
    if batch: pub.sendall(b"".join(batch))
    if sent == acked:
        time.sleep(0.0005); continue
    t, _ = next(it)
    if t >> 4 == 4: acked += 1
assert done.wait(60), "subscriber did not get every message"
c1 = cpu_s(); t1 = time.time()
print(f"{mode}: {n} QoS 1 messages in {t1-t0:.1f}s, broker CPU {(c1-c0)*1e6/n:.1f} us/msg")

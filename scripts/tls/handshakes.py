# Broker CPU per TLS handshake (full, then resumed) and memory per idle TLS
# connection, measured from /proc/PID of the broker (BENCHMARKS.md, "TLS").
#   python handshakes.py PORT BROKER_PID N M [plain]
# N full handshakes (CONNECT, CONNACK, DISCONNECT each), N resumed with the
# latest ticket, then M connections held while RSS is read. ca.pem in the
# current directory must verify the server's certificate for "localhost";
# "plain" runs the same over plain TCP for scale. Loopback only; ends by itself.
import socket, ssl, sys, time, os
port, pid, n, m = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
plain = len(sys.argv) > 5 and sys.argv[5] == "plain"
tck = os.sysconf("SC_CLK_TCK")
def cpu_s():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
def rss_kib():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])
ctx = ssl.create_default_context(cafile="ca.pem")
def connect_pkt(cid):
    cid = cid.encode(); var = b"\x00\x04MQTT\x04\x02\x00\x3c"
    pl = len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(var) + len(pl)]) + var + pl
def one(i, session=None, keep=False):
    s = socket.create_connection(("127.0.0.1", port))
    if plain:
        t = s
    else:
        t = ctx.wrap_socket(s, server_hostname="localhost", session=session)
    t.sendall(connect_pkt(f"hs{i}"))
    ack = t.recv(4); assert ack[:2] == b"\x20\x02", ack
    sess, reused = (None, False) if plain else (t.session, t.session_reused)
    if keep: return t, reused
    t.sendall(b"\xe0\x00"); t.close()
    return sess, reused
# warm-up and a session to resume
sess, _ = one(-1)
c0 = cpu_s(); t0 = time.time()
for i in range(n): one(i)
c1 = cpu_s(); t1 = time.time()
reused = 0
for i in range(n):
    sess, r = one(n + i, session=sess); reused += r
c2 = cpu_s(); t2 = time.time()
print(f"full:    {n} handshakes, broker CPU {(c1-c0)*1e6/n:.0f} us each (client wall {t1-t0:.1f}s)")
print(f"resumed: {n} handshakes ({reused} reused), broker CPU {(c2-c1)*1e6/n:.0f} us each (client wall {t2-t1:.1f}s)")
base = rss_kib(); held = []
for i in range(m): held.append(one(10*n + i, session=sess, keep=True)[0])
time.sleep(2)
print(f"idle:    {m} TLS connections held: broker RSS +{(rss_kib()-base)*1024/m:.0f} bytes each")

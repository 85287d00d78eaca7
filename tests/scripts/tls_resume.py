"""TLS session resumption with Python's ssl module and raw MQTT bytes.

    python tls_resume.py PORT HOST CA CERT|- KEY|- N

N connections from one SSLContext trusting CA: each sends a 3.1.1
CONNECT, reads the 4-byte CONNACK, sends DISCONNECT; every connection
after the first offers the session the previous one ended with (read
after the CONNACK, so TLS 1.3 session tickets have arrived). Prints one
JSON line: {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256",
"reused": "false,true,...", "connacks": "20020000,..."} (version and
cipher suite of the last connection). The client offers OpenSSL's
default suites, AES-256-GCM-SHA384 first.
"""
import json
import socket
import ssl
import sys

from raw_mqtt import connect_packet, read_exact


def main():
    port, host, ca, cert, key, n = sys.argv[1:7]
    ctx = ssl.create_default_context(cafile=ca)
    if cert != "-":
        ctx.load_cert_chain(cert, key)
    session = None
    reused, connacks, version, cipher = [], [], None, None
    for i in range(int(n)):
        raw = socket.create_connection((host, int(port)), timeout=5)
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as s:
            s.sendall(connect_packet(f"resume-{i}"))
            connacks.append(read_exact(s, 4).hex())
            reused.append("true" if s.session_reused else "false")
            version = s.version()
            cipher = s.cipher()[0]
            s.sendall(b"\xe0\x00")
            session = s.session
    print(json.dumps({
        "version": version,
        "cipher": cipher,
        "reused": ",".join(reused),
        "connacks": ",".join(connacks),
    }), flush=True)


if __name__ == "__main__":
    main()

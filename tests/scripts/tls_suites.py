"""One MQTT round trip over TLS on a cipher suite the client insists on.

    python tls_suites.py PORT HOST CA VERSION SUITE

VERSION is 1.2 or 1.3; SUITE an OpenSSL suite name (TLS 1.3:
TLS_AES_128_GCM_SHA256 ...; TLS 1.2: ECDHE-ECDSA-CHACHA20-POLY1305 ...),
the only one the client offers. Python's ssl module cannot restrict TLS
1.3 suites itself, so this sets OPENSSL_CONF to a file naming it before
ssl is imported. The client sends a 3.1.1 CONNECT, subscribes to a topic,
publishes a 40,000-byte QoS 0 message to it (three TLS records) and reads
it back. Prints one JSON line: {"version", "cipher", "connack", "suback",
"echo": true when the message came back byte for byte}.
"""
import json
import os
import socket
import sys
import tempfile

port, host, ca, version, suite = sys.argv[1:6]
if version == "1.3":
    conf = tempfile.NamedTemporaryFile("w", suffix=".cnf", delete=False)
    conf.write(
        "openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\n"
        "system_default = sys\n[sys]\nCiphersuites = " + suite + "\n"
    )
    conf.close()
    os.environ["OPENSSL_CONF"] = conf.name

import ssl  # noqa: E402  (after OPENSSL_CONF)

from raw_mqtt import connect_packet, read_packet, remaining_length  # noqa: E402


def main():
    ctx = ssl.create_default_context(cafile=ca)
    if version == "1.3":
        os.unlink(conf.name)  # read by OpenSSL when ssl was imported
    tls = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = tls
    if version == "1.2":
        ctx.set_ciphers(suite)
    topic = b"suites/" + suite.encode()
    payload = bytes(i % 251 for i in range(40_000))
    raw = socket.create_connection((host, int(port)), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(connect_packet("suite-" + suite[:16]))
        connack = read_packet(s).hex()
        body = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + b"\x00"
        s.sendall(bytes([0x82, len(body)]) + body)
        suback = read_packet(s).hex()
        body = len(topic).to_bytes(2, "big") + topic + payload
        s.sendall(b"\x30" + remaining_length(len(body)) + body)
        echo = read_packet(s)
        s.sendall(b"\xe0\x00")
        print(json.dumps({
            "version": s.version(),
            "cipher": s.cipher()[0],
            "connack": connack,
            "suback": suback,
            "echo": echo == b"\x30" + remaining_length(len(body)) + body,
        }), flush=True)


if __name__ == "__main__":
    main()

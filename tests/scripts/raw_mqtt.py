"""MQTT 3.1.1 packets as bytes, for the scripts that speak MQTT over a raw
(TLS) socket rather than through a client library: tls_resume.py and
tls_suites.py. Imported from the scripts' own directory."""


def connect_packet(client_id):
    """A CONNECT: "MQTT", level 4, clean session, keep-alive 30."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def remaining_length(n):
    """The variable-length Remaining Length field for n bytes."""
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def read_exact(sock, n):
    """n bytes, or fewer if the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_packet(sock):
    """One whole packet: fixed header, Remaining Length and body."""
    first = read_exact(sock, 1)
    length, shift = 0, 0
    while True:
        b = read_exact(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first + remaining_length(length) + read_exact(sock, length)

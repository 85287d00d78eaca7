//! The null broker: accepts, answers CONNECT with `20 02 00 00` (a level-5
//! CONNECT with the 5.0 form, `20 03 00 00 00`) and PINGREQ with `D0 00`,
//! closes on DISCONNECT, ignores everything else. No broker logic at all: the
//! ceiling this machine allows for connect and ping rates.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX - 1);
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
/// MQTT 5.0: Property Length 0 after the reason code.
const CONNACK_V5: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];

struct Client {
    stream: TcpStream,
    /// Bytes of a packet not yet whole; allocated only when that happens.
    partial: Option<Vec<u8>>,
}

enum Verdict {
    Keep,
    Close,
}

/// Parses whole packets from `buf`, writes replies; returns how many bytes
/// were consumed and whether the client is done.
fn handle(buf: &[u8], out: &mut Vec<u8>) -> (usize, Verdict) {
    let mut off = 0;
    loop {
        let rest = &buf[off..];
        if rest.len() < 2 {
            return (off, Verdict::Keep);
        }
        // Remaining Length: up to 4 bytes of varint.
        let mut len: usize = 0;
        let mut mul = 1;
        let mut i = 1;
        loop {
            let Some(&b) = rest.get(i) else {
                return (off, Verdict::Keep);
            };
            len += usize::from(b & 0x7f) * mul;
            mul *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 4 {
                return (off, Verdict::Close);
            }
        }
        let total = i + len;
        if rest.len() < total {
            return (off, Verdict::Keep);
        }
        match rest[0] >> 4 {
            1 if is_v5_connect(&rest[i..total]) => out.extend_from_slice(&CONNACK_V5),
            1 => out.extend_from_slice(&CONNACK),
            12 => out.extend_from_slice(&PINGRESP),
            14 => return (off + total, Verdict::Close),
            _ => {}
        }
        off += total;
    }
}

/// A CONNECT body whose protocol level (after the protocol name) is 5.
fn is_v5_connect(body: &[u8]) -> bool {
    let [a, b, ..] = body else {
        return false;
    };
    let name_len = usize::from(u16::from_be_bytes([*a, *b]));
    body.get(2 + name_len) == Some(&5)
}

fn serve(listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut clients: Vec<Option<Client>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(4096);
    let mut rbuf = vec![0u8; 16384];
    let mut out = Vec::with_capacity(256);
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let idx = free.pop().unwrap_or_else(|| {
                                clients.push(None);
                                clients.len() - 1
                            });
                            if poll
                                .registry()
                                .register(&mut stream, Token(idx), Interest::READABLE)
                                .is_err()
                            {
                                free.push(idx);
                                continue;
                            }
                            clients[idx] = Some(Client {
                                stream,
                                partial: None,
                            });
                            // The CONNECT has often arrived before the accept.
                            if !service(&mut clients[idx], &mut rbuf, &mut out, false) {
                                clients[idx] = None;
                                free.push(idx);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // EMFILE and the like: stop accepting for this round;
                        // the backlog keeps the rest.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let idx = ev.token().0;
            if idx >= clients.len() || clients[idx].is_none() {
                continue;
            }
            if !service(&mut clients[idx], &mut rbuf, &mut out, ev.is_read_closed()) {
                clients[idx] = None;
                free.push(idx);
            }
        }
    }
}

/// Reads what there is and answers; false when the client is to be closed.
fn service(slot: &mut Option<Client>, rbuf: &mut [u8], out: &mut Vec<u8>, closed: bool) -> bool {
    let Some(c) = slot.as_mut() else {
        return false;
    };
    loop {
        let k = match c.stream.read(rbuf) {
            Ok(0) => return false,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        out.clear();
        let verdict = match c.partial.as_mut() {
            Some(p) => {
                p.extend_from_slice(&rbuf[..k]);
                let (used, v) = handle(p, out);
                p.drain(..used);
                if p.is_empty() {
                    c.partial = None;
                }
                v
            }
            None => {
                let (used, v) = handle(&rbuf[..k], out);
                if used < k {
                    c.partial = Some(rbuf[used..k].to_vec());
                }
                v
            }
        };
        if !out.is_empty() && c.stream.write_all(out).is_err() {
            return false;
        }
        if let Verdict::Close = verdict {
            return false;
        }
        if k < rbuf.len() && !closed {
            return true;
        }
    }
}

/// Binds `addr` (SO_REUSEPORT, one listener per thread) and serves forever.
pub fn run(addr: &str, threads: usize) -> Result<()> {
    let limit = crate::sys::raise_nofile();
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--listen {addr}: not an IP:PORT"))?;
    let mut listeners = Vec::new();
    for _ in 0..threads.max(1) {
        listeners.push(bind(addr).with_context(|| format!("bind {addr}"))?);
    }
    eprintln!(
        "null-broker listening on {addr}, {} thread(s), open-file limit {limit}",
        threads.max(1)
    );
    let first = listeners.remove(0);
    for l in listeners {
        std::thread::spawn(move || serve(l));
    }
    serve(first)
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket syscalls on an fd we own, closed on every error path.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    fd,
                    &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                libc::bind(
                    fd,
                    &sa as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        if rc != 0 || libc::listen(fd, 65535) != 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(std::net::TcpListener::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_connect_and_pingreq_and_stops_at_disconnect() {
        let mut out = Vec::new();
        // CONNECT (any body), PINGREQ, DISCONNECT, then junk never read.
        let mut input = vec![0x10, 0x03, 1, 2, 3, 0xC0, 0x00, 0xE0, 0x00, 0x30];
        let (used, v) = handle(&input, &mut out);
        assert_eq!(out, [0x20, 0x02, 0x00, 0x00, 0xD0, 0x00]);
        assert_eq!(used, 9);
        assert!(matches!(v, Verdict::Close));
        // A partial packet is left for later.
        input = vec![0x10, 0x05, 1, 2];
        out.clear();
        let (used, v) = handle(&input, &mut out);
        assert_eq!(used, 0);
        assert!(out.is_empty());
        assert!(matches!(v, Verdict::Keep));
    }

    #[test]
    fn answers_a_level_5_connect_in_the_5_0_form() {
        let mut out = Vec::new();
        // CONNECT: "MQTT", level 5, flags, keepAlive, Property Length 0, clientId "a".
        let v5 = [
            0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0, 0, 1, b'a',
        ];
        let (used, _) = handle(&v5, &mut out);
        assert_eq!(used, v5.len());
        assert_eq!(out, [0x20, 0x03, 0x00, 0x00, 0x00]);
        out.clear();
        let v4 = [
            0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 1, b'a',
        ];
        handle(&v4, &mut out);
        assert_eq!(out, [0x20, 0x02, 0x00, 0x00]);
    }
}

//! Accepting sockets and reading their CONNECT under the connect timeout,
//! then handing each connection to the shard that owns its clientId.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

use super::driver::{read_some, start_connection};
use super::mesh::{Handoff, MeshMsg};
use super::Shard;
use crate::metrics::{bump, get};
use crate::proto::codec::{return_code, ProtocolVersion};
use crate::proto::handshake::{
    self, assign_client_id, check_connect, connack_bytes, owner_of, FirstPacket, HandshakeError,
};

/// The accept queue length asked of the kernel (capped by
/// net.core.somaxconn): a connection storm queues here, not in SYN retries.
const LISTEN_BACKLOG: i32 = 65_535;

/// Binds `addr` with SO_REUSEPORT so every shard has its own accept queue and
/// the kernel spreads connections across shards by flow hash. Returns the
/// listener and its raw fd (valid while the listener lives).
pub fn bind(addr: SocketAddr) -> io::Result<(TcpListener, RawFd)> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per connection. MQTT packets are small
    // and latency-bound; Nagle would hold a PINGRESP or a PUBACK back.
    socket.set_nodelay(true)?;
    // Non-blocking, so the accept loop's own accept4 returns EAGAIN on an
    // empty queue instead of blocking the shard.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
    // SAFETY: `fd` is a bound, listening socket we own and hand over whole.
    Ok((unsafe { TcpListener::from_raw_fd(fd) }, fd))
}

/// Accepts forever on `listener`.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, listener_fd: RawFd) {
    // One spare descriptor per shard: when accept fails with EMFILE, it is
    // released, the pending connection accepted and closed at once (counted),
    // and the spare taken back — otherwise the kernel keeps the connection
    // queued and the accept loop spins on EMFILE.
    let mut spare = open_spare();
    loop {
        // Fast path: accept4 straight from the queue, one syscall per
        // connection. glommio's own accept wraps every accept in three fcntl
        // calls (it toggles the listener's O_NONBLOCK); we use it only to wait
        // in the ring once the queue is empty.
        let accepted = match accept_now(listener_fd) {
            // SAFETY: accept4 returned a fresh connected socket we own.
            Some(Ok(fd)) => Ok(unsafe { TcpStream::from_raw_fd(fd) }),
            Some(Err(e)) => Err(glommio::GlommioError::IoError(e)),
            None => listener.accept().await,
        };
        match accepted {
            Ok(stream) => {
                if get(&shard.counters.sockets_current) >= shard.socket_ceiling {
                    bump(&shard.counters.accept_refused);
                    drop(stream);
                    continue;
                }
                let shard2 = shard.clone();
                glommio::spawn_local(handshake_task(shard2, stream)).detach();
            }
            Err(err) => {
                let errno = match &err {
                    glommio::GlommioError::IoError(e) => e.raw_os_error(),
                    _ => None,
                };
                if matches!(errno, Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    bump(&shard.counters.accept_refused);
                    drop(spare.take());
                    refuse_one(listener_fd);
                    spare = open_spare();
                    if spare.is_none() {
                        // Still no descriptor: back off instead of spinning.
                        glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                    }
                } else if shard.is_shutting_down() {
                    return;
                } else {
                    tracing::warn!(shard = shard.id.0, error = %err, "accept failed");
                    glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// One accept4 on the non-blocking listener; `None` when the queue is empty.
fn accept_now(listener: RawFd) -> Option<io::Result<RawFd>> {
    // SAFETY: accept4 on our listening fd with no address buffers.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd >= 0 {
        return Some(Ok(fd));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) => None,
        // Interrupted or a connection that died in the queue: try again
        // through the ring.
        Some(libc::EINTR) | Some(libc::ECONNABORTED) => None,
        _ => Some(Err(err)),
    }
}

fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn refuse_one(listener: RawFd) {
    // SAFETY: plain accept4 on our listening fd; the result is closed at once.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd >= 0 {
        // SAFETY: accept4 returned a fresh descriptor we own.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Counts a socket as open for as long as it lives on any shard.
pub(crate) struct SocketGuard(pub(crate) Rc<Shard>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        crate::metrics::drop_one(&self.0.counters.sockets_current);
    }
}

async fn handshake_task(shard: Rc<Shard>, mut stream: TcpStream) {
    bump(&shard.counters.sockets_current);
    let guard = SocketGuard(shard.clone());
    let mut buf = BytesMut::new();
    let first = glommio::timer::timeout(shard.config.connect_timeout, async {
        loop {
            match handshake::read_first_packet(&mut buf, shard.config.max_packet_size) {
                FirstPacket::Incomplete => {}
                other => return Ok(other),
            }
            match read_some(&shard, &mut stream, &mut buf).await {
                Ok(0) | Err(_) => {
                    return Err(glommio::GlommioError::IoError(
                        io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(_) => {}
            }
        }
    })
    .await;

    let connect = match first {
        Ok(FirstPacket::Connect(connect)) => connect,
        Ok(FirstPacket::Reject { connack, error }) => {
            bump(&shard.counters.malformed_packets);
            if let HandshakeError::Malformed(e) = error {
                tracing::debug!(error = %e, "malformed first packet");
            }
            if let Some(code) = connack {
                bump(&shard.counters.connacks[usize::from(code)]);
                let reply = connack_bytes(ProtocolVersion::V3_1_1, false, code);
                let _ = stream.write_all(&reply).await;
            }
            return;
        }
        Ok(FirstPacket::Incomplete) => return,
        Err(glommio::GlommioError::TimedOut(_)) => {
            bump(&shard.counters.connect_timeouts);
            return;
        }
        Err(_) => return, // closed or failed before a whole CONNECT
    };

    let refusal = check_connect(&connect, shard.auth.as_ref())
        .err()
        .or_else(|| {
            (get(&shard.counters.connections_current) >= shard.connection_ceiling)
                .then_some(return_code::SERVER_UNAVAILABLE)
        });
    if let Some(code) = refusal {
        bump(&shard.counters.connacks[code as usize]);
        // MQTT 5 clients are refused in the 3.1.1 format: this broker does
        // not speak 5.0 yet, which is what return code 1 tells them.
        let version = match connect.protocol {
            ProtocolVersion::V5 => ProtocolVersion::V3_1_1,
            v => v,
        };
        let _ = stream.write_all(&connack_bytes(version, false, code)).await;
        return;
    }

    let mut connect = connect;
    if connect.client_id.is_empty() {
        // MQTT-3.1.3-6: assign a unique id; it is hashed after assignment.
        connect.client_id = assign_client_id(shard.nonce, shard.id, shard.next_serial());
    }
    let owner = owner_of(&connect.client_id, shard.shards);
    if owner == shard.id {
        start_connection(shard, stream, guard, *connect, buf);
        return;
    }
    if shard.mesh_backlogged() {
        // The owner is not keeping up with what we already sent it (its inbox
        // is full and our overflow queue is not empty): refuse rather than
        // queue without bound (CONNACK 3, server unavailable).
        let code = return_code::SERVER_UNAVAILABLE;
        bump(&shard.counters.connacks[usize::from(code)]);
        let _ = stream
            .write_all(&connack_bytes(connect.protocol, false, code))
            .await;
        return;
    }
    // Hand over: dup the fd so dropping our glommio stream (which closes its
    // own fd) leaves the socket open for the owner.
    // SAFETY: dup of a descriptor we hold open; the result is owned below.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        return;
    }
    // SAFETY: fresh descriptor from dup.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    drop(stream);
    // The owner shard counts the socket from its arrival there.
    drop(guard);
    shard.send_to(
        owner,
        MeshMsg::Handoff(Handoff {
            fd,
            connect,
            rest: buf,
        }),
    );
}

//! Listening sockets: binding with SO_REUSEPORT, and the accept calls the
//! shard's socket loop ([`super::net`]) makes on them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// The accept queue length asked of the kernel (capped by
/// net.core.somaxconn): a connection storm queues here, not in SYN retries.
const LISTEN_BACKLOG: i32 = 65_535;

/// Binds `addr` with SO_REUSEPORT so every shard has its own accept queue and
/// the kernel spreads connections across shards by flow hash.
pub fn bind(addr: SocketAddr) -> io::Result<OwnedFd> {
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
    // Non-blocking, so accept4 returns EAGAIN on an empty queue instead of
    // blocking the shard.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// One accept4 on the non-blocking listener; `None` when the queue is empty.
/// The socket comes back non-blocking, as the shard's loop needs it.
pub fn accept_now(listener: RawFd) -> Option<io::Result<OwnedFd>> {
    loop {
        // SAFETY: accept4 on our listening fd with no address buffers.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a fresh connected socket we own.
            return Some(Ok(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => return None,
            // A connection that died in the queue, or a signal: next one.
            Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
            _ => return Some(Err(err)),
        }
    }
}

/// A descriptor held in reserve for [`refuse_one`].
pub fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

/// Accepts one queued connection and closes it at once. Called with a
/// descriptor freed for the purpose when accept fails with EMFILE: otherwise
/// the kernel keeps the connection queued, the listener stays readable, and
/// the shard would spin on EMFILE.
pub fn refuse_one(listener: RawFd) {
    // Accepted, and closed as the descriptor drops.
    let _ = accept_now(listener);
}

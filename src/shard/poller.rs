//! The `--io epoll` loop's poller: one epoll set per shard holding every
//! client socket, listener and mesh doorbell, which the shard blocks on when
//! it has nothing to do. It is the loop `--io auto` falls back to when the
//! kernel lacks what the io_uring loop ([`super::uring`]) needs, and the one
//! the io_uring loop is measured against (BENCHMARKS.md, "io_uring against
//! epoll").
//!
//! History, and why this loop once replaced io_uring: the first shard gave
//! each connection a glommio `TcpStream` and a task. glommio arms a fresh
//! io_uring poll per read, and each pending poll is a 472-byte `Source`
//! allocation beside the task's own ~500 bytes: 2,008 B per held connection
//! (BENCHMARKS.md), four times the 512 B we aim for. An epoll registration
//! lives in the kernel (an `epitem`, ~135 B), is made once per connection
//! and stays armed: an idle connection costs the shard nothing but the
//! broker's own records. Parking in glommio's ring until the epoll
//! descriptor was readable cost 39.8 µs of broker CPU per connect/disconnect
//! cycle against 29.7 µs blocking in `epoll_wait` (every wake-up through
//! glommio costs a turn of its executor: an `io_uring_enter` to install its
//! preemption timer and another to park).
//!
//! That compared epoll with glommio's way of using io_uring (one poll per
//! operation, one task per socket), not with io_uring as the kernel now
//! offers it. The io_uring loop keeps what made epoll cheap (nothing per
//! idle connection but an armed operation in the kernel, one blocking call
//! per turn) and drops what made it cost: the multishot accept and recv
//! replace `accept4`, `recv` and the epoll registration, sends and closes
//! are submissions, and the turn's one `io_uring_enter` both submits and
//! waits. An armed multishot recv costs more kernel memory than an
//! `epitem`; see BENCHMARKS.md for both loops' figures.
//!
//! glommio runs the shard either way: its executor thread, CPU pinning and
//! task queue; the socket loop is its one task and yields to it between
//! batches.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Interest in reading (and hang-ups, which epoll always reports).
pub const READ: u32 = libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
/// Interest in reading and writing: a socket whose send buffer filled up.
pub const READ_WRITE: u32 = READ | libc::EPOLLOUT as u32;

/// A readiness event: the token registered with the descriptor and the
/// `EPOLL*` bits that fired.
pub type Event = libc::epoll_event;

/// The token of an event.
pub fn token(ev: &Event) -> u64 {
    ev.u64
}

/// True when the event says the descriptor can be read (or has hung up or
/// failed, which a read then reports).
pub fn is_readable(ev: &Event) -> bool {
    ev.events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
}

/// True when the event says the descriptor can be written.
pub fn is_writable(ev: &Event) -> bool {
    ev.events & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
}

/// A shard's epoll set. Level-triggered: a socket left with unread bytes is
/// reported again, so one `recv` per readiness is enough and a busy client
/// cannot starve the others.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// A new, empty set.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1; the result is checked and owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor from epoll_create1.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest,
            u64: token,
        };
        // SAFETY: epoll_ctl on our epoll fd with a valid event struct.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for `interest`, reporting `token`.
    pub fn add(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Changes what `fd` is watched for, or its token.
    pub fn modify(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Stops watching `fd` (needed before it moves to another shard: closing
    /// it is the only other way out of the set, and it stays open there).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Fills `events` with what is ready, waiting up to `timeout_ms`
    /// (0: do not wait) for the first.
    pub fn wait(&self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        events.clear();
        let cap = events.capacity().clamp(1, i32::MAX as usize);
        // SAFETY: epoll_wait writes at most `cap` events into the vector's
        // spare capacity; we set the length to what it reports.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                cap as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: the kernel initialised the first `n` entries.
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    #[test]
    fn wait_returns_a_ready_socket_with_its_token_and_times_out_otherwise() {
        let epoll = Epoll::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        epoll.add(listener.as_raw_fd(), READ, 7).unwrap();
        let mut events = Vec::with_capacity(8);
        let start = Instant::now();
        epoll.wait(&mut events, 50).unwrap();
        assert!(events.is_empty(), "nothing is ready yet");
        assert!(start.elapsed() >= Duration::from_millis(45));

        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"x").unwrap();
        for round in 0..2 {
            epoll.wait(&mut events, 1000).unwrap();
            assert_eq!(events.len(), 1, "round {round}");
            assert_eq!(token(&events[0]), 7);
            assert!(is_readable(&events[0]));
            // Level-triggered and not accepted yet: ready again at once.
        }
        epoll.delete(listener.as_raw_fd()).unwrap();
        epoll.wait(&mut events, 0).unwrap();
        assert!(events.is_empty());
    }
}

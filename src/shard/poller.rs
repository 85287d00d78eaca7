//! One epoll set per shard holding every client socket and listener, whose
//! readiness reaches the shard through glommio's io_uring.
//!
//! Why not one glommio `TcpStream` and one task per connection: glommio arms
//! a fresh io_uring poll per read, and each pending poll is a 472-byte
//! `Source` allocation, beside the task's own ~500 bytes. An idle connection
//! then costs about a kilobyte of user memory before the broker stores
//! anything about it — measured at 2,008 B per held connection (see
//! BENCHMARKS.md), four times the 512 B we aim for. An epoll registration
//! lives in the kernel (an `epitem`, counted with the socket's kernel
//! memory), is made once per connection, and stays armed: an idle connection
//! costs the shard nothing but the broker's own records.
//!
//! The shard still parks in io_uring, so mesh doorbells and timers wake it as
//! before. glommio 0.9 has no public "wait until this fd is readable", so
//! [`Epoll::readable`] borrows one: a glommio `TcpStream` built over a
//! descriptor arms an io_uring `POLL_ADD` for it at once
//! (`NonBufferedStream::init`), and a read on it waits for that poll. On an
//! epoll descriptor the read that follows the poll fails with `ENOTSOCK` —
//! that failure *is* the readiness. The stream is never dropped (that would
//! close the epoll descriptor); once its read has returned it holds nothing
//! on the heap. `tests::readable_wakes_on_a_ready_socket` pins this
//! behaviour so a glommio upgrade that changes it fails loudly.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use futures_lite::AsyncReadExt;

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

    /// Fills `events` with what is ready now, without waiting.
    pub fn poll_now(&self, events: &mut Vec<Event>) -> io::Result<()> {
        events.clear();
        let cap = events.capacity().clamp(1, i32::MAX as usize);
        // SAFETY: epoll_wait writes at most `cap` events into the vector's
        // spare capacity; we set the length to what it reports.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                cap as libc::c_int,
                0,
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

    /// Waits, parked in glommio's ring, until some descriptor in the set is
    /// ready. Must run inside a glommio executor.
    pub async fn readable(&self) {
        // See the module docs: the stream's constructor arms the poll; its
        // read waits for it and then fails (ENOTSOCK), which is the signal.
        // SAFETY: the stream borrows our descriptor and is never dropped, so
        // it never closes it.
        let mut waiter =
            ManuallyDrop::new(unsafe { glommio::net::TcpStream::from_raw_fd(self.fd.as_raw_fd()) });
        let _ = waiter.read(&mut [0u8; 1]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    #[test]
    fn readable_wakes_on_a_ready_socket() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .make()
            .expect("executor");
        ex.run(async {
            let epoll = Epoll::new().unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            epoll.add(listener.as_raw_fd(), READ, 7).unwrap();
            let mut events = Vec::with_capacity(8);
            epoll.poll_now(&mut events).unwrap();
            assert!(events.is_empty(), "nothing is ready yet");

            // Connect from another thread after a delay: the wait must park
            // and then be woken by the connection, not return at once.
            let client = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"x").unwrap();
                s
            });
            let start = Instant::now();
            for round in 0..3 {
                epoll.readable().await;
                epoll.poll_now(&mut events).unwrap();
                if round == 0 {
                    assert!(start.elapsed() >= Duration::from_millis(90));
                }
                assert_eq!(events.len(), 1, "round {round}");
                assert_eq!(token(&events[0]), 7);
                assert!(is_readable(&events[0]));
                // Level-triggered and not accepted yet: ready again at once.
            }
            let _ = client.join();
        });
    }
}

//! The `--io uring` socket loop: one turn is one `io_uring_enter` (submit
//! what the last turn queued, wait for a completion until the next tick),
//! then every completion handed to the same socket table and sans-IO broker
//! the epoll loop feeds ([`super::net`]), then the mesh and the tick.
//!
//! Completions by kind:
//! - a listener's multishot accept: a new socket ([`net::accepted`]);
//! - a handshake socket's one-shot recv: bytes for the CONNECT reader;
//! - a connection's multishot recv: bytes for the broker, copied out of the
//!   provided buffer, which goes back to the ring at once;
//! - a connection's send: continued, or the next bytes, or the close;
//! - a doorbell a peer shard posted with MSG_RING.
//!
//! See [`super::uring`] for the ring itself and why each operation.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use super::mesh::Bell;
use super::net::{self, Stopping, Token};
use super::uring::{Completion, RING_BUFFER_SIZE};
use super::{Io, Shard, TICK};

/// Runs the shard on its ring until shutdown.
pub(crate) async fn run(shard: Rc<Shard>) -> io::Result<()> {
    let Io::Uring(ring) = &shard.io else {
        unreachable!("net::run picks this loop for a ring")
    };
    let listeners = shard.net.borrow().listener_count();
    for n in 0..listeners {
        shard.arm_accept(n as u32);
    }
    if let Some(mesh) = &shard.mesh {
        mesh.set_ring_fd(ring.borrow().fd());
    }
    let mut completions: Vec<Completion> = Vec::with_capacity(1024);
    // A handshake's bytes, copied out of the ring before the CONNECT reader
    // (which may submit) runs.
    let mut chunk: Vec<u8> = Vec::with_capacity(RING_BUFFER_SIZE as usize);
    let mut next_tick = Instant::now() + TICK;
    let mut stopping: Option<Stopping> = None;
    loop {
        // Whatever the last turn produced for other shards leaves before this
        // shard may block.
        shard.flush_outbox();
        let mut wait = true;
        if let Some(mesh) = &shard.mesh {
            if !mesh.arm_before_block() {
                // Messages are waiting: look at the sockets, do not block.
                wait = false;
            }
        }
        shard.rearm_recvs();
        if let Some(mesh) = &shard.mesh {
            let mut r = ring.borrow_mut();
            mesh.take_rings(|fd, bell| {
                let token = match bell {
                    Bell::Data => Token::DataBell,
                    Bell::Room => Token::RoomBell,
                };
                r.msg_ring(fd, token.encode(), Token::Internal.encode());
            });
        }
        let timeout = next_tick.saturating_duration_since(Instant::now());
        completions.clear();
        let dropped = ring.borrow_mut().enter(wait, timeout, &mut completions)?;
        if dropped > 0 {
            shard
                .counters
                .cq_dropped
                .fetch_add(u64::from(dropped), std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(mesh) = &shard.mesh {
            mesh.disarm();
        }
        for c in &completions {
            complete(&shard, c, &mut chunk);
            if shard.sync_each_read {
                shard.commit_log().await;
            }
        }
        let done = net::end_of_turn(&shard, &mut next_tick, &mut stopping);
        shard.commit_log().await;
        if done {
            if let Some(mesh) = &shard.mesh {
                mesh.set_ring_fd(-1);
            }
            // The closes the last turn queued.
            ring.borrow_mut().flush();
            return Ok(());
        }
        glommio::yield_if_needed().await;
    }
}

/// Handles one completion.
fn complete(shard: &Shard, c: &Completion, chunk: &mut Vec<u8>) {
    let Io::Uring(ring) = &shard.io else { return };
    let data_len = usize::try_from(c.result).unwrap_or(0);
    if c.result > 0 && c.buffer().is_some() {
        shard.bytes_in.set(shard.bytes_in.get() + data_len as u64);
    }
    match Token::decode(c.user_data) {
        Token::Conn(t) => {
            if let Some(bid) = c.buffer() {
                let id = shard.net.borrow().resolve_conn(t);
                let target = id.and_then(|id| shard.read_buf(id).map(|(_, buf)| (id, buf)));
                let read = target.map(|(id, mut buf)| {
                    buf.extend_from_slice(ring.borrow().bytes(bid, data_len));
                    (id, buf)
                });
                ring.borrow_mut().give_back(bid);
                if let Some((id, buf)) = read {
                    shard.conn_read(id, buf);
                }
            }
            if !c.more() {
                let id = shard.net.borrow().resolve_conn(t);
                if let Some(id) = id {
                    // Bytes with the last completion were fed above; an
                    // end with bytes is the kernel's limit, not EOF.
                    let result = if c.result > 0 { 1 } else { c.result };
                    shard.recv_ended(id, result);
                }
            }
        }
        Token::Pending { index, generation } => {
            chunk.clear();
            if let Some(bid) = c.buffer() {
                chunk.extend_from_slice(ring.borrow().bytes(bid, data_len));
                ring.borrow_mut().give_back(bid);
            }
            shard.pending_recv_done(index, generation, c.result, chunk);
        }
        Token::Listener(n) => {
            if c.result >= 0 {
                // SAFETY: a successful accept's result is a new descriptor
                // that only this completion refers to.
                let fd = unsafe {
                    <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c.result)
                };
                if shard.listener_fd(n).is_some() {
                    net::accepted(shard, fd);
                }
                // else: shutting down; dropping it closes it.
            } else if c.result != -libc::ECANCELED {
                if let Some(listener) = shard.listener_fd(n) {
                    let e = io::Error::from_raw_os_error(-c.result);
                    if !net::accept_failed(shard, n, listener, &e) {
                        // Paused: the tick arms it again.
                        mark_accept_ended(shard, n, c.more());
                        return;
                    }
                }
            }
            if !c.more() {
                shard.accept_ended(n);
            }
        }
        Token::Send(t) => shard.send_done(t, c.result),
        // The inbox is looked at at the end of every turn, rung or not.
        Token::DataBell => {}
        Token::RoomBell => {
            if let Some(mesh) = &shard.mesh {
                mesh.drain_overflow();
            }
        }
        Token::Internal => {
            if c.result < 0 && c.result != -libc::ENOENT && c.result != -libc::EALREADY {
                tracing::debug!(
                    error = %io::Error::from_raw_os_error(-c.result),
                    "io_uring cancel or close failed"
                );
            }
        }
    }
}

/// A paused listener's accept that has ended is no longer armed (the
/// tick's resume arms it); one still armed was cancelled by the pause.
fn mark_accept_ended(shard: &Shard, n: u32, more: bool) {
    if !more {
        shard.net.borrow_mut().set_accepting(n, false);
    }
}

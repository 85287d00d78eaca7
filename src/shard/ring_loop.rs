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
//! - a doorbell a peer shard posted with MSG_RING;
//! - `--data-dir`: the write and the fdatasync of a log commit.
//!
//! **Log commits** (`--data-dir`, `--fsync batch|never`): at the end of a
//! turn, when no commit is in flight, the records the broker gathered go
//! down as one write linked to one fdatasync, submitted with the next
//! enter; the loop goes on reading, delivering and routing meanwhile, and
//! the records of those turns wait for the commit after it (group commit
//! sized by the disk's speed). The turn that sees both completions tells
//! the broker, which releases the acknowledgements that waited. With
//! `--fsync always` the loop waits for a commit after each read instead
//! ([`Shard::commit_log`]), as the epoll loop does after each turn.
//!
//! See [`super::uring`] for the ring itself and why each operation.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use super::mesh::Bell;
use super::net::{self, Stopping, Token};
use super::store::{RingCommit, RingWrite};
use super::uring::{Completion, RING_BUFFER_SIZE};
use super::{fatal_disk_error, Io, Shard, TICK};

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
    // When records held back by --commit-interval-usec are due.
    let mut commit_due: Option<Instant> = None;
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
        let wake_by = commit_due.map_or(next_tick, |due| due.min(next_tick));
        let timeout = wake_by.saturating_duration_since(Instant::now());
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
        shard.refresh_reload();
        for c in &completions {
            complete(&shard, c, &mut chunk);
            if shard.sync_each_read {
                shard.commit_log().await;
            }
        }
        let done = net::end_of_turn(&shard, &mut next_tick, &mut stopping);
        if shard.sync_each_read {
            shard.commit_log().await;
        } else {
            log_durable(&shard).await;
            commit_due = log_submit(&shard);
        }
        if done {
            // The commit in flight, then the last records, before exit.
            while shard.ring_commit.borrow().is_some()
                || shard.log.borrow().as_ref().is_some_and(|l| l.is_filling())
            {
                completions.clear();
                ring.borrow_mut().enter(true, TICK, &mut completions)?;
                for c in &completions {
                    complete(&shard, c, &mut chunk);
                }
                log_durable(&shard).await;
            }
            shard.commit_log().await;
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
                if let Some(id) = id.filter(|id| shard.is_layered(*id)) {
                    chunk.clear();
                    chunk.extend_from_slice(ring.borrow().bytes(bid, data_len));
                    ring.borrow_mut().give_back(bid);
                    shard.layered_read(id, chunk);
                } else {
                    let target = id.and_then(|id| shard.read_buf(id).map(|(_, buf)| (id, buf)));
                    let read = target.map(|(id, mut buf)| {
                        buf.extend_from_slice(ring.borrow().bytes(bid, data_len));
                        (id, buf)
                    });
                    ring.borrow_mut().give_back(bid);
                    match (read, id) {
                        (Some((id, buf)), _) => shard.conn_read(id, buf),
                        // Closing: read away (see Shard::closing_read).
                        (None, Some(id)) => shard.closing_read(id, data_len),
                        (None, None) => {}
                    }
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
                    net::accepted(shard, n, fd);
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
        Token::LogWrite => log_written(shard, c.result),
        Token::LogFill => {
            if let Some(log) = shard.log.borrow_mut().as_mut() {
                if let Err(e) = log.filled(c.result) {
                    fatal_disk_error(shard.id, "writing", &e);
                }
            }
        }
        Token::LogSync => {
            if let Some(commit) = shard.ring_commit.borrow_mut().as_mut() {
                if let Err(e) = commit.synced(c.result) {
                    fatal_disk_error(shard.id, "syncing", &e);
                }
            }
        }
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

/// `--data-dir`: the commit in flight became durable (both its completions
/// came this turn or before): the broker hears it, the acknowledgements
/// that waited for it go out, and the shard snapshots when it is due.
async fn log_durable(shard: &Shard) {
    let durable = shard
        .ring_commit
        .borrow()
        .as_ref()
        .is_some_and(|c| c.is_durable());
    if !durable {
        return;
    }
    let Some(commit) = shard.ring_commit.borrow_mut().take() else {
        return;
    };
    if let Some(log) = shard.log.borrow_mut().as_mut() {
        log.ring_committed(&commit);
    }
    shard.broker.borrow_mut().committed(commit.generation);
    shard.dispatch();
    shard.snapshot_if_due().await;
}

/// `--data-dir`: with no commit in flight, the records gathered since the
/// last one go down as the next, submitted with this turn's enter, unless
/// the last one started less than `--commit-interval-usec` ago: then they
/// wait until the time returned. While a commit is in flight, records wait for
/// it (one commit at a time keeps the log in order, and gathers more per
/// fdatasync when the disk is slow).
fn log_submit(shard: &Shard) -> Option<Instant> {
    if shard.ring_commit.borrow().is_some() {
        return None;
    }
    if let Some(fill) = shard.log.borrow_mut().as_mut().and_then(|l| l.fill_due()) {
        submit(shard, &fill, Token::LogFill, None);
    }
    let pending = shard.broker.borrow().log_len();
    let fits = shard
        .log
        .borrow()
        .as_ref()
        .is_some_and(|l| l.can_commit(pending));
    // Waiting for the fill ahead (the start's first), which wakes the loop.
    if pending == 0 || !fits {
        return None;
    }
    let now = Instant::now();
    if let Some(due) = shard.commit_not_before(now) {
        return Some(due);
    }
    let (records, generation) = shard.broker.borrow_mut().take_log()?;
    shard.last_commit.set(Some(now));
    let commit = match shard.log.borrow().as_ref() {
        Some(log) => log.ring_commit(&records, generation),
        None => return None,
    };
    submit_write(shard, &commit);
    *shard.ring_commit.borrow_mut() = Some(commit);
    None
}

/// Queues the commit's (remaining) write, and its fdatasync, on the ring.
fn submit_write(shard: &Shard, commit: &RingCommit) {
    let w = commit.next_write();
    let sync = w.sync.then_some(Token::LogSync);
    submit(shard, &w, Token::LogWrite, sync);
}

/// Queues write `w` (and an fdatasync linked after it) on the ring.
fn submit(shard: &Shard, w: &RingWrite, token: Token, sync: Option<Token>) {
    let Io::Uring(ring) = &shard.io else { return };
    // SAFETY: the bytes are a commit's buffer, which stays in
    // `shard.ring_commit`, or the log's zeros, which stay in the log: both
    // heap memory, unmoved and unchanged until the write completes (a
    // commit is dropped only once durable, the log only at exit, after
    // its fill completed).
    unsafe {
        ring.borrow_mut().write_at(
            w.fd,
            (w.data, w.len, w.offset),
            token.encode(),
            sync.map(Token::encode),
        );
    }
}

/// The commit's write completed: all of it, or a part (the rest is
/// written again, with its fdatasync), or an error, which ends the process.
fn log_written(shard: &Shard, result: i32) {
    let mut slot = shard.ring_commit.borrow_mut();
    let Some(commit) = slot.as_mut() else { return };
    match commit.wrote(result) {
        Ok(true) => {}
        Ok(false) => submit_write(shard, commit),
        Err(e) => fatal_disk_error(shard.id, "writing", &e),
    }
}

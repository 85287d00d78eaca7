//! The per-connection task: read → `broker.handle_read` → write what the
//! broker queued, until the broker or the socket ends the connection.
//!
//! An idle connection holds no read buffer: bytes are read into the shard's
//! one scratch buffer and copied into a per-connection `BytesMut` only while a
//! packet is incomplete or being decoded; an empty buffer is released.
//! Nothing here sets a timer: keep-alive lives in the broker's wheel.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;

use super::listener::SocketGuard;
use super::mesh::Handoff;
use super::Shard;
use crate::metrics::bump;
use crate::proto::codec::Connect;
use crate::proto::ConnId;

/// Reads whatever the socket has (waiting until it has something) and
/// appends it to `buf`. Returns the number of bytes; 0 is EOF.
pub(crate) async fn read_some(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_into(shard, stream, buf, cx)).await
}

fn poll_read_into(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    // The scratch buffer is borrowed only inside this poll: glommio's
    // unbuffered stream touches the slice only during the non-blocking recv,
    // never while the task is parked.
    let mut scratch = shard.scratch.borrow_mut();
    match Pin::new(stream).poll_read(cx, &mut scratch[..]) {
        Poll::Ready(Ok(n)) => {
            buf.extend_from_slice(&scratch[..n]);
            Poll::Ready(Ok(n))
        }
        other => other,
    }
}

/// Registers a CONNECT with the broker (takeover, session, CONNACK) and
/// spawns the connection's task.
pub(crate) fn start_connection(
    shard: Rc<Shard>,
    stream: TcpStream,
    guard: SocketGuard,
    connect: Connect,
    rest: BytesMut,
) {
    let now = shard.now();
    let id = shard.broker.borrow_mut().connect(connect, now);
    shard.set_waker_slot(id);
    shard.dispatch();
    glommio::spawn_local(connection_task(shard, stream, guard, id, rest)).detach();
}

/// A connection handed over by the shard that accepted it.
pub(crate) fn accept_handoff(shard: Rc<Shard>, handoff: Handoff) {
    bump(&shard.counters.sockets_current);
    let guard = SocketGuard(shard.clone());
    // SAFETY: the fd is a connected TCP socket whose ownership the message
    // carried here; glommio's stream now owns it.
    let stream = unsafe { TcpStream::from_raw_fd(handoff.fd.into_raw_fd()) };
    start_connection(shard, stream, guard, *handoff.connect, handoff.rest);
}

enum Wake {
    Read(io::Result<usize>),
    Broker,
}

async fn connection_task(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    _guard: SocketGuard,
    id: ConnId,
    mut inbuf: BytesMut,
) {
    if !inbuf.is_empty() {
        let now = shard.now();
        shard.broker.borrow_mut().handle_read(id, &mut inbuf, now);
        shard.dispatch();
    }
    loop {
        let out = shard.broker.borrow_mut().take_outgoing(id);
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            shard.lost(id);
            break;
        }
        if shard.broker.borrow().is_closing(id) {
            if shard.broker.borrow().has_outgoing(id) {
                continue;
            }
            // Dropping the stream closes the socket, which sends FIN after
            // what we wrote; an explicit shutdown first would cost a syscall
            // per connection for nothing.
            drop(stream);
            shard.broker.borrow_mut().release(id);
            shard.clear_waker(id);
            break;
        }
        let wake = std::future::poll_fn(|cx| {
            if shard.broker.borrow().wants_attention(id) {
                return Poll::Ready(Wake::Broker);
            }
            shard.store_waker(id, cx.waker());
            poll_read_into(&shard, &mut stream, &mut inbuf, cx).map(Wake::Read)
        })
        .await;
        match wake {
            Wake::Broker => {}
            Wake::Read(Ok(n)) if n > 0 => {
                let now = shard.now();
                shard.broker.borrow_mut().handle_read(id, &mut inbuf, now);
                if inbuf.is_empty() {
                    // Release the allocation: an idle connection keeps no buffer.
                    inbuf = BytesMut::new();
                }
                shard.dispatch();
            }
            Wake::Read(_) => {
                // EOF or error without DISCONNECT: the will goes out.
                shard.lost(id);
                break;
            }
        }
    }
}

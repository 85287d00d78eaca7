//! A shard's io_uring: the ring, its provided-buffer ring, and the
//! operations the `--io uring` loop ([`super::net`]) submits on it.
//!
//! What moves the bytes, and why each piece (figures in BENCHMARKS.md):
//!
//! - **Multishot accept** on each listener: one SQE accepts every connection
//!   until it fails; each new socket is a completion, not an `accept4`.
//! - **Multishot recv with a provided-buffer ring**: one SQE per connection
//!   for its whole life, armed at CONNECT. The kernel picks a buffer from
//!   the shard's ring only when bytes arrive, so an idle connection holds no
//!   buffer of ours; the loop copies the bytes into the connection's packet
//!   buffer (as the epoll loop copies from its scratch buffer) and gives the
//!   buffer back at once. An empty ring ends a multishot recv with ENOBUFS:
//!   the loop re-arms it after the turn has given its buffers back, and the
//!   bytes wait in the socket meanwhile, so none are lost. The ring starts
//!   with 64 buffers and doubles at each ENOBUFS, up to `--ring-buffers`:
//!   the kernel takes buffers in ring order, so all the ring holds become
//!   resident, and a shard's 4 MiB is paid only where bursts need it.
//! - **Sends and closes as SQEs**: one send in flight per connection keeps
//!   its writes in order; a partial send is continued from where it
//!   stopped. A close first cancels what is still armed on the socket (an
//!   armed recv holds a reference to it: closing the descriptor alone would
//!   leave the TCP connection open), hard-linked so the close runs even when
//!   there was nothing left to cancel. Each cancel names its operation's
//!   token, which the kernel finds in a hash table; cancelling "everything
//!   on this descriptor" walks every armed operation of the ring instead,
//!   and closing 19,000 connections that way took 5.5 s of CPU.
//! - **One `io_uring_enter` per loop turn**: it submits what the turn
//!   queued and waits for the next completion, at most until the next tick.
//!   The ring is `SINGLE_ISSUER | DEFER_TASKRUN`, so completions are posted
//!   only inside that call: nothing interrupts the shard while it works.
//! - **Doorbells with `IORING_OP_MSG_RING`**: a shard that gives a parked
//!   peer messages posts a completion into the peer's ring from its own
//!   (see [`super::mesh::Wake::Ring`]); the messages stay on the crossbeam
//!   channels.
//! - **Log commits** (`--data-dir`, `--fsync batch|never`): the records of
//!   a turn go down as a write to the shard's log file linked to an
//!   fdatasync, submitted with the turn's other operations; their
//!   completions arrive among the sockets', and the loop goes on reading
//!   and delivering while the disk works (see `super::ring_loop`); so do
//!   the writes of zeros kept ahead of the log's end
//!   (`super::store::ShardLog::fill_due`).
//!
//! Plain descriptors, not registered ("direct") ones: a hand-off passes the
//! socket to another shard as an ordinary descriptor, and a refusal answers
//! with a plain `send`. Direct descriptors were tried (accept into a sparse
//! file table, operations by slot, FIXED_FD_INSTALL before a refusal or a
//! hand-off) and measured no gain on churn or pings within this machine's
//! noise (BENCHMARKS.md), against the ~6 % the bare servers of issue 10
//! measured: not worth a second path for hand-offs and refusals.
//!
//! Not tried, because MQTT's packets are small: registered buffers (sends
//! come from the broker's `BytesMut`, and would be copied into them),
//! SEND_ZC (it pays above ~10 KiB per send and adds a notification
//! completion to each), recv bundles (one completion for several buffers:
//! a read rarely fills one 4 KiB buffer).
//!
//! The completion queue is sized from the shard's share of the socket
//! ceiling (two completions per connection per turn at most: its recv and
//! its send, with slack for uneven spreading), within the kernel's 65,536;
//! beyond that the kernel keeps completions on its overflow list
//! (`IORING_FEAT_NODROP`) and hands them over at the next enter. A
//! completion the kernel had to drop is counted (`cq_dropped` in the stats)
//! and logged: nothing is lost silently.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// The buffer group of the shard's provided-buffer ring.
const BUF_GROUP: u16 = 0;

/// Bytes per provided buffer: a whole QoS 1 telemetry PUBLISH fits in one;
/// a bigger packet arrives in several completions, as it would in several
/// `recv` calls.
pub const RING_BUFFER_SIZE: u32 = 4096;

/// Buffers a shard's ring starts with, and the fewest it shrinks to. The
/// kernel takes buffers in ring order, so every buffer in the ring is
/// written (and costs a resident page) once the ring has cycled; a ring of
/// `--ring-buffers` from the start would hold 4 MiB per shard however few
/// connections it serves. It doubles each time a turn's reads find it
/// empty, up to `--ring-buffers`, and shrinks back (see [`Uring::trim`])
/// once bursts that large have stopped: its memory follows the largest
/// burst of reads of the last few seconds.
const INITIAL_BUFFERS: u16 = 64;

/// Submission queue entries: a turn that queues more submits early (one
/// extra `io_uring_enter`), which a burst can afford.
const SQ_ENTRIES: u32 = 4096;

/// The kernel's largest completion queue.
const MAX_CQ_ENTRIES: u32 = 65_536;

/// Completions a batching wait asks for before it may return early.
const BATCH: u32 = 128;

/// `IORING_ENTER_GETEVENTS`: wait for (and, with DEFER_TASKRUN, post)
/// completions.
const ENTER_GETEVENTS: u32 = 1;
/// `IORING_ENTER_EXT_ARG`: the argument is an `io_uring_getevents_arg`
/// (our timeout).
const ENTER_EXT_ARG: u32 = 8;

/// What `--io auto` needs from the kernel, checked once at start by
/// building a ring like the shards' and asking it: `Ok` or why not (e.g.
/// "io_uring_setup: Operation not permitted", a container's seccomp
/// profile).
pub fn probe() -> Result<(), String> {
    setup_allowed()?;
    let ring = Uring::new(64, 2, 0).map_err(|e| e.to_string())?;
    let mut probe = io_uring::Probe::new();
    ring.ring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    let needed = [
        ("ACCEPT", opcode::AcceptMulti::CODE),
        ("RECV", opcode::RecvMulti::CODE),
        ("SEND", opcode::Send::CODE),
        ("CLOSE", opcode::Close::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel2::CODE),
        ("MSG_RING", opcode::MsgRingData::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

/// Whether this process may make an io_uring at all. glommio, which runs
/// every shard (and the `--data-dir` log), is built on io_uring whatever
/// `--io` says: without it no loop can run. A seccomp profile that refuses
/// io_uring_setup (Docker's default since 25.0) or
/// `kernel.io_uring_disabled` says no here.
pub fn setup_allowed() -> Result<(), String> {
    io_uring::IoUring::new(2)
        .map(drop)
        .map_err(|e| format!("io_uring_setup: {e}"))
}

/// A completion, copied out of the ring so that handling it may submit.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The token the operation was submitted with.
    pub user_data: u64,
    /// Its result: bytes, a descriptor, or a negated errno.
    pub result: i32,
    /// `IORING_CQE_F_*`.
    pub flags: u32,
}

impl Completion {
    /// A multishot operation will post more completions.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer the bytes are in, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// The shard's provided-buffer ring: `active` buffers the kernel picks from
/// for multishot recvs, given back by the loop after it copied their bytes;
/// room for `count`, which [`BufRing::grow`] brings in as bursts need them
/// and [`BufRing::trim`] takes out again.
///
/// Every buffer id is in exactly one place: in the ring (the kernel may
/// write it), held by the loop (between a completion and
/// [`BufRing::give_back`]), or parked (in neither; its memory may be handed
/// back to the kernel). Ids below `active` are never parked. A shrink
/// cannot take buffers out of the ring (the kernel owns its head), so the
/// ids it drops are parked as they come back, and their pages are released
/// once the last of them has.
struct BufRing {
    /// Ring slots and buffers mapped, a power of two (`--ring-buffers`).
    count: u16,
    /// Buffers in use (a power of two, at most `count`): buffer ids
    /// `0..active`.
    active: u16,
    /// Per buffer id: parked, neither in the ring nor held.
    parked: Vec<bool>,
    /// Ids at or above `active` still in the ring or held: a shrink's
    /// leftovers, parked as they come back.
    leaving: u16,
    /// One past the highest id the kernel may have written since the pages
    /// above `active` were last released.
    touched: u16,
    /// Buffers given back since the last publish: the turn's reads.
    turn_reads: u16,
    /// The most reads one turn took since the last [`BufRing::trim`].
    peak_reads: u16,
    /// The ring of `io_uring_buf` entries (page-aligned, shared with the
    /// kernel); its tail is in the first entry.
    entries: *mut BufRingEntry,
    /// The buffers themselves, one allocation.
    memory: *mut u8,
    /// Our tail, published to the kernel by [`BufRing::publish`].
    tail: u16,
}

impl BufRing {
    fn entries_len(count: u16) -> usize {
        usize::from(count) * std::mem::size_of::<BufRingEntry>()
    }

    fn memory_len(count: u16) -> usize {
        usize::from(count) * RING_BUFFER_SIZE as usize
    }

    /// Maps both regions (the buffers only cost memory once written) and
    /// registers a ring of `count` slots (a power of two) as group
    /// [`BUF_GROUP`], holding the first [`INITIAL_BUFFERS`] buffers.
    fn new(ring: &IoUring, count: u16) -> io::Result<BufRing> {
        let entries = mmap(Self::entries_len(count))?.cast::<BufRingEntry>();
        let memory = match mmap(Self::memory_len(count)) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: mapped above with this length, not yet shared.
                unsafe { libc::munmap(entries.cast(), Self::entries_len(count)) };
                return Err(e);
            }
        };
        let mut bufs = BufRing {
            count,
            active: 0,
            parked: vec![true; usize::from(count)],
            leaving: 0,
            touched: 0,
            turn_reads: 0,
            peak_reads: 0,
            entries,
            memory,
            tail: 0,
        };
        bufs.grow_to(INITIAL_BUFFERS.min(count));
        bufs.publish();
        // SAFETY: the entries stay mapped until after the ring is gone
        // (Uring's Drop unregisters the group first).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, BUF_GROUP, 0)
        }
        .map_err(|e| io::Error::new(e.kind(), format!("IORING_REGISTER_PBUF_RING: {e}")))?;
        Ok(bufs)
    }

    /// The first `len` bytes of buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(RING_BUFFER_SIZE as usize);
        let bid = bid % self.count;
        // SAFETY: buffer `bid` lies inside `memory`; the kernel wrote `len`
        // bytes into it and will not touch it again until it is given back.
        unsafe {
            std::slice::from_raw_parts(
                self.memory
                    .add(usize::from(bid) * RING_BUFFER_SIZE as usize),
                len,
            )
        }
    }

    /// Takes buffer `bid` back from the loop: into the ring, or parked if
    /// a shrink dropped it.
    fn give_back(&mut self, bid: u16) {
        self.turn_reads = self.turn_reads.saturating_add(1);
        if bid < self.active {
            self.push(bid);
        } else {
            self.park(bid);
        }
    }

    /// Puts buffer `bid` at the tail (seen by the kernel once published).
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail % self.count);
        // SAFETY: `slot` is inside the entries mapping; the kernel only reads
        // entries between its head and the published tail, and this one is
        // past the tail.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(self.memory as u64 + u64::from(bid) * u64::from(RING_BUFFER_SIZE));
        entry.set_len(RING_BUFFER_SIZE);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Doubles the buffers in the ring, up to `count`; false when it is
    /// full already. Seen by the kernel once published.
    fn grow(&mut self) -> bool {
        if self.active == self.count {
            return false;
        }
        self.grow_to(self.active.saturating_mul(2).min(self.count));
        true
    }

    /// Brings buffers `active..to` into use: parked ones go into the ring;
    /// a shrink's leftovers still in the ring or held stay where they are
    /// (they are in use again, and come back to the ring as any other).
    fn grow_to(&mut self, to: u16) {
        for bid in self.active..to {
            let parked = &mut self.parked[usize::from(bid)];
            if *parked {
                *parked = false;
                self.push(bid);
            } else {
                self.leaving -= 1;
            }
        }
        self.active = to;
        self.touched = self.touched.max(to);
    }

    /// Takes buffers out of use when no turn since the last trim took more
    /// than a quarter of them: down to twice the busiest turn's reads (a
    /// power of two, at least [`INITIAL_BUFFERS`]). Returns the new
    /// `active`, or `None` when it stays.
    fn trim(&mut self) -> Option<u16> {
        let peak = std::mem::take(&mut self.peak_reads).max(self.turn_reads);
        let want = peak
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(self.count)
            .max(INITIAL_BUFFERS)
            .min(self.count);
        if u32::from(want) * 2 > u32::from(self.active) {
            return None;
        }
        // Ids `want..active` are in the ring or held (none below `active`
        // is parked): each is parked when it comes back.
        self.leaving += self.active - want;
        self.active = want;
        Some(want)
    }

    /// Parks buffer `bid` (at or above `active`); once the last of a
    /// shrink's leftovers is parked, their pages go back to the kernel.
    fn park(&mut self, bid: u16) {
        self.parked[usize::from(bid)] = true;
        self.leaving -= 1;
        if self.leaving == 0 && self.touched > self.active {
            let from = usize::from(self.active) * RING_BUFFER_SIZE as usize;
            let len = usize::from(self.touched - self.active) * RING_BUFFER_SIZE as usize;
            // SAFETY: every id at or above `active` is parked: neither the
            // kernel nor the loop holds any of these buffers. A private
            // anonymous mapping reads back as zeroes after MADV_DONTNEED,
            // so a later grow may use them again.
            unsafe { libc::madvise(self.memory.add(from).cast(), len, libc::MADV_DONTNEED) };
            self.touched = self.active;
        }
    }

    /// Makes the buffers given back visible to the kernel; the turn's reads
    /// count towards the next trim.
    fn publish(&mut self) {
        self.peak_reads = self.peak_reads.max(std::mem::take(&mut self.turn_reads));
        // SAFETY: the tail lives in the first entry of our mapping; a
        // release store orders the entries written before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast_mut();
            (*tail.cast::<std::sync::atomic::AtomicU16>())
                .store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `new` with these lengths; the ring's
        // owner unregistered the group before dropping us.
        unsafe {
            libc::munmap(self.entries.cast(), Self::entries_len(self.count));
            libc::munmap(self.memory.cast(), Self::memory_len(self.count));
        }
    }
}

fn mmap(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// A shard's ring and its buffers.
pub struct Uring {
    ring: IoUring,
    bufs: BufRing,
    /// Completions the kernel reported dropping, as last seen.
    dropped_seen: u32,
    /// `--ring-batch-usec` where the kernel can (6.12+), else 0.
    batch_usec: u32,
}

impl Uring {
    /// A ring whose completion queue holds `cq_entries` (rounded up to a
    /// power of two, at least twice the submission queue, at most 65,536),
    /// with `buffers` provided buffers (a power of two, at most 32,768),
    /// whose waits collect completions for `batch_usec` (see
    /// [`Uring::enter`]).
    pub fn new(cq_entries: u32, buffers: u16, batch_usec: u32) -> io::Result<Uring> {
        let sq = SQ_ENTRIES.min(cq_entries.max(64).next_power_of_two());
        let cq = cq_entries
            .max(sq * 2)
            .checked_next_power_of_two()
            .unwrap_or(MAX_CQ_ENTRIES)
            .min(MAX_CQ_ENTRIES);
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(sq)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::other("the kernel lacks IORING_FEAT_NODROP"));
        }
        let bufs = BufRing::new(&ring, buffers)?;
        let batch_usec = if ring.params().is_feature_min_timeout() {
            batch_usec
        } else {
            0
        };
        Ok(Uring {
            ring,
            bufs,
            dropped_seen: 0,
            batch_usec,
        })
    }

    /// The ring's descriptor: where peers post MSG_RING doorbells.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Queues `sqe` for the next enter; a full submission queue is
    /// submitted first.
    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every entry built in this module points only at memory
            // that outlives its operation: the buffer ring, a connection's
            // in-flight send buffer (kept until its completion, see
            // `net::Net::in_flight`), a log commit's buffer (kept until its
            // completions, see `ring_loop`), or nothing.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::warn!(error = %e, "io_uring submit failed");
                }
            }
        }
    }

    /// Arms a multishot accept on listener `fd`. Accepted sockets come
    /// non-blocking (a refusal answers them with plain `send`/`recv`).
    pub fn accept(&mut self, fd: RawFd, token: u64) {
        let sqe = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token);
        self.push(sqe);
    }

    /// Arms a multishot recv on connection `fd` into the buffer ring.
    pub fn recv_multi(&mut self, fd: RawFd, token: u64) {
        let sqe = opcode::RecvMulti::new(Fd(fd), BUF_GROUP)
            .build()
            .user_data(token);
        self.push(sqe);
    }

    /// One recv into the buffer ring: a socket still in its handshake,
    /// which may yet move to another shard with nothing armed on it.
    pub fn recv_once(&mut self, fd: RawFd, token: u64) {
        let sqe = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), RING_BUFFER_SIZE)
            .buf_group(BUF_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(token);
        self.push(sqe);
    }

    /// Sends `len` bytes at `data` on `fd`.
    ///
    /// # Safety
    ///
    /// The bytes must stay where they are, unchanged, until the send's
    /// completion arrives.
    pub unsafe fn send(&mut self, fd: RawFd, data: *const u8, len: usize, token: u64) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let sqe = opcode::Send::new(Fd(fd), data, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token);
        self.push(sqe);
    }

    /// Writes `len` bytes at `data` to file `fd` at `offset`; with
    /// `sync_token`, an fdatasync linked after it (it runs once the write
    /// has written everything, else it completes with ECANCELED).
    ///
    /// # Safety
    ///
    /// The bytes must stay where they are, unchanged, until the write's
    /// completion arrives.
    pub unsafe fn write_at(
        &mut self,
        fd: RawFd,
        (data, len, offset): (*const u8, u32, u64),
        token: u64,
        sync_token: Option<u64>,
    ) {
        let write = opcode::Write::new(Fd(fd), data, len)
            .offset(offset)
            .build()
            .user_data(token);
        match sync_token {
            None => self.push(write),
            Some(sync_token) => {
                // Both in one submission: a full queue between them would
                // submit the write unlinked.
                let free = {
                    let sq = self.ring.submission();
                    sq.capacity() - sq.len()
                };
                if free < 2 {
                    let _ = self.ring.submit();
                }
                self.push(write.flags(squeue::Flags::IO_LINK));
                let sync = opcode::Fsync::new(Fd(fd))
                    .flags(FsyncFlags::DATASYNC)
                    .build()
                    .user_data(sync_token);
                self.push(sync);
            }
        }
    }

    /// Cancels the first operation submitted with `token` (its completion
    /// then ends with ECANCELED, or it already ended).
    pub fn cancel(&mut self, token: u64, ignored: u64) {
        let sqe = opcode::AsyncCancel2::new(CancelBuilder::user_data(token))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(ignored);
        self.push(sqe);
    }

    /// Cancels the operation submitted with `token`, hard-linked to the
    /// next entry (a [`Uring::close`]): that one runs whether or not there
    /// was anything left to cancel.
    pub fn cancel_linked(&mut self, token: u64, ignored: u64) {
        let sqe = opcode::AsyncCancel2::new(CancelBuilder::user_data(token))
            .build()
            .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
            .user_data(ignored);
        self.push(sqe);
    }

    /// Closes `fd` (after the cancels queued just before it, see
    /// [`Uring::cancel_linked`]). The descriptor must not be used after this.
    pub fn close(&mut self, fd: RawFd, ignored: u64) {
        let close = opcode::Close::new(Fd(fd))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(ignored);
        self.push(close);
    }

    /// Posts a completion carrying `token` into the ring `ring_fd` (a peer
    /// shard's doorbell).
    pub fn msg_ring(&mut self, ring_fd: RawFd, token: u64, ignored: u64) {
        let sqe = opcode::MsgRingData::new(Fd(ring_fd), 0, token, None)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(ignored);
        self.push(sqe);
    }

    /// The bytes of a recv completion that used buffer `bid`.
    pub fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        self.bufs.bytes(bid, len)
    }

    /// Gives buffer `bid` back to the ring (visible to the kernel at the next
    /// [`Uring::enter`]).
    pub fn give_back(&mut self, bid: u16) {
        self.bufs.give_back(bid);
    }

    /// A read found the buffer ring empty: doubles the buffers in it (up to
    /// `--ring-buffers`) before the read is re-armed. Returns the buffers
    /// now in the ring, or `None` when it was full already.
    pub fn ran_dry(&mut self) -> Option<u16> {
        self.bufs.grow().then_some(self.bufs.active)
    }

    /// Shrinks the buffer ring when no turn since the last call took more
    /// than a quarter of its buffers, to twice the busiest turn's reads
    /// (at least [`INITIAL_BUFFERS`]); the pages of the buffers it drops
    /// go back to the kernel once the last of them has come back from the
    /// ring. The shard calls it every few seconds. Returns the buffers now
    /// in use, or `None` when unchanged.
    pub fn trim(&mut self) -> Option<u16> {
        self.bufs.trim()
    }

    /// Buffers in use now (in the ring or held by the loop).
    pub fn buffers(&self) -> u16 {
        self.bufs.active
    }

    /// The turn's one system call: publishes the buffers given back,
    /// submits what was queued and, when `wait`, waits up to `timeout` for
    /// a completion. Then moves every completion into `out`; returns how
    /// many completions the kernel reported dropping since the last call.
    ///
    /// With a batch time, the wait asks for [`BATCH`] completions and the
    /// kernel returns early with fewer only once `batch_usec` has passed
    /// (or at `timeout`): under a steady trickle the shard wakes once per
    /// batch time rather than once per completion, for a reply delayed by
    /// at most that long. A wait that found nothing within the batch time
    /// wakes for the first completion, as without one.
    pub fn enter(
        &mut self,
        wait: bool,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> io::Result<u32> {
        self.bufs.publish();
        let ts = Timespec::from(timeout);
        let batching = wait && self.batch_usec > 0;
        let args = if batching {
            SubmitArgs::new()
                .timespec(&ts)
                .min_wait_usec(self.batch_usec)
        } else {
            SubmitArgs::new().timespec(&ts)
        };
        let want = match (wait, batching) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => BATCH,
        };
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: `args` is a valid io_uring_getevents_arg (SubmitArgs is
        // transparent over it) that outlives the call, as does `ts`.
        let entered = unsafe {
            self.ring.submitter().enter(
                to_submit,
                want,
                ENTER_GETEVENTS | ENTER_EXT_ARG,
                Some(&args),
            )
        };
        match entered {
            Ok(_) => {}
            // Timed out, interrupted, or completions waiting to be read
            // first (EBUSY): read them; the rest goes next turn.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        let mut cq = self.ring.completion();
        out.extend(cq.by_ref().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
        let dropped = cq.overflow();
        drop(cq);
        let newly_dropped = dropped.wrapping_sub(self.dropped_seen);
        if newly_dropped != 0 {
            tracing::error!(
                dropped = newly_dropped,
                "io_uring completion queue overflowed and the kernel dropped completions"
            );
            self.dropped_seen = dropped;
        }
        Ok(newly_dropped)
    }

    /// Submits what is queued (closes at shutdown) without waiting.
    pub fn flush(&mut self) {
        self.bufs.publish();
        let _ = self.ring.submit();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Before the buffer memory goes: the kernel must not pick from it.
        let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn wait_for(ring: &mut Uring, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        for _ in 0..50 {
            ring.enter(true, Duration::from_millis(100), &mut out)
                .unwrap();
            if out.len() >= n {
                break;
            }
        }
        out
    }

    /// The operations the loop relies on, end to end on this kernel: a
    /// multishot accept, a multishot recv into the buffer ring (bytes
    /// intact, buffer given back), a send, and a close hard-linked after
    /// the cancel of the armed recv, so that the peer sees EOF (closing
    /// alone would not).
    #[test]
    fn accept_recv_send_and_close_with_cancel_reach_the_peer() {
        if let Err(why) = probe() {
            panic!("io_uring unavailable here: {why}");
        }
        let mut ring = Uring::new(256, 16, 0).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        ring.accept(listener.as_raw_fd(), 1);
        let mut client = TcpStream::connect(addr).unwrap();
        let accepted = wait_for(&mut ring, 1);
        assert_eq!(accepted[0].user_data, 1);
        assert!(accepted[0].more(), "multishot accept stays armed");
        let fd = accepted[0].result;
        assert!(fd >= 0, "accept: {}", accepted[0].result);

        ring.recv_multi(fd, 2);
        client.write_all(b"hello").unwrap();
        let got = wait_for(&mut ring, 1);
        assert_eq!((got[0].user_data, got[0].result), (2, 5));
        assert!(got[0].more(), "multishot recv stays armed");
        let bid = got[0].buffer().expect("a provided buffer");
        assert_eq!(ring.bytes(bid, 5), b"hello");
        ring.give_back(bid);

        let reply = b"world".to_vec();
        // SAFETY: `reply` outlives the wait for the send's completion.
        unsafe { ring.send(fd, reply.as_ptr(), reply.len(), 3) };
        let sent = wait_for(&mut ring, 1);
        assert_eq!((sent[0].user_data, sent[0].result), (3, 5));
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");

        ring.cancel_linked(2, 9);
        ring.close(fd, 9);
        let ended = wait_for(&mut ring, 1);
        let recv_end = ended.iter().find(|c| c.user_data == 2).expect("recv ended");
        assert_eq!(recv_end.result, -libc::ECANCELED);
        assert!(!recv_end.more());
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the peer sees EOF");
    }

    /// The buffer ring starts with [`INITIAL_BUFFERS`] of its
    /// `--ring-buffers`: reads use only those until a read finds them all
    /// taken (ENOBUFS, the multishot ends, the bytes stay in the socket);
    /// then it doubles, and the re-armed recv gets the waiting bytes in a
    /// buffer never used before.
    #[test]
    fn the_buffer_ring_grows_only_when_a_read_finds_it_empty() {
        let mut ring = Uring::new(256, 1024, 0).unwrap();
        assert_eq!(ring.buffers(), INITIAL_BUFFERS);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        ring.recv_multi(server.as_raw_fd(), 2);
        let mut used = Vec::new();
        // Each read keeps its buffer (never given back) until none is left.
        let ended = loop {
            client.write_all(b"x").unwrap();
            let got = wait_for(&mut ring, 1);
            let c = got[0];
            if !c.more() {
                break c;
            }
            used.push(c.buffer().expect("a provided buffer"));
            assert!(used.len() <= usize::from(INITIAL_BUFFERS));
        };
        assert_eq!(ended.result, -libc::ENOBUFS);
        assert_eq!(used.len(), usize::from(INITIAL_BUFFERS));
        assert!(used.iter().all(|&bid| bid < INITIAL_BUFFERS));

        assert_eq!(ring.ran_dry(), Some(INITIAL_BUFFERS * 2));
        ring.recv_multi(server.as_raw_fd(), 2);
        let got = wait_for(&mut ring, 1);
        assert_eq!(got[0].result, 1, "the byte that waited in the socket");
        assert_eq!(got[0].buffer(), Some(INITIAL_BUFFERS));
        assert_eq!(ring.bytes(INITIAL_BUFFERS, 1), b"x");

        // Up to --ring-buffers, no further.
        while ring.buffers() < 1024 {
            ring.ran_dry().unwrap();
        }
        assert_eq!(ring.ran_dry(), None);
    }

    /// Which of `pages` pages from `addr` are resident.
    fn resident(addr: *mut u8, pages: usize) -> Vec<bool> {
        let mut vec = vec![0u8; pages];
        // SAFETY: `addr` is the page-aligned start of a mapping at least
        // `pages` pages long; `vec` has one byte per page.
        let r = unsafe { libc::mincore(addr.cast(), pages * 4096, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    /// Once bursts stop, the ring shrinks to what the busiest turn since
    /// the last trim needed (at least [`INITIAL_BUFFERS`]): the buffers it
    /// drops leave as they come back, held ones included, none is handed
    /// out twice, and their pages go back to the kernel. A later burst
    /// brings them back into use.
    #[test]
    fn the_buffer_ring_shrinks_when_bursts_stop_and_releases_what_it_dropped() {
        let mut ring = Uring::new(256, 1024, 0).unwrap();
        ring.ran_dry().unwrap();
        ring.ran_dry().unwrap();
        assert_eq!(ring.buffers(), 256);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        ring.recv_multi(server.as_raw_fd(), 2);
        // One read per turn; each buffer is given back at once but for one
        // above the first 64, held across the shrink.
        let mut held = None;
        let mut read_one = |ring: &mut Uring, held: Option<u16>| -> u16 {
            client.write_all(b"x").unwrap();
            let got = wait_for(ring, 1);
            assert_eq!(got.len(), 1);
            assert!(got[0].more(), "{:?}", got[0]);
            let bid = got[0].buffer().expect("a provided buffer");
            assert_ne!(Some(bid), held, "a held buffer handed out again");
            assert_eq!(ring.bytes(bid, 1), b"x");
            bid
        };
        for _ in 0..100 {
            let bid = read_one(&mut ring, held);
            if bid == 70 {
                held = Some(bid);
            } else {
                ring.give_back(bid);
            }
        }
        assert_eq!(held, Some(70));
        let pages = resident(ring.bufs.memory, 256);
        assert!(
            pages[..100].iter().all(|&p| p),
            "the buffers read are resident"
        );

        // No turn took more than one buffer: down to the floor, once.
        assert_eq!(ring.trim(), Some(INITIAL_BUFFERS));
        assert_eq!(ring.buffers(), INITIAL_BUFFERS);
        assert_eq!(ring.trim(), None);

        // The ring still holds ids above 64 from before; they are read
        // once more each, then parked. Nothing is released while the held
        // one is out.
        let mut above = 0;
        for _ in 0..400 {
            let bid = read_one(&mut ring, held);
            above += usize::from(bid >= INITIAL_BUFFERS);
            ring.give_back(bid);
        }
        assert_eq!(above, 256 - 64 - 1, "each leftover read once more");
        assert!(resident(ring.bufs.memory, 256)[..100].iter().all(|&p| p));
        ring.give_back(held.take().unwrap());
        let pages = resident(ring.bufs.memory, 256);
        assert!(pages[..64].iter().all(|&p| p));
        assert!(
            pages[64..].iter().all(|&p| !p),
            "the dropped buffers' pages were released"
        );
        for _ in 0..200 {
            let bid = read_one(&mut ring, None);
            assert!(bid < INITIAL_BUFFERS, "{bid} was dropped");
            ring.give_back(bid);
        }

        // A burst brings the parked buffers back.
        assert_eq!(ring.ran_dry(), Some(128));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let bid = read_one(&mut ring, None);
            assert!(bid < 128);
            seen.insert(bid);
            ring.give_back(bid);
        }
        assert_eq!(seen.len(), 128, "every buffer in use is read again");
    }

    /// MSG_RING posts a completion with the sender's token into another
    /// ring: the doorbell between shards.
    #[test]
    fn msg_ring_posts_a_completion_into_the_target_ring() {
        let mut a = Uring::new(64, 2, 0).unwrap();
        let mut b = Uring::new(64, 2, 0).unwrap();
        a.msg_ring(b.fd(), 77, 0);
        let mut out = Vec::new();
        a.enter(false, Duration::ZERO, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "a successful MSG_RING posts nothing to the sender"
        );
        let got = wait_for(&mut b, 1);
        assert_eq!(got[0].user_data, 77);
    }
}

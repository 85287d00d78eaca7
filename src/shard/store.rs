//! `--data-dir`: the files behind durability. The broker decides what is
//! kept and emits it as records ([`crate::proto::persist`]); this module
//! owns the files.
//!
//! ```text
//! DIR/lock            flock'ed by the running coremq (holds its pid)
//! DIR/meta            "coremq-data <format>" and "shards <n>"
//! DIR/shard-N/log     shard N's log: a snapshot, then what came after it
//! ```
//!
//! **Start** ([`open`], on the main thread before the shards run): lock the
//! directory (a second coremq is refused), read `meta` (a newer format is
//! refused), then read every shard's log in parallel, each scan stopping
//! at a torn or corrupt tail, which is cut off, logged and counted. If the
//! shard count changed, the state is re-homed: every session and retained
//! topic is written to the log of the shard that owns it now, in
//! `DIR/rehome/`, which then replaces the old logs (`meta` says
//! `rehome pending` between the two steps, so a crash there is finished at
//! the next start).
//!
//! **Running** ([`ShardLog`], one per shard, opened through glommio's
//! io_uring file API: `DmaFile`, O_DIRECT; glommio's buffered file where
//! the filesystem has no O_DIRECT): a commit appends the records gathered
//! since the last one in one write that starts on a fresh 4 KiB block and
//! is padded with zeros ([`persist::padded_len`]), then one `fdatasync`
//! (`--fsync always|batch`) before the broker is told they are durable.
//! The epoll loop commits through glommio ([`ShardLog::commit`]) and waits;
//! the io_uring loop builds a [`RingCommit`] and carries its write, linked
//! to the fdatasync, on its own ring while it goes on serving sockets, and
//! keeps zeros written ahead of the log's end ([`ShardLog::fill_due`]) so
//! that a commit overwrites blocks the file has. A synced block is never
//! written again, so a torn write can only damage the commit it belonged
//! to — which was not acknowledged. The padding costs disk space (up to
//! 4 KiB a commit); snapshots give it back. No shard waits on another's
//! disk.
//!
//! **Snapshots**: once a log has grown by `--snapshot-mib` since the last
//! snapshot (and by at least that snapshot's size), the shard writes its
//! whole state to `log.new`, syncs it, and renames it over `log`: disk use
//! follows the live state (at most about twice it, plus `--snapshot-mib`),
//! and a start replays one snapshot plus the records after it. Records
//! are idempotent (a `Session` record replaces, a `Done` removes), so
//! records of the current turn that also reached the snapshot replay
//! harmlessly after it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use glommio::io::{BufferedFile, DmaFile, OpenOptions as GlommioOpen};

use crate::config::FsyncMode;
use crate::metrics::Counters;
use crate::proto::persist::{self, Recovered};

/// Alignment of every write: a multiple of any device's logical block, as
/// O_DIRECT wants; every commit starts on one.
const ALIGN: u64 = persist::BLOCK as u64;

/// Largest single write of a snapshot.
const WRITE_CHUNK: usize = 1 << 20;

/// Zeros written ahead of the log's end at once ([`ShardLog::fill_due`]).
const FILL_CHUNK: usize = 1 << 20;

/// How far ahead of the log's end zeros are kept written.
const FILL_AHEAD: u64 = 4 << 20;

/// The locked data directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What one shard starts from.
#[derive(Debug, Default)]
pub struct ShardStart {
    /// Its state, replayed (and re-homed).
    pub recovered: Recovered,
    /// Where its log's last good record ends (appends go at the next
    /// block).
    pub log_len: u64,
}

/// The path of shard `n`'s directory.
pub fn shard_dir(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("shard-{n}"))
}

fn err(dir: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("--data-dir {}: {what}", dir.display()))
}

/// What `meta` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    format: u32,
    shards: usize,
    rehome_pending: bool,
}

fn read_meta(dir: &Path) -> io::Result<Option<Meta>> {
    let path = dir.join("meta");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(dir, format_args!("reading meta: {e}"))),
    };
    let mut format = None;
    let mut shards = None;
    let mut rehome_pending = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("coremq-data"), Some(v)) => format = v.parse::<u32>().ok(),
            (Some("shards"), Some(v)) => shards = v.parse::<usize>().ok().filter(|&n| n > 0),
            (Some("rehome"), Some("pending")) => rehome_pending = true,
            _ => {}
        }
    }
    let (Some(format), Some(shards)) = (format, shards) else {
        return Err(err(
            dir,
            "meta is not a coremq data directory's (expected \"coremq-data N\" and \"shards N\")",
        ));
    };
    if format > persist::FORMAT_VERSION {
        return Err(err(
            dir,
            format_args!(
                "written by a newer coremq (data format {format}; this build reads format {})",
                persist::FORMAT_VERSION
            ),
        ));
    }
    Ok(Some(Meta {
        format,
        shards,
        rehome_pending,
    }))
}

/// Replaces `meta` atomically (write, sync, rename, sync the directory).
fn write_meta(dir: &Path, meta: Meta) -> io::Result<()> {
    let tmp = dir.join("meta.tmp");
    let mut text = format!("coremq-data {}\nshards {}\n", meta.format, meta.shards);
    if meta.rehome_pending {
        text.push_str("rehome pending\n");
    }
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("meta"))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes the directory's lock, or says who holds it.
fn lock(dir: &Path) -> io::Result<File> {
    let path = dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| err(dir, format_args!("opening {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            return Err(err(
                dir,
                format_args!(
                    "in use by another coremq{who}; one data directory serves one process"
                ),
            ));
        }
        return Err(err(dir, format_args!("locking {}: {e}", path.display())));
    }
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

/// One shard log as read at start.
struct Loaded {
    recovered: Recovered,
    good_len: u64,
}

/// Reads and replays shard `n`'s log; cuts a torn tail off the file.
fn load_shard(dir: &Path, n: usize, counters: &Counters) -> io::Result<Loaded> {
    let sdir = shard_dir(dir, n);
    // A snapshot that never replaced the log: the log is still whole.
    let _ = fs::remove_file(sdir.join("log.new"));
    let path = sdir.join("log");
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Loaded {
                recovered: Recovered::default(),
                good_len: 0,
            })
        }
        Err(e) => return Err(err(dir, format_args!("reading {}: {e}", path.display()))),
    };
    let mut recovered = Recovered::default();
    let scan = persist::scan_each(&data, |r| recovered.apply(r));
    if let Some(why) = &scan.tail {
        tracing::warn!(
            "{}: {why} at byte {}: dropped {} bytes after the last good record ({} records kept)",
            path.display(),
            scan.good_len,
            scan.dropped_bytes,
            scan.kept
        );
        counters.log_tails_dropped.fetch_add(1, Ordering::Relaxed);
        let f = OpenOptions::new().write(true).open(&path)?;
        f.set_len(scan.good_len as u64)?;
        f.sync_all()?;
    }
    Ok(Loaded {
        recovered,
        good_len: scan.good_len as u64,
    })
}

/// Writes `state` as shard `n`'s whole log under `root` (synced).
fn write_log(root: &Path, n: usize, state: &Recovered) -> io::Result<u64> {
    let sdir = shard_dir(root, n);
    fs::create_dir_all(&sdir)?;
    let mut out = BytesMut::new();
    state.encode(&mut out);
    let mut f = File::create(sdir.join("log"))?;
    f.write_all(&out)?;
    f.sync_all()?;
    sync_dir(&sdir)?;
    Ok(out.len() as u64)
}

/// Moves a finished re-home into place: `DIR/rehome/shard-N` replaces
/// `DIR/shard-N`, and shards beyond the new count go. Safe to repeat.
fn finish_rehome(dir: &Path, shards: usize) -> io::Result<()> {
    let staged = dir.join("rehome");
    for n in 0..shards {
        let from = shard_dir(&staged, n);
        if from.exists() {
            let to = shard_dir(dir, n);
            if to.exists() {
                fs::remove_dir_all(&to)?;
            }
            fs::rename(&from, &to)?;
        }
    }
    // Shard directories the new count has no use for.
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("shard-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if n >= shards {
            fs::remove_dir_all(shard_dir(dir, n))?;
        }
    }
    if staged.exists() {
        fs::remove_dir_all(&staged)?;
    }
    sync_dir(dir)
}

/// Opens `dir` for `shards` shards: lock, format check, replay, re-home.
pub fn open(
    dir: &Path,
    shards: usize,
    counters: &Arc<Counters>,
) -> io::Result<(DataDir, Vec<ShardStart>)> {
    let started = Instant::now();
    fs::create_dir_all(dir).map_err(|e| err(dir, format_args!("creating it: {e}")))?;
    let lock = lock(dir)?;
    let meta = match read_meta(dir)? {
        Some(m) => m,
        None => {
            let fresh = Meta {
                format: persist::FORMAT_VERSION,
                shards,
                rehome_pending: false,
            };
            write_meta(dir, fresh).map_err(|e| err(dir, format_args!("writing meta: {e}")))?;
            fresh
        }
    };
    let wrap = |what: &str, e: io::Error| err(dir, format_args!("{what}: {e}"));
    if meta.rehome_pending {
        finish_rehome(dir, meta.shards).map_err(|e| wrap("finishing a re-home", e))?;
        write_meta(
            dir,
            Meta {
                rehome_pending: false,
                ..meta
            },
        )
        .map_err(|e| wrap("writing meta", e))?;
    } else if dir.join("rehome").exists() {
        // A re-home that never finished writing: the old logs stand.
        fs::remove_dir_all(dir.join("rehome")).map_err(|e| wrap("removing rehome/", e))?;
    }
    let loaded: Vec<io::Result<Loaded>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..meta.shards)
            .map(|n| s.spawn(move || load_shard(dir, n, counters)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a loader thread panicked")))
            })
            .collect()
    });
    let loaded = loaded.into_iter().collect::<io::Result<Vec<Loaded>>>()?;
    let starts: Vec<ShardStart> = if meta.shards == shards {
        loaded
            .into_iter()
            .map(|l| ShardStart {
                recovered: l.recovered,
                log_len: l.good_len,
            })
            .collect()
    } else {
        let mut all = Recovered::default();
        for l in loaded {
            all.merge(l.recovered);
        }
        let parts = all.split(shards as u16);
        let staged = dir.join("rehome");
        let mut lens = Vec::with_capacity(shards);
        for (n, part) in parts.iter().enumerate() {
            lens.push(write_log(&staged, n, part).map_err(|e| wrap("writing rehome/", e))?);
        }
        sync_dir(&staged).map_err(|e| wrap("syncing rehome/", e))?;
        let pending = Meta {
            format: persist::FORMAT_VERSION,
            shards,
            rehome_pending: true,
        };
        write_meta(dir, pending).map_err(|e| wrap("writing meta", e))?;
        finish_rehome(dir, shards).map_err(|e| wrap("finishing a re-home", e))?;
        write_meta(
            dir,
            Meta {
                rehome_pending: false,
                ..pending
            },
        )
        .map_err(|e| wrap("writing meta", e))?;
        tracing::info!(
            from = meta.shards,
            to = shards,
            "--data-dir {}: sessions and retained messages re-homed to the new shard count",
            dir.display()
        );
        parts
            .into_iter()
            .zip(lens)
            .map(|(recovered, log_len)| ShardStart { recovered, log_len })
            .collect()
    };
    let sessions: usize = starts.iter().map(|s| s.recovered.sessions.len()).sum();
    let messages: usize = starts
        .iter()
        .flat_map(|s| s.recovered.sessions.values())
        .map(|s| s.messages.len())
        .sum();
    let retained: usize = starts.iter().map(|s| s.recovered.retained.len()).sum();
    tracing::info!(
        sessions,
        messages,
        retained,
        ms = started.elapsed().as_millis() as u64,
        "--data-dir {}: state loaded",
        dir.display()
    );
    Ok((
        DataDir {
            path: dir.to_path_buf(),
            _lock: lock,
        },
        starts,
    ))
}

/// A shard's open log file: O_DIRECT where the filesystem allows it.
enum LogFile {
    Dma(DmaFile),
    Buffered(BufferedFile),
}

impl LogFile {
    async fn open(path: &Path, truncate: bool) -> io::Result<LogFile> {
        // Readable too: glommio probes a DMA file for polled I/O with a read.
        let dma = GlommioOpen::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .dma_open(path)
            .await;
        match dma {
            Ok(f) => Ok(LogFile::Dma(f)),
            Err(_) => GlommioOpen::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(truncate)
                .buffered_open(path)
                .await
                .map(LogFile::Buffered)
                .map_err(io::Error::from),
        }
    }

    /// Writes all of `data` at `pos` (both aligned for O_DIRECT).
    async fn write_all_at(&self, data: &[u8], pos: u64) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(WRITE_CHUNK);
            let chunk = &data[done..done + n];
            let wrote = match self {
                LogFile::Dma(f) => {
                    let mut buf = f.alloc_dma_buffer(n);
                    buf.as_bytes_mut().copy_from_slice(chunk);
                    f.write_at(buf, pos + done as u64).await?
                }
                LogFile::Buffered(f) => f.write_at(chunk.to_vec(), pos + done as u64).await?,
            };
            // O_DIRECT writes whole blocks: a short write is retried from
            // the block it stopped in.
            let progress = match self {
                LogFile::Dma(_) if done + wrote < data.len() => wrote - wrote % ALIGN as usize,
                _ => wrote,
            };
            if progress == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "a log write made no progress",
                ));
            }
            done += progress;
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            LogFile::Dma(f) => f.as_raw_fd(),
            LogFile::Buffered(f) => f.as_raw_fd(),
        }
    }

    async fn sync(&self) -> io::Result<()> {
        match self {
            LogFile::Dma(f) => f.fdatasync().await.map_err(io::Error::from),
            LogFile::Buffered(f) => f.fdatasync().await.map_err(io::Error::from),
        }
    }

    async fn close(self) {
        let _ = match self {
            LogFile::Dma(f) => f.close().await,
            LogFile::Buffered(f) => f.close().await,
        };
    }
}

/// One commit in flight on the shard's io_uring: a write of the padded
/// records at the log's end, linked to an fdatasync (unless `--fsync
/// never`). The buffer stays here, unmoved, until the operations on it
/// complete.
pub struct RingCommit {
    buf: AlignedBuf,
    /// Bytes of records in `buf` (the rest is padding).
    records: usize,
    fd: RawFd,
    /// O_DIRECT: a short write is continued from the block it stopped in.
    direct: bool,
    offset: u64,
    written: usize,
    sync: bool,
    synced: bool,
    /// fdatasync completions still to come from attempts cut short (their
    /// write was short, so they are cancelled, and say nothing about the
    /// rest).
    stale_syncs: u32,
    /// What to tell the broker ([`crate::proto::broker::Broker::committed`]).
    pub generation: u64,
}

/// The next operation a [`RingCommit`] needs submitted.
pub struct RingWrite {
    /// The log file.
    pub fd: RawFd,
    /// The bytes to write (the commit's memory).
    pub data: *const u8,
    /// How many.
    pub len: u32,
    /// Where in the file.
    pub offset: u64,
    /// Link an fdatasync after the write.
    pub sync: bool,
}

impl RingCommit {
    /// The write still to do (all of it at first, the rest after a short
    /// write). Its memory is the commit's: keep the commit until the write
    /// completes.
    pub fn next_write(&self) -> RingWrite {
        let rest = &self.buf.as_slice()[self.written..];
        RingWrite {
            fd: self.fd,
            data: rest.as_ptr(),
            len: u32::try_from(rest.len()).unwrap_or(u32::MAX - (ALIGN as u32 - 1)),
            offset: self.offset + self.written as u64,
            sync: self.sync,
        }
    }

    /// The write completed with `result`: `Ok(true)` once every byte is
    /// written, `Ok(false)` when the rest must be written again (the
    /// linked fdatasync then comes back cancelled).
    pub fn wrote(&mut self, result: i32) -> io::Result<bool> {
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        let wrote = result as usize;
        let left = self.buf.len() - self.written;
        let progress = if self.direct && wrote < left {
            wrote - wrote % ALIGN as usize
        } else {
            wrote.min(left)
        };
        if progress == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "a log write made no progress",
            ));
        }
        self.written += progress;
        let done = self.written == self.buf.len();
        if !done && self.sync {
            self.stale_syncs += 1;
        }
        Ok(done)
    }

    /// The linked fdatasync completed with `result`. One of an attempt cut
    /// short is ignored: the rest is written again with its own.
    pub fn synced(&mut self, result: i32) -> io::Result<()> {
        if self.stale_syncs > 0 {
            self.stale_syncs -= 1;
            return Ok(());
        }
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        self.synced = true;
        Ok(())
    }

    /// Written and (unless `--fsync never`) synced.
    pub fn is_durable(&self) -> bool {
        self.written == self.buf.len() && (self.synced || !self.sync)
    }
}

/// Zeroed heap memory aligned to [`ALIGN`], as O_DIRECT wants of the
/// buffer it writes from.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), ALIGN as usize).expect("a valid layout")
    }

    fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// One shard's log, appended to by its loop.
pub struct ShardLog {
    dir: PathBuf,
    file: Option<LogFile>,
    /// Where the next commit goes (a block boundary: a synced block is
    /// never written again).
    len: u64,
    fsync: FsyncMode,
    /// Bytes appended since the last snapshot.
    grown: u64,
    snapshot_after: u64,
    /// Size of the last snapshot (or of the log loaded at start).
    last_snapshot: u64,
    /// The file holds written bytes (records, or zeros written ahead) up
    /// to here.
    filled: u64,
    /// A write of zeros ahead in flight on the ring: where, how long.
    filling: Option<(u64, u64)>,
    /// [`FILL_CHUNK`] zeros to write ahead from (made at the first fill).
    zeros: Option<AlignedBuf>,
    counters: Arc<Counters>,
}

impl ShardLog {
    /// Opens shard `n`'s log under `dir` for appending after `log_len`
    /// bytes of good records.
    pub async fn open(
        dir: &Path,
        n: usize,
        log_len: u64,
        fsync: FsyncMode,
        snapshot_mib: u32,
        counters: Arc<Counters>,
    ) -> io::Result<ShardLog> {
        let sdir = shard_dir(dir, n);
        fs::create_dir_all(&sdir)?;
        let path = sdir.join("log");
        let file = LogFile::open(&path, false).await?;
        // Zeros a previous run wrote ahead count as filled.
        let size = fs::metadata(&path)?.len();
        Ok(ShardLog {
            dir: sdir,
            file: Some(file),
            len: persist::padded_len(log_len as usize) as u64,
            fsync,
            grown: 0,
            snapshot_after: u64::from(snapshot_mib) << 20,
            last_snapshot: log_len,
            filled: size - size % ALIGN,
            filling: None,
            zeros: None,
            counters,
        })
    }

    /// Appends `records` in one write at the next block, padded with zeros
    /// to a block boundary after them ([`persist::padded_len`]), then (unless `--fsync never`) one
    /// fdatasync. Returns once they are durable.
    pub async fn commit(&mut self, records: &[u8]) -> io::Result<()> {
        debug_assert!(!self.is_filling(), "a commit over a fill in flight");
        let padded = persist::padded_len(records.len()) as u64;
        let mut buf = Vec::with_capacity(padded as usize);
        buf.extend_from_slice(records);
        buf.resize(padded as usize, 0);
        let file = self.file.as_ref().expect("open between calls");
        file.write_all_at(&buf, self.len).await?;
        if self.fsync != FsyncMode::Never {
            file.sync().await?;
        }
        self.appended(padded, records.len());
        Ok(())
    }

    /// A commit of `records` bytes, `padded` on disk, is durable at the
    /// log's end: the next one goes after it.
    fn appended(&mut self, padded: u64, records: usize) {
        self.len += padded;
        self.grown += padded;
        self.filled = self.filled.max(self.len);
        let c = &self.counters;
        c.log_commits.fetch_add(1, Ordering::Relaxed);
        c.log_bytes.fetch_add(records as u64, Ordering::Relaxed);
    }

    /// The ring's write of zeros ahead of the log's end, when the filled
    /// part ends less than [`FILL_AHEAD`] past it and none is in flight.
    /// Call only with no commit in flight (a fill must never overlap one);
    /// report its completion to [`ShardLog::filled`].
    ///
    /// Why: a commit that extends the file is, for ext4, a metadata change
    /// (the size, new blocks), so io_uring hands the O_DIRECT write to a
    /// worker thread and every fdatasync commits the journal; over zeros
    /// already written, the write goes straight to the device from the
    /// shard's thread and the fdatasync is a cache flush. Measured here:
    /// the workers' CPU fell from ~1.8 s to ~0.4 s per 100,000 messages.
    pub fn fill_due(&mut self) -> Option<RingWrite> {
        if self.filling.is_some() || self.filled >= self.len + FILL_AHEAD {
            return None;
        }
        let fd = self.file.as_ref()?.raw_fd();
        let zeros = self
            .zeros
            .get_or_insert_with(|| AlignedBuf::zeroed(FILL_CHUNK));
        let at = self.filled.max(self.len);
        self.filling = Some((at, FILL_CHUNK as u64));
        Some(RingWrite {
            fd,
            data: zeros.as_slice().as_ptr(),
            len: FILL_CHUNK as u32,
            offset: at,
            sync: false,
        })
    }

    /// The fill in flight completed with `result`.
    pub fn filled(&mut self, result: i32) -> io::Result<()> {
        let Some((at, _)) = self.filling.take() else {
            return Ok(());
        };
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        let wrote = result as u64;
        self.filled = self.filled.max(at + wrote - wrote % ALIGN);
        Ok(())
    }

    /// True while a fill is in flight (a snapshot, or a commit through
    /// [`ShardLog::commit`], waits for it).
    pub fn is_filling(&self) -> bool {
        self.filling.is_some()
    }

    /// True when a commit of `records` bytes would not overlap the fill in
    /// flight.
    pub fn can_commit(&self, records: usize) -> bool {
        match self.filling {
            Some((at, _)) => self.len + persist::padded_len(records) as u64 <= at,
            None => true,
        }
    }

    /// `records` as a commit for the shard's own io_uring to carry (the
    /// `--io uring` loop, which goes on reading sockets while it is in
    /// flight): the same bytes, padding and place as [`ShardLog::commit`].
    /// Hand it back to [`ShardLog::ring_committed`] once it is durable.
    pub fn ring_commit(&self, records: &[u8], generation: u64) -> RingCommit {
        let file = self.file.as_ref().expect("open between calls");
        let mut buf = AlignedBuf::zeroed(persist::padded_len(records.len()));
        buf.as_mut_slice()[..records.len()].copy_from_slice(records);
        RingCommit {
            buf,
            records: records.len(),
            fd: file.raw_fd(),
            direct: matches!(file, LogFile::Dma(_)),
            offset: self.len,
            written: 0,
            sync: self.fsync != FsyncMode::Never,
            synced: false,
            stale_syncs: 0,
            generation,
        }
    }

    /// A [`RingCommit`] from this log is durable: the next commit goes
    /// after it.
    pub fn ring_committed(&mut self, commit: &RingCommit) {
        debug_assert!(commit.is_durable() && commit.offset == self.len);
        self.appended(commit.buf.len() as u64, commit.records);
    }

    /// True once the log has grown by `--snapshot-mib` since the last
    /// snapshot, and by at least that snapshot's size: the log is then at
    /// most about twice the live state plus `--snapshot-mib`, and a large
    /// state is not rewritten for every few MiB of traffic.
    pub fn wants_snapshot(&self) -> bool {
        self.grown >= self.snapshot_after.max(self.last_snapshot)
    }

    /// Replaces the log with `state` (the shard's whole state as records):
    /// written to `log.new`, synced, renamed over `log`.
    pub async fn snapshot(&mut self, state: &[u8]) -> io::Result<()> {
        debug_assert!(!self.is_filling(), "a snapshot over a fill in flight");
        let new = self.dir.join("log.new");
        let file = LogFile::open(&new, true).await?;
        let padded = persist::padded_len(state.len()) as u64;
        let mut buf = Vec::with_capacity(padded as usize);
        buf.extend_from_slice(state);
        buf.resize(padded as usize, 0);
        file.write_all_at(&buf, 0).await?;
        file.sync().await?;
        fs::rename(&new, self.dir.join("log"))?;
        sync_dir(&self.dir)?;
        if let Some(old) = self.file.replace(file) {
            old.close().await;
        }
        self.len = padded;
        self.filled = padded;
        self.grown = 0;
        self.last_snapshot = padded;
        self.counters.log_snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("coremq-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_open_of_a_locked_dir_is_refused_with_the_holders_pid() {
        let d = tempdir("lock");
        let c = Arc::new(Counters::default());
        let (held, _) = open(&d, 2, &c).unwrap();
        let e = open(&d, 2, &c).unwrap_err().to_string();
        assert!(e.contains("in use by another coremq"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        open(&d, 2, &c).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_newer_format_is_refused_and_a_foreign_meta_too() {
        let d = tempdir("format");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("meta"), "coremq-data 99\nshards 2\n").unwrap();
        let c = Arc::new(Counters::default());
        let e = open(&d, 2, &c).unwrap_err().to_string();
        assert!(
            e.contains("newer coremq (data format 99; this build reads format 1)"),
            "{e}"
        );
        fs::write(d.join("meta"), "hello\n").unwrap();
        let e = open(&d, 2, &c).unwrap_err().to_string();
        assert!(e.contains("meta is not a coremq data directory's"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    fn records(n: usize) -> BytesMut {
        let mut out = BytesMut::new();
        for i in 0..n {
            persist::put_session_gone(&mut out, &format!("dev-{i}"));
        }
        out
    }

    /// A commit carried by the shard's ring and one through glommio's file
    /// API, one after the other, on this kernel and filesystem: the log
    /// reads back whole, each commit on its own block.
    #[test]
    fn a_ring_commit_and_a_glommio_commit_read_back_as_one_log() {
        let d = tempdir("ring");
        let dir = d.clone();
        let c = Arc::new(Counters::default());
        let counters = c.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut log = ShardLog::open(&dir, 0, 0, FsyncMode::Batch, 64, counters)
                    .await
                    .unwrap();
                let mut ring = super::super::uring::Uring::new(64, 16, 0).unwrap();
                // Zeros ahead first, as the ring loop does on an empty log;
                // a commit overlapping the fill in flight waits for it.
                let fill = log.fill_due().expect("an empty log wants zeros ahead");
                assert_eq!((fill.offset, fill.len as usize), (0, FILL_CHUNK));
                assert!(!log.can_commit(10));
                assert!(log.fill_due().is_none(), "one fill at a time");
                // SAFETY: the log (owner of the zeros) outlives the wait.
                unsafe { ring.write_at(fill.fd, (fill.data, fill.len, fill.offset), 3, None) };
                let mut done = Vec::new();
                while done.is_empty() {
                    ring.enter(true, std::time::Duration::from_millis(100), &mut done)
                        .unwrap();
                }
                log.filled(done[0].result).unwrap();
                assert!(log.can_commit(10) && !log.is_filling());
                let first = records(300);
                let mut commit = log.ring_commit(&first, 1);
                loop {
                    let w = commit.next_write();
                    // SAFETY: `commit` outlives the completions waited for.
                    unsafe { ring.write_at(w.fd, (w.data, w.len, w.offset), 1, Some(2)) };
                    let mut done = Vec::new();
                    while done.len() < 2 {
                        ring.enter(true, std::time::Duration::from_millis(100), &mut done)
                            .unwrap();
                    }
                    assert_eq!(done[0].user_data, 1);
                    let all = commit.wrote(done[0].result).unwrap();
                    commit.synced(done[1].result).unwrap();
                    if all {
                        break;
                    }
                }
                assert!(commit.is_durable());
                log.ring_committed(&commit);
                log.commit(&records(2)).await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
        let data = fs::read(shard_dir(&d, 0).join("log")).unwrap();
        // Both commits inside the zeros written ahead.
        assert_eq!(data.len(), FILL_CHUNK);
        let first_len = records(300).len();
        let end = persist::padded_len(first_len) + persist::BLOCK;
        assert!(data[..end].iter().any(|&b| b != 0) && data[end..].iter().all(|&b| b == 0));
        let scan = persist::scan(&data);
        assert_eq!(scan.tail, None);
        assert_eq!(scan.records.len(), 302);
        assert_eq!(c.log_commits.load(Ordering::Relaxed), 2);
        fs::remove_dir_all(&d).unwrap();
    }

    /// Zeros are kept written [`FILL_AHEAD`] past the log's end, one fill
    /// at a time, never under a commit; a reopened log counts what a
    /// previous run wrote ahead.
    #[test]
    fn zeros_are_written_ahead_and_never_under_a_commit() {
        let d = tempdir("fill");
        let dir = d.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let c = Arc::new(Counters::default());
                let mut log = ShardLog::open(&dir, 0, 0, FsyncMode::Batch, 64, c.clone())
                    .await
                    .unwrap();
                let mut at = 0;
                for _ in 0..FILL_AHEAD / FILL_CHUNK as u64 {
                    let w = log.fill_due().unwrap();
                    assert_eq!(w.offset, at);
                    log.filled(w.len as i32).unwrap();
                    at += u64::from(w.len);
                }
                assert!(log.fill_due().is_none(), "{FILL_AHEAD} ahead is enough");
                log.commit(&records(3)).await.unwrap();
                // One block further: the next fill starts where the last ended.
                let w = log.fill_due().unwrap();
                assert_eq!(w.offset, at);
                assert!(log.can_commit(persist::BLOCK), "below the fill");
                let w_len = w.len as i32;
                // A short fill counts its whole blocks.
                log.filled(w_len - 5000).unwrap();
                assert_eq!(log.filled, at + (w_len as u64 - 8192));
                drop(log);
                // Nothing wrote the zeros here (no ring): 1 block on disk.
                let mut reopened = ShardLog::open(&dir, 0, 100, FsyncMode::Batch, 64, c)
                    .await
                    .unwrap();
                assert_eq!(reopened.filled, persist::BLOCK as u64);
                assert!(reopened.fill_due().is_some());
            })
            .unwrap()
            .join()
            .unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    /// A short O_DIRECT write goes on from the block it stopped in, and the
    /// fdatasync of the attempt it cut short (cancelled) does not count.
    #[test]
    fn a_short_ring_write_is_continued_and_its_cancelled_sync_ignored() {
        let mut commit = RingCommit {
            buf: AlignedBuf::zeroed(3 * persist::BLOCK),
            records: 2 * persist::BLOCK + 10,
            fd: -1,
            direct: true,
            offset: 8192,
            written: 0,
            sync: true,
            synced: false,
            stale_syncs: 0,
            generation: 7,
        };
        assert!(!commit.wrote(5000).unwrap());
        let w = commit.next_write();
        assert_eq!((w.offset, w.len), (8192 + 4096, 2 * 4096));
        commit.synced(-libc::ECANCELED).unwrap();
        assert!(!commit.is_durable());
        assert!(commit.wrote(2 * 4096).unwrap());
        assert!(!commit.is_durable(), "written, not yet synced");
        commit.synced(0).unwrap();
        assert!(commit.is_durable());
        let e = commit.synced(-libc::EIO).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(commit.wrote(0).is_err(), "no progress is an error");
    }
}

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
//! **Running** ([`ShardLog`], one per shard, on glommio's io_uring file
//! API): each loop turn's records are appended in one write that starts on
//! a fresh 4 KiB block and is padded with zeros to the next (`DmaFile`,
//! O_DIRECT; glommio's buffered file where the filesystem has no
//! O_DIRECT), then one `fdatasync` (`--fsync always|batch`) before the
//! broker is told they are durable. A synced block is never written again,
//! so a torn write can only damage the commit it belonged to — which was
//! not acknowledged. The padding costs disk space (up to 4 KiB a commit);
//! snapshots give it back. No shard waits on another's disk.
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
use std::os::unix::io::AsRawFd;
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
        let file = LogFile::open(&sdir.join("log"), false).await?;
        Ok(ShardLog {
            dir: sdir,
            file: Some(file),
            len: persist::padded_len(log_len as usize) as u64,
            fsync,
            grown: 0,
            snapshot_after: u64::from(snapshot_mib) << 20,
            last_snapshot: log_len,
            counters,
        })
    }

    /// Appends `records` in one write at the next block, padded with zeros
    /// to a block boundary after them ([`persist::padded_len`]), then (unless `--fsync never`) one
    /// fdatasync. Returns once they are durable.
    pub async fn commit(&mut self, records: &[u8]) -> io::Result<()> {
        let padded = persist::padded_len(records.len()) as u64;
        let mut buf = Vec::with_capacity(padded as usize);
        buf.extend_from_slice(records);
        buf.resize(padded as usize, 0);
        let file = self.file.as_ref().expect("open between calls");
        file.write_all_at(&buf, self.len).await?;
        if self.fsync != FsyncMode::Never {
            file.sync().await?;
        }
        self.len += padded;
        self.grown += padded;
        let c = &self.counters;
        c.log_commits.fetch_add(1, Ordering::Relaxed);
        c.log_bytes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
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
}

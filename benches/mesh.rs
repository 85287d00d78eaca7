//! Cross-shard channel benchmark: glommio's `channel_mesh` against a
//! crossbeam-channel paired with an eventfd doorbell, between two glommio
//! executors (`Placement::Unbound`, configured as coremq's shards are:
//! 64 KiB io memory, ring depth 1024, no spin before park).
//!
//! The message is coremq's own [`MeshMsg`] carrying a QoS 0 publish (topic
//! and payload are `Bytes` over static data, so a clone costs no atomic and
//! only the channel is measured). Both channels hold
//! [`MESH_CHANNEL_CAPACITY`] messages.
//!
//! - `burst`: 1,000,000 messages one way as fast as the sender can push;
//!   messages per second, and CPU time (user + system, `RUSAGE_THREAD`) of
//!   both executor threads per message.
//! - `pingpong`: one message out and back, timed on the sender; RTT p50/p99.
//! - `wake`: one message every 1 ms to a receiver that is parked in
//!   io_uring between messages; send→receive time p50/p99.
//!
//! Each round runs every test for both variants, alternating which variant
//! goes first; the summary is the median over rounds. `cargo bench --bench
//! mesh [-- --rounds N]` is the full run (5 rounds by default); run without
//! `--bench` (as `cargo test --all-targets` does) it is a smoke run of about
//! half a second with small counts.
//!
//! The doorbell: a blocking eventfd per waiting side, read through glommio
//! as a `BufferedFile` (io_uring `READ`, which arms a poll on the eventfd and
//! completes when it is written, waking the parked ring). An eventfd
//! coalesces any number of rings into one counter and needs no buffer, which
//! a socketpair would not. The sender rings only when the receiver has armed
//! the bell (an `AtomicBool`; Dekker-style `SeqCst` fences on both sides), so
//! a busy receiver costs no syscall per message. A full channel parks the
//! sender on a second bell that the receiver rings after a pop, as glommio's
//! mesh does.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use coremq::proto::broker::{RoutedPublish, ShardMsg};
use coremq::proto::codec::QoS;
use coremq::proto::topic::TopicName;
use coremq::shard::mesh::{MeshMsg, MESH_CHANNEL_CAPACITY};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::io::BufferedFile;
use glommio::{LocalExecutorBuilder, Placement};

/// Which channel carries the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mesh,
    Crossbeam,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mesh => "glommio channel_mesh",
            Kind::Crossbeam => "crossbeam + eventfd",
        }
    }

    /// The name `--only` takes.
    fn arg(self) -> &'static str {
        match self {
            Kind::Mesh => "mesh",
            Kind::Crossbeam => "crossbeam",
        }
    }
}

/// A doorbell: an eventfd written only when its owner has armed it.
struct Bell {
    armed: AtomicBool,
    efd: OwnedFd,
    /// eventfd writes, to show how often the syscall is paid.
    rings: AtomicU64,
}

impl Bell {
    fn new() -> Arc<Bell> {
        // Blocking on purpose: io_uring returns EAGAIN for an O_NONBLOCK fd
        // instead of waiting for it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        Arc::new(Bell {
            armed: AtomicBool::new(false),
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            rings: AtomicU64::new(0),
        })
    }

    /// Called after the state the owner waits for has changed.
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Relaxed) {
            let one = 1u64;
            let n = unsafe {
                libc::write(
                    self.efd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            assert_eq!(n, 8, "eventfd write: {}", std::io::Error::last_os_error());
            self.rings.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The owner's side of a [`Bell`], inside its executor.
struct BellWait {
    bell: Arc<Bell>,
    file: BufferedFile,
}

impl BellWait {
    fn new(bell: Arc<Bell>) -> BellWait {
        let dup = unsafe { libc::dup(bell.efd.as_raw_fd()) };
        assert!(dup >= 0, "dup: {}", std::io::Error::last_os_error());
        BellWait {
            // The BufferedFile owns (and closes) the duplicate.
            file: unsafe { BufferedFile::from_raw_fd(dup) },
            bell,
        }
    }

    /// Parks until rung, unless `ready` turns true once the bell is armed.
    async fn park(&self, ready: impl Fn() -> bool) {
        self.bell.armed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if ready() {
            // A ringer that already disarmed it has written the eventfd: the
            // next park then returns at once and re-checks. Harmless.
            self.bell.armed.store(false, Ordering::Relaxed);
            return;
        }
        self.file.read_at(0, 8).await.expect("doorbell read");
    }
}

/// One executor's end before it is connected (`Send`).
enum End {
    Mesh(MeshBuilder<MeshMsg, Full>),
    Crossbeam(CbEnd),
}

struct CbEnd {
    tx: Sender<MeshMsg>,
    rx: Receiver<MeshMsg>,
    /// Rung by the peer when it pushes into `rx`.
    data_in: Arc<Bell>,
    /// The peer's `data_in`.
    data_out: Arc<Bell>,
    /// Rung by the peer when it pops from `tx`'s channel.
    room_in: Arc<Bell>,
    /// The peer's `room_in`.
    room_out: Arc<Bell>,
}

/// Two connected ends.
fn ends(kind: Kind) -> (End, End) {
    match kind {
        Kind::Mesh => {
            let mesh = MeshBuilder::full(2, MESH_CHANNEL_CAPACITY);
            (End::Mesh(mesh.clone()), End::Mesh(mesh))
        }
        Kind::Crossbeam => {
            let (tx_ab, rx_ab) = crossbeam_channel::bounded(MESH_CHANNEL_CAPACITY);
            let (tx_ba, rx_ba) = crossbeam_channel::bounded(MESH_CHANNEL_CAPACITY);
            let (data_a, data_b, room_a, room_b) =
                (Bell::new(), Bell::new(), Bell::new(), Bell::new());
            let a = CbEnd {
                tx: tx_ab,
                rx: rx_ba,
                data_in: data_a.clone(),
                data_out: data_b.clone(),
                room_in: room_a.clone(),
                room_out: room_b.clone(),
            };
            let b = CbEnd {
                tx: tx_ba,
                rx: rx_ab,
                data_in: data_b,
                data_out: data_a,
                room_in: room_b,
                room_out: room_a,
            };
            (End::Crossbeam(a), End::Crossbeam(b))
        }
    }
}

/// A connected end, inside its executor.
enum Link {
    Mesh {
        tx: Senders<MeshMsg>,
        rx: Receivers<MeshMsg>,
        peer: usize,
    },
    Crossbeam {
        tx: Sender<MeshMsg>,
        rx: Receiver<MeshMsg>,
        data_wait: BellWait,
        data_out: Arc<Bell>,
        room_wait: BellWait,
        room_out: Arc<Bell>,
    },
}

impl End {
    async fn connect(self) -> Link {
        match self {
            End::Mesh(mesh) => {
                let (tx, rx) = mesh.join().await.expect("joining the mesh");
                let peer = 1 - tx.peer_id();
                Link::Mesh { tx, rx, peer }
            }
            End::Crossbeam(e) => Link::Crossbeam {
                tx: e.tx,
                rx: e.rx,
                data_wait: BellWait::new(e.data_in),
                data_out: e.data_out,
                room_wait: BellWait::new(e.room_in),
                room_out: e.room_out,
            },
        }
    }
}

impl Link {
    async fn send(&self, mut msg: MeshMsg) {
        match self {
            Link::Mesh { tx, peer, .. } => tx.send_to(*peer, msg).await.expect("mesh send"),
            Link::Crossbeam {
                tx,
                data_out,
                room_wait,
                ..
            } => loop {
                match tx.try_send(msg) {
                    Ok(()) => {
                        data_out.ring();
                        return;
                    }
                    Err(TrySendError::Full(m)) => {
                        msg = m;
                        room_wait.park(|| !tx.is_full()).await;
                    }
                    Err(TrySendError::Disconnected(_)) => panic!("crossbeam peer gone"),
                }
            },
        }
    }

    async fn recv(&self) -> MeshMsg {
        match self {
            Link::Mesh { rx, peer, .. } => rx
                .recv_from(*peer)
                .await
                .expect("mesh recv")
                .expect("mesh closed"),
            Link::Crossbeam {
                rx,
                data_wait,
                room_out,
                ..
            } => loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        room_out.ring();
                        return msg;
                    }
                    Err(TryRecvError::Empty) => data_wait.park(|| !rx.is_empty()).await,
                    Err(TryRecvError::Disconnected) => panic!("crossbeam peer gone"),
                }
            },
        }
    }

    /// eventfd writes so far on the bells this end rings.
    fn rings(&self) -> u64 {
        match self {
            Link::Mesh { .. } => 0,
            Link::Crossbeam {
                data_out, room_out, ..
            } => data_out.rings.load(Ordering::Relaxed) + room_out.rings.load(Ordering::Relaxed),
        }
    }
}

fn publish() -> ShardMsg {
    static PAYLOAD: [u8; 64] = [0x5a; 64];
    ShardMsg::Publish(RoutedPublish {
        topic: TopicName::new(ByteString::from_static(
            "fleet/eu-west-1/dev-00042/telemetry",
        ))
        .expect("topic"),
        payload: Bytes::from_static(&PAYLOAD),
        qos: QoS::AtMostOnce,
        retain: false,
        props: None,
        expires_at: None,
        ticket: None,
        uid: 0,
        shares: None,
    })
}

/// CPU time of the calling thread: (user, system).
fn thread_cpu() -> (Duration, Duration) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

fn cpu_since(start: (Duration, Duration)) -> (Duration, Duration) {
    let now = thread_cpu();
    (now.0 - start.0, now.1 - start.1)
}

/// Runs `a` and `b` on two fresh executors joined by `kind`; both start
/// together once connected.
fn run_pair<A, FA, RA, B, FB, RB>(kind: Kind, a: A, b: B) -> (RA, RB)
where
    A: FnOnce(Link) -> FA + Send + 'static,
    FA: Future<Output = RA> + 'static,
    RA: Send + 'static,
    B: FnOnce(Link) -> FB + Send + 'static,
    FB: Future<Output = RB> + 'static,
    RB: Send + 'static,
{
    let (end_a, end_b) = ends(kind);
    let barrier = Arc::new(Barrier::new(2));
    let ba = barrier.clone();
    let ha = LocalExecutorBuilder::new(Placement::Unbound)
        .name("mesh-a")
        .io_memory(64 * 1024)
        .ring_depth(1024)
        .spawn(move || async move {
            let link = end_a.connect().await;
            ba.wait();
            a(link).await
        })
        .expect("executor a");
    let hb = LocalExecutorBuilder::new(Placement::Unbound)
        .name("mesh-b")
        .io_memory(64 * 1024)
        .ring_depth(1024)
        .spawn(move || async move {
            let link = end_b.connect().await;
            barrier.wait();
            b(link).await
        })
        .expect("executor b");
    (ha.join().expect("join a"), hb.join().expect("join b"))
}

struct Burst {
    msgs_per_s: f64,
    /// CPU of both threads per message, ns.
    cpu_ns: f64,
    /// The system part of it, ns.
    sys_ns: f64,
    /// eventfd writes per 1,000 messages (crossbeam only).
    rings_per_k: f64,
}

fn burst(kind: Kind, n: usize) -> Burst {
    let ((start, cpu_a, rings_a), (end, cpu_b, rings_b)) = run_pair(
        kind,
        move |link| async move {
            let msg = publish();
            let cpu = thread_cpu();
            let start = Instant::now();
            for _ in 0..n {
                link.send(MeshMsg::Broker(msg.clone())).await;
            }
            (start, cpu_since(cpu), link.rings())
        },
        move |link| async move {
            let cpu = thread_cpu();
            for _ in 0..n {
                drop(link.recv().await);
            }
            (Instant::now(), cpu_since(cpu), link.rings())
        },
    );
    let secs = (end - start).as_secs_f64();
    let user = cpu_a.0 + cpu_b.0;
    let sys = cpu_a.1 + cpu_b.1;
    Burst {
        msgs_per_s: n as f64 / secs,
        cpu_ns: (user + sys).as_nanos() as f64 / n as f64,
        sys_ns: sys.as_nanos() as f64 / n as f64,
        rings_per_k: (rings_a + rings_b) as f64 * 1000.0 / n as f64,
    }
}

/// Round-trip times of `n` ping-pongs after `warm` unrecorded ones.
fn pingpong(kind: Kind, warm: usize, n: usize) -> Vec<Duration> {
    let (rtts, ()) = run_pair(
        kind,
        move |link| async move {
            let msg = publish();
            let mut rtts = Vec::with_capacity(n);
            for i in 0..warm + n {
                let t = Instant::now();
                link.send(MeshMsg::Broker(msg.clone())).await;
                drop(link.recv().await);
                if i >= warm {
                    rtts.push(t.elapsed());
                }
            }
            rtts
        },
        move |link| async move {
            for _ in 0..warm + n {
                let msg = link.recv().await;
                link.send(msg).await;
            }
        },
    );
    rtts
}

/// Send→receive times of `n` messages sent 1 ms apart to a parked receiver.
fn wake(kind: Kind, n: usize) -> Vec<Duration> {
    let (sent, got) = run_pair(
        kind,
        move |link| async move {
            let msg = publish();
            let mut sent = Vec::with_capacity(n);
            for _ in 0..n {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                sent.push(Instant::now());
                link.send(MeshMsg::Broker(msg.clone())).await;
            }
            sent
        },
        move |link| async move {
            let mut got = Vec::with_capacity(n);
            for _ in 0..n {
                drop(link.recv().await);
                got.push(Instant::now());
            }
            got
        },
    );
    sent.iter().zip(&got).map(|(s, g)| *g - *s).collect()
}

/// p50 and p99 in microseconds.
fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_nanos() as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Rounds {
    mps: Vec<f64>,
    cpu_ns: Vec<f64>,
    sys_ns: Vec<f64>,
    rings: Vec<f64>,
    pp50: Vec<f64>,
    pp99: Vec<f64>,
    wk50: Vec<f64>,
    wk99: Vec<f64>,
}

struct Sizes {
    burst: usize,
    pp_warm: usize,
    pp: usize,
    wake: usize,
    rounds: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let rounds_arg = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok());
    let sizes = if full {
        Sizes {
            burst: 1_000_000,
            pp_warm: 1_000,
            pp: 50_000,
            wake: 2_000,
            rounds: rounds_arg.unwrap_or(5),
        }
    } else {
        Sizes {
            burst: 20_000,
            pp_warm: 100,
            pp: 1_000,
            wake: 50,
            rounds: rounds_arg.unwrap_or(1),
        }
    };
    let started = Instant::now();
    println!(
        "mesh bench ({}): {} rounds; burst {} msgs, ping-pong {} (+{} warm-up), wake {} x 1 ms; \
         message {} B, capacity {}",
        if full { "full" } else { "smoke" },
        sizes.rounds,
        sizes.burst,
        sizes.pp,
        sizes.pp_warm,
        sizes.wake,
        std::mem::size_of::<MeshMsg>(),
        MESH_CHANNEL_CAPACITY
    );
    // `--only mesh|crossbeam` runs one variant (for strace or perf).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let kinds = [Kind::Mesh, Kind::Crossbeam];
    let mut results: [Rounds; 2] = Default::default();
    for round in 0..sizes.rounds {
        // Alternate which variant runs first, so drift in the machine's load
        // falls on both.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &k in &order {
            let kind = kinds[k];
            if only.is_some_and(|o| o != kind.arg()) {
                continue;
            }
            let b = burst(kind, sizes.burst);
            let (pp50, pp99) = percentiles(pingpong(kind, sizes.pp_warm, sizes.pp));
            let (wk50, wk99) = percentiles(wake(kind, sizes.wake));
            println!(
                "round {round} {:<21} burst {:>6.2} M msg/s, cpu {:>6.1} ns/msg (sys {:>5.1}), \
                 {:>6.2} eventfd writes/1k | ping-pong p50 {:>6.1} us p99 {:>7.1} us | \
                 wake p50 {:>6.1} us p99 {:>7.1} us",
                kind.name(),
                b.msgs_per_s / 1e6,
                b.cpu_ns,
                b.sys_ns,
                b.rings_per_k,
                pp50,
                pp99,
                wk50,
                wk99
            );
            let r = &mut results[k];
            r.mps.push(b.msgs_per_s);
            r.cpu_ns.push(b.cpu_ns);
            r.sys_ns.push(b.sys_ns);
            r.rings.push(b.rings_per_k);
            r.pp50.push(pp50);
            r.pp99.push(pp99);
            r.wk50.push(wk50);
            r.wk99.push(wk99);
        }
    }
    println!("\nmedians over {} rounds:", sizes.rounds);
    println!(
        "| variant               | burst M msg/s | CPU ns/msg (sys) | ping-pong RTT p50 / p99 us | wake p50 / p99 us |"
    );
    println!(
        "|-----------------------|---------------|------------------|----------------------------|-------------------|"
    );
    for (k, r) in results.into_iter().enumerate() {
        if r.mps.is_empty() {
            continue;
        }
        println!(
            "| {:<21} | {:>13.2} | {:>8.1} ({:>5.1}) | {:>12.1} / {:>11.1} | {:>7.1} / {:>7.1} |",
            kinds[k].name(),
            median(r.mps) / 1e6,
            median(r.cpu_ns),
            median(r.sys_ns),
            median(r.pp50),
            median(r.pp99),
            median(r.wk50),
            median(r.wk99),
        );
        if kinds[k] == Kind::Crossbeam {
            println!(
                "  (crossbeam: {:.2} eventfd writes per 1k burst messages)",
                median(r.rings)
            );
        }
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}

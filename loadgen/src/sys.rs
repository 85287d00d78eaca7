//! Small wrappers over the OS: clocks, limits, /proc and getrusage.

use std::net::Ipv4Addr;

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// machine, so worker processes can compare timestamps.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in microseconds.
pub fn mono_us() -> u64 {
    mono_ns() / 1000
}

/// Raises the open-file soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
    }
    rl.rlim_cur
}

/// CPU seconds (user + system) of this process, or of its waited-for children.
pub fn rusage_cpu_s(who: libc::c_int) -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Peak RSS of this process in KiB (getrusage ru_maxrss).
pub fn self_max_rss_kb() -> u64 {
    // SAFETY: as above.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as u64
}

/// One look at a process: CPU seconds and resident memory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// VmRSS, bytes.
    pub rss_bytes: u64,
}

/// Reads /proc/PID/stat and /proc/PID/status.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / hz,
        rss_bytes: rss_kb * 1024,
    })
}

/// [`proc_sample`] of every process in `pids`, summed (a broker that runs
/// as a cluster of processes): CPU seconds and RSS added up. None when
/// `pids` is empty or any one of them cannot be read, so a figure never
/// covers fewer processes than asked. One PID: exactly its own sample.
pub fn proc_sample_sum(pids: &[u32]) -> Option<ProcSample> {
    sum_samples(pids.iter().map(|&p| proc_sample(p)))
}

/// Adds samples up; None when there are none or any is None.
fn sum_samples(samples: impl IntoIterator<Item = Option<ProcSample>>) -> Option<ProcSample> {
    let mut it = samples.into_iter();
    let mut total = it.next()??;
    for s in it {
        let s = s?;
        total.cpu_s += s.cpu_s;
        total.rss_bytes += s.rss_bytes;
    }
    Some(total)
}

/// The machine's kernel slab memory (`Slab:` in /proc/meminfo), bytes:
/// every process's sockets, dentries, inodes and the rest together.
pub fn slab_bytes() -> Option<u64> {
    meminfo_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, "Slab").map(|kb| kb * 1024)
}

/// The kB figure of `key` in /proc/meminfo's text (`Slab:   256668 kB`).
fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// How many CPUs this process may run on.
pub fn affinity_cpus() -> usize {
    // SAFETY: zeroed cpu_set_t is valid; the call fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as usize;
            }
        }
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The i-th source address: 127.1.0.1, 127.1.0.2, ... skipping .0 and .255
/// in the last octet.
pub fn source_ip(i: u32) -> Ipv4Addr {
    let host = i / 254;
    let last = (i % 254) + 1;
    let b2 = 1 + host / 256;
    let b3 = host % 256;
    Ipv4Addr::new(127, (b2 & 0xff) as u8, b3 as u8, last as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_walk_127_1_0_1_upwards() {
        assert_eq!(source_ip(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_ip(253), Ipv4Addr::new(127, 1, 0, 254));
        assert_eq!(source_ip(254), Ipv4Addr::new(127, 1, 1, 1));
    }

    #[test]
    fn meminfo_kb_finds_the_exact_key() {
        let text =
            "MemTotal:       16384 kB\nSlab:             256668 kB\nSReclaimable:     100 kB\n";
        assert_eq!(meminfo_kb(text, "Slab"), Some(256_668));
        assert_eq!(meminfo_kb(text, "Reclaimable"), None);
        assert!(slab_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn proc_sample_reads_self() {
        let s = proc_sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
    }

    #[test]
    fn samples_of_several_processes_add_up() {
        let a = ProcSample {
            cpu_s: 1.5,
            rss_bytes: 1000,
        };
        let b = ProcSample {
            cpu_s: 0.25,
            rss_bytes: 24,
        };
        let one = sum_samples([Some(a)]).unwrap();
        assert_eq!((one.cpu_s, one.rss_bytes), (1.5, 1000));
        let two = sum_samples([Some(a), Some(b)]).unwrap();
        assert_eq!((two.cpu_s, two.rss_bytes), (1.75, 1024));
        assert!(sum_samples([Some(a), None]).is_none());
        assert!(sum_samples([]).is_none());
        assert!(proc_sample_sum(&[]).is_none());
        let me = std::process::id();
        assert!(proc_sample_sum(&[me]).is_some_and(|s| s.rss_bytes > 0));
        assert!(proc_sample_sum(&[me, me]).is_some());
    }
}

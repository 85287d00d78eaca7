//! Process-wide OS settings the broker adjusts at start.

use std::io;

/// Raises the soft open-file limit (RLIMIT_NOFILE) to the hard limit and
/// returns the new soft limit. Every client connection is a file descriptor,
/// and the soft limit is often 1024 while the hard limit is far higher.
// `rlim_t` is u64 here but 32 bits on some targets, hence the casts.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // An "unlimited" hard limit cannot be the soft limit for open files: the
    // kernel caps it at fs.nr_open.
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if lim.rlim_cur >= target {
        return Ok(lim.rlim_cur as u64);
    }
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target as u64)
}

/// Grows the process's descriptor table to hold `n` descriptors now, so that
/// accepting connection number 1,024, 2,048, … does not.
///
/// The kernel doubles the table when a new descriptor does not fit, and in a
/// multi-threaded process each doubling waits for an RCU grace period
/// (`expand_fdtable` → `synchronize_rcu`). Measured here: single `accept4`
/// calls of 9 to 20 ms during a ramp to 19,000 connections, which put every
/// CONNACK queued behind them at a p99 of 13 to 21 ms. The table never
/// shrinks, so one grow at start removes them all; it costs 8 bytes of
/// kernel memory per slot, which the connections would take anyway.
/// Best effort: a failure leaves the kernel to grow the table as before.
pub fn reserve_fd_table(n: u64) {
    let Ok(top) = libc::c_int::try_from(n.saturating_sub(1)) else {
        return;
    };
    if top <= libc::STDERR_FILENO {
        return;
    }
    // SAFETY: dup2 of standard input onto an unused high descriptor (fcntl
    // F_GETFD says it is unused), closed at once.
    unsafe {
        if libc::fcntl(top, libc::F_GETFD) != -1 {
            return;
        }
        let fd = libc::dup2(libc::STDIN_FILENO, top);
        if fd < 0 {
            // No standard input (closed by a supervisor): any descriptor will do.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if null >= 0 {
                if libc::dup2(null, top) >= 0 {
                    libc::close(top);
                }
                libc::close(null);
            }
            return;
        }
        libc::close(fd);
    }
}

/// The CPUs this process may run on, in ascending order (at least one).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it through a
    // valid pointer of the size given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads within the set for cpu < CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// Hands memory the calling thread freed back to the OS now, rather than
/// whenever the allocator next gets busy on this thread.
///
/// mimalloc purges freed pages lazily, on its own allocation activity; a
/// shard that went quiet after a connection storm (all its handshake buffers
/// freed) would keep them resident until traffic resumed. Measured: 484 B of
/// RSS per held connection 10 s after a 19,000-connection ramp, 319 B after
/// 60 s. Every shard calls this once a second; it walks only that thread's
/// heap. Harmless where mimalloc is not the global allocator (tests).
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointers; `false` asks for the cheap pass.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// True if standard input is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Turns terminal echo on standard input on or off (so a typed password is
/// not shown); returns whether it was on before.
pub fn set_stdin_echo(on: bool) -> io::Result<bool> {
    // SAFETY: termios is plain data; tcgetattr fills it through a valid
    // pointer and tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        let was_on = t.c_lflag & libc::ECHO != 0;
        if on {
            t.c_lflag |= libc::ECHO;
        } else {
            t.c_lflag &= !libc::ECHO;
        }
        if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(was_on)
    }
}

/// This machine's host name (`uname`), or `coremq` when it has none.
pub fn host_name() -> String {
    // SAFETY: uname fills the zeroed struct we own; its fields are
    // NUL-terminated C strings within their arrays.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "coremq".into();
    }
    let name = unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) };
    match name.to_string_lossy().into_owned() {
        n if n.is_empty() => "coremq".into(),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn raises_soft_limit_to_hard_limit() {
        let n = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_nofile_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur as u64, n);
        assert!(lim.rlim_max == libc::RLIM_INFINITY || lim.rlim_cur == lim.rlim_max);
        assert_eq!(raise_nofile_limit().unwrap(), n, "idempotent");
    }

    #[test]
    fn reserving_the_fd_table_leaves_no_descriptor_open() {
        let n = raise_nofile_limit().unwrap().min(4096);
        reserve_fd_table(n);
        let top = (n - 1) as libc::c_int;
        // SAFETY: F_GETFD only inspects the descriptor.
        assert_eq!(unsafe { libc::fcntl(top, libc::F_GETFD) }, -1);
        // After the grow, the table has room for `top`: dup2 onto it works
        // and is undone.
        // SAFETY: as in reserve_fd_table.
        unsafe {
            assert_eq!(libc::dup2(libc::STDERR_FILENO, top), top);
            libc::close(top);
        }
    }
}

//! The crate's only unsafe code.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A pollable fd that becomes readable when process `pid` exits (`pidfd_open(2)`, Linux 5.3).
/// Waiting on it needs no `SIGCHLD` handler, so the master library installs no signal handler
/// and cannot confuse a reused pid with its child (hazards D1, D7).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just created `raw` for us (pidfds are always close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`, Linux 5.1): unlike
/// `kill(pid)`, it cannot reach another process that reused the pid after somebody else
/// reaped ours (a process that ignores SIGCHLD has its children reaped by the kernel).
pub(crate) fn pidfd_signal(pidfd: std::os::fd::BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal takes an fd, a signal number, a null siginfo and flags; no
    // memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd`'s open file (`FIONBIO`).
pub(crate) fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one c_int through the pointer, which points at `on`, alive for the
    // call; the fd is borrowed, so it is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &on) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether child `pid` has not been reaped yet (running, or a zombie): only then is its pid
/// (and so the id of the process group it leads) still its own.
pub(crate) fn unreaped(pid: u32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let peek = waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    );
    matches!(
        peek,
        Ok(WaitStatus::StillAlive | WaitStatus::Exited(..) | WaitStatus::Signaled(..))
    )
}

/// Whether process `pid` is in the process group it leads (it did not move to another one).
pub(crate) fn leads_its_group(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let pid = nix::unistd::Pid::from_raw(raw);
    nix::unistd::getpgid(Some(pid)).is_ok_and(|group| group == pid)
}

/// Sends `signal` to process group `pgid` (`killpg(2)`).
pub(crate) fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let signal = nix::sys::signal::Signal::try_from(signal).map_err(io::Error::from)?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal).map_err(io::Error::from)
}

/// Arranges for `fds` to be open at `first`, `first + 1`, ... in the child `cmd` spawns, without
/// close-on-exec (systemd's `LISTEN_FDS` layout). Each fd is first duplicated above every
/// target, so one `dup2` can never overwrite a source that a later one still needs.
pub(crate) fn inherit_listen_fds(
    cmd: &mut std::process::Command,
    fds: &[std::os::fd::BorrowedFd<'_>],
    first: i32,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let above = first + fds.len() as i32 + 64;
    let mut sources = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open fd; returns a new fd or -1.
        let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created `raw` for us.
        sources.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let closure = move || {
        for (i, src) in sources.iter().enumerate() {
            // SAFETY: dup2 is async-signal-safe; the target does not get FD_CLOEXEC.
            if unsafe { libc::dup2(src.as_raw_fd(), first + i as i32) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only calls dup2 (async-signal-safe) and does not allocate.
    unsafe { cmd.pre_exec(closure) };
    Ok(())
}

/// Marks every fd from `first` up close-on-exec in the child `cmd` spawns (`close_range(2)`
/// with `CLOSE_RANGE_CLOEXEC`, Linux 5.11), so a worker inherits exactly stdio and the fds
/// placed below `first`, even when this process itself inherited fds without close-on-exec.
/// Registered after the closures that place the inherited fds.
pub(crate) fn cloexec_from(cmd: &mut std::process::Command, first: i32) {
    use std::os::unix::process::CommandExt;
    let first = first.max(3) as libc::c_uint;
    let closure = move || {
        // SAFETY: close_range takes integers only and is async-signal-safe.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        // Kernels before 5.9 lack close_range (ENOSYS), and 5.9/5.10 lack CLOSE_RANGE_CLOEXEC
        // (EINVAL): the master's own fds are close-on-exec anyway, so only fds leaked into the
        // master by its parent would pass through.
        if rc < 0 {
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
                return Err(err);
            }
        }
        Ok(())
    };
    // SAFETY: the closure makes one async-signal-safe syscall and does not allocate.
    unsafe { cmd.pre_exec(closure) };
}

/// Has the child `cmd` spawns receive SIGTERM when the master goes, for workers that cannot see
/// the channel's EOF (programs given only `LISTEN_FDS`): otherwise a SIGKILLed master leaves
/// them serving, and holding the port, for ever (hazard D3). The death signal follows the
/// spawning *thread*, which is the event loop's: it lives as long as the master. A master that
/// died between fork and `prctl` is caught by checking the parent afterwards.
pub(crate) fn term_with_master(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // Read before the fork: the child must compare with the master, not ask itself.
    let master = std::process::id() as libc::pid_t;
    let closure = move || {
        // SAFETY: prctl takes integers only and is async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getppid cannot fail and is async-signal-safe.
        if unsafe { libc::getppid() } != master {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure makes two async-signal-safe calls and does not allocate.
    unsafe { cmd.pre_exec(closure) };
}

/// The calling thread's scheduling policy, split into the policy and its reset-on-fork flag
/// (systemd's `CPUSchedulingResetOnFork=`, which an unprivileged process may not clear and
/// so must pass back on every change). The raw system calls act on the calling thread alone,
/// as Linux defines them (pid 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadPolicy {
    pub(crate) policy: i32,
    pub(crate) reset_on_fork: bool,
}

impl ThreadPolicy {
    pub(crate) fn of_this_thread() -> io::Result<Self> {
        // SAFETY: sched_getscheduler takes a pid (0: the calling thread) and passes no memory.
        let rc = unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(ThreadPolicy {
            policy: raw & !libc::SCHED_RESET_ON_FORK,
            reset_on_fork: raw & libc::SCHED_RESET_ON_FORK != 0,
        })
    }

    /// Moves the calling thread to `policy` (`SCHED_OTHER` or `SCHED_BATCH`: priority 0),
    /// keeping its nice value and this reset-on-fork flag.
    pub(crate) fn apply_to_this_thread(self) -> io::Result<()> {
        let flag = if self.reset_on_fork {
            libc::SCHED_RESET_ON_FORK
        } else {
            0
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is this thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setscheduler,
                0,
                self.policy | flag,
                &param as *const libc::sched_param,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Has the child `cmd` spawns start as `SCHED_OTHER`, whatever the spawning thread runs as: a
/// forked process inherits its parent thread's policy, and a master whose loop moved itself
/// to `SCHED_BATCH` must not pass that on to its workers. Its nice value is kept.
pub(crate) fn normal_policy_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let closure = || {
        // Already normal (the loop was when it forked): no call a seccomp filter (systemd's
        // `SystemCallFilter=~@resources`) could refuse. The kernel cleared any reset-on-fork
        // flag in the child.
        if ThreadPolicy::of_this_thread().is_ok_and(|p| p.policy == libc::SCHED_OTHER) {
            return Ok(());
        }
        ThreadPolicy {
            policy: libc::SCHED_OTHER,
            reset_on_fork: false,
        }
        .apply_to_this_thread()
    };
    // SAFETY: the closure makes at most two raw system calls through `ThreadPolicy` (no lock,
    // no allocation: an `io::Error` from errno allocates nothing), safe between fork and exec;
    // pid 0 is the child's only thread.
    unsafe { cmd.pre_exec(closure) };
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC` is read against.
pub(crate) fn monotonic_usec() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } < 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

/// Takes ownership of `raw`, a descriptor this process inherited from its parent (systemd's
/// `LISTEN_FDS`), after checking that it is an open socket: anything else (a stale count, a
/// file the process opened itself at that number) is left alone, unowned, with `ENOTSOCK`.
/// It is made close-on-exec: the master passes sockets on to its workers deliberately, never
/// by leaking them.
pub(crate) fn take_inherited_fd(raw: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any integer is harmless; it fails with EBADF if `raw` is not open.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat` into the valid, exclusively borrowed `st`; on an fd that
    // is not open it fails with EBADF.
    if unsafe { libc::fstat(raw, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    // SAFETY: `raw` is an open socket (checked above), and the LISTEN_FDS protocol hands it to
    // this process alone: no other owner in the process refers to it, so owning it is sound as
    // long as it is taken once, which `activation::take_from_env` guarantees.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: F_SETFD on the fd we now own.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn an_inherited_fd_that_is_not_a_socket_is_left_alone() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let taken = take_inherited_fd(file.as_raw_fd());
        let was_taken = taken.is_ok();
        // Had it been taken, two owners would close it: give the second one up.
        if let Ok(fd) = taken {
            let _ = fd.into_raw_fd();
        }
        assert!(!was_taken, "a file is no inherited socket");
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = take_inherited_fd(sock.into_raw_fd()).unwrap();
        drop(fd);
    }
}

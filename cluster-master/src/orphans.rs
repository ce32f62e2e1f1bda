//! Reaping orphaned descendants. As a container's PID 1 (or a child subreaper) the master
//! inherits every process whose parent died: a worker that forks and exits leaves its
//! children to the master, and when they exit they stay zombies until the master waits for
//! them.
//!
//! The master's own workers must not be reaped here: their exit status is read through
//! their `Child` when their pidfd reports the exit. So each sweep first *peeks* at the next
//! exited child (`waitid(P_ALL, WNOWAIT)`, which leaves it a zombie) and reaps it by pid only
//! if it is not a worker. A worker's zombie at the head of the line ends the sweep; its
//! pidfd has fired or is about to, and the next sweep continues behind it.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

/// How often the master looks for exited orphans (it has no `SIGCHLD` handler to tell it).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Orphans reaped per sweep at most, so that a fork bomb cannot hold the loop.
const MAX_PER_SWEEP: usize = 1024;

/// Whether this process must reap orphans without being asked: it is PID 1 (of a container,
/// or a PID namespace).
pub(crate) fn is_init() -> bool {
    std::process::id() == 1
}

/// Makes this process a child subreaper, so that orphaned descendants are reparented to it.
pub(crate) fn become_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
}

/// The sweep timer.
#[derive(Debug)]
pub(crate) struct OrphanReaper {
    next_sweep: Instant,
}

impl OrphanReaper {
    pub(crate) fn new(now: Instant) -> OrphanReaper {
        OrphanReaper {
            next_sweep: now + SWEEP_EVERY,
        }
    }

    pub(crate) fn next_sweep(&self) -> Instant {
        self.next_sweep
    }

    /// Reaps the exited children that `is_worker` does not claim, if a sweep is due; returns
    /// how many.
    pub(crate) fn sweep_if_due(&mut self, now: Instant, is_worker: impl Fn(u32) -> bool) -> usize {
        if now < self.next_sweep {
            return 0;
        }
        self.next_sweep = now + SWEEP_EVERY;
        let mut reaped = 0;
        for _ in 0..MAX_PER_SWEEP {
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => break,
                },
            };
            if u32::try_from(pid.as_raw()).map_or(true, &is_worker) {
                break;
            }
            if waitpid(Pid::from_raw(pid.as_raw()), Some(WaitPidFlag::WNOHANG)).is_ok() {
                reaped += 1;
            }
        }
        reaped
    }
}

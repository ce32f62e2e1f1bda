//! The pool state shared by the serve loop and the handler threads: counters and flags, read
//! without a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mio::Waker;

/// Counters and flags shared by the serve loop and the handler threads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Connections taken and not yet finished (queued, running or idle in a session).
    pub(crate) live: AtomicUsize,
    /// Of those, the ones given to the blocking pool and not started by a thread yet.
    pub(crate) waiting: AtomicUsize,
    pub(crate) draining: AtomicBool,
    pub(crate) stop: AtomicBool,
    loop_waker: Arc<Waker>,
    /// Test hook: the session thread with this index + 1 sees its `poll` fail.
    #[cfg(test)]
    pub(crate) fail_poll_of: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(loop_waker: Arc<Waker>) -> Shared {
        Shared {
            live: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            loop_waker,
            #[cfg(test)]
            fail_poll_of: AtomicUsize::new(0),
        }
    }

    pub(crate) fn finished(&self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        // Only a draining loop waits for the count to reach zero.
        if self.draining.load(Ordering::SeqCst) {
            let _ = self.loop_waker.wake();
        }
    }

    /// [`finished`](Self::finished) from the serve loop's own thread: it looks at the count
    /// before it next sleeps, so waking it would only cost a syscall.
    pub(crate) fn finished_quietly(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

//! What runs connection handlers: event-driven sessions on the serve loop itself (inline) or
//! on session threads (each with its own mio `Poll`), or a pool of blocking handler threads
//! fed through a bounded queue.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use mio::{Events, Poll, Registry, Token, Waker};

use crate::handler::{BlockingFn, ConnInfo, DynFactory, HandlerKind};
use crate::link::Room;
use crate::sessions::SessionSet;
use crate::shared::Shared;
use crate::stream::Stream;

const SESSION_WAKE: Token = Token(0);

#[derive(Debug)]
pub(crate) struct SessionThread {
    tx: Sender<(Stream, ConnInfo)>,
    /// A second receiver, so that a connection sent to a thread that has just died is taken
    /// back by the sender instead of lying in the channel with nobody to count it finished.
    rx: Receiver<(Stream, ConnInfo)>,
    waker: Arc<Waker>,
    /// True while the thread is (about to be) asleep in `poll`: only then does a hand-over
    /// need the waker's eventfd write. A busy thread finds new connections on its own.
    parked: Arc<AtomicBool>,
    /// Set when the thread has ended (its `poll` failed, it panicked, or the pool stopped):
    /// it takes no new connections.
    dead: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Debug)]
pub(crate) enum Pool {
    Sessions {
        threads: Vec<SessionThread>,
        next: usize,
        shared: Arc<Shared>,
    },
    /// Sessions run by the serve loop, registered in its own `Poll`.
    Inline {
        set: SessionSet,
        shared: Arc<Shared>,
    },
    /// Fed through an unbounded channel: the bound is [`Pool::room`]'s, checked before a
    /// hand-off is answered, so a connection taken is never refused or dropped later.
    Blocking {
        tx: Option<Sender<(Stream, ConnInfo)>>,
        handles: Vec<JoinHandle<()>>,
        queue: usize,
        shared: Arc<Shared>,
    },
}

impl Pool {
    pub(crate) fn start(
        kind: &HandlerKind,
        threads: usize,
        queue: usize,
        shared: Arc<Shared>,
    ) -> io::Result<Pool> {
        match kind {
            HandlerKind::Sessions(factory) if threads == 0 => Ok(Pool::Inline {
                set: SessionSet::new(factory.clone(), shared.clone(), false),
                shared,
            }),
            HandlerKind::Sessions(factory) => {
                let mut out = Vec::with_capacity(threads);
                for i in 0..threads {
                    let poll = Poll::new()?;
                    let waker = Arc::new(Waker::new(poll.registry(), SESSION_WAKE)?);
                    let (tx, rx) = channel::unbounded();
                    let parked = Arc::new(AtomicBool::new(false));
                    let dead = Arc::new(AtomicBool::new(false));
                    let me = SessionMain {
                        index: i,
                        rx: rx.clone(),
                        parked: parked.clone(),
                        dead: dead.clone(),
                        factory: factory.clone(),
                        shared: shared.clone(),
                    };
                    let handle = std::thread::Builder::new()
                        .name(format!("cluster-session-{i}"))
                        .spawn(move || me.run(poll))?;
                    out.push(SessionThread {
                        tx,
                        rx,
                        waker,
                        parked,
                        dead,
                        handle: Some(handle),
                    });
                }
                Ok(Pool::Sessions {
                    threads: out,
                    next: 0,
                    shared,
                })
            }
            HandlerKind::Blocking(f) => {
                let threads = threads.max(1);
                let (tx, rx) = channel::unbounded::<(Stream, ConnInfo)>();
                let mut handles = Vec::with_capacity(threads);
                for i in 0..threads {
                    let (rx, f, sh) = (rx.clone(), f.clone(), shared.clone());
                    handles.push(
                        std::thread::Builder::new()
                            .name(format!("cluster-handler-{i}"))
                            .spawn(move || blocking_main(rx, f, sh))?,
                    );
                }
                Ok(Pool::Blocking {
                    tx: Some(tx),
                    handles,
                    queue: queue.max(1),
                    shared,
                })
            }
        }
    }

    /// Whether one more connection fits, given `extra` taken but not yet counted in: under
    /// `max_connections`, and for the blocking pool within its queue (a connection waiting
    /// for a handler could be served sooner by another worker). With every session thread
    /// dead a taken connection could only be closed: refused, another worker serves it.
    pub(crate) fn room(&self, max_connections: Option<usize>) -> Room {
        let (shared, queue, alive) = match self {
            Pool::Inline { shared, .. } => (shared.clone(), None, Vec::new()),
            Pool::Sessions {
                threads, shared, ..
            } => (
                shared.clone(),
                None,
                threads.iter().map(|t| t.dead.clone()).collect(),
            ),
            Pool::Blocking { queue, shared, .. } => (shared.clone(), Some(*queue), Vec::new()),
        };
        Arc::new(move |extra: usize| {
            let under = |count: &AtomicUsize, cap: usize| {
                count.load(Ordering::Acquire).saturating_add(extra) < cap
            };
            max_connections.is_none_or(|m| under(&shared.live, m))
                && queue.is_none_or(|q| under(&shared.waiting, q))
                && (alive.is_empty() || alive.iter().any(|d| !d.load(Ordering::SeqCst)))
        })
    }

    /// Counts a taken connection in, before it is dispatched: from now on [`room`](Self::room)
    /// sees it, and a drain waits for it.
    pub(crate) fn count_in(&self) {
        let (Pool::Inline { shared, .. }
        | Pool::Sessions { shared, .. }
        | Pool::Blocking { shared, .. }) = self;
        shared.live.fetch_add(1, Ordering::AcqRel);
        if matches!(self, Pool::Blocking { .. }) {
            shared.waiting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Hands a connection counted in by [`count_in`](Self::count_in) to its handler: to the
    /// inline sessions (it runs at the next [`run_inline`](Self::run_inline)), or to a
    /// handler thread.
    pub(crate) fn dispatch(&mut self, stream: Stream, info: ConnInfo) {
        match self {
            Pool::Inline { set, .. } => set.add(stream, &info),
            Pool::Sessions {
                threads,
                next,
                shared,
            } => {
                let n = threads.len();
                let live_thread = (0..n).map(|k| next.wrapping_add(k) % n).find(|&i| {
                    threads
                        .get(i)
                        .is_some_and(|t| !t.dead.load(Ordering::SeqCst))
                });
                let Some((i, t)) = live_thread.and_then(|i| Some((i, threads.get(i)?))) else {
                    // Every session thread died: the client is closed, not parked forever.
                    shared.finished();
                    return;
                };
                *next = i.wrapping_add(1);
                if t.tx.send((stream, info)).is_err() {
                    // Cannot happen while `t.rx` lives (it keeps the channel connected); if it
                    // did, the connection is gone and must still be counted.
                    shared.finished();
                    return;
                }
                // Pairs with the fence in `SessionMain::run`: either the thread sees the
                // connection before it sleeps, or we see it parked and wake it (Dekker's
                // handshake). The same pairing covers a thread that dies meanwhile: either its
                // last sweep of the channel finds the connection, or we see it dead here.
                fence(Ordering::SeqCst);
                if t.dead.load(Ordering::SeqCst) {
                    while t.rx.try_recv().is_ok() {
                        shared.finished();
                    }
                } else if t.parked.swap(false, Ordering::SeqCst) {
                    let _ = t.waker.wake();
                }
            }
            Pool::Blocking { tx, shared, .. } => {
                // Every handler thread gone (each outlives a panicking handler, so only after
                // `shutdown`): the client is closed and counted out.
                if tx
                    .as_ref()
                    .is_none_or(|tx| tx.send((stream, info)).is_err())
                {
                    shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    shared.finished();
                }
            }
        }
    }

    /// A readiness event of the serve loop's `Poll`: true when it was an inline session's.
    pub(crate) fn on_event(&mut self, token: Token) -> bool {
        match self {
            Pool::Inline { set, .. } => set.on_event(token),
            _ => false,
        }
    }

    /// Runs the inline sessions that are ready or due. Call without the worker's state lock:
    /// a session may call `Worker::send`.
    pub(crate) fn run_inline(&mut self, now: Instant, registry: &Registry) {
        if let Pool::Inline { set, .. } = self {
            set.run(now, registry);
        }
    }

    /// When an inline session next wants to run, for the serve loop's poll timeout.
    pub(crate) fn next_wake(&mut self) -> Option<Instant> {
        match self {
            Pool::Inline { set, .. } => set.next_wake(),
            _ => None,
        }
    }

    /// Tells every session to finish up.
    pub(crate) fn drain(&mut self) {
        match self {
            Pool::Inline { set, shared } => {
                shared.draining.store(true, Ordering::SeqCst);
                set.drain();
            }
            Pool::Sessions {
                threads, shared, ..
            } => {
                shared.draining.store(true, Ordering::SeqCst);
                for t in threads {
                    let _ = t.waker.wake();
                }
            }
            Pool::Blocking { shared, .. } => shared.draining.store(true, Ordering::SeqCst),
        }
    }

    /// Stops the threads. Sessions still open are closed. Blocking handlers cannot be
    /// interrupted: if some still run (drain timed out) their threads are left to finish
    /// detached, so the caller can exit on time.
    pub(crate) fn shutdown(&mut self) {
        match self {
            Pool::Inline { set, .. } => set.close_all(),
            Pool::Sessions {
                threads, shared, ..
            } => {
                shared.stop.store(true, Ordering::Release);
                for t in threads.iter() {
                    let _ = t.waker.wake();
                }
                for t in threads.iter_mut() {
                    if let Some(h) = t.handle.take() {
                        let _ = h.join();
                    }
                }
            }
            Pool::Blocking {
                tx,
                handles,
                shared,
                ..
            } => {
                tx.take();
                let handles = std::mem::take(handles);
                if shared.live.load(Ordering::Acquire) == 0 {
                    for h in handles {
                        let _ = h.join();
                    }
                }
            }
        }
    }
}

fn blocking_main(rx: Receiver<(Stream, ConnInfo)>, f: BlockingFn, shared: Arc<Shared>) {
    for (stream, info) in rx.iter() {
        shared.waiting.fetch_sub(1, Ordering::AcqRel);
        // The master may have accepted the socket non-blocking; a blocking handler must not
        // see spurious WouldBlock.
        if stream.set_nonblocking(false).is_ok() {
            // A panicking handler loses its connection, not the thread or the live count.
            let _ = catch_unwind(AssertUnwindSafe(|| f(stream, info)));
        }
        shared.finished();
    }
}

/// What one session thread owns besides its `Poll`.
struct SessionMain {
    index: usize,
    rx: Receiver<(Stream, ConnInfo)>,
    parked: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
    factory: Arc<dyn DynFactory>,
    shared: Arc<Shared>,
}

impl SessionMain {
    fn run(self, mut poll: Poll) {
        let SessionMain {
            index,
            rx,
            parked,
            dead,
            factory,
            shared,
        } = self;
        // Declared before the sessions, so it runs after they are gone, on every way out:
        // a stop, a failed poll, or a panic in a session factory or drain hook.
        let _last_sweep = LastSweep {
            rx: &rx,
            dead: &dead,
            shared: &shared,
        };
        let mut events = Events::with_capacity(256);
        let mut set = SessionSet::new(factory, shared.clone(), true);
        while !shared.stop.load(Ordering::Acquire) {
            let mut timeout = set
                .next_wake()
                .map(|t| t.saturating_duration_since(Instant::now()));
            parked.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !rx.is_empty() {
                // Handed over before we announced the nap: look at it now, not after a wake.
                parked.store(false, Ordering::SeqCst);
                timeout = Some(Duration::ZERO);
            }
            #[cfg(test)]
            let polled = if shared.fail_poll_of.load(Ordering::SeqCst) == index + 1 {
                Err(io::Error::other("injected poll failure"))
            } else {
                poll.poll(&mut events, timeout)
            };
            #[cfg(not(test))]
            let polled = poll.poll(&mut events, timeout);
            parked.store(false, Ordering::SeqCst);
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("cluster-worker: session thread {index} stops: poll failed: {e}");
                break;
            }
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            for ev in events.iter() {
                // The waker's token is not a session token: it only ends the poll.
                set.on_event(ev.token());
            }
            while let Ok((stream, info)) = rx.try_recv() {
                set.add(stream, &info);
            }
            if shared.draining.load(Ordering::Acquire) {
                set.drain();
            }
            set.run(Instant::now(), poll.registry());
        }
        set.close_all();
    }
}

/// Marks a session thread dead when it ends, then closes and counts what is still queued for
/// it, so a drain does not wait for connections nobody runs. `Pool::dispatch` pairs with this:
/// either this sweep finds a connection sent meanwhile, or the sender sees `dead` and sweeps.
struct LastSweep<'a> {
    rx: &'a Receiver<(Stream, ConnInfo)>,
    dead: &'a AtomicBool,
    shared: &'a Shared,
}

impl Drop for LastSweep<'_> {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while self.rx.try_recv().is_ok() {
            self.shared.finished();
        }
    }
}

impl Drop for Pool {
    /// An early error return from `serve` must not leave handler threads running with the
    /// clients they hold; `shutdown` is idempotent, so the normal path pays nothing twice.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;

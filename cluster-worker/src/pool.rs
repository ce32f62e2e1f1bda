//! The threads that run connection handlers: event-driven session threads (each with its own
//! mio `Poll`) or a pool of blocking handler threads fed through a bounded queue.

use std::collections::HashMap;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::handler::{Conn, ConnInfo, Next, Session};
use crate::serve::{BlockingFn, DynFactory, HandlerKind};
use crate::stream::Stream;

/// Counters and flags shared by the serve loop and the handler threads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Connections taken and not yet finished (queued, running or idle in a session).
    pub(crate) live: AtomicUsize,
    pub(crate) draining: AtomicBool,
    stop: AtomicBool,
    loop_waker: Arc<Waker>,
}

impl Shared {
    pub(crate) fn new(loop_waker: Arc<Waker>) -> Shared {
        Shared {
            live: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            loop_waker,
        }
    }

    fn finished(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        // Only a draining loop waits for the count to reach zero.
        if self.draining.load(Ordering::Acquire) {
            let _ = self.loop_waker.wake();
        }
    }
}

const SESSION_WAKE: Token = Token(0);

#[derive(Debug)]
pub(crate) struct SessionThread {
    tx: Sender<(Stream, ConnInfo)>,
    waker: Arc<Waker>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Debug)]
pub(crate) enum Pool {
    Sessions {
        threads: Vec<SessionThread>,
        next: usize,
        shared: Arc<Shared>,
    },
    Blocking {
        tx: Option<Sender<(Stream, ConnInfo)>>,
        handles: Vec<JoinHandle<()>>,
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
        let threads = threads.max(1);
        match kind {
            HandlerKind::Sessions(factory) => {
                let mut out = Vec::with_capacity(threads);
                for i in 0..threads {
                    let poll = Poll::new()?;
                    let waker = Arc::new(Waker::new(poll.registry(), SESSION_WAKE)?);
                    let (tx, rx) = channel::unbounded();
                    let (f, sh) = (factory.clone(), shared.clone());
                    let handle = std::thread::Builder::new()
                        .name(format!("cluster-session-{i}"))
                        .spawn(move || session_main(poll, rx, f, sh))?;
                    out.push(SessionThread {
                        tx,
                        waker,
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
                let (tx, rx) = channel::bounded::<(Stream, ConnInfo)>(queue.max(1));
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
                    shared,
                })
            }
        }
    }

    /// False while the blocking queue is full: the connection would have to wait for a
    /// handler, and another worker may take it sooner.
    pub(crate) fn can_take(&self) -> bool {
        match self {
            Pool::Sessions { .. } => true,
            Pool::Blocking { tx, .. } => tx.as_ref().is_some_and(|t| !t.is_full()),
        }
    }

    /// Hands a taken connection to a handler thread.
    pub(crate) fn dispatch(&mut self, stream: Stream, info: ConnInfo) {
        match self {
            Pool::Sessions {
                threads,
                next,
                shared,
            } => {
                let Some(t) = threads.get(*next % threads.len().max(1)) else {
                    return;
                };
                *next = next.wrapping_add(1);
                shared.live.fetch_add(1, Ordering::AcqRel);
                if t.tx.send((stream, info)).is_err() {
                    shared.finished();
                    return;
                }
                let _ = t.waker.wake();
            }
            Pool::Blocking { tx, shared, .. } => {
                shared.live.fetch_add(1, Ordering::AcqRel);
                let Some(tx) = tx else {
                    shared.finished();
                    return;
                };
                match tx.try_send((stream, info)) {
                    Ok(()) => {}
                    // Callers check `can_take` first and are the only producer, so this is
                    // a handler thread gone (panicked past catch_unwind): drop the client.
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => shared.finished(),
                }
            }
        }
    }

    /// Tells every session to finish up.
    pub(crate) fn drain(&self) {
        match self {
            Pool::Sessions {
                threads, shared, ..
            } => {
                shared.draining.store(true, Ordering::Release);
                for t in threads {
                    let _ = t.waker.wake();
                }
            }
            Pool::Blocking { shared, .. } => shared.draining.store(true, Ordering::Release),
        }
    }

    /// Stops the threads. Sessions still open are closed. Blocking handlers cannot be
    /// interrupted: if some still run (drain timed out) their threads are left to finish
    /// detached, so the caller can exit on time.
    pub(crate) fn shutdown(self) {
        match self {
            Pool::Sessions {
                mut threads,
                shared,
                ..
            } => {
                shared.stop.store(true, Ordering::Release);
                for t in &threads {
                    let _ = t.waker.wake();
                }
                for t in &mut threads {
                    if let Some(h) = t.handle.take() {
                        let _ = h.join();
                    }
                }
            }
            Pool::Blocking {
                tx,
                handles,
                shared,
            } => {
                drop(tx);
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
        // The master may have accepted the socket non-blocking; a blocking handler must not
        // see spurious WouldBlock.
        if stream.set_nonblocking(false).is_ok() {
            // A panicking handler loses its connection, not the thread or the live count.
            let _ = catch_unwind(AssertUnwindSafe(|| f(stream, info)));
        }
        shared.finished();
    }
}

struct Entry {
    conn: Conn,
    session: Box<dyn Session>,
    wake_at: Option<Instant>,
}

fn session_main(
    mut poll: Poll,
    rx: Receiver<(Stream, ConnInfo)>,
    factory: Arc<dyn DynFactory>,
    shared: Arc<Shared>,
) {
    let mut events = Events::with_capacity(256);
    let mut sessions: HashMap<usize, Entry> = HashMap::new();
    let mut next_token = 1usize;
    let mut drained = false;
    let mut ready: Vec<usize> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let timeout = sessions
            .values()
            .filter_map(|e| e.wake_at)
            .min()
            .map(|t| t.saturating_duration_since(now));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("cluster-worker: session thread poll failed: {e}");
            break;
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        ready.clear();
        ready.extend(
            events
                .iter()
                .map(|e| e.token().0)
                .filter(|&t| t != SESSION_WAKE.0),
        );
        while let Ok((stream, info)) = rx.try_recv() {
            let mut conn = match stream.into_conn() {
                Ok(c) => c,
                Err(_) => {
                    shared.finished();
                    continue;
                }
            };
            let id = next_token;
            next_token = next_token.wrapping_add(1).max(1);
            if poll
                .registry()
                .register(
                    &mut conn,
                    Token(id),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                shared.finished();
                continue;
            }
            let mut session = factory.make(&info);
            if drained {
                session.on_drain();
            }
            sessions.insert(
                id,
                Entry {
                    conn,
                    session,
                    wake_at: None,
                },
            );
            // The client may have written before registration; give the session a first go.
            ready.push(id);
        }
        if !drained && shared.draining.load(Ordering::Acquire) {
            drained = true;
            for e in sessions.values_mut() {
                e.session.on_drain();
            }
            ready.extend(sessions.keys().copied());
        }
        let now = Instant::now();
        ready.extend(
            sessions
                .iter()
                .filter(|(_, e)| e.wake_at.is_some_and(|t| t <= now))
                .map(|(id, _)| *id),
        );
        ready.sort_unstable();
        ready.dedup();
        for &id in &ready {
            let Some(e) = sessions.get_mut(&id) else {
                continue;
            };
            let r = catch_unwind(AssertUnwindSafe(|| e.session.on_ready(&mut e.conn, now)));
            match r {
                Ok(Ok(Next::Continue)) => e.wake_at = None,
                Ok(Ok(Next::WakeAt(t))) => e.wake_at = Some(t),
                Ok(Ok(Next::Close) | Err(_)) | Err(_) => {
                    if let Some(mut e) = sessions.remove(&id) {
                        let _ = poll.registry().deregister(&mut e.conn);
                    }
                    shared.finished();
                }
            }
        }
    }
    for _ in sessions.drain() {
        shared.finished();
    }
}

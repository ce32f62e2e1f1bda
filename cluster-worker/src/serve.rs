//! The serve loop: one mio thread owning the channel (while it runs) and the listening
//! sockets, feeding the handlers (see the crate docs' theory of operation).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_core::{BoundAddr, ServerId};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use parking_lot::Mutex;

use crate::handler::{ConnInfo, Handler, HandlerKind};
use crate::link::{DisconnectBy, Link, State, Stop, Taker};
use crate::listener::{Listener, Sock};
use crate::pool::Pool;
use crate::shared::Shared;
use crate::stream::Stream;
use crate::sys;

/// A trigger that makes a running serve drain and return [`ServeOutcome::Stopped`]; the way
/// to stop a standalone server (a worker under a master uses [`Worker::disconnect`](crate::Worker::disconnect)).
#[derive(Clone, Default)]
pub struct Shutdown(Arc<ShutdownInner>);

#[derive(Default)]
struct ShutdownInner {
    flag: AtomicBool,
    waker: Mutex<Option<Arc<Waker>>>,
}

impl Shutdown {
    /// A trigger not yet pulled.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Pulls the trigger; idempotent, callable from any thread.
    pub fn trigger(&self) {
        self.0.flag.store(true, Ordering::Release);
        if let Some(w) = &*self.0.waker.lock() {
            let _ = w.wake();
        }
    }

    /// True once triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    fn attach(&self, waker: Option<Arc<Waker>>) {
        *self.0.waker.lock() = waker;
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Shutdown")
            .field(&self.is_triggered())
            .finish()
    }
}

type OnMessage = Arc<dyn Fn(Vec<u8>) + Send + Sync + 'static>;

/// How [`Worker::serve`](crate::Worker::serve) runs. Build with the chained setters from [`ServeConfig::new`].
#[derive(Clone)]
pub struct ServeConfig {
    threads: Option<usize>,
    max_connections: Option<usize>,
    queue: usize,
    drain_timeout: Duration,
    on_message: Option<OnMessage>,
    shutdown: Option<Shutdown>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            threads: None,
            max_connections: None,
            queue: 64,
            drain_timeout: Duration::from_secs(30),
            on_message: None,
            shutdown: None,
        }
    }
}

impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeConfig")
            .field("threads", &self.threads)
            .field("max_connections", &self.max_connections)
            .field("queue", &self.queue)
            .field("drain_timeout", &self.drain_timeout)
            .field("on_message", &self.on_message.as_ref().map(|_| "Fn"))
            .field("shutdown", &self.shutdown)
            .finish()
    }
}

impl ServeConfig {
    /// The defaults: sessions inline under a master or on a machine with at most 2 CPUs,
    /// else one session thread per CPU (see [`threads`](Self::threads)); 4 blocking threads
    /// per CPU; no connection limit, a queue of 64, a 30 s drain.
    pub fn new() -> Self {
        Self::default()
    }

    /// For [`Handler::sessions`]: `0` runs the sessions inline, on the serve loop's own thread
    /// and `Poll` (no hand-over between threads, no wake-up per connection); `n > 0` runs them
    /// on `n` session threads, each with its own `Poll`, fed by the loop. For
    /// [`Handler::blocking`]: the pool's thread count (`0` keeps the default).
    ///
    /// By default sessions run inline under a master, which runs one worker per CPU as Node
    /// does (a second thread per worker only adds a thread hop and a context switch per
    /// connection), and standalone when at most 2 CPUs are available (there the loop and one
    /// session thread compete for the same cores). Otherwise one session thread per CPU.
    ///
    /// Inline, a session's `on_ready` delays everything else the loop does, answering the
    /// master's hand-offs included: sessions must not block (the [`Session`](crate::Session) contract).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// Connections taken at once; beyond it hand-offs are refused with `MaxConnections` and
    /// shared listeners leave connections in the kernel backlog.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// The blocking pool's queue of connections waiting for a thread. When it is full the
    /// worker refuses hand-offs (`MaxConnections`) rather than hold them.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// How long a drain waits for open connections before closing them.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Called on the serve thread for each user message from the master.
    pub fn on_message<F>(mut self, f: F) -> Self
    where
        F: Fn(Vec<u8>) + Send + Sync + 'static,
    {
        self.on_message = Some(Arc::new(f));
        self
    }

    /// A trigger that stops the serve (drain, then return [`ServeOutcome::Stopped`]).
    pub fn shutdown(mut self, s: &Shutdown) -> Self {
        self.shutdown = Some(s.clone());
        self
    }

    /// Handler threads to start; 0 means sessions inline.
    fn thread_count(&self, blocking: bool, under_master: bool) -> usize {
        let cpus = || std::thread::available_parallelism().map_or(1, |n| n.get());
        match (blocking, self.threads) {
            (true, Some(n)) if n > 0 => n,
            (true, _) => (cpus() * 4).max(4),
            (false, Some(n)) => n,
            (false, None) if under_master => 0,
            (false, None) => {
                let n = cpus();
                if n <= 2 { 0 } else { n }
            }
        }
    }
}

/// Why a serve returned. Every case means "exit now"; a worker binary exits 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeOutcome {
    /// The master sent `Disconnect`.
    MasterDisconnect,
    /// Worker code called [`Worker::disconnect`](crate::Worker::disconnect).
    WorkerDisconnect,
    /// The channel to the master closed or broke: the master is gone.
    MasterGone,
    /// The [`Shutdown`] trigger was pulled.
    Stopped,
}

const CHANNEL: Token = Token(0);
const WAKE: Token = Token(1);
const FIRST_LISTENER: usize = 2;
/// How long to leave connections in the backlog when at capacity; the next try is cheap.
const FULL_RETRY: Duration = Duration::from_millis(10);
/// Back-off after `EMFILE`-like accept errors (hazard C1), as asyncio does.
const EXHAUSTED_RETRY: Duration = Duration::from_millis(100);
/// How long the final flush of the channel may take.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

struct Local {
    listener: Listener,
    needs_accept: bool,
}

/// A serve's hold on the link: the round-robin servers it took over from its listeners and
/// its registration as the channel's reader. Both end (`Close` sent, inboxes dropped, channel
/// deregistered) when the serve ends, however it ends.
struct Served<'a> {
    link: &'a Link,
    servers: Vec<ServerId>,
    registry: Registry,
}

impl Served<'_> {
    /// Hands-offs for these servers are refused from now on; what was answered stays parked
    /// for the loop to take.
    fn close(&self) {
        let mut st = self.link.lock();
        for &s in &self.servers {
            st.close_server(s);
        }
    }

    /// Takes every stream whose answer is written.
    fn take_ready(&self, st: &mut State, pool: &Pool, into: &mut Vec<(Stream, ConnInfo)>) {
        for &s in &self.servers {
            while let Some(got) = st.take(s) {
                pool.count_in();
                into.push(got);
            }
        }
    }

    /// True while answered streams are parked, their answers not written yet.
    fn any_parked(&self) -> bool {
        let st = self.link.lock();
        self.servers.iter().any(|&s| st.has_parked(s))
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        let mut st = self.link.lock();
        for &s in &self.servers {
            st.close_server(s);
            st.close_inbox(s);
        }
        st.detach_serve_loop(&self.registry);
    }
}

pub(crate) fn run(
    link: Option<&Link>,
    listeners: Vec<Listener>,
    handler: Handler,
    cfg: ServeConfig,
) -> io::Result<ServeOutcome> {
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let shared = Arc::new(Shared::new(waker.clone()));
    let blocking = matches!(handler.0, HandlerKind::Blocking(_));
    let mut pool = Pool::start(
        &handler.0,
        cfg.thread_count(blocking, link.is_some()),
        cfg.queue,
        shared.clone(),
    )?;
    let room = pool.room(cfg.max_connections);
    if let Some(s) = &cfg.shutdown {
        s.attach(Some(waker.clone()));
    }

    let mut served = match link {
        Some(link) => Some(Served {
            link,
            servers: Vec::new(),
            registry: poll.registry().try_clone()?,
        }),
        None => None,
    };
    let mut rr: Vec<(ServerId, BoundAddr)> = Vec::new();
    let mut locals: Vec<Option<Local>> = Vec::new();
    for l in listeners {
        if let (Sock::RoundRobin { .. }, Some(served)) = (&l.sock, &mut served) {
            // Closed by `served` from now on, whatever happens.
            if let Some((server, addr)) = l.hand_to_serve() {
                served.servers.push(server);
                rr.push((server, addr));
            }
            continue;
        }
        let token = Token(FIRST_LISTENER + locals.len());
        let mut l = l;
        mio::event::Source::register(&mut l, poll.registry(), token, Interest::READABLE)?;
        // Connections may already wait: their edge came before registration.
        locals.push(Some(Local {
            listener: l,
            needs_accept: true,
        }));
    }
    if let Some(link) = link {
        let mut st = link.lock();
        st.attach_serve_loop(poll.registry(), CHANNEL, waker.clone())?;
        for (server, addr) in &rr {
            st.start_taking(*server, addr, Taker::ServeLoop, room.clone())?;
        }
    }

    let mut events = Events::with_capacity(128);
    let mut outcome: Option<ServeOutcome> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut pause_until: Option<Instant> = None;
    let mut taken: Vec<(Stream, ConnInfo)> = Vec::new();

    // Whether the channel (or a thread that read it for us, or a disconnect or shutdown) may
    // have something for this pass: with sessions inline most wake-ups are client events, and
    // looking at the channel costs a recvmsg that would only say EAGAIN.
    // Only a worker has a channel: alone, a pending "look at the channel" would make every
    // poll return at once (a busy loop).
    let mut chan_event = link.is_some();
    loop {
        // The channel: reading it answers the hand-offs (before any client byte is read) and
        // writes the answers; streams whose answers are written go to their handlers.
        if let (Some(link), Some(served)) = (link, &served)
            && std::mem::take(&mut chan_event)
        {
            let (user, stop) = {
                let mut st = link.lock();
                st.pump();
                // Frames left behind bring no new edge: come back for them after this pass.
                chan_event = st.has_unread();
                served.take_ready(&mut st, &pool, &mut taken);
                (st.take_user(), st.stop())
            };
            for (stream, info) in taken.drain(..) {
                pool.dispatch(stream, info);
            }
            if let Some(cb) = &cfg.on_message {
                for p in user {
                    cb(p);
                }
            }
            if outcome.is_none() {
                outcome = stop.map(|s| match s {
                    Stop::Disconnect(DisconnectBy::Master) => ServeOutcome::MasterDisconnect,
                    Stop::Disconnect(DisconnectBy::Worker) => ServeOutcome::WorkerDisconnect,
                    Stop::MasterGone => ServeOutcome::MasterGone,
                });
            }
        }
        if outcome.is_none() && cfg.shutdown.as_ref().is_some_and(Shutdown::is_triggered) {
            if let Some(link) = link {
                // Leaving on our own: tell the master it is not a crash.
                let _ = link.disconnect();
            }
            outcome = Some(ServeOutcome::Stopped);
        }

        if outcome.is_some() && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + cfg.drain_timeout);
            // No more accepting, so an accept back-off must not keep waking the loop.
            pause_until = None;
            if let (Some(link), Some(served)) = (link, &served) {
                link.lock().start_draining();
                served.close();
            }
            for slot in locals.iter_mut() {
                if let Some(local) = slot.take()
                    && let Some(fd) = local.listener.sock.raw_fd()
                {
                    let _ = poll.registry().deregister(&mut SourceFd(&fd));
                }
            }
            pool.drain();
        }

        // Real listening sockets: accept until WouldBlock (edge-triggered), unless full.
        let now = Instant::now();
        if outcome.is_none() && pause_until.is_none_or(|t| now >= t) {
            pause_until = None;
            'listeners: for local in locals.iter_mut().flatten() {
                while local.needs_accept {
                    if !room(0) {
                        pause_until = Some(now + FULL_RETRY);
                        break 'listeners;
                    }
                    match local.listener.sock.accept_local(local.listener.server()) {
                        Ok((stream, info)) => {
                            pool.count_in();
                            pool.dispatch(stream, info);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            local.needs_accept = false
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                            ) => {}
                        Err(e) => {
                            if !sys::is_resource_exhaustion(&e) {
                                eprintln!("cluster-worker: accept failed: {e}");
                            }
                            pause_until = Some(now + EXHAUSTED_RETRY);
                            break 'listeners;
                        }
                    }
                }
            }
        }

        // Inline sessions: the new ones get their first go, then those with events or due.
        pool.run_inline(Instant::now(), poll.registry());

        if let Some(deadline) = drain_deadline {
            // SeqCst pairs with the handler side's decrement-then-check of `draining`: with
            // weaker orderings both sides may read the old value and the wake-up is lost.
            let live = shared.live.load(Ordering::SeqCst);
            // Streams answered `Accepted` whose answers are still being written are ours to
            // serve: the master has closed or will close its copy.
            if live == 0 && !served.as_ref().is_some_and(Served::any_parked) {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!("cluster-worker: drain timed out with {live} connections open");
                break;
            }
        }

        if let Some(link) = link
            && !link
                .lock()
                .watch_writability_while_output_waits(poll.registry())
        {
            // The channel failed: the next pass finds the master gone.
            chan_event = true;
        }
        let wake_at = [pause_until, drain_deadline, pool.next_wake()]
            .into_iter()
            .flatten()
            .min();
        let timeout = if chan_event {
            Some(Duration::ZERO)
        } else {
            wake_at.map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Err(e) = poll.poll(&mut events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(e);
        }
        for ev in events.iter() {
            if pool.on_event(ev.token()) {
                continue;
            }
            if ev.token() == CHANNEL || ev.token() == WAKE {
                chan_event = true;
            }
            if let Some(i) = ev.token().0.checked_sub(FIRST_LISTENER)
                && let Some(Some(local)) = locals.get_mut(i)
            {
                local.needs_accept = true;
            }
        }
    }

    pool.shutdown();
    if let Some(s) = &cfg.shutdown {
        s.attach(None);
    }
    drop(served);
    if let Some(link) = link {
        link.lock().close_channel(FINAL_FLUSH);
    }
    Ok(outcome.unwrap_or(ServeOutcome::Stopped))
}

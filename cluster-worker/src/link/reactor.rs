//! The channel on a tokio runtime's reactor (feature `tokio`).
//!
//! **Who reads.** One task spawned on the runtime, the *channel task*, holds an [`AsyncFd`]
//! over a dup of the channel socket and, whenever the reactor reports it readable (or,
//! through a second dup registered only while answers wait to go out, writable), calls
//! [`State::pump`] under the lock: every hand-off is answered there, by the crate's one
//! answering function, as it arrives. Tokio listeners take streams only from their inboxes
//! ([`State::take_answered`]), so nothing reaches the application before its `Accepted` is
//! written, and a slow handler or a slow accept loop delays no answer: the task runs whenever
//! the runtime has a moment, never waiting on the application. Their inboxes are
//! [`Taker::Reactor`], so no answerer thread starts for them. Other readers (a blocking call,
//! an answerer started for a blocking listener) may still pump: the lock makes every read
//! exclusive, and the release wakes the futures registered here, so whoever reads, the
//! waiting futures hear of it.
//!
//! **Waking.** Futures waiting on the state (an accept, a listen's reply, `disconnected`, a
//! user message) register their waker in [`Wakers`] under the lock;
//! [`Locked`](super::Locked)'s release wakes them all when something changed, and they look
//! again. The channel task is woken the same way when output is left queued (a `send` from
//! the application met a full socket), so it starts watching for writability.

use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cluster_core::ListenSpec;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{Asked, Grant, Link, State, Taker};

/// The wakers of everything on a runtime that waits for the state (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    waiters: Vec<Waker>,
    /// Futures that wait only for the worker to stop: woken by changes once it stops, not by
    /// every hand-off before.
    stop_waiters: Vec<Waker>,
    /// The channel task's waker, while it runs.
    channel_task: Option<Waker>,
    task_running: bool,
    /// Streams handed to axum that it has not read from yet (see [`State::hand_to_server`]).
    unread_handed: usize,
}

impl Wakers {
    /// Wakes every waiting future (they register again if they still wait), and the channel
    /// task when it has output to write.
    pub(super) fn wake(&mut self, output_pending: bool, stopping: bool) {
        for waker in self.waiters.drain(..) {
            waker.wake();
        }
        if stopping {
            for waker in self.stop_waiters.drain(..) {
                waker.wake();
            }
        }
        if output_pending && let Some(task) = &self.channel_task {
            task.wake_by_ref();
        }
    }

    fn register(list: &mut Vec<Waker>, waker: &Waker) {
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }
}

impl State {
    /// Has `cx` woken at the next change.
    pub(crate) fn wake_on_change(&mut self, cx: &Context<'_>) {
        Wakers::register(&mut self.reactor.waiters, cx.waker());
    }

    /// Has `cx` woken at the next change once the worker stops taking (see
    /// [`State::stopping`]).
    pub(crate) fn wake_on_stop(&mut self, cx: &Context<'_>) {
        Wakers::register(&mut self.reactor.stop_waiters, cx.waker());
    }

    /// True once the worker stops taking connections: disconnecting, draining, or the master
    /// is gone.
    pub(crate) fn stopping(&self) -> bool {
        self.stop().is_some() || self.draining
    }

    /// True once the worker stops taking, every stream answered for a tokio listener has
    /// been taken, and the server each was handed to has read from it: then nothing the
    /// master counts on is left for the application to serve, and a graceful shutdown cancels
    /// no request that had arrived.
    pub(crate) fn stopped_and_emptied(&self) -> bool {
        self.stopping()
            && self.reactor.unread_handed == 0
            && !self
                .inboxes
                .values()
                .any(|i| i.taker == Taker::Reactor && !i.parked.is_empty())
    }

    /// Counts a stream about to be handed to a server that cancels the connections it has not
    /// read from when its graceful shutdown starts (hyper's auto connection, under axum):
    /// `disconnected` waits for [`State::first_read`] of each. Called under the same lock as
    /// the take, so no `disconnected` can resolve between them.
    pub(crate) fn hand_to_server(&mut self) {
        self.reactor.unread_handed += 1;
    }

    /// The server read from (or dropped) a stream counted by [`State::hand_to_server`].
    pub(crate) fn first_read(&mut self) {
        self.reactor.unread_handed = self.reactor.unread_handed.saturating_sub(1);
        if self.stopping() {
            self.changed = true;
        }
    }

    /// False when no channel task runs: none was started yet, or the runtime that ran it was
    /// dropped (and its tasks with it).
    pub(crate) fn channel_task_running(&self) -> bool {
        self.reactor.task_running
    }

    /// After a tokio listener took a stream: once the worker stops, each take may be the
    /// last one `disconnected` waits for, so it counts as a change.
    pub(crate) fn note_taken(&mut self) {
        if self.stopping() {
            self.changed = true;
        }
    }

    /// The oldest user message; `None` while there is none.
    pub(crate) fn next_user(&mut self) -> Option<Vec<u8>> {
        self.user.pop_front()
    }

    /// True when no more can arrive: the channel is closed or failed.
    pub(crate) fn channel_closed(&self) -> bool {
        self.gone || self.chan.is_none()
    }
}

impl Link {
    /// Starts the channel task on the current runtime unless it runs. Fails outside a
    /// runtime.
    pub(crate) fn ensure_channel_task(self: &Arc<Self>) -> io::Result<()> {
        let mut st = self.lock();
        if st.reactor.task_running || st.channel_closed() {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let fd = self.poll_fd.try_clone()?;
        // Dup'd now, while it costs nothing to fail: the task must not need a new fd later,
        // when output waits and the process may be out of them.
        let writer = Writer::Idle(self.poll_fd.try_clone()?);
        let channel = {
            // AsyncFd registers with the runtime that is current.
            let _entered = runtime.enter();
            with_drivers(|| crate::sys::on_reactor(fd, Interest::READABLE))?
        };
        st.reactor.task_running = true;
        drop(st);
        runtime.spawn(channel_task(Arc::downgrade(self), channel, writer));
        Ok(())
    }

    /// [`Link::query`] without blocking: the channel task routes the reply, this future
    /// waits for it (at most the listen timeout).
    pub(crate) async fn query_async(self: &Arc<Self>, spec: &ListenSpec) -> io::Result<Grant> {
        self.ensure_channel_task()?;
        let asked = self.send_query(spec)?;
        let mut pending = PendingQuery {
            link: self,
            spec,
            asked: &asked,
            settled: false,
        };
        let reply = poll_fn(|cx| {
            let mut st = self.lock();
            if let Some(r) = st.replies.remove(&asked.seq) {
                return Poll::Ready(Ok(r));
            }
            if st.channel_closed() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the master is gone",
                )));
            }
            st.wake_on_change(cx);
            Poll::Pending
        });
        let got = match tokio::time::timeout(asked.timeout, reply).await {
            Ok(got) => got,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from the master",
            )),
        };
        pending.settled = true;
        self.finish_query(spec, &asked, got)
    }
}

/// Runs `register`, which needs the current runtime's IO and time drivers. Tokio panics when
/// the runtime was built without one (`Builder::new_current_thread().build()` without
/// `enable_all()`), and tokio has no way to ask first: the panic becomes an error here, so a
/// `bind` reports it rather than taking the application's thread down. (The panic hook still
/// prints tokio's message; with `panic = "abort"` the process aborts, as it would in tokio.)
pub(crate) fn with_drivers<T>(register: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(register)) {
        Ok(registered) => registered,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the runtime refused".to_owned());
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cluster_worker::tokio needs the runtime's IO and time drivers \
                     (Builder::enable_all(); #[tokio::main] has both): {why}"
                ),
            ))
        }
    }
}

/// Fails unless the current runtime has the time driver (listen timeouts, accept back-offs);
/// see [`with_drivers`].
pub(crate) fn check_time_driver() -> io::Result<()> {
    with_drivers(|| {
        drop(tokio::time::sleep(Duration::ZERO));
        Ok(())
    })
}

/// A listen whose future may be dropped before the reply: the late grant is then closed,
/// as after a timeout.
struct PendingQuery<'a> {
    link: &'a Link,
    spec: &'a ListenSpec,
    asked: &'a Asked,
    settled: bool,
}

impl Drop for PendingQuery<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut st = self.link.lock();
        st.asked.remove(&self.asked.seq);
        st.abandoned.insert(self.asked.seq);
        if let Some(reply) = st.replies.remove(&self.asked.seq) {
            // Routed as a late reply: a grant is closed at once, and its `Close` sent now
            // rather than behind the next frame (the runtime may be going away).
            st.route(reply);
            st.flush();
            // The `Close` may wait for room, and whoever watches for room must hear of it.
            st.note_output_waiting();
        }
        st.release_index(&self.spec.addr, self.asked.index);
    }
}

/// The channel task's watch on writability: a second dup of the channel, on the reactor only
/// while answers wait for room. The first one watches readability alone, so the master reading
/// our answers does not wake the runtime each time (the kernel reports room after every read).
enum Writer {
    Idle(OwnedFd),
    Watching(AsyncFd<OwnedFd>),
}

impl Writer {
    /// The watch `output_waits` calls for: registered while output waits, deregistered (the
    /// fd kept for next time) once it is written.
    fn watching(self, output_waits: bool) -> io::Result<Writer> {
        Ok(match (self, output_waits) {
            (Writer::Idle(fd), true) => {
                Writer::Watching(crate::sys::on_reactor(fd, Interest::WRITABLE)?)
            }
            (Writer::Watching(fd), false) => Writer::Idle(fd.into_inner()),
            (same, _) => same,
        })
    }
}

/// Clears the task's mark in the state however it ends (the runtime may drop it), so a
/// later use starts a new one.
struct TaskMark(Weak<Link>);

impl Drop for TaskMark {
    fn drop(&mut self) {
        if let Some(link) = self.0.upgrade() {
            let mut st = link.lock();
            st.reactor.task_running = false;
            st.reactor.channel_task = None;
        }
    }
}

/// The channel task (see the module docs): reads and answers as the reactor reports the
/// channel ready, until the channel closes or the link is dropped.
async fn channel_task(link: Weak<Link>, channel: AsyncFd<OwnedFd>, writer: Writer) {
    let _mark = TaskMark(link.clone());
    let mut writer = Some(writer);
    let failed = poll_fn(|cx| {
        let Some(link) = link.upgrade() else {
            return Poll::Ready(None);
        };
        // Readiness is cleared before reading, so whatever arrives after makes a new
        // edge; `pump` reads until the socket is empty.
        let readable = match channel.poll_read_ready(cx) {
            Poll::Ready(Ok(mut ready)) => {
                ready.clear_ready();
                true
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
            Poll::Pending => false,
        };
        let mut st = link.lock();
        let watched = match writer.take().map(|w| w.watching(st.has_pending_output())) {
            Some(Ok(w)) => w,
            Some(Err(e)) => return Poll::Ready(Some(e)),
            None => return Poll::Ready(None),
        };
        let writable = match &watched {
            Writer::Watching(fd) => match fd.poll_write_ready(cx) {
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    true
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
                Poll::Pending => false,
            },
            Writer::Idle(_) => false,
        };
        writer = Some(watched);
        // A pump capped at PUMP_FRAMES leaves frames no new readiness edge will announce.
        if !readable && !writable && !st.has_unread() {
            if !st
                .reactor
                .channel_task
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                st.reactor.channel_task = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        st.pump();
        if st.channel_closed() {
            return Poll::Ready(None);
        }
        // Yield before looking again: the master answers our answers at once with more
        // hand-offs, and a task that kept reading would fill the inboxes faster than the
        // accept loop (on the same runtime) empties them, refusing what it could serve.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    if let Some(e) = failed {
        eprintln!("cluster-worker: the channel task stops: {e}");
    }
}

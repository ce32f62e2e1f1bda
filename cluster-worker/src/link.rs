//! The worker's end of the channel to its master, shared by every thread that talks to it:
//! the serve loop, listeners, the answerer thread and [`crate::Worker`] handles.
//!
//! **Answering.** Hand-offs are answered by whoever reads the channel, as they arrive: every
//! frame goes through [`State::pump`], and each `NewConn` through the one answering function,
//! `State::answer`. A taken stream is parked in its server's *inbox*, a bounded queue, with its
//! `Accepted` queued on the channel; it can be taken out only once the channel has written
//! everything queued (the promotion at the end of `State::flush`). So no API (a serve loop, a
//! blocking `accept`, a caller's mio `Poll`, later an `AsyncFd`) can hand the application a
//! stream whose answer the master may not have yet, and a caller that takes streams slowly
//! never delays the answers: they depend only on the inbox's room.
//!
//! **Who reads.** A running serve loop reads on its channel events. Listeners the application
//! drives itself (blocking `accept`, `try_accept` from its own `Poll`) get an answerer thread,
//! which reads while such a listener is open. Blocking calls (`listen`'s wait for the grant)
//! read too, or wait on [`Link::lock`]'s condition variable when another thread reads.
//!
//! **Waking.** [`Locked`] notes whether anything arrived or became takeable under it; when it
//! is released it wakes the serve loop (unless it is the serve loop), the threads blocked in
//! [`Locked::wait`], and the readiness sockets of listeners registered in a caller's `Poll`.
//!
//! **On a tokio runtime** (feature `tokio`, [`reactor`]) a task on the runtime reads instead
//! of the answerer thread, woken by the reactor; futures waiting on the state register their
//! wakers, which [`Locked`] wakes on release like the others.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Weak};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use cluster_core::{
    BoundAddr, HandedConn, ListenAddr, ListenSpec, Message, Peer, RefuseReason, Seq, ServerGrant,
    ServerId, ServerReply, WorkerId,
};
use cluster_ipc::{Channel, Received};
use mio::{Interest, Registry, Token, Waker};
use parking_lot::{Condvar, Mutex, MutexGuard};
use rustc_hash::FxHashMap;

use crate::handler::ConnInfo;
use crate::stream::Stream;
use crate::sys;

#[cfg(feature = "tokio")]
pub(crate) mod reactor;

/// How long `listen` waits for the master's answer unless `set_listen_timeout` says otherwise.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blocking waiter sleeps before looking again; bounds how late a waiter notices
/// what a thread that reads the channel for it did not wake it for.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Fds kept free below `RLIMIT_NOFILE` for the worker's own needs (files, pipes, the accept
/// of a session's upstream...): a hand-off whose fd lands above the mark is refused. One read
/// installs a whole batch's fds before any is looked at, so the reserve also holds a full
/// batch: the kernel must never run out of numbers mid-batch (that truncates the fds and
/// drops the channel instead of refusing).
const FD_RESERVE: u64 = 32 + cluster_core::MAX_HANDOFF_BATCH as u64;
/// User messages kept for [`crate::Worker::take_messages`]; beyond it the oldest are dropped,
/// so a master that sends faster than the application takes cannot grow the worker without
/// bound.
pub const USER_QUEUE: usize = 1024;
/// Frames one [`State::pump`] reads at most: a master that floods the channel must not keep
/// one thread reading under the lock while the others wait for it.
pub(crate) const PUMP_FRAMES: usize = 1024;

/// Who asked for the disconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DisconnectBy {
    Master,
    Worker,
}

/// Why a serve must stop, as the channel tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Disconnect(DisconnectBy),
    MasterGone,
}

/// Whether an inbox may take one more connection, given how many are parked in all inboxes
/// (taken, not yet handed on). Called with the state locked, by whichever thread answers.
pub(crate) type Room = Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// Who takes an inbox's streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taker {
    /// A serve loop, which reads the channel itself.
    ServeLoop,
    /// The application, through a listener; needs the answerer thread.
    Application,
    /// A tokio listener: the runtime's channel task reads (see [`reactor`]), no thread.
    #[cfg(feature = "tokio")]
    Reactor,
}

struct Inbox {
    /// Taken streams, oldest first; `Accepted` was queued for each.
    parked: VecDeque<(Stream, ConnInfo)>,
    /// The first `ready` of `parked` have had their `Accepted` written.
    ready: usize,
    room: Room,
    taker: Taker,
    /// Written to whenever something changed, for a listener in a caller's mio `Poll`.
    signal: Option<UnixStream>,
}

#[derive(Debug)]
struct ServerEntry {
    addr: ListenAddr,
    index: u32,
    grant: ServerGrant,
    listening_sent: bool,
}

/// Everything the threads of a worker share about its channel (see the module docs). Its
/// fields are private: other modules go through its methods.
pub(crate) struct State {
    /// `None` once closed at the end of serve.
    chan: Option<Channel>,
    next_seq: u64,
    /// Fx: looked up per hand-off, with ids the master issues.
    servers: FxHashMap<ServerId, ServerEntry>,
    /// Indexes in use per address (open servers and queries in flight).
    indexes: HashMap<ListenAddr, BTreeSet<u32>>,
    replies: HashMap<Seq, Received>,
    /// Queries whose `listen` still waits: a reply to any other seq is nobody's.
    asked: HashSet<Seq>,
    /// Queries whose `listen` gave up waiting: a late grant is closed at once, so neither the
    /// worker nor the master keeps a server nobody listens on.
    abandoned: HashSet<Seq>,
    query_timeout: Duration,
    inboxes: FxHashMap<ServerId, Inbox>,
    /// Streams in all inboxes.
    parked: usize,
    user: VecDeque<Vec<u8>>,
    /// User messages dropped because `user` was full.
    user_dropped: u64,
    disconnect: Option<DisconnectBy>,
    /// Channel EOF or a protocol error: the master is gone for us.
    gone: bool,
    /// The master closed its end (EOF, `EPIPE`, reset): it has exited, or dropped us and
    /// re-queued what we had not answered; either way no answer of ours can reach it now.
    peer_closed: bool,
    /// Set by a serve loop that drains: refuse every hand-off with `Draining`.
    draining: bool,
    /// The serve loop that reads the channel, while a serve runs.
    serve_loop: Option<ServeLoop>,
    answerer_running: bool,
    /// Hand-offs whose fd number reaches this are refused with `FdLimit`.
    fd_mark: Option<u64>,
    /// Something arrived or became takeable since the last wake-up (see [`Locked`]).
    changed: bool,
    /// Futures waiting on the state, and the runtime's channel task.
    #[cfg(feature = "tokio")]
    reactor: reactor::Wakers,
    /// The last pump stopped at [`PUMP_FRAMES`]: frames may be left in the channel's buffer or
    /// the socket with no new readiness edge to announce them, so the reader pumps again.
    unread: bool,
    /// Stops the answerer thread as a failed wait would.
    #[cfg(test)]
    pub(crate) answerer_fails: bool,
}

/// The serve loop that reads the channel (see [`State::attach_serve_loop`]).
#[derive(Debug)]
struct ServeLoop {
    waker: Arc<Waker>,
    thread: ThreadId,
    token: Token,
    watching_writable: bool,
}

impl State {
    /// Reads the channel until `WouldBlock` (or [`PUMP_FRAMES`] frames: see
    /// [`has_unread`](Self::has_unread)), answering hand-offs as they come, then flushes the
    /// answers (one `sendmsg` for all of them). Returns true when anything arrived.
    pub(crate) fn pump(&mut self) -> bool {
        let mut any = false;
        let mut frames = 0;
        self.unread = false;
        while let Some(chan) = self.chan.as_mut() {
            if frames == PUMP_FRAMES {
                self.unread = true;
                break;
            }
            match chan.recv() {
                Ok(None) => break,
                Ok(Some(r)) => {
                    any = true;
                    frames += 1;
                    self.route(r);
                }
                Err(e) => {
                    if e.is_closed() {
                        self.peer_closed = true;
                    } else {
                        eprintln!("cluster-worker: channel to the master failed: {e}");
                    }
                    self.gone = true;
                    any = true;
                    break;
                }
            }
        }
        self.changed |= any;
        self.flush();
        any
    }

    fn route(&mut self, r: Received) {
        let Received { msg, fds } = r;
        match msg {
            Message::QueryServerReply { seq, reply } if self.abandoned.remove(&seq) => {
                // The fds (a shared socket) close here; the master forgets our registration.
                if let ServerReply::Granted { server, .. } = reply {
                    eprintln!(
                        "cluster-worker: the master granted {server:?} after listen() gave up; \
                         closing it"
                    );
                    self.queue(&Message::Close { server });
                }
            }
            Message::QueryServerReply { seq, reply } if !self.asked.contains(&seq) => {
                // Kept, it would hold its fds for ever; a grant would hold the master's server.
                eprintln!("cluster-worker: ignoring a reply to {seq:?}, which nobody asked");
                if let ServerReply::Granted { server, .. } = reply {
                    self.queue(&Message::Close { server });
                }
            }
            Message::QueryServerReply { seq, reply } => {
                self.replies.insert(
                    seq,
                    Received {
                        msg: Message::QueryServerReply { seq, reply },
                        fds,
                    },
                );
            }
            Message::NewConn { server, conns } => {
                // The channel checked that one fd came per connection, in the same order.
                let mut fds = fds.into_iter();
                for handed in conns {
                    self.answer(server, handed, fds.next());
                }
            }
            Message::Disconnect => {
                self.disconnect.get_or_insert(DisconnectBy::Master);
            }
            Message::User { payload } => {
                if self.user.len() >= USER_QUEUE {
                    self.user.pop_front();
                    self.user_dropped += 1;
                }
                self.user.push_back(payload);
            }
            other => {
                eprintln!(
                    "cluster-worker: ignoring unexpected {} from the master",
                    other.name()
                );
            }
        }
    }

    /// The one place a hand-off is answered, when it arrives: taken (parked in its server's
    /// inbox, `Accepted` queued) or refused (the fd closes here; the master kept its copy and
    /// re-routes it).
    fn answer(&mut self, server: ServerId, handed: HandedConn, fd: Option<OwnedFd>) {
        let HandedConn { conn, peer } = handed;
        let msg = match self.admit(server, fd, peer) {
            Ok(taken) => {
                if let Some(inbox) = self.inboxes.get_mut(&server) {
                    inbox.parked.push_back(taken);
                    self.parked += 1;
                }
                Message::Accepted { conn }
            }
            Err(reason) => Message::Refused { conn, reason },
        };
        self.queue(&msg);
    }

    fn admit(
        &self,
        server: ServerId,
        fd: Option<OwnedFd>,
        peer: Peer,
    ) -> Result<(Stream, ConnInfo), RefuseReason> {
        let fd = fd.ok_or(RefuseReason::FdLost)?;
        if self.draining || self.disconnect.is_some() {
            return Err(RefuseReason::Draining);
        }
        let rr_open = self
            .servers
            .get(&server)
            .is_some_and(|s| s.grant == ServerGrant::RoundRobin);
        let inbox = self
            .inboxes
            .get(&server)
            .filter(|_| rr_open)
            .ok_or(RefuseReason::ListenerClosed)?;
        let fd_number = u64::try_from(fd.as_raw_fd()).unwrap_or(0);
        if self.fd_mark.is_some_and(|mark| fd_number >= mark) {
            return Err(RefuseReason::FdLimit);
        }
        if !(inbox.room)(self.parked) {
            return Err(RefuseReason::MaxConnections);
        }
        // The master says what it accepted, and accepted it non-blocking: no `getpeername`,
        // no `FIONBIO` here.
        let (stream, peer) = match peer {
            Peer::Tcp(addr) => (Stream::Tcp(TcpStream::from(fd)), Some(addr)),
            Peer::Unix => (Stream::Unix(UnixStream::from(fd)), None),
        };
        let info = ConnInfo {
            server: Some(server),
            peer,
        };
        Ok((stream, info))
    }

    /// Sends a message, never blocking; output the socket does not take is flushed by the
    /// serve loop or the answerer (both watch for writability) or by the next blocking call.
    pub(crate) fn send(&mut self, msg: &Message) -> io::Result<()> {
        let Some(chan) = self.chan.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "channel to the master is closed",
            ));
        };
        let queued = chan.send(msg, &[]);
        if let Err(e) = queued {
            if e.is_closed() {
                self.peer_closed = true;
                self.gone = true;
                self.changed = true;
            }
            return Err(e.into());
        }
        self.flush();
        if self.gone {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "channel to the master failed",
            ));
        }
        if self.chan.as_ref().is_some_and(Channel::has_pending_output) {
            // The socket is full: only a writable edge will let the rest out.
            self.changed = true;
        }
        Ok(())
    }

    /// Queues an fd-less message for the next flush. A failure means the master is gone,
    /// which `flush` reports too.
    fn queue(&mut self, msg: &Message) {
        if let Some(chan) = self.chan.as_mut()
            && let Err(e) = chan.queue(msg)
        {
            if e.is_closed() {
                self.peer_closed = true;
                self.gone = true;
                self.changed = true;
            } else {
                eprintln!("cluster-worker: cannot queue {}: {e}", msg.name());
            }
        }
    }

    /// Writes what the socket takes; once nothing is left queued, every parked stream has had
    /// its answer written and becomes takeable.
    pub(crate) fn flush(&mut self) {
        // Any error but a full socket (which `flush` reports as Ok(false)) leaves answers the
        // master waits for unsent with no writable edge to retry on: treat the master as gone.
        if let Some(chan) = self.chan.as_mut()
            && let Err(e) = chan.flush()
        {
            if e.is_closed() {
                self.peer_closed = true;
            } else {
                eprintln!("cluster-worker: channel to the master failed: {e}");
            }
            self.gone = true;
            self.changed = true;
        }
        if self.gone && !self.peer_closed && self.has_pending_output() {
            // A master that may still be there re-queues every connection whose answer it
            // never reads, once it sees our end close: close it now, so none of those answers
            // can still go out, and drop those streams rather than serve them twice.
            if let Some(chan) = self.chan.take() {
                sys::shutdown_both(chan.as_fd());
            }
            self.drop_unanswered();
        }
        // With the master gone (its end closed) nobody re-routes what we took: serve it.
        let written = self.peer_closed || !self.has_pending_output();
        if written && self.parked > 0 {
            for inbox in self.inboxes.values_mut() {
                if inbox.ready < inbox.parked.len() {
                    inbox.ready = inbox.parked.len();
                    self.changed = true;
                }
            }
        }
    }

    /// Marks the state changed when output waits for room, so that its release wakes the
    /// reader, which then watches for room: for output queued outside `send` and `pump`,
    /// which see to it themselves.
    #[cfg(feature = "tokio")]
    pub(crate) fn note_output_waiting(&mut self) {
        if self.has_pending_output() {
            self.changed = true;
        }
    }

    /// Drops (closes) the parked streams whose `Accepted` was not written: the channel will
    /// never write it, so the master gives those connections to another worker.
    fn drop_unanswered(&mut self) {
        for inbox in self.inboxes.values_mut() {
            let unanswered = inbox.parked.len() - inbox.ready;
            if unanswered > 0 {
                inbox.parked.truncate(inbox.ready);
                self.parked -= unanswered;
                self.changed = true;
            }
        }
    }

    /// True when the last pump left frames unread: whoever reads must pump again without
    /// waiting for readiness.
    pub(crate) fn has_unread(&self) -> bool {
        self.unread
    }

    pub(crate) fn has_pending_output(&self) -> bool {
        self.chan.as_ref().is_some_and(Channel::has_pending_output)
    }

    /// Opens `server`'s inbox (if not open yet; a serve loop takes an open one over) and tells
    /// the master, once, that the server takes connections: round-robin hand-offs start only
    /// after this.
    pub(crate) fn start_taking(
        &mut self,
        server: ServerId,
        addr: &BoundAddr,
        taker: Taker,
        room: Room,
    ) -> io::Result<()> {
        let Some(entry) = self.servers.get_mut(&server) else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the server is closed",
            ));
        };
        if entry.grant == ServerGrant::RoundRobin {
            match self.inboxes.get_mut(&server) {
                None => {
                    let inbox = Inbox {
                        parked: VecDeque::new(),
                        ready: 0,
                        room,
                        taker,
                        signal: None,
                    };
                    self.inboxes.insert(server, inbox);
                }
                // A listener the application used, then gave to a serve: the serve's limits
                // apply from now on, the answerer is not needed for it, and nobody reads the
                // readiness socket any more. What is parked was answered: the serve takes it.
                Some(inbox) if taker == Taker::ServeLoop => {
                    inbox.room = room;
                    inbox.taker = taker;
                    inbox.signal = None;
                }
                Some(_) => {}
            }
        }
        if entry.listening_sent {
            return Ok(());
        }
        entry.listening_sent = true;
        self.send(&Message::Listening {
            server,
            addr: addr.clone(),
        })
    }

    /// Where to signal readiness of `server`'s inbox for a caller's mio `Poll`.
    pub(crate) fn set_signal(&mut self, server: ServerId, signal: UnixStream) {
        if let Some(inbox) = self.inboxes.get_mut(&server) {
            inbox.signal = Some(signal);
            // Streams may be takeable already: their edge must not be lost.
            self.changed = true;
        }
    }

    /// The oldest stream of `server` whose answer is written.
    pub(crate) fn take(&mut self, server: ServerId) -> Option<(Stream, ConnInfo)> {
        let inbox = self.inboxes.get_mut(&server)?;
        if inbox.ready == 0 {
            return None;
        }
        let got = inbox.parked.pop_front()?;
        inbox.ready -= 1;
        self.parked -= 1;
        Some(got)
    }

    /// For the application's listeners: the oldest stream of `server` whose answer is
    /// written; `None` while there is none yet; an error once the worker stops taking and
    /// nothing answered for `server` is left (what was answered is ours to serve, stop or not).
    pub(crate) fn take_answered(
        &mut self,
        server: ServerId,
    ) -> io::Result<Option<(Stream, ConnInfo)>> {
        if let Some(got) = self.take(server) {
            return Ok(Some(got));
        }
        if !self.has_parked(server) {
            self.still_taking()?;
        }
        Ok(None)
    }

    /// True while `server`'s inbox holds streams, takeable or not yet.
    pub(crate) fn has_parked(&self, server: ServerId) -> bool {
        self.inboxes
            .get(&server)
            .is_some_and(|i| !i.parked.is_empty())
    }

    /// Forgets `server` and tells the master; hand-offs for it are refused from now on. Its
    /// inbox stays until [`close_inbox`](Self::close_inbox): what it holds was answered
    /// `Accepted` and must still be served.
    pub(crate) fn close_server(&mut self, server: ServerId) {
        let Some(entry) = self.servers.remove(&server) else {
            return;
        };
        self.release_index(&entry.addr, entry.index);
        let _ = self.send(&Message::Close { server });
    }

    /// Drops `server`'s inbox with whatever it still holds (closing those clients).
    pub(crate) fn close_inbox(&mut self, server: ServerId) {
        if let Some(inbox) = self.inboxes.remove(&server) {
            self.parked -= inbox.parked.len();
            if !inbox.parked.is_empty() {
                // A `disconnected()` waiting for the parked streams to be taken must look again.
                self.changed = true;
            }
        }
    }

    fn release_index(&mut self, addr: &ListenAddr, index: u32) {
        if let Some(set) = self.indexes.get_mut(addr) {
            set.remove(&index);
            if set.is_empty() {
                self.indexes.remove(addr);
            }
        }
    }

    /// From now on every hand-off is refused with `Draining`.
    pub(crate) fn start_draining(&mut self) {
        self.draining = true;
    }

    /// Why a serve must stop, if it must.
    pub(crate) fn stop(&self) -> Option<Stop> {
        match self.disconnect {
            Some(by) => Some(Stop::Disconnect(by)),
            None if self.gone || self.chan.is_none() => Some(Stop::MasterGone),
            None => None,
        }
    }

    /// Whether the application may go on taking connections.
    pub(crate) fn still_taking(&self) -> io::Result<()> {
        match self.stop() {
            None if !self.draining => Ok(()),
            Some(Stop::MasterGone) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the master is gone",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the worker is disconnecting",
            )),
        }
    }

    pub(crate) fn take_user(&mut self) -> Vec<Vec<u8>> {
        self.user.drain(..).collect()
    }

    pub(crate) fn user_dropped(&self) -> u64 {
        self.user_dropped
    }

    /// Registers the channel in a serve loop's `Poll` and has the loop woken through `waker`
    /// when another thread reads something for it.
    pub(crate) fn attach_serve_loop(
        &mut self,
        registry: &Registry,
        token: Token,
        waker: Arc<Waker>,
    ) -> io::Result<()> {
        self.serve_loop = Some(ServeLoop {
            waker,
            thread: thread::current().id(),
            token,
            watching_writable: false,
        });
        match self.chan.as_mut() {
            Some(chan) => registry.register(chan, token, Interest::READABLE),
            None => Ok(()),
        }
    }

    /// Has the serve loop watch the channel for writability only while answers wait for
    /// room. Always watched, it would wake the loop each time the master reads our answers
    /// (the kernel reports room again): a context switch for nothing, once per read. Called
    /// before each wait; the re-registration reports current readiness, so no edge is lost.
    /// False when the channel could not be watched (and is given up).
    pub(crate) fn watch_writability_while_output_waits(&mut self, registry: &Registry) -> bool {
        let wants = self.has_pending_output();
        let (Some(serve_loop), Some(chan)) = (self.serve_loop.as_mut(), self.chan.as_mut()) else {
            return true;
        };
        if wants == serve_loop.watching_writable {
            return true;
        }
        let interest = if wants {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match registry.reregister(chan, serve_loop.token, interest) {
            Ok(()) => {
                serve_loop.watching_writable = wants;
                true
            }
            Err(e) => {
                // Answers could wait forever for an edge that never comes: as any other
                // channel failure, the master is gone for us.
                eprintln!("cluster-worker: cannot watch the channel to the master: {e}");
                self.gone = true;
                self.changed = true;
                self.flush();
                false
            }
        }
    }

    /// Undoes [`attach_serve_loop`](Self::attach_serve_loop), however the serve ends.
    pub(crate) fn detach_serve_loop(&mut self, registry: &Registry) {
        self.serve_loop = None;
        if let Some(chan) = self.chan.as_mut() {
            let _ = registry.deregister(chan);
        }
    }

    /// Flushes what is queued (bounded) and closes the channel, so the master sees EOF: the
    /// end of a worker's serve. Parked streams whose answers did not go out are dropped: the
    /// master re-queues those connections when it sees the EOF.
    pub(crate) fn close_channel(&mut self, timeout: Duration) {
        if let Some(mut chan) = self.chan.take() {
            match chan.flush_blocking(Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.is_closed() => self.peer_closed = true,
                Err(_) => self.drop_unanswered(),
            }
            // Listeners and waiters hold dups of the socket; the master must see EOF now.
            sys::shutdown_both(chan.as_fd());
            self.changed = true;
            // What is still parked was answered (or the master is gone): takeable.
            self.flush();
        }
    }

    /// Wakes whoever may be waiting for what changed (see the module docs).
    fn wake_others(&mut self) {
        if let Some(serve_loop) = &self.serve_loop
            && serve_loop.thread != thread::current().id()
        {
            let _ = serve_loop.waker.wake();
        }
        for inbox in self.inboxes.values_mut() {
            if let Some(s) = &mut inbox.signal {
                // A full socket already holds an unread edge.
                let _ = s.write(&[1]);
            }
        }
        #[cfg(feature = "tokio")]
        {
            let output_pending = self.has_pending_output();
            let stopping = self.stopping();
            self.reactor.wake(output_pending, stopping);
        }
    }

    /// False when no answerer thread reads (none was needed, or it failed): a blocking
    /// `accept` then reads the channel itself.
    pub(crate) fn answerer_running(&self) -> bool {
        self.answerer_running
    }

    fn answerer_needed(&self) -> bool {
        self.chan.is_some()
            && !self.gone
            && self.inboxes.values().any(|i| i.taker == Taker::Application)
    }
}

/// The state, locked; wakes the others on release when something changed.
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, State>,
    link: &'a Link,
}

impl Locked<'_> {
    /// Releases the lock until another thread changes something, or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Duration) {
        self.publish();
        self.link.changed.wait_for(&mut self.guard, timeout);
    }

    fn publish(&mut self) {
        if std::mem::take(&mut self.guard.changed) {
            self.guard.wake_others();
            self.link.changed.notify_all();
        }
    }
}

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// The shared end of the channel (see the module docs).
pub(crate) struct Link {
    id: WorkerId,
    state: Mutex<State>,
    changed: Condvar,
    /// A dup of the channel socket, so waiters can `poll(2)` it without the lock.
    poll_fd: OwnedFd,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Frames queued behind a full socket (a `Close`, a user message) still go out.
        self.state.get_mut().close_channel(Duration::from_secs(1));
    }
}

impl Link {
    /// Takes over `channel` and sends `Online`.
    pub(crate) fn new(mut channel: Channel, id: WorkerId) -> io::Result<Link> {
        let poll_fd = channel.as_fd().try_clone_to_owned()?;
        channel.send_blocking(&Message::Online, &[], Some(QUERY_TIMEOUT))?;
        let state = State {
            chan: Some(channel),
            next_seq: 1,
            servers: FxHashMap::default(),
            indexes: HashMap::new(),
            replies: HashMap::new(),
            asked: HashSet::new(),
            abandoned: HashSet::new(),
            query_timeout: QUERY_TIMEOUT,
            inboxes: FxHashMap::default(),
            parked: 0,
            user: VecDeque::new(),
            user_dropped: 0,
            disconnect: None,
            gone: false,
            peer_closed: false,
            draining: false,
            serve_loop: None,
            answerer_running: false,
            fd_mark: sys::nofile_soft_limit().map(|l| l.saturating_sub(FD_RESERVE)),
            changed: false,
            #[cfg(feature = "tokio")]
            reactor: reactor::Wakers::default(),
            unread: false,
            #[cfg(test)]
            answerer_fails: false,
        };
        Ok(Link {
            id,
            state: Mutex::new(state),
            changed: Condvar::new(),
            poll_fd,
        })
    }

    pub(crate) fn id(&self) -> WorkerId {
        self.id
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            guard: self.state.lock(),
            link: self,
        }
    }

    /// The channel socket (a dup), for `poll(2)` waits that must notice the master.
    pub(crate) fn poll_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd.as_fd()
    }

    pub(crate) fn is_connected(&self) -> bool {
        let st = self.lock();
        st.chan.is_some() && !st.gone
    }

    pub(crate) fn set_listen_timeout(&self, timeout: Duration) {
        self.lock().query_timeout = timeout;
    }

    /// Leaves the cluster gracefully: `ExitedAfterDisconnect`, and a running serve drains.
    pub(crate) fn disconnect(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.disconnect.is_some() {
            return Ok(());
        }
        st.disconnect = Some(DisconnectBy::Worker);
        st.changed = true;
        st.send(&Message::ExitedAfterDisconnect)
    }

    /// Starts the answerer thread unless it runs: it reads the channel while a listener the
    /// application drives itself is open, so hand-offs are answered whatever its pace.
    pub(crate) fn ensure_answerer(self: &Arc<Self>) -> io::Result<()> {
        let mut st = self.lock();
        if st.answerer_running {
            return Ok(());
        }
        let fd = self.poll_fd.try_clone()?;
        let link = Arc::downgrade(self);
        thread::Builder::new()
            .name("cluster-answerer".into())
            .spawn(move || answerer_main(&link, &fd))?;
        st.answerer_running = true;
        Ok(())
    }

    /// Asks the master for a server. Blocks until it answers (at most the listen timeout).
    pub(crate) fn query(&self, spec: &ListenSpec) -> io::Result<Grant> {
        let asked = self.send_query(spec)?;
        let deadline = Instant::now().checked_add(asked.timeout);
        let got = self.wait_for(deadline, |st| st.replies.remove(&asked.seq).map(Ok));
        self.finish_query(spec, &asked, got)
    }

    /// Sends `QueryServer` for `spec` with the smallest free index; [`Link::finish_query`]
    /// takes the reply.
    pub(crate) fn send_query(&self, spec: &ListenSpec) -> io::Result<Asked> {
        let (seq, index, timeout) = {
            let mut st = self.lock();
            let used = st.indexes.entry(spec.addr.clone()).or_default();
            let index = (0..).find(|i| !used.contains(i)).unwrap_or(u32::MAX);
            used.insert(index);
            let seq = Seq(st.next_seq);
            st.next_seq += 1;
            let sent = st.send(&Message::QueryServer {
                seq,
                spec: spec.clone(),
                index,
            });
            if let Err(e) = sent {
                st.release_index(&spec.addr, index);
                return Err(e);
            }
            st.asked.insert(seq);
            (seq, index, st.query_timeout)
        };
        Ok(Asked {
            seq,
            index,
            timeout,
        })
    }

    /// Takes the reply to `asked` (or the wait's failure) into the state: a grant opens the
    /// server, anything else frees its index.
    pub(crate) fn finish_query(
        &self,
        spec: &ListenSpec,
        asked: &Asked,
        got: io::Result<Received>,
    ) -> io::Result<Grant> {
        let Asked { seq, index, .. } = *asked;
        let mut st = self.lock();
        st.asked.remove(&seq);
        let failed = |st: &mut State, e: io::Error| {
            st.release_index(&spec.addr, index);
            Err(e)
        };
        // Another thread's pump may have routed the reply after our wait ended.
        let got = got.or_else(|e| st.replies.remove(&seq).ok_or(e));
        let Received { msg, fds } = match got {
            Ok(r) => r,
            Err(e) => {
                // Only a timeout leaves a master that may still answer.
                if e.kind() == io::ErrorKind::TimedOut {
                    st.abandoned.insert(seq);
                }
                return failed(&mut st, e);
            }
        };
        match msg {
            Message::QueryServerReply {
                reply:
                    ServerReply::Granted {
                        server,
                        addr,
                        grant,
                    },
                ..
            } => {
                st.servers.insert(
                    server,
                    ServerEntry {
                        addr: spec.addr.clone(),
                        index,
                        grant,
                        listening_sent: false,
                    },
                );
                Ok((server, addr, grant, fds))
            }
            Message::QueryServerReply {
                reply: ServerReply::Failed(e),
                ..
            } => failed(&mut st, e.into()),
            _ => failed(
                &mut st,
                io::Error::new(io::ErrorKind::InvalidData, "unexpected reply"),
            ),
        }
    }

    /// Blocks until `f` finds what it waits for in the state, reading the channel (or, while
    /// another thread reads it, waiting for that thread's news). Fails on a closed channel or
    /// at `deadline`.
    fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut State) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        loop {
            let mut st = self.lock();
            st.pump();
            if let Some(r) = f(&mut st) {
                return r;
            }
            if st.gone || st.chan.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the master is gone",
                ));
            }
            let left = deadline.map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from the master",
                ));
            }
            if st.answerer_running || st.serve_loop.is_some() {
                st.wait(left.min(WAIT_SLICE));
                continue;
            }
            if st.has_unread() {
                continue;
            }
            drop(st);
            sys::wait_readable(self.poll_fd(), left.min(WAIT_SLICE))?;
        }
    }
}

/// What the master granted: the server, its address, how it is shared, its socket if any.
pub(crate) type Grant = (ServerId, BoundAddr, ServerGrant, Vec<OwnedFd>);

/// A `QueryServer` sent and not answered yet.
#[derive(Debug)]
pub(crate) struct Asked {
    pub(crate) seq: Seq,
    pub(crate) index: u32,
    pub(crate) timeout: Duration,
}

/// The answerer thread: reads (and so answers) while a listener the application drives is
/// open. Holds the link only while awake, so dropping the last handle still closes it.
fn answerer_main(link: &Weak<Link>, fd: &OwnedFd) {
    loop {
        let (want_write, unread) = {
            let Some(link) = link.upgrade() else {
                return;
            };
            let mut st = link.lock();
            if !st.answerer_needed() {
                st.answerer_running = false;
                return;
            }
            #[cfg(test)]
            if st.answerer_fails {
                st.answerer_running = false;
                return;
            }
            st.pump();
            (st.has_pending_output(), st.has_unread())
        };
        if unread {
            continue;
        }
        if let Err(e) = sys::wait_channel(fd.as_fd(), want_write, WAIT_SLICE) {
            eprintln!("cluster-worker: the answerer stops: {e}");
            if let Some(link) = link.upgrade() {
                link.lock().answerer_running = false;
            }
            return;
        }
    }
}

/// Empties a readiness socket (see [`State::set_signal`]); its edges are all it carries.
pub(crate) fn drain_signal(mut signal: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(signal.read(&mut buf), Ok(n) if n > 0) {}
}

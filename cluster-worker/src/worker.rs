use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::{
    ConnId, ListenAddr, ListenSpec, Message, RefuseReason, Seq, ServerGrant, ServerId, ServerReply,
    WorkerId, env,
};
use cluster_ipc::{Channel, Limits, Received};
use parking_lot::Mutex;

use crate::listener::{Listener, Sock};
use crate::serve::{Handler, ServeConfig, ServeOutcome};
use crate::sys;

/// How long `listen` waits for the master's answer unless `set_listen_timeout` says otherwise.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blocking waiter sleeps in `poll(2)` before looking again at what another thread
/// may have received for it.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// Fds kept free below `RLIMIT_NOFILE` for the worker's own needs (files, pipes, the accept
/// of a session's upstream...): a hand-off whose fd lands above the mark is refused.
pub(crate) const FD_RESERVE: u64 = 32;

/// Who asked for the disconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DisconnectBy {
    Master,
    Worker,
}

#[derive(Debug)]
struct ServerEntry {
    addr: ListenAddr,
    index: u32,
    grant: ServerGrant,
    listening_sent: bool,
}

/// Everything the worker shares between the serve loop, listeners and handler threads.
#[derive(Debug)]
pub(crate) struct State {
    /// `None` once closed at the end of serve.
    chan: Option<Channel>,
    next_seq: u64,
    servers: HashMap<ServerId, ServerEntry>,
    /// Indexes in use per address (open servers and queries in flight).
    indexes: HashMap<ListenAddr, BTreeSet<u32>>,
    replies: HashMap<Seq, Received>,
    /// Queries whose `listen` gave up waiting: a late grant is closed at once, so neither the
    /// worker nor the master keeps a server nobody listens on.
    abandoned: HashSet<Seq>,
    query_timeout: Duration,
    /// Hand-offs for open round-robin servers, not yet answered.
    pending: HashMap<ServerId, VecDeque<(ConnId, OwnedFd)>>,
    user: VecDeque<Vec<u8>>,
    pub(crate) disconnect: Option<DisconnectBy>,
    /// Channel EOF or a protocol error: the master is gone for us.
    pub(crate) gone: bool,
    /// Refuse every hand-off with `Draining` from now on.
    pub(crate) draining: bool,
    /// The serve loop's waker while a serve runs.
    pub(crate) loop_waker: Option<Arc<mio::Waker>>,
}

impl State {
    /// Drains the channel into the queues. Returns true when anything arrived.
    pub(crate) fn pump(&mut self) -> bool {
        let mut any = false;
        loop {
            let Some(chan) = self.chan.as_mut() else {
                return any;
            };
            match chan.recv() {
                Ok(None) => return any,
                Ok(Some(r)) => {
                    any = true;
                    self.route(r);
                }
                Err(e) => {
                    if !e.is_closed() {
                        eprintln!("cluster-worker: channel to the master failed: {e}");
                    }
                    self.gone = true;
                    return true;
                }
            }
        }
    }

    fn route(&mut self, r: Received) {
        let Received { msg, mut fds } = r;
        match msg {
            Message::QueryServerReply { seq, reply } if self.abandoned.remove(&seq) => {
                // The fds (a shared socket) close here; the master forgets our registration.
                if let ServerReply::Granted { server, .. } = reply {
                    eprintln!(
                        "cluster-worker: the master granted {server:?} after listen() gave up; \
                         closing it"
                    );
                    let _ = self.send(&Message::Close { server });
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
            Message::NewConn { server, conn } => {
                let Some(fd) = fds.pop() else {
                    self.refuse(conn, RefuseReason::FdLost);
                    return;
                };
                let rr_open = self
                    .servers
                    .get(&server)
                    .is_some_and(|s| s.grant == ServerGrant::RoundRobin);
                if self.draining {
                    self.refuse(conn, RefuseReason::Draining);
                } else if !rr_open {
                    self.refuse(conn, RefuseReason::ListenerClosed);
                } else {
                    self.pending
                        .entry(server)
                        .or_default()
                        .push_back((conn, fd));
                }
            }
            Message::Disconnect => {
                self.disconnect.get_or_insert(DisconnectBy::Master);
            }
            Message::User { payload } => self.user.push_back(payload),
            other => {
                eprintln!(
                    "cluster-worker: ignoring unexpected {} from the master",
                    other.name()
                );
            }
        }
    }

    /// Sends a message, never blocking; output the socket does not take is flushed by the
    /// serve loop (woken here) or by the next blocking call.
    pub(crate) fn send(&mut self, msg: &Message) -> io::Result<()> {
        let Some(chan) = self.chan.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "channel to the master is closed",
            ));
        };
        let sent = chan.send(msg, &[]).and_then(|()| chan.flush().map(|_| ()));
        if let Err(e) = sent {
            if e.is_closed() {
                self.gone = true;
            }
            return Err(e.into());
        }
        if chan.has_pending_output()
            && let Some(w) = &self.loop_waker
        {
            // A failed wake only delays the flush to the loop's next event.
            let _ = w.wake();
        }
        Ok(())
    }

    /// Queues an fd-less message without sending it: the caller flushes (the serve loop answers
    /// a whole pass of hand-offs in one `sendmsg`). A failure means the master is gone, which
    /// `flush` reports too.
    pub(crate) fn queue(&mut self, msg: &Message) {
        if let Some(chan) = self.chan.as_mut()
            && let Err(e) = chan.queue(msg)
        {
            if e.is_closed() {
                self.gone = true;
            } else {
                eprintln!("cluster-worker: cannot queue {}: {e}", msg.name());
            }
        }
    }

    /// Answers a hand-off with a refusal; the received fd is dropped by the caller, the master
    /// keeps its own copy and re-routes.
    pub(crate) fn refuse(&mut self, conn: ConnId, reason: RefuseReason) {
        // A send failure means the master is gone; it re-queues on its own.
        let _ = self.send(&Message::Refused { conn, reason });
    }

    /// Takes the oldest unanswered hand-off for `server`.
    pub(crate) fn take_pending(&mut self, server: ServerId) -> Option<(ConnId, OwnedFd)> {
        let q = self.pending.get_mut(&server)?;
        let got = q.pop_front();
        if q.is_empty() {
            self.pending.remove(&server);
        }
        got
    }

    /// Refuses every unanswered hand-off with `reason`.
    pub(crate) fn refuse_all_pending(&mut self, reason: RefuseReason) {
        let all: Vec<ConnId> = self
            .pending
            .drain()
            .flat_map(|(_, q)| q.into_iter().map(|(c, _fd)| c))
            .collect();
        for c in all {
            self.refuse(c, reason);
        }
    }

    /// Sends `Listening` for `server` the first time it is asked for.
    pub(crate) fn mark_listening(
        &mut self,
        server: ServerId,
        addr: &cluster_core::BoundAddr,
    ) -> io::Result<()> {
        match self.servers.get_mut(&server) {
            Some(e) if !e.listening_sent => {
                e.listening_sent = true;
                self.send(&Message::Listening {
                    server,
                    addr: addr.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Forgets `server`: refuses what was in flight to it and tells the master.
    pub(crate) fn close_server(&mut self, server: ServerId) {
        let Some(entry) = self.servers.remove(&server) else {
            return;
        };
        if entry.grant == ServerGrant::RoundRobin
            && let Some(q) = self.pending.remove(&server)
        {
            for (c, _fd) in q {
                self.refuse(c, RefuseReason::ListenerClosed);
            }
        }
        self.release_index(&entry.addr, entry.index);
        let _ = self.send(&Message::Close { server });
    }

    fn release_index(&mut self, addr: &ListenAddr, index: u32) {
        if let Some(set) = self.indexes.get_mut(addr) {
            set.remove(&index);
            if set.is_empty() {
                self.indexes.remove(addr);
            }
        }
    }

    pub(crate) fn take_user(&mut self) -> Vec<Vec<u8>> {
        self.user.drain(..).collect()
    }

    pub(crate) fn flush(&mut self) {
        // Any error but a full socket (which `flush` reports as Ok(false)) leaves answers the
        // master waits for unsent with no writable edge to retry on: treat the master as gone.
        if let Some(chan) = self.chan.as_mut()
            && let Err(e) = chan.flush()
        {
            if !e.is_closed() {
                eprintln!("cluster-worker: channel to the master failed: {e}");
            }
            self.gone = true;
        }
    }

    pub(crate) fn channel_mut(&mut self) -> Option<&mut Channel> {
        self.chan.as_mut()
    }

    /// Flushes what is queued (bounded) and closes the channel: the master sees EOF.
    pub(crate) fn close_channel(&mut self, timeout: Duration) {
        if let Some(mut chan) = self.chan.take() {
            let _ = chan.flush_blocking(Some(timeout));
            // Listeners and waiters hold dups of the socket; the master must see EOF now.
            sys::shutdown_both(chan.as_fd());
        }
    }
}

pub(crate) struct Inner {
    id: WorkerId,
    pub(crate) state: Mutex<State>,
    /// A dup of the channel socket, so blocking waiters can `poll(2)` it without the lock.
    poll_fd: OwnedFd,
    /// Hand-offs whose fd number reaches this are refused with `FdLimit`.
    pub(crate) fd_mark: Option<u64>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Frames queued behind a full socket (a `Close`, a user message) still go out.
        self.state.get_mut().close_channel(Duration::from_secs(1));
    }
}

/// This process's connection to its master: listens through it, serves the connections it
/// hands over, exchanges user messages. Cheap to clone (all clones are one worker).
#[derive(Clone, Debug)]
pub struct Worker {
    pub(crate) inner: Arc<Inner>,
}

impl Worker {
    /// A worker talking to its master over `channel`. Sends `Online`.
    pub fn with_channel(mut channel: Channel, id: WorkerId) -> io::Result<Worker> {
        let poll_fd = channel.as_fd().try_clone_to_owned()?;
        channel.send_blocking(&Message::Online, &[], Some(QUERY_TIMEOUT))?;
        Ok(Worker {
            inner: Arc::new(Inner {
                id,
                state: Mutex::new(State {
                    chan: Some(channel),
                    next_seq: 1,
                    servers: HashMap::new(),
                    indexes: HashMap::new(),
                    replies: HashMap::new(),
                    abandoned: HashSet::new(),
                    query_timeout: QUERY_TIMEOUT,
                    pending: HashMap::new(),
                    user: VecDeque::new(),
                    disconnect: None,
                    gone: false,
                    draining: false,
                    loop_waker: None,
                }),
                poll_fd,
                fd_mark: sys::nofile_soft_limit().map(|l| l.saturating_sub(FD_RESERVE)),
            }),
        })
    }

    /// The worker described by this process's environment (`CLUSTER_RS_WORKER_ID`,
    /// `CLUSTER_RS_CHANNEL_FD`), or `None` when the process is not a worker.
    ///
    /// Adopts the inherited channel fd: call it once per process (the free functions of this
    /// crate do, through a process-global worker).
    pub fn from_env() -> io::Result<Option<Worker>> {
        let Some(id) = std::env::var_os(env::WORKER_ID) else {
            return Ok(None);
        };
        let bad = |e: cluster_core::CoreError| io::Error::new(io::ErrorKind::InvalidInput, e);
        let id = env::parse_worker_id(&id.to_string_lossy()).map_err(bad)?;
        let fd = match std::env::var_os(env::CHANNEL_FD) {
            Some(v) => env::parse_channel_fd(&v.to_string_lossy()).map_err(bad)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is set but {} is not", env::WORKER_ID, env::CHANNEL_FD),
                ));
            }
        };
        let chan = Channel::from_inherited_fd(fd, Limits::default())?;
        Worker::with_channel(chan, id).map(Some)
    }

    /// This worker's id.
    pub fn id(&self) -> WorkerId {
        self.inner.id
    }

    /// True until the channel to the master has closed (EOF, error, or the end of a serve).
    pub fn is_connected(&self) -> bool {
        let st = self.inner.state.lock();
        st.chan.is_some() && !st.gone
    }

    /// How long [`Worker::listen`] and [`Worker::bind_udp_spec`] wait for the master's answer
    /// (30 s unless set). A grant that arrives after the wait gave up is closed at once; a
    /// retry sent before that `Close` reaches the master can still be refused with
    /// `EADDRINUSE`, as the master then counts this worker among the server's holders.
    pub fn set_listen_timeout(&self, timeout: Duration) {
        self.inner.state.lock().query_timeout = timeout;
    }

    /// Listens on `spec`: through the master, or in this process for `exclusive` specs.
    ///
    /// Blocks until the master answers (at most the listen timeout, 30 s by default). The
    /// master's bind error comes back as an `io::Error` of the same kind (`EADDRINUSE` is
    /// [`io::ErrorKind::AddrInUse`]).
    pub fn listen(&self, spec: ListenSpec) -> io::Result<Listener> {
        if spec.addr.is_udp() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "listen() is for stream sockets; use bind_udp() for UDP",
            ));
        }
        if spec.exclusive {
            return Listener::bind_standalone(&spec);
        }
        let (server, addr, grant, mut fds) = self.query(spec)?;
        let sock = match grant {
            ServerGrant::RoundRobin => self
                .inner
                .poll_fd
                .try_clone()
                .map(|poll_fd| Sock::RoundRobin { poll_fd }),
            ServerGrant::Shared | ServerGrant::ReusePort => fds
                .pop()
                .ok_or_else(missing_fd)
                .and_then(Sock::from_listening_fd),
        };
        match sock {
            Ok(sock) => Ok(Listener::granted(sock, self.clone(), server, grant, addr)),
            Err(e) => {
                // Granted but unusable here: the master must not count us as listening.
                self.inner.state.lock().close_server(server);
                Err(e)
            }
        }
    }

    /// Binds a UDP socket: through the master (always shared, as in Node), in this process when
    /// `exclusive`.
    ///
    /// The returned socket is a plain std socket, so closing it does not tell the master: the
    /// server stays registered (and its index in use) for the life of the worker.
    pub fn bind_udp_spec(&self, spec: ListenSpec) -> io::Result<UdpSocket> {
        let ListenAddr::Udp(addr) = spec.addr else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bind_udp needs a UDP address",
            ));
        };
        if spec.exclusive {
            return sys::bind_udp(&addr, spec.ipv6_only);
        }
        let (server, _addr, _grant, mut fds) = self.query(spec)?;
        match fds.pop() {
            Some(fd) => Ok(UdpSocket::from(fd)),
            None => {
                self.inner.state.lock().close_server(server);
                Err(missing_fd())
            }
        }
    }

    /// [`Worker::bind_udp_spec`] with default options.
    pub fn bind_udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.bind_udp_spec(ListenSpec::udp(addr))
    }

    fn query(
        &self,
        spec: ListenSpec,
    ) -> io::Result<(ServerId, cluster_core::BoundAddr, ServerGrant, Vec<OwnedFd>)> {
        let (seq, index, timeout) = {
            let mut st = self.inner.state.lock();
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
            (seq, index, st.query_timeout)
        };
        let deadline = Instant::now().checked_add(timeout);
        let got = self.wait_for(deadline, |st| st.replies.remove(&seq).map(Ok));
        let mut st = self.inner.state.lock();
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

    /// Blocks until `f` finds what it waits for in the shared state, pumping the channel.
    /// Fails on a closed channel or at `deadline`.
    pub(crate) fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut State) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        loop {
            {
                let mut st = self.inner.state.lock();
                let arrived = st.pump();
                if arrived {
                    // What arrived may be for the serve loop; its edge may already be spent.
                    if let Some(w) = &st.loop_waker {
                        let _ = w.wake();
                    }
                }
                if let Some(r) = f(&mut st) {
                    return r;
                }
                if st.gone || st.chan.is_none() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the master is gone",
                    ));
                }
                st.flush();
            }
            let left = deadline.map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from the master",
                ));
            }
            sys::wait_readable(self.inner.poll_fd.as_fd(), left.min(WAIT_SLICE))?;
        }
    }

    /// Sends an application message to the master. Never blocks; usable from any thread.
    pub fn send(&self, payload: Vec<u8>) -> io::Result<()> {
        self.inner.state.lock().send(&Message::User { payload })
    }

    /// User messages that arrived while no serve loop was running to deliver them.
    pub fn take_messages(&self) -> Vec<Vec<u8>> {
        let mut st = self.inner.state.lock();
        st.pump();
        st.take_user()
    }

    /// Leaves the cluster gracefully: tells the master (`ExitedAfterDisconnect`, so the exit is
    /// not a crash) and makes a running serve drain and return
    /// [`ServeOutcome::WorkerDisconnect`].
    pub fn disconnect(&self) -> io::Result<()> {
        let mut st = self.inner.state.lock();
        if st.disconnect.is_some() {
            return Ok(());
        }
        st.disconnect = Some(DisconnectBy::Worker);
        let sent = st.send(&Message::ExitedAfterDisconnect);
        if let Some(w) = &st.loop_waker {
            let _ = w.wake();
        }
        sent
    }

    /// Serves `listeners` until disconnected (see the crate docs' theory of operation).
    pub fn serve(
        &self,
        listeners: Vec<Listener>,
        handler: Handler,
        config: ServeConfig,
    ) -> io::Result<ServeOutcome> {
        crate::serve::run(Some(self), listeners, handler, config)
    }

    /// The channel socket (a dup), for `poll(2)` waits that must notice the master.
    pub(crate) fn channel_poll_fd(&self) -> BorrowedFd<'_> {
        self.inner.poll_fd.as_fd()
    }

    /// The fd-number mark above which hand-offs are refused (`FdLimit`).
    pub(crate) fn over_fd_mark(&self, fd: &OwnedFd) -> bool {
        self.inner
            .fd_mark
            .is_some_and(|mark| u64::try_from(fd.as_raw_fd()).unwrap_or(0) >= mark)
    }
}

fn missing_fd() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "grant arrived without its socket",
    )
}

//! The master's one thread: listeners, worker channels, exit notifications (pidfds), output
//! pipes, timers and commands, all in one mio `Poll`. Every decision about connections is made
//! by the pure [`crate::RoundRobinHandle`], every decision about which worker runs where by the pure
//! [`Supervision`]; this module and its children carry out their actions: `spawn` starts worker
//! processes and reads their output, `lifecycle` feeds supervision and does what it asks,
//! `commands` takes the owner's commands.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use cluster_core::{
    BoundAddr, ConnId, ListenError, ListenSpec, Message, RefuseReason, Seq, ServerId, ServerReply,
    WorkerId,
};
use cluster_ipc::{IpcError, Received};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::channel::WorkerChannel;
use crate::events::{
    Command, Event, EventReceiver, EventSender, MasterStats, WorkerState, event_queue,
};
use crate::round_robin::Action;
use crate::server::{Server, ServerKind};
use crate::supervision::{Supervision, SupervisionConfig};
use crate::{MasterBuilder, MasterError, sys};

mod commands;
mod lifecycle;
mod spawn;

use spawn::OutputPipe;

/// Tokens carry a kind in the low bits and an id above them.
const KIND_BITS: usize = 3;
const KIND_WAKER: usize = 0;
const KIND_LISTENER: usize = 1;
const KIND_CHANNEL: usize = 2;
const KIND_PIDFD: usize = 3;
const KIND_STDOUT: usize = 4;
const KIND_STDERR: usize = 5;

fn token(kind: usize, id: u32) -> Token {
    Token(((id as usize) << KIND_BITS) | kind)
}

fn split_token(t: Token) -> (usize, u32) {
    (t.0 & ((1 << KIND_BITS) - 1), (t.0 >> KIND_BITS) as u32)
}

/// Frames read from one worker per pass before the others get a turn.
const MAX_FRAMES_PER_DRAIN: usize = 4096;
/// Frames read from a worker that is being dropped (already SIGKILLed, or exited): its answers
/// must be honoured before what was in flight to it is re-queued (hazard A12). Its socket
/// buffer is finite once it stops writing; the bound only guards against a kill that has not
/// landed yet.
const MAX_FRAMES_FINAL_DRAIN: usize = 1 << 20;

/// Bytes that may wait unread in the master for one worker. Past it, replies to the worker's
/// own requests drop it (it asks without reading), and user messages for it are refused with
/// [`MasterError::WorkerBackedUp`]. Hand-offs are bounded by the window instead.
const MAX_QUEUED_FOR_WORKER: usize = 4 << 20;

#[derive(Debug)]
struct WorkerRec {
    id: WorkerId,
    slot: usize,
    pid: u32,
    child: Child,
    pidfd: OwnedFd,
    channel: Option<Box<dyn WorkerChannel>>,
    state: WorkerState,
    exited_after_disconnect: bool,
    /// Servers granted to it and not closed.
    servers: Vec<ServerId>,
    stdout: Option<OutputPipe>,
    stderr: Option<OutputPipe>,
    /// SIGKILLed for a protocol violation or an ack timeout: only its answers still count, and
    /// what was in flight to it is re-queued once it has exited (`reap`), when its channel
    /// holds every answer it will ever send.
    dropping: bool,
    /// A user message read while the embedder had no room: the channel is paused until it
    /// can be delivered.
    held_message: Option<Event>,
    /// Its last listen failed for a reason a restart cannot fix (`ADDR: error`).
    listen_failure: Option<String>,
}

impl WorkerRec {
    /// Signals the worker through its pidfd, never a pid somebody else may own by now.
    fn signal(&self, signal: i32) {
        let _ = sys::pidfd_signal(self.pidfd.as_fd(), signal);
    }
}

/// What carrying out a handle's actions touches, kept apart from the server table so that a
/// handle (borrowed from a server) and these can be borrowed at once.
#[derive(Debug, Default)]
struct Fleet {
    workers: HashMap<WorkerId, WorkerRec>,
    /// Reused for every handle call, so a hand-off allocates nothing.
    actions: Vec<Action<OwnedFd>>,
    /// Workers to drop after the current step (dropping one re-enters the handles).
    doomed: Vec<(WorkerId, String)>,
    stats: MasterStats,
}

impl Fleet {
    /// The channel of a worker that still has one.
    fn channel(&mut self, id: WorkerId) -> Option<&mut Box<dyn WorkerChannel>> {
        self.workers.get_mut(&id).and_then(|w| w.channel.as_mut())
    }
}

pub(crate) struct EventLoop {
    poll: Poll,
    waker: Arc<Waker>,
    cfg: MasterBuilder,
    commands: Receiver<Command>,
    events: EventSender,
    servers: HashMap<ServerId, Server>,
    by_key: HashMap<cluster_core::ListenKey, ServerId>,
    next_server: u32,
    fleet: Fleet,
    /// Every decision about which worker runs where.
    sup: Supervision,
    /// The `listen_fd` sockets: name, socket, and what it is bound to (the real port for a
    /// port-0 spec).
    prebound: Vec<(String, OwnedFd, BoundAddr)>,
    reserve_fd: Option<File>,
    last_exit: String,
    now: Instant,
    timer_due: Option<Instant>,
    /// Workers whose channel still had frames when their drain hit its bound.
    unread: Vec<Source>,
    /// Sources not read for want of room in the embedder's event queue, read again once it has
    /// room (edge-triggered readiness will not report what is already waiting).
    paused: Vec<Source>,
    /// Workers that did not leave cleanly (exit 0 after disconnect) during the shutdown.
    unclean_exits: usize,
}

/// Something of a worker's that the loop reads: its channel, or a captured output pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Channel(WorkerId),
    Output { worker: WorkerId, stderr: bool },
}

impl EventLoop {
    pub(crate) fn new(
        cfg: MasterBuilder,
        commands: Receiver<Command>,
    ) -> Result<(EventLoop, EventReceiver), MasterError> {
        let poll = Poll::new().map_err(|e| MasterError::io("epoll_create", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), token(KIND_WAKER, 0))
                .map_err(|e| MasterError::io("eventfd", e))?,
        );
        let (events, receiver) = event_queue(Arc::clone(&waker));
        let mut prebound = Vec::new();
        for (name, spec) in &cfg.listen_fds {
            let bound = crate::bind::bind_spec(spec, false)?;
            prebound.push((name.clone(), bound.fd, bound.addr));
        }
        // Jitter only has to differ between masters started together.
        let clock = std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = u64::from(std::process::id()) ^ clock;
        let sup = Supervision::new(
            SupervisionConfig {
                restart: cfg.restart.clone(),
                ready_timeout: cfg.ready_timeout,
                shutdown_timeout: cfg.shutdown_timeout,
            },
            cfg.workers,
            seed ^ 0x9e37_79b9_7f4a_7c15,
        );
        let event_loop = EventLoop {
            poll,
            waker,
            cfg,
            commands,
            events,
            servers: HashMap::new(),
            by_key: HashMap::new(),
            next_server: 1,
            fleet: Fleet::default(),
            sup,
            prebound,
            // Kept open so that on EMFILE one fd can be freed to accept and shed a connection
            // instead of leaving it in the backlog, where edge-triggered epoll never reports it
            // again (hazard C1).
            reserve_fd: File::open("/dev/null").ok(),
            last_exit: String::new(),
            now: Instant::now(),
            timer_due: None,
            unread: Vec::new(),
            paused: Vec::new(),
            unclean_exits: 0,
        };
        Ok((event_loop, receiver))
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub(crate) fn prebound_addrs(&self) -> Vec<(String, BoundAddr)> {
        self.prebound
            .iter()
            .map(|(name, _, addr)| (name.clone(), addr.clone()))
            .collect()
    }

    fn emit(&self, e: Event) {
        self.events.emit(e);
    }

    /// Whether reading more from a worker's output may produce another bulk event now; if not,
    /// `source` is paused until the embedder has read enough.
    fn room_for_bulk(&mut self, source: Source) -> bool {
        if self.events.has_room() {
            return true;
        }
        self.pause(source);
        false
    }

    fn pause(&mut self, source: Source) {
        if !self.paused.contains(&source) {
            self.paused.push(source);
        }
        // If the embedder drained meanwhile, the next poll does not wait (see `run`).
        self.events.wait_for_room();
    }

    /// Emits the message a paused worker's channel was held on, if any. Returns false when it
    /// is still held for want of room (the channel stays paused) unless `regardless`.
    fn release_held_message(&mut self, id: WorkerId, regardless: bool) -> bool {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return true;
        };
        let Some(ev) = w.held_message.take() else {
            return true;
        };
        if regardless || self.events.has_room() {
            self.emit(ev);
            return true;
        }
        w.held_message = Some(ev);
        self.pause(Source::Channel(id));
        false
    }

    fn resume_paused(&mut self) {
        if self.paused.is_empty() || !self.events.room_to_resume() {
            return;
        }
        for source in std::mem::take(&mut self.paused) {
            self.read_source(source);
        }
    }

    pub(crate) fn run(mut self) -> Result<(), MasterError> {
        self.supervise(Supervision::start);
        let mut events = Events::with_capacity(256);
        let result = loop {
            self.timer_due = self.next_deadline();
            let resumable = !self.paused.is_empty() && self.events.room_to_resume();
            let timeout = if self.unread.is_empty() && !resumable {
                self.timer_due
                    .map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                break Err(MasterError::io("epoll_wait", e));
            }
            self.now = Instant::now();
            for ev in events.iter() {
                let (kind, id) = split_token(ev.token());
                match kind {
                    KIND_LISTENER => self.accept_ready(ServerId(id)),
                    KIND_CHANNEL => self.channel_ready(WorkerId(id), ev.is_writable()),
                    KIND_PIDFD => self.reap(WorkerId(id)),
                    KIND_STDOUT => self.output_ready(WorkerId(id), false),
                    KIND_STDERR => self.output_ready(WorkerId(id), true),
                    _ => {}
                }
                self.drop_doomed();
            }
            self.run_commands();
            self.on_timers();
            self.retry_backlogged();
            self.resume_unread();
            self.resume_paused();
            self.drop_doomed();
            if self.fleet.workers.is_empty() {
                if self.sup.shutting_down() {
                    break Ok(());
                }
                if self.sup.all_slots_errored() {
                    break Err(MasterError::AllSlotsErrored {
                        slots: self.sup.live_slots(),
                        last: self.last_exit.clone(),
                    });
                }
            }
        };
        let ids: Vec<ServerId> = self.servers.keys().copied().collect();
        for id in ids {
            self.close_server(id);
        }
        // One verdict for the embedder: a stop is clean when nothing was closed unserved and
        // every worker left by itself (exit 0 after disconnect).
        let clean =
            result.is_ok() && self.fleet.stats.closed_unserved == 0 && self.unclean_exits == 0;
        self.emit(Event::Stopped { clean });
        result
    }

    /// When `w` must have answered its oldest unanswered hand-off (on any server) or be dropped
    /// as stuck. `None` for a worker being dropped already: it is SIGKILLed, and what it held
    /// waits for its exit.
    fn ack_deadline(&self, w: &WorkerRec) -> Option<Instant> {
        if w.dropping {
            return None;
        }
        w.servers
            .iter()
            .filter_map(|sid| match &self.servers.get(sid)?.kind {
                ServerKind::RoundRobin { handle, .. } => handle.oldest_unanswered(w.id),
                _ => None,
            })
            .min()
            .map(|sent| sent + self.cfg.ack_timeout)
    }

    /// Hand-offs sent to `w` and not answered, over all its servers. The handles are the one
    /// record of them.
    fn in_flight_to(&self, w: &WorkerRec) -> usize {
        w.servers
            .iter()
            .filter_map(|sid| match &self.servers.get(sid)?.kind {
                ServerKind::RoundRobin { handle, .. } => Some(handle.in_flight_to(w.id)),
                _ => None,
            })
            .sum()
    }

    /// The earliest instant at which a timer is due, computed right before each poll.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.sup.next_deadline());
        for w in self.fleet.workers.values() {
            consider(self.ack_deadline(w));
        }
        for s in self.servers.values() {
            if let ServerKind::RoundRobin {
                handle, backlogged, ..
            } = &s.kind
            {
                consider(handle.next_deadline());
                // Fd exhaustion or a transient accept error: look again soon rather than spin.
                // A full queue needs no timer: it drains on answers and expiries, which wake
                // the loop, and every pass retries backlogged servers that accept again.
                if *backlogged && handle.accepting() {
                    consider(Some(self.now + Duration::from_millis(10)));
                }
            }
        }
        next
    }

    // ---------------------------------------------------------------- accepting

    fn accept_ready(&mut self, id: ServerId) {
        let Some(server) = self.servers.get_mut(&id) else {
            return;
        };
        let ServerKind::RoundRobin {
            socket,
            handle,
            backlogged,
        } = &mut server.kind
        else {
            return;
        };
        loop {
            if !handle.accepting() {
                *backlogged = true;
                break;
            }
            match socket.accept_fd() {
                Ok(fd) => {
                    self.fleet.stats.accepted += 1;
                    handle.distribute(fd, self.now, &mut self.fleet.actions);
                    run_actions(id, handle, &mut self.fleet);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *backlogged = false;
                    break;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Shed one connection with the reserve fd so the backlog keeps moving.
                    self.reserve_fd = None;
                    if let Ok(fd) = socket.accept_fd() {
                        drop(fd);
                        self.fleet.stats.closed_unserved += 1;
                    }
                    self.reserve_fd = File::open("/dev/null").ok();
                    *backlogged = true;
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // EPROTO, EPERM, ENOBUFS, ENOMEM...: try again shortly (the backlogged timer).
                Err(_) => {
                    *backlogged = true;
                    break;
                }
            }
        }
    }

    fn retry_backlogged(&mut self) {
        let ready: Vec<ServerId> = self
            .servers
            .values()
            .filter(|s| matches!(&s.kind, ServerKind::RoundRobin { backlogged: true, handle, .. } if handle.accepting()))
            .map(|s| s.id)
            .collect();
        for id in ready {
            self.accept_ready(id);
        }
    }

    // ---------------------------------------------------------------- channels

    fn channel_ready(&mut self, id: WorkerId, writable: bool) {
        if writable
            && let Some(ch) = self.fleet.channel(id)
            && let Err(e) = ch.flush()
        {
            self.channel_failed(id, e);
            return;
        }
        self.drain_channel(id);
    }

    /// Reads every frame the worker has sent. Called on readiness and before reconciling an
    /// exit, so that answers sent just before death are honoured (hazard A12).
    fn drain_channel(&mut self, id: WorkerId) {
        self.drain_channel_up_to(id, MAX_FRAMES_PER_DRAIN);
    }

    fn drain_channel_up_to(&mut self, id: WorkerId, max_frames: usize) {
        // Bounded so one chatty worker cannot starve the others. Edge-triggered readiness
        // will not report frames already queued, so a drain cut short is resumed on the next
        // pass (with a zero poll timeout) rather than left for the ack timeout to find.
        // A dying worker's last frames are all read whatever the room: its answers must count,
        // and its socket buffer bounds the rest.
        let final_drain = max_frames == MAX_FRAMES_FINAL_DRAIN;
        if final_drain {
            self.release_held_message(id, true);
        } else if !self.release_held_message(id, false) {
            return;
        }
        for _ in 0..max_frames {
            let Some(ch) = self.fleet.channel(id) else {
                return;
            };
            match ch.recv() {
                Ok(Some(r)) => {
                    if let Message::User { payload } = r.msg {
                        let ev = Event::Message {
                            worker: id,
                            payload,
                        };
                        let dropping = self.fleet.workers.get(&id).is_some_and(|w| w.dropping);
                        if dropping {
                            // Only its answers still count.
                        } else if final_drain || self.events.has_room() {
                            self.emit(ev);
                        } else {
                            // The embedder is behind: keep this one message and read nothing
                            // more from this worker until there is room, so its writes block
                            // in the kernel's socket buffer. The other workers' frames,
                            // answers above all, are read as usual.
                            if let Some(w) = self.fleet.workers.get_mut(&id) {
                                w.held_message = Some(ev);
                            }
                            self.pause(Source::Channel(id));
                            return;
                        }
                    } else {
                        self.on_message(id, r);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.channel_failed(id, e);
                    return;
                }
            }
        }
        if !self.unread.contains(&Source::Channel(id)) {
            self.unread.push(Source::Channel(id));
        }
    }

    fn resume_unread(&mut self) {
        for source in std::mem::take(&mut self.unread) {
            self.read_source(source);
        }
    }

    fn read_source(&mut self, source: Source) {
        match source {
            Source::Channel(id) => self.drain_channel(id),
            Source::Output { worker, stderr } => self.output_ready(worker, stderr),
        }
    }

    fn channel_failed(&mut self, id: WorkerId, e: IpcError) {
        if e.is_closed() {
            self.channel_closed(id);
        } else {
            self.doom(id, format!("channel error: {e}"));
        }
    }

    fn doom(&mut self, id: WorkerId, reason: String) {
        if !self.fleet.doomed.iter().any(|(w, _)| *w == id) {
            self.fleet.doomed.push((id, reason));
        }
    }

    /// Protocol violators: drop the channel with the logged reason, SIGKILL the process, and
    /// send their connections elsewhere. The exit is reaped (and the slot restarted) as usual.
    fn drop_doomed(&mut self) {
        while let Some((id, reason)) = self.fleet.doomed.pop() {
            let Some(w) = self.fleet.workers.get_mut(&id) else {
                continue;
            };
            if w.dropping {
                // Doomed again while it dies (a bad frame among its last ones): nothing more
                // can be read from it, so what it held goes elsewhere now.
                self.channel_closed(id);
                continue;
            }
            w.dropping = true;
            w.signal(libc::SIGKILL);
            self.emit(Event::Dropped { worker: id, reason });
            // No new hand-offs. What is in flight stays until `reap`: the worker may have
            // written an `Accepted` we have not read, or even write one before the SIGKILL
            // lands, and that connection must not go to a second worker (hazard A12).
            self.retire(id);
        }
    }

    /// The worker can no longer talk: re-queue what was in flight to it and release its
    /// servers.
    fn channel_closed(&mut self, id: WorkerId) {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        let Some(mut ch) = w.channel.take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut ch);
        drop(ch);
        w.state = WorkerState::Disconnected;
        // A worker without a channel cannot be told to stop; do not let it linger.
        self.sup.channel_closed(id, self.now);
        let servers = std::mem::take(&mut w.servers);
        for sid in servers {
            self.release_server(sid, id, false);
        }
        self.emit(Event::Disconnect { worker: id });
    }

    /// `id` no longer holds `sid`. Its in-flight connections are re-queued; the server closes
    /// when its last holder closed it explicitly or no worker will come back for it.
    fn release_server(&mut self, sid: ServerId, id: WorkerId, explicit_close: bool) {
        let replacement_coming = self.sup.replacement_possible();
        let Some(server) = self.servers.get_mut(&sid) else {
            return;
        };
        server.holders.remove(&id);
        if let ServerKind::RoundRobin { handle, .. } = &mut server.kind {
            let requeued_before = handle.stats().requeued_on_remove;
            handle.remove(id, self.now, &mut self.fleet.actions);
            self.fleet.stats.requeued += handle.stats().requeued_on_remove - requeued_before;
            run_actions(sid, handle, &mut self.fleet);
        }
        if server.holders.is_empty() && (explicit_close || !replacement_coming) {
            self.close_server(sid);
        }
    }

    fn close_server(&mut self, sid: ServerId) {
        let Some(mut server) = self.servers.remove(&sid) else {
            return;
        };
        self.by_key.remove(&server.key);
        if let ServerKind::RoundRobin { socket, handle, .. } = &mut server.kind {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&socket.as_fd().as_raw_fd()));
            handle.close_all(&mut self.fleet.actions);
            run_actions(sid, handle, &mut self.fleet);
        }
        for w in self.fleet.workers.values_mut() {
            w.servers.retain(|s| *s != sid);
        }
    }

    // ---------------------------------------------------------------- messages

    fn on_message(&mut self, id: WorkerId, r: Received) {
        // A worker being dropped may only settle what it held. Answers, the hot path, are
        // told apart first so they cost no extra lookup.
        if !matches!(
            r.msg,
            Message::Accepted { .. } | Message::Refused { .. } | Message::Close { .. }
        ) && self.fleet.workers.get(&id).is_some_and(|w| w.dropping)
        {
            return;
        }
        match r.msg {
            Message::Online => {
                if let Some(w) = self.fleet.workers.get_mut(&id)
                    && w.state == WorkerState::Spawned
                {
                    w.state = WorkerState::Online;
                }
                self.emit(Event::Online { worker: id });
            }
            Message::QueryServer { seq, spec, index } => self.query_server(id, seq, spec, index),
            Message::Listening { server, addr } => self.on_listening(id, server, addr),
            Message::Accepted { conn } => self.on_answer(id, conn, None),
            Message::Refused { conn, reason } => self.on_answer(id, conn, Some(reason)),
            Message::Close { server } => {
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.servers.retain(|s| *s != server);
                }
                self.release_server(server, id, true);
            }
            Message::ExitedAfterDisconnect => {
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.exited_after_disconnect = true;
                    w.state = WorkerState::Disconnecting;
                }
                self.sup.leaving(id);
                self.retire(id);
            }
            // Read by the drain loop itself, which holds it when the embedder is behind.
            Message::User { .. } => {}
            other => self.doom(
                id,
                format!("sent {}, which only a master may send", other.name()),
            ),
        }
    }

    fn reply(
        &mut self,
        id: WorkerId,
        seq: Seq,
        reply: Result<(ServerId, Option<OwnedFd>), ListenError>,
    ) {
        let msg_and_fd = match reply {
            Ok((sid, fd)) => match self.servers.get(&sid) {
                Some(s) => (
                    Message::QueryServerReply {
                        seq,
                        reply: ServerReply::Granted {
                            server: sid,
                            addr: s.addr.clone(),
                            grant: s.grant(),
                        },
                    },
                    fd,
                ),
                None => return,
            },
            Err(e) => (
                Message::QueryServerReply {
                    seq,
                    reply: ServerReply::Failed(e),
                },
                None,
            ),
        };
        let Some(ch) = self.fleet.channel(id) else {
            return;
        };
        let fds: Vec<_> = msg_and_fd.1.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = ch.send(&msg_and_fd.0, &fds) {
            return self.channel_failed(id, e);
        }
        // A worker that asks without reading the replies would grow this queue without bound.
        let queued = ch.pending_output_bytes();
        if queued > MAX_QUEUED_FOR_WORKER {
            self.doom(
                id,
                format!("does not read its channel ({queued} bytes of replies wait for it)"),
            );
        }
    }

    fn query_server(&mut self, id: WorkerId, seq: Seq, spec: ListenSpec, index: u32) {
        let Some(w) = self.fleet.workers.get(&id) else {
            return;
        };
        let slot = w.slot;
        if w.exited_after_disconnect || w.state == WorkerState::Disconnecting {
            let e = ListenError {
                errno: libc::ESHUTDOWN,
                context: "worker is disconnecting".into(),
            };
            return self.reply(id, seq, Err(e));
        }
        if w.servers.len() >= self.cfg.max_servers_per_worker {
            let e = ListenError {
                errno: libc::EMFILE,
                context: format!(
                    "worker holds {} servers, the master's limit",
                    w.servers.len()
                ),
            };
            return self.reply(id, seq, Err(e));
        }
        if spec.exclusive {
            let e = ListenError {
                errno: libc::EINVAL,
                context: "exclusive listens bind in the worker".into(),
            };
            return self.reply(id, seq, Err(e));
        }
        let key = spec.key(index);
        let sid = match self.by_key.get(&key) {
            Some(sid) => *sid,
            None => {
                let sid = ServerId(self.next_server);
                match Server::bind(
                    sid,
                    key.clone(),
                    &spec,
                    self.cfg.policy,
                    slot,
                    &self.cfg.round_robin,
                ) {
                    Ok(server) => {
                        self.next_server += 1;
                        if let ServerKind::RoundRobin { socket, .. } = &server.kind {
                            let raw = socket.as_fd().as_raw_fd();
                            if let Err(e) = self.poll.registry().register(
                                &mut SourceFd(&raw),
                                token(KIND_LISTENER, sid.0),
                                Interest::READABLE,
                            ) {
                                let e = ListenError {
                                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                                    context: "register listener".into(),
                                };
                                return self.reply(id, seq, Err(e));
                            }
                        }
                        self.servers.insert(sid, server);
                        self.by_key.insert(key, sid);
                        sid
                    }
                    // The key is not stored, so a later query binds afresh (Node's rule).
                    Err(e) => {
                        if matches!(
                            e.errno,
                            libc::EADDRINUSE | libc::EADDRNOTAVAIL | libc::EACCES
                        ) && let Some(w) = self.fleet.workers.get_mut(&id)
                        {
                            w.listen_failure = Some(bind_failure(&spec, e.errno));
                        }
                        return self.reply(id, seq, Err(e));
                    }
                }
            }
        };
        let Some(server) = self.servers.get_mut(&sid) else {
            return;
        };
        if server.holders.contains(&id) {
            let e = ListenError {
                errno: libc::EADDRINUSE,
                context: format!("worker already listens on {}", server.key),
            };
            return self.reply(id, seq, Err(e));
        }
        let granted = server
            .raise_backlog(spec.backlog)
            .and_then(|_| server.socket_for(slot))
            .and_then(|fd| {
                fd.map(|f| f.try_clone_to_owned())
                    .transpose()
                    .map_err(|e| ListenError {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        context: "dup".into(),
                    })
            });
        match granted {
            Ok(fd) => {
                server.holders.insert(id);
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.servers.push(sid);
                    w.listen_failure = None;
                }
                self.reply(id, seq, Ok((sid, fd)));
            }
            Err(e) => {
                let empty = server.holders.is_empty();
                self.reply(id, seq, Err(e));
                if empty {
                    self.close_server(sid);
                }
            }
        }
    }

    fn on_listening(&mut self, id: WorkerId, sid: ServerId, addr: cluster_core::BoundAddr) {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        if !w.servers.contains(&sid) {
            return self.doom(
                id,
                format!("listening on server {sid} it was never granted"),
            );
        }
        let draining = w.state == WorkerState::Disconnecting;
        if !draining {
            w.state = WorkerState::Listening;
        }
        // Round-robin hand-offs start only now that the worker says it takes connections, so
        // one that listened but never serves holds nothing in flight.
        if let Some(ServerKind::RoundRobin { handle, .. }) =
            self.servers.get_mut(&sid).map(|s| &mut s.kind)
            && !draining
        {
            handle.add(id, self.now, &mut self.fleet.actions);
            run_actions(sid, handle, &mut self.fleet);
        }
        self.emit(Event::Listening {
            worker: id,
            server: sid,
            addr,
        });
        self.supervise(|s, now, out| s.listening(id, now, out));
    }

    fn on_answer(&mut self, id: WorkerId, conn: ConnId, refused: Option<RefuseReason>) {
        let sid = conn.server();
        let Some(ServerKind::RoundRobin { handle, .. }) =
            self.servers.get_mut(&sid).map(|s| &mut s.kind)
        else {
            // The server closed while the answer was on its way.
            self.fleet.stats.stray_answers += 1;
            return;
        };
        let result = match refused {
            None => handle
                .accepted(id, conn, self.now, &mut self.fleet.actions)
                .map(drop),
            Some(reason) => handle.refused(id, conn, reason, self.now, &mut self.fleet.actions),
        };
        if result.is_err() {
            // An answer for a hand-off this worker no longer holds: it closed that server (the
            // connection was re-queued then). The handle ignored it, so it cannot cause a
            // double delivery; counting it is enough.
            self.fleet.stats.stray_answers += 1;
            return;
        }
        if refused.is_some() {
            self.fleet.stats.refused += 1;
        } else {
            self.fleet.stats.taken += 1;
        }
        run_actions(sid, handle, &mut self.fleet);
    }

    // ---------------------------------------------------------------- timers

    fn on_timers(&mut self) {
        let now = self.now;
        // Only a deadline known before the poll can be due now; one set during this pass
        // sets the next poll's timeout instead. This keeps the scan off the hot path.
        if self.timer_due.is_none_or(|t| t > now) {
            return;
        }
        self.supervise(Supervision::on_timers);
        let ack_timeout = self.cfg.ack_timeout;
        let stuck: Vec<WorkerId> = self
            .fleet
            .workers
            .values()
            .filter(|w| self.ack_deadline(w).is_some_and(|t| t <= now))
            .map(|w| w.id)
            .collect();
        for id in stuck {
            self.doom(
                id,
                format!("left a hand-off unanswered for {ack_timeout:?}"),
            );
        }
        let sids: Vec<ServerId> = self.servers.keys().copied().collect();
        for sid in sids {
            if let Some(ServerKind::RoundRobin { handle, .. }) =
                self.servers.get_mut(&sid).map(|s| &mut s.kind)
                && handle.next_deadline().is_some_and(|t| t <= now)
            {
                handle.expire(now, &mut self.fleet.actions);
                run_actions(sid, handle, &mut self.fleet);
            }
        }
    }
}

/// `127.0.0.1:8000: address already in use`: what an operator needs to see of a failed bind.
fn bind_failure(spec: &ListenSpec, errno: i32) -> String {
    let addr = match &spec.addr {
        cluster_core::ListenAddr::Tcp(a) | cluster_core::ListenAddr::Udp(a) => a.to_string(),
        other => other.to_string(),
    };
    let text = io::Error::from_raw_os_error(errno).to_string();
    // "Address already in use (os error 98)" -> "address already in use"
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    let text = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    };
    format!("{addr}: {text}")
}

/// Carries out a handle's actions: hand-offs go out on the worker's channel with the master's
/// fd attached (the master keeps its copy until the answer); closes drop the connection.
fn run_actions(
    sid: ServerId,
    handle: &mut crate::round_robin::RoundRobinHandle<OwnedFd>,
    fleet: &mut Fleet,
) {
    let Fleet {
        workers,
        actions,
        doomed,
        stats,
    } = fleet;
    for action in actions.drain(..) {
        match action {
            Action::Handoff { worker, conn } => {
                let Some(fd) = handle.conn(conn) else {
                    continue;
                };
                let sent = match workers.get_mut(&worker).and_then(|w| w.channel.as_mut()) {
                    Some(ch) => ch
                        .send(&Message::NewConn { server: sid, conn }, &[fd.as_fd()])
                        .map_err(|e| e.to_string()),
                    None => Err("channel closed".to_string()),
                };
                match sent {
                    Ok(()) => stats.handed_off += 1,
                    // The connection stays in flight to this worker in the handle; dropping
                    // the worker re-queues it.
                    Err(reason) => {
                        if !doomed.iter().any(|(w, _)| *w == worker) {
                            doomed.push((worker, format!("hand-off failed: {reason}")));
                        }
                    }
                }
            }
            Action::Close { conn, .. } => {
                drop(conn);
                stats.closed_unserved += 1;
            }
        }
    }
}

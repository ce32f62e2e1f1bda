//! The master's one thread: listeners, worker channels, exit notifications (pidfds), output
//! pipes, timers and commands, all in one mio `Poll`. Every decision about connections is made
//! by the pure [`crate::RoundRobinHandle`], every decision about which worker runs where by the pure
//! [`Supervision`]; this module runs the poll loop and its children carry out the actions:
//! `servers` accepts and deals connections and answers `QueryServer`, `channels` reads the
//! workers' frames (bounded per pass, paused while the embedder is behind), `spawn` starts
//! worker processes and reads their output, `lifecycle` feeds supervision and does what it
//! asks, `commands` takes the owner's commands.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use cluster_core::{BoundAddr, ConnId, ServerId, WorkerId};
use mio::{Events, Poll, Token, Waker};
use rustc_hash::FxHashMap;

use crate::activation::Activation;
use crate::channel::WorkerChannel;
use crate::events::{
    Command, Event, EventReceiver, EventSender, MasterStats, WorkerState, event_queue,
};
use crate::notify::NotifySocket;
use crate::orphans::OrphanReaper;
use crate::round_robin::{Action, RoundRobinHandle};
use crate::server::{AcceptedConn, Server, ServerKind};
use crate::supervision::{Supervision, SupervisionConfig};
use crate::{BatchWhileBehind, LoopScheduling, MasterBuilder, MasterError, sys};
use batch_guard::ForeignCpuGuard;

mod batch_guard;
mod channel_set;
mod channels;
mod coalesce;
mod commands;
mod cpu_times;
mod inherited;
mod lifecycle;
mod manager;
mod readiness;
mod servers;
mod spawn;

use servers::run_actions;
use spawn::OutputPipe;

/// Tokens carry a kind in the low bits and an id above them (3 bits: kinds 0-7, all taken).
const KIND_BITS: usize = 3;
const KIND_WAKER: usize = 0;
const KIND_LISTENER: usize = 1;
const KIND_CHANNEL: usize = 2;
const KIND_PIDFD: usize = 3;
const KIND_STDOUT: usize = 4;
const KIND_STDERR: usize = 5;
const KIND_NOTIFY: usize = 6;
/// The epoll set of the channels of workers that answer one by one (see [`channel_set`]),
/// whose own events carry `KIND_CHANNEL`.
const KIND_CHANNEL_SET: usize = 7;

/// Takes a channel out of whichever set [`EventLoop::register_channel`] put it in (borrowing
/// only those, so that a caller may hold its worker's record).
fn deregister_channel(
    channels: &mut channel_set::ChannelSet,
    poll: &Poll,
    ch: &mut Box<dyn WorkerChannel>,
) {
    if ch.answers_one_by_one() {
        channels.deregister(ch);
    } else {
        let _ = poll.registry().deregister(ch);
    }
}

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
    /// The stop signal sent with its `Disconnect` (it never spoke the channel): dying of it
    /// is a clean stop.
    stop_signal_sent: Option<i32>,
    /// It said `Online`: it reads its channel, so `Disconnect` stops it. Kept apart from
    /// `state`, which a worker leaving on its own (`STOPPING=1`) changes.
    spoke_channel: bool,
    /// Its last `STATUS=` line, so that a repeated one is not logged again.
    last_status: Option<String>,
    /// Its channel is watched for writability too: only while output waits for room (see
    /// [`EventLoop::watch_writability_where_output_waits`]).
    watching_writable: bool,
}

impl WorkerRec {
    /// Signals the worker through its pidfd, never a pid somebody else may own by now.
    fn signal(&self, signal: i32) {
        let _ = sys::pidfd_signal(self.pidfd.as_fd(), signal);
    }

    /// Signals the worker and its process group (it was spawned as the group's leader): a
    /// stop or a SIGKILL reaches what it started too, as a service manager's stop reaches the
    /// whole unit. The group is signalled only while the worker is unreaped: its pid, hence
    /// the group id, cannot be reused before then. A worker still in its group gets the one
    /// signal through it (a program may take a second SIGTERM as "force"); one that left it
    /// gets its own through the pidfd.
    fn signal_with_group(&self, signal: i32) {
        let unreaped = sys::unreaped(self.pid);
        let in_own_group = unreaped && sys::leads_its_group(self.pid);
        let group_signalled = unreaped && sys::signal_group(self.pid, signal).is_ok();
        if !(in_own_group && group_signalled) {
            self.signal(signal);
        }
    }
}

/// What carrying out a handle's actions touches, kept apart from the server table so that a
/// handle (borrowed from a server) and these can be borrowed at once.
#[derive(Debug, Default)]
struct Fleet {
    /// Fx: ids the master issues (see [`RoundRobinHandle`](crate::RoundRobinHandle)'s maps).
    workers: FxHashMap<WorkerId, WorkerRec>,
    /// Reused for every handle call, so a hand-off allocates nothing.
    actions: Vec<Action<AcceptedConn>>,
    /// The hand-offs of one `run_actions` step, grouped by worker there; reused likewise.
    handoffs: Vec<Dealt>,
    /// Workers to drop after the current step (dropping one re-enters the handles).
    doomed: Vec<(WorkerId, String)>,
    stats: MasterStats,
}

/// One hand-off of a `run_actions` step, with its place in the order the handle dealt it.
#[derive(Debug, Clone, Copy)]
struct Dealt {
    worker: WorkerId,
    conn: ConnId,
    /// Where it was dealt; `servers::group_by_worker_in_dealing_order` then sets it to where
    /// its worker's first hand-off of the step was dealt, the order the frames go out in.
    order: usize,
}

impl Fleet {
    /// The channel of a worker that still has one.
    fn channel(&mut self, id: WorkerId) -> Option<&mut Box<dyn WorkerChannel>> {
        self.workers.get_mut(&id).and_then(|w| w.channel.as_mut())
    }
}

/// [`LoopScheduling::BatchWhileBehind`] at work.
struct BatchWhileBehindState {
    rule: BatchWhileBehind,
    guard: ForeignCpuGuard,
    /// The loop thread's policy at the start (`SCHED_OTHER`, with its reset-on-fork flag).
    normal: sys::ThreadPolicy,
    /// Whether the thread is `SCHED_BATCH` now.
    waits_as_batch: bool,
    reader: cpu_times::CpuTimesReader,
}

pub(crate) struct EventLoop {
    poll: Poll,
    /// The channels of workers that answer hand-offs one by one, watched from `poll` only
    /// while no connection is being accepted.
    channels: channel_set::ChannelSet,
    /// Reused by every read of `channels`.
    channels_ready: Vec<channel_set::ChannelReady>,
    /// [`MasterStats::accepted`] when the loop last went to wait: a pass that accepted
    /// something leaves the channels to be read on the next pass rather than watched.
    accepted_before_pass: u64,
    waker: Arc<Waker>,
    cfg: MasterBuilder,
    commands: Receiver<Command>,
    events: EventSender,
    servers: FxHashMap<ServerId, Server>,
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
    /// Servers with hand-offs waiting for the current channel read to end (see
    /// [`EventLoop::carry_out_after_answers`]).
    answered_servers: Vec<ServerId>,
    /// Sources not read for want of room in the embedder's event queue, read again once it has
    /// room (edge-triggered readiness will not report what is already waiting).
    paused: Vec<Source>,
    /// Servers whose last holder closed them while another worker was still starting (a
    /// reload's replacement, say): kept open so that clients wait rather than be refused, and
    /// closed once nobody is starting if still nobody holds them.
    kept_for_starting: Vec<ServerId>,
    /// Workers that did not leave cleanly (exit 0 after disconnect) during the shutdown.
    unclean_exits: usize,
    /// [`Event::HandleClosed`] was emitted (once per master).
    handle_closed_told: bool,
    /// Connections closed unserved before the owner asked to stop: the stop is judged only on
    /// what it closed itself.
    unserved_before_stop: Option<u64>,
    /// The workers' `NOTIFY_SOCKET`.
    notify: NotifySocket,
    /// The notify socket's last drain stopped at its bound: read it again without waiting.
    notify_unread: bool,
    /// The service manager that started the master, if it is to be told how things go.
    manager: Option<manager::Manager>,
    /// Sockets the master inherited (socket activation).
    activation: Activation,
    /// Reaps orphaned descendants (as PID 1, or when asked).
    orphans: Option<OrphanReaper>,
    /// What Node workers' `queryServer`s carry per key (see [`crate::node`]).
    node_server_data: crate::node::SharedServerData,
    /// The loop thread moves itself to `SCHED_BATCH` ([`MasterBuilder::loop_scheduling`]),
    /// which a fork would pass on to the workers.
    workers_need_normal_policy: bool,
    /// The rule's state under [`LoopScheduling::BatchWhileBehind`] for a loop started as
    /// `SCHED_OTHER`; `None` otherwise.
    batch_while_behind: Option<BatchWhileBehindState>,
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
        let channels = channel_set::ChannelSet::new(poll.registry(), token(KIND_CHANNEL_SET, 0))
            .map_err(|e| MasterError::io("epoll_create (channels)", e))?;
        let (events, receiver) = event_queue(Arc::clone(&waker));
        let notify = NotifySocket::bind().map_err(|e| MasterError::io("bind NOTIFY_SOCKET", e))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&notify.as_fd())),
                token(KIND_NOTIFY, 0),
                mio::Interest::READABLE,
            )
            .map_err(|e| MasterError::io("register NOTIFY_SOCKET", e))?;
        let activation = if cfg.socket_activation {
            Activation::new(crate::activation::take_from_env())
        } else {
            Activation::default()
        };
        let mut prebound = Vec::new();
        for (name, source) in &cfg.listen_fds {
            let bound = inherited::prebind(&activation, source, cfg.defer_accept)?;
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
                ready_delay: cfg.ready_delay,
                watchdog: cfg.watchdog,
            },
            cfg.workers,
            seed ^ 0x9e37_79b9_7f4a_7c15,
        );
        let mut event_loop = EventLoop {
            poll,
            channels,
            channels_ready: Vec::new(),
            accepted_before_pass: 0,
            waker,
            cfg,
            commands,
            events,
            servers: FxHashMap::default(),
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
            answered_servers: Vec::new(),
            paused: Vec::new(),
            kept_for_starting: Vec::new(),
            unclean_exits: 0,
            handle_closed_told: false,
            unserved_before_stop: None,
            notify,
            notify_unread: false,
            manager: None,
            activation,
            orphans: None,
            node_server_data: Default::default(),
            workers_need_normal_policy: false,
            batch_while_behind: None,
        };
        if crate::orphans::is_init() || event_loop.cfg.reap_orphans {
            if !crate::orphans::is_init() {
                crate::orphans::become_subreaper()
                    .map_err(|e| MasterError::io("PR_SET_CHILD_SUBREAPER", e))?;
            }
            event_loop.orphans = Some(OrphanReaper::new(event_loop.now));
        }
        if event_loop.cfg.notify_systemd {
            event_loop.manager = manager::Manager::from_env(event_loop.now);
        }
        Ok((event_loop, receiver))
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub(crate) fn inherited_sockets(&self) -> Vec<(String, BoundAddr)> {
        self.activation.describe()
    }

    pub(crate) fn prebound_addrs(&self) -> Vec<(String, BoundAddr)> {
        self.prebound
            .iter()
            .map(|(name, _, addr)| (name.clone(), addr.clone()))
            .collect()
    }

    /// Reaps exited orphans when a sweep is due, leaving the workers to their pidfds.
    fn reap_orphans(&mut self) {
        let Some(reaper) = self.orphans.as_mut() else {
            return;
        };
        let workers = &self.fleet.workers;
        reaper.sweep_if_due(self.now, |pid| workers.values().any(|w| w.pid == pid));
    }

    fn emit(&self, e: Event) {
        self.events.emit(e);
    }

    /// Watches a worker's channel for writability only while output waits for room in its
    /// socket. A channel always watched would wake this loop each time the worker reads a
    /// frame (the kernel reports room again), and the worker each time we read its answers:
    /// a context switch per read on each side for nothing. Called before each wait, after
    /// every send of the pass; the re-registration reports current readiness, so no edge is
    /// lost by registering late.
    fn watch_writability_where_output_waits(&mut self) {
        // Dropping a worker whose channel cannot be watched re-routes what it held, which may
        // queue output for another: scan again until a scan changes nothing.
        let mut given_up: Vec<WorkerId> = Vec::new();
        loop {
            let mut failed = Vec::new();
            for (id, w) in &mut self.fleet.workers {
                let Some(ch) = w.channel.as_mut() else {
                    continue;
                };
                let wants = ch.pending_output_bytes() > 0;
                if wants == w.watching_writable || given_up.contains(id) {
                    continue;
                }
                let interest = if wants {
                    mio::Interest::READABLE | mio::Interest::WRITABLE
                } else {
                    mio::Interest::READABLE
                };
                let registry = if ch.answers_one_by_one() {
                    self.channels.registry()
                } else {
                    self.poll.registry()
                };
                match registry.reregister(ch, token(KIND_CHANNEL, id.0), interest) {
                    Ok(()) => w.watching_writable = wants,
                    Err(e) => failed.push((*id, e)),
                }
            }
            if failed.is_empty() {
                return;
            }
            for (id, e) in failed {
                given_up.push(id);
                self.channel_failed(id, cluster_ipc::IpcError::Io(e));
            }
            self.drop_doomed();
        }
    }

    /// Stops watching the channels while connections are being accepted, and watches them again
    /// once a pass accepts nothing (see [`channel_set`]). A switch that fails leaves things as
    /// they were: unwatched, the channels are still read on every pass, at most
    /// [`channel_set::LAZY_READ_DELAY`] apart.
    fn watch_channels_unless_accepting(&mut self) {
        let accepted = self.fleet.stats.accepted;
        let accepting = accepted != std::mem::replace(&mut self.accepted_before_pass, accepted);
        let _ = self.channels.after_pass(self.poll.registry(), accepting);
    }

    /// Registers a worker's channel: in the loop's own set, or in the channel set if the
    /// worker answers hand-offs one by one (see [`channel_set`]).
    fn register_channel(
        &mut self,
        ch: &mut Box<dyn WorkerChannel>,
        id: WorkerId,
    ) -> io::Result<()> {
        let t = token(KIND_CHANNEL, id.0);
        if ch.answers_one_by_one() {
            self.channels.register(ch, t)
        } else {
            self.poll
                .registry()
                .register(ch, t, mio::Interest::READABLE)
        }
    }

    /// Reads every channel the channel set reports ready.
    fn read_ready_channels(&mut self) {
        let mut ready = std::mem::take(&mut self.channels_ready);
        ready.clear();
        // A failed read (never seen: the set's fd is ours and valid) leaves each channel's
        // readiness queued in the set, and the next pass re-registers the set, which reports it.
        let _ = self.channels.read_ready(&mut ready);
        for &(id, readable, writable) in &ready {
            self.channel_ready(id, readable, writable);
            self.drop_doomed();
        }
        self.channels_ready = ready;
    }

    /// Sets the scheduling policy of the calling thread, the one that then runs the loop
    /// ([`MasterBuilder::loop_scheduling`]); before [`EventLoop::run`], so that a refusal
    /// fails the start.
    pub(crate) fn schedule_this_thread(&mut self) -> Result<(), MasterError> {
        let rule = match self.cfg.loop_scheduling {
            LoopScheduling::Normal => return Ok(()),
            LoopScheduling::Batch => return self.batch_this_thread(),
            LoopScheduling::BatchWhileBehind(rule) => rule,
        };
        // Only from SCHED_OTHER, the policy it comes back to; any other was the starter's
        // choice. Where the policy cannot be read, the loop stays as it is.
        if let Ok(normal) = sys::ThreadPolicy::of_this_thread()
            && normal.policy == libc::SCHED_OTHER
        {
            self.batch_while_behind = Some(BatchWhileBehindState {
                rule,
                guard: ForeignCpuGuard::new(rule.max_foreign_cpu_percent),
                normal,
                waits_as_batch: false,
                reader: cpu_times::CpuTimesReader::default(),
            });
            self.workers_need_normal_policy = true;
        }
        Ok(())
    }

    fn batch_this_thread(&mut self) -> Result<(), MasterError> {
        let moving = |e| MasterError::io("move the event loop to SCHED_BATCH", e);
        let mut policy = sys::ThreadPolicy::of_this_thread().map_err(moving)?;
        match policy.policy {
            libc::SCHED_OTHER => {}
            // The starter's own choice, which workers inherit as they would without the option.
            libc::SCHED_BATCH => return Ok(()),
            other => return Err(MasterError::SchedulingPolicy { policy: other }),
        }
        policy.policy = libc::SCHED_BATCH;
        policy.apply_to_this_thread().map_err(moving)?;
        self.workers_need_normal_policy = true;
        Ok(())
    }

    /// Under [`LoopScheduling::BatchWhileBehind`], moves the loop thread to the policy the
    /// coming wait should be made under, given the fewest hand-offs a worker has unanswered.
    fn schedule_the_wait(&mut self, fewest_unanswered: Option<usize>) {
        let Some(state) = self.batch_while_behind.as_mut() else {
            return;
        };
        let behind = coalesce::every_worker_behind(fewest_unanswered, state.rule.min_unanswered);
        if behind && state.guard.wants_sample(self.now) {
            // Unreadable counters leave the last verdict to age out (2 s at most): the loop
            // then stays SCHED_OTHER.
            let pids = self.fleet.workers.values().map(|w| w.pid);
            if let Ok(times) = state.reader.read(pids) {
                state.guard.record(self.now, times);
            }
        }
        let batch = behind && state.guard.allows_batch(self.now);
        if batch != state.waits_as_batch {
            let mut policy = state.normal;
            if batch {
                policy.policy = libc::SCHED_BATCH;
            }
            match policy.apply_to_this_thread() {
                Ok(()) => {
                    state.waits_as_batch = batch;
                    self.fleet.stats.loop_policy_switches += 1;
                }
                // Refused on the way to SCHED_BATCH (a seccomp filter, an LSM): the thread is
                // still SCHED_OTHER, and the rule is given up.
                Err(_) if batch => {
                    self.batch_while_behind = None;
                    return;
                }
                // Refused on the way back: tried again before the next wait that may block.
                Err(_) => {}
            }
        }
        if state.waits_as_batch {
            self.fleet.stats.batch_waits += 1;
        }
    }

    pub(crate) fn run(mut self) -> Result<(), MasterError> {
        self.supervise(Supervision::start);
        let mut events = Events::with_capacity(256);
        let result = loop {
            self.watch_writability_where_output_waits();
            self.watch_channels_unless_accepting();
            self.timer_due = self.next_deadline();
            let resumable = !self.paused.is_empty() && self.events.room_to_resume();
            let mut timeout = if self.unread.is_empty()
                && !resumable
                && !self.notify_unread
                && !self.channels.has_more()
            {
                self.timer_due
                    .map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if !self.channels.watched() {
                let cap = channel_set::LAZY_READ_DELAY;
                timeout = Some(timeout.map_or(cap, |t| t.min(cap)));
            }
            let blocks = timeout.is_none_or(|t| !t.is_zero());
            let fewest_unanswered =
                if blocks && (self.cfg.coalesce.is_some() || self.batch_while_behind.is_some()) {
                    coalesce::fewest_unanswered(
                        self.fleet
                            .workers
                            .values()
                            .filter_map(|w| self.unanswered_if_dealt_to(w)),
                    )
                } else {
                    None
                };
            if blocks {
                self.schedule_the_wait(fewest_unanswered);
            }
            let pause = coalesce::pause_before_wait(self.cfg.coalesce, timeout, fewest_unanswered);
            if !pause.is_zero() {
                // A plain sleep: epoll keeps what becomes ready meanwhile for the wait below.
                std::thread::sleep(pause);
                self.fleet.stats.coalesced_pauses += 1;
                timeout = timeout.map(|t| t.saturating_sub(pause));
            }
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                break Err(MasterError::io("epoll_wait", e));
            }
            self.now = Instant::now();
            let mut read_channels = self.channels.must_read();
            for ev in events.iter() {
                let (kind, id) = split_token(ev.token());
                match kind {
                    KIND_LISTENER => self.accept_ready(ServerId(id)),
                    KIND_CHANNEL => {
                        self.channel_ready(WorkerId(id), ev.is_readable(), ev.is_writable())
                    }
                    KIND_CHANNEL_SET => read_channels = true,
                    KIND_PIDFD => self.reap(WorkerId(id)),
                    KIND_STDOUT => self.output_ready(WorkerId(id), false),
                    KIND_STDERR => self.output_ready(WorkerId(id), true),
                    KIND_NOTIFY => self.notify_ready(),
                    _ => {}
                }
                self.drop_doomed();
            }
            if read_channels {
                self.read_ready_channels();
            }
            if self.notify_unread {
                self.notify_ready();
            }
            self.run_commands();
            self.on_timers();
            self.retry_backlogged();
            self.resume_unread();
            self.resume_paused();
            self.drop_doomed();
            self.close_kept_servers_once_nobody_starts();
            self.tell_manager();
            self.reap_orphans();
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
        // One verdict for the embedder: a stop is clean when it closed no connection unserved
        // and every worker left as asked.
        let closed_by_stop = self.fleet.stats.closed_unserved
            - self
                .unserved_before_stop
                .unwrap_or(self.fleet.stats.closed_unserved);
        let clean = result.is_ok() && closed_by_stop == 0 && self.unclean_exits == 0;
        self.manager_stopping();
        self.emit(Event::Stopped { clean });
        result
    }

    /// When `w` must have answered its oldest unanswered hand-off (on any server) or be dropped
    /// as stuck. `None` for a worker being dropped already: it is SIGKILLed, and what it held
    /// waits for its exit.
    fn ack_deadline(&self, w: &WorkerRec) -> Option<Instant> {
        // A paused channel (a user message held while the embedder is behind) is the master
        // not reading the worker's answers, not the worker failing to give them.
        if w.dropping || w.held_message.is_some() {
            return None;
        }
        self.round_robin_handles(w)
            .filter_map(|handle| handle.oldest_unanswered(w.id))
            .min()
            .map(|sent| sent + self.cfg.effective_ack_timeout())
    }

    /// The round-robin handles of the servers `w` holds: they are the one record of what was
    /// handed to it.
    fn round_robin_handles<'a>(
        &'a self,
        w: &'a WorkerRec,
    ) -> impl Iterator<Item = &'a RoundRobinHandle<AcceptedConn>> + 'a {
        w.servers
            .iter()
            .filter_map(|sid| match &self.servers.get(sid)?.kind {
                ServerKind::RoundRobin { handle, .. } => Some(&**handle),
                _ => None,
            })
    }

    /// Hand-offs sent to `w` and not answered, over all its servers.
    fn in_flight_to(&self, w: &WorkerRec) -> usize {
        self.round_robin_handles(w)
            .map(|handle| handle.in_flight_to(w.id))
            .sum()
    }

    /// Hand-offs sent to `w` and not answered, if round-robin connections are dealt to it (it
    /// holds a round-robin server and is not being dropped), as [`Coalesce`](crate::Coalesce)
    /// counts them: a worker that answers a whole read's hand-offs in one frame (native) counts
    /// as never behind. Its answers already come in batches that the loop reads as they arrive,
    /// so a pause saves no wake-up and adds a timer's: with it, the master's CPU per close
    /// request of native hello workers rose from 12.9 to 14.3 µs (means of 4 sets).
    fn unanswered_if_dealt_to(&self, w: &WorkerRec) -> Option<usize> {
        if w.dropping {
            return None;
        }
        let answers_one_by_one = w.channel.as_ref()?.answers_one_by_one();
        let mut handles = self.round_robin_handles(w).peekable();
        handles.peek()?;
        Some(if answers_one_by_one {
            handles.map(|handle| handle.in_flight_to(w.id)).sum()
        } else {
            0
        })
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
        consider(self.manager.as_ref().and_then(|m| m.next_ping()));
        consider(self.orphans.as_ref().map(|o| o.next_sweep()));
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

    // ---------------------------------------------------------------- timers

    fn on_timers(&mut self) {
        let now = self.now;
        // Only a deadline known before the poll can be due now; one set during this pass
        // sets the next poll's timeout instead. This keeps the scan off the hot path.
        if self.timer_due.is_none_or(|t| t > now) {
            return;
        }
        self.supervise(Supervision::on_timers);
        let ack_timeout = self.cfg.effective_ack_timeout();
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
                run_actions(sid, handle, &mut self.fleet, self.now);
            }
        }
    }
}

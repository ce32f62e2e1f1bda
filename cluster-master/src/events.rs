//! What the master reports ([`Event`], [`WorkerInfo`], [`MasterStats`]) and what it is told
//! ([`Command`]): the vocabulary shared by the [`crate::Master`] handle and the event loop, so
//! that neither imports the other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};
use std::time::Duration;

use cluster_core::{BoundAddr, ServerId, WorkerId};
use mio::Waker;

use crate::MasterError;

/// Bulk events (user messages and output lines, which workers can send at any rate) that may
/// wait unread by the embedder. At the bound the master stops reading from the workers that
/// send them, so the kernel's socket and pipe buffers hold the rest and the senders block.
pub(crate) const MAX_UNREAD_BULK: usize = 1024;
/// Reading resumes once the embedder has taken the queue down to this.
pub(crate) const RESUME_BULK: usize = MAX_UNREAD_BULK / 2;

/// What the event loop and the [`EventReceiver`] share to keep the unread bulk bounded.
#[derive(Debug)]
struct Backlog {
    unread_bulk: AtomicUsize,
    /// The loop stopped reading some worker for want of room and waits for a wake-up.
    loop_waiting: AtomicBool,
    waker: Arc<Waker>,
}

/// The loop's end of the event queue.
#[derive(Debug)]
pub(crate) struct EventSender {
    tx: Sender<Event>,
    backlog: Arc<Backlog>,
}

/// The receiving end of a master's [`Event`]s ([`crate::Master::events`]), with the methods of
/// [`std::sync::mpsc::Receiver`].
///
/// Lifecycle events are never held back. User messages ([`Event::Message`]) and output lines
/// ([`Event::Output`]) are: at most about a thousand of them wait here unread; past that the
/// master reads nothing more from the workers sending them until this receiver has been drained
/// to half. So an embedder that reads slowly slows those workers down instead of letting the
/// master's memory grow.
#[derive(Debug)]
pub struct EventReceiver {
    rx: Receiver<Event>,
    backlog: Arc<Backlog>,
}

/// A new event queue whose receiver wakes the loop through `waker` when bulk room returns.
pub(crate) fn event_queue(waker: Arc<Waker>) -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::channel();
    let backlog = Arc::new(Backlog {
        unread_bulk: AtomicUsize::new(0),
        loop_waiting: AtomicBool::new(false),
        waker,
    });
    (
        EventSender {
            tx,
            backlog: Arc::clone(&backlog),
        },
        EventReceiver { rx, backlog },
    )
}

impl Event {
    /// User messages and output lines: events a worker can produce at any rate.
    fn is_bulk(&self) -> bool {
        matches!(
            self,
            Event::Message { .. } | Event::Output { .. } | Event::Status { .. }
        )
    }
}

impl EventSender {
    /// Queues `e`. Bulk events are counted: call [`EventSender::has_room`] before reading
    /// what produces them.
    pub(crate) fn emit(&self, e: Event) {
        if e.is_bulk() {
            self.backlog.unread_bulk.fetch_add(1, Ordering::SeqCst);
        }
        // Nobody listening is not an error: events are a courtesy to the owner.
        if self.tx.send(e).is_err() {
            self.backlog.unread_bulk.store(0, Ordering::SeqCst);
        }
    }

    /// Whether another bulk event may be produced now.
    pub(crate) fn has_room(&self) -> bool {
        self.backlog.unread_bulk.load(Ordering::SeqCst) < MAX_UNREAD_BULK
    }

    /// The loop is about to stop reading a worker for want of room: ask the receiver for a
    /// wake-up. Returns true when room came back meanwhile, so nothing needs to wait.
    pub(crate) fn wait_for_room(&self) -> bool {
        self.backlog.loop_waiting.store(true, Ordering::SeqCst);
        // Checked after the flag, so a receiver that drained in between either sees the flag
        // (and wakes the loop) or left a count this load sees.
        self.room_to_resume()
    }

    /// Whether the embedder has read enough for paused workers to be read again.
    pub(crate) fn room_to_resume(&self) -> bool {
        self.backlog.unread_bulk.load(Ordering::SeqCst) <= RESUME_BULK
    }
}

impl EventReceiver {
    fn took(&self, e: Event) -> Event {
        if e.is_bulk() {
            let left = self
                .backlog
                .unread_bulk
                .fetch_sub(1, Ordering::SeqCst)
                .saturating_sub(1);
            if left <= RESUME_BULK && self.backlog.loop_waiting.swap(false, Ordering::SeqCst) {
                // A failed wake means the loop is gone; nothing waits for room then.
                let _ = self.backlog.waker.wake();
            }
        }
        e
    }

    /// Blocks for the next event; `Err` once the master has stopped and every event was read.
    pub fn recv(&self) -> Result<Event, RecvError> {
        self.rx.recv().map(|e| self.took(e))
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(timeout).map(|e| self.took(e))
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.rx.try_recv().map(|e| self.took(e))
    }

    /// Every event until the master stops.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        std::iter::from_fn(|| self.recv().ok())
    }
}

/// Something that happened in the cluster, in Node's vocabulary plus supervision events.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was spawned.
    Fork {
        /// Its id.
        worker: WorkerId,
        /// Its slot.
        slot: usize,
        /// Its pid.
        pid: u32,
    },
    /// The worker's runtime is up.
    Online {
        /// The worker.
        worker: WorkerId,
    },
    /// The worker is taking connections on a server.
    Listening {
        /// The worker.
        worker: WorkerId,
        /// The master's id for the server.
        server: ServerId,
        /// The address (the real port for `listen(0)`).
        addr: BoundAddr,
    },
    /// The worker sent `READY=1` to its `NOTIFY_SOCKET`.
    Ready {
        /// The worker.
        worker: WorkerId,
    },
    /// The worker sent `STATUS=...` to its `NOTIFY_SOCKET`.
    Status {
        /// The worker.
        worker: WorkerId,
        /// What it said.
        status: String,
    },
    /// A user message from a worker.
    Message {
        /// The sender.
        worker: WorkerId,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// A Node worker sent a handle with a message (`process.send(msg, handle)`). The message
    /// is delivered as [`Event::Message`]; the handle is acknowledged to the worker and closed,
    /// since events carry no fds (a sent socket's client sees the connection close). Emitted
    /// once per master, for the first such handle.
    HandleClosed {
        /// The worker that sent the first one.
        worker: WorkerId,
    },
    /// The worker's channel closed.
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
    /// The worker was dropped for breaking the protocol; it is killed and its connections
    /// go to the others.
    Dropped {
        /// The worker.
        worker: WorkerId,
        /// What it did.
        reason: String,
    },
    /// A worker process ended.
    Exit {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: usize,
        /// Its pid.
        pid: u32,
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal number, if a signal ended it.
        signal: Option<i32>,
        /// It left because it was told to (or said it would): not a crash.
        exited_after_disconnect: bool,
        /// It left as asked: exit 0 after a disconnect, or death by the stop signal the
        /// master sent it (see [`crate::MasterBuilder::stop_signal`]).
        clean: bool,
    },
    /// A crashed slot will get a new worker after this delay.
    Restarting {
        /// The slot.
        slot: usize,
        /// The backoff delay.
        after: Duration,
    },
    /// A slot crashed repeatedly right after start and will not be restarted.
    SlotErrored {
        /// The slot.
        slot: usize,
        /// The last exit, for the log.
        reason: String,
    },
    /// A line a worker wrote to stdout or stderr (with `capture_output`).
    Output {
        /// The worker.
        worker: WorkerId,
        /// Its pid.
        pid: u32,
        /// True for stderr.
        stderr: bool,
        /// The line, without its newline (lossy UTF-8).
        line: String,
    },
    /// A rolling reload finished: every slot runs a new worker.
    ReloadDone,
    /// A rolling reload stopped; the workers not yet replaced keep serving.
    ReloadFailed {
        /// Why.
        reason: String,
    },
    /// The master stopped (after shutdown, or because every slot errored).
    Stopped {
        /// True when the stop was asked for, every worker left as asked (exit 0 after
        /// disconnect, or death by the stop signal) and the stop closed no connection unserved.
        clean: bool,
    },
}

/// One worker as reported by [`crate::MasterControl::workers`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id.
    pub id: WorkerId,
    /// Its slot.
    pub slot: usize,
    /// Its pid.
    pub pid: u32,
    /// Where it is in its life.
    pub state: WorkerState,
    /// Hand-offs sent to it and not yet answered.
    pub in_flight: usize,
}

/// A worker's lifecycle, as Node's: spawned, online, listening, disconnecting, exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// Forked, runtime not yet up.
    Spawned,
    /// Runtime up.
    Online,
    /// Taking connections on at least one server.
    Listening,
    /// Told to finish and exit (or said it would).
    Disconnecting,
    /// The channel is gone; the process has not been reaped yet.
    Disconnected,
}

/// Counters for the whole master.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasterStats {
    /// Connections accepted by the master.
    pub accepted: u64,
    /// Hand-offs sent.
    pub handed_off: u64,
    /// `NewConn` frames (one `sendmsg` each) that carried them: a master that accepted several
    /// connections for one worker in one pass sends them in one frame.
    pub handoff_frames: u64,
    /// Hand-offs a worker took.
    pub taken: u64,
    /// Hand-offs refused and re-routed.
    pub refused: u64,
    /// Connections in flight to a worker that died, re-queued.
    pub requeued: u64,
    /// Connections closed by the master without a worker taking them.
    pub closed_unserved: u64,
    /// Answers for hand-offs the worker no longer held (it had closed that server); ignored.
    pub stray_answers: u64,
    /// Connections waiting in the master.
    pub pending: usize,
    /// Pauses the loop took before waiting, every worker being behind ([`crate::Coalesce`]).
    pub coalesced_pauses: u64,
    /// Waits the loop made as `SCHED_BATCH` because every worker was behind and the machine
    /// served mostly this cluster ([`crate::BatchWhileBehind`]).
    pub batch_waits: u64,
    /// Times the loop moved its thread between `SCHED_OTHER` and `SCHED_BATCH` (each a
    /// system call) under [`crate::BatchWhileBehind`].
    pub loop_policy_switches: u64,
}

/// A request from a [`crate::MasterControl`] to the event loop.
pub(crate) enum Command {
    Scale(isize),
    Send(WorkerId, Vec<u8>, mpsc::SyncSender<Result<(), MasterError>>),
    Disconnect(WorkerId),
    Kill(WorkerId, i32),
    Reload,
    Shutdown,
    ForceShutdown,
    Workers(mpsc::SyncSender<Vec<WorkerInfo>>),
    Stats(mpsc::SyncSender<MasterStats>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Scale(_) => "Scale",
            Command::Send(..) => "Send",
            Command::Disconnect(_) => "Disconnect",
            Command::Kill(..) => "Kill",
            Command::Reload => "Reload",
            Command::Shutdown => "Shutdown",
            Command::ForceShutdown => "ForceShutdown",
            Command::Workers(_) => "Workers",
            Command::Stats(_) => "Stats",
        })
    }
}

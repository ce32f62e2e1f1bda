//! What the master reports ([`Event`], [`WorkerInfo`], [`MasterStats`]) and what it is told
//! ([`Command`]): the vocabulary shared by the [`crate::Master`] handle and the event loop, so
//! that neither imports the other.

use std::sync::mpsc;
use std::time::Duration;

use cluster_core::{BoundAddr, ServerId, WorkerId};

use crate::MasterError;

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
    /// A user message from a worker.
    Message {
        /// The sender.
        worker: WorkerId,
        /// The bytes.
        payload: Vec<u8>,
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
        /// True when every worker exited cleanly after disconnect.
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

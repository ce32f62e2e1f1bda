use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use cluster_core::{BoundAddr, ServerId, WorkerId};

use crate::event_loop::EventLoop;
use crate::{MasterBuilder, MasterError};

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

/// One worker as reported by [`MasterControl::workers`].
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

/// A running master: an event loop thread that owns the listeners and the workers.
///
/// Methods send commands to the loop and return at once; what follows is reported as
/// [`Event`]s on [`Master::events`]. Drain the events: they queue until read. To command the
/// master from other threads (a signal thread, say), take a [`MasterControl`] with
/// [`Master::control`].
#[derive(Debug)]
pub struct Master {
    control: MasterControl,
    events: Receiver<Event>,
    thread: Option<JoinHandle<Result<(), MasterError>>>,
    listen_fds: Vec<(String, BoundAddr)>,
}

/// A cloneable, thread-safe handle that sends commands to a [`Master`]'s event loop.
#[derive(Clone, Debug)]
pub struct MasterControl {
    commands: Sender<Command>,
    waker: Arc<mio::Waker>,
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

impl Master {
    /// A handle for commanding this master from any thread.
    pub fn control(&self) -> MasterControl {
        self.control.clone()
    }

    /// The events of this master.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// The sockets pre-bound for [`MasterBuilder::listen_fd`], in order (fd 3 first), each
    /// with its name and the address it is bound to: a port-0 spec shows its real port here.
    pub fn listen_fds(&self) -> &[(String, BoundAddr)] {
        &self.listen_fds
    }

    /// Waits for the loop to stop (after [`MasterControl::shutdown`], or when every slot
    /// errored).
    pub fn wait(mut self) -> Result<(), MasterError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| MasterError::Stopped)?,
            None => Ok(()),
        }
    }

    /// Starts from a builder (same as [`MasterBuilder::start`]).
    pub fn start(config: MasterBuilder) -> Result<Master, MasterError> {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        let event_loop = EventLoop::new(config, cmd_rx, ev_tx)?;
        let waker = event_loop.waker();
        let listen_fds = event_loop.prebound_addrs();
        let thread = std::thread::Builder::new()
            .name("cluster-master".into())
            .spawn(move || event_loop.run())
            .map_err(|e| MasterError::io("spawn the event loop thread", e))?;
        Ok(Master {
            control: MasterControl {
                commands: cmd_tx,
                waker,
            },
            events: ev_rx,
            thread: Some(thread),
            listen_fds,
        })
    }
}

impl std::ops::Deref for Master {
    type Target = MasterControl;

    /// Every command of [`MasterControl`] is available on the master itself.
    fn deref(&self) -> &MasterControl {
        &self.control
    }
}

impl MasterControl {
    fn command(&self, c: Command) -> Result<(), MasterError> {
        self.commands.send(c).map_err(|_| MasterError::Stopped)?;
        self.waker
            .wake()
            .map_err(|e| MasterError::io("wake the event loop", e))
    }

    /// Adds one worker slot and forks its worker (Node's `cluster.fork()`).
    pub fn fork(&self) -> Result<(), MasterError> {
        self.command(Command::Scale(1))
    }

    /// Removes the last worker slot, disconnecting its worker gracefully.
    pub fn remove_one(&self) -> Result<(), MasterError> {
        self.command(Command::Scale(-1))
    }

    /// Sends a user message to a worker.
    pub fn send(&self, worker: WorkerId, payload: Vec<u8>) -> Result<(), MasterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.command(Command::Send(worker, payload, tx))?;
        rx.recv().map_err(|_| MasterError::Stopped)?
    }

    /// Tells a worker to finish and exit; it is not restarted (`exited_after_disconnect`).
    pub fn disconnect(&self, worker: WorkerId) -> Result<(), MasterError> {
        self.command(Command::Disconnect(worker))
    }

    /// Sends a signal to a worker (as Node's `worker.kill`, without disconnecting first). A
    /// worker killed this way counts as crashed and is restarted.
    pub fn kill(&self, worker: WorkerId, signal: i32) -> Result<(), MasterError> {
        self.command(Command::Kill(worker, signal))
    }

    /// Rolling reload: one slot at a time, a new worker must reach `listening` before the old
    /// one is disconnected. If a new worker fails, the reload stops and the rest stay.
    pub fn reload(&self) -> Result<(), MasterError> {
        self.command(Command::Reload)
    }

    /// Graceful stop: disconnect every worker, kill those still running after the shutdown
    /// timeout, then stop the loop (Node's `disconnect()` on all workers).
    pub fn shutdown(&self) -> Result<(), MasterError> {
        self.command(Command::Shutdown)
    }

    /// Same as [`MasterControl::shutdown`] (Node's name).
    pub fn disconnect_all(&self) -> Result<(), MasterError> {
        self.shutdown()
    }

    /// Stop now: SIGKILL every worker.
    pub fn force_shutdown(&self) -> Result<(), MasterError> {
        self.command(Command::ForceShutdown)
    }

    /// The current workers.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>, MasterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.command(Command::Workers(tx))?;
        rx.recv().map_err(|_| MasterError::Stopped)
    }

    /// Counters.
    pub fn stats(&self) -> Result<MasterStats, MasterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.command(Command::Stats(tx))?;
        rx.recv().map_err(|_| MasterError::Stopped)
    }
}

impl Drop for Master {
    /// A master dropped without `wait` kills its workers: none may outlive the handle.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.command(Command::ForceShutdown);
            let _ = t.join();
        }
    }
}

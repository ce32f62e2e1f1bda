use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use cluster_core::{BoundAddr, WorkerId};

use crate::event_loop::EventLoop;
use crate::events::{Command, EventReceiver, MasterStats, WorkerInfo};
use crate::{MasterBuilder, MasterError};

/// A running master: an event loop thread that owns the listeners and the workers.
///
/// Methods send commands to the loop and return at once; what follows is reported as
/// [`crate::Event`]s on [`Master::events`]. Drain the events: they queue until read. To command the
/// master from other threads (a signal thread, say), take a [`MasterControl`] with
/// [`Master::control`].
#[derive(Debug)]
pub struct Master {
    control: MasterControl,
    events: EventReceiver,
    thread: Option<JoinHandle<Result<(), MasterError>>>,
    listen_fds: Vec<(String, BoundAddr)>,
    inherited: Vec<(String, BoundAddr)>,
}

/// A cloneable, thread-safe handle that sends commands to a [`Master`]'s event loop.
#[derive(Clone, Debug)]
pub struct MasterControl {
    commands: Sender<Command>,
    waker: Arc<mio::Waker>,
}

impl Master {
    /// A handle for commanding this master from any thread.
    pub fn control(&self) -> MasterControl {
        self.control.clone()
    }

    /// The events of this master.
    pub fn events(&self) -> &EventReceiver {
        &self.events
    }

    /// The sockets pre-bound for [`MasterBuilder::listen_fd`], in order (fd 3 first), each
    /// with its name and the address it is bound to: a port-0 spec shows its real port here.
    pub fn listen_fds(&self) -> &[(String, BoundAddr)] {
        &self.listen_fds
    }

    /// The sockets this master adopted through socket activation
    /// ([`MasterBuilder::socket_activation`]), in `LISTEN_FDS` order, with their names.
    pub fn inherited_sockets(&self) -> &[(String, BoundAddr)] {
        &self.inherited
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
        let (event_loop, ev_rx) = EventLoop::new(config, cmd_rx)?;
        let waker = event_loop.waker();
        let listen_fds = event_loop.prebound_addrs();
        let inherited = event_loop.inherited_sockets();
        // The thread's scheduling policy is its own, so it sets it itself; a refusal must fail
        // the start, not the first `wait`.
        let (scheduled_tx, scheduled_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("cluster-master".into())
            .spawn(move || {
                let mut event_loop = event_loop;
                let scheduled = event_loop.schedule_this_thread();
                let refused = scheduled.is_err();
                let _ = scheduled_tx.send(scheduled);
                if refused {
                    return Ok(());
                }
                event_loop.run()
            })
            .map_err(|e| MasterError::io("spawn the event loop thread", e))?;
        match scheduled_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(MasterError::Stopped);
            }
        }
        Ok(Master {
            control: MasterControl {
                commands: cmd_tx,
                waker,
            },
            events: ev_rx,
            thread: Some(thread),
            listen_fds,
            inherited,
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
    /// worker killed this way counts as crashed and is restarted. The signal reaches the
    /// worker alone, not the processes it started (a stop, or the SIGKILL after the shutdown
    /// timeout, reaches its whole process group).
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

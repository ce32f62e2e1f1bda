use std::io;

/// Errors of the master library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the master was doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A pre-bound listen (`listen_fd`) could not be bound.
    #[error(transparent)]
    Listen(#[from] cluster_core::ListenError),
    /// [`crate::LoopScheduling::Batch`] was asked of a master started under a
    /// scheduling policy other than `SCHED_OTHER` or `SCHED_BATCH` (idle, real-time): the loop
    /// would have to leave a policy its starter chose.
    #[error(
        "batch scheduling asks to move the event loop from SCHED_OTHER, but the master was started under scheduling policy {policy}"
    )]
    SchedulingPolicy {
        /// The policy the master was started under (`SCHED_IDLE` is 5, `SCHED_FIFO` 1, ...).
        policy: i32,
    },
    /// The event loop thread is gone (it panicked or already stopped).
    #[error("the master's event loop has stopped")]
    Stopped,
    /// Every worker slot crashed repeatedly right after start and was given up.
    #[error("all {slots} worker slots errored: {last}")]
    AllSlotsErrored {
        /// How many slots.
        slots: usize,
        /// The last crash seen, for the one-line reason.
        last: String,
    },
    /// No worker with that id is running.
    #[error("no worker {0}")]
    NoSuchWorker(cluster_core::WorkerId),
    /// The worker has not read what was already sent to it; nothing more is queued for it.
    #[error("worker {worker} is not reading its channel ({queued} bytes wait for it)")]
    WorkerBackedUp {
        /// The worker.
        worker: cluster_core::WorkerId,
        /// Bytes queued for it.
        queued: usize,
    },
}

impl MasterError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        MasterError::Io {
            context: context.into(),
            source,
        }
    }
}

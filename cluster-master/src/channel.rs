//! The master's view of a worker channel: the native framing ([`Channel`]) or Node's own IPC
//! (JSON lines plus `SCM_RIGHTS`, for unmodified Node.js workers); the handles and the event
//! loop only speak [`cluster_core::Message`].

use std::fmt::Debug;
use std::os::fd::BorrowedFd;

use cluster_core::Message;
use cluster_ipc::{Channel, IpcError, Received};
use mio::event::Source;

/// A bidirectional, non-blocking message channel to one worker, registrable in mio
/// (edge-triggered: `recv` until `Ok(None)`, `flush` on writable).
pub trait WorkerChannel: Source + Debug + Send {
    /// Queues `msg` with `fds` (the caller keeps its fds); never blocks.
    fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError>;
    /// The next message, `Ok(None)` when nothing more is available now.
    fn recv(&mut self) -> Result<Option<Received>, IpcError>;
    /// Writes queued output; `Ok(false)` when the socket is full.
    fn flush(&mut self) -> Result<bool, IpcError>;
    /// Bytes queued for the worker that it has not read yet (beyond the socket buffer).
    fn pending_output_bytes(&self) -> usize;
    /// Fds the master keeps for frames the worker has not read yet.
    fn pending_output_fds(&self) -> usize;
    /// The socket reported readiness (see [`Channel::note_readable`]): data may have arrived
    /// since a read that found it empty.
    fn note_readable(&mut self) {}
    /// The most connections one [`Message::NewConn`] sent here may carry (at least 1).
    fn max_handoff_batch(&self) -> usize {
        cluster_core::MAX_HANDOFF_BATCH
    }
    /// Whether the worker writes what it answers one hand-off at a time, in more than one
    /// write each (a Node worker: the handle's ACK, then the answer line). Watched, such a
    /// channel wakes the master about once per write, so the master reads it on each pass
    /// instead while it is accepting connections.
    fn answers_one_by_one(&self) -> bool {
        false
    }
}

impl WorkerChannel for Channel {
    fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        Channel::send(self, msg, fds)
    }

    fn recv(&mut self) -> Result<Option<Received>, IpcError> {
        Channel::recv(self)
    }

    fn flush(&mut self) -> Result<bool, IpcError> {
        Channel::flush(self)
    }

    fn pending_output_bytes(&self) -> usize {
        Channel::pending_output_bytes(self)
    }

    fn pending_output_fds(&self) -> usize {
        Channel::pending_output_fds(self)
    }

    fn note_readable(&mut self) {
        Channel::note_readable(self);
    }
}

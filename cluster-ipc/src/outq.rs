//! [`OutQueue`]: what a non-blocking stream socket could not take yet, kept so that `EAGAIN`
//! loses nothing and never sends an fd twice. Shared by [`crate::Channel`] (our frames) and
//! the master's channel to Node workers (JSON lines), which differ only in what they write.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// Fd-less writes appended to one queued buffer at most: enough for hundreds of answers (a
/// `Refused` frame is under 32 bytes), small enough that appending never copies much.
const COALESCE_LIMIT: usize = 64 * 1024;

/// One `sendmsg`'s worth waiting for the socket, or several fd-less writes packed together.
/// Its fds are attached only while nothing of it has been written: once the first byte is
/// out, the fds are out too (hazard A7).
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    written: usize,
    fds: Vec<OwnedFd>,
}

/// The bytes (with fds) a stream socket has not taken yet, oldest first, with O(1) counts of
/// what waits so a caller can bound a peer that does not read.
#[derive(Debug, Default)]
pub struct OutQueue {
    q: VecDeque<Outgoing>,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Fds held for entries not yet started.
    fds: usize,
    /// The buffer of the last fully written entry, reused so steady batching allocates nothing.
    recycled: Vec<u8>,
}

impl OutQueue {
    /// An empty queue.
    pub fn new() -> OutQueue {
        OutQueue::default()
    }

    /// Writes `bytes` with `fds` attached to their first byte on `sock` at once when nothing is
    /// queued; whatever the socket does not take is queued (with duplicates of the fds if none
    /// of it went out), behind everything queued before. Never blocks.
    pub fn send(
        &mut self,
        sock: BorrowedFd<'_>,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if self.q.is_empty() {
            match sys::send_with_fds(sock, bytes, fds) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    // The fds left with the first chunk; the rest goes without them.
                    self.bytes += bytes.len() - n;
                    self.q.push_back(Outgoing {
                        bytes: bytes.to_vec(),
                        written: n,
                        fds: Vec::new(),
                    });
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if fds.is_empty() {
            // A peer that reads nothing costs one growing buffer, not an entry per write.
            self.append_with(|buf| {
                buf.extend_from_slice(bytes);
                Ok::<(), io::Error>(())
            })?;
            return Ok(());
        }
        // Nothing of this write is out: keep our own references to its fds until it is.
        let owned = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()?;
        self.fds += owned.len();
        self.bytes += bytes.len();
        self.q.push_back(Outgoing {
            bytes: bytes.to_vec(),
            written: 0,
            fds: owned,
        });
        Ok(())
    }

    /// Queues fd-less bytes written by `fill` into the queue's tail buffer (a new one when the
    /// tail carries fds or is full), without sending anything. If `fill` fails, what it wrote
    /// is taken back.
    pub fn append_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let reuse_tail = self
            .q
            .back()
            .is_some_and(|o| o.fds.is_empty() && o.bytes.len() < COALESCE_LIMIT);
        if !reuse_tail {
            let mut bytes = std::mem::take(&mut self.recycled);
            bytes.clear();
            self.q.push_back(Outgoing {
                bytes,
                written: 0,
                fds: Vec::new(),
            });
        }
        let Some(tail) = self.q.back_mut() else {
            // Unreachable: an entry was pushed above if there was none.
            return Ok(());
        };
        let before = tail.bytes.len();
        if let Err(e) = fill(&mut tail.bytes) {
            tail.bytes.truncate(before);
            if tail.bytes.is_empty() {
                self.q.pop_back();
            }
            return Err(e);
        }
        self.bytes += tail.bytes.len() - before;
        Ok(())
    }

    /// Writes queued bytes until done (`Ok(true)`) or the socket is full (`Ok(false)`: wait
    /// for writability).
    pub fn flush(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        while let Some(out) = self.q.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = if out.written == 0 {
                out.fds.iter().map(|f| f.as_fd()).collect()
            } else {
                Vec::new()
            };
            match sys::send_with_fds(sock, &out.bytes[out.written..], &fds) {
                Ok(n) => {
                    out.written += n;
                    self.bytes -= n;
                    if n > 0 {
                        self.fds -= out.fds.len();
                        out.fds.clear();
                    }
                    if out.written == out.bytes.len()
                        && let Some(done) = self.q.pop_front()
                        && done.bytes.capacity() <= COALESCE_LIMIT * 2
                    {
                        self.recycled = done.bytes;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// True while bytes wait for the socket.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// Fds kept for writes not yet started (each a duplicate the peer has not taken).
    pub fn pending_fds(&self) -> usize {
        self.fds
    }

    /// Queued entries (separate `sendmsg`s at the least), for tests of the packing.
    pub fn entries(&self) -> usize {
        self.q.len()
    }
}

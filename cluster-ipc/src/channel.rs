use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_core::Message;
use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::error::IpcError;
use crate::frame::{self, DEFAULT_MAX_FRAME, Decoder, MAX_FDS_PER_FRAME};
use crate::outq::OutQueue;
use crate::sys;

/// Limits a channel enforces on what its peer sends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest frame body accepted (and sent).
    pub max_frame: usize,
    /// Whether the peer may attach fds at all. A master sets this to `false` for worker
    /// channels: fds never flow from a worker unless a message type needs them (hazard E4).
    pub accept_fds: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            accept_fds: true,
        }
    }
}

/// A message received together with the fds its frame declared.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub msg: Message,
    /// Its fds, owned and close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Fds that arrived together in one `recvmsg`, with the stream offsets that read covered.
///
/// The kernel hands a sendmsg's fds to the read that first touches its first byte, and one
/// read never returns two sendmsgs' fds (hazard A8). A frame is one sendmsg, so the frame that
/// owns a batch is the one whose first byte lies in `[first, end)`. Checking that exact rule,
/// instead of popping from a plain fd FIFO, catches a peer that attaches fds to a frame that
/// declares none before the fds can be handed to a later frame.
#[derive(Debug)]
struct FdBatch {
    first: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

/// A protocol violation found while reading, held back until the frames that arrived before it
/// have been delivered: a worker that answers a hand-off and then misbehaves in the same read
/// must still have its answer honoured, or the master would hand that connection out twice.
#[derive(Debug)]
struct Poison {
    /// Frames ending at or before this stream offset are clear of the violation and are still
    /// delivered; the first frame that reaches past it is where the error is reported.
    clean_end: u64,
    error: IpcError,
}

/// One end of a non-blocking `SOCK_STREAM` Unix socketpair carrying framed [`Message`]s with
/// fds attached.
///
/// # Theory of operation
/// Sending tries `sendmsg` at once; whatever the kernel does not take is queued (with dups of
/// its fds if none of the frame was written) and goes out on [`Channel::flush`], so `EAGAIN`
/// loses nothing and never sends an fd twice. Receiving reads into a [`Decoder`]; every fd
/// that arrives is owned at once and filed with the stream range of the read that brought it,
/// and each completed frame takes the batch that arrived with its first byte, which must hold
/// exactly the number of fds its header declares. A shortfall, fds on a frame that declares
/// none, or `MSG_CTRUNC` is a protocol error: the channel must be dropped (any error from
/// [`Channel::recv`] has already closed the fds it held).
///
/// A violation found in a read does not discard the rest of that read: every complete, valid
/// frame before it is still delivered, with its own fds, and only then does `recv` return the
/// error. The fds of the violating part are closed as soon as the violation is seen. After an
/// error the channel is dead: every later `recv` returns that error again.
///
/// The socket is edge-triggered under mio: after a readable event call [`Channel::recv`] until
/// it returns `Ok(None)`.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    decoder: Decoder,
    /// Stream offset just past the last byte handed to the decoder.
    read_pos: u64,
    /// Fds received but not yet claimed by a frame, oldest first.
    fd_batches: VecDeque<FdBatch>,
    /// Landing area for one `recvmsg`'s fds, kept to reuse its allocation.
    fds_in: VecDeque<OwnedFd>,
    outq: OutQueue,
    scratch: Vec<u8>,
    cmsg: Box<sys::CmsgBuf>,
    limits: Limits,
    eof: bool,
    /// A violation seen in a read, waiting for the frames before it to be delivered.
    poison: Option<Poison>,
    /// The error `recv` returned, repeated to every later call: nothing more is read.
    failed: Option<IpcError>,
    /// The last read of an fd-less channel came back short: the socket was empty then, so
    /// the next `recv` that needs bytes reports `Ok(None)` without a syscall.
    read_drained: bool,
}

impl Channel {
    /// A connected pair with default limits.
    pub fn pair() -> Result<(Channel, Channel), IpcError> {
        let (a, b) = UnixStream::pair()?;
        Ok((
            Channel::from_stream(a, Limits::default())?,
            Channel::from_stream(b, Limits::default())?,
        ))
    }

    /// Wraps a connected stream socket (made non-blocking here).
    pub fn from_stream(sock: UnixStream, limits: Limits) -> Result<Channel, IpcError> {
        sock.set_nonblocking(true)?;
        Ok(Channel {
            sock,
            decoder: Decoder::new(limits.max_frame),
            read_pos: 0,
            fd_batches: VecDeque::new(),
            fds_in: VecDeque::new(),
            outq: OutQueue::new(),
            scratch: Vec::with_capacity(64),
            cmsg: Box::new(sys::new_cmsg_buf()),
            limits,
            eof: false,
            poison: None,
            failed: None,
            read_drained: false,
        })
    }

    /// Adopts the channel a master left at fd `raw` (see [`spawn_with_channel`]), after
    /// checking that it is an open socket.
    ///
    /// Adoption makes the returned `Channel` the fd's only owner, so it happens at most once
    /// per process: every later call fails with [`io::ErrorKind::AlreadyExists`] and touches
    /// no fd (a second owner would close the number twice, the second time perhaps as an
    /// unrelated file that reused it). A failed first attempt counts too.
    ///
    /// ```no_run
    /// use cluster_ipc::{Channel, Limits};
    ///
    /// let chan = Channel::from_inherited_fd(3, Limits::default())?;
    /// assert!(Channel::from_inherited_fd(3, Limits::default()).is_err());
    /// # drop(chan);
    /// # Ok::<(), cluster_ipc::IpcError>(())
    /// ```
    pub fn from_inherited_fd(raw: RawFd, limits: Limits) -> Result<Channel, IpcError> {
        static ADOPTED: AtomicBool = AtomicBool::new(false);
        if ADOPTED.swap(true, Ordering::AcqRel) {
            return Err(IpcError::Io(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the inherited channel fd was already adopted by this process",
            )));
        }
        let fd = sys::adopt_inherited_socket(raw)?;
        Channel::from_stream(UnixStream::from(fd), limits)
    }

    /// Changes the limits (for example once a master knows which peer it talks to).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Sends `msg` with `fds`, which must match what the message carries. The caller keeps its
    /// fds: the kernel duplicates them into the peer. Never blocks.
    pub fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let allowed = msg.fds_allowed();
        if !allowed.contains(&fds.len()) {
            return Err(IpcError::WrongFdCount {
                message: msg.name(),
                allowed,
                given: fds.len(),
            });
        }
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        frame::encode_into(msg, fds.len(), &mut bytes);
        let body = bytes.len() - frame::HEADER_LEN;
        let result = if body > self.limits.max_frame {
            Err(IpcError::OutgoingTooLarge {
                len: body,
                max: self.limits.max_frame,
            })
        } else {
            self.send_bytes(&bytes, fds)
        };
        self.scratch = bytes;
        result
    }

    fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        Ok(self.outq.send(self.sock.as_fd(), bytes, fds)?)
    }

    /// Queues an fd-less frame behind everything queued, without sending it: a batch of
    /// frames queued in a row leaves in one `sendmsg` on the next [`Channel::flush`] (the
    /// worker answers all the hand-offs of one loop pass this way). Never blocks, never sends.
    ///
    /// The frame is appended to the last queued buffer when that buffer carries no fds (fds
    /// leave with a buffer's first byte, so they would not be misattributed; a buffer that has
    /// partly gone out already lost its fds and may grow too). Frames keep their order with
    /// [`Channel::send`]: a `send` while anything is queued queues behind it.
    pub fn queue(&mut self, msg: &Message) -> Result<(), IpcError> {
        let allowed = msg.fds_allowed();
        if !allowed.contains(&0) {
            return Err(IpcError::WrongFdCount {
                message: msg.name(),
                allowed,
                given: 0,
            });
        }
        let max = self.limits.max_frame;
        self.outq.append_with(|buf| {
            let before = buf.len();
            frame::encode_into(msg, 0, buf);
            let body = buf.len() - before - frame::HEADER_LEN;
            if body > max {
                return Err(IpcError::OutgoingTooLarge { len: body, max });
            }
            Ok(())
        })
    }

    /// Writes queued frames until done (`Ok(true)`) or the socket is full (`Ok(false)`: wait
    /// for writability).
    pub fn flush(&mut self) -> Result<bool, IpcError> {
        Ok(self.outq.flush(self.sock.as_fd())?)
    }

    /// True while frames wait for the socket to drain.
    pub fn has_pending_output(&self) -> bool {
        !self.outq.is_empty()
    }

    /// The socket reported readiness: whatever an earlier short read concluded about it being
    /// empty no longer holds. Call it for every readable event before [`Channel::recv`]; a
    /// caller that stops a drain early and resumes it later without an event must not.
    pub fn note_readable(&mut self) {
        self.read_drained = false;
    }

    /// Bytes queued and not yet written: what the peer has not taken off the socket beyond
    /// the kernel's buffer.
    pub fn pending_output_bytes(&self) -> usize {
        self.outq.pending_bytes()
    }

    /// Fds kept for frames not yet written (each a duplicate the peer has not taken).
    pub fn pending_output_fds(&self) -> usize {
        self.outq.pending_fds()
    }

    /// The next message, `Ok(None)` when the socket has nothing more right now.
    /// `Err(IpcError::Closed)` is a clean end of stream between frames.
    ///
    /// Frames that arrived before a protocol violation are returned first; the violation's error
    /// comes after them, and then again from every later call.
    pub fn recv(&mut self) -> Result<Option<Received>, IpcError> {
        if let Some(e) = &self.failed {
            return Err(e.replay());
        }
        let result = self.recv_inner();
        if let Err(e) = &result {
            // The channel is dead after any error; close unclaimed fds now rather than whenever
            // the owner gets round to dropping it.
            self.fd_batches.clear();
            self.fds_in.clear();
            self.poison = None;
            self.failed = Some(e.replay());
        }
        result
    }

    fn recv_inner(&mut self) -> Result<Option<Received>, IpcError> {
        loop {
            let start = self.read_pos - self.decoder.buffered() as u64;
            if let Some(frame) = self.decoder.next_frame()? {
                let end = self.read_pos - self.decoder.buffered() as u64;
                if self.poison.as_ref().is_some_and(|p| end > p.clean_end)
                    && let Some(p) = self.poison.take()
                {
                    return Err(p.error);
                }
                let fds = self.claim_fds(frame.n_fds, start, end)?;
                return Ok(Some(Received {
                    msg: frame.msg,
                    fds,
                }));
            }
            // Nothing past a violation is read: what is buffered is all that will be delivered.
            if let Some(p) = self.poison.take() {
                return Err(p.error);
            }
            if self.eof {
                return Err(match self.decoder.buffered() {
                    0 => IpcError::Closed,
                    n => IpcError::ClosedMidFrame(n),
                });
            }
            if std::mem::take(&mut self.read_drained) {
                return Ok(None);
            }
            let buf = self.decoder.read_buf();
            let space = buf.len();
            let got = sys::recv_with_fds(self.sock.as_fd(), buf, &mut self.cmsg, &mut self.fds_in);
            match got {
                Ok(r) => {
                    // On a channel that never carries fds (a master's view of a worker) a short
                    // stream read means the queue was empty, so the next recvmsg would only say
                    // EAGAIN; edge-triggered readiness reports anything that arrives later.
                    // Reads that may meet fds can stop short at an fd boundary: no shortcut.
                    self.read_drained = !self.limits.accept_fds && r.bytes > 0 && r.bytes < space;
                    let violation = if r.truncated {
                        Some(self.fd_range_violation(IpcError::FdsTruncated, r.bytes))
                    } else if self.fds_in.is_empty() {
                        None
                    } else {
                        self.stash_fds(r.bytes).err()
                    };
                    // The bytes are kept even when the read brought a violation: the frames
                    // before it are still delivered.
                    if r.bytes == 0 {
                        self.eof = true;
                    } else {
                        self.decoder.commit(r.bytes);
                        self.read_pos += r.bytes as u64;
                    }
                    if let Some(poison) = violation {
                        // The read's fds belong to the violating part: close them now.
                        self.fds_in.clear();
                        self.poison = Some(poison);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Files the fds one read of `bytes` bytes brought as a batch owned by the frame that
    /// starts inside that read, or says where the violation they make lies.
    fn stash_fds(&mut self, bytes: usize) -> Result<(), Poison> {
        let n = self.fds_in.len();
        if !self.limits.accept_fds {
            return Err(self.fd_range_violation(IpcError::FdsNotAllowed(n), bytes));
        }
        let surplus = || IpcError::FdMismatch {
            declared: 0,
            arrived: n,
        };
        // One read carries one sendmsg's fds and a frame is one sendmsg, so more than a frame's
        // worth or fds without data can only come from a lying peer.
        if n > MAX_FDS_PER_FRAME {
            return Err(self.fd_range_violation(surplus(), bytes));
        }
        // A third unclaimed batch. Reads only happen while the frame at the head is incomplete,
        // and a batch still held is either that frame's own or starts inside it: with two
        // held, one starts inside it, so that frame is the violator and nothing from it on is
        // delivered.
        if bytes == 0 || self.fd_batches.len() >= 2 {
            return Err(Poison {
                clean_end: self.read_pos - self.decoder.buffered() as u64,
                error: surplus(),
            });
        }
        self.fd_batches.push_back(FdBatch {
            first: self.read_pos,
            end: self.read_pos + bytes as u64,
            fds: self.fds_in.drain(..).collect(),
        });
        Ok(())
    }

    /// Where a violation carried by the fds of a read of `bytes` bytes (starting at `read_pos`)
    /// lies. The kernel ends a read with the sendmsg that brought its fds, and that sendmsg's
    /// first byte is inside the read; it may be as late as the read's last byte. So the frames
    /// that end before that byte could have been sent on their own, without the fds, and are
    /// delivered; the first frame that reaches the last byte carries the violation.
    fn fd_range_violation(&self, error: IpcError, bytes: usize) -> Poison {
        let clean_end = match bytes {
            0 => self.read_pos - self.decoder.buffered() as u64,
            n => self.read_pos + n as u64 - 1,
        };
        Poison { clean_end, error }
    }

    /// The fds of the frame occupying stream offsets `[start, end)` that declares `declared`.
    fn claim_fds(
        &mut self,
        declared: usize,
        start: u64,
        end: u64,
    ) -> Result<Vec<OwnedFd>, IpcError> {
        if declared > 0 && !self.limits.accept_fds {
            return Err(IpcError::FdsNotAllowed(declared));
        }
        let mut fds = Vec::new();
        if declared > 0 {
            match self.fd_batches.front() {
                Some(b) if b.first <= start && start < b.end && b.fds.len() == declared => {
                    if let Some(b) = self.fd_batches.pop_front() {
                        fds = b.fds;
                    }
                }
                Some(b) if b.first <= start && start < b.end => {
                    return Err(IpcError::FdMismatch {
                        declared,
                        arrived: b.fds.len(),
                    });
                }
                _ => {
                    return Err(IpcError::FdMismatch {
                        declared,
                        arrived: 0,
                    });
                }
            }
        }
        // A batch whose read ended inside this frame belongs to this frame or an earlier one;
        // if it is still here, a frame that declared no fds brought it.
        if let Some(b) = self.fd_batches.front()
            && b.end <= end
        {
            return Err(IpcError::FdMismatch {
                declared,
                arrived: b.fds.len(),
            });
        }
        Ok(fds)
    }

    /// Blocks until a message arrives or `timeout` passes (`None`: no limit). For simple
    /// callers such as a worker starting up; event loops use [`Channel::recv`].
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Received, IpcError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.recv()? {
                return Ok(r);
            }
            self.wait(sys::POLLIN, deadline)?;
        }
    }

    /// Sends and flushes, blocking until the frame is fully written or `timeout` passes.
    pub fn send_blocking(
        &mut self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
    ) -> Result<(), IpcError> {
        self.send(msg, fds)?;
        self.flush_blocking(timeout)
    }

    /// Blocks until every queued frame is written or `timeout` passes.
    pub fn flush_blocking(&mut self, timeout: Option<Duration>) -> Result<(), IpcError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while !self.flush()? {
            self.wait(sys::POLLOUT, deadline)?;
        }
        Ok(())
    }

    fn wait(&self, events: libc::c_short, deadline: Option<Instant>) -> Result<(), IpcError> {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(IpcError::TimedOut);
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        sys::poll_one(self.sock.as_fd(), events, ms)?;
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Source for Channel {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.sock.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.sock.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.sock.as_raw_fd()).deregister(registry)
    }
}

/// Creates a channel pair and arranges for `cmd`'s child to inherit one end at fd `target`,
/// close-on-exec cleared, and nothing else of ours. Returns the parent's end. The child's end
/// stays open in this process until `cmd` is dropped, so drop `cmd` right after spawning:
/// channel EOF is how each side learns that the other is gone.
pub fn spawn_with_channel(
    cmd: &mut Command,
    target: RawFd,
    limits: Limits,
) -> Result<Channel, IpcError> {
    let (parent, child) = UnixStream::pair()?;
    sys::inherit_at(cmd, OwnedFd::from(child), target)?;
    Channel::from_stream(parent, limits)
}

#[cfg(test)]
mod queue_tests {
    //! [`Channel::queue`]: coalescing fd-less frames without changing the byte stream or the
    //! fd rules.

    use std::io::Read;
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use cluster_core::{ConnId, Message, Peer, RefuseReason, ServerId};

    use super::{Channel, Limits};
    use crate::frame;
    // Other tests of this binary count open fds; ours must not run alongside them.
    use crate::tests::fd_lock;

    const WAIT: Option<Duration> = Some(Duration::from_secs(10));

    fn answers(n: u64) -> Vec<Message> {
        (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    Message::Refused {
                        conn: ConnId(i),
                        reason: RefuseReason::MaxConnections,
                    }
                } else {
                    Message::Accepted { conn: ConnId(i) }
                }
            })
            .collect()
    }

    #[test]
    fn queued_frames_are_one_buffer_with_the_bytes_of_separate_sends() {
        let _g = fd_lock();
        let msgs = answers(50);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ch = Channel::from_stream(a, Limits::default()).unwrap();
        for m in &msgs {
            ch.queue(m).unwrap();
        }
        // Nothing sent yet, and everything in one buffer: one sendmsg on flush.
        assert_eq!(ch.outq.entries(), 1);
        assert!(ch.flush().unwrap());
        assert!(!ch.has_pending_output());

        let want: Vec<u8> = msgs.iter().flat_map(|m| frame::encode(m, 0)).collect();
        let mut got = vec![0u8; want.len()];
        b.set_read_timeout(WAIT).unwrap();
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn queue_refuses_messages_that_need_fds() {
        let _g = fd_lock();
        let (mut a, _b) = Channel::pair().unwrap();
        let err = a
            .queue(&Message::new_conn(ServerId(1), ConnId(1), Peer::Unix))
            .unwrap_err();
        assert!(matches!(err, crate::IpcError::WrongFdCount { .. }), "{err}");
        assert!(!a.has_pending_output());
    }

    /// A peer that reads nothing: fd-less sends pile into one buffer, and the counters the
    /// master bounds itself by stay exact whatever the mix.
    #[test]
    fn sends_to_a_peer_that_reads_nothing_are_counted_exactly() {
        let _g = fd_lock();
        let (mut a, b) = Channel::pair().unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        for i in 0..20_000u64 {
            a.send(&Message::Accepted { conn: ConnId(i) }, &[]).unwrap();
            if i % 5000 == 0 {
                a.send(
                    &Message::new_conn(ServerId(1), ConnId(i), Peer::Unix),
                    &[sock.as_fd()],
                )
                .unwrap();
            }
        }
        // 20,000 answers of 24 bytes, minus what the socket took, and the NewConns queued
        // after the socket filled up, each holding its fd.
        assert!(
            a.pending_output_bytes() > 100_000,
            "{}",
            a.pending_output_bytes()
        );
        assert!(
            a.pending_output_fds() >= 1,
            "the socket filled up before the first NewConn"
        );
        assert!(a.outq.entries() < 64, "{} queue entries", a.outq.entries());
        drop(b);
    }

    #[test]
    fn a_frame_with_fds_is_never_coalesced() {
        let _g = fd_lock();
        let (mut a, mut b) = Channel::pair().unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        a.queue(&Message::Accepted { conn: ConnId(1) }).unwrap();
        // Something is queued, so the send queues too, in order, in its own buffer.
        let new_conn = Message::new_conn(ServerId(1), ConnId(2), Peer::Unix);
        a.send(&new_conn, &[sock.as_fd()]).unwrap();
        // Not appended to the buffer that carries fds: its fds would come first.
        a.queue(&Message::Accepted { conn: ConnId(3) }).unwrap();
        assert_eq!(a.outq.entries(), 3);
        assert_eq!(a.pending_output_fds(), 1);
        assert!(a.pending_output_bytes() > 0);
        assert!(a.flush().unwrap());
        assert_eq!((a.pending_output_bytes(), a.pending_output_fds()), (0, 0));
        assert_eq!(
            b.recv_blocking(WAIT).unwrap().msg,
            Message::Accepted { conn: ConnId(1) }
        );
        let got = b.recv_blocking(WAIT).unwrap();
        assert_eq!((got.msg, got.fds.len()), (new_conn, 1));
        let got = b.recv_blocking(WAIT).unwrap();
        assert_eq!(
            (got.msg, got.fds.len()),
            (Message::Accepted { conn: ConnId(3) }, 0)
        );
    }

    /// Far more than a socket buffer, queued while the socket is full and partly written,
    /// with fd-carrying frames in between: the peer gets every frame, in order, each fd with
    /// its own frame.
    #[test]
    fn eagain_mid_batch_loses_nothing() {
        let _g = fd_lock();
        let (mut a, mut b) = Channel::pair().unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sent = Vec::new();
        let mut saw_full = false;
        for round in 0..20u64 {
            for m in answers(2_000) {
                a.queue(&m).unwrap();
                sent.push((m, 0));
            }
            let nc = Message::new_conn(ServerId(1), ConnId(1_000_000 + round), Peer::Unix);
            a.send(&nc, &[sock.as_fd()]).unwrap();
            sent.push((nc, 1));
            // Partial writes happen here once the peer stops reading.
            saw_full |= !a.flush().unwrap();
        }
        assert!(saw_full, "the socket never filled: the test proves nothing");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..(20 * 2_001) {
                let r = b.recv_blocking(WAIT).unwrap();
                got.push((r.msg, r.fds.len()));
            }
            got
        });
        a.flush_blocking(WAIT).unwrap();
        assert_eq!(reader.join().unwrap(), sent);
    }
}

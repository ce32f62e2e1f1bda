//! [`NodeChannel`]: a [`WorkerChannel`] that speaks Node's IPC (JSON lines, `SCM_RIGHTS`)
//! to an unmodified Node worker, through the pure [`NodeCodec`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use cluster_core::Message;
use cluster_ipc::{FdStream, IpcError, OutQueue, Received};
use mio::event::Source;
use mio::{Interest, Registry, Token};

use super::codec::{LineSplitter, NodeCodec, NodeError, SharedServerData};
use crate::channel::WorkerChannel;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// The master's end of a Node worker's IPC channel.
///
/// Node pairs a received fd with the first `NODE_HANDLE` line parsed from the read that
/// brought it or a later one; so do we, and an fd that no `NODE_HANDLE` claims, or a second
/// one waiting, is a violation. Any violation kills the channel: every later `recv` repeats
/// the error (the master drops the worker with it as the logged reason).
#[derive(Debug)]
pub(crate) struct NodeChannel {
    sock: FdStream,
    codec: NodeCodec,
    lines: LineSplitter,
    fds_in: VecDeque<OwnedFd>,
    outq: OutQueue,
    scratch: Vec<u8>,
    replies: Vec<u8>,
    eof: bool,
    failed: Option<IpcError>,
    /// The last read was short and brought no fd: the socket was empty then, so the next
    /// `recv` that needs bytes says `Ok(None)` without a syscall (edge-triggered readiness
    /// reports anything that arrives later). A read that brings fds may stop short after
    /// them with more queued, so it never takes this shortcut.
    read_drained: bool,
}

/// Replies (ACKs, NACKs) a Node worker may leave unread before it is dropped.
const MAX_UNREAD_REPLIES: usize = 4 << 20;

fn violation(e: NodeError) -> IpcError {
    IpcError::Protocol(e.to_string())
}

impl NodeChannel {
    pub(crate) fn new(sock: FdStream, max_line: usize, shared: SharedServerData) -> Self {
        Self {
            sock,
            codec: NodeCodec::new(shared),
            lines: LineSplitter::new(max_line),
            fds_in: VecDeque::new(),
            outq: OutQueue::new(),
            scratch: Vec::new(),
            replies: Vec::new(),
            eof: false,
            failed: None,
            read_drained: false,
        }
    }

    fn write(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        Ok(self.outq.send(self.sock.as_fd(), bytes, fds)?)
    }

    fn recv_inner(&mut self) -> Result<Option<Received>, IpcError> {
        loop {
            let fd_waiting = !self.fds_in.is_empty();
            if let Some(line) = self.lines.next_line().map_err(violation)? {
                let decoded = self
                    .codec
                    .decode(line, fd_waiting, &mut self.replies)
                    .map_err(violation)?;
                if !self.replies.is_empty() {
                    let replies = std::mem::take(&mut self.replies);
                    let sent = self.write(&replies, &[]);
                    self.replies = replies;
                    self.replies.clear();
                    sent?;
                    // Replies the worker provokes (ACKs, NACKs) but does not read would grow
                    // this queue without bound.
                    let queued = self.outq.pending_bytes();
                    if queued > MAX_UNREAD_REPLIES {
                        return Err(IpcError::Protocol(format!(
                            "does not read its channel ({queued} bytes of replies wait for it)"
                        )));
                    }
                }
                let fds = match (decoded.took_fd, self.fds_in.pop_front()) {
                    (true, Some(fd)) => vec![fd],
                    (_, other) => {
                        if let Some(fd) = other {
                            self.fds_in.push_front(fd);
                        }
                        Vec::new()
                    }
                };
                if let Some(msg) = decoded.msg {
                    return Ok(Some(Received { msg, fds }));
                }
                continue;
            }
            if self.fds_in.len() > 1 || (!self.fds_in.is_empty() && self.lines.buffered() == 0) {
                return Err(violation(NodeError::StrayFds(self.fds_in.len())));
            }
            if self.eof {
                return Err(match self.lines.buffered() {
                    0 => IpcError::Closed,
                    n => IpcError::ClosedMidFrame(n),
                });
            }
            if std::mem::take(&mut self.read_drained) {
                return Ok(None);
            }
            let fds_before = self.fds_in.len();
            let buf = self.lines.read_buf(READ_CHUNK);
            let space = buf.len();
            match self.sock.recv(buf, &mut self.fds_in) {
                Ok(r) => {
                    self.lines.commit(r.bytes);
                    self.read_drained =
                        r.bytes > 0 && r.bytes < space && self.fds_in.len() == fds_before;
                    if r.fds_truncated {
                        return Err(violation(NodeError::FdsTruncated));
                    }
                    if r.bytes == 0 {
                        self.eof = true;
                    }
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::ConnectionReset => self.eof = true,
                    _ => return Err(e.into()),
                },
            }
        }
    }
}

impl WorkerChannel for NodeChannel {
    /// Node's receiver attaches at most one handle to each read of its pipe.
    fn max_handoff_batch(&self) -> usize {
        1
    }

    fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let allowed = msg.fds_allowed();
        if !allowed.contains(&fds.len()) {
            return Err(IpcError::WrongFdCount {
                message: msg.name(),
                allowed,
                given: fds.len(),
            });
        }
        let mut line = std::mem::take(&mut self.scratch);
        line.clear();
        let result = self
            .codec
            .encode(msg, fds.len(), &mut line)
            .map_err(violation)
            .and_then(|_| self.write(&line, fds));
        self.scratch = line;
        result
    }

    fn recv(&mut self) -> Result<Option<Received>, IpcError> {
        if let Some(e) = &self.failed {
            return Err(e.replay());
        }
        let result = self.recv_inner();
        if let Err(e) = &result {
            self.fds_in.clear();
            self.failed = Some(e.replay());
        }
        result
    }

    fn flush(&mut self) -> Result<bool, IpcError> {
        Ok(self.outq.flush(self.sock.as_fd())?)
    }

    fn pending_output_bytes(&self) -> usize {
        self.outq.pending_bytes()
    }

    fn pending_output_fds(&self) -> usize {
        self.outq.pending_fds()
    }

    fn note_readable(&mut self) {
        // A readiness event may be the only notice of data that came after a short read.
        self.read_drained = false;
    }
}

impl Source for NodeChannel {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.sock.deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use cluster_core::{ConnId, Message, Peer, ServerId};

    use super::*;

    fn pair() -> (NodeChannel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (
            NodeChannel::new(FdStream::new(a).unwrap(), 1024, SharedServerData::default()),
            b,
        )
    }

    fn recv_now(ch: &mut NodeChannel) -> Result<Option<Received>, IpcError> {
        // The peer's writes are complete before we read; one call sees them.
        ch.recv()
    }

    #[test]
    fn a_worker_session_maps_to_messages_and_back() {
        let (mut ch, mut node) = pair();
        node.write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":\"127.0.0.1\",\"port\":8000,\"addressType\":4,\"flags\":0,\"backlog\":0,\"seq\":1}\n").unwrap();
        assert_eq!(recv_now(&mut ch).unwrap().unwrap().msg, Message::Online);
        let q = recv_now(&mut ch).unwrap().unwrap().msg;
        let Message::QueryServer { seq, .. } = q else {
            panic!("{q:?}")
        };
        assert!(recv_now(&mut ch).unwrap().is_none());
        let addr: std::net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
        ch.send(
            &Message::QueryServerReply {
                seq,
                reply: cluster_core::ServerReply::Granted {
                    server: ServerId(1),
                    addr: cluster_core::BoundAddr::Inet(addr),
                    grant: cluster_core::ServerGrant::RoundRobin,
                },
            },
            &[],
        )
        .unwrap();
        let conn = TcpListener::bind("127.0.0.1:0").unwrap();
        ch.send(
            &Message::new_conn(ServerId(1), ConnId(9), Peer::Unix),
            &[conn.as_fd()],
        )
        .unwrap();
        let mut got = vec![0u8; 4096];
        let mut text = String::new();
        while text.matches('\n').count() < 2 {
            let n = node.read(&mut got).unwrap();
            assert!(n > 0);
            text.push_str(std::str::from_utf8(&got[..n]).unwrap());
        }
        assert!(text.starts_with("{\"cmd\":\"NODE_CLUSTER\",\"errno\":null,\"key\":\"127.0.0.1:8000:4:undefined:0\",\"ack\":1,\"data\":null,\"sockname\":{\"address\":\"127.0.0.1\",\"family\":\"IPv4\",\"port\":8000},\"seq\":0}\n"), "{text}");
        assert!(text.ends_with("{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"127.0.0.1:8000:4:undefined:0\",\"seq\":1}}\n"), "{text}");
        node.write_all(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_CLUSTER\",\"ack\":1,\"accepted\":true,\"seq\":3}\n").unwrap();
        assert_eq!(
            recv_now(&mut ch).unwrap().unwrap().msg,
            Message::Accepted { conn: ConnId(9) }
        );
        drop(node);
        // The last read was short, so the first call answers from that (no syscall); the EOF
        // would come with its own readiness edge.
        assert!(ch.recv().unwrap().is_none());
        assert!(ch.recv().unwrap_err().is_closed());
    }

    /// A worker that provokes replies (a NACK per fd-less handle line) and never reads them
    /// is dropped once 4 MiB wait, instead of growing the master's queue for ever.
    #[test]
    fn replies_a_worker_does_not_read_are_bounded() {
        let (mut ch, node) = pair();
        let writer = std::thread::spawn(move || {
            let mut node = node;
            let line = b"{\"cmd\":\"NODE_HANDLE\",\"msg\":{}}\n";
            // 200k lines, 6 MB of NACKs provoked; stops when the master gives up.
            for _ in 0..200_000 {
                if node.write_all(line).is_err() {
                    break;
                }
            }
            node
        });
        let mut error = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while error.is_none() && std::time::Instant::now() < deadline {
            match ch.recv() {
                Ok(_) => std::thread::yield_now(),
                Err(e) => error = Some(e),
            }
        }
        let e = error.expect("the master gave up on the worker");
        assert!(e.to_string().contains("does not read its channel"), "{e}");
        assert!(ch.pending_output_bytes() <= MAX_UNREAD_REPLIES + 64 * 1024);
        drop(ch);
        let _ = writer.join();
    }

    #[test]
    fn an_unknown_act_kills_the_channel_for_good() {
        let (mut ch, mut node) = pair();
        node.write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n{\"cmd\":\"NODE_CLUSTER\",\"act\":\"fly\",\"seq\":1}\n").unwrap();
        assert_eq!(recv_now(&mut ch).unwrap().unwrap().msg, Message::Online);
        let e = ch.recv().unwrap_err();
        assert!(e.to_string().contains("unknown act \"fly\""), "{e}");
        assert!(!e.is_closed());
        assert_eq!(ch.recv().unwrap_err().to_string(), e.to_string());
    }

    #[test]
    fn a_handle_is_acked_and_a_user_message_with_it_delivered() {
        let (mut ch, node) = pair();
        let peer = FdStream::new(node.try_clone().unwrap()).unwrap();
        node.set_nonblocking(false).unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let line = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"hello\":1}}\n";
        assert_eq!(peer.send(line, &[sock.as_fd()]).unwrap(), line.len());
        let r = ch.recv().unwrap().unwrap();
        assert_eq!(
            (r.msg, r.fds.len()),
            (
                Message::User {
                    payload: b"{\"hello\":1}".to_vec()
                },
                1
            )
        );
        let mut node = node;
        let mut ack = [0u8; 64];
        let n = node.read(&mut ack).unwrap();
        assert_eq!(&ack[..n], b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
    }

    #[test]
    fn a_handle_on_a_cluster_message_is_a_violation() {
        let (mut ch, node) = pair();
        let peer = FdStream::new(node.try_clone().unwrap()).unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let line = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}}\n";
        peer.send(line, &[sock.as_fd()]).unwrap();
        let e = ch.recv().unwrap_err();
        assert!(e.to_string().contains("carries none"), "{e}");
    }

    #[test]
    fn an_fd_without_a_handle_line_is_a_violation() {
        let (mut ch, node) = pair();
        let peer = FdStream::new(node.try_clone().unwrap()).unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        peer.send(
            b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n",
            &[sock.as_fd()],
        )
        .unwrap();
        assert_eq!(ch.recv().unwrap().unwrap().msg, Message::Online);
        let e = ch.recv().unwrap_err();
        assert!(e.to_string().contains("without a NODE_HANDLE"), "{e}");
    }

    #[test]
    fn an_overlong_line_is_a_violation() {
        let (mut ch, mut node) = pair();
        node.write_all(&[b'x'; 2048]).unwrap();
        let e = ch.recv().unwrap_err();
        assert!(e.to_string().contains("more than 1024 bytes"), "{e}");
    }
}

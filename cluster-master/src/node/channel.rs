//! [`NodeChannel`]: a [`WorkerChannel`] that speaks Node's IPC (JSON lines, `SCM_RIGHTS`)
//! to an unmodified Node worker, through the pure [`NodeCodec`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use cluster_core::Message;
use cluster_ipc::{FdStream, IpcError, OutQueue, Received};
use mio::event::Source;
use mio::{Interest, Registry, Token};

use super::codec::{HandleFate, LineSplitter, NodeCodec, NodeError, SharedServerData};
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
    /// Server handles sent and not yet acknowledged, oldest first, kept to send again when the
    /// worker NACKs one.
    server_handles: VecDeque<SentServerHandle>,
    /// Makes the next write fail with this errno (tests of send failures).
    #[cfg(test)]
    fail_next_write: Option<i32>,
}

/// A server handle line as sent, with our own copy of its fd.
#[derive(Debug)]
struct SentServerHandle {
    line: Vec<u8>,
    fd: OwnedFd,
    retransmissions: u32,
}

/// Times a NACKed server handle is sent again before the worker is given up on: Node's own
/// sender's bound (`MAX_HANDLE_RETRANSMISSIONS` in `lib/internal/child_process.js`).
const MAX_HANDLE_RETRANSMISSIONS: u32 = 3;

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
            server_handles: VecDeque::new(),
            #[cfg(test)]
            fail_next_write: None,
        }
    }

    fn write(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        #[cfg(test)]
        if let Some(errno) = self.fail_next_write.take() {
            return Err(io::Error::from_raw_os_error(errno).into());
        }
        Ok(self.outq.send(self.sock.as_fd(), bytes, fds)?)
    }

    /// The worker answered the oldest server handle still unacknowledged: forget it, or send
    /// it again as Node's sender does (the worker dropped the whole line with the NACK, so
    /// its `queryServer` is still waiting for a reply).
    fn server_handle_answered(&mut self, fate: HandleFate) -> Result<(), IpcError> {
        let Some(mut sent) = self.server_handles.pop_front() else {
            return Ok(());
        };
        if fate == HandleFate::Acked {
            return Ok(());
        }
        if sent.retransmissions == MAX_HANDLE_RETRANSMISSIONS {
            return Err(violation(NodeError::ServerHandleLost(
                sent.retransmissions + 1,
            )));
        }
        sent.retransmissions += 1;
        self.write(&sent.line, &[sent.fd.as_fd()])?;
        self.codec.server_handle_resent();
        self.server_handles.push_back(sent);
        Ok(())
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
                if let Some(fate) = decoded.server_handle {
                    self.server_handle_answered(fate)?;
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

impl NodeChannel {
    fn send_line(
        &mut self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        line: &mut Vec<u8>,
    ) -> Result<(), IpcError> {
        let pending = self.codec.encode(msg, fds.len(), line).map_err(violation)?;
        // Copied before the write, so that a handle that went out can always be sent again.
        let keep = match fds.first() {
            Some(fd) if pending.is_server_handle() => Some(fd.try_clone_to_owned()?),
            _ => None,
        };
        // On failure nothing is committed: the codec expects no answer for a line that never
        // left (a hand-off bounced elsewhere would otherwise take the next one's ACK).
        self.write(line, fds)?;
        if let Some(fd) = keep {
            self.server_handles.push_back(SentServerHandle {
                line: line.clone(),
                fd,
                retransmissions: 0,
            });
        }
        self.codec.commit(pending);
        Ok(())
    }
}

impl WorkerChannel for NodeChannel {
    /// Node's receiver attaches at most one handle to each read of its pipe.
    fn max_handoff_batch(&self) -> usize {
        1
    }

    fn answers_one_by_one(&self) -> bool {
        true
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
        let result = self.send_line(msg, fds, &mut line);
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
        // The peer's writes are complete before we read; one call sees them (after the
        // readiness event the event loop would have had).
        ch.note_readable();
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

    /// A channel whose worker was granted round-robin server 1 (127.0.0.1:8000), with the
    /// reply read off the worker's end.
    fn granted_pair() -> (NodeChannel, UnixStream) {
        let (mut ch, mut node) = pair();
        node.write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":\"127.0.0.1\",\"port\":8000,\"addressType\":4,\"flags\":0,\"backlog\":0,\"seq\":1}\n").unwrap();
        let Message::QueryServer { seq, .. } = recv_now(&mut ch).unwrap().unwrap().msg else {
            panic!("not a query")
        };
        ch.send(
            &Message::QueryServerReply {
                seq,
                reply: cluster_core::ServerReply::Granted {
                    server: ServerId(1),
                    addr: cluster_core::BoundAddr::Inet("127.0.0.1:8000".parse().unwrap()),
                    grant: cluster_core::ServerGrant::RoundRobin,
                },
            },
            &[],
        )
        .unwrap();
        read_lines(&mut node, 1);
        (ch, node)
    }

    /// Reads the worker's query and grants it `addr` as a shared server with `fd`.
    fn grant_shared(ch: &mut NodeChannel, addr: &str, fd: std::os::fd::BorrowedFd<'_>) {
        let Message::QueryServer { seq, .. } = recv_now(ch).unwrap().unwrap().msg else {
            panic!("not a query")
        };
        let reply = cluster_core::ServerReply::Granted {
            server: ServerId(1),
            addr: cluster_core::BoundAddr::Inet(addr.parse().unwrap()),
            grant: cluster_core::ServerGrant::Shared,
        };
        ch.send(&Message::QueryServerReply { seq, reply }, &[fd])
            .unwrap();
    }

    /// Reads `n` lines (and whatever fds came with them) off the worker's end.
    fn read_lines(node: &mut UnixStream, n: usize) -> (String, usize) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut peer = FdStream::new(node.try_clone().unwrap()).unwrap();
        let mut fds = VecDeque::new();
        let mut text = String::new();
        let mut buf = vec![0u8; 4096];
        while text.matches('\n').count() < n {
            let mut want = [PollFd::new(node.as_fd(), PollFlags::POLLIN)];
            assert_eq!(poll(&mut want, PollTimeout::from(10_000u16)).unwrap(), 1);
            let r = peer.recv(&mut buf, &mut fds).unwrap();
            assert!(r.bytes > 0, "the master closed the channel");
            text.push_str(std::str::from_utf8(&buf[..r.bytes]).unwrap());
        }
        (text, fds.len())
    }

    /// A hand-off whose send failed (the master out of fds or memory: the event loop sends it
    /// elsewhere) is not waited for: the worker's next ACK, NACK and answer belong to the
    /// next hand-off.
    #[test]
    fn a_hand_off_that_was_not_sent_expects_no_answer() {
        let (mut ch, mut node) = granted_pair();
        let conn = TcpListener::bind("127.0.0.1:0").unwrap();
        let newconn = |c| Message::new_conn(ServerId(1), ConnId(c), Peer::Unix);
        ch.fail_next_write = Some(libc::EMFILE);
        let e = ch.send(&newconn(9), &[conn.as_fd()]).unwrap_err();
        assert!(
            matches!(&e, IpcError::Io(io) if io.raw_os_error() == Some(libc::EMFILE)),
            "{e}"
        );
        assert_eq!(ch.codec.unanswered(), 0);
        ch.send(&newconn(10), &[conn.as_fd()]).unwrap();
        ch.send(&newconn(11), &[conn.as_fd()]).unwrap();
        let (text, fds) = read_lines(&mut node, 2);
        assert_eq!(fds, 2);
        let seq_of_11: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.rsplit("\"seq\":").next())
            .and_then(|s| s.trim_end_matches('}').parse().ok())
            .unwrap();
        // The first handle the worker got is conn 10's: its fd was lost on the way.
        node.write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n{\"cmd\":\"NODE_HANDLE_ACK\"}\n")
            .unwrap();
        node.write_all(
            format!(
                "{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq_of_11},\"accepted\":true,\"seq\":4}}\n"
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            recv_now(&mut ch).unwrap().unwrap().msg,
            Message::Refused {
                conn: ConnId(10),
                reason: cluster_core::RefuseReason::FdLost
            }
        );
        assert_eq!(
            recv_now(&mut ch).unwrap().unwrap().msg,
            Message::Accepted { conn: ConnId(11) }
        );
        assert_eq!(ch.codec.unanswered(), 0);
    }

    /// A server handle the worker NACKs is sent again, the same line with the same socket,
    /// as Node's sender does; after Node's bound of retransmissions the worker is dropped
    /// (its `listen` would wait for ever).
    #[test]
    fn a_nacked_server_handle_is_sent_again_up_to_nodes_bound() {
        let (mut ch, mut node) = pair();
        node.write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":\"127.0.0.1\",\"port\":8000,\"addressType\":4,\"flags\":0,\"backlog\":0,\"seq\":1}\n").unwrap();
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        grant_shared(&mut ch, "127.0.0.1:8000", server.as_fd());
        drop(server);
        let (first, fds) = read_lines(&mut node, 1);
        assert_eq!(fds, 1);
        for _ in 0..MAX_HANDLE_RETRANSMISSIONS {
            node.write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").unwrap();
            assert!(recv_now(&mut ch).unwrap().is_none());
            let (again, fds) = read_lines(&mut node, 1);
            assert_eq!((again.as_str(), fds), (first.as_str(), 1));
        }
        node.write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").unwrap();
        let e = ch.recv().unwrap_err();
        assert!(
            e.to_string()
                .contains("did not receive a server handle (sent 4 times)"),
            "{e}"
        );
    }

    /// An ACK after a retransmission settles it: the kept copy is closed.
    #[test]
    fn an_acked_server_handle_is_forgotten() {
        let (mut ch, mut node) = pair();
        node.write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":\"127.0.0.1\",\"port\":41234,\"addressType\":\"udp4\",\"fd\":-1,\"flags\":0,\"seq\":1}\n").unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        grant_shared(&mut ch, "127.0.0.1:41234", sock.as_fd());
        read_lines(&mut node, 1);
        node.write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").unwrap();
        assert!(recv_now(&mut ch).unwrap().is_none());
        read_lines(&mut node, 1);
        node.write_all(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n").unwrap();
        assert!(recv_now(&mut ch).unwrap().is_none());
        assert!(ch.server_handles.is_empty());
    }

    #[test]
    fn an_overlong_line_is_a_violation() {
        let (mut ch, mut node) = pair();
        node.write_all(&[b'x'; 2048]).unwrap();
        let e = ch.recv().unwrap_err();
        assert!(e.to_string().contains("more than 1024 bytes"), "{e}");
    }
}

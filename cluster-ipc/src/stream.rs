//! A bare non-blocking Unix stream socket with `SCM_RIGHTS`, for a peer whose framing is not
//! ours (Node's JSON lines). It owns the unsafe parts ([`crate::sys`]); the framing, the
//! pairing of fds with messages and the queueing belong to the caller.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::sys;

/// What one [`FdStream::recv`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRead {
    /// Bytes read; 0 is end of stream.
    pub bytes: usize,
    /// The kernel dropped fds (`MSG_CTRUNC`): which message lost them cannot be known.
    pub fds_truncated: bool,
}

/// One end of a connected, non-blocking `SOCK_STREAM` Unix socket that sends and receives
/// bytes with fds attached.
#[derive(Debug)]
pub struct FdStream {
    sock: UnixStream,
    cmsg: Box<sys::CmsgBuf>,
}

impl FdStream {
    /// Wraps a connected stream socket (made non-blocking here).
    pub fn new(sock: UnixStream) -> io::Result<FdStream> {
        sock.set_nonblocking(true)?;
        Ok(FdStream {
            sock,
            cmsg: Box::new(sys::new_cmsg_buf()),
        })
    }

    /// One `sendmsg` of `bytes` with `fds` attached to its first byte; never blocks, never
    /// raises `SIGPIPE`. Returns the bytes written: when non-zero, the fds went with them.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        sys::send_with_fds(self.sock.as_fd(), bytes, fds)
    }

    /// One `recvmsg` into `buf`; every fd that arrives is appended to `fds` as an owned,
    /// close-on-exec fd (also when the read reports truncation).
    pub fn recv(&mut self, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<StreamRead> {
        let r = sys::recv_with_fds(self.sock.as_fd(), buf, &mut self.cmsg, fds)?;
        Ok(StreamRead {
            bytes: r.bytes,
            fds_truncated: r.truncated,
        })
    }
}

impl AsFd for FdStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Source for FdStream {
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

/// Like [`crate::spawn_with_channel`] but unframed: creates a socketpair, arranges for `cmd`'s
/// child to inherit one end at fd `target` (close-on-exec cleared), and returns the other end.
/// Drop `cmd` right after spawning so the child's exit shows up as end of stream.
pub fn spawn_with_stream(cmd: &mut Command, target: RawFd) -> io::Result<FdStream> {
    let (parent, child) = UnixStream::pair()?;
    sys::inherit_at(cmd, OwnedFd::from(child), target)?;
    FdStream::new(parent)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::FdStream;

    #[test]
    fn bytes_and_an_fd_arrive_together() {
        let _g = crate::tests::fd_lock();
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (FdStream::new(a).unwrap(), FdStream::new(b).unwrap());
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(a.send(b"line\n", &[sock.as_fd()]).unwrap(), 5);
        let mut buf = [0u8; 64];
        let mut fds = VecDeque::new();
        let r = b.recv(&mut buf, &mut fds).unwrap();
        assert_eq!(
            (&buf[..r.bytes], fds.len(), r.fds_truncated),
            (&b"line\n"[..], 1, false)
        );
        drop(a);
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap().bytes, 0);
    }
}

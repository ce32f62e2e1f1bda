//! The workers' `NOTIFY_SOCKET`: one datagram socket in the master, speaking systemd's
//! `sd_notify` protocol, so that any program can say it is ready (`READY=1`), what it is
//! doing (`STATUS=`), that it is alive (`WATCHDOG=1`) or that it is stopping (`STOPPING=1`)
//! without linking cluster-worker.
//!
//! Every worker gets the same address. A datagram is attributed to its worker by the sender's
//! pid, which the kernel attaches as `SCM_CREDENTIALS` (`SO_PASSCRED`) and which the sender
//! cannot forge; a datagram from any other process (a worker's own child, a stranger in the
//! same network namespace) is rejected. The socket lives in the abstract namespace
//! (`@cluster-rs/notify/PID/...`): nothing on disk to clean up, and gone with the master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};

/// The largest datagram read; a longer one is dropped whole rather than half-read.
pub(crate) const MAX_NOTIFY_MESSAGE: usize = 4096;

/// What one line of a notification says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    /// `READY=1`: started up and serving.
    Ready,
    /// `STATUS=...`: a line for the log.
    Status(String),
    /// `WATCHDOG=1`: still alive.
    Watchdog,
    /// `STOPPING=1`: on its way out by its own choice.
    Stopping,
}

/// Parses a notification: newline-separated `KEY=VALUE` assignments. Keys this master does
/// not act on (`MAINPID`, `ERRNO`, `EXTEND_TIMEOUT_USEC`, ...) are ignored, as systemd
/// ignores what it does not know.
///
/// Each kind of notice counts once per datagram, however often it is repeated (the last
/// `STATUS=` wins, as in systemd), so what one datagram can make the master do is bounded.
/// They come in the order that reads right in a log: the status, then readiness, the
/// watchdog ping, and the stop.
pub(crate) fn parse(datagram: &[u8]) -> Vec<Notice> {
    let text = String::from_utf8_lossy(datagram);
    let (mut ready, mut watchdog, mut stopping, mut status) = (false, false, false, None);
    for line in text.split('\n') {
        match line.split_once('=') {
            Some(("READY", "1")) => ready = true,
            Some(("WATCHDOG", "1")) => watchdog = true,
            Some(("STOPPING", "1")) => stopping = true,
            Some(("STATUS", s)) => status = Some(s),
            _ => {}
        }
    }
    let mut notices = Vec::new();
    notices.extend(status.map(|s| Notice::Status(s.to_owned())));
    notices.extend(ready.then_some(Notice::Ready));
    notices.extend(watchdog.then_some(Notice::Watchdog));
    notices.extend(stopping.then_some(Notice::Stopping));
    notices
}

/// One datagram as received.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Datagram {
    /// The sender's pid, from the kernel; `None` if it attached no credentials.
    pub(crate) pid: Option<u32>,
    /// Bytes in the caller's buffer; `None` when the datagram was longer and is dropped.
    pub(crate) len: Option<usize>,
}

/// The master's notify socket.
#[derive(Debug)]
pub(crate) struct NotifySocket {
    socket: UnixDatagram,
    address: String,
}

impl NotifySocket {
    /// Binds a fresh abstract address, non-blocking, with `SO_PASSCRED`.
    pub(crate) fn bind() -> io::Result<NotifySocket> {
        let clock = std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos());
        let name = format!("cluster-rs/notify/{}/{clock:x}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::PassCred, &true).map_err(io::Error::from)?;
        Ok(NotifySocket {
            socket,
            // `@` stands for the abstract namespace's leading NUL, as sd_notify expects.
            address: format!("@{name}"),
        })
    }

    /// The value of `NOTIFY_SOCKET` for the workers.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Receives the next datagram into `buf`; `None` when none is waiting.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Datagram>> {
        loop {
            // Room for the credentials only: file descriptors a sender attaches (systemd's
            // FDSTORE) do not fit, and the kernel discards them instead of installing them.
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            let mut iov = [io::IoSliceMut::new(buf)];
            let received = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let msg = match received {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let pid = msg.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(creds) => u32::try_from(creds.pid()).ok(),
                    _ => None,
                })
            });
            let len = (!msg.flags.contains(MsgFlags::MSG_TRUNC)).then_some(msg.bytes);
            return Ok(Some(Datagram { pid, len }));
        }
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_acts_on_and_ignores_the_rest() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 3 clients\nMAINPID=7\nWATCHDOG=1\n"),
            [
                Notice::Status("serving 3 clients".into()),
                Notice::Ready,
                Notice::Watchdog
            ]
        );
        assert_eq!(parse(b"STOPPING=1"), [Notice::Stopping]);
        assert_eq!(parse(b"READY=0\nWATCHDOG=trigger\nnonsense\n\n"), []);
        assert_eq!(parse(b"STATUS="), [Notice::Status(String::new())]);
    }

    #[test]
    fn each_kind_counts_once_per_datagram() {
        let flood = "READY=1\nWATCHDOG=1\nSTOPPING=1\n".repeat(300);
        assert_eq!(
            parse(flood.as_bytes()),
            [Notice::Ready, Notice::Watchdog, Notice::Stopping]
        );
        assert_eq!(
            parse(b"STATUS=a\nSTATUS=b\nSTATUS=c"),
            [Notice::Status("c".into())]
        );
    }

    #[test]
    fn datagrams_carry_the_senders_pid() {
        let sock = NotifySocket::bind().unwrap();
        let mut buf = [0u8; MAX_NOTIFY_MESSAGE];
        assert_eq!(sock.recv(&mut buf).unwrap(), None);
        let name = sock.address().strip_prefix('@').unwrap();
        let to = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to_addr(b"READY=1", &to).unwrap();
        let got = sock.recv(&mut buf).unwrap().unwrap();
        assert_eq!(got.pid, Some(std::process::id()));
        assert_eq!(got.len, Some(7));
        assert_eq!(parse(&buf[..7]), [Notice::Ready]);
        let big = vec![b'x'; MAX_NOTIFY_MESSAGE + 1];
        client.send_to_addr(&big, &to).unwrap();
        assert_eq!(sock.recv(&mut buf).unwrap().unwrap().len, None);
    }
}

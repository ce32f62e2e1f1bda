//! The crate's OS-facing code: socket creation with the options std does not expose
//! (`IPV6_V6ONLY` before bind, the `listen(2)` backlog), identifying inherited sockets, the
//! open-file limit, and bounded `poll(2)` waits.
//!
//! Everything goes through nix's safe wrappers, so this module needs no `unsafe` (but for
//! registering an fd with tokio's reactor, feature `tokio`): every fd is an `OwnedFd` from
//! the moment the kernel returns it.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Node's default backlog (`listen(511)`), clamped by the kernel to `somaxconn`.
const DEFAULT_BACKLOG: i32 = 511;

fn backlog(requested: Option<u32>) -> io::Result<Backlog> {
    let want = requested.map_or(DEFAULT_BACKLOG, |b| i32::try_from(b).unwrap_or(i32::MAX));
    // nix rejects values above SOMAXCONN; the kernel would clamp them anyway.
    let want = want.clamp(1, Backlog::MAXCONN.into());
    Backlog::new(want).map_err(io_err)
}

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn inet_socket(addr: &SocketAddr, ty: SockType, ipv6_only: bool) -> io::Result<OwnedFd> {
    let fd = socket::socket(family(addr), ty, SockFlag::SOCK_CLOEXEC, None).map_err(io_err)?;
    if addr.is_ipv6() {
        // Set explicitly either way: the system default (`bindv6only`) must not decide.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &ipv6_only).map_err(io_err)?;
    }
    Ok(fd)
}

fn bind_inet(fd: &OwnedFd, addr: &SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(*a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
    }
    .map_err(io_err)
}

/// A listening TCP socket, as Node binds one: `SO_REUSEADDR` (so a restarted server can bind
/// while old connections sit in `TIME_WAIT`), `IPV6_V6ONLY` as asked, the given backlog.
pub(crate) fn bind_tcp(
    addr: &SocketAddr,
    ipv6_only: bool,
    requested_backlog: Option<u32>,
) -> io::Result<TcpListener> {
    let fd = inet_socket(addr, SockType::Stream, ipv6_only)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io_err)?;
    bind_inet(&fd, addr)?;
    socket::listen(&fd, backlog(requested_backlog)?).map_err(io_err)?;
    Ok(TcpListener::from(fd))
}

/// A bound UDP socket (no `SO_REUSEADDR`: Node sets it only on request).
pub(crate) fn bind_udp(addr: &SocketAddr, ipv6_only: bool) -> io::Result<UdpSocket> {
    let fd = inet_socket(addr, SockType::Datagram, ipv6_only)?;
    bind_inet(&fd, addr)?;
    Ok(UdpSocket::from(fd))
}

/// A listening Unix stream socket at `path`. An existing file is `AddrInUse`, as in Node: a
/// stale socket file is the application's to remove.
pub(crate) fn bind_unix(path: &Path, requested_backlog: Option<u32>) -> io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err)?;
    let sa = UnixAddr::new(path).map_err(io_err)?;
    socket::bind(fd.as_raw_fd(), &sa).map_err(io_err)?;
    socket::listen(&fd, backlog(requested_backlog)?).map_err(io_err)?;
    Ok(UnixListener::from(fd))
}

fn socket_family(fd: BorrowedFd<'_>) -> io::Result<Option<AddressFamily>> {
    let sa: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(io_err)?;
    Ok(sa.family())
}

fn unsupported(what: &str, fam: Option<AddressFamily>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: unexpected socket family {fam:?}"),
    )
}

/// A stream socket received from the master (a hand-off or a shared listener), typed by asking
/// the kernel rather than trusting what the listen spec said (a `ListenAddr::Fd` could be
/// either).
pub(crate) enum StreamFd {
    Tcp(OwnedFd),
    Unix(OwnedFd),
}

pub(crate) fn classify(fd: OwnedFd) -> io::Result<StreamFd> {
    match socket_family(fd.as_fd())? {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(StreamFd::Tcp(fd)),
        Some(AddressFamily::Unix) => Ok(StreamFd::Unix(fd)),
        other => Err(unsupported("received socket", other)),
    }
}

/// The soft `RLIMIT_NOFILE`, or `None` when unlimited.
pub(crate) fn nofile_soft_limit() -> Option<u64> {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != nix::sys::resource::RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// Waits until `fd` is readable or `timeout` passes. Spurious returns are fine: callers loop.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    wait_channel(fd, false, timeout)
}

/// Waits until the channel `fd` is readable (or writable, when `want_write`) or `timeout`
/// passes. Spurious returns are fine: callers loop.
pub(crate) fn wait_channel(
    fd: BorrowedFd<'_>,
    want_write: bool,
    timeout: Duration,
) -> io::Result<()> {
    let ms = timeout.as_millis().clamp(1, u128::from(u16::MAX));
    let ms = u16::try_from(ms).unwrap_or(u16::MAX);
    let mut flags = PollFlags::POLLIN;
    if want_write {
        flags |= PollFlags::POLLOUT;
    }
    let mut fds = [PollFd::new(fd, flags)];
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// Waits until `listener` or `channel` is readable or `timeout` passes (EINTR returns early).
/// Spurious returns are fine: callers loop.
pub(crate) fn wait_listener_or_channel(
    listener: BorrowedFd<'_>,
    channel: BorrowedFd<'_>,
    timeout: Duration,
) -> io::Result<()> {
    let ms = timeout.as_millis().clamp(1, u128::from(u16::MAX));
    let ms = u16::try_from(ms).unwrap_or(u16::MAX);
    let mut fds = [
        PollFd::new(listener, PollFlags::POLLIN),
        PollFd::new(channel, PollFlags::POLLIN),
    ];
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// True for accept errors that mean "out of fds or memory": the connection stays queued, so
/// retrying at once would spin (hazard C1).
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Shuts a socket down in both directions. Unlike dropping one fd, this reaches the peer even
/// while other fds (dups kept for polling) still refer to the socket, so it sees EOF now.
pub(crate) fn shutdown_both(fd: BorrowedFd<'_>) {
    // ENOTCONN (peer already gone) is the only expected failure, and changes nothing.
    let _ = socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Both);
}

/// True when a connected stream socket holds bytes nobody has read yet (a peek, never
/// blocking). End of stream, an error or nothing yet are all false.
#[cfg(feature = "axum")]
pub(crate) fn has_unread_input(fd: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    let flags = socket::MsgFlags::MSG_PEEK | socket::MsgFlags::MSG_DONTWAIT;
    matches!(socket::recv(fd.as_raw_fd(), &mut byte, flags), Ok(n) if n > 0)
}

/// `fd` on the current tokio runtime's reactor, watched for `interest`. Panics outside a
/// runtime with IO enabled, as tokio's own sockets do.
#[cfg(feature = "tokio")]
#[allow(unsafe_code)]
pub(crate) fn on_reactor(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes the OwnedFd itself, which alone closes the descriptor (on the
    // AsyncFd's drop): until then it stays open, names the same open file description, and
    // `as_raw_fd` returns the same number.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) };
    registered.map_err(|e| e.into_parts().1)
}

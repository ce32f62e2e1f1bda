//! Creating the master's sockets. Every fd is owned from the syscall that creates it and is
//! close-on-exec and non-blocking.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;

use cluster_core::{BoundAddr, ListenAddr, ListenError, ListenSpec};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getsockname, listen,
    setsockopt, sockopt,
};

/// The backlog when no worker asked for one: the kernel clamps it to `somaxconn`, so asking
/// for the maximum lets that sysctl decide (Node uses 511).
pub(crate) const DEFAULT_BACKLOG: u32 = 4096;

fn errno_of(e: nix::errno::Errno, context: impl Into<String>) -> ListenError {
    ListenError {
        errno: e as i32,
        context: context.into(),
    }
}

fn io_errno(e: &io::Error, context: impl Into<String>) -> ListenError {
    ListenError {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        context: context.into(),
    }
}

/// A bound (and for streams, listening) socket and the address it got.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub fd: OwnedFd,
    pub addr: BoundAddr,
}

/// Binds `spec` in the master. `reuse_port` sets `SO_REUSEPORT` (the reuse-port policy);
/// stream sockets also get `listen(2)`.
pub(crate) fn bind_spec(spec: &ListenSpec, reuse_port: bool) -> Result<BoundSocket, ListenError> {
    let backlog = spec.backlog.unwrap_or(DEFAULT_BACKLOG);
    match &spec.addr {
        ListenAddr::Tcp(addr) => {
            let bound = bind_inet(
                *addr,
                SockType::Stream,
                spec.ipv6_only,
                reuse_port,
                Some(backlog),
            )?;
            if spec.defer_accept {
                set_defer_accept(bound.fd.as_fd())?;
            }
            Ok(bound)
        }
        ListenAddr::Udp(addr) => {
            bind_inet(*addr, SockType::Datagram, spec.ipv6_only, reuse_port, None)
        }
        ListenAddr::Unix(path) => {
            // std's bind creates the socket close-on-exec and listens; Node likewise fails with
            // EADDRINUSE when the path exists rather than unlinking someone else's socket.
            let listener = UnixListener::bind(path)
                .map_err(|e| io_errno(&e, format!("bind {}", path.display())))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_errno(&e, "set_nonblocking"))?;
            let fd = OwnedFd::from(listener);
            set_backlog(fd.as_fd(), backlog)?;
            Ok(BoundSocket {
                fd,
                addr: BoundAddr::Unix(path.clone()),
            })
        }
        ListenAddr::Fd(fd) => Err(ListenError {
            errno: libc::EBADF,
            context: format!("listen on inherited fd {fd}: not held by this master"),
        }),
    }
}

fn bind_inet(
    addr: SocketAddr,
    kind: SockType,
    ipv6_only: bool,
    reuse_port: bool,
    backlog: Option<u32>,
) -> Result<BoundSocket, ListenError> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(
        family,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| errno_of(e, "socket"))?;
    if kind == SockType::Stream {
        // Restarts must not wait out TIME_WAIT on the port, as in Node and every server.
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| errno_of(e, "SO_REUSEADDR"))?;
    }
    if reuse_port {
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(|e| errno_of(e, "SO_REUSEPORT"))?;
    }
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &ipv6_only).map_err(|e| errno_of(e, "IPV6_V6ONLY"))?;
    }
    let what = if kind == SockType::Stream {
        "tcp"
    } else {
        "udp"
    };
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| errno_of(e, format!("bind {what} {addr}")))?;
    if let Some(backlog) = backlog {
        set_backlog(fd.as_fd(), backlog)?;
    }
    let local: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| errno_of(e, "getsockname"))?;
    let local = sockaddr_to_std(&local).ok_or_else(|| ListenError {
        errno: libc::EAFNOSUPPORT,
        context: "getsockname returned a non-IP address".into(),
    })?;
    Ok(BoundSocket {
        fd,
        addr: BoundAddr::Inet(local),
    })
}

/// `TCP_DEFER_ACCEPT` on a listening TCP socket, unless it has a deferral already (a systemd
/// unit's `DeferAcceptSec=` on a socket it passed us), which is kept.
pub(crate) fn set_defer_accept(fd: BorrowedFd<'_>) -> Result<(), ListenError> {
    if cluster_ipc::tcp_defer_accept(fd).is_ok_and(|secs| secs > 0) {
        return Ok(());
    }
    cluster_ipc::set_tcp_defer_accept(fd, cluster_ipc::DEFER_ACCEPT_SECONDS)
        .map_err(|e| io_errno(&e, "TCP_DEFER_ACCEPT"))
}

/// `listen(2)` again with a larger backlog: Linux applies the new value to a listening socket,
/// so the master can honour the largest backlog any worker asks for (Node keeps the first).
pub(crate) fn set_backlog(fd: BorrowedFd<'_>, backlog: u32) -> Result<(), ListenError> {
    let clamped = i32::try_from(backlog)
        .unwrap_or(i32::MAX)
        .min(libc::SOMAXCONN.max(65535));
    let backlog = Backlog::new(clamped).map_err(|e| errno_of(e, "backlog"))?;
    listen(&fd, backlog).map_err(|e| errno_of(e, "listen"))
}

pub(crate) fn sockaddr_to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_resolves_and_second_bind_is_addr_in_use() {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let a = bind_spec(&spec, false).unwrap();
        let BoundAddr::Inet(addr) = a.addr else {
            panic!("inet")
        };
        assert_ne!(addr.port(), 0);
        let again = bind_spec(&ListenSpec::tcp(addr), false).unwrap_err();
        assert_eq!(again.errno, libc::EADDRINUSE);
        assert!(again.context.contains(&addr.to_string()));
    }

    #[test]
    fn defer_accept_is_set_when_the_spec_asks() {
        let any = "127.0.0.1:0".parse().unwrap();
        let plain = bind_spec(&ListenSpec::tcp(any), false).unwrap();
        assert_eq!(cluster_ipc::tcp_defer_accept(plain.fd.as_fd()).unwrap(), 0);
        let deferred = bind_spec(&ListenSpec::tcp(any).defer_accept(true), false).unwrap();
        assert!(cluster_ipc::tcp_defer_accept(deferred.fd.as_fd()).unwrap() > 0);
    }

    #[test]
    fn a_deferral_already_set_is_kept() {
        let bound = bind_spec(&ListenSpec::tcp("127.0.0.1:0".parse().unwrap()), false).unwrap();
        cluster_ipc::set_tcp_defer_accept(bound.fd.as_fd(), 30).unwrap();
        let unit = cluster_ipc::tcp_defer_accept(bound.fd.as_fd()).unwrap();
        set_defer_accept(bound.fd.as_fd()).unwrap();
        assert_eq!(
            cluster_ipc::tcp_defer_accept(bound.fd.as_fd()).unwrap(),
            unit
        );
    }

    #[test]
    fn reuse_port_sockets_share_a_port() {
        let a = bind_spec(&ListenSpec::tcp("127.0.0.1:0".parse().unwrap()), true).unwrap();
        let BoundAddr::Inet(addr) = a.addr else {
            panic!("inet")
        };
        let b = bind_spec(&ListenSpec::tcp(addr), true).unwrap();
        assert_eq!(b.addr, BoundAddr::Inet(addr));
    }

    #[test]
    fn udp_and_unix() {
        let u = bind_spec(&ListenSpec::udp("127.0.0.1:0".parse().unwrap()), false).unwrap();
        assert!(matches!(u.addr, BoundAddr::Inet(a) if a.port() != 0));
        let dir = std::env::temp_dir().join(format!("cluster-rs-bind-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let s = bind_spec(&ListenSpec::unix(&dir), false).unwrap();
        assert_eq!(s.addr, BoundAddr::Unix(dir.clone()));
        assert_eq!(
            bind_spec(&ListenSpec::unix(&dir), false).unwrap_err().errno,
            libc::EADDRINUSE
        );
        let _ = std::fs::remove_file(&dir);
    }
}

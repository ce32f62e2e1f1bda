//! The crate's only unsafe code: `sendmsg`/`recvmsg` with `SCM_RIGHTS`, `accept4` for the
//! connections that travel that way, and placing a channel end at a fixed fd in a child process.
//!
//! Received fds become `OwnedFd` before anything else can fail, so an early return can never
//! leak them (hazard A3: nix's `cmsgs()` errors out on `MSG_CTRUNC` and hands out raw ints).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Control buffer able to hold `SCM_MAX_FD` (253) fds, so space can never truncate a receive.
/// u64 elements give `cmsghdr` its alignment.
pub(crate) type CmsgBuf = [u64; 132];

pub(crate) const fn new_cmsg_buf() -> CmsgBuf {
    [0; 132]
}

/// One `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)` on `listener`: the connection and, for TCP,
/// its peer's address, as the kernel reported them in that one call.
///
/// The master accepts this way so that a worker it hands the connection to needs neither
/// `getpeername` nor `FIONBIO` (the non-blocking flag belongs to the open file description,
/// which `SCM_RIGHTS` passes along); a standalone server saves its `FIONBIO` too.
pub fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 writes at most `len` bytes into `storage`, which is ours and exactly that
    // large, updates `len`, and returns a new fd or -1.
    let rc = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut storage).cast::<libc::sockaddr>(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created `rc` for us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(rc) };
    let len = len as usize;
    let peer = match i32::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked) at the
            // start of `storage`, whose alignment suits every sockaddr type.
            let sin = unsafe { &*(&raw const storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6 (family AF_INET6, length checked).
            let sin6 = unsafe { &*(&raw const storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                // Passed through as the kernel stores it, as std's `peer_addr` does.
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    };
    Ok((fd, peer))
}

/// One `sendmsg` of `bytes` with `fds` attached as a single `SCM_RIGHTS` message.
/// Never raises SIGPIPE and never blocks. Returns the bytes written; when that is non-zero the
/// fds went with it (the kernel attaches them to the first chunk, hazard A7).
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cmsg = new_cmsg_buf();
    // SAFETY: msghdr is plain old data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * mem::size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        if space > mem::size_of_val(&cmsg) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes we own, so the first header fits.
        let hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: hdr is non-null (controllen >= one header) and aligned inside `cmsg`; the
        // data area holds `payload` bytes because space = CMSG_SPACE(payload).
        unsafe {
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(payload) as _;
            let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What one `recvmsg` produced.
pub(crate) struct Received {
    pub bytes: usize,
    /// `MSG_CTRUNC`: the kernel closed fds that did not fit or exceeded RLIMIT_NOFILE.
    pub truncated: bool,
}

/// One non-blocking `recvmsg` into `buf`, with close-on-exec fds appended to `fds`.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut CmsgBuf,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(cmsg) as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Walk every control message even when truncated: Linux rewrites cmsg_len to cover only the
    // fds it installed, and those are ours to close.
    // SAFETY: msg was filled by the kernel; FIRSTHDR/NXTHDR stay within msg_controllen.
    let mut hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !hdr.is_null() {
        // SAFETY: hdr is a valid header inside the control buffer.
        let (level, kind, len) = unsafe {
            (
                (*hdr).cmsg_level,
                (*hdr).cmsg_type,
                (*hdr).cmsg_len as usize,
            )
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes the header size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / mem::size_of::<RawFd>();
            // SAFETY: the data area of this header holds `count` fds written by the kernel.
            let data = unsafe { libc::CMSG_DATA(hdr) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: i < count, inside this header's data.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in our table for us alone.
                fds.push_back(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: msg and hdr are valid as above.
        hdr = unsafe { libc::CMSG_NXTHDR(&msg, hdr) };
    }
    Ok(Received {
        bytes: n as usize,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Arranges for `fd` to be open at `target` in the child that `cmd` spawns, without
/// close-on-exec; every other fd of ours stays close-on-exec. The fd moves into `cmd` and is
/// closed in this process when `cmd` is dropped.
pub(crate) fn inherit_at(cmd: &mut Command, fd: OwnedFd, target: RawFd) -> io::Result<()> {
    // std has already put stdio at 0..=2 when pre_exec runs, so an fd there would be clobbered;
    // try_clone moves it to 3 or above.
    let fd = if fd.as_raw_fd() <= 2 {
        fd.try_clone()?
    } else {
        fd
    };
    let closure = move || {
        let raw = fd.as_raw_fd();
        // dup2 onto itself would leave FD_CLOEXEC set (hazard D5), so clear it instead.
        let rc = if raw == target {
            // SAFETY: fcntl is async-signal-safe; raw is open in this (child) process.
            unsafe { libc::fcntl(raw, libc::F_SETFD, 0) }
        } else {
            // SAFETY: dup2 is async-signal-safe; the new fd does not have FD_CLOEXEC.
            unsafe { libc::dup2(raw, target) }
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: the closure only calls async-signal-safe functions and does not allocate, so it
    // is sound between fork and exec even in a multi-threaded parent.
    unsafe { cmd.pre_exec(closure) };
    Ok(())
}

/// Takes ownership of an inherited channel fd after checking that it is an open socket, so a
/// stale or wrong number in the environment cannot make us close someone else's fd.
pub(crate) fn adopt_inherited_socket(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fstat writes into a local struct; an invalid fd only returns EBADF.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(raw, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is not a socket"),
        ));
    }
    // SAFETY: the fd is open and the environment contract says it was left to us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Keep it from leaking into anything this worker spawns.
    // SAFETY: fcntl on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits up to `timeout_ms` (-1: forever) for `events` on `fd`.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: i32,
) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is a valid array of one element.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

pub(crate) use libc::{POLLIN, POLLOUT};

/// The deferral cluster-rs sets with `TCP_DEFER_ACCEPT`: short, so that a client of a
/// server-speaks-first protocol that meets it by mistake is slowed, not stranded.
pub const DEFER_ACCEPT_SECONDS: u32 = 1;

/// Sets `TCP_DEFER_ACCEPT` on a listening TCP socket: connections reach the accept queue only
/// once the client has sent data, or after about `seconds` (the kernel counts it in SYN-ACK
/// retransmissions) if it sends nothing. 0 turns it off.
pub fn set_tcp_defer_accept(listener: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    set_int_option(listener, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, value)
}

/// The `TCP_DEFER_ACCEPT` value of a listening TCP socket, as the kernel reports it (0: off).
pub fn tcp_defer_accept(listener: BorrowedFd<'_>) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals; len tells the kernel how much value holds.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sets `SO_SNDBUF` (the kernel doubles it and applies its minimum), so tests can force partial
/// writes and `EAGAIN` with small volumes.
#[cfg(test)]
pub(crate) fn set_sndbuf(sock: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_int_option(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes)
}

/// `setsockopt` of an `int` option.
fn set_int_option(
    sock: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Lowers this process's soft `RLIMIT_NOFILE`, so a test child can make the kernel refuse to
/// install received fds (`MSG_CTRUNC`, hazard A2).
#[cfg(test)]
pub(crate) fn set_nofile_soft(limit: u64) -> io::Result<()> {
    // SAFETY: rlimit is plain old data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: rl is a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    rl.rlim_cur = limit as libc::rlim_t;
    // SAFETY: rl is a live rlimit; lowering the soft limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! The master's own `sd_notify`: what a service manager (systemd with `Type=notify` or
//! `Type=notify-reload`) learns from the master when it started it with `NOTIFY_SOCKET`:
//! `READY=1` once every worker is ready, `RELOADING=1` (with `MONOTONIC_USEC`) when a
//! reload starts and `READY=1` when it ends, `STOPPING=1` on stop, a `STATUS=` line, and
//! `WATCHDOG=1` every half `WATCHDOG_USEC`, sent by the event loop itself, so that a master
//! whose loop is stuck stops pinging and is restarted.
//!
//! Sending is best effort: a manager that went away cannot be helped by a failing master.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::sys;

/// The master's link to its service manager.
#[derive(Debug)]
pub(crate) struct SdNotify {
    socket: UnixDatagram,
    to: SocketAddr,
    /// Half the manager's watchdog period, if it asked for pings.
    ping_every: Option<Duration>,
    next_ping: Option<Instant>,
}

impl SdNotify {
    /// From the process environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is unset or names this process. `None` when there is no manager to tell.
    pub(crate) fn from_env(now: Instant) -> Option<SdNotify> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog_usec = std::env::var("WATCHDOG_USEC").ok();
        let watchdog_pid = std::env::var("WATCHDOG_PID").ok();
        SdNotify::new(
            &socket,
            watchdog_usec.as_deref(),
            watchdog_pid.as_deref(),
            now,
        )
        .ok()
    }

    fn new(
        address: &OsString,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        now: Instant,
    ) -> io::Result<SdNotify> {
        let bytes = address.as_bytes();
        let to = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(address))?,
            // vsock addresses and relative paths: not supported.
            _ => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        let ours = watchdog_pid.is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let ping_every = watchdog_usec
            .filter(|_| ours)
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0)
            .map(|u| Duration::from_micros(u) / 2);
        Ok(SdNotify {
            socket,
            to,
            ping_every,
            next_ping: ping_every.map(|p| now + p),
        })
    }

    /// Sends one notification (newline-separated assignments).
    pub(crate) fn send(&self, message: &str) {
        // Best effort: a full or vanished manager socket must not stop the master.
        let _ = self.socket.send_to_addr(message.as_bytes(), &self.to);
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` that `Type=notify-reload` requires.
    pub(crate) fn reloading(&self) {
        match sys::monotonic_usec() {
            Some(usec) => self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}")),
            None => self.send("RELOADING=1"),
        }
    }

    /// When the next `WATCHDOG=1` is due.
    pub(crate) fn next_ping(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Sends `WATCHDOG=1` (with `status`) if it is due; true when it did.
    pub(crate) fn ping_if_due(&mut self, now: Instant, status: &str) -> bool {
        match (self.next_ping, self.ping_every) {
            (Some(at), Some(every)) if at <= now => {
                self.send(&format!("WATCHDOG=1\nSTATUS={status}"));
                self.next_ping = Some(now + every);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (UnixDatagram, OsString) {
        let name = format!(
            "cluster-rs-test/sd/{}/{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        (sock, OsString::from(format!("@{name}")))
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_an_abstract_socket_and_pings_at_half_the_period() {
        let (sock, address) = listener();
        let now = Instant::now();
        let mut sd = SdNotify::new(&address, Some("2000000"), None, now).unwrap();
        sd.send("READY=1");
        assert_eq!(recv(&sock), "READY=1");
        assert_eq!(sd.next_ping(), Some(now + Duration::from_secs(1)));
        assert!(!sd.ping_if_due(now, "x"));
        assert!(sd.ping_if_due(now + Duration::from_secs(1), "2 workers"));
        assert_eq!(recv(&sock), "WATCHDOG=1\nSTATUS=2 workers");
        sd.reloading();
        assert!(recv(&sock).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }

    #[test]
    fn a_watchdog_meant_for_another_process_is_not_ours() {
        let (_sock, address) = listener();
        let sd = SdNotify::new(&address, Some("2000000"), Some("1"), Instant::now()).unwrap();
        assert_eq!(sd.next_ping(), None);
        assert!(SdNotify::new(&OsString::from("relative"), None, None, Instant::now()).is_err());
    }
}

//! What the master tells the service manager that started it (see [`crate::sd`]): the loop
//! calls in at the points that matter and after every pass; the readiness it reports is
//! supervision's.

use std::time::Instant;

use super::EventLoop;
use crate::sd::SdNotify;

/// The link and what was last told through it.
#[derive(Debug)]
pub(super) struct Manager {
    sd: SdNotify,
    /// `READY=1` is owed: at start, and after each `RELOADING=1`.
    ready_owed: bool,
    stopping_sent: bool,
    /// The status line last sent, so that it is sent again only when it changes.
    last_status: String,
}

impl Manager {
    pub(super) fn from_env(now: Instant) -> Option<Manager> {
        Some(Manager {
            sd: SdNotify::from_env(now)?,
            ready_owed: true,
            stopping_sent: false,
            last_status: String::new(),
        })
    }

    pub(super) fn next_ping(&self) -> Option<Instant> {
        self.sd.next_ping()
    }
}

impl EventLoop {
    fn status_line(&self) -> String {
        format!(
            "{} of {} workers ready, {} connections handed off",
            self.sup.ready_workers(),
            self.sup.live_slots(),
            self.fleet.stats.handed_off
        )
    }

    /// After every pass: the owed `READY=1` once every worker is ready, the watchdog ping when
    /// due, and the status line when the worker count changed.
    pub(super) fn tell_manager(&mut self) {
        if self.manager.is_none() {
            return;
        }
        let status = self.status_line();
        let (all_ready, reloading, now) = (self.sup.all_ready(), self.sup.reloading(), self.now);
        let Some(m) = self.manager.as_mut() else {
            return;
        };
        if m.stopping_sent {
            return;
        }
        if m.ready_owed && all_ready && !reloading {
            m.ready_owed = false;
            m.sd.send(&format!("READY=1\nSTATUS={status}"));
            m.last_status = status;
            return;
        }
        if m.sd.ping_if_due(now, &status) {
            m.last_status = status;
            return;
        }
        // The handed-off count changes with every connection: only a change of the worker
        // count is worth a datagram of its own; the count rides along with the pings.
        let workers_part = |s: &str| s.split(',').next().map(str::to_owned);
        if workers_part(&status) != workers_part(&m.last_status) {
            m.sd.send(&format!("STATUS={status}"));
            m.last_status = status;
        }
    }

    pub(super) fn manager_reloading(&mut self) {
        if self.sup.shutting_down() {
            return;
        }
        if let Some(m) = self.manager.as_mut()
            && !m.stopping_sent
        {
            m.sd.reloading();
            m.ready_owed = true;
        }
    }

    /// The reload ended (done or failed): the workers serving now are what there is, so the
    /// manager hears `READY=1` at once rather than waiting for every slot.
    pub(super) fn manager_reload_ended(&mut self) {
        let status = self.status_line();
        if let Some(m) = self.manager.as_mut()
            && m.ready_owed
            && !m.stopping_sent
        {
            m.ready_owed = false;
            m.sd.send(&format!("READY=1\nSTATUS={status}"));
            m.last_status = status;
        }
    }

    pub(super) fn manager_stopping(&mut self) {
        let status = self.status_line();
        if let Some(m) = self.manager.as_mut()
            && !m.stopping_sent
        {
            m.stopping_sent = true;
            m.sd.send(&format!("STOPPING=1\nSTATUS=stopping; {status}"));
        }
    }
}

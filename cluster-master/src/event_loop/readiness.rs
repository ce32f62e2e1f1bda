//! The workers' `NOTIFY_SOCKET`: reads datagrams, attributes each to its worker by the
//! sender's pid, and feeds supervision what they say. What that means (ready, watchdog) is
//! decided there.

use cluster_core::WorkerId;

use super::EventLoop;
use crate::events::{Event, WorkerState};
use crate::notify::{MAX_NOTIFY_MESSAGE, Notice, parse};

/// Datagrams read per pass before the rest of the loop gets a turn.
const MAX_NOTIFICATIONS_PER_PASS: usize = 256;

impl EventLoop {
    pub(super) fn notify_ready(&mut self) {
        self.notify_unread = false;
        let mut buf = [0u8; MAX_NOTIFY_MESSAGE];
        for _ in 0..MAX_NOTIFICATIONS_PER_PASS {
            let datagram = match self.notify.recv(&mut buf) {
                Ok(Some(d)) => d,
                // Nothing left, or an error a datagram socket does not keep: look again when
                // it is readable.
                Ok(None) | Err(_) => return,
            };
            let (Some(pid), Some(len)) = (datagram.pid, datagram.len) else {
                continue;
            };
            // Only a worker itself may speak for it (systemd's NotifyAccess=main).
            let Some(id) = self
                .fleet
                .workers
                .values()
                .find(|w| w.pid == pid && !w.dropping)
                .map(|w| w.id)
            else {
                continue;
            };
            for notice in parse(&buf[..len]) {
                self.on_notice(id, notice);
            }
        }
        self.notify_unread = true;
    }

    fn on_notice(&mut self, id: WorkerId, notice: Notice) {
        match notice {
            Notice::Ready => {
                // Only the change is news: a worker repeating READY=1 makes no event.
                let mut became_ready = false;
                self.supervise(|s, now, out| became_ready = s.listening(id, now, out));
                if became_ready {
                    self.emit(Event::Ready { worker: id });
                }
            }
            Notice::Status(status) => {
                let Some(w) = self.fleet.workers.get_mut(&id) else {
                    return;
                };
                // A log line: the same one again is no news, and when the embedder is behind
                // it is dropped rather than queued (it is bulk).
                if w.last_status.as_deref() == Some(status.as_str()) || !self.events.has_room() {
                    return;
                }
                w.last_status = Some(status.clone());
                self.emit(Event::Status { worker: id, status });
            }
            Notice::Watchdog => self.sup.watchdog_ping(id, self.now),
            Notice::Stopping => {
                // Leaving by its own choice: its exit is not a crash. If it does not go, it
                // is killed after the shutdown timeout, as a disconnected worker is.
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.exited_after_disconnect = true;
                    w.state = WorkerState::Disconnecting;
                }
                self.sup.stopping(id, self.now);
                self.retire(id);
            }
        }
    }
}

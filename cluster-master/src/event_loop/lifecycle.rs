//! The event loop's side of supervision: it feeds [`Supervision`] what happened to the
//! processes and carries out the actions it returns. Every decision about which worker runs
//! where is made there, none here.

use std::os::fd::AsRawFd;
use std::time::Instant;

use cluster_core::{Message, ServerId, WorkerId};
use mio::unix::SourceFd;

use super::spawn::{self, is_resource_shortage};
use super::{EventLoop, MAX_FRAMES_FINAL_DRAIN, run_actions};
use crate::events::{Event, WorkerState};
use crate::server::ServerKind;
use crate::supervision::{Action, ReloadFailure, Supervision};

impl EventLoop {
    /// Feeds one input to supervision and carries out the actions it returns, including those
    /// that follow from reporting how each spawn went.
    pub(super) fn supervise(
        &mut self,
        input: impl FnOnce(&mut Supervision, Instant, &mut Vec<Action>),
    ) {
        let mut actions = Vec::new();
        input(&mut self.sup, self.now, &mut actions);
        let mut next = 0;
        while let Some(action) = actions.get(next).cloned() {
            next += 1;
            self.carry_out(action, &mut actions);
        }
    }

    fn carry_out(&mut self, action: Action, more: &mut Vec<Action>) {
        match action {
            Action::Spawn { slot, worker } => match self.spawn_worker(worker, slot) {
                Ok(ready) => self.sup.spawned(worker, ready, self.now, more),
                Err(e) => {
                    self.last_exit = format!("spawn {}: {e}", self.cfg.program.display());
                    let shortage = is_resource_shortage(&e);
                    self.sup.spawn_failed(worker, shortage, self.now, more);
                }
            },
            Action::Disconnect(worker) => self.send_disconnect(worker),
            Action::Kill(worker) => {
                if let Some(w) = self.fleet.workers.get(&worker) {
                    w.signal_with_group(libc::SIGKILL);
                }
            }
            Action::ReleaseSlotSockets(slot) => self.release_slot_sockets(slot),
            Action::Restarting { slot, after } => self.emit(Event::Restarting { slot, after }),
            Action::SlotErrored { slot, crashes } => {
                let reason = format!(
                    "{crashes} crashes in a row right after start; last: {}",
                    self.last_exit
                );
                self.emit(Event::SlotErrored { slot, reason });
                self.close_idle_servers_if_all_errored();
            }
            Action::SlotCannotListen { slot } => {
                let reason = format!(
                    "{} (not restarted: a restart would fail the same way)",
                    self.last_exit
                );
                self.emit(Event::SlotErrored { slot, reason });
                self.close_idle_servers_if_all_errored();
            }
            Action::WatchdogExpired(worker) => {
                let period = self.cfg.watchdog.unwrap_or_default();
                self.doom(
                    worker,
                    format!("sent no WATCHDOG=1 for {}ms: hung", period.as_millis()),
                );
            }
            Action::ReloadDone => {
                self.manager_reload_ended();
                self.emit(Event::ReloadDone);
            }
            Action::ReloadFailed(failure) => {
                let reason = match failure {
                    ReloadFailure::SpawnFailed(_) => self.last_exit.clone(),
                    ReloadFailure::ExitedBeforeReady(new) => format!(
                        "new worker {new} exited before listening ({})",
                        self.last_exit
                    ),
                    ReloadFailure::ReadyTimeout(new) => {
                        format!("new worker {new} was not ready (listening, READY=1) in time")
                    }
                };
                self.manager_reload_ended();
                self.emit(Event::ReloadFailed { reason });
            }
        }
    }

    fn close_idle_servers_if_all_errored(&mut self) {
        if !self.sup.all_slots_errored() {
            return;
        }
        // Nobody will come back for the servers: close them now.
        let idle: Vec<ServerId> = self
            .servers
            .values()
            .filter(|s| s.holders.is_empty())
            .map(|s| s.id)
            .collect();
        for sid in idle {
            self.close_server(sid);
        }
    }

    /// Tells the worker to finish and exit. Supervision has set its SIGKILL deadline.
    fn send_disconnect(&mut self, id: WorkerId) {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        w.exited_after_disconnect = true;
        // A worker that never said `Online` does not read its channel (a `LISTEN_FDS` program,
        // any program): it is asked to stop the way a service manager would, even if it said
        // `STOPPING=1` already (it may not be going).
        if !w.spoke_channel && w.stop_signal_sent.is_none() {
            w.signal_with_group(self.cfg.stop_signal);
            w.stop_signal_sent = Some(self.cfg.stop_signal);
        }
        w.state = WorkerState::Disconnecting;
        let sent = w
            .channel
            .as_mut()
            .map(|ch| ch.send(&Message::Disconnect, &[]));
        self.retire(id);
        if let Some(Err(e)) = sent {
            self.channel_failed(id, e);
        }
    }

    pub(super) fn reap(&mut self, id: WorkerId) {
        // Called when the worker's pidfd is readable: it has exited. `ECHILD` means somebody
        // else reaped it (a process that ignores SIGCHLD has its children reaped by the
        // kernel): it is gone all the same, only its status is unknown.
        let status = match self.fleet.workers.get_mut(&id).map(|w| w.child.try_wait()) {
            Some(Ok(Some(status))) => Some(status),
            Some(Err(e)) if e.raw_os_error() == Some(libc::ECHILD) => None,
            _ => return,
        };
        self.drain_channel_up_to(id, MAX_FRAMES_FINAL_DRAIN);
        self.drop_doomed();
        self.channel_closed(id);
        for stderr in [false, true] {
            self.read_output(id, stderr, spawn::MAX_OUTPUT_READS_AT_EXIT);
        }
        let Some(w) = self.fleet.workers.remove(&id) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&w.pidfd.as_raw_fd()));
        use std::os::unix::process::ExitStatusExt;
        let (code, signal) = status.map_or((None, None), |s| (s.code(), s.signal()));
        let clean = w.exited_after_disconnect
            && (code == Some(0) || (signal.is_some() && signal == w.stop_signal_sent));
        if self.sup.shutting_down() && !clean {
            self.unclean_exits += 1;
        }
        self.emit(Event::Exit {
            worker: id,
            slot: w.slot,
            pid: w.pid,
            code,
            signal,
            exited_after_disconnect: w.exited_after_disconnect,
            clean,
        });
        self.last_exit = match (code, signal) {
            (Some(c), _) => format!("worker {id} (pid {}) exited with code {c}", w.pid),
            (_, Some(s)) => format!("worker {id} (pid {}) killed by signal {s}", w.pid),
            _ => format!("worker {id} (pid {}) ended", w.pid),
        };
        let after_disconnect = w.exited_after_disconnect;
        match w.listen_failure {
            Some(failure) if !after_disconnect => {
                self.last_exit = failure;
                self.supervise(|s, now, out| s.exited_unable_to_listen(id, now, out));
            }
            _ => self.supervise(|s, now, out| s.exited(id, after_disconnect, now, out)),
        }
    }

    /// Stops offering connections to a worker that is leaving; what is already in flight to it
    /// stays there until it answers, so nothing is delivered twice.
    pub(super) fn retire(&mut self, id: WorkerId) {
        let sids = self
            .fleet
            .workers
            .get(&id)
            .map(|w| w.servers.clone())
            .unwrap_or_default();
        for sid in sids {
            if let Some(ServerKind::RoundRobin { handle, .. }) =
                self.servers.get_mut(&sid).map(|s| &mut s.kind)
            {
                handle.retire(id, self.now, &mut self.fleet.actions);
                run_actions(sid, handle, &mut self.fleet, self.now);
            }
        }
    }

    /// Closes the reuse-port sockets kept for `slot`, which no worker will serve again (the
    /// slot was removed or errored). Kept open, the kernel would go on hashing new clients
    /// into their accept queues, where they would wait forever.
    fn release_slot_sockets(&mut self, slot: usize) {
        for server in self.servers.values_mut() {
            if let ServerKind::ReusePort { sockets, .. } = &mut server.kind {
                sockets.remove(&slot);
            }
        }
    }
}

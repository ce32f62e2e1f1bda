//! The owner's commands, from the [`crate::Master`] handle's queue.

use std::sync::mpsc::TryRecvError;

use cluster_core::Message;

use super::{EventLoop, MAX_QUEUED_FOR_WORKER};
use crate::MasterError;
use crate::events::{Command, WorkerInfo};
use crate::server::ServerKind;
use crate::supervision::Supervision;

impl EventLoop {
    /// Carries out what the owner asked for since the last pass.
    pub(super) fn run_commands(&mut self) {
        let mut owner_gone = false;
        while !owner_gone {
            let cmd = match self.commands.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => return,
                // The owner is gone: nobody can stop us any more, so stop now (once: the queue
                // stays disconnected).
                Err(TryRecvError::Disconnected) => {
                    owner_gone = true;
                    Command::ForceShutdown
                }
            };
            match cmd {
                Command::Scale(n) if n > 0 => self.supervise(Supervision::scale_up),
                Command::Scale(_) => self.supervise(Supervision::scale_down),
                Command::Send(id, payload, reply) => {
                    let r = match self.fleet.channel(id) {
                        Some(ch) if ch.pending_output_bytes() > MAX_QUEUED_FOR_WORKER => {
                            Err(MasterError::WorkerBackedUp {
                                worker: id,
                                queued: ch.pending_output_bytes(),
                            })
                        }
                        Some(ch) => ch
                            .send(&Message::User { payload }, &[])
                            .map_err(|e| MasterError::io("send to worker", e.into())),
                        None => Err(MasterError::NoSuchWorker(id)),
                    };
                    let _ = reply.send(r);
                }
                Command::Disconnect(id) => self.supervise(|s, now, out| s.disconnect(id, now, out)),
                Command::Kill(id, sig) => {
                    if let Some(w) = self.fleet.workers.get(&id) {
                        w.signal(sig);
                    }
                }
                Command::Reload => {
                    // A reload already running (or a shutdown) ignores this one: the manager
                    // hears RELOADING=1 only for a reload that starts, so that each is
                    // answered by exactly one READY=1.
                    if self.sup.reload_would_start() {
                        self.manager_reloading();
                    }
                    self.supervise(Supervision::reload);
                }
                Command::Shutdown => {
                    self.unserved_before_stop
                        .get_or_insert(self.fleet.stats.closed_unserved);
                    self.manager_stopping();
                    self.supervise(Supervision::shutdown);
                }
                Command::ForceShutdown => {
                    self.manager_stopping();
                    for w in self.fleet.workers.values_mut() {
                        w.exited_after_disconnect = true;
                    }
                    self.supervise(|s, _, out| s.force_shutdown(out));
                }
                Command::Workers(reply) => {
                    let mut list: Vec<WorkerInfo> = self
                        .fleet
                        .workers
                        .values()
                        .map(|w| WorkerInfo {
                            id: w.id,
                            slot: w.slot,
                            pid: w.pid,
                            state: w.state,
                            in_flight: self.in_flight_to(w),
                        })
                        .collect();
                    list.sort_by_key(|w| w.id);
                    let _ = reply.send(list);
                }
                Command::Stats(reply) => {
                    let mut s = self.fleet.stats.clone();
                    s.pending = self
                        .servers
                        .values()
                        .map(|sv| match &sv.kind {
                            ServerKind::RoundRobin { handle, .. } => handle.pending_len(),
                            _ => 0,
                        })
                        .sum();
                    let _ = reply.send(s);
                }
            }
        }
    }
}

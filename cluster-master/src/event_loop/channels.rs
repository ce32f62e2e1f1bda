//! Reading the workers' channels: frames are dispatched as they arrive, a bounded number per
//! worker per pass; user messages wait (one held per worker, its channel paused) while the
//! embedder's event queue is full; a worker that breaks the protocol is dropped here.

use cluster_core::{Message, WorkerId};
use cluster_ipc::{IpcError, Received};

use super::{EventLoop, MAX_FRAMES_FINAL_DRAIN, MAX_FRAMES_PER_DRAIN, Source, deregister_channel};
use crate::events::{Event, WorkerState};
use crate::server::ServerKind;

impl EventLoop {
    /// Whether reading more from a worker's output may produce another bulk event now; if not,
    /// `source` is paused until the embedder has read enough.
    pub(super) fn room_for_bulk(&mut self, source: Source) -> bool {
        if self.events.has_room() {
            return true;
        }
        self.pause(source);
        false
    }

    pub(super) fn pause(&mut self, source: Source) {
        if !self.paused.contains(&source) {
            self.paused.push(source);
        }
        // If the embedder drained meanwhile, the next poll does not wait (see `run`).
        self.events.wait_for_room();
    }

    /// Emits the message a paused worker's channel was held on, if any. Returns false when it
    /// is still held for want of room (the channel stays paused) unless `regardless`.
    pub(super) fn release_held_message(&mut self, id: WorkerId, regardless: bool) -> bool {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return true;
        };
        let Some(ev) = w.held_message.take() else {
            return true;
        };
        if regardless || self.events.has_room() {
            self.emit(ev);
            // Its answers waited behind the held message through no fault of its own: their
            // deadlines start again now.
            self.postpone_ack_deadlines(id);
            return true;
        }
        w.held_message = Some(ev);
        self.pause(Source::Channel(id));
        false
    }

    /// Restarts the answer clock of every hand-off `id` has not answered (see
    /// [`crate::RoundRobinHandle::postpone_deadlines`]).
    fn postpone_ack_deadlines(&mut self, id: WorkerId) {
        let Some(w) = self.fleet.workers.get(&id) else {
            return;
        };
        for sid in w.servers.clone() {
            if let Some(ServerKind::RoundRobin { handle, .. }) =
                self.servers.get_mut(&sid).map(|s| &mut s.kind)
            {
                handle.postpone_deadlines(id, self.now);
            }
        }
    }

    pub(super) fn resume_paused(&mut self) {
        if self.paused.is_empty() || !self.events.room_to_resume() {
            return;
        }
        for source in std::mem::take(&mut self.paused) {
            self.read_source(source);
        }
    }

    // ---------------------------------------------------------------- channels

    pub(super) fn channel_ready(&mut self, id: WorkerId, readable: bool, writable: bool) {
        let Some(ch) = self.fleet.channel(id) else {
            return;
        };
        if readable {
            // Data may have arrived after a short read that found the socket empty, and this
            // event is the only notice of it: a drain cut short by its budget and resumed
            // without an event must not trust that read any more.
            ch.note_readable();
        }
        if writable && let Err(e) = ch.flush() {
            self.channel_failed(id, e);
            return;
        }
        self.drain_channel(id);
    }

    /// Reads every frame the worker has sent. Called on readiness and before reconciling an
    /// exit, so that answers sent just before death are honoured (hazard A12).
    pub(super) fn drain_channel(&mut self, id: WorkerId) {
        self.drain_channel_up_to(id, MAX_FRAMES_PER_DRAIN);
    }

    pub(super) fn drain_channel_up_to(&mut self, id: WorkerId, max_frames: usize) {
        self.read_frames(id, max_frames);
        self.carry_out_after_answers();
    }

    fn read_frames(&mut self, id: WorkerId, max_frames: usize) {
        // Bounded so one chatty worker cannot starve the others. Edge-triggered readiness
        // will not report frames already queued, so a drain cut short is resumed on the next
        // pass (with a zero poll timeout) rather than left for the ack timeout to find.
        // A dying worker's last frames are all read whatever the room: its answers must count,
        // and its socket buffer bounds the rest.
        let final_drain = max_frames == MAX_FRAMES_FINAL_DRAIN;
        if final_drain {
            let dropping = self.fleet.workers.get(&id).is_some_and(|w| w.dropping);
            if dropping {
                // Only its answers still count.
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.held_message = None;
                }
            } else {
                self.release_held_message(id, true);
            }
            // Its last readiness may not have been reported yet: a Node worker's channel is in
            // the channel set, read after the pass's pidfd events. Read to the end regardless
            // of what the last short read said.
            if let Some(ch) = self.fleet.channel(id) {
                ch.note_readable();
            }
        } else if !self.release_held_message(id, false) {
            return;
        }
        for _ in 0..max_frames {
            let Some(ch) = self.fleet.channel(id) else {
                return;
            };
            match ch.recv() {
                Ok(Some(mut r)) => {
                    if !r.fds.is_empty() && matches!(r.msg, Message::User { .. }) {
                        // A Node worker's `process.send(msg, handle)`: events carry no fds, so
                        // the handle (ACKed by the channel) is closed here and the message
                        // delivered alone.
                        r.fds.clear();
                        if !std::mem::replace(&mut self.handle_closed_told, true) {
                            self.emit(Event::HandleClosed { worker: id });
                        }
                    }
                    if let Message::User { payload } = r.msg {
                        let ev = Event::Message {
                            worker: id,
                            payload,
                        };
                        let dropping = self.fleet.workers.get(&id).is_some_and(|w| w.dropping);
                        if dropping {
                            // Only its answers still count.
                        } else if final_drain || self.events.has_room() {
                            self.emit(ev);
                        } else {
                            // The embedder is behind: keep this one message and read nothing
                            // more from this worker until there is room, so its writes block
                            // in the kernel's socket buffer. The other workers' frames,
                            // answers above all, are read as usual.
                            if let Some(w) = self.fleet.workers.get_mut(&id) {
                                w.held_message = Some(ev);
                            }
                            self.pause(Source::Channel(id));
                            return;
                        }
                    } else {
                        self.on_message(id, r);
                        // A worker just doomed is read no further now: what it sent after the
                        // violation must not bind, grant or queue anything more. Its answers are
                        // read at its exit.
                        if !self.fleet.doomed.is_empty()
                            && self.fleet.doomed.iter().any(|(w, _)| *w == id)
                        {
                            return;
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.channel_failed(id, e);
                    return;
                }
            }
        }
        if !self.unread.contains(&Source::Channel(id)) {
            self.unread.push(Source::Channel(id));
        }
    }

    pub(super) fn resume_unread(&mut self) {
        for source in std::mem::take(&mut self.unread) {
            self.read_source(source);
        }
    }

    pub(super) fn read_source(&mut self, source: Source) {
        match source {
            Source::Channel(id) => self.drain_channel(id),
            Source::Output { worker, stderr } => self.output_ready(worker, stderr),
        }
    }

    pub(super) fn channel_failed(&mut self, id: WorkerId, e: IpcError) {
        if e.is_closed() {
            self.channel_closed(id);
        } else {
            self.doom(id, format!("channel error: {e}"));
        }
    }

    pub(super) fn doom(&mut self, id: WorkerId, reason: String) {
        if !self.fleet.doomed.iter().any(|(w, _)| *w == id) {
            self.fleet.doomed.push((id, reason));
        }
    }

    /// Protocol violators: drop the channel with the logged reason, SIGKILL the process, and
    /// send their connections elsewhere. The exit is reaped (and the slot restarted) as usual.
    pub(super) fn drop_doomed(&mut self) {
        while let Some((id, reason)) = self.fleet.doomed.pop() {
            let Some(w) = self.fleet.workers.get_mut(&id) else {
                continue;
            };
            if w.dropping {
                // Doomed again while it dies (a bad frame among its last ones): nothing more
                // can be read from it, so what it held goes elsewhere now.
                self.channel_closed(id);
                continue;
            }
            w.dropping = true;
            w.signal_with_group(libc::SIGKILL);
            self.emit(Event::Dropped { worker: id, reason });
            // No new hand-offs. What is in flight stays until `reap`: the worker may have
            // written an `Accepted` we have not read, or even write one before the SIGKILL
            // lands, and that connection must not go to a second worker (hazard A12).
            self.retire(id);
        }
    }

    /// The worker can no longer talk: re-queue what was in flight to it and release its
    /// servers.
    pub(super) fn channel_closed(&mut self, id: WorkerId) {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        let Some(mut ch) = w.channel.take() else {
            return;
        };
        deregister_channel(&mut self.channels, &self.poll, &mut ch);
        drop(ch);
        w.state = WorkerState::Disconnected;
        // A worker without a channel cannot be told to stop; do not let it linger.
        self.sup.channel_closed(id, self.now);
        let servers = std::mem::take(&mut w.servers);
        for sid in servers {
            self.release_server(sid, id, false);
        }
        self.emit(Event::Disconnect { worker: id });
    }

    // ---------------------------------------------------------------- messages

    pub(super) fn on_message(&mut self, id: WorkerId, r: Received) {
        // A worker being dropped may only settle what it held. Answers, the hot path, are
        // told apart first so they cost no extra lookup.
        if !matches!(
            r.msg,
            Message::Accepted { .. } | Message::Refused { .. } | Message::Close { .. }
        ) && self.fleet.workers.get(&id).is_some_and(|w| w.dropping)
        {
            return;
        }
        if !matches!(r.msg, Message::Accepted { .. } | Message::Refused { .. }) {
            // Hand-offs held back for the end of this read go out before anything else the
            // worker says is acted on: a `Close`, a grant or a `Listening` may re-queue or
            // re-deal those very connections, and a late hand-off must never find one dealt
            // again (sent twice) or gone with a closed server (closed uncounted).
            self.carry_out_after_answers();
        }
        match r.msg {
            Message::Online => {
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.spoke_channel = true;
                    if w.state == WorkerState::Spawned {
                        w.state = WorkerState::Online;
                    }
                }
                self.sup.online(id);
                self.emit(Event::Online { worker: id });
            }
            Message::QueryServer { seq, spec, index } => self.query_server(id, seq, spec, index),
            Message::Listening { server, addr } => self.on_listening(id, server, addr),
            Message::Accepted { conn } => self.on_answer(id, conn, None),
            Message::Refused { conn, reason } => self.on_answer(id, conn, Some(reason)),
            Message::Close { server } => {
                // Only a holder may close a server: another worker's close (or a late one for
                // a server already released) must not shut a listener others wait on.
                let held = self.fleet.workers.get_mut(&id).is_some_and(|w| {
                    let before = w.servers.len();
                    w.servers.retain(|s| *s != server);
                    w.servers.len() != before
                });
                if held {
                    self.release_server(server, id, true);
                }
            }
            Message::ExitedAfterDisconnect => {
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.exited_after_disconnect = true;
                    w.state = WorkerState::Disconnecting;
                }
                self.sup.leaving(id);
                self.retire(id);
            }
            // Read by the drain loop itself, which holds it when the embedder is behind.
            Message::User { .. } => {}
            other => self.doom(
                id,
                format!("sent {}, which only a master may send", other.name()),
            ),
        }
    }
}

//! The server table at work: accepting on round-robin listeners and dealing connections out
//! through the handles, answering `QueryServer`, and releasing or closing servers as workers
//! leave them.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use std::time::Instant;

use cluster_core::{
    ConnId, HandedConn, ListenError, ListenSpec, MAX_HANDOFF_BATCH, Message, RefuseReason, Seq,
    ServerId, ServerReply, WorkerId,
};
use cluster_ipc::IpcError;
use mio::Interest;
use mio::unix::SourceFd;

use super::{Dealt, EventLoop, Fleet, KIND_LISTENER, MAX_QUEUED_FOR_WORKER, token};
use crate::events::{Event, WorkerState};
use crate::round_robin::{Action, RoundRobinHandle};
use crate::server::{AcceptedConn, ServerKind};
use crate::sys;

/// Server ids fit in the top 24 bits of a connection id.
const MAX_SERVER_ID: u32 = 1 << (64 - ConnId::COUNTER_BITS);

impl EventLoop {
    // ---------------------------------------------------------------- accepting

    pub(super) fn accept_ready(&mut self, id: ServerId) {
        let Some(server) = self.servers.get_mut(&id) else {
            return;
        };
        let ServerKind::RoundRobin {
            socket,
            handle,
            backlogged,
            ..
        } = &mut server.kind
        else {
            return;
        };
        // The whole pass is dealt before anything is sent, so that the connections one worker
        // gets in it leave in one `sendmsg` (see `run_actions`).
        loop {
            if !handle.accepting() {
                *backlogged = true;
                break;
            }
            match socket.accept_conn() {
                Ok(conn) => {
                    self.fleet.stats.accepted += 1;
                    handle.distribute(conn, self.now, &mut self.fleet.actions);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *backlogged = false;
                    break;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Shed one connection with the reserve fd so the backlog keeps moving.
                    self.reserve_fd = None;
                    if let Ok(conn) = socket.accept_conn() {
                        drop(conn);
                        self.fleet.stats.closed_unserved += 1;
                    }
                    self.reserve_fd = File::open("/dev/null").ok();
                    *backlogged = true;
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // EPROTO, EPERM, ENOBUFS, ENOMEM...: try again shortly (the backlogged timer).
                Err(_) => {
                    *backlogged = true;
                    break;
                }
            }
        }
        run_actions(id, handle, &mut self.fleet, self.now);
    }

    pub(super) fn retry_backlogged(&mut self) {
        let ready: Vec<ServerId> = self
            .servers
            .values()
            .filter(|s| matches!(&s.kind, ServerKind::RoundRobin { backlogged: true, handle, .. } if handle.accepting()))
            .map(|s| s.id)
            .collect();
        for id in ready {
            self.accept_ready(id);
        }
    }

    /// `id` no longer holds `sid`. Its in-flight connections are re-queued; the server closes
    /// when its last holder closed it explicitly or no worker will come back for it.
    pub(super) fn release_server(&mut self, sid: ServerId, id: WorkerId, explicit_close: bool) {
        let replacement_coming = self.sup.replacement_possible();
        let Some(server) = self.servers.get_mut(&sid) else {
            return;
        };
        server.holders.remove(&id);
        if let ServerKind::RoundRobin { handle, .. } = &mut server.kind {
            let requeued_before = handle.stats().requeued_on_remove;
            handle.remove(id, self.now, &mut self.fleet.actions);
            self.fleet.stats.requeued += handle.stats().requeued_on_remove - requeued_before;
            run_actions(sid, handle, &mut self.fleet, self.now);
        }
        if !server.holders.is_empty() {
            return;
        }
        if explicit_close && replacement_coming && self.sup.any_worker_starting() {
            // The worker starting may be about to listen here (a reload's replacement for
            // this holder's slot): closing now would refuse clients until it does.
            if !self.kept_for_starting.contains(&sid) {
                self.kept_for_starting.push(sid);
            }
        } else if explicit_close || !replacement_coming {
            self.close_server(sid);
        }
    }

    /// Closes the servers kept for starting workers once none is starting, unless one of
    /// them took the server up.
    pub(super) fn close_kept_servers_once_nobody_starts(&mut self) {
        if self.kept_for_starting.is_empty() || self.sup.any_worker_starting() {
            return;
        }
        for sid in std::mem::take(&mut self.kept_for_starting) {
            if self.servers.get(&sid).is_some_and(|s| s.holders.is_empty()) {
                self.close_server(sid);
            }
        }
    }

    pub(super) fn close_server(&mut self, sid: ServerId) {
        let Some(mut server) = self.servers.remove(&sid) else {
            return;
        };
        self.by_key.remove(&server.key);
        if let ServerKind::RoundRobin { socket, handle, .. } = &mut server.kind {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&socket.as_fd().as_raw_fd()));
            handle.close_all(&mut self.fleet.actions);
            run_actions(sid, handle, &mut self.fleet, self.now);
        }
        for w in self.fleet.workers.values_mut() {
            w.servers.retain(|s| *s != sid);
        }
    }

    pub(super) fn reply(
        &mut self,
        id: WorkerId,
        seq: Seq,
        reply: Result<(ServerId, Option<OwnedFd>), ListenError>,
    ) {
        let msg_and_fd = match reply {
            Ok((sid, fd)) => match self.servers.get(&sid) {
                Some(s) => (
                    Message::QueryServerReply {
                        seq,
                        reply: ServerReply::Granted {
                            server: sid,
                            addr: s.addr.clone(),
                            grant: s.grant(),
                        },
                    },
                    fd,
                ),
                None => return,
            },
            Err(e) => (
                Message::QueryServerReply {
                    seq,
                    reply: ServerReply::Failed(e),
                },
                None,
            ),
        };
        let Some(ch) = self.fleet.channel(id) else {
            return;
        };
        let fds: Vec<_> = msg_and_fd.1.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = ch.send(&msg_and_fd.0, &fds) {
            return self.channel_failed(id, e);
        }
        // A worker that asks without reading the replies would grow this queue without bound,
        // and each unsent grant holds a duplicate of its socket in the master.
        let (queued, fds) = (ch.pending_output_bytes(), ch.pending_output_fds());
        if queued > MAX_QUEUED_FOR_WORKER || fds > self.cfg.max_servers_per_worker {
            self.doom(
                id,
                format!(
                    "does not read its channel ({queued} bytes and {fds} sockets of replies wait for it)"
                ),
            );
        }
    }

    pub(super) fn query_server(&mut self, id: WorkerId, seq: Seq, spec: ListenSpec, index: u32) {
        let Some(w) = self.fleet.workers.get(&id) else {
            return;
        };
        let slot = w.slot;
        if w.exited_after_disconnect || w.state == WorkerState::Disconnecting {
            let e = ListenError {
                errno: libc::ESHUTDOWN,
                context: "worker is disconnecting".into(),
            };
            return self.reply(id, seq, Err(e));
        }
        if w.servers.len() >= self.cfg.max_servers_per_worker {
            let e = ListenError {
                errno: libc::EMFILE,
                context: format!(
                    "worker holds {} servers, the master's limit",
                    w.servers.len()
                ),
            };
            return self.reply(id, seq, Err(e));
        }
        if spec.exclusive {
            let e = ListenError {
                errno: libc::EINVAL,
                context: "exclusive listens bind in the worker".into(),
            };
            return self.reply(id, seq, Err(e));
        }
        let key = spec.key(index);
        let sid = match self.by_key.get(&key) {
            Some(sid) => *sid,
            None if self.next_server >= MAX_SERVER_ID => {
                // Connection ids name their server in 24 bits; reusing an id could let a stale
                // answer for an old server's connection settle a new server's.
                let e = ListenError {
                    errno: libc::ENFILE,
                    context: "the master has bound as many servers as it can name".into(),
                };
                return self.reply(id, seq, Err(e));
            }
            None => {
                let sid = ServerId(self.next_server);
                match self.bind_server(sid, key.clone(), &spec, slot) {
                    Ok(server) => {
                        self.next_server += 1;
                        if let ServerKind::RoundRobin { socket, .. } = &server.kind {
                            let raw = socket.as_fd().as_raw_fd();
                            if let Err(e) = self.poll.registry().register(
                                &mut SourceFd(&raw),
                                token(KIND_LISTENER, sid.0),
                                Interest::READABLE,
                            ) {
                                let e = ListenError {
                                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                                    context: "register listener".into(),
                                };
                                return self.reply(id, seq, Err(e));
                            }
                        }
                        self.servers.insert(sid, server);
                        self.by_key.insert(key, sid);
                        sid
                    }
                    // The key is not stored, so a later query binds afresh (Node's rule).
                    Err(e) => {
                        if matches!(
                            e.errno,
                            libc::EADDRINUSE | libc::EADDRNOTAVAIL | libc::EACCES
                        ) && let Some(w) = self.fleet.workers.get_mut(&id)
                        {
                            w.listen_failure = Some(bind_failure(&spec, e.errno));
                        }
                        return self.reply(id, seq, Err(e));
                    }
                }
            }
        };
        let Some(server) = self.servers.get_mut(&sid) else {
            return;
        };
        if server.holders.contains(&id) {
            let e = ListenError {
                errno: libc::EADDRINUSE,
                context: format!("worker already listens on {}", server.key),
            };
            return self.reply(id, seq, Err(e));
        }
        let defer = spec.defer_accept || self.cfg.defer_accept;
        let granted = server
            .raise_backlog(spec.backlog)
            .and_then(|_| {
                if defer {
                    server.defer_accepts()
                } else {
                    Ok(())
                }
            })
            .and_then(|_| server.socket_for(slot))
            .and_then(|fd| {
                fd.map(|f| f.try_clone_to_owned())
                    .transpose()
                    .map_err(|e| ListenError {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        context: "dup".into(),
                    })
            });
        match granted {
            Ok(fd) => {
                server.holders.insert(id);
                if let Some(w) = self.fleet.workers.get_mut(&id) {
                    w.servers.push(sid);
                    w.listen_failure = None;
                }
                self.reply(id, seq, Ok((sid, fd)));
            }
            Err(e) => {
                let empty = server.holders.is_empty();
                self.reply(id, seq, Err(e));
                if empty {
                    self.close_server(sid);
                }
            }
        }
    }

    pub(super) fn on_listening(
        &mut self,
        id: WorkerId,
        sid: ServerId,
        addr: cluster_core::BoundAddr,
    ) {
        let Some(w) = self.fleet.workers.get_mut(&id) else {
            return;
        };
        if !w.servers.contains(&sid) {
            return self.doom(
                id,
                format!("listening on server {sid} it was never granted"),
            );
        }
        let draining = w.state == WorkerState::Disconnecting;
        if !draining {
            w.state = WorkerState::Listening;
        }
        // Round-robin hand-offs start only now that the worker says it takes connections, so
        // one that listened but never serves holds nothing in flight.
        if let Some(ServerKind::RoundRobin { handle, .. }) =
            self.servers.get_mut(&sid).map(|s| &mut s.kind)
            && !draining
        {
            handle.add(id, self.now, &mut self.fleet.actions);
            run_actions(sid, handle, &mut self.fleet, self.now);
        }
        self.emit(Event::Listening {
            worker: id,
            server: sid,
            addr,
        });
        self.supervise(|s, now, out| {
            s.listening(id, now, out);
        });
    }

    /// A worker answered a hand-off. The hand-offs this makes possible (its window has room
    /// again) wait in the server's `after_answers` until the read of the worker's channel ends
    /// ([`EventLoop::carry_out_after_answers`]): a worker answers a batch in one write, and
    /// the connections that refill its window then leave in one frame.
    pub(super) fn on_answer(&mut self, id: WorkerId, conn: ConnId, refused: Option<RefuseReason>) {
        let sid = conn.server();
        let Some(ServerKind::RoundRobin {
            handle,
            after_answers,
            ..
        }) = self.servers.get_mut(&sid).map(|s| &mut s.kind)
        else {
            // The server closed while the answer was on its way.
            self.fleet.stats.stray_answers += 1;
            return;
        };
        let not_sent_yet = after_answers
            .iter()
            .any(|a| matches!(a, Action::Handoff { conn: c, .. } if *c == conn));
        if not_sent_yet {
            // Only a worker guessing ids answers a hand-off that has not left the master yet;
            // honouring it could deal the connection again while the first hand-off waits.
            self.fleet.stats.stray_answers += 1;
            return;
        }
        let result = match refused {
            None => handle.accepted(id, conn, self.now, after_answers).map(drop),
            Some(reason) => handle.refused(id, conn, reason, self.now, after_answers),
        };
        if result.is_err() {
            // An answer for a hand-off this worker no longer holds: it closed that server (the
            // connection was re-queued then). The handle ignored it, so it cannot cause a
            // double delivery; counting it is enough.
            self.fleet.stats.stray_answers += 1;
            return;
        }
        if refused.is_some() {
            self.fleet.stats.refused += 1;
        } else {
            self.fleet.stats.taken += 1;
        }
        if !self.answered_servers.contains(&sid) {
            self.answered_servers.push(sid);
        }
    }

    /// Carries out what answers made the handles ask for (see [`EventLoop::on_answer`]).
    /// A hand-off that no longer stands by then (its worker left meanwhile) is skipped by
    /// `run_actions`: the handle has already re-queued that connection.
    pub(super) fn carry_out_after_answers(&mut self) {
        let mut sids = std::mem::take(&mut self.answered_servers);
        for sid in sids.drain(..) {
            if let Some(ServerKind::RoundRobin {
                handle,
                after_answers,
                ..
            }) = self.servers.get_mut(&sid).map(|s| &mut s.kind)
            {
                self.fleet.actions.append(after_answers);
                run_actions(sid, handle, &mut self.fleet, self.now);
            }
        }
        // Keeps the allocation for the next read.
        self.answered_servers = sids;
    }
}

/// `127.0.0.1:8000: address already in use`: what an operator needs to see of a failed bind.
fn bind_failure(spec: &ListenSpec, errno: i32) -> String {
    let addr = match &spec.addr {
        cluster_core::ListenAddr::Tcp(a) | cluster_core::ListenAddr::Udp(a) => a.to_string(),
        other => other.to_string(),
    };
    let text = io::Error::from_raw_os_error(errno).to_string();
    // "Address already in use (os error 98)" -> "address already in use"
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    let text = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    };
    format!("{addr}: {text}")
}

/// Carries out a handle's actions: hand-offs go out on the worker's channel with the master's
/// fd attached (the master keeps its copy until the answer); closes drop the connection.
///
/// The hand-offs to one worker leave together, up to what its channel takes in one frame
/// ([`crate::WorkerChannel::max_handoff_batch`]): one `sendmsg` and, on the worker's side, one
/// `recvmsg` for the lot, which is most of what a hand-off costs. Batching never reorders one
/// worker's connections, and a frame is all or nothing: its fds go with its first byte.
///
/// A hand-off that fails for want of fds or memory in the master (the channel must keep a
/// duplicate of the fd while the worker's socket is full) is no fault of the worker: it counts
/// as that worker refusing it for a moment ([`RefuseReason::FdLimit`]), so it goes elsewhere.
/// Any other failure drops the worker.
pub(super) fn run_actions(
    sid: ServerId,
    handle: &mut RoundRobinHandle<AcceptedConn>,
    fleet: &mut Fleet,
    now: Instant,
) {
    let Fleet {
        workers,
        actions,
        handoffs,
        doomed,
        stats,
    } = fleet;
    let mut bounced = Vec::new();
    // Ends: each bounce spends one of the connection's `max_attempts` hand-offs, after which
    // the handle closes it instead of handing it off again.
    loop {
        handoffs.clear();
        for action in actions.drain(..) {
            match action {
                Action::Handoff { worker, conn } => handoffs.push(Dealt {
                    worker,
                    conn,
                    order: handoffs.len(),
                }),
                Action::Close { conn, .. } => {
                    drop(conn);
                    stats.closed_unserved += 1;
                }
            }
        }
        group_by_worker_in_dealing_order(handoffs);
        for same_worker in handoffs.chunk_by(|a, b| a.worker == b.worker) {
            let Some(&Dealt { worker, .. }) = same_worker.first() else {
                continue;
            };
            let channel = workers.get_mut(&worker).and_then(|w| w.channel.as_mut());
            let batch = channel
                .as_ref()
                .map_or(1, |ch| ch.max_handoff_batch().clamp(1, MAX_HANDOFF_BATCH));
            let mut channel = channel;
            for frame in same_worker.chunks(batch) {
                let mut conns = Vec::with_capacity(frame.len());
                let mut fds = Vec::with_capacity(frame.len());
                for &Dealt { conn, .. } in frame {
                    // Skipped when it no longer stands (see `carry_out_after_answers`).
                    if let Some(c) = handle.in_flight(conn, worker) {
                        if handle.handoffs(conn) > 1 {
                            // `O_NONBLOCK` lives in the open file, which the workers it went
                            // to before share: one of them may have cleared it before handing
                            // it back, and the next worker relies on it being set.
                            let _ = sys::set_nonblocking(c.fd.as_fd());
                        }
                        conns.push(HandedConn { conn, peer: c.peer });
                        fds.push(c.fd.as_fd());
                    }
                }
                if conns.is_empty() {
                    continue;
                }
                let msg = Message::NewConn { server: sid, conns };
                let sent = match channel.as_mut() {
                    Some(ch) => ch.send(&msg, &fds),
                    None => Err(IpcError::Closed),
                };
                match sent {
                    Ok(()) => {
                        stats.handed_off += fds.len() as u64;
                        stats.handoff_frames += 1;
                    }
                    // The master's limits, not the worker's fault (ETOOMANYREFS: this user's fds
                    // in flight in Unix sockets passed its RLIMIT_NOFILE, hazard A6): the
                    // connections come back as refused for want of fds and go elsewhere or wait.
                    Err(IpcError::Io(e))
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ETOOMANYREFS)
                        ) =>
                    {
                        if let Message::NewConn { conns, .. } = &msg {
                            bounced.extend(conns.iter().map(|c| (worker, c.conn)));
                        }
                    }
                    // The connections stay in flight to this worker in the handle; dropping
                    // the worker re-queues them.
                    Err(e) => {
                        if !doomed.iter().any(|(w, _)| *w == worker) {
                            doomed.push((worker, format!("hand-off failed: {e}")));
                        }
                    }
                }
            }
        }
        if bounced.is_empty() {
            return;
        }
        for (worker, conn) in bounced.drain(..) {
            // Cannot fail: the connection is in flight to that worker.
            let _ = handle.refused(worker, conn, RefuseReason::FdLimit, now, actions);
        }
    }
}

/// Groups one step's hand-offs by worker, each worker's in the order the handle dealt them,
/// and orders the groups by where each worker's first hand-off was dealt. The handle deals in
/// ring order, which rotates; sending the frames in worker-id order instead woke the same
/// workers first in every step, and under saturation (each answer refills the worker that
/// gave it) the split followed: with 4 workers the first got 8-9 % more than an even share
/// and the last 4-6 % less (0.4-1.6 % off even once sent in dealing order).
fn group_by_worker_in_dealing_order(handoffs: &mut [Dealt]) {
    // Both sorts are stable, so each worker's hand-offs keep their dealing order.
    handoffs.sort_by_key(|d| d.worker);
    for same_worker in handoffs.chunk_by_mut(|a, b| a.worker == b.worker) {
        let first = same_worker.first().map_or(0, |d| d.order);
        for d in same_worker {
            d.order = first;
        }
    }
    handoffs.sort_by_key(|d| d.order);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dealt(workers: &[u32]) -> Vec<Dealt> {
        workers
            .iter()
            .enumerate()
            .map(|(i, w)| Dealt {
                worker: WorkerId(*w),
                conn: ConnId(i as u64),
                order: i,
            })
            .collect()
    }

    #[test]
    fn the_worker_dealt_first_is_sent_first_whatever_its_id() {
        let mut d = dealt(&[3, 1, 2, 3, 1, 2, 3]);
        group_by_worker_in_dealing_order(&mut d);
        let sent: Vec<(u32, u64)> = d.iter().map(|d| (d.worker.0, d.conn.0)).collect();
        assert_eq!(
            sent,
            [(3, 0), (3, 3), (3, 6), (1, 1), (1, 4), (2, 2), (2, 5)]
        );
    }

    proptest! {
        #[test]
        fn grouping_keeps_every_hand_off_and_each_workers_order(
            workers in proptest::collection::vec(0u32..6, 0..40)
        ) {
            let mut d = dealt(&workers);
            group_by_worker_in_dealing_order(&mut d);
            // Nothing lost or repeated.
            let mut conns: Vec<u64> = d.iter().map(|d| d.conn.0).collect();
            conns.sort_unstable();
            prop_assert_eq!(conns, (0..workers.len() as u64).collect::<Vec<_>>());
            // One group per worker, groups in order of first appearance, each in dealing order.
            let mut first_seen: Vec<u32> = Vec::new();
            for w in &workers {
                if !first_seen.contains(w) {
                    first_seen.push(*w);
                }
            }
            let groups: Vec<&[Dealt]> = d.chunk_by(|a, b| a.worker == b.worker).collect();
            prop_assert_eq!(groups.len(), first_seen.len());
            for (group, w) in groups.iter().zip(&first_seen) {
                prop_assert!(group.iter().all(|d| d.worker.0 == *w));
                prop_assert!(group.windows(2).all(|p| p[0].conn.0 < p[1].conn.0));
            }
        }
    }
}

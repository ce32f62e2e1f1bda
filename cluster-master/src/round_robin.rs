//! Round-robin distribution of one server's connections to its workers: Node's
//! `RoundRobinHandle`, as a pure state machine.
//!
//! The handle does no I/O and never reads the clock. The event loop feeds it events
//! ([`RoundRobinHandle::distribute`] for every accepted connection, [`RoundRobinHandle::accepted`]
//! / [`RoundRobinHandle::refused`] for every worker reply, [`RoundRobinHandle::add`] /
//! [`RoundRobinHandle::remove`] as workers come and go, [`RoundRobinHandle::expire`] when the
//! timer from [`RoundRobinHandle::next_deadline`] fires) and carries out the [`Action`]s it
//! appends to the caller's `out` vector: send a `NewConn` frame with the fd from
//! [`RoundRobinHandle::conn`], or close a connection the master gives up on. It is generic over
//! the connection type `C` so that production holds `OwnedFd`s and tests hold integers.
//!
//! # Theory of operation
//!
//! **Ownership (hazard A11).** The handle owns every connection until a worker says `accepted`;
//! only then does it give the master's copy back (as the `Ok` of `accepted`) for the caller to
//! close. Every connection is at every moment in exactly one place: *queued*, *in flight* to
//! exactly one worker, or gone (returned by `accepted`, or returned in an [`Action::Close`]).
//! Nothing is ever dropped silently: removing a worker re-queues what was in flight to it.
//!
//! **The free ring.** Node allows one hand-off in flight per worker and keeps a FIFO of idle
//! workers (its `free` list). Here each worker may have `window` hand-offs in flight, and the
//! handle keeps a ring of the workers that have room for one more, each at most once. A
//! hand-off takes the worker at the front and, if it still has room, puts it at the back; an
//! answer (accepted or refused) gives a worker that was full its room back and puts it at the
//! back. So connections are dealt one at a time: sequential clients go to workers 1, 2, 3, 1,
//! ...; a burst of k connections to k idle workers reaches k different workers; with every
//! worker answering, per-worker counts differ by at most one. With `window == 1` the ring is
//! exactly Node's `free` list ("oldest idle first"). A worker that is slow to answer fills its
//! window and leaves the ring, which is how Node avoids overloading a busy worker.
//!
//! **Stalled workers.** A window is room for batches, not a promise to fill it: a worker whose
//! oldest unanswered hand-off went out [`RoundRobinConfig::stall_after`] ago or earlier is
//! skipped (it keeps its place in the ring) while another worker that may take the connection
//! is not stalled. A worker answers from its I/O loop as soon as that loop runs, so under load
//! its hand-offs stay young and the whole window is used, a frame of several connections per
//! wake-up; a worker that stops answering (an event loop blocked by a long request, a stopped
//! process) beside others that answer takes in only what is dealt in `stall_after`, one
//! connection at low rates, as Node's one-at-a-time rule would give it, instead of a window's
//! worth of clients that then wait for it. When no worker with room in its window answers (one
//! worker; all of them blocked; the others' windows full, as under saturation; a host too
//! loaded to run them) the rule steps aside and the windows bound what goes out, as without
//! it: queued clients would otherwise wait out `pending_timeout` and be closed where a
//! recovering worker could serve them. So nothing needs a timer.
//!
//! **Answer deadlines.** Each worker's unanswered hand-offs are kept in the order they were
//! sent, with the instant of sending, so [`RoundRobinHandle::oldest_unanswered`] tells the
//! master when the oldest one went out. An ack timeout built on it measures every hand-off: a
//! worker that answers the others cannot hold one back for ever.
//!
//! **Two queues.** Connections that have never been refused live in the *fresh* queue and can go
//! to any worker. Connections that came back (refused, or stranded on a removed worker) live in
//! the *retry* queue, which is served first because those clients have waited longer. A retried
//! connection avoids the workers that refused it: it goes to the first worker in the ring that
//! has not refused it; if only refusers have room it waits for the others; only when *every*
//! worker still being offered connections has refused it may it go back to a refuser (so a
//! worker that was at its connection limit and recovered still gets it). To keep a stuck
//! retried connection from blocking the rest (head-of-line blocking) only the first
//! `SCAN_LIMIT` retried connections are examined, and a fresh connection can always go to the
//! front of the ring (the first worker there that is not stalled, if any). Retried connections
//! beyond that prefix wait until the prefix moves or they expire.
//!
//! **Bounded retries (hazard A13).** Every hand-off counts as an attempt. When a connection comes
//! back (refused, or its worker was removed) after `max_attempts` hand-offs it is closed with
//! [`CloseReason::RetriesExhausted`] instead of bouncing forever. Counting the removal case too
//! means a connection that keeps killing its workers is bounded as well.
//!
//! **Permanent refusals.** A refusal whose [`RefuseReason::is_permanent`] is true (the worker
//! closed the listener or is draining) *retires* the worker for this server: it leaves the
//! ring and is offered nothing more, instead of receiving (and bouncing) every connection. It
//! stays registered, so its other in-flight connections are still answered or re-queued by
//! [`RoundRobinHandle::remove`]. [`RoundRobinHandle::retire`] does the same without a refusal,
//! for a worker the master knows is leaving. Calling [`RoundRobinHandle::add`] again for a
//! retired worker (it listened again) re-enables it; `add` of a worker that is already being
//! offered connections does nothing.
//!
//! **Deadlines (hazard C8).** A queued connection may wait `pending_timeout` from the moment it
//! (re-)entered the queue; [`RoundRobinHandle::expire`] closes it with
//! [`CloseReason::QueueTimeout`] once that time is reached (`now >= deadline`, so a timer set
//! to [`RoundRobinHandle::next_deadline`] is enough). The clock restarts on re-queue so that
//! connections stranded by a crash get a full `pending_timeout` for a replacement worker to
//! come up. Time passed in never goes backwards inside the handle (an older `now` is treated
//! as the newest seen), which keeps each queue sorted by deadline: expiry pops from the fronts
//! and the next deadline is read off them in O(1).
//!
//! **Backpressure.** [`RoundRobinHandle::accepting`] turns false once `max_pending` connections
//! are queued and true again only at `max_pending / 2`, so the accept loop deregisters the
//! listener and lets the kernel backlog hold clients without flapping. The bound is advisory:
//! `distribute` never refuses a connection (it has already been accepted) and re-queued
//! connections are never dropped, so the queue can exceed `max_pending` briefly.
//!
//! **Shutdown.** [`RoundRobinHandle::close_all`] closes every queued and in-flight connection and
//! gives every worker its room back; the handle stays usable. A worker reply that arrives
//! afterwards for a closed connection gets [`HandleError::UnknownConn`], which the caller should
//! ignore while shutting down.
//!
//! **Cost.** In the steady state (nothing refused) a hand-off and an answer are O(1) apart from
//! O(`window`) bookkeeping of the worker's own unanswered hand-offs, the `out` pushes, and
//! amortised `HashMap`/`VecDeque` growth, which is reused afterwards. `remove` is
//! O(`window`); retiring a worker is O(workers); `close_all` is O(connections). A non-empty
//! retry queue adds at most `SCAN_LIMIT × workers` cheap comparisons to a hand-off. The stall
//! rule adds a worker lookup per hand-off, and one per stalled worker passed over in the ring
//! (all of them, when every worker is stalled).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cluster_core::{ConnId, RefuseReason, ServerId, WorkerId};
use rustc_hash::FxHashMap;

/// How many retried connections a hand-off examines before serving a fresh one.
const SCAN_LIMIT: usize = 16;

/// [`RoundRobinConfig::window`] by default.
pub const DEFAULT_WINDOW: usize = 16;

/// [`RoundRobinConfig::stall_after`] by default.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_millis(2);

/// Tuning for one [`RoundRobinHandle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundRobinConfig {
    /// Hand-offs that may be in flight (sent, not yet answered) per worker; 1 is Node's
    /// behaviour. Values below 1 are treated as 1.
    pub window: usize,
    /// Queue length at which [`RoundRobinHandle::accepting`] turns false. Values below 1 are
    /// treated as 1.
    pub max_pending: usize,
    /// Hand-offs per connection before it is closed with [`CloseReason::RetriesExhausted`].
    /// Values below 1 are treated as 1.
    pub max_attempts: u32,
    /// How long a connection may stay queued (since it last entered the queue) before it is
    /// closed with [`CloseReason::QueueTimeout`].
    pub pending_timeout: Duration,
    /// A worker that has left a hand-off unanswered this long is passed over, whatever room
    /// its window has, while a worker that is not stalled has room for the connection: a
    /// worker that stops answering (a blocked event loop, a stopped process) takes in what
    /// arrives meanwhile, not a whole window. `None`: only the window limits it.
    /// `Some(Duration::ZERO)` counts every worker with a hand-off in flight as stalled.
    pub stall_after: Option<Duration>,
}

impl Default for RoundRobinConfig {
    fn default() -> Self {
        RoundRobinConfig {
            window: DEFAULT_WINDOW,
            max_pending: 1024,
            max_attempts: 8,
            pending_timeout: Duration::from_secs(5),
            stall_after: Some(DEFAULT_STALL_AFTER),
        }
    }
}

/// Something the event loop must do on the handle's behalf.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<C> {
    /// Send `NewConn { server, conn }` to `worker` with the fd from
    /// [`RoundRobinHandle::conn`]; the handle keeps its copy until the worker answers.
    Handoff {
        /// The worker to send to.
        worker: WorkerId,
        /// The hand-off id the worker will answer with.
        conn: ConnId,
    },
    /// Close this connection: the handle has given up on it and no longer holds it.
    Close {
        /// The connection, now owned by the caller.
        conn: C,
        /// Why it was given up.
        reason: CloseReason,
    },
}

/// Why the handle gave up on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// It came back after `max_attempts` hand-offs.
    RetriesExhausted,
    /// It stayed queued for `pending_timeout` with no worker able to take it.
    QueueTimeout,
    /// [`RoundRobinHandle::close_all`] was called.
    Shutdown,
}

/// A worker reply that does not match the handle's state. The master treats it as a protocol
/// violation by that worker; the handle's state is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// No connection with this id is queued or in flight on this server.
    #[error("connection {0} is unknown to this server")]
    UnknownConn(ConnId),
    /// The connection exists but is not in flight to the worker that answered.
    #[error("connection {conn} is not in flight to worker {worker}")]
    NotInFlightTo {
        /// The connection named in the reply.
        conn: ConnId,
        /// The worker that replied.
        worker: WorkerId,
    },
}

/// Lifetime counters of one [`RoundRobinHandle`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundRobinStats {
    /// Connections passed to [`RoundRobinHandle::distribute`].
    pub distributed: u64,
    /// [`Action::Handoff`]s emitted (retries included).
    pub handed_off: u64,
    /// Connections a worker accepted.
    pub accepted: u64,
    /// Refusals received.
    pub refused: u64,
    /// Connections put back in the queue because their worker was removed.
    pub requeued_on_remove: u64,
    /// Connections closed with [`CloseReason::RetriesExhausted`].
    pub closed_retries_exhausted: u64,
    /// Connections closed with [`CloseReason::QueueTimeout`].
    pub closed_queue_timeout: u64,
    /// Connections closed with [`CloseReason::Shutdown`].
    pub closed_shutdown: u64,
}

impl RoundRobinStats {
    /// Connections closed for `reason`.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        match reason {
            CloseReason::RetriesExhausted => self.closed_retries_exhausted,
            CloseReason::QueueTimeout => self.closed_queue_timeout,
            CloseReason::Shutdown => self.closed_shutdown,
        }
    }

    fn count_close(&mut self, reason: CloseReason) {
        let counter = match reason {
            CloseReason::RetriesExhausted => &mut self.closed_retries_exhausted,
            CloseReason::QueueTimeout => &mut self.closed_queue_timeout,
            CloseReason::Shutdown => &mut self.closed_shutdown,
        };
        *counter += 1;
    }
}

#[derive(Debug)]
struct Slot {
    /// Hand-offs sent to this worker and not yet answered, oldest first, with when each went
    /// out. Never longer than `window`.
    unanswered: Vec<(ConnId, Instant)>,
    /// False once the worker refused permanently or was retired: it is out of the ring then.
    offering: bool,
}

impl Slot {
    /// Whether this worker belongs in the free ring.
    fn has_room(&self, window: usize) -> bool {
        self.offering && self.unanswered.len() < window
    }

    /// Whether its oldest unanswered hand-off went out `stall_after` or longer before `now`.
    fn stalled(&self, now: Instant, stall_after: Duration) -> bool {
        self.unanswered
            .first()
            .is_some_and(|(_, sent)| now.saturating_duration_since(*sent) >= stall_after)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Queued,
    InFlight(WorkerId),
}

#[derive(Debug)]
struct Entry<C> {
    conn: C,
    place: Place,
    attempts: u32,
    /// Distinct workers that refused this connection; at most `max_attempts` long, and empty
    /// (unallocated) for the common never-refused connection.
    refused_by: Vec<WorkerId>,
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    id: ConnId,
    /// `None` when `now + pending_timeout` does not fit in an `Instant`: it never expires.
    deadline: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
enum Tier {
    Retry,
    Fresh,
}

/// The next hand-off: which queued connection goes to which worker of the free ring.
#[derive(Clone, Copy, Debug)]
struct Pick {
    tier: Tier,
    /// Position of the connection in its queue.
    queued_at: usize,
    /// Position of the worker in the free ring.
    free_at: usize,
}

/// Node's `RoundRobinHandle` for one server: queues the master's accepted connections and deals
/// them one at a time, from a ring of the workers that have room in their window, to the
/// worker at the front (passing over workers that stopped answering while others answer).
/// Nothing it holds is lost or delivered twice: it keeps every connection
/// until a worker accepts it, re-queues what a refusing or removed worker had, and closes
/// (as [`Action::Close`]) only what times out in the queue, exhausts its attempts, or is
/// left at [`RoundRobinHandle::close_all`].
#[derive(Debug)]
pub struct RoundRobinHandle<C> {
    server: ServerId,
    cfg: RoundRobinConfig,
    next_conn: u64,
    latest: Option<Instant>,
    // Fx, not SipHash: the keys are ids the master issues, and a worker naming any id in an
    // answer only looks one up, so it cannot build a collision chain.
    workers: FxHashMap<WorkerId, Slot>,
    offering: usize,
    /// Workers with room for another hand-off, each at most once, next in line at the front.
    free: VecDeque<WorkerId>,
    retry: VecDeque<Waiting>,
    fresh: VecDeque<Waiting>,
    conns: FxHashMap<ConnId, Entry<C>>,
    in_flight: usize,
    accepting: bool,
    stats: RoundRobinStats,
}

impl<C> RoundRobinHandle<C> {
    /// A handle for `server` with no workers and nothing queued. Config values below their
    /// minimum (window, max_pending and max_attempts of 0) are raised to 1.
    pub fn new(server: ServerId, cfg: RoundRobinConfig) -> Self {
        let cfg = RoundRobinConfig {
            window: cfg.window.max(1),
            max_pending: cfg.max_pending.max(1),
            max_attempts: cfg.max_attempts.max(1),
            pending_timeout: cfg.pending_timeout,
            stall_after: cfg.stall_after,
        };
        RoundRobinHandle {
            server,
            cfg,
            next_conn: 0,
            latest: None,
            workers: FxHashMap::default(),
            offering: 0,
            free: VecDeque::new(),
            retry: VecDeque::new(),
            fresh: VecDeque::new(),
            conns: FxHashMap::default(),
            in_flight: 0,
            accepting: true,
            stats: RoundRobinStats::default(),
        }
    }

    /// The server this handle distributes for.
    pub fn server(&self) -> ServerId {
        self.server
    }

    /// The effective configuration (after raising zeros to 1).
    pub fn config(&self) -> &RoundRobinConfig {
        &self.cfg
    }

    /// Registers `worker` at the back of the free ring; queued connections flow to it at once.
    /// Re-enables a worker retired by a permanent refusal; otherwise a repeated `add` does
    /// nothing.
    pub fn add(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action<C>>) {
        let slot = self.workers.entry(worker).or_insert(Slot {
            unanswered: Vec::new(),
            offering: false,
        });
        if slot.offering {
            return;
        }
        slot.offering = true;
        self.offering += 1;
        if slot.has_room(self.cfg.window) {
            self.free.push_back(worker);
        }
        self.handoff(now, out);
        self.update_accepting();
    }

    /// Unregisters `worker` (it died, disconnected or closed the server). Every connection in
    /// flight to it goes back to the retry queue, oldest first, and is redistributed; if no
    /// worker can take them they wait (and expire `pending_timeout` after `now`). Unknown
    /// workers are ignored.
    pub fn remove(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action<C>>) {
        let Some(mut slot) = self.workers.remove(&worker) else {
            return;
        };
        if slot.offering {
            self.offering -= 1;
            self.free.retain(|w| *w != worker);
        }
        if !slot.unanswered.is_empty() {
            let now = self.clamp(now);
            // Ids are handed out in arrival order, so sorting re-queues the oldest client first.
            slot.unanswered.sort_unstable_by_key(|(id, _)| *id);
            for (id, _) in slot.unanswered {
                self.in_flight -= 1;
                if self.requeue(id, now, out) {
                    self.stats.requeued_on_remove += 1;
                }
            }
        }
        self.handoff(now, out);
        self.update_accepting();
    }

    /// Stops offering connections to `worker` (it is draining or closed this server), as a
    /// permanent refusal does: it leaves the free ring, and what is in flight to it stays there
    /// until it answers or is removed, so nothing is delivered twice.
    /// [`RoundRobinHandle::add`] re-enables it. Unknown or already retired workers are ignored.
    pub fn retire(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action<C>>) {
        self.stop_offering(worker);
        // With one worker fewer offered, a retried connection that every remaining worker has
        // refused may now go back to one of them.
        self.handoff(now, out);
        self.update_accepting();
    }

    /// Takes a connection the master accepted, names it `ConnId::new(server, n)` and hands it
    /// to the worker at the front of the free ring (the first there that is not stalled, if
    /// any), or queues it.
    pub fn distribute(&mut self, conn: C, now: Instant, out: &mut Vec<Action<C>>) -> ConnId {
        let now = self.clamp(now);
        let id = self.next_id();
        self.conns.insert(
            id,
            Entry {
                conn,
                place: Place::Queued,
                attempts: 0,
                refused_by: Vec::new(),
            },
        );
        let deadline = now.checked_add(self.cfg.pending_timeout);
        self.fresh.push_back(Waiting { id, deadline });
        self.stats.distributed += 1;
        self.handoff(now, out);
        self.update_accepting();
        id
    }

    /// `worker` accepted `conn`: returns the master's copy for the caller to close (the worker
    /// holds its own). A worker whose window was full re-enters the ring at the back and may get
    /// the next queued connection.
    pub fn accepted(
        &mut self,
        worker: WorkerId,
        conn: ConnId,
        now: Instant,
        out: &mut Vec<Action<C>>,
    ) -> Result<C, HandleError> {
        self.check_in_flight(worker, conn)?;
        let entry = self
            .conns
            .remove(&conn)
            .ok_or(HandleError::UnknownConn(conn))?;
        self.answered(worker, conn);
        self.stats.accepted += 1;
        self.handoff(now, out);
        self.update_accepting();
        Ok(entry.conn)
    }

    /// `worker` refused `conn`. The connection is retried on another worker, or closed with
    /// [`CloseReason::RetriesExhausted`] after `max_attempts` hand-offs. A permanent `reason`
    /// retires the worker for this server; otherwise a worker whose window was full re-enters
    /// the ring at the back.
    pub fn refused(
        &mut self,
        worker: WorkerId,
        conn: ConnId,
        reason: RefuseReason,
        now: Instant,
        out: &mut Vec<Action<C>>,
    ) -> Result<(), HandleError> {
        self.check_in_flight(worker, conn)?;
        let now = self.clamp(now);
        self.stats.refused += 1;
        if reason.is_permanent() {
            self.stop_offering(worker);
        }
        self.answered(worker, conn);
        if let Some(entry) = self.conns.get_mut(&conn)
            && !entry.refused_by.contains(&worker)
        {
            entry.refused_by.push(worker);
        }
        self.requeue(conn, now, out);
        self.handoff(now, out);
        self.update_accepting();
        Ok(())
    }

    /// The connection to send with an [`Action::Handoff`]; `Some` exactly while `conn` is queued
    /// or in flight.
    pub fn conn(&self, conn: ConnId) -> Option<&C> {
        self.conns.get(&conn).map(|e| &e.conn)
    }

    /// The connection of an [`Action::Handoff`] of `conn` to `worker`, while that hand-off still
    /// stands: `None` once something else happened to the connection (the worker left and it
    /// was re-queued, say), so that a hand-off carried out late never sends it twice.
    pub fn in_flight(&self, conn: ConnId, worker: WorkerId) -> Option<&C> {
        self.conns
            .get(&conn)
            .filter(|e| e.place == Place::InFlight(worker))
            .map(|e| &e.conn)
    }

    /// How many times `conn` has been handed off, this hand-off included (0 while it never
    /// left the queue, or once it is gone).
    pub fn handoffs(&self, conn: ConnId) -> u32 {
        self.conns.get(&conn).map_or(0, |e| e.attempts)
    }

    /// When the oldest hand-off to `worker` that it has not answered was sent; `None` when it
    /// has nothing in flight (or is unknown).
    pub fn oldest_unanswered(&self, worker: WorkerId) -> Option<Instant> {
        let slot = self.workers.get(&worker)?;
        slot.unanswered.first().map(|(_, sent)| *sent)
    }

    /// Counts `worker`'s unanswered hand-offs as sent no earlier than `now`: the master could
    /// not read its answers for a while (it paused reading that worker), so the time since
    /// they went out says nothing about the worker. This may end a stall without dealing:
    /// queued connections go to the worker at the next answer or connection.
    pub fn postpone_deadlines(&mut self, worker: WorkerId, now: Instant) {
        let now = self.clamp(now);
        if let Some(slot) = self.workers.get_mut(&worker) {
            for (_, sent) in &mut slot.unanswered {
                *sent = (*sent).max(now);
            }
        }
    }

    /// Closes, with [`CloseReason::QueueTimeout`], every queued connection whose deadline is at
    /// or before `now`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Action<C>>) {
        let now = self.clamp(now);
        for tier in [Tier::Retry, Tier::Fresh] {
            loop {
                let queue = match tier {
                    Tier::Retry => &mut self.retry,
                    Tier::Fresh => &mut self.fresh,
                };
                // Deadlines within a queue never decrease, so the expired ones are a prefix.
                let due = queue
                    .front()
                    .is_some_and(|w| w.deadline.is_some_and(|d| d <= now));
                if !due {
                    break;
                }
                let Some(waiting) = queue.pop_front() else {
                    break;
                };
                self.close(waiting.id, CloseReason::QueueTimeout, out);
            }
        }
        self.update_accepting();
    }

    /// The earliest deadline among queued connections, for the event loop's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        let front = |q: &VecDeque<Waiting>| q.front().and_then(|w| w.deadline);
        match (front(&self.retry), front(&self.fresh)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Shutdown: closes every queued and in-flight connection with [`CloseReason::Shutdown`].
    /// Workers stay registered, each with its whole window free.
    pub fn close_all(&mut self, out: &mut Vec<Action<C>>) {
        while let Some(waiting) = self.retry.pop_front() {
            self.close(waiting.id, CloseReason::Shutdown, out);
        }
        while let Some(waiting) = self.fresh.pop_front() {
            self.close(waiting.id, CloseReason::Shutdown, out);
        }
        // Only in-flight connections remain; sorting makes the ring order (and the output)
        // deterministic.
        let mut rest: Vec<ConnId> = self.conns.keys().copied().collect();
        rest.sort_unstable();
        for id in rest {
            if let Some(Entry {
                place: Place::InFlight(worker),
                ..
            }) = self.conns.get(&id)
            {
                let worker = *worker;
                self.answered(worker, id);
            }
            self.close(id, CloseReason::Shutdown, out);
        }
        self.update_accepting();
    }

    /// Backpressure for the accept loop: false once `max_pending` connections are queued, true
    /// again only when the queue is down to `max_pending / 2`.
    pub fn accepting(&self) -> bool {
        self.accepting
    }

    /// Registered workers, including ones retired by a permanent refusal and not yet removed.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Registered workers that are still offered connections.
    pub fn offering_workers(&self) -> usize {
        self.offering
    }

    /// Queued connections.
    pub fn pending_len(&self) -> usize {
        self.retry.len() + self.fresh.len()
    }

    /// Connections handed off and not yet answered.
    pub fn in_flight_len(&self) -> usize {
        self.in_flight
    }

    /// Connections handed off to `worker` and not yet answered.
    pub fn in_flight_to(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |s| s.unanswered.len())
    }

    /// Lifetime counters.
    pub fn stats(&self) -> &RoundRobinStats {
        &self.stats
    }

    fn clamp(&mut self, now: Instant) -> Instant {
        let now = match self.latest {
            Some(latest) if latest > now => latest,
            _ => now,
        };
        self.latest = Some(now);
        now
    }

    fn next_id(&mut self) -> ConnId {
        loop {
            let id = ConnId::new(self.server, self.next_conn);
            self.next_conn = self.next_conn.wrapping_add(1);
            // The counter wraps after 2^40 connections; never reuse an id that is still live.
            if !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    fn check_in_flight(&self, worker: WorkerId, conn: ConnId) -> Result<(), HandleError> {
        match self.conns.get(&conn) {
            None => Err(HandleError::UnknownConn(conn)),
            Some(e) if e.place == Place::InFlight(worker) => Ok(()),
            Some(_) => Err(HandleError::NotInFlightTo { conn, worker }),
        }
    }

    fn stop_offering(&mut self, worker: WorkerId) {
        let window = self.cfg.window;
        if let Some(slot) = self.workers.get_mut(&worker)
            && slot.offering
        {
            if slot.has_room(window) {
                self.free.retain(|w| *w != worker);
            }
            slot.offering = false;
            self.offering -= 1;
        }
    }

    /// `worker` answered `conn` (or the handle gave it up): its window has room again, and a
    /// worker that was full goes to the back of the ring.
    fn answered(&mut self, worker: WorkerId, conn: ConnId) {
        self.in_flight -= 1;
        let window = self.cfg.window;
        if let Some(slot) = self.workers.get_mut(&worker) {
            let was_full = !slot.has_room(window);
            // Answers mostly come in sending order, so this finds `conn` first.
            if let Some(i) = slot.unanswered.iter().position(|(id, _)| *id == conn) {
                slot.unanswered.remove(i);
            }
            if was_full && slot.has_room(window) {
                self.free.push_back(worker);
            }
        }
    }

    /// Puts a connection that came back into the retry queue, or closes it if its attempts are
    /// used up. Returns whether it was queued.
    fn requeue(&mut self, id: ConnId, now: Instant, out: &mut Vec<Action<C>>) -> bool {
        let Some(entry) = self.conns.get_mut(&id) else {
            return false;
        };
        if entry.attempts >= self.cfg.max_attempts {
            self.close(id, CloseReason::RetriesExhausted, out);
            return false;
        }
        entry.place = Place::Queued;
        let deadline = now.checked_add(self.cfg.pending_timeout);
        self.retry.push_back(Waiting { id, deadline });
        true
    }

    /// Gives the connection to the caller to close. The caller has already taken it off any
    /// queue or in-flight count.
    fn close(&mut self, id: ConnId, reason: CloseReason, out: &mut Vec<Action<C>>) {
        if let Some(entry) = self.conns.remove(&id) {
            self.stats.count_close(reason);
            out.push(Action::Close {
                conn: entry.conn,
                reason,
            });
        }
    }

    /// Node's `handoff`: deals queued connections to the free ring while both have someone.
    fn handoff(&mut self, now: Instant, out: &mut Vec<Action<C>>) {
        let window = self.cfg.window;
        // Read, not clamped: a stall is judged against the newest time seen.
        let seen = self.latest.map_or(now, |latest| latest.max(now));
        while let Some(pick) = self.pick(seen) {
            // Clamped only when something is sent: registering a worker says nothing about
            // time, and a test's (or caller's) `now` from before must still count.
            let now = self.clamp(now);
            let queue = match pick.tier {
                Tier::Retry => &mut self.retry,
                Tier::Fresh => &mut self.fresh,
            };
            // The branches that follow are unreachable while the invariants hold (`pick` returns
            // positions in both, and queues and ring hold only registered connections and
            // workers); each keeps whatever is real where it was rather than lose it.
            let (waiting, worker) = (queue.remove(pick.queued_at), self.free.remove(pick.free_at));
            let (Some(waiting), Some(worker)) = (waiting, worker) else {
                if let Some(waiting) = waiting {
                    queue.insert(pick.queued_at, waiting);
                }
                if let Some(worker) = worker {
                    self.free.insert(pick.free_at, worker);
                }
                break;
            };
            let (Some(entry), Some(slot)) = (
                self.conns.get_mut(&waiting.id),
                self.workers.get_mut(&worker),
            ) else {
                // A ring entry for no worker, or a queue entry for no connection: that one is
                // dropped, the other keeps its place.
                if !self.workers.contains_key(&worker) {
                    if self.conns.contains_key(&waiting.id) {
                        queue.insert(pick.queued_at, waiting);
                    }
                } else {
                    self.free.insert(pick.free_at, worker);
                }
                continue;
            };
            entry.place = Place::InFlight(worker);
            entry.attempts += 1;
            slot.unanswered.push((waiting.id, now));
            if slot.has_room(window) {
                self.free.push_back(worker);
            }
            self.in_flight += 1;
            self.stats.handed_off += 1;
            out.push(Action::Handoff {
                worker,
                conn: waiting.id,
            });
        }
    }

    /// The next hand-off: the oldest retried connection among the first `SCAN_LIMIT` that has an
    /// eligible worker in the ring, else the oldest fresh one with the first worker of the ring
    /// that is not stalled (the front, unless it stopped answering), or the front if all are.
    fn pick(&self, now: Instant) -> Option<Pick> {
        if self.free.is_empty() {
            return None;
        }
        for (queued_at, waiting) in self.retry.iter().take(SCAN_LIMIT).enumerate() {
            if let Some(free_at) = self.eligible_worker(waiting.id, now) {
                return Some(Pick {
                    tier: Tier::Retry,
                    queued_at,
                    free_at,
                });
            }
        }
        if self.fresh.is_empty() {
            return None;
        }
        let free_at = self.first_answering(|_| true, now)?;
        Some(Pick {
            tier: Tier::Fresh,
            queued_at: 0,
            free_at,
        })
    }

    /// Position in the ring of the first worker that may take the retried connection `id`.
    fn eligible_worker(&self, id: ConnId, now: Instant) -> Option<usize> {
        let entry = self.conns.get(&id)?;
        let anyone = entry.refused_by.is_empty() || self.refused_by_all(entry);
        self.first_answering(|w| anyone || !entry.refused_by.contains(w), now)
    }

    /// Position in the ring of the first worker that `fits` and is not stalled, or if every
    /// one that fits is stalled, of the first that fits: the stall rule only steers
    /// connections to the workers that answer, and when none does (one worker, or all of them
    /// blocked) they go into windows as before rather than wait in the queue and expire.
    fn first_answering(&self, fits: impl Fn(&WorkerId) -> bool, now: Instant) -> Option<usize> {
        let mut first_fit = None;
        for (i, w) in self.free.iter().enumerate() {
            if !fits(w) {
                continue;
            }
            if self.answering(*w, now) {
                return Some(i);
            }
            first_fit.get_or_insert(i);
        }
        first_fit
    }

    /// Whether `worker` may be dealt a connection at `now` as far as the stall rule goes
    /// ([`RoundRobinConfig::stall_after`]). A stalled worker keeps its place in the ring: the
    /// answer that ends the stall finds it there, next in line.
    fn answering(&self, worker: WorkerId, now: Instant) -> bool {
        match self.cfg.stall_after {
            None => true,
            Some(limit) => self
                .workers
                .get(&worker)
                .is_none_or(|slot| !slot.stalled(now, limit)),
        }
    }

    /// Whether every worker still offered connections has refused this one, so that going back
    /// to a refuser is the only way forward.
    fn refused_by_all(&self, entry: &Entry<C>) -> bool {
        let refusers = entry
            .refused_by
            .iter()
            .filter(|w| self.workers.get(w).is_some_and(|s| s.offering))
            .count();
        refusers == self.offering
    }

    fn update_accepting(&mut self) {
        let pending = self.pending_len();
        if pending >= self.cfg.max_pending {
            self.accepting = false;
        } else if pending <= self.cfg.max_pending / 2 {
            self.accepting = true;
        }
    }
}

#[cfg(test)]
mod tests;

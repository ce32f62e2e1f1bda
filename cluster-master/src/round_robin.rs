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
//! **Credits.** Node allows one hand-off in flight per worker and keeps a FIFO of idle workers
//! (its `free` map). Here each worker has `window` credits, one per hand-off it may have in
//! flight, and the handle keeps a FIFO of credit tokens. A hand-off takes the token at the front;
//! the worker's reply (accepted or refused) puts it back at the *back*. With `window == 1` this is
//! exactly Node's `free` map ("oldest idle first"); with every worker replying at once the tokens
//! rotate in a fixed cycle, so per-worker hand-off counts differ by at most `window`. A worker
//! that is slow to reply runs out of tokens and is skipped, which is how Node avoids
//! overloading a busy worker. A worker that was just added gets its tokens at the back, so the
//! first burst can favour workers added earlier by up to `window` connections; the cycle
//! evens that out.
//!
//! **Two queues.** Connections that have never been refused live in the *fresh* queue and can go
//! to any worker. Connections that came back (refused, or stranded on a removed worker) live in
//! the *retry* queue, which is served first because those clients have waited longer. A retried
//! connection avoids the workers that refused it: it goes to the oldest token whose worker has
//! not refused it; if only refusers hold tokens it waits for the others; only when *every*
//! worker still being offered connections has refused it may it go back to a refuser (so a
//! worker that was at its connection limit and recovered still gets it). To keep a stuck
//! retried connection from blocking the rest (head-of-line blocking) only the first
//! `SCAN_LIMIT` retried connections are examined, and a fresh connection can always use the
//! front token. Retried connections beyond that prefix wait until the prefix moves or they
//! expire.
//!
//! **Bounded retries (hazard A13).** Every hand-off counts as an attempt. When a connection comes
//! back (refused, or its worker was removed) after `max_attempts` hand-offs it is closed with
//! [`CloseReason::RetriesExhausted`] instead of bouncing forever. Counting the removal case too
//! means a connection that keeps killing its workers is bounded as well.
//!
//! **Permanent refusals.** A refusal whose [`RefuseReason::is_permanent`] is true (the worker
//! closed the listener or is draining) *retires* the worker for this server: its tokens are
//! dropped and it is offered nothing more, instead of receiving (and bouncing) every
//! connection. It stays registered, so its other in-flight connections are still answered or
//! re-queued by [`RoundRobinHandle::remove`]. [`RoundRobinHandle::retire`] does the same
//! without a refusal, for a worker the master knows is leaving. Calling
//! [`RoundRobinHandle::add`] again for a
//! retired worker (it listened again) re-enables it; `add` of a worker that is already being
//! offered connections does nothing.
//!
//! **Deadlines (hazard C8).** A queued connection may wait `pending_timeout` from the moment it
//! (re-)entered the queue; [`RoundRobinHandle::expire`] closes it with
//! [`CloseReason::QueueTimeout`] once that time is reached (`now >= deadline`, so a timer set
//! to [`RoundRobinHandle::next_deadline`] is enough). The clock restarts on re-queue so that
//! connections stranded by a crash get a full `pending_timeout` for a replacement worker to
//! come up. This is why `remove` takes `now`. Time passed in never goes backwards inside the
//! handle (an older `now` is treated as the newest seen), which keeps each queue sorted by
//! deadline: expiry pops from the fronts and the next deadline is read off them in O(1).
//!
//! **Backpressure.** [`RoundRobinHandle::accepting`] turns false once `max_pending` connections
//! are queued and true again only at `max_pending / 2`, so the accept loop deregisters the
//! listener and lets the kernel backlog hold clients without flapping. The bound is advisory:
//! `distribute` never refuses a connection (it has already been accepted) and re-queued
//! connections are never dropped, so the queue can exceed `max_pending` briefly.
//!
//! **Shutdown.** [`RoundRobinHandle::close_all`] closes every queued and in-flight connection and
//! gives every worker its tokens back; the handle stays usable. A worker reply that arrives
//! afterwards for a closed connection gets [`HandleError::UnknownConn`], which the caller should
//! ignore while shutting down.
//!
//! **Cost.** In the steady state (nothing refused) every operation is O(1) apart from the
//! `out` pushes and amortised `HashMap`/`VecDeque` growth, which is reused afterwards.
//! `remove`, retiring a worker and `close_all` are O(connections + tokens). A non-empty retry
//! queue adds at most `SCAN_LIMIT × tokens` cheap comparisons to a hand-off.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use cluster_core::{ConnId, RefuseReason, ServerId, WorkerId};

/// How many retried connections a hand-off examines before giving the token to a fresh one.
const SCAN_LIMIT: usize = 16;

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
}

impl Default for RoundRobinConfig {
    fn default() -> Self {
        RoundRobinConfig {
            window: 4,
            max_pending: 1024,
            max_attempts: 8,
            pending_timeout: Duration::from_secs(5),
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
    in_flight: usize,
    /// False once the worker refused permanently: it holds no tokens then.
    offering: bool,
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

/// Node's `RoundRobinHandle` for one server: queues the master's accepted connections and hands
/// them to workers, oldest idle worker first, with a credit window per worker. See the
/// [module documentation](self) for the rules.
#[derive(Debug)]
pub struct RoundRobinHandle<C> {
    server: ServerId,
    cfg: RoundRobinConfig,
    next_conn: u64,
    latest: Option<Instant>,
    workers: HashMap<WorkerId, Slot>,
    offering: usize,
    credits: VecDeque<WorkerId>,
    retry: VecDeque<Waiting>,
    fresh: VecDeque<Waiting>,
    conns: HashMap<ConnId, Entry<C>>,
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
        };
        RoundRobinHandle {
            server,
            cfg,
            next_conn: 0,
            latest: None,
            workers: HashMap::new(),
            offering: 0,
            credits: VecDeque::new(),
            retry: VecDeque::new(),
            fresh: VecDeque::new(),
            conns: HashMap::new(),
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

    /// Registers `worker` with `window` credits; queued connections flow to it at once.
    /// Re-enables a worker retired by a permanent refusal; otherwise a repeated `add` does nothing.
    pub fn add(&mut self, worker: WorkerId, out: &mut Vec<Action<C>>) {
        let slot = self.workers.entry(worker).or_insert(Slot {
            in_flight: 0,
            offering: false,
        });
        if slot.offering {
            return;
        }
        slot.offering = true;
        let free = self.cfg.window.saturating_sub(slot.in_flight);
        self.offering += 1;
        self.credits.extend(std::iter::repeat_n(worker, free));
        self.pump(out);
        self.update_accepting();
    }

    /// Unregisters `worker` (it died, disconnected or closed the server). Every connection in
    /// flight to it goes back to the retry queue, oldest first, and is redistributed; if no
    /// worker can take them they wait (and expire `pending_timeout` after `now`). Unknown
    /// workers are ignored.
    pub fn remove(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action<C>>) {
        let Some(slot) = self.workers.remove(&worker) else {
            return;
        };
        if slot.offering {
            self.offering -= 1;
            self.credits.retain(|w| *w != worker);
        }
        if slot.in_flight > 0 {
            let now = self.clamp(now);
            let mut stranded: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, e)| e.place == Place::InFlight(worker))
                .map(|(id, _)| *id)
                .collect();
            // Ids are handed out in arrival order, so sorting re-queues the oldest client first.
            stranded.sort_unstable();
            for id in stranded {
                self.in_flight -= 1;
                if self.requeue(id, now, out) {
                    self.stats.requeued_on_remove += 1;
                }
            }
        }
        self.pump(out);
        self.update_accepting();
    }

    /// Stops offering connections to `worker` (it is draining or closed this server), as a
    /// permanent refusal does: its credits are dropped, what is in flight to it stays there
    /// until it answers or is removed, so nothing is delivered twice. [`RoundRobinHandle::add`]
    /// re-enables it. Unknown or already retired workers are ignored.
    pub fn retire(&mut self, worker: WorkerId, out: &mut Vec<Action<C>>) {
        self.stop_offering(worker);
        // With one worker fewer offered, a retried connection that every remaining worker has
        // refused may now go back to one of them.
        self.pump(out);
        self.update_accepting();
    }

    /// Takes a connection the master accepted, names it `ConnId::new(server, n)` and hands it
    /// to a worker if one has a free credit, or queues it.
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
        self.pump(out);
        self.update_accepting();
        id
    }

    /// `worker` accepted `conn`: returns the master's copy for the caller to close (the worker
    /// holds its own). The worker's credit goes to the back of the FIFO and may bring it the
    /// next queued connection.
    pub fn accepted(
        &mut self,
        worker: WorkerId,
        conn: ConnId,
        out: &mut Vec<Action<C>>,
    ) -> Result<C, HandleError> {
        self.check_in_flight(worker, conn)?;
        let entry = self
            .conns
            .remove(&conn)
            .ok_or(HandleError::UnknownConn(conn))?;
        self.release_credit(worker);
        self.stats.accepted += 1;
        self.pump(out);
        self.update_accepting();
        Ok(entry.conn)
    }

    /// `worker` refused `conn`. The connection is retried on another worker, or closed with
    /// [`CloseReason::RetriesExhausted`] after `max_attempts` hand-offs. A permanent `reason`
    /// retires the worker for this server; otherwise its credit goes to the back of the FIFO.
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
        self.release_credit(worker);
        if let Some(entry) = self.conns.get_mut(&conn)
            && !entry.refused_by.contains(&worker)
        {
            entry.refused_by.push(worker);
        }
        self.requeue(conn, now, out);
        self.pump(out);
        self.update_accepting();
        Ok(())
    }

    /// The connection to send with an [`Action::Handoff`]; `Some` exactly while `conn` is queued
    /// or in flight.
    pub fn conn(&self, conn: ConnId) -> Option<&C> {
        self.conns.get(&conn).map(|e| &e.conn)
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
    /// Workers stay registered with all their credits.
    pub fn close_all(&mut self, out: &mut Vec<Action<C>>) {
        while let Some(waiting) = self.retry.pop_front() {
            self.close(waiting.id, CloseReason::Shutdown, out);
        }
        while let Some(waiting) = self.fresh.pop_front() {
            self.close(waiting.id, CloseReason::Shutdown, out);
        }
        // Only in-flight connections remain; sorting makes the credit order (and the output)
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
                self.release_credit(worker);
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
        self.workers.get(&worker).map_or(0, |s| s.in_flight)
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
        if let Some(slot) = self.workers.get_mut(&worker)
            && slot.offering
        {
            slot.offering = false;
            self.offering -= 1;
            self.credits.retain(|w| *w != worker);
        }
    }

    /// One answer (or shutdown) from `worker`: its hand-off slot is free again.
    fn release_credit(&mut self, worker: WorkerId) {
        self.in_flight -= 1;
        if let Some(slot) = self.workers.get_mut(&worker) {
            slot.in_flight -= 1;
            if slot.offering {
                self.credits.push_back(worker);
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

    /// Hands queued connections to workers while there are credits and eligible pairs.
    fn pump(&mut self, out: &mut Vec<Action<C>>) {
        while !self.credits.is_empty() {
            let Some((tier, qi, ci)) = self.pick() else {
                break;
            };
            let queue = match tier {
                Tier::Retry => &mut self.retry,
                Tier::Fresh => &mut self.fresh,
            };
            let Some(waiting) = queue.remove(qi) else {
                break;
            };
            let Some(worker) = self.credits.remove(ci) else {
                break;
            };
            let (Some(entry), Some(slot)) = (
                self.conns.get_mut(&waiting.id),
                self.workers.get_mut(&worker),
            ) else {
                // Unreachable while the invariants hold; keep the token rather than lose it.
                self.credits.push_front(worker);
                continue;
            };
            entry.place = Place::InFlight(worker);
            entry.attempts += 1;
            slot.in_flight += 1;
            self.in_flight += 1;
            self.stats.handed_off += 1;
            out.push(Action::Handoff {
                worker,
                conn: waiting.id,
            });
        }
    }

    /// The next (queue, queue index, credit index) to hand off: the oldest retried connection
    /// among the first `SCAN_LIMIT` that has an eligible credit, else the oldest fresh one with
    /// the oldest credit.
    fn pick(&self) -> Option<(Tier, usize, usize)> {
        for (qi, waiting) in self.retry.iter().take(SCAN_LIMIT).enumerate() {
            if let Some(ci) = self.eligible_credit(waiting.id) {
                return Some((Tier::Retry, qi, ci));
            }
        }
        if self.fresh.is_empty() || self.credits.is_empty() {
            None
        } else {
            Some((Tier::Fresh, 0, 0))
        }
    }

    fn eligible_credit(&self, id: ConnId) -> Option<usize> {
        let entry = self.conns.get(&id)?;
        if entry.refused_by.is_empty() || self.refused_by_all(entry) {
            return (!self.credits.is_empty()).then_some(0);
        }
        self.credits
            .iter()
            .position(|w| !entry.refused_by.contains(w))
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const S: ServerId = ServerId(7);

    fn w(n: u32) -> WorkerId {
        WorkerId(n)
    }

    fn cfg(
        window: usize,
        max_pending: usize,
        max_attempts: u32,
        timeout_ms: u64,
    ) -> RoundRobinConfig {
        RoundRobinConfig {
            window,
            max_pending,
            max_attempts,
            pending_timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn handle(c: RoundRobinConfig, workers: &[u32]) -> RoundRobinHandle<u64> {
        let mut h = RoundRobinHandle::new(S, c);
        let mut out = Vec::new();
        for &n in workers {
            h.add(w(n), &mut out);
        }
        assert!(out.is_empty());
        h
    }

    /// Distributes `conn` and returns its id and the worker it went to at once, if any.
    fn dist(h: &mut RoundRobinHandle<u64>, conn: u64, now: Instant) -> (ConnId, Option<WorkerId>) {
        let mut out = Vec::new();
        let id = h.distribute(conn, now, &mut out);
        match out.as_slice() {
            [] => (id, None),
            [Action::Handoff { worker, conn }] if *conn == id => (id, Some(*worker)),
            other => panic!("unexpected actions {other:?}"),
        }
    }

    fn handoff(worker: u32, conn: ConnId) -> Action<u64> {
        Action::Handoff {
            worker: w(worker),
            conn,
        }
    }

    #[test]
    fn window_one_is_node_oldest_idle_first() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2, 3]);
        let mut out = Vec::new();
        let (a, wa) = dist(&mut h, 10, t);
        let (b, wb) = dist(&mut h, 11, t);
        let (c, wc) = dist(&mut h, 12, t);
        assert_eq!((wa, wb, wc), (Some(w(1)), Some(w(2)), Some(w(3))));
        assert_eq!(a.server(), S);
        let (d, wd) = dist(&mut h, 13, t);
        assert_eq!(wd, None, "every worker has its one hand-off in flight");
        assert_eq!(h.pending_len(), 1);

        assert_eq!(h.accepted(w(2), b, &mut out), Ok(11));
        assert_eq!(
            out,
            vec![handoff(2, d)],
            "the first worker to answer gets the queued conn"
        );
        out.clear();
        assert_eq!(h.accepted(w(3), c, &mut out), Ok(12));
        assert_eq!(h.accepted(w(1), a, &mut out), Ok(10));
        assert!(out.is_empty());
        // Idle since: w3, then w1; w2 is busy with d.
        assert_eq!(dist(&mut h, 14, t).1, Some(w(3)));
        assert_eq!(dist(&mut h, 15, t).1, Some(w(1)));
        assert_eq!(dist(&mut h, 16, t).1, None);
        assert_eq!(h.stats().handed_off, 6);
        assert_eq!(h.stats().accepted, 3);
    }

    #[test]
    fn window_limits_hand_offs_in_flight_per_worker() {
        let t = Instant::now();
        let mut h = handle(cfg(3, 100, 8, 1000), &[1]);
        let sent: Vec<_> = (0..5).map(|i| dist(&mut h, i, t).1).collect();
        assert_eq!(sent, [Some(w(1)), Some(w(1)), Some(w(1)), None, None]);
        assert_eq!(h.in_flight_to(w(1)), 3);
        assert_eq!(h.pending_len(), 2);
    }

    #[test]
    fn refused_conn_goes_to_a_different_worker_and_does_not_block_others() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t);
        h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
            .unwrap();
        assert!(
            out.is_empty(),
            "w1 is free but refused a; w2 has not refused it yet"
        );
        assert_eq!(h.pending_len(), 1);
        let (c, wc) = dist(&mut h, 12, t);
        assert_eq!(
            wc,
            Some(w(1)),
            "the waiting retry must not block a fresh conn"
        );
        assert_eq!(h.accepted(w(2), b, &mut out), Ok(11));
        assert_eq!(out, vec![handoff(2, a)]);
        assert_eq!(h.accepted(w(1), c, &mut out), Ok(12));
        assert_eq!(h.stats().refused, 1);
    }

    #[test]
    fn conn_refused_by_every_worker_may_go_back_to_a_refuser() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        h.refused(w(1), a, RefuseReason::FdLimit, t, &mut out)
            .unwrap();
        assert_eq!(out, vec![handoff(2, a)]);
        out.clear();
        h.refused(w(2), a, RefuseReason::MaxConnections, t, &mut out)
            .unwrap();
        assert_eq!(out, vec![handoff(1, a)], "oldest idle refuser");
        assert_eq!(h.accepted(w(1), a, &mut out), Ok(10));
    }

    #[test]
    fn permanent_refusal_retires_the_worker() {
        let t = Instant::now();
        let mut h = handle(cfg(2, 100, 8, 1000), &[1, 2]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t);
        let (c, wc) = dist(&mut h, 12, t);
        assert_eq!(wc, Some(w(2)));
        h.refused(w(1), a, RefuseReason::ListenerClosed, t, &mut out)
            .unwrap();
        assert_eq!(out, vec![handoff(2, a)]);
        out.clear();
        assert_eq!((h.workers(), h.offering_workers()), (2, 1));
        assert_eq!(h.in_flight_to(w(1)), 1, "b is still in flight to w1");

        let (d, wd) = dist(&mut h, 13, t);
        assert_eq!(
            wd, None,
            "w1 has free slots but is no longer offered anything"
        );
        assert_eq!(h.accepted(w(1), b, &mut out), Ok(11));
        assert!(out.is_empty(), "no credit comes back to a retired worker");
        assert_eq!(h.accepted(w(2), c, &mut out), Ok(12));
        assert_eq!(out, vec![handoff(2, d)]);
        out.clear();
        h.remove(w(1), t, &mut out);
        assert!(out.is_empty());
        assert_eq!((h.workers(), h.offering_workers()), (1, 1));
    }

    #[test]
    fn permanent_refusal_by_the_only_worker_queues_instead_of_bouncing() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        h.refused(w(1), a, RefuseReason::Draining, t, &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(h.pending_len(), 1);
        // It listened again: add re-enables it and the conn flows.
        h.add(w(1), &mut out);
        assert_eq!(out, vec![handoff(1, a)]);
        out.clear();
        h.add(w(1), &mut out);
        assert!(out.is_empty(), "a repeated add changes nothing");
        assert_eq!(h.in_flight_to(w(1)), 1);
        assert_eq!(dist(&mut h, 11, t).1, None, "window 1 is still respected");
    }

    #[test]
    fn retire_stops_offers_and_may_unblock_a_refused_conn() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2, 3]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t);
        dist(&mut h, 12, t);
        h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
            .unwrap();
        assert!(
            out.is_empty(),
            "w2 and w3 have not refused a; it waits for them"
        );
        h.retire(w(2), &mut out);
        assert!(out.is_empty(), "w3 still has not refused a");
        h.retire(w(3), &mut out);
        assert_eq!(
            out,
            vec![handoff(1, a)],
            "w1 is now the only worker offered"
        );
        out.clear();
        assert_eq!(h.accepted(w(2), b, &mut out), Ok(11));
        assert!(out.is_empty(), "a retired worker gets no credit back");
        assert_eq!(
            (h.workers(), h.offering_workers(), h.in_flight_to(w(3))),
            (3, 1, 1)
        );
    }

    #[test]
    fn retries_are_bounded() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 2, 1000), &[1]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
            .unwrap();
        assert_eq!(out, vec![handoff(1, a)]);
        out.clear();
        h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
            .unwrap();
        assert_eq!(
            out,
            vec![Action::Close {
                conn: 10,
                reason: CloseReason::RetriesExhausted
            }]
        );
        assert_eq!(h.conn(a), None);
        assert_eq!((h.pending_len(), h.in_flight_len()), (0, 0));
        assert_eq!(h.stats().closed(CloseReason::RetriesExhausted), 1);
        // The worker's credit came back.
        assert_eq!(dist(&mut h, 11, t).1, Some(w(1)));
    }

    #[test]
    fn backpressure_has_hysteresis() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 4, 8, 1000), &[]);
        let mut out = Vec::new();
        for i in 0..3 {
            dist(&mut h, i, t);
        }
        assert!(h.accepting());
        dist(&mut h, 3, t);
        assert!(!h.accepting(), "pending reached max_pending");
        h.add(w(1), &mut out);
        let Some(Action::Handoff { conn, .. }) = out.pop() else {
            panic!("expected a hand-off");
        };
        assert_eq!(h.pending_len(), 3);
        assert!(!h.accepting(), "3 > 4/2: still off");
        h.accepted(w(1), conn, &mut out).unwrap();
        assert_eq!(h.pending_len(), 2);
        assert!(h.accepting(), "back on at max_pending/2");
        out.clear();
        h.close_all(&mut out);
        assert_eq!(
            dist(&mut h, 4, t).1,
            Some(w(1)),
            "close_all gave the credit back"
        );
        dist(&mut h, 5, t);
        dist(&mut h, 7, t);
        dist(&mut h, 6, t);
        assert_eq!(h.pending_len(), 3);
        assert!(h.accepting(), "on until max_pending again");
    }

    #[test]
    fn queued_conns_expire_after_pending_timeout() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 5000), &[]);
        let mut out = Vec::new();
        assert_eq!(h.next_deadline(), None);
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t + Duration::from_secs(1));
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(5)));
        h.expire(t + Duration::from_millis(4999), &mut out);
        assert!(out.is_empty());
        h.expire(t + Duration::from_secs(5), &mut out);
        assert_eq!(
            out,
            vec![Action::Close {
                conn: 10,
                reason: CloseReason::QueueTimeout
            }]
        );
        assert_eq!(h.conn(a), None);
        assert_eq!(h.conn(b), Some(&11));
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(6)));
        out.clear();
        h.expire(t + Duration::from_secs(60), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(h.next_deadline(), None);
        assert_eq!(h.stats().closed_queue_timeout, 2);
    }

    #[test]
    fn remove_requeues_in_flight_conns_oldest_first() {
        let t = Instant::now();
        let mut h = handle(cfg(2, 100, 8, 1000), &[1, 2]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t);
        let (c, wc) = dist(&mut h, 12, t);
        let (d, _) = dist(&mut h, 13, t);
        assert_eq!(wc, Some(w(2)));
        let (e, we) = dist(&mut h, 14, t);
        assert_eq!(we, None);
        h.remove(w(1), t, &mut out);
        assert!(out.is_empty(), "w2 has no free credit");
        assert_eq!((h.pending_len(), h.in_flight_len()), (3, 2));
        assert_eq!(h.stats().requeued_on_remove, 2);
        assert_eq!(h.conn(a), Some(&10));
        h.accepted(w(2), c, &mut out).unwrap();
        h.accepted(w(2), d, &mut out).unwrap();
        assert_eq!(
            out,
            vec![handoff(2, a), handoff(2, b)],
            "stranded conns before fresh ones"
        );
        out.clear();
        h.accepted(w(2), a, &mut out).unwrap();
        assert_eq!(out, vec![handoff(2, e)]);
    }

    #[test]
    fn remove_of_last_worker_keeps_conns_until_a_new_worker_or_the_deadline() {
        let t = Instant::now();
        let later = t + Duration::from_secs(3);
        let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (b, _) = dist(&mut h, 11, t);
        h.remove(w(1), later, &mut out);
        assert!(out.is_empty());
        assert_eq!((h.workers(), h.pending_len()), (0, 2));
        // b has waited since t; a re-entered the queue at `later` and gets a full timeout.
        assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(1)));
        h.expire(later, &mut out);
        assert_eq!(
            out,
            vec![Action::Close {
                conn: 11,
                reason: CloseReason::QueueTimeout
            }]
        );
        out.clear();
        assert_eq!(h.next_deadline(), Some(later + Duration::from_secs(1)));
        h.add(w(2), &mut out);
        assert_eq!(out, vec![handoff(2, a)]);
        assert_eq!(h.conn(b), None);
    }

    #[test]
    fn wrong_answers_are_errors_and_change_nothing() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        let (_, _) = dist(&mut h, 11, t);
        let (q, _) = dist(&mut h, 12, t);
        let unknown = ConnId::new(S, 999);
        let before = (
            h.stats().clone(),
            h.pending_len(),
            h.in_flight_len(),
            h.next_deadline(),
        );
        assert_eq!(
            h.accepted(w(1), unknown, &mut out),
            Err(HandleError::UnknownConn(unknown))
        );
        assert_eq!(
            h.accepted(w(2), a, &mut out),
            Err(HandleError::NotInFlightTo {
                conn: a,
                worker: w(2)
            })
        );
        assert_eq!(
            h.refused(w(1), q, RefuseReason::FdLost, t, &mut out),
            Err(HandleError::NotInFlightTo {
                conn: q,
                worker: w(1)
            })
        );
        assert_eq!(
            h.refused(w(9), a, RefuseReason::Draining, t, &mut out),
            Err(HandleError::NotInFlightTo {
                conn: a,
                worker: w(9)
            })
        );
        assert!(out.is_empty());
        let after = (
            h.stats().clone(),
            h.pending_len(),
            h.in_flight_len(),
            h.next_deadline(),
        );
        assert_eq!(before, after);
        assert_eq!(h.offering_workers(), 2);
        assert_eq!(h.accepted(w(1), a, &mut out), Ok(10));
        assert_eq!(
            h.accepted(w(1), a, &mut out),
            Err(HandleError::UnknownConn(a))
        );
    }

    #[test]
    fn close_all_closes_queued_and_in_flight_conns() {
        let t = Instant::now();
        let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
        let mut out = Vec::new();
        let (a, _) = dist(&mut h, 10, t);
        dist(&mut h, 11, t);
        h.close_all(&mut out);
        let shutdown = |conn| Action::Close {
            conn,
            reason: CloseReason::Shutdown,
        };
        assert_eq!(out, vec![shutdown(11), shutdown(10)]);
        assert_eq!(
            (h.pending_len(), h.in_flight_len(), h.in_flight_to(w(1))),
            (0, 0, 0)
        );
        assert_eq!(h.next_deadline(), None);
        out.clear();
        assert_eq!(
            h.accepted(w(1), a, &mut out),
            Err(HandleError::UnknownConn(a))
        );
        assert_eq!(
            dist(&mut h, 12, t).1,
            Some(w(1)),
            "the worker's credit is back"
        );
    }

    #[test]
    fn zero_config_values_are_raised_to_one() {
        let h = RoundRobinHandle::<u64>::new(S, cfg(0, 0, 0, 0));
        assert_eq!(h.config(), &cfg(1, 1, 1, 0));
        assert_eq!(h.server(), S);
    }

    #[test]
    fn time_never_goes_backwards() {
        let t = Instant::now() + Duration::from_secs(10);
        let mut h = handle(cfg(1, 100, 8, 1000), &[]);
        dist(&mut h, 10, t);
        dist(&mut h, 11, t - Duration::from_secs(5));
        let mut out = Vec::new();
        h.expire(t + Duration::from_secs(1), &mut out);
        assert_eq!(
            out.len(),
            2,
            "the stale `now` was treated as the newest seen"
        );
    }

    // ---- property tests ----

    const REASONS: [RefuseReason; 5] = [
        RefuseReason::ListenerClosed,
        RefuseReason::Draining,
        RefuseReason::MaxConnections,
        RefuseReason::FdLimit,
        RefuseReason::FdLost,
    ];

    #[derive(Clone, Debug)]
    enum Op {
        Add,
        Readd(usize),
        Retire(usize),
        Remove(usize),
        Distribute,
        Accept(usize, usize),
        Refuse(usize, usize, usize),
        Bogus(usize, usize, bool),
        Advance(u64),
        CloseAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Add),
            1 => any::<usize>().prop_map(Op::Readd),
            1 => any::<usize>().prop_map(Op::Retire),
            2 => any::<usize>().prop_map(Op::Remove),
            8 => Just(Op::Distribute),
            5 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Accept(a, b)),
            4 => (any::<usize>(), any::<usize>(), 0..REASONS.len())
                .prop_map(|(a, b, r)| Op::Refuse(a, b, r)),
            1 => (any::<usize>(), any::<usize>(), any::<bool>())
                .prop_map(|(a, b, c)| Op::Bogus(a, b, c)),
            3 => (0u64..60).prop_map(Op::Advance),
            1 => Just(Op::CloseAll),
        ]
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum St {
        Queued,
        InFlight(WorkerId),
        Accepted,
        Closed(CloseReason),
    }

    struct MConn {
        id: ConnId,
        st: St,
        attempts: u32,
        refused_by: Vec<WorkerId>,
        deadline: Instant,
    }

    /// What the handle must look like, tracked independently. The C of conn `i` is `i`.
    struct Model {
        cfg: RoundRobinConfig,
        now: Instant,
        conns: Vec<MConn>,
        by_id: HashMap<ConnId, usize>,
        live: Vec<WorkerId>,
        offering: HashSet<WorkerId>,
        next_worker: u32,
        accepting: bool,
        returned: HashSet<u64>,
    }

    impl Model {
        fn requeue(&mut self, i: usize) {
            let m = &mut self.conns[i];
            m.st = St::Queued;
            m.deadline = self.now + self.cfg.pending_timeout;
        }

        fn in_flight_of(&self, worker: WorkerId) -> Vec<usize> {
            (0..self.conns.len())
                .filter(|&i| self.conns[i].st == St::InFlight(worker))
                .collect()
        }

        /// Checks and applies the actions the handle emitted for one step.
        fn apply(&mut self, out: Vec<Action<u64>>) {
            for action in out {
                match action {
                    Action::Handoff { worker, conn } => {
                        let i = self.by_id[&conn];
                        let m = &mut self.conns[i];
                        assert_eq!(m.st, St::Queued, "hand-off of a conn that is not queued");
                        assert!(
                            self.offering.contains(&worker),
                            "hand-off to a worker not offered"
                        );
                        if m.refused_by.contains(&worker) {
                            assert!(
                                self.offering.iter().all(|o| m.refused_by.contains(o)),
                                "back to a refuser while another worker could take it"
                            );
                        }
                        m.attempts += 1;
                        assert!(m.attempts <= self.cfg.max_attempts);
                        m.st = St::InFlight(worker);
                    }
                    Action::Close { conn, reason } => {
                        assert!(self.returned.insert(conn), "conn {conn} returned twice");
                        let m = &mut self.conns[usize::try_from(conn).unwrap()];
                        match reason {
                            CloseReason::QueueTimeout => {
                                assert_eq!(m.st, St::Queued);
                                assert!(m.deadline <= self.now);
                            }
                            CloseReason::RetriesExhausted => {
                                assert_eq!(m.st, St::Queued);
                                assert_eq!(m.attempts, self.cfg.max_attempts);
                            }
                            CloseReason::Shutdown => {
                                assert!(matches!(m.st, St::Queued | St::InFlight(_)));
                            }
                        }
                        m.st = St::Closed(reason);
                    }
                }
            }
        }

        fn check(&mut self, h: &RoundRobinHandle<u64>) {
            let mut pending = 0;
            let mut per_worker: HashMap<WorkerId, usize> = HashMap::new();
            let mut deadline: Option<Instant> = None;
            let mut accepted = 0;
            let mut closed: HashMap<CloseReason, u64> = HashMap::new();
            for (i, m) in self.conns.iter().enumerate() {
                let c = u64::try_from(i).unwrap();
                match m.st {
                    St::Queued => {
                        pending += 1;
                        deadline = Some(deadline.map_or(m.deadline, |d| d.min(m.deadline)));
                        assert_eq!(h.conn(m.id), Some(&c));
                    }
                    St::InFlight(worker) => {
                        assert!(self.live.contains(&worker));
                        *per_worker.entry(worker).or_default() += 1;
                        assert_eq!(h.conn(m.id), Some(&c));
                    }
                    St::Accepted => {
                        accepted += 1;
                        assert_eq!(h.conn(m.id), None);
                    }
                    St::Closed(reason) => {
                        *closed.entry(reason).or_default() += 1;
                        assert_eq!(h.conn(m.id), None);
                    }
                }
            }
            assert_eq!(h.pending_len(), pending);
            assert_eq!(h.in_flight_len(), per_worker.values().sum::<usize>());
            for &worker in &self.live {
                let n = per_worker.get(&worker).copied().unwrap_or(0);
                assert_eq!(h.in_flight_to(worker), n);
                assert!(n <= self.cfg.window);
            }
            assert_eq!(h.workers(), self.live.len());
            assert_eq!(h.offering_workers(), self.offering.len());
            assert_eq!(h.next_deadline(), deadline);

            if pending >= self.cfg.max_pending {
                self.accepting = false;
            } else if pending <= self.cfg.max_pending / 2 {
                self.accepting = true;
            }
            assert_eq!(h.accepting(), self.accepting);

            // Work conservation: a queued conn may wait beside a free slot only when that
            // worker refused it and some other offered worker has not.
            if pending <= SCAN_LIMIT {
                for m in self.conns.iter().filter(|m| m.st == St::Queued) {
                    for &worker in &self.offering {
                        if per_worker.get(&worker).copied().unwrap_or(0) < self.cfg.window {
                            assert!(m.refused_by.contains(&worker), "idle worker beside a conn");
                            assert!(!self.offering.iter().all(|o| m.refused_by.contains(o)));
                        }
                    }
                }
            }

            let stats = h.stats();
            assert_eq!(stats.distributed, self.conns.len() as u64);
            assert_eq!(stats.accepted, accepted);
            for reason in [
                CloseReason::RetriesExhausted,
                CloseReason::QueueTimeout,
                CloseReason::Shutdown,
            ] {
                assert_eq!(
                    stats.closed(reason),
                    closed.get(&reason).copied().unwrap_or(0)
                );
            }
        }
    }

    fn snapshot(
        h: &RoundRobinHandle<u64>,
    ) -> (
        RoundRobinStats,
        usize,
        usize,
        bool,
        Option<Instant>,
        usize,
        usize,
    ) {
        (
            h.stats().clone(),
            h.pending_len(),
            h.in_flight_len(),
            h.accepting(),
            h.next_deadline(),
            h.workers(),
            h.offering_workers(),
        )
    }

    fn run_model(c: RoundRobinConfig, ops: &[Op]) {
        let start = Instant::now();
        let mut h = RoundRobinHandle::<u64>::new(S, c);
        let mut m = Model {
            cfg: *h.config(),
            now: start,
            conns: Vec::new(),
            by_id: HashMap::new(),
            live: Vec::new(),
            offering: HashSet::new(),
            next_worker: 1,
            accepting: true,
            returned: HashSet::new(),
        };
        let mut out = Vec::new();
        for op in ops {
            match *op {
                Op::Add => {
                    let worker = w(m.next_worker);
                    m.next_worker += 1;
                    m.live.push(worker);
                    m.offering.insert(worker);
                    h.add(worker, &mut out);
                }
                Op::Readd(i) => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let worker = m.live[i % m.live.len()];
                    m.offering.insert(worker);
                    h.add(worker, &mut out);
                }
                Op::Retire(i) => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let worker = m.live[i % m.live.len()];
                    m.offering.remove(&worker);
                    h.retire(worker, &mut out);
                }
                Op::Remove(i) => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let worker = m.live.remove(i % m.live.len());
                    m.offering.remove(&worker);
                    for j in m.in_flight_of(worker) {
                        m.requeue(j);
                    }
                    h.remove(worker, m.now, &mut out);
                }
                Op::Distribute => {
                    let c = m.conns.len() as u64;
                    let id = h.distribute(c, m.now, &mut out);
                    assert_eq!(id.server(), S);
                    assert!(m.by_id.insert(id, m.conns.len()).is_none(), "id reused");
                    m.conns.push(MConn {
                        id,
                        st: St::Queued,
                        attempts: 0,
                        refused_by: Vec::new(),
                        deadline: m.now + m.cfg.pending_timeout,
                    });
                }
                Op::Accept(i, j) => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let worker = m.live[i % m.live.len()];
                    let mine = m.in_flight_of(worker);
                    if mine.is_empty() {
                        continue;
                    }
                    let k = mine[j % mine.len()];
                    let c = h.accepted(worker, m.conns[k].id, &mut out).unwrap();
                    assert_eq!(c, k as u64);
                    assert!(m.returned.insert(c), "conn {c} returned twice");
                    m.conns[k].st = St::Accepted;
                }
                Op::Refuse(i, j, r) => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let worker = m.live[i % m.live.len()];
                    let mine = m.in_flight_of(worker);
                    if mine.is_empty() {
                        continue;
                    }
                    let k = mine[j % mine.len()];
                    let reason = REASONS[r];
                    if reason.is_permanent() {
                        m.offering.remove(&worker);
                    }
                    if !m.conns[k].refused_by.contains(&worker) {
                        m.conns[k].refused_by.push(worker);
                    }
                    m.requeue(k);
                    h.refused(worker, m.conns[k].id, reason, m.now, &mut out)
                        .unwrap();
                }
                Op::Bogus(i, j, accept) => {
                    let worker = if m.live.is_empty() {
                        w(u32::MAX)
                    } else {
                        m.live[i % m.live.len()]
                    };
                    let (conn, expected) = if m.conns.is_empty() {
                        let id = ConnId::new(S, 1 << 30);
                        (id, HandleError::UnknownConn(id))
                    } else {
                        let mc = &m.conns[j % m.conns.len()];
                        match mc.st {
                            St::InFlight(x) if x == worker => continue,
                            St::Queued | St::InFlight(_) => (
                                mc.id,
                                HandleError::NotInFlightTo {
                                    conn: mc.id,
                                    worker,
                                },
                            ),
                            St::Accepted | St::Closed(_) => {
                                (mc.id, HandleError::UnknownConn(mc.id))
                            }
                        }
                    };
                    let before = snapshot(&h);
                    let got = if accept {
                        h.accepted(worker, conn, &mut out).map(|_| ())
                    } else {
                        h.refused(worker, conn, RefuseReason::Draining, m.now, &mut out)
                    };
                    assert_eq!(got, Err(expected));
                    assert!(out.is_empty());
                    assert_eq!(snapshot(&h), before);
                }
                Op::Advance(ms) => {
                    m.now += Duration::from_millis(ms);
                    h.expire(m.now, &mut out);
                }
                Op::CloseAll => {
                    h.close_all(&mut out);
                }
            }
            m.apply(std::mem::take(&mut out));
            if let Op::Advance(_) = op {
                assert!(
                    !m.conns
                        .iter()
                        .any(|c| c.st == St::Queued && c.deadline <= m.now),
                    "a due conn survived expire"
                );
            }
            if let Op::CloseAll = op {
                assert!(
                    m.conns
                        .iter()
                        .all(|c| matches!(c.st, St::Accepted | St::Closed(_)))
                );
            }
            m.check(&h);
        }
    }

    proptest! {
        #[test]
        fn model(
            window in 1usize..4,
            max_pending in 1usize..10,
            max_attempts in 1u32..5,
            timeout_ms in 1u64..100,
            ops in prop::collection::vec(op(), 0..200),
        ) {
            run_model(cfg(window, max_pending, max_attempts, timeout_ms), &ops);
        }

        #[test]
        fn instant_acceptors_stay_within_the_window(
            n in 1u32..=6,
            window in 1usize..6,
            k in 0u64..300,
        ) {
            let t = Instant::now();
            let workers: Vec<u32> = (1..=n).collect();
            let mut h = handle(cfg(window, 1024, 8, 1000), &workers);
            let mut counts: HashMap<WorkerId, usize> = HashMap::new();
            let mut out = Vec::new();
            let mut answers = Vec::new();
            for c in 0..k {
                h.distribute(c, t, &mut out);
                while let Some(action) = out.pop() {
                    match action {
                        Action::Handoff { worker, conn } => answers.push((worker, conn)),
                        Action::Close { .. } => prop_assert!(false, "nothing should close"),
                    }
                    while let Some((worker, conn)) = answers.pop() {
                        prop_assert_eq!(h.accepted(worker, conn, &mut out), Ok(h_conn_value(conn)));
                        *counts.entry(worker).or_default() += 1;
                    }
                }
            }
            prop_assert_eq!(counts.values().sum::<usize>() as u64, k);
            let max = workers.iter().map(|&x| counts.get(&w(x)).copied().unwrap_or(0)).max().unwrap_or(0);
            let min = workers.iter().map(|&x| counts.get(&w(x)).copied().unwrap_or(0)).min().unwrap_or(0);
            prop_assert!(max - min <= window, "counts {:?} window {}", counts, window);
        }
    }

    /// Conn `c` gets counter `c` when ids are never skipped, so its id maps back to it.
    fn h_conn_value(conn: ConnId) -> u64 {
        conn.0 & ((1 << ConnId::COUNTER_BITS) - 1)
    }
}

//! Worker supervision as a pure state machine: which slot gets a worker when, restarts and
//! their backoff, errored slots, the rolling reload, scaling and shutdown.
//!
//! Like the [`crate::RoundRobinHandle`], [`Supervision`] does no I/O and never reads the clock
//! or a random source: the event loop passes `now` into every call, the jitter generator is
//! seeded at construction, and each call appends [`Action`]s for the event loop to carry out
//! (spawn a worker, send `Disconnect`, SIGKILL, report an event). The event loop reports back
//! what happened to the processes: a spawn that succeeded ([`Supervision::spawned`]) or failed
//! ([`Supervision::spawn_failed`]), a worker that listens, says it is leaving, lost its channel
//! or exited. Supervision allocates worker ids itself, so it knows a worker from the moment
//! it asks for it.
//!
//! # Theory of operation
//!
//! **Slots.** Each slot is in exactly one [`SlotState`]. A crash of the slot's worker (an exit
//! it was not told to make, or a spawn that failed) goes through the slot's [`SlotHistory`]:
//! restart after a backoff with jitter, or after repeated crashes right after start, errored.
//! A spawn that fails for want of fds, processes or memory is retried every
//! [`SPAWN_RETRY`] without counting as a crash, up to [`MAX_SHORTAGE_RETRIES`] in a row. A
//! worker that exits after a disconnect leaves its slot vacant (Node's rule: a disconnected
//! worker is not replaced). A removed slot (scaled down) is never served again; an errored one
//! only after a reload.
//!
//! **Workers.** Every worker supervision asked for is tracked until its exit is reported: its
//! slot, when it started, whether it is ready or leaving, and the instant at which it is
//! SIGKILLed if it has not exited by then (a disconnect that takes too long, a worker that
//! said `STOPPING=1`, or one that can no longer be told to stop). A worker is ready when it
//! listens or sends `READY=1` to the notify socket. With a ready delay (opt-in, for programs
//! that do not speak the channel), a worker that has not said `Online` is also ready once the
//! delay has passed since it started. A worker that says `Online` speaks the channel: the
//! delay is not for it, and if the delay had already made it ready (a slow start), it is
//! starting again until it listens; what its early readiness set off (a reload moving on)
//! cannot be undone, which is why the delay is opt-in. With a watchdog period, a ready
//! worker that never said `Online` and does not send `WATCHDOG=1` within a period (from
//! becoming ready, then from its last ping) is killed as hung, and its exit is a crash like
//! any other. Workers that speak the channel are not watched: they have no reason to ping.
//!
//! **Reload.** One slot at a time: spawn the new worker beside the slot's current one, wait
//! until it is ready, make it the slot's worker, then disconnect the old one. The reload is
//! done once every slot has been replaced and every old worker (one running when the reload
//! started, or one a replacement took the slot from) has exited. Until then the
//! new worker is not the slot's worker, so its crash restarts nothing: the reload fails and
//! the old one keeps serving. A reload also gives errored slots a fresh start with a clean
//! crash count (that is how a fixed program gets deployed); those start the new program
//! already, so the rolling part skips them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use cluster_core::WorkerId;

use crate::supervisor::{Jitter, RestartDecision, RestartPolicy, SlotHistory};

/// How soon a spawn that failed for want of fds, processes or memory is tried again.
pub(crate) const SPAWN_RETRY: Duration = Duration::from_secs(1);
/// Spawn retries for want of resources before the failure counts as a crash after all.
pub(crate) const MAX_SHORTAGE_RETRIES: u32 = 60;

/// The timeouts supervision enforces.
#[derive(Clone, Debug)]
pub(crate) struct SupervisionConfig {
    pub(crate) restart: RestartPolicy,
    /// How long a reload's new worker may take to become ready.
    pub(crate) ready_timeout: Duration,
    /// How long a disconnected worker may take to exit before it is SIGKILLed.
    pub(crate) shutdown_timeout: Duration,
    /// A worker that neither speaks the channel (it said `Online`) nor sends `READY=1` counts
    /// as ready this long after it started; `None`: only listening or `READY=1` make it ready.
    pub(crate) ready_delay: Option<Duration>,
    /// A worker that does not speak the channel must send `WATCHDOG=1` at least this often,
    /// once ready, or it is killed as hung.
    pub(crate) watchdog: Option<Duration>,
}

/// Where a slot stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// A worker was asked for; its spawn has not been reported yet.
    Spawning {
        worker: WorkerId,
        /// Spawns in a row before this one that failed for want of resources.
        shortage_retries: u32,
    },
    /// The worker serving the slot (or starting to).
    Running(WorkerId),
    /// A replacement is due at `at`.
    RestartAt { at: Instant, shortage_retries: u32 },
    /// No worker and none coming: its worker exited after a disconnect, or a shutdown
    /// cancelled its restart. A reload fills it.
    Vacant,
    /// Crashed too often right after start; restarted only by a reload.
    Errored,
    /// Scaled down: never served again.
    Removed,
}

impl SlotState {
    /// The worker the slot counts as its own, spawned or about to be.
    pub(crate) fn worker(self) -> Option<WorkerId> {
        match self {
            SlotState::Spawning { worker, .. } | SlotState::Running(worker) => Some(worker),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Slot {
    state: SlotState,
    history: SlotHistory,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: SlotState::Vacant,
            history: SlotHistory::default(),
        }
    }
}

/// A worker's place in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Spawned, not listening yet.
    Starting,
    /// Listening (or holding `LISTEN_FDS` from its first instruction).
    Ready,
    /// Told to disconnect, or said it would: its exit is not a crash.
    Leaving,
}

#[derive(Clone, Debug)]
struct Worker {
    slot: usize,
    started: Instant,
    phase: Phase,
    /// SIGKILL at this instant.
    kill_at: Option<Instant>,
    /// Ready at this instant unless it turns out to speak the channel (`--ready-delay`).
    ready_at: Option<Instant>,
    /// Ready because the ready delay passed, not because it said so.
    ready_by_delay: bool,
    /// It said `Online`: it speaks the channel, so neither the ready delay nor the watchdog
    /// applies to it.
    speaks_channel: bool,
    /// Told to disconnect (it was sent `Disconnect`, and the stop signal if it needs one).
    disconnected: bool,
    /// Hung unless it pings the watchdog before this instant.
    watchdog_at: Option<Instant>,
}

/// The slot a reload is replacing right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Replacement {
    pub(crate) slot: usize,
    /// The worker that takes the slot once it is ready.
    pub(crate) new: WorkerId,
    /// The worker it replaces, disconnected once the new one is ready (none for a slot that
    /// had no worker).
    pub(crate) old: Option<WorkerId>,
    /// The reload fails if the new worker is not ready by then.
    pub(crate) ready_by: Instant,
}

#[derive(Clone, Debug)]
struct Reload {
    /// Slots still to replace, in order.
    queue: VecDeque<usize>,
    waiting: Option<Replacement>,
    /// Old workers not yet exited: those running when the reload started, and each worker a
    /// replacement took the slot from. The reload is done only once they are all gone, so
    /// that "reload done" means nothing old serves any more.
    old: BTreeSet<WorkerId>,
}

/// Why a reload stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReloadFailure {
    /// The new worker could not be spawned.
    SpawnFailed(WorkerId),
    /// The new worker exited before it was ready.
    ExitedBeforeReady(WorkerId),
    /// The new worker was not ready by its deadline.
    ReadyTimeout(WorkerId),
}

/// What the event loop is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Spawn `worker` for `slot`, then report [`Supervision::spawned`] or
    /// [`Supervision::spawn_failed`].
    Spawn { slot: usize, worker: WorkerId },
    /// Send the worker `Disconnect` and offer it nothing more.
    Disconnect(WorkerId),
    /// SIGKILL the worker.
    Kill(WorkerId),
    /// No worker will serve `slot` again (removed or errored): close the sockets kept for it.
    ReleaseSlotSockets(usize),
    /// Report that `slot` gets a new worker after `after`.
    Restarting { slot: usize, after: Duration },
    /// Report that `slot` errored after `crashes` crashes in a row.
    SlotErrored { slot: usize, crashes: u32 },
    /// Report that `slot` errored because its worker could not listen: no restart can help.
    SlotCannotListen { slot: usize },
    /// Report that the reload replaced every slot.
    ReloadDone,
    /// Report that the reload stopped.
    ReloadFailed(ReloadFailure),
    /// The worker sent no `WATCHDOG=1` in time: kill it as hung (its exit is a crash).
    WatchdogExpired(WorkerId),
}

/// The supervision state machine; see the module documentation.
#[derive(Debug)]
pub(crate) struct Supervision {
    cfg: SupervisionConfig,
    slots: Vec<Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    reload: Option<Reload>,
    shutting_down: bool,
    jitter: Jitter,
    next_worker: u32,
}

impl Supervision {
    /// `slots` slots, all vacant until [`Supervision::start`]; `seed` drives the jitter.
    pub(crate) fn new(cfg: SupervisionConfig, slots: usize, seed: u64) -> Supervision {
        Supervision {
            cfg,
            slots: (0..slots).map(|_| Slot::new()).collect(),
            workers: BTreeMap::new(),
            reload: None,
            shutting_down: false,
            jitter: Jitter::new(seed),
            next_worker: 1,
        }
    }

    /// Spawns a worker into every vacant slot.
    pub(crate) fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].state == SlotState::Vacant {
                self.spawn_into(slot, 0, now, out);
            }
        }
    }

    // ------------------------------------------------------------ queries

    #[cfg(test)]
    pub(crate) fn slot_state(&self, slot: usize) -> Option<SlotState> {
        self.slots.get(slot).map(|s| s.state)
    }

    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Slots not removed.
    pub(crate) fn live_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state != SlotState::Removed)
            .count()
    }

    /// True when there are slots and every one not removed is errored.
    pub(crate) fn all_slots_errored(&self) -> bool {
        let mut live = self
            .slots
            .iter()
            .filter(|s| s.state != SlotState::Removed)
            .peekable();
        live.peek().is_some() && live.all(|s| s.state == SlotState::Errored)
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// A worker that leaves now may still be replaced (its servers are worth keeping).
    pub(crate) fn replacement_possible(&self) -> bool {
        !self.shutting_down && !self.all_slots_errored()
    }

    #[cfg(test)]
    pub(crate) fn phase(&self, worker: WorkerId) -> Option<Phase> {
        self.workers.get(&worker).map(|w| w.phase)
    }

    /// Workers spawned and not yet reported exited.
    #[cfg(test)]
    pub(crate) fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers.keys().copied()
    }

    /// Some worker may still be starting: spawned (or about to be) and not ready, or ready
    /// only by the ready delay (it may yet turn out to speak the channel and listen).
    pub(crate) fn any_worker_starting(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.phase == Phase::Starting || (w.phase == Phase::Ready && w.ready_by_delay))
    }

    pub(crate) fn replacement(&self) -> Option<Replacement> {
        self.reload.as_ref().and_then(|r| r.waiting)
    }

    /// A [`Supervision::reload`] now would start one: none runs and the master is not
    /// shutting down.
    pub(crate) fn reload_would_start(&self) -> bool {
        self.reload.is_none() && !self.shutting_down
    }

    pub(crate) fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// Ready workers serving a slot (a reload's new worker counts once it has the slot).
    pub(crate) fn ready_workers(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Running(w) => self.workers.get(&w),
                _ => None,
            })
            .filter(|w| w.phase == Phase::Ready)
            .count()
    }

    /// Every slot that is to be served has a ready worker, and there is one at least: what a
    /// service manager calls started.
    pub(crate) fn all_ready(&self) -> bool {
        let mut served = self
            .slots
            .iter()
            .filter(|s| !matches!(s.state, SlotState::Removed | SlotState::Errored))
            .peekable();
        served.peek().is_some()
            && served.all(|s| match s.state {
                SlotState::Running(w) => self
                    .workers
                    .get(&w)
                    .is_some_and(|w| w.phase == Phase::Ready),
                _ => false,
            })
    }

    /// The earliest restart, SIGKILL or reload deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| match s.state {
            SlotState::RestartAt { at, .. } => Some(at),
            _ => None,
        });
        let kills = self.workers.values().filter_map(|w| w.kill_at);
        let ready = self.replacement().map(|r| r.ready_by);
        let delays = self.workers.values().filter_map(|w| w.ready_at);
        let watchdogs = self.workers.values().filter_map(|w| w.watchdog_at);
        restarts
            .chain(kills)
            .chain(ready)
            .chain(delays)
            .chain(watchdogs)
            .min()
    }

    // ------------------------------------------------------------ reports from the event loop

    /// The worker's process runs; `ready` when it holds its listening sockets already.
    pub(crate) fn spawned(
        &mut self,
        worker: WorkerId,
        ready: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if let Some(s) = self.slots.get_mut(w.slot)
            && s.state.worker() == Some(worker)
        {
            s.state = SlotState::Running(worker);
        }
        if ready {
            self.listening(worker, now, out);
            return;
        }
        match self.cfg.ready_delay {
            Some(delay) if delay.is_zero() => self.ready_by_delay(worker, now, out),
            Some(delay) => {
                if let Some(w) = self.workers.get_mut(&worker)
                    && w.phase == Phase::Starting
                    && !w.speaks_channel
                {
                    w.ready_at = Some(now + delay);
                }
            }
            None => {}
        }
    }

    /// The worker said `Online`: it speaks the channel and will say when it listens, so the
    /// ready delay is not for it (nor the watchdog). If the delay made it ready before it
    /// spoke (a slow start), it is starting again until it listens.
    pub(crate) fn online(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.speaks_channel = true;
            w.ready_at = None;
            w.watchdog_at = None;
            if w.phase == Phase::Ready && w.ready_by_delay {
                w.phase = Phase::Starting;
                w.ready_by_delay = false;
            }
        }
    }

    /// The worker sent `WATCHDOG=1`. Pings before it is ready change nothing: its watchdog
    /// starts when it becomes ready.
    pub(crate) fn watchdog_ping(&mut self, worker: WorkerId, now: Instant) {
        if let (Some(w), Some(period)) = (self.workers.get_mut(&worker), self.cfg.watchdog)
            && w.watchdog_at.is_some()
        {
            w.watchdog_at = Some(now + period);
        }
    }

    /// The worker could not be spawned; `shortage` when for want of fds, processes or memory.
    pub(crate) fn spawn_failed(
        &mut self,
        worker: WorkerId,
        shortage: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.forget(worker, ReloadFailure::SpawnFailed, now, out) else {
            return;
        };
        let Some(s) = self.slots.get_mut(w.slot) else {
            return;
        };
        let SlotState::Spawning {
            worker: spawning,
            shortage_retries,
        } = s.state
        else {
            return;
        };
        if spawning != worker {
            return;
        }
        s.state = SlotState::Vacant;
        // A reload is already bringing up this slot's replacement (it was asked for in the
        // same pass, before this spawn was reported): a restart would put two workers there.
        if self.replacement().is_some_and(|r| r.slot == w.slot) {
            return;
        }
        let Some(s) = self.slots.get_mut(w.slot) else {
            return;
        };
        if shortage && shortage_retries < MAX_SHORTAGE_RETRIES && !self.shutting_down {
            // Out of fds, processes or memory: not the program's fault, and it usually passes
            // (queued connections expire, workers finish). Counting it as a crash would error
            // the slot within seconds, and with every slot errored stop the master. A shortage
            // that lasts (a limit set too low) ends up counted after all.
            s.state = SlotState::RestartAt {
                at: now + SPAWN_RETRY,
                shortage_retries: shortage_retries + 1,
            };
            out.push(Action::Restarting {
                slot: w.slot,
                after: SPAWN_RETRY,
            });
        } else {
            // A program that cannot start is a crash at uptime zero: back off, then give up.
            self.crash(w.slot, Duration::ZERO, now, out);
        }
    }

    /// The worker listens (takes connections), or sent `READY=1`.
    ///
    /// Returns whether this made the worker ready (it was starting, or ready only by the
    /// delay): a repeated `READY=1` changes nothing and is worth no event.
    pub(crate) fn listening(
        &mut self,
        worker: WorkerId,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let changed = self.become_ready(worker, false, now);
        self.advance_reload(now, out);
        changed
    }

    fn ready_by_delay(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action>) {
        if self.workers.get(&worker).is_some_and(|w| !w.speaks_channel) {
            self.become_ready(worker, true, now);
            self.advance_reload(now, out);
        }
    }

    fn become_ready(&mut self, worker: WorkerId, by_delay: bool, now: Instant) -> bool {
        let Some(w) = self.workers.get_mut(&worker) else {
            return false;
        };
        w.ready_at = None;
        match w.phase {
            Phase::Starting => {
                w.phase = Phase::Ready;
                w.ready_by_delay = by_delay;
                // As systemd does, the watchdog runs once start-up is complete: how long a
                // start may take is the ready timeout's business. A worker that speaks the
                // channel has no reason to ping it.
                if !w.speaks_channel {
                    w.watchdog_at = self.cfg.watchdog.map(|period| now + period);
                }
                true
            }
            Phase::Ready if w.ready_by_delay && !by_delay => {
                w.ready_by_delay = false;
                true
            }
            _ => false,
        }
    }

    /// The worker said it is leaving (it disconnected on its own): its exit is no crash.
    pub(crate) fn leaving(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.phase = Phase::Leaving;
            w.ready_at = None;
            w.watchdog_at = None;
        }
    }

    /// The worker said `STOPPING=1`: it is leaving, its exit is no crash, and it gets the
    /// shutdown timeout to exit before it is SIGKILLed, as a disconnected worker does (one
    /// that said so and kept running would otherwise never be stopped).
    pub(crate) fn stopping(&mut self, worker: WorkerId, now: Instant) {
        self.leaving(worker);
        if let Some(w) = self.workers.get_mut(&worker) {
            w.kill_at.get_or_insert(now + self.cfg.shutdown_timeout);
        }
    }

    /// The worker's channel is gone, so it can no longer be told to stop: it gets a SIGKILL
    /// deadline unless it has one.
    pub(crate) fn channel_closed(&mut self, worker: WorkerId, now: Instant) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.kill_at.get_or_insert(now + self.cfg.shutdown_timeout);
        }
    }

    /// The worker's process ended; `after_disconnect` when it had said it would.
    pub(crate) fn exited(
        &mut self,
        worker: WorkerId,
        after_disconnect: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.on_exit(worker, after_disconnect, false, now, out);
    }

    /// The worker's process ended, unplanned, after the master could not bind what it asked
    /// for (the address is in use or not available, or binding it is not permitted). If it
    /// never got to listen, its slot errors at once: a restart would meet the same error, so
    /// the master does not restart it in a loop. A reload (once the address is free) revives
    /// the slot.
    pub(crate) fn exited_unable_to_listen(
        &mut self,
        worker: WorkerId,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.on_exit(worker, false, true, now, out);
    }

    fn on_exit(
        &mut self,
        worker: WorkerId,
        after_disconnect: bool,
        unable_to_listen: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.forget(worker, ReloadFailure::ExitedBeforeReady, now, out) else {
            return;
        };
        let Some(s) = self.slots.get_mut(w.slot) else {
            return;
        };
        if s.state.worker() != Some(worker) {
            return;
        }
        s.state = SlotState::Vacant;
        if after_disconnect || w.phase == Phase::Leaving || self.shutting_down {
            return;
        }
        // A reload is already bringing up this slot's replacement: restarting too would put
        // two workers in one slot.
        if self.replacement().is_some_and(|r| r.slot == w.slot) {
            return;
        }
        if unable_to_listen && w.phase == Phase::Starting {
            self.slots[w.slot].state = SlotState::Errored;
            out.push(Action::ReleaseSlotSockets(w.slot));
            out.push(Action::SlotCannotListen { slot: w.slot });
            return;
        }
        self.crash(w.slot, now.saturating_duration_since(w.started), now, out);
    }

    // ------------------------------------------------------------ commands

    /// Tells the worker to finish and exit, with a SIGKILL deadline.
    pub(crate) fn disconnect(&mut self, worker: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if w.disconnected || (w.phase == Phase::Leaving && w.kill_at.is_some() && w.speaks_channel)
        {
            return;
        }
        w.disconnected = true;
        w.phase = Phase::Leaving;
        w.ready_at = None;
        // A stopping worker is bounded by its kill deadline instead.
        w.watchdog_at = None;
        // One that said `STOPPING=1` keeps its deadline if that comes sooner.
        let deadline = now + self.cfg.shutdown_timeout;
        w.kill_at = Some(w.kill_at.map_or(deadline, |k| k.min(deadline)));
        out.push(Action::Disconnect(worker));
    }

    /// Adds a slot and spawns its worker.
    pub(crate) fn scale_up(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.shutting_down {
            return;
        }
        self.slots.push(Slot::new());
        self.spawn_into(self.slots.len() - 1, 0, now, out);
    }

    /// Removes the last live slot, unless it is the only one, and disconnects its worker.
    pub(crate) fn scale_down(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.live_slots() <= 1 {
            return;
        }
        let Some(slot) = self
            .slots
            .iter()
            .rposition(|s| s.state != SlotState::Removed)
        else {
            return;
        };
        let was = std::mem::replace(&mut self.slots[slot].state, SlotState::Removed);
        // Its worker keeps its own copy while it drains; when it exits, the socket is gone
        // before its Exit event.
        out.push(Action::ReleaseSlotSockets(slot));
        if let Some(worker) = was.worker() {
            self.disconnect(worker, now, out);
        }
    }

    /// Starts a rolling reload, unless one runs or the master is shutting down.
    pub(crate) fn reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.reload_would_start() {
            return;
        }
        let old = self.workers.keys().copied().collect();
        let mut queue = VecDeque::new();
        for slot in 0..self.slots.len() {
            match self.slots[slot].state {
                SlotState::Errored => {
                    self.slots[slot].history = SlotHistory::default();
                    self.spawn_into(slot, 0, now, out);
                }
                SlotState::Removed => {}
                _ => queue.push_back(slot),
            }
        }
        self.reload = Some(Reload {
            queue,
            waiting: None,
            old,
        });
        self.advance_reload(now, out);
    }

    /// Disconnects every worker; nothing is spawned any more.
    pub(crate) fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.stop_supervising();
        let workers: Vec<WorkerId> = self.workers.keys().copied().collect();
        for worker in workers {
            self.disconnect(worker, now, out);
        }
    }

    /// SIGKILLs every worker; nothing is spawned any more.
    pub(crate) fn force_shutdown(&mut self, out: &mut Vec<Action>) {
        self.stop_supervising();
        for (id, w) in &mut self.workers {
            w.phase = Phase::Leaving;
            w.kill_at = None;
            w.ready_at = None;
            w.watchdog_at = None;
            w.disconnected = true;
            out.push(Action::Kill(*id));
        }
    }

    fn stop_supervising(&mut self) {
        self.shutting_down = true;
        self.reload = None;
        for s in &mut self.slots {
            if matches!(s.state, SlotState::RestartAt { .. }) {
                s.state = SlotState::Vacant;
            }
        }
    }

    /// Fires what is due at `now`: restarts, SIGKILLs, the reload's ready deadline.
    pub(crate) fn on_timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        for slot in 0..self.slots.len() {
            if let SlotState::RestartAt {
                at,
                shortage_retries,
            } = self.slots[slot].state
                && at <= now
            {
                self.slots[slot].state = SlotState::Vacant;
                self.spawn_into(slot, shortage_retries, now, out);
            }
        }
        let mut delayed = Vec::new();
        for (id, w) in &mut self.workers {
            if w.kill_at.is_some_and(|t| t <= now) {
                w.kill_at = None;
                out.push(Action::Kill(*id));
            }
            if w.watchdog_at.is_some_and(|t| t <= now) {
                w.watchdog_at = None;
                out.push(Action::WatchdogExpired(*id));
            }
            if w.ready_at.is_some_and(|t| t <= now) {
                w.ready_at = None;
                delayed.push(*id);
            }
        }
        for id in delayed {
            self.ready_by_delay(id, now, out);
        }
        if let Some(r) = self.replacement()
            && r.ready_by <= now
        {
            self.fail_reload(ReloadFailure::ReadyTimeout(r.new), now, out);
        }
    }

    // ------------------------------------------------------------ internals

    /// Stops tracking a worker whose process is gone or never ran; a reload waiting for it
    /// fails.
    fn forget(
        &mut self,
        worker: WorkerId,
        failure: fn(WorkerId) -> ReloadFailure,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<Worker> {
        let w = self.workers.remove(&worker)?;
        if self.replacement().is_some_and(|r| r.new == worker) {
            self.fail_reload(failure(worker), now, out);
        }
        if let Some(r) = &mut self.reload
            && r.old.remove(&worker)
        {
            self.advance_reload(now, out);
        }
        Some(w)
    }

    fn new_worker(&mut self, slot: usize, now: Instant, out: &mut Vec<Action>) -> WorkerId {
        let worker = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            worker,
            Worker {
                slot,
                started: now,
                phase: Phase::Starting,
                kill_at: None,
                ready_at: None,
                ready_by_delay: false,
                speaks_channel: false,
                disconnected: false,
                watchdog_at: None,
            },
        );
        out.push(Action::Spawn { slot, worker });
        worker
    }

    fn spawn_into(
        &mut self,
        slot: usize,
        shortage_retries: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.shutting_down {
            return;
        }
        let worker = self.new_worker(slot, now, out);
        if let Some(s) = self.slots.get_mut(slot) {
            s.state = SlotState::Spawning {
                worker,
                shortage_retries,
            };
        }
    }

    /// The slot lost its worker unplanned (or could not get one).
    fn crash(&mut self, slot: usize, uptime: Duration, now: Instant, out: &mut Vec<Action>) {
        if self.shutting_down {
            return;
        }
        let unit = self.jitter.next_unit();
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.state == SlotState::Removed {
            return;
        }
        match s.history.on_crash(&self.cfg.restart, uptime, now, unit) {
            RestartDecision::RestartAt(at) => {
                s.state = SlotState::RestartAt {
                    at,
                    shortage_retries: 0,
                };
                out.push(Action::Restarting {
                    slot,
                    after: at.saturating_duration_since(now),
                });
            }
            RestartDecision::Errored { crashes } => {
                s.state = SlotState::Errored;
                out.push(Action::ReleaseSlotSockets(slot));
                out.push(Action::SlotErrored { slot, crashes });
            }
        }
    }

    fn advance_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(r) = &mut self.reload else { return };
            if let Some(waiting) = r.waiting {
                let ready = self
                    .workers
                    .get(&waiting.new)
                    .is_some_and(|w| w.phase == Phase::Ready);
                if !ready {
                    return;
                }
                r.waiting = None;
                if self.slots[waiting.slot].state == SlotState::Removed {
                    // Scaled down while its replacement started: nobody wants either, nor the
                    // reuse-port socket the replacement may have had bound for the slot.
                    self.disconnect(waiting.new, now, out);
                    out.push(Action::ReleaseSlotSockets(waiting.slot));
                } else {
                    self.slots[waiting.slot].state = SlotState::Running(waiting.new);
                }
                if let Some(old) = waiting.old
                    && self.workers.contains_key(&old)
                {
                    self.disconnect(old, now, out);
                    if let Some(r) = &mut self.reload {
                        r.old.insert(old);
                    }
                }
                continue;
            }
            let Some(slot) = r.queue.pop_front() else {
                if r.old.is_empty() {
                    self.reload = None;
                    out.push(Action::ReloadDone);
                }
                return;
            };
            let state = self.slots[slot].state;
            // Errored since the reload started: it ran the old program, and only the next
            // reload revives it.
            if matches!(state, SlotState::Removed | SlotState::Errored) {
                continue;
            }
            // The new worker takes the slot: a restart still pending for it (crash backoff, a
            // spawn retry) would put a second worker there. Until the old one is replaced the
            // new worker is not the slot's, so its crash restarts nothing.
            if state.worker().is_none() {
                self.slots[slot].state = SlotState::Vacant;
            }
            let new = self.new_worker(slot, now, out);
            if let Some(r) = &mut self.reload {
                r.waiting = Some(Replacement {
                    slot,
                    new,
                    old: state.worker(),
                    ready_by: now + self.cfg.ready_timeout,
                });
            }
            // Its readiness is reported by `spawned` or `listening`.
            return;
        }
    }

    fn fail_reload(&mut self, reason: ReloadFailure, now: Instant, out: &mut Vec<Action>) {
        let Some(r) = self.reload.take() else {
            return;
        };
        if let Some(waiting) = r.waiting {
            let new_alive = self.workers.contains_key(&waiting.new);
            let state = self.slots[waiting.slot].state;
            if state.worker().is_some() || state == SlotState::Removed {
                // The old worker still serves this slot (or nobody wants it): the half-started
                // new one goes.
                self.disconnect(waiting.new, now, out);
            } else if new_alive {
                // The old worker crashed meanwhile: the new one is all this slot has.
                self.slots[waiting.slot].state = SlotState::Running(waiting.new);
            } else {
                // Both are gone: the slot restarts as after any crash.
                self.crash(waiting.slot, Duration::ZERO, now, out);
            }
        }
        out.push(Action::ReloadFailed(reason));
    }
}

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const READY_TIMEOUT: Duration = Duration::from_secs(5);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

fn config() -> SupervisionConfig {
    SupervisionConfig {
        restart: RestartPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            min_uptime: Duration::from_secs(1),
            max_fast_crashes: 3,
            jitter: 0.0,
        },
        ready_timeout: READY_TIMEOUT,
        shutdown_timeout: SHUTDOWN_TIMEOUT,
        // Longer than any test's clock runs, unless a test sets its own.
        ready_delay: Some(Duration::from_secs(3600)),
        watchdog: None,
    }
}

const READY_DELAY: Duration = Duration::from_secs(1);
const WATCHDOG: Duration = Duration::from_secs(2);

/// A config with a ready delay and a watchdog.
fn systemd_config() -> SupervisionConfig {
    SupervisionConfig {
        ready_delay: Some(READY_DELAY),
        watchdog: Some(WATCHDOG),
        ..config()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Supervision plus a clock, with every spawn succeeding unless a test says otherwise.
struct Rig {
    sup: Supervision,
    now: Instant,
    out: Vec<Action>,
}

impl Rig {
    fn new(slots: usize) -> Rig {
        Rig::with(config(), slots)
    }

    fn with(cfg: SupervisionConfig, slots: usize) -> Rig {
        let mut rig = Rig {
            sup: Supervision::new(cfg, slots, 7),
            now: Instant::now(),
            out: Vec::new(),
        };
        rig.sup.start(rig.now, &mut rig.out);
        rig.settle();
        rig
    }

    /// Reports every requested spawn as successful (not ready yet) and returns the actions.
    fn settle(&mut self) -> Vec<Action> {
        self.settle_spawns(false)
    }

    /// Reports every requested spawn as successful, `ready` or not, and returns the actions.
    fn settle_spawns(&mut self, ready: bool) -> Vec<Action> {
        let mut seen = Vec::new();
        while !self.out.is_empty() {
            for a in std::mem::take(&mut self.out) {
                if let Action::Spawn { worker, .. } = a {
                    self.sup.spawned(worker, ready, self.now, &mut self.out);
                }
                seen.push(a);
            }
        }
        seen
    }

    fn act<R>(
        &mut self,
        f: impl FnOnce(&mut Supervision, Instant, &mut Vec<Action>) -> R,
    ) -> Vec<Action> {
        f(&mut self.sup, self.now, &mut self.out);
        self.settle()
    }

    fn advance(&mut self, by: Duration) -> Vec<Action> {
        self.now += by;
        self.act(|s, now, out| s.on_timers(now, out))
    }

    fn worker(&self, slot: usize) -> WorkerId {
        match self.sup.slot_state(slot) {
            Some(SlotState::Running(w)) => w,
            other => panic!("slot {slot} is {other:?}"),
        }
    }

    fn crash(&mut self, w: WorkerId) -> Vec<Action> {
        self.act(|s, now, out| s.exited(w, false, now, out))
    }
}

#[test]
fn start_spawns_every_slot() {
    let rig = Rig::new(3);
    for slot in 0..3 {
        assert_eq!(rig.worker(slot), WorkerId(slot as u32 + 1));
    }
}

#[test]
fn a_crash_restarts_with_backoff_and_repeated_fast_crashes_error_the_slot() {
    let mut rig = Rig::new(1);
    let w = rig.worker(0);
    assert_eq!(
        rig.crash(w),
        [Action::Restarting {
            slot: 0,
            after: ms(100)
        }]
    );
    assert!(rig.advance(ms(99)).is_empty());
    assert!(matches!(
        rig.advance(ms(1))[..],
        [Action::Spawn { slot: 0, .. }]
    ));
    let w = rig.worker(0);
    assert_eq!(
        rig.crash(w),
        [Action::Restarting {
            slot: 0,
            after: ms(200)
        }]
    );
    rig.advance(ms(200));
    let w = rig.worker(0);
    assert_eq!(
        rig.crash(w),
        [
            Action::ReleaseSlotSockets(0),
            Action::SlotErrored {
                slot: 0,
                crashes: 3
            }
        ]
    );
    assert!(rig.sup.all_slots_errored());
    assert!(rig.advance(Duration::from_secs(60)).is_empty());
}

#[test]
fn a_worker_that_could_not_listen_errors_its_slot_at_once_but_a_listening_one_restarts() {
    let mut rig = Rig::new(2);
    let w0 = rig.worker(0);
    assert_eq!(
        rig.act(|s, now, out| s.exited_unable_to_listen(w0, now, out)),
        [
            Action::ReleaseSlotSockets(0),
            Action::SlotCannotListen { slot: 0 }
        ]
    );
    assert_eq!(rig.sup.slot_state(0), Some(SlotState::Errored));
    assert!(
        rig.advance(Duration::from_secs(60)).is_empty(),
        "no restart loop"
    );
    // Once it listened, a later failure is an ordinary crash.
    let w1 = rig.worker(1);
    rig.act(|s, now, out| s.listening(w1, now, out));
    assert!(matches!(
        rig.act(|s, now, out| s.exited_unable_to_listen(w1, now, out))[..],
        [Action::Restarting { slot: 1, .. }]
    ));
    // A reload revives the slot.
    assert!(matches!(
        rig.act(|s, now, out| s.reload(now, out))[..],
        [Action::Spawn { slot: 0, .. }, ..]
    ));
}

#[test]
fn an_exit_after_disconnect_leaves_the_slot_vacant() {
    let mut rig = Rig::new(2);
    let w = rig.worker(1);
    assert_eq!(
        rig.act(|s, now, out| s.disconnect(w, now, out)),
        [Action::Disconnect(w)]
    );
    assert!(
        rig.act(|s, now, out| s.exited(w, true, now, out))
            .is_empty()
    );
    assert_eq!(rig.sup.slot_state(1), Some(SlotState::Vacant));
    // A worker that said it was leaving is no crash either, whatever its exit looked like.
    let w = rig.worker(0);
    rig.sup.leaving(w);
    assert!(rig.crash(w).is_empty());
    assert!(!rig.sup.all_slots_errored());
}

#[test]
fn a_shortage_is_retried_without_counting_as_a_crash() {
    let mut rig = Rig::new(1);
    let w = rig.worker(0);
    rig.now += Duration::from_secs(10);
    rig.sup.exited(w, false, rig.now, &mut rig.out);
    rig.out.clear();
    for retry in 0..=MAX_SHORTAGE_RETRIES {
        rig.now = rig.sup.next_deadline().expect("a restart is due");
        rig.sup.on_timers(rig.now, &mut rig.out);
        let Some(Action::Spawn { worker, .. }) = rig.out.pop() else {
            panic!("no spawn on retry {retry}");
        };
        rig.sup.spawn_failed(worker, true, rig.now, &mut rig.out);
        let expected = if retry < MAX_SHORTAGE_RETRIES {
            SPAWN_RETRY
        } else {
            // Counted at last, as the second crash in a row.
            ms(200)
        };
        assert_eq!(
            rig.out.drain(..).collect::<Vec<_>>(),
            [Action::Restarting {
                slot: 0,
                after: expected
            }],
            "retry {retry}"
        );
    }
}

#[test]
fn a_reload_disconnects_each_old_worker_only_once_its_replacement_listens() {
    let mut rig = Rig::new(2);
    let (a, b) = (rig.worker(0), rig.worker(1));
    for w in [a, b] {
        rig.act(|s, now, out| s.listening(w, now, out));
    }
    let first = rig.act(|s, now, out| s.reload(now, out));
    let [
        Action::Spawn {
            slot: 0,
            worker: a2,
        },
    ] = first[..]
    else {
        panic!("{first:?}");
    };
    assert_eq!(rig.worker(0), a);
    let swapped = rig.act(|s, now, out| s.listening(a2, now, out));
    let [
        Action::Disconnect(old),
        Action::Spawn {
            slot: 1,
            worker: b2,
        },
    ] = swapped[..]
    else {
        panic!("{swapped:?}");
    };
    assert_eq!((old, rig.worker(0)), (a, a2));
    // The old worker's exit is planned: nothing restarts.
    assert!(
        rig.act(|s, now, out| s.exited(a, true, now, out))
            .is_empty()
    );
    let swapped = rig.act(|s, now, out| s.listening(b2, now, out));
    assert_eq!(swapped, [Action::Disconnect(b)]);
    assert_eq!(rig.worker(1), b2);
    // Done only once nothing old serves any more.
    let done = rig.act(|s, now, out| s.exited(b, true, now, out));
    assert_eq!(done, [Action::ReloadDone]);
}

#[test]
fn workers_that_hold_their_sockets_from_the_start_reload_at_once() {
    let mut rig = Rig::new(2);
    let old = [rig.worker(0), rig.worker(1)];
    rig.sup.reload(rig.now, &mut rig.out);
    let seen = rig.settle_spawns(true);
    assert_eq!(
        seen.iter()
            .filter(|a| matches!(a, Action::Disconnect(_)))
            .count(),
        2
    );
    assert!(!seen.contains(&Action::ReloadDone));
    assert!(
        rig.act(|s, now, out| s.exited(old[0], true, now, out))
            .is_empty()
    );
    assert_eq!(
        rig.act(|s, now, out| s.exited(old[1], true, now, out)),
        [Action::ReloadDone]
    );
}

#[test]
fn a_new_worker_that_dies_before_listening_stops_the_reload_and_the_old_one_stays() {
    let mut rig = Rig::new(1);
    let old = rig.worker(0);
    let spawned = rig.act(|s, now, out| s.reload(now, out));
    let [Action::Spawn { worker: new, .. }] = spawned[..] else {
        panic!("{spawned:?}");
    };
    assert_eq!(
        rig.crash(new),
        [Action::ReloadFailed(ReloadFailure::ExitedBeforeReady(new))]
    );
    assert_eq!(rig.worker(0), old);
    assert!(!rig.sup.reloading());
}

#[test]
fn a_new_worker_not_ready_in_time_is_disconnected() {
    let mut rig = Rig::new(1);
    let old = rig.worker(0);
    rig.act(|s, now, out| s.reload(now, out));
    let new = rig.sup.replacement().expect("waiting").new;
    assert!(rig.advance(READY_TIMEOUT - ms(1)).is_empty());
    assert_eq!(
        rig.advance(ms(1)),
        [
            Action::Disconnect(new),
            Action::ReloadFailed(ReloadFailure::ReadyTimeout(new))
        ]
    );
    assert_eq!(rig.worker(0), old);
    // Its SIGKILL deadline runs from the disconnect.
    assert_eq!(rig.advance(SHUTDOWN_TIMEOUT), [Action::Kill(new)]);
}

#[test]
fn an_old_worker_crashing_during_its_replacement_is_not_restarted() {
    let mut rig = Rig::new(1);
    let old = rig.worker(0);
    rig.act(|s, now, out| s.reload(now, out));
    let new = rig.sup.replacement().expect("waiting").new;
    assert!(rig.crash(old).is_empty());
    assert_eq!(
        rig.act(|s, now, out| s.listening(new, now, out)),
        [Action::ReloadDone]
    );
    assert_eq!(rig.worker(0), new);
}

#[test]
fn when_both_workers_of_a_replacement_die_the_slot_restarts() {
    let mut rig = Rig::new(1);
    let old = rig.worker(0);
    rig.act(|s, now, out| s.reload(now, out));
    let new = rig.sup.replacement().expect("waiting").new;
    rig.crash(old);
    assert_eq!(
        rig.crash(new),
        [
            Action::Restarting {
                slot: 0,
                after: ms(100)
            },
            Action::ReloadFailed(ReloadFailure::ExitedBeforeReady(new))
        ]
    );
}

#[test]
fn a_reload_revives_errored_slots_with_a_clean_count() {
    let mut rig = Rig::new(2);
    for _ in 0..3 {
        let w = rig.worker(1);
        rig.crash(w);
        rig.advance(Duration::from_secs(2));
    }
    assert_eq!(rig.sup.slot_state(1), Some(SlotState::Errored));
    let actions = rig.act(|s, now, out| s.reload(now, out));
    // The errored slot starts the new program at once; the rolling part begins with slot 0.
    assert!(matches!(
        actions[..],
        [Action::Spawn { slot: 1, .. }, Action::Spawn { slot: 0, .. }]
    ));
    let w = rig.worker(1);
    assert_eq!(
        rig.crash(w),
        [Action::Restarting {
            slot: 1,
            after: ms(100)
        }]
    );
}

#[test]
fn scaling_down_removes_the_last_slot_for_good_but_keeps_one() {
    let mut rig = Rig::new(2);
    let w = rig.worker(1);
    assert_eq!(
        rig.act(|s, now, out| s.scale_down(now, out)),
        [Action::ReleaseSlotSockets(1), Action::Disconnect(w)]
    );
    assert!(rig.crash(w).is_empty());
    assert!(rig.act(|s, now, out| s.scale_down(now, out)).is_empty());
    assert_eq!(rig.sup.live_slots(), 1);
    let added = rig.act(|s, now, out| s.scale_up(now, out));
    assert!(matches!(added[..], [Action::Spawn { slot: 2, .. }]));
    assert_eq!(rig.sup.slot_state(1), Some(SlotState::Removed));
}

#[test]
fn a_slot_removed_during_its_replacement_loses_both_workers() {
    let mut rig = Rig::new(2);
    rig.act(|s, now, out| s.scale_up(now, out));
    let old = rig.worker(2);
    let replaced = [rig.worker(0), rig.worker(1), old];
    rig.act(|s, now, out| s.reload(now, out));
    let a2 = rig.sup.replacement().expect("waiting").new;
    rig.act(|s, now, out| s.listening(a2, now, out));
    let b2 = rig.sup.replacement().expect("waiting on slot 1").new;
    rig.act(|s, now, out| s.listening(b2, now, out));
    let new = rig.sup.replacement().expect("waiting on slot 2").new;
    rig.act(|s, now, out| s.scale_down(now, out));
    assert_eq!(rig.sup.phase(old), Some(Phase::Leaving));
    assert_eq!(
        rig.act(|s, now, out| s.listening(new, now, out)),
        [Action::Disconnect(new), Action::ReleaseSlotSockets(2)]
    );
    for (i, w) in replaced.into_iter().enumerate() {
        let last = i == replaced.len() - 1;
        let done = rig.act(|s, now, out| s.exited(w, true, now, out));
        assert_eq!(done.contains(&Action::ReloadDone), last, "{done:?}");
    }
    assert_eq!(rig.sup.slot_state(2), Some(SlotState::Removed));
}

#[test]
fn shutdown_disconnects_everyone_and_spawns_nothing_after() {
    let mut rig = Rig::new(2);
    let w = rig.worker(0);
    rig.crash(w);
    let b = rig.worker(1);
    assert_eq!(
        rig.act(|s, now, out| s.shutdown(now, out)),
        [Action::Disconnect(b)]
    );
    assert!(rig.advance(Duration::from_secs(1)).is_empty());
    assert!(rig.act(|s, now, out| s.scale_up(now, out)).is_empty());
    assert!(rig.act(|s, now, out| s.reload(now, out)).is_empty());
    assert_eq!(rig.advance(SHUTDOWN_TIMEOUT), [Action::Kill(b)]);
    assert!(rig.crash(b).is_empty());
    assert_eq!(rig.sup.workers().count(), 0);
}

#[test]
fn a_worker_without_a_channel_gets_a_kill_deadline() {
    let mut rig = Rig::new(1);
    let w = rig.worker(0);
    rig.sup.channel_closed(w, rig.now);
    assert_eq!(rig.sup.next_deadline(), Some(rig.now + SHUTDOWN_TIMEOUT));
    assert_eq!(rig.advance(SHUTDOWN_TIMEOUT), [Action::Kill(w)]);
    // It was not told to leave: its exit is a crash.
    assert_eq!(rig.crash(w).len(), 1);
}

// ---------------------------------------------------------------- random sequences

#[derive(Clone, Copy, Debug)]
enum SpawnOutcome {
    Ok { ready: bool },
    Fails { shortage: bool },
}

#[test]
fn a_program_that_never_speaks_is_ready_after_the_delay_and_one_that_notifies_at_once() {
    let mut rig = Rig::with(systemd_config(), 2);
    let (a, b) = (rig.worker(0), rig.worker(1));
    rig.act(|s, now, out| s.listening(a, now, out));
    assert_eq!(rig.sup.phase(a), Some(Phase::Ready));
    assert_eq!(rig.sup.phase(b), Some(Phase::Starting));
    assert_eq!(rig.sup.next_deadline(), Some(rig.now + READY_DELAY));
    rig.advance(READY_DELAY);
    assert_eq!(rig.sup.phase(b), Some(Phase::Ready));
}

#[test]
fn a_worker_that_speaks_the_channel_waits_for_listening_not_the_delay() {
    let mut rig = Rig::with(systemd_config(), 1);
    let a = rig.worker(0);
    rig.sup.online(a);
    rig.advance(READY_DELAY * 3);
    assert_eq!(rig.sup.phase(a), Some(Phase::Starting));
}

#[test]
fn without_a_ready_delay_a_slow_worker_is_not_ready_until_it_listens() {
    let cfg = SupervisionConfig {
        ready_delay: None,
        ..config()
    };
    let mut rig = Rig::with(cfg, 1);
    let old = rig.worker(0);
    assert!(rig.act(|s, now, out| s.listening(old, now, out)).is_empty());
    rig.act(|s, now, out| s.reload(now, out));
    let new = rig.sup.replacement().expect("waiting").new;
    assert_eq!(rig.sup.next_deadline(), Some(rig.now + READY_TIMEOUT));
    // Nothing but its own listening lets the old worker go.
    assert!(rig.advance(READY_TIMEOUT - ms(1)).is_empty());
    assert_eq!(rig.sup.phase(new), Some(Phase::Starting));
    rig.sup.online(new);
    assert_eq!(
        rig.act(|s, now, out| s.listening(new, now, out)),
        [Action::Disconnect(old)]
    );
}

#[test]
fn a_worker_the_delay_made_ready_is_starting_again_once_it_says_online() {
    let mut rig = Rig::with(systemd_config(), 1);
    let a = rig.worker(0);
    rig.advance(READY_DELAY);
    assert_eq!(rig.sup.phase(a), Some(Phase::Ready));
    assert!(rig.sup.all_ready());
    rig.sup.online(a);
    assert_eq!(rig.sup.phase(a), Some(Phase::Starting));
    assert!(!rig.sup.all_ready());
    // Its listening is news; a second one is not.
    assert!(rig.sup.listening(a, rig.now, &mut rig.out));
    assert!(!rig.sup.listening(a, rig.now, &mut rig.out));
    assert_eq!(rig.sup.phase(a), Some(Phase::Ready));
    // It speaks the channel: no watchdog for it.
    assert!(rig.advance(WATCHDOG * 3).is_empty());
}

#[test]
fn a_worker_that_says_stopping_and_stays_is_killed_after_the_shutdown_timeout() {
    let mut rig = Rig::with(systemd_config(), 1);
    let a = rig.worker(0);
    rig.act(|s, now, out| s.listening(a, now, out));
    rig.sup.stopping(a, rig.now);
    assert!(rig.advance(SHUTDOWN_TIMEOUT - ms(1)).is_empty());
    assert_eq!(rig.advance(ms(1)), [Action::Kill(a)]);
    // A stop meanwhile still tells it (it never spoke the channel: the stop signal).
    let mut rig = Rig::with(systemd_config(), 1);
    let b = rig.worker(0);
    rig.sup.stopping(b, rig.now);
    assert_eq!(
        rig.act(|s, now, out| s.shutdown(now, out)),
        [Action::Disconnect(b)]
    );
}

#[test]
fn a_late_ready_holds_the_reload() {
    let cfg = SupervisionConfig {
        ready_delay: Some(Duration::from_secs(3600)),
        ..systemd_config()
    };
    let mut rig = Rig::with(cfg, 1);
    let old = rig.worker(0);
    rig.act(|s, now, out| s.listening(old, now, out));
    rig.act(|s, now, out| s.reload(now, out));
    let new = rig.sup.replacement().expect("waiting").new;
    for _ in 0..4 {
        rig.sup.watchdog_ping(new, rig.now);
        rig.sup.watchdog_ping(old, rig.now);
        assert!(rig.advance(ms(1000)).is_empty());
    }
    assert_eq!(
        rig.act(|s, now, out| s.listening(new, now, out)),
        [Action::Disconnect(old)]
    );
    assert_eq!(
        rig.act(|s, now, out| s.exited(old, true, now, out)),
        [Action::ReloadDone]
    );
}

#[test]
fn a_worker_that_stops_pinging_the_watchdog_is_killed_and_restarted() {
    let mut rig = Rig::with(systemd_config(), 1);
    let a = rig.worker(0);
    rig.act(|s, now, out| s.listening(a, now, out));
    // Pings keep it alive past many periods.
    for _ in 0..5 {
        rig.advance(WATCHDOG - ms(1));
        rig.sup.watchdog_ping(a, rig.now);
    }
    assert!(rig.advance(WATCHDOG - ms(1)).is_empty());
    assert_eq!(rig.advance(ms(1)), [Action::WatchdogExpired(a)]);
    // Its exit (the kill) is a crash: the slot restarts.
    let after = rig.crash(a);
    assert!(
        matches!(after[..], [Action::Restarting { slot: 0, .. }]),
        "{after:?}"
    );
}

#[test]
fn a_reload_is_done_only_when_every_worker_older_than_it_has_exited() {
    let mut rig = Rig::new(2);
    let (a, b) = (rig.worker(0), rig.worker(1));
    rig.act(|s, now, out| s.reload(now, out));
    let a2 = rig.sup.replacement().expect("waiting on slot 0").new;
    rig.act(|s, now, out| s.listening(a2, now, out));
    let b2 = rig.sup.replacement().expect("waiting on slot 1").new;
    // Slot 1 goes away mid-reload: its old worker leaves by the scale-down, not the swap.
    rig.act(|s, now, out| s.scale_down(now, out));
    rig.act(|s, now, out| s.listening(b2, now, out));
    assert!(
        rig.act(|s, now, out| s.exited(a, true, now, out))
            .is_empty()
    );
    assert_eq!(
        rig.act(|s, now, out| s.exited(b, true, now, out)),
        [Action::ReloadDone]
    );
}

#[test]
fn the_watchdog_starts_when_the_worker_is_ready() {
    let cfg = SupervisionConfig {
        ready_delay: None,
        ..systemd_config()
    };
    let mut rig = Rig::with(cfg, 1);
    let a = rig.worker(0);
    // A slow start is not a hang: no pings needed before ready.
    assert!(rig.advance(WATCHDOG * 3).is_empty());
    rig.act(|s, now, out| s.listening(a, now, out));
    assert!(rig.advance(WATCHDOG - ms(1)).is_empty());
    assert_eq!(rig.advance(ms(1)), [Action::WatchdogExpired(a)]);
}

#[test]
fn a_stopping_worker_has_no_watchdog() {
    let mut rig = Rig::with(systemd_config(), 1);
    let a = rig.worker(0);
    rig.act(|s, now, out| s.disconnect(a, now, out));
    assert_eq!(rig.advance(SHUTDOWN_TIMEOUT), [Action::Kill(a)]);
}

#[test]
fn all_ready_once_every_served_slot_has_a_ready_worker() {
    let mut rig = Rig::with(systemd_config(), 2);
    let (a, b) = (rig.worker(0), rig.worker(1));
    assert!(!rig.sup.all_ready());
    rig.act(|s, now, out| s.listening(a, now, out));
    assert!(!rig.sup.all_ready());
    assert_eq!(rig.sup.ready_workers(), 1);
    rig.act(|s, now, out| s.listening(b, now, out));
    assert!(rig.sup.all_ready());
    // A crashed slot waiting for its restart is not ready.
    rig.crash(a);
    assert!(!rig.sup.all_ready());
    assert_eq!(rig.sup.ready_workers(), 1);
}

#[derive(Clone, Debug)]
enum Op {
    /// The `n`th live worker (modulo their count) listens.
    Listening(usize),
    /// It says `Online`.
    Online(usize),
    /// It sends `WATCHDOG=1`.
    WatchdogPing(usize),
    /// It says it is leaving.
    Leaving(usize),
    /// It sends `STOPPING=1`.
    Stopping(usize),
    /// Its channel closes.
    ChannelClosed(usize),
    /// It exits.
    Exit(usize),
    /// It exits after the master could not bind what it asked for.
    ExitUnableToListen(usize),
    /// The owner disconnects it.
    Disconnect(usize),
    Reload,
    ScaleUp,
    ScaleDown,
    /// Time passes, timers fire.
    Advance(Duration),
    /// Time jumps to the next deadline, which fires.
    NextDeadline,
    Shutdown,
    ForceShutdown,
}

impl Op {
    /// Ops that may take a ready worker away (`Online` from one the delay made ready).
    fn destructive(&self) -> bool {
        matches!(
            self,
            Op::Online(_)
                | Op::Leaving(_)
                | Op::Stopping(_)
                | Op::Exit(_)
                | Op::ExitUnableToListen(_)
                | Op::Disconnect(_)
                | Op::ScaleDown
                | Op::Shutdown
                | Op::ForceShutdown
        )
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize).prop_map(Op::Listening),
        2 => (0..8usize).prop_map(Op::Online),
        3 => (0..8usize).prop_map(Op::WatchdogPing),
        1 => (0..8usize).prop_map(Op::Leaving),
        1 => (0..8usize).prop_map(Op::Stopping),
        1 => (0..8usize).prop_map(Op::ChannelClosed),
        4 => (0..8usize).prop_map(Op::Exit),
        1 => (0..8usize).prop_map(Op::ExitUnableToListen),
        1 => (0..8usize).prop_map(Op::Disconnect),
        2 => Just(Op::Reload),
        1 => Just(Op::ScaleUp),
        1 => Just(Op::ScaleDown),
        3 => (0..3000u64).prop_map(|n| Op::Advance(ms(n))),
        3 => Just(Op::NextDeadline),
        1 => Just(Op::Shutdown),
        1 => Just(Op::ForceShutdown),
    ]
}

fn spawn_outcome() -> impl Strategy<Value = SpawnOutcome> {
    prop_oneof![
        6 => any::<bool>().prop_map(|ready| SpawnOutcome::Ok { ready }),
        1 => any::<bool>().prop_map(|shortage| SpawnOutcome::Fails { shortage }),
    ]
}

/// Supervision driven like the event loop drives it, with a model of the processes.
struct Sim {
    sup: Supervision,
    now: Instant,
    outcomes: Vec<SpawnOutcome>,
    next_outcome: usize,
    /// Processes running, and whether each was told (or said) it would leave.
    alive: BTreeMap<WorkerId, bool>,
    removed: BTreeSet<usize>,
    shut_down: bool,
    /// Ready workers when the running reload started, if no op since could take one away.
    reload_baseline: Option<usize>,
    /// Old workers a reload replaced (disconnected once their successor was ready).
    replaced: BTreeSet<WorkerId>,
    /// When each running worker last pinged the watchdog.
    pinged: BTreeMap<WorkerId, Instant>,
    /// Workers whose watchdog expired.
    hung: BTreeSet<WorkerId>,
}

impl Sim {
    fn pick(&self, n: usize) -> Option<WorkerId> {
        let len = self.alive.len();
        (len > 0).then(|| *self.alive.keys().nth(n % len).expect("in range"))
    }

    /// Ready workers serving a slot that is not removed.
    fn ready(&self) -> usize {
        self.sup
            .workers
            .iter()
            .filter(|(_, w)| w.phase == Phase::Ready)
            .filter(|(_, w)| self.sup.slot_state(w.slot) != Some(SlotState::Removed))
            .count()
    }

    /// Carries out actions like the event loop; returns them all.
    fn carry_out(&mut self, mut out: Vec<Action>) -> Vec<Action> {
        let mut all = Vec::new();
        while !out.is_empty() {
            for a in std::mem::take(&mut out) {
                match a {
                    Action::Spawn { worker, .. } => {
                        let outcome = self.outcomes[self.next_outcome % self.outcomes.len()];
                        self.next_outcome += 1;
                        match outcome {
                            SpawnOutcome::Ok { ready } => {
                                self.alive.insert(worker, false);
                                self.sup.spawned(worker, ready, self.now, &mut out);
                            }
                            SpawnOutcome::Fails { shortage } => {
                                self.sup.spawn_failed(worker, shortage, self.now, &mut out);
                            }
                        }
                    }
                    Action::Disconnect(worker) => {
                        if let Some(told) = self.alive.get_mut(&worker) {
                            *told = true;
                        }
                    }
                    _ => {}
                }
                all.push(a);
            }
        }
        all
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before: Vec<Option<SlotState>> = (0..self.sup.slot_count())
            .map(|s| self.sup.slot_state(s))
            .collect();
        let ready_before = self.ready();
        let replacing = self.sup.replacement();
        let mut planned_exit = false;
        let mut reload_started = false;
        let mut out = Vec::new();
        let now = self.now;
        match *op {
            Op::Listening(n) => {
                if let Some(w) = self.pick(n) {
                    self.sup.listening(w, now, &mut out);
                }
            }
            Op::Online(n) => {
                if let Some(w) = self.pick(n) {
                    self.sup.online(w);
                }
            }
            Op::WatchdogPing(n) => {
                if let Some(w) = self.pick(n) {
                    if self.sup.phase(w) == Some(Phase::Ready) {
                        self.pinged.insert(w, now);
                    }
                    self.sup.watchdog_ping(w, now);
                }
            }
            Op::Leaving(n) => {
                if let Some(w) = self.pick(n) {
                    self.alive.insert(w, true);
                    self.sup.leaving(w);
                }
            }
            Op::Stopping(n) => {
                if let Some(w) = self.pick(n) {
                    self.alive.insert(w, true);
                    self.sup.stopping(w, now);
                    prop_assert!(
                        self.sup
                            .workers
                            .get(&w)
                            .is_some_and(|w| w.kill_at.is_some()),
                        "worker {w} said STOPPING=1 and has no SIGKILL deadline"
                    );
                }
            }
            Op::ChannelClosed(n) => {
                if let Some(w) = self.pick(n) {
                    self.sup.channel_closed(w, now);
                }
            }
            Op::Exit(n) => {
                if let Some(w) = self.pick(n) {
                    let told = self.alive.remove(&w).unwrap_or(false);
                    planned_exit = told;
                    self.sup.exited(w, told, now, &mut out);
                }
            }
            Op::ExitUnableToListen(n) => {
                if let Some(w) = self.pick(n) {
                    let told = self.alive.remove(&w).unwrap_or(false);
                    planned_exit = told;
                    if told {
                        self.sup.exited(w, told, now, &mut out);
                    } else {
                        self.sup.exited_unable_to_listen(w, now, &mut out);
                    }
                }
            }
            Op::Disconnect(n) => {
                if let Some(w) = self.pick(n) {
                    self.sup.disconnect(w, now, &mut out);
                }
            }
            Op::Reload => {
                if !self.sup.reloading() && !self.shut_down {
                    self.reload_baseline = Some(ready_before);
                    reload_started = true;
                }
                self.sup.reload(now, &mut out);
            }
            Op::ScaleUp => self.sup.scale_up(now, &mut out),
            Op::ScaleDown => self.sup.scale_down(now, &mut out),
            Op::Advance(by) => {
                self.now += by;
                self.sup.on_timers(self.now, &mut out);
            }
            Op::NextDeadline => {
                if let Some(t) = self.sup.next_deadline() {
                    self.now = self.now.max(t);
                    self.sup.on_timers(self.now, &mut out);
                }
            }
            Op::Shutdown => self.sup.shutdown(now, &mut out),
            Op::ForceShutdown => {
                for told in self.alive.values_mut() {
                    *told = true;
                }
                self.sup.force_shutdown(&mut out);
            }
        }
        if op.destructive() {
            self.reload_baseline = None;
        }
        let actions = self.carry_out(out);
        if let Some(old) = replacing.and_then(|r| r.old)
            && actions.contains(&Action::Disconnect(old))
        {
            self.replaced.insert(old);
        }
        self.check(op, &before, ready_before, &actions)?;
        self.check_watchdog(&actions)?;
        if actions.contains(&Action::ReloadDone) {
            // "Reload done" means no old worker serves any more.
            for old in &self.replaced {
                prop_assert!(
                    !self.alive.contains_key(old),
                    "reload done while replaced worker {old} still runs"
                );
            }
        }
        if planned_exit && !actions.iter().any(|a| matches!(a, Action::ReloadFailed(_))) {
            // A worker that was told to leave (or said it would) is not replaced, unless it
            // was a reload's new worker and its slot has nobody else.
            prop_assert!(
                !actions.iter().any(|a| matches!(
                    a,
                    Action::Spawn { .. } | Action::Restarting { .. } | Action::SlotErrored { .. }
                )),
                "a planned exit restarted its slot: {actions:?}"
            );
        }
        if reload_started {
            // Errored slots get a fresh start: even a spawn that fails is only their first
            // crash.
            for (slot, state) in before.iter().enumerate() {
                if *state == Some(SlotState::Errored) {
                    prop_assert_ne!(self.sup.slot_state(slot), Some(SlotState::Errored));
                }
            }
        }
        if matches!(op, Op::Shutdown | Op::ForceShutdown) {
            self.shut_down = true;
        }
        for (slot, state) in before.iter().enumerate() {
            if *state == Some(SlotState::Removed) {
                self.removed.insert(slot);
            }
        }
        Ok(())
    }

    /// A worker is declared hung only when a whole period passed without a ping, and every
    /// ready worker that has not been told to leave is either watched with a deadline still
    /// ahead or has been declared hung.
    fn check_watchdog(&mut self, actions: &[Action]) -> Result<(), TestCaseError> {
        let Some(period) = self.sup.cfg.watchdog else {
            return Ok(());
        };
        for a in actions {
            if let Action::WatchdogExpired(w) = *a {
                let last = self.pinged.get(&w).copied();
                prop_assert!(
                    last.is_none_or(|t| t + period <= self.now),
                    "worker {w} declared hung {:?} after its last ping",
                    last.map(|t| self.now.saturating_duration_since(t))
                );
                self.hung.insert(w);
            }
        }
        self.pinged.retain(|w, _| self.alive.contains_key(w));
        for (id, w) in &self.sup.workers {
            if w.phase != Phase::Ready || w.speaks_channel || self.hung.contains(id) {
                continue;
            }
            prop_assert!(
                w.watchdog_at.is_some_and(|t| t > self.now),
                "ready worker {id} is not watched ({:?} at {:?})",
                w.watchdog_at,
                self.now
            );
        }
        Ok(())
    }

    fn check(
        &self,
        op: &Op,
        before: &[Option<SlotState>],
        ready_before: usize,
        actions: &[Action],
    ) -> Result<(), TestCaseError> {
        let sup = &self.sup;
        let replacement = sup.replacement();
        for a in actions {
            let Action::Spawn { slot, .. } = *a else {
                continue;
            };
            prop_assert!(!self.shut_down, "spawned into {slot} after shutdown");
            prop_assert!(
                !self.removed.contains(&slot)
                    && before.get(slot) != Some(&Some(SlotState::Removed)),
                "removed slot {slot} restarted"
            );
            if before.get(slot) == Some(&Some(SlotState::Errored)) {
                prop_assert!(
                    matches!(op, Op::Reload),
                    "errored slot {slot} restarted by {op:?}"
                );
            }
        }
        for (slot, state) in before.iter().enumerate() {
            if *state == Some(SlotState::Removed) {
                prop_assert_eq!(sup.slot_state(slot), Some(SlotState::Removed));
            }
        }
        // Supervision tracks exactly the processes that run.
        let tracked: BTreeSet<WorkerId> = sup.workers().collect();
        let running: BTreeSet<WorkerId> = self.alive.keys().copied().collect();
        prop_assert_eq!(&tracked, &running);
        // Each of them serves its slot, is leaving, or is the reload's new worker; and no slot
        // has two workers serving outside its replacement.
        let mut per_slot: BTreeMap<usize, usize> = BTreeMap::new();
        for (&id, w) in &sup.workers {
            if w.phase == Phase::Leaving {
                continue;
            }
            let is_new = replacement.is_some_and(|r| r.new == id);
            prop_assert!(
                sup.slot_state(w.slot).and_then(SlotState::worker) == Some(id) || is_new,
                "worker {id} in slot {} is nobody's ({:?})",
                w.slot,
                sup.slot_state(w.slot)
            );
            *per_slot.entry(w.slot).or_default() += 1;
        }
        for (slot, n) in per_slot {
            let limit = if replacement.is_some_and(|r| r.slot == slot) {
                2
            } else {
                1
            };
            prop_assert!(n <= limit, "{n} workers serve slot {slot}");
        }
        if !op.destructive() {
            prop_assert!(
                self.ready() >= ready_before,
                "{op:?} took ready workers away: {ready_before} -> {}",
                self.ready()
            );
        }
        if actions.contains(&Action::ReloadDone)
            && let Some(baseline) = self.reload_baseline
        {
            prop_assert!(
                self.ready() >= baseline,
                "reload ended with {} ready workers, {baseline} before",
                self.ready()
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn supervision_keeps_its_invariants(
        slots in 1..4usize,
        seed in any::<u64>(),
        systemd in any::<bool>(),
        outcomes in prop::collection::vec(spawn_outcome(), 1..12),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let cfg = if systemd { systemd_config() } else { config() };
        let mut sim = Sim {
            sup: Supervision::new(cfg, slots, seed),
            now: Instant::now(),
            outcomes,
            next_outcome: 0,
            alive: BTreeMap::new(),
            removed: BTreeSet::new(),
            shut_down: false,
            reload_baseline: None,
            replaced: BTreeSet::new(),
            pinged: BTreeMap::new(),
            hung: BTreeSet::new(),
        };
        let mut out = Vec::new();
        sim.sup.start(sim.now, &mut out);
        sim.carry_out(out);
        for op in &ops {
            sim.step(op)?;
        }
        // Eventually: once shut down and every process has exited, nothing is left and nothing
        // is spawned.
        sim.step(&Op::Shutdown)?;
        while let Some(w) = sim.pick(0) {
            sim.step(&Op::Exit(0))?;
            prop_assert!(!sim.alive.contains_key(&w));
        }
        sim.step(&Op::NextDeadline)?;
        prop_assert_eq!(sim.sup.workers().count(), 0);
        prop_assert_eq!(sim.sup.next_deadline(), None);
    }
}

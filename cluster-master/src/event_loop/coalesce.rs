//! When the loop lets connections gather before it waits (see [`crate::Coalesce`]).
//!
//! Pure: the loop passes what it knows before each wait and sleeps for what this returns.

use std::time::Duration;

use crate::Coalesce;

/// How long to pause before the next wait, so that what arrives meanwhile is accepted and
/// dealt in one pass instead of a wake-up each.
///
/// `fewest_unanswered` is the [`fewest_unanswered`] of the workers. Only when every worker
/// that round-robin connections are dealt to has at least `min_unanswered` is there a
/// pause: each is busy with that many connections, so one dealt now would mostly queue
/// behind them. Never when the coming wait would not block
/// (`timeout` zero), never past it (a timer due sooner), never past
/// [`Coalesce::MAX_DELAY`](crate::Coalesce::MAX_DELAY).
pub(super) fn pause_before_wait(
    coalesce: Option<Coalesce>,
    timeout: Option<Duration>,
    fewest_unanswered: Option<usize>,
) -> Duration {
    let Some(c) = coalesce else {
        return Duration::ZERO;
    };
    let delay = c.delay.min(Coalesce::MAX_DELAY);
    let pause = timeout.map_or(delay, |t| t.min(delay));
    if pause.is_zero() {
        return Duration::ZERO;
    }
    if every_worker_behind(fewest_unanswered, c.min_unanswered) {
        pause
    } else {
        Duration::ZERO
    }
}

/// The fewest hand-offs any worker has unanswered, given how many each has (for each worker
/// that round-robin connections are dealt to); `None` without such a worker. Stops at the
/// first that has none, as a native master's first worker does.
pub(super) fn fewest_unanswered(unanswered: impl Iterator<Item = usize>) -> Option<usize> {
    let mut fewest: Option<usize> = None;
    for n in unanswered {
        fewest = Some(fewest.map_or(n, |f| f.min(n)));
        if n == 0 {
            break;
        }
    }
    fewest
}

/// Whether every worker dealt to has at least `min_unanswered` (taken as 1 at least: a worker
/// with nothing in flight is never behind) unanswered hand-offs, and there is one.
pub(super) fn every_worker_behind(fewest_unanswered: Option<usize>, min_unanswered: usize) -> bool {
    fewest_unanswered.is_some_and(|n| n >= min_unanswered.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ON: Option<Coalesce> = Some(Coalesce {
        delay: Duration::from_micros(300),
        min_unanswered: 3,
    });

    #[test]
    fn pauses_only_when_every_worker_is_behind() {
        let p = |u: &[usize]| pause_before_wait(ON, None, fewest_unanswered(u.iter().copied()));
        assert_eq!(p(&[3, 5]), Duration::from_micros(300));
        assert_eq!(p(&[3, 2]), Duration::ZERO, "one worker could take it now");
        assert_eq!(p(&[]), Duration::ZERO, "no worker is dealt to");
        assert_eq!(
            pause_before_wait(None, None, Some(9)),
            Duration::ZERO,
            "off"
        );
    }

    #[test]
    fn never_delays_a_due_timer_or_a_wait_that_would_not_block() {
        let behind = || fewest_unanswered([4usize, 4].into_iter());
        assert_eq!(
            pause_before_wait(ON, Some(Duration::from_micros(120)), behind()),
            Duration::from_micros(120)
        );
        assert_eq!(
            pause_before_wait(ON, Some(Duration::ZERO), behind()),
            Duration::ZERO
        );
    }

    #[test]
    fn a_threshold_of_zero_still_needs_a_hand_off_in_flight() {
        let c = Some(Coalesce {
            delay: Duration::from_micros(300),
            min_unanswered: 0,
        });
        assert_eq!(pause_before_wait(c, None, Some(0)), Duration::ZERO);
        assert_eq!(
            pause_before_wait(c, None, Some(1)),
            Duration::from_micros(300)
        );
    }

    #[test]
    fn the_fewest_unanswered_stops_at_an_idle_worker() {
        let mut seen = 0;
        let fewest = fewest_unanswered([4usize, 0, 7].into_iter().inspect(|_| seen += 1));
        assert_eq!(fewest, Some(0));
        assert_eq!(seen, 2, "the walk stops at the idle worker");
        assert_eq!(fewest_unanswered([5usize, 3, 8].into_iter()), Some(3));
        assert_eq!(fewest_unanswered(std::iter::empty()), None);
    }

    proptest! {
        #[test]
        fn the_pause_is_bounded_and_needs_all_workers_behind(
            unanswered in proptest::collection::vec(0usize..8, 0..6),
            min in 0usize..5,
            delay_us in 0u64..3000,
            timeout_us in proptest::option::of(0u64..2000),
        ) {
            let c = Coalesce { delay: Duration::from_micros(delay_us), min_unanswered: min };
            let timeout = timeout_us.map(Duration::from_micros);
            let pause = pause_before_wait(Some(c), timeout, fewest_unanswered(unanswered.iter().copied()));
            prop_assert!(pause <= c.delay && pause <= Coalesce::MAX_DELAY);
            if let Some(t) = timeout {
                prop_assert!(pause <= t);
            }
            let behind = !unanswered.is_empty()
                && unanswered.iter().all(|&n| n >= min.max(1));
            if !behind {
                prop_assert_eq!(pause, Duration::ZERO);
            } else {
                let cap = c.delay.min(Coalesce::MAX_DELAY);
                prop_assert_eq!(pause, timeout.map_or(cap, |t| t.min(cap)));
            }
        }
    }
}

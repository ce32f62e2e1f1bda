//! When the loop lets connections gather before it waits (see [`crate::Coalesce`]).
//!
//! Pure: the loop passes what it knows before each wait and sleeps for what this returns.

use std::time::Duration;

use crate::Coalesce;

/// How long to pause before the next wait, so that what arrives meanwhile is accepted and
/// dealt in one pass instead of a wake-up each.
///
/// `unanswered` yields, for each worker that round-robin connections are dealt to, how many
/// hand-offs it has whose answers the loop has not read. Only when every such worker has at
/// least `min_unanswered` is there a pause: each is busy with that many connections, so one
/// dealt now would mostly queue behind them. Never when the coming wait would not block
/// (`timeout` zero), never past it (a timer due sooner), never past
/// [`Coalesce::MAX_DELAY`](crate::Coalesce::MAX_DELAY).
pub(super) fn pause_before_wait(
    coalesce: Option<Coalesce>,
    timeout: Option<Duration>,
    mut unanswered: impl Iterator<Item = usize>,
) -> Duration {
    let Some(c) = coalesce else {
        return Duration::ZERO;
    };
    let delay = c.delay.min(Coalesce::MAX_DELAY);
    let pause = timeout.map_or(delay, |t| t.min(delay));
    if pause.is_zero() {
        return Duration::ZERO;
    }
    let mut any = false;
    let all_behind = unanswered.all(|n| {
        any = true;
        n >= c.min_unanswered.max(1)
    });
    if any && all_behind {
        pause
    } else {
        Duration::ZERO
    }
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
        let p = |u: &[usize]| pause_before_wait(ON, None, u.iter().copied());
        assert_eq!(p(&[3, 5]), Duration::from_micros(300));
        assert_eq!(p(&[3, 2]), Duration::ZERO, "one worker could take it now");
        assert_eq!(p(&[]), Duration::ZERO, "no worker is dealt to");
        assert_eq!(
            pause_before_wait(None, None, [9, 9].into_iter()),
            Duration::ZERO,
            "off"
        );
    }

    #[test]
    fn never_delays_a_due_timer_or_a_wait_that_would_not_block() {
        let behind = || [4usize, 4].into_iter();
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
        assert_eq!(
            pause_before_wait(c, None, [0usize].into_iter()),
            Duration::ZERO
        );
        assert_eq!(
            pause_before_wait(c, None, [1usize].into_iter()),
            Duration::from_micros(300)
        );
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
            let pause = pause_before_wait(Some(c), timeout, unanswered.iter().copied());
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

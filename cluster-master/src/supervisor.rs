//! When to restart a worker slot, and when to give up on it. Pure: time is passed in.

use std::time::{Duration, Instant};

/// How crashed workers are restarted.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// Delay before the first restart after a crash.
    pub initial_delay: Duration,
    /// The delay doubles per consecutive fast crash up to this cap.
    pub max_delay: Duration,
    /// A worker that ran at least this long before crashing resets the slot's crash count.
    pub min_uptime: Duration,
    /// After this many consecutive fast crashes the slot is marked errored and not restarted.
    pub max_fast_crashes: u32,
    /// Random spread of each delay, as a fraction (0.2 = +-20 %), so that slots crashing
    /// together do not restart in lock-step.
    pub jitter: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            min_uptime: Duration::from_secs(1),
            max_fast_crashes: 5,
            jitter: 0.2,
        }
    }
}

/// What to do with a slot whose worker crashed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RestartDecision {
    /// Fork a replacement at this instant.
    RestartAt(Instant),
    /// Stop: the slot crashed `max_fast_crashes` times in a row right after starting.
    Errored {
        /// Consecutive fast crashes seen.
        crashes: u32,
    },
}

/// Per-slot crash history.
#[derive(Clone, Debug, Default)]
pub struct SlotHistory {
    fast_crashes: u32,
}

impl SlotHistory {
    /// Records a crash of a worker that had run for `uptime`; `jitter_unit` in [0, 1) spreads
    /// the delay (the caller supplies randomness so this stays deterministic under test).
    pub fn on_crash(
        &mut self,
        policy: &RestartPolicy,
        uptime: Duration,
        now: Instant,
        jitter_unit: f64,
    ) -> RestartDecision {
        if uptime >= policy.min_uptime {
            self.fast_crashes = 0;
        }
        self.fast_crashes += 1;
        if self.fast_crashes >= policy.max_fast_crashes.max(1) {
            return RestartDecision::Errored {
                crashes: self.fast_crashes,
            };
        }
        let exp = self.fast_crashes.saturating_sub(1).min(30);
        let base = policy
            .initial_delay
            .saturating_mul(1u32 << exp)
            .min(policy.max_delay);
        let spread = policy.jitter.clamp(0.0, 1.0) * (2.0 * jitter_unit.clamp(0.0, 1.0) - 1.0);
        let delay = base.mul_f64((1.0 + spread).max(0.0));
        RestartDecision::RestartAt(now + delay)
    }
}

/// A small xorshift generator for jitter: no dependency, and quality does not matter here.
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A value in [0, 1).
    pub(crate) fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RestartPolicy {
        RestartPolicy {
            jitter: 0.0,
            ..RestartPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_then_errors() {
        let p = no_jitter();
        let now = Instant::now();
        let mut h = SlotHistory::default();
        let mut delays = Vec::new();
        for _ in 0..4 {
            match h.on_crash(&p, Duration::ZERO, now, 0.5) {
                RestartDecision::RestartAt(t) => delays.push(t - now),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(delays, [100, 200, 400, 800].map(Duration::from_millis));
        assert_eq!(
            h.on_crash(&p, Duration::ZERO, now, 0.5),
            RestartDecision::Errored { crashes: 5 }
        );
    }

    #[test]
    fn a_long_run_resets_the_count_and_delay_is_capped() {
        let p = RestartPolicy {
            max_delay: Duration::from_millis(150),
            ..no_jitter()
        };
        let now = Instant::now();
        let mut h = SlotHistory::default();
        for _ in 0..3 {
            assert!(matches!(
                h.on_crash(&p, Duration::ZERO, now, 0.5),
                RestartDecision::RestartAt(_)
            ));
        }
        assert_eq!(
            h.on_crash(&p, Duration::from_secs(5), now, 0.5),
            RestartDecision::RestartAt(now + Duration::from_millis(100))
        );
        assert_eq!(
            h.on_crash(&p, Duration::ZERO, now, 0.5),
            RestartDecision::RestartAt(now + Duration::from_millis(150))
        );
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let p = RestartPolicy::default();
        let now = Instant::now();
        let mut j = Jitter::new(42);
        for _ in 0..1000 {
            let mut h = SlotHistory::default();
            let u = j.next_unit();
            assert!((0.0..1.0).contains(&u));
            let RestartDecision::RestartAt(t) = h.on_crash(&p, Duration::ZERO, now, u) else {
                panic!("first crash restarts");
            };
            let d = t - now;
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
    }
}

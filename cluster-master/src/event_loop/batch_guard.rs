//! Whether the machine serves mostly this cluster, so that the loop may wait as `SCHED_BATCH`
//! ([`crate::BatchWhileBehind`]).
//!
//! Pure: the loop reads the CPU counters (`cpu_times`) when [`ForeignCpuGuard::wants_sample`]
//! says so, passes them in, and asks [`ForeignCpuGuard::allows_batch`] before each wait.

use std::time::{Duration, Instant};

/// CPU time counters read at one moment, in clock ticks (`USER_HZ`), each only growing
/// (except `cluster`, when a worker is gone without the loop reaping it: auto-reaped, its
/// ticks then lost to the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CpuTimes {
    /// Every CPU's ticks since boot, idle ones included.
    pub(super) machine_total: u64,
    /// Every CPU's ticks spent neither idle nor waiting for I/O.
    pub(super) machine_busy: u64,
    /// Ticks used by the master, the workers it has reaped, and the workers alive.
    pub(super) cluster: u64,
}

/// The verdict of the last window: whether processes outside the cluster used at most
/// `max_percent` of the machine's CPU time.
#[derive(Clone, Debug)]
pub(super) struct ForeignCpuGuard {
    max_percent: u8,
    last: Option<(Instant, CpuTimes)>,
    quiet_neighbours: bool,
}

impl ForeignCpuGuard {
    /// The shortest window judged: 50 ticks of 10 ms on 2 CPUs, a 2 % resolution.
    pub(super) const MIN_WINDOW: Duration = Duration::from_millis(250);
    /// The longest: a verdict about older times says nothing about the neighbours now (the
    /// loop samples only while its workers are behind, so a window may span an idle hour).
    pub(super) const MAX_WINDOW: Duration = Duration::from_secs(2);

    pub(super) fn new(max_percent: u8) -> Self {
        ForeignCpuGuard {
            max_percent,
            last: None,
            quiet_neighbours: false,
        }
    }

    fn never_looks(&self) -> bool {
        self.max_percent >= 100
    }

    /// Whether a sample taken at `now` would be recorded: the first, or one that closes a
    /// window of at least [`Self::MIN_WINDOW`].
    pub(super) fn wants_sample(&self, now: Instant) -> bool {
        !self.never_looks()
            && self
                .last
                .is_none_or(|(at, _)| now.saturating_duration_since(at) >= Self::MIN_WINDOW)
    }

    /// Judges the window since the previous sample (none, or one longer than
    /// [`Self::MAX_WINDOW`]: not quiet) and starts the next at `now`.
    pub(super) fn record(&mut self, now: Instant, times: CpuTimes) {
        self.quiet_neighbours = match self.last {
            Some((at, before)) if now.saturating_duration_since(at) <= Self::MAX_WINDOW => {
                let total = times.machine_total.saturating_sub(before.machine_total);
                let busy = times.machine_busy.saturating_sub(before.machine_busy);
                let cluster = times.cluster.saturating_sub(before.cluster);
                let foreign = busy.saturating_sub(cluster);
                total > 0
                    && u128::from(foreign) * 100 <= u128::from(self.max_percent) * u128::from(total)
            }
            _ => false,
        };
        self.last = Some((now, times));
    }

    /// Whether the last window, ended less than [`Self::MAX_WINDOW`] before `now`, was quiet.
    pub(super) fn allows_batch(&self, now: Instant) -> bool {
        self.never_looks()
            || (self.quiet_neighbours
                && self
                    .last
                    .is_some_and(|(at, _)| now.saturating_duration_since(at) < Self::MAX_WINDOW))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn times(total: u64, busy: u64, cluster: u64) -> CpuTimes {
        CpuTimes {
            machine_total: total,
            machine_busy: busy,
            cluster,
        }
    }

    #[test]
    fn judges_the_share_strangers_used_in_the_window() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(300);
        let mut g = ForeignCpuGuard::new(40);
        assert!(g.wants_sample(t0));
        g.record(t0, times(1000, 500, 300));
        assert!(!g.allows_batch(t0), "one sample is no window");
        assert!(!g.wants_sample(t0 + Duration::from_millis(100)));
        // 60 ticks: 57 busy, 40 of them the cluster's: strangers 17 = 28 %.
        assert!(g.wants_sample(t1));
        g.record(t1, times(1060, 557, 340));
        assert!(g.allows_batch(t1));
        // The next 60: 58 busy, 20 the cluster's: strangers 38 = 63 % (two busy loops).
        let t2 = t1 + Duration::from_millis(300);
        g.record(t2, times(1120, 615, 360));
        assert!(!g.allows_batch(t2));
    }

    #[test]
    fn a_stale_window_or_verdict_allows_nothing() {
        let t0 = Instant::now();
        let mut g = ForeignCpuGuard::new(40);
        g.record(t0, times(0, 0, 0));
        let late = t0 + ForeignCpuGuard::MAX_WINDOW + Duration::from_millis(1);
        g.record(late, times(1000, 10, 10));
        assert!(!g.allows_batch(late), "a window over the longest");
        let t1 = late + Duration::from_millis(300);
        g.record(t1, times(1060, 20, 20));
        assert!(g.allows_batch(t1));
        assert!(
            !g.allows_batch(t1 + ForeignCpuGuard::MAX_WINDOW),
            "a verdict grown old"
        );
    }

    #[test]
    fn a_cluster_count_that_falls_counts_all_busy_time_as_strangers() {
        // A worker auto-reaped (its exit never waited for) takes its ticks out of the sum.
        let t0 = Instant::now();
        let mut g = ForeignCpuGuard::new(40);
        g.record(t0, times(1000, 900, 800));
        let t1 = t0 + Duration::from_millis(300);
        g.record(t1, times(1060, 950, 700));
        assert!(!g.allows_batch(t1));
    }

    #[test]
    fn a_hundred_percent_never_looks() {
        let g = ForeignCpuGuard::new(100);
        let now = Instant::now();
        assert!(!g.wants_sample(now));
        assert!(g.allows_batch(now));
    }

    #[test]
    fn the_limit_itself_is_allowed() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(300);
        let judge = |foreign: u64| {
            let mut g = ForeignCpuGuard::new(40);
            g.record(t0, times(0, 0, 0));
            g.record(t1, times(100, 50 + foreign, 50));
            g.allows_batch(t1)
        };
        assert!(judge(40));
        assert!(!judge(41));
    }

    proptest! {
        /// Properties rather than the formula: strangers using more never turn a deny into an
        /// allow, a higher limit never turns an allow into a deny, an allow needs a window no
        /// longer than the longest, and every verdict expires.
        #[test]
        fn the_verdict_is_monotone_and_expires(
            max in 0u8..100,
            more in 0u8..100,
            extra_foreign in 1u64..100,
            windows in proptest::collection::vec(
                (0u64..3000, 1u64..400, 0u64..=100, 0u64..=100), 1..20),
        ) {
            let mut strict = ForeignCpuGuard::new(max);
            let mut lenient = ForeignCpuGuard::new(max.saturating_add(more).min(99));
            let mut now = Instant::now();
            let mut at = times(0, 0, 0);
            strict.record(now, at);
            lenient.record(now, at);
            prop_assert!(!strict.allows_batch(now), "one sample is no window");
            for (gap_ms, total, busy_pct, cluster_pct) in windows {
                let gap = Duration::from_millis(gap_ms);
                now += gap;
                let busy = total * busy_pct / 100;
                let next = times(
                    at.machine_total + total,
                    at.machine_busy + busy,
                    at.cluster + busy * cluster_pct / 100,
                );
                // The same window, with strangers busy for `extra_foreign` more ticks.
                let busier = CpuTimes {
                    machine_total: next.machine_total + extra_foreign,
                    machine_busy: next.machine_busy + extra_foreign,
                    ..next
                };
                let mut beside_busier = strict.clone();
                beside_busier.record(now, busier);
                strict.record(now, next);
                lenient.record(now, next);
                let allowed = strict.allows_batch(now);
                prop_assert!(!beside_busier.allows_batch(now) || allowed);
                prop_assert!(!allowed || lenient.allows_batch(now));
                prop_assert!(!allowed || gap <= ForeignCpuGuard::MAX_WINDOW);
                prop_assert!(!strict.allows_batch(now + ForeignCpuGuard::MAX_WINDOW));
                at = next;
            }
        }
    }
}

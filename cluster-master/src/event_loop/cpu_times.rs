//! Reads the CPU time counters [`ForeignCpuGuard`](super::batch_guard::ForeignCpuGuard)
//! judges: the machine's from `/proc/stat`, the cluster's from `/proc/self/stat` (the master,
//! and the workers it has reaped) and each live worker's `/proc/PID/stat`.

use std::io;

use super::batch_guard::CpuTimes;

/// The counters now. A worker that is gone (its `/proc` entry too) is left out: its ticks
/// reach the master's reaped-children count when the loop reaps it.
pub(super) fn read(workers: impl Iterator<Item = u32>) -> io::Result<CpuTimes> {
    let unreadable = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let (machine_total, machine_busy) = machine_ticks(&std::fs::read_to_string("/proc/stat")?)
        .ok_or_else(|| unreadable("/proc/stat has no cpu line"))?;
    let master = process_ticks(&std::fs::read_to_string("/proc/self/stat")?)
        .ok_or_else(|| unreadable("/proc/self/stat"))?;
    let mut cluster = master.own.saturating_add(master.reaped_children);
    for pid in workers {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(text) => {
                if let Some(worker) = process_ticks(&text) {
                    cluster = cluster.saturating_add(worker.own);
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            }
            Err(e) => return Err(e),
        }
    }
    Ok(CpuTimes {
        machine_total,
        machine_busy,
        cluster,
    })
}

/// `(total, busy)` from `/proc/stat`'s first line: `cpu user nice system idle iowait irq
/// softirq steal guest guest_nice`. Guest time is counted in user time already; idle and
/// iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total = ticks.iter().fold(0u64, |a, &t| a.saturating_add(t));
    let idle = ticks
        .get(3)?
        .saturating_add(ticks.get(4).copied().unwrap_or(0));
    Some((total, total.saturating_sub(idle)))
}

#[derive(Debug, PartialEq, Eq)]
struct ProcessTicks {
    /// utime + stime: every thread of the process.
    own: u64,
    /// cutime + cstime: children it has waited for.
    reaped_children: u64,
}

/// From `/proc/PID/stat`, whose second field (the command name, in parentheses) may itself
/// hold spaces and parentheses: the fields are counted from the last `)`.
fn process_ticks(stat: &str) -> Option<ProcessTicks> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; utime is field 14.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let mut next = || fields.next()?.parse::<u64>().ok();
    let (utime, stime, cutime, cstime) = (next()?, next()?, next()?, next()?);
    Some(ProcessTicks {
        own: utime.saturating_add(stime),
        reaped_children: cutime.saturating_add(cstime),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_from_the_first_line() {
        let stat = "cpu  100 5 50 800 20 3 7 0 0 0\ncpu0 50 2 25 400 10 1 3 0 0 0\nintr 1 2\n";
        assert_eq!(machine_ticks(stat), Some((985, 165)));
        assert_eq!(machine_ticks("intr 1 2\n"), None);
        assert_eq!(machine_ticks("cpu 1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn process_ticks_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    17 5 30 12 20 0 1 0 100 1000 200 18446744073709551615";
        assert_eq!(
            process_ticks(stat),
            Some(ProcessTicks {
                own: 22,
                reaped_children: 42
            })
        );
        assert_eq!(process_ticks("4242 (x) S 1 2"), None);
    }

    #[test]
    fn reads_this_machine_and_this_process() {
        let t = read(std::iter::once(std::process::id())).unwrap();
        assert!(t.machine_total >= t.machine_busy && t.machine_total > 0);
        // A pid that no process has: left out, not an error.
        assert!(read(std::iter::once(u32::MAX)).is_ok());
    }
}

//! Reads the CPU time counters [`ForeignCpuGuard`](super::batch_guard::ForeignCpuGuard)
//! judges: the machine's from `/proc/stat` (the CPUs the loop may run on), the cluster's from
//! `/proc/self/stat` (the master, and the workers it has reaped) and each live worker's
//! `/proc/PID/stat`.
//!
//! What it cannot see: a `cpu.max` quota (a container limited to 2 CPUs' time on a
//! 64-CPU host is judged against its cpuset, or the host), and the CPU of a worker's own
//! children, which counts as a stranger's. Both err towards `SCHED_OTHER`, the old default.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use nix::sched::sched_getaffinity;
use nix::unistd::Pid;

use super::batch_guard::CpuTimes;

/// Keeps `/proc/stat` and `/proc/self/stat` open and one buffer for the reads: a sample
/// comes every 250 ms while the workers are behind.
#[derive(Debug, Default)]
pub(super) struct CpuTimesReader {
    files: Option<(File, File)>,
    text: String,
}

impl CpuTimesReader {
    /// The counters now. A worker that is gone (its `/proc` entry too) is left out; its
    /// ticks reach the master's reaped-children count when the loop reaps it.
    pub(super) fn read(&mut self, workers: impl Iterator<Item = u32>) -> io::Result<CpuTimes> {
        let unreadable = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let (machine, own) = match &mut self.files {
            Some(files) => files,
            files => files.insert((File::open("/proc/stat")?, File::open("/proc/self/stat")?)),
        };
        read_from_start(machine, &mut self.text)?;
        // Where the affinity cannot be read, the whole machine.
        let affinity = sched_getaffinity(Pid::from_raw(0)).ok();
        let on_our_cpus = |cpu: usize| {
            affinity
                .as_ref()
                .is_none_or(|set| set.is_set(cpu).unwrap_or(false))
        };
        let (machine_total, machine_busy) = machine_ticks(&self.text, on_our_cpus)
            .ok_or_else(|| unreadable("/proc/stat has no cpu lines"))?;
        read_from_start(own, &mut self.text)?;
        let master = process_ticks(&self.text).ok_or_else(|| unreadable("/proc/self/stat"))?;
        let mut cluster = master.own.saturating_add(master.reaped_children);
        for pid in workers {
            self.text.clear();
            let read = File::open(format!("/proc/{pid}/stat"))
                .and_then(|mut f| f.read_to_string(&mut self.text));
            match read {
                Ok(_) => {
                    if let Some(worker) = process_ticks(&self.text) {
                        cluster = cluster.saturating_add(worker.own);
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(CpuTimes {
            machine_total,
            machine_busy,
            cluster,
        })
    }
}

fn read_from_start(file: &mut File, text: &mut String) -> io::Result<()> {
    text.clear();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(text)?;
    Ok(())
}

/// `(total, busy)` summed over the `cpuN` lines of `/proc/stat` for which `on_our_cpus(N)`
/// (the summary `cpu` line if none is), each `cpu user nice system idle iowait irq softirq
/// steal ...`. Idle and iowait are not busy; steal is left out of both (the hypervisor's
/// time, no task the loop could preempt); guest time is counted in user time already.
fn machine_ticks(stat: &str, on_our_cpus: impl Fn(usize) -> bool) -> Option<(u64, u64)> {
    let ticks = |fields: std::str::SplitAsciiWhitespace<'_>| -> Option<(u64, u64)> {
        let t: Vec<u64> = fields
            .take(7)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let total = t.iter().fold(0u64, |a, &x| a.saturating_add(x));
        let idle = t.get(3)?.saturating_add(*t.get(4)?);
        Some((total, total.saturating_sub(idle)))
    };
    let mut summary = None;
    let mut ours: Option<(u64, u64)> = None;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(cpu) = name.strip_prefix("cpu") else {
            break;
        };
        if cpu.is_empty() {
            summary = ticks(fields);
        } else if cpu.parse().is_ok_and(&on_our_cpus) {
            let (total, busy) = ticks(fields)?;
            let (t, b) = ours.unwrap_or((0, 0));
            ours = Some((t.saturating_add(total), b.saturating_add(busy)));
        }
    }
    ours.or(summary)
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

    fn set_of(cpus: &[usize]) -> nix::sched::CpuSet {
        let mut set = nix::sched::CpuSet::new();
        for &c in cpus {
            set.set(c).expect("cpu in range");
        }
        set
    }

    const STAT: &str = "cpu  100 5 50 800 20 3 7 9 0 0\n\
                        cpu0 60 2 30 400 10 1 3 4 0 0\n\
                        cpu1 40 3 20 400 10 2 4 5 0 0\n\
                        intr 1 2\n";

    #[test]
    fn machine_ticks_of_the_cpus_we_may_run_on_without_steal() {
        assert_eq!(machine_ticks(STAT, |_| true), Some((985, 165)));
        let only_cpu1 = set_of(&[1]);
        assert_eq!(
            machine_ticks(STAT, |c| only_cpu1.is_set(c).unwrap_or(false)),
            Some((479, 69))
        );
        // No per-CPU line matches: the summary line.
        assert_eq!(machine_ticks(STAT, |_| false), Some((985, 165)));
        assert_eq!(machine_ticks("intr 1 2\n", |_| true), None);
        assert_eq!(machine_ticks("cpu 1 2 x 4 5 6 7 8\n", |_| true), None);
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
    fn reads_this_machine_and_this_process_again_and_again() {
        let mut reader = CpuTimesReader::default();
        let first = reader.read(std::iter::once(std::process::id())).unwrap();
        assert!(first.machine_total >= first.machine_busy && first.machine_total > 0);
        // The kept files are read from their start again; a pid that no process has is left
        // out, not an error.
        let second = reader.read(std::iter::once(u32::MAX)).unwrap();
        assert!(second.machine_total >= first.machine_total);
    }
}

//! `--workers auto`: the CPUs this process may actually use, which in a container or under
//! `taskset` is often far fewer than the machine has. It is the smaller of the affinity mask
//! and the cgroup v2 CPU quota, and at least 1.

use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// CPUs available to this process (at least 1).
pub fn available() -> usize {
    let affinity = affinity_count().or_else(|| {
        // No affinity (unusual): the runtime's own estimate is the best remaining guess.
        std::thread::available_parallelism().ok().map(|n| n.get())
    });
    combine(affinity, cgroup_quota())
}

/// The smaller of the two limits that are known, at least 1.
pub fn combine(affinity: Option<usize>, quota: Option<usize>) -> usize {
    let n = match (affinity, quota) {
        (Some(a), Some(q)) => a.min(q),
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => 1,
    };
    n.max(1)
}

fn affinity_count() -> Option<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let set = sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let n = (0..CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .count();
    (n > 0).then_some(n)
}

/// The tightest `cpu.max` quota on the path from this process's cgroup up to the root: a
/// parent's limit binds its children too.
fn cgroup_quota() -> Option<usize> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| parse_cgroup_v2_path(&s))
        .unwrap_or_else(|| "/".to_owned());
    cgroup_dirs(Path::new(CGROUP_ROOT), &own)
        .iter()
        .filter_map(|dir| std::fs::read_to_string(dir.join("cpu.max")).ok())
        .filter_map(|s| parse_cpu_max(&s))
        .min()
}

/// This process's cgroup v2 path from `/proc/self/cgroup` (the `0::PATH` line).
pub fn parse_cgroup_v2_path(content: &str) -> Option<String> {
    content
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
        .filter(|p| p.starts_with('/'))
}

/// The directories from the process's cgroup up to and including the root.
fn cgroup_dirs(root: &Path, cgroup: &str) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    let mut cur = root.to_path_buf();
    for part in cgroup.split('/').filter(|p| !p.is_empty() && *p != "..") {
        cur.push(part);
        dirs.push(cur.clone());
    }
    dirs
}

/// `cpu.max` is `QUOTA PERIOD` or `max PERIOD`. `None` means no limit (or unreadable).
/// A fractional quota rounds down (1.5 CPUs: 1 worker), but never below 1: more busy workers
/// than the quota allows only get throttled.
pub fn parse_cpu_max(content: &str) -> Option<usize> {
    let mut it = content.split_whitespace();
    let quota = it.next()?;
    let period: u64 = it.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if quota == "max" || period == 0 {
        return None;
    }
    let quota: u64 = quota.parse().ok()?;
    let n = usize::try_from(quota / period).unwrap_or(usize::MAX);
    Some(n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_forms() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("400000 50000"), Some(8));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("garbage 100000"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
    }

    #[test]
    fn cgroup_path() {
        assert_eq!(
            parse_cgroup_v2_path("0::/user.slice/app.scope\n").as_deref(),
            Some("/user.slice/app.scope")
        );
        // Hybrid hierarchy: v1 lines first.
        assert_eq!(
            parse_cgroup_v2_path("12:cpu,cpuacct:/x\n0::/\n").as_deref(),
            Some("/")
        );
        assert_eq!(parse_cgroup_v2_path("12:cpu,cpuacct:/x\n"), None);
        let dirs = cgroup_dirs(Path::new("/sys/fs/cgroup"), "/a/b");
        assert_eq!(
            dirs,
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup/a"),
                PathBuf::from("/sys/fs/cgroup/a/b")
            ]
        );
    }

    #[test]
    fn combining_limits() {
        assert_eq!(combine(Some(8), Some(2)), 2);
        assert_eq!(combine(Some(2), None), 2);
        assert_eq!(combine(None, Some(3)), 3);
        assert_eq!(combine(None, None), 1);
        assert_eq!(combine(Some(0), None), 1);
        assert!(available() >= 1);
    }
}

//! [`cluster_master::MasterBuilder::loop_scheduling`]: the master's event loop thread runs as
//! `SCHED_BATCH` (always, or while every worker is behind), while its workers, which a fork
//! would give the forking thread's policy, start as `SCHED_OTHER`. The tests assume they are
//! run under `SCHED_OTHER` themselves.

use std::process::{Command, Stdio};
use std::time::Instant;

use crate::util::*;

/// Threads by name, each with its scheduling policy.
type Policies = Vec<(String, i32)>;

/// The scheduling policy of each thread of `pid`, with the thread's name.
fn thread_policies(pid: u32) -> Policies {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // The name may hold spaces or parentheses; the fields after its closing
            // parenthesis start at field 3 (state), and the policy is field 41.
            let policy = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(41 - 3)?
                .parse()
                .ok()?;
            Some((name.trim().to_owned(), policy))
        })
        .collect()
}

/// Whether there are threads and every one runs under `policy` (an empty list would pass any
/// check vacuously).
fn all_under(threads: &Policies, policy: i32) -> bool {
    !threads.is_empty() && threads.iter().all(|&(_, p)| p == policy)
}

/// A mini-master, through `chrt ARGS` when `chrt` is not empty (it execs in place, so the
/// pid is the master's), with `--loop batch` if `batch`.
fn mini_master_under(chrt: &[&str], batch: bool) -> Command {
    let mut cmd = if chrt.is_empty() {
        Command::new(mini_master())
    } else {
        let mut c = Command::new("chrt");
        c.args(chrt).arg(mini_master());
        c
    };
    if batch {
        cmd.args(["--loop", "batch"]);
    }
    cmd
}

/// Reads a mini-master's lines (bounded by [`WAIT`]) until `n` workers have forked and `n`
/// listen: their pids, and the addresses they listen on.
fn forked_and_listening(
    lines: &std::sync::mpsc::Receiver<(Instant, String)>,
    n: usize,
) -> (Vec<u32>, Vec<String>) {
    let deadline = Instant::now() + WAIT;
    let (mut workers, mut addrs) = (Vec::new(), Vec::new());
    while workers.len() < n || addrs.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, line) = lines
            .recv_timeout(left)
            .expect("workers forked and listening");
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["fork", _, pid] => workers.push(pid.parse::<u32>().expect("pid")),
            // The master's `listening WORKER ADDR`, not a hello worker's own `listening ADDR`
            // on the same stdout.
            ["listening", _, addr] => addrs.push((*addr).to_owned()),
            _ => {}
        }
    }
    (workers, addrs)
}

/// Starts a mini-master with two hello workers, waits until both listen, and returns the
/// policies of the master's threads and of every worker thread.
fn policies_under_master(chrt: &[&str], batch: bool) -> (Policies, Policies) {
    let mut cmd = mini_master_under(chrt, batch);
    let mut master = KillOnDrop(
        cmd.args(["2", hello_worker(), "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn master"),
    );
    let master_pid = master.0.id();
    let (lines, reader) = master_lines(&mut master.0);
    let (workers, _) = forked_and_listening(&lines, 2);
    let master_threads = thread_policies(master_pid);
    let worker_threads = workers.iter().flat_map(|&w| thread_policies(w)).collect();
    end_mini_master(master, &workers, reader);
    (master_threads, worker_threads)
}

/// Kills the workers while the master lives (unreaped, their pids are still theirs), then the
/// master; a replacement it may spawn meanwhile leaves when its channel closes. The workers
/// share the master's stdout: its reader ends only when they are gone too.
fn end_mini_master(master: KillOnDrop, workers: &[u32], reader: std::thread::JoinHandle<()>) {
    for w in workers {
        let _ = Command::new("kill")
            .args(["-KILL", &w.to_string()])
            .status();
    }
    drop(master);
    let _ = reader.join();
}

#[test]
fn batch_scheduling_moves_the_event_loop_and_not_the_workers() {
    let _fds = shared_fds();
    let (master, workers) = policies_under_master(&[], true);
    let event_loop: Vec<i32> = master
        .iter()
        .filter(|(name, _)| name == "cluster-master")
        .map(|&(_, p)| p)
        .collect();
    assert_eq!(event_loop, [libc::SCHED_BATCH], "{master:?}");
    // Only the loop thread: the embedder's threads are the embedder's business.
    assert!(
        master
            .iter()
            .any(|(name, p)| name != "cluster-master" && *p == libc::SCHED_OTHER),
        "{master:?}"
    );
    assert!(all_under(&workers, libc::SCHED_OTHER), "{workers:?}");
}

/// The policy of `pid`'s event loop thread.
fn loop_policy(pid: u32) -> Option<i32> {
    thread_policies(pid)
        .into_iter()
        .find(|(name, _)| name == "cluster-master")
        .map(|(_, p)| p)
}

/// Waits (bounded by [`WAIT`]) until `pid`'s event loop thread runs under `policy`. The kernel
/// tells nobody of a policy change, so this looks every millisecond.
fn wait_for_loop_policy(pid: u32, policy: i32, why: &str) {
    let deadline = Instant::now() + WAIT;
    while loop_policy(pid) != Some(policy) {
        assert!(
            Instant::now() < deadline,
            "{why}: the loop stayed {:?}",
            loop_policy(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn the_event_loop_waits_as_batch_only_while_a_node_worker_is_behind() {
    let _fds = shared_fds();
    let gate = Gate::closed("batch-while-behind");
    let script: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "node", "blocks_first.js"]
        .iter()
        .collect();
    // Strangers allowed 100 % of the CPU: the rule then never looks at them, whatever else
    // the machine runs meanwhile (the guard has unit tests of its own).
    let mut master = KillOnDrop(
        Command::new(mini_master())
            .args(["--loop", "behind:100", "1", "node"])
            .arg(&script)
            .arg(gate.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn master"),
    );
    let master_pid = master.0.id();
    let (lines, reader) = master_lines(&mut master.0);
    let (workers, addrs) = forked_and_listening(&lines, 1);
    let addr: std::net::SocketAddr = addrs[0].parse().expect("addr");
    assert_eq!(loop_policy(master_pid), Some(libc::SCHED_OTHER));
    let connect = || {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    };
    // The first blocks the worker; the next eight wait unread in its channel, three or more
    // being "behind".
    let clients: Vec<_> = (0..9).map(|_| connect()).collect();
    wait_for_loop_policy(
        master_pid,
        libc::SCHED_BATCH,
        "nine hand-offs, eight unread",
    );
    gate.open();
    for mut c in clients {
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut c, &mut reply).expect("reply");
        assert_eq!(reply, "bye\n");
    }
    wait_for_loop_policy(master_pid, libc::SCHED_OTHER, "every hand-off answered");
    end_mini_master(master, &workers, reader);
}

#[test]
fn the_default_leaves_a_master_started_as_idle_and_its_workers_so() {
    let _fds = shared_fds();
    // Unlike --loop batch (below), the default does not refuse: it never touches a policy
    // other than SCHED_OTHER.
    let (master_threads, worker_threads) = policies_under_master(&["--idle", "0"], false);
    assert!(
        all_under(&master_threads, libc::SCHED_IDLE),
        "{master_threads:?}"
    );
    assert!(
        all_under(&worker_threads, libc::SCHED_IDLE),
        "{worker_threads:?}"
    );
}

#[test]
fn an_idle_event_loop_keeps_the_normal_policy_by_default() {
    let _fds = shared_fds();
    let (master, _) = policies_under_master(&[], false);
    assert!(all_under(&master, libc::SCHED_OTHER), "{master:?}");
}

#[test]
fn a_master_started_as_batch_stays_so_and_its_workers_inherit_it() {
    let _fds = shared_fds();
    let (master, workers) = policies_under_master(&["--batch", "0"], true);
    assert!(all_under(&master, libc::SCHED_BATCH), "{master:?}");
    // No reset: the policy is the starter's choice, not the loop's.
    assert!(all_under(&workers, libc::SCHED_BATCH), "{workers:?}");
}

#[test]
fn a_master_started_as_idle_refuses_batch_scheduling() {
    let _fds = shared_fds();
    let mut master = KillOnDrop(
        mini_master_under(&["--idle", "0"], true)
            .args(["1", hello_worker(), "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn master"),
    );
    let (lines, reader) = master_lines(&mut master.0);
    // The start fails before any worker is spawned: stdout ends with no line at all.
    match lines.recv_timeout(WAIT) {
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
        other => panic!("the master started: {other:?}"),
    }
    let _ = reader.join();
    let status = master.0.wait().expect("wait");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(master.0.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("scheduling policy 5"), "{stderr}");
}

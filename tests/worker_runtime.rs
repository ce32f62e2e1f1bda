//! The real worker runtime (cluster-worker and its hello worker) under the real master.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_core::WorkerId;
use cluster_master::{Event, MasterBuilder};

use crate::util::*;

#[test]
fn hello_standalone_serves_without_a_master() {
    let _fds = shared_fds();
    let mut child = Command::new(hello_worker())
        .arg("127.0.0.1:0")
        .env_remove(cluster_core::env::WORKER_ID)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next().expect("a line").expect("readable");
    let addr: std::net::SocketAddr = line
        .strip_prefix("listening ")
        .expect("listening line")
        .parse()
        .expect("address");
    let answer = http_get(addr, "/");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        answer.expect("served"),
        (200, 0, "hello from worker 0\n".to_owned())
    );
}

#[test]
fn hello_workers_serve_through_the_master() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(hello_worker())
            .arg("127.0.0.1:0")
            .workers(2),
    );
    let addr = inet(&c.wait_listening(2));
    let mut ids = HashSet::new();
    for _ in 0..100 {
        let (status, id, body) = http_get(addr, "/").expect("served");
        assert_eq!(status, 200);
        assert_eq!(body, format!("hello from worker {id}\n"));
        ids.insert(id);
    }
    assert_eq!(ids, HashSet::from([1, 2]));
    c.stop();
}

#[test]
fn a_draining_worker_finishes_requests_in_flight_and_exits_0() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(hello_worker())
            .arg("127.0.0.1:0")
            .workers(1),
    );
    let addr = inet(&c.wait_listening(1));
    let slow: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || http_get(addr, "/delay/400")))
        .collect();
    // Disconnect only once all four are in the worker's hands.
    let deadline = Instant::now() + WAIT;
    while c.master().stats().expect("stats").taken < 4 {
        assert!(Instant::now() < deadline, "hand-offs never answered");
        std::thread::yield_now();
    }
    c.master().disconnect(WorkerId(1)).expect("disconnect");
    for t in slow {
        let (status, id, _) = t
            .join()
            .expect("client")
            .expect("in-flight request completed");
        assert_eq!((status, id), (200, 1));
    }
    let exit = c.wait_for(WAIT, |e| matches!(e, Event::Exit { .. }));
    assert!(
        matches!(
            exit,
            Event::Exit {
                code: Some(0),
                exited_after_disconnect: true,
                ..
            }
        ),
        "{exit:?}"
    );
}

fn pid_alive(pid: u32) -> bool {
    // A zombie waiting for init to reap it has exited.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn workers_exit_within_2s_of_their_master_being_sigkilled() {
    let _fds = shared_fds();
    let mut master = KillOnDrop(
        Command::new(mini_master())
            .args(["3", hello_worker(), "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn master"),
    );
    let stdout = master.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut pids, mut listening, mut addr) = (Vec::new(), 0, None);
    while listening < 3 {
        let line = lines.next().expect("master output").expect("line");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["fork", _, pid] => pids.push(pid.parse::<u32>().expect("pid")),
            ["listening", _, a] => {
                listening += 1;
                addr = Some(a.parse::<std::net::SocketAddr>().expect("addr"));
            }
            _ => {}
        }
    }
    let addr = addr.expect("address");
    http_get(addr, "/").expect("served before the kill");
    let _ = master.0.kill();
    let _ = master.0.wait();
    let killed = Instant::now();
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "workers outlived their master by 2 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::net::TcpListener::bind(addr).expect("nothing holds the port any more");
}

/// A master embedded in a process that ignores SIGCHLD: the kernel reaps its workers itself,
/// so `waitpid` says ECHILD. The dead worker must still be seen as gone and its slot restarted.
#[test]
fn a_master_whose_process_ignores_sigchld_still_restarts_a_dead_worker() {
    let _fds = shared_fds();
    // An ignored signal stays ignored across exec (bash's `trap ''` ignores it; dash's does
    // not for CHLD).
    let mut master = KillOnDrop(
        Command::new("bash")
            .args([
                "-c",
                "trap '' CHLD; exec \"$0\" \"$@\"",
                mini_master(),
                "1",
                raw_worker(),
                "tcp:127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn master"),
    );
    let stdout = master.0.stdout.take().expect("stdout");
    // Read on a thread so each wait below is bounded in time.
    let (forks_tx, forks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let ["fork", _, pid] = line.split_whitespace().collect::<Vec<_>>().as_slice()
                && let Ok(pid) = pid.parse::<u32>()
                && forks_tx.send(pid).is_err()
            {
                return;
            }
        }
    });
    let next_fork = || {
        forks
            .recv_timeout(Duration::from_secs(10))
            .expect("a fork within 10 s")
    };
    let first = next_fork();
    let killed = Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The restart's fork line is the event: without it the worker record stays forever and
    // no fork comes.
    let second = next_fork();
    assert_ne!(first, second);
}

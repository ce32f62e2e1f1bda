//! `cluster_worker::tokio` under a real master: an axum app (bin/tokio_worker.rs, one runtime
//! thread) under every policy, slow handlers, graceful stop, SIGKILL, and standalone.
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster_core::{Policy, WorkerId};
use cluster_master::{Event, MasterBuilder};

use crate::util::*;

fn tokio_worker() -> &'static str {
    env!("CARGO_BIN_EXE_tokio-worker")
}

fn tokio_workers(n: usize, policy: Policy) -> MasterBuilder {
    MasterBuilder::new(tokio_worker())
        .args(["127.0.0.1:0"])
        .workers(n)
        .policy(policy)
}

/// Slow requests on their own threads; each returns (status, worker, body).
fn slow_requests(
    addr: SocketAddr,
    n: usize,
    ms: u64,
) -> Vec<std::thread::JoinHandle<std::io::Result<(u16, u32, String)>>> {
    (0..n)
        .map(|_| std::thread::spawn(move || http_get(addr, &format!("/slow/{ms}"))))
        .collect()
}

/// Waits until `n` slow handlers have started (their `slow begins` lines).
fn wait_slow_begun(c: &mut Cluster, n: usize) {
    let mut begun = c
        .seen
        .iter()
        .filter(|e| matches!(e, Event::Output { line, .. } if line == "slow begins"))
        .count();
    while begun < n {
        c.wait_for(
            WAIT,
            |e| matches!(e, Event::Output { line, .. } if line == "slow begins"),
        );
        begun += 1;
    }
}

/// Shuts the master down and checks that every one of `n` workers exited 0 after the
/// disconnect and the stop was clean.
fn stop_expecting_clean_exits(mut c: Cluster, n: usize) {
    c.master().shutdown().expect("shutdown");
    c.wait_for(WAIT, |e| matches!(e, Event::Stopped { .. }));
    let exits: Vec<&Event> = c
        .seen
        .iter()
        .filter(|e| matches!(e, Event::Exit { .. }))
        .collect();
    assert_eq!(exits.len(), n, "{exits:#?}");
    for e in exits {
        assert!(
            matches!(
                e,
                Event::Exit {
                    code: Some(0),
                    exited_after_disconnect: true,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert!(matches!(
        c.seen.last(),
        Some(Event::Stopped { clean: true })
    ));
    c.master.take().expect("master").wait().expect("clean stop");
}

#[test]
fn tokio_workers_all_serve_under_every_policy_and_exit_0() {
    let _fds = shared_fds();
    for policy in [Policy::RoundRobin, Policy::Shared, Policy::ReusePort] {
        let mut c = Cluster::start(tokio_workers(2, policy));
        let addr = inet(&c.wait_listening(2));
        let mut served = HashSet::new();
        // Concurrent batches until both served: the kernel picks the acceptor under shared
        // and reuse-port, so a bounded number of tries rather than a fixed split.
        for _ in 0..50 {
            let batch: Vec<_> = (0..8)
                .map(|_| std::thread::spawn(move || http_get(addr, "/")))
                .collect();
            for h in batch {
                let (status, worker, body) = h.join().expect("client").expect("served");
                assert_eq!((status, body.as_str()), (200, "hello\n"));
                served.insert(worker);
            }
            if served.len() == 2 {
                break;
            }
        }
        assert_eq!(served, HashSet::from([1, 2]), "{policy:?}");
        stop_expecting_clean_exits(c, 2);
    }
}

#[test]
fn a_slow_async_handler_delays_no_answer_to_the_master() {
    let _fds = shared_fds();
    // An answer later than 300 ms gets the worker dropped: the handlers below sleep 1.5 s.
    let mut c = Cluster::start(
        tokio_workers(2, Policy::RoundRobin)
            .ack_timeout(Duration::from_millis(300))
            .capture_output(true),
    );
    let addr = inet(&c.wait_listening(2));
    let slow = slow_requests(addr, 8, 1500);
    wait_slow_begun(&mut c, 8);
    let mut served = HashSet::new();
    for _ in 0..40 {
        let started = Instant::now();
        let (status, worker, _) = http_get(addr, "/").expect("served");
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "a fast request waited {:?} behind the slow ones",
            started.elapsed()
        );
        served.insert(worker);
    }
    assert_eq!(served, HashSet::from([1, 2]));
    for h in slow {
        let (status, _, body) = h.join().expect("client").expect("slow request served");
        assert_eq!((status, body.as_str()), (200, "slow hello\n"));
    }
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(
        !c.seen.iter().any(|e| matches!(e, Event::Dropped { .. })),
        "a worker was dropped: {:#?}",
        c.seen
    );
    stop_expecting_clean_exits(c, 2);
}

/// One worker whose accept loop takes a connection every 50 ms.
fn slow_acceptor() -> MasterBuilder {
    MasterBuilder::new(tokio_worker())
        .args(["127.0.0.1:0", "slow-accept", "50"])
        .workers(1)
        .ack_timeout(Duration::from_millis(300))
}

/// Waits until the master counts `n` hand-offs taken (answered `Accepted`).
fn wait_taken(c: &Cluster, n: u64) {
    let deadline = Instant::now() + WAIT;
    while c.master().stats().expect("stats").taken < n {
        assert!(Instant::now() < deadline, "never {n} taken");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_slow_accept_loop_delays_no_answer_and_a_stop_serves_what_was_answered() {
    let _fds = shared_fds();
    // Forty connections at once, taken one per 50 ms: answered long before they are taken (an
    // answer later than 300 ms would get the worker dropped), and held like a listen backlog
    // would hold them, not refused (the only worker refusing would close them).
    let mut c = Cluster::start(slow_acceptor());
    let addr = inet(&c.wait_listening(1));
    let clients: Vec<_> = (0..40)
        .map(|_| std::thread::spawn(move || ask_worker(addr)))
        .collect();
    wait_taken(&c, 40);
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.refused, 0, "{stats:?}");
    // All forty answered and waiting in the inbox: the stop must serve them before the exit.
    c.master().shutdown().expect("shutdown");
    for h in clients {
        assert_eq!(h.join().expect("client").expect("served"), WorkerId(1));
    }
    c.wait_for(WAIT, |e| matches!(e, Event::Stopped { .. }));
    assert!(
        c.seen.iter().any(|e| matches!(
            e,
            Event::Exit {
                code: Some(0),
                exited_after_disconnect: true,
                ..
            }
        )),
        "{:#?}",
        c.seen
    );
    assert!(!c.seen.iter().any(|e| matches!(e, Event::Dropped { .. })));
    assert!(matches!(
        c.seen.last(),
        Some(Event::Stopped { clean: true })
    ));
    c.master.take().expect("master").wait().expect("clean stop");
}

#[test]
fn on_shutdown_in_flight_axum_requests_complete_and_workers_exit_0() {
    let _fds = shared_fds();
    for policy in [Policy::RoundRobin, Policy::ReusePort] {
        let mut c = Cluster::start(tokio_workers(2, policy).capture_output(true));
        let addr = inet(&c.wait_listening(2));
        let slow = slow_requests(addr, 4, 1000);
        wait_slow_begun(&mut c, 4);
        c.master().shutdown().expect("shutdown");
        for h in slow {
            let (status, _, body) = h.join().expect("client").expect("in-flight request served");
            assert_eq!((status, body.as_str()), (200, "slow hello\n"), "{policy:?}");
        }
        c.wait_for(WAIT, |e| matches!(e, Event::Stopped { .. }));
        let exits = c
            .seen
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Exit {
                        code: Some(0),
                        exited_after_disconnect: true,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(exits, 2, "{policy:?}: {:#?}", c.seen);
        assert!(matches!(
            c.seen.last(),
            Some(Event::Stopped { clean: true })
        ));
        c.master.take().expect("master").wait().expect("clean stop");
    }
}

#[test]
fn sigkill_of_a_tokio_worker_under_load_loses_nothing_the_master_held() {
    let _fds = shared_fds();
    let mut c = Cluster::start(tokio_workers(2, Policy::RoundRobin));
    let addr = inet(&c.wait_listening(2));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    const CLIENTS: usize = 4;
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                // Bounded: the test stops it, or 20 000 requests.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match http_get(addr, "/") {
                        Ok((200, ..)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let wait_ok = |n: usize| {
        let deadline = Instant::now() + WAIT;
        while ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "load stalled at {ok:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_ok(200);
    c.master().kill(WorkerId(1), libc::SIGKILL).expect("kill");
    // The slot restarts and its new worker serves again, under the same load.
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Listening { worker, .. } if worker.0 == 3),
    );
    let at_restart = ok.load(Ordering::Relaxed);
    wait_ok(at_restart + 200);
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.join().expect("client thread");
    }
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    // Only a connection the killed worker had taken can fail: at most one per client.
    let failed = failed.load(Ordering::Relaxed);
    assert!(failed <= CLIENTS, "{failed} requests failed; {stats:?}");
    c.stop();
}

#[test]
fn the_same_tokio_binary_runs_standalone() {
    let _fds = shared_fds();
    let mut child = Command::new(tokio_worker())
        .arg("127.0.0.1:0")
        .env_remove(cluster_core::env::WORKER_ID)
        .env_remove(cluster_core::env::CHANNEL_FD)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let child = KillOnDrop(child);
    // Kept open: the slow handler prints to it.
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert_eq!(
        http_get(addr, "/").expect("served"),
        (200, 0, "hello\n".to_owned())
    );
    assert_eq!(
        http_get(addr, "/slow/10").expect("served").2,
        "slow hello\n"
    );
    drop(child);
    drop(stdout);
}

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster_core::WorkerId;
use cluster_master::{Event, MasterBuilder, RestartPolicy};

use crate::util::*;

/// Waits (bounded) until the master reports `n` hand-offs in flight to `worker`.
fn wait_in_flight(c: &Cluster, worker: WorkerId, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let w = c.master().workers().expect("workers");
        if w.iter().any(|i| i.id == worker && i.in_flight >= n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never reached {n} in flight: {w:?}"
        );
        std::thread::yield_now();
    }
}

fn clients(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<std::thread::JoinHandle<std::io::Result<WorkerId>>> {
    (0..n)
        .map(|_| std::thread::spawn(move || ask_worker(addr)))
        .collect()
}

#[test]
fn sigkill_with_handoffs_in_flight_loses_no_connection() {
    let _fds = shared_fds();
    // Slot 0 takes hand-offs and never answers; slot 1 serves. No stall rule: the test needs
    // its whole window filled however slowly the clients come.
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "hold@0"])
            .workers(2)
            .window(4)
            .stall_after(None),
    );
    let addr = inet(&c.wait_listening(2));
    let stuck = WorkerId(1);
    let handles = clients(addr, 12);
    wait_in_flight(&c, stuck, 4);
    c.master().kill(stuck, libc::SIGKILL).expect("kill");
    let mut served_by = HashSet::new();
    for h in handles {
        served_by.insert(
            h.join()
                .expect("client thread")
                .expect("every connection answered"),
        );
    }
    assert!(!served_by.contains(&stuck));
    let stats = c.master().stats().expect("stats");
    assert_eq!(
        stats.requeued, 4,
        "the four held connections were re-queued: {stats:?}"
    );
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Fork { slot: 0, worker, .. } if worker.0 > 2),
    );
    c.stop();
}

#[test]
fn a_stuck_worker_is_dropped_after_the_ack_timeout_and_its_connections_served() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "hold@0"])
            .workers(2)
            .window(2)
            .ack_timeout(Duration::from_millis(300))
            .restart_policy(RestartPolicy {
                max_fast_crashes: 1000,
                ..RestartPolicy::default()
            }),
    );
    let addr = inet(&c.wait_listening(2));
    for h in clients(addr, 6) {
        h.join()
            .expect("client thread")
            .expect("answered despite the stuck worker");
    }
    let e = c.wait_for(WAIT, |e| matches!(e, Event::Dropped { .. }));
    assert!(
        matches!(&e, Event::Dropped { reason, .. } if reason.contains("unanswered")),
        "{e:?}"
    );
    c.stop();
}

#[test]
fn master_fd_count_returns_to_baseline_after_10000_connections() {
    let _fds = exclusive_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2),
    );
    let addr = inet(&c.wait_listening(2));
    for _ in 0..10 {
        ask_worker(addr).expect("warm-up");
    }
    let settle = |c: &Cluster, taken: u64| {
        let deadline = Instant::now() + WAIT;
        while c.master().stats().expect("stats").taken < taken {
            assert!(Instant::now() < deadline, "master never saw every answer");
            std::thread::yield_now();
        }
    };
    settle(&c, 10);
    let baseline = fd_snapshot();
    for i in 0..10_000 {
        ask_worker(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    settle(&c, 10_010);
    assert_eq!(
        fds_opened_since(&baseline),
        [],
        "the master closed its copy of every connection"
    );
    c.stop();
}

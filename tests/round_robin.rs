use std::collections::HashMap;
use std::time::Duration;

use cluster_core::WorkerId;
use cluster_master::{Event, MasterBuilder};

use crate::util::*;

fn rr(n: usize, mode: &str) -> MasterBuilder {
    MasterBuilder::new(raw_worker())
        .args(["tcp:127.0.0.1:0", mode])
        .workers(n)
}

#[test]
fn four_workers_share_one_port_and_split_evenly() {
    let _fds = shared_fds();
    let mut c = Cluster::start(rr(4, "serve"));
    let addr = inet(&c.wait_listening(4));
    // port 0 resolved once: every worker reported the same address.
    let ports: std::collections::HashSet<_> = c
        .seen
        .iter()
        .filter_map(|e| match e {
            Event::Listening { addr, .. } => Some(addr.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ports.len(), 1, "all workers share one port: {ports:?}");
    let mut split: HashMap<WorkerId, usize> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..1000 {
        let w = ask_worker(addr).expect("answered");
        order.push(w);
        *split.entry(w).or_default() += 1;
    }
    assert_eq!(split.len(), 4, "{split:?}");
    // Sequential clients are dealt one at a time around the ring of free workers, whatever
    // the window (the default here): a strict rotation, 250 each.
    let cycle = &order[..4];
    for (i, w) in order.iter().enumerate() {
        assert_eq!(*w, cycle[i % 4], "request {i} broke the rotation {cycle:?}");
    }
    assert!(split.values().all(|n| *n == 250), "{split:?}");
    c.stop();
}

/// A port held by this process, and one raw worker in `mode` asked to listen on it.
fn cluster_on_a_port_in_use(mode: &str) -> (std::net::TcpListener, u16, Cluster) {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let spec = format!("tcp:127.0.0.1:{port}");
    let c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args([spec.as_str(), mode])
            .capture_output(true),
    );
    (holder, port, c)
}

#[test]
fn eaddrinuse_reaches_the_worker_and_errors_its_slot_with_the_cause() {
    let _fds = shared_fds();
    let (_holder, port, mut c) = cluster_on_a_port_in_use("serve");
    c.wait_for(WAIT, |e| matches!(e, Event::Output { line, .. } if line == &format!("LISTEN_ERROR {}", libc::EADDRINUSE)));
    c.wait_for(WAIT, |e| matches!(e, Event::Exit { code: Some(3), .. }));
    // A restart would meet the same error: the slot errors at once, with the cause.
    let errored = c.wait_for(WAIT, |e| matches!(e, Event::SlotErrored { .. }));
    let want = format!("127.0.0.1:{port}: address already in use");
    assert!(
        matches!(&errored, Event::SlotErrored { reason, .. } if reason.contains(&want)),
        "{errored:?}"
    );
    assert!(
        !c.seen.iter().any(|e| matches!(e, Event::Restarting { .. })),
        "{:?}",
        c.seen
    );
    let master = c.master.take().expect("master");
    let stopped = master.wait();
    assert!(
        matches!(&stopped, Err(cluster_master::MasterError::AllSlotsErrored { last, .. }) if last.contains(&want)),
        "{stopped:?}"
    );
}

#[test]
fn a_failed_bind_is_not_kept_so_a_later_listen_binds_afresh() {
    let _fds = shared_fds();
    let (holder, port, mut c) = cluster_on_a_port_in_use("retry-listen");
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Output { line, .. } if line == "LISTEN_RETRYING"),
    );
    drop(holder);
    // The master did not keep the failed key: the worker's next listen binds for real.
    let addr = inet(&c.wait_listening(1));
    assert_eq!(addr.port(), port);
    ask_worker(addr).expect("served after the port was released");
    c.stop();
}

/// Runs one worker in `mode` (an "answer-in-fours" mode: four answers in one write, the first
/// ones held until a gate file goes), connects 16 clients, opens the gate once the master holds
/// all of them (four in flight, the rest queued, so every refill finds four waiting), and
/// checks that every client is served.
fn sixteen_served_in_fours(mode: &str) -> Cluster {
    let gate = Gate::closed(mode);
    // A window of four, as the frame counts below assume, and no stall rule, so that only the
    // window decides what goes out (a worker holding its answers until it has four is what
    // that rule is there to pass over).
    let mut c = Cluster::start(
        rr(1, &format!("{mode}:{}", gate.path().display()))
            .window(4)
            .stall_after(None),
    );
    let addr = inet(&c.wait_listening(1));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s
        })
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = c.master().stats().expect("stats");
        if s.accepted == 16 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never all accepted: {s:?}"
        );
        std::thread::yield_now();
    }
    gate.open();
    for mut s in clients {
        let mut greeting = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut greeting).expect("every client is served");
        assert!(n > 0, "every client is served");
    }
    c
}

#[test]
fn the_connections_that_refill_a_window_leave_in_one_frame() {
    let _fds = shared_fds();
    // One worker with a window of 4 that answers four at a time in one write: after its first
    // four, each refill of its window is one frame of four connections.
    let c = sixteen_served_in_fours("answer-in-fours");
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.handed_off, 16, "{stats:?}");
    // Four refills of four at most, plus however the first four were accepted (one to four
    // accept passes).
    assert!(stats.handoff_frames <= 7, "{stats:?}");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    // Four unanswered would be behind for a Node worker (tests/node_messages.rs); a native
    // one answers in batches, which a pause would not gather any better: never a pause.
    assert_eq!(stats.coalesced_pauses, 0, "{stats:?}");
    // Nor a wait as SCHED_BATCH, for the same reason.
    assert_eq!(stats.batch_waits, 0, "{stats:?}");
    assert_eq!(stats.loop_policy_switches, 0, "{stats:?}");
    c.stop();
}

#[test]
fn a_connection_a_worker_made_blocking_reaches_the_next_one_non_blocking() {
    let _fds = shared_fds();
    // Slot 0 clears O_NONBLOCK (shared by every holder of the open file) and refuses; the
    // master must set it again before the next worker, which relies on it.
    let mut c = Cluster::start(rr(2, "unblock-and-refuse@0"));
    let addr = inet(&c.wait_listening(2));
    for _ in 0..20 {
        ask_worker(addr).expect("served by the other worker, non-blocking on arrival");
    }
    let stats = c.master().stats().expect("stats");
    assert!(stats.refused >= 1, "{stats:?}");
    c.stop();
}

#[test]
fn an_answer_for_a_hand_off_not_sent_yet_loses_nothing() {
    let _fds = shared_fds();
    // The worker answers its first four and, in the same write, forges an answer for the
    // connection those answers make the master deal it next (not sent yet). Honouring it would
    // close the master's only copy before the hand-off goes out.
    let c = sixteen_served_in_fours("answer-in-fours-forging");
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    assert!(
        stats.stray_answers >= 1,
        "the forged answer is ignored: {stats:?}"
    );
    c.stop();
}

#[test]
fn a_refusing_worker_loses_no_connection() {
    let _fds = shared_fds();
    let mut c = Cluster::start(rr(2, "refuse@0"));
    let addr = inet(&c.wait_listening(2));
    let refuser = c
        .seen
        .iter()
        .find_map(|e| match e {
            Event::Fork {
                worker, slot: 0, ..
            } => Some(*worker),
            _ => None,
        })
        .expect("slot 0 forked");
    for _ in 0..100 {
        let w = ask_worker(addr).expect("every connection is served");
        assert_ne!(w, refuser, "the refusing worker never serves");
    }
    let stats = c.master().stats().expect("stats");
    assert!(stats.refused >= 1, "{stats:?}");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    c.stop();
}

#[test]
fn when_every_worker_refuses_the_connection_is_closed_not_hung() {
    let _fds = shared_fds();
    let mut c = Cluster::start(rr(2, "refuse"));
    let addr = inet(&c.wait_listening(2));
    let started = std::time::Instant::now();
    let r = ask_worker(addr);
    assert!(
        r.is_err(),
        "nobody serves, so the client sees a close: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "closed after the retry limit, not hung"
    );
    let stats = c.master().stats().expect("stats");
    assert!(stats.refused >= 2, "{stats:?}");
    assert_eq!(stats.closed_unserved, 1, "{stats:?}");
    c.stop();
}

#[test]
fn a_full_queue_stops_accepting_and_the_backlog_is_served_later() {
    let _fds = shared_fds();
    use std::time::Instant;
    let cfg = cluster_master::RoundRobinConfig {
        window: 1,
        max_pending: 4,
        ..Default::default()
    };
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "hold@0"])
            .round_robin(cfg)
            .ack_timeout(Duration::from_millis(500)),
    );
    let addr = inet(&c.wait_listening(1));
    let clients: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || ask_worker(addr)))
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = c.master().stats().expect("stats");
        if s.pending >= 4 {
            // One in flight to the stuck worker, four queued: the rest wait in the kernel.
            assert_eq!(s.accepted, 5, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "queue never filled: {s:?}");
        std::thread::yield_now();
    }
    // A healthy worker arrives (slot 1 serves); the stuck one is dropped at its ack timeout.
    c.master().fork().expect("fork");
    for h in clients {
        h.join()
            .expect("client")
            .expect("every queued and backlogged connection served");
    }
    c.stop();
}

#[test]
fn a_worker_that_closed_its_listener_gets_nothing_and_loses_nothing() {
    let _fds = shared_fds();
    // Slot 0 announces listening, then closes the server at once; hand-offs that raced the
    // close are refused with ListenerClosed and re-routed.
    let mut c = Cluster::start(rr(2, "close-listener@0"));
    let addr = inet(&c.wait_listening(2));
    let closer = WorkerId(1);
    for _ in 0..100 {
        let w = ask_worker(addr).expect("every connection is served");
        assert_ne!(w, closer, "a closed listener serves nothing");
    }
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    c.stop();
}

/// A worker that closes a server and then reads nothing more (an application dropping its last
/// blocking listener: the answerer thread stops with it) leaves the connection in flight to it
/// unanswered; the master re-queues it at the `Close`, so another worker serves it at once
/// rather than after the ack timeout.
#[test]
fn a_connection_in_flight_to_a_worker_that_closes_its_server_goes_to_another_at_once() {
    let _fds = shared_fds();
    let mut c = Cluster::start(rr(2, "close-and-go-quiet@0").ack_timeout(Duration::from_secs(120)));
    let addr = inet(&c.wait_listening(2));
    for _ in 0..4 {
        // ask_worker gives up after 10 s, far below the ack timeout.
        assert_eq!(ask_worker(addr).expect("served"), WorkerId(2));
    }
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.requeued, 1, "{stats:?}");
    // It would sleep on for 30 s, holding up the graceful stop.
    c.master().kill(WorkerId(1), libc::SIGKILL).expect("kill");
    c.stop();
}

/// The stall rule, with the default window (16) and `stall_after` (2 ms): a worker that takes
/// hand-offs and never answers holds the one client dealt to it, not a window's worth, when
/// clients come one at a time. Each client waits up to 5 s for its greeting, far beyond the 2 ms
/// (and beyond what a healthy worker takes on a loaded machine); only the held one waits it out.
#[test]
fn a_worker_that_stops_answering_holds_one_client_not_a_window() {
    let _fds = shared_fds();
    let mut c = Cluster::start(rr(2, "hold@0").ack_timeout(Duration::from_secs(120)));
    let addr = inet(&c.wait_listening(2));
    let stuck = WorkerId(1);
    let mut unanswered = 0;
    for _ in 0..12 {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut greeting = [0u8; 64];
        match std::io::Read::read(&mut s, &mut greeting) {
            Ok(n) if n > 0 => {}
            _ => unanswered += 1,
        }
    }
    // The ring deals one at a time, so the stuck worker's turn comes at the first or the
    // second client; after that its one hand-off is older than 2 ms.
    assert_eq!(unanswered, 1, "clients held by the stuck worker");
    let held = c
        .master()
        .workers()
        .expect("workers")
        .into_iter()
        .find(|w| w.id == stuck)
        .map(|w| w.in_flight);
    assert_eq!(held, Some(1));
    c.master().kill(stuck, libc::SIGKILL).expect("kill");
    c.stop();
}

use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};

const S: ServerId = ServerId(7);

fn w(n: u32) -> WorkerId {
    WorkerId(n)
}

fn cfg(window: usize, max_pending: usize, max_attempts: u32, timeout_ms: u64) -> RoundRobinConfig {
    RoundRobinConfig {
        window,
        max_pending,
        max_attempts,
        pending_timeout: Duration::from_millis(timeout_ms),
        stall_after: None,
    }
}

fn handle(c: RoundRobinConfig, workers: &[u32]) -> RoundRobinHandle<u64> {
    let mut h = RoundRobinHandle::new(S, c);
    let mut out = Vec::new();
    let t = Instant::now();
    for &n in workers {
        h.add(w(n), t, &mut out);
    }
    assert!(out.is_empty());
    h
}

/// Distributes `conn` and returns its id and the worker it went to at once, if any.
fn dist(h: &mut RoundRobinHandle<u64>, conn: u64, now: Instant) -> (ConnId, Option<WorkerId>) {
    let mut out = Vec::new();
    let id = h.distribute(conn, now, &mut out);
    match out.as_slice() {
        [] => (id, None),
        [Action::Handoff { worker, conn }] if *conn == id => (id, Some(*worker)),
        other => panic!("unexpected actions {other:?}"),
    }
}

fn handoff(worker: u32, conn: ConnId) -> Action<u64> {
    Action::Handoff {
        worker: w(worker),
        conn,
    }
}

#[test]
fn window_one_is_node_oldest_idle_first() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2, 3]);
    let mut out = Vec::new();
    let (a, wa) = dist(&mut h, 10, t);
    let (b, wb) = dist(&mut h, 11, t);
    let (c, wc) = dist(&mut h, 12, t);
    assert_eq!((wa, wb, wc), (Some(w(1)), Some(w(2)), Some(w(3))));
    assert_eq!(a.server(), S);
    let (d, wd) = dist(&mut h, 13, t);
    assert_eq!(wd, None, "every worker has its one hand-off in flight");
    assert_eq!(h.pending_len(), 1);

    assert_eq!(h.accepted(w(2), b, t, &mut out), Ok(11));
    assert_eq!(
        out,
        vec![handoff(2, d)],
        "the first worker to answer gets the queued conn"
    );
    out.clear();
    assert_eq!(h.accepted(w(3), c, t, &mut out), Ok(12));
    assert_eq!(h.accepted(w(1), a, t, &mut out), Ok(10));
    assert!(out.is_empty());
    // Idle since: w3, then w1; w2 is busy with d.
    assert_eq!(dist(&mut h, 14, t).1, Some(w(3)));
    assert_eq!(dist(&mut h, 15, t).1, Some(w(1)));
    assert_eq!(dist(&mut h, 16, t).1, None);
    assert_eq!(h.stats().handed_off, 6);
    assert_eq!(h.stats().accepted, 3);
}

#[test]
fn sequential_clients_rotate_one_at_a_time_whatever_the_window() {
    let t = Instant::now();
    let mut h = handle(cfg(4, 100, 8, 1000), &[1, 2, 3, 4]);
    let mut out = Vec::new();
    let mut order = Vec::new();
    for c in 0..10 {
        let (id, to) = dist(&mut h, c, t);
        let to = to.expect("every worker has room");
        order.push(to.0);
        // Each client is answered before the next one arrives, as with `curl` in a loop.
        assert_eq!(h.accepted(to, id, t, &mut out), Ok(c));
        assert!(out.is_empty());
    }
    assert_eq!(order, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]);
}

#[test]
fn a_burst_to_an_idle_cluster_reaches_distinct_workers_first() {
    let t = Instant::now();
    let mut h = handle(cfg(4, 100, 8, 1000), &[1, 2, 3]);
    let sent: Vec<u32> = (0..7)
        .map(|c| dist(&mut h, c, t).1.expect("room").0)
        .collect();
    assert_eq!(sent, [1, 2, 3, 1, 2, 3, 1]);
}

#[test]
fn a_full_worker_rejoins_at_the_back_of_the_ring() {
    let t = Instant::now();
    let mut h = handle(cfg(2, 100, 8, 1000), &[1, 2, 3]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    for c in 11..14 {
        dist(&mut h, c, t);
    }
    // Ring: 2, 3 (w1 is full with a and the fourth conn).
    assert_eq!(h.in_flight_to(w(1)), 2);
    assert_eq!(h.accepted(w(1), a, t, &mut out), Ok(10));
    assert_eq!(dist(&mut h, 14, t).1, Some(w(2)));
    assert_eq!(dist(&mut h, 15, t).1, Some(w(3)));
    assert_eq!(dist(&mut h, 16, t).1, Some(w(1)));
    assert_eq!(dist(&mut h, 17, t).1, None, "every window is full");
}

#[test]
fn oldest_unanswered_follows_each_hand_off() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(5);
    let t2 = t0 + Duration::from_millis(9);
    let mut h = handle(cfg(3, 100, 8, 1000), &[1]);
    let mut out = Vec::new();
    assert_eq!(h.oldest_unanswered(w(1)), None);
    let (a, _) = dist(&mut h, 10, t0);
    let (b, _) = dist(&mut h, 11, t1);
    let (c, _) = dist(&mut h, 12, t2);
    assert_eq!(h.oldest_unanswered(w(1)), Some(t0));
    // Answering the newer ones does not hide the oldest.
    h.accepted(w(1), c, t2, &mut out).unwrap();
    h.accepted(w(1), b, t2, &mut out).unwrap();
    assert_eq!(h.oldest_unanswered(w(1)), Some(t0));
    h.accepted(w(1), a, t2, &mut out).unwrap();
    assert_eq!(h.oldest_unanswered(w(1)), None);
    assert_eq!(h.oldest_unanswered(w(9)), None);
}

#[test]
fn window_limits_hand_offs_in_flight_per_worker() {
    let t = Instant::now();
    let mut h = handle(cfg(3, 100, 8, 1000), &[1]);
    let sent: Vec<_> = (0..5).map(|i| dist(&mut h, i, t).1).collect();
    assert_eq!(sent, [Some(w(1)), Some(w(1)), Some(w(1)), None, None]);
    assert_eq!(h.in_flight_to(w(1)), 3);
    assert_eq!(h.pending_len(), 2);
}

#[test]
fn refused_conn_goes_to_a_different_worker_and_does_not_block_others() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    let (b, _) = dist(&mut h, 11, t);
    h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert!(
        out.is_empty(),
        "w1 is free but refused a; w2 has not refused it yet"
    );
    assert_eq!(h.pending_len(), 1);
    let (c, wc) = dist(&mut h, 12, t);
    assert_eq!(
        wc,
        Some(w(1)),
        "the waiting retry must not block a fresh conn"
    );
    assert_eq!(h.accepted(w(2), b, t, &mut out), Ok(11));
    assert_eq!(out, vec![handoff(2, a)]);
    assert_eq!(h.accepted(w(1), c, t, &mut out), Ok(12));
    assert_eq!(h.stats().refused, 1);
}

#[test]
fn conn_refused_by_every_worker_may_go_back_to_a_refuser() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    h.refused(w(1), a, RefuseReason::FdLimit, t, &mut out)
        .unwrap();
    assert_eq!(out, vec![handoff(2, a)]);
    out.clear();
    h.refused(w(2), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert_eq!(out, vec![handoff(1, a)], "oldest idle refuser");
    assert_eq!(h.accepted(w(1), a, t, &mut out), Ok(10));
}

#[test]
fn permanent_refusal_retires_the_worker() {
    let t = Instant::now();
    let mut h = handle(cfg(2, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    // Dealt one at a time: a and b to w1, c to w2.
    let (a, wa) = dist(&mut h, 10, t);
    let (c, wc) = dist(&mut h, 12, t);
    let (b, wb) = dist(&mut h, 11, t);
    assert_eq!((wa, wc, wb), (Some(w(1)), Some(w(2)), Some(w(1))));
    h.refused(w(1), a, RefuseReason::ListenerClosed, t, &mut out)
        .unwrap();
    assert_eq!(out, vec![handoff(2, a)]);
    out.clear();
    assert_eq!((h.workers(), h.offering_workers()), (2, 1));
    assert_eq!(h.in_flight_to(w(1)), 1, "b is still in flight to w1");

    let (d, wd) = dist(&mut h, 13, t);
    assert_eq!(
        wd, None,
        "w1 has free slots but is no longer offered anything"
    );
    assert_eq!(h.accepted(w(1), b, t, &mut out), Ok(11));
    assert!(out.is_empty(), "no credit comes back to a retired worker");
    assert_eq!(h.accepted(w(2), c, t, &mut out), Ok(12));
    assert_eq!(out, vec![handoff(2, d)]);
    out.clear();
    h.remove(w(1), t, &mut out);
    assert!(out.is_empty());
    assert_eq!((h.workers(), h.offering_workers()), (1, 1));
}

#[test]
fn permanent_refusal_by_the_only_worker_queues_instead_of_bouncing() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    h.refused(w(1), a, RefuseReason::Draining, t, &mut out)
        .unwrap();
    assert!(out.is_empty());
    assert_eq!(h.pending_len(), 1);
    // It listened again: add re-enables it and the conn flows.
    h.add(w(1), t, &mut out);
    assert_eq!(out, vec![handoff(1, a)]);
    out.clear();
    h.add(w(1), t, &mut out);
    assert!(out.is_empty(), "a repeated add changes nothing");
    assert_eq!(h.in_flight_to(w(1)), 1);
    assert_eq!(dist(&mut h, 11, t).1, None, "window 1 is still respected");
}

#[test]
fn retire_stops_offers_and_may_unblock_a_refused_conn() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2, 3]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    let (b, _) = dist(&mut h, 11, t);
    dist(&mut h, 12, t);
    h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert!(
        out.is_empty(),
        "w2 and w3 have not refused a; it waits for them"
    );
    h.retire(w(2), t, &mut out);
    assert!(out.is_empty(), "w3 still has not refused a");
    h.retire(w(3), t, &mut out);
    assert_eq!(
        out,
        vec![handoff(1, a)],
        "w1 is now the only worker offered"
    );
    out.clear();
    assert_eq!(h.accepted(w(2), b, t, &mut out), Ok(11));
    assert!(out.is_empty(), "a retired worker gets no credit back");
    assert_eq!(
        (h.workers(), h.offering_workers(), h.in_flight_to(w(3))),
        (3, 1, 1)
    );
}

#[test]
fn retries_are_bounded() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 2, 1000), &[1]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert_eq!(out, vec![handoff(1, a)]);
    out.clear();
    h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert_eq!(
        out,
        vec![Action::Close {
            conn: 10,
            reason: CloseReason::RetriesExhausted
        }]
    );
    assert_eq!(h.conn(a), None);
    assert_eq!((h.pending_len(), h.in_flight_len()), (0, 0));
    assert_eq!(h.stats().closed(CloseReason::RetriesExhausted), 1);
    // The worker's credit came back.
    assert_eq!(dist(&mut h, 11, t).1, Some(w(1)));
}

#[test]
fn backpressure_has_hysteresis() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 4, 8, 1000), &[]);
    let mut out = Vec::new();
    for i in 0..3 {
        dist(&mut h, i, t);
    }
    assert!(h.accepting());
    dist(&mut h, 3, t);
    assert!(!h.accepting(), "pending reached max_pending");
    h.add(w(1), t, &mut out);
    let Some(Action::Handoff { conn, .. }) = out.pop() else {
        panic!("expected a hand-off");
    };
    assert_eq!(h.pending_len(), 3);
    assert!(!h.accepting(), "3 > 4/2: still off");
    h.accepted(w(1), conn, t, &mut out).unwrap();
    assert_eq!(h.pending_len(), 2);
    assert!(h.accepting(), "back on at max_pending/2");
    out.clear();
    h.close_all(&mut out);
    assert_eq!(
        dist(&mut h, 4, t).1,
        Some(w(1)),
        "close_all gave the credit back"
    );
    dist(&mut h, 5, t);
    dist(&mut h, 7, t);
    dist(&mut h, 6, t);
    assert_eq!(h.pending_len(), 3);
    assert!(h.accepting(), "on until max_pending again");
}

#[test]
fn queued_conns_expire_after_pending_timeout() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 5000), &[]);
    let mut out = Vec::new();
    assert_eq!(h.next_deadline(), None);
    let (a, _) = dist(&mut h, 10, t);
    let (b, _) = dist(&mut h, 11, t + Duration::from_secs(1));
    assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(5)));
    h.expire(t + Duration::from_millis(4999), &mut out);
    assert!(out.is_empty());
    h.expire(t + Duration::from_secs(5), &mut out);
    assert_eq!(
        out,
        vec![Action::Close {
            conn: 10,
            reason: CloseReason::QueueTimeout
        }]
    );
    assert_eq!(h.conn(a), None);
    assert_eq!(h.conn(b), Some(&11));
    assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(6)));
    out.clear();
    h.expire(t + Duration::from_secs(60), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(h.next_deadline(), None);
    assert_eq!(h.stats().closed_queue_timeout, 2);
}

#[test]
fn remove_requeues_in_flight_conns_oldest_first() {
    let t = Instant::now();
    let mut h = handle(cfg(2, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    // Dealt one at a time: a and b to w1, c and d to w2.
    let (a, wa) = dist(&mut h, 10, t);
    let (c, wc) = dist(&mut h, 12, t);
    let (b, wb) = dist(&mut h, 11, t);
    let (d, wd) = dist(&mut h, 13, t);
    assert_eq!(
        (wa, wc, wb, wd),
        (Some(w(1)), Some(w(2)), Some(w(1)), Some(w(2)))
    );
    let (e, we) = dist(&mut h, 14, t);
    assert_eq!(we, None);
    h.remove(w(1), t, &mut out);
    assert!(out.is_empty(), "w2 has no room");
    assert_eq!((h.pending_len(), h.in_flight_len()), (3, 2));
    assert_eq!(h.stats().requeued_on_remove, 2);
    assert_eq!(h.conn(a), Some(&10));
    h.accepted(w(2), c, t, &mut out).unwrap();
    h.accepted(w(2), d, t, &mut out).unwrap();
    assert_eq!(
        out,
        vec![handoff(2, a), handoff(2, b)],
        "stranded conns before fresh ones"
    );
    out.clear();
    h.accepted(w(2), a, t, &mut out).unwrap();
    assert_eq!(out, vec![handoff(2, e)]);
}

#[test]
fn remove_of_last_worker_keeps_conns_until_a_new_worker_or_the_deadline() {
    let t = Instant::now();
    let later = t + Duration::from_secs(3);
    let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    let (b, _) = dist(&mut h, 11, t);
    h.remove(w(1), later, &mut out);
    assert!(out.is_empty());
    assert_eq!((h.workers(), h.pending_len()), (0, 2));
    // b has waited since t; a re-entered the queue at `later` and gets a full timeout.
    assert_eq!(h.next_deadline(), Some(t + Duration::from_secs(1)));
    h.expire(later, &mut out);
    assert_eq!(
        out,
        vec![Action::Close {
            conn: 11,
            reason: CloseReason::QueueTimeout
        }]
    );
    out.clear();
    assert_eq!(h.next_deadline(), Some(later + Duration::from_secs(1)));
    h.add(w(2), t, &mut out);
    assert_eq!(out, vec![handoff(2, a)]);
    assert_eq!(h.conn(b), None);
}

#[test]
fn wrong_answers_are_errors_and_change_nothing() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    let (_, _) = dist(&mut h, 11, t);
    let (q, _) = dist(&mut h, 12, t);
    let unknown = ConnId::new(S, 999);
    let before = (
        h.stats().clone(),
        h.pending_len(),
        h.in_flight_len(),
        h.next_deadline(),
    );
    assert_eq!(
        h.accepted(w(1), unknown, t, &mut out),
        Err(HandleError::UnknownConn(unknown))
    );
    assert_eq!(
        h.accepted(w(2), a, t, &mut out),
        Err(HandleError::NotInFlightTo {
            conn: a,
            worker: w(2)
        })
    );
    assert_eq!(
        h.refused(w(1), q, RefuseReason::FdLost, t, &mut out),
        Err(HandleError::NotInFlightTo {
            conn: q,
            worker: w(1)
        })
    );
    assert_eq!(
        h.refused(w(9), a, RefuseReason::Draining, t, &mut out),
        Err(HandleError::NotInFlightTo {
            conn: a,
            worker: w(9)
        })
    );
    assert!(out.is_empty());
    let after = (
        h.stats().clone(),
        h.pending_len(),
        h.in_flight_len(),
        h.next_deadline(),
    );
    assert_eq!(before, after);
    assert_eq!(h.offering_workers(), 2);
    assert_eq!(h.accepted(w(1), a, t, &mut out), Ok(10));
    assert_eq!(
        h.accepted(w(1), a, t, &mut out),
        Err(HandleError::UnknownConn(a))
    );
}

#[test]
fn close_all_closes_queued_and_in_flight_conns() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1]);
    let mut out = Vec::new();
    let (a, _) = dist(&mut h, 10, t);
    dist(&mut h, 11, t);
    h.close_all(&mut out);
    let shutdown = |conn| Action::Close {
        conn,
        reason: CloseReason::Shutdown,
    };
    assert_eq!(out, vec![shutdown(11), shutdown(10)]);
    assert_eq!(
        (h.pending_len(), h.in_flight_len(), h.in_flight_to(w(1))),
        (0, 0, 0)
    );
    assert_eq!(h.next_deadline(), None);
    out.clear();
    assert_eq!(
        h.accepted(w(1), a, t, &mut out),
        Err(HandleError::UnknownConn(a))
    );
    assert_eq!(
        dist(&mut h, 12, t).1,
        Some(w(1)),
        "the worker's credit is back"
    );
}

#[test]
fn zero_config_values_are_raised_to_one() {
    let h = RoundRobinHandle::<u64>::new(S, cfg(0, 0, 0, 0));
    assert_eq!(h.config(), &cfg(1, 1, 1, 0));
    assert_eq!(h.server(), S);
}

#[test]
fn time_never_goes_backwards() {
    let t = Instant::now() + Duration::from_secs(10);
    let mut h = handle(cfg(1, 100, 8, 1000), &[]);
    dist(&mut h, 10, t);
    dist(&mut h, 11, t - Duration::from_secs(5));
    let mut out = Vec::new();
    h.expire(t + Duration::from_secs(1), &mut out);
    assert_eq!(
        out.len(),
        2,
        "the stale `now` was treated as the newest seen"
    );
}

// ---- property tests ----

const REASONS: [RefuseReason; 5] = [
    RefuseReason::ListenerClosed,
    RefuseReason::Draining,
    RefuseReason::MaxConnections,
    RefuseReason::FdLimit,
    RefuseReason::FdLost,
];

#[derive(Clone, Debug)]
enum Op {
    Add,
    Readd(usize),
    Retire(usize),
    Remove(usize),
    Distribute,
    Accept(usize, usize),
    Refuse(usize, usize, usize),
    Bogus(usize, usize, bool),
    Advance(u64),
    CloseAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Add),
        1 => any::<usize>().prop_map(Op::Readd),
        1 => any::<usize>().prop_map(Op::Retire),
        2 => any::<usize>().prop_map(Op::Remove),
        8 => Just(Op::Distribute),
        5 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Accept(a, b)),
        4 => (any::<usize>(), any::<usize>(), 0..REASONS.len())
            .prop_map(|(a, b, r)| Op::Refuse(a, b, r)),
        1 => (any::<usize>(), any::<usize>(), any::<bool>())
            .prop_map(|(a, b, c)| Op::Bogus(a, b, c)),
        3 => (0u64..60).prop_map(Op::Advance),
        1 => Just(Op::CloseAll),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Queued,
    InFlight(WorkerId),
    Accepted,
    Closed(CloseReason),
}

struct MConn {
    id: ConnId,
    st: St,
    /// When its latest hand-off went out.
    sent: Instant,
    attempts: u32,
    refused_by: Vec<WorkerId>,
    deadline: Instant,
}

/// What the handle must look like, tracked independently. The C of conn `i` is `i`.
struct Model {
    cfg: RoundRobinConfig,
    now: Instant,
    conns: Vec<MConn>,
    by_id: HashMap<ConnId, usize>,
    live: Vec<WorkerId>,
    offering: HashSet<WorkerId>,
    next_worker: u32,
    accepting: bool,
    returned: HashSet<u64>,
    /// The free ring as the rules say it must be: workers with room, next in line first.
    ring: VecDeque<WorkerId>,
}

impl Model {
    fn requeue(&mut self, i: usize) {
        let m = &mut self.conns[i];
        m.st = St::Queued;
        m.deadline = self.now + self.cfg.pending_timeout;
    }

    fn has_room(&self, worker: WorkerId) -> bool {
        self.offering.contains(&worker) && self.in_flight_of(worker).len() < self.cfg.window
    }

    /// The worker the ring rules pick for conn `i`: the first in the ring that may take it (for
    /// a conn that some offered worker has not refused yet, not a refuser) and is not stalled,
    /// or if all that may take it are stalled, the first of them.
    fn expected_worker(&self, i: usize) -> Option<WorkerId> {
        let refused_by = &self.conns[i].refused_by;
        let anyone = refused_by.is_empty() || self.offering.iter().all(|o| refused_by.contains(o));
        let mut fits = self
            .ring
            .iter()
            .copied()
            .filter(|w| anyone || !refused_by.contains(w))
            .peekable();
        let first = fits.peek().copied();
        fits.find(|w| !self.stalled(*w)).or(first)
    }

    /// Whether `worker`'s oldest unanswered hand-off went out `stall_after` ago or earlier.
    fn stalled(&self, worker: WorkerId) -> bool {
        let Some(limit) = self.cfg.stall_after else {
            return false;
        };
        self.in_flight_of(worker)
            .into_iter()
            .map(|i| self.conns[i].sent)
            .min()
            .is_some_and(|sent| self.now.saturating_duration_since(sent) >= limit)
    }

    fn in_flight_of(&self, worker: WorkerId) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| self.conns[i].st == St::InFlight(worker))
            .collect()
    }

    /// Checks and applies the actions the handle emitted for one step.
    fn apply(&mut self, out: Vec<Action<u64>>) {
        for action in out {
            match action {
                Action::Handoff { worker, conn } => {
                    let i = self.by_id[&conn];
                    assert_eq!(
                        Some(worker),
                        self.expected_worker(i),
                        "not the worker the free ring {:?} puts next",
                        self.ring
                    );
                    self.ring.retain(|x| *x != worker);
                    let offering = self.offering.clone();
                    let m = &mut self.conns[i];
                    assert_eq!(m.st, St::Queued, "hand-off of a conn that is not queued");
                    assert!(
                        offering.contains(&worker),
                        "hand-off to a worker not offered"
                    );
                    if m.refused_by.contains(&worker) {
                        assert!(
                            offering.iter().all(|o| m.refused_by.contains(o)),
                            "back to a refuser while another worker could take it"
                        );
                    }
                    m.attempts += 1;
                    assert!(m.attempts <= self.cfg.max_attempts);
                    m.st = St::InFlight(worker);
                    m.sent = self.now;
                    if self.has_room(worker) {
                        self.ring.push_back(worker);
                    }
                }
                Action::Close { conn, reason } => {
                    assert!(self.returned.insert(conn), "conn {conn} returned twice");
                    let m = &mut self.conns[usize::try_from(conn).unwrap()];
                    match reason {
                        CloseReason::QueueTimeout => {
                            assert_eq!(m.st, St::Queued);
                            assert!(m.deadline <= self.now);
                        }
                        CloseReason::RetriesExhausted => {
                            assert_eq!(m.st, St::Queued);
                            assert_eq!(m.attempts, self.cfg.max_attempts);
                        }
                        CloseReason::Shutdown => {
                            assert!(matches!(m.st, St::Queued | St::InFlight(_)));
                        }
                    }
                    m.st = St::Closed(reason);
                }
            }
        }
    }

    fn check(&mut self, h: &RoundRobinHandle<u64>) {
        let mut pending = 0;
        let mut per_worker: HashMap<WorkerId, usize> = HashMap::new();
        let mut deadline: Option<Instant> = None;
        let mut accepted = 0;
        let mut closed: HashMap<CloseReason, u64> = HashMap::new();
        for (i, m) in self.conns.iter().enumerate() {
            let c = u64::try_from(i).unwrap();
            match m.st {
                St::Queued => {
                    pending += 1;
                    deadline = Some(deadline.map_or(m.deadline, |d| d.min(m.deadline)));
                    assert_eq!(h.conn(m.id), Some(&c));
                }
                St::InFlight(worker) => {
                    assert!(self.live.contains(&worker));
                    *per_worker.entry(worker).or_default() += 1;
                    assert_eq!(h.conn(m.id), Some(&c));
                }
                St::Accepted => {
                    accepted += 1;
                    assert_eq!(h.conn(m.id), None);
                }
                St::Closed(reason) => {
                    *closed.entry(reason).or_default() += 1;
                    assert_eq!(h.conn(m.id), None);
                }
            }
        }
        assert_eq!(h.pending_len(), pending);
        assert_eq!(h.in_flight_len(), per_worker.values().sum::<usize>());
        for &worker in &self.live {
            let n = per_worker.get(&worker).copied().unwrap_or(0);
            assert_eq!(h.in_flight_to(worker), n);
            assert!(n <= self.cfg.window);
        }
        assert_eq!(h.workers(), self.live.len());
        assert_eq!(h.offering_workers(), self.offering.len());
        assert_eq!(h.next_deadline(), deadline);

        if pending >= self.cfg.max_pending {
            self.accepting = false;
        } else if pending <= self.cfg.max_pending / 2 {
            self.accepting = true;
        }
        assert_eq!(h.accepting(), self.accepting);

        // Work conservation: a queued conn may wait beside a free slot only when that
        // worker refused it and some other offered worker has not.
        if pending <= SCAN_LIMIT {
            for m in self.conns.iter().filter(|m| m.st == St::Queued) {
                for &worker in &self.offering {
                    if per_worker.get(&worker).copied().unwrap_or(0) < self.cfg.window {
                        assert!(m.refused_by.contains(&worker), "idle worker beside a conn");
                        assert!(!self.offering.iter().all(|o| m.refused_by.contains(o)));
                    }
                }
            }
        }

        let stats = h.stats();
        assert_eq!(stats.distributed, self.conns.len() as u64);
        assert_eq!(stats.accepted, accepted);
        for reason in [
            CloseReason::RetriesExhausted,
            CloseReason::QueueTimeout,
            CloseReason::Shutdown,
        ] {
            assert_eq!(
                stats.closed(reason),
                closed.get(&reason).copied().unwrap_or(0)
            );
        }
    }
}

fn snapshot(
    h: &RoundRobinHandle<u64>,
) -> (
    RoundRobinStats,
    usize,
    usize,
    bool,
    Option<Instant>,
    usize,
    usize,
) {
    (
        h.stats().clone(),
        h.pending_len(),
        h.in_flight_len(),
        h.accepting(),
        h.next_deadline(),
        h.workers(),
        h.offering_workers(),
    )
}

fn run_model(c: RoundRobinConfig, ops: &[Op]) {
    let start = Instant::now();
    let mut h = RoundRobinHandle::<u64>::new(S, c);
    let mut m = Model {
        cfg: *h.config(),
        now: start,
        conns: Vec::new(),
        by_id: HashMap::new(),
        live: Vec::new(),
        offering: HashSet::new(),
        next_worker: 1,
        accepting: true,
        returned: HashSet::new(),
        ring: VecDeque::new(),
    };
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Add => {
                let worker = w(m.next_worker);
                m.next_worker += 1;
                m.live.push(worker);
                m.offering.insert(worker);
                if m.has_room(worker) {
                    m.ring.push_back(worker);
                }
                h.add(worker, m.now, &mut out);
            }
            Op::Readd(i) => {
                if m.live.is_empty() {
                    continue;
                }
                let worker = m.live[i % m.live.len()];
                if m.offering.insert(worker) && m.has_room(worker) {
                    m.ring.push_back(worker);
                }
                h.add(worker, m.now, &mut out);
            }
            Op::Retire(i) => {
                if m.live.is_empty() {
                    continue;
                }
                let worker = m.live[i % m.live.len()];
                m.offering.remove(&worker);
                m.ring.retain(|x| *x != worker);
                h.retire(worker, m.now, &mut out);
            }
            Op::Remove(i) => {
                if m.live.is_empty() {
                    continue;
                }
                let worker = m.live.remove(i % m.live.len());
                m.offering.remove(&worker);
                m.ring.retain(|x| *x != worker);
                for j in m.in_flight_of(worker) {
                    m.requeue(j);
                }
                h.remove(worker, m.now, &mut out);
            }
            Op::Distribute => {
                let c = m.conns.len() as u64;
                let id = h.distribute(c, m.now, &mut out);
                assert_eq!(id.server(), S);
                assert!(m.by_id.insert(id, m.conns.len()).is_none(), "id reused");
                m.conns.push(MConn {
                    id,
                    st: St::Queued,
                    sent: m.now,
                    attempts: 0,
                    refused_by: Vec::new(),
                    deadline: m.now + m.cfg.pending_timeout,
                });
            }
            Op::Accept(i, j) => {
                if m.live.is_empty() {
                    continue;
                }
                let worker = m.live[i % m.live.len()];
                let mine = m.in_flight_of(worker);
                if mine.is_empty() {
                    continue;
                }
                let k = mine[j % mine.len()];
                let c = h.accepted(worker, m.conns[k].id, m.now, &mut out).unwrap();
                assert_eq!(c, k as u64);
                assert!(m.returned.insert(c), "conn {c} returned twice");
                let was_full = !m.has_room(worker);
                m.conns[k].st = St::Accepted;
                if was_full && m.has_room(worker) {
                    m.ring.push_back(worker);
                }
            }
            Op::Refuse(i, j, r) => {
                if m.live.is_empty() {
                    continue;
                }
                let worker = m.live[i % m.live.len()];
                let mine = m.in_flight_of(worker);
                if mine.is_empty() {
                    continue;
                }
                let k = mine[j % mine.len()];
                let reason = REASONS[r];
                if reason.is_permanent() {
                    m.offering.remove(&worker);
                    m.ring.retain(|x| *x != worker);
                }
                if !m.conns[k].refused_by.contains(&worker) {
                    m.conns[k].refused_by.push(worker);
                }
                let was_full = !m.has_room(worker);
                m.requeue(k);
                if was_full && m.has_room(worker) {
                    m.ring.push_back(worker);
                }
                h.refused(worker, m.conns[k].id, reason, m.now, &mut out)
                    .unwrap();
            }
            Op::Bogus(i, j, accept) => {
                let worker = if m.live.is_empty() {
                    w(u32::MAX)
                } else {
                    m.live[i % m.live.len()]
                };
                let (conn, expected) = if m.conns.is_empty() {
                    let id = ConnId::new(S, 1 << 30);
                    (id, HandleError::UnknownConn(id))
                } else {
                    let mc = &m.conns[j % m.conns.len()];
                    match mc.st {
                        St::InFlight(x) if x == worker => continue,
                        St::Queued | St::InFlight(_) => (
                            mc.id,
                            HandleError::NotInFlightTo {
                                conn: mc.id,
                                worker,
                            },
                        ),
                        St::Accepted | St::Closed(_) => (mc.id, HandleError::UnknownConn(mc.id)),
                    }
                };
                let before = snapshot(&h);
                let got = if accept {
                    h.accepted(worker, conn, m.now, &mut out).map(|_| ())
                } else {
                    h.refused(worker, conn, RefuseReason::Draining, m.now, &mut out)
                };
                assert_eq!(got, Err(expected));
                assert!(out.is_empty());
                assert_eq!(snapshot(&h), before);
            }
            Op::Advance(ms) => {
                m.now += Duration::from_millis(ms);
                h.expire(m.now, &mut out);
            }
            Op::CloseAll => {
                // In id order (the order conns were distributed), each in-flight conn frees
                // room in its worker's window.
                let mut held: HashMap<WorkerId, usize> = HashMap::new();
                for c in &m.conns {
                    if let St::InFlight(x) = c.st {
                        *held.entry(x).or_default() += 1;
                    }
                }
                for c in 0..m.conns.len() {
                    if let St::InFlight(x) = m.conns[c].st {
                        let n = held.entry(x).or_default();
                        let was_full = *n >= m.cfg.window;
                        *n -= 1;
                        if was_full && m.offering.contains(&x) {
                            m.ring.push_back(x);
                        }
                    }
                }
                h.close_all(&mut out);
            }
        }
        m.apply(std::mem::take(&mut out));
        if let Op::Advance(_) = op {
            assert!(
                !m.conns
                    .iter()
                    .any(|c| c.st == St::Queued && c.deadline <= m.now),
                "a due conn survived expire"
            );
        }
        if let Op::CloseAll = op {
            assert!(
                m.conns
                    .iter()
                    .all(|c| matches!(c.st, St::Accepted | St::Closed(_)))
            );
        }
        m.check(&h);
    }
}

proptest! {
    #[test]
    fn model(
        window in 1usize..4,
        max_pending in 1usize..10,
        max_attempts in 1u32..5,
        timeout_ms in 1u64..100,
        stall_ms in prop::option::of(1u64..80),
        ops in prop::collection::vec(op(), 0..200),
    ) {
        let c = RoundRobinConfig {
            stall_after: stall_ms.map(Duration::from_millis),
            ..cfg(window, max_pending, max_attempts, timeout_ms)
        };
        run_model(c, &ops);
    }

    #[test]
    fn instant_acceptors_get_counts_within_one(
        n in 1u32..=6,
        window in 1usize..6,
        k in 0u64..300,
    ) {
        let t = Instant::now();
        let workers: Vec<u32> = (1..=n).collect();
        let mut h = handle(cfg(window, 1024, 8, 1000), &workers);
        let mut counts: HashMap<WorkerId, usize> = HashMap::new();
        let mut out = Vec::new();
        let mut answers = Vec::new();
        for c in 0..k {
            h.distribute(c, t, &mut out);
            while let Some(action) = out.pop() {
                match action {
                    Action::Handoff { worker, conn } => answers.push((worker, conn)),
                    Action::Close { .. } => prop_assert!(false, "nothing should close"),
                }
                while let Some((worker, conn)) = answers.pop() {
                    prop_assert_eq!(h.accepted(worker, conn, t, &mut out), Ok(h_conn_value(conn)));
                    *counts.entry(worker).or_default() += 1;
                }
            }
        }
        prop_assert_eq!(counts.values().sum::<usize>() as u64, k);
        let max = workers.iter().map(|&x| counts.get(&w(x)).copied().unwrap_or(0)).max().unwrap_or(0);
        let min = workers.iter().map(|&x| counts.get(&w(x)).copied().unwrap_or(0)).min().unwrap_or(0);
        prop_assert!(max - min <= 1, "counts {:?} window {}", counts, window);
    }
}

/// Conn `c` gets counter `c` when ids are never skipped, so its id maps back to it.
fn h_conn_value(conn: ConnId) -> u64 {
    conn.0 & ((1 << ConnId::COUNTER_BITS) - 1)
}

#[test]
fn a_hand_off_stands_only_while_its_worker_holds_the_connection() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    let (a, wa) = dist(&mut h, 10, t);
    assert_eq!(wa, Some(w(1)));
    assert_eq!(h.in_flight(a, w(1)), Some(&10));
    assert_eq!(h.in_flight(a, w(2)), None, "not to another worker");
    // Worker 1 leaves before the hand-off was carried out: the connection is re-queued and
    // dealt to worker 2, and the late hand-off to worker 1 no longer stands.
    h.remove(w(1), t, &mut out);
    assert_eq!(out, vec![handoff(2, a)]);
    assert_eq!(h.in_flight(a, w(1)), None);
    assert_eq!(h.in_flight(a, w(2)), Some(&10));
    out.clear();
    assert_eq!(h.accepted(w(2), a, t, &mut out), Ok(10));
    assert_eq!(h.in_flight(a, w(2)), None, "answered: gone");
}

#[test]
fn handoffs_counts_every_hand_off_of_a_connection() {
    let t = Instant::now();
    let mut h = handle(cfg(1, 100, 8, 1000), &[1, 2]);
    let mut out = Vec::new();
    let (a, wa) = dist(&mut h, 10, t);
    assert_eq!(wa, Some(w(1)));
    assert_eq!(h.handoffs(a), 1);
    h.refused(w(1), a, RefuseReason::MaxConnections, t, &mut out)
        .unwrap();
    assert_eq!(out, vec![handoff(2, a)]);
    assert_eq!(h.handoffs(a), 2, "a re-delivery");
    out.clear();
    h.accepted(w(2), a, t, &mut out).unwrap();
    assert_eq!(h.handoffs(a), 0, "gone");
}

fn stalling(window: usize, stall_ms: u64) -> RoundRobinConfig {
    RoundRobinConfig {
        stall_after: Some(Duration::from_millis(stall_ms)),
        ..cfg(window, 1024, 8, 10_000)
    }
}

#[test]
fn a_worker_that_stops_answering_is_skipped_until_it_answers() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    let mut h = handle(stalling(16, 2), &[1, 2]);
    let (silent, to) = dist(&mut h, 0, t);
    assert_eq!(to, Some(w(1)));
    let (c1, to) = dist(&mut h, 1, t);
    assert_eq!(to, Some(w(2)));
    let mut out = Vec::new();
    assert_eq!(h.accepted(w(2), c1, t, &mut out), Ok(1));
    // Still young: worker 1 has its turn, window room to spare.
    assert_eq!(dist(&mut h, 2, t + ms(1)).1, Some(w(1)));
    // Its oldest hand-off is 2 ms old now: worker 2 gets everything, in turn or not.
    for c in 3..10 {
        let (id, to) = dist(&mut h, c, t + ms(2));
        assert_eq!(to, Some(w(2)), "conn {c}");
        assert_eq!(h.accepted(w(2), id, t + ms(2), &mut out), Ok(c));
    }
    assert_eq!(h.in_flight_to(w(1)), 2);
    // The answer to the oldest leaves one sent at 1 ms: still stalled at 4 ms.
    assert_eq!(h.accepted(w(1), silent, t + ms(4), &mut out), Ok(0));
    assert!(out.is_empty());
    let (id, to) = dist(&mut h, 10, t + ms(4));
    assert_eq!(to, Some(w(2)));
    assert_eq!(h.accepted(w(2), id, t + ms(4), &mut out), Ok(10));
    // Answered up to date, it is back where it was in the ring: next in line.
    let (_, second) = h
        .workers
        .get(&w(1))
        .and_then(|s| s.unanswered.first().copied())
        .expect("one left");
    assert_eq!(second, t + ms(1));
    let left = ConnId::new(S, 2);
    assert_eq!(h.accepted(w(1), left, t + ms(4), &mut out), Ok(2));
    assert_eq!(dist(&mut h, 11, t + ms(4)).1, Some(w(1)));
}

#[test]
fn when_every_worker_is_stalled_the_windows_bound_what_goes_out() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    // One worker: nobody else could take its connections, and queued they would only expire.
    let mut h = handle(stalling(3, 2), &[1]);
    dist(&mut h, 0, t);
    assert_eq!(dist(&mut h, 1, t + ms(3)).1, Some(w(1)));
    assert_eq!(dist(&mut h, 2, t + ms(3)).1, Some(w(1)));
    assert_eq!(dist(&mut h, 3, t + ms(3)).1, None, "window full");
    // Two stalled workers: the ring's own order again, front first.
    let mut h = handle(stalling(16, 2), &[1, 2]);
    assert_eq!(dist(&mut h, 0, t).1, Some(w(1)));
    assert_eq!(dist(&mut h, 1, t).1, Some(w(2)));
    for (c, to) in [(2, 1), (3, 2), (4, 1)] {
        assert_eq!(dist(&mut h, c, t + ms(3)).1, Some(w(to)), "conn {c}");
    }
}

#[test]
fn a_retried_connection_skips_a_stalled_worker_too() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    let mut h = handle(stalling(16, 2), &[1, 2, 3]);
    let (_, to) = dist(&mut h, 0, t);
    assert_eq!(to, Some(w(1)));
    let (c1, to) = dist(&mut h, 1, t);
    assert_eq!(to, Some(w(2)));
    // Worker 1 stalls; worker 2 refuses conn 1 at 3 ms: it goes to worker 3, not to the
    // stalled worker 1 ahead of it in the ring.
    let mut out = Vec::new();
    h.refused(w(2), c1, RefuseReason::MaxConnections, t + ms(3), &mut out)
        .expect("in flight");
    assert_eq!(out, vec![handoff(3, c1)]);
}

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use cluster_master::{Event, MasterBuilder};

use crate::util::*;

#[test]
fn garbage_on_the_channel_drops_that_worker_only() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "garbage-after-3@0"])
            .workers(2)
            .restart_policy(cluster_master::RestartPolicy {
                max_fast_crashes: 1000,
                ..Default::default()
            }),
    );
    let addr = inet(&c.wait_listening(2));
    // Every connection is answered even while workers turn hostile and are replaced.
    let mut served = 0;
    for _ in 0..40 {
        if ask_worker(addr).is_ok() {
            served += 1;
        }
    }
    let dropped = c.wait_for(WAIT, |e| matches!(e, Event::Dropped { .. }));
    assert!(
        matches!(&dropped, Event::Dropped { reason, .. } if reason.contains("malformed")),
        "{dropped:?}"
    );
    assert_eq!(
        served, 40,
        "no connection lost while hostile workers were dropped"
    );
    // The dropped slot comes back with a new worker.
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Fork { worker, slot: 0, .. } if worker.0 > 2),
    );
    c.stop();
}

fn dropped_for(mode: &str, builder: impl FnOnce(MasterBuilder) -> MasterBuilder) -> String {
    let mut c = Cluster::start(builder(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0".to_owned(), format!("{mode}@0")])
            .workers(2),
    ));
    // Dropped first: a worker whose bad frame comes right after `Listening` may be dropped
    // before the test sees two listening workers, so waiting for two could wait for ever.
    let e = c.wait_for(WAIT, |e| matches!(e, Event::Dropped { .. }));
    let addr = inet(&c.wait_listening(1));
    // The other worker keeps serving.
    for _ in 0..10 {
        ask_worker(addr).expect("served by the healthy worker");
    }
    c.stop();
    match e {
        Event::Dropped { reason, .. } => reason,
        _ => unreachable!(),
    }
}

#[test]
fn a_worker_sending_an_fd_is_dropped() {
    let _fds = shared_fds();
    let reason = dropped_for("send-fd", |b| b);
    assert!(reason.contains("fds where none are accepted"), "{reason}");
}

#[test]
fn a_frame_over_the_cap_drops_the_worker() {
    let _fds = shared_fds();
    let reason = dropped_for("oversize", |b| b.max_frame(4096));
    assert!(reason.contains("exceeds the cap"), "{reason}");
}

/// Issue 9: a worker answers a hand-off and, in the same write, sends a frame with an fd (which
/// a master never takes from a worker). The answer must count: the connection stays with the
/// worker that took it and is not handed to a second one when the violator is dropped.
#[test]
fn an_answer_in_the_same_read_as_a_violation_is_honoured() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "answer-then-fd@0"])
            .workers(2)
            .window(1),
    );
    let addr = inet(&c.wait_listening(2));
    // With one credit per worker, two connections in a row go to two different workers, so
    // one of them reaches slot 0; one that goes to the healthy worker is served normally.
    let mut held = None;
    for _ in 0..2 {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("first line");
        if line.starts_with("held by worker") {
            held = Some((r, line));
            break;
        }
        assert!(line.starts_with("worker "), "{line:?}");
        let _ = r.get_mut().write_all(b"bye");
    }
    let (mut client, line) = held.expect("slot 0 took one of two connections");
    let e = c.wait_for(WAIT, |e| matches!(e, Event::Dropped { .. }));
    let Event::Dropped { worker, reason } = &e else {
        unreachable!()
    };
    assert!(reason.contains("fds where none are accepted"), "{e:?}");
    // Once its exit is reported the master has settled everything it had in flight.
    let worker = *worker;
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Exit { worker: w, .. } if *w == worker),
    );
    // The violator is dead, which closed its copy; the master closed its own on `Accepted`.
    // So the client sees the end of the stream, not a second worker's greeting.
    let mut next = String::new();
    client
        .read_line(&mut next)
        .expect("EOF once the violator is gone");
    assert_eq!(next, "", "after {line:?} the connection was served again");
    let stats = c.master().stats().expect("stats");
    assert_eq!(stats.requeued, 0, "{stats:?}");
    assert_eq!(stats.closed_unserved, 0, "{stats:?}");
    c.stop();
}

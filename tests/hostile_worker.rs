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
    // Dropped first: a worker whose `Listening` and bad frame arrive in one read is dropped
    // before its `Listening` is seen (a read bringing forbidden fds is refused whole), so
    // waiting for two listening workers could wait for ever.
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

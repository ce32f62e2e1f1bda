use std::time::Duration;

use cluster_core::WorkerId;
use cluster_master::{Event, MasterBuilder, MasterError, RestartPolicy};

use crate::util::*;

fn pos(seen: &[Event], pred: impl Fn(&Event) -> bool) -> usize {
    seen.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("event missing from {seen:#?}"))
}

#[test]
fn events_come_in_node_order_and_shutdown_is_not_a_crash() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(1),
    );
    c.wait_listening(1);
    c.master().shutdown().expect("shutdown");
    c.wait_for(WAIT, |e| matches!(e, Event::Stopped { .. }));
    let w = WorkerId(1);
    let fork = pos(
        &c.seen,
        |e| matches!(e, Event::Fork { worker, .. } if *worker == w),
    );
    let online = pos(
        &c.seen,
        |e| matches!(e, Event::Online { worker } if *worker == w),
    );
    let listening = pos(
        &c.seen,
        |e| matches!(e, Event::Listening { worker, .. } if *worker == w),
    );
    let disconnect = pos(
        &c.seen,
        |e| matches!(e, Event::Disconnect { worker } if *worker == w),
    );
    let exit = pos(
        &c.seen,
        |e| matches!(e, Event::Exit { worker, .. } if *worker == w),
    );
    assert!(fork < online && online < listening && listening < disconnect && disconnect < exit);
    assert!(matches!(
        c.seen[exit],
        Event::Exit {
            exited_after_disconnect: true,
            code: Some(0),
            ..
        }
    ));
    assert!(!c.seen.iter().any(|e| matches!(e, Event::Restarting { .. })));
    assert!(matches!(
        c.seen.last(),
        Some(Event::Stopped { clean: true })
    ));
    c.master.take().expect("master").wait().expect("clean stop");
}

#[test]
fn a_crash_is_restarted_and_marked_as_a_crash() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(1),
    );
    c.wait_listening(1);
    c.master().kill(WorkerId(1), libc::SIGKILL).expect("kill");
    let exit = c.wait_for(WAIT, |e| matches!(e, Event::Exit { .. }));
    assert!(
        matches!(
            exit,
            Event::Exit {
                signal: Some(9),
                exited_after_disconnect: false,
                ..
            }
        ),
        "{exit:?}"
    );
    c.wait_for(WAIT, |e| matches!(e, Event::Restarting { slot: 0, .. }));
    c.wait_for(WAIT, |e| {
        matches!(
            e,
            Event::Listening {
                worker: WorkerId(2),
                ..
            }
        )
    });
    c.stop();
}

#[test]
fn a_program_that_exits_at_once_ends_errored_not_in_a_restart_loop() {
    let _fds = shared_fds();
    let policy = RestartPolicy {
        initial_delay: Duration::from_millis(10),
        ..RestartPolicy::default()
    };
    let mut c = Cluster::start(
        MasterBuilder::new("/bin/false")
            .workers(2)
            .restart_policy(policy),
    );
    c.wait_for(WAIT, |e| matches!(e, Event::Stopped { clean: false }));
    let errored = c
        .seen
        .iter()
        .filter(|e| matches!(e, Event::SlotErrored { .. }))
        .count();
    assert_eq!(errored, 2);
    let forks = c
        .seen
        .iter()
        .filter(|e| matches!(e, Event::Fork { .. }))
        .count();
    assert_eq!(forks, 10, "five tries per slot, then it gives up");
    let result = c.master.take().expect("master").wait();
    assert!(
        matches!(result, Err(MasterError::AllSlotsErrored { slots: 2, .. })),
        "{result:?}"
    );
}

#[test]
fn a_missing_program_is_reported_not_retried_forever() {
    let _fds = shared_fds();
    let policy = RestartPolicy {
        initial_delay: Duration::from_millis(5),
        ..RestartPolicy::default()
    };
    let mut c = Cluster::start(MasterBuilder::new("/nonexistent/worker").restart_policy(policy));
    let e = c.wait_for(WAIT, |e| matches!(e, Event::SlotErrored { .. }));
    assert!(
        matches!(&e, Event::SlotErrored { reason, .. } if reason.contains("spawn")),
        "{e:?}"
    );
    let result = c.master.take().expect("master").wait();
    assert!(
        matches!(result, Err(MasterError::AllSlotsErrored { .. })),
        "{result:?}"
    );
}

#[test]
fn rolling_reload_replaces_every_worker_after_its_successor_listens() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2),
    );
    let addr = inet(&c.wait_listening(2));
    c.master().reload().expect("reload");
    c.wait_for(WAIT, |e| matches!(e, Event::ReloadDone));
    // Each old worker was disconnected only after a new one listened.
    for old in [WorkerId(1), WorkerId(2)] {
        let is_exit = |e: &Event| matches!(e, Event::Exit { worker, .. } if *worker == old);
        let gone = match c.seen.iter().find(|e| is_exit(e)) {
            Some(e) => e.clone(),
            None => c.wait_for(WAIT, is_exit),
        };
        assert!(
            matches!(
                gone,
                Event::Exit {
                    exited_after_disconnect: true,
                    ..
                }
            ),
            "{gone:?}"
        );
    }
    let first_new_listen = pos(
        &c.seen,
        |e| matches!(e, Event::Listening { worker, .. } if worker.0 > 2),
    );
    let first_old_disconnect = pos(
        &c.seen,
        |e| matches!(e, Event::Disconnect { worker } if worker.0 <= 2),
    );
    assert!(first_new_listen < first_old_disconnect);
    let ids: Vec<WorkerId> = c
        .master()
        .workers()
        .expect("workers")
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, [WorkerId(3), WorkerId(4)]);
    for _ in 0..20 {
        let w = ask_worker(addr).expect("served after reload");
        assert!(w.0 > 2, "only new workers serve: {w:?}");
    }
    c.stop();
}

#[test]
fn a_reload_whose_new_worker_crashes_keeps_the_old_ones() {
    let _fds = shared_fds();
    let flag = std::env::temp_dir().join(format!("cluster-rs-reload-fail-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let mode = format!("fail-if-exists:{}", flag.display());
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", mode.as_str()])
            .workers(2),
    );
    let addr = inet(&c.wait_listening(2));
    std::fs::write(&flag, b"x").expect("flag");
    c.master().reload().expect("reload");
    let e = c.wait_for(WAIT, |e| matches!(e, Event::ReloadFailed { .. }));
    assert!(
        matches!(&e, Event::ReloadFailed { reason } if reason.contains("before listening")),
        "{e:?}"
    );
    let _ = std::fs::remove_file(&flag);
    let ids: Vec<WorkerId> = c
        .master()
        .workers()
        .expect("workers")
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, [WorkerId(1), WorkerId(2)], "the old workers stay");
    ask_worker(addr).expect("still served");
    c.stop();
}

#[test]
fn a_reload_of_a_slot_waiting_to_restart_leaves_one_worker_there() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2)
            .restart_policy(RestartPolicy {
                initial_delay: Duration::from_millis(300),
                jitter: 0.0,
                ..Default::default()
            }),
    );
    let addr = inet(&c.wait_listening(2));
    c.master().kill(WorkerId(2), libc::SIGKILL).expect("kill");
    c.wait_for(WAIT, |e| matches!(e, Event::Restarting { slot: 1, .. }));
    // The reload reaches slot 1 while its restart is still pending: the reload's worker takes
    // the slot, and the pending restart must not add a second one.
    c.master().reload().expect("reload");
    c.wait_for(WAIT, |e| matches!(e, Event::ReloadDone));
    // The restart was due 300 ms after the crash; give it three times that to (wrongly) come.
    let quiet_until = std::time::Instant::now() + Duration::from_millis(900);
    while let Some(left) = quiet_until.checked_duration_since(std::time::Instant::now()) {
        match c.master().events().recv_timeout(left) {
            Ok(e) => {
                assert!(
                    !matches!(e, Event::Fork { .. }),
                    "a fork after the reload was done: {e:?}"
                );
                c.seen.push(e);
            }
            Err(_) => break,
        }
    }
    let workers = c.master().workers().expect("workers");
    assert_eq!(workers.len(), 2, "{workers:?}");
    ask_worker(addr).expect("served");
    c.stop();
}

#[test]
fn a_reload_revives_an_errored_slot() {
    let _fds = shared_fds();
    let flag = std::env::temp_dir().join(format!("cluster-rs-errored-{}", std::process::id()));
    std::fs::write(&flag, b"x").expect("flag");
    // Slot 1 runs a broken program (it exits before listening) until the flag goes.
    let mode = format!("fail-if-exists:{}@1", flag.display());
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", mode.as_str()])
            .workers(2)
            .restart_policy(RestartPolicy {
                initial_delay: Duration::from_millis(10),
                max_fast_crashes: 2,
                ..Default::default()
            }),
    );
    c.wait_for(WAIT, |e| matches!(e, Event::SlotErrored { slot: 1, .. }));
    let addr = inet(&c.wait_listening(1));
    // The program is fixed; a reload deploys it, to the errored slot too.
    let _ = std::fs::remove_file(&flag);
    c.master().reload().expect("reload");
    let revived = match c.wait_for(WAIT, |e| matches!(e, Event::Fork { slot: 1, .. })) {
        Event::Fork { worker, .. } => worker,
        _ => unreachable!(),
    };
    // The rest of the reload replaces slot 0's worker, and the raw worker exits on Disconnect
    // without draining: ask only once the reload is done too (in either order).
    let (mut listening, mut done) = (false, false);
    c.wait_for(WAIT, |e| {
        match e {
            Event::Listening { worker, .. } if *worker == revived => listening = true,
            Event::ReloadDone => done = true,
            _ => {}
        }
        listening && done
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        seen.insert(ask_worker(addr).expect("served"));
    }
    assert!(seen.contains(&revived), "the revived slot serves: {seen:?}");
    c.stop();
}

#[test]
fn an_old_worker_crashing_during_its_reload_leaves_exactly_its_replacement() {
    let _fds = shared_fds();
    let gate = Gate::new("reload-gate");
    let mode = format!("wait-for-absent:{}", gate.path().display());
    let mut c =
        Cluster::start(MasterBuilder::new(raw_worker()).args(["tcp:127.0.0.1:0", mode.as_str()]));
    let addr = inet(&c.wait_listening(1));
    gate.close();
    c.master().reload().expect("reload");
    c.wait_for(WAIT, |e| {
        matches!(
            e,
            Event::Fork {
                worker: WorkerId(2),
                ..
            }
        )
    });
    // The old worker dies while its replacement is held before listening.
    c.master().kill(WorkerId(1), libc::SIGKILL).expect("kill");
    c.wait_for(WAIT, |e| {
        matches!(
            e,
            Event::Exit {
                worker: WorkerId(1),
                ..
            }
        )
    });
    gate.open();
    c.wait_for(WAIT, |e| matches!(e, Event::ReloadDone));
    assert!(
        !c.seen.iter().any(|e| matches!(e, Event::Restarting { .. })),
        "no second replacement"
    );
    let ids: Vec<WorkerId> = c
        .master()
        .workers()
        .expect("workers")
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, [WorkerId(2)]);
    ask_worker(addr).expect("served by the replacement");
    c.stop();
}

#[test]
fn a_burst_larger_than_one_drain_is_read_to_the_end() {
    let _fds = shared_fds();
    let mut c = Cluster::start(MasterBuilder::new(raw_worker()).args(["tcp:127.0.0.1:0", "flood"]));
    let mut got = 0u32;
    // Edge-triggered readiness reports the burst once; the master must come back for the rest.
    while got < 5000 {
        if let Event::Message { payload, .. } =
            c.wait_for(WAIT, |e| matches!(e, Event::Message { .. }))
        {
            assert_eq!(payload, got.to_le_bytes(), "messages arrive in order");
            got += 1;
        }
    }
    c.stop();
}

/// More messages for one worker than its socket holds, sent while it reads nothing: the master
/// keeps the rest queued and writes it as the worker reads (it watches the channel for room
/// only while output waits), so every byte arrives.
#[test]
fn messages_beyond_the_socket_buffer_reach_a_worker_that_reads_late() {
    let _fds = shared_fds();
    let gate = Gate::closed("late-reader");
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args([
                "tcp:127.0.0.1:0".to_owned(),
                format!("hold-then-echo:{}", gate.path().display()),
            ])
            .workers(1),
    );
    c.wait_listening(1);
    // 3 MiB: many times a Unix socket's buffer, within the master's per-worker queue cap.
    const MESSAGES: usize = 48;
    const SIZE: usize = 64 * 1024;
    for i in 0..MESSAGES {
        c.master()
            .send(WorkerId(1), vec![b'a' + (i % 26) as u8; SIZE])
            .expect("queued for the worker");
    }
    gate.open();
    for _ in 0..MESSAGES {
        let Event::Message { payload, .. } = c.wait_for(Duration::from_secs(10), |e| {
            matches!(e, Event::Message { .. })
        }) else {
            unreachable!()
        };
        assert_eq!(payload, SIZE.to_string().into_bytes());
    }
    c.stop();
}

//! Misbehaving workers against the master's bounds: whatever one worker does, the others'
//! clients are served and the master's resources stay bounded (issue 9).

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cluster_master::{Event, MasterBuilder};

use crate::util::*;

/// One hand-off left unanswered while the same worker answers (refuses) every other one: the
/// ack timeout is per hand-off, so the worker is dropped and the client it held back is served by
/// another worker.
#[test]
fn a_hand_off_held_back_while_others_flow_times_out() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0", "withhold-first@0"])
            .workers(2)
            .ack_timeout(Duration::from_millis(700)),
    );
    let addr = inet(&c.wait_listening(2));
    // Two idle workers: two connections go to two different workers, so slot 0 holds one.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            s
        })
        .collect();
    // Keep answers flowing from both workers (sequential clients are offered to both; slot 0
    // refuses, slot 1 serves) until the withholding worker is dropped. Before per-hand-off
    // deadlines each answer reset the clock and this ran out the loop.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut dropped = None;
    for _ in 0..100_000 {
        if Instant::now() > deadline {
            break;
        }
        ask_worker(addr).expect("the other clients are served");
        while let Ok(e) = c.master().events().try_recv() {
            c.seen.push(e.clone());
            if let Event::Dropped { reason, .. } = e {
                dropped = Some(reason);
            }
        }
        if dropped.is_some() {
            break;
        }
    }
    let reason = dropped.expect("the worker holding a hand-off back was dropped");
    assert!(reason.contains("unanswered"), "{reason}");
    // The held-back client is handed to another worker and served.
    for mut s in held {
        let mut line = [0u8; 64];
        let n = s.read(&mut line).expect("served after the drop");
        assert!(line[..n].starts_with(b"worker "), "{:?}", &line[..n]);
    }
    c.stop();
}

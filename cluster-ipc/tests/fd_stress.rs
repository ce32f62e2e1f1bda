//! 10,000 fd-carrying frames each way through one pair, with the send queues regularly full.
//!
//! Alone in its binary with a single test: it compares `/proc/self/fd` before and after, which
//! only means something when no other test thread is opening fds meanwhile.

// The helpers below are test code too: like the tests, they fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cluster_core::{ConnId, Message, Peer, ServerId};
use cluster_ipc::{Channel, Received};

mod common;
use common::{ino, open_fds};

const PER_DIRECTION: usize = 10_000;
/// Frames sent per side before either reads: enough to fill a default socket buffer.
const BURST: usize = 500;

/// What one side sent, in order, for the other to check against.
type Expected = VecDeque<(Message, Vec<u64>)>;

/// Sends `msg` with `fds` (dropped afterwards: in flight or queued, the channel no longer
/// needs our copies) and records what the peer must see. Returns whether the frame was queued.
fn send(ch: &mut Channel, msg: Message, fds: Vec<OwnedFd>, expected: &mut Expected) -> bool {
    let inos = fds.iter().map(|f| ino(f.as_fd())).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    ch.send(&msg, &borrowed).unwrap();
    expected.push_back((msg, inos));
    ch.has_pending_output()
}

fn check(r: Received, expected: &mut Expected) {
    let (msg, inos) = expected.pop_front().expect("a frame nobody sent");
    assert_eq!(r.msg, msg);
    let got: Vec<u64> = r.fds.iter().map(|f| ino(f.as_fd())).collect();
    assert_eq!(got, inos, "fds of {msg:?}");
}

#[test]
fn ten_thousand_fd_frames_each_way_without_leaks() {
    let base = open_fds();
    {
        let (mut a, mut b) = Channel::pair().unwrap();
        let mut to_b = Expected::new();
        let mut to_a = Expected::new();
        let (mut sent_ab, mut sent_ba) = (0usize, 0usize);
        let (mut queued_a, mut queued_b) = (0usize, 0usize);
        let deadline = Instant::now() + Duration::from_secs(120);

        for _round in 0..PER_DIRECTION.div_ceil(BURST) {
            // Both sides write a burst without reading, so both send queues fill (EAGAIN).
            for _ in 0..BURST.min(PER_DIRECTION - sent_ab) {
                let (conn, _twin) = UnixStream::pair().unwrap();
                let msg = Message::new_conn(ServerId(1), ConnId(sent_ab as u64), Peer::Unix);
                queued_a += usize::from(send(&mut a, msg, vec![conn.into()], &mut to_b));
                if sent_ab % 3 == 0 {
                    let ack = Message::Accepted {
                        conn: ConnId(sent_ab as u64),
                    };
                    send(&mut a, ack, Vec::new(), &mut to_b);
                }
                sent_ab += 1;
            }
            for _ in 0..BURST.min(PER_DIRECTION - sent_ba) {
                let fds: Vec<OwnedFd> = (0..sent_ba % 3 + 1)
                    .map(|_| std::io::pipe().unwrap().0.into())
                    .collect();
                let msg = Message::User {
                    payload: (sent_ba as u64).to_le_bytes().to_vec(),
                };
                queued_b += usize::from(send(&mut b, msg, fds, &mut to_a));
                if sent_ba % 4 == 0 {
                    let plain = Message::User {
                        payload: b"no fds".to_vec(),
                    };
                    send(&mut b, plain, Vec::new(), &mut to_a);
                }
                sent_ba += 1;
            }
            // Drain both ways until everything sent so far has been received and checked.
            for _ in 0..1_000_000 {
                if to_a.is_empty() && to_b.is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "stalled");
                a.flush().unwrap();
                b.flush().unwrap();
                while let Some(r) = b.recv().unwrap() {
                    check(r, &mut to_b);
                }
                while let Some(r) = a.recv().unwrap() {
                    check(r, &mut to_a);
                }
            }
            assert!(to_a.is_empty() && to_b.is_empty(), "frames missing");
            assert!(!a.has_pending_output() && !b.has_pending_output());
        }
        assert_eq!((sent_ab, sent_ba), (PER_DIRECTION, PER_DIRECTION));
        // The point of the exercise: sends really did hit a full socket.
        assert!(
            queued_a > 0 && queued_b > 0,
            "no EAGAIN: {queued_a} {queued_b}"
        );
        assert!(a.recv().unwrap().is_none() && b.recv().unwrap().is_none());
    }
    assert_eq!(open_fds(), base);
}

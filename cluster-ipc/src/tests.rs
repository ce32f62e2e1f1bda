//! Channel tests that need crate-private pieces: raw `sendmsg` through [`sys::send_with_fds`]
//! to forge frames a well-behaved `Channel` would never send, and the `#[cfg(test)]` socket
//! and rlimit helpers in `sys` (the only place unsafe code may live).
//!
//! Every test here that opens fds holds [`fd_lock`]: tests in one binary run on parallel
//! threads and share `/proc/self/fd`, so leak checks are only meaningful one at a time.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cluster_core::{ConnId, Message, ServerId};

use crate::frame::{self, HEADER_LEN};
use crate::{Channel, IpcError, Limits, spawn_with_channel, sys};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{ino, open_fds};

static FD_LOCK: Mutex<()> = Mutex::new(());

/// Serialises fd-counting tests; a test that failed while holding it must not fail the rest.
pub(crate) fn fd_lock() -> MutexGuard<'static, ()> {
    FD_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

fn new_conn(c: u64) -> Message {
    Message::NewConn {
        server: ServerId(1),
        conn: ConnId(c),
    }
}

/// A channel whose peer is a bare socket we can write forged frames to.
fn raw_pair(limits: Limits) -> (Channel, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Channel::from_stream(a, limits).unwrap(), b)
}

#[test]
fn frame_declaring_an_fd_that_never_came_is_a_mismatch() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(Limits::default());
        let bytes = frame::encode(&new_conn(1), 1);
        assert_eq!(
            sys::send_with_fds(peer.as_fd(), &bytes, &[]).unwrap(),
            bytes.len()
        );
        let err = ch.recv_blocking(WAIT).unwrap_err();
        assert!(
            matches!(
                err,
                IpcError::FdMismatch {
                    declared: 1,
                    arrived: 0
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(open_fds(), base);
}

#[test]
fn fd_on_a_frame_that_declares_none_is_an_error_and_not_passed_on() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(Limits::default());
        let (stray, _twin) = UnixStream::pair().unwrap();
        let (honest, _twin2) = UnixStream::pair().unwrap();
        // An honest header (accepted carries no fd) with an fd smuggled alongside, then a
        // well-formed newconn: the stray fd must not be handed to the newconn.
        let accepted = frame::encode(&Message::Accepted { conn: ConnId(1) }, 0);
        sys::send_with_fds(peer.as_fd(), &accepted, &[stray.as_fd()]).unwrap();
        let nc = frame::encode(&new_conn(2), 1);
        sys::send_with_fds(peer.as_fd(), &nc, &[honest.as_fd()]).unwrap();
        drop((stray, honest));
        let err = ch.recv_blocking(WAIT).unwrap_err();
        assert!(
            matches!(
                err,
                IpcError::FdMismatch {
                    declared: 0,
                    arrived: 1
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(open_fds(), base);
}

#[test]
fn accepted_frame_declaring_an_fd_is_malformed() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(Limits::default());
        let (extra, _twin) = UnixStream::pair().unwrap();
        let bytes = frame::encode(&Message::Accepted { conn: ConnId(1) }, 1);
        sys::send_with_fds(peer.as_fd(), &bytes, &[extra.as_fd()]).unwrap();
        drop(extra);
        let err = ch.recv_blocking(WAIT).unwrap_err();
        assert!(
            matches!(err, IpcError::Malformed(crate::DecodeError::FdCount { .. })),
            "{err:?}"
        );
    }
    assert_eq!(open_fds(), base);
}

#[test]
fn receiver_refusing_fds_closes_what_arrives() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let limits = Limits {
            accept_fds: false,
            ..Limits::default()
        };
        let (mut ch, peer) = raw_pair(limits);
        let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
        let bytes = frame::encode(
            &Message::User {
                payload: b"take this".to_vec(),
            },
            1,
        );
        sys::send_with_fds(peer.as_fd(), &bytes, &[pipe_r.as_fd()]).unwrap();
        drop(pipe_r);
        let err = ch.recv_blocking(WAIT).unwrap_err();
        assert!(matches!(err, IpcError::FdsNotAllowed(1)), "{err:?}");
    }
    assert_eq!(open_fds(), base);
}

/// Hazard A8: a read that starts in plain data can run into the next fd-carrying frame and
/// return its fd early; each frame must still get exactly its own fd.
#[test]
fn coalesced_frames_keep_their_own_fds() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(Limits::default());
        let (a, _ta) = UnixStream::pair().unwrap();
        let (b, _tb) = UnixStream::pair().unwrap();
        let want = [ino(a.as_fd()), ino(b.as_fd())];
        for round in 0..50u64 {
            let f1 = frame::encode(&new_conn(round), 1);
            let f2 = frame::encode(
                &Message::Accepted {
                    conn: ConnId(round),
                },
                0,
            );
            let f3 = frame::encode(&new_conn(round + 1000), 1);
            sys::send_with_fds(peer.as_fd(), &f1, &[a.as_fd()]).unwrap();
            sys::send_with_fds(peer.as_fd(), &f2, &[]).unwrap();
            sys::send_with_fds(peer.as_fd(), &f3, &[b.as_fd()]).unwrap();
            let r1 = ch.recv_blocking(WAIT).unwrap();
            let r2 = ch.recv_blocking(WAIT).unwrap();
            let r3 = ch.recv_blocking(WAIT).unwrap();
            assert_eq!(r1.msg, new_conn(round));
            assert_eq!(r2.fds.len(), 0);
            assert_eq!(r3.msg, new_conn(round + 1000));
            assert_eq!([ino(r1.fds[0].as_fd()), ino(r3.fds[0].as_fd())], want);
        }
    }
    assert_eq!(open_fds(), base);
}

/// Hazard A7: with a 4 KiB send buffer every 64 KiB frame goes out in many pieces; the fd must
/// travel once, with the first piece, and frames must arrive in order with one fd each.
#[test]
fn partial_writes_carry_exactly_one_fd_per_frame() {
    const FRAMES: usize = 32;
    const SIZE: usize = 64 * 1024;
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut tx, mut rx) = Channel::pair().unwrap();
        sys::set_sndbuf(tx.as_fd(), 4096).unwrap();
        let mut expected = VecDeque::new();
        for i in 0..FRAMES {
            let (conn, _twin) = UnixStream::pair().unwrap();
            expected.push_back(ino(conn.as_fd()));
            let payload = vec![i as u8; SIZE];
            tx.send(&Message::User { payload }, &[conn.as_fd()])
                .unwrap();
            // The channel holds its own reference while the frame waits; ours can go.
        }
        assert!(tx.has_pending_output(), "a 4 KiB buffer took 2 MiB at once");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = 0;
        let mut full = 0;
        // The peer is slow: at most one frame per turn, so the sender keeps finding its
        // buffer full and resuming frames in the middle.
        for _ in 0..10_000_000 {
            if got == FRAMES {
                break;
            }
            assert!(Instant::now() < deadline, "stalled after {got} frames");
            if !tx.flush().unwrap() {
                full += 1;
            }
            if let Some(r) = rx.recv().unwrap() {
                let Message::User { payload } = &r.msg else {
                    panic!("unexpected {:?}", r.msg);
                };
                assert_eq!(payload.len(), SIZE);
                assert!(
                    payload.iter().all(|&b| b == got as u8),
                    "frame {got} garbled"
                );
                assert_eq!(r.fds.len(), 1, "frame {got}");
                assert_eq!(Some(ino(r.fds[0].as_fd())), expected.pop_front());
                got += 1;
            }
        }
        assert_eq!(got, FRAMES);
        assert!(full > FRAMES, "send buffer was never full ({full})");
        assert!(rx.recv().unwrap().is_none(), "an extra frame or fd arrived");
    }
    assert_eq!(open_fds(), base);
}

const CTRUNC_CHILD: &str = "CLUSTER_IPC_TEST_CTRUNC_CHILD";

/// Hazards A1-A3: a worker at its fd limit gets `MSG_CTRUNC`; the channel must say so and
/// close the fds that were installed. The child lowers its own `RLIMIT_NOFILE` so that exactly
/// one more fd fits, takes a one-fd frame (fits), then a three-fd frame (one installed, two
/// dropped by the kernel).
#[test]
fn truncated_fds_are_reported_and_nothing_leaks() {
    if std::env::var_os(CTRUNC_CHILD).is_some() {
        ctrunc_child();
        return;
    }
    let _g = fd_lock();
    let base = open_fds();
    {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "tests::truncated_fds_are_reported_and_nothing_leaks",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CTRUNC_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
        let mut ch = spawn_with_channel(&mut cmd, 3, Limits::default()).unwrap();
        let child = cmd.spawn().unwrap();
        drop(cmd);
        let ready = ch.recv_blocking(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            ready.msg,
            Message::User {
                payload: b"ready".to_vec()
            }
        );
        let (one, _t1) = UnixStream::pair().unwrap();
        ch.send_blocking(&new_conn(1), &[one.as_fd()], WAIT)
            .unwrap();
        let three: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<_> = three.iter().map(|(a, _)| a.as_fd()).collect();
        ch.send_blocking(
            &Message::User {
                payload: b"three".to_vec(),
            },
            &fds,
            WAIT,
        )
        .unwrap();
        // The child bounds its own waits, so this ends.
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        assert!(stdout.contains("CTRUNC-CHILD-OK"), "{stdout}");
    }
    assert_eq!(open_fds(), base);
}

fn ctrunc_child() {
    let mut ch = Channel::from_inherited_fd(3, Limits::default()).unwrap();
    let before = open_fds();
    // New fds take the lowest free number, and must be below the soft limit: a limit one above
    // the lowest free number leaves room for exactly one.
    let free = (0..).find(|n| !before.contains(n)).unwrap();
    sys::set_nofile_soft(free as u64 + 1).unwrap();
    ch.send_blocking(
        &Message::User {
            payload: b"ready".to_vec(),
        },
        &[],
        WAIT,
    )
    .unwrap();
    let one = ch.recv_blocking(WAIT).unwrap();
    assert_eq!(one.fds.len(), 1, "the one fd with headroom must arrive");
    drop(one);
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(matches!(err, IpcError::FdsTruncated), "{err:?}");
    // Listing needs the single free slot, so this also fails if the installed fd leaked.
    assert_eq!(open_fds(), before);
    println!("CTRUNC-CHILD-OK");
}

#[test]
fn header_alone_rejects_an_oversized_frame() {
    let _g = fd_lock();
    let (mut ch, peer) = raw_pair(Limits {
        max_frame: 64,
        ..Limits::default()
    });
    let bytes = frame::encode(
        &Message::User {
            payload: vec![0; 65],
        },
        0,
    );
    sys::send_with_fds(peer.as_fd(), &bytes[..HEADER_LEN], &[]).unwrap();
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(
        matches!(
            err,
            IpcError::Malformed(crate::DecodeError::TooLarge { len: 65, max: 64 })
        ),
        "{err:?}"
    );
}

//! Channel tests that need crate-private pieces: raw `sendmsg` through [`sys::send_with_fds`]
//! to forge frames a well-behaved `Channel` would never send, and the `#[cfg(test)]` socket
//! and rlimit helpers in `sys` (the only place unsafe code may live).
//!
//! Every test here that opens fds holds [`fd_lock`]: tests in one binary run on parallel
//! threads and share `/proc/self/fd`, so leak checks are only meaningful one at a time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cluster_core::{ConnId, Message, Peer, ServerId};

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
    Message::new_conn(ServerId(1), ConnId(c), Peer::Unix)
}

/// A channel whose peer is a bare socket we can write forged frames to.
fn raw_pair(limits: Limits) -> (Channel, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Channel::from_stream(a, limits).unwrap(), b)
}

#[test]
fn a_hand_off_batch_brings_each_connection_its_own_fd_in_order() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut master, mut worker) = Channel::pair().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let conns = (0..3u64)
            .map(|c| cluster_core::HandedConn {
                conn: ConnId(c),
                peer: Peer::Unix,
            })
            .collect();
        let msg = Message::NewConn {
            server: ServerId(1),
            conns,
        };
        let fds: Vec<_> = pairs.iter().map(|(ours, _)| ours.as_fd()).collect();
        master.send_blocking(&msg, &fds, WAIT).unwrap();
        let got = worker.recv_blocking(WAIT).unwrap();
        assert_eq!(got.msg, msg);
        assert_eq!(got.fds.len(), 3);
        // Each fd is the socket its entry names: a byte written to the far end of pair k
        // arrives on the k-th fd.
        for (k, ((_, theirs), fd)) in pairs.iter().zip(got.fds).enumerate() {
            (&*theirs).write_all(&[k as u8]).unwrap();
            let mut got = [0u8; 1];
            let mut stream = UnixStream::from(fd);
            stream.read_exact(&mut got).unwrap();
            assert_eq!(got[0], k as u8);
        }
    }
    assert_eq!(open_fds(), base);
}

#[test]
fn accept_nonblocking_gives_a_non_blocking_stream_and_the_peer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (fd, peer) = crate::accept_nonblocking(listener.as_fd()).unwrap();
    assert_eq!(peer, Some(client.local_addr().unwrap()));
    let mut server_side = std::net::TcpStream::from(fd);
    let mut buf = [0u8; 1];
    let err = server_side.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    // The flags as the kernel reports them (`/proc`), without unsafe code here.
    let fd_number = std::os::fd::AsRawFd::as_raw_fd(&server_side);
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd_number}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap();
    assert_ne!(
        flags & libc::O_CLOEXEC as u32,
        0,
        "close-on-exec: {flags:o}"
    );
    assert_ne!(
        flags & libc::O_NONBLOCK as u32,
        0,
        "non-blocking: {flags:o}"
    );
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
/// one more fd fits, takes a one-fd frame (fits), then, in one read, an fd-less frame and a
/// three-fd frame (one installed, two dropped by the kernel): the fd-less frame is delivered
/// before the error.
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
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut ch = spawn_with_channel(&mut cmd, 3, Limits::default()).unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut go = child.stdin.take().unwrap();
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
        ch.send_blocking(&user(b"before"), &[], WAIT).unwrap();
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
        // Both frames are queued in the child's socket: its next read returns them together.
        go.write_all(b"go\n").unwrap();
        drop(go);
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
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    assert_eq!(go, "go\n");
    let ahead = ch.recv_blocking(WAIT).unwrap();
    assert_eq!(
        ahead.msg,
        user(b"before"),
        "the frame ahead of the violation"
    );
    assert!(ahead.fds.is_empty());
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

// ---------------------------------------------------------------- violations after clean frames
//
// A read can bring valid frames and then a violation (issue 9): the valid frames are delivered,
// then the error, and the channel stays dead; the fds of the violating part are closed.

/// The channel reports `want`, and keeps reporting it (or `Closed`): it is dead.
#[track_caller]
fn assert_dead_with(ch: &mut Channel, want: &IpcError) {
    let got = ch.recv_blocking(WAIT).unwrap_err();
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    for _ in 0..3 {
        match ch.recv() {
            Err(IpcError::Closed) => {}
            Err(again) => assert_eq!(format!("{again:?}"), format!("{want:?}")),
            Ok(r) => panic!("a dead channel delivered {r:?}"),
        }
    }
}

fn no_fds_limits() -> Limits {
    Limits {
        accept_fds: false,
        ..Limits::default()
    }
}

fn user(payload: &[u8]) -> Message {
    Message::User {
        payload: payload.to_vec(),
    }
}

/// The master's view of a worker that answers a hand-off and, in the same `sendmsg`, sends a
/// frame with an fd: the answer must still count, or the connection is handed out twice.
#[test]
fn answer_and_forbidden_fd_in_one_sendmsg_delivers_the_answer_first() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(no_fds_limits());
        let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
        let mut bytes = frame::encode(&Message::Accepted { conn: ConnId(7) }, 0);
        frame::encode_into(&user(b"fd"), 1, &mut bytes);
        let n = sys::send_with_fds(peer.as_fd(), &bytes, &[pipe_r.as_fd()]).unwrap();
        assert_eq!(n, bytes.len());
        drop(pipe_r);
        let first = ch.recv_blocking(WAIT).unwrap();
        assert_eq!(first.msg, Message::Accepted { conn: ConnId(7) });
        assert!(first.fds.is_empty());
        assert_dead_with(&mut ch, &IpcError::FdsNotAllowed(1));
        // More valid frames behind the violation are never delivered.
        let more = frame::encode(&Message::Accepted { conn: ConnId(8) }, 0);
        sys::send_with_fds(peer.as_fd(), &more, &[]).unwrap();
        assert_dead_with(&mut ch, &IpcError::FdsNotAllowed(1));
    }
    assert_eq!(open_fds(), base);
}

/// The same with two `sendmsg`s (the answer, then the fd frame) that the kernel returns in one
/// `recvmsg` because both were queued before the reader woke up.
#[test]
fn answer_and_forbidden_fd_in_one_read_delivers_the_answer_first() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(no_fds_limits());
        let (stray, _twin) = UnixStream::pair().unwrap();
        let answers: Vec<u8> = (1..=3)
            .flat_map(|c| frame::encode(&Message::Accepted { conn: ConnId(c) }, 0))
            .collect();
        sys::send_with_fds(peer.as_fd(), &answers, &[]).unwrap();
        let fd_frame = frame::encode(&Message::Accepted { conn: ConnId(4) }, 0);
        sys::send_with_fds(peer.as_fd(), &fd_frame, &[stray.as_fd()]).unwrap();
        drop(stray);
        for c in 1..=3 {
            let r = ch.recv_blocking(WAIT).unwrap();
            assert_eq!(r.msg, Message::Accepted { conn: ConnId(c) });
        }
        assert_dead_with(&mut ch, &IpcError::FdsNotAllowed(1));
    }
    assert_eq!(open_fds(), base);
}

#[test]
fn valid_frame_then_garbage_in_one_write_delivers_the_frame_first() {
    let _g = fd_lock();
    let (mut ch, peer) = raw_pair(Limits::default());
    let mut bytes = frame::encode(&Message::Accepted { conn: ConnId(1) }, 0);
    bytes.extend_from_slice(&[0xff; 64]);
    sys::send_with_fds(peer.as_fd(), &bytes, &[]).unwrap();
    let r = ch.recv_blocking(WAIT).unwrap();
    assert_eq!(r.msg, Message::Accepted { conn: ConnId(1) });
    assert_dead_with(
        &mut ch,
        &IpcError::Malformed(crate::DecodeError::Version(0xff)),
    );
}

#[test]
fn valid_frame_then_oversized_header_in_one_write_delivers_the_frame_first() {
    let _g = fd_lock();
    let (mut ch, peer) = raw_pair(Limits {
        max_frame: 64,
        ..Limits::default()
    });
    let mut bytes = frame::encode(&Message::Accepted { conn: ConnId(1) }, 0);
    bytes.extend_from_slice(&frame::encode(&user(&[0; 65]), 0)[..HEADER_LEN]);
    sys::send_with_fds(peer.as_fd(), &bytes, &[]).unwrap();
    let r = ch.recv_blocking(WAIT).unwrap();
    assert_eq!(r.msg, Message::Accepted { conn: ConnId(1) });
    assert_dead_with(
        &mut ch,
        &IpcError::Malformed(crate::DecodeError::TooLarge { len: 65, max: 64 }),
    );
}

/// A valid frame with its fd, then (in the same read) a frame bringing more fds than any frame
/// may carry: the first frame keeps its own fd, the surplus is closed.
#[test]
fn valid_frame_keeps_its_fd_when_a_surplus_follows_in_the_same_read() {
    let _g = fd_lock();
    let base = open_fds();
    {
        let (mut ch, peer) = raw_pair(Limits::default());
        let (mine, _twin) = UnixStream::pair().unwrap();
        let want = ino(mine.as_fd());
        let surplus: Vec<_> = (0..=frame::MAX_FDS_PER_FRAME)
            .map(|_| std::io::pipe().unwrap().0)
            .collect();
        // The hand-off's first bytes bring its fd in one read; the rest of it and the frame
        // with too many fds come back together in the next.
        let nc = frame::encode(&new_conn(1), 1);
        sys::send_with_fds(peer.as_fd(), &nc[..3], &[mine.as_fd()]).unwrap();
        sys::send_with_fds(peer.as_fd(), &nc[3..], &[]).unwrap();
        let bad = frame::encode(&user(b"many"), frame::MAX_FDS_PER_FRAME);
        let fds: Vec<_> = surplus.iter().map(|f| f.as_fd()).collect();
        sys::send_with_fds(peer.as_fd(), &bad, &fds).unwrap();
        drop((mine, surplus));
        let r = ch.recv_blocking(WAIT).unwrap();
        assert_eq!(r.msg, new_conn(1));
        assert_eq!(
            r.fds.iter().map(|f| ino(f.as_fd())).collect::<Vec<_>>(),
            [want]
        );
        drop(r);
        assert_dead_with(
            &mut ch,
            &IpcError::FdMismatch {
                declared: 0,
                arrived: frame::MAX_FDS_PER_FRAME + 1,
            },
        );
    }
    assert_eq!(open_fds(), base);
}

mod violation_after_valid_frames {
    //! Any sequence of valid frames, then any violation, written in any chunking and read at
    //! any points: every valid frame arrives, in order, with its own fds; then exactly the
    //! violation's error, for good; and no fd is left open.

    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use cluster_core::{ConnId, Message};
    use proptest::prelude::*;

    use super::{WAIT, fd_lock, ino, no_fds_limits, open_fds, raw_pair};
    use crate::frame::{self, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FDS_PER_FRAME};
    use crate::{Channel, DecodeError, IpcError, Limits, sys};

    #[derive(Clone, Debug)]
    enum Violation {
        /// A header whose version byte is wrong, and more junk.
        BadVersion(u8, Vec<u8>),
        /// A well-formed header naming no message.
        UnknownTag(Vec<u8>),
        /// A header over the frame cap.
        Oversize,
        /// Fds on a channel that takes none, with a frame that would otherwise be valid.
        FdsWhereNoneAllowed(Message, usize, usize),
        /// More fds than the frame declares.
        Surplus(usize),
        /// Fewer fds than the frame declares.
        Shortfall(usize),
        /// More fds in one go than any frame may carry.
        TooMany,
    }

    impl Violation {
        fn needs_fd_channel(&self) -> Option<bool> {
            match self {
                Violation::FdsWhereNoneAllowed(..) => Some(false),
                Violation::Surplus(_) | Violation::Shortfall(_) | Violation::TooMany => Some(true),
                _ => None,
            }
        }

        /// The violating bytes, the fds sent with their first byte, and the error expected.
        fn render(&self) -> (Vec<u8>, usize, IpcError) {
            let user = |n: usize| {
                frame::encode(
                    &Message::User {
                        payload: b"violation".to_vec(),
                    },
                    n,
                )
            };
            match self {
                Violation::BadVersion(v, junk) => {
                    let mut b = vec![*v];
                    b.extend_from_slice(&[0; HEADER_LEN - 1]);
                    b.extend_from_slice(junk);
                    (b, 0, IpcError::Malformed(DecodeError::Version(*v)))
                }
                Violation::UnknownTag(body) => {
                    let mut b = vec![frame::VERSION, 200, 0, 0];
                    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    b.extend_from_slice(body);
                    (b, 0, IpcError::Malformed(DecodeError::UnknownTag(200)))
                }
                Violation::Oversize => {
                    let len = DEFAULT_MAX_FRAME + 1;
                    let mut b = vec![frame::VERSION, 32, 0, 0];
                    b.extend_from_slice(&(len as u32).to_le_bytes());
                    let max = DEFAULT_MAX_FRAME;
                    (
                        b,
                        0,
                        IpcError::Malformed(DecodeError::TooLarge { len, max }),
                    )
                }
                Violation::FdsWhereNoneAllowed(msg, declared, sent) => (
                    frame::encode(msg, *declared),
                    *sent,
                    IpcError::FdsNotAllowed(*sent),
                ),
                Violation::Surplus(extra) => {
                    let declared = 1;
                    let arrived = declared + extra;
                    (
                        user(declared),
                        arrived,
                        IpcError::FdMismatch { declared, arrived },
                    )
                }
                Violation::Shortfall(missing) => {
                    let declared = 1 + missing;
                    let arrived = declared - missing;
                    (
                        user(declared),
                        arrived,
                        IpcError::FdMismatch { declared, arrived },
                    )
                }
                Violation::TooMany => {
                    let arrived = MAX_FDS_PER_FRAME + 1;
                    let declared = 0;
                    (
                        user(MAX_FDS_PER_FRAME),
                        arrived,
                        IpcError::FdMismatch { declared, arrived },
                    )
                }
            }
        }
    }

    fn violation() -> impl Strategy<Value = Violation> {
        let fd_less = crate::frame::tests::message_with_fds()
            .prop_filter("a frame that may come without fds", |(m, _)| {
                m.fds_allowed().contains(&0)
            });
        prop_oneof![
            (
                any::<u8>().prop_filter("not the version spoken", |v| *v != crate::frame::VERSION),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(v, junk)| Violation::BadVersion(v, junk)),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Violation::UnknownTag),
            Just(Violation::Oversize),
            (fd_less, 0..=1usize, 1..=3usize).prop_map(|((m, _), declares, sent)| {
                // A user frame may declare the fds it brings; others declare none.
                let declared = if matches!(m, Message::User { .. }) {
                    declares * sent
                } else {
                    0
                };
                Violation::FdsWhereNoneAllowed(m, declared, sent)
            }),
            (1..=3usize).prop_map(Violation::Surplus),
            (1..=2usize).prop_map(Violation::Shortfall),
            Just(Violation::TooMany),
        ]
    }

    /// Valid frames with their fd counts (at most 3 per user frame, to keep cases small).
    fn valid_frames() -> impl Strategy<Value = Vec<(Message, usize)>> {
        proptest::collection::vec(
            crate::frame::tests::message_with_fds().prop_map(|(m, n)| {
                let n = if matches!(m, Message::User { .. }) {
                    n.min(3)
                } else {
                    n
                };
                (m, n)
            }),
            0..10,
        )
    }

    /// Receives what is there now; returns the error if one came.
    fn drain(ch: &mut Channel, got: &mut Vec<(Message, Vec<OwnedFd>)>) -> Option<IpcError> {
        loop {
            match ch.recv() {
                Ok(Some(r)) => got.push((r.msg, r.fds)),
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn valid_frames_before_any_violation_are_delivered_then_only_the_error(
            fd_channel in any::<bool>(),
            frames in valid_frames(),
            violation in violation(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            reads in proptest::collection::vec(any::<bool>(), 16),
        ) {
            let fd_channel = violation.needs_fd_channel().unwrap_or(fd_channel);
            // A channel that takes no fds only ever sees frames without them.
            let frames: Vec<(Message, usize)> = if fd_channel {
                frames
            } else {
                frames.into_iter().filter(|(m, _)| m.fds_allowed().contains(&0))
                    .map(|(m, _)| (m, 0)).collect()
            };
            let _g = fd_lock();
            let base = open_fds();
            {
                let limits = if fd_channel { Limits::default() } else { no_fds_limits() };
                let (mut ch, peer) = raw_pair(limits);
                // The stream, and which offsets carry which fds (always a frame's first byte).
                let mut stream = Vec::new();
                let mut attach: Vec<(usize, Vec<OwnedFd>)> = Vec::new();
                let mut want = Vec::new();
                for (msg, n) in &frames {
                    let fds: Vec<OwnedFd> = (0..*n)
                        .map(|_| OwnedFd::from(UnixStream::pair().unwrap().0))
                        .collect();
                    want.push((msg.clone(), fds.iter().map(|f| ino(f.as_fd())).collect::<Vec<_>>()));
                    if !fds.is_empty() {
                        attach.push((stream.len(), fds));
                    }
                    frame::encode_into(msg, *n, &mut stream);
                }
                let (bad, bad_fds, want_err) = violation.render();
                if bad_fds > 0 {
                    let fds = (0..bad_fds)
                        .map(|_| OwnedFd::from(std::io::pipe().unwrap().0))
                        .collect();
                    attach.push((stream.len(), fds));
                }
                stream.extend_from_slice(&bad);
                // Chunk boundaries: the random cuts, plus every fd-carrying frame's first byte.
                let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
                bounds.extend(attach.iter().map(|(at, _)| *at));
                bounds.push(stream.len());
                bounds.sort_unstable();
                bounds.dedup();
                let mut got = Vec::new();
                let mut err = None;
                let mut from = 0;
                for (i, to) in bounds.into_iter().enumerate() {
                    if to == from {
                        continue;
                    }
                    let fds: Vec<BorrowedFd<'_>> = attach
                        .iter()
                        .find(|(at, _)| *at == from)
                        .map(|(_, f)| f.iter().map(|f| f.as_fd()).collect())
                        .unwrap_or_default();
                    let n = sys::send_with_fds(peer.as_fd(), &stream[from..to], &fds).unwrap();
                    prop_assert_eq!(n, to - from);
                    from = to;
                    if err.is_none() && reads[i % reads.len()] {
                        err = drain(&mut ch, &mut got);
                    }
                }
                drop(attach);
                // Everything is in the socket: the rest is read now, without waiting. (A read
                // that came back short makes the next recv say None once without a syscall.)
                for _ in 0..4 {
                    if err.is_some() {
                        break;
                    }
                    err = drain(&mut ch, &mut got);
                }
                let got: Vec<(Message, Vec<u64>)> = got
                    .into_iter()
                    .map(|(m, fds)| (m, fds.iter().map(|f| ino(f.as_fd())).collect()))
                    .collect();
                prop_assert_eq!(got, want);
                let Some(err) = err else {
                    return Err(TestCaseError::fail("the violation was never reported"));
                };
                prop_assert_eq!(format!("{err:?}"), format!("{want_err:?}"));
                // Dead for good: valid frames sent later are not delivered either.
                let later = frame::encode(&Message::Accepted { conn: ConnId(1) }, 0);
                sys::send_with_fds(peer.as_fd(), &later, &[]).unwrap();
                match ch.recv_blocking(WAIT) {
                    Err(IpcError::Closed) => {}
                    Err(again) => prop_assert_eq!(format!("{again:?}"), format!("{want_err:?}")),
                    Ok(r) => return Err(TestCaseError::fail(format!("delivered {r:?} after the error"))),
                }
            }
            prop_assert_eq!(open_fds(), base);
        }
    }
}

//! Channel behaviour over real sockets, through the public API only.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cluster_core::{ConnId, Message, Peer, ServerId};
use cluster_ipc::{Channel, DecodeError, IpcError, Limits, frame};

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

fn new_conn(c: u64) -> Message {
    Message::new_conn(ServerId(1), ConnId(c), Peer::Unix)
}

/// The whole point of the crate: a connection accepted on one side is served on the other,
/// in both directions, after the sender has closed its copy.
#[test]
fn accepted_tcp_socket_works_after_handoff() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (accepted, _) = listener.accept().unwrap();

    let (mut master, mut worker) = Channel::pair().unwrap();
    master
        .send_blocking(&new_conn(7), &[accepted.as_fd()], WAIT)
        .unwrap();
    drop(accepted);

    let got = worker.recv_blocking(WAIT).unwrap();
    assert_eq!(got.msg, new_conn(7));
    let [fd]: [_; 1] = got.fds.try_into().unwrap();
    let mut conn = TcpStream::from(fd);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // Ours was the last reference: closing it must reach the client as EOF.
    drop(conn);
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn clean_close_between_frames_is_closed() {
    let (mut a, mut b) = Channel::pair().unwrap();
    a.send_blocking(&Message::Online, &[], WAIT).unwrap();
    drop(a);
    assert_eq!(b.recv_blocking(WAIT).unwrap().msg, Message::Online);
    let err = b.recv_blocking(WAIT).unwrap_err();
    assert!(matches!(err, IpcError::Closed), "{err:?}");
    assert!(err.is_closed());
}

#[test]
fn close_in_the_middle_of_a_frame_is_closed_mid_frame() {
    let (sock, mut peer) = UnixStream::pair().unwrap();
    let mut ch = Channel::from_stream(sock, Limits::default()).unwrap();
    let bytes = frame::encode(&Message::Accepted { conn: ConnId(3) }, 0);
    // Header and part of the body, then the peer is gone.
    peer.write_all(&bytes[..frame::HEADER_LEN + 3]).unwrap();
    drop(peer);
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(
        matches!(err, IpcError::ClosedMidFrame(n) if n == frame::HEADER_LEN + 3),
        "{err:?}"
    );
    // Even a bare header counts as mid-frame.
    let (sock, mut peer) = UnixStream::pair().unwrap();
    let mut ch = Channel::from_stream(sock, Limits::default()).unwrap();
    peer.write_all(&bytes[..2]).unwrap();
    drop(peer);
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(matches!(err, IpcError::ClosedMidFrame(2)), "{err:?}");
}

/// The cap is enforced from the 8 header bytes: the receiver never waits for (or allocates)
/// the body.
#[test]
fn oversized_incoming_frame_is_rejected_from_its_header() {
    let (sock, mut peer) = UnixStream::pair().unwrap();
    let mut ch = Channel::from_stream(
        sock,
        Limits {
            max_frame: 1024,
            ..Limits::default()
        },
    )
    .unwrap();
    let mut header = [0u8; frame::HEADER_LEN];
    header[0] = frame::VERSION;
    header[1] = 32; // user
    header[4..].copy_from_slice(&u32::MAX.to_le_bytes());
    peer.write_all(&header).unwrap();
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(
        matches!(
            err,
            IpcError::Malformed(DecodeError::TooLarge {
                len,
                max: 1024
            }) if len == u32::MAX as usize
        ),
        "{err:?}"
    );
}

#[test]
fn oversized_outgoing_frame_is_refused_and_nothing_is_sent() {
    let limits = Limits {
        max_frame: 64,
        ..Limits::default()
    };
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = Channel::from_stream(a, limits).unwrap();
    let mut rx = Channel::from_stream(b, Limits::default()).unwrap();
    let err = tx
        .send(
            &Message::User {
                payload: vec![1; 65],
            },
            &[],
        )
        .unwrap_err();
    assert!(
        matches!(err, IpcError::OutgoingTooLarge { len: 65, max: 64 }),
        "{err:?}"
    );
    assert!(!tx.has_pending_output());
    // Exactly at the cap is fine, and it is the first thing the peer sees.
    let at_cap = Message::User {
        payload: vec![2; 64],
    };
    tx.send_blocking(&at_cap, &[], WAIT).unwrap();
    assert_eq!(rx.recv_blocking(WAIT).unwrap().msg, at_cap);
}

#[test]
fn wrong_fd_count_on_send_is_refused() {
    let (mut a, _b) = Channel::pair().unwrap();
    let err = a.send(&new_conn(1), &[]).unwrap_err();
    assert!(
        matches!(err, IpcError::WrongFdCount { given: 0, .. }),
        "{err:?}"
    );
    assert!(!a.has_pending_output());
}

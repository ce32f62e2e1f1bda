//! The blocking `Listener` as an fd and as a std listener, for other runtimes: standalone, a
//! shared grant (the server stays registered), a round-robin grant (no socket to give).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::thread;
use std::time::Duration;

use cluster_core::{BoundAddr, ListenSpec, Message, ServerGrant, ServerId, ServerReply, WorkerId};
use cluster_ipc::Channel;

use crate::{Listener, Worker};

const T: Duration = Duration::from_secs(5);

fn setup() -> (Channel, Worker) {
    let (mut master, theirs) = Channel::pair().unwrap();
    let worker = Worker::with_channel(theirs, WorkerId(1)).unwrap();
    assert_eq!(master.recv_blocking(Some(T)).unwrap().msg, Message::Online);
    (master, worker)
}

/// `listen` on a thread; the test plays the master and grants `grant`, with `fd` for a
/// shared one.
fn granted(m: &mut Channel, w: &Worker, grant: ServerGrant, fd: Option<&TcpListener>) -> Listener {
    let w2 = w.clone();
    let h = thread::spawn(move || w2.listen(ListenSpec::tcp("127.0.0.1:0".parse().unwrap())));
    let Message::QueryServer { seq, .. } = m.recv_blocking(Some(T)).unwrap().msg else {
        panic!("expected QueryServer");
    };
    let addr = fd.map_or("127.0.0.1:4321".parse().unwrap(), |l| {
        l.local_addr().unwrap()
    });
    let reply = ServerReply::Granted {
        server: ServerId(1),
        addr: BoundAddr::Inet(addr),
        grant,
    };
    let fds: Vec<_> = fd.iter().map(|l| l.as_fd()).collect();
    m.send_blocking(&Message::QueryServerReply { seq, reply }, &fds, Some(T))
        .unwrap();
    h.join().unwrap().unwrap()
}

/// Accepts as a worker must on a socket it may share: it stays non-blocking; wait, then
/// accept, and `WouldBlock` means someone else took the connection.
fn accept_shared(listener: &TcpListener) -> std::io::Result<TcpStream> {
    loop {
        crate::sys::wait_readable(listener.as_fd(), T)?;
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

fn serves(listener: &TcpListener) {
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut server_side = accept_shared(listener).unwrap();
    server_side.write_all(b"ok").unwrap();
    let mut got = [0u8; 2];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ok");
}

#[test]
fn a_standalone_listener_is_its_socket() {
    let l = Listener::bind_standalone(&ListenSpec::tcp("127.0.0.1:0".parse().unwrap())).unwrap();
    let fd = l.as_socket_fd().expect("a socket").as_raw_fd();
    let std_listener = TcpListener::try_from(l).unwrap();
    assert_eq!(std_listener.as_raw_fd(), fd);
    std_listener.set_nonblocking(true).unwrap();
    serves(&std_listener);
}

#[test]
fn a_shared_grant_converts_and_stays_registered_with_the_master() {
    let (mut m, w) = setup();
    let masters = TcpListener::bind("127.0.0.1:0").unwrap();
    masters.set_nonblocking(true).unwrap();
    let l = granted(&mut m, &w, ServerGrant::Shared, Some(&masters));
    assert!(l.as_socket_fd().is_some());
    let std_listener = TcpListener::try_from(l).unwrap();
    // Counted as listening, and never closed: the conversion sends Listening and no Close.
    assert!(matches!(
        m.recv_blocking(Some(T)).unwrap().msg,
        Message::Listening { .. }
    ));
    let accepting = thread::spawn(move || accept_shared(&std_listener).map(|_| ()));
    let _client = TcpStream::connect(masters.local_addr().unwrap()).unwrap();
    accepting.join().unwrap().unwrap();
    drop(w);
    // The worker's end closes with nothing else sent.
    assert!(m.recv_blocking(Some(T)).is_err());
}

#[test]
fn a_round_robin_grant_has_no_socket_to_give() {
    let (mut m, w) = setup();
    let l = granted(&mut m, &w, ServerGrant::RoundRobin, None);
    // No socket: never the channel to the master, which an event loop must not poll or close.
    assert!(l.as_socket_fd().is_none());
    let e = TcpListener::try_from(l).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

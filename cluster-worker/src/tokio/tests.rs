//! The tokio listener against a fake master on the other end of `Channel::pair()`: the
//! listen round trip, answers while nobody accepts, and the stop.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::task::Poll;
use std::thread;
use std::time::Duration;

use cluster_core::{
    BoundAddr, ConnId, ListenSpec, Message, Peer, RefuseReason, ServerGrant, ServerId, ServerReply,
    WorkerId,
};
use cluster_ipc::{Channel, Received};

use super::{TcpListener, disconnected_of, recv_of};
use crate::Worker;

const T: Duration = Duration::from_secs(5);

fn setup() -> (Channel, Worker) {
    let (mut master, theirs) = Channel::pair().unwrap();
    let worker = Worker::with_channel(theirs, WorkerId(1)).unwrap();
    assert_eq!(recv(&mut master).msg, Message::Online);
    (master, worker)
}

fn recv(m: &mut Channel) -> Received {
    m.recv_blocking(Some(T)).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const GRANTED: &str = "127.0.0.1:4321";

/// The master's side of a round-robin listen: the query, the grant, then `Listening`.
fn grant_rr(m: &mut Channel) {
    let Message::QueryServer { seq, .. } = recv(m).msg else {
        panic!("expected QueryServer");
    };
    let reply = ServerReply::Granted {
        server: ServerId(1),
        addr: BoundAddr::Inet(GRANTED.parse().unwrap()),
        grant: ServerGrant::RoundRobin,
    };
    m.send_blocking(&Message::QueryServerReply { seq, reply }, &[], Some(T))
        .unwrap();
    assert!(matches!(recv(m).msg, Message::Listening { .. }));
}

/// A client and the server side of its connection, as the master's accept makes them.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    // The master accepts with SOCK_NONBLOCK, and the worker relies on it.
    s.set_nonblocking(true).unwrap();
    (c, s)
}

/// Hands `sock` over as `conn` and returns the worker's answer.
fn hand_off(m: &mut Channel, conn: u64, sock: &TcpStream) -> Message {
    let msg = Message::new_conn(
        ServerId(1),
        ConnId(conn),
        Peer::Tcp(sock.peer_addr().unwrap()),
    );
    m.send_blocking(&msg, &[sock.as_fd()], Some(T)).unwrap();
    recv(m).msg
}

fn accepted(conn: u64) -> Message {
    Message::Accepted { conn: ConnId(conn) }
}

#[test]
fn hand_offs_are_answered_on_the_runtime_while_nobody_accepts() {
    let (mut m, w) = setup();
    let (answered_tx, answered_rx) = mpsc::channel();
    let master = thread::spawn(move || {
        grant_rr(&mut m);
        let mut clients = Vec::new();
        for conn in 1..=3 {
            let (client, server_side) = tcp_pair();
            // The application accepts once, then waits for this thread: conns 2 and 3 are
            // answered by the channel task alone.
            assert_eq!(hand_off(&mut m, conn, &server_side), accepted(conn));
            clients.push(client);
        }
        answered_tx.send(()).unwrap();
        (m, clients)
    });
    let rt = runtime();
    let peers = rt.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listener = TcpListener::listen_on(Some(w.clone()), spec).await.unwrap();
        assert_eq!(
            listener.local_addr().unwrap(),
            GRANTED.parse::<SocketAddr>().unwrap()
        );
        let (first, _) = listener.accept().await.unwrap();
        tokio::task::spawn_blocking(move || answered_rx.recv_timeout(T))
            .await
            .unwrap()
            .expect("all three answered while the application did not accept");
        let (second, _) = listener.accept().await.unwrap();
        let (third, _) = listener.accept().await.unwrap();
        [first, second, third].map(|s| s.peer_addr().unwrap())
    });
    let (_m, mut clients) = master.join().unwrap();
    let locals: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    assert_eq!(peers.to_vec(), locals, "in hand-off order");
    clients[0].write_all(b"x").unwrap();
}

#[test]
fn a_stop_serves_what_was_answered_then_ends_accept_and_resolves_disconnected() {
    let (mut m, w) = setup();
    let rt = runtime();
    rt.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listening = tokio::spawn(TcpListener::listen_on(Some(w.clone()), spec));
        let m_back = tokio::task::spawn_blocking(move || {
            let Message::QueryServer { seq, .. } = recv(&mut m).msg else {
                panic!("expected QueryServer");
            };
            let reply = ServerReply::Granted {
                server: ServerId(1),
                addr: BoundAddr::Inet(GRANTED.parse().unwrap()),
                grant: ServerGrant::RoundRobin,
            };
            m.send_blocking(&Message::QueryServerReply { seq, reply }, &[], Some(T))
                .unwrap();
            m
        })
        .await
        .unwrap();
        m = m_back;
        let listener = listening.await.unwrap().unwrap();
        // The first accept says Listening; it stays pending until conn 1 arrives.
        let first = tokio::spawn(async move {
            let got = listener.accept().await.map(|(s, _)| s.peer_addr().is_ok());
            (listener, got)
        });
        let (m_back, clients) = tokio::task::spawn_blocking(move || {
            assert!(matches!(recv(&mut m).msg, Message::Listening { .. }));
            let (c1, s1) = tcp_pair();
            assert_eq!(hand_off(&mut m, 1, &s1), accepted(1));
            let (c2, s2) = tcp_pair();
            assert_eq!(hand_off(&mut m, 2, &s2), accepted(2));
            m.send_blocking(
                &Message::User {
                    payload: b"hi".to_vec(),
                },
                &[],
                Some(T),
            )
            .unwrap();
            m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
            // Answered `Draining` only once the Disconnect was read: a marker for the test.
            let (c3, s3) = tcp_pair();
            assert_eq!(
                hand_off(&mut m, 3, &s3),
                Message::Refused {
                    conn: ConnId(3),
                    reason: RefuseReason::Draining
                }
            );
            (m, [c1, c2, c3])
        })
        .await
        .unwrap();
        let (listener, got) = first.await.unwrap();
        assert!(got.unwrap());
        let link = Some(w.link().clone());
        assert_eq!(recv_of(link.clone()).await, Some(b"hi".to_vec()));
        // Conn 2 was answered Accepted before the stop: it must be served first.
        let mut stop = Box::pin(disconnected_of(link));
        let early = std::future::poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx).is_ready())).await;
        assert!(
            !early,
            "disconnected() before the answered connection was taken"
        );
        assert!(listener.accept().await.is_ok());
        tokio::time::timeout(T, stop)
            .await
            .expect("disconnected() resolves");
        let after = listener.accept().await.unwrap_err();
        assert_eq!(after.kind(), std::io::ErrorKind::ConnectionAborted);
        drop((m_back, clients));
    });
}

#[test]
fn standalone_listeners_bind_here() {
    let rt = runtime();
    rt.block_on(async {
        let tcp = TcpListener::listen_on(None, ListenSpec::tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = tcp.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_server_side, peer) = tcp.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());

        let path = std::env::temp_dir().join(format!("cluster-tokio-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let unix = super::UnixListener::bind(&path).await.unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (server_side, _) = unix.accept().await.unwrap();
        assert!(server_side.peer_addr().is_ok());
        assert_eq!(unix.listen_addr(), BoundAddr::Unix(path.clone()));
        std::fs::remove_file(&path).unwrap();
    });
}

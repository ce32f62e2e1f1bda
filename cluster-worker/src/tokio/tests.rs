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
    grant_rr_only(m);
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

/// An answer queued behind output the socket did not take goes out once the master reads:
/// the channel task watches for room while output waits (and only then).
#[test]
fn an_answer_queued_behind_a_full_socket_goes_out_once_the_master_reads() {
    let (mut m, w) = setup();
    let (listening_tx, listening_rx) = mpsc::channel();
    let (clogged_tx, clogged_rx) = mpsc::channel();
    let worker = w.clone();
    let master = thread::spawn(move || {
        grant_rr(&mut m);
        listening_tx.send(()).unwrap();
        clogged_rx
            .recv_timeout(T)
            .expect("the worker clogged its channel");
        let (client, server_side) = tcp_pair();
        let msg = Message::new_conn(
            ServerId(1),
            ConnId(1),
            Peer::Tcp(server_side.peer_addr().unwrap()),
        );
        m.send_blocking(&msg, &[server_side.as_fd()], Some(T))
            .unwrap();
        // Read only once the channel task has answered (the stream parked, its answer queued
        // behind the clog): reading earlier could let the answer go out without a full socket.
        let deadline = std::time::Instant::now() + T;
        let mut st = worker.link().lock();
        while !st.has_parked(ServerId(1)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the hand-off was never answered"
            );
            st.wait(Duration::from_millis(50));
        }
        assert!(st.has_pending_output(), "the answer waits behind the clog");
        drop(st);
        match recv(&mut m).msg {
            Message::User { payload } => assert_eq!(payload.len(), 900_000),
            other => panic!("expected the clogging message, got {other:?}"),
        }
        assert_eq!(recv(&mut m).msg, accepted(1));
        (m, client)
    });
    let rt = runtime();
    rt.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listener = TcpListener::listen_on(Some(w.clone()), spec).await.unwrap();
        // The first accept says Listening.
        let accepting =
            tokio::spawn(async move { tokio::time::timeout(T, listener.accept()).await });
        tokio::task::spawn_blocking(move || listening_rx.recv_timeout(T))
            .await
            .unwrap()
            .expect("the master saw Listening");
        // Far more than the socket holds: the rest waits in the worker's queue, and the
        // answer behind it.
        w.send(vec![b'x'; 900_000]).unwrap();
        clogged_tx.send(()).unwrap();
        let accepted = accepting.await.unwrap();
        assert!(
            matches!(accepted, Ok(Ok(_))),
            "the stream comes once its answer is written: {accepted:?}"
        );
    });
    let (_m, _client) = master.join().unwrap();
}

#[test]
fn a_stop_serves_what_was_answered_then_ends_accept_and_resolves_disconnected() {
    let (mut m, w) = setup();
    let rt = runtime();
    rt.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listening = tokio::spawn(TcpListener::listen_on(Some(w.clone()), spec));
        let m_back = tokio::task::spawn_blocking(move || {
            grant_rr_only(&mut m);
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

/// The master's side of a round-robin listen, up to the grant (`Listening` comes with the
/// first accept).
fn grant_rr_only(m: &mut Channel) {
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
}

/// Hands `sock` over as `conn` without waiting for the answer.
#[cfg(feature = "axum")]
fn send_conn(m: &mut Channel, conn: u64, sock: &TcpStream) {
    let msg = Message::new_conn(
        ServerId(1),
        ConnId(conn),
        Peer::Tcp(sock.peer_addr().unwrap()),
    );
    m.send_blocking(&msg, &[sock.as_fd()], Some(T)).unwrap();
}

#[test]
fn a_listener_answers_again_on_a_new_runtime_after_its_first_one_was_dropped() {
    let (mut m, w) = setup();
    let (dropped_tx, dropped_rx) = mpsc::channel();
    let master = thread::spawn(move || {
        grant_rr(&mut m);
        // Only once the runtime that ran the channel task is gone.
        dropped_rx.recv_timeout(T).unwrap();
        let (client, server_side) = tcp_pair();
        assert_eq!(hand_off(&mut m, 1, &server_side), accepted(1));
        (m, client)
    });
    let first = runtime();
    let listener = first.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listener = TcpListener::listen_on(Some(w.clone()), spec).await.unwrap();
        // The first poll says Listening; nothing is handed over yet.
        let mut accept = Box::pin(listener.accept());
        let early =
            std::future::poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx).is_ready())).await;
        assert!(!early);
        drop(accept);
        listener
    });
    drop(first);
    dropped_tx.send(()).unwrap();
    let second = runtime();
    let peer = second.block_on(async {
        let (stream, _) = tokio::time::timeout(T, listener.accept())
            .await
            .expect("the hand-off was answered and taken on the new runtime")
            .unwrap();
        stream.peer_addr().unwrap()
    });
    let (_m, client) = master.join().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
}

#[test]
fn a_runtime_without_its_drivers_fails_the_bind_instead_of_panicking() {
    let no_drivers = || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    };
    let io_only = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    };
    let time_only = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    let spec = || ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
    for rt in [no_drivers(), io_only(), time_only()] {
        let standalone = rt.block_on(TcpListener::listen_on(None, spec()));
        let e = standalone.expect_err("standalone");
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("enable_all"), "{e}");
        // Under a master: the channel task cannot go on the reactor either.
        let (_m, w) = setup();
        let e = rt
            .block_on(TcpListener::listen_on(Some(w), spec()))
            .expect_err("under a master");
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
    }
}

/// With axum: a connection answered before the stop and not read yet when the stop comes.
#[cfg(feature = "axum")]
#[test]
fn disconnected_waits_until_axum_has_read_every_connection_it_was_given() {
    use std::pin::Pin;
    use tokio::io::AsyncRead;

    let (mut m, w) = setup();
    let rt = runtime();
    rt.block_on(async {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        let listening = tokio::spawn(TcpListener::listen_on(Some(w.clone()), spec));
        m = tokio::task::spawn_blocking(move || {
            grant_rr_only(&mut m);
            m
        })
        .await
        .unwrap();
        let mut listener = listening.await.unwrap().unwrap();
        let accepting = tokio::spawn(async move {
            let got = axum::serve::Listener::accept(&mut listener).await;
            (listener, got)
        });
        let (_m, _client) = tokio::task::spawn_blocking(move || {
            assert!(matches!(recv(&mut m).msg, Message::Listening { .. }));
            let (mut client, server_side) = tcp_pair();
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(hand_off(&mut m, 1, &server_side), accepted(1));
            m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
            let (_c2, s2) = tcp_pair();
            assert!(matches!(hand_off(&mut m, 2, &s2), Message::Refused { .. }));
            (m, client)
        })
        .await
        .unwrap();
        let (_listener, (mut served, _peer)) = accepting.await.unwrap();
        let link = Some(w.link().clone());
        let mut stop = Box::pin(disconnected_of(link));
        let early = std::future::poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx).is_ready())).await;
        assert!(
            !early,
            "disconnected() before axum read the connection it was given"
        );
        let mut buf = [0u8; 64];
        let mut read = tokio::io::ReadBuf::new(&mut buf);
        std::future::poll_fn(|cx| Pin::new(&mut served).poll_read(cx, &mut read))
            .await
            .unwrap();
        assert!(read.filled().starts_with(b"GET"));
        tokio::time::timeout(T, stop)
            .await
            .expect("disconnected() resolves once it was read");
    });
}

/// With axum: connections parked (answered) when the stop arrives are all served, whatever
/// order the runtime polls the connection tasks and the shutdown signal in.
#[cfg(feature = "axum")]
#[test]
fn axum_serves_every_connection_answered_before_the_stop() {
    use std::io::Read;

    // Each round a lost connection is a coin flip in axum's connection task: eight rounds of
    // three make a pass without the fix about one in 2^24.
    for round in 0..8 {
        let (mut m, w) = setup();
        let rt = runtime();
        rt.block_on(async {
            let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
            let listening = tokio::spawn(TcpListener::listen_on(Some(w.clone()), spec));
            m = tokio::task::spawn_blocking(move || {
                grant_rr_only(&mut m);
                m
            })
            .await
            .unwrap();
            let listener = listening.await.unwrap().unwrap();
            let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
            let serve = tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(disconnected_of(Some(w.link().clone())))
                    .into_future(),
            );
            let replies = tokio::task::spawn_blocking(move || {
                assert!(matches!(recv(&mut m).msg, Message::Listening { .. }));
                let mut clients = Vec::new();
                // Three hand-offs and the stop in one burst: one read takes them all.
                for conn in 1..=3 {
                    let (mut client, server_side) = tcp_pair();
                    client
                        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                        .unwrap();
                    send_conn(&mut m, conn, &server_side);
                    clients.push(client);
                }
                m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
                for conn in 1..=3 {
                    assert_eq!(recv(&mut m).msg, accepted(conn));
                }
                clients
                    .into_iter()
                    .map(|mut c| {
                        c.set_read_timeout(Some(T)).unwrap();
                        let mut reply = String::new();
                        if let Err(e) = c.read_to_string(&mut reply) {
                            reply = format!("{reply} error {e}");
                        }
                        reply
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap();
            for reply in replies {
                assert!(
                    reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello"),
                    "round {round}: {reply:?}"
                );
            }
            tokio::time::timeout(T, serve)
                .await
                .expect("the serve ends")
                .unwrap()
                .unwrap();
        });
    }
}

#[test]
fn standalone_the_runtime_is_tokio_s_multi_thread_one_with_every_driver() {
    // Not a worker here (no master's environment), so the standalone shape.
    assert!(!crate::is_worker());
    let rt = crate::tokio::runtime().unwrap();
    assert_eq!(
        rt.handle().runtime_flavor(),
        ::tokio::runtime::RuntimeFlavor::MultiThread
    );
    rt.block_on(async {
        let listener = crate::tokio::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        assert!(listener.local_addr().unwrap().port() > 0);
        ::tokio::time::sleep(Duration::from_millis(1)).await;
    });
}

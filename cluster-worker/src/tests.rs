//! The worker driven against a fake master on the other end of `Channel::pair()`, with real
//! TCP sockets on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use cluster_core::{
    BoundAddr, ConnId, ListenError, ListenSpec, Message, Peer, RefuseReason, ServerGrant, ServerId,
    ServerReply, WorkerId,
};
use cluster_ipc::{Channel, Received};

use crate::{ConnInfo, Handler, Next, ServeConfig, ServeOutcome, Session, SessionFactory, Stream};
use crate::{Listener, Shutdown, Worker};

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

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Runs `listen` on a thread while the test thread plays the master's side of the query.
fn listen_with(
    m: &mut Channel,
    w: &Worker,
    spec: ListenSpec,
    reply: impl FnOnce(&mut Channel, cluster_core::Seq, u32),
) -> std::io::Result<Listener> {
    let w2 = w.clone();
    let h = thread::spawn(move || w2.listen(spec));
    let Received { msg, .. } = recv(m);
    let Message::QueryServer { seq, index, .. } = msg else {
        panic!("expected queryServer, got {msg:?}");
    };
    reply(m, seq, index);
    h.join().unwrap()
}

fn grant_rr(m: &mut Channel, w: &Worker, server: u32) -> (Listener, u32) {
    let mut idx = u32::MAX;
    let l = listen_with(m, w, ListenSpec::tcp(any_port()), |m, seq, index| {
        idx = index;
        let reply = ServerReply::Granted {
            server: ServerId(server),
            addr: BoundAddr::Inet("127.0.0.1:4321".parse().unwrap()),
            grant: ServerGrant::RoundRobin,
        };
        m.send_blocking(&Message::QueryServerReply { seq, reply }, &[], Some(T))
            .unwrap();
    })
    .unwrap();
    (l, idx)
}

/// The master's side of a shared grant: the reply with `fd` as the listening socket.
fn send_shared_grant(
    m: &mut Channel,
    seq: cluster_core::Seq,
    server: u32,
    addr: SocketAddr,
    fd: std::os::fd::BorrowedFd<'_>,
) {
    let reply = ServerReply::Granted {
        server: ServerId(server),
        addr: BoundAddr::Inet(addr),
        grant: ServerGrant::Shared,
    };
    m.send_blocking(&Message::QueryServerReply { seq, reply }, &[fd], Some(T))
        .unwrap();
}

/// A connected client and the server side of it, as the master's accept would produce.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(any_port()).unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    // The master accepts with SOCK_NONBLOCK, and the worker relies on it.
    s.set_nonblocking(true).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    (c, s)
}

/// What the master's accept reports of the client's side.
fn tcp_peer(server_side: &TcpStream) -> Peer {
    Peer::Tcp(server_side.peer_addr().unwrap())
}

fn hand_off(m: &mut Channel, server: u32, conn: u64, sock: &TcpStream) {
    let msg = Message::new_conn(ServerId(server), ConnId(conn), tcp_peer(sock));
    m.send_blocking(&msg, &[sock.as_fd()], Some(T)).unwrap();
}

/// Skips `Listening`/`Close` noise and returns the next answer to a hand-off.
fn next_answer(m: &mut Channel) -> Message {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match recv(m).msg {
            Message::Listening { .. } | Message::Close { .. } => continue,
            other => return other,
        }
    }
    panic!("no answer");
}

fn expect_listening(m: &mut Channel, server: u32) {
    match recv(m).msg {
        Message::Listening { server: s, .. } => assert_eq!(s, ServerId(server)),
        other => panic!("expected listening, got {other:?}"),
    }
}

struct Echo;
struct EchoSession;

impl Session for EchoSession {
    fn on_ready(&mut self, conn: &mut Stream, _now: Instant) -> std::io::Result<Next> {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(Next::Close),
                Ok(n) => conn.write_all(&buf[..n])?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Next::Continue),
                Err(e) => return Err(e),
            }
        }
    }
}

impl SessionFactory for Echo {
    type Session = EchoSession;
    fn new_session(&self, _info: &ConnInfo) -> EchoSession {
        EchoSession
    }
}

fn echo_once(c: &mut TcpStream, what: &[u8]) {
    c.write_all(what).unwrap();
    let mut got = vec![0u8; what.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, what);
}

fn spawn_serve(
    w: &Worker,
    ls: Vec<Listener>,
    h: Handler,
    cfg: ServeConfig,
) -> thread::JoinHandle<std::io::Result<ServeOutcome>> {
    let w = w.clone();
    thread::spawn(move || w.serve(ls, h, cfg))
}

/// A plain `for` loop server on its own thread: writes `k` to each connection; after the
/// first, waits for `after_first` (a slow handler). Returns how many it served.
fn for_loop_server(
    l: Listener,
    after_first: Option<crossbeam::channel::Receiver<()>>,
) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut n = 0;
        for r in l.incoming() {
            let (mut s, _) = r.unwrap();
            let _ = s.write_all(b"k");
            if let (0, Some(go)) = (n, &after_first) {
                let _ = go.recv_timeout(T);
            }
            n += 1;
        }
        n
    })
}

#[test]
fn listen_round_robin_indexes_and_close() {
    let (mut m, w) = setup();
    let (a, ia) = grant_rr(&mut m, &w, 1);
    assert_eq!(ia, 0);
    assert_eq!(a.grant(), Some(ServerGrant::RoundRobin));
    assert_eq!(
        a.local_addr(),
        BoundAddr::Inet("127.0.0.1:4321".parse().unwrap())
    );
    let (b, ib) = grant_rr(&mut m, &w, 2);
    assert_eq!(ib, 1, "second concurrent listen(0) takes the next index");
    drop(a);
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(1)
        }
    );
    let (_c, ic) = grant_rr(&mut m, &w, 3);
    assert_eq!(ic, 0, "a closed index is reused");
    drop(b);
}

#[test]
fn listen_shared_accepts_on_the_masters_socket() {
    let (mut m, w) = setup();
    let sock = TcpListener::bind(any_port()).unwrap();
    let addr = sock.local_addr().unwrap();
    let l = listen_with(&mut m, &w, ListenSpec::tcp(addr), |m, seq, _| {
        send_shared_grant(m, seq, 5, addr, sock.as_fd());
    })
    .unwrap();
    drop(sock); // the worker's copy alone keeps it listening
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"hi").unwrap();
    let (mut s, info) = l.accept().unwrap();
    assert_eq!(info.server, Some(ServerId(5)));
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    expect_listening(&mut m, 5);
}

/// A shared grant of a socket that, like the master's, is non-blocking.
fn shared_listener(m: &mut Channel, w: &Worker, server: u32) -> (Listener, TcpListener) {
    let sock = TcpListener::bind(any_port()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let addr = sock.local_addr().unwrap();
    let l = listen_with(m, w, ListenSpec::tcp(addr), |m, seq, _| {
        send_shared_grant(m, seq, server, addr, sock.as_fd());
    })
    .unwrap();
    (l, sock)
}

fn is_non_blocking(sock: &TcpListener) -> bool {
    let flags = nix::fcntl::fcntl(sock, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK)
}

#[test]
fn blocking_accept_on_a_shared_grant_waits_without_touching_the_shared_flag() {
    let (mut m, w) = setup();
    let (l, sock) = shared_listener(&mut m, &w, 6);
    let addr = sock.local_addr().unwrap();
    let waiter = thread::spawn(move || {
        let got = l.accept().map(|(s, _)| s);
        (l, got)
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"hi").unwrap();
    let (l, got) = waiter.join().unwrap();
    let Ok(crate::Stream::Tcp(mut s)) = got else {
        panic!("accept failed: {got:?}");
    };
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    // Other workers' loops share this socket's file flags: they must stay non-blocking.
    assert!(is_non_blocking(&sock));
    drop(l);
}

/// Mixed use of one shared socket: this worker's blocking accept and another worker's event
/// loop on the same open file (as a tokio or Node worker would be). Every connection goes
/// to one of them; losing a race is never an error here, and nobody blocks in `accept`.
#[test]
fn blocking_accept_on_a_shared_grant_loses_races_to_another_worker_quietly() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const CLIENTS: usize = 40;
    let (mut m, w) = setup();
    let (l, sock) = shared_listener(&mut m, &w, 9);
    let addr = sock.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (taken, stop) = (taken.clone(), stop.clone());
        thread::spawn(move || {
            let mut won = 0;
            while !stop.load(Ordering::SeqCst) {
                crate::sys::wait_readable(sock.as_fd(), Duration::from_millis(10)).unwrap();
                match sock.accept() {
                    Ok(_) => {
                        won += 1;
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("the other worker's accept: {e}"),
                }
            }
            won
        })
    };
    let ours = {
        let taken = taken.clone();
        thread::spawn(move || {
            let mut won = 0;
            loop {
                match l.accept() {
                    Ok(_) => {
                        won += 1;
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => return won,
                    Err(e) => panic!("a lost race surfaced as {e}"),
                }
            }
        })
    };
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let deadline = Instant::now() + T;
    while taken.load(Ordering::SeqCst) < CLIENTS {
        assert!(Instant::now() < deadline, "only {taken:?} accepted");
        thread::sleep(Duration::from_millis(2));
    }
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    let ours = ours.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let theirs = other.join().unwrap();
    assert_eq!(ours + theirs, CLIENTS);
    drop(clients);
}

#[test]
fn blocking_accept_on_a_shared_grant_ends_on_disconnect() {
    let (mut m, w) = setup();
    let (l, _sock) = shared_listener(&mut m, &w, 7);
    let waiter = thread::spawn(move || l.accept().map(|_| ()));
    // No client ever comes: only the master's Disconnect can end the wait (a non-blocking
    // accept would have returned WouldBlock at once instead).
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    let err = waiter.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
}

/// `incoming` ends (returns `None`) on a disconnect under a shared grant too, as under
/// round-robin: a plain `for` loop server leaves cleanly.
#[test]
fn incoming_on_a_shared_grant_ends_on_disconnect() {
    let (mut m, w) = setup();
    let (l, sock) = shared_listener(&mut m, &w, 8);
    let addr = sock.local_addr().unwrap();
    let acc = for_loop_server(l, None);
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(acc.join().unwrap(), 1);
}

#[test]
fn listen_failure_keeps_its_kind() {
    let (mut m, w) = setup();
    let r = listen_with(&mut m, &w, ListenSpec::tcp(any_port()), |m, seq, _| {
        let e = ListenError {
            errno: libc::EADDRINUSE,
            context: "bind 127.0.0.1:80".into(),
        };
        let msg = Message::QueryServerReply {
            seq,
            reply: ServerReply::Failed(e),
        };
        m.send_blocking(&msg, &[], Some(T)).unwrap();
    });
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    // The failed query's index is free again.
    let (_l, i) = grant_rr(&mut m, &w, 1);
    assert_eq!(i, 0);
}

#[test]
fn a_grant_after_listen_gave_up_is_closed_and_its_socket_dropped() {
    let (mut m, w) = setup();
    w.set_listen_timeout(Duration::from_millis(50));
    let w2 = w.clone();
    let waiter = thread::spawn(move || w2.listen(ListenSpec::tcp(any_port())));
    let Message::QueryServer { seq, index, .. } = recv(&mut m).msg else {
        panic!("expected queryServer");
    };
    assert_eq!(index, 0);
    // The master stays silent until listen() has given up.
    let err = waiter.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    // Then it grants a shared socket: the worker must hand the server back at once.
    let sock = TcpListener::bind(any_port()).unwrap();
    let addr = sock.local_addr().unwrap();
    send_shared_grant(&mut m, seq, 9, addr, sock.as_fd());
    assert!(w.take_messages().is_empty(), "pumps the late reply");
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(9)
        }
    );
    // The worker kept no copy: with ours closed, nothing listens on the port any more.
    drop(sock);
    assert_eq!(
        TcpStream::connect(addr).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // The timed-out query's index is free again.
    w.set_listen_timeout(T);
    let (_l, i) = grant_rr(&mut m, &w, 1);
    assert_eq!(i, 0);
}

#[test]
fn a_grant_that_cannot_be_used_is_closed() {
    let (mut m, w) = setup();
    // A shared grant whose "socket" is a pipe: the worker cannot listen on it.
    let (not_a_socket, _w) = std::io::pipe().unwrap();
    let r = listen_with(&mut m, &w, ListenSpec::tcp(any_port()), |m, seq, _| {
        send_shared_grant(m, seq, 4, any_port(), not_a_socket.as_fd());
    });
    assert!(r.is_err());
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(4)
        }
    );
    let (_l, i) = grant_rr(&mut m, &w, 1);
    assert_eq!(i, 0, "the index went back with the server");
}

#[test]
fn messages_during_a_query_are_not_lost() {
    let (mut m, w) = setup();
    m.send_blocking(
        &Message::User {
            payload: b"early".to_vec(),
        },
        &[],
        Some(T),
    )
    .unwrap();
    let (_l, _) = grant_rr(&mut m, &w, 1);
    assert_eq!(w.take_messages(), vec![b"early".to_vec()]);
}

/// The answer must not wait for the client: the client sends nothing until it has seen the
/// `Accepted`, so a worker that answered only after its handler had read (or returned) would
/// never answer.
#[test]
fn accepted_before_any_byte_is_read_then_handled() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (done_tx, done_rx) = crossbeam::channel::bounded::<()>(1);
    let handler = Handler::blocking(move |mut s, info| {
        assert_eq!(info.server, Some(ServerId(1)));
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).is_ok() {
            let _ = s.write_all(&buf);
        }
        let _ = done_tx.send(());
    });
    let serve = spawn_serve(&w, vec![l], handler, ServeConfig::new().threads(1));
    expect_listening(&mut m, 1);
    let (mut c, s) = tcp_pair();
    hand_off(&mut m, 1, 7, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(7) });
    assert!(
        done_rx.try_recv().is_err(),
        "the handler cannot be done yet"
    );
    drop(s);
    c.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    done_rx.recv_timeout(T).unwrap();
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

/// Fills the worker's side of the channel: with the fake master not reading, what the worker
/// queues next stays unwritten until the master reads this.
fn clog(m: &mut Channel, w: &Worker) {
    w.send(vec![b'x'; 900_000]).unwrap();
    let _ = m; // read later, with `unclog`
}

fn unclog(m: &mut Channel) {
    match recv(m).msg {
        Message::User { payload } => assert_eq!(payload.len(), 900_000),
        other => panic!("expected the clogging message, got {other:?}"),
    }
}

/// A drain must not close connections answered `Accepted` whose answers are still being
/// written: the master closes its copy on reading the answer, so they are ours to serve.
#[test]
fn a_drain_serves_what_it_answered_while_the_answers_were_queued() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let handler = Handler::blocking(|mut s, _| {
        let mut buf = [0u8; 1];
        if s.read_exact(&mut buf).is_ok() {
            let _ = s.write_all(&buf);
        }
    });
    let serve = spawn_serve(&w, vec![l], handler, ServeConfig::new().threads(1));
    expect_listening(&mut m, 1);
    clog(&mut m, &w);
    let (mut c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    unclog(&mut m);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    drop(s);
    c.write_all(b"k").unwrap();
    let mut got = [0u8; 1];
    c.read_exact(&mut got)
        .expect("served, not closed by the drain");
    assert_eq!(
        serve.join().unwrap().unwrap(),
        ServeOutcome::MasterDisconnect
    );
}

/// With the blocking API, hand-offs are answered as they arrive even while the caller is busy
/// elsewhere (a slow handler); beyond the queue of [`crate::ACCEPT_QUEUE`] they are refused.
#[test]
fn blocking_accept_answers_while_the_caller_is_busy() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (go_tx, go_rx) = crossbeam::channel::bounded::<()>(1);
    let caller = for_loop_server(l, Some(go_rx));
    expect_listening(&mut m, 1);
    let mut pairs = Vec::new();
    for conn in 0..=crate::ACCEPT_QUEUE as u64 {
        let (c, s) = tcp_pair();
        hand_off(&mut m, 1, conn, &s);
        assert_eq!(
            next_answer(&mut m),
            Message::Accepted { conn: ConnId(conn) }
        );
        pairs.push((c, s));
    }
    let (_c, s) = tcp_pair();
    let over = crate::ACCEPT_QUEUE as u64 + 1;
    hand_off(&mut m, 1, over, &s);
    assert_eq!(
        next_answer(&mut m),
        Message::Refused {
            conn: ConnId(over),
            reason: RefuseReason::MaxConnections
        }
    );
    go_tx.send(()).unwrap();
    for (mut c, s) in pairs {
        drop(s);
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(caller.join().unwrap(), crate::ACCEPT_QUEUE + 1);
}

/// A blocking `accept` returns a connection only once its `Accepted` is written: a stream
/// whose answer is still queued would be re-queued, half read, if the worker died.
#[test]
fn blocking_accept_returns_a_stream_only_once_its_answer_is_written() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (tx, rx) = crossbeam::channel::bounded(1);
    let caller = thread::spawn(move || {
        let got = l.accept().map(|(_, info)| info.server);
        let _ = tx.send(got);
        l
    });
    expect_listening(&mut m, 1);
    clog(&mut m, &w);
    let (_c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    // Bounded look for something that must not happen while the answer waits.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "accept returned before its answer was written"
    );
    unclog(&mut m);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    assert_eq!(rx.recv_timeout(T).unwrap().unwrap(), Some(ServerId(1)));
    drop(caller.join().unwrap());
}

/// A round-robin listener in the caller's own mio `Poll`: readable when a connection is
/// ready, which `try_accept` then returns (answered already).
#[test]
fn rr_listener_in_a_callers_poll() {
    use mio::{Events, Interest, Poll, Token};
    let (mut m, w) = setup();
    let (mut l, _) = grant_rr(&mut m, &w, 1);
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut l, Token(7), Interest::READABLE)
        .unwrap();
    expect_listening(&mut m, 1);
    assert_eq!(
        l.try_accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    let (mut c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let mut events = Events::with_capacity(4);
    let deadline = Instant::now() + T;
    let (mut stream, _) = loop {
        poll.poll(&mut events, Some(T)).unwrap();
        match l.try_accept() {
            Ok(got) => break got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "never ready");
            }
            Err(e) => panic!("{e}"),
        }
    };
    stream.write_all(b"k").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
}

#[test]
fn unknown_or_closed_server_is_refused() {
    // Sessions inline on the serve loop, and on a session thread.
    for threads in [0, 1] {
        unknown_or_closed_server_is_refused_with(threads);
    }
}

fn unknown_or_closed_server_is_refused_with(threads: usize) {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (closed, _) = grant_rr(&mut m, &w, 2);
    drop(closed);
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(2)
        }
    );
    let serve = spawn_serve(
        &w,
        vec![l],
        Handler::sessions(Echo),
        ServeConfig::new().threads(threads),
    );
    expect_listening(&mut m, 1);
    let (_c, s) = tcp_pair();
    hand_off(&mut m, 99, 1, &s);
    let refused = |conn| Message::Refused {
        conn: ConnId(conn),
        reason: RefuseReason::ListenerClosed,
    };
    assert_eq!(next_answer(&mut m), refused(1));
    hand_off(&mut m, 2, 2, &s);
    assert_eq!(next_answer(&mut m), refused(2));
    // The worker closed its copies; ours still works (the master re-routes it).
    let mut c2 = tcp_pair();
    hand_off(&mut m, 1, 3, &c2.1);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(3) });
    drop(c2.1);
    echo_once(&mut c2.0, b"x");
    drop(c2.0);
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

#[test]
fn disconnect_lets_the_open_session_finish() {
    // Sessions inline on the serve loop, and on a session thread.
    for threads in [0, 1] {
        disconnect_lets_the_open_session_finish_with(threads);
    }
}

fn disconnect_lets_the_open_session_finish_with(threads: usize) {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let serve = spawn_serve(
        &w,
        vec![l],
        Handler::sessions(Echo),
        ServeConfig::new().threads(threads),
    );
    expect_listening(&mut m, 1);
    let (mut c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    drop(s);
    echo_once(&mut c, b"one");
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(1)
        }
    );
    // Hand-offs racing the disconnect are refused, not lost.
    let (_c2, s2) = tcp_pair();
    hand_off(&mut m, 1, 2, &s2);
    let ans = next_answer(&mut m);
    assert!(
        matches!(
            ans,
            Message::Refused {
                conn: ConnId(2),
                reason: RefuseReason::Draining | RefuseReason::ListenerClosed
            }
        ),
        "{ans:?}"
    );
    // The open connection still works until the client closes it.
    echo_once(&mut c, b"two");
    assert!(!serve.is_finished());
    drop(c);
    assert_eq!(
        serve.join().unwrap().unwrap(),
        ServeOutcome::MasterDisconnect
    );
    // The worker closed its end.
    let end = m.recv_blocking(Some(T));
    assert!(matches!(&end, Err(e) if e.is_closed()), "{end:?}");
}

#[test]
fn channel_eof_ends_serve_promptly() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let serve = spawn_serve(
        &w,
        vec![l],
        Handler::sessions(Echo),
        ServeConfig::new().threads(1),
    );
    expect_listening(&mut m, 1);
    let started = Instant::now();
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!w.is_connected());
}

#[test]
fn slow_handler_does_not_delay_the_next_ack() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let handler = Handler::blocking(|_s, _i| thread::sleep(Duration::from_millis(500)));
    let serve = spawn_serve(&w, vec![l], handler, ServeConfig::new().threads(1));
    expect_listening(&mut m, 1);
    let (_c1, s1) = tcp_pair();
    let (_c2, s2) = tcp_pair();
    hand_off(&mut m, 1, 1, &s1);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let t = Instant::now();
    hand_off(&mut m, 1, 2, &s2);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(2) });
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "ack took {:?}",
        t.elapsed()
    );
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

#[test]
fn max_connections_refuses() {
    // Sessions inline on the serve loop, and on a session thread.
    for threads in [0, 1] {
        max_connections_refuses_with(threads);
    }
}

fn max_connections_refuses_with(threads: usize) {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let cfg = ServeConfig::new()
        .threads(threads)
        .max_connections(1)
        .drain_timeout(Duration::from_secs(1));
    let serve = spawn_serve(&w, vec![l], Handler::sessions(Echo), cfg);
    expect_listening(&mut m, 1);
    let (mut c1, s1) = tcp_pair();
    let (_c2, s2) = tcp_pair();
    hand_off(&mut m, 1, 1, &s1);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    hand_off(&mut m, 1, 2, &s2);
    assert_eq!(
        next_answer(&mut m),
        Message::Refused {
            conn: ConnId(2),
            reason: RefuseReason::MaxConnections
        }
    );
    drop(s1);
    echo_once(&mut c1, b"still served");
    drop(c1);
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

#[test]
fn user_messages_both_ways_and_worker_disconnect() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (tx, rx) = crossbeam::channel::unbounded();
    let cfg = ServeConfig::new().threads(1).on_message(move |p| {
        let _ = tx.send(p);
    });
    let serve = spawn_serve(&w, vec![l], Handler::sessions(Echo), cfg);
    expect_listening(&mut m, 1);
    m.send_blocking(
        &Message::User {
            payload: b"ping".to_vec(),
        },
        &[],
        Some(T),
    )
    .unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), b"ping".to_vec());
    let w2 = w.clone();
    thread::spawn(move || w2.send(b"pong".to_vec()).unwrap())
        .join()
        .unwrap();
    assert_eq!(
        recv(&mut m).msg,
        Message::User {
            payload: b"pong".to_vec()
        }
    );
    w.disconnect().unwrap();
    assert_eq!(recv(&mut m).msg, Message::ExitedAfterDisconnect);
    assert_eq!(
        serve.join().unwrap().unwrap(),
        ServeOutcome::WorkerDisconnect
    );
}

#[test]
fn standalone_listen_and_serve() {
    // Sessions inline on the serve loop, and on a session thread.
    for threads in [0, 1] {
        standalone_listen_and_serve_with(threads);
    }
}

fn standalone_listen_and_serve_with(threads: usize) {
    assert!(!crate::is_worker());
    let l = crate::listen(ListenSpec::tcp(any_port())).unwrap();
    let BoundAddr::Inet(addr) = l.local_addr() else {
        panic!("not inet")
    };
    assert_ne!(addr.port(), 0);
    let stop = Shutdown::new();
    let cfg = ServeConfig::new().threads(threads).shutdown(&stop);
    let serve = thread::spawn(move || crate::serve(vec![l], Handler::sessions(Echo), cfg));
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        echo_once(&mut c, b"standalone");
    }
    stop.trigger();
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::Stopped);
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener closed after serve"
    );
}

#[test]
fn standalone_listen_sets_defer_accept_when_asked() {
    let plain = crate::listen(ListenSpec::tcp(any_port())).unwrap();
    let deferred = crate::listen(ListenSpec::tcp(any_port()).defer_accept(true)).unwrap();
    let value = |l: &Listener| cluster_ipc::tcp_defer_accept(l.as_socket_fd().unwrap()).unwrap();
    assert_eq!(value(&plain), 0);
    assert!(value(&deferred) > 0);
}

#[test]
fn exclusive_and_ipv6_bind_in_the_worker() {
    let (_m, w) = setup();
    let mut spec = ListenSpec::tcp(any_port());
    spec.exclusive = true;
    let l = w.listen(spec).unwrap(); // no query: the fake master never answers
    assert_eq!(l.server(), None);
    let BoundAddr::Inet(a) = l.local_addr() else {
        panic!()
    };
    let second = crate::listen(ListenSpec::tcp(a)).unwrap_err();
    assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
}

#[test]
fn rr_blocking_accept_and_incoming_end_on_disconnect() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let acc = for_loop_server(l, None);
    expect_listening(&mut m, 1);
    let (mut c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(acc.join().unwrap(), 1);
}

/// A session that reports the thread it runs on and greets the master from `on_ready`.
struct Where {
    worker: Worker,
    tx: crossbeam::channel::Sender<thread::ThreadId>,
}
struct WhereSession(Worker, crossbeam::channel::Sender<thread::ThreadId>);

impl Session for WhereSession {
    fn on_ready(&mut self, _conn: &mut Stream, _now: Instant) -> std::io::Result<Next> {
        let _ = self.1.send(thread::current().id());
        // Inline, this runs on the serve loop: it must not hold the worker's lock here.
        self.0.send(b"hi".to_vec())?;
        Ok(Next::Close)
    }
}

impl SessionFactory for Where {
    type Session = WhereSession;
    fn new_session(&self, _info: &ConnInfo) -> WhereSession {
        WhereSession(self.worker.clone(), self.tx.clone())
    }
}

#[test]
fn sessions_run_inline_by_default_under_a_master() {
    for (cfg, inline) in [
        (ServeConfig::new(), true),
        (ServeConfig::new().threads(0), true),
        (ServeConfig::new().threads(1), false),
    ] {
        let (mut m, w) = setup();
        let (l, _) = grant_rr(&mut m, &w, 1);
        let (tx, rx) = crossbeam::channel::unbounded();
        let h = Handler::sessions(Where {
            worker: w.clone(),
            tx,
        });
        let serve = spawn_serve(&w, vec![l], h, cfg);
        expect_listening(&mut m, 1);
        let (_c, s) = tcp_pair();
        hand_off(&mut m, 1, 1, &s);
        assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
        let ran_on = rx.recv_timeout(T).unwrap();
        assert_eq!(ran_on == serve.thread().id(), inline);
        assert_eq!(
            next_answer(&mut m),
            Message::User {
                payload: b"hi".to_vec()
            }
        );
        drop(m);
        assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
    }
}

/// Many hand-offs arriving together are answered together (one batch of frames), in order,
/// before any of them is served; then every one is served.
#[test]
fn a_burst_of_hand_offs_is_answered_in_order() {
    for threads in [0, 1] {
        let (mut m, w) = setup();
        let (l, _) = grant_rr(&mut m, &w, 1);
        let serve = spawn_serve(
            &w,
            vec![l],
            Handler::sessions(Echo),
            ServeConfig::new().threads(threads),
        );
        expect_listening(&mut m, 1);
        let pairs: Vec<_> = (0..40).map(|_| tcp_pair()).collect();
        for (i, (_, s)) in pairs.iter().enumerate() {
            let msg = Message::new_conn(ServerId(1), ConnId(i as u64), tcp_peer(s));
            // Queued back to back, so most arrive in one read on the worker's side.
            m.send(&msg, &[s.as_fd()]).unwrap();
        }
        m.flush_blocking(Some(T)).unwrap();
        for i in 0..40u64 {
            assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(i) });
        }
        for (mut c, s) in pairs {
            drop(s);
            echo_once(&mut c, b"burst");
        }
        drop(m);
        assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
    }
}

/// A hand-off's `ConnInfo` names the client: typed and addressed by one `getpeername`.
#[test]
fn hand_off_info_names_the_client() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (tx, rx) = crossbeam::channel::unbounded();
    let handler = Handler::blocking(move |_s, info| {
        let _ = tx.send(info);
    });
    let serve = spawn_serve(&w, vec![l], handler, ServeConfig::new().threads(1));
    expect_listening(&mut m, 1);
    let (c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let info = rx.recv_timeout(T).unwrap();
    assert_eq!(info.server, Some(ServerId(1)));
    assert_eq!(info.peer, Some(c.local_addr().unwrap()));
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

/// Runs `l.accept()` on a thread; its result (stream dropped) arrives on the receiver.
fn accept_in_thread(
    l: Listener,
) -> crossbeam::channel::Receiver<std::io::Result<Option<ServerId>>> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(l.accept().map(|(_, info)| info.server));
    });
    rx
}

/// A Disconnect another thread has already read leaves the channel silent: the blocking
/// accept on a shared socket must still end, and not take the next client.
#[test]
fn shared_accept_ends_on_a_disconnect_read_by_another_thread() {
    let (mut m, w) = setup();
    let (l, sock) = shared_listener(&mut m, &w, 6);
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert!(
        w.take_messages().is_empty(),
        "pumps (records) the Disconnect"
    );
    let rx = accept_in_thread(l);
    // A client that comes later must not be taken by a worker that is leaving.
    let _c = TcpStream::connect(sock.local_addr().unwrap()).unwrap();
    let err = rx.recv_timeout(T).unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
}

#[test]
fn shared_accept_ends_on_worker_disconnect() {
    let (mut m, w) = setup();
    let (l, _sock) = shared_listener(&mut m, &w, 6);
    let rx = accept_in_thread(l);
    w.disconnect().unwrap();
    let err = rx.recv_timeout(T).unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
}

/// An `exclusive` listener is bound in the worker, but the worker still leaves on the
/// master's Disconnect: its blocking accept ends as a granted one's does.
#[test]
fn exclusive_accept_ends_on_master_disconnect() {
    let (mut m, w) = setup();
    let mut spec = ListenSpec::tcp(any_port());
    spec.exclusive = true;
    let l = w.listen(spec).unwrap();
    let rx = accept_in_thread(l);
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    let err = rx.recv_timeout(T).unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
}

/// A reply to a query the worker never sent is nobody's: a granted server is handed back and
/// its socket closed, not kept for ever.
#[test]
fn a_reply_nobody_asked_for_is_closed_and_its_socket_dropped() {
    let (mut m, w) = setup();
    let sock = TcpListener::bind(any_port()).unwrap();
    let addr = sock.local_addr().unwrap();
    send_shared_grant(&mut m, cluster_core::Seq(10_000), 900, addr, sock.as_fd());
    assert!(w.take_messages().is_empty(), "pumps the reply");
    assert_eq!(
        recv(&mut m).msg,
        Message::Close {
            server: ServerId(900)
        }
    );
    // With ours closed, nothing listens on the port any more: the worker kept no copy.
    drop(sock);
    assert_eq!(
        TcpStream::connect(addr).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // Queries the worker does send still get their replies.
    let (_l, i) = grant_rr(&mut m, &w, 1);
    assert_eq!(i, 0);
}

/// User messages the application does not take are kept up to `USER_QUEUE`, the oldest
/// dropped and counted beyond it.
#[test]
fn user_messages_nobody_takes_are_bounded() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    // The answerer reads the channel for this listener, user messages included.
    let caller = for_loop_server(l, None);
    expect_listening(&mut m, 1);
    let sent = crate::USER_QUEUE + 100;
    for i in 0..sent {
        let payload = u32::try_from(i).unwrap().to_be_bytes().to_vec();
        m.send_blocking(&Message::User { payload }, &[], Some(T))
            .unwrap();
    }
    // Answers come in order: once this one is back, every message before it was read.
    let (_c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let kept = w.take_messages();
    assert_eq!(kept.len(), crate::USER_QUEUE);
    assert_eq!(
        kept[0],
        100u32.to_be_bytes().to_vec(),
        "the oldest were dropped"
    );
    assert_eq!(w.messages_dropped(), 100);
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(caller.join().unwrap(), 1);
}

/// A listener first driven by the application (`try_accept`), then given to a serve: the
/// serve's limits decide, not the application's accept queue.
#[test]
fn a_serve_takes_over_a_listener_the_application_used() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    assert_eq!(
        l.try_accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    expect_listening(&mut m, 1);
    let (hold_tx, hold_rx) = crossbeam::channel::unbounded::<()>();
    let handler = Handler::blocking(move |_s, _| {
        let _ = hold_rx.recv_timeout(T);
    });
    let (started_tx, started_rx) = crossbeam::channel::bounded(1);
    let cfg = ServeConfig::new()
        .threads(2)
        .max_connections(1)
        .on_message(move |_| {
            let _ = started_tx.try_send(());
        });
    let serve = spawn_serve(&w, vec![l], handler, cfg);
    // The serve delivers a message only from its loop, which runs once it took the server.
    m.send_blocking(&Message::User { payload: vec![] }, &[], Some(T))
        .unwrap();
    started_rx.recv_timeout(T).unwrap();
    let (_c1, s1) = tcp_pair();
    hand_off(&mut m, 1, 1, &s1);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    let (_c2, s2) = tcp_pair();
    hand_off(&mut m, 1, 2, &s2);
    assert_eq!(
        next_answer(&mut m),
        Message::Refused {
            conn: ConnId(2),
            reason: RefuseReason::MaxConnections
        }
    );
    drop(hold_tx);
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    assert_eq!(
        serve.join().unwrap().unwrap(),
        ServeOutcome::MasterDisconnect
    );
}

/// A connection whose `Accepted` was still queued when the worker closed its channel is the
/// master's to re-queue (it never read the answer): the worker must drop it, not serve it.
#[test]
fn a_stream_whose_answer_never_went_out_is_dropped_when_the_channel_closes() {
    let (mut m, w) = setup();
    let (app, _) = grant_rr(&mut m, &w, 1);
    let (served, _) = grant_rr(&mut m, &w, 2);
    assert_eq!(
        app.try_accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    expect_listening(&mut m, 1);
    let (marker_tx, marker_rx) = crossbeam::channel::bounded(1);
    let cfg = ServeConfig::new().threads(1).on_message(move |_| {
        let _ = marker_tx.try_send(());
    });
    let serve = spawn_serve(&w, vec![served], Handler::blocking(|_, _| {}), cfg);
    expect_listening(&mut m, 2);
    clog(&mut m, &w);
    let (_c, s) = tcp_pair();
    hand_off(&mut m, 1, 7, &s);
    // Frames are read in order: once the serve delivers this, the hand-off was answered.
    m.send_blocking(&Message::User { payload: vec![] }, &[], Some(T))
        .unwrap();
    marker_rx.recv_timeout(T).unwrap();
    m.send_blocking(&Message::Disconnect, &[], Some(T)).unwrap();
    // The serve's final flush gives up on the clogged channel and closes it.
    assert_eq!(
        serve.join().unwrap().unwrap(),
        ServeOutcome::MasterDisconnect
    );
    let err = accept_in_thread(app).recv_timeout(T).unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    // The master never gets the answer, so it re-queues the connection itself.
    loop {
        match m.recv_blocking(Some(T)) {
            Ok(r) => assert!(
                !matches!(r.msg, Message::Accepted { .. }),
                "{:?}",
                r.msg.name()
            ),
            Err(e) => {
                assert!(e.is_closed(), "{e}");
                break;
            }
        }
    }
}

/// One pump reads a bounded number of frames; the next reads the rest.
#[test]
fn a_pump_reads_a_bounded_number_of_frames() {
    let (mut m, ours) = Channel::pair().unwrap();
    let link = crate::link::Link::new(ours, WorkerId(1)).unwrap();
    assert_eq!(recv(&mut m).msg, Message::Online);
    let sent = crate::link::PUMP_FRAMES + 100;
    for _ in 0..sent {
        // Queued, so they go out in a few large writes that the socket's buffer holds.
        m.queue(&Message::User { payload: vec![] }).unwrap();
    }
    m.flush_blocking(Some(T)).unwrap();
    let mut st = link.lock();
    st.pump();
    assert!(st.has_unread());
    assert_eq!(st.take_user().len(), crate::link::PUMP_FRAMES);
    st.pump();
    assert!(!st.has_unread());
    assert_eq!(st.take_user().len(), 100);
    assert_eq!(st.user_dropped(), 0);
}

/// A flood larger than one pump is all delivered by a serve loop: what one pass leaves
/// behind is read on the next, with no new readiness edge.
#[test]
fn a_serve_loop_reads_a_flood_to_the_end() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    let (tx, rx) = crossbeam::channel::unbounded();
    let cfg = ServeConfig::new().threads(1).on_message(move |p| {
        let _ = tx.send(p);
    });
    let serve = spawn_serve(&w, vec![l], Handler::sessions(Echo), cfg);
    expect_listening(&mut m, 1);
    let sent = 3 * crate::link::PUMP_FRAMES;
    for i in 0..sent {
        let payload = u32::try_from(i).unwrap().to_be_bytes().to_vec();
        m.send(&Message::User { payload }, &[]).unwrap();
    }
    m.flush_blocking(Some(T)).unwrap();
    for i in 0..sent {
        let want = u32::try_from(i).unwrap().to_be_bytes().to_vec();
        assert_eq!(rx.recv_timeout(T).unwrap(), want);
    }
    drop(m);
    assert_eq!(serve.join().unwrap().unwrap(), ServeOutcome::MasterGone);
}

/// A blocking `accept` whose answerer thread has stopped reads the channel itself: the
/// hand-offs are still answered and the connection returned.
#[test]
fn blocking_accept_answers_itself_when_the_answerer_fails() {
    let (mut m, w) = setup();
    let (l, _) = grant_rr(&mut m, &w, 1);
    w.test_link().lock().answerer_fails = true;
    let rx = accept_in_thread(l);
    expect_listening(&mut m, 1);
    let (_c, s) = tcp_pair();
    hand_off(&mut m, 1, 1, &s);
    assert_eq!(next_answer(&mut m), Message::Accepted { conn: ConnId(1) });
    assert_eq!(rx.recv_timeout(T).unwrap().unwrap(), Some(ServerId(1)));
}

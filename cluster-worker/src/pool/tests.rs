//! Session threads against real sockets: a thread whose `poll` fails for good stops taking
//! connections, and nothing handed to it goes uncounted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Poll, Token, Waker};

use super::Pool;
use crate::handler::{ConnInfo, HandlerKind, Next, Session, SessionFactory};
use crate::shared::Shared;
use crate::stream::Stream;

const T: Duration = Duration::from_secs(5);

/// Answers a status line once the request head is in, then closes.
struct Ok200(Vec<u8>);

impl Session for Ok200 {
    fn on_ready(&mut self, conn: &mut Stream, _now: Instant) -> std::io::Result<Next> {
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(Next::Close),
                Ok(n) => self.0.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.0.windows(4).any(|w| w == b"\r\n\r\n") {
            conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n")?;
            return Ok(Next::Close);
        }
        Ok(Next::Continue)
    }
}

struct Ok200s;

impl SessionFactory for Ok200s {
    type Session = Ok200;
    fn new_session(&self, _info: &ConnInfo) -> Ok200 {
        Ok200(Vec::new())
    }
}

/// A pool of `threads` session threads; `fail` is the index of the thread whose first
/// `poll` fails. The `Poll` returned owns the waker the pool's `Shared` wakes on drain.
fn pool_with_failing(threads: usize, fail: Option<usize>) -> (Pool, Arc<Shared>, Poll) {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
    let shared = Arc::new(Shared::new(waker));
    shared
        .fail_poll_of
        .store(fail.map_or(0, |i| i + 1), Ordering::SeqCst);
    let kind = HandlerKind::Sessions(Arc::new(Ok200s));
    let pool = Pool::start(&kind, threads, 0, shared.clone()).unwrap();
    (pool, shared, poll)
}

/// Waits (bounded) until `n` session threads have marked themselves dead.
fn wait_dead(pool: &Pool, n: usize) {
    let Pool::Sessions { threads, .. } = pool else {
        panic!("not a session pool");
    };
    let deadline = Instant::now() + T;
    while threads
        .iter()
        .filter(|t| t.dead.load(Ordering::SeqCst))
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "session thread never died");
        std::thread::yield_now();
    }
}

/// A client and the server side of its connection, as a hand-off would bring it.
fn client_and_conn() -> (TcpStream, Stream, ConnInfo) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, peer) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let info = ConnInfo {
        server: None,
        peer: Some(peer),
    };
    (c, Stream::Tcp(s), info)
}

fn status_line(c: &mut TcpStream) -> std::io::Result<String> {
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line)?;
    Ok(line)
}

#[test]
fn a_dead_session_thread_gets_no_connections_and_the_others_serve() {
    let (mut pool, shared, _poll) = pool_with_failing(2, Some(0));
    wait_dead(&pool, 1);
    assert!(pool.room(None)(0), "one thread still runs");
    for _ in 0..6 {
        let (mut c, stream, info) = client_and_conn();
        pool.count_in();
        pool.dispatch(stream, info);
        assert_eq!(status_line(&mut c).unwrap(), "HTTP/1.1 200 OK\r\n");
    }
    pool.drain();
    pool.shutdown();
    assert_eq!(
        shared.live.load(Ordering::SeqCst),
        0,
        "every connection counted"
    );
}

#[test]
fn with_every_session_thread_dead_the_pool_refuses_and_counts_nothing_lost() {
    let (mut pool, shared, _poll) = pool_with_failing(1, Some(0));
    wait_dead(&pool, 1);
    assert!(
        !pool.room(None)(0),
        "the serve loop must refuse, so the master re-routes"
    );
    // Dispatched anyway (taken before the thread died): closed at once and counted.
    let (mut c, stream, info) = client_and_conn();
    pool.count_in();
    pool.dispatch(stream, info);
    assert_eq!(shared.live.load(Ordering::SeqCst), 0);
    let mut rest = Vec::new();
    assert_eq!(
        c.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed, not parked"
    );
    pool.shutdown();
}

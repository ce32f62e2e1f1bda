//! `SessionSet` against real sockets and a real mio `Poll`: tokens, stale events, timers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

use super::SessionSet;
use crate::handler::{ConnInfo, DynFactory, Next, Session, SessionFactory};
use crate::shared::Shared;
use crate::stream::Stream;

const T: Duration = Duration::from_secs(5);

/// What a test sees of one session: how often it ran, and what it answers next.
struct Probe {
    calls: AtomicUsize,
    next: Mutex<Next>,
}

#[derive(Clone, Default)]
struct Probes(Arc<Mutex<Vec<Arc<Probe>>>>);

impl Probes {
    fn get(&self, i: usize) -> Arc<Probe> {
        self.0.lock().unwrap()[i].clone()
    }
}

struct ProbeSession(Arc<Probe>);

impl Session for ProbeSession {
    fn on_ready(&mut self, conn: &mut Stream, _now: Instant) -> std::io::Result<Next> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 256];
        // Edge-triggered: read to WouldBlock, or the next edge never comes.
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(*self.0.next.lock().unwrap())
    }
}

impl SessionFactory for Probes {
    type Session = ProbeSession;
    fn new_session(&self, _info: &ConnInfo) -> ProbeSession {
        let p = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            next: Mutex::new(Next::Continue),
        });
        self.0.lock().unwrap().push(p.clone());
        ProbeSession(p)
    }
}

struct Rig {
    poll: Poll,
    events: Events,
    shared: Arc<Shared>,
    set: SessionSet,
    probes: Probes,
    listener: TcpListener,
}

impl Rig {
    fn new() -> Rig {
        let probes = Probes::default();
        Rig::with_factory(probes.clone(), probes)
    }

    /// A rig whose sessions come from `factory` (`probes` stays empty unless it is the factory).
    fn with_factory(factory: impl SessionFactory, probes: Probes) -> Rig {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let shared = Arc::new(Shared::new(waker));
        let factory: Arc<dyn DynFactory> = Arc::new(factory);
        let set = SessionSet::new(factory, shared.clone(), false);
        Rig {
            poll,
            events: Events::with_capacity(64),
            shared,
            set,
            probes,
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    /// A client and the server side of it, as the loop would have taken it.
    fn pair(&self) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(self.listener.local_addr().unwrap()).unwrap();
        let (s, _) = self.listener.accept().unwrap();
        // Every stream reaches the sessions non-blocking (see `Sessions::add`).
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    fn add(&mut self, server_side: TcpStream) {
        self.shared.live.fetch_add(1, Ordering::SeqCst);
        let info = ConnInfo {
            server: None,
            peer: None,
        };
        self.set.add(Stream::Tcp(server_side), &info);
    }

    /// One poll (bounded), feeding its events to the set; returns the tokens seen.
    fn poll_once(&mut self, timeout: Duration) -> Vec<Token> {
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        let toks: Vec<Token> = self.events.iter().map(|e| e.token()).collect();
        for &t in &toks {
            assert!(self.set.on_event(t), "not a session token: {t:?}");
        }
        toks
    }
}

#[test]
fn a_new_session_runs_at_once_and_close_frees_its_slot() {
    let mut r = Rig::new();
    let (_c, s) = r.pair();
    r.add(s);
    r.set.run(Instant::now(), r.poll.registry());
    let p = r.probes.get(0);
    assert_eq!(p.calls.load(Ordering::SeqCst), 1);
    *p.next.lock().unwrap() = Next::Close;
    r.set.drain();
    r.set.run(Instant::now(), r.poll.registry());
    assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    assert_eq!(r.set.open(), 0);
    assert_eq!(r.shared.live.load(Ordering::SeqCst), 0);
}

/// Closing our only fd for a socket drops its epoll registration: a later socket that gets
/// the same fd number is registered afresh and the old token never reports again.
#[test]
fn a_closed_and_reused_fd_number_gets_no_stale_events() {
    let poll_check = |poll: &mut Poll, events: &mut Events, want: Token, stale: Token| {
        let deadline = Instant::now() + T;
        loop {
            assert!(Instant::now() < deadline, "no event for {want:?}");
            poll.poll(events, Some(T)).unwrap();
            let toks: Vec<Token> = events.iter().map(|e| e.token()).collect();
            assert!(!toks.contains(&stale), "stale event for {stale:?}");
            if toks.contains(&want) {
                return;
            }
        }
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(16);
    let mut ca = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    let a_fd = a.as_raw_fd();
    let mut a = mio::net::TcpStream::from_std(a);
    poll.registry()
        .register(&mut a, Token(1), Interest::READABLE)
        .unwrap();
    drop(a);
    let mut cb = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    // Usually the same number (the kernel hands out the lowest free one); other tests'
    // threads may take it first, which makes this check weaker but not wrong.
    let reused = b.as_raw_fd() == a_fd;
    let mut b = mio::net::TcpStream::from_std(b);
    poll.registry()
        .register(&mut b, Token(2), Interest::READABLE)
        .unwrap();
    // The old socket's peer talks first: if its registration had survived, its event would
    // be reported no later than the new one's.
    let _ = ca.write_all(b"old");
    cb.write_all(b"new").unwrap();
    poll_check(&mut poll, &mut events, Token(2), Token(1));
    eprintln!("fd number reused: {reused}");
}

/// While another fd holds the same socket (the master's copy until it reads our `Accepted`),
/// closing ours leaves the registration alive under the old token. The set must ignore those
/// events even once the slot serves another connection.
#[test]
fn stale_events_of_a_reused_slot_are_ignored() {
    let mut r = Rig::new();
    let (mut c1, s1) = r.pair();
    let masters_copy = s1.try_clone().unwrap();
    r.add(s1);
    r.set.run(Instant::now(), r.poll.registry());
    let first = r.probes.get(0);
    *first.next.lock().unwrap() = Next::Close;
    c1.write_all(b"x").unwrap();
    let deadline = Instant::now() + T;
    while first.calls.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the first session never ran again"
        );
        r.poll_once(T);
        r.set.run(Instant::now(), r.poll.registry());
    }
    assert_eq!(r.set.open(), 0);

    // The slot is reused by the next connection, under a new generation.
    let (_c2, s2) = r.pair();
    r.add(s2);
    r.set.run(Instant::now(), r.poll.registry());
    // Its registration reports writable at once (edge-triggered): take that event first.
    r.poll_once(T);
    r.set.run(Instant::now(), r.poll.registry());
    let second = r.probes.get(1);
    let before = second.calls.load(Ordering::SeqCst);

    // The first socket is still open through the "master's" fd: its event comes, with the
    // old token, and must not run the second session.
    c1.write_all(b"y").unwrap();
    let toks = r.poll_once(T);
    assert!(
        !toks.is_empty(),
        "the surviving registration reported nothing"
    );
    r.set.run(Instant::now(), r.poll.registry());
    assert_eq!(second.calls.load(Ordering::SeqCst), before);
    drop(masters_copy);
}

#[test]
fn timers_fire_in_order_and_only_when_due() {
    let mut r = Rig::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (c, s) = r.pair();
        clients.push(c);
        r.add(s);
    }
    let t0 = Instant::now();
    let at = [
        t0 + Duration::from_secs(30),
        t0 + Duration::from_secs(10),
        t0 + Duration::from_secs(20),
    ];
    for (i, t) in at.iter().enumerate() {
        *r.probes.get(i).next.lock().unwrap() = Next::WakeAt(*t);
    }
    r.set.run(t0, r.poll.registry());
    assert_eq!(r.set.next_wake(), Some(at[1]));
    // Nothing due yet: nobody runs.
    r.set.run(t0 + Duration::from_secs(5), r.poll.registry());
    let calls = |r: &Rig| -> Vec<usize> {
        (0..3)
            .map(|i| r.probes.get(i).calls.load(Ordering::SeqCst))
            .collect()
    };
    assert_eq!(calls(&r), [1, 1, 1]);
    // The 10 s session is due; it now wants nothing more.
    *r.probes.get(1).next.lock().unwrap() = Next::Continue;
    r.set.run(t0 + Duration::from_secs(15), r.poll.registry());
    assert_eq!(calls(&r), [1, 2, 1]);
    assert_eq!(r.set.next_wake(), Some(at[2]));
    // Both others are due; one wants a later wake, the other nothing.
    let later = t0 + Duration::from_secs(50);
    *r.probes.get(0).next.lock().unwrap() = Next::WakeAt(later);
    *r.probes.get(2).next.lock().unwrap() = Next::Continue;
    r.set.run(t0 + Duration::from_secs(40), r.poll.registry());
    assert_eq!(calls(&r), [2, 2, 2]);
    assert_eq!(r.set.next_wake(), Some(later));
    *r.probes.get(0).next.lock().unwrap() = Next::Continue;
    r.set.run(later, r.poll.registry());
    assert_eq!(calls(&r), [3, 2, 2]);
    assert_eq!(r.set.next_wake(), None);
}

/// A session that pushes its deadline on every call (an idle timeout) leaves dead heap
/// entries behind; they are compacted away instead of piling up.
#[test]
fn moving_deadlines_do_not_grow_the_timer_heap() {
    let mut r = Rig::new();
    let (_c, s) = r.pair();
    r.add(s);
    let p = r.probes.get(0);
    let t0 = Instant::now();
    for i in 0..10_000u64 {
        *p.next.lock().unwrap() =
            Next::WakeAt(t0 + Duration::from_secs(60) + Duration::from_millis(i));
        // An event each time, as a busy keep-alive connection would get.
        r.set.on_event(super::token(0, 0));
        r.set.run(t0, r.poll.registry());
    }
    assert!(
        r.set.timer_entries() <= 2 + super::TIMER_SLACK,
        "{}",
        r.set.timer_entries()
    );
    assert_eq!(
        r.set.next_wake(),
        Some(t0 + Duration::from_secs(60) + Duration::from_millis(9_999))
    );
}

/// Application code that panics: in the factory, or in a session's `on_drain`.
struct Panicky {
    in_make: bool,
}

struct PanickySession;

impl Session for PanickySession {
    fn on_ready(&mut self, _conn: &mut Stream, _now: Instant) -> std::io::Result<Next> {
        Ok(Next::Continue)
    }

    fn on_drain(&mut self) {
        panic!("test: on_drain panics");
    }
}

impl SessionFactory for Panicky {
    type Session = PanickySession;
    fn new_session(&self, _info: &ConnInfo) -> PanickySession {
        assert!(!self.in_make, "test: the factory panics");
        PanickySession
    }
}

#[test]
fn a_panicking_factory_loses_only_its_client() {
    let mut r = Rig::with_factory(Panicky { in_make: true }, Probes::default());
    let (mut c, s) = r.pair();
    r.add(s);
    assert_eq!(r.set.open(), 0);
    assert_eq!(
        r.shared.live.load(Ordering::SeqCst),
        0,
        "counted as finished"
    );
    c.set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        c.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed, not left open"
    );
}

#[test]
fn a_session_panicking_in_on_drain_is_closed_and_counted() {
    let mut r = Rig::with_factory(Panicky { in_make: false }, Probes::default());
    let (_c1, s1) = r.pair();
    let (_c2, s2) = r.pair();
    r.add(s1);
    r.add(s2);
    r.set.run(Instant::now(), r.poll.registry());
    assert_eq!(r.set.open(), 2);
    r.set.drain();
    assert_eq!(r.set.open(), 0);
    assert_eq!(r.shared.live.load(Ordering::SeqCst), 0);
}

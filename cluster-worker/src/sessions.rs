//! The bookkeeping of event-driven sessions on one mio `Poll`, shared by the session threads
//! and by the serve loop when it runs sessions itself (inline mode, `ServeConfig::threads(0)`).
//!
//! - **Slots.** Sessions live in a slab; a session's token is its slot plus the slot's
//!   generation, which changes every time the slot is freed. An event whose generation does
//!   not match is stale and ignored: that is what makes it safe to close a session's socket
//!   without `epoll_ctl(DEL)` first. Closing an fd removes its epoll registration only once
//!   every fd for the same open file description is closed, and a round-robin connection's
//!   description is also held by the master until it has read our `Accepted`; meanwhile the
//!   registration lives on under the old token and may still report events.
//! - **Ready list.** Tokens to call `on_ready` for, each at most once per pass (a flag in the
//!   entry instead of a sort + dedup).
//! - **Timers.** A min-heap of `(wake time, token)` with lazy deletion: an entry is live only
//!   while its session still wants that exact time, so changing a wake time is one push
//!   (O(log n)) and the next wake is the top of the heap (O(1) after popping dead entries).
//!   The heap is rebuilt when dead entries outnumber live ones, so sessions that keep moving
//!   a far-off deadline (idle timeouts) cannot grow it without bound.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use mio::{Interest, Registry, Token};

use crate::handler::{ConnInfo, DynFactory, Next, Session};
use crate::shared::Shared;
use crate::stream::Stream;

/// Session tokens have the top bit set, so they never collide with the small fixed tokens of
/// the serve loop (channel, waker, listeners) or a session thread's waker.
const TAG: usize = 1 << (usize::BITS - 1);
const SLOT_BITS: u32 = usize::BITS / 2;
const SLOT_MASK: usize = (1 << SLOT_BITS) - 1;
/// The generation takes the bits between the tag and the slot.
const GEN_MASK: usize = (TAG - 1) >> SLOT_BITS;
/// Dead timer entries tolerated beyond the live ones before the heap is rebuilt.
const TIMER_SLACK: usize = 64;

fn token(slot: usize, generation: usize) -> Token {
    Token(TAG | ((generation & GEN_MASK) << SLOT_BITS) | slot)
}

fn decode(t: Token) -> Option<(usize, usize)> {
    (t.0 & TAG != 0).then_some((t.0 & SLOT_MASK, (t.0 >> SLOT_BITS) & GEN_MASK))
}

struct Entry {
    conn: Stream,
    session: Box<dyn Session>,
    wake_at: Option<Instant>,
    /// In the ready list already.
    queued: bool,
    /// Registered in the `Poll`: only once a first `on_ready` did not finish the connection.
    registered: bool,
}

struct Slot {
    generation: usize,
    entry: Option<Entry>,
}

/// The sessions of one `Poll` (see the module docs).
pub(crate) struct SessionSet {
    factory: Arc<dyn DynFactory>,
    shared: Arc<Shared>,
    /// Whether a finished connection must wake the serve loop (when it drains): false when
    /// this set runs on the serve loop itself.
    wake_loop: bool,
    slots: Vec<Slot>,
    free: Vec<usize>,
    ready: Vec<Token>,
    /// The ready list being worked through, kept to reuse its allocation.
    running: Vec<Token>,
    timers: BinaryHeap<Reverse<(Instant, Token)>>,
    /// Sessions with a wake time: the live entries of `timers`.
    timed: usize,
    drained: bool,
}

impl std::fmt::Debug for SessionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSet")
            .field("open", &(self.slots.len() - self.free.len()))
            .field("timed", &self.timed)
            .field("drained", &self.drained)
            .finish_non_exhaustive()
    }
}

impl SessionSet {
    pub(crate) fn new(factory: Arc<dyn DynFactory>, shared: Arc<Shared>, wake_loop: bool) -> Self {
        SessionSet {
            factory,
            shared,
            wake_loop,
            slots: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            running: Vec::new(),
            timers: BinaryHeap::new(),
            timed: 0,
            drained: false,
        }
    }

    fn finished(&self) {
        if self.wake_loop {
            self.shared.finished();
        } else {
            self.shared.finished_quietly();
        }
    }

    /// Starts a session for a connection already counted in `shared.live`. It gets a first
    /// `on_ready` at the next [`run`](Self::run), and is registered in the `Poll` only if
    /// that does not finish it: a `Connection: close` request has usually arrived by the time
    /// the connection is taken, so most such connections never cost an `epoll_ctl`. Registering
    /// after the first go loses nothing: `EPOLL_CTL_ADD` reports the readiness the socket
    /// already has.
    ///
    /// The stream is non-blocking already: the master hands connections over that way and the
    /// serve loop accepts that way, so no `FIONBIO` is paid per connection.
    pub(crate) fn add(&mut self, stream: Stream, info: &ConnInfo) {
        let conn = stream;
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < SLOT_MASK => {
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                self.slots.len() - 1
            }
            None => {
                // 2^32 open sessions (2^16 on a 32-bit target): the fd limit comes first.
                self.finished();
                return;
            }
        };
        // User code: a panic here loses this client (closed and counted), not the thread and
        // every session on it.
        let (factory, drained) = (&self.factory, self.drained);
        let made = catch_unwind(AssertUnwindSafe(|| {
            let mut session = factory.make(info);
            if drained {
                session.on_drain();
            }
            session
        }));
        let (Ok(session), Some(s)) = (made, self.slots.get_mut(slot)) else {
            self.free.push(slot);
            self.finished();
            return;
        };
        let tok = token(slot, s.generation);
        s.entry = Some(Entry {
            conn,
            session,
            wake_at: None,
            queued: true,
            registered: false,
        });
        self.ready.push(tok);
    }

    fn entry_mut(&mut self, t: Token) -> Option<&mut Entry> {
        let (slot, generation) = decode(t)?;
        let s = self.slots.get_mut(slot)?;
        if s.generation != generation {
            return None;
        }
        s.entry.as_mut()
    }

    /// A readiness event. Returns false when the token is not a session token (the caller's
    /// own); stale session tokens are swallowed.
    pub(crate) fn on_event(&mut self, t: Token) -> bool {
        if decode(t).is_none() {
            return false;
        }
        if let Some(e) = self.entry_mut(t)
            && !e.queued
        {
            e.queued = true;
            self.ready.push(t);
        }
        true
    }

    /// Tells every session (and every later one) to finish up; each gets an `on_ready`.
    pub(crate) fn drain(&mut self) {
        if self.drained {
            return;
        }
        self.drained = true;
        let mut panicked = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(e) = &mut s.entry {
                let tok = token(i, s.generation);
                if catch_unwind(AssertUnwindSafe(|| e.session.on_drain())).is_err() {
                    panicked.push(tok);
                } else if !e.queued {
                    e.queued = true;
                    self.ready.push(tok);
                }
            }
        }
        for tok in panicked {
            self.close(tok);
        }
    }

    /// When the earliest session wants to be called, for the poll timeout.
    pub(crate) fn next_wake(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, tok))) = self.timers.peek() {
            if self.entry_mut(tok).is_some_and(|e| e.wake_at == Some(t)) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Calls `on_ready` for every session with an event or a wake time at or before `now`,
    /// registering in `registry` the new ones that stay open.
    pub(crate) fn run(&mut self, now: Instant, registry: &Registry) {
        while let Some(&Reverse((t, tok))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(e) = self.entry_mut(tok)
                && e.wake_at == Some(t)
            {
                e.wake_at = None;
                let newly = !e.queued;
                e.queued = true;
                self.timed -= 1;
                if newly {
                    self.ready.push(tok);
                }
            }
        }
        let mut running = std::mem::take(&mut self.running);
        std::mem::swap(&mut running, &mut self.ready);
        for &tok in &running {
            let Some(e) = self.entry_mut(tok) else {
                continue;
            };
            e.queued = false;
            let r = catch_unwind(AssertUnwindSafe(|| e.session.on_ready(&mut e.conn, now)));
            let next = match r {
                Ok(Ok(next)) => next,
                Ok(Err(_)) | Err(_) => Next::Close,
            };
            let registered = next == Next::Close
                || e.registered
                || registry
                    .register(&mut e.conn, tok, Interest::READABLE | Interest::WRITABLE)
                    .is_ok();
            e.registered = true;
            match next {
                _ if !registered => self.close(tok),
                Next::Continue => self.set_wake(tok, None),
                Next::WakeAt(t) => self.set_wake(tok, Some(t)),
                Next::Close => self.close(tok),
            }
        }
        running.clear();
        self.running = running;
    }

    fn set_wake(&mut self, tok: Token, want: Option<Instant>) {
        let Some(e) = self.entry_mut(tok) else {
            return;
        };
        let had = e.wake_at;
        if had == want {
            return;
        }
        e.wake_at = want;
        match (had, want) {
            (None, Some(_)) => self.timed += 1,
            (Some(_), None) => self.timed -= 1,
            _ => {}
        }
        if let Some(t) = want {
            self.timers.push(Reverse((t, tok)));
            if self.timers.len() > 2 * self.timed + TIMER_SLACK {
                self.rebuild_timers();
            }
        }
    }

    /// Drops the dead heap entries: O(open sessions), amortised over as many pushes.
    fn rebuild_timers(&mut self) {
        let live: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let t = s.entry.as_ref()?.wake_at?;
                Some(Reverse((t, token(i, s.generation))))
            })
            .collect();
        self.timers = BinaryHeap::from(live);
    }

    /// Closes a session. No `deregister`: dropping the conn closes its fd, which ends our
    /// registration once no other fd holds the socket, and any event still reported under the
    /// old token fails the generation check (module docs).
    fn close(&mut self, tok: Token) {
        let Some((slot, _)) = decode(tok) else {
            return;
        };
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if let Some(e) = s.entry.take() {
            if e.wake_at.is_some() {
                self.timed -= 1;
            }
            s.generation = s.generation.wrapping_add(1) & GEN_MASK;
            self.free.push(slot);
            drop(e);
            self.finished();
        }
    }

    /// Closes every session (the end of a serve, or a drain that timed out).
    pub(crate) fn close_all(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(s) = self.slots.get(i) {
                let tok = token(i, s.generation);
                self.close(tok);
            }
        }
        self.timers.clear();
        self.ready.clear();
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }
}

#[cfg(test)]
mod tests;

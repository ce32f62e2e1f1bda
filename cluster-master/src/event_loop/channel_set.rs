//! The channels of workers that answer hand-offs one by one (Node workers, see
//! [`crate::WorkerChannel::answers_one_by_one`]), in an epoll set of their own, so that the
//! loop can stop being woken by them while it is awake often anyway.
//!
//! A Node worker writes two lines per hand-off (the handle's ACK, then `accepted`), and each
//! write to a sleeping master is a wake-up, the dearest thing the master does here: under
//! `wrk -c64` close load three passes in five were for such lines alone. While connections
//! are being accepted the loop wakes for them anyway, so it stops watching this set and reads
//! whatever the set reports on every pass instead (one `epoll_wait` with a zero timeout says
//! which channels); once a pass accepts nothing, the set is watched again. Unwatched, the loop
//! sleeps at most [`LAZY_READ_DELAY`], so nothing a worker sends waits longer than that.
//! Native workers answer a whole batch in one frame and stay in the loop's own set: for them
//! reading lazily raised the master's CPU per connection from 11.8 to 13.7-14.1 µs (13.0-13.1
//! with the 1 ms cap on its sleep removed).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use cluster_core::WorkerId;
use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use super::{KIND_CHANNEL, split_token};

/// How long channels may go unread while the loop accepts connections.
pub(super) const LAZY_READ_DELAY: Duration = Duration::from_millis(1);

/// Readiness reported per read of the set; more waits for the next pass.
const EVENTS_PER_READ: usize = 256;

/// One channel's readiness: the worker, readable, writable.
pub(super) type ChannelReady = (WorkerId, bool, bool);

#[derive(Debug)]
pub(super) struct ChannelSet {
    poll: Poll,
    events: Events,
    /// Its epoll fd is watched for readability from the loop's set (`token`).
    watched: bool,
    token: Token,
    /// The last read reported a full batch: more may be ready, with no new edge to say so.
    more: bool,
    /// Channels registered here.
    members: usize,
    /// A read failed after the outer set had reported this one: its edge is spent, so the
    /// next [`ChannelSet::watch`] re-registers even if nothing changed, which reports again
    /// what is ready.
    rearm: bool,
}

impl ChannelSet {
    /// Creates the set and watches it from `outer` under `token`.
    pub(super) fn new(outer: &Registry, token: Token) -> io::Result<ChannelSet> {
        let poll = Poll::new()?;
        outer.register(&mut SourceFd(&poll.as_raw_fd()), token, Interest::READABLE)?;
        Ok(ChannelSet {
            poll,
            events: Events::with_capacity(EVENTS_PER_READ),
            watched: true,
            token,
            more: false,
            members: 0,
            rearm: false,
        })
    }

    /// Where its channels are re-registered.
    pub(super) fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    pub(super) fn register(&mut self, source: &mut impl Source, token: Token) -> io::Result<()> {
        self.poll
            .registry()
            .register(source, token, Interest::READABLE)?;
        self.members += 1;
        Ok(())
    }

    /// Takes a channel out; it is about to be closed, which would take it out anyway.
    pub(super) fn deregister(&mut self, source: &mut impl Source) {
        let _ = self.poll.registry().deregister(source);
        self.members = self.members.saturating_sub(1);
    }

    /// Whether the loop must read the set on this pass although it did not report: it is not
    /// watched, or its last read left readiness behind.
    pub(super) fn must_read(&self) -> bool {
        !self.watched || self.more
    }

    /// Whether readiness is left from the last read: the loop must not wait for an edge.
    pub(super) fn has_more(&self) -> bool {
        self.more
    }

    /// Whether the loop may sleep past [`LAZY_READ_DELAY`].
    pub(super) fn watched(&self) -> bool {
        self.watched
    }

    /// Decides, before the loop waits, whether the set is watched: not while passes accept
    /// connections (`accepting`: the one that just ended did), since the next connection brings
    /// the next pass soon, which reads the set anyway; and always while it holds no channel,
    /// so that nothing caps the loop's sleep for nothing.
    pub(super) fn after_pass(&mut self, outer: &Registry, accepting: bool) -> io::Result<()> {
        self.watch(outer, !accepting || self.members == 0)
    }

    /// Watches the set from `outer` or stops. Watching again reports readiness already
    /// there (`EPOLL_CTL_MOD` re-evaluates it), so nothing that arrived meanwhile goes unseen.
    fn watch(&mut self, outer: &Registry, watch: bool) -> io::Result<()> {
        if watch == self.watched && !self.rearm {
            return Ok(());
        }
        // Unwatched it keeps a registration that never fires (an epoll fd only ever reports
        // `EPOLLIN`), rather than paying a deregistration and a registration per switch.
        let interest = if watch {
            Interest::READABLE
        } else {
            Interest::PRIORITY
        };
        outer.reregister(&mut SourceFd(&self.poll.as_raw_fd()), self.token, interest)?;
        self.watched = watch;
        self.rearm = false;
        Ok(())
    }

    /// Appends to `into` every channel ready now, without waiting.
    pub(super) fn read_ready(&mut self, into: &mut Vec<ChannelReady>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.more = true;
                return Ok(());
            }
            Err(e) => {
                self.rearm = true;
                return Err(e);
            }
        }
        let mut count = 0;
        for ev in self.events.iter() {
            count += 1;
            let (kind, id) = split_token(ev.token());
            if kind == KIND_CHANNEL {
                into.push((WorkerId(id), ev.is_readable(), ev.is_writable()));
            }
        }
        self.more = count == EVENTS_PER_READ;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use mio::net::UnixStream as MioStream;

    use super::*;
    use crate::event_loop::{KIND_CHANNEL_SET, token};

    struct Setup {
        outer: Poll,
        set: ChannelSet,
        ours: MioStream,
        worker: UnixStream,
    }

    fn setup() -> Setup {
        let outer = Poll::new().unwrap();
        let mut set = ChannelSet::new(outer.registry(), token(KIND_CHANNEL_SET, 0)).unwrap();
        let (a, worker) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut ours = MioStream::from_std(a);
        set.register(&mut ours, token(KIND_CHANNEL, 7)).unwrap();
        Setup {
            outer,
            set,
            ours,
            worker,
        }
    }

    /// Tokens the outer poll reports without waiting.
    fn outer_ready(outer: &mut Poll) -> Vec<Token> {
        let mut events = Events::with_capacity(8);
        outer.poll(&mut events, Some(Duration::ZERO)).unwrap();
        events.iter().map(|e| e.token()).collect()
    }

    #[test]
    fn a_watched_set_wakes_the_loop_and_names_the_channel() {
        let mut s = setup();
        assert!(outer_ready(&mut s.outer).is_empty());
        s.worker.write_all(b"answer").unwrap();
        assert_eq!(outer_ready(&mut s.outer), [token(KIND_CHANNEL_SET, 0)]);
        let mut ready = Vec::new();
        s.set.read_ready(&mut ready).unwrap();
        assert_eq!(ready, [(WorkerId(7), true, false)]);
        assert!(!s.set.must_read());
    }

    #[test]
    fn an_unwatched_set_stays_quiet_and_what_it_held_shows_once_watched_again() {
        let mut s = setup();
        s.set.watch(s.outer.registry(), false).unwrap();
        assert!(
            s.set.must_read(),
            "unwatched, the loop reads it on every pass"
        );
        s.worker.write_all(b"ack").unwrap();
        assert!(
            outer_ready(&mut s.outer).is_empty(),
            "an answer woke the loop"
        );
        // Readiness that arrived unwatched and was not read is reported on watching again:
        // the edge is not lost.
        s.set.watch(s.outer.registry(), true).unwrap();
        assert_eq!(outer_ready(&mut s.outer), [token(KIND_CHANNEL_SET, 0)]);
        let mut ready = Vec::new();
        s.set.read_ready(&mut ready).unwrap();
        assert_eq!(ready, [(WorkerId(7), true, false)]);
    }

    #[test]
    fn the_set_is_left_unwatched_only_while_passes_accept_and_it_has_channels() {
        let mut s = setup();
        s.set.after_pass(s.outer.registry(), true).unwrap();
        assert!(!s.set.watched() && s.set.must_read());
        s.set.after_pass(s.outer.registry(), true).unwrap();
        assert!(!s.set.watched(), "still accepting");
        s.set.after_pass(s.outer.registry(), false).unwrap();
        assert!(
            s.set.watched() && !s.set.must_read(),
            "a pass that accepted nothing"
        );
        s.set.deregister(&mut s.ours);
        s.set.after_pass(s.outer.registry(), true).unwrap();
        assert!(
            s.set.watched(),
            "no channel: no reason to cap the loop's sleep"
        );
    }

    #[test]
    fn a_closed_worker_is_reported_to_the_pass_that_reads_the_set() {
        let mut s = setup();
        s.set.watch(s.outer.registry(), false).unwrap();
        drop(s.worker);
        let mut ready = Vec::new();
        s.set.read_ready(&mut ready).unwrap();
        assert_eq!(ready.len(), 1);
        let (worker, readable, _) = ready[0];
        assert_eq!(worker, WorkerId(7));
        assert!(
            readable,
            "the end of the stream reads as readable: the drain finds the EOF"
        );
        s.set.deregister(&mut s.ours);
        assert_eq!(s.set.members, 0);
    }
}

//! The built-in hello worker: a minimal HTTP/1.1 server, the target of the benchmarks.
//!
//! Every request gets `200 OK` with the body `hello from worker <id>\n`, whatever its method or
//! path, except:
//!
//! - `GET /delay/<ms>` (any method, in fact) gets the same answer after `<ms>` milliseconds,
//!   capped at [`MAX_DELAY_MS`]; requests pipelined behind it wait, so answers stay in order.
//! - `HEAD` gets the same head without the body.
//! - A malformed request gets `400 Bad Request`, a request head over 16 KiB or with more than 64
//!   headers gets `431 Request Header Fields Too Large`, and a request with `Transfer-Encoding`
//!   (a chunked body) gets `501 Not Implemented`; all three close the connection. 501 rather
//!   than 411: the client did nothing wrong, this server just does not decode chunked bodies, and
//!   after one it could not find where the next request starts.
//!
//! Connections are kept alive by default for HTTP/1.1, and for HTTP/1.0 only on
//! `Connection: keep-alive`; `Connection: close` closes after the answer is written. Bodies with
//! a `Content-Length` are read and thrown away. A request that says `Expect: 100-continue` and has
//! a body is answered at once with `connection: close`, so the client need not send the body.
//!
//! The protocol lives in `HelloCore`, a sans-io state machine (bytes in, bytes out, a wake
//! time, a close decision) so it can be tested without sockets; [`HelloSession`] only moves bytes
//! between it and the socket.
//!
//! ```no_run
//! use cluster_hello::HelloFactory;
//! use cluster_worker::{Handler, ListenSpec, ServeConfig};
//!
//! let id = cluster_worker::worker_id().map_or(0, |w| w.0);
//! let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8000".parse()?))?;
//! let handler = Handler::sessions(HelloFactory::new(id));
//! cluster_worker::serve(vec![listener], handler, ServeConfig::new())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_worker::{ConnInfo, Next, Session, SessionFactory, Stream};

/// The longest `/delay/<ms>` honoured; longer asks are cut to this.
pub const MAX_DELAY_MS: u64 = 60_000;

/// Bytes of an incomplete request head that may be buffered before it is refused with 431.
const MAX_HEAD: usize = 16 * 1024;
/// Headers per request before it is refused with 431.
const MAX_HEADERS: usize = 64;
/// First size of the input buffer. It grows to `MAX_HEAD` only for large request heads (or a
/// long pipeline stuck behind a delay), so the many idle keep-alive connections of a benchmark
/// stay small.
const INITIAL_INPUT: usize = 4 * 1024;
/// Successful reads in one `on_ready` before yielding: a client that pipelines without pause
/// must not starve the other connections of the session thread.
const READS_PER_CALL: usize = 32;

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const HEAD_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const NOT_IMPLEMENTED: &[u8] =
    b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// One precomputed `200 OK` answer.
#[derive(Debug)]
struct Canned {
    bytes: Box<[u8]>,
    /// Where the body starts, for `HEAD`.
    head_len: usize,
}

impl Canned {
    fn new(worker_id: u32, connection: Option<&str>) -> Self {
        let body = format!("hello from worker {worker_id}\n");
        let mut text = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-worker-id: {worker_id}\r\n",
            body.len()
        );
        if let Some(connection) = connection {
            text.push_str("connection: ");
            text.push_str(connection);
            text.push_str("\r\n");
        }
        text.push_str("\r\n");
        let head_len = text.len();
        text.push_str(&body);
        Self {
            bytes: text.into_bytes().into_boxed_slice(),
            head_len,
        }
    }

    fn bytes(&self, head_only: bool) -> &[u8] {
        if head_only {
            &self.bytes[..self.head_len]
        } else {
            &self.bytes
        }
    }
}

/// Every `200 OK` variant for one worker id, built once per factory and shared by its sessions
/// so answering a request is a single copy into the output buffer.
#[derive(Debug)]
struct Replies {
    keep_alive: Canned,
    /// HTTP/1.0 clients only reuse the connection if the answer says so.
    keep_alive_10: Canned,
    close: Canned,
}

impl Replies {
    fn new(worker_id: u32) -> Self {
        Self {
            keep_alive: Canned::new(worker_id, None),
            keep_alive_10: Canned::new(worker_id, Some("keep-alive")),
            close: Canned::new(worker_id, Some("close")),
        }
    }
}

/// What happens to the connection after an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Persist {
    KeepAlive,
    KeepAlive10,
    Close,
}

/// The answer a request is owed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reply {
    persist: Persist,
    head_only: bool,
}

/// The outcome of parsing the front of the input buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A complete request head of `len` bytes, followed by `body` bytes of body.
    Request {
        len: usize,
        body: u64,
        delay_ms: u64,
        reply: Reply,
    },
    /// Answer with this and close.
    Reject(&'static [u8]),
}

fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        // The input buffer never holds more than MAX_HEAD unparsed bytes, so reaching it
        // means the head can never complete.
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Parsed::Reject(HEAD_TOO_LARGE);
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(HEAD_TOO_LARGE),
        Err(_) => return Parsed::Reject(BAD_REQUEST),
    };

    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    let mut content_length: Option<u64> = None;
    for header in req.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            // Disagreeing lengths are a request-smuggling vector: refuse rather than pick one.
            match parse_decimal(header.value) {
                Some(n) if content_length.is_none_or(|c| c == n) => content_length = Some(n),
                _ => return Parsed::Reject(BAD_REQUEST),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject(NOT_IMPLEMENTED);
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= header
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = content_length.unwrap_or(0);

    // httparse only completes HTTP/1.0 and HTTP/1.1 request lines.
    let persist = if close || (expect_continue && body > 0) {
        Persist::Close
    } else if req.version == Some(1) {
        Persist::KeepAlive
    } else if keep_alive {
        Persist::KeepAlive10
    } else {
        Persist::Close
    };
    let delay_ms = req
        .path
        .and_then(|p| p.strip_prefix("/delay/"))
        .and_then(|p| p.split(['?', '#']).next())
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(0, |ms| ms.min(MAX_DELAY_MS));

    Parsed::Request {
        len,
        body,
        delay_ms,
        reply: Reply {
            persist,
            head_only: req.method == Some("HEAD"),
        },
    }
}

/// Digits only: `u64::from_str` would also take a leading `+`, which HTTP does not allow.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// The sans-io hello protocol for one connection.
///
/// Feed it with [`spare`](Self::spare) + [`commit`](Self::commit) (or
/// [`on_eof`](Self::on_eof)), call [`process`](Self::process), send [`output`](Self::output)
/// and report it with [`consume`](Self::consume); [`finished`](Self::finished) says when to
/// close and [`wake_at`](Self::wake_at) when to call `process` again.
#[derive(Debug)]
pub(crate) struct HelloCore {
    replies: Arc<Replies>,
    /// Received bytes live in `input[start..end]`; the rest of `input` is room to read into.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Body bytes of the last request still to be skipped.
    body_left: u64,
    /// Bytes to send are `out[written..]`; kept across requests so it is allocated once.
    out: Vec<u8>,
    written: usize,
    /// A `/delay` request at the head of the line: its answer is due at this instant, and
    /// nothing behind it is parsed until then.
    delayed: Option<(Instant, Reply)>,
    draining: bool,
    /// An answer that closes the connection has been queued: read and parse nothing more.
    closing: bool,
    eof: bool,
    /// At least one answer was queued. A connection that got none yet is not idle: it was
    /// handed to us for a request that may still be on its way.
    answered: bool,
}

impl HelloCore {
    fn new(replies: Arc<Replies>) -> Self {
        Self {
            replies,
            input: Vec::new(),
            start: 0,
            end: 0,
            body_left: 0,
            out: Vec::new(),
            written: 0,
            delayed: None,
            draining: false,
            closing: false,
            eof: false,
            answered: false,
        }
    }

    /// Room to receive bytes into; empty when the buffer is full of requests that cannot be
    /// parsed yet (they wait behind a delay).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.input.len() {
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.input.len() < MAX_HEAD {
                let len = (self.input.len() * 2).clamp(INITIAL_INPUT, MAX_HEAD);
                self.input.resize(len, 0);
            }
        }
        &mut self.input[self.end..]
    }

    /// `n` bytes were written at the front of [`spare`](Self::spare).
    pub(crate) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.input.len());
    }

    /// The client will send nothing more.
    pub(crate) fn on_eof(&mut self) {
        self.eof = true;
    }

    /// Answer with `connection: close` from now on, and close once idle.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
    }

    /// Whether the core would take more input.
    pub(crate) fn wants_input(&self) -> bool {
        !self.closing && !self.eof
    }

    /// Parse every request that can be answered at `now` and queue the answers in order.
    pub(crate) fn process(&mut self, now: Instant) {
        while !self.closing {
            self.skip_body();
            if let Some((due, reply)) = self.delayed {
                if now < due {
                    return;
                }
                self.delayed = None;
                self.answer(reply);
                continue;
            }
            if self.body_left > 0 || self.start == self.end {
                return;
            }
            match parse_request(&self.input[self.start..self.end]) {
                Parsed::Partial => return,
                Parsed::Reject(response) => {
                    self.out.extend_from_slice(response);
                    self.closing = true;
                }
                Parsed::Request {
                    len,
                    body,
                    delay_ms,
                    reply,
                } => {
                    self.start += len;
                    self.body_left = body;
                    if delay_ms == 0 {
                        self.answer(reply);
                    } else {
                        let due = now
                            .checked_add(Duration::from_millis(delay_ms))
                            .unwrap_or(now);
                        self.delayed = Some((due, reply));
                    }
                }
            }
        }
    }

    fn skip_body(&mut self) {
        let buffered = self.end - self.start;
        let skip = usize::try_from(self.body_left).map_or(buffered, |b| b.min(buffered));
        self.start += skip;
        self.body_left -= skip as u64;
    }

    fn answer(&mut self, reply: Reply) {
        let persist = if self.draining {
            Persist::Close
        } else {
            reply.persist
        };
        let canned = match persist {
            Persist::KeepAlive => &self.replies.keep_alive,
            Persist::KeepAlive10 => &self.replies.keep_alive_10,
            Persist::Close => &self.replies.close,
        };
        self.out.extend_from_slice(canned.bytes(reply.head_only));
        self.closing |= persist == Persist::Close;
        self.answered = true;
    }

    /// Bytes waiting to be sent.
    pub(crate) fn output(&self) -> &[u8] {
        &self.out[self.written..]
    }

    /// `n` bytes of [`output`](Self::output) were sent.
    pub(crate) fn consume(&mut self, n: usize) {
        self.written = (self.written + n).min(self.out.len());
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
    }

    /// When [`process`](Self::process) next has something to do without new input.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.delayed.map(|(due, _)| due)
    }

    /// Everything owed has been sent and the connection should close.
    pub(crate) fn finished(&self) -> bool {
        self.output().is_empty() && (self.closing || (self.eof && self.delayed.is_none()))
    }

    /// Draining, nothing owed and nothing half-received after at least one answer: the
    /// connection may close. Only meaningful once the socket has been read to `WouldBlock`, or
    /// a request that already sits in the kernel buffer would be dropped unanswered. A
    /// connection that never got an answer stays open: the master handed it over before the
    /// drain, and its client may not have written yet (closing it fails that request; the
    /// drain timeout bounds a client that never writes).
    pub(crate) fn drained_idle(&self) -> bool {
        let idle = self.start == self.end && self.body_left == 0 && self.delayed.is_none();
        self.draining && idle && self.answered && self.output().is_empty()
    }

    fn next_if_blocked(&self) -> Next {
        self.wake_at().map_or(Next::Continue, Next::WakeAt)
    }
}

/// Builds a [`HelloSession`] per connection; see the [module docs](self) for the protocol.
#[derive(Clone, Debug)]
pub struct HelloFactory {
    worker_id: u32,
    replies: Arc<Replies>,
}

impl HelloFactory {
    /// A factory answering as worker `worker_id` (0 when running standalone).
    pub fn new(worker_id: u32) -> Self {
        Self {
            worker_id,
            replies: Arc::new(Replies::new(worker_id)),
        }
    }

    /// The worker id put in every answer.
    pub fn worker_id(&self) -> u32 {
        self.worker_id
    }
}

impl SessionFactory for HelloFactory {
    type Session = HelloSession;

    fn new_session(&self, _info: &ConnInfo) -> HelloSession {
        HelloSession {
            core: HelloCore::new(Arc::clone(&self.replies)),
        }
    }
}

/// One hello connection: moves bytes between the socket and a `HelloCore`.
#[derive(Debug)]
pub struct HelloSession {
    core: HelloCore,
}

impl HelloSession {
    /// `on_ready` over any non-blocking stream, so tests can drive it with fakes.
    fn drive<S: Read + Write>(&mut self, io: &mut S, now: Instant) -> io::Result<Next> {
        let core = &mut self.core;
        let mut reads = 0;
        loop {
            core.process(now);
            // Everything answered so far leaves in one write: pipelined answers share a syscall.
            while !core.output().is_empty() {
                match io.write(core.output()) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => core.consume(n),
                    // Reading stops too: the writable event brings us back, and until then
                    // the client's unread requests are its own backpressure.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(core.next_if_blocked());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if core.finished() {
                return Ok(Next::Close);
            }
            if !core.wants_input() {
                return Ok(core.next_if_blocked());
            }
            if reads == READS_PER_CALL {
                // Edge-triggered: stopping before WouldBlock needs an explicit call back.
                return Ok(Next::WakeAt(now));
            }
            let buf = core.spare();
            if buf.is_empty() {
                return Ok(core.next_if_blocked());
            }
            match io.read(buf) {
                Ok(0) => core.on_eof(),
                Ok(n) => {
                    core.commit(n);
                    reads += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if core.drained_idle() {
                        return Ok(Next::Close);
                    }
                    return Ok(core.next_if_blocked());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Session for HelloSession {
    fn on_ready(&mut self, conn: &mut Stream, now: Instant) -> io::Result<Next> {
        self.drive(conn, now)
    }

    fn on_drain(&mut self) {
        self.core.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn core(worker_id: u32) -> HelloCore {
        HelloCore::new(Arc::new(Replies::new(worker_id)))
    }

    /// Hands `data` to the core as the network would, then takes what it wants to send.
    fn feed(core: &mut HelloCore, mut data: &[u8], now: Instant) -> Vec<u8> {
        loop {
            core.process(now);
            if data.is_empty() || !core.wants_input() {
                break;
            }
            let space = core.spare();
            let n = space.len().min(data.len());
            if n == 0 {
                break;
            }
            space[..n].copy_from_slice(&data[..n]);
            core.commit(n);
            data = &data[n..];
        }
        take(core)
    }

    fn take(core: &mut HelloCore) -> Vec<u8> {
        let out = core.output().to_vec();
        core.consume(out.len());
        out
    }

    fn ok(id: u32, connection: Option<&str>) -> String {
        let body = format!("hello from worker {id}\n");
        let connection = connection.map_or(String::new(), |c| format!("connection: {c}\r\n"));
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-worker-id: {id}\r\n{connection}\r\n{body}",
            body.len()
        )
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn single_request_keeps_alive() {
        let mut c = core(3);
        let out = feed(&mut c, GET, Instant::now());
        assert_eq!(text(&out), ok(3, None));
        assert!(!c.finished());
        assert!(c.wants_input());
        assert_eq!(c.wake_at(), None);
    }

    #[test]
    fn standalone_is_worker_zero() {
        let mut c = core(0);
        let out = feed(&mut c, GET, Instant::now());
        assert!(text(&out).ends_with("x-worker-id: 0\r\n\r\nhello from worker 0\n"));
    }

    #[test]
    fn connection_close_is_honoured() {
        let mut c = core(1);
        let out = feed(
            &mut c,
            b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(text(&out), ok(1, Some("close")));
        assert!(c.finished());
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let mut c = core(1);
        let out = feed(&mut c, b"GET / HTTP/1.0\r\n\r\n", Instant::now());
        assert_eq!(text(&out), ok(1, Some("close")));
        assert!(c.finished());

        let mut c = core(1);
        let out = feed(
            &mut c,
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(text(&out), ok(1, Some("keep-alive")));
        assert!(!c.finished());
    }

    #[test]
    fn connection_header_token_list() {
        let mut c = core(1);
        let out = feed(
            &mut c,
            b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(text(&out), ok(1, Some("close")));
    }

    #[test]
    fn pipelined_requests_answered_in_order() {
        let mut c = core(2);
        let input = b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\nPUT /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        let out = feed(&mut c, input, Instant::now());
        let head_only = ok(2, None).replace("hello from worker 2\n", "");
        assert_eq!(
            text(&out),
            format!("{}{}{}", ok(2, None), head_only, ok(2, Some("close")))
        );
        assert!(c.finished());
    }

    #[test]
    fn nothing_is_parsed_after_close() {
        let mut c = core(1);
        let out = feed(
            &mut c,
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(text(&out), ok(1, Some("close")));
        assert!(!c.wants_input());
    }

    #[test]
    fn content_length_body_is_discarded() {
        let mut c = core(1);
        let now = Instant::now();
        let out = feed(
            &mut c,
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234",
            now,
        );
        assert_eq!(text(&out), ok(1, None));
        assert!(!c.finished());
        // The rest of the body must not be mistaken for a request.
        let out = feed(&mut c, b"56789GET / HTTP/1.1\r\n\r\n", now);
        assert_eq!(text(&out), ok(1, None));
    }

    #[test]
    fn large_body_streams_through_small_buffer() {
        let mut c = core(1);
        let now = Instant::now();
        let mut input = b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(GET);
        let out = feed(&mut c, &input, now);
        assert_eq!(text(&out), ok(1, None).repeat(2));
        assert!(c.input.len() <= INITIAL_INPUT);
    }

    #[test]
    fn bad_content_length_is_rejected() {
        for header in [
            "Content-Length: abc",
            "Content-Length: +5",
            "Content-Length: 99999999999999999999999",
            "Content-Length: 1\r\nContent-Length: 2",
        ] {
            let mut c = core(1);
            let req = format!("POST / HTTP/1.1\r\n{header}\r\n\r\n");
            let out = feed(&mut c, req.as_bytes(), Instant::now());
            assert_eq!(out, BAD_REQUEST, "{header}");
            assert!(c.finished());
        }
    }

    #[test]
    fn chunked_body_is_not_implemented() {
        let mut c = core(1);
        let out = feed(
            &mut c,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(out, NOT_IMPLEMENTED);
        assert!(c.finished());
    }

    #[test]
    fn expect_continue_with_body_closes() {
        let mut c = core(1);
        let out = feed(
            &mut c,
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(text(&out), ok(1, Some("close")));
        assert!(c.finished());
    }

    #[test]
    fn delay_waits_and_holds_back_pipelined_requests() {
        let mut c = core(4);
        let t0 = Instant::now();
        let out = feed(
            &mut c,
            b"GET /delay/50 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            t0,
        );
        assert!(out.is_empty());
        let due = t0 + Duration::from_millis(50);
        assert_eq!(c.wake_at(), Some(due));
        assert!(!c.finished());

        c.process(t0 + Duration::from_millis(49));
        assert!(c.output().is_empty());

        c.process(due);
        assert_eq!(text(&take(&mut c)), ok(4, None).repeat(2));
        assert_eq!(c.wake_at(), None);
    }

    #[test]
    fn delay_is_capped_and_query_ignored() {
        let t0 = Instant::now();
        let mut c = core(1);
        feed(&mut c, b"GET /delay/99999999 HTTP/1.1\r\n\r\n", t0);
        assert_eq!(c.wake_at(), Some(t0 + Duration::from_millis(MAX_DELAY_MS)));

        let mut c = core(1);
        feed(&mut c, b"GET /delay/20?x=1 HTTP/1.1\r\n\r\n", t0);
        assert_eq!(c.wake_at(), Some(t0 + Duration::from_millis(20)));

        // Not a number: just an unknown path, answered at once.
        let mut c = core(1);
        let out = feed(&mut c, b"GET /delay/soon HTTP/1.1\r\n\r\n", t0);
        assert_eq!(text(&out), ok(1, None));
    }

    #[test]
    fn oversized_head_is_431() {
        let mut c = core(1);
        let mut input = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        let out = feed(&mut c, &input, Instant::now());
        assert_eq!(out, HEAD_TOO_LARGE);
        assert!(c.finished());
        assert!(c.input.len() <= MAX_HEAD);
    }

    #[test]
    fn head_just_under_the_cap_is_served() {
        let mut c = core(1);
        let start = b"GET / HTTP/1.1\r\nX-Big: ";
        let mut input = start.to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_HEAD - start.len() - 4));
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(input.len(), MAX_HEAD);
        let out = feed(&mut c, &input, Instant::now());
        assert_eq!(text(&out), ok(1, None));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut c = core(1);
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            input.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        let out = feed(&mut c, &input, Instant::now());
        assert_eq!(out, HEAD_TOO_LARGE);
        assert!(c.finished());
    }

    #[test]
    fn garbage_is_400_and_close() {
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let mut c = core(1);
            let out = feed(&mut c, garbage, Instant::now());
            assert_eq!(out, BAD_REQUEST);
            assert!(c.finished());
        }
        // Answers owed before the garbage still go out first.
        let mut c = core(1);
        let mut input = GET.to_vec();
        input.extend_from_slice(b"\0\0\0\r\n\r\n");
        let out = feed(&mut c, &input, Instant::now());
        assert_eq!(text(&out), ok(1, None) + &text(BAD_REQUEST));
    }

    #[test]
    fn drain_closes_after_next_answer() {
        let mut c = core(5);
        let now = Instant::now();
        assert_eq!(text(&feed(&mut c, GET, now)), ok(5, None));
        // Half a request is in flight when the drain starts: it is still answered.
        assert!(feed(&mut c, b"GET / HTTP/1.1\r\n", now).is_empty());
        c.drain();
        c.process(now);
        assert!(!c.finished());
        let out = feed(&mut c, b"\r\nGET / HTTP/1.1\r\n\r\n", now);
        assert_eq!(text(&out), ok(5, Some("close")));
        assert!(c.finished());
    }

    #[test]
    fn drain_when_idle_closes_at_once() {
        let mut c = core(5);
        let now = Instant::now();
        feed(&mut c, GET, now);
        c.drain();
        c.process(now);
        assert!(c.drained_idle());
    }

    #[test]
    fn drain_during_delay_closes_after_it() {
        let mut c = core(5);
        let t0 = Instant::now();
        feed(&mut c, b"GET /delay/10 HTTP/1.1\r\n\r\n", t0);
        c.drain();
        c.process(t0);
        assert!(!c.finished());
        c.process(t0 + Duration::from_millis(10));
        assert_eq!(text(&take(&mut c)), ok(5, Some("close")));
        assert!(c.finished());
    }

    #[test]
    fn eof_flushes_what_is_owed() {
        let mut c = core(1);
        let t0 = Instant::now();
        feed(
            &mut c,
            b"GET /delay/10 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n",
            t0,
        );
        c.on_eof();
        c.process(t0);
        assert!(!c.finished());
        c.process(t0 + Duration::from_millis(10));
        // The half-sent second request is dropped; the complete one is answered.
        assert_eq!(text(&take(&mut c)), ok(1, None));
        assert!(c.finished());
    }

    const SCRIPT: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
        HEAD / HTTP/1.1\r\n\r\n\
        GET /y HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
        GET /z HTTP/1.1\r\nConnection: close\r\n\r\n\
        GET /never HTTP/1.1\r\n\r\n";

    proptest! {
        #[test]
        fn chunking_does_not_change_output(cuts in prop::collection::vec(1usize..64, 0..40)) {
            let now = Instant::now();
            let whole = feed(&mut core(7), SCRIPT, now);

            let mut c = core(7);
            let mut out = Vec::new();
            let mut rest = SCRIPT;
            for cut in cuts {
                let n = cut.min(rest.len());
                out.extend(feed(&mut c, &rest[..n], now));
                rest = &rest[n..];
            }
            out.extend(feed(&mut c, rest, now));
            prop_assert_eq!(text(&out), text(&whole));
            prop_assert!(c.finished());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut c = core(1);
            feed(&mut c, &data, Instant::now());
        }
    }

    /// A non-blocking stream fake: reads come in the given chunks, then `WouldBlock` (or EOF);
    /// writes take at most `write_room` bytes before `WouldBlock`.
    struct Fake {
        reads: Vec<Vec<u8>>,
        eof: bool,
        write_room: usize,
        written: Vec<u8>,
        write_calls: usize,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.reads.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let chunk = &mut self.reads[0];
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.reads.remove(0);
            }
            Ok(n)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_calls += 1;
            if self.write_room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_room);
            self.write_room -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn session(id: u32) -> HelloSession {
        HelloFactory::new(id).new_session(&ConnInfo {
            server: None,
            peer: None,
        })
    }

    #[test]
    fn session_writes_pipelined_answers_at_once() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![GET.repeat(3)],
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Continue);
        assert_eq!(text(&io.written), ok(1, None).repeat(3));
        assert_eq!(io.write_calls, 1);
    }

    #[test]
    fn session_keeps_unwritten_bytes_on_would_block() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec()],
            eof: false,
            write_room: 10,
            written: Vec::new(),
            write_calls: 0,
        };
        let now = Instant::now();
        assert_eq!(s.drive(&mut io, now).unwrap(), Next::Continue);
        assert_eq!(io.written.len(), 10);
        io.write_room = usize::MAX;
        assert_eq!(s.drive(&mut io, now).unwrap(), Next::Close);
        assert_eq!(text(&io.written), ok(1, Some("close")));
    }

    #[test]
    fn session_closes_on_eof_after_answering() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![GET.to_vec()],
            eof: true,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Close);
        assert_eq!(text(&io.written), ok(1, None));
    }

    #[test]
    fn session_delay_returns_wake_at() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![b"GET /delay/50 HTTP/1.1\r\n\r\n".to_vec()],
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        let t0 = Instant::now();
        let due = t0 + Duration::from_millis(50);
        assert_eq!(s.drive(&mut io, t0).unwrap(), Next::WakeAt(due));
        assert!(io.written.is_empty());
        assert_eq!(s.drive(&mut io, due).unwrap(), Next::Continue);
        assert_eq!(text(&io.written), ok(1, None));
    }

    #[test]
    fn session_drain_when_idle_closes() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![GET.to_vec()],
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        // Served once and idle on keep-alive: the drain closes it.
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Continue);
        assert_eq!(text(&io.written), ok(1, None));
        s.on_drain();
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Close);
    }

    #[test]
    fn session_drained_before_its_client_wrote_waits_for_the_request() {
        // Handed over just before the drain, its client not yet written: closing it would
        // fail that request (the client's write gets a reset), so it waits and answers.
        let mut s = session(1);
        let mut io = Fake {
            reads: Vec::new(),
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        s.on_drain();
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Continue);
        io.reads.push(GET.to_vec());
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Close);
        assert_eq!(text(&io.written), ok(1, Some("close")));
    }

    #[test]
    fn session_drained_before_its_request_was_read_still_answers_it() {
        // The hand-off was accepted, the drain began, and only then did the session first
        // look at the socket: the request already waiting there must be answered.
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![GET.to_vec()],
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        s.on_drain();
        assert_eq!(s.drive(&mut io, Instant::now()).unwrap(), Next::Close);
        assert_eq!(text(&io.written), ok(1, Some("close")));
    }

    #[test]
    fn session_yields_to_a_flooding_client() {
        let mut s = session(1);
        let mut io = Fake {
            reads: vec![GET.to_vec(); READS_PER_CALL + 5],
            eof: false,
            write_room: usize::MAX,
            written: Vec::new(),
            write_calls: 0,
        };
        let now = Instant::now();
        assert_eq!(s.drive(&mut io, now).unwrap(), Next::WakeAt(now));
        assert_eq!(s.drive(&mut io, now).unwrap(), Next::Continue);
        assert_eq!(text(&io.written), ok(1, None).repeat(READS_PER_CALL + 5));
    }

    #[test]
    fn real_socket_round_trip() {
        use std::net::{TcpListener, TcpStream};
        use std::thread::sleep;

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conn = Stream::Tcp(server);
        let mut s = HelloFactory::new(9).new_session(&ConnInfo {
            server: None,
            peer: Some(peer),
        });
        client.set_nonblocking(true).unwrap();

        // Drives the session until the client has `want` bytes and the session says `until`.
        let mut exchange = |client: &mut TcpStream, request: &[u8], want: usize, until: Next| {
            client.write_all(request).unwrap();
            let mut got = Vec::new();
            for _ in 0..500 {
                let next = s.on_ready(&mut conn, Instant::now()).unwrap();
                let mut buf = [0u8; 4096];
                match client.read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client read: {e}"),
                }
                if got.len() >= want && next == until {
                    break;
                }
                sleep(Duration::from_millis(2));
            }
            got
        };

        let keep = ok(9, None);
        let got = exchange(&mut client, GET, keep.len(), Next::Continue);
        assert_eq!(text(&got), keep);

        let close = ok(9, Some("close"));
        let got = exchange(
            &mut client,
            b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n",
            close.len(),
            Next::Close,
        );
        assert_eq!(text(&got), close);
    }
}

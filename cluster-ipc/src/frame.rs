//! The wire format: an 8-byte header, then the message body.
//!
//! ```text
//! 0        1      2        3         4               8
//! | version | tag | n_fds  | reserved | body length (u32 LE) | body ...
//! ```
//! `n_fds` declares how many fds travel with the frame, so a frame whose fds did not all arrive
//! (or that brings extra ones) is detected instead of desynchronising the channel. Encoding and
//! decoding are pure: no I/O, no panics on any input, no allocation past the frame cap.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use cluster_core::{
    BoundAddr, ConnId, HandedConn, ListenAddr, ListenError, ListenSpec, MAX_HANDOFF_BATCH, Message,
    Peer, RefuseReason, Seq, ServerGrant, ServerId, ServerReply,
};

use crate::error::DecodeError;

/// Protocol version carried in every frame header.
pub const VERSION: u8 = 2;
/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Default cap on a frame's body: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// The most fds one frame may declare.
pub const MAX_FDS_PER_FRAME: usize = if cluster_core::MAX_USER_FDS > cluster_core::MAX_HANDOFF_BATCH
{
    cluster_core::MAX_USER_FDS
} else {
    cluster_core::MAX_HANDOFF_BATCH
};

mod tag {
    pub const ONLINE: u8 = 1;
    pub const QUERY_SERVER: u8 = 2;
    pub const LISTENING: u8 = 3;
    pub const ACCEPTED: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const CLOSE: u8 = 6;
    pub const EXITED_AFTER_DISCONNECT: u8 = 7;
    pub const QUERY_SERVER_REPLY: u8 = 16;
    pub const NEW_CONN: u8 = 17;
    pub const DISCONNECT: u8 = 18;
    pub const USER: u8 = 32;
}

/// Appends one frame for `msg` declaring `n_fds` fds to `out`.
pub fn encode_into(msg: &Message, n_fds: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[VERSION, 0, n_fds.min(u8::MAX as usize) as u8, 0, 0, 0, 0, 0]);
    let tag = encode_body(msg, out);
    out[start + 1] = tag;
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
}

/// One frame as a fresh buffer (see [`encode_into`]).
pub fn encode(msg: &Message, n_fds: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    encode_into(msg, n_fds, &mut out);
    out
}

fn encode_body(msg: &Message, w: &mut Vec<u8>) -> u8 {
    match msg {
        Message::Online => tag::ONLINE,
        Message::QueryServer { seq, spec, index } => {
            put_u64(w, seq.0);
            put_spec(w, spec);
            put_u32(w, *index);
            tag::QUERY_SERVER
        }
        Message::Listening { server, addr } => {
            put_u32(w, server.0);
            put_bound(w, addr);
            tag::LISTENING
        }
        Message::Accepted { conn } => {
            put_u64(w, conn.0);
            tag::ACCEPTED
        }
        Message::Refused { conn, reason } => {
            put_u64(w, conn.0);
            w.push(refuse_code(*reason));
            tag::REFUSED
        }
        Message::Close { server } => {
            put_u32(w, server.0);
            tag::CLOSE
        }
        Message::ExitedAfterDisconnect => tag::EXITED_AFTER_DISCONNECT,
        Message::QueryServerReply { seq, reply } => {
            put_u64(w, seq.0);
            match reply {
                ServerReply::Granted {
                    server,
                    addr,
                    grant,
                } => {
                    w.push(0);
                    put_u32(w, server.0);
                    put_bound(w, addr);
                    w.push(match grant {
                        ServerGrant::RoundRobin => 0,
                        ServerGrant::Shared => 1,
                        ServerGrant::ReusePort => 2,
                    });
                }
                ServerReply::Failed(err) => {
                    w.push(1);
                    put_u32(w, err.errno as u32);
                    put_bytes(w, err.context.as_bytes());
                }
            }
            tag::QUERY_SERVER_REPLY
        }
        Message::NewConn { server, conns } => {
            put_u32(w, server.0);
            w.push(conns.len().min(usize::from(u8::MAX)) as u8);
            for c in conns {
                put_u64(w, c.conn.0);
                match &c.peer {
                    Peer::Tcp(addr) => put_sockaddr(w, addr),
                    Peer::Unix => w.push(0),
                }
            }
            tag::NEW_CONN
        }
        Message::Disconnect => tag::DISCONNECT,
        Message::User { payload } => {
            w.extend_from_slice(payload);
            tag::USER
        }
    }
}

fn refuse_code(r: RefuseReason) -> u8 {
    match r {
        RefuseReason::ListenerClosed => 0,
        RefuseReason::Draining => 1,
        RefuseReason::MaxConnections => 2,
        RefuseReason::FdLimit => 3,
        RefuseReason::FdLost => 4,
    }
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

fn put_sockaddr(w: &mut Vec<u8>, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            w.push(4);
            w.extend_from_slice(&v4.ip().octets());
            w.extend_from_slice(&v4.port().to_le_bytes());
        }
        SocketAddr::V6(v6) => {
            w.push(6);
            w.extend_from_slice(&v6.ip().octets());
            w.extend_from_slice(&v6.port().to_le_bytes());
            put_u32(w, v6.flowinfo());
            put_u32(w, v6.scope_id());
        }
    }
}

fn put_spec(w: &mut Vec<u8>, spec: &ListenSpec) {
    match &spec.addr {
        ListenAddr::Tcp(a) => {
            w.push(0);
            put_sockaddr(w, a);
        }
        ListenAddr::Udp(a) => {
            w.push(1);
            put_sockaddr(w, a);
        }
        ListenAddr::Unix(p) => {
            w.push(2);
            put_bytes(w, p.as_os_str().as_bytes());
        }
        ListenAddr::Fd(fd) => {
            w.push(3);
            put_u32(w, *fd as u32);
        }
    }
    let flags =
        u8::from(spec.ipv6_only) | u8::from(spec.exclusive) << 1 | u8::from(spec.defer_accept) << 2;
    w.push(flags);
    match spec.backlog {
        Some(b) => {
            w.push(1);
            put_u32(w, b);
        }
        None => w.push(0),
    }
}

fn put_bound(w: &mut Vec<u8>, a: &BoundAddr) {
    match a {
        BoundAddr::Inet(sa) => {
            w.push(0);
            put_sockaddr(w, sa);
        }
        BoundAddr::Unix(p) => {
            w.push(1);
            put_bytes(w, p.as_os_str().as_bytes());
        }
    }
}

/// A decoded frame: the message and how many fds its header declared.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// The message.
    pub msg: Message,
    /// Fds the sender attached; the channel pairs them from its fd queue.
    pub n_fds: usize,
}

/// Validates a frame header, returning (body length, n_fds).
pub fn parse_header(h: &[u8; HEADER_LEN], max_frame: usize) -> Result<(usize, usize), DecodeError> {
    if h[0] != VERSION {
        return Err(DecodeError::Version(h[0]));
    }
    let n_fds = usize::from(h[2]);
    if n_fds > MAX_FDS_PER_FRAME {
        return Err(DecodeError::TooManyFds(n_fds));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > max_frame {
        return Err(DecodeError::TooLarge {
            len,
            max: max_frame,
        });
    }
    Ok((len, n_fds))
}

/// Decodes one complete frame from `bytes` (header and body exactly).
pub fn decode(bytes: &[u8], max_frame: usize) -> Result<Frame, DecodeError> {
    let header: &[u8; HEADER_LEN] = bytes.first_chunk().ok_or(DecodeError::Truncated)?;
    let (len, n_fds) = parse_header(header, max_frame)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() != len {
        return Err(if body.len() < len {
            DecodeError::Truncated
        } else {
            DecodeError::Trailing
        });
    }
    let msg = decode_body(header[1], body)?;
    let allowed = msg.fds_allowed();
    if !allowed.contains(&n_fds) {
        return Err(DecodeError::FdCount {
            message: msg.name(),
            declared: n_fds,
        });
    }
    Ok(Frame { msg, n_fds })
}

fn decode_body(tag: u8, body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: body };
    let msg = match tag {
        tag::ONLINE => Message::Online,
        tag::QUERY_SERVER => Message::QueryServer {
            seq: Seq(r.u64()?),
            spec: r.spec()?,
            index: r.u32()?,
        },
        tag::LISTENING => Message::Listening {
            server: ServerId(r.u32()?),
            addr: r.bound()?,
        },
        tag::ACCEPTED => Message::Accepted {
            conn: ConnId(r.u64()?),
        },
        tag::REFUSED => Message::Refused {
            conn: ConnId(r.u64()?),
            reason: match r.u8()? {
                0 => RefuseReason::ListenerClosed,
                1 => RefuseReason::Draining,
                2 => RefuseReason::MaxConnections,
                3 => RefuseReason::FdLimit,
                4 => RefuseReason::FdLost,
                other => return Err(DecodeError::BadValue("refuse reason", other)),
            },
        },
        tag::CLOSE => Message::Close {
            server: ServerId(r.u32()?),
        },
        tag::EXITED_AFTER_DISCONNECT => Message::ExitedAfterDisconnect,
        tag::QUERY_SERVER_REPLY => {
            let seq = Seq(r.u64()?);
            let reply = match r.u8()? {
                0 => {
                    let server = ServerId(r.u32()?);
                    let addr = r.bound()?;
                    let grant = match r.u8()? {
                        0 => ServerGrant::RoundRobin,
                        1 => ServerGrant::Shared,
                        2 => ServerGrant::ReusePort,
                        other => return Err(DecodeError::BadValue("grant", other)),
                    };
                    ServerReply::Granted {
                        server,
                        addr,
                        grant,
                    }
                }
                1 => {
                    let errno = r.u32()? as i32;
                    let context =
                        String::from_utf8(r.bytes()?.to_vec()).map_err(|_| DecodeError::BadUtf8)?;
                    ServerReply::Failed(ListenError { errno, context })
                }
                other => return Err(DecodeError::BadValue("reply", other)),
            };
            Message::QueryServerReply { seq, reply }
        }
        tag::NEW_CONN => {
            let server = ServerId(r.u32()?);
            let n = r.u8()?;
            if n == 0 || usize::from(n) > MAX_HANDOFF_BATCH {
                return Err(DecodeError::BadValue("hand-off batch size", n));
            }
            let mut conns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let conn = ConnId(r.u64()?);
                let peer = match r.peek_u8()? {
                    0 => {
                        r.u8()?;
                        Peer::Unix
                    }
                    _ => Peer::Tcp(r.sockaddr()?),
                };
                conns.push(HandedConn { conn, peer });
            }
            Message::NewConn { server, conns }
        }
        tag::DISCONNECT => Message::Disconnect,
        tag::USER => {
            let payload = r.buf.to_vec();
            r.buf = &[];
            Message::User { payload }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn peek_u8(&self) -> Result<u8, DecodeError> {
        self.buf.first().copied().ok_or(DecodeError::Truncated)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn path(&mut self) -> Result<PathBuf, DecodeError> {
        let raw = self.bytes()?;
        if raw.contains(&0) {
            return Err(DecodeError::BadValue("path with NUL", 0));
        }
        Ok(PathBuf::from(std::ffi::OsString::from_vec(raw.to_vec())))
    }

    fn sockaddr(&mut self) -> Result<SocketAddr, DecodeError> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(SocketAddr::new(IpAddr::V4(ip), self.u16()?))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let flow = self.u32()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
            }
            other => Err(DecodeError::BadValue("address family", other)),
        }
    }

    fn spec(&mut self) -> Result<ListenSpec, DecodeError> {
        let addr = match self.u8()? {
            0 => ListenAddr::Tcp(self.sockaddr()?),
            1 => ListenAddr::Udp(self.sockaddr()?),
            2 => ListenAddr::Unix(self.path()?),
            3 => ListenAddr::Fd(self.u32()? as i32),
            other => return Err(DecodeError::BadValue("listen address", other)),
        };
        let flags = self.u8()?;
        if flags & !0b111 != 0 {
            return Err(DecodeError::BadValue("listen flags", flags));
        }
        let backlog = match self.u8()? {
            0 => None,
            1 => Some(self.u32()?),
            other => return Err(DecodeError::BadValue("backlog marker", other)),
        };
        Ok(ListenSpec {
            addr,
            ipv6_only: flags & 1 != 0,
            backlog,
            exclusive: flags & 2 != 0,
            defer_accept: flags & 4 != 0,
        })
    }

    fn bound(&mut self) -> Result<BoundAddr, DecodeError> {
        match self.u8()? {
            0 => Ok(BoundAddr::Inet(self.sockaddr()?)),
            1 => Ok(BoundAddr::Unix(self.path()?)),
            other => Err(DecodeError::BadValue("bound address", other)),
        }
    }
}

/// Splits a byte stream into frames. Bytes go in through [`Decoder::read_buf`] (or
/// [`Decoder::feed`]); frames come out of [`Decoder::next_frame`]. The buffer never grows past
/// one maximal frame plus one read.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

/// How much a decoder reads at a time when no frame is pending.
const READ_CHUNK: usize = 16 * 1024;

impl Decoder {
    /// A decoder that rejects frames whose body exceeds `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// Bytes received but not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Free space to read into; call [`Decoder::commit`] with how much was written.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        // The frame in progress decides how much room is needed; it was capped by the header.
        let need = self
            .pending_frame_len()
            .unwrap_or(HEADER_LEN)
            .max(READ_CHUNK);
        if self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`Decoder::read_buf`] as filled.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies `bytes` in (for tests and non-socket sources).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let space = self.read_buf();
            let n = space.len().min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            self.commit(n);
            bytes = &bytes[n..];
        }
    }

    /// Total length of the frame at the head of the buffer, once its header is in and valid.
    fn pending_frame_len(&self) -> Option<usize> {
        let header: &[u8; HEADER_LEN] = self.buf[self.start..self.end].first_chunk()?;
        parse_header(header, self.max_frame)
            .ok()
            .map(|(len, _)| HEADER_LEN + len)
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let avail = &self.buf[self.start..self.end];
        let Some(header) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (len, _) = parse_header(header, self.max_frame)?;
        let total = HEADER_LEN + len;
        if avail.len() < total {
            return Ok(None);
        }
        let frame = decode(&avail[..total], self.max_frame)?;
        self.start += total;
        Ok(Some(frame))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sockaddr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    port,
                    flow,
                    scope
                ))
            ),
        ]
    }

    fn path() -> impl Strategy<Value = PathBuf> {
        "[a-zA-Z0-9/._-]{0,40}".prop_map(PathBuf::from)
    }

    fn spec() -> impl Strategy<Value = ListenSpec> {
        let addr = prop_oneof![
            sockaddr().prop_map(ListenAddr::Tcp),
            sockaddr().prop_map(ListenAddr::Udp),
            path().prop_map(ListenAddr::Unix),
            any::<i32>().prop_map(ListenAddr::Fd),
        ];
        (
            addr,
            any::<bool>(),
            any::<Option<u32>>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(addr, ipv6_only, backlog, exclusive, defer_accept)| ListenSpec {
                    addr,
                    ipv6_only,
                    backlog,
                    exclusive,
                    defer_accept,
                },
            )
    }

    fn bound() -> impl Strategy<Value = BoundAddr> {
        prop_oneof![
            sockaddr().prop_map(BoundAddr::Inet),
            path().prop_map(BoundAddr::Unix)
        ]
    }

    fn reason() -> impl Strategy<Value = RefuseReason> {
        prop_oneof![
            Just(RefuseReason::ListenerClosed),
            Just(RefuseReason::Draining),
            Just(RefuseReason::MaxConnections),
            Just(RefuseReason::FdLimit),
            Just(RefuseReason::FdLost),
        ]
    }

    fn grant() -> impl Strategy<Value = ServerGrant> {
        prop_oneof![
            Just(ServerGrant::RoundRobin),
            Just(ServerGrant::Shared),
            Just(ServerGrant::ReusePort)
        ]
    }

    /// Every variant, with the fd count its type requires (or allows, for user messages).
    pub(crate) fn message_with_fds() -> impl Strategy<Value = (Message, usize)> {
        let reply = prop_oneof![
            (any::<u32>(), bound(), grant()).prop_map(|(s, addr, grant)| ServerReply::Granted {
                server: ServerId(s),
                addr,
                grant
            }),
            (any::<i32>(), ".{0,30}")
                .prop_map(|(errno, context)| ServerReply::Failed(ListenError { errno, context })),
        ];
        let msg = prop_oneof![
            Just(Message::Online),
            (any::<u64>(), spec(), any::<u32>()).prop_map(|(s, spec, index)| {
                Message::QueryServer {
                    seq: Seq(s),
                    spec,
                    index,
                }
            }),
            (any::<u32>(), bound()).prop_map(|(s, addr)| Message::Listening {
                server: ServerId(s),
                addr
            }),
            any::<u64>().prop_map(|c| Message::Accepted { conn: ConnId(c) }),
            (any::<u64>(), reason()).prop_map(|(c, reason)| Message::Refused {
                conn: ConnId(c),
                reason
            }),
            any::<u32>().prop_map(|s| Message::Close {
                server: ServerId(s)
            }),
            Just(Message::ExitedAfterDisconnect),
            (any::<u64>(), reply)
                .prop_map(|(s, reply)| Message::QueryServerReply { seq: Seq(s), reply }),
            (
                any::<u32>(),
                proptest::collection::vec(
                    (any::<u64>(), proptest::option::of(sockaddr())),
                    1..=MAX_HANDOFF_BATCH
                )
            )
                .prop_map(|(s, conns)| Message::NewConn {
                    server: ServerId(s),
                    conns: conns
                        .into_iter()
                        .map(|(c, addr)| HandedConn {
                            conn: ConnId(c),
                            peer: addr.map_or(Peer::Unix, Peer::Tcp),
                        })
                        .collect(),
                }),
            Just(Message::Disconnect),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|payload| Message::User { payload }),
        ];
        (msg, 0..=MAX_FDS_PER_FRAME).prop_map(|(m, k)| {
            let allowed = m.fds_allowed();
            let n = k.clamp(*allowed.start(), *allowed.end());
            (m, n)
        })
    }

    proptest! {
        #[test]
        fn round_trip_every_variant((msg, n_fds) in message_with_fds()) {
            let bytes = encode(&msg, n_fds);
            let frame = decode(&bytes, DEFAULT_MAX_FRAME);
            prop_assert_eq!(frame, Ok(Frame { msg, n_fds }));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, DEFAULT_MAX_FRAME);
            let mut d = Decoder::new(256);
            d.feed(&bytes);
            for _ in 0..bytes.len() + 1 {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }

        #[test]
        fn any_chunking_decodes_the_same(
            msgs in proptest::collection::vec(message_with_fds(), 1..12),
            cuts in proptest::collection::vec(1usize..64, 1..64),
        ) {
            let mut stream = Vec::new();
            for (m, n) in &msgs {
                encode_into(m, *n, &mut stream);
            }
            let mut d = Decoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap_or(&1)).min(rest.len());
                d.feed(&rest[..n]);
                rest = &rest[n..];
                while let Some(f) = d.next_frame().unwrap() {
                    got.push((f.msg, f.n_fds));
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_frame_rejected_from_header_alone() {
        let mut d = Decoder::new(64);
        let bytes = encode(
            &Message::User {
                payload: vec![7; 65],
            },
            0,
        );
        d.feed(&bytes[..HEADER_LEN]);
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::TooLarge { len: 65, max: 64 })
        );
    }

    #[test]
    fn fd_count_must_match_the_message() {
        let bytes = encode(&Message::new_conn(ServerId(1), ConnId(2), Peer::Unix), 0);
        assert!(matches!(
            decode(&bytes, 1024),
            Err(DecodeError::FdCount { .. })
        ));
        let bytes = encode(&Message::Accepted { conn: ConnId(2) }, 1);
        assert!(matches!(
            decode(&bytes, 1024),
            Err(DecodeError::FdCount { .. })
        ));
        let two = HandedConn {
            conn: ConnId(3),
            peer: Peer::Unix,
        };
        let batch = Message::NewConn {
            server: ServerId(1),
            conns: vec![two, two],
        };
        assert!(matches!(
            decode(&encode(&batch, 1), 1024),
            Err(DecodeError::FdCount { .. })
        ));
        assert!(decode(&encode(&batch, 2), 1024).is_ok());
    }

    #[test]
    fn a_batch_outside_its_bounds_cannot_be_sent() {
        let one = HandedConn {
            conn: ConnId(3),
            peer: Peer::Unix,
        };
        for n in [0, MAX_HANDOFF_BATCH + 1] {
            let msg = Message::NewConn {
                server: ServerId(1),
                conns: vec![one; n],
            };
            assert!(msg.fds_allowed().is_empty(), "{n} connections");
        }
        let (mut a, _b) = crate::Channel::pair().unwrap();
        let empty = Message::NewConn {
            server: ServerId(1),
            conns: Vec::new(),
        };
        assert!(matches!(
            a.send(&empty, &[]),
            Err(crate::IpcError::WrongFdCount { .. })
        ));
    }

    #[test]
    fn hand_off_batches_are_bounded() {
        let one = HandedConn {
            conn: ConnId(3),
            peer: Peer::Tcp("127.0.0.1:9".parse().unwrap()),
        };
        let empty = Message::NewConn {
            server: ServerId(1),
            conns: Vec::new(),
        };
        assert!(matches!(
            decode(&encode(&empty, 0), 1024),
            Err(DecodeError::BadValue("hand-off batch size", 0))
        ));
        let mut bytes = encode(
            &Message::NewConn {
                server: ServerId(1),
                conns: vec![one; MAX_HANDOFF_BATCH],
            },
            MAX_HANDOFF_BATCH,
        );
        assert!(decode(&bytes, 1024).is_ok());
        // The count byte follows the 4-byte server id.
        bytes[HEADER_LEN + 4] = MAX_HANDOFF_BATCH as u8 + 1;
        assert!(matches!(
            decode(&bytes, 1024),
            Err(DecodeError::BadValue("hand-off batch size", _))
        ));
    }

    #[test]
    fn wrong_version_and_trailing_bytes_rejected() {
        let mut bytes = encode(&Message::Online, 0);
        bytes[0] = 9;
        assert_eq!(decode(&bytes, 1024), Err(DecodeError::Version(9)));
        let mut bytes = encode(&Message::Accepted { conn: ConnId(1) }, 0);
        bytes.push(0);
        bytes[4] += 1;
        assert_eq!(decode(&bytes, 1024), Err(DecodeError::Trailing));
    }
}

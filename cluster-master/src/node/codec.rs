//! Node's cluster protocol as pure functions over bytes: JSON lines in, [`Message`]s out, and
//! back. No sockets, no fds: the channel says whether an fd arrived with a `NODE_HANDLE` line
//! and attaches the fds it is told to.
//!
//! Node's vocabulary maps onto the master's one to one where the concept is the same
//! (`online`, `queryServer`, `listening`, `close`, `exitedAfterDisconnect`, `newconn` and its
//! `{ack, accepted}` answer, `disconnect`, user messages). What only Node needs stays here:
//! the worker's `seq` numbers and our own, the opaque `key` strings and the `data` echo of
//! each `queryServer`, the `NODE_HANDLE_ACK`s owed to the worker, and which of our handles
//! the worker has acknowledged.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use cluster_core::{
    BoundAddr, ConnId, HandedConn, ListenAddr, ListenSpec, Message, RefuseReason, Seq, ServerGrant,
    ServerId, ServerReply,
};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `UV_TCP_IPV6ONLY` and `UV_UDP_IPV6ONLY` are both bit 0 of a `queryServer`'s `flags`.
const IPV6_ONLY_FLAG: u32 = 1;

/// How a Node worker broke the protocol. Any of these drops the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NodeError {
    /// A line longer than the cap, or unterminated past it.
    #[error("line of more than {max} bytes")]
    LineTooLong {
        /// The cap.
        max: usize,
    },
    /// Not JSON at all.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// A `NODE_CLUSTER` message whose `act` this primary does not know.
    #[error("unknown act {0:?}")]
    UnknownAct(String),
    /// A `NODE_` message with a missing or mistyped field.
    #[error("{message} with a missing or invalid {field}")]
    BadField {
        /// The message.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A handle attached to a message that never carries one.
    #[error("a handle attached to {0}, which carries none")]
    HandleNotAllowed(String),
    /// Fds arrived that no `NODE_HANDLE` line claimed.
    #[error("{0} fds arrived without a NODE_HANDLE to carry them")]
    StrayFds(usize),
    /// The kernel dropped fds on their way (`MSG_CTRUNC`).
    #[error("fds truncated in transit")]
    FdsTruncated,
    /// The worker lost a server handle we sent (NACK) every time it was sent: it would wait
    /// for it forever.
    #[error("the worker did not receive a server handle (sent {0} times)")]
    ServerHandleLost(u32),
    /// Something the master asked us to send has no Node encoding.
    #[error("cannot send {0} to a Node worker")]
    Unsupported(String),
}

/// Every field a worker's line may have; absent ones are `None`. Strings that are never
/// escaped in Node's output are borrowed (an escaped one fails here and falls back to the
/// generic parse).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    cmd: Option<&'a str>,
    #[serde(borrow, default)]
    act: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    ack: Option<i64>,
    #[serde(default)]
    accepted: Option<bool>,
    #[serde(default)]
    key: Option<String>,
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    address: Option<String>,
    #[serde(borrow, default)]
    port: Option<&'a RawValue>,
    #[serde(rename = "addressType", borrow, default)]
    address_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    fd: Option<&'a RawValue>,
    #[serde(borrow, default)]
    flags: Option<&'a RawValue>,
    #[serde(borrow, default)]
    backlog: Option<&'a RawValue>,
    #[serde(borrow, default)]
    msg: Option<&'a RawValue>,
}

/// A numeric field as JavaScript sends it: anything that is not an integer (`false`,
/// `undefined` turned `null`, a float) counts as absent, as `|0` or a truthiness test would
/// treat it in Node's own primary.
fn int(raw: Option<&RawValue>) -> Option<i64> {
    raw.and_then(|r| r.get().parse().ok())
}

/// The part of a `queryServer` that names the listen, as Node's worker repeats it in
/// `listening` (with the port replaced by the bound one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListenIdent {
    address: Option<String>,
    address_type: String,
    fd: Option<i64>,
    index: u32,
    port: i64,
}

#[derive(Debug)]
struct PendingQuery {
    key: String,
    /// Echoed verbatim (`tls.Server` keeps its ticket keys there).
    data: String,
    /// This query holds a reference on the key's entry in [`SharedServerData`].
    shared_ref: bool,
    ident: ListenIdent,
}

#[derive(Debug)]
struct Granted {
    key: String,
    /// The start of every `newconn` line for this server, up to its `seq` value: built once,
    /// since the key is escaped the same way for every hand-off.
    newconn_head: Vec<u8>,
    server: ServerId,
    shared_ref: bool,
    ident: ListenIdent,
    bound: BoundAddr,
    listening: bool,
}

/// The `data` of each `queryServer` key, shared by every Node worker of one master: as Node's
/// primary does, the first worker's (non-null) data is what every worker gets back for that key,
/// so that `tls.Server`s in different workers share their session-ticket keys.
///
/// As in Node's primary, where the data lives on the server handle, an entry lasts while some
/// worker holds or asks for its key: each pending query and each granted server holds a
/// reference, released by the reply's failure, the worker's `close`, or the end of its channel.
/// Keys and bytes are capped: past the caps a worker gets its own data back, unshared.
#[derive(Debug, Clone, Default)]
pub(crate) struct SharedServerData(Arc<Mutex<SharedEntries>>);

#[derive(Debug, Default)]
struct SharedEntries {
    by_key: HashMap<String, SharedEntry>,
    /// Key and data bytes held.
    bytes: usize,
}

#[derive(Debug)]
struct SharedEntry {
    data: String,
    refs: usize,
}

/// Keys remembered at most.
const MAX_SHARED_KEYS: usize = 1024;
/// Key and data bytes remembered at most (a worker's `data` is bounded only by the line cap).
const MAX_SHARED_BYTES: usize = 4 << 20;

impl SharedServerData {
    fn entries(&self) -> std::sync::MutexGuard<'_, SharedEntries> {
        // The map stays consistent across a panic elsewhere: every update is one statement.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data to echo for `key` when a worker sent `data`, and whether the caller now holds
    /// a reference on the key (to [`SharedServerData::release`] later).
    fn settle(&self, key: &str, data: &str) -> (String, bool) {
        let mut entries = self.entries();
        let SharedEntries { by_key, bytes } = &mut *entries;
        if let Some(kept) = by_key.get_mut(key) {
            kept.refs += 1;
            if kept.data == "null" && data != "null" {
                if *bytes + data.len() > MAX_SHARED_BYTES {
                    // Never `null` for a worker that sent data: `tls.Server` needs its keys.
                    return (data.to_string(), true);
                }
                *bytes = *bytes + data.len() - kept.data.len();
                data.clone_into(&mut kept.data);
            }
            return (kept.data.clone(), true);
        }
        let size = key.len() + data.len();
        if by_key.len() >= MAX_SHARED_KEYS || *bytes + size > MAX_SHARED_BYTES {
            return (data.to_string(), false);
        }
        *bytes += size;
        by_key.insert(
            key.to_string(),
            SharedEntry {
                data: data.to_string(),
                refs: 1,
            },
        );
        (data.to_string(), true)
    }

    /// Drops one reference on `key`; the entry goes with the last.
    fn release(&self, key: &str) {
        let mut entries = self.entries();
        let SharedEntries { by_key, bytes } = &mut *entries;
        if let Some(kept) = by_key.get_mut(key) {
            kept.refs = kept.refs.saturating_sub(1);
            if kept.refs == 0 {
                *bytes -= key.len() + kept.data.len();
                by_key.remove(key);
            }
        }
    }

    /// Keys remembered now (for tests).
    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.entries().by_key.len()
    }
}

/// What decoding one line produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// The message for the master, if the line was one it must see.
    pub msg: Option<Message>,
    /// The line's `NODE_HANDLE` took the fd that arrived for it (the channel passes it on with
    /// the message or closes it).
    pub took_fd: bool,
    /// The line acknowledged one of our server handles (the channel keeps a copy of each to
    /// send again on a NACK).
    pub server_handle: Option<HandleFate>,
}

/// What the worker said of a server handle we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandleFate {
    /// `NODE_HANDLE_ACK`: it has the handle.
    Acked,
    /// `NODE_HANDLE_NACK`: the line came without its fd, and the worker dropped the line too.
    Nacked,
}

/// What an encoded line commits the codec to once it is really written or queued
/// ([`NodeCodec::commit`]): a line that never left must not be waited for, or a later
/// answer would be matched to it.
#[derive(Debug)]
#[must_use]
pub(crate) enum Pending {
    /// Nothing to remember.
    Nothing,
    /// A `newconn`: the worker ACKs its handle, then answers `{ack: seq, accepted}`.
    NewConn { seq: u64, conn: ConnId },
    /// The reply to the worker's query `query`, granting `server` at `bound` or not.
    Reply {
        query: u64,
        granted: Option<(ServerId, BoundAddr)>,
        /// The reply is a `NODE_HANDLE` with the server's fd.
        handle: bool,
    },
}

impl Pending {
    /// The line is a `NODE_HANDLE` carrying a server's fd (which the worker may NACK).
    pub(crate) fn is_server_handle(&self) -> bool {
        matches!(self, Pending::Reply { handle: true, .. })
    }
}

/// One worker's protocol state. Both directions go through it because they correlate:
/// replies carry the worker's `seq`, answers carry ours.
#[derive(Debug)]
pub(crate) struct NodeCodec {
    next_seq: u64,
    queries: HashMap<u64, PendingQuery>,
    granted: Vec<Granted>,
    /// Our `newconn` seqs not yet answered.
    newconns: HashMap<u64, ConnId>,
    /// Our `NODE_HANDLE` lines not yet acknowledged, oldest first: the hand-off, or `None`
    /// for a server handle.
    handles_unacked: VecDeque<Option<ConnId>>,
    shared: SharedServerData,
}

fn bad(message: &'static str, field: &'static str) -> NodeError {
    NodeError::BadField { message, field }
}

/// Whether a JSON value is one of Node's internal messages (an object whose `cmd` is a string
/// that starts with `NODE_` and is longer than that), which its `'message'` handlers never see.
fn is_internal_cmd(cmd: &str) -> bool {
    cmd.len() > 5 && cmd.starts_with("NODE_")
}

impl NodeCodec {
    pub(crate) fn new(shared: SharedServerData) -> Self {
        Self {
            next_seq: 0,
            queries: HashMap::new(),
            granted: Vec::new(),
            newconns: HashMap::new(),
            handles_unacked: VecDeque::new(),
            shared,
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Records what a line encoded by [`NodeCodec::encode`] expects back, now that it is sent.
    pub(crate) fn commit(&mut self, pending: Pending) {
        match pending {
            Pending::Nothing => {}
            Pending::NewConn { seq, conn } => {
                self.newconns.insert(seq, conn);
                self.handles_unacked.push_back(Some(conn));
            }
            Pending::Reply {
                query,
                granted,
                handle,
            } => {
                let Some(q) = self.queries.remove(&query) else {
                    return;
                };
                let Some((server, bound)) = granted else {
                    // Node's primary forgets a key whose bind failed.
                    if q.shared_ref {
                        self.shared.release(&q.key);
                    }
                    return;
                };
                if handle {
                    self.handles_unacked.push_back(None);
                }
                let mut newconn_head = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":".to_vec();
                json_string(&mut newconn_head, &q.key);
                newconn_head.extend_from_slice(b",\"seq\":");
                self.granted.push(Granted {
                    key: q.key,
                    newconn_head,
                    server,
                    shared_ref: q.shared_ref,
                    ident: q.ident,
                    bound,
                    listening: false,
                });
            }
        }
    }

    /// A server handle the worker NACKed went out again: its ACK or NACK comes after those of
    /// the handles already sent.
    pub(crate) fn server_handle_resent(&mut self) {
        self.handles_unacked.push_back(None);
    }

    /// Hand-offs sent and not answered (for tests and sanity checks).
    #[cfg(test)]
    pub(crate) fn unanswered(&self) -> usize {
        self.newconns.len()
    }

    /// Decodes one line (without its `\n`). `fd_waiting` says an fd arrived that a
    /// `NODE_HANDLE` line may claim. Lines the worker is owed in return (`NODE_HANDLE_ACK`,
    /// the ack of `exitedAfterDisconnect`) are appended to `replies`.
    pub(crate) fn decode(
        &mut self,
        line: &[u8],
        fd_waiting: bool,
        replies: &mut Vec<u8>,
    ) -> Result<Decoded, NodeError> {
        // The two lines a worker writes per hand-off, as Node's `JSON.stringify` writes them,
        // skip the general parse; any other spelling takes it.
        if line == HANDLE_ACK_LINE {
            return Ok(self.handle_acked());
        }
        if let Some((ack, accepted)) = quick_answer(line) {
            return Ok(Decoded {
                msg: self.answer(ack, accepted),
                ..Decoded::default()
            });
        }
        // Only an object can be internal; serde would also fill a `Wire` from an array.
        let object = line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let wire: Wire<'_> = match serde_json::from_slice(line) {
            Ok(w) if object => w,
            Ok(_) => return user_or_malformed(line, None),
            Err(e) => return user_or_malformed(line, Some(e)),
        };
        let Some(cmd) = wire.cmd.filter(|c| is_internal_cmd(c)) else {
            // Not internal: a user message, delivered as the JSON text it came as.
            return Ok(Decoded {
                msg: Some(Message::User {
                    payload: line.to_vec(),
                }),
                ..Decoded::default()
            });
        };
        match cmd {
            "NODE_CLUSTER" => Ok(Decoded {
                msg: self.decode_cluster(&wire, replies)?,
                ..Decoded::default()
            }),
            "NODE_HANDLE" => self.decode_handle(&wire, fd_waiting, replies),
            "NODE_HANDLE_ACK" => Ok(self.handle_acked()),
            "NODE_HANDLE_NACK" => match self.handles_unacked.pop_front() {
                Some(Some(conn)) => {
                    self.newconns.retain(|_, c| *c != conn);
                    Ok(Decoded {
                        msg: Some(Message::Refused {
                            conn,
                            reason: RefuseReason::FdLost,
                        }),
                        ..Decoded::default()
                    })
                }
                Some(None) => Ok(Decoded {
                    server_handle: Some(HandleFate::Nacked),
                    ..Decoded::default()
                }),
                None => Ok(Decoded::default()),
            },
            // A worker that sent us sockets of one of its servers (`process.send(msg,
            // socket)`) asks, when that server closes or counts its connections, how many of
            // them we still hold: none, as the master closes handles it is sent.
            "NODE_SOCKET_NOTIFY_CLOSE" | "NODE_SOCKET_GET_COUNT" => {
                if let Some(key) = &wire.key {
                    let all_closed = cmd == "NODE_SOCKET_NOTIFY_CLOSE";
                    replies.extend_from_slice(if all_closed {
                        b"{\"cmd\":\"NODE_SOCKET_ALL_CLOSED\",\"key\":"
                    } else {
                        b"{\"cmd\":\"NODE_SOCKET_COUNT\",\"key\":"
                    });
                    json_string(replies, key);
                    replies.extend_from_slice(if all_closed {
                        b"}\n"
                    } else {
                        b",\"count\":0}\n"
                    });
                }
                Ok(Decoded::default())
            }
            // The debugger's messages: nothing to do, as in Node's primary for a worker.
            _ => Ok(Decoded::default()),
        }
    }

    /// The worker's answer to our `newconn` with seq `ack`; `None` for a seq that is not one.
    fn answer(&mut self, ack: u64, accepted: bool) -> Option<Message> {
        let conn = self.newconns.remove(&ack)?;
        Some(if accepted {
            Message::Accepted { conn }
        } else {
            // The worker closed that server or is at `maxConnections`; it will say `close`
            // for the former, so the refusal itself is never permanent.
            Message::Refused {
                conn,
                reason: RefuseReason::MaxConnections,
            }
        })
    }

    fn handle_acked(&mut self) -> Decoded {
        Decoded {
            server_handle: match self.handles_unacked.pop_front() {
                Some(None) => Some(HandleFate::Acked),
                _ => None,
            },
            ..Decoded::default()
        }
    }

    fn decode_handle(
        &mut self,
        wire: &Wire<'_>,
        fd_waiting: bool,
        replies: &mut Vec<u8>,
    ) -> Result<Decoded, NodeError> {
        let inner = wire.msg.ok_or_else(|| bad("NODE_HANDLE", "msg"))?;
        if !fd_waiting {
            // The fd did not arrive: Node's sender retransmits on NACK.
            replies.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
            return Ok(Decoded::default());
        }
        let inner_text = inner.get();
        let inner_wire: Option<Wire<'_>> = serde_json::from_str(inner_text).ok();
        if let Some(c) = inner_wire.as_ref().and_then(|w| w.cmd)
            && is_internal_cmd(c)
        {
            // No message a worker sends its primary carries a handle.
            return Err(NodeError::HandleNotAllowed(c.to_string()));
        }
        replies.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
        Ok(Decoded {
            msg: Some(Message::User {
                payload: inner_text.as_bytes().to_vec(),
            }),
            took_fd: true,
            server_handle: None,
        })
    }

    fn decode_cluster(
        &mut self,
        wire: &Wire<'_>,
        replies: &mut Vec<u8>,
    ) -> Result<Option<Message>, NodeError> {
        let Some(act) = wire.act else {
            // An answer to one of our messages; only `newconn` gets one. An unknown `ack` is
            // harmless, as in Node (test-cluster-invalid-message sends `ack: -1`).
            let Some(ack) = wire.ack else {
                return Err(bad("NODE_CLUSTER", "act"));
            };
            return Ok(u64::try_from(ack)
                .ok()
                .and_then(|ack| self.answer(ack, wire.accepted == Some(true))));
        };
        match act {
            "online" => Ok(Some(Message::Online)),
            "queryServer" => self.decode_query(wire).map(Some),
            "listening" => Ok(self.decode_listening(wire)),
            "close" => {
                let key = wire.key.as_deref().ok_or_else(|| bad("close", "key"))?;
                let Some(pos) = self.granted.iter().position(|g| g.key == key) else {
                    // Node's primary ignores a key it does not know.
                    return Ok(None);
                };
                let g = self.granted.swap_remove(pos);
                if g.shared_ref {
                    self.shared.release(&g.key);
                }
                Ok(Some(Message::Close { server: g.server }))
            }
            "exitedAfterDisconnect" => {
                let seq = wire
                    .seq
                    .ok_or_else(|| bad("exitedAfterDisconnect", "seq"))?;
                // The worker disconnects only once this is answered.
                let ours = self.seq();
                let _ = writeln!(
                    Utf8Sink(replies),
                    "{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq},\"seq\":{ours}}}"
                );
                Ok(Some(Message::ExitedAfterDisconnect))
            }
            other => Err(NodeError::UnknownAct(other.to_string())),
        }
    }

    fn decode_query(&mut self, wire: &Wire<'_>) -> Result<Message, NodeError> {
        const M: &str = "queryServer";
        let seq = wire.seq.ok_or_else(|| bad(M, "seq"))?;
        let address_type = wire
            .address_type
            .map(|r| r.get().trim_matches('"').to_string())
            .ok_or_else(|| bad(M, "addressType"))?;
        let port = int(wire.port).unwrap_or(-1);
        let index = int(wire.index)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0);
        let fd = int(wire.fd);
        let ip = |v6: bool| -> Result<IpAddr, NodeError> {
            match &wire.address {
                Some(a) => a.parse().map_err(|_| bad(M, "address")),
                // Node's listen without a host: all interfaces of the family.
                None if v6 => Ok(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                None => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            }
        };
        let port16 = || u16::try_from(port).map_err(|_| bad(M, "port"));
        let addr = match (fd, address_type.as_str()) {
            (Some(fd), _) if fd >= 0 => {
                ListenAddr::Fd(i32::try_from(fd).map_err(|_| bad(M, "fd"))?)
            }
            (_, "4") => ListenAddr::Tcp(SocketAddr::new(ip(false)?, port16()?)),
            (_, "6") => ListenAddr::Tcp(SocketAddr::new(ip(true)?, port16()?)),
            (_, "udp4") => ListenAddr::Udp(SocketAddr::new(ip(false)?, port16()?)),
            (_, "udp6") => ListenAddr::Udp(SocketAddr::new(ip(true)?, port16()?)),
            (_, "-1") => ListenAddr::Unix(
                wire.address
                    .clone()
                    .ok_or_else(|| bad(M, "address"))?
                    .into(),
            ),
            _ => return Err(bad(M, "addressType")),
        };
        let spec = ListenSpec {
            addr,
            ipv6_only: int(wire.flags).unwrap_or(0) & i64::from(IPV6_ONLY_FLAG) != 0,
            backlog: int(wire.backlog)
                .filter(|b| *b > 0)
                .map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
            exclusive: false,
            // Node has no such option; the master's own (`--defer-accept`) applies.
            defer_accept: false,
        };
        // Node's own key, `address:port:addressType:fd:index`, as JS template strings render
        // it; the worker treats it as opaque and names the server by it.
        let key = format!(
            "{}:{}:{}:{}:{}",
            wire.address.as_deref().unwrap_or("null"),
            port,
            address_type,
            fd.map_or_else(|| "undefined".to_string(), |f| f.to_string()),
            index
        );
        let ident = ListenIdent {
            address: wire.address.clone(),
            address_type,
            fd,
            index,
            port,
        };
        let (data, shared_ref) = self
            .shared
            .settle(&key, wire.data.map_or("null", |d| d.get()));
        let query = PendingQuery {
            key,
            data,
            shared_ref,
            ident,
        };
        if let Some(old) = self.queries.insert(seq, query)
            && old.shared_ref
        {
            // The worker reused a seq: the query it replaces will never be answered.
            self.shared.release(&old.key);
        }
        Ok(Message::QueryServer {
            seq: Seq(seq),
            spec,
            index,
        })
    }

    /// `listening` names the server only by the listen's fields, with the bound port.
    fn decode_listening(&mut self, wire: &Wire<'_>) -> Option<Message> {
        let address_type = wire.address_type.map(|r| r.get().trim_matches('"'))?;
        let port = int(wire.port).unwrap_or(-1);
        let fd = int(wire.fd);
        let index = int(wire.index)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0);
        let g = self.granted.iter_mut().find(|g| {
            !g.listening
                && g.ident.address == wire.address
                && g.ident.address_type == address_type
                && g.ident.fd == fd
                && g.ident.index == index
                && (g.ident.port == port || bound_port(&g.bound) == Some(port))
        })?;
        g.listening = true;
        Some(Message::Listening {
            server: g.server,
            addr: g.bound.clone(),
        })
    }

    /// Encodes `msg` (to be sent with `n_fds` fds) as one line appended to `out`. What the
    /// line expects back is returned, for [`NodeCodec::commit`] once the line is sent.
    pub(crate) fn encode(
        &mut self,
        msg: &Message,
        n_fds: usize,
        out: &mut Vec<u8>,
    ) -> Result<Pending, NodeError> {
        match msg {
            Message::NewConn { server, conns } => {
                // Node's receiver takes one handle per read, so each hand-off is a line of its
                // own (the channel says so through `max_handoff_batch`).
                let [HandedConn { conn, .. }] = conns.as_slice() else {
                    return Err(NodeError::Unsupported(format!(
                        "a batch of {} hand-offs",
                        conns.len()
                    )));
                };
                let head = self
                    .granted
                    .iter()
                    .find(|g| g.server == *server)
                    .map(|g| g.newconn_head.as_slice())
                    .ok_or_else(|| NodeError::Unsupported(format!("newconn on {server}")))?;
                out.extend_from_slice(head);
                let seq = self.next_seq;
                push_decimal(out, seq);
                out.extend_from_slice(b"}}\n");
                self.next_seq += 1;
                Ok(Pending::NewConn { seq, conn: *conn })
            }
            Message::QueryServerReply { seq, reply } => self.encode_reply(*seq, reply, out),
            Message::Disconnect => {
                let seq = self.seq();
                let _ = writeln!(
                    Utf8Sink(out),
                    "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":{seq}}}"
                );
                Ok(Pending::Nothing)
            }
            Message::User { payload } => {
                if n_fds > 0 {
                    return Err(NodeError::Unsupported("fds with a user message".into()));
                }
                encode_user(payload, out)?;
                Ok(Pending::Nothing)
            }
            other => Err(NodeError::Unsupported(other.name().to_string())),
        }
    }

    fn encode_reply(
        &mut self,
        seq: Seq,
        reply: &ServerReply,
        out: &mut Vec<u8>,
    ) -> Result<Pending, NodeError> {
        let ours = self.next_seq;
        let q = self
            .queries
            .get(&seq.0)
            .ok_or_else(|| NodeError::Unsupported(format!("reply to unknown query {seq}")))?;
        let head = |out: &mut Vec<u8>, errno: &str| {
            let _ = write!(
                Utf8Sink(out),
                "{{\"cmd\":\"NODE_CLUSTER\",\"errno\":{errno},\"key\":"
            );
            json_string(out, &q.key);
            let _ = write!(Utf8Sink(out), ",\"ack\":{},\"data\":{}", seq.0, q.data);
        };
        let pending = match reply {
            ServerReply::Failed(e) => {
                // libuv's errors are the negated errno on Linux.
                head(out, &(-e.errno.abs()).to_string());
                let _ = writeln!(Utf8Sink(out), ",\"seq\":{ours}}}");
                Pending::Reply {
                    query: seq.0,
                    granted: None,
                    handle: false,
                }
            }
            ServerReply::Granted {
                server,
                addr,
                grant,
            } => {
                let handle = match grant {
                    ServerGrant::RoundRobin => {
                        head(out, "null");
                        if let BoundAddr::Inet(a) = addr {
                            out.extend_from_slice(b",\"sockname\":{\"address\":");
                            json_string(out, &a.ip().to_string());
                            let family = if a.is_ipv4() { "IPv4" } else { "IPv6" };
                            let _ = write!(
                                Utf8Sink(out),
                                ",\"family\":\"{family}\",\"port\":{}}}",
                                a.port()
                            );
                        }
                        let _ = writeln!(Utf8Sink(out), ",\"seq\":{ours}}}");
                        false
                    }
                    ServerGrant::Shared | ServerGrant::ReusePort => {
                        let kind = if q.ident.address_type.starts_with("udp") {
                            "dgram.Native"
                        } else {
                            "net.Native"
                        };
                        let _ = write!(
                            Utf8Sink(out),
                            "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"{kind}\",\"msg\":"
                        );
                        head(out, "0");
                        let _ = writeln!(Utf8Sink(out), ",\"seq\":{ours}}}}}");
                        true
                    }
                };
                Pending::Reply {
                    query: seq.0,
                    granted: Some((*server, addr.clone())),
                    handle,
                }
            }
        };
        self.next_seq += 1;
        Ok(pending)
    }
}

impl Drop for NodeCodec {
    /// The worker is gone: what it held or asked for in the shared `data` is released.
    fn drop(&mut self) {
        let held = self.queries.values().map(|q| (q.shared_ref, &q.key));
        let held = held.chain(self.granted.iter().map(|g| (g.shared_ref, &g.key)));
        for (_, key) in held.filter(|(shared_ref, _)| *shared_ref) {
            self.shared.release(key);
        }
    }
}

/// A worker's `NODE_HANDLE_ACK`, as Node writes it.
const HANDLE_ACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";

/// `(ack, accepted)` of a line that is exactly Node's answer to a `newconn`,
/// `{"cmd":"NODE_CLUSTER","ack":N,"accepted":B,"seq":M}`; `None` for anything else.
fn quick_answer(line: &[u8]) -> Option<(u64, bool)> {
    let rest = line.strip_prefix(b"{\"cmd\":\"NODE_CLUSTER\",\"ack\":")?;
    let (ack, rest) = leading_decimal(rest)?;
    let (accepted, rest) = match rest.strip_prefix(b",\"accepted\":true,\"seq\":") {
        Some(rest) => (true, rest),
        None => (false, rest.strip_prefix(b",\"accepted\":false,\"seq\":")?),
    };
    let (_, rest) = leading_decimal(rest)?;
    (rest == b"}").then_some((ack, accepted))
}

/// The decimal number at the start of `bytes` (JSON's spelling: no sign, no leading zero) and
/// what follows it; `None` if there is none or it overflows.
fn leading_decimal(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && bytes[0] == b'0') {
        return None;
    }
    let n = bytes[..digits].iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((n, &bytes[digits..]))
}

/// `n` in decimal, without going through `fmt` (this is on every hand-off).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn bound_port(b: &BoundAddr) -> Option<i64> {
    match b {
        BoundAddr::Inet(a) => Some(i64::from(a.port())),
        BoundAddr::Unix(_) => None,
    }
}

/// A line that is not a well-typed [`Wire`]: valid JSON that is not a Node-internal message is
/// a user message; anything else is a violation.
fn user_or_malformed(line: &[u8], e: Option<serde_json::Error>) -> Result<Decoded, NodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| NodeError::Malformed(e.to_string()))?;
    if let Some(e) = e
        && let Some(cmd) = value.get("cmd").and_then(|c| c.as_str())
        && is_internal_cmd(cmd)
    {
        return Err(NodeError::Malformed(format!("{cmd}: {e}")));
    }
    Ok(Decoded {
        msg: Some(Message::User {
            payload: line.to_vec(),
        }),
        ..Decoded::default()
    })
}

/// A user message for the worker: any JSON value except one Node would take for its own.
fn encode_user(payload: &[u8], out: &mut Vec<u8>) -> Result<(), NodeError> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| NodeError::Unsupported(format!("a user message that is not JSON ({e})")))?;
    if let Some(cmd) = value.get("cmd").and_then(|c| c.as_str())
        && is_internal_cmd(cmd)
    {
        return Err(NodeError::Unsupported(format!(
            "a user message with cmd {cmd}"
        )));
    }
    // A JSON string cannot hold a raw line break, so any in valid JSON is whitespace between
    // tokens: a space keeps the value (and its key order) and the message on one line.
    out.extend(
        payload
            .iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    out.push(b'\n');
    Ok(())
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `write!` into a byte buffer.
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Splits a byte stream into lines of at most `max` bytes (the `\n` not counted).
#[derive(Debug)]
pub(crate) struct LineSplitter {
    /// `buf[..filled]` holds data; the rest is space to read into, zeroed once when the
    /// buffer grows and reused after (a 64 KiB memset per read would cost more than the read).
    buf: Vec<u8>,
    filled: usize,
    /// Start of the first line not yet returned.
    start: usize,
    /// Where to resume the search for `\n` (everything in `start..scanned` has none).
    scanned: usize,
    max: usize,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            filled: 0,
            start: 0,
            scanned: 0,
            max,
        }
    }

    /// Free space of at least `want` bytes after the data, to read into; then call
    /// [`LineSplitter::commit`] with how much was read.
    pub(crate) fn read_buf(&mut self, want: usize) -> &mut [u8] {
        if self.start == self.filled {
            self.filled = 0;
            self.start = 0;
            self.scanned = 0;
        } else if self.start > 0 && self.buf.len() - self.filled < want {
            self.buf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.filled < want {
            self.buf.resize(self.filled + want, 0);
        }
        &mut self.buf[self.filled..]
    }

    /// Keeps `n` bytes of the space [`LineSplitter::read_buf`] gave.
    pub(crate) fn commit(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.buf.len());
    }

    /// Bytes held that are not yet part of a returned line.
    pub(crate) fn buffered(&self) -> usize {
        self.filled - self.start
    }

    /// The next complete line, without its `\n`.
    pub(crate) fn next_line(&mut self) -> Result<Option<&[u8]>, NodeError> {
        match self.buf[self.scanned..self.filled]
            .iter()
            .position(|b| *b == b'\n')
        {
            Some(i) => {
                let end = self.scanned + i;
                let line_start = self.start;
                if end - line_start > self.max {
                    return Err(NodeError::LineTooLong { max: self.max });
                }
                self.start = end + 1;
                self.scanned = self.start;
                Ok(Some(&self.buf[line_start..end]))
            }
            None => {
                self.scanned = self.filled;
                if self.filled - self.start > self.max {
                    return Err(NodeError::LineTooLong { max: self.max });
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use crate::{BoundAddr, ConnId, ListenError, ListenSpec, Seq, ServerId};

/// One message of the master/worker protocol, in Node's vocabulary.
///
/// The protocol enums are deliberately exhaustive: the codec must match every variant, so a
/// new message cannot be added without its wire encoding.
///
/// Which messages carry fds is fixed here ([`Message::fds_allowed`]); the frame format in
/// `cluster-ipc` declares the count so that a missing or surplus fd is a protocol error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // ---- worker -> master ----
    /// The worker's runtime is up (Node's `online`).
    Online,
    /// Asks the master for a server (Node's `queryServer`); answered by
    /// [`Message::QueryServerReply`] with the same `seq`.
    QueryServer {
        /// Correlates the reply.
        seq: Seq,
        /// What the worker's `listen` was called with.
        spec: ListenSpec,
        /// The worker's per-address index (see [`ListenSpec::key`]).
        index: u32,
    },
    /// The worker's server is listening (Node's `listening`).
    Listening {
        /// The server, as granted.
        server: ServerId,
        /// Where it listens.
        addr: BoundAddr,
    },
    /// The worker took a handed-off connection; the master may close its copy.
    Accepted {
        /// The hand-off being answered.
        conn: ConnId,
    },
    /// The worker will not take a handed-off connection; the master gives it to another worker.
    Refused {
        /// The hand-off being answered.
        conn: ConnId,
        /// Why; the master stops offering to a worker that will refuse everything.
        reason: RefuseReason,
    },
    /// The worker closed its server (Node's `close`).
    Close {
        /// The server closed.
        server: ServerId,
    },
    /// The worker is leaving on its own after a disconnect (Node's `exitedAfterDisconnect`), so
    /// its exit is not a crash.
    ExitedAfterDisconnect,

    // ---- master -> worker ----
    /// The answer to [`Message::QueryServer`].
    QueryServerReply {
        /// The request's `seq`.
        seq: Seq,
        /// The grant or the error.
        reply: ServerReply,
    },
    /// Connections accepted by the master for one worker in one pass: one fd per entry of
    /// `conns`, in the same order, in this frame's one `sendmsg`. Each fd is non-blocking (the
    /// master accepts with `SOCK_NONBLOCK`, and sets it again before handing a connection to
    /// another worker), and the peer's address comes from that `accept`, so the worker needs
    /// neither `getpeername` nor `FIONBIO`. The worker answers each entry on its own.
    NewConn {
        /// The server they were accepted on.
        server: ServerId,
        /// At least one, at most [`MAX_HANDOFF_BATCH`].
        conns: Vec<HandedConn>,
    },
    /// Stop taking connections, finish, and exit (Node's `disconnect`).
    Disconnect,

    // ---- both ways ----
    /// An application message; may carry fds where the receiver allows them.
    User {
        /// Opaque bytes.
        payload: Vec<u8>,
    },
}

impl Message {
    /// A [`Message::NewConn`] handing off one connection.
    pub fn new_conn(server: ServerId, conn: ConnId, peer: Peer) -> Message {
        Message::NewConn {
            server,
            conns: vec![HandedConn { conn, peer }],
        }
    }

    /// How many fds a frame of this message must carry, as an inclusive range.
    pub fn fds_allowed(&self) -> std::ops::RangeInclusive<usize> {
        match self {
            // A batch outside 1..=MAX_HANDOFF_BATCH allows no count at all: it cannot be sent.
            Message::NewConn { conns, .. } if (1..=MAX_HANDOFF_BATCH).contains(&conns.len()) => {
                conns.len()..=conns.len()
            }
            Message::NewConn { .. } => std::ops::RangeInclusive::new(1, 0),
            Message::QueryServerReply {
                reply: ServerReply::Granted { grant, .. },
                ..
            } => match grant {
                ServerGrant::RoundRobin => 0..=0,
                ServerGrant::Shared | ServerGrant::ReusePort => 1..=1,
            },
            Message::User { .. } => 0..=crate::message::MAX_USER_FDS,
            _ => 0..=0,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Online => "online",
            Message::QueryServer { .. } => "queryServer",
            Message::Listening { .. } => "listening",
            Message::Accepted { .. } => "accepted",
            Message::Refused { .. } => "refused",
            Message::Close { .. } => "close",
            Message::ExitedAfterDisconnect => "exitedAfterDisconnect",
            Message::QueryServerReply { .. } => "queryServerReply",
            Message::NewConn { .. } => "newconn",
            Message::Disconnect => "disconnect",
            Message::User { .. } => "user",
        }
    }
}

/// One connection of a [`Message::NewConn`] batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandedConn {
    /// The hand-off id the worker answers with.
    pub conn: ConnId,
    /// Who connected, as the master's `accept` saw it.
    pub peer: Peer,
}

/// The far end of a handed-off connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A TCP connection from this address.
    Tcp(SocketAddr),
    /// A Unix-domain stream connection (its peer address is of no use to a server).
    Unix,
}

/// The most connections one [`Message::NewConn`] frame carries: a master that accepted more
/// for one worker in one pass sends several frames.
pub const MAX_HANDOFF_BATCH: usize = 16;

/// The most fds one user message may carry. Far below `SCM_MAX_FD` (253) so that one receive's
/// control buffer always has room.
pub const MAX_USER_FDS: usize = 16;

/// Why a worker refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The worker closed that server (or never had it).
    ListenerClosed,
    /// The worker is disconnecting.
    Draining,
    /// The worker is at its connection limit.
    MaxConnections,
    /// The worker is near its open-file limit.
    FdLimit,
    /// The fd did not arrive intact (control data truncated).
    FdLost,
}

impl RefuseReason {
    /// True when the worker will refuse every later hand-off for this server too, so the master
    /// stops offering to it instead of bouncing connections.
    pub fn is_permanent(self) -> bool {
        matches!(self, RefuseReason::ListenerClosed | RefuseReason::Draining)
    }
}

/// The body of [`Message::QueryServerReply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerReply {
    /// The server exists; the worker may use it.
    Granted {
        /// The master's id for the server, used in later frames.
        server: ServerId,
        /// The address actually bound (the real port for `listen(0)`).
        addr: BoundAddr,
        /// How the worker gets connections.
        grant: ServerGrant,
    },
    /// The master could not create the server; the errno travels back to `listen`.
    Failed(ListenError),
}

/// How a granted server delivers connections to the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerGrant {
    /// The master accepts and sends [`Message::NewConn`].
    RoundRobin,
    /// The reply carries the master's bound socket; the worker accepts (or receives) on it.
    Shared,
    /// The reply carries this worker slot's own `SO_REUSEPORT` socket.
    ReusePort,
}

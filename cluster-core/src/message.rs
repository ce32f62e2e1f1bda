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
    /// A connection accepted by the master; its fd travels with this frame.
    NewConn {
        /// The server it was accepted on.
        server: ServerId,
        /// The hand-off id the worker answers with.
        conn: ConnId,
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
    /// How many fds a frame of this message must carry, as an inclusive range.
    pub fn fds_allowed(&self) -> std::ops::RangeInclusive<usize> {
        match self {
            Message::NewConn { .. } => 1..=1,
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

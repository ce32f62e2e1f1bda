use std::io;

/// Why a frame could not be decoded. Any of these means the peer is broken or hostile: the
/// channel must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header names a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The tag byte names no message.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// The body ended before the message did.
    #[error("frame body truncated")]
    Truncated,
    /// The body has bytes after the message.
    #[error("trailing bytes after the message")]
    Trailing,
    /// The body's declared length is over the cap.
    #[error("frame of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The header declares more fds than any frame may carry.
    #[error("frame declares {0} fds")]
    TooManyFds(usize),
    /// The declared fd count is not what this message type carries.
    #[error("{message} frame declares {declared} fds")]
    FdCount {
        /// Message name.
        message: &'static str,
        /// Declared count.
        declared: usize,
    },
    /// A field holds a value outside its domain.
    #[error("invalid {0}: {1}")]
    BadValue(&'static str, u8),
    /// A text field is not UTF-8.
    #[error("text field is not UTF-8")]
    BadUtf8,
}

/// Errors of a [`crate::Channel`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// A system call failed.
    #[error("channel i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the channel between frames.
    #[error("channel closed by peer")]
    Closed,
    /// The peer closed the channel in the middle of a frame.
    #[error("channel closed by peer in the middle of a frame ({0} bytes buffered)")]
    ClosedMidFrame(usize),
    /// The peer sent a frame that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    /// The kernel dropped fds because the control buffer was too small or the receiver was at
    /// its fd limit (`MSG_CTRUNC`); which frame lost them cannot be known.
    #[error("fds truncated in transit (MSG_CTRUNC)")]
    FdsTruncated,
    /// A frame's declared fd count does not match the fds that arrived with it.
    #[error("frame declares {declared} fds but {arrived} arrived")]
    FdMismatch {
        /// Declared in the header.
        declared: usize,
        /// Received ahead of the frame's end.
        arrived: usize,
    },
    /// The peer sent fds with a message this side does not accept fds for.
    #[error("peer sent {0} fds where none are accepted")]
    FdsNotAllowed(usize),
    /// A send with the wrong number of fds for the message (a bug in the caller).
    #[error("{message} takes {allowed:?} fds, {given} given")]
    WrongFdCount {
        /// Message name.
        message: &'static str,
        /// What the message allows.
        allowed: std::ops::RangeInclusive<usize>,
        /// What was passed.
        given: usize,
    },
    /// The encoded frame is over the cap (a bug or abuse in the caller).
    #[error("outgoing frame of {len} bytes exceeds the cap of {max}")]
    OutgoingTooLarge {
        /// Body length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A blocking receive or send ran out of time.
    #[error("channel timed out")]
    TimedOut,
    /// The peer broke a protocol framed outside this crate (Node's JSON lines); the text says
    /// how.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl IpcError {
    /// The same error again, for a dead channel that reports it to every later call. An
    /// `io::Error` cannot be cloned; its OS error code or kind and message are kept.
    pub fn replay(&self) -> IpcError {
        match self {
            IpcError::Io(e) => IpcError::Io(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            }),
            IpcError::Closed => IpcError::Closed,
            IpcError::ClosedMidFrame(n) => IpcError::ClosedMidFrame(*n),
            IpcError::Malformed(d) => IpcError::Malformed(d.clone()),
            IpcError::FdsTruncated => IpcError::FdsTruncated,
            IpcError::FdMismatch { declared, arrived } => IpcError::FdMismatch {
                declared: *declared,
                arrived: *arrived,
            },
            IpcError::FdsNotAllowed(n) => IpcError::FdsNotAllowed(*n),
            IpcError::WrongFdCount {
                message,
                allowed,
                given,
            } => IpcError::WrongFdCount {
                message,
                allowed: allowed.clone(),
                given: *given,
            },
            IpcError::OutgoingTooLarge { len, max } => IpcError::OutgoingTooLarge {
                len: *len,
                max: *max,
            },
            IpcError::TimedOut => IpcError::TimedOut,
            IpcError::Protocol(s) => IpcError::Protocol(s.clone()),
        }
    }

    /// True when the peer is gone (as opposed to having misbehaved).
    pub fn is_closed(&self) -> bool {
        matches!(self, IpcError::Closed | IpcError::ClosedMidFrame(_))
            || matches!(self, IpcError::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ))
    }
}

impl From<IpcError> for io::Error {
    fn from(e: IpcError) -> io::Error {
        match e {
            IpcError::Io(e) => e,
            IpcError::TimedOut => io::Error::new(io::ErrorKind::TimedOut, e),
            IpcError::Closed | IpcError::ClosedMidFrame(_) => {
                io::Error::new(io::ErrorKind::UnexpectedEof, e)
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

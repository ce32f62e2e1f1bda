//! Framed cluster-rs messages with fds attached (`SCM_RIGHTS`) over a Unix socketpair.
//!
//! - [`frame`]: the pure wire format ([`frame::encode_into`], [`frame::decode`],
//!   [`Decoder`]).
//! - [`Channel`]: one non-blocking end of a `SOCK_STREAM` socketpair, registrable in mio, with
//!   an outgoing queue that survives `EAGAIN`.
//! - [`spawn_with_channel`]: gives a child process its end at a fixed fd.
//!
//! Why `SOCK_STREAM` rather than `SOCK_SEQPACKET`: user messages may be up to 1 MiB, larger
//! than a default socket buffer, which a seqpacket send cannot split; mio supports stream
//! sockets natively; and Node's own IPC (which our master will speak next) is a stream. The
//! costs of a stream (partial writes, fds attached to a byte range) are handled in
//! [`Channel`]: fds go only with a frame's first byte, and each frame declares its fd count.
//!
//! ```
//! use cluster_core::{ConnId, Message, Peer, ServerId};
//! use cluster_ipc::Channel;
//! use std::os::fd::AsFd;
//!
//! let (mut master, mut worker) = Channel::pair()?;
//! let conn = std::net::TcpListener::bind("127.0.0.1:0")?; // any socket
//! master.send(&Message::new_conn(ServerId(1), ConnId(7), Peer::Unix), &[conn.as_fd()])?;
//! let got = worker.recv_blocking(None)?;
//! assert_eq!(got.fds.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod channel;
mod error;
pub mod frame;
mod outq;
mod stream;
mod sys;
#[cfg(test)]
mod tests;

pub use channel::{Channel, Limits, Received, spawn_with_channel};
pub use error::{DecodeError, IpcError};
pub use frame::Decoder;
pub use outq::OutQueue;
pub use stream::{FdStream, StreamRead, spawn_with_stream};
pub use sys::{DEFER_ACCEPT_SECONDS, accept_nonblocking, set_tcp_defer_accept, tcp_defer_accept};

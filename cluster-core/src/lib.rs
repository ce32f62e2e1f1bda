//! The shared vocabulary of cluster-rs.
//!
//! Master and worker never depend on each other: they meet only in the types defined here,
//! carried over the wire by `cluster-ipc`. Nothing in this crate does I/O.
//!
//! - [`WorkerId`], [`ConnId`], [`Seq`], [`ServerId`]: newtype ids.
//! - [`ListenSpec`] (what a worker asks to listen on) and [`ListenKey`] (what identifies one
//!   shared server in the master, Node's `address:port:addressType:fd[:index]`).
//! - [`Policy`]: round-robin (Node's `SCHED_RR`), shared handle (`SCHED_NONE`), reuse-port.
//! - [`Message`]: the protocol, Node's vocabulary, both directions.
//! - [`env`](mod@env): the environment contract between a master and the workers it spawns.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod env;
mod error;
mod id;
mod listen;
mod message;
mod policy;

pub use error::{CoreError, ListenError};
pub use id::{ConnId, Seq, ServerId, WorkerId};
pub use listen::{BoundAddr, ListenAddr, ListenKey, ListenSpec};
pub use message::{
    HandedConn, MAX_HANDOFF_BATCH, MAX_USER_FDS, Message, Peer, RefuseReason, ServerGrant,
    ServerReply,
};
pub use policy::Policy;

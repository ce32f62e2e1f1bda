//! The cluster-rs master: owns the listening sockets and runs N worker processes that serve
//! them.
//!
//! # Theory of operation
//! One event-loop thread ([`Master::start`]) owns everything: the listening sockets, each
//! worker's channel, a pidfd per worker (exit notification without a `SIGCHLD` handler), the
//! workers' output pipes, timers, and the command queue that the [`Master`] handle feeds.
//!
//! A worker's `listen` arrives as `QueryServer`. The server table, keyed by
//! [`cluster_core::ListenKey`], binds on the first query (an error goes back to that worker
//! and the key is not kept) and grants later queries the same server. Under
//! [`cluster_core::Policy::RoundRobin`] the master accepts every connection and its
//! [`RoundRobinHandle`] decides who gets it: the next worker in a ring of those with room in
//! their window, so connections are dealt one at a time. The fd goes out in a `NewConn` frame and the master keeps its own copy until the
//! worker answers `Accepted` (close it) or `Refused` (another worker gets it). If the worker
//! dies first, the connection is re-queued: none is lost, none is delivered twice.
//! [`cluster_core::Policy::Shared`] (always for UDP) grants the bound socket itself;
//! [`cluster_core::Policy::ReusePort`] grants each worker slot its own `SO_REUSEPORT` socket,
//! kept across that slot's restarts.
//!
//! Crashed workers are restarted with exponential backoff and jitter; a slot that keeps
//! crashing right after start is marked errored. A rolling reload replaces one slot at a time
//! and only disconnects the old worker once the new one is listening. These decisions are made
//! by a second pure state machine (the private `supervision` module, built on
//! [`RestartPolicy`] and [`SlotHistory`]); the event loop feeds it what happens to the
//! processes and carries out the spawns, disconnects and kills it asks for.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod activation;
mod bind;
mod channel;
mod config;
mod error;
mod event_loop;
mod events;
mod master;
mod node;
mod notify;
mod orphans;
mod round_robin;
mod sd;
mod server;
mod supervision;
mod supervisor;
mod sys;

pub use channel::WorkerChannel;
pub use config::{
    BatchWhileBehind, Coalesce, DEFAULT_MAX_SERVERS_PER_WORKER, DEFAULT_READY_DELAY,
    LoopScheduling, MasterBuilder,
};
pub use error::MasterError;
pub use events::{Event, MasterStats, WorkerInfo, WorkerState};
pub use master::{Master, MasterControl};
pub use node::Protocol;
pub use round_robin::{
    Action, CloseReason, DEFAULT_STALL_AFTER, DEFAULT_WINDOW, HandleError, RoundRobinConfig,
    RoundRobinHandle, RoundRobinStats,
};
pub use supervisor::{RestartDecision, RestartPolicy, SlotHistory};

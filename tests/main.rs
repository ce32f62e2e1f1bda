//! Cross-crate integration tests: real processes, real sockets on 127.0.0.1 only.
// Test helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fd_exhaustion;
mod handoff_loss;
mod hostile_bounds;
mod hostile_worker;
mod lifecycle;
mod node_messages;
mod round_robin;
mod scheduling;
mod shared_handle;
mod tokio_worker;
mod util;
mod worker_runtime;

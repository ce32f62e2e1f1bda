//! Cross-crate integration tests: real processes, real sockets on 127.0.0.1 only.

mod handoff_loss;
mod hostile_worker;
mod lifecycle;
mod round_robin;
mod shared_handle;
mod util;

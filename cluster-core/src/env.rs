//! The environment contract between a master and the workers it spawns.
//!
//! A worker is recognised by [`WORKER_ID`] being set (Node uses `NODE_UNIQUE_ID`); its channel to
//! the master is the inherited fd named by [`CHANNEL_FD`]. Every other fd the master holds is
//! close-on-exec, so the channel is the only one the worker inherits.

use crate::{CoreError, WorkerId};

/// The worker's id, decimal. Its presence makes a process a worker.
pub const WORKER_ID: &str = "CLUSTER_RS_WORKER_ID";
/// The fd number of the worker's end of the channel, decimal.
pub const CHANNEL_FD: &str = "CLUSTER_RS_CHANNEL_FD";
/// The worker's slot (0-based position in the pool), stable across restarts of that slot.
pub const WORKER_SLOT: &str = "CLUSTER_RS_WORKER_SLOT";

/// The fd number at which a spawned worker finds its channel: the first after stdio, as
/// systemd's `SD_LISTEN_FDS_START`.
pub const DEFAULT_CHANNEL_FD: i32 = 3;

/// Parses [`WORKER_ID`] from a value read out of the environment.
pub fn parse_worker_id(value: &str) -> Result<WorkerId, CoreError> {
    value
        .trim()
        .parse::<u32>()
        .map(WorkerId)
        .map_err(|_| CoreError::BadEnv {
            name: WORKER_ID,
            value: value.to_owned(),
        })
}

/// Parses [`CHANNEL_FD`]: a non-negative fd number above stdio.
pub fn parse_channel_fd(value: &str) -> Result<i32, CoreError> {
    match value.trim().parse::<i32>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(CoreError::BadEnv {
            name: CHANNEL_FD,
            value: value.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_stdio_or_garbage() {
        assert_eq!(parse_worker_id("7"), Ok(WorkerId(7)));
        assert!(parse_worker_id("x").is_err());
        assert_eq!(parse_channel_fd("3"), Ok(3));
        assert!(parse_channel_fd("1").is_err());
        assert!(parse_channel_fd("-4").is_err());
    }
}

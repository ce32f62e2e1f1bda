use std::io;

/// Errors from parsing or validating the shared vocabulary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    /// A policy name other than `rr`, `shared` or `reuseport`.
    #[error("unknown scheduling policy {0:?} (expected rr, shared or reuseport)")]
    UnknownPolicy(String),
    /// An environment variable of the master/worker contract is malformed.
    #[error("environment variable {name} has an invalid value {value:?}")]
    BadEnv {
        /// The variable's name.
        name: &'static str,
        /// What it held.
        value: String,
    },
}

/// A listen that failed in the master, carried back to the worker's `listen` call.
///
/// The errno is kept as a number so that `EADDRINUSE` in the master becomes
/// `io::ErrorKind::AddrInUse` in the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context}: {}", io::Error::from_raw_os_error(*errno))]
pub struct ListenError {
    /// The OS error number (`libc::EADDRINUSE`, ...).
    pub errno: i32,
    /// What the master was doing, for example `bind 127.0.0.1:8000`.
    pub context: String,
}

impl From<ListenError> for io::Error {
    fn from(e: ListenError) -> io::Error {
        let kind = io::Error::from_raw_os_error(e.errno).kind();
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_error_keeps_its_kind() {
        // 98 is EADDRINUSE on Linux.
        let e = ListenError {
            errno: 98,
            context: "bind 127.0.0.1:1".into(),
        };
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::AddrInUse);
        assert!(io.to_string().contains("bind 127.0.0.1:1"));
    }
}

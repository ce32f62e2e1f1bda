//! Cross-crate integration tests: real processes, real sockets on 127.0.0.1 only.

//! The cluster-rs master.
#![warn(missing_docs)]
#![deny(unsafe_code)]

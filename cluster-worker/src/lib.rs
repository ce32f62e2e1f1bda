//! The cluster-rs worker runtime.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod handler;

pub use handler::{Conn, ConnInfo, Next, Session, SessionFactory};

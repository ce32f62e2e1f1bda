//! cluster-cli: run a program as a cluster of workers.
#![forbid(unsafe_code)]

fn main() {}

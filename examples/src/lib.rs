//! Example servers for cluster-rs; the code is in `examples/`. Each runs standalone
//! (`cargo run -p cluster-examples --example axum_hello`) and under a master
//! (`cluster-cli spawn -n 2 target/debug/examples/axum_hello`).

#![no_std]
// The library target lets `cargo clippy --workspace` check the crate on the host; the programs
// themselves are the `dataplane` binary built for bpfel-unknown-none.

//! `cargo xtask <command>`: the workspace's developer tasks. Each command lives in its own module;
//! every child process is built by `util::cmd`.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks of the dataplane workspace",
    long_about = "Developer tasks of the dataplane workspace. Every command prints each command \
                  it runs (`==> …`) and fails with a one-line error naming the step that failed."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks: nightly + rust-src, bpf-linker, Debian packages.
    ///
    /// Idempotent: each item is checked first and prints "ok: X already present" or
    /// "installing X". Checks the nightly toolchain (installs it if possible), its rust-src and
    /// clippy components, the libLLVM.so symlink in its sysroot, bpf-linker (built against the
    /// nightly's own LLVM), and the Debian packages the tests use (etcd, iproute2, iptables,
    /// ipset, iperf3, bpftool, tcpdump, CNI plugins, protoc, procps, g++ for libFuzzer),
    /// kubernetes-validate (PyPI, in a venv under /opt/dataplane-tools) for the deploy/
    /// manifests' schema test, and cargo-fuzz (`cargo install --locked`) for `xtask fuzz`.
    Setup,
    /// Run setup, lints, build, all tests and a benchmark smoke run, then print a summary (root).
    ///
    /// Steps: setup; `cargo fmt --check`; clippy on the workspace and (nightly, bpfel target) on
    /// the eBPF crate, with warnings denied; `cargo build --workspace --all-targets`;
    /// `cargo test --workspace --no-fail-fast`; `cargo xtask fuzz --dev --time 20` (every fuzz target
    /// 20 s); `cargo run --release -p dataplane-benches -- --quick`. Every step runs even after a failure; the summary lists each step's duration
    /// and PASS/FAIL, and the exit status is non-zero if any step failed. Must run as root.
    Test(test::Args),
    /// Run setup, build the workspace and run the demo: a cluster in a box (root).
    ///
    /// Runs `cargo build --workspace`, then `cargo run -p dataplane-tests --bin demo`.
    /// Must run as root.
    Demo(demo::Args),
    /// Run setup, then the benchmarks in release mode (root).
    ///
    /// Runs `cargo run --release -p dataplane-benches -- <BENCH_ARGS>`. Must run as root.
    Bench(bench::Args),
    /// Build the coverage-guided fuzz targets (fuzz/, cargo-fuzz + nightly) and run each for a
    /// bounded time.
    ///
    /// Targets: cni_stdin (CNI environment + stdin), selector (Calico selectors), policy
    /// (ctl apply documents compiled into the policy tries), etcd_value (every datastore
    /// decoder on any key and bytes). Prints per target the executions run, exec/s, coverage
    /// and crashes; a crash fails the command and names the reproducer under
    /// fuzz/artifacts/<target>/. Examples: `cargo xtask fuzz` (all, 60 s each);
    /// `cargo xtask fuzz --target policy --time 600`; replay a reproducer with
    /// `cargo +nightly fuzz run policy fuzz/artifacts/policy/crash-…`.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run_setup(),
        Command::Test(args) => test::run_test(args),
        Command::Demo(args) => demo::run_demo(args),
        Command::Bench(args) => bench::run_bench(args),
        Command::Fuzz(args) => fuzz::run_fuzz(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

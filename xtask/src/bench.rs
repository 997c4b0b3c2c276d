//! `cargo xtask bench`: run the benchmarks in release mode.

use anyhow::Result;

use crate::{
    setup::run_setup,
    util::{cmd, require_root, run},
};

#[derive(clap::Args)]
pub struct Args {
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,

    /// Arguments for the benchmark binary (after `--`), e.g. `--quick`; see
    /// `cargo xtask bench -- --help`.
    #[arg(last = true, value_name = "BENCH_ARGS")]
    bench_args: Vec<String>,
}

pub fn run_bench(args: Args) -> Result<()> {
    require_root("bench")?;
    if !args.skip_setup {
        run_setup()?;
    }
    // The benches start the release `dataplane` binary; `cargo run` below builds only theirs.
    run(cmd("cargo").args(["build", "--release", "-p", "dataplane-user"]))?;
    let mut command = cmd("cargo");
    command.args(["run", "--release", "-p", "dataplane-benches"]);
    if !args.bench_args.is_empty() {
        command.arg("--").args(&args.bench_args);
    }
    run(&mut command)?;
    println!("report: target/bench/report.md (and report.json, report.svg)");
    Ok(())
}

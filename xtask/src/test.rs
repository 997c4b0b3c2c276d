//! `cargo xtask test`: lint, build, test and smoke-benchmark the whole workspace, then print a
//! summary. Every step runs even when an earlier one failed, so one run shows everything.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    setup::run_setup,
    util::{cmd, format_duration, require_root, run},
};

#[derive(clap::Args)]
pub struct Args {
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,

    /// Skip rustfmt and clippy.
    #[arg(long)]
    no_lint: bool,

    /// Extra arguments appended to `cargo test --workspace --no-fail-fast`, e.g. a test name
    /// filter, `-p dataplane-tests`, or `-- --test-threads=1`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<String>,
}

struct Outcome {
    name: &'static str,
    duration: Duration,
    passed: bool,
}

pub fn run_test(args: Args) -> Result<()> {
    require_root("test")?;
    let mut outcomes = Vec::new();

    if !args.skip_setup {
        let start = Instant::now();
        run_setup()?;
        outcomes.push(Outcome {
            name: "setup",
            duration: start.elapsed(),
            passed: true,
        });
    }

    let mut steps: Vec<(&'static str, Command)> = Vec::new();
    if !args.no_lint {
        steps.push(("fmt", cargo(&["fmt", "--all", "--", "--check"])));
        steps.push((
            "clippy",
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--exclude",
                "dataplane-ebpf",
                "--",
                "-D",
                "warnings",
            ]),
        ));
        steps.push((
            "clippy (ebpf)",
            cargo(&[
                "+nightly",
                "clippy",
                "-p",
                "dataplane-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
        ));
    }
    steps.push(("build", cargo(&["build", "--workspace", "--all-targets"])));
    let mut test = cargo(&["test", "--workspace", "--no-fail-fast"]);
    test.args(&args.cargo_test_args);
    steps.push(("test", test));
    // The coverage-guided fuzz targets, a bounded slice (`cargo xtask fuzz --time` for more).
    // Unoptimised: a fresh ASan build of dataplane-user and its dependencies took 6m38s of CPU
    // that way against 13m02s optimised (with codegen-units=1).
    steps.push((
        "fuzz",
        cargo(&[
            "xtask",
            "fuzz",
            "--dev",
            "--time",
            &crate::fuzz::CI_SECONDS.to_string(),
        ]),
    ));
    // The benches start the release `dataplane` binary, which `cargo run -p
    // dataplane-benches` does not build by itself.
    steps.push((
        "build (release)",
        cargo(&["build", "--release", "-p", "dataplane-user"]),
    ));
    steps.push((
        "bench smoke",
        cargo(&[
            "run",
            "--release",
            "-p",
            "dataplane-benches",
            "--",
            "--quick",
        ]),
    ));

    for (name, mut command) in steps {
        let start = Instant::now();
        let result = run(&mut command);
        if let Err(e) = &result {
            eprintln!("FAIL: {name}: {e:#}");
        }
        outcomes.push(Outcome {
            name,
            duration: start.elapsed(),
            passed: result.is_ok(),
        });
    }

    print_summary(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} steps failed: {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut command = cmd("cargo");
    command.args(args);
    command
}

fn print_summary(outcomes: &[Outcome]) {
    let total: Duration = outcomes.iter().map(|o| o.duration).sum();
    println!();
    println!("==> summary");
    println!("  {:<15} {:>8}  result", "step", "time");
    for o in outcomes {
        let result = if o.passed { "PASS" } else { "FAIL" };
        println!(
            "  {:<15} {:>8}  {result}",
            o.name,
            format_duration(o.duration)
        );
    }
    println!("  {:<15} {:>8}", "total", format_duration(total));
}

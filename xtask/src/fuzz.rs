//! `cargo xtask fuzz`: build the coverage-guided fuzz targets of `fuzz/` (libFuzzer, through
//! cargo-fuzz, with AddressSanitizer and debug assertions) and run each for a bounded time,
//! then print per target the executions run, their rate, the coverage reached and the crashes
//! found. A crash fails the command and names the reproducer.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{cmd, display, format_duration, run, which, workspace_root};

/// Every target in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: [&str; 4] = ["cni_stdin", "selector", "policy", "etcd_value"];

/// Seconds per target in `cargo xtask test`'s bounded slice.
pub const CI_SECONDS: u64 = 20;

#[derive(clap::Args)]
pub struct Args {
    /// Run only this target (repeatable); default: all of cni_stdin, selector, policy,
    /// etcd_value.
    #[arg(long = "target", value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,

    /// Seconds to run each target.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    time: u64,

    /// Run the targets already built (skip `cargo fuzz build`).
    #[arg(long)]
    no_build: bool,

    /// Build without optimisations (`cargo fuzz build --dev`): a fresh build takes about half
    /// the CPU time, each execution is several times slower. What `cargo xtask test` uses.
    #[arg(long)]
    dev: bool,
}

/// What one run of a target found, read from libFuzzer's output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    execs: u64,
    execs_per_sec: u64,
    /// Edges covered (`cov:`) and features (`ft:`) at the end.
    cov: u64,
    ft: u64,
    corpus: u64,
    /// Reproducers written by this run (crash-, leak-, timeout-, oom-; slow units are not
    /// failures).
    crashes: Vec<PathBuf>,
}

pub fn run_fuzz(args: Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        TARGETS
            .iter()
            .copied()
            .filter(|t| args.targets.iter().any(|a| a == t))
            .collect()
    };
    fuzz(&targets, args.time, !args.no_build, args.dev)
}

/// Builds (when `build`; unoptimised when `dev`) and runs `targets` for `secs` each; fails
/// when any crashed.
pub fn fuzz(targets: &[&str], secs: u64, build: bool, dev: bool) -> Result<()> {
    if which("cargo-fuzz").is_none() {
        bail!(
            "cargo-fuzz is not installed: run `cargo xtask setup` (or `cargo install --locked cargo-fuzz`)"
        );
    }
    let dir = workspace_root().join("fuzz");
    if build {
        let start = Instant::now();
        // cargo-fuzz builds one target or all of them.
        let mut command = cargo_fuzz();
        command.args(["build", "--debug-assertions"]);
        if dev {
            command.arg("--dev");
        }
        if let [one] = targets {
            command.arg(one);
        }
        run(&mut command).context("build the fuzz targets")?;
        println!("built in {}", format_duration(start.elapsed()));
    }
    let mut results = Vec::new();
    for target in targets {
        let stats = run_target(&dir, target, secs, dev)?;
        results.push((*target, stats));
    }
    println!();
    println!("==> fuzz summary ({secs} s per target)");
    println!(
        "  {:<11} {:>12} {:>9} {:>7} {:>7} {:>7}  crashes",
        "target", "executions", "exec/s", "cov", "ft", "corpus"
    );
    for (target, s) in &results {
        println!(
            "  {:<11} {:>12} {:>9} {:>7} {:>7} {:>7}  {}",
            target,
            s.execs,
            s.execs_per_sec,
            s.cov,
            s.ft,
            s.corpus,
            s.crashes.len()
        );
    }
    let crashed: Vec<String> = results
        .iter()
        .flat_map(|(t, s)| {
            s.crashes
                .iter()
                .map(move |c| format!("{t}: {}", c.display()))
        })
        .collect();
    if !crashed.is_empty() {
        bail!(
            "the fuzzers found {} crash(es); reproduce with `cargo +nightly fuzz run <target> <file>`:\n  {}",
            crashed.len(),
            crashed.join("\n  ")
        );
    }
    Ok(())
}

fn cargo_fuzz() -> std::process::Command {
    let mut c = cmd("cargo");
    c.args(["+nightly", "fuzz"]);
    c
}

/// Runs one target's binary for `secs` on its seeds and its growing corpus; its output goes to
/// `fuzz/logs/<target>.log` and is summed up from there.
fn run_target(dir: &Path, target: &str, secs: u64, dev: bool) -> Result<Stats> {
    let profile = if dev { "debug" } else { "release" };
    let binary = dir
        .join("target/x86_64-unknown-linux-gnu")
        .join(profile)
        .join(target);
    if !binary.is_file() {
        bail!(
            "{} is missing: build it with `cargo xtask fuzz` (without --no-build, with the same --dev)",
            binary.display()
        );
    }
    let corpus = dir.join("corpus-run").join(target);
    let seeds = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let before = reproducers(&artifacts)?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut command = cmd(&binary);
    command
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={secs}"))
        .arg(format!(
            "-dict={}",
            dir.join("dict").join(format!("{target}.dict")).display()
        ))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // One input taking longer than this is a hang worth a reproducer.
        .arg("-timeout=10")
        .arg("-max_len=16384")
        .arg("-print_final_stats=1")
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(log.try_clone().context("log file")?);
    println!("==> {} 2> {}", display(&command), log_path.display());
    let start = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("start {}", binary.display()))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let mut stats = parse_stats(&text);
    stats.crashes = reproducers(&artifacts)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    println!(
        "{target}: {} executions in {} ({}/s), cov {}, ft {}, corpus {}, crashes {}",
        stats.execs,
        format_duration(start.elapsed().max(Duration::from_millis(1))),
        stats.execs_per_sec,
        stats.cov,
        stats.ft,
        stats.corpus,
        stats.crashes.len()
    );
    if !status.success() {
        // libFuzzer's report: the panic message and the reproducer line.
        let report: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("panicked at")
                    || l.starts_with("==")
                    || l.contains("SUMMARY")
                    || l.contains("Test unit written")
                    || l.contains("ERROR")
            })
            .take(12)
            .collect();
        println!("{target}: exited with {status}\n  {}", report.join("\n  "));
        if stats.crashes.is_empty() {
            bail!(
                "{target} failed ({status}) without a reproducer: see {}",
                log_path.display()
            );
        }
    }
    Ok(stats)
}

/// The reproducers libFuzzer leaves under its artifact prefix.
fn reproducers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if ["crash-", "leak-", "timeout-", "oom-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The figures of libFuzzer's output: the final `stat::` lines, and the last status line
/// (`#123 … cov: 456 ft: 789 corp: 12/3Kb …`).
fn parse_stats(text: &str) -> Stats {
    let mut s = Stats::default();
    let field = |line: &str, name: &str| -> Option<u64> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.split('/').next()?.parse().ok()
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.execs = v.trim().parse().unwrap_or(s.execs);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            s.execs_per_sec = v.trim().parse().unwrap_or(s.execs_per_sec);
        } else if line.starts_with('#') {
            if let Some(n) = line
                .split_whitespace()
                .next()
                .and_then(|w| w[1..].parse().ok())
            {
                s.execs = s.execs.max(n);
            }
            s.cov = field(line, "cov:").unwrap_or(s.cov);
            s.ft = field(line, "ft:").unwrap_or(s.ft);
            s.corpus = field(line, "corp:").unwrap_or(s.corpus);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_summed_up() {
        let text = "INFO: Seed: 1\n\
            #2\tINITED cov: 120 ft: 130 corp: 9/2Kb exec/s: 0 rss: 40Mb\n\
            #1024\tpulse  cov: 300 ft: 410 corp: 40/9Kb lim: 400 exec/s: 512 rss: 60Mb\n\
            #5000\tNEW    cov: 310 ft: 420 corp: 41/9Kb lim: 400 exec/s: 500 rss: 61Mb L: 33/400 MS: 1 ChangeBit-\n\
            Done 6123 runs in 11 second(s)\n\
            stat::number_of_executed_units: 6123\n\
            stat::average_exec_per_sec:     556\n\
            stat::new_units_added:          32\n";
        assert_eq!(
            parse_stats(text),
            Stats {
                execs: 6123,
                execs_per_sec: 556,
                cov: 310,
                ft: 420,
                corpus: 41,
                crashes: vec![],
            }
        );
        assert_eq!(parse_stats(""), Stats::default());
    }
}

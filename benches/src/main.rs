//! `cargo xtask bench`: measurements of the dataplane on a cluster in a box. For now: how long
//! after a pod's veth appears the agent has its programs attached.

mod attach;

use clap::Parser;

/// Benchmarks of the dataplane; results go to stdout and to target/bench/*.json.
#[derive(Debug, Parser)]
struct Args {
    /// A reduced run for CI smoke checks (fewer samples; checks that figures are produced,
    /// not their values).
    #[arg(long)]
    quick: bool,
    /// Interfaces to create for the attach-latency bench (default 50, or 10 with --quick).
    #[arg(long)]
    interfaces: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dataplane_tests::require_root();
    let n = args.interfaces.unwrap_or(if args.quick { 10 } else { 50 });
    let report = attach::run(n)?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("attach-latency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

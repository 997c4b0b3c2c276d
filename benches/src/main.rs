//! `cargo xtask bench`: measurements of the dataplane on a cluster in a box: how long after a
//! pod's veth appears the agent has its programs attached, CNI ADD/DEL latency next to the
//! reference plugins, sync and policy costs, and the datapath compared with iptables and bare
//! routing (target/bench/report.{md,json,svg}).

mod attach;
mod cni;
mod ctlplane;
mod datapath;
mod load;
mod mapdump;
mod policy;
mod report;
mod sync;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    Attach,
    Cni,
    Sync,
    Datapath,
    Policy,
    /// `map-dump conntrack` of a big table.
    MapDump,
    /// The agent's control-plane costs in process: map writes one by one against batched,
    /// endpoint events with the rule cache against from scratch.
    ControlPlane,
}

/// Benchmarks of the dataplane; results go to stdout and to target/bench/*.json.
#[derive(Debug, Parser)]
#[command(after_help = "Examples:
  dataplane-benches --quick
  dataplane-benches --only datapath --datapath-rounds 2 --datapath-rules 0,1000
  dataplane-benches --only datapath --quick --datapath-rules 0,10000 --datapath-endpoints 1000
  dataplane-benches --only datapath --datapath-rounds 3 --datapath-rules 0,10000 \\
    --datapath-configs bare,iptables,iptables-legacy,ipset,bpf --datapath-endpoints 0
  dataplane-benches --only control-plane")]
struct Args {
    /// A reduced run for CI smoke checks (fewer samples; checks that figures are produced,
    /// not their values).
    #[arg(long)]
    quick: bool,
    /// Which benches to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Interfaces to create for the attach-latency bench (default 50, or 10 with --quick).
    #[arg(long)]
    interfaces: Option<usize>,
    /// Pods per round for the CNI bench (default 100, or 20 with --quick).
    #[arg(long)]
    pods: Option<usize>,
    /// Rounds of the CNI bench, plugins interleaved in each (default 3, or 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Rounds of the datapath comparison (default 5, or 1 with --quick).
    #[arg(long)]
    datapath_rounds: Option<usize>,
    /// Rule counts of the datapath comparison for every configuration (default
    /// 0,100,1000,10000 plus 100000 for bpf only; 0,1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    datapath_rules: Option<Vec<usize>>,
    /// Conntrack entries the map-dump bench fills and dumps (default 1,000,000, or 50,000
    /// with --quick).
    #[arg(long)]
    ct_entries: Option<u32>,
    /// WorkloadEndpoints written for the datapath bench's memory figures, taken under the
    /// largest rule count of --datapath-rules (default 1000, or 20 with --quick).
    #[arg(long)]
    datapath_endpoints: Option<usize>,
    /// Configurations of the datapath comparison (default: all of bare, bare-vxlan,
    /// iptables, iptables-legacy, ipset, bpf, bpf-ipip).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(datapath::CONFIGS))]
    datapath_configs: Option<Vec<String>>,
}

fn write_report(name: &str, report: &impl serde::Serialize) -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dataplane_tests::require_root();
    let wants = |b| args.only.is_empty() || args.only.contains(&b);
    if wants(Bench::Attach) {
        let n = args.interfaces.unwrap_or(if args.quick { 10 } else { 50 });
        write_report("attach-latency", &attach::run(n)?)?;
    }
    if wants(Bench::Cni) {
        let pods = args.pods.unwrap_or(if args.quick { 20 } else { 100 });
        let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
        write_report("cni-latency", &cni::run(pods, 20, rounds)?)?;
    }
    if wants(Bench::Sync) {
        let changes = if args.quick { 10 } else { 50 };
        write_report("sync-latency", &sync::run(changes)?)?;
    }
    if wants(Bench::Policy) {
        write_report("policy", &policy::run(args.quick)?)?;
    }
    if wants(Bench::ControlPlane) {
        write_report("control-plane", &ctlplane::run(args.quick)?)?;
    }
    if wants(Bench::MapDump) {
        let n = args
            .ct_entries
            .unwrap_or(if args.quick { 50_000 } else { 1_000_000 });
        write_report("map-dump", &mapdump::run(n)?)?;
    }
    // Last: its report quotes the other benches' figures from their JSON.
    if wants(Bench::Datapath) {
        let mut plan = datapath::Plan::new(args.quick);
        if let Some(r) = args.datapath_rounds {
            plan.rounds = r;
        }
        if let Some(e) = args.datapath_endpoints {
            plan.endpoints = e;
        }
        if let Some(c) = &args.datapath_configs {
            plan.configs.clone_from(c);
        }
        if let Some(r) = &args.datapath_rules {
            plan.bpf_only_rules.retain(|n| !r.contains(n));
            plan.rules.clone_from(r);
        }
        let samples = datapath::run(&plan)?;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        let r = report::build(&plan, &samples, &dir);
        report::write(&dir, &r)?;
        report::check_complete(&plan, &r)?;
    }
    Ok(())
}

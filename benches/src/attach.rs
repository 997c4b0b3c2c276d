//! Attach latency: a `cali*` veth is created in a node running the agent; the time until both
//! its TC hooks have the agent's programs (seen through BPF_PROG_QUERY) is one sample.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aya::programs::{SchedClassifier, TcAttachType};
use dataplane_tests::{Agent, Cluster, PinDirGuard, wait_attached};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub interfaces: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub samples_us: Vec<u64>,
}

fn attached(iface: &str) -> bool {
    let count = |t| SchedClassifier::query_tcx(iface, t).map_or(0, |(_, p)| p.len());
    count(TcAttachType::Ingress) == 1 && count(TcAttachType::Egress) == 1
}

/// The `q` quantile of sorted samples (nearest rank).
fn quantile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn run(n: usize) -> anyhow::Result<Report> {
    println!("attach latency: one node, agent running, {n} cali* veths created one by one");
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(node, &pins, None, &[]);
    wait_attached(&node.ns, "eth0", &mut agent, Duration::from_secs(20));

    let names: Vec<String> = (0..n).map(|_| node.next_workload_iface()).collect();
    let samples = node.ns.run(|| -> anyhow::Result<Vec<u64>> {
        // The netlink socket is made on this thread, so inside the node's namespace.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let mut samples = Vec::with_capacity(n);
            for (i, name) in names.iter().enumerate() {
                let peer = format!("bp{i}");
                let start = Instant::now();
                handle
                    .link()
                    .add(rtnetlink::LinkVeth::new(name, &peer).build())
                    .execute()
                    .await
                    .with_context(|| format!("create veth {name}"))?;
                let deadline = start + Duration::from_secs(10);
                while !attached(name) {
                    if Instant::now() > deadline {
                        bail!("{name} not attached after 10 s");
                    }
                    std::hint::spin_loop();
                }
                samples.push(start.elapsed().as_micros() as u64);
                print!("\r  {}/{n}", i + 1);
                use std::io::Write as _;
                std::io::stdout().flush()?;
            }
            println!();
            Ok(samples)
        })
    })?;
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    let report = Report {
        bench: "attach-latency",
        interfaces: n,
        p50_us: quantile(&sorted, 0.50),
        p99_us: quantile(&sorted, 0.99),
        max_us: *sorted.last().unwrap_or(&0),
        samples_us: samples,
    };
    println!(
        "  interface appears → programs attached: p50 {} µs, p99 {} µs, max {} µs over {n}",
        report.p50_us, report.p99_us, report.max_us
    );
    if agent.process.exited().is_some() {
        bail!("the agent died during the bench:\n{}", agent.log_text());
    }
    Ok(report)
}

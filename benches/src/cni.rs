//! CNI ADD and DEL latency: our plugin (with our IPAM in a real etcd) next to the reference
//! `ptp` + `host-local` plugins, each exec'd the way a runtime does, sequentially and N-way
//! concurrent, the two plugins interleaved round by round on the same node.

use std::time::{Duration, Instant};

use anyhow::bail;
use dataplane_tests::{
    Cluster,
    cni::{Call, PluginDir, Sandbox, exec_plugin},
};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Serialize)]
pub struct Series {
    pub plugin: String,
    pub mode: String,
    pub command: String,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub pods: usize,
    pub concurrency: usize,
    pub series: Vec<Series>,
}

fn quantile_ms(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1e3
}

struct Plugin {
    name: &'static str,
    conf: Value,
}

/// Runs `command` for every sandbox, `parallel` at a time, and returns each call's latency.
fn timed(
    node: &dataplane_tests::Node,
    plugins: &PluginDir,
    plugin: &Plugin,
    command: &str,
    sandboxes: &[Sandbox],
    parallel: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(sandboxes.len());
    for chunk in sandboxes.chunks(parallel) {
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|sb| {
                    s.spawn(move || {
                        let t = Instant::now();
                        let call = Call::new(plugin.conf["type"].as_str().unwrap_or(""), command);
                        let r = exec_plugin(node, plugins, sb, &plugin.conf, call);
                        (t.elapsed(), r)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join()).collect()
        });
        for r in results {
            let Ok((elapsed, output)) = r else {
                bail!("a {command} thread panicked");
            };
            if !output.success {
                bail!("{} {command} failed: {}", plugin.name, output.stdout);
            }
            out.push(elapsed);
        }
    }
    Ok(out)
}

pub fn run(pods: usize, concurrency: usize, rounds: usize) -> anyhow::Result<Report> {
    println!(
        "CNI latency: {pods} pods per round, sequential and {concurrency}-way, {rounds} rounds, dataplane vs ptp+host-local"
    );
    let cluster = Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let etcd = cluster
        .etcd
        .as_ref()
        .map(|e| e.endpoint())
        .unwrap_or_default();
    let plugins = PluginDir::new();
    let hl_dir = tempfile::tempdir()?;
    let candidates = [
        Plugin {
            name: "dataplane",
            conf: json!({
                "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "dataplane",
                "etcd_endpoints": etcd, "nodename": node.name, "mtu": 1480,
                "ipam": { "type": "dataplane-ipam" },
            }),
        },
        Plugin {
            name: "ptp+host-local",
            conf: json!({
                "cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "mtu": 1480,
                "ipam": { "type": "host-local", "subnet": "10.77.0.0/16", "dataDir": hl_dir.path() },
            }),
        },
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); candidates.len() * 4];
    for round in 0..rounds {
        for (mode_i, parallel) in [1, concurrency].into_iter().enumerate() {
            for (pi, plugin) in candidates.iter().enumerate() {
                let sandboxes: Vec<Sandbox> = (0..pods)
                    .map(|i| Sandbox::new(node, "bench", &format!("r{round}-{mode_i}-{i}")))
                    .collect();
                let adds = timed(node, &plugins, plugin, "ADD", &sandboxes, parallel)?;
                let dels = timed(node, &plugins, plugin, "DEL", &sandboxes, parallel)?;
                samples[pi * 4 + mode_i * 2].extend(adds);
                samples[pi * 4 + mode_i * 2 + 1].extend(dels);
                print!("\r  round {}/{rounds}", round + 1);
                use std::io::Write as _;
                std::io::stdout().flush()?;
            }
        }
    }
    println!();
    let mut series = Vec::new();
    for (pi, plugin) in candidates.iter().enumerate() {
        for (mode_i, mode) in ["sequential", "concurrent"].iter().enumerate() {
            for (ci, command) in ["ADD", "DEL"].iter().enumerate() {
                let s = &mut samples[pi * 4 + mode_i * 2 + ci];
                let p50 = quantile_ms(s, 0.5);
                let p99 = quantile_ms(s, 0.99);
                println!(
                    "  {:<15} {:<10} {command:<3}  p50 {p50:7.2} ms  p99 {p99:7.2} ms  ({} calls)",
                    plugin.name,
                    mode,
                    s.len()
                );
                series.push(Series {
                    plugin: plugin.name.to_owned(),
                    mode: (*mode).to_owned(),
                    command: (*command).to_owned(),
                    samples: s.len(),
                    p50_ms: p50,
                    p99_ms: p99,
                });
            }
        }
    }
    Ok(Report {
        bench: "cni-latency",
        pods,
        concurrency,
        series,
    })
}

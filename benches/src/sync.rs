//! Datastore → maps latency: an IP pool is written to etcd (then deleted), and the time until
//! its route appears in (disappears from) the routes map of each of three nodes is a sample.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dataplane::datastore::{Datastore, EtcdConfig, IpPool, IpPoolSpec, keys};
use dataplane_tests::traffic::Deployment;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub changes: usize,
    pub nodes: usize,
    pub appear_p50_us: u64,
    pub appear_p99_us: u64,
    pub disappear_p50_us: u64,
    pub disappear_p99_us: u64,
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Waits until `present(node)` holds on every node; returns each node's latency from `t0`.
fn wait_all(
    d: &Deployment,
    t0: Instant,
    prefix: (u32, [u8; 4]),
    want: bool,
) -> anyhow::Result<Vec<u64>> {
    let mut out = vec![None; d.pins.len()];
    let deadline = t0 + Duration::from_secs(10);
    while out.iter().any(Option::is_none) {
        for (i, pins) in d.pins.iter().enumerate() {
            if out[i].is_none() {
                let routes = dataplane::maps::read_routes(&pins.path)?;
                if routes.contains_key(&prefix) == want {
                    out[i] = Some(t0.elapsed().as_micros() as u64);
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "route {prefix:?} not {} on every node after 10 s",
                if want { "added" } else { "removed" }
            );
        }
    }
    Ok(out.into_iter().flatten().collect())
}

pub fn run(changes: usize) -> anyhow::Result<Report> {
    println!("etcd → maps: {changes} pool writes and deletes, route seen on 3 nodes");
    let d = Deployment::start("Always", 0);
    let endpoint = d
        .cluster
        .etcd
        .as_ref()
        .map(|e| e.endpoint())
        .unwrap_or_default();
    let (appear, disappear) =
        d.cluster.nodes[0]
            .ns
            .run(|| -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
                let rt = dataplane::datastore::runtime()?;
                rt.block_on(async {
                    let ds = Datastore::connect(&EtcdConfig {
                        endpoints: vec![endpoint],
                        ..EtcdConfig::default()
                    })
                    .await?;
                    let (mut appear, mut disappear) = (Vec::new(), Vec::new());
                    for i in 0..changes {
                        let cidr: ipnet::Ipv4Net =
                            format!("10.{}.0.0/16", 100 + i % 100).parse()?;
                        let name = format!("bench-{i}");
                        let key = keys::ip_pool(&name);
                        let prefix = (16, cidr.network().octets());
                        let t0 = Instant::now();
                        ds.put(&key, &IpPool::new(&name, IpPoolSpec::new(cidr, 26)))
                            .await
                            .context("write the pool")?;
                        appear.extend(wait_all(&d, t0, prefix, true)?);
                        let t0 = Instant::now();
                        ds.delete(&key, None).await.context("delete the pool")?;
                        disappear.extend(wait_all(&d, t0, prefix, false)?);
                        print!("\r  {}/{changes}", i + 1);
                        use std::io::Write as _;
                        std::io::stdout().flush()?;
                    }
                    println!();
                    Ok((appear, disappear))
                })
            })?;
    let (mut a, mut r) = (appear, disappear);
    a.sort_unstable();
    r.sort_unstable();
    let report = Report {
        bench: "sync-latency",
        changes,
        nodes: d.pins.len(),
        appear_p50_us: quantile(&a, 0.5),
        appear_p99_us: quantile(&a, 0.99),
        disappear_p50_us: quantile(&r, 0.5),
        disappear_p99_us: quantile(&r, 0.99),
    };
    println!(
        "  etcd write → route in every node's map: p50 {} µs, p99 {} µs; delete → gone: p50 {} µs, p99 {} µs ({} samples each)",
        report.appear_p50_us,
        report.appear_p99_us,
        report.disappear_p50_us,
        report.disappear_p99_us,
        a.len()
    );
    Ok(report)
}

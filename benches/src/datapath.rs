//! Pod-to-pod datapath, first cut: TCP request/response rate (1-byte ping-pong on one
//! connection, like netperf TCP_RR) and TCP stream throughput (iperf3), same node and cross
//! node, for the BPF dataplane (IP-in-IP Always, and native) and for bare kernel routing with
//! no dataplane. Configurations are interleaved round by round; client and server run on CPU
//! 0 (DESIGN.md: a wake-up across the two vCPUs costs ~300 µs here).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dataplane_tests::traffic::{Deployment, Pod};
use serde::Serialize;

const RR_PORT: u16 = 7100;
const SECONDS: u64 = 1;

fn pin_to_cpu0() {
    // SAFETY: sched_setaffinity on the calling thread (pid 0) with a set built here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Requests/s of a 1-byte ping-pong from `client` to `server` for `SECONDS`.
fn rr_rate(client: &Pod, server: &Pod) -> anyhow::Result<f64> {
    let listener = server
        .sb
        .ns
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, RR_PORT)))?;
    std::thread::scope(|s| {
        let srv = s.spawn(move || -> std::io::Result<()> {
            pin_to_cpu0();
            let (mut c, _) = listener.accept()?;
            c.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() {
                c.write_all(&b)?;
            }
            Ok(())
        });
        let rate = client.sb.ns.run(|| -> anyhow::Result<f64> {
            pin_to_cpu0();
            let mut c =
                TcpStream::connect_timeout(&(server.ip, RR_PORT).into(), Duration::from_secs(2))?;
            c.set_nodelay(true)?;
            let mut b = [1u8; 1];
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(SECONDS) {
                c.write_all(&b)?;
                c.read_exact(&mut b)?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        });
        let _served = srv.join();
        rate
    })
}

/// Gbit/s of an iperf3 TCP stream from `client` to `server`, both on CPU 0.
fn stream_gbps(client: &Pod, server: &Pod) -> anyhow::Result<f64> {
    let mut srv = dataplane_tests::ChildGuard::new(
        server
            .sb
            .ns
            .command("taskset")
            .args(["-c", "0", "iperf3", "-s", "-1", "-p", "5202"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
        "iperf3 -s",
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = client
        .sb
        .ns
        .command("taskset")
        .args([
            "-c",
            "0",
            "iperf3",
            "-c",
            &server.ip.to_string(),
            "-p",
            "5202",
            "-t",
            &SECONDS.to_string(),
            "-J",
        ])
        .output()?;
    srv.stop(Duration::from_secs(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    if bps == 0.0 {
        bail!(
            "iperf3 measured nothing: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(bps / 1e9)
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub config: String,
    pub path: String,
    pub rr_per_s_median: f64,
    pub gbps_median: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub rounds: usize,
    pub rows: Vec<Row>,
    /// Median over rounds of the per-round ratio bpf/bare (same node, RR).
    pub same_node_rr_bpf_over_bare: f64,
    /// Median over rounds of the per-round ratio bpf IP-in-IP / bpf native (cross node, RR).
    pub cross_node_rr_ipip_over_native: f64,
    pub cross_node_gbps_ipip_over_native: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(rounds: usize) -> anyhow::Result<Report> {
    println!(
        "datapath: TCP RR and stream, same node and cross node (same subnet), {rounds} rounds, configurations interleaved"
    );
    let configs = [
        ("bare", Deployment::bare(2)),
        ("bpf-native", Deployment::start("Never", 2)),
        ("bpf-ipip", Deployment::start("Always", 2)),
    ];
    // (config, path) → samples
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); configs.len() * 2];
    let mut gb: Vec<Vec<f64>> = vec![Vec::new(); configs.len() * 2];
    for round in 0..rounds {
        for (ci, (_, d)) in configs.iter().enumerate() {
            // pods 0 and 1 are on node-1, pod 2 on node-2 (same subnet).
            for (pi, (a, b)) in [(&d.pods[0], &d.pods[1]), (&d.pods[0], &d.pods[2])]
                .into_iter()
                .enumerate()
            {
                rr[ci * 2 + pi].push(rr_rate(a, b)?);
                gb[ci * 2 + pi].push(stream_gbps(a, b)?);
            }
        }
        print!("\r  round {}/{rounds}", round + 1);
        std::io::stdout().flush()?;
    }
    println!();
    let paths = ["same node", "cross node"];
    let mut rows = Vec::new();
    for (ci, (name, _)) in configs.iter().enumerate() {
        for (pi, path) in paths.iter().enumerate() {
            let row = Row {
                config: (*name).to_owned(),
                path: (*path).to_owned(),
                rr_per_s_median: median(rr[ci * 2 + pi].clone()),
                gbps_median: median(gb[ci * 2 + pi].clone()),
            };
            println!(
                "  {:<11} {:<10}  RR {:>9.0}/s   stream {:>6.2} Gbit/s",
                row.config, row.path, row.rr_per_s_median, row.gbps_median
            );
            rows.push(row);
        }
    }
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let report = Report {
        bench: "datapath",
        rounds,
        same_node_rr_bpf_over_bare: ratio(&rr[2], &rr[0]),
        cross_node_rr_ipip_over_native: ratio(&rr[5], &rr[3]),
        cross_node_gbps_ipip_over_native: ratio(&gb[5], &gb[3]),
        rows,
    };
    println!(
        "  ratios (median of per-round): same-node RR bpf/bare {:.2}; cross-node RR ipip/native {:.2}; cross-node stream ipip/native {:.2}",
        report.same_node_rr_bpf_over_bare,
        report.cross_node_rr_ipip_over_native,
        report.cross_node_gbps_ipip_over_native
    );
    Ok(report)
}

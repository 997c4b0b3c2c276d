//! Pod-to-pod datapath, BPF against iptables against bare kernel routing (issue 6), measured in
//! one run: request/response rate and latency (TCP_RR-like, 1-byte ping-pong on a few
//! connections), new connections per second (TCP_CRR-like), TCP stream (iperf3), and CPU time
//! per operation, same node and cross node, each with N policy rules on the destination that
//! do not match the client plus the one that allows it (last).
//!
//! Configurations, each its own cluster in a box (3 nodes, 2 pods each):
//! - `bare`: kernel routing, no agents, no policy (it takes no rules; measured in every rule
//!   block as the baseline of that block's rounds);
//! - `iptables`: agents `--dataplane iptables` (nft backend), pool ipipMode Never;
//! - `iptables-legacy`: the same with `--iptables-backend legacy` (x_tables);
//! - `ipset`: the iptables mode (nft) where the N non-matching rules are folded into one:
//!   a rule whose source is the N peers' addresses, which the iptables rendering turns into
//!   one `hash:net` ipset (`-m set --match-set … src`), then the allow of the client. What a
//!   hand-tuned iptables policy with one ipset costs; the other configurations get N rules;
//! - `bpf`: agents in BPF mode, pool ipipMode Never (like for like with iptables);
//! - `bpf-ipip`: BPF mode with IP-in-IP Always, cross node only (the kernel has no ipip module,
//!   so iptables cannot encapsulate; labelled, not compared with iptables);
//! - `bare-vxlan`: kernel routing through the kernel's own VXLAN between the nodes, cross node
//!   only, no agents and no rules: the kernel's encapsulation `bpf-ipip` is compared against.
//!
//! For each rule count (ascending) the policy is applied to every configuration that takes it
//! (`ctl apply --wait`, timed: the control-plane figure), then `rounds` rounds run the
//! configurations interleaved (A B C D A B C D …); ratios are the median of per-round ratios.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, bail};
use dataplane_tests::traffic::{Deployment, Pod};
use serde::Serialize;

use crate::load::{self, CRR_PORT, RR_PORT, STREAM_PORT};

/// The run's shape.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    /// Rule counts for every configuration that takes policy.
    pub rules: Vec<usize>,
    /// Further rule counts for the BPF configurations only.
    pub bpf_only_rules: Vec<usize>,
    pub rr_connections: usize,
    pub rr_ms: u64,
    pub crr_ms: u64,
    pub stream_s: u64,
    /// WorkloadEndpoints written for the memory figures.
    pub endpoints: usize,
    /// The configurations to run (all of [`CONFIGS`] unless told otherwise).
    pub configs: Vec<String>,
}

/// Every configuration, in the order they run in a round.
pub const CONFIGS: [&str; 7] = [
    "bare",
    "bare-vxlan",
    "iptables",
    "iptables-legacy",
    "ipset",
    "bpf",
    "bpf-ipip",
];

impl Plan {
    pub fn runs(&self, config: &str) -> bool {
        self.configs.iter().any(|c| c == config)
    }
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                rules: vec![0, 1_000],
                bpf_only_rules: vec![],
                rr_connections: 4,
                rr_ms: 400,
                crr_ms: 400,
                stream_s: 1,
                endpoints: 20,
                configs: CONFIGS.map(str::to_owned).to_vec(),
            }
        } else {
            Self {
                quick,
                rounds: 5,
                rules: vec![0, 100, 1_000, 10_000],
                bpf_only_rules: vec![100_000],
                rr_connections: 4,
                rr_ms: 1_000,
                crr_ms: 1_000,
                stream_s: 1,
                endpoints: 1_000,
                configs: CONFIGS.map(str::to_owned).to_vec(),
            }
        }
    }
}

/// A sample key: (config, path, metric, rules).
pub type Key = (String, String, String, usize);

/// What the run measured: every per-round sample, and the control-plane figures.
#[derive(Debug, Default)]
pub struct Samples {
    /// key → one value per round (in round order; `None` where that round failed).
    pub data: BTreeMap<Key, Vec<Option<f64>>>,
    /// (config, rules) → figures of programming them.
    pub control: BTreeMap<(String, usize), Control>,
    /// Agent and map memory with many endpoints, per configuration.
    pub endpoints: Vec<EndpointsMemory>,
    pub errors: Vec<String>,
}

/// One node's agent with `endpoints` WorkloadEndpoints (written straight to etcd, no real
/// pods or interfaces) under `rules` rules selecting them all.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointsMemory {
    pub config: String,
    pub node: String,
    pub endpoints: usize,
    pub rules: usize,
    pub agent_rss_kib_before: Option<u64>,
    pub agent_rss_kib_after: Option<u64>,
    /// Memlock of that node's pinned BPF maps (BPF configurations), before and after.
    pub bpf_map_memlock_bytes_before: Option<u64>,
    pub bpf_map_memlock_bytes_after: Option<u64>,
    /// etcd writes of the endpoints, then a marker policy applied with `--wait`: its wall time
    /// (the agents process events in order, so the marker in force means the endpoints are).
    pub write_ms: f64,
    pub settle_ms: f64,
    /// Whether the marker was in force within the cap (300 s BPF, 120 s iptables); when not,
    /// `settle_ms` is the time it had reached, `note` what `ctl apply --wait` said, and the
    /// memory figures are those at that moment (the agent still busy).
    pub settled: bool,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Control {
    /// Wall time of `ctl apply --wait` (parse, etcd write, until every agent reports it in
    /// force).
    pub apply_wall_ms: f64,
    /// `ctl apply --wait`'s own `in force on N nodes (X ms)` figure: etcd write → in force.
    pub in_force_ms: Option<f64>,
    /// Largest agent RSS after the policy is in force, KiB.
    pub agent_rss_kib_max: Option<u64>,
    /// BPF map memory (memlock) of node 1's pinned maps, bytes (BPF configurations).
    pub bpf_map_memlock_bytes: Option<u64>,
}

const PATHS: [&str; 2] = ["same-node", "cross-node"];

struct Config {
    name: &'static str,
    d: Deployment,
    takes_rules: bool,
    bpf: bool,
    same_node: bool,
    /// The N non-matching peers as one rule's address list (one ipset in iptables).
    one_set: bool,
    /// Measured with many endpoints at the end (bpf and iptables-nft).
    memory: bool,
}

/// A non-pod address for rule `i` (198.18.0.0/15, the benchmarking range).
fn rule_peer(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xc612_0000u32 + i as u32 + 1)
}

const RULES_PER_POLICY: usize = 10_000;

/// How many NetworkPolicies (`bench-rules-0`…) [`policy_manifests`] writes for `n` rules.
fn policies(n: usize) -> usize {
    n.div_ceil(RULES_PER_POLICY).max(1)
}

/// The allow of `client` on the bench ports.
fn allow_client(client: std::net::Ipv4Addr) -> serde_json::Value {
    serde_json::json!({"action": "Allow", "protocol": "TCP",
        "source": {"nets": [format!("{client}/32")]},
        "destination": {"ports": [RR_PORT, CRR_PORT, STREAM_PORT]}})
}

/// The `ipset` configuration's policy: one rule whose source is the `n` non-matching peers
/// (one `hash:net` ipset in the iptables rendering), then the allow of `client`; one
/// NetworkPolicy, named as [`policy_manifests`]' first.
fn one_set_manifest(n: usize, client: std::net::Ipv4Addr) -> String {
    let mut ingress = Vec::new();
    if n > 0 {
        let nets: Vec<String> = (0..n).map(|i| format!("{}/32", rule_peer(i))).collect();
        ingress.push(serde_json::json!({"action": "Allow", "protocol": "TCP",
            "source": {"nets": nets}, "destination": {"ports": [10_000]}}));
    }
    ingress.push(allow_client(client));
    let doc = serde_json::json!({
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": "bench-rules-0", "namespace": "default"},
        "spec": {"selector": "all()", "types": ["Ingress"], "order": 100, "ingress": ingress}
    });
    format!("{doc}\n")
}

/// `n` non-matching rules then the allow of `client` on the bench ports, as JSON manifests:
/// one NetworkPolicy per 10,000 rules (etcd's value limit is 1.5 MiB; each selects every pod,
/// and the allow comes in the last).
fn policy_manifests(n: usize, client: std::net::Ipv4Addr) -> String {
    let per = RULES_PER_POLICY;
    let parts = policies(n);
    let mut out = String::new();
    for p in 0..parts {
        let mut ingress: Vec<serde_json::Value> = (p * per..((p + 1) * per).min(n))
            .map(|i| {
                serde_json::json!({"action": "Allow", "protocol": "TCP",
                    "source": {"nets": [format!("{}/32", rule_peer(i))]},
                    "destination": {"ports": [10_000 + (i % 50_000) as u16]}})
            })
            .collect();
        if p == parts - 1 {
            ingress.push(allow_client(client));
        }
        let doc = serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": format!("bench-rules-{p}"), "namespace": "default"},
            "spec": {"selector": "all()", "types": ["Ingress"], "order": 100 + p, "ingress": ingress}
        });
        out.push_str(&doc.to_string());
        out.push('\n');
    }
    out
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Sum of `bytes_memlock` of the maps pinned under `dir` (bpftool -f lists pinned paths).
fn pinned_memlock(dir: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "-f", "map", "show"])
        .output()
        .ok()?;
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    let dir = dir.display().to_string();
    let sum = maps
        .iter()
        .filter(|m| {
            m["pinned"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with(&dir)))
            })
        })
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum();
    Some(sum)
}

/// Applies `n` rules to `c` and times it.
fn program(c: &Config, n: usize) -> anyhow::Result<Control> {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("rules.json");
    let client = c.d.pods[0].ip;
    let manifests = if c.one_set {
        one_set_manifest(n, client)
    } else {
        policy_manifests(n, client)
    };
    std::fs::write(&f, manifests)?;
    let t0 = std::time::Instant::now();
    let (st, out, err) = c.d.ctl(&[
        "apply",
        "--wait",
        "--wait-timeout",
        "300",
        "-f",
        &f.display().to_string(),
    ]);
    let apply_wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !st.success() {
        bail!("{}: ctl apply of {n} rules: {out}{err}", c.name);
    }
    let in_force_ms = out
        .lines()
        .find_map(|l| l.split_once("in force on ").map(|(_, r)| r.to_owned()))
        .and_then(|r| {
            r.split_once('(')
                .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        });
    let agent_rss_kib_max =
        c.d.agents
            .iter()
            .filter_map(|a| rss_kib(a.process.pid()))
            .max();
    let bpf_map_memlock_bytes = if c.bpf {
        c.d.pins.first().and_then(|p| pinned_memlock(&p.path))
    } else {
        None
    };
    Ok(Control {
        apply_wall_ms,
        in_force_ms,
        agent_rss_kib_max,
        bpf_map_memlock_bytes,
    })
}

/// From `from` rules in force on `c` to `to`: the policies beyond `to`'s deleted, then `to`'s
/// applied with `--wait` (the agents take events in order: in force means the deletes are too).
fn reprogram(c: &Config, from: usize, to: usize) -> anyhow::Result<()> {
    for p in policies(to)..policies(from) {
        let name = format!("bench-rules-{p}");
        let (st, out, err) = c.d.ctl(&["delete", "netpol", &name, "-n", "default"]);
        if !st.success() {
            bail!("{}: ctl delete netpol {name}: {out}{err}", c.name);
        }
    }
    let ctl = program(c, to)?;
    eprintln!(
        "           {} ms wall, in force {} ms",
        ctl.apply_wall_ms as u64,
        ctl.in_force_ms.map_or("?".into(), |v| format!("{v:.0}"))
    );
    Ok(())
}

/// Restarts node 3's agent (BPF: it takes over its pinned maps) and waits until `rules`
/// rules are in force on it again (applied once more with `--wait`).
fn restart_agent_3(c: &mut Config, rules: usize) -> anyhow::Result<()> {
    anyhow::ensure!(c.d.agents.len() == 3, "{}: no agent on node 3", c.name);
    drop(c.d.agents.remove(2)); // stopped (and reaped) before the new one starts
    let node = &c.d.cluster.nodes[2];
    let mut agent =
        dataplane_tests::Agent::start(node, &c.d.pins[2], c.d.cluster.etcd.as_ref(), &[]);
    dataplane_tests::wait_attached(&node.ns, "eth0", &mut agent, Duration::from_secs(30));
    c.d.agents.push(agent);
    program(c, rules)?;
    Ok(())
}

/// Writes `count` WorkloadEndpoints for node 3 (no traffic runs there) into etcd, waits until
/// its agent has taken them (a marker policy applied with `--wait` after them), and reads the
/// agent's RSS and its maps' memlock.
fn endpoints_memory(c: &Config, count: usize, rules: usize) -> anyhow::Result<EndpointsMemory> {
    use dataplane::datastore::{Datastore, EtcdConfig, WorkloadEndpoint, WorkloadEndpointArgs};
    let node = &c.d.cluster.nodes[2];
    let agent_pid =
        c.d.agents
            .get(2)
            .map(|a| a.process.pid())
            .context("no agent on node 3")?;
    let memlock = || {
        c.bpf
            .then(|| c.d.pins.get(2).and_then(|p| pinned_memlock(&p.path)))
            .flatten()
    };
    let (rss0, mem0) = (rss_kib(agent_pid), memlock());
    let etcd =
        c.d.cluster
            .etcd
            .as_ref()
            .map(|e| e.endpoint())
            .context("no etcd")?;
    let weps: Vec<WorkloadEndpoint> = (0..count)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a41_c800u32 + i as u32); // 10.65.200.0 + i
            WorkloadEndpoint::new(WorkloadEndpointArgs {
                namespace: "default".into(),
                node: node.name.clone(),
                pod: format!("bench-mem-{i}"),
                endpoint: "eth0".into(),
                container_id: format!("benchmem{i:08}"),
                interface_name: format!("calibm{i:09}"),
                mac: "ee:ee:ee:ee:ee:ee".into(),
                ip_networks: vec![format!("{ip}/32")],
                profiles: vec!["kns.default".into()],
                labels: [(
                    "projectcalico.org/namespace".to_owned(),
                    "default".to_owned(),
                )]
                .into_iter()
                .collect(),
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let put = || -> anyhow::Result<()> {
        node.ns.run(|| -> anyhow::Result<()> {
            let rt = dataplane::datastore::runtime()?;
            rt.block_on(async {
                let ds = Datastore::connect(&EtcdConfig {
                    endpoints: vec![etcd.clone()],
                    ..EtcdConfig::default()
                })
                .await?;
                for w in &weps {
                    ds.put_workload_endpoint(w).await?;
                }
                anyhow::Ok(())
            })
        })
    };
    put().context("write the endpoints")?;
    let write_ms = t0.elapsed().as_secs_f64() * 1e3;
    let marker = |version: usize| -> anyhow::Result<(f64, Option<String>)> {
        // iptables takes minutes for 1,000 endpoints under 10,000 rules: give up after 2.
        let timeout = if c.bpf { "300" } else { "120" };
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("marker.json");
        std::fs::write(
            &f,
            serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                "metadata": {"name": "bench-marker", "namespace": "default"},
                "spec": {"selector": format!("bench-marker == '{version}'"), "types": ["Ingress"]}})
            .to_string(),
        )?;
        let t = std::time::Instant::now();
        let (st, out, err) = c.d.ctl(&[
            "apply",
            "--wait",
            "--wait-timeout",
            timeout,
            "-f",
            &f.display().to_string(),
        ]);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if st.success() {
            return Ok((ms, None));
        }
        // The cap reached is a figure (how far the agents had got), anything else an error.
        let said = format!("{out}{err}");
        match said.lines().find(|l| l.contains("not in force after")) {
            Some(l) => Ok((ms, Some(l.trim().to_owned()))),
            None => bail!("{}: endpoints not in force: {said}", c.name),
        }
    };
    // Not deleted afterwards: this runs last, and the clusters go away.
    let (settle_ms, note) = marker(1)?;
    let (rss1, mem1) = (rss_kib(agent_pid), memlock());
    Ok(EndpointsMemory {
        config: c.name.to_owned(),
        node: node.name.clone(),
        endpoints: count,
        rules,
        agent_rss_kib_before: rss0,
        agent_rss_kib_after: rss1,
        bpf_map_memlock_bytes_before: mem0,
        bpf_map_memlock_bytes_after: mem1,
        write_ms,
        settle_ms,
        settled: note.is_none(),
        note,
    })
}

/// `ip`/`bridge` ARGS… in `ns`, a clear error when it fails.
fn in_ns(ns: &dataplane_tests::Netns, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = dataplane_tests::netns::output(ns.command(cmd).args(args));
    if !out.status.success() {
        bail!(
            "{}: {cmd} {}: {}",
            ns.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Turns a bare deployment's routing into the kernel's VXLAN: on every node a `vxlan0` (VNI
/// 42, UDP 4789, on eth0, no learning) and, for every other node's pod blocks, a route through
/// it to that node's address as an on-link next hop, resolved by a permanent neighbour entry
/// (the remote `vxlan0`'s MAC) and a forwarding entry (that MAC → the remote node's address),
/// as a VXLAN CNI programs them (no flooding, no learning). The pods' MTU becomes 1450 (the
/// 50 bytes of outer IPv4, UDP and VXLAN headers).
fn vxlan(d: &Deployment) -> anyhow::Result<()> {
    let nodes = &d.cluster.nodes;
    let mut macs = Vec::new();
    for n in nodes {
        let local = n.ip.to_string();
        in_ns(
            &n.ns,
            "ip",
            &[
                "link",
                "add",
                "vxlan0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "local",
                &local,
                "dev",
                "eth0",
                "nolearning",
            ],
        )?;
        in_ns(&n.ns, "ip", &["link", "set", "vxlan0", "mtu", "1450", "up"])?;
        let show = in_ns(&n.ns, "ip", &["-j", "link", "show", "vxlan0"])?;
        let v: serde_json::Value = serde_json::from_str(&show)?;
        let mac = v[0]["address"]
            .as_str()
            .context("vxlan0 has no MAC address")?;
        macs.push(mac.to_owned());
    }
    for (i, n) in nodes.iter().enumerate() {
        for (j, owner) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let via = owner.ip.to_string();
            in_ns(
                &n.ns,
                "ip",
                &[
                    "neigh",
                    "replace",
                    &via,
                    "lladdr",
                    &macs[j],
                    "dev",
                    "vxlan0",
                    "nud",
                    "permanent",
                ],
            )?;
            in_ns(
                &n.ns,
                "bridge",
                &["fdb", "append", &macs[j], "dev", "vxlan0", "dst", &via],
            )?;
            let blocks: std::collections::BTreeSet<String> = d
                .pods
                .iter()
                .filter(|p| p.node == j)
                .map(|p| format!("{}/26", std::net::Ipv4Addr::from(u32::from(p.ip) & !63)))
                .collect();
            for b in &blocks {
                in_ns(
                    &n.ns,
                    "ip",
                    &[
                        "route", "replace", b, "via", &via, "dev", "vxlan0", "onlink",
                    ],
                )?;
            }
        }
    }
    for p in &d.pods {
        in_ns(
            &p.sb.ns,
            "ip",
            &["link", "set", &p.sb.ifname, "mtu", "1450"],
        )?;
        // Every other node now sends to this pod through its vxlan0.
        for n in nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != p.node)
            .map(|x| x.1)
        {
            let route = in_ns(&n.ns, "ip", &["route", "get", &p.ip.to_string()])?;
            if !route.contains("dev vxlan0") {
                bail!("{}: {} is not routed through vxlan0: {route}", n.name, p.ip);
            }
        }
    }
    Ok(())
}

/// iptables tracks every connection in the node namespaces; thousands of CRR connections a
/// second would otherwise fill the table with TIME_WAIT entries (120 s) over a full run.
fn short_conntrack_time_wait(d: &Deployment) {
    for n in &d.cluster.nodes {
        n.ns.run(|| {
            if let Err(e) = std::fs::write(
                "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait",
                "5",
            ) {
                eprintln!(
                    "  note: {}: conntrack time_wait timeout not set: {e}",
                    n.name
                );
            }
        });
    }
}

fn measure(
    plan: &Plan,
    c: &Config,
    client: &Pod,
    server: &Pod,
) -> Vec<(&'static str, anyhow::Result<f64>)> {
    let mut v = Vec::new();
    match load::rr(
        client,
        server,
        plan.rr_connections,
        Duration::from_millis(plan.rr_ms),
    ) {
        Ok(r) => {
            v.push(("rr_per_s", Ok(r.per_s)));
            v.push(("rr_p50_us", Ok(r.p50_us)));
            v.push(("rr_p99_us", Ok(r.p99_us)));
            v.push(("rr_cpu_us_per_req", Ok(r.cpu_us_per_op)));
        }
        Err(e) => v.push(("rr_per_s", Err(e.context(c.name)))),
    }
    match load::crr(client, server, Duration::from_millis(plan.crr_ms)) {
        Ok(r) => {
            v.push(("crr_per_s", Ok(r.per_s)));
            v.push(("crr_p50_us", Ok(r.p50_us)));
            v.push(("crr_p99_us", Ok(r.p99_us)));
            v.push(("crr_cpu_us_per_conn", Ok(r.cpu_us_per_op)));
        }
        Err(e) => v.push(("crr_per_s", Err(e.context(c.name)))),
    }
    match load::stream(client, server, plan.stream_s) {
        Ok(s) => {
            v.push(("stream_gbps", Ok(s.gbps)));
            v.push(("stream_cpu_s_per_gb", Ok(s.cpu_s_per_gb)));
        }
        Err(e) => v.push(("stream_gbps", Err(e.context(c.name)))),
    }
    v
}

pub fn run(plan: &Plan) -> anyhow::Result<Samples> {
    // The orchestration stays off CPU 0, where clients and servers run.
    load::pin_to_cpu(1);
    eprintln!(
        "datapath: {}, rules {:?} (+{:?} bpf only), {} round(s), RR {} ms on {} connections, CRR {} ms, stream {} s",
        plan.configs.join(" vs "),
        plan.rules,
        plan.bpf_only_rules,
        plan.rounds,
        plan.rr_ms,
        plan.rr_connections,
        plan.crr_ms,
        plan.stream_s
    );
    let t0 = std::time::Instant::now();
    let start = |what: &str| eprintln!("[{:>5.1}s] starting {what}", t0.elapsed().as_secs_f64());
    // (name, what it is, takes rules, BPF, same node, one set, memory figures)
    type Shape = (&'static str, &'static str, bool, bool, bool, bool, bool);
    let shapes: [Shape; 7] = [
        ("bare", "bare cluster", false, false, true, false, false),
        (
            "bare-vxlan",
            "bare cluster with the kernel's VXLAN",
            false,
            false,
            false,
            false,
            false,
        ),
        (
            "iptables",
            "iptables cluster (nft)",
            true,
            false,
            true,
            false,
            true,
        ),
        (
            "iptables-legacy",
            "iptables cluster (legacy)",
            true,
            false,
            true,
            false,
            false,
        ),
        (
            "ipset",
            "iptables cluster (nft) for the one-ipset policy",
            true,
            false,
            true,
            true,
            false,
        ),
        ("bpf", "bpf cluster (Never)", true, true, true, false, true),
        (
            "bpf-ipip",
            "bpf cluster (IP-in-IP Always)",
            true,
            true,
            false,
            false,
            false,
        ),
    ];
    let mut configs = Vec::new();
    for (name, what, takes_rules, bpf, same_node, one_set, memory) in shapes {
        if !plan.runs(name) {
            continue;
        }
        start(what);
        let d = match name {
            "bare" => Deployment::bare(2),
            "bare-vxlan" => {
                let d = Deployment::bare(2);
                vxlan(&d).context("bare-vxlan: set up the kernel's VXLAN")?;
                d
            }
            "iptables" | "ipset" => Deployment::start_with_dataplane("iptables", "Never", 2),
            "iptables-legacy" => Deployment::start_with_dataplane("iptables-legacy", "Never", 2),
            "bpf" => Deployment::start("Never", 2),
            _ => Deployment::start("Always", 2),
        };
        if !bpf && takes_rules {
            short_conntrack_time_wait(&d);
        }
        configs.push(Config {
            name,
            d,
            takes_rules,
            bpf,
            same_node,
            one_set,
            memory,
        });
    }
    let mut samples = Samples::default();
    let counts: Vec<(usize, bool)> = plan
        .rules
        .iter()
        .map(|&n| (n, false))
        .chain(plan.bpf_only_rules.iter().map(|&n| (n, true)))
        .collect();
    for &(n, bpf_only) in &counts {
        let active: Vec<&Config> = configs
            .iter()
            .filter(|c| !bpf_only || c.bpf || !c.takes_rules)
            .collect();
        for c in active.iter().filter(|c| c.takes_rules && n > 0) {
            eprintln!(
                "[{:>5.1}s] rules {n}: programming {}",
                t0.elapsed().as_secs_f64(),
                c.name
            );
            match program(c, n) {
                Ok(ctl) => {
                    eprintln!(
                        "           {} ms wall, in force {} ms, agent RSS {} KiB",
                        ctl.apply_wall_ms as u64,
                        ctl.in_force_ms.map_or("?".into(), |v| format!("{v:.0}")),
                        ctl.agent_rss_kib_max.map_or("?".into(), |v| v.to_string())
                    );
                    samples.control.insert((c.name.to_owned(), n), ctl);
                }
                Err(e) => {
                    eprintln!("           FAILED: {e:#}");
                    samples.errors.push(format!("{e:#}"));
                }
            }
        }
        for c in active.iter().filter(|c| !c.takes_rules || n == 0) {
            if let Some(rss) =
                c.d.agents
                    .iter()
                    .filter_map(|a| rss_kib(a.process.pid()))
                    .max()
            {
                samples.control.entry((c.name.to_owned(), n)).or_default();
                let e = samples
                    .control
                    .get_mut(&(c.name.to_owned(), n))
                    .context("entry")?;
                e.agent_rss_kib_max = Some(rss);
                if c.bpf {
                    e.bpf_map_memlock_bytes =
                        c.d.pins.first().and_then(|p| pinned_memlock(&p.path));
                }
            }
        }
        for round in 0..plan.rounds {
            for c in &active {
                for (pi, path) in PATHS.iter().enumerate() {
                    if pi == 0 && !c.same_node {
                        continue;
                    }
                    // pods 0 and 1 are on node-1, pod 2 on node-2 (same subnet).
                    let (client, server) = (&c.d.pods[0], &c.d.pods[1 + pi]);
                    eprintln!(
                        "[{:>5.1}s] rules {n:>6} round {}/{} {:<15} {path}",
                        t0.elapsed().as_secs_f64(),
                        round + 1,
                        plan.rounds,
                        c.name
                    );
                    for (metric, value) in measure(plan, c, client, server) {
                        let slot = samples
                            .data
                            .entry((c.name.to_owned(), (*path).to_owned(), metric.to_owned(), n))
                            .or_insert_with(|| vec![None; plan.rounds]);
                        match value {
                            Ok(v) => slot[round] = Some(v),
                            Err(e) => {
                                let msg = format!("rules {n} round {round} {path} {metric}: {e:#}");
                                eprintln!("           FAILED: {msg}");
                                samples.errors.push(msg);
                            }
                        }
                    }
                }
            }
        }
    }
    // Last, so that an agent still busy with them cannot disturb the traffic measurements:
    // memory at many endpoints under the largest rule count every configuration takes (the
    // issue's 1,000 endpoints and 10,000 rules; 1,000 with --quick): a BPF configuration that
    // went on to the BPF-only counts is brought back to it first.
    // BPF first: an iptables agent still busy with the endpoints would slow the other.
    let mem_rules = plan.rules.iter().copied().max().unwrap_or(0);
    for c in configs.iter_mut().rev().filter(|c| c.memory) {
        let in_force = counts
            .iter()
            .rev()
            .find(|(_, bpf_only)| c.bpf || !bpf_only)
            .map_or(0, |x| x.0);
        if in_force != mem_rules {
            eprintln!(
                "[{:>5.1}s] rules {in_force} → {mem_rules}: reprogramming {}",
                t0.elapsed().as_secs_f64(),
                c.name
            );
            if let Err(e) = reprogram(c, in_force, mem_rules) {
                eprintln!("           FAILED: {e:#}");
                samples.errors.push(format!("endpoints memory: {e:#}"));
                continue;
            }
            if c.bpf && in_force > mem_rules {
                // The agent's RSS would still hold what the allocator kept of the larger
                // count: node 3's agent restarts (from its pinned maps) under `mem_rules`.
                eprintln!(
                    "[{:>5.1}s] restarting {} node 3's agent under {mem_rules} rules",
                    t0.elapsed().as_secs_f64(),
                    c.name
                );
                if let Err(e) = restart_agent_3(c, mem_rules) {
                    eprintln!("           FAILED: {e:#}");
                    samples.errors.push(format!("endpoints memory: {e:#}"));
                    continue;
                }
            }
        }
        eprintln!(
            "[{:>5.1}s] rules {mem_rules}: {} endpoints on {} node 3",
            t0.elapsed().as_secs_f64(),
            plan.endpoints,
            c.name
        );
        match endpoints_memory(c, plan.endpoints, mem_rules) {
            Ok(m) => {
                eprintln!(
                    "           agent RSS {:?} → {:?} KiB, maps {:?} → {:?} B, {} {:.0} ms",
                    m.agent_rss_kib_before,
                    m.agent_rss_kib_after,
                    m.bpf_map_memlock_bytes_before,
                    m.bpf_map_memlock_bytes_after,
                    if m.settled {
                        "settled in"
                    } else {
                        "NOT settled after"
                    },
                    m.settle_ms
                );
                samples.endpoints.push(m);
            }
            Err(e) => {
                eprintln!("           FAILED: {e:#}");
                samples.errors.push(format!("endpoints memory: {e:#}"));
            }
        }
    }
    eprintln!("[{:>5.1}s] measured", t0.elapsed().as_secs_f64());
    Ok(samples)
}

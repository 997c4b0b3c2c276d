//! Policy at scale, three ways:
//!
//! 1. **Verdict cost** (BPF_PROG_TEST_RUN of `to_workload`, which runs conntrack and the pod's
//!    ingress policy): the destination's policy has N rules, N−1 that do not match the probe
//!    (each allows a distinct /32 on a distinct port) and, last, the one that allows it. The
//!    probe's source is the /32 of the middle rule, so its address lookup ends deep in the
//!    trie. Three packets of a new flow each time: a SYN to a port no rule allows (dropped by
//!    policy: the pure policy path), an RST the last rule allows (allowed, and RSTs are not
//!    tracked, so every repeat is new), both with `repeat` and averaged by the kernel, and a
//!    SYN the last rule allows (allowed and inserted into conntrack) run once per call with
//!    its conntrack entry deleted after each. Every configuration (no policy, 10, 1,000 and
//!    100,000 rules) has its own loaded object; configurations are interleaved in each round.
//!    The LPM trie nodes each lookup visits are computed from the compiled entries: the
//!    per-packet cost follows them.
//! 2. **Compile time and map memory**: 10,000 rules in 42 policies over 1,000 endpoints in 10
//!    namespaces, resolved (`Resolver::rules_for`) for every endpoint and compiled once per
//!    distinct rule list, then written into a fresh object's policy tries; the kernel's own
//!    `memlock` of each trie is read from /proc/self/fdinfo before and after.
//! 3. **Apply latency** on a cluster in a box (3 nodes, 2 pods each): one NetworkPolicy of
//!    10,000 rules (1,000 with --quick) selecting every pod, `dataplane ctl apply --wait`,
//!    then updates changing one rule. For each: the wall time of the command, its `in force`
//!    figure (the statuses are polled every 50 ms), the time until every pod's endpoint on
//!    every node points at the new policy (maps polled here), what each agent's debug log
//!    says the reconcile took, and the CPU time of the agents, etcd and `ctl` (three agents
//!    share this machine's CPUs). The same steps are then timed in this process, one by one,
//!    to show where the time goes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{LpmTrie, Map, MapData, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use dataplane::{
    datastore::policy::NetworkPolicy,
    policy::{
        compile::{self, CompiledRule, Entries, IpSet, PortSet, ProtoMatch, Term},
        resolve::{self, Endpoint, NamedPort, Resolver},
        selector::Labels,
    },
    sync::MAX_ENTRIES_PER_POLICY,
};
use dataplane_common::{
    CtKey, EndpointValue, POLICY_NONE, PolicyIpKey, PolicyPortKey, Verdict, map_names, port_kind,
    verdict, verdict_flags,
};
use dataplane_tests::{dataplane, packets::TestObject, traffic::Deployment};
use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::json;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// BPF_PROG_TEST_RUN runs TC programs as if on the loopback device.
const IFINDEX: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const SPORT: u16 = 40000;
const ALLOWED_PORT: u16 = 80;
/// No rule allows it (the non-matching rules use 1024 and up).
const DENIED_PORT: u16 = 81;
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of per-round ratios, with their spread.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn ratio(num: &[f64], den: &[f64]) -> Ratio {
    let r: Vec<f64> = num.iter().zip(den).map(|(a, b)| a / b).collect();
    Ratio {
        median: median(r.clone()),
        min: r.iter().copied().fold(f64::INFINITY, f64::min),
        max: r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Verdict cost

/// The peer of non-matching rule `i`: distinct /32s from 10.128.0.0.
fn rule_peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + i)
}

/// The port of non-matching rule `i`: distinct up to 64,000 rules, never the probe's ports.
fn rule_port(i: u32) -> u16 {
    1024 + (i % 64_000) as u16
}

fn tcp_term(peer: Option<Ipv4Addr>, port: u16) -> Term {
    Term {
        proto: ProtoMatch::Is(TCP),
        peer: IpSet {
            all_of: peer
                .map(|p| vec![vec![Ipv4Net::from(p)]])
                .unwrap_or_default(),
            none_of: Vec::new(),
            nets: None,
        },
        dport: PortSet {
            any_of: Some(vec![(port, port)]),
            none_of: Vec::new(),
        },
        sport: PortSet::default(),
    }
}

/// `n` rules: `n − 1` allowing one /32 on one port each, then TCP to ALLOWED_PORT from
/// anywhere.
fn scale_rules(n: usize) -> Vec<CompiledRule> {
    let mut rules: Vec<CompiledRule> = (0..n as u32 - 1)
        .map(|i| CompiledRule {
            action: verdict::ALLOW,
            terms: vec![tcp_term(Some(rule_peer(i)), rule_port(i))],
            origin: format!("bench ingress #{i}"),
        })
        .collect();
    rules.push(CompiledRule {
        action: verdict::ALLOW,
        terms: vec![tcp_term(None, ALLOWED_PORT)],
        origin: "bench ingress allow".to_owned(),
    });
    rules
}

/// A key's bytes as the LPM trie compares them (memory order, most significant bit first),
/// left-aligned in a u128.
fn key_bits(bytes: &[u8]) -> u128 {
    bytes
        .iter()
        .enumerate()
        .fold(0, |v, (i, b)| v | u128::from(*b) << (120 - 8 * i))
}

fn ip_key_bits(k: &PolicyIpKey) -> u128 {
    let mut b = k.policy.to_ne_bytes().to_vec();
    b.extend_from_slice(&k.addr);
    key_bits(&b)
}

fn port_key_bits(k: &PolicyPortKey) -> u128 {
    let mut b = k.policy.to_ne_bytes().to_vec();
    b.extend_from_slice(&k.class.to_ne_bytes());
    b.extend_from_slice(&[k.proto, k.kind]);
    b.extend_from_slice(&k.port);
    key_bits(&b)
}

/// How many nodes the kernel's LPM trie (a path-compressed binary trie: one node per entry,
/// plus one where two entries' prefixes part) visits to look up the full-length `key` among
/// `entries` (prefix length, bits). Along the key's path there is a node at every entry that
/// is a prefix of the key and at every level where some entry leaves the path while another
/// goes on; the walk ends one node further when a subtree hangs off the last one.
fn trie_nodes_visited(entries: impl Iterator<Item = (u32, u128)>, key: u128) -> usize {
    let mut on_path = BTreeSet::new();
    let mut leaves = BTreeSet::new();
    // How far the deepest entry follows the key.
    let mut reach = None;
    for (len, bits) in entries {
        let common = (bits ^ key).leading_zeros().min(len);
        if common == len {
            on_path.insert(len);
        } else {
            leaves.insert(common);
        }
        reach = reach.max(Some(common));
    }
    on_path.extend(leaves.iter().filter(|&&l| Some(l) < reach).copied());
    let last = on_path.last().copied();
    let beyond = leaves.iter().any(|&l| last.is_none_or(|m| l > m));
    on_path.len() + usize::from(beyond)
}

/// Trie nodes visited by the probe's lookups: (address, verdict to `dport`). The programs
/// look in the hashes first; a trie is walked only for a CIDR peer (no single-address entry)
/// or for a protocol whose port blocks differ (the RANGES flag).
fn probe_path(e: &Entries, policy: u32, peer: Ipv4Addr, dport: u16) -> (usize, usize) {
    let t = e.tables();
    let ip_key = PolicyIpKey {
        policy,
        addr: peer.octets(),
    };
    let (ip, class) = match t.ip_exact.get(&ip_key) {
        Some(c) => (0, *c),
        None => {
            let nodes = trie_nodes_visited(
                t.ip_lpm.keys().map(|(len, k)| (*len, ip_key_bits(k))),
                ip_key_bits(&ip_key),
            );
            let p = u32::from(peer);
            let class = t
                .ip_lpm
                .iter()
                .filter(|((len, k), _)| {
                    let l = len - 32;
                    k.policy == policy
                        && (l == 0 || (u32::from_be_bytes(k.addr) ^ p) >> (32 - l) == 0)
                })
                .max_by_key(|((len, _), _)| *len)
                .map_or(0, |(_, c)| *c);
            (nodes, class)
        }
    };
    let key = |kind, port: u16| PolicyPortKey {
        policy,
        class,
        proto: TCP,
        kind,
        port: port.to_be_bytes(),
    };
    let exact = key(port_kind::EXACT, dport);
    let ranged = !t.port_exact.contains_key(&exact)
        && t.port_exact
            .get(&key(port_kind::PROTO, 0))
            .is_some_and(|v| v.flags & verdict_flags::RANGES != 0);
    let port = if ranged {
        trie_nodes_visited(
            t.port_lpm.keys().map(|(len, k)| (*len, port_key_bits(k))),
            port_key_bits(&exact),
        )
    } else {
        0
    };
    (ip, port)
}

/// One configuration of the verdict bench: its own object, its pod's policy.
struct Config {
    name: String,
    rules: usize,
    entries: usize,
    compile_ms: f64,
    install_ms: f64,
    obj: TestObject,
    /// The probe's source: the middle rule's /32 (any address without policy).
    peer: Ipv4Addr,
    /// Trie nodes the probes visit: address lookup, verdict lookup (allowed, denied port).
    nodes: (usize, usize, usize),
}

impl Config {
    fn new(rules: usize) -> anyhow::Result<Self> {
        let mut obj = TestObject::load();
        obj.set_config(Ipv4Addr::new(192, 168, 1, 10), 1);
        let mut nodes = (0, 0, 0);
        let (policy, entries, compile_ms, install_ms, peer) = if rules == 0 {
            (POLICY_NONE, 0, 0.0, 0.0, rule_peer(0))
        } else {
            let list = scale_rules(rules);
            let t = Instant::now();
            let e = compile::compile(1, &list, MAX_ENTRIES_PER_POLICY)?;
            let compile_ms = ms(t.elapsed());
            let t = Instant::now();
            obj.install_policy(&e);
            let install_ms = ms(t.elapsed());
            let peer = rule_peer((rules as u32 - 1) / 2);
            let (ip, allowed) = probe_path(&e, 1, peer, ALLOWED_PORT);
            let (_, denied) = probe_path(&e, 1, peer, DENIED_PORT);
            nodes = (ip, allowed, denied);
            (1, e.len(), compile_ms, install_ms, peer)
        };
        obj.set_endpoint(
            IFINDEX,
            EndpointValue {
                ip: POD.octets(),
                mac: [2, 0, 0, 0, 0, 2],
                flags: 0,
                ingress_policy: policy,
                egress_policy: POLICY_NONE,
            },
        );
        let name = if rules == 0 {
            "none".to_owned()
        } else {
            format!("{rules} rules")
        };
        Ok(Self {
            name,
            rules,
            entries,
            compile_ms,
            install_ms,
            obj,
            peer,
            nodes,
        })
    }

    fn packet(&self, dport: u16, flags: u8) -> Vec<u8> {
        dataplane_tests::packets::tcp_frame(self.peer, POD, SPORT, dport, flags)
    }

    fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: self.peer.octets(),
            daddr: POD.octets(),
            sport: SPORT.to_be_bytes(),
            dport: ALLOWED_PORT.to_be_bytes(),
            proto: TCP,
            _pad: [0; 3],
        }
    }

    /// Runs `to_workload` `repeat` times on `packet`; (verdict, kernel's average ns per run).
    fn test_run(&self, packet: &[u8], repeat: u32) -> anyhow::Result<(i32, f64)> {
        let prog: &SchedClassifier = self
            .obj
            .ebpf
            .program("to_workload")
            .context("no to_workload program")?
            .try_into()?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::new()
        })?;
        Ok((r.return_value as i32, r.duration.as_nanos() as f64))
    }

    /// One allowed SYN of a new connection: run once, then its conntrack entry is deleted.
    fn new_flow_once(&mut self) -> anyhow::Result<(i32, f64)> {
        let r = self.test_run(&self.packet(ALLOWED_PORT, SYN), 1)?;
        let key = self.ct_key();
        self.obj
            .conntrack()
            .remove(&key)
            .context("the allowed SYN left no conntrack entry")?;
        Ok(r)
    }

    /// Checks the verdict of each probe once before timing anything.
    fn check(&mut self) -> anyhow::Result<()> {
        let (rst, _) = self.test_run(&self.packet(ALLOWED_PORT, RST), 1)?;
        let (syn, _) = self.new_flow_once()?;
        if rst != TC_ACT_OK || syn != TC_ACT_OK {
            bail!("{}: allowed probes gave {rst} and {syn}", self.name);
        }
        if self.rules > 0 {
            let (denied, _) = self.test_run(&self.packet(DENIED_PORT, SYN), 1)?;
            if denied != TC_ACT_SHOT {
                bail!("{}: the denied probe gave {denied}", self.name);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct VerdictRow {
    pub config: String,
    pub rules: usize,
    pub policy_entries: usize,
    pub compile_ms: f64,
    pub install_ms: f64,
    /// SYN matching no rule: conntrack miss, policy lookups, drop (repeat, median of rounds).
    pub denied_ns: Option<f64>,
    /// RST allowed by the last rule, not tracked (repeat, median of rounds).
    pub allowed_untracked_ns: f64,
    /// SYN allowed by the last rule and inserted into conntrack (single runs, median).
    pub allowed_new_flow_ns: f64,
    /// `allowed_untracked_ns` less the same without policy: the policy lookups' share.
    pub policy_ns: f64,
    /// LPM trie nodes the probe's lookups visit (computed from the entries): address trie,
    /// then verdict trie for the allowed and the denied port.
    pub trie_nodes_ip: usize,
    pub trie_nodes_port_allowed: usize,
    pub trie_nodes_port_denied: usize,
}

#[derive(Debug, Serialize)]
pub struct VerdictReport {
    pub rounds: usize,
    pub repeat: u32,
    pub new_flow_calls_per_round: usize,
    pub rows: Vec<VerdictRow>,
    /// ns/packet with 100,000 rules over ns/packet with 10, per path.
    pub ratio_100k_over_10: PathRatios,
}

/// Per-round ratios of one configuration over another, per path.
#[derive(Debug, Serialize)]
pub struct PathRatios {
    pub denied: Ratio,
    pub allowed_untracked: Ratio,
    pub allowed_new_flow: Ratio,
}

fn verdict_bench(quick: bool) -> anyhow::Result<VerdictReport> {
    let (rounds, repeat, calls) = if quick {
        (3, 20_000, 200)
    } else {
        (9, 100_000, 1_000)
    };
    let counts = [0usize, 10, 1_000, 100_000];
    println!(
        "policy verdict (BPF_PROG_TEST_RUN of to_workload): {counts:?} rules, {rounds} rounds × repeat {repeat} (new-flow SYN: {calls} single runs per round), interleaved"
    );
    let mut configs = Vec::new();
    for n in counts {
        let c = Config::new(n)?;
        println!(
            "  {:>12}: {} entries, compiled in {:.1} ms, written in {:.1} ms",
            c.name, c.entries, c.compile_ms, c.install_ms
        );
        configs.push(c);
    }
    for c in &mut configs {
        c.check()?;
    }
    // [config][round]
    let mut denied = vec![Vec::new(); configs.len()];
    let mut untracked = vec![Vec::new(); configs.len()];
    let mut new_flow = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, c) in configs.iter_mut().enumerate() {
            if c.rules > 0 {
                denied[i].push(c.test_run(&c.packet(DENIED_PORT, SYN), repeat)?.1);
            }
            untracked[i].push(c.test_run(&c.packet(ALLOWED_PORT, RST), repeat)?.1);
            let mut one = Vec::with_capacity(calls);
            for _ in 0..calls {
                one.push(c.new_flow_once()?.1);
            }
            new_flow[i].push(median(one));
        }
    }
    let rows: Vec<VerdictRow> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| VerdictRow {
            config: c.name.clone(),
            rules: c.rules,
            policy_entries: c.entries,
            compile_ms: c.compile_ms,
            install_ms: c.install_ms,
            denied_ns: (!denied[i].is_empty()).then(|| median(denied[i].clone())),
            allowed_untracked_ns: median(untracked[i].clone()),
            allowed_new_flow_ns: median(new_flow[i].clone()),
            policy_ns: median(untracked[i].clone()) - median(untracked[0].clone()),
            trie_nodes_ip: c.nodes.0,
            trie_nodes_port_allowed: c.nodes.1,
            trie_nodes_port_denied: c.nodes.2,
        })
        .collect();
    println!(
        "  {:>12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "ns/packet", "entries", "denied", "allowed", "new flow", "policy", "trie nodes"
    );
    for r in &rows {
        println!(
            "  {:>12} {:>9} {:>10} {:>10.0} {:>10.0} {:>10.0} {:>11}",
            r.config,
            r.policy_entries,
            r.denied_ns.map_or("-".to_owned(), |v| format!("{v:.0}")),
            r.allowed_untracked_ns,
            r.allowed_new_flow_ns,
            r.policy_ns,
            format!("{}+{}", r.trie_nodes_ip, r.trie_nodes_port_allowed)
        );
    }
    let (lo, hi) = (1, configs.len() - 1);
    let report = VerdictReport {
        rounds,
        repeat,
        new_flow_calls_per_round: calls,
        ratio_100k_over_10: PathRatios {
            denied: ratio(&denied[hi], &denied[lo]),
            allowed_untracked: ratio(&untracked[hi], &untracked[lo]),
            allowed_new_flow: ratio(&new_flow[hi], &new_flow[lo]),
        },
        rows,
    };
    let show = |r: Ratio| format!("{:.3} ({:.3}–{:.3})", r.median, r.min, r.max);
    println!(
        "  {} rules / {} rules (median of per-round ratios, range): denied {}, allowed untracked {}, allowed new flow {}",
        counts[hi],
        counts[lo],
        show(report.ratio_100k_over_10.denied),
        show(report.ratio_100k_over_10.allowed_untracked),
        show(report.ratio_100k_over_10.allowed_new_flow)
    );
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// 2. Compile time and map memory

const NAMESPACES: usize = 10;
const ENDPOINTS: usize = 1_000;
/// Endpoint groups (`app` label); the last has no namespaced policy.
const GROUPS: usize = 5;
const GLOBAL_RULES: usize = 1_000;
const NAMESPACED_RULES: usize = 200;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// 1,000 endpoints: namespace `ns-<i % 10>`, `app: g<i / 10 % 5>`, `tier` by fifties; the
/// named port `http` is 8080 on the frontends and 9090 on the backends.
fn scale_endpoints() -> Vec<Endpoint> {
    (0..ENDPOINTS)
        .map(|i| {
            let ns = format!("ns-{}", i % NAMESPACES);
            let frontend = i / 50 % 2 == 0;
            let tier = if frontend { "frontend" } else { "backend" };
            Endpoint {
                ip: Ipv4Addr::from(0x0a41_0000 + i as u32 + 1),
                labels: labels(&[
                    ("app", format!("g{}", i / 10 % GROUPS)),
                    ("tier", tier.to_owned()),
                    ("projectcalico.org/namespace", ns.clone()),
                    ("projectcalico.org/orchestrator", "k8s".to_owned()),
                ]),
                ports: vec![NamedPort {
                    name: "http".to_owned(),
                    proto: TCP,
                    port: if frontend { 8080 } else { 9090 },
                }],
                namespace: ns,
            }
        })
        .collect()
}

/// Rule `j` of a generated policy: a /32 on one port, a /24 less a /28 on a port range, a
/// selector on UDP (Deny), or a selector on the named port, in turn.
fn scale_rule(j: usize, salt: usize) -> serde_json::Value {
    let k = j + salt * 10_000;
    match j % 4 {
        0 => json!({"action": "Allow", "protocol": "TCP",
            "source": {"nets": [format!("{}/32", Ipv4Addr::from(0x0ac8_0000 + k as u32))]},
            "destination": {"ports": [1000 + j % 20_000]}}),
        1 => {
            let net = Ipv4Addr::from(0xac10_0000 + ((k as u32) << 8));
            let hole = Ipv4Addr::from(u32::from(net) + 16);
            json!({"action": "Allow", "protocol": "TCP",
                "source": {"nets": [format!("{net}/24")], "notNets": [format!("{hole}/28")]},
                "destination": {"ports": [format!("{}:{}", 2000 + j % 100, 2010 + j % 100)]}})
        }
        2 => json!({"action": "Deny", "protocol": "UDP",
            "source": {"selector": format!("app == 'g{}'", j % GROUPS)},
            "destination": {"ports": [3000 + j % 100]}}),
        _ => json!({"action": "Allow", "protocol": "TCP",
            "source": {"selector": format!("app == 'g{}' && tier == 'backend'", j % GROUPS)},
            "destination": {"ports": ["http"]}}),
    }
}

/// 2 GlobalNetworkPolicies (one per tier, 1,000 rules each, order 10) and, in each namespace,
/// one NetworkPolicy of 200 rules for each of the groups g0–g3 (order 100): 10,000 rules.
fn scale_policies() -> anyhow::Result<Vec<resolve::Policy>> {
    let mut out = Vec::new();
    for (t, tier) in ["frontend", "backend"].iter().enumerate() {
        let p: NetworkPolicy = serde_json::from_value(json!({
            "kind": "GlobalNetworkPolicy",
            "metadata": {"name": format!("tier-{tier}")},
            "spec": {"order": 10, "selector": format!("tier == '{tier}'"), "types": ["Ingress"],
                "ingress": (0..GLOBAL_RULES).map(|j| scale_rule(j, t)).collect::<Vec<_>>()},
        }))?;
        out.push(resolve::Policy::parse(None, &p).map_err(anyhow::Error::msg)?);
    }
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        for g in 0..GROUPS - 1 {
            let salt = 2 + n * GROUPS + g;
            let p: NetworkPolicy = serde_json::from_value(json!({
                "kind": "NetworkPolicy",
                "metadata": {"name": format!("g{g}"), "namespace": ns},
                "spec": {"order": 100, "selector": format!("app == 'g{g}'"), "types": ["Ingress"],
                    "ingress": (0..NAMESPACED_RULES).map(|j| scale_rule(j, salt)).collect::<Vec<_>>()},
            }))?;
            out.push(resolve::Policy::parse(Some(&ns), &p).map_err(anyhow::Error::msg)?);
        }
    }
    Ok(out)
}

/// The kernel's `memlock` of the map behind `fd` (its memory use, kernel ≥ 6.4).
fn memlock(fd: i32) -> anyhow::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in fdinfo")
}

fn map_fd(obj: &TestObject, name: &str) -> anyhow::Result<i32> {
    match obj.ebpf.map(name) {
        Some(Map::LpmTrie(m) | Map::HashMap(m)) => Ok(m.fd().as_fd().as_raw_fd()),
        _ => bail!("no policy map {name}"),
    }
}

/// The summed `memlock` of the address maps and of the verdict maps.
fn policy_memlock(obj: &TestObject) -> anyhow::Result<(u64, u64)> {
    let sum = |names: [&str; 2]| -> anyhow::Result<u64> {
        names.iter().map(|n| memlock(map_fd(obj, n)?)).sum()
    };
    Ok((
        sum([map_names::POLICY_IP, map_names::POLICY_IP_EXACT])?,
        sum([map_names::POLICY_PORT, map_names::POLICY_PORT_EXACT])?,
    ))
}

/// Writes `e` into the object's policy maps; how long it took.
fn write_entries(obj: &mut TestObject, e: &Entries) -> anyhow::Result<Duration> {
    let t = Instant::now();
    obj.install_policy(e);
    Ok(t.elapsed())
}

/// Removes `e` from the object's policy maps; how long it took.
fn remove_entries(obj: &mut TestObject, e: &Entries) -> anyhow::Result<Duration> {
    let tables = e.tables();
    let t = Instant::now();
    let mut ip: LpmTrie<&mut MapData, PolicyIpKey, u32> = LpmTrie::try_from(
        obj.ebpf
            .map_mut(map_names::POLICY_IP)
            .context("policy ip")?,
    )?;
    for &(plen, k) in tables.ip_lpm.keys() {
        ip.remove(&Key::new(plen, k))?;
    }
    let mut ip: aya::maps::HashMap<&mut MapData, PolicyIpKey, u32> = aya::maps::HashMap::try_from(
        obj.ebpf
            .map_mut(map_names::POLICY_IP_EXACT)
            .context("policy ip exact")?,
    )?;
    for k in tables.ip_exact.keys() {
        ip.remove(k)?;
    }
    let mut port: LpmTrie<&mut MapData, PolicyPortKey, Verdict> = LpmTrie::try_from(
        obj.ebpf
            .map_mut(map_names::POLICY_PORT)
            .context("policy port")?,
    )?;
    for &(plen, k) in tables.port_lpm.keys() {
        port.remove(&Key::new(plen, k))?;
    }
    let mut port: aya::maps::HashMap<&mut MapData, PolicyPortKey, Verdict> =
        aya::maps::HashMap::try_from(
            obj.ebpf
                .map_mut(map_names::POLICY_PORT_EXACT)
                .context("policy port exact")?,
        )?;
    for k in tables.port_exact.keys() {
        port.remove(k)?;
    }
    Ok(t.elapsed())
}

#[derive(Debug, Serialize)]
pub struct CompileReport {
    pub endpoints: usize,
    pub policies: usize,
    pub rules: usize,
    pub rounds: usize,
    /// Rules per endpoint's ingress list: min and max.
    pub rules_per_endpoint_min: usize,
    pub rules_per_endpoint_max: usize,
    pub distinct_compiled_policies: usize,
    pub ip_entries: usize,
    pub port_entries: usize,
    /// `Policy::parse` of every policy (from the stored form).
    pub parse_ms: f64,
    /// `Resolver::rules_for` for every endpoint.
    pub resolve_ms: f64,
    /// Grouping endpoints by equal rule lists (hashing each whole list).
    pub group_ms: f64,
    /// Peer CIDRs in the distinct lists once selectors are resolved to /32s.
    pub peer_cidrs: usize,
    /// `compile` of every distinct list.
    pub compile_ms: f64,
    /// Writing every entry into the two tries, one syscall each.
    pub write_ms: f64,
    /// The tries' `memlock` (kernel's count: entries × (trie node header + key data + value);
    /// intermediate nodes and allocator rounding are not counted), after minus before.
    pub memlock_ip_bytes: u64,
    pub memlock_port_bytes: u64,
    pub memlock_bytes_per_entry: f64,
    /// Upper estimate with the trie's intermediate nodes (at most one per entry, same size)
    /// and allocations rounded up to 64 bytes: 2 × 64 B per entry.
    pub estimated_upper_bytes: u64,
}

fn compile_bench(quick: bool) -> anyhow::Result<CompileReport> {
    let rounds = if quick { 1 } else { 5 };
    println!(
        "policy compile: {} rules in {} policies over {ENDPOINTS} endpoints, {rounds} rounds",
        GLOBAL_RULES * 2 + NAMESPACES * (GROUPS - 1) * NAMESPACED_RULES,
        2 + NAMESPACES * (GROUPS - 1)
    );
    let endpoints = scale_endpoints();
    let namespaces: BTreeMap<String, Labels> = (0..NAMESPACES)
        .map(|n| {
            let env = if n % 2 == 0 { "prod" } else { "dev" };
            (format!("ns-{n}"), labels(&[("env", env.to_owned())]))
        })
        .collect();
    let (mut parse, mut resolve, mut group, mut compile) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut result = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let policies = scale_policies()?;
        parse.push(ms(t.elapsed()));
        let t = Instant::now();
        let r = Resolver::new(&endpoints, &namespaces, &policies);
        // As the agent's sync does: endpoints selected by the same policies (none looking at
        // the endpoint itself) are resolved once; the others one by one.
        let mut by_key: HashMap<
            dataplane::policy::resolve::SharingKey,
            std::rc::Rc<Vec<CompiledRule>>,
        > = HashMap::new();
        let resolved: Vec<std::rc::Rc<Vec<CompiledRule>>> = endpoints
            .iter()
            .filter_map(|ep| match r.sharing_key(ep, true) {
                Some(key) if !key.is_empty() => Some(
                    by_key
                        .entry(key)
                        .or_insert_with(|| {
                            std::rc::Rc::new(r.rules_for(ep, true).unwrap_or_default())
                        })
                        .clone(),
                ),
                Some(_) => None,
                None => r.rules_for(ep, true).map(std::rc::Rc::new),
            })
            .collect();
        resolve.push(ms(t.elapsed()));
        // Endpoints with equal lists share one compiled policy: lists resolved once are the
        // same list; the rest are compared by content.
        let t = Instant::now();
        let mut lists: HashMap<&[CompiledRule], usize> = HashMap::new();
        let mut seen: HashMap<*const Vec<CompiledRule>, ()> = HashMap::new();
        for rules in &resolved {
            if seen.insert(std::rc::Rc::as_ptr(rules), ()).is_some() {
                continue;
            }
            let next = lists.len();
            lists.entry(rules.as_slice()).or_insert(next);
        }
        group.push(ms(t.elapsed()));
        let per_endpoint: Vec<usize> = resolved.iter().map(|l| l.len()).collect();
        let terms: usize = lists
            .keys()
            .flat_map(|l| l.iter())
            .map(|r| {
                r.terms
                    .iter()
                    .map(|t| t.peer.all_of.iter().map(Vec::len).sum::<usize>())
                    .sum::<usize>()
            })
            .sum();
        let t = Instant::now();
        let mut all = Vec::new();
        for (rules, id) in &lists {
            all.push(compile::compile(
                *id as u32 + 1,
                rules,
                MAX_ENTRIES_PER_POLICY,
            )?);
        }
        compile.push(ms(t.elapsed()));
        result = Some((policies.len(), per_endpoint, terms, all));
    }
    let Some((policies, per_endpoint, peer_cidrs, all)) = result else {
        bail!("no round ran");
    };
    let mut obj = TestObject::load();
    let (ip0, port0) = policy_memlock(&obj)?;
    let mut write = Duration::ZERO;
    for e in &all {
        write += write_entries(&mut obj, e)?;
    }
    let (ip1, port1) = policy_memlock(&obj)?;
    let ip_entries: usize = all.iter().map(|e| e.ip.len()).sum();
    let port_entries: usize = all.iter().map(|e| e.port.len()).sum();
    let entries = ip_entries + port_entries;
    let report = CompileReport {
        endpoints: endpoints.len(),
        policies,
        rules: GLOBAL_RULES * 2 + NAMESPACES * (GROUPS - 1) * NAMESPACED_RULES,
        rounds,
        rules_per_endpoint_min: per_endpoint.iter().copied().min().unwrap_or(0),
        rules_per_endpoint_max: per_endpoint.iter().copied().max().unwrap_or(0),
        distinct_compiled_policies: all.len(),
        ip_entries,
        port_entries,
        parse_ms: median(parse),
        resolve_ms: median(resolve),
        group_ms: median(group),
        peer_cidrs,
        compile_ms: median(compile),
        write_ms: ms(write),
        memlock_ip_bytes: ip1 - ip0,
        memlock_port_bytes: port1 - port0,
        memlock_bytes_per_entry: (ip1 - ip0 + port1 - port0) as f64 / entries as f64,
        estimated_upper_bytes: entries as u64 * 2 * 64,
    };
    println!(
        "  {} endpoints → {} distinct rule lists ({}–{} rules, {} peer CIDRs in all): parse {:.1} ms, resolve {:.1} ms, group {:.1} ms, compile {:.1} ms (median); {} entries ({} address, {} port) written in {:.1} ms",
        report.endpoints,
        report.distinct_compiled_policies,
        report.rules_per_endpoint_min,
        report.rules_per_endpoint_max,
        report.peer_cidrs,
        report.parse_ms,
        report.resolve_ms,
        report.group_ms,
        report.compile_ms,
        entries,
        report.ip_entries,
        report.port_entries,
        report.write_ms
    );
    println!(
        "  kernel memlock: {:.2} MiB ({:.1} B/entry); with intermediate nodes and 64 B allocations at most {:.2} MiB",
        (report.memlock_ip_bytes + report.memlock_port_bytes) as f64 / 1048576.0,
        report.memlock_bytes_per_entry,
        report.estimated_upper_bytes as f64 / 1048576.0
    );
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// 3. Apply latency on a cluster

/// The bench policy's YAML: `n − 1` rules allowing one /32 on one port each (rule `changed`'s
/// port moved to 65,100 + `version`), then TCP to the echo port from anywhere.
fn cluster_policy(n: usize, version: usize) -> String {
    let mut y = String::with_capacity(n * 100);
    y.push_str("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: bench-scale, namespace: default}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress:\n");
    let changed = (version > 0).then(|| (version * 7919) % (n - 1));
    for i in 0..n as u32 - 1 {
        let port = if changed == Some(i as usize) {
            65_100 + version as u16
        } else {
            rule_port(i)
        };
        y.push_str(&format!(
            "  - {{action: Allow, protocol: TCP, source: {{nets: ['{}/32']}}, destination: {{ports: [{port}]}}}}\n",
            rule_peer(i)
        ));
    }
    y.push_str("  - {action: Allow, protocol: TCP, destination: {ports: [7000]}}\n");
    y
}

/// What one agent's debug log says about reconciles: (took, compiled, written, removed).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct AgentApply {
    pub took_ms: f64,
    pub compiled: u64,
    pub written: u64,
    pub removed: u64,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `Debug`-printed Duration (`85.3ms`, `1.2s`, `950µs`, `12ns`) in ms.
fn parse_duration_ms(s: &str) -> Option<f64> {
    for (suffix, scale) in [
        ("ms", 1.0),
        ("µs", 1e-3),
        ("us", 1e-3),
        ("ns", 1e-6),
        ("s", 1e3),
    ] {
        if let Some(v) = s.strip_suffix(suffix) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// The `applied` lines of an agent's log after byte `from`, summed.
fn agent_applies(log: &str, from: usize) -> AgentApply {
    let mut a = AgentApply::default();
    for line in log.get(from..).unwrap_or_default().lines() {
        let line = strip_ansi(line);
        if !line.contains(" applied ") && !line.contains(": applied") {
            continue;
        }
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                match k {
                    "took" => a.took_ms += parse_duration_ms(v).unwrap_or(0.0),
                    "compiled" => a.compiled += v.parse().unwrap_or(0),
                    "written" => a.written += v.parse().unwrap_or(0),
                    "removed" => a.removed += v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    a
}

#[derive(Debug, Serialize)]
pub struct ApplySample {
    /// `created` for the first, `one rule changed` after.
    pub change: String,
    /// `ctl apply --wait`, from spawning it to its exit.
    pub wall_ms: f64,
    /// Its `in force on N nodes (X ms)` (node statuses polled every 50 ms), counted from the
    /// end of its writes.
    pub in_force_ms: f64,
    /// `wall_ms − in_force_ms`: the command's start, parsing and writes.
    pub ctl_before_wait_ms: f64,
    pub in_force_nodes: usize,
    /// Until every pod's endpoint on every node pointed at the new policy (from the spawn).
    pub enforced_ms: f64,
    pub enforced_per_node_ms: Vec<f64>,
    /// Per node, the agent's reconciles as its debug log reports them (None: no debug log).
    pub agents: Option<Vec<AgentApply>>,
    /// CPU time used during the apply by each agent, by etcd, by the `ctl` process and by
    /// this bench's endpoint poller, in ms: with 3 agents on this machine's CPUs, their wall
    /// times include waiting for one.
    pub agents_cpu_ms: Vec<f64>,
    pub etcd_cpu_ms: f64,
    pub ctl_cpu_ms: f64,
    pub poller_cpu_ms: f64,
}

/// The steps of `ctl apply` and of the agent for the same policy, timed one by one in this
/// process, uncontended.
#[derive(Debug, Serialize)]
pub struct Breakdown {
    /// `ctl`: a run of `ctl get ippools` (process start, etcd connection, one small read).
    pub ctl_startup_ms: f64,
    /// `ctl`: the YAML to validated manifests (all of `manifest::parse`)…
    pub ctl_yaml_parse_ms: f64,
    /// … of which the YAML to a JSON value.
    pub ctl_yaml_to_value_ms: f64,
    /// `ctl`: reading the stored policy before the write (it compares), and the write.
    pub ctl_etcd_get_ms: f64,
    pub ctl_etcd_put_ms: f64,
    /// Agent: the stored JSON value to a NetworkPolicy.
    pub decode_ms: f64,
    /// Agent: `Policy::parse`.
    pub policy_parse_ms: f64,
    /// Agent: `rules_for` of one pod (ingress and egress).
    pub resolve_ms: f64,
    pub compile_ms: f64,
    pub entries: usize,
    /// Writing the entries, one syscall each.
    pub write_ms: f64,
    /// Removing the previous version's entries.
    pub remove_ms: f64,
    pub stored_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub rules: usize,
    pub nodes: usize,
    pub pods: usize,
    pub samples: Vec<ApplySample>,
    pub update_wall_ms_median: f64,
    pub update_in_force_ms_median: f64,
    pub update_enforced_ms_median: f64,
    pub breakdown: Breakdown,
}

/// `ctl`'s own steps against the live cluster: (startup, etcd get, etcd put) of the policy
/// `m` (the put rewrites the value it holds).
fn ctl_steps(
    d: &Deployment,
    etcd: &str,
    m: &dataplane::ctl::manifest::Manifest,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut startup = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (st, out, err) = dataplane(
            &d.cluster.nodes[0].ns,
            &["ctl", "--etcd-endpoints", etcd, "get", "ippools"],
        );
        if !st.success() {
            bail!("ctl get ippools: {out}{err}");
        }
        startup.push(ms(t.elapsed()));
    }
    let (get, put) = d.cluster.nodes[0]
        .ns
        .run(|| -> anyhow::Result<(f64, f64)> {
            let rt = dataplane::datastore::runtime()?;
            rt.block_on(async {
                let ds =
                    dataplane::datastore::Datastore::connect(&dataplane::datastore::EtcdConfig {
                        endpoints: vec![etcd.to_owned()],
                        ..dataplane::datastore::EtcdConfig::default()
                    })
                    .await?;
                let t = Instant::now();
                let old = ds
                    .get::<serde_json::Value>(&m.key)
                    .await?
                    .context("the policy is not stored")?;
                // ctl compares what is stored with what it writes.
                std::hint::black_box(old.value == m.value);
                let get = ms(t.elapsed());
                let t = Instant::now();
                ds.update_rev(&m.key, &m.value, old.mod_revision)
                    .await?
                    .context("the policy changed meanwhile")?;
                let put = ms(t.elapsed());
                Ok((get, put))
            })
        })?;
    Ok((median(startup), get, put))
}

fn breakdown(n: usize, pod_ips: &[Ipv4Addr], ctl: (f64, f64, f64)) -> anyhow::Result<Breakdown> {
    let yaml0 = cluster_policy(n, 0);
    let yaml1 = cluster_policy(n, 1);
    let t = Instant::now();
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&yaml1)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<_, _>>()?;
    let ctl_yaml_to_value_ms = ms(t.elapsed());
    drop(docs);
    let t = Instant::now();
    let manifests = dataplane::ctl::manifest::parse(&yaml1)?;
    let ctl_yaml_parse_ms = ms(t.elapsed());
    let stored = serde_json::to_vec(&manifests[0].value)?;
    let t = Instant::now();
    let p: NetworkPolicy = serde_json::from_slice(&stored)?;
    let decode_ms = ms(t.elapsed());
    let t = Instant::now();
    let policy = resolve::Policy::parse(Some("default"), &p).map_err(anyhow::Error::msg)?;
    let policy_parse_ms = ms(t.elapsed());
    let endpoints: Vec<Endpoint> = pod_ips
        .iter()
        .map(|ip| Endpoint {
            namespace: "default".to_owned(),
            ip: *ip,
            labels: labels(&[
                ("projectcalico.org/namespace", "default".to_owned()),
                ("projectcalico.org/orchestrator", "k8s".to_owned()),
            ]),
            ports: Vec::new(),
        })
        .collect();
    let namespaces = BTreeMap::new();
    let t = Instant::now();
    let r = Resolver::new(&endpoints, &namespaces, [&policy]);
    let rules = r
        .rules_for(&endpoints[0], true)
        .context("no ingress rules")?;
    std::hint::black_box(r.rules_for(&endpoints[0], false));
    let resolve_ms = ms(t.elapsed());
    let t = Instant::now();
    let e1 = compile::compile(2, &rules, MAX_ENTRIES_PER_POLICY)?;
    let compile_ms = ms(t.elapsed());
    // The previous version, as the agent would have it in the maps.
    let p0: NetworkPolicy =
        serde_json::from_value(dataplane::ctl::manifest::parse(&yaml0)?[0].value.clone())?;
    let policy0 = resolve::Policy::parse(Some("default"), &p0).map_err(anyhow::Error::msg)?;
    let r0 = Resolver::new(&endpoints, &namespaces, [&policy0]);
    let rules0 = r0.rules_for(&endpoints[0], true).context("no rules")?;
    let e0 = compile::compile(1, &rules0, MAX_ENTRIES_PER_POLICY)?;
    let mut obj = TestObject::load();
    write_entries(&mut obj, &e0)?;
    let write = write_entries(&mut obj, &e1)?;
    let remove = remove_entries(&mut obj, &e0)?;
    Ok(Breakdown {
        ctl_startup_ms: ctl.0,
        ctl_yaml_parse_ms,
        ctl_yaml_to_value_ms,
        ctl_etcd_get_ms: ctl.1,
        ctl_etcd_put_ms: ctl.2,
        decode_ms,
        policy_parse_ms,
        resolve_ms,
        compile_ms,
        entries: e1.len(),
        write_ms: ms(write),
        remove_ms: ms(remove),
        stored_bytes: stored.len(),
    })
}

/// CPU time of every thread of process `pid` so far (scheduler statistics), in ms.
fn process_cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

/// CPU time (user + system) of this process (`RUSAGE_SELF`) or of its waited-for children
/// (`RUSAGE_CHILDREN`), in ms.
fn rusage_cpu_ms(who: i32) -> f64 {
    // SAFETY: getrusage fills the struct it is given; it is plain old data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a pointer to a live rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Asks the agents to log their reconciles (`applied … took`) when nothing else runs yet.
fn agent_debug_log() -> bool {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    if threads != 1 {
        return false;
    }
    // SAFETY: this process has a single thread (checked just above), so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("DATAPLANE_LOG", "warn,dataplane::sync=debug") };
    true
}

fn apply_bench(quick: bool) -> anyhow::Result<ApplyReport> {
    let (n, updates) = if quick { (1_000, 2) } else { (10_000, 5) };
    println!(
        "policy apply: one NetworkPolicy of {n} rules over 6 pods on 3 nodes, `ctl apply --wait`, created then {updates} one-rule updates"
    );
    let debug_log = agent_debug_log();
    if !debug_log {
        println!("  (other threads are running: agents keep their default log level)");
    }
    let d = Deployment::start("Always", 2);
    let etcd = d
        .cluster
        .etcd
        .as_ref()
        .map(|e| e.endpoint())
        .context("no etcd")?;
    let dir = tempfile::tempdir()?;
    let mut samples = Vec::new();
    for version in 0..=updates {
        // Applied as JSON (a large policy is written by tools, not by hand; ctl reads JSON
        // several times faster than YAML). The YAML timings above show the difference.
        let file = dir.path().join(format!("policy-{version}.json"));
        let doc: serde_json::Value = serde_yaml_ng::from_str(&cluster_policy(n, version))?;
        std::fs::write(&file, serde_json::to_string(&doc)?)?;
        let before: Vec<BTreeMap<u32, EndpointValue>> = d
            .pins
            .iter()
            .map(|p| dataplane::maps::read_endpoints(&p.path))
            .collect::<Result<_, _>>()?;
        let logs: Vec<usize> = d.agents.iter().map(|a| a.log_text().len()).collect();
        let file_arg = file.display().to_string();
        let agent_pids: Vec<u32> = d.agents.iter().map(|a| a.process.pid()).collect();
        let etcd_pid = d.cluster.etcd.as_ref().map_or(0, |e| e.process.pid());
        let cpu_before: Vec<f64> = agent_pids.iter().map(|&p| process_cpu_ms(p)).collect();
        let etcd_before = process_cpu_ms(etcd_pid);
        let children_before = rusage_cpu_ms(libc::RUSAGE_CHILDREN);
        let t0 = Instant::now();
        let (enforced, (status, out, err), wall) = std::thread::scope(|s| {
            let poller = s.spawn(|| -> anyhow::Result<(Vec<f64>, f64)> {
                let cpu0 = rusage_cpu_ms(libc::RUSAGE_THREAD);
                let maps: Vec<aya::maps::HashMap<MapData, u32, EndpointValue>> = d
                    .pins
                    .iter()
                    .map(|p| -> anyhow::Result<_> {
                        let path = dataplane::bpffs::maps_dir(&p.path).join(map_names::ENDPOINTS);
                        Ok(aya::maps::HashMap::try_from(Map::HashMap(
                            MapData::from_pin(&path)?,
                        ))?)
                    })
                    .collect::<Result<_, _>>()?;
                let mut done: Vec<Option<f64>> = vec![None; d.pins.len()];
                while done.iter().any(Option::is_none) {
                    for (i, map) in maps.iter().enumerate() {
                        if done[i].is_some() {
                            continue;
                        }
                        let mut seen = 0;
                        let mut switched = true;
                        for entry in map.iter() {
                            let (k, v) = entry?;
                            seen += 1;
                            switched &= v.ingress_policy != POLICY_NONE
                                && before[i].get(&k).map(|b| b.ingress_policy)
                                    != Some(v.ingress_policy);
                        }
                        let switched = switched && seen > 0;
                        if switched {
                            done[i] = Some(ms(t0.elapsed()));
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(120) {
                        bail!("the policy not in every node's endpoints after 120 s");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok((
                    done.into_iter().flatten().collect(),
                    rusage_cpu_ms(libc::RUSAGE_THREAD) - cpu0,
                ))
            });
            let r = dataplane(
                &d.cluster.nodes[0].ns,
                &[
                    "ctl",
                    "--etcd-endpoints",
                    &etcd,
                    "apply",
                    "--wait",
                    "--wait-timeout",
                    "120",
                    "-f",
                    &file_arg,
                ],
            );
            let wall = ms(t0.elapsed());
            (poller.join(), r, wall)
        });
        if !status.success() {
            bail!("ctl apply failed: {out}{err}");
        }
        let agents_cpu_ms: Vec<f64> = agent_pids
            .iter()
            .zip(&cpu_before)
            .map(|(&p, b)| process_cpu_ms(p) - b)
            .collect();
        let etcd_cpu_ms = process_cpu_ms(etcd_pid) - etcd_before;
        let ctl_cpu_ms = rusage_cpu_ms(libc::RUSAGE_CHILDREN) - children_before;
        let (enforced, poller_cpu_ms) = match enforced {
            Ok(r) => r?,
            Err(_) => bail!("the endpoint poller panicked"),
        };
        // `… in force on 3 nodes (123 ms)`
        let in_force = out
            .lines()
            .find_map(|l| l.split_once("in force on ").map(|(_, r)| r.to_owned()))
            .with_context(|| format!("no `in force` in {out:?}"))?;
        let nodes: usize = in_force
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let in_force_ms: f64 = in_force
            .split_once('(')
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no figure in {in_force:?}"))?;
        let agents = debug_log.then(|| {
            d.agents
                .iter()
                .zip(&logs)
                .map(|(a, &from)| agent_applies(&a.log_text(), from))
                .collect::<Vec<_>>()
        });
        let sample = ApplySample {
            change: if version == 0 {
                "created".to_owned()
            } else {
                "one rule changed".to_owned()
            },
            wall_ms: wall,
            in_force_ms,
            ctl_before_wait_ms: wall - in_force_ms,
            in_force_nodes: nodes,
            enforced_ms: enforced.iter().copied().fold(0.0, f64::max),
            enforced_per_node_ms: enforced,
            agents,
            agents_cpu_ms,
            etcd_cpu_ms,
            ctl_cpu_ms,
            poller_cpu_ms,
        };
        let took = sample.agents.as_ref().map_or("-".to_owned(), |a| {
            a.iter()
                .map(|a| format!("{:.0}", a.took_ms))
                .collect::<Vec<_>>()
                .join("/")
        });
        let per = |v: &[f64]| {
            v.iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        println!(
            "  {:<17} wall {:>4.0} ms, in force {:>4.0} ms on {} nodes, endpoints switched after {:>4.0} ms (per node {}), agents took {} ms; CPU ms: agents {}, etcd {:.0}, ctl {:.0}, poller {:.0}",
            sample.change,
            sample.wall_ms,
            sample.in_force_ms,
            sample.in_force_nodes,
            sample.enforced_ms,
            per(&sample.enforced_per_node_ms),
            took,
            per(&sample.agents_cpu_ms),
            sample.etcd_cpu_ms,
            sample.ctl_cpu_ms,
            sample.poller_cpu_ms
        );
        samples.push(sample);
    }
    let pod_ips: Vec<Ipv4Addr> = d.pods.iter().map(|p| p.ip).collect();
    let (nodes, pods) = (d.pins.len(), d.pods.len());
    let last = dataplane::ctl::manifest::parse(&cluster_policy(n, updates))?;
    let ctl = ctl_steps(&d, &etcd, &last[0])?;
    drop(d);
    let b = breakdown(n, &pod_ips, ctl)?;
    println!(
        "  the same steps one by one here: ctl: start {:.0} ms, YAML {:.0} ms (to a value {:.0} ms), etcd get {:.0} ms, put {:.0} ms; agent: decode {:.0} ms, parse {:.0} ms, resolve {:.0} ms, compile {:.0} ms, write {} entries {:.0} ms, remove the old {:.0} ms ({} KiB stored)",
        b.ctl_startup_ms,
        b.ctl_yaml_parse_ms,
        b.ctl_yaml_to_value_ms,
        b.ctl_etcd_get_ms,
        b.ctl_etcd_put_ms,
        b.decode_ms,
        b.policy_parse_ms,
        b.resolve_ms,
        b.compile_ms,
        b.entries,
        b.write_ms,
        b.remove_ms,
        b.stored_bytes / 1024
    );
    let updates_of = |f: fn(&ApplySample) -> f64| median(samples[1..].iter().map(f).collect());
    Ok(ApplyReport {
        rules: n,
        nodes,
        pods,
        update_wall_ms_median: updates_of(|s| s.wall_ms),
        update_in_force_ms_median: updates_of(|s| s.in_force_ms),
        update_enforced_ms_median: updates_of(|s| s.enforced_ms),
        samples,
        breakdown: b,
    })
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub quick: bool,
    pub verdict: VerdictReport,
    pub compile: CompileReport,
    pub apply: ApplyReport,
}

pub fn run(quick: bool) -> anyhow::Result<Report> {
    Ok(Report {
        bench: "policy",
        quick,
        verdict: verdict_bench(quick)?,
        compile: compile_bench(quick)?,
        apply: apply_bench(quick)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's LPM trie (kernel/bpf/lpm_trie.c), insert and lookup, counting the nodes a
    /// lookup reads.
    #[derive(Default)]
    struct Trie {
        /// (prefix length, bits, children); index 0 unused.
        nodes: Vec<(u32, u128, [usize; 2])>,
        root: usize,
    }

    fn bit(v: u128, i: u32) -> usize {
        usize::from(v >> (127 - i) & 1 == 1)
    }

    fn matchlen(a: (u32, u128), b: (u32, u128)) -> u32 {
        (a.1 ^ b.1).leading_zeros().min(a.0).min(b.0)
    }

    impl Trie {
        fn insert(&mut self, len: u32, bits: u128, max: u32) {
            if self.nodes.is_empty() {
                self.nodes.push((0, 0, [0, 0]));
            }
            let new = self.nodes.len();
            self.nodes.push((len, bits, [0, 0]));
            let mut parent: Option<(usize, usize)> = None;
            let mut at = self.root;
            let mut m = 0;
            while at != 0 {
                let n = self.nodes[at];
                m = matchlen((n.0, n.1), (len, bits));
                if n.0 != m || n.0 == len || n.0 == max {
                    break;
                }
                let b = bit(bits, n.0);
                parent = Some((at, b));
                at = n.2[b];
            }
            let replace = |t: &mut Self, with: usize| match parent {
                Some((p, b)) => t.nodes[p].2[b] = with,
                None => t.root = with,
            };
            if at == 0 {
                return replace(self, new);
            }
            let n = self.nodes[at];
            if n.0 == m && n.0 == len {
                self.nodes[new].2 = n.2;
                return replace(self, new);
            }
            if m == len {
                self.nodes[new].2[bit(n.1, m)] = at;
                return replace(self, new);
            }
            let im = self.nodes.len();
            let mut children = [0; 2];
            children[bit(bits, m)] = new;
            children[1 - bit(bits, m)] = at;
            self.nodes.push((m, n.1, children));
            replace(self, im);
        }

        fn visited(&self, key: u128, max: u32) -> usize {
            let (mut at, mut count) = (self.root, 0);
            while at != 0 {
                count += 1;
                let n = self.nodes[at];
                let m = matchlen((n.0, n.1), (max, key));
                if m == max || m < n.0 {
                    break;
                }
                at = n.2[bit(key, n.0)];
            }
            count
        }
    }

    #[test]
    fn trie_path_matches_the_kernels_walk() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let max = 16;
        let mut deepest = 0;
        for _ in 0..500 {
            let mut t = Trie::default();
            let mut entries = BTreeMap::new();
            for _ in 0..(next() % 40) {
                let len = (next() % (u64::from(max) + 1)) as u32;
                let v = u128::from(next() as u16) << 112;
                let v = if len == 0 {
                    0
                } else {
                    v >> (128 - len) << (128 - len)
                };
                entries.insert((len, v), ());
            }
            for &(len, v) in entries.keys() {
                t.insert(len, v, max);
            }
            for _ in 0..20 {
                let key = u128::from(next() as u16) << 112;
                let visited = t.visited(key, max);
                assert_eq!(
                    trie_nodes_visited(entries.keys().copied(), key),
                    visited,
                    "{entries:?} key {key:#x}"
                );
                deepest = deepest.max(visited);
            }
        }
        assert!(deepest >= 5, "the cases are too shallow: {deepest}");
    }
}

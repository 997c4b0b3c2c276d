//! The agent's control-plane costs in process, no cluster (issue 6), each old way and new way
//! side by side in one run, rounds interleaved:
//!
//! 1. **Map writes** of one policy of N rules (the apply bench's policy: N − 1 rules of one /32
//!    on one port, then TCP to the echo port), compiled, into a loaded object's four policy
//!    maps: one syscall per entry (how the agent wrote before) against the batched writes the
//!    agent uses now (`BPF_MAP_UPDATE_BATCH`), then the removals likewise. Goal: ≤ 16 ms for
//!    the writes of 10,000 rules.
//! 2. **Endpoint events under N rules**: a model with that policy (every tenth rule a selector
//!    instead of a /32, so that sets exist), 1 local endpoint and growing numbers of remote
//!    ones; per event (a remote pod added that no selector picks; the local pod relabelled so
//!    that a selector's set changes) the time of `Model::desired` with the rule cache (what
//!    the agent runs) and from scratch (`desired_uncached`: every endpoint resolved again,
//!    what every event cost before the cache).

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Map, lpm_trie::Key};
use dataplane::{
    maps::{exact_entries, lpm_entries},
    policy::compile::Tables,
    sync::Model,
};
use dataplane_common::{PolicyIpKey, PolicyPortKey, Verdict, map_names};
use dataplane_tests::packets::TestObject;
use serde::Serialize;
use serde_json::json;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Serialize)]
pub struct MapWrites {
    pub rules: usize,
    pub entries: usize,
    pub rounds: usize,
    pub single_write_ms: f64,
    pub batch_write_ms: f64,
    pub single_remove_ms: f64,
    pub batch_remove_ms: f64,
    /// Median of the per-round ratios single / batch, writes.
    pub write_speedup: f64,
}

fn fd(obj: &TestObject, name: &str) -> anyhow::Result<OwnedFd> {
    match obj.ebpf.map(name) {
        Some(Map::LpmTrie(m) | Map::HashMap(m)) => Ok(m.fd().as_fd().try_clone_to_owned()?),
        _ => anyhow::bail!("no map {name}"),
    }
}

/// The policy maps of a loaded object, written both ways.
struct Maps {
    obj: TestObject,
    fds: [OwnedFd; 4],
}

impl Maps {
    fn new() -> anyhow::Result<Self> {
        let obj = TestObject::load();
        let fds = [
            fd(&obj, map_names::POLICY_IP)?,
            fd(&obj, map_names::POLICY_IP_EXACT)?,
            fd(&obj, map_names::POLICY_PORT)?,
            fd(&obj, map_names::POLICY_PORT_EXACT)?,
        ];
        Ok(Self { obj, fds })
    }

    fn write_single(&mut self, t: &Tables) {
        // The test object's own writer: one syscall per entry, in the agent's former order.
        let mut ip: aya::maps::LpmTrie<&mut aya::maps::MapData, PolicyIpKey, u32> =
            aya::maps::LpmTrie::try_from(self.obj.ebpf.map_mut(map_names::POLICY_IP).unwrap())
                .unwrap();
        for (&(plen, k), v) in &t.ip_lpm {
            ip.insert(&Key::new(plen, k), *v, 0).unwrap();
        }
        let mut ipx: aya::maps::HashMap<&mut aya::maps::MapData, PolicyIpKey, u32> =
            aya::maps::HashMap::try_from(
                self.obj.ebpf.map_mut(map_names::POLICY_IP_EXACT).unwrap(),
            )
            .unwrap();
        for (k, v) in &t.ip_exact {
            ipx.insert(k, *v, 0).unwrap();
        }
        let mut port: aya::maps::LpmTrie<&mut aya::maps::MapData, PolicyPortKey, Verdict> =
            aya::maps::LpmTrie::try_from(self.obj.ebpf.map_mut(map_names::POLICY_PORT).unwrap())
                .unwrap();
        for (&(plen, k), v) in &t.port_lpm {
            port.insert(&Key::new(plen, k), *v, 0).unwrap();
        }
        let mut portx: aya::maps::HashMap<&mut aya::maps::MapData, PolicyPortKey, Verdict> =
            aya::maps::HashMap::try_from(
                self.obj.ebpf.map_mut(map_names::POLICY_PORT_EXACT).unwrap(),
            )
            .unwrap();
        for (k, v) in &t.port_exact {
            portx.insert(k, *v, 0).unwrap();
        }
    }

    fn remove_single(&mut self, t: &Tables) {
        let mut portx: aya::maps::HashMap<&mut aya::maps::MapData, PolicyPortKey, Verdict> =
            aya::maps::HashMap::try_from(
                self.obj.ebpf.map_mut(map_names::POLICY_PORT_EXACT).unwrap(),
            )
            .unwrap();
        for k in t.port_exact.keys() {
            portx.remove(k).unwrap();
        }
        let mut port: aya::maps::LpmTrie<&mut aya::maps::MapData, PolicyPortKey, Verdict> =
            aya::maps::LpmTrie::try_from(self.obj.ebpf.map_mut(map_names::POLICY_PORT).unwrap())
                .unwrap();
        for &(plen, k) in t.port_lpm.keys() {
            port.remove(&Key::new(plen, k)).unwrap();
        }
        let mut ipx: aya::maps::HashMap<&mut aya::maps::MapData, PolicyIpKey, u32> =
            aya::maps::HashMap::try_from(
                self.obj.ebpf.map_mut(map_names::POLICY_IP_EXACT).unwrap(),
            )
            .unwrap();
        for k in t.ip_exact.keys() {
            ipx.remove(k).unwrap();
        }
        let mut ip: aya::maps::LpmTrie<&mut aya::maps::MapData, PolicyIpKey, u32> =
            aya::maps::LpmTrie::try_from(self.obj.ebpf.map_mut(map_names::POLICY_IP).unwrap())
                .unwrap();
        for &(plen, k) in t.ip_lpm.keys() {
            ip.remove(&Key::new(plen, k)).unwrap();
        }
    }

    fn write_batch(&self, t: &Tables) -> anyhow::Result<()> {
        let e = |e: std::io::Error| e.to_string();
        let (k, v) = lpm_entries(&t.ip_lpm);
        dataplane::batch::update(self.fds[0].as_fd(), &k, &v, never, e)
            .map_err(anyhow::Error::msg)?;
        let (k, v) = exact_entries(&t.ip_exact);
        dataplane::batch::update(self.fds[1].as_fd(), &k, &v, never, e)
            .map_err(anyhow::Error::msg)?;
        let (k, v) = lpm_entries(&t.port_lpm);
        dataplane::batch::update(self.fds[2].as_fd(), &k, &v, never, e)
            .map_err(anyhow::Error::msg)?;
        let (k, v) = exact_entries(&t.port_exact);
        dataplane::batch::update(self.fds[3].as_fd(), &k, &v, never, e).map_err(anyhow::Error::msg)
    }

    fn remove_batch(&self, t: &Tables) -> anyhow::Result<()> {
        let e = |e: std::io::Error| e.to_string();
        let k: Vec<_> = t.port_exact.keys().copied().collect();
        dataplane::batch::delete(self.fds[3].as_fd(), &k, never_one, e)
            .map_err(anyhow::Error::msg)?;
        let k: Vec<_> = t.port_lpm.keys().map(|&(p, k)| Key::new(p, k)).collect();
        dataplane::batch::delete(self.fds[2].as_fd(), &k, never_one, e)
            .map_err(anyhow::Error::msg)?;
        let k: Vec<_> = t.ip_exact.keys().copied().collect();
        dataplane::batch::delete(self.fds[1].as_fd(), &k, never_one, e)
            .map_err(anyhow::Error::msg)?;
        let k: Vec<_> = t.ip_lpm.keys().map(|&(p, k)| Key::new(p, k)).collect();
        dataplane::batch::delete(self.fds[0].as_fd(), &k, never_one, e).map_err(anyhow::Error::msg)
    }
}

fn never<K, V>(_: &K, _: &V) -> Result<(), String> {
    Err("the map took no batch".into())
}

fn never_one<K>(_: &K) -> Result<(), String> {
    Err("the map took no batch".into())
}

/// The apply bench's policy of `n` rules, compiled as one endpoint's ingress.
fn compiled(n: usize) -> anyhow::Result<Tables> {
    let mut m = Model::default();
    let rules: Vec<serde_json::Value> = (0..n as u32 - 1)
        .map(|i| {
            json!({"action": "Allow", "protocol": "TCP",
                "source": {"nets": [format!("{}/32", Ipv4Addr::from(0x0a80_0000 + i))]},
                "destination": {"ports": [1024 + (i % 64_000) as u16]}})
        })
        .chain(std::iter::once(
            json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [7000]}}),
        ))
        .collect();
    put(
        &mut m,
        "/calico/resources/v3/projectcalico.org/networkpolicies/default/bench",
        json!({"kind": "NetworkPolicy", "metadata": {"name": "bench", "namespace": "default"},
               "spec": {"selector": "all()", "types": ["Ingress"], "ingress": rules}}),
    );
    wep(&mut m, 0, "node-1", "web");
    let d = m.desired("node-1", |_| Some(1));
    let rules = d.rules[&1][0].clone().context("no rules")?;
    Ok(
        dataplane::policy::compile::compile(1, &rules, dataplane::sync::MAX_ENTRIES_PER_POLICY)?
            .tables(),
    )
}

fn map_writes(n: usize, rounds: usize) -> anyhow::Result<MapWrites> {
    let t = compiled(n)?;
    let entries = t.ip_exact.len() + t.ip_lpm.len() + t.port_exact.len() + t.port_lpm.len();
    let mut maps = Maps::new()?;
    let (mut sw, mut bw, mut sr, mut br, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so that neither always runs on a warmer machine.
        let mut one = |batch: bool| -> anyhow::Result<(f64, f64)> {
            let t0 = Instant::now();
            if batch {
                maps.write_batch(&t)?;
            } else {
                maps.write_single(&t);
            }
            let w = ms(t0.elapsed());
            let t0 = Instant::now();
            if batch {
                maps.remove_batch(&t)?;
            } else {
                maps.remove_single(&t);
            }
            Ok((w, ms(t0.elapsed())))
        };
        let (s, b) = if round % 2 == 0 {
            let s = one(false)?;
            (s, one(true)?)
        } else {
            let b = one(true)?;
            (one(false)?, b)
        };
        sw.push(s.0);
        sr.push(s.1);
        bw.push(b.0);
        br.push(b.1);
        ratio.push(s.0 / b.0);
    }
    Ok(MapWrites {
        rules: n,
        entries,
        rounds,
        single_write_ms: median(sw),
        batch_write_ms: median(bw),
        single_remove_ms: median(sr),
        batch_remove_ms: median(br),
        write_speedup: median(ratio),
    })
}

fn put(m: &mut Model, key: &str, v: serde_json::Value) {
    m.apply(key, Some(v.to_string().as_bytes()));
}

fn wep(m: &mut Model, i: usize, node: &str, app: &str) {
    let ip = Ipv4Addr::from(0x0a41_0000u32 + i as u32 + 2);
    put(
        m,
        &format!(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/{}-k8s-p{i}-eth0",
            node.replace('-', "--")
        ),
        json!({"metadata": {"name": "x", "namespace": "default", "labels": {"app": app}},
               "spec": {"node": node, "pod": format!("p{i}"), "interfaceName": format!("cali{i}"),
                        "mac": "02:00:00:00:00:01", "ipNetworks": [format!("{ip}/32")]}}),
    );
}

#[derive(Debug, Serialize)]
pub struct EndpointEvents {
    pub rules: usize,
    pub local_endpoints: usize,
    /// Remote endpoints added, one event each (no selector picks them).
    pub remote_events: usize,
    pub remote_cached_p50_ms: f64,
    pub remote_uncached_p50_ms: f64,
    /// Local pods relabelled, one event each (a selector's set changes: rules change).
    pub relabel_events: usize,
    pub relabel_cached_p50_ms: f64,
    pub relabel_uncached_p50_ms: f64,
    /// 1,000 remote endpoint events at the p50s above, in seconds.
    pub thousand_events_cached_s: f64,
    pub thousand_events_uncached_s: f64,
}

fn endpoint_events(n: usize, events: usize) -> anyhow::Result<EndpointEvents> {
    // One: from scratch is then what the agent did per event before the cache (endpoints
    // with the same policies shared one resolution).
    const LOCAL: usize = 1;
    let mut m = Model::default();
    for i in 0..LOCAL {
        wep(&mut m, i, "node-1", &format!("g{}", i % 5));
    }
    let rules: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            if i % 10 == 9 {
                json!({"action": "Allow", "protocol": "TCP",
                       "source": {"selector": format!("app == 'g{}'", i / 10 % 5)},
                       "destination": {"ports": [1000 + i % 20_000]}})
            } else {
                json!({"action": "Allow", "protocol": "TCP",
                       "source": {"nets": [format!("{}/32", Ipv4Addr::from(0x0ac8_0000u32 + i as u32))]},
                       "destination": {"ports": [1000 + i % 20_000]}})
            }
        })
        .collect();
    put(
        &mut m,
        "/calico/resources/v3/projectcalico.org/networkpolicies/default/scale",
        json!({"kind": "NetworkPolicy", "metadata": {"name": "scale", "namespace": "default"},
               "spec": {"selector": "all()", "types": ["Ingress"], "ingress": rules}}),
    );
    let idx = |name: &str| {
        name.strip_prefix("cali")?
            .parse::<u32>()
            .ok()
            .map(|i| i + 1)
    };
    std::hint::black_box(m.desired("node-1", idx));
    let (mut rc, mut ru, mut lc, mut lu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..events {
        wep(&mut m, 1000 + i, "node-2", "none");
        // Interleaved: the cached one first, then the same state from scratch.
        let t = Instant::now();
        let cached = m.desired("node-1", idx);
        rc.push(ms(t.elapsed()));
        let t = Instant::now();
        let full = m.desired_uncached("node-1", idx);
        ru.push(ms(t.elapsed()));
        anyhow::ensure!(cached == full, "the cache disagrees after remote event {i}");
    }
    for i in 0..events {
        put(
            &mut m,
            "/calico/k8s/pods/default/p0",
            json!({"metadata": {"name": "p0", "namespace": "default",
                   "labels": {"app": format!("g{}", (i + 1) % 5)}}, "spec": {}}),
        );
        let t = Instant::now();
        let cached = m.desired("node-1", idx);
        lc.push(ms(t.elapsed()));
        let t = Instant::now();
        let full = m.desired_uncached("node-1", idx);
        lu.push(ms(t.elapsed()));
        anyhow::ensure!(
            cached == full,
            "the cache disagrees after relabel event {i}"
        );
    }
    let (rc, ru) = (median(rc), median(ru));
    Ok(EndpointEvents {
        rules: n,
        local_endpoints: LOCAL,
        remote_events: events,
        remote_cached_p50_ms: rc,
        remote_uncached_p50_ms: ru,
        relabel_events: events,
        relabel_cached_p50_ms: median(lc),
        relabel_uncached_p50_ms: median(lu),
        thousand_events_cached_s: rc,
        thousand_events_uncached_s: ru,
    })
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub map_writes: Vec<MapWrites>,
    pub endpoint_events: Vec<EndpointEvents>,
}

pub fn run(quick: bool) -> anyhow::Result<Report> {
    let (rounds, events) = if quick { (3, 10) } else { (9, 40) };
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[10_000, 100_000]
    };
    let mut map_writes_out = Vec::new();
    for &n in sizes {
        let w = map_writes(n, rounds)?;
        println!(
            "map writes, {n} rules ({} entries), {rounds} rounds: write one per syscall {:.1} ms, batched {:.1} ms ({:.1}×); remove {:.1} ms → {:.1} ms",
            w.entries,
            w.single_write_ms,
            w.batch_write_ms,
            w.write_speedup,
            w.single_remove_ms,
            w.batch_remove_ms
        );
        map_writes_out.push(w);
    }
    let mut events_out = Vec::new();
    for &n in sizes {
        let e = endpoint_events(n, events)?;
        println!(
            "endpoint events under {n} rules, {} local endpoints: remote pod added p50 {:.2} ms cached / {:.1} ms from scratch; local relabel (a set changes) p50 {:.1} ms / {:.1} ms",
            e.local_endpoints,
            e.remote_cached_p50_ms,
            e.remote_uncached_p50_ms,
            e.relabel_cached_p50_ms,
            e.relabel_uncached_p50_ms
        );
        events_out.push(e);
    }
    Ok(Report {
        bench: "control-plane",
        map_writes: map_writes_out,
        endpoint_events: events_out,
    })
}

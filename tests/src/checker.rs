//! A consistency checker for a cluster in a box: compares what etcd holds (IPAM blocks and
//! their allocations, handles, WorkloadEndpoints), what each node's BPF maps hold (endpoints
//! and local routes, through `map-dump --json`) and each node's interfaces and routes, and
//! lists every duplicate, leak or mismatch it finds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane::{
    datastore::WorkloadEndpoint,
    dump::{EndpointRow, RouteRow},
    ipam::{Block, Handle},
};

use crate::{Cluster, PinDirGuard, cluster::kernel_routes, dataplane, netns::run};

const BLOCKS: &str = "/calico/ipam/v2/assignment/ipv4/block/";
const HANDLES: &str = "/calico/ipam/v2/handle/";
const WEPS: &str = "/calico/resources/v3/projectcalico.org/workloadendpoints/";

/// Every key and value under `prefix`, read with etcdctl from etcd's namespace (values are
/// one-line JSON, so etcdctl's key line / value line output splits cleanly).
pub fn etcd_get_prefix(cluster: &Cluster, prefix: &str) -> BTreeMap<String, String> {
    let etcd = cluster.etcd.as_ref().expect("a cluster with etcd");
    let out = run(etcd.ns.command("etcdctl").env("ETCDCTL_API", "3").args([
        "--endpoints",
        &etcd.endpoint(),
        "get",
        "--prefix",
        prefix,
    ]));
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some(((*k).to_owned(), (*v).to_owned())),
            _ => None,
        })
        .collect()
}

/// What the checker counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub blocks: usize,
    pub allocations: usize,
    pub handles: usize,
    pub endpoints: usize,
    /// `cali*` interfaces over all nodes.
    pub veths: usize,
    /// Endpoint entries over all nodes' maps.
    pub map_endpoints: usize,
}

/// A pod the test believes exists: (namespace, pod name).
pub type PodId = (String, String);

/// Checks that etcd, the maps and the interfaces agree with each other and with `expected`,
/// the pods that should exist. Returns the counts, or every problem found.
pub fn check(
    cluster: &Cluster,
    pins: &[PinDirGuard],
    expected: &BTreeSet<PodId>,
) -> Result<Census, Vec<String>> {
    let mut problems = Vec::new();
    let mut census = Census::default();

    // IPAM: every address at most once, every slot either allocated or free, every
    // allocation's handle present with the right count.
    let mut allocated: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut per_handle: BTreeMap<String, u64> = BTreeMap::new();
    for (key, value) in etcd_get_prefix(cluster, BLOCKS) {
        let block: Block = match serde_json::from_str(&value) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{key}: does not parse: {e}"));
                continue;
            }
        };
        census.blocks += 1;
        let size = block.allocations.len();
        let free: BTreeSet<usize> = block.unallocated.iter().copied().collect();
        if free.len() != block.unallocated.len() {
            problems.push(format!("{key}: an ordinal is free twice"));
        }
        for (ordinal, slot) in block.allocations.iter().enumerate() {
            let ip = Ipv4Addr::from(u32::from(block.cidr.network()) + ordinal as u32);
            match slot {
                None if !free.contains(&ordinal) => {
                    problems.push(format!(
                        "{key}: {ip} is neither allocated nor free (leaked)"
                    ));
                }
                Some(_) if free.contains(&ordinal) => {
                    problems.push(format!("{key}: {ip} is allocated and free"));
                }
                Some(attr) => {
                    let handle = block
                        .attributes
                        .get(*attr)
                        .and_then(|a| a.handle_id.clone())
                        .unwrap_or_default();
                    census.allocations += 1;
                    *per_handle.entry(handle.clone()).or_default() += 1;
                    if let Some(other) = allocated.insert(ip, handle.clone()) {
                        problems.push(format!("{ip} allocated twice ({other}, {handle})"));
                    }
                }
                None => {}
            }
        }
        if free.iter().any(|&o| o >= size) {
            problems.push(format!("{key}: a free ordinal is out of the block"));
        }
    }
    let mut handles: BTreeMap<String, u64> = BTreeMap::new();
    for (key, value) in etcd_get_prefix(cluster, HANDLES) {
        let id = key.trim_start_matches(HANDLES).to_owned();
        match serde_json::from_str::<Handle>(&value) {
            Ok(h) => {
                handles.insert(id, h.block.values().sum());
            }
            Err(e) => problems.push(format!("{key}: does not parse: {e}")),
        }
    }
    census.handles = handles.len();
    for (id, n) in &handles {
        let used = per_handle.get(id).copied().unwrap_or(0);
        if used != *n {
            problems.push(format!(
                "handle {id} counts {n} addresses, the blocks give it {used} (leaked handle)"
            ));
        }
    }
    for (id, n) in &per_handle {
        if !handles.contains_key(id) {
            problems.push(format!(
                "{n} addresses held by handle {id:?}, which does not exist"
            ));
        }
    }

    // WorkloadEndpoints: one per expected pod, addresses allocated, no address twice.
    let mut weps: Vec<WorkloadEndpoint> = Vec::new();
    for (key, value) in etcd_get_prefix(cluster, WEPS) {
        match serde_json::from_str(&value) {
            Ok(w) => weps.push(w),
            Err(e) => problems.push(format!("{key}: does not parse: {e}")),
        }
    }
    census.endpoints = weps.len();
    let mut wep_ips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut pods: BTreeSet<PodId> = BTreeSet::new();
    for w in &weps {
        let ns = w.metadata.namespace.clone().unwrap_or_default();
        pods.insert((ns.clone(), w.spec.pod.clone()));
        for net in &w.spec.ip_networks {
            let Some(ip) = net
                .split('/')
                .next()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                problems.push(format!("{ns}/{}: address {net:?}", w.spec.pod));
                continue;
            };
            if let Some(other) = wep_ips.insert(ip, w.spec.pod.clone()) {
                problems.push(format!("{ip} is the address of {other} and {}", w.spec.pod));
            }
            match allocated.get(&ip) {
                None => problems.push(format!("{ns}/{}: {ip} is not allocated", w.spec.pod)),
                Some(h) if *h != format!("k8s-pod-network.{}", w.spec.container_id) => problems
                    .push(format!(
                        "{ns}/{}: {ip} is held by {h}, not its container {}",
                        w.spec.pod, w.spec.container_id
                    )),
                Some(_) => {}
            }
        }
    }
    for ip in allocated.keys().filter(|ip| !wep_ips.contains_key(ip)) {
        problems.push(format!(
            "{ip} is allocated to no endpoint (leaked allocation)"
        ));
    }
    for p in pods.difference(expected) {
        problems.push(format!(
            "endpoint of {p:?}, which should not exist (leaked endpoint)"
        ));
    }
    for p in expected.difference(&pods) {
        problems.push(format!("no endpoint for {p:?}"));
    }

    // Each node: its veths, kernel routes and maps against its endpoints.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let local: BTreeMap<String, Ipv4Addr> = weps
            .iter()
            .filter(|w| w.spec.node == node.name)
            .filter_map(|w| {
                let ip = w
                    .spec
                    .ip_networks
                    .first()?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()?;
                Some((w.spec.interface_name.clone(), ip))
            })
            .collect();
        let links: serde_json::Value =
            serde_json::from_str(&node.ns.ip(&["-j", "link", "show"])).unwrap();
        let veths: BTreeSet<String> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("cali"))
            .map(str::to_owned)
            .collect();
        census.veths += veths.len();
        let want: BTreeSet<String> = local.keys().cloned().collect();
        for v in veths.difference(&want) {
            problems.push(format!(
                "{}: veth {v} belongs to no endpoint (leaked veth)",
                node.name
            ));
        }
        for v in want.difference(&veths) {
            problems.push(format!("{}: endpoint's veth {v} is missing", node.name));
        }
        let routes: BTreeSet<(String, String)> = kernel_routes(&node.ns, &[])
            .into_iter()
            .filter_map(|r| Some((r.dev.filter(|d| d.starts_with("cali"))?, r.dst)))
            .collect();
        let want_routes: BTreeSet<(String, String)> = local
            .iter()
            .map(|(v, ip)| (v.clone(), ip.to_string()))
            .collect();
        if routes != want_routes {
            problems.push(format!(
                "{}: pod routes {routes:?}, endpoints want {want_routes:?}",
                node.name
            ));
        }
        let Some(pin) = pins.get(i) else { continue };
        let dump = |kind: &str| {
            let dir = pin.path.display().to_string();
            dataplane(&node.ns, &["map-dump", kind, "--json", "--bpffs-dir", &dir]).1
        };
        let eps: Vec<EndpointRow> = serde_json::from_str(&dump("endpoints")).unwrap_or_default();
        census.map_endpoints += eps.len();
        let have: BTreeSet<(String, String)> = eps
            .iter()
            .map(|e| {
                (
                    e.iface.clone().unwrap_or_else(|| format!("#{}", e.ifindex)),
                    e.ip.clone(),
                )
            })
            .collect();
        if have != want_routes {
            problems.push(format!(
                "{}: endpoints map {have:?}, endpoints want {want_routes:?}",
                node.name
            ));
        }
        let rows: Vec<RouteRow> = serde_json::from_str(&dump("routes")).unwrap_or_default();
        let have: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.kind == "local workload")
            .map(|r| r.cidr.trim_end_matches("/32").to_owned())
            .collect();
        let want: BTreeSet<String> = local.values().map(Ipv4Addr::to_string).collect();
        if have != want {
            problems.push(format!(
                "{}: local workload routes in the map {have:?}, endpoints want {want:?}",
                node.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(census)
    } else {
        Err(problems)
    }
}

//! Datastore → maps: the agent keeps the routes, endpoints and nodes maps equal to what etcd
//! says. It lists `/calico/` once at a revision, then watches from the next revision; each
//! batch of events updates an in-memory model, the desired map contents are derived from it,
//! and only the entries that differ from what was last written are written or removed. A
//! lost watch (compaction, reconnect) re-lists and converges the same way.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use dataplane_common::{
    EndpointValue, NodeValue, POLICY_NONE, PolicyRuleKey, RouteValue, endpoint_flags, map_names,
    route_flags, route_kind,
};
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::{
    bpffs,
    datastore::{
        Datastore, DatastoreError, IpPool, IpipMode, Node, Pool, WorkloadEndpoint,
        keys::Key as DsKey,
    },
    health::SyncObserver,
    ipam::Block,
    policy::{
        compile::{self, CompiledRule, Tables},
        incremental::RuleCache,
        resolve::{self, NamedPort, Resolver},
        selector::Labels,
    },
};

use crate::datastore::keys::{GLOBAL_NETWORK_POLICIES, NETWORK_POLICIES, PODS};
/// Most verdict entries one compiled policy may take.
pub const MAX_ENTRIES_PER_POLICY: usize = 1 << 20;

/// A pod's labels and named ports, from its stored Kubernetes Pod.
#[derive(Debug, Default, Clone, PartialEq)]
struct PodInfo {
    labels: Labels,
    ports: Vec<crate::datastore::EndpointPort>,
}

/// One local endpoint's policies: ingress and egress rules (`None`: no policy applies).
pub type EndpointRules = [Option<Arc<Vec<CompiledRule>>>; 2];

/// The prefix the agent watches: Calico's resources and IPAM.
pub const PREFIX: &str = "/calico/";

/// What the datastore says, as far as routing is concerned.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pools: BTreeMap<String, Pool>,
    nodes: BTreeMap<String, Ipv4Net>,
    /// Block → the node it is affine to.
    blocks: BTreeMap<Ipv4Net, String>,
    weps: BTreeMap<String, WorkloadEndpoint>,
    /// Namespace → its labels (from the `kns.<ns>` profile).
    namespaces: BTreeMap<String, Labels>,
    /// (namespace, pod) → labels and named ports.
    pods: BTreeMap<(String, String), PodInfo>,
    /// Policy key → parsed policy.
    policies: BTreeMap<String, resolve::Policy>,
    /// Local endpoints kept although etcd no longer has them: etcd's data went back (see
    /// [`Model::hold_local`]) while their veths exist. Released when etcd writes the key
    /// again (or deletes it) or when the veth goes.
    held: BTreeMap<String, WorkloadEndpoint>,
    /// Rule lists kept from one reconcile to the next.
    rule_cache: RuleCacheCell,
}

/// The [`RuleCache`] of a model. A clone starts with an empty one (a cache is only a
/// shortcut: an empty one gives the same rules).
#[derive(Default)]
struct RuleCacheCell(std::sync::Mutex<RuleCache>);

impl Clone for RuleCacheCell {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for RuleCacheCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleCache")
    }
}

/// The contents the maps should have.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeMap<(u32, [u8; 4]), RouteValue>,
    pub endpoints: BTreeMap<u32, EndpointValue>,
    pub nodes: BTreeMap<[u8; 4], NodeValue>,
    /// Local endpoint (ifindex) → its rules; the writer assigns policy ids.
    pub rules: BTreeMap<u32, EndpointRules>,
    /// Local endpoint (ifindex) → `namespace/pod`, for messages.
    pub names: BTreeMap<u32, String>,
}

/// A local pod as the iptables dataplane sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalEndpoint {
    /// Its host veth (`cali…`).
    pub iface: String,
    pub ip: Ipv4Addr,
    pub rules: EndpointRules,
}

/// Pod addresses on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRoute {
    pub dst: Ipv4Net,
    /// The node's address.
    pub via: Ipv4Addr,
    /// The node is on this node's subnet (a direct next hop); else the fabric routes.
    pub same_subnet: bool,
}

/// What the iptables dataplane programs (see [`Model::kernel_view`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KernelView {
    /// Local endpoints in host veth order.
    pub endpoints: Vec<LocalEndpoint>,
    pub remote: Vec<RemoteRoute>,
    /// Every pool: name, CIDR and IP-in-IP mode.
    pub pools: Vec<(String, Ipv4Net, IpipMode)>,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(key, error = %e, "skipping a value that does not parse");
            None
        }
    }
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

impl Model {
    /// Applies one key's new value (`None`: deleted). Keys of no interest are ignored; a value
    /// that does not parse is logged with its key and leaves the model as it was.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) {
        if self.apply_policy_key(key, value) {
            return;
        }
        let Some(parsed) = DsKey::parse(key) else {
            return;
        };
        match (parsed, value) {
            (DsKey::IpPool(name), None) => {
                self.pools.remove(&name);
            }
            (DsKey::IpPool(name), Some(v)) => {
                if let Some(pool) = decode::<IpPool>(key, v) {
                    match pool.validate() {
                        Ok(Some(p)) => {
                            self.pools.insert(name, p);
                        }
                        Ok(None) => {}
                        Err(reason) => warn!(key, %reason, "skipping an invalid pool"),
                    }
                }
            }
            (DsKey::Node(name), None) => {
                self.nodes.remove(&name);
            }
            (DsKey::Node(name), Some(v)) => {
                if let Some(node) = decode::<Node>(key, v) {
                    match node.ipv4_address() {
                        Ok(Some(addr)) => {
                            self.nodes.insert(name, addr);
                        }
                        Ok(None) => {
                            self.nodes.remove(&name);
                        }
                        Err(reason) => warn!(key, %reason, "skipping a node address"),
                    }
                }
            }
            (DsKey::Block(cidr), None) => {
                self.blocks.remove(&cidr);
            }
            (DsKey::Block(cidr), Some(v)) => {
                if let Some(block) = decode::<Block>(key, v) {
                    match block.affine_node() {
                        Some(node) => {
                            self.blocks.insert(cidr, node.to_owned());
                        }
                        None => {
                            self.blocks.remove(&cidr);
                        }
                    }
                }
            }
            (DsKey::WorkloadEndpoint { .. }, None) => {
                self.held.remove(key);
                self.weps.remove(key);
            }
            (DsKey::WorkloadEndpoint { .. }, Some(v)) => {
                self.held.remove(key);
                if let Some(wep) = decode::<WorkloadEndpoint>(key, v) {
                    self.weps.insert(key.to_owned(), wep);
                }
            }
            (DsKey::Profile(name), value) => {
                if let Some(ns) =
                    name.strip_prefix(crate::datastore::keys::NAMESPACE_PROFILE_PREFIX)
                {
                    match value.and_then(|v| decode::<crate::datastore::Profile>(key, v)) {
                        Some(p) => {
                            self.namespaces.insert(ns.to_owned(), p.labels_to_apply());
                        }
                        None if value.is_none() => {
                            self.namespaces.remove(ns);
                        }
                        None => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// Policies and pods; `true` when `key` was one of them.
    fn apply_policy_key(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        if let Some(rest) = key.strip_prefix(PODS) {
            let Some((ns, pod)) = rest.split_once('/') else {
                return true;
            };
            let id = (ns.to_owned(), pod.to_owned());
            match value {
                None => {
                    self.pods.remove(&id);
                }
                Some(v) => {
                    if let Some(p) = decode::<crate::datastore::K8sPod>(key, v) {
                        self.pods.insert(
                            id,
                            PodInfo {
                                labels: p.labels(),
                                ports: p.named_ports(),
                            },
                        );
                    }
                }
            }
            return true;
        }
        let namespace = if let Some(rest) = key.strip_prefix(NETWORK_POLICIES) {
            match rest.split_once('/') {
                Some((ns, _)) => Some(ns),
                None => return true,
            }
        } else if key.starts_with(GLOBAL_NETWORK_POLICIES) {
            None
        } else {
            return false;
        };
        let Some(v) = value else {
            self.policies.remove(key);
            return true;
        };
        let Some(p) = decode::<crate::datastore::policy::NetworkPolicy>(key, v) else {
            return true;
        };
        match resolve::Policy::parse(namespace, &p) {
            Ok(p) => {
                self.policies.insert(key.to_owned(), p);
            }
            Err(reason) => {
                warn!(key, %reason, "skipping a policy that does not parse");
            }
        }
        true
    }

    /// Every endpoint: etcd's and the held ones (whose keys etcd does not have).
    fn all_weps(&self) -> impl Iterator<Item = &WorkloadEndpoint> {
        self.weps.values().chain(self.held.values())
    }

    /// After etcd's data went back, keeps the local endpoints `old` had that etcd no longer
    /// has and whose veth still exists (`veth_exists`): their pods are running, and cutting
    /// them off would turn a restore of the control plane into an outage of workloads that
    /// did nothing wrong. Returns their keys.
    pub fn hold_local(
        &mut self,
        old: &Model,
        me: &str,
        veth_exists: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut kept = Vec::new();
        for (key, wep) in old.weps.iter().chain(&old.held) {
            if wep.spec.node != me
                || self.weps.contains_key(key)
                || !veth_exists(&wep.spec.interface_name)
            {
                continue;
            }
            self.held.insert(key.clone(), wep.clone());
            let ns = wep
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned());
            let id = (ns, wep.spec.pod.clone());
            if let Some(info) = old.pods.get(&id)
                && !self.pods.contains_key(&id)
            {
                self.pods.insert(id, info.clone());
            }
            kept.push(key.clone());
        }
        kept
    }

    /// Releases the held endpoints whose veth is gone (their pod was deleted); returns their
    /// keys.
    pub fn release_gone(&mut self, veth_exists: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|(_, w)| !veth_exists(&w.spec.interface_name))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.held.remove(k);
        }
        gone
    }

    /// How many local endpoints are held (see [`Model::hold_local`]).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Every endpoint of the cluster as policy sees it, keyed by (its WorkloadEndpoint's key,
    /// the address's index), in key order.
    fn policy_endpoints(&self) -> Vec<((String, usize), resolve::Endpoint)> {
        let mut out = Vec::new();
        for (key, wep) in self.weps.iter().chain(&self.held) {
            let ns = wep
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned());
            let pod = self.pods.get(&(ns.clone(), wep.spec.pod.clone()));
            let mut labels = wep.metadata.labels.clone().unwrap_or_default();
            if let Some(p) = pod {
                labels.extend(p.labels.clone());
            }
            labels.insert("projectcalico.org/namespace".to_owned(), ns.clone());
            labels.insert(
                "projectcalico.org/orchestrator".to_owned(),
                "k8s".to_owned(),
            );
            let ports: Vec<NamedPort> = wep
                .spec
                .ports
                .iter()
                .flatten()
                .chain(pod.iter().flat_map(|p| &p.ports))
                .map(|p| NamedPort {
                    name: p.name.clone(),
                    proto: crate::datastore::policy::Protocol::Name(
                        p.protocol.as_str().unwrap_or("TCP").to_owned(),
                    )
                    .number()
                    .unwrap_or(6),
                    port: p.port,
                })
                .collect();
            for (i, net) in wep.spec.ip_networks.iter().enumerate() {
                if let Ok(net) = net.parse::<Ipv4Net>() {
                    out.push((
                        (key.clone(), i),
                        resolve::Endpoint {
                            namespace: ns.clone(),
                            ip: net.addr(),
                            labels: labels.clone(),
                            ports: ports.clone(),
                        },
                    ));
                }
            }
        }
        out
    }

    /// The maps' contents for node `me`. `ifindex` resolves a local pod's host veth.
    pub fn desired(&self, me: &str, ifindex: impl Fn(&str) -> Option<u32>) -> Desired {
        self.desired_with(me, ifindex, false)
    }

    /// [`Model::desired`] with every local endpoint's rules resolved from scratch, one by one,
    /// without the cache: what the cache must give (tests and benches compare the two).
    pub fn desired_uncached(&self, me: &str, ifindex: impl Fn(&str) -> Option<u32>) -> Desired {
        self.desired_with(me, ifindex, true)
    }

    /// [`Model::desired`]; `full`: rules resolved from scratch, bypassing the cache.
    fn desired_with(&self, me: &str, ifindex: impl Fn(&str) -> Option<u32>, full: bool) -> Desired {
        let mut d = Desired::default();
        let my_net = self.nodes.get(me).copied();
        let same_subnet = |addr: Ipv4Addr| my_net.is_some_and(|n| n.trunc().contains(&addr));
        let pool_of = |net: Ipv4Net| self.pools.values().find(|p| p.cidr.contains(&net));
        let mut route = |prefix: u8, addr: Ipv4Addr, v: RouteValue| {
            d.routes.insert((u32::from(prefix), addr.octets()), v);
        };

        for pool in self.pools.values().filter(|p| !p.disabled) {
            let mut flags = 0;
            match pool.ipip_mode {
                IpipMode::Always => flags |= route_flags::IPIP_ALWAYS,
                IpipMode::CrossSubnet => flags |= route_flags::IPIP_CROSS_SUBNET,
                IpipMode::Never => {}
            }
            if pool.nat_outgoing {
                flags |= route_flags::NAT_OUTGOING;
            }
            route(
                pool.cidr.prefix_len(),
                pool.cidr.network(),
                RouteValue {
                    kind: route_kind::POOL,
                    flags,
                    ..RouteValue::default()
                },
            );
        }

        // How traffic to a pod network behind node `owner` travels.
        let remote_flags = |net: Ipv4Net, owner_ip: Ipv4Addr| -> u8 {
            let same = same_subnet(owner_ip);
            let mut flags = if same { route_flags::SAME_SUBNET } else { 0 };
            if let Some(pool) = pool_of(net) {
                let encap = match pool.ipip_mode {
                    IpipMode::Always => true,
                    IpipMode::CrossSubnet => !same,
                    IpipMode::Never => false,
                };
                if encap {
                    flags |= route_flags::IPIP;
                }
                if pool.nat_outgoing {
                    flags |= route_flags::NAT_OUTGOING;
                }
            }
            flags
        };

        for (name, net) in &self.nodes {
            let addr = net.addr();
            if name == me {
                route(
                    32,
                    addr,
                    RouteValue {
                        kind: route_kind::LOCAL_HOST,
                        ..RouteValue::default()
                    },
                );
                continue;
            }
            route(
                32,
                addr,
                RouteValue {
                    kind: route_kind::REMOTE_HOST,
                    next_hop: addr.octets(),
                    flags: if same_subnet(addr) {
                        route_flags::SAME_SUBNET
                    } else {
                        0
                    },
                    ..RouteValue::default()
                },
            );
            d.nodes.insert(
                addr.octets(),
                NodeValue {
                    flags: if same_subnet(addr) {
                        u32::from(route_flags::SAME_SUBNET)
                    } else {
                        0
                    },
                },
            );
        }

        for (block, owner) in &self.blocks {
            if owner == me {
                continue;
            }
            let Some(owner_ip) = self.nodes.get(owner).map(Ipv4Net::addr) else {
                continue;
            };
            route(
                block.prefix_len(),
                block.network(),
                RouteValue {
                    kind: route_kind::REMOTE_BLOCK,
                    flags: remote_flags(*block, owner_ip),
                    next_hop: owner_ip.octets(),
                    ..RouteValue::default()
                },
            );
        }

        let mut local: Vec<(u32, Ipv4Addr)> = Vec::new();
        for wep in self.all_weps() {
            let spec = &wep.spec;
            for net in &spec.ip_networks {
                let Ok(net) = net.parse::<Ipv4Net>() else {
                    continue;
                };
                let ip = net.addr();
                if spec.node == me {
                    let (Some(idx), Some(mac)) =
                        (ifindex(&spec.interface_name), parse_mac(&spec.mac))
                    else {
                        debug!(iface = %spec.interface_name, "local endpoint without its veth yet");
                        continue;
                    };
                    route(
                        32,
                        ip,
                        RouteValue {
                            kind: route_kind::LOCAL_WORKLOAD,
                            ifindex: idx,
                            mac,
                            ..RouteValue::default()
                        },
                    );
                    local.push((idx, ip));
                    d.names.insert(
                        idx,
                        format!(
                            "{}/{}",
                            wep.metadata.namespace.as_deref().unwrap_or("default"),
                            spec.pod
                        ),
                    );
                    d.endpoints.insert(
                        idx,
                        EndpointValue {
                            ip: ip.octets(),
                            mac,
                            flags: 0,
                            ingress_policy: 0,
                            egress_policy: 0,
                        },
                    );
                    continue;
                }
                // A remote pod whose address is borrowed from a block affine to a third node:
                // it needs its own /32 toward the node it runs on.
                let block_owner = self
                    .blocks
                    .iter()
                    .find(|(b, _)| b.contains(&ip))
                    .map(|(_, o)| o.as_str());
                if block_owner != Some(spec.node.as_str())
                    && let Some(node_ip) = self.nodes.get(&spec.node).map(Ipv4Net::addr)
                {
                    route(
                        32,
                        ip,
                        RouteValue {
                            kind: route_kind::REMOTE_BLOCK,
                            flags: remote_flags(net, node_ip),
                            next_hop: node_ip.octets(),
                            ..RouteValue::default()
                        },
                    );
                }
            }
        }
        if full {
            self.desired_rules_full(&mut d, &local);
        } else {
            self.desired_rules(&mut d, &local);
        }
        d
    }

    /// Every node's local endpoints' rules compiled as its agent would compile them, checked
    /// against `limit` entries per endpoint direction and, per node, against the sizes of the
    /// policy maps (the sum over the distinct rule lists of its endpoints). One [`Misfit`] per
    /// endpoint direction over the limit and per node over a map's size.
    pub fn policy_misfits(&self, limit: usize) -> Vec<Misfit> {
        use dataplane_common::{MAX_POLICY_IP, MAX_POLICY_PORT};
        let nodes: BTreeSet<&str> = self.weps.values().map(|w| w.spec.node.as_str()).collect();
        // Compiled once per distinct list: entries of (ip exact, ip trie, port exact, port
        // trie), or how many it needs over the limit.
        let mut compiled: std::collections::HashMap<
            Arc<Vec<CompiledRule>>,
            Result<[usize; 4], compile::TooBig>,
        > = std::collections::HashMap::new();
        let mut out = Vec::new();
        for node in nodes {
            let mut ifaces: Vec<&str> = self
                .weps
                .values()
                .filter(|w| w.spec.node == node)
                .map(|w| w.spec.interface_name.as_str())
                .collect();
            ifaces.sort_unstable();
            ifaces.dedup();
            let d = self.desired(node, |name| {
                ifaces
                    .binary_search(&name)
                    .ok()
                    .and_then(|i| u32::try_from(i + 1).ok())
            });
            let mut lists: std::collections::HashMap<*const Vec<CompiledRule>, [usize; 4]> =
                std::collections::HashMap::new();
            let mut names: BTreeSet<String> = BTreeSet::new();
            for (idx, rules) in &d.rules {
                for (rules, direction) in rules.iter().zip(["ingress", "egress"]) {
                    let Some(rules) = rules else {
                        continue;
                    };
                    let got = compiled
                        .entry(rules.clone())
                        .or_insert_with(|| {
                            compile::compile(1, rules, limit).map(|e| {
                                let t = e.tables();
                                [
                                    t.ip_exact.len(),
                                    t.ip_lpm.len(),
                                    t.port_exact.len(),
                                    t.port_lpm.len(),
                                ]
                            })
                        })
                        .clone();
                    let policies = policy_list(rules);
                    match got {
                        Ok(counts) => {
                            lists.insert(Arc::as_ptr(rules), counts);
                            names.extend(policies);
                        }
                        Err(e) => out.push(Misfit {
                            node: node.to_owned(),
                            endpoint: d.names.get(idx).cloned().unwrap_or_default(),
                            direction,
                            policies,
                            reason: format!(
                                "its rules need at least {} policy map entries, more than the {} one endpoint direction may have",
                                e.needed, e.limit
                            ),
                        }),
                    }
                }
            }
            let maps = [
                (map_names::POLICY_IP_EXACT, MAX_POLICY_IP),
                (map_names::POLICY_IP, MAX_POLICY_IP),
                (map_names::POLICY_PORT_EXACT, MAX_POLICY_PORT),
                (map_names::POLICY_PORT, MAX_POLICY_PORT),
            ];
            for (i, (map, size)) in maps.into_iter().enumerate() {
                let needed: usize = lists.values().map(|c| c[i]).sum();
                if needed > size as usize {
                    out.push(Misfit {
                        node: node.to_owned(),
                        endpoint: String::new(),
                        direction: "",
                        policies: names.iter().cloned().collect(),
                        reason: format!(
                            "its endpoints' rules need {needed} entries in map {map}, which holds {size}"
                        ),
                    });
                }
            }
        }
        out
    }

    /// What the iptables dataplane programs for node `me`: the same derivation as
    /// [`Model::desired`] (so both modes route and decide alike), keyed by host veth name
    /// instead of ifindex: a pod's chains can be written before its veth exists.
    pub fn kernel_view(&self, me: &str) -> KernelView {
        let mut ifaces: Vec<&str> = self
            .all_weps()
            .filter(|w| w.spec.node == me)
            .map(|w| w.spec.interface_name.as_str())
            .collect();
        ifaces.sort_unstable();
        ifaces.dedup();
        // Stand-in ifindexes: positions in `ifaces`, from 1.
        let d = self.desired(me, |name| {
            ifaces
                .binary_search(&name)
                .ok()
                .and_then(|i| u32::try_from(i + 1).ok())
        });
        let endpoints = d
            .endpoints
            .iter()
            .filter_map(|(&id, v)| {
                let iface = (*ifaces.get(usize::try_from(id).ok()? - 1)?).to_owned();
                Some(LocalEndpoint {
                    iface,
                    ip: Ipv4Addr::from(v.ip),
                    rules: d.rules.get(&id).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let remote = d
            .routes
            .iter()
            .filter(|(_, v)| v.kind == route_kind::REMOTE_BLOCK)
            .filter_map(|(&(plen, addr), v)| {
                Some(RemoteRoute {
                    dst: Ipv4Net::new(Ipv4Addr::from(addr), u8::try_from(plen).ok()?).ok()?,
                    via: Ipv4Addr::from(v.next_hop),
                    same_subnet: v.flags & route_flags::SAME_SUBNET != 0,
                })
            })
            .collect();
        KernelView {
            endpoints,
            remote,
            pools: self
                .pools
                .iter()
                .map(|(name, p)| (name.clone(), p.cidr, p.ipip_mode))
                .collect(),
        }
    }

    /// Each local endpoint's rules, shared between endpoints whose rules are the same; only
    /// what an event changed is resolved again (see [`RuleCache`]).
    fn desired_rules(&self, d: &mut Desired, local: &[(u32, Ipv4Addr)]) {
        if local.is_empty() {
            return;
        }
        let endpoints = self.policy_endpoints();
        // A panic while the cache was held leaves it half updated: start from an empty one.
        let mut cache = self.rule_cache.0.lock().unwrap_or_else(|poisoned| {
            let mut g = poisoned.into_inner();
            *g = RuleCache::default();
            g
        });
        d.rules = cache.rules(endpoints, &self.namespaces, self.policies.values(), local);
        debug!(stats = ?cache.stats, "rule lists");
    }

    /// [`Model::desired_rules`] the long way: every local endpoint resolved on its own, from
    /// scratch (the model the cache is checked against).
    fn desired_rules_full(&self, d: &mut Desired, local: &[(u32, Ipv4Addr)]) {
        let endpoints: Vec<resolve::Endpoint> = self
            .policy_endpoints()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let r = Resolver::new(&endpoints, &self.namespaces, self.policies.values());
        let by_ip: std::collections::HashMap<Ipv4Addr, &resolve::Endpoint> =
            endpoints.iter().map(|e| (e.ip, e)).collect();
        for &(idx, ip) in local {
            let Some(ep) = by_ip.get(&ip).copied() else {
                continue;
            };
            let one = |ingress| r.rules_for(ep, ingress).map(Arc::new);
            d.rules.insert(idx, [one(true), one(false)]);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("open pinned map {path}: {source}")]
    Open { path: String, source: Box<MapError> },
    #[error("write map {map}: {source}")]
    Write {
        map: &'static str,
        source: Box<MapError>,
    },
    #[error(transparent)]
    Datastore(#[from] Box<DatastoreError>),
    #[error("compile policy: {0}")]
    Compile(String),
    #[error(transparent)]
    Iptables(#[from] Box<crate::iptables::IptablesError>),
    #[error(transparent)]
    Policy(Box<crate::maps::MapsError>),
}

/// A compiled policy in the maps.
struct Programmed {
    id: u32,
    entries: Tables,
    /// How many rules it has (its rule descriptions are keyed 0..rules).
    rules: u32,
}

/// The maps the sync writes, with what was last written to them.
pub struct MapWriter {
    routes: LpmTrie<MapData, [u8; 4], RouteValue>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    nodes: HashMap<MapData, [u8; 4], NodeValue>,
    policy: crate::maps::PolicyMaps,
    applied: Desired,
    /// Endpoint values as written (with policy ids).
    applied_endpoints: BTreeMap<u32, EndpointValue>,
    /// Compiled policies by their rules.
    programmed: std::collections::HashMap<Arc<Vec<CompiledRule>>, Programmed>,
    /// The same by the address of their key's list (which `programmed` keeps alive): the rule
    /// cache hands out the same `Arc` for the same rules, found without hashing them.
    programmed_ptr: std::collections::HashMap<usize, u32>,
    /// Policy entries found in the maps at start, not (yet) known to be in use.
    orphans: Tables,
    /// Policies no endpoint uses any more, to remove in [`Dataplane::tidy`].
    garbage: Vec<Tables>,
    /// Their rule descriptions, and their ids (whose hit counters go with them).
    garbage_rules: Vec<PolicyRuleKey>,
    garbage_ids: BTreeSet<u32>,
    /// Whether a failure to describe rules was logged at warn level already (a full map
    /// fails every later policy too: one warning says it).
    rules_warned: bool,
    next_id: u32,
    /// Most entries one compiled policy may take.
    entry_limit: usize,
    /// Rule lists that did not fit (too many entries, or the maps full), with why: not
    /// compiled again while they are wanted.
    rejected: std::collections::HashMap<Arc<Vec<CompiledRule>>, String>,
    /// The empty list: a policy that denies everything (what an endpoint whose rules do not
    /// fit gets when it had none in force before).
    deny_all: Arc<Vec<CompiledRule>>,
    /// The endpoints held back by the last apply: their rules do not fit.
    held: Vec<String>,
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub written: usize,
    pub removed: usize,
    /// Policies compiled in this pass (new rule sets).
    pub compiled: usize,
    /// Endpoint directions whose rules stopped fitting in this pass.
    pub newly_held: usize,
}

/// The policies (`namespace/name`, or the name of a global one) `rules` come from, in order.
fn policy_list(rules: &[CompiledRule]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    rules
        .iter()
        .map(|r| {
            r.origin
                .rsplit_once(" #")
                .and_then(|(head, _)| head.rsplit_once(' '))
                .map_or(r.origin.as_str(), |(name, _)| name)
        })
        .filter(|n| seen.insert(*n))
        .map(str::to_owned)
        .collect()
}

/// [`policy_list`] as text, for messages.
fn policy_names(rules: &[CompiledRule]) -> String {
    let names = policy_list(rules);
    if names.is_empty() {
        "no policy".to_owned()
    } else {
        names.join(", ")
    }
}

/// An endpoint direction (or a node's maps) whose rules would not fit: see
/// [`Model::policy_misfits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub node: String,
    /// `namespace/pod`; empty when the node's maps as a whole overflow.
    pub endpoint: String,
    /// `ingress` or `egress`; empty with `endpoint`.
    pub direction: &'static str,
    /// The policies its rules come from, in evaluation order.
    pub policies: Vec<String>,
    pub reason: String,
}

fn open(root: &Path, name: &str) -> Result<MapData, SyncError> {
    let path = bpffs::maps_dir(root).join(name);
    MapData::from_pin(&path).map_err(|source| SyncError::Open {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

fn werr(map: &'static str) -> impl Fn(MapError) -> SyncError {
    move |source| SyncError::Write {
        map,
        source: Box::new(source),
    }
}

impl MapWriter {
    /// Opens the pinned maps under `root` and reads what they hold now (an agent restart
    /// then changes only what differs).
    pub fn open(root: &Path) -> Result<Self, SyncError> {
        let oerr = |name: &str| {
            let path = bpffs::maps_dir(root).join(name).display().to_string();
            move |source| SyncError::Open {
                path,
                source: Box::new(source),
            }
        };
        let routes: LpmTrie<MapData, [u8; 4], RouteValue> =
            LpmTrie::try_from(Map::LpmTrie(open(root, map_names::ROUTES)?))
                .map_err(oerr(map_names::ROUTES))?;
        let endpoints: HashMap<MapData, u32, EndpointValue> =
            HashMap::try_from(Map::HashMap(open(root, map_names::ENDPOINTS)?))
                .map_err(oerr(map_names::ENDPOINTS))?;
        let nodes: HashMap<MapData, [u8; 4], NodeValue> =
            HashMap::try_from(Map::HashMap(open(root, map_names::NODES)?))
                .map_err(oerr(map_names::NODES))?;
        let policy =
            crate::maps::PolicyMaps::open(root).map_err(|e| SyncError::Policy(Box::new(e)))?;
        let mut applied = Desired::default();
        for (k, v) in routes.iter().flatten() {
            applied.routes.insert((k.prefix_len(), k.data()), v);
        }
        let mut applied_endpoints = BTreeMap::new();
        for (k, v) in endpoints.iter().flatten() {
            applied_endpoints.insert(k, v);
        }
        for (k, v) in nodes.iter().flatten() {
            applied.nodes.insert(k, v);
        }
        // Policies compiled by an earlier run are rewritten under new ids (endpoints switch
        // to them one by one), then removed.
        let orphans = policy.read().map_err(|e| SyncError::Policy(Box::new(e)))?;
        let garbage_rules = policy.rule_keys();
        let mut garbage_ids: BTreeSet<u32> = policy.hit_policies();
        garbage_ids.extend(
            orphans
                .ip_exact
                .keys()
                .map(|k| k.policy)
                .chain(orphans.ip_lpm.keys().map(|(_, k)| k.policy))
                .chain(orphans.port_exact.keys().map(|k| k.policy))
                .chain(orphans.port_lpm.keys().map(|(_, k)| k.policy))
                .chain(garbage_rules.iter().map(|k| k.policy)),
        );
        // New ids start past every id still in a map, so no new policy inherits old counts.
        let next_id = garbage_ids.last().copied().unwrap_or(0) + 1;
        Ok(Self {
            routes,
            endpoints,
            nodes,
            policy,
            applied,
            applied_endpoints,
            programmed: std::collections::HashMap::new(),
            programmed_ptr: std::collections::HashMap::new(),
            orphans,
            garbage: Vec::new(),
            garbage_rules,
            garbage_ids,
            rules_warned: false,
            next_id,
            entry_limit: MAX_ENTRIES_PER_POLICY,
            rejected: std::collections::HashMap::new(),
            deny_all: Arc::new(Vec::new()),
            held: Vec::new(),
        })
    }

    /// Lowers the number of entries one compiled policy may take (tests reach the limit this
    /// way with small policies).
    pub fn with_entry_limit(mut self, limit: usize) -> Self {
        self.entry_limit = limit;
        self
    }

    /// The id of `rules`, compiling and writing them first when new; `Ok(Err(why))` when they
    /// do not fit (more entries than one policy may have, or the maps are full): nothing of
    /// them is left in the maps then.
    fn policy_id(
        &mut self,
        rules: &Option<Arc<Vec<CompiledRule>>>,
        c: &mut Changes,
    ) -> Result<Result<u32, String>, SyncError> {
        let Some(rules) = rules else {
            return Ok(Ok(POLICY_NONE));
        };
        if let Some(id) = self.programmed_ptr.get(&(Arc::as_ptr(rules) as usize)) {
            return Ok(Ok(*id));
        }
        if let Some(p) = self.programmed.get(rules) {
            return Ok(Ok(p.id));
        }
        if let Some((_, why)) = self.rejected.remove_entry(rules) {
            // Kept under this `Arc`: the one this apply's endpoints hold (see the `retain`).
            self.rejected.insert(rules.clone(), why.clone());
            return Ok(Err(why));
        }
        let entries = match compile::compile(self.next_id, rules, self.entry_limit) {
            Ok(e) => e.tables(),
            Err(e) => {
                let why = format!(
                    "rules of {} need at least {} map entries, more than the {} one endpoint direction may have",
                    policy_names(rules),
                    e.needed,
                    e.limit
                );
                self.rejected.insert(rules.clone(), why.clone());
                return Ok(Err(why));
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self.policy.write(&entries) {
            if !e.is_full() {
                return Err(SyncError::Policy(Box::new(e)));
            }
            // Nothing refers to `id` yet: take back what was written of it.
            self.policy
                .remove(&entries)
                .map_err(|e| SyncError::Policy(Box::new(e)))?;
            let why = format!(
                "rules of {} need {} map entries and the policy maps are full ({e})",
                policy_names(rules),
                entries.len()
            );
            self.rejected.insert(rules.clone(), why.clone());
            return Ok(Err(why));
        }
        // The descriptions are for inspection only: a full map is not worth failing over.
        if let Err(e) = self
            .policy
            .write_rules(id, rules.iter().map(CompiledRule::meta))
        {
            if std::mem::replace(&mut self.rules_warned, true) {
                debug!(policy = id, error = %e, "describe the rules of a compiled policy for map-dump");
            } else {
                warn!(policy = id, error = %e, "describe the rules of a compiled policy for map-dump (map-dump policy shows the rules past this without their name; further failures are logged at debug level)");
            }
        }
        c.written += entries.len();
        c.compiled += 1;
        self.programmed_ptr.insert(Arc::as_ptr(rules) as usize, id);
        self.programmed.insert(
            rules.clone(),
            Programmed {
                id,
                entries,
                rules: rules.len() as u32,
            },
        );
        Ok(Ok(id))
    }

    /// The endpoints whose rules did not fit at the last apply, each with why and what it
    /// enforces instead.
    pub fn held(&self) -> &[String] {
        &self.held
    }

    fn remove_entries(&mut self, e: &Tables, c: &mut Changes) -> Result<(), SyncError> {
        self.policy
            .remove(e)
            .map_err(|e| SyncError::Policy(Box::new(e)))?;
        c.removed += e.len();
        Ok(())
    }

    /// Makes the maps hold `desired`, touching only entries that differ. New and changed
    /// entries are written before stale ones are removed, so a destination never disappears
    /// in between.
    pub fn apply(&mut self, desired: Desired) -> Result<Changes, SyncError> {
        let mut c = Changes::default();
        for (&(plen, addr), v) in &desired.routes {
            if self.applied.routes.get(&(plen, addr)) != Some(v) {
                self.routes
                    .insert(&Key::new(plen, addr), *v, 0)
                    .map_err(werr(map_names::ROUTES))?;
                c.written += 1;
            }
        }
        // Policies first, then the endpoints that use them: an endpoint switches from one
        // complete policy to another in one map write.
        let mut endpoints = BTreeMap::new();
        let mut ids: std::collections::HashMap<*const Vec<CompiledRule>, Result<u32, String>> =
            std::collections::HashMap::new();
        // Policies in force before this apply: what an endpoint whose new rules do not fit
        // keeps.
        let live: BTreeSet<u32> = self.programmed.values().map(|p| p.id).collect();
        let mut held = Vec::new();
        let mut newly_held = 0;
        for (&k, v) in &desired.endpoints {
            let mut v = *v;
            if let Some([ingress, egress]) = desired.rules.get(&k) {
                let before = self.applied_endpoints.get(&k).copied();
                for (rules, egress) in [(ingress, false), (egress, true)] {
                    // Shared rule lists are looked up once (hashing a list reads all of it).
                    let got = match rules {
                        None => Ok(POLICY_NONE),
                        Some(a) => match ids.get(&Arc::as_ptr(a)) {
                            Some(r) => r.clone(),
                            None => {
                                let r = self.policy_id(rules, &mut c)?;
                                ids.insert(Arc::as_ptr(a), r.clone());
                                r
                            }
                        },
                    };
                    let flag = if egress {
                        endpoint_flags::EGRESS_HELD
                    } else {
                        endpoint_flags::INGRESS_HELD
                    };
                    let id = match got {
                        Ok(id) => id,
                        Err(why) => {
                            // Never a partial rule set: the rules in force before stay (a
                            // label change must not cut a running pod off, nor open it up);
                            // with none in force, everything is denied, as for any endpoint a
                            // policy selects until its rules allow.
                            let kept = before
                                .map(|b| {
                                    if egress {
                                        b.egress_policy
                                    } else {
                                        b.ingress_policy
                                    }
                                })
                                .filter(|id| live.contains(id));
                            let (id, what) = match kept {
                                Some(id) => (id, format!("keeps policy {id}")),
                                None => {
                                    let deny = Some(self.deny_all.clone());
                                    match self.policy_id(&deny, &mut c)? {
                                        Ok(id) => (id, format!("denies all (policy {id})")),
                                        Err(e) => return Err(SyncError::Compile(e)),
                                    }
                                }
                            };
                            let dir = if egress { "egress" } else { "ingress" };
                            let name = desired.names.get(&k).map_or("?", String::as_str);
                            let line = format!("{name} (ifindex {k}) {dir}: {why}; {what}");
                            if before.is_none_or(|b| b.flags & flag == 0) {
                                newly_held += 1;
                                tracing::error!(endpoint = name, ifindex = k, direction = dir, reason = %why, "policy rules do not fit the maps; {what}");
                            }
                            held.push(line);
                            v.flags |= flag;
                            id
                        }
                    };
                    if egress {
                        v.egress_policy = id;
                    } else {
                        v.ingress_policy = id;
                    }
                }
            }
            endpoints.insert(k, v);
        }
        c.newly_held = newly_held;
        self.held = held;
        // Lists no endpoint wants any more are forgotten (a policy change may make them fit).
        self.rejected
            .retain(|rules, _| ids.contains_key(&Arc::as_ptr(rules)));
        for (&k, v) in &endpoints {
            if self.applied_endpoints.get(&k) != Some(v) {
                self.endpoints
                    .insert(k, *v, 0)
                    .map_err(werr(map_names::ENDPOINTS))?;
                c.written += 1;
            }
        }
        for (&k, v) in &desired.nodes {
            if self.applied.nodes.get(&k) != Some(v) {
                self.nodes
                    .insert(k, *v, 0)
                    .map_err(werr(map_names::NODES))?;
                c.written += 1;
            }
        }
        for &(plen, addr) in self.applied.routes.keys() {
            if !desired.routes.contains_key(&(plen, addr)) {
                remove_ok(self.routes.remove(&Key::new(plen, addr)))
                    .map_err(werr(map_names::ROUTES))?;
                c.removed += 1;
            }
        }
        for k in self.applied_endpoints.keys() {
            if !endpoints.contains_key(k) {
                remove_ok(self.endpoints.remove(k)).map_err(werr(map_names::ENDPOINTS))?;
                c.removed += 1;
            }
        }
        // Policies no endpoint uses any more.
        let in_use: BTreeSet<u32> = endpoints
            .values()
            .flat_map(|v| [v.ingress_policy, v.egress_policy])
            .collect();
        let stale: Vec<Arc<Vec<CompiledRule>>> = self
            .programmed
            .iter()
            .filter(|(_, p)| !in_use.contains(&p.id))
            .map(|(k, _)| k.clone())
            .collect();
        // Removed by `tidy`, after the new state is reported: off the path to "in force",
        // and a grace period for packets that read an endpoint's old policy id.
        for k in stale {
            self.programmed_ptr.remove(&(Arc::as_ptr(&k) as usize));
            if let Some(p) = self.programmed.remove(&k) {
                self.garbage.push(p.entries);
                self.garbage_rules
                    .extend((0..p.rules).map(|rule| PolicyRuleKey { policy: p.id, rule }));
                self.garbage_ids.insert(p.id);
            }
        }
        if !self.orphans.is_empty() {
            self.garbage.push(std::mem::take(&mut self.orphans));
        }
        self.applied_endpoints = endpoints;
        for k in self.applied.nodes.keys() {
            if !desired.nodes.contains_key(k) {
                remove_ok(self.nodes.remove(k)).map_err(werr(map_names::NODES))?;
                c.removed += 1;
            }
        }
        self.applied = desired;
        Ok(c)
    }
}

/// A removal of an entry that is already gone is not an error.
fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Where the sync programs what the datastore says: the BPF maps ([`MapWriter`]) or the
/// kernel's routes, iptables and ipsets ([`crate::iptables::Writer`]).
pub trait Dataplane: Send {
    /// What it programs, for the logs.
    const WHAT: &'static str;

    /// Makes node `me`'s dataplane hold what `model` says, touching only what differs.
    fn program(
        &mut self,
        model: &Model,
        me: &str,
    ) -> impl std::future::Future<Output = Result<Changes, SyncError>> + Send;

    /// Removes what the last `program` replaced, once its result is reported. Returns how
    /// many entries went.
    fn tidy(&mut self) -> Result<usize, SyncError> {
        Ok(0)
    }

    /// The endpoints whose rules did not fit at the last `program`, one line each.
    fn held(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Dataplane for MapWriter {
    const WHAT: &'static str = "maps";

    fn program(
        &mut self,
        model: &Model,
        me: &str,
    ) -> impl std::future::Future<Output = Result<Changes, SyncError>> + Send {
        std::future::ready(self.apply(model.desired(me, ifindex)))
    }

    fn held(&self) -> Vec<String> {
        self.held.clone()
    }

    fn tidy(&mut self) -> Result<usize, SyncError> {
        let mut c = Changes::default();
        for t in std::mem::take(&mut self.garbage) {
            self.remove_entries(&t, &mut c)?;
        }
        let rules = std::mem::take(&mut self.garbage_rules);
        self.policy
            .remove_rules(&rules)
            .map_err(|e| SyncError::Policy(Box::new(e)))?;
        c.removed += rules.len();
        if !std::mem::take(&mut self.garbage_ids).is_empty() {
            let live: BTreeSet<u32> = self.programmed.values().map(|p| p.id).collect();
            c.removed += self
                .policy
                .remove_hits_except(&live)
                .map_err(|e| SyncError::Policy(Box::new(e)))?;
        }
        Ok(c.removed)
    }
}

/// What a sync keeps when its connection to etcd breaks: the model, programmed into the maps
/// as of `revision`. The next attempt watches from `revision + 1` with it instead of listing
/// again (no event missed: the watch starts right after the last programmed one; none
/// applied twice: the model holds each key's last value, and a replayed event leaves it so).
/// With `relist` (etcd's data went back) it lists again instead, holding the local
/// endpoints of `model` that etcd lost (see [`Model::hold_local`]).
pub struct Resume {
    model: Model,
    revision: i64,
    relist: bool,
}

/// What the sync knows of the etcd it talks to, to notice one whose data went back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Known {
    /// The cluster id of the last list (0: none yet).
    cluster_id: u64,
    /// The last revision this agent's status was written at and with (0: none yet).
    reported: i64,
}

/// etcd's data went back: restored from an older snapshot, or wiped and recreated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regression {
    /// The revision the maps were programmed to.
    pub programmed: i64,
    /// The revision etcd answers with now.
    pub now: i64,
    /// What showed it.
    pub why: String,
}

impl std::fmt::Display for Regression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etcd's data went back (restored from an older snapshot, or wiped and recreated): \
             it answers at revision {} and the maps were programmed up to revision {} ({})",
            self.now, self.programmed, self.why
        )
    }
}

/// Compares a response's header with what the sync knows: another cluster id, or a
/// revision below `floor` (the revision the maps hold, which etcd's history must reach).
fn check_header(
    h: crate::datastore::EtcdHeader,
    known: &Known,
    programmed: i64,
    floor: i64,
) -> Option<Regression> {
    if known.cluster_id != 0 && h.cluster_id != 0 && h.cluster_id != known.cluster_id {
        return Some(Regression {
            programmed,
            now: h.revision,
            why: format!("cluster id {:x}, was {:x}", h.cluster_id, known.cluster_id),
        });
    }
    (h.revision < floor).then(|| Regression {
        programmed,
        now: h.revision,
        why: format!("revision {} is below {floor}", h.revision),
    })
}

/// Before resuming a watch at `programmed + 1`: has etcd lost history since? Its revision
/// below `programmed`, another cluster id, or this agent's own status key older than its
/// last successful write (which catches an etcd recreated empty whose revision has since
/// climbed past ours) all say so.
async fn check_history(
    ds: &Datastore,
    me: &str,
    programmed: i64,
    known: &Known,
) -> Result<Option<Regression>, DatastoreError> {
    let key = crate::datastore::keys::node_status(me);
    let (status, h) = ds.get_raw_header(&key).await?;
    if let Some(r) = check_header(h, known, programmed, programmed) {
        return Ok(Some(r));
    }
    if known.reported > 0 {
        let stored = status
            .and_then(|raw| raw.decode::<crate::datastore::NodeStatus>().ok())
            .map(|s| s.value.revision);
        if stored.is_none_or(|r| r < known.reported) {
            return Ok(Some(Regression {
                programmed,
                now: h.revision,
                why: match stored {
                    Some(r) => format!(
                        "{key} holds revision {r}, this agent last wrote {}",
                        known.reported
                    ),
                    None => format!(
                        "{key} is gone, this agent last wrote it at revision {}",
                        known.reported
                    ),
                },
            }));
        }
    }
    Ok(None)
}

/// Why a watch ended.
#[derive(Debug)]
enum Lost {
    /// etcd could not be reached (or a status write timed out: a silent partition): resume.
    Unreachable(SyncError),
    /// etcd ended the watch stream: resume (a compaction past our revision shows up then).
    Closed,
    /// Anything else (compacted past our revision, a map write refused): list again.
    Relist(SyncError),
    /// etcd's data went back: list again, holding the local endpoints it lost.
    Regressed(Regression),
}

/// Logs and counts a regression.
fn regressed(obs: &SyncObserver, r: &Regression) {
    tracing::error!(
        programmed = r.programmed,
        etcd_revision = r.now,
        "{r}; listing everything again: the maps follow what etcd holds now, except local endpoints whose pods still run"
    );
    obs.regressed();
}

/// Lists and applies (or resumes from `resume`), then follows the watch until it is lost.
/// On return `resume` holds what the next attempt may resume from.
async fn sync_once<D: Dataplane>(
    ds: &Datastore,
    me: &str,
    writer: &mut D,
    obs: &SyncObserver,
    resume: &mut Option<Resume>,
    known: &mut Known,
) -> Result<(), SyncError> {
    let Resume {
        mut model,
        revision: mut programmed,
        ..
    } = match resume.take() {
        Some(r) if r.relist => relist_holding(ds, me, writer, obs, known, r, resume).await?,
        Some(r) => match check_history(ds, me, r.revision, known).await {
            Ok(None) => {
                info!(
                    revision = r.revision,
                    "resuming the watch after the last programmed revision"
                );
                r
            }
            Ok(Some(reg)) => {
                regressed(obs, &reg);
                relist_holding(ds, me, writer, obs, known, r, resume).await?
            }
            Err(e) => {
                *resume = Some(r);
                return Err(SyncError::Datastore(Box::new(e)));
            }
        },
        None => list_and_program(ds, me, writer, obs, known, None).await?,
    };
    let lost = follow(ds, me, writer, obs, &mut model, &mut programmed, known).await;
    match lost {
        Lost::Unreachable(e) => {
            *resume = Some(Resume {
                model,
                revision: programmed,
                relist: false,
            });
            Err(e)
        }
        Lost::Closed => {
            *resume = Some(Resume {
                model,
                revision: programmed,
                relist: false,
            });
            Ok(())
        }
        Lost::Relist(e) => Err(e),
        Lost::Regressed(reg) => {
            regressed(obs, &reg);
            *resume = Some(Resume {
                model,
                revision: programmed,
                relist: true,
            });
            Ok(())
        }
    }
}

/// After etcd's data went back: a full list, holding the local endpoints of `r` that etcd
/// lost; when it fails, `resume` keeps `r` for the next attempt (its endpoints stay held).
async fn relist_holding<D: Dataplane>(
    ds: &Datastore,
    me: &str,
    writer: &mut D,
    obs: &SyncObserver,
    known: &mut Known,
    r: Resume,
    resume: &mut Option<Resume>,
) -> Result<Resume, SyncError> {
    match list_and_program(ds, me, writer, obs, known, Some(&r.model)).await {
        Ok(fresh) => Ok(fresh),
        Err(e) => {
            *resume = Some(Resume { relist: true, ..r });
            Err(e)
        }
    }
}

/// A full list at one revision, programmed; the start of a watch. With `hold`, the model
/// the maps held before etcd's data went back: its local endpoints that etcd lost are kept
/// while their veths exist.
async fn list_and_program<D: Dataplane>(
    ds: &Datastore,
    me: &str,
    writer: &mut D,
    obs: &SyncObserver,
    known: &mut Known,
    hold: Option<&Model>,
) -> Result<Resume, SyncError> {
    let (entries, header) = ds.snapshot_header(PREFIX).await.map_err(Box::new)?;
    let revision = header.revision;
    known.cluster_id = header.cluster_id;
    // A status this agent wrote to a lost history means nothing now.
    known.reported = 0;
    obs.seen(revision);
    let started = Instant::now();
    let mut model = Model::default();
    for e in &entries {
        model.apply(&e.key, Some(&e.value));
    }
    if let Some(old) = hold {
        for key in model.hold_local(old, me, |n| ifindex(n).is_some()) {
            warn!(
                key,
                "etcd lost this local endpoint but its veth exists: kept (routes and policy as before) until etcd has it again or the pod is deleted"
            );
        }
    }
    obs.held(model.held());
    let c = writer.program(&model, me).await?;
    obs.policy_held(c.newly_held, writer.held());
    obs.applied(true, started.elapsed());
    info!(
        revision,
        entries = entries.len(),
        written = c.written,
        removed = c.removed,
        compiled = c.compiled,
        held = model.held(),
        "{} in sync with etcd",
        D::WHAT
    );
    obs.programmed(revision);
    // Best effort: the watch loop's refresh acts on a failure.
    let _recorded = report_status(ds, me, revision, obs, known).await;
    writer.tidy()?;
    Ok(Resume {
        model,
        revision,
        relist: false,
    })
}

/// One full list programmed into `writer`, without reporting it (the agent fills remade
/// maps this way before attaching; its sync then finds them in step). Returns the revision.
pub async fn prefill<D: Dataplane>(
    ds: &Datastore,
    me: &str,
    writer: &mut D,
) -> Result<i64, SyncError> {
    let (entries, revision) = ds.snapshot(PREFIX).await.map_err(Box::new)?;
    let mut model = Model::default();
    for e in &entries {
        model.apply(&e.key, Some(&e.value));
    }
    writer.program(&model, me).await?;
    Ok(revision)
}

/// Follows the watch from `programmed + 1`, applying each batch to `model` and the maps.
async fn follow<D: Dataplane>(
    ds: &Datastore,
    me: &str,
    writer: &mut D,
    obs: &SyncObserver,
    model: &mut Model,
    programmed: &mut i64,
    known: &mut Known,
) -> Lost {
    let ds_lost = |e: DatastoreError| {
        if e.is_unavailable() {
            Lost::Unreachable(SyncError::Datastore(Box::new(e)))
        } else {
            Lost::Relist(SyncError::Datastore(Box::new(e)))
        }
    };
    let mut watch = match ds.watch(PREFIX, *programmed + 1).await {
        Ok(w) => w,
        Err(e) => return ds_lost(e),
    };
    let mut refresh = tokio::time::interval(STATUS_REFRESH);
    loop {
        let next = tokio::select! {
            n = watch.next() => match n {
                Ok(n) => n,
                Err(e) => return ds_lost(e),
            },
            _ = refresh.tick() => {
                if model.held() > 0 {
                    let gone = model.release_gone(|n| ifindex(n).is_some());
                    if !gone.is_empty() {
                        info!(?gone, "held local endpoints released: their veths are gone");
                        obs.held(model.held());
                        if let Err(e) = writer.program(model, me).await {
                            return Lost::Relist(e);
                        }
                    }
                }
                // A watch carries nothing while etcd is cut off without a reset (a partition):
                // the status write is what notices.
                match report_status(ds, me, *programmed, obs, known).await {
                    Err(e) if e.is_unavailable() => {
                        return Lost::Unreachable(SyncError::Datastore(Box::new(e)));
                    }
                    Ok(Some(r)) => return Lost::Regressed(r),
                    _ => {}
                }
                continue;
            }
        };
        let Some((events, revision)) = next else {
            return Lost::Closed;
        };
        let h = crate::datastore::EtcdHeader {
            cluster_id: watch.cluster_id(),
            revision,
        };
        if let Some(r) = check_header(h, known, *programmed, *programmed) {
            return Lost::Regressed(r);
        }
        obs.seen(revision);
        if !events.is_empty() {
            let started = Instant::now();
            for e in &events {
                model.apply(&e.key, e.value.as_deref());
            }
            let c = match writer.program(model, me).await {
                Ok(c) => c,
                Err(e) => return Lost::Relist(e),
            };
            obs.policy_held(c.newly_held, writer.held());
            obs.applied(false, started.elapsed());
            obs.held(model.held());
            debug!(revision, events = events.len(), written = c.written, removed = c.removed, compiled = c.compiled, took = ?started.elapsed(), "applied");
        }
        if revision > *programmed {
            *programmed = revision;
            obs.programmed(revision);
            // Best effort here; the refresh above is what acts on a failure.
            if let Ok(Some(r)) = report_status(ds, me, revision, obs, known).await {
                return Lost::Regressed(r);
            }
        }
        if let Err(e) = writer.tidy() {
            return Lost::Relist(e);
        }
    }
}

/// How often an agent refreshes its status key (its liveness).
pub const STATUS_REFRESH: Duration = Duration::from_secs(5);

/// Records that this node's maps reflect etcd up to `revision`. A failure is logged (the
/// next write or refresh tries again) and returned. A write that etcd answers from a
/// history below `revision` (its data went back) is returned as `Ok(Some(…))`: the status
/// written then claims changes the maps may not hold, and the caller lists again at once.
async fn report_status(
    ds: &Datastore,
    me: &str,
    revision: i64,
    obs: &SyncObserver,
    known: &mut Known,
) -> Result<Option<Regression>, DatastoreError> {
    let mut status = crate::datastore::NodeStatus::new(me, revision);
    status.policy_held = obs.metrics.policy_held_list();
    match ds.put_node_status(&status).await {
        Ok(h) => {
            obs.etcd_reachable();
            // The write itself makes a revision past every one the maps hold.
            if let Some(r) = check_header(h, known, revision, revision + 1) {
                return Ok(Some(r));
            }
            known.reported = revision;
            Ok(None)
        }
        Err(e) => {
            if e.is_unavailable() {
                obs.etcd_unreachable();
            }
            debug!(error = %e, "status not recorded");
            Err(e)
        }
    }
}

/// Longest wait between two attempts while etcd is unreachable: short, so that the maps catch
/// up within about a second of etcd's return (an attempt costs a refused connection).
const UNREACHABLE_RETRY_MAX: Duration = Duration::from_secs(1);

/// Keeps the maps in step with etcd for node `me`, forever: on any error (etcd down, watch
/// compacted, a map write refused) it logs, waits, and starts over: from its last programmed
/// revision when only the connection was lost, else from a fresh list. The maps keep their
/// last state meanwhile. `obs` hears of its progress (readiness, metrics).
pub async fn run<D: Dataplane>(ds: Datastore, me: String, mut writer: D, obs: SyncObserver) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut delay = FIRST_RETRY;
    let mut resume = None;
    let mut known = Known::default();
    loop {
        let started = Instant::now();
        let result = sync_once(&ds, &me, &mut writer, &obs, &mut resume, &mut known).await;
        // A sync that ran for a while was healthy: the next failure starts the back-off over.
        if started.elapsed() > Duration::from_secs(10) {
            delay = FIRST_RETRY;
        }
        let mut wait = delay;
        match result {
            Ok(()) if resume.as_ref().is_some_and(|r| r.relist) => {
                wait = Duration::ZERO;
            }
            Ok(()) => info!("etcd closed the watch; resuming it"),
            Err(e) => {
                if let SyncError::Datastore(d) = &e {
                    obs.etcd_unreachable();
                    if d.is_unavailable() {
                        wait = wait.min(UNREACHABLE_RETRY_MAX);
                    }
                }
                warn!(error = %crate::error_chain(&e), retry_in = ?wait, resume = resume.is_some(), "datastore sync interrupted")
            }
        }
        obs.restarting();
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(m: &mut Model, key: &str, v: serde_json::Value) {
        m.apply(key, Some(v.to_string().as_bytes()));
    }

    fn model(mode: &str) -> Model {
        let mut m = Model::default();
        put(
            &mut m,
            "/calico/resources/v3/projectcalico.org/ippools/p",
            json!({"spec": {"cidr": "10.65.0.0/16", "ipipMode": mode, "natOutgoing": true}}),
        );
        for (n, a) in [
            ("node-1", "192.168.1.10/24"),
            ("node-2", "192.168.1.11/24"),
            ("node-3", "192.168.2.10/24"),
        ] {
            put(
                &mut m,
                &format!("/calico/resources/v3/projectcalico.org/nodes/{n}"),
                json!({"spec": {"bgp": {"ipv4Address": a}}}),
            );
        }
        for (b, n) in [
            ("10.65.0.0-26", "node-1"),
            ("10.65.0.64-26", "node-2"),
            ("10.65.0.128-26", "node-3"),
        ] {
            put(
                &mut m,
                &format!("/calico/ipam/v2/assignment/ipv4/block/{b}"),
                json!({"cidr": b.replace('-', "/"), "affinity": format!("host:{n}"), "allocations": [], "unallocated": []}),
            );
        }
        put(
            &mut m,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-a-eth0",
            json!({"metadata": {"name": "x"}, "spec": {"node": "node-1", "interfaceName": "caliaaa", "mac": "02:00:00:00:00:01", "ipNetworks": ["10.65.0.2/32"]}}),
        );
        m
    }

    fn remote(d: &Desired, net: &str) -> RouteValue {
        let n: Ipv4Net = net.parse().unwrap();
        d.routes[&(u32::from(n.prefix_len()), n.addr().octets())]
    }

    #[test]
    fn routes_follow_the_pool_mode() {
        for (mode, to_same, to_other) in [
            ("Always", true, true),
            ("CrossSubnet", false, true),
            ("Never", false, false),
        ] {
            let d = model(mode).desired("node-1", |n| (n == "caliaaa").then_some(7));
            let same = remote(&d, "10.65.0.64/26");
            let other = remote(&d, "10.65.0.128/26");
            assert_eq!(same.kind, route_kind::REMOTE_BLOCK);
            assert_eq!(same.next_hop, [192, 168, 1, 11]);
            assert_eq!(
                same.flags & route_flags::IPIP != 0,
                to_same,
                "{mode} same subnet"
            );
            assert_eq!(
                other.flags & route_flags::IPIP != 0,
                to_other,
                "{mode} other subnet"
            );
            assert!(same.flags & route_flags::SAME_SUBNET != 0);
            assert!(other.flags & route_flags::SAME_SUBNET == 0);
            let local = remote(&d, "10.65.0.2/32");
            assert_eq!(
                (local.kind, local.ifindex, local.mac),
                (route_kind::LOCAL_WORKLOAD, 7, [2, 0, 0, 0, 0, 1])
            );
            assert_eq!(d.endpoints[&7].ip, [10, 65, 0, 2]);
            assert!(
                !d.routes.contains_key(&(26, [10, 65, 0, 0])),
                "no route to our own block"
            );
            assert_eq!(d.nodes.len(), 2);
        }
    }

    #[test]
    fn kernel_view_keys_endpoints_by_veth_and_tells_same_subnet_routes() {
        let v = model("Never").kernel_view("node-1");
        assert_eq!(v.endpoints.len(), 1);
        assert_eq!(
            (v.endpoints[0].iface.as_str(), v.endpoints[0].ip),
            ("caliaaa", Ipv4Addr::new(10, 65, 0, 2))
        );
        assert_eq!(v.endpoints[0].rules, [None, None]);
        let r = |dst: &str, via: [u8; 4], same_subnet| RemoteRoute {
            dst: dst.parse().unwrap(),
            via: via.into(),
            same_subnet,
        };
        assert_eq!(
            v.remote,
            vec![
                r("10.65.0.64/26", [192, 168, 1, 11], true),
                r("10.65.0.128/26", [192, 168, 2, 10], false),
            ]
        );
        assert_eq!(
            v.pools,
            vec![(
                "p".to_owned(),
                "10.65.0.0/16".parse().unwrap(),
                IpipMode::Never
            )]
        );
        // No ifindex needed: the veth need not exist on this machine.
        assert!(model("Never").kernel_view("node-2").endpoints.is_empty());
    }

    #[test]
    fn local_endpoints_etcd_lost_are_held_while_their_veth_exists() {
        let old = model("Never");
        let wep =
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-a-eth0";
        let mut m = model("Never");
        m.apply(wep, None);
        let idx = |n: &str| (n == "caliaaa").then_some(7);
        assert!(m.desired("node-1", idx).endpoints.is_empty());
        // No veth: nothing held. Another node's agent holds nothing of node-1's.
        assert!(m.clone().hold_local(&old, "node-1", |_| false).is_empty());
        assert!(m.clone().hold_local(&old, "node-2", |_| true).is_empty());
        assert_eq!(m.hold_local(&old, "node-1", |n| n == "caliaaa"), [wep]);
        assert_eq!(m.desired("node-1", idx).endpoints[&7].ip, [10, 65, 0, 2]);
        // The veth goes: released.
        assert!(m.clone().release_gone(|_| true).is_empty());
        let mut gone = m.clone();
        assert_eq!(gone.release_gone(|_| false), [wep]);
        assert!(gone.desired("node-1", idx).endpoints.is_empty());
        // etcd has it again: its value wins and nothing is held.
        let mut back = old.clone();
        back.hold_local(&old, "node-1", |_| true);
        assert_eq!(back.held(), 0, "etcd has it: nothing to hold");
        m.apply(wep, Some(br#"{"spec": {"node": "node-1", "interfaceName": "caliaaa", "mac": "02:00:00:00:00:01", "ipNetworks": ["10.65.0.9/32"]}}"#));
        assert_eq!(m.held(), 0);
        assert_eq!(m.desired("node-1", idx).endpoints[&7].ip, [10, 65, 0, 9]);
    }

    #[test]
    fn a_header_from_an_older_history_or_another_cluster_is_a_regression() {
        use crate::datastore::EtcdHeader;
        let known = Known {
            cluster_id: 0xa,
            reported: 0,
        };
        let h = |cluster_id, revision| EtcdHeader {
            cluster_id,
            revision,
        };
        assert_eq!(check_header(h(0xa, 50), &known, 50, 50), None);
        assert_eq!(check_header(h(0xa, 51), &known, 50, 51), None);
        let r = check_header(h(0xa, 40), &known, 50, 50).unwrap();
        assert_eq!((r.programmed, r.now), (50, 40));
        assert!(
            r.to_string().contains("revision 40") && r.to_string().contains("50"),
            "{r}"
        );
        // A status write answered at the revision the maps hold: etcd went back.
        assert!(check_header(h(0xa, 50), &known, 50, 51).is_some());
        assert!(
            check_header(h(0xb, 900), &known, 50, 50)
                .unwrap()
                .why
                .contains("cluster id b")
        );
        // Nothing known yet: any cluster goes.
        assert_eq!(check_header(h(0xb, 60), &Known::default(), 50, 50), None);
    }

    #[test]
    fn deletes_and_corrupt_values() {
        let mut m = model("Always");
        m.apply("/calico/ipam/v2/assignment/ipv4/block/10.65.0.64-26", None);
        m.apply(
            "/calico/resources/v3/projectcalico.org/nodes/node-3",
            Some(b"{not json"),
        );
        let d = m.desired("node-1", |_| Some(7));
        assert!(!d.routes.contains_key(&(26, [10, 65, 0, 64])));
        // The corrupt update left node-3 as it was.
        assert!(d.routes.contains_key(&(26, [10, 65, 0, 128])));
        m.apply(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-a-eth0",
            None,
        );
        let d = m.desired("node-1", |_| Some(7));
        assert!(d.endpoints.is_empty());
    }
}

#[cfg(test)]
mod policy_tests {
    use serde_json::json;

    use super::*;

    fn put(m: &mut Model, key: &str, v: serde_json::Value) {
        m.apply(key, Some(v.to_string().as_bytes()));
    }

    fn wep(m: &mut Model, pod: &str, iface: &str, ip: &str) {
        put(
            m,
            &format!(
                "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-{pod}-eth0"
            ),
            json!({"metadata": {"name": "x", "namespace": "default"}, "spec": {"node": "node-1", "pod": pod, "interfaceName": iface, "mac": "02:00:00:00:00:01", "ipNetworks": [ip]}}),
        );
        put(
            m,
            &format!("/calico/k8s/pods/default/{pod}"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": "default", "labels": {"app": "web"}}, "spec": {"containers": []}}),
        );
    }

    #[test]
    fn endpoints_with_the_same_rules_share_them_and_unselected_ones_have_none() {
        let mut m = Model::default();
        wep(&mut m, "a", "calia", "10.65.0.2/32");
        wep(&mut m, "b", "calib", "10.65.0.3/32");
        wep(&mut m, "c", "calic", "10.65.0.4/32");
        // c loses the label that the policy selects.
        put(
            &mut m,
            "/calico/k8s/pods/default/c",
            json!({"metadata": {"name": "c", "namespace": "default", "labels": {"app": "db"}}, "spec": {}}),
        );
        put(
            &mut m,
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/web",
            json!({"kind": "NetworkPolicy", "metadata": {"name": "web", "namespace": "default"},
                   "spec": {"selector": "app == 'web'", "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]}}),
        );
        let idx = |n: &str| match n {
            "calia" => Some(1),
            "calib" => Some(2),
            "calic" => Some(3),
            _ => None,
        };
        let d = m.desired("node-1", idx);
        let [a_in, a_out] = &d.rules[&1];
        let [b_in, _] = &d.rules[&2];
        let [c_in, _] = &d.rules[&3];
        assert!(Arc::ptr_eq(a_in.as_ref().unwrap(), b_in.as_ref().unwrap()));
        assert_eq!(a_in.as_ref().unwrap().len(), 1);
        assert!(a_out.is_none(), "no egress policy");
        assert!(c_in.is_none(), "c is not selected");
        // A corrupt policy update is skipped: the model keeps the last good one.
        m.apply(
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/web",
            Some(b"{broken"),
        );
        assert!(m.desired("node-1", idx).rules[&1][0].is_some());
        // A policy whose selector does not parse is skipped, the rest keeps working.
        put(
            &mut m,
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/bad",
            json!({"kind": "NetworkPolicy", "metadata": {"name": "bad", "namespace": "default"},
                   "spec": {"selector": "app == ", "ingress": [{"action": "Deny"}]}}),
        );
        let d = m.desired("node-1", idx);
        assert_eq!(d.rules[&1][0].as_ref().unwrap().len(), 1);
    }
}

/// The rule cache against the full resolution, after random event sequences.
#[cfg(test)]
mod incremental_tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const PODS: usize = 6;

    /// The policies events pick from: peer selectors, namespace selectors, selectors and nets
    /// on the endpoint's own side, named ports on both sides, notSelector, a global policy.
    fn policy(which: usize, variant: usize) -> (String, serde_json::Value) {
        let app = ["web", "db", "api"][variant % 3];
        let ns = NAMESPACES[variant % 2];
        let (key, kind, spec) = match which {
            0 => (
                format!("networkpolicies/{ns}/peer"),
                "NetworkPolicy",
                json!({"selector": format!("app == '{app}'"), "ingress": [
                    {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"}, "destination": {"ports": [80]}},
                    {"action": "Deny", "source": {"notSelector": "app == 'db'"}}]}),
            ),
            1 => (
                "networkpolicies/default/local".to_owned(),
                "NetworkPolicy",
                json!({"selector": "all()", "ingress": [
                    {"action": "Allow", "destination": {"selector": format!("app == '{app}'"), "ports": ["http"]}},
                    {"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}, "destination": {"nets": ["10.65.0.0/30"]}}]}),
            ),
            2 => (
                "networkpolicies/default/named".to_owned(),
                "NetworkPolicy",
                json!({"selector": "has(app)", "egress": [
                    {"action": "Allow", "protocol": "TCP", "destination": {"selector": format!("app != '{app}'"), "ports": ["http", 443]}},
                    {"action": "Allow", "protocol": "TCP", "source": {"ports": ["http"]}}]}),
            ),
            3 => (
                "globalnetworkpolicies/global".to_owned(),
                "GlobalNetworkPolicy",
                json!({"order": variant as f64, "selector": "all()", "namespaceSelector": format!("team == '{}'", variant % 2),
                       "ingress": [{"action": "Allow", "source": {"namespaceSelector": "team == '1'", "selector": format!("app == '{app}'")}}],
                       "egress": [{"action": "Deny", "destination": {"selector": "all()"}}]}),
            ),
            _ => (
                format!("networkpolicies/{ns}/plain"),
                "NetworkPolicy",
                json!({"order": 5, "selector": "all()", "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53 + variant as u16]}}]}),
            ),
        };
        (
            format!("/calico/resources/v3/projectcalico.org/{key}"),
            json!({"kind": kind, "metadata": {"name": key.rsplit('/').next().unwrap(), "namespace": ns}, "spec": spec}),
        )
    }

    #[derive(Debug, Clone)]
    enum Event {
        Wep {
            pod: usize,
            local: bool,
            ip: u8,
            app: usize,
            port: Option<u16>,
        },
        WepGone(usize),
        Pod {
            pod: usize,
            app: usize,
            team: usize,
        },
        PodGone(usize),
        Namespace {
            ns: usize,
            team: usize,
        },
        NamespaceGone(usize),
        Policy {
            which: usize,
            variant: usize,
        },
        PolicyGone {
            which: usize,
            variant: usize,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0..PODS, any::<bool>(), 0u8..5, 0usize..4, proptest::option::of(8080u16..8083))
                .prop_map(|(pod, local, ip, app, port)| Event::Wep { pod, local, ip, app, port }),
            1 => (0..PODS).prop_map(Event::WepGone),
            3 => (0..PODS, 0usize..4, 0usize..2).prop_map(|(pod, app, team)| Event::Pod { pod, app, team }),
            1 => (0..PODS).prop_map(Event::PodGone),
            1 => (0usize..2, 0usize..3).prop_map(|(ns, team)| Event::Namespace { ns, team }),
            1 => (0usize..2).prop_map(Event::NamespaceGone),
            3 => (0usize..5, 0usize..4).prop_map(|(which, variant)| Event::Policy { which, variant }),
            1 => (0usize..5, 0usize..4).prop_map(|(which, variant)| Event::PolicyGone { which, variant }),
        ]
    }

    const APPS: [&str; 4] = ["web", "db", "api", ""];
    const NAMESPACES: [&str; 2] = ["default", "other"];

    fn ns_of(pod: usize) -> &'static str {
        NAMESPACES[pod % 2]
    }

    fn wep_key(pod: usize) -> String {
        format!(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/{}/node--x-k8s-p{pod}-eth0",
            ns_of(pod)
        )
    }

    fn apply(m: &mut Model, e: &Event) {
        let put = |m: &mut Model, key: &str, v: serde_json::Value| {
            m.apply(key, Some(v.to_string().as_bytes()));
        };
        match *e {
            Event::Wep {
                pod,
                local,
                ip,
                app,
                port,
            } => {
                let mut labels = serde_json::Map::new();
                if !APPS[app].is_empty() {
                    labels.insert("app".into(), json!(APPS[app]));
                }
                let ports: Vec<serde_json::Value> = port
                    .map(|p| json!({"name": "http", "protocol": "TCP", "port": p}))
                    .into_iter()
                    .collect();
                put(
                    m,
                    &wep_key(pod),
                    json!({"metadata": {"name": "x", "namespace": ns_of(pod), "labels": labels},
                    "spec": {"node": if local { "node-1" } else { "node-2" }, "pod": format!("p{pod}"),
                             "interfaceName": format!("cali{pod}"), "mac": "02:00:00:00:00:01",
                             // Addresses collide now and then, as they may in a broken cluster.
                             "ipNetworks": [format!("10.65.0.{ip}/32")], "ports": ports}}),
                );
            }
            Event::WepGone(pod) => m.apply(&wep_key(pod), None),
            Event::Pod { pod, app, team } => {
                let mut labels = serde_json::Map::new();
                if !APPS[app].is_empty() {
                    labels.insert("app".into(), json!(APPS[app]));
                }
                labels.insert("team".into(), json!(team.to_string()));
                put(
                    m,
                    &format!("/calico/k8s/pods/{}/p{pod}", ns_of(pod)),
                    json!({"metadata": {"name": format!("p{pod}"), "namespace": ns_of(pod), "labels": labels}, "spec": {}}),
                );
            }
            Event::PodGone(pod) => {
                m.apply(&format!("/calico/k8s/pods/{}/p{pod}", ns_of(pod)), None)
            }
            Event::Namespace { ns, team } => put(
                m,
                &format!(
                    "/calico/resources/v3/projectcalico.org/profiles/kns.{}",
                    NAMESPACES[ns]
                ),
                json!({"kind": "Profile", "metadata": {"name": format!("kns.{}", NAMESPACES[ns])},
                       "spec": {"labelsToApply": {"team": team.to_string()}}}),
            ),
            Event::NamespaceGone(ns) => m.apply(
                &format!(
                    "/calico/resources/v3/projectcalico.org/profiles/kns.{}",
                    NAMESPACES[ns]
                ),
                None,
            ),
            Event::Policy { which, variant } => {
                let (key, v) = policy(which, variant);
                put(m, &key, v);
            }
            Event::PolicyGone { which, variant } => m.apply(&policy(which, variant).0, None),
        }
    }

    fn idx(name: &str) -> Option<u32> {
        name.strip_prefix("cali")?
            .parse::<u32>()
            .ok()
            .map(|i| i + 1)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn incremental_rules_equal_the_full_resolution(events in proptest::collection::vec(event(), 1..40)) {
            let mut m = Model::default();
            for (i, e) in events.iter().enumerate() {
                apply(&mut m, e);
                let cached = m.desired("node-1", idx);
                let full = m.desired_uncached("node-1", idx);
                prop_assert_eq!(&cached, &full, "after event {} ({:?})", i, e);
            }
        }
    }

    #[test]
    fn an_endpoint_event_resolves_only_what_it_changed() {
        let mut m = Model::default();
        apply(
            &mut m,
            &Event::Policy {
                which: 0,
                variant: 0,
            },
        );
        apply(
            &mut m,
            &Event::Policy {
                which: 4,
                variant: 0,
            },
        );
        for pod in [0, 2] {
            apply(
                &mut m,
                &Event::Wep {
                    pod,
                    local: true,
                    ip: pod as u8,
                    app: 0,
                    port: None,
                },
            );
        }
        m.desired("node-1", idx);
        let stats = |m: &Model| m.rule_cache.0.lock().unwrap().stats;
        // A remote pod no selector picks: nothing is resolved again.
        apply(
            &mut m,
            &Event::Wep {
                pod: 1,
                local: false,
                ip: 9,
                app: 2,
                port: None,
            },
        );
        m.desired("node-1", idx);
        assert_eq!((stats(&m).resolved, stats(&m).reused), (0, 2));
        // One that `app == 'web'` picks: the shared ingress list is resolved again, once.
        apply(
            &mut m,
            &Event::Wep {
                pod: 4,
                local: false,
                ip: 10,
                app: 0,
                port: None,
            },
        );
        let d = m.desired("node-1", idx);
        assert_eq!((stats(&m).resolved, stats(&m).reused), (1, 1));
        assert_eq!(d, m.desired_uncached("node-1", idx));
    }
}

/// Where an agent's time goes on endpoint events under many rules (run by hand:
/// `PROFILE_RULES=100000 cargo test --release -p dataplane-user --lib profile_ -- --ignored --nocapture`).
#[cfg(test)]
mod profile {
    use std::time::Instant;

    use serde_json::json;

    use super::*;

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

    /// One policy of `n` rules selecting every pod: /32 peers on distinct ports, and every
    /// tenth a selector peer (a set that endpoint events change).
    fn policy(n: usize) -> serde_json::Value {
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
        json!({"kind": "NetworkPolicy", "metadata": {"name": "scale", "namespace": "default"},
               "spec": {"selector": "all()", "types": ["Ingress"], "ingress": rules}})
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn profile_endpoint_events() {
        let n: usize = std::env::var("PROFILE_RULES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let events: usize = std::env::var("PROFILE_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        let local: usize = 20;
        let mut m = Model::default();
        for i in 0..local {
            wep(&mut m, i, "node-1", &format!("g{}", i % 5));
        }
        let idx = |name: &str| {
            name.strip_prefix("cali")?
                .parse::<u32>()
                .ok()
                .map(|i| i + 1)
        };
        let stored = policy(n).to_string();
        let t = Instant::now();
        let p: crate::datastore::policy::NetworkPolicy = serde_json::from_str(&stored).unwrap();
        let decode = t.elapsed();
        let t = Instant::now();
        resolve::Policy::parse(Some("default"), &p).unwrap();
        let parse = t.elapsed();
        let t = Instant::now();
        m.apply(
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/scale",
            Some(stored.as_bytes()),
        );
        println!(
            "{n} rules ({} KiB stored): decode {decode:?}, parse {parse:?}, Model::apply (both) {:?}",
            stored.len() / 1024,
            t.elapsed()
        );
        let t = Instant::now();
        let d = m.desired("node-1", idx);
        println!(
            "first desired() with {local} local endpoints: {:?}",
            t.elapsed()
        );
        let rules = d.rules.values().next().unwrap()[0].clone().unwrap();
        let t = Instant::now();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&*rules, &mut h);
        println!("hash one list of {} rules: {:?}", rules.len(), t.elapsed());
        let t = Instant::now();
        let e = compile::compile(1, &rules, MAX_ENTRIES_PER_POLICY).unwrap();
        println!("compile it: {:?} ({} entries)", t.elapsed(), e.len());
        let mut per_event = Vec::new();
        for i in 0..events {
            // Selected by no rule's selector: no address set changes.
            wep(&mut m, 1000 + i, "node-2", "none");
            let t = Instant::now();
            std::hint::black_box(m.desired("node-1", idx));
            per_event.push(t.elapsed());
        }
        per_event.sort();
        println!(
            "{events} remote endpoint events (no set changes): desired() p50 {:?}, max {:?}",
            per_event[events / 2],
            per_event[events - 1]
        );
        let mut per_event = Vec::new();
        for i in 0..events {
            // Another `g` label each time: two selectors' sets change.
            let v = json!({"metadata": {"name": format!("p{}", i % local), "namespace": "default", "labels": {"app": format!("g{}", (i + 1 + i % local) % 5)}}, "spec": {}});
            put(
                &mut m,
                &format!("/calico/k8s/pods/default/p{}", i % local),
                v,
            );
            let t = Instant::now();
            std::hint::black_box(m.desired("node-1", idx));
            per_event.push(t.elapsed());
        }
        per_event.sort();
        println!(
            "{events} local relabel events (a set changes): desired() p50 {:?}, max {:?}",
            per_event[events / 2],
            per_event[events - 1]
        );
    }
}

//! Policy documents as `dataplane ctl apply` takes them (YAML or JSON: Calico v3
//! NetworkPolicy and GlobalNetworkPolicy, Kubernetes NetworkPolicy, Namespace, Pod, …),
//! validated by ctl, stored, read back by the agent's model (`sync::Model`, as from etcd),
//! resolved against a fixed small cluster and compiled into the policy tries' entries.
//!
//! Checked, besides "no panic":
//! - what ctl accepts, the agent can use: the stored value of a policy decodes and parses
//!   (`resolve::Policy::parse`) — else the agent would skip a policy ctl said was applied;
//! - every key ctl writes is one of the datastore's layout (`keys::Key::parse`);
//! - every emitted prefix length fits its key (addresses: 32..=64 bits of `PolicyIpKey`;
//!   verdicts: 64..=96 bits of `PolicyPortKey`), verdicts are ALLOW, DENY or NO_MATCH and
//!   name a rule that exists;
//! - the entries, looked up as the programs do (`compile::evaluate`), give the verdict of
//!   the rules evaluated straight from their definition (first matching rule) for probes at
//!   the cluster's addresses, the edges of every CIDR and port range the rules name, and a
//!   few protocols.
//!
//! Input: the text of a manifest, as is. Seeds in `corpus/policy/`.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::OnceLock,
};

use dataplane::{
    ctl::manifest::{self, Kind},
    datastore::{WorkloadEndpoint, WorkloadEndpointArgs, keys, policy::NetworkPolicy},
    policy::{
        compile::{self, CompiledRule, IpSet, PortSet, ProtoMatch},
        resolve,
    },
    sync::Model,
};
use dataplane_common::{POLICY_PORT_CLASS_BITS, PolicyIpKey, PolicyPortKey, verdict};
use libfuzzer_sys::fuzz_target;

/// Most entries one compiled policy may take here (the agent allows 2^20; a fuzz input that
/// needs more than this is slow, not wrong).
const LIMIT: usize = 1 << 14;
const NODE: &str = "node-1";

/// (namespace, pod, address, node, labels, named ports (name, protocol, port)).
type Pod = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str, u16)],
);

const PODS: [Pod; 5] = [
    (
        "prod",
        "web-0",
        "10.65.0.2",
        NODE,
        &[("app", "web"), ("tier", "frontend")],
        &[("http", "TCP", 80), ("dns", "UDP", 53)],
    ),
    (
        "prod",
        "db-0",
        "10.65.0.3",
        NODE,
        &[("app", "db")],
        &[("pg", "TCP", 5432)],
    ),
    (
        "dev",
        "client",
        "10.65.0.4",
        NODE,
        &[("app", "client"), ("role", "test")],
        &[],
    ),
    (
        "default",
        "lone",
        "10.65.0.5",
        NODE,
        &[],
        &[("http", "SCTP", 8080)],
    ),
    (
        "dev",
        "web-1",
        "10.65.1.2",
        "node-2",
        &[("app", "web")],
        &[("http", "TCP", 8080)],
    ),
];

/// The cluster every input's documents are applied to: namespaces with labels, pods with
/// labels and named ports, their endpoints on two nodes.
fn base() -> &'static Model {
    static BASE: OnceLock<Model> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut m = Model::default();
        let mut docs = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {env: prod}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: dev, labels: {env: dev, team: a}}\n",
        );
        for (ns, pod, _, _, labels, ports) in PODS {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let ports: Vec<String> = ports
                .iter()
                .map(|(n, p, port)| format!("{{name: {n}, protocol: {p}, containerPort: {port}}}"))
                .collect();
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{{}}}}}\n\
                 spec: {{containers: [{{name: c, ports: [{}]}}]}}\n",
                labels.join(", "),
                ports.join(", ")
            ));
        }
        for doc in manifest::parse(&docs).expect("the fixed cluster parses") {
            let value = serde_json::to_vec(&doc.value).expect("serialises");
            m.apply(&doc.key, Some(&value));
        }
        for (i, (ns, pod, ip, node, _, _)) in PODS.into_iter().enumerate() {
            let wep = WorkloadEndpoint::new(WorkloadEndpointArgs {
                namespace: ns.to_owned(),
                node: node.to_owned(),
                pod: pod.to_owned(),
                endpoint: "eth0".to_owned(),
                container_id: format!("c{i}"),
                interface_name: iface(i),
                mac: "ee:ee:ee:ee:ee:ee".to_owned(),
                ip_networks: vec![format!("{ip}/32")],
                profiles: vec![format!("kns.{ns}")],
                labels: BTreeMap::from([
                    ("projectcalico.org/namespace".to_owned(), ns.to_owned()),
                    ("projectcalico.org/orchestrator".to_owned(), "k8s".to_owned()),
                ]),
            });
            let value = serde_json::to_vec(&wep).expect("serialises");
            m.apply(&wep.key(), Some(&value));
        }
        m
    })
}

fn iface(i: usize) -> String {
    format!("cali{i:011}")
}

fn ifindex(name: &str) -> Option<u32> {
    (0..PODS.len())
        .find(|&i| iface(i) == name)
        .map(|i| i as u32 + 10)
}

fn port_in(set: &PortSet, p: u16) -> bool {
    let inside = |rs: &[(u16, u16)]| rs.iter().any(|&(a, b)| a <= p && p <= b);
    set.any_of.as_deref().is_none_or(inside) && !inside(&set.none_of)
}

fn peer_in(set: &IpSet, peer: Ipv4Addr) -> bool {
    set.all_of
        .iter()
        .all(|l| l.iter().any(|n| n.contains(&peer)))
        && !set.none_of.iter().any(|n| n.contains(&peer))
}

/// The first matching rule's action, from the definitions (protocols without ports are seen
/// with ports 0, as the programs see them).
fn reference(rules: &[CompiledRule], peer: Ipv4Addr, proto: u8, dp: u16, sp: u16) -> u8 {
    let (dp, sp) = if [1, 6, 17, 132, 136].contains(&proto) {
        (dp, sp)
    } else {
        (0, 0)
    };
    rules
        .iter()
        .find(|r| {
            r.terms.iter().any(|t| {
                let proto_ok = match t.proto {
                    ProtoMatch::Any => true,
                    ProtoMatch::Is(p) => p == proto,
                    ProtoMatch::Not(p) => p != proto,
                };
                proto_ok && peer_in(&t.peer, peer) && port_in(&t.dport, dp) && port_in(&t.sport, sp)
            })
        })
        .map_or(verdict::NO_MATCH, |r| r.action)
}

fn check_compiled(rules: &[CompiledRule]) {
    const POLICY: u32 = 7;
    let e = match compile::compile(POLICY, rules, LIMIT) {
        Ok(e) => e,
        Err(too_big) => {
            assert!(too_big.needed > too_big.limit);
            return;
        }
    };
    let ip_bits = 8 * size_of::<PolicyIpKey>() as u32;
    let port_bits = 8 * size_of::<PolicyPortKey>() as u32;
    for &(plen, k) in e.ip.keys() {
        assert!((32..=ip_bits).contains(&plen), "address prefix /{plen}");
        assert_eq!(k.policy, POLICY);
        let addr = u32::from_be_bytes(k.addr);
        let host_bits = ip_bits - plen;
        assert!(
            host_bits == 32 || addr & ((1u32 << host_bits) - 1) == 0,
            "address key {:?} has bits past its prefix /{}",
            Ipv4Addr::from(addr),
            plen - 32
        );
    }
    for (&(plen, _), v) in &e.port {
        assert!(
            (POLICY_PORT_CLASS_BITS..=port_bits).contains(&plen),
            "verdict prefix /{plen}"
        );
        assert!(
            [verdict::ALLOW, verdict::DENY, verdict::NO_MATCH].contains(&v.action),
            "action {}",
            v.action
        );
        assert!(
            v.action == verdict::NO_MATCH || (v.rule as usize) < rules.len(),
            "verdict names rule {} of {}",
            v.rule,
            rules.len()
        );
    }

    // Probes: the cluster, and the edges of every CIDR and port range named.
    let mut peers: BTreeSet<Ipv4Addr> = PODS
        .iter()
        .map(|p| p.2.parse().expect("pod address"))
        .collect();
    peers.insert(Ipv4Addr::new(192, 168, 1, 10));
    let mut ports: BTreeSet<u16> = [0, 1, 53, 80, 443, 5432, 8080, 65535].into();
    let mut protos: BTreeSet<u8> = [1, 6, 17, 47, 132].into();
    for t in rules.iter().flat_map(|r| &r.terms) {
        for net in t.peer.all_of.iter().flatten().chain(&t.peer.none_of) {
            let (lo, hi) = (u32::from(net.network()), u32::from(net.broadcast()));
            for a in [lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)] {
                peers.insert(Ipv4Addr::from(a));
            }
        }
        for set in [&t.dport, &t.sport] {
            for &(a, b) in set.any_of.iter().flatten().chain(&set.none_of) {
                ports.extend([a.wrapping_sub(1), a, b, b.wrapping_add(1)]);
            }
        }
        if let ProtoMatch::Is(p) | ProtoMatch::Not(p) = t.proto {
            protos.insert(p);
        }
    }
    let tables = e.tables();
    let mut budget = 4000usize;
    for &peer in peers.iter().take(40) {
        for &proto in protos.iter().take(8) {
            for &dp in ports.iter().take(24) {
                for sp in [0, dp, 1024] {
                    if budget == 0 {
                        return;
                    }
                    budget -= 1;
                    let got = tables.evaluate(POLICY, peer, proto, dp, sp).action;
                    let want = reference(rules, peer, proto, dp, sp);
                    assert_eq!(
                        got, want,
                        "peer {peer} proto {proto} dport {dp} sport {sp}: compiled {got}, rules {want}\n{rules:#?}"
                    );
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let docs = match manifest::parse(text) {
        Ok(d) => d,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut model = base().clone();
    for doc in &docs {
        assert!(
            keys::Key::parse(&doc.key).is_some(),
            "ctl would write {} outside the layout",
            doc.key
        );
        let value = serde_json::to_vec(&doc.value).expect("a manifest's value serialises");
        if matches!(doc.kind, Kind::NetworkPolicy | Kind::GlobalNetworkPolicy) {
            let stored: NetworkPolicy = serde_json::from_slice(&value)
                .unwrap_or_else(|e| panic!("stored policy {} does not decode: {e}", doc.key));
            if let Err(reason) = resolve::Policy::parse(doc.namespace.as_deref(), &stored) {
                panic!(
                    "ctl accepted {} but the agent skips it: {reason}\n{}",
                    doc.key, doc.value
                );
            }
        }
        model.apply(&doc.key, Some(&value));
    }
    let desired = model.desired(NODE, ifindex);
    let mut seen = BTreeSet::new();
    for rules in desired.rules.values().flatten().flatten() {
        if seen.insert(std::sync::Arc::as_ptr(rules)) {
            check_compiled(rules);
        }
    }
    let _ = model.kernel_view(NODE);
});

//! etcd keys, exactly as Calico's etcdv3 backend lays them out, and their parsing back.
//!
//! Resources live under `/calico/resources/v3/projectcalico.org/<plural>/[<namespace>/]<name>`;
//! IPAM state under `/calico/ipam/v2/`, with a block's CIDR written `10.65.0.0-26` (the `/`
//! of a CIDR would be a path separator).
//!
//! Two prefixes are ours, not Calico's: `/calico/k8s/pods/<ns>/<name>` holds the Kubernetes
//! pods (their labels and named ports; there is no Kubernetes API server to ask), and
//! `/dataplane/v1/status/<node>` each agent's progress. The status keys live outside
//! `/calico/` so that an agent watching `/calico/` is not woken by every agent's heartbeat.

use std::fmt;

use ipnet::Ipv4Net;

/// Root of the v3 resources.
pub const RESOURCES: &str = "/calico/resources/v3/projectcalico.org/";
/// Prefix of every IPPool.
pub const IP_POOLS: &str = "/calico/resources/v3/projectcalico.org/ippools/";
/// Prefix of every Node.
pub const NODES: &str = "/calico/resources/v3/projectcalico.org/nodes/";
/// Prefix of every WorkloadEndpoint (then `<namespace>/<name>`).
pub const WORKLOAD_ENDPOINTS: &str = "/calico/resources/v3/projectcalico.org/workloadendpoints/";
/// Prefix of every Profile.
pub const PROFILES: &str = "/calico/resources/v3/projectcalico.org/profiles/";
/// Prefix of every (namespaced) NetworkPolicy (then `<namespace>/<name>`).
pub const NETWORK_POLICIES: &str = "/calico/resources/v3/projectcalico.org/networkpolicies/";
/// Prefix of every GlobalNetworkPolicy.
pub const GLOBAL_NETWORK_POLICIES: &str =
    "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/";
/// Prefix of every Kubernetes Pod (then `<namespace>/<name>`).
pub const PODS: &str = "/calico/k8s/pods/";
/// Prefix of every agent's status (then `<node>`).
pub const NODE_STATUS: &str = "/dataplane/v1/status/";
/// Prefix of every IPv4 IPAM block.
pub const BLOCKS: &str = "/calico/ipam/v2/assignment/ipv4/block/";
/// Prefix of every block affinity (then `<node>/ipv4/block/<cidr>`).
pub const HOSTS: &str = "/calico/ipam/v2/host/";
/// Prefix of every IPAM handle.
pub const HANDLES: &str = "/calico/ipam/v2/handle/";

/// What Calico's WorkloadEndpoint names put between the node and the pod.
const K8S_ORCHESTRATOR: &str = "k8s";
/// Profile names of Kubernetes namespaces: `kns.<namespace>`.
pub const NAMESPACE_PROFILE_PREFIX: &str = "kns.";

/// `/calico/resources/v3/projectcalico.org/ippools/<name>` (`ip_pool("")` is the prefix).
pub fn ip_pool(name: &str) -> String {
    format!("{IP_POOLS}{name}")
}

/// `/calico/resources/v3/projectcalico.org/nodes/<name>` (`node("")` is the prefix).
pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

/// `/calico/resources/v3/projectcalico.org/profiles/<name>`.
pub fn profile(name: &str) -> String {
    format!("{PROFILES}{name}")
}

/// The profile that carries namespace `ns`'s labels: `kns.<ns>`.
pub fn namespace_profile_name(ns: &str) -> String {
    format!("{NAMESPACE_PROFILE_PREFIX}{ns}")
}

/// `…/networkpolicies/<namespace>/<name>`.
pub fn network_policy(namespace: &str, name: &str) -> String {
    format!("{NETWORK_POLICIES}{namespace}/{name}")
}

/// Prefix of the NetworkPolicies of one namespace.
pub fn network_policies_of(namespace: &str) -> String {
    format!("{NETWORK_POLICIES}{namespace}/")
}

/// `…/globalnetworkpolicies/<name>`.
pub fn global_network_policy(name: &str) -> String {
    format!("{GLOBAL_NETWORK_POLICIES}{name}")
}

/// `/calico/k8s/pods/<namespace>/<name>`.
pub fn pod(namespace: &str, name: &str) -> String {
    format!("{PODS}{namespace}/{name}")
}

/// Prefix of the pods of one namespace.
pub fn pods_of(namespace: &str) -> String {
    format!("{PODS}{namespace}/")
}

/// `/dataplane/v1/status/<node>`: where the agent on `node` reports its progress.
pub fn node_status(node: &str) -> String {
    format!("{NODE_STATUS}{node}")
}

/// The key of a pod's WorkloadEndpoint:
/// `…/workloadendpoints/<namespace>/<node>-k8s-<pod>-<iface>` (see [`workload_endpoint_name`]).
pub fn workload_endpoint(namespace: &str, node: &str, pod: &str, iface: &str) -> String {
    format!(
        "{WORKLOAD_ENDPOINTS}{namespace}/{}",
        workload_endpoint_name(node, pod, iface)
    )
}

/// Prefix of the WorkloadEndpoints of one namespace.
pub fn workload_endpoints_of(namespace: &str) -> String {
    format!("{WORKLOAD_ENDPOINTS}{namespace}/")
}

/// Calico's WorkloadEndpoint name: `<node>-k8s-<pod>-<iface>`, every `-` inside a segment
/// doubled so that single dashes only separate: node `node-1`, pod `web-0`, iface `eth0` →
/// `node--1-k8s-web--0-eth0`.
pub fn workload_endpoint_name(node: &str, pod: &str, iface: &str) -> String {
    format!(
        "{}-{K8S_ORCHESTRATOR}-{}-{}",
        escape_dashes(node),
        escape_dashes(pod),
        escape_dashes(iface)
    )
}

fn escape_dashes(s: &str) -> String {
    s.replace('-', "--")
}

/// The (node, pod, iface) of a WorkloadEndpoint name made by [`workload_endpoint_name`], or
/// `None` when it is not one. Kubernetes names never start or end with `-`, which is what
/// makes the split unambiguous.
pub fn parse_workload_endpoint_name(name: &str) -> Option<(String, String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '-' {
            cur.push(c);
        } else if chars.peek() == Some(&'-') {
            chars.next();
            cur.push('-');
        } else {
            parts.push(std::mem::take(&mut cur));
        }
    }
    parts.push(cur);
    match <[String; 4]>::try_from(parts) {
        Ok([node, orch, pod, iface])
            if orch == K8S_ORCHESTRATOR
                && !node.is_empty()
                && !pod.is_empty()
                && !iface.is_empty() =>
        {
            Some((node, pod, iface))
        }
        _ => None,
    }
}

/// A block's CIDR as it appears in keys: `10.65.0.0-26`.
pub fn cidr_segment(cidr: Ipv4Net) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix_len())
}

/// The inverse of [`cidr_segment`]; `None` unless it is a network address and prefix.
pub fn parse_cidr_segment(s: &str) -> Option<Ipv4Net> {
    let (addr, len) = s.rsplit_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    (net.trunc() == net).then_some(net)
}

/// `/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26`.
pub fn block(cidr: Ipv4Net) -> String {
    format!("{BLOCKS}{}", cidr_segment(cidr))
}

/// `/calico/ipam/v2/host/<node>/ipv4/block/10.65.0.0-26`.
pub fn block_affinity(node: &str, cidr: Ipv4Net) -> String {
    format!("{}{}", block_affinities_of(node), cidr_segment(cidr))
}

/// Prefix of one node's block affinities: `/calico/ipam/v2/host/<node>/ipv4/block/`.
pub fn block_affinities_of(node: &str) -> String {
    format!("{HOSTS}{node}/ipv4/block/")
}

/// `/calico/ipam/v2/handle/<handle-id>`.
pub fn handle(handle_id: &str) -> String {
    format!("{HANDLES}{handle_id}")
}

/// A key of the layout above, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    IpPool(String),
    Node(String),
    WorkloadEndpoint {
        namespace: String,
        node: String,
        pod: String,
        iface: String,
    },
    Profile(String),
    Block(Ipv4Net),
    BlockAffinity {
        node: String,
        cidr: Ipv4Net,
    },
    Handle(String),
    NetworkPolicy {
        namespace: String,
        name: String,
    },
    GlobalNetworkPolicy(String),
    /// A Kubernetes pod (ours, not Calico's).
    Pod {
        namespace: String,
        name: String,
    },
    /// An agent's status (ours, not Calico's).
    NodeStatus(String),
}

impl Key {
    /// Parses any key of the layout; `None` for anything else (including a WorkloadEndpoint
    /// name that is not `<node>-k8s-<pod>-<iface>`).
    pub fn parse(key: &str) -> Option<Self> {
        let one = |rest: &str| (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_owned());
        let two = |rest: &str| {
            let (a, b) = rest.split_once('/')?;
            (!a.is_empty() && !b.is_empty() && !b.contains('/'))
                .then(|| (a.to_owned(), b.to_owned()))
        };
        if let Some(rest) = key.strip_prefix(IP_POOLS) {
            return one(rest).map(Self::IpPool);
        }
        if let Some(rest) = key.strip_prefix(NODES) {
            return one(rest).map(Self::Node);
        }
        if let Some(rest) = key.strip_prefix(PROFILES) {
            return one(rest).map(Self::Profile);
        }
        if let Some(rest) = key.strip_prefix(WORKLOAD_ENDPOINTS) {
            let (namespace, name) = rest.split_once('/')?;
            if namespace.is_empty() || name.contains('/') {
                return None;
            }
            let (node, pod, iface) = parse_workload_endpoint_name(name)?;
            return Some(Self::WorkloadEndpoint {
                namespace: namespace.to_owned(),
                node,
                pod,
                iface,
            });
        }
        if let Some(rest) = key.strip_prefix(BLOCKS) {
            return parse_cidr_segment(rest).map(Self::Block);
        }
        if let Some(rest) = key.strip_prefix(HOSTS) {
            let (node, cidr) = rest.split_once("/ipv4/block/")?;
            if node.is_empty() || node.contains('/') {
                return None;
            }
            return Some(Self::BlockAffinity {
                node: node.to_owned(),
                cidr: parse_cidr_segment(cidr)?,
            });
        }
        if let Some(rest) = key.strip_prefix(HANDLES) {
            return one(rest).map(Self::Handle);
        }
        if let Some(rest) = key.strip_prefix(NETWORK_POLICIES) {
            return two(rest).map(|(namespace, name)| Self::NetworkPolicy { namespace, name });
        }
        if let Some(rest) = key.strip_prefix(GLOBAL_NETWORK_POLICIES) {
            return one(rest).map(Self::GlobalNetworkPolicy);
        }
        if let Some(rest) = key.strip_prefix(PODS) {
            return two(rest).map(|(namespace, name)| Self::Pod { namespace, name });
        }
        if let Some(rest) = key.strip_prefix(NODE_STATUS) {
            return one(rest).map(Self::NodeStatus);
        }
        None
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match self {
            Self::IpPool(name) => ip_pool(name),
            Self::Node(name) => node(name),
            Self::WorkloadEndpoint {
                namespace,
                node,
                pod,
                iface,
            } => workload_endpoint(namespace, node, pod, iface),
            Self::Profile(name) => profile(name),
            Self::Block(cidr) => block(*cidr),
            Self::BlockAffinity { node, cidr } => block_affinity(node, *cidr),
            Self::Handle(id) => handle(id),
            Self::NetworkPolicy { namespace, name } => network_policy(namespace, name),
            Self::GlobalNetworkPolicy(name) => global_network_policy(name),
            Self::Pod { namespace, name } => pod(namespace, name),
            Self::NodeStatus(node) => node_status(node),
        };
        f.write_str(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn workload_endpoint_names_double_dashes_inside_segments() {
        assert_eq!(
            workload_endpoint_name("node-1", "web-0", "eth0"),
            "node--1-k8s-web--0-eth0"
        );
        assert_eq!(
            workload_endpoint_name("n", "a--b", "e-t-h"),
            "n-k8s-a----b-e--t--h"
        );
        assert_eq!(
            workload_endpoint("default", "node-1", "web-0", "eth0"),
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-web--0-eth0"
        );
    }

    #[test]
    fn workload_endpoint_names_parse_back() {
        for (node, pod, iface) in [
            ("node-1", "web-0", "eth0"),
            ("n", "a--b", "e-t-h"),
            ("kind-worker-2", "coredns-5d78c9869d-xk7vq", "eth0"),
            ("node.example.com", "p", "net1"),
        ] {
            let name = workload_endpoint_name(node, pod, iface);
            assert_eq!(
                parse_workload_endpoint_name(&name),
                Some((node.to_owned(), pod.to_owned(), iface.to_owned())),
                "{name}"
            );
        }
        for bad in [
            "",
            "node-1",
            "node-k8s-pod",
            "node-cni-pod-eth0",
            "node-k8s-pod-eth0-extra",
            "-k8s-pod-eth0",
            "node-k8s--eth0",
        ] {
            assert_eq!(parse_workload_endpoint_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ipam_keys_are_calicos() {
        let cidr = net("10.65.0.0/26");
        assert_eq!(
            block(cidr),
            "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26"
        );
        assert_eq!(
            block_affinity("node-1", cidr),
            "/calico/ipam/v2/host/node-1/ipv4/block/10.65.0.0-26"
        );
        assert_eq!(
            handle("k8s-pod-network.abc"),
            "/calico/ipam/v2/handle/k8s-pod-network.abc"
        );
        assert_eq!(
            ip_pool("default-ipv4-ippool"),
            "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"
        );
        assert_eq!(
            node("node-1"),
            "/calico/resources/v3/projectcalico.org/nodes/node-1"
        );
        assert_eq!(
            profile(&namespace_profile_name("prod")),
            "/calico/resources/v3/projectcalico.org/profiles/kns.prod"
        );
    }

    #[test]
    fn policy_pod_and_status_keys() {
        assert_eq!(
            network_policy("prod", "knp.default.x"),
            "/calico/resources/v3/projectcalico.org/networkpolicies/prod/knp.default.x"
        );
        assert_eq!(
            global_network_policy("g"),
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/g"
        );
        assert_eq!(pod("default", "web-0"), "/calico/k8s/pods/default/web-0");
        assert_eq!(node_status("node-1"), "/dataplane/v1/status/node-1");
        assert!(node_status("n").starts_with(NODE_STATUS) && !NODE_STATUS.starts_with("/calico/"));
        assert!(pod("a", "b").starts_with(&pods_of("a")));
        assert!(network_policy("a", "b").starts_with(&network_policies_of("a")));
        assert_eq!(
            Key::parse("/calico/resources/v3/projectcalico.org/networkpolicies/ns/p"),
            Some(Key::NetworkPolicy {
                namespace: "ns".into(),
                name: "p".into()
            })
        );
        assert_eq!(
            Key::parse("/calico/k8s/pods/ns/web-0"),
            Some(Key::Pod {
                namespace: "ns".into(),
                name: "web-0".into()
            })
        );
    }

    #[test]
    fn keys_round_trip() {
        let keys = [
            Key::IpPool("default-ipv4-ippool".into()),
            Key::Node("node-1".into()),
            Key::WorkloadEndpoint {
                namespace: "default".into(),
                node: "node-1".into(),
                pod: "web-0".into(),
                iface: "eth0".into(),
            },
            Key::Profile("kns.default".into()),
            Key::Block(net("10.65.1.64/26")),
            Key::BlockAffinity {
                node: "node-2".into(),
                cidr: net("10.65.0.0/30"),
            },
            Key::Handle("k8s-pod-network.0123abcd".into()),
            Key::NetworkPolicy {
                namespace: "prod".into(),
                name: "knp.default.deny-all".into(),
            },
            Key::GlobalNetworkPolicy("default-deny".into()),
            Key::Pod {
                namespace: "default".into(),
                name: "web-0".into(),
            },
            Key::NodeStatus("node-1".into()),
        ];
        for k in keys {
            let s = k.to_string();
            assert_eq!(Key::parse(&s), Some(k), "{s}");
        }
    }

    #[test]
    fn foreign_and_malformed_keys_do_not_parse() {
        for bad in [
            "/calico/resources/v3/projectcalico.org/ippools/",
            "/calico/resources/v3/projectcalico.org/ippools/a/b",
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default",
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/not-a-wep",
            "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0/26",
            "/calico/ipam/v2/assignment/ipv4/block/10.65.0.1-26",
            "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-33",
            "/calico/ipam/v2/host/node-1/ipv6/block/fd00::-122",
            "/calico/ipam/v2/host//ipv4/block/10.65.0.0-26",
            "/calico/ipam/v2/handle/",
            "/registry/pods/default/x",
            "/calico/resources/v3/projectcalico.org/networkpolicies/default",
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/",
            "/calico/resources/v3/projectcalico.org/networkpolicies//x",
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/a/b",
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/",
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/a/b",
            "/calico/k8s/pods/default",
            "/calico/k8s/pods/default/",
            "/calico/k8s/pods//web",
            "/calico/k8s/pods/a/b/c",
            "/dataplane/v1/status/",
            "/dataplane/v1/status/a/b",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
    }
}

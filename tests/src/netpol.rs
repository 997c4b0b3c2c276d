//! Kubernetes NetworkPolicy truth tables, on the model of Kubernetes' own e2e "netpol" suite:
//! namespaces `x`, `y`, `z` with pods `a`, `b`, `c` in each, servers on TCP and UDP ports 80
//! and 81 in every pod, and the full 9×9 matrix probed for each (port, protocol) and compared
//! with what a reference model of the NetworkPolicy API says.
//!
//! Three parts:
//! - the reference model ([`World`], [`NetworkPolicy`]): its own serde types for the
//!   `networking.k8s.io/v1` YAML and its own evaluation, written from the API's documented
//!   semantics and sharing no code with the dataplane's translation or policy compiler, so that
//!   a mistake in one is not repeated in the other;
//! - the cluster ([`NetpolCluster`]): three nodes with agents, the nine pods made through the
//!   real CNI plugin (pod `a` on node 0, `b` on node 1, `c` on node 2, so that same-node,
//!   same-subnet and cross-subnet IP-in-IP paths all carry probes), and a prober that runs the
//!   324 probes of a round concurrently within one deadline;
//! - a [`Session`] that applies policies with `dataplane ctl apply --wait`, keeps the model's
//!   view of what was applied, checks each matrix and resets between scenarios.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, bind, connect, getsockopt, recv,
        send, socket, sockopt,
    },
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    Agent, Cluster, PinDirGuard,
    cni::{PluginDir, Sandbox, cni, dataplane_conf, result_ip},
    dataplane, dataplane_args, wait_attached, wait_ready,
};

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

pub type Labels = BTreeMap<String, String>;

/// The label Kubernetes (1.21+) puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One (port, protocol) the matrix is probed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// The four matrices of a round, in the order the e2e suite lists them.
pub const CASES: [Case; 4] = [
    Case {
        port: 80,
        protocol: Protocol::Tcp,
    },
    Case {
        port: 81,
        protocol: Protocol::Tcp,
    },
    Case {
        port: 80,
        protocol: Protocol::Udp,
    },
    Case {
        port: 81,
        protocol: Protocol::Udp,
    },
];

/// A container port with a name, as in a Pod's `spec.containers[].ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl NamedPort {
    /// The e2e suite's naming: `serve-80-tcp`.
    pub fn e2e(case: Case) -> Self {
        Self {
            name: format!(
                "serve-{}-{}",
                case.port,
                case.protocol.as_str().to_lowercase()
            ),
            port: case.port,
            protocol: case.protocol,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    /// The labels as written; [`NamespaceInfo::selector_labels`] adds the automatic one.
    pub labels: Labels,
}

impl NamespaceInfo {
    /// What a namespaceSelector sees: the labels plus `kubernetes.io/metadata.name`.
    pub fn selector_labels(&self) -> Labels {
        let mut l = self.labels.clone();
        l.insert(NAMESPACE_NAME_LABEL.to_owned(), self.name.clone());
        l
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    /// `ns/name`, as the matrix prints it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Labels from literal pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The namespaces and pods the model reasons about, pods in matrix order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
}

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];

impl World {
    /// The e2e suite's world: namespaces x, y, z labelled `ns: <name>`, pods a, b, c in each
    /// labelled `pod: <name>`, each with the four named ports of [`CASES`]. `ip` gives each
    /// pod's address.
    pub fn e2e(ip: impl Fn(&str, &str) -> Ipv4Addr) -> Self {
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| NamespaceInfo {
                name: (*ns).to_owned(),
                labels: labels(&[("ns", ns)]),
            })
            .collect();
        let pods = NAMESPACES
            .iter()
            .flat_map(|ns| POD_NAMES.iter().map(move |p| (*ns, *p)))
            .map(|(ns, p)| PodInfo {
                namespace: ns.to_owned(),
                name: p.to_owned(),
                labels: labels(&[("pod", p)]),
                ip: ip(ns, p),
                ports: CASES.iter().map(|c| NamedPort::e2e(*c)).collect(),
            })
            .collect();
        Self { namespaces, pods }
    }

    /// The index of pod `ns/name` in the matrix.
    pub fn pod_index(&self, ns: &str, name: &str) -> usize {
        self.pods
            .iter()
            .position(|p| p.namespace == ns && p.name == name)
            .unwrap_or_else(|| panic!("no pod {ns}/{name} in the model"))
    }

    pub fn pod(&self, ns: &str, name: &str) -> &PodInfo {
        &self.pods[self.pod_index(ns, name)]
    }

    pub fn namespace(&self, name: &str) -> &NamespaceInfo {
        self.namespaces
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no namespace {name} in the model"))
    }

    /// The labels a namespaceSelector sees on `ns`; a namespace the model does not know has
    /// only its name label.
    fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces.iter().find(|n| n.name == ns).map_or_else(
            || labels(&[(NAMESPACE_NAME_LABEL, ns)]),
            |n| n.selector_labels(),
        )
    }

    /// Whether a new connection from pod `from` to pod `to` on `case` is allowed by
    /// `policies`: the source's egress and the destination's ingress must both allow it.
    /// This is the policy answer only; a pod reaching itself goes over loopback, which no
    /// policy sees (see [`World::reachability`]).
    pub fn allowed(&self, policies: &[NetworkPolicy], from: usize, to: usize, case: Case) -> bool {
        let (src, dst) = (&self.pods[from], &self.pods[to]);
        self.direction_allowed(policies, Direction::Egress, src, src, dst, case)
            && self.direction_allowed(policies, Direction::Ingress, dst, src, dst, case)
    }

    /// Whether the policies selecting `subject` for `dir` allow the connection src → dst.
    fn direction_allowed(
        &self,
        policies: &[NetworkPolicy],
        dir: Direction,
        subject: &PodInfo,
        src: &PodInfo,
        dst: &PodInfo,
        case: Case,
    ) -> bool {
        let peer = match dir {
            Direction::Ingress => src,
            Direction::Egress => dst,
        };
        let mut isolated = false;
        for p in policies.iter().filter(|p| p.selects(subject)) {
            let (ingress, egress) = p.policy_types();
            let (applies, rules) = match dir {
                Direction::Ingress => (ingress, p.spec.ingress.as_deref().unwrap_or_default()),
                Direction::Egress => (egress, p.spec.egress.as_deref().unwrap_or_default()),
            };
            if !applies {
                continue;
            }
            isolated = true;
            let ns = &p.metadata.namespace;
            if rules
                .iter()
                .any(|r| r.matches_peer(self, ns, peer) && r.matches_port(dst, case))
            {
                return true;
            }
        }
        !isolated
    }

    /// The expected matrix for `case`: [`World::allowed`] everywhere, and every pod reaching
    /// itself (loopback), as the e2e suite expects.
    pub fn reachability(&self, policies: &[NetworkPolicy], case: Case) -> Reachability {
        let mut r = Reachability::new(self.pods.iter().map(PodInfo::id).collect(), true);
        for from in 0..self.pods.len() {
            for to in 0..self.pods.len() {
                r.set(
                    from,
                    to,
                    from == to || self.allowed(policies, from, to, case),
                );
            }
        }
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// `networking.k8s.io/v1` NetworkPolicy, as much of it as the model needs. Unknown fields are
/// refused so that a typo in a scenario cannot silently become "no restriction".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: Labels,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Required by the API; `{}` selects every pod of the namespace.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub policy_types: Option<Vec<PolicyType>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// An ingress rule (peers in `from`: the sources) or an egress rule (peers in `to`: the
/// destinations); [`NetworkPolicy::validate`] refuses the other direction's field.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub from: Option<Vec<Peer>>,
    pub to: Option<Vec<Peer>>,
    pub ports: Option<Vec<PolicyPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    /// Defaults to TCP.
    pub protocol: Option<Protocol>,
    pub port: Option<PortRef>,
    pub end_port: Option<u16>,
}

/// `port`: a number, or the name of a container port on the destination pod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// matchLabels and matchExpressions, all ANDed; an empty selector matches everything.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    fn validate(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            let with_values = matches!(r.operator, Operator::In | Operator::NotIn);
            if with_values == r.values.is_empty() {
                return Err(format!(
                    "{:?} on {:?} {} values",
                    r.operator,
                    r.key,
                    if with_values { "needs" } else { "takes no" }
                ));
            }
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // A pod without the key is "not in" any set, as in Kubernetes' labels package.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// An IPv4 CIDR as (network, mask).
fn parse_cidr(s: &str) -> Result<(u32, u32), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or(format!("{s:?}: no prefix length"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let len: u32 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if len > 32 {
        return Err(format!("{s:?}: prefix length over 32"));
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Ok((u32::from(addr) & mask, mask))
}

fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (net, mask) = parse_cidr(cidr).unwrap_or_else(|e| panic!("{e}"));
    u32::from(ip) & mask == net
}

impl IpBlock {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        cidr_contains(&self.cidr, ip) && !self.except.iter().any(|e| cidr_contains(e, ip))
    }
}

impl Peer {
    /// Whether `pod` is this peer, for a policy in namespace `policy_ns`.
    fn matches(&self, world: &World, policy_ns: &str, pod: &PodInfo) -> bool {
        if let Some(block) = &self.ip_block {
            return block.contains(pod.ip);
        }
        let ns_ok = match &self.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => sel.matches(&world.namespace_labels(&pod.namespace)),
        };
        let pod_ok = self
            .pod_selector
            .as_ref()
            .is_none_or(|sel| sel.matches(&pod.labels));
        ns_ok && pod_ok
    }
}

impl PolicyPort {
    /// Whether a connection to `dst` on `case` is on this port. A named port is looked up
    /// among the destination pod's container ports, with its protocol.
    fn matches(&self, dst: &PodInfo, case: Case) -> bool {
        if self.protocol.unwrap_or(Protocol::Tcp) != case.protocol {
            return false;
        }
        match (&self.port, self.end_port) {
            (None, _) => true,
            (Some(PortRef::Number(p)), None) => *p == case.port,
            (Some(PortRef::Number(p)), Some(end)) => (*p..=end).contains(&case.port),
            (Some(PortRef::Name(name)), _) => dst
                .ports
                .iter()
                .any(|np| &np.name == name && np.protocol == case.protocol && np.port == case.port),
        }
    }
}

impl Rule {
    /// An absent or empty peer list matches every peer.
    fn matches_peer(&self, world: &World, policy_ns: &str, peer: &PodInfo) -> bool {
        match self.peers() {
            None | Some([]) => true,
            Some(peers) => peers.iter().any(|p| p.matches(world, policy_ns, peer)),
        }
    }

    /// An absent or empty port list matches every port of every protocol.
    fn matches_port(&self, dst: &PodInfo, case: Case) -> bool {
        match self.ports.as_deref() {
            None | Some([]) => true,
            Some(ports) => ports.iter().any(|p| p.matches(dst, case)),
        }
    }

    fn peers(&self) -> Option<&[Peer]> {
        self.from.as_deref().or(self.to.as_deref())
    }

    fn validate(&self, dir: Direction) -> Result<(), String> {
        match dir {
            Direction::Ingress if self.to.is_some() => {
                return Err("`to` in an ingress rule".into());
            }
            Direction::Egress if self.from.is_some() => {
                return Err("`from` in an egress rule".into());
            }
            _ => {}
        }
        for peer in self.peers().into_iter().flatten() {
            match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
                (None, None, None) => return Err("a peer with no selector and no ipBlock".into()),
                (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                    return Err("ipBlock together with a selector".into());
                }
                (Some(b), None, None) => {
                    let (net, mask) = parse_cidr(&b.cidr)?;
                    for e in &b.except {
                        let (enet, emask) = parse_cidr(e)?;
                        if emask < mask || enet & mask != net {
                            return Err(format!("except {e} is not inside {}", b.cidr));
                        }
                    }
                }
                (None, pod, ns) => {
                    for sel in [pod, ns].into_iter().flatten() {
                        sel.validate()?;
                    }
                }
            }
        }
        for p in self.ports.iter().flatten() {
            match (&p.port, p.end_port) {
                (None, Some(_)) => return Err("endPort without port".into()),
                (Some(PortRef::Name(n)), Some(_)) => {
                    return Err(format!("endPort with the named port {n:?}"));
                }
                (Some(PortRef::Number(port)), Some(end)) if end < *port => {
                    return Err(format!("endPort {end} below port {port}"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl NetworkPolicy {
    /// Whether this policy applies to `pod`: same namespace, podSelector matches.
    pub fn selects(&self, pod: &PodInfo) -> bool {
        self.metadata.namespace == pod.namespace && self.spec.pod_selector.matches(&pod.labels)
    }

    /// (ingress, egress) isolation. Without `policyTypes`, Kubernetes defaults to Ingress, plus
    /// Egress when the policy has egress rules (a non-empty `egress` list, as the API server's
    /// defaulting reads it).
    pub fn policy_types(&self) -> (bool, bool) {
        match self.spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => (
                types.contains(&PolicyType::Ingress),
                types.contains(&PolicyType::Egress),
            ),
            _ => (
                true,
                self.spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
            ),
        }
    }

    /// The checks the API server would make on what the model reads; a scenario with an
    /// invalid policy is a mistake in the test.
    pub fn validate(&self) -> Result<(), String> {
        let what = |e: String| format!("{}/{}: {e}", self.metadata.namespace, self.metadata.name);
        if self.api_version != "networking.k8s.io/v1" || self.kind != "NetworkPolicy" {
            return Err(what(format!(
                "{} {} is not a networking.k8s.io/v1 NetworkPolicy",
                self.api_version, self.kind
            )));
        }
        self.spec.pod_selector.validate().map_err(what)?;
        for r in self.spec.ingress.iter().flatten() {
            r.validate(Direction::Ingress).map_err(what)?;
        }
        for r in self.spec.egress.iter().flatten() {
            r.validate(Direction::Egress).map_err(what)?;
        }
        Ok(())
    }
}

/// Parses the NetworkPolicies of a multi-document YAML text, validated.
pub fn parse_policies(yaml: &str) -> Result<Vec<NetworkPolicy>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let p = NetworkPolicy::deserialize(doc).map_err(|e| e.to_string())?;
        p.validate()?;
        out.push(p);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

/// A from × to matrix of allowed connections (rows = from, columns = to), printed as the e2e
/// suite prints it: `.` allowed, `X` denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pub names: Vec<String>,
    cells: Vec<bool>,
}

impl Reachability {
    pub fn new(names: Vec<String>, value: bool) -> Self {
        let n = names.len();
        Self {
            names,
            cells: vec![value; n * n],
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn get(&self, from: usize, to: usize) -> bool {
        self.cells[from * self.len() + to]
    }

    pub fn set(&mut self, from: usize, to: usize, allowed: bool) {
        let n = self.len();
        self.cells[from * n + to] = allowed;
    }

    /// How many cells are allowed.
    pub fn allowed_count(&self) -> usize {
        self.cells.iter().filter(|c| **c).count()
    }

    /// The cells where `observed` differs from `self` (the expectation): (from, to, expected).
    pub fn mismatches(&self, observed: &Self) -> Vec<(usize, usize, bool)> {
        assert_eq!(self.names, observed.names, "matrices of different pods");
        (0..self.len())
            .flat_map(|f| (0..self.len()).map(move |t| (f, t)))
            .filter(|&(f, t)| self.get(f, t) != observed.get(f, t))
            .map(|(f, t)| (f, t, self.get(f, t)))
            .collect()
    }

    fn table(&self, cell: impl Fn(usize, usize) -> String) -> String {
        let w = self.names.iter().map(String::len).max().unwrap_or(1).max(3) + 1;
        let mut s = format!("{:<w$}", "-");
        for n in &self.names {
            s.push_str(&format!("{n:<w$}"));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        for (f, from) in self.names.iter().enumerate() {
            let mut line = format!("{from:<w$}");
            for t in 0..self.len() {
                line.push_str(&format!("{:<w$}", cell(f, t)));
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    /// The expectation `self`, what was `observed`, and a comparison where each cell that
    /// differs shows the observed value followed by `!`; `None` when they agree.
    pub fn diff(&self, observed: &Self) -> Option<String> {
        let bad = self.mismatches(observed);
        if bad.is_empty() {
            return None;
        }
        let mark = |a: bool| if a { "." } else { "X" };
        let mut s = format!("expected:\n{self}observed:\n{observed}");
        s.push_str("comparison (observed, `!` where it differs from the expectation):\n");
        s.push_str(&self.table(|f, t| {
            let o = observed.get(f, t);
            format!("{}{}", mark(o), if o == self.get(f, t) { "" } else { "!" })
        }));
        for (f, t, want) in &bad {
            s.push_str(&format!(
                "  {} -> {}: expected {}, observed {}\n",
                self.names[*f],
                self.names[*t],
                if *want { "allowed" } else { "denied" },
                if *want { "denied" } else { "allowed" },
            ));
        }
        Some(s)
    }
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table(|fr, to| if self.get(fr, to) { "." } else { "X" }.to_owned()))
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// The pool the pods' addresses come from.
pub const POOL_CIDR: &str = "10.65.0.0/16";
/// How long a probe waits for its connection or reply before counting it denied.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// How often an unanswered UDP probe is sent again within the deadline.
const UDP_RESEND: Duration = Duration::from_millis(250);
/// Client source ports cycle through this range, so that a probe never reuses the 4-tuple of
/// a recent one: a conntrack entry left by an earlier allowed flow must not decide a later
/// probe.
const SOURCE_PORTS: std::ops::Range<u32> = 20000..60000;

/// One of the nine pods: made through the CNI plugin on node `node`.
pub struct NetpolPod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub sb: Sandbox,
    pub ip: Ipv4Addr,
    /// The host-side veth, in the node's namespace.
    pub host_iface: String,
    next_port: AtomicU32,
}

impl NetpolPod {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn source_port(&self) -> u16 {
        let n = self.next_port.fetch_add(1, Ordering::Relaxed);
        let span = SOURCE_PORTS.end - SOURCE_PORTS.start;
        u16::try_from(SOURCE_PORTS.start + n % span).unwrap()
    }
}

/// The Kubernetes objects of the world, as `ctl apply` takes them.
pub fn namespace_yaml(ns: &NamespaceInfo) -> String {
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns.name, "labels": ns.labels },
    }))
}

/// A Pod as the API server would hold it: labels, the node, one container per named port
/// (the e2e suite's layout: container `cont-80-tcp` serving port `serve-80-tcp`).
pub fn pod_yaml(pod: &PodInfo, node: &str) -> String {
    let containers: Vec<serde_json::Value> = pod
        .ports
        .iter()
        .map(|p| {
            json!({
                "name": p.name.replacen("serve-", "cont-", 1),
                "image": "dataplane-tests/netpol-server",
                "ports": [{ "containerPort": p.port, "name": p.name, "protocol": p.protocol.as_str() }],
            })
        })
        .collect();
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": pod.name, "namespace": pod.namespace, "labels": pod.labels },
        "spec": { "nodeName": node, "containers": containers },
    }))
}

fn to_yaml(v: &serde_json::Value) -> String {
    serde_yaml_ng::to_string(v).unwrap()
}

/// Joins YAML documents into one multi-document text.
pub fn documents(docs: &[String]) -> String {
    docs.iter()
        .map(|d| d.trim_end().to_owned() + "\n")
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The NetworkPolicy cluster: three nodes (two on subnet 1, one behind the router) with
/// agents, pool 10.65.0.0/16 (CrossSubnet for the BPF dataplane, see
/// [`NetpolCluster::start_with`]), namespaces x, y, z and pods a, b, c in each (a on node 0, b
/// on node 1, c on node 2) with servers on TCP/UDP 80 and 81.
pub struct NetpolCluster {
    // Field order is drop order: servers, pods, agents, then the cluster they live in.
    servers: Servers,
    pub pods: Vec<NetpolPod>,
    pub agents: Vec<Agent>,
    pub pins: Vec<PinDirGuard>,
    pub plugins: PluginDir,
    /// The world as made: labels, addresses, ports. [`Session`] tracks changes to it.
    pub world: World,
    /// Whether `ctl apply --wait` took the Namespace and Pod objects (it does not before the
    /// Kubernetes kinds are supported; the all-allowed matrix does not need them).
    pub k8s_objects: Result<(), String>,
    /// How long [`NetpolCluster::start`] took.
    pub started_in: Duration,
    /// The agents' dataplane (`bpf`, `iptables`) and the pool's ipipMode.
    pub dataplane: String,
    pub pool_mode: String,
    dir: tempfile::TempDir,
    pub cluster: Cluster,
}

impl NetpolCluster {
    /// The BPF dataplane, pool in CrossSubnet mode.
    pub fn start() -> Self {
        Self::start_with("bpf", "CrossSubnet")
    }

    /// Agents in `dataplane` mode (`bpf`, `iptables`…: see [`crate::dataplane_args`]), the pool in ipipMode `pool_mode`
    /// (the iptables mode routes natively only: `Never`, with the router told where each
    /// node's block is, as a BGP fabric would be).
    pub fn start_with(dataplane: &str, pool_mode: &str) -> Self {
        let t0 = Instant::now();
        let iptables = crate::cluster::is_iptables(dataplane);
        let cluster = Cluster::new(&[1, 1, 2], true);
        let dir = tempfile::tempdir().unwrap();
        let etcd = cluster.etcd.as_ref().unwrap().endpoint();
        let pool = format!(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: default-ipv4-ippool}}\nspec: {{cidr: {POOL_CIDR}, ipipMode: {pool_mode}, natOutgoing: true}}\n"
        );
        let (ok, _, err) = ctl_apply(&cluster, &dir, "pool.yaml", &pool, false);
        assert!(ok, "apply the pool: {err}");

        let pins: Vec<PinDirGuard> = cluster.nodes.iter().map(|_| PinDirGuard::new()).collect();
        let mut agents: Vec<Agent> = cluster
            .nodes
            .iter()
            .zip(&pins)
            .map(|(n, p)| Agent::start(n, p, cluster.etcd.as_ref(), &dataplane_args(dataplane)))
            .collect();
        for (n, a) in cluster.nodes.iter().zip(agents.iter_mut()) {
            if iptables {
                wait_ready(n, a, Duration::from_secs(20));
            } else {
                wait_attached(&n.ns, "eth0", a, Duration::from_secs(20));
            }
        }

        // The API server has the namespaces and pods before any sandbox exists.
        let node_of = |pod: &str| POD_NAMES.iter().position(|p| *p == pod).unwrap();
        let mut world = World::e2e(|_, _| Ipv4Addr::UNSPECIFIED);
        let mut docs: Vec<String> = world.namespaces.iter().map(namespace_yaml).collect();
        docs.extend(
            world
                .pods
                .iter()
                .map(|p| pod_yaml(p, &cluster.nodes[node_of(&p.name)].name)),
        );
        let (ok, out, err) = ctl_apply(&cluster, &dir, "world.yaml", &documents(&docs), true);
        let k8s_objects = if ok {
            Ok(())
        } else {
            Err(format!("{}{}", out.trim(), err.trim()))
        };

        let plugins = PluginDir::new();
        let mut pods = Vec::new();
        for p in &mut world.pods {
            let node_idx = node_of(&p.name);
            let node = &cluster.nodes[node_idx];
            let sb = Sandbox::new(node, &p.namespace, &p.name);
            let conf = dataplane_conf("1.0.0", &etcd, &node.name);
            let r = cni(node, &plugins, "ADD", &sb, &conf).ok();
            p.ip = result_ip(&r);
            let host_iface = r["interfaces"][0]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("no host interface in {r}"))
                .to_owned();
            pods.push(NetpolPod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: node_idx,
                sb,
                ip: p.ip,
                host_iface,
                next_port: AtomicU32::new(0),
            });
        }
        if pool_mode == "Never" {
            // Native routing across subnets: the router must know each node's block.
            for p in &pods {
                let block = Ipv4Addr::from(u32::from(p.ip) & !63);
                let via = cluster.nodes[p.node].ip.to_string();
                cluster
                    .router
                    .ns
                    .ip(&["route", "replace", &format!("{block}/26"), "via", &via]);
            }
        }
        if iptables {
            let placed: Vec<(usize, Ipv4Addr)> = pods.iter().map(|p| (p.node, p.ip)).collect();
            crate::cluster::wait_iptables_routes(&cluster, &agents, &placed, pool_mode == "Never");
        } else {
            for p in &pods {
                let node = &cluster.nodes[p.node];
                wait_attached(
                    &node.ns,
                    &p.host_iface,
                    &mut agents[p.node],
                    Duration::from_secs(20),
                );
            }
            wait_routes(&cluster, &pins, &agents, 3);
        }
        let servers = Servers::start(&pods);
        Self {
            servers,
            pods,
            agents,
            pins,
            plugins,
            world,
            k8s_objects,
            started_in: t0.elapsed(),
            dataplane: dataplane.to_owned(),
            pool_mode: pool_mode.to_owned(),
            dir,
            cluster,
        }
    }

    pub fn etcd_endpoint(&self) -> String {
        self.cluster.etcd.as_ref().unwrap().endpoint()
    }

    /// `dataplane ctl --etcd-endpoints E ARGS…` on node 0: (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        ctl(&self.cluster, args)
    }

    /// Writes `text` to a file and runs `ctl apply --wait -f FILE`; `Err` has the output.
    pub fn apply(&self, file: &str, text: &str) -> Result<String, String> {
        let (ok, out, err) = ctl_apply(&self.cluster, &self.dir, file, text, true);
        if ok {
            Ok(out)
        } else {
            Err(format!(
                "ctl apply --wait -f {file} failed: {}\n--- {file}:\n{text}",
                format!("{out}{err}").trim()
            ))
        }
    }

    /// Probes the nine pods' matrix for each of `cases`, all at once: every source pod opens
    /// all its probes together and waits for them with one deadline.
    pub fn probe(&self, cases: &[Case]) -> Vec<Reachability> {
        let targets: Vec<Ipv4Addr> = self.pods.iter().map(|p| p.ip).collect();
        let rows: Vec<Vec<Vec<bool>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|src| {
                    let targets = &targets;
                    s.spawn(move || src.sb.ns.run(|| probe_from(src, targets, cases)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let names: Vec<String> = self.pods.iter().map(NetpolPod::id).collect();
        (0..cases.len())
            .map(|c| {
                let mut r = Reachability::new(names.clone(), false);
                for (from, row) in rows.iter().enumerate() {
                    for (to, ok) in row[c].iter().enumerate() {
                        r.set(from, to, *ok);
                    }
                }
                r
            })
            .collect()
    }

    /// Whether the echo servers are still running.
    pub fn servers_running(&self) -> bool {
        !self.servers.threads.iter().any(|t| t.is_finished())
    }
}

fn ctl(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let endpoint = cluster.etcd.as_ref().unwrap().endpoint();
    let mut all = vec!["ctl", "--etcd-endpoints", endpoint.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = dataplane(&cluster.nodes[0].ns, &all);
    (status.success(), out, err)
}

fn ctl_apply(
    cluster: &Cluster,
    dir: &tempfile::TempDir,
    file: &str,
    text: &str,
    wait: bool,
) -> (bool, String, String) {
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    let mut args = vec!["apply"];
    if wait {
        args.push("--wait");
    }
    args.extend(["-f", &path]);
    ctl(cluster, &args)
}

/// Waits until every node's route map has its `local` workloads and the other nodes' blocks.
fn wait_routes(cluster: &Cluster, pins: &[PinDirGuard], agents: &[Agent], local: usize) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let dir = pins[i].path.display().to_string();
        loop {
            let (_, out, _) = dataplane(
                &node.ns,
                &["map-dump", "routes", "--json", "--bpffs-dir", &dir],
            );
            let rows: Vec<dataplane::dump::RouteRow> =
                serde_json::from_str(&out).unwrap_or_default();
            let count = |kind: &str| rows.iter().filter(|r| r.kind == kind).count();
            if count("remote block") == cluster.nodes.len() - 1 && count("local workload") == local
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: routes not synced: {out}\n{}",
                node.name,
                agents[i].log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers and the prober
// ---------------------------------------------------------------------------------------------

/// TCP and UDP servers on ports 80 and 81 in every pod, all served by one thread: TCP
/// connections are accepted and closed, UDP datagrams echoed. Stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Servers {
    fn start(pods: &[NetpolPod]) -> Self {
        let mut listeners = Vec::new();
        for pod in pods {
            let made = pod.sb.ns.run(|| {
                CASES
                    .iter()
                    .map(|c| {
                        let addr = (Ipv4Addr::UNSPECIFIED, c.port);
                        let l = match c.protocol {
                            Protocol::Tcp => Listener::Tcp(TcpListener::bind(addr).unwrap()),
                            Protocol::Udp => Listener::Udp(UdpSocket::bind(addr).unwrap()),
                            Protocol::Sctp => unreachable!("no SCTP server"),
                        };
                        match &l {
                            Listener::Tcp(s) => s.set_nonblocking(true).unwrap(),
                            Listener::Udp(s) => s.set_nonblocking(true).unwrap(),
                        }
                        l
                    })
                    .collect::<Vec<_>>()
            });
            listeners.extend(made);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(&listeners, &flag));
        Self {
            stop,
            threads: vec![thread],
        }
    }
}

fn serve(listeners: &[Listener], stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(s) => PollFd::new(s.as_fd(), PollFlags::POLLIN),
                Listener::Udp(s) => PollFd::new(s.as_fd(), PollFlags::POLLIN),
            })
            .collect();
        match poll(&mut fds, PollTimeout::from(50u16)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("poll the servers: {e}"),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            match l {
                // Accepting is all a probe needs (the handshake already completed); the
                // connection closes when the stream drops.
                Listener::Tcp(s) => while s.accept().is_ok() {},
                Listener::Udp(s) => {
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        if let Err(e) = s.send_to(&buf[..n], from) {
                            eprintln!("udp echo to {from}: {e}");
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if let Err(p) = t.join()
                && !std::thread::panicking()
            {
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// One probe in flight.
struct Probe {
    fd: OwnedFd,
    case: usize,
    target: usize,
    protocol: Protocol,
    payload: [u8; 8],
    result: Option<bool>,
}

const PROBE_PAYLOAD: &[u8; 4] = b"netp";

/// Opens a socket bound to the next source port of `src` (skipping ports still in use).
fn bound_socket(src: &NetpolPod, ty: SockType) -> OwnedFd {
    for _ in 0..32 {
        let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_NONBLOCK, None)
            .unwrap_or_else(|e| panic!("socket: {e}"));
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, src.source_port()));
        match bind(fd.as_raw_fd(), &addr) {
            Ok(()) => return fd,
            Err(Errno::EADDRINUSE) => continue,
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
    panic!("{}: no free source port", src.id());
}

/// Runs on a thread inside `src`'s namespace: one socket per (case, target), all in flight
/// together, answers collected with poll until the deadline. Returns [case][target].
fn probe_from(src: &NetpolPod, targets: &[Ipv4Addr], cases: &[Case]) -> Vec<Vec<bool>> {
    let start = Instant::now();
    let deadline = start + PROBE_DEADLINE;
    let mut probes = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        for (ti, ip) in targets.iter().enumerate() {
            let dst = SockaddrIn::from(SocketAddrV4::new(*ip, case.port));
            let ty = match case.protocol {
                Protocol::Tcp => SockType::Stream,
                Protocol::Udp => SockType::Datagram,
                Protocol::Sctp => panic!("SCTP is not probed"),
            };
            let fd = bound_socket(src, ty);
            let mut payload = [0u8; 8];
            payload[..4].copy_from_slice(PROBE_PAYLOAD);
            payload[4..].copy_from_slice(&u32::try_from(probes.len()).unwrap().to_be_bytes());
            let result = match connect(fd.as_raw_fd(), &dst) {
                Ok(()) if case.protocol == Protocol::Tcp => Some(true),
                Ok(()) => send(fd.as_raw_fd(), &payload, MsgFlags::empty())
                    .err()
                    .map(|_| false),
                Err(Errno::EINPROGRESS) => None,
                Err(_) => Some(false),
            };
            probes.push(Probe {
                fd,
                case: ci,
                target: ti,
                protocol: case.protocol,
                payload,
                result,
            });
        }
    }
    let mut next_resend = start + UDP_RESEND;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_resend {
            for p in probes
                .iter()
                .filter(|p| p.result.is_none() && p.protocol == Protocol::Udp)
            {
                // A failed resend is answered by the deadline like a lost datagram.
                let _unanswered = send(p.fd.as_raw_fd(), &p.payload, MsgFlags::empty());
            }
            next_resend += UDP_RESEND;
        }
        let pending: Vec<usize> = (0..probes.len())
            .filter(|&i| probes[i].result.is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        let wait = deadline.min(next_resend).saturating_duration_since(now);
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|&i| {
                let p = &probes[i];
                let ev = match p.protocol {
                    Protocol::Tcp => PollFlags::POLLOUT,
                    _ => PollFlags::POLLIN,
                };
                PollFd::new(p.fd.as_fd(), ev)
            })
            .collect();
        let ms = u16::try_from(wait.as_millis() + 1).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => panic!("poll the probes: {e}"),
        }
        let ready: Vec<(usize, PollFlags)> = pending
            .iter()
            .zip(&fds)
            .filter_map(|(&i, f)| f.revents().filter(|r| !r.is_empty()).map(|r| (i, r)))
            .collect();
        drop(fds);
        for (i, revents) in ready {
            let p = &mut probes[i];
            p.result = match p.protocol {
                Protocol::Tcp => Some(
                    revents.contains(PollFlags::POLLOUT)
                        && getsockopt(&p.fd, sockopt::SocketError).is_ok_and(|e| e == 0),
                ),
                _ => {
                    let mut buf = [0u8; 16];
                    match recv(p.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(n) => Some(buf[..n] == p.payload),
                        Err(Errno::EAGAIN) => None,
                        // An ICMP error (port or host unreachable) reported on the socket.
                        Err(_) => Some(false),
                    }
                }
            };
        }
    }
    let mut out = vec![vec![false; targets.len()]; cases.len()];
    for p in probes {
        out[p.case][p.target] = p.result.unwrap_or(false);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Sessions of scenarios
// ---------------------------------------------------------------------------------------------

/// How one scenario went.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub failure: Option<String>,
    pub elapsed: Duration,
    /// How many matrix checks the scenario's body made (the reset's not counted).
    pub checks: usize,
}

/// Applies policies and label changes to a [`NetpolCluster`] while keeping the model's view of
/// what the datastore holds (changed only when `ctl` succeeded), checks the probed matrices
/// against the model, and resets the cluster between scenarios.
///
/// A session made with [`Session::model_only`] has no cluster: the same scenarios run against
/// the model alone, and each check records the expected matrices instead of probing (to read
/// and sanity-check the expectations without root).
pub struct Session<'c> {
    pub cluster: Option<&'c NetpolCluster>,
    pub world: World,
    /// The world as it was made, which [`Session::reset`] restores.
    original: World,
    /// In a model-only session, every check's name and expected matrices.
    pub expectations: Vec<(String, Vec<Reachability>)>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
    results: Vec<ScenarioResult>,
    /// Every probe round's duration, for the summary.
    pub rounds: Vec<Duration>,
    checks: usize,
    files: usize,
    /// Whether `ctl delete` takes `--wait` (else the reset waits for the matrix instead).
    delete_waits: bool,
}

impl<'c> Session<'c> {
    pub fn new(cluster: &'c NetpolCluster) -> Self {
        Self::with(Some(cluster), cluster.world.clone())
    }

    /// A session on the model alone (see the type's documentation).
    pub fn model_only(world: World) -> Self {
        Self::with(None, world)
    }

    fn with(cluster: Option<&'c NetpolCluster>, world: World) -> Self {
        Self {
            cluster,
            original: world.clone(),
            world,
            expectations: Vec::new(),
            policies: BTreeMap::new(),
            results: Vec::new(),
            rounds: Vec::new(),
            checks: 0,
            files: 0,
            delete_waits: true,
        }
    }

    /// The address of pod `ns/name`.
    pub fn ip(&self, ns: &str, name: &str) -> Ipv4Addr {
        self.world.pod(ns, name).ip
    }

    /// The policies the datastore holds, as the model sees them.
    pub fn policies(&self) -> Vec<NetworkPolicy> {
        self.policies.values().cloned().collect()
    }

    fn file(&mut self, what: &str) -> String {
        self.files += 1;
        format!("{:03}-{what}.yaml", self.files)
    }

    /// Applies NetworkPolicy YAML (one or more documents) with `ctl apply --wait`; a policy of
    /// an existing name replaces it. Panics when the YAML is invalid or `ctl` fails.
    pub fn apply(&mut self, yaml: &str) {
        let parsed = parse_policies(yaml).unwrap_or_else(|e| panic!("{e} in\n{yaml}"));
        let file = self.file("policy");
        if let Some(c) = self.cluster {
            c.apply(&file, yaml).unwrap_or_else(|e| panic!("{e}"));
        }
        for p in parsed {
            let key = (p.metadata.namespace.clone(), p.metadata.name.clone());
            self.policies.insert(key, p);
        }
    }

    /// `ctl delete networkpolicy NAME -n NS` (with `--wait` when `ctl` takes it).
    pub fn delete(&mut self, ns: &str, name: &str) {
        let Some(c) = self.cluster else {
            self.policies.remove(&(ns.to_owned(), name.to_owned()));
            return;
        };
        let mut args = vec!["delete", "networkpolicy", name, "-n", ns];
        if self.delete_waits {
            args.push("--wait");
        }
        let (mut ok, mut out, mut err) = c.ctl(&args);
        if !ok && self.delete_waits && err.contains("--wait") {
            eprintln!(
                "note: `ctl delete` does not take --wait ({}); waiting on the matrix instead",
                err.trim()
            );
            self.delete_waits = false;
            args.pop();
            (ok, out, err) = c.ctl(&args);
        }
        assert!(ok, "ctl {}: {out}{err}", args.join(" "));
        self.policies.remove(&(ns.to_owned(), name.to_owned()));
    }

    /// Gives pod `ns/name` these labels (re-applying its Pod object with `--wait`).
    pub fn set_pod_labels(&mut self, ns: &str, name: &str, new: &[(&str, &str)]) {
        let i = self.world.pod_index(ns, name);
        let mut pod = self.world.pods[i].clone();
        pod.labels = labels(new);
        let file = self.file("pod");
        if let Some(c) = self.cluster {
            let node = &c.cluster.nodes[c.pods[i].node].name;
            c.apply(&file, &pod_yaml(&pod, node))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        self.world.pods[i] = pod;
    }

    /// Gives namespace `ns` these labels (re-applying its Namespace object with `--wait`).
    pub fn set_namespace_labels(&mut self, ns: &str, new: &[(&str, &str)]) {
        let i = self
            .world
            .namespaces
            .iter()
            .position(|n| n.name == ns)
            .unwrap_or_else(|| panic!("no namespace {ns}"));
        let mut info = self.world.namespaces[i].clone();
        info.labels = labels(new);
        let file = self.file("namespace");
        if let Some(c) = self.cluster {
            c.apply(&file, &namespace_yaml(&info))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        self.world.namespaces[i] = info;
    }

    /// The model's four matrices for what is applied now.
    pub fn expected(&self) -> Vec<Reachability> {
        let policies = self.policies();
        CASES
            .iter()
            .map(|c| self.world.reachability(&policies, *c))
            .collect()
    }

    fn probe_all(&mut self, c: &NetpolCluster) -> Vec<Reachability> {
        let t = Instant::now();
        let observed = c.probe(&CASES);
        self.rounds.push(t.elapsed());
        observed
    }

    /// Probes the four matrices and compares them with the model. A probe that was expected
    /// to connect but timed out is given two more rounds (the e2e suite retries too); one that
    /// connected where the model denies fails at once. Panics with the diffs on mismatch.
    pub fn check(&mut self, what: &str) {
        self.checks += 1;
        let expected = self.expected();
        let Some(c) = self.cluster else {
            self.expectations.push((what.to_owned(), expected));
            return;
        };
        let mut last = String::new();
        for attempt in 1..=3 {
            let observed = self.probe_all(c);
            let mut report = String::new();
            let mut wrongly_allowed = false;
            for ((case, exp), obs) in CASES.iter().zip(&expected).zip(&observed) {
                if let Some(d) = exp.diff(obs) {
                    wrongly_allowed |= exp.mismatches(obs).iter().any(|m| !m.2);
                    report.push_str(&format!("--- {what}: {case}\n{d}"));
                }
            }
            if report.is_empty() {
                if attempt > 1 {
                    eprintln!("note: {what}: matched on attempt {attempt}");
                }
                eprintln!(
                    "  ok: {what} ({} of {} probes allowed)",
                    expected
                        .iter()
                        .map(Reachability::allowed_count)
                        .sum::<usize>(),
                    expected.iter().map(|r| r.len() * r.len()).sum::<usize>()
                );
                return;
            }
            if wrongly_allowed {
                panic!("{what}: connections the model denies were allowed\n{report}");
            }
            eprintln!("note: {what}: attempt {attempt}: expected connections timed out:\n{report}");
            last = report;
        }
        panic!("{what}: the matrices differ from the model after 3 rounds\n{last}");
    }

    /// Probes until the matrices match the model or `timeout` passes (for changes that
    /// nothing waited for); panics with the last diff.
    pub fn check_eventually(&mut self, what: &str, timeout: Duration) {
        let Some(c) = self.cluster else {
            return self.check(what);
        };
        let deadline = Instant::now() + timeout;
        let expected = self.expected();
        loop {
            let observed = self.probe_all(c);
            let report: String = CASES
                .iter()
                .zip(&expected)
                .zip(&observed)
                .filter_map(|((c, e), o)| e.diff(o).map(|d| format!("--- {what}: {c}\n{d}")))
                .collect();
            if report.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no match after {timeout:?}\n{report}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one scenario: `body` applies and checks; whatever it panics with is recorded, and
    /// the cluster is then reset (policies deleted, labels restored, all-allowed matrix
    /// checked) so the next scenario starts clean.
    pub fn scenario(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        eprintln!("=== scenario: {name}");
        let t = Instant::now();
        let checks = self.checks;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(self)));
        let checks = self.checks - checks;
        let mut failure = outcome.err().map(|p| panic_text(&*p));
        if failure.is_none() && checks == 0 {
            failure = Some("the scenario checked nothing".to_owned());
        }
        let reset = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.reset()));
        if let Err(p) = reset {
            let text = format!("reset after the scenario: {}", panic_text(&*p));
            failure = Some(failure.map_or(text.clone(), |f| format!("{f}\n{text}")));
        }
        let elapsed = t.elapsed();
        match &failure {
            None => eprintln!("=== PASS {name} ({elapsed:.1?})"),
            Some(f) => eprintln!("=== FAIL {name} ({elapsed:.1?}): {}", first_line(f)),
        }
        self.results.push(ScenarioResult {
            name: name.to_owned(),
            failure,
            elapsed,
            checks,
        });
    }

    /// Deletes every policy, restores the original labels, and checks that everything is
    /// allowed again.
    pub fn reset(&mut self) {
        let keys: Vec<(String, String)> = self.policies.keys().cloned().collect();
        for (ns, name) in keys {
            self.delete(&ns, &name);
        }
        let original = self.original.clone();
        for (now, was) in self.world.pods.clone().iter().zip(&original.pods) {
            if now.labels != was.labels {
                let l: Vec<(&str, &str)> = was
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.set_pod_labels(&now.namespace, &now.name, &l);
            }
        }
        for (now, was) in self
            .world
            .namespaces
            .clone()
            .iter()
            .zip(&original.namespaces)
        {
            if now.labels != was.labels {
                let l: Vec<(&str, &str)> = was
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.set_namespace_labels(&now.name, &l);
            }
        }
        if self.delete_waits {
            self.check("reset: all allowed");
        } else {
            self.check_eventually("reset: all allowed", Duration::from_secs(10));
        }
    }

    pub fn results(&self) -> &[ScenarioResult] {
        &self.results
    }

    /// Prints the summary (every scenario, probe round timings) and panics when a scenario
    /// failed.
    pub fn finish(self) {
        let mut rounds = self.rounds.clone();
        rounds.sort();
        eprintln!("\n=== NetworkPolicy truth tables: summary");
        for r in &self.results {
            eprintln!(
                "{} {:<60} {:>6.1?} {} checks",
                if r.failure.is_none() { "PASS" } else { "FAIL" },
                r.name,
                r.elapsed,
                r.checks
            );
        }
        if let (Some(min), Some(max)) = (rounds.first(), rounds.last()) {
            eprintln!(
                "{} probe rounds of {} probes: min {min:.2?}, median {:.2?}, max {max:.2?}",
                rounds.len(),
                CASES.len() * self.world.pods.len() * self.world.pods.len(),
                rounds[rounds.len() / 2]
            );
        }
        let failed: Vec<&ScenarioResult> = self
            .results
            .iter()
            .filter(|r| r.failure.is_some())
            .collect();
        if !failed.is_empty() {
            let mut text = format!(
                "{} of {} scenarios failed:\n",
                failed.len(),
                self.results.len()
            );
            for r in failed {
                text.push_str(&format!(
                    "\n##### {}\n{}\n",
                    r.name,
                    r.failure.as_deref().unwrap_or_default()
                ));
            }
            panic!("{text}");
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The model's own tests: hand-worked cases, no root needed
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// a's on one node block, b's and c's on others, as in the cluster.
    fn world() -> World {
        World::e2e(|ns, pod| {
            let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8;
            let p = POD_NAMES.iter().position(|x| *x == pod).unwrap() as u8;
            Ipv4Addr::new(10, 65, 0, p * 64 + n + 1)
        })
    }

    fn policies(yaml: &str) -> Vec<NetworkPolicy> {
        parse_policies(yaml).unwrap()
    }

    const TCP80: Case = CASES[0];
    const TCP81: Case = CASES[1];
    const UDP80: Case = CASES[2];
    const UDP81: Case = CASES[3];

    /// The allowed (from, to) pairs of `case`, as `x/a>y/b` strings, loopback excluded.
    fn allowed_pairs(w: &World, ps: &[NetworkPolicy], case: Case) -> Vec<String> {
        let mut out = Vec::new();
        for f in 0..w.pods.len() {
            for t in 0..w.pods.len() {
                if f != t && w.allowed(ps, f, t, case) {
                    out.push(format!("{}>{}", w.pods[f].id(), w.pods[t].id()));
                }
            }
        }
        out
    }

    /// Sources that reach `to` on `case` (loopback excluded).
    fn sources(w: &World, ps: &[NetworkPolicy], to: &str, case: Case) -> Vec<String> {
        let (ns, name) = to.split_once('/').unwrap();
        let t = w.pod_index(ns, name);
        (0..w.pods.len())
            .filter(|&f| f != t && w.allowed(ps, f, t, case))
            .map(|f| w.pods[f].id())
            .collect()
    }

    /// Destinations `from` reaches on `case` (loopback excluded).
    fn destinations(w: &World, ps: &[NetworkPolicy], from: &str, case: Case) -> Vec<String> {
        let (ns, name) = from.split_once('/').unwrap();
        let f = w.pod_index(ns, name);
        (0..w.pods.len())
            .filter(|&t| t != f && w.allowed(ps, f, t, case))
            .map(|t| w.pods[t].id())
            .collect()
    }

    fn all_but(me: &str) -> Vec<String> {
        world()
            .pods
            .iter()
            .map(PodInfo::id)
            .filter(|p| p != me)
            .collect()
    }

    fn ids(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn no_policy_allows_everything() {
        let w = world();
        for c in CASES {
            assert_eq!(allowed_pairs(&w, &[], c).len(), 72);
            assert_eq!(w.reachability(&[], c).allowed_count(), 81);
        }
    }

    #[test]
    fn deny_all_ingress_isolates_only_its_namespace() {
        let w = world();
        let ps = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
        );
        for c in CASES {
            for to in ["x/a", "x/b", "x/c"] {
                assert_eq!(sources(&w, &ps, to, c), Vec::<String>::new());
            }
            assert_eq!(sources(&w, &ps, "y/a", c), all_but("y/a"));
            // x's pods still send anywhere outside x.
            assert_eq!(
                destinations(&w, &ps, "x/a", c),
                ids(&["y/a", "y/b", "y/c", "z/a", "z/b", "z/c"])
            );
            let r = w.reachability(&ps, c);
            let xa = w.pod_index("x", "a");
            assert!(r.get(xa, xa), "loopback stays allowed");
            assert_eq!(r.allowed_count(), 81 - 9 * 3 + 3);
        }
    }

    #[test]
    fn deny_all_egress_and_policy_type_inference() {
        let w = world();
        let deny_egress = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n",
        );
        assert_eq!(
            destinations(&w, &deny_egress, "y/b", TCP80),
            Vec::<String>::new()
        );
        assert_eq!(
            sources(&w, &deny_egress, "y/b", TCP80),
            ids(&["x/a", "x/b", "x/c", "z/a", "z/b", "z/c"])
        );

        // No policyTypes and egress rules: Ingress (with no rules: deny) and Egress.
        let inferred = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: b}}}]\n",
        );
        assert_eq!(inferred[0].policy_types(), (true, true));
        assert_eq!(destinations(&w, &inferred, "x/a", TCP80), ids(&["x/b"]));
        assert_eq!(sources(&w, &inferred, "x/a", TCP80), Vec::<String>::new());

        // No policyTypes and `egress: []`: the API server's defaulting sees no egress rules,
        // so the policy is Ingress-only: x's pods send anywhere but to each other (x's
        // ingress is closed).
        let empty = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: []\n",
        );
        assert_eq!(empty[0].policy_types(), (true, false));
        assert_eq!(
            destinations(&w, &empty, "x/a", TCP80),
            ids(&["y/a", "y/b", "y/c", "z/a", "z/b", "z/c"])
        );

        // Explicit types with empty rule lists: both directions closed.
        let both = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: z}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress: []\n  egress: []\n  policyTypes: [Ingress, Egress]\n",
        );
        assert_eq!(destinations(&w, &both, "z/c", UDP81), Vec::<String>::new());
        assert_eq!(sources(&w, &both, "z/c", UDP81), Vec::<String>::new());
        assert_eq!(
            destinations(&w, &both, "z/b", UDP81),
            ids(&["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a"])
        );

        let egress_only = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{}]\n  policyTypes: [Egress]\n",
        );
        // Egress-only: z's ingress stays open (the ingress rules are ignored), to all but z's
        // own pods, whose egress is closed.
        assert_eq!(
            sources(&w, &egress_only, "z/a", TCP80),
            ids(&["x/a", "x/b", "x/c", "y/a", "y/b", "y/c"])
        );
        assert_eq!(
            destinations(&w, &egress_only, "z/a", TCP80),
            Vec::<String>::new()
        );
    }

    #[test]
    fn peers_and_of_selectors_or_of_peers() {
        let w = world();
        let and = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n",
        );
        assert_eq!(sources(&w, &and, "x/a", TCP80), ids(&["y/b"]));
        let or = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n",
        );
        assert_eq!(
            sources(&w, &or, "x/a", TCP80),
            ids(&["x/b", "y/a", "y/b", "y/c"])
        );
        // podSelector alone: the policy's own namespace only.
        let same_ns = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n",
        );
        assert_eq!(sources(&w, &same_ns, "z/b", UDP80), ids(&["z/a", "z/c"]));
        assert_eq!(sources(&w, &same_ns, "x/b", UDP80), all_but("x/b"));
        // namespaceSelector {}: every namespace.
        let all_ns = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]}]\n",
        );
        assert_eq!(
            sources(&w, &all_ns, "z/a", TCP81),
            ids(&["x/c", "y/c", "z/c"])
        );
        // The automatic namespace label.
        let by_name = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]\n",
        );
        assert_eq!(
            sources(&w, &by_name, "x/c", TCP80),
            ids(&["z/a", "z/b", "z/c"])
        );
        // A policy selects pods of its own namespace only.
        assert_eq!(sources(&w, &by_name, "y/c", TCP80), all_but("y/c"));
    }

    #[test]
    fn match_expressions() {
        let l = labels(&[("pod", "a"), ("tier", "web")]);
        let req = |key: &str, operator, values: &[&str]| Requirement {
            key: key.to_owned(),
            operator,
            values: ids(values),
        };
        assert!(req("pod", Operator::In, &["a", "b"]).matches(&l));
        assert!(!req("pod", Operator::In, &["b"]).matches(&l));
        assert!(!req("role", Operator::In, &["a"]).matches(&l));
        assert!(req("pod", Operator::NotIn, &["b"]).matches(&l));
        assert!(!req("pod", Operator::NotIn, &["a"]).matches(&l));
        assert!(
            req("role", Operator::NotIn, &["a"]).matches(&l),
            "absent key is not in"
        );
        assert!(req("tier", Operator::Exists, &[]).matches(&l));
        assert!(!req("role", Operator::Exists, &[]).matches(&l));
        assert!(req("role", Operator::DoesNotExist, &[]).matches(&l));
        assert!(!req("tier", Operator::DoesNotExist, &[]).matches(&l));
        let sel = LabelSelector {
            match_labels: labels(&[("pod", "a")]),
            match_expressions: vec![req("tier", Operator::In, &["db"])],
        };
        assert!(
            !sel.matches(&l),
            "matchLabels and matchExpressions are ANDed"
        );
        assert!(LabelSelector::default().matches(&Labels::new()));

        let w = world();
        let not_in = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: ns, operator: NotIn, values: [y]}]\n",
        );
        assert_eq!(
            sources(&w, &not_in, "x/a", TCP80),
            ids(&["x/b", "x/c", "z/a", "z/b", "z/c"])
        );
        // DoesNotExist on the target selector: selects nothing, isolates nothing.
        let nothing = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}\n  policyTypes: [Ingress, Egress]\n",
        );
        assert_eq!(allowed_pairs(&w, &nothing, TCP80).len(), 72);
    }

    #[test]
    fn ip_blocks() {
        let w = world();
        let yb = w.pod("y", "b").ip;
        let one = policies(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {yb}/32}}}}]}}]\n"
        ));
        assert_eq!(sources(&w, &one, "x/a", UDP81), ids(&["y/b"]));
        // The b's share 10.65.0.64/26.
        let except = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 10.65.0.0/16, except: [10.65.0.64/26]}}]}]\n",
        );
        assert_eq!(
            sources(&w, &except, "x/a", TCP80),
            ids(&["x/c", "y/a", "y/c", "z/a", "z/c"])
        );
        // Egress to an ipBlock: the destination's address.
        let egress = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.65.0.128/25, except: [10.65.0.129/32]}}]}]\n",
        );
        assert_eq!(
            destinations(&w, &egress, "z/a", TCP80),
            ids(&["y/c", "z/c"])
        );
        assert!(
            IpBlock {
                cidr: "0.0.0.0/0".into(),
                except: vec![]
            }
            .contains(yb)
        );
    }

    #[test]
    fn ports_numbers_names_ranges_protocols() {
        let w = world();
        let with_ports = |ports: &str| {
            policies(&format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: {ports}}}]\n"
            ))
        };
        let open = |ps: &[NetworkPolicy]| -> Vec<String> {
            CASES
                .iter()
                .filter(|c| sources(&w, ps, "x/a", **c).len() == 8)
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(open(&with_ports("[{port: 80}]")), ["80/TCP"]);
        assert_eq!(open(&with_ports("[{port: serve-81-tcp}]")), ["81/TCP"]);
        assert_eq!(
            open(&with_ports("[{port: 80, endPort: 81, protocol: TCP}]")),
            ["80/TCP", "81/TCP"]
        );
        assert_eq!(open(&with_ports("[{port: 81, endPort: 85}]")), ["81/TCP"]);
        assert_eq!(open(&with_ports("[{protocol: UDP}]")), ["80/UDP", "81/UDP"]);
        // A named UDP port with the default protocol (TCP) matches nothing.
        assert_eq!(
            open(&with_ports("[{port: serve-80-udp}]")),
            Vec::<String>::new()
        );
        assert_eq!(
            open(&with_ports("[{port: serve-80-udp, protocol: UDP}]")),
            ["80/UDP"]
        );
        assert_eq!(
            open(&with_ports("[]")),
            ["80/TCP", "81/TCP", "80/UDP", "81/UDP"]
        );
        assert_eq!(open(&with_ports("[{port: 82}]")), Vec::<String>::new());
        // A named port resolves on the destination: a pod without that name is not matched.
        let mut w2 = w.clone();
        let xa = w2.pod_index("x", "a");
        w2.pods[xa].ports.retain(|p| p.name != "serve-81-tcp");
        let ps = with_ports("[{port: serve-81-tcp}]");
        assert!(sources(&w2, &ps, "x/a", TCP81).is_empty());
        assert_eq!(sources(&w2, &ps, "x/b", TCP81).len(), 8);
        let _ = (UDP80, UDP81);
    }

    #[test]
    fn both_directions_must_allow_and_policies_union() {
        let w = world();
        let ps = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]\n",
        );
        // x/a may send only to y; y/b accepts only from z: x/a reaches y/a and y/c.
        assert_eq!(destinations(&w, &ps, "x/a", TCP80), ids(&["y/a", "y/c"]));
        assert_eq!(sources(&w, &ps, "y/b", TCP80), ids(&["z/a", "z/b", "z/c"]));

        let union = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p1, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p2, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]\n",
        );
        assert_eq!(
            sources(&w, &union, "x/a", TCP80),
            ids(&["y/a", "y/b", "y/c"])
        );
        assert_eq!(
            sources(&w, &union, "x/a", TCP81),
            ids(&["z/a", "z/b", "z/c"])
        );
        assert!(sources(&w, &union, "x/a", UDP80).is_empty());
    }

    #[test]
    fn label_changes_move_pods_in_and_out_of_selectors() {
        let mut w = world();
        let ps = policies(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]\n",
        );
        assert_eq!(sources(&w, &ps, "x/a", TCP80), ids(&["y/b"]));
        let yc = w.pod_index("y", "c");
        w.pods[yc].labels = labels(&[("pod", "b")]);
        assert_eq!(sources(&w, &ps, "x/a", TCP80), ids(&["y/b", "y/c"]));
        let z = w.namespaces.iter().position(|n| n.name == "z").unwrap();
        w.namespaces[z].labels = labels(&[("ns", "y")]);
        assert_eq!(sources(&w, &ps, "x/a", TCP80), ids(&["y/b", "y/c", "z/b"]));
        // The target side: x/c now selected, so isolated.
        let xc = w.pod_index("x", "c");
        w.pods[xc].labels = labels(&[("pod", "a")]);
        assert_eq!(sources(&w, &ps, "x/c", TCP80), ids(&["y/b", "y/c", "z/b"]));
    }

    #[test]
    fn invalid_policies_are_refused() {
        let bad = [
            ("ingress: [{from: [{}]}]", "no selector"),
            (
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
                "ipBlock together",
            ),
            (
                "ingress: [{ports: [{port: serve-80-tcp, endPort: 81}]}]",
                "named port",
            ),
            ("ingress: [{ports: [{port: 81, endPort: 80}]}]", "below"),
            (
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
                "not inside",
            ),
            (
                "podSelector: {matchExpressions: [{key: a, operator: In}]}",
                "needs",
            ),
            ("podselector: {}", "unknown field"),
            (
                "ingress: [{to: [{podSelector: {}}]}]",
                "`to` in an ingress rule",
            ),
            (
                "egress: [{from: [{podSelector: {}}]}]",
                "`from` in an egress rule",
            ),
        ];
        for (spec, why) in bad {
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  {spec}\n"
            );
            let e = parse_policies(&yaml).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn matrix_printing_and_diff() {
        let names = ids(&["x/a", "x/b"]);
        let mut exp = Reachability::new(names.clone(), true);
        exp.set(0, 1, false);
        assert_eq!(exp.to_string(), "-   x/a x/b\nx/a .   X\nx/b .   .\n");
        assert_eq!(exp.diff(&exp.clone()), None);
        let obs = Reachability::new(names, true);
        let d = exp.diff(&obs).unwrap();
        assert!(d.contains("x/a .   .!\n"), "{d}");
        assert!(
            d.contains("x/a -> x/b: expected denied, observed allowed"),
            "{d}"
        );
        assert_eq!(exp.mismatches(&obs), [(0, 1, false)]);
    }

    #[test]
    fn generated_objects_read_back() {
        let w = world();
        let y: serde_json::Value =
            serde_yaml_ng::from_str(&pod_yaml(w.pod("x", "b"), "node-2")).unwrap();
        assert_eq!(y["metadata"]["labels"]["pod"], "b");
        assert_eq!(y["spec"]["nodeName"], "node-2");
        assert_eq!(y["spec"]["containers"][1]["name"], "cont-81-tcp");
        assert_eq!(
            y["spec"]["containers"][1]["ports"][0]["name"],
            "serve-81-tcp"
        );
        assert_eq!(y["spec"]["containers"][2]["ports"][0]["protocol"], "UDP");
        let n: serde_json::Value =
            serde_yaml_ng::from_str(&namespace_yaml(w.namespace("z"))).unwrap();
        assert_eq!(n["metadata"]["labels"]["ns"], "z");
        let docs = documents(&[
            namespace_yaml(w.namespace("x")),
            namespace_yaml(w.namespace("y")),
        ]);
        assert_eq!(serde_yaml_ng::Deserializer::from_str(&docs).count(), 2);
    }
}

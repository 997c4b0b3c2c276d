//! Calico v3 resources as stored in etcd: JSON with Calico's field names (camelCase, `kind`,
//! `apiVersion: projectcalico.org/v3`, `metadata`, `spec`).
//!
//! Reading is tolerant: unknown fields are kept (in `extra`) and written back unchanged, so a
//! resource written by Calico's own tools survives a read-modify-write here. What IPAM and the
//! dataplane rely on is checked where it is used ([`IpPool::validate`], [`Node::ipv4_address`]).

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::keys;

/// The `apiVersion` of every resource here.
pub const API_VERSION: &str = "projectcalico.org/v3";
/// Name of the pool made when none exists, as Calico names it.
pub const DEFAULT_POOL_NAME: &str = "default-ipv4-ippool";
/// Block sizes Calico accepts for IPv4 pools.
pub const BLOCK_SIZES: std::ops::RangeInclusive<u8> = 20..=32;
/// The default pool's CIDR when the CNI config names none.
pub const DEFAULT_POOL_CIDR: Ipv4Net =
    Ipv4Net::new_assert(std::net::Ipv4Addr::new(10, 65, 0, 0), 16);
/// Block size when a pool does not say.
pub const DEFAULT_BLOCK_SIZE: u8 = 26;

pub(crate) fn api_version() -> String {
    API_VERSION.to_owned()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Fields this crate does not model (annotations, …), kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ObjectMeta {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// An encapsulation mode (`ipipMode`, `vxlanMode`). Absent or empty means `Never`, as in
/// Calico's API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpipMode {
    Always,
    CrossSubnet,
    #[default]
    #[serde(alias = "")]
    Never,
}

/// `vxlanMode` takes the same values as `ipipMode`.
pub type VxlanMode = IpipMode;

/// `IPPool.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// Kept as text so that a bad value is reported by [`IpPool::validate`] with the pool's
    /// name rather than as an anonymous parse error.
    pub cidr: String,
    #[serde(default = "default_block_size")]
    pub block_size: i64,
    #[serde(default)]
    pub ipip_mode: IpipMode,
    #[serde(default)]
    pub vxlan_mode: VxlanMode,
    #[serde(default)]
    pub nat_outgoing: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_selector: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl IpPoolSpec {
    /// A spec with Calico's defaults: no encapsulation, no NAT, enabled, on every node.
    pub fn new(cidr: Ipv4Net, block_size: u8) -> Self {
        Self {
            cidr: cidr.to_string(),
            block_size: i64::from(block_size),
            ipip_mode: IpipMode::Never,
            vxlan_mode: IpipMode::Never,
            nat_outgoing: false,
            disabled: false,
            node_selector: String::new(),
            extra: Map::new(),
        }
    }
}

fn default_block_size() -> i64 {
    i64::from(DEFAULT_BLOCK_SIZE)
}

/// An IPPool resource (`…/ippools/<name>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpPool {
    #[serde(default = "IpPool::kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: IpPoolSpec,
}

/// An IPv4 pool checked for what IPAM relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub cidr: Ipv4Net,
    pub block_size: u8,
    pub disabled: bool,
    pub ipip_mode: IpipMode,
    pub vxlan_mode: VxlanMode,
    pub nat_outgoing: bool,
    pub node_selector: String,
}

impl Pool {
    /// Every block of this pool, in address order.
    pub fn blocks(&self) -> impl Iterator<Item = Ipv4Net> + use<> {
        // validate() guarantees block_size >= the pool's prefix and <= 32, so subnets() has
        // a valid argument; an empty iterator otherwise rather than a panic.
        self.cidr.subnets(self.block_size).into_iter().flatten()
    }
}

impl IpPool {
    fn kind() -> String {
        "IPPool".to_owned()
    }

    pub fn new(name: &str, spec: IpPoolSpec) -> Self {
        Self {
            kind: Self::kind(),
            api_version: api_version(),
            metadata: ObjectMeta::named(name),
            spec,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Checks the pool: `Ok(None)` for an IPv6 pool (valid, but this IPAM is IPv4 only),
    /// `Err(reason)` when the CIDR does not parse, is not a network address, or the block
    /// size is outside 20..=32 or larger than the pool.
    pub fn validate(&self) -> Result<Option<Pool>, String> {
        let spec = &self.spec;
        let net: IpNet = spec
            .cidr
            .parse()
            .map_err(|_| format!("spec.cidr {:?} is not a CIDR", spec.cidr))?;
        let IpNet::V4(cidr) = net else {
            return Ok(None);
        };
        if cidr.trunc() != cidr {
            return Err(format!(
                "spec.cidr {cidr} is not a network address (did you mean {}?)",
                cidr.trunc()
            ));
        }
        let block_size = u8::try_from(spec.block_size)
            .ok()
            .filter(|b| BLOCK_SIZES.contains(b))
            .ok_or_else(|| {
                format!(
                    "spec.blockSize {} is outside {}..={}",
                    spec.block_size,
                    BLOCK_SIZES.start(),
                    BLOCK_SIZES.end()
                )
            })?;
        if block_size < cidr.prefix_len() {
            return Err(format!(
                "spec.blockSize /{block_size} is larger than the pool {cidr}"
            ));
        }
        Ok(Some(Pool {
            name: self.metadata.name.clone(),
            cidr,
            block_size,
            disabled: spec.disabled,
            ipip_mode: spec.ipip_mode,
            vxlan_mode: spec.vxlan_mode,
            nat_outgoing: spec.nat_outgoing,
            node_selector: spec.node_selector.clone(),
        }))
    }
}

/// What [`super::Datastore::ensure_default_pool`] creates when no pool exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultPoolOptions {
    pub cidr: Ipv4Net,
    pub block_size: u8,
    pub ipip_mode: IpipMode,
    pub nat_outgoing: bool,
}

impl Default for DefaultPoolOptions {
    fn default() -> Self {
        Self {
            cidr: DEFAULT_POOL_CIDR,
            block_size: DEFAULT_BLOCK_SIZE,
            ipip_mode: IpipMode::Always,
            nat_outgoing: true,
        }
    }
}

impl DefaultPoolOptions {
    /// The `default-ipv4-ippool` resource, as Calico writes its default pool.
    pub fn to_pool(&self) -> IpPool {
        IpPool::new(
            DEFAULT_POOL_NAME,
            IpPoolSpec {
                ipip_mode: self.ipip_mode,
                nat_outgoing: self.nat_outgoing,
                node_selector: "all()".to_owned(),
                ..IpPoolSpec::new(self.cidr, self.block_size)
            },
        )
    }
}

/// `Node.spec.bgp`: the node's address on the fabric, with its prefix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeBgpSpec {
    #[serde(
        rename = "ipv4Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<String>,
    #[serde(
        rename = "ipv4IPIPTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_ipip_tunnel_addr: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `Node.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgpSpec>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A Node resource (`…/nodes/<name>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    #[serde(default = "Node::kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
}

impl Node {
    fn kind() -> String {
        "Node".to_owned()
    }

    /// Node `name` with its fabric address (e.g. 192.168.1.10/24).
    pub fn new(name: &str, ipv4_address: Option<Ipv4Net>) -> Self {
        Self {
            kind: Self::kind(),
            api_version: api_version(),
            metadata: ObjectMeta::named(name),
            spec: NodeSpec {
                bgp: ipv4_address.map(|a| NodeBgpSpec {
                    ipv4_address: Some(a.to_string()),
                    ..NodeBgpSpec::default()
                }),
                extra: Map::new(),
            },
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// `spec.bgp.ipv4Address` (address and prefix, e.g. 192.168.1.10/24); `Err(reason)` when
    /// it is set but not an IPv4 address with a prefix.
    pub fn ipv4_address(&self) -> Result<Option<Ipv4Net>, String> {
        let Some(text) = self
            .spec
            .bgp
            .as_ref()
            .and_then(|b| b.ipv4_address.as_deref())
        else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|_| {
            format!("spec.bgp.ipv4Address {text:?} is not an IPv4 address with a prefix")
        })
    }
}

/// One named port of a WorkloadEndpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    pub name: String,
    /// `TCP`, `UDP`, `SCTP` or a protocol number, as Calico's `numorstring.Protocol`.
    pub protocol: Value,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// `WorkloadEndpoint.spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpointSpec {
    #[serde(default)]
    pub orchestrator: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub node: String,
    #[serde(rename = "containerID", default)]
    pub container_id: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub interface_name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub ip_networks: Vec<String>,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A WorkloadEndpoint resource (`…/workloadendpoints/<ns>/<node>-k8s-<pod>-<iface>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpoint {
    #[serde(default = "WorkloadEndpoint::kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEndpointSpec,
}

/// What a pod's WorkloadEndpoint is made of (see [`WorkloadEndpoint::new`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadEndpointArgs {
    pub namespace: String,
    pub node: String,
    pub pod: String,
    /// The pod-side interface (CNI_IFNAME), e.g. `eth0`.
    pub endpoint: String,
    pub container_id: String,
    /// The host-side veth, e.g. `cali1a2b3c4d5e6`.
    pub interface_name: String,
    pub mac: String,
    pub ip_networks: Vec<String>,
    pub profiles: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl WorkloadEndpoint {
    fn kind() -> String {
        "WorkloadEndpoint".to_owned()
    }

    /// A Kubernetes pod's endpoint, named as Calico names it.
    pub fn new(a: WorkloadEndpointArgs) -> Self {
        Self {
            kind: Self::kind(),
            api_version: api_version(),
            metadata: ObjectMeta {
                name: keys::workload_endpoint_name(&a.node, &a.pod, &a.endpoint),
                namespace: Some(a.namespace),
                labels: Some(a.labels),
                ..ObjectMeta::default()
            },
            spec: WorkloadEndpointSpec {
                orchestrator: "k8s".to_owned(),
                workload: String::new(),
                node: a.node,
                container_id: a.container_id,
                pod: a.pod,
                endpoint: a.endpoint,
                interface_name: a.interface_name,
                mac: a.mac,
                ip_networks: a.ip_networks,
                profiles: a.profiles,
                ports: None,
                extra: Map::new(),
            },
        }
    }

    /// Where this endpoint is stored: from its namespace, node, pod and endpoint.
    pub fn key(&self) -> String {
        keys::workload_endpoint(
            self.metadata.namespace.as_deref().unwrap_or("default"),
            &self.spec.node,
            &self.spec.pod,
            &self.spec.endpoint,
        )
    }

    pub fn container_id(&self) -> &str {
        &self.spec.container_id
    }

    pub fn interface_name(&self) -> &str {
        &self.spec.interface_name
    }

    pub fn ip_networks(&self) -> &[String] {
        &self.spec.ip_networks
    }

    pub fn node(&self) -> &str {
        &self.spec.node
    }
}

/// `Profile.spec`; rules (`ingress`, `egress`) are kept in `extra`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_to_apply: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A Profile resource (`…/profiles/<name>`; a namespace's is `kns.<ns>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    #[serde(default = "Profile::kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ProfileSpec,
}

impl Profile {
    fn kind() -> String {
        "Profile".to_owned()
    }

    pub fn new(name: &str, labels_to_apply: BTreeMap<String, String>) -> Self {
        Self {
            kind: Self::kind(),
            api_version: api_version(),
            metadata: ObjectMeta::named(name),
            spec: ProfileSpec {
                labels_to_apply: Some(labels_to_apply),
                extra: Map::new(),
            },
        }
    }

    /// The labels endpoints using this profile inherit (a namespace's labels for `kns.<ns>`).
    pub fn labels_to_apply(&self) -> BTreeMap<String, String> {
        self.spec.labels_to_apply.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ippool_defaults_as_calicos_api() {
        let pool: IpPool = serde_json::from_value(json!({
            "kind": "IPPool", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "p", "uid": "u-1", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"cidr": "10.65.0.0/16", "allowedUses": ["Workload", "Tunnel"]}
        }))
        .unwrap();
        assert_eq!(pool.spec.block_size, 26);
        assert_eq!(pool.spec.ipip_mode, IpipMode::Never);
        assert_eq!(pool.spec.vxlan_mode, IpipMode::Never);
        assert!(!pool.spec.nat_outgoing && !pool.spec.disabled);
        let v = pool.validate().unwrap().unwrap();
        assert_eq!(v.cidr, "10.65.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(v.block_size, 26);
        assert_eq!(v.blocks().count(), 1024);
        // Unknown fields survive a round trip.
        let back = serde_json::to_value(&pool).unwrap();
        assert_eq!(back["spec"]["allowedUses"], json!(["Workload", "Tunnel"]));
        assert_eq!(back["metadata"]["uid"], "u-1");
        assert_eq!(back["spec"]["blockSize"], 26);
    }

    #[test]
    fn empty_ipip_mode_is_never_and_names_are_calicos() {
        let pool: IpPool = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"cidr": "10.0.0.0/8", "ipipMode": "", "vxlanMode": "CrossSubnet", "natOutgoing": true}
        }))
        .unwrap();
        assert_eq!(pool.spec.ipip_mode, IpipMode::Never);
        assert_eq!(pool.spec.vxlan_mode, IpipMode::CrossSubnet);
        let v = serde_json::to_value(DefaultPoolOptions::default().to_pool()).unwrap();
        assert_eq!(
            v,
            json!({
                "kind": "IPPool", "apiVersion": "projectcalico.org/v3",
                "metadata": {"name": "default-ipv4-ippool"},
                "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, "ipipMode": "Always",
                         "vxlanMode": "Never", "natOutgoing": true, "nodeSelector": "all()"}
            })
        );
    }

    #[test]
    fn invalid_pools_say_what_is_wrong() {
        let pool = |cidr: &str, bs: i64| {
            IpPool::new(
                "p",
                IpPoolSpec {
                    block_size: bs,
                    ..DefaultPoolOptions::default().to_pool().spec
                }
                .with_cidr(cidr),
            )
        };
        let err = pool("10.65.0.0/33", 26).validate().unwrap_err();
        assert!(
            err.contains("spec.cidr \"10.65.0.0/33\" is not a CIDR"),
            "{err}"
        );
        let err = pool("10.65.0.1/16", 26).validate().unwrap_err();
        assert!(err.contains("not a network address"), "{err}");
        let err = pool("10.65.0.0/16", 19).validate().unwrap_err();
        assert!(
            err.contains("spec.blockSize 19 is outside 20..=32"),
            "{err}"
        );
        let err = pool("10.65.0.0/16", 33).validate().unwrap_err();
        assert!(err.contains("spec.blockSize 33"), "{err}");
        let err = pool("10.65.0.0/16", -1).validate().unwrap_err();
        assert!(err.contains("spec.blockSize -1"), "{err}");
        let err = pool("10.65.0.0/28", 26).validate().unwrap_err();
        assert!(err.contains("larger than the pool"), "{err}");
        assert_eq!(pool("fd00::/48", 26).validate(), Ok(None));
        let small = pool("10.66.0.0/28", 30).validate().unwrap().unwrap();
        let blocks: Vec<String> = small.blocks().map(|b| b.to_string()).collect();
        assert_eq!(
            blocks,
            [
                "10.66.0.0/30",
                "10.66.0.4/30",
                "10.66.0.8/30",
                "10.66.0.12/30"
            ]
        );
    }

    impl IpPoolSpec {
        fn with_cidr(mut self, cidr: &str) -> Self {
            self.cidr = cidr.to_owned();
            self
        }
    }

    #[test]
    fn node_address_keeps_its_prefix() {
        let n = Node::new("node-1", Some("192.168.1.10/24".parse().unwrap()));
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(
            v,
            json!({"kind": "Node", "apiVersion": "projectcalico.org/v3",
                   "metadata": {"name": "node-1"},
                   "spec": {"bgp": {"ipv4Address": "192.168.1.10/24"}}})
        );
        let back: Node = serde_json::from_value(v).unwrap();
        assert_eq!(
            back.ipv4_address().unwrap().unwrap().to_string(),
            "192.168.1.10/24"
        );
        let bad: Node = serde_json::from_value(
            json!({"metadata": {"name": "n"}, "spec": {"bgp": {"ipv4Address": "x"}}}),
        )
        .unwrap();
        assert!(bad.ipv4_address().unwrap_err().contains("\"x\""));
        let none: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(none.ipv4_address(), Ok(None));
    }

    #[test]
    fn workload_endpoint_json_is_calicos() {
        let wep = WorkloadEndpoint::new(WorkloadEndpointArgs {
            namespace: "default".into(),
            node: "node-1".into(),
            pod: "web-0".into(),
            endpoint: "eth0".into(),
            container_id: "c1".into(),
            interface_name: "cali0123456789a".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            ip_networks: vec!["10.65.0.1/32".into()],
            profiles: vec!["kns.default".into()],
            labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        });
        assert_eq!(
            wep.key(),
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-web--0-eth0"
        );
        let v = serde_json::to_value(&wep).unwrap();
        assert_eq!(v["metadata"]["name"], "node--1-k8s-web--0-eth0");
        assert_eq!(v["metadata"]["namespace"], "default");
        assert_eq!(v["spec"]["containerID"], "c1");
        assert_eq!(v["spec"]["interfaceName"], "cali0123456789a");
        assert_eq!(v["spec"]["ipNetworks"], json!(["10.65.0.1/32"]));
        assert_eq!(v["spec"]["orchestrator"], "k8s");
        assert!(v["spec"].get("ports").is_none());
        let with_ports: WorkloadEndpoint = serde_json::from_value(json!({
            "kind": "WorkloadEndpoint", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"node": "n", "pod": "p", "endpoint": "eth0", "containerID": "c",
                     "serviceAccountName": "default",
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80},
                               {"name": "dns", "protocol": 17, "port": 53, "hostPort": 5353}]}
        }))
        .unwrap();
        let ports = with_ports.spec.ports.as_ref().unwrap();
        assert_eq!(ports[1].host_port, Some(5353));
        assert_eq!(with_ports.spec.extra["serviceAccountName"], "default");
        assert_eq!(with_ports.container_id(), "c");
    }

    #[test]
    fn profile_labels() {
        let p: Profile = serde_json::from_value(json!({
            "kind": "Profile", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "kns.prod"},
            "spec": {"labelsToApply": {"pcns.env": "prod"}, "ingress": [{"action": "Allow"}]}
        }))
        .unwrap();
        assert_eq!(p.labels_to_apply()["pcns.env"], "prod");
        assert_eq!(p.spec.extra["ingress"][0]["action"], "Allow");
        let empty: Profile = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(empty.labels_to_apply().is_empty());
    }
}

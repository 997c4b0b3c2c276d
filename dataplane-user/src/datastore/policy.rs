//! Calico v3 policy resources as stored in etcd: NetworkPolicy (namespaced) and
//! GlobalNetworkPolicy, with Calico's field names. Kubernetes NetworkPolicies are stored in
//! this form too, translated the way Calico's controllers do (`knp.default.<name>`).
//!
//! Parsing is strict where a wrong guess would change what is allowed: an unknown action or
//! policy type, a malformed port or protocol is an error (the agent logs the key and skips
//! the policy). Unknown fields are kept in `extra`.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::resources::ObjectMeta;
use crate::policy::selector::Selector;

/// Order of policies that give none (Calico: they sort after every ordered policy).
pub const DEFAULT_ORDER: f64 = f64::INFINITY;
/// Order Calico gives translated Kubernetes NetworkPolicies.
pub const K8S_POLICY_ORDER: f64 = 1000.0;
/// Name prefix of a translated Kubernetes NetworkPolicy.
pub const K8S_POLICY_PREFIX: &str = "knp.default.";

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of the tier: the namespace profile decides (it allows).
    Pass,
    /// Record the match and go on to the next rule.
    Log,
}

/// A direction a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// A protocol by name (`TCP`, `UDP`, `ICMP`, `SCTP`, `UDPLite`, `ICMPv6`) or number (1–255).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Protocol {
    Number(u8),
    Name(String),
}

impl Protocol {
    /// The IP protocol number; `Err` for an unknown name.
    pub fn number(&self) -> Result<u8, String> {
        match self {
            Self::Number(0) => Err("protocol 0 is not a protocol".to_owned()),
            Self::Number(n) => Ok(*n),
            Self::Name(name) => match name.to_ascii_uppercase().as_str() {
                "TCP" => Ok(6),
                "UDP" => Ok(17),
                "ICMP" => Ok(1),
                "SCTP" => Ok(132),
                "UDPLITE" => Ok(136),
                "ICMPV6" => Ok(58),
                other => other
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| format!("unknown protocol {name:?}")),
            },
        }
    }

    /// Whether rules may match ports of this protocol.
    pub fn has_ports(number: u8) -> bool {
        matches!(number, 6 | 17 | 132 | 136)
    }
}

/// One entry of `ports`/`notPorts`: a number, `"80"`, a range `"8000:8080"`, or a named port
/// (`"http"`) that resolves to the port of that name on the endpoint it is matched against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Port {
    Number(u16),
    Text(String),
}

/// A port entry, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// `first..=last`.
    Range(u16, u16),
    Named(String),
}

impl Port {
    pub fn parse(&self) -> Result<PortMatch, String> {
        match self {
            Self::Number(n) => Ok(PortMatch::Range(*n, *n)),
            Self::Text(t) => {
                let t = t.trim();
                if let Some((a, b)) = t.split_once(':') {
                    let a: u16 = a.parse().map_err(|_| format!("bad port range {t:?}"))?;
                    let b: u16 = b.parse().map_err(|_| format!("bad port range {t:?}"))?;
                    if a > b {
                        return Err(format!("port range {t:?} ends before it starts"));
                    }
                    Ok(PortMatch::Range(a, b))
                } else if let Ok(n) = t.parse::<u16>() {
                    Ok(PortMatch::Range(n, n))
                } else if !t.is_empty()
                    && t.len() <= 15
                    && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && t.bytes().any(|c| c.is_ascii_alphabetic())
                {
                    Ok(PortMatch::Named(t.to_owned()))
                } else {
                    Err(format!("bad port {t:?}"))
                }
            }
        }
    }
}

/// ICMP type and optional code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IcmpFields {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// The source or destination side of a rule. Every given field must match (AND); an absent
/// field matches everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<String>,
    /// Calico selector over endpoint labels.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_selector: String,
    /// Calico selector over namespace labels. In a namespaced policy, `selector` alone
    /// matches endpoints of the policy's namespace only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(rename = "notICMP", default, skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default)]
    pub source: EntityRule,
    #[serde(default)]
    pub destination: EntityRule,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Rule {
    pub fn new(action: Action) -> Self {
        Self {
            action,
            ip_version: None,
            protocol: None,
            not_protocol: None,
            icmp: None,
            not_icmp: None,
            source: EntityRule::default(),
            destination: EntityRule::default(),
            extra: Map::new(),
        }
    }
}

/// `spec` of a NetworkPolicy or GlobalNetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Which endpoints the policy applies to (Calico selector; empty: `all()`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// GlobalNetworkPolicy only: which namespaces' endpoints it applies to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_selector: String,
    /// When absent: Ingress, plus Egress if there are egress rules (Calico's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<PolicyType>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PolicySpec {
    /// The directions the policy applies to, with Calico's default when `types` is absent.
    pub fn applies_to(&self, t: PolicyType) -> bool {
        match &self.types {
            Some(types) => types.contains(&t),
            None => t == PolicyType::Ingress || !self.egress.is_empty(),
        }
    }

    pub fn order(&self) -> f64 {
        self.order.unwrap_or(DEFAULT_ORDER)
    }
}

/// A NetworkPolicy (`…/networkpolicies/<ns>/<name>`) or GlobalNetworkPolicy
/// (`…/globalnetworkpolicies/<name>`); `kind` tells which.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub kind: String,
    #[serde(default = "super::resources::api_version")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PolicySpec,
}

pub const KIND_NETWORK_POLICY: &str = "NetworkPolicy";
pub const KIND_GLOBAL_NETWORK_POLICY: &str = "GlobalNetworkPolicy";

/// IP protocol numbers the checks below name.
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// `Err` naming the selector at `field` unless it parses (empty means "not given").
pub(crate) fn check_selector(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    Selector::parse(s)
        .map(|_| ())
        .map_err(|e| format!("{field}: {e}"))
}

/// A net of a rule: a CIDR (`10.0.0.0/8`, `fd00::/64`). A bare address is refused rather than
/// guessed at: write `10.0.0.1/32`.
pub(crate) fn check_net(field: &str, s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        if s.parse::<std::net::IpAddr>().is_ok() {
            format!("{field}: {s:?} has no prefix length (write {s}/32, or /128 for IPv6)")
        } else {
            format!("{field}: {s:?} is not a CIDR")
        }
    })
}

impl EntityRule {
    /// Checks nets, selectors and ports (`proto`: the rule's protocol number, if any).
    /// Fields this dataplane does not enforce (serviceAccounts, services) are refused: ignoring
    /// them would allow more than the rule says.
    pub fn validate(&self, field: &str, proto: Option<u8>) -> Result<(), String> {
        for (name, nets) in [("nets", &self.nets), ("notNets", &self.not_nets)] {
            for (i, n) in nets.iter().enumerate() {
                check_net(&format!("{field}.{name}[{i}]"), n)?;
            }
        }
        check_selector(&format!("{field}.selector"), &self.selector)?;
        check_selector(&format!("{field}.notSelector"), &self.not_selector)?;
        check_selector(
            &format!("{field}.namespaceSelector"),
            &self.namespace_selector,
        )?;
        for (name, ports) in [("ports", &self.ports), ("notPorts", &self.not_ports)] {
            if ports.is_empty() {
                continue;
            }
            match proto {
                None => {
                    return Err(format!(
                        "{field}.{name} needs the rule's protocol (TCP, UDP or SCTP)"
                    ));
                }
                Some(p) if !Protocol::has_ports(p) => {
                    return Err(format!(
                        "{field}.{name}: protocol {p} has no ports (only TCP, UDP, SCTP and UDPLite do)"
                    ));
                }
                Some(_) => {}
            }
            for (i, port) in ports.iter().enumerate() {
                match port.parse() {
                    Ok(PortMatch::Range(0, _)) => {
                        return Err(format!("{field}.{name}[{i}]: port 0 is outside 1..=65535"));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("{field}.{name}[{i}]: {e}")),
                }
            }
        }
        if let Some(k) = self.extra.keys().next() {
            return Err(format!("{field}.{k} is not supported by this dataplane"));
        }
        Ok(())
    }
}

impl Rule {
    /// Checks what a wrong guess would change: protocols, ports only with a protocol that has
    /// them, ICMP fields only with ICMP, nets, selectors, and no match field this dataplane
    /// would silently ignore.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        if let Some(v) = self.ip_version
            && v != 4
            && v != 6
        {
            return Err(format!("{field}.ipVersion {v} must be 4 or 6"));
        }
        let proto = self
            .protocol
            .as_ref()
            .map(Protocol::number)
            .transpose()
            .map_err(|e| format!("{field}.protocol: {e}"))?;
        if let Some(p) = &self.not_protocol {
            p.number()
                .map_err(|e| format!("{field}.notProtocol: {e}"))?;
        }
        for (name, icmp) in [("icmp", &self.icmp), ("notICMP", &self.not_icmp)] {
            let Some(icmp) = icmp else { continue };
            if !matches!(proto, Some(ICMP | ICMPV6)) {
                return Err(format!("{field}.{name} needs protocol ICMP or ICMPv6"));
            }
            if icmp.code.is_some() && icmp.type_.is_none() {
                return Err(format!("{field}.{name}.code needs a type"));
            }
            if icmp.type_ == Some(255) {
                return Err(format!("{field}.{name}.type 255 is not an ICMP type"));
            }
        }
        self.source.validate(&format!("{field}.source"), proto)?;
        self.destination
            .validate(&format!("{field}.destination"), proto)?;
        if let Some(v) = self.ip_version {
            for (side, e) in [("source", &self.source), ("destination", &self.destination)] {
                for n in e.nets.iter().chain(&e.not_nets) {
                    let net = check_net(field, n)?;
                    if (v == 4) != matches!(net, IpNet::V4(_)) {
                        return Err(format!(
                            "{field}.{side}: {n} is not an IPv{v} net (ipVersion {v})"
                        ));
                    }
                }
            }
        }
        // `metadata` (annotations) changes nothing; anything else would be ignored.
        if let Some(k) = self.extra.keys().find(|k| *k != "metadata") {
            return Err(format!("{field}.{k} is not supported by this dataplane"));
        }
        Ok(())
    }
}

impl NetworkPolicy {
    /// Checks the policy as `ctl apply` and the agent need it: its kind, a namespace for a
    /// NetworkPolicy (none for a GlobalNetworkPolicy), its selectors and every rule. Fills
    /// nothing in.
    pub fn validate(&self) -> Result<(), String> {
        let global = match self.kind.as_str() {
            KIND_NETWORK_POLICY => false,
            KIND_GLOBAL_NETWORK_POLICY => true,
            other => return Err(format!("kind {other:?} is not a policy")),
        };
        match (&self.metadata.namespace, global) {
            (Some(_), true) => {
                return Err("a GlobalNetworkPolicy has no metadata.namespace".to_owned());
            }
            (None, false) => return Err("metadata.namespace is required".to_owned()),
            (Some(ns), false) if ns.is_empty() => {
                return Err("metadata.namespace is empty".to_owned());
            }
            _ => {}
        }
        let spec = &self.spec;
        if let Some(o) = spec.order
            && o.is_nan()
        {
            return Err("spec.order is not a number".to_owned());
        }
        check_selector("spec.selector", &spec.selector)?;
        if !spec.namespace_selector.is_empty() && !global {
            return Err(
                "spec.namespaceSelector is for GlobalNetworkPolicy only (a NetworkPolicy applies to its own namespace)"
                    .to_owned(),
            );
        }
        check_selector("spec.namespaceSelector", &spec.namespace_selector)?;
        for (i, r) in spec.ingress.iter().enumerate() {
            r.validate(&format!("spec.ingress[{i}]"))?;
        }
        for (i, r) in spec.egress.iter().enumerate() {
            r.validate(&format!("spec.egress[{i}]"))?;
        }
        for (k, v) in &spec.extra {
            // Harmless at their defaults; anything else changes what the policy means.
            let harmless = match k.as_str() {
                "tier" => v == "default",
                "applyOnForward" | "doNotTrack" | "preDNAT" => v == false,
                "performanceHints" => true,
                _ => false,
            };
            if !harmless {
                return Err(format!("spec.{k}: {v} is not supported by this dataplane"));
            }
        }
        Ok(())
    }

    /// `<namespace>/<name>` for a NetworkPolicy, `<name>` for a GlobalNetworkPolicy.
    pub fn qualified_name(&self) -> String {
        match &self.metadata.namespace {
            Some(ns) => format!("{ns}/{}", self.metadata.name),
            None => self.metadata.name.clone(),
        }
    }

    /// Where this policy is stored.
    pub fn key(&self) -> String {
        if self.kind == KIND_GLOBAL_NETWORK_POLICY {
            super::keys::global_network_policy(&self.metadata.name)
        } else {
            let ns = self.metadata.namespace.as_deref().unwrap_or("default");
            super::keys::network_policy(ns, &self.metadata.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_calico_policy() {
        let p: NetworkPolicy = serde_json::from_value(json!({
            "kind": "NetworkPolicy",
            "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "allow-tcp-6379", "namespace": "production"},
            "spec": {
                "selector": "role == 'database'",
                "types": ["Ingress", "Egress"],
                "ingress": [{
                    "action": "Allow",
                    "protocol": "TCP",
                    "source": {"selector": "role == 'frontend'", "notNets": ["10.0.0.0/8"]},
                    "destination": {"ports": [6379, "8000:8080", "http"]}
                }],
                "egress": [{"action": "Allow"}]
            }
        }))
        .unwrap();
        let r = &p.spec.ingress[0];
        assert_eq!(r.protocol.as_ref().unwrap().number(), Ok(6));
        let ports: Vec<_> = r
            .destination
            .ports
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(
            ports,
            vec![
                PortMatch::Range(6379, 6379),
                PortMatch::Range(8000, 8080),
                PortMatch::Named("http".into())
            ]
        );
        assert!(p.spec.applies_to(PolicyType::Egress));
        let back: NetworkPolicy =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn default_types() {
        let mut s = PolicySpec::default();
        assert!(s.applies_to(PolicyType::Ingress) && !s.applies_to(PolicyType::Egress));
        s.egress.push(Rule::new(Action::Allow));
        assert!(s.applies_to(PolicyType::Egress));
    }

    #[test]
    fn bad_ports_and_protocols() {
        assert!(Port::Text("9:8".into()).parse().is_err());
        assert!(Port::Text("".into()).parse().is_err());
        assert!(Port::Text("a b".into()).parse().is_err());
        assert!(Protocol::Name("TCPX".into()).number().is_err());
        assert_eq!(Protocol::Name("udp".into()).number(), Ok(17));
        assert!(serde_json::from_value::<Rule>(json!({"action": "Maybe"})).is_err());
    }

    fn policy(v: Value) -> NetworkPolicy {
        serde_json::from_value(v).unwrap()
    }

    fn np_with_rule(rule: Value) -> NetworkPolicy {
        policy(json!({
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"ingress": [rule]}
        }))
    }

    #[test]
    fn valid_policies_pass() {
        np_with_rule(json!({
            "action": "Allow", "protocol": "TCP",
            "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16"], "selector": "a == 'b'",
                       "namespaceSelector": "all()"},
            "destination": {"ports": [80, "8000:8080", "http"], "notPorts": [81]}
        }))
        .validate()
        .unwrap();
        np_with_rule(json!({"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}}))
            .validate()
            .unwrap();
        np_with_rule(json!({"action": "Allow", "protocol": 17, "ipVersion": 4,
                            "destination": {"nets": ["10.0.0.1/32"], "ports": [53]}}))
        .validate()
        .unwrap();
        let gnp = policy(json!({
            "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "g"},
            "spec": {"order": 10, "selector": "all()", "namespaceSelector": "has(x)",
                     "types": ["Egress"], "egress": [{"action": "Pass"}], "tier": "default"}
        }));
        gnp.validate().unwrap();
        assert_eq!(
            gnp.key(),
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/g"
        );
        assert_eq!(gnp.qualified_name(), "g");
        let np = np_with_rule(json!({"action": "Allow"}));
        assert_eq!(
            np.key(),
            "/calico/resources/v3/projectcalico.org/networkpolicies/ns/p"
        );
        assert_eq!(np.qualified_name(), "ns/p");
    }

    #[test]
    fn invalid_rules_say_which_field() {
        for (rule, want) in [
            (
                json!({"action": "Allow", "destination": {"ports": [80]}}),
                "spec.ingress[0].destination.ports needs the rule's protocol",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "destination": {"ports": [80]}}),
                "protocol 1 has no ports",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "source": {"notPorts": ["9:8"]}}),
                "spec.ingress[0].source.notPorts[0]: port range",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [0]}}),
                "port 0 is outside",
            ),
            (
                json!({"action": "Allow", "protocol": "TCPX"}),
                "spec.ingress[0].protocol: unknown protocol",
            ),
            (
                json!({"action": "Allow", "notProtocol": "bogus"}),
                "notProtocol: unknown protocol",
            ),
            (
                json!({"action": "Allow", "icmp": {"type": 8}}),
                "icmp needs protocol ICMP",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "notICMP": {"type": 8}}),
                "notICMP needs protocol ICMP",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "icmp": {"code": 1}}),
                "icmp.code needs a type",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 255}}),
                "not an ICMP type",
            ),
            (
                json!({"action": "Allow", "source": {"nets": ["10.0.0.0/33"]}}),
                "source.nets[0]: \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                json!({"action": "Allow", "destination": {"notNets": ["10.0.0.1"]}}),
                "has no prefix length",
            ),
            (
                json!({"action": "Allow", "ipVersion": 5}),
                "ipVersion 5 must be 4 or 6",
            ),
            (
                json!({"action": "Allow", "ipVersion": 6, "source": {"nets": ["10.0.0.0/8"]}}),
                "not an IPv6 net",
            ),
            (
                json!({"action": "Allow", "source": {"serviceAccounts": {"names": ["a"]}}}),
                "spec.ingress[0].source.serviceAccounts is not supported",
            ),
            (
                json!({"action": "Allow", "http": {"methods": ["GET"]}}),
                "spec.ingress[0].http is not supported",
            ),
        ] {
            let e = np_with_rule(rule.clone()).validate().unwrap_err();
            assert!(e.contains(want), "{rule}: {e}");
        }
        assert!(
            serde_json::from_value::<NetworkPolicy>(json!({
                "kind": "NetworkPolicy", "spec": {"ingress": [{"action": "allow"}]}
            }))
            .is_err()
        );
    }

    #[test]
    fn invalid_policies() {
        for (p, want) in [
            (
                json!({"kind": "NetworkPolicy", "metadata": {"name": "p"}}),
                "metadata.namespace is required",
            ),
            (
                json!({"kind": "GlobalNetworkPolicy", "metadata": {"name": "p", "namespace": "x"}}),
                "has no metadata.namespace",
            ),
            (
                json!({"kind": "Profile", "metadata": {"name": "p"}}),
                "not a policy",
            ),
            (
                json!({"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
                    "spec": {"namespaceSelector": "all()"}}),
                "GlobalNetworkPolicy only",
            ),
            (
                json!({"kind": "GlobalNetworkPolicy", "metadata": {"name": "p"},
                    "spec": {"serviceAccountSelector": "x == 'y'"}}),
                "spec.serviceAccountSelector",
            ),
            (
                json!({"kind": "GlobalNetworkPolicy", "metadata": {"name": "p"},
                    "spec": {"tier": "security"}}),
                "spec.tier",
            ),
            (
                json!({"kind": "GlobalNetworkPolicy", "metadata": {"name": "p"},
                    "spec": {"preDNAT": true}}),
                "spec.preDNAT",
            ),
        ] {
            let e = policy(p.clone()).validate().unwrap_err();
            assert!(e.contains(want), "{p}: {e}");
        }
    }
}

//! Calico v3 policy resources as stored in etcd: NetworkPolicy (namespaced) and
//! GlobalNetworkPolicy, with Calico's field names. Kubernetes NetworkPolicies are stored in
//! this form too, translated the way Calico's controllers do (`knp.default.<name>`).
//!
//! Parsing is strict where a wrong guess would change what is allowed: an unknown action or
//! policy type, a malformed port or protocol is an error (the agent logs the key and skips
//! the policy). Unknown fields are kept in `extra`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::resources::ObjectMeta;

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
}

//! Kubernetes resources this dataplane reads (there is no Kubernetes API server: `ctl apply`
//! takes them as YAML), and their translation into Calico's resources the way Calico's
//! controllers translate them:
//!
//! - a `networking.k8s.io/v1` NetworkPolicy `<name>` becomes the Calico NetworkPolicy
//!   `knp.default.<name>` in the same namespace ([`K8sNetworkPolicy::to_calico`]);
//! - a Namespace becomes the Profile `kns.<ns>` carrying its labels
//!   ([`K8sNamespace::to_profile`]);
//! - a Pod is stored, trimmed to its labels and named ports ([`K8sPod`]), at
//!   `/calico/k8s/pods/<ns>/<name>`.
//!
//! Everything whose wrong guess would change what traffic is allowed is checked, with
//! Kubernetes' rules: names, label keys and values, selector operators, protocols, ports,
//! CIDRs. A misspelt field of a policy is an error rather than ignored (a rule whose `from`
//! were lost would allow everyone).

use std::collections::{BTreeMap, btree_map::Entry};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};

use super::{
    keys,
    policy::{
        Action, EntityRule, K8S_POLICY_ORDER, K8S_POLICY_PREFIX, KIND_NETWORK_POLICY,
        NetworkPolicy, PolicySpec, PolicyType, Port, Protocol, Rule,
    },
    resources::{EndpointPort, ObjectMeta, Profile},
};

/// The label Calico puts on every Kubernetes endpoint; translated selectors of pods require it.
pub const ORCHESTRATOR_LABEL: &str = "projectcalico.org/orchestrator";
/// The label Kubernetes gives every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The namespace of a resource that names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// What every translated pod selector starts with.
const K8S_ENDPOINTS: &str = "projectcalico.org/orchestrator == 'k8s'";

/// `null` (a YAML key with nothing after it) read as the default, as Kubernetes reads it.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Names and labels, with Kubernetes' rules.

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS-1123 label (namespace names): at most 63 of `a-z0-9-`, alphanumeric at both ends.
pub fn check_dns_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// A DNS-1123 subdomain (pod and policy names): at most 253 of `a-z0-9-.`, dot-separated
/// labels alphanumeric at both ends.
pub fn check_dns_subdomain(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| is_alnum(c) || c == '-')
                && l.starts_with(is_alnum)
                && l.ends_with(is_alnum)
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be lowercase letters, digits, '-' or '.' (at most 253), each part starting and ending with a letter or digit"
        ))
    }
}

/// The name part of a label key, or a label value when not empty: at most 63 of
/// `A-Za-z0-9-_.`, alphanumeric at both ends.
fn is_label_name(s: &str) -> bool {
    let an = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| an(c) || matches!(c, '-' | '_' | '.'))
        && s.starts_with(an)
        && s.ends_with(an)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => {
            check_dns_subdomain("", prefix).is_ok() && is_label_name(name) && !name.contains('/')
        }
        None => is_label_name(k),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label key {k:?} must be [prefix/]name: a name of at most 63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit, and a DNS prefix"
        ))
    }
}

/// A label value: empty, or at most 63 of `A-Za-z0-9-_.`, alphanumeric at both ends. (This
/// is also what makes quoting it in a Calico selector safe.)
pub fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!(
            "label value {v:?} must be empty or at most 63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit"
        ))
    }
}

fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        check_label_key(k).map_err(|e| format!("{field}: {e}"))?;
        check_label_value(v).map_err(|e| format!("{field}.{k}: {e}"))?;
    }
    Ok(())
}

/// A port name (IANA service name): 1 to 15 of `a-z0-9-`, at least one letter, no `-` at
/// either end or twice in a row.
pub fn check_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "port name {s:?} must be 1 to 15 lowercase letters, digits or '-' with at least one letter"
        ))
    }
}

/// A Kubernetes protocol: exactly `TCP`, `UDP` or `SCTP`.
fn check_protocol(field: &str, p: &str) -> Result<(), String> {
    if matches!(p, "TCP" | "UDP" | "SCTP") {
        Ok(())
    } else {
        Err(format!("{field} {p:?} must be TCP, UDP or SCTP"))
    }
}

fn check_port_number(field: &str, n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| format!("{field} {n} is outside 1..=65535"))
}

// ---------------------------------------------------------------------------------------------
// LabelSelector.

/// A Kubernetes label selector (`metav1.LabelSelector`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Selects everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// The Calico terms that must all hold (none for an empty selector); `Err` (naming the
    /// field relative to the selector) for an invalid selector.
    fn terms(&self) -> Result<Vec<String>, String> {
        let mut terms = Vec::new();
        for (k, v) in &self.match_labels {
            check_label_key(k).map_err(|e| format!("matchLabels: {e}"))?;
            check_label_value(v).map_err(|e| format!("matchLabels.{k}: {e}"))?;
            terms.push(format!("{k} == '{v}'"));
        }
        for (i, e) in self.match_expressions.iter().enumerate() {
            let field = format!("matchExpressions[{i}]");
            check_label_key(&e.key).map_err(|err| format!("{field}.key: {err}"))?;
            let list = || -> Result<String, String> {
                if e.values.is_empty() {
                    return Err(format!(
                        "{field}: operator {} needs at least one value",
                        e.operator
                    ));
                }
                for v in &e.values {
                    check_label_value(v).map_err(|err| format!("{field}.values: {err}"))?;
                }
                let quoted: Vec<String> = e.values.iter().map(|v| format!("'{v}'")).collect();
                Ok(format!("{{{}}}", quoted.join(",")))
            };
            let no_values = || {
                if e.values.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{field}: operator {} takes no values", e.operator))
                }
            };
            let k = &e.key;
            terms.push(match e.operator.as_str() {
                "In" => format!("{k} in {}", list()?),
                "NotIn" => format!("{k} not in {}", list()?),
                "Exists" => {
                    no_values()?;
                    format!("has({k})")
                }
                "DoesNotExist" => {
                    no_values()?;
                    format!("!has({k})")
                }
                other => {
                    return Err(format!(
                        "{field}.operator {other:?} must be In, NotIn, Exists or DoesNotExist"
                    ));
                }
            });
        }
        Ok(terms)
    }

    /// The Calico selector: the terms joined with ` && `, `all()` when empty. (A selector of
    /// namespaces; pod selectors also require [`ORCHESTRATOR_LABEL`], see
    /// [`LabelSelector::to_calico_pods`].)
    pub fn to_calico(&self) -> Result<String, String> {
        let terms = self.terms()?;
        Ok(if terms.is_empty() {
            "all()".to_owned()
        } else {
            terms.join(" && ")
        })
    }

    /// As Calico translates a pod selector: `projectcalico.org/orchestrator == 'k8s'` and then
    /// the terms.
    pub fn to_calico_pods(&self) -> Result<String, String> {
        let mut terms = vec![K8S_ENDPOINTS.to_owned()];
        terms.extend(self.terms()?);
        Ok(terms.join(" && "))
    }
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicy (networking.k8s.io/v1).

/// A `networking.k8s.io/v1` NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sNetworkPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: K8sNetworkPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct K8sNetworkPolicySpec {
    /// Which pods of the namespace the policy applies to (empty: all).
    #[serde(default, deserialize_with = "nullable")]
    pub pod_selector: LabelSelector,
    /// Absent or empty: Ingress, plus Egress when there are egress rules.
    #[serde(default, deserialize_with = "nullable")]
    pub policy_types: Vec<PolicyType>,
    #[serde(default, deserialize_with = "nullable")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, deserialize_with = "nullable")]
    pub egress: Vec<EgressRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Empty: from anywhere.
    #[serde(default, deserialize_with = "nullable")]
    pub from: Vec<NetworkPolicyPeer>,
    /// Empty: any protocol and port.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<NetworkPolicyPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Empty: to anywhere.
    #[serde(default, deserialize_with = "nullable")]
    pub to: Vec<NetworkPolicyPeer>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// Pods (of the policy's namespace, or of the selected namespaces), or a block of addresses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, deserialize_with = "nullable")]
    pub except: Vec<String>,
}

/// A port by number or by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    /// Default TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Absent: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// With a numeric `port`: the range `port..=endPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

impl NetworkPolicyPort {
    /// The protocol (default TCP) and the Calico port entry (`None`: every port).
    fn to_calico(&self, field: &str) -> Result<(String, Option<Port>), String> {
        let proto = self.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
        check_protocol(&format!("{field}.protocol"), &proto)?;
        let port = match (&self.port, self.end_port) {
            (None, None) => None,
            (None, Some(_)) => return Err(format!("{field}.endPort needs a port")),
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    return Err(format!(
                        "{field}.endPort needs a numeric port, not the named port {name:?}"
                    ));
                }
                check_port_name(name).map_err(|e| format!("{field}.port: {e}"))?;
                Some(Port::Text(name.clone()))
            }
            (Some(IntOrString::Int(n)), None) => Some(Port::Number(check_port_number(
                &format!("{field}.port"),
                *n,
            )?)),
            (Some(IntOrString::Int(n)), Some(end)) => {
                let first = check_port_number(&format!("{field}.port"), *n)?;
                let last = check_port_number(&format!("{field}.endPort"), end)?;
                if last < first {
                    return Err(format!("{field}.endPort {last} is below port {first}"));
                }
                Some(if first == last {
                    Port::Number(first)
                } else {
                    Port::Text(format!("{first}:{last}"))
                })
            }
        };
        Ok((proto, port))
    }
}

/// The Calico fields of one peer: endpoint selector, namespace selector, nets, notNets.
#[derive(Debug, Default, PartialEq)]
struct PeerFields {
    selector: String,
    namespace_selector: String,
    nets: Vec<String>,
    not_nets: Vec<String>,
}

impl NetworkPolicyPeer {
    fn to_calico(&self, field: &str) -> Result<PeerFields, String> {
        if let Some(block) = &self.ip_block {
            if self.pod_selector.is_some() || self.namespace_selector.is_some() {
                return Err(format!(
                    "{field}: ipBlock cannot be combined with podSelector or namespaceSelector"
                ));
            }
            let cidr = parse_cidr(&format!("{field}.ipBlock.cidr"), &block.cidr)?;
            let mut not_nets = Vec::new();
            for (i, e) in block.except.iter().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let ex = parse_cidr(&f, e)?;
                if !cidr.contains(&ex) || ex.prefix_len() <= cidr.prefix_len() {
                    return Err(format!("{f} {ex} is not strictly inside cidr {cidr}"));
                }
                not_nets.push(ex.to_string());
            }
            return Ok(PeerFields {
                nets: vec![cidr.to_string()],
                not_nets,
                ..PeerFields::default()
            });
        }
        if self.pod_selector.is_none() && self.namespace_selector.is_none() {
            return Err(format!(
                "{field}: a peer needs podSelector, namespaceSelector or ipBlock"
            ));
        }
        // As Calico: the pod selector (only the orchestrator term when absent) selects
        // endpoints; without a namespace selector, of the policy's own namespace.
        let selector = self
            .pod_selector
            .clone()
            .unwrap_or_default()
            .to_calico_pods()
            .map_err(|e| format!("{field}.podSelector.{e}"))?;
        let namespace_selector = match &self.namespace_selector {
            None => String::new(),
            Some(ns) => ns
                .to_calico()
                .map_err(|e| format!("{field}.namespaceSelector.{e}"))?,
        };
        Ok(PeerFields {
            selector,
            namespace_selector,
            ..PeerFields::default()
        })
    }
}

/// A CIDR of an ipBlock, as the network it names (`10.0.0.1/8` is `10.0.0.0/8`, as Calico
/// reads it). A bare address is not a CIDR here, as in Kubernetes.
fn parse_cidr(field: &str, s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{field} {s:?} is not a CIDR (e.g. 10.0.0.0/8)"))
}

/// One Kubernetes rule (its peers and ports) as Calico Allow rules: one per protocol (in name
/// order) and peer, each protocol's ports together. No ports: one rule per peer with no
/// protocol; no peers: rules with no restriction on the peer side.
fn rules_to_calico(
    field: &str,
    peers: &[NetworkPolicyPeer],
    ports: &[NetworkPolicyPort],
    ingress: bool,
) -> Result<Vec<Rule>, String> {
    let side = if ingress { "from" } else { "to" };
    let peer_fields: Vec<PeerFields> = if peers.is_empty() {
        vec![PeerFields::default()]
    } else {
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| p.to_calico(&format!("{field}.{side}[{i}]")))
            .collect::<Result<_, _>>()?
    };
    // protocol → its ports (`None`: every port of it); "" is "no protocol, no ports".
    let mut groups: BTreeMap<String, Option<Vec<Port>>> = BTreeMap::new();
    if ports.is_empty() {
        groups.insert(String::new(), None);
    }
    for (i, p) in ports.iter().enumerate() {
        let (proto, port) = p.to_calico(&format!("{field}.ports[{i}]"))?;
        match port {
            // An entry without a port: every port of the protocol, whatever else is listed.
            None => {
                groups.insert(proto, None);
            }
            Some(port) => match groups.entry(proto) {
                Entry::Vacant(v) => {
                    v.insert(Some(vec![port]));
                }
                Entry::Occupied(mut o) => {
                    if let Some(list) = o.get_mut()
                        && !list.contains(&port)
                    {
                        list.push(port);
                    }
                }
            },
        }
    }
    let mut rules = Vec::new();
    for (proto, ports) in &groups {
        for peer in &peer_fields {
            let mut rule = Rule::new(Action::Allow);
            if !proto.is_empty() {
                rule.protocol = Some(Protocol::Name(proto.clone()));
            }
            let mut entity = EntityRule {
                selector: peer.selector.clone(),
                namespace_selector: peer.namespace_selector.clone(),
                nets: peer.nets.clone(),
                not_nets: peer.not_nets.clone(),
                ..EntityRule::default()
            };
            let ports = ports.clone().unwrap_or_default();
            if ingress {
                rule.source = entity;
                rule.destination.ports = ports;
            } else {
                entity.ports = ports;
                rule.destination = entity;
            }
            rules.push(rule);
        }
    }
    Ok(rules)
}

impl K8sNetworkPolicy {
    /// Reads a manifest (checked by [`K8sNetworkPolicy::to_calico`], not here).
    pub fn from_value(v: &Value) -> Result<Self, String> {
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }

    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// `knp.default.<name>`.
    pub fn calico_name(&self) -> String {
        format!("{K8S_POLICY_PREFIX}{}", self.metadata.name)
    }

    /// The directions the policy applies to, as Kubernetes defaults them: the given
    /// `policyTypes`, or Ingress plus Egress when there are egress rules.
    pub fn policy_types(&self) -> Vec<PolicyType> {
        let s = &self.spec;
        let given = |t| s.policy_types.contains(&t);
        let (ingress, egress) = if s.policy_types.is_empty() {
            (true, !s.egress.is_empty())
        } else {
            (given(PolicyType::Ingress), given(PolicyType::Egress))
        };
        let mut types = Vec::new();
        if ingress {
            types.push(PolicyType::Ingress);
        }
        if egress {
            types.push(PolicyType::Egress);
        }
        types
    }

    /// The Calico NetworkPolicy `knp.default.<name>` in the same namespace, at order 1000,
    /// applying to the selected pods, with one Allow rule per protocol and peer of each rule.
    /// A direction in force with no rules allows nothing. `Err` says which field is wrong.
    pub fn to_calico(&self) -> Result<NetworkPolicy, String> {
        check_dns_subdomain("metadata.name", &self.metadata.name)?;
        let namespace = self.namespace();
        check_dns_label("metadata.namespace", namespace)?;
        let name = self.calico_name();
        if name.len() > 253 {
            return Err(format!(
                "metadata.name is too long: {name} must be at most 253 characters"
            ));
        }
        let selector = self
            .spec
            .pod_selector
            .to_calico_pods()
            .map_err(|e| format!("spec.podSelector.{e}"))?;
        let mut ingress = Vec::new();
        for (i, r) in self.spec.ingress.iter().enumerate() {
            ingress.extend(rules_to_calico(
                &format!("spec.ingress[{i}]"),
                &r.from,
                &r.ports,
                true,
            )?);
        }
        let mut egress = Vec::new();
        for (i, r) in self.spec.egress.iter().enumerate() {
            egress.extend(rules_to_calico(
                &format!("spec.egress[{i}]"),
                &r.to,
                &r.ports,
                false,
            )?);
        }
        let policy = NetworkPolicy {
            kind: KIND_NETWORK_POLICY.to_owned(),
            api_version: super::resources::API_VERSION.to_owned(),
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::named(name)
            },
            spec: PolicySpec {
                order: Some(K8S_POLICY_ORDER),
                selector,
                namespace_selector: String::new(),
                types: Some(self.policy_types()),
                ingress,
                egress,
                extra: Map::new(),
            },
        };
        // Every selector made above must parse as Calico's.
        policy.validate()?;
        Ok(policy)
    }
}

// ---------------------------------------------------------------------------------------------
// Namespace (v1).

/// A `v1` Namespace: only its name and labels matter here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sNamespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

impl K8sNamespace {
    pub fn from_value(v: &Value) -> Result<Self, String> {
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The labels Kubernetes would give it: its own, and `kubernetes.io/metadata.name`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), self.metadata.name.clone());
        labels
    }

    /// The Profile `kns.<ns>`: the namespace's labels for its endpoints to inherit, and
    /// Calico's allow-all rules of a namespace profile.
    pub fn to_profile(&self) -> Result<Profile, String> {
        check_dns_label("metadata.name", self.name())?;
        let labels = self.labels();
        check_labels("metadata.labels", &labels)?;
        let mut profile = Profile::new(&keys::namespace_profile_name(self.name()), labels);
        profile
            .spec
            .extra
            .insert("ingress".to_owned(), json!([{"action": "Allow"}]));
        profile
            .spec
            .extra
            .insert("egress".to_owned(), json!([{"action": "Allow"}]));
        Ok(profile)
    }
}

// ---------------------------------------------------------------------------------------------
// Pod (v1), stored trimmed.

/// A `v1` Pod as stored at `/calico/k8s/pods/<ns>/<name>`: its name, namespace and labels
/// and its containers' ports (everything else of a pod manifest is dropped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sPod {
    #[serde(default = "K8sPod::api_version")]
    pub api_version: String,
    #[serde(default = "K8sPod::kind")]
    pub kind: String,
    pub metadata: PodMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

impl K8sPod {
    fn api_version() -> String {
        "v1".to_owned()
    }

    fn kind() -> String {
        "Pod".to_owned()
    }

    /// Reads a Pod manifest, trimmed, checked, and in namespace `default` when it names none.
    /// Port numbers are checked on the manifest itself so that the error names the field.
    pub fn from_manifest(v: &Value) -> Result<Self, String> {
        let containers = v
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, c) in containers.iter().enumerate() {
            let ports = c
                .get("ports")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (j, p) in ports.iter().enumerate() {
                let field = format!("spec.containers[{i}].ports[{j}].containerPort");
                match p.get("containerPort") {
                    Some(Value::Number(n)) if n.as_i64().is_some() => {
                        check_port_number(&field, n.as_i64().unwrap_or_default())?;
                    }
                    Some(other) => return Err(format!("{field} {other} is not a port number")),
                    None => return Err(format!("{field} is required")),
                }
            }
        }
        let mut pod = Self {
            api_version: Self::api_version(),
            kind: Self::kind(),
            ..serde_json::from_value::<Self>(v.clone()).map_err(|e| e.to_string())?
        };
        if pod.metadata.namespace.is_empty() {
            pod.metadata.namespace = DEFAULT_NAMESPACE.to_owned();
        }
        pod.validate()?;
        Ok(pod)
    }

    /// Checks names, labels and ports.
    pub fn validate(&self) -> Result<(), String> {
        check_dns_subdomain("metadata.name", &self.metadata.name)?;
        check_dns_label("metadata.namespace", &self.metadata.namespace)?;
        check_labels("metadata.labels", &self.metadata.labels)?;
        for (i, c) in self.spec.containers.iter().enumerate() {
            for (j, p) in c.ports.iter().enumerate() {
                let field = format!("spec.containers[{i}].ports[{j}]");
                check_port_number(
                    &format!("{field}.containerPort"),
                    i64::from(p.container_port),
                )?;
                check_protocol(&format!("{field}.protocol"), &p.protocol)?;
                if let Some(name) = &p.name {
                    check_port_name(name).map_err(|e| format!("{field}.name: {e}"))?;
                }
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    /// Where this pod is stored.
    pub fn key(&self) -> String {
        keys::pod(&self.metadata.namespace, &self.metadata.name)
    }

    /// The pod's labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.metadata.labels.clone()
    }

    /// Its named container ports, as a WorkloadEndpoint lists them (protocol `"TCP"`, `"UDP"`
    /// or `"SCTP"`), in container order.
    pub fn named_ports(&self) -> Vec<EndpointPort> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| {
                Some(EndpointPort {
                    name: p.name.clone()?,
                    protocol: Value::String(p.protocol.clone()),
                    port: p.container_port,
                    host_port: None,
                    host_ip: None,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! Manifests for `dataplane ctl apply`: YAML (or JSON) documents turned into the resources
//! stored in etcd, with their keys, validated before anything is written.
//!
//! Accepted: `projectcalico.org/v3` IPPool, Node, NetworkPolicy and GlobalNetworkPolicy; the
//! seed's older `v1` `ipPool` (with `ipip: {enabled, mode}` and `nat-outgoing`), translated to
//! a v3 IPPool; and Kubernetes' `networking.k8s.io/v1` NetworkPolicy (stored translated, as
//! the Calico NetworkPolicy `knp.default.<name>`), `v1` Namespace (stored as the Profile
//! `kns.<ns>`) and `v1` Pod (stored trimmed to its labels and ports).

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::datastore::{
    K8sPod,
    k8s::{DEFAULT_NAMESPACE, K8sNamespace, K8sNetworkPolicy},
    keys,
    policy::{K8S_POLICY_PREFIX, KIND_GLOBAL_NETWORK_POLICY, KIND_NETWORK_POLICY, NetworkPolicy},
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        doc: usize,
        source: serde_yaml_ng::Error,
    },
    #[error("document {doc}: {msg}")]
    Invalid { doc: usize, msg: String },
}

/// The kinds `ctl` manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    IpPool,
    Node,
    /// Calico's namespaced NetworkPolicy (a Kubernetes one is stored as one of these).
    NetworkPolicy,
    GlobalNetworkPolicy,
    /// A Kubernetes Namespace, stored as the Profile `kns.<ns>`.
    Namespace,
    Pod,
    Profile,
}

/// What [`Kind::parse`] accepts, for error messages.
pub const KNOWN_KINDS: &str = "ippool, node, networkpolicy (netpol, np), globalnetworkpolicy (gnp), namespace (ns), pod, profile";

impl Kind {
    /// Parses a kind as users type it, in any case: singular, plural or short
    /// (`ippool`, `nodes`, `netpol`, `np`, `gnp`, `ns`, `po`, …).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ippool" | "ippools" | "pool" | "pools" => Some(Self::IpPool),
            "node" | "nodes" => Some(Self::Node),
            "networkpolicy" | "networkpolicies" | "netpol" | "netpols" | "np" => {
                Some(Self::NetworkPolicy)
            }
            "globalnetworkpolicy" | "globalnetworkpolicies" | "gnp" | "gnps" => {
                Some(Self::GlobalNetworkPolicy)
            }
            "namespace" | "namespaces" | "ns" => Some(Self::Namespace),
            "pod" | "pods" | "po" => Some(Self::Pod),
            "profile" | "profiles" | "pro" => Some(Self::Profile),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::IpPool => "IPPool",
            Self::Node => "Node",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Profile => "Profile",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Self::NetworkPolicy | Self::Pod)
    }

    /// The key of `name` (in `namespace`, for a namespaced kind; ignored otherwise).
    pub fn key(self, namespace: &str, name: &str) -> String {
        match self {
            Self::IpPool => keys::ip_pool(name),
            Self::Node => keys::node(name),
            Self::NetworkPolicy => keys::network_policy(namespace, name),
            Self::GlobalNetworkPolicy => keys::global_network_policy(name),
            Self::Namespace => keys::profile(&keys::namespace_profile_name(name)),
            Self::Pod => keys::pod(namespace, name),
            Self::Profile => keys::profile(name),
        }
    }

    /// The prefix of every resource of this kind (in `namespace` when given, for a namespaced
    /// kind; in every namespace with `None`).
    pub fn prefix(self, namespace: Option<&str>) -> String {
        match (self, namespace) {
            (Self::IpPool, _) => keys::ip_pool(""),
            (Self::Node, _) => keys::node(""),
            (Self::NetworkPolicy, Some(ns)) => keys::network_policies_of(ns),
            (Self::NetworkPolicy, None) => keys::NETWORK_POLICIES.to_owned(),
            (Self::GlobalNetworkPolicy, _) => keys::GLOBAL_NETWORK_POLICIES.to_owned(),
            (Self::Namespace, _) => keys::profile(keys::NAMESPACE_PROFILE_PREFIX),
            (Self::Pod, Some(ns)) => keys::pods_of(ns),
            (Self::Pod, None) => keys::PODS.to_owned(),
            (Self::Profile, _) => keys::PROFILES.to_owned(),
        }
    }

    /// The names `name` may stand for, in the order to try them: itself, and for a
    /// NetworkPolicy also the translated Kubernetes policy `knp.default.<name>`.
    pub fn candidate_names(self, name: &str) -> Vec<String> {
        let mut names = vec![name.to_owned()];
        if self == Self::NetworkPolicy && !name.starts_with(K8S_POLICY_PREFIX) {
            names.push(format!("{K8S_POLICY_PREFIX}{name}"));
        }
        names
    }
}

/// One resource ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub kind: Kind,
    /// For namespaced kinds.
    pub namespace: Option<String>,
    pub name: String,
    pub key: String,
    /// The resource as stored (JSON).
    pub value: Value,
}

impl Manifest {
    /// `<namespace>/<name>` or `<name>`, as output lines name it.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Parses every document of `text` (YAML; JSON is YAML too). Empty documents are skipped.
pub fn parse(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    // JSON is YAML, but a JSON parser reads a large document (a policy with thousands of
    // rules) many times faster: one JSON object, or a stream of them, goes that way.
    if text.trim_start().starts_with('{') {
        let docs: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
            .into_iter()
            .collect();
        if let Ok(docs) = docs {
            return docs
                .into_iter()
                .enumerate()
                .filter(|(_, v)| !v.is_null())
                .map(|(i, v)| one(i + 1, v))
                .collect();
        }
        // Not JSON after all (YAML flow style, say): read it as YAML below.
    }
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = <Value as serde::Deserialize>::deserialize(doc).map_err(|source| {
            ManifestError::Yaml {
                doc: doc_no,
                source,
            }
        })?;
        if value.is_null() {
            continue;
        }
        out.push(one(doc_no, value)?);
    }
    Ok(out)
}

fn invalid(doc: usize, msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        doc,
        msg: msg.into(),
    }
}

fn one(doc: usize, v: Value) -> Result<Manifest, ManifestError> {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api = v
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match (api, kind) {
        ("projectcalico.org/v3", "IPPool") => ip_pool_v3(doc, &v),
        ("v1", "ipPool") => ip_pool_v1(doc, &v),
        ("projectcalico.org/v3", "Node") => node_v3(doc, &v),
        ("projectcalico.org/v3", KIND_NETWORK_POLICY | KIND_GLOBAL_NETWORK_POLICY) => {
            calico_policy(doc, &v, kind)
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => k8s_policy(doc, &v),
        ("v1", "Namespace") => namespace(doc, &v),
        ("v1", "Pod") => pod(doc, &v),
        ("", _) | (_, "") => Err(invalid(doc, "apiVersion and kind are required")),
        _ => Err(invalid(
            doc,
            format!(
                "{api} {kind} is not supported (projectcalico.org/v3 IPPool, Node, NetworkPolicy, GlobalNetworkPolicy; networking.k8s.io/v1 NetworkPolicy; v1 Namespace, Pod, ipPool)"
            ),
        )),
    }
}

/// `metadata.namespace`, `default` when absent.
fn namespace_of(v: &Value) -> String {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned()
}

/// A Calico v3 NetworkPolicy or GlobalNetworkPolicy, checked and stored as given (less what
/// a server assigns: resourceVersion, uid, creationTimestamp).
fn calico_policy(doc: usize, v: &Value, kind: &str) -> Result<Manifest, ManifestError> {
    let name = name_of(doc, v)?;
    let global = kind == KIND_GLOBAL_NETWORK_POLICY;
    let what = if global {
        format!("{kind} {name}")
    } else {
        format!("{kind} {}/{name}", namespace_of(v))
    };
    let fail = |e: String| invalid(doc, format!("{what}: {e}"));
    let mut p: NetworkPolicy =
        serde_json::from_value(v.clone()).map_err(|e| fail(e.to_string()))?;
    if !global {
        let ns = namespace_of(v);
        crate::datastore::k8s::check_dns_label("metadata.namespace", &ns).map_err(fail)?;
        p.metadata.namespace = Some(ns);
    }
    p.metadata.resource_version = None;
    p.metadata.uid = None;
    p.metadata.creation_timestamp = None;
    p.validate().map_err(fail)?;
    let value = serde_json::to_value(&p).map_err(|e| fail(e.to_string()))?;
    Ok(Manifest {
        kind: if global {
            Kind::GlobalNetworkPolicy
        } else {
            Kind::NetworkPolicy
        },
        namespace: p.metadata.namespace.clone(),
        key: p.key(),
        name,
        value,
    })
}

/// A Kubernetes NetworkPolicy, stored as Calico's controllers store it: `knp.default.<name>`.
fn k8s_policy(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let fail = |e: String| {
        invalid(
            doc,
            format!("NetworkPolicy {}/{name}: {e}", namespace_of(v)),
        )
    };
    let p = K8sNetworkPolicy::from_value(v)
        .and_then(|p| p.to_calico())
        .map_err(fail)?;
    let value = serde_json::to_value(&p).map_err(|e| fail(e.to_string()))?;
    Ok(Manifest {
        kind: Kind::NetworkPolicy,
        namespace: p.metadata.namespace.clone(),
        key: p.key(),
        name: p.metadata.name,
        value,
    })
}

/// A Kubernetes Namespace, stored as the Profile `kns.<ns>` with its labels.
fn namespace(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let fail = |e: String| {
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        invalid(doc, format!("Namespace {name}: {e}"))
    };
    let ns = K8sNamespace::from_value(v).map_err(fail)?;
    let profile = ns.to_profile().map_err(fail)?;
    let value = serde_json::to_value(&profile).map_err(|e| fail(e.to_string()))?;
    Ok(Manifest {
        kind: Kind::Namespace,
        namespace: None,
        key: Kind::Namespace.key("", ns.name()),
        name: ns.name().to_owned(),
        value,
    })
}

/// A Kubernetes Pod, stored trimmed to its labels and container ports.
fn pod(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let fail = |e: String| {
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        invalid(doc, format!("Pod {}/{name}: {e}", namespace_of(v)))
    };
    let pod = K8sPod::from_manifest(v).map_err(fail)?;
    let value = serde_json::to_value(&pod).map_err(|e| fail(e.to_string()))?;
    Ok(Manifest {
        kind: Kind::Pod,
        namespace: Some(pod.namespace().to_owned()),
        key: pod.key(),
        name: pod.name().to_owned(),
        value,
    })
}

fn name_of(doc: usize, v: &Value) -> Result<String, ManifestError> {
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(doc, "metadata.name is required"))?;
    valid_name(doc, name)?;
    Ok(name.to_owned())
}

/// Kubernetes-style names: lowercase alphanumerics, '-' and '.', at most 253.
fn valid_name(doc: usize, name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            doc,
            format!("name {name:?} must be lowercase letters, digits, '-' or '.'"),
        ))
    }
}

/// Checks an IPPool's spec and fills Calico's defaults.
fn pool_spec(doc: usize, name: &str, spec: &Value) -> Result<Value, ManifestError> {
    let cidr_s = spec
        .get("cidr")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(doc, format!("IPPool {name}: spec.cidr is required")))?;
    let cidr: Ipv4Net = cidr_s.parse().map_err(|_| {
        invalid(
            doc,
            format!("IPPool {name}: spec.cidr {cidr_s:?} is not an IPv4 CIDR"),
        )
    })?;
    if cidr.trunc() != cidr {
        return Err(invalid(
            doc,
            format!(
                "IPPool {name}: spec.cidr {cidr} has host bits set (did you mean {}?)",
                cidr.trunc()
            ),
        ));
    }
    let block = spec
        .get("blockSize")
        .map_or(Some(26), Value::as_u64)
        .ok_or_else(|| {
            invalid(
                doc,
                format!("IPPool {name}: spec.blockSize must be a number"),
            )
        })?;
    if !(20..=32).contains(&block) || block < u64::from(cidr.prefix_len()) {
        return Err(invalid(
            doc,
            format!(
                "IPPool {name}: spec.blockSize {block} must be within 20..32 and not larger than the pool /{}",
                cidr.prefix_len()
            ),
        ));
    }
    let ipip = spec
        .get("ipipMode")
        .and_then(Value::as_str)
        .unwrap_or("Never");
    if !matches!(ipip, "Always" | "CrossSubnet" | "Never") {
        return Err(invalid(
            doc,
            format!("IPPool {name}: spec.ipipMode {ipip:?} must be Always, CrossSubnet or Never"),
        ));
    }
    let vxlan = spec
        .get("vxlanMode")
        .and_then(Value::as_str)
        .unwrap_or("Never");
    if vxlan != "Never" {
        return Err(invalid(
            doc,
            format!("IPPool {name}: vxlanMode {vxlan:?} is not supported; use ipipMode"),
        ));
    }
    let bool_field = |field: &str| -> Result<bool, ManifestError> {
        match spec.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(
                doc,
                format!("IPPool {name}: spec.{field} must be true or false, not {other}"),
            )),
        }
    };
    Ok(json!({
        "cidr": cidr.to_string(),
        "blockSize": block,
        "ipipMode": ipip,
        "vxlanMode": "Never",
        "natOutgoing": bool_field("natOutgoing")?,
        "disabled": bool_field("disabled")?,
        "nodeSelector": spec.get("nodeSelector").and_then(Value::as_str).unwrap_or("all()"),
    }))
}

fn ip_pool_v3(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let name = name_of(doc, v)?;
    let spec = pool_spec(doc, &name, v.get("spec").unwrap_or(&Value::Null))?;
    Ok(pool_manifest(name, spec))
}

fn pool_manifest(name: String, spec: Value) -> Manifest {
    Manifest {
        kind: Kind::IpPool,
        namespace: None,
        key: Kind::IpPool.key("", &name),
        value: json!({
            "kind": "IPPool",
            "apiVersion": "projectcalico.org/v3",
            "metadata": { "name": name },
            "spec": spec,
        }),
        name,
    }
}

/// The seed's v1 pool: `metadata.cidr`, `spec.ipip.{enabled,mode}`, `spec.nat-outgoing`,
/// `spec.disabled`. Named after its CIDR the way Calico's upgrade names converted pools.
fn ip_pool_v1(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let cidr = v
        .pointer("/metadata/cidr")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(doc, "v1 ipPool: metadata.cidr is required"))?;
    let name = format!("ippool-{}", cidr.replace(['.', '/'], "-"));
    let spec = v.get("spec").cloned().unwrap_or(Value::Null);
    let ipip_enabled = spec
        .pointer("/ipip/enabled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mode = spec
        .pointer("/ipip/mode")
        .and_then(Value::as_str)
        .unwrap_or("always");
    let ipip_mode = match (ipip_enabled, mode) {
        (false, _) => "Never",
        (true, "cross-subnet") => "CrossSubnet",
        (true, "always" | "") => "Always",
        (true, other) => {
            return Err(invalid(
                doc,
                format!("v1 ipPool {cidr}: ipip.mode {other:?} must be always or cross-subnet"),
            ));
        }
    };
    let v3 = json!({
        "cidr": cidr,
        "ipipMode": ipip_mode,
        "natOutgoing": spec.get("nat-outgoing").cloned().unwrap_or(Value::Bool(false)),
        "disabled": spec.get("disabled").cloned().unwrap_or(Value::Bool(false)),
    });
    let spec = pool_spec(doc, &name, &v3)?;
    Ok(pool_manifest(name, spec))
}

fn node_v3(doc: usize, v: &Value) -> Result<Manifest, ManifestError> {
    let name = name_of(doc, v)?;
    let addr = v.pointer("/spec/bgp/ipv4Address").and_then(Value::as_str);
    if let Some(addr) = addr
        && addr.parse::<Ipv4Net>().is_err()
    {
        return Err(invalid(
            doc,
            format!(
                "Node {name}: spec.bgp.ipv4Address {addr:?} must be an address with its prefix, e.g. 192.168.1.10/24"
            ),
        ));
    }
    let mut spec = v.get("spec").cloned().unwrap_or_else(|| json!({}));
    if !spec.is_object() {
        return Err(invalid(doc, format!("Node {name}: spec must be a mapping")));
    }
    if spec.get("bgp").is_none() {
        spec["bgp"] = json!({});
    }
    Ok(Manifest {
        kind: Kind::Node,
        namespace: None,
        key: Kind::Node.key("", &name),
        value: json!({
            "kind": "Node",
            "apiVersion": "projectcalico.org/v3",
            "metadata": { "name": name, "labels": v.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})) },
            "spec": spec,
        }),
        name,
    })
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn json_documents_parse_like_their_yaml() {
        let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.1.0.0/16}\n";
        let json = r#"{"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.1.0.0/16"}}
{"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "q"}, "spec": {"cidr": "10.2.0.0/16"}}"#;
        let from_yaml = parse(yaml).unwrap();
        let from_json = parse(json).unwrap();
        assert_eq!(from_json.len(), 2);
        assert_eq!(from_json[0], from_yaml[0]);
        // YAML flow style that starts with '{' but is not JSON still parses.
        assert_eq!(
            parse("{apiVersion: projectcalico.org/v3, kind: IPPool, metadata: {name: p}, spec: {cidr: 10.1.0.0/16}}").unwrap(),
            from_yaml
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_pool_and_node_parse_with_defaults() {
        let m = parse(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p1}\nspec: {cidr: 10.70.0.0/16, ipipMode: CrossSubnet, natOutgoing: true}\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-1}\nspec: {bgp: {ipv4Address: 192.168.1.10/24}}\n",
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].key,
            "/calico/resources/v3/projectcalico.org/ippools/p1"
        );
        assert_eq!(m[0].value["spec"]["blockSize"], 26);
        assert_eq!(m[0].value["spec"]["ipipMode"], "CrossSubnet");
        assert_eq!(
            m[1].key,
            "/calico/resources/v3/projectcalico.org/nodes/node-1"
        );
    }

    #[test]
    fn the_seed_v1_pool_is_translated() {
        let m = parse("apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.80.0.0/16}\nspec:\n  ipip: {enabled: true, mode: cross-subnet}\n  nat-outgoing: true\n").unwrap();
        assert_eq!(m[0].name, "ippool-10-80-0-0-16");
        assert_eq!(m[0].value["spec"]["ipipMode"], "CrossSubnet");
        assert_eq!(m[0].value["spec"]["natOutgoing"], true);
    }

    #[test]
    fn bad_manifests_name_the_document_and_field() {
        for (text, want) in [
            (
                "kind: IPPool\napiVersion: projectcalico.org/v3\nmetadata: {name: x}\nspec: {cidr: 10.0.0.1/16}",
                "host bits",
            ),
            (
                "kind: IPPool\napiVersion: projectcalico.org/v3\nmetadata: {name: x}\nspec: {cidr: nope}",
                "not an IPv4 CIDR",
            ),
            (
                "kind: IPPool\napiVersion: projectcalico.org/v3\nmetadata: {name: x}\nspec: {cidr: 10.0.0.0/24, blockSize: 20}",
                "blockSize",
            ),
            (
                "kind: IPPool\napiVersion: projectcalico.org/v3\nmetadata: {name: x}\nspec: {cidr: 10.0.0.0/16, ipipMode: Sometimes}",
                "ipipMode",
            ),
            (
                "kind: IPPool\napiVersion: projectcalico.org/v3\nmetadata: {name: X_Y}\nspec: {cidr: 10.0.0.0/16}",
                "lowercase",
            ),
            (
                "kind: Node\napiVersion: projectcalico.org/v3\nmetadata: {name: n}\nspec: {bgp: {ipv4Address: 1.2.3.4}}",
                "prefix",
            ),
            ("kind: Widget\napiVersion: v9", "not supported"),
            ("a: [", "not valid YAML"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("document 1"), "{e}");
        }
    }

    const MIXED: &str = "apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: http}]}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: calico-np}
spec: {selector: all(), ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-egress}
spec: {selector: all(), types: [Egress]}
";

    #[test]
    fn kubernetes_and_calico_policy_kinds() {
        let m = parse(MIXED).unwrap();
        let lines: Vec<(Kind, String, &str)> = m
            .iter()
            .map(|m| (m.kind, m.display_name(), m.key.as_str()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (
                    Kind::Namespace,
                    "prod".into(),
                    "/calico/resources/v3/projectcalico.org/profiles/kns.prod"
                ),
                (
                    Kind::Pod,
                    "prod/web-0".into(),
                    "/calico/k8s/pods/prod/web-0"
                ),
                (
                    Kind::NetworkPolicy,
                    "prod/knp.default.allow-web".into(),
                    "/calico/resources/v3/projectcalico.org/networkpolicies/prod/knp.default.allow-web"
                ),
                (
                    Kind::NetworkPolicy,
                    "default/calico-np".into(),
                    "/calico/resources/v3/projectcalico.org/networkpolicies/default/calico-np"
                ),
                (
                    Kind::GlobalNetworkPolicy,
                    "deny-egress".into(),
                    "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny-egress"
                ),
            ]
        );
        assert_eq!(
            m[0].value["spec"]["labelsToApply"]["kubernetes.io/metadata.name"],
            "prod"
        );
        assert_eq!(
            m[1].value["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert!(m[1].value["spec"]["containers"][0].get("image").is_none());
        assert_eq!(m[2].value["spec"]["order"], 1000.0);
        assert_eq!(
            m[2].value["spec"]["ingress"][0]["destination"]["ports"],
            json!(["http"])
        );
        assert_eq!(m[3].value["metadata"]["namespace"], "default");
        assert_eq!(m[3].value["apiVersion"], "projectcalico.org/v3");
        assert!(m[4].value["metadata"].get("namespace").is_none());
    }

    #[test]
    fn bad_policy_documents_name_the_resource_and_field() {
        for (text, want) in [
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: a}\nspec: {ingress: [{ports: [{port: 99999}]}]}",
                "document 1: NetworkPolicy a/x: spec.ingress[0].ports[0].port 99999 is outside 1..=65535",
            ),
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/40}}]}]}",
                "NetworkPolicy default/x: spec.egress[0].to[0].ipBlock.cidr \"10.0.0.0/40\" is not a CIDR",
            ),
            (
                "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x, namespace: b}\nspec: {ingress: [{action: Allow, protocol: XTP}]}",
                "NetworkPolicy b/x: spec.ingress[0].protocol: unknown protocol",
            ),
            (
                "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {ingress: [{action: Maybe}]}",
                "GlobalNetworkPolicy g: unknown variant `Maybe`",
            ),
            (
                "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: G}\nspec: {}",
                "lowercase",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: 80, protocol: ICMP}]}]}",
                "Pod default/p: spec.containers[0].ports[0].protocol",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: Prod}",
                "Namespace Prod: metadata.name",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn kinds_parse_with_aliases() {
        for (s, k) in [
            ("netpol", Kind::NetworkPolicy),
            ("np", Kind::NetworkPolicy),
            ("NetworkPolicies", Kind::NetworkPolicy),
            ("gnp", Kind::GlobalNetworkPolicy),
            ("ns", Kind::Namespace),
            ("pods", Kind::Pod),
            ("profile", Kind::Profile),
        ] {
            assert_eq!(Kind::parse(s), Some(k), "{s}");
        }
        assert_eq!(Kind::parse("widget"), None);
        assert_eq!(
            Kind::NetworkPolicy.candidate_names("x"),
            ["x", "knp.default.x"]
        );
        assert_eq!(
            Kind::NetworkPolicy.candidate_names("knp.default.x"),
            ["knp.default.x"]
        );
        assert_eq!(Kind::Pod.candidate_names("x"), ["x"]);
        assert_eq!(
            Kind::Namespace.key("ignored", "prod"),
            "/calico/resources/v3/projectcalico.org/profiles/kns.prod"
        );
        assert_eq!(Kind::Pod.prefix(None), "/calico/k8s/pods/");
        assert_eq!(Kind::Pod.prefix(Some("a")), "/calico/k8s/pods/a/");
    }
}

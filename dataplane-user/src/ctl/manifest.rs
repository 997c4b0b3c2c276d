//! Manifests for `dataplane ctl apply`: YAML (or JSON) documents turned into Calico v3 resources
//! with their etcd keys, validated before anything is written.
//!
//! Accepted: `projectcalico.org/v3` IPPool and Node, and the seed's older `v1` `ipPool` (with
//! `ipip: {enabled, mode}` and `nat-outgoing`), translated to a v3 IPPool.

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::datastore::keys;

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
}

impl Kind {
    /// Parses a kind as users type it: `ippool`, `ippools`, `IPPool`, `node`, `nodes`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ippool" | "ippools" | "pool" | "pools" => Some(Self::IpPool),
            "node" | "nodes" => Some(Self::Node),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::IpPool => "IPPool",
            Self::Node => "Node",
        }
    }

    pub fn key(self, name: &str) -> String {
        match self {
            Self::IpPool => keys::ip_pool(name),
            Self::Node => keys::node(name),
        }
    }

    pub fn prefix(self) -> String {
        match self {
            Self::IpPool => keys::ip_pool(""),
            Self::Node => keys::node(""),
        }
    }
}

/// One resource ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub kind: Kind,
    pub name: String,
    pub key: String,
    /// The v3 resource as stored (JSON).
    pub value: Value,
}

/// Parses every document of `text` (YAML; JSON is YAML too). Empty documents are skipped.
pub fn parse(text: &str) -> Result<Vec<Manifest>, ManifestError> {
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
        ("", _) | (_, "") => Err(invalid(doc, "apiVersion and kind are required")),
        _ => Err(invalid(
            doc,
            format!(
                "{api} {kind} is not supported (IPPool and Node of projectcalico.org/v3, v1 ipPool)"
            ),
        )),
    }
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
        key: Kind::IpPool.key(&name),
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
        key: Kind::Node.key(&name),
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
}

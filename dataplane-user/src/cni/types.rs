//! The CNI protocol's data: network configuration, environment, results in each spec version,
//! and the spec's error object.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes (and ours from 100 on).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Our own: an internal failure (netlink, a kernel call).
    pub const INTERNAL: u32 = 100;
    /// Our own: the IP pools have no free address.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// Our own: the datastore answered with an error or a value we cannot use.
    pub const DATASTORE: u32 = 102;
    /// Our own: CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 103;
    /// Our own: a delegated IPAM plugin failed.
    pub const DELEGATE: u32 = 104;
}

/// The spec's error object; printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn version(mut self, v: &str) -> Self {
        self.cni_version = v.to_owned();
        self
    }
}

/// A `cni.dev/valid-attachments` (or older `cni.dev/attachments`) entry, for GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

/// The network configuration on stdin. Keys follow Calico's 10-calico.conf; unknown keys are
/// accepted (runtimes add their own).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub etcd_endpoints: Option<String>,
    #[serde(default)]
    pub etcd_key_file: Option<String>,
    #[serde(default)]
    pub etcd_cert_file: Option<String>,
    #[serde(default)]
    pub etcd_ca_cert_file: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub nodename: Option<String>,
    /// How long ADD waits for this node's agent to program the new endpoint (its policy in
    /// force before the pod's first packet), in milliseconds. Default 10,000; 0: no wait.
    /// Only waited for when the node has a live agent.
    #[serde(default)]
    pub policy_wait_ms: Option<u64>,
    /// The agent's socket for this plugin's latency records (default
    /// /var/run/dataplane/cni-metrics.sock; "": none sent).
    #[serde(default)]
    pub metrics_socket: Option<String>,
    /// Kept raw: passed as is to a delegated IPAM plugin.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<Attachment>>,
}

/// What the environment says about this call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: String,
}

impl Env {
    /// Reads the CNI_* variables from `get` (the process environment in production).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = get("CNI_COMMAND").unwrap_or_default();
        let mut args = BTreeMap::new();
        if let Some(raw) = get("CNI_ARGS") {
            for pair in raw.split(';').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    CniError::new(code::INVALID_ENV, "CNI_ARGS is malformed")
                        .details(format!("{pair:?} is not KEY=VALUE"))
                })?;
                args.insert(k.to_owned(), v.to_owned());
            }
        }
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
            path: get("CNI_PATH").unwrap_or_default(),
        })
    }

    /// Fails with code 4 unless each named variable is set and not empty.
    pub fn require(&self, vars: &[&str]) -> Result<(), CniError> {
        for var in vars {
            let value = match *var {
                "CNI_CONTAINERID" => &self.container_id,
                "CNI_NETNS" => &self.netns,
                "CNI_IFNAME" => &self.ifname,
                "CNI_PATH" => &self.path,
                _ => continue,
            };
            if value.is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{var} is required"),
                ));
            }
        }
        if self.ifname.len() > 15 || self.ifname.contains(['/', ' ']) {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_IFNAME is not a valid interface name",
            )
            .details(self.ifname.clone()));
        }
        if !self.container_id.is_empty()
            && !self
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_CONTAINERID may only hold letters, digits, '-', '_' and '.'",
            )
            .details(self.container_id.clone()));
        }
        Ok(())
    }

    /// The pod's (namespace, name) from K8S_POD_NAMESPACE/K8S_POD_NAME, when both are given.
    pub fn pod(&self) -> Option<(&str, &str)> {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
            _ => None,
        }
    }
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// An address in a result (the shape is shared by all versions; `version` only before 1.0.0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A result as every version since 0.3.0 shapes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// Re-shapes the result for spec version `v`: before 1.0.0 every address carries
    /// `"version": "4"`; from 1.0.0 on the field is gone.
    pub fn in_version(mut self, v: &str) -> Self {
        let pre_1 = v.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = pre_1.then(|| "4".to_owned());
        }
        if self.dns.is_null() {
            self.dns = Value::Object(Default::default());
        }
        self.cni_version = v.to_owned();
        self
    }

    /// The first IPv4 address of the result, without its prefix length.
    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| {
            ip.address
                .split('/')
                .next()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
        })
    }
}

/// Whether `v` is a spec version we speak.
pub fn is_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// Compares spec versions numerically ("0.4.0" < "1.0.0").
pub fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(v) >= parse(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_take_the_shape_of_their_version() {
        let r = CniResult {
            cni_version: String::new(),
            interfaces: vec![],
            ips: vec![IpConfig {
                version: None,
                address: "10.65.0.2/32".into(),
                gateway: None,
                interface: Some(1),
            }],
            routes: vec![],
            dns: Value::Null,
        };
        let old = serde_json::to_value(r.clone().in_version("0.3.1")).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.3.1");
        let new = serde_json::to_value(r.in_version("1.0.0")).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["dns"], serde_json::json!({}));
    }

    #[test]
    fn cni_args_parse_and_reject_garbage() {
        let env = Env::from_vars(|k| {
            (k == "CNI_ARGS").then(|| "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".into())
        })
        .unwrap();
        assert_eq!(env.pod(), Some(("ns", "p")));
        let err = Env::from_vars(|k| (k == "CNI_ARGS").then(|| "novalue".into())).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(version_at_least("1.1.0", "1.1.0"));
    }
}

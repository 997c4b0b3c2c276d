//! A CNI call read and checked before anything is done: the environment, the network config
//! and (for CHECK) prevResult, and what each command derives from them. Nothing here touches
//! the machine or the datastore, so every mistake an input can carry is found here, as the
//! spec's error object with its code (the coverage-guided fuzz target `cni_stdin` runs it).

use std::{net::Ipv4Addr, time::Duration};

use super::{
    OUR_IPAM, netsetup,
    types::{CniError, CniResult, Env, NetConf, SUPPORTED_VERSIONS, code, is_supported},
};
use crate::{
    datastore::{self, EtcdConfig},
    ipam::IpamConfig,
};

/// What a CNI invocation asks for, once read.
#[derive(Debug)]
pub enum Call {
    /// VERSION: the answer to print (it needs no config).
    Version(String),
    /// ADD, DEL, CHECK, STATUS or GC, with its input checked.
    Command(Box<Request>),
}

/// A command's input, checked: the variables it requires are set, the config decodes and
/// speaks a version that has the command.
#[derive(Debug)]
pub struct Request {
    pub env: Env,
    pub conf: NetConf,
    /// CHECK: the first IPv4 address of prevResult.
    pub prev_ip: Option<Ipv4Addr>,
}

/// Reads a call from the environment (`env_var`) and stdin. An error carries the config's
/// version once the config has one.
pub fn parse_call(
    env_var: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Call, CniError> {
    let env = Env::from_vars(&env_var)?;
    if env.command == "VERSION" {
        return Ok(Call::Version(version_answer(stdin)));
    }
    let conf = parse_conf(stdin)?;
    let version = conf.cni_version.clone();
    check_command(&env, &conf)
        .map(|prev_ip| Call::Command(Box::new(Request { env, conf, prev_ip })))
        .map_err(|e| e.version(&version))
}

/// VERSION's answer, in the version stdin asks for when it is one we speak (stdin holds only
/// `{"cniVersion": …}`, and may be empty or anything else).
fn version_answer(stdin: &[u8]) -> String {
    let asked: serde_json::Value = serde_json::from_slice(stdin).unwrap_or_default();
    let version = asked
        .get("cniVersion")
        .and_then(|v| v.as_str())
        .filter(|v| is_supported(v))
        .unwrap_or(SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]);
    serde_json::json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
        .to_string()
}

/// Decodes and validates the network config.
fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(
            code::DECODE,
            "no network configuration on stdin",
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "network configuration is not valid JSON of the expected shape",
        )
        .details(e.to_string())
    })?;
    if conf.cni_version.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, "cniVersion is missing"));
    }
    if !is_supported(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
        )
        .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is out of range 68..65535"),
        ));
    }
    Ok(conf)
}

/// The command exists in the config's version (CHECK from 0.4.0, STATUS and GC from 1.1.0)
/// and has the variables it needs; CHECK's prevResult gives its address.
fn check_command(env: &Env, conf: &NetConf) -> Result<Option<Ipv4Addr>, CniError> {
    let (min, required): (&str, &[&str]) = match env.command.as_str() {
        "ADD" => ("0.3.0", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        "DEL" => ("0.3.0", &["CNI_CONTAINERID", "CNI_IFNAME"]),
        "CHECK" => ("0.4.0", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        "STATUS" | "GC" => ("1.1.0", &[]),
        "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is required")),
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            ));
        }
    };
    if !super::types::version_at_least(&conf.cni_version, min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion {min} or later, the config says {}",
                env.command, conf.cni_version
            ),
        ));
    }
    if !required.is_empty() {
        env.require(required)?;
    }
    if env.command != "CHECK" {
        return Ok(None);
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult is required for CHECK"))?;
    let prev: CniResult = serde_json::from_value(prev.clone()).map_err(|e| {
        CniError::new(code::DECODE, "prevResult is not a CNI result").details(e.to_string())
    })?;
    prev.first_ipv4()
        .map(Some)
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult has no IPv4 address"))
}

impl Request {
    /// `ipam.type`, required.
    pub fn ipam_type(&self) -> Result<String, CniError> {
        self.conf
            .ipam
            .as_ref()
            .and_then(|i| i.get("type"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "ipam.type is required"))
    }

    /// Whether the IPAM is ours (done in-process) for a plugin of `kind`.
    pub fn ours(&self, kind: super::PluginKind) -> Result<bool, CniError> {
        Ok(kind == super::PluginKind::Ipam || self.ipam_type()? == OUR_IPAM)
    }

    /// `ipam.strict_affinity: true` forbids borrowing addresses from other nodes' blocks.
    pub fn ipam_config(&self) -> IpamConfig {
        let strict = self
            .conf
            .ipam
            .as_ref()
            .and_then(|i| i.get("strict_affinity"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        IpamConfig {
            strict_affinity: strict,
            ..IpamConfig::default()
        }
    }

    /// The IPAM handle of this container.
    pub fn handle_id(&self) -> String {
        format!("k8s-pod-network.{}", self.env.container_id)
    }

    /// The host side of the pod's veth.
    pub fn host_veth(&self) -> String {
        netsetup::host_veth_name(self.env.pod(), &self.env.container_id)
    }

    /// The key of this attachment's WorkloadEndpoint on `node`.
    pub fn endpoint_key(&self, node: &str) -> String {
        let (namespace, pod) = match self.env.pod() {
            Some((ns, pod)) => (ns.to_owned(), pod.to_owned()),
            None => ("default".to_owned(), self.env.container_id.clone()),
        };
        datastore::keys::workload_endpoint(&namespace, node, &pod, &self.env.ifname)
    }

    /// The etcd connection the config describes; `etcd_endpoints` is required.
    pub fn etcd_config(&self) -> Result<EtcdConfig, CniError> {
        let endpoints: Vec<String> = self
            .conf
            .etcd_endpoints
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "etcd_endpoints is required",
            ));
        }
        let file = |f: &Option<String>| f.as_deref().filter(|s| !s.is_empty()).map(Into::into);
        Ok(EtcdConfig {
            endpoints,
            ca_file: file(&self.conf.etcd_ca_cert_file),
            cert_file: file(&self.conf.etcd_cert_file),
            key_file: file(&self.conf.etcd_key_file),
            timeout: Duration::from_secs(5),
        })
    }

    /// The default pool to create when there is none, from the seed's pool options under
    /// ipam: `{"ipip": {"enabled": …, "mode": …}, "nat-outgoing": …, "cidr": …, "blockSize": …}`.
    /// A `cidr` or `blockSize` given but unusable is an error rather than silently the default.
    pub fn pool_options(&self) -> Result<datastore::DefaultPoolOptions, CniError> {
        let mut opts = datastore::DefaultPoolOptions::default();
        let Some(ipam) = &self.conf.ipam else {
            return Ok(opts);
        };
        let bad = |what: &str, v: &serde_json::Value| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.{what} {v} is not usable"),
            )
        };
        if let Some(v) = ipam.get("cidr") {
            opts.cidr = v
                .as_str()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad("cidr", v))?;
        }
        if let Some(v) = ipam.get("blockSize") {
            opts.block_size = v
                .as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| bad("blockSize", v))?;
        }
        if let Some(ipip) = ipam.get("ipip") {
            let enabled = ipip
                .get("enabled")
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            let mode = ipip
                .get("mode")
                .and_then(|v| v.as_str())
                .unwrap_or("always");
            opts.ipip_mode = match (enabled, mode.to_ascii_lowercase().as_str()) {
                (false, _) => datastore::IpipMode::Never,
                (true, "cross-subnet" | "crosssubnet") => datastore::IpipMode::CrossSubnet,
                (true, _) => datastore::IpipMode::Always,
            };
        }
        if let Some(nat) = ipam.get("nat-outgoing").and_then(|v| v.as_bool()) {
            opts.nat_outgoing = nat;
        }
        Ok(opts)
    }

    /// GC: the container IDs the runtime still knows (`cni.dev/valid-attachments`, or the
    /// older `cni.dev/attachments`).
    pub fn valid_containers(&self) -> std::collections::HashSet<String> {
        self.conf
            .valid_attachments
            .as_ref()
            .or(self.conf.attachments.as_ref())
            .map(|a| a.iter().map(|a| a.container_id.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(conf: serde_json::Value) -> Request {
        let stdin = conf.to_string();
        let env = |k: &str| {
            match k {
                "CNI_COMMAND" => Some("ADD"),
                "CNI_CONTAINERID" => Some("c1"),
                "CNI_NETNS" => Some("/x"),
                "CNI_IFNAME" => Some("eth0"),
                _ => None,
            }
            .map(str::to_owned)
        };
        match parse_call(env, stdin.as_bytes()).unwrap() {
            Call::Command(r) => *r,
            Call::Version(v) => panic!("{v}"),
        }
    }

    #[test]
    fn pool_options_reject_what_they_cannot_use() {
        // Found while writing the fuzz target: blockSize 282 was cast to 26 (282 mod 256) and
        // a cidr that did not parse silently fell back to the default pool.
        let r = request(serde_json::json!({
            "cniVersion": "1.0.0", "type": "dataplane",
            "ipam": {"type": "dataplane-ipam", "blockSize": 282}
        }));
        assert_eq!(r.pool_options().unwrap_err().code, code::INVALID_CONFIG);
        let r = request(serde_json::json!({
            "cniVersion": "1.0.0", "type": "dataplane",
            "ipam": {"type": "dataplane-ipam", "cidr": "10.300.0.0/16"}
        }));
        assert_eq!(r.pool_options().unwrap_err().code, code::INVALID_CONFIG);
        let r = request(serde_json::json!({
            "cniVersion": "1.0.0", "type": "dataplane",
            "ipam": {"type": "dataplane-ipam", "cidr": "10.70.0.0/16", "blockSize": 28,
                     "ipip": {"mode": "CrossSubnet"}, "nat-outgoing": false}
        }));
        let o = r.pool_options().unwrap();
        assert_eq!(
            (
                o.cidr.to_string(),
                o.block_size,
                o.ipip_mode,
                o.nat_outgoing
            ),
            (
                "10.70.0.0/16".to_owned(),
                28,
                datastore::IpipMode::CrossSubnet,
                false
            )
        );
    }

    #[test]
    fn errors_after_the_config_carry_its_version() {
        let stdin = br#"{"cniVersion":"0.4.0","type":"dataplane"}"#;
        let env = |k: &str| (k == "CNI_COMMAND").then(|| "CHECK".to_owned());
        let e = parse_call(env, stdin).unwrap_err();
        assert_eq!(
            (e.code, e.cni_version.as_str()),
            (code::INVALID_ENV, "0.4.0")
        );
    }
}

//! Calling CNI plugins the way a container runtime does: the real `dataplane` binary (and
//! Debian's reference plugins) exec'd in a node's namespace with CNI_* variables and the
//! config on stdin, single plugins or a chained conflist.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::{Value, json};

use crate::{
    cluster::{Node, dataplane_bin},
    netns::Netns,
};

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A CNI_PATH directory holding `dataplane` and `dataplane-ipam` (links to the binary under
/// test), removed on drop. CNI_PATH is this directory, then the reference plugins.
#[derive(Debug)]
pub struct PluginDir {
    pub dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dp-cni-bin-")
            .tempdir()
            .unwrap();
        for name in ["dataplane", "dataplane-ipam"] {
            std::os::unix::fs::symlink(dataplane_bin(), dir.path().join(name)).unwrap();
        }
        Self { dir }
    }

    pub fn cni_path(&self) -> String {
        format!("{}:{REFERENCE_PLUGINS}", self.dir.path().display())
    }

    pub fn plugin(&self, name: &str) -> PathBuf {
        let ours = self.dir.path().join(name);
        if ours.exists() {
            ours
        } else {
            Path::new(REFERENCE_PLUGINS).join(name)
        }
    }
}

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

/// The network config of the `dataplane` plugin for `node`, in spec `version`, with our IPAM.
pub fn dataplane_conf(version: &str, etcd_endpoint: &str, node: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "dataplane",
        "etcd_endpoints": etcd_endpoint,
        "nodename": node,
        "log_level": "info",
        "mtu": 1480,
        "ipam": { "type": "dataplane-ipam" },
    })
}

/// The first address of an ADD result, without its prefix length.
pub fn result_ip(result: &Value) -> std::net::Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {result}"))
}

/// One pod sandbox as a runtime sees it: a network namespace, a container ID, pod identity.
#[derive(Debug)]
pub struct Sandbox {
    pub ns: Netns,
    pub container_id: String,
    pub namespace: String,
    pub pod: String,
    pub ifname: String,
}

static SANDBOXES: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// An empty pod namespace for pod `namespace/pod` with a fresh container ID.
    pub fn new(node: &Node, namespace: &str, pod: &str) -> Self {
        let n = SANDBOXES.fetch_add(1, Ordering::Relaxed);
        let container_id = format!("{:08x}{:04x}c0ffee", std::process::id(), n);
        let ns = Netns::new(&format!("{}-sb{n}", node.ns.name));
        Self {
            ns,
            container_id,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            ifname: "eth0".to_owned(),
        }
    }

    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.namespace, self.pod, self.container_id
        )
    }
}

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {self:?}"))
    }

    /// Panics unless the call succeeded; returns its JSON (or null for an empty stdout).
    pub fn ok(&self) -> Value {
        assert!(self.success, "plugin failed: {self:?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Panics unless the call failed with a spec error object; returns its code.
    pub fn err_code(&self) -> u64 {
        assert!(!self.success, "plugin should have failed: {self:?}");
        self.json()["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {self:?}"))
    }
}

/// One plugin call: which plugin, which command, and what differs from a plain call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call<'a> {
    pub plugin: &'a str,
    pub command: &'a str,
    /// CNI_NETNS when not the sandbox's own namespace (e.g. one already deleted).
    pub netns: Option<&'a str>,
    pub extra_env: &'a [(&'a str, &'a str)],
}

impl<'a> Call<'a> {
    pub fn new(plugin: &'a str, command: &'a str) -> Self {
        Self {
            plugin,
            command,
            ..Self::default()
        }
    }
}

/// Execs `call.plugin` in `node`'s namespace with `call.command` for `sandbox`, `conf` on
/// stdin.
pub fn exec_plugin(
    node: &Node,
    plugins: &PluginDir,
    sandbox: &Sandbox,
    conf: &Value,
    call: Call<'_>,
) -> CniOutput {
    let Call {
        plugin,
        command,
        netns,
        extra_env,
    } = call;
    let netns_path = netns.map_or_else(|| sandbox.ns.path().display().to_string(), str::to_owned);
    let mut cmd = node.ns.command(plugins.plugin(plugin));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.container_id)
        .env("CNI_NETNS", netns_path)
        .env("CNI_IFNAME", &sandbox.ifname)
        .env("CNI_ARGS", sandbox.cni_args())
        .env("CNI_PATH", plugins.cni_path())
        .envs(extra_env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("exec {plugin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `dataplane` with `command` for `sandbox` and `conf`.
pub fn cni(
    node: &Node,
    plugins: &PluginDir,
    command: &str,
    sandbox: &Sandbox,
    conf: &Value,
) -> CniOutput {
    exec_plugin(
        node,
        plugins,
        sandbox,
        conf,
        Call::new("dataplane", command),
    )
}

/// Runs a conflist the way libcni does: ADD through the plugins in order, each given the
/// previous result as `prevResult`; DEL in reverse order. Returns the last output.
pub fn exec_list(
    node: &Node,
    plugins: &PluginDir,
    command: &str,
    sandbox: &Sandbox,
    list: &Value,
    runtime_config: &Value,
) -> CniOutput {
    let version = list["cniVersion"].as_str().unwrap();
    let name = list["name"].as_str().unwrap();
    let mut confs: Vec<Value> = list["plugins"].as_array().unwrap().clone();
    if command == "DEL" {
        confs.reverse();
    }
    let mut prev: Option<Value> = None;
    let mut last = None;
    for mut conf in confs {
        conf["cniVersion"] = json!(version);
        conf["name"] = json!(name);
        if let Some(caps) = conf.get("capabilities").and_then(Value::as_object) {
            let mut rc = serde_json::Map::new();
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
            conf["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        let plugin = conf["type"].as_str().unwrap().to_owned();
        let out = exec_plugin(node, plugins, sandbox, &conf, Call::new(&plugin, command));
        if !out.success {
            return out;
        }
        if command == "ADD" {
            prev = Some(out.json());
        }
        last = Some(out);
    }
    last.expect("an empty conflist")
}

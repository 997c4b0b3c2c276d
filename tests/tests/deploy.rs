//! The manifests in deploy/: every document validates against the Kubernetes API's schemas
//! (`kubernetes-validate --strict`, offline, installed by `cargo xtask setup`), a broken copy
//! is rejected (so the check can fail), and the ConfigMap's CNI template renders through
//! `dataplane install-cni` into a config list the plugin accepts, and the DaemonSet's
//! `ensure-ippool` step runs as written against a real etcd (that one needs root).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use dataplane_tests::dataplane_bin;
use serde_yaml_ng::Value as Y;

/// The Kubernetes version the manifests are checked against (the newest the validator bundles).
const KUBERNETES_VERSION: &str = "1.37.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "deploy/ has only {files:?}");
    files
}

fn validator() -> PathBuf {
    let exe = std::env::var_os("KUBERNETES_VALIDATE").map_or_else(
        || PathBuf::from("/opt/dataplane-tools/venv/bin/kubernetes-validate"),
        PathBuf::from,
    );
    assert!(
        exe.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate) or set \
         KUBERNETES_VALIDATE",
        exe.display()
    );
    exe
}

fn validate(files: &[PathBuf]) -> Output {
    Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .unwrap()
}

/// Every YAML document in deploy/, parsed.
fn documents() -> Vec<(PathBuf, serde_yaml_ng::Value)> {
    let mut out = Vec::new();
    for f in manifests() {
        let text = fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push((f.clone(), v));
            }
        }
    }
    out
}

fn find<'a>(docs: &'a [(PathBuf, serde_yaml_ng::Value)], kind: &str) -> &'a serde_yaml_ng::Value {
    &docs
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in deploy/"))
        .1
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    let out = validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    // One "passed" line per document: no document skipped (e.g. an unknown kind).
    let docs = documents();
    assert_eq!(
        stdout.matches(" passed ").count() + stderr.matches(" passed ").count(),
        docs.len(),
        "{stdout}{stderr}"
    );
    let kinds: Vec<&str> = docs
        .iter()
        .filter_map(|(_, d)| d["kind"].as_str())
        .collect();
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "DaemonSet",
    ] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
}

#[test]
fn broken_copies_are_rejected() {
    let ds = manifests()
        .into_iter()
        .find(|p| fs::read_to_string(p).unwrap().contains("kind: DaemonSet"))
        .unwrap();
    let text = fs::read_to_string(&ds).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (from, to, why) in [
        (
            "maxUnavailable: 1",
            "maxUnavialable: 1",
            "'maxUnavialable' was unexpected",
        ),
        (
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: thirty",
            "is not of type 'integer'",
        ),
        (
            "hostNetwork: true",
            "hostNetwork: [true]",
            "is not of type 'boolean'",
        ),
    ] {
        assert!(text.contains(from), "{from} not in {}", ds.display());
        let bad = dir.path().join("broken.yaml");
        fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let out = validate(&[bad]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{to:?} passed: {all}");
        assert!(all.contains(why), "{to:?}: {all}");
    }
}

#[test]
fn the_daemonset_has_what_a_node_needs() {
    let docs = documents();
    let ds = find(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], Y::from(true));
    assert_eq!(spec["automountServiceAccountToken"], Y::from(false));
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"],
        Y::from("RollingUpdate")
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        Y::from(1)
    );
    assert!(
        spec["tolerations"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "no toleration of every taint"
    );
    let inits: Vec<&str> = spec["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(inits.contains(&"install-cni"), "{inits:?}");
    let containers = spec["containers"].as_sequence().unwrap();
    let agent = containers.iter().find(|c| c["name"] == "agent").unwrap();
    for (probe, path) in [
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ] {
        assert_eq!(agent[probe]["httpGet"]["port"], Y::from(9099), "{probe}");
        assert_eq!(agent[probe]["httpGet"]["path"], Y::from(path), "{probe}");
    }
    assert!(agent["resources"]["requests"].is_mapping());
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    // /var/run/dataplane: the CNI plugin (on the host) sends its latency records there, and
    // `dataplane cleanup` on the host sees the iptables mode's lock.
    for path in [
        "/sys/fs/bpf",
        "/lib/modules",
        "/var/run/netns",
        "/var/run/dataplane",
    ] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
    // No Role or binding: the agent never talks to the API server.
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        assert!(
            !docs.iter().any(|(_, d)| d["kind"] == *kind),
            "{kind} in deploy/"
        );
    }
    // The image's commands are ours: `dataplane agent`, `dataplane install-cni`.
    let commands: Vec<String> = containers
        .iter()
        .chain(spec["initContainers"].as_sequence().unwrap())
        .map(|c| serde_yaml_ng::to_string(&c["command"]).unwrap())
        .collect();
    assert!(commands.iter().any(|c| c.contains("agent")));
    assert!(commands.iter().any(|c| c.contains("install-cni")));
}

/// The ConfigMap's template, rendered by the real installer with the ConfigMap's values as
/// the DaemonSet passes them (environment variables), gives a config list the plugin accepts.
#[test]
fn the_configmap_template_renders_through_install_cni() {
    let docs = documents();
    let data = &find(&docs, "ConfigMap")["data"];
    let get = |k: &str| {
        data[k]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap key {k} missing"))
            .to_owned()
    };
    let host = tempfile::tempdir().unwrap();
    let (bin, net) = (host.path().join("bin"), host.path().join("net.d"));
    let out = Command::new(dataplane_bin())
        .args(["install-cni", "--node", "node-1"])
        .arg("--nodename-file")
        .arg(host.path().join("nodename"))
        .env("CNI_BIN_DIR", &bin)
        .env("CNI_NET_DIR", &net)
        .env("CNI_NETWORK_CONFIG", get("cni_network_config"))
        .env("ETCD_ENDPOINTS", get("etcd_endpoints"))
        .env("ETCD_CA_CERT_FILE", get("etcd_ca"))
        .env("ETCD_CERT_FILE", get("etcd_cert"))
        .env("ETCD_KEY_FILE", get("etcd_key"))
        .env("CNI_MTU", get("veth_mtu"))
        .env("CNI_LOG_LEVEL", get("cni_log_level"))
        .env_remove("CNI_NETWORK_CONFIG_FILE")
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(net.join("10-dataplane.conflist")).unwrap();
    dataplane::install_cni::validate_conflist(&text).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let plugin = &v["plugins"][0];
    assert_eq!(plugin["type"], "dataplane");
    assert_eq!(plugin["ipam"]["type"], "dataplane-ipam");
    assert_eq!(plugin["etcd_endpoints"], get("etcd_endpoints").as_str());
    assert_eq!(
        plugin["mtu"],
        get("veth_mtu").parse::<u64>().unwrap(),
        "{text}"
    );
    assert_eq!(plugin["nodename"], "node-1");
    assert_eq!(plugin["etcd_ca_cert_file"], "");
    assert!(bin.join("dataplane").is_file());
}

/// A container's environment as the kubelet would give it: literal values, ConfigMap keys
/// from deploy/'s ConfigMap (with `overrides`), `spec.nodeName` as `node`.
fn container_env(
    container: &Y,
    config: &Y,
    overrides: &[(&str, &str)],
    node: &str,
) -> Vec<(String, String)> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if let Some(key) = e["valueFrom"]["configMapKeyRef"]["key"].as_str() {
                overrides
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).to_owned())
                    .unwrap_or_else(|| config[key].as_str().unwrap().to_owned())
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                node.to_owned()
            } else {
                panic!("env {name}: unknown source {e:?}")
            };
            (name, value)
        })
        .collect()
}

/// The DaemonSet's init steps run as written (commands, environment from the ConfigMap) in a
/// node of the cluster in a box with a real etcd: `ensure-ippool` creates the ConfigMap's pool
/// and on the next node (or restart) leaves the existing pool alone; `install-cni` installs
/// the plugin and the conflist, through which a runtime-like caller then gives a pod its
/// address from that pool. Needs root.
#[test]
fn the_init_steps_as_written_give_a_pod_an_address_with_a_real_etcd() {
    dataplane_tests::require_root();
    let docs = documents();
    let config = &find(&docs, "ConfigMap")["data"];
    let ds = find(&docs, "DaemonSet");
    let init = ds["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ensure-ippool")
        .expect("no ensure-ippool init container");
    let command: Vec<String> = init["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let cluster = dataplane_tests::Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let endpoint = cluster.etcd.as_ref().unwrap().endpoint();
    // A pool other than the plugin's built-in default, to see that the ConfigMap's is used.
    let overrides = [
        ("etcd_endpoints", endpoint.as_str()),
        ("pool_cidr", "10.77.0.0/16"),
    ];
    let env = container_env(init, config, &overrides, &node.name);
    // `dataplane` on PATH, as in the image.
    let bin_dir = dataplane_bin().parent().unwrap().to_owned();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display());
    let run = || {
        let out = dataplane_tests::netns::output(
            node.ns
                .command(&command[0])
                .args(&command[1..])
                .env_clear()
                .env("PATH", &path)
                .envs(env.iter().map(|(k, v)| (k, v))),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ensure-ippool: {text}");
        text
    };
    let first = run();
    assert!(!first.contains("already in etcd"), "{first}");
    let pool_name = config["pool_name"].as_str().unwrap();
    let get = || {
        let (status, stdout, stderr) = dataplane_tests::dataplane(
            &node.ns,
            &[
                "ctl",
                "--etcd-endpoints",
                &endpoint,
                "get",
                "ippool",
                pool_name,
                "-o",
                "json",
            ],
        );
        assert!(status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // One resource, or a list of one.
        if v.is_array() { v[0].clone() } else { v }
    };
    let pool = get();
    assert_eq!(pool["spec"]["cidr"], "10.77.0.0/16");
    assert_eq!(
        pool["spec"]["ipipMode"],
        config["ipip_mode"].as_str().unwrap()
    );
    assert_eq!(
        pool["spec"]["blockSize"].to_string(),
        config["pool_block_size"].as_str().unwrap()
    );
    // A pool changed since (by `dataplane ctl apply`) is not reset by the next node's step.
    let tmp = tempfile::tempdir().unwrap();
    let changed = tmp.path().join("pool.yaml");
    fs::write(
        &changed,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {pool_name}}}\nspec: {{cidr: 10.77.0.0/16, ipipMode: Never, natOutgoing: true}}\n",
        ),
    )
    .unwrap();
    let (status, _, stderr) = dataplane_tests::dataplane(
        &node.ns,
        &[
            "ctl",
            "--etcd-endpoints",
            &endpoint,
            "apply",
            "-f",
            changed.to_str().unwrap(),
        ],
    );
    assert!(status.success(), "{stderr}");
    let second = run();
    assert!(second.contains("already in etcd"), "{second}");
    assert_eq!(get()["spec"]["ipipMode"], "Never");

    // install-cni as the init container runs it, the host's directories being temporary ones.
    let install = ds["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "install-cni")
        .expect("no install-cni init container");
    let args: Vec<&str> = install["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["dataplane", "install-cni"]);
    let plugins = dataplane_tests::cni::PluginDir {
        dir: tempfile::Builder::new()
            .prefix("dp-cni-bin-")
            .tempdir()
            .unwrap(),
    };
    let net = tempfile::tempdir().unwrap();
    let template = tmp.path().join("cni_network_config");
    fs::write(&template, config["cni_network_config"].as_str().unwrap()).unwrap();
    let env: Vec<(String, String)> = container_env(install, config, &overrides, &node.name)
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "CNI_NETWORK_CONFIG_FILE" => (k, template.display().to_string()),
            _ => (k, v),
        })
        .collect();
    let out = Command::new(dataplane_bin())
        .args(&args[1..])
        .arg("--nodename-file")
        .arg(tmp.path().join("nodename"))
        .env_clear()
        .env("CNI_BIN_DIR", plugins.dir.path())
        .env("CNI_NET_DIR", net.path())
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-cni: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value =
        serde_json::from_slice(&fs::read(net.path().join("10-dataplane.conflist")).unwrap())
            .unwrap();
    let sandbox = dataplane_tests::cni::Sandbox::new(node, "default", "web-0");
    let add = dataplane_tests::cni::exec_list(
        node,
        &plugins,
        "ADD",
        &sandbox,
        &list,
        &serde_json::json!({}),
    );
    let ip = dataplane_tests::cni::result_ip(&add.ok());
    assert!(
        ip.octets()[..2] == [10, 77],
        "{ip} is not in the ConfigMap's pool"
    );
    let del = dataplane_tests::cni::exec_list(
        node,
        &plugins,
        "DEL",
        &sandbox,
        &list,
        &serde_json::json!({}),
    );
    assert!(del.success, "DEL: {del:?}");
}

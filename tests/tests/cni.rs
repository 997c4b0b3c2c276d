//! The CNI plugin in the cluster in a box with a real etcd (needs root): the real `dataplane`
//! binary exec'd in node namespaces the way a runtime execs it.

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use dataplane_tests::{
    Cluster, Node,
    cni::{
        Call, CniOutput, PluginDir, Sandbox, cni, dataplane_conf, exec_list, exec_plugin, result_ip,
    },
    netns::output,
    require_root,
};
use serde_json::json;

fn etcd(cluster: &Cluster) -> String {
    cluster.etcd.as_ref().unwrap().endpoint()
}

/// Keys under `prefix` in the cluster's etcd, read from inside a node's namespace.
fn etcd_keys(cluster: &Cluster, prefix: &str) -> Vec<String> {
    let etcd = cluster.etcd.as_ref().unwrap();
    let out = output(
        cluster.nodes[0]
            .ns
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &etcd.endpoint(),
                "get",
                "--prefix",
                "--keys-only",
                prefix,
            ]),
    );
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A one-node cluster with etcd, the plugin directory, and the node's config in `version`.
fn one_node(version: &str) -> (Cluster, PluginDir, serde_json::Value) {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let conf = dataplane_conf(version, &etcd(&cluster), &cluster.nodes[0].name);
    (cluster, PluginDir::new(), conf)
}

fn cali_links(node: &Node) -> Vec<String> {
    node.ns
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("cali"))
        .collect()
}

fn handles(cluster: &Cluster) -> Vec<String> {
    etcd_keys(cluster, "/calico/ipam/v2/handle/")
}

#[test]
fn root_pods_get_addresses_from_their_nodes_block_and_reach_each_other() {
    require_root();
    let cluster = Cluster::new(&[1, 1], true);
    let plugins = PluginDir::new();
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let conf1 = dataplane_conf("1.0.0", &etcd(&cluster), &n1.name);
    let a = Sandbox::new(n1, "default", "pod-a");
    let b = Sandbox::new(n1, "default", "pod-b");
    let c = Sandbox::new(n2, "default", "pod-c");
    let ra = cni(n1, &plugins, "ADD", &a, &conf1).ok();
    let rb = cni(n1, &plugins, "ADD", &b, &conf1).ok();
    let rc = cni(
        n2,
        &plugins,
        "ADD",
        &c,
        &dataplane_conf("1.0.0", &etcd(&cluster), &n2.name),
    )
    .ok();
    let (ia, ib, ic) = (result_ip(&ra), result_ip(&rb), result_ip(&rc));

    // The default pool appeared, node-1's two pods share its block, node-2 has another.
    assert_eq!(
        etcd_keys(&cluster, "/calico/resources/v3/projectcalico.org/ippools/").len(),
        1
    );
    let block = |ip: Ipv4Addr| Ipv4Addr::from(u32::from(ip) & !63);
    assert_eq!(block(ia), block(ib));
    assert_ne!(block(ia), block(ic));
    let affinity = |node: &str, ip: Ipv4Addr| {
        format!("/calico/ipam/v2/host/{node}/ipv4/block/{}-26", block(ip))
    };
    let aff = etcd_keys(&cluster, "/calico/ipam/v2/host/");
    assert!(aff.contains(&affinity("node-1", ia)), "{aff:?}");
    assert!(aff.contains(&affinity("node-2", ic)), "{aff:?}");

    // The pod side is as Calico wires it.
    assert!(
        a.ns.ip(&["addr", "show", "eth0"])
            .contains(&format!("{ia}/32"))
    );
    let routes = a.ns.ip(&["route"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        a.ns.ip(&["neigh"]).contains("169.254.1.1"),
        "gateway neighbour"
    );
    // The WorkloadEndpoint records it.
    let key =
        "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node--1-k8s-pod--a-eth0";
    assert!(etcd_keys(&cluster, key).len() == 1, "{key} missing");

    // Kernel routing in the node is enough for two pods on one node.
    a.ns.exec(
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "2", &ib.to_string()],
    );
}

#[test]
fn root_results_take_the_shape_of_the_config_version() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let plugins = PluginDir::new();
    let node = &cluster.nodes[0];
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let sb = Sandbox::new(node, "default", &format!("v-{i}"));
        let conf = dataplane_conf(version, &etcd(&cluster), &node.name);
        let r = cni(node, &plugins, "ADD", &sb, &conf).ok();
        assert_eq!(r["cniVersion"], *version);
        let ip = &r["ips"][0];
        if version.starts_with("0.") {
            assert_eq!(ip["version"], "4", "{version}: {r}");
        } else {
            assert!(ip.get("version").is_none(), "{version}: {r}");
        }
        assert_eq!(ip["interface"], 1, "{r}");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(
            r["interfaces"][1]["sandbox"],
            sb.ns.path().display().to_string()
        );
        cni(node, &plugins, "DEL", &sb, &conf).ok();
    }
    assert!(handles(&cluster).is_empty());
}

#[test]
fn root_del_is_idempotent_also_when_the_netns_is_gone() {
    let (cluster, plugins, conf) = one_node("1.0.0");
    let node = &cluster.nodes[0];
    let sb = Sandbox::new(node, "default", "twice");
    cni(node, &plugins, "ADD", &sb, &conf).ok();
    cni(node, &plugins, "DEL", &sb, &conf).ok();
    cni(node, &plugins, "DEL", &sb, &conf).ok();

    let gone = Sandbox::new(node, "default", "netns-gone");
    cni(node, &plugins, "ADD", &gone, &conf).ok();
    let netns = gone.ns.path().display().to_string();
    drop(gone.ns);
    let orphan = Sandbox {
        ns: dataplane_tests::Netns::new(&dataplane_tests::unique("dp-placeholder")),
        ..gone
    };
    let call = Call {
        netns: Some(&netns),
        ..Call::new("dataplane", "DEL")
    };
    let out = exec_plugin(node, &plugins, &orphan, &conf, call);
    out.ok();
    assert!(handles(&cluster).is_empty(), "{:?}", handles(&cluster));
    assert!(cali_links(node).is_empty(), "{:?}", cali_links(node));
    assert!(
        etcd_keys(
            &cluster,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/"
        )
        .is_empty()
    );
}

#[test]
fn root_check_catches_a_deleted_route() {
    let (cluster, plugins, mut conf) = one_node("1.0.0");
    let node = &cluster.nodes[0];
    let sb = Sandbox::new(node, "default", "checked");
    let result = cni(node, &plugins, "ADD", &sb, &conf).ok();
    conf["prevResult"] = result;
    cni(node, &plugins, "CHECK", &sb, &conf).ok();
    sb.ns.ip(&["route", "del", "default"]);
    let out = cni(node, &plugins, "CHECK", &sb, &conf);
    assert_eq!(out.err_code(), 103, "{out:?}");
    assert!(out.stdout.contains("default route"), "{}", out.stdout);
    cni(node, &plugins, "DEL", &sb, &conf).ok();
}

#[test]
fn root_gc_releases_what_the_runtime_no_longer_knows() {
    let (cluster, plugins, conf) = one_node("1.1.0");
    let node = &cluster.nodes[0];
    let keep = Sandbox::new(node, "default", "keep");
    let stale = Sandbox::new(node, "default", "stale");
    let kept = result_ip(&cni(node, &plugins, "ADD", &keep, &conf).ok());
    cni(node, &plugins, "ADD", &stale, &conf).ok();
    assert_eq!(handles(&cluster).len(), 2);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        json!([{ "containerID": keep.container_id, "ifname": "eth0" }]);
    cni(node, &plugins, "GC", &keep, &gc).ok();
    let left = handles(&cluster);
    assert_eq!(
        left,
        vec![format!(
            "/calico/ipam/v2/handle/k8s-pod-network.{}",
            keep.container_id
        )]
    );
    assert_eq!(cali_links(node).len(), 1);
    assert_eq!(
        etcd_keys(
            &cluster,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/"
        )
        .len(),
        1
    );
    // The kept pod still works.
    assert!(keep.ns.ip(&["addr"]).contains(&kept.to_string()));

    // The older key name is accepted too.
    let mut old = conf.clone();
    old["cni.dev/attachments"] = json!([]);
    cni(node, &plugins, "GC", &keep, &old).ok();
    assert!(handles(&cluster).is_empty());
}

#[test]
fn root_a_failed_endpoint_write_rolls_everything_back() {
    let (cluster, plugins, conf) = one_node("1.0.0");
    let node = &cluster.nodes[0];
    let sb = Sandbox::new(node, "default", "doomed");
    let call = Call {
        extra_env: &[("DATAPLANE_CNI_FAILPOINT", "endpoint-write")],
        ..Call::new("dataplane", "ADD")
    };
    let out = exec_plugin(node, &plugins, &sb, &conf, call);
    assert!(out.err_code() >= 100, "{out:?}");
    assert!(
        handles(&cluster).is_empty(),
        "address leaked: {:?}",
        handles(&cluster)
    );
    assert!(
        cali_links(node).is_empty(),
        "veth leaked: {:?}",
        cali_links(node)
    );
    assert!(!sb.ns.has_link("eth0"));
    assert!(
        etcd_keys(
            &cluster,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/"
        )
        .is_empty()
    );
}

#[test]
fn root_etcd_down_fails_add_fast_with_try_again_and_leaves_nothing() {
    require_root();
    let mut cluster = Cluster::new(&[1], true);
    let plugins = PluginDir::new();
    let conf = dataplane_conf("1.0.0", &etcd(&cluster), &cluster.nodes[0].name);
    cluster
        .etcd
        .as_mut()
        .unwrap()
        .process
        .stop(Duration::from_secs(5));
    let node = &cluster.nodes[0];
    let sb = Sandbox::new(node, "default", "no-etcd");
    let started = std::time::Instant::now();
    let out = cni(node, &plugins, "ADD", &sb, &conf);
    assert_eq!(out.err_code(), 11, "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(cali_links(node).is_empty());
    // STATUS says the plugin is not available.
    let mut status = conf.clone();
    status["cniVersion"] = json!("1.1.0");
    assert_eq!(cni(node, &plugins, "STATUS", &sb, &status).err_code(), 50);
}

#[test]
fn root_other_ipam_types_are_delegated_through_cni_path() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let plugins = PluginDir::new();
    let node = &cluster.nodes[0];
    let data = tempfile::tempdir().unwrap();
    let mut conf = dataplane_conf("1.0.0", &etcd(&cluster), &node.name);
    conf["ipam"] = json!({
        "type": "host-local",
        "subnet": "10.99.0.0/24",
        "dataDir": data.path(),
    });
    let sb = Sandbox::new(node, "default", "hl");
    let ip = result_ip(&cni(node, &plugins, "ADD", &sb, &conf).ok());
    assert_eq!(ip.octets()[..3], [10, 99, 0]);
    assert!(handles(&cluster).is_empty(), "host-local, not our IPAM");
    let allocated = data.path().join("k8s-pod-network").join(ip.to_string());
    assert!(allocated.exists(), "host-local recorded {ip}");
    cni(node, &plugins, "DEL", &sb, &conf).ok();
    assert!(!allocated.exists(), "host-local released {ip}");
    assert!(cali_links(node).is_empty());
}

#[test]
fn root_a_chained_conflist_with_portmap_works() {
    let (cluster, plugins, mut ours) = one_node("1.0.0");
    let node = &cluster.nodes[0];
    ours.as_object_mut().unwrap().remove("cniVersion");
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [ours, { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }],
    });
    let rc =
        json!({ "portMappings": [{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }] });
    let sb = Sandbox::new(node, "default", "mapped");
    let out: CniOutput = exec_list(node, &plugins, "ADD", &sb, &list, &rc);
    let r = out.ok();
    let ip = result_ip(&r);
    let rules = node.ns.exec("iptables-save", &["-t", "nat"]);
    assert!(
        rules.contains("18080") && rules.contains(&ip.to_string()),
        "{rules}"
    );
    exec_list(node, &plugins, "DEL", &sb, &list, &rc).ok();
    let rules = node.ns.exec("iptables-save", &["-t", "nat"]);
    assert!(!rules.contains("18080"), "{rules}");
    assert!(handles(&cluster).is_empty());
}

#[test]
fn root_200_concurrent_adds_across_3_nodes_then_200_dels_leave_nothing() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    let plugins = PluginDir::new();
    let endpoint = etcd(&cluster);
    const PODS: usize = 200;
    const PARALLEL: usize = 20;
    let sandboxes: Vec<(usize, Sandbox)> = (0..PODS)
        .map(|i| {
            let n = i % 3;
            (
                n,
                Sandbox::new(&cluster.nodes[n], "load", &format!("p-{i}")),
            )
        })
        .collect();
    let run_all = |command: &str| -> Vec<CniOutput> {
        let mut outs = Vec::new();
        for chunk in sandboxes.chunks(PARALLEL) {
            let chunk_outs: Vec<CniOutput> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(n, sb)| {
                        let node = &cluster.nodes[*n];
                        let conf = dataplane_conf("1.0.0", &endpoint, &node.name);
                        let plugins = &plugins;
                        s.spawn(move || cni(node, plugins, command, sb, &conf))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            outs.extend(chunk_outs);
        }
        outs
    };
    let adds = run_all("ADD");
    let ips: Vec<Ipv4Addr> = adds.iter().map(|o| result_ip(&o.ok())).collect();
    let distinct: HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), PODS, "duplicate addresses handed out");
    for o in run_all("DEL") {
        o.ok();
    }
    assert!(handles(&cluster).is_empty(), "{:?}", handles(&cluster));
    for node in &cluster.nodes {
        assert!(
            cali_links(node).is_empty(),
            "{}: {:?}",
            node.name,
            cali_links(node)
        );
    }
    assert!(
        etcd_keys(
            &cluster,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/"
        )
        .is_empty()
    );
    let blocks: Vec<String> = etcd_keys(&cluster, "/calico/ipam/v2/assignment/");
    assert!(blocks.is_empty(), "empty blocks are released: {blocks:?}");
}

/// Writes `/dataplane/v1/status/<node>` as an agent would (live now, at `revision`).
fn fake_agent_status(cluster: &Cluster, revision: i64) {
    let etcd = cluster.etcd.as_ref().unwrap();
    let node = &cluster.nodes[0];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let value = json!({"node": node.name, "revision": revision, "updatedAtMs": now_ms}).to_string();
    let out = output(node.ns.command("etcdctl").env("ETCDCTL_API", "3").args([
        "--endpoints",
        &etcd.endpoint(),
        "put",
        &format!("/dataplane/v1/status/{}", node.name),
        &value,
    ]));
    assert!(out.status.success());
}

#[test]
fn root_add_waits_for_the_agent_and_gives_up_cleanly_when_it_lags() {
    let (cluster, plugins, mut conf) = one_node("1.0.0");
    let node = &cluster.nodes[0];
    conf["policy_wait_ms"] = json!(400);
    // A live agent stuck at revision 1: it will never have programmed the new endpoint.
    fake_agent_status(&cluster, 1);
    let sb = Sandbox::new(node, "default", "waits");
    let started = std::time::Instant::now();
    let out = cni(node, &plugins, "ADD", &sb, &conf);
    assert_eq!(out.err_code(), 11, "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(out.json()["details"].as_str().unwrap().contains("revision"));
    assert!(handles(&cluster).is_empty(), "address leaked");
    assert!(cali_links(node).is_empty(), "veth leaked");
    assert!(
        etcd_keys(
            &cluster,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/"
        )
        .is_empty(),
        "endpoint leaked"
    );
    // The agent catches up (far ahead): the next ADD succeeds at once.
    fake_agent_status(&cluster, i64::MAX / 2);
    let out = cni(node, &plugins, "ADD", &sb, &conf);
    result_ip(&out.ok());
}

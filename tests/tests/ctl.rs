//! `dataplane ctl` against a real etcd in the cluster in a box (needs root).

use std::time::{Duration, Instant};

use dataplane::datastore::{Datastore, EtcdConfig, keys, runtime, status::now_ms};
use dataplane_tests::{
    Cluster,
    cni::{PluginDir, Sandbox, cni, dataplane_conf},
    dataplane, require_root,
};
use serde_json::{Value, json};

fn ctl(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let endpoint = cluster.etcd.as_ref().unwrap().endpoint();
    let mut all = vec!["ctl", "--etcd-endpoints", endpoint.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = dataplane(&cluster.nodes[0].ns, &all);
    (status.success(), out, err)
}

/// Runs `f` with a datastore connected from node 0's namespace (etcd is reachable only from
/// inside the cluster).
fn with_ds<R: Send>(cluster: &Cluster, f: impl AsyncFnOnce(&Datastore) -> R + Send) -> R {
    let cfg = EtcdConfig {
        endpoints: vec![cluster.etcd.as_ref().unwrap().endpoint()],
        ..EtcdConfig::default()
    };
    cluster.nodes[0].ns.run(move || {
        runtime().unwrap().block_on(async {
            let ds = Datastore::connect(&cfg).await.unwrap();
            f(&ds).await
        })
    })
}

/// The JSON at `key` and its mod revision.
fn read(cluster: &Cluster, key: &str) -> Option<(Value, i64)> {
    with_ds(cluster, async |ds| {
        ds.get::<Value>(key)
            .await
            .unwrap()
            .map(|v| (v.value, v.mod_revision))
    })
}

fn all_keys(cluster: &Cluster) -> Vec<String> {
    with_ds(cluster, async |ds| {
        let mut keys = ds.list_keys("/calico/").await.unwrap();
        keys.extend(ds.list_keys("/dataplane/").await.unwrap());
        keys
    })
}

/// Writes a node status as an agent would: `{"node", "revision", "updatedAtMs"}`.
fn put_status(cluster: &Cluster, node: &str, revision: i64, updated_at_ms: u64) {
    let value = json!({"node": node, "revision": revision, "updatedAtMs": updated_at_ms});
    with_ds(cluster, async |ds| {
        ds.put_raw(&keys::node_status(node), value.to_string())
            .await
            .unwrap()
    });
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn root_apply_get_delete_pools_and_nodes() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "r.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool-a\nspec:\n  cidr: 10.70.0.0/16\n  ipipMode: CrossSubnet\n  natOutgoing: true\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: node-1\nspec:\n  bgp:\n    ipv4Address: 192.168.1.10/24\n---\napiVersion: v1\nkind: ipPool\nmetadata:\n  cidr: 10.80.0.0/16\nspec:\n  ipip:\n    enabled: true\n    mode: always\n  nat-outgoing: true\n",
    );
    let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "IPPool pool-a created",
            "Node node-1 created",
            "IPPool ippool-10-80-0-0-16 created"
        ]
    );
    // Applying again changes nothing.
    let (ok, out, _) = ctl(&cluster, &["apply", "-f", &file]);
    assert!(ok && out.lines().all(|l| l.ends_with("unchanged")), "{out}");

    let (ok, out, err) = ctl(&cluster, &["get", "ippool", "pool-a", "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["cidr"], "10.70.0.0/16");
    assert_eq!(v["spec"]["ipipMode"], "CrossSubnet");
    assert_eq!(v["spec"]["blockSize"], 26);
    let (ok, out, _) = ctl(&cluster, &["get", "ippools"]);
    assert!(
        ok && out.contains("pool-a") && out.contains("ippool-10-80-0-0-16"),
        "{out}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "node", "node-1"]);
    assert!(ok && out.contains("192.168.1.10/24"), "{out}");

    let (ok, out, _) = ctl(&cluster, &["delete", "ippool", "pool-a"]);
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, _, err) = ctl(&cluster, &["get", "ippool", "pool-a"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = ctl(&cluster, &["delete", "ippool", "pool-a"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = ctl(&cluster, &["get", "widgets"]);
    assert!(!ok && err.contains("unknown kind"), "{err}");
}

#[test]
fn root_a_bad_document_writes_nothing() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "bad.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: good}\nspec: {cidr: 10.70.0.0/16}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bad}\nspec: {cidr: 10.71.0.0/16, blockSize: 99}\n",
    );
    let (ok, _, err) = ctl(&cluster, &["apply", "-f", &file]);
    assert!(!ok, "should fail");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains("document 2") && last.contains("blockSize"),
        "{err}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "ippools", "-o", "json"]);
    assert!(ok);
    assert!(!out.contains("good"), "nothing may be written: {out}");
}

#[test]
fn root_ipam_show_lists_blocks_and_use() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let plugins = PluginDir::new();
    let node = &cluster.nodes[0];
    let conf = dataplane_conf(
        "1.0.0",
        &cluster.etcd.as_ref().unwrap().endpoint(),
        &node.name,
    );
    let sandboxes: Vec<_> = (0..3)
        .map(|i| Sandbox::new(node, "default", &format!("s{i}")))
        .collect();
    for sb in &sandboxes {
        cni(node, &plugins, "ADD", sb, &conf).ok();
    }
    let (ok, out, err) = ctl(&cluster, &["ipam", "show"]);
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.contains("host:node-1"))
        .unwrap_or_else(|| panic!("no block of node-1: {out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols[0].ends_with("/26"), "{row}");
    assert_eq!(cols[2], "3", "used: {row}");
    assert_eq!(cols[3], "61", "free: {row}");
    for sb in &sandboxes {
        cni(node, &plugins, "DEL", sb, &conf).ok();
    }
}

const MIXED: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels: {team: a}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: prod
  labels: {app: web}
spec:
  nodeName: node-1
  containers:
  - name: web
    image: nginx
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 9090, protocol: UDP}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-web
  namespace: prod
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: a}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - port: http
    - {port: 9000, endPort: 9100}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    source: {selector: role == 'api'}
    destination: {ports: [5432]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: deny-egress
spec:
  selector: all()
  types: [Egress]
";

#[test]
fn root_apply_get_delete_policies_namespaces_pods() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "mixed.yaml", MIXED);
    let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "Namespace prod created",
            "Pod prod/web-0 created",
            "NetworkPolicy prod/knp.default.allow-web created",
            "NetworkPolicy default/db created",
            "GlobalNetworkPolicy deny-egress created",
        ]
    );

    let (profile, _) = read(&cluster, &keys::profile("kns.prod")).unwrap();
    assert_eq!(
        profile,
        json!({
            "kind": "Profile", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "kns.prod"},
            "spec": {
                "labelsToApply": {"team": "a", "kubernetes.io/metadata.name": "prod"},
                "ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]
            }
        })
    );
    let (pod, _) = read(&cluster, "/calico/k8s/pods/prod/web-0").unwrap();
    assert_eq!(
        pod,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "prod", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "ports": [
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"containerPort": 9090, "protocol": "UDP"}
            ]}]}
        })
    );
    let k8s = "projectcalico.org/orchestrator == 'k8s'";
    let (knp, _) = read(
        &cluster,
        "/calico/resources/v3/projectcalico.org/networkpolicies/prod/knp.default.allow-web",
    )
    .unwrap();
    assert_eq!(
        knp,
        json!({
            "kind": "NetworkPolicy", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "knp.default.allow-web", "namespace": "prod"},
            "spec": {
                "order": 1000.0,
                "selector": format!("{k8s} && app == 'web'"),
                "types": ["Ingress"],
                "ingress": [
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"selector": k8s, "namespaceSelector": "team == 'a'"},
                     "destination": {"ports": ["http", "9000:9100"]}},
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16"]},
                     "destination": {"ports": ["http", "9000:9100"]}}
                ]
            }
        })
    );
    let (np, _) = read(
        &cluster,
        "/calico/resources/v3/projectcalico.org/networkpolicies/default/db",
    )
    .unwrap();
    assert_eq!(
        np,
        json!({
            "kind": "NetworkPolicy", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {
                "selector": "role == 'db'",
                "ingress": [{"action": "Allow", "protocol": "TCP",
                             "source": {"selector": "role == 'api'"},
                             "destination": {"ports": [5432]}}]
            }
        })
    );
    let (gnp, _) = read(
        &cluster,
        "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny-egress",
    )
    .unwrap();
    assert_eq!(
        gnp,
        json!({
            "kind": "GlobalNetworkPolicy", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "deny-egress"},
            "spec": {"selector": "all()", "types": ["Egress"]}
        })
    );

    // Applying again changes nothing.
    let (ok, out, _) = ctl(&cluster, &["apply", "-f", &file]);
    assert!(
        ok && out.lines().all(|l| l.ends_with(" unchanged")),
        "{out}"
    );

    // get: by the plain Kubernetes name or the stored one, per namespace or all.
    for name in ["allow-web", "knp.default.allow-web"] {
        let (ok, out, err) = ctl(
            &cluster,
            &["get", "netpol", name, "-n", "prod", "-o", "json"],
        );
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, knp);
    }
    let (ok, _, err) = ctl(&cluster, &["get", "networkpolicy", "allow-web"]);
    assert!(
        !ok && err.contains("NetworkPolicy default/allow-web not found"),
        "{err}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "networkpolicies", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v["metadata"]["name"] == "db", "{out}");
    let (ok, out, _) = ctl(&cluster, &["get", "np", "-A", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v.as_array().map(Vec::len) == Some(2), "{out}");
    let (ok, out, _) = ctl(&cluster, &["get", "pods", "-n", "prod", "-o", "json"]);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap() == pod,
        "{out}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "pod", "web-0", "-n", "prod"]);
    assert!(ok && out.contains("containerPort: 8080"), "{out}");
    let (ok, out, _) = ctl(&cluster, &["get", "ns", "prod", "-o", "json"]);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap() == profile,
        "{out}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "profile", "kns.prod", "-o", "json"]);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap() == profile,
        "{out}"
    );
    let (ok, out, _) = ctl(&cluster, &["get", "gnp", "-o", "json"]);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap() == gnp,
        "{out}"
    );

    // delete, and a second delete finds nothing.
    for (args, want) in [
        (
            &["netpol", "allow-web", "-n", "prod"][..],
            "NetworkPolicy prod/knp.default.allow-web deleted",
        ),
        (&["np", "db"][..], "NetworkPolicy default/db deleted"),
        (
            &["gnp", "deny-egress"][..],
            "GlobalNetworkPolicy deny-egress deleted",
        ),
        (
            &["pod", "web-0", "-n", "prod"][..],
            "Pod prod/web-0 deleted",
        ),
        (&["namespace", "prod"][..], "Namespace prod deleted"),
    ] {
        let mut all = vec!["delete"];
        all.extend_from_slice(args);
        let (ok, out, err) = ctl(&cluster, &all);
        assert!(ok && out.trim() == want, "{args:?}: {out}{err}");
        let (ok, _, err) = ctl(&cluster, &all);
        assert!(!ok && err.contains("not found"), "{args:?}: {err}");
    }
    assert!(all_keys(&cluster).is_empty(), "{:?}", all_keys(&cluster));
}

#[test]
fn root_a_bad_policy_document_writes_nothing() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let dir = tempfile::tempdir().unwrap();
    let before = all_keys(&cluster);
    for (bad, want) in [
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec:\n  ingress: [{ports: [{port: 70000}]}]\n",
            "NetworkPolicy prod/x: spec.ingress[0].ports[0].port 70000 is outside 1..=65535",
        ),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/99}}]}]\n",
            "spec.egress[0].to[0].ipBlock.cidr \"10.0.0.0/99\" is not a CIDR",
        ),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  ingress: [{ports: [{protocol: ICMP}]}]\n",
            "spec.ingress[0].ports[0].protocol \"ICMP\" must be TCP, UDP or SCTP",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec:\n  ingress: [{action: Allow, protocol: TCPX}]\n",
            "GlobalNetworkPolicy g: spec.ingress[0].protocol: unknown protocol \"TCPX\"",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  egress: [{action: Allow, destination: {nets: [300.0.0.0/8]}}]\n",
            "NetworkPolicy default/n: spec.egress[0].destination.nets[0]: \"300.0.0.0/8\" is not a CIDR",
        ),
    ] {
        let text = format!("{}---\n{bad}", MIXED);
        let file = write(&dir, "bad.yaml", &text);
        let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file]);
        assert!(!ok, "should fail: {out}");
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains("document 6") && last.contains(want),
            "{err}"
        );
        assert_eq!(all_keys(&cluster), before, "nothing may be written");
    }
}

#[test]
fn root_apply_wait_for_live_nodes() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "mixed.yaml", MIXED);
    let gnp_key = "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny-egress";

    // No node reports a status: nothing to wait for.
    let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file, "--wait"]);
    assert!(ok, "{err}");
    assert!(out.contains("no live nodes"), "{out}");
    // The highest revision written is the last document's.
    let (_, rev) = read(&cluster, gnp_key).unwrap();

    // A live node at exactly that revision: in force at once (the file is unchanged now, and
    // the revisions of unchanged resources count).
    put_status(&cluster, "node-a", rev, now_ms());
    let t = Instant::now();
    let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file, "--wait"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("in force on 1 node (")),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // A stale node far behind is not waited for.
    put_status(&cluster, "node-stale", 1, now_ms() - 60_000);
    let (ok, out, err) = ctl(&cluster, &["apply", "-f", &file, "--wait"]);
    assert!(ok && out.contains("in force on 1 node"), "{out}{err}");

    // A live node one revision behind: times out, naming it (and only it).
    put_status(&cluster, "node-b", rev - 1, now_ms());
    let t = Instant::now();
    let (ok, out, err) = ctl(
        &cluster,
        &["apply", "-f", &file, "--wait", "--wait-timeout", "1"],
    );
    let took = t.elapsed();
    assert!(!ok, "should time out: {out}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("not in force after 1s")
            && last.contains(&format!("node-b at revision {}", rev - 1))
            && last.contains(&format!("need revision {rev}"))
            && !last.contains("node-a")
            && !last.contains("node-stale"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // node-b catches up while ctl waits: in force once it reports.
    let (ok, out, err) = std::thread::scope(|s| {
        let waiter = s.spawn(|| ctl(&cluster, &["apply", "-f", &file, "--wait"]));
        std::thread::sleep(Duration::from_millis(500));
        put_status(&cluster, "node-b", rev + 100, now_ms());
        waiter.join().unwrap()
    });
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("in force on 2 nodes ("))
        .unwrap_or_else(|| panic!("{out}"));
    let ms: u64 = line
        .trim_start_matches("in force on 2 nodes (")
        .trim_end_matches(" ms)")
        .parse()
        .unwrap();
    assert!((300..10_000).contains(&ms), "{line}");
}

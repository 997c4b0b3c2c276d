//! `dataplane ctl` against a real etcd in the cluster in a box (needs root).

use dataplane_tests::{
    Cluster,
    cni::{PluginDir, Sandbox, cni, dataplane_conf},
    dataplane, require_root,
};

fn ctl(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let endpoint = cluster.etcd.as_ref().unwrap().endpoint();
    let mut all = vec!["ctl", "--etcd-endpoints", endpoint.as_str()];
    all.extend_from_slice(args);
    let (status, out, err) = dataplane(&cluster.nodes[0].ns, &all);
    (status.success(), out, err)
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

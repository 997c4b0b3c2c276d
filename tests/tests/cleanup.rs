//! `dataplane cleanup` on a node of a live cluster in a box (needs root): refused while the
//! agent runs; with the agent stopped it removes every link (no program of ours stays on any
//! interface), map and the pin directory, or in the iptables mode the cali- chains, jumps,
//! ipsets and protocol-80 routes (refused too while an iptables-mode agent runs: it holds a
//! lock file); pods' traffic is then the kernel's (routed, no policy);
//! a second run finds nothing.

use std::time::Duration;

use dataplane_tests::{
    cluster::{agent_routes, cali_rules, cali_sets},
    dataplane, require_root, tcx_programs,
    traffic::{Deployment, Servers, tcp_probe},
};

/// Denies every connection to pod 1 (on node-1, like pod 0).
/// Two CIDRs rather than one: the iptables mode renders a single CIDR as a plain `-s` match
/// and several as an ipset, which the cleanup must remove.
const DENY_POD_1: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: shut}
spec:
  selector: role == 'shut'
  types: [Ingress]
  ingress:
  - {action: Deny, source: {nets: [10.65.0.0/17, 10.65.128.0/17]}}
";

fn label_pod_1(d: &Deployment) {
    d.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: shut}}}}\nspec: {{containers: [{{name: c}}]}}\n",
        d.pods[1].sb.pod
    ));
}

/// The lock an iptables-mode agent holds in `node`'s namespace.
fn lock_file(node: &dataplane_tests::cluster::Node) -> String {
    let ino = node.ns.run(|| {
        use std::os::unix::fs::MetadataExt as _;
        // This thread's namespace (`run` switches only the thread).
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    });
    format!("/var/run/dataplane/iptables-agent-netns-{ino}.lock")
}

fn cleanup(d: &Deployment, i: usize) -> (bool, String, String) {
    let dir = d.pins[i].path.display().to_string();
    let (st, out, err) = dataplane(&d.cluster.nodes[i].ns, &["cleanup", "--bpffs-dir", &dir]);
    (st.success(), out, err)
}

#[test]
fn root_cleanup_removes_programs_maps_and_pins_and_pods_fall_back_to_the_kernel() {
    require_root();
    let mut d = Deployment::start("CrossSubnet", 2);
    let _servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    label_pod_1(&d);
    d.apply(DENY_POD_1);
    let (a, b) = (&d.pods[0], &d.pods[1]);
    let tcp = |from: &dataplane_tests::traffic::Pod, to: &dataplane_tests::traffic::Pod| {
        tcp_probe(from, to.ip, Duration::from_millis(500))
    };
    assert!(!tcp(a, b), "the policy is in force");
    assert!(tcp(b, a));
    let node = &d.cluster.nodes[0];
    let mut ifaces = d.veths(0);
    ifaces.push("eth0".to_owned());

    // A running agent's directory is refused, and nothing changes.
    let (ok, out, err) = cleanup(&d, 0);
    assert!(!ok, "{out}");
    assert!(
        err.trim().starts_with("error: pin directory") && err.contains("stop it first"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(d.pins[0].path.join("maps").exists());

    // Stopped, the agent leaves the programs attached; cleanup takes them off.
    let status = d.agents[0].process.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()));
    for iface in &ifaces {
        let (ingress, egress) = tcx_programs(&node.ns, iface);
        assert_eq!((ingress.len(), egress.len()), (1, 1), "{iface}");
    }
    assert!(!tcp(a, b), "the policy stays in force without the agent");
    let (ok, out, err) = cleanup(&d, 0);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "removed {} TCX links on {} interfaces",
            2 * ifaces.len(),
            ifaces.len()
        )) && out.contains(&format!("{} maps", dataplane::attach::PINNED_MAPS.len())),
        "{out}"
    );
    for iface in &ifaces {
        assert_eq!(
            tcx_programs(&node.ns, iface),
            (vec![], vec![]),
            "{iface} still has programs"
        );
    }
    assert!(
        node.ns
            .run(dataplane::cleanup::attached_programs_of_ours)
            .is_empty()
    );
    assert!(!d.pins[0].path.exists(), "the pin directory is gone");
    // The kernel routes pod traffic now, and enforces no policy.
    assert!(
        tcp(a, b),
        "pods on node-1 reach each other through kernel routing"
    );
    // The other nodes are untouched.
    assert!(d.pins[1].path.join("maps").exists());
    assert_eq!(tcx_programs(&d.cluster.nodes[1].ns, "eth0").0.len(), 1);

    let (ok, out, err) = cleanup(&d, 0);
    assert!(ok, "{err}");
    assert!(out.contains("nothing of ours"), "{out}");
}

#[test]
fn root_cleanup_removes_iptables_chains_sets_and_routes() {
    require_root();
    let mut d = Deployment::start_with_dataplane("iptables", "Never", 2);
    let _servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    label_pod_1(&d);
    d.apply(DENY_POD_1);
    let (a, b) = (&d.pods[0], &d.pods[1]);
    assert!(!tcp_probe(a, b.ip, Duration::from_millis(500)));
    let node = &d.cluster.nodes[0];
    assert!(!cali_rules(&node.ns, "nft").is_empty());
    assert!(!cali_sets(&node.ns).is_empty());
    assert!(!agent_routes(&node.ns).is_empty());
    let routes_before = node.ns.ip(&["route", "show"]);

    // While the agent runs, cleanup refuses and touches nothing (it holds a lock file).
    let pid = d.agents[0].process.pid();
    let (ok, out, err) = cleanup(&d, 0);
    assert!(
        !ok,
        "cleanup went ahead under a running iptables agent: {out}"
    );
    assert_eq!(
        err.trim(),
        format!(
            "error: an iptables-mode agent is running in this network namespace ({}, held by pid {pid}): stop it first",
            lock_file(node)
        )
    );
    assert!(!cali_rules(&node.ns, "nft").is_empty() && !cali_sets(&node.ns).is_empty());
    assert!(
        !tcp_probe(a, b.ip, Duration::from_millis(500)),
        "policy still in force"
    );
    // A second iptables agent in the namespace is refused the same way.
    let (ok, _, err) = dataplane(
        &node.ns,
        &[
            "agent",
            "--node",
            &node.name,
            "--dataplane",
            "iptables",
            "--etcd-endpoints",
            &d.cluster.etcd.as_ref().unwrap().endpoint(),
            "--health-listen",
            "off",
            "--metrics-listen",
            "off",
            "--cni-metrics-socket",
            "off",
        ],
    );
    assert!(!ok.success());
    assert!(err.contains(&format!("held by pid {pid}")), "{err}");

    let status = d.agents[0].process.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()));
    let (ok, out, err) = cleanup(&d, 0);
    assert!(ok, "{err}");
    assert!(
        out.contains("cali- chains") && out.contains("ipsets") && out.contains("protocol 80"),
        "{out}"
    );
    assert!(
        cali_rules(&node.ns, "nft").is_empty(),
        "{:?}",
        cali_rules(&node.ns, "nft")
    );
    assert!(cali_rules(&node.ns, "legacy").is_empty());
    assert!(cali_sets(&node.ns).is_empty());
    assert!(agent_routes(&node.ns).is_empty());
    // The CNI plugin's pod routes stay.
    let pod_routes = |r: &str| r.lines().filter(|l| l.contains("cali")).count();
    assert_eq!(
        pod_routes(&node.ns.ip(&["route", "show"])),
        pod_routes(&routes_before)
    );
    assert!(
        tcp_probe(a, b.ip, Duration::from_millis(500)),
        "no policy any more"
    );

    let (ok, out, err) = cleanup(&d, 0);
    assert!(ok, "{err}");
    assert!(out.contains("nothing of ours"), "{out}");
}

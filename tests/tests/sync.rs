//! The agent keeps the routes and endpoints maps equal to etcd (needs root): agents on three
//! nodes (two on one subnet, one behind the router), pods added through the CNI plugin, a pool
//! mode change and a pod removal seen in every node's maps.

use std::time::{Duration, Instant};

use dataplane::dump::{EndpointRow, RouteRow};
use dataplane_tests::{
    Agent, Cluster, Node, PinDirGuard,
    cni::{PluginDir, Sandbox, cni, dataplane_conf},
    dataplane, require_root, wait_attached,
};
use serde_json::Value;

fn routes(node: &Node, pins: &PinDirGuard) -> Vec<RouteRow> {
    let dir = pins.path.display().to_string();
    let (status, out, err) = dataplane(
        &node.ns,
        &["map-dump", "routes", "--json", "--bpffs-dir", &dir],
    );
    assert!(status.success(), "{err}");
    serde_json::from_str(&out).unwrap()
}

fn endpoints(node: &Node, pins: &PinDirGuard) -> Vec<EndpointRow> {
    let dir = pins.path.display().to_string();
    let (status, out, err) = dataplane(
        &node.ns,
        &["map-dump", "endpoints", "--json", "--bpffs-dir", &dir],
    );
    assert!(status.success(), "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until `check` holds for node's routes, or panics with them and the agent's log.
fn wait_routes(
    node: &Node,
    pins: &PinDirGuard,
    agent: &Agent,
    what: &str,
    check: impl Fn(&[RouteRow]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = routes(node, pins);
        if check(&r) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{}: {what} never held; routes: {r:#?}\n{}",
                node.name,
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn block_of(ip: &str) -> String {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    format!("{}/26", std::net::Ipv4Addr::from(u32::from(ip) & !63))
}

fn find<'a>(rows: &'a [RouteRow], cidr: &str) -> Option<&'a RouteRow> {
    rows.iter().find(|r| r.cidr == cidr)
}

#[test]
fn root_agents_sync_routes_and_endpoints_from_etcd() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 2], true);
    let etcd = cluster.etcd.as_ref().unwrap();
    let plugins = PluginDir::new();
    let pins: Vec<PinDirGuard> = cluster.nodes.iter().map(|_| PinDirGuard::new()).collect();
    let mut agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .zip(&pins)
        .map(|(n, p)| Agent::start(n, p, Some(etcd), &[]))
        .collect();
    for (n, a) in cluster.nodes.iter().zip(agents.iter_mut()) {
        wait_attached(&n.ns, "eth0", a, Duration::from_secs(20));
    }

    // One pod per node.
    let mut pods = Vec::new();
    for node in &cluster.nodes {
        let sb = Sandbox::new(node, "default", &format!("pod-{}", node.name));
        let conf = dataplane_conf("1.0.0", &etcd.endpoint(), &node.name);
        let r = cni(node, &plugins, "ADD", &sb, &conf).ok();
        let ip = dataplane_tests::cni::result_ip(&r).to_string();
        let host_iface = r["interfaces"][0]["name"].as_str().unwrap().to_owned();
        pods.push((sb, ip, host_iface, conf));
    }
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);

    // node-1: its own pod is a local workload on its veth; the others' blocks are remote,
    // via their node, in IP-in-IP (the default pool is Always).
    let own = format!("{}/32", pods[0].1);
    wait_routes(n1, &pins[0], &agents[0], "all routes", |r| {
        find(r, &own).is_some()
            && find(r, &block_of(&pods[1].1)).is_some()
            && find(r, &block_of(&pods[2].1)).is_some()
    });
    let r = routes(n1, &pins[0]);
    let local = find(&r, &own).unwrap();
    assert_eq!(local.kind, "local workload");
    assert_eq!(local.iface.as_deref(), Some(pods[0].2.as_str()));
    let to2 = find(&r, &block_of(&pods[1].1)).unwrap();
    assert_eq!(
        (to2.kind.as_str(), to2.via.as_deref()),
        ("remote block", Some("192.168.1.11"))
    );
    assert!(
        to2.flags.contains(&"ipip".to_owned()) && to2.flags.contains(&"same-subnet".to_owned()),
        "{to2:?}"
    );
    let to3 = find(&r, &block_of(&pods[2].1)).unwrap();
    assert_eq!(to3.via.as_deref(), Some("192.168.2.10"));
    assert!(
        to3.flags.contains(&"ipip".to_owned()) && !to3.flags.contains(&"same-subnet".to_owned()),
        "{to3:?}"
    );
    assert!(find(&r, "192.168.1.11/32").is_some_and(|h| h.kind == "remote host"));
    assert!(find(&r, "10.65.0.0/16").is_some_and(|p| p.kind == "pool"));
    let eps = endpoints(n1, &pins[0]);
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].ip, pods[0].1);
    assert_eq!(eps[0].iface.as_deref(), Some(pods[0].2.as_str()));

    // Pool → CrossSubnet: node-1 stops encapsulating toward node-2, keeps it toward node-3.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    std::fs::write(
        &file,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\nspec: {cidr: 10.65.0.0/16, ipipMode: CrossSubnet, natOutgoing: true}\n",
    )
    .unwrap();
    let (status, _, err) = dataplane(
        &n1.ns,
        &[
            "ctl",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "apply",
            "-f",
            &file.display().to_string(),
        ],
    );
    assert!(status.success(), "{err}");
    for (i, node) in [(0, n1), (2, n3)] {
        let other = if i == 0 { 1 } else { 0 };
        let target = block_of(&pods[other].1);
        let cross = i == 2;
        wait_routes(node, &pins[i], &agents[i], "CrossSubnet flags", |r| {
            find(r, &target).is_some_and(|b| b.flags.contains(&"ipip".to_owned()) == cross)
        });
    }

    // Removing node-2's only pod releases its block: the route goes on every other node.
    let (sb, _, _, conf) = &pods[1];
    cni(n2, &plugins, "DEL", sb, conf).ok();
    let gone = block_of(&pods[1].1);
    for i in [0, 2] {
        wait_routes(
            &cluster.nodes[i],
            &pins[i],
            &agents[i],
            "block removed",
            |r| find(r, &gone).is_none(),
        );
    }
    // node-2's own endpoint left its endpoints map.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !endpoints(n2, &pins[1]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "endpoint of the deleted pod stays in node-2's map"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for a in &mut agents {
        assert!(
            a.process.exited().is_none(),
            "an agent died:\n{}",
            a.log_text()
        );
    }
    let nodes_json: Value = {
        let (_, out, _) = dataplane(
            &n1.ns,
            &[
                "ctl",
                "--etcd-endpoints",
                &etcd.endpoint(),
                "get",
                "nodes",
                "-o",
                "json",
            ],
        );
        serde_json::from_str(&out).unwrap()
    };
    assert_eq!(
        nodes_json.as_array().map(Vec::len),
        Some(3),
        "agents registered their Nodes: {nodes_json}"
    );
}

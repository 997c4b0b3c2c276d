//! The iptables dataplane (`agent --dataplane iptables`) on the cluster in a box (needs root):
//! native routing (ipipMode Never) same node, across nodes of one subnet and across subnets;
//! the node's rules and ipsets, idempotent across an agent restart and cleaned when pods go;
//! an IP-in-IP pool refused with an error naming the missing module. The NetworkPolicy truth
//! tables in this mode are in `tests/netpol.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use dataplane_tests::{
    Agent,
    cluster::{agent_routes, cali_rules, cali_sets},
    cni::{cni, dataplane_conf},
    dataplane_args, require_root,
    traffic::{Deployment, Servers, ping, tcp_echo, tcp_probe, udp_echo},
    wait_ready,
};

/// Every pod reaches every other pod over TCP, UDP and ICMP; every node reaches every pod.
fn all_pairs(d: &Deployment) -> Vec<String> {
    let (cluster, pods) = (&d.cluster, &d.pods);
    let mut failures = Vec::new();
    for a in pods {
        for b in pods {
            if std::ptr::eq(a, b) {
                continue;
            }
            let what = format!(
                "{} ({}) → {} ({})",
                a.ip, cluster.nodes[a.node].name, b.ip, cluster.nodes[b.node].name
            );
            if !tcp_echo(a, b.ip) {
                failures.push(format!("TCP {what}"));
            }
            if !udp_echo(a, b.ip) {
                failures.push(format!("UDP {what}"));
            }
            if !ping(&a.sb.ns, b.ip) {
                failures.push(format!("ICMP {what}"));
            }
        }
    }
    for node in &cluster.nodes {
        for b in pods {
            if !ping(&node.ns, b.ip) {
                failures.push(format!("ICMP {} → {}", node.name, b.ip));
            }
        }
    }
    failures
}

#[test]
fn root_iptables_native_routing_same_node_and_across_nodes_and_subnets() {
    require_root();
    let d = Deployment::start_with_dataplane("iptables", "Never", 2);
    let servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    let failures = all_pairs(&d);
    drop(servers);
    let logs = || {
        d.agents
            .iter()
            .map(|a| a.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(failures.is_empty(), "{failures:#?}\n{}", logs());
    for (node, a) in d.cluster.nodes.iter().zip(&d.agents) {
        let log = a.log_text();
        assert!(
            log.contains("iptables-nft-restore") && log.contains("agent ready"),
            "{}: the startup log names the backend:\n{log}",
            node.name
        );
        assert!(
            !log.contains("BPF"),
            "{}: no programs in this mode",
            node.name
        );
    }
    // The agent's routes: node-1 reaches node-2's block via node-2 and the other way round;
    // node-3 (other subnet) leaves everything to the router.
    let block = |i: usize| {
        let ip = d.pods.iter().find(|p| p.node == i).unwrap().ip;
        format!("{}/26", std::net::Ipv4Addr::from(u32::from(ip) & !63))
    };
    let n = &d.cluster.nodes;
    assert_eq!(
        agent_routes(&n[0].ns),
        BTreeSet::from([(block(1), n[1].ip.to_string())])
    );
    assert_eq!(
        agent_routes(&n[1].ns),
        BTreeSet::from([(block(0), n[0].ip.to_string())])
    );
    assert!(agent_routes(&n[2].ns).is_empty());
}

/// The rules of ours and the ipsets of node `i`, as one comparable value.
fn filter_of(
    d: &Deployment,
    i: usize,
    backend: &str,
) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let ns = &d.cluster.nodes[i].ns;
    (cali_rules(ns, backend), cali_sets(ns))
}

/// Kubernetes Pods carrying `role` labels: node 2's pods are friends, the others strangers.
fn roles(d: &Deployment, friend: impl Fn(usize) -> bool) -> String {
    let mut yaml = String::new();
    for (i, p) in d.pods.iter().enumerate() {
        let role = if friend(i) { "friend" } else { "stranger" };
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: {role}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.sb.pod
        ));
    }
    yaml
}

const GUARD: &str = "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: guard, namespace: default}\nspec:\n  selector: role == 'stranger'\n  ingress:\n  - {action: Allow, protocol: TCP, source: {selector: role == 'friend'}}\n";

/// Polls `f` for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn restart_agent(d: &mut Deployment, i: usize) {
    drop(d.agents.remove(i));
    let node = &d.cluster.nodes[i];
    let mode = d.dataplane.clone();
    d.agents.insert(
        i,
        Agent::start(
            node,
            &d.pins[i],
            d.cluster.etcd.as_ref(),
            &dataplane_args(&mode),
        ),
    );
    wait_ready(node, &mut d.agents[i], Duration::from_secs(20));
}

/// A policy through selectors (an ipset), enforced; the node's filter holds one jump per hook
/// and its ipsets live in the node's namespace only; an agent restart rewrites the same rules
/// and sets and removes leftovers and duplicate hooks; a selector's new member refills the set
/// with the chains untouched; a pod's and a policy's chains and sets go when they do.
fn rules_and_sets(backend: &str) {
    require_root();
    let mut d = Deployment::start_with_dataplane(&format!("iptables-{backend}"), "Never", 2);
    let servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    // Pods 0, 1 on node-1, 2, 3 on node-2 (friends), 4, 5 on node-3 (other subnet).
    d.apply(&(roles(&d, |i| i == 2 || i == 3) + GUARD));
    let (p, quick) = (&d.pods, Duration::from_millis(500));
    assert!(tcp_echo(&p[2], p[0].ip), "friend → stranger, across nodes");
    assert!(
        tcp_echo(&p[3], p[4].ip),
        "friend → stranger, across subnets"
    );
    assert!(
        !tcp_probe(&p[1], p[0].ip, quick),
        "stranger → stranger, same node"
    );
    assert!(
        !tcp_probe(&p[5], p[0].ip, quick),
        "stranger → stranger, across subnets"
    );
    assert!(!udp_echo(&p[2], p[0].ip), "UDP matches no rule");
    assert!(tcp_echo(&p[0], p[2].ip), "friends are not isolated");
    assert!(
        ping(&d.cluster.nodes[0].ns, p[0].ip),
        "the node reaches its isolated pod"
    );

    let ns = &d.cluster.nodes[0].ns;
    let (rules, sets) = filter_of(&d, 0, backend);
    for (builtin, ours) in [
        ("FORWARD", "cali-FORWARD"),
        ("INPUT", "cali-INPUT"),
        ("OUTPUT", "cali-OUTPUT"),
    ] {
        let jump = format!("-A {builtin} -j {ours}");
        assert_eq!(
            rules.iter().filter(|r| **r == jump).count(),
            1,
            "{jump}: {rules:#?}"
        );
    }
    let friends: Vec<String> = [p[2].ip, p[3].ip].iter().map(ToString::to_string).collect();
    assert_eq!(
        sets.values().collect::<Vec<_>>(),
        vec![&friends],
        "{sets:#?}"
    );
    // ipsets are per network namespace: the root namespace has none of them.
    let root =
        dataplane_tests::netns::run(std::process::Command::new("ipset").args(["list", "-n"]));
    assert!(sets.keys().all(|s| !root.lines().any(|l| l == s)), "{root}");
    let other = if backend == "nft" { "legacy" } else { "nft" };
    assert!(
        cali_rules(ns, other).is_empty(),
        "nothing through the other backend"
    );

    // Leftovers of an earlier run and a duplicated hook, then a restart.
    let before = filter_of(&d, 0, backend);
    let routes = agent_routes(ns);
    let iptables = format!("iptables-{backend}");
    ns.exec(&iptables, &["-w", "-N", "cali-tw-calistale"]);
    ns.exec(&iptables, &["-w", "-A", "FORWARD", "-j", "cali-FORWARD"]);
    ns.exec("ipset", &["create", "cali-s-stale", "hash:net"]);
    restart_agent(&mut d, 0);
    let ns = &d.cluster.nodes[0].ns;
    assert_eq!(
        filter_of(&d, 0, backend),
        before,
        "a restart converges to the same rules"
    );
    assert_eq!(agent_routes(ns), routes);

    // A new member of the selector: the set is refilled, the chains stay.
    d.apply(&roles(&d, |i| (2..=4).contains(&i)));
    let (rules, sets) = filter_of(&d, 0, backend);
    assert_eq!(rules, before.0);
    assert_eq!(
        sets.keys().collect::<Vec<_>>(),
        before.1.keys().collect::<Vec<_>>()
    );
    assert!(
        sets.values()
            .next()
            .unwrap()
            .contains(&d.pods[4].ip.to_string())
    );
    assert!(tcp_echo(&d.pods[4], d.pods[0].ip), "the new friend gets in");
    drop(servers);

    // A pod goes: its chains go. The policy goes: its chain and set go.
    let gone = d.pods.remove(0);
    let iface = |rules: &[String], name: &str| rules.iter().any(|r| r.contains(name));
    let veth = dataplane::cni::netsetup::host_veth_name(Some(("default", &gone.sb.pod)), "");
    assert!(iface(&filter_of(&d, 0, backend).0, &veth));
    let node = &d.cluster.nodes[0];
    let etcd = d.cluster.etcd.as_ref().unwrap().endpoint();
    cni(
        node,
        &d.plugins,
        "DEL",
        &gone.sb,
        &dataplane_conf("1.0.0", &etcd, &node.name),
    )
    .ok();
    eventually("the gone pod's chains removed", || {
        !iface(&filter_of(&d, 0, backend).0, &veth)
    });
    let (st, out, err) = d.ctl(&["delete", "networkpolicy", "guard", "-n", "default"]);
    assert!(st.success(), "{out}{err}");
    eventually("the policy's chain and set removed", || {
        let (rules, sets) = filter_of(&d, 0, backend);
        !iface(&rules, "cali-pi-") && sets.is_empty()
    });
    let (rules, _) = filter_of(&d, 0, backend);
    assert_eq!(
        rules.iter().filter(|r| r.starts_with(":cali-")).count(),
        7,
        "top, dispatch, one pod's two chains: {rules:#?}"
    );
}

#[test]
fn root_iptables_nft_rules_and_ipsets_idempotent_and_cleaned() {
    rules_and_sets("nft");
}

#[test]
fn root_iptables_legacy_rules_and_ipsets_idempotent_and_cleaned() {
    rules_and_sets("legacy");
}

/// ipipMode Always needs IP-in-IP, which this kernel cannot do: the pool is refused with an
/// error naming the missing module, no route goes to its remote blocks, the agent keeps
/// running (same-node traffic flows), and the pool works once it is switched to Never.
#[test]
fn root_iptables_ipip_pool_refused_naming_the_missing_module() {
    require_root();
    let d = Deployment::start_with_dataplane("iptables", "Always", 2);
    let n = &d.cluster.nodes;
    for (node, a) in n.iter().zip(&d.agents) {
        let log = a.log_text();
        assert!(
            log.contains("IP pool default-ipv4-ippool (10.65.0.0/16) refused: ipipMode Always")
                && log.contains("`ipip` module"),
            "{}:\n{log}",
            node.name
        );
        assert!(agent_routes(&node.ns).is_empty(), "{}", node.name);
    }
    let servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    assert!(tcp_echo(&d.pods[0], d.pods[1].ip), "same node");
    assert!(
        !tcp_probe(&d.pods[0], d.pods[2].ip, Duration::from_millis(500)),
        "no route"
    );

    d.apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\nspec: {cidr: 10.65.0.0/16, ipipMode: Never, natOutgoing: true}\n");
    assert_eq!(agent_routes(&n[0].ns).len(), 1);
    assert!(
        tcp_echo(&d.pods[0], d.pods[2].ip),
        "node-1 → node-2, natively"
    );
    assert!(
        udp_echo(&d.pods[3], d.pods[1].ip),
        "node-2 → node-1, natively"
    );
    drop(servers);
    for a in &d.agents {
        assert!(a.log_text().contains("no longer refused"));
    }
}

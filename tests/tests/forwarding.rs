//! Pod traffic forwarded by the BPF programs across the cluster in a box (needs root): three
//! nodes (two on one subnet, one behind the router), two pods each, agents synced from etcd,
//! for each pool mode. Every pod reaches every other pod over ICMP, TCP and UDP, nodes reach
//! pods, and a capture on the fabric shows IP-in-IP exactly where the mode says.

use std::time::Duration;

use dataplane_tests::{
    require_root,
    traffic::{Deployment, Pod, Servers, capture, inner_pair, ping, tcp_echo, udp_echo},
};

fn run_mode(mode: &str) {
    require_root();
    let d = Deployment::start(mode, 2);
    let (cluster, pods) = (&d.cluster, &d.pods);
    let servers: Vec<Servers> = pods.iter().map(Servers::start).collect();
    let (_tcpdump, lines) = capture(cluster);
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
            if !ping(&a.sb.ns, b.ip) {
                failures.push(format!("ICMP {what}"));
            }
            if !tcp_echo(a, b.ip) {
                failures.push(format!("TCP {what}"));
            }
            if !udp_echo(a, b.ip) {
                failures.push(format!("UDP {what}"));
            }
        }
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        for b in pods {
            if !ping(&node.ns, b.ip) {
                failures.push(format!(
                    "ICMP node-{} → {} on node-{}",
                    i + 1,
                    b.ip,
                    b.node + 1
                ));
            }
        }
    }
    // The capture: which pod pairs crossed the fabric in IP-in-IP.
    std::thread::sleep(Duration::from_millis(300));
    let captured: Vec<String> = lines.try_iter().collect();
    let encapsulated =
        |a: &Pod, b: &Pod| captured.iter().any(|l| inner_pair(l) == Some((a.ip, b.ip)));
    for a in pods {
        for b in pods {
            if a.node == b.node {
                continue;
            }
            let same_subnet = cluster.nodes[a.node].subnet == cluster.nodes[b.node].subnet;
            let want = match mode {
                "Always" => true,
                "CrossSubnet" => !same_subnet,
                _ => false,
            };
            if encapsulated(a, b) != want {
                let seen: Vec<&String> = captured
                    .iter()
                    .filter(|l| inner_pair(l) == Some((a.ip, b.ip)))
                    .take(3)
                    .collect();
                failures.push(format!(
                    "{mode}: {} → {} encapsulated={} (expected {want}) {seen:?}",
                    a.ip, b.ip, !want
                ));
            }
        }
    }
    drop(servers);
    for a in &d.agents {
        assert!(
            a.log_text().contains("agent ready"),
            "an agent did not start:\n{}",
            a.log_text()
        );
    }
    assert!(
        failures.is_empty(),
        "{} failures in {mode}:\n{}\ncapture:\n{}\nmaps:\n{}",
        failures.len(),
        failures.join("\n"),
        captured
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        (0..cluster.nodes.len())
            .map(|i| format!("{}:\n{}", cluster.nodes[i].name, d.map_dump(i, "all")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn root_ipip_always_every_pod_reaches_every_pod() {
    run_mode("Always");
}

#[test]
fn root_ipip_cross_subnet_encapsulates_only_across_subnets() {
    run_mode("CrossSubnet");
}

#[test]
fn root_ipip_never_routes_natively() {
    run_mode("Never");
}

//! Pod traffic forwarded by the BPF programs across the cluster in a box (needs root): three
//! nodes (two on one subnet, one behind the router), two pods each, agents synced from etcd,
//! for each pool mode. Every pod reaches every other pod over ICMP, TCP and UDP, nodes reach
//! pods, and a capture on the fabric shows IP-in-IP exactly where the mode says.

use std::{net::Ipv4Addr, time::Duration};

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

/// Counter `slot` summed over the hook on every interface of node `i`, read from its pins.
fn node_counter(d: &Deployment, i: usize, hook: u8, slot: usize) -> u64 {
    dataplane::maps::read_counters(&d.pins[i].path)
        .unwrap()
        .iter()
        .filter(|((_, h), _)| *h == hook)
        .map(|(_, c)| c.values[slot])
        .sum()
}

#[test]
fn root_forged_sources_and_ipip_from_non_nodes_are_dropped_and_counted() {
    use dataplane_common::{counter, hook};
    require_root();
    let d = Deployment::start("Always", 1);
    let (a, b) = (&d.pods[0], &d.pods[1]);
    assert!(ping(&a.sb.ns, b.ip), "baseline");

    // A bulk TCP stream across nodes in IP-in-IP: segmentation offload survives the
    // encapsulation (nothing is dropped as too big).
    let mut server = dataplane_tests::ChildGuard::new(
        b.sb.ns
            .command("iperf3")
            .args(["-s", "-1", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        "iperf3 server",
    );
    std::thread::sleep(Duration::from_millis(300));
    let out =
        a.sb.ns
            .command("iperf3")
            .args(["-c", &b.ip.to_string(), "-p", "5201", "-t", "1", "-J"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        bytes > 10e6,
        "a TCP stream in IP-in-IP moved only {bytes} bytes"
    );
    server.stop(Duration::from_secs(2));
    assert_eq!(
        node_counter(&d, a.node, hook::FROM_WORKLOAD, counter::DROP_TOO_BIG),
        0
    );

    // A pod that sends from an address that is not its own.
    let before = node_counter(
        &d,
        a.node,
        hook::FROM_WORKLOAD,
        counter::DROP_SPOOFED_SOURCE,
    );
    a.sb.ns
        .ip(&["addr", "add", "10.65.99.99/32", "dev", "eth0"]);
    let status =
        a.sb.ns
            .command("ping")
            .args(["-c", "2", "-W", "1", "-I", "10.65.99.99", &b.ip.to_string()])
            .output()
            .unwrap();
    assert!(
        !status.status.success(),
        "a forged source must not get through"
    );
    let after = node_counter(
        &d,
        a.node,
        hook::FROM_WORKLOAD,
        counter::DROP_SPOOFED_SOURCE,
    );
    assert!(
        after >= before + 2,
        "spoofed drops counted: {before} → {after}"
    );

    // IP-in-IP to node-1 from a host on the fabric that is not a node (etcd's namespace),
    // carrying a packet for node-1's pod: dropped at node-1's NIC, never delivered.
    let etcd = d.cluster.etcd.as_ref().unwrap();
    let node1 = d.cluster.nodes[0].ip;
    let before = node_counter(&d, 0, hook::HOST_INGRESS, counter::DROP_UNKNOWN_IPIP_PEER);
    let inner = dataplane_tests::packets::udp_frame(Ipv4Addr::new(10, 65, 77, 1), a.ip, b"sneaky")
        [14..]
        .to_vec();
    dataplane_tests::packets::send_ipip(&etcd.ns, &[node1; 3], &inner);
    std::thread::sleep(Duration::from_millis(200));
    let after = node_counter(&d, 0, hook::HOST_INGRESS, counter::DROP_UNKNOWN_IPIP_PEER);
    assert_eq!(
        after,
        before + 3,
        "IP-in-IP from a non-node dropped and counted"
    );
}

//! `cargo xtask demo`: a three-node cluster in a box with a real etcd — two nodes on one
//! subnet, a third behind a router — the pool in CrossSubnet mode, two pods per node made by
//! the CNI plugin, agents syncing routes from etcd, an all-to-all ping/TCP matrix, and a
//! capture on the fabric showing which pairs travelled in IP-in-IP; then Kubernetes
//! NetworkPolicies (default-deny and an allow) and the connectivity matrix before and after.

use std::collections::BTreeSet;

use std::time::Duration;

use dataplane_tests::{
    require_root,
    traffic::{Deployment, Pod, Servers, capture, inner_pair, ping, tcp_echo, tcp_probe},
};

/// Pod roles for the policy part: even pods are frontends, odd pods backends.
fn role(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "frontend"
    } else {
        "backend"
    }
}

/// The TCP matrix (rows: from, columns: to); returns the pairs that differ from `expect`.
fn tcp_matrix(pods: &[Pod], expect: impl Fn(usize, usize) -> bool) -> usize {
    print!("{:<24}", "");
    for j in 0..pods.len() {
        print!("{:>13}", format!("{}:{}", role(j), j));
    }
    println!();
    let mut wrong = 0;
    for (i, a) in pods.iter().enumerate() {
        print!("{:<24}", format!("{} {}", a.ip, role(i)));
        for (j, b) in pods.iter().enumerate() {
            if i == j {
                print!("{:>13}", "-");
                continue;
            }
            let ok = tcp_probe(a, b.ip, Duration::from_millis(400));
            if ok != expect(i, j) {
                wrong += 1;
            }
            let cell = match (ok, ok == expect(i, j)) {
                (true, true) => "allow",
                (false, true) => "deny",
                (true, false) => "ALLOW(!)",
                (false, false) => "DENY(!)",
            };
            print!("{cell:>13}");
        }
        println!();
    }
    wrong
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() {
    require_root();
    step(
        "cluster in a box: fabric, router, etcd, node-1 and node-2 on 192.168.1.0/24, node-3 on 192.168.2.0/24; pool 10.65.0.0/16 in CrossSubnet; agents; 2 pods per node via CNI ADD",
    );
    let d = Deployment::start("CrossSubnet", 2);
    let cluster = &d.cluster;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let pods: Vec<String> = d
            .pods
            .iter()
            .filter(|p| p.node == i)
            .map(|p| p.ip.to_string())
            .collect();
        println!("    {} {:<13} pods {}", node.name, node.ip, pods.join(", "));
    }
    println!(
        "    etcd at {}",
        cluster
            .etcd
            .as_ref()
            .map(|e| e.endpoint())
            .unwrap_or_default()
    );

    step("node-1's routes as the agent synced them (dataplane map-dump routes)");
    print!("{}", d.map_dump(0, "routes"));

    step("all-to-all matrix: ping and TCP from each pod (rows) to each pod (columns)");
    let servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    let (_tcpdump, lines) = capture(cluster);
    print!("{:<14}", "");
    for b in &d.pods {
        print!("{:>13}", b.ip.to_string());
    }
    println!();
    let mut failed = 0;
    for a in &d.pods {
        print!("{:<14}", a.ip.to_string());
        for b in &d.pods {
            let cell = if std::ptr::eq(a, b) {
                "-".to_owned()
            } else {
                let icmp = ping(&a.sb.ns, b.ip);
                let tcp = tcp_echo(a, b.ip);
                if !(icmp && tcp) {
                    failed += 1;
                }
                format!(
                    "{}/{}",
                    if icmp { "ok" } else { "FAIL" },
                    if tcp { "ok" } else { "FAIL" }
                )
            };
            print!("{cell:>13}");
        }
        println!();
    }
    println!("    (cell: ICMP/TCP)  {failed} failing pairs");

    step("capture on the fabric: pod pairs that crossed in IP-in-IP (outer protocol 4)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pairs: BTreeSet<(String, String)> = lines
        .try_iter()
        .filter_map(|l| inner_pair(&l))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let node_of = |ip: &str| {
        d.pods
            .iter()
            .find(|p| p.ip.to_string() == ip)
            .map_or("?".to_owned(), |p| cluster.nodes[p.node].name.clone())
    };
    for (a, b) in &pairs {
        println!(
            "    {a:<12} ({}) → {b:<12} ({})  IP-in-IP",
            node_of(a),
            node_of(b)
        );
    }
    println!(
        "    node-1 ↔ node-2 pairs went native (same subnet); pairs with node-3 were encapsulated"
    );

    step("policy: label the pods (Kubernetes Pod objects through `dataplane ctl apply`)");
    let mut pods_yaml = String::new();
    for (i, p) in d.pods.iter().enumerate() {
        pods_yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{app: {}}}}}\nspec: {{containers: [{{name: app, ports: [{{name: echo, containerPort: 7000}}]}}]}}\n",
            p.sb.pod,
            role(i)
        ));
    }
    print!("{}", d.apply(&pods_yaml));
    println!("    TCP matrix before any policy:");
    failed += tcp_matrix(&d.pods, |_, _| true);

    step(
        "policy: default-deny ingress, then allow frontend → backend on the named port echo (Kubernetes NetworkPolicy, `ctl apply --wait`)",
    );
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: default}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: frontend-to-backend, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: backend}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: frontend}}}]\n    ports: [{port: echo}]\n";
    print!("{policy}");
    print!("{}", d.apply(policy));
    println!("    TCP matrix with the policies (replies pass through conntrack):");
    failed += tcp_matrix(&d.pods, |i, j| {
        role(i) == "frontend" && role(j) == "backend"
    });
    drop(servers);

    step("node-1's endpoints and compiled policies (dataplane map-dump endpoints / policy)");
    print!("{}", d.map_dump(0, "endpoints"));
    print!("{}", d.map_dump(0, "policy"));

    step("node-1's counters (dataplane map-dump counters): drop_policy counts the denied SYNs");
    print!("{}", d.map_dump(0, "counters"));

    step("tearing down (agents, pods, nodes, etcd, router, fabric)");
    drop(d);
    println!("    done");
    if failed > 0 {
        std::process::exit(1);
    }
}

//! Calico policy semantics and conntrack on a live cluster in a box: three nodes, six pods
//! through the real CNI plugin, agents synced from a real etcd, policies applied with
//! `dataplane ctl apply --wait` and probed with real TCP and UDP traffic. Each runs against
//! the BPF dataplane (pool CrossSubnet) and the iptables one (pool Never: no IP-in-IP there).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    time::Duration,
};

use dataplane_tests::{
    require_root,
    traffic::{Deployment, ECHO_PORT, Pod, Servers, tcp_probe},
};

/// Pods 0–1 on node 0, 2–3 on node 1 (same subnet), 4–5 on node 2 (behind the router).
const ROLES: [&str; 6] = ["client", "other", "db", "db", "client", "web"];

fn apply(d: &Deployment, yaml: &str) {
    d.apply(yaml);
}

fn delete(d: &Deployment, kind: &str, name: &str) {
    let (st, out, err) = d.ctl(&["delete", kind, name]);
    assert!(st.success(), "delete failed: {out}{err}");
}

fn tcp(from: &Pod, to: Ipv4Addr) -> bool {
    tcp_probe(from, to, Duration::from_millis(600))
}

fn udp(from: &Pod, to: Ipv4Addr) -> bool {
    from.sb.ns.run(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 8];
        (0..2).any(|_| {
            s.send_to(b"ping", (to, ECHO_PORT)).is_ok()
                && s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"ping")
        })
    })
}

/// Which pod pairs (from, to) reach each other over TCP, as a matrix of 0/1 per row.
fn tcp_matrix(d: &Deployment) -> Vec<String> {
    d.pods
        .iter()
        .map(|from| {
            d.pods
                .iter()
                .map(|to| {
                    if std::ptr::eq(from, to) || tcp(from, to.ip) {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect()
        })
        .collect()
}

/// The two dataplanes: (agent mode, pool ipipMode).
const BPF: (&str, &str) = ("bpf", "CrossSubnet");
const IPTABLES: (&str, &str) = ("iptables", "Never");

fn start((dataplane, pool): (&str, &str)) -> (Deployment, Vec<Servers>) {
    let d = Deployment::start_with_dataplane(dataplane, pool, 2);
    let servers = d.pods.iter().map(Servers::start).collect();
    // Labels, as the Kubernetes Pods would carry them.
    let mut pods = String::new();
    for (p, role) in d.pods.iter().zip(ROLES) {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: {role}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.sb.pod
        ));
    }
    apply(&d, &pods);
    (d, servers)
}

#[test]
fn root_calico_order_deny_pass_and_not_matches() {
    order_deny_pass_and_not_matches(BPF);
}

#[test]
fn root_calico_order_deny_pass_and_not_matches_iptables() {
    order_deny_pass_and_not_matches(IPTABLES);
}

fn order_deny_pass_and_not_matches(mode: (&str, &str)) {
    require_root();
    let (d, _servers) = start(mode);
    let ip = |i: usize| d.pods[i].ip;
    assert!(tcp_matrix(&d).iter().all(|r| !r.contains('0')));

    // Ordered tiers of one: a global policy (order 10) that denies "other" and passes
    // "client" to the profile, then a namespaced policy (order 100) that denies everyone.
    apply(
        &d,
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: db-gate}\nspec:\n  order: 10\n  selector: role == 'db'\n  types: [Ingress]\n  ingress:\n  - {action: Deny, source: {selector: role == 'other'}}\n  - {action: Pass, source: {selector: role == 'client'}}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db-closed, namespace: default}\nspec:\n  order: 100\n  selector: role == 'db'\n  types: [Ingress]\n  ingress:\n  - action: Deny\n",
    );
    for db in [2, 3] {
        assert!(
            tcp(&d.pods[0], ip(db)),
            "client (same node) → db {db}: passed"
        );
        assert!(tcp(&d.pods[4], ip(db)), "client (other subnet) → db {db}");
        assert!(!tcp(&d.pods[1], ip(db)), "other → db {db}: denied first");
        assert!(!tcp(&d.pods[5], ip(db)), "web → db {db}: denied later");
    }
    // Pods the policies do not select are untouched.
    assert!(tcp(&d.pods[1], ip(5)));

    // Deny before Allow in one policy; notNets and notPorts; protocol.
    apply(
        &d,
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  selector: role == 'web'\n  ingress:\n  - {{action: Deny, source: {{nets: ['{}/32']}}}}\n  - {{action: Allow, protocol: TCP, source: {{notNets: ['{}/32']}}, destination: {{notPorts: [7001]}}}}\n",
            ip(4),
            ip(1)
        ),
    );
    assert!(!tcp(&d.pods[4], ip(5)), "denied by the first rule");
    assert!(tcp(&d.pods[4], ip(0)), "pod 4 itself is not isolated");
    assert!(!tcp(&d.pods[1], ip(5)), "notNets excludes pod 1");
    assert!(tcp(&d.pods[0], ip(5)), "allowed by the second rule");
    assert!(tcp(&d.pods[2], ip(5)), "allowed across nodes");
    assert!(!udp(&d.pods[0], ip(5)), "UDP matches no rule");
    assert!(udp(&d.pods[0], ip(1)), "UDP to a pod without policy");

    // A GlobalNetworkPolicy over namespaces: it selects by namespace labels, across
    // namespaces; one naming another namespace changes nothing here.
    apply(
        &d,
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: elsewhere}\nspec:\n  order: 1\n  namespaceSelector: kubernetes.io/metadata.name == 'kube-system'\n  selector: all()\n  ingress:\n  - action: Deny\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: here}\nspec:\n  order: 1\n  namespaceSelector: kubernetes.io/metadata.name == 'default'\n  selector: role == 'other'\n  ingress:\n  - {action: Deny, protocol: UDP}\n  - {action: Allow}\n",
    );
    assert!(
        tcp(&d.pods[0], ip(1)),
        "TCP to the 'other' pod still allowed"
    );
    assert!(
        !udp(&d.pods[0], ip(1)),
        "UDP to it denied by the namespace-wide policy"
    );
    assert!(udp(&d.pods[0], ip(4)), "a pod neither policy selects");
    delete(&d, "globalnetworkpolicy", "elsewhere");
    delete(&d, "globalnetworkpolicy", "here");

    // Removing the policies opens everything again.
    delete(&d, "globalnetworkpolicy", "db-gate");
    delete(&d, "networkpolicy", "db-closed");
    delete(&d, "networkpolicy", "web");
    apply(
        &d,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n",
    );
    assert!(tcp_matrix(&d).iter().all(|r| !r.contains('0')));
}

#[test]
fn root_conntrack_keeps_replies_and_established_connections() {
    conntrack_keeps_replies_and_established_connections(BPF);
}

#[test]
fn root_conntrack_keeps_replies_and_established_connections_iptables() {
    conntrack_keeps_replies_and_established_connections(IPTABLES);
}

fn conntrack_keeps_replies_and_established_connections(mode: (&str, &str)) {
    require_root();
    let (d, _servers) = start(mode);
    let ip = |i: usize| d.pods[i].ip;
    // Pod 3 (db) may not open anything, and accepts only from clients.
    apply(
        &d,
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db, namespace: default}\nspec:\n  selector: role == 'db'\n  types: [Ingress, Egress]\n  ingress:\n  - {action: Allow, source: {selector: role == 'client'}}\n",
    );
    // Replies leave the db although its egress allows nothing.
    assert!(tcp(&d.pods[0], ip(3)) && tcp(&d.pods[4], ip(3)));
    assert!(udp(&d.pods[0], ip(3)));
    assert!(!tcp(&d.pods[3], ip(0)), "the db opens nothing");
    assert!(!tcp(&d.pods[1], ip(3)), "not a client");
    // Its own node may always connect (Kubernetes: kubelet's probes); another node may not.
    let from_node = |n: usize| {
        d.cluster.nodes[n].ns.run(|| {
            TcpStream::connect_timeout(&(ip(3), ECHO_PORT).into(), Duration::from_millis(600))
                .is_ok()
        })
    };
    let own = from_node(d.pods[3].node);
    let inspect = |i: usize, kind: &str| {
        if d.dataplane == "bpf" {
            d.map_dump(i, kind)
        } else {
            String::new()
        }
    };
    assert!(
        own,
        "the pod's own node:\n{}\n{}",
        inspect(d.pods[3].node, "conntrack"),
        inspect(d.pods[3].node, "counters")
    );
    assert!(!from_node(d.pods[0].node + 2), "a node behind the router");

    // An established connection survives a policy that would now refuse it (as in Calico:
    // conntrack keeps it); new ones are refused.
    let conn = d.pods[4].sb.ns.run(|| {
        let s =
            TcpStream::connect_timeout(&(ip(5), ECHO_PORT).into(), Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    apply(
        &d,
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: web-closed, namespace: default}\nspec:\n  selector: role == 'web'\n  ingress:\n  - action: Deny\n",
    );
    assert!(!tcp(&d.pods[4], ip(5)), "new connections are denied");
    let mut conn = conn;
    let mut buf = [0u8; 5];
    conn.write_all(b"hello").unwrap();
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello", "the established connection still works");

    if d.dataplane != "bpf" {
        return;
    }
    // The inspection shows it: the tracked connection on node 2 (both pods there, so both
    // ends' approvals; the echo server has closed its side by now), and the drops counted.
    let ct = d.map_dump(2, "conntrack");
    let line = ct
        .lines()
        .find(|l| {
            l.contains(&format!("{}:{ECHO_PORT}", ip(5)))
                && l.contains("egress,ingress,replied")
                && l.contains("pkts ")
        })
        .unwrap_or_else(|| panic!("no tracked connection to pod 5 in\n{ct}"));
    assert!(line.starts_with("TCP"), "{line}");
    let counters = d.map_dump(2, "counters");
    assert!(counters.contains("policy="), "{counters}");
    let policy = d.map_dump(2, "policy");
    assert!(policy.contains("deny"), "{policy}");
}

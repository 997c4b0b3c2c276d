//! The cluster in a box itself (needs root): a real etcd on the fabric reachable from nodes on
//! both subnets, routing through the router, and guards that clean up even on panic.

use std::{net::Ipv4Addr, sync::Mutex};

use dataplane_tests::{Cluster, cluster::http_request, require_root};

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn netns_names() -> String {
    dataplane_tests::netns::ip(&["netns", "list"])
}

#[test]
fn root_etcd_on_the_fabric_serves_nodes_on_both_subnets() {
    require_root();
    let cluster = Cluster::new(&[1, 2], true);
    let etcd = cluster.etcd.as_ref().unwrap();
    for node in &cluster.nodes {
        let key = b64(format!("/test/{}", node.name).as_bytes());
        let value = b64(node.ip.to_string().as_bytes());
        node.ns.run(|| {
            let put = format!(r#"{{"key":"{key}","value":"{value}"}}"#);
            http_request(etcd.ip, 2379, "POST", "/v3/kv/put", &put).unwrap();
            let got = http_request(
                etcd.ip,
                2379,
                "POST",
                "/v3/kv/range",
                &format!(r#"{{"key":"{key}"}}"#),
            )
            .unwrap();
            assert!(got.contains(&value), "{} read back {got}", node.name);
        });
    }
    // Cross-subnet: node-1 (192.168.1.10) reaches node-2 (192.168.2.10) through the router.
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(n2.ip, Ipv4Addr::new(192, 168, 2, 10));
    n1.ns
        .exec("ping", &["-c", "1", "-W", "2", &n2.ip.to_string()]);
}

#[test]
fn root_guards_remove_every_namespace_even_when_the_test_panics() {
    require_root();
    let id = Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(&[1], false);
        *id.lock().unwrap() = cluster.fabric.id.clone();
        let _pod = cluster.nodes[0].add_pod(Ipv4Addr::new(10, 65, 0, 7));
        assert!(netns_names().contains(&cluster.fabric.id));
        panic!("deliberate");
    });
    assert!(result.is_err());
    let id = id.into_inner().unwrap();
    assert!(!id.is_empty());
    let left: Vec<_> = netns_names()
        .lines()
        .filter(|l| l.contains(&id))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

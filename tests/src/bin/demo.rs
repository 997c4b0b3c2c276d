//! `cargo xtask demo`: a one-node cluster in a box with a real etcd and two pods, the agent
//! attached to every interface, traffic between the pods, and the counters it produced.

use std::{net::Ipv4Addr, time::Duration};

use dataplane_tests::{Agent, Cluster, PinDirGuard, dataplane, require_root, wait_attached};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() {
    require_root();
    step("building the cluster in a box: fabric, router, etcd, node-1");
    let cluster = Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let etcd = cluster.etcd.as_ref().expect("the demo starts etcd");
    println!(
        "    etcd at {} (namespace {})",
        etcd.endpoint(),
        etcd.ns.name
    );
    println!("    node-1 at {} (namespace {})", node.ip, node.ns.name);

    step("wiring two pods to node-1");
    let a = node.add_pod(Ipv4Addr::new(10, 65, 0, 2));
    let b = node.add_pod(Ipv4Addr::new(10, 65, 0, 3));
    for (name, pod) in [("pod-a", &a), ("pod-b", &b)] {
        println!("    {name}: {} on {}", pod.ip, pod.host_iface);
    }

    step("starting the agent on node-1");
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(node, &pins, Some(etcd), &[]);
    for iface in ["eth0", a.host_iface.as_str(), b.host_iface.as_str()] {
        wait_attached(&node.ns, iface, &mut agent, Duration::from_secs(20));
        println!("    programs attached to {iface}");
    }

    step("sending 100 UDP datagrams pod-a → pod-b and 3 pings pod-b → pod-a");
    let server =
        b.ns.run(|| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 7777)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    a.ns.run(|| {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        for i in 0..100u32 {
            s.send_to(&i.to_be_bytes(), (b.ip, 7777)).unwrap();
        }
    });
    let mut got = 0;
    let mut buf = [0u8; 64];
    while got < 100 && server.recv(&mut buf).is_ok() {
        got += 1;
    }
    println!("    pod-b received {got}/100 datagrams");
    let ping = b.ns.exec(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", &a.ip.to_string()],
    );
    println!("    {}", ping.lines().rev().nth(1).unwrap_or("").trim());

    step("dataplane map-dump counters (run in node-1's namespace)");
    let pin_dir = pins.path.display().to_string();
    let (status, out, err) =
        dataplane(&node.ns, &["map-dump", "counters", "--bpffs-dir", &pin_dir]);
    assert!(status.success(), "map-dump failed: {err}");
    print!("{out}");

    step("tearing down (agent, pods, node, etcd, fabric)");
    drop(agent);
    drop((a, b));
    drop(cluster);
    drop(pins);
    println!("    done");
}

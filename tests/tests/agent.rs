//! The agent against real interfaces in network namespaces (needs root): counters per
//! interface and direction, attach to interfaces that appear later, restart, bad input.

use std::{net::Ipv4Addr, time::Duration};

use dataplane_common::{counter, hook};
use dataplane_tests::{
    Agent, Cluster, PinDirGuard, dataplane, require_root, tcx_programs, wait_attached,
};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends exactly `n` UDP datagrams of `payload` bytes from pod `from` to pod `to` and returns
/// how many arrived. The receiver drains on its own thread so its socket buffer never
/// overflows.
fn send_udp(from: &dataplane_tests::Pod, to: &dataplane_tests::Pod, n: u32, payload: usize) -> u32 {
    let server = to
        .ns
        .run(|| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9999)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got = 0;
            let mut buf = vec![0u8; payload + 1];
            while got < n && server.recv(&mut buf).is_ok() {
                got += 1;
            }
            got
        });
        from.ns.run(|| {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let data = vec![0x5au8; payload];
            for i in 0..n {
                s.send_to(&data, (to.ip, 9999)).unwrap();
                if i % 64 == 63 {
                    // Let the receiver keep up on a 2-CPU machine.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        receiver.join().unwrap()
    })
}

/// One node (no etcd) with an agent attached to its host NIC.
fn node_with_agent() -> (Cluster, PinDirGuard, Agent) {
    let cluster = Cluster::new(&[1], false);
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(&cluster.nodes[0], &pins, None, &[]);
    wait_attached(&cluster.nodes[0].ns, "eth0", &mut agent, ATTACH_TIMEOUT);
    (cluster, pins, agent)
}

fn counters(pins: &PinDirGuard, ifindex: u32, h: u8) -> [u64; counter::COUNT] {
    dataplane::maps::read_counters(&pins.path)
        .unwrap()
        .get(&(ifindex, h))
        .map_or([0; counter::COUNT], |c| c.values)
}

#[test]
fn root_udp_datagrams_are_counted_on_the_right_interface_and_direction() {
    require_root();
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let a = node.add_pod(Ipv4Addr::new(10, 65, 0, 2));
    let b = node.add_pod(Ipv4Addr::new(10, 65, 0, 3));
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(node, &pins, None, &[]);
    for iface in ["eth0", &a.host_iface, &b.host_iface] {
        wait_attached(&node.ns, iface, &mut agent, ATTACH_TIMEOUT);
    }
    // Without etcd nothing programs the pods' endpoints, and the programs drop the traffic
    // of unprogrammed pods: program them here.
    for p in [&a, &b] {
        let mac: Vec<u8> = p
            .mac
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        dataplane::maps::write_endpoint(
            &pins.path,
            node.ns.ifindex(&p.host_iface),
            dataplane_common::EndpointValue {
                ip: p.ip.octets(),
                mac: mac.try_into().unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
    }
    // Warm up once so that nothing but our datagrams moves during the measured part.
    assert_eq!(send_udp(&a, &b, 1, 8), 1);

    let a_idx = node.ns.ifindex(&a.host_iface);
    let b_idx = node.ns.ifindex(&b.host_iface);
    let eth0 = node.ns.ifindex("eth0");
    let watched = [
        (a_idx, hook::FROM_WORKLOAD),
        (a_idx, hook::TO_WORKLOAD),
        (b_idx, hook::FROM_WORKLOAD),
        (b_idx, hook::TO_WORKLOAD),
        (eth0, hook::HOST_INGRESS),
        (eth0, hook::HOST_EGRESS),
    ];
    let before: Vec<_> = watched
        .iter()
        .map(|&(i, h)| counters(&pins, i, h))
        .collect();
    const N: u32 = 500;
    const PAYLOAD: usize = 100;
    assert_eq!(
        send_udp(&a, &b, N, PAYLOAD),
        N,
        "every datagram should arrive"
    );
    let after: Vec<_> = watched
        .iter()
        .map(|&(i, h)| counters(&pins, i, h))
        .collect();

    let delta = |k: usize, slot: usize| after[k][slot] - before[k][slot];
    let frame = (14 + 20 + 8 + PAYLOAD) as u64;
    // Pod a sends: ingress of its veth. Pod b receives: egress of its veth.
    assert_eq!(
        delta(0, counter::PACKETS),
        u64::from(N),
        "from-workload on a's veth"
    );
    assert_eq!(delta(0, counter::BYTES), u64::from(N) * frame);
    assert_eq!(delta(0, counter::PASSED), u64::from(N));
    assert_eq!(
        delta(3, counter::PACKETS),
        u64::from(N),
        "to-workload on b's veth"
    );
    assert_eq!(delta(3, counter::BYTES), u64::from(N) * frame);
    // Nothing on the wrong interface or direction.
    for (k, what) in [
        (1, "to-workload on a's veth"),
        (2, "from-workload on b's veth"),
        (4, "host ingress"),
        (5, "host egress"),
    ] {
        assert_eq!(delta(k, counter::PACKETS), 0, "{what} counted packets");
    }

    // The same figures through the CLI's JSON.
    let pin_dir = pins.path.display().to_string();
    let (status, out, err) = dataplane(
        &node.ns,
        &["map-dump", "counters", "--json", "--bpffs-dir", &pin_dir],
    );
    assert!(status.success(), "{err}");
    let rows: Vec<dataplane::dump::CounterRow> = serde_json::from_str(&out).unwrap();
    let row = rows
        .iter()
        .find(|r| r.iface.as_deref() == Some(a.host_iface.as_str()) && r.hook == "from-workload")
        .unwrap_or_else(|| panic!("no from-workload row for {}: {out}", a.host_iface));
    assert_eq!(row.packets, after[0][counter::PACKETS]);
    assert_eq!(serde_json::to_string_pretty(&rows).unwrap(), out.trim_end());
}

#[test]
fn root_interface_created_after_start_is_attached_and_detached_when_gone() {
    require_root();
    let (cluster, pins, mut agent) = node_with_agent();
    let node = &cluster.nodes[0];

    let pod = node.add_pod(Ipv4Addr::new(10, 65, 0, 9));
    wait_attached(&node.ns, &pod.host_iface, &mut agent, ATTACH_TIMEOUT);
    let (ingress, egress) = tcx_programs(&node.ns, &pod.host_iface);
    assert_eq!(
        (ingress, egress),
        (
            vec!["from_workload".to_owned()],
            vec!["to_workload".to_owned()]
        )
    );
    let ifindex = node.ns.ifindex(&pod.host_iface);
    let host_iface = pod.host_iface.clone();
    let pin = |dir: &str| {
        pins.path
            .join(format!("links/{ifindex}-{host_iface}-{dir}"))
    };
    assert!(pin("ingress").exists() && pin("egress").exists());

    // An interface that is not a pod's gets nothing.
    node.ns.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tcx_programs(&node.ns, "other0"), (vec![], vec![]));

    // Deleting the pod's veth removes its pins.
    drop(pod);
    let deadline = std::time::Instant::now() + ATTACH_TIMEOUT;
    while pin("ingress").exists() || pin("egress").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pins of {host_iface} still there:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        agent.process.exited().is_none(),
        "agent died:\n{}",
        agent.log_text()
    );
}

#[test]
fn root_restarted_agent_takes_over_its_pinned_links_without_duplicates() {
    require_root();
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let pod = node.add_pod(Ipv4Addr::new(10, 65, 0, 4));
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(node, &pins, None, &[]);
    wait_attached(&node.ns, &pod.host_iface, &mut agent, ATTACH_TIMEOUT);
    let status = agent.process.stop(Duration::from_secs(5)).unwrap();
    assert!(
        status.success(),
        "agent exit on SIGTERM: {status}\n{}",
        agent.log_text()
    );
    // Stopped agent: the programs stay in force.
    assert_eq!(tcx_programs(&node.ns, &pod.host_iface).0.len(), 1);
    assert_eq!(tcx_programs(&node.ns, "eth0").0.len(), 1);

    let mut again = Agent::start(node, &pins, None, &[]);
    wait_attached(&node.ns, &pod.host_iface, &mut again, ATTACH_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    for iface in ["eth0", pod.host_iface.as_str()] {
        let (ingress, egress) = tcx_programs(&node.ns, iface);
        assert_eq!(
            (ingress.len(), egress.len()),
            (1, 1),
            "{iface}: {ingress:?} {egress:?}"
        );
    }
}

/// Runs an agent expected to fail at start and returns its stderr.
fn failing_agent(node: &dataplane_tests::Node, args: &[&str]) -> String {
    let mut all = vec!["agent", "--node", "n"];
    all.extend_from_slice(args);
    let (status, _, err) = dataplane(&node.ns, &all);
    assert!(!status.success(), "agent {args:?} should fail");
    let err = err.trim();
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: "),
        "one-line error expected, got: {err}"
    );
    last.to_owned()
}

fn assert_nothing_attached(node: &dataplane_tests::Node, iface: &str) {
    assert_eq!(
        tcx_programs(&node.ns, iface),
        (vec![], vec![]),
        "{iface} has programs"
    );
}

#[test]
fn root_bad_input_gives_a_one_line_error_and_leaves_nothing_attached() {
    require_root();
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let pod = node.add_pod(Ipv4Addr::new(10, 65, 0, 5));

    let pins = PinDirGuard::new();
    let dir = pins.path.display().to_string();
    let err = failing_agent(node, &["--host-iface", "eth9", "--bpffs-dir", &dir]);
    assert!(err.contains("eth9") && err.contains("not found"), "{err}");
    assert!(
        !pins.path.exists(),
        "a failed start must not create the pin dir"
    );

    let not_bpffs = tempfile::tempdir().unwrap();
    let dir_tmp = not_bpffs.path().join("pins").display().to_string();
    let err = failing_agent(node, &["--bpffs-dir", &dir_tmp]);
    assert!(err.contains("not on a bpf filesystem"), "{err}");

    let err = failing_agent(node, &["--bpffs-dir", "/proc/dataplane-pins"]);
    assert!(err.contains("/proc/dataplane-pins"), "{err}");
    assert_nothing_attached(node, "eth0");
    assert_nothing_attached(node, &pod.host_iface);

    // A second agent on a pin dir in use is refused and leaves the first one's programs be.
    let mut first = Agent::start(node, &pins, None, &[]);
    wait_attached(&node.ns, &pod.host_iface, &mut first, ATTACH_TIMEOUT);
    let err = failing_agent(node, &["--bpffs-dir", &dir]);
    assert!(err.contains("in use by another agent"), "{err}");
    for iface in ["eth0", pod.host_iface.as_str()] {
        let (ingress, egress) = tcx_programs(&node.ns, iface);
        assert_eq!((ingress.len(), egress.len()), (1, 1), "{iface}");
    }
    assert!(
        first.process.exited().is_none(),
        "first agent died:\n{}",
        first.log_text()
    );

    // Unknown flags are refused by the parser with a usage error.
    let (status, _, err) = dataplane(&node.ns, &["agent", "--node", "n", "--bogus"]);
    assert!(!status.success() && err.contains("--bogus"), "{err}");
}

#[test]
fn root_bpftool_shows_every_pinned_map_with_field_names() {
    use dataplane_common::map_names;
    require_root();
    // The agent keeps the maps pinned while it runs.
    let (_cluster, pins, _agent) = node_with_agent();
    let bpftool = |args: &[&str]| {
        dataplane_tests::netns::run(std::process::Command::new("bpftool").args(args))
    };
    for (map, fields) in [
        (
            map_names::COUNTERS,
            &[
                "'CounterKey'",
                "'ifindex'",
                "'hook'",
                "'Counters'",
                "'values'",
            ][..],
        ),
        (
            map_names::ROUTES,
            &["'RouteValue'", "'kind'", "'flags'", "'next_hop'", "'mac'"][..],
        ),
        (
            map_names::ENDPOINTS,
            &["'EndpointValue'", "'ip'", "'mac'"][..],
        ),
        (map_names::NODES, &["'NodeValue'", "'flags'"][..]),
        (
            map_names::POLICY_HITS,
            &["'PolicyHitKey'", "'policy'", "'rule'"][..],
        ),
        (
            map_names::POLICY_RULES,
            &[
                "'PolicyRuleKey'",
                "'PolicyRuleMeta'",
                "'action'",
                "'number'",
                "'name'",
            ][..],
        ),
        (
            map_names::CONFIG,
            &["'NodeConfig'", "'node_ip'", "'host_ifindex'", "'host_mtu'"][..],
        ),
    ] {
        let path = pins.path.join("maps").join(map).display().to_string();
        let btf = bpftool(&["btf", "dump", "map", "pinned", &path]);
        for f in fields {
            assert!(btf.contains(f), "{map}: no {f} in\n{btf}");
        }
    }
    // With an entry in it, the dump itself names the fields.
    let path = pins
        .path
        .join("maps")
        .join(map_names::CONFIG)
        .display()
        .to_string();
    let dump = bpftool(&["map", "dump", "pinned", &path]);
    assert!(dump.contains("\"host_ifindex\""), "{dump}");
}

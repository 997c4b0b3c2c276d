//! Pod churn across three nodes with agent restarts and an etcd restart in the middle (needs
//! root; BPF mode): pods made and deleted through the real CNI plugin as a runtime would,
//! agents killed and started again at random, etcd stopped once (ADD and DEL then fail with
//! code 11 and are retried, as kubelet does). At the end the checker
//! ([`dataplane_tests::checker`]) finds no duplicate address and no leaked allocation,
//! handle, endpoint, veth, route or map entry; then every pod is deleted and it finds
//! nothing at all.
//!
//! 100 pods are made by default, 1,000 with `DATAPLANE_SOAK=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use dataplane_tests::{
    Agent,
    checker::{PodId, check},
    cni::{Sandbox, cni, dataplane_conf},
    load::soak,
    require_root,
    traffic::Deployment,
};

/// xorshift64: the same churn on every run (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Waits until the checker is satisfied (agents program asynchronously); panics with its
/// last findings.
fn settle(d: &Deployment, expected: &BTreeSet<PodId>) -> dataplane_tests::checker::Census {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match check(&d.cluster, &d.pins, expected) {
            Ok(c) => return c,
            Err(problems) if Instant::now() > deadline => {
                let logs: Vec<String> = d.agents.iter().map(Agent::log_text).collect();
                panic!(
                    "the checker found {} problems:\n{}\n\nagent logs:\n{}",
                    problems.len(),
                    problems.join("\n"),
                    logs.join("\n-----\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The checker is not blind: a stray handle in etcd, a stray veth and a stray endpoint
/// entry in a map are each reported (and removed again).
fn checker_sees_leaks(d: &Deployment, expected: &BTreeSet<PodId>) {
    let etcd = d.cluster.etcd.as_ref().unwrap();
    let etcdctl = |args: &[&str]| {
        dataplane_tests::netns::run(
            etcd.ns
                .command("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &etcd.endpoint()])
                .args(args),
        )
    };
    let found = |what: &str| {
        let problems = check(&d.cluster, &d.pins, expected).expect_err(what);
        assert!(
            problems.iter().any(|p| p.contains(what)),
            "{what}: {problems:?}"
        );
    };
    let handle = "/calico/ipam/v2/handle/k8s-pod-network.stray";
    etcdctl(&[
        "put",
        handle,
        r#"{"handleID":"k8s-pod-network.stray","block":{"10.65.0.0/26":1}}"#,
    ]);
    found("leaked handle");
    etcdctl(&["del", handle]);
    let node = &d.cluster.nodes[0];
    node.ns.ip(&[
        "link",
        "add",
        "calistray0",
        "type",
        "veth",
        "peer",
        "name",
        "stray1",
    ]);
    found("leaked veth");
    node.ns.ip(&["link", "del", "calistray0"]);
    let ifindex = node.ns.ifindex("lo");
    dataplane::maps::write_endpoint(&d.pins[0].path, ifindex, Default::default()).unwrap();
    found("endpoints map");
    let pin = d.pins[0]
        .path
        .join("maps")
        .join(dataplane_common::map_names::ENDPOINTS);
    let mut endpoints: aya::maps::HashMap<_, u32, dataplane_common::EndpointValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(&pin).unwrap(),
        ))
        .unwrap();
    endpoints.remove(&ifindex).unwrap();
    check(&d.cluster, &d.pins, expected).unwrap();
}

#[test]
fn root_pod_churn_with_agent_and_etcd_restarts_leaks_nothing() {
    require_root();
    let total = if soak() { 1000 } else { 100 };
    let seed = 0x5eed_0001_u64;
    let mut rng = Rng(seed);
    let mut d = Deployment::start("CrossSubnet", 0);
    let etcd = d.cluster.etcd.as_ref().unwrap().endpoint();
    let confs: Vec<_> = d
        .cluster
        .nodes
        .iter()
        .map(|n| dataplane_conf("1.0.0", &etcd, &n.name))
        .collect();
    // Live pods by name: (node, sandbox).
    let mut live: BTreeMap<String, (usize, Sandbox)> = BTreeMap::new();
    let (mut adds, mut dels, mut restarts, mut retries) = (0, 0, 0, 0);
    let started = Instant::now();
    let etcd_restart_at = total / 2;
    let mut etcd_restarted = false;
    while adds < total {
        // Mostly ADD while few pods live, mostly DEL when many do.
        let add = live.len() < 5 || (live.len() < 40 && rng.next(3) != 0);
        if add {
            let node = rng.next(3);
            let name = format!("churn-{adds}");
            let sb = Sandbox::new(&d.cluster.nodes[node], "default", &name);
            let out = cni(&d.cluster.nodes[node], &d.plugins, "ADD", &sb, &confs[node]);
            assert!(out.success, "ADD {name} on node-{}: {out:?}", node + 1);
            live.insert(name, (node, sb));
            adds += 1;
        } else {
            let k = rng.next(live.len());
            let name = live.keys().nth(k).unwrap().clone();
            let (node, sb) = live.remove(&name).unwrap();
            let out = cni(&d.cluster.nodes[node], &d.plugins, "DEL", &sb, &confs[node]);
            assert!(out.success, "DEL {name}: {out:?}");
            dels += 1;
        }
        // Now and then an agent dies (SIGKILL or SIGTERM) and comes back at once.
        if rng.next(15) == 0 {
            let i = rng.next(3);
            if rng.next(2) == 0 {
                let mut child = d.agents[i].process.child.take().unwrap();
                child.kill().unwrap();
                child.wait().unwrap();
            } else {
                d.agents[i].process.stop(Duration::from_secs(10));
            }
            d.agents[i] = Agent::start(
                &d.cluster.nodes[i],
                &d.pins[i],
                d.cluster.etcd.as_ref(),
                &[],
            );
            restarts += 1;
        }
        if !etcd_restarted && adds >= etcd_restart_at {
            etcd_restarted = true;
            // etcd goes away: an ADD and a DEL fail with "try again"; the runtime retries
            // them once it is back.
            let etcd = d.cluster.etcd.as_mut().unwrap();
            etcd.process.stop(Duration::from_secs(5));
            let node = rng.next(3);
            let name = format!("churn-{adds}-retried");
            let sb = Sandbox::new(&d.cluster.nodes[node], "default", &name);
            let out = cni(&d.cluster.nodes[node], &d.plugins, "ADD", &sb, &confs[node]);
            assert_eq!(out.err_code(), 11, "{out:?}");
            let victim = live.keys().next().cloned().expect("a live pod");
            let (vnode, vsb) = live.remove(&victim).unwrap();
            let out = cni(
                &d.cluster.nodes[vnode],
                &d.plugins,
                "DEL",
                &vsb,
                &confs[vnode],
            );
            assert_eq!(out.err_code(), 11, "{out:?}");
            d.cluster.etcd.as_mut().unwrap().restart();
            cni(&d.cluster.nodes[node], &d.plugins, "ADD", &sb, &confs[node]).ok();
            cni(
                &d.cluster.nodes[vnode],
                &d.plugins,
                "DEL",
                &vsb,
                &confs[vnode],
            )
            .ok();
            live.insert(name, (node, sb));
            retries += 2;
        }
    }
    let churned = started.elapsed();
    let expected: BTreeSet<PodId> = live
        .values()
        .map(|(_, sb)| (sb.namespace.clone(), sb.pod.clone()))
        .collect();
    let census = settle(&d, &expected);
    assert_eq!(census.endpoints, live.len());
    assert_eq!(census.allocations, live.len());
    checker_sees_leaks(&d, &expected);
    // Everything goes: nothing at all may be left.
    for (node, sb) in live.values() {
        cni(
            &d.cluster.nodes[*node],
            &d.plugins,
            "DEL",
            sb,
            &confs[*node],
        )
        .ok();
    }
    let empty = settle(&d, &BTreeSet::new());
    assert_eq!(
        (
            empty.allocations,
            empty.handles,
            empty.endpoints,
            empty.veths,
            empty.map_endpoints
        ),
        (0, 0, 0, 0, 0)
    );
    eprintln!(
        "churn (seed {seed:#x}): {adds} ADD and {dels} DEL across 3 nodes in {churned:.1?}, \
         {restarts} agent restarts, 1 etcd restart ({retries} calls retried after code 11); \
         checker at the end: {census:?}; after deleting the last {} pods: {empty:?}",
        live.len()
    );
}

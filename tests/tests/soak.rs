//! Hitless agent restarts under load (needs root): a cluster in a box (BPF mode, pool
//! CrossSubnet: native between nodes 1 and 2, IP-in-IP to node 3), steady TCP
//! request/response on long-lived connections and with a connection per request, same node
//! and across nodes and subnets, a long TCP stream, an allow-all policy behind a deny of one
//! port and probes of that port running throughout. The agents are restarted N times
//! (SIGTERM, SIGKILL, and SIGKILL while starting): no request may fail, no connection reset,
//! no probe get through.
//!
//! N is 5 by default; `DATAPLANE_SOAK=1` runs 20 restarts.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use dataplane_tests::{
    Agent, Netns, ebpf_variant_object,
    load::{EXTRA_PORT, Kind, PROBE_PORT, echo_ok, soak, start_load, start_under_policy},
    require_root,
    traffic::Deployment,
    wait_ready,
};

/// `what` of each TCX program on `iface` in `ns`, (ingress, egress).
fn programs<T: Send + 'static>(
    ns: &Netns,
    iface: &str,
    what: fn(&aya::programs::ProgramInfo) -> T,
) -> (Vec<T>, Vec<T>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let iface = iface.to_owned();
    ns.run(move || {
        let of = |t| -> Vec<T> {
            SchedClassifier::query_tcx(&iface, t)
                .map(|(_, progs)| progs.iter().map(what).collect())
                .unwrap_or_default()
        };
        (of(TcAttachType::Ingress), of(TcAttachType::Egress))
    })
}

/// The ids of the TCX programs on `iface` in `ns`, (ingress, egress).
fn program_ids(ns: &Netns, iface: &str) -> (Vec<u32>, Vec<u32>) {
    programs(ns, iface, aya::programs::ProgramInfo::id)
}

/// Every interface the agent of node `i` attaches to, with one program per hook.
fn assert_one_program_per_hook(d: &Deployment, i: usize) {
    let node = &d.cluster.nodes[i];
    let mut ifaces = d.veths(i);
    assert_eq!(ifaces.len(), d.pods.iter().filter(|p| p.node == i).count());
    ifaces.push("eth0".to_owned());
    for iface in ifaces {
        let (ingress, egress) = program_ids(&node.ns, &iface);
        assert!(
            ingress.len() == 1 && egress.len() == 1,
            "{}: {iface} has programs {ingress:?} / {egress:?}",
            node.name
        );
    }
}

/// Entries of the maps the agent fills from etcd (not conntrack, counters, fragments or
/// rule hits, which traffic moves), by map.
fn filled(d: &Deployment, i: usize) -> Vec<(String, Option<u64>)> {
    dataplane::pinned::map_fill(&d.pins[i].path)
        .into_iter()
        .filter(|f| {
            !matches!(
                f.map.as_str(),
                "conntrack" | "counters" | "fragments" | "policy_hits"
            )
        })
        .map(|f| (f.map, f.entries))
        .collect()
}

/// The bytes the stream's sink received, once it has all `sent` or after 5 s.
fn stream_received(sink: &dataplane_tests::load::LoadServer, sent: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.sunk.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    sink.sunk.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    /// SIGTERM, then a new agent.
    Term,
    /// SIGKILL, then a new agent.
    Kill,
    /// A new agent killed with SIGKILL while it starts up, then another.
    KillWhileStarting,
}

/// Restarts node `i`'s agent the `how` way; returns how long until the new one was ready.
fn restart(d: &mut Deployment, i: usize, how: Restart, k: usize) -> Duration {
    restart_with(d, i, how, k, &[])
}

/// [`restart`], the new agent started with `extra` arguments.
fn restart_with(d: &mut Deployment, i: usize, how: Restart, k: usize, extra: &[&str]) -> Duration {
    let started = Instant::now();
    let node = &d.cluster.nodes[i];
    let etcd = d.cluster.etcd.as_ref();
    match how {
        Restart::Term => {
            let status = d.agents[i].process.stop(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "the agent on {} exits cleanly on SIGTERM ({status:?}):\n{}",
                node.name,
                d.agents[i].log_text()
            );
        }
        Restart::Kill | Restart::KillWhileStarting => {
            let mut child = d.agents[i].process.child.take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
    if let Restart::KillWhileStarting = how {
        let mut early = Agent::start(node, &d.pins[i], etcd, &[]);
        // Somewhere in loading, attaching or the first sync.
        std::thread::sleep(Duration::from_millis(40 + 60 * (k as u64 % 5)));
        let mut child = early.process.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    d.agents[i] = Agent::start(node, &d.pins[i], etcd, extra);
    wait_ready(node, &mut d.agents[i], Duration::from_secs(30));
    started.elapsed()
}

#[test]
fn root_agent_restarts_under_load_lose_nothing() {
    require_root();
    let restarts = if soak() { 20 } else { 5 };
    let (mut d, servers) = start_under_policy();
    let before: Vec<_> = (0..3).map(|i| filled(&d, i)).collect();
    let load = start_load(&d);
    let began = Instant::now();
    let kinds = [
        Restart::Term,
        Restart::Kill,
        Restart::Term,
        Restart::KillWhileStarting,
    ];
    let mut took = Vec::new();
    for k in 0..restarts {
        let i = k % 3;
        let how = kinds[k % kinds.len()];
        let old = program_ids(&d.cluster.nodes[i].ns, "eth0");
        let t = restart(&mut d, i, how, k);
        let new = program_ids(&d.cluster.nodes[i].ns, "eth0");
        assert_ne!(old, new, "the restarted agent swapped its programs in");
        assert_one_program_per_hook(&d, i);
        took.push(t);
        eprintln!(
            "restart {}/{restarts}: node-{} {how:?}, ready in {t:?}",
            k + 1,
            i + 1
        );
        // Load keeps flowing between restarts.
        std::thread::sleep(Duration::from_millis(800));
    }
    let soaked = began.elapsed();
    let totals = load.finish();
    // Everything the stream wrote arrived.
    let sink = &servers[4];
    let sunk = stream_received(sink, totals.stream_bytes);
    took.sort();
    eprintln!(
        "soak: {restarts} agent restarts in {soaked:.1?} (ready after median {:?}, max {:?}); \
         {} requests, {} failed, {} resets, max gap {:?}, slowest request {:?}; \
         stream {} MB sent, {} MB received; {} denied probes, {} got through",
        took[took.len() / 2],
        took[took.len() - 1],
        totals.requests,
        totals.failed,
        totals.resets,
        totals.max_gap,
        totals.max_latency,
        totals.stream_bytes >> 20,
        sunk >> 20,
        totals.probes,
        totals.violations
    );
    totals.assert_clean("agent restarts");
    assert_eq!(sunk, totals.stream_bytes, "the stream lost bytes");
    assert_eq!(sink.sink_errors.load(Ordering::Relaxed), 0);
    // The restarted agents programmed the same state again: no entry leaked or lost (stale
    // policy entries go once the new ones are in force).
    for (i, want) in before.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let have = filled(&d, i);
            if &have == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node-{}: maps before the restarts {want:?}, after {have:?}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_one_program_per_hook(&d, i);
    }
    // Plain restarts reuse every pinned map as it is.
    for a in &d.agents {
        assert!(
            !a.log_text().contains("map layout changed"),
            "{}",
            a.log_text()
        );
    }
    // And they still enforce: the probe port stays shut, the rest open.
    let probe_from = &d.pods[0];
    assert!(!echo_ok(
        &probe_from.sb.ns,
        d.pods[5].ip,
        PROBE_PORT,
        Duration::from_millis(500)
    ));
    drop(servers);
}

/// The conntrack table's size as pinned on node `i`.
fn conntrack_entries_limit(d: &Deployment, i: usize) -> u32 {
    let pin = d.pins[i]
        .path
        .join("maps")
        .join(dataplane_common::map_names::CONNTRACK);
    aya::maps::MapData::from_pin(pin)
        .unwrap()
        .info()
        .unwrap()
        .max_entries()
}

#[test]
fn root_a_conntrack_resize_on_restart_migrates_flows_under_load() {
    require_root();
    let (mut d, servers) = start_under_policy();
    let mut load = start_load(&d);
    // Connections that only conntrack keeps alive: established, then their port denied to
    // new connections. Were the table's entries lost, their next packets would be judged as
    // new ones, and dropped.
    let pairs = [
        (0, 1, "same node"),
        (0, 2, "cross node"),
        (3, 4, "cross subnet"),
    ];
    for (from, to, what) in pairs {
        load.spawn_to_port(
            &format!("rr kept by conntrack, {what}"),
            Kind::Rr,
            &d.pods[from].sb.ns,
            d.pods[to].ip,
            EXTRA_PORT,
        );
    }
    load.wait_flowing(20, Duration::from_secs(10));
    d.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: no-new-{EXTRA_PORT}}}\nspec:\n  order: 10\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - {{action: Deny, protocol: TCP, destination: {{ports: [{EXTRA_PORT}]}}}}\n"
    ));
    assert!(!echo_ok(
        &d.pods[0].sb.ns,
        d.pods[2].ip,
        EXTRA_PORT,
        Duration::from_millis(500)
    ));
    let default = dataplane_common::MAX_CONNTRACK;
    let mut figures = Vec::new();
    // Two layout changes on every node: a smaller table, then back to the default one.
    for size in [default / 2, default] {
        for i in 0..3 {
            let node = &d.cluster.nodes[i];
            let tracked = dataplane::pinned::map_fill(&d.pins[i].path)
                .into_iter()
                .find(|f| f.map == "conntrack")
                .and_then(|f| f.entries)
                .unwrap_or(0);
            let status = d.agents[i].process.stop(Duration::from_secs(10));
            assert!(status.is_some_and(|s| s.success()));
            let started = Instant::now();
            let flag = size.to_string();
            d.agents[i] = Agent::start(
                node,
                &d.pins[i],
                d.cluster.etcd.as_ref(),
                &["--conntrack-size", &flag],
            );
            wait_ready(node, &mut d.agents[i], Duration::from_secs(30));
            let log = d.agents[i].log_text();
            assert!(
                log.contains("map migrated to its new layout") && log.contains("DP_CONNTRACK"),
                "{log}"
            );
            assert_eq!(conntrack_entries_limit(&d, i), size);
            assert_one_program_per_hook(&d, i);
            figures.push(format!(
                "node-{} to {size} entries ({tracked} tracked) ready in {:?}",
                i + 1,
                started.elapsed()
            ));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let totals = load.finish();
    eprintln!(
        "conntrack resized twice on each node under load: {}; {} requests, {} failed, {} \
         resets, max gap {:?}; {} denied probes, {} got through",
        figures.join(", "),
        totals.requests,
        totals.failed,
        totals.resets,
        totals.max_gap,
        totals.probes,
        totals.violations
    );
    totals.assert_clean("conntrack resize");
    drop(servers);
}

/// The tags (hashes of the instructions) of the TCX programs on `iface` in `ns`.
fn program_tags(ns: &Netns, iface: &str) -> (Vec<u64>, Vec<u64>) {
    programs(ns, iface, aya::programs::ProgramInfo::tag)
}

/// Two upgrades under the same load, node by node as a rolling DaemonSet update does:
/// from this build's programs to a build whose program code differs (the previous local
/// delivery: out of the host veth, policy at its egress hook, rather than straight into
/// the pod's namespace), and back. No request may fail, no connection reset, no probe get
/// through, and each node must end up running the build it was upgraded to.
#[test]
fn root_upgrades_between_two_program_builds_lose_nothing() {
    require_root();
    let variant = ebpf_variant_object();
    let variant_arg = variant.to_str().unwrap().to_owned();
    let (mut d, servers) = start_under_policy();
    let current: Vec<_> = (0..3)
        .map(|i| program_tags(&d.cluster.nodes[i].ns, "eth0"))
        .collect();
    let load = start_load(&d);
    let began = Instant::now();
    let mut k = 0;
    let mut variant_tags = None;
    for (step, extra) in [
        (
            "to the other build",
            vec!["--bpf-object", variant_arg.as_str()],
        ),
        ("back to this build", vec![]),
    ] {
        for (i, current) in current.iter().enumerate() {
            let before = program_tags(&d.cluster.nodes[i].ns, "eth0");
            let t = restart_with(&mut d, i, Restart::Term, k, &extra);
            k += 1;
            let after = program_tags(&d.cluster.nodes[i].ns, "eth0");
            assert_one_program_per_hook(&d, i);
            assert_ne!(
                before,
                after,
                "node-{}: upgrade {step} swapped no code",
                i + 1
            );
            if extra.is_empty() {
                assert_eq!(&after, current, "node-{} runs this build again", i + 1);
            } else {
                assert_eq!(
                    *variant_tags.get_or_insert_with(|| after.clone()),
                    after,
                    "every node runs the same other build"
                );
            }
            eprintln!("upgrade {step}: node-{} ready in {t:?}", i + 1);
            std::thread::sleep(Duration::from_millis(800));
        }
    }
    let took = began.elapsed();
    let totals = load.finish();
    let sink = &servers[4];
    let sunk = stream_received(sink, totals.stream_bytes);
    eprintln!(
        "upgrades: 2 upgrades on 3 nodes in {took:.1?}; {} requests, {} failed, {} resets, \
         max gap {:?}; stream {} MB sent, {} MB received; {} denied probes, {} got through",
        totals.requests,
        totals.failed,
        totals.resets,
        totals.max_gap,
        totals.stream_bytes >> 20,
        sunk >> 20,
        totals.probes,
        totals.violations
    );
    totals.assert_clean("upgrades");
    assert_eq!(sunk, totals.stream_bytes, "the stream lost bytes");
    drop(servers);
}

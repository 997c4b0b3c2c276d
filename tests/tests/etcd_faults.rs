//! etcd faults on a live cluster in a box (needs root; BPF mode). etcd stopped under load:
//! the maps keep enforcing (no request fails, no denied probe gets through), CNI ADD fails
//! fast with code 11 and DEL of a pod it cannot look up fails instead of pretending; once
//! etcd is back, a policy change is in force on every node within 2 s. A node cut off from
//! etcd while the history it missed is compacted: its agent lists again and converges.
//!
//! The outage lasts 12 s by default, 60 s with `DATAPLANE_SOAK=1`.

use std::time::{Duration, Instant};

use dataplane_tests::{
    Agent, Cluster, PinDirGuard,
    cluster::{ETCD_IP, EtcdCluster},
    cni::{Sandbox, cni, dataplane_conf},
    dataplane,
    load::{EXTRA_PORT, LoadServer, PROBE_PORT, echo_ok, soak, start_load, start_under_policy},
    netns::{output, run},
    require_root,
    traffic::Deployment,
    wait_ready,
};

/// Denies TCP to `port` everywhere, ahead of the allow-all policy.
fn deny_port(name: &str, port: u16) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  order: 20\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - {{action: Deny, protocol: TCP, destination: {{ports: [{port}]}}}}\n"
    )
}

/// Allows everything not denied by an earlier policy.
const ALLOW_ALL: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-all}
spec:
  order: 100
  selector: all()
  types: [Ingress]
  ingress:
  - action: Allow
";

/// `dataplane ctl apply -f` (no wait) of `yaml`.
fn apply_no_wait(d: &Deployment, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (st, out, err) = d.ctl(&["apply", "-f", &f.display().to_string()]);
    assert!(st.success(), "apply: {out}{err}");
}

/// For each node, a pod on it and a client pod on another node: (client, target).
const PROBES: [(usize, usize); 3] = [(2, 0), (4, 2), (0, 4)];

/// Waits until `port` of each target in [`PROBES`] answers its client; returns, per node,
/// how long after `since` it first did.
fn time_until_open(d: &Deployment, port: u16, since: Instant, timeout: Duration) -> Vec<Duration> {
    std::thread::scope(|s| {
        let handles: Vec<_> = PROBES
            .iter()
            .map(|&(from, to)| {
                s.spawn(move || {
                    let (ns, ip) = (&d.pods[from].sb.ns, d.pods[to].ip);
                    loop {
                        if echo_ok(ns, ip, port, Duration::from_millis(100)) {
                            return since.elapsed();
                        }
                        assert!(
                            since.elapsed() < timeout,
                            "port {port} of pod {to} ({ip}) still shut after {timeout:?}"
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn shut_everywhere(d: &Deployment, port: u16) -> bool {
    PROBES.iter().all(|&(from, to)| {
        !echo_ok(
            &d.pods[from].sb.ns,
            d.pods[to].ip,
            port,
            Duration::from_millis(300),
        )
    })
}

#[test]
fn root_etcd_outage_under_load_keeps_enforcing_and_converges_on_return() {
    require_root();
    let outage = Duration::from_secs(if soak() { 60 } else { 12 });
    let (mut d, servers) = start_under_policy();
    d.apply(&deny_port("outage-change", EXTRA_PORT));
    assert!(shut_everywhere(&d, EXTRA_PORT));
    // A pod made before the outage, for a DEL during it.
    let etcd_ep = d.cluster.etcd.as_ref().unwrap().endpoint();
    let node = &d.cluster.nodes[0];
    let conf = dataplane_conf("1.0.0", &etcd_ep, &node.name);
    let victim = Sandbox::new(node, "default", "victim");
    let had = d.veths(0);
    cni(node, &d.plugins, "ADD", &victim, &conf).ok();
    let victim_veth = d
        .veths(0)
        .into_iter()
        .find(|v| !had.contains(v))
        .expect("the victim's veth");
    let load = start_load(&d);

    let down_at = Instant::now();
    d.cluster
        .etcd
        .as_mut()
        .unwrap()
        .process
        .stop(Duration::from_secs(5));
    // CNI while etcd is down: ADD fails fast with "try again", DEL of a pod whose endpoint
    // cannot be read fails too, and leaves the pod's veth for the retry.
    let sb = Sandbox::new(node, "default", "during-outage");
    let started = Instant::now();
    let add = cni(node, &d.plugins, "ADD", &sb, &conf);
    let add_took = started.elapsed();
    assert_eq!(add.err_code(), 11, "{add:?}");
    assert!(add_took < Duration::from_secs(6), "ADD took {add_took:?}");
    let started = Instant::now();
    let del = cni(node, &d.plugins, "DEL", &victim, &conf);
    let del_took = started.elapsed();
    assert_eq!(del.err_code(), 11, "{del:?}");
    assert!(
        d.veths(0).contains(&victim_veth),
        "a failed DEL leaves the veth"
    );
    let left = outage.saturating_sub(down_at.elapsed());
    std::thread::sleep(left);

    d.cluster.etcd.as_mut().unwrap().restart();
    let back = Instant::now();
    // The change the operator wanted during the outage: the port opens (the deny moves to
    // another port).
    apply_no_wait(&d, &deny_port("outage-change", EXTRA_PORT + 1));
    let written = back.elapsed();
    let open_after = time_until_open(&d, EXTRA_PORT, back, Duration::from_secs(20));
    let converged = open_after.iter().max().copied().unwrap();
    // Load kept flowing through the outage and the return.
    std::thread::sleep(Duration::from_secs(1));
    let totals = load.finish();
    // CNI works again: the DEL goes through, and a new pod gets an address.
    cni(node, &d.plugins, "DEL", &victim, &conf).ok();
    assert!(!d.veths(0).contains(&victim_veth));
    let r = cni(node, &d.plugins, "ADD", &sb, &conf).ok();
    assert!(r["ips"][0]["address"].is_string());
    cni(node, &d.plugins, "DEL", &sb, &conf).ok();
    eprintln!(
        "etcd outage {outage:?}: ADD failed with code 11 in {add_took:?}, DEL with code 11 in \
         {del_took:?}; {} requests, {} failed, {} resets, max gap {:?}; {} denied probes, {} \
         got through; after etcd's return: change written in {written:?}, in force on the \
         three nodes after {open_after:?} (converged in {converged:?})",
        totals.requests,
        totals.failed,
        totals.resets,
        totals.max_gap,
        totals.probes,
        totals.violations
    );
    totals.assert_clean("etcd outage");
    // The agents picked their watches up where they were, without listing everything again.
    for (i, a) in d.agents.iter().enumerate() {
        let log = a.log_text();
        assert!(log.contains("resuming the watch"), "node-{}:\n{log}", i + 1);
        assert_eq!(
            log.matches("in sync with etcd").count(),
            1,
            "node-{}:\n{log}",
            i + 1
        );
    }
    assert!(
        converged < Duration::from_secs(2),
        "the change took {converged:?} to be in force everywhere"
    );
    assert!(!echo_ok(
        &d.pods[0].sb.ns,
        d.pods[5].ip,
        PROBE_PORT,
        Duration::from_millis(300)
    ));
    drop(servers);
}

/// `etcdctl ARGS…` in etcd's namespace.
fn etcdctl(d: &Deployment, args: &[&str]) -> String {
    let etcd = d.cluster.etcd.as_ref().unwrap();
    run(etcd
        .ns
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint()])
        .args(args))
}

fn etcd_revision(d: &Deployment) -> i64 {
    let out = etcdctl(
        d,
        &[
            "get",
            "/calico/",
            "--prefix",
            "--keys-only",
            "--limit",
            "1",
            "-w",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

/// Blocks (or unblocks) node `i`'s traffic with etcd, in its own namespace.
fn cut_off(d: &Deployment, i: usize, on: bool) {
    let ns = &d.cluster.nodes[i].ns;
    let op = if on { "-I" } else { "-D" };
    let etcd = ETCD_IP.to_string();
    for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
        let out = output(
            ns.command("iptables")
                .args([op, chain, dir, &etcd, "-j", "DROP"]),
        );
        assert!(out.status.success(), "iptables {op} {chain}: {out:?}");
    }
}

fn wait_log(d: &Deployment, i: usize, what: &str, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = d.agents[i].log_text();
        if log.matches(what).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node-{}: {count}× {what:?} not in the agent's log after {timeout:?}:\n{log}",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_a_node_cut_off_while_etcd_compacts_lists_again_and_converges() {
    require_root();
    let d = Deployment::start("CrossSubnet", 1);
    let servers: Vec<LoadServer> = d.pods.iter().map(|p| LoadServer::start(&p.sb.ns)).collect();
    let (client, target) = (&d.pods[0], d.pods[2].ip);
    let open = |port| echo_ok(&client.sb.ns, target, port, Duration::from_millis(300));
    d.apply(&format!(
        "{ALLOW_ALL}---\n{}",
        deny_port("before-cut", PROBE_PORT)
    ));
    assert!(!open(PROBE_PORT) && open(EXTRA_PORT));
    let lists = d.agents[2].log_text().matches("in sync with etcd").count();

    cut_off(&d, 2, true);
    // The agent notices through its status refresh (a partition resets nothing).
    wait_log(
        &d,
        2,
        "datastore sync interrupted",
        1,
        Duration::from_secs(30),
    );
    let (st, out, err) = d.ctl(&["delete", "globalnetworkpolicy", "before-cut"]);
    assert!(st.success(), "{out}{err}");
    apply_no_wait(&d, &deny_port("while-cut", EXTRA_PORT));
    let revision = etcd_revision(&d);
    etcdctl(&d, &["compact", &revision.to_string()]);
    // Node 3's maps still hold the old state.
    assert!(!open(PROBE_PORT) && open(EXTRA_PORT));

    cut_off(&d, 2, false);
    let back = Instant::now();
    wait_log(
        &d,
        2,
        "in sync with etcd",
        lists + 1,
        Duration::from_secs(30),
    );
    let relisted = back.elapsed();
    let log = d.agents[2].log_text();
    assert!(log.contains("compacted at revision"), "{log}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let converged = || open(PROBE_PORT) && !open(EXTRA_PORT);
    while !converged() {
        assert!(
            Instant::now() < deadline,
            "node-3 did not converge after the re-list:\n{log}"
        );
    }
    eprintln!("cut off during a compaction: node-3 listed again {relisted:?} after reconnecting");
    drop(servers);
}

/// Whether node `i`'s routes map has a row for `cidr`.
fn has_route(cluster: &Cluster, pins: &[PinDirGuard], i: usize, cidr: &str) -> bool {
    let dir = pins[i].path.display().to_string();
    let (_, out, _) = dataplane(
        &cluster.nodes[i].ns,
        &["map-dump", "routes", "--json", "--bpffs-dir", &dir],
    );
    let rows: Vec<dataplane::dump::RouteRow> = serde_json::from_str(&out).unwrap_or_default();
    rows.iter().any(|r| r.cidr == cidr)
}

#[test]
fn root_a_three_member_etcd_losing_any_one_member_keeps_agents_and_ctl_in_sync() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 2], false);
    let mut etcd = EtcdCluster::start(&cluster.fabric, 3);
    let endpoints = etcd.endpoints();
    let pins: Vec<PinDirGuard> = cluster.nodes.iter().map(|_| PinDirGuard::new()).collect();
    let mut agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .zip(&pins)
        .map(|(n, p)| Agent::start(n, p, None, &["--etcd-endpoints", &endpoints]))
        .collect();
    for (n, a) in cluster.nodes.iter().zip(agents.iter_mut()) {
        wait_ready(n, a, Duration::from_secs(30));
    }
    let dir = tempfile::tempdir().unwrap();
    // ctl with every member's endpoint; --wait: in force on the three nodes.
    let apply_pool = |cidr: &str| -> (String, Duration) {
        let f = dir.path().join("pool.yaml");
        let name = format!("pool-{}", cidr.replace(['.', '/'], "-"));
        std::fs::write(
            &f,
            format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, ipipMode: Always}}\n"),
        )
        .unwrap();
        let started = Instant::now();
        let (st, out, err) = dataplane(
            &cluster.nodes[0].ns,
            &[
                "ctl",
                "--etcd-endpoints",
                &endpoints,
                "apply",
                "--wait",
                "-f",
                &f.display().to_string(),
            ],
        );
        assert!(st.success(), "apply {cidr}: {out}{err}");
        (out, started.elapsed())
    };
    let in_maps = |cidr: &str, agents: &[Agent]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, agent) in agents.iter().enumerate() {
            while !has_route(&cluster, &pins, i, cidr) {
                assert!(
                    Instant::now() < deadline,
                    "node-{}: no route for {cidr}:\n{}",
                    i + 1,
                    agent.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let (out, _) = apply_pool("10.70.0.0/16");
    assert!(out.contains("in force on 3 nodes"), "{out}");
    in_maps("10.70.0.0/16", &agents);
    let mut figures = Vec::new();
    for k in 0..etcd.members.len() {
        etcd.members[k].process.stop(Duration::from_secs(5));
        let cidr = format!("10.{}.0.0/16", 71 + k);
        let (out, took) = apply_pool(&cidr);
        assert!(
            out.contains("in force on 3 nodes"),
            "member {k} down: {out}"
        );
        in_maps(&cidr, &agents);
        figures.push(format!(
            "etcd{k} down: in force on 3 nodes {took:?} after ctl started"
        ));
        etcd.members[k].restart();
    }
    // Every node still carries every pool: nothing was missed along the way.
    for k in 0..4 {
        in_maps(&format!("10.{}.0.0/16", 70 + k), &agents);
    }
    for a in &mut agents {
        assert!(a.process.exited().is_none(), "{}", a.log_text());
    }
    eprintln!("3-member etcd: {}", figures.join("; "));
}

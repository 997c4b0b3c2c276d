//! etcd restored from an older snapshot under a live cluster in a box (needs root; BPF mode).
//! The agents resumed their watches from the revision they had programmed; etcd's history
//! now ends below it. Each agent must notice (an error in its log, a metric), list again and
//! converge on what etcd holds now (a policy deleted after the snapshot is back in force),
//! keep the local pod etcd lost while its veth exists (it is running), release it once the
//! pod is deleted, and `ctl apply --wait` must work on the restored revisions. An etcd wiped
//! and recreated whose revision climbed past the agent's while the agent was away (same
//! cluster id) is noticed by the agent's own status key being gone.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use dataplane::datastore::{Datastore, EtcdConfig, runtime};
use dataplane_tests::{
    Agent, Cluster, PinDirGuard,
    cluster::{Node, http_get},
    cni::{Sandbox, cni, dataplane_conf, result_ip},
    dataplane,
    load::{EXTRA_PORT, LoadServer, PROBE_PORT, RR_PORT, echo_ok},
    require_root,
    traffic::Deployment,
    wait_ready,
};

const DENY_EXTRA: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-extra}
spec:
  order: 10
  selector: all()
  types: [Ingress]
  ingress:
  - {action: Deny, protocol: TCP, destination: {ports: [7400]}}
";

/// Allows everything not denied by an earlier policy (a policy that selects an endpoint
/// denies what it does not allow).
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

const DENY_PROBE: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-probe}
spec:
  order: 10
  selector: all()
  types: [Ingress]
  ingress:
  - {action: Deny, protocol: TCP, destination: {ports: [7300]}}
";

/// The value of the unlabelled metric `name` on `node`'s agent (metrics on 9091).
fn metric(node: &Node, name: &str) -> Option<f64> {
    let text = node
        .ns
        .run(|| http_get(Ipv4Addr::LOCALHOST, 9091, "/metrics"))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `cond` holds, panicking with `what` after `timeout`; returns how long it took.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn root_etcd_restored_from_an_older_snapshot_is_noticed_and_the_maps_follow_it() {
    require_root();
    let mut d = Deployment::start("CrossSubnet", 1);
    let _servers: Vec<LoadServer> = d.pods.iter().map(|p| LoadServer::start(&p.sb.ns)).collect();
    // Client → target across nodes (node 2 is behind the router).
    let pairs = [(2, 0), (0, 1), (1, 2)];
    let open = |port: u16, d: &Deployment| {
        pairs
            .iter()
            .all(|&(c, t)| echo_ok(&d.pods[c].sb.ns, d.pods[t].ip, port, Duration::from_secs(2)))
    };
    let shut = |port: u16, d: &Deployment| {
        pairs
            .iter()
            .all(|&(c, t)| !echo_ok(&d.pods[c].sb.ns, d.pods[t].ip, port, SHORT))
    };

    // What the snapshot holds: TCP to EXTRA_PORT denied.
    d.apply(&format!("{ALLOW_ALL}---\n{DENY_EXTRA}"));
    assert!(shut(EXTRA_PORT, &d) && open(RR_PORT, &d));
    let backup = tempfile::tempdir().unwrap();
    let snap = backup.path().join("etcd.db");
    d.cluster.etcd.as_ref().unwrap().snapshot_save(&snap);

    // After it: the policy is deleted, and a pod is made on node 0.
    let (st, out, err) = d.ctl(&["delete", "globalnetworkpolicy", "deny-extra"]);
    assert!(st.success(), "{out}{err}");
    wait_for("deny-extra lifted", Duration::from_secs(10), || {
        open(EXTRA_PORT, &d)
    });
    let node0 = &d.cluster.nodes[0];
    let etcd_ep = d.cluster.etcd.as_ref().unwrap().endpoint();
    let late = Sandbox::new(node0, "default", "late");
    let conf = dataplane_conf("1.0.0", &etcd_ep, &node0.name);
    let late_ip = result_ip(&cni(node0, &d.plugins, "ADD", &late, &conf).ok());
    let _late_server = LoadServer::start(&late.ns);
    wait_for("the late pod reachable", Duration::from_secs(10), || {
        echo_ok(&d.pods[0].sb.ns, late_ip, RR_PORT, SHORT)
            && echo_ok(&d.pods[2].sb.ns, late_ip, RR_PORT, SHORT)
    });
    let programmed: Vec<f64> = d
        .cluster
        .nodes
        .iter()
        .map(|n| metric(n, "dataplane_sync_revision_programmed").unwrap())
        .collect();
    for n in &d.cluster.nodes {
        assert_eq!(metric(n, "dataplane_etcd_regressions_total"), Some(0.0));
    }

    // etcd restored from the snapshot: its history ends below what every agent programmed.
    let restored_at = Instant::now();
    d.cluster.etcd.as_mut().unwrap().restore(&snap);
    let noticed = d
        .cluster
        .nodes
        .iter()
        .map(|n| {
            wait_for(
                &format!("{}: regression counted", n.name),
                Duration::from_secs(20),
                || metric(n, "dataplane_etcd_regressions_total") == Some(1.0),
            );
            restored_at.elapsed()
        })
        .collect::<Vec<_>>();
    for (i, a) in d.agents.iter().enumerate() {
        let log = a.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("etcd's data went back"))
            .unwrap_or_else(|| panic!("node {i}: no regression logged:\n{log}"));
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            line.contains(&format!(
                "maps were programmed up to revision {}",
                programmed[i]
            )),
            "node {i}: {line}"
        );
        let now = metric(&d.cluster.nodes[i], "dataplane_sync_revision_programmed").unwrap();
        assert!(
            now < programmed[i],
            "node {i}: programmed {now}, was {}",
            programmed[i]
        );
    }
    // The maps follow etcd: the deleted policy is back in force on every node.
    let converged = wait_for("deny-extra back in force", Duration::from_secs(10), || {
        shut(EXTRA_PORT, &d)
    });
    assert!(open(RR_PORT, &d), "the rest still flows");
    // The late pod is unknown to etcd but runs: kept on node 0, reachable as before.
    assert_eq!(metric(node0, "dataplane_sync_held_endpoints"), Some(1.0));
    for n in &d.cluster.nodes[1..] {
        assert_eq!(metric(n, "dataplane_sync_held_endpoints"), Some(0.0));
    }
    assert!(d.map_dump(0, "endpoints").contains(&late_ip.to_string()));
    assert!(echo_ok(
        &d.pods[0].sb.ns,
        late_ip,
        RR_PORT,
        Duration::from_secs(2)
    ));
    assert!(echo_ok(
        &d.pods[2].sb.ns,
        late_ip,
        RR_PORT,
        Duration::from_secs(2)
    ));
    assert!(
        d.agents[0]
            .log_text()
            .contains("etcd lost this local endpoint but its veth exists"),
    );

    // ctl apply --wait on the restored history: returns once every node has it in force.
    let t = Instant::now();
    d.apply(DENY_PROBE);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "apply --wait took {waited:?}"
    );
    assert!(shut(PROBE_PORT, &d), "in force when --wait returned");
    let (st, out, err) = d.ctl(&["node", "status", "-o", "json"]);
    assert!(st.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let etcd_rev = report["etcdRevision"].as_i64().unwrap();
    for n in report["nodes"].as_array().unwrap() {
        let Some(rev) = n["agent"]["revision"].as_i64() else {
            continue;
        };
        assert!(rev <= etcd_rev, "{n}: a revision past etcd's {etcd_rev}");
    }

    // The pod is deleted: its veth goes and node 0 releases it.
    cni(node0, &d.plugins, "DEL", &late, &conf).ok();
    let released = wait_for("the late pod released", Duration::from_secs(15), || {
        metric(node0, "dataplane_sync_held_endpoints") == Some(0.0)
    });
    assert!(!d.map_dump(0, "endpoints").contains(&late_ip.to_string()));
    assert!(
        !d.map_dump(0, "routes").contains(&format!("{late_ip}/32")),
        "{}",
        d.map_dump(0, "routes")
    );
    eprintln!(
        "regression noticed {noticed:?} after the restore; deny-extra back in force {converged:?} \
         after the last; apply --wait {waited:?}; held pod released {released:?} after its DEL"
    );
    d.agents.clear();
}

/// `map-dump routes` of node 0.
fn routes(cluster: &Cluster, pins: &PinDirGuard) -> String {
    let dir = pins.path.display().to_string();
    dataplane(
        &cluster.nodes[0].ns,
        &["map-dump", "routes", "--bpffs-dir", &dir],
    )
    .1
}

fn apply_pool(cluster: &Cluster, name: &str, cidr: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pool.yaml");
    std::fs::write(
        &f,
        format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}}}\n"),
    )
    .unwrap();
    let etcd = cluster.etcd.as_ref().unwrap().endpoint();
    let (st, out, err) = dataplane(
        &cluster.nodes[0].ns,
        &[
            "ctl",
            "--etcd-endpoints",
            &etcd,
            "apply",
            "-f",
            &f.display().to_string(),
        ],
    );
    assert!(st.success(), "{out}{err}");
}

#[test]
fn root_etcd_wiped_and_refilled_past_the_agents_revision_is_noticed_by_its_status_key() {
    require_root();
    let mut cluster = Cluster::new(&[1], true);
    apply_pool(&cluster, "old", "10.65.0.0/16");
    let pins = PinDirGuard::new();
    let node = &cluster.nodes[0];
    let mut agent = Agent::start(node, &pins, cluster.etcd.as_ref(), &[]);
    wait_ready(node, &mut agent, Duration::from_secs(20));
    wait_for("the old pool's route", Duration::from_secs(10), || {
        routes(&cluster, &pins).contains("10.65.0.0/16")
    });
    // Its status is written at least once (the record the check compares with).
    wait_for("a status", Duration::from_secs(10), || {
        metric(node, "dataplane_sync_revision_programmed").is_some_and(|r| r > 0.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let programmed = metric(node, "dataplane_sync_revision_programmed").unwrap() as i64;

    // The agent is frozen while etcd is wiped and written past its revision: when it comes
    // back, etcd's revision and cluster id look fine.
    let pid = nix::unistd::Pid::from_raw(agent.process.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.etcd.as_mut().unwrap().wipe();
        apply_pool(&cluster, "new", "10.66.0.0/16");
        let cfg = EtcdConfig {
            endpoints: vec![cluster.etcd.as_ref().unwrap().endpoint()],
            ..EtcdConfig::default()
        };
        let now = cluster.nodes[0].ns.run(move || {
            runtime().unwrap().block_on(async {
                let ds = Datastore::connect(&cfg).await.unwrap();
                let mut rev = 0;
                for i in 0..=programmed + 5 {
                    rev = ds.put_raw_rev(&format!("/filler/{i}"), "x").await.unwrap();
                }
                rev
            })
        });
        assert!(now > programmed, "etcd at {now}, the agent at {programmed}");
    }));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    if let Err(p) = resumed {
        std::panic::resume_unwind(p);
    }
    let node = &cluster.nodes[0];
    let took = wait_for("regression counted", Duration::from_secs(20), || {
        metric(node, "dataplane_etcd_regressions_total") == Some(1.0)
    });
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("etcd's data went back")
            && l.contains("/dataplane/v1/status/node-1 is gone")),
        "{log}"
    );
    wait_for(
        "the maps follow the new etcd",
        Duration::from_secs(10),
        || {
            let r = routes(&cluster, &pins);
            r.contains("10.66.0.0/16") && !r.contains("10.65.0.0/16")
        },
    );
    eprintln!("wiped etcd noticed {took:?} after the agent resumed");
}

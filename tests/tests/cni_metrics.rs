//! The CNI latency histogram (needs root): real ADD and DEL through the `dataplane` binary
//! against a running agent; each operation reaches the agent's
//! `dataplane_cni_operation_duration_seconds{command,result}` exactly once, failures under
//! their CNI error code; with no agent listening the plugin works as before.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use dataplane_tests::{
    Agent, Cluster, PinDirGuard,
    cluster::{Node, http_get},
    cni::{Call, PluginDir, Sandbox, cni, dataplane_conf, exec_plugin},
    require_root, wait_ready,
};

/// `dataplane_cni_operation_duration_seconds_count{command,result}` on `node`'s agent.
fn count(node: &Node, command: &str, result: &str) -> u64 {
    let text = node
        .ns
        .run(|| http_get(Ipv4Addr::LOCALHOST, 9091, "/metrics"))
        .unwrap();
    let prefix = format!(
        "dataplane_cni_operation_duration_seconds_count{{command=\"{command}\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

fn wait_count(node: &Node, command: &str, result: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count(node, command, result);
        if n == want {
            return;
        }
        assert!(
            n < want && Instant::now() < deadline,
            "{command} {result}: {n} recorded, want {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn root_cni_operations_are_counted_once_each_in_the_agents_histogram() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let etcd = cluster.etcd.as_ref().unwrap().endpoint();
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.65.0.0/16}\n",
    )
    .unwrap();
    let (st, _, err) = dataplane_tests::dataplane(
        &node.ns,
        &[
            "ctl",
            "--etcd-endpoints",
            &etcd,
            "apply",
            "-f",
            &pool.display().to_string(),
        ],
    );
    assert!(st.success(), "{err}");
    let socket = dir.path().join("cni-metrics.sock");
    let socket_arg = socket.display().to_string();
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(
        node,
        &pins,
        cluster.etcd.as_ref(),
        &["--cni-metrics-socket", &socket_arg],
    );
    wait_ready(node, &mut agent, Duration::from_secs(20));
    let plugins = PluginDir::new();
    let mut conf = dataplane_conf("1.0.0", &etcd, &node.name);
    conf["metrics_socket"] = socket_arg.clone().into();
    assert_eq!(count(node, "ADD", "ok"), 0);

    let pods: Vec<Sandbox> = (0..3)
        .map(|i| Sandbox::new(node, "default", &format!("m{i}")))
        .collect();
    for (i, sb) in pods.iter().enumerate() {
        cni(node, &plugins, "ADD", sb, &conf).ok();
        wait_count(node, "ADD", "ok", i as u64 + 1);
    }
    // A failing ADD: its pod namespace does not exist.
    let bad = Sandbox::new(node, "default", "bad");
    let out = exec_plugin(
        node,
        &plugins,
        &bad,
        &conf,
        Call {
            netns: Some("/var/run/netns/does-not-exist"),
            ..Call::new("dataplane", "ADD")
        },
    );
    let code = out.err_code();
    wait_count(node, "ADD", &code.to_string(), 1);
    for (i, sb) in pods.iter().enumerate() {
        cni(node, &plugins, "DEL", sb, &conf).ok();
        wait_count(node, "DEL", "ok", i as u64 + 1);
    }
    // Exactly once each: nothing more arrives late.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(node, "ADD", "ok"), 3);
    assert_eq!(count(node, "DEL", "ok"), 3);
    assert_eq!(count(node, "ADD", &code.to_string()), 1);
    let text = node
        .ns
        .run(|| http_get(Ipv4Addr::LOCALHOST, 9091, "/metrics"))
        .unwrap();
    assert!(
        text.contains("# TYPE dataplane_cni_operation_duration_seconds histogram"),
        "{text}"
    );
    let sum: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "dataplane_cni_operation_duration_seconds_sum{command=\"ADD\",result=\"ok\"} ",
            )?
            .parse()
            .ok()
        })
        .unwrap();
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    assert!(
        text.contains(
            "dataplane_cni_operation_duration_seconds_bucket{le=\"+Inf\",command=\"DEL\",result=\"ok\"} 3"
        ) || text.contains(
            "dataplane_cni_operation_duration_seconds_bucket{command=\"DEL\",result=\"ok\",le=\"+Inf\"} 3"
        ),
        "{text}"
    );

    // No agent: the plugin works as before (nothing listens, nothing waits).
    agent.process.stop(Duration::from_secs(10));
    // (Its status stays live for 30 s: do not wait for a policy it will not program.)
    conf["policy_wait_ms"] = 0.into();
    let sb = Sandbox::new(node, "default", "after");
    let t = Instant::now();
    cni(node, &plugins, "ADD", &sb, &conf).ok();
    cni(node, &plugins, "DEL", &sb, &conf).ok();
    eprintln!(
        "ADD + DEL with no agent listening: {:?}; ADD latency sum over 3: {sum:.3} s",
        t.elapsed()
    );
}

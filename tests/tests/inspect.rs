//! Operating the dataplane from outside: the agent's health and Prometheus endpoints scraped
//! over HTTP inside its node's namespace (readiness across the first sync and an etcd
//! outage), `ctl node status` against a live cluster, shell completions and `--help`.
//! Tests named `root_*` need root (namespaces, BPF, a real etcd).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use dataplane::datastore::{Datastore, EtcdConfig, IpPool, IpPoolSpec, Node, keys, runtime};
use dataplane::ipam::{AssignRequest, Ipam, IpamConfig};
use dataplane_tests::{
    Agent, Cluster, Etcd, Netns, PinDirGuard, dataplane, dataplane_bin, require_root, wait_attached,
};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
const HEALTH_PORT: u16 = 9099;
const METRICS_PORT: u16 = 9091;

/// `GET path` on 127.0.0.1:`port` inside `ns`: (status code, body), or `None` when nothing
/// answers.
fn get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    ns.run(|| {
        let mut s = std::net::TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_secs(1),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    })
}

fn code(ns: &Netns, path: &str) -> Option<u16> {
    get(ns, HEALTH_PORT, path).map(|(c, _)| c)
}

/// Polls `path` until it answers `want`, asserting liveness 200 at every step; panics with
/// the agent's log after `timeout`. Returns how long it took.
fn wait_for_code(ns: &Netns, path: &str, want: u16, timeout: Duration, agent: &Agent) -> Duration {
    let start = Instant::now();
    loop {
        let got = get(ns, HEALTH_PORT, path);
        if got.as_ref().is_some_and(|(c, _)| *c == want) {
            return start.elapsed();
        }
        assert_eq!(
            code(ns, "/liveness"),
            Some(200),
            "liveness while waiting for {path} {want}:\n{}",
            agent.log_text()
        );
        assert!(
            start.elapsed() < timeout,
            "{path} still {got:?} after {timeout:?}, want {want}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (0.0.4) strictly enough to catch a malformed
/// exposition: every sample belongs to a family declared by a `# TYPE` line before it, names
/// and label names are valid, label values are quoted, values are numbers.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(valid_name(name), "bad family name in {line:?}");
            if kind == "TYPE" {
                let t = words.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{line:?}"
                );
                types.insert(name.to_owned(), t.to_owned());
            } else {
                assert_eq!(kind, "HELP", "{line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"));
                let mut labels = BTreeMap::new();
                // Our label values hold no commas or quotes, so a simple split does.
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                    assert!(valid_name(k), "label name in {line:?}");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label value in {line:?}"));
                    labels.insert(k.to_owned(), v.to_owned());
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample {name} before its # TYPE line"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the one sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = samples.iter().filter(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    });
    let first = found.next()?;
    assert!(found.next().is_none(), "several {name} {labels:?}");
    Some(first.value)
}

fn scrape(ns: &Netns) -> Vec<Sample> {
    let (c, body) = get(ns, METRICS_PORT, "/metrics").expect("metrics endpoint answers");
    assert_eq!(c, 200, "{body}");
    parse_prometheus(&body)
}

/// Starts etcd again in its namespace on its data dir (after `process.stop`), and waits until
/// it is healthy.
fn restart_etcd(etcd: &mut Etcd) {
    etcd.restart();
}

#[test]
fn root_health_and_metrics_over_http_follow_the_sync_and_an_etcd_outage() {
    require_root();
    let mut cluster = Cluster::new(&[1], true);
    let mut etcd = cluster.etcd.take().unwrap();
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    // etcd is away when the agent starts: it attaches, is live, and is not ready until its
    // first sync.
    etcd.process.stop(Duration::from_secs(5));
    let mut agent = Agent::start(node, &pins, Some(&etcd), &["--readiness-grace", "2"]);
    wait_attached(&node.ns, "eth0", &mut agent, ATTACH_TIMEOUT);
    wait_for_code(&node.ns, "/liveness", 200, ATTACH_TIMEOUT, &agent);
    let (c, body) = get(&node.ns, HEALTH_PORT, "/readiness").unwrap();
    assert_eq!(
        (c, body.trim()),
        (503, "not ready: waiting for the first sync from etcd")
    );
    assert_eq!(code(&node.ns, "/nothing-here"), Some(404));
    let before = scrape(&node.ns);
    assert_eq!(value(&before, "dataplane_ready", &[]), Some(0.0));
    assert_eq!(
        value(&before, "dataplane_sync_revision_programmed", &[]),
        Some(0.0)
    );

    restart_etcd(&mut etcd);
    let took = wait_for_code(&node.ns, "/readiness", 200, Duration::from_secs(20), &agent);
    eprintln!("ready {took:?} after etcd came up");

    // The metrics: map fill, sync, reconcile durations, and packet counters that count.
    let m = scrape(&node.ns);
    assert_eq!(value(&m, "dataplane_ready", &[]), Some(1.0));
    assert!(value(&m, "dataplane_sync_revision_programmed", &[]).unwrap() > 0.0);
    assert!(value(&m, "dataplane_sync_lag_revisions", &[]).is_some());
    assert!(
        value(
            &m,
            "dataplane_reconcile_duration_seconds_count",
            &[("sync", "full")]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        value(&m, "dataplane_map_max_entries", &[("map", "conntrack")]),
        Some(f64::from(dataplane_common::MAX_CONNTRACK))
    );
    // The node registered itself: its own address is a route.
    assert!(value(&m, "dataplane_map_entries", &[("map", "routes")]).unwrap() >= 1.0);
    assert_eq!(value(&m, "dataplane_attached_interfaces", &[]), Some(1.0));
    let eth0_in = [("iface", "eth0"), ("hook", "host-ingress")];
    let before = value(&m, "dataplane_packets_total", &eth0_in).unwrap();
    assert!(value(&m, "dataplane_bytes_total", &eth0_in).unwrap() > 0.0);
    assert!(m.iter().any(|s| s.name == "dataplane_packet_outcomes_total"
        && s.labels.get("outcome").is_some_and(|o| o == "passed")));
    assert!(
        dataplane_tests::cluster::ns_command_ok(
            &etcd.ns,
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "1", &node.ip.to_string()]
        ),
        "node answers ping"
    );
    let after = value(&scrape(&node.ns), "dataplane_packets_total", &eth0_in).unwrap();
    assert!(after >= before + 3.0, "{before} → {after}");

    // A pod wired by hand has no endpoint in etcd: its packets are dropped, and the drop
    // shows under its interface with the reason.
    let pod = node.add_pod(Ipv4Addr::new(10, 65, 0, 2));
    wait_attached(&node.ns, &pod.host_iface, &mut agent, ATTACH_TIMEOUT);
    assert!(
        !dataplane_tests::cluster::ns_command_ok(
            &pod.ns,
            "ping",
            &["-c", "2", "-i", "0.2", "-W", "1", &node.ip.to_string()]
        ),
        "an unprogrammed pod's ping must be dropped"
    );
    let m = scrape(&node.ns);
    let dropped = [
        ("iface", pod.host_iface.as_str()),
        ("hook", "from-workload"),
        ("reason", "no_endpoint"),
    ];
    assert!(value(&m, "dataplane_drops_total", &dropped).unwrap_or(0.0) >= 2.0);
    assert_eq!(value(&m, "dataplane_attached_interfaces", &[]), Some(2.0));

    // etcd gone: still ready within the grace, not ready after it, live throughout.
    let stopping = Instant::now();
    etcd.process.stop(Duration::from_secs(5));
    if stopping.elapsed() < Duration::from_millis(1500) {
        assert_eq!(code(&node.ns, "/readiness"), Some(200), "within the grace");
    }
    wait_for_code(&node.ns, "/readiness", 503, Duration::from_secs(15), &agent);
    assert!(
        stopping.elapsed() >= Duration::from_millis(1900),
        "not ready already after {:?} (grace 2 s)",
        stopping.elapsed()
    );
    let (_, body) = get(&node.ns, HEALTH_PORT, "/readiness").unwrap();
    assert!(body.contains("etcd unreachable"), "{body}");
    let down = scrape(&node.ns);
    assert_eq!(value(&down, "dataplane_ready", &[]), Some(0.0));
    assert!(value(&down, "dataplane_etcd_reconnects_total", &[]).unwrap() >= 1.0);

    // etcd back: ready again.
    restart_etcd(&mut etcd);
    let took = wait_for_code(&node.ns, "/readiness", 200, Duration::from_secs(20), &agent);
    eprintln!("ready again {took:?} after etcd came back");
    assert_eq!(code(&node.ns, "/liveness"), Some(200));
    assert!(
        agent.process.exited().is_none(),
        "agent died:\n{}",
        agent.log_text()
    );
}

fn etcd_config(cluster: &Cluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![cluster.etcd.as_ref().unwrap().endpoint()],
        ..EtcdConfig::default()
    }
}

/// `dataplane ctl node status ARGS…` on node 0, against the cluster's etcd.
fn node_status(cluster: &Cluster, args: &[&str]) -> String {
    let etcd = cluster.etcd.as_ref().unwrap().endpoint();
    let mut all = vec!["ctl", "--etcd-endpoints", &etcd, "node", "status"];
    all.extend_from_slice(args);
    let (st, out, err) = dataplane(&cluster.nodes[0].ns, &all);
    assert!(st.success(), "{all:?}: {err}");
    out
}

#[test]
fn root_ctl_node_status_shows_the_live_node_with_its_revision_in_table_and_json() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(
        node,
        &pins,
        cluster.etcd.as_ref(),
        &["--log-format", "json", "--metrics-listen", "0.0.0.0:9099"],
    );
    wait_attached(&node.ns, "eth0", &mut agent, ATTACH_TIMEOUT);
    wait_for_code(&node.ns, "/readiness", 200, ATTACH_TIMEOUT, &agent);
    // Metrics share the health port when given the same address; 9091 serves nothing.
    assert_eq!(
        get(&node.ns, HEALTH_PORT, "/metrics").map(|(c, _)| c),
        Some(200)
    );
    assert_eq!(get(&node.ns, METRICS_PORT, "/metrics"), None);
    // Its logs: one JSON object per line.
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "agent ready"),
        "{log}"
    );

    // A block affine to this node (through the real IPAM), and a second node without agent.
    let cfg = etcd_config(&cluster);
    let ip = node.ns.run(move || {
        runtime().unwrap().block_on(async {
            let ds = Datastore::connect(&cfg).await.unwrap();
            let pool = IpPool::new("pool", IpPoolSpec::new("10.65.0.0/16".parse().unwrap(), 26));
            assert!(ds.create(&keys::ip_pool("pool"), &pool).await.unwrap());
            ds.put_node(&Node::new(
                "node-2",
                Some("192.168.1.11/24".parse().unwrap()),
            ))
            .await
            .unwrap();
            let req = AssignRequest {
                node: "node-1".to_owned(),
                handle_id: "h1".to_owned(),
                attrs: BTreeMap::new(),
                pools: None,
            };
            let cfg = IpamConfig {
                strict_affinity: false,
                max_retries: 100,
            };
            Ipam::new(&ds, cfg).auto_assign(&req).await.unwrap()
        })
    });
    let block = format!("{}/26", Ipv4Addr::from(u32::from(ip) & !63));

    let dir = pins.path.display().to_string();
    let args = ["--node", "node-1", "--bpffs-dir", dir.as_str()];
    // The agent programs the pool and the new node; wait for its report to catch up.
    let deadline = Instant::now() + Duration::from_secs(15);
    let report = loop {
        let out = node_status(&cluster, &[&args[..], &["-o", "json"]].concat());
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let routes = v["nodes"][0]["local"]["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["map"] == "routes"))
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or(0);
        // Own host, node-2's host, the pool.
        if routes >= 3 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "not programmed: {out}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    let etcd_rev = report["etcdRevision"].as_i64().unwrap();
    assert_eq!(report["thisNode"], "node-1");
    let n1 = &report["nodes"][0];
    assert_eq!(n1["name"], "node-1");
    assert_eq!(n1["thisNode"], true);
    assert_eq!(n1["address"], "192.168.1.10");
    assert_eq!(n1["subnet"], "192.168.1.0/24");
    assert_eq!(n1["blocks"], serde_json::json!([block]));
    let agent_status = &n1["agent"];
    assert_eq!(agent_status["live"], true);
    let rev = agent_status["revision"].as_i64().unwrap();
    assert!(rev > 0 && rev <= etcd_rev, "{agent_status}");
    assert_eq!(agent_status["lag"].as_i64().unwrap(), etcd_rev - rev);
    let local = &n1["local"];
    assert!(local["error"].is_null(), "{local}");
    assert_eq!(
        local["attachedInterfaces"],
        serde_json::json!([{"ifindex": node.ns.ifindex("eth0"), "name": "eth0", "hooks": ["ingress", "egress"]}])
    );
    let maps = local["maps"].as_array().unwrap();
    let names: Vec<&str> = maps.iter().map(|m| m["map"].as_str().unwrap()).collect();
    // Every pinned map the agent owns, in the order node status lists them.
    let expected: Vec<&str> = dataplane::pinned::FILLED_MAPS
        .iter()
        .map(|(label, _, _)| *label)
        .collect();
    assert_eq!(names, expected);
    assert!(names.contains(&"conntrack") && names.contains(&"policy_port_exact"));
    assert!(maps.iter().all(|m| m["maxEntries"].as_u64().unwrap() > 0));
    assert_eq!(
        maps.iter().find(|m| m["map"] == "nodes").unwrap()["entries"],
        1,
        "node-2"
    );
    let n2 = &report["nodes"][1];
    assert_eq!(n2["name"], "node-2");
    assert_eq!(n2["thisNode"], false);
    assert_eq!(n2["address"], "192.168.1.11");
    assert!(n2["agent"].is_null() && n2["local"].is_null(), "{n2}");
    assert_eq!(report["nodes"].as_array().unwrap().len(), 2);

    let table = node_status(&cluster, &args);
    eprintln!("{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert!(table.starts_with("NODE "), "{table}");
    let row = line("node-1 *");
    assert_eq!(
        row[2..6],
        ["192.168.1.10", "192.168.1.0/24", block.as_str(), "alive"]
    );
    let shown: i64 = row[6].parse().unwrap();
    assert!(shown >= rev, "{table}");
    let row = line("node-2");
    assert_eq!(
        row[1..],
        ["192.168.1.11", "192.168.1.0/24", "-", "-", "-", "-", "-"]
    );
    assert!(
        table.contains("attached interfaces:") && table.contains("eth0"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("routes ")),
        "{table}"
    );

    // No pins here: the etcd part still prints, the local part says why it is missing.
    let table = node_status(
        &cluster,
        &["--node", "node-1", "--bpffs-dir", "/nonexistent/dp"],
    );
    assert!(
        table.contains("not readable") && table.contains("node-2"),
        "{table}"
    );
}

/// Runs the binary (no namespace needed) and returns its stdout; panics on failure.
fn run_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(dataplane_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_each_shell_and_help_with_examples_for_every_subcommand() {
    let bash = run_ok(&["completions", "bash"]);
    assert!(
        bash.contains("map-dump") && bash.contains("complete"),
        "{bash}"
    );
    for shell in ["zsh", "fish"] {
        let script = run_ok(&["completions", shell]);
        assert!(script.contains("map-dump"), "{shell}: {script}");
    }
    for cmd in [
        &[][..],
        &["agent"],
        &["map-dump"],
        &["ctl"],
        &["ctl", "apply"],
        &["ctl", "get"],
        &["ctl", "delete"],
        &["ctl", "ipam"],
        &["ctl", "ipam", "show"],
        &["ctl", "node"],
        &["ctl", "node", "status"],
        &["completions"],
    ] {
        let help = run_ok(&[cmd, &["--help"]].concat());
        assert!(
            help.contains("Example"),
            "{cmd:?} --help has no example:\n{help}"
        );
        let example = format!("dataplane {}", cmd.join(" "));
        assert!(
            help.contains(example.trim()),
            "{cmd:?}: no example of itself:\n{help}"
        );
    }
}

/// `map-dump ARGS…` on node `i` of `d`: (success, stdout, stderr).
fn map_dump(
    d: &dataplane_tests::traffic::Deployment,
    i: usize,
    args: &[&str],
) -> (bool, String, String) {
    let dir = d.pins[i].path.display().to_string();
    let mut all = vec!["map-dump"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--bpffs-dir", &dir]);
    let (st, out, err) = dataplane(&d.cluster.nodes[i].ns, &all);
    (st.success(), out, err)
}

/// Parses `map-dump … --json` output as `T`, and checks that `T` serializes back to the
/// same JSON (nothing the tool prints is lost or renamed in the typed form).
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(text: &str) -> T {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(serde_json::to_value(&t).unwrap(), v, "JSON round trip");
    t
}

#[test]
fn root_map_dump_shows_rule_hits_one_endpoint_and_filtered_conntrack() {
    use dataplane::dump::{AddressSetDump, ConntrackRow, ConntrackStats, PolicyDump};
    use dataplane_tests::traffic::{Deployment, ECHO_PORT, Servers, tcp_probe, udp_echo};
    require_root();
    // Pods 0 (client) on node 0, 1 (other) on node 1, 2 (web) on node 2.
    let mut d = Deployment::start_with_dataplane("bpf", "CrossSubnet", 1);
    let _servers: Vec<Servers> = d.pods.iter().map(Servers::start).collect();
    let mut labels = String::new();
    for (p, role) in d.pods.iter().zip(["client", "other", "web"]) {
        labels.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: {role}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.sb.pod
        ));
    }
    d.apply(&labels);
    d.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: web-in, namespace: default}}\nspec:\n  selector: role == 'web'\n  types: [Ingress]\n  ingress:\n  - {{action: Deny, protocol: UDP}}\n  - {{action: Allow, protocol: TCP, source: {{selector: role == 'client'}}, destination: {{ports: [{ECHO_PORT}]}}}}\n"
    ));
    let (web, web_node) = (&d.pods[2], d.pods[2].node);
    let pod_name = format!("default/{}", web.sb.pod);
    let policy = |args: &[&str]| -> PolicyDump {
        let (ok, out, err) = map_dump(&d, web_node, &[&["policy"][..], args, &["--json"]].concat());
        assert!(ok, "{err}");
        round_trip(&out)
    };
    let before = policy(&[&pod_name]);
    let ep = before.endpoint.clone().expect("the selected endpoint");
    assert_eq!(
        (ep.pod.as_deref(), ep.ip.as_str()),
        (Some(pod_name.as_str()), web.ip.to_string().as_str())
    );
    assert!(ep.ingress_policy != 0 && ep.egress_policy == 0, "{ep:?}");
    // The rules as compiled: policy name, rule number, action; then the default.
    let described: Vec<_> = before
        .rules
        .iter()
        .map(|r| {
            (
                r.policy,
                r.direction.as_str(),
                r.rule,
                r.name.as_deref(),
                r.number,
                r.action.as_str(),
            )
        })
        .collect();
    let id = ep.ingress_policy;
    assert_eq!(
        described,
        [
            (
                id,
                "ingress",
                Some(0),
                Some("default/web-in"),
                Some(0),
                "deny"
            ),
            (
                id,
                "ingress",
                Some(1),
                Some("default/web-in"),
                Some(1),
                "allow"
            ),
            (id, "ingress", None, None, None, "no-match"),
        ],
        "{before:?}"
    );
    assert!(before.verdicts.iter().all(|v| v.policy == id) && !before.verdicts.is_empty());
    let hits = |p: &PolicyDump, rule: Option<u32>| {
        p.rules
            .iter()
            .find(|r| r.rule == rule)
            .map_or(0, |r| r.hits)
    };

    // Each new connection from the client is decided once, by rule 1, at the web pod's
    // ingress: its later packets are tracked and do not consult policy.
    const CONNECTIONS: u64 = 5;
    for _ in 0..CONNECTIONS {
        assert!(tcp_probe(&d.pods[0], web.ip, Duration::from_secs(2)));
    }
    assert!(
        !tcp_probe(&d.pods[1], web.ip, Duration::from_millis(400)),
        "not a client"
    );
    assert!(!udp_echo(&d.pods[0], web.ip), "UDP is denied");
    let after = policy(&[&ep.iface, "--direction", "in"]);
    assert_eq!(after.endpoint.as_ref().map(|e| e.ingress_policy), Some(id));
    assert_eq!(after.direction.as_deref(), Some("ingress"));
    assert_eq!(
        hits(&after, Some(1)),
        hits(&before, Some(1)) + CONNECTIONS,
        "{after:?}"
    );
    assert!(
        hits(&after, Some(0)) > hits(&before, Some(0)),
        "UDP denied by rule 0"
    );
    assert!(
        hits(&after, None) > hits(&before, None),
        "the other pod: no rule matched"
    );
    // The table says the same.
    let (ok, table, err) = map_dump(&d, web_node, &["policy", &pod_name]);
    assert!(ok, "{err}");
    println!("map-dump policy {pod_name}:\n{table}");
    let line = table
        .lines()
        .find(|l| l.contains("default/web-in") && l.contains("allow"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.ends_with(&format!(" {}", hits(&after, Some(1)))),
        "{line}\n{table}"
    );
    // Egress only: the pod has no egress policy, so no rules.
    let out = policy(&[&pod_name, "--direction", "out"]);
    assert!(out.rules.is_empty() && out.verdicts.is_empty(), "{out:?}");
    // The whole node: the same rules among all.
    let all = policy(&[]);
    assert!(
        all.endpoint.is_none()
            && all
                .rules
                .iter()
                .any(|r| r.policy == id && r.hits == hits(&after, Some(1)))
    );

    // The address sets (BPF mode: the compiled policy's address classes): the client's /32
    // is in a class decided by both rules, the other pod's is not in it.
    let (ok, out, err) = map_dump(&d, web_node, &["ipsets", &pod_name, "--json"]);
    assert!(ok, "{err}");
    let sets: AddressSetDump = round_trip(&out);
    let member = |i: usize| format!("{}/32", d.pods[i].ip);
    let client_set = sets
        .sets
        .iter()
        .find(|s| s.members.contains(&member(0)))
        .unwrap_or_else(|| panic!("no set holds the client: {sets:?}"));
    let deciding: Vec<_> = client_set
        .rules
        .iter()
        .map(|r| (r.policy_rule(), r.action.as_str()))
        .collect();
    assert_eq!(
        (client_set.policy, deciding),
        (
            id,
            vec![
                ((Some("default/web-in"), Some(0)), "deny"),
                ((Some("default/web-in"), Some(1)), "allow")
            ]
        ),
        "{sets:?}"
    );
    assert!(!client_set.members.contains(&member(1)), "{sets:?}");
    let (ok, text, _) = map_dump(&d, web_node, &["ipsets"]);
    println!("map-dump ipsets:\n{text}");
    assert!(
        ok && text.contains(&member(0)) && text.contains("default/web-in ingress #1 (allow)"),
        "{text}"
    );

    // Selections that name nothing fail with one line.
    for (target, want) in [
        ("default/no-such-pod", "no interface cali"),
        ("eth0", "not a pod endpoint"),
        ("a/b/c", "neither an interface name nor namespace/pod"),
    ] {
        let (ok, out, err) = map_dump(&d, web_node, &["policy", target]);
        assert!(
            !ok && out.is_empty() && err.contains(want) && err.trim().lines().count() == 1,
            "{target}: {err}"
        );
    }

    // Conntrack: a connection held open from the client, found by its port and address,
    // and nothing else.
    let (conn, local) = d.pods[0].sb.ns.run(|| {
        let s = std::net::TcpStream::connect_timeout(
            &(web.ip, ECHO_PORT).into(),
            Duration::from_secs(2),
        )
        .unwrap();
        let port = s.local_addr().unwrap().port();
        (s, port)
    });
    let mut conn = conn;
    conn.write_all(b"hi").unwrap();
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf).unwrap();
    let ct = |args: &[&str]| -> Vec<ConntrackRow> {
        let (ok, out, err) = map_dump(
            &d,
            web_node,
            &[&["conntrack"][..], args, &["--json"]].concat(),
        );
        assert!(ok, "{err}");
        round_trip(&out)
    };
    let client = d.pods[0].ip.to_string();
    let port = local.to_string();
    let found = ct(&["--proto", "tcp", "--addr", &client, "--port", &port]);
    assert_eq!(found.len(), 1, "{found:?}");
    // The echo server has answered and closed its side by now: the state shows it, and the
    // state filter finds it in that state only.
    let state = found[0].state.clone();
    assert!(
        ["ESTABLISHED", "FIN_WAIT"].contains(&state.as_str()),
        "{found:?}"
    );
    assert_eq!(
        ct(&["--port", &port, "--state", &state.to_lowercase()]).len(),
        1
    );
    assert!(ct(&["--port", &port, "--state", "syn_sent"]).is_empty());
    assert_eq!(
        (
            found[0].src.as_str(),
            found[0].sport,
            found[0].dst.clone(),
            found[0].dport
        ),
        (client.as_str(), local, web.ip.to_string(), ECHO_PORT)
    );
    assert!(ct(&["--proto", "udp", "--port", &port]).is_empty());
    let everything = ct(&[]);
    let by_client = ct(&["--addr", &client]);
    assert!(everything.len() >= by_client.len() && by_client.len() as u64 > CONNECTIONS);
    assert_eq!(
        ct(&["--port", &port]).len(),
        1,
        "only the held connection uses its port"
    );
    assert!(by_client.iter().all(|r| r.src == client || r.dst == client));
    let (ok, text, err) = map_dump(
        &d,
        web_node,
        &["conntrack", "--port", &port, "--state", &state],
    );
    assert!(
        ok && text.contains(&format!("{client}:{local}")) && text.contains(" match"),
        "{text}{err}"
    );

    // Stats count what the dump lists.
    let (ok, out, err) = map_dump(&d, web_node, &["conntrack", "stats", "--json"]);
    assert!(ok, "{err}");
    let stats: ConntrackStats = round_trip(&out);
    let listed = ct(&[]);
    assert_eq!(stats.entries, listed.len() as u64, "{stats:?}");
    assert_eq!(
        stats.max_entries,
        u64::from(dataplane_common::MAX_CONNTRACK)
    );
    let mut by_proto: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in &listed {
        *by_proto
            .entry(r.proto.clone())
            .or_default()
            .entry(r.state.clone())
            .or_default() += 1;
    }
    assert_eq!(stats.by_proto, by_proto);
    assert_eq!(
        stats
            .by_proto
            .values()
            .flat_map(|s| s.values())
            .sum::<u64>(),
        stats.entries
    );
    assert!(stats.expired <= stats.entries && stats.fill > 0.0);
    let (ok, text, _) = map_dump(&d, web_node, &["conntrack", "stats"]);
    println!("map-dump conntrack stats:\n{text}");
    assert!(
        ok && text.contains("FIN_WAIT") && text.contains("expired"),
        "{text}"
    );
    for (args, want) in [
        (&["conntrack", "--state", "sleepy"][..], "expected one of"),
        (&["conntrack", "--proto", "tcpx"][..], "expected tcp"),
        (&["conntrack", "--addr", "10.1"][..], "IPv4"),
        (&["conntrack", "list"][..], "only word after conntrack"),
        (
            &["conntrack", "stats", "--proto", "tcp"][..],
            "drop the filters",
        ),
        (
            &["routes", "--port", "80"][..],
            "filter `map-dump conntrack` only",
        ),
        (
            &["routes", "--direction", "in"][..],
            "`map-dump policy` only",
        ),
    ] {
        let (ok, _, err) = map_dump(&d, web_node, args);
        assert!(
            !ok && err.contains(want) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
    }

    // With the agent stopped, the pins alone answer: the same rules and counts.
    let seen = policy(&[&pod_name]);
    let pod_ip = web.ip;
    assert!(
        d.agents[web_node]
            .process
            .stop(Duration::from_secs(5))
            .is_some()
    );
    let policy = |d: &Deployment, args: &[&str]| -> PolicyDump {
        let (ok, out, err) = map_dump(d, web_node, &[&["policy"][..], args, &["--json"]].concat());
        assert!(ok, "{err}");
        round_trip(&out)
    };
    assert_eq!(policy(&d, &[&pod_name]), seen);
    // A restarted agent recompiles under new ids; the old id's descriptions and counts go.
    let agent = Agent::start(
        &d.cluster.nodes[web_node],
        &d.pins[web_node],
        d.cluster.etcd.as_ref(),
        &[],
    );
    d.agents[web_node] = agent;
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_id = loop {
        let now = policy(&d, &[&pod_name]);
        let current = now.endpoint.as_ref().map_or(0, |e| e.ingress_policy);
        let all = policy(&d, &[]);
        if current != id && current != 0 && all.rules.iter().all(|r| r.policy != id) {
            let fresh: Vec<_> = now.rules.iter().map(|r| (r.rule, r.hits)).collect();
            assert_eq!(fresh, [(Some(0), 0), (Some(1), 0), (None, 0)], "{now:?}");
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "policy {id} not replaced after a restart: {all:?}\n{}",
            d.agents[web_node].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Traffic still counts under the new id.
    assert!(tcp_probe(&d.pods[0], pod_ip, Duration::from_secs(2)));
    let now = policy(&d, &[&pod_name]);
    assert_eq!(hits(&now, Some(1)), 1, "{now:?}");

    // A policy gone: its rules and hit counts go with its compiled id.
    let (st, out, err) = d.ctl(&["delete", "networkpolicy", "web-in"]);
    assert!(st.success(), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = policy(&d, &[]);
        if all.rules.iter().all(|r| r.policy != new_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy {new_id} still described: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(conn);
}

#[test]
fn root_conntrack_stats_report_the_size_the_agent_gave_the_map() {
    use dataplane::dump::ConntrackStats;
    require_root();
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    let dir = pins.path.display().to_string();
    let stats = || -> ConntrackStats {
        let (st, out, err) = dataplane(
            &node.ns,
            &[
                "map-dump",
                "conntrack",
                "stats",
                "--json",
                "--bpffs-dir",
                &dir,
            ],
        );
        assert!(st.success(), "{err}");
        round_trip(&out)
    };
    let mut agent = Agent::start(node, &pins, None, &["--conntrack-size", "1024"]);
    wait_attached(&node.ns, "eth0", &mut agent, ATTACH_TIMEOUT);
    let s = stats();
    assert_eq!((s.entries, s.max_entries, s.expired), (0, 1024, 0), "{s:?}");
    // A restart with another size remakes the table: the stats follow the map.
    agent.process.stop(Duration::from_secs(5));
    // (The old agent's links stay attached meanwhile: wait for the new map, not for them.)
    let mut agent = Agent::start(node, &pins, None, &["--conntrack-size", "4096"]);
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    let size = || {
        let (st, out, _) = dataplane(
            &node.ns,
            &[
                "map-dump",
                "conntrack",
                "stats",
                "--json",
                "--bpffs-dir",
                &dir,
            ],
        );
        // The pin is briefly absent while the agent remakes the map.
        st.success()
            .then(|| round_trip::<ConntrackStats>(&out).max_entries)
    };
    while size() != Some(4096) {
        assert!(
            Instant::now() < deadline && agent.process.exited().is_none(),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // With the agent gone, the pins still answer.
    agent.process.stop(Duration::from_secs(5));
    assert_eq!(stats().max_entries, 4096);
}

//! Resource limits of policy (issue 8), with a real etcd, real agents and real traffic (needs
//! root): `ctl apply` refuses a policy whose rules would not fit an endpoint's share of the
//! maps, writing nothing; an agent that meets rules that do not fit (here: its per-policy
//! limit lowered with the hidden `--max-policy-entries`) never programs part of them: the
//! endpoint keeps the rules in force before, or is denied everything when it had none, and
//! the log, the metrics, `map-dump` and `ctl node status` say so. Also the batched map writes
//! the agent uses, against a loaded object's maps.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use dataplane_common::{PolicyIpKey, PolicyPortKey, Verdict, map_names};
use dataplane_tests::{
    Agent,
    cni::{Sandbox, cni, dataplane_conf},
    dataplane,
    packets::TestObject,
    require_root,
    traffic::{Deployment, Pod, Servers, tcp_probe, udp_echo},
};

/// The lowered limit of the node-1 agent and of the refused `ctl apply`.
const LIMIT: &str = "40";
const METRICS: &str = "127.0.0.1:9477";

/// `gate` allowing TCP to the echo port from anywhere: a handful of entries.
fn small() -> String {
    "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: gate, namespace: default}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - {action: Allow, protocol: TCP, destination: {ports: [7000]}}\n".to_owned()
}

/// `gate` replaced by 30 rules on distinct /32s and ports, and UDP to the echo port (no TCP):
/// well over 40 entries.
fn big() -> String {
    let mut y = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: gate, namespace: default}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress:\n".to_owned();
    for i in 0..30 {
        y.push_str(&format!(
            "  - {{action: Allow, protocol: TCP, source: {{nets: ['10.201.0.{i}/32']}}, destination: {{ports: [{}]}}}}\n",
            2000 + i
        ));
    }
    y.push_str("  - {action: Allow, protocol: UDP, destination: {ports: [7000]}}\n");
    y
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let f = dir.path().join(name);
    std::fs::write(&f, text).unwrap();
    f.display().to_string()
}

/// `GET /metrics` of the node-1 agent, from inside its namespace.
fn metrics(d: &Deployment) -> String {
    d.cluster.nodes[0].ns.run(|| {
        let mut s = TcpStream::connect(METRICS).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until `f` holds, or panics with `what` and the node-1 agent's log.
fn wait_for(d: &Deployment, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} after 20 s; node-1 agent log:\n{}",
            d.agents[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn endpoint_of(d: &Deployment, ip: Ipv4Addr) -> dataplane::dump::EndpointRow {
    let dir = d.pins[0].path.display().to_string();
    let (_, out, err) = dataplane(
        &d.cluster.nodes[0].ns,
        &["map-dump", "endpoints", "--json", "--bpffs-dir", &dir],
    );
    let rows: Vec<dataplane::dump::EndpointRow> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    rows.into_iter()
        .find(|r| r.ip == ip.to_string())
        .unwrap_or_else(|| panic!("no endpoint {ip} on node-1: {out}"))
}

#[test]
fn root_ctl_apply_refuses_a_policy_that_does_not_fit_and_writes_nothing() {
    require_root();
    let d = Deployment::start("Always", 1);
    let dir = tempfile::tempdir().unwrap();
    let big = write(&dir, "big.yaml", &big());
    let t = Instant::now();
    let (st, out, err) = d.ctl(&["apply", "--max-policy-entries", LIMIT, "-f", &big]);
    let took = t.elapsed();
    assert!(!st.success(), "a policy over the limit was applied: {out}");
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "one line: {err}");
    for part in [
        "NetworkPolicy default/gate",
        "endpoint default/",
        "(ingress)",
        "more than the 40",
        "nothing was written",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    let (st, out, _) = d.ctl(&["get", "networkpolicy", "gate"]);
    assert!(
        !st.success(),
        "the refused policy is in etcd after all: {out}"
    );
    // The same limit lets the small one through, and the real limit the big one.
    let small = write(&dir, "small.yaml", &small());
    let (st, out, err) = d.ctl(&["apply", "--max-policy-entries", LIMIT, "-f", &small]);
    assert!(st.success(), "{out}{err}");
    let (st, out, err) = d.ctl(&["apply", "--wait", "-f", &big]);
    assert!(st.success(), "{out}{err}");
    eprintln!("refused in {took:?}: {line}");
}

#[test]
fn root_agent_never_programs_rules_that_do_not_fit() {
    require_root();
    let mut d = Deployment::start("Always", 1);
    // Node 1's agent again, with a limit the big policy is over (the others keep the default).
    drop(d.agents.remove(0));
    let etcd = d.cluster.etcd.as_ref();
    d.agents.insert(
        0,
        Agent::start(
            &d.cluster.nodes[0],
            &d.pins[0],
            etcd,
            &["--max-policy-entries", LIMIT, "--metrics-listen", METRICS],
        ),
    );
    wait_for(&d, "the restarted agent not in sync", || {
        d.agents[0].log_text().contains("in sync with etcd")
    });
    let (target, client, other) = (&d.pods[0], &d.pods[1], &d.pods[2]);
    let _servers: Vec<Servers> = [target, other].into_iter().map(Servers::start).collect();
    let probe = |to: &Pod| tcp_probe(client, to.ip, Duration::from_millis(700));

    d.apply(&small());
    let before = endpoint_of(&d, target.ip);
    assert!(before.held.is_empty() && before.ingress_policy != 0);
    assert!(probe(target) && !udp_echo(client, target.ip));

    // Over node 1's limit: its pod keeps `small` (TCP in, UDP not); node 3's pod gets `big`.
    let t = Instant::now();
    d.apply(&big());
    let in_force = t.elapsed();
    let held = endpoint_of(&d, target.ip);
    assert_eq!(held.held, ["ingress"]);
    assert_eq!(
        held.ingress_policy, before.ingress_policy,
        "previous rules kept"
    );
    assert!(probe(target), "TCP as the previous rules allow");
    assert!(!udp_echo(client, target.ip), "no part of the new rules");
    assert!(
        !probe(other) && udp_echo(client, other.ip),
        "node 3 has the new rules"
    );
    let log = d.agents[0].log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("do not fit")
            && l.contains("default/")
            && l.contains("keeps policy")),
        "no error naming the endpoint:\n{log}"
    );
    let m = metrics(&d);
    assert_eq!(
        metric(&m, "dataplane_policy_held_endpoints"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "dataplane_policy_held_total"), Some(1.0), "{m}");
    let (_, status, _) = d.ctl(&["node", "status"]);
    assert!(
        status.contains("do not fit") && status.contains("default/gate"),
        "node status: {status}"
    );
    let dump = d.map_dump(0, "endpoints");
    assert!(dump.contains("HELD ingress"), "{dump}");

    // A pod that comes while the rules do not fit has no rules to keep: all is denied.
    let plugins = &d.plugins;
    let node = &d.cluster.nodes[0];
    let etcd_url = d.cluster.etcd.as_ref().unwrap().endpoint();
    let sb = Sandbox::new(node, "default", "late");
    let r = cni(
        node,
        plugins,
        "ADD",
        &sb,
        &dataplane_conf("1.0.0", &etcd_url, &node.name),
    )
    .ok();
    let late = Pod {
        node: 0,
        ip: dataplane_tests::cni::result_ip(&r),
        sb,
    };
    let _late_servers = Servers::start(&late);
    wait_for(&d, "the late pod not held", || {
        endpoint_of(&d, late.ip).held == ["ingress"]
    });
    assert!(
        !probe(&late) && !udp_echo(client, late.ip),
        "a new endpoint whose rules do not fit is denied"
    );
    let m = metrics(&d);
    assert_eq!(
        metric(&m, "dataplane_policy_held_endpoints"),
        Some(2.0),
        "{m}"
    );

    // Back under the limit: both take the rules, nothing is held.
    d.apply(&small());
    for p in [target, &late] {
        let e = endpoint_of(&d, p.ip);
        assert!(e.held.is_empty(), "{e:?}");
        assert!(probe(p));
    }
    let m = metrics(&d);
    assert_eq!(
        metric(&m, "dataplane_policy_held_endpoints"),
        Some(0.0),
        "{m}"
    );
    let (_, status, _) = d.ctl(&["node", "status"]);
    assert!(!status.contains("do not fit"), "{status}");
    eprintln!("big policy in force (held on node 1) after {in_force:?}");
}

fn never<K, V>(_: &K, _: &V) -> Result<(), String> {
    panic!("fell back to single writes")
}

fn never_one<K>(_: &K) -> Result<(), String> {
    panic!("fell back to single removals")
}

/// The batched writes and removals the agent's policy maps use, on a loaded object's maps:
/// everything written reads back; removing keys some of which are gone removes the rest.
#[test]
fn root_batch_map_writes_and_removals() {
    require_root();
    use aya::maps::{HashMap, LpmTrie, Map, lpm_trie::Key};
    use std::os::fd::AsFd as _;
    let mut obj = TestObject::load();
    let fd = |obj: &TestObject, name: &str| match obj.ebpf.map(name) {
        Some(Map::LpmTrie(m) | Map::HashMap(m)) => m.fd().as_fd().try_clone_to_owned().unwrap(),
        _ => panic!("no map {name}"),
    };
    let trie = fd(&obj, map_names::POLICY_PORT);
    let hash = fd(&obj, map_names::POLICY_IP_EXACT);
    let keys: Vec<Key<PolicyPortKey>> = (0..10_000u32)
        .map(|i| {
            Key::new(
                96,
                PolicyPortKey {
                    policy: 7,
                    class: i,
                    proto: 6,
                    kind: 0,
                    port: (i as u16).to_be_bytes(),
                },
            )
        })
        .collect();
    let values: Vec<Verdict> = (0..10_000u32)
        .map(|i| Verdict {
            action: 1,
            rule: i,
            ..Verdict::default()
        })
        .collect();
    let t = Instant::now();
    dataplane::batch::update(trie.as_fd(), &keys, &values, never, |e| e.to_string()).unwrap();
    eprintln!("10,000 trie entries in one batch call: {:?}", t.elapsed());
    let ips: Vec<PolicyIpKey> = (0..5_000u32)
        .map(|i| PolicyIpKey {
            policy: 7,
            addr: (0x0a00_0000 + i).to_be_bytes(),
        })
        .collect();
    let classes: Vec<u32> = (0..5_000).collect();
    dataplane::batch::update(hash.as_fd(), &ips, &classes, never, |e| e.to_string()).unwrap();
    {
        let m: LpmTrie<_, PolicyPortKey, Verdict> =
            LpmTrie::try_from(obj.ebpf.map(map_names::POLICY_PORT).unwrap()).unwrap();
        let got: Vec<(u32, u32)> = m
            .iter()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.data().class, v.rule)
            })
            .collect();
        assert_eq!(got.len(), 10_000);
        assert!(got.iter().all(|(c, r)| c == r));
        let m: HashMap<_, PolicyIpKey, u32> =
            HashMap::try_from(obj.ebpf.map(map_names::POLICY_IP_EXACT).unwrap()).unwrap();
        assert_eq!(m.get(&ips[4_321], 0).unwrap(), 4_321);
        assert_eq!(m.keys().count(), 5_000);
    }
    // Some already gone: the batch skips them and removes the rest.
    {
        let mut m: LpmTrie<_, PolicyPortKey, Verdict> =
            LpmTrie::try_from(obj.ebpf.map_mut(map_names::POLICY_PORT).unwrap()).unwrap();
        for k in [&keys[0], &keys[5_000], &keys[9_999]] {
            m.remove(k).unwrap();
        }
    }
    dataplane::batch::delete(trie.as_fd(), &keys, never_one, |e| e.to_string()).unwrap();
    dataplane::batch::delete(hash.as_fd(), &ips, never_one, |e| e.to_string()).unwrap();
    let m: LpmTrie<_, PolicyPortKey, Verdict> =
        LpmTrie::try_from(obj.ebpf.map(map_names::POLICY_PORT).unwrap()).unwrap();
    assert_eq!(m.iter().count(), 0);
    let m: HashMap<_, PolicyIpKey, u32> =
        HashMap::try_from(obj.ebpf.map(map_names::POLICY_IP_EXACT).unwrap()).unwrap();
    assert_eq!(m.keys().count(), 0);
}

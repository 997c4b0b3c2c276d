//! Kubernetes NetworkPolicy enforcement as truth tables (needs root): the e2e "netpol" suite's
//! world (namespaces x, y, z; pods a, b, c; TCP and UDP on 80 and 81) on the three-node
//! cluster in a box, every scenario's four 9×9 matrices probed and compared with the reference
//! model in `dataplane_tests::netpol`. Expectations come only from the model.

use std::{net::Ipv4Addr, time::Instant};

use dataplane_tests::{
    netpol::{CASES, NetpolCluster, Reachability, Session, World},
    require_root,
};

/// A NetworkPolicy document: `spec` is the body under `spec:`, indented by two spaces.
fn np(ns: &str, name: &str, spec: &str) -> String {
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

/// The /26 IPAM block holding `ip`.
fn block_of(ip: Ipv4Addr) -> String {
    format!("{}/26", Ipv4Addr::from(u32::from(ip) & !63))
}

/// The harness on its own, with no policy: the matrices are all allowed, a round is fast, and
/// a silent drop (iptables in a pod, not the dataplane) is seen as denied within the deadline.
/// Runs before the policy kinds are supported.
#[test]
fn root_netpol_no_policy_all_allowed() {
    require_root();
    let c = NetpolCluster::start();
    eprintln!("cluster started in {:.1?}", c.started_in);
    if let Err(e) = &c.k8s_objects {
        eprintln!(
            "note: the Namespace and Pod objects were not applied (no labels in the datastore): {e}"
        );
    }
    let expected: Vec<Reachability> = CASES
        .iter()
        .map(|k| c.world.reachability(&[], *k))
        .collect();
    assert!(expected.iter().all(|r| r.allowed_count() == 81));

    let t = Instant::now();
    let observed = c.probe(&CASES);
    let first = t.elapsed();
    for ((case, e), o) in CASES.iter().zip(&expected).zip(&observed) {
        if let Some(d) = e.diff(o) {
            panic!("no policy, {case}: not all allowed\n{d}");
        }
    }
    let t = Instant::now();
    let again = c.probe(&CASES);
    let second = t.elapsed();
    assert_eq!(observed, again);
    eprintln!("4×81 all-allowed probe rounds: {first:.2?}, {second:.2?}");
    eprintln!("80/TCP:\n{}", observed[0]);

    // Drop 80/TCP and 81/UDP arriving on y/b's eth0 inside the pod: probes to those time out.
    let yb = c.world.pod_index("y", "b");
    let ns = &c.pods[yb].sb.ns;
    for rule in [
        ["-p", "tcp", "--dport", "80"],
        ["-p", "udp", "--dport", "81"],
    ] {
        let mut args = vec!["-w", "-A", "INPUT", "-i", "eth0"];
        args.extend(rule);
        args.extend(["-j", "DROP"]);
        ns.exec("iptables", &args);
    }
    let t = Instant::now();
    let dropped = c.probe(&CASES);
    let with_drops = t.elapsed();
    for ((case, e), o) in CASES.iter().zip(&expected).zip(&dropped) {
        let mut want = e.clone();
        if *case == CASES[0] || *case == CASES[3] {
            for from in (0..9).filter(|f| *f != yb) {
                want.set(from, yb, false);
            }
        }
        if let Some(d) = want.diff(o) {
            panic!("silent drops in y/b, {case}: the prober saw otherwise\n{d}");
        }
    }
    eprintln!(
        "4×81 probe round with 16 silently dropped probes: {with_drops:.2?}\n81/UDP, with the drops, against the all-allowed expectation:\n{}",
        expected[3].diff(&dropped[3]).unwrap()
    );
    assert!(
        with_drops >= dataplane_tests::netpol::PROBE_DEADLINE
            && with_drops < 2 * dataplane_tests::netpol::PROBE_DEADLINE + first,
        "a round with drops should last about the deadline: {with_drops:?}"
    );
    ns.exec("iptables", &["-w", "-F", "INPUT"]);
    let back = c.probe(&CASES);
    assert_eq!(back, observed, "all allowed again once the drops are gone");
    assert!(c.servers_running());
}

/// The scenarios: each applies Kubernetes NetworkPolicies with `ctl apply --wait`, probes the
/// four matrices and compares them with the model; the session resets between scenarios.
#[test]
fn root_netpol_truth_tables() {
    truth_tables("bpf", "CrossSubnet");
}

/// The same scenarios against the iptables dataplane (native routing: the iptables mode has
/// no IP-in-IP on this kernel).
#[test]
fn root_netpol_truth_tables_iptables() {
    truth_tables("iptables", "Never");
}

fn truth_tables(dataplane: &str, pool_mode: &str) {
    require_root();
    let t0 = Instant::now();
    let c = NetpolCluster::start_with(dataplane, pool_mode);
    eprintln!(
        "{dataplane} dataplane, pool {pool_mode}: cluster started in {:.1?}",
        c.started_in
    );
    let mut s = Session::new(&c);
    scenarios(&mut s);
    eprintln!("whole test ({dataplane}): {:.1?}", t0.elapsed());
    s.finish();
}

/// Every scenario, in order. Each resets the cluster when it ends; a few build on their own
/// earlier steps (update in place, label changes).
fn scenarios(s: &mut Session) {
    s.scenario(
        "no policy: all allowed; Namespace and Pod objects applied",
        |s| {
            s.check("no policy");
            if let Some(c) = s.cluster
                && let Err(e) = &c.k8s_objects
            {
                panic!("ctl apply --wait of the v1 Namespace and Pod objects failed: {e}");
            }
        },
    );

    s.scenario("deny-all ingress in x", |s| {
        s.apply(&np(
            "x",
            "deny-all-ingress",
            "podSelector: {}\npolicyTypes: [Ingress]",
        ));
        s.check("deny-all ingress in x");
    });

    s.scenario(
        "deny-all egress in x (no DNS exception: the cluster has no DNS)",
        |s| {
            s.apply(&np(
                "x",
                "deny-all-egress",
                "podSelector: {}\npolicyTypes: [Egress]",
            ));
            s.check("deny-all egress in x");
        },
    );

    s.scenario("allow ingress from the same namespace only (y)", |s| {
        s.apply(&np(
            "y",
            "allow-same-ns",
            "podSelector: {}\ningress:\n- from:\n  - podSelector: {}",
        ));
        s.check("same namespace only");
    });

    s.scenario("allow ingress to x/a from a namespace by label (ns: y)", |s| {
        s.apply(&np(
            "x",
            "allow-from-y",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}",
        ));
        s.check("from ns y");
    });

    s.scenario("namespaceSelector by kubernetes.io/metadata.name", |s| {
        s.apply(&np(
            "y",
            "allow-from-z-by-name",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {kubernetes.io/metadata.name: z}",
        ));
        s.check("from z by name");
    });

    s.scenario("podSelector AND namespaceSelector in one peer", |s| {
        s.apply(&np(
            "x",
            "and-peer",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: b}",
        ));
        s.check("y/b only");
    });

    s.scenario("podSelector OR namespaceSelector as two peers", |s| {
        s.apply(&np(
            "x",
            "or-peers",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n  - podSelector:\n      matchLabels: {pod: b}",
        ));
        s.check("all of y, or b in x");
    });

    s.scenario("namespaceSelector {} with a podSelector: pod c of every namespace", |s| {
        s.apply(&np(
            "z",
            "c-from-anywhere",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {}\n    podSelector:\n      matchLabels: {pod: c}",
        ));
        s.check("c's only into z");
    });

    s.scenario("matchExpressions NotIn on namespaces", |s| {
        s.apply(&np(
            "x",
            "not-in-y",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [y]}",
        ));
        s.check("all but y");
    });

    s.scenario("matchExpressions In and Exists", |s| {
        s.apply(&np(
            "y",
            "in-exists",
            "podSelector:\n  matchExpressions:\n  - {key: pod, operator: In, values: [a, c]}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: Exists}\n    podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [b]}",
        ));
        s.check("y/a and y/c from b's");
    });

    s.scenario("matchExpressions DoesNotExist (after labelling two pods)", |s| {
        s.set_pod_labels("y", "a", &[("pod", "a"), ("env", "prod")]);
        s.set_pod_labels("z", "c", &[("pod", "c"), ("env", "prod")]);
        s.apply(&np(
            "x",
            "no-env",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {}\n    podSelector:\n      matchExpressions:\n      - {key: env, operator: DoesNotExist}",
        ));
        s.check("all but y/a, z/c into x");
        // A target selector that matches no pod isolates nothing.
        s.apply(&np(
            "z",
            "selects-nothing",
            "podSelector:\n  matchExpressions:\n  - {key: pod, operator: DoesNotExist}\npolicyTypes: [Ingress, Egress]",
        ));
        s.check("plus a policy selecting no pod");
    });

    s.scenario("ipBlock: the /32 of one pod", |s| {
        let yb = s.ip("y", "b");
        s.apply(&np(
            "x",
            "from-y-b-ip",
            &format!("podSelector:\n  matchLabels: {{pod: a}}\ningress:\n- from:\n  - ipBlock:\n      cidr: {yb}/32"),
        ));
        s.check("y/b's address only");
    });

    s.scenario("ipBlock with except (node 1's block)", |s| {
        let block = block_of(s.ip("x", "b"));
        s.apply(&np(
            "x",
            "pool-but-node-1",
            &format!(
                "podSelector:\n  matchLabels: {{pod: a}}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.65.0.0/16\n      except: [{block}]"
            ),
        ));
        s.check("all but the b's");
    });

    s.scenario("ingress on port 80 only", |s| {
        s.apply(&np(
            "x",
            "port-80",
            "podSelector: {}\ningress:\n- ports:\n  - port: 80",
        ));
        s.check("80/TCP only into x");
    });

    s.scenario("ingress on the named port serve-81-tcp", |s| {
        s.apply(&np(
            "y",
            "named-81",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {}\n  ports:\n  - port: serve-81-tcp",
        ));
        s.check("81/TCP only into y");
    });

    s.scenario("endPort 80-81 versus 81-85", |s| {
        s.apply(&np(
            "z",
            "range",
            "podSelector: {}\ningress:\n- ports:\n  - {port: 80, endPort: 81, protocol: TCP}",
        ));
        s.check("80-81/TCP into z");
        s.apply(&np(
            "z",
            "range",
            "podSelector: {}\ningress:\n- ports:\n  - {port: 81, endPort: 85, protocol: TCP}",
        ));
        s.check("81-85/TCP into z");
    });

    s.scenario("UDP-only rule", |s| {
        s.apply(&np(
            "x",
            "udp-only",
            "podSelector:\n  matchLabels: {pod: b}\ningress:\n- ports:\n  - protocol: UDP",
        ));
        s.check("UDP into x/b");
    });

    s.scenario("named UDP port, egress", |s| {
        s.apply(&np(
            "y",
            "out-80-udp",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- ports:\n  - {port: serve-80-udp, protocol: UDP}",
        ));
        s.check("y/a sends 80/UDP only");
    });

    s.scenario("egress to one pod only", |s| {
        s.apply(&np(
            "x",
            "a-to-b",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector:\n      matchLabels: {pod: b}",
        ));
        s.check("x/a reaches x/b only");
        s.apply(&np(
            "x",
            "a-to-b",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: z}\n    podSelector:\n      matchLabels: {pod: c}\n  ports:\n  - port: 81",
        ));
        s.check("x/a reaches z/c on 81/TCP only");
    });

    s.scenario("egress ipBlock with except", |s| {
        let xa = s.ip("x", "a");
        s.apply(&np(
            "z",
            "pool-but-x-a",
            &format!(
                "podSelector: {{}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock:\n      cidr: 10.65.0.0/16\n      except: [{xa}/32]"
            ),
        ));
        s.check("z reaches all but x/a");
    });

    s.scenario("ingress and egress in one policy", |s| {
        s.apply(&np(
            "y",
            "both",
            "podSelector:\n  matchLabels: {pod: b}\npolicyTypes: [Ingress, Egress]\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: x}\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: z}",
        ));
        s.check("y/b: in from x, out to z");
    });

    s.scenario("policyTypes inferred from an egress section", |s| {
        s.apply(&np(
            "z",
            "inferred",
            "podSelector:\n  matchLabels: {pod: a}\negress:\n- to:\n  - podSelector: {}",
        ));
        s.check("z/a: no ingress, egress within z");
    });

    s.scenario("empty rule lists in both directions", |s| {
        s.apply(&np(
            "y",
            "closed",
            "podSelector:\n  matchLabels: {pod: c}\npolicyTypes: [Ingress, Egress]\ningress: []\negress: []",
        ));
        s.check("y/c closed");
    });

    s.scenario("multiple policies on one pod: the union", |s| {
        s.apply(&format!(
            "{}---\n{}",
            np(
                "x",
                "a-80-from-y",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n  ports:\n  - port: 80"
            ),
            np(
                "x",
                "a-81-from-z",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: z}\n  ports:\n  - port: 81"
            )
        ));
        s.check("x/a: 80 from y, 81 from z");
        // A third, broader on UDP: the union opens UDP from everywhere, TCP stays as it was.
        s.apply(&np(
            "x",
            "a-udp",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector: {}\n  ports:\n  - protocol: UDP",
        ));
        s.check("plus UDP from every namespace");
    });

    s.scenario("deny-all in a namespace plus allow-all to one pod", |s| {
        s.apply(&np("y", "deny-all", "podSelector: {}\npolicyTypes: [Ingress, Egress]"));
        s.check("y closed");
        s.apply(&np(
            "y",
            "open-b",
            "podSelector:\n  matchLabels: {pod: b}\npolicyTypes: [Ingress, Egress]\ningress:\n- {}\negress:\n- {}",
        ));
        s.check("y closed but y/b");
    });

    s.scenario("a policy selects pods of its own namespace only", |s| {
        s.apply(&np(
            "z",
            "deny-a",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Ingress]",
        ));
        s.check("z/a closed, x/a and y/a open");
    });

    s.scenario("update a policy in place", |s| {
        let v1 = "podSelector:\n  matchLabels: {pod: c}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}";
        s.apply(&np("x", "moving", v1));
        s.check("x/c from y");
        s.apply(&np(
            "x",
            "moving",
            "podSelector:\n  matchLabels: {pod: c}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: z}\n  ports:\n  - protocol: UDP",
        ));
        s.check("x/c from z, UDP");
        s.apply(&np(
            "x",
            "moving",
            "podSelector:\n  matchLabels: {pod: b}\npolicyTypes: [Egress]",
        ));
        s.check("x/b no egress; x/c open again");
    });

    s.scenario("a pod label change moves the pod in and out of selectors", |s| {
        s.apply(&np(
            "x",
            "from-b",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector: {}\n    podSelector:\n      matchLabels: {pod: b}",
        ));
        s.check("x/a from the b's");
        s.set_pod_labels("y", "c", &[("pod", "b")]);
        s.check("y/c relabelled pod=b: now a source");
        s.set_pod_labels("x", "c", &[("pod", "a")]);
        s.check("x/c relabelled pod=a: now selected");
        s.set_pod_labels("y", "c", &[("pod", "c")]);
        s.check("y/c back");
    });

    s.scenario("a namespace label change", |s| {
        s.apply(&np(
            "x",
            "from-ns-y",
            "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}",
        ));
        s.check("x from y");
        s.set_namespace_labels("z", &[("ns", "y")]);
        s.check("z labelled ns=y: now a source");
        s.set_namespace_labels("y", &[("ns", "q")]);
        s.check("y relabelled ns=q: no longer a source");
    });
}

/// The scenarios on the model alone (no root): every policy is valid, every check but the
/// all-allowed ones expects some connection denied (a check that expects nothing denied
/// would pass on a dataplane that enforces nothing), and the expected matrices are printed
/// for reading (`--nocapture`). Addresses as the cluster hands them out: one /26 per node.
#[test]
fn model_expectations_of_every_scenario() {
    let world = World::e2e(|ns, pod| {
        let n = ["x", "y", "z"].iter().position(|x| *x == ns).unwrap() as u8;
        let p = ["a", "b", "c"].iter().position(|x| *x == pod).unwrap() as u8;
        Ipv4Addr::new(10, 65, 0, p * 64 + n)
    });
    let mut s = Session::model_only(world);
    scenarios(&mut s);
    assert!(s.results().len() >= 25, "{} scenarios", s.results().len());
    for (what, expected) in &s.expectations {
        let denied: usize = expected.iter().map(|r| 81 - r.allowed_count()).sum();
        eprintln!("--- {what}: {denied} of 324 denied");
        for (case, r) in CASES.iter().zip(expected) {
            eprintln!("{case}:\n{r}");
        }
        let all_allowed = what.starts_with("reset") || what == "no policy";
        assert_eq!(denied == 0, all_allowed, "{what}: {denied} denied");
    }
    s.finish();
}

/// The helpers on the e2e world: a quick guard that they build valid policies.
#[test]
fn scenario_helpers_build_valid_policies() {
    let w = World::e2e(|_, _| Ipv4Addr::new(10, 65, 0, 1));
    let p = dataplane_tests::netpol::parse_policies(&np(
        "x",
        "t",
        "podSelector: {}\ningress:\n- from:\n  - podSelector: {}",
    ))
    .unwrap();
    assert_eq!(p[0].metadata.namespace, "x");
    let r = w.reachability(&p, CASES[0]);
    let (xa, ya) = (w.pod_index("x", "a"), w.pod_index("y", "a"));
    assert!(!r.get(ya, xa) && r.get(xa, ya));
    assert_eq!(block_of(Ipv4Addr::new(10, 65, 0, 70)), "10.65.0.64/26");
}

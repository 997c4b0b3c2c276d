//! Security posture (README, "Threat model"), shown on a cluster in a box in BPF mode:
//!
//! - a pod's reach to the management ports of the nodes (its own and another) and of etcd:
//!   everything with no policy selecting it (Kubernetes semantics, as Calico without host
//!   endpoints), nothing under a default-deny egress policy (dropped by our program and
//!   counted as a policy drop), exactly the one allowed port under an egress allow;
//! - a pod forging the address of another pod or of a node, or sending IP-in-IP to a node
//!   with a forged inner source: dropped and counted (the baseline from its own address
//!   gets through);
//! - the agent's HTTP endpoints: no method but GET (and HEAD) is served on any path, unknown
//!   paths are 404, nothing there changes state, malformed and oversized requests are refused
//!   without hurting the agent, idle connections are capped and ended, and the listeners
//!   bind only where configured (or nowhere);
//! - the CNI latency socket: mode 0600, junk dropped without a trace.
//!
//! A forged source outside the pools and IP-in-IP from etcd's host are in `forwarding.rs`.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_common::{counter, hook};
use dataplane_tests::{
    Agent, Cluster, Netns, PinDirGuard,
    cluster::{ETCD_IP, http_get},
    require_root,
    traffic::{Deployment, Pod},
    wait_attached,
};

const SSH: u16 = 22;
const KUBELET: u16 = 10250;
const HEALTH: u16 = 9099;
const METRICS: u16 = 9091;
const ETCD_CLIENT: u16 = 2379;
/// How long a probe waits for a SYN-ACK: a dropped SYN is silent, so denied probes cost this.
const SILENT_AFTER: Duration = Duration::from_millis(500);

/// What a TCP connection attempt met.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reach {
    /// Connected and got an answer (its first line).
    Open(String),
    /// A reset: nothing listens there.
    Refused,
    /// No answer at all within [`SILENT_AFTER`]: the SYN was dropped.
    Silent,
    /// Anything else (connected but no answer, another error).
    Other(String),
}

/// Connects from `ns` to `to`, sends a tiny HTTP request (which the stand-in listeners read
/// and the agent answers) and returns what came back.
fn reach(ns: &Netns, to: SocketAddr) -> Reach {
    ns.run(|| {
        let mut s = match TcpStream::connect_timeout(&to, SILENT_AFTER) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Reach::Refused,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Reach::Silent,
            Err(e) => return Reach::Other(e.to_string()),
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if let Err(e) = s.write_all(b"GET /liveness HTTP/1.0\r\n\r\n") {
            return Reach::Other(format!("send: {e}"));
        }
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) if !got.is_empty() => Reach::Open(
                String::from_utf8_lossy(&got)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            Ok(_) => Reach::Other("connected, closed without a word".to_owned()),
            Err(e) => Reach::Other(format!("read: {e}")),
        }
    })
}

/// A stand-in for a node's management daemon (sshd on 22, the kubelet on 10250): a TCP
/// listener on every address of a node's namespace that reads a request and answers one
/// line naming itself. Stopped on drop.
struct StandIn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(ns: &Netns, port: u16, banner: &'static str) -> Self {
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        let mut buf = [0u8; 256];
                        let _read = c.read(&mut buf);
                        let _sent = c.write_all(format!("{banner}\r\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _joined = t.join();
        }
    }
}

/// Counter `slot` summed over the interfaces of node `i` at `hook`.
fn node_counter(d: &Deployment, i: usize, hook: u8, slot: usize) -> u64 {
    dataplane::maps::read_counters(&d.pins[i].path)
        .unwrap()
        .iter()
        .filter(|((_, h), _)| *h == hook)
        .map(|(_, c)| c.values[slot])
        .sum()
}

/// The policy drops counted on node `i` for what its pods send.
fn policy_drops(d: &Deployment, i: usize) -> u64 {
    node_counter(d, i, hook::FROM_WORKLOAD, counter::DROP_POLICY)
}

/// The IPv4 addresses of a namespace other than loopback ones.
fn own_addresses(ns: &Netns) -> Vec<Ipv4Addr> {
    let v: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "-4", "addr", "show"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .filter(|a: &Ipv4Addr| !a.is_loopback())
        .collect()
}

/// Probes every target from `pod` and returns (target name, outcome) rows.
fn survey(pod: &Pod, targets: &[(String, SocketAddr)]) -> Vec<(String, Reach)> {
    targets
        .iter()
        .map(|(name, to)| (name.clone(), reach(&pod.sb.ns, *to)))
        .collect()
}

fn table(rows: &[(String, Reach)]) -> String {
    rows.iter()
        .map(|(n, r)| format!("  {n:<32} {r:?}\n"))
        .collect()
}

#[test]
fn root_a_pod_reaches_node_management_ports_only_as_its_egress_policy_allows() {
    require_root();
    let started = Instant::now();
    let d = Deployment::start("CrossSubnet", 1);
    // Pod 0 on node-1 is the compromised one; the pod on node-3 stays unselected.
    let (own, other) = (&d.cluster.nodes[0], &d.cluster.nodes[1]);
    let (probe, bystander) = (&d.pods[0], &d.pods[2]);
    assert_eq!((probe.node, bystander.node), (0, 2));
    let mut pods = String::new();
    for (p, role) in d.pods.iter().zip(["probe", "other", "other"]) {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: {role}}}}}\nspec: {{containers: [{{name: c}}]}}\n",
            p.sb.pod
        ));
    }
    d.apply(&pods);
    let _stand_ins: Vec<StandIn> = [own, other]
        .iter()
        .flat_map(|n| {
            [
                StandIn::start(&n.ns, SSH, "SSH-2.0-stand-in"),
                StandIn::start(&n.ns, KUBELET, "kubelet stand-in"),
            ]
        })
        .collect();

    // The management ports of the other node, of etcd on the fabric, and of the pod's own
    // node on each of its addresses.
    let mut targets: Vec<(String, SocketAddr)> = Vec::new();
    let mut add = |who: &str, ip: Ipv4Addr, ports: &[u16]| {
        for &port in ports {
            targets.push((format!("{who} {ip}:{port}"), (ip, port).into()));
        }
    };
    let node_ports = [SSH, KUBELET, HEALTH, METRICS];
    add(&other.name, other.ip, &node_ports);
    add("etcd", ETCD_IP, &[ETCD_CLIENT]);
    let own_ips = own_addresses(&own.ns);
    assert!(own_ips.contains(&own.ip), "{own_ips:?}");
    for ip in &own_ips {
        add(&format!("{} (own)", own.name), *ip, &node_ports);
    }
    let allowed = (other.ip, SSH).into();
    // etcd's host knows the way back to pod addresses, as a fabric that routes them does
    // (nothing here NATs pod traffic).
    d.cluster.etcd.as_ref().unwrap().ns.ip(&[
        "route",
        "replace",
        "10.65.0.0/16",
        "via",
        &own.ip.to_string(),
    ]);

    // (c) No policy selects the pod: Kubernetes semantics, everything is allowed, the
    // management ports of every node included (there are no host endpoints).
    let open = survey(probe, &targets);
    eprintln!("no policy selects the pod:\n{}", table(&open));
    for (name, r) in &open {
        assert!(
            matches!(r, Reach::Open(_)),
            "{name}: {r:?}\n{}",
            table(&open)
        );
    }

    // A pod is a host that is not a node too: IP-in-IP it sends to another node (its
    // egress allows anything) is dropped there, whatever it carries. Here a packet for the
    // pod on that node from a forged inner source, which would get around a policy keyed
    // on sources if it were unwrapped.
    let target = &d.pods[1];
    assert_eq!(target.node, 1);
    let inbox = target
        .sb
        .ns
        .run(|| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53)).unwrap());
    inbox
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // From its own address a datagram gets there (so the drops below are not for nothing).
    let send_from = |src: Ipv4Addr, n: usize| {
        probe.sb.ns.run(|| {
            let s = std::net::UdpSocket::bind((src, 0)).unwrap();
            for _ in 0..n {
                s.send_to(b"x", (target.ip, 53)).unwrap();
            }
        });
    };
    send_from(probe.ip, 1);
    assert!(inbox.recv(&mut [0u8; 64]).is_ok(), "baseline datagram");
    // Sent from another pod's address, its own node's or another node's (addresses a policy
    // may trust): dropped on its veth and counted, whatever the destination would allow.
    for forged in [bystander.ip, own.ip, other.ip] {
        let cidr = format!("{forged}/32");
        probe.sb.ns.ip(&["addr", "add", &cidr, "dev", "eth0"]);
        let before = node_counter(&d, 0, hook::FROM_WORKLOAD, counter::DROP_SPOOFED_SOURCE);
        send_from(forged, 3);
        let delivered = inbox.recv(&mut [0u8; 64]).is_ok();
        let after = node_counter(&d, 0, hook::FROM_WORKLOAD, counter::DROP_SPOOFED_SOURCE);
        probe.sb.ns.ip(&["addr", "del", &cidr, "dev", "eth0"]);
        assert!(!delivered, "a datagram from forged {forged} was delivered");
        assert_eq!(after, before + 3, "forged {forged}: spoofed drops counted");
    }

    let before = node_counter(&d, 1, hook::HOST_INGRESS, counter::DROP_UNKNOWN_IPIP_PEER);
    let inner = dataplane_tests::packets::udp_frame(Ipv4Addr::new(10, 65, 77, 1), target.ip, b"x")
        [14..]
        .to_vec();
    dataplane_tests::packets::send_ipip(&probe.sb.ns, &[other.ip; 3], &inner);
    assert!(
        inbox.recv(&mut [0u8; 64]).is_err(),
        "the inner packet was delivered"
    );
    let after = node_counter(&d, 1, hook::HOST_INGRESS, counter::DROP_UNKNOWN_IPIP_PEER);
    assert_eq!(after, before + 3, "IP-in-IP from a pod dropped and counted");

    // (a) A default-deny egress policy selects it: nothing answers, every SYN is dropped by
    // the program on its veth and counted as a policy drop.
    d.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: probe-egress, namespace: default}\nspec:\n  podSelector: {matchLabels: {role: probe}}\n  policyTypes: [Egress]\n",
    );
    let before = policy_drops(&d, 0);
    let denied = survey(probe, &targets);
    let after = policy_drops(&d, 0);
    eprintln!("default-deny egress:\n{}", table(&denied));
    for (name, r) in &denied {
        assert_eq!(*r, Reach::Silent, "{name}\n{}", table(&denied));
    }
    assert!(
        after >= before + targets.len() as u64,
        "every probe's SYN is a policy drop on node-1: {before} → {after}"
    );
    // The policy is the pod's, not the node's: an unselected pod elsewhere still reaches them.
    assert!(
        matches!(reach(&bystander.sb.ns, allowed), Reach::Open(_)),
        "an unselected pod"
    );

    // (b) The egress policy allows exactly the other node's address on port 22.
    d.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: probe-egress, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{role: probe}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {}/32}}}}]\n    ports: [{{protocol: TCP, port: {SSH}}}]\n",
        other.ip
    ));
    let one = survey(probe, &targets);
    eprintln!("egress allows {allowed} only:\n{}", table(&one));
    for ((name, to), (_, r)) in targets.iter().zip(&one) {
        if *to == allowed {
            assert_eq!(*r, Reach::Open("SSH-2.0-stand-in".to_owned()), "{name}");
        } else {
            assert_eq!(*r, Reach::Silent, "{name}\n{}", table(&one));
        }
    }
    eprintln!("took {:?}", started.elapsed());
}

/// Sends `request` raw from `ns` to `to` and returns whatever came back (empty when the
/// server closed without a word). A send cut short by the server is not an error here.
fn raw(ns: &Netns, to: SocketAddr, request: &[u8]) -> Vec<u8> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _sent = s.write_all(request);
        let mut got = Vec::new();
        let _read = s.read_to_end(&mut got);
        got
    })
}

/// The status code of a raw HTTP/1 response.
fn status(resp: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(resp);
    let line = text.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

fn request(ns: &Netns, to: SocketAddr, method: &str, path: &str, body: &str) -> Option<u16> {
    status(&raw(
        ns,
        to,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    ))
}

/// The metrics that move only when the agent's state does (not packet counters, which tick
/// with any traffic, nor histograms' sums).
fn state_metrics(ns: &Netns, ip: Ipv4Addr) -> BTreeSet<String> {
    let body = ns.run(|| http_get(ip, METRICS, "/metrics")).unwrap();
    let kept = [
        "dataplane_map_entries",
        "dataplane_map_max_entries",
        "dataplane_attached_interfaces",
        "dataplane_sync_revision_programmed",
        "dataplane_sync_revision_seen",
        "dataplane_sync_lag_revisions",
        "dataplane_reconcile_duration_seconds_count",
        "dataplane_etcd_reconnects_total",
        "dataplane_etcd_regressions_total",
        "dataplane_sync_held_endpoints",
        "dataplane_ready",
    ];
    let set: BTreeSet<String> = body
        .lines()
        .filter(|l| {
            kept.iter()
                .any(|k| l.strip_prefix(k).is_some_and(|r| r.starts_with([' ', '{'])))
        })
        // Conntrack fills with whatever traffic the node sees.
        .filter(|l| !l.contains("conntrack"))
        .map(str::to_owned)
        .collect();
    assert!(
        set.iter().any(|l| l.starts_with("dataplane_ready")),
        "{body}"
    );
    set
}

/// What the maps hold, as `map-dump` shows it.
fn maps(node: &dataplane_tests::Node, pins: &PinDirGuard) -> String {
    let dir = pins.path.display().to_string();
    ["routes", "endpoints", "policy", "ipsets"]
        .iter()
        .map(|kind| {
            let (st, out, err) =
                dataplane_tests::dataplane(&node.ns, &["map-dump", kind, "--bpffs-dir", &dir]);
            assert!(st.success(), "map-dump {kind}: {err}");
            out
        })
        .collect()
}

fn wait_code(ns: &Netns, to: SocketAddr, path: &str, want: u16, agent: &mut Agent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = ns.run(|| {
            TcpStream::connect_timeout(&to, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        if got.is_some() && request(ns, to, "GET", path, "") == Some(want) {
            return;
        }
        if let Some(st) = agent.process.exited() {
            panic!("agent exited ({st}):\n{}", agent.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{to}{path} not {want}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_the_agents_http_endpoints_change_nothing_and_survive_bad_requests() {
    require_root();
    let cluster = Cluster::new(&[1], true);
    let node = &cluster.nodes[0];
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(
        node,
        &pins,
        cluster.etcd.as_ref(),
        &["--cni-metrics-socket", "off"],
    );
    wait_attached(&node.ns, "eth0", &mut agent, Duration::from_secs(20));
    // Asked from a host on the fabric that is not a node (the router), over the node's address.
    let from = &cluster.router.ns;
    let health: SocketAddr = (node.ip, HEALTH).into();
    let metrics: SocketAddr = (node.ip, METRICS).into();
    wait_code(from, health, "/readiness", 200, &mut agent);
    let state = state_metrics(from, node.ip);
    let tables = maps(node, &pins);

    let served = [
        (health, ["/liveness", "/readiness"]),
        (metrics, ["/metrics", "/metrics"]),
    ];
    let bodies = [
        "",
        "{\"ready\": false}",
        "{\"loglevel\": \"trace\", \"quit\": true}",
    ];
    let mut tried = 0;
    for (listener, paths) in served {
        for path in ["/liveness", "/readiness", "/metrics"] {
            let want = if paths.contains(&path) { 405 } else { 404 };
            for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
                for body in bodies {
                    assert_eq!(
                        request(from, listener, method, path, body),
                        Some(want),
                        "{method} {listener}{path} {body}"
                    );
                    tried += 1;
                }
            }
            let get = request(from, listener, "GET", path, "");
            assert_eq!(get, Some(if want == 405 { 200 } else { 404 }), "GET {path}");
            let head = request(from, listener, "HEAD", path, "");
            assert_eq!(head, get, "HEAD {listener}{path}");
        }
        // Unknown paths, whatever the method.
        for path in [
            "/",
            "/quitquitquit",
            "/debug/pprof/",
            "/config",
            "/liveness/",
            "/READINESS",
            "/metrics/x",
            "/%2e%2e/etc/passwd",
        ] {
            for method in ["GET", "POST", "PUT", "DELETE"] {
                assert_eq!(
                    request(from, listener, method, path, "{}"),
                    Some(404),
                    "{method} {listener}{path}"
                );
                tried += 1;
            }
        }
    }

    // Malformed and oversized requests: an error status or a closed connection, never a 2xx,
    // and the agent carries on.
    let big_header = format!(
        "GET /readiness HTTP/1.1\r\nHost: node\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let big_body = format!(
        "POST /readiness HTTP/1.1\r\nHost: node\r\nConnection: close\r\nContent-Length: {n}\r\n\r\n{}",
        "b".repeat(8 << 20),
        n = 8 << 20
    );
    let long_path = format!(
        "GET /{} HTTP/1.1\r\nHost: node\r\n\r\n",
        "p".repeat(200_000)
    );
    let many_headers = format!(
        "GET /readiness HTTP/1.1\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-{i}: {i}\r\n"))
            .collect::<String>()
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("a TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00".to_vec()),
        ("binary junk", (0..=255u8).cycle().take(4096).collect()),
        ("no request line", b"\r\n\r\n\r\n\r\n".to_vec()),
        ("a bad method token", b"G@T /readiness HTTP/1.1\r\nHost: node\r\n\r\n".to_vec()),
        ("HTTP/9", b"GET /readiness HTTP/9.9\r\nHost: node\r\n\r\n".to_vec()),
        ("a 1 MiB header", big_header.into_bytes()),
        ("500 headers", many_headers.into_bytes()),
        ("a 200 kB path", long_path.into_bytes()),
        ("an 8 MiB body", big_body.into_bytes()),
        (
            "a huge Content-Length",
            b"POST /liveness HTTP/1.1\r\nHost: node\r\nContent-Length: 18446744073709551615\r\n\r\nx".to_vec(),
        ),
        (
            "two Content-Lengths",
            b"POST /liveness HTTP/1.1\r\nHost: node\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nxxxxx".to_vec(),
        ),
        (
            "a broken chunk",
            b"POST /metrics HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n".to_vec(),
        ),
        ("an HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
    ];
    for (listener, _) in served {
        for (what, bytes) in &bad {
            let resp = raw(from, listener, bytes);
            let code = status(&resp);
            eprintln!("{what} to {listener}: {code:?} ({} bytes back)", resp.len());
            assert!(
                !code.is_some_and(|c| (200..300).contains(&c)),
                "{what} to {listener} got {code:?}"
            );
            assert!(agent.process.exited().is_none(), "the agent died of {what}");
        }
    }
    // More connections than the listener serves at once, held open without a word: the
    // agent holds no more than its cap of them, ends each after its lifetime, and a probe
    // queued behind them is answered once the first ones end; its descriptors come back.
    use dataplane::health::{CONNECTION_LIFETIME, MAX_CONNECTIONS};
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.process.pid()))
            .unwrap()
            .count()
    };
    let fds_before = fds();
    let n_idle = MAX_CONNECTIONS + MAX_CONNECTIONS / 2;
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = from.run(|| {
        (0..n_idle)
            .map(|_| TcpStream::connect_timeout(&health, Duration::from_secs(1)).unwrap())
            .collect()
    });
    std::thread::sleep(Duration::from_millis(300));
    let fds_held = fds();
    assert!(
        fds_held <= fds_before + MAX_CONNECTIONS + 2,
        "{n_idle} idle connections hold {} descriptors of the agent",
        fds_held - fds_before
    );
    let probe = from.run(|| {
        let mut s = TcpStream::connect_timeout(&health, Duration::from_secs(1)).unwrap();
        s.set_read_timeout(Some(CONNECTION_LIFETIME * 3)).unwrap();
        s.write_all(b"GET /readiness HTTP/1.0\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let _read = s.read_to_end(&mut got);
        got
    });
    let waited = started.elapsed();
    assert_eq!(status(&probe), Some(200), "the queued probe");
    assert!(
        waited < CONNECTION_LIFETIME + Duration::from_secs(3),
        "the queued probe waited {waited:?}"
    );
    for s in &mut idle {
        s.set_read_timeout(Some(CONNECTION_LIFETIME * 3)).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "an idle connection still open after {:?}: {other:?}",
                started.elapsed()
            ),
        }
    }
    let all_closed = started.elapsed();
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    let fds_after = fds();
    assert!(
        fds_after <= fds_before + 4,
        "descriptors: {fds_before} before, {fds_held} held, {fds_after} after"
    );
    eprintln!(
        "{n_idle} idle connections: agent descriptors {fds_before} → {fds_held} → {fds_after}; \
         queued probe answered after {waited:?}, all closed by the agent after {all_closed:?}"
    );

    // Nothing changed: alive, ready, the same state in the metrics and the maps.
    assert!(agent.process.exited().is_none(), "{}", agent.log_text());
    assert_eq!(request(from, health, "GET", "/liveness", ""), Some(200));
    assert_eq!(request(from, health, "GET", "/readiness", ""), Some(200));
    assert_eq!(
        state_metrics(from, node.ip),
        state,
        "the agent's state moved"
    );
    assert_eq!(maps(node, &pins), tables, "the maps moved");
    eprintln!(
        "{tried} requests with other methods or paths, {} malformed",
        bad.len() * 2
    );
}

/// The TCP sockets listening in the namespace of process `pid`.
fn listening(pid: u32) -> BTreeSet<SocketAddr> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // st 0A: LISTEN. Addresses are hex, the IPv4 one in host byte order.
            (f.get(3) == Some(&"0A")).then_some(())?;
            let (ip, port) = f.get(1)?.split_once(':')?;
            let ip = Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
            Some((ip, u16::from_str_radix(port, 16).ok()?).into())
        })
        .collect()
}

#[test]
fn root_the_agents_listeners_bind_only_where_configured() {
    require_root();
    let cluster = Cluster::new(&[1], false);
    let node = &cluster.nodes[0];
    let from = &cluster.router.ns;
    let (h, m) = (19099, 19091);
    let health_lo: SocketAddr = (Ipv4Addr::LOCALHOST, h).into();
    let metrics_node: SocketAddr = (node.ip, m).into();
    let dir = tempfile::tempdir().unwrap();
    let cni_socket = dir.path().join("cni-metrics.sock");
    {
        let pins = PinDirGuard::new();
        let (hl, ml) = (health_lo.to_string(), metrics_node.to_string());
        let cs = cni_socket.display().to_string();
        let mut agent = Agent::start(
            node,
            &pins,
            None,
            &[
                "--health-listen",
                &hl,
                "--metrics-listen",
                &ml,
                "--cni-metrics-socket",
                &cs,
            ],
        );
        wait_attached(&node.ns, "eth0", &mut agent, Duration::from_secs(20));
        wait_code(&node.ns, health_lo, "/readiness", 200, &mut agent);
        wait_code(&node.ns, metrics_node, "/metrics", 200, &mut agent);
        assert_eq!(
            listening(agent.process.pid()),
            BTreeSet::from([health_lo, metrics_node]),
            "only the configured addresses listen"
        );
        // Health on loopback only: not on the node's address, from the node or the fabric.
        assert_eq!(reach(&node.ns, (node.ip, h).into()), Reach::Refused);
        assert_eq!(reach(from, (node.ip, h).into()), Reach::Refused);
        // Metrics on the node's address only: not on loopback.
        assert_eq!(
            reach(&node.ns, (Ipv4Addr::LOCALHOST, m).into()),
            Reach::Refused
        );
        assert!(matches!(reach(from, metrics_node), Reach::Open(_)));
        // Nor on the default ports.
        assert_eq!(reach(&node.ns, (node.ip, HEALTH).into()), Reach::Refused);
        assert_eq!(reach(&node.ns, (node.ip, METRICS).into()), Reach::Refused);

        // The CNI latency socket: root only, and what is not a record is dropped without
        // a trace in the histogram; one record counts once.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&cni_socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{cni_socket:?}");
        let cni_counts = || -> Vec<String> {
            let body = from.run(|| http_get(node.ip, m, "/metrics")).unwrap();
            body.lines()
                .filter(|l| l.starts_with("dataplane_cni_operation_duration_seconds_count"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(cni_counts(), Vec::<String>::new());
        let padded = format!(
            "{{\"command\":\"ADD\",\"code\":0,\"seconds\":0.5{}}}",
            " ".repeat(600)
        );
        let junk: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            (0..=255u8).collect(),
            b"{\"command\":\"ADD\",\"code\":0,\"seconds\":-1}".to_vec(),
            b"{\"command\":\"ADD\",\"code\":0,\"seconds\":1e300}".to_vec(),
            b"{\"command\":\"ADD\",\"code\":-3,\"seconds\":0.5}".to_vec(),
            b"{\"command\":\"ADD\"}".to_vec(),
            padded.into_bytes(),
            Vec::new(),
        ];
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        for j in &junk {
            tx.send_to(j, &cni_socket).unwrap();
        }
        tx.send_to(
            b"{\"command\":\"DEL\",\"code\":0,\"seconds\":0.25}",
            &cni_socket,
        )
        .unwrap();
        let want = vec![
            "dataplane_cni_operation_duration_seconds_count{command=\"DEL\",result=\"ok\"} 1"
                .to_owned(),
        ];
        let deadline = Instant::now() + Duration::from_secs(5);
        while cni_counts() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(cni_counts(), want, "{} junk datagrams", junk.len());
        assert!(agent.process.exited().is_none(), "{}", agent.log_text());
        agent.process.stop(Duration::from_secs(5));
    }
    // `off`: nothing listens at all, and the agent runs.
    let pins = PinDirGuard::new();
    let mut agent = Agent::start(
        node,
        &pins,
        None,
        &[
            "--health-listen",
            "off",
            "--metrics-listen",
            "off",
            "--cni-metrics-socket",
            "off",
        ],
    );
    wait_attached(&node.ns, "eth0", &mut agent, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.process.exited().is_none(), "{}", agent.log_text());
    assert_eq!(
        listening(agent.process.pid()),
        BTreeSet::new(),
        "with both off nothing listens:\n{}",
        agent.log_text()
    );
    for port in [HEALTH, METRICS, h, m] {
        assert_eq!(
            reach(&node.ns, (Ipv4Addr::LOCALHOST, port).into()),
            Reach::Refused
        );
        assert_eq!(reach(from, (node.ip, port).into()), Reach::Refused);
    }
}

//! Traffic between pods of the cluster in a box: TCP and UDP echo servers inside pods, the
//! clients that probe them, ping, and a tcpdump capture of IP-in-IP on the fabric.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use std::time::Instant;

use crate::{
    Agent, ChildGuard, Cluster, Netns, PinDirGuard,
    cni::{PluginDir, Sandbox, cni, dataplane_conf},
    dataplane, dataplane_args, wait_attached, wait_ready,
};

/// The echo servers' port.
pub const ECHO_PORT: u16 = 7000;

/// A pod made through the CNI plugin on node `node` (index into the cluster's nodes).
pub struct Pod {
    pub node: usize,
    pub sb: Sandbox,
    pub ip: Ipv4Addr,
}

/// A TCP echo and a UDP echo server on port ECHO_PORT inside a pod, stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start(pod: &Pod) -> Self {
        let (tcp, udp) = pod.sb.ns.run(|| {
            (
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)).unwrap(),
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)).unwrap(),
            )
        });
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s1 = stop.clone();
        let t1 = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 64];
                        if let Ok(n) = c.read(&mut buf) {
                            let _sent = c.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let s2 = stop.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _sent = udp.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            stop,
            threads: vec![t1, t2],
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _joined = t.join();
        }
    }
}

pub fn tcp_echo(from: &Pod, to: Ipv4Addr) -> bool {
    from.sb.ns.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&(to, ECHO_PORT).into(), Duration::from_secs(2))
        else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    })
}

/// A TCP echo to `to` that gives up after `timeout` (a denied connection is silent: its SYN
/// is dropped, so a short timeout keeps probes of denied pairs quick).
pub fn tcp_probe(from: &Pod, to: Ipv4Addr, timeout: Duration) -> bool {
    from.sb.ns.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&(to, ECHO_PORT).into(), timeout) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    })
}

pub fn udp_echo(from: &Pod, to: Ipv4Addr) -> bool {
    from.sb.ns.run(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 8];
        (0..3).any(|_| {
            s.send_to(b"ping", (to, ECHO_PORT)).is_ok()
                && s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"ping")
        })
    })
}

pub fn ping(ns: &Netns, to: Ipv4Addr) -> bool {
    let status = ns
        .command("ping")
        .args(["-c", "1", "-W", "2", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    status.is_ok_and(|s| s.success())
}

/// tcpdump on every port of the fabric, printing IP-in-IP packets.
pub fn capture(cluster: &Cluster) -> (ChildGuard, std::sync::mpsc::Receiver<String>) {
    let mut child = cluster
        .fabric
        .ns
        .command("tcpdump")
        .args(["-i", "any", "-nn", "-l", "-Q", "in", "ip proto 4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ready = ready_tx.send(());
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tcpdump did not start");
    (ChildGuard::new(child, "tcpdump"), rx)
}

/// The inner (source, destination) of a tcpdump line of an IP-in-IP packet:
/// `… IP 192.168.1.10 > 192.168.1.11: IP 10.65.0.0.48796 > 10.65.0.64.ECHO_PORT: Flags …`.
pub fn inner_pair(line: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let inner = line.split(": IP ").nth(1)?;
    let mut words = inner.split_whitespace();
    let addr = |w: &str| -> Option<Ipv4Addr> {
        let w = w.trim_end_matches(':');
        let parts: Vec<&str> = w.split('.').take(4).collect();
        parts.join(".").parse().ok()
    };
    let src = addr(words.next()?)?;
    let _arrow = words.next()?;
    let dst = addr(words.next()?)?;
    Some((src, dst))
}

/// A running cluster in a box: three nodes (two on subnet 1, one behind the router), the
/// default pool in `mode`, an agent on every node synced from etcd, and `per_node` pods on
/// each made through the CNI plugin. Ready for traffic once [`Deployment::start`] returns.
pub struct Deployment {
    /// The agents' dataplane: `bpf` or `iptables` (`bare`: no agents).
    pub dataplane: String,
    // Field order is drop order: pods and agents before the cluster they live in.
    pub pods: Vec<Pod>,
    pub agents: Vec<Agent>,
    pub pins: Vec<PinDirGuard>,
    pub plugins: PluginDir,
    pub cluster: Cluster,
}

impl Deployment {
    pub fn start(mode: &str, per_node: usize) -> Self {
        Self::start_with(mode, per_node, Some("bpf"))
    }

    /// The same with the agents in `dataplane` mode (`bpf`, `iptables`, `iptables-nft` or
    /// `iptables-legacy`, see [`crate::dataplane_args`]; the iptables mode routes natively
    /// only, `mode` Never, and refuses IP-in-IP pools).
    pub fn start_with_dataplane(dataplane: &str, mode: &str, per_node: usize) -> Self {
        Self::start_with(mode, per_node, Some(dataplane))
    }

    /// The same cluster and pods with no dataplane at all: no agents, no programs, pod
    /// traffic routed by the kernel (routes to other nodes' blocks added to every node and
    /// the router, as a BGP fabric would): the baseline benches compare against.
    pub fn bare(per_node: usize) -> Self {
        Self::start_with("Never", per_node, None)
    }

    /// `agent_mode`: the agents' dataplane, or `None` for no agents at all.
    fn start_with(mode: &str, per_node: usize, agent_mode: Option<&str>) -> Self {
        let with_agents = agent_mode.is_some();
        let iptables = agent_mode.is_some_and(crate::cluster::is_iptables);
        let cluster = Cluster::new(&[1, 1, 2], true);
        let etcd = cluster.etcd.as_ref().unwrap().endpoint();
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pool.yaml");
        std::fs::write(
            &pool,
            format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: default-ipv4-ippool}}\nspec: {{cidr: 10.65.0.0/16, ipipMode: {mode}, natOutgoing: true}}\n"),
        )
        .unwrap();
        let n1 = &cluster.nodes[0];
        let (ok, _, err) = dataplane(
            &n1.ns,
            &[
                "ctl",
                "--etcd-endpoints",
                &etcd,
                "apply",
                "-f",
                &pool.display().to_string(),
            ],
        );
        assert!(ok.success(), "{err}");

        let n_agents = if with_agents { cluster.nodes.len() } else { 0 };
        let pins: Vec<PinDirGuard> = (0..n_agents).map(|_| PinDirGuard::new()).collect();
        let mut agents: Vec<Agent> = cluster
            .nodes
            .iter()
            .zip(&pins)
            .map(|(n, p)| {
                let extra = match agent_mode {
                    Some(m) if iptables => dataplane_args(m),
                    _ => Vec::new(),
                };
                Agent::start(n, p, cluster.etcd.as_ref(), &extra)
            })
            .collect();
        for (n, a) in cluster.nodes.iter().zip(agents.iter_mut()) {
            if iptables {
                wait_ready(n, a, Duration::from_secs(20));
            } else {
                wait_attached(&n.ns, "eth0", a, Duration::from_secs(20));
            }
        }
        let plugins = PluginDir::new();
        let mut pods = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            for k in 0..per_node {
                let sb = Sandbox::new(node, "default", &format!("{}-{k}", node.name));
                let conf = dataplane_conf("1.0.0", &etcd, &node.name);
                let r = cni(node, &plugins, "ADD", &sb, &conf).ok();
                let ip = crate::cni::result_ip(&r);
                pods.push(Pod { node: i, sb, ip });
            }
        }
        if !with_agents {
            for p in &pods {
                let block = format!("{}/26", Ipv4Addr::from(u32::from(p.ip) & !63));
                let owner = &cluster.nodes[p.node];
                for node in cluster
                    .nodes
                    .iter()
                    .filter(|n| n.subnet == owner.subnet && n.name != owner.name)
                {
                    node.ns
                        .ip(&["route", "replace", &block, "via", &owner.ip.to_string()]);
                }
            }
        }
        if mode == "Never" {
            // Native routing across subnets needs the fabric to know where pod blocks are (BGP in
            // a real cluster): tell the router.
            for p in &pods {
                let block = Ipv4Addr::from(u32::from(p.ip) & !63);
                let via = cluster.nodes[p.node].ip.to_string();
                let out = crate::netns::output(cluster.router.ns.command("ip").args([
                    "route",
                    "replace",
                    &format!("{block}/26"),
                    "via",
                    &via,
                ]));
                assert!(out.status.success());
            }
        }
        // Every node's routes must know the other nodes' blocks before traffic starts.
        if iptables {
            let placed: Vec<(usize, Ipv4Addr)> = pods.iter().map(|p| (p.node, p.ip)).collect();
            crate::cluster::wait_iptables_routes(&cluster, &agents, &placed, mode == "Never");
        }
        for (i, node) in cluster
            .nodes
            .iter()
            .enumerate()
            .take(n_agents)
            .filter(|_| !iptables)
        {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let dir = pins[i].path.display().to_string();
                let (_, out, _) = dataplane(
                    &node.ns,
                    &["map-dump", "routes", "--json", "--bpffs-dir", &dir],
                );
                let rows: Vec<dataplane::dump::RouteRow> =
                    serde_json::from_str(&out).unwrap_or_default();
                let remote = rows.iter().filter(|r| r.kind == "remote block").count();
                let local = rows.iter().filter(|r| r.kind == "local workload").count();
                if remote == if per_node > 0 { 2 } else { 0 } && local == per_node {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: routes not synced: {out}\n{}",
                    node.name,
                    agents[i].log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        Self {
            dataplane: agent_mode.unwrap_or("bare").to_owned(),
            pods,
            agents,
            pins,
            plugins,
            cluster,
        }
    }

    /// `dataplane ctl apply --wait` of `yaml`: returns once every node's agent has programmed
    /// it. Panics with the tool's message when it fails.
    pub fn apply(&self, yaml: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("manifest.yaml");
        std::fs::write(&f, yaml).unwrap();
        let (st, out, err) = self.ctl(&["apply", "--wait", "-f", &f.display().to_string()]);
        assert!(st.success(), "apply failed: {out}{err}\n{yaml}");
        out
    }

    /// `dataplane ctl ARGS…` against the cluster's etcd, from node 0.
    pub fn ctl(&self, args: &[&str]) -> (std::process::ExitStatus, String, String) {
        let etcd = self.cluster.etcd.as_ref().unwrap().endpoint();
        let mut all = vec!["ctl", "--etcd-endpoints", &etcd];
        all.extend_from_slice(args);
        dataplane(&self.cluster.nodes[0].ns, &all)
    }

    /// The `cali*` interfaces of node `i`.
    pub fn veths(&self, i: usize) -> Vec<String> {
        let links: serde_json::Value =
            serde_json::from_str(&self.cluster.nodes[i].ns.ip(&["-j", "link", "show"])).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("cali"))
            .map(str::to_owned)
            .collect()
    }

    /// `map-dump KIND` of node `i`, as text.
    pub fn map_dump(&self, i: usize, kind: &str) -> String {
        let dir = self.pins[i].path.display().to_string();
        dataplane(
            &self.cluster.nodes[i].ns,
            &["map-dump", kind, "--bpffs-dir", &dir],
        )
        .1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcpdump_lines_give_the_inner_pair() {
        let l = "18:59:22.870182 p4 P IP 192.168.1.11 > 192.168.2.10: IP 10.65.0.64 > 10.65.0.128: ICMP echo request";
        assert_eq!(
            inner_pair(l),
            Some((Ipv4Addr::new(10, 65, 0, 64), Ipv4Addr::new(10, 65, 0, 128)))
        );
        let l = "x P IP 192.168.1.10 > 192.168.2.10: IP 10.65.0.0.48796 > 10.65.0.1.ECHO_PORT: Flags [S]";
        assert_eq!(
            inner_pair(l),
            Some((Ipv4Addr::new(10, 65, 0, 0), Ipv4Addr::new(10, 65, 0, 1)))
        );
    }
}

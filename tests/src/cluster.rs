//! The cluster in a box: a fabric bridge in its own namespace, node namespaces whose `eth0`
//! plugs into it, a router namespace toward a second subnet, pods wired to their node, and an
//! etcd server on the fabric. Every piece is removed by its guard, in reverse order of making.

use std::{
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::netns::{ChildGuard, Netns, unique};

/// First subnet of the fabric; nodes on it are 192.168.1.10, .11, …
pub const SUBNET_1: [u8; 3] = [192, 168, 1];
/// Second subnet, behind the router; nodes on it are 192.168.2.10, …
pub const SUBNET_2: [u8; 3] = [192, 168, 2];
/// etcd's address on the fabric.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 250);
/// The router's legs: .1 on each subnet.
const ROUTER_HOST: u8 = 1;

/// The fabric: a namespace holding one bridge per subnet. Every other namespace of the
/// cluster plugs a veth into it.
#[derive(Debug)]
pub struct Fabric {
    pub ns: Netns,
    /// Prefix of this cluster's namespaces, unique on the machine.
    pub id: String,
    ports: std::sync::atomic::AtomicU32,
}

impl Fabric {
    pub fn new() -> Self {
        let id = unique("dp");
        let ns = Netns::new(&format!("{id}-fabric"));
        for br in ["br1", "br2"] {
            ns.ip(&["link", "add", br, "type", "bridge"]);
            ns.ip(&["link", "set", br, "up"]);
        }
        Self {
            ns,
            id,
            ports: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Plugs `iface` of `ns` into bridge `br{subnet}` with `addr/24`.
    pub fn plug(&self, ns: &Netns, iface: &str, subnet: u8, addr: Ipv4Addr) {
        let port = format!(
            "p{}",
            self.ports
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.ns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", iface, "netns", &ns.name,
        ]);
        self.ns
            .ip(&["link", "set", &port, "master", &format!("br{subnet}")]);
        self.ns.ip(&["link", "set", &port, "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface]);
        ns.ip(&["link", "set", iface, "up"]);
    }
}

impl Default for Fabric {
    fn default() -> Self {
        Self::new()
    }
}

/// The router between the two subnets: a namespace with a leg on each bridge, forwarding.
#[derive(Debug)]
pub struct Router {
    pub ns: Netns,
}

impl Router {
    pub fn new(fabric: &Fabric) -> Self {
        let ns = Netns::new(&format!("{}-router", fabric.id));
        for (subnet, net) in [(1, SUBNET_1), (2, SUBNET_2)] {
            let addr = Ipv4Addr::new(net[0], net[1], net[2], ROUTER_HOST);
            fabric.plug(&ns, &format!("eth{subnet}"), subnet, addr);
        }
        ns.sysctl("net.ipv4.ip_forward", "1");
        Self { ns }
    }
}

/// A whole cluster in a box. Fields drop in order: nodes (and their pods' namespaces go with
/// the pods' own guards), etcd, router, fabric.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Option<Etcd>,
    pub router: Router,
    pub fabric: Fabric,
}

impl Cluster {
    /// One node per entry of `subnets` (1 or 2), named node-1, node-2, …; hosts .10, .11, …
    /// on each subnet. `with_etcd` starts a real etcd on the fabric.
    pub fn new(subnets: &[u8], with_etcd: bool) -> Self {
        let fabric = Fabric::new();
        let router = Router::new(&fabric);
        let etcd = with_etcd.then(|| Etcd::start(&fabric));
        let mut hosts = [10u8, 10u8];
        let nodes = subnets
            .iter()
            .enumerate()
            .map(|(i, &subnet)| {
                let host = &mut hosts[usize::from(subnet == 2)];
                let node = Node::new(&fabric, &format!("node-{}", i + 1), subnet, *host);
                *host += 1;
                node
            })
            .collect();
        Self {
            nodes,
            etcd,
            router,
            fabric,
        }
    }
}

/// A node: a namespace whose `eth0` is on the fabric.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub subnet: u8,
    next_pod: std::sync::atomic::AtomicU32,
}

/// A pod wired to its node by hand, the way the CNI plugin does it: a veth `cali…` in the
/// node, `eth0` with a /32 in the pod, 169.254.1.1 as the gateway.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The host-side veth, in the node's namespace.
    pub host_iface: String,
    pub mac: String,
}

impl Node {
    /// Makes node `name` on `subnet` (1 or 2) with host number `host` (e.g. 10 → .10).
    pub fn new(fabric: &Fabric, name: &str, subnet: u8, host: u8) -> Self {
        let net = if subnet == 1 { SUBNET_1 } else { SUBNET_2 };
        let ip = Ipv4Addr::new(net[0], net[1], net[2], host);
        let ns = Netns::new(&format!("{}-{name}", fabric.id));
        fabric.plug(&ns, "eth0", subnet, ip);
        let gw = format!("{}.{}.{}.{ROUTER_HOST}", net[0], net[1], net[2]);
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        Self {
            name: name.to_owned(),
            ns,
            ip,
            subnet,
            next_pod: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The name the next pod's host veth will get: `cali` + 11 hex digits.
    pub fn next_workload_iface(&self) -> String {
        let n = self
            .next_pod
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(
            "cali{:011x}",
            (std::process::id() as u64) << 16 | u64::from(n)
        )
    }

    /// Wires a pod with address `ip` to this node by hand (until the CNI plugin does it).
    pub fn add_pod(&self, ip: Ipv4Addr) -> Pod {
        let host_iface = self.next_workload_iface();
        let ns = Netns::new(&format!("{}-{host_iface}", self.ns.name));
        self.ns.ip(&[
            "link",
            "add",
            &host_iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ]);
        let host_mac = self.ns.mac(&host_iface);
        self.ns.ip(&["link", "set", &host_iface, "up"]);
        self.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_iface]);
        self.ns
            .sysctl(&format!("net.ipv4.conf.{host_iface}.proxy_arp"), "1");
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]);
        // A permanent neighbour for the gateway: works whether or not the node has a route
        // covering 169.254.1.1 for proxy ARP, and keeps ARP out of what tests count.
        ns.ip(&[
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        let mac = ns.mac("eth0");
        self.ns.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            &host_iface,
            "nud",
            "permanent",
        ]);
        Pod {
            ns,
            ip,
            host_iface,
            mac,
        }
    }
}

/// A real etcd server (Debian's `etcd`) in its own namespace on the fabric, data in a temp dir.
#[derive(Debug)]
pub struct Etcd {
    // Field order is drop order: the process first, then its namespace and data.
    pub process: ChildGuard,
    pub ns: Netns,
    pub data_dir: tempfile::TempDir,
    pub ip: Ipv4Addr,
    /// Clients must use mutual TLS.
    pub tls: bool,
    /// Where the TLS files are (for a restart).
    tls_dir: Option<std::path::PathBuf>,
    /// Member name and the `--initial-cluster` it was started with.
    name: String,
    initial_cluster: String,
}

/// Certificates for an etcd with mutual TLS, made with the openssl CLI in a temporary dir:
/// a CA, the server's certificate (for the etcd address), a client's, a client certificate
/// that has expired, and a second CA that signed none of them.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dp-tls-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(d)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=dataplane test {ca}"),
                "-keyout",
                &format!("{ca}-key.pem"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        std::fs::write(
            d.join("server.ext"),
            format!("subjectAltName=IP:{ETCD_IP}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        // An expired client certificate: signed by the CA, valid only in 2020.
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(d.join("serial"), "1000\n").unwrap();
        std::fs::write(
            d.join("ca.cnf"),
            "[ca]\ndefault_ca=c\n[c]\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\n\
             default_md=sha256\npolicy=p\ncopy_extensions=copy\n[p]\ncommonName=supplied\n",
        )
        .unwrap();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=expired",
            "-keyout",
            "expired-key.pem",
            "-out",
            "expired.csr",
        ]);
        openssl(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca-key.pem",
            "-in",
            "expired.csr",
            "-out",
            "expired.pem",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extfile",
            "client.ext",
            "-notext",
        ]);
        Self { dir }
    }
}

impl Etcd {
    pub fn start(fabric: &Fabric) -> Self {
        Self::start_with(fabric, None)
    }

    /// etcd serving clients over mutual TLS only (`https://`, client certificates signed by
    /// the test CA required).
    pub fn start_tls(fabric: &Fabric, tls: &TlsFiles) -> Self {
        Self::start_with(fabric, Some(tls))
    }

    fn start_with(fabric: &Fabric, tls: Option<&TlsFiles>) -> Self {
        let etcd = Self::launch(
            fabric,
            tls,
            "etcd0",
            ETCD_IP,
            &format!("etcd0=http://{ETCD_IP}:2380"),
        );
        etcd.wait_healthy(Duration::from_secs(20));
        etcd
    }

    /// Starts member `name` at `ip` of the cluster `initial_cluster` (etcd's
    /// `name=peer-url,…`) in a namespace of its own; does not wait for it.
    fn launch(
        fabric: &Fabric,
        tls: Option<&TlsFiles>,
        name: &str,
        ip: Ipv4Addr,
        initial_cluster: &str,
    ) -> Self {
        let ns = Netns::new(&format!("{}-{name}", fabric.id));
        fabric.plug(&ns, "eth0", 1, ip);
        // Replies to nodes on the second subnet go through the router.
        let gw = format!(
            "{}.{}.{}.{ROUTER_HOST}",
            SUBNET_1[0], SUBNET_1[1], SUBNET_1[2]
        );
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"]);
        let data_dir = tempfile::Builder::new()
            .prefix("dp-etcd-")
            .tempdir()
            .unwrap();
        let tls_dir = tls.map(|t| t.dir.path().to_owned());
        let mut etcd = Self {
            process: ChildGuard {
                child: None,
                what: String::new(),
            },
            ns,
            data_dir,
            ip,
            tls: tls.is_some(),
            tls_dir,
            name: name.to_owned(),
            initial_cluster: initial_cluster.to_owned(),
        };
        etcd.process = ChildGuard::new(etcd.spawn(false), format!("etcd {name}"));
        etcd
    }

    /// Starts etcd again on the same data (after `process.stop`, say) and waits until it
    /// serves clients.
    pub fn restart(&mut self) {
        self.process = ChildGuard::new(self.spawn(true), format!("etcd {} (restarted)", self.name));
        self.wait_healthy(Duration::from_secs(20));
    }

    /// `etcdctl snapshot save FILE` (plaintext etcd only).
    pub fn snapshot_save(&self, file: &std::path::Path) {
        let out = crate::netns::output(
            self.ns
                .command("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "snapshot", "save"])
                .arg(file),
        );
        assert!(
            out.status.success(),
            "etcdctl snapshot save: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops etcd, replaces its data with the snapshot `file` (`etcdutl snapshot restore`
    /// when installed, else `etcdctl snapshot restore`, same member name and peer URL: the
    /// cluster id stays), starts it again and waits until it serves clients: etcd restored
    /// from a backup, its history back at the snapshot's revision.
    pub fn restore(&mut self, file: &std::path::Path) {
        self.process.stop(Duration::from_secs(5));
        let data = self.data_dir.path().join("data");
        std::fs::remove_dir_all(&data).unwrap();
        let on_path = |t: &str| {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
        };
        let tool = if on_path("etcdutl") {
            "etcdutl"
        } else {
            "etcdctl"
        };
        let peer = format!("http://{}:2380", self.ip);
        let out = crate::netns::output(
            self.ns
                .command(tool)
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(file)
                .args([
                    "--name",
                    &self.name,
                    "--initial-cluster",
                    &self.initial_cluster,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--data-dir",
                ])
                .arg(&data),
        );
        assert!(
            out.status.success(),
            "{tool} snapshot restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.restart();
    }

    /// Stops etcd, deletes its data and starts it again empty with the same member
    /// configuration (so the same cluster id): etcd wiped and recreated, its revisions
    /// starting over.
    pub fn wipe(&mut self) {
        self.process.stop(Duration::from_secs(5));
        std::fs::remove_dir_all(self.data_dir.path().join("data")).unwrap();
        self.restart();
    }

    /// The etcd process, logging into the data dir (appending on a restart).
    fn spawn(&self, append: bool) -> std::process::Child {
        let tls = self.tls_dir.as_deref();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:2379", self.ip);
        let peer = format!("http://{}:2380", self.ip);
        let data_dir = self.data_dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(data_dir.join("etcd.log"))
            .unwrap();
        let mut cmd = self.ns.command("etcd");
        if let Some(t) = tls {
            let f = |n: &str| t.join(n).display().to_string();
            cmd.args([
                "--cert-file",
                &f("server.pem"),
                "--key-file",
                &f("server-key.pem"),
                "--trusted-ca-file",
                &f("ca.pem"),
                "--client-cert-auth",
            ]);
        }
        cmd.args(["--name", &self.name, "--data-dir"])
            .arg(data_dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.initial_cluster,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start etcd (run `cargo xtask setup`): {e}"))
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.ip)
    }

    /// Waits until etcd answers `/health` with `"health":"true"` (with TLS: until it says in
    /// its log that it serves clients).
    fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let body = if self.tls {
                std::fs::read_to_string(self.data_dir.path().join("etcd.log")).map(|l| {
                    if l.contains("ready to serve client requests") {
                        "\"health\":\"true\"".to_owned()
                    } else {
                        String::new()
                    }
                })
            } else {
                self.ns.run(|| http_get(self.ip, 2379, "/health"))
            };
            if body
                .as_deref()
                .is_ok_and(|b| b.contains("\"health\":\"true\""))
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.data_dir.path().join("etcd.log"))
                    .unwrap_or_default();
                panic!("etcd not healthy after {timeout:?}: {body:?}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A cluster of etcd members (plaintext), each in a namespace of its own on the fabric:
/// 192.168.1.250, .249, .248, …
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    pub fn start(fabric: &Fabric, n: u8) -> Self {
        let ips: Vec<Ipv4Addr> = (0..n)
            .map(|i| Ipv4Addr::new(SUBNET_1[0], SUBNET_1[1], SUBNET_1[2], 250 - i))
            .collect();
        let initial: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("etcd{i}=http://{ip}:2380"))
            .collect();
        let initial = initial.join(",");
        // All members first: none is healthy before a quorum runs.
        let members: Vec<Etcd> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| Etcd::launch(fabric, None, &format!("etcd{i}"), *ip, &initial))
            .collect();
        for m in &members {
            m.wait_healthy(Duration::from_secs(30));
        }
        Self { members }
    }

    /// Every member's client URL, comma separated (as `--etcd-endpoints` takes them).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A minimal HTTP/1.0 GET over a plain TCP socket, returning the body (sent from whatever
/// namespace the calling thread is in).
pub fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> std::io::Result<String> {
    http_request(ip, port, "GET", path, "")
}

/// A minimal HTTP/1.0 request; returns the body.
pub fn http_request(
    ip: Ipv4Addr,
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {ip}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// The path of the `dataplane` binary under test: `$DATAPLANE_BIN`, else the one cargo built
/// next to this test executable (target/<profile>/dataplane).
pub fn dataplane_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("dataplane");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the dataplane binary is not built next to {exe:?}; run `cargo build -p dataplane-user` \
         (cargo xtask test does) or set DATAPLANE_BIN"
    );
}

/// A pin directory on bpffs for one agent, removed on drop (which also detaches anything
/// still attached through links pinned in it).
#[derive(Debug)]
pub struct PinDirGuard {
    pub path: std::path::PathBuf,
}

impl PinDirGuard {
    pub fn new() -> Self {
        Self {
            path: std::path::PathBuf::from("/sys/fs/bpf").join(unique("dptest-")),
        }
    }
}

impl Default for PinDirGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: remove {:?}: {e}", self.path),
        }
    }
}

/// A `dataplane agent` running in a node's namespace, stopped on drop.
#[derive(Debug)]
pub struct Agent {
    pub process: ChildGuard,
    pub log: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent for `node` with pins in `pins`; `extra` are more arguments. Does not
    /// wait for it to be ready (see [`wait_attached`]).
    pub fn start(node: &Node, pins: &PinDirGuard, etcd: Option<&Etcd>, extra: &[&str]) -> Self {
        let log_dir = tempfile::Builder::new()
            .prefix("dp-agent-")
            .tempdir()
            .unwrap();
        let log = log_dir.path().join("agent.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = node.ns.command(dataplane_bin());
        cmd.args([
            "agent",
            "--node",
            &node.name,
            "--host-iface",
            "eth0",
            "--bpffs-dir",
        ])
        .arg(&pins.path);
        if let Some(etcd) = etcd {
            cmd.args(["--etcd-endpoints", &etcd.endpoint()]);
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start the agent: {e}"));
        Self {
            process: ChildGuard::new(child, format!("agent on {}", node.name)),
            log,
            _log_dir: log_dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Names of the TCX programs attached to `iface` in `ns`, (ingress, egress).
pub fn tcx_programs(ns: &Netns, iface: &str) -> (Vec<String>, Vec<String>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let iface = iface.to_owned();
    ns.run(move || {
        let names = |t| -> Vec<String> {
            match SchedClassifier::query_tcx(&iface, t) {
                Ok((_, progs)) => progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        (names(TcAttachType::Ingress), names(TcAttachType::Egress))
    })
}

/// Waits until `iface` in `ns` has exactly one program on each TC hook, or panics after
/// `timeout` with the agent's log.
pub fn wait_attached(ns: &Netns, iface: &str, agent: &mut Agent, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (ingress, egress) = tcx_programs(ns, iface);
        if ingress.len() == 1 && egress.len() == 1 {
            return;
        }
        if let Some(status) = agent.process.exited() {
            panic!(
                "agent exited ({status}) before attaching to {iface}:\n{}",
                agent.log_text()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{iface} not attached after {timeout:?} (ingress {ingress:?}, egress {egress:?}):\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `dataplane ARGS…` in `ns` to completion and returns (exit status, stdout, stderr).
pub fn dataplane(ns: &Netns, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = crate::netns::output(ns.command(dataplane_bin()).args(args));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a shell-free command in `ns` with a timeout; used for ping and the like.
pub fn ns_command_ok(ns: &Netns, program: &str, args: &[&str]) -> bool {
    let status = ns
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    status.is_ok_and(|s| s.success())
}

/// The `agent` arguments that select dataplane `dataplane`: `bpf`, `iptables` (its default
/// backend, nft), `iptables-nft` or `iptables-legacy`.
pub fn dataplane_args(dataplane: &str) -> Vec<&str> {
    match dataplane.split_once('-') {
        Some(("iptables", backend)) => {
            vec!["--dataplane", "iptables", "--iptables-backend", backend]
        }
        _ => vec!["--dataplane", dataplane],
    }
}

/// Whether `dataplane` (as [`dataplane_args`] takes it) is an iptables mode.
pub fn is_iptables(dataplane: &str) -> bool {
    dataplane.starts_with("iptables")
}

/// Waits until the agent answers `GET /readiness` on its default health port (9099) with
/// `ready`: started and its first full sync programmed. Panics after `timeout` with its log.
pub fn wait_ready(node: &Node, agent: &mut Agent, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let body = node
            .ns
            .run(|| http_get(Ipv4Addr::LOCALHOST, 9099, "/readiness"));
        if body.as_deref().is_ok_and(|b| b.trim() == "ready") {
            return;
        }
        if let Some(status) = agent.process.exited() {
            panic!(
                "agent on {} exited ({status}) before it was ready:\n{}",
                node.name,
                agent.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent on {} not ready after {timeout:?} ({body:?}):\n{}",
            node.name,
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One IPv4 route as `ip -j route` prints it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct KernelRoute {
    /// `10.65.0.64/26`, or the bare address of a /32.
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `ip -j route show ARGS…` in `ns`.
pub fn kernel_routes(ns: &Netns, args: &[&str]) -> Vec<KernelRoute> {
    let mut all = vec!["-j", "route", "show"];
    all.extend_from_slice(args);
    serde_json::from_str(&ns.ip(&all)).unwrap_or_else(|e| panic!("ip -j route show: {e}"))
}

/// The routes an iptables-mode agent adds (route protocol 80), as (destination, gateway).
pub fn agent_routes(ns: &Netns) -> std::collections::BTreeSet<(String, String)> {
    kernel_routes(ns, &["proto", "80"])
        .into_iter()
        .map(|r| (r.dst, r.gateway.unwrap_or_default()))
        .collect()
}

/// Waits until every node's kernel routes are what an iptables-mode agent and the CNI plugin
/// make for `pods` ((node index, address)): a /32 via a `cali*` veth per local pod, and
/// (with `native`: ipipMode Never) each /26 block of pods on another node of the same subnet
/// via that node, and nothing else of the agent's.
pub fn wait_iptables_routes(
    cluster: &Cluster,
    agents: &[Agent],
    pods: &[(usize, Ipv4Addr)],
    native: bool,
) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let want: std::collections::BTreeSet<(String, String)> = pods
            .iter()
            .filter(|(n, _)| native && *n != i && cluster.nodes[*n].subnet == node.subnet)
            .map(|(n, ip)| {
                let block = Ipv4Addr::from(u32::from(*ip) & !63);
                (format!("{block}/26"), cluster.nodes[*n].ip.to_string())
            })
            .collect();
        let local = pods.iter().filter(|(n, _)| *n == i).count();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let have = agent_routes(&node.ns);
            let veths = kernel_routes(&node.ns, &[])
                .iter()
                .filter(|r| r.dev.as_deref().is_some_and(|d| d.starts_with("cali")))
                .count();
            if have == want && veths == local {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: routes not synced: agent's {have:?}, want {want:?}; {veths} of {local} pod routes\n{}",
                node.name,
                agents[i].log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The rules of ours in the filter table of `ns` (`iptables-save` through `backend`, `nft` or
/// `legacy`), without counters and comments: chain declarations and rules naming `cali-`.
pub fn cali_rules(ns: &Netns, backend: &str) -> Vec<String> {
    let out = crate::netns::run(
        ns.command(format!("iptables-{backend}-save"))
            .args(["-t", "filter"]),
    );
    out.lines()
        .filter(|l| l.contains("cali-") && !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect()
}

/// The ipsets of `ns` whose names start with `cali-`, with their members.
pub fn cali_sets(ns: &Netns) -> std::collections::BTreeMap<String, Vec<String>> {
    let out = crate::netns::run(ns.command("ipset").args(["save"]));
    let mut sets: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for l in out.lines() {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, ..] if name.starts_with("cali-") => {
                sets.entry((*name).to_owned()).or_default();
            }
            ["add", name, member, ..] if name.starts_with("cali-") => {
                sets.entry((*name).to_owned())
                    .or_default()
                    .push((*member).to_owned());
            }
            _ => {}
        }
    }
    for m in sets.values_mut() {
        m.sort();
    }
    sets
}

/// A second build of the TC programs, for upgrade tests: the `dataplane-ebpf` crate built
/// with its `previous-delivery` feature (the previous release's local delivery), so its
/// program code differs from the embedded object's while its maps are the same. Built (or
/// brought up to date) on first use with the nightly toolchain, the way `aya-build` builds
/// the embedded one, under target/ebpf-variant. Panics with cargo's output when it fails.
pub fn ebpf_variant_object() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_owned();
            let target_dir = root.join("target/ebpf-variant");
            let out = std::process::Command::new("cargo")
                .current_dir(&root)
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER")
                .env_remove("RUSTFLAGS")
                .env(
                    "CARGO_ENCODED_RUSTFLAGS",
                    "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                )
                .args([
                    "+nightly",
                    "build",
                    "--package",
                    "dataplane-ebpf",
                    "--bins",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--features",
                    "previous-delivery",
                    "--target-dir",
                ])
                .arg(&target_dir)
                .output()
                .expect("run cargo +nightly to build the eBPF variant");
            assert!(
                out.status.success(),
                "building the eBPF variant failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let object = target_dir.join("bpfel-unknown-none/release/dataplane-programs");
            assert!(object.is_file(), "no {object:?} after the build");
            object
        })
        .clone()
}

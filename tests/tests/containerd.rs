//! End to end under a real container runtime: Debian's containerd (CRI plugin) and runc run
//! pods on two nodes of the cluster in a box the way kubelet asks them to (CRI
//! `RunPodSandbox` → the runtime execs our CNI plugin from the conflist that `dataplane
//! install-cni` wrote; `CreateContainer`/`StartContainer`; `ExecSync`; `StopPodSandbox` →
//! CNI DEL; `RemovePodSandbox`). The image is built here from busybox-static. Checks: each
//! pod's address comes from the pool and matches the runtime's, the pod's own `ip addr`, its
//! WorkloadEndpoint and IPAM handle in etcd and the node's BPF maps; the pods reach each other
//! across nodes (HTTP and ping); a deny policy applied with `ctl apply --wait` is enforced and
//! removing it lets traffic through again; after the runtime removes the pods nothing of
//! them is left (addresses, handles, endpoints, veths, routes, map entries, runtime mounts).
//! Needs root and `cargo xtask setup` (containerd, runc, busybox-static).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use dataplane::{datastore::keys, dump::EndpointRow, dump::RouteRow};
use dataplane_tests::{
    containerd::{Containerd, INDEX_HTML, build_image, require_runtime},
    cri::{
        ContainerConfig, ContainerMetadata, ImageSpec, LinuxPodSandboxConfig, PodSandboxConfig,
        PodSandboxMetadata,
    },
    dataplane, require_root,
    traffic::Deployment,
    unique,
};

/// The image the test builds; also the sandbox ("pause") image, whose entrypoint sleeps.
const IMAGE: &str = "localhost/dataplane-test/busybox:1";
/// The web server's port in each pod.
const HTTP_PORT: u16 = 8080;
/// The cluster's nodes the pods run on: node-1 (subnet 1) and node-3 (behind the router), so
/// their traffic crosses subnets (IP-in-IP with the pool's CrossSubnet mode).
const NODES: [usize; 2] = [0, 2];

/// A pod the runtime runs: its sandbox and its web server container.
struct RunningPod {
    node: usize,
    name: String,
    sandbox: String,
    app: String,
    ip: Ipv4Addr,
}

fn etcd_get(d: &Deployment, prefix: &str) -> Vec<(String, serde_json::Value)> {
    let etcd = d.cluster.etcd.as_ref().unwrap();
    let out = dataplane_tests::netns::output(
        d.cluster.nodes[0]
            .ns
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint(), "get", "--prefix", prefix]),
    );
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks(2)
        .map(|kv| {
            (
                kv[0].to_owned(),
                serde_json::from_str(kv.get(1).copied().unwrap_or("null"))
                    .unwrap_or(serde_json::Value::Null),
            )
        })
        .collect()
}

/// Puts the CNI config and plugins in the runtime's private dirs with `dataplane
/// install-cni`, as the DaemonSet's init step does on a host (binary copied, `dataplane-ipam`
/// linked, conflist rendered from the built-in template); plus the reference `loopback`
/// plugin, which containerd's CRI plugin runs for every pod's `lo` (a host has it in its CNI
/// bin dir too).
fn install_cni(d: &Deployment, i: usize, c: &Containerd) {
    let node = &d.cluster.nodes[i];
    let etcd = d.cluster.etcd.as_ref().unwrap().endpoint();
    let bin_dir = c.cni_bin_dir().display().to_string();
    let net_dir = c.cni_net_dir().display().to_string();
    let nodename = c.dir.path().join("nodename").display().to_string();
    let (st, out, err) = dataplane(
        &node.ns,
        &[
            "install-cni",
            "--cni-bin-dir",
            &bin_dir,
            "--cni-net-dir",
            &net_dir,
            "--etcd-endpoints",
            &etcd,
            "--node",
            &node.name,
            "--nodename-file",
            &nodename,
        ],
    );
    assert!(st.success(), "install-cni on {}: {out}{err}", node.name);
    let conf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(c.cni_net_dir().join("10-dataplane.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["plugins"][0]["nodename"], node.name.as_str(), "{conf}");
    std::os::unix::fs::symlink(
        std::path::Path::new(dataplane_tests::cni::REFERENCE_PLUGINS).join("loopback"),
        c.cni_bin_dir().join("loopback"),
    )
    .unwrap();
}

/// Runs pod `name` on runtime `c` as kubelet does: the sandbox (the runtime sets its network
/// up through CNI), then a web server container in it.
fn run_pod(c: &Containerd, node: usize, name: &str) -> RunningPod {
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: unique("uid-"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}", c.cgroup_parent),
        }),
        ..Default::default()
    };
    let cri = c.cri();
    let t = Instant::now();
    let sandbox = cri
        .run_pod_sandbox(&config)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", c.log_text()));
    eprintln!(
        "{name}: RunPodSandbox (with CNI ADD) took {:?}",
        t.elapsed()
    );
    let status = cri.pod_sandbox_status(&sandbox).unwrap();
    assert_eq!(status.state, 0, "{name}: sandbox not ready: {status:?}");
    let ip: Ipv4Addr = status
        .network
        .as_ref()
        .map(|n| n.ip.as_str())
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: the runtime reports no pod IP ({e}): {status:?}"));
    let app_config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "web".to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.to_owned(),
        }),
        command: [
            "/bin/httpd",
            "-f",
            "-p",
            &HTTP_PORT.to_string(),
            "-h",
            "/www",
        ]
        .map(str::to_owned)
        .to_vec(),
        args: Vec::new(),
    };
    let app = cri
        .create_container(&sandbox, &app_config, &config)
        .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e}\n{}", c.log_text()));
    cri.start_container(&app)
        .unwrap_or_else(|e| panic!("StartContainer in {name}: {e}\n{}", c.log_text()));
    RunningPod {
        node,
        name: name.to_owned(),
        sandbox,
        app,
        ip,
    }
}

/// `cmd` in the pod's web container; (exit code, stdout, stderr).
fn exec(c: &Containerd, pod: &RunningPod, cmd: &[&str]) -> (i32, String, String) {
    let r = c
        .cri()
        .exec_sync(&pod.app, cmd, 10)
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {}: {e}", pod.name));
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

/// Whether `from` fetches the page of `to` over HTTP: busybox `nc` with a 2 s timeout
/// (busybox-static's `wget` crashes in glibc's static resolver, even on an address).
fn http(c: &Containerd, from: &RunningPod, to: &RunningPod) -> bool {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} {HTTP_PORT}",
        to.ip
    );
    let (code, out, err) = exec(c, from, &["sh", "-c", &script]);
    let ok = code == 0 && out.starts_with("HTTP/1.") && out.ends_with(INDEX_HTML);
    if !ok {
        eprintln!(
            "probe {} → {}: no page (exit {code}, {out:?} {err:?})",
            from.name, to.name
        );
    }
    ok
}

/// Polls `probe` until it gives `want` or `timeout` passes; returns the last answer.
fn eventually(timeout: Duration, want: bool, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let got = probe();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn map_rows<T: serde::de::DeserializeOwned>(d: &Deployment, i: usize, kind: &str) -> Vec<T> {
    let dir = d.pins[i].path.display().to_string();
    let (st, out, err) = dataplane(
        &d.cluster.nodes[i].ns,
        &["map-dump", kind, "--json", "--bpffs-dir", &dir],
    );
    assert!(st.success(), "map-dump {kind}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("map-dump {kind} --json: {e}: {out}"))
}

#[test]
fn root_containerd_cri_runs_pods_with_our_cni_plugin() {
    require_root();
    require_runtime();
    let t0 = Instant::now();
    let d = Deployment::start("CrossSubnet", 0);
    let image = build_image(IMAGE, &["/bin/sleep", "100000"]);
    eprintln!(
        "cluster up in {:?}; image {} bytes",
        t0.elapsed(),
        image.len()
    );

    // One containerd per node, in the node's namespace; declared after `d`, so dropped
    // first: the runtimes tear their pods down while etcd and the agents still run.
    let runtimes: Vec<Containerd> = NODES
        .iter()
        .map(|&i| {
            let node = &d.cluster.nodes[i];
            let mut c = Containerd::prepare(node, IMAGE);
            install_cni(&d, i, &c);
            c.start(node);
            c.import_image(&image);
            c
        })
        .collect();
    let version = runtimes[0].cri().version().unwrap();
    eprintln!(
        "{} {} (CRI {}) up at {:?}",
        version.runtime_name,
        version.runtime_version,
        version.runtime_api_version,
        t0.elapsed()
    );

    let pods: Vec<RunningPod> = NODES
        .iter()
        .zip(&runtimes)
        .zip(["web-a", "web-b"])
        .map(|((&i, c), name)| run_pod(c, i, name))
        .collect();
    let rt = |p: &RunningPod| &runtimes[NODES.iter().position(|&n| n == p.node).unwrap()];

    // Addresses: from the pool, distinct, the same in the runtime's status, inside the pod,
    // in the WorkloadEndpoint (with the IPAM handle of this sandbox) and the node's maps.
    let pool: (u32, u32) = (u32::from(Ipv4Addr::new(10, 65, 0, 0)), 0xffff_0000);
    assert_ne!(pods[0].ip, pods[1].ip);
    for p in &pods {
        let node = &d.cluster.nodes[p.node];
        assert_eq!(
            u32::from(p.ip) & pool.1,
            pool.0,
            "{}: {} is not from the pool 10.65.0.0/16",
            p.name,
            p.ip
        );
        let (code, out, err) = exec(rt(p), p, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("inet {}/32", p.ip)),
            "{}: eth0 inside the pod: {out}",
            p.name
        );
        let (_, routes, _) = exec(rt(p), p, &["ip", "-4", "route"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{}: {routes}",
            p.name
        );

        let key = keys::workload_endpoint("default", &node.name, &p.name, "eth0");
        let weps = etcd_get(&d, &key);
        assert_eq!(weps.len(), 1, "{}: no WorkloadEndpoint at {key}", p.name);
        let spec = &weps[0].1["spec"];
        assert_eq!(spec["containerID"], p.sandbox.as_str(), "{spec}");
        assert_eq!(spec["pod"], p.name.as_str(), "{spec}");
        assert_eq!(spec["node"], node.name.as_str(), "{spec}");
        assert_eq!(spec["ipNetworks"][0], format!("{}/32", p.ip), "{spec}");
        let host_iface = spec["interfaceName"].as_str().unwrap().to_owned();
        assert!(host_iface.starts_with("cali"), "{spec}");
        assert!(
            node.ns.has_link(&host_iface),
            "{host_iface} not in {}",
            node.name
        );
        let handle = format!("/calico/ipam/v2/handle/k8s-pod-network.{}", p.sandbox);
        assert_eq!(etcd_get(&d, &handle).len(), 1, "no IPAM handle {handle}");

        let endpoints: Vec<EndpointRow> = map_rows(&d, p.node, "endpoints");
        assert!(
            endpoints
                .iter()
                .any(|e| e.ip == p.ip.to_string() && e.iface.as_deref() == Some(&host_iface)),
            "{}: not in the endpoints map: {endpoints:?}",
            p.name
        );
    }
    let (st, ipam, err) = d.ctl(&["ipam", "show"]);
    assert!(st.success(), "{err}");
    assert!(ipam.contains("2 addresses in use"), "{ipam}");
    eprintln!("{ipam}");

    // Traffic across nodes (and subnets): HTTP both ways, ping.
    let (a, b) = (&pods[0], &pods[1]);
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), true, || http(rt(a), a, b)),
        "{} → {}: no HTTP",
        a.name,
        b.name
    );
    eprintln!("first HTTP across nodes after {:?}", t.elapsed());
    assert!(http(rt(b), b, a), "{} → {}: no HTTP", b.name, a.name);
    let (code, out, err) = exec(rt(a), a, &["ping", "-c", "1", "-W", "2", &b.ip.to_string()]);
    assert_eq!(code, 0, "ping {} → {}: {out}{err}", a.name, b.name);

    // A deny policy on every endpoint, in force on every node when apply returns.
    d.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-all}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - action: Deny\n",
    );
    assert!(
        !http(rt(a), a, b),
        "{} → {} despite the deny",
        a.name,
        b.name
    );
    assert!(
        !http(rt(b), b, a),
        "{} → {} despite the deny",
        b.name,
        a.name
    );
    let (st, out, err) = d.ctl(&["delete", "globalnetworkpolicy", "deny-all"]);
    assert!(st.success(), "{out}{err}");
    assert!(
        eventually(Duration::from_secs(10), true, || http(rt(a), a, b)),
        "{} → {}: still denied after the policy was deleted",
        a.name,
        b.name
    );
    assert!(http(rt(b), b, a));

    // The runtime removes the pods as kubelet does: containers, then the sandbox (CNI DEL).
    for p in &pods {
        let cri = rt(p).cri();
        cri.stop_container(&p.app, 0).unwrap();
        cri.remove_container(&p.app).unwrap();
        let t = Instant::now();
        cri.stop_pod_sandbox(&p.sandbox)
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}\n{}", p.name, rt(p).log_text()));
        eprintln!(
            "{}: StopPodSandbox (with CNI DEL) took {:?}",
            p.name,
            t.elapsed()
        );
        // kubelet stops a sandbox again whenever it is unsure (GC, restarts); containerd then
        // calls DEL once more with CNI_NETNS empty, the namespace being gone: must succeed.
        cri.stop_pod_sandbox(&p.sandbox).unwrap_or_else(|e| {
            panic!(
                "second StopPodSandbox {}: {e}\n{}",
                p.name,
                rt(p).log_text()
            )
        });
        cri.remove_pod_sandbox(&p.sandbox).unwrap();
        assert_eq!(cri.list_pod_sandbox().unwrap(), vec![]);
    }

    // Nothing is left: no endpoint, handle or address in etcd, no veth, route or map entry
    // on the nodes, no mount of the runtime's (network namespace, shm, rootfs).
    let weps = etcd_get(
        &d,
        "/calico/resources/v3/projectcalico.org/workloadendpoints/",
    );
    assert!(weps.is_empty(), "endpoints left: {weps:?}");
    let handles = etcd_get(&d, "/calico/ipam/v2/handle/");
    assert!(handles.is_empty(), "IPAM handles left: {handles:?}");
    let (_, ipam, _) = d.ctl(&["ipam", "show"]);
    assert!(ipam.contains(" 0 addresses in use"), "{ipam}");
    for (&i, c) in NODES.iter().zip(&runtimes) {
        let node = &d.cluster.nodes[i];
        let links = node.ns.ip(&["-o", "link", "show"]);
        assert!(
            !links.contains("cali"),
            "{}: veths left: {links}",
            node.name
        );
        let routes = node.ns.ip(&["-4", "route", "show"]);
        assert!(
            !routes.contains("cali"),
            "{}: pod routes left: {routes}",
            node.name
        );
        let endpoints: Vec<EndpointRow> = eventually_rows(&d, i, "endpoints", |r| r.is_empty());
        assert!(endpoints.is_empty(), "{}: {endpoints:?}", node.name);
        let local: Vec<RouteRow> = eventually_rows(&d, i, "routes", |r: &[RouteRow]| {
            !r.iter().any(|r| r.kind == "local workload")
        });
        assert!(
            !local.iter().any(|r| r.kind == "local workload"),
            "{}: {local:?}",
            node.name
        );
        assert_eq!(
            c.mounts(),
            Vec::<std::path::PathBuf>::new(),
            "{}",
            node.name
        );
    }
    eprintln!("done in {:?}", t0.elapsed());
}

/// The node's `map-dump KIND` rows once `done` holds (the agent syncs deletes from etcd), or
/// after 10 s.
fn eventually_rows<T: serde::de::DeserializeOwned>(
    d: &Deployment,
    i: usize,
    kind: &str,
    done: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<T> = map_rows(d, i, kind);
        if done(&rows) || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

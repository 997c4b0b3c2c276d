//! What each CNI command does: IPAM (ours in-process, or delegated), the pod's wiring, and its
//! WorkloadEndpoint in etcd, with everything undone when a step fails part-way.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use tracing::{info, warn};

use super::{
    PluginKind, delegate,
    netsetup::{self, GATEWAY, NetError},
    request::Request,
    types::{CniError, CniResult, Env, Interface, IpConfig, NetConf, Route, code},
};
use crate::{
    datastore::{self, Datastore, DatastoreError},
    ipam::{AssignRequest, Ipam, IpamConfig, IpamError},
};

/// Default MTU of a pod's interface: room for the 20-byte outer IPv4 header of IP-in-IP.
pub const DEFAULT_MTU: u32 = 1480;
/// Where the node name is read from when the config has none (written by install-cni).
pub const NODENAME_FILE: &str = "/var/lib/dataplane/nodename";
/// Directory of the node-local IPAM locks.
pub const LOCK_DIR: &str = "/var/run/dataplane";
/// How long an ADD or DEL waits for the node's IPAM lock before answering "try again".
/// How long ADD waits for the agent to program a new endpoint unless the config says.
const DEFAULT_POLICY_WAIT_MS: u64 = 10_000;
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// A node-local exclusive lock around IPAM, as Calico's plugin takes one: concurrent ADDs on
/// one node would otherwise all race for the same block and retry on every conflict.
/// Correctness never depends on it (every etcd write is a transaction on the revision); it
/// only turns a storm of conflicts into a queue. Released when dropped (or when the process
/// dies).
struct IpamLock {
    _file: std::fs::File,
}

impl IpamLock {
    fn acquire(node: &str) -> Result<Self, CniError> {
        use std::os::fd::AsRawFd as _;
        let io = |e: std::io::Error| {
            CniError::new(code::IO_FAILURE, "take the node's IPAM lock").details(e.to_string())
        };
        std::fs::create_dir_all(LOCK_DIR).map_err(io)?;
        let name: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(LOCK_DIR).join(format!("ipam-{name}.lock")))
            .map_err(io)?;
        let deadline = std::time::Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(e));
            }
            if std::time::Instant::now() > deadline {
                return Err(CniError::new(
                    code::TRY_AGAIN,
                    format!("the node's IPAM lock was busy for {LOCK_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub(super) async fn run(
    kind: PluginKind,
    req: &Request,
    raw: &[u8],
) -> Result<Option<String>, CniError> {
    let cx = Context {
        kind,
        req,
        env: &req.env,
        conf: &req.conf,
        raw,
    };
    match req.env.command.as_str() {
        "ADD" => cx.add().await.map(Some),
        "DEL" => cx.del().await.map(|()| None),
        "CHECK" => cx.check().await.map(|()| None),
        "STATUS" => cx.status().await.map(|()| None),
        "GC" => cx.gc().await.map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

struct Context<'a> {
    kind: PluginKind,
    req: &'a Request,
    env: &'a Env,
    conf: &'a NetConf,
    raw: &'a [u8],
}

fn ds_err(what: &str) -> impl FnOnce(DatastoreError) -> CniError + '_ {
    move |e| {
        let c = if e.is_unavailable() {
            code::TRY_AGAIN
        } else {
            code::DATASTORE
        };
        CniError::new(c, what.to_owned()).details(crate::error_chain(&e))
    }
}

fn ipam_err(what: &str) -> impl FnOnce(IpamError) -> CniError + '_ {
    move |e| {
        let c = if e.is_exhausted() {
            code::IPAM_EXHAUSTED
        } else if e.is_unavailable() {
            code::TRY_AGAIN
        } else {
            code::DATASTORE
        };
        CniError::new(c, what.to_owned()).details(crate::error_chain(&e))
    }
}

fn net_err(what: &str) -> impl FnOnce(NetError) -> CniError + '_ {
    move |e| CniError::new(code::INTERNAL, what.to_owned()).details(crate::error_chain(&e))
}

/// This machine's node name: the file [`NODENAME_FILE`] (written at install), else the
/// hostname.
pub fn local_node_name() -> String {
    if let Ok(n) = std::fs::read_to_string(NODENAME_FILE) {
        let n = n.trim();
        if !n.is_empty() {
            return n.to_owned();
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

impl Context<'_> {
    fn node(&self) -> String {
        if let Some(n) = self.conf.nodename.as_deref().filter(|n| !n.is_empty()) {
            return n.to_owned();
        }
        local_node_name()
    }

    async fn datastore(&self) -> Result<Datastore, CniError> {
        let cfg = self.req.etcd_config()?;
        Datastore::connect(&cfg)
            .await
            .map_err(ds_err("connect to etcd"))
    }

    fn netns_must_exist(&self) -> Result<(), CniError> {
        if Path::new(&self.env.netns).exists() {
            Ok(())
        } else {
            Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_NETNS {} does not exist", self.env.netns),
            ))
        }
    }

    /// Assigns the pod's address: ours in-process, or through the delegate.
    async fn assign(&self, ds: &Datastore, node: &str) -> Result<Ipv4Addr, CniError> {
        if !self.req.ours(self.kind)? {
            let plugin = self.req.ipam_type()?;
            let result = delegate::add(self.env, &plugin, self.raw)?;
            return result.first_ipv4().ok_or_else(|| {
                CniError::new(
                    code::DELEGATE,
                    format!("IPAM plugin {plugin} returned no IPv4 address"),
                )
            });
        }
        let _lock = IpamLock::acquire(node)?;
        ds.ensure_default_pool(&self.req.pool_options()?)
            .await
            .map_err(ds_err("create the default IP pool"))?;
        let ipam = Ipam::new(ds, self.req.ipam_config());
        let handle = self.req.handle_id();
        // A retried ADD of the same container gets the address it already holds.
        if let Some(held) = ipam
            .check_handle(&handle)
            .await
            .map_err(ipam_err("read the IPAM handle"))?
            && let Some(ip) = held.first()
        {
            return Ok(*ip);
        }
        let mut attrs = BTreeMap::new();
        attrs.insert("node".to_owned(), node.to_owned());
        if let Some((ns, pod)) = self.env.pod() {
            attrs.insert("namespace".to_owned(), ns.to_owned());
            attrs.insert("pod".to_owned(), pod.to_owned());
        }
        let req = AssignRequest {
            node: node.to_owned(),
            handle_id: handle,
            attrs,
            pools: None,
        };
        ipam.auto_assign(&req)
            .await
            .map_err(ipam_err("assign an address"))
    }

    /// Releases what `assign` took; idempotent.
    async fn release(&self, ds: &Datastore) -> Result<(), CniError> {
        if self.req.ours(self.kind)? {
            let _lock = IpamLock::acquire(&self.node())?;
            let ipam = Ipam::new(ds, IpamConfig::default());
            let released = ipam
                .release_by_handle(&self.req.handle_id())
                .await
                .map_err(ipam_err("release the pod's address"))?;
            if !released.is_empty() {
                info!(handle = %self.req.handle_id(), ?released, "released");
            }
            Ok(())
        } else {
            delegate::exec(self.env, &self.req.ipam_type()?, "DEL", self.raw).map(|_| ())
        }
    }

    async fn add(&self) -> Result<String, CniError> {
        self.netns_must_exist()?;
        let node = self.node();
        if node.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "no node name: set nodename in the config",
            ));
        }
        let t = std::time::Instant::now();
        let ds = self.datastore().await?;
        tracing::debug!(elapsed = ?t.elapsed(), "connected");
        let ip = self.assign(&ds, &node).await?;
        tracing::debug!(elapsed = ?t.elapsed(), %ip, "address assigned");

        if self.kind == PluginKind::Ipam {
            let result = CniResult {
                cni_version: String::new(),
                interfaces: vec![],
                ips: vec![IpConfig {
                    version: None,
                    address: format!("{ip}/32"),
                    gateway: None,
                    interface: None,
                }],
                routes: vec![],
                dns: serde_json::Value::Null,
            };
            return Ok(to_json(result.in_version(&self.conf.cni_version)));
        }

        match self.wire_and_record(&ds, &node, ip).await {
            Ok(result) => Ok(result),
            Err(e) => {
                // Undo the address; the veth and endpoint were undone by wire_and_record.
                if let Err(undo) = self.release(&ds).await {
                    warn!(error = %undo, "release the address after a failed ADD");
                }
                Err(e)
            }
        }
    }

    async fn wire_and_record(
        &self,
        ds: &Datastore,
        node: &str,
        ip: Ipv4Addr,
    ) -> Result<String, CniError> {
        let host = self.req.host_veth();
        let mtu = self.conf.mtu.unwrap_or(DEFAULT_MTU);
        let netns = Path::new(&self.env.netns);
        let t = std::time::Instant::now();
        let wired = match netsetup::wire(netns, &self.env.ifname, &host, ip, mtu) {
            Ok(w) => w,
            Err(e) => {
                self.undo_veth(&host);
                return Err(net_err("wire the pod")(e));
            }
        };
        tracing::debug!(elapsed = ?t.elapsed(), "pod wired");
        let t = std::time::Instant::now();
        let wep = self.endpoint(ds, node, ip, &host, &wired.pod_mac).await;
        let written = if failpoint("endpoint-write") {
            Err(CniError::new(code::DATASTORE, "write the WorkloadEndpoint")
                .details("injected failure (DATAPLANE_CNI_FAILPOINT)"))
        } else {
            ds.put_workload_endpoint(&wep)
                .await
                .map_err(ds_err("write the WorkloadEndpoint"))
        };
        let revision = match written {
            Ok(r) => r,
            Err(e) => {
                self.undo_veth(&host);
                return Err(e);
            }
        };
        tracing::debug!(elapsed = ?t.elapsed(), "endpoint written");
        if let Err(e) = self.wait_programmed(ds, node, revision).await {
            self.undo_endpoint(ds, &wep).await;
            self.undo_veth(&host);
            return Err(e);
        }
        info!(pod = ?self.env.pod(), %ip, iface = %host, "pod added");
        let result = CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: host,
                    mac: wired.host_mac,
                    sandbox: String::new(),
                },
                Interface {
                    name: self.env.ifname.clone(),
                    mac: wired.pod_mac,
                    sandbox: self.env.netns.clone(),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: format!("{ip}/32"),
                gateway: Some(GATEWAY.to_string()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".to_owned(),
                gw: Some(GATEWAY.to_string()),
            }],
            dns: serde_json::Value::Null,
        };
        Ok(to_json(result.in_version(&self.conf.cni_version)))
    }

    /// Waits until this node's agent reports that its maps reflect `revision` (the endpoint
    /// and its policy are programmed), so the pod's first packet meets its policy. Without a
    /// live agent on the node there is nothing to wait for (the programs drop the traffic of
    /// an endpoint they do not know, so nothing is let through early either).
    async fn wait_programmed(
        &self,
        ds: &Datastore,
        node: &str,
        revision: i64,
    ) -> Result<(), CniError> {
        let limit =
            Duration::from_millis(self.conf.policy_wait_ms.unwrap_or(DEFAULT_POLICY_WAIT_MS));
        if limit.is_zero() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let key = crate::datastore::keys::node_status(node);
        loop {
            let status = ds
                .get::<crate::datastore::NodeStatus>(&key)
                .await
                .map_err(ds_err("read the node's agent status"))?
                .map(|v| v.value);
            let now = crate::datastore::status::now_ms();
            match status {
                None => return Ok(()),
                Some(s) if !s.is_live(now) => return Ok(()),
                Some(s) if s.revision >= revision => {
                    tracing::debug!(waited = ?started.elapsed(), "endpoint programmed by the agent");
                    return Ok(());
                }
                Some(s) if started.elapsed() >= limit => {
                    return Err(CniError::new(
                        code::TRY_AGAIN,
                        "the node's agent has not programmed the endpoint yet",
                    )
                    .details(format!(
                        "waited {} ms for revision {revision}; agent of {node} is at {}",
                        limit.as_millis(),
                        s.revision
                    )));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn undo_endpoint(&self, ds: &Datastore, wep: &datastore::WorkloadEndpoint) {
        if let Err(e) = ds
            .delete_workload_endpoint_if(&wep.key(), wep.container_id())
            .await
        {
            warn!(error = %e, "remove the endpoint after a failed ADD");
        }
    }

    fn undo_veth(&self, host: &str) {
        if let Err(e) = netsetup::delete_host_veth(host) {
            warn!(iface = host, error = %e, "remove the veth after a failed ADD");
        }
    }

    /// The WorkloadEndpoint of this attachment, with the pod's labels when the datastore knows
    /// the pod (`ctl apply` of a Kubernetes Pod). Namespace labels stay on the namespace's
    /// profile: a pod selector must not see them.
    async fn endpoint(
        &self,
        ds: &Datastore,
        node: &str,
        ip: Ipv4Addr,
        host: &str,
        mac: &str,
    ) -> datastore::WorkloadEndpoint {
        let (namespace, pod) = match self.env.pod() {
            Some((ns, pod)) => (ns.to_owned(), pod.to_owned()),
            None => ("default".to_owned(), self.env.container_id.clone()),
        };
        let mut labels = BTreeMap::new();
        let profile = format!("kns.{namespace}");
        let pod_key = format!("/calico/k8s/pods/{namespace}/{pod}");
        match ds.get::<serde_json::Value>(&pod_key).await {
            Ok(Some(p)) => {
                if let Some(l) = p.value.pointer("/metadata/labels").and_then(|l| {
                    serde_json::from_value::<BTreeMap<String, String>>(l.clone()).ok()
                }) {
                    labels.extend(l);
                }
            }
            Ok(None) => {}
            Err(e) => warn!(key = %pod_key, error = %e, "pod labels unavailable"),
        }
        labels.insert("projectcalico.org/namespace".to_owned(), namespace.clone());
        labels.insert(
            "projectcalico.org/orchestrator".to_owned(),
            "k8s".to_owned(),
        );
        datastore::WorkloadEndpoint::new(datastore::WorkloadEndpointArgs {
            namespace,
            node: node.to_owned(),
            pod,
            endpoint: self.env.ifname.clone(),
            container_id: self.env.container_id.clone(),
            interface_name: host.to_owned(),
            mac: mac.to_owned(),
            ip_networks: vec![format!("{ip}/32")],
            profiles: vec![profile],
            labels,
        })
    }

    async fn del(&self) -> Result<(), CniError> {
        let node = self.node();
        let ds = self.datastore().await?;
        if self.kind == PluginKind::Main {
            let key = self.req.endpoint_key(&node);
            let wep = ds
                .get_workload_endpoint(&key)
                .await
                .map_err(ds_err("read the WorkloadEndpoint"))?;
            let newer_owner = wep
                .as_ref()
                .is_some_and(|w| w.container_id() != self.env.container_id);
            if newer_owner {
                // The pod was re-created under a new container: its veth and endpoint are
                // the new one's. Only this container's address is ours to release.
                info!(%key, "endpoint belongs to a newer container; leaving it");
            } else {
                let host = self.req.host_veth();
                netsetup::delete_host_veth(&host).map_err(net_err("delete the veth"))?;
                ds.delete_workload_endpoint_if(&key, &self.env.container_id)
                    .await
                    .map_err(ds_err("delete the WorkloadEndpoint"))?;
            }
        }
        self.release(&ds).await
    }

    async fn check(&self) -> Result<(), CniError> {
        // The variables and prevResult were checked by `request::parse_call`.
        let ip = self
            .req
            .prev_ip
            .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult has no IPv4 address"))?;
        self.netns_must_exist()?;
        let ds = self.datastore().await?;
        if self.req.ours(self.kind)? {
            let ipam = Ipam::new(&ds, IpamConfig::default());
            let held = ipam
                .check_handle(&self.req.handle_id())
                .await
                .map_err(ipam_err("read the IPAM handle"))?
                .unwrap_or_default();
            if !held.contains(&ip) {
                return Err(CniError::new(
                    code::CHECK_FAILED,
                    format!("{ip} is not allocated to {}", self.req.handle_id()),
                ));
            }
        } else {
            delegate::exec(self.env, &self.req.ipam_type()?, "CHECK", self.raw)?;
        }
        if self.kind == PluginKind::Ipam {
            return Ok(());
        }
        let host = self.req.host_veth();
        netsetup::check(Path::new(&self.env.netns), &self.env.ifname, &host, ip)
            .map_err(|e| CniError::new(code::CHECK_FAILED, crate::error_chain(&e)))?;
        let key = self.req.endpoint_key(&self.node());
        let wep = ds
            .get_workload_endpoint(&key)
            .await
            .map_err(ds_err("read the WorkloadEndpoint"))?
            .ok_or_else(|| {
                CniError::new(
                    code::CHECK_FAILED,
                    format!("WorkloadEndpoint {key} is missing"),
                )
            })?;
        let want_net = format!("{ip}/32");
        if wep.container_id() != self.env.container_id
            || wep.interface_name() != host
            || !wep.ip_networks().contains(&want_net)
        {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("WorkloadEndpoint {key} does not match this attachment"),
            ));
        }
        Ok(())
    }

    async fn status(&self) -> Result<(), CniError> {
        let not_available = |msg: String| {
            CniError::new(code::NOT_AVAILABLE, "the plugin is not available").details(msg)
        };
        let ds = self
            .datastore()
            .await
            .map_err(|e| not_available(e.to_string()))?;
        if self.req.ours(self.kind)? {
            let ipam = Ipam::new(&ds, IpamConfig::default());
            if !ipam
                .has_free_address()
                .await
                .map_err(|e| not_available(crate::error_chain(&e)))?
            {
                return Err(not_available(
                    "the IP pools have no free address".to_owned(),
                ));
            }
        }
        Ok(())
    }

    async fn gc(&self) -> Result<(), CniError> {
        let valid = self.req.valid_containers();
        let node = self.node();
        let ds = self.datastore().await?;
        // Endpoints of this node whose container the runtime no longer knows.
        let weps = ds
            .list_workload_endpoints(&node)
            .await
            .map_err(ds_err("list this node's WorkloadEndpoints"))?;
        for (key, wep) in weps {
            if valid.contains(wep.container_id()) {
                continue;
            }
            info!(%key, container = wep.container_id(), "GC: removing a stale endpoint");
            netsetup::delete_host_veth(wep.interface_name())
                .map_err(net_err("delete a stale veth"))?;
            ds.delete_workload_endpoint_if(&key, wep.container_id())
                .await
                .map_err(ds_err("delete a stale WorkloadEndpoint"))?;
        }
        // Allocations of this node whose container is gone, with or without an endpoint.
        if self.req.ours(self.kind)? {
            let ipam = Ipam::new(&ds, IpamConfig::default());
            for handle in ipam
                .handles_of_node(&node)
                .await
                .map_err(ipam_err("list this node's allocations"))?
            {
                let Some(cid) = handle.strip_prefix("k8s-pod-network.") else {
                    continue;
                };
                if !valid.contains(cid) {
                    info!(%handle, "GC: releasing a stale allocation");
                    ipam.release_by_handle(&handle)
                        .await
                        .map_err(ipam_err("release a stale allocation"))?;
                }
            }
        }
        Ok(())
    }
}

/// Test hook: `DATAPLANE_CNI_FAILPOINT=<name>` makes the named step fail, so tests can prove
/// the rollback of a failure that is otherwise hard to time (etcd dying between two writes).
fn failpoint(name: &str) -> bool {
    std::env::var("DATAPLANE_CNI_FAILPOINT").is_ok_and(|v| v == name)
}

fn to_json(result: CniResult) -> String {
    serde_json::to_string(&result).unwrap_or_default()
}

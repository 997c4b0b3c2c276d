//! The per-node agent: owns the pin directory, loads the programs, and keeps them attached to
//! the host NIC and to every `cali*` interface as interfaces come and go. With
//! `--dataplane iptables` it loads nothing and the same datastore sync programs routes,
//! iptables and ipsets instead ([`crate::iptables`]).

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    sync::Arc,
};

use futures::StreamExt as _;
use tracing::{info, warn};

use crate::{
    WORKLOAD_IFACE_PREFIX,
    attach::{AttachError, Attachment, Programs, Role},
    bpffs::{BpffsError, PinDir},
    health::{Health, SyncObserver},
    metrics::Metrics,
    netlink::{self, Link, LinkEvent, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("host interface {0} not found in this network namespace")]
    NoHostIface(String),
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("read the eBPF object {0}: {1}")]
    BpfObject(PathBuf, std::io::Error),
    #[error(transparent)]
    RunLock(#[from] crate::runlock::RunLockError),
    #[error("the link event stream ended")]
    EventsEnded,
    #[error(transparent)]
    Datastore(#[from] Box<crate::datastore::DatastoreError>),
    #[error(transparent)]
    Sync(#[from] Box<crate::sync::SyncError>),
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
    #[error(transparent)]
    Iptables(#[from] crate::iptables::IptablesError),
    #[error("the iptables dataplane needs --etcd-endpoints: it has nothing to program without")]
    IptablesWithoutEtcd,
    #[error("listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub etcd_endpoints: Vec<String>,
    /// TLS files for etcd (CA, client certificate, client key).
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub host_iface: String,
    /// BPF programs, or routes + iptables.
    pub dataplane: crate::cli::DataplaneMode,
    /// Which iptables the iptables mode writes through.
    pub iptables_backend: crate::iptables::Backend,
    pub bpffs_dir: PathBuf,
    /// Conntrack timeouts, written to the config map.
    pub ct_timeouts: dataplane_common::CtTimeouts,
    /// Where `/liveness` and `/readiness` are served (`None`: not served).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long etcd may be unreachable before readiness fails.
    pub readiness_grace: std::time::Duration,
    /// Entries of the conntrack table.
    pub conntrack_size: u32,
    /// An eBPF object to load instead of the embedded one (upgrade tests).
    pub bpf_object: Option<PathBuf>,
    /// Where the CNI plugin's latency records arrive (`None`: not received).
    pub cni_metrics_socket: Option<PathBuf>,
    /// Most map entries one compiled policy may take (`None`: the default).
    pub max_policy_entries: Option<usize>,
}

/// How often expired conntrack entries are removed.
const CT_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Removes expired conntrack entries now and then, off the packet path (the programs treat
/// an expired entry as absent already; this frees its slot).
async fn sweep_conntrack(root: PathBuf, timeouts: dataplane_common::CtTimeouts) {
    let mut every = tokio::time::interval(CT_SWEEP_EVERY);
    loop {
        every.tick().await;
        let root = root.clone();
        match tokio::task::spawn_blocking(move || crate::maps::sweep_conntrack(&root, &timeouts))
            .await
        {
            Ok(Ok((kept, removed))) if removed > 0 => {
                tracing::debug!(kept, removed, "conntrack swept");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "conntrack sweep failed"),
            Err(e) => warn!(error = %e, "conntrack sweep task failed"),
        }
    }
}

fn ifindex_of(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// What is attached where, by ifindex.
struct Attached {
    programs: Programs,
    host_iface: String,
    by_ifindex: HashMap<u32, Attachment>,
}

impl Attached {
    fn role_of(&self, link: &Link) -> Option<Role> {
        if link.name == self.host_iface {
            Some(Role::Host)
        } else if link.name.starts_with(WORKLOAD_IFACE_PREFIX) {
            Some(Role::Workload)
        } else {
            None
        }
    }

    fn on_present(&mut self, link: &Link) -> Result<(), AttachError> {
        if let Some(existing) = self.by_ifindex.get(&link.ifindex) {
            if existing.name == link.name {
                return Ok(());
            }
            // Renamed: what it was attached as no longer holds.
            if let Some(old) = self.by_ifindex.remove(&link.ifindex) {
                old.detach()?;
            }
        }
        let Some(role) = self.role_of(link) else {
            return Ok(());
        };
        let attachment = self.programs.attach(link.ifindex, &link.name, role)?;
        self.by_ifindex.insert(link.ifindex, attachment);
        Ok(())
    }

    fn on_gone(&mut self, link: &Link) -> Result<(), AttachError> {
        match self.by_ifindex.remove(&link.ifindex) {
            Some(attachment) => {
                info!(iface = %link.name, ifindex = link.ifindex, "interface gone, detached");
                attachment.detach()
            }
            None => Ok(()),
        }
    }

    /// Detaches everything (used when start-up fails part-way, so nothing is left behind).
    fn detach_all(&mut self) {
        for (_, attachment) in self.by_ifindex.drain() {
            let name = attachment.name.clone();
            if let Err(e) = attachment.detach() {
                warn!(iface = %name, error = %e, "detach during clean-up");
            }
        }
    }
}

/// Makes this node's Node resource carry the host NIC's address (as calico-node does), so that
/// the other nodes know where its pods are. Retries until etcd answers; keeps any other field
/// of an existing Node.
async fn register_node(ds: &crate::datastore::Datastore, name: &str, addr: Option<ipnet::Ipv4Net>) {
    let Some(addr) = addr else {
        warn!(
            node = name,
            "the host interface has no IPv4 address; Node not registered"
        );
        return;
    };
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        let result = async {
            let mut node = ds
                .get_node(name)
                .await?
                .unwrap_or_else(|| crate::datastore::Node::new(name, None));
            if node.ipv4_address().ok().flatten() == Some(addr) {
                return Ok(());
            }
            let bgp = node.spec.bgp.get_or_insert_with(Default::default);
            bgp.ipv4_address = Some(addr.to_string());
            ds.put_node(&node).await
        }
        .await;
        match result {
            Ok(()) => {
                info!(node = name, %addr, "Node registered");
                return;
            }
            Err(e) => {
                warn!(node = name, error = %e, retry_in = ?delay, "register the Node");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// Binds the health and metrics listeners (one, when both have the same address) and
/// serves them on tasks. Every address is bound before any is served, so a taken port fails
/// the start with nothing left running.
async fn serve_endpoints(
    opts: &AgentOptions,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AgentError> {
    let mut endpoints: Vec<(&'static str, std::net::SocketAddr, axum::Router)> = Vec::new();
    if let Some(addr) = opts.health_listen {
        endpoints.push(("health", addr, crate::health::router(health.clone())));
    }
    if let Some(addr) = opts.metrics_listen {
        let router = crate::metrics::router(metrics.clone());
        match endpoints.iter_mut().find(|(_, a, _)| *a == addr) {
            Some(shared) => {
                shared.0 = "health and metrics";
                shared.2 = std::mem::take(&mut shared.2).merge(router);
            }
            None => endpoints.push(("metrics", addr, router)),
        }
    }
    let mut bound = Vec::new();
    for (what, addr, router) in endpoints {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Listen { what, addr, source })?;
        bound.push((what, addr, listener, router));
    }
    let mut tasks: Vec<_> = bound
        .into_iter()
        .map(|(what, addr, listener, router)| {
            info!(what, %addr, "serving over HTTP");
            tokio::spawn(crate::health::serve(what, listener, router))
        })
        .collect();
    // Best effort, as the records themselves: the dataplane does not depend on it.
    if let Some(path) = &opts.cni_metrics_socket {
        match crate::cni_metrics::listen(path, metrics.clone()) {
            Ok(task) => tasks.push(task),
            Err(e) => warn!(error = %e, "CNI latencies not received"),
        }
    }
    Ok(tasks)
}

fn etcd_config(opts: &AgentOptions) -> crate::datastore::EtcdConfig {
    crate::datastore::EtcdConfig {
        endpoints: opts.etcd_endpoints.clone(),
        ca_file: opts.etcd_ca.clone(),
        cert_file: opts.etcd_cert.clone(),
        key_file: opts.etcd_key.clone(),
        ..crate::datastore::EtcdConfig::default()
    }
}

/// Runs the agent until `shutdown` completes, in the dataplane mode `opts` names.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    match opts.dataplane {
        crate::cli::DataplaneMode::Bpf => run_bpf(opts, shutdown).await,
        crate::cli::DataplaneMode::Iptables => run_iptables(opts, shutdown).await,
    }
}

/// The iptables mode: no programs; the datastore sync writes routes, iptables and ipsets in
/// this namespace ([`crate::iptables`]). They stay in force after shutdown, as the BPF mode's
/// programs do.
async fn run_iptables(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let host_ifindex = ifindex_of(&opts.host_iface)
        .ok_or_else(|| AgentError::NoHostIface(opts.host_iface.clone()))?;
    if opts.etcd_endpoints.is_empty() {
        return Err(AgentError::IptablesWithoutEtcd);
    }
    // Held until the process ends: `dataplane cleanup` and a second agent see it.
    let _lock = crate::runlock::acquire(std::path::Path::new(crate::runlock::RUN_DIR))?;
    let backend = opts.iptables_backend;
    crate::iptables::check_tools(backend).await?;
    let ds = crate::datastore::Datastore::connect(&etcd_config(&opts))
        .await
        .map_err(Box::new)?;
    let health = Arc::new(Health::new(true, opts.readiness_grace));
    let metrics = Arc::new(Metrics::new(&opts.bpffs_dir, health.clone()));
    let servers = serve_endpoints(&opts, &health, &metrics).await?;
    let host_addr = netlink::ipv4_of(host_ifindex).await?;
    // Nothing to attach: readiness waits for the first sync only.
    health.set_attached();
    info!(
        node = %opts.node,
        host_iface = %opts.host_iface,
        dataplane = "iptables",
        backend = backend.name(),
        restore = backend.restore(),
        "agent ready: iptables dataplane through {} ({})",
        backend.restore(),
        match backend {
            crate::iptables::Backend::Nft =>
                "the default: Debian bookworm's iptables, and what Calico detects on such hosts",
            crate::iptables::Backend::Legacy => "chosen with --iptables-backend legacy",
        }
    );
    let writer = crate::iptables::Writer::new(backend, host_ifindex, host_addr.map(|a| a.addr()));
    let node = opts.node.clone();
    let observer = SyncObserver {
        health: health.clone(),
        metrics: metrics.clone(),
    };
    let sync_task = tokio::spawn(async move {
        register_node(&ds, &node, host_addr).await;
        crate::sync::run(ds, node, writer, observer).await;
    });
    let mut heartbeat = tokio::time::interval(crate::health::HEARTBEAT_EVERY);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                info!("shutting down; routes and rules stay in force");
                sync_task.abort();
                for task in servers {
                    task.abort();
                }
                return Ok(());
            }
            _ = heartbeat.tick() => {
                // A sync task that ended (it only ends by panicking) is a dead agent.
                if !sync_task.is_finished() {
                    health.beat();
                }
            }
        }
    }
}

/// An eBPF object read from a file, 8-byte aligned as the ELF parser wants it.
struct Object(Vec<u64>, usize);

impl Object {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.0)[..self.1]
    }
}

fn read_object(path: &std::path::Path) -> Result<Object, AgentError> {
    let bytes = std::fs::read(path).map_err(|e| AgentError::BpfObject(path.to_owned(), e))?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(b);
    }
    Ok(Object(words, bytes.len()))
}

/// The BPF mode. On shutdown the programs stay attached (their links are pinned), so the
/// dataplane keeps forwarding while the agent restarts.
async fn run_bpf(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Check what can be checked before touching anything, so a bad flag leaves no trace.
    let host_ifindex = ifindex_of(&opts.host_iface)
        .ok_or_else(|| AgentError::NoHostIface(opts.host_iface.clone()))?;
    let object = match &opts.bpf_object {
        None => None,
        Some(path) => Some(read_object(path)?),
    };
    let pins = PinDir::open(&opts.bpffs_dir)?;
    let object = object.as_ref().map_or(crate::EBPF_OBJECT, |o| o.bytes());
    let mut programs = Programs::load(&pins, object, opts.conntrack_size)?;
    if !programs.layout.is_empty() {
        info!(migrated = ?programs.layout.migrated, rebuilt = ?programs.layout.rebuilt, "map layouts changed since the last agent");
    }
    // Datastore settings and the maps are checked before anything is attached.
    let mut sync_parts = if opts.etcd_endpoints.is_empty() {
        None
    } else {
        let ds = crate::datastore::Datastore::connect(&etcd_config(&opts))
            .await
            .map_err(Box::new)?;
        let mut writer = crate::sync::MapWriter::open(pins.root()).map_err(Box::new)?;
        if let Some(limit) = opts.max_policy_entries {
            writer = writer.with_entry_limit(limit);
        }
        Some((ds, writer))
    };
    // A map the sync fills was remade empty: fill it before any new program uses it (the
    // attached programs keep the old maps until they are swapped out).
    if programs.layout.needs_refill()
        && let Some((ds, writer)) = sync_parts.as_mut()
    {
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            match crate::sync::prefill(ds, &opts.node, writer).await {
                Ok(revision) => {
                    info!(
                        revision,
                        "remade maps filled before the programs are swapped in"
                    );
                    break;
                }
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), retry_in = ?delay, "fill the remade maps");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
    }
    let catch_up = programs.catch_up.take();
    if let Some(logger) = programs.trace_logger() {
        tokio::spawn(forward_trace_records(logger));
    }
    let health = Arc::new(Health::new(sync_parts.is_some(), opts.readiness_grace));
    let metrics = Arc::new(Metrics::new(pins.root(), health.clone()));
    // Served from now on: liveness during start-up, readiness false until attached.
    let servers = serve_endpoints(&opts, &health, &metrics).await?;
    let timeouts = opts.ct_timeouts;
    let host_addr = netlink::ipv4_of(host_ifindex).await?;
    let node_ip = host_addr.map_or([0; 4], |a| a.addr().octets());
    crate::maps::write_config(
        pins.root(),
        dataplane_common::NodeConfig {
            node_ip,
            host_ifindex,
            host_mtu: netlink::mtu_of(host_ifindex).await?.unwrap_or(0),
            _pad: 0,
            ct_timeouts: timeouts,
        },
    )?;
    let (links, mut events) = netlink::watch_links().await?;
    let mut state = Attached {
        programs,
        host_iface: opts.host_iface.clone(),
        by_ifindex: HashMap::new(),
    };
    let live: HashSet<(u32, String)> = links.iter().map(|l| (l.ifindex, l.name.clone())).collect();
    state.programs.remove_stale_pins(&live)?;

    // The host NIC first: without it the node is not functional, so its failure is fatal.
    let host = Link {
        ifindex: host_ifindex,
        name: opts.host_iface.clone(),
    };
    let startup = (|| -> Result<(), AttachError> {
        state.on_present(&host)?;
        for link in links
            .iter()
            .filter(|l| l.name.starts_with(WORKLOAD_IFACE_PREFIX))
        {
            state.on_present(link)?;
        }
        Ok(())
    })();
    if let Err(e) = startup {
        state.detach_all();
        for task in servers {
            task.abort();
        }
        return Err(e.into());
    }
    if let Some(c) = catch_up {
        c.finish(&pins.maps_dir());
    }
    health.set_attached();
    info!(
        node = %opts.node,
        host_iface = %opts.host_iface,
        bpffs_dir = %pins.root().display(),
        workloads = state.by_ifindex.len() - 1,
        "agent ready"
    );

    // The datastore → maps sync runs beside the interface loop; it retries on its own when
    // etcd is away, and the maps keep their last state meanwhile.
    let sync_task = sync_parts.map(|(ds, writer)| {
        let node = opts.node.clone();
        let observer = SyncObserver {
            health: health.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(async move {
            register_node(&ds, &node, host_addr).await;
            crate::sync::run(ds, node, writer, observer).await;
        })
    });
    if sync_task.is_none() {
        info!("no --etcd-endpoints: routes and endpoints maps are not synced");
    }
    let sweep_task = tokio::spawn(sweep_conntrack(pins.root().to_owned(), timeouts));

    let mut heartbeat = tokio::time::interval(crate::health::HEARTBEAT_EVERY);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                info!("shutting down; programs stay attached through their pinned links");
                if let Some(task) = sync_task {
                    task.abort();
                }
                sweep_task.abort();
                for task in servers {
                    task.abort();
                }
                return Ok(());
            }
            _ = heartbeat.tick() => {
                // A sync task that ended (it only ends by panicking) is a dead agent.
                if sync_task.as_ref().is_none_or(|t| !t.is_finished()) {
                    health.beat();
                }
            }
            event = events.next() => {
                let Some(event) = event else { return Err(AgentError::EventsEnded) };
                let result = match &event {
                    LinkEvent::Present(link) => state.on_present(link),
                    LinkEvent::Gone(link) => state.on_gone(link),
                };
                // An interface can vanish between its event and our attach; that and any
                // other per-interface failure is logged, never fatal to the node.
                if let Err(e) = result {
                    warn!(?event, error = %crate::error_chain(&e), "interface event not applied");
                }
            }
        }
    }
}

/// Copies the programs' trace records (`dataplane trace`) into this agent's log as they come.
async fn forward_trace_records(logger: aya_log::EbpfLogger<crate::trace::BpfLog>) {
    // SAFETY: the descriptor is the ring buffer map's, owned by `logger`, which the AsyncFd
    // owns from here on: it stays open and the same for the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "trace records not read");
            return;
        }
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "trace records not read any more");
                return;
            }
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

//! `dataplane cleanup`: removes what the agent installed on this node, for an uninstall. In
//! the BPF mode: the pinned TCX links (which detaches the programs), the pinned maps and the
//! pin directory; in the iptables mode: the `cali-` chains and the jumps to them, the `cali-`
//! ipsets and the routes of protocol 80. Pods keep their veths and the CNI plugin's routes,
//! so their traffic falls back to plain kernel routing. Running it again finds nothing.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    bpffs::{self, BpffsError, PinDir},
    iptables::{Backend, IptablesError},
};

/// The names of our TC programs, as the kernel reports them.
pub const PROGRAM_NAMES: [&str; 4] = [
    "from_workload",
    "to_workload",
    "host_ingress",
    "host_egress",
];

/// How long the programs may take to come off once their pins are gone.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "pin directory {0} is in use by a running agent: stop it first (a stopped agent leaves \
         its programs attached; cleanup removes them)"
    )]
    AgentRunning(PathBuf),
    #[error(transparent)]
    Bpffs(BpffsError),
    #[error(transparent)]
    IptablesAgentRunning(#[from] crate::runlock::RunLockError),
    #[error("remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "programs of ours are still attached after removing our pins ({0}); another process \
         holds their links"
    )]
    StillAttached(String),
    #[error("iptables-{backend}: {source}")]
    Iptables {
        backend: &'static str,
        source: Box<IptablesError>,
    },
    #[error("ipsets and routes: {0}")]
    SetsAndRoutes(#[source] Box<IptablesError>),
}

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Interfaces whose links were unpinned.
    pub interfaces: BTreeSet<String>,
    pub links: usize,
    pub maps: usize,
    /// The pin directory, when it existed.
    pub pin_dir: Option<PathBuf>,
    /// Per iptables backend: (chains, jumps from built-in chains).
    pub chains: Vec<(&'static str, usize, usize)>,
    pub ipsets: usize,
    pub routes: usize,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.links == 0
            && self.maps == 0
            && self.pin_dir.is_none()
            && self.chains.iter().all(|&(_, c, j)| c == 0 && j == 0)
            && self.ipsets == 0
            && self.routes == 0
    }

    /// One line per kind of thing removed, for people.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "nothing of ours on this node: no pin directory, no cali- chains, ipsets or \
                    protocol-80 routes"
                .to_owned();
        }
        let mut out = Vec::new();
        if let Some(dir) = &self.pin_dir {
            let ifaces: Vec<&str> = self.interfaces.iter().map(String::as_str).collect();
            out.push(format!(
                "removed {} TCX links on {} interfaces ({}), {} maps and the pin directory {}",
                self.links,
                ifaces.len(),
                if ifaces.is_empty() {
                    "-".to_owned()
                } else {
                    ifaces.join(", ")
                },
                self.maps,
                dir.display()
            ));
        }
        for &(backend, chains, jumps) in &self.chains {
            if chains + jumps > 0 {
                out.push(format!(
                    "removed {chains} cali- chains and {jumps} jumps to them (iptables-{backend})"
                ));
            }
        }
        if self.ipsets > 0 {
            out.push(format!("removed {} cali- ipsets", self.ipsets));
        }
        if self.routes > 0 {
            out.push(format!("removed {} routes of protocol 80", self.routes));
        }
        out.join("\n")
    }
}

fn remove_file(path: &Path) -> Result<bool, CleanupError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CleanupError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, CleanupError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.flatten().map(|e| e.path()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CleanupError::Remove {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Fails when an agent runs on this node: an iptables-mode agent (its lock in `run_dir`, see
/// [`crate::runlock`]) or a BPF agent on `root` (the lock on its pin directory). Nothing is
/// touched either way.
pub fn check_no_agent(root: &Path, run_dir: &Path) -> Result<(), CleanupError> {
    crate::runlock::check_not_running(run_dir)?;
    if root.exists() && bpffs::is_bpffs(root) {
        match PinDir::open(root) {
            Ok(p) => drop(p),
            Err(BpffsError::Busy(p)) => return Err(CleanupError::AgentRunning(p)),
            Err(e) => return Err(CleanupError::Bpffs(e)),
        }
    }
    Ok(())
}

/// Removes the pin directory `root` and everything in it. Fails without touching anything
/// when an agent holds it.
pub fn remove_bpf(root: &Path, removed: &mut Removed) -> Result<(), CleanupError> {
    if !root.exists() {
        return Ok(());
    }
    if !bpffs::is_bpffs(root) {
        return Err(CleanupError::Bpffs(BpffsError::NotBpffs(root.to_owned())));
    }
    let pins = match PinDir::open(root) {
        Ok(p) => p,
        Err(BpffsError::Busy(p)) => return Err(CleanupError::AgentRunning(p)),
        Err(e) => return Err(CleanupError::Bpffs(e)),
    };
    // Unpinning a link closes it (no process holds it once the agent is gone), which detaches
    // its program from the interface.
    for pin in entries(&pins.links_dir())? {
        if remove_file(&pin)? {
            removed.links += 1;
            // `<ifindex>-<ifname>-<ingress|egress>`, as the agent names them.
            if let Some((iface, _)) = pin
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('-'))
                .and_then(|(_, rest)| rest.rsplit_once('-'))
            {
                removed.interfaces.insert(iface.to_owned());
            }
        }
    }
    for pin in entries(&pins.maps_dir())? {
        if remove_file(&pin)? {
            removed.maps += 1;
        }
    }
    fs::remove_dir_all(root).map_err(|source| CleanupError::Remove {
        path: root.to_owned(),
        source,
    })?;
    removed.pin_dir = Some(root.to_owned());
    drop(pins);
    // The kernel releases a link whose last pin went from a work queue (bpf_link_put), so the
    // programs come off a moment later.
    let deadline = std::time::Instant::now() + DETACH_WAIT;
    loop {
        let left = attached_programs_of_ours();
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(CleanupError::StillAttached(left.join(", ")));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `iface ingress: from_workload`-style descriptions of our programs still attached to the
/// interfaces of this network namespace.
pub fn attached_programs_of_ours() -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let Ok(ifaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for iface in ifaces.iter() {
        let name = iface.name().to_string_lossy().into_owned();
        for (t, dir) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let Ok((_, progs)) = SchedClassifier::query_tcx(&name, t) else {
                continue;
            };
            for p in progs {
                let prog = p.name_as_str().unwrap_or("?");
                if PROGRAM_NAMES.contains(&prog) {
                    out.push(format!("{name} {dir}: {prog}"));
                }
            }
        }
    }
    out
}

/// Removes our iptables chains and jumps (through `backends`), ipsets and routes.
pub async fn remove_iptables(
    backends: &[Backend],
    removed: &mut Removed,
) -> Result<(), CleanupError> {
    for &backend in backends {
        let (chains, jumps) =
            crate::iptables::remove_ours(backend)
                .await
                .map_err(|e| CleanupError::Iptables {
                    backend: backend.name(),
                    source: Box::new(e),
                })?;
        removed.chains.push((backend.name(), chains, jumps));
    }
    let (ipsets, routes) = crate::iptables::remove_sets_and_routes()
        .await
        .map_err(|e| CleanupError::SetsAndRoutes(Box::new(e)))?;
    removed.ipsets = ipsets;
    removed.routes = routes;
    Ok(())
}

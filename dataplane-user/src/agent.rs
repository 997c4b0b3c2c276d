//! The per-node agent: owns the pin directory, loads the programs, and keeps them attached to
//! the host NIC and to every `cali*` interface as interfaces come and go.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
};

use futures::StreamExt as _;
use tracing::{info, warn};

use crate::{
    WORKLOAD_IFACE_PREFIX,
    attach::{AttachError, Attachment, Programs, Role},
    bpffs::{BpffsError, PinDir},
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
    #[error("the link event stream ended")]
    EventsEnded,
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub etcd_endpoints: Vec<String>,
    pub host_iface: String,
    pub bpffs_dir: PathBuf,
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

/// Runs the agent until `shutdown` completes. On shutdown the programs stay attached (their
/// links are pinned), so the dataplane keeps forwarding while the agent restarts.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Check what can be checked before touching anything, so a bad flag leaves no trace.
    let host_ifindex = ifindex_of(&opts.host_iface)
        .ok_or_else(|| AgentError::NoHostIface(opts.host_iface.clone()))?;
    let pins = PinDir::open(&opts.bpffs_dir)?;
    let programs = Programs::load(&pins)?;
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
        return Err(e.into());
    }
    info!(
        node = %opts.node,
        host_iface = %opts.host_iface,
        bpffs_dir = %pins.root().display(),
        workloads = state.by_ifindex.len() - 1,
        "agent ready"
    );

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                info!("shutting down; programs stay attached through their pinned links");
                return Ok(());
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

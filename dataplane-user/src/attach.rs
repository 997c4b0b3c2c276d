//! Programs ↔ interfaces: loads the embedded object with its maps pinned, and attaches the
//! programs to interfaces through TCX links that are pinned, so that they survive the agent
//! and a restarted agent can swap its programs in atomically.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use dataplane_common::map_names;
use tracing::{debug, info, warn};

use crate::bpffs::PinDir;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("load program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attach {program} to {iface} {direction}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        direction: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pin link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("reuse pinned link {path}: {source}")]
    Reuse {
        path: PathBuf,
        source: Box<LinkError>,
    },
    #[error("unpin link {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
}

/// Which programs an interface gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side veth (`cali…`).
    Workload,
    /// The node's NIC toward the fabric.
    Host,
}

struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
    direction: &'static str,
}

impl Role {
    fn hooks(self) -> [Hook; 2] {
        match self {
            Self::Workload => [
                Hook {
                    program: "from_workload",
                    attach_type: TcAttachType::Ingress,
                    direction: "ingress",
                },
                Hook {
                    program: "to_workload",
                    attach_type: TcAttachType::Egress,
                    direction: "egress",
                },
            ],
            Self::Host => [
                Hook {
                    program: "host_ingress",
                    attach_type: TcAttachType::Ingress,
                    direction: "ingress",
                },
                Hook {
                    program: "host_egress",
                    attach_type: TcAttachType::Egress,
                    direction: "egress",
                },
            ],
        }
    }
}

const PROGRAMS: [&str; 4] = [
    "from_workload",
    "to_workload",
    "host_ingress",
    "host_egress",
];
/// The maps pinned under `<bpffs-dir>/maps`, by name.
pub const PINNED_MAPS: [&str; 15] = [
    map_names::COUNTERS,
    map_names::ROUTES,
    map_names::ENDPOINTS,
    map_names::NODES,
    map_names::CONFIG,
    map_names::POLICY_IP,
    map_names::POLICY_IP_EXACT,
    map_names::POLICY_PORT,
    map_names::POLICY_PORT_EXACT,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
    map_names::POLICY_HITS,
    map_names::POLICY_RULES,
    map_names::LOG_ON,
    map_names::LOG_IFACES,
];

/// The programs of one interface, attached through pinned TCX links.
#[derive(Debug)]
pub struct Attachment {
    pub ifindex: u32,
    pub name: String,
    pub role: Role,
    links: Vec<(PathBuf, PinnedLink)>,
}

/// Name of the pin of one interface's link: `<ifindex>-<ifname>-<ingress|egress>`. The
/// ifindex tells a pin of a deleted interface from one of a new interface with the same name.
fn link_pin_name(ifindex: u32, iface: &str, direction: &str) -> String {
    format!("{ifindex}-{iface}-{direction}")
}

/// Parses a pin name back into (ifindex, interface name).
fn parse_link_pin_name(pin: &str) -> Option<(u32, &str)> {
    let (ifindex, rest) = pin.split_once('-')?;
    let (iface, direction) = rest.rsplit_once('-')?;
    if !matches!(direction, "ingress" | "egress") || iface.is_empty() {
        return None;
    }
    Some((ifindex.parse().ok()?, iface))
}

/// The loaded object and where its links are pinned.
pub struct Programs {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// Maps whose pinned layout differed from this build's and were remade.
    pub layout: crate::layout::Report,
    /// Old conntrack entries to carry over once the new programs are attached.
    pub catch_up: Option<crate::layout::CatchUp>,
}

impl Programs {
    /// Loads `object` (the embedded [`crate::EBPF_OBJECT`] unless testing another build), reusing the maps already pinned under `pins` (an agent
    /// restart keeps its state) or creating and pinning them. The conntrack table gets
    /// `conntrack_size` entries. A pinned map whose layout differs from this build's (or
    /// from `conntrack_size`) is remade, its entries carried over when they fit
    /// ([`crate::layout`]).
    pub fn load(pins: &PinDir, object: &[u8], conntrack_size: u32) -> Result<Self, AttachError> {
        let maps_dir = pins.maps_dir();
        let sizes = [(map_names::CONNTRACK, conntrack_size)];
        let declared = crate::layout::declared(object, &PINNED_MAPS, &sizes)?;
        let recorded = crate::layout::recorded_versions(pins.root())?;
        let changed = crate::layout::set_aside_changed(
            &maps_dir,
            &declared,
            &recorded,
            dataplane_common::layout_version::of,
        )?;
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        loader.map_max_entries(map_names::CONNTRACK, conntrack_size);
        let mut ebpf = loader
            .load(object)
            .map_err(|e| AttachError::Load(Box::new(e)))?;
        let (layout, catch_up) = crate::layout::migrate(&maps_dir, changed)?;
        // This build's maps are pinned now: record what their entries mean.
        crate::layout::record_versions(pins.root(), &dataplane_common::layout_version::ALL)?;
        for name in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(AttachError::MissingProgram(name))?
                .try_into()
                .map_err(|source| AttachError::Program {
                    name,
                    source: Box::new(source),
                })?;
            prog.load().map_err(|source| AttachError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        Ok(Self {
            ebpf,
            links_dir: pins.links_dir(),
            layout,
            catch_up: Some(catch_up),
        })
    }

    /// The reader of the programs' trace records (aya-log's ring buffer), forwarding them to
    /// [`crate::trace::BpfLog`]; `None` for an object built without tracing.
    pub fn trace_logger(&mut self) -> Option<aya_log::EbpfLogger<crate::trace::BpfLog>> {
        match aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, crate::trace::BpfLog) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no trace records from these programs");
                None
            }
        }
    }

    /// Removes the pins of links whose interface is gone (their links are already detached
    /// by the kernel), so that only live interfaces' pins remain. `live` holds
    /// (ifindex, name) of the interfaces that exist now.
    pub fn remove_stale_pins(&self, live: &HashSet<(u32, String)>) -> Result<(), AttachError> {
        let entries = match fs::read_dir(&self.links_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(AttachError::Unpin {
                    path: self.links_dir.clone(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let keep = file_name
                .to_str()
                .and_then(parse_link_pin_name)
                .is_some_and(|(ifindex, iface)| live.contains(&(ifindex, iface.to_owned())));
            if !keep {
                let path = entry.path();
                debug!(pin = %path.display(), "removing pin of a link whose interface is gone");
                remove_pin(&path)?;
            }
        }
        Ok(())
    }

    /// Attaches `role`'s programs to the interface. A link pinned by an earlier agent for the
    /// same interface is updated in place (the old program is replaced atomically, no packet
    /// sees the interface without a program); otherwise a new TCX link is created. Either both
    /// hooks end up attached and pinned, or neither.
    pub fn attach(
        &mut self,
        ifindex: u32,
        name: &str,
        role: Role,
    ) -> Result<Attachment, AttachError> {
        let mut links = Vec::with_capacity(2);
        for hook in role.hooks() {
            match self.attach_hook(ifindex, name, &hook) {
                Ok(link) => links.push(link),
                Err(e) => {
                    for (path, link) in links {
                        if let Err(undo) = unpin(path, link) {
                            warn!(iface = name, error = %undo, "undo a half-made attachment");
                        }
                    }
                    return Err(e);
                }
            }
        }
        info!(iface = name, ifindex, ?role, "attached");
        Ok(Attachment {
            ifindex,
            name: name.to_owned(),
            role,
            links,
        })
    }

    fn attach_hook(
        &mut self,
        ifindex: u32,
        iface: &str,
        hook: &Hook,
    ) -> Result<(PathBuf, PinnedLink), AttachError> {
        let pin_path = self
            .links_dir
            .join(link_pin_name(ifindex, iface, hook.direction));
        let attach_err = |source| AttachError::Attach {
            program: hook.program,
            iface: iface.to_owned(),
            direction: hook.direction,
            source: Box::new(source),
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.program)
            .ok_or(AttachError::MissingProgram(hook.program))?
            .try_into()
            .map_err(attach_err)?;
        let id = match PinnedLink::from_pin(&pin_path) {
            Ok(old) => {
                // The pin keeps the link alive; we hold its fd now, so the file can go and be
                // made again for the updated link below.
                fs::remove_file(&pin_path).map_err(|source| AttachError::Unpin {
                    path: pin_path.clone(),
                    source,
                })?;
                let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|source| {
                    AttachError::Reuse {
                        path: pin_path.clone(),
                        source: Box::new(source),
                    }
                })?;
                prog.attach_to_link(link).map_err(attach_err)?
            }
            Err(_) => prog
                .attach_with_options(
                    iface,
                    hook.attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?,
        };
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| AttachError::Reuse {
            path: pin_path.clone(),
            source: Box::new(source),
        })?;
        let pinned = fd_link.pin(&pin_path).map_err(|source| AttachError::Pin {
            path: pin_path.clone(),
            source: Box::new(source),
        })?;
        Ok((pin_path, pinned))
    }
}

impl Attachment {
    /// Detaches the programs: removes the pins and closes the links.
    pub fn detach(self) -> Result<(), AttachError> {
        let mut result = Ok(());
        for (path, link) in self.links {
            if let Err(e) = unpin(path, link) {
                result = Err(e);
            }
        }
        result
    }
}

/// Removes the pin and closes the link, which detaches the program.
fn unpin(path: PathBuf, link: PinnedLink) -> Result<(), AttachError> {
    match link.unpin() {
        Ok(fd_link) => {
            drop(fd_link);
            Ok(())
        }
        Err(source) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AttachError::Unpin { path, source }),
    }
}

fn remove_pin(path: &Path) -> Result<(), AttachError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AttachError::Unpin {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let name = link_pin_name(27, "cali1a2b3c4d5e6", "ingress");
        assert_eq!(name, "27-cali1a2b3c4d5e6-ingress");
        assert_eq!(parse_link_pin_name(&name), Some((27, "cali1a2b3c4d5e6")));
        assert_eq!(parse_link_pin_name("3-eth-0-egress"), Some((3, "eth-0")));
        assert_eq!(parse_link_pin_name("x-eth0-egress"), None);
        assert_eq!(parse_link_pin_name("3-eth0-sideways"), None);
        assert_eq!(parse_link_pin_name("3--egress"), None);
    }
}

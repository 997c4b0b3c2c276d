//! Packet tracing in the programs, per interface, switched at run time: `dataplane trace`
//! writes the pinned maps `DP_LOG_IFACES` (the traced interfaces) and `DP_LOG_ON` (non-zero
//! when any is traced, the one load an untraced packet pays), so it works without the agent
//! and without reloading anything. The agent forwards the programs' records (aya-log) into
//! its own log under the target `bpf`: [`BpfLog`].

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use dataplane_common::{MAX_LOG_IFACES, map_names};

use crate::bpffs;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0}")]
    Usage(String),
    #[error("no interface {iface}{pod} on this node")]
    NoInterface { iface: String, pod: String },
    #[error("open pinned map {path}: {source} (is an agent running with this --bpffs-dir?)")]
    Open { path: String, source: MapError },
    #[error("{what} {name}: {source}")]
    Map {
        what: &'static str,
        name: &'static str,
        source: MapError,
    },
    #[error("{MAX_LOG_IFACES} interfaces are traced already; switch one off first")]
    Full,
}

fn open(root: &Path, name: &'static str) -> Result<Map, TraceError> {
    let path = bpffs::maps_dir(root).join(name);
    let data = MapData::from_pin(&path).map_err(|source| TraceError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Ok(if name == map_names::LOG_ON {
        Map::Array(data)
    } else {
        Map::HashMap(data)
    })
}

fn map_err(what: &'static str, name: &'static str) -> impl Fn(MapError) -> TraceError {
    move |source| TraceError::Map { what, name, source }
}

/// The interface `target` names: itself, or for `namespace/pod` the host veth the CNI plugin
/// made for that pod. Returns (interface, ifindex).
pub fn resolve(target: &str) -> Result<(String, u32), TraceError> {
    let (iface, pod) = match target.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => (
            crate::cni::netsetup::host_veth_name(Some((ns, pod)), ""),
            format!(" (the host side of pod {target})"),
        ),
        Some(_) => {
            return Err(TraceError::Usage(format!(
                "{target:?} is neither an interface name nor namespace/pod"
            )));
        }
        None => (target.to_owned(), String::new()),
    };
    let ifindex =
        nix::net::if_::if_nametoindex(iface.as_str()).map_err(|_| TraceError::NoInterface {
            iface: iface.clone(),
            pod,
        })?;
    Ok((iface, ifindex))
}

/// The traced interfaces' indexes.
pub fn traced(root: &Path) -> Result<Vec<u32>, TraceError> {
    let map: HashMap<MapData, u32, u32> = HashMap::try_from(open(root, map_names::LOG_IFACES)?)
        .map_err(map_err("read", map_names::LOG_IFACES))?;
    let mut v = map
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err("read", map_names::LOG_IFACES))?;
    v.sort_unstable();
    Ok(v)
}

/// Switches tracing of `ifindex` on or off, then sets the global switch to the number of
/// traced interfaces (recounted, so that two runs at once cannot leave it wrong for long).
pub fn set(root: &Path, ifindex: u32, on: bool) -> Result<usize, TraceError> {
    let mut ifaces: HashMap<MapData, u32, u32> =
        HashMap::try_from(open(root, map_names::LOG_IFACES)?)
            .map_err(map_err("open", map_names::LOG_IFACES))?;
    if on {
        ifaces.insert(ifindex, 1, 0).map_err(|e| match e {
            MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                TraceError::Full
            }
            e => map_err("write", map_names::LOG_IFACES)(e),
        })?;
    } else {
        match ifaces.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err("write", map_names::LOG_IFACES)(e)),
        }
    }
    let count = traced(root)?.len();
    let mut switch: Array<MapData, u32> = Array::try_from(open(root, map_names::LOG_ON)?)
        .map_err(map_err("open", map_names::LOG_ON))?;
    switch
        .set(0, count as u32, 0)
        .map_err(map_err("write", map_names::LOG_ON))?;
    Ok(count)
}

/// `dataplane trace`: prints what it did (or, for `list`, the traced interfaces).
pub fn run(args: &crate::cli::TraceArgs) -> Result<(), TraceError> {
    let root = &args.bpffs_dir;
    match (args.target.as_str(), args.state.as_deref()) {
        ("list", None) => {
            for ifindex in traced(root)? {
                let name = crate::dump::iface_name(ifindex)
                    .unwrap_or_else(|| format!("ifindex:{ifindex}"));
                println!("{name}");
            }
            Ok(())
        }
        ("off-all", None) => {
            for ifindex in traced(root)? {
                set(root, ifindex, false)?;
            }
            println!("tracing off on every interface");
            Ok(())
        }
        (target, Some(state)) => {
            let on = match state {
                "on" => true,
                "off" => false,
                other => {
                    return Err(TraceError::Usage(format!("{other:?}: expected on or off")));
                }
            };
            let (iface, ifindex) = resolve(target)?;
            let count = set(root, ifindex, on)?;
            println!(
                "tracing {} on {iface} (ifindex {ifindex}); {count} interface(s) traced",
                if on { "on" } else { "off" }
            );
            Ok(())
        }
        (target, None) => Err(TraceError::Usage(format!(
            "{target:?}: give on or off (or use `dataplane trace list` / `off-all`)"
        ))),
    }
}

/// Forwards the programs' aya-log records into this process's tracing output, target `bpf`,
/// at info level whatever level the program gave (tracing is switched on per interface by
/// hand, so its records are wanted when they come).
pub struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "bpf", "{}", decode(&record.args().to_string()));
    }

    fn flush(&self) {}
}

/// Names the numbers of a program's record (the programs log numbers only, which keeps the
/// verifier's work small): `hook=0` → `hook=from-workload`, `verdict=2` → `verdict=drop`,
/// `moved=<hex>` (counter slots) → `outcome=…` with the slots' names, `to=0` left out.
pub fn decode(msg: &str) -> String {
    use dataplane_common::{counter, hook};
    let mut out = Vec::new();
    for word in msg.split(' ') {
        let decoded = match word.split_once('=') {
            Some(("hook", h)) => h
                .parse::<u8>()
                .map(|h| format!("hook={}", hook::name(h)))
                .ok(),
            Some(("verdict", v)) => v
                .parse::<i32>()
                .map(|v| {
                    let name = match v {
                        0 => "pass",
                        2 => "drop",
                        7 => "redirect",
                        _ => return format!("verdict={v}"),
                    };
                    format!("verdict={name}")
                })
                .ok(),
            Some(("moved", bits)) => u32::from_str_radix(bits, 16)
                .map(|bits| {
                    let names: Vec<&str> = counter::NAMES
                        .iter()
                        .filter(|(slot, _)| *slot < 32 && bits & (1 << slot) != 0)
                        .map(|(_, n)| *n)
                        .collect();
                    format!("outcome={}", names.join(","))
                })
                .ok(),
            Some(("to", "0")) => Some(String::new()),
            Some(("to", i)) => i.parse::<u32>().ok().map(|i| {
                let name = crate::dump::iface_name(i).unwrap_or_else(|| format!("ifindex:{i}"));
                format!("to={name}")
            }),
            Some(("if", i)) => i.parse::<u32>().ok().map(|i| {
                let name = crate::dump::iface_name(i).unwrap_or_else(|| format!("ifindex:{i}"));
                format!("if={name}({i})")
            }),
            _ => None,
        };
        match decoded {
            Some(d) if d.is_empty() => {}
            Some(d) => out.push(d),
            None => out.push(word.to_owned()),
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_named() {
        let bits = (1u32 << dataplane_common::counter::CT_NEW)
            | (1 << dataplane_common::counter::ENCAPSULATED);
        let msg = format!(
            "if=4000000 hook=0 verdict=7 moved={bits:x} proto=17 10.65.0.2:40000 > 10.65.0.130:53 to=0"
        );
        assert_eq!(
            decode(&msg),
            "if=ifindex:4000000(4000000) hook=from-workload verdict=redirect \
             outcome=encapsulated,ct_new proto=17 10.65.0.2:40000 > 10.65.0.130:53"
        );
        let drop = format!(
            "if=4000000 hook=1 verdict=2 moved={:x} ethertype=806",
            1u32 << dataplane_common::counter::DROP_SPOOFED_MAC
        );
        assert!(decode(&drop).contains("hook=to-workload verdict=drop outcome=drop_spoofed_mac"));
    }
}

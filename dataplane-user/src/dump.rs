//! `dataplane map-dump`: the pinned maps as aligned tables or stable JSON.

use std::path::Path;

use dataplane_common::{counter, hook};
use serde::Serialize;

use crate::maps::{self, MapsError};

/// Name of the interface with this index in the current network namespace, if any.
pub fn iface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// One row of `map-dump counters`: one interface and hook, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CounterRow {
    pub ifindex: u32,
    /// Interface name, or null when the interface no longer exists.
    pub iface: Option<String>,
    pub hook: String,
    pub packets: u64,
    pub bytes: u64,
    pub passed: u64,
    pub redirected: u64,
    pub encapsulated: u64,
    pub decapsulated: u64,
    /// Drops by reason; only reasons with a non-zero count are listed.
    pub drops: std::collections::BTreeMap<String, u64>,
}

pub fn counter_rows(root: &Path) -> Result<Vec<CounterRow>, MapsError> {
    let counters = maps::read_counters(root)?;
    Ok(counters
        .into_iter()
        .map(|((ifindex, h), c)| CounterRow {
            ifindex,
            iface: iface_name(ifindex),
            hook: hook::name(h).to_owned(),
            packets: c.values[counter::PACKETS],
            bytes: c.values[counter::BYTES],
            passed: c.values[counter::PASSED],
            redirected: c.values[counter::REDIRECTED],
            encapsulated: c.values[counter::ENCAPSULATED],
            decapsulated: c.values[counter::DECAPSULATED],
            drops: counter::NAMES
                .iter()
                .filter(|(slot, _)| *slot >= counter::DROP_BASE && c.values[*slot] > 0)
                .map(|(slot, name)| {
                    let reason = name.trim_start_matches("drop_").to_owned();
                    (reason, c.values[*slot])
                })
                .collect(),
        })
        .collect())
}

/// The counters as an aligned table.
pub fn counters_table(rows: &[CounterRow]) -> String {
    let mut out = String::new();
    let width = rows
        .iter()
        .map(|r| r.iface.as_deref().map_or(6, str::len))
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "{:<width$}  {:>7}  {:<13}  {:>12}  {:>14}  {:>12}  {:>10}  {:>7}  {:>7}  DROPS\n",
        "IFACE", "IFINDEX", "HOOK", "PACKETS", "BYTES", "PASSED", "REDIRECT", "ENCAP", "DECAP"
    ));
    for r in rows {
        let drops = if r.drops.is_empty() {
            "-".to_owned()
        } else {
            r.drops
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        out.push_str(&format!(
            "{:<width$}  {:>7}  {:<13}  {:>12}  {:>14}  {:>12}  {:>10}  {:>7}  {:>7}  {drops}\n",
            r.iface.as_deref().unwrap_or("(gone)"),
            r.ifindex,
            r.hook,
            r.packets,
            r.bytes,
            r.passed,
            r.redirected,
            r.encapsulated,
            r.decapsulated,
        ));
    }
    out
}

fn flag_names(flags: u8) -> Vec<String> {
    dataplane_common::route_flags::NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One row of `map-dump routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RouteRow {
    pub cidr: String,
    pub kind: String,
    /// Host veth of a local workload.
    pub iface: Option<String>,
    pub ifindex: Option<u32>,
    /// Node behind a remote block or host.
    pub via: Option<String>,
    pub mac: Option<String>,
    pub flags: Vec<String>,
}

pub fn route_rows(root: &Path) -> Result<Vec<RouteRow>, MapsError> {
    use dataplane_common::route_kind;
    Ok(maps::read_routes(root)?
        .into_iter()
        .map(|((plen, addr), v)| {
            let local = v.kind == route_kind::LOCAL_WORKLOAD;
            let remote = matches!(v.kind, route_kind::REMOTE_BLOCK | route_kind::REMOTE_HOST);
            RouteRow {
                cidr: format!("{}/{plen}", std::net::Ipv4Addr::from(addr)),
                kind: route_kind::name(v.kind).to_owned(),
                iface: if local { iface_name(v.ifindex) } else { None },
                ifindex: local.then_some(v.ifindex),
                via: remote.then(|| std::net::Ipv4Addr::from(v.next_hop).to_string()),
                mac: local.then(|| mac_text(v.mac)),
                flags: flag_names(v.flags),
            }
        })
        .collect())
}

pub fn routes_table(rows: &[RouteRow]) -> String {
    let mut out = format!("{:<18}  {:<15}  {}\n", "CIDR", "KIND", "DETAILS");
    for r in rows {
        let mut details = Vec::new();
        if let Some(i) = &r.iface {
            details.push(i.clone());
        }
        if let Some(i) = r.ifindex {
            details.push(format!("idx {i}"));
        }
        if let Some(m) = &r.mac {
            details.push(m.clone());
        }
        if let Some(v) = &r.via {
            details.push(format!("via {v}"));
        }
        details.extend(r.flags.iter().cloned());
        out.push_str(&format!(
            "{:<18}  {:<15}  {}\n",
            r.cidr,
            r.kind,
            details.join("  ")
        ));
    }
    out
}

/// One row of `map-dump endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EndpointRow {
    pub ifindex: u32,
    pub iface: Option<String>,
    pub ip: String,
    pub mac: String,
}

pub fn endpoint_rows(root: &Path) -> Result<Vec<EndpointRow>, MapsError> {
    Ok(maps::read_endpoints(root)?
        .into_iter()
        .map(|(ifindex, v)| EndpointRow {
            ifindex,
            iface: iface_name(ifindex),
            ip: std::net::Ipv4Addr::from(v.ip).to_string(),
            mac: mac_text(v.mac),
        })
        .collect())
}

pub fn endpoints_table(rows: &[EndpointRow]) -> String {
    let mut out = format!(
        "{:>7}  {:<16}  {:<15}  {}\n",
        "IFINDEX", "IFACE", "IP", "MAC"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>7}  {:<16}  {:<15}  {}\n",
            r.ifindex,
            r.iface.as_deref().unwrap_or("(gone)"),
            r.ip,
            r.mac
        ));
    }
    out
}

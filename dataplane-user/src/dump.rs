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

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
    /// Compiled policy ids (0: no policy in that direction, all allowed).
    pub ingress_policy: u32,
    pub egress_policy: u32,
}

pub fn endpoint_rows(root: &Path) -> Result<Vec<EndpointRow>, MapsError> {
    Ok(maps::read_endpoints(root)?
        .into_iter()
        .map(|(ifindex, v)| EndpointRow {
            ifindex,
            iface: iface_name(ifindex),
            ip: std::net::Ipv4Addr::from(v.ip).to_string(),
            mac: mac_text(v.mac),
            ingress_policy: v.ingress_policy,
            egress_policy: v.egress_policy,
        })
        .collect())
}

pub fn endpoints_table(rows: &[EndpointRow]) -> String {
    let policy = |id: u32| {
        if id == 0 {
            "none".to_owned()
        } else {
            id.to_string()
        }
    };
    let mut out = format!(
        "{:>7}  {:<16}  {:<15}  {:<17}  {:>7}  {:>7}\n",
        "IFINDEX", "IFACE", "IP", "MAC", "IN-POL", "OUT-POL"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>7}  {:<16}  {:<15}  {:<17}  {:>7}  {:>7}\n",
            r.ifindex,
            r.iface.as_deref().unwrap_or("(gone)"),
            r.ip,
            r.mac,
            policy(r.ingress_policy),
            policy(r.egress_policy),
        ));
    }
    out
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".to_owned(),
        6 => "TCP".to_owned(),
        17 => "UDP".to_owned(),
        132 => "SCTP".to_owned(),
        n => n.to_string(),
    }
}

/// One row of `map-dump conntrack`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ConntrackRow {
    pub proto: String,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub state: String,
    /// Seconds since the first and the latest packet.
    pub age_s: f64,
    pub idle_s: f64,
    pub packets_fwd: u64,
    pub packets_rev: u64,
    /// Which ends' policies approved it: `egress` (the originator's), `ingress` (the
    /// answerer's), and `replied`, `fin-fwd`, `fin-rev`.
    pub flags: Vec<String>,
}

pub fn conntrack_rows(root: &Path) -> Result<Vec<ConntrackRow>, MapsError> {
    use dataplane_common::ct;
    let map = maps::open_conntrack(root)?;
    let now = maps::monotonic_ns();
    let secs = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    let mut rows = Vec::new();
    for entry in map.iter() {
        let Ok((k, v)) = entry else { continue };
        let flags = [
            (ct::EGRESS_APPROVED, "egress"),
            (ct::INGRESS_APPROVED, "ingress"),
            (ct::REPLIED, "replied"),
            (ct::FIN_FWD, "fin-fwd"),
            (ct::FIN_REV, "fin-rev"),
        ]
        .iter()
        .filter(|(b, _)| v.flags & b != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
        rows.push(ConntrackRow {
            proto: proto_name(k.proto),
            src: std::net::Ipv4Addr::from(k.saddr).to_string(),
            sport: u16::from_be_bytes(k.sport),
            dst: std::net::Ipv4Addr::from(k.daddr).to_string(),
            dport: u16::from_be_bytes(k.dport),
            state: ct::state_name(v.state).to_owned(),
            age_s: secs(v.created_ns),
            idle_s: secs(v.last_seen_ns),
            packets_fwd: v.packets_fwd,
            packets_rev: v.packets_rev,
            flags,
        });
    }
    rows.sort_by(|a, b| {
        (&a.proto, &a.src, a.sport, &a.dst, a.dport)
            .cmp(&(&b.proto, &b.src, b.sport, &b.dst, b.dport))
    });
    Ok(rows)
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{:<5} {:>21} -> {:<21}  {:<11}  age {:.1}s  idle {:.1}s  pkts {}/{}  {}\n",
            r.proto,
            format!("{}:{}", r.src, r.sport),
            format!("{}:{}", r.dst, r.dport),
            r.state,
            r.age_s,
            r.idle_s,
            r.packets_fwd,
            r.packets_rev,
            r.flags.join(",")
        ));
    }
    out.push_str(&format!("{} connections tracked\n", rows.len()));
    out
}

/// One row of `map-dump policy`: a verdict entry of a compiled policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyRow {
    pub policy: u32,
    /// Address class, or a source-port table (`sport-table N`).
    pub class: String,
    /// The addresses in this class (the CIDRs whose longest match it is).
    pub peers: Vec<String>,
    pub proto: String,
    /// `*` for every port, else the port block.
    pub ports: String,
    pub action: String,
    /// Index of the deciding rule in the compiled policy; none for no-match.
    pub rule: Option<u32>,
}

pub fn policy_rows(root: &Path) -> Result<Vec<PolicyRow>, MapsError> {
    use dataplane_common::{POLICY_PORT_CLASS_BITS, POLICY_PORT_PROTO_BITS, verdict};
    let e = maps::read_policy(root)?.entries();
    let (ip, port) = (e.ip, e.port);
    let mut peers: std::collections::BTreeMap<(u32, u32), Vec<String>> = Default::default();
    for ((plen, k), class) in &ip {
        peers.entry((k.policy, *class)).or_default().push(format!(
            "{}/{}",
            std::net::Ipv4Addr::from(k.addr),
            plen - 32
        ));
    }
    let sport_bit = crate::policy::compile::SPORT_TABLE_BIT;
    let mut rows = Vec::new();
    for ((plen, k), v) in &port {
        let ports = if *plen <= POLICY_PORT_PROTO_BITS {
            "*".to_owned()
        } else {
            let len = plen - POLICY_PORT_PROTO_BITS;
            let first = u16::from_be_bytes(k.port);
            let last = u32::from(first) + (1u32 << (16 - len)) - 1;
            if last == u32::from(first) {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        };
        rows.push(PolicyRow {
            policy: k.policy,
            class: if k.class & sport_bit != 0 {
                format!("sport-table {}", k.class & !sport_bit)
            } else {
                k.class.to_string()
            },
            peers: peers.get(&(k.policy, k.class)).cloned().unwrap_or_default(),
            proto: if *plen == POLICY_PORT_CLASS_BITS {
                "other".to_owned()
            } else {
                proto_name(k.proto)
            },
            ports,
            action: if v.sport_table != 0 {
                format!("by source port (table {})", v.sport_table & !sport_bit)
            } else {
                verdict::name(v.action).to_owned()
            },
            rule: (v.rule != u32::MAX).then_some(v.rule),
        });
    }
    Ok(rows)
}

pub fn policy_table(rows: &[PolicyRow]) -> String {
    let mut out = format!(
        "{:>6}  {:>6}  {:<6}  {:<11}  {:<9}  {:>5}  {}\n",
        "POLICY", "CLASS", "PROTO", "PORTS", "ACTION", "RULE", "PEERS"
    );
    for r in rows {
        let peers = if r.peers.len() > 4 {
            format!("{} … ({} CIDRs)", r.peers[..4].join(" "), r.peers.len())
        } else {
            r.peers.join(" ")
        };
        out.push_str(&format!(
            "{:>6}  {:>6}  {:<6}  {:<11}  {:<9}  {:>5}  {}\n",
            r.policy,
            r.class,
            r.proto,
            r.ports,
            r.action,
            r.rule.map_or("-".to_owned(), |n| n.to_string()),
            peers
        ));
    }
    out
}

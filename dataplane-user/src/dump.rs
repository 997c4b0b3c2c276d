//! `dataplane map-dump`: the pinned maps as aligned tables or stable JSON.

use std::path::Path;

use dataplane_common::{counter, hook};
use serde::Serialize;

use crate::maps::{self, MapsError};

/// What can go wrong in `map-dump` beyond reading the maps: a selection that names nothing.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(
        "no interface {iface}{pod} in this network namespace (run map-dump in the node's namespace)"
    )]
    NoInterface { iface: String, pod: String },
    #[error("interface {0} is not a pod endpoint the programs know (not in the endpoints map)")]
    NotEndpoint(String),
    #[error("{0}")]
    Usage(String),
    #[error("write the dump: {0}")]
    Write(#[from] std::io::Error),
}

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
    /// Directions (`ingress`, `egress`) whose new rules do not fit the maps: the agent kept
    /// the policy in force before, or denies all (`ctl node status` says why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// The directions an endpoint's flags mark as held back (see [`EndpointRow::held`]).
pub fn held_directions(flags: u16) -> Vec<String> {
    use dataplane_common::endpoint_flags::{EGRESS_HELD, INGRESS_HELD};
    [(INGRESS_HELD, "ingress"), (EGRESS_HELD, "egress")]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, d)| d.to_owned())
        .collect()
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
            held: held_directions(v.flags),
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
            "{:>7}  {:<16}  {:<15}  {:<17}  {:>7}  {:>7}",
            r.ifindex,
            r.iface.as_deref().unwrap_or("(gone)"),
            r.ip,
            r.mac,
            policy(r.ingress_policy),
            policy(r.egress_policy),
        ));
        if !r.held.is_empty() {
            out.push_str(&format!(
                "  HELD {}: new rules do not fit the maps (ctl node status says why)",
                r.held.join(",")
            ));
        }
        out.push('\n');
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
    let map = maps::open_conntrack(root)?;
    let now = maps::monotonic_ns();
    let mut rows = Vec::new();
    for entry in map.iter() {
        let Ok((k, v)) = entry else { continue };
        rows.push(conntrack_row(&k, &v, now));
    }
    rows.sort_by(|a, b| {
        (&a.proto, &a.src, a.sport, &a.dst, a.dport)
            .cmp(&(&b.proto, &b.src, b.sport, &b.dst, b.dport))
    });
    Ok(rows)
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> String {
    let mut out: String = rows.iter().map(conntrack_line).collect();
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

/// One row of the rules part of `map-dump policy`: a rule of a compiled policy (or its "no
/// rule matched" default) in one direction, with the packets it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyRuleRow {
    pub policy: u32,
    /// `ingress` or `egress`: the endpoint direction the compiled policy serves.
    pub direction: String,
    /// Index of the rule in the compiled policy (the `rule` of the verdict rows); null for the
    /// default of an isolated endpoint, when no rule matched.
    pub rule: Option<u32>,
    /// The Calico policy it comes from (`namespace/name`, or a global policy's name); null
    /// for the default, or when the agent could not describe it.
    pub name: Option<String>,
    /// The rule's number in that policy's ingress or egress list (0-based).
    pub number: Option<u32>,
    /// `allow`, `deny` (Calico's Pass shows as allow: the profile allows), `no-match`.
    pub action: String,
    /// Packets this rule decided in this direction, summed over CPUs: a connection's first
    /// packet at this end (tracked packets do not consult policy).
    pub hits: u64,
}

/// The endpoint `map-dump policy IFACE|POD` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyEndpoint {
    pub iface: String,
    pub ifindex: u32,
    /// `namespace/pod` when it was selected that way.
    pub pod: Option<String>,
    pub ip: String,
    /// Compiled policy ids (0: no policy in that direction, everything allowed).
    pub ingress_policy: u32,
    pub egress_policy: u32,
    /// See [`EndpointRow::held`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// `map-dump policy`: the rules in force with their hit counts, and the compiled verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyDump {
    /// The selected endpoint, when one was.
    pub endpoint: Option<PolicyEndpoint>,
    /// The selected direction (`ingress`, `egress`), when one was.
    pub direction: Option<String>,
    pub rules: Vec<PolicyRuleRow>,
    pub verdicts: Vec<PolicyRow>,
}

fn direction_name(egress: bool) -> &'static str {
    if egress { "egress" } else { "ingress" }
}

/// The interface `target` names: itself, or for `namespace/pod` the host veth the CNI plugin
/// made for that pod (Calico's name). Returns (interface, pod, ifindex).
fn resolve_target(target: &str) -> Result<(String, Option<String>, u32), DumpError> {
    let (iface, pod) = match target.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => (
            crate::cni::netsetup::host_veth_name(Some((ns, pod)), ""),
            Some(target.to_owned()),
        ),
        Some(_) => {
            return Err(DumpError::Usage(format!(
                "{target:?} is neither an interface name nor namespace/pod"
            )));
        }
        None => (target.to_owned(), None),
    };
    let ifindex =
        nix::net::if_::if_nametoindex(iface.as_str()).map_err(|_| DumpError::NoInterface {
            iface: iface.clone(),
            pod: pod
                .as_ref()
                .map_or(String::new(), |p| format!(" (the host side of pod {p})")),
        })?;
    Ok((iface, pod, ifindex))
}

/// The rules in force (all compiled policies, or one endpoint's; both directions or one) with
/// their hit counts, and the verdicts of those policies. Reads pinned state only.
pub fn policy_dump(
    root: &Path,
    target: Option<&str>,
    egress: Option<bool>,
) -> Result<PolicyDump, DumpError> {
    use std::collections::{BTreeMap, BTreeSet};

    use dataplane_common::{POLICY_NONE, verdict};
    let endpoints = maps::read_endpoints(root)?;
    let endpoint = match target {
        None => None,
        Some(t) => {
            let (iface, pod, ifindex) = resolve_target(t)?;
            let ep = endpoints
                .get(&ifindex)
                .ok_or_else(|| DumpError::NotEndpoint(iface.clone()))?;
            Some(PolicyEndpoint {
                iface,
                ifindex,
                pod,
                ip: std::net::Ipv4Addr::from(ep.ip).to_string(),
                ingress_policy: ep.ingress_policy,
                egress_policy: ep.egress_policy,
                held: held_directions(ep.flags),
            })
        }
    };
    // (policy id, egress) pairs in use, and those selected.
    let uses: BTreeSet<(u32, bool)> = match &endpoint {
        Some(e) => [(e.ingress_policy, false), (e.egress_policy, true)].into(),
        None => endpoints
            .values()
            .flat_map(|e| [(e.ingress_policy, false), (e.egress_policy, true)])
            .collect(),
    };
    let uses: BTreeSet<(u32, bool)> = uses
        .into_iter()
        .filter(|&(id, _)| id != POLICY_NONE)
        .collect();
    let wanted = |id: u32, e: bool| {
        egress.is_none_or(|want| want == e) && (endpoint.is_none() || uses.contains(&(id, e)))
    };
    let metas = maps::read_policy_rules(root)?;
    let hits = maps::read_policy_hits(root)?;
    // (policy, egress, rule or u32::MAX for no-match) → row.
    let mut rows: BTreeMap<(u32, bool, u32), PolicyRuleRow> = BTreeMap::new();
    fn row<'a>(
        rows: &'a mut BTreeMap<(u32, bool, u32), PolicyRuleRow>,
        metas: &BTreeMap<(u32, u32), dataplane_common::PolicyRuleMeta>,
        (policy, e, rule): (u32, bool, u32),
    ) -> &'a mut PolicyRuleRow {
        rows.entry((policy, e, rule)).or_insert_with(|| {
            let meta = (rule != u32::MAX)
                .then(|| metas.get(&(policy, rule)))
                .flatten();
            PolicyRuleRow {
                policy,
                direction: direction_name(e).to_owned(),
                rule: (rule != u32::MAX).then_some(rule),
                name: meta.map(|m| {
                    let end = m.name.iter().position(|&b| b == 0).unwrap_or(m.name.len());
                    let name = String::from_utf8_lossy(&m.name[..end]).into_owned();
                    if m.truncated != 0 { name + "…" } else { name }
                }),
                number: meta.map(|m| m.number).filter(|&n| n != u32::MAX),
                action: match meta {
                    Some(m) => verdict::name(m.action).to_owned(),
                    None if rule == u32::MAX => verdict::name(verdict::NO_MATCH).to_owned(),
                    None => "unknown".to_owned(),
                },
                hits: 0,
            }
        })
    }
    for (&(policy, rule), m) in &metas {
        if wanted(policy, m.egress != 0) {
            row(&mut rows, &metas, (policy, m.egress != 0, rule));
        }
    }
    for &(policy, e) in &uses {
        if wanted(policy, e) {
            row(&mut rows, &metas, (policy, e, u32::MAX));
        }
    }
    for (&(policy, e, rule), &n) in &hits {
        if wanted(policy, e) {
            row(&mut rows, &metas, (policy, e, rule)).hits += n;
        }
    }
    let ids: BTreeSet<u32> = rows.keys().map(|k| k.0).collect();
    let verdicts = policy_rows(root)?
        .into_iter()
        .filter(|v| ids.contains(&v.policy))
        .collect();
    Ok(PolicyDump {
        endpoint,
        direction: egress.map(|e| direction_name(e).to_owned()),
        rules: rows.into_values().collect(),
        verdicts,
    })
}

/// `map-dump policy` as text: the endpoint (when selected), the rules with their hits, then
/// the verdicts.
pub fn policy_dump_text(d: &PolicyDump) -> String {
    let mut out = String::new();
    if let Some(e) = &d.endpoint {
        let id = |id: u32| {
            if id == 0 {
                "none (all allowed)".to_owned()
            } else {
                id.to_string()
            }
        };
        out.push_str(&format!(
            "endpoint {}{} ifindex {} ip {}: ingress policy {}, egress policy {}\n\n",
            e.iface,
            e.pod.as_ref().map_or(String::new(), |p| format!(" ({p})")),
            e.ifindex,
            e.ip,
            id(e.ingress_policy),
            id(e.egress_policy)
        ));
        if !e.held.is_empty() {
            out.push_str(&format!(
                "HELD {}: the new rules do not fit the policy maps; the policy above is the one in force before (or denies all), see `ctl node status`\n\n",
                e.held.join(",")
            ));
        }
    }
    let name = |r: &PolicyRuleRow| match (&r.name, r.rule) {
        (Some(n), _) => n.clone(),
        (None, None) => "(no rule matched)".to_owned(),
        (None, Some(_)) => "?".to_owned(),
    };
    let width = d
        .rules
        .iter()
        .map(|r| name(r).chars().count())
        .max()
        .unwrap_or(0)
        .max(11);
    out.push_str(&format!(
        "{:>6}  {:<7}  {:>5}  {:<width$}  {:>4}  {:<8}  {:>10}\n",
        "POLICY", "DIR", "RULE", "POLICY-NAME", "#", "ACTION", "HITS"
    ));
    for r in &d.rules {
        out.push_str(&format!(
            "{:>6}  {:<7}  {:>5}  {:<width$}  {:>4}  {:<8}  {:>10}\n",
            r.policy,
            r.direction,
            r.rule.map_or("-".to_owned(), |n| n.to_string()),
            name(r),
            r.number.map_or("-".to_owned(), |n| n.to_string()),
            r.action,
            r.hits
        ));
    }
    out.push('\n');
    out.push_str(&policy_table(&d.verdicts));
    out
}

/// Which connections `map-dump conntrack` shows: all of the given conditions hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtFilter {
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Either end's address.
    pub addr: Option<std::net::Ipv4Addr>,
    /// Either end's port (for ICMP echo: the identifier).
    pub port: Option<u16>,
    /// One of the `ct` states.
    pub state: Option<u8>,
}

impl CtFilter {
    /// Parses the command line's words: `--proto tcp|udp|icmp|sctp|N`, `--addr A`, `--port
    /// N`, `--state established|syn_sent|…` (case and `-`/`_` do not matter).
    pub fn parse(
        proto: Option<&str>,
        addr: Option<&str>,
        port: Option<u16>,
        state: Option<&str>,
    ) -> Result<Self, DumpError> {
        use dataplane_common::ct;
        let proto = proto
            .map(|p| match p.to_ascii_lowercase().as_str() {
                "tcp" => Ok(6),
                "udp" => Ok(17),
                "icmp" => Ok(1),
                "sctp" => Ok(132),
                n => n.parse::<u8>().map_err(|_| {
                    DumpError::Usage(format!(
                        "--proto {p:?}: expected tcp, udp, icmp, sctp or a protocol number"
                    ))
                }),
            })
            .transpose()?;
        let addr = addr
            .map(|a| {
                a.parse().map_err(|_| {
                    DumpError::Usage(format!("--addr {a:?}: expected an IPv4 address"))
                })
            })
            .transpose()?;
        let states = [
            ct::SYN_SENT,
            ct::SYN_RECV,
            ct::ESTABLISHED,
            ct::FIN_WAIT,
            ct::CLOSING,
            ct::RESET,
            ct::OPEN,
        ];
        let state = state
            .map(|s| {
                let want = s.to_ascii_uppercase().replace('-', "_");
                states
                    .iter()
                    .copied()
                    .find(|&st| ct::state_name(st) == want)
                    .ok_or_else(|| {
                        let names: Vec<String> = states
                            .iter()
                            .map(|&st| ct::state_name(st).to_ascii_lowercase())
                            .collect();
                        DumpError::Usage(format!(
                            "--state {s:?}: expected one of {}",
                            names.join(", ")
                        ))
                    })
            })
            .transpose()?;
        Ok(Self {
            proto,
            addr,
            port,
            state,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches(&self, k: &dataplane_common::CtKey, v: &dataplane_common::CtValue) -> bool {
        self.proto.is_none_or(|p| p == k.proto)
            && self
                .addr
                .is_none_or(|a| a.octets() == k.saddr || a.octets() == k.daddr)
            && self
                .port
                .is_none_or(|p| p.to_be_bytes() == k.sport || p.to_be_bytes() == k.dport)
            && self.state.is_none_or(|s| s == v.state)
    }
}

fn conntrack_row(
    k: &dataplane_common::CtKey,
    v: &dataplane_common::CtValue,
    now: u64,
) -> ConntrackRow {
    use dataplane_common::ct;
    let secs = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
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
    ConntrackRow {
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
    }
}

fn conntrack_line(r: &ConntrackRow) -> String {
    format!(
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
    )
}

/// Writes the tracked connections that pass `filter` to `out` as they are read from the map
/// (in map order, nothing collected, so memory stays flat whatever the table's size): a line
/// each and a count, or with `json` one JSON array of [`ConntrackRow`]s, one per line.
/// Returns (rows written, entries read).
pub fn write_conntrack(
    root: &Path,
    filter: &CtFilter,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(u64, u64), DumpError> {
    let map = maps::open_conntrack(root)?;
    let now = maps::monotonic_ns();
    let (mut shown, mut read) = (0u64, 0u64);
    if json {
        out.write_all(b"[")?;
    }
    for entry in map.iter() {
        // An entry deleted by the programs or the sweep during the walk is skipped.
        let Ok((k, v)) = entry else { continue };
        read += 1;
        if !filter.matches(&k, &v) {
            continue;
        }
        let row = conntrack_row(&k, &v, now);
        if json {
            out.write_all(if shown == 0 { b"\n  " } else { b",\n  " })?;
            serde_json::to_writer(&mut *out, &row).map_err(std::io::Error::from)?;
        } else {
            out.write_all(conntrack_line(&row).as_bytes())?;
        }
        shown += 1;
    }
    if json {
        out.write_all(b"\n]\n")?;
    } else if filter.is_empty() {
        writeln!(out, "{shown} connections tracked")?;
    } else {
        writeln!(out, "{shown} of {read} tracked connections match")?;
    }
    out.flush()?;
    Ok((shown, read))
}

/// `map-dump conntrack stats`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ConntrackStats {
    /// Entries in the map now.
    pub entries: u64,
    /// The map's size (`agent --conntrack-size`).
    pub max_entries: u64,
    /// entries / max_entries.
    pub fill: f64,
    /// Entries past their timeout that the agent's sweep has not removed yet (the programs
    /// already treat them as absent; they still take room).
    pub expired: u64,
    /// Entries by protocol, then by state.
    pub by_proto: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// Counts the conntrack table by protocol and state, with the expired entries (by the
/// timeouts in the pinned config, Calico's defaults when the agent never wrote it).
pub fn conntrack_stats(root: &Path) -> Result<ConntrackStats, DumpError> {
    use dataplane_common::{CtTimeouts, ct};
    let timeouts = maps::read_config(root)?
        .map(|c| c.ct_timeouts)
        .filter(|t| t.tcp_established != 0)
        .unwrap_or(CtTimeouts::DEFAULT);
    let max_entries = u64::from(maps::conntrack_max_entries(root)?);
    let map = maps::open_conntrack(root)?;
    let now = maps::monotonic_ns();
    let mut s = ConntrackStats {
        entries: 0,
        max_entries,
        fill: 0.0,
        expired: 0,
        by_proto: Default::default(),
    };
    for entry in map.iter() {
        let Ok((k, v)) = entry else { continue };
        s.entries += 1;
        if timeouts.expired(&v, k.proto, now) {
            s.expired += 1;
        }
        *s.by_proto
            .entry(proto_name(k.proto))
            .or_default()
            .entry(ct::state_name(v.state).to_owned())
            .or_default() += 1;
    }
    s.fill = s.entries as f64 / max_entries.max(1) as f64;
    Ok(s)
}

pub fn conntrack_stats_text(s: &ConntrackStats) -> String {
    let mut out = format!(
        "{} of {} entries ({:.1}% full), {} expired not yet swept\n",
        s.entries,
        s.max_entries,
        s.fill * 100.0,
        s.expired
    );
    out.push_str(&format!(
        "{:<5}  {:<11}  {:>10}\n",
        "PROTO", "STATE", "ENTRIES"
    ));
    for (proto, states) in &s.by_proto {
        for (state, n) in states {
            out.push_str(&format!("{proto:<5}  {state:<11}  {n:>10}\n"));
        }
    }
    out
}

/// A rule that decides for an address class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SetRule {
    /// Index in the compiled policy.
    pub rule: u32,
    pub direction: String,
    pub name: Option<String>,
    pub number: Option<u32>,
    pub action: String,
}

impl SetRule {
    /// (policy name, rule number in it).
    pub fn policy_rule(&self) -> (Option<&str>, Option<u32>) {
        (self.name.as_deref(), self.number)
    }
}

/// One address set of `map-dump ipsets` in the BPF mode: an address class of a compiled
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AddressSetRow {
    pub policy: u32,
    pub class: u32,
    /// The CIDRs (pods as /32s, resolved from selectors; nets as written) whose longest
    /// match is this class. `0.0.0.0/0` stands for every address no other member covers.
    pub members: Vec<String>,
    /// The rules that decide for some protocol or port of this class; empty: no rule
    /// matches these peers (the isolated endpoint's default applies).
    pub rules: Vec<SetRule>,
}

/// `map-dump ipsets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AddressSetDump {
    pub endpoint: Option<PolicyEndpoint>,
    pub sets: Vec<AddressSetRow>,
}

/// The address sets the compiled policies use (all, or one endpoint's), from the pinned
/// maps: in the BPF mode these are the address classes of each compiled policy.
pub fn address_sets(root: &Path, target: Option<&str>) -> Result<AddressSetDump, DumpError> {
    let d = policy_dump(root, target, None)?;
    let mut sets: std::collections::BTreeMap<(u32, u32), AddressSetRow> = Default::default();
    for v in &d.verdicts {
        // Source-port tables are not address sets.
        let Ok(class) = v.class.parse::<u32>() else {
            continue;
        };
        let set = sets
            .entry((v.policy, class))
            .or_insert_with(|| AddressSetRow {
                policy: v.policy,
                class,
                members: v.peers.clone(),
                rules: Vec::new(),
            });
        let Some(rule) = v.rule else { continue };
        if set.rules.iter().any(|r| r.rule == rule) {
            continue;
        }
        let described = d
            .rules
            .iter()
            .find(|r| r.policy == v.policy && r.rule == Some(rule));
        set.rules.push(SetRule {
            rule,
            direction: described.map_or("?".to_owned(), |r| r.direction.clone()),
            name: described.and_then(|r| r.name.clone()),
            number: described.and_then(|r| r.number),
            action: described.map_or(v.action.clone(), |r| r.action.clone()),
        });
    }
    let mut sets: Vec<AddressSetRow> = sets.into_values().collect();
    for s in &mut sets {
        s.rules.sort_by_key(|r| r.rule);
    }
    Ok(AddressSetDump {
        endpoint: d.endpoint,
        sets,
    })
}

pub fn address_sets_text(d: &AddressSetDump) -> String {
    let mut out = String::from(
        "# BPF mode: no kernel ipsets. Each compiled policy splits the peers its rules name\n\
         # (selectors resolved to pod /32s, nets as written) into address classes, longest\n\
         # match wins; a class lists the rules that decide for it. iptables mode: `ipset list`.\n",
    );
    if let Some(e) = &d.endpoint {
        out.push_str(&format!(
            "# endpoint {} ({}): ingress policy {}, egress policy {}\n",
            e.iface, e.ip, e.ingress_policy, e.egress_policy
        ));
    }
    out.push_str(&format!(
        "{:>6}  {:>5}  {:<40}  RULES\n",
        "POLICY", "CLASS", "MEMBERS"
    ));
    for s in &d.sets {
        let members = if s.members.len() > 4 {
            format!("{} … ({} CIDRs)", s.members[..4].join(" "), s.members.len())
        } else {
            s.members.join(" ")
        };
        let rules = if s.rules.is_empty() {
            "(none: no rule matches these peers)".to_owned()
        } else {
            s.rules
                .iter()
                .map(|r| {
                    format!(
                        "{} {} #{} ({})",
                        r.name.as_deref().unwrap_or("?"),
                        r.direction,
                        r.number.map_or("?".to_owned(), |n| n.to_string()),
                        r.action
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "{:>6}  {:>5}  {:<40}  {}\n",
            s.policy, s.class, members, rules
        ));
    }
    out
}

/// `dataplane map-dump`: checks that the arguments fit the kind, then prints.
pub fn run(args: &crate::cli::MapDumpArgs) -> Result<(), DumpError> {
    match run_to(args, &mut std::io::BufWriter::new(std::io::stdout().lock())) {
        // `map-dump conntrack | head`: the reader had enough.
        Err(DumpError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn run_to(args: &crate::cli::MapDumpArgs, out: &mut impl std::io::Write) -> Result<(), DumpError> {
    use crate::cli::{Direction, DumpKind};
    let root = args.bpffs_dir.as_path();
    let kind = args.kind;
    let usage = |what: &str| Err(DumpError::Usage(what.to_owned()));
    let ct_filtered =
        args.proto.is_some() || args.addr.is_some() || args.port.is_some() || args.state.is_some();
    if kind != DumpKind::Conntrack && ct_filtered {
        return usage("--proto, --addr, --port and --state filter `map-dump conntrack` only");
    }
    if kind != DumpKind::Policy && args.direction.is_some() {
        return usage("--direction applies to `map-dump policy` only");
    }
    let stats = match (kind, args.target.as_deref()) {
        (DumpKind::Policy | DumpKind::Ipsets, _) | (_, None) => false,
        (DumpKind::Conntrack, Some("stats")) if !ct_filtered => true,
        (DumpKind::Conntrack, Some("stats")) => {
            return usage("`map-dump conntrack stats` counts the whole table: drop the filters");
        }
        (DumpKind::Conntrack, Some(t)) => {
            return usage(&format!(
                "`map-dump conntrack {t}`: the only word after conntrack is `stats` (filter \
                 with --proto, --addr, --port, --state)"
            ));
        }
        (_, Some(t)) => {
            return usage(&format!(
                "`map-dump {}` takes no argument ({t:?}); only `policy IFACE|POD`, \
                 `ipsets IFACE|POD` and `conntrack stats` do",
                format!("{kind:?}").to_ascii_lowercase()
            ));
        }
    };
    let egress = args.direction.map(|d| d == Direction::Out);
    match (kind, args.json) {
        (DumpKind::Counters, false) => write!(out, "{}", counters_table(&counter_rows(root)?))?,
        (DumpKind::Routes, false) => write!(out, "{}", routes_table(&route_rows(root)?))?,
        (DumpKind::Endpoints, false) => write!(out, "{}", endpoints_table(&endpoint_rows(root)?))?,
        (DumpKind::Policy, false) => write!(
            out,
            "{}",
            policy_dump_text(&policy_dump(root, args.target.as_deref(), egress)?)
        )?,
        (DumpKind::Ipsets, false) => write!(
            out,
            "{}",
            address_sets_text(&address_sets(root, args.target.as_deref())?)
        )?,
        (DumpKind::Ipsets, true) => writeln!(
            out,
            "{}",
            pretty(&address_sets(root, args.target.as_deref())?)?
        )?,
        (DumpKind::Conntrack, false) if stats => {
            write!(out, "{}", conntrack_stats_text(&conntrack_stats(root)?))?
        }
        (DumpKind::Conntrack, json) => {
            let filter = CtFilter::parse(
                args.proto.as_deref(),
                args.addr.as_deref(),
                args.port,
                args.state.as_deref(),
            )?;
            if stats {
                writeln!(out, "{}", pretty(&conntrack_stats(root)?)?)?;
            } else {
                write_conntrack(root, &filter, json, out)?;
            }
        }
        (DumpKind::All, false) => {
            writeln!(out, "# counters")?;
            write!(out, "{}", counters_table(&counter_rows(root)?))?;
            writeln!(out, "\n# routes")?;
            write!(out, "{}", routes_table(&route_rows(root)?))?;
            writeln!(out, "\n# endpoints")?;
            write!(out, "{}", endpoints_table(&endpoint_rows(root)?))?;
            writeln!(out, "\n# policy")?;
            write!(out, "{}", policy_dump_text(&policy_dump(root, None, None)?))?;
            writeln!(out, "\n# ipsets")?;
            write!(out, "{}", address_sets_text(&address_sets(root, None)?))?;
            writeln!(out, "\n# conntrack")?;
            write_conntrack(root, &CtFilter::default(), false, out)?;
        }
        (DumpKind::Counters, true) => writeln!(out, "{}", pretty(&counter_rows(root)?)?)?,
        (DumpKind::Routes, true) => writeln!(out, "{}", pretty(&route_rows(root)?)?)?,
        (DumpKind::Endpoints, true) => writeln!(out, "{}", pretty(&endpoint_rows(root)?)?)?,
        (DumpKind::Policy, true) => writeln!(
            out,
            "{}",
            pretty(&policy_dump(root, args.target.as_deref(), egress)?)?
        )?,
        (DumpKind::All, true) => writeln!(
            out,
            "{}",
            pretty(&serde_json::json!({
                "counters": counter_rows(root)?,
                "routes": route_rows(root)?,
                "endpoints": endpoint_rows(root)?,
                "policy": policy_dump(root, None, None)?,
                "ipsets": address_sets(root, None)?,
                "conntrack": conntrack_rows(root)?,
            }))?
        )?,
    }
    out.flush()?;
    Ok(())
}

/// Pretty JSON of one of the dump's documents.
fn pretty<T: Serialize>(v: &T) -> Result<String, DumpError> {
    serde_json::to_string_pretty(v).map_err(|e| DumpError::Write(e.into()))
}

#[cfg(test)]
mod tests {
    use dataplane_common::{CtKey, CtValue, ct};

    use super::*;

    fn conn(proto: u8, sport: u16, dport: u16, state: u8) -> (CtKey, CtValue) {
        let k = CtKey {
            saddr: [10, 65, 0, 2],
            daddr: [10, 65, 0, 70],
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            _pad: [0; 3],
        };
        let v = CtValue {
            state,
            ..CtValue::default()
        };
        (k, v)
    }

    #[test]
    fn conntrack_filters_match_either_end_and_parse_names() {
        let f = CtFilter::parse(
            Some("TCP"),
            Some("10.65.0.70"),
            Some(80),
            Some("established"),
        )
        .unwrap();
        let (k, v) = conn(6, 40000, 80, ct::ESTABLISHED);
        assert!(f.matches(&k, &v));
        // Either end: the reply direction's port and address match too.
        let (k2, _) = conn(6, 80, 40000, ct::ESTABLISHED);
        assert!(f.matches(&k2, &v));
        assert!(!f.matches(
            &conn(17, 40000, 80, ct::OPEN).0,
            &conn(17, 0, 0, ct::OPEN).1
        ));
        assert!(!f.matches(&conn(6, 40000, 81, ct::ESTABLISHED).0, &v));
        let syn = conn(6, 40000, 80, ct::SYN_SENT).1;
        assert!(!f.matches(&k, &syn));
        assert!(
            CtFilter::parse(None, None, None, Some("syn-sent"))
                .unwrap()
                .matches(&k, &syn)
        );
        assert_eq!(
            CtFilter::parse(Some("132"), None, None, None)
                .unwrap()
                .proto,
            Some(132)
        );
        assert!(CtFilter::default().is_empty() && CtFilter::default().matches(&k, &v));
        for (p, a, s, want) in [
            (Some("tcpx"), None, None, "expected tcp"),
            (None, Some("10.1"), None, "IPv4"),
            (
                None,
                None,
                Some("sleepy"),
                "syn_sent, syn_recv, established",
            ),
        ] {
            let e = CtFilter::parse(p, a, None, s).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn hit_keys_fold_the_direction_into_the_rule() {
        use dataplane_common::PolicyHitKey;
        for (rule, egress) in [(0, false), (7, true), (u32::MAX, true), (u32::MAX, false)] {
            let k = PolicyHitKey::new(3, rule, egress);
            assert_eq!((k.policy, k.rule_index(), k.egress()), (3, rule, egress));
        }
        assert_ne!(
            PolicyHitKey::new(3, 1, true),
            PolicyHitKey::new(3, 1, false)
        );
    }

    #[test]
    fn policy_target_must_be_an_interface_or_namespace_slash_pod() {
        for t in ["a/b/c", "/pod", "ns/"] {
            let e = resolve_target(t).unwrap_err().to_string();
            assert!(e.contains("neither an interface"), "{t}: {e}");
        }
        let e = resolve_target("default/no-such-pod")
            .unwrap_err()
            .to_string();
        let iface = crate::cni::netsetup::host_veth_name(Some(("default", "no-such-pod")), "");
        assert!(
            e.contains(&iface) && e.contains("pod default/no-such-pod"),
            "{e}"
        );
    }
}

//! From the local endpoints and their resolved rules to the filter table's chains (rule text
//! for `iptables-restore`) and the ipsets they match on (members for `ipset restore`). Pure:
//! nothing here touches the kernel, so the rendering is tested on its own.
//!
//! Evaluation is the BPF mode's, rule for rule: the first matching rule of an endpoint's
//! ordered list decides; no match denies once a policy applies in that direction; no policy
//! allows. Ports and ICMP type/code are judged as `compile::compile` judges them (ICMP
//! type/code in the destination "port", a protocol without ports sees port 0).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::verdict;
use ipnet::Ipv4Net;
use sha1::{Digest as _, Sha1};

use crate::{
    WORKLOAD_IFACE_PREFIX,
    policy::compile::{CompiledRule, PortSet, ProtoMatch, Term},
    sync::LocalEndpoint,
};

/// Everything we own in the filter table and in the ipsets starts with this.
pub const PREFIX: &str = "cali-";
pub const FORWARD: &str = "cali-FORWARD";
pub const INPUT: &str = "cali-INPUT";
pub const OUTPUT: &str = "cali-OUTPUT";
pub const FROM_WL_DISPATCH: &str = "cali-from-wl-dispatch";
pub const TO_WL_DISPATCH: &str = "cali-to-wl-dispatch";
/// Each built-in chain and the chain of ours it jumps to, with one rule at its top.
pub const HOOKS: [(&str, &str); 3] = [("FORWARD", FORWARD), ("INPUT", INPUT), ("OUTPUT", OUTPUT)];
/// Prefix of the ipsets of address lists, and of the temporary sets swapped into them.
pub const SET_PREFIX: &str = "cali-s-";
pub const TEMP_SET_PREFIX: &str = "cali-t-";
/// Prefix of the policy chains.
pub const POLICY_PREFIX: &str = "cali-pi-";

/// Protocols with ports (`multiport` takes them), by the names iptables prints.
const PORT_PROTOCOLS: [(u8, &str); 4] = [(6, "tcp"), (17, "udp"), (132, "sctp"), (136, "udplite")];
const ICMP: u8 = 1;
/// Most ports one `multiport` match takes (a range counts two).
const MULTIPORT_MAX: usize = 15;

/// The chains and sets the node's filter should hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Chain → its rules in order (each without the leading `-A <chain>`).
    pub chains: BTreeMap<String, Vec<String>>,
    /// ipset (hash:net) → its members.
    pub sets: BTreeMap<String, BTreeSet<Ipv4Net>>,
}

/// 16 hex digits of SHA-1 of `text`: short enough for a chain name (28 characters at most)
/// and for an ipset name (31), long enough that distinct contents do not meet.
pub fn short_hash(text: &str) -> String {
    Sha1::digest(text.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `name` can be put in a rule as it is: an interface name of the kernel's length
/// and of characters that mean nothing to `iptables-restore`.
pub fn valid_iface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The ipsets of one rendering. A set is named after what it stands for (the rule's origin,
/// the term, the list), not after its members, so that when a selector's members change the
/// set is refilled and swapped while every rule matching on it stays as it is (Calico's
/// "selectors as ipsets"). Two different member lists under one name would be a contradiction
/// (the same rule resolves to the same peers for every endpoint); should it happen, the second
/// is named after its members instead, so the rendering is right whatever the cause.
#[derive(Default)]
struct Sets(BTreeMap<String, BTreeSet<Ipv4Net>>);

impl Sets {
    fn name(&mut self, key: &str, members: BTreeSet<Ipv4Net>) -> String {
        let stable = format!("{SET_PREFIX}{}", short_hash(key));
        match self.0.get(&stable) {
            Some(m) if *m != members => {
                let by_members = format!("{SET_PREFIX}{}", short_hash(&format!("{members:?}")));
                self.0.entry(by_members.clone()).or_insert(members);
                by_members
            }
            Some(_) => stable,
            None => {
                self.0.insert(stable.clone(), members);
                stable
            }
        }
    }
}

/// Whether `set` holds port `p`.
fn contains(set: &PortSet, p: u16) -> bool {
    let inside = |rs: &[(u16, u16)]| rs.iter().any(|&(a, b)| a <= p && p <= b);
    set.any_of.as_deref().is_none_or(inside) && !inside(&set.none_of)
}

/// `ranges` as `multiport` lists of at most [`MULTIPORT_MAX`] ports each.
fn multiport_lists(ranges: &[(u16, u16)]) -> Vec<String> {
    let mut lists: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut weight = 0;
    for &(a, b) in ranges {
        let (item, w) = if a == b {
            (a.to_string(), 1)
        } else {
            (format!("{a}:{b}"), 2)
        };
        if weight + w > MULTIPORT_MAX {
            lists.push(current.join(","));
            current.clear();
            weight = 0;
        }
        current.push(item);
        weight += w;
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

/// The alternatives (any of them matches) for one port side of a port protocol: `""` for
/// any port, none at all when no port can match. Exclusions go into every alternative.
fn port_alternatives(flag: &str, set: &PortSet) -> Vec<String> {
    let excluded: Vec<String> = multiport_lists(&set.none_of)
        .into_iter()
        .map(|l| format!("-m multiport ! {flag} {l}"))
        .collect();
    let excluded = excluded.join(" ");
    match &set.any_of {
        None => vec![excluded],
        Some(ranges) => multiport_lists(ranges)
            .into_iter()
            .map(|l| join(&[&format!("-m multiport {flag} {l}"), &excluded]))
            .collect(),
    }
}

/// The `--icmp-type` arguments covering `(a, b)` of type << 8 | code: whole types where the
/// range covers them, single codes at its ends.
fn icmp_types((a, b): (u16, u16)) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = u32::from(a);
    let end = u32::from(b);
    while at <= end {
        if at & 0xff == 0 && at | 0xff <= end {
            out.push((at >> 8).to_string());
            at += 0x100;
        } else {
            out.push(format!("{}/{}", at >> 8, at & 0xff));
            at += 1;
        }
    }
    out
}

fn icmp_alternatives(set: &PortSet) -> Vec<String> {
    let excluded: Vec<String> = set
        .none_of
        .iter()
        .flat_map(|r| icmp_types(*r))
        .map(|t| format!("-m icmp ! --icmp-type {t}"))
        .collect();
    let excluded = excluded.join(" ");
    match &set.any_of {
        None => vec![excluded],
        Some(ranges) => ranges
            .iter()
            .flat_map(|r| icmp_types(*r))
            .map(|t| join(&[&format!("-m icmp --icmp-type {t}"), &excluded]))
            .collect(),
    }
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// (protocol match, port matches) alternatives for protocol `p`, judged as the BPF
/// compiler judges it.
fn for_protocol(p: u8, t: &Term) -> Vec<(String, String)> {
    if let Some((_, name)) = PORT_PROTOCOLS.iter().find(|(n, _)| *n == p) {
        let dports = port_alternatives("--dports", &t.dport);
        let sports = port_alternatives("--sports", &t.sport);
        let mut out = Vec::new();
        for d in &dports {
            for s in &sports {
                out.push((format!("-p {name}"), join(&[d, s])));
            }
        }
        out
    } else if p == ICMP {
        // The BPF side sees ICMP's "source port" as 0.
        if !contains(&t.sport, 0) {
            return Vec::new();
        }
        icmp_alternatives(&t.dport)
            .into_iter()
            .map(|m| ("-p icmp".to_owned(), m))
            .collect()
    } else if contains(&t.dport, 0) {
        // A protocol without ports is judged at port 0.
        vec![(format!("-p {p}"), String::new())]
    } else {
        Vec::new()
    }
}

/// The match parts of the rules (alternatives) for term `t`; `dir` is `src` for an ingress
/// rule (the peer sends) and `dst` for an egress rule. `key` names the term for its ipsets.
fn term_matches(t: &Term, dir: &str, key: &str, sets: &mut Sets) -> Vec<String> {
    let mut peer = Vec::new();
    for (i, list) in t.peer.all_of.iter().enumerate() {
        let members: BTreeSet<Ipv4Net> = list.iter().map(Ipv4Net::trunc).collect();
        if members.iter().any(|n| n.prefix_len() == 0) {
            continue; // every address: no condition (hash:net cannot hold /0 anyway)
        }
        if members.is_empty() {
            return Vec::new(); // a selector that selects nothing: the term never matches
        }
        // The rule's own single CIDR is matched as an address, as Calico renders it: a set
        // match per rule costs far more per packet (with the nft backend `-m set` is an
        // xtables match run through the compat layer, an address is a native comparison).
        if t.peer.nets == Some(i)
            && let [net] = members.iter().collect::<Vec<_>>()[..]
        {
            let flag = if dir == "src" { "-s" } else { "-d" };
            peer.push(format!("{flag} {net}"));
            continue;
        }
        let name = sets.name(&format!("{key}\0all{i}"), members);
        peer.push(format!("-m set --match-set {name} {dir}"));
    }
    if !t.peer.none_of.is_empty() {
        let members: BTreeSet<Ipv4Net> = t.peer.none_of.iter().map(Ipv4Net::trunc).collect();
        if members.iter().any(|n| n.prefix_len() == 0) {
            return Vec::new();
        }
        let name = sets.name(&format!("{key}\0none"), members);
        peer.push(format!("-m set ! --match-set {name} {dir}"));
    }
    let peer = peer.join(" ");
    let ports_matter = !(t.dport.is_all() && t.sport.is_all());
    let alternatives: Vec<(String, String)> = match t.proto {
        ProtoMatch::Is(p) => for_protocol(p, t),
        ProtoMatch::Any if !ports_matter => vec![(String::new(), String::new())],
        ProtoMatch::Not(n) if !ports_matter => vec![(format!("! -p {n}"), String::new())],
        // Ports with no protocol named: the datastore refuses such rules (ports need TCP,
        // UDP, SCTP or UDPLite), so this is a fallback: the port protocols only.
        ProtoMatch::Any | ProtoMatch::Not(_) => PORT_PROTOCOLS
            .iter()
            .filter(|(n, _)| t.proto != ProtoMatch::Not(*n))
            .flat_map(|(n, _)| for_protocol(*n, t))
            .collect(),
    };
    alternatives
        .into_iter()
        .map(|(proto, ports)| join(&[&proto, &peer, &ports]))
        .collect()
}

/// The mark bit a policy chain sets when one of its rules allows the packet (Felix's default
/// accept bit).
pub const MARK_ACCEPT: &str = "0x10000";
/// The mark bit of a `Pass` (Felix's pass bit): the endpoint chain stops calling policies.
pub const MARK_PASS: &str = "0x20000";
/// Both bits.
const MARKS: &str = "0x30000";

/// The policy a rule comes from: its origin without the ` <direction> #<n>` tail.
fn policy_of(origin: &str) -> &str {
    origin
        .rsplit_once(" #")
        .and_then(|(head, _)| head.rsplit_once(' '))
        .map_or(origin, |(name, _)| name)
}

/// The chains of one endpoint direction's rule list, one per policy in evaluation order, as
/// Felix renders a policy: an allowing rule's match sets the accept mark bit, and the next
/// line returns to the endpoint chain when the bit is set (so a packet that matches no rule
/// pays two rules per allowing rule); a denying rule drops. A trailing return is left out,
/// as Felix leaves it (falling off the end returns). Rules that come as `Pass` were resolved
/// to allows (the profile allows what passes), so they set the accept bit. Each chain is
/// named after its direction and contents: endpoints whose policy resolves the same share it.
fn policy_chains(
    rules: &[CompiledRule],
    ingress: bool,
    sets: &mut Sets,
) -> Vec<(String, Vec<String>)> {
    let dir = if ingress { "src" } else { "dst" };
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    for r in rules {
        let policy = policy_of(&r.origin);
        if groups.last().is_none_or(|(p, _)| *p != policy) {
            groups.push((policy, Vec::new()));
        }
        let Some((_, lines)) = groups.last_mut() else {
            continue;
        };
        let allow = r.action == verdict::ALLOW;
        let target = if allow {
            format!("-j MARK --set-xmark {MARK_ACCEPT}/{MARK_ACCEPT}")
        } else {
            "-j DROP".to_owned()
        };
        let before = lines.len();
        for (ti, t) in r.terms.iter().enumerate() {
            for m in term_matches(t, dir, &format!("{}\0{ti}", r.origin), sets) {
                lines.push(join(&[&m, &target]));
            }
        }
        if allow && lines.len() > before {
            lines.push(format!(
                "-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT} -j RETURN"
            ));
        }
    }
    groups
        .into_iter()
        .map(|(_, mut lines)| {
            if lines.last().is_some_and(|l| l.ends_with("-j RETURN")) {
                lines.pop();
            }
            let name = format!(
                "{POLICY_PREFIX}{}",
                short_hash(&format!("{dir}\n{}", lines.join("\n")))
            );
            (name, lines)
        })
        .collect()
}

/// The policy part of an endpoint chain, as Felix writes it: the accept and pass bits
/// cleared, each policy chain called in order while no pass bit is set, a return (`leave`:
/// ACCEPT for ingress, RETURN for egress) as soon as one set the accept bit; then a drop
/// when no policy passed the packet, and `leave` for a packet that was passed on (the
/// namespace profile allows).
fn call_policies(chains: &[String], leave: &str) -> Vec<String> {
    let mut rules = vec![format!("-j MARK --set-xmark 0x0/{MARKS}")];
    for c in chains {
        rules.push(format!("-m mark --mark 0x0/{MARK_PASS} -j {c}"));
        rules.push(format!(
            "-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT} -j {leave}"
        ));
    }
    rules.push(format!("-m mark --mark 0x0/{MARK_PASS} -j DROP"));
    rules.push(format!("-j {leave}"));
    rules
}

const CT_RULES: [&str; 2] = [
    "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-m conntrack --ctstate INVALID -j DROP",
];

/// The chains and sets for `endpoints`. `node_ip` (this node's address) may always reach
/// its pods, as Kubernetes wants for kubelet's probes and as the BPF mode allows.
///
/// Layout (Calico's names):
/// - `FORWARD`/`INPUT`/`OUTPUT` jump to `cali-FORWARD`/`cali-INPUT`/`cali-OUTPUT`.
/// - `cali-FORWARD`: from a `cali+` interface to `cali-from-wl-dispatch`, to one to
///   `cali-to-wl-dispatch`, then accepts what came from a pod and was not dropped (the host's
///   own FORWARD policy does not get a say over pod traffic, as in Calico).
///   `cali-INPUT` (pod → this node) applies the pod's egress policy and accepts;
///   `cali-OUTPUT` (this node → pod) its ingress policy.
/// - The dispatch chains go to `cali-fw-<iface>` / `cali-tw-<iface>` by interface and drop
///   packets of an interface no endpoint owns (the BPF mode drops those too).
/// - `cali-fw-<iface>` (from workload: egress): anti-spoofing first, then conntrack
///   (established and related accepted, invalid dropped), then the policies as Felix calls
///   them ([`call_policies`]: mark bits cleared, each policy chain called in order, RETURN to
///   `cali-FORWARD` once one set the accept bit, DROP when none allowed or passed); with no
///   egress policy the packet returns to `cali-FORWARD`, allowed.
/// - `cali-tw-<iface>` (to workload: ingress): conntrack, the node's address, then the
///   policies likewise, leaving with ACCEPT (Felix returns and accepts on the mark in
///   `cali-FORWARD`: the same verdict one rule sooner); with no ingress policy, ACCEPT.
/// - `cali-pi-<hash>`: one chain per policy and direction ([`policy_chains`]), shared by
///   every endpoint for which that policy resolves to the same rules, as Calico's endpoints
///   share a policy chain. The rules cost what Felix's cost: an allowing rule is two
///   iptables rules (match → set the accept bit; bit set → RETURN), which a packet that
///   matches neither pays both of.
pub fn render(endpoints: &[LocalEndpoint], node_ip: Option<Ipv4Addr>) -> Rendered {
    let mut sets = Sets::default();
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let any_wl = format!("{WORKLOAD_IFACE_PREFIX}+");
    chains.insert(
        FORWARD.to_owned(),
        vec![
            format!("-i {any_wl} -j {FROM_WL_DISPATCH}"),
            format!("-o {any_wl} -j {TO_WL_DISPATCH}"),
            format!("-i {any_wl} -j ACCEPT"),
        ],
    );
    chains.insert(
        INPUT.to_owned(),
        vec![
            format!("-i {any_wl} -j {FROM_WL_DISPATCH}"),
            format!("-i {any_wl} -j ACCEPT"),
        ],
    );
    chains.insert(
        OUTPUT.to_owned(),
        vec![format!("-o {any_wl} -j {TO_WL_DISPATCH}")],
    );
    let mut from_dispatch = Vec::new();
    let mut to_dispatch = Vec::new();
    for ep in endpoints {
        if !valid_iface(&ep.iface) {
            tracing::warn!(iface = %ep.iface, "endpoint interface name unfit for a rule; skipped");
            continue;
        }
        let [ingress, egress] = &ep.rules;
        let mut policy = |rules: &Option<std::sync::Arc<Vec<CompiledRule>>>, ingress: bool| {
            rules.as_ref().map(|r| {
                let mut names = Vec::new();
                for (name, lines) in policy_chains(r, ingress, &mut sets) {
                    chains.insert(name.clone(), lines);
                    names.push(name);
                }
                names
            })
        };
        let to_policy = policy(ingress, true);
        let from_policy = policy(egress, false);

        let fw = format!("cali-fw-{}", ep.iface);
        let mut rules = vec![format!("! -s {}/32 -j DROP", ep.ip)];
        rules.extend(CT_RULES.map(str::to_owned));
        if let Some(p) = from_policy {
            rules.extend(call_policies(&p, "RETURN"));
        }
        chains.insert(fw.clone(), rules);

        let tw = format!("cali-tw-{}", ep.iface);
        let mut rules: Vec<String> = CT_RULES.map(str::to_owned).to_vec();
        match to_policy {
            Some(p) => {
                if let Some(n) = node_ip {
                    rules.push(format!("-s {n}/32 -j ACCEPT"));
                }
                rules.extend(call_policies(&p, "ACCEPT"));
            }
            None => rules.push("-j ACCEPT".to_owned()),
        }
        chains.insert(tw.clone(), rules);

        from_dispatch.push(format!("-i {} -g {fw}", ep.iface));
        to_dispatch.push(format!("-o {} -g {tw}", ep.iface));
    }
    from_dispatch.push("-j DROP".to_owned());
    to_dispatch.push("-j DROP".to_owned());
    chains.insert(FROM_WL_DISPATCH.to_owned(), from_dispatch);
    chains.insert(TO_WL_DISPATCH.to_owned(), to_dispatch);
    Rendered {
        chains,
        sets: sets.0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::compile::IpSet;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ports(any: Option<&[(u16, u16)]>, none: &[(u16, u16)]) -> PortSet {
        PortSet {
            any_of: any.map(<[_]>::to_vec),
            none_of: none.to_vec(),
        }
    }

    fn rule(action: u8, origin: &str, terms: Vec<Term>) -> CompiledRule {
        CompiledRule {
            action,
            terms,
            origin: origin.to_owned(),
        }
    }

    fn ep(iface: &str, ip: &str, ingress: Option<Vec<CompiledRule>>) -> LocalEndpoint {
        LocalEndpoint {
            iface: iface.to_owned(),
            ip: ip.parse().unwrap(),
            rules: [ingress.map(Arc::new), None],
        }
    }

    #[test]
    fn multiport_lists_hold_fifteen_ports_at_most() {
        let singles: Vec<(u16, u16)> = (1..=20).map(|p| (p, p)).collect();
        let lists = multiport_lists(&singles);
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        let ranges: Vec<(u16, u16)> = (0..8).map(|i| (i * 10, i * 10 + 5)).collect();
        let lists = multiport_lists(&ranges);
        // 7 ranges (14 ports) fit, the 8th starts a new list.
        assert_eq!(
            lists,
            vec!["0:5,10:15,20:25,30:35,40:45,50:55,60:65", "70:75"]
        );
    }

    #[test]
    fn icmp_ranges_become_types_and_codes() {
        assert_eq!(icmp_types((8 << 8, 8 << 8 | 0xff)), vec!["8"]);
        assert_eq!(icmp_types((3 << 8 | 1, 3 << 8 | 1)), vec!["3/1"]);
        assert_eq!(
            icmp_types((3 << 8 | 0xfe, 5 << 8 | 0xff)),
            vec!["3/254", "3/255", "4", "5"]
        );
    }

    #[test]
    fn terms_render_protocol_peer_sets_and_ports() {
        let mut sets = Sets::default();
        let t = Term {
            proto: ProtoMatch::Is(6),
            peer: IpSet {
                all_of: vec![vec![net("10.65.0.2/32"), net("10.65.0.3/32")]],
                none_of: vec![net("10.65.0.3/32")],
                nets: None,
            },
            dport: ports(Some(&[(80, 80), (8000, 8080)]), &[(8001, 8001)]),
            sport: PortSet::default(),
        };
        let m = term_matches(&t, "src", "k", &mut sets);
        let names: Vec<&String> = sets.0.keys().collect();
        assert_eq!(names.len(), 2);
        let (all, none) = (
            format!("{SET_PREFIX}{}", short_hash("k\0all0")),
            format!("{SET_PREFIX}{}", short_hash("k\0none")),
        );
        assert_eq!(
            m,
            vec![format!(
                "-p tcp -m set --match-set {all} src -m set ! --match-set {none} src -m multiport --dports 80,8000:8080 -m multiport ! --dports 8001"
            )]
        );
        assert_eq!(sets.0[&all].len(), 2);

        // Any protocol, any port, every address: no condition at all.
        let any = Term {
            peer: IpSet {
                all_of: vec![vec![net("0.0.0.0/0")]],
                none_of: vec![],
                nets: None,
            },
            ..Term::any()
        };
        assert_eq!(term_matches(&any, "dst", "k2", &mut sets), vec![""]);
        // A selector matching nothing: the term never matches.
        let nothing = Term {
            peer: IpSet {
                all_of: vec![vec![]],
                none_of: vec![],
                nets: None,
            },
            ..Term::any()
        };
        assert!(term_matches(&nothing, "dst", "k3", &mut sets).is_empty());
        // ICMP type 8 any code, except code 1; a protocol without ports at port 0.
        let icmp = Term {
            proto: ProtoMatch::Is(1),
            dport: ports(
                Some(&[(8 << 8, 8 << 8 | 0xff)]),
                &[(8 << 8 | 1, 8 << 8 | 1)],
            ),
            ..Term::any()
        };
        assert_eq!(
            term_matches(&icmp, "src", "k4", &mut sets),
            vec!["-p icmp -m icmp --icmp-type 8 -m icmp ! --icmp-type 8/1"]
        );
        let gre = Term {
            proto: ProtoMatch::Is(47),
            ..Term::any()
        };
        assert_eq!(term_matches(&gre, "src", "k5", &mut sets), vec!["-p 47"]);
        let not_udp = Term {
            proto: ProtoMatch::Not(17),
            ..Term::any()
        };
        assert_eq!(
            term_matches(&not_udp, "src", "k6", &mut sets),
            vec!["! -p 17"]
        );
    }

    #[test]
    fn a_rules_single_cidr_is_an_address_match_not_a_set() {
        let mut sets = Sets::default();
        let term = |all_of: Vec<Vec<Ipv4Net>>, nets: Option<usize>| Term {
            proto: ProtoMatch::Is(6),
            peer: IpSet {
                all_of,
                none_of: vec![],
                nets,
            },
            dport: ports(Some(&[(80, 80)]), &[]),
            sport: PortSet::default(),
        };
        // The rule's one CIDR: an address, either direction; nothing in the sets.
        let one = term(vec![vec![net("198.18.0.1/32")]], Some(0));
        assert_eq!(
            term_matches(&one, "src", "a", &mut sets),
            vec!["-p tcp -s 198.18.0.1/32 -m multiport --dports 80"]
        );
        assert_eq!(
            term_matches(&one, "dst", "b", &mut sets),
            vec!["-p tcp -d 198.18.0.1/32 -m multiport --dports 80"]
        );
        assert!(sets.0.is_empty());
        // A selector's members stay a set even when there is one (refilled as they change),
        // and so do several CIDRs; the rule's CIDR beside a selector is still an address.
        let selector = term(vec![vec![net("10.65.0.9/32")]], None);
        let several = term(
            vec![vec![net("198.18.0.1/32"), net("198.18.0.2/32")]],
            Some(0),
        );
        let both = term(
            vec![vec![net("198.18.0.0/24")], vec![net("10.65.0.9/32")]],
            Some(0),
        );
        for (t, key) in [(&selector, "c"), (&several, "d")] {
            let m = term_matches(t, "src", key, &mut sets);
            let set = format!("{SET_PREFIX}{}", short_hash(&format!("{key}\0all0")));
            assert_eq!(
                m,
                vec![format!(
                    "-p tcp -m set --match-set {set} src -m multiport --dports 80"
                )]
            );
        }
        let set = format!("{SET_PREFIX}{}", short_hash("e\0all1"));
        assert_eq!(
            term_matches(&both, "src", "e", &mut sets),
            vec![format!(
                "-p tcp -s 198.18.0.0/24 -m set --match-set {set} src -m multiport --dports 80"
            )]
        );
    }

    #[test]
    fn many_ports_split_into_alternatives_of_one_rule() {
        let dports: Vec<(u16, u16)> = (1000..1020).map(|p| (p, p)).collect();
        let t = Term {
            proto: ProtoMatch::Is(17),
            dport: ports(Some(&dports), &[]),
            sport: ports(Some(&[(53, 53)]), &[]),
            ..Term::any()
        };
        let m = term_matches(&t, "src", "k", &mut Sets::default());
        assert_eq!(m.len(), 2);
        assert!(
            m.iter()
                .all(|l| l.starts_with("-p udp -m multiport --dports 10")
                    && l.ends_with("-m multiport --sports 53"))
        );
    }

    #[test]
    fn endpoints_get_chains_and_share_policy_chains() {
        let allow_80 = vec![rule(
            verdict::ALLOW,
            "x/knp.default.web ingress #0",
            vec![Term {
                proto: ProtoMatch::Is(6),
                dport: ports(Some(&[(80, 80)]), &[]),
                peer: IpSet {
                    all_of: vec![vec![net("10.65.0.9/32")]],
                    none_of: vec![],
                    nets: None,
                },
                sport: PortSet::default(),
            }],
        )];
        let r = render(
            &[
                ep("calia", "10.65.0.2", Some(allow_80.clone())),
                ep("calib", "10.65.0.3", Some(allow_80)),
                ep("calic", "10.65.0.4", None),
            ],
            Some("192.168.1.10".parse().unwrap()),
        );
        let pi: Vec<&String> = r
            .chains
            .keys()
            .filter(|k| k.starts_with(POLICY_PREFIX))
            .collect();
        assert_eq!(pi.len(), 1, "one chain for the shared policy");
        let pi = pi[0].clone();
        assert_eq!(
            r.chains["cali-tw-calia"],
            vec![
                CT_RULES[0].to_owned(),
                CT_RULES[1].to_owned(),
                "-s 192.168.1.10/32 -j ACCEPT".to_owned(),
                "-j MARK --set-xmark 0x0/0x30000".to_owned(),
                format!("-m mark --mark 0x0/0x20000 -j {pi}"),
                "-m mark --mark 0x10000/0x10000 -j ACCEPT".to_owned(),
                "-m mark --mark 0x0/0x20000 -j DROP".to_owned(),
                "-j ACCEPT".to_owned(),
            ]
        );
        assert_eq!(r.chains["cali-tw-calic"].last().unwrap(), "-j ACCEPT");
        assert_eq!(
            r.chains["cali-fw-calic"],
            vec![
                "! -s 10.65.0.4/32 -j DROP".to_owned(),
                CT_RULES[0].to_owned(),
                CT_RULES[1].to_owned(),
            ]
        );
        let set = r.sets.keys().next().unwrap();
        // The only rule: its RETURN on the mark is the chain's end, left out as Felix does.
        assert_eq!(
            r.chains[&pi],
            vec![format!(
                "-p tcp -m set --match-set {set} src -m multiport --dports 80 -j MARK --set-xmark 0x10000/0x10000"
            )]
        );
        assert_eq!(
            r.chains[TO_WL_DISPATCH],
            vec![
                "-o calia -g cali-tw-calia",
                "-o calib -g cali-tw-calib",
                "-o calic -g cali-tw-calic",
                "-j DROP"
            ]
        );
        // Every name fits iptables (28) and ipset (31).
        assert!(r.chains.keys().all(|c| c.len() <= 28));
        assert!(r.sets.keys().all(|s| s.len() <= 31));
    }

    #[test]
    fn a_membership_change_refills_the_set_and_keeps_the_chains() {
        let rules = |peers: Vec<Ipv4Net>| {
            vec![rule(
                verdict::ALLOW,
                "x/p ingress #0",
                vec![Term {
                    peer: IpSet {
                        all_of: vec![peers],
                        none_of: vec![],
                        nets: None,
                    },
                    ..Term::any()
                }],
            )]
        };
        let one = render(
            &[ep(
                "calia",
                "10.65.0.2",
                Some(rules(vec![net("10.65.0.9/32")])),
            )],
            None,
        );
        let two = render(
            &[ep(
                "calia",
                "10.65.0.2",
                Some(rules(vec![net("10.65.0.9/32"), net("10.65.0.10/32")])),
            )],
            None,
        );
        assert_eq!(one.chains, two.chains);
        assert_eq!(
            one.sets.keys().collect::<Vec<_>>(),
            two.sets.keys().collect::<Vec<_>>()
        );
        assert_ne!(one.sets, two.sets);
    }

    #[test]
    fn one_chain_per_policy_allows_mark_and_return_denies_drop() {
        let rules = vec![
            rule(
                verdict::DENY,
                "p egress #0",
                vec![Term {
                    proto: ProtoMatch::Is(17),
                    ..Term::any()
                }],
            ),
            rule(
                verdict::ALLOW,
                "p egress #1",
                vec![Term {
                    proto: ProtoMatch::Is(6),
                    ..Term::any()
                }],
            ),
            rule(verdict::ALLOW, "p egress #2", vec![Term::any()]),
            rule(verdict::ALLOW, "ns/q egress #0", vec![Term::any()]),
        ];
        let chains = policy_chains(&rules, false, &mut Sets::default());
        assert_eq!(chains.len(), 2, "{chains:?}");
        let accept = "-j MARK --set-xmark 0x10000/0x10000";
        assert_eq!(
            chains[0].1,
            vec![
                "-p udp -j DROP".to_owned(),
                format!("-p tcp {accept}"),
                "-m mark --mark 0x10000/0x10000 -j RETURN".to_owned(),
                accept.to_owned(),
            ]
        );
        assert_eq!(chains[1].1, vec![accept.to_owned()]);
        assert_ne!(chains[0].0, chains[1].0);
        assert_eq!(
            policy_of("ns/knp.default.web ingress #12"),
            "ns/knp.default.web"
        );
        assert_eq!(policy_of("odd"), "odd");

        // An egress endpoint chain calls both in order and returns once one allowed.
        let names: Vec<String> = chains.into_iter().map(|c| c.0).collect();
        let calls = call_policies(&names, "RETURN");
        assert_eq!(
            calls,
            vec![
                "-j MARK --set-xmark 0x0/0x30000".to_owned(),
                format!("-m mark --mark 0x0/0x20000 -j {}", names[0]),
                "-m mark --mark 0x10000/0x10000 -j RETURN".to_owned(),
                format!("-m mark --mark 0x0/0x20000 -j {}", names[1]),
                "-m mark --mark 0x10000/0x10000 -j RETURN".to_owned(),
                "-m mark --mark 0x0/0x20000 -j DROP".to_owned(),
                "-j RETURN".to_owned(),
            ]
        );
    }

    #[test]
    fn odd_interface_names_are_refused() {
        assert!(valid_iface("cali1a2b3c4d5e6"));
        assert!(!valid_iface("cali 1"));
        assert!(!valid_iface("cali1a2b3c4d5e6f"));
        assert!(!valid_iface(""));
    }
}

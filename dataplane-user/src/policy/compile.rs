//! Compiles one endpoint direction's ordered rules into the entries of the two policy tries
//! (see `dataplane-ebpf/src/policy.rs` for the lookups):
//!
//! 1. **Address classes.** Every CIDR any rule names (selectors are resolved to /32s
//!    before this) is a node of a prefix tree; CIDRs are always nested or disjoint, so for
//!    any address the CIDRs containing it are exactly the ancestors of the longest one, and
//!    which rules match the address depends only on that node. Nodes matched by the same
//!    rules share a class. One address-trie entry per CIDR, whatever the number of rules.
//! 2. **Verdicts.** For each class, the rules that can match it, in order, decide each
//!    (protocol, port): the first whose protocol and ports match gives the action. Ports
//!    are cut into intervals at every rule boundary; the answer covering most ports is
//!    stored once for the protocol, the others as the few prefixes of their intervals.
//!    Protocols no rule names share one entry per class.
//!
//! The per-packet cost is two trie lookups (three when a rule names source ports) however
//! many rules and set members there are; the cost moves to this compile step and to map
//! memory, which grows with the product of classes and port intervals only where rules
//! really combine them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use dataplane_common::{
    POLICY_PORT_CLASS_BITS, POLICY_PORT_PROTO_BITS, PolicyIpKey, PolicyPortKey, Verdict, port_kind,
    verdict, verdict_flags,
};
use ipnet::Ipv4Net;

/// Source-port tables have ids with this bit set, apart from address classes.
pub const SPORT_TABLE_BIT: u32 = 0x8000_0000;
/// IP protocol numbers that have ports.
const PORT_PROTOCOLS: [u8; 4] = [6, 17, 132, 136];
const ICMP: u8 = 1;

/// Which protocols a term matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtoMatch {
    Any,
    Is(u8),
    Not(u8),
}

impl ProtoMatch {
    fn matches(self, proto: u8) -> bool {
        match self {
            Self::Any => true,
            Self::Is(p) => p == proto,
            Self::Not(p) => p != proto,
        }
    }

    /// Whether the term matches the protocols no term of the class names (what the
    /// class-wide entry stands for): they differ from every named protocol, 255 included.
    fn matches_unnamed(self) -> bool {
        match self {
            Self::Any | Self::Not(_) => true,
            Self::Is(_) => false,
        }
    }

    fn named(self) -> Option<u8> {
        match self {
            Self::Any => None,
            Self::Is(p) | Self::Not(p) => Some(p),
        }
    }
}

/// A set of ports (or ICMP type << 8 | code): in one of `any_of` (all when `None`) and in
/// none of `none_of`. Ranges are inclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSet {
    pub any_of: Option<Vec<(u16, u16)>>,
    pub none_of: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn is_all(&self) -> bool {
        self.any_of.is_none() && self.none_of.is_empty()
    }

    fn contains(&self, p: u16) -> bool {
        let inside = |rs: &[(u16, u16)]| rs.iter().any(|&(a, b)| a <= p && p <= b);
        self.any_of.as_deref().is_none_or(inside) && !inside(&self.none_of)
    }

    fn bounds(&self, out: &mut BTreeSet<u32>) {
        for &(a, b) in self.any_of.iter().flatten().chain(&self.none_of) {
            out.insert(u32::from(a));
            out.insert(u32::from(b) + 1);
        }
    }
}

/// A set of peer addresses: in at least one CIDR of every list of `all_of` (no lists: every
/// address) and in no CIDR of `none_of`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpSet {
    pub all_of: Vec<Vec<Ipv4Net>>,
    pub none_of: Vec<Ipv4Net>,
    /// Which list of `all_of`, if any, is the rule's own `nets` rather than a selector's
    /// members: the iptables rendering matches a single CIDR there directly (`-s`/`-d`), as
    /// Calico's does, instead of through a set. The BPF compiler does not look at it.
    pub nets: Option<usize>,
}

/// One way a rule can match: protocol × peer addresses × destination ports × source ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Term {
    pub proto: ProtoMatch,
    pub peer: IpSet,
    pub dport: PortSet,
    pub sport: PortSet,
}

impl Term {
    pub fn any() -> Self {
        Self {
            proto: ProtoMatch::Any,
            peer: IpSet::default(),
            dport: PortSet::default(),
            sport: PortSet::default(),
        }
    }
}

/// A rule, resolved: it matches when any of its terms does (named ports resolve to a
/// different port per peer, hence several terms).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CompiledRule {
    /// [`verdict::ALLOW`] or [`verdict::DENY`].
    pub action: u8,
    pub terms: Vec<Term>,
    /// Where it comes from, e.g. `ns/knp.default.web ingress #0`, for inspection.
    pub origin: String,
}

impl CompiledRule {
    /// What this rule came from, as the rule descriptions map holds it: the policy name, the
    /// direction and the rule's number in the policy, parsed from `origin`
    /// (`<policy> <ingress|egress> #<n>`); an origin of another shape is kept whole as the
    /// name, with number `u32::MAX`.
    pub fn meta(&self) -> dataplane_common::PolicyRuleMeta {
        use dataplane_common::{POLICY_NAME_LEN, PolicyRuleMeta};
        let parsed = self.origin.rsplit_once(" #").and_then(|(head, n)| {
            let (name, dir) = head.rsplit_once(' ')?;
            let egress = match dir {
                "ingress" => false,
                "egress" => true,
                _ => return None,
            };
            Some((name, egress, n.parse::<u32>().ok()?))
        });
        let (name, egress, number) = parsed.unwrap_or((self.origin.as_str(), false, u32::MAX));
        let mut m = PolicyRuleMeta {
            action: self.action,
            egress: u8::from(egress),
            number,
            ..PolicyRuleMeta::default()
        };
        // Cut at a character boundary so that what is stored stays UTF-8.
        let mut len = name.len().min(POLICY_NAME_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        m.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        m.truncated = u8::from(len < name.len());
        m
    }
}

/// What the tries must hold for one policy id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entries {
    /// (prefix length in bits, key) → address class.
    pub ip: BTreeMap<(u32, PolicyIpKey), u32>,
    /// (prefix length in bits, key) → verdict.
    pub port: BTreeMap<(u32, PolicyPortKey), Verdict>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.ip.len() + self.port.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy needs {needed} map entries, more than the {limit} allowed for one policy")]
pub struct TooBig {
    pub needed: usize,
    pub limit: usize,
}

const NO_MATCH: Verdict = Verdict {
    action: verdict::NO_MATCH,
    flags: 0,
    _pad: [0; 2],
    rule: u32::MAX,
    sport_table: 0,
};

/// The CIDR prefix tree of a policy: nodes, and each node's ancestors-or-self.
struct Tree {
    nodes: Vec<Ipv4Net>,
    index: HashMap<Ipv4Net, usize>,
    chains: Vec<Vec<usize>>,
    children: Vec<Vec<usize>>,
}

impl Tree {
    fn new(cidrs: BTreeSet<Ipv4Net>) -> Self {
        let nodes: Vec<Ipv4Net> = cidrs.into_iter().collect();
        let index: HashMap<Ipv4Net, usize> =
            nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut parent = vec![None; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            parent[i] = (0..n.prefix_len()).rev().find_map(|l| {
                let up = Ipv4Net::new(n.network(), l).ok()?.trunc();
                index.get(&up).copied()
            });
        }
        let mut children = vec![Vec::new(); nodes.len()];
        for (i, p) in parent.iter().enumerate() {
            if let Some(p) = p {
                children[*p].push(i);
            }
        }
        let chains = (0..nodes.len())
            .map(|i| {
                let mut chain = vec![i];
                let mut at = parent[i];
                while let Some(p) = at {
                    chain.push(p);
                    at = parent[p];
                }
                chain
            })
            .collect();
        Self {
            nodes,
            index,
            chains,
            children,
        }
    }

    fn subtree(&self, root: usize, out: &mut Vec<usize>) {
        let mut stack = vec![root];
        while let Some(n) = stack.pop() {
            out.push(n);
            stack.extend(&self.children[n]);
        }
    }
}

fn trunc_all(nets: &[Ipv4Net]) -> impl Iterator<Item = Ipv4Net> + '_ {
    nets.iter().map(Ipv4Net::trunc)
}

/// Which nodes of `tree` a peer set matches.
fn matching_nodes(tree: &Tree, set: &IpSet) -> Vec<usize> {
    let lists: Vec<HashSet<usize>> = set
        .all_of
        .iter()
        .map(|l| trunc_all(l).map(|n| tree.index[&n]).collect())
        .collect();
    let excluded: HashSet<usize> = trunc_all(&set.none_of).map(|n| tree.index[&n]).collect();
    let mut candidates = Vec::new();
    match lists.iter().min_by_key(|l| l.len()) {
        Some(smallest) => {
            let mut roots: Vec<usize> = smallest.iter().copied().collect();
            roots.sort_unstable();
            for r in roots {
                tree.subtree(r, &mut candidates);
            }
            candidates.sort_unstable();
            candidates.dedup();
        }
        None => candidates.extend(0..tree.nodes.len()),
    }
    candidates.retain(|&n| {
        let chain = &tree.chains[n];
        lists.iter().all(|l| chain.iter().any(|c| l.contains(c)))
            && !chain.iter().any(|c| excluded.contains(c))
    });
    candidates
}

/// A piecewise-constant function over 0..=65535: (first port, value), ascending.
type Pieces = Vec<(u32, Verdict)>;

/// Emits the entries of one piecewise function under (policy, class, proto): the most
/// common value at the protocol's prefix, the other intervals as port prefixes.
fn emit(
    out: &mut BTreeMap<(u32, PolicyPortKey), Verdict>,
    policy: u32,
    class: u32,
    proto: u8,
    pieces: &Pieces,
    inherited: Option<Verdict>,
) {
    let mut cover: HashMap<Verdict, u32> = HashMap::new();
    for (i, (start, v)) in pieces.iter().enumerate() {
        let end = pieces.get(i + 1).map_or(65536, |p| p.0);
        *cover.entry(*v).or_default() += end - start;
    }
    let background = cover
        .into_iter()
        .max_by_key(|(v, n)| (*n, std::cmp::Reverse(*v)))
        .map(|(v, _)| v)
        .unwrap_or(NO_MATCH);
    let key = |kind: u8, port: u32| PolicyPortKey {
        policy,
        class,
        proto,
        kind,
        port: (port as u16).to_be_bytes(),
    };
    // The class-wide entry already answers for the protocol when it says the same.
    if inherited != Some(background) {
        out.insert(
            (POLICY_PORT_PROTO_BITS, key(port_kind::PROTO, 0)),
            background,
        );
    }
    for (i, (start, v)) in pieces.iter().enumerate() {
        if *v == background {
            continue;
        }
        let end = pieces.get(i + 1).map_or(65536, |p| p.0);
        for (p, len) in prefixes(*start, end) {
            out.insert((POLICY_PORT_PROTO_BITS + len, key(port_kind::EXACT, p)), *v);
        }
    }
}

/// The port prefixes (start, length in bits of 16) that exactly cover `start..end`.
fn prefixes(mut start: u32, end: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    while start < end {
        let mut size = if start == 0 {
            65536
        } else {
            1 << start.trailing_zeros()
        };
        while start + size > end {
            size >>= 1;
        }
        out.push((start, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

/// The value of each elementary interval of `bounds` (0 and 65536 are added), merged.
fn pieces(bounds: &BTreeSet<u32>, mut value: impl FnMut(u16) -> Verdict) -> Pieces {
    let mut points: Vec<u32> = bounds.iter().copied().filter(|&b| b < 65536).collect();
    if points.first() != Some(&0) {
        points.insert(0, 0);
    }
    let mut out: Pieces = Vec::new();
    for p in points {
        let v = value(p as u16);
        if out.last().is_none_or(|(_, last)| *last != v) {
            out.push((p, v));
        }
    }
    out
}

/// Compiles `rules` (in evaluation order) under `policy`. Fails when the result would need
/// more than `limit` entries.
pub fn compile(policy: u32, rules: &[CompiledRule], limit: usize) -> Result<Entries, TooBig> {
    // Flatten into terms, remembering their rule.
    let terms: Vec<(usize, &Term)> = rules
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.terms.iter().map(move |t| (i, t)))
        .collect();
    let mut cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
    cidrs.insert(Ipv4Net::default());
    for (_, t) in &terms {
        cidrs.extend(t.peer.all_of.iter().flat_map(|l| trunc_all(l)));
        cidrs.extend(trunc_all(&t.peer.none_of));
    }
    let tree = Tree::new(cidrs);

    // Terms matching each node → classes.
    let mut node_terms: Vec<Vec<usize>> = vec![Vec::new(); tree.nodes.len()];
    for (ti, (_, t)) in terms.iter().enumerate() {
        for n in matching_nodes(&tree, &t.peer) {
            node_terms[n].push(ti);
        }
    }
    let mut classes: HashMap<&[usize], u32> = HashMap::new();
    let mut class_terms: Vec<&[usize]> = Vec::new();
    let mut e = Entries::default();
    for (n, ts) in node_terms.iter().enumerate() {
        let next = class_terms.len() as u32 + 1;
        let class = *classes.entry(ts.as_slice()).or_insert_with(|| {
            class_terms.push(ts.as_slice());
            next
        });
        let net = tree.nodes[n];
        e.ip.insert(
            (
                32 + u32::from(net.prefix_len()),
                PolicyIpKey {
                    policy,
                    addr: net.network().octets(),
                },
            ),
            class,
        );
    }

    let mut sport_tables: HashMap<Pieces, u32> = HashMap::new();
    let mut sport_entries: Vec<(u32, u8, Pieces)> = Vec::new();
    for (ci, ts) in class_terms.iter().enumerate() {
        let class = ci as u32 + 1;
        let here: Vec<(usize, &Term)> = ts.iter().map(|&ti| terms[ti]).collect();
        // `proto` None: a protocol no term of this class names.
        let first = |proto: Option<u8>, dport: u16, sport: Option<u16>| -> Verdict {
            here.iter()
                .find(|(_, t)| {
                    proto.map_or(t.proto.matches_unnamed(), |p| t.proto.matches(p))
                        && t.dport.contains(dport)
                        && sport.is_none_or(|s| t.sport.contains(s))
                })
                .map_or(NO_MATCH, |(ri, _)| Verdict {
                    action: rules[*ri].action,
                    flags: 0,
                    _pad: [0; 2],
                    rule: *ri as u32,
                    sport_table: 0,
                })
        };
        // Protocols named by this class's terms; the rest share the class-wide entry.
        let named: BTreeSet<u8> = here.iter().filter_map(|(_, t)| t.proto.named()).collect();
        let other = first(None, 0, Some(0));
        e.port.insert(
            (
                POLICY_PORT_CLASS_BITS,
                PolicyPortKey {
                    policy,
                    class,
                    kind: port_kind::CLASS,
                    ..PolicyPortKey::default()
                },
            ),
            other,
        );
        for proto in named {
            let applicable: Vec<&Term> = here
                .iter()
                .filter(|(_, t)| t.proto.matches(proto))
                .map(|(_, t)| *t)
                .collect();
            let has_ports = PORT_PROTOCOLS.contains(&proto) || proto == ICMP;
            let mut dbounds = BTreeSet::new();
            let mut sbounds = BTreeSet::new();
            if has_ports {
                for t in &applicable {
                    t.dport.bounds(&mut dbounds);
                    t.sport.bounds(&mut sbounds);
                }
            }
            let uses_sport = !sbounds.is_empty();
            let mut dpieces = pieces(&dbounds, |dport| {
                let v = first(Some(proto), dport, None);
                if !uses_sport || v.action == verdict::NO_MATCH {
                    return v;
                }
                // The verdict may depend on the source port: a table of its own.
                let table = pieces(&sbounds, |sport| first(Some(proto), dport, Some(sport)));
                if table.len() == 1 {
                    return table[0].1;
                }
                let next = SPORT_TABLE_BIT | (sport_tables.len() as u32 + 1);
                let id = *sport_tables.entry(table.clone()).or_insert_with(|| {
                    sport_entries.push((next, proto, table));
                    next
                });
                Verdict {
                    sport_table: id,
                    ..v
                }
            });
            if !has_ports {
                dpieces.truncate(1);
            }
            emit(&mut e.port, policy, class, proto, &dpieces, Some(other));
            if e.len() > limit {
                return Err(TooBig {
                    needed: e.len(),
                    limit,
                });
            }
        }
    }
    for (table, proto, p) in &sport_entries {
        emit(&mut e.port, policy, *table, *proto, p, None);
    }
    if e.len() > limit {
        return Err(TooBig {
            needed: e.len(),
            limit,
        });
    }
    Ok(e)
}

/// What the four policy maps hold for one compiled policy: single addresses and exact
/// verdict keys in hashes, CIDRs and blocks of ports in tries (see `PolicyPortKey`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tables {
    pub ip_exact: BTreeMap<PolicyIpKey, u32>,
    /// (prefix bits, key) → class.
    pub ip_lpm: BTreeMap<(u32, PolicyIpKey), u32>,
    pub port_exact: BTreeMap<PolicyPortKey, Verdict>,
    /// (prefix bits, key) → verdict.
    pub port_lpm: BTreeMap<(u32, PolicyPortKey), Verdict>,
}

impl Entries {
    /// The entries as the maps hold them. A protocol with blocks of ports in the trie gets
    /// [`verdict_flags::RANGES`] on its entry (made from the class's when it had none).
    pub fn tables(&self) -> Tables {
        let mut t = Tables::default();
        for (&(plen, k), &c) in &self.ip {
            if plen == 64 {
                t.ip_exact.insert(k, c);
            } else {
                t.ip_lpm.insert((plen, k), c);
            }
        }
        let mut ranged = BTreeSet::new();
        for (&(plen, k), &v) in &self.port {
            if plen == POLICY_PORT_CLASS_BITS || plen == POLICY_PORT_PROTO_BITS || plen == 96 {
                t.port_exact.insert(k, v);
            } else {
                t.port_lpm.insert((plen, k), v);
                ranged.insert((k.policy, k.class, k.proto));
            }
        }
        for (policy, class, proto) in ranged {
            let at = |proto, kind| PolicyPortKey {
                policy,
                class,
                proto,
                kind,
                port: [0; 2],
            };
            let base = t
                .port_exact
                .get(&at(proto, port_kind::PROTO))
                .or_else(|| t.port_exact.get(&at(0, port_kind::CLASS)))
                .copied()
                .unwrap_or(NO_MATCH);
            t.port_exact.insert(
                at(proto, port_kind::PROTO),
                Verdict {
                    flags: base.flags | verdict_flags::RANGES,
                    ..base
                },
            );
        }
        t
    }
}

impl Tables {
    /// Back to the prefix form (for listing): exact keys as full-length prefixes.
    pub fn entries(&self) -> Entries {
        let mut e = Entries::default();
        for (k, c) in &self.ip_exact {
            e.ip.insert((64, *k), *c);
        }
        e.ip.extend(self.ip_lpm.iter().map(|(k, c)| (*k, *c)));
        for (k, v) in &self.port_exact {
            let plen = match k.kind {
                port_kind::CLASS => POLICY_PORT_CLASS_BITS,
                port_kind::PROTO => POLICY_PORT_PROTO_BITS,
                _ => 96,
            };
            e.port.insert((plen, *k), *v);
        }
        e.port.extend(self.port_lpm.iter().map(|(k, v)| (*k, *v)));
        e
    }

    pub fn len(&self) -> usize {
        self.ip_exact.len() + self.ip_lpm.len() + self.port_exact.len() + self.port_lpm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn verdict(&self, policy: u32, class: u32, proto: u8, port: u16) -> Option<Verdict> {
        let key = |proto, kind, port: u16| PolicyPortKey {
            policy,
            class,
            proto,
            kind,
            port: port.to_be_bytes(),
        };
        if let Some(v) = self.port_exact.get(&key(proto, port_kind::EXACT, port)) {
            return Some(*v);
        }
        if let Some(d) = self.port_exact.get(&key(proto, port_kind::PROTO, 0)) {
            if d.flags & verdict_flags::RANGES != 0 {
                let hit = self
                    .port_lpm
                    .iter()
                    .filter(|((plen, k), _)| {
                        let len = plen - POLICY_PORT_PROTO_BITS;
                        k.policy == policy
                            && k.class == class
                            && k.proto == proto
                            && (len == 0 || (u16::from_be_bytes(k.port) ^ port) >> (16 - len) == 0)
                    })
                    .max_by_key(|((plen, _), _)| *plen);
                if let Some((_, v)) = hit {
                    return Some(*v);
                }
            }
            return Some(*d);
        }
        self.port_exact.get(&key(0, port_kind::CLASS, 0)).copied()
    }

    /// The verdict the maps give, looked up the way the programs do (for tests and tools).
    pub fn evaluate(
        &self,
        policy: u32,
        peer: std::net::Ipv4Addr,
        proto: u8,
        dport: u16,
        sport: u16,
    ) -> Verdict {
        let ip = u32::from(peer);
        let exact = self.ip_exact.get(&PolicyIpKey {
            policy,
            addr: peer.octets(),
        });
        let class = exact.copied().or_else(|| {
            self.ip_lpm
                .iter()
                .filter(|((plen, k), _)| {
                    let len = plen - 32;
                    k.policy == policy
                        && (len == 0 || (u32::from_be_bytes(k.addr) ^ ip) >> (32 - len) == 0)
                })
                .max_by_key(|((plen, _), _)| *plen)
                .map(|(_, c)| *c)
        });
        let Some(class) = class else {
            return NO_MATCH;
        };
        let Some(v) = self.verdict(policy, class, proto, dport) else {
            return NO_MATCH;
        };
        if v.sport_table != 0 {
            return self
                .verdict(policy, v.sport_table, proto, sport)
                .unwrap_or(NO_MATCH);
        }
        v
    }
}

/// The verdict of compiled entries, looked up the way the programs do.
pub fn evaluate(
    e: &Entries,
    policy: u32,
    peer: std::net::Ipv4Addr,
    proto: u8,
    dport: u16,
    sport: u16,
) -> Verdict {
    e.tables().evaluate(policy, peer, proto, dport, sport)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn rule(action: u8, terms: Vec<Term>) -> CompiledRule {
        CompiledRule {
            action,
            terms,
            origin: String::new(),
        }
    }

    #[test]
    fn rule_meta_names_the_policy_direction_and_number() {
        let mut r = rule(verdict::DENY, vec![]);
        r.origin = "prod/knp.default.web egress #12".to_owned();
        let m = r.meta();
        let name = |m: &dataplane_common::PolicyRuleMeta| {
            String::from_utf8(m.name.iter().copied().take_while(|&b| b != 0).collect()).unwrap()
        };
        assert_eq!(
            (name(&m).as_str(), m.egress, m.number, m.action, m.truncated),
            ("prod/knp.default.web", 1, 12, verdict::DENY, 0)
        );
        r.origin = format!("{} ingress #0", "é".repeat(100));
        let m = r.meta();
        assert_eq!((m.egress, m.number, m.truncated), (0, 0, 1));
        assert_eq!(name(&m), "é".repeat(60));
        r.origin = "odd".to_owned();
        assert_eq!(
            (name(&r.meta()).as_str(), r.meta().number),
            ("odd", u32::MAX)
        );
    }

    /// The reference: first rule with a matching term, straight from the definitions.
    fn reference(rules: &[CompiledRule], peer: Ipv4Addr, proto: u8, dp: u16, sp: u16) -> u8 {
        let in_set = |s: &IpSet| {
            s.all_of.iter().all(|l| l.iter().any(|n| n.contains(&peer)))
                && !s.none_of.iter().any(|n| n.contains(&peer))
        };
        let proto_ok = |m: ProtoMatch| match m {
            ProtoMatch::Any => true,
            ProtoMatch::Is(p) => p == proto,
            ProtoMatch::Not(p) => p != proto,
        };
        let (dp, sp) = if PORT_PROTOCOLS.contains(&proto) || proto == ICMP {
            (dp, sp)
        } else {
            (0, 0)
        };
        rules
            .iter()
            .find(|r| {
                r.terms.iter().any(|t| {
                    proto_ok(t.proto)
                        && in_set(&t.peer)
                        && t.dport.contains(dp)
                        && t.sport.contains(sp)
                })
            })
            .map_or(verdict::NO_MATCH, |r| r.action)
    }

    #[test]
    fn prefixes_cover_exactly() {
        assert_eq!(prefixes(0, 65536), vec![(0, 0)]);
        assert_eq!(prefixes(80, 81), vec![(80, 16)]);
        assert_eq!(prefixes(80, 82), vec![(80, 15)]);
        let p = prefixes(1000, 2001);
        let covered: u32 = p.iter().map(|(_, l)| 1 << (16 - l)).sum();
        assert_eq!(covered, 1001);
    }

    #[test]
    fn first_match_and_isolation() {
        let deny_web = Term {
            proto: ProtoMatch::Is(6),
            peer: IpSet {
                all_of: vec![vec![net("10.0.0.0/8")]],
                none_of: vec![net("10.1.0.0/16")],
                nets: None,
            },
            dport: PortSet {
                any_of: Some(vec![(80, 80)]),
                none_of: vec![],
            },
            sport: PortSet::default(),
        };
        let allow_tcp = Term {
            proto: ProtoMatch::Is(6),
            ..Term::any()
        };
        let rules = vec![
            rule(verdict::DENY, vec![deny_web]),
            rule(verdict::ALLOW, vec![allow_tcp]),
        ];
        let e = compile(7, &rules, 1000).unwrap();
        let v = |ip: &str, proto, port| evaluate(&e, 7, ip.parse().unwrap(), proto, port, 1234);
        assert_eq!(v("10.2.3.4", 6, 80).action, verdict::DENY);
        assert_eq!(v("10.1.3.4", 6, 80).action, verdict::ALLOW);
        assert_eq!(v("10.2.3.4", 6, 81).action, verdict::ALLOW);
        assert_eq!(v("10.2.3.4", 17, 80).action, verdict::NO_MATCH);
        assert_eq!(v("10.2.3.4", 47, 0).action, verdict::NO_MATCH);
        // A rule naming protocol 255 (a real, reserved number) says nothing about others.
        let only_255 = vec![rule(
            verdict::ALLOW,
            vec![Term {
                proto: ProtoMatch::Is(255),
                ..Term::any()
            }],
        )];
        let e = compile(8, &only_255, 1000).unwrap();
        let at = |proto| evaluate(&e, 8, "10.0.0.1".parse().unwrap(), proto, 80, 1).action;
        assert_eq!(
            (at(255), at(6), at(17)),
            (verdict::ALLOW, verdict::NO_MATCH, verdict::NO_MATCH)
        );
        let not_255 = vec![rule(
            verdict::ALLOW,
            vec![Term {
                proto: ProtoMatch::Not(255),
                ..Term::any()
            }],
        )];
        let e = compile(8, &not_255, 1000).unwrap();
        let at = |proto| evaluate(&e, 8, "10.0.0.1".parse().unwrap(), proto, 80, 1).action;
        assert_eq!(
            (at(255), at(6), at(47)),
            (verdict::NO_MATCH, verdict::ALLOW, verdict::ALLOW)
        );
        // Isolation with no rules: one class, one entry.
        let e = compile(9, &[], 10).unwrap();
        assert_eq!((e.ip.len(), e.port.len()), (1, 1));
    }

    #[test]
    fn many_rules_stay_flat() {
        // 10,000 rules, each one /32 on one port, and a last rule for everything TCP.
        let mut rules: Vec<CompiledRule> = (0..10_000u32)
            .map(|i| {
                rule(
                    verdict::ALLOW,
                    vec![Term {
                        proto: ProtoMatch::Is(6),
                        peer: IpSet {
                            all_of: vec![vec![
                                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap(),
                            ]],
                            none_of: vec![],
                            nets: None,
                        },
                        dport: PortSet {
                            any_of: Some(vec![(
                                1000 + (i % 5000) as u16,
                                1000 + (i % 5000) as u16,
                            )]),
                            none_of: vec![],
                        },
                        sport: PortSet::default(),
                    }],
                )
            })
            .collect();
        rules.push(rule(
            verdict::DENY,
            vec![Term {
                proto: ProtoMatch::Is(6),
                ..Term::any()
            }],
        ));
        let e = compile(1, &rules, 1 << 20).unwrap();
        assert!(e.len() < 60_000, "{} entries", e.len());
        let v = |ip: u32, port| evaluate(&e, 1, Ipv4Addr::from(ip), 6, port, 9).action;
        assert_eq!(v(0x0a00_0005, 1005), verdict::ALLOW);
        assert_eq!(v(0x0a00_0005, 1006), verdict::DENY);
        assert_eq!(v(0x0b00_0000, 1005), verdict::DENY);
    }

    fn arb_net() -> impl Strategy<Value = Ipv4Net> {
        // A small address space so that CIDRs overlap and nest often.
        (
            0u32..64,
            prop_oneof![Just(32u8), Just(30), Just(28), Just(26), Just(0)],
        )
            .prop_map(|(a, l)| {
                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | a), l)
                    .unwrap()
                    .trunc()
            })
    }

    fn arb_ports() -> impl Strategy<Value = PortSet> {
        let range = (0u16..100, 0u16..20).prop_map(|(a, n)| (a, a.saturating_add(n)));
        (
            proptest::option::of(proptest::collection::vec(range.clone(), 1..3)),
            proptest::collection::vec(range, 0..2),
        )
            .prop_map(|(any_of, none_of)| PortSet { any_of, none_of })
    }

    fn arb_term() -> impl Strategy<Value = Term> {
        (
            prop_oneof![
                Just(ProtoMatch::Any),
                Just(ProtoMatch::Is(6)),
                Just(ProtoMatch::Is(17)),
                Just(ProtoMatch::Not(6)),
                Just(ProtoMatch::Is(47)),
            ],
            proptest::collection::vec(proptest::collection::vec(arb_net(), 1..3), 0..2),
            proptest::collection::vec(arb_net(), 0..2),
            arb_ports(),
            prop_oneof![3 => Just(PortSet::default()), 1 => arb_ports()],
        )
            .prop_map(|(proto, all_of, none_of, dport, sport)| {
                let ported = matches!(proto, ProtoMatch::Is(6) | ProtoMatch::Is(17));
                Term {
                    proto,
                    peer: IpSet {
                        all_of,
                        none_of,
                        nets: None,
                    },
                    dport: if ported { dport } else { PortSet::default() },
                    sport: if ported { sport } else { PortSet::default() },
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn compiled_equals_reference(
            rules in proptest::collection::vec(
                (prop_oneof![Just(verdict::ALLOW), Just(verdict::DENY)],
                 proptest::collection::vec(arb_term(), 1..3))
                    .prop_map(|(a, t)| rule(a, t)),
                0..6),
            probes in proptest::collection::vec(
                (0u32..80, prop_oneof![Just(6u8), Just(17), Just(1), Just(47)], 0u16..130, 0u16..130),
                40),
        ) {
            let e = compile(3, &rules, 1 << 20).unwrap();
            for (a, proto, dp, sp) in probes {
                let peer = Ipv4Addr::from(0x0a00_0000 | a);
                let got = evaluate(&e, 3, peer, proto, dp, sp).action;
                prop_assert_eq!(got, reference(&rules, peer, proto, dp, sp),
                    "peer {} proto {} dport {} sport {}", peer, proto, dp, sp);
            }
        }
    }
}

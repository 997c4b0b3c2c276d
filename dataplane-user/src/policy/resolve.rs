//! From policies, endpoints and namespaces to each local endpoint's ordered rules, with
//! selectors resolved to addresses and named ports to numbers — the input of
//! [`super::compile`].
//!
//! Semantics (Calico's, which Kubernetes NetworkPolicy translates into):
//! - A NetworkPolicy applies to the endpoints of its namespace its selector matches; a
//!   GlobalNetworkPolicy to those its selector (and namespaceSelector) match, anywhere.
//! - Policies are evaluated by `order` (then name); the first matching rule decides. `Pass`
//!   skips the remaining policies: the namespace profile decides, and it allows. `Log`
//!   decides nothing. No matching rule: denied, once any policy applies in that direction;
//!   no policy at all: allowed.
//! - In a rule, the side that is the endpoint itself (destination of an ingress rule, source
//!   of an egress rule) is checked here, once; the other side becomes an address set.
//!   A selector in a NetworkPolicy rule matches endpoints of the policy's namespace unless
//!   the rule has a namespaceSelector.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
};

use dataplane_common::verdict;
use ipnet::Ipv4Net;

use super::{
    compile::{CompiledRule, IpSet, PortSet, ProtoMatch, Term},
    selector::{Labels, Selector},
};
use crate::datastore::policy::{
    Action, EntityRule, KIND_GLOBAL_NETWORK_POLICY, NetworkPolicy, PolicyType, PortMatch, Protocol,
};

/// A port with a name on an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// A workload endpoint as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// Including `projectcalico.org/namespace` and `projectcalico.org/orchestrator`.
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug)]
struct Entity {
    nets: Vec<Ipv4Net>,
    not_nets: Vec<Ipv4Net>,
    selector: Option<Selector>,
    not_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    ports: Vec<PortMatch>,
    not_ports: Vec<PortMatch>,
}

#[derive(Clone, Debug)]
struct Rule {
    /// ALLOW or DENY (Pass is an allow: the profile allows).
    action: u8,
    proto: ProtoMatch,
    /// ICMP type/code as "ports" (type << 8 | code).
    icmp: PortSet,
    source: Entity,
    destination: Entity,
    origin: String,
}

/// A policy, parsed and checked.
#[derive(Clone, Debug)]
pub struct Policy {
    /// `None` for a GlobalNetworkPolicy.
    pub namespace: Option<String>,
    pub name: String,
    pub order: f64,
    selector: Selector,
    namespace_selector: Option<Selector>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
    /// Unique to this parse: two policies with the same uid have the same content (caches key
    /// on it instead of hashing every rule).
    pub uid: u64,
    /// What the rules of each direction look at on the endpoint itself, at most.
    local: [Local; 2],
}

fn opt_selector(s: &str) -> Result<Option<Selector>, String> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        Selector::parse(s).map(Some).map_err(|e| e.to_string())
    }
}

/// The IPv4 nets of `list`. IPv6 nets (which `ctl apply` accepts, as Calico does) are left
/// out: this dataplane polices IPv4 only, and no IPv4 address is inside one.
fn nets(list: &[String]) -> Result<Vec<Ipv4Net>, String> {
    list.iter()
        .filter(|n| n.parse::<ipnet::Ipv6Net>().is_err())
        .map(|n| {
            n.parse::<Ipv4Net>()
                .or_else(|_| n.parse::<Ipv4Addr>().map(Ipv4Net::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("bad net {n:?}"))
        })
        .collect()
}

/// `None` when the side can match no IPv4 address: its `nets` are all IPv6.
fn entity(e: &EntityRule) -> Result<Option<Entity>, String> {
    let ports = |l: &[crate::datastore::policy::Port]| -> Result<Vec<PortMatch>, String> {
        l.iter().map(|p| p.parse()).collect()
    };
    let v4 = nets(&e.nets)?;
    if v4.is_empty() && !e.nets.is_empty() {
        return Ok(None);
    }
    Ok(Some(Entity {
        nets: v4,
        not_nets: nets(&e.not_nets)?,
        selector: opt_selector(&e.selector)?,
        not_selector: opt_selector(&e.not_selector)?,
        namespace_selector: opt_selector(&e.namespace_selector)?,
        ports: ports(&e.ports)?,
        not_ports: ports(&e.not_ports)?,
    }))
}

fn icmp_range(t: Option<u8>, c: Option<u8>) -> Option<(u16, u16)> {
    let t = u16::from(t?);
    Some(match c {
        Some(c) => (t << 8 | u16::from(c), t << 8 | u16::from(c)),
        None => (t << 8, t << 8 | 0xff),
    })
}

fn rule(r: &crate::datastore::policy::Rule, origin: String) -> Result<Option<Rule>, String> {
    let action = match r.action {
        Action::Allow | Action::Pass => verdict::ALLOW,
        Action::Deny => verdict::DENY,
        Action::Log => return Ok(None),
    };
    if r.ip_version == Some(6) {
        return Ok(None);
    }
    let number = |p: &Option<Protocol>| p.as_ref().map(Protocol::number).transpose();
    let proto = match (number(&r.protocol)?, number(&r.not_protocol)?) {
        (Some(p), Some(n)) if p == n => return Ok(None),
        (Some(p), _) => ProtoMatch::Is(p),
        (None, Some(n)) => ProtoMatch::Not(n),
        (None, None) => ProtoMatch::Any,
    };
    let mut icmp = PortSet::default();
    if let Some(i) = &r.icmp
        && let Some(range) = icmp_range(i.type_, i.code)
    {
        icmp.any_of = Some(vec![range]);
    }
    if let Some(i) = &r.not_icmp
        && let Some(range) = icmp_range(i.type_, i.code)
    {
        icmp.none_of.push(range);
    }
    // A side whose nets are all IPv6 matches no IPv4 packet: neither does the rule.
    let (Some(source), Some(destination)) = (entity(&r.source)?, entity(&r.destination)?) else {
        return Ok(None);
    };
    Ok(Some(Rule {
        action,
        proto,
        icmp,
        source,
        destination,
        origin,
    }))
}

/// What of the endpoint itself a rule's local side looks at (ordered: what a policy looks at
/// is the most any of its rules does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Local {
    #[default]
    Nothing,
    /// Only its named ports.
    NamedPorts,
    /// Its address, labels or namespace.
    Endpoint,
}

/// Source of [`Policy::uid`]: every parse gets a new one.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// See [`Resolver::sharing_key`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SharingKey {
    pub policies: Vec<usize>,
    pub ports: Vec<NamedPort>,
}

impl SharingKey {
    /// No policy applies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

impl Rule {
    /// What the side of this rule that is the endpoint itself constrains beyond numbered
    /// ports (what makes its meaning differ from one endpoint to another).
    fn looks_at_local(&self, ingress: bool) -> Local {
        let local = if ingress {
            &self.destination
        } else {
            &self.source
        };
        let named = |l: &[PortMatch]| l.iter().any(|m| matches!(m, PortMatch::Named(_)));
        if !local.nets.is_empty()
            || !local.not_nets.is_empty()
            || local.selector.is_some()
            || local.not_selector.is_some()
            || local.namespace_selector.is_some()
        {
            Local::Endpoint
        } else if named(&local.ports) || named(&local.not_ports) {
            Local::NamedPorts
        } else {
            Local::Nothing
        }
    }
}

impl Policy {
    /// Parses a stored policy; `Err` says what is wrong (the policy is then not used).
    pub fn parse(namespace: Option<&str>, p: &NetworkPolicy) -> Result<Self, String> {
        let global = p.kind == KIND_GLOBAL_NETWORK_POLICY;
        let namespace = if global {
            None
        } else {
            Some(namespace.unwrap_or("default").to_owned())
        };
        let name = p.metadata.name.clone();
        let full = match &namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.clone(),
        };
        let rules = |t: PolicyType, list: &[crate::datastore::policy::Rule]| {
            if !p.spec.applies_to(t) {
                return Ok(None);
            }
            let dir = if t == PolicyType::Ingress {
                "ingress"
            } else {
                "egress"
            };
            list.iter()
                .enumerate()
                .filter_map(|(i, r)| rule(r, format!("{full} {dir} #{i}")).transpose())
                .collect::<Result<Vec<_>, String>>()
                .map(Some)
        };
        let ingress = rules(PolicyType::Ingress, &p.spec.ingress)?;
        let egress = rules(PolicyType::Egress, &p.spec.egress)?;
        let looks = |list: &Option<Vec<Rule>>, ingress: bool| {
            list.iter()
                .flatten()
                .map(|r| r.looks_at_local(ingress))
                .max()
                .unwrap_or_default()
        };
        Ok(Self {
            local: [looks(&ingress, true), looks(&egress, false)],
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            selector: opt_selector(&p.spec.selector)?.unwrap_or_else(Selector::all),
            namespace_selector: if global {
                opt_selector(&p.spec.namespace_selector)?
            } else {
                None
            },
            ingress,
            egress,
            order: p.spec.order(),
            namespace,
            name,
        })
    }
}

/// (scope namespace, selector, namespace selector) of a cached selection.
pub type SelectionKey = (Option<String>, String, String);

/// A namespace's labels as selectors see them (its name included).
pub fn namespace_labels(namespaces: &BTreeMap<String, Labels>, ns: &str) -> Labels {
    let mut l = namespaces.get(ns).cloned().unwrap_or_default();
    l.entry("kubernetes.io/metadata.name".to_owned())
        .or_insert_with(|| ns.to_owned());
    l
}

/// One selection kept across resolutions, with its members counted (two endpoints may share
/// an address).
#[derive(Debug)]
struct Selection {
    scope: Option<String>,
    selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    members: BTreeMap<Ipv4Addr, u32>,
    addrs: Vec<Ipv4Net>,
    version: u64,
    used: bool,
}

impl Selection {
    fn matches(&self, ep: &Endpoint, namespaces: &BTreeMap<String, Labels>) -> bool {
        let in_scope = match &self.namespace_selector {
            Some(s) => s.matches(&namespace_labels(namespaces, &ep.namespace)),
            None => self.scope.as_deref().is_none_or(|ns| ns == ep.namespace),
        };
        in_scope && self.selector.as_ref().is_none_or(|s| s.matches(&ep.labels))
    }
}

/// The address sets of selections, kept across resolutions and updated endpoint by endpoint
/// ([`SelectionStore::update`]) instead of recomputed over every endpoint. Each set has a
/// version that changes whenever its addresses do: what was resolved from a set is still
/// right while its version is the same.
#[derive(Debug, Default)]
pub struct SelectionStore {
    entries: RefCell<HashMap<SelectionKey, Selection>>,
    versions: Cell<u64>,
}

impl SelectionStore {
    fn next_version(&self) -> u64 {
        let v = self.versions.get() + 1;
        self.versions.set(v);
        v
    }

    /// The version of a selection's set (`None`: not kept); marks it as in use.
    pub fn version(&self, key: &SelectionKey) -> Option<u64> {
        let mut entries = self.entries.borrow_mut();
        let e = entries.get_mut(key)?;
        e.used = true;
        Some(e.version)
    }

    /// How many selections are kept.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every set (e.g. namespace labels changed: any could differ).
    pub fn clear(&mut self) {
        self.entries.get_mut().clear();
    }

    /// Endpoints went away (`removed`) and came (`added`; a changed endpoint is both): each
    /// set is updated by looking at those only.
    pub fn update(
        &mut self,
        removed: &[&Endpoint],
        added: &[&Endpoint],
        namespaces: &BTreeMap<String, Labels>,
    ) {
        let mut next = self.versions.get();
        for sel in self.entries.get_mut().values_mut() {
            let mut changed = false;
            for ep in removed {
                if sel.matches(ep, namespaces)
                    && let Some(n) = sel.members.get_mut(&ep.ip)
                {
                    *n -= 1;
                    if *n == 0 {
                        sel.members.remove(&ep.ip);
                        changed = true;
                    }
                }
            }
            for ep in added {
                if sel.matches(ep, namespaces) {
                    let n = sel.members.entry(ep.ip).or_insert(0);
                    changed |= *n == 0;
                    *n += 1;
                }
            }
            if changed {
                sel.addrs = sel.members.keys().map(|a| Ipv4Net::from(*a)).collect();
                next += 1;
                sel.version = next;
            }
        }
        self.versions.set(next);
    }

    /// Drops the sets not used since the last sweep.
    pub fn sweep(&mut self) {
        self.entries
            .get_mut()
            .retain(|_, s| std::mem::take(&mut s.used));
    }
}

/// What one resolution read besides the policies and the endpoint: see
/// [`Resolver::rules_for_tracked`].
#[derive(Debug, Default)]
pub struct Reads {
    /// The selections whose address sets it used.
    pub selections: Vec<SelectionKey>,
    /// Whether it went through endpoints one by one (named ports on the peer side): any
    /// endpoint change can change its result.
    pub every_endpoint: bool,
}

/// Everything policy resolution looks at.
pub struct Resolver<'a> {
    endpoints: &'a [Endpoint],
    namespaces: &'a BTreeMap<String, Labels>,
    policies: Vec<&'a Policy>,
    /// Addresses matched by (scope namespace, selector, namespace selector).
    cache: RefCell<HashMap<SelectionKey, Vec<Ipv4Net>>>,
    /// Kept across resolutions instead of `cache`, when given.
    store: Option<&'a SelectionStore>,
    reads: RefCell<Reads>,
}

impl<'a> Resolver<'a> {
    pub fn new(
        endpoints: &'a [Endpoint],
        namespaces: &'a BTreeMap<String, Labels>,
        policies: impl IntoIterator<Item = &'a Policy>,
    ) -> Self {
        let mut policies: Vec<&Policy> = policies.into_iter().collect();
        policies.sort_by(|a, b| {
            a.order
                .total_cmp(&b.order)
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| a.namespace.cmp(&b.namespace))
        });
        Self {
            endpoints,
            namespaces,
            policies,
            cache: RefCell::default(),
            store: None,
            reads: RefCell::default(),
        }
    }

    /// A resolver whose selections live in `store` (which must hold sets of `endpoints` and
    /// `namespaces`: kept up to date with [`SelectionStore::update`]).
    pub fn with_store(
        endpoints: &'a [Endpoint],
        namespaces: &'a BTreeMap<String, Labels>,
        policies: impl IntoIterator<Item = &'a Policy>,
        store: &'a SelectionStore,
    ) -> Self {
        let mut r = Self::new(endpoints, namespaces, policies);
        r.store = Some(store);
        r
    }

    fn ns_labels(&self, ns: &str) -> Labels {
        namespace_labels(self.namespaces, ns)
    }

    /// The policies that apply to `ep` in one direction (with rules there), by uid in
    /// evaluation order, and what their rules look at on the endpoint itself, at most.
    pub fn applicable(&self, ep: &Endpoint, ingress: bool) -> (Vec<u64>, Local) {
        let dir = usize::from(!ingress);
        let mut local = Local::Nothing;
        let uids = self
            .policies
            .iter()
            .filter(|p| {
                (if ingress { &p.ingress } else { &p.egress }).is_some() && self.applies(p, ep)
            })
            .map(|p| {
                local = local.max(p.local[dir]);
                p.uid
            })
            .collect();
        (uids, local)
    }

    fn applies(&self, p: &Policy, ep: &Endpoint) -> bool {
        if let Some(ns) = &p.namespace
            && *ns != ep.namespace
        {
            return false;
        }
        p.selector.matches(&ep.labels)
            && p.namespace_selector
                .as_ref()
                .is_none_or(|s| s.matches(&self.ns_labels(&ep.namespace)))
    }

    /// The endpoints a rule side's selectors can match: `scope` is the policy's namespace.
    fn in_scope<'b>(
        &'b self,
        scope: Option<&'b str>,
        namespace_selector: Option<&'b Selector>,
    ) -> impl Iterator<Item = &'b Endpoint> + 'b {
        self.endpoints
            .iter()
            .filter(move |e| match namespace_selector {
                Some(s) => s.matches(&self.ns_labels(&e.namespace)),
                None => scope.is_none_or(|ns| ns == e.namespace),
            })
    }

    fn addresses(
        &self,
        scope: Option<&str>,
        selector: Option<&Selector>,
        namespace_selector: Option<&Selector>,
    ) -> Vec<Ipv4Net> {
        let key = (
            scope.map(str::to_owned),
            selector.map(ToString::to_string).unwrap_or_default(),
            namespace_selector
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        let members = || {
            self.in_scope(scope, namespace_selector)
                .filter(|e| selector.is_none_or(|s| s.matches(&e.labels)))
                .map(|e| e.ip)
        };
        if let Some(store) = self.store {
            self.reads.borrow_mut().selections.push(key.clone());
            let mut entries = store.entries.borrow_mut();
            if let Some(sel) = entries.get_mut(&key) {
                sel.used = true;
                return sel.addrs.clone();
            }
            let mut counted: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
            for ip in members() {
                *counted.entry(ip).or_default() += 1;
            }
            let addrs: Vec<Ipv4Net> = counted.keys().map(|a| Ipv4Net::from(*a)).collect();
            entries.insert(
                key,
                Selection {
                    scope: scope.map(str::to_owned),
                    selector: selector.cloned(),
                    namespace_selector: namespace_selector.cloned(),
                    members: counted,
                    addrs: addrs.clone(),
                    version: store.next_version(),
                    used: true,
                },
            );
            return addrs;
        }
        if let Some(v) = self.cache.borrow().get(&key) {
            return v.clone();
        }
        let mut v: Vec<Ipv4Net> = members().map(Ipv4Net::from).collect();
        v.sort_unstable();
        v.dedup();
        self.cache.borrow_mut().insert(key, v.clone());
        v
    }

    /// Whether `ep` (the local side of a rule) satisfies `side`.
    fn local_matches(&self, scope: Option<&str>, side: &Entity, ep: &Endpoint) -> bool {
        let in_any = |l: &[Ipv4Net]| l.iter().any(|n| n.contains(&ep.ip));
        if !side.nets.is_empty() && !in_any(&side.nets) || in_any(&side.not_nets) {
            return false;
        }
        let ns_ok = match &side.namespace_selector {
            Some(s) => s.matches(&self.ns_labels(&ep.namespace)),
            None => scope.is_none_or(|ns| ns == ep.namespace),
        };
        let selected = side.selector.is_some() || side.namespace_selector.is_some();
        if selected && !(ns_ok && side.selector.as_ref().is_none_or(|s| s.matches(&ep.labels))) {
            return false;
        }
        if let Some(s) = &side.not_selector
            && ns_ok
            && s.matches(&ep.labels)
        {
            return false;
        }
        true
    }

    /// A key such that endpoints with the same key get the same rules in this direction:
    /// the policies that apply to `ep` there (and its named ports when a rule names ports on
    /// the endpoint's own side). `None` when a rule looks at the endpoint itself otherwise
    /// (its address or labels on the local side): those are resolved one by one.
    pub fn sharing_key(&self, ep: &Endpoint, ingress: bool) -> Option<SharingKey> {
        let mut key = SharingKey::default();
        let mut named = false;
        let dir = usize::from(!ingress);
        for (i, p) in self.policies.iter().enumerate() {
            if (if ingress { &p.ingress } else { &p.egress }).is_none() {
                continue;
            }
            if !self.applies(p, ep) {
                continue;
            }
            match p.local[dir] {
                Local::Nothing => {}
                Local::NamedPorts => named = true,
                Local::Endpoint => return None,
            }
            key.policies.push(i);
        }
        if named {
            key.ports = ep.ports.clone();
            key.ports
                .sort_by(|a, b| (&a.name, a.proto, a.port).cmp(&(&b.name, b.proto, b.port)));
        }
        Some(key)
    }

    /// [`Resolver::rules_for`], and what it read beyond the policies and `ep` (recorded only
    /// with a [`SelectionStore`]).
    pub fn rules_for_tracked(
        &self,
        ep: &Endpoint,
        ingress: bool,
    ) -> (Option<Vec<CompiledRule>>, Reads) {
        self.reads.take();
        let rules = self.rules_for(ep, ingress);
        let mut reads = self.reads.take();
        reads.selections.sort_unstable();
        reads.selections.dedup();
        (rules, reads)
    }

    /// The rules for `ep` in one direction; `None` when no policy applies to it there.
    pub fn rules_for(&self, ep: &Endpoint, ingress: bool) -> Option<Vec<CompiledRule>> {
        let mut out = Vec::new();
        let mut any = false;
        for p in self.policies.iter().filter(|p| self.applies(p, ep)) {
            let Some(rules) = (if ingress { &p.ingress } else { &p.egress }) else {
                continue;
            };
            any = true;
            for r in rules {
                if let Some(c) = self.resolve(p, r, ep, ingress) {
                    out.push(c);
                }
            }
        }
        any.then_some(out)
    }

    fn resolve(&self, p: &Policy, r: &Rule, ep: &Endpoint, ingress: bool) -> Option<CompiledRule> {
        let scope = p.namespace.as_deref();
        let (local, peer) = if ingress {
            (&r.destination, &r.source)
        } else {
            (&r.source, &r.destination)
        };
        if !self.local_matches(scope, local, ep) {
            return None;
        }
        let proto = r.proto;
        let rule_proto = match proto {
            ProtoMatch::Is(p) => Some(p),
            _ => None,
        };
        // Ports by number, and named ports resolved against one endpoint.
        let numbered = |list: &[PortMatch]| -> Vec<(u16, u16)> {
            list.iter()
                .filter_map(|m| match m {
                    PortMatch::Range(a, b) => Some((*a, *b)),
                    PortMatch::Named(_) => None,
                })
                .collect()
        };
        let named_on = |list: &[PortMatch], e: &Endpoint| -> Vec<(u16, u16)> {
            list.iter()
                .filter_map(|m| match m {
                    PortMatch::Named(n) => e
                        .ports
                        .iter()
                        .find(|np| np.name == *n && rule_proto.is_none_or(|p| p == np.proto))
                        .map(|np| (np.port, np.port)),
                    PortMatch::Range(..) => None,
                })
                .collect()
        };
        let has_named = |list: &[PortMatch]| list.iter().any(|m| matches!(m, PortMatch::Named(_)));
        // The local side's ports resolve against this endpoint.
        let local_set = |e: &Entity| -> PortSet {
            let mut any_of = numbered(&e.ports);
            any_of.extend(named_on(&e.ports, ep));
            let mut none_of = numbered(&e.not_ports);
            none_of.extend(named_on(&e.not_ports, ep));
            PortSet {
                any_of: (!e.ports.is_empty()).then_some(any_of),
                none_of,
            }
        };
        let local_ports = local_set(local);
        if local_ports.any_of.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }

        // The peer's addresses.
        let mut peer_set = IpSet::default();
        if !peer.nets.is_empty() {
            peer_set.nets = Some(peer_set.all_of.len());
            peer_set.all_of.push(peer.nets.clone());
        }
        let selected = peer.selector.is_some() || peer.namespace_selector.is_some();
        if selected {
            peer_set.all_of.push(self.addresses(
                scope,
                peer.selector.as_ref(),
                peer.namespace_selector.as_ref(),
            ));
        }
        peer_set.none_of.clone_from(&peer.not_nets);
        if let Some(s) = &peer.not_selector {
            peer_set.none_of.extend(self.addresses(
                scope,
                Some(s),
                peer.namespace_selector.as_ref(),
            ));
        }

        let term = |peer: IpSet, peer_ports: PortSet| {
            let (mut dport, sport) = if ingress {
                (local_ports.clone(), peer_ports)
            } else {
                (peer_ports, local_ports.clone())
            };
            if proto == ProtoMatch::Is(1) && dport.is_all() {
                dport = r.icmp.clone();
            }
            Term {
                proto,
                peer,
                dport,
                sport,
            }
        };
        let mut terms = Vec::new();
        if !has_named(&peer.ports) && !has_named(&peer.not_ports) {
            terms.push(term(
                peer_set,
                PortSet {
                    any_of: (!peer.ports.is_empty()).then(|| numbered(&peer.ports)),
                    none_of: numbered(&peer.not_ports),
                },
            ));
        } else {
            // Named ports on the peer side differ per peer: one term per peer endpoint.
            let numbers = numbered(&peer.ports);
            if !numbers.is_empty() {
                terms.push(term(
                    peer_set.clone(),
                    PortSet {
                        any_of: Some(numbers),
                        none_of: numbered(&peer.not_ports),
                    },
                ));
            }
            self.reads.borrow_mut().every_endpoint = true;
            let candidates: Vec<&Endpoint> = if selected {
                self.in_scope(scope, peer.namespace_selector.as_ref())
                    .filter(|e| peer.selector.as_ref().is_none_or(|s| s.matches(&e.labels)))
                    .collect()
            } else {
                self.endpoints.iter().collect()
            };
            for e in candidates {
                let mut any_of = named_on(&peer.ports, e);
                if peer.ports.is_empty() {
                    any_of = Vec::new();
                } else if any_of.is_empty() {
                    continue;
                }
                let mut none_of = numbered(&peer.not_ports);
                none_of.extend(named_on(&peer.not_ports, e));
                let mut one = peer_set.clone();
                one.all_of.push(vec![Ipv4Net::from(e.ip)]);
                terms.push(term(
                    one,
                    PortSet {
                        any_of: (!peer.ports.is_empty()).then_some(any_of),
                        none_of,
                    },
                ));
            }
        }
        if terms.is_empty() {
            return None;
        }
        Some(CompiledRule {
            action: r.action,
            terms,
            origin: r.origin.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "kind": "NetworkPolicy",
            "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn ipv6_nets_match_no_ipv4_address_and_do_not_void_the_policy() {
        // Found by the `policy` fuzz target: ctl accepted a rule naming an IPv6 net and the
        // agent then skipped the whole policy ("bad net"), leaving its endpoints open.
        let p = policy(serde_json::json!({
            "selector": "all()",
            "types": ["Ingress"],
            "ingress": [
                {"action": "Deny", "source": {"nets": ["fd00::/64"]}},
                {"action": "Deny", "source": {"nets": ["fd00::/64", "10.0.0.0/8"]}},
                {"action": "Allow", "source": {"notNets": ["::/0"]}},
            ],
        }));
        p.validate().unwrap();
        let parsed = Policy::parse(Some("default"), &p).unwrap();
        let ep = Endpoint {
            namespace: "default".to_owned(),
            ip: Ipv4Addr::new(10, 65, 0, 2),
            labels: Labels::new(),
            ports: vec![],
        };
        let endpoints = [ep.clone()];
        let namespaces = BTreeMap::new();
        let r = Resolver::new(&endpoints, &namespaces, [&parsed]);
        let rules = r.rules_for(&ep, true).unwrap();
        // The IPv6-only rule is gone; the mixed one keeps its IPv4 net; the notNets one
        // excludes nothing.
        assert_eq!(rules.len(), 2, "{rules:#?}");
        assert_eq!(rules[0].action, verdict::DENY);
        assert_eq!(
            rules[0].terms[0].peer.all_of,
            vec![vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]]
        );
        assert_eq!(rules[1].action, verdict::ALLOW);
        assert!(rules[1].terms[0].peer.none_of.is_empty());
    }
}

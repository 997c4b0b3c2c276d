//! Each local endpoint's rules, kept from one reconcile to the next: an endpoint event (a pod
//! added, removed or relabelled) re-resolves only the rule lists whose inputs changed, instead
//! of every policy for every endpoint.
//!
//! A resolved list is keyed by what [`Resolver::rules_for`] reads of its own: the direction,
//! the policies that apply (by [`Policy::uid`], in evaluation order) and, when a rule looks at
//! the endpoint itself, the endpoint (its named ports only, when that is all a rule looks
//! at). What it reads of the rest of the cluster is recorded with it: the version of every
//! selection's address set ([`SelectionStore`], updated endpoint by endpoint) and, for named
//! ports on the peer side, the endpoint epoch (which moves on any endpoint change). A list is
//! reused while all of those are unchanged, so the result is the one a full resolution gives
//! (`sync`'s property test checks it against one after random event sequences).
//!
//! Lists equal by content are one `Arc` (only new lists are hashed), so the map writer finds
//! an already compiled policy by pointer.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use super::{
    compile::CompiledRule,
    resolve::{Endpoint, Local, NamedPort, Policy, Resolver, SelectionKey, SelectionStore},
    selector::Labels,
};

/// One direction's rules of an endpoint (`None`: no policy applies there).
pub type Rules = Option<Arc<Vec<CompiledRule>>>;

/// What a resolved list depends on of the endpoint itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Own {
    Nothing,
    Ports(Vec<NamedPort>),
    Endpoint {
        ip: Ipv4Addr,
        namespace: String,
        labels: Labels,
        ports: Vec<NamedPort>,
        namespace_labels: Labels,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ResultKey {
    ingress: bool,
    policies: Vec<u64>,
    own: Own,
}

#[derive(Debug)]
struct Resolved {
    rules: Rules,
    selections: Vec<(SelectionKey, u64)>,
    /// The endpoint epoch it was resolved at, when it read endpoints one by one.
    epoch: Option<u64>,
    /// The last pass that used it.
    pass: u64,
}

/// Counts of the last pass, for the logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Lists reused.
    pub reused: usize,
    /// Lists resolved.
    pub resolved: usize,
    /// Endpoints that changed since the pass before.
    pub endpoint_changes: usize,
}

/// Rule lists and selections kept across reconciles. See the module comment.
#[derive(Debug, Default)]
pub struct RuleCache {
    selections: SelectionStore,
    results: HashMap<ResultKey, Resolved>,
    interned: HashSet<Arc<Vec<CompiledRule>>>,
    /// The endpoints as of the last pass, sorted by their key.
    keys: Vec<(String, usize)>,
    endpoints: Vec<Endpoint>,
    namespaces: BTreeMap<String, Labels>,
    epoch: u64,
    pass: u64,
    pub stats: Stats,
}

impl RuleCache {
    /// Brings the kept selections to `endpoints` (sorted by their key: (owner, index)).
    fn take_endpoints(
        &mut self,
        endpoints: Vec<((String, usize), Endpoint)>,
        namespaces: &BTreeMap<String, Labels>,
    ) {
        if *namespaces != self.namespaces {
            self.selections.clear();
            self.namespaces = namespaces.clone();
            self.epoch += 1;
        }
        let (keys, eps): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < self.keys.len() || j < keys.len() {
            match (self.keys.get(i), keys.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    if self.endpoints[i] != eps[j] {
                        removed.push(&self.endpoints[i]);
                        added.push(&eps[j]);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    removed.push(&self.endpoints[i]);
                    i += 1;
                }
                (Some(_), None) => {
                    removed.push(&self.endpoints[i]);
                    i += 1;
                }
                _ => {
                    added.push(&eps[j]);
                    j += 1;
                }
            }
        }
        self.stats.endpoint_changes = removed.len().max(added.len());
        if !removed.is_empty() || !added.is_empty() {
            self.epoch += 1;
            self.selections.update(&removed, &added, namespaces);
        }
        self.keys = keys;
        self.endpoints = eps;
    }

    /// The rules of each local endpoint `(id, address)` as [`Resolver::rules_for`] gives them
    /// over `endpoints` (every endpoint of the cluster, keyed by (owner, index), sorted),
    /// `namespaces` and `policies`; lists equal by content are one `Arc`.
    pub fn rules<'p>(
        &mut self,
        endpoints: Vec<((String, usize), Endpoint)>,
        namespaces: &BTreeMap<String, Labels>,
        policies: impl IntoIterator<Item = &'p Policy>,
        local: &[(u32, Ipv4Addr)],
    ) -> BTreeMap<u32, [Rules; 2]> {
        let mut out = BTreeMap::new();
        self.stats = Stats::default();
        if local.is_empty() {
            return out;
        }
        self.pass += 1;
        self.take_endpoints(endpoints, namespaces);
        let policies: Vec<&Policy> = policies.into_iter().collect();
        // Borrowed for this pass only (the resolver's borrows end with it).
        let policies: &[&Policy] = &policies;
        let Self {
            selections,
            results,
            interned,
            endpoints,
            namespaces,
            epoch,
            pass,
            stats,
            ..
        } = self;
        let r = Resolver::with_store(endpoints, namespaces, policies.iter().copied(), selections);
        let by_ip: HashMap<Ipv4Addr, &Endpoint> = endpoints.iter().map(|e| (e.ip, e)).collect();
        for &(idx, ip) in local {
            let Some(ep) = by_ip.get(&ip).copied() else {
                continue;
            };
            let mut one = |ingress: bool| -> Rules {
                let (policies, looks) = r.applicable(ep, ingress);
                if policies.is_empty() {
                    return None;
                }
                let own = match looks {
                    Local::Nothing => Own::Nothing,
                    Local::NamedPorts => Own::Ports(ep.ports.clone()),
                    Local::Endpoint => Own::Endpoint {
                        ip: ep.ip,
                        namespace: ep.namespace.clone(),
                        labels: ep.labels.clone(),
                        ports: ep.ports.clone(),
                        namespace_labels: super::resolve::namespace_labels(
                            namespaces,
                            &ep.namespace,
                        ),
                    },
                };
                let key = ResultKey {
                    ingress,
                    policies,
                    own,
                };
                if let Some(hit) = results.get_mut(&key) {
                    let fresh = hit.epoch.is_none_or(|e| e == *epoch)
                        && hit
                            .selections
                            .iter()
                            .all(|(k, v)| selections.version(k) == Some(*v));
                    if fresh {
                        hit.pass = *pass;
                        stats.reused += 1;
                        return hit.rules.clone();
                    }
                }
                stats.resolved += 1;
                let (rules, reads) = r.rules_for_tracked(ep, ingress);
                let rules = rules.map(|v| match interned.get(&v) {
                    Some(a) => a.clone(),
                    None => {
                        let a = Arc::new(v);
                        interned.insert(a.clone());
                        a
                    }
                });
                let deps = reads
                    .selections
                    .into_iter()
                    .filter_map(|k| {
                        let v = selections.version(&k)?;
                        Some((k, v))
                    })
                    .collect();
                results.insert(
                    key,
                    Resolved {
                        rules: rules.clone(),
                        selections: deps,
                        epoch: reads.every_endpoint.then_some(*epoch),
                        pass: *pass,
                    },
                );
                rules
            };
            let rules = [one(true), one(false)];
            out.insert(idx, rules);
        }
        drop(r);
        let pass = self.pass;
        self.results.retain(|_, r| r.pass == pass);
        self.interned.retain(|a| Arc::strong_count(a) > 1);
        self.selections.sweep();
        out
    }
}

//! Typed access to the pinned maps, for the agent and for tools that run without it
//! (`map-dump` reads the pins directly).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, lpm_trie::Key};
use dataplane_common::{
    CounterKey, Counters, CtKey, CtTimeouts, CtValue, EndpointValue, NodeConfig, PolicyHitKey,
    PolicyIpKey, PolicyPortKey, PolicyRuleKey, PolicyRuleMeta, RouteValue, Verdict, counter,
    map_names,
};

use crate::{batch, bpffs, policy::compile::Tables};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("open pinned map {path}: {source} (is an agent running with this --bpffs-dir?)")]
    Open { path: String, source: MapError },
    #[error("read map {name}: {source}")]
    Read {
        name: &'static str,
        source: MapError,
    },
    #[error("write map {name} (batch): {source}")]
    Batch {
        name: &'static str,
        source: std::io::Error,
    },
}

impl MapsError {
    /// Whether a write failed because a map is full (or the kernel out of memory for it).
    pub fn is_full(&self) -> bool {
        let io = match self {
            Self::Batch { source, .. } => source,
            Self::Read {
                source: MapError::SyscallError(e),
                ..
            } => &e.io_error,
            _ => return false,
        };
        matches!(
            io.raw_os_error(),
            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
        )
    }
}

/// Opens the counters map pinned under the agent root `root`.
pub fn open_counters(
    root: &Path,
) -> Result<PerCpuHashMap<MapData, CounterKey, Counters>, MapsError> {
    let path = bpffs::maps_dir(root).join(map_names::COUNTERS);
    let open_err = |source| MapsError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(open_err)
}

/// Counters summed over all CPUs, by (ifindex, hook).
pub fn read_counters(root: &Path) -> Result<BTreeMap<(u32, u8), Counters>, MapsError> {
    let map = open_counters(root)?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.map_err(|source| MapsError::Read {
            name: map_names::COUNTERS,
            source,
        })?;
        let mut sum = Counters::ZERO;
        for cpu in per_cpu.iter() {
            for slot in 0..counter::COUNT {
                sum.values[slot] = sum.values[slot].wrapping_add(cpu.values[slot]);
            }
        }
        out.insert((key.ifindex, key.hook), sum);
    }
    Ok(out)
}

fn open_pinned(root: &Path, name: &str) -> Result<MapData, MapsError> {
    let path = bpffs::maps_dir(root).join(name);
    MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// The routes map: (prefix length, address) → route.
pub fn read_routes(root: &Path) -> Result<BTreeMap<(u32, [u8; 4]), RouteValue>, MapsError> {
    let map: LpmTrie<MapData, [u8; 4], RouteValue> =
        LpmTrie::try_from(Map::LpmTrie(open_pinned(root, map_names::ROUTES)?)).map_err(
            |source| MapsError::Read {
                name: map_names::ROUTES,
                source,
            },
        )?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (k, v) = entry.map_err(|source| MapsError::Read {
            name: map_names::ROUTES,
            source,
        })?;
        out.insert((k.prefix_len(), k.data()), v);
    }
    Ok(out)
}

/// The endpoints map: host veth ifindex → endpoint.
pub fn read_endpoints(root: &Path) -> Result<BTreeMap<u32, EndpointValue>, MapsError> {
    let map: HashMap<MapData, u32, EndpointValue> =
        HashMap::try_from(Map::HashMap(open_pinned(root, map_names::ENDPOINTS)?)).map_err(
            |source| MapsError::Read {
                name: map_names::ENDPOINTS,
                source,
            },
        )?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (k, v) = entry.map_err(|source| MapsError::Read {
            name: map_names::ENDPOINTS,
            source,
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Writes this node's settings (address, host NIC) into the config map.
pub fn write_config(root: &Path, cfg: NodeConfig) -> Result<(), MapsError> {
    let err = |source| MapsError::Read {
        name: map_names::CONFIG,
        source,
    };
    let mut map: Array<MapData, NodeConfig> =
        Array::try_from(Map::Array(open_pinned(root, map_names::CONFIG)?)).map_err(err)?;
    map.set(0, cfg, 0).map_err(err)
}

/// Writes one endpoint (the agent's sync does this from etcd; tools and tests without etcd
/// use this).
pub fn write_endpoint(root: &Path, ifindex: u32, ep: EndpointValue) -> Result<(), MapsError> {
    let err = |source| MapsError::Read {
        name: map_names::ENDPOINTS,
        source,
    };
    let mut map: HashMap<MapData, u32, EndpointValue> =
        HashMap::try_from(Map::HashMap(open_pinned(root, map_names::ENDPOINTS)?)).map_err(err)?;
    map.insert(ifindex, ep, 0).map_err(err)
}

/// This node's settings as the agent wrote them (`None` while all zero: never written).
pub fn read_config(root: &Path) -> Result<Option<NodeConfig>, MapsError> {
    let err = |source| MapsError::Read {
        name: map_names::CONFIG,
        source,
    };
    let map: Array<MapData, NodeConfig> =
        Array::try_from(Map::Array(open_pinned(root, map_names::CONFIG)?)).map_err(err)?;
    let cfg = map.get(&0, 0).map_err(err)?;
    Ok((cfg != NodeConfig::default()).then_some(cfg))
}

/// The size the conntrack map under `root` was created with.
pub fn conntrack_max_entries(root: &Path) -> Result<u32, MapsError> {
    let info = open_pinned(root, map_names::CONNTRACK)?
        .info()
        .map_err(|source| MapsError::Read {
            name: map_names::CONNTRACK,
            source,
        })?;
    Ok(info.max_entries())
}

/// The conntrack map pinned under `root`.
pub fn open_conntrack(root: &Path) -> Result<HashMap<MapData, CtKey, CtValue>, MapsError> {
    HashMap::try_from(Map::HashMap(open_pinned(root, map_names::CONNTRACK)?)).map_err(|source| {
        MapsError::Read {
            name: map_names::CONNTRACK,
            source,
        }
    })
}

/// CLOCK_MONOTONIC now in nanoseconds: the clock of the programs' `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Removes expired conntrack entries (the programs already treat them as absent; this gives
/// their slots back). Returns (entries kept, entries removed). Runs in the agent off the
/// packet path.
pub fn sweep_conntrack(root: &Path, timeouts: &CtTimeouts) -> Result<(usize, usize), MapsError> {
    let mut map = open_conntrack(root)?;
    let now = monotonic_ns();
    let mut expired = Vec::new();
    let mut kept = 0;
    for entry in map.iter() {
        let Ok((k, v)) = entry else {
            // Deleted by the programs meanwhile, or the walk restarted: the next sweep sees it.
            continue;
        };
        if timeouts.expired(&v, k.proto, now) {
            expired.push(k);
        } else {
            kept += 1;
        }
    }
    let mut removed = 0;
    for k in expired {
        if map.remove(&k).is_ok() {
            removed += 1;
        }
    }
    Ok((kept, removed))
}

/// The four policy maps pinned under an agent root: address classes (hash of single
/// addresses, trie of CIDRs) and verdicts (hash of exact keys, trie of port blocks); and the
/// two for inspection: what each rule came from, and how many packets each decided.
pub struct PolicyMaps {
    /// The maps' descriptors, for batch writes: ip_exact, ip_lpm, port_exact, port_lpm,
    /// rules.
    fds: [OwnedFd; 5],
    ip_exact: HashMap<MapData, PolicyIpKey, u32>,
    ip_lpm: LpmTrie<MapData, PolicyIpKey, u32>,
    port_exact: HashMap<MapData, PolicyPortKey, Verdict>,
    port_lpm: LpmTrie<MapData, PolicyPortKey, Verdict>,
    rules: HashMap<MapData, PolicyRuleKey, PolicyRuleMeta>,
    hits: PerCpuHashMap<MapData, PolicyHitKey, u64>,
}

fn not_found_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl PolicyMaps {
    pub fn open(root: &Path) -> Result<Self, MapsError> {
        let err = |name| move |source| MapsError::Read { name, source };
        let dup = |name, m: &MapData| {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| MapsError::Batch { name, source })
        };
        let ip_exact = open_pinned(root, map_names::POLICY_IP_EXACT)?;
        let ip_lpm = open_pinned(root, map_names::POLICY_IP)?;
        let port_exact = open_pinned(root, map_names::POLICY_PORT_EXACT)?;
        let port_lpm = open_pinned(root, map_names::POLICY_PORT)?;
        let rules = open_pinned(root, map_names::POLICY_RULES)?;
        Ok(Self {
            fds: [
                dup(map_names::POLICY_IP_EXACT, &ip_exact)?,
                dup(map_names::POLICY_IP, &ip_lpm)?,
                dup(map_names::POLICY_PORT_EXACT, &port_exact)?,
                dup(map_names::POLICY_PORT, &port_lpm)?,
                dup(map_names::POLICY_RULES, &rules)?,
            ],
            ip_exact: HashMap::try_from(Map::HashMap(ip_exact))
                .map_err(err(map_names::POLICY_IP_EXACT))?,
            ip_lpm: LpmTrie::try_from(Map::LpmTrie(ip_lpm)).map_err(err(map_names::POLICY_IP))?,
            port_exact: HashMap::try_from(Map::HashMap(port_exact))
                .map_err(err(map_names::POLICY_PORT_EXACT))?,
            port_lpm: LpmTrie::try_from(Map::LpmTrie(port_lpm))
                .map_err(err(map_names::POLICY_PORT))?,
            rules: HashMap::try_from(Map::HashMap(rules)).map_err(err(map_names::POLICY_RULES))?,
            hits: open_policy_hits(root)?,
        })
    }

    /// The keys of the rule descriptions (an agent at start treats them all as orphans).
    pub fn rule_keys(&self) -> Vec<PolicyRuleKey> {
        // A key that vanishes during the walk is already gone: nothing to remove.
        self.rules.keys().filter_map(Result::ok).collect()
    }

    /// The policy ids that have hit counters.
    pub fn hit_policies(&self) -> std::collections::BTreeSet<u32> {
        self.hits
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.policy)
            .collect()
    }

    /// Describes each rule of compiled policy `id` (index → meta). Stops at the first
    /// failure (a full map): the rules after it are enforced but shown without a name.
    pub fn write_rules(
        &mut self,
        id: u32,
        metas: impl Iterator<Item = PolicyRuleMeta>,
    ) -> Result<(), MapsError> {
        let (keys, values): (Vec<PolicyRuleKey>, Vec<PolicyRuleMeta>) = metas
            .enumerate()
            .map(|(rule, m)| {
                (
                    PolicyRuleKey {
                        policy: id,
                        rule: rule as u32,
                    },
                    m,
                )
            })
            .unzip();
        let name = map_names::POLICY_RULES;
        let rules = &mut self.rules;
        batch::update(
            self.fds[4].as_fd(),
            &keys,
            &values,
            |k, v| {
                rules
                    .insert(k, *v, 0)
                    .map_err(|source| MapsError::Read { name, source })
            },
            |source| MapsError::Batch { name, source },
        )
    }

    /// Removes rule descriptions (already gone is fine).
    pub fn remove_rules(&mut self, keys: &[PolicyRuleKey]) -> Result<(), MapsError> {
        let name = map_names::POLICY_RULES;
        let rules = &mut self.rules;
        batch::delete(
            self.fds[4].as_fd(),
            keys,
            |k| not_found_ok(rules.remove(k)).map_err(|source| MapsError::Read { name, source }),
            |source| MapsError::Batch { name, source },
        )
    }

    /// Removes the hit counters of every policy id not in `live` (a walk of the counters,
    /// which hold only the rules that decided something). This also takes the counts a
    /// packet made under a gone id after its last removal.
    pub fn remove_hits_except(
        &mut self,
        live: &std::collections::BTreeSet<u32>,
    ) -> Result<usize, MapsError> {
        let gone: Vec<PolicyHitKey> = self
            .hits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.policy))
            .collect();
        for k in &gone {
            not_found_ok(self.hits.remove(k)).map_err(|source| MapsError::Read {
                name: map_names::POLICY_HITS,
                source,
            })?;
        }
        Ok(gone.len())
    }

    /// Everything the maps hold.
    pub fn read(&self) -> Result<Tables, MapsError> {
        let err = |name| move |source| MapsError::Read { name, source };
        let mut t = Tables::default();
        for e in self.ip_exact.iter() {
            let (k, v) = e.map_err(err(map_names::POLICY_IP_EXACT))?;
            t.ip_exact.insert(k, v);
        }
        for e in self.ip_lpm.iter() {
            let (k, v) = e.map_err(err(map_names::POLICY_IP))?;
            t.ip_lpm.insert((k.prefix_len(), k.data()), v);
        }
        for e in self.port_exact.iter() {
            let (k, v) = e.map_err(err(map_names::POLICY_PORT_EXACT))?;
            t.port_exact.insert(k, v);
        }
        for e in self.port_lpm.iter() {
            let (k, v) = e.map_err(err(map_names::POLICY_PORT))?;
            t.port_lpm.insert((k.prefix_len(), k.data()), v);
        }
        Ok(t)
    }

    /// Writes every entry of `t`, many per syscall; the tries and the address hash first,
    /// the verdict hash last (its entries are what a lookup starts from).
    pub fn write(&mut self, t: &Tables) -> Result<(), MapsError> {
        let err = |name| move |source| MapsError::Read { name, source };
        let berr = |name| move |source| MapsError::Batch { name, source };
        let [ip_exact_fd, ip_lpm_fd, port_exact_fd, port_lpm_fd, _] = &self.fds;
        let (keys, values) = lpm_entries(&t.ip_lpm);
        let m = &mut self.ip_lpm;
        batch::update(
            ip_lpm_fd.as_fd(),
            &keys,
            &values,
            |k, v| m.insert(k, *v, 0).map_err(err(map_names::POLICY_IP)),
            berr(map_names::POLICY_IP),
        )?;
        let (keys, values) = exact_entries(&t.ip_exact);
        let m = &mut self.ip_exact;
        batch::update(
            ip_exact_fd.as_fd(),
            &keys,
            &values,
            |k, v| m.insert(k, *v, 0).map_err(err(map_names::POLICY_IP_EXACT)),
            berr(map_names::POLICY_IP_EXACT),
        )?;
        let (keys, values) = lpm_entries(&t.port_lpm);
        let m = &mut self.port_lpm;
        batch::update(
            port_lpm_fd.as_fd(),
            &keys,
            &values,
            |k, v| m.insert(k, *v, 0).map_err(err(map_names::POLICY_PORT)),
            berr(map_names::POLICY_PORT),
        )?;
        let (keys, values) = exact_entries(&t.port_exact);
        let m = &mut self.port_exact;
        batch::update(
            port_exact_fd.as_fd(),
            &keys,
            &values,
            |k, v| {
                m.insert(k, *v, 0)
                    .map_err(err(map_names::POLICY_PORT_EXACT))
            },
            berr(map_names::POLICY_PORT_EXACT),
        )
    }

    /// Removes every entry of `t` (entries already gone are fine), many per syscall.
    pub fn remove(&mut self, t: &Tables) -> Result<(), MapsError> {
        let err = |name| move |source| MapsError::Read { name, source };
        let berr = |name| move |source| MapsError::Batch { name, source };
        let [ip_exact_fd, ip_lpm_fd, port_exact_fd, port_lpm_fd, _] = &self.fds;
        let keys: Vec<PolicyPortKey> = t.port_exact.keys().copied().collect();
        let m = &mut self.port_exact;
        batch::delete(
            port_exact_fd.as_fd(),
            &keys,
            |k| not_found_ok(m.remove(k)).map_err(err(map_names::POLICY_PORT_EXACT)),
            berr(map_names::POLICY_PORT_EXACT),
        )?;
        let keys: Vec<Key<PolicyPortKey>> = t
            .port_lpm
            .keys()
            .map(|&(plen, k)| Key::new(plen, k))
            .collect();
        let m = &mut self.port_lpm;
        batch::delete(
            port_lpm_fd.as_fd(),
            &keys,
            |k| not_found_ok(m.remove(k)).map_err(err(map_names::POLICY_PORT)),
            berr(map_names::POLICY_PORT),
        )?;
        let keys: Vec<PolicyIpKey> = t.ip_exact.keys().copied().collect();
        let m = &mut self.ip_exact;
        batch::delete(
            ip_exact_fd.as_fd(),
            &keys,
            |k| not_found_ok(m.remove(k)).map_err(err(map_names::POLICY_IP_EXACT)),
            berr(map_names::POLICY_IP_EXACT),
        )?;
        let keys: Vec<Key<PolicyIpKey>> = t
            .ip_lpm
            .keys()
            .map(|&(plen, k)| Key::new(plen, k))
            .collect();
        let m = &mut self.ip_lpm;
        batch::delete(
            ip_lpm_fd.as_fd(),
            &keys,
            |k| not_found_ok(m.remove(k)).map_err(err(map_names::POLICY_IP)),
            berr(map_names::POLICY_IP),
        )
    }
}

/// A trie's entries as the batch calls take them: keys and values side by side.
pub fn lpm_entries<K: aya::Pod + Ord, V: aya::Pod>(
    m: &BTreeMap<(u32, K), V>,
) -> (Vec<Key<K>>, Vec<V>) {
    m.iter()
        .map(|(&(plen, k), &v)| (Key::new(plen, k), v))
        .unzip()
}

/// A hash map's entries as the batch calls take them.
pub fn exact_entries<K: aya::Pod + Ord, V: aya::Pod>(m: &BTreeMap<K, V>) -> (Vec<K>, Vec<V>) {
    m.iter().map(|(&k, &v)| (k, v)).unzip()
}

fn open_policy_rules(
    root: &Path,
) -> Result<HashMap<MapData, PolicyRuleKey, PolicyRuleMeta>, MapsError> {
    HashMap::try_from(Map::HashMap(open_pinned(root, map_names::POLICY_RULES)?)).map_err(|source| {
        MapsError::Read {
            name: map_names::POLICY_RULES,
            source,
        }
    })
}

fn open_policy_hits(root: &Path) -> Result<PerCpuHashMap<MapData, PolicyHitKey, u64>, MapsError> {
    PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(
        root,
        map_names::POLICY_HITS,
    )?))
    .map_err(|source| MapsError::Read {
        name: map_names::POLICY_HITS,
        source,
    })
}

/// The rule descriptions under `root`: (policy id, rule index) → meta.
pub fn read_policy_rules(root: &Path) -> Result<BTreeMap<(u32, u32), PolicyRuleMeta>, MapsError> {
    let map = open_policy_rules(root)?;
    let mut out = BTreeMap::new();
    for e in map.iter() {
        let (k, v) = e.map_err(|source| MapsError::Read {
            name: map_names::POLICY_RULES,
            source,
        })?;
        out.insert((k.policy, k.rule), v);
    }
    Ok(out)
}

/// The policy hit counters under `root`, summed over CPUs: (policy id, egress, rule) →
/// packets decided.
pub fn read_policy_hits(root: &Path) -> Result<BTreeMap<(u32, bool, u32), u64>, MapsError> {
    let map = open_policy_hits(root)?;
    let mut out = BTreeMap::new();
    for e in map.iter() {
        let (k, per_cpu) = e.map_err(|source| MapsError::Read {
            name: map_names::POLICY_HITS,
            source,
        })?;
        let sum = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        out.insert((k.policy, k.egress(), k.rule_index()), sum);
    }
    Ok(out)
}

/// Everything the policy maps under `root` hold.
pub fn read_policy(root: &Path) -> Result<Tables, MapsError> {
    PolicyMaps::open(root)?.read()
}

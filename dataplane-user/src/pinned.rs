//! What an agent's pin directory shows without the agent: how full each map is against its
//! limit, and which interfaces have programs attached (their link pins). Read by the agent's
//! metrics at scrape time and by `ctl node status` on the node itself.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use dataplane_common::{
    CounterKey, Counters, CtKey, CtValue, EndpointValue, MAX_CONNTRACK, MAX_COUNTER_KEYS,
    MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_NODES, MAX_POLICY_HITS, MAX_POLICY_IP, MAX_POLICY_PORT,
    MAX_POLICY_RULES, MAX_ROUTES, NodeValue, PolicyHitKey, PolicyIpKey, PolicyPortKey,
    PolicyRuleKey, PolicyRuleMeta, RouteValue, Verdict, map_names,
};
use serde::{Deserialize, Serialize};

use crate::bpffs;

/// One map's fill level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFill {
    /// Short name, as metrics label it: `routes`, `endpoints`, `nodes`, `conntrack`,
    /// `policy_ip`, `policy_port`, `counters`.
    pub map: String,
    /// The pinned map's name (`DP_ROUTES`, …).
    pub pin: String,
    /// Entries now, or null when the map could not be read.
    pub entries: Option<u64>,
    /// The map's limit (its max_entries).
    pub max_entries: u64,
}

impl MapFill {
    /// Entries as a share of the limit, 0.0 to 1.0.
    pub fn ratio(&self) -> Option<f64> {
        self.entries
            .map(|e| e as f64 / self.max_entries.max(1) as f64)
    }
}

/// The maps whose fill is reported: (label, pin name, limit).
pub const FILLED_MAPS: &[(&str, &str, u32)] = &[
    ("routes", map_names::ROUTES, MAX_ROUTES),
    ("endpoints", map_names::ENDPOINTS, MAX_ENDPOINTS),
    ("nodes", map_names::NODES, MAX_NODES),
    ("conntrack", map_names::CONNTRACK, MAX_CONNTRACK),
    ("policy_ip", map_names::POLICY_IP, MAX_POLICY_IP),
    ("policy_ip_exact", map_names::POLICY_IP_EXACT, MAX_POLICY_IP),
    ("policy_port", map_names::POLICY_PORT, MAX_POLICY_PORT),
    (
        "policy_port_exact",
        map_names::POLICY_PORT_EXACT,
        MAX_POLICY_PORT,
    ),
    ("fragments", map_names::FRAGMENTS, MAX_FRAGMENTS),
    ("policy_hits", map_names::POLICY_HITS, MAX_POLICY_HITS),
    ("policy_rules", map_names::POLICY_RULES, MAX_POLICY_RULES),
    ("counters", map_names::COUNTERS, MAX_COUNTER_KEYS),
];

/// Counts the keys of one pinned map. Keys that vanish during the walk (the programs
/// delete conntrack entries concurrently) are not counted.
fn count_entries(root: &Path, pin: &str) -> Result<u64, MapError> {
    let data = MapData::from_pin(bpffs::maps_dir(root).join(pin))?;
    fn count<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> u64 {
        keys.filter(Result::is_ok).count() as u64
    }
    Ok(match pin {
        map_names::ROUTES => {
            count(LpmTrie::<_, [u8; 4], RouteValue>::try_from(Map::LpmTrie(data))?.keys())
        }
        map_names::ENDPOINTS => {
            count(HashMap::<_, u32, EndpointValue>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::NODES => {
            count(HashMap::<_, [u8; 4], NodeValue>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::CONNTRACK => {
            count(HashMap::<_, CtKey, CtValue>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::POLICY_IP => {
            count(LpmTrie::<_, PolicyIpKey, u32>::try_from(Map::LpmTrie(data))?.keys())
        }
        map_names::POLICY_PORT => {
            count(LpmTrie::<_, PolicyPortKey, Verdict>::try_from(Map::LpmTrie(data))?.keys())
        }
        map_names::POLICY_IP_EXACT => {
            count(HashMap::<_, PolicyIpKey, u32>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::POLICY_PORT_EXACT => {
            count(HashMap::<_, PolicyPortKey, Verdict>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::FRAGMENTS => count(
            HashMap::<_, dataplane_common::FragKey, u8>::try_from(Map::LruHashMap(data))?.keys(),
        ),
        map_names::POLICY_HITS => {
            count(PerCpuHashMap::<_, PolicyHitKey, u64>::try_from(Map::PerCpuHashMap(data))?.keys())
        }
        map_names::POLICY_RULES => {
            count(HashMap::<_, PolicyRuleKey, PolicyRuleMeta>::try_from(Map::HashMap(data))?.keys())
        }
        map_names::COUNTERS => count(
            PerCpuHashMap::<_, CounterKey, Counters>::try_from(Map::PerCpuHashMap(data))?.keys(),
        ),
        _ => 0,
    })
}

/// The fill level of every map in [`FILLED_MAPS`] under the agent root `root`. A map that
/// cannot be opened has `entries: None` (and the reason is logged at debug level).
pub fn map_fill(root: &Path) -> Vec<MapFill> {
    FILLED_MAPS
        .iter()
        .map(|&(map, pin, max)| MapFill {
            map: map.to_owned(),
            pin: pin.to_owned(),
            entries: count_entries(root, pin)
                .inspect_err(|e| tracing::debug!(map = pin, error = %e, "count map entries"))
                .ok(),
            max_entries: u64::from(max),
        })
        .collect()
}

/// An interface with programs attached through links pinned by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedIface {
    pub ifindex: u32,
    pub name: String,
    /// `ingress`, `egress`: the TC hooks with a pinned link.
    pub hooks: Vec<String>,
}

/// Parses a link pin name `<ifindex>-<ifname>-<ingress|egress>` (as the agent names them).
fn parse_link_pin(pin: &str) -> Option<(u32, &str, &str)> {
    let (ifindex, rest) = pin.split_once('-')?;
    let (iface, direction) = rest.rsplit_once('-')?;
    if !matches!(direction, "ingress" | "egress") || iface.is_empty() {
        return None;
    }
    Some((ifindex.parse().ok()?, iface, direction))
}

/// The interfaces whose links are pinned under `root/links`, by ifindex.
pub fn attached_interfaces(root: &Path) -> std::io::Result<Vec<AttachedIface>> {
    let mut by_ifindex: BTreeMap<(u32, String), Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("links"))? {
        let name = entry?.file_name();
        let Some((ifindex, iface, hook)) = name.to_str().and_then(parse_link_pin) else {
            continue;
        };
        by_ifindex
            .entry((ifindex, iface.to_owned()))
            .or_default()
            .push(hook.to_owned());
    }
    Ok(by_ifindex
        .into_iter()
        .map(|((ifindex, name), mut hooks)| {
            // ingress before egress, as the hooks run for a packet arriving from outside.
            hooks.sort_by_key(|h| h != "ingress");
            AttachedIface {
                ifindex,
                name,
                hooks,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_parse_like_the_agent_writes_them() {
        assert_eq!(
            parse_link_pin("27-cali1a2b3c4d5e6-ingress"),
            Some((27, "cali1a2b3c4d5e6", "ingress"))
        );
        assert_eq!(
            parse_link_pin("3-eth-0-egress"),
            Some((3, "eth-0", "egress"))
        );
        assert_eq!(parse_link_pin("x-eth0-egress"), None);
        assert_eq!(parse_link_pin("3-eth0-sideways"), None);
        assert_eq!(parse_link_pin("3--ingress"), None);
    }

    #[test]
    fn an_unreadable_root_gives_no_counts_but_every_limit() {
        let fill = map_fill(Path::new("/nonexistent/dataplane"));
        assert_eq!(fill.len(), FILLED_MAPS.len());
        assert!(
            fill.iter()
                .all(|f| f.entries.is_none() && f.max_entries > 0)
        );
        assert!(attached_interfaces(Path::new("/nonexistent/dataplane")).is_err());
    }
}

//! Map layouts across agent upgrades and restarts. A pinned map is reused as it is when its
//! layout (type, key and value sizes, entries, flags) is what the embedded object (with the
//! agent's size flags) declares. When it differs — a new build changed a map, or the
//! operator changed `--conntrack-size` — the old pin is set aside before the programs are
//! loaded, a new map is made, and the old map's entries are copied into it when keys and
//! values kept their sizes (conntrack entries included, so established flows keep their
//! state); otherwise the new map starts empty (the agent fills the maps it derives from
//! etcd before any new program is swapped in). Until the swap, the programs still attached
//! keep using the old maps, which the kernel frees once no program holds them.
//!
//! A change in what a map's entries *mean* at the same sizes is invisible to the kernel's
//! layout: each map also has a layout version ([`dataplane_common::layout_version`], bumped
//! by the developer who changes the meaning), recorded with the pins in the pinned hash map
//! `<pin dir>/layout_versions` (map name → version). A version that differs from this
//! build's remakes the map as a size change does, empty (its entries cannot be trusted). A
//! map without a record (pins of a release before versions) is version 1. The record is a
//! pinned map rather than a file because it must live and die with the maps: bpffs holds no
//! regular files, and a file elsewhere (/var/lib) would outlive the pins (a reboot empties
//! bpffs, `dataplane cleanup` or `rm -r` of the pin dir removes them) and then vouch for
//! maps it never saw. It is written after the loader pinned this build's maps, so a crash in
//! between leaves old versions recorded for new maps: the next start remakes them once more,
//! the safe side.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap},
};
use dataplane_common::{
    CounterKey, Counters, CtKey, CtValue, EndpointValue, FragKey, NodeValue, PolicyHitKey,
    PolicyIpKey, PolicyPortKey, PolicyRuleKey, PolicyRuleMeta, RouteValue, Verdict, map_names,
};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("parse the embedded eBPF object: {0}")]
    Parse(#[source] Box<aya_obj::ParseError>),
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("read the layout of pinned map {path}: {source}")]
    Info {
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("set aside pinned map {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("layout versions {path}: {source}")]
    Versions {
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("copy map {map} into its new layout: {source}")]
    Copy {
        map: &'static str,
        source: Box<MapError>,
    },
}

/// What a map looks like to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The layouts `object` declares for `names`, with `max_entries` overridden per map.
pub fn declared(
    object: &[u8],
    names: &[&'static str],
    max_entries: &[(&str, u32)],
) -> Result<StdHashMap<&'static str, Layout>, LayoutError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| LayoutError::Parse(Box::new(e)))?;
    let mut out = StdHashMap::new();
    for &name in names {
        let m = obj.maps.get(name).ok_or(LayoutError::Missing(name))?;
        let max = max_entries
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(m.max_entries(), |&(_, v)| v);
        out.insert(
            name,
            Layout {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: max,
                flags: m.map_flags(),
            },
        );
    }
    Ok(out)
}

fn pinned_layout(path: &Path) -> Result<(MapData, Layout), LayoutError> {
    let err = |source| LayoutError::Info {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(path).map_err(err)?;
    let info = data.info().map_err(err)?;
    let layout = Layout {
        map_type: info.map_type().map_err(err)? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    Ok((data, layout))
}

/// Pinned maps whose layout changed, set aside before the loader runs.
#[derive(Default)]
pub struct Changed {
    /// (map, old map, old layout, new layout, the layout version changed).
    old: Vec<(&'static str, MapData, Layout, Layout, bool)>,
}

/// Where the layout versions are recorded, under the pin directory.
pub const VERSIONS_PIN: &str = "layout_versions";
/// Longest map name the record holds (the object's map names, NUL padded; longer than the
/// kernel's 16-byte map names: `DP_POLICY_PORT_EXACT` is 20).
const NAME_LEN: usize = 32;

type Versions = HashMap<MapData, [u8; NAME_LEN], u32>;

const _: () = {
    let mut i = 0;
    while i < dataplane_common::layout_version::ALL.len() {
        assert!(dataplane_common::layout_version::ALL[i].0.len() <= NAME_LEN);
        i += 1;
    }
};

fn name_key(name: &str) -> [u8; NAME_LEN] {
    let mut k = [0u8; NAME_LEN];
    let n = name.len().min(NAME_LEN);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

fn versions_err(path: &Path) -> impl Fn(MapError) -> LayoutError + '_ {
    move |source| LayoutError::Versions {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

/// The layout versions recorded under the pin directory `root`, by map name (empty when
/// nothing is recorded).
pub fn recorded_versions(root: &Path) -> Result<StdHashMap<String, u32>, LayoutError> {
    let path = root.join(VERSIONS_PIN);
    if !path.exists() {
        return Ok(StdHashMap::new());
    }
    let err = versions_err(&path);
    let map: Versions =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&path).map_err(&err)?)).map_err(&err)?;
    let mut out = StdHashMap::new();
    for (k, v) in map.iter().flatten() {
        let end = k.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        out.insert(String::from_utf8_lossy(&k[..end]).into_owned(), v);
    }
    Ok(out)
}

/// Records `versions` under the pin directory `root`, making the record when absent.
pub fn record_versions(root: &Path, versions: &[(&str, u32)]) -> Result<(), LayoutError> {
    let path = root.join(VERSIONS_PIN);
    let err = versions_err(&path);
    let data = if path.exists() {
        MapData::from_pin(&path).map_err(&err)?
    } else {
        let def = aya_obj::maps::bpf_map_def {
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            key_size: NAME_LEN as u32,
            value_size: 4,
            max_entries: 64,
            ..Default::default()
        };
        let obj = aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
            def,
            inner_def: None,
            section_index: 0,
            section_kind: aya_obj::EbpfSectionKind::Maps,
            symbol_index: None,
            data: Vec::new(),
        });
        let data = MapData::create(obj, "dp_layout_vers", None).map_err(&err)?;
        data.pin(&path).map_err(|e| LayoutError::Versions {
            path: path.clone(),
            source: Box::new(MapError::PinError {
                name: Some(VERSIONS_PIN.to_owned()),
                error: e,
            }),
        })?;
        data
    };
    let mut map: Versions = HashMap::try_from(Map::HashMap(data)).map_err(&err)?;
    for &(name, v) in versions {
        map.insert(name_key(name), v, 0).map_err(&err)?;
    }
    Ok(())
}

/// What became of the maps whose layout changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// (map, entries copied into the new layout).
    pub migrated: Vec<(&'static str, usize)>,
    /// Maps that start empty (their entries could not be carried over).
    pub rebuilt: Vec<&'static str>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.migrated.is_empty() && self.rebuilt.is_empty()
    }

    /// Whether a map the agent derives from etcd starts empty, so it must be filled before
    /// programs that use it are attached.
    pub fn needs_refill(&self) -> bool {
        self.rebuilt.iter().any(|m| {
            matches!(
                *m,
                map_names::ROUTES
                    | map_names::ENDPOINTS
                    | map_names::NODES
                    | map_names::POLICY_IP
                    | map_names::POLICY_IP_EXACT
                    | map_names::POLICY_PORT
                    | map_names::POLICY_PORT_EXACT
            )
        })
    }
}

/// Compares each pinned map under `maps_dir` with its declared layout and its recorded
/// layout version (`recorded`, see [`recorded_versions`]; absent: 1) with this build's
/// (`version`); a map that differs loses its pin (the loader then makes a new one) and is
/// kept open for [`migrate`].
pub fn set_aside_changed(
    maps_dir: &Path,
    declared: &StdHashMap<&'static str, Layout>,
    recorded: &StdHashMap<String, u32>,
    version: impl Fn(&str) -> u32,
) -> Result<Changed, LayoutError> {
    let mut changed = Changed::default();
    for (&name, want) in declared {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let (data, have) = pinned_layout(&path)?;
        let was_version = recorded.get(name).copied().unwrap_or(1);
        let now_version = version(name);
        let meaning = was_version != now_version;
        if have == *want && !meaning {
            continue;
        }
        if meaning {
            warn!(
                map = name,
                was = was_version,
                now = now_version,
                "map layout version changed (the meaning of its entries); the map is remade empty"
            );
        } else {
            warn!(map = name, was = %have, now = %want, "map layout changed; the map is remade");
        }
        std::fs::remove_file(&path).map_err(|source| LayoutError::Unpin {
            path: path.clone(),
            source,
        })?;
        changed.old.push((name, data, have, *want, meaning));
    }
    Ok(changed)
}

fn copy_hash<K: Pod, V: Pod>(
    old: MapData,
    new: MapData,
    wrap: fn(MapData) -> Map,
) -> Result<usize, MapError> {
    let old: HashMap<_, K, V> = HashMap::try_from(wrap(old))?;
    let mut new: HashMap<_, K, V> = HashMap::try_from(wrap(new))?;
    let mut n = 0;
    // Keys deleted while we walk (conntrack) are skipped.
    for (k, v) in old.iter().flatten() {
        new.insert(k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

fn copy_lpm<K: Pod, V: Pod>(old: MapData, new: MapData) -> Result<usize, MapError> {
    let old: LpmTrie<_, K, V> = LpmTrie::try_from(Map::LpmTrie(old))?;
    let mut new: LpmTrie<_, K, V> = LpmTrie::try_from(Map::LpmTrie(new))?;
    let mut n = 0;
    for (k, v) in old.iter().flatten() {
        new.insert(&k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

fn copy_percpu<K: Pod, V: Pod>(old: MapData, new: MapData) -> Result<usize, MapError> {
    let old: PerCpuHashMap<_, K, V> = PerCpuHashMap::try_from(Map::PerCpuHashMap(old))?;
    let mut new: PerCpuHashMap<_, K, V> = PerCpuHashMap::try_from(Map::PerCpuHashMap(new))?;
    let mut n = 0;
    for (k, v) in old.iter().flatten() {
        new.insert(k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

/// An old conntrack map, kept until the new programs are attached: connections the old
/// programs tracked while the new ones were being attached are copied over then.
pub struct CatchUp {
    old: Option<MapData>,
}

impl CatchUp {
    /// Copies the old conntrack entries the new map lacks (never overwriting one the new
    /// programs made). Returns how many.
    pub fn finish(self, maps_dir: &Path) -> usize {
        let Some(old) = self.old else { return 0 };
        let copied = (|| -> Result<usize, MapError> {
            let old: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::HashMap(old))?;
            let new = MapData::from_pin(maps_dir.join(map_names::CONNTRACK))?;
            let mut new: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::HashMap(new))?;
            let mut n = 0;
            for (k, v) in old.iter().flatten() {
                // BPF_NOEXIST: an entry already there is newer.
                if new.insert(k, v, 1).is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        })();
        match copied {
            Ok(n) => {
                if n > 0 {
                    info!(
                        entries = n,
                        "conntrack entries made during the swap carried over"
                    );
                }
                n
            }
            Err(e) => {
                warn!(error = %e, "conntrack catch-up after the swap");
                0
            }
        }
    }
}

/// Copies each set-aside map into the new map the loader pinned in its place, when keys and
/// values kept their sizes (the types are then this build's); the others start empty.
pub fn migrate(maps_dir: &Path, changed: Changed) -> Result<(Report, CatchUp), LayoutError> {
    let mut report = Report::default();
    let mut catch_up = CatchUp { old: None };
    for (name, old, was, now, meaning) in changed.old {
        let carry = !meaning
            && was.map_type == now.map_type
            && was.key_size == now.key_size
            && was.value_size == now.value_size
            && name != map_names::CONFIG;
        if !carry {
            info!(map = name, "map starts empty in its new layout");
            report.rebuilt.push(name);
            continue;
        }
        let new = MapData::from_pin(maps_dir.join(name)).map_err(|e| LayoutError::Copy {
            map: name,
            source: Box::new(e),
        })?;
        if name == map_names::CONNTRACK {
            // A second handle on the old map for the catch-up (it stays alive while the old
            // programs hold it; this keeps it past them).
            let again = old.info().ok().and_then(|i| MapData::from_id(i.id()).ok());
            catch_up.old = again;
        }
        let copied = match name {
            map_names::ROUTES => copy_lpm::<[u8; 4], RouteValue>(old, new),
            map_names::ENDPOINTS => copy_hash::<u32, EndpointValue>(old, new, Map::HashMap),
            map_names::NODES => copy_hash::<[u8; 4], NodeValue>(old, new, Map::HashMap),
            map_names::POLICY_IP => copy_lpm::<PolicyIpKey, u32>(old, new),
            map_names::POLICY_IP_EXACT => copy_hash::<PolicyIpKey, u32>(old, new, Map::HashMap),
            map_names::POLICY_PORT => copy_lpm::<PolicyPortKey, Verdict>(old, new),
            map_names::POLICY_PORT_EXACT => {
                copy_hash::<PolicyPortKey, Verdict>(old, new, Map::HashMap)
            }
            map_names::CONNTRACK => copy_hash::<CtKey, CtValue>(old, new, Map::HashMap),
            map_names::FRAGMENTS => copy_hash::<FragKey, u8>(old, new, Map::LruHashMap),
            map_names::COUNTERS => copy_percpu::<CounterKey, Counters>(old, new),
            map_names::POLICY_HITS => copy_percpu::<PolicyHitKey, u64>(old, new),
            map_names::POLICY_RULES => {
                copy_hash::<PolicyRuleKey, PolicyRuleMeta>(old, new, Map::HashMap)
            }
            _ => Ok(0),
        }
        .map_err(|e| LayoutError::Copy {
            map: name,
            source: Box::new(e),
        })?;
        info!(
            map = name,
            entries = copied,
            "map migrated to its new layout"
        );
        report.migrated.push((name, copied));
    }
    Ok((report, catch_up))
}

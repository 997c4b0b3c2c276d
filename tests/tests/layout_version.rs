//! Map layout changes across agent restarts under load (needs root; BPF mode), on node-1 of
//! a live cluster in a box with policy in force:
//! - the layout versions are recorded with the pins (`<pin dir>/layout_versions`);
//! - a recorded version that differs from this build's (the meaning of the routes map
//!   changed) remakes that map empty, as a size change does;
//! - a map whose value size changed (a pinned endpoints map with a larger value, made with
//!   bpftool) cannot carry its entries: it starts empty;
//! - pins without a record (a release before versions) count as version 1: nothing remade.
//!
//! The remade maps are filled from etcd before the new programs attach: no request of the
//! load fails, no connection resets, no denied probe gets through, and the maps hold the
//! node's routes and endpoints again.

use std::{path::Path, time::Duration};

use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{layout_version, map_names};
use dataplane_tests::{
    Agent, Cluster, PinDirGuard,
    load::{start_load, start_under_policy},
    require_root, wait_ready,
};

type Versions = HashMap<MapData, [u8; 32], u32>;

fn versions(pins: &Path) -> Versions {
    let data = MapData::from_pin(pins.join("layout_versions")).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

fn key(name: &str) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..name.len()].copy_from_slice(name.as_bytes());
    k
}

fn map_id(pins: &Path, name: &str) -> u32 {
    MapData::from_pin(pins.join("maps").join(name))
        .unwrap()
        .info()
        .unwrap()
        .id()
}

/// Stops node 0's agent (its programs stay attached), runs `between`, starts a new one and
/// waits until it is ready. Returns the new agent's log.
fn restart(
    cluster: &Cluster,
    agent: &mut Agent,
    pins: &PinDirGuard,
    between: impl FnOnce(),
) -> String {
    let node = &cluster.nodes[0];
    let st = agent.process.stop(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{}", agent.log_text());
    between();
    *agent = Agent::start(node, pins, cluster.etcd.as_ref(), &[]);
    wait_ready(node, agent, Duration::from_secs(30));
    agent.log_text()
}

#[test]
fn root_layout_versions_and_size_changes_remake_maps_filled_before_the_swap() {
    require_root();
    let (mut d, _servers) = start_under_policy();
    let load = start_load(&d);
    let root = d.pins[0].path.clone();
    let v = versions(&root);
    for (name, want) in layout_version::ALL {
        assert_eq!(v.get(&key(name), 0).unwrap(), want, "{name}");
    }
    let local: Vec<String> = d
        .pods
        .iter()
        .filter(|p| p.node == 0)
        .map(|p| p.ip.to_string())
        .collect();
    assert_eq!(local.len(), 2);
    let holds_local = |kind: &str, d: &dataplane_tests::traffic::Deployment| {
        let dump = d.map_dump(0, kind);
        for ip in &local {
            assert!(dump.contains(ip.as_str()), "{kind}: {ip} missing:\n{dump}");
        }
    };
    holds_local("routes", &d);

    // 1. The routes map's meaning changed: the pins say another version.
    let routes_id = map_id(&root, map_names::ROUTES);
    let ct_id = map_id(&root, map_names::CONNTRACK);
    let log = restart(&d.cluster, &mut d.agents[0], &d.pins[0], || {
        versions(&root)
            .insert(key(map_names::ROUTES), layout_version::ROUTES + 6, 0)
            .unwrap();
    });
    assert!(
        has_line(&log, "map layout version changed", map_names::ROUTES),
        "{log}"
    );
    assert!(
        log.contains("remade maps filled before the programs are swapped in"),
        "{log}"
    );
    assert_ne!(map_id(&root, map_names::ROUTES), routes_id, "routes remade");
    assert_eq!(map_id(&root, map_names::CONNTRACK), ct_id, "conntrack kept");
    assert_eq!(
        versions(&root).get(&key(map_names::ROUTES), 0).unwrap(),
        layout_version::ROUTES,
        "this build's version recorded"
    );
    holds_local("routes", &d);

    // 2. The endpoints map's value grew: its entries cannot be carried over.
    let endpoints = root.join("maps").join(map_names::ENDPOINTS);
    let endpoints_id = map_id(&root, map_names::ENDPOINTS);
    let value = size_of::<dataplane_common::EndpointValue>() + 8;
    let log = restart(&d.cluster, &mut d.agents[0], &d.pins[0], || {
        // The running programs keep the old map; only the pin is replaced.
        std::fs::remove_file(&endpoints).unwrap();
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&endpoints)
            .args([
                "type",
                "hash",
                "key",
                "4",
                "value",
                &value.to_string(),
                "entries",
                &dataplane_common::MAX_ENDPOINTS.to_string(),
                "name",
                "DP_ENDPOINTS",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert!(
        has_line(&log, "map layout changed", map_names::ENDPOINTS),
        "{log}"
    );
    assert!(
        has_line(
            &log,
            "map starts empty in its new layout",
            map_names::ENDPOINTS
        ),
        "{log}"
    );
    assert!(
        log.contains("remade maps filled before the programs are swapped in"),
        "{log}"
    );
    assert_ne!(map_id(&root, map_names::ENDPOINTS), endpoints_id);
    holds_local("endpoints", &d);

    // 3. Pins of a release before versions: no record, everything is version 1.
    let ids: Vec<u32> = map_names_all().iter().map(|m| map_id(&root, m)).collect();
    let log = restart(&d.cluster, &mut d.agents[0], &d.pins[0], || {
        std::fs::remove_file(root.join("layout_versions")).unwrap();
    });
    assert!(!log.contains("the map is remade"), "{log}");
    let after: Vec<u32> = map_names_all().iter().map(|m| map_id(&root, m)).collect();
    assert_eq!(ids, after, "no map remade");
    assert_eq!(versions(&root).get(&key(map_names::NODES), 0).unwrap(), 1);

    let totals = load.finish();
    totals.assert_clean("3 restarts with remade maps");
    // A window with empty maps under the new programs loses packets: a SYN is resent after
    // 1 s (seen when the refill before the swap is switched off: 1.02 s, against 15 ms).
    assert!(
        totals.max_gap < Duration::from_millis(500),
        "longest gap {:?}: pods lost their routes or policy during a swap",
        totals.max_gap
    );
    eprintln!(
        "{} requests, 0 failed, longest gap {:?}, {} denied probes",
        totals.requests, totals.max_gap, totals.probes
    );
    d.agents.clear();
}

/// Whether a line of `log` holds both `a` and `b`.
fn has_line(log: &str, a: &str, b: &str) -> bool {
    log.lines().any(|l| l.contains(a) && l.contains(b))
}

fn map_names_all() -> Vec<&'static str> {
    layout_version::ALL.iter().map(|(n, _)| *n).collect()
}

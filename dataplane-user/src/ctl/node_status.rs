//! `dataplane ctl node status`: every node as etcd knows it (its Node resource, its affine
//! IPAM blocks, its agent's status key), and for the node it runs on, what its pin directory
//! shows (attached interfaces, map fill against the limits).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{CtlError, ds_err};
use crate::{
    datastore::{
        Datastore, Node, NodeStatus,
        keys::{self, Key},
        status::now_ms,
    },
    pinned::{AttachedIface, MapFill},
};

/// The whole report; `-o json` prints it as is (field names are stable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusReport {
    /// etcd's revision when the statuses were read: what the lags are measured against.
    pub etcd_revision: i64,
    /// The node this ran on (its row carries `local`).
    pub this_node: String,
    /// Every node known from a Node resource, a status key or a block affinity, by name.
    pub nodes: Vec<NodeRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    pub this_node: bool,
    /// The host address from the Node resource (e.g. 192.168.1.10); null without one.
    pub address: Option<String>,
    /// The subnet of that address (e.g. 192.168.1.0/24).
    pub subnet: Option<String>,
    /// IPAM blocks affine to the node.
    pub blocks: Vec<String>,
    /// The agent's status key; null when no agent ever reported.
    pub agent: Option<AgentStatus>,
    /// This node only: what its pin directory shows.
    pub local: Option<LocalState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Reported within the last 30 s.
    pub live: bool,
    /// Every change up to this etcd revision is in the node's maps.
    pub revision: i64,
    /// etcd revisions since then (see the command's help on what counts).
    pub lag: i64,
    /// When it last reported, in ms since the Unix epoch, and how long ago that was.
    pub updated_at_ms: u64,
    pub age_ms: u64,
    /// Endpoints whose policy rules do not fit the node's maps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_held: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalState {
    pub bpffs_dir: String,
    /// Why the pin directory could not be read (then the lists are empty).
    pub error: Option<String>,
    pub attached_interfaces: Vec<AttachedIface>,
    pub maps: Vec<MapFill>,
}

/// This node's name when not given: /var/lib/dataplane/nodename, else the hostname (as the
/// CNI plugin finds it).
pub fn default_node_name() -> String {
    crate::cni::local_node_name()
}

/// What the pin directory `root` shows (read directly; the agent need not run).
pub fn local_state(root: &Path) -> LocalState {
    let bpffs_dir = root.display().to_string();
    match crate::pinned::attached_interfaces(root) {
        Ok(attached_interfaces) => LocalState {
            bpffs_dir,
            error: None,
            attached_interfaces,
            maps: crate::pinned::map_fill(root),
        },
        Err(e) => LocalState {
            error: Some(format!("read {}/links: {e}", root.display())),
            bpffs_dir,
            attached_interfaces: Vec::new(),
            maps: Vec::new(),
        },
    }
}

/// Reads everything the report needs from etcd, and the local pins under `bpffs_dir`.
pub async fn node_status(
    ds: &Datastore,
    this_node: &str,
    bpffs_dir: &Path,
) -> Result<NodeStatusReport, CtlError> {
    let (raw_statuses, etcd_revision) = ds
        .snapshot(keys::NODE_STATUS)
        .await
        .map_err(ds_err("read the node statuses".to_owned()))?;
    let mut statuses = BTreeMap::new();
    for raw in raw_statuses {
        match raw.decode::<NodeStatus>() {
            Ok(s) => {
                statuses.insert(s.value.node.clone(), s.value);
            }
            Err(e) => tracing::warn!(key = %raw.key, error = %e, "skipping a corrupt status"),
        }
    }
    let nodes: BTreeMap<String, Node> = ds
        .list::<Node>(keys::NODES)
        .await
        .map_err(ds_err(format!("list {}", keys::NODES)))?
        .into_iter()
        .filter_map(|(key, v)| Some((key.strip_prefix(keys::NODES)?.to_owned(), v.value)))
        .collect();
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in ds
        .list_keys(keys::HOSTS)
        .await
        .map_err(ds_err(format!("list {}", keys::HOSTS)))?
    {
        if let Some(Key::BlockAffinity { node, cidr }) = Key::parse(&key) {
            blocks.entry(node).or_default().push(cidr.to_string());
        }
    }
    let names: BTreeSet<String> = nodes
        .keys()
        .chain(statuses.keys())
        .chain(blocks.keys())
        .cloned()
        .chain(std::iter::once(this_node.to_owned()))
        .collect();
    let now = now_ms();
    let rows = names
        .into_iter()
        .map(|name| {
            let addr = nodes.get(&name).and_then(|n| match n.ipv4_address() {
                Ok(a) => a,
                Err(reason) => {
                    tracing::warn!(node = %name, %reason, "node address");
                    None
                }
            });
            let this = name == this_node;
            NodeRow {
                address: addr.map(|a| a.addr().to_string()),
                subnet: addr.map(|a| a.trunc().to_string()),
                blocks: blocks.remove(&name).unwrap_or_default(),
                agent: statuses.get(&name).map(|s| AgentStatus {
                    live: s.is_live(now),
                    revision: s.revision,
                    lag: (etcd_revision - s.revision).max(0),
                    updated_at_ms: s.updated_at_ms,
                    age_ms: now.saturating_sub(s.updated_at_ms),
                    policy_held: s.policy_held.clone(),
                }),
                local: this.then(|| local_state(bpffs_dir)),
                this_node: this,
                name,
            }
        })
        .collect();
    Ok(NodeStatusReport {
        etcd_revision,
        this_node: this_node.to_owned(),
        nodes: rows,
    })
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn age_text(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

/// The report as aligned tables.
pub fn table(r: &NodeStatusReport) -> String {
    let header = [
        "NODE", "ADDRESS", "SUBNET", "BLOCKS", "AGENT", "REVISION", "LAG", "REPORTED",
    ];
    let rows: Vec<[String; 8]> = r
        .nodes
        .iter()
        .map(|n| {
            let a = n.agent.as_ref();
            [
                if n.this_node {
                    format!("{} *", n.name)
                } else {
                    n.name.clone()
                },
                or_dash(n.address.as_ref()),
                or_dash(n.subnet.as_ref()),
                if n.blocks.is_empty() {
                    "-".to_owned()
                } else {
                    n.blocks.join(",")
                },
                or_dash(a.map(|a| if a.live { "alive" } else { "down" })),
                or_dash(a.map(|a| a.revision)),
                or_dash(a.map(|a| a.lag)),
                or_dash(a.map(|a| age_text(a.age_ms))),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out.push_str(&format!(
        "etcd revision {}; * = this node ({})\n",
        r.etcd_revision, r.this_node
    ));
    for n in &r.nodes {
        let held = n.agent.as_ref().map_or(&[][..], |a| &a.policy_held[..]);
        if !held.is_empty() {
            out.push_str(&format!(
                "\n{}: policy rules that do not fit the maps (not programmed):\n",
                n.name
            ));
            for h in held {
                out.push_str(&format!("  {h}\n"));
            }
        }
    }
    if let Some(local) = r.nodes.iter().find_map(|n| n.local.as_ref()) {
        out.push_str(&format!(
            "\nThis node ({}), pins {}:\n",
            r.this_node, local.bpffs_dir
        ));
        if let Some(e) = &local.error {
            out.push_str(&format!("  not readable: {e}\n"));
            return out;
        }
        out.push_str("  attached interfaces:\n");
        if local.attached_interfaces.is_empty() {
            out.push_str("    none\n");
        }
        let w = local
            .attached_interfaces
            .iter()
            .map(|i| i.name.len())
            .max()
            .unwrap_or(0);
        for i in &local.attached_interfaces {
            out.push_str(&format!(
                "    {:<w$}  ifindex {:<6} {}\n",
                i.name,
                i.ifindex,
                i.hooks.join(", ")
            ));
        }
        out.push_str("  maps:\n");
        out.push_str(&format!(
            "    {:<12} {:>10} {:>10} {:>7}\n",
            "MAP", "ENTRIES", "LIMIT", "FILL"
        ));
        for m in &local.maps {
            out.push_str(&format!(
                "    {:<12} {:>10} {:>10} {:>7}\n",
                m.map,
                or_dash(m.entries),
                m.max_entries,
                or_dash(m.ratio().map(|r| if r > 0.0 && r < 0.001 {
                    "<0.1%".to_owned()
                } else {
                    format!("{:.1}%", r * 100.0)
                })),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> NodeStatusReport {
        NodeStatusReport {
            etcd_revision: 50,
            this_node: "node-1".into(),
            nodes: vec![
                NodeRow {
                    name: "node-1".into(),
                    this_node: true,
                    address: Some("192.168.1.10".into()),
                    subnet: Some("192.168.1.0/24".into()),
                    blocks: vec!["10.65.0.0/26".into()],
                    agent: Some(AgentStatus {
                        live: true,
                        revision: 48,
                        lag: 2,
                        updated_at_ms: 1,
                        age_ms: 3_000,
                        policy_held: Vec::new(),
                    }),
                    local: Some(LocalState {
                        bpffs_dir: "/sys/fs/bpf/dataplane".into(),
                        error: None,
                        attached_interfaces: vec![AttachedIface {
                            ifindex: 2,
                            name: "eth0".into(),
                            hooks: vec!["ingress".into(), "egress".into()],
                        }],
                        maps: vec![MapFill {
                            map: "routes".into(),
                            pin: "DP_ROUTES".into(),
                            entries: Some(4),
                            max_entries: 65536,
                        }],
                    }),
                },
                NodeRow {
                    name: "node-2".into(),
                    this_node: false,
                    address: None,
                    subnet: None,
                    blocks: vec![],
                    agent: None,
                    local: None,
                },
            ],
        }
    }

    #[test]
    fn table_marks_this_node_and_shows_local_state() {
        let t = table(&report());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE "), "{t}");
        assert!(
            lines[1].starts_with("node-1 *")
                && lines[1].contains("192.168.1.0/24")
                && lines[1].contains("alive")
                && lines[1].contains(" 48 ")
                && lines[1].ends_with("3s ago"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("node-2 ") && lines[2].ends_with('-'),
            "{t}"
        );
        assert!(t.contains("eth0  ifindex 2      ingress, egress"), "{t}");
        assert!(t.contains("routes"), "{t}");
        assert!(t.contains("<0.1%"), "{t}");
    }

    #[test]
    fn json_round_trips_with_camel_case_names() {
        let r = report();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["etcdRevision"], 50);
        assert_eq!(v["nodes"][0]["agent"]["updatedAtMs"], 1);
        assert_eq!(
            v["nodes"][0]["local"]["attachedInterfaces"][0]["name"],
            "eth0"
        );
        assert_eq!(v["nodes"][0]["local"]["maps"][0]["maxEntries"], 65536);
        assert!(v["nodes"][1]["agent"].is_null());
        let back: NodeStatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}

//! `dataplane ctl`: apply, get and delete resources in etcd, show the IPAM state and the nodes' status.

pub mod manifest;
pub mod node_status;

use std::{
    io::Read as _,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    datastore::{Datastore, DatastoreError, status::now_ms},
    ipam::{Ipam, IpamConfig, IpamError},
};
use manifest::{KNOWN_KINDS, Kind, ManifestError};

/// How often `apply --wait` reads the node statuses.
const WAIT_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: String,
        source: Box<ManifestError>,
    },
    #[error("{what}: {source}")]
    Datastore {
        what: String,
        source: Box<DatastoreError>,
    },
    #[error("{what}: {source}")]
    Ipam {
        what: String,
        source: Box<IpamError>,
    },
    #[error("unknown kind {0:?} (known: {KNOWN_KINDS})")]
    UnknownKind(String),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("get {kind} {name}: a name needs a namespace (-n), not --all-namespaces")]
    NameWithAllNamespaces { kind: &'static str, name: String },
    /// `apply --wait` ran out of time.
    #[error(
        "not in force after {}s: {lagging} (need revision {revision})",
        timeout.as_secs_f64()
    )]
    NotInForce {
        revision: i64,
        timeout: Duration,
        /// `node-1 at revision 12, node-2 at revision 10`.
        lagging: String,
    },
    #[error("{kind} {name} changed while it was being written; try again")]
    Conflict { kind: &'static str, name: String },
    #[error("format output: {0}")]
    Format(String),
    /// A policy would give some endpoint more rules than the maps hold.
    #[error("{0}; nothing was written")]
    DoesNotFit(String),
}

fn ds_err(what: String) -> impl FnOnce(DatastoreError) -> CtlError {
    move |source| CtlError::Datastore {
        what,
        source: Box::new(source),
    }
}

/// Reads manifests from `path` (`-` for stdin).
pub fn read_manifests(path: &str) -> Result<Vec<manifest::Manifest>, CtlError> {
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|source| CtlError::Read {
        path: path.to_owned(),
        source,
    })?;
    manifest::parse(&text).map_err(|source| CtlError::Manifest {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Refuses `manifests` when a policy among them would make some endpoint's compiled rules
/// exceed `limit` entries (one endpoint direction) or a node's policy maps: the cluster is read
/// from etcd, the manifests applied to it in memory, and every node's endpoints compiled as
/// its agent would. Manifests without a policy are not checked.
pub async fn check_fit(
    ds: &Datastore,
    manifests: &[manifest::Manifest],
    limit: usize,
) -> Result<(), CtlError> {
    let applied: Vec<&manifest::Manifest> = manifests
        .iter()
        .filter(|m| matches!(m.kind, Kind::NetworkPolicy | Kind::GlobalNetworkPolicy))
        .collect();
    if applied.is_empty() {
        return Ok(());
    }
    let (entries, _) = ds.snapshot(crate::sync::PREFIX).await.map_err(ds_err(
        "read the cluster to check that the policies fit".to_owned(),
    ))?;
    let mut model = crate::sync::Model::default();
    for e in &entries {
        model.apply(&e.key, Some(&e.value));
    }
    for m in manifests {
        let v = serde_json::to_vec(&m.value).map_err(|e| CtlError::Format(e.to_string()))?;
        model.apply(&m.key, Some(&v));
    }
    let ours = |name: &str| applied.iter().find(|m| m.display_name() == name).copied();
    for f in model.policy_misfits(limit) {
        let Some(m) = f.policies.iter().find_map(|p| ours(p)) else {
            // Not this apply's doing: the agents report it.
            continue;
        };
        let what = if f.endpoint.is_empty() {
            format!("node {}", f.node)
        } else {
            format!(
                "endpoint {} on node {} ({})",
                f.endpoint, f.node, f.direction
            )
        };
        return Err(CtlError::DoesNotFit(format!(
            "{} {}: {what}: {} (policies: {})",
            m.kind.name(),
            m.display_name(),
            f.reason,
            f.policies.join(", ")
        )));
    }
    Ok(())
}

/// What [`apply`] did to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `NetworkPolicy prod/knp.default.x created` (or `configured`, `unchanged`).
    pub line: String,
    /// The resource's mod revision once written (or as found, when unchanged).
    pub mod_revision: i64,
}

/// Writes every manifest (all validated before the first write), creating or replacing each
/// resource in a transaction on its revision. One [`Applied`] per resource.
pub async fn apply(
    ds: &Datastore,
    manifests: &[manifest::Manifest],
) -> Result<Vec<Applied>, CtlError> {
    let mut out = Vec::new();
    for m in manifests {
        let mut done = None;
        for _ in 0..5 {
            let existing = ds
                .get::<Value>(&m.key)
                .await
                .map_err(ds_err(format!("read {}", m.key)))?;
            let written = match &existing {
                None => ds.create_rev(&m.key, &m.value).await,
                Some(v) if v.value == m.value => {
                    done = Some(("unchanged", v.mod_revision));
                    break;
                }
                Some(v) => ds.update_rev(&m.key, &m.value, v.mod_revision).await,
            }
            .map_err(ds_err(format!("write {}", m.key)))?;
            if let Some(rev) = written {
                let what = if existing.is_some() {
                    "configured"
                } else {
                    "created"
                };
                done = Some((what, rev));
                break;
            }
        }
        let (what, mod_revision) = done.ok_or_else(|| CtlError::Conflict {
            kind: m.kind.name(),
            name: m.display_name(),
        })?;
        out.push(Applied {
            line: format!("{} {} {what}", m.kind.name(), m.display_name()),
            mod_revision,
        });
    }
    Ok(out)
}

/// Waits until every live node reports `revision` or later at its status key (polling every
/// 50 ms), then says on how many nodes and how long it took. No live node: says so and
/// returns. Out of `timeout`: [`CtlError::NotInForce`] naming the nodes behind.
pub async fn wait_in_force(
    ds: &Datastore,
    revision: i64,
    timeout: Duration,
) -> Result<String, CtlError> {
    let start = Instant::now();
    loop {
        let statuses = ds
            .node_statuses()
            .await
            .map_err(ds_err("read the node statuses".to_owned()))?;
        let now = now_ms();
        let live: Vec<_> = statuses.iter().filter(|s| s.is_live(now)).collect();
        if live.is_empty() {
            return Ok("no live nodes report their status: nothing to wait for".to_owned());
        }
        let lagging: Vec<_> = live.iter().filter(|s| s.revision < revision).collect();
        let elapsed = start.elapsed();
        if lagging.is_empty() {
            let n = live.len();
            return Ok(format!(
                "in force on {n} node{} ({} ms)",
                if n == 1 { "" } else { "s" },
                elapsed.as_millis()
            ));
        }
        if elapsed >= timeout {
            let lagging = lagging
                .iter()
                .map(|s| format!("{} at revision {}", s.node, s.revision))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CtlError::NotInForce {
                revision,
                timeout,
                lagging,
            });
        }
        tokio::time::sleep(WAIT_POLL.min(timeout - elapsed)).await;
    }
}

fn parse_kind(kind: &str) -> Result<Kind, CtlError> {
    Kind::parse(kind).ok_or_else(|| CtlError::UnknownKind(kind.to_owned()))
}

/// `<ns>/<name>` for a namespaced kind, `<name>` otherwise.
fn qualified(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

/// The resources of `kind` (one, when `name` is given), as stored. `namespace` is for
/// namespaced kinds: `None` lists every namespace. A NetworkPolicy may be named without its
/// `knp.default.` prefix when only the translated Kubernetes policy has that name.
pub async fn get(
    ds: &Datastore,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
) -> Result<Vec<Value>, CtlError> {
    let kind = parse_kind(kind)?;
    match name {
        Some(name) => {
            let ns = match namespace {
                Some(ns) => ns,
                None if kind.namespaced() => {
                    return Err(CtlError::NameWithAllNamespaces {
                        kind: kind.name(),
                        name: name.to_owned(),
                    });
                }
                None => "",
            };
            for candidate in kind.candidate_names(name) {
                let key = kind.key(ns, &candidate);
                if let Some(v) = ds
                    .get::<Value>(&key)
                    .await
                    .map_err(ds_err(format!("read {key}")))?
                {
                    return Ok(vec![v.value]);
                }
            }
            Err(CtlError::NotFound {
                kind: kind.name(),
                name: qualified(kind, ns, name),
            })
        }
        None => {
            let prefix = kind.prefix(namespace);
            Ok(ds
                .list::<Value>(&prefix)
                .await
                .map_err(ds_err(format!("list {prefix}")))?
                .into_iter()
                .map(|(_, v)| v.value)
                .collect())
        }
    }
}

/// Deletes one resource (`namespace` for namespaced kinds; a NetworkPolicy may be named
/// without its `knp.default.` prefix, as with [`get`]).
pub async fn delete(
    ds: &Datastore,
    kind: &str,
    name: &str,
    namespace: &str,
) -> Result<String, CtlError> {
    let kind = parse_kind(kind)?;
    for candidate in kind.candidate_names(name) {
        let key = kind.key(namespace, &candidate);
        let deleted = ds
            .delete(&key, None)
            .await
            .map_err(ds_err(format!("delete {key}")))?;
        if deleted {
            return Ok(format!(
                "{} {} deleted",
                kind.name(),
                qualified(kind, namespace, &candidate)
            ));
        }
    }
    Err(CtlError::NotFound {
        kind: kind.name(),
        name: qualified(kind, namespace, name),
    })
}

/// Resources printed as YAML (a list when several) or JSON.
pub fn format(items: &[Value], json: bool) -> Result<String, CtlError> {
    let value = if items.len() == 1 {
        items[0].clone()
    } else {
        Value::Array(items.to_vec())
    };
    if json {
        serde_json::to_string_pretty(&value).map_err(|e| CtlError::Format(e.to_string()))
    } else {
        serde_yaml_ng::to_string(&value).map_err(|e| CtlError::Format(e.to_string()))
    }
}

/// `ctl ipam show`: each block with its affinity and use.
pub async fn ipam_show(ds: &Datastore) -> Result<String, CtlError> {
    let blocks = Ipam::new(ds, IpamConfig::default())
        .show()
        .await
        .map_err(|source| CtlError::Ipam {
            what: "read the IPAM blocks".to_owned(),
            source: Box::new(source),
        })?;
    let mut out = format!(
        "{:<20} {:<24} {:>5} {:>5} {:>8}\n",
        "BLOCK", "AFFINITY", "USED", "FREE", "HANDLES"
    );
    for b in &blocks {
        out.push_str(&format!(
            "{:<20} {:<24} {:>5} {:>5} {:>8}\n",
            b.cidr.to_string(),
            b.affinity.as_deref().unwrap_or("-"),
            b.used,
            b.free,
            b.handles
        ));
    }
    let used: usize = blocks.iter().map(|b| b.used).sum();
    let free: usize = blocks.iter().map(|b| b.free).sum();
    out.push_str(&format!(
        "{} blocks, {used} addresses in use, {free} free in claimed blocks\n",
        blocks.len()
    ));
    Ok(out)
}

//! `dataplane ctl`: apply, get and delete resources in etcd, and show the IPAM state.

pub mod manifest;

use std::io::Read as _;

use serde_json::Value;

use crate::{
    datastore::{Datastore, DatastoreError},
    ipam::{Ipam, IpamConfig, IpamError},
};
use manifest::{Kind, ManifestError};

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
    #[error("unknown kind {0:?} (known: ippool, node)")]
    UnknownKind(String),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} changed while it was being written; try again")]
    Conflict { kind: &'static str, name: String },
    #[error("format output: {0}")]
    Format(String),
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

/// Writes every manifest (all validated before the first write), creating or replacing each
/// resource in a transaction on its revision. Returns one line per resource.
pub async fn apply(
    ds: &Datastore,
    manifests: &[manifest::Manifest],
) -> Result<Vec<String>, CtlError> {
    let mut lines = Vec::new();
    for m in manifests {
        let mut done = None;
        for _ in 0..5 {
            let existing = ds
                .get::<Value>(&m.key)
                .await
                .map_err(ds_err(format!("read {}", m.key)))?;
            let written = match &existing {
                None => ds.create(&m.key, &m.value).await,
                Some(v) if v.value == m.value => {
                    done = Some("unchanged");
                    break;
                }
                Some(v) => ds.update(&m.key, &m.value, v.mod_revision).await,
            }
            .map_err(ds_err(format!("write {}", m.key)))?;
            if written {
                done = Some(if existing.is_some() {
                    "configured"
                } else {
                    "created"
                });
                break;
            }
        }
        let what = done.ok_or_else(|| CtlError::Conflict {
            kind: m.kind.name(),
            name: m.name.clone(),
        })?;
        lines.push(format!("{} {} {what}", m.kind.name(), m.name));
    }
    Ok(lines)
}

/// The resources of `kind` (one, when `name` is given), as stored.
pub async fn get(ds: &Datastore, kind: &str, name: Option<&str>) -> Result<Vec<Value>, CtlError> {
    let kind = Kind::parse(kind).ok_or_else(|| CtlError::UnknownKind(kind.to_owned()))?;
    match name {
        Some(name) => {
            let v = ds
                .get::<Value>(&kind.key(name))
                .await
                .map_err(ds_err(format!("read {}", kind.key(name))))?
                .ok_or_else(|| CtlError::NotFound {
                    kind: kind.name(),
                    name: name.to_owned(),
                })?;
            Ok(vec![v.value])
        }
        None => Ok(ds
            .list::<Value>(&kind.prefix())
            .await
            .map_err(ds_err(format!("list {}", kind.prefix())))?
            .into_iter()
            .map(|(_, v)| v.value)
            .collect()),
    }
}

pub async fn delete(ds: &Datastore, kind: &str, name: &str) -> Result<String, CtlError> {
    let kind = Kind::parse(kind).ok_or_else(|| CtlError::UnknownKind(kind.to_owned()))?;
    let key = kind.key(name);
    let deleted = ds
        .delete(&key, None)
        .await
        .map_err(ds_err(format!("delete {key}")))?;
    if deleted {
        Ok(format!("{} {name} deleted", kind.name()))
    } else {
        Err(CtlError::NotFound {
            kind: kind.name(),
            name: name.to_owned(),
        })
    }
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

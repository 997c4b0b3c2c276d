//! What each agent reports at `/dataplane/v1/status/<node>`: the etcd revision up to which
//! its dataplane is in force, and when it last said so. `ctl apply --wait` compares the
//! revisions of what it wrote with those of the live nodes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::keys;

/// A node whose status is older than this is not live (its agent is stopped or stuck).
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);

/// One agent's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    /// Every change up to this etcd revision is in force in the node's maps.
    pub revision: i64,
    /// When the agent wrote this, in ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// Endpoints whose policy rules do not fit the maps (each with why and what it enforces
    /// instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_held: Vec<String>,
}

impl NodeStatus {
    /// The status of `node` at `revision`, stamped now.
    pub fn new(node: &str, revision: i64) -> Self {
        Self {
            node: node.to_owned(),
            revision,
            updated_at_ms: now_ms(),
            policy_held: Vec::new(),
        }
    }

    /// Where it is stored.
    pub fn key(&self) -> String {
        keys::node_status(&self.node)
    }

    /// Updated within [`LIVE_WITHIN`] of `now_ms` (a stamp from the future, a clock ahead of
    /// ours, counts as live).
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.updated_at_ms) <= LIVE_WITHIN.as_millis() as u64
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_is_camel_case_and_liveness_is_30_s() {
        let s = NodeStatus {
            node: "node-1".into(),
            revision: 42,
            updated_at_ms: 1_000_000,
            policy_held: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"node": "node-1", "revision": 42, "updatedAtMs": 1_000_000})
        );
        assert_eq!(s.key(), "/dataplane/v1/status/node-1");
        assert!(s.is_live(1_000_000));
        assert!(s.is_live(1_030_000));
        assert!(!s.is_live(1_030_001));
        assert!(s.is_live(999_000), "a clock ahead of ours");
        let fresh = NodeStatus::new("n", 1);
        assert!(fresh.is_live(now_ms()));
    }
}

//! The agent's Prometheus metrics on `GET /metrics` (text format 0.0.4).
//!
//! Packet counters and map fill levels are read from the pinned maps at scrape time (so
//! they cost nothing between scrapes and are as fresh as the maps); the sync's revisions,
//! reconcile durations and etcd reconnects are kept by the agent as they happen.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `dataplane_packets_total` | iface, hook | packets seen by a program |
//! | `dataplane_bytes_total` | iface, hook | their bytes |
//! | `dataplane_packet_outcomes_total` | iface, hook, outcome | passed, redirected, encapsulated, decapsulated, ct_new, ct_tracked |
//! | `dataplane_drops_total` | iface, hook, reason | drops by reason (a reason appears once it counts) |
//! | `dataplane_map_entries` | map | entries now |
//! | `dataplane_map_max_entries` | map | the map's limit |
//! | `dataplane_attached_interfaces` | | interfaces with programs attached |
//! | `dataplane_sync_revision_programmed` | | etcd revision the maps reflect |
//! | `dataplane_sync_revision_seen` | | latest etcd revision the sync has heard of |
//! | `dataplane_sync_lag_revisions` | | seen − programmed |
//! | `dataplane_reconcile_duration_seconds` | sync=full\|incremental | time of one map reconcile |
//! | `dataplane_etcd_reconnects_total` | | times the sync started over from a fresh list |
//! | `dataplane_etcd_regressions_total` | | times etcd's data went back (older snapshot restored, or wiped) and the sync listed again |
//! | `dataplane_sync_held_endpoints` | | local endpoints etcd lost after a regression, kept while their veths exist |
//! | `dataplane_policy_held_endpoints` | | endpoint directions whose rules do not fit the maps now (previous rules kept, or all denied) |
//! | `dataplane_policy_held_total` | | times an endpoint direction's rules stopped fitting |
//! | `dataplane_ready` | | 1 when `/readiness` says ready |
//! | `dataplane_cni_operation_duration_seconds` | command, result=ok\|<CNI error code> | time of one CNI plugin operation on this node, as the plugin reports it ([`crate::cni_metrics`]) |

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use dataplane_common::{counter, hook};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::health::Health;

type SyncLabel = [(&'static str, &'static str); 1];
type CniLabels = [(&'static str, String); 2];

/// The agent's metrics: what it records as it goes, and a collector that reads the maps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile: Family<SyncLabel, Histogram>,
    reconnects: Counter,
    regressions: Counter,
    held: Gauge,
    cni: Family<CniLabels, Histogram>,
    programmed: Gauge,
    seen: Gauge,
    held_now: Gauge,
    held_total: Counter,
    /// The held endpoints, one line each, for the node status.
    policy_held_list: std::sync::Mutex<Vec<String>>,
}

fn cni_histogram() -> Histogram {
    // 5 ms … 30 s: a DEL of a gone pod up to an ADD that waits (10 s by default) for its
    // policy to be in force.
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

fn reconcile_histogram() -> Histogram {
    // 100 µs … 26 s: an incremental update of one pod up to a full list of a large cluster.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl Metrics {
    /// Metrics of the agent whose pins are under `root`.
    pub fn new(root: &Path, health: Arc<Health>) -> Self {
        let mut registry = Registry::default();
        let reconcile =
            Family::<SyncLabel, Histogram>::new_with_constructor(reconcile_histogram as fn() -> _);
        let reconnects = Counter::default();
        let regressions = Counter::default();
        let held = Gauge::default();
        let cni = Family::<CniLabels, Histogram>::new_with_constructor(cni_histogram as fn() -> _);
        registry.register(
            "dataplane_cni_operation_duration_seconds",
            "Time of one CNI plugin operation on this node (command ADD, DEL, CHECK, STATUS, GC, VERSION; result ok or the CNI error code), as the plugin reports it",
            cni.clone(),
        );
        registry.register(
            "dataplane_etcd_regressions",
            "Times etcd answered from a history older than the maps (restored from an older snapshot, or wiped and recreated) and the sync listed everything again",
            regressions.clone(),
        );
        registry.register(
            "dataplane_sync_held_endpoints",
            "Local endpoints etcd lost when its data went back, kept while their veths exist",
            held.clone(),
        );
        let programmed = Gauge::default();
        let seen = Gauge::default();
        let held_now = Gauge::default();
        let held_total = Counter::default();
        registry.register(
            "dataplane_policy_held_endpoints",
            "Endpoint directions whose policy rules do not fit the maps now (their previous rules stay in force, or all is denied)",
            held_now.clone(),
        );
        registry.register(
            "dataplane_policy_held",
            "Times an endpoint direction's policy rules stopped fitting the maps",
            held_total.clone(),
        );
        registry.register(
            "dataplane_reconcile_duration_seconds",
            "Time to bring the maps to what etcd says, per reconcile (sync=full: after a list, incremental: after watch events)",
            reconcile.clone(),
        );
        registry.register(
            "dataplane_etcd_reconnects",
            "Times the datastore sync started over from a fresh list (etcd lost, watch closed or compacted)",
            reconnects.clone(),
        );
        registry.register(
            "dataplane_sync_revision_programmed",
            "etcd revision up to which every change is programmed into the maps",
            programmed.clone(),
        );
        registry.register(
            "dataplane_sync_revision_seen",
            "Latest etcd revision the sync has received",
            seen.clone(),
        );
        registry.register_collector(Box::new(Scraped {
            root: root.to_owned(),
            health,
            programmed: programmed.clone(),
            seen: seen.clone(),
        }));
        Self {
            registry,
            reconcile,
            reconnects,
            regressions,
            held,
            cni,
            programmed,
            seen,
            held_now,
            held_total,
            policy_held_list: std::sync::Mutex::default(),
        }
    }

    /// After a reconcile: `newly` endpoint directions stopped fitting, `held` are all those
    /// that do not fit now.
    pub fn policy_held(&self, newly: usize, held: Vec<String>) {
        self.held_total.inc_by(newly as u64);
        self.held_now.set(held.len() as i64);
        *self
            .policy_held_list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = held;
    }

    /// The endpoints held at the last reconcile.
    pub fn policy_held_list(&self) -> Vec<String> {
        self.policy_held_list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn reconciled(&self, full: bool, took: Duration) {
        let sync = if full { "full" } else { "incremental" };
        self.reconcile
            .get_or_create(&[("sync", sync)])
            .observe(took.as_secs_f64());
    }

    pub fn etcd_reconnect(&self) {
        self.reconnects.inc();
    }

    /// etcd's history went back: counted, and the revision seen starts over (it only grows
    /// otherwise).
    pub fn etcd_regressed(&self) {
        self.regressions.inc();
        self.seen.set(0);
    }

    /// One CNI operation `command` ended with `result` after `seconds`.
    pub fn cni_operation(&self, command: &'static str, result: String, seconds: f64) {
        self.cni
            .get_or_create(&[("command", command.to_owned()), ("result", result)])
            .observe(seconds);
    }

    pub fn held_endpoints(&self, n: usize) {
        self.held.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn revision_programmed(&self, revision: i64) {
        self.programmed.set(revision);
    }

    pub fn revision_seen(&self, revision: i64) {
        if revision > self.seen.get() {
            self.seen.set(revision);
        }
    }

    /// Everything, in the Prometheus text format. Reads the maps: call off the async
    /// threads.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// What is read at scrape time.
#[derive(Debug)]
struct Scraped {
    root: PathBuf,
    health: Arc<Health>,
    programmed: Gauge,
    seen: Gauge,
}

/// Outcome slots reported as `dataplane_packet_outcomes_total{outcome=…}`.
const OUTCOMES: &[(usize, &str)] = &[
    (counter::PASSED, "passed"),
    (counter::REDIRECTED, "redirected"),
    (counter::ENCAPSULATED, "encapsulated"),
    (counter::DECAPSULATED, "decapsulated"),
    (counter::CT_NEW, "ct_new"),
    (counter::CT_TRACKED, "ct_tracked"),
];

impl Scraped {
    fn encode_counters(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match crate::maps::read_counters(&self.root) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: counters not read");
                return Ok(());
            }
        };
        let rows: Vec<(String, &str, &dataplane_common::Counters)> = counters
            .iter()
            .map(|(&(ifindex, h), c)| {
                let iface = crate::dump::iface_name(ifindex)
                    .unwrap_or_else(|| format!("ifindex:{ifindex}"));
                (iface, hook::name(h), c)
            })
            .collect();
        for (name, help, slot) in [
            (
                "dataplane_packets",
                "Packets seen by a program, per interface and hook",
                counter::PACKETS,
            ),
            (
                "dataplane_bytes",
                "Bytes of the packets seen by a program, per interface and hook",
                counter::BYTES,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (iface, h, c) in &rows {
                let labels = [("iface", iface.as_str()), ("hook", *h)];
                ConstCounter::new(c.values[slot]).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dataplane_packet_outcomes",
            "What the programs did with the packets, per interface and hook",
            None,
            MetricType::Counter,
        )?;
        for (iface, h, c) in &rows {
            for &(slot, outcome) in OUTCOMES {
                let labels = [
                    ("iface", iface.as_str()),
                    ("hook", *h),
                    ("outcome", outcome),
                ];
                ConstCounter::new(c.values[slot]).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dataplane_drops",
            "Packets dropped, per interface, hook and reason (a reason is listed once it counts)",
            None,
            MetricType::Counter,
        )?;
        for (iface, h, c) in &rows {
            for &(slot, name) in counter::NAMES {
                if slot < counter::DROP_BASE || c.values[slot] == 0 {
                    continue;
                }
                let reason = name.trim_start_matches("drop_");
                let labels = [("iface", iface.as_str()), ("hook", *h), ("reason", reason)];
                ConstCounter::new(c.values[slot]).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_maps(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let fill = crate::pinned::map_fill(&self.root);
        let mut m = enc.encode_descriptor(
            "dataplane_map_entries",
            "Entries in a pinned map now",
            None,
            MetricType::Gauge,
        )?;
        for f in &fill {
            if let Some(n) = f.entries {
                ConstGauge::new(n).encode(m.encode_family(&[("map", f.map.as_str())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dataplane_map_max_entries",
            "The limit of a pinned map (its max_entries)",
            None,
            MetricType::Gauge,
        )?;
        for f in &fill {
            ConstGauge::new(f.max_entries).encode(m.encode_family(&[("map", f.map.as_str())])?)?;
        }
        match crate::pinned::attached_interfaces(&self.root) {
            Ok(ifaces) => ConstGauge::new(ifaces.len() as u64).encode(enc.encode_descriptor(
                "dataplane_attached_interfaces",
                "Interfaces with the programs attached (pinned links)",
                None,
                MetricType::Gauge,
            )?)?,
            Err(e) => tracing::debug!(error = %e, "metrics: link pins not read"),
        }
        Ok(())
    }
}

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_counters(&mut enc)?;
        self.encode_maps(&mut enc)?;
        let lag = (self.seen.get() - self.programmed.get()).max(0);
        ConstGauge::new(lag).encode(enc.encode_descriptor(
            "dataplane_sync_lag_revisions",
            "etcd revisions received but not yet programmed into the maps",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(self.health.is_ready())).encode(enc.encode_descriptor(
            "dataplane_ready",
            "1 when the agent reports ready (attached, synced, etcd reachable within the grace)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// `GET /metrics`; any other path is 404.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(text)) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics not encoded");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics not encoded\n").into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics task failed\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_without_maps_still_encode() {
        let health = Arc::new(Health::new(true, Duration::from_secs(30)));
        let m = Metrics::new(Path::new("/nonexistent/dataplane"), health);
        m.reconciled(true, Duration::from_millis(3));
        m.reconciled(false, Duration::from_micros(50));
        m.etcd_reconnect();
        m.revision_seen(12);
        m.revision_programmed(10);
        m.revision_seen(11);
        let text = m.encode().unwrap();
        for line in [
            "# TYPE dataplane_reconcile_duration_seconds histogram",
            "dataplane_reconcile_duration_seconds_count{sync=\"full\"} 1",
            "dataplane_reconcile_duration_seconds_count{sync=\"incremental\"} 1",
            "dataplane_etcd_reconnects_total 1",
            "dataplane_etcd_regressions_total 0",
            "dataplane_sync_held_endpoints 0",
            "dataplane_sync_revision_programmed 10",
            "dataplane_sync_revision_seen 12",
            "dataplane_sync_lag_revisions 2",
            "dataplane_map_max_entries{map=\"routes\"} 65536",
            "dataplane_ready 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(
            !text.contains("dataplane_map_entries{"),
            "no counts without maps"
        );
    }
}

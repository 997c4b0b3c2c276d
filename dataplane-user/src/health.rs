//! The agent's health as Kubernetes probes see it: `GET /liveness` answers 200 while the
//! agent's loops run, `GET /readiness` 200 once its programs are attached and (with etcd)
//! the first full sync is in the maps, and 503 again while etcd has been unreachable for
//! longer than a grace period. Reading them changes nothing.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::metrics::Metrics;

/// How long etcd may be unreachable before the agent reports itself not ready.
pub const DEFAULT_READINESS_GRACE: Duration = Duration::from_secs(30);
/// How often the agent's loop proves it runs.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Liveness fails when the agent's loop has not run for this long (well above any pause
/// a busy start-up or a slow attach causes, so a probe never kills a working agent).
pub const LIVENESS_STALE: Duration = Duration::from_secs(30);

/// What the probes report, updated by the agent's loop and by the datastore sync.
#[derive(Debug)]
pub struct Health {
    /// With etcd, readiness waits for the first sync; without, attached is enough.
    uses_etcd: bool,
    grace: Duration,
    heartbeat: Mutex<Instant>,
    attached: AtomicBool,
    synced: AtomicBool,
    /// Since when etcd has failed the sync; `None` while it answers.
    etcd_down_since: Mutex<Option<Instant>>,
}

impl Health {
    pub fn new(uses_etcd: bool, grace: Duration) -> Self {
        Self {
            uses_etcd,
            grace,
            heartbeat: Mutex::new(Instant::now()),
            attached: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            etcd_down_since: Mutex::new(None),
        }
    }

    /// The agent's loop ran just now.
    pub fn beat(&self) {
        *self
            .heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// The programs are on the host NIC and on the pod interfaces present at start.
    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }

    /// A full list from etcd is programmed into the maps (first time or after a reconnect).
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
        self.etcd_reachable();
    }

    pub fn etcd_reachable(&self) {
        *self
            .etcd_down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// etcd failed a request or dropped the watch; the grace period starts at the first
    /// failure of a run of them.
    pub fn etcd_unreachable(&self) {
        self.etcd_down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(Instant::now);
    }

    /// `Ok` while the loop runs, else why not.
    pub fn liveness(&self) -> Result<(), String> {
        let idle = self
            .heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if idle > LIVENESS_STALE {
            return Err(format!(
                "the agent's loop has not run for {:.0}s",
                idle.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// `Ok` when the node's dataplane is programmed and current, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("programs not attached yet".to_owned());
        }
        if !self.uses_etcd {
            return Ok(());
        }
        if !self.synced.load(Ordering::Relaxed) {
            return Err("waiting for the first sync from etcd".to_owned());
        }
        let down = *self
            .etcd_down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match down.map(|since| since.elapsed()) {
            Some(d) if d > self.grace => Err(format!(
                "etcd unreachable for {:.1}s (grace {}s)",
                d.as_secs_f64(),
                self.grace.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    /// Ready, for the metrics.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

/// What the datastore sync reports as it goes, to the probes and the metrics.
#[derive(Clone, Debug)]
pub struct SyncObserver {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

impl SyncObserver {
    /// etcd answered with data up to `revision`.
    pub fn seen(&self, revision: i64) {
        self.etcd_reachable();
        self.metrics.revision_seen(revision);
    }

    /// One `MapWriter::apply` took `took`; `full` for the apply of a complete list.
    pub fn applied(&self, full: bool, took: Duration) {
        self.metrics.reconciled(full, took);
        if full {
            self.health.set_synced();
        }
    }

    /// After a reconcile: see [`Metrics::policy_held`].
    pub fn policy_held(&self, newly: usize, held: Vec<String>) {
        self.metrics.policy_held(newly, held);
    }

    /// The maps hold everything up to `revision`.
    pub fn programmed(&self, revision: i64) {
        self.metrics.revision_programmed(revision);
    }

    pub fn etcd_reachable(&self) {
        self.health.etcd_reachable();
    }

    pub fn etcd_unreachable(&self) {
        self.health.etcd_unreachable();
    }

    /// The sync starts over from a fresh list (after an error or a closed watch).
    pub fn restarting(&self) {
        self.metrics.etcd_reconnect();
    }
}

/// `/liveness` and `/readiness`; any other path is 404.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/liveness", get(liveness))
        .route("/readiness", get(readiness))
        .with_state(health)
}

fn reply(r: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not {ok}: {why}\n"),
        ),
    }
}

async fn liveness(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    reply(h.liveness(), "live")
}

async fn readiness(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    reply(h.readiness(), "ready")
}

/// Serves `router` on `listener` until the task is dropped; a failure is logged (the
/// dataplane goes on without its endpoints rather than stopping).
pub async fn serve(what: &'static str, listener: tokio::net::TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(what, error = %e, "HTTP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_attach_then_sync_and_tolerates_etcd_loss_for_the_grace() {
        let h = Health::new(true, Duration::from_millis(50));
        assert!(h.readiness().unwrap_err().contains("not attached"));
        h.set_attached();
        assert!(h.readiness().unwrap_err().contains("first sync"));
        h.etcd_unreachable();
        h.set_synced();
        assert_eq!(h.readiness(), Ok(()));
        h.etcd_unreachable();
        assert_eq!(h.readiness(), Ok(()), "within the grace");
        std::thread::sleep(Duration::from_millis(60));
        h.etcd_unreachable();
        assert!(
            h.readiness().unwrap_err().contains("etcd unreachable"),
            "the grace runs from the first failure"
        );
        h.etcd_reachable();
        assert_eq!(h.readiness(), Ok(()));
        assert_eq!(h.liveness(), Ok(()));
    }

    #[test]
    fn without_etcd_attached_is_ready() {
        let h = Health::new(false, DEFAULT_READINESS_GRACE);
        assert!(!h.is_ready());
        h.set_attached();
        assert!(h.is_ready());
    }
}

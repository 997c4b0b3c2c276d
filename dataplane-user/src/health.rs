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

use std::future::Future as _;

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

    /// etcd's data went back (restored, or wiped and recreated); the sync lists again.
    pub fn regressed(&self) {
        self.metrics.etcd_regressed();
    }

    /// `n` local endpoints are held although etcd lost them.
    pub fn held(&self, n: usize) {
        self.metrics.held_endpoints(n);
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

/// Connections one listener serves at a time; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one connection may last: a probe or a scrape takes milliseconds, so this only
/// ends idle, slow or half-sent ones (which would otherwise hold a descriptor and a buffer
/// of the agent's for ever).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until the task is dropped, at most [`MAX_CONNECTIONS`] at
/// a time, each closed after [`CONNECTION_LIFETIME`]: whoever can reach the port cannot
/// exhaust the agent's descriptors or memory. A failure is logged (the dataplane goes on
/// without its endpoints rather than stopping).
pub async fn serve(what: &'static str, listener: tokio::net::TcpListener, router: Router) {
    let capped = Capped {
        inner: listener,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(capped, router).await {
        tracing::error!(what, error = %e, "HTTP server stopped");
    }
}

/// A listener that accepts only while fewer than its slots' count of connections are open.
struct Capped {
    inner: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for Capped {
    type Io = Bounded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                // Never closed; wait rather than spin if it were.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let end = Box::pin(tokio::time::sleep(CONNECTION_LIFETIME));
                    return (
                        Bounded {
                            io,
                            end,
                            _slot: slot,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little, as axum does.
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that fails its reads and writes once its lifetime is over (so the
/// server closes it) and frees its slot when dropped.
struct Bounded {
    io: tokio::net::TcpStream,
    end: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Bounded {
    /// Err once the lifetime is over; otherwise arms the wake-up for that moment.
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        match self.end.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection lifetime over",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

impl tokio::io::AsyncRead for Bounded {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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

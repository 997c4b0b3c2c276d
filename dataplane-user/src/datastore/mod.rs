//! The etcd v3 datastore with Calico's key layout ([`keys`]) and resources ([`resources`]).
//!
//! Values are JSON. Reads return the key's mod revision ([`Versioned`]); every write that can
//! race is a transaction on it ([`Datastore::create`], [`Datastore::update`],
//! [`Datastore::delete`]) that reports a lost race as `Ok(false)`, for the caller to re-read
//! and retry ([`retry_on_conflict`]). Errors name the operation, the key and the endpoints,
//! and tell "etcd is unreachable or slow, try again" ([`DatastoreError::is_unavailable`])
//! from "the value at this key is corrupt" and everything else.

pub mod k8s;
pub mod keys;
pub mod policy;
pub mod resources;
pub mod status;

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    TlsOptions, Txn, TxnOp, TxnResponse, WatchOptions,
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{debug, warn};

pub use k8s::K8sPod;
pub use resources::{
    DEFAULT_POOL_NAME, DefaultPoolOptions, EndpointPort, IpPool, IpPoolSpec, IpipMode, Node,
    NodeBgpSpec, NodeSpec, ObjectMeta, Pool, Profile, ProfileSpec, VxlanMode, WorkloadEndpoint,
    WorkloadEndpointArgs, WorkloadEndpointSpec,
};
pub use status::NodeStatus;

/// How many keys one range request returns when listing a prefix.
const LIST_PAGE: i64 = 500;
/// How much of a corrupt value an error quotes.
const QUOTE_MAX: usize = 120;

/// Where etcd is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// CA bundle (PEM) that signed the server certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Both the connect timeout and the timeout of each request.
    pub timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("etcd configuration: {0}")]
    Config(String),
    #[error("watch of {prefix} lost (compacted at revision {compact_revision}); re-list")]
    WatchLost {
        prefix: String,
        compact_revision: i64,
    },
    #[error("read the etcd {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connect to etcd at {endpoints}: {}", describe(error))]
    Connect {
        endpoints: String,
        error: etcd_client::Error,
    },
    /// etcd could not be reached or refused for now (no leader, too many requests): worth
    /// trying again later.
    #[error("{op} {key}: etcd at {endpoints} is unavailable: {}", describe(error))]
    Unavailable {
        op: &'static str,
        key: String,
        endpoints: String,
        error: etcd_client::Error,
    },
    #[error("{op} {key}: etcd at {endpoints} did not answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        endpoints: String,
        timeout: Duration,
    },
    #[error("{op} {key} in etcd at {endpoints}: {}", describe(error))]
    Etcd {
        op: &'static str,
        key: String,
        endpoints: String,
        error: etcd_client::Error,
    },
    /// The value stored at `key` is not what this key holds.
    #[error("corrupt value at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("encode the value for {key}: {source}")]
    Encode {
        key: String,
        source: serde_json::Error,
    },
    /// A read-modify-write lost the race on `key` this many times in a row.
    #[error("update {key}: still conflicting with other writers after {attempts} attempts")]
    Conflict { key: String, attempts: u32 },
    #[error("IPPool {name} is invalid: {reason}")]
    InvalidPool { name: String, reason: String },
}

impl DatastoreError {
    /// etcd is unreachable, timed out, or said "not now": the operation may succeed if tried
    /// again (CNI error code 11, "try again later").
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::Timeout { .. } => true,
            Self::Connect { error, .. } => etcd_unavailable(error),
            _ => false,
        }
    }

    /// The value at some key is corrupt (the key is in the error).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Self::Corrupt { .. })
    }

    /// A corrupt value at `key`, quoting the start of `value`.
    pub fn corrupt(key: &str, reason: impl std::fmt::Display, value: &[u8]) -> Self {
        let text = String::from_utf8_lossy(value);
        let quoted: String = text.chars().take(QUOTE_MAX).collect();
        let ellipsis = if text.chars().count() > QUOTE_MAX {
            "…"
        } else {
            ""
        };
        Self::Corrupt {
            key: key.to_owned(),
            reason: format!("{reason} (value: {quoted:?}{ellipsis})"),
        }
    }
}

/// Whether an etcd client error means "could not reach etcd, or etcd said try later".
fn etcd_unavailable(e: &etcd_client::Error) -> bool {
    // gRPC status codes (tonic is not a direct dependency): Cancelled (1) is what tonic makes
    // of its own request timeout, DeadlineExceeded (4), ResourceExhausted (8) is etcd's "too
    // many requests", Unavailable (14) covers connection refused and etcd's "no leader".
    const RETRYABLE: [i32; 4] = [1, 4, 8, 14];
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => RETRYABLE.contains(&(s.code() as i32)),
        _ => false,
    }
}

/// An etcd client error in one line: the gRPC status message and the root cause ("tcp
/// connect error: Connection refused (os error 111)", "etcdserver: no leader") rather than the
/// client's debug dump of the status. (The error is kept in the variant, not as its `source`,
/// so that error chains do not print the dump after all.)
fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut cause): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::GRpcStatus(s) => (s.message().to_owned(), std::error::Error::source(s)),
        other => (other.to_string(), None),
    };
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    if let Some(root) = root {
        let root = root.to_string();
        if !text.contains(&root) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&root);
        }
    }
    text
}

/// A value and the mod revision it was read at (what [`Datastore::update`] and
/// [`Datastore::delete`] compare against).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// One raw key-value pair as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

impl RawValue {
    /// Decodes the JSON value; a value that is not a `T` is [`DatastoreError::Corrupt`].
    pub fn decode<T: DeserializeOwned>(&self) -> Result<Versioned<T>, DatastoreError> {
        decode(&self.key, &self.value, self.mod_revision)
    }
}

fn decode<T: DeserializeOwned>(
    key: &str,
    value: &[u8],
    mod_revision: i64,
) -> Result<Versioned<T>, DatastoreError> {
    serde_json::from_slice(value)
        .map(|value| Versioned {
            value,
            mod_revision,
        })
        .map_err(|e| DatastoreError::corrupt(key, e, value))
}

fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, DatastoreError> {
    serde_json::to_vec(value).map_err(|source| DatastoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

/// Which etcd cluster answered and how far its history went: a response's header. A cluster
/// restored from a snapshot or wiped and recreated shows itself by a revision lower than one
/// it answered before (or, when its members were made anew, another cluster id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EtcdHeader {
    pub cluster_id: u64,
    pub revision: i64,
}

impl EtcdHeader {
    fn of(h: Option<&etcd_client::ResponseHeader>) -> Self {
        h.map_or_else(Self::default, |h| Self {
            cluster_id: h.cluster_id(),
            revision: h.revision(),
        })
    }
}

/// The revision a one-put transaction wrote at (its header's revision), `None` when its
/// condition failed.
fn written_at(resp: TxnResponse) -> Option<i64> {
    resp.succeeded()
        .then(|| resp.header().map_or(0, |h| h.revision()))
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): to the end of the keyspace.
    vec![0]
}

/// A current-thread runtime with I/O and timers, for synchronous callers (the CNI plugin,
/// tests) that run datastore calls with `block_on`. Make it on the thread, and so in the
/// network namespace, whose sockets should reach etcd.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `attempt` until it returns `Ok(Some(_))`, at most `attempts` times. `Ok(None)` means
/// "lost a race on `key`, re-read and try again": the next attempt comes after a short random
/// pause, growing with each loss, so that writers contending for one key spread out. After the
/// last loss: [`DatastoreError::Conflict`] naming `key`.
pub async fn retry_on_conflict<T, F, Fut, E>(
    key: &str,
    attempts: u32,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
    E: From<DatastoreError>,
{
    for n in 0..attempts {
        if let Some(done) = attempt().await? {
            return Ok(done);
        }
        debug!(key, attempt = n + 1, "conflict; retrying");
        tokio::time::sleep(backoff(n)).await;
    }
    Err(DatastoreError::Conflict {
        key: key.to_owned(),
        attempts,
    }
    .into())
}

/// A random pause in [0, 2^min(n, 5)] ms plus 100 µs·n: small first, up to ~35 ms.
pub(crate) fn backoff(n: u32) -> Duration {
    let cap_us = 1000u64 << n.min(5);
    Duration::from_micros(random_u64() % (cap_us + 1) + 100 * u64::from(n.min(50)))
}

/// A random number without a crate: std's hasher keys are seeded randomly per thread and
/// advanced on every `RandomState::new()`.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
}

/// One change under a watched prefix: the new value, or `None` for a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// An open watch (see [`Datastore::watch`]).
pub struct Watch {
    stream: etcd_client::WatchStream,
    prefix: String,
    endpoints: String,
    cluster_id: u64,
}

impl Watch {
    /// The next batch of events, with the revision they bring the watcher to. `Ok(None)` when
    /// etcd closed the stream.
    pub async fn next(&mut self) -> Result<Option<(Vec<WatchEvent>, i64)>, DatastoreError> {
        let resp = match self.stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Ok(None),
            Err(error) => {
                return Err(DatastoreError::Unavailable {
                    op: "watch",
                    key: self.prefix.clone(),
                    endpoints: self.endpoints.clone(),
                    error,
                });
            }
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(DatastoreError::WatchLost {
                prefix: self.prefix.clone(),
                compact_revision: resp.compact_revision(),
            });
        }
        let header = EtcdHeader::of(resp.header());
        let revision = header.revision;
        if header.cluster_id != 0 {
            self.cluster_id = header.cluster_id;
        }
        let events = resp
            .events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                let key = kv.key_str().ok()?.to_owned();
                let value = match e.event_type() {
                    etcd_client::EventType::Put => Some(kv.value().to_vec()),
                    etcd_client::EventType::Delete => None,
                };
                Some(WatchEvent {
                    key,
                    value,
                    mod_revision: kv.mod_revision(),
                })
            })
            .collect();
        Ok(Some((events, revision)))
    }

    /// The cluster id of the last response (0 before the first).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }
}

/// A connection to etcd. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Datastore {
    /// One client per endpoint: a request goes to the member that answered last and moves
    /// on to the next when that one cannot be reached (the client's own balancing sends
    /// requests to a dead member as readily as to a live one).
    clients: Vec<Client>,
    /// Index of the member that answered last.
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    endpoints: String,
    timeout: Duration,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, DatastoreError> {
    std::fs::read(path).map_err(|source| DatastoreError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Checks the endpoints against the TLS settings and builds the connect options. With TLS
/// files every endpoint must be `https://`: no silent fallback to plaintext.
fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, DatastoreError> {
    if cfg.endpoints.is_empty() {
        return Err(DatastoreError::Config("no etcd endpoints".to_owned()));
    }
    if cfg.timeout.is_zero() {
        return Err(DatastoreError::Config("the timeout is zero".to_owned()));
    }
    let tls_files = cfg.ca_file.is_some() || cfg.cert_file.is_some() || cfg.key_file.is_some();
    for ep in &cfg.endpoints {
        let https = ep.starts_with("https://");
        if !https && !ep.starts_with("http://") {
            return Err(DatastoreError::Config(format!(
                "endpoint {ep:?} has no scheme: write http://{ep} or https://{ep}"
            )));
        }
        if tls_files && !https {
            return Err(DatastoreError::Config(format!(
                "endpoint {ep} is plaintext but TLS files are given: use https://"
            )));
        }
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.timeout)
        .with_timeout(cfg.timeout);
    if tls_files {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem("CA file", ca)?));
        }
        match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read_pem("client certificate", cert)?,
                    read_pem("client key", key)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(DatastoreError::Config(
                    "a client certificate is given without its key file".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(DatastoreError::Config(
                    "a client key is given without its certificate file".to_owned(),
                ));
            }
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

impl Datastore {
    /// Makes the client. The connection itself is made by the first request (so an etcd that
    /// is down shows up there, as [`DatastoreError::is_unavailable`]), with `cfg.timeout` to
    /// connect and for each request.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, DatastoreError> {
        let opts = connect_options(cfg)?;
        let endpoints = cfg.endpoints.join(",");
        let mut clients = Vec::with_capacity(cfg.endpoints.len());
        for endpoint in &cfg.endpoints {
            let client =
                tokio::time::timeout(cfg.timeout, Client::connect([endpoint], Some(opts.clone())))
                    .await
                    .map_err(|_| DatastoreError::Timeout {
                        op: "connect to",
                        key: "etcd".to_owned(),
                        endpoints: endpoints.clone(),
                        timeout: cfg.timeout,
                    })?
                    .map_err(|error| DatastoreError::Connect {
                        endpoints: endpoints.clone(),
                        error,
                    })?;
            clients.push(client);
        }
        Ok(Self {
            clients,
            preferred: Default::default(),
            endpoints,
            timeout: cfg.timeout,
        })
    }

    /// The endpoints, comma separated, as errors name them.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs the request `f` makes with a member's client: first the member that answered
    /// last, then each other one while they cannot be reached. Errors name `op` and `key`.
    /// (A write retried on another member after a timeout is safe: writes that race are
    /// transactions on a mod revision, the others put the same value again.)
    async fn call<T, Fut>(
        &self,
        op: &'static str,
        key: &str,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, DatastoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.clients.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut result = Err(DatastoreError::Config("no etcd endpoints".to_owned()));
        for k in 0..n {
            let i = (first + k) % n;
            result = self.call_one(op, key, f(self.clients[i].clone())).await;
            match &result {
                Err(e) if e.is_unavailable() => {
                    debug!(op, key, member = i, error = %e, "etcd member unreachable; trying the next");
                }
                _ => {
                    self.preferred.store(i, Ordering::Relaxed);
                    break;
                }
            }
        }
        result
    }

    /// Runs one request with the request timeout, mapping errors to name `op` and `key`.
    async fn call_one<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DatastoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(DatastoreError::Timeout {
                op,
                key: key.to_owned(),
                endpoints: self.endpoints.clone(),
                timeout: self.timeout,
            }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => {
                let key = key.to_owned();
                let endpoints = self.endpoints.clone();
                Err(if etcd_unavailable(&error) {
                    DatastoreError::Unavailable {
                        op,
                        key,
                        endpoints,
                        error,
                    }
                } else {
                    DatastoreError::Etcd {
                        op,
                        key,
                        endpoints,
                        error,
                    }
                })
            }
        }
    }

    /// Runs a transaction; `key` is what errors name (the main key of the transaction).
    pub(crate) async fn txn(
        &self,
        op: &'static str,
        key: &str,
        txn: Txn,
    ) -> Result<TxnResponse, DatastoreError> {
        self.call(op, key, |c| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        })
        .await
    }

    /// The raw value at `key` and its mod revision.
    pub async fn get_raw(&self, key: &str) -> Result<Option<RawValue>, DatastoreError> {
        let resp = self
            .call(
                "get",
                key,
                |c| async move { c.kv_client().get(key, None).await },
            )
            .await?;
        Ok(resp.kvs().first().map(|kv| RawValue {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Writes `value` at `key` unconditionally (for values nothing else writes, and tests).
    pub async fn put_raw(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), DatastoreError> {
        self.put_raw_rev(key, value).await.map(|_| ())
    }

    /// Writes `key` and returns the revision of the write (its mod revision).
    pub async fn put_raw_rev(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<i64, DatastoreError> {
        Ok(self.put_raw_header(key, value).await?.revision)
    }

    /// Writes `key` and returns the response's header (the revision is the write's).
    pub async fn put_raw_header(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<EtcdHeader, DatastoreError> {
        let value: Vec<u8> = value.into();
        let resp = self
            .call("put", key, |c| {
                let value = value.clone();
                async move { c.kv_client().put(key, value, None).await }
            })
            .await?;
        Ok(EtcdHeader::of(resp.header()))
    }

    /// The raw value at `key` (if any) and the response's header.
    pub async fn get_raw_header(
        &self,
        key: &str,
    ) -> Result<(Option<RawValue>, EtcdHeader), DatastoreError> {
        let resp = self
            .call(
                "get",
                key,
                |c| async move { c.kv_client().get(key, None).await },
            )
            .await?;
        let value = resp.kvs().first().map(|kv| RawValue {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        });
        Ok((value, EtcdHeader::of(resp.header())))
    }

    /// Every key under `prefix` with its raw value, in key order, read at one revision
    /// (page by page).
    pub async fn list_raw(&self, prefix: &str) -> Result<Vec<RawValue>, DatastoreError> {
        self.range(prefix, false).await
    }

    /// Every key under `prefix`, in order.
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, DatastoreError> {
        Ok(self
            .range(prefix, true)
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect())
    }

    async fn range(&self, prefix: &str, keys_only: bool) -> Result<Vec<RawValue>, DatastoreError> {
        Ok(self.range_at(prefix, keys_only).await?.0)
    }

    /// Everything under `prefix` at one revision, and that revision: the starting point of a
    /// watch that misses nothing ([`Datastore::watch`] from `revision + 1`).
    pub async fn snapshot(&self, prefix: &str) -> Result<(Vec<RawValue>, i64), DatastoreError> {
        let (v, h) = self.range_at(prefix, false).await?;
        Ok((v, h.revision))
    }

    /// [`Datastore::snapshot`] with the header of the first page (the cluster that answered).
    pub async fn snapshot_header(
        &self,
        prefix: &str,
    ) -> Result<(Vec<RawValue>, EtcdHeader), DatastoreError> {
        self.range_at(prefix, false).await
    }

    /// Watches every key under `prefix` from `from_revision` on. Events come in batches (one
    /// per etcd response); a compacted start revision or a cancelled watch is an error, after
    /// which the caller re-lists.
    pub async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, DatastoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision)
            .with_progress_notify();
        let stream = self
            .call("watch", prefix, |c| {
                let opts = opts.clone();
                async move { c.watch_client().watch(prefix, Some(opts)).await }
            })
            .await?;
        Ok(Watch {
            stream,
            prefix: prefix.to_owned(),
            endpoints: self.endpoints.clone(),
            cluster_id: 0,
        })
    }

    async fn range_at(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<(Vec<RawValue>, EtcdHeader), DatastoreError> {
        let end = prefix_end(prefix);
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut header = EtcdHeader::default();
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE)
                .with_revision(revision);
            if keys_only {
                opts = opts.with_keys_only();
            }
            let resp = self
                .call("list", prefix, |c| {
                    let (start, opts) = (start.clone(), opts.clone());
                    async move { c.kv_client().get(start, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                header = EtcdHeader::of(resp.header());
                revision = header.revision;
            }
            for kv in resp.kvs() {
                let Ok(key) = kv.key_str() else {
                    warn!(prefix, key = ?String::from_utf8_lossy(kv.key()), "skipping a key that is not UTF-8");
                    continue;
                };
                out.push(RawValue {
                    key: key.to_owned(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                });
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, header)),
            }
        }
    }

    /// The JSON value at `key` and its mod revision; `None` when absent. A value that is not
    /// a `T` is [`DatastoreError::Corrupt`] naming the key.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, DatastoreError> {
        self.get_raw(key).await?.map(|raw| raw.decode()).transpose()
    }

    /// Every value under `prefix` with its key. A corrupt value is logged with its key and
    /// skipped, so one bad entry does not hide the rest.
    pub async fn list<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned<T>)>, DatastoreError> {
        Ok(self
            .list_raw(prefix)
            .await?
            .into_iter()
            .filter_map(|raw| match raw.decode() {
                Ok(v) => Some((raw.key, v)),
                Err(e) => {
                    warn!(key = %raw.key, error = %e, "skipping a corrupt value");
                    None
                }
            })
            .collect())
    }

    /// Creates `key` with `value` if it does not exist (a transaction on its create
    /// revision); `false` when it already exists.
    pub async fn create<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<bool, DatastoreError> {
        Ok(self.create_rev(key, value).await?.is_some())
    }

    /// [`Datastore::create`], returning the revision of the write (the key's new mod
    /// revision), `None` when the key already exists.
    pub async fn create_rev<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Option<i64>, DatastoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, encode(key, value)?, None)]);
        Ok(written_at(self.txn("create", key, txn).await?))
    }

    /// Replaces `key` with `value` if its mod revision is still `mod_revision`; `false` on a
    /// conflict (changed or deleted since it was read).
    pub async fn update<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        mod_revision: i64,
    ) -> Result<bool, DatastoreError> {
        Ok(self.update_rev(key, value, mod_revision).await?.is_some())
    }

    /// [`Datastore::update`], returning the revision of the write, `None` on a conflict.
    pub async fn update_rev<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        mod_revision: i64,
    ) -> Result<Option<i64>, DatastoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, encode(key, value)?, None)]);
        Ok(written_at(self.txn("update", key, txn).await?))
    }

    /// Writes `value` at `key` whatever is there.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), DatastoreError> {
        self.put_raw(key, encode(key, value)?).await
    }

    /// Deletes `key`: unconditionally with `None`, else only at that mod revision. `true`
    /// when something was deleted.
    pub async fn delete(
        &self,
        key: &str,
        mod_revision: Option<i64>,
    ) -> Result<bool, DatastoreError> {
        match mod_revision {
            None => {
                let resp = self
                    .call("delete", key, |c| async move {
                        c.kv_client().delete(key, None::<DeleteOptions>).await
                    })
                    .await?;
                Ok(resp.deleted() > 0)
            }
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key, None)]);
                Ok(self.txn("delete", key, txn).await?.succeeded())
            }
        }
    }

    /// Every IPv4 pool, checked: an invalid one is an error naming it (IPv6 pools are
    /// skipped: this IPAM is IPv4 only).
    pub async fn ip_pools(&self) -> Result<Vec<Pool>, DatastoreError> {
        let mut pools = Vec::new();
        for raw in self.list_raw(keys::IP_POOLS).await? {
            let pool: IpPool = raw.decode()?.value;
            let name = keys::Key::parse(&raw.key)
                .and_then(|k| match k {
                    keys::Key::IpPool(name) => Some(name),
                    _ => None,
                })
                .unwrap_or_else(|| pool.name().to_owned());
            match pool.validate() {
                Ok(Some(mut p)) => {
                    // The key is the name Calico goes by.
                    p.name = name;
                    pools.push(p);
                }
                Ok(None) => debug!(pool = %name, "skipping an IPv6 pool"),
                Err(reason) => return Err(DatastoreError::InvalidPool { name, reason }),
            }
        }
        Ok(pools)
    }

    /// Creates `default-ipv4-ippool` from `opts` when no IP pool exists at all, as Calico does
    /// on first start. Race-safe: the create is a transaction that holds only while the pool
    /// prefix is empty, so concurrent callers make one pool. `true` when this call made it.
    pub async fn ensure_default_pool(
        &self,
        opts: &DefaultPoolOptions,
    ) -> Result<bool, DatastoreError> {
        if !self.list_keys(keys::IP_POOLS).await?.is_empty() {
            return Ok(false);
        }
        let pool = opts.to_pool();
        pool.validate()
            .map_err(|reason| DatastoreError::InvalidPool {
                name: DEFAULT_POOL_NAME.to_owned(),
                reason,
            })?;
        let key = keys::ip_pool(DEFAULT_POOL_NAME);
        // A range compare holds for every key in the range, and for none: "no pool at all".
        let txn = Txn::new()
            .when([Compare::create_revision(keys::IP_POOLS, CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::put(key.as_str(), encode(&key, &pool)?, None)]);
        let created = self.txn("create", &key, txn).await?.succeeded();
        if created {
            debug!(cidr = %opts.cidr, "created the default IP pool");
        }
        Ok(created)
    }

    pub async fn get_node(&self, name: &str) -> Result<Option<Node>, DatastoreError> {
        Ok(self.get(&keys::node(name)).await?.map(|v| v.value))
    }

    /// Writes the Node (a node registering itself; read-modify-writes use
    /// [`Datastore::update`]).
    pub async fn put_node(&self, node: &Node) -> Result<(), DatastoreError> {
        self.put(&keys::node(node.name()), node).await
    }

    pub async fn get_workload_endpoint(
        &self,
        key: &str,
    ) -> Result<Option<WorkloadEndpoint>, DatastoreError> {
        Ok(self.get(key).await?.map(|v| v.value))
    }

    /// Writes the endpoint at its key ([`WorkloadEndpoint::key`]), replacing what is there:
    /// the newest ADD of a pod owns its endpoint.
    /// Writes the endpoint; returns the revision of the write.
    pub async fn put_workload_endpoint(
        &self,
        wep: &WorkloadEndpoint,
    ) -> Result<i64, DatastoreError> {
        let key = wep.key();
        self.put_raw_rev(&key, encode(&key, wep)?).await
    }

    /// Deletes the endpoint at `key` only if it belongs to `container_id` (a transaction on
    /// the revision read), so the DEL of an old container never removes its successor's
    /// endpoint. `true` when deleted; `false` when absent or someone else's.
    pub async fn delete_workload_endpoint_if(
        &self,
        key: &str,
        container_id: &str,
    ) -> Result<bool, DatastoreError> {
        retry_on_conflict(key, 10, || async {
            let Some(wep) = self.get::<WorkloadEndpoint>(key).await? else {
                return Ok(Some(false));
            };
            if wep.value.container_id() != container_id {
                return Ok(Some(false));
            }
            Ok(self
                .delete(key, Some(wep.mod_revision))
                .await?
                .then_some(true))
        })
        .await
    }

    /// The endpoints on `node` with their keys (corrupt ones are logged and skipped).
    pub async fn list_workload_endpoints(
        &self,
        node: &str,
    ) -> Result<Vec<(String, WorkloadEndpoint)>, DatastoreError> {
        Ok(self
            .list::<WorkloadEndpoint>(keys::WORKLOAD_ENDPOINTS)
            .await?
            .into_iter()
            .filter(|(_, w)| w.value.node() == node)
            .map(|(k, w)| (k, w.value))
            .collect())
    }

    /// Reports an agent's progress at its status key.
    /// Writes `status`; returns the response's header.
    pub async fn put_node_status(&self, status: &NodeStatus) -> Result<EtcdHeader, DatastoreError> {
        let key = status.key();
        self.put_raw_header(&key, encode(&key, status)?).await
    }

    /// Every node's status (corrupt ones are logged and skipped), in node order.
    pub async fn node_statuses(&self) -> Result<Vec<NodeStatus>, DatastoreError> {
        Ok(self
            .list::<NodeStatus>(keys::NODE_STATUS)
            .await?
            .into_iter()
            .map(|(_, v)| v.value)
            .collect())
    }

    /// The pod `namespace/name` as `ctl apply` stored it.
    pub async fn get_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<K8sPod>, DatastoreError> {
        Ok(self
            .get(&keys::pod(namespace, name))
            .await?
            .map(|v| v.value))
    }

    /// The profile `name` (`kns.<namespace>` for a namespace's labels).
    pub async fn get_profile(&self, name: &str) -> Result<Option<Profile>, DatastoreError> {
        Ok(self.get(&keys::profile(name)).await?.map(|v| v.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: &str, timeout_ms: u64) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![endpoint.to_owned()],
            timeout: Duration::from_millis(timeout_ms),
            ..EtcdConfig::default()
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/calico/a/"), b"/calico/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn tls_never_falls_back_to_plaintext() {
        let mut c = cfg("http://10.0.0.1:2379", 1000);
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = connect_options(&c).unwrap_err();
        assert!(
            e.to_string()
                .contains("endpoint http://10.0.0.1:2379 is plaintext but TLS files are given"),
            "{e}"
        );
        c.endpoints = vec!["https://10.0.0.1:2379".into()];
        let e = connect_options(&c).unwrap_err();
        assert!(
            e.to_string()
                .contains("read the etcd CA file /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempdir();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not really a pem").unwrap();
        c.ca_file = Some(ca.clone());
        c.cert_file = Some(ca);
        let e = connect_options(&c).unwrap_err();
        assert!(e.to_string().contains("without its key file"), "{e}");
        let e = connect_options(&cfg("10.0.0.1:2379", 1000)).unwrap_err();
        assert!(e.to_string().contains("has no scheme"), "{e}");
        let e = connect_options(&EtcdConfig {
            endpoints: vec![],
            ..EtcdConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no etcd endpoints"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dp-ds-{}-{}", std::process::id(), random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn refused_connection_is_unavailable_and_names_key_and_endpoint() {
        let rt = runtime().unwrap();
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let ds = rt
            .block_on(Datastore::connect(&cfg("http://127.0.0.1:1", 2000)))
            .unwrap();
        let t = std::time::Instant::now();
        let e = rt
            .block_on(ds.get::<serde_json::Value>("/calico/x"))
            .unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("/calico/x") && msg.contains("http://127.0.0.1:1"),
            "{msg}"
        );
        // At once, not after the 2 s timeout.
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert!(
            msg.ends_with("tcp connect error: Connection refused (os error 111)"),
            "{msg}"
        );
    }

    #[test]
    fn silent_server_times_out_as_unavailable() {
        // A listener that accepts and never speaks HTTP/2: the request must time out.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = std::thread::spawn(move || {
            let conn = listener.accept();
            std::thread::sleep(Duration::from_millis(800));
            drop(conn);
        });
        let rt = runtime().unwrap();
        let ds = rt
            .block_on(Datastore::connect(&cfg(&format!("http://{addr}"), 300)))
            .unwrap();
        let t = std::time::Instant::now();
        let e = rt.block_on(ds.list_keys("/calico/ipam/")).unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        assert!(e.to_string().contains("/calico/ipam/"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
        hold.join().unwrap();
    }

    #[test]
    fn corrupt_values_quote_the_value_and_name_the_key() {
        let e = decode::<resources::IpPool>("/calico/k", b"{not json", 3).unwrap_err();
        assert!(e.is_corrupt() && !e.is_unavailable());
        let msg = e.to_string();
        assert!(msg.starts_with("corrupt value at /calico/k: "), "{msg}");
        assert!(msg.contains("{not json"), "{msg}");
        let long = vec![b'x'; 500];
        let msg = decode::<u32>("/k", &long, 1).unwrap_err().to_string();
        assert!(msg.ends_with("\"…)") && msg.len() < 300, "{msg}");
    }

    #[test]
    fn backoff_is_bounded() {
        for n in 0..100 {
            assert!(backoff(n) <= Duration::from_micros(32_000 + 5_000));
        }
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn datastore_futures_are_send() {
        fn send<T: Send>(_: T) {}
        let rt = runtime().unwrap();
        let ds = rt
            .block_on(Datastore::connect(&cfg("http://127.0.0.1:1", 100)))
            .unwrap();
        send(ds.get::<serde_json::Value>("/k"));
        send(ds.ensure_default_pool(&DefaultPoolOptions::default()));
        send(ds.delete_workload_endpoint_if("/k", "c"));
    }
}

//! Steady traffic for soak tests: servers in pods, and client loops that run on their own
//! threads (inside a pod's namespace) until stopped, counting every request, byte, failure
//! and reset. A request that errors or takes longer than its timeout is a failed request; a
//! probe toward a denied port that connects is a policy violation.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

use crate::{netns::Netns, traffic::Deployment};

/// Echo port for request/response (persistent connections and one connection per request).
pub const RR_PORT: u16 = 7100;
/// Sink of the long stream.
pub const STREAM_PORT: u16 = 7200;
/// A port the test's policy denies; an echo server listens there so a leak would connect.
pub const PROBE_PORT: u16 = 7300;
/// A port opened by a policy change (convergence measurements); an echo server listens.
pub const EXTRA_PORT: u16 = 7400;

/// Size of one request and of its echo.
const REQUEST: usize = 32;

/// Spawns a thread that enters `ns` and runs `f` there (sockets it makes stay in `ns`).
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = ns.path();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter netns {path:?}: {e}"));
            f()
        })
        .unwrap()
}

fn listen(port: u16) -> TcpListener {
    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .unwrap_or_else(|e| panic!("listen on {port}: {e}"));
    l.set_nonblocking(true).unwrap();
    l
}

/// Echo servers on [`RR_PORT`], [`PROBE_PORT`] and [`EXTRA_PORT`] (a thread per connection,
/// any number of requests per connection) and a byte-counting sink on [`STREAM_PORT`], in
/// one pod's namespace. Stopped on drop.
pub struct LoadServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Bytes the sink received, over all its connections.
    pub sunk: Arc<AtomicU64>,
    /// Sink connections that ended in an error (a reset) rather than an orderly close.
    pub sink_errors: Arc<AtomicU64>,
}

impl LoadServer {
    pub fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sunk = Arc::new(AtomicU64::new(0));
        let sink_errors = Arc::new(AtomicU64::new(0));
        let (echo, sink) = ns.run(|| {
            (
                [RR_PORT, PROBE_PORT, EXTRA_PORT].map(listen),
                listen(STREAM_PORT),
            )
        });
        let mut threads = Vec::new();
        for l in echo {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                accept_loop(&l, &stop, echo_conn);
            }));
        }
        {
            let (stop, sunk, errors) = (stop.clone(), sunk.clone(), sink_errors.clone());
            threads.push(std::thread::spawn(move || {
                accept_loop(&sink, &stop, move |c, stop| {
                    sink_conn(c, stop, &sunk, &errors);
                });
            }));
        }
        Self {
            stop,
            threads,
            sunk,
            sink_errors,
        }
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _joined = t.join();
        }
    }
}

/// Accepts until `stop`, serving each connection on its own thread with `serve`.
fn accept_loop(
    l: &TcpListener,
    stop: &Arc<AtomicBool>,
    serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + Clone + 'static,
) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let (stop, serve) = (stop.clone(), serve.clone());
                conns.push(std::thread::spawn(move || serve(c, &stop)));
                conns.retain(|t| !t.is_finished());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for t in conns {
        let _joined = t.join();
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn echo_conn(mut c: TcpStream, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if timed_out(&e) => {}
            Err(_) => return,
        }
    }
}

fn sink_conn(mut c: TcpStream, stop: &AtomicBool, sunk: &AtomicU64, errors: &AtomicU64) {
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if timed_out(&e) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// What one client loop counted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered in time (for a stream: chunks written; for a probe: attempts).
    pub ok: AtomicU64,
    /// Requests that failed or timed out.
    pub failed: AtomicU64,
    /// Connections reset or broken under an established flow.
    pub resets: AtomicU64,
    /// Denied probes that got through.
    pub violations: AtomicU64,
    /// Bytes written (the stream).
    pub bytes: AtomicU64,
    /// Longest time between two answered requests, µs.
    pub max_gap_us: AtomicU64,
    /// Slowest answered request, µs.
    pub max_latency_us: AtomicU64,
    /// The first few failures, for the panic message.
    pub errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, what: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// The kinds of client loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Requests on one long-lived connection (conntrack's established path).
    Rr,
    /// A new connection per request (policy and conntrack creation every time).
    Crr,
    /// One connection writing without pause (must never reset).
    Stream,
    /// Connection attempts to a denied port (must never connect).
    DeniedProbe,
}

/// One client loop's name, kind and figures.
pub struct Client {
    pub name: String,
    pub kind: Kind,
    pub stats: Arc<Stats>,
}

/// Client loops running until [`Load::finish`] (or drop).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub clients: Vec<Client>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Pause between two requests of one loop.
    pub pace: Duration,
}

impl Default for Load {
    fn default() -> Self {
        Self::new(Duration::from_secs(2), Duration::from_millis(5))
    }
}

impl Load {
    pub fn new(timeout: Duration, pace: Duration) -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            clients: Vec::new(),
            timeout,
            pace,
        }
    }

    /// Starts a `kind` loop from a pod namespace `from` toward `to` (its port follows from
    /// the kind).
    pub fn spawn(&mut self, name: &str, kind: Kind, from: &Netns, to: Ipv4Addr) {
        let port = match kind {
            Kind::Rr | Kind::Crr => RR_PORT,
            Kind::Stream => STREAM_PORT,
            Kind::DeniedProbe => PROBE_PORT,
        };
        self.spawn_to_port(name, kind, from, to, port);
    }

    /// The same toward another port of the load servers (their echo ports: [`RR_PORT`],
    /// [`PROBE_PORT`], [`EXTRA_PORT`]).
    pub fn spawn_to_port(&mut self, name: &str, kind: Kind, from: &Netns, to: Ipv4Addr, port: u16) {
        let stats = Arc::new(Stats::default());
        let addr = SocketAddr::from((to, port));
        let (stop, s, timeout, pace) = (self.stop.clone(), stats.clone(), self.timeout, self.pace);
        let t = spawn_in(from, name, move || match kind {
            Kind::Rr => rr_loop(addr, &stop, &s, timeout, pace, true),
            Kind::Crr => rr_loop(addr, &stop, &s, timeout, pace, false),
            Kind::Stream => stream_loop(addr, &stop, &s, timeout),
            Kind::DeniedProbe => probe_loop(addr, &stop, &s, pace),
        });
        self.threads.push(t);
        self.clients.push(Client {
            name: name.to_owned(),
            kind,
            stats,
        });
    }

    /// Waits until every request/response and stream loop has had `n` successes (the load
    /// is flowing before the test disturbs it); panics after `timeout`.
    pub fn wait_flowing(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for c in self.clients.iter().filter(|c| c.kind != Kind::DeniedProbe) {
            while c.stats.ok.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "{} not flowing after {timeout:?}: {:?}",
                    c.name,
                    c.stats
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops every loop and returns the totals.
    pub fn finish(mut self) -> Totals {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let sum = |kinds: &[Kind], f: fn(&Stats) -> u64| -> u64 {
            self.clients
                .iter()
                .filter(|c| kinds.contains(&c.kind))
                .map(|c| f(&c.stats))
                .sum()
        };
        fn load(a: &AtomicU64) -> u64 {
            a.load(Ordering::Relaxed)
        }
        let rr = [Kind::Rr, Kind::Crr];
        let mut errors = Vec::new();
        for c in &self.clients {
            for e in c.stats.errors.lock().unwrap().iter() {
                errors.push(format!("{}: {e}", c.name));
            }
        }
        Totals {
            requests: sum(&rr, |s| load(&s.ok)),
            failed: sum(&rr, |s| load(&s.failed)),
            resets: sum(&[Kind::Rr, Kind::Crr, Kind::Stream], |s| load(&s.resets)),
            stream_bytes: sum(&[Kind::Stream], |s| load(&s.bytes)),
            probes: sum(&[Kind::DeniedProbe], |s| load(&s.ok)),
            violations: sum(&[Kind::DeniedProbe], |s| load(&s.violations)),
            max_gap: Duration::from_micros(
                self.clients
                    .iter()
                    .filter(|c| c.kind != Kind::DeniedProbe)
                    .map(|c| load(&c.stats.max_gap_us))
                    .max()
                    .unwrap_or(0),
            ),
            max_latency: Duration::from_micros(
                self.clients
                    .iter()
                    .filter(|c| rr.contains(&c.kind))
                    .map(|c| load(&c.stats.max_latency_us))
                    .max()
                    .unwrap_or(0),
            ),
            errors,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _joined = t.join();
        }
    }
}

/// The figures of a finished [`Load`].
#[derive(Debug)]
pub struct Totals {
    /// Requests answered in time (request/response and connection-per-request loops).
    pub requests: u64,
    pub failed: u64,
    pub resets: u64,
    pub stream_bytes: u64,
    /// Denied probe attempts, and how many got through.
    pub probes: u64,
    pub violations: u64,
    /// Longest pause between two answers of any loop (stream: two writes).
    pub max_gap: Duration,
    pub max_latency: Duration,
    /// The first failures of each loop.
    pub errors: Vec<String>,
}

impl Totals {
    /// Panics unless nothing failed, reset or leaked.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.failed == 0 && self.resets == 0 && self.violations == 0,
            "{what}: {} failed requests, {} resets, {} violations: {:#?}",
            self.failed,
            self.resets,
            self.violations,
            self.errors
        );
        assert!(self.requests > 0 && self.stream_bytes > 0 && self.probes > 0);
    }
}

fn record_max(a: &AtomicU64, v: Duration) {
    a.fetch_max(v.as_micros() as u64, Ordering::Relaxed);
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let c = TcpStream::connect_timeout(&addr, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// A broken established connection: reset, aborted or a pipe closed under us.
fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}

/// Request/response: `persistent` keeps one connection (a new one after a failure), else
/// one connection per request.
fn rr_loop(
    addr: SocketAddr,
    stop: &AtomicBool,
    s: &Stats,
    timeout: Duration,
    pace: Duration,
    persistent: bool,
) {
    let mut conn: Option<TcpStream> = None;
    let mut last_ok = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let started = Instant::now();
        let result = (|| -> Result<(), (bool, String)> {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn
                    .insert(connect(addr, timeout).map_err(|e| (false, format!("connect: {e}")))?),
            };
            let mut req = [0u8; REQUEST];
            req[..8].copy_from_slice(&seq.to_be_bytes());
            c.write_all(&req)
                .map_err(|e| (is_reset(&e), format!("write #{seq}: {e}")))?;
            let mut resp = [0u8; REQUEST];
            c.read_exact(&mut resp)
                .map_err(|e| (is_reset(&e), format!("read #{seq}: {e}")))?;
            if resp != req {
                return Err((false, format!("answer #{seq} is not the request")));
            }
            Ok(())
        })();
        let took = started.elapsed();
        match result {
            Ok(()) if took <= timeout => {
                s.ok.fetch_add(1, Ordering::Relaxed);
                record_max(&s.max_latency_us, took);
                record_max(&s.max_gap_us, last_ok.elapsed());
                last_ok = Instant::now();
            }
            Ok(()) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                s.error(format!("request #{seq} took {took:?}"));
            }
            Err((reset, e)) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                if reset {
                    s.resets.fetch_add(1, Ordering::Relaxed);
                }
                s.error(format!("{e} (after {took:?})"));
                conn = None;
            }
        }
        if !persistent {
            conn = None;
        }
        std::thread::sleep(pace);
    }
}

/// Writes 16 KiB chunks as fast as the other side takes them (bounded, so the loop shares
/// the CPUs); an error ends the stream as a reset.
fn stream_loop(addr: SocketAddr, stop: &AtomicBool, s: &Stats, timeout: Duration) {
    let mut c = match connect(addr, timeout) {
        Ok(c) => c,
        Err(e) => {
            s.resets.fetch_add(1, Ordering::Relaxed);
            s.error(format!("stream connect: {e}"));
            return;
        }
    };
    let chunk = vec![0x5au8; 16 << 10];
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match c.write_all(&chunk) {
            Ok(()) => {
                s.ok.fetch_add(1, Ordering::Relaxed);
                s.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                record_max(&s.max_gap_us, last_ok.elapsed());
                last_ok = Instant::now();
            }
            Err(e) => {
                s.resets.fetch_add(1, Ordering::Relaxed);
                s.error(format!(
                    "stream broke after {} bytes: {e}",
                    s.bytes.load(Ordering::Relaxed)
                ));
                return;
            }
        }
        // At most about 16 MB/s: a long stream, not a CPU hog.
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Err(e) = c.shutdown(std::net::Shutdown::Write) {
        s.resets.fetch_add(1, Ordering::Relaxed);
        s.error(format!("stream close: {e}"));
    }
}

/// Tries to connect to a denied port, again and again; each connection that opens is a
/// violation.
fn probe_loop(addr: SocketAddr, stop: &AtomicBool, s: &Stats, pace: Duration) {
    while !stop.load(Ordering::Relaxed) {
        s.ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            s.violations.fetch_add(1, Ordering::Relaxed);
            s.error(format!("connected to {addr} through the deny policy"));
            drop(c);
        }
        std::thread::sleep(pace);
    }
}

/// Whether a TCP echo to `to`:`port` from `ns` answers within `timeout`.
pub fn echo_ok(ns: &Netns, to: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    ns.run(|| {
        let Ok(mut c) = connect(SocketAddr::from((to, port)), timeout) else {
            return false;
        };
        let mut buf = [0u8; 5];
        c.write_all(b"hello").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"hello"
    })
}

/// Whether the long soak was asked for (`DATAPLANE_SOAK=1`).
pub fn soak() -> bool {
    std::env::var("DATAPLANE_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Allows everything, except TCP to [`PROBE_PORT`] (an earlier policy denies it).
pub const POLICIES: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: soak-deny-probe}
spec:
  order: 10
  selector: all()
  types: [Ingress]
  ingress:
  - {action: Deny, protocol: TCP, destination: {ports: [7300]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: soak-allow}
spec:
  order: 100
  selector: all()
  types: [Ingress, Egress]
  ingress:
  - action: Allow
  egress:
  - action: Allow
";

/// The deployment with load servers in every pod and the policies in force; the denied
/// probe is shown to connect before the deny exists (so the probe loop can see a leak).
pub fn start_under_policy() -> (Deployment, Vec<LoadServer>) {
    let d = Deployment::start("CrossSubnet", 2);
    let servers: Vec<LoadServer> = d.pods.iter().map(|p| LoadServer::start(&p.sb.ns)).collect();
    let (from, to) = (&d.pods[0], &d.pods[5]);
    assert!(
        echo_ok(&from.sb.ns, to.ip, PROBE_PORT, Duration::from_secs(2)),
        "the probe port answers before any policy"
    );
    d.apply(POLICIES);
    assert!(
        !echo_ok(&from.sb.ns, to.ip, PROBE_PORT, Duration::from_millis(500)),
        "the deny policy is in force"
    );
    (d, servers)
}

/// Pods 0–1 on node-1, 2–3 on node-2 (same subnet), 4–5 on node-3 (behind the router).
pub fn start_load(d: &Deployment) -> Load {
    let mut load = Load::default();
    let p = |i: usize| (&d.pods[i].sb.ns, d.pods[i].ip);
    let clients: [(&str, Kind, usize, usize); 10] = [
        ("rr same node", Kind::Rr, 0, 1),
        ("rr cross node", Kind::Rr, 0, 2),
        ("rr cross subnet (ipip)", Kind::Rr, 3, 4),
        ("crr same node", Kind::Crr, 1, 0),
        ("crr cross node", Kind::Crr, 3, 1),
        ("crr cross subnet (ipip)", Kind::Crr, 5, 2),
        ("stream cross subnet (ipip)", Kind::Stream, 1, 4),
        ("denied probe same node", Kind::DeniedProbe, 3, 2),
        ("denied probe cross node", Kind::DeniedProbe, 1, 3),
        ("denied probe cross subnet", Kind::DeniedProbe, 4, 0),
    ];
    for (name, kind, from, to) in clients {
        let (ns, _) = p(from);
        load.spawn(name, kind, ns, p(to).1);
    }
    load.wait_flowing(20, Duration::from_secs(10));
    load
}

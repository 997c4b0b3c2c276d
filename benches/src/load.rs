//! The load generator of the datapath bench: request/response (1-byte ping-pong on a few
//! connections, like netperf TCP_RR) and connection rate (connect, 1-byte exchange, close,
//! like TCP_CRR), for a fixed duration, latencies in an HDR histogram; iperf3 for streams.
//!
//! Sockets are made inside the pods' network namespaces (a thread that entered the netns, as
//! `Netns::run` does); every thread that moves bytes, client and server, is pinned to CPU 0
//! (DESIGN.md: a wake-up across the two vCPUs costs ~300 µs here).
//!
//! CPU time counted: user + system time of the client and server threads (`RUSAGE_THREAD`).
//! On one CPU the veth hop and the softirq that delivers a packet mostly run in the sending
//! thread's context (`local_bh_enable` after `netif_rx`), so they land in that figure too; what
//! ksoftirqd or the agents spend does not.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dataplane_tests::traffic::Pod;
use hdrhistogram::Histogram;

pub const RR_PORT: u16 = 7100;
pub const CRR_PORT: u16 = 7101;
pub const STREAM_PORT: u16 = 5202;

pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: sched_setaffinity on the calling thread (pid 0) with a set built here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// User + system CPU time of the calling thread, in µs.
fn thread_cpu_us() -> f64 {
    // SAFETY: getrusage fills the plain-old-data struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 10 s, 3 significant digits.
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid histogram bounds")
}

/// One measurement of a transaction rate.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Client + server thread CPU time per transaction.
    pub cpu_us_per_op: f64,
}

impl Rate {
    fn from(h: &Histogram<u64>, n: u64, elapsed: Duration, cpu_us: f64) -> anyhow::Result<Self> {
        if n == 0 {
            bail!("no transaction completed");
        }
        Ok(Self {
            per_s: n as f64 / elapsed.as_secs_f64(),
            p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
            p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
            cpu_us_per_op: cpu_us / n as f64,
        })
    }
}

/// Request/response: `conns` connections from `client` to `server`, each a client thread
/// sending one byte and waiting for it back, for `dur`.
pub fn rr(client: &Pod, server: &Pod, conns: usize, dur: Duration) -> anyhow::Result<Rate> {
    let listener = server
        .sb
        .ns
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, RR_PORT)))
        .context("bind the RR server")?;
    let to = (server.ip, RR_PORT).into();
    let streams = client.sb.ns.run(|| -> std::io::Result<Vec<TcpStream>> {
        (0..conns)
            .map(|_| {
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .collect()
    })?;
    let accepted: Vec<TcpStream> = (0..conns)
        .map(|_| listener.accept().map(|(s, _)| s))
        .collect::<Result<_, _>>()?;
    drop(listener);
    std::thread::scope(|s| {
        let servers: Vec<_> = accepted
            .into_iter()
            .map(|mut c| {
                s.spawn(move || -> f64 {
                    pin_to_cpu(0);
                    let cpu0 = thread_cpu_us();
                    let _nodelay = c.set_nodelay(true);
                    let mut b = [0u8; 1];
                    while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
                    thread_cpu_us() - cpu0
                })
            })
            .collect();
        let start = Instant::now();
        let deadline = start + dur;
        let clients: Vec<_> = streams
            .into_iter()
            .map(|mut c| {
                s.spawn(move || -> anyhow::Result<(Histogram<u64>, u64, f64)> {
                    pin_to_cpu(0);
                    let cpu0 = thread_cpu_us();
                    let mut h = histogram();
                    let mut b = [1u8; 1];
                    let mut n = 0u64;
                    loop {
                        let t = Instant::now();
                        if t >= deadline {
                            break;
                        }
                        c.write_all(&b)?;
                        c.read_exact(&mut b)?;
                        h.record(t.elapsed().as_nanos() as u64).ok();
                        n += 1;
                    }
                    let cpu = thread_cpu_us() - cpu0;
                    c.shutdown(Shutdown::Both).ok();
                    Ok((h, n, cpu))
                })
            })
            .collect();
        let mut h = histogram();
        let mut n = 0;
        let mut cpu = 0.0;
        for c in clients {
            let (ch, cn, ccpu) = c
                .join()
                .map_err(|_| anyhow::anyhow!("RR client panicked"))??;
            h.add(&ch).ok();
            n += cn;
            cpu += ccpu;
        }
        let elapsed = start.elapsed();
        for srv in servers {
            cpu += srv
                .join()
                .map_err(|_| anyhow::anyhow!("RR server panicked"))?;
        }
        Rate::from(&h, n, elapsed, cpu)
    })
}

/// Connection rate: one client thread connecting, sending a byte, reading it back and closing,
/// for `dur`; the server answers and closes first (so TIME_WAIT lands on the server side and
/// the client's ports are free again at once).
pub fn crr(client: &Pod, server: &Pod, dur: Duration) -> anyhow::Result<Rate> {
    let listener = server
        .sb
        .ns
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, CRR_PORT)))
        .context("bind the CRR server")?;
    let stop = Arc::new(AtomicBool::new(false));
    let to = (server.ip, CRR_PORT).into();
    std::thread::scope(|s| {
        let stop_srv = stop.clone();
        let srv = s.spawn(move || -> f64 {
            pin_to_cpu(0);
            let cpu0 = thread_cpu_us();
            let mut b = [0u8; 1];
            while !stop_srv.load(Ordering::Relaxed) {
                if let Ok((mut c, _)) = listener.accept()
                    && c.read_exact(&mut b).is_ok()
                {
                    let _answered = c.write_all(&b);
                }
            }
            thread_cpu_us() - cpu0
        });
        let result =
            client
                .sb
                .ns
                .run(|| -> anyhow::Result<(Histogram<u64>, u64, f64, Duration)> {
                    pin_to_cpu(0);
                    let cpu0 = thread_cpu_us();
                    let mut h = histogram();
                    let mut n = 0u64;
                    let start = Instant::now();
                    let deadline = start + dur;
                    let mut b = [1u8; 1];
                    loop {
                        let t = Instant::now();
                        if t >= deadline {
                            break;
                        }
                        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                            .context("CRR connect")?;
                        c.set_nodelay(true)?;
                        c.write_all(&b)?;
                        c.read_exact(&mut b)?;
                        drop(c);
                        h.record(t.elapsed().as_nanos() as u64).ok();
                        n += 1;
                    }
                    let elapsed = start.elapsed();
                    Ok((h, n, thread_cpu_us() - cpu0, elapsed))
                });
        // Wake the server's accept so that it sees the stop flag.
        stop.store(true, Ordering::Relaxed);
        // (closed at once: the server reads it to EOF)
        drop(
            client
                .sb
                .ns
                .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2))),
        );
        let srv_cpu = srv
            .join()
            .map_err(|_| anyhow::anyhow!("CRR server panicked"))?;
        let (h, n, cpu, elapsed) = result?;
        Rate::from(&h, n, elapsed, cpu + srv_cpu)
    })
}

/// One iperf3 TCP stream.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub gbps: f64,
    /// CPU seconds (iperf3's own client + server process figures) per gigabyte moved.
    pub cpu_s_per_gb: f64,
}

/// An iperf3 TCP stream from `client` to `server` for `secs` seconds, both on CPU 0.
pub fn stream(client: &Pod, server: &Pod, secs: u64) -> anyhow::Result<Stream> {
    let port = STREAM_PORT.to_string();
    let mut srv = dataplane_tests::ChildGuard::new(
        server
            .sb
            .ns
            .command("taskset")
            .args(["-c", "0", "iperf3", "-s", "-1", "-p", &port])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
        "iperf3 -s",
    );
    std::thread::sleep(Duration::from_millis(150));
    let out = client
        .sb
        .ns
        .command("taskset")
        .args([
            "-c",
            "0",
            "iperf3",
            "-c",
            &server.ip.to_string(),
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()?;
    srv.stop(Duration::from_secs(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let seconds = end["sum_received"]["seconds"].as_f64().unwrap_or(0.0);
    if bps == 0.0 || bytes == 0.0 {
        bail!(
            "iperf3 measured nothing: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let cpu = &end["cpu_utilization_percent"];
    let cpu_s = (cpu["host_total"].as_f64().unwrap_or(0.0)
        + cpu["remote_total"].as_f64().unwrap_or(0.0))
        / 100.0
        * seconds;
    Ok(Stream {
        gbps: bps / 1e9,
        cpu_s_per_gb: cpu_s / (bytes / 1e9),
    })
}

//! The datapath comparison's report: `target/bench/report.json` (one record per configuration
//! × path × metric × rule count, the ratios, the machine and the commit), `report.md` (tables
//! of the ratios bpf/iptables and bpf/bare) and `report.svg` (rate versus rule count per
//! configuration, a hand-written line chart).

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::datapath::{Control, EndpointsMemory, Plan, Samples};

/// (metric, unit, higher is better).
pub const METRICS: [(&str, &str, bool); 10] = [
    ("rr_per_s", "requests/s", true),
    ("rr_p50_us", "µs", false),
    ("rr_p99_us", "µs", false),
    ("rr_cpu_us_per_req", "CPU µs/request", false),
    ("crr_per_s", "connections/s", true),
    ("crr_p50_us", "µs", false),
    ("crr_p99_us", "µs", false),
    ("crr_cpu_us_per_conn", "CPU µs/connection", false),
    ("stream_gbps", "Gbit/s", true),
    ("stream_cpu_s_per_gb", "CPU s/GB", false),
];

/// The ratios the report gives: (numerator, denominator).
const PAIRS: [(&str, &str); 9] = [
    ("bpf", "iptables"),
    ("bpf", "iptables-legacy"),
    ("bpf", "ipset"),
    ("bpf", "bare"),
    ("iptables", "bare"),
    ("iptables-legacy", "bare"),
    ("ipset", "bare"),
    ("bpf-ipip", "bpf"),
    ("bpf-ipip", "bare-vxlan"),
];

#[derive(Debug, Serialize)]
pub struct Record {
    pub config: String,
    pub path: String,
    pub metric: String,
    pub unit: String,
    pub rules: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<Option<f64>>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Ratio {
    pub numerator: String,
    pub denominator: String,
    pub path: String,
    pub metric: String,
    /// Rule count of the numerator's measurement.
    pub rules: usize,
    /// Rule count of the denominator's (differs for the "N rules / 0 rules" scaling ratios,
    /// which pair rounds of different rule blocks by index).
    pub denominator_rules: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

#[derive(Debug, Serialize)]
pub struct ControlRecord {
    pub config: String,
    pub rules: usize,
    #[serde(flatten)]
    pub figures: Control,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub commit: String,
    pub machine: Machine,
    pub plan: Plan,
    /// What the CPU figures count.
    pub cpu_counted: &'static str,
    pub records: Vec<Record>,
    pub ratios: Vec<Ratio>,
    pub control_plane: Vec<ControlRecord>,
    pub endpoints_memory: Vec<EndpointsMemory>,
    /// Figures of the other benches (their last JSON in target/bench), null when absent.
    pub other_benches: serde_json::Value,
    pub errors: Vec<String>,
    pub not_measured: Vec<&'static str>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v.to_vec()), min, max)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    Machine {
        kernel: sh("uname", &["-r"]),
        cpu_model,
        // Not available_parallelism: this thread is pinned to one CPU by then.
        nproc: std::fs::read_to_string("/proc/cpuinfo").map_or(0, |s| {
            s.lines().filter(|l| l.starts_with("processor")).count()
        }),
    }
}

fn other_benches(dir: &Path) -> serde_json::Value {
    let read = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(dir.join(format!("{name}.json")))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let cni = read("cni-latency");
    let cni_add = cni["series"].as_array().and_then(|s| {
        s.iter()
            .find(|x| x["plugin"] == "dataplane" && x["command"] == "ADD")
            .cloned()
    });
    let attach = read("attach-latency");
    let policy = read("policy");
    let map_dump = read("map-dump");
    serde_json::json!({
        "map_dump_conntrack": {
            "entries": map_dump["entries"],
            "dumps": map_dump["dumps"],
        },
        "cni_add_dataplane": cni_add.map(|a| serde_json::json!({
            "mode": a["mode"], "p50_ms": a["p50_ms"], "p99_ms": a["p99_ms"]})),
        "cni_add_all_series": cni["series"],
        "attach_latency_us": {"p50": attach["p50_us"], "p99": attach["p99_us"]},
        "bpf_policy_maps_1k_endpoints_10k_rules": {
            "endpoints": policy["compile"]["endpoints"],
            "rules": policy["compile"]["rules"],
            "memlock_ip_bytes": policy["compile"]["memlock_ip_bytes"],
            "memlock_port_bytes": policy["compile"]["memlock_port_bytes"],
            "compile_ms": policy["compile"]["compile_ms"],
            "write_ms": policy["compile"]["write_ms"],
        },
        "policy_apply_10k_rules": {
            "in_force_ms": policy["apply"]["samples"][0]["in_force_ms"],
            "wall_ms": policy["apply"]["samples"][0]["wall_ms"],
        },
    })
}

pub fn build(plan: &Plan, s: &Samples, dir: &Path) -> Report {
    let unit = |m: &str| METRICS.iter().find(|x| x.0 == m).map_or("", |x| x.1);
    let records = s
        .data
        .iter()
        .filter_map(|((config, path, metric, rules), v)| {
            let ok: Vec<f64> = v.iter().flatten().copied().collect();
            if ok.is_empty() {
                return None;
            }
            let (median, min, max) = stats(&ok);
            Some(Record {
                config: config.clone(),
                path: path.clone(),
                metric: metric.clone(),
                unit: unit(metric).to_owned(),
                rules: *rules,
                median,
                min,
                max,
                samples: v.clone(),
            })
        })
        .collect();
    let ratio = |num: &str, den: &str, path: &str, metric: &str, rn: usize, rd: usize| {
        let a = s.data.get(&(num.into(), path.into(), metric.into(), rn))?;
        let b = s.data.get(&(den.into(), path.into(), metric.into(), rd))?;
        let r: Vec<f64> = a
            .iter()
            .zip(b)
            .filter_map(|(x, y)| Some(x.as_ref()? / y.as_ref()?))
            .collect();
        if r.is_empty() {
            return None;
        }
        let (median, min, max) = stats(&r);
        Some(Ratio {
            numerator: num.into(),
            denominator: den.into(),
            path: path.into(),
            metric: metric.into(),
            rules: rn,
            denominator_rules: rd,
            median,
            min,
            max,
            rounds: r.len(),
        })
    };
    let rule_counts: BTreeSet<usize> = s.data.keys().map(|k| k.3).collect();
    let mut ratios = Vec::new();
    for path in ["same-node", "cross-node"] {
        for (metric, _, _) in METRICS {
            for &n in &rule_counts {
                for (num, den) in PAIRS {
                    // bare takes no rules: its figure of the same block is the baseline.
                    ratios.extend(ratio(num, den, path, metric, n, n));
                }
                if n > 0 {
                    for c in ["bpf", "iptables", "iptables-legacy", "ipset", "bpf-ipip"] {
                        ratios.extend(ratio(c, c, path, metric, n, 0));
                    }
                }
            }
        }
    }
    let control_plane = s
        .control
        .iter()
        .map(|((config, rules), f)| ControlRecord {
            config: config.clone(),
            rules: *rules,
            figures: f.clone(),
        })
        .collect();
    Report {
        schema: "dataplane-bench-report/1",
        commit: sh("git", &["rev-parse", "HEAD"]),
        machine: machine(),
        plan: plan.clone(),
        cpu_counted: "user+system time of the load generator's client and server threads (RUSAGE_THREAD), which on one CPU includes the softirq work done in their context; iperf3: its own client+server process CPU figures; not ksoftirqd, not the agents",
        records,
        ratios,
        control_plane,
        endpoints_memory: s.endpoints.clone(),
        other_benches: other_benches(dir),
        errors: s.errors.clone(),
        not_measured: vec![
            "agent RSS and map memory at 1,000 endpoints use WorkloadEndpoints written to etcd without real pods or interfaces (the BPF agent has no interface to attach to; the policy bench's compile figures give the maps of 1,000 endpoints with distinct policies)",
            "CPU time of ksoftirqd and of the agents during the traffic",
        ],
    }
}

fn find<'a>(
    r: &'a Report,
    config: &str,
    path: &str,
    metric: &str,
    rules: usize,
) -> Option<&'a Record> {
    r.records
        .iter()
        .find(|x| x.config == config && x.path == path && x.metric == metric && x.rules == rules)
}

fn find_ratio<'a>(
    r: &'a Report,
    num: &str,
    den: &str,
    path: &str,
    metric: &str,
    rules: usize,
    den_rules: usize,
) -> Option<&'a Ratio> {
    r.ratios.iter().find(|x| {
        x.numerator == num
            && x.denominator == den
            && x.path == path
            && x.metric == metric
            && x.rules == rules
            && x.denominator_rules == den_rules
    })
}

fn fmt_ratio(x: Option<&Ratio>) -> String {
    x.map_or("–".into(), |x| {
        format!("{:.2} ({:.2}–{:.2})", x.median, x.min, x.max)
    })
}

fn fmt_value(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let rules: BTreeSet<usize> = r.records.iter().map(|x| x.rules).collect();
    writeln!(
        m,
        "# Datapath: bpf vs iptables vs bare\n\ncommit `{}`, kernel {}, {} × {}; {} round(s){}, configurations interleaved round by round; client and server pinned to CPU 0. RR: {} connections × {} ms; CRR: {} ms; stream: iperf3 {} s.\n\nRatios are the median of per-round ratios, (min–max) over rounds. For rates higher is better; for latency and CPU lower is better. `bare` takes no rules: its figure is that rule block's baseline. `bpf-ipip` is BPF with IP-in-IP Always (cross node only; the kernel has no ipip module, so iptables cannot encapsulate); `bare-vxlan` is bare routing through the kernel's own VXLAN (cross node only, pod MTU 1450), the encapsulation `bpf-ipip` is compared against. CPU counted: {}.\n",
        r.commit,
        r.machine.kernel,
        r.machine.nproc,
        r.machine.cpu_model,
        r.plan.rounds,
        if r.plan.quick { " (--quick)" } else { "" },
        r.plan.rr_connections,
        r.plan.rr_ms,
        r.plan.crr_ms,
        r.plan.stream_s,
        r.cpu_counted
    ).expect("write to a String");
    for path in ["same-node", "cross-node"] {
        writeln!(m, "## {path}\n").expect("write to a String");
        writeln!(
            m,
            "| metric | rules | bare | bare-vxlan | iptables | bpf | bpf-ipip | bpf/iptables | bpf/bare | iptables/bare | bpf N/0 | iptables N/0 |"
        ).expect("write to a String");
        writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|")
            .expect("write to a String");
        for (metric, unit, _) in METRICS {
            for &n in &rules {
                let v = |c: &str| {
                    find(r, c, path, metric, n).map_or("–".into(), |x| fmt_value(x.median))
                };
                writeln!(
                    m,
                    "| {metric} ({unit}) | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    v("bare"),
                    v("bare-vxlan"),
                    v("iptables"),
                    v("bpf"),
                    v("bpf-ipip"),
                    fmt_ratio(find_ratio(r, "bpf", "iptables", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "bpf", "bare", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "iptables", "bare", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "bpf", "bpf", path, metric, n, 0)),
                    fmt_ratio(find_ratio(r, "iptables", "iptables", path, metric, n, 0)),
                )
                .expect("write to a String");
            }
        }
        m.push('\n');
    }
    writeln!(
        m,
        "## iptables backends and one ipset\n\n`iptables` is iptables-nft, `iptables-legacy` the same rules through x_tables; both get the N rules, rendered as Felix renders them (per rule: its match sets the accept mark bit, then a RETURN on the bit). `ipset` is iptables-nft with the N peers folded into one rule whose source is one `hash:net` ipset of N members (then the allow of the client): what a hand-tuned iptables policy costs. bpf always has the N separate rules.\n"
    )
    .expect("write to a String");
    for path in ["same-node", "cross-node"] {
        writeln!(
            m,
            "### {path}\n\n| metric | rules | iptables | iptables-legacy | ipset | bpf | bpf/iptables | bpf/iptables-legacy | bpf/ipset | iptables-legacy/bare | ipset/bare | iptables-legacy N/0 | ipset N/0 |\n|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|---|"
        )
        .expect("write to a String");
        for (metric, unit, _) in METRICS {
            for &n in &rules {
                let v = |c: &str| {
                    find(r, c, path, metric, n).map_or("–".into(), |x| fmt_value(x.median))
                };
                if ["iptables-legacy", "ipset"]
                    .iter()
                    .all(|c| find(r, c, path, metric, n).is_none())
                {
                    continue;
                }
                writeln!(
                    m,
                    "| {metric} ({unit}) | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    v("iptables"),
                    v("iptables-legacy"),
                    v("ipset"),
                    v("bpf"),
                    fmt_ratio(find_ratio(r, "bpf", "iptables", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "bpf", "iptables-legacy", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "bpf", "ipset", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "iptables-legacy", "bare", path, metric, n, n)),
                    fmt_ratio(find_ratio(r, "ipset", "bare", path, metric, n, n)),
                    fmt_ratio(find_ratio(
                        r,
                        "iptables-legacy",
                        "iptables-legacy",
                        path,
                        metric,
                        n,
                        0
                    )),
                    fmt_ratio(find_ratio(r, "ipset", "ipset", path, metric, n, 0)),
                )
                .expect("write to a String");
            }
        }
        m.push('\n');
    }
    writeln!(
        m,
        "## cross-node: bpf IP-in-IP / bpf native\n\n| metric | rules | ratio |\n|---|---:|---|"
    )
    .expect("write to a String");
    for (metric, _, _) in METRICS {
        for &n in &rules {
            if let Some(x) = find_ratio(r, "bpf-ipip", "bpf", "cross-node", metric, n, n) {
                writeln!(m, "| {metric} | {n} | {} |", fmt_ratio(Some(x)))
                    .expect("write to a String");
            }
        }
    }
    writeln!(
        m,
        "\n## cross-node: bpf IP-in-IP / the kernel's VXLAN (bare-vxlan)\n\nOur encapsulation (BPF, IP-in-IP, with the rule block's rules) against the kernel's (bare routing through `vxlan0`, no policy); labelled as such: different encapsulations (20 bytes of outer header against 50).\n\n| metric | rules | ratio |\n|---|---:|---|"
    )
    .expect("write to a String");
    for (metric, _, _) in METRICS {
        for &n in &rules {
            if let Some(x) = find_ratio(r, "bpf-ipip", "bare-vxlan", "cross-node", metric, n, n) {
                writeln!(m, "| {metric} | {n} | {} |", fmt_ratio(Some(x)))
                    .expect("write to a String");
            }
        }
    }
    writeln!(
        m,
        "\n## Control plane\n\nTime to program N rules: `ctl apply --wait` wall time (parse, etcd write, until every agent reports it in force) and its own `in force` figure (etcd write → in force on every node). Agent RSS: largest of the 3 agents after it (2 pods per node). BPF map memlock: node 1's pinned maps.\n\n| config | rules | apply wall ms | in force ms | agent RSS KiB | BPF map memlock bytes |\n|---|---:|---:|---:|---:|---:|"
    ).expect("write to a String");
    let opt = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    for c in &r.control_plane {
        writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} |",
            c.config,
            c.rules,
            if c.figures.apply_wall_ms > 0.0 {
                format!("{:.0}", c.figures.apply_wall_ms)
            } else {
                "–".into()
            },
            opt(c.figures.in_force_ms.map(|v| format!("{v:.0}"))),
            opt(c.figures.agent_rss_kib_max.map(|v| v.to_string())),
            opt(c.figures.bpf_map_memlock_bytes.map(|v| v.to_string())),
        )
        .expect("write to a String");
    }
    writeln!(
        m,
        "\n### Memory with many endpoints\n\nWorkloadEndpoints written straight to etcd for node 3 (no pods, no interfaces), under the largest rule count every configuration takes (BPF brought back to it from its BPF-only counts); settled = a marker policy applied with `--wait` after them, capped at 300 s (BPF) and 120 s (iptables): \"not settled\" gives the time reached, and the memory at that moment.\n\n| config | endpoints | rules | agent RSS KiB before → after | BPF maps memlock B before → after | write ms | settled ms |\n|---|---:|---:|---|---|---:|---:|"
    )
    .expect("write to a String");
    let o2 = |v: Option<u64>| v.map_or("–".to_owned(), |v| v.to_string());
    for e in &r.endpoints_memory {
        writeln!(
            m,
            "| {} | {} | {} | {} → {} | {} → {} | {:.0} | {} |",
            e.config,
            e.endpoints,
            e.rules,
            o2(e.agent_rss_kib_before),
            o2(e.agent_rss_kib_after),
            o2(e.bpf_map_memlock_bytes_before),
            o2(e.bpf_map_memlock_bytes_after),
            e.write_ms,
            if e.settled {
                format!("{:.0}", e.settle_ms)
            } else {
                format!(
                    "not settled after {:.0} ({})",
                    e.settle_ms,
                    e.note.as_deref().unwrap_or("")
                )
            }
        )
        .expect("write to a String");
    }
    let o = &r.other_benches;
    writeln!(
        m,
        "\nFrom the other benches' last JSON (target/bench; null when that bench has not run):\n\n- CNI ADD (dataplane plugin): p50 {} ms, p99 {} ms\n- attach latency (veth appears → programs attached): p50 {} µs, p99 {} µs\n- BPF policy maps at {} endpoints and {} rules: memlock {} B (ip) + {} B (port); compile {} ms, write {} ms\n- 10,000-rule policy apply (policy bench): in force {} ms, wall {} ms\n- `map-dump conntrack` of {} entries: table {} ms (peak RSS {} KiB), JSON {} ms (peak RSS {} KiB)\n",
        o["cni_add_dataplane"]["p50_ms"],
        o["cni_add_dataplane"]["p99_ms"],
        o["attach_latency_us"]["p50"],
        o["attach_latency_us"]["p99"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["endpoints"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["rules"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["memlock_ip_bytes"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["memlock_port_bytes"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["compile_ms"],
        o["bpf_policy_maps_1k_endpoints_10k_rules"]["write_ms"],
        o["policy_apply_10k_rules"]["in_force_ms"],
        o["policy_apply_10k_rules"]["wall_ms"],
        o["map_dump_conntrack"]["entries"],
        o["map_dump_conntrack"]["dumps"][0]["wall_ms"],
        o["map_dump_conntrack"]["dumps"][0]["max_rss_kib"],
        o["map_dump_conntrack"]["dumps"][1]["wall_ms"],
        o["map_dump_conntrack"]["dumps"][1]["max_rss_kib"],
    ).expect("write to a String");
    if !r.errors.is_empty() {
        writeln!(m, "## Errors\n").expect("write to a String");
        for e in &r.errors {
            writeln!(m, "- {e}").expect("write to a String");
        }
        m.push('\n');
    }
    writeln!(m, "## Not measured\n").expect("write to a String");
    for e in &r.not_measured {
        writeln!(m, "- {e}").expect("write to a String");
    }
    m
}

/// Line charts of the rates against rule count: one panel per metric and path, one line per
/// configuration; x is the rule count on a categorical axis (0, 100, 1k, …).
pub fn svg(r: &Report) -> String {
    let rules: Vec<usize> = r
        .records
        .iter()
        .map(|x| x.rules)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let panels: Vec<(&str, &str)> = ["rr_per_s", "crr_per_s", "stream_gbps"]
        .into_iter()
        .flat_map(|m| ["same-node", "cross-node"].map(|p| (m, p)))
        .collect();
    let colours = [
        ("bare", "#555555"),
        ("bare-vxlan", "#9467bd"),
        ("iptables", "#d62728"),
        ("iptables-legacy", "#ff7f0e"),
        ("ipset", "#8c564b"),
        ("bpf", "#1f77b4"),
        ("bpf-ipip", "#2ca02c"),
    ];
    let (pw, ph, ml, mt, mb, mr) = (420.0, 260.0, 70.0, 40.0, 40.0, 20.0);
    let cols = 2;
    // The legend of 7 names wants about 840 px: two panels across.
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (cols as f64 * pw, rows as f64 * ph + 40.0);
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    ).expect("write to a String");
    writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#).expect("write to a String");
    for (i, (name, colour)) in colours.iter().enumerate() {
        let x = 20.0 + i as f64 * 120.0;
        writeln!(
            s,
            r#"<line x1="{x}" y1="20" x2="{}" y2="20" stroke="{colour}" stroke-width="2"/><text x="{}" y="24">{name}</text>"#,
            x + 20.0,
            x + 25.0
        ).expect("write to a String");
    }
    for (pi, (metric, path)) in panels.iter().enumerate() {
        let ox = (pi % cols) as f64 * pw;
        let oy = 40.0 + (pi / cols) as f64 * ph;
        let (x0, x1, y0, y1) = (ox + ml, ox + pw - mr, oy + ph - mb, oy + mt);
        let ymax = r
            .records
            .iter()
            .filter(|x| x.metric == *metric && x.path == *path)
            .map(|x| x.max)
            .fold(0.0, f64::max)
            * 1.1;
        let ymax = if ymax > 0.0 { ymax } else { 1.0 };
        let xpos = |k: usize| {
            if rules.len() <= 1 {
                (x0 + x1) / 2.0
            } else {
                x0 + (x1 - x0) * k as f64 / (rules.len() - 1) as f64
            }
        };
        let ypos = |v: f64| y0 - (y0 - y1) * v / ymax;
        let unit = METRICS.iter().find(|m| m.0 == *metric).map_or("", |m| m.1);
        writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{metric} ({unit}), {path}</text>"#,
            x0,
            oy + 20.0
        )
        .expect("write to a String");
        writeln!(
            s,
            r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#000"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#000"/>"##
        ).expect("write to a String");
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            let y = ypos(v);
            writeln!(
                s,
                r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 - 4.0,
                y + 4.0,
                fmt_value(v)
            ).expect("write to a String");
        }
        for (k, n) in rules.iter().enumerate() {
            writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{n}</text>"#,
                xpos(k),
                y0 + 15.0
            )
            .expect("write to a String");
        }
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">rules on the destination</text>"#,
            (x0 + x1) / 2.0,
            y0 + 30.0
        )
        .expect("write to a String");
        for (name, colour) in colours {
            let pts: Vec<(f64, f64)> = rules
                .iter()
                .enumerate()
                .filter_map(|(k, &n)| {
                    find(r, name, path, metric, n).map(|x| (xpos(k), ypos(x.median)))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let points: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                points.join(" ")
            )
            .expect("write to a String");
            for (x, y) in pts {
                writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
                )
                .expect("write to a String");
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// `--quick`'s smoke check: every configuration produced its figures on every path and rule
/// count it runs (values are not judged).
pub fn check_complete(plan: &Plan, r: &Report) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let all: Vec<(usize, bool)> = plan
        .rules
        .iter()
        .map(|&n| (n, false))
        .chain(plan.bpf_only_rules.iter().map(|&n| (n, true)))
        .collect();
    let both = &["same-node", "cross-node"][..];
    for (config, paths, takes) in [
        ("bare", both, false),
        ("bare-vxlan", &["cross-node"][..], false),
        ("iptables", both, true),
        ("iptables-legacy", both, true),
        ("ipset", both, true),
        ("bpf", both, true),
        ("bpf-ipip", &["cross-node"][..], true),
    ] {
        if !plan.runs(config) {
            continue;
        }
        for &(n, bpf_only) in &all {
            if bpf_only && takes && !config.starts_with("bpf") {
                continue;
            }
            for path in paths {
                for (metric, _, _) in METRICS {
                    if find(r, config, path, metric, n).is_none() {
                        missing.push(format!("{config} {path} {metric} rules {n}"));
                    }
                }
            }
        }
        if takes
            && !r
                .control_plane
                .iter()
                .any(|c| c.config == config && c.rules > 0 && c.figures.apply_wall_ms > 0.0)
            && all.iter().any(|x| x.0 > 0)
        {
            missing.push(format!("{config}: time to program rules"));
        }
    }
    // Memory with many endpoints, under the largest common rule count (a figure even when the
    // agent did not settle within its cap).
    let mem_rules = plan.rules.iter().copied().max().unwrap_or(0);
    for config in ["bpf", "iptables"] {
        if plan.runs(config)
            && !r.endpoints_memory.iter().any(|e| {
                e.config == config && e.rules == mem_rules && e.endpoints == plan.endpoints
            })
        {
            missing.push(format!(
                "{config}: memory at {} endpoints and {mem_rules} rules",
                plan.endpoints
            ));
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("datapath: no figures for {}", missing.join("; "));
    }
    Ok(())
}

pub fn write(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in [
        ("report.json", serde_json::to_string_pretty(r)?),
        ("report.md", markdown(r)),
        ("report.svg", svg(r)),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{EndpointsMemory, Plan, Samples};

    /// Samples with every figure `plan` asks for, from every configuration.
    fn full(plan: &Plan) -> Samples {
        let mut s = Samples::default();
        let configs: [(&str, &[&str], bool); 7] = [
            ("bare", &["same-node", "cross-node"], false),
            ("bare-vxlan", &["cross-node"], false),
            ("iptables", &["same-node", "cross-node"], false),
            ("iptables-legacy", &["same-node", "cross-node"], false),
            ("ipset", &["same-node", "cross-node"], false),
            ("bpf", &["same-node", "cross-node"], true),
            ("bpf-ipip", &["cross-node"], true),
        ];
        let counts = plan
            .rules
            .iter()
            .map(|&n| (n, false))
            .chain(plan.bpf_only_rules.iter().map(|&n| (n, true)));
        for (n, bpf_only) in counts {
            for (config, paths, bpf) in configs {
                if bpf_only && (config.starts_with("ip")) {
                    continue;
                }
                for path in paths {
                    for (metric, _, _) in METRICS {
                        s.data.insert(
                            (config.into(), (*path).into(), metric.into(), n),
                            vec![Some(1.0 + bpf as u8 as f64); plan.rounds],
                        );
                    }
                }
                if n > 0 && !config.starts_with("bare") {
                    s.control.insert(
                        (config.into(), n),
                        Control {
                            apply_wall_ms: 10.0,
                            ..Control::default()
                        },
                    );
                }
            }
        }
        let mem_rules = plan.rules.iter().copied().max().unwrap_or(0);
        for (config, settled) in [("bpf", true), ("iptables", false)] {
            s.endpoints.push(EndpointsMemory {
                config: config.into(),
                node: "node-3".into(),
                endpoints: plan.endpoints,
                rules: mem_rules,
                agent_rss_kib_before: Some(1),
                agent_rss_kib_after: Some(2),
                bpf_map_memlock_bytes_before: None,
                bpf_map_memlock_bytes_after: None,
                write_ms: 1.0,
                settle_ms: 120_000.0,
                settled,
                note: (!settled).then(|| "not in force after 120s: node-3 at revision 9".into()),
            });
        }
        s
    }

    #[test]
    fn complete_runs_pass_the_check_and_gaps_fail_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut quick = Plan::new(true);
        quick.rules = vec![0, 1_000];
        for plan in [Plan::new(false), quick] {
            let s = full(&plan);
            let r = build(&plan, &s, dir.path());
            check_complete(&plan, &r).unwrap();
            // The VXLAN comparison is in the tables and its ratio is there.
            let md = markdown(&r);
            assert!(md.contains("bpf IP-in-IP / the kernel's VXLAN"), "{md}");
            assert!(
                find_ratio(
                    &r,
                    "bpf-ipip",
                    "bare-vxlan",
                    "cross-node",
                    "crr_per_s",
                    0,
                    0
                )
                .is_some_and(|x| (x.median - 2.0).abs() < 1e-9)
            );
            assert!(!r.not_measured.iter().any(|x| x.contains("VXLAN")));
            // The legacy backend and the one-ipset policy have their columns and ratios.
            assert!(md.contains("## iptables backends and one ipset"), "{md}");
            for den in ["iptables-legacy", "ipset"] {
                assert!(
                    find_ratio(&r, "bpf", den, "same-node", "crr_per_s", 0, 0).is_some_and(|x| (x
                        .median
                        - 2.0)
                        .abs()
                        < 1e-9),
                    "bpf/{den}"
                );
            }
            // An agent that did not settle is a figure, not a gap.
            assert!(md.contains("not settled after 120000"), "{md}");

            let mut gap = full(&plan);
            gap.endpoints.retain(|e| e.config != "iptables");
            gap.data.retain(|k, _| k.0 != "bare-vxlan" || k.3 != 0);
            let err = check_complete(&plan, &build(&plan, &gap, dir.path()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("iptables: memory at"), "{err}");
            assert!(
                err.contains("bare-vxlan cross-node rr_per_s rules 0"),
                "{err}"
            );

            // A run of some configurations is judged on those only.
            let mut some = plan.clone();
            some.configs = vec!["bare".into(), "ipset".into(), "bpf".into()];
            let mut s = full(&some);
            s.data.retain(|k, _| some.configs.contains(&k.0));
            check_complete(&some, &build(&some, &s, dir.path())).unwrap();
            s.data.retain(|k, _| k.0 != "ipset" || k.3 != 0);
            let err = check_complete(&some, &build(&some, &s, dir.path()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("ipset same-node rr_per_s rules 0"), "{err}");
        }
    }
}

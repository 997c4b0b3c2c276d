//! The iptables dataplane (`agent --dataplane iptables`): the same datastore resources
//! programmed the classic Calico way, as the baseline the BPF mode is measured against.
//!
//! - **Routes** ([`routes`]): a pod's /32 via its `cali*` veth is the CNI plugin's; the agent
//!   adds each other node's blocks via that node when it is on this node's subnet, and leaves
//!   other subnets to the fabric (native routing, `ipipMode: Never`). IP-in-IP needs the
//!   kernel's `ipip` module (a `tunl0` device): a pool that asks for it is refused with an
//!   error naming the module, and its remote blocks get no routes.
//! - **Filtering** ([`render`]): chains in the filter table and `hash:net` ipsets, written
//!   with `iptables-restore --noflush` (one atomic transaction of the chains that changed)
//!   and `ipset restore` (a set whose members change is refilled under a temporary name and
//!   swapped in). Everything of ours starts with `cali-`; the built-in chains get one jump
//!   each.
//! - **Backend**: `iptables-nft` unless told otherwise ([`Backend`]).
//!
//! The writer keeps what it last wrote and writes only what differs; after a start or a
//! failure it reads the kernel's state first (our chains, sets and routes), so a restart
//! converges to the same rules without duplicates and removes what is stale.

pub mod render;
pub mod routes;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Stdio,
};

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, error, info};

use crate::{
    datastore::IpipMode,
    sync::{Changes, Dataplane, KernelView, Model, SyncError},
};
use render::{HOOKS, PREFIX, Rendered, SET_PREFIX, TEMP_SET_PREFIX};

/// Which iptables the rules go through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// iptables-nft: iptables rules as nftables objects. The default: Debian bookworm's
    /// `iptables` alternative, and what Calico picks on such hosts (it follows the backend
    /// the host's own rules use, and bookworm's are nft).
    #[default]
    Nft,
    /// iptables-legacy: the x_tables kernel interface.
    Legacy,
}

impl Backend {
    pub fn restore(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-restore",
            Self::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            Self::Nft => "iptables-nft-save",
            Self::Legacy => "iptables-legacy-save",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}{line}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
        /// The input line the tool named, when it named one.
        line: String,
    },
    #[error("open rtnetlink socket: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Route {
        what: String,
        source: rtnetlink::Error,
    },
}

/// Runs `program args…` with `input` on its standard input; returns its standard output.
async fn run(program: &str, args: &[&str], input: &str) -> Result<String, IptablesError> {
    let spawn = |source| IptablesError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await.map_err(spawn)?;
    }
    let out = child.wait_with_output().await.map_err(spawn)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    // iptables-restore: "Error occurred at line: N"; ipset: "Error in line N:".
    let number = ["at line: ", "in line "].iter().find_map(|m| {
        let rest = &stderr[stderr.find(m)? + m.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<usize>()
            .ok()
    });
    let line = number
        .and_then(|n| input.lines().nth(n.checked_sub(1)?))
        .map(|l| format!(" (input line: {l:?})"))
        .unwrap_or_default();
    Err(IptablesError::Failed {
        program: program.to_owned(),
        status: out.status,
        stderr,
        line,
    })
}

/// Checks that the tools the mode needs run here, so a host without them fails at start.
pub async fn check_tools(backend: Backend) -> Result<(), IptablesError> {
    run(backend.restore(), &["--version"], "").await?;
    run("ipset", &["version"], "").await?;
    Ok(())
}

/// What is in force, as far as the writer knows. `None` contents: found in the kernel at
/// start, contents not read (rewritten on the first write).
#[derive(Debug, Default)]
struct Applied {
    chains: BTreeMap<String, Option<Vec<String>>>,
    sets: BTreeMap<String, Option<BTreeSet<Ipv4Net>>>,
    routes: routes::Routes,
    /// Jump rules to add (missing) or remove (duplicates), by built-in chain.
    hooks_missing: Vec<(&'static str, &'static str)>,
    hooks_extra: Vec<(&'static str, &'static str)>,
}

/// Whether the kernel can do IP-in-IP: the `ipip` module is loaded or built in.
fn ipip_available() -> bool {
    std::path::Path::new("/sys/module/ipip").exists()
}

/// The routes, chains and ipsets of a node in the iptables mode, kept equal to the datastore.
pub struct Writer {
    backend: Backend,
    /// The host NIC: remote blocks' routes go out of it.
    host_ifindex: u32,
    /// This node's address, which may always reach its pods.
    node_ip: Option<Ipv4Addr>,
    /// `None` until read from the kernel, and again after a failed write.
    state: Option<Applied>,
    /// Pools refused for IP-in-IP, as last logged.
    refused: BTreeSet<(String, Ipv4Net, String)>,
}

impl Writer {
    pub fn new(backend: Backend, host_ifindex: u32, node_ip: Option<Ipv4Addr>) -> Self {
        Self {
            backend,
            host_ifindex,
            node_ip,
            state: None,
            refused: BTreeSet::new(),
        }
    }

    /// Our chains, hook rules and sets, as the kernel has them now.
    async fn read_kernel(&self) -> Result<Applied, IptablesError> {
        let save = run(self.backend.save(), &["-t", "filter"], "").await?;
        let mut applied = Applied::default();
        let mut jumps: BTreeMap<String, usize> = BTreeMap::new();
        for line in save.lines() {
            if let Some(chain) = line.strip_prefix(':')
                && let Some(name) = chain.split_whitespace().next()
                && name.starts_with(PREFIX)
            {
                applied.chains.insert(name.to_owned(), None);
            } else if line.starts_with("-A ") {
                *jumps.entry(line.to_owned()).or_default() += 1;
            }
        }
        for (builtin, ours) in HOOKS {
            match jumps.get(&format!("-A {builtin} -j {ours}")).copied() {
                None => applied.hooks_missing.push((builtin, ours)),
                Some(n) => applied
                    .hooks_extra
                    .extend(std::iter::repeat_n((builtin, ours), n - 1)),
            }
        }
        let sets = run("ipset", &["list", "-n"], "").await?;
        for name in sets.lines().map(str::trim) {
            if name.starts_with(PREFIX) {
                applied.sets.insert(name.to_owned(), None);
            }
        }
        applied.routes = routes::read().await?;
        debug!(
            chains = applied.chains.len(),
            sets = applied.sets.len(),
            routes = applied.routes.len(),
            "read what the kernel has of ours"
        );
        Ok(applied)
    }

    /// Logs pools that ask for IP-in-IP, once per change, and returns their CIDRs.
    fn refuse_ipip_pools(&mut self, view: &KernelView) -> Vec<Ipv4Net> {
        let refused: BTreeSet<(String, Ipv4Net, String)> = view
            .pools
            .iter()
            .filter(|(_, _, mode)| *mode != IpipMode::Never)
            .map(|(name, cidr, mode)| (name.clone(), *cidr, format!("{mode:?}")))
            .collect();
        for (name, cidr, mode) in refused.difference(&self.refused) {
            let why = if ipip_available() {
                "the iptables dataplane does not set up IP-in-IP (tunl0)"
            } else {
                "IP-in-IP needs the kernel's `ipip` module (CONFIG_NET_IPIP), which this kernel does not have"
            };
            error!(
                pool = %name,
                %cidr,
                ipip_mode = %mode,
                "IP pool {name} ({cidr}) refused: ipipMode {mode}, but {why}; no routes are \
                 programmed to its blocks on other nodes (use ipipMode Never with native \
                 routing, or the bpf dataplane)"
            );
        }
        for (name, cidr, _) in self.refused.difference(&refused) {
            info!(pool = %name, %cidr, "IP pool no longer refused");
        }
        self.refused = refused;
        self.refused.iter().map(|(_, cidr, _)| *cidr).collect()
    }

    /// Brings the kernel to `view`, writing only what differs from `applied`.
    async fn write(
        &self,
        applied: &mut Applied,
        rendered: Rendered,
        routes: routes::Routes,
    ) -> Result<Changes, IptablesError> {
        let mut c = Changes::default();

        // 1. Sets first: the rules about to be written may match on new ones.
        let mut script = String::new();
        for (name, members) in &rendered.sets {
            let now = applied.sets.get(name);
            if now.is_some_and(|m| m.as_ref() == Some(members)) {
                continue;
            }
            let max = members.len().next_power_of_two().max(65536);
            let fill = |script: &mut String, target: &str| {
                for m in members {
                    script.push_str(&format!("add {target} {m}\n"));
                }
            };
            let create = |script: &mut String, target: &str| {
                script.push_str(&format!(
                    "create {target} hash:net family inet maxelem {max} -exist\n"
                ));
            };
            if now.is_none() {
                create(&mut script, name);
                script.push_str(&format!("flush {name}\n"));
                fill(&mut script, name);
            } else {
                // Refilled aside and swapped in: a packet sees the old members or the new.
                let temp = format!(
                    "{TEMP_SET_PREFIX}{}",
                    name.strip_prefix(SET_PREFIX).unwrap_or(name)
                );
                create(&mut script, &temp);
                script.push_str(&format!("flush {temp}\n"));
                fill(&mut script, &temp);
                script.push_str(&format!("swap {temp} {name}\n"));
                script.push_str(&format!("destroy {temp}\n"));
            }
            c.written += 1;
        }
        if !script.is_empty() {
            run("ipset", &["restore"], &script).await?;
        }
        for (name, members) in &rendered.sets {
            applied.sets.insert(name.clone(), Some(members.clone()));
        }

        // 2. The chains that changed, and the stale ones, in one transaction.
        let changed: Vec<(&String, &Vec<String>)> = rendered
            .chains
            .iter()
            .filter(|(name, rules)| applied.chains.get(*name) != Some(&Some((*rules).clone())))
            .collect();
        let stale: Vec<String> = applied
            .chains
            .keys()
            .filter(|n| !rendered.chains.contains_key(*n))
            .cloned()
            .collect();
        if !changed.is_empty()
            || !stale.is_empty()
            || !applied.hooks_missing.is_empty()
            || !applied.hooks_extra.is_empty()
        {
            let mut t = String::from("*filter\n");
            // Declaring a chain creates it, or flushes it when it exists: the stale ones are
            // emptied so nothing refers to another when they are deleted below.
            for name in changed.iter().map(|(n, _)| *n).chain(&stale) {
                t.push_str(&format!(":{name} - [0:0]\n"));
            }
            for (name, rules) in &changed {
                for r in *rules {
                    t.push_str(&format!("-A {name} {r}\n"));
                }
            }
            for name in &stale {
                t.push_str(&format!("-X {name}\n"));
            }
            for (builtin, ours) in &applied.hooks_extra {
                t.push_str(&format!("-D {builtin} -j {ours}\n"));
            }
            for (builtin, ours) in &applied.hooks_missing {
                t.push_str(&format!("-I {builtin} 1 -j {ours}\n"));
            }
            t.push_str("COMMIT\n");
            let mut args = vec!["--noflush"];
            if self.backend == Backend::Legacy {
                // x_tables takes one writer at a time, machine-wide: wait for the lock.
                args.extend(["--wait", "10"]);
            }
            run(self.backend.restore(), &args, &t).await?;
            c.compiled = changed
                .iter()
                .filter(|(n, _)| {
                    n.starts_with(render::POLICY_PREFIX) && !applied.chains.contains_key(*n)
                })
                .count();
            c.written += changed.len();
            c.removed += stale.len();
            applied.hooks_missing.clear();
            applied.hooks_extra.clear();
            applied.chains = rendered
                .chains
                .into_iter()
                .map(|(n, r)| (n, Some(r)))
                .collect();
        }

        // 3. Sets no rule matches on any more.
        let unused: Vec<String> = applied
            .sets
            .keys()
            .filter(|n| !rendered.sets.contains_key(*n))
            .cloned()
            .collect();
        if !unused.is_empty() {
            let script: String = unused.iter().map(|n| format!("destroy {n}\n")).collect();
            run("ipset", &["restore"], &script).await?;
            for n in &unused {
                applied.sets.remove(n);
            }
            c.removed += unused.len();
        }

        // 4. Routes.
        let (added, removed) = routes::apply(&applied.routes, &routes, self.host_ifindex).await?;
        applied.routes = routes;
        c.written += added;
        c.removed += removed;
        Ok(c)
    }

    /// Makes the kernel hold `view` for this node.
    pub async fn apply(&mut self, view: KernelView) -> Result<Changes, IptablesError> {
        let refused = self.refuse_ipip_pools(&view);
        let rendered = render::render(&view.endpoints, self.node_ip);
        let routes: routes::Routes = view
            .remote
            .iter()
            .filter(|r| r.same_subnet && !refused.iter().any(|p| p.contains(&r.dst)))
            .map(|r| (r.dst, r.via))
            .collect();
        let mut applied = match self.state.take() {
            Some(a) => a,
            None => self.read_kernel().await?,
        };
        // On failure the state stays unknown: the next write reads the kernel again.
        let c = self.write(&mut applied, rendered, routes).await?;
        self.state = Some(applied);
        Ok(c)
    }
}

/// Removes our chains from the filter table through `backend`: the jumps to them from the
/// built-in chains first, then the chains (flushed, then deleted, so references between
/// them do not matter). Returns (chains, jumps) removed. A backend whose tools are not
/// installed has nothing of ours.
pub async fn remove_ours(backend: Backend) -> Result<(usize, usize), IptablesError> {
    let save = match run(backend.save(), &["-t", "filter"], "").await {
        Ok(s) => s,
        Err(IptablesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok((0, 0));
        }
        Err(e) => return Err(e),
    };
    let mut chains = Vec::new();
    let mut jumps = Vec::new();
    for line in save.lines() {
        if let Some(chain) = line.strip_prefix(':')
            && let Some(name) = chain.split_whitespace().next()
            && name.starts_with(PREFIX)
        {
            chains.push(name.to_owned());
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some(chain) = rule.split_whitespace().next()
            && !chain.starts_with(PREFIX)
            && rule.contains(&format!("-j {PREFIX}"))
        {
            jumps.push(rule.to_owned());
        }
    }
    if chains.is_empty() && jumps.is_empty() {
        return Ok((0, 0));
    }
    let mut input = String::from("*filter\n");
    for rule in &jumps {
        input.push_str(&format!("-D {rule}\n"));
    }
    for chain in &chains {
        input.push_str(&format!("-F {chain}\n"));
    }
    for chain in &chains {
        input.push_str(&format!("-X {chain}\n"));
    }
    input.push_str("COMMIT\n");
    run(backend.restore(), &["--noflush"], &input).await?;
    info!(
        backend = backend.name(),
        chains = chains.len(),
        jumps = jumps.len(),
        "removed our iptables chains"
    );
    Ok((chains.len(), jumps.len()))
}

/// Removes our ipsets (once no rule references them) and our routes (protocol 80). Returns
/// (ipsets, routes) removed. No `ipset` tool: no sets of ours.
pub async fn remove_sets_and_routes() -> Result<(usize, usize), IptablesError> {
    let mut sets = 0;
    match run("ipset", &["list", "-n"], "").await {
        Ok(names) => {
            for name in names
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with(PREFIX))
            {
                run("ipset", &["destroy", name], "").await?;
                sets += 1;
            }
        }
        Err(IptablesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let ours = routes::read().await?;
    let (_, removed) = routes::apply(&ours, &routes::Routes::new(), 0).await?;
    Ok((sets, removed))
}

impl Dataplane for Writer {
    const WHAT: &'static str = "routes and iptables";

    fn program(
        &mut self,
        model: &Model,
        me: &str,
    ) -> impl std::future::Future<Output = Result<Changes, SyncError>> + Send {
        let view = model.kernel_view(me);
        async move { self.apply(view).await.map_err(|e| Box::new(e).into()) }
    }
}

//! The dataplane's userspace: the agent that loads and attaches the TC programs and keeps
//! their maps in step with the datastore, plus the tools that inspect them.
//!
//! One module per concern: [`bpffs`] (the pin directory and its lock), [`attach`] (programs ↔
//! interfaces), [`netlink`] (interface events), [`maps`] (typed access to pinned maps),
//! [`agent`] (the reconcile loop), [`cleanup`] (uninstall), [`health`] and [`metrics`] (its HTTP endpoints), [`pinned`]
//! (map fill and attached interfaces, read from the pins), [`dump`] (map-dump), [`cli`] (the
//! command line), [`install_cni`] (puts the CNI plugin and its config on a node),
//! [`cni_metrics`] (the plugin's latency records to the agent), [`runlock`] (the iptables
//! mode's lock, which `cleanup` checks), [`trace`] (per-interface packet tracing in the
//! programs).
//! [`iptables`] is the other dataplane: routes, iptables and ipsets instead of programs, for
//! comparison.

pub mod agent;
pub mod attach;
pub mod batch;
pub mod bpffs;
pub mod cleanup;
pub mod cli;
pub mod cni;
pub mod cni_metrics;
pub mod ctl;
pub mod datastore;
pub mod dump;
pub mod health;
pub mod install_cni;
pub mod ipam;
pub mod iptables;
pub mod layout;
pub mod maps;
pub mod metrics;
pub mod netlink;
pub mod pinned;
pub mod policy;
pub mod runlock;
pub mod sync;
pub mod trace;

/// The TC programs, built by `build.rs` from the `dataplane-ebpf` crate and embedded so that
/// `dataplane` is one self-contained file.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane-programs"));

/// Default root of the pinned maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/dataplane";

/// Interfaces whose names start with this are pod veths (host side), as in Calico.
pub const WORKLOAD_IFACE_PREFIX: &str = "cali";

/// An error and its causes on one line, each cause once: "attach …: bpf_link_create failed:
/// No such device". Causes whose text the outer message already contains are skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

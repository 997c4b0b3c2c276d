//! Test harness: the cluster in a box from DESIGN.md (fabric, nodes, router, pods, a real etcd,
//! agents), every piece torn down by a guard even when a test panics, with names unique on the
//! machine so tests run in parallel. Needs root.

pub mod checker;
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod load;
pub mod netns;
pub mod netpol;
pub mod packets;
pub mod traffic;

pub use cluster::{
    Agent, Cluster, Etcd, Fabric, Node, PinDirGuard, Pod, Router, dataplane, dataplane_args,
    dataplane_bin, ebpf_variant_object, tcx_programs, wait_attached, wait_ready,
};
pub use netns::{ChildGuard, Netns, unique};

/// Fails loudly when not root: every test here needs it, and a silent skip would hide that
/// nothing ran.
pub fn require_root() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test needs root (network namespaces, BPF); run it through `cargo xtask test`"
    );
}

//! The few helper calls aya-ebpf 0.2 has no safe wrapper for, in one place.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_redir_neigh},
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
};

/// Sends the packet out of `ifindex` (egress: the device's TC egress hook still runs). Only
/// the upgrade test's previous-delivery build uses it.
#[cfg(feature = "previous-delivery")]
#[inline(always)]
pub fn to_egress(ifindex: u32) -> i32 {
    // SAFETY: a plain helper call with scalar arguments.
    let r = unsafe { aya_ebpf::helpers::generated::bpf_redirect(ifindex, 0) };
    r as i32
}

/// Hands the packet to the other end of the veth `ifindex`, in the pod's namespace, as if it
/// had arrived there: no queueing on the host side and no TC egress hook on `ifindex`. Only
/// allowed from a TC ingress hook.
#[inline(always)]
pub fn to_peer(ifindex: u32) -> i32 {
    // SAFETY: a plain helper call with scalar arguments.
    let r = unsafe { bpf_redirect_peer(ifindex, 0) };
    r as i32
}

/// Sends the packet out of `ifindex` with L2 filled by the kernel's neighbour table: toward
/// `next_hop` when given, else toward the packet's own destination (FIB lookup).
#[inline(always)]
pub fn via_neighbour(ifindex: u32, next_hop: Option<[u8; 4]>) -> i32 {
    let r = match next_hop {
        Some(nh) => {
            let mut params = bpf_redir_neigh {
                nh_family: 2, // AF_INET
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: u32::from_ne_bytes(nh),
                },
            };
            // SAFETY: `params` lives on this stack frame for the duration of the call and its
            // size is passed alongside.
            unsafe {
                bpf_redirect_neigh(
                    ifindex,
                    &mut params,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        // SAFETY: a NULL parameter block is allowed (length 0): the kernel does a FIB lookup.
        None => unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) },
    };
    r as i32
}

/// Whether a redirect helper's return value is the redirect verdict.
#[inline(always)]
pub fn redirected(r: i32) -> bool {
    r == TC_ACT_REDIRECT
}

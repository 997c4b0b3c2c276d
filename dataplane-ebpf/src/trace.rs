//! Per-interface packet tracing through aya-log, switched on and off at run time by writing
//! the pinned maps (`dataplane trace`), with no reload.
//!
//! Off (the normal case) it costs one load per packet: `DP_LOG_ON[0]`, an array the verifier
//! inlines into a direct load, is 0 when no interface is traced. Only when it is not is the
//! per-interface hash consulted. A traced packet gets one record after its program decided:
//! the interface, hook, verdict, the outcomes its counters recorded (the drop reason,
//! conntrack's decision, encapsulation), the redirect target and the packet's addresses.
//!
//! What the packet's counters recorded is found by difference: before the program runs, this
//! CPU's counters of (interface, hook) are copied to a per-CPU scratch value (map to map, no
//! stack); afterwards every slot that moved is an outcome of this packet. So the forwarding
//! code carries no tracing at all. The record is written by a BPF subprogram of its own, out
//! of the programs' frames (aya-log reserves the record in its ring buffer, not the stack).

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_REDIRECT},
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{Counters, counter, route_kind};
use network_types::ip::Ipv4Hdr;

use crate::{
    DP_CONFIG, DP_LOG_IFACES, DP_LOG_ON, DP_LOG_SCRATCH, DP_ROUTES,
    counters::Stats,
    packet::{
        ETH_LEN, ETH_P_IP, IPPROTO_IPIP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
    },
};

/// Whether this packet is traced; if so its counters are copied to the scratch value.
#[inline(always)]
pub fn start(ctx: &TcContext, stats: &Stats) -> bool {
    match DP_LOG_ON.get(0) {
        Some(&on) if on != 0 => {}
        _ => return false,
    }
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    snapshot(ifindex, stats.ptr())
}

/// Whether `ifindex` is traced, and the counters copied when it is (a subprogram: only runs
/// when some interface is traced).
#[inline(never)]
fn snapshot(ifindex: u32, counters: *const Counters) -> bool {
    // SAFETY: only tested for presence.
    if unsafe { DP_LOG_IFACES.get(ifindex) }.is_none() || counters.is_null() {
        return false;
    }
    let Some(scratch) = DP_LOG_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: both are this CPU's map values (per-CPU, only this CPU touches them while the
    // program runs); `counters` was checked for null.
    unsafe { *scratch = *counters };
    true
}

/// Writes the record of a traced packet; returns `verdict`.
#[inline(always)]
pub fn finish(ctx: &TcContext, stats: &Stats, h: u8, verdict: i32, traced: bool) -> i32 {
    if traced {
        record(ctx.skb.skb, stats.ptr(), h, verdict);
    }
    verdict
}

/// The slots (outcomes and drop reasons) that moved since the snapshot, as bits.
#[inline(always)]
fn moved(now: &Counters, before: &Counters) -> u32 {
    let mut bits = 0u32;
    let mut slot = counter::PASSED;
    while slot < counter::COUNT {
        if now.values[slot] != before.values[slot] {
            bits |= 1 << slot;
        }
        slot += 1;
    }
    bits
}

/// Numbers only (fixed-size fields: the verifier need not follow strings of every length);
/// the agent names the hook, verdict and slots when it forwards the record
/// (`dataplane::trace::decode`).
#[inline(never)]
fn record(skb: *mut __sk_buff, counters: *const Counters, h: u8, verdict: i32) {
    let ctx = TcContext::new(skb);
    let Some(before) = DP_LOG_SCRATCH.get_ptr(0) else {
        return;
    };
    if counters.is_null() {
        return;
    }
    // SAFETY: this CPU's values of two per-CPU maps, checked for null.
    let bits = unsafe { moved(&*counters, &*before) };
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*skb).ifindex };
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return;
    };
    let ethertype = u16::from_be_bytes(ethertype);
    if ethertype != ETH_P_IP {
        debug!(
            &ctx,
            target: "bpf",
            "if={} hook={} verdict={} moved={:x} ethertype={:x}",
            ifindex,
            h,
            verdict,
            bits,
            ethertype
        );
        return;
    }
    let Ok(mut ip) = ctx.load::<Ipv4Hdr>(ETH_LEN) else {
        return;
    };
    let mut l4 = ETH_LEN + usize::from(ip.vihl & 0x0f) * 4;
    // Encapsulated on the way out: show the packet inside.
    if ip.proto == IPPROTO_IPIP
        && let Ok(inner) = ctx.load::<Ipv4Hdr>(l4)
    {
        ip = inner;
        l4 += usize::from(ip.vihl & 0x0f) * 4;
    }
    // Ports where the protocol has them (ICMP: 0).
    let ports = if matches!(
        ip.proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    ) {
        ctx.load::<[u8; 4]>(l4).unwrap_or([0; 4])
    } else {
        [0; 4]
    };
    let target = if verdict == TC_ACT_REDIRECT {
        redirect_target(ip.dst_addr)
    } else {
        0
    };
    debug!(
        &ctx,
        target: "bpf",
        "if={} hook={} verdict={} moved={:x} proto={} {:i}:{} > {:i}:{} to={}",
        ifindex,
        h,
        verdict,
        bits,
        ip.proto,
        ip.src_addr,
        u16::from_be_bytes([ports[0], ports[1]]),
        ip.dst_addr,
        u16::from_be_bytes([ports[2], ports[3]]),
        target
    );
}
/// Where a redirected packet went: a local pod's veth, else the host NIC.
#[inline(always)]
fn redirect_target(dst: [u8; 4]) -> u32 {
    match DP_ROUTES.get(&Key::new(32, dst)) {
        Some(r) if r.kind == route_kind::LOCAL_WORKLOAD => r.ifindex,
        _ => DP_CONFIG.get(0).map_or(0, |c| c.host_ifindex),
    }
}

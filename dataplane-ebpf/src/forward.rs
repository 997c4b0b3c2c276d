//! Where each packet goes: local pods by redirect, remote pods natively or in IP-in-IP out of
//! the host NIC, everything else to the kernel stack. Every outcome is counted; every drop by
//! its reason.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use dataplane_common::{
    CtTimeouts, EndpointValue, FragKey, NodeConfig, POLICY_NONE, RouteValue, counter, hook,
    route_flags, route_kind,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    DP_CONFIG, DP_COUNTERS, DP_ENDPOINTS, DP_FRAGMENTS, DP_NODES, DP_ROUTES,
    conntrack::{self, Outcome},
    counters::Stats,
    guard, ipip,
    packet::{self, ETH_LEN, Frame, IPPROTO_IPIP},
    redirect,
};

/// skb mark bit of a packet host-egress has already steered out of this same device.
const MARK_STEERED: u32 = 0x0200_0000;

#[inline(always)]
fn route(dst: [u8; 4]) -> Option<RouteValue> {
    DP_ROUTES.get(&Key::new(32, dst)).copied()
}

/// This node's settings, once the agent has written them.
#[inline(always)]
fn config() -> Option<NodeConfig> {
    DP_CONFIG.get(0).copied().filter(|c| c.host_ifindex != 0)
}

#[inline(always)]
fn pass(stats: &Stats) -> i32 {
    stats.add(counter::PASSED, 1);
    TC_ACT_OK
}

#[inline(always)]
fn drop(stats: &Stats, reason: usize) -> i32 {
    stats.add(reason, 1);
    TC_ACT_SHOT
}

#[inline(always)]
fn redirected(stats: &Stats, verdict: i32, outcome: usize) -> i32 {
    if redirect::redirected(verdict) {
        stats.add(outcome, 1);
        verdict
    } else {
        drop(stats, counter::DROP_INTERNAL)
    }
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Hands an IPv4 packet to a pod on this node. The pod's side is judged here: its ingress
/// policy and conntrack, counted at its veth's to-workload hook as if that hook had run. Then
/// the packet is routed (TTL), addressed to the pod's MAC and put straight into the pod's
/// namespace (redirect to the veth's peer), so the host side neither queues it a second time
/// nor runs its egress hook. Called from TC ingress hooks only (from-workload, host ingress).
#[cfg(not(feature = "previous-delivery"))]
#[inline(always)]
fn deliver_local(ctx: &mut TcContext, stats: &Stats, ip: &Ipv4Hdr, r: &RouteValue) -> i32 {
    if packet::decrement_ttl(ctx, ip).is_err() {
        return pass(stats);
    }
    let pod = Stats::of(&DP_COUNTERS, r.ifindex, hook::TO_WORKLOAD);
    pod.add(counter::PACKETS, 1);
    pod.add(counter::BYTES, u64::from(ctx.len()));
    // SAFETY: the value is copied out at once; the map is only written by userspace.
    let Some(ep) = unsafe { DP_ENDPOINTS.get(r.ifindex) }.copied() else {
        return drop(&pod, counter::DROP_NO_ENDPOINT);
    };
    if let Err(verdict) = enforce(ctx, &pod, ip, ep.ingress_policy, false) {
        return verdict;
    }
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return drop(stats, counter::DROP_MALFORMED);
    };
    if packet::set_macs(ctx, &r.mac, &eth.dst_addr).is_err() {
        return drop(stats, counter::DROP_INTERNAL);
    }
    let verdict = redirect::to_peer(r.ifindex);
    if redirect::redirected(verdict) {
        pod.add(counter::PASSED, 1);
    }
    redirected(stats, verdict, counter::REDIRECTED)
}

/// The previous release's delivery, built only for the upgrade test's second build: out of
/// the pod's host veth, whose egress program (to-workload) then checks its ingress policy.
#[cfg(feature = "previous-delivery")]
#[inline(always)]
fn deliver_local(ctx: &mut TcContext, stats: &Stats, ip: &Ipv4Hdr, r: &RouteValue) -> i32 {
    if packet::decrement_ttl(ctx, ip).is_err() {
        return pass(stats);
    }
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return drop(stats, counter::DROP_MALFORMED);
    };
    if packet::set_macs(ctx, &r.mac, &eth.dst_addr).is_err() {
        return drop(stats, counter::DROP_INTERNAL);
    }
    redirected(stats, redirect::to_egress(r.ifindex), counter::REDIRECTED)
}

/// Whether `ip`, once wrapped in 20 more bytes, would exceed the host NIC's MTU. Segmentation
/// offload packets (gso_size set) are cut to size after encapsulation, so only single
/// packets are checked. Pods get an MTU with room for the outer header (CNI default 1480), so
/// this catches pods configured otherwise rather than losing their packets silently.
#[inline(always)]
fn too_big_to_encapsulate(ctx: &TcContext, ip: &Ipv4Hdr, cfg: &NodeConfig) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    cfg.host_mtu != 0
        && gso_size == 0
        && u32::from(u16::from_be_bytes(ip.tot_len)) + packet::IP_LEN as u32 > cfg.host_mtu
}

/// Sends a pod's packet toward the node that hosts its destination.
#[inline(always)]
fn to_remote(ctx: &mut TcContext, stats: &Stats, ip: &Ipv4Hdr, r: &RouteValue) -> i32 {
    let Some(cfg) = config() else {
        return pass(stats);
    };
    if packet::decrement_ttl(ctx, ip).is_err() {
        return pass(stats);
    }
    if r.flags & route_flags::IPIP != 0 {
        if too_big_to_encapsulate(ctx, ip, &cfg) {
            return drop(stats, counter::DROP_TOO_BIG);
        }
        if ipip::encap(ctx, ip, cfg.node_ip, r.next_hop).is_err() {
            return drop(stats, counter::DROP_TOO_BIG);
        }
        // The outer destination may sit behind a router: let the FIB choose the next hop.
        return redirected(
            stats,
            redirect::via_neighbour(cfg.host_ifindex, None),
            counter::ENCAPSULATED,
        );
    }
    if r.flags & route_flags::SAME_SUBNET != 0 {
        return redirected(
            stats,
            redirect::via_neighbour(cfg.host_ifindex, Some(r.next_hop)),
            counter::REDIRECTED,
        );
    }
    // Native routing across subnets needs the fabric to know pod routes: the kernel decides.
    pass(stats)
}

/// The pod behind this veth, once the agent has programmed it (with its policy).
#[inline(always)]
fn endpoint(ctx: &TcContext) -> Option<EndpointValue> {
    // SAFETY: the value is copied out at once; the map is only written by userspace.
    unsafe { DP_ENDPOINTS.get(ifindex(ctx)) }.copied()
}

/// Conntrack and the pod's policy for this packet; `Err` with the verdict when it ends here.
#[inline(always)]
fn enforce(
    ctx: &TcContext,
    stats: &Stats,
    ip: &Ipv4Hdr,
    policy: u32,
    egress: bool,
) -> Result<(), i32> {
    let Ok(flow) = packet::flow(ctx, ip, ETH_LEN) else {
        return Err(drop(stats, counter::DROP_MALFORMED));
    };
    let cfg = config();
    let timeouts = cfg.map_or(CtTimeouts::DEFAULT, |c| c.ct_timeouts);
    // Kubernetes: an isolated pod still accepts connections from its own node (kubelet's
    // probes). Tracked like any other, so the replies pass the pod's egress policy.
    let policy = match cfg {
        Some(c) if !egress && flow.saddr == c.node_ip => POLICY_NONE,
        _ => policy,
    };
    if flow.later_fragment {
        return later_fragment(stats, &flow, policy, egress);
    }
    match conntrack::check(ctx, &flow, policy, egress, &timeouts) {
        Outcome::Tracked => stats.add(counter::CT_TRACKED, 1),
        Outcome::New => stats.add(counter::CT_NEW, 1),
        Outcome::Drop(reason) => return Err(drop(stats, reason)),
    }
    if flow.more_fragments && policy != POLICY_NONE {
        // The rest of this datagram carries no ports: remember that its head was allowed.
        // A full LRU map forgets the oldest; nothing to handle here.
        let _ = DP_FRAGMENTS.insert(frag_key(&flow, egress), 1, 0);
    }
    Ok(())
}

#[inline(always)]
fn frag_key(flow: &packet::Flow, egress: bool) -> FragKey {
    FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        egress: u8::from(egress),
    }
}

/// A fragment after the first has no transport header, so policy cannot judge it: it passes
/// when its datagram's first fragment was allowed at this hook, and only then. Nothing is
/// tracked for it.
#[inline(always)]
fn later_fragment(
    stats: &Stats,
    flow: &packet::Flow,
    policy: u32,
    egress: bool,
) -> Result<(), i32> {
    if policy == POLICY_NONE {
        return Ok(());
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { DP_FRAGMENTS.get(frag_key(flow, egress)) }.is_some() {
        stats.add(counter::CT_TRACKED, 1);
        Ok(())
    } else {
        Err(drop(stats, counter::DROP_POLICY))
    }
}

/// An IPv4 packet at a pod's veth and the pod's endpoint; `Err` with the verdict for
/// anything else (non-IPv4 passes, malformed and unprogrammed pods are dropped).
#[inline(always)]
fn pod_packet(ctx: &TcContext, stats: &Stats) -> Result<(Ipv4Hdr, EndpointValue), i32> {
    let ip = match packet::parse(ctx) {
        Err(()) => return Err(drop(stats, counter::DROP_MALFORMED)),
        Ok(Frame::Other) => return Err(pass(stats)),
        Ok(Frame::Ipv4(ip)) => ip,
    };
    match endpoint(ctx) {
        Some(ep) => Ok((ip, ep)),
        None => Err(drop(stats, counter::DROP_NO_ENDPOINT)),
    }
}

/// TC egress of a pod's veth: the pod's ingress policy, for what the kernel routes to the pod
/// (the node's own traffic, natively routed packets). Packets the programs deliver skip it.
#[inline(always)]
pub fn to_workload(ctx: &TcContext, stats: &Stats) -> i32 {
    let (ip, ep) = match pod_packet(ctx, stats) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    if let Err(verdict) = enforce(ctx, stats, &ip, ep.ingress_policy, false) {
        return verdict;
    }
    pass(stats)
}

/// TC ingress of a pod's veth. Every frame of a programmed pod, IPv4 or not, must carry the
/// pod's MAC (and, in ARP, its MAC and address: [`guard::forged_frame`]).
#[inline(always)]
pub fn from_workload(ctx: &mut TcContext, stats: &Stats) -> i32 {
    let Some(ep) = endpoint(ctx) else {
        // Not programmed yet: non-IPv4 passes, IPv4 is dropped (as to-workload does).
        return match pod_packet(ctx, stats) {
            Ok(_) => drop(stats, counter::DROP_NO_ENDPOINT),
            Err(verdict) => verdict,
        };
    };
    let forged = guard::forged_frame(ctx.skb.skb, guard::mac_word(&ep.mac), ep.ip);
    if forged != 0 {
        return drop(stats, forged);
    }
    let ip = match packet::parse(ctx) {
        Err(()) => return drop(stats, counter::DROP_MALFORMED),
        Ok(Frame::Other) => return pass(stats),
        Ok(Frame::Ipv4(ip)) => ip,
    };
    if ep.ip != ip.src_addr {
        return drop(stats, counter::DROP_SPOOFED_SOURCE);
    }
    if let Err(verdict) = enforce(ctx, stats, &ip, ep.egress_policy, true) {
        return verdict;
    }
    match route(ip.dst_addr) {
        Some(r) if r.kind == route_kind::LOCAL_WORKLOAD => deliver_local(ctx, stats, &ip, &r),
        Some(r) if r.kind == route_kind::REMOTE_BLOCK => to_remote(ctx, stats, &ip, &r),
        _ => pass(stats),
    }
}

/// TC ingress of the host NIC.
#[inline(always)]
pub fn host_ingress(ctx: &mut TcContext, stats: &Stats) -> i32 {
    let ip = match packet::parse(ctx) {
        Err(()) => return drop(stats, counter::DROP_MALFORMED),
        Ok(Frame::Other) => return pass(stats),
        Ok(Frame::Ipv4(ip)) => ip,
    };
    let inner = if ip.proto == IPPROTO_IPIP {
        let Some(cfg) = config() else {
            return pass(stats);
        };
        if ip.dst_addr != cfg.node_ip {
            return pass(stats);
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { DP_NODES.get(ip.src_addr) }.is_none() {
            return drop(stats, counter::DROP_UNKNOWN_IPIP_PEER);
        }
        // Nodes send a bare 20-byte outer header, never fragmented (too big is dropped before
        // encapsulation). Decapsulation removes exactly 20 bytes and TC sees fragments before
        // reassembly: options or a fragment would leave garbage as the "inner packet".
        if !ipip::decapsulable(&ip) {
            return drop(stats, counter::DROP_MALFORMED);
        }
        if ipip::decap(ctx).is_err() {
            return drop(stats, counter::DROP_MALFORMED);
        }
        stats.add(counter::DECAPSULATED, 1);
        match packet::parse(ctx) {
            // Decapsulated once, never twice: no node sends IP-in-IP in IP-in-IP, and a pod's
            // own IP-in-IP (which a pod to a remote pod in an IP-in-IP pool would look like)
            // is not delivered either, so that no tunnel reaches past this one.
            Ok(Frame::Ipv4(inner)) if inner.proto == IPPROTO_IPIP => {
                return drop(stats, counter::DROP_NESTED_IPIP);
            }
            Ok(Frame::Ipv4(inner)) => inner,
            _ => return drop(stats, counter::DROP_MALFORMED),
        }
    } else {
        ip
    };
    match route(inner.dst_addr) {
        Some(r) if r.kind == route_kind::LOCAL_WORKLOAD => deliver_local(ctx, stats, &inner, &r),
        _ => pass(stats),
    }
}

/// TC egress of the host NIC: what the node itself sends to remote pods goes in IP-in-IP
/// like pod traffic.
#[inline(always)]
pub fn host_egress(ctx: &mut TcContext, stats: &Stats) -> i32 {
    let ip = match packet::parse(ctx) {
        Err(()) => return pass(stats),
        Ok(Frame::Other) => return pass(stats),
        Ok(Frame::Ipv4(ip)) => ip,
    };
    let Some(cfg) = config() else {
        return pass(stats);
    };
    // A local pod's packet was already steered by from-workload, and a packet this hook
    // redirected to this same device comes through again (marked): only the node's own,
    // not yet handled traffic is ours here.
    if mark(ctx) & MARK_STEERED != 0
        || route(ip.src_addr).is_some_and(|r| r.kind == route_kind::LOCAL_WORKLOAD)
    {
        return pass(stats);
    }
    match route(ip.dst_addr) {
        Some(r) if r.kind == route_kind::REMOTE_BLOCK && r.flags & route_flags::IPIP != 0 => {
            if too_big_to_encapsulate(ctx, &ip, &cfg) {
                return drop(stats, counter::DROP_TOO_BIG);
            }
            if ipip::encap(ctx, &ip, cfg.node_ip, r.next_hop).is_err() {
                return drop(stats, counter::DROP_TOO_BIG);
            }
            redirected(
                stats,
                redirect::via_neighbour(cfg.host_ifindex, None),
                counter::ENCAPSULATED,
            )
        }
        // Native to a node on our subnet: the kernel would follow its own routes (the default
        // route, say); the pod's node is the next hop.
        Some(r)
            if r.kind == route_kind::REMOTE_BLOCK && r.flags & route_flags::SAME_SUBNET != 0 =>
        {
            ctx.set_mark(mark(ctx) | MARK_STEERED);
            redirected(
                stats,
                redirect::via_neighbour(cfg.host_ifindex, Some(r.next_hop)),
                counter::REDIRECTED,
            )
        }
        _ => pass(stats),
    }
}

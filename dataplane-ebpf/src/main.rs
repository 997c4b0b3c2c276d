//! The dataplane's TC programs. This file holds only the maps and the four entry points; what
//! each step does lives in a module. Read the entry points top to bottom to follow a packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod counters;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    btf_maps::{HashMap, LpmTrie, PerCpuHashMap},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use dataplane_common::{
    CounterKey, Counters, EndpointValue, MAX_COUNTER_KEYS, MAX_ENDPOINTS, MAX_NODES, MAX_ROUTES,
    NodeValue, RouteValue, counter, hook,
};

/// Packets, bytes and outcomes per (interface, hook), per CPU. Pinned as `DP_COUNTERS`.
#[btf_map]
static DP_COUNTERS: PerCpuHashMap<CounterKey, Counters, { MAX_COUNTER_KEYS as usize }> =
    PerCpuHashMap::new();

/// Where each destination is: local pods, remote blocks, hosts, pools (longest prefix wins).
/// Filled by the agent from etcd.
#[btf_map]
static DP_ROUTES: LpmTrie<[u8; 4], RouteValue, { MAX_ROUTES as usize }> = LpmTrie::new();

/// This node's pods by host veth ifindex. Filled by the agent from etcd.
#[btf_map]
static DP_ENDPOINTS: HashMap<u32, EndpointValue, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// The cluster's nodes by address. Filled by the agent from etcd.
#[btf_map]
static DP_NODES: HashMap<[u8; 4], NodeValue, { MAX_NODES as usize }> = HashMap::new();

/// TC ingress of a `cali*` veth: what the pod sends.
#[classifier]
pub fn from_workload(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_WORKLOAD)
}

/// TC egress of a `cali*` veth: what is about to enter the pod.
#[classifier]
pub fn to_workload(ctx: TcContext) -> i32 {
    run(&ctx, hook::TO_WORKLOAD)
}

/// TC ingress of the host NIC: what arrives from the fabric.
#[classifier]
pub fn host_ingress(ctx: TcContext) -> i32 {
    run(&ctx, hook::HOST_INGRESS)
}

/// TC egress of the host NIC: what leaves for the fabric.
#[classifier]
pub fn host_egress(ctx: TcContext) -> i32 {
    run(&ctx, hook::HOST_EGRESS)
}

/// Common path of every hook, for now: account the packet and hand it to the kernel.
#[inline(always)]
fn run(ctx: &TcContext, hook: u8) -> i32 {
    let stats = counters::Stats::get(&DP_COUNTERS, ctx, hook);
    stats.add(counter::PACKETS, 1);
    stats.add(counter::BYTES, u64::from(ctx.len()));
    stats.add(counter::PASSED, 1);
    TC_ACT_OK
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

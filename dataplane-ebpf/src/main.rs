//! The dataplane's TC programs. This file holds only the maps and the four entry points; what
//! each step does lives in a module. Read the entry points top to bottom to follow a packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod conntrack;
mod counters;
mod forward;
mod guard;
mod ipip;
mod packet;
mod policy;
mod redirect;
mod trace;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use dataplane_common::{
    CounterKey, Counters, CtKey, CtValue, EndpointValue, FragKey, MAX_CONNTRACK, MAX_COUNTER_KEYS,
    MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_LOG_IFACES, MAX_NODES, MAX_POLICY_HITS, MAX_POLICY_IP,
    MAX_POLICY_PORT, MAX_POLICY_RULES, MAX_ROUTES, NodeConfig, NodeValue, PolicyHitKey,
    PolicyIpKey, PolicyPortKey, PolicyRuleKey, PolicyRuleMeta, RouteValue, Verdict, counter, hook,
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

/// This node's address and host NIC (index 0). Written by the agent at start.
#[btf_map]
static DP_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Policy address classes of single addresses (pods): (policy, peer address) → class.
/// Filled by the agent; looked up first.
#[btf_map]
static DP_POLICY_IP_EXACT: HashMap<
    PolicyIpKey,
    u32,
    { MAX_POLICY_IP as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Policy address classes of CIDRs (longest prefix wins), for addresses not in the hash.
#[btf_map]
static DP_POLICY_IP: LpmTrie<PolicyIpKey, u32, { MAX_POLICY_IP as usize }> = LpmTrie::new();

/// Policy verdicts by exact key: a port, a protocol's answer, a class's answer (see
/// `PolicyPortKey`). Filled by the agent.
#[btf_map]
static DP_POLICY_PORT_EXACT: HashMap<
    PolicyPortKey,
    Verdict,
    { MAX_POLICY_PORT as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Policy verdicts of blocks of ports (longest prefix wins), consulted only when the
/// protocol's entry says blocks differ.
#[btf_map]
static DP_POLICY_PORT: LpmTrie<PolicyPortKey, Verdict, { MAX_POLICY_PORT as usize }> =
    LpmTrie::new();

/// Packets each rule of a compiled policy decided, per direction, per CPU (policy is only
/// consulted for a connection's first packet at each end). Pinned as `DP_POLICY_HITS`;
/// entries of gone policies are removed by the agent.
#[btf_map]
static DP_POLICY_HITS: PerCpuHashMap<PolicyHitKey, u64, { MAX_POLICY_HITS as usize }> =
    PerCpuHashMap::new();

/// What each compiled rule came from (policy name, rule number, action), for `map-dump
/// policy`. Written by the agent, never read by the programs: declared here so that it is
/// created, BTF'd and pinned with the others.
#[btf_map]
static DP_POLICY_RULES: HashMap<
    PolicyRuleKey,
    PolicyRuleMeta,
    { MAX_POLICY_RULES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Fragmented datagrams whose first fragment was allowed, per hook (LRU: no sweeping).
#[btf_map]
static DP_FRAGMENTS: LruHashMap<FragKey, u8, { MAX_FRAGMENTS as usize }> = LruHashMap::new();

/// Tracked connections. Written by the programs; expired entries are swept by the agent.
#[btf_map]
static DP_CONNTRACK: HashMap<
    CtKey,
    CtValue,
    { MAX_CONNTRACK as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Non-zero when some interface is traced (`dataplane trace`): the one load a packet pays
/// for tracing when nothing is traced. Written by `dataplane trace` with the hash below.
#[btf_map]
static DP_LOG_ON: Array<u32, 1> = Array::new();

/// The traced interfaces by ifindex (value unused). Written by `dataplane trace`.
#[btf_map]
static DP_LOG_IFACES: HashMap<u32, u32, { MAX_LOG_IFACES as usize }> = HashMap::new();

/// This CPU's counters of a traced packet's (interface, hook) before its program ran.
#[btf_map]
static DP_LOG_SCRATCH: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// TC ingress of a `cali*` veth: what the pod sends.
#[classifier]
pub fn from_workload(mut ctx: TcContext) -> i32 {
    let stats = account(&ctx, hook::FROM_WORKLOAD);
    let traced = trace::start(&ctx, &stats);
    let verdict = from_workload_decide(&mut ctx, &stats);
    trace::finish(&ctx, &stats, hook::FROM_WORKLOAD, verdict, traced)
}

/// TC egress of a `cali*` veth: what is about to enter the pod.
#[classifier]
pub fn to_workload(ctx: TcContext) -> i32 {
    let stats = account(&ctx, hook::TO_WORKLOAD);
    let traced = trace::start(&ctx, &stats);
    let verdict = to_workload_decide(&ctx, &stats);
    trace::finish(&ctx, &stats, hook::TO_WORKLOAD, verdict, traced)
}

/// TC ingress of the host NIC: what arrives from the fabric.
#[classifier]
pub fn host_ingress(mut ctx: TcContext) -> i32 {
    let stats = account(&ctx, hook::HOST_INGRESS);
    let traced = trace::start(&ctx, &stats);
    let verdict = host_ingress_decide(&mut ctx, &stats);
    trace::finish(&ctx, &stats, hook::HOST_INGRESS, verdict, traced)
}

/// TC egress of the host NIC: what leaves for the fabric.
#[classifier]
pub fn host_egress(mut ctx: TcContext) -> i32 {
    let stats = account(&ctx, hook::HOST_EGRESS);
    let traced = trace::start(&ctx, &stats);
    let verdict = host_egress_decide(&mut ctx, &stats);
    trace::finish(&ctx, &stats, hook::HOST_EGRESS, verdict, traced)
}

// Each program's work is a BPF subprogram with its own frame, so that the entry point's frame
// stays small: the verifier limits a whole call chain to 512 bytes, and the trace record
// (trace.rs, its own subprogram) is called from the entry point, beside the work rather than
// on top of it. From-workload's work alone takes about 350 bytes (two policy checks inline).

#[inline(never)]
fn from_workload_decide(ctx: &mut TcContext, stats: &counters::Stats) -> i32 {
    forward::from_workload(ctx, stats)
}

#[inline(never)]
fn to_workload_decide(ctx: &TcContext, stats: &counters::Stats) -> i32 {
    forward::to_workload(ctx, stats)
}

#[inline(never)]
fn host_ingress_decide(ctx: &mut TcContext, stats: &counters::Stats) -> i32 {
    forward::host_ingress(ctx, stats)
}

#[inline(never)]
fn host_egress_decide(ctx: &mut TcContext, stats: &counters::Stats) -> i32 {
    forward::host_egress(ctx, stats)
}

/// Counts the packet and its bytes for this interface and hook, and returns its counters.
#[inline(always)]
fn account(ctx: &TcContext, hook: u8) -> counters::Stats {
    let stats = counters::Stats::get(&DP_COUNTERS, ctx, hook);
    stats.add(counter::PACKETS, 1);
    stats.add(counter::BYTES, u64::from(ctx.len()));
    stats
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

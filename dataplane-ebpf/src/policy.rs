//! The policy verdict: a handful of hash lookups (an LPM trie only for CIDR peers and for
//! blocks of ports), whatever the number of rules or set members. The agent compiles each
//! distinct policy into
//! - address classes: all addresses of a class are matched by exactly the same rules; a
//!   hash from (policy, address) for single addresses, a trie for CIDRs;
//! - verdicts: from (policy, class, protocol, port) to the action of the first rule that
//!   matches, with the most common answer stored once per protocol and class.

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::lpm_trie::Key};
use dataplane_common::{
    POLICY_NONE, PolicyHitKey, PolicyIpKey, PolicyPortKey, Verdict, port_kind, verdict,
    verdict_flags,
};

use crate::{
    DP_POLICY_HITS, DP_POLICY_IP, DP_POLICY_IP_EXACT, DP_POLICY_PORT, DP_POLICY_PORT_EXACT,
    packet::Flow,
};

const EEXIST: i32 = 17;

#[inline(always)]
fn key(policy: u32, class: u32, proto: u8, kind: u8, port: u16) -> PolicyPortKey {
    PolicyPortKey {
        policy,
        class,
        proto,
        kind,
        port: port.to_be_bytes(),
    }
}

/// The verdict of (class, protocol, port) in `policy`.
#[inline(always)]
fn lookup(policy: u32, class: u32, proto: u8, port: u16) -> Option<Verdict> {
    // SAFETY (all three gets): values are copied out at once; the maps are only written by
    // userspace.
    let exact = key(policy, class, proto, port_kind::EXACT, port);
    if let Some(v) = unsafe { DP_POLICY_PORT_EXACT.get(exact) } {
        return Some(*v);
    }
    if let Some(d) =
        unsafe { DP_POLICY_PORT_EXACT.get(key(policy, class, proto, port_kind::PROTO, 0)) }
    {
        if d.flags & verdict_flags::RANGES != 0
            && let Some(v) = DP_POLICY_PORT.get(&Key::new(96, exact))
        {
            return Some(*v);
        }
        return Some(*d);
    }
    unsafe { DP_POLICY_PORT_EXACT.get(key(policy, class, 0, port_kind::CLASS, 0)) }.copied()
}

/// Counts one decision of `rule` (`u32::MAX`: none matched) of `policy` in this direction
/// (per CPU). A full map skips the count, never the packet.
///
/// A BPF subprogram, not inlined: its key and the map calls stay out of the callers' frames
/// (from-workload checks two policies since local delivery, and with this inlined its frame
/// passes the 512-byte stack limit). A call costs a few instructions, only where policy is
/// consulted (never on tracked packets).
#[inline(never)]
fn hit(policy: u32, rule: u32, egress: bool) {
    let key = PolicyHitKey::new(policy, rule, egress);
    if let Some(p) = DP_POLICY_HITS.get_ptr_mut(key) {
        // SAFETY: a per-CPU value, only touched by this CPU while the program runs.
        unsafe { *p += 1 };
        return;
    }
    // The first decision of this rule: create the entry (its other CPUs' values start at
    // zero). Another CPU may have won the race: then count in its entry.
    if let Err(e) = DP_POLICY_HITS.insert(key, 1, u64::from(BPF_NOEXIST))
        && e == -EEXIST
        && let Some(p) = DP_POLICY_HITS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe { *p += 1 };
    }
}

/// Whether `policy` allows `flow` with `peer` at the other end. `egress`: the endpoint's
/// egress policy (else its ingress); the decision is counted for the deciding rule.
#[inline(always)]
pub fn allows(policy: u32, flow: &Flow, peer: [u8; 4], egress: bool) -> bool {
    if policy == POLICY_NONE {
        return true;
    }
    let ip = PolicyIpKey { policy, addr: peer };
    // SAFETY: the value is copied out at once; the map is only written by userspace.
    let class = match unsafe { DP_POLICY_IP_EXACT.get(ip) } {
        Some(c) => *c,
        None => match DP_POLICY_IP.get(&Key::new(64, ip)) {
            Some(c) => *c,
            None => {
                hit(policy, u32::MAX, egress);
                return false;
            }
        },
    };
    let Some(mut v) = lookup(policy, class, flow.proto, flow.policy_dport()) else {
        hit(policy, u32::MAX, egress);
        return false;
    };
    if v.sport_table != 0 {
        match lookup(policy, v.sport_table, flow.proto, flow.policy_sport()) {
            Some(s) => v = s,
            None => {
                hit(policy, u32::MAX, egress);
                return false;
            }
        }
    }
    hit(policy, v.rule, egress);
    v.action == verdict::ALLOW
}

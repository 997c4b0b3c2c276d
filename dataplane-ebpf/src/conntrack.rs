//! Connection tracking: a connection is checked against policy on its first packet at each
//! pod it touches, and its later packets (both ways) pass on the strength of the entry.
//!
//! One entry per connection, keyed as its first packet saw it; a packet finds its entry as
//! itself (from the originator) or reversed (a reply). The entry records which ends
//! approved it: the originating pod's egress policy, the answering pod's ingress policy. A
//! reply entering the originator needs the egress approval, a reply leaving the answerer the
//! ingress approval; anything else is a new connection for policy.
//!
//! Entries expire by state (timeouts in the node config); an expired entry is treated as
//! absent and replaced. The table is a plain hash, not LRU: when it is full, tracked
//! connections keep working and new ones are dropped and counted (`drop_conntrack_full`).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use dataplane_common::{CtKey, CtTimeouts, CtValue, counter, ct};

use crate::{
    DP_CONNTRACK,
    packet::{self, Flow, IPPROTO_ICMP, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    policy,
};

/// What conntrack and policy decided.
pub enum Outcome {
    /// Part of a tracked connection.
    Tracked,
    /// A new connection the policy allows (now tracked).
    New,
    /// Dropped for this counter slot's reason.
    Drop(usize),
}

#[inline(always)]
fn key_of(f: &Flow) -> CtKey {
    CtKey {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        _pad: [0; 3],
    }
}

/// Updates a live entry for a packet going forward (from the originator) or back.
#[inline(always)]
fn touch(v: &mut CtValue, f: &Flow, forward: bool, now: u64) {
    v.last_seen_ns = now;
    if forward {
        v.packets_fwd += 1;
    } else {
        v.packets_rev += 1;
        v.flags |= ct::REPLIED;
    }
    if f.proto != IPPROTO_TCP {
        return;
    }
    let fl = f.tcp_flags;
    if fl & TCP_RST != 0 {
        v.state = ct::RESET;
        return;
    }
    if fl & TCP_FIN != 0 {
        v.flags |= if forward { ct::FIN_FWD } else { ct::FIN_REV };
        v.state = if v.flags & (ct::FIN_FWD | ct::FIN_REV) == ct::FIN_FWD | ct::FIN_REV {
            ct::CLOSING
        } else {
            ct::FIN_WAIT
        };
        return;
    }
    match v.state {
        ct::SYN_SENT if !forward && fl & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
            v.state = ct::SYN_RECV;
        }
        ct::SYN_SENT | ct::SYN_RECV if forward && fl & (TCP_SYN | TCP_ACK) == TCP_ACK => {
            v.state = ct::ESTABLISHED;
        }
        _ => {}
    }
}

/// The state a new connection starts in.
#[inline(always)]
fn first_state(f: &Flow) -> u8 {
    if f.proto != IPPROTO_TCP {
        ct::OPEN
    } else if f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        ct::SYN_SENT
    } else {
        // Picked up mid-stream (after an agent restart that lost the table, say): the policy
        // allowed it, so treat it as the established connection it is.
        ct::ESTABLISHED
    }
}

/// A live entry for `key`, or `None` when absent or expired.
#[inline(always)]
fn live(key: &CtKey, t: &CtTimeouts, now: u64) -> Option<*mut CtValue> {
    let p = DP_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value pointer from a successful lookup, valid during the program.
    let v = unsafe { &*p };
    (!t.expired(v, key.proto, now)).then_some(p)
}

/// Whether an ICMP error is about a tracked connection (either way).
#[inline(always)]
fn related(ctx: &aya_ebpf::programs::TcContext, f: &Flow, t: &CtTimeouts, now: u64) -> bool {
    let Ok(inner) = packet::icmp_inner_flow(ctx, f) else {
        return false;
    };
    let k = key_of(&inner);
    live(&k, t, now).is_some() || live(&k.reversed(), t, now).is_some()
}

/// Conntrack and policy for a packet at a pod's veth. `egress`: the pod sends it (its
/// from-workload hook); else it is about to enter the pod (to-workload). `policy` is the
/// pod's compiled policy for that direction.
#[inline(always)]
pub fn check(
    ctx: &aya_ebpf::programs::TcContext,
    f: &Flow,
    policy: u32,
    egress: bool,
    t: &CtTimeouts,
) -> Outcome {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = key_of(f);
    let (mine, other) = if egress {
        (ct::EGRESS_APPROVED, ct::INGRESS_APPROVED)
    } else {
        (ct::INGRESS_APPROVED, ct::EGRESS_APPROVED)
    };
    let new_syn = f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    if let Some(p) = live(&key, t, now) {
        // SAFETY: as in `live`.
        let v = unsafe { &mut *p };
        // A SYN on a closed connection's tuple starts a new one: policy again.
        let reopened = new_syn && v.state >= ct::FIN_WAIT && v.state != ct::OPEN;
        if !reopened {
            if v.flags & mine != 0 {
                touch(v, f, true, now);
                return Outcome::Tracked;
            }
            // Tracked, but approved only by the other end (two pods on this node): this
            // end's policy decides once.
            let peer = if egress { f.daddr } else { f.saddr };
            if !policy::allows(policy, f, peer, egress) {
                return Outcome::Drop(counter::DROP_POLICY);
            }
            v.flags |= mine;
            touch(v, f, true, now);
            return Outcome::New;
        }
    } else if let Some(p) = live(&key.reversed(), t, now) {
        // SAFETY: as in `live`.
        let v = unsafe { &mut *p };
        if v.flags & other != 0 {
            touch(v, f, false, now);
            return Outcome::Tracked;
        }
    }

    if f.proto == IPPROTO_ICMP && packet::icmp_is_error(f.icmp_type) && related(ctx, f, t, now) {
        return Outcome::Tracked;
    }
    let peer = if egress { f.daddr } else { f.saddr };
    if !policy::allows(policy, f, peer, egress) {
        return Outcome::Drop(counter::DROP_POLICY);
    }
    // ICMP errors and RSTs are answers, not connections: let them through untracked.
    if (f.proto == IPPROTO_ICMP && packet::icmp_is_error(f.icmp_type))
        || (f.proto == IPPROTO_TCP && f.tcp_flags & TCP_RST != 0)
    {
        return Outcome::New;
    }
    let v = CtValue {
        created_ns: now,
        last_seen_ns: now,
        packets_fwd: 1,
        packets_rev: 0,
        state: first_state(f),
        flags: mine,
        _pad: [0; 6],
    };
    match DP_CONNTRACK.insert(key, v, u64::from(BPF_ANY)) {
        Ok(()) => Outcome::New,
        Err(_) => Outcome::Drop(counter::DROP_CONNTRACK_FULL),
    }
}

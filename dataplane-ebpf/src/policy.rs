//! The policy verdict: two lookups (three when a rule names source ports), whatever the
//! number of rules or set members. The agent compiles each distinct policy into
//! - an LPM trie from (policy, peer address) to an address class: all addresses of a class
//!   are matched by exactly the same rules, and
//! - an LPM trie from (policy, class, protocol, port) to the action of the first rule that
//!   matches, with the most common answer stored once per protocol and class.

use aya_ebpf::btf_maps::lpm_trie::Key;
use dataplane_common::{POLICY_NONE, PolicyIpKey, PolicyPortKey, Verdict, verdict};

use crate::{DP_POLICY_IP, DP_POLICY_PORT, packet::Flow};

#[inline(always)]
fn lookup(policy: u32, class: u32, proto: u8, port: u16) -> Option<Verdict> {
    let key = PolicyPortKey {
        policy,
        class,
        proto,
        _pad: 0,
        port: port.to_be_bytes(),
    };
    DP_POLICY_PORT.get(&Key::new(96, key)).copied()
}

/// Whether `policy` allows `flow` with `peer` at the other end.
#[inline(always)]
pub fn allows(policy: u32, flow: &Flow, peer: [u8; 4]) -> bool {
    if policy == POLICY_NONE {
        return true;
    }
    let Some(class) = DP_POLICY_IP
        .get(&Key::new(64, PolicyIpKey { policy, addr: peer }))
        .copied()
    else {
        return false;
    };
    let Some(mut v) = lookup(policy, class, flow.proto, flow.policy_dport()) else {
        return false;
    };
    if v.sport_table != 0 {
        match lookup(policy, v.sport_table, flow.proto, flow.policy_sport()) {
            Some(s) => v = s,
            None => return false,
        }
    }
    v.action == verdict::ALLOW
}

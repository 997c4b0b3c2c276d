//! What a pod may put in a frame besides its IPv4 source: its own MAC as the Ethernet source,
//! and in ARP its own MAC and address as the sender. The IPv4 source is checked where the
//! packet is routed (forward.rs); this is the layer below it.
//!
//! A BPF subprogram, not inlined: its loads stay out of from-workload's frame, which is close
//! to the 512-byte limit (the verifier adds this frame to the caller's, so it is kept small).

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use dataplane_common::counter;

const ETH_P_ARP: u16 = 0x0806;
/// An ARP header for IPv4 over Ethernet begins so: hardware type 1, protocol 0x0800,
/// hardware address length 6, protocol address length 4.
const ARP_IPV4_OVER_ETHERNET: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];

/// A MAC as a number, so that it can be passed in a register.
#[inline(always)]
pub fn mac_word(mac: &[u8; 6]) -> u64 {
    u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
}

/// Why a frame from the pod whose MAC is `mac` ([`mac_word`]) and address `ip` (network
/// order, as read from the map) is forged: the counter slot of the reason, or 0 when it is
/// not. A frame too short for its Ethernet header is left to the IPv4 parser.
///
/// - Ethernet source other than the pod's MAC: `drop_spoofed_mac`.
/// - ARP (the pod resolves its gateway 169.254.1.1, answered by proxy ARP on the host side,
///   and answers the host's requests for its own address): only IPv4 over Ethernet
///   (`drop_malformed` otherwise), the sender hardware address must be the pod's MAC
///   (`drop_spoofed_mac`) and the sender address the pod's or 0.0.0.0 (an RFC 5227 probe;
///   `drop_spoofed_source`). The kernel learns a neighbour from a request it answers, so a
///   forged sender would otherwise plant an entry on the host side of the veth.
#[inline(never)]
pub fn forged_frame(skb: *mut __sk_buff, mac: u64, ip: [u8; 4]) -> usize {
    let ctx = TcContext::new(skb);
    let Ok(eth) = ctx.load::<[u8; 14]>(0) else {
        return 0;
    };
    let src = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    if mac_word(&src) != mac {
        return counter::DROP_SPOOFED_MAC;
    }
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_ARP {
        return 0;
    }
    let Ok(arp) = ctx.load::<[u8; 28]>(14) else {
        return counter::DROP_MALFORMED;
    };
    if arp[..6] != ARP_IPV4_OVER_ETHERNET {
        return counter::DROP_MALFORMED;
    }
    let sha = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
    if mac_word(&sha) != mac {
        return counter::DROP_SPOOFED_MAC;
    }
    let spa = [arp[14], arp[15], arp[16], arp[17]];
    if spa != ip && spa != [0; 4] {
        return counter::DROP_SPOOFED_SOURCE;
    }
    0
}

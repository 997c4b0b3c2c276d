//! IP-in-IP done by the programs themselves: this kernel has no ipip module (no tunl0), so an
//! encapsulated packet must be built and taken apart here.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;

use crate::packet::{ETH_LEN, IP_LEN, IPPROTO_IPIP, ipv4_checksum};

const OUTER_TTL: u8 = 64;

/// Wraps the IPv4 packet `inner` in an outer IPv4 header from `src` to `dst`.
#[inline(always)]
pub fn encap(ctx: &mut TcContext, inner: &Ipv4Hdr, src: [u8; 4], dst: [u8; 4]) -> Result<(), ()> {
    let inner_len = u16::from_be_bytes(inner.tot_len);
    let total = inner_len.checked_add(IP_LEN as u16).ok_or(())?;
    ctx.adjust_room(
        IP_LEN as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4),
    )
    .map_err(|_| ())?;
    let mut outer = Ipv4Hdr {
        vihl: 0x45,
        tos: inner.tos,
        tot_len: total.to_be_bytes(),
        id: [0, 0],
        // DF copied from the inner packet: a packet that may not be fragmented stays so.
        frags: [inner.frags[0] & 0x40, 0],
        ttl: OUTER_TTL,
        proto: IPPROTO_IPIP,
        check: [0, 0],
        src_addr: src,
        dst_addr: dst,
    };
    outer.check = ipv4_checksum(&outer).to_be_bytes();
    ctx.store(ETH_LEN, &outer, 0).map_err(|_| ())
}

/// Removes the outer IPv4 header (the frame must hold IP-in-IP).
#[inline(always)]
pub fn decap(ctx: &mut TcContext) -> Result<(), ()> {
    ctx.adjust_room(
        -(IP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
    )
    .map_err(|_| ())
}

/// Whether the outer header `outer` can be removed by [`decap`]: exactly 20 bytes (no
/// options) and a whole packet (neither MF nor a fragment offset).
#[inline(always)]
pub fn decapsulable(outer: &Ipv4Hdr) -> bool {
    outer.vihl == 0x45 && u16::from_be_bytes(outer.frags) & 0x3fff == 0
}

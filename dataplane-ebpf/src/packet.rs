//! Reading and rewriting the Ethernet and IPv4 headers.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_IPIP: u8 = 4;
pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_LEN: usize = Ipv4Hdr::LEN;
/// Offset of the IPv4 checksum in the frame.
const IP_CSUM_OFF: usize = ETH_LEN + 10;
/// Offset of the IPv4 TTL (and protocol, the other half of its 16-bit checksum word).
const IP_TTL_OFF: usize = ETH_LEN + 8;

/// What the frame holds.
pub enum Frame {
    /// Not IPv4 (ARP, IPv6, …): not ours to route.
    Other,
    Ipv4(Ipv4Hdr),
}

/// Parses the frame. A frame whose IPv4 header is inconsistent (version, header length,
/// total length beyond the frame) is `Err`: malformed, to be dropped and counted.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Frame, ()> {
    let eth: EthHdr = ctx.load(0).map_err(|_| ())?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return Ok(Frame::Other);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| ())?;
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes(ip.tot_len));
    if ip.vihl >> 4 != 4 || ihl < IP_LEN || total < ihl || ETH_LEN + total > ctx.len() as usize {
        return Err(());
    }
    Ok(Frame::Ipv4(ip))
}

/// Decrements the TTL as a router does, fixing the checksum incrementally. `Err` when the
/// packet must not be forwarded (TTL would reach 0): the kernel stack then answers with ICMP.
#[inline(always)]
pub fn decrement_ttl(ctx: &mut TcContext, ip: &Ipv4Hdr) -> Result<(), ()> {
    if ip.ttl <= 1 {
        return Err(());
    }
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new = u16::from_be_bytes([ip.ttl - 1, ip.proto]);
    ctx.store(IP_TTL_OFF, &(ip.ttl - 1), 0).map_err(|_| ())?;
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        2,
    )
    .map_err(|_| ())
}

/// Sets the Ethernet destination and source.
#[inline(always)]
pub fn set_macs(ctx: &mut TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    ctx.store(0, dst, 0).map_err(|_| ())?;
    ctx.store(6, src, 0).map_err(|_| ())
}

/// The Internet checksum of an IPv4 header without options.
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    let words = [
        u16::from_be_bytes([h.vihl, h.tos]),
        u16::from_be_bytes(h.tot_len),
        u16::from_be_bytes(h.id),
        u16::from_be_bytes(h.frags),
        u16::from_be_bytes([h.ttl, h.proto]),
        u16::from_be_bytes([h.src_addr[0], h.src_addr[1]]),
        u16::from_be_bytes([h.src_addr[2], h.src_addr[3]]),
        u16::from_be_bytes([h.dst_addr[0], h.dst_addr[1]]),
        u16::from_be_bytes([h.dst_addr[2], h.dst_addr[3]]),
    ];
    let mut sum = 0u32;
    for w in words {
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

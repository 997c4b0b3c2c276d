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

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// ICMP types that carry the start of the packet they are about.
#[inline(always)]
pub fn icmp_is_error(t: u8) -> bool {
    matches!(t, 3 | 4 | 5 | 11 | 12)
}

/// The transport view of an IPv4 packet: what conntrack and policy look at.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub proto: u8,
    /// Network order. For ICMP echo both hold the identifier; 0 where there are no ports
    /// (and in later fragments, which carry no transport header).
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// TCP flags; ICMP type and code.
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Offset of the transport header in the frame.
    pub l4_off: usize,
    /// A fragment other than the first.
    pub later_fragment: bool,
    /// More fragments follow (MF set).
    pub more_fragments: bool,
    /// The IP identification, network order.
    pub ip_id: [u8; 2],
}

impl Flow {
    /// The "port" policy matches for this packet's destination: the port, or for ICMP
    /// type << 8 | code.
    #[inline(always)]
    pub fn policy_dport(&self) -> u16 {
        if self.proto == IPPROTO_ICMP {
            u16::from_be_bytes([self.icmp_type, self.icmp_code])
        } else {
            u16::from_be_bytes(self.dport)
        }
    }

    #[inline(always)]
    pub fn policy_sport(&self) -> u16 {
        if self.proto == IPPROTO_ICMP {
            0
        } else {
            u16::from_be_bytes(self.sport)
        }
    }
}

/// Reads the transport header of `ip` (at `l3_off` in the frame). `Err` when the header the
/// protocol needs is cut short.
#[inline(always)]
pub fn flow(ctx: &TcContext, ip: &Ipv4Hdr, l3_off: usize) -> Result<Flow, ()> {
    let l4_off = l3_off + usize::from(ip.vihl & 0x0f) * 4;
    // The transport header must lie within the IP packet, not in padding after it.
    let ip_end = l3_off + usize::from(u16::from_be_bytes(ip.tot_len));
    let within = |len: usize| {
        if l4_off + len <= ip_end {
            Ok(())
        } else {
            Err(())
        }
    };
    let mut f = Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        proto: ip.proto,
        sport: [0; 2],
        dport: [0; 2],
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        l4_off,
        later_fragment: u16::from_be_bytes(ip.frags) & 0x1fff != 0,
        more_fragments: u16::from_be_bytes(ip.frags) & 0x2000 != 0,
        ip_id: ip.id,
    };
    if f.later_fragment {
        return Ok(f);
    }
    match ip.proto {
        IPPROTO_TCP => {
            within(14)?;
            let h: [u8; 14] = ctx.load(l4_off).map_err(|_| ())?;
            f.sport = [h[0], h[1]];
            f.dport = [h[2], h[3]];
            f.tcp_flags = h[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            within(4)?;
            let h: [u8; 4] = ctx.load(l4_off).map_err(|_| ())?;
            f.sport = [h[0], h[1]];
            f.dport = [h[2], h[3]];
        }
        IPPROTO_ICMP => {
            within(8)?;
            let h: [u8; 8] = ctx.load(l4_off).map_err(|_| ())?;
            f.icmp_type = h[0];
            f.icmp_code = h[1];
            if h[0] == 8 || h[0] == 0 {
                f.sport = [h[4], h[5]];
                f.dport = [h[4], h[5]];
            }
        }
        _ => {}
    }
    Ok(f)
}

/// The packet an ICMP error is about (its IP header and first 8 transport bytes follow the
/// ICMP header), as a flow in the direction that packet travelled.
#[inline(always)]
pub fn icmp_inner_flow(ctx: &TcContext, outer: &Flow) -> Result<Flow, ()> {
    let inner_off = outer.l4_off + 8;
    let ip: Ipv4Hdr = ctx.load(inner_off).map_err(|_| ())?;
    if ip.vihl >> 4 != 4 || usize::from(ip.vihl & 0x0f) * 4 < IP_LEN {
        return Err(());
    }
    let l4 = inner_off + usize::from(ip.vihl & 0x0f) * 4;
    let h: [u8; 8] = ctx.load(l4).map_err(|_| ())?;
    let mut f = Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        proto: ip.proto,
        sport: [h[0], h[1]],
        dport: [h[2], h[3]],
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        l4_off: l4,
        later_fragment: false,
        more_fragments: false,
        ip_id: ip.id,
    };
    if ip.proto == IPPROTO_ICMP {
        f.sport = [h[4], h[5]];
        f.dport = [h[4], h[5]];
    } else if !matches!(
        ip.proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    ) {
        f.sport = [0; 2];
        f.dport = [0; 2];
    }
    Ok(f)
}

//! Small builders for the byte vectors unit tests feed the programs, and a BPF_PROG_TEST_RUN
//! wrapper around the embedded object.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuHashMap, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use dataplane_common::{
    CounterKey, Counters, CtKey, CtTimeouts, CtValue, EndpointValue, NodeConfig, NodeValue,
    PolicyIpKey, PolicyPortKey, RouteValue, Verdict, counter, map_names,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;
/// The Ethernet source of the frames these builders make (and their destination
/// [`FRAME_DST_MAC`]): a test that plays a pod programs this as the pod's MAC, since
/// from-workload drops frames from any other.
pub const FRAME_SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const FRAME_DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// Sends `inner` (an IPv4 packet) in IP-in-IP from namespace `ns` to each address of `dsts`
/// in turn, through a raw socket: the kernel adds the outer header from `ns`'s own address
/// and routes, as a host (or a pod) with root in `ns` could.
pub fn send_ipip(ns: &crate::netns::Netns, dsts: &[Ipv4Addr], inner: &[u8]) {
    ns.run(|| {
        // SAFETY: plain socket syscalls on a descriptor this closure owns and closes; the
        // address and buffer outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP);
            assert!(
                fd >= 0,
                "raw IPIP socket: {}",
                std::io::Error::last_os_error()
            );
            for dst in dsts {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(dst.octets()),
                    },
                    sin_zero: [0; 8],
                };
                let sent = libc::sendto(
                    fd,
                    inner.as_ptr().cast(),
                    inner.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                );
                assert_eq!(
                    sent,
                    inner.len() as isize,
                    "send: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&src);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v
}

/// An IPv4 header (no options) with a correct checksum, for `payload_len` bytes after it.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize, ttl: u8) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// A UDP header and payload (checksum 0: optional over IPv4).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

/// A whole Ethernet/IPv4/UDP frame.
pub fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let l4 = udp(40000, 53, payload);
    let mut f = eth(FRAME_DST_MAC, FRAME_SRC_MAC, ETH_P_IP);
    f.extend(ipv4(src, dst, IPPROTO_UDP, l4.len(), 64));
    f.extend(l4);
    f
}

/// An ARP request for IPv4 over Ethernet (padded to the 60-byte minimum as a NIC would):
/// Ethernet source `eth_src`, sender `sha`/`spa`, asking for `tpa`.
pub fn arp_request(eth_src: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = eth([0xff; 6], eth_src, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f.resize(60, 0);
    f
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;

/// A TCP header (20 bytes, checksum 0: the programs do not check it) with `flags`.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    v
}

/// A frame carrying `l4` as protocol `proto`.
pub fn frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = eth(FRAME_DST_MAC, FRAME_SRC_MAC, ETH_P_IP);
    f.extend(ipv4(src, dst, proto, l4.len(), 64));
    f.extend_from_slice(l4);
    f
}

pub fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frame(src, dst, IPPROTO_TCP, &tcp(sport, dport, flags))
}

pub fn udp_frame_ports(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    frame(src, dst, IPPROTO_UDP, &udp(sport, dport, b"x"))
}

/// An ICMP message: type, code, 4 bytes of rest-of-header, then `body`.
pub fn icmp(t: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut v = vec![t, code, 0, 0];
    v.extend_from_slice(&rest);
    v.extend_from_slice(body);
    let c = checksum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

/// The object loaded privately (nothing pinned, nothing attached) for BPF_PROG_TEST_RUN.
pub struct TestObject {
    pub ebpf: Ebpf,
}

/// What one run of a program gave back.
#[derive(Debug)]
pub struct RunResult {
    pub return_value: i32,
    pub data: Vec<u8>,
}

impl TestObject {
    pub fn load() -> Self {
        let mut ebpf = Ebpf::load(dataplane::EBPF_OBJECT).expect("load the embedded object");
        for name in [
            "from_workload",
            "to_workload",
            "host_ingress",
            "host_egress",
        ] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
        }
        Self { ebpf }
    }

    /// Runs `program` once on `packet` and returns its verdict and the packet after it.
    pub fn run(&self, program: &str, packet: &[u8]) -> RunResult {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("test_run {program}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        RunResult {
            return_value: result.return_value as i32,
            data: out,
        }
    }

    /// Sets this node's address and host NIC in the config map (default timeouts).
    pub fn set_config(&mut self, node_ip: Ipv4Addr, host_ifindex: u32) {
        self.set_config_timeouts(node_ip, host_ifindex, CtTimeouts::DEFAULT);
    }

    /// Sets the config with conntrack timeouts.
    pub fn set_config_timeouts(&mut self, node_ip: Ipv4Addr, host_ifindex: u32, t: CtTimeouts) {
        let mut m: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(
            0,
            NodeConfig {
                node_ip: node_ip.octets(),
                host_ifindex,
                host_mtu: 1500,
                _pad: 0,
                ct_timeouts: t,
            },
            0,
        )
        .unwrap();
    }

    /// Writes an endpoint with its policy ids.
    pub fn set_endpoint(&mut self, ifindex: u32, ep: EndpointValue) {
        let mut m: HashMap<&mut MapData, u32, EndpointValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::ENDPOINTS).unwrap()).unwrap();
        m.insert(ifindex, ep, 0).unwrap();
    }

    /// Writes a compiled policy's entries.
    pub fn install_policy(&mut self, e: &dataplane::policy::compile::Entries) {
        let t = e.tables();
        let mut ip: LpmTrie<&mut MapData, PolicyIpKey, u32> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::POLICY_IP).unwrap()).unwrap();
        for (&(plen, k), v) in &t.ip_lpm {
            ip.insert(&Key::new(plen, k), *v, 0).unwrap();
        }
        let mut ip: HashMap<&mut MapData, PolicyIpKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(map_names::POLICY_IP_EXACT).unwrap()).unwrap();
        for (k, v) in &t.ip_exact {
            ip.insert(k, *v, 0).unwrap();
        }
        let mut port: LpmTrie<&mut MapData, PolicyPortKey, Verdict> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::POLICY_PORT).unwrap()).unwrap();
        for (&(plen, k), v) in &t.port_lpm {
            port.insert(&Key::new(plen, k), *v, 0).unwrap();
        }
        let mut port: HashMap<&mut MapData, PolicyPortKey, Verdict> =
            HashMap::try_from(self.ebpf.map_mut(map_names::POLICY_PORT_EXACT).unwrap()).unwrap();
        for (k, v) in &t.port_exact {
            port.insert(k, *v, 0).unwrap();
        }
    }

    /// The fragments map (datagrams whose first fragment was allowed).
    pub fn fragments(&mut self) -> HashMap<&mut MapData, dataplane_common::FragKey, u8> {
        HashMap::try_from(self.ebpf.map_mut(map_names::FRAGMENTS).unwrap()).unwrap()
    }

    /// The conntrack map.
    pub fn conntrack(&mut self) -> HashMap<&mut MapData, CtKey, CtValue> {
        HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).unwrap()).unwrap()
    }

    pub fn add_route(&mut self, addr: Ipv4Addr, prefix: u32, route: RouteValue) {
        let mut m: LpmTrie<&mut MapData, [u8; 4], RouteValue> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ROUTES).unwrap()).unwrap();
        m.insert(&Key::new(prefix, addr.octets()), route, 0)
            .unwrap();
    }

    pub fn add_node(&mut self, addr: Ipv4Addr) {
        let mut m: HashMap<&mut MapData, [u8; 4], NodeValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::NODES).unwrap()).unwrap();
        m.insert(addr.octets(), NodeValue::default(), 0).unwrap();
    }

    pub fn add_endpoint(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) {
        let mut m: HashMap<&mut MapData, u32, EndpointValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::ENDPOINTS).unwrap()).unwrap();
        m.insert(
            ifindex,
            EndpointValue {
                ip: ip.octets(),
                mac,
                flags: 0,
                ingress_policy: 0,
                egress_policy: 0,
            },
            0,
        )
        .unwrap();
    }

    /// The counters of (ifindex, hook), summed over CPUs.
    pub fn counters(&self, ifindex: u32, hook: u8) -> [u64; counter::COUNT] {
        let map: PerCpuHashMap<&MapData, CounterKey, Counters> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        match map.get(&CounterKey::new(ifindex, hook), 0) {
            Ok(per_cpu) => {
                let mut sum = [0u64; counter::COUNT];
                for c in per_cpu.iter() {
                    for (s, v) in sum.iter_mut().zip(c.values) {
                        *s += v;
                    }
                }
                sum
            }
            Err(_) => [0; counter::COUNT],
        }
    }
}

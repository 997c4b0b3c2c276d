//! Hostile frames against the TC programs (needs root): forged MACs and ARP from a pod,
//! IP-in-IP inside IP-in-IP, outer headers that cannot be decapsulated, IP options, bad
//! checksums and bad lengths. First through BPF_PROG_TEST_RUN on crafted frames (verdict and
//! counter), then live in the cluster in a box, sent from a pod's namespace by raw sockets.

use std::{net::Ipv4Addr, time::Duration};

use dataplane::policy::compile::{self, CompiledRule, ProtoMatch, Term};
use dataplane_common::{EndpointValue, RouteValue, counter, hook, route_flags, route_kind};
use dataplane_tests::{
    packets::*,
    require_root,
    traffic::{Deployment, Pod, ping},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
/// BPF_PROG_TEST_RUN runs skb programs as if on ifindex 1: the pod's veth here.
const IFINDEX: u32 = 1;
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 3);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 130);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const FORGED_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x66];
const UDP_ONLY: u32 = 7;

/// Node 192.168.1.10 with the pod 10.65.0.2 (MAC [`FRAME_SRC_MAC`]) behind ifindex 1 and
/// node 192.168.2.10 owning 10.65.0.128/26 in IP-in-IP.
fn node_object() -> TestObject {
    let mut obj = TestObject::load();
    obj.set_config(NODE, 1);
    obj.add_node(PEER);
    obj.add_endpoint(IFINDEX, POD, FRAME_SRC_MAC);
    obj.add_route(
        Ipv4Addr::new(10, 65, 0, 128),
        26,
        RouteValue {
            kind: route_kind::REMOTE_BLOCK,
            flags: route_flags::IPIP,
            next_hop: PEER.octets(),
            ..RouteValue::default()
        },
    );
    obj.add_route(
        POD,
        32,
        RouteValue {
            kind: route_kind::LOCAL_WORKLOAD,
            ifindex: IFINDEX,
            mac: FRAME_SRC_MAC,
            ..RouteValue::default()
        },
    );
    obj
}

fn counters(obj: &TestObject, h: u8) -> [u64; counter::COUNT] {
    obj.counters(IFINDEX, h)
}

/// `f` with its Ethernet source replaced.
fn with_eth_src(mut f: Vec<u8>, src: [u8; 6]) -> Vec<u8> {
    f[6..12].copy_from_slice(&src);
    f
}

#[test]
fn root_test_run_a_forged_source_mac_is_dropped_and_counted_whatever_the_frame() {
    require_root();
    let obj = node_object();
    let honest = udp_frame(POD, REMOTE_POD, b"x");
    assert_eq!(
        obj.run("from_workload", &honest).return_value,
        TC_ACT_REDIRECT
    );
    // The right IPv4 source behind a wrong MAC; and a frame that is not IPv4 at all.
    let forged = with_eth_src(udp_frame(POD, REMOTE_POD, b"x"), FORGED_MAC);
    assert_eq!(obj.run("from_workload", &forged).return_value, TC_ACT_SHOT);
    let mut ipv6 = eth([0x33, 0x33, 0, 0, 0, 1], FORGED_MAC, 0x86dd);
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 59, 255]);
    ipv6.extend_from_slice(&[0; 32]);
    assert_eq!(obj.run("from_workload", &ipv6).return_value, TC_ACT_SHOT);
    // The same IPv6 frame from the pod's own MAC is not ours to judge: it passes.
    let own = with_eth_src(ipv6, FRAME_SRC_MAC);
    assert_eq!(obj.run("from_workload", &own).return_value, TC_ACT_OK);
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::DROP_SPOOFED_MAC], 2);
    assert_eq!(c[counter::DROP_SPOOFED_SOURCE], 0);
    assert_eq!((c[counter::ENCAPSULATED], c[counter::PASSED]), (1, 1));
}

#[test]
fn root_test_run_arp_from_a_pod_must_name_its_own_mac_and_address() {
    require_root();
    let obj = node_object();
    let mac = FRAME_SRC_MAC;
    // What a pod's kernel sends: a request for its gateway, and an RFC 5227 probe.
    for ok in [
        arp_request(mac, mac, POD, GATEWAY),
        arp_request(mac, mac, Ipv4Addr::UNSPECIFIED, POD),
    ] {
        assert_eq!(obj.run("from_workload", &ok).return_value, TC_ACT_OK);
    }
    // Forged: the Ethernet source, the sender MAC, the sender address (another pod's).
    let cases = [
        (
            arp_request(FORGED_MAC, mac, POD, GATEWAY),
            "ethernet source",
        ),
        (arp_request(mac, FORGED_MAC, POD, GATEWAY), "sender MAC"),
        (arp_request(mac, mac, OTHER_POD, GATEWAY), "sender address"),
    ];
    for (f, what) in &cases {
        assert_eq!(
            obj.run("from_workload", f).return_value,
            TC_ACT_SHOT,
            "forged {what}"
        );
    }
    // ARP for another protocol than IPv4 (hardware type 6): not something a pod sends.
    let mut odd = arp_request(mac, mac, POD, GATEWAY);
    odd[15] = 6;
    assert_eq!(obj.run("from_workload", &odd).return_value, TC_ACT_SHOT);
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::PASSED], 2);
    assert_eq!(c[counter::DROP_SPOOFED_MAC], 2);
    assert_eq!(c[counter::DROP_SPOOFED_SOURCE], 1);
    assert_eq!(c[counter::DROP_MALFORMED], 1);
}

#[test]
fn root_test_run_an_unprogrammed_pod_may_arp_but_sends_no_ipv4() {
    require_root();
    let obj = TestObject::load();
    let arp = arp_request(FORGED_MAC, FORGED_MAC, POD, GATEWAY);
    assert_eq!(obj.run("from_workload", &arp).return_value, TC_ACT_OK);
    let pkt = udp_frame(POD, REMOTE_POD, b"x");
    assert_eq!(obj.run("from_workload", &pkt).return_value, TC_ACT_SHOT);
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!((c[counter::PASSED], c[counter::DROP_NO_ENDPOINT]), (1, 1));
}

/// An IP-in-IP frame from `outer_src` to this node carrying `inner_ip` (an IPv4 packet).
fn ipip_frame(outer_src: Ipv4Addr, inner_ip: &[u8]) -> Vec<u8> {
    let mut f = eth([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 8], ETH_P_IP);
    f.extend(ipv4(outer_src, NODE, 4, inner_ip.len(), 64));
    f.extend_from_slice(inner_ip);
    f
}

/// Recomputes the IPv4 header checksum of the header at `off` in `f`.
fn fix_ip_checksum(f: &mut [u8], off: usize) {
    let ihl = usize::from(f[off] & 0x0f) * 4;
    f[off + 10..off + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f[off..off + ihl]);
    f[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn root_test_run_ipip_inside_ipip_is_decapsulated_once_then_dropped_and_counted() {
    require_root();
    let obj = node_object();
    // A node's tunnel carrying a second tunnel, whose packet is for the local pod.
    let innermost = udp_frame(REMOTE_POD, POD, b"nested")[14..].to_vec();
    let mut middle = ipv4(REMOTE_POD, POD, 4, innermost.len(), 64);
    middle.extend_from_slice(&innermost);
    let r = obj.run("host_ingress", &ipip_frame(PEER, &middle));
    assert_eq!(r.return_value, TC_ACT_SHOT);
    let c = counters(&obj, hook::HOST_INGRESS);
    assert_eq!(c[counter::DECAPSULATED], 1);
    assert_eq!(c[counter::DROP_NESTED_IPIP], 1);
    assert_eq!(c[counter::REDIRECTED], 0);
    assert_eq!(
        counters(&obj, hook::TO_WORKLOAD)[counter::PACKETS],
        0,
        "nothing reached the pod"
    );
    // The single tunnel still delivers.
    let r = obj.run("host_ingress", &ipip_frame(PEER, &innermost));
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
}

#[test]
fn root_test_run_an_outer_header_with_options_or_fragmented_is_not_decapsulated() {
    require_root();
    let obj = node_object();
    let inner = udp_frame(REMOTE_POD, POD, b"reply")[14..].to_vec();
    // Outer header with 4 bytes of options (NOP NOP NOP EOL): IHL 6.
    let mut opts = ipip_frame(PEER, &inner);
    opts.splice(34..34, [1, 1, 1, 0]);
    opts[14] = 0x46;
    let total = (24 + inner.len()) as u16;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut opts, 14);
    // A first fragment (MF) and a later one (offset 8 bytes) of an outer packet.
    let mut first = ipip_frame(PEER, &inner);
    first[20] = 0x20;
    fix_ip_checksum(&mut first, 14);
    let mut later = ipip_frame(PEER, &inner);
    later[21] = 1;
    fix_ip_checksum(&mut later, 14);
    for (f, what) in [(&opts, "options"), (&first, "MF"), (&later, "offset")] {
        let r = obj.run("host_ingress", f);
        assert_eq!(r.return_value, TC_ACT_SHOT, "outer {what}");
        assert_eq!(r.data, *f, "outer {what}: left as it was");
    }
    let c = counters(&obj, hook::HOST_INGRESS);
    assert_eq!(c[counter::DROP_MALFORMED], 3);
    assert_eq!(c[counter::DECAPSULATED], 0);
}

/// A policy allowing UDP (to any port) and nothing else.
fn udp_only() -> dataplane::policy::compile::Entries {
    let rule = CompiledRule {
        action: dataplane_common::verdict::ALLOW,
        terms: vec![Term {
            proto: ProtoMatch::Is(17),
            ..Term::any()
        }],
        origin: String::new(),
    };
    compile::compile(UDP_ONLY, &[rule], 1 << 20).unwrap()
}

#[test]
fn root_test_run_a_pods_own_ipip_is_policed_like_any_protocol_and_never_decapsulated() {
    require_root();
    let mut obj = node_object();
    let innermost = udp_frame(OTHER_POD, POD, b"smuggled")[14..].to_vec();
    let mut pkt = eth(FRAME_DST_MAC, FRAME_SRC_MAC, ETH_P_IP);
    pkt.extend(ipv4(POD, REMOTE_POD, 4, innermost.len(), 64));
    pkt.extend_from_slice(&innermost);
    // No egress policy: routed like any packet, encapsulated whole (a tunnel in the tunnel,
    // which the far node drops as nested).
    let r = obj.run("from_workload", &pkt);
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
    assert_eq!(r.data.len(), pkt.len() + 20);
    assert_eq!(
        (r.data[23], r.data[43]),
        (4, 4),
        "outer and middle protocol"
    );
    assert_eq!(&r.data[54..], &innermost[..], "inner packet untouched");
    // An egress policy allowing UDP only: protocol 4 is denied like any other.
    obj.install_policy(&udp_only());
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD.octets(),
            mac: FRAME_SRC_MAC,
            egress_policy: UDP_ONLY,
            ..Default::default()
        },
    );
    // (Another destination: the first packet's connection is tracked and would pass.)
    let other = Ipv4Addr::new(10, 65, 0, 131);
    let mut pkt = eth(FRAME_DST_MAC, FRAME_SRC_MAC, ETH_P_IP);
    pkt.extend(ipv4(POD, other, 4, innermost.len(), 64));
    pkt.extend_from_slice(&innermost);
    assert_eq!(obj.run("from_workload", &pkt).return_value, TC_ACT_SHOT);
    let udp = udp_frame(POD, other, b"fine");
    assert_eq!(obj.run("from_workload", &udp).return_value, TC_ACT_REDIRECT);
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::DROP_POLICY], 1);
    assert_eq!(c[counter::ENCAPSULATED], 2);
    assert_eq!(c[counter::DECAPSULATED], 0);
}

/// A UDP frame from the pod to `dport` whose IP header carries `options` (a multiple of 4).
fn udp_with_options(dport: u16, options: &[u8]) -> Vec<u8> {
    let l4 = udp(40000, dport, b"opt");
    let mut f = eth(FRAME_DST_MAC, FRAME_SRC_MAC, ETH_P_IP);
    let mut ip = ipv4(POD, REMOTE_POD, IPPROTO_UDP, options.len() + l4.len(), 64);
    ip[0] = 0x45 + (options.len() / 4) as u8;
    ip.extend_from_slice(options);
    f.extend(ip);
    fix_ip_checksum(&mut f, 14);
    f.extend(l4);
    f
}

#[test]
fn root_test_run_ip_options_are_skipped_to_find_the_ports_and_kept() {
    use dataplane::policy::compile::PortSet;
    require_root();
    let mut obj = node_object();
    let dns = CompiledRule {
        action: dataplane_common::verdict::ALLOW,
        terms: vec![Term {
            proto: ProtoMatch::Is(17),
            dport: PortSet {
                any_of: Some(vec![(53, 53)]),
                none_of: vec![],
            },
            ..Term::any()
        }],
        origin: String::new(),
    };
    obj.install_policy(&compile::compile(UDP_ONLY, &[dns], 1 << 20).unwrap());
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD.octets(),
            mac: FRAME_SRC_MAC,
            egress_policy: UDP_ONLY,
            ..Default::default()
        },
    );
    // Record route (type 7, 39 bytes, room for 9 addresses) padded with EOL: 40 bytes, the
    // most an IPv4 header holds. Were the options read as UDP, the port would be 0x0727.
    let mut rr = vec![7, 39, 4];
    rr.resize(40, 0);
    let allowed = udp_with_options(53, &rr);
    let r = obj.run("from_workload", &allowed);
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
    assert_eq!(
        &r.data[34 + 20..34 + 60],
        &rr[..],
        "options carried through"
    );
    assert_eq!(checksum(&r.data[34..34 + 60]), 0, "inner checksum verifies");
    let denied = udp_with_options(54, &[1, 1, 1, 0]);
    assert_eq!(obj.run("from_workload", &denied).return_value, TC_ACT_SHOT);
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!((c[counter::ENCAPSULATED], c[counter::DROP_POLICY]), (1, 1));
}

#[test]
fn root_test_run_bad_checksums_go_on_bad_and_bad_lengths_are_dropped() {
    require_root();
    let obj = node_object();
    // A wrong IPv4 header checksum is not checked here: the TTL update is incremental, so it
    // stays wrong and the receiving stack (the far pod's ip_rcv) drops the packet.
    let mut bad = udp_frame(POD, REMOTE_POD, b"x");
    bad[24] ^= 0x55;
    let r = obj.run("from_workload", &bad);
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
    assert_ne!(checksum(&r.data[34..54]), 0, "inner checksum still wrong");
    assert_eq!(
        checksum(&r.data[14..34]),
        0,
        "outer checksum our own, right"
    );
    // Total length below the header, and a UDP packet too short for its ports.
    let mut short_total = udp_frame(POD, REMOTE_POD, b"x");
    short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
    fix_ip_checksum(&mut short_total, 14);
    let mut cut_udp = udp_frame(POD, REMOTE_POD, b"x");
    cut_udp[16..18].copy_from_slice(&22u16.to_be_bytes());
    fix_ip_checksum(&mut cut_udp, 14);
    for (f, what) in [(&short_total, "total < IHL"), (&cut_udp, "UDP cut")] {
        assert_eq!(
            obj.run("from_workload", f).return_value,
            TC_ACT_SHOT,
            "{what}"
        );
    }
    // Bytes after the IP packet (Ethernet padding) are allowed and carried.
    let mut padded = udp_frame(POD, REMOTE_POD, b"x");
    padded.extend_from_slice(&[0; 10]);
    assert_eq!(
        obj.run("from_workload", &padded).return_value,
        TC_ACT_REDIRECT
    );
    let c = counters(&obj, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::DROP_MALFORMED], 2);
    assert_eq!(c[counter::ENCAPSULATED], 2);
}

// ---- live: the cluster in a box ----

/// Counter `slot` of node `node`'s hook summed over its interfaces, read from its pins.
fn node_counter(d: &Deployment, node: usize, h: u8, slot: usize) -> u64 {
    dataplane::maps::read_counters(&d.pins[node].path)
        .unwrap()
        .iter()
        .filter(|((_, hk), _)| *hk == h)
        .map(|(_, c)| c.values[slot])
        .sum()
}

/// The MAC of `iface` in the pod's namespace.
fn pod_mac(p: &Pod) -> [u8; 6] {
    let out = p.sb.ns.ip(&["-o", "link", "show", "eth0"]);
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Sends each frame out of the pod's eth0 through an AF_PACKET socket, as a compromised pod
/// would (root in its namespace).
fn send_frames(p: &Pod, frames: &[Vec<u8>]) {
    let ifindex = p.sb.ns.ifindex("eth0");
    p.sb.ns.run(|| {
        // SAFETY: plain socket syscalls on a descriptor this closure owns and closes; the
        // address and buffers outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for f in frames {
                addr.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "send: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

/// Neighbour entries the node holds on `iface`, as `ip neigh` prints them.
fn neighbours(d: &Deployment, node: usize, iface: &str) -> String {
    d.cluster.nodes[node]
        .ns
        .ip(&["neigh", "show", "dev", iface])
}

#[test]
fn root_live_a_pod_forging_its_mac_or_arp_is_dropped_and_counted_its_own_traffic_passes() {
    require_root();
    let d = Deployment::start("Always", 2);
    // Two pods on node 0, and one on another node.
    let a = &d.pods[0];
    let local = d
        .pods
        .iter()
        .find(|p| p.node == a.node && p.ip != a.ip)
        .expect("two pods on a node");
    let remote = d.pods.iter().find(|p| p.node != a.node).unwrap();
    assert!(ping(&a.sb.ns, remote.ip), "baseline across nodes");
    let node_ns = &d.cluster.nodes[a.node].ns;
    assert!(
        ping(node_ns, a.ip),
        "baseline from the node (a neighbour entry)"
    );
    let mac = pod_mac(a);
    let host_veth = d.veths(a.node).into_iter().find(|v| {
        d.cluster.nodes[a.node]
            .ns
            .ip(&["route", "show", &format!("{}/32", a.ip)])
            .contains(v.as_str())
    });
    let host_veth = host_veth.expect("the pod's host veth");
    let gw_mac = {
        let out = d.cluster.nodes[a.node]
            .ns
            .ip(&["-o", "link", "show", &host_veth]);
        let m = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap()
            .to_owned();
        let b: Vec<u8> = m
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        <[u8; 6]>::try_from(b).unwrap()
    };
    let before_mac = node_counter(&d, a.node, hook::FROM_WORKLOAD, counter::DROP_SPOOFED_MAC);
    let before_src = node_counter(
        &d,
        a.node,
        hook::FROM_WORKLOAD,
        counter::DROP_SPOOFED_SOURCE,
    );

    // UDP to the other local pod and to the remote pod from the pod's own address, behind a
    // forged MAC; ARP requests for the gateway with a forged Ethernet source, sender MAC,
    // and sender address (the other local pod's, which would plant a neighbour entry).
    let mut udp_forged = Vec::new();
    for dst in [local.ip, remote.ip] {
        let mut f = udp_frame(a.ip, dst, b"forged mac");
        f[..6].copy_from_slice(&gw_mac);
        f[6..12].copy_from_slice(&FORGED_MAC);
        udp_forged.push(f);
    }
    let arp_forged = [
        arp_request(FORGED_MAC, mac, a.ip, GATEWAY),
        arp_request(mac, FORGED_MAC, a.ip, GATEWAY),
        arp_request(mac, mac, local.ip, GATEWAY),
    ];
    let mut frames = udp_forged.clone();
    frames.extend(arp_forged.iter().cloned());
    send_frames(a, &frames);
    std::thread::sleep(Duration::from_millis(200));

    let after_mac = node_counter(&d, a.node, hook::FROM_WORKLOAD, counter::DROP_SPOOFED_MAC);
    let after_src = node_counter(
        &d,
        a.node,
        hook::FROM_WORKLOAD,
        counter::DROP_SPOOFED_SOURCE,
    );
    assert_eq!(
        after_mac - before_mac,
        4,
        "2 UDP and 2 ARP with a forged MAC dropped as drop_spoofed_mac"
    );
    assert_eq!(
        after_src - before_src,
        1,
        "the ARP claiming another pod's address dropped as drop_spoofed_source"
    );
    let neigh = neighbours(&d, a.node, &host_veth);
    assert!(
        !neigh.contains(&local.ip.to_string()),
        "the forged ARP planted no neighbour entry for {} on {host_veth}: {neigh}",
        local.ip
    );
    assert!(
        !neigh.contains("02:00:00:00:00:66"),
        "no neighbour entry with the forged MAC on {host_veth}: {neigh}"
    );

    // The pod's honest ARP passes: the node forgets the pod's MAC, asks again, and the reply
    // (sender: the pod's MAC and address) gets through.
    node_ns.ip(&["neigh", "flush", "dev", &host_veth]);
    assert!(
        ping(node_ns, a.ip),
        "the node reaches the pod after re-resolving it"
    );
    let neigh = neighbours(&d, a.node, &host_veth);
    let want = mac.map(|b| format!("{b:02x}")).join(":");
    assert!(
        neigh.contains(&format!("{} lladdr {want}", a.ip)),
        "the pod's MAC learnt from its ARP reply: {neigh}"
    );
    assert!(ping(&a.sb.ns, local.ip), "same node after the forgeries");
    assert!(
        ping(&a.sb.ns, remote.ip),
        "across nodes after the forgeries"
    );
    let dump = d.map_dump(a.node, "counters");
    assert!(
        dump.contains("spoofed_mac=4"),
        "map-dump names the new reason:\n{dump}"
    );
}

#[test]
fn root_live_a_pods_ipip_to_a_remote_pod_or_node_is_never_decapsulated() {
    require_root();
    let d = Deployment::start("Always", 1);
    let (a, b) = (&d.pods[0], &d.pods[1]);
    assert_ne!(a.node, b.node);
    assert!(ping(&a.sb.ns, b.ip), "baseline");
    let node_b = d.cluster.nodes[b.node].ip;
    let nested_before = node_counter(&d, b.node, hook::HOST_INGRESS, counter::DROP_NESTED_IPIP);
    let peer_before = node_counter(
        &d,
        b.node,
        hook::HOST_INGRESS,
        counter::DROP_UNKNOWN_IPIP_PEER,
    );
    let delivered_before = node_counter(&d, b.node, hook::TO_WORKLOAD, counter::PACKETS);
    // What the pod tunnels: a packet for pod b "from" an address b would trust.
    let inner = udp_frame(Ipv4Addr::new(10, 65, 77, 1), b.ip, b"smuggled")[14..].to_vec();
    // To pod b: encapsulated by node a (a tunnel in the tunnel). To node b itself: routed
    // natively, from a pod's address, which is no node's.
    dataplane_tests::packets::send_ipip(&a.sb.ns, &[b.ip, node_b, b.ip, node_b], &inner);
    std::thread::sleep(Duration::from_millis(300));
    let nested = node_counter(&d, b.node, hook::HOST_INGRESS, counter::DROP_NESTED_IPIP);
    let peer = node_counter(
        &d,
        b.node,
        hook::HOST_INGRESS,
        counter::DROP_UNKNOWN_IPIP_PEER,
    );
    let delivered = node_counter(&d, b.node, hook::TO_WORKLOAD, counter::PACKETS);
    assert_eq!(
        nested - nested_before,
        2,
        "nested IP-in-IP dropped at node b"
    );
    assert_eq!(
        peer - peer_before,
        2,
        "IP-in-IP from a pod's address to node b dropped as from no node"
    );
    assert_eq!(
        delivered, delivered_before,
        "nothing entered a pod on node b"
    );
    assert!(ping(&a.sb.ns, b.ip), "the pods still talk");
}

/// The agent's log lines that are trace records of interface `iface`.
fn records(d: &Deployment, node: usize, iface: &str) -> Vec<String> {
    d.agents[node]
        .log_text()
        .lines()
        .filter(|l| l.contains("bpf") && l.contains(&format!("if={iface}(")))
        .map(str::to_owned)
        .collect()
}

fn trace(d: &Deployment, node: usize, args: &[&str]) -> String {
    let dir = d.pins[node].path.display().to_string();
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--bpffs-dir", &dir]);
    let (st, out, err) = dataplane_tests::cluster::dataplane(&d.cluster.nodes[node].ns, &all);
    assert!(st.success(), "dataplane {all:?}: {out}{err}");
    out
}

#[test]
fn root_live_tracing_switches_on_for_one_pod_and_off_again_at_run_time() {
    require_root();
    let d = Deployment::start("Always", 2);
    let a = &d.pods[0];
    let b = d
        .pods
        .iter()
        .find(|p| p.node == a.node && p.ip != a.ip)
        .unwrap();
    let remote = d.pods.iter().find(|p| p.node != a.node).unwrap();
    let veth =
        |p: &Pod| dataplane::cni::netsetup::host_veth_name(Some((&p.sb.namespace, &p.sb.pod)), "");
    let (a_veth, b_veth) = (veth(a), veth(b));
    // Traffic before: nothing traced.
    assert!(ping(&a.sb.ns, remote.ip));
    assert!(ping(&b.sb.ns, remote.ip));
    assert!(records(&d, a.node, &a_veth).is_empty());

    // On, by pod name, with the agent running: a's packets are recorded, b's are not.
    let pod = format!("{}/{}", a.sb.namespace, a.sb.pod);
    let out = trace(&d, a.node, &[&pod, "on"]);
    assert!(out.contains(&a_veth), "{out}");
    assert!(trace(&d, a.node, &["list"]).contains(&a_veth));
    assert!(ping(&a.sb.ns, remote.ip));
    assert!(ping(&b.sb.ns, remote.ip));
    // A forged frame: its drop reason is in the record.
    let mut forged = udp_frame(a.ip, remote.ip, b"forged");
    forged[6..12].copy_from_slice(&FORGED_MAC);
    send_frames(a, &[forged]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let want_ping = format!("proto=1 {}:", a.ip);
    loop {
        let recs = records(&d, a.node, &a_veth);
        let ping_out = recs.iter().any(|l| {
            l.contains("hook=from-workload verdict=redirect")
                && l.contains("encapsulated")
                && l.contains(&want_ping)
                && l.contains(&format!("> {}:", remote.ip))
        });
        let forged_out = recs
            .iter()
            .any(|l| l.contains("verdict=drop") && l.contains("outcome=drop_spoofed_mac"));
        if ping_out && forged_out {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records of {a_veth} missing (ping {ping_out}, forged {forged_out}):\n{}\nagent log:\n{}",
            recs.join("\n"),
            d.agents[a.node].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        records(&d, a.node, &b_veth).is_empty(),
        "{b_veth} is not traced"
    );

    // Off: no more records.
    trace(&d, a.node, &[&a_veth, "off"]);
    assert!(!trace(&d, a.node, &["list"]).contains(&a_veth));
    std::thread::sleep(Duration::from_millis(300));
    let before = records(&d, a.node, &a_veth).len();
    assert!(ping(&a.sb.ns, remote.ip));
    assert!(ping(&a.sb.ns, b.ip));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        records(&d, a.node, &a_veth).len(),
        before,
        "records after tracing was switched off"
    );
    // Bad input: one clear line, non-zero exit.
    let dir = d.pins[a.node].path.display().to_string();
    let (st, _, err) = dataplane_tests::cluster::dataplane(
        &d.cluster.nodes[a.node].ns,
        &["trace", "nosuchif0", "on", "--bpffs-dir", &dir],
    );
    assert!(!st.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no interface nosuchif0"), "{err}");
}

//! The TC programs run by the kernel on synthetic packets through BPF_PROG_TEST_RUN (needs
//! root): verdicts, the bytes that come out, and the counters they leave.

use std::net::Ipv4Addr;

use dataplane_common::{counter, hook};
use dataplane_tests::{packets::*, require_root};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs as if on the loopback device of the caller's namespace.
const TEST_RUN_IFINDEX: u32 = 1;

fn all_hooks() -> [(&'static str, u8); 4] {
    [
        ("from_workload", hook::FROM_WORKLOAD),
        ("to_workload", hook::TO_WORKLOAD),
        ("host_ingress", hook::HOST_INGRESS),
        ("host_egress", hook::HOST_EGRESS),
    ]
}

#[test]
fn root_every_program_passes_and_counts_an_ipv4_udp_packet_untouched() {
    require_root();
    let mut obj = TestObject::load();
    obj.add_endpoint(TEST_RUN_IFINDEX, Ipv4Addr::new(10, 65, 0, 2), FRAME_SRC_MAC);
    let pkt = udp_frame(
        Ipv4Addr::new(10, 65, 0, 2),
        Ipv4Addr::new(10, 65, 0, 3),
        b"hello",
    );
    for (program, h) in all_hooks() {
        for round in 1..=3u64 {
            let r = obj.run(program, &pkt);
            assert_eq!(r.return_value, TC_ACT_OK, "{program}");
            assert_eq!(r.data, pkt, "{program} must not change the packet");
            let c = obj.counters(TEST_RUN_IFINDEX, h);
            assert_eq!(c[counter::PACKETS], round, "{program} packets");
            assert_eq!(
                c[counter::BYTES],
                round * pkt.len() as u64,
                "{program} bytes"
            );
            assert_eq!(c[counter::PASSED], round, "{program} passed");
        }
    }
    // Each hook has its own entry: four hooks, three packets each.
    for (_, h) in all_hooks() {
        assert_eq!(obj.counters(TEST_RUN_IFINDEX, h)[counter::PACKETS], 3);
    }
}

#[test]
fn root_frames_shorter_than_their_headers_claim_are_dropped_and_counted() {
    // The kernel refuses to test-run an IPv4 frame with less than 20 bytes of IP header, so
    // the shortest frames it can hand a program are: an IPv4 header whose IHL claims options
    // that are not there, and one whose total length exceeds the frame.
    require_root();
    let obj = TestObject::load();
    let mut ihl_lies = eth([0xff; 6], [2, 0, 0, 0, 0, 1], ETH_P_IP);
    ihl_lies.extend(ipv4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 17, 0, 64));
    ihl_lies[14] = 0x4f;
    let mut total_lies = eth([0xff; 6], [2, 0, 0, 0, 0, 1], ETH_P_IP);
    total_lies.extend(ipv4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 17, 1000, 64));
    for pkt in [&ihl_lies, &total_lies] {
        let r = obj.run("from_workload", pkt);
        assert_eq!(r.return_value, TC_ACT_SHOT);
    }
    let c = obj.counters(TEST_RUN_IFINDEX, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::PACKETS], 2);
    assert_eq!(c[counter::DROP_MALFORMED], 2);
    assert_eq!(c[counter::PASSED], 0);
}

#[test]
fn root_programs_are_tc_classifiers_for_the_right_hooks() {
    // Guards the names the agent attaches by (attach.rs) against the object's contents.
    require_root();
    let obj = TestObject::load();
    let mut names: Vec<_> = obj.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "from_workload",
            "host_egress",
            "host_ingress",
            "to_workload"
        ]
    );
}

const TC_ACT_REDIRECT: i32 = 7;
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 130);
/// The pod's MAC: the source of the frames the builders make (from-workload drops others).
const POD_MAC: [u8; 6] = FRAME_SRC_MAC;

/// A test object set up as node 192.168.1.10 with a local pod 10.65.0.2 on ifindex 1 (the
/// ifindex test runs see) and node 192.168.2.10 owning 10.65.0.128/26 in IP-in-IP.
fn node_object() -> TestObject {
    use dataplane_common::{RouteValue, route_flags, route_kind};
    let mut obj = TestObject::load();
    obj.set_config(NODE, 1);
    obj.add_node(PEER);
    // test_run runs the programs as if on ifindex 1: that is the pod's veth here.
    obj.add_endpoint(TEST_RUN_IFINDEX, POD, POD_MAC);
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
            ifindex: 1,
            mac: POD_MAC,
            ..RouteValue::default()
        },
    );
    obj
}

#[test]
fn root_encapsulation_builds_the_outer_header_byte_by_byte() {
    require_root();
    let obj = node_object();
    let pkt = udp_frame(POD, REMOTE_POD, b"payload!");
    let r = obj.run("from_workload", &pkt);
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
    let out = &r.data;
    assert_eq!(out.len(), pkt.len() + 20, "20 bytes of outer header");
    assert_eq!(&out[12..14], &ETH_P_IP.to_be_bytes());
    let outer = &out[14..34];
    assert_eq!(outer[0], 0x45, "version 4, IHL 5");
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]) as usize,
        pkt.len() - 14 + 20,
        "total length"
    );
    assert_eq!(outer[6] & 0x40, 0x40, "DF copied from the inner packet");
    assert_eq!(outer[8], 64, "outer TTL");
    assert_eq!(outer[9], 4, "protocol IP-in-IP");
    assert_eq!(&outer[12..16], &NODE.octets(), "outer source: this node");
    assert_eq!(
        &outer[16..20],
        &PEER.octets(),
        "outer destination: the owning node"
    );
    assert_eq!(checksum(outer), 0, "outer checksum verifies");
    // The inner packet: only the TTL went down (and its checksum with it).
    let inner = &out[34..];
    let orig = &pkt[14..];
    assert_eq!(inner[8], orig[8] - 1, "inner TTL decremented");
    assert_eq!(checksum(&inner[..20]), 0, "inner checksum still verifies");
    assert_eq!(&inner[..8], &orig[..8]);
    assert_eq!(&inner[9..10], &orig[9..10]);
    assert_eq!(&inner[12..], &orig[12..], "addresses and payload untouched");
    let c = obj.counters(TEST_RUN_IFINDEX, hook::FROM_WORKLOAD);
    assert_eq!(c[counter::ENCAPSULATED], 1);
}

/// An IP-in-IP frame from `outer_src` to this node carrying `inner`.
fn ipip_frame(outer_src: Ipv4Addr, inner_ip: &[u8]) -> Vec<u8> {
    let mut f = eth([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 8], ETH_P_IP);
    f.extend(ipv4(outer_src, NODE, 4, inner_ip.len(), 64));
    f.extend_from_slice(inner_ip);
    f
}

#[test]
fn root_decapsulation_from_a_known_node_delivers_the_inner_packet() {
    require_root();
    let obj = node_object();
    let inner = udp_frame(REMOTE_POD, POD, b"reply")[14..].to_vec();
    let r = obj.run("host_ingress", &ipip_frame(PEER, &inner));
    assert_eq!(r.return_value, TC_ACT_REDIRECT);
    assert_eq!(r.data.len(), 14 + inner.len(), "outer header removed");
    assert_eq!(&r.data[0..6], &POD_MAC, "addressed to the pod");
    let got = &r.data[14..];
    assert_eq!(got[8], inner[8] - 1, "TTL decremented");
    assert_eq!(checksum(&got[..20]), 0);
    assert_eq!(&got[12..], &inner[12..], "addresses and payload untouched");
    let c = obj.counters(TEST_RUN_IFINDEX, hook::HOST_INGRESS);
    assert_eq!((c[counter::DECAPSULATED], c[counter::REDIRECTED]), (1, 1));
}

#[test]
fn root_ipip_from_a_host_that_is_not_a_node_is_dropped_and_counted() {
    require_root();
    let obj = node_object();
    let inner = udp_frame(REMOTE_POD, POD, b"evil")[14..].to_vec();
    let r = obj.run(
        "host_ingress",
        &ipip_frame(Ipv4Addr::new(192, 168, 1, 66), &inner),
    );
    assert_eq!(r.return_value, TC_ACT_SHOT);
    let c = obj.counters(TEST_RUN_IFINDEX, hook::HOST_INGRESS);
    assert_eq!(c[counter::DROP_UNKNOWN_IPIP_PEER], 1);
}

#[test]
fn root_a_pod_sending_from_a_forged_address_is_dropped_and_counted() {
    require_root();
    let mut obj = node_object();
    obj.add_endpoint(TEST_RUN_IFINDEX, POD, POD_MAC);
    let forged = udp_frame(Ipv4Addr::new(10, 65, 0, 99), REMOTE_POD, b"x");
    assert_eq!(obj.run("from_workload", &forged).return_value, TC_ACT_SHOT);
    let honest = udp_frame(POD, REMOTE_POD, b"x");
    assert_eq!(
        obj.run("from_workload", &honest).return_value,
        TC_ACT_REDIRECT
    );
    let c = obj.counters(TEST_RUN_IFINDEX, hook::FROM_WORKLOAD);
    assert_eq!(
        (c[counter::DROP_SPOOFED_SOURCE], c[counter::ENCAPSULATED]),
        (1, 1)
    );
}

#[test]
fn root_a_packet_too_big_to_encapsulate_is_dropped_and_counted() {
    require_root();
    let obj = node_object();
    // 1490 bytes of IP: fits a 1500 MTU, not with 20 more bytes of outer header.
    let pkt = udp_frame(POD, REMOTE_POD, &[7u8; 1490 - 28]);
    assert_eq!(obj.run("from_workload", &pkt).return_value, TC_ACT_SHOT);
    let fits = udp_frame(POD, REMOTE_POD, &[7u8; 1480 - 28]);
    assert_eq!(
        obj.run("from_workload", &fits).return_value,
        TC_ACT_REDIRECT
    );
    let c = obj.counters(TEST_RUN_IFINDEX, hook::FROM_WORKLOAD);
    assert_eq!((c[counter::DROP_TOO_BIG], c[counter::ENCAPSULATED]), (1, 1));
}

//! Conntrack and policy in the programs, through BPF_PROG_TEST_RUN on crafted packets: the
//! pod behind ifindex 1 (where test_run runs the programs) has an ingress policy that
//! allows nothing, and no egress policy.

use std::{net::Ipv4Addr, time::Duration};

use dataplane::policy::compile::{self, CompiledRule, Entries};
use dataplane_common::{CtKey, CtTimeouts, EndpointValue, counter, ct, hook};
use dataplane_tests::{
    packets::{
        FRAME_SRC_MAC, IPPROTO_ICMP, IPPROTO_TCP, TestObject, frame, icmp, ipv4, tcp_frame, udp,
        udp_frame_ports,
    },
    require_root,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const IFINDEX: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 65, 1, 7);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 65, 1, 8);
const DENY_ALL: u32 = 5;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

fn policy(id: u32, rules: &[CompiledRule]) -> Entries {
    compile::compile(id, rules, 1 << 20).unwrap()
}

/// The pod at ifindex 1: isolated for ingress (a policy with no rules), open for egress.
fn object(t: CtTimeouts) -> TestObject {
    let mut obj = TestObject::load();
    obj.set_config_timeouts(Ipv4Addr::new(192, 168, 1, 10), 1, t);
    obj.install_policy(&policy(DENY_ALL, &[]));
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD.octets(),
            mac: FRAME_SRC_MAC,
            flags: 0,
            ingress_policy: DENY_ALL,
            egress_policy: 0,
        },
    );
    obj
}

fn key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: src.octets(),
        daddr: dst.octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

#[test]
fn root_replies_pass_although_the_pod_accepts_no_new_connection() {
    require_root();
    let obj = object(CtTimeouts::DEFAULT);
    // The pod opens a connection (egress open): tracked.
    let syn = tcp_frame(POD, PEER, 40000, 80, SYN);
    assert_eq!(obj.run("from_workload", &syn).return_value, TC_ACT_OK);
    // The answer enters the pod although its ingress allows nothing.
    let synack = tcp_frame(PEER, POD, 80, 40000, SYN | ACK);
    assert_eq!(obj.run("to_workload", &synack).return_value, TC_ACT_OK);
    // A new connection to the pod, and a fake "reply" on another port, are dropped.
    let new = tcp_frame(PEER, POD, 40001, 80, SYN);
    assert_eq!(obj.run("to_workload", &new).return_value, TC_ACT_SHOT);
    let fake = tcp_frame(PEER, POD, 80, 40002, SYN | ACK);
    assert_eq!(obj.run("to_workload", &fake).return_value, TC_ACT_SHOT);
    let c = obj.counters(IFINDEX, hook::TO_WORKLOAD);
    assert_eq!(c[counter::CT_TRACKED], 1);
    assert_eq!(c[counter::DROP_POLICY], 2);
    assert_eq!(
        obj.counters(IFINDEX, hook::FROM_WORKLOAD)[counter::CT_NEW],
        1
    );
}

#[test]
fn root_tcp_states_follow_the_handshake_and_the_close() {
    require_root();
    let mut obj = object(CtTimeouts::DEFAULT);
    let k = key(POD, PEER, 40000, 80, IPPROTO_TCP);
    let state = |obj: &mut TestObject| obj.conntrack().get(&k, 0).unwrap().state;
    let out = |obj: &TestObject, flags| {
        obj.run("from_workload", &tcp_frame(POD, PEER, 40000, 80, flags))
            .return_value
    };
    let back = |obj: &TestObject, flags| {
        obj.run("to_workload", &tcp_frame(PEER, POD, 80, 40000, flags))
            .return_value
    };
    assert_eq!(out(&obj, SYN), TC_ACT_OK);
    assert_eq!(state(&mut obj), ct::SYN_SENT);
    assert_eq!(back(&obj, SYN | ACK), TC_ACT_OK);
    assert_eq!(state(&mut obj), ct::SYN_RECV);
    assert_eq!(out(&obj, ACK), TC_ACT_OK);
    assert_eq!(state(&mut obj), ct::ESTABLISHED);
    assert_eq!(out(&obj, FIN | ACK), TC_ACT_OK);
    assert_eq!(state(&mut obj), ct::FIN_WAIT);
    assert_eq!(back(&obj, FIN | ACK), TC_ACT_OK);
    assert_eq!(state(&mut obj), ct::CLOSING);
    let v = obj.conntrack().get(&k, 0).unwrap();
    assert_eq!((v.packets_fwd, v.packets_rev), (3, 2));
    assert!(v.flags & ct::EGRESS_APPROVED != 0 && v.flags & ct::REPLIED != 0);
}

#[test]
fn root_entries_expire_after_their_timeout() {
    require_root();
    let t = CtTimeouts {
        udp: 1,
        ..CtTimeouts::DEFAULT
    };
    let obj = object(t);
    let out = udp_frame_ports(POD, PEER, 5000, 53);
    let reply = udp_frame_ports(PEER, POD, 53, 5000);
    assert_eq!(obj.run("from_workload", &out).return_value, TC_ACT_OK);
    assert_eq!(obj.run("to_workload", &reply).return_value, TC_ACT_OK);
    std::thread::sleep(Duration::from_millis(1300));
    // Idle longer than the UDP timeout: the "reply" is a new flow now, and the pod's ingress
    // allows none.
    assert_eq!(obj.run("to_workload", &reply).return_value, TC_ACT_SHOT);
    // The pod speaking again re-opens it.
    assert_eq!(obj.run("from_workload", &out).return_value, TC_ACT_OK);
    assert_eq!(obj.run("to_workload", &reply).return_value, TC_ACT_OK);
}

#[test]
fn root_a_full_table_keeps_tracked_flows_and_refuses_new_ones() {
    require_root();
    let mut obj = object(CtTimeouts::DEFAULT);
    // One real connection first.
    let out = udp_frame_ports(POD, PEER, 5000, 53);
    assert_eq!(obj.run("from_workload", &out).return_value, TC_ACT_OK);
    // Fill the rest of the table with live entries.
    let live = dataplane_common::CtValue {
        created_ns: dataplane::maps::monotonic_ns(),
        last_seen_ns: dataplane::maps::monotonic_ns(),
        state: ct::OPEN,
        flags: ct::EGRESS_APPROVED,
        ..Default::default()
    };
    {
        let mut map = obj.conntrack();
        for i in 0..dataplane_common::MAX_CONNTRACK - 1 {
            let k = key(
                Ipv4Addr::from(0x0a00_0000 + i),
                OTHER,
                1000,
                (i % 60000) as u16,
                17,
            );
            map.insert(k, live, 0).unwrap();
        }
    }
    // The tracked flow still works both ways; a new one is refused and counted.
    assert_eq!(obj.run("from_workload", &out).return_value, TC_ACT_OK);
    let reply = udp_frame_ports(PEER, POD, 53, 5000);
    assert_eq!(obj.run("to_workload", &reply).return_value, TC_ACT_OK);
    let new = udp_frame_ports(POD, PEER, 5001, 53);
    assert_eq!(obj.run("from_workload", &new).return_value, TC_ACT_SHOT);
    assert_eq!(
        obj.counters(IFINDEX, hook::FROM_WORKLOAD)[counter::DROP_CONNTRACK_FULL],
        1
    );
}

#[test]
fn root_icmp_errors_about_tracked_flows_pass_and_others_do_not() {
    require_root();
    let obj = object(CtTimeouts::DEFAULT);
    let out = udp_frame_ports(POD, PEER, 5000, 53);
    assert_eq!(obj.run("from_workload", &out).return_value, TC_ACT_OK);
    // "Port unreachable" from the peer, quoting the pod's datagram.
    let quoted = |sport: u16| {
        let mut q = ipv4(POD, PEER, 17, 9, 64);
        q.extend(udp(sport, 53, b"x"));
        q
    };
    let err = frame(PEER, POD, IPPROTO_ICMP, &icmp(3, 3, [0; 4], &quoted(5000)));
    assert_eq!(obj.run("to_workload", &err).return_value, TC_ACT_OK);
    let unrelated = frame(PEER, POD, IPPROTO_ICMP, &icmp(3, 3, [0; 4], &quoted(5999)));
    assert_eq!(obj.run("to_workload", &unrelated).return_value, TC_ACT_SHOT);
    // An echo request to the pod is a new flow: denied.
    let ping = frame(PEER, POD, IPPROTO_ICMP, &icmp(8, 0, [0, 7, 0, 1], b"ping"));
    assert_eq!(obj.run("to_workload", &ping).return_value, TC_ACT_SHOT);
    // The pod's own ping is answered.
    let ping = frame(POD, PEER, IPPROTO_ICMP, &icmp(8, 0, [0, 9, 0, 1], b"ping"));
    let pong = frame(PEER, POD, IPPROTO_ICMP, &icmp(0, 0, [0, 9, 0, 1], b"ping"));
    assert_eq!(obj.run("from_workload", &ping).return_value, TC_ACT_OK);
    assert_eq!(obj.run("to_workload", &pong).return_value, TC_ACT_OK);
}

#[test]
fn root_unprogrammed_pods_and_truncated_headers_are_dropped() {
    require_root();
    let mut obj = TestObject::load();
    let pkt = udp_frame_ports(POD, PEER, 5000, 53);
    assert_eq!(obj.run("from_workload", &pkt).return_value, TC_ACT_SHOT);
    assert_eq!(obj.run("to_workload", &pkt).return_value, TC_ACT_SHOT);
    assert_eq!(
        obj.counters(IFINDEX, hook::TO_WORKLOAD)[counter::DROP_NO_ENDPOINT],
        1
    );
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD.octets(),
            mac: FRAME_SRC_MAC,
            ..Default::default()
        },
    );
    // A TCP header cut after 10 bytes (the IP header says so too).
    let mut cut = tcp_frame(POD, PEER, 1, 2, SYN);
    cut.truncate(14 + 20 + 10);
    let ip = ipv4(POD, PEER, IPPROTO_TCP, 10, 64);
    cut[14..34].copy_from_slice(&ip);
    assert_eq!(obj.run("from_workload", &cut).return_value, TC_ACT_SHOT);
    assert_eq!(
        obj.counters(IFINDEX, hook::FROM_WORKLOAD)[counter::DROP_MALFORMED],
        1
    );
}

/// `frame` with IP identification `id`, fragment offset `offset` (8-byte units) and MF.
fn fragment(mut frame: Vec<u8>, id: u16, offset: u16, more: bool) -> Vec<u8> {
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    let frags = offset | if more { 0x2000 } else { 0 };
    frame[20..22].copy_from_slice(&frags.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = dataplane_tests::packets::checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}

#[test]
fn root_later_fragments_pass_only_behind_an_allowed_first_fragment() {
    use dataplane::policy::compile::{PortSet, ProtoMatch, Term};
    require_root();
    let mut obj = object(CtTimeouts::DEFAULT);
    // The pod accepts UDP to port 53 only.
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
    obj.install_policy(&policy(9, &[dns]));
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD.octets(),
            ingress_policy: 9,
            ..Default::default()
        },
    );
    let head = |dport, id| fragment(udp_frame_ports(PEER, POD, 5000, dport), id, 0, true);
    // A later fragment: 8 bytes of payload at offset 2 (16 bytes), no ports.
    let tail = |id| fragment(frame(PEER, POD, 17, &[7; 8]), id, 2, false);
    assert_eq!(
        obj.run("to_workload", &head(53, 77)).return_value,
        TC_ACT_OK
    );
    assert_eq!(obj.run("to_workload", &tail(77)).return_value, TC_ACT_OK);
    // The head to a closed port is dropped, and so is its tail; a tail with no head too.
    assert_eq!(
        obj.run("to_workload", &head(54, 78)).return_value,
        TC_ACT_SHOT
    );
    assert_eq!(obj.run("to_workload", &tail(78)).return_value, TC_ACT_SHOT);
    assert_eq!(obj.run("to_workload", &tail(79)).return_value, TC_ACT_SHOT);
    let c = obj.counters(IFINDEX, hook::TO_WORKLOAD);
    assert_eq!(c[counter::DROP_POLICY], 3);
    assert_eq!(c[counter::CT_NEW], 1);
    assert_eq!(c[counter::CT_TRACKED], 1);
}

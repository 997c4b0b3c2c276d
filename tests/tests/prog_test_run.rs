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
    let obj = TestObject::load();
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

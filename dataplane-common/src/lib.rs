//! Everything the TC programs and userspace must agree on: map names, limits, and the layout of
//! every key and value. Types here are `#[repr(C)]`, fixed-size, with explicit padding and no
//! enums, bools or options inside, so both sides see the same bytes.
#![no_std]

use core::mem::size_of;

/// Names of the maps in the object, which are also their pin names under `<bpffs-dir>/maps/`.
pub mod map_names {
    pub const COUNTERS: &str = "DP_COUNTERS";
    pub const ROUTES: &str = "DP_ROUTES";
    pub const ENDPOINTS: &str = "DP_ENDPOINTS";
    pub const NODES: &str = "DP_NODES";
    pub const CONFIG: &str = "DP_CONFIG";
    pub const POLICY_IP: &str = "DP_POLICY_IP";
    pub const POLICY_IP_EXACT: &str = "DP_POLICY_IP_EXACT";
    pub const POLICY_PORT: &str = "DP_POLICY_PORT";
    pub const POLICY_PORT_EXACT: &str = "DP_POLICY_PORT_EXACT";
    pub const CONNTRACK: &str = "DP_CONNTRACK";
    pub const FRAGMENTS: &str = "DP_FRAGMENTS";
    pub const POLICY_HITS: &str = "DP_POLICY_HITS";
    pub const POLICY_RULES: &str = "DP_POLICY_RULES";
    pub const LOG_ON: &str = "DP_LOG_ON";
    pub const LOG_IFACES: &str = "DP_LOG_IFACES";
}

/// The layout version of each pinned map: what its keys and values *mean*, beyond their
/// sizes. An agent compares the version recorded with the pins (the pinned map
/// `layout_versions` in the pin directory) with this build's, as well as the kernel's layout
/// (type, key and value sizes, entries, flags); a map whose version differs is remade and
/// starts empty, as one whose key or value size changed (the sync refills the maps it derives
/// from etcd before the new programs attach).
///
/// Rule for developers: bump a map's version in the same change that alters the meaning of
/// its key or value without altering their size (a field or padding reused, a flag bit or a
/// `kind` value redefined, a unit changed): entries written by the old build must never be
/// read by the new programs. No bump when only a size changes (the layout shows it) or when
/// the change is compatible both ways (a new flag old entries never set, a new value old
/// programs never see). Pins made before versions were recorded count as version 1.
pub mod layout_version {
    use super::map_names;

    pub const COUNTERS: u32 = 1;
    pub const ROUTES: u32 = 1;
    pub const ENDPOINTS: u32 = 1;
    pub const NODES: u32 = 1;
    pub const CONFIG: u32 = 1;
    pub const POLICY_IP: u32 = 1;
    pub const POLICY_IP_EXACT: u32 = 1;
    pub const POLICY_PORT: u32 = 1;
    pub const POLICY_PORT_EXACT: u32 = 1;
    pub const CONNTRACK: u32 = 1;
    pub const FRAGMENTS: u32 = 1;
    pub const POLICY_HITS: u32 = 1;
    pub const POLICY_RULES: u32 = 1;
    pub const LOG_ON: u32 = 1;
    pub const LOG_IFACES: u32 = 1;

    /// Every pinned map's version, by map name.
    pub const ALL: [(&str, u32); 15] = [
        (map_names::COUNTERS, COUNTERS),
        (map_names::ROUTES, ROUTES),
        (map_names::ENDPOINTS, ENDPOINTS),
        (map_names::NODES, NODES),
        (map_names::CONFIG, CONFIG),
        (map_names::POLICY_IP, POLICY_IP),
        (map_names::POLICY_IP_EXACT, POLICY_IP_EXACT),
        (map_names::POLICY_PORT, POLICY_PORT),
        (map_names::POLICY_PORT_EXACT, POLICY_PORT_EXACT),
        (map_names::CONNTRACK, CONNTRACK),
        (map_names::FRAGMENTS, FRAGMENTS),
        (map_names::POLICY_HITS, POLICY_HITS),
        (map_names::POLICY_RULES, POLICY_RULES),
        (map_names::LOG_ON, LOG_ON),
        (map_names::LOG_IFACES, LOG_IFACES),
    ];

    /// The version of map `name` in this build (1 for a name it does not know).
    pub fn of(name: &str) -> u32 {
        ALL.iter().find(|(n, _)| *n == name).map_or(1, |&(_, v)| v)
    }
}

/// Most routes (local pods, remote blocks, hosts, pools) a node's routes map holds.
pub const MAX_ROUTES: u32 = 65536;
/// Most local endpoints (pods on this node).
pub const MAX_ENDPOINTS: u32 = 8192;
/// Most nodes in the cluster.
pub const MAX_NODES: u32 = 8192;
/// Most entries of the policy address classifier (all compiled policies together), in the
/// trie of CIDRs and in the hash of single addresses each.
pub const MAX_POLICY_IP: u32 = 1 << 20;
/// Most policy verdict entries, in the trie of port blocks and in the hash each.
pub const MAX_POLICY_PORT: u32 = 1 << 21;
/// Most tracked connections per node.
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Most (policy, direction, rule) triples whose decisions are counted at once. Only rules
/// that decided a packet take an entry; when the map is full, further ones go uncounted.
pub const MAX_POLICY_HITS: u32 = 1 << 16;
/// Most rules of all compiled policies together described for inspection (see
/// [`PolicyRuleMeta`]); rules past it are enforced but shown without their name.
pub const MAX_POLICY_RULES: u32 = 1 << 18;
/// Most interfaces traced at once (`dataplane trace`).
pub const MAX_LOG_IFACES: u32 = 1024;
/// Most fragmented datagrams in flight whose first fragment was allowed (LRU).
pub const MAX_FRAGMENTS: u32 = 1 << 14;

/// What a route leads to: [`RouteValue::kind`].
pub mod route_kind {
    /// A pod on this node: `ifindex` is its host veth, `mac` the pod's MAC.
    pub const LOCAL_WORKLOAD: u8 = 1;
    /// An address block affine to another node: `next_hop` is that node's address.
    pub const REMOTE_BLOCK: u8 = 2;
    /// An address of this node itself.
    pub const LOCAL_HOST: u8 = 3;
    /// The address of another node.
    pub const REMOTE_HOST: u8 = 4;
    /// An IP pool (less specific than its blocks): pod addresses of no known block.
    pub const POOL: u8 = 5;

    pub const fn name(kind: u8) -> &'static str {
        match kind {
            LOCAL_WORKLOAD => "local workload",
            REMOTE_BLOCK => "remote block",
            LOCAL_HOST => "local host",
            REMOTE_HOST => "remote host",
            POOL => "pool",
            _ => "unknown",
        }
    }
}

/// Bits of [`RouteValue::flags`].
pub mod route_flags {
    /// Traffic to this destination is encapsulated in IP-in-IP to `next_hop`.
    pub const IPIP: u8 = 1;
    /// `next_hop` is on this node's subnet.
    pub const SAME_SUBNET: u8 = 2;
    /// Traffic from pods of this pool to outside the pools is masqueraded.
    pub const NAT_OUTGOING: u8 = 4;
    /// The pool's ipipMode is CrossSubnet (for pool entries).
    pub const IPIP_CROSS_SUBNET: u8 = 8;
    /// The pool's ipipMode is Always (for pool entries).
    pub const IPIP_ALWAYS: u8 = 16;

    pub const NAMES: &[(u8, &str)] = &[
        (IPIP, "ipip"),
        (SAME_SUBNET, "same-subnet"),
        (NAT_OUTGOING, "nat-outgoing"),
        (IPIP_CROSS_SUBNET, "ipip-cross-subnet"),
        (IPIP_ALWAYS, "ipip-always"),
    ];
}

/// Value of the routes LPM trie (key: prefix length and IPv4 address in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteValue {
    /// One of the [`route_kind`] constants.
    pub kind: u8,
    /// [`route_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Host veth ifindex of a local workload; 0 otherwise.
    pub ifindex: u32,
    /// Node address behind a remote block or host, network order; zero otherwise.
    pub next_hop: [u8; 4],
    /// The pod's MAC for a local workload; zero otherwise.
    pub mac: [u8; 6],
    pub _pad2: [u8; 2],
}
const _: () = assert!(size_of::<RouteValue>() == 20);

/// Value of the endpoints map, keyed by the host veth's ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    /// The pod's address, network order (the only source it may send from).
    pub ip: [u8; 4],
    /// The pod's MAC.
    pub mac: [u8; 6],
    pub flags: u16,
    /// Compiled policy for traffic into the pod; [`POLICY_NONE`]: no policy, all allowed.
    pub ingress_policy: u32,
    /// Compiled policy for traffic from the pod; [`POLICY_NONE`]: no policy, all allowed.
    pub egress_policy: u32,
}
const _: () = assert!(size_of::<EndpointValue>() == 20);

/// A policy id meaning "no policy selects this endpoint in this direction": allow.
pub const POLICY_NONE: u32 = 0;

/// [`EndpointValue::flags`] bits, set by the agent for inspection (the programs do not read
/// them).
pub mod endpoint_flags {
    /// The endpoint's ingress rules do not fit the policy maps: the agent kept the policy in
    /// force before (or denies all when there was none) instead of a partial rule set.
    pub const INGRESS_HELD: u16 = 1;
    /// The same for egress.
    pub const EGRESS_HELD: u16 = 2;
}

/// Key of the policy address classifier (LPM trie): prefix bits 32 + the CIDR's length, so
/// the policy id always matches exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyIpKey {
    pub policy: u32,
    /// The peer address (source for ingress, destination for egress), network order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<PolicyIpKey>() == 8);

/// Key of the policy verdicts: (policy, address class, protocol, destination port). For ICMP
/// the "port" is type << 8 | code; protocols without ports use 0. When a verdict depends on
/// the source port too, it names a source-port table, looked up with that table's id as
/// `class` and the source port as `port`.
///
/// Lookups are hash lookups, so that their cost does not grow with the number of entries:
/// the exact port (`kind` [`port_kind::EXACT`]), else the protocol's answer
/// ([`port_kind::PROTO`], port 0), else the class's answer for protocols no rule names
/// ([`port_kind::CLASS`], protocol and port 0). Only when the protocol's entry says that
/// blocks of ports differ ([`verdict_flags::RANGES`]) is the trie of port prefixes
/// (`kind` EXACT, prefix bits 80 + n) consulted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPortKey {
    pub policy: u32,
    pub class: u32,
    pub proto: u8,
    /// One of [`port_kind`].
    pub kind: u8,
    /// Network order.
    pub port: [u8; 2],
}
const _: () = assert!(size_of::<PolicyPortKey>() == 12);

/// [`PolicyPortKey::kind`].
pub mod port_kind {
    /// One port (or, in the trie, a block of ports).
    pub const EXACT: u8 = 0;
    /// Every port of the protocol not listed otherwise.
    pub const PROTO: u8 = 1;
    /// Every protocol the class's rules do not name.
    pub const CLASS: u8 = 2;
}

/// Bits of a [`PolicyPortKey`] up to and including the protocol (and its kind byte).
pub const POLICY_PORT_PROTO_BITS: u32 = 80;
/// Bits of a [`PolicyPortKey`] for policy and class only.
pub const POLICY_PORT_CLASS_BITS: u32 = 64;

/// Bits of [`Verdict::flags`].
pub mod verdict_flags {
    /// (On a protocol's entry) blocks of ports answer differently: look in the trie.
    pub const RANGES: u8 = 1;
}

/// [`Verdict::action`].
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// No rule matched: the endpoint is isolated in this direction, the packet dropped.
    pub const NO_MATCH: u8 = 3;

    pub const fn name(action: u8) -> &'static str {
        match action {
            ALLOW => "allow",
            DENY => "deny",
            NO_MATCH => "no-match",
            _ => "unknown",
        }
    }
}

/// Value of the verdict trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Verdict {
    /// One of [`verdict`].
    pub action: u8,
    /// [`verdict_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Index of the deciding rule in the compiled policy (`u32::MAX`: none).
    pub rule: u32,
    /// Non-zero: the verdict depends on the source port; look it up in this table.
    pub sport_table: u32,
}
const _: () = assert!(size_of::<Verdict>() == 12);

/// Key of the per-CPU policy hit counters: how many packets each rule of a compiled policy
/// decided, per direction (a compiled policy may serve as one endpoint's ingress and
/// another's egress). Value: u64 packets. Counted only where policy is consulted (a
/// connection's first packet at each end), never for tracked packets.
///
/// Eight bytes, direction folded into `rule`: the counting subprogram's frame must stay
/// within 16 bytes (key and value), as from-workload's own frame leaves no more of the
/// 512-byte stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyHitKey {
    pub policy: u32,
    /// The rule's index in the compiled policy, or [`PolicyHitKey::NO_RULE`] for "no rule
    /// matched" (the isolated endpoint's default deny); bit [`PolicyHitKey::EGRESS`] set for
    /// the endpoint's egress policy (from-workload), clear for its ingress (to-workload).
    pub rule: u32,
}
const _: () = assert!(size_of::<PolicyHitKey>() == 8);

impl PolicyHitKey {
    /// The direction bit of [`PolicyHitKey::rule`].
    pub const EGRESS: u32 = 1 << 31;
    /// "No rule matched", in the low 31 bits of [`PolicyHitKey::rule`].
    pub const NO_RULE: u32 = !Self::EGRESS;

    /// `rule`: an index or `u32::MAX` (none matched), as the verdicts hold it.
    #[inline(always)]
    pub const fn new(policy: u32, rule: u32, egress: bool) -> Self {
        let rule = if rule >= Self::NO_RULE {
            Self::NO_RULE
        } else {
            rule
        };
        Self {
            policy,
            rule: if egress { rule | Self::EGRESS } else { rule },
        }
    }

    pub const fn egress(&self) -> bool {
        self.rule & Self::EGRESS != 0
    }

    /// The rule index, `u32::MAX` when none matched.
    pub const fn rule_index(&self) -> u32 {
        match self.rule & Self::NO_RULE {
            Self::NO_RULE => u32::MAX,
            r => r,
        }
    }
}

/// Key of the rule descriptions: (compiled policy id, rule index in it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRuleKey {
    pub policy: u32,
    pub rule: u32,
}
const _: () = assert!(size_of::<PolicyRuleKey>() == 8);

/// Bytes of [`PolicyRuleMeta::name`].
pub const POLICY_NAME_LEN: usize = 120;

/// What a compiled rule came from, written by the agent for `map-dump policy` (the programs
/// never read it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyRuleMeta {
    /// [`verdict::ALLOW`] or [`verdict::DENY`] (Calico's Pass is an allow).
    pub action: u8,
    /// 1: an egress rule; 0: ingress.
    pub egress: u8,
    /// 1: the name did not fit and was cut.
    pub truncated: u8,
    pub _pad: u8,
    /// The rule's number within its policy's ingress or egress list (0-based, as in the
    /// policy's YAML).
    pub number: u32,
    /// The policy's name, `namespace/name` or a global policy's name, UTF-8, NUL-padded.
    pub name: [u8; POLICY_NAME_LEN],
}
const _: () = assert!(size_of::<PolicyRuleMeta>() == 128);

impl Default for PolicyRuleMeta {
    fn default() -> Self {
        Self {
            action: 0,
            egress: 0,
            truncated: 0,
            _pad: 0,
            number: 0,
            name: [0; POLICY_NAME_LEN],
        }
    }
}

/// Connection tracking: key, states, flags.
pub mod ct {
    /// TCP states (and the single state of other protocols).
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    /// One side has sent FIN.
    pub const FIN_WAIT: u8 = 4;
    /// Both sides have sent FIN.
    pub const CLOSING: u8 = 5;
    pub const RESET: u8 = 6;
    /// UDP, ICMP and other protocols.
    pub const OPEN: u8 = 7;

    /// Flags: which ends' policy approved the connection.
    /// The originating pod's egress policy (checked at its from-workload hook).
    pub const EGRESS_APPROVED: u8 = 1;
    /// The answering pod's ingress policy (checked at its to-workload hook).
    pub const INGRESS_APPROVED: u8 = 2;
    /// A FIN from the originator / from the answerer.
    pub const FIN_FWD: u8 = 4;
    pub const FIN_REV: u8 = 8;
    /// A reply has been seen.
    pub const REPLIED: u8 = 16;

    pub const fn state_name(state: u8) -> &'static str {
        match state {
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            ESTABLISHED => "ESTABLISHED",
            FIN_WAIT => "FIN_WAIT",
            CLOSING => "CLOSING",
            RESET => "RESET",
            OPEN => "OPEN",
            _ => "UNKNOWN",
        }
    }
}

/// Key of the conntrack map: the connection as its first packet saw it (originator first).
/// For ICMP echo both ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network order, as on the wire.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 16);

impl CtKey {
    /// The same connection seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Key of the fragments map: a datagram whose first fragment policy allowed at one hook,
/// so that its later fragments (which carry no ports) pass there too, and no others do.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IP identification, network order.
    pub id: [u8; 2],
    pub proto: u8,
    /// 1: checked by the sending pod's egress policy; 0: by the receiving pod's ingress.
    pub egress: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

/// Value of the conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) of the first and the latest packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Packets from the originator, and back.
    pub packets_fwd: u64,
    pub packets_rev: u64,
    /// One of the [`ct`] states.
    pub state: u8,
    /// [`ct`] flag bits.
    pub flags: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<CtValue>() == 40);

/// Conntrack timeouts in seconds, by state: part of [`NodeConfig`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_fin: u32,
    pub tcp_reset: u32,
    pub udp: u32,
    pub icmp: u32,
    pub other: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CtTimeouts>() == 32);

impl CtTimeouts {
    /// Calico's defaults (felix BPF conntrack): SYN 20 s, established 1 h, FIN 30 s, RST
    /// 40 s, UDP 60 s, ICMP 5 s, other 10 min.
    pub const DEFAULT: Self = Self {
        tcp_syn: 20,
        tcp_established: 3600,
        tcp_fin: 30,
        tcp_reset: 40,
        udp: 60,
        icmp: 5,
        other: 600,
        _pad: 0,
    };

    /// How long an entry in `state` for `proto` lives without traffic, in nanoseconds.
    #[inline(always)]
    pub const fn of(&self, proto: u8, state: u8) -> u64 {
        let s = match proto {
            6 => match state {
                ct::SYN_SENT | ct::SYN_RECV => self.tcp_syn,
                ct::ESTABLISHED => self.tcp_established,
                ct::FIN_WAIT | ct::CLOSING => self.tcp_fin,
                _ => self.tcp_reset,
            },
            17 | 136 => self.udp,
            1 => self.icmp,
            _ => self.other,
        };
        s as u64 * 1_000_000_000
    }

    /// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`.
    #[inline(always)]
    pub const fn expired(&self, v: &CtValue, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(v.last_seen_ns) > self.of(proto, v.state)
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Value of the nodes map, keyed by a node's address in network order ([u8; 4]): the peers
/// IP-in-IP is accepted from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeValue {
    /// [`route_flags::SAME_SUBNET`] when the node shares this node's subnet.
    pub flags: u32,
}
const _: () = assert!(size_of::<NodeValue>() == 4);

/// The four hooks a program runs at. Stored in [`CounterKey::hook`].
pub mod hook {
    /// TC ingress of a `cali*` veth: packets the pod sends.
    pub const FROM_WORKLOAD: u8 = 0;
    /// TC egress of a `cali*` veth: packets on their way into the pod.
    pub const TO_WORKLOAD: u8 = 1;
    /// TC ingress of the host NIC.
    pub const HOST_INGRESS: u8 = 2;
    /// TC egress of the host NIC.
    pub const HOST_EGRESS: u8 = 3;
    pub const COUNT: usize = 4;

    /// Human name of a hook, as map-dump prints it.
    pub const fn name(hook: u8) -> &'static str {
        match hook {
            FROM_WORKLOAD => "from-workload",
            TO_WORKLOAD => "to-workload",
            HOST_INGRESS => "host-ingress",
            HOST_EGRESS => "host-egress",
            _ => "unknown",
        }
    }
}

/// Slots of [`Counters::values`]. Slots below [`counter::DROP_BASE`] count outcomes; from
/// `DROP_BASE` on, one slot per drop reason.
pub mod counter {
    pub const PACKETS: usize = 0;
    pub const BYTES: usize = 1;
    /// Handed to the kernel stack unchanged.
    pub const PASSED: usize = 2;
    /// Sent straight to another interface by the program.
    pub const REDIRECTED: usize = 3;
    pub const ENCAPSULATED: usize = 4;
    pub const DECAPSULATED: usize = 5;
    /// A new connection allowed by policy and tracked.
    pub const CT_NEW: usize = 6;
    /// A packet of a tracked connection (policy not consulted again).
    pub const CT_TRACKED: usize = 7;

    pub const DROP_BASE: usize = 8;
    /// A packet too short or inconsistent to parse.
    pub const DROP_MALFORMED: usize = DROP_BASE;
    pub const DROP_POLICY: usize = DROP_BASE + 1;
    pub const DROP_SPOOFED_SOURCE: usize = DROP_BASE + 2;
    pub const DROP_UNKNOWN_IPIP_PEER: usize = DROP_BASE + 3;
    pub const DROP_CONNTRACK_FULL: usize = DROP_BASE + 4;
    pub const DROP_NO_ROUTE: usize = DROP_BASE + 5;
    pub const DROP_TOO_BIG: usize = DROP_BASE + 6;
    pub const DROP_INTERNAL: usize = DROP_BASE + 7;
    /// From or to a pod interface whose endpoint (and policy) is not programmed yet.
    pub const DROP_NO_ENDPOINT: usize = DROP_BASE + 8;
    /// A frame from a pod whose Ethernet source (or ARP sender hardware address) is not the
    /// pod's MAC.
    pub const DROP_SPOOFED_MAC: usize = DROP_BASE + 9;
    /// IP-in-IP from a node whose inner packet is IP-in-IP again: decapsulated once, never
    /// twice, and not delivered.
    pub const DROP_NESTED_IPIP: usize = DROP_BASE + 10;

    pub const COUNT: usize = 24;

    /// Names of the slots in use, in slot order, as map-dump prints them.
    pub const NAMES: &[(usize, &str)] = &[
        (PACKETS, "packets"),
        (BYTES, "bytes"),
        (PASSED, "passed"),
        (REDIRECTED, "redirected"),
        (ENCAPSULATED, "encapsulated"),
        (DECAPSULATED, "decapsulated"),
        (CT_NEW, "ct_new"),
        (CT_TRACKED, "ct_tracked"),
        (DROP_MALFORMED, "drop_malformed"),
        (DROP_POLICY, "drop_policy"),
        (DROP_SPOOFED_SOURCE, "drop_spoofed_source"),
        (DROP_UNKNOWN_IPIP_PEER, "drop_unknown_ipip_peer"),
        (DROP_CONNTRACK_FULL, "drop_conntrack_full"),
        (DROP_NO_ROUTE, "drop_no_route"),
        (DROP_TOO_BIG, "drop_too_big"),
        (DROP_INTERNAL, "drop_internal"),
        (DROP_NO_ENDPOINT, "drop_no_endpoint"),
        (DROP_SPOOFED_MAC, "drop_spoofed_mac"),
        (DROP_NESTED_IPIP, "drop_nested_ipip"),
    ];
}

/// Most interfaces (pods plus the host NIC) one node's counters keep at once.
pub const MAX_COUNTER_KEYS: u32 = 4 * 8192;

/// Key of the per-CPU counters map: one entry per interface and hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
    /// One of the [`hook`] constants.
    pub hook: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CounterKey>() == 8);

impl CounterKey {
    pub const fn new(ifindex: u32, hook: u8) -> Self {
        Self {
            ifindex,
            hook,
            _pad: [0; 3],
        }
    }
}

/// Value of the per-CPU counters map: one u64 per [`counter`] slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub values: [u64; counter::COUNT],
}
const _: () = assert!(size_of::<Counters>() == 8 * counter::COUNT);

impl Counters {
    pub const ZERO: Self = Self {
        values: [0; counter::COUNT],
    };
}

impl Default for Counters {
    fn default() -> Self {
        Self::ZERO
    }
}

/// This node's settings, the single entry (index 0) of the config array, written by the agent.
/// All zero until the agent has written it: the programs then only count and pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// This node's address on the fabric, network order: the outer source of IP-in-IP and the
    /// outer destination accepted for decapsulation.
    pub node_ip: [u8; 4],
    /// The host NIC toward the fabric.
    pub host_ifindex: u32,
    /// The host NIC's MTU: a packet that would not fit once encapsulated is dropped and
    /// counted (0: no check).
    pub host_mtu: u32,
    pub _pad: u32,
    pub ct_timeouts: CtTimeouts,
}
const _: () = assert!(size_of::<NodeConfig>() == 48);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: repr(C), only integer fields and explicit padding, no implicit padding (asserted
    // by the size checks above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as above; an array of u64.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: same reasoning as the aya::Pod impls.
    unsafe impl bytemuck::Zeroable for CounterKey {}
    // SAFETY: same reasoning as the aya::Pod impls.
    unsafe impl bytemuck::Pod for CounterKey {}
    // SAFETY: same reasoning as the aya::Pod impls.
    unsafe impl bytemuck::Zeroable for Counters {}
    // SAFETY: same reasoning as the aya::Pod impls.
    unsafe impl bytemuck::Pod for Counters {}
    // SAFETY: repr(C), integer fields and explicit padding only, size asserted: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for RouteValue {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for EndpointValue {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for NodeValue {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for NodeConfig {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for PolicyIpKey {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for PolicyPortKey {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for Verdict {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for PolicyHitKey {}
    // SAFETY: as for RouteValue.
    unsafe impl aya::Pod for PolicyRuleKey {}
    // SAFETY: as for RouteValue (the name is a byte array).
    unsafe impl aya::Pod for PolicyRuleMeta {}
}

//! Policy fuzz through BPF_PROG_TEST_RUN (needs root): random and mutated packets against a
//! random policy set, each verdict of `to_workload` (the pod's ingress policy) and
//! `from_workload` (its egress policy) compared with a reference model written here from the
//! definitions, not from the compiler or the programs.
//!
//! The model, for one frame at the pod behind ifindex 1 (where test_run runs the programs):
//! - not IPv4 (ethertype; ARP is left to tests/hostile.rs): not policed, passes;
//! - an IPv4 header that is cut short, has a version other than 4, a header length under 20
//!   bytes, a total length under the header length or beyond the frame: malformed, dropped;
//! - egress from a source other than the pod's address: spoofed, dropped;
//! - the transport fields the dataplane needs (TCP ports and flags: 14 bytes; UDP, SCTP and
//!   UDPLite ports: 4; the 8-byte ICMP header) not inside the IP packet: malformed, dropped.
//!   A later fragment (offset ≠ 0) carries no transport header: ports 0, ICMP type and code 0;
//! - else the policy: POLICY_NONE allows; otherwise the first rule with a term whose
//!   protocol, peer (source for ingress, destination for egress), destination port (ICMP:
//!   type << 8 | code) and source port (ICMP: 0) match gives the action; no match, or a
//!   policy id that was never installed, denies. Protocols without ports match as port 0.
//!
//! BPF_PROG_TEST_RUN refuses IPv4 frames shorter than 34 bytes and IPv6 ones shorter than 54
//! (EINVAL): such frames are generated again rather than run.
//!
//! The IP checksum is not verified (a bad one changes nothing). Conntrack is emptied after
//! every packet, so each is judged by policy alone; the model also predicts the entry an
//! allowed packet leaves (none for ICMP errors and RSTs) and the per-hook counters.
//!
//! `POLICY_FUZZ_SEED` replays a run, `POLICY_FUZZ_PACKETS` sets its size (default 100,000).
//! `POLICY_FUZZ_KNOWN_BUGS=1` also generates the inputs of the known bugs listed at
//! [`KNOWN_BUGS`], which the default run leaves out so that it stays green until they are
//! fixed. The two this fuzz found are fixed and their inputs generated in every run: a rule
//! naming protocol 255 decided for unnamed protocols (the compiler's stand-in for them was
//! 255), and a transport header cut by the IP total length was read from the padding after
//! the packet.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::Ipv4Addr,
    time::Instant,
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use dataplane::policy::compile::{self, CompiledRule, IpSet, PortSet, ProtoMatch, Term};
use dataplane_common::{CtKey, EndpointValue, POLICY_NONE, counter, hook, verdict};
use dataplane_tests::{
    packets::{TestObject, checksum},
    require_root,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const IFINDEX: u32 = 1;
const POD: [u8; 4] = [10, 0, 0, 77];
const POD_MAC: [u8; 6] = [2, 0, 0, 0, 0, 77];

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const GRE: u8 = 47;
const SCTP: u8 = 132;
const UDPLITE: u8 = 136;
const TCP_RST: u8 = 0x04;

/// Inputs the default run leaves out, each a bug found by this fuzz (see the module docs).
const KNOWN_BUGS: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------
// A seeded generator.

/// SplitMix64: small, fast, and good enough to pick packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in a..=b.
    fn range(&mut self, a: u64, b: u64) -> u64 {
        a + self.below(b - a + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Policies, in the model's own terms.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    /// Host bits may be set (the compiler truncates; matching ignores them).
    addr: u32,
    len: u8,
}

impl Cidr {
    fn contains(self, a: u32) -> bool {
        self.len == 0 || (self.addr ^ a) >> (32 - u32::from(self.len)) == 0
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Any,
    Is(u8),
    Not(u8),
}

impl Proto {
    fn matches(self, p: u8) -> bool {
        match self {
            Self::Any => true,
            Self::Is(q) => p == q,
            Self::Not(q) => p != q,
        }
    }
}

/// Ports (or ICMP type << 8 | code): in one of `any_of` (all when `None`), in none of
/// `none_of`. Inclusive ranges.
#[derive(Clone, Debug, Default)]
struct Ports {
    any_of: Option<Vec<(u16, u16)>>,
    none_of: Vec<(u16, u16)>,
}

impl Ports {
    fn contains(&self, p: u16) -> bool {
        let within = |rs: &[(u16, u16)]| rs.iter().any(|&(a, b)| a <= p && p <= b);
        let listed = match &self.any_of {
            None => true,
            Some(rs) => within(rs),
        };
        listed && !within(&self.none_of)
    }

    fn is_all(&self) -> bool {
        self.any_of.is_none() && self.none_of.is_empty()
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |rs: &[(u16, u16)]| {
            rs.iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{a:#x}")
                    } else {
                        format!("{a:#x}-{b:#x}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.any_of {
            None => write!(f, "*")?,
            Some(rs) => write!(f, "{{{}}}", list(rs))?,
        }
        if !self.none_of.is_empty() {
            write!(f, "∖{{{}}}", list(&self.none_of))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct RuleTerm {
    proto: Proto,
    /// The peer is in at least one CIDR of every list…
    all_of: Vec<Vec<Cidr>>,
    /// …and in none of these.
    none_of: Vec<Cidr>,
    dport: Ports,
    sport: Ports,
}

impl RuleTerm {
    fn matches(&self, peer: u32, proto: u8, dport: u16, sport: u16) -> bool {
        self.proto.matches(proto)
            && self
                .all_of
                .iter()
                .all(|l| l.iter().any(|c| c.contains(peer)))
            && !self.none_of.iter().any(|c| c.contains(peer))
            && self.dport.contains(dport)
            && self.sport.contains(sport)
    }
}

impl fmt::Display for RuleTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Any => write!(f, "proto *")?,
            Proto::Is(p) => write!(f, "proto {p}")?,
            Proto::Not(p) => write!(f, "proto !{p}")?,
        }
        for l in &self.all_of {
            let l: Vec<String> = l.iter().map(Cidr::to_string).collect();
            write!(f, " peer∈{{{}}}", l.join(","))?;
        }
        if !self.none_of.is_empty() {
            let l: Vec<String> = self.none_of.iter().map(Cidr::to_string).collect();
            write!(f, " peer∉{{{}}}", l.join(","))?;
        }
        if !self.dport.is_all() {
            write!(f, " dport {}", self.dport)?;
        }
        if !self.sport.is_all() {
            write!(f, " sport {}", self.sport)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Rule {
    allow: bool,
    /// Matches when any term does.
    terms: Vec<RuleTerm>,
}

fn show_rules(rules: &[Rule]) -> String {
    if rules.is_empty() {
        return "    (no rules: isolation)\n".into();
    }
    let mut s = String::new();
    for (i, r) in rules.iter().enumerate() {
        let action = if r.allow { "allow" } else { "deny" };
        let terms: Vec<String> = r.terms.iter().map(|t| format!("[{t}]")).collect();
        writeln!(s, "    #{i} {action} {}", terms.join(" or ")).unwrap();
    }
    s
}

/// The reference: the action of the first rule with a matching term, `None` when no rule
/// matches.
fn first_match(rules: &[Rule], peer: u32, proto: u8, dport: u16, sport: u16) -> Option<bool> {
    rules
        .iter()
        .find(|r| r.terms.iter().any(|t| t.matches(peer, proto, dport, sport)))
        .map(|r| r.allow)
}

/// The same rules as the agent hands them to the compiler.
fn to_compiled(rules: &[Rule]) -> Vec<CompiledRule> {
    let port_set = |p: &Ports| PortSet {
        any_of: p.any_of.clone(),
        none_of: p.none_of.clone(),
    };
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| CompiledRule {
            action: if r.allow {
                verdict::ALLOW
            } else {
                verdict::DENY
            },
            terms: r
                .terms
                .iter()
                .map(|t| Term {
                    proto: match t.proto {
                        Proto::Any => ProtoMatch::Any,
                        Proto::Is(p) => ProtoMatch::Is(p),
                        Proto::Not(p) => ProtoMatch::Not(p),
                    },
                    peer: IpSet {
                        all_of: t
                            .all_of
                            .iter()
                            .map(|l| l.iter().map(|c| c.to_string().parse().unwrap()).collect())
                            .collect(),
                        none_of: t
                            .none_of
                            .iter()
                            .map(|c| c.to_string().parse().unwrap())
                            .collect(),
                        nets: None,
                    },
                    dport: port_set(&t.dport),
                    sport: port_set(&t.sport),
                })
                .collect(),
            origin: format!("policy fuzz rule #{i}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Random policies: a small address and port space so that rules overlap and match often.

const ICMP_TYPES: [u8; 8] = [0, 3, 8, 11, 5, 13, 4, 12];

fn random_cidr(rng: &mut Rng) -> Cidr {
    match rng.below(100) {
        0..8 => Cidr { addr: 0, len: 0 },
        8..12 => rng.pick(&[
            Cidr {
                addr: 0x0a00_0000,
                len: 16,
            },
            Cidr {
                addr: 0x0a00_0100,
                len: 24,
            },
            Cidr {
                addr: 0xc0a8_0000,
                len: 16,
            },
            Cidr {
                addr: 0x0a00_0000,
                len: 24,
            },
        ]),
        _ => {
            let len = rng.pick(&[32u8, 32, 31, 30, 29, 28, 27, 26, 25, 24]);
            let addr = 0x0a00_0000 | rng.below(72) as u32;
            let mask = u32::MAX << (32 - u32::from(len));
            Cidr {
                addr: if rng.percent(30) { addr } else { addr & mask },
                len,
            }
        }
    }
}

fn random_ranges(rng: &mut Rng, n: u64) -> Vec<(u16, u16)> {
    (0..n)
        .map(|_| {
            // Port 0 is refused by the policy validation, but the compiler takes it, and
            // later fragments look up port 0.
            let a = if rng.percent(3) {
                0
            } else {
                rng.range(1, 36) as u16
            };
            (a, a + rng.range(0, 6) as u16)
        })
        .collect()
}

fn random_ports(rng: &mut Rng) -> Ports {
    Ports {
        any_of: if rng.percent(70) {
            let n = rng.range(1, 3);
            Some(random_ranges(rng, n))
        } else {
            None
        },
        none_of: {
            let n = rng.range(0, 2);
            random_ranges(rng, n)
        },
    }
}

/// An ICMP type, or one type and code, as the resolver encodes `icmp`/`notICMP`.
fn random_icmp_range(rng: &mut Rng) -> (u16, u16) {
    let t = u16::from(rng.pick(&ICMP_TYPES)) << 8;
    if rng.percent(50) {
        (t, t | 0xff)
    } else {
        let c = rng.range(0, 3) as u16;
        (t | c, t | c)
    }
}

fn random_term(rng: &mut Rng, _known_bugs: bool) -> RuleTerm {
    let mut protos = vec![
        Proto::Any,
        Proto::Any,
        Proto::Is(TCP),
        Proto::Is(TCP),
        Proto::Is(UDP),
        Proto::Is(UDP),
        Proto::Is(ICMP),
        Proto::Is(ICMP),
        Proto::Not(TCP),
        Proto::Not(UDP),
        Proto::Not(ICMP),
        Proto::Is(GRE),
        Proto::Is(SCTP),
        Proto::Is(UDPLITE),
        Proto::Is(50),
    ];
    protos.extend([Proto::Is(255), Proto::Not(255)]);
    let proto = rng.pick(&protos);
    let lists = rng.pick(&[0u64, 0, 1, 1, 1, 2]);
    let all_of = (0..lists)
        .map(|_| {
            let n = rng.range(1, 3);
            (0..n).map(|_| random_cidr(rng)).collect()
        })
        .collect();
    let none_of = {
        let n = rng.pick(&[0u64, 0, 0, 1, 2]);
        (0..n).map(|_| random_cidr(rng)).collect()
    };
    // Ports only where the policy validation accepts them: with a protocol that has ports;
    // ICMP types and codes only with ICMP (as the resolver puts them: in `dport`).
    let (dport, sport) = match proto {
        Proto::Is(TCP | UDP | SCTP | UDPLITE) => (
            if rng.percent(60) {
                random_ports(rng)
            } else {
                Ports::default()
            },
            if rng.percent(25) {
                random_ports(rng)
            } else {
                Ports::default()
            },
        ),
        Proto::Is(ICMP) => {
            let mut p = Ports::default();
            if rng.percent(60) {
                let n = rng.range(1, 2);
                p.any_of = Some((0..n).map(|_| random_icmp_range(rng)).collect());
            }
            if rng.percent(30) {
                p.none_of.push(random_icmp_range(rng));
            }
            (p, Ports::default())
        }
        _ => (Ports::default(), Ports::default()),
    };
    RuleTerm {
        proto,
        all_of,
        none_of,
        dport,
        sport,
    }
}

fn random_rules(rng: &mut Rng, known_bugs: bool) -> Vec<Rule> {
    let n = rng.range(1, 8);
    (0..n)
        .map(|_| Rule {
            allow: rng.percent(60),
            terms: {
                let n = rng.pick(&[1u64, 1, 1, 2, 3]);
                (0..n).map(|_| random_term(rng, known_bugs)).collect()
            },
        })
        .collect()
}

/// One round's policies by id: random ones, an empty one (isolation), POLICY_NONE, and an
/// id that was never installed.
struct PolicySet {
    installed: BTreeMap<u32, Vec<Rule>>,
    ids: Vec<u32>,
}

impl PolicySet {
    fn random(rng: &mut Rng, base: u32, known_bugs: bool) -> Self {
        let n = rng.range(4, 8) as u32;
        let mut installed = BTreeMap::new();
        for id in base + 1..=base + n {
            installed.insert(id, random_rules(rng, known_bugs));
        }
        let empty = base + n + 1;
        installed.insert(empty, Vec::new());
        // Weights: random policies most of the time.
        let mut ids: Vec<u32> = Vec::new();
        for id in base + 1..=base + n {
            ids.extend([id; 4]);
        }
        ids.extend([empty, empty, POLICY_NONE, POLICY_NONE, base + 15]);
        Self { installed, ids }
    }

    fn rules(&self, id: u32) -> Option<&[Rule]> {
        self.installed.get(&id).map(Vec::as_slice)
    }
}

// ---------------------------------------------------------------------------------------
// The model of one frame.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    NotIpv4,
    Malformed,
    Spoofed,
    /// Denied by a rule.
    DeniedByRule,
    /// No rule matched (or the policy id was never installed).
    DeniedNoMatch,
    Allowed,
    /// Passed without policy and without a conntrack entry: a later fragment at a pod with
    /// no policy.
    AllowedUntracked,
}

impl Outcome {
    fn verdict(self) -> i32 {
        match self {
            Self::NotIpv4 | Self::Allowed | Self::AllowedUntracked => TC_ACT_OK,
            _ => TC_ACT_SHOT,
        }
    }

    /// The counter the outcome increments beside PACKETS and BYTES.
    fn counter(self) -> usize {
        match self {
            Self::NotIpv4 | Self::Allowed | Self::AllowedUntracked => counter::PASSED,
            Self::Malformed => counter::DROP_MALFORMED,
            Self::Spoofed => counter::DROP_SPOOFED_SOURCE,
            Self::DeniedByRule | Self::DeniedNoMatch => counter::DROP_POLICY,
        }
    }
}

/// What the policy saw of a packet.
#[derive(Clone, Copy, Debug)]
struct PolicyInput {
    peer: u32,
    proto: u8,
    dport: u16,
    sport: u16,
    later_fragment: bool,
}

#[derive(Debug)]
struct Expected {
    outcome: Outcome,
    input: Option<PolicyInput>,
    /// The conntrack entry the packet leaves behind.
    entry: Option<CtKey>,
    /// The known bug this input runs into, if any.
    known_bug: Option<&'static str>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn is_icmp_error(t: u8) -> bool {
    // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
    matches!(t, 3 | 4 | 5 | 11 | 12)
}

fn model(frame: &[u8], egress: bool, policy: u32, set: &PolicySet) -> Expected {
    let done = |outcome| Expected {
        outcome,
        input: None,
        entry: None,
        known_bug: None,
    };
    if be16(frame, 12) != 0x0800 {
        return done(Outcome::NotIpv4);
    }
    if frame.len() < 14 + 20 {
        return done(Outcome::Malformed);
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return done(Outcome::Malformed);
    }
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    if egress && src != POD {
        return done(Outcome::Spoofed);
    }
    let proto = ip[9];
    let later_fragment = be16(ip, 6) & 0x1fff != 0;
    let packet = &ip[..total];
    let l4 = &packet[ihl..];
    let need = match proto {
        TCP => 14,
        UDP | SCTP | UDPLITE => 4,
        ICMP => 8,
        _ => 0,
    };
    if !later_fragment && l4.len() < need {
        return done(Outcome::Malformed);
    }
    // (sport, dport) as conntrack keys them, and what policy matches.
    let (mut ct_ports, mut dport, mut sport) = ([0u8; 4], 0u16, 0u16);
    let (mut tcp_flags, mut icmp_type) = (0u8, 0u8);
    if !later_fragment {
        match proto {
            TCP | UDP | SCTP | UDPLITE => {
                ct_ports.copy_from_slice(&l4[..4]);
                sport = be16(l4, 0);
                dport = be16(l4, 2);
                if proto == TCP {
                    tcp_flags = l4[13];
                }
            }
            ICMP => {
                icmp_type = l4[0];
                dport = u16::from_be_bytes([l4[0], l4[1]]);
                if matches!(l4[0], 0 | 8) {
                    // Echo: the identifier stands for both ports.
                    ct_ports = [l4[4], l4[5], l4[4], l4[5]];
                }
            }
            _ => {}
        }
    }
    let peer = u32::from_be_bytes(if egress { dst } else { src });
    let input = PolicyInput {
        peer,
        proto,
        dport,
        sport,
        later_fragment,
    };
    // A later fragment passes only where its datagram's first fragment was allowed at the
    // same hook; the fragments map is emptied after every packet, so here: only without
    // policy, and then untracked.
    if later_fragment {
        return Expected {
            outcome: if policy == POLICY_NONE {
                Outcome::AllowedUntracked
            } else {
                Outcome::DeniedNoMatch
            },
            input: Some(input),
            entry: None,
            known_bug: None,
        };
    }
    let decision = if policy == POLICY_NONE {
        Some(true)
    } else {
        set.rules(policy)
            .and_then(|rules| first_match(rules, peer, proto, dport, sport))
    };
    let known_bug = None;
    let outcome = match decision {
        Some(true) => Outcome::Allowed,
        Some(false) => Outcome::DeniedByRule,
        None => Outcome::DeniedNoMatch,
    };
    // Answers (ICMP errors, RSTs) pass untracked; anything else allowed opens an entry.
    let answer =
        (proto == ICMP && is_icmp_error(icmp_type)) || (proto == TCP && tcp_flags & TCP_RST != 0);
    let entry = (outcome == Outcome::Allowed && !answer).then_some(CtKey {
        saddr: src,
        daddr: dst,
        sport: [ct_ports[0], ct_ports[1]],
        dport: [ct_ports[2], ct_ports[3]],
        proto,
        _pad: [0; 3],
    });
    Expected {
        outcome,
        input: Some(input),
        entry,
        known_bug,
    }
}

// ---------------------------------------------------------------------------------------
// Random and mutated packets.

fn random_addr(rng: &mut Rng) -> [u8; 4] {
    match rng.below(100) {
        0..70 => [10, 0, 0, rng.below(72) as u8],
        70..80 => [10, 0, 0, rng.byte()],
        80..88 => [10, 0, 1, rng.byte()],
        88..94 => [192, 168, rng.byte(), rng.byte()],
        _ => rng.next().to_be_bytes()[..4].try_into().unwrap(),
    }
}

fn random_port(rng: &mut Rng) -> u16 {
    match rng.below(100) {
        0..75 => rng.range(0, 45) as u16,
        75..95 => rng.next() as u16,
        _ => rng.pick(&[0, 65535]),
    }
}

fn tcp_header(rng: &mut Rng) -> Vec<u8> {
    let flags = match rng.below(10) {
        0..4 => 0x02,
        4..6 => rng.pick(&[0x10, 0x12, 0x11, 0x18, 0x04, 0x14]),
        _ => rng.byte(),
    };
    let opt_words = if rng.percent(20) { rng.range(1, 3) } else { 0 };
    let mut h = Vec::new();
    h.extend(random_port(rng).to_be_bytes());
    h.extend(random_port(rng).to_be_bytes());
    h.extend(rng.bytes(8));
    h.push(((5 + opt_words as u8) << 4) | (rng.byte() & 0x0f));
    h.push(flags);
    h.extend(rng.bytes(6));
    h.extend(rng.bytes(opt_words as usize * 4));
    let payload = rng.range(0, 16) as usize;
    h.extend(rng.bytes(payload));
    h
}

fn udp_like_header(rng: &mut Rng) -> Vec<u8> {
    let payload = rng.range(0, 16) as usize;
    let mut h = Vec::new();
    h.extend(random_port(rng).to_be_bytes());
    h.extend(random_port(rng).to_be_bytes());
    h.extend(((8 + payload) as u16).to_be_bytes());
    h.extend([0, 0]);
    h.extend(rng.bytes(payload));
    h
}

/// The start of a packet an ICMP error quotes: a plausible one, or junk, or cut short.
fn quoted(rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0..6 => {
            let proto = rng.pick(&[TCP, UDP, ICMP, GRE]);
            let mut q = vec![0x45, 0, 0, 60, 0, 1, 0x40, 0, 64, proto, 0, 0];
            q.extend(random_addr(rng));
            q.extend(random_addr(rng));
            let c = checksum(&q);
            q[10..12].copy_from_slice(&c.to_be_bytes());
            q.extend(rng.bytes(8));
            q
        }
        6..8 => {
            let n = rng.range(0, 40) as usize;
            rng.bytes(n)
        }
        _ => Vec::new(),
    }
}

fn icmp_message(rng: &mut Rng) -> Vec<u8> {
    let (t, code, body) = match rng.below(10) {
        0..4 => {
            let n = rng.range(0, 24) as usize;
            (rng.pick(&[8, 0]), 0, rng.bytes(n))
        }
        4..7 => {
            let t = rng.pick(&[3, 3, 11, 12, 4, 5]);
            (t, rng.range(0, 4) as u8, quoted(rng))
        }
        7..9 => {
            let n = rng.range(0, 8) as usize;
            (rng.pick(&ICMP_TYPES), rng.range(0, 4) as u8, rng.bytes(n))
        }
        _ => (rng.byte(), rng.byte(), Vec::new()),
    };
    let mut m = vec![t, code, 0, 0];
    m.extend(rng.bytes(4));
    m.extend(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A frame and the mutations it went through, for the report.
struct Packet {
    frame: Vec<u8>,
    mutations: Vec<&'static str>,
}

fn set_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if ihl < 20 || frame.len() < 14 + ihl {
        return;
    }
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

fn random_packet(rng: &mut Rng, egress: bool, _known_bugs: bool) -> Packet {
    let mut mutations = Vec::new();
    let peer = random_addr(rng);
    let (src, dst) = if egress {
        if rng.percent(4) {
            mutations.push("spoofed source");
            (random_addr(rng), peer)
        } else {
            (POD, peer)
        }
    } else if rng.percent(90) {
        (peer, POD)
    } else {
        (peer, random_addr(rng))
    };
    let (proto, l4) = match rng.below(100) {
        0..30 => (TCP, tcp_header(rng)),
        30..50 => (UDP, udp_like_header(rng)),
        50..54 => (SCTP, udp_like_header(rng)),
        54..57 => (UDPLITE, udp_like_header(rng)),
        57..85 => (ICMP, icmp_message(rng)),
        85..92 => (GRE, {
            let n = rng.range(0, 12) as usize;
            rng.bytes(n)
        }),
        _ => (rng.byte(), {
            let n = rng.range(0, 24) as usize;
            rng.bytes(n)
        }),
    };
    let options = if rng.percent(12) {
        mutations.push("ip options");
        let words = rng.range(1, 10) as usize;
        (0..words * 4)
            .map(|_| {
                let any = rng.byte();
                rng.pick(&[0u8, 1, 1, 1, 7, 0x44, 0x83, 0x94, any])
            })
            .collect()
    } else {
        Vec::new()
    };
    let ihl = 20 + options.len();
    let mut frame = Vec::with_capacity(14 + ihl + l4.len() + 32);
    frame.extend(rng.bytes(6));
    frame.extend(POD_MAC);
    frame.extend(0x0800u16.to_be_bytes());
    frame.push(0x40 | (ihl / 4) as u8);
    frame.push(rng.byte());
    frame.extend(((ihl + l4.len()) as u16).to_be_bytes());
    frame.extend(rng.bytes(2));
    frame.extend(rng.pick(&[0x0000u16, 0x4000]).to_be_bytes());
    frame.push(rng.byte());
    frame.push(proto);
    frame.extend([0, 0]);
    frame.extend(src);
    frame.extend(dst);
    frame.extend(options);
    frame.extend(l4);
    let total_at = 16;
    let set_total = |frame: &mut Vec<u8>, total: usize| {
        frame[total_at..total_at + 2].copy_from_slice(&(total as u16).to_be_bytes());
    };

    if rng.percent(8) {
        mutations.push("later fragment");
        let flags = rng.pick(&[0u16, 0x2000, 0x4000]);
        let offset = rng.range(1, 0x1fff) as u16;
        frame[20..22].copy_from_slice(&(flags | offset).to_be_bytes());
    } else if rng.percent(3) {
        mutations.push("first fragment");
        frame[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    }
    if rng.percent(8) && frame.len() > 14 + ihl {
        let cut = 14 + ihl + rng.below((frame.len() - 14 - ihl) as u64) as usize;
        frame.truncate(cut);
        if rng.percent(60) {
            mutations.push("transport cut, total length adjusted");
            set_total(&mut frame, cut - 14);
        } else {
            mutations.push("transport cut, total length beyond the frame");
        }
    }
    if rng.percent(5) {
        mutations.push("padding after the IP packet");
        let n = rng.range(1, 20) as usize;
        frame.extend(rng.bytes(n));
    }
    if rng.percent(3) && frame.len() > 14 + ihl {
        mutations.push("total length cuts the transport header, frame goes on");
        let keep = (rng.below(15) as usize).min(frame.len() - 14 - ihl);
        set_total(&mut frame, ihl + keep);
    }
    match rng.below(100) {
        0..2 => {
            mutations.push("bad version");
            let v = rng.pick(&[0u8, 1, 5, 6, 15]);
            frame[14] = (v << 4) | (frame[14] & 0x0f);
        }
        2..4 => {
            mutations.push("header length under 5 words");
            frame[14] = 0x40 | rng.range(0, 4) as u8;
        }
        4..5 => {
            mutations.push("total length under the header length");
            set_total(&mut frame, rng.below(ihl as u64) as usize);
        }
        // BPF_PROG_TEST_RUN refuses an IPv4 frame without 20 bytes of IP header: cut inside
        // the options.
        5..6 if ihl > 20 => {
            mutations.push("frame cut inside the IP options");
            frame.truncate(rng.range(14 + 20, 14 + ihl as u64 - 1) as usize);
        }
        6..8 => {
            mutations.push("not IPv4");
            let any = rng.next() as u16;
            // Not ARP: from a pod, ARP is checked (sender MAC and address, tests/hostile.rs)
            // rather than passed.
            let t = match rng.pick(&[0x86ddu16, 0x8100, 0x88a8, any]) {
                0x0800 | 0x0806 => 0x88b5,
                t => t,
            };
            frame[12..14].copy_from_slice(&t.to_be_bytes());
        }
        _ => {}
    }
    let flip = rng.percent(4);
    if flip {
        mutations.push("random bytes changed");
        for _ in 0..rng.range(1, 3) {
            if frame.len() > 14 {
                let at = rng.range(14, frame.len() as u64 - 1) as usize;
                frame[at] = rng.byte();
            }
        }
    }
    if frame.len() >= 14 + 20 {
        if rng.percent(5) {
            mutations.push("bad IP checksum");
            set_ip_checksum(&mut frame);
            frame[24] ^= rng.range(1, 255) as u8;
        } else if !flip {
            set_ip_checksum(&mut frame);
        }
    }
    Packet { frame, mutations }
}

// ---------------------------------------------------------------------------------------
// The run.

struct Disagreement {
    packet: u64,
    egress: bool,
    policy: u32,
    rules: String,
    frame: Vec<u8>,
    mutations: Vec<&'static str>,
    expected: Expected,
    got: i32,
    conntrack: Option<String>,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (program, peer) = if self.egress {
            ("from_workload (egress)", "destination")
        } else {
            ("to_workload (ingress)", "source")
        };
        writeln!(
            f,
            "packet #{} through {program}, peer = {peer}, policy {}:",
            self.packet, self.policy
        )?;
        write!(f, "{}", self.rules)?;
        writeln!(f, "  mutations: {:?}", self.mutations)?;
        let hex: Vec<String> = self.frame.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "  frame ({} bytes): {}", self.frame.len(), hex.join(" "))?;
        if let Some(i) = &self.expected.input {
            writeln!(
                f,
                "  policy input: peer {} proto {} dport {:#06x} sport {:#06x}{}",
                Ipv4Addr::from(i.peer),
                i.proto,
                i.dport,
                i.sport,
                if i.later_fragment {
                    " (later fragment)"
                } else {
                    ""
                }
            )?;
        }
        if let Some(bug) = self.expected.known_bug {
            writeln!(f, "  known bug: {bug}")?;
        }
        writeln!(
            f,
            "  model: {:?} → {}, BPF: {}",
            self.expected.outcome,
            self.expected.outcome.verdict(),
            self.got
        )?;
        if let Some(c) = &self.conntrack {
            writeln!(f, "  conntrack: {c}")?;
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

/// BPF_PROG_TEST_RUN (bpf_prog_test_run_skb) refuses, with EINVAL, an IPv4 frame shorter
/// than its 20-byte header and an IPv6 frame shorter than its 40-byte one; the programs
/// would drop the first as malformed and pass the second.
fn test_run_accepts(frame: &[u8]) -> bool {
    match be16(frame, 12) {
        0x0800 => frame.len() >= 14 + 20,
        0x86dd => frame.len() >= 14 + 40,
        _ => true,
    }
}

/// One run of `program` on `frame`: its return value.
fn run(obj: &TestObject, program: &str, frame: &[u8]) -> i32 {
    let prog: &SchedClassifier = obj.ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test_run {program} on {frame:02x?}: {e:?}"));
    result.return_value as i32
}

fn install(obj: &mut TestObject, set: &PolicySet) {
    for (&id, rules) in &set.installed {
        let entries = compile::compile(id, &to_compiled(rules), 1 << 20)
            .unwrap_or_else(|e| panic!("compile policy {id}: {e}"));
        obj.install_policy(&entries);
    }
}

fn set_endpoint(obj: &mut TestObject, policy: u32) {
    obj.set_endpoint(
        IFINDEX,
        EndpointValue {
            ip: POD,
            mac: POD_MAC,
            flags: 0,
            ingress_policy: policy,
            egress_policy: policy,
        },
    );
}

/// Every key the programs could file this frame's flow under: its addresses and protocol,
/// with ports 0, the first four transport bytes (after the options, or as if there were
/// none), or an ICMP echo identifier twice.
fn candidate_keys(frame: &[u8]) -> Vec<CtKey> {
    if frame.len() < 14 + 20 {
        return Vec::new();
    }
    let ip = &frame[14..];
    let key = |ports: [u8; 4]| CtKey {
        saddr: ip[12..16].try_into().unwrap(),
        daddr: ip[16..20].try_into().unwrap(),
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip[9],
        _pad: [0; 3],
    };
    let mut keys = vec![key([0; 4])];
    for l4 in [usize::from(ip[0] & 0x0f) * 4, 20] {
        if let Some(h) = ip.get(l4..l4 + 4) {
            keys.push(key([h[0], h[1], h[2], h[3]]));
        }
        if let Some(h) = ip.get(l4 + 4..l4 + 6) {
            keys.push(key([h[0], h[1], h[0], h[1]]));
        }
    }
    keys
}

/// Empties conntrack after a packet: removes the entry the model expects, and any other the
/// packet may have left (itself a disagreement). Returns what differed. `scan`: also look
/// through the whole table (slow: an empty hash map's next-key walks every bucket).
fn clear_conntrack(
    obj: &mut TestObject,
    frame: &[u8],
    expected: Option<CtKey>,
    scan: bool,
) -> Option<String> {
    let mut ct = obj.conntrack();
    let mut problems = Vec::new();
    if let Some(k) = expected
        && ct.remove(&k).is_err()
    {
        problems.push(format!("no entry for {k:?}"));
    }
    let mut left: Vec<CtKey> = candidate_keys(frame)
        .into_iter()
        .filter(|k| Some(*k) != expected && ct.remove(k).is_ok())
        .collect();
    if scan {
        let rest: Vec<CtKey> = ct.keys().map(|k| k.unwrap()).collect();
        for k in &rest {
            ct.remove(k).unwrap();
        }
        left.extend(rest);
    }
    if !left.is_empty() {
        problems.push(format!("unexpected entries {left:?}"));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Forgets the datagram this frame may have opened in the fragments map (both hooks).
fn clear_fragments(obj: &mut TestObject, frame: &[u8]) {
    let Some(ip) = frame.get(14..34) else { return };
    let mut map = obj.fragments();
    for egress in [0, 1] {
        let _ = map.remove(&dataplane_common::FragKey {
            saddr: ip[12..16].try_into().unwrap(),
            daddr: ip[16..20].try_into().unwrap(),
            id: [ip[4], ip[5]],
            proto: ip[9],
            egress,
        });
    }
}

#[test]
fn root_policy_fuzz_bpf_verdicts_match_the_reference_model() {
    require_root();
    let seed = env_u64("POLICY_FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    let packets = env_u64("POLICY_FUZZ_PACKETS").unwrap_or(100_000);
    let known_bugs = env_u64("POLICY_FUZZ_KNOWN_BUGS").is_some_and(|v| v != 0);
    eprintln!(
        "policy fuzz: seed {seed:#x} (POLICY_FUZZ_SEED), {packets} packets, known bugs {}",
        if known_bugs {
            "generated"
        } else {
            "left out (POLICY_FUZZ_KNOWN_BUGS=1 to generate them)"
        }
    );
    let mut rng = Rng(seed);
    let mut obj = TestObject::load();

    // A fresh random policy set every 10,000 packets, under new ids (the old ones stay in
    // the tries: policies must not see each other's entries).
    const ROUND: u64 = 10_000;
    let mut set = PolicySet::random(&mut rng, 0, known_bugs);
    install(&mut obj, &set);
    let mut policy = u32::MAX;
    let mut stay = 0u64;

    let mut counters = [[0u64; counter::COUNT]; 2];
    let mut outcomes: BTreeMap<(bool, Outcome), u64> = BTreeMap::new();
    let mut by_mutation: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut later_fragments_judged = 0u64;
    let mut skipped = 0u64;
    let mut untestable = 0u64;
    let mut disagreements: Vec<Disagreement> = Vec::new();
    let mut bpf_time = std::time::Duration::ZERO;
    let start = Instant::now();

    for n in 0..packets {
        if n > 0 && n % ROUND == 0 {
            set = PolicySet::random(&mut rng, (n / ROUND) as u32 * 16, known_bugs);
            install(&mut obj, &set);
            stay = 0;
        }
        if stay == 0 {
            let next = rng.pick(&set.ids);
            if next != policy {
                policy = next;
                set_endpoint(&mut obj, policy);
            }
            stay = rng.range(1, 20);
        }
        stay -= 1;
        let egress = rng.percent(50);
        let (packet, expected) = loop {
            let p = random_packet(&mut rng, egress, known_bugs);
            if !test_run_accepts(&p.frame) {
                untestable += 1;
                continue;
            }
            let e = model(&p.frame, egress, policy, &set);
            if known_bugs || e.known_bug.is_none() {
                break (p, e);
            }
            skipped += 1;
        };

        let program = if egress {
            "from_workload"
        } else {
            "to_workload"
        };
        let t = Instant::now();
        let got = run(&obj, program, &packet.frame);
        bpf_time += t.elapsed();
        // The whole table is looked through now and then, and at the end.
        let scan = n % 64 == 63 || n + 1 == packets;
        let conntrack = clear_conntrack(&mut obj, &packet.frame, expected.entry, scan);
        clear_fragments(&mut obj, &packet.frame);

        let h = usize::from(egress);
        counters[h][counter::PACKETS] += 1;
        counters[h][counter::BYTES] += packet.frame.len() as u64;
        counters[h][expected.outcome.counter()] += 1;
        if matches!(expected.outcome, Outcome::Allowed) {
            counters[h][counter::CT_NEW] += 1;
        }
        *outcomes.entry((egress, expected.outcome)).or_default() += 1;
        for m in &packet.mutations {
            *by_mutation.entry(m).or_default() += 1;
        }
        if expected.input.is_some_and(|i| i.later_fragment) {
            later_fragments_judged += 1;
        }

        if got != expected.outcome.verdict() || conntrack.is_some() {
            disagreements.push(Disagreement {
                packet: n,
                egress,
                policy,
                rules: match set.rules(policy) {
                    Some(r) => show_rules(r),
                    None if policy == POLICY_NONE => "    (POLICY_NONE: no policy)\n".into(),
                    None => "    (never installed)\n".into(),
                },
                frame: packet.frame,
                mutations: packet.mutations,
                expected,
                got,
                conntrack,
            });
        }
    }
    let elapsed = start.elapsed();

    eprintln!(
        "policy fuzz: {packets} executions in {:.1?} ({:.1?} in BPF_PROG_TEST_RUN), {} \
         disagreements; {skipped} known-bug inputs left out, {untestable} frames \
         BPF_PROG_TEST_RUN cannot take regenerated",
        elapsed,
        bpf_time,
        disagreements.len()
    );
    for ((egress, outcome), count) in &outcomes {
        let dir = if *egress { "egress " } else { "ingress" };
        eprintln!("  {dir} {outcome:?}: {count}");
    }
    eprintln!("  later fragments judged by policy: {later_fragments_judged}");
    for (m, count) in &by_mutation {
        eprintln!("  mutation {m:?}: {count}");
    }

    // The counters, per hook, against the model's tally.
    let mut counter_problems = Vec::new();
    for (h, hk) in [(0, hook::TO_WORKLOAD), (1, hook::FROM_WORKLOAD)] {
        let got = obj.counters(IFINDEX, hk);
        for slot in [
            counter::PACKETS,
            counter::BYTES,
            counter::PASSED,
            counter::CT_NEW,
            counter::CT_TRACKED,
            counter::DROP_MALFORMED,
            counter::DROP_SPOOFED_SOURCE,
            counter::DROP_POLICY,
        ] {
            if got[slot] != counters[h][slot] {
                counter_problems.push(format!(
                    "{} counter {slot}: BPF {}, model {}",
                    hook::name(hk),
                    got[slot],
                    counters[h][slot]
                ));
            }
        }
    }

    // A generator that stopped producing some outcome would make the run say little.
    for egress in [false, true] {
        for outcome in [
            Outcome::Spoofed,
            Outcome::NotIpv4,
            Outcome::Malformed,
            Outcome::DeniedByRule,
            Outcome::DeniedNoMatch,
            Outcome::Allowed,
        ] {
            if packets >= 20_000 && (egress || outcome != Outcome::Spoofed) {
                assert!(
                    outcomes.get(&(egress, outcome)).copied().unwrap_or(0) > 50,
                    "seed {seed:#x}: too few {outcome:?} (egress {egress}): {outcomes:?}"
                );
            }
        }
    }

    // The first few of each kind: the known bugs this input runs into, or none.
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut report = String::new();
    for d in &disagreements {
        let kind = d.expected.known_bug.unwrap_or("(no known bug)");
        let seen = kinds.entry(kind).or_default();
        *seen += 1;
        if *seen <= 3 {
            writeln!(report, "{d}").unwrap();
        }
    }
    assert!(
        disagreements.is_empty() && counter_problems.is_empty(),
        "seed {seed:#x}: {} of {packets} packets disagree with the model ({kinds:?}); \
         counters: {counter_problems:?}\nfirst ones:\n{report}\nknown bugs:\n{}",
        disagreements.len(),
        KNOWN_BUGS
            .iter()
            .map(|(k, d)| format!("  {k}: {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

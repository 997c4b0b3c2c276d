//! Everything the TC programs and userspace must agree on: map names, limits, and the layout of
//! every key and value. Types here are `#[repr(C)]`, fixed-size, with explicit padding and no
//! enums, bools or options inside, so both sides see the same bytes.
#![no_std]

use core::mem::size_of;

/// Names of the maps in the object, which are also their pin names under `<bpffs-dir>/maps/`.
pub mod map_names {
    pub const COUNTERS: &str = "DP_COUNTERS";
}

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

    pub const COUNT: usize = 24;

    /// Names of the slots in use, in slot order, as map-dump prints them.
    pub const NAMES: &[(usize, &str)] = &[
        (PACKETS, "packets"),
        (BYTES, "bytes"),
        (PASSED, "passed"),
        (REDIRECTED, "redirected"),
        (ENCAPSULATED, "encapsulated"),
        (DECAPSULATED, "decapsulated"),
        (DROP_MALFORMED, "drop_malformed"),
        (DROP_POLICY, "drop_policy"),
        (DROP_SPOOFED_SOURCE, "drop_spoofed_source"),
        (DROP_UNKNOWN_IPIP_PEER, "drop_unknown_ipip_peer"),
        (DROP_CONNTRACK_FULL, "drop_conntrack_full"),
        (DROP_NO_ROUTE, "drop_no_route"),
        (DROP_TOO_BIG, "drop_too_big"),
        (DROP_INTERNAL, "drop_internal"),
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
}

//! Per-CPU accounting of packets, bytes, outcomes and drop reasons per (interface, hook).

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::PerCpuHashMap, programs::TcContext};
use dataplane_common::{CounterKey, Counters, MAX_COUNTER_KEYS, counter};

const EEXIST: i32 = 17;

pub type CounterMap = PerCpuHashMap<CounterKey, Counters, { MAX_COUNTER_KEYS as usize }>;

/// This CPU's counters for one (interface, hook); empty when the map is full, in which case
/// counting is skipped rather than the packet dropped.
pub struct Stats(Option<*mut Counters>);

impl Stats {
    #[inline(always)]
    pub fn get(map: &CounterMap, ctx: &TcContext, hook: u8) -> Self {
        // SAFETY: `skb` is the context pointer the kernel passed to the program.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        Self::of(map, ifindex, hook)
    }

    /// This CPU's counters for `hook` of another interface (a packet delivered straight into
    /// a pod is counted at its veth's to-workload hook, which it then skips).
    #[inline(always)]
    pub fn of(map: &CounterMap, ifindex: u32, hook: u8) -> Self {
        let key = CounterKey::new(ifindex, hook);
        if let Some(p) = map.get_ptr_mut(key) {
            return Self(Some(p));
        }
        // First packet on this interface and hook: create the entry. Another CPU may win the
        // race (EEXIST); either way the lookup after it finds the entry.
        match map.insert(key, Counters::ZERO, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {}
            Err(_) => return Self(None),
        }
        Self(map.get_ptr_mut(key))
    }

    #[inline(always)]
    pub fn add(&self, slot: usize, n: u64) {
        if slot >= counter::COUNT {
            return;
        }
        if let Some(p) = self.0 {
            // SAFETY: a per-CPU map value is only touched by this CPU while the program runs,
            // and `slot` is within the array.
            unsafe { (*p).values[slot] += n };
        }
    }
}

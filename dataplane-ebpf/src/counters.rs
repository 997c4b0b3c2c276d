//! Per-CPU accounting of packets, bytes, outcomes and drop reasons per (interface, hook).

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::PerCpuHashMap, programs::TcContext};
use dataplane_common::{CounterKey, Counters, MAX_COUNTER_KEYS, counter};

const EEXIST: i32 = 17;

/// The value a new entry starts from. A static, so that the insert reads it from the object's
/// read-only data instead of a 192-byte zeroed copy on the stack of every program (the
/// verifier allows a map value as the value argument of an update).
static ZERO: Counters = Counters::ZERO;

pub type CounterMap = PerCpuHashMap<CounterKey, Counters, { MAX_COUNTER_KEYS as usize }>;

/// This CPU's counters for one (interface, hook); null when the map is full, in which case
/// counting is skipped rather than the packet dropped. A plain pointer, not an `Option`: the
/// payload of a `None` is undefined, and LLVM may spill it, which the verifier refuses
/// ("!read_ok").
pub struct Stats(*mut Counters);

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
            return Self(p);
        }
        // First packet on this interface and hook: create the entry. Another CPU may win the
        // race (EEXIST); either way the lookup after it finds the entry.
        // A reference on purpose: by value, the 192-byte zero would be copied to the stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let inserted = map.insert(key, &ZERO, u64::from(BPF_NOEXIST));
        match inserted {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {}
            Err(_) => return Self(core::ptr::null_mut()),
        }
        Self(map.get_ptr_mut(key).unwrap_or(core::ptr::null_mut()))
    }

    /// This CPU's counters, or null when the map was full.
    #[inline(always)]
    pub fn ptr(&self) -> *const Counters {
        self.0
    }

    #[inline(always)]
    pub fn add(&self, slot: usize, n: u64) {
        if slot >= counter::COUNT {
            return;
        }
        let p = self.0;
        if !p.is_null() {
            // SAFETY: a per-CPU map value is only touched by this CPU while the program runs,
            // and `slot` is within the array.
            unsafe { (*p).values[slot] += n };
        }
    }
}

//! Whatever etcd holds under our prefixes, through every decoder the agent and ctl apply to
//! it: the agent's model (`sync::Model::apply`, then the maps and kernel view it derives),
//! the typed decoders with the checks their callers make (IP pools, nodes, IPAM blocks,
//! affinities and handles, WorkloadEndpoints, profiles, policies, pods, agent statuses), and
//! `ctl get`'s printing. Never a panic: a value is decoded, or is an error that names its key.
//!
//! Input: records separated by NUL bytes; in each, the key up to the first newline and the
//! value after it (a record without a newline deletes its key). Seeds in
//! `corpus/etcd_value/`.
#![no_main]

use dataplane::{
    ctl,
    datastore::{
        IpPool, K8sPod, Node, NodeStatus, Profile, RawValue, WorkloadEndpoint,
        keys::{self, Key},
        policy::NetworkPolicy,
    },
    ipam::{Block, BlockAffinity, Handle},
    policy::resolve,
    sync::Model,
};
use libfuzzer_sys::fuzz_target;

/// A corrupt value's error names its key.
fn decode<T: serde::de::DeserializeOwned>(raw: &RawValue) -> Option<T> {
    match raw.decode::<T>() {
        Ok(v) => Some(v.value),
        Err(e) => {
            assert!(e.is_corrupt(), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&raw.key),
                "error {text:?} does not name {}",
                raw.key
            );
            None
        }
    }
}

/// What the typed readers do with a value at `key`.
fn typed(key: &Key, raw: &RawValue) {
    match key {
        Key::IpPool(_) => {
            if let Some(p) = decode::<IpPool>(raw) {
                let _ = p.validate();
            }
        }
        Key::Node(_) => {
            if let Some(n) = decode::<Node>(raw) {
                let _ = n.ipv4_address();
            }
        }
        Key::WorkloadEndpoint { .. } => {
            if let Some(w) = decode::<WorkloadEndpoint>(raw) {
                let _ = (
                    w.key(),
                    w.container_id(),
                    w.interface_name(),
                    w.ip_networks(),
                );
            }
        }
        Key::Profile(_) => {
            if let Some(p) = decode::<Profile>(raw) {
                let _ = p.labels_to_apply();
            }
        }
        Key::Block(cidr) => {
            if let Some(b) = decode::<Block>(raw)
                && b.validate(*cidr).is_ok()
            {
                // What `ctl ipam show` and the allocator read from a block that passed.
                let _ = (
                    b.used(),
                    b.free(),
                    b.handles(),
                    b.affine_node(),
                    b.is_empty(),
                );
                for o in 0..b.size().min(70) {
                    let a = b.addr(o);
                    assert_eq!(b.ordinal(a), Some(o));
                }
                if let Some(h) = b.handles().first() {
                    let _ = b.ordinals_of(h);
                }
                let mut taken = b.clone();
                let _ = taken.allocate("k8s-pod-network.fuzz", &Default::default());
                assert!(
                    taken.validate(*cidr).is_ok(),
                    "allocate broke a valid block"
                );
                let all: Vec<usize> = (0..taken.size()).collect();
                taken.release(&all);
                assert!(taken.validate(*cidr).is_ok(), "release broke a valid block");
                assert!(taken.is_empty());
            }
        }
        Key::BlockAffinity { .. } => {
            let _ = decode::<BlockAffinity>(raw);
        }
        Key::Handle(_) => {
            let _ = decode::<Handle>(raw);
        }
        Key::NetworkPolicy { namespace, .. } => {
            if let Some(p) = decode::<NetworkPolicy>(raw) {
                let _ = p.validate();
                let _ = resolve::Policy::parse(Some(namespace), &p);
            }
        }
        Key::GlobalNetworkPolicy(_) => {
            if let Some(p) = decode::<NetworkPolicy>(raw) {
                let _ = p.validate();
                let _ = resolve::Policy::parse(None, &p);
            }
        }
        Key::Pod { .. } => {
            if let Some(p) = decode::<K8sPod>(raw) {
                let _ = (p.labels(), p.named_ports(), p.key());
            }
        }
        Key::NodeStatus(_) => {
            if let Some(s) = decode::<NodeStatus>(raw) {
                let _ = (s.is_live(0), s.is_live(u64::MAX), s.key());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut model = Model::default();
    for record in data.split(|&b| b == 0) {
        let (key, value) = match record.iter().position(|&b| b == b'\n') {
            Some(i) => (&record[..i], Some(&record[i + 1..])),
            None => (record, None),
        };
        // etcd keys are bytes; ours are UTF-8 and the watch hands them over as strings.
        let key = String::from_utf8_lossy(key);
        model.apply(&key, value);
        let Some(value) = value else {
            continue;
        };
        if let Some(parsed) = Key::parse(&key) {
            assert_eq!(
                Key::parse(&parsed.to_string()).as_ref(),
                Some(&parsed),
                "{key} does not round-trip"
            );
            let raw = RawValue {
                key: key.to_string(),
                value: value.to_vec(),
                mod_revision: 1,
            };
            typed(&parsed, &raw);
        }
        // `ctl get` prints whatever JSON is stored, as YAML or JSON.
        if key.starts_with(keys::RESOURCES) || key.starts_with(keys::PODS) {
            let raw = RawValue {
                key: key.to_string(),
                value: value.to_vec(),
                mod_revision: 1,
            };
            if let Some(v) = decode::<serde_json::Value>(&raw) {
                let _ = ctl::format(std::slice::from_ref(&v), false);
                let _ = ctl::format(&[v.clone(), v], true);
            }
        }
    }
    // The maps and kernel routes the model derives, on a node it may or may not know.
    for me in ["node-1", "node-2"] {
        let _ = model.desired(me, |iface| {
            iface
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
                .checked_rem(7)
                .filter(|&i| i != 0)
        });
        let _ = model.kernel_view(me);
    }
});

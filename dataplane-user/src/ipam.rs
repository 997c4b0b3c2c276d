//! Calico's block IPAM over the datastore, in Calico's JSON so that Calico's tools can read it.
//!
//! Pools are cut into blocks (a /26 by default). A node claims a block by writing an affinity
//! `pending` (`/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`, a create transaction), then the
//! block itself (`/calico/ipam/v2/assignment/ipv4/block/<cidr>`, a create transaction that
//! decides who owns it), then marking the affinity `confirmed`. Addresses are handed out from
//! the node's own blocks first, then from a newly claimed block, then (unless strict
//! affinity) borrowed from any block with room. Each address records its handle
//! (`k8s-pod-network.<container-id>`), and the handle (`/calico/ipam/v2/handle/<id>`) counts
//! its addresses per block, so releasing by handle finds them. A block that becomes empty is
//! deleted together with its affinity, in one transaction.
//!
//! Every write is a transaction on the mod revision that was read, retried on conflict
//! (bounded, with a random backoff).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use crate::datastore::{
    Datastore, DatastoreError, Pool, RawValue, Versioned,
    keys::{self, Key},
    resources::BLOCK_SIZES,
    retry_on_conflict,
};

/// Prefix of a block's `affinity` field: `host:<node>`.
const HOST_AFFINITY_PREFIX: &str = "host:";

/// How IPAM behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConfig {
    /// Never hand out an address from a block affine to another node (Calico's
    /// `strictAffinity`); exhaustion comes sooner, routes stay aggregated per node.
    pub strict_affinity: bool,
    /// How often one write is retried after losing a race, and how many blocks one
    /// assignment may claim, before giving up.
    pub max_retries: u32,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            strict_affinity: false,
            max_retries: 100,
        }
    }
}

/// What to assign an address for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignRequest {
    pub node: String,
    /// `k8s-pod-network.<container-id>` for a pod.
    pub handle_id: String,
    /// Stored with the address (Calico's `secondary` attributes: namespace, node, pod).
    pub attrs: BTreeMap<String, String>,
    /// Pool names to assign from; `None` for every enabled pool.
    pub pools: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every block of the pools is claimed and full (and borrowing is off or found nothing).
    #[error("no free address for node {node} in IP pool(s) {}: {reason}", pools.join(", "))]
    Exhausted {
        node: String,
        pools: Vec<String>,
        reason: String,
    },
    #[error("no enabled IP pool to assign from")]
    NoPools,
    #[error("IP pool {name} does not exist")]
    PoolNotFound { name: String },
    #[error("IP pool {name} is disabled")]
    PoolDisabled { name: String },
    #[error("invalid IPAM request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

impl IpamError {
    /// The pools have no free address (CNI: IPAM exhausted).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, Self::Exhausted { .. })
    }

    /// etcd is unreachable or timed out (CNI: try again later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Datastore(e) if e.is_unavailable())
    }
}

/// One address's owner, as Calico stores it in a block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(rename = "handle_id", default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An IPAM block (`/calico/ipam/v2/assignment/ipv4/block/<cidr>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub cidr: Ipv4Net,
    /// `host:<node>` for the node the block is affine to.
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(default)]
    pub strict_affinity: bool,
    /// One slot per address: an index into `attributes`, or null when free.
    pub allocations: Vec<Option<usize>>,
    /// Free ordinals, in the order they will be handed out (released ones go to the back).
    pub unallocated: Vec<usize>,
    #[serde(default)]
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub deleted: bool,
    #[serde(default)]
    pub sequence_number: u64,
    #[serde(default)]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Calico has written `deleted` both as a boolean and as a string.
fn bool_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Bool(bool),
        Text(String),
    }
    match B::deserialize(d)? {
        B::Bool(b) => Ok(b),
        B::Text(t) => match t.as_str() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "deleted: {other:?} is not a boolean"
            ))),
        },
    }
}

impl Block {
    /// An empty block, affine to `node` when given.
    pub fn new(cidr: Ipv4Net, node: Option<&str>) -> Self {
        let size = block_len(cidr);
        Self {
            cidr,
            affinity: node.map(|n| format!("{HOST_AFFINITY_PREFIX}{n}")),
            strict_affinity: false,
            allocations: vec![None; size],
            unallocated: (0..size).collect(),
            attributes: Vec::new(),
            deleted: false,
            sequence_number: 0,
            sequence_number_for_allocation: BTreeMap::new(),
            extra: Map::new(),
        }
    }

    /// The node this block is affine to.
    pub fn affine_node(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix(HOST_AFFINITY_PREFIX)
    }

    pub fn is_affine_to(&self, node: &str) -> bool {
        self.affine_node() == Some(node)
    }

    /// Addresses in the block.
    pub fn size(&self) -> usize {
        self.allocations.len()
    }

    /// No address is allocated (Calico's "empty"; such a block is deleted).
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    pub fn used(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    pub fn free(&self) -> usize {
        self.unallocated.len()
    }

    /// The address at `ordinal`.
    pub fn addr(&self, ordinal: usize) -> Ipv4Addr {
        ordinal_addr(self.cidr, ordinal)
    }

    /// The ordinal of `addr`, if it is in this block.
    pub fn ordinal(&self, addr: Ipv4Addr) -> Option<usize> {
        addr_ordinal(self.cidr, addr)
    }

    fn handle_at(&self, ordinal: usize) -> Option<&str> {
        let attr = self.allocations.get(ordinal).copied().flatten()?;
        self.attributes.get(attr)?.handle_id.as_deref()
    }

    /// Ordinals allocated to `handle_id`, ascending.
    pub fn ordinals_of(&self, handle_id: &str) -> Vec<usize> {
        (0..self.size())
            .filter(|&o| self.handle_at(o) == Some(handle_id))
            .collect()
    }

    /// Distinct handles with an address here.
    pub fn handles(&self) -> BTreeSet<&str> {
        (0..self.size()).filter_map(|o| self.handle_at(o)).collect()
    }

    /// Takes the first free address (FIFO) for `handle_id`; `None` when full.
    pub fn allocate(
        &mut self,
        handle_id: &str,
        secondary: &BTreeMap<String, String>,
    ) -> Option<Ipv4Addr> {
        if self.unallocated.is_empty() {
            return None;
        }
        let ordinal = self.unallocated.remove(0);
        let attr = AllocationAttribute {
            handle_id: Some(handle_id.to_owned()),
            secondary: (!secondary.is_empty()).then(|| secondary.clone()),
            extra: Map::new(),
        };
        // One attribute per distinct owner, as Calico's findOrAddAttribute.
        let index = match self.attributes.iter().position(|a| *a == attr) {
            Some(i) => i,
            None => {
                self.attributes.push(attr);
                self.attributes.len() - 1
            }
        };
        let slot = self.allocations.get_mut(ordinal)?;
        *slot = Some(index);
        self.sequence_number += 1;
        self.sequence_number_for_allocation
            .insert(ordinal.to_string(), self.sequence_number);
        Some(self.addr(ordinal))
    }

    /// Frees `ordinals` (the allocated ones among them), appending them to the back of the
    /// free list in the order given, and drops attributes nothing refers to any more.
    /// Returns each freed address with its handle.
    pub fn release(&mut self, ordinals: &[usize]) -> Vec<(Ipv4Addr, Option<String>)> {
        let mut out = Vec::new();
        for &o in ordinals {
            let handle = self.handle_at(o).map(str::to_owned);
            let Some(slot) = self.allocations.get_mut(o) else {
                continue;
            };
            if slot.take().is_none() {
                continue;
            }
            self.unallocated.push(o);
            self.sequence_number_for_allocation.remove(&o.to_string());
            out.push((self.addr(o), handle));
        }
        if !out.is_empty() {
            self.drop_unused_attributes();
        }
        out
    }

    /// Removes attributes no allocation refers to and renumbers the allocations.
    fn drop_unused_attributes(&mut self) {
        let used: BTreeSet<usize> = self.allocations.iter().flatten().copied().collect();
        let mut renumber = BTreeMap::new();
        let mut kept = Vec::new();
        for (i, attr) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used.contains(&i) {
                renumber.insert(i, kept.len());
                kept.push(attr);
            }
        }
        self.attributes = kept;
        for a in self.allocations.iter_mut().flatten() {
            if let Some(&n) = renumber.get(a) {
                *a = n;
            }
        }
    }

    /// Checks the invariants everything else relies on (so a corrupt block is an error, never
    /// an out-of-bounds index): the CIDR is the key's and a network address of an allowed
    /// size, one slot per address, every slot's attribute exists, and the free list holds
    /// exactly the free slots, once each.
    pub fn validate(&self, key_cidr: Ipv4Net) -> Result<(), String> {
        if self.cidr != key_cidr {
            return Err(format!("cidr {} does not match its key", self.cidr));
        }
        if !BLOCK_SIZES.contains(&self.cidr.prefix_len()) || self.cidr.trunc() != self.cidr {
            return Err(format!("cidr {} is not a valid block", self.cidr));
        }
        let size = block_len(self.cidr);
        if self.allocations.len() != size {
            return Err(format!(
                "allocations has {} slots, a /{} block has {size}",
                self.allocations.len(),
                self.cidr.prefix_len()
            ));
        }
        if let Some(o) = self
            .allocations
            .iter()
            .position(|a| a.is_some_and(|i| i >= self.attributes.len()))
        {
            return Err(format!(
                "allocation {o} refers to a missing attribute ({} attributes)",
                self.attributes.len()
            ));
        }
        let mut seen = vec![false; size];
        for &o in &self.unallocated {
            match seen.get_mut(o) {
                None => return Err(format!("unallocated ordinal {o} is outside the block")),
                Some(true) => return Err(format!("unallocated ordinal {o} is listed twice")),
                Some(s) => *s = true,
            }
            if self.allocations.get(o).is_some_and(Option::is_some) {
                return Err(format!("ordinal {o} is both allocated and unallocated"));
            }
        }
        let free_slots = self.allocations.iter().filter(|a| a.is_none()).count();
        if free_slots != self.unallocated.len() {
            return Err(format!(
                "{free_slots} free slots but {} unallocated ordinals",
                self.unallocated.len()
            ));
        }
        Ok(())
    }
}

/// Number of addresses in `cidr`.
fn block_len(cidr: Ipv4Net) -> usize {
    1usize << (32 - u32::from(cidr.prefix_len()))
}

/// The address at `ordinal` of `cidr` (wrapping inside the block when out of range).
pub fn ordinal_addr(cidr: Ipv4Net, ordinal: usize) -> Ipv4Addr {
    let base = u32::from(cidr.network());
    let offset = (ordinal as u64 % block_len(cidr) as u64) as u32;
    Ipv4Addr::from(base.wrapping_add(offset))
}

/// The ordinal of `addr` in `cidr`, if it is inside.
pub fn addr_ordinal(cidr: Ipv4Net, addr: Ipv4Addr) -> Option<usize> {
    cidr.contains(&addr)
        .then(|| (u32::from(addr) - u32::from(cidr.network())) as usize)
}

/// A block affinity's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AffinityState {
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "confirmed")]
    Confirmed,
    #[serde(rename = "pendingDeletion")]
    PendingDeletion,
}

/// A block affinity (`/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAffinity {
    pub state: AffinityState,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub deleted: bool,
}

impl BlockAffinity {
    fn new(state: AffinityState) -> Self {
        Self {
            state,
            deleted: false,
        }
    }
}

/// An IPAM handle (`/calico/ipam/v2/handle/<id>`): how many addresses it holds per block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    #[serde(rename = "handleID", default)]
    pub handle_id: String,
    /// Block CIDR (`10.65.0.0/26`) → addresses held there.
    #[serde(default)]
    pub block: BTreeMap<String, u64>,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub deleted: bool,
}

/// One block as `dataplane ctl ipam show` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSummary {
    pub cidr: Ipv4Net,
    /// `host:<node>`, as stored.
    pub affinity: Option<String>,
    pub used: usize,
    pub free: usize,
    /// Distinct handles with an address in the block.
    pub handles: usize,
}

/// Block CIDRs as a map start → end (inclusive), for overlap tests.
#[derive(Debug, Default)]
struct BlockSet(BTreeMap<u32, u32>);

impl BlockSet {
    fn insert(&mut self, cidr: Ipv4Net) {
        self.0
            .insert(u32::from(cidr.network()), u32::from(cidr.broadcast()));
    }

    fn overlaps(&self, cidr: Ipv4Net) -> bool {
        let (start, end) = (u32::from(cidr.network()), u32::from(cidr.broadcast()));
        // The last block starting at or before our end overlaps iff it ends at or after our
        // start; blocks are aligned so they never partly overlap each other.
        self.0
            .range(..=end)
            .next_back()
            .is_some_and(|(_, &e)| e >= start)
    }
}

/// The first block of `pools`, in order, that overlaps no block of `taken`.
fn first_free_block(pools: &[Pool], taken: &BlockSet) -> Option<Ipv4Net> {
    pools
        .iter()
        .flat_map(Pool::blocks)
        .find(|&cand| !taken.overlaps(cand))
}

fn block_cidr_of_key(key: &str) -> Option<Ipv4Net> {
    match Key::parse(key)? {
        Key::Block(cidr) => Some(cidr),
        _ => None,
    }
}

fn in_pools(pools: &[Pool], cidr: Ipv4Net) -> bool {
    pools.iter().any(|p| p.cidr.contains(&cidr))
}

fn check_name(what: &str, name: &str) -> Result<(), IpamError> {
    if name.is_empty() || name.contains('/') {
        return Err(IpamError::InvalidRequest(format!(
            "{what} {name:?} must be non-empty and without '/'"
        )));
    }
    Ok(())
}

/// The outcome of trying one block.
enum Tried {
    Assigned(Ipv4Addr),
    /// Full, gone, or not ours after all: try the next.
    NotHere,
}

/// Block IPAM on a datastore.
#[derive(Clone, Debug)]
pub struct Ipam<'a> {
    ds: &'a Datastore,
    cfg: IpamConfig,
}

impl<'a> Ipam<'a> {
    pub fn new(ds: &'a Datastore, cfg: IpamConfig) -> Self {
        Self { ds, cfg }
    }

    /// The block at `cidr`, checked; a corrupt one is [`DatastoreError::Corrupt`] with its key.
    pub async fn get_block(&self, cidr: Ipv4Net) -> Result<Option<Versioned<Block>>, IpamError> {
        let key = keys::block(cidr);
        match self.ds.get_raw(&key).await? {
            None => Ok(None),
            Some(raw) => decode_block(&raw, cidr).map(Some),
        }
    }

    /// Every block, checked, in address order. A corrupt block is an error naming its key.
    async fn blocks(&self) -> Result<Vec<Versioned<Block>>, IpamError> {
        self.ds
            .list_raw(keys::BLOCKS)
            .await?
            .iter()
            .map(|raw| {
                let cidr = block_cidr_of_key(&raw.key).ok_or_else(|| {
                    DatastoreError::corrupt(&raw.key, "not a block key", &raw.value)
                })?;
                decode_block(raw, cidr)
            })
            .collect()
    }

    /// Every block, skipping (and logging) corrupt ones: for allocation, where one bad block
    /// must not stop the rest.
    async fn usable_blocks(&self) -> Result<Vec<Versioned<Block>>, IpamError> {
        let mut out = Vec::new();
        for raw in self.ds.list_raw(keys::BLOCKS).await? {
            let decoded = block_cidr_of_key(&raw.key)
                .ok_or_else(|| {
                    IpamError::from(DatastoreError::corrupt(
                        &raw.key,
                        "not a block key",
                        &raw.value,
                    ))
                })
                .and_then(|cidr| decode_block(&raw, cidr));
            match decoded {
                Ok(b) => out.push(b),
                Err(e) => warn!(key = %raw.key, error = %e, "skipping a corrupt IPAM block"),
            }
        }
        Ok(out)
    }

    /// The pools to assign from: the named ones (which must exist and be enabled), or every
    /// enabled pool.
    async fn pools(&self, names: Option<&[String]>) -> Result<Vec<Pool>, IpamError> {
        let all = self.ds.ip_pools().await?;
        let pools: Vec<Pool> = match names {
            None => all.into_iter().filter(|p| !p.disabled).collect(),
            Some(names) => names
                .iter()
                .map(|name| {
                    let pool = all
                        .iter()
                        .find(|p| p.name == *name)
                        .ok_or_else(|| IpamError::PoolNotFound { name: name.clone() })?;
                    if pool.disabled {
                        return Err(IpamError::PoolDisabled { name: name.clone() });
                    }
                    Ok(pool.clone())
                })
                .collect::<Result<_, _>>()?,
        };
        if pools.is_empty() {
            return Err(IpamError::NoPools);
        }
        Ok(pools)
    }

    /// Assigns one address to `req.handle_id` on `req.node`: from the node's blocks, else from
    /// a block it claims, else (without strict affinity) from any block with room.
    pub async fn auto_assign(&self, req: &AssignRequest) -> Result<Ipv4Addr, IpamError> {
        check_name("node", &req.node)?;
        check_name("handle", &req.handle_id)?;
        let pools = self.pools(req.pools.as_deref()).await?;
        let mut claims = 0;
        loop {
            let seen = match self.assign_from_affine_blocks(req, &pools).await? {
                Ok(ip) => return Ok(ip),
                Err(seen) => seen,
            };
            if claims >= self.cfg.max_retries {
                return Err(DatastoreError::Conflict {
                    key: keys::block_affinities_of(&req.node),
                    attempts: claims,
                }
                .into());
            }
            claims += 1;
            if !self.claim_block(&req.node, &pools, &seen).await? {
                break;
            }
        }
        if !self.cfg.strict_affinity
            && let Some(ip) = self.borrow(req, &pools).await?
        {
            return Ok(ip);
        }
        Err(IpamError::Exhausted {
            node: req.node.clone(),
            pools: pools
                .iter()
                .map(|p| format!("{} ({})", p.name, p.cidr))
                .collect(),
            reason: if self.cfg.strict_affinity {
                "every block is claimed, and this node's are full (strict affinity: no borrowing \
                 from other nodes' blocks)"
                    .to_owned()
            } else {
                "every block is claimed and full".to_owned()
            },
        })
    }

    /// Tries the node's affine blocks (confirmed first, then pending ones whose block is
    /// already ours), cleaning up affinities that turn out to be stale on the way. When none
    /// has room: `Err` with the affinities seen, so that a claim can tell whether one appeared
    /// since.
    async fn assign_from_affine_blocks(
        &self,
        req: &AssignRequest,
        pools: &[Pool],
    ) -> Result<Result<Ipv4Addr, BTreeSet<Ipv4Net>>, IpamError> {
        let mut seen = BTreeSet::new();
        let mut affinities = Vec::new();
        for raw in self
            .ds
            .list_raw(&keys::block_affinities_of(&req.node))
            .await?
        {
            let Some(Key::BlockAffinity { cidr, .. }) = Key::parse(&raw.key) else {
                warn!(key = %raw.key, "skipping a malformed block affinity key");
                continue;
            };
            seen.insert(cidr);
            match raw.decode::<BlockAffinity>() {
                Ok(v) if v.value.deleted || v.value.state == AffinityState::PendingDeletion => {}
                Ok(v) if in_pools(pools, cidr) => affinities.push((cidr, v)),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "skipping a corrupt block affinity"),
            }
        }
        affinities.sort_by_key(|(cidr, v)| (v.value.state != AffinityState::Confirmed, *cidr));
        for (cidr, aff) in affinities {
            let block = match self.get_block(cidr).await {
                Ok(b) => b,
                Err(IpamError::Datastore(e)) if e.is_corrupt() => {
                    warn!(error = %e, "skipping a corrupt IPAM block");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match block {
                // An affinity without its block: a claim under way (ours, or another task's
                // on this node) or one that died half-way. Finish it; the create decides.
                None => {
                    if !self.finish_claim(&req.node, cidr).await? {
                        continue;
                    }
                }
                Some(b) if !b.value.is_affine_to(&req.node) => {
                    self.drop_stale_affinity(&req.node, cidr).await?;
                    continue;
                }
                Some(_) => {
                    if aff.value.state == AffinityState::Pending {
                        self.confirm_affinity(&req.node, cidr).await?;
                    }
                }
            }
            if let Tried::Assigned(ip) = self.assign_from_block(cidr, req, true).await? {
                return Ok(Ok(ip));
            }
        }
        Ok(Err(seen))
    }

    /// Claims the first unclaimed block of `pools` for `node`; `false` when every block of
    /// every pool exists. `seen` are the node's affinities its blocks were just tried from:
    /// when another task of this node has claimed a block since (its affinity comes before
    /// its block), that block is tried first instead of claiming one more.
    async fn claim_block(
        &self,
        node: &str,
        pools: &[Pool],
        seen: &BTreeSet<Ipv4Net>,
    ) -> Result<bool, IpamError> {
        let mut taken = BlockSet::default();
        for key in self.ds.list_keys(keys::BLOCKS).await? {
            match block_cidr_of_key(&key) {
                Some(cidr) => taken.insert(cidr),
                None => warn!(%key, "ignoring a malformed block key"),
            }
        }
        // Listed after the blocks, so that a block listed above has its affinity here.
        for key in self.ds.list_keys(&keys::block_affinities_of(node)).await? {
            if let Some(Key::BlockAffinity { cidr, .. }) = Key::parse(&key)
                && in_pools(pools, cidr)
                && !seen.contains(&cidr)
            {
                debug!(%node, block = %cidr, "a block was claimed meanwhile; trying it first");
                return Ok(true);
            }
        }
        for _ in 0..self.cfg.max_retries {
            let Some(cidr) = first_free_block(pools, &taken) else {
                return Ok(false);
            };
            if self.try_claim(node, cidr).await? {
                return Ok(true);
            }
            // Another node won it (or it is being released): the next one.
            taken.insert(cidr);
        }
        Err(DatastoreError::Conflict {
            key: keys::BLOCKS.to_owned(),
            attempts: self.cfg.max_retries,
        }
        .into())
    }

    /// Calico's claim: affinity `pending` (create), block (create), affinity `confirmed`.
    /// `true` when the block is now this node's.
    async fn try_claim(&self, node: &str, cidr: Ipv4Net) -> Result<bool, IpamError> {
        let aff_key = keys::block_affinity(node, cidr);
        if !self
            .ds
            .create(&aff_key, &BlockAffinity::new(AffinityState::Pending))
            .await?
        {
            // Already there: another task of this node is claiming it (join in), or it is
            // being deleted (leave it).
            if let Some(v) = self.ds.get::<BlockAffinity>(&aff_key).await?
                && v.value.state == AffinityState::PendingDeletion
            {
                return Ok(false);
            }
        }
        self.finish_claim(node, cidr).await
    }

    /// Creates the block for `node` (its affinity written already) and confirms the affinity;
    /// when the block exists and is another node's, removes this node's affinity. `true` when
    /// the block is this node's.
    async fn finish_claim(&self, node: &str, cidr: Ipv4Net) -> Result<bool, IpamError> {
        let key = keys::block(cidr);
        let ours = if self.ds.create(&key, &Block::new(cidr, Some(node))).await? {
            info!(%node, block = %cidr, "claimed an IPAM block");
            true
        } else {
            match self.get_block(cidr).await {
                Ok(Some(b)) => b.value.is_affine_to(node),
                // Deleted again in between, or corrupt: not usable now.
                Ok(None) => false,
                Err(IpamError::Datastore(e)) if e.is_corrupt() => {
                    warn!(error = %e, "a corrupt IPAM block is in the way");
                    false
                }
                Err(e) => return Err(e),
            }
        };
        if ours {
            self.confirm_affinity(node, cidr).await?;
        } else {
            debug!(%node, block = %cidr, "block taken by another node");
            self.drop_stale_affinity(node, cidr).await?;
        }
        Ok(ours)
    }

    /// Marks `node`'s affinity for `cidr` confirmed (if it is still pending), for a block
    /// that is `node`'s. A missing affinity is written again: it can only have been removed
    /// by a task that saw the block gone just before this node's claim re-created it, and a
    /// block whose node cannot find it would never be used.
    async fn confirm_affinity(&self, node: &str, cidr: Ipv4Net) -> Result<(), IpamError> {
        let key = keys::block_affinity(node, cidr);
        let confirmed = BlockAffinity::new(AffinityState::Confirmed);
        retry_on_conflict(&key, self.cfg.max_retries, || async {
            let done = match self.ds.get::<BlockAffinity>(&key).await? {
                None => self.recreate_affinity(node, cidr, &confirmed).await?,
                Some(v) if v.value.state == AffinityState::Pending => {
                    self.ds.update(&key, &confirmed, v.mod_revision).await?
                }
                Some(_) => true,
            };
            Ok(done.then_some(()))
        })
        .await
    }

    /// Writes `node`'s affinity for `cidr` if it is missing, while the block is still `node`'s
    /// (a transaction on both). `false` on a conflict; `true` when written or not needed.
    async fn recreate_affinity(
        &self,
        node: &str,
        cidr: Ipv4Net,
        value: &BlockAffinity,
    ) -> Result<bool, IpamError> {
        let key = keys::block_affinity(node, cidr);
        let block_key = keys::block(cidr);
        let Some(raw) = self.ds.get_raw(&block_key).await? else {
            return Ok(true);
        };
        if !decode_block(&raw, cidr).is_ok_and(|b| b.value.is_affine_to(node)) {
            return Ok(true);
        }
        let value = serde_json::to_vec(value).map_err(|source| DatastoreError::Encode {
            key: key.clone(),
            source,
        })?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::mod_revision(block_key.as_str(), CompareOp::Equal, raw.mod_revision),
            ])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let done = self.ds.txn("create", &key, txn).await?.succeeded();
        if done {
            warn!(%node, block = %cidr, "re-created a missing block affinity");
        }
        Ok(done)
    }

    /// Deletes `node`'s affinity for `cidr`, whose block is another node's (or gone), unless
    /// the block has become this node's in the meantime.
    async fn drop_stale_affinity(&self, node: &str, cidr: Ipv4Net) -> Result<(), IpamError> {
        let key = keys::block_affinity(node, cidr);
        let block_key = keys::block(cidr);
        retry_on_conflict(&key, self.cfg.max_retries, || async {
            let Some(aff) = self.ds.get_raw(&key).await? else {
                return Ok(Some(()));
            };
            // Delete only while the block is still not ours: compare on the block too.
            let block_cmp = match self.ds.get_raw(&block_key).await? {
                Some(raw) => {
                    if decode_block(&raw, cidr).is_ok_and(|b| b.value.is_affine_to(node)) {
                        return Ok(Some(()));
                    }
                    Compare::mod_revision(block_key.as_str(), CompareOp::Equal, raw.mod_revision)
                }
                None => Compare::create_revision(block_key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, aff.mod_revision),
                    block_cmp,
                ])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            let done = self.ds.txn("delete", &key, txn).await?.succeeded();
            if done {
                debug!(%node, block = %cidr, "removed a stale block affinity");
            }
            Ok(done.then_some(()))
        })
        .await
    }

    /// Takes a free address of block `cidr` for the request: the handle's count first (so an
    /// address never exists without its handle knowing the block), then the block. With
    /// `affine_only`, only while the block is the node's.
    async fn assign_from_block(
        &self,
        cidr: Ipv4Net,
        req: &AssignRequest,
        affine_only: bool,
    ) -> Result<Tried, IpamError> {
        let key = keys::block(cidr);
        let counted = AtomicBool::new(false);
        let tried = retry_on_conflict::<_, _, _, IpamError>(&key, self.cfg.max_retries, || async {
            let Some(b) = self.get_block(cidr).await? else {
                return Ok(Some(Tried::NotHere));
            };
            if b.value.free() == 0 || (affine_only && !b.value.is_affine_to(&req.node)) {
                return Ok(Some(Tried::NotHere));
            }
            if !counted.load(Ordering::Relaxed) {
                self.add_to_handle(&req.handle_id, cidr, 1).await?;
                counted.store(true, Ordering::Relaxed);
            }
            let mut block = b.value;
            let Some(ip) = block.allocate(&req.handle_id, &req.attrs) else {
                return Ok(Some(Tried::NotHere));
            };
            let written = self.ds.update(&key, &block, b.mod_revision).await?;
            Ok(written.then_some(Tried::Assigned(ip)))
        })
        .await?;
        if matches!(tried, Tried::NotHere) && counted.load(Ordering::Relaxed) {
            self.remove_from_handle(&req.handle_id, cidr, 1).await?;
        }
        if let Tried::Assigned(ip) = tried {
            debug!(node = %req.node, handle = %req.handle_id, %ip, block = %cidr, "assigned");
        }
        Ok(tried)
    }

    /// Borrows an address from a block with room that is not this node's.
    async fn borrow(
        &self,
        req: &AssignRequest,
        pools: &[Pool],
    ) -> Result<Option<Ipv4Addr>, IpamError> {
        let candidates: Vec<Ipv4Net> = self
            .usable_blocks()
            .await?
            .into_iter()
            .filter(|b| {
                b.value.free() > 0
                    && !b.value.is_affine_to(&req.node)
                    && in_pools(pools, b.value.cidr)
            })
            .map(|b| b.value.cidr)
            .collect();
        for cidr in candidates {
            if let Tried::Assigned(ip) = self.assign_from_block(cidr, req, false).await? {
                info!(node = %req.node, %ip, block = %cidr, "borrowed an address from another node's block");
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }

    /// Adds `n` to the handle's count for `cidr`, creating the handle.
    async fn add_to_handle(&self, handle_id: &str, cidr: Ipv4Net, n: u64) -> Result<(), IpamError> {
        let key = keys::handle(handle_id);
        retry_on_conflict(&key, self.cfg.max_retries, || async {
            let done = match self.ds.get::<Handle>(&key).await? {
                None => {
                    let h = Handle {
                        handle_id: handle_id.to_owned(),
                        block: BTreeMap::from([(cidr.to_string(), n)]),
                        deleted: false,
                    };
                    self.ds.create(&key, &h).await?
                }
                Some(v) => {
                    let mut h = v.value;
                    *h.block.entry(cidr.to_string()).or_default() += n;
                    self.ds.update(&key, &h, v.mod_revision).await?
                }
            };
            Ok(done.then_some(()))
        })
        .await
    }

    /// Takes `n` from the handle's count for `cidr`; deletes the handle when nothing is left.
    async fn remove_from_handle(
        &self,
        handle_id: &str,
        cidr: Ipv4Net,
        n: u64,
    ) -> Result<(), IpamError> {
        let key = keys::handle(handle_id);
        retry_on_conflict(&key, self.cfg.max_retries, || async {
            let Some(v) = self.ds.get::<Handle>(&key).await? else {
                return Ok(Some(()));
            };
            let mut h = v.value;
            let entry = cidr.to_string();
            match h.block.get_mut(&entry) {
                None => return Ok(Some(())),
                Some(count) if *count > n => *count -= n,
                Some(_) => {
                    h.block.remove(&entry);
                }
            }
            let done = if h.block.is_empty() {
                self.ds.delete(&key, Some(v.mod_revision)).await?
            } else {
                self.ds.update(&key, &h, v.mod_revision).await?
            };
            Ok(done.then_some(()))
        })
        .await
    }

    /// Frees the ordinals `select` picks in block `cidr`; deletes the block and its affinity
    /// (one transaction) when it ends up empty. Returns each freed address and its handle.
    async fn release_in_block(
        &self,
        cidr: Ipv4Net,
        select: impl Fn(&Block) -> Vec<usize>,
    ) -> Result<Vec<(Ipv4Addr, Option<String>)>, IpamError> {
        let key = keys::block(cidr);
        retry_on_conflict(&key, self.cfg.max_retries, || async {
            let Some(b) = self.get_block(cidr).await? else {
                return Ok(Some(Vec::new()));
            };
            let mut block = b.value;
            let released = block.release(&select(&block));
            if released.is_empty() {
                return Ok(Some(released));
            }
            let done = if block.is_empty() {
                let mut when = vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    b.mod_revision,
                )];
                let mut ops = vec![TxnOp::delete(key.as_str(), None)];
                if let Some(node) = block.affine_node() {
                    let aff_key = keys::block_affinity(node, cidr);
                    match self.ds.get_raw(&aff_key).await? {
                        Some(aff) => {
                            when.push(Compare::mod_revision(
                                aff_key.as_str(),
                                CompareOp::Equal,
                                aff.mod_revision,
                            ));
                            ops.push(TxnOp::delete(aff_key.as_str(), None));
                        }
                        None => when.push(Compare::create_revision(
                            aff_key.as_str(),
                            CompareOp::Equal,
                            0,
                        )),
                    }
                }
                let txn = Txn::new().when(when).and_then(ops);
                let done = self.ds.txn("delete", &key, txn).await?.succeeded();
                if done {
                    info!(block = %cidr, "released an empty IPAM block");
                }
                done
            } else {
                self.ds.update(&key, &block, b.mod_revision).await?
            };
            Ok(done.then_some(released))
        })
        .await
    }

    /// Releases every address of `handle_id` and deletes the handle. Idempotent: an unknown
    /// handle releases nothing.
    pub async fn release_by_handle(&self, handle_id: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        check_name("handle", handle_id)?;
        let key = keys::handle(handle_id);
        let mut released = Vec::new();
        for _ in 0..self.cfg.max_retries {
            let Some(h) = self.ds.get::<Handle>(&key).await? else {
                released.sort();
                return Ok(released);
            };
            for cidr in h.value.block.keys() {
                let cidr: Ipv4Net = cidr.parse().map_err(|_| DatastoreError::Corrupt {
                    key: key.clone(),
                    reason: format!("block {cidr:?} is not a CIDR"),
                })?;
                let freed = self
                    .release_in_block(cidr, |b| b.ordinals_of(handle_id))
                    .await?;
                released.extend(freed.into_iter().map(|(ip, _)| ip));
            }
            // Delete the handle as read: if it changed meanwhile (the same handle assigned
            // again), go round and release that too.
            if self.ds.delete(&key, Some(h.mod_revision)).await? {
                if !released.is_empty() {
                    debug!(handle = %handle_id, ?released, "released");
                }
                released.sort();
                return Ok(released);
            }
        }
        Err(DatastoreError::Conflict {
            key,
            attempts: self.cfg.max_retries,
        }
        .into())
    }

    /// Releases these addresses, whoever holds them, and updates their handles. Addresses in
    /// no block, or free already, are skipped. Returns what was released.
    pub async fn release_ips(&self, ips: &[Ipv4Addr]) -> Result<Vec<Ipv4Addr>, IpamError> {
        let cidrs: Vec<Ipv4Net> = self
            .ds
            .list_keys(keys::BLOCKS)
            .await?
            .iter()
            .filter_map(|k| block_cidr_of_key(k))
            .collect();
        let mut by_block: BTreeMap<Ipv4Net, Vec<Ipv4Addr>> = BTreeMap::new();
        for &ip in ips {
            if let Some(cidr) = cidrs.iter().find(|c| c.contains(&ip)) {
                by_block.entry(*cidr).or_default().push(ip);
            }
        }
        let mut released = Vec::new();
        for (cidr, addrs) in by_block {
            let freed = self
                .release_in_block(cidr, |b| {
                    addrs.iter().filter_map(|a| b.ordinal(*a)).collect()
                })
                .await?;
            let mut per_handle: BTreeMap<String, u64> = BTreeMap::new();
            for (ip, handle) in freed {
                released.push(ip);
                if let Some(h) = handle {
                    *per_handle.entry(h).or_default() += 1;
                }
            }
            for (handle, n) in per_handle {
                self.remove_from_handle(&handle, cidr, n).await?;
            }
        }
        released.sort();
        Ok(released)
    }

    /// The addresses `handle_id` holds; `None` when the handle does not exist.
    pub async fn check_handle(&self, handle_id: &str) -> Result<Option<Vec<Ipv4Addr>>, IpamError> {
        check_name("handle", handle_id)?;
        let key = keys::handle(handle_id);
        let Some(h) = self.ds.get::<Handle>(&key).await? else {
            return Ok(None);
        };
        let mut ips = Vec::new();
        for cidr in h.value.block.keys() {
            let cidr: Ipv4Net = cidr.parse().map_err(|_| DatastoreError::Corrupt {
                key: key.clone(),
                reason: format!("block {cidr:?} is not a CIDR"),
            })?;
            if let Some(b) = self.get_block(cidr).await? {
                ips.extend(
                    b.value
                        .ordinals_of(handle_id)
                        .into_iter()
                        .map(|o| b.value.addr(o)),
                );
            }
        }
        ips.sort();
        Ok(Some(ips))
    }

    /// Every handle ID (for CNI GC).
    pub async fn list_handles(&self) -> Result<Vec<String>, IpamError> {
        Ok(self
            .ds
            .list_keys(keys::HANDLES)
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(keys::HANDLES).map(str::to_owned))
            .collect())
    }

    /// Handles with an address assigned on `node` (the `node` attribute, else the block's
    /// affinity), and handles holding nothing whose blocks are all `node`'s (left by an
    /// assignment that died between counting and allocating). For CNI GC.
    pub async fn handles_of_node(&self, node: &str) -> Result<Vec<String>, IpamError> {
        let blocks = self.usable_blocks().await?;
        let mut all_handles = BTreeSet::new();
        let mut out = BTreeSet::new();
        for b in &blocks {
            let b = &b.value;
            for slot in &b.allocations {
                let Some(attr) = slot.and_then(|i| b.attributes.get(i)) else {
                    continue;
                };
                let Some(handle) = attr.handle_id.as_deref() else {
                    continue;
                };
                all_handles.insert(handle.to_owned());
                let attr_node = attr.secondary.as_ref().and_then(|s| s.get("node"));
                let on_node = match attr_node {
                    Some(n) => n == node,
                    None => b.is_affine_to(node),
                };
                if on_node {
                    out.insert(handle.to_owned());
                }
            }
        }
        let affine: BTreeSet<String> = blocks
            .iter()
            .filter(|b| b.value.is_affine_to(node))
            .map(|b| b.value.cidr.to_string())
            .collect();
        for (key, h) in self.ds.list::<Handle>(keys::HANDLES).await? {
            let Some(id) = key.strip_prefix(keys::HANDLES) else {
                continue;
            };
            if !all_handles.contains(id)
                && !h.value.block.is_empty()
                && h.value.block.keys().all(|c| affine.contains(c))
            {
                out.insert(id.to_owned());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Each block with its affinity and use, in address order. A corrupt block is an error
    /// naming its key.
    pub async fn show(&self) -> Result<Vec<BlockSummary>, IpamError> {
        Ok(self
            .blocks()
            .await?
            .into_iter()
            .map(|b| BlockSummary {
                cidr: b.value.cidr,
                affinity: b.value.affinity.clone(),
                used: b.value.used(),
                free: b.value.free(),
                handles: b.value.handles().len(),
            })
            .collect())
    }

    /// Whether an address could be assigned at all (CNI STATUS): an enabled pool has a block
    /// nobody claimed, or a block with room.
    pub async fn has_free_address(&self) -> Result<bool, IpamError> {
        let pools = match self.pools(None).await {
            Ok(p) => p,
            Err(IpamError::NoPools) => return Ok(false),
            Err(e) => return Err(e),
        };
        let blocks = self.usable_blocks().await?;
        if blocks
            .iter()
            .any(|b| b.value.free() > 0 && in_pools(&pools, b.value.cidr))
        {
            return Ok(true);
        }
        let mut taken = BlockSet::default();
        for key in self.ds.list_keys(keys::BLOCKS).await? {
            if let Some(cidr) = block_cidr_of_key(&key) {
                taken.insert(cidr);
            }
        }
        Ok(first_free_block(&pools, &taken).is_some())
    }
}

fn decode_block(raw: &RawValue, cidr: Ipv4Net) -> Result<Versioned<Block>, IpamError> {
    let v: Versioned<Block> = raw.decode()?;
    v.value
        .validate(cidr)
        .map_err(|reason| DatastoreError::corrupt(&raw.key, reason, &raw.value))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::datastore::{IpPool, IpPoolSpec};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(name: &str, cidr: &str, block_size: i64) -> Pool {
        let mut spec = crate::datastore::DefaultPoolOptions::default()
            .to_pool()
            .spec;
        spec.cidr = cidr.to_owned();
        spec.block_size = block_size;
        IpPool::new(name, IpPoolSpec { ..spec })
            .validate()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn ordinals_and_addresses() {
        let cidr = net("10.65.0.64/26");
        assert_eq!(ordinal_addr(cidr, 0), ip("10.65.0.64"));
        assert_eq!(ordinal_addr(cidr, 63), ip("10.65.0.127"));
        assert_eq!(addr_ordinal(cidr, ip("10.65.0.64")), Some(0));
        assert_eq!(addr_ordinal(cidr, ip("10.65.0.100")), Some(36));
        assert_eq!(addr_ordinal(cidr, ip("10.65.0.128")), None);
        assert_eq!(addr_ordinal(cidr, ip("10.65.0.63")), None);
        for o in 0..64 {
            assert_eq!(addr_ordinal(cidr, ordinal_addr(cidr, o)), Some(o));
        }
        let one = net("10.0.0.7/32");
        assert_eq!(ordinal_addr(one, 0), ip("10.0.0.7"));
        assert_eq!(Block::new(one, None).size(), 1);
        assert_eq!(Block::new(net("10.0.0.0/20"), None).size(), 4096);
    }

    #[test]
    fn blocks_of_a_pool_and_the_first_unclaimed() {
        let p = pool("p", "10.65.0.0/16", 26);
        let blocks: Vec<Ipv4Net> = p.blocks().take(3).collect();
        assert_eq!(
            blocks,
            [
                net("10.65.0.0/26"),
                net("10.65.0.64/26"),
                net("10.65.0.128/26")
            ]
        );
        assert_eq!(p.blocks().last(), Some(net("10.65.255.192/26")));
        let mut taken = BlockSet::default();
        assert_eq!(
            first_free_block(std::slice::from_ref(&p), &taken),
            Some(net("10.65.0.0/26"))
        );
        taken.insert(net("10.65.0.0/26"));
        taken.insert(net("10.65.0.128/26"));
        assert_eq!(
            first_free_block(std::slice::from_ref(&p), &taken),
            Some(net("10.65.0.64/26"))
        );
        // A block of another size (the pool's blockSize changed) still counts as taken.
        taken.insert(net("10.65.0.64/27"));
        assert_eq!(
            first_free_block(std::slice::from_ref(&p), &taken),
            Some(net("10.65.0.192/26"))
        );
        let small = pool("s", "10.66.0.0/28", 30);
        let two = [small.clone(), pool("t", "10.67.0.0/30", 30)];
        let mut taken = BlockSet::default();
        for b in small.blocks() {
            taken.insert(b);
        }
        assert_eq!(first_free_block(&two, &taken), Some(net("10.67.0.0/30")));
        taken.insert(net("10.67.0.0/30"));
        assert_eq!(first_free_block(&two, &taken), None);
        assert!(taken.overlaps(net("10.66.0.0/16")));
        assert!(!taken.overlaps(net("10.68.0.0/16")));
    }

    #[test]
    fn fifo_release_goes_to_the_back() {
        let attrs = BTreeMap::new();
        let mut b = Block::new(net("10.65.0.0/30"), Some("node-1"));
        let a0 = b.allocate("h0", &attrs).unwrap();
        let a1 = b.allocate("h1", &attrs).unwrap();
        assert_eq!((a0, a1), (ip("10.65.0.0"), ip("10.65.0.1")));
        assert_eq!(
            b.release(&b.ordinals_of("h0")),
            vec![(a0, Some("h0".to_owned()))]
        );
        assert_eq!(b.unallocated, vec![2, 3, 0]);
        // The just-released address comes last.
        assert_eq!(b.allocate("h2", &attrs), Some(ip("10.65.0.2")));
        assert_eq!(b.allocate("h3", &attrs), Some(ip("10.65.0.3")));
        assert_eq!(b.allocate("h4", &attrs), Some(a0));
        assert_eq!(b.allocate("h5", &attrs), None);
        assert_eq!(b.free(), 0);
        assert_eq!(b.used(), 4);
        b.validate(net("10.65.0.0/30")).unwrap();
    }

    #[test]
    fn attributes_are_shared_and_compacted() {
        let attrs = BTreeMap::from([("pod".to_owned(), "p".to_owned())]);
        let mut b = Block::new(net("10.65.0.0/29"), Some("n"));
        b.allocate("a", &attrs).unwrap();
        b.allocate("b", &attrs).unwrap();
        b.allocate("a", &attrs).unwrap();
        assert_eq!(b.attributes.len(), 2);
        assert_eq!(b.allocations[..3], [Some(0), Some(1), Some(0)]);
        assert_eq!(b.sequence_number, 3);
        assert_eq!(b.handles().into_iter().collect::<Vec<_>>(), ["a", "b"]);
        let freed = b.release(&b.ordinals_of("a"));
        assert_eq!(freed.len(), 2);
        // "a" is gone from the attributes, "b" renumbered to 0.
        assert_eq!(b.attributes.len(), 1);
        assert_eq!(b.attributes[0].handle_id.as_deref(), Some("b"));
        assert_eq!(b.allocations[..3], [None, Some(0), None]);
        assert_eq!(
            b.sequence_number_for_allocation.keys().collect::<Vec<_>>(),
            ["1"]
        );
        // Releasing what is free already changes nothing.
        assert!(b.release(&[0, 2, 99]).is_empty());
        b.validate(net("10.65.0.0/29")).unwrap();
        assert!(!b.is_empty());
        b.release(&[1]);
        assert!(b.is_empty() && b.attributes.is_empty());
    }

    #[test]
    fn block_json_is_calicos() {
        let mut b = Block::new(net("10.65.0.0/30"), Some("node-1"));
        let attrs = BTreeMap::from([
            ("namespace".to_owned(), "default".to_owned()),
            ("node".to_owned(), "node-1".to_owned()),
            ("pod".to_owned(), "web-0".to_owned()),
        ]);
        b.allocate("k8s-pod-network.c1", &attrs).unwrap();
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            json!({
                "cidr": "10.65.0.0/30",
                "affinity": "host:node-1",
                "strictAffinity": false,
                "allocations": [0, null, null, null],
                "unallocated": [1, 2, 3],
                "attributes": [{"handle_id": "k8s-pod-network.c1",
                                "secondary": {"namespace": "default", "node": "node-1", "pod": "web-0"}}],
                "deleted": false,
                "sequenceNumber": 1,
                "sequenceNumberForAllocation": {"0": 1}
            })
        );
        // What Calico writes reads back, unknown fields and all.
        let calico: Block = serde_json::from_value(json!({
            "cidr": "10.65.0.0/30", "affinity": null, "allocations": [null, null, null, null],
            "unallocated": [3, 2, 1, 0], "attributes": [], "deleted": "false",
            "hostAffinity": null, "affinityClaimTime": "2024-01-01T00:00:00Z"
        }))
        .unwrap();
        calico.validate(net("10.65.0.0/30")).unwrap();
        assert_eq!(calico.affine_node(), None);
        assert_eq!(
            serde_json::to_value(&calico).unwrap()["affinityClaimTime"],
            "2024-01-01T00:00:00Z"
        );
        assert_eq!(
            serde_json::to_value(BlockAffinity::new(AffinityState::PendingDeletion)).unwrap(),
            json!({"state": "pendingDeletion", "deleted": false})
        );
        let h = Handle {
            handle_id: "h".into(),
            block: BTreeMap::from([("10.65.0.0/26".to_owned(), 1)]),
            deleted: false,
        };
        assert_eq!(
            serde_json::to_value(h).unwrap(),
            json!({"handleID": "h", "block": {"10.65.0.0/26": 1}, "deleted": false})
        );
    }

    #[test]
    fn corrupt_blocks_are_caught_before_use() {
        let cidr = net("10.65.0.0/30");
        let good = serde_json::to_value(Block::new(cidr, Some("n"))).unwrap();
        let cases = [
            (json!({"cidr": "10.65.0.4/30"}), "does not match its key"),
            (
                json!({"allocations": [null, null]}),
                "allocations has 2 slots",
            ),
            (
                json!({"allocations": [5, null, null, null], "unallocated": [1, 2, 3]}),
                "missing attribute",
            ),
            (json!({"unallocated": [0, 1, 2, 9]}), "outside the block"),
            (json!({"unallocated": [0, 1, 2, 2]}), "listed twice"),
            (json!({"unallocated": [0, 1, 2]}), "3 unallocated"),
        ];
        for (patch, want) in cases {
            let mut v = good.clone();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let raw = RawValue {
                key: keys::block(cidr),
                value: serde_json::to_vec(&v).unwrap(),
                mod_revision: 1,
            };
            let err = decode_block(&raw, cidr).unwrap_err().to_string();
            assert!(
                err.starts_with(
                    "corrupt value at /calico/ipam/v2/assignment/ipv4/block/10.65.0.0-30: "
                ) && err.contains(want),
                "{err}"
            );
        }
        let raw = RawValue {
            key: keys::block(cidr),
            value: b"garbage".to_vec(),
            mod_revision: 1,
        };
        let err = decode_block(&raw, cidr).unwrap_err();
        assert!(err.to_string().contains("10.65.0.0-30") && err.to_string().contains("garbage"));
        assert!(!err.is_unavailable() && !err.is_exhausted());
    }

    #[test]
    fn error_kinds() {
        let e = IpamError::Exhausted {
            node: "node-1".into(),
            pools: vec!["small (10.66.0.0/28)".into()],
            reason: "every block is claimed and full".into(),
        };
        assert!(e.is_exhausted() && !e.is_unavailable());
        assert_eq!(
            e.to_string(),
            "no free address for node node-1 in IP pool(s) small (10.66.0.0/28): every block is claimed and full"
        );
        let e = IpamError::from(DatastoreError::Timeout {
            op: "get",
            key: "/k".into(),
            endpoints: "http://x".into(),
            timeout: std::time::Duration::from_secs(1),
        });
        assert!(e.is_unavailable() && !e.is_exhausted());
        assert!(check_name("handle", "a/b").is_err());
        assert!(check_name("node", "").is_err());
    }
}

//! Block IPAM and the datastore against the real etcd of a cluster in a box (needs root: the
//! etcd is reachable only from inside the cluster's namespaces). Each test has its own
//! cluster, so its own etcd.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::Ipv4Addr,
    pin::Pin,
    task::Poll,
    time::{Duration, Instant},
};

use dataplane::{
    datastore::{
        DEFAULT_POOL_NAME, Datastore, DefaultPoolOptions, EtcdConfig, IpPool, IpPoolSpec, IpipMode,
        Node, Profile, Versioned, WorkloadEndpoint, WorkloadEndpointArgs, keys, runtime,
    },
    ipam::{AssignRequest, Block, BlockAffinity, Handle, Ipam, IpamConfig, IpamError},
};
use dataplane_tests::{Cluster, require_root};

const NON_STRICT: IpamConfig = IpamConfig {
    strict_affinity: false,
    max_retries: 100,
};
const STRICT: IpamConfig = IpamConfig {
    strict_affinity: true,
    max_retries: 100,
};

fn etcd_config(cluster: &Cluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![cluster.etcd.as_ref().unwrap().endpoint()],
        timeout: Duration::from_secs(5),
        ..EtcdConfig::default()
    }
}

/// Runs `f` on a thread in node `i`'s namespace, with a datastore connected from there.
fn on_node<R: Send>(cluster: &Cluster, i: usize, f: impl AsyncFnOnce(&Datastore) -> R + Send) -> R {
    let cfg = etcd_config(cluster);
    cluster.nodes[i].ns.run(move || {
        let rt = runtime().unwrap();
        rt.block_on(async {
            let ds = Datastore::connect(&cfg).await.unwrap();
            f(&ds).await
        })
    })
}

/// Polls every future until all are done (concurrency on one thread, no tokio needed here).
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

fn req(node: &str, handle: &str) -> AssignRequest {
    AssignRequest {
        node: node.to_owned(),
        handle_id: handle.to_owned(),
        attrs: BTreeMap::from([
            ("namespace".to_owned(), "default".to_owned()),
            ("node".to_owned(), node.to_owned()),
            ("pod".to_owned(), handle.to_owned()),
        ]),
        pools: None,
    }
}

async fn add_pool(ds: &Datastore, name: &str, cidr: &str, block_size: u8) {
    let pool = IpPool::new(name, IpPoolSpec::new(cidr.parse().unwrap(), block_size));
    assert!(ds.create(&keys::ip_pool(name), &pool).await.unwrap());
}

async fn assign(ds: &Datastore, cfg: IpamConfig, node: &str, handle: &str) -> Ipv4Addr {
    Ipam::new(ds, cfg)
        .auto_assign(&req(node, handle))
        .await
        .unwrap_or_else(|e| panic!("assign {handle} on {node}: {e}"))
}

/// Every block, decoded, by CIDR text.
async fn blocks(ds: &Datastore) -> BTreeMap<String, Block> {
    ds.list::<Block>(keys::BLOCKS)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, v)| (v.value.cidr.to_string(), v.value))
        .collect()
}

/// Every affinity as (node, block CIDR text) → value.
async fn affinities(ds: &Datastore) -> BTreeMap<(String, String), BlockAffinity> {
    ds.list::<BlockAffinity>(keys::HOSTS)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| match keys::Key::parse(&k) {
            Some(keys::Key::BlockAffinity { node, cidr }) => ((node, cidr.to_string()), v.value),
            other => panic!("unexpected key {k}: {other:?}"),
        })
        .collect()
}

/// Every block is affine to at most one node, and each affinity matches its block.
async fn assert_affinities_consistent(ds: &Datastore) {
    let blocks = blocks(ds).await;
    let affs = affinities(ds).await;
    let mut owners: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for ((node, cidr), aff) in &affs {
        owners.entry(cidr).or_default().push(node);
        let block = blocks
            .get(cidr)
            .unwrap_or_else(|| panic!("affinity {node}/{cidr} ({aff:?}) without a block"));
        assert_eq!(block.affine_node(), Some(node.as_str()), "block {cidr}");
        assert_eq!(format!("{:?}", aff.state), "Confirmed", "{node}/{cidr}");
    }
    for (cidr, nodes) in owners {
        assert_eq!(nodes.len(), 1, "block {cidr} affine to {nodes:?}");
    }
}

fn in_block(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let mask = u32::MAX << (32 - len.parse::<u32>().unwrap());
    u32::from(ip) & mask == u32::from(net)
}

#[test]
fn root_address_comes_from_the_nodes_block_and_another_node_gets_another() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        assert!(
            ds.ensure_default_pool(&DefaultPoolOptions::default())
                .await
                .unwrap()
        );
        let ipam = Ipam::new(ds, NON_STRICT);
        let a = assign(ds, NON_STRICT, "node-1", "k8s-pod-network.a").await;
        assert_eq!(a, Ipv4Addr::new(10, 65, 0, 0));
        let b = assign(ds, NON_STRICT, "node-2", "k8s-pod-network.b").await;
        assert_eq!(
            b,
            Ipv4Addr::new(10, 65, 0, 64),
            "node-2 gets the next block"
        );
        let a2 = assign(ds, NON_STRICT, "node-1", "k8s-pod-network.a2").await;
        assert_eq!(a2, Ipv4Addr::new(10, 65, 0, 1), "node-1 stays in its block");

        // Calico's layout and values.
        let aff: Versioned<serde_json::Value> = ds
            .get(&keys::block_affinity(
                "node-1",
                "10.65.0.0/26".parse().unwrap(),
            ))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            aff.value,
            serde_json::json!({"state": "confirmed", "deleted": false})
        );
        let raw: serde_json::Value = ds
            .get("/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26")
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(raw["affinity"], "host:node-1");
        assert_eq!(raw["allocations"][0], 0);
        assert_eq!(raw["allocations"][1], 1);
        assert!(raw["allocations"][2].is_null());
        assert_eq!(raw["unallocated"][0], 2);
        assert_eq!(raw["attributes"][0]["handle_id"], "k8s-pod-network.a");
        assert_eq!(raw["attributes"][0]["secondary"]["node"], "node-1");
        let handle: Handle = ds
            .get("/calico/ipam/v2/handle/k8s-pod-network.a")
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(handle.handle_id, "k8s-pod-network.a");
        assert_eq!(
            handle.block,
            BTreeMap::from([("10.65.0.0/26".to_owned(), 1)])
        );
        assert_affinities_consistent(ds).await;

        assert_eq!(
            ipam.check_handle("k8s-pod-network.a").await.unwrap(),
            Some(vec![a])
        );
        assert_eq!(ipam.check_handle("k8s-pod-network.zz").await.unwrap(), None);
        let mut handles = ipam.list_handles().await.unwrap();
        handles.sort();
        assert_eq!(
            handles,
            [
                "k8s-pod-network.a",
                "k8s-pod-network.a2",
                "k8s-pod-network.b"
            ]
        );
        assert_eq!(
            ipam.handles_of_node("node-1").await.unwrap(),
            ["k8s-pod-network.a", "k8s-pod-network.a2"]
        );
        let show = ipam.show().await.unwrap();
        assert_eq!(show.len(), 2);
        assert_eq!(show[0].cidr.to_string(), "10.65.0.0/26");
        assert_eq!(show[0].affinity.as_deref(), Some("host:node-1"));
        assert_eq!((show[0].used, show[0].free, show[0].handles), (2, 62, 2));
        assert_eq!(show[1].affinity.as_deref(), Some("host:node-2"));
        assert!(ipam.has_free_address().await.unwrap());

        // Release: idempotent; the emptied block goes with its affinity.
        assert_eq!(
            ipam.release_by_handle("k8s-pod-network.b").await.unwrap(),
            [b]
        );
        assert_eq!(
            ipam.release_by_handle("k8s-pod-network.b").await.unwrap(),
            Vec::<Ipv4Addr>::new()
        );
        assert!(
            ds.get_raw("/calico/ipam/v2/assignment/ipv4/block/10.65.0.64-26")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            ds.list_keys(&keys::block_affinities_of("node-2"))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            ipam.release_ips(&[a2, Ipv4Addr::new(10, 99, 0, 1)])
                .await
                .unwrap(),
            [a2]
        );
        assert!(
            ds.get_raw(&keys::handle("k8s-pod-network.a2"))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            ipam.check_handle("k8s-pod-network.a").await.unwrap(),
            Some(vec![a])
        );
        assert_affinities_consistent(ds).await;
    });
}

#[test]
fn root_released_address_is_the_last_reused() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        add_pool(ds, "eight", "10.70.0.0/29", 29).await;
        let ipam = Ipam::new(ds, STRICT);
        let mut got = Vec::new();
        for i in 0..3 {
            got.push(assign(ds, STRICT, "node-1", &format!("h{i}")).await);
        }
        assert_eq!(got[0], Ipv4Addr::new(10, 70, 0, 0));
        assert_eq!(ipam.release_by_handle("h0").await.unwrap(), [got[0]]);
        let mut next = Vec::new();
        for i in 3..9 {
            next.push(assign(ds, STRICT, "node-1", &format!("h{i}")).await);
        }
        let want: Vec<Ipv4Addr> = [3, 4, 5, 6, 7, 0]
            .iter()
            .map(|&o| Ipv4Addr::new(10, 70, 0, o))
            .collect();
        assert_eq!(
            next, want,
            "FIFO: the released .0 comes after every never-used one"
        );
        let e = ipam.auto_assign(&req("node-1", "h9")).await.unwrap_err();
        assert!(e.is_exhausted(), "{e}");
        // A failed assignment leaves no handle behind.
        assert!(ds.get_raw(&keys::handle("h9")).await.unwrap().is_none());
    });
}

#[test]
fn root_full_block_makes_the_node_claim_another() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 1, async |ds| {
        add_pool(ds, "tiny-blocks", "10.71.0.0/24", 30).await;
        let mut got = Vec::new();
        for i in 0..6 {
            got.push(assign(ds, NON_STRICT, "node-2", &format!("h{i}")).await);
        }
        assert!(
            got[..4].iter().all(|ip| in_block(*ip, "10.71.0.0/30")),
            "{got:?}"
        );
        assert!(
            got[4..].iter().all(|ip| in_block(*ip, "10.71.0.4/30")),
            "{got:?}"
        );
        let blocks = blocks(ds).await;
        assert_eq!(blocks.len(), 2);
        assert!(blocks.values().all(|b| b.affine_node() == Some("node-2")));
        assert_affinities_consistent(ds).await;
        let ipam = Ipam::new(ds, NON_STRICT);
        let mut handles = ipam.handles_of_node("node-2").await.unwrap();
        handles.sort();
        assert_eq!(handles.len(), 6);
        assert!(ipam.handles_of_node("node-1").await.unwrap().is_empty());
    });
}

#[test]
fn root_small_pool_runs_out_with_exhausted() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        add_pool(ds, "small", "10.72.0.0/28", 30).await;
        let ipam = Ipam::new(ds, NON_STRICT);
        let mut got = BTreeSet::new();
        for i in 0..16 {
            got.insert(assign(ds, NON_STRICT, "node-1", &format!("h{i}")).await);
        }
        assert_eq!(got.len(), 16);
        assert_eq!(blocks(ds).await.len(), 4);
        for node in ["node-1", "node-2"] {
            let e = ipam.auto_assign(&req(node, "one-more")).await.unwrap_err();
            assert!(matches!(e, IpamError::Exhausted { .. }), "{e:?}");
            assert!(e.is_exhausted() && !e.is_unavailable());
            let msg = e.to_string();
            assert!(msg.contains("small (10.72.0.0/28)"), "{msg}");
            assert!(msg.contains(node), "{msg}");
        }
        assert!(!ipam.has_free_address().await.unwrap());
        assert!(
            ds.get_raw(&keys::handle("one-more"))
                .await
                .unwrap()
                .is_none()
        );
        // Naming pools: unknown or disabled ones are errors, not exhaustion.
        let mut r = req("node-1", "x");
        r.pools = Some(vec!["nope".to_owned()]);
        let e = ipam.auto_assign(&r).await.unwrap_err();
        assert!(matches!(e, IpamError::PoolNotFound { .. }), "{e:?}");
        // Freeing one makes room again.
        ipam.release_by_handle("h5").await.unwrap();
        assert!(ipam.has_free_address().await.unwrap());
        assert_eq!(
            assign(ds, NON_STRICT, "node-2", "again").await,
            Ipv4Addr::new(10, 72, 0, 5),
            "borrowed from node-1's block"
        );
    });
}

#[test]
fn root_borrows_only_without_strict_affinity() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 2, async |ds| {
        add_pool(ds, "two-blocks", "10.73.0.0/29", 30).await;
        let a = assign(ds, NON_STRICT, "node-1", "a").await;
        let b = assign(ds, NON_STRICT, "node-2", "b").await;
        assert!(in_block(a, "10.73.0.0/30") && in_block(b, "10.73.0.4/30"));

        let e = Ipam::new(ds, STRICT)
            .auto_assign(&req("node-3", "c"))
            .await
            .unwrap_err();
        assert!(e.is_exhausted(), "{e}");
        assert!(e.to_string().contains("strict affinity"), "{e}");
        assert!(ds.get_raw(&keys::handle("c")).await.unwrap().is_none());

        let c = assign(ds, NON_STRICT, "node-3", "c").await;
        assert_eq!(
            c,
            Ipv4Addr::new(10, 73, 0, 1),
            "borrowed from node-1's block"
        );
        let blocks_now = blocks(ds).await;
        assert_eq!(blocks_now.len(), 2, "borrowing claims nothing");
        assert_eq!(
            blocks_now["10.73.0.0/30"].affine_node(),
            Some("node-1"),
            "the lender keeps its block"
        );
        assert!(
            ds.list_keys(&keys::block_affinities_of("node-3"))
                .await
                .unwrap()
                .is_empty()
        );
        let ipam = Ipam::new(ds, NON_STRICT);
        assert_eq!(ipam.handles_of_node("node-3").await.unwrap(), ["c"]);
        assert_eq!(ipam.release_by_handle("c").await.unwrap(), [c]);
        assert_eq!(blocks(ds).await["10.73.0.0/30"].used(), 1);
        assert_eq!(ipam.release_by_handle("a").await.unwrap(), [a]);
        assert!(!blocks(ds).await.contains_key("10.73.0.0/30"));
        assert_affinities_consistent(ds).await;
    });
}

#[test]
fn root_200_concurrent_assignments_on_3_nodes_are_distinct_and_all_released() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        ds.ensure_default_pool(&DefaultPoolOptions::default())
            .await
            .unwrap();
    });
    let per_node = [67, 67, 66];
    let start = Instant::now();
    let assigned: Vec<(String, Ipv4Addr)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..3)
            .map(|n| {
                let cluster = &cluster;
                s.spawn(move || {
                    on_node(cluster, n, async |ds| {
                        let node = format!("node-{}", n + 1);
                        let futs = (0..per_node[n])
                            .map(|i| {
                                let handle = format!("k8s-pod-network.n{n}-{i}");
                                let node = node.clone();
                                async move {
                                    let ip = Ipam::new(ds, NON_STRICT)
                                        .auto_assign(&req(&node, &handle))
                                        .await
                                        .unwrap_or_else(|e| panic!("{handle}: {e}"));
                                    (handle, ip)
                                }
                            })
                            .collect();
                        join_all(futs).await
                    })
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let assign_time = start.elapsed();
    assert_eq!(assigned.len(), 200);
    let distinct: BTreeSet<Ipv4Addr> = assigned.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(distinct.len(), 200, "duplicate addresses handed out");

    on_node(&cluster, 1, async |ds| {
        let blocks = blocks(ds).await;
        let mut owner_of = BTreeMap::new();
        for (cidr, b) in &blocks {
            for o in 0..b.size() {
                if let Some(h) = b.allocations[o].and_then(|i| b.attributes[i].handle_id.clone()) {
                    assert!(owner_of.insert(b.addr(o), h).is_none());
                }
            }
            assert!(b.affine_node().is_some(), "{cidr} has no affinity");
        }
        // Every address is in a block, held by the handle it was given to, and every
        // handle counts exactly its one address.
        for (handle, ip) in &assigned {
            assert_eq!(owner_of.get(ip), Some(handle), "{ip}");
            let h: Handle = ds.get(&keys::handle(handle)).await.unwrap().unwrap().value;
            assert_eq!(h.block.values().sum::<u64>(), 1, "{handle}: {h:?}");
        }
        assert_eq!(owner_of.len(), 200);
        // Each node's addresses come from its own blocks (there are plenty of free ones).
        for (handle, ip) in &assigned {
            let n: usize = handle["k8s-pod-network.n".len()..][..1].parse().unwrap();
            let block = blocks.values().find(|b| b.ordinal(*ip).is_some()).unwrap();
            assert_eq!(
                block.affine_node(),
                Some(format!("node-{}", n + 1).as_str())
            );
        }
        assert_affinities_consistent(ds).await;
        eprintln!(
            "200 assignments in {assign_time:?} into {} blocks",
            blocks.len()
        );
    });

    let start = Instant::now();
    std::thread::scope(|s| {
        for n in 0..3 {
            let cluster = &cluster;
            let assigned = &assigned;
            s.spawn(move || {
                on_node(cluster, n, async |ds| {
                    let futs = assigned
                        .iter()
                        .skip(n)
                        .step_by(3)
                        .map(|(handle, ip)| async move {
                            let released = Ipam::new(ds, NON_STRICT)
                                .release_by_handle(handle)
                                .await
                                .unwrap_or_else(|e| panic!("release {handle}: {e}"));
                            assert_eq!(released, [*ip], "{handle}");
                        })
                        .collect();
                    join_all(futs).await;
                });
            });
        }
    });
    let release_time = start.elapsed();
    on_node(&cluster, 2, async |ds| {
        let with_allocations = blocks(ds)
            .await
            .into_values()
            .filter(|b| !b.is_empty())
            .count();
        assert_eq!(with_allocations, 0);
        assert!(ds.list_keys(keys::HANDLES).await.unwrap().is_empty());
        assert!(ds.list_keys(keys::BLOCKS).await.unwrap().is_empty());
        assert!(ds.list_keys(keys::HOSTS).await.unwrap().is_empty());
    });
    eprintln!("200 releases in {release_time:?}");
}

#[test]
fn root_default_pool_is_created_once_under_a_race() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    let created: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..3)
            .map(|n| {
                let cluster = &cluster;
                s.spawn(move || {
                    on_node(cluster, n, async |ds| {
                        let opts = DefaultPoolOptions::default();
                        let futs = (0..10).map(|_| ds.ensure_default_pool(&opts)).collect();
                        join_all(futs)
                            .await
                            .into_iter()
                            .filter(|r| *r.as_ref().unwrap())
                            .count()
                    })
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(created, 1, "exactly one caller creates the pool");
    on_node(&cluster, 0, async |ds| {
        assert_eq!(
            ds.list_keys(keys::IP_POOLS).await.unwrap(),
            [keys::ip_pool(DEFAULT_POOL_NAME)]
        );
        let pools = ds.ip_pools().await.unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].cidr.to_string(), "10.65.0.0/16");
        assert_eq!(
            (pools[0].block_size, pools[0].ipip_mode),
            (26, IpipMode::Always)
        );
        assert!(pools[0].nat_outgoing);
        // With a pool of any name, no default is made.
        assert!(
            ds.delete(&keys::ip_pool(DEFAULT_POOL_NAME), None)
                .await
                .unwrap()
        );
        add_pool(ds, "mine", "10.80.0.0/16", 26).await;
        assert!(
            !ds.ensure_default_pool(&DefaultPoolOptions::default())
                .await
                .unwrap()
        );
        assert_eq!(ds.list_keys(keys::IP_POOLS).await.unwrap().len(), 1);
    });
}

#[test]
fn root_corrupt_values_are_reported_with_their_key_and_never_panic() {
    require_root();
    let cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        ds.ensure_default_pool(&DefaultPoolOptions::default())
            .await
            .unwrap();
        let key = "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26";
        ds.put_raw(key, "{\"cidr\": \"10.65.0.0/26\", \"allocations\": [")
            .await
            .unwrap();
        ds.put_raw(
            &keys::block_affinity("node-1", "10.65.0.0/26".parse().unwrap()),
            r#"{"state":"confirmed","deleted":false}"#,
        )
        .await
        .unwrap();
        let e = ds.get::<Block>(key).await.unwrap_err();
        assert!(e.is_corrupt() && !e.is_unavailable(), "{e:?}");
        assert!(e.to_string().contains(key), "{e}");
        assert!(ds.list::<Block>(keys::BLOCKS).await.unwrap().is_empty());

        let ipam = Ipam::new(ds, NON_STRICT);
        let e = ipam.show().await.unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
        assert!(!e.is_unavailable() && !e.is_exhausted());

        // Assignment steps around the corrupt block, and leaves it as it is.
        let ip = assign(ds, NON_STRICT, "node-1", "h1").await;
        assert!(in_block(ip, "10.65.0.64/26"), "{ip}");
        let raw = ds.get_raw(key).await.unwrap().unwrap();
        assert!(raw.value.ends_with(b"["));

        // A handle that points at the corrupt block cannot be released: the error says where.
        let h = Handle {
            handle_id: "h2".to_owned(),
            block: BTreeMap::from([("10.65.0.0/26".to_owned(), 1)]),
            deleted: false,
        };
        assert!(ds.create(&keys::handle("h2"), &h).await.unwrap());
        let e = ipam.release_by_handle("h2").await.unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
        // A corrupt handle, likewise.
        ds.put_raw(&keys::handle("h3"), "nope").await.unwrap();
        let e = ipam.release_by_handle("h3").await.unwrap_err();
        assert!(e.to_string().contains("/calico/ipam/v2/handle/h3"), "{e}");
        // A pool that does not parse is named.
        ds.put_raw(
            &keys::ip_pool("broken"),
            r#"{"metadata":{"name":"broken"},"spec":{"cidr":"10.1.0.0/33"}}"#,
        )
        .await
        .unwrap();
        let e = ipam.auto_assign(&req("node-1", "h4")).await.unwrap_err();
        assert!(e.to_string().contains("IPPool broken is invalid"), "{e}");
    });
}

#[test]
fn root_datastore_resources_and_transactions() {
    require_root();
    let mut cluster = Cluster::new(&[1, 1, 1], true);
    on_node(&cluster, 0, async |ds| {
        // create / update / delete on mod revisions.
        assert!(ds.create("/t/a", &1).await.unwrap());
        assert!(!ds.create("/t/a", &2).await.unwrap());
        let v = ds.get::<u32>("/t/a").await.unwrap().unwrap();
        assert_eq!(v.value, 1);
        assert!(ds.update("/t/a", &3, v.mod_revision).await.unwrap());
        assert!(
            !ds.update("/t/a", &4, v.mod_revision).await.unwrap(),
            "stale revision"
        );
        assert!(!ds.delete("/t/a", Some(v.mod_revision)).await.unwrap());
        let v = ds.get::<u32>("/t/a").await.unwrap().unwrap();
        assert_eq!(v.value, 3);
        assert!(ds.delete("/t/a", Some(v.mod_revision)).await.unwrap());
        assert!(ds.get::<u32>("/t/a").await.unwrap().is_none());
        assert!(!ds.delete("/t/a", None).await.unwrap());
        // list: pages, and skips what does not decode.
        let keys: Vec<String> = (0..1200).map(|i| format!("/t/many/{i:04}")).collect();
        let puts = keys
            .iter()
            .zip(0u32..)
            .map(|(k, i)| async move { ds.put(k, &i).await.unwrap() });
        join_all(puts.collect()).await;
        ds.put_raw("/t/many/bad", "x").await.unwrap();
        let all = ds.list::<u32>("/t/many/").await.unwrap();
        assert_eq!(all.len(), 1200);
        assert_eq!(all[1199].1.value, 1199);
        assert_eq!(ds.list_keys("/t/many/").await.unwrap().len(), 1201);

        // Nodes and profiles.
        ds.put_node(&Node::new(
            "node-1",
            Some("192.168.1.10/24".parse().unwrap()),
        ))
        .await
        .unwrap();
        let node = ds.get_node("node-1").await.unwrap().unwrap();
        assert_eq!(
            node.ipv4_address().unwrap().unwrap().to_string(),
            "192.168.1.10/24"
        );
        assert!(ds.get_node("node-9").await.unwrap().is_none());
        let labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        ds.put(
            &keys::profile("kns.prod"),
            &Profile::new("kns.prod", labels.clone()),
        )
        .await
        .unwrap();
        assert_eq!(
            ds.get_profile("kns.prod")
                .await
                .unwrap()
                .unwrap()
                .labels_to_apply(),
            labels
        );

        // Workload endpoints: deleted only by the container that owns them.
        let wep = |pod: &str, cid: &str| {
            WorkloadEndpoint::new(WorkloadEndpointArgs {
                namespace: "default".into(),
                node: "node-1".into(),
                pod: pod.into(),
                endpoint: "eth0".into(),
                container_id: cid.into(),
                interface_name: "cali0123456789a".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                ip_networks: vec!["10.65.0.1/32".into()],
                profiles: vec!["kns.default".into()],
                labels: BTreeMap::new(),
            })
        };
        ds.put_workload_endpoint(&wep("web-0", "new"))
            .await
            .unwrap();
        ds.put_workload_endpoint(&wep("db-0", "c2")).await.unwrap();
        let key = keys::workload_endpoint("default", "node-1", "web-0", "eth0");
        assert!(key.ends_with("/default/node--1-k8s-web--0-eth0"));
        assert!(!ds.delete_workload_endpoint_if(&key, "old").await.unwrap());
        assert_eq!(
            ds.get_workload_endpoint(&key)
                .await
                .unwrap()
                .unwrap()
                .container_id(),
            "new"
        );
        let listed = ds.list_workload_endpoints("node-1").await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(
            ds.list_workload_endpoints("node-2")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(ds.delete_workload_endpoint_if(&key, "new").await.unwrap());
        assert!(!ds.delete_workload_endpoint_if(&key, "new").await.unwrap());
        assert!(ds.get_workload_endpoint(&key).await.unwrap().is_none());
    });

    // etcd gone: "unavailable", quickly, naming the key.
    cluster
        .etcd
        .as_mut()
        .unwrap()
        .process
        .stop(Duration::from_secs(5));
    on_node(&cluster, 0, async |ds| {
        let start = Instant::now();
        let e = ds.get::<u32>("/t/gone").await.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        assert!(e.to_string().contains("/t/gone"), "{e}");
        let e = Ipam::new(ds, NON_STRICT)
            .auto_assign(&req("node-1", "h"))
            .await
            .unwrap_err();
        assert!(e.is_unavailable() && !e.is_exhausted(), "{e:?}");
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{:?}",
            start.elapsed()
        );
    });
}

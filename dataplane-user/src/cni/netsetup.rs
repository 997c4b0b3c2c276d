//! Wiring a pod to its node over netlink: the veth pair (`cali…` in the node, the CNI ifname in
//! the pod), the pod's /32 and its routes via 169.254.1.1, the node's /32 route to the pod,
//! and the reverse for DEL and the checks for CHECK.
//!
//! The gateway 169.254.1.1 gets a permanent neighbour entry in the pod pointing at the host
//! veth's MAC rather than relying on proxy ARP alone: proxy ARP only answers when the node has
//! a route covering 169.254.1.1 (DESIGN.md), and a permanent entry removes the first-packet
//! ARP round trip. proxy_arp is still switched on for the host veth, for tools that flush the
//! pod's neighbour table.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    neighbour::NeighbourState,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha1::{Digest as _, Sha1};

/// The pod's gateway, as in Calico.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("open network namespace {path}: {source}")]
    OpenNetns {
        path: String,
        source: std::io::Error,
    },
    #[error("enter network namespace {path}: {source}")]
    EnterNetns { path: String, source: nix::Error },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
}

/// The host-side veth name: `cali` + the first 11 hex digits of SHA-1 of `<ns>.<pod>` (or of
/// the container ID when the runtime gave no pod), as Calico names them.
pub fn host_veth_name(pod: Option<(&str, &str)>, container_id: &str) -> String {
    let seed = match pod {
        Some((ns, name)) => format!("{ns}.{name}"),
        None => container_id.to_owned(),
    };
    let digest = Sha1::digest(seed.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cali{}", &hex[..11])
}

/// What wiring a pod produced.
#[derive(Debug, Clone)]
pub struct Wired {
    pub host_ifindex: u32,
    pub host_mac: String,
    pub pod_mac: String,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Runs `f` with a netlink handle on a thread inside `netns` (or in the caller's namespace when
/// `None`), on a single-threaded runtime of its own.
fn with_netlink<R, F, Fut>(netns: Option<&Path>, f: F) -> Result<R, NetError>
where
    R: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<R, NetError>>,
{
    let ns_file = match netns {
        Some(path) => Some(File::open(path).map_err(|source| NetError::OpenNetns {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    let path = netns.map(|p| p.display().to_string()).unwrap_or_default();
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(file) = &ns_file {
                setns(file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetError::EnterNetns { path, source })?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetError::Io {
                    what: "start a runtime for netlink".into(),
                    source,
                })?;
            rt.block_on(async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|source| NetError::Io {
                        what: "open a netlink socket".into(),
                        source,
                    })?;
                let task = tokio::spawn(conn);
                let result = f(handle).await;
                task.abort();
                result
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The link named `name`, if it exists.
async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

fn mac_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

fn parse_mac(mac: &str) -> Vec<u8> {
    mac.split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect()
}

fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| NetError::Io {
        what: format!("set {key}={value}"),
        source,
    })
}

/// Creates the veth pair and wires both ends. On error the caller removes the host veth (which
/// removes its peer and every route through it); nothing else is left behind.
///
/// The pod end is created directly inside the pod's namespace under its final name (the peer
/// carries IFLA_NET_NS_FD), as the reference plugins do: moving a device between namespaces
/// afterwards costs an RCU grace period (synchronize_net() in dev_change_net_namespace),
/// ~12 ms on this VM, and a rename.
pub fn wire(
    netns: &Path,
    ifname: &str,
    host_name: &str,
    ip: Ipv4Addr,
    mtu: u32,
) -> Result<Wired, NetError> {
    let ns_file = File::open(netns).map_err(|source| NetError::OpenNetns {
        path: netns.display().to_string(),
        source,
    })?;
    let ns_fd = ns_file.as_raw_fd();

    let (host_ifindex, host_mac) = with_netlink(None, |handle| async move {
        // A veth of the same name is left from an earlier sandbox of the same pod, or from an
        // ADD that failed half-way: it is replaced.
        if let Some(link) = link_by_name(&handle, host_name).await? {
            handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete stale {host_name}")))?;
        }
        let peer = LinkUnspec::new_with_name(ifname)
            .mtu(mtu)
            .setns_by_fd(ns_fd)
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_name.to_owned())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        handle.link().add(veth).execute().await.map_err(nl(format!(
            "create veth {host_name} with {ifname} in {}",
            netns.display()
        )))?;
        let host = link_by_name(&handle, host_name)
            .await?
            .ok_or_else(|| NetError::Missing(format!("{host_name} vanished after creation")))?;
        let index = host.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bring {host_name} up")))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add route {ip}/32 dev {host_name}")))?;
        Ok((index, mac_of(&host)))
    })?;
    drop(ns_file);

    // Host side: forwarding and proxy ARP on the veth, IPv6 off (no RA/ND chatter).
    for (key, value) in [
        (format!("net.ipv4.conf.{host_name}.forwarding"), "1"),
        (format!("net.ipv4.conf.{host_name}.proxy_arp"), "1"),
        (format!("net.ipv4.neigh.{host_name}.proxy_delay"), "0"),
    ] {
        write_sysctl(&key, value)?;
    }
    let ipv6 = format!("net.ipv6.conf.{host_name}.disable_ipv6");
    if Path::new(&format!("/proc/sys/{}", ipv6.replace('.', "/"))).exists() {
        write_sysctl(&ipv6, "1")?;
    }

    let host_mac_bytes = parse_mac(&host_mac);
    let pod_mac = with_netlink(Some(netns), |handle| async move {
        let link = link_by_name(&handle, ifname).await?.ok_or_else(|| {
            NetError::Missing(format!("{ifname} not found in {}", netns.display()))
        })?;
        let index = link.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bring {ifname} up")))?;
        handle
            .address()
            .add(index, IpAddr::V4(ip), 32)
            .execute()
            .await
            .map_err(nl(format!("add {ip}/32 to {ifname}")))?;
        let to_gw = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(to_gw)
            .execute()
            .await
            .map_err(nl(format!("add route {GATEWAY} dev {ifname}")))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(default)
            .execute()
            .await
            .map_err(nl(format!("add default route via {GATEWAY}")))?;
        handle
            .neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_local_address(&host_mac_bytes)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add permanent neighbour {GATEWAY}")))?;
        Ok(mac_of(&link))
    })?;

    Ok(Wired {
        host_ifindex,
        host_mac,
        pod_mac,
    })
}

/// Deletes the host veth `name` (and with it the pod end and the routes through it). Returns
/// whether it existed.
pub fn delete_host_veth(name: &str) -> Result<bool, NetError> {
    with_netlink(None, |handle| async move {
        let Some(link) = link_by_name(&handle, name).await? else {
            return Ok(false);
        };
        match handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(nl(format!("delete {name}"))(e)),
        }
    })
}

/// Whether the host veth `name` exists.
pub fn host_veth_exists(name: &str) -> Result<bool, NetError> {
    with_netlink(None, |handle| async move {
        Ok(link_by_name(&handle, name).await?.is_some())
    })
}

fn route_matches(
    r: &RouteMessage,
    dst: Ipv4Addr,
    prefix: u8,
    oif: Option<u32>,
    gw: Option<Ipv4Addr>,
) -> bool {
    if r.header.destination_prefix_length != prefix {
        return false;
    }
    let mut dst_ok = prefix == 0;
    let mut oif_ok = oif.is_none();
    let mut gw_ok = gw.is_none();
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst_ok = *d == dst,
            RouteAttribute::Oif(i) => oif_ok = oif.is_none_or(|o| o == *i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw_ok = gw.is_none_or(|w| w == *g),
            _ => {}
        }
    }
    dst_ok && oif_ok && gw_ok
}

async fn has_route(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    oif: Option<u32>,
    gw: Option<Ipv4Addr>,
) -> Result<bool, NetError> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    Ok(routes
        .iter()
        .filter(|r| r.header.address_family == AddressFamily::Inet)
        .any(|r| route_matches(r, dst, prefix, oif, gw)))
}

/// CHECK: the attachment is as `wire` left it. Returns what is wrong, if anything.
pub fn check(netns: &Path, ifname: &str, host_name: &str, ip: Ipv4Addr) -> Result<(), NetError> {
    with_netlink(None, |handle| async move {
        let host = link_by_name(&handle, host_name)
            .await?
            .ok_or_else(|| NetError::Missing(format!("host veth {host_name} is missing")))?;
        if !host.header.flags.contains(LinkFlags::Up) {
            return Err(NetError::Missing(format!("host veth {host_name} is down")));
        }
        if !has_route(&handle, ip, 32, Some(host.header.index), None).await? {
            return Err(NetError::Missing(format!(
                "route {ip}/32 dev {host_name} is missing"
            )));
        }
        Ok(())
    })?;
    with_netlink(Some(netns), |handle| async move {
        let link = link_by_name(&handle, ifname).await?.ok_or_else(|| {
            NetError::Missing(format!("{ifname} is missing in {}", netns.display()))
        })?;
        let index = link.header.index;
        let addrs: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("list addresses of {ifname}")))?;
        let has_ip = addrs.iter().any(|a| {
            a.header.prefix_len == 32
                && a.attributes.iter().any(|attr| {
                    matches!(attr, netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(v)) if *v == ip)
                })
        });
        if !has_ip {
            return Err(NetError::Missing(format!("{ifname} does not have {ip}/32")));
        }
        if !has_route(&handle, GATEWAY, 32, Some(index), None).await? {
            return Err(NetError::Missing(format!(
                "route {GATEWAY} dev {ifname} is missing"
            )));
        }
        if !has_route(
            &handle,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(index),
            Some(GATEWAY),
        )
        .await?
        {
            return Err(NetError::Missing(format!(
                "default route via {GATEWAY} is missing"
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_follow_calico() {
        // printf 'default.nginx' | sha1sum → c440f455693b69cdd48a37aa5ecd78038f50413d
        assert_eq!(
            host_veth_name(Some(("default", "nginx")), "ignored"),
            "calic440f455693"
        );
        assert_ne!(host_veth_name(None, "abc"), host_veth_name(None, "abd"));
    }
}

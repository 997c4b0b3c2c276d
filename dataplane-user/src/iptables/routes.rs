//! Kernel routes to other nodes' pod blocks, over rtnetlink in the agent's namespace. Ours
//! carry a route protocol of their own ([`ROUTE_PROTOCOL`]), so the agent finds and removes
//! what it added (after a restart too) and never touches anyone else's routes: the CNI
//! plugin's /32 to each local pod, the default route, the kernel's.

use std::{collections::BTreeMap, net::Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::IptablesError;

/// The route protocol number on our routes (80, the number Calico's Felix uses for its own).
pub const ROUTE_PROTOCOL: u8 = 80;

/// Destination → next hop.
pub type Routes = BTreeMap<Ipv4Net, Ipv4Addr>;

fn nl(what: String) -> impl FnOnce(rtnetlink::Error) -> IptablesError {
    move |source| IptablesError::Route { what, source }
}

/// A netlink handle whose connection task ends when this is dropped.
struct Connection {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    fn new() -> Result<Self, IptablesError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(IptablesError::Netlink)?;
        Ok(Self {
            handle,
            task: tokio::spawn(conn),
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Our routes in the main table: their messages (to delete them by) and what they say.
async fn ours(handle: &Handle) -> Result<Vec<(RouteMessage, Ipv4Net, Ipv4Addr)>, IptablesError> {
    let all: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes".to_owned()))?;
    Ok(all
        .into_iter()
        .filter(|r| {
            r.header.address_family == AddressFamily::Inet
                && u8::from(r.header.protocol) == ROUTE_PROTOCOL
        })
        .filter_map(|r| {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut via = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                    _ => {}
                }
            }
            let net = Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?;
            Some((r, net, via.unwrap_or(Ipv4Addr::UNSPECIFIED)))
        })
        .collect())
}

/// The routes of ours the kernel has now.
pub async fn read() -> Result<Routes, IptablesError> {
    let c = Connection::new()?;
    Ok(ours(&c.handle)
        .await?
        .into_iter()
        .map(|(_, n, v)| (n, v))
        .collect())
}

/// Makes our routes `desired` (each via its next hop out of `ifindex`), given that `applied`
/// is what we have now. Returns (added or changed, removed).
pub async fn apply(
    applied: &Routes,
    desired: &Routes,
    ifindex: u32,
) -> Result<(usize, usize), IptablesError> {
    let add: Vec<(Ipv4Net, Ipv4Addr)> = desired
        .iter()
        .filter(|(n, v)| applied.get(n) != Some(v))
        .map(|(n, v)| (*n, *v))
        .collect();
    let stale: Vec<Ipv4Net> = applied
        .keys()
        .filter(|n| !desired.contains_key(n))
        .copied()
        .collect();
    if add.is_empty() && stale.is_empty() {
        return Ok((0, 0));
    }
    let c = Connection::new()?;
    let h = &c.handle;
    for (net, via) in &add {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .gateway(*via)
            .output_interface(ifindex)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("ip route replace {net} via {via}")))?;
    }
    if !stale.is_empty() {
        for (msg, net, via) in ours(h).await? {
            if !stale.contains(&net) {
                continue;
            }
            match h.route().del(msg).execute().await {
                Ok(()) => {}
                // Gone already (its interface went, say): what we wanted.
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::ESRCH || e.raw_code() == -libc::ENOENT => {}
                Err(e) => return Err(nl(format!("ip route del {net} via {via}"))(e)),
            }
        }
    }
    Ok((add.len(), stale.len()))
}

//! Interface events from rtnetlink: the links that exist now, then every change, so the agent
//! attaches to a pod's veth as soon as it appears (no polling).

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::constants::RTMGRP_LINK;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("open rtnetlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("subscribe to link events: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("list links: {0}")]
    List(#[source] rtnetlink::Error),
}

/// An interface as the agent cares about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The interface exists (new, or changed: renamed, up/down).
    Present(Link),
    /// The interface was deleted.
    Gone(Link),
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    Some(Link {
        ifindex: msg.header.index,
        name,
    })
}

fn event_of(msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<LinkEvent> {
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
            link_of(&m).map(LinkEvent::Present)
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
            link_of(&m).map(LinkEvent::Gone)
        }
        _ => None,
    }
}

/// Subscribes to link events, then lists the links that exist. Events that arrive while the
/// list is taken are delivered too, so nothing falls between the two; consumers must treat a
/// `Present` for a link they know as a no-op.
pub async fn watch_links()
-> Result<(Vec<Link>, impl Stream<Item = LinkEvent> + Unpin), NetlinkError> {
    let (mut conn, _, events) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(NetlinkError::Subscribe)?;
    tokio::spawn(conn);

    let (list_conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    let list_task = tokio::spawn(list_conn);
    let links: Vec<Link> = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| link_of(&m))
        .try_filter_map(|l| async move { Ok(l) })
        .try_collect()
        .await
        .map_err(NetlinkError::List)?;
    list_task.abort();

    let stream = events.filter_map(|(msg, _)| futures::future::ready(event_of(msg)));
    Ok((links, stream))
}

/// The first IPv4 address (with its prefix) of interface `ifindex`, if any.
pub async fn ipv4_of(ifindex: u32) -> Result<Option<ipnet::Ipv4Net>, NetlinkError> {
    use netlink_packet_route::address::AddressAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    let task = tokio::spawn(conn);
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::List)?;
    task.abort();
    Ok(addrs.iter().find_map(|a| {
        a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Address(std::net::IpAddr::V4(ip)) => {
                ipnet::Ipv4Net::new(*ip, a.header.prefix_len).ok()
            }
            _ => None,
        })
    }))
}

/// The MTU of interface `ifindex`.
pub async fn mtu_of(ifindex: u32) -> Result<Option<u32>, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    let task = tokio::spawn(conn);
    let link = handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
        .map_err(NetlinkError::List)?;
    task.abort();
    Ok(link.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }))
}

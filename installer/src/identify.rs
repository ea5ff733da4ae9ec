//! Which node of the cluster is this Mac? `--node`, else the host name, else an
//! address of a local interface. Pure, so every case is tested without a Mac.

use std::net::IpAddr;

use crate::cluster::Cluster;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentifyError {
    #[error("--node {0}: no node with that id in the cluster file (ids: {1})")]
    UnknownNode(String, String),
    #[error("cannot tell which node this Mac is: host name `{hostname}` is not a node id and no node's address is on a local interface. Run again with --node ID (ids: {ids})")]
    NotFound { hostname: String, ids: String },
    #[error("this Mac matches several nodes ({0}). Run again with --node ID")]
    Ambiguous(String),
}

pub fn identify(
    cluster: &Cluster,
    flag: Option<&str>,
    hostname: &str,
    local_addresses: &[IpAddr],
) -> Result<String, IdentifyError> {
    let ids = || {
        cluster
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(id) = flag {
        return match cluster.node(id) {
            Some(n) => Ok(n.id.clone()),
            None => Err(IdentifyError::UnknownNode(id.to_owned(), ids())),
        };
    }
    let short = hostname
        .trim_end_matches(".local")
        .split('.')
        .next()
        .unwrap_or("");
    let by_name: Vec<&str> = cluster
        .nodes
        .iter()
        .filter(|n| n.id.eq_ignore_ascii_case(short))
        .map(|n| n.id.as_str())
        .collect();
    let by_address: Vec<&str> = cluster
        .nodes
        .iter()
        .filter(|n| {
            n.address
                .parse::<IpAddr>()
                .is_ok_and(|a| local_addresses.contains(&a))
        })
        .map(|n| n.id.as_str())
        .collect();
    let mut matches: Vec<&str> = by_name.iter().chain(by_address.iter()).copied().collect();
    matches.sort_unstable();
    matches.dedup();
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(IdentifyError::NotFound {
            hostname: hostname.to_owned(),
            ids: ids(),
        }),
        many => Err(IdentifyError::Ambiguous(many.join(", "))),
    }
}

/// This machine's interface addresses.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

//! What the kernel's table holds, as read back by an [`super::NftInterface`]: the
//! applier's answer, shared by the netlink backend and the fake, and what a full sync
//! diffs against when it takes over an existing table or starts after a restart.

use std::collections::BTreeSet;

use super::transaction::Element;

/// The sets and maps whose elements kproxy writes (and so reads back): the dispatch
/// and no-endpoint maps and the ClusterIP set. Affinity sets are filled by the packet
/// path, and anonymous sets belong to their rules; neither is read.
pub(crate) const MANAGED_SETS: [&str; 6] = [
    "cluster-ips",
    "service-ips",
    "firewall-ips",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "service-nodeports",
];

/// The content of one table as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Chain names.
    pub chains: BTreeSet<String>,
    /// Named set and map names (anonymous sets are left out).
    pub sets: BTreeSet<String>,
    /// Elements of the [`MANAGED_SETS`] present, without comments (the kernel keeps
    /// them, but nothing kproxy decides depends on them).
    pub elements: Vec<Element>,
}

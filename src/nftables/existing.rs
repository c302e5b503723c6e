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

/// A table read back whole, for a layout that diffs full syncs against the kernel
/// (the `maps` layout): chains with their rules' comments, set names, and the typed
/// elements (data values, interval ends decoded as prefixes, verdicts) of the sets the
/// caller declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableContents {
    /// Chain name -> the comment of each of its rules, in order (`None`: no comment).
    /// Rules are not decoded: a layout that wants to know whether a chain holds what
    /// it would write stamps its rules (see the `maps` dataplane's digests).
    pub chains: std::collections::BTreeMap<String, Vec<Option<String>>>,
    /// Named set and map names (anonymous sets are left out).
    pub sets: BTreeSet<String>,
    /// The default element timeout, in seconds, of the named sets that have one (a
    /// set is not redefined in place, so a sync compares it to re-create the set).
    pub timeouts: std::collections::BTreeMap<String, u32>,
    /// Elements of the declared sets, without comments.
    pub elements: Vec<Element>,
}

//! kproxy: a Rust replacement for Kubernetes' kube-proxy.
//!
//! Data flows one way: Kubernetes objects become a compact [`model::ClusterState`];
//! a per-family [`model::ProxyState`] is derived from it; the renderers turn that into
//! rules (pure data); only the appliers touch the kernel.

#![warn(unreachable_pub)]

// Lets unit tests share the integration tests' helpers, which name the crate.
#[cfg(test)]
extern crate self as kproxy;

pub mod cli;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod dataplane;
pub mod diff;
pub mod explain;
pub mod host;
pub mod iptables;
pub mod memory;
pub mod model;
pub mod nftables;
pub mod snapshot;
pub(crate) mod sys;
pub mod sysctl;
pub mod trace;

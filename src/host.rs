//! The host kproxy programs: its interface addresses, its iptables backend and the
//! sysctls that shape the rules. The one place that turns a [`Config`] into this
//! host's dataplanes, for `kproxy apply`, `kproxy cleanup` and the daemon alike, and
//! that removes the other mode's leftovers at start-up.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Config, FamilySettings, Mode, NftablesLayout};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::iptables::apply::{detect_backend, Backend, Binaries, Iptables, RealExec};
use crate::iptables::dataplane::IptablesDataplane;
use crate::model::{IpFamily, NodeInfo};
use crate::nftables::dataplane::NftDataplane;
use crate::nftables::maps::dataplane::MapsDataplane;

/// What kproxy knows about the machine it runs on.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    /// The node's interface addresses (for nodePortAddresses and the node IP).
    pub addresses: Vec<IpNet>,
    /// `net/netfilter/nf_conntrack_tcp_be_liberal` is set: upstream then writes no
    /// INVALID-drop rule.
    pub tcp_be_liberal: bool,
    /// The rules may name nfacct counters (kproxy creates none; only when the
    /// operator says they exist).
    pub nfacct: bool,
}

impl Host {
    /// Reads this network namespace: interface addresses and sysctls.
    pub(crate) fn probe() -> Host {
        Host::with_addresses(interface_addresses())
    }

    /// A host with the given interface addresses (`--local-address` in dry runs);
    /// sysctls are still read from this machine.
    pub(crate) fn with_addresses(addresses: Vec<IpNet>) -> Host {
        Host {
            addresses,
            tcp_be_liberal: crate::sysctl::read_int("net/netfilter/nf_conntrack_tcp_be_liberal")
                .unwrap_or(0)
                != 0,
            nfacct: false,
        }
    }

    /// The IP families this node serves: IPv4 always (upstream's default primary
    /// family), IPv6 too when the node has a global IPv6 address.
    pub(crate) fn families(&self) -> Vec<IpFamily> {
        let mut families = vec![IpFamily::V4];
        if self.addresses.iter().any(|a| {
            let ip = a.addr();
            IpFamily::V6.contains(&ip) && !ip.is_loopback() && !is_link_local(&ip)
        }) {
            families.push(IpFamily::V6);
        }
        families
    }

    /// One family's renderer settings on this host.
    pub(crate) fn family_settings(
        &self,
        cfg: &Config,
        family: IpFamily,
        node_name: &str,
        node: Option<&NodeInfo>,
    ) -> FamilySettings {
        let mut s = cfg.family_settings(family, node_name, node, &self.addresses);
        s.nfacct_invalid = self.nfacct;
        s.nfacct_localhost = self.nfacct;
        s.tcp_be_liberal |= self.tcp_be_liberal;
        s
    }

    /// One dataplane per family in the configured mode. In iptables mode the
    /// sysctl localhost NodePorts need is set first (upstream does it at proxier
    /// construction).
    pub(crate) fn dataplanes(
        &self,
        cfg: &Config,
        settings: Vec<FamilySettings>,
    ) -> Vec<Box<dyn Dataplane>> {
        let backend = (cfg.mode == Mode::Iptables).then(|| detect_backend(&RealExec));
        settings
            .into_iter()
            .map(|s| -> Box<dyn Dataplane> {
                match backend {
                    Some(backend) => {
                        if s.family == IpFamily::V4 && s.localhost_nodeports {
                            crate::sysctl::ensure_or_warn("net/ipv4/conf/all/route_localnet", "1");
                        }
                        tracing::info!(family = s.family.label(), ?backend, "iptables backend");
                        let family = s.family;
                        Box::new(IptablesDataplane::new(
                            s,
                            Box::new(RealExec),
                            Binaries::new(family, backend),
                            cfg.sync_period,
                        ))
                    }
                    None if cfg.nftables_layout == NftablesLayout::Maps => {
                        Box::new(MapsDataplane::new(s))
                    }
                    None => Box::new(NftDataplane::new(s)),
                }
            })
            .collect()
    }

    /// Every dataplane of `mode` that can hold rules here, for clean-up: both
    /// families, and in iptables mode each backend (nft, and legacy where its tables
    /// exist) whose binary works.
    pub(crate) fn cleanup_planes(&self, mode: Mode) -> Vec<Box<dyn Dataplane>> {
        let cfg = Config::default();
        let mut planes: Vec<Box<dyn Dataplane>> = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let settings = cfg.family_settings(family, "", None, &[]);
            match mode {
                Mode::Nftables => {
                    // Both layouts' tables: `kube-proxy` and the maps layout's `kproxy`.
                    planes.push(Box::new(NftDataplane::new(settings.clone())));
                    planes.push(Box::new(MapsDataplane::new(settings)));
                }
                Mode::Iptables => {
                    for backend in iptables_backends(family) {
                        let bins = Binaries::new(family, backend);
                        if !Iptables::new(&RealExec, bins.clone()).available() {
                            continue;
                        }
                        planes.push(Box::new(IptablesDataplane::new(
                            settings.clone(),
                            Box::new(RealExec),
                            bins,
                            cfg.sync_period,
                        )));
                    }
                }
            }
        }
        planes
    }

    /// Removes every kube-proxy rule of `mode` (both families; safe to repeat);
    /// returns what failed, one line each.
    pub(crate) fn cleanup(&self, mode: Mode) -> Vec<DataplaneError> {
        self.cleanup_planes(mode)
            .into_iter()
            .filter_map(|mut dp| dp.cleanup().err())
            .collect()
    }

    /// Upstream's start-up `platformCleanup`: in nftables mode remove iptables
    /// leftovers, in iptables mode the `kube-proxy` nftables tables, so that rules of
    /// the mode not in use never route traffic. Best effort: failures are logged.
    pub(crate) fn remove_other_mode_leftovers(&self, mode: Mode) {
        let other = mode.other();
        for e in self.cleanup(other) {
            tracing::warn!(error = %e, "removing {} leftovers failed", other.as_str());
        }
    }

    /// In nftables mode, removes the table of the layout not in use (`kube-proxy` when
    /// the maps layout runs, `kproxy` otherwise), so the two layouts never both route
    /// traffic. Best effort: failures are logged.
    pub(crate) fn remove_other_layout_leftovers(&self, cfg: &Config) {
        if cfg.mode != Mode::Nftables {
            return;
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            let settings = Config::default().family_settings(family, "", None, &[]);
            let result = match cfg.nftables_layout {
                NftablesLayout::Maps => NftDataplane::new(settings).cleanup(),
                NftablesLayout::Upstream => MapsDataplane::new(settings).cleanup(),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "removing the other nftables layout's table failed");
            }
        }
    }
}

/// The iptables backends to clean: nft always (reading it creates nothing), legacy
/// only when this namespace has legacy tables (listing them would load the legacy
/// modules).
fn iptables_backends(family: IpFamily) -> Vec<Backend> {
    let names = match family {
        IpFamily::V4 => "/proc/net/ip_tables_names",
        IpFamily::V6 => "/proc/net/ip6_tables_names",
    };
    let legacy = std::fs::read_to_string(names).is_ok_and(|t| {
        t.lines()
            .any(|l| matches!(l.trim(), "nat" | "filter" | "mangle"))
    });
    let mut out = vec![Backend::Nft];
    if legacy {
        out.push(Backend::Legacy);
    }
    out
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

/// The node's interface addresses, read from the kernel (`ip -o addr`).
fn interface_addresses() -> Vec<IpNet> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(t) = w.next() {
                if t == "inet" || t == "inet6" {
                    return w.next()?.parse().ok();
                }
            }
            None
        })
        .collect()
}

/// The kernel's hostname, lower-cased as upstream does; "" if unreadable.
pub(crate) fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_global_addresses() {
        let host = |a: &[&str]| Host {
            addresses: a.iter().map(|s| s.parse().unwrap()).collect(),
            tcp_be_liberal: false,
            nfacct: false,
        };
        assert_eq!(
            host(&["10.0.0.1/24", "fe80::1/64", "::1/128"]).families(),
            [IpFamily::V4]
        );
        assert_eq!(
            host(&["10.0.0.1/24", "2001:db8::1/64"]).families(),
            [IpFamily::V4, IpFamily::V6]
        );
    }
}

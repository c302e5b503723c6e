//! The inputs shared by `render`, `apply` and `trace`: a snapshot, a config and the
//! node's identity, validated into everything a renderer needs.

use std::path::PathBuf;

use clap::Args;
use ipnet::IpNet;

use super::CliError;
use crate::config::{self, flags, Config, FamilySettings};
use crate::model::ip::parse_ip_sloppy;
use crate::model::{ClusterState, IpFamily, NodeContext};
use crate::snapshot;

/// Flags describing the cluster and the node (the DESIGN.md CLI contract).
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Cluster snapshot: `kubectl get services,endpointslices,nodes,servicecidrs -A -o yaml`
    /// output, multi-document YAML or JSON; `-` reads standard input. Required unless
    /// the command has another source (`trace --ruleset`/`--live`, `explain --live`).
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// Proxy mode (overrides the config file).
    #[arg(long, value_name = "iptables|nftables")]
    pub mode: Option<String>,
    /// nftables table layout: upstream (default) or maps.
    #[arg(long, value_name = "upstream|maps")]
    pub(crate) nftables_layout: Option<String>,
    /// Upstream KubeProxyConfiguration file.
    #[arg(long, value_name = "KUBE_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (default: the config's hostnameOverride, the snapshot's only
    /// Node, or the hostname).
    #[arg(long, value_name = "NODE")]
    pub(crate) hostname_override: Option<String>,
    /// Render only this family (default: every family the cluster uses).
    #[arg(long, value_name = "ipv4|ipv6")]
    pub ip_family: Option<String>,
    /// One of the node's interface addresses (repeatable), e.g. 192.168.0.2/24.
    #[arg(long = "local-address", value_name = "IP[/LEN]")]
    pub(crate) local_addresses: Vec<String>,
    /// iptables features of the host: a comma list of `nfacct`, `random-fully`, or `none`
    /// (default: a modern host with both).
    #[arg(long, value_name = "LIST")]
    pub(crate) iptables_capabilities: Option<String>,
    /// Pod network CIDR(s), comma separated (upstream's --cluster-cidr).
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// Masquerade all service traffic (upstream's --masquerade-all).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Addresses that accept NodePorts: CIDRs or `primary` (upstream's --nodeport-addresses).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
}

/// Validated inputs.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The cluster.
    pub state: ClusterState,
    /// The configuration (file + flags).
    pub config: Config,
    /// Node identity for endpoint selection.
    pub node: NodeContext,
    /// One renderer setting per family to render, IPv4 first.
    pub families: Vec<FamilySettings>,
    /// Objects skipped as malformed (already logged).
    pub skipped: Vec<snapshot::Skipped>,
    /// Why `apply` must refuse this snapshot without `--allow-empty` (no Services).
    pub(crate) refuse_apply: Option<String>,
    /// Whether `--iptables-capabilities` was given (else dry-run assumes a modern host).
    pub(crate) capabilities_given: bool,
}

impl Inputs {
    /// Reads and validates everything; errors are exit-2 usage errors.
    pub fn load(args: &InputArgs) -> Result<Inputs, CliError> {
        let config = args.config_settings()?;
        let mut problems = Vec::new();
        let only_family = match args.ip_family.as_deref() {
            None => None,
            Some("ipv4") | Some("IPv4") | Some("4") => Some(IpFamily::V4),
            Some("ipv6") | Some("IPv6") | Some("6") => Some(IpFamily::V6),
            Some(other) => {
                problems.push(format!("--ip-family {other:?} is not ipv4 or ipv6"));
                None
            }
        };
        let mut local_addresses: Vec<IpNet> = Vec::new();
        for a in &args.local_addresses {
            // An interface address keeps its host bits (192.168.0.2/24), unlike a CIDR.
            let parsed = a
                .trim()
                .parse::<IpNet>()
                .ok()
                .or_else(|| parse_ip_sloppy(a.trim()).map(IpNet::from));
            match parsed {
                Some(n) => local_addresses.push(n),
                None => problems.push(format!("--local-address {a:?} is not an IP or IP/LEN")),
            }
        }
        let (nfacct, random_fully) = match args.iptables_capabilities.as_deref() {
            None => (true, true),
            Some(list) => {
                let mut n = false;
                let mut r = false;
                for cap in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    match cap {
                        "nfacct" => n = true,
                        "random-fully" => r = true,
                        "none" => {}
                        other => problems.push(format!(
                            "--iptables-capabilities: unknown capability {other:?} (nfacct, random-fully, none)"
                        )),
                    }
                }
                (n, r)
            }
        };
        if !problems.is_empty() {
            return Err(CliError::usage(problems.join("; ")));
        }

        let path = args
            .snapshot
            .as_ref()
            .ok_or_else(|| CliError::usage("--snapshot FILE is required"))?;
        let mut snap = snapshot::load_path(path).map_err(|e| CliError::usage(e.to_string()))?;
        // The merge put --hostname-override over the file's, lower-cased.
        let wanted = config.hostname_override.clone();
        let node_name = match snap
            .select_node(wanted.as_deref())
            .map_err(|e| CliError::usage(e.to_string()))?
        {
            Some(name) => name,
            None => {
                match local_addresses.iter().find(|a| !a.addr().is_loopback()) {
                    Some(a) => tracing::warn!(
                        "the snapshot holds no Node: the node IP comes from --local-address {}",
                        a.addr()
                    ),
                    None => tracing::warn!(
                        "the snapshot holds no Node and no --local-address was given: no node IP is known"
                    ),
                }
                wanted.unwrap_or_else(system_hostname)
            }
        };
        let n = snap.selector_services_without_any_slice();
        if n > 0 {
            tracing::warn!(
                "{n} Services have a selector but the snapshot holds no EndpointSlice at all: they render as having no endpoints (add endpointslices to the kubectl get)"
            );
        }
        let refuse_apply = snap.refuse_for_apply();
        let mut state = snap.state;
        state.set_lb_ip_mode_gate(config.feature_gate("LoadBalancerIPMode"));
        let node_info = state.node().cloned();
        let node = NodeContext {
            name: node_name.clone(),
            zone: node_info.as_ref().and_then(|n| n.zone.clone()),
            prefer_same_node: config.feature_gate("PreferSameTrafficDistribution"),
        };
        let families: Vec<IpFamily> = match only_family {
            Some(f) => vec![f],
            None => {
                let mut f = state.families();
                if f.is_empty() {
                    f.push(IpFamily::V4);
                }
                f
            }
        };
        let families = families
            .into_iter()
            .map(|f| {
                let mut s =
                    config.family_settings(f, &node_name, node_info.as_ref(), &local_addresses);
                s.nfacct_invalid = nfacct;
                s.nfacct_localhost = nfacct;
                s.random_fully = random_fully;
                s
            })
            .collect();
        Ok(Inputs {
            state,
            config,
            node,
            families,
            skipped: snap.skipped,
            refuse_apply,
            capabilities_given: args.iptables_capabilities.is_some(),
        })
    }
}

pub(crate) use crate::host::system_hostname;

impl InputArgs {
    /// The configuration: `--config` (upstream's file), then these flags over it,
    /// through the one merge every command uses ([`config::resolve`]).
    pub(crate) fn config_settings(&self) -> Result<Config, CliError> {
        let mut given: Vec<(&'static flags::FlagSpec, String)> = Vec::new();
        let mut push = |name: &str, value: String| {
            if let Some(spec) = flags::lookup(name) {
                given.push((spec, value));
            }
        };
        if let Some(m) = &self.mode {
            push("proxy-mode", m.clone());
        }
        if let Some(l) = &self.nftables_layout {
            push("nftables-layout", l.clone());
        }
        if let Some(c) = &self.cluster_cidr {
            push("cluster-cidr", c.clone());
        }
        if self.masquerade_all {
            push("masquerade-all", "true".into());
        }
        for a in &self.nodeport_addresses {
            push("nodeport-addresses", a.clone());
        }
        if let Some(h) = &self.hostname_override {
            push("hostname-override", h.clone());
        }
        let resolved = config::resolve(&config::Sources {
            file: self.config.as_deref(),
            flags: &given,
            precedence: config::Precedence::FlagsOverFile,
            healthz_port: None,
            metrics_port: None,
        })
        .map_err(|e| CliError::usage(e.to_string()))?;
        for note in &resolved.notes {
            tracing::warn!("{note}");
        }
        Ok(resolved.config)
    }
}

//! Settings: upstream's `KubeProxyConfiguration` file plus flags, validated once into
//! [`Config`]; and the per-family [`FamilySettings`] both renderers take.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::model::{IpFamily, NodeInfo};

/// Errors found while reading or validating the configuration; every problem is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML for a KubeProxyConfiguration.
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// Path.
        path: String,
        /// Cause.
        source: serde_yaml_ng::Error,
    },
    /// One or more values are invalid.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Proxy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// iptables-restore based.
    #[default]
    Iptables,
    /// nftables over netlink.
    Nftables,
}

impl Mode {
    /// Parses upstream's spelling ("" means iptables).
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "" | "iptables" => Some(Mode::Iptables),
            "nftables" => Some(Mode::Nftables),
            _ => None,
        }
    }

    /// Upstream's spelling, as served on `/proxyMode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// `detectLocalMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    /// By `clusterCIDR` (upstream default).
    #[default]
    ClusterCidr,
    /// By the Node's `spec.podCIDRs`.
    NodeCidr,
    /// By the input bridge interface.
    BridgeInterface,
    /// By an input interface name prefix.
    InterfaceNamePrefix,
}

/// How one family's proxier tells pod traffic from the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetector {
    /// No detector: the rules that need one are omitted.
    None,
    /// Source address in this CIDR.
    Cidr(IpNet),
    /// Arrived on this bridge.
    Bridge(String),
    /// Arrived on an interface with this name prefix.
    InterfacePrefix(String),
}

/// Where NodePorts are accepted, for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address (`-m addrtype --dst-type LOCAL` / `fib daddr type local`).
    All,
    /// These local addresses only (sorted, de-duplicated).
    Ips(Vec<IpAddr>),
}

/// Conntrack sysctl tuning (`conntrack.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// maxPerCore (0 = leave nf_conntrack_max alone).
    pub max_per_core: u32,
    /// min.
    pub min: u32,
    /// tcpEstablishedTimeout.
    pub tcp_established_timeout: Duration,
    /// tcpCloseWaitTimeout.
    pub tcp_close_wait_timeout: Duration,
    /// tcpBeLiberal.
    pub tcp_be_liberal: bool,
    /// udpTimeout.
    pub udp_timeout: Duration,
    /// udpStreamTimeout.
    pub udp_stream_timeout: Duration,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: Duration::from_secs(86400),
            tcp_close_wait_timeout: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}

/// Validated settings for the whole process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Proxy mode.
    pub mode: Mode,
    /// Node name override (else the hostname).
    pub hostname_override: Option<String>,
    /// Pod network CIDRs (at most one per family is used).
    pub cluster_cidrs: Vec<IpNet>,
    /// How pod traffic is recognised.
    pub detect_local_mode: DetectLocalMode,
    /// detectLocal.bridgeInterface.
    pub bridge_interface: String,
    /// detectLocal.interfaceNamePrefix.
    pub interface_name_prefix: String,
    /// Masquerade all service traffic.
    pub masquerade_all: bool,
    /// Bit of the fwmark used to flag packets for masquerade.
    pub masquerade_bit: u32,
    /// Accept NodePorts on 127.0.0.1 (iptables mode, IPv4).
    pub localhost_nodeports: bool,
    /// nodePortAddresses: CIDRs, or the single word `primary`.
    pub nodeport_addresses: Vec<String>,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Retry interval after a failed sync; also the canary poll interval.
    pub sync_period: Duration,
    /// healthzBindAddress.
    pub healthz_bind_address: SocketAddr,
    /// metricsBindAddress.
    pub metrics_bind_address: SocketAddr,
    /// Feature gates set explicitly.
    pub feature_gates: BTreeMap<String, bool>,
    /// Conntrack tuning.
    pub conntrack: ConntrackConfig,
    /// clientConnection.kubeconfig.
    pub kubeconfig: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Iptables,
            hostname_override: None,
            cluster_cidrs: Vec::new(),
            detect_local_mode: DetectLocalMode::ClusterCidr,
            bridge_interface: String::new(),
            interface_name_prefix: String::new(),
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_nodeports: true,
            nodeport_addresses: Vec::new(),
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            healthz_bind_address: SocketAddr::from(([0, 0, 0, 0], 10256)),
            metrics_bind_address: SocketAddr::from(([127, 0, 0, 1], 10249)),
            feature_gates: BTreeMap::new(),
            conntrack: ConntrackConfig::default(),
            kubeconfig: None,
        }
    }
}

/// The on-disk `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1); only the
/// fields kproxy uses. Unknown fields are accepted, as upstream's lenient decoding is.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FileConfig {
    kind: Option<String>,
    mode: Option<String>,
    hostname_override: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    detect_local_mode: Option<String>,
    detect_local: Option<FileDetectLocal>,
    masquerade_all: Option<bool>,
    iptables: Option<FileBackend>,
    nftables: Option<FileBackend>,
    node_port_addresses: Option<Vec<String>>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    feature_gates: Option<BTreeMap<String, bool>>,
    conntrack: Option<FileConntrack>,
    client_connection: Option<FileClientConnection>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FileDetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FileBackend {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i64>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FileConntrack {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FileClientConnection {
    kubeconfig: Option<String>,
}

/// Parses a Go duration string such as `1s`, `500ms`, `1m30s`, `1h0m0s`, `0`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Some(Duration::from_secs_f64(total))
}

fn parse_bind(s: &str, port_default: u16) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    parse_ip_sloppy(s).map(|ip| SocketAddr::new(ip, port_default))
}

impl Config {
    /// Reads a KubeProxyConfiguration file on top of the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses KubeProxyConfiguration YAML text on top of the defaults.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let file: FileConfig =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: origin.to_string(),
                source,
            })?;
        let mut cfg = Config::default();
        let mut problems = Vec::new();
        if let Some(kind) = &file.kind {
            if kind != "KubeProxyConfiguration" {
                problems.push(format!("kind is {kind:?}, want KubeProxyConfiguration"));
            }
        }
        if let Some(m) = &file.mode {
            match Mode::parse(m) {
                Some(mode) => cfg.mode = mode,
                None => problems.push(format!("mode {m:?} is not iptables or nftables")),
            }
        }
        cfg.hostname_override = file.hostname_override.filter(|s| !s.is_empty());
        if let Some(c) = &file.cluster_cidr {
            cfg.set_cluster_cidrs(c, &mut problems);
        }
        if let Some(m) = &file.detect_local_mode {
            cfg.set_detect_local_mode(m, &mut problems);
        }
        if let Some(d) = file.detect_local {
            cfg.bridge_interface = d.bridge_interface.unwrap_or_default();
            cfg.interface_name_prefix = d.interface_name_prefix.unwrap_or_default();
        }
        if let Some(v) = file.masquerade_all {
            cfg.masquerade_all = v;
        }
        let backend = match cfg.mode {
            Mode::Iptables => file.iptables,
            Mode::Nftables => file.nftables,
        };
        let mut sync = file.sync_period;
        let mut min_sync = file.min_sync_period;
        if let Some(b) = backend {
            if let Some(v) = b.masquerade_all {
                cfg.masquerade_all |= v;
            }
            if let Some(bit) = b.masquerade_bit {
                match u32::try_from(bit) {
                    Ok(bit) if bit <= 31 => cfg.masquerade_bit = bit,
                    _ => problems.push(format!("masqueradeBit {bit} is not in 0-31")),
                }
            }
            if let Some(v) = b.localhost_node_ports {
                cfg.localhost_nodeports = v;
            }
            sync = b.sync_period.or(sync);
            min_sync = b.min_sync_period.or(min_sync);
        }
        if let Some(s) = sync {
            match parse_duration(&s) {
                // Upstream's defaulting: 0s (kubeadm writes it) means the default.
                Some(d) if d.is_zero() => {}
                Some(d) => cfg.sync_period = d,
                None => problems.push(format!("syncPeriod {s:?} is not a duration")),
            }
        }
        if let Some(s) = min_sync {
            match parse_duration(&s) {
                Some(d) => cfg.min_sync_period = d,
                None => problems.push(format!("minSyncPeriod {s:?} is not a duration")),
            }
        }
        if let Some(n) = file.node_port_addresses {
            cfg.nodeport_addresses = n;
        }
        if let Some(s) = file.healthz_bind_address.filter(|s| !s.is_empty()) {
            match parse_bind(&s, 10256) {
                Some(a) => cfg.healthz_bind_address = a,
                None => problems.push(format!("healthzBindAddress {s:?} is not IP:port")),
            }
        }
        if let Some(s) = file.metrics_bind_address.filter(|s| !s.is_empty()) {
            match parse_bind(&s, 10249) {
                Some(a) => cfg.metrics_bind_address = a,
                None => problems.push(format!("metricsBindAddress {s:?} is not IP:port")),
            }
        }
        if let Some(g) = file.feature_gates {
            cfg.feature_gates = g;
        }
        if let Some(c) = file.conntrack {
            let ct = &mut cfg.conntrack;
            if let Some(v) = c.max_per_core {
                ct.max_per_core = u32::try_from(v).unwrap_or_else(|_| {
                    problems.push(format!("conntrack.maxPerCore {v} is negative"));
                    0
                });
            }
            if let Some(v) = c.min {
                ct.min = u32::try_from(v).unwrap_or_else(|_| {
                    problems.push(format!("conntrack.min {v} is negative"));
                    0
                });
            }
            for (field, val, slot) in [
                (
                    "tcpEstablishedTimeout",
                    c.tcp_established_timeout,
                    &mut ct.tcp_established_timeout,
                ),
                (
                    "tcpCloseWaitTimeout",
                    c.tcp_close_wait_timeout,
                    &mut ct.tcp_close_wait_timeout,
                ),
                ("udpTimeout", c.udp_timeout, &mut ct.udp_timeout),
                (
                    "udpStreamTimeout",
                    c.udp_stream_timeout,
                    &mut ct.udp_stream_timeout,
                ),
            ] {
                if let Some(s) = val {
                    match parse_duration(&s) {
                        Some(d) => *slot = d,
                        None => problems.push(format!("conntrack.{field} {s:?} is not a duration")),
                    }
                }
            }
            if let Some(v) = c.tcp_be_liberal {
                ct.tcp_be_liberal = v;
            }
        }
        cfg.kubeconfig = file
            .client_connection
            .and_then(|c| c.kubeconfig)
            .filter(|s| !s.is_empty());
        cfg.validate_into(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Sets `clusterCIDR` from its comma-separated form.
    pub fn set_cluster_cidrs(&mut self, value: &str, problems: &mut Vec<String>) {
        self.cluster_cidrs.clear();
        for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_cidr_sloppy(part) {
                Some(c) => self.cluster_cidrs.push(c),
                None => problems.push(format!("clusterCIDR entry {part:?} is not a CIDR")),
            }
        }
    }

    /// Sets `detectLocalMode` from upstream's spelling.
    pub fn set_detect_local_mode(&mut self, value: &str, problems: &mut Vec<String>) {
        self.detect_local_mode = match value {
            "" | "ClusterCIDR" => DetectLocalMode::ClusterCidr,
            "NodeCIDR" => DetectLocalMode::NodeCidr,
            "BridgeInterface" => DetectLocalMode::BridgeInterface,
            "InterfaceNamePrefix" => DetectLocalMode::InterfaceNamePrefix,
            other => {
                problems.push(format!("detectLocalMode {other:?} is not supported"));
                return;
            }
        };
    }

    /// Checks cross-field rules; call after applying flags too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.validate_into(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate_into(&self, problems: &mut Vec<String>) {
        if self.masquerade_bit > 31 {
            problems.push(format!(
                "masqueradeBit {} is not in 0-31",
                self.masquerade_bit
            ));
        }
        if self.detect_local_mode == DetectLocalMode::BridgeInterface
            && self.bridge_interface.is_empty()
        {
            problems
                .push("detectLocalMode BridgeInterface needs detectLocal.bridgeInterface".into());
        }
        if self.detect_local_mode == DetectLocalMode::InterfaceNamePrefix
            && self.interface_name_prefix.is_empty()
        {
            problems.push(
                "detectLocalMode InterfaceNamePrefix needs detectLocal.interfaceNamePrefix".into(),
            );
        }
        let mut per_family = BTreeMap::new();
        for c in &self.cluster_cidrs {
            *per_family.entry(IpFamily::of_net(c)).or_insert(0) += 1;
        }
        if per_family.values().any(|n| *n > 1) {
            problems.push("clusterCIDR has more than one CIDR of a family".into());
        }
        for a in &self.nodeport_addresses {
            if a == "primary" {
                if self.nodeport_addresses.len() > 1 {
                    problems
                        .push("nodePortAddresses \"primary\" cannot be combined with CIDRs".into());
                }
            } else if parse_cidr_sloppy(a).is_none() {
                problems.push(format!("nodePortAddresses entry {a:?} is not a CIDR"));
            }
        }
        if self.sync_period.is_zero() {
            problems.push("syncPeriod must be greater than 0".into());
        }
        if self.min_sync_period > self.sync_period {
            problems.push("minSyncPeriod must not exceed syncPeriod".into());
        }
    }

    /// A feature gate's value: explicit setting, else the default of the Kubernetes
    /// release kproxy follows.
    pub fn feature_gate(&self, name: &str) -> bool {
        if let Some(v) = self.feature_gates.get(name) {
            return *v;
        }
        matches!(
            name,
            "PreferSameTrafficDistribution" | "LoadBalancerIPMode" | "ServiceTrafficDistribution"
        )
    }

    /// The local-traffic detector for one family.
    pub fn local_detector(&self, family: IpFamily, node: Option<&NodeInfo>) -> LocalDetector {
        match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => self
                .cluster_cidrs
                .iter()
                .find(|c| IpFamily::of_net(c) == family)
                .map(|c| LocalDetector::Cidr(*c))
                .unwrap_or(LocalDetector::None),
            DetectLocalMode::NodeCidr => node
                .and_then(|n| n.pod_cidrs.iter().find(|c| IpFamily::of_net(c) == family))
                .map(|c| LocalDetector::Cidr(*c))
                .unwrap_or(LocalDetector::None),
            DetectLocalMode::BridgeInterface => {
                LocalDetector::Bridge(self.bridge_interface.clone())
            }
            DetectLocalMode::InterfaceNamePrefix => {
                LocalDetector::InterfacePrefix(self.interface_name_prefix.clone())
            }
        }
    }

    /// The fwmark value used for masquerade.
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }

    /// Builds one family's renderer settings from the config and the node's view of
    /// itself (its Node object, if known, and its interface addresses).
    pub fn family_settings(
        &self,
        family: IpFamily,
        node_name: &str,
        node: Option<&NodeInfo>,
        local_addresses: &[IpNet],
    ) -> FamilySettings {
        let node_ip = node.and_then(|n| n.primary_ip(family)).or_else(|| {
            local_addresses
                .iter()
                .map(|n| n.addr())
                .find(|ip| family.contains(ip) && !ip.is_loopback())
        });
        let cidrs: Vec<IpNet> = if self.nodeport_addresses.iter().any(|a| a == "primary") {
            node_ip.map(IpNet::from).into_iter().collect()
        } else {
            self.nodeport_addresses
                .iter()
                .filter_map(|a| parse_cidr_sloppy(a))
                .filter(|c| IpFamily::of_net(c) == family)
                .collect()
        };
        let match_all = cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0);
        let nodeport_addresses = if match_all {
            NodePortAddresses::All
        } else {
            let mut ips: Vec<IpAddr> = local_addresses
                .iter()
                .map(|n| n.addr())
                .filter(|ip| family.contains(ip) && cidrs.iter().any(|c| c.contains(ip)))
                .collect();
            ips.sort();
            ips.dedup();
            NodePortAddresses::Ips(ips)
        };
        // Upstream turns localhost NodePorts off unless the NodePort addresses include an
        // IPv4 loopback address, and always for IPv6 (there is no route_localnet there).
        let loopback_allowed = match &nodeport_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_loopback()),
        };
        let localhost_nodeports =
            self.localhost_nodeports && family == IpFamily::V4 && loopback_allowed;
        let mark = self.masquerade_mark();
        FamilySettings {
            family,
            node_name: node_name.to_string(),
            node_ip,
            local_detector: self.local_detector(family, node),
            masquerade_all: self.masquerade_all,
            masquerade_mark: mark,
            mark_text: format!("0x{mark:08x}"),
            nodeport_addresses,
            localhost_nodeports,
            nfacct_invalid: true,
            nfacct_localhost: true,
            tcp_be_liberal: self.conntrack.tcp_be_liberal,
            random_fully: true,
            large_cluster_threshold: 1000,
        }
    }
}

/// One family's proxier settings: everything the renderers need besides cluster state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySettings {
    /// The family.
    pub family: IpFamily,
    /// This node's name.
    pub node_name: String,
    /// This node's primary IP (used for LB source-range "allow from node").
    pub node_ip: Option<IpAddr>,
    /// Local-traffic detector.
    pub local_detector: LocalDetector,
    /// masqueradeAll.
    pub masquerade_all: bool,
    /// Masquerade mark value.
    pub masquerade_mark: u32,
    /// The mark as written in rules: `0x%08x` in production; upstream's tests use `0x4000`.
    pub mark_text: String,
    /// Where NodePorts are accepted.
    pub nodeport_addresses: NodePortAddresses,
    /// Localhost NodePorts in effect (iptables, IPv4 only).
    pub localhost_nodeports: bool,
    /// nfacct counter `ct_state_invalid_dropped_pkts` available (iptables).
    pub nfacct_invalid: bool,
    /// nfacct counter `localhost_nps_accepted_pkts` available (iptables).
    pub nfacct_localhost: bool,
    /// `nf_conntrack_tcp_be_liberal` was set at start (no INVALID drop rule).
    pub tcp_be_liberal: bool,
    /// iptables supports `--random-fully`.
    pub random_fully: bool,
    /// Endpoint count above which iptables rules lose their per-endpoint comments.
    pub large_cluster_threshold: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h0m0s"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("abc"), None);
        assert_eq!(parse_duration("5"), None);
    }

    #[test]
    fn file_config_and_problems() {
        let cfg = Config::from_yaml(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.0.0.0/8,fd00:10::/64\nnftables:\n  minSyncPeriod: 0s\n  masqueradeBit: 15\nnodePortAddresses: [primary]\n",
            "test",
        )
        .unwrap();
        assert_eq!(cfg.mode, Mode::Nftables);
        assert_eq!(cfg.min_sync_period, Duration::ZERO);
        assert_eq!(cfg.masquerade_mark(), 0x8000);
        assert_eq!(cfg.cluster_cidrs.len(), 2);
        let err = Config::from_yaml(
            "mode: ipvs\nclusterCIDR: banana\niptables:\n  masqueradeBit: 40\n",
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ipvs") && err.contains("banana") && err.contains("40"),
            "{err}"
        );
    }

    #[test]
    fn nodeport_addresses_per_family() {
        let mut cfg = Config {
            nodeport_addresses: vec!["192.168.0.0/24".into(), "2001:db8::/64".into()],
            ..Config::default()
        };
        let addrs: Vec<IpNet> = [
            "127.0.0.1/8",
            "192.168.0.2/24",
            "192.168.1.2/24",
            "2001:db8::1/64",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let s = cfg.family_settings(IpFamily::V4, "n", None, &addrs);
        assert_eq!(
            s.nodeport_addresses,
            NodePortAddresses::Ips(vec!["192.168.0.2".parse().unwrap()])
        );
        assert!(!s.localhost_nodeports);
        cfg.nodeport_addresses.clear();
        let s = cfg.family_settings(IpFamily::V4, "n", None, &addrs);
        assert_eq!(s.nodeport_addresses, NodePortAddresses::All);
        assert!(s.localhost_nodeports);
        assert_eq!(s.node_ip, Some("192.168.0.2".parse().unwrap()));
        assert_eq!(s.mark_text, "0x00004000");
    }
}

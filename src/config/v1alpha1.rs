//! The on-disk `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1) as a
//! document: every upstream field, `null`s and missing fields as `None`, upstream's
//! defaulting, and the YAML written by `--write-config-to`. Validation and the typed
//! settings the proxy runs on live in [`super::Config`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{GoDuration, TimeOrNanos};

/// The only apiVersion upstream kube-proxy 1.34/1.35 reads.
pub(crate) const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The kind.
pub(crate) const KIND: &str = "KubeProxyConfiguration";

/// A KubeProxyConfiguration as written in a file (or produced from flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Document {
    pub(crate) api_version: Option<String>,
    pub kind: Option<String>,
    pub(crate) bind_address: Option<String>,
    pub(crate) bind_address_hard_fail: Option<bool>,
    pub(crate) client_connection: ClientConnection,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub(crate) config_sync_period: Option<GoDuration>,
    pub conntrack: Conntrack,
    pub(crate) detect_local: DetectLocal,
    pub(crate) detect_local_mode: Option<String>,
    pub(crate) enable_profiling: Option<bool>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub healthz_bind_address: Option<String>,
    pub(crate) hostname_override: Option<String>,
    pub iptables: Iptables,
    pub ipvs: Ipvs,
    pub logging: Logging,
    pub(crate) metrics_bind_address: Option<String>,
    pub mode: Option<String>,
    pub nftables: Nftables,
    pub(crate) node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub(crate) port_range: Option<String>,
    pub(crate) show_hidden_metrics_for_version: Option<String>,
    pub winkernel: Winkernel,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) windows_run_as_service: Option<bool>,
    /// kproxy's own settings. Upstream's lenient decoding ignores an unknown
    /// top-level field, so one file serves both programs.
    #[serde(skip_serializing_if = "Kproxy::is_empty")]
    pub kproxy: Kproxy,
    /// Fields neither upstream nor kproxy knows (warned about, as upstream's lenient
    /// decoding logs them).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_yaml_ng::Value>,
}

/// clientConnection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ClientConnection {
    pub(crate) accept_content_types: Option<String>,
    pub burst: Option<i32>,
    pub(crate) content_type: Option<String>,
    pub kubeconfig: Option<String>,
    pub qps: Option<f32>,
}

/// conntrack.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub(crate) max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_be_liberal: Option<bool>,
    pub(crate) tcp_close_wait_timeout: Option<GoDuration>,
    pub(crate) tcp_established_timeout: Option<GoDuration>,
    pub(crate) udp_stream_timeout: Option<GoDuration>,
    pub(crate) udp_timeout: Option<GoDuration>,
}

/// detectLocal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct DetectLocal {
    pub(crate) bridge_interface: Option<String>,
    pub(crate) interface_name_prefix: Option<String>,
}

/// iptables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Iptables {
    pub(crate) localhost_node_ports: Option<bool>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: Option<GoDuration>,
    pub sync_period: Option<GoDuration>,
}

/// ipvs (accepted and kept; kproxy has no IPVS mode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ipvs {
    #[serde(rename = "excludeCIDRs")]
    pub(crate) exclude_cidrs: Option<Vec<String>>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "strictARP")]
    pub(crate) strict_arp: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub(crate) tcp_fin_timeout: Option<GoDuration>,
    pub(crate) tcp_timeout: Option<GoDuration>,
    pub(crate) udp_timeout: Option<GoDuration>,
}

/// nftables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Nftables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: Option<GoDuration>,
    pub sync_period: Option<GoDuration>,
}

/// winkernel (Windows only; accepted and kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Winkernel {
    #[serde(rename = "enableDSR")]
    pub(crate) enable_dsr: Option<bool>,
    pub(crate) forward_health_check_vip: Option<bool>,
    pub(crate) network_name: Option<String>,
    pub(crate) root_hns_endpoint_name: Option<String>,
    pub(crate) source_vip: Option<String>,
}

/// logging (component-base LoggingConfiguration).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    pub(crate) flush_frequency: Option<TimeOrNanos>,
    pub format: Option<String>,
    /// Format-specific options (`json.infoBufferSize`, `text.splitStream`, …): kept as
    /// written; kproxy writes one stream and buffers nothing.
    pub options: Option<serde_yaml_ng::Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModuleItem>>,
}

/// One `--vmodule` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VModuleItem {
    pub(crate) file_pattern: String,
    pub verbosity: u32,
}

/// kproxy's own section (`kproxy:` at the top level).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Kproxy {
    /// `kproxy.shadow`: shadow mode (as `--shadow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    /// `nftablesLayout`: `upstream` (default) or `maps` (see docs/nftables-maps-layout.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) nftables_layout: Option<String>,
    /// Unknown keys inside the section are errors: the section is ours to define.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_yaml_ng::Value>,
}

impl Kproxy {
    fn is_empty(&self) -> bool {
        *self == Kproxy::default()
    }
}

fn set<T>(slot: &mut Option<T>, value: T) {
    if slot.is_none() {
        *slot = Some(value);
    }
}

fn set_zero_duration(slot: &mut Option<GoDuration>, value: Duration) {
    if slot.is_none_or(|d| d.0.is_zero()) {
        *slot = Some(GoDuration(value));
    }
}

fn set_empty_string(slot: &mut Option<String>, value: &str) {
    if slot.as_deref().is_none_or(str::is_empty) {
        *slot = Some(value.to_string());
    }
}

/// Appends `:port` to an address that has none (upstream's AppendPortIfNeeded).
pub(crate) fn append_port_if_needed(addr: &str, port: u16) -> String {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return addr.to_string();
    }
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) => addr.to_string(),
    }
}

impl Document {
    /// Upstream's `SetDefaults_KubeProxyConfiguration`: zero durations, empty strings
    /// and nulls become the defaults. Non-pointer zeros that upstream keeps (e.g.
    /// `conntrack.udpTimeout: 0s`, "leave as is") stay zero.
    pub(crate) fn apply_defaults(&mut self) {
        set_empty_string(&mut self.bind_address, "0.0.0.0");
        let v6 = self
            .bind_address
            .as_deref()
            .and_then(crate::model::ip::parse_ip_sloppy)
            .is_some_and(|ip| ip.is_ipv6());
        let (healthz_host, metrics_host) = if v6 {
            ("[::]", "[::1]")
        } else {
            ("0.0.0.0", "127.0.0.1")
        };
        match self.healthz_bind_address.as_deref() {
            None | Some("") => self.healthz_bind_address = Some(format!("{healthz_host}:10256")),
            Some(a) => self.healthz_bind_address = Some(append_port_if_needed(a, 10256)),
        }
        match self.metrics_bind_address.as_deref() {
            None | Some("") => self.metrics_bind_address = Some(format!("{metrics_host}:10249")),
            Some(a) => self.metrics_bind_address = Some(append_port_if_needed(a, 10249)),
        }
        set(&mut self.oom_score_adj, -999);
        set(&mut self.bind_address_hard_fail, false);
        set(&mut self.enable_profiling, false);
        set(&mut self.show_hidden_metrics_for_version, String::new());
        set(&mut self.hostname_override, String::new());
        set(&mut self.mode, String::new());
        set(&mut self.detect_local_mode, String::new());
        set(&mut self.cluster_cidr, String::new());
        set(&mut self.port_range, String::new());
        set(&mut self.feature_gates, BTreeMap::new());
        set_zero_duration(&mut self.config_sync_period, Duration::from_secs(15 * 60));

        let cc = &mut self.client_connection;
        set(&mut cc.accept_content_types, String::new());
        set_empty_string(&mut cc.content_type, "application/vnd.kubernetes.protobuf");
        if cc.qps.is_none_or(|q| q == 0.0) {
            cc.qps = Some(5.0);
        }
        if cc.burst.is_none_or(|b| b == 0) {
            cc.burst = Some(10);
        }
        set(&mut cc.kubeconfig, String::new());

        let ipt = &mut self.iptables;
        set(&mut ipt.masquerade_bit, 14);
        set(&mut ipt.masquerade_all, false);
        set(&mut ipt.localhost_node_ports, true);
        set_zero_duration(&mut ipt.sync_period, Duration::from_secs(30));
        set_zero_duration(&mut ipt.min_sync_period, Duration::from_secs(1));

        let nft = &mut self.nftables;
        set(&mut nft.masquerade_bit, 14);
        set(&mut nft.masquerade_all, false);
        set_zero_duration(&mut nft.sync_period, Duration::from_secs(30));
        set_zero_duration(&mut nft.min_sync_period, Duration::from_secs(1));

        let ipvs = &mut self.ipvs;
        set_zero_duration(&mut ipvs.sync_period, Duration::from_secs(30));
        set(&mut ipvs.min_sync_period, GoDuration::default());
        set(&mut ipvs.scheduler, String::new());
        set(&mut ipvs.strict_arp, false);
        set(&mut ipvs.tcp_timeout, GoDuration::default());
        set(&mut ipvs.tcp_fin_timeout, GoDuration::default());
        set(&mut ipvs.udp_timeout, GoDuration::default());

        let ct = &mut self.conntrack;
        set(&mut ct.max_per_core, 32 * 1024);
        set(&mut ct.min, 128 * 1024);
        set(
            &mut ct.tcp_established_timeout,
            GoDuration(Duration::from_secs(24 * 3600)),
        );
        set(
            &mut ct.tcp_close_wait_timeout,
            GoDuration(Duration::from_secs(3600)),
        );
        set(&mut ct.tcp_be_liberal, false);
        set(&mut ct.udp_timeout, GoDuration::default());
        set(&mut ct.udp_stream_timeout, GoDuration::default());

        let dl = &mut self.detect_local;
        set(&mut dl.bridge_interface, String::new());
        set(&mut dl.interface_name_prefix, String::new());

        let w = &mut self.winkernel;
        set(&mut w.enable_dsr, false);
        set(&mut w.forward_health_check_vip, false);
        set(&mut w.network_name, String::new());
        set(&mut w.root_hns_endpoint_name, String::new());
        set(&mut w.source_vip, String::new());

        // component-base logging defaults.
        let l = &mut self.logging;
        set_empty_string(&mut l.format, "text");
        if l.flush_frequency.is_none_or(|f| f.0.is_zero()) {
            l.flush_frequency = Some(TimeOrNanos(Duration::from_secs(5)));
        }
        set(&mut l.verbosity, 0);
        set(&mut l.vmodule, Vec::new());

        self.api_version = Some(API_VERSION.into());
        self.kind = Some(KIND.into());
    }

    /// The YAML `--write-config-to` writes: every field, upstream's names.
    pub(crate) fn to_yaml(&self) -> Result<String, serde_yaml_ng::Error> {
        serde_yaml_ng::to_string(self)
    }
}

//! Settings: upstream's `KubeProxyConfiguration` file and kube-proxy's flags, merged
//! once ([`resolve`]) into the validated [`Config`] the proxy runs on; and the
//! per-family [`FamilySettings`] both renderers take.
//!
//! The merge, for every command: the file (or nothing) is decoded into a
//! [`v1alpha1::Document`], upstream's defaulting fills it, the flags edit it, and the
//! result is validated field by field into a [`Config`]. Which flags apply over a file
//! is the [`Precedence`] (upstream's for the daemon, flags-over-file for the one-shot
//! commands).

pub mod duration;
mod family;
pub mod flags;
pub mod gates;
pub mod v1alpha1;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use crate::model::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::model::IpFamily;
use flags::{FlagError, FlagSpec, Support, WithConfigFile};
use v1alpha1::Document;

pub use duration::parse_go_duration;
pub use family::FamilySettings;

/// One invalid configuration field, named by its path in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `iptables.syncPeriod`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Errors found while reading or validating the configuration; every problem is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML of the right shape (a wrong type names its field).
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The file is not a v1alpha1 KubeProxyConfiguration.
    #[error("config file {path}: {problem}")]
    NotKubeProxyConfiguration {
        /// Path.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// One or more values are invalid.
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// A bad flag.
    #[error(transparent)]
    Flag(#[from] FlagError),
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

    /// The other mode (whose leftovers a start-up removes).
    pub fn other(self) -> Mode {
        match self {
            Mode::Iptables => Mode::Nftables,
            Mode::Nftables => Mode::Iptables,
        }
    }
}

/// Which nftables table layout nftables mode writes (`--nftables-layout`,
/// `kproxy.nftablesLayout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NftablesLayout {
    /// Upstream's `kube-proxy` table, byte for byte.
    #[default]
    Upstream,
    /// kproxy's `kproxy` table of sets and data maps (issue #14).
    Maps,
}

impl NftablesLayout {
    /// Parses the flag's spelling ("" means upstream).
    pub(crate) fn parse(s: &str) -> Option<NftablesLayout> {
        match s {
            "" | "upstream" => Some(NftablesLayout::Upstream),
            "maps" => Some(NftablesLayout::Maps),
            _ => None,
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
pub(crate) enum LocalDetector {
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
    pub(crate) max_per_core: u32,
    /// min.
    pub min: u32,
    /// tcpEstablishedTimeout.
    pub(crate) tcp_established_timeout: Duration,
    /// tcpCloseWaitTimeout.
    pub(crate) tcp_close_wait_timeout: Duration,
    /// tcpBeLiberal.
    pub tcp_be_liberal: bool,
    /// udpTimeout.
    pub(crate) udp_timeout: Duration,
    /// udpStreamTimeout.
    pub(crate) udp_stream_timeout: Duration,
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

/// `logging.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated settings for the whole process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Proxy mode.
    pub mode: Mode,
    /// The nftables table layout (nftables mode only).
    pub nftables_layout: NftablesLayout,
    /// Node name override (lower-cased; else the hostname).
    pub hostname_override: Option<String>,
    /// bindAddress: the node's primary IP when set to a specific address.
    pub bind_address: Option<IpAddr>,
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
    /// nodePortAddresses: CIDRs, or the single word `primary` (the nftables default).
    pub nodeport_addresses: Vec<String>,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Retry interval after a failed sync; also the canary poll interval.
    pub sync_period: Duration,
    /// healthzBindAddress (`None`: disabled).
    pub healthz_bind_address: Option<SocketAddr>,
    /// metricsBindAddress (`None`: disabled).
    pub metrics_bind_address: Option<SocketAddr>,
    /// bindAddressHardFail: a bind failure is fatal.
    pub bind_address_hard_fail: bool,
    /// oomScoreAdj.
    pub oom_score_adj: i32,
    /// Feature gates set explicitly.
    pub feature_gates: BTreeMap<String, bool>,
    /// Conntrack tuning.
    pub conntrack: ConntrackConfig,
    /// clientConnection.kubeconfig.
    pub kubeconfig: Option<String>,
    /// logging.format.
    pub log_format: LogFormat,
    /// logging.verbosity (`-v`).
    pub verbosity: u32,
    /// The effective configuration document (`--write-config-to`, `/configz`).
    pub document: Document,
}

impl Default for Config {
    fn default() -> Self {
        let mut doc = Document::default();
        doc.apply_defaults();
        match Config::from_document(doc, false) {
            Ok((cfg, _)) => cfg,
            // Upstream's defaults are valid by construction (the unit test
            // `defaults_are_valid` proves it); this arm exists only because
            // validation is fallible in general.
            Err(_) => Config::fallback_defaults(),
        }
    }
}

/// Which flags win over a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precedence {
    /// kube-proxy's: with `--config`, the file wins; only `--hostname-override`, the
    /// logging flags and the process flags still apply (the others are named in one
    /// warning).
    Upstream,
    /// The one-shot commands' (render, apply, trace): flags override the file.
    FlagsOverFile,
}

/// What [`resolve`] merges.
#[derive(Debug, Clone)]
pub(crate) struct Sources<'a> {
    /// `--config`.
    pub file: Option<&'a Path>,
    /// Configuration flags in the order given.
    pub flags: &'a [(&'static FlagSpec, String)],
    /// Which flags win.
    pub(crate) precedence: Precedence,
    /// Deprecated `--healthz-port` (applies only without a config file, as upstream).
    pub(crate) healthz_port: Option<i32>,
    /// Deprecated `--metrics-port`.
    pub(crate) metrics_port: Option<i32>,
}

impl<'a> Sources<'a> {
    /// Only flags, no file (the unit tests' way in).
    #[cfg(test)]
    pub(crate) fn flags(flags: &'a [(&'static FlagSpec, String)], precedence: Precedence) -> Self {
        Sources {
            file: None,
            flags,
            precedence,
            healthz_port: None,
            metrics_port: None,
        }
    }
}

/// The merged configuration and the notes to log once at start-up (ignored flags and
/// fields, lenient decoding).
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// The settings.
    pub config: Config,
    /// One line each.
    pub(crate) notes: Vec<String>,
}

/// The one merge of flags over the config file, for every command.
pub(crate) fn resolve(src: &Sources<'_>) -> Result<Resolved, ConfigError> {
    let mut notes = Vec::new();
    let mut doc = match src.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let (doc, lenient) = load_document(&text, &path.display().to_string())?;
            notes.extend(lenient);
            doc
        }
        None => Document::default(),
    };
    doc.apply_defaults();
    let file_given = src.file.is_some();
    let mut ignored = Vec::new();
    let mut lists = Vec::new();
    // Mode-dependent flags go last, once the mode is known.
    let ordered = src
        .flags
        .iter()
        .filter(|(s, _)| !flags::mode_dependent(s))
        .chain(src.flags.iter().filter(|(s, _)| flags::mode_dependent(s)));
    for (spec, value) in ordered {
        if file_given
            && src.precedence == Precedence::Upstream
            && spec.with_config == WithConfigFile::Ignored
        {
            ignored.push(format!("--{}", spec.name));
            continue;
        }
        if spec.name == "hostname-override" && value.trim().is_empty() {
            return Err(ConfigError::Invalid(vec![FieldError {
                field: "--hostname-override".into(),
                message: "empty hostname-override is invalid".into(),
            }]));
        }
        flags::apply(&mut doc, spec, value, &mut lists);
        if let Support::Ignored(why) = spec.support {
            notes.push(format!(
                "flag --{} is accepted but has no effect: {why}",
                spec.name
            ));
        }
    }
    if !ignored.is_empty() {
        ignored.dedup();
        notes.push(format!(
            "flags ignored because --config is given (as kube-proxy does): {}",
            ignored.join(", ")
        ));
    }
    if !file_given {
        // Upstream's addressFromDeprecatedFlags: the deprecated port flags (defaults
        // 10256/10249) give a bare IP its port; port 0 disables the server.
        for (port, default, slot) in [
            (src.healthz_port, 10256, &mut doc.healthz_bind_address),
            (src.metrics_port, 10249, &mut doc.metrics_bind_address),
        ] {
            let port = port.unwrap_or(default);
            let current = slot.clone().unwrap_or_default();
            *slot = Some(if port == 0 {
                String::new()
            } else if current.is_empty() {
                current
            } else {
                v1alpha1::append_port_if_needed(&current, port as u16)
            });
        }
    }
    let (config, more) = Config::from_document(doc, true)?;
    notes.extend(more);
    Ok(Resolved { config, notes })
}

/// Decodes a KubeProxyConfiguration file: YAML (or JSON), a UTF-8 BOM allowed,
/// apiVersion and kind checked as upstream's decoder does. Returns the document and a
/// note for every field upstream's strict decoding would refuse (it then decodes
/// leniently and logs, as kproxy does).
pub(crate) fn load_document(
    text: &str,
    origin: &str,
) -> Result<(Document, Vec<String>), ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let not_kpc = |problem: String| ConfigError::NotKubeProxyConfiguration {
        path: origin.to_string(),
        problem,
    };
    let doc: Document = serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
        path: origin.to_string(),
        source,
    })?;
    match (doc.api_version.as_deref(), doc.kind.as_deref()) {
        (None | Some(""), _) => {
            return Err(not_kpc(format!(
                "apiVersion is missing (want {})",
                v1alpha1::API_VERSION
            )))
        }
        (_, None | Some("")) => {
            return Err(not_kpc(format!(
                "kind is missing (want {})",
                v1alpha1::KIND
            )))
        }
        (Some(v), Some(k)) if v != v1alpha1::API_VERSION || k != v1alpha1::KIND => {
            return Err(not_kpc(format!(
                "no kind {k:?} is registered for version {v:?} (want {} {})",
                v1alpha1::KIND,
                v1alpha1::API_VERSION
            )))
        }
        _ => {}
    }
    let mut notes = Vec::new();
    if !doc.unknown.is_empty() {
        let names: Vec<&str> = doc.unknown.keys().map(String::as_str).collect();
        notes.push(format!(
            "config file {origin}: unknown fields ignored (lenient decoding, as kube-proxy): {}",
            names.join(", ")
        ));
    }
    if !doc.kproxy.unknown.is_empty() {
        let names: Vec<String> = doc
            .kproxy
            .unknown
            .keys()
            .map(|k| format!("kproxy.{k}"))
            .collect();
        return Err(ConfigError::Invalid(
            names
                .into_iter()
                .map(|field| FieldError {
                    field,
                    message: "unknown field".into(),
                })
                .collect(),
        ));
    }
    Ok((doc, notes))
}

fn field(errors: &mut Vec<FieldError>, field: &str, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.to_string(),
        message: message.into(),
    });
}

/// Parses a healthz/metrics bind address after defaulting: `IP:port`; "" disables.
fn parse_bind(errors: &mut Vec<FieldError>, name: &str, value: &str) -> Option<SocketAddr> {
    if value.is_empty() {
        return None;
    }
    match value.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        Ok(_) => {
            field(
                errors,
                name,
                format!("{value:?}: port must be between 1 and 65535"),
            );
            None
        }
        Err(_) => {
            field(errors, name, format!("{value:?} must be IP:port"));
            None
        }
    }
}

fn non_negative(errors: &mut Vec<FieldError>, name: &str, v: Option<i32>) -> u32 {
    match v {
        Some(v) if v < 0 => {
            field(
                errors,
                name,
                format!("{v}: must be greater than or equal to 0"),
            );
            0
        }
        Some(v) => v as u32,
        None => 0,
    }
}

fn dur(v: Option<duration::GoDuration>) -> Duration {
    v.map(|d| d.0).unwrap_or_default()
}

impl Config {
    /// Parses KubeProxyConfiguration YAML text on top of the defaults.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let (mut doc, _) = load_document(text, origin)?;
        doc.apply_defaults();
        Config::from_document(doc, true).map(|(c, _)| c)
    }

    /// Validates a defaulted document field by field into settings, with notes for
    /// fields that are set but have no effect in kproxy. `mode_defaults` applies the
    /// per-mode defaults upstream's `platformApplyDefaults` adds (nftables:
    /// `nodePortAddresses: [primary]`).
    pub(crate) fn from_document(
        mut doc: Document,
        mode_defaults: bool,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut errors = Vec::new();
        let mut notes = Vec::new();
        let mode_text = doc.mode.clone().unwrap_or_default();
        let mode = match mode_text.as_str() {
            "" | "iptables" => Mode::Iptables,
            "nftables" => Mode::Nftables,
            "ipvs" => {
                field(&mut errors, "mode", "\"ipvs\" is not supported by kproxy: use \"iptables\" or \"nftables\" (IPVS mode is deprecated upstream)");
                Mode::Iptables
            }
            "kernelspace" => {
                field(&mut errors, "mode", "\"kernelspace\" is the Windows proxier; kproxy runs on Linux: use \"iptables\" or \"nftables\"");
                Mode::Iptables
            }
            other => {
                field(
                    &mut errors,
                    "mode",
                    format!("{other:?}: must be iptables, ipvs, nftables or blank"),
                );
                Mode::Iptables
            }
        };
        let layout_text = doc.kproxy.nftables_layout.clone().unwrap_or_default();
        let nftables_layout = NftablesLayout::parse(&layout_text).unwrap_or_else(|| {
            field(
                &mut errors,
                "kproxy.nftablesLayout",
                format!("{layout_text:?}: must be upstream, maps or blank"),
            );
            NftablesLayout::Upstream
        });
        if mode_defaults
            && mode == Mode::Nftables
            && doc.node_port_addresses.as_ref().is_none_or(Vec::is_empty)
        {
            doc.node_port_addresses = Some(vec!["primary".into()]);
        }
        let (section, sync, min_sync, bit, masq_all) = match mode {
            Mode::Iptables => (
                "iptables",
                doc.iptables.sync_period,
                doc.iptables.min_sync_period,
                doc.iptables.masquerade_bit,
                doc.iptables.masquerade_all,
            ),
            Mode::Nftables => (
                "nftables",
                doc.nftables.sync_period,
                doc.nftables.min_sync_period,
                doc.nftables.masquerade_bit,
                doc.nftables.masquerade_all,
            ),
        };
        let sync_period = dur(sync);
        if sync_period.is_zero() {
            field(
                &mut errors,
                &format!("{section}.syncPeriod"),
                "must be greater than 0",
            );
        }
        let masquerade_bit = match bit.unwrap_or(14) {
            b @ 0..=31 => b as u32,
            b => {
                field(
                    &mut errors,
                    &format!("{section}.masqueradeBit"),
                    format!("{b}: must be within the range [0, 31]"),
                );
                14
            }
        };
        if dur(doc.config_sync_period).is_zero() {
            field(&mut errors, "configSyncPeriod", "must be greater than 0");
        }
        let oom_score_adj = doc.oom_score_adj.unwrap_or(-999);
        if !(-1000..=1000).contains(&oom_score_adj) {
            field(
                &mut errors,
                "oomScoreAdj",
                format!("{oom_score_adj}: must be within the range [-1000, 1000]"),
            );
        }
        let bind_text = doc.bind_address.clone().unwrap_or_default();
        let bind_address = match parse_ip_sloppy(&bind_text) {
            Some(ip) if ip.is_unspecified() => None,
            Some(ip) => Some(ip),
            None => {
                field(
                    &mut errors,
                    "bindAddress",
                    format!("{bind_text:?}: must be a valid IP address"),
                );
                None
            }
        };
        let healthz_bind_address = parse_bind(
            &mut errors,
            "healthzBindAddress",
            doc.healthz_bind_address.as_deref().unwrap_or(""),
        );
        let metrics_bind_address = parse_bind(
            &mut errors,
            "metricsBindAddress",
            doc.metrics_bind_address.as_deref().unwrap_or(""),
        );

        let mut cluster_cidrs = Vec::new();
        let cidr_text = doc.cluster_cidr.clone().unwrap_or_default();
        let parts: Vec<&str> = cidr_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for part in &parts {
            match parse_cidr_sloppy(part) {
                Some(c) => cluster_cidrs.push(c),
                None => field(
                    &mut errors,
                    "clusterCIDR",
                    format!("{part:?} must be a valid CIDR"),
                ),
            }
        }
        if parts.len() > 2
            || (cluster_cidrs.len() == 2
                && IpFamily::of_net(&cluster_cidrs[0]) == IpFamily::of_net(&cluster_cidrs[1]))
        {
            field(&mut errors, "clusterCIDR", "only one CIDR allowed or a valid DualStack CIDR (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)");
        }
        let detect_local_mode = match doc.detect_local_mode.as_deref().unwrap_or("") {
            "" | "ClusterCIDR" => DetectLocalMode::ClusterCidr,
            "NodeCIDR" => DetectLocalMode::NodeCidr,
            "BridgeInterface" => DetectLocalMode::BridgeInterface,
            "InterfaceNamePrefix" => DetectLocalMode::InterfaceNamePrefix,
            other => {
                field(&mut errors, "detectLocalMode", format!("{other:?}: must be ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix or blank"));
                DetectLocalMode::ClusterCidr
            }
        };
        let bridge_interface = doc
            .detect_local
            .bridge_interface
            .clone()
            .unwrap_or_default();
        let interface_name_prefix = doc
            .detect_local
            .interface_name_prefix
            .clone()
            .unwrap_or_default();
        if detect_local_mode == DetectLocalMode::BridgeInterface && bridge_interface.is_empty() {
            field(
                &mut errors,
                "detectLocal.bridgeInterface",
                "must not be empty with detectLocalMode BridgeInterface",
            );
        }
        if detect_local_mode == DetectLocalMode::InterfaceNamePrefix
            && interface_name_prefix.is_empty()
        {
            field(
                &mut errors,
                "detectLocal.interfaceNamePrefix",
                "must not be empty with detectLocalMode InterfaceNamePrefix",
            );
        }
        for name in [&bridge_interface, &interface_name_prefix] {
            if name.len() > 15
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || c == '/' || c == '"' || c.is_control())
            {
                field(
                    &mut errors,
                    "detectLocal",
                    format!("{name:?} is not a valid interface name"),
                );
            }
        }
        let nodeport_addresses = doc.node_port_addresses.clone().unwrap_or_default();
        for a in &nodeport_addresses {
            if a == "primary" {
                if nodeport_addresses.len() > 1 {
                    field(
                        &mut errors,
                        "nodePortAddresses",
                        "\"primary\" cannot be combined with CIDRs",
                    );
                }
            } else if parse_cidr_sloppy(a).is_none() {
                field(
                    &mut errors,
                    "nodePortAddresses",
                    format!("{a:?} must be a valid CIDR or \"primary\""),
                );
            }
        }
        let hostname_override = doc
            .hostname_override
            .as_deref()
            .map(|h| h.trim().to_lowercase())
            .filter(|h| !h.is_empty());
        if let Some(h) = &hostname_override {
            doc.hostname_override = Some(h.clone());
        }
        let feature_gates = doc.feature_gates.clone().unwrap_or_default();
        for name in feature_gates.keys() {
            if !gates::is_known(name) {
                field(
                    &mut errors,
                    "featureGates",
                    format!("unrecognized feature gate: {name}"),
                );
            } else if gates::default_of(name).is_none() {
                notes.push(format!(
                    "feature gate {name} has no effect on a proxy (accepted)"
                ));
            }
        }
        let ct = &doc.conntrack;
        let conntrack = ConntrackConfig {
            max_per_core: non_negative(&mut errors, "conntrack.maxPerCore", ct.max_per_core),
            min: non_negative(&mut errors, "conntrack.min", ct.min),
            tcp_established_timeout: dur(ct.tcp_established_timeout),
            tcp_close_wait_timeout: dur(ct.tcp_close_wait_timeout),
            tcp_be_liberal: ct.tcp_be_liberal.unwrap_or(false),
            udp_timeout: dur(ct.udp_timeout),
            udp_stream_timeout: dur(ct.udp_stream_timeout),
        };
        let log_format = match doc.logging.format.as_deref().unwrap_or("text") {
            "" | "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                field(
                    &mut errors,
                    "logging.format",
                    format!(
                        "{other:?}: Unsupported value: supported values are \"json\", \"text\""
                    ),
                );
                LogFormat::Text
            }
        };
        if let Some(v) = doc
            .show_hidden_metrics_for_version
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            let ok = v
                .split_once('.')
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
            if !ok {
                field(
                    &mut errors,
                    "showHiddenMetricsForVersion",
                    format!("{v:?}: must be in the format <major>.<minor>"),
                );
            }
        }
        let cc = &doc.client_connection;
        if cc.burst.is_some_and(|b| b < 0) {
            field(
                &mut errors,
                "clientConnection.burst",
                "must be greater than or equal to 0",
            );
        }
        // Fields kproxy keeps but does not act on: note them when they differ from
        // upstream's defaults, so an operator sees what will not happen.
        let mut defaults = Document::default();
        defaults.apply_defaults();
        let mut differs = |name: &str, set: bool, why: &str| {
            if set {
                notes.push(format!(
                    "config field {name} has no effect in kproxy: {why}"
                ));
            }
        };
        differs("ipvs", doc.ipvs != defaults.ipvs, "kproxy has no IPVS mode");
        differs(
            "winkernel",
            doc.winkernel != defaults.winkernel,
            "Windows only",
        );
        differs(
            "enableProfiling",
            doc.enable_profiling == Some(true),
            "kproxy has no pprof handlers",
        );
        differs(
            "clientConnection.qps/burst",
            cc.qps != defaults.client_connection.qps
                || cc.burst != defaults.client_connection.burst,
            "kproxy's watch client is not rate-limited",
        );
        differs(
            "clientConnection.contentType",
            cc.content_type != defaults.client_connection.content_type,
            "kproxy's client speaks JSON",
        );
        differs(
            "configSyncPeriod",
            doc.config_sync_period != defaults.config_sync_period,
            "kproxy watches continuously",
        );
        differs(
            "logging.vmodule",
            doc.logging.vmodule.as_ref().is_some_and(|v| !v.is_empty()),
            "use KPROXY_LOG=module=level",
        );
        differs(
            "portRange",
            doc.port_range.as_deref().is_some_and(|p| !p.is_empty()),
            "unused upstream too",
        );
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let kubeconfig = doc
            .client_connection
            .kubeconfig
            .clone()
            .filter(|k| !k.is_empty());
        let verbosity = doc.logging.verbosity.unwrap_or(0);
        Ok((
            Config {
                mode,
                nftables_layout,
                hostname_override,
                bind_address,
                cluster_cidrs,
                detect_local_mode,
                bridge_interface,
                interface_name_prefix,
                masquerade_all: masq_all.unwrap_or(false),
                masquerade_bit,
                localhost_nodeports: doc.iptables.localhost_node_ports.unwrap_or(true),
                nodeport_addresses,
                min_sync_period: dur(min_sync),
                sync_period,
                healthz_bind_address,
                metrics_bind_address,
                bind_address_hard_fail: doc.bind_address_hard_fail.unwrap_or(false),
                oom_score_adj,
                feature_gates,
                conntrack,
                kubeconfig,
                log_format,
                verbosity,
                document: doc,
            },
            notes,
        ))
    }

    /// Upstream's defaults written out, for the unreachable case where validating
    /// them failed.
    fn fallback_defaults() -> Config {
        let mut document = Document::default();
        document.apply_defaults();
        Config {
            mode: Mode::Iptables,
            nftables_layout: NftablesLayout::Upstream,
            hostname_override: None,
            bind_address: None,
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
            healthz_bind_address: Some(SocketAddr::from(([0, 0, 0, 0], 10256))),
            metrics_bind_address: Some(SocketAddr::from(([127, 0, 0, 1], 10249))),
            bind_address_hard_fail: false,
            oom_score_adj: -999,
            feature_gates: BTreeMap::new(),
            conntrack: ConntrackConfig::default(),
            kubeconfig: None,
            log_format: LogFormat::Text,
            verbosity: 0,
            document,
        }
    }

    /// Checks the settings after code (not the merge) changed them: the rules
    /// `from_document` enforces that such edits can break.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.masquerade_bit > 31 {
            field(
                &mut errors,
                "masqueradeBit",
                format!("{}: must be within the range [0, 31]", self.masquerade_bit),
            );
        }
        if self.sync_period.is_zero() {
            field(&mut errors, "syncPeriod", "must be greater than 0");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

#[cfg(test)]
mod tests;

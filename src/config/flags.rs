//! kube-proxy's command line: every flag of upstream kube-proxy 1.34/1.35
//! (cmd/kube-proxy/app/options.go and component-base's logging flags), parsed with
//! pflag's rules, plus kproxy's few own flags. Each flag either edits the
//! [`Document`](super::v1alpha1::Document) the way upstream's flag does, or steers the
//! process (`--config`, `--cleanup`, …). The table below is the single list: parsing,
//! `--help`, the compatibility table's test and `--write-config-to` all read it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::duration::{parse_go_duration, GoDuration, TimeOrNanos};
use super::v1alpha1::{Document, VModuleItem};

/// What a flag's value looks like (pflag's value types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `--f`, `--f=true|false` (never a separate argument).
    Bool,
    /// Any string.
    Str,
    /// A 32-bit signed integer.
    Int,
    /// A 32-bit float.
    Float,
    /// A Go duration.
    Duration,
    /// A comma-separated list; repeating the flag appends.
    List,
    /// `Key=bool,...`; repeating the flag merges.
    GateMap,
    /// An IP address.
    Ip,
    /// `IP:port` (or a bare IP, or empty).
    IpPort,
    /// A non-negative integer (klog's -v).
    Level,
    /// `pattern=N,...`.
    VModule,
    /// `--version[=true|false|raw|vX.Y.Z]`.
    Version,
}

/// What kproxy does with a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Honoured as upstream does.
    Honoured,
    /// Accepted and kept in the configuration; it has no effect in kproxy (why).
    Ignored(&'static str),
    /// Steers the process rather than the configuration.
    Process,
}

/// Whether a flag still applies when `--config` is given (upstream: only the process
/// flags, `--hostname-override` and the logging flags do; every other flag is
/// "ignored if a config file is specified by --config").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WithConfigFile {
    /// Applied over the file.
    Applies,
    /// Ignored (with one warning naming it).
    Ignored,
}

/// One command-line flag.
#[derive(Debug)]
pub struct FlagSpec {
    /// The long name, without dashes.
    pub name: &'static str,
    /// A one-letter shorthand (`-v`, `-h`).
    pub short: Option<char>,
    /// Value syntax.
    pub kind: FlagKind,
    /// What kproxy does with it.
    pub support: Support,
    /// Whether it applies over `--config`.
    pub(crate) with_config: WithConfigFile,
    /// The configuration field it sets (for docs), or "" for process flags.
    pub field: &'static str,
    /// One line of help.
    pub help: &'static str,
}

macro_rules! flag {
    ($name:literal, $kind:ident, $support:expr, $with:ident, $field:literal, $help:literal) => {
        FlagSpec {
            name: $name,
            short: None,
            kind: FlagKind::$kind,
            support: $support,
            with_config: WithConfigFile::$with,
            field: $field,
            help: $help,
        }
    };
}

const H: Support = Support::Honoured;
const P: Support = Support::Process;
const IPVS: Support = Support::Ignored("kproxy has no IPVS mode");

/// Every flag kproxy's daemon accepts: upstream kube-proxy's, then kproxy's own.
pub(crate) static FLAGS: &[FlagSpec] = &[
    flag!("config", Str, P, Applies, "", "The path to the configuration file."),
    flag!("write-config-to", Str, P, Applies, "", "If set, write the effective configuration to this file and exit."),
    flag!("cleanup", Bool, P, Applies, "", "If true cleanup iptables and nftables rules and exit."),
    flag!("init-only", Bool, P, Applies, "", "If true, perform the initialization steps that need full root privileges (sysctls), then exit."),
    flag!("master", Str, P, Applies, "", "The address of the Kubernetes API server (overrides any value in kubeconfig)."),
    FlagSpec { name: "version", short: None, kind: FlagKind::Version, support: P, with_config: WithConfigFile::Applies, field: "", help: "--version, --version=raw prints version information and quits." },
    FlagSpec { name: "help", short: Some('h'), kind: FlagKind::Bool, support: P, with_config: WithConfigFile::Applies, field: "", help: "help for kube-proxy" },
    flag!("healthz-port", Int, P, Ignored, "healthzBindAddress", "Deprecated: the port of the health check server; 0 disables it. Use --healthz-bind-address."),
    flag!("metrics-port", Int, P, Ignored, "metricsBindAddress", "Deprecated: the port of the metrics server; 0 disables it. Use --metrics-bind-address."),
    flag!("feature-gates", GateMap, H, Ignored, "featureGates", "A set of key=value pairs that describe feature gates for alpha/experimental features."),
    flag!("kubeconfig", Str, H, Ignored, "clientConnection.kubeconfig", "Path to kubeconfig file with authorization information."),
    flag!("kube-api-content-type", Str, Support::Ignored("kproxy's client always speaks JSON"), Ignored, "clientConnection.contentType", "Content type of requests sent to apiserver."),
    flag!("kube-api-burst", Int, Support::Ignored("kproxy's watch client is not rate-limited (it only lists and watches)"), Ignored, "clientConnection.burst", "Burst to use while talking with kubernetes apiserver."),
    flag!("kube-api-qps", Float, Support::Ignored("kproxy's watch client is not rate-limited (it only lists and watches)"), Ignored, "clientConnection.qps", "QPS to use while talking with kubernetes apiserver."),
    flag!("hostname-override", Str, H, Applies, "hostnameOverride", "If non-empty, will be used as the name of the Node that kube-proxy is running on."),
    flag!("bind-address", Ip, H, Ignored, "bindAddress", "Overrides kube-proxy's idea of what its node's primary IP is."),
    flag!("healthz-bind-address", IpPort, H, Ignored, "healthzBindAddress", "The IP address and port for the health check server to serve on (default 0.0.0.0:10256)."),
    flag!("metrics-bind-address", IpPort, H, Ignored, "metricsBindAddress", "The IP address and port for the metrics server to serve on (default 127.0.0.1:10249); empty disables it."),
    flag!("bind-address-hard-fail", Bool, H, Ignored, "bindAddressHardFail", "If true kube-proxy will treat failure to bind to a port as fatal and exit."),
    flag!("profiling", Bool, Support::Ignored("kproxy has no Go pprof handlers"), Ignored, "enableProfiling", "If true enables profiling via web interface on /debug/pprof handler."),
    flag!("show-hidden-metrics-for-version", Str, Support::Ignored("kproxy hides no metrics"), Ignored, "showHiddenMetricsForVersion", "The previous version for which you want to show hidden metrics."),
    flag!("proxy-mode", Str, H, Ignored, "mode", "Which proxy mode to use: 'iptables' (default) or 'nftables' ('ipvs' is refused)."),
    flag!("iptables-masquerade-bit", Int, H, Ignored, "iptables.masqueradeBit", "The bit of the fwmark space to mark packets requiring SNAT with (0-31)."),
    flag!("masquerade-all", Bool, H, Ignored, "iptables.masqueradeAll, nftables.masqueradeAll", "SNAT all traffic sent via Service cluster IPs."),
    flag!("iptables-localhost-nodeports", Bool, H, Ignored, "iptables.localhostNodePorts", "If false, disallow NodePort services on localhost (iptables mode, IPv4)."),
    flag!("iptables-sync-period", Duration, H, Ignored, "iptables.syncPeriod (nftables.syncPeriod in nftables mode)", "How often various re-synchronizing and cleanup operations are performed. Must be greater than 0."),
    flag!("iptables-min-sync-period", Duration, H, Ignored, "iptables.minSyncPeriod (nftables.minSyncPeriod in nftables mode)", "The minimum period between rule resyncs; 0 means every change syncs at once."),
    flag!("ipvs-sync-period", Duration, IPVS, Ignored, "ipvs.syncPeriod", "IPVS sync period."),
    flag!("ipvs-min-sync-period", Duration, IPVS, Ignored, "ipvs.minSyncPeriod", "IPVS minimum sync period."),
    flag!("ipvs-scheduler", Str, IPVS, Ignored, "ipvs.scheduler", "The ipvs scheduler type when proxy mode is ipvs."),
    flag!("ipvs-exclude-cidrs", List, IPVS, Ignored, "ipvs.excludeCIDRs", "CIDRs the ipvs proxier should not touch when cleaning up."),
    flag!("ipvs-strict-arp", Bool, IPVS, Ignored, "ipvs.strictARP", "Enable strict ARP."),
    flag!("ipvs-tcp-timeout", Duration, IPVS, Ignored, "ipvs.tcpTimeout", "The timeout for idle IPVS TCP connections."),
    flag!("ipvs-tcpfin-timeout", Duration, IPVS, Ignored, "ipvs.tcpFinTimeout", "The timeout for IPVS TCP connections after a FIN."),
    flag!("ipvs-udp-timeout", Duration, IPVS, Ignored, "ipvs.udpTimeout", "The timeout for IPVS UDP packets."),
    flag!("detect-local-mode", Str, H, Ignored, "detectLocalMode", "Mode to use to detect local traffic."),
    flag!("pod-bridge-interface", Str, H, Ignored, "detectLocal.bridgeInterface", "A bridge interface name (detect-local-mode BridgeInterface)."),
    flag!("pod-interface-name-prefix", Str, H, Ignored, "detectLocal.interfaceNamePrefix", "An interface name prefix (detect-local-mode InterfaceNamePrefix)."),
    flag!("cluster-cidr", Str, H, Ignored, "clusterCIDR", "The CIDR range of the pods in the cluster (a dual-stack pair comma-separated)."),
    flag!("nodeport-addresses", List, H, Ignored, "nodePortAddresses", "CIDRs that contain valid node IPs for NodePorts, or 'primary'."),
    flag!("oom-score-adj", Int, H, Ignored, "oomScoreAdj", "The oom-score-adj value for the kube-proxy process, in [-1000, 1000]."),
    flag!("conntrack-max-per-core", Int, H, Ignored, "conntrack.maxPerCore", "Maximum number of NAT connections to track per CPU core (0 to leave as-is)."),
    flag!("conntrack-min", Int, H, Ignored, "conntrack.min", "Minimum number of conntrack entries to allocate."),
    flag!("conntrack-tcp-timeout-established", Duration, H, Ignored, "conntrack.tcpEstablishedTimeout", "Idle timeout for established TCP connections (0 to leave as-is)."),
    flag!("conntrack-tcp-timeout-close-wait", Duration, H, Ignored, "conntrack.tcpCloseWaitTimeout", "NAT timeout for TCP connections in the CLOSE_WAIT state."),
    flag!("conntrack-tcp-be-liberal", Bool, H, Ignored, "conntrack.tcpBeLiberal", "Enable liberal mode for tracking TCP packets."),
    flag!("conntrack-udp-timeout", Duration, H, Ignored, "conntrack.udpTimeout", "Idle timeout for UNREPLIED UDP connections (0 to leave as-is)."),
    flag!("conntrack-udp-timeout-stream", Duration, H, Ignored, "conntrack.udpStreamTimeout", "Idle timeout for ASSURED UDP connections (0 to leave as-is)."),
    flag!("config-sync-period", Duration, Support::Ignored("kproxy watches continuously and relists on expiry; there is no informer resync"), Ignored, "configSyncPeriod", "How often configuration from the apiserver is refreshed."),
    // component-base logging flags (they apply over --config, as upstream copies them).
    FlagSpec { name: "v", short: Some('v'), kind: FlagKind::Level, support: H, with_config: WithConfigFile::Applies, field: "logging.verbosity", help: "number for the log level verbosity" },
    flag!("vmodule", VModule, Support::Ignored("per-file verbosity is a Go/klog concept; use KPROXY_LOG=module=level"), Applies, "logging.vmodule", "comma-separated list of pattern=N settings for file-filtered logging."),
    flag!("logging-format", Str, H, Applies, "logging.format", "Sets the log format: text or json."),
    flag!("log-flush-frequency", Duration, Support::Ignored("kproxy writes log lines unbuffered"), Applies, "logging.flushFrequency", "Maximum number of seconds between log flushes."),
    flag!("log-json-info-buffer-size", Str, Support::Ignored("kproxy writes log lines unbuffered"), Applies, "logging.options.json.infoBufferSize", "[Alpha] In JSON format with split output streams, the info messages can be buffered."),
    flag!("log-json-split-stream", Bool, Support::Ignored("kproxy writes every log line to stderr"), Applies, "logging.options.json.splitStream", "[Alpha] In JSON format, write error messages to stderr and info messages to stdout."),
    flag!("log-text-info-buffer-size", Str, Support::Ignored("kproxy writes log lines unbuffered"), Applies, "logging.options.text.infoBufferSize", "[Alpha] In text format with split output streams, the info messages can be buffered."),
    flag!("log-text-split-stream", Bool, Support::Ignored("kproxy writes every log line to stderr"), Applies, "logging.options.text.splitStream", "[Alpha] In text format, write error messages to stderr and info messages to stdout."),
    // kproxy's own (kept from `kproxy run`'s first command line).
    FlagSpec { name: "min-sync-period", short: None, kind: FlagKind::Duration, support: H, with_config: WithConfigFile::Ignored, field: "iptables.minSyncPeriod / nftables.minSyncPeriod", help: "kproxy: the active mode's minimum sync period (same as --iptables-min-sync-period)." },
    FlagSpec { name: "nftables-layout", short: None, kind: FlagKind::Str, support: H, with_config: WithConfigFile::Applies, field: "kproxy.nftablesLayout", help: "kproxy: the nftables table layout, upstream (default: upstream's kube-proxy table) or maps (kproxy's table of sets and data maps; see docs/nftables-maps-layout.md)." },
    FlagSpec { name: "sync-period", short: None, kind: FlagKind::Duration, support: H, with_config: WithConfigFile::Ignored, field: "iptables.syncPeriod / nftables.syncPeriod", help: "kproxy: the active mode's sync period (same as --iptables-sync-period)." },
    FlagSpec { name: "debug-endpoints", short: None, kind: FlagKind::Bool, support: P, with_config: WithConfigFile::Applies, field: "", help: "kproxy: serve /debug/ruleset and /debug/state on the metrics address (default true)." },
    FlagSpec { name: "shadow", short: None, kind: FlagKind::Bool, support: P, with_config: WithConfigFile::Applies, field: "kproxy.shadow", help: "kproxy: shadow mode: write no rules, compare each would-be sync with the live rules (kproxy_shadow_differences, /debug/diff); healthz and metrics move to ports 10266 and 10269 unless given. Also KPROXY_SHADOW=true." },
];

/// Looks a flag up by its long name, after pflag's `_` → `-` normalisation
/// (kube-proxy registers `WordSepNormalizeFunc`).
pub fn lookup(name: &str) -> Option<&'static FlagSpec> {
    let normalized = name.replace('_', "-");
    FLAGS.iter().find(|f| f.name == normalized)
}

fn lookup_short(c: char) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.short == Some(c))
}

/// A command-line problem (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// pflag's "unknown flag".
    #[error("unknown flag: {0}")]
    Unknown(String),
    /// A flag that needs a value got none.
    #[error("flag needs an argument: --{0}")]
    MissingValue(&'static str),
    /// A value that does not parse.
    #[error("invalid argument {value:?} for \"--{flag}\" flag: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// kube-proxy takes no positional arguments.
    #[error("kube-proxy does not take any arguments, got {0:?}")]
    Positional(Vec<String>),
}

/// The command line, split into process switches and configuration flags.
#[derive(Debug, Default, Clone)]
pub(crate) struct CommandLine {
    /// `--config`.
    pub config_file: Option<PathBuf>,
    /// `--write-config-to`.
    pub(crate) write_config_to: Option<PathBuf>,
    /// `--cleanup`.
    pub cleanup: bool,
    /// `--init-only`.
    pub(crate) init_only: bool,
    /// `--shadow` (kproxy's shadow mode).
    pub shadow: bool,
    /// `--master`.
    pub master: Option<String>,
    /// `--version` value (`true`, `raw`), when it asks to print and exit.
    pub version: Option<String>,
    /// `--help`.
    pub help: bool,
    /// `--debug-endpoints` (None: the default, on).
    pub(crate) debug_endpoints: Option<bool>,
    /// Deprecated `--healthz-port` / `--metrics-port`.
    pub(crate) healthz_port: Option<i32>,
    /// Deprecated `--metrics-port`.
    pub(crate) metrics_port: Option<i32>,
    /// Configuration flags in the order given, values as written.
    pub settings: Vec<(&'static FlagSpec, String)>,
}

/// Go's strconv.ParseBool.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl CommandLine {
    /// Parses arguments (without the program name) with pflag's rules: `--f=v`,
    /// `--f v`, `--bool`, `--bool=false`, `-v 2`, `-v=2`, `-v2`, `--` ends flags.
    pub(crate) fn parse<I, S>(args: I) -> Result<CommandLine, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        let mut cl = CommandLine::default();
        let mut positional = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            if arg == "--" {
                positional.extend(args[i..].iter().cloned());
                break;
            }
            let (spec, inline) = if let Some(long) = arg.strip_prefix("--") {
                let (name, value) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                let spec = lookup(name).ok_or_else(|| FlagError::Unknown(format!("--{name}")))?;
                (spec, value)
            } else if let Some(short) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
                let mut chars = short.chars();
                let c = chars.next().unwrap_or('-');
                let spec =
                    lookup_short(c).ok_or_else(|| FlagError::Unknown(format!("-{c} in {arg}")))?;
                let rest: String = chars.collect();
                let value = if rest.is_empty() {
                    None
                } else {
                    Some(rest.strip_prefix('=').unwrap_or(&rest).to_string())
                };
                (spec, value)
            } else {
                positional.push(arg.clone());
                continue;
            };
            let value = match (spec.kind, inline) {
                (_, Some(v)) => v,
                (FlagKind::Bool, None) => "true".to_string(),
                (FlagKind::Version, None) => "true".to_string(),
                (_, None) => {
                    let v = args.get(i).ok_or(FlagError::MissingValue(spec.name))?;
                    i += 1;
                    v.clone()
                }
            };
            cl.take(spec, value)?;
        }
        // cobra's check in kube-proxy: empty positional arguments are tolerated.
        positional.retain(|p| !p.is_empty());
        if !positional.is_empty() {
            return Err(FlagError::Positional(positional));
        }
        Ok(cl)
    }

    fn take(&mut self, spec: &'static FlagSpec, value: String) -> Result<(), FlagError> {
        // Every value is checked here, so that a bad one fails before anything runs,
        // even when `--config` will make the flag moot.
        check_value(spec, &value)?;
        let as_bool = || parse_bool(&value).unwrap_or(false);
        match spec.name {
            "config" => {
                self.config_file = Some(PathBuf::from(&value)).filter(|_| !value.is_empty())
            }
            "write-config-to" => {
                self.write_config_to = Some(PathBuf::from(&value)).filter(|_| !value.is_empty())
            }
            "cleanup" => self.cleanup = as_bool(),
            "init-only" => self.init_only = as_bool(),
            "shadow" => self.shadow = as_bool(),
            "master" => self.master = Some(value).filter(|v| !v.is_empty()),
            "help" => self.help = as_bool(),
            "debug-endpoints" => self.debug_endpoints = Some(as_bool()),
            "version" => {
                self.version = match value.as_str() {
                    "raw" => Some(value),
                    v => parse_bool(v).unwrap_or(false).then(|| "true".to_string()),
                }
            }
            "healthz-port" => self.healthz_port = value.parse().ok(),
            "metrics-port" => self.metrics_port = value.parse().ok(),
            _ => self.settings.push((spec, value)),
        }
        Ok(())
    }
}

fn invalid(spec: &'static FlagSpec, value: &str, reason: impl Into<String>) -> FlagError {
    FlagError::Invalid {
        flag: spec.name,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks a value against its flag's kind (pflag's `Set`).
fn check_value(spec: &'static FlagSpec, value: &str) -> Result<(), FlagError> {
    match spec.kind {
        FlagKind::Bool => parse_bool(value)
            .map(|_| ())
            .ok_or_else(|| invalid(spec, value, "strconv.ParseBool: parsing: invalid syntax")),
        FlagKind::Int => value
            .parse::<i32>()
            .map(|_| ())
            .map_err(|e| invalid(spec, value, e.to_string())),
        FlagKind::Float => value
            .parse::<f32>()
            .map(|_| ())
            .map_err(|e| invalid(spec, value, e.to_string())),
        FlagKind::Level => value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|e| invalid(spec, value, e.to_string())),
        FlagKind::Duration => parse_go_duration(value)
            .map(|_| ())
            .map_err(|e| invalid(spec, value, e.to_string())),
        FlagKind::Ip => crate::model::ip::parse_ip_sloppy(value)
            .map(|_| ())
            .ok_or_else(|| invalid(spec, value, "not a valid IP address")),
        FlagKind::IpPort => {
            if value.is_empty()
                || crate::model::ip::parse_ip_sloppy(value).is_some()
                || value.parse::<std::net::SocketAddr>().is_ok()
            {
                Ok(())
            } else {
                Err(invalid(spec, value, "not a valid IP address or IP:port"))
            }
        }
        FlagKind::GateMap => parse_gates(value)
            .map(|_| ())
            .map_err(|r| invalid(spec, value, r)),
        FlagKind::VModule => parse_vmodule(value)
            .map(|_| ())
            .map_err(|r| invalid(spec, value, r)),
        FlagKind::Version | FlagKind::Str | FlagKind::List => Ok(()),
    }
}

/// `A=true,B=false` (cliflag.MapStringBool).
pub(crate) fn parse_gates(value: &str) -> Result<BTreeMap<String, bool>, String> {
    let mut out = BTreeMap::new();
    for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("missing bool value for {part}"))?;
        let b = parse_bool(v.trim()).ok_or_else(|| format!("invalid value of {k}: {v}"))?;
        out.insert(k.trim().to_string(), b);
    }
    Ok(out)
}

fn parse_vmodule(value: &str) -> Result<Vec<VModuleItem>, String> {
    let mut out = Vec::new();
    for part in value.split(',').filter(|s| !s.is_empty()) {
        let (pattern, level) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} does not have the pattern=N format"))?;
        let verbosity = level
            .parse::<u32>()
            .map_err(|_| format!("parsing verbosity in {part:?}"))?;
        out.push(VModuleItem {
            file_pattern: pattern.to_string(),
            verbosity,
        });
    }
    Ok(out)
}

/// pflag's StringSlice: CSV, so `a,b` is two entries.
fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A flag whose effect depends on the proxy mode: applied after the others, so that
/// `--iptables-sync-period=5s --proxy-mode=nftables` means what upstream means.
pub(crate) fn mode_dependent(spec: &FlagSpec) -> bool {
    matches!(
        spec.name,
        "iptables-sync-period" | "iptables-min-sync-period" | "min-sync-period" | "sync-period"
    )
}

/// Applies one configuration flag to the document, as upstream's flag binding does.
/// `lists` tracks which list flags were already set (pflag: the first use replaces
/// the default, later ones append).
pub fn apply(
    doc: &mut Document,
    spec: &'static FlagSpec,
    value: &str,
    lists: &mut Vec<&'static str>,
) {
    let b = || parse_bool(value).unwrap_or(false);
    let dur = || parse_go_duration(value).map(GoDuration).ok();
    let int = || value.parse::<i32>().ok();
    let s = || Some(value.to_string());
    let mut list = |slot: &mut Option<Vec<String>>| {
        let mut items = if lists.contains(&spec.name) {
            slot.clone().unwrap_or_default()
        } else {
            lists.push(spec.name);
            Vec::new()
        };
        items.extend(parse_list(value));
        *slot = Some(items);
    };
    let nft = doc.mode.as_deref() == Some("nftables");
    match spec.name {
        "feature-gates" => {
            let gates = doc.feature_gates.get_or_insert_with(BTreeMap::new);
            gates.extend(parse_gates(value).unwrap_or_default());
        }
        "kubeconfig" => doc.client_connection.kubeconfig = s(),
        "kube-api-content-type" => doc.client_connection.content_type = s(),
        "kube-api-burst" => doc.client_connection.burst = int(),
        "kube-api-qps" => doc.client_connection.qps = value.parse().ok(),
        "hostname-override" => doc.hostname_override = s(),
        "bind-address" => doc.bind_address = s(),
        "healthz-bind-address" => doc.healthz_bind_address = s(),
        "metrics-bind-address" => doc.metrics_bind_address = s(),
        "bind-address-hard-fail" => doc.bind_address_hard_fail = Some(b()),
        "profiling" => doc.enable_profiling = Some(b()),
        "show-hidden-metrics-for-version" => doc.show_hidden_metrics_for_version = s(),
        "proxy-mode" => doc.mode = s(),
        "nftables-layout" => doc.kproxy.nftables_layout = s(),
        "iptables-masquerade-bit" => doc.iptables.masquerade_bit = int(),
        "masquerade-all" => {
            doc.iptables.masquerade_all = Some(b());
            doc.nftables.masquerade_all = Some(b());
        }
        "iptables-localhost-nodeports" => doc.iptables.localhost_node_ports = Some(b()),
        "iptables-sync-period" | "sync-period" if nft => doc.nftables.sync_period = dur(),
        "iptables-sync-period" | "sync-period" => doc.iptables.sync_period = dur(),
        "iptables-min-sync-period" | "min-sync-period" if nft => {
            doc.nftables.min_sync_period = dur()
        }
        "iptables-min-sync-period" | "min-sync-period" => doc.iptables.min_sync_period = dur(),
        "ipvs-sync-period" => doc.ipvs.sync_period = dur(),
        "ipvs-min-sync-period" => doc.ipvs.min_sync_period = dur(),
        "ipvs-scheduler" => doc.ipvs.scheduler = s(),
        "ipvs-exclude-cidrs" => list(&mut doc.ipvs.exclude_cidrs),
        "ipvs-strict-arp" => doc.ipvs.strict_arp = Some(b()),
        "ipvs-tcp-timeout" => doc.ipvs.tcp_timeout = dur(),
        "ipvs-tcpfin-timeout" => doc.ipvs.tcp_fin_timeout = dur(),
        "ipvs-udp-timeout" => doc.ipvs.udp_timeout = dur(),
        "detect-local-mode" => doc.detect_local_mode = s(),
        "pod-bridge-interface" => doc.detect_local.bridge_interface = s(),
        "pod-interface-name-prefix" => doc.detect_local.interface_name_prefix = s(),
        "cluster-cidr" => doc.cluster_cidr = s(),
        "nodeport-addresses" => list(&mut doc.node_port_addresses),
        "oom-score-adj" => doc.oom_score_adj = int(),
        "conntrack-max-per-core" => doc.conntrack.max_per_core = int(),
        "conntrack-min" => doc.conntrack.min = int(),
        "conntrack-tcp-timeout-established" => doc.conntrack.tcp_established_timeout = dur(),
        "conntrack-tcp-timeout-close-wait" => doc.conntrack.tcp_close_wait_timeout = dur(),
        "conntrack-tcp-be-liberal" => doc.conntrack.tcp_be_liberal = Some(b()),
        "conntrack-udp-timeout" => doc.conntrack.udp_timeout = dur(),
        "conntrack-udp-timeout-stream" => doc.conntrack.udp_stream_timeout = dur(),
        "config-sync-period" => doc.config_sync_period = dur(),
        "v" => doc.logging.verbosity = value.parse().ok(),
        "vmodule" => doc.logging.vmodule = parse_vmodule(value).ok(),
        "logging-format" => doc.logging.format = s(),
        "log-flush-frequency" => {
            doc.logging.flush_frequency = parse_go_duration(value).ok().map(TimeOrNanos)
        }
        "log-json-info-buffer-size" => set_log_option(doc, "json", "infoBufferSize", value, false),
        "log-json-split-stream" => set_log_option(doc, "json", "splitStream", value, true),
        "log-text-info-buffer-size" => set_log_option(doc, "text", "infoBufferSize", value, false),
        "log-text-split-stream" => set_log_option(doc, "text", "splitStream", value, true),
        other => {
            // Every name in FLAGS is handled above or in CommandLine::take; a new
            // table entry without a binding is a programming error caught by the
            // table test, never by a user.
            tracing::debug!(flag = other, "flag without a configuration binding");
        }
    }
}

fn set_log_option(doc: &mut Document, format: &str, key: &str, value: &str, boolean: bool) {
    use serde_yaml_ng::{Mapping, Value};
    let options = doc
        .logging
        .options
        .get_or_insert_with(|| Value::Mapping(Mapping::new()));
    if !options.is_mapping() {
        *options = Value::Mapping(Mapping::new());
    }
    let Some(map) = options.as_mapping_mut() else {
        return;
    };
    let entry = map
        .entry(Value::String(format.into()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !entry.is_mapping() {
        *entry = Value::Mapping(Mapping::new());
    }
    if let Some(m) = entry.as_mapping_mut() {
        let v = if boolean {
            Value::Bool(parse_bool(value).unwrap_or(false))
        } else {
            Value::String(value.into())
        };
        m.insert(Value::String(key.into()), v);
    }
}

/// The `--help` text: every flag with its help line.
pub(crate) fn help_text() -> String {
    let mut out = String::from(
        "kproxy: a kube-proxy replacement. Without a subcommand it runs the node daemon with\n\
         kube-proxy's flags (also when invoked as `kube-proxy`).\n\n\
         Subcommands: render, apply, trace, cleanup, run, version (kproxy help <subcommand>).\n\nFlags:\n",
    );
    for f in FLAGS {
        let short = f.short.map(|c| format!("-{c}, ")).unwrap_or_default();
        let ignored = match f.support {
            Support::Ignored(why) => format!(" (accepted, no effect: {why})"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {short}--{}\n      {}{ignored}\n",
            f.name, f.help
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn pflag_syntax() {
        let cl = CommandLine::parse([
            "--config=/c.yaml",
            "--hostname-override",
            "Node-A",
            "--masquerade-all=true",
            "--cleanup=false",
            "--profiling",
            "-v",
            "4",
            "--nodeport-addresses=10.0.0.0/8",
            "--nodeport-addresses",
            "192.168.0.0/16",
            "--kube_api_qps=20",
        ])
        .unwrap();
        assert_eq!(cl.config_file, Some(PathBuf::from("/c.yaml")));
        assert!(!cl.cleanup);
        let names: Vec<&str> = cl.settings.iter().map(|(s, _)| s.name).collect();
        assert_eq!(
            names,
            [
                "hostname-override",
                "masquerade-all",
                "profiling",
                "v",
                "nodeport-addresses",
                "nodeport-addresses",
                "kube-api-qps"
            ]
        );
        let cl = CommandLine::parse(["-v=3", "-v2"]).unwrap();
        assert_eq!(cl.settings[1].1, "2");
    }

    #[test]
    fn pflag_errors() {
        assert_eq!(
            CommandLine::parse(["--frobnicate"]).unwrap_err(),
            FlagError::Unknown("--frobnicate".into())
        );
        assert!(matches!(
            CommandLine::parse(["--masquerade-all=maybe"]),
            Err(FlagError::Invalid {
                flag: "masquerade-all",
                ..
            })
        ));
        assert!(matches!(
            CommandLine::parse(["--config"]),
            Err(FlagError::MissingValue("config"))
        ));
        // A bool flag never eats the next argument.
        assert!(matches!(
            CommandLine::parse(["--cleanup", "false"]),
            Err(FlagError::Positional(_))
        ));
        assert!(matches!(
            CommandLine::parse(["--iptables-sync-period=soon"]),
            Err(FlagError::Invalid { .. })
        ));
    }

    #[test]
    fn every_flag_has_a_binding() {
        // Each configuration flag must change the document (from a defaulted one).
        for spec in FLAGS {
            if spec.support == Support::Process
                || matches!(spec.name, "healthz-port" | "metrics-port")
            {
                continue;
            }
            let value = sample_value(spec);
            let mut doc = Document::default();
            doc.apply_defaults();
            let before = doc.clone();
            apply(&mut doc, spec, value, &mut Vec::new());
            assert_ne!(doc, before, "--{} changed nothing", spec.name);
        }
    }

    /// A value for each flag that differs from the default.
    pub(crate) fn sample_value(spec: &FlagSpec) -> &'static str {
        match spec.kind {
            FlagKind::Bool => {
                if spec.name == "iptables-localhost-nodeports" {
                    "false"
                } else {
                    "true"
                }
            }
            FlagKind::Int | FlagKind::Level => {
                if spec.name == "oom-score-adj" {
                    "-500"
                } else {
                    "7"
                }
            }
            FlagKind::Float => "42.5",
            FlagKind::Duration => "17s",
            FlagKind::List => "10.1.0.0/16,10.2.0.0/16",
            FlagKind::GateMap => "LoadBalancerIPMode=false",
            FlagKind::Ip => "10.9.8.7",
            FlagKind::IpPort => "127.0.0.1:12345",
            FlagKind::VModule => "sync=4",
            FlagKind::Version => "true",
            FlagKind::Str => match spec.name {
                "proxy-mode" => "nftables",
                "detect-local-mode" => "NodeCIDR",
                "cluster-cidr" => "10.244.0.0/16",
                "logging-format" => "json",
                "show-hidden-metrics-for-version" => "1.33",
                "log-json-info-buffer-size" | "log-text-info-buffer-size" => "64Ki",
                "nftables-layout" => "maps",
                _ => "sample-value",
            },
        }
    }
}

//! `/configz` as upstream kube-proxy serves it: the effective configuration (file,
//! flags and defaults applied) as JSON under the key `kubeproxy.config.k8s.io`, with
//! upstream's field names and Go duration strings.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{Config, DetectLocalMode};

/// Go's `time.Duration.String()` for whole milliseconds: `0s`, `500ms`, `1.5s`, `30s`,
/// `1m0s`, `24h0m0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, (ms / 60_000) % 60);
    let (s, frac) = ((ms / 1000) % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

fn detect_local_mode(m: DetectLocalMode) -> &'static str {
    match m {
        DetectLocalMode::ClusterCidr => "ClusterCIDR",
        DetectLocalMode::NodeCidr => "NodeCIDR",
        DetectLocalMode::BridgeInterface => "BridgeInterface",
        DetectLocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
    }
}

/// The effective configuration as upstream's KubeProxyConfiguration object.
pub fn configuration(cfg: &Config) -> Value {
    let cidrs: Vec<String> = cfg.cluster_cidrs.iter().map(|c| c.to_string()).collect();
    let backend = json!({
        "masqueradeAll": cfg.masquerade_all,
        "masqueradeBit": cfg.masquerade_bit,
        "minSyncPeriod": go_duration(cfg.min_sync_period),
        "syncPeriod": go_duration(cfg.sync_period),
    });
    let mut iptables = backend.clone();
    iptables["localhostNodePorts"] = json!(cfg.localhost_nodeports);
    let ct = &cfg.conntrack;
    json!({
        "featureGates": cfg.feature_gates,
        "clientConnection": { "kubeconfig": cfg.kubeconfig.clone().unwrap_or_default() },
        "hostnameOverride": cfg.hostname_override.clone().unwrap_or_default(),
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": cfg.healthz_bind_address.to_string(),
        "metricsBindAddress": cfg.metrics_bind_address.to_string(),
        "bindAddressHardFail": false,
        "enableProfiling": false,
        "mode": cfg.mode.as_str(),
        "iptables": iptables,
        "nftables": backend,
        "detectLocalMode": detect_local_mode(cfg.detect_local_mode),
        "detectLocal": {
            "bridgeInterface": cfg.bridge_interface,
            "interfaceNamePrefix": cfg.interface_name_prefix,
        },
        "clusterCIDR": cidrs.join(","),
        "nodePortAddresses": cfg.nodeport_addresses,
        "conntrack": {
            "maxPerCore": ct.max_per_core,
            "min": ct.min,
            "tcpEstablishedTimeout": go_duration(ct.tcp_established_timeout),
            "tcpCloseWaitTimeout": go_duration(ct.tcp_close_wait_timeout),
            "tcpBeLiberal": ct.tcp_be_liberal,
            "udpTimeout": go_duration(ct.udp_timeout),
            "udpStreamTimeout": go_duration(ct.udp_stream_timeout),
        },
    })
}

/// The `/configz` body.
pub fn body(cfg: &Config) -> String {
    json!({ "kubeproxy.config.k8s.io": configuration(cfg) }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_go() {
        let d = |ms| go_duration(Duration::from_millis(ms));
        assert_eq!(d(0), "0s");
        assert_eq!(d(500), "500ms");
        assert_eq!(d(1500), "1.5s");
        assert_eq!(d(30_000), "30s");
        assert_eq!(d(60_000), "1m0s");
        assert_eq!(d(86_400_000), "24h0m0s");
        assert_eq!(d(3_600_000), "1h0m0s");
    }

    #[test]
    fn configz_carries_the_effective_configuration() {
        let cfg = Config::from_yaml(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.244.0.0/16\n",
            "test",
        )
        .unwrap();
        let v: Value = serde_json::from_str(&body(&cfg)).unwrap();
        let c = &v["kubeproxy.config.k8s.io"];
        assert_eq!(c["mode"], "nftables");
        assert_eq!(c["clusterCIDR"], "10.244.0.0/16");
        assert_eq!(c["nftables"]["syncPeriod"], "30s");
        assert_eq!(c["healthzBindAddress"], "0.0.0.0:10256");
        assert_eq!(c["conntrack"]["tcpEstablishedTimeout"], "24h0m0s");
    }
}

//! `/configz` as upstream kube-proxy serves it (on the metrics server): the effective
//! configuration — file, flags and defaults applied, the same document
//! `--write-config-to` writes — as JSON under the key `kubeproxy.config.k8s.io`.

use crate::config::Config;

/// The `/configz` body.
pub(crate) fn body(cfg: &Config) -> String {
    // A Document is plain data (strings, numbers, maps): encoding cannot fail; should
    // it ever, /configz says so rather than serving nothing.
    let doc = serde_json::to_value(&cfg.document)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    serde_json::json!({ "kubeproxy.config.k8s.io": doc }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configz_carries_the_effective_configuration() {
        let cfg = Config::default();
        let v: serde_json::Value = serde_json::from_str(&body(&cfg)).unwrap();
        let c = &v["kubeproxy.config.k8s.io"];
        assert_eq!(c["kind"], "KubeProxyConfiguration", "{c}");
        assert_eq!(c["healthzBindAddress"], "0.0.0.0:10256", "{c}");
        assert!(c["iptables"]["syncPeriod"].is_string(), "{c}");
    }
}

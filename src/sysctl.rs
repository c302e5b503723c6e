//! Best-effort sysctls (route_localnet for localhost NodePorts): written only when they
//! differ, and a read-only /proc/sys is a warning, not a failure.

use std::path::Path;

/// Sets `/proc/sys/<key>` to `value` if it differs; returns whether it wrote.
pub(crate) fn ensure(key: &str, value: &str) -> std::io::Result<bool> {
    let path = Path::new("/proc/sys").join(key);
    let current = std::fs::read_to_string(&path)?;
    if current.trim() == value {
        return Ok(false);
    }
    std::fs::write(&path, value)?;
    Ok(true)
}

/// Like [`ensure`], logging instead of failing.
pub(crate) fn ensure_or_warn(key: &str, value: &str) {
    match ensure(key, value) {
        Ok(true) => tracing::info!(sysctl = key, value, "set sysctl"),
        Ok(false) => {}
        Err(e) => tracing::warn!(sysctl = key, value, error = %e, "could not set sysctl"),
    }
}

/// Reads a sysctl as an integer (None when absent or unreadable).
pub(crate) fn read_int(key: &str) -> Option<i64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The conntrack sysctls upstream sets at start-up, as (key, value) pairs: a pure
/// decision from the configuration and the CPU count.
pub(crate) fn conntrack_settings(
    ct: &crate::config::ConntrackConfig,
    cpus: u32,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if ct.max_per_core > 0 {
        let max = (ct.max_per_core as u64 * cpus as u64).max(ct.min as u64);
        out.push(("net/netfilter/nf_conntrack_max", max.to_string()));
    }
    for (key, d) in [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            ct.tcp_established_timeout,
        ),
        (
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            ct.tcp_close_wait_timeout,
        ),
        ("net/netfilter/nf_conntrack_udp_timeout", ct.udp_timeout),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            ct.udp_stream_timeout,
        ),
    ] {
        if !d.is_zero() {
            out.push((key, d.as_secs().to_string()));
        }
    }
    if ct.tcp_be_liberal {
        out.push(("net/netfilter/nf_conntrack_tcp_be_liberal", "1".to_string()));
    }
    out
}

/// Applies [`conntrack_settings`] best effort (a read-only /proc/sys in a container is
/// a warning, not a failure).
pub(crate) fn tune_conntrack(ct: &crate::config::ConntrackConfig) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    for (key, value) in conntrack_settings(ct, cpus) {
        ensure_or_warn(key, &value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_defaults() {
        let ct = crate::config::ConntrackConfig::default();
        let s = conntrack_settings(&ct, 2);
        assert_eq!(
            s[0],
            ("net/netfilter/nf_conntrack_max", "131072".to_string())
        );
        assert!(s.contains(&(
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            "86400".to_string()
        )));
        assert!(s.contains(&(
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            "3600".to_string()
        )));
        assert!(!s.iter().any(|(k, _)| k.contains("udp")));
        let s = conntrack_settings(&ct, 8);
        assert_eq!(s[0].1, "262144");
    }
}

//! `/metrics` (Prometheus text) with upstream's metric names, `/healthz` (`ok`) and
//! `/proxyMode` on the metrics address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::http::{Response, Server};
use crate::config::Mode;
use crate::model::IpFamily;

/// Upstream's sync-duration buckets: exponential from 1 ms, ×2, 15 buckets.
fn buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * 2f64.powi(i)).collect()
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let b = buckets();
        if self.counts.is_empty() {
            self.counts = vec![0; b.len()];
        }
        for (i, le) in b.iter().enumerate() {
            if v <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let b = buckets();
        for (i, le) in b.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Data {
    all: BTreeMap<IpFamily, Histogram>,
    full: BTreeMap<IpFamily, Histogram>,
    partial: BTreeMap<IpFamily, Histogram>,
    last: BTreeMap<IpFamily, f64>,
    restore_failures: BTreeMap<IpFamily, u64>,
    nft_failures: BTreeMap<IpFamily, u64>,
    skipped_objects: u64,
    service_changes: u64,
    endpoint_changes: u64,
}

/// The daemon's metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    data: Arc<Mutex<Data>>,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Data) -> R) -> R {
        f(&mut self.data.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A successful sync.
    pub fn synced(&self, family: IpFamily, full: bool, took: Duration) {
        let secs = took.as_secs_f64();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.with(|d| {
            d.all.entry(family).or_default().observe(secs);
            if full {
                d.full.entry(family).or_default().observe(secs);
            } else {
                d.partial.entry(family).or_default().observe(secs);
            }
            d.last.insert(family, now);
        });
    }

    /// A failed sync.
    pub fn failed(&self, family: IpFamily, mode: Mode) {
        self.with(|d| match mode {
            Mode::Iptables => *d.restore_failures.entry(family).or_default() += 1,
            Mode::Nftables => *d.nft_failures.entry(family).or_default() += 1,
        });
    }

    /// A malformed object was skipped.
    pub fn skipped_object(&self) {
        self.with(|d| d.skipped_objects += 1);
    }

    /// A Service (or EndpointSlice) event arrived.
    pub fn change(&self, endpoints: bool) {
        self.with(|d| {
            if endpoints {
                d.endpoint_changes += 1
            } else {
                d.service_changes += 1
            }
        });
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|d| {
            let mut out = String::new();
            for (name, help, h) in [
                ("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", &d.all),
                ("kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs", &d.full),
                ("kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs", &d.partial),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                for (f, hist) in h {
                    hist.render(&mut out, name, &format!("ip_family=\"{}\"", f.label()));
                }
            }
            let name = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
            let _ = writeln!(out, "# HELP {name} The last time proxy rules were successfully synced\n# TYPE {name} gauge");
            for (f, v) in &d.last {
                let _ = writeln!(out, "{name}{{ip_family=\"{}\"}} {v}", f.label());
            }
            for (name, help, m) in [
                ("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "Cumulative proxy iptables restore failures", &d.restore_failures),
                ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures", &d.nft_failures),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (f, v) in m {
                    let _ = writeln!(out, "{name}{{ip_family=\"{}\"}} {v}", f.label());
                }
            }
            for (name, help, v) in [
                ("kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes", d.service_changes),
                ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes", d.endpoint_changes),
                ("kproxy_skipped_objects_total", "Malformed Services and EndpointSlices skipped", d.skipped_objects),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            }
            out
        })
    }
}

/// Serves `/metrics`, `/healthz` and `/proxyMode`.
pub fn serve(addr: SocketAddr, metrics: Metrics, mode: Mode) -> std::io::Result<Server> {
    super::http::serve(addr, move |_, path| {
        match path.split('?').next().unwrap_or("") {
            "/metrics" => Response {
                status: 200,
                headers: vec![(
                    "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8".into(),
                )],
                body: metrics.render(),
            },
            "/healthz" => Response {
                status: 200,
                headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                body: "ok".into(),
            },
            "/proxyMode" => Response {
                status: 200,
                headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                body: mode.as_str().into(),
            },
            _ => Response {
                status: 404,
                headers: vec![],
                body: "404 page not found\n".into(),
            },
        }
    })
}

//! kube-proxy's health endpoints with upstream's semantics: `/healthz` and `/livez` on
//! the healthz address, and one server per `externalTrafficPolicy: Local` LoadBalancer
//! on its healthCheckNodePort.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::http::{serve, Response, Server};
use super::metrics::Metrics;
use crate::model::{IpFamily, ObjectKey, ProxyState};

/// Per-family sync health: when rules were last applied, and the oldest change still
/// waiting for a sync.
#[derive(Debug, Default)]
pub(crate) struct HealthState {
    families: BTreeMap<IpFamily, (Option<SystemTime>, Option<SystemTime>)>,
    node_eligible: bool,
    metrics: Option<Metrics>,
    /// Malformed objects skipped since start (each bad version once), and the latest.
    skipped: u64,
    last_skipped: Option<Skipped>,
}

/// The latest malformed object skipped, as `/healthz` shows it (issue #10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Kind and namespace/name, as in the log line (`Service default/web`).
    pub object: String,
    /// The reason category (`port`, `ip`, …), as in `kproxy_skipped_objects_total`.
    pub reason: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Shared health.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Mutex<HealthState>>,
    timeout: Duration,
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

impl Health {
    /// Health with `timeout` = 2 × syncPeriod, as upstream.
    pub fn new(families: &[IpFamily], sync_period: Duration) -> Health {
        let mut st = HealthState {
            node_eligible: true,
            ..HealthState::default()
        };
        for f in families {
            st.families.insert(*f, (None, None));
        }
        Health {
            inner: Arc::new(Mutex::new(st)),
            timeout: sync_period * 2,
        }
    }

    /// The same health, counting the `/healthz` and `/livez` responses
    /// [`serve_healthz`] gives in `m` (`kubeproxy_proxy_healthz_total{code}`,
    /// `kubeproxy_proxy_livez_total{code}`). Shared by every clone, like
    /// [`Health::set_metrics`].
    pub(crate) fn with_metrics(self, m: Metrics) -> Health {
        self.set_metrics(m);
        self
    }

    /// Counts the `/healthz` and `/livez` responses in `m`, for this health and every
    /// clone of it (including one already handed to [`serve_healthz`]).
    pub(crate) fn set_metrics(&self, m: Metrics) {
        self.lock().metrics = Some(m);
    }

    fn metrics(&self) -> Option<Metrics> {
        self.lock().metrics.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change is waiting for a sync.
    pub fn queued(&self) {
        let now = SystemTime::now();
        for v in self.lock().families.values_mut() {
            if v.1.is_none() {
                v.1 = Some(now);
            }
        }
    }

    /// A family's rules were applied.
    pub(crate) fn updated(&self, family: IpFamily) {
        let mut st = self.lock();
        let e = st.families.entry(family).or_default();
        e.0 = Some(SystemTime::now());
        e.1 = None;
    }

    /// A malformed object was skipped: `/healthz` shows the count and the latest one. It
    /// does not change the status code (upstream's 200/503 only follow syncs and the
    /// Node): one bad object never stops the proxy.
    pub fn skipped(&self, object: Skipped) {
        let mut st = self.lock();
        st.skipped += 1;
        st.last_skipped = Some(object);
    }

    /// Node eligibility (its Node exists and is not being deleted).
    pub(crate) fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    fn healthy_families(
        &self,
        now: SystemTime,
    ) -> (bool, Vec<(IpFamily, Option<SystemTime>, bool)>) {
        let st = self.lock();
        let mut all = true;
        let mut out = Vec::new();
        for (f, (last, queued)) in &st.families {
            let ok = match queued {
                Some(q) => now.duration_since(*q).unwrap_or_default() <= self.timeout,
                None => true,
            };
            all &= ok;
            out.push((*f, *last, ok));
        }
        (all, out)
    }

    /// Whether the proxy is healthy (the /livez notion).
    pub fn healthy(&self) -> bool {
        self.healthy_families(SystemTime::now()).0
    }

    /// The `/healthz` or `/livez` response.
    pub fn response(&self, with_node: bool) -> Response {
        let now = SystemTime::now();
        let (healthy, fams) = self.healthy_families(now);
        let (eligible, skipped, last_skipped) = {
            let st = self.lock();
            (st.node_eligible, st.skipped, st.last_skipped.clone())
        };
        let ok = healthy && (!with_node || eligible);
        let last = fams.iter().filter_map(|(_, l, _)| *l).max();
        // On success upstream reports the current time as lastUpdated.
        let last_text = if ok {
            rfc3339(now)
        } else {
            last.map(rfc3339)
                .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
        };
        let mut body = format!(
            "{{\"lastUpdated\":\"{last_text}\",\"currentTime\":\"{}\"",
            rfc3339(now)
        );
        if with_node {
            body.push_str(&format!(",\"nodeEligible\":{eligible}"));
        }
        body.push_str(&format!(",\"healthy\":{healthy}"));
        if !fams.is_empty() {
            let parts: Vec<String> = fams
                .iter()
                .map(|(f, l, h)| {
                    format!(
                        "\"{}\":{{\"lastUpdated\":\"{}\",\"healthy\":{h}}}",
                        f.label(),
                        l.map(rfc3339)
                            .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
                    )
                })
                .collect();
            body.push_str(&format!(",\"status\":{{{}}}", parts.join(",")));
        }
        // kproxy's addition, only when something was skipped (so a clean cluster's
        // response stays upstream's byte for byte).
        if let Some(last) = last_skipped {
            body.push_str(&format!(
                ",\"skippedObjects\":{skipped},\"lastSkipped\":{}",
                serde_json::json!({
                    "object": last.object,
                    "reason": last.reason,
                    "message": last.message,
                })
            ));
        }
        body.push('}');
        Response {
            status: if ok { 200 } else { 503 },
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body,
        }
    }
}

/// Serves `/healthz` and `/livez`, counting responses by status code when the health
/// carries [`Metrics`].
pub(crate) fn serve_healthz(addr: SocketAddr, health: Health) -> std::io::Result<Server> {
    serve(addr, move |req: &super::http::Request| {
        let path = req.path.as_str();
        match path.split('?').next().unwrap_or("") {
            "/healthz" => {
                let r = health.response(true);
                if let Some(m) = health.metrics() {
                    m.healthz_served(r.status);
                }
                r
            }
            "/livez" => {
                let r = health.response(false);
                if let Some(m) = health.metrics() {
                    m.livez_served(r.status);
                }
                r
            }
            _ => Response {
                status: 404,
                headers: vec![],
                body: "404 page not found\n".into(),
            },
        }
    })
}

/// The per-service health-check body (tab-indented, no trailing newline).
pub(crate) fn service_body(ns: &str, name: &str, local: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {ns:?},\n\t\t\"name\": {name:?}\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

/// Health-check node port servers, one per Service, updated after each sync.
pub(crate) struct ServiceHealth {
    health: Health,
    bind: IpAddr,
    servers: BTreeMap<ObjectKey, (u16, Server)>,
    counts: Arc<Mutex<BTreeMap<ObjectKey, usize>>>,
}

impl ServiceHealth {
    /// Listeners bind to `bind` (0.0.0.0 when NodePorts match every address).
    pub(crate) fn new(health: Health, bind: IpAddr) -> ServiceHealth {
        ServiceHealth {
            health,
            bind,
            servers: BTreeMap::new(),
            counts: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Opens, keeps or closes servers to match the state, and updates the counts of
    /// distinct local ready endpoint IPs they report.
    pub(crate) fn update(&mut self, state: &ProxyState) {
        let mut wanted: BTreeMap<ObjectKey, (u16, std::collections::BTreeSet<IpAddr>)> =
            BTreeMap::new();
        for p in &state.ports {
            if p.svc.health_check_node_port == 0 {
                continue;
            }
            let e = wanted
                .entry(p.service_key())
                .or_insert_with(|| (p.svc.health_check_node_port, Default::default()));
            for ep in p.endpoints.iter().filter(|e| e.is_local && e.ready) {
                e.1.insert(ep.ip);
            }
        }
        {
            let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            counts.clear();
            for (k, (_, ips)) in &wanted {
                counts.insert(k.clone(), ips.len());
            }
        }
        self.servers
            .retain(|k, (port, _)| wanted.get(k).is_some_and(|(p, _)| p == port));
        for (key, (port, _)) in wanted {
            if self.servers.contains_key(&key) {
                continue;
            }
            let counts = Arc::clone(&self.counts);
            let health = self.health.clone();
            let k2 = key.clone();
            match serve(
                SocketAddr::new(self.bind, port),
                move |_: &super::http::Request| {
                    let n = counts
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&k2)
                        .copied()
                        .unwrap_or(0);
                    let healthy = health.healthy();
                    Response {
                        status: if n != 0 && healthy { 200 } else { 503 },
                        headers: vec![
                            ("Content-Type", "application/json".into()),
                            ("X-Content-Type-Options", "nosniff".into()),
                            ("X-Load-Balancing-Endpoint-Weight", n.to_string()),
                        ],
                        body: service_body(&k2.namespace, &k2.name, n, healthy),
                    }
                },
            ) {
                Ok(server) => {
                    self.servers.insert(key, (port, server));
                }
                Err(e) => {
                    tracing::warn!(service = %key, port, error = %e, "failed to start healthcheck")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_upstreams() {
        assert_eq!(
            service_body("ns1", "svc1", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns1\",\n\t\t\"name\": \"svc1\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn stale_queue_makes_unhealthy() {
        let h = Health::new(&[IpFamily::V4], Duration::from_millis(1));
        assert_eq!(h.response(false).status, 200);
        h.queued();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(h.response(false).status, 503);
        h.updated(IpFamily::V4);
        assert_eq!(h.response(true).status, 200);
        h.set_node_eligible(false);
        assert_eq!(h.response(true).status, 503);
        assert_eq!(h.response(false).status, 200);
    }

    #[test]
    fn healthz_shows_skipped_objects_without_changing_the_status() {
        let h = Health::new(&[IpFamily::V4], Duration::from_secs(30));
        assert!(!h.response(true).body.contains("skipped"));
        h.skipped(Skipped {
            object: "Service default/a".into(),
            reason: "port",
            message: "port 0".into(),
        });
        h.skipped(Skipped {
            object: "EndpointSlice default/b".into(),
            reason: "ip",
            message: "bad \"ip\"".into(),
        });
        let r = h.response(true);
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["skippedObjects"], 2);
        assert_eq!(v["lastSkipped"]["object"], "EndpointSlice default/b");
        assert_eq!(v["lastSkipped"]["reason"], "ip");
        assert_eq!(v["lastSkipped"]["message"], "bad \"ip\"");
        assert_eq!(v["healthy"], true);
        h.set_node_eligible(false);
        assert_eq!(h.response(true).status, 503);
    }

    fn count(m: &Metrics, series: &str) -> Option<String> {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn healthz_server_counts_responses_by_code() {
        let m = Metrics::new();
        let h = Health::new(&[IpFamily::V4], Duration::from_secs(30)).with_metrics(m.clone());
        let server = serve_healthz("127.0.0.1:0".parse().unwrap(), h.clone()).unwrap();
        let get = |p| crate::daemon::http::get(server.addr(), p).0;
        assert_eq!(get("/healthz"), 200);
        assert_eq!(get("/healthz"), 200);
        assert_eq!(get("/livez"), 200);
        h.set_node_eligible(false);
        assert_eq!(get("/healthz"), 503);
        assert_eq!(get("/livez"), 200);
        assert_eq!(get("/other"), 404);
        let healthz = |c: &str| {
            count(
                &m,
                &format!("kubeproxy_proxy_healthz_total{{code=\"{c}\"}}"),
            )
        };
        let livez = |c: &str| count(&m, &format!("kubeproxy_proxy_livez_total{{code=\"{c}\"}}"));
        assert_eq!(healthz("200").as_deref(), Some("2"));
        assert_eq!(healthz("503").as_deref(), Some("1"));
        assert_eq!(livez("200").as_deref(), Some("2"));
        assert_eq!(livez("503"), None);
    }

    #[test]
    fn metrics_set_later_reach_a_running_server() {
        let h = Health::new(&[IpFamily::V4], Duration::from_secs(30));
        let server = serve_healthz("127.0.0.1:0".parse().unwrap(), h.clone()).unwrap();
        // Without metrics the server still answers.
        assert_eq!(crate::daemon::http::get(server.addr(), "/livez").0, 200);
        let m = Metrics::new();
        h.set_metrics(m.clone());
        assert_eq!(crate::daemon::http::get(server.addr(), "/livez").0, 200);
        assert_eq!(
            count(&m, "kubeproxy_proxy_livez_total{code=\"200\"}").as_deref(),
            Some("1")
        );
    }
}

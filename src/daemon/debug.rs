//! `/debug/ruleset` and `/debug/state` on the metrics address: what the daemon last
//! applied (and last failed to apply, with the error), and its service map as
//! `kproxy explain --live` reads it. Off with `--debug-endpoints=false`.
//!
//! Recording costs one clone of the synced `ProxyState` (a vector of shared pointers)
//! per sync; the rules text is rendered only when someone asks, from that state and
//! the family's settings: a pure function, so it is exactly what the sync rendered.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::http::{Request, Response};
use super::Shared;
use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::explain::{explain, ExplainInputs, Explanation};
use crate::iptables::render::{RenderOptions, Renderer};
use crate::model::{IpFamily, NodeContext, ProxyState};
use crate::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use crate::nftables::text::transaction_text;

/// The JSON schema identifier of `/debug/state`.
pub(crate) const STATE_SCHEMA: &str = "https://kproxy.dev/schema/debug-state.v1.json";

/// One recorded sync.
#[derive(Debug, Clone)]
struct Record {
    at: SystemTime,
    full: bool,
    operations: usize,
    error: Option<String>,
    state: ProxyState,
}

#[derive(Debug, Clone)]
struct FamilyRecord {
    family: IpFamily,
    mode: Mode,
    settings: FamilySettings,
    applied: Option<Record>,
    failed: Option<Record>,
}

#[derive(Debug, Default)]
struct Inner {
    families: Vec<FamilyRecord>,
    node: Option<NodeContext>,
}

/// What the sync loop applied, shared with the debug handlers.
#[derive(Debug, Clone, Default)]
pub struct DebugState {
    inner: Arc<Mutex<Inner>>,
}

impl DebugState {
    /// Nothing recorded yet.
    pub(crate) fn new() -> DebugState {
        DebugState::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node the rules are for (its selection inputs).
    pub fn set_node(&self, node: NodeContext) {
        self.lock().node = Some(node);
    }

    /// Wraps a dataplane so that its syncs are recorded.
    pub fn wrap(&self, inner: Box<dyn Dataplane>, settings: FamilySettings) -> Box<dyn Dataplane> {
        {
            let mut g = self.lock();
            let (family, mode) = (inner.family(), inner.mode());
            g.families.retain(|f| f.family != family);
            g.families.push(FamilyRecord {
                family,
                mode,
                settings,
                applied: None,
                failed: None,
            });
        }
        Box::new(Recording {
            inner,
            debug: self.clone(),
        })
    }

    fn record(&self, family: IpFamily, rec: Record) {
        let mut g = self.lock();
        if let Some(f) = g.families.iter_mut().find(|f| f.family == family) {
            if rec.error.is_some() {
                f.failed = Some(rec);
            } else {
                f.applied = Some(rec);
            }
        }
    }

    /// `/debug/ruleset`: per family, the last applied and the last failed rules.
    pub(crate) fn ruleset_text(&self) -> String {
        let families = self.lock().families.clone();
        let mut out = String::new();
        if families.is_empty() {
            out.push_str("# no dataplane yet (waiting for the initial lists)\n");
        }
        for f in families {
            for (what, rec) in [("applied", &f.applied), ("failed", &f.failed)] {
                let label = format!("{} {}", f.family.label(), f.mode.as_str());
                let Some(rec) = rec else {
                    out.push_str(&format!("# {label}: no {what} sync yet\n"));
                    continue;
                };
                out.push_str(&format!(
                    "# {label}: last {what} sync at {} ({}, {} operations){}\n# the full ruleset that sync {}:\n",
                    rfc3339(rec.at),
                    if rec.full { "full" } else { "partial" },
                    rec.operations,
                    rec.error
                        .as_ref()
                        .map(|e| format!("; error: {}", e.replace('\n', " ")))
                        .unwrap_or_default(),
                    if rec.error.is_some() { "tried to establish" } else { "established" },
                ));
                out.push_str(&render(f.mode, &f.settings, &rec.state));
            }
        }
        out
    }

    /// `/debug/state`: the service map of every family, explained.
    pub(crate) fn state_json(&self, shared: &Shared) -> String {
        let (families, node) = {
            let g = self.lock();
            (g.families.clone(), g.node.clone().unwrap_or_default())
        };
        let cluster = shared.lock().cluster.clone();
        let mut explained: Vec<Explanation> = Vec::new();
        let mut syncs = Vec::new();
        for f in &families {
            // The state the rules were last built from; before the first sync, the
            // current one.
            let proxy = match &f.applied {
                Some(r) => r.state.clone(),
                None => cluster.proxy_state(f.family, &node),
            };
            explained.push(explain(
                &ExplainInputs {
                    state: &cluster,
                    proxy: &proxy,
                    settings: &f.settings,
                    node: &node,
                },
                None,
            ));
            syncs.push(SyncView {
                family: f.family.label(),
                mode: f.mode.as_str(),
                last_applied: f.applied.as_ref().map(|r| rfc3339(r.at)),
                last_failed: f.failed.as_ref().map(|r| rfc3339(r.at)),
                last_error: f.failed.as_ref().and_then(|r| r.error.clone()),
            });
        }
        let doc = StateView {
            schema: STATE_SCHEMA,
            syncs,
            families: explained,
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    }

    /// Answers the debug paths (None for any other path).
    pub fn handle(&self, shared: &Shared, req: &Request) -> Option<Response> {
        match req.path.split('?').next().unwrap_or("") {
            "/debug/ruleset" => Some(Response {
                status: 200,
                headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                body: self.ruleset_text(),
            }),
            "/debug/state" => Some(Response {
                status: 200,
                headers: vec![("Content-Type", "application/json".into())],
                body: self.state_json(shared),
            }),
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct StateView {
    #[serde(rename = "$schema")]
    schema: &'static str,
    syncs: Vec<SyncView>,
    families: Vec<Explanation>,
}

#[derive(Serialize)]
struct SyncView {
    family: &'static str,
    mode: &'static str,
    last_applied: Option<String>,
    last_failed: Option<String>,
    last_error: Option<String>,
}

fn render(mode: Mode, settings: &FamilySettings, state: &ProxyState) -> String {
    match mode {
        Mode::Iptables => {
            Renderer::new(settings.clone())
                .render(
                    state,
                    &RenderOptions {
                        full: true,
                        ..RenderOptions::default()
                    },
                )
                .payload
        }
        Mode::Nftables => transaction_text(
            &NftRenderer::new(settings.clone())
                .render(state, &NftRenderOptions::default())
                .main,
        ),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// A dataplane that records each sync for the debug endpoints.
struct Recording {
    inner: Box<dyn Dataplane>,
    debug: DebugState,
}

impl Dataplane for Recording {
    fn family(&self) -> IpFamily {
        self.inner.family()
    }

    fn mode(&self) -> Mode {
        self.inner.mode()
    }

    fn needs_full_sync(&self) -> bool {
        self.inner.needs_full_sync()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        let result = self.inner.sync(state, full);
        let rec = match &result {
            Ok(o) => Record {
                at: SystemTime::now(),
                full: o.full,
                operations: o.operations,
                error: None,
                state: state.clone(),
            },
            Err(e) => Record {
                at: SystemTime::now(),
                full: !e.partial,
                operations: 0,
                error: Some(e.to_string()),
                state: state.clone(),
            },
        };
        self.debug.record(self.inner.family(), rec);
        result
    }

    fn resync_after(&self) -> Option<Duration> {
        self.inner.resync_after()
    }

    fn rules_flushed(&mut self) -> bool {
        self.inner.rules_flushed()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.inner.cleanup()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::{FakeControl, FakeDataplane};

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40Z"
        );
    }

    #[test]
    fn records_applied_and_failed() {
        let d = DebugState::new();
        let ctl = FakeControl::default();
        let settings =
            crate::config::Config::default().family_settings(IpFamily::V4, "n", None, &[]);
        let mut dp = d.wrap(
            Box::new(FakeDataplane::new(IpFamily::V4, ctl.clone())),
            settings,
        );
        let state = ProxyState {
            family: IpFamily::V4,
            ports: crate::model::PortList::new(),
            service_cidrs: vec![],
        };
        dp.sync(&state, true).unwrap();
        ctl.fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(dp.sync(&state, false).is_err());
        let text = d.ruleset_text();
        assert!(text.contains("last applied sync at"), "{text}");
        assert!(text.contains("last failed sync at"), "{text}");
        assert!(text.contains("error:"), "{text}");
        assert!(text.contains("add table ip kube-proxy"), "{text}");
    }
}

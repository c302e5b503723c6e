//! Shadow mode (`kproxy run --shadow`): next to a running kube-proxy, kproxy watches as
//! usual but never writes the node's rules. Each family's would-be sync is applied by
//! the ordinary dataplane inside a private scratch network namespace (so partial syncs
//! stay partial and cheap), read back there, and compared with the node's live rules:
//! a log line, `kproxy_shadow_differences{mode}` and the last report on `/debug/diff`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::metrics::Metrics;
use crate::config::{FamilySettings, Mode, NftablesLayout};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::diff::live::{self, Scratch};
use crate::diff::{Outcome, Ruleset};
use crate::iptables::apply::Backend;
use crate::model::{IpFamily, ProxyState};

/// Default ports in shadow mode, so as not to collide with kube-proxy's 10256 (healthz)
/// and 10249 (metrics) on the same node, nor kube-scheduler's 10259.
pub(crate) const HEALTHZ_PORT: u16 = 10266;
/// See [`HEALTHZ_PORT`].
pub(crate) const METRICS_PORT: u16 = 10269;

/// The last comparison of every family, combined for the metric and `/debug/diff`.
#[derive(Debug, Clone)]
pub(crate) struct ShadowReports {
    mode: Mode,
    metrics: Metrics,
    by_family: Arc<Mutex<BTreeMap<IpFamily, (usize, String)>>>,
}

impl ShadowReports {
    /// Reports of `mode`, exported through `metrics`.
    pub(crate) fn new(mode: Mode, metrics: Metrics) -> ShadowReports {
        ShadowReports {
            mode,
            metrics,
            by_family: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    fn record(&self, family: IpFamily, differences: usize, report: String) {
        let mut all = self
            .by_family
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.insert(family, (differences, report));
        let total = all.values().map(|(n, _)| n).sum();
        let text: String = all
            .iter()
            .map(|(f, (_, r))| format!("# {} ({})\n{r}", f.label(), self.mode.as_str()))
            .collect();
        self.metrics.shadow_compared(self.mode, total, text);
    }
}

/// Why a shadow comparison failed (reading either side, or the scratch namespace).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ShadowFailure(String);

/// A dataplane that renders and compares instead of applying.
pub(crate) struct ShadowDataplane {
    inner: Box<dyn Dataplane>,
    scratch: Scratch,
    mode: Mode,
    family: IpFamily,
    backend: Backend,
    reports: ShadowReports,
}

impl ShadowDataplane {
    /// A shadow of the `mode` dataplane for `settings.family` (creates its scratch
    /// network namespace: needs CAP_SYS_ADMIN).
    pub(crate) fn new(
        mode: Mode,
        settings: FamilySettings,
        backend: Backend,
        sync_period: Duration,
        reports: ShadowReports,
    ) -> Result<ShadowDataplane, live::LiveError> {
        let family = settings.family;
        Ok(ShadowDataplane {
            inner: live::scratch_plane(
                mode,
                NftablesLayout::Upstream,
                settings,
                backend,
                sync_period,
            ),
            scratch: Scratch::new()?,
            mode,
            family,
            backend,
            reports,
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> DataplaneError {
        DataplaneError {
            mode: self.mode.as_str(),
            family: self.family.label(),
            what: "shadow comparison",
            partial: false,
            source: Arc::new(ShadowFailure(e.to_string())),
        }
    }

    fn compare(&self) -> Result<Outcome, DataplaneError> {
        let (mode, family, backend) = (self.mode, self.family, self.backend);
        let want = self
            .scratch
            .run(|| live::read(mode, NftablesLayout::Upstream, family, backend))
            .and_then(|r| r)
            .map_err(|e| self.error(e))?;
        let have = live::read(mode, NftablesLayout::Upstream, family, backend)
            .map_err(|e| self.error(e))?;
        let parse = |text: &str| -> Result<Ruleset, DataplaneError> {
            live::parse(mode, family.label(), text).map_err(|e| self.error(e))
        };
        Ok(Outcome::new(mode, parse(&want)?, parse(&have)?))
    }
}

impl Dataplane for ShadowDataplane {
    fn family(&self) -> IpFamily {
        self.family
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn needs_full_sync(&self) -> bool {
        self.inner.needs_full_sync()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        let inner = &mut self.inner;
        let outcome = self
            .scratch
            .run(|| inner.sync(state, full))
            .map_err(|e| self.error(e))??;
        let cmp = self.compare()?;
        let n = cmp.differences.len();
        let report = cmp.report();
        let summary = report.lines().last().unwrap_or_default().to_string();
        if n == 0 {
            tracing::info!(
                family = self.family.label(),
                mode = self.mode.as_str(),
                "shadow: {summary}"
            );
        } else {
            tracing::warn!(
                family = self.family.label(),
                mode = self.mode.as_str(),
                differences = n,
                "shadow: {summary} (details on /debug/diff)"
            );
        }
        self.reports.record(self.family, n, report);
        Ok(outcome)
    }

    fn resync_after(&self) -> Option<Duration> {
        self.inner.resync_after()
    }

    fn rules_flushed(&mut self) -> bool {
        // Only the scratch namespace holds rules of ours, and nothing else touches it.
        false
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        // The node's rules are kube-proxy's: a shadow never removes anything there.
        Ok(())
    }
}

/// The shadow's dataplanes, one per family (no health-check node ports: kube-proxy
/// serves those). A family whose scratch namespace cannot be made is logged and left
/// out: a shadow must never fall back to writing the node's rules.
pub(crate) fn build_planes(
    cfg: &crate::config::Config,
    host: &crate::host::Host,
    node_name: &str,
    state: &crate::model::ClusterState,
    families: &[IpFamily],
    metrics: &Metrics,
) -> super::sync::Planes {
    let node_info = state.node().cloned();
    let backend = match cfg.mode {
        Mode::Iptables => crate::iptables::apply::detect_backend(&crate::iptables::apply::RealExec),
        Mode::Nftables => Backend::Default,
    };
    let reports = ShadowReports::new(cfg.mode, metrics.clone());
    let mut dataplanes: Vec<Box<dyn Dataplane>> = Vec::new();
    for f in families {
        // The host's view (addresses, tcp_be_liberal, no nfacct), as the daemon proper.
        let s = host.family_settings(cfg, *f, node_name, node_info.as_ref());
        match ShadowDataplane::new(cfg.mode, s, backend, cfg.sync_period, reports.clone()) {
            Ok(dp) => dataplanes.push(Box::new(dp)),
            Err(e) => {
                tracing::error!(family = f.label(), error = %e, "shadow: cannot compare this family")
            }
        }
    }
    super::sync::Planes {
        dataplanes,
        service_health: None,
    }
}

/// Moves the health and metrics ports off kube-proxy's unless given on the command line
/// (a kube-proxy configuration file names kube-proxy's own); the effective document
/// (`/configz`, `--write-config-to`) follows.
pub(crate) fn shadow_ports(
    cfg: &mut crate::config::Config,
    healthz_flag: bool,
    metrics_flag: bool,
) {
    if !healthz_flag {
        if let Some(a) = cfg.healthz_bind_address.as_mut() {
            a.set_port(HEALTHZ_PORT);
            cfg.document.healthz_bind_address = Some(a.to_string());
        }
    }
    if !metrics_flag {
        if let Some(a) = cfg.metrics_bind_address.as_mut() {
            a.set_port(METRICS_PORT);
            cfg.document.metrics_bind_address = Some(a.to_string());
        }
    }
}

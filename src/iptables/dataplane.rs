//! iptables mode end to end for one family: render from state, apply with
//! `iptables-restore`, remember only what the kernel accepted.

use std::time::{Duration, Instant};

use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome, TableRules};
use crate::model::{IpFamily, ProxyState};

use super::apply::{ApplyError, Binaries, Exec, Iptables};
use super::chunk::split_restore;
use super::render::{RenderOptions, Rendered, Renderer};

/// nat lines per restore when a large restore is applied in pieces (iptables-nft): a
/// 10k-Service first sync goes in ~44 pieces, 16 s in all, instead of one restore of
/// over 5 minutes (docs/benchmarks.md).
pub(crate) const RESTORE_PIECE_LINES: usize = 10_000;

/// What one sync did.
#[derive(Debug, Clone)]
pub(crate) struct SyncReport {
    /// Full or partial.
    pub full: bool,
    /// filter rules written.
    pub(crate) filter_rules: usize,
    /// nat rules written.
    pub(crate) nat_rules: usize,
    /// nat rules owned in total.
    pub(crate) nat_rules_total: usize,
    /// Services whose chains were rewritten.
    pub services_written: usize,
    /// Stale chains deleted.
    pub deleted_chains: usize,
}

/// One family's iptables dataplane.
pub(crate) struct IptablesDataplane {
    renderer: Renderer,
    exec: Box<dyn Exec>,
    bins: Binaries,
    sync_period: Duration,
    last_stale_cleanup: Option<Instant>,
    /// No sync has succeeded yet (the first one may take over a predecessor's rules).
    first: bool,
}

impl IptablesDataplane {
    /// A dataplane that has applied nothing yet.
    pub(crate) fn new(
        settings: FamilySettings,
        exec: Box<dyn Exec>,
        bins: Binaries,
        sync_period: Duration,
    ) -> Self {
        IptablesDataplane {
            renderer: Renderer::new(settings),
            exec,
            bins,
            sync_period,
            last_stale_cleanup: None,
            first: true,
        }
    }

    /// The iptables runner.
    pub(crate) fn iptables(&self) -> Iptables<'_> {
        Iptables::new(self.exec.as_ref(), self.bins.clone())
    }

    /// Renders and applies one sync. On failure nothing is recorded as applied and the
    /// next sync is full.
    pub(crate) fn sync(
        &mut self,
        state: &ProxyState,
        full: bool,
    ) -> Result<SyncReport, ApplyError> {
        let full = full || self.renderer.needs_full_sync();
        let ipt = Iptables::new(self.exec.as_ref(), self.bins.clone());
        let result = (|| -> Result<Rendered, ApplyError> {
            let existing = if full {
                ipt.ensure_jumps()?;
                ipt.ensure_canaries()?;
                Some(ipt.nat_chains()?)
            } else {
                None
            };
            if let (true, Some(chains)) = (self.first, &existing) {
                let service_chains = chains
                    .iter()
                    .filter(|c| super::names::is_service_chain(c))
                    .count();
                if service_chains > 0 {
                    // A restart (or a crash) left rules behind: the first sync rewrites
                    // them and deletes what is stale.
                    tracing::info!(
                        service_chains,
                        "took over the existing iptables rules left by a previous run"
                    );
                }
            }
            let due = self
                .last_stale_cleanup
                .is_none_or(|t| t.elapsed() > self.sync_period);
            let rendered = self.renderer.render(
                state,
                &RenderOptions {
                    full,
                    existing_nat_chains: existing.as_ref(),
                    large_cluster_cleanup_due: due,
                },
            );
            if self.bins.split_large_restores {
                // Consistent pieces, dispatch chains last (see `chunk`); a failure part
                // way leaves a consistent mix and the next sync is full.
                for piece in split_restore(&rendered.payload, RESTORE_PIECE_LINES) {
                    ipt.restore(&piece)?;
                }
            } else {
                ipt.restore(&rendered.payload)?;
            }
            Ok(rendered)
        })();
        match result {
            Ok(rendered) => {
                if !rendered.large_cluster || !rendered.deleted_chains.is_empty() {
                    self.last_stale_cleanup = Some(Instant::now());
                }
                let report = SyncReport {
                    full: rendered.full,
                    filter_rules: rendered.filter_rules,
                    nat_rules: rendered.nat_rules,
                    nat_rules_total: rendered.nat_rules_total,
                    services_written: rendered.services_written,
                    deleted_chains: rendered.deleted_chains.len(),
                };
                self.renderer.commit(rendered);
                self.first = false;
                Ok(report)
            }
            Err(e) => {
                self.renderer.invalidate();
                Err(e)
            }
        }
    }
}

impl IptablesDataplane {
    fn error(&self, partial: bool, e: ApplyError) -> DataplaneError {
        DataplaneError::sync_failed(Mode::Iptables, self.renderer.settings().family, partial, e)
    }
}

impl Dataplane for IptablesDataplane {
    fn family(&self) -> IpFamily {
        self.renderer.settings().family
    }

    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn needs_full_sync(&self) -> bool {
        self.renderer.needs_full_sync()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        let partial = !(full || self.renderer.needs_full_sync());
        let report =
            IptablesDataplane::sync(self, state, full).map_err(|e| self.error(partial, e))?;
        Ok(SyncOutcome {
            full: report.full,
            iptables_rules: vec![
                TableRules {
                    table: "filter",
                    total: report.filter_rules,
                    written: report.filter_rules,
                },
                TableRules {
                    table: "nat",
                    total: report.nat_rules_total,
                    written: report.nat_rules,
                },
            ],
            operations: report.filter_rules + report.nat_rules + report.deleted_chains,
            services_written: report.services_written,
            cleanup_failed: false,
        })
    }

    /// Upstream's canary: an empty `KUBE-PROXY-CANARY` chain in mangle; when it is gone,
    /// someone flushed the tables and everything must be rewritten.
    fn rules_flushed(&mut self) -> bool {
        !self.renderer.needs_full_sync() && self.iptables().canary_missing()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let result = self.iptables().cleanup();
        self.renderer.invalidate();
        result.map_err(|e| {
            DataplaneError::cleanup_failed(Mode::Iptables, self.renderer.settings().family, e)
        })
    }
}

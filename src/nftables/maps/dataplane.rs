//! Applies the maps layout with `nft -f -` (upstream's own way of talking to the
//! kernel; the netlink encoder does not write data maps yet), one atomic transaction
//! per sync. A full sync rewrites the table; a partial sync sends only the element
//! differences against what the last successful sync applied (and, when the endpoint
//! counts in use change, the rules).

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::render::{Desired, MapsRenderer};
use super::TABLE;
use crate::config::{FamilySettings, Mode};
use crate::dataplane::{Dataplane, DataplaneError, SyncOutcome};
use crate::model::{IpFamily, ProxyState};
use crate::nftables::text::transaction_text;
use crate::nftables::transaction::{Family, Op, Transaction};

/// Why `nft -f` failed.
#[derive(Debug, thiserror::Error)]
pub enum NftCliError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the input; the transaction was not applied.
    #[error("nft -f refused the transaction: {0}")]
    Refused(String),
}

/// Runs `nft -f -` with `text` (one atomic transaction).
pub fn nft_apply(text: &str) -> Result<(), NftCliError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftCliError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(NftCliError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftCliError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftCliError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// One family's maps-layout dataplane.
pub struct MapsDataplane {
    renderer: MapsRenderer,
    applied: Option<Desired>,
}

impl MapsDataplane {
    /// A dataplane that has applied nothing yet.
    pub fn new(settings: FamilySettings) -> Self {
        MapsDataplane {
            renderer: MapsRenderer::new(settings),
            applied: None,
        }
    }

    fn family_label(&self) -> IpFamily {
        self.renderer.settings().family
    }
}

/// A transaction that removes the table if it exists (`add` first, so that a missing
/// table is not an error).
pub fn delete_table(family: Family, table: &str) -> Transaction {
    let mut tx = Transaction::new(family, table);
    tx.push(Op::AddTable { comment: None });
    tx.push(Op::DeleteTable);
    tx
}

impl Dataplane for MapsDataplane {
    fn family(&self) -> IpFamily {
        self.family_label()
    }

    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn needs_full_sync(&self) -> bool {
        self.applied.is_none()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<SyncOutcome, DataplaneError> {
        let desired = self.renderer.desired(state);
        let (tx, full) = match (&self.applied, full) {
            (Some(old), false) => (self.renderer.render_diff(old, &desired), false),
            _ => (self.renderer.full_transaction(&desired), true),
        };
        let operations = tx.len();
        if !tx.is_empty() {
            if let Err(e) = nft_apply(&transaction_text(&tx)) {
                self.applied = None;
                return Err(DataplaneError::sync_failed(
                    Mode::Nftables,
                    self.family_label(),
                    !full,
                    e,
                ));
            }
        }
        self.applied = Some(desired);
        Ok(SyncOutcome {
            full,
            operations,
            ..SyncOutcome::default()
        })
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let tx = delete_table(Family::of(self.family_label()), TABLE);
        self.applied = None;
        nft_apply(&transaction_text(&tx))
            .map_err(|e| DataplaneError::cleanup_failed(Mode::Nftables, self.family_label(), e))
    }
}

//! TEMPORARY: forwards the sync loop's metric calls until metrics.rs grows them.
use std::time::Duration;

use super::metrics::Metrics;
use crate::config::Mode;
use crate::model::IpFamily;

impl Metrics {
    pub fn sync_attempt(&self, _f: IpFamily, _full: bool, _t: Duration) {}
    pub fn apply_failed(&self, f: IpFamily, m: Mode, _partial: bool) {
        self.failed(f, m)
    }
    pub fn nft_cleanup_failed(&self, _f: IpFamily) {}
    pub fn iptables_rules(&self, _f: IpFamily, _t: &str, _total: usize, _last: usize) {}
    pub fn network_programming(&self, _f: IpFamily, _l: Duration) {}
    pub fn no_local_endpoints(&self, _f: IpFamily, _i: usize, _e: usize) {}
    pub fn conntrack_reconciled(&self, _f: IpFamily, _t: Duration, _d: usize) {}
}

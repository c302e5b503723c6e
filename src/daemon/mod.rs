//! `kproxy run`: the node daemon. Watches Services, EndpointSlices, this Node and
//! ServiceCIDRs with kube-rs, keeps the compact [`ClusterState`], and syncs the rules
//! through one dataplane per IP family, rate-limited, with retries that force full syncs.
//! Serves `/healthz` + `/livez`, per-service health-check node ports and `/metrics`.

pub(crate) mod configz;
pub mod debug;
pub mod health;
pub mod http;
pub mod metrics;
mod raw;
pub mod shadow;
pub mod sync;
pub mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Condvar, LockResult, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::config::{Config, FamilySettings, Mode, NodePortAddresses};
use crate::host::Host;
use crate::model::{ClusterState, IpFamily, ProxyState};

/// What the watchers and the sync loop change together. It lives behind one lock with
/// one condition variable: a waiter checks its condition and goes to sleep atomically,
/// and every change is made (and signalled) under that lock, so no wake-up is lost and
/// nobody has to poll.
#[derive(Debug)]
pub(crate) struct DaemonState {
    /// The cluster.
    pub cluster: ClusterState,
    /// Something changed since the sync loop last took the state.
    dirty: bool,
    /// Kinds whose initial list is complete (services, slices, node, cidrs).
    listed: [bool; 4],
    /// `last-change-trigger-time` of EndpointSlice changes not yet synced, for the
    /// network-programming latency.
    trigger_times: Vec<(IpFamily, SystemTime)>,
    /// Service and EndpointSlice changes since the last sync (the `*_changes_pending`
    /// gauges).
    pending: (usize, usize),
}

/// The one lock and its condition variable; every view below shares them.
#[derive(Debug)]
struct Cell {
    state: Mutex<DaemonState>,
    wake: Condvar,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, DaemonState> {
        // A panicking holder cannot leave the state half-written in a way that matters
        // more than stopping the proxy would: every field is replaced whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`Shared::state`]: the cluster part of the shared state, under the one lock.
#[derive(Debug)]
pub struct StateView(Arc<Cell>);

/// The cluster state, locked.
pub struct ClusterGuard<'a>(MutexGuard<'a, DaemonState>);

impl std::ops::Deref for ClusterGuard<'_> {
    type Target = ClusterState;
    fn deref(&self) -> &ClusterState {
        &self.0.cluster
    }
}

impl std::ops::DerefMut for ClusterGuard<'_> {
    fn deref_mut(&mut self) -> &mut ClusterState {
        &mut self.0.cluster
    }
}

impl StateView {
    /// Locks the shared state and gives its cluster part (a poisoned lock is reported
    /// as `std::sync::Mutex` does).
    pub fn lock(&self) -> LockResult<ClusterGuard<'_>> {
        match self.0.state.lock() {
            Ok(g) => Ok(ClusterGuard(g)),
            Err(p) => Err(PoisonError::new(ClusterGuard(p.into_inner()))),
        }
    }
}

/// [`Shared::synced`]: which kinds have listed, under the one lock.
#[derive(Debug)]
pub struct ListedView(Arc<Cell>);

/// The listed flags, locked; the sync loop is woken when the guard is dropped.
pub struct ListedGuard<'a>(MutexGuard<'a, DaemonState>, &'a Condvar);

impl std::ops::Deref for ListedGuard<'_> {
    type Target = [bool; 4];
    fn deref(&self) -> &[bool; 4] {
        &self.0.listed
    }
}

impl std::ops::DerefMut for ListedGuard<'_> {
    fn deref_mut(&mut self) -> &mut [bool; 4] {
        &mut self.0.listed
    }
}

impl Drop for ListedGuard<'_> {
    fn drop(&mut self) {
        // Runs before the lock is released (fields drop after this), so the waiter
        // cannot miss it.
        self.1.notify_all();
    }
}

impl ListedView {
    /// Locks the listed flags (services, slices, node, cidrs).
    pub fn lock(&self) -> LockResult<ListedGuard<'_>> {
        Ok(ListedGuard(self.0.lock(), &self.0.wake))
    }
}

/// [`Shared::wake`]: wakes the sync loop (after `stop` was set, for instance).
#[derive(Debug)]
pub struct Wake(Arc<Cell>);

impl Wake {
    /// Wakes every waiter. The lock is taken first: a waiter is either before its
    /// check (and will see what the caller changed) or asleep (and is woken).
    pub fn notify_all(&self) {
        let _held = self.0.lock();
        self.0.wake.notify_all();
    }
}

/// What the watchers share with the sync loop.
pub struct Shared {
    cell: Arc<Cell>,
    /// The cluster (a view of the one lock).
    pub state: StateView,
    /// Kinds whose initial list is complete (a view of the one lock).
    pub synced: ListedView,
    /// Wakes the sync loop.
    pub wake: Wake,
    /// Health.
    pub health: health::Health,
    /// Metrics.
    pub metrics: metrics::Metrics,
    families: Vec<IpFamily>,
    /// What the dataplanes last applied, for /debug/ruleset and /debug/state.
    pub debug: debug::DebugState,
}

impl Shared {
    /// Fresh shared state: nothing listed yet, a sync pending.
    pub fn new(families: &[IpFamily], health: health::Health, metrics: metrics::Metrics) -> Shared {
        let cell = Arc::new(Cell {
            state: Mutex::new(DaemonState {
                cluster: ClusterState::new(),
                dirty: true,
                listed: [false; 4],
                trigger_times: Vec::new(),
                pending: (0, 0),
            }),
            wake: Condvar::new(),
        });
        Shared {
            state: StateView(Arc::clone(&cell)),
            synced: ListedView(Arc::clone(&cell)),
            wake: Wake(Arc::clone(&cell)),
            cell,
            families: families.to_vec(),
            health,
            metrics,
            debug: debug::DebugState::new(),
        }
    }

    /// Locks the shared state.
    pub(crate) fn lock(&self) -> MutexGuard<'_, DaemonState> {
        self.cell.lock()
    }

    /// Sleeps until woken (the guard is given back, locked).
    pub(crate) fn wait<'a>(&self, g: MutexGuard<'a, DaemonState>) -> MutexGuard<'a, DaemonState> {
        self.cell
            .wake
            .wait(g)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps until woken or `timeout` passed (the guard is given back, locked).
    pub(crate) fn wait_timeout<'a>(
        &self,
        g: MutexGuard<'a, DaemonState>,
        timeout: Duration,
    ) -> MutexGuard<'a, DaemonState> {
        self.cell
            .wake
            .wait_timeout(g, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Marks every watch as listed (tests that drive the state directly).
    pub fn mark_listed(&self) {
        self.lock().listed = [true; 4];
        self.cell.wake.notify_all();
    }

    /// Marks one kind's initial list as complete (slot 0..4: services, slices, node,
    /// cidrs) and wakes the sync loop.
    pub(crate) fn mark_kind_listed(&self, index: usize) {
        let mut st = self.lock();
        if let Some(slot) = st.listed.get_mut(index) {
            *slot = true;
        }
        self.cell.wake.notify_all();
    }

    /// Counts one Service (or EndpointSlice) event from a watch.
    pub(crate) fn note_change(&self, endpoints: bool) {
        self.metrics.change(endpoints);
        let (services, slices) = {
            let mut st = self.lock();
            if endpoints {
                st.pending.1 += 1;
            } else {
                st.pending.0 += 1;
            }
            st.pending
        };
        self.metrics.changes_pending(services, slices);
    }

    /// Records an EndpointSlice change's trigger time.
    pub fn trigger(&self, family: IpFamily, at: SystemTime) {
        self.lock().trigger_times.push((family, at));
    }

    /// Marks a change and wakes the sync loop.
    pub fn changed(&self) {
        self.health.queued();
        self.metrics.queued(&self.families);
        // Set under the lock: the sync loop either saw it or is asleep and is woken.
        self.lock().dirty = true;
        self.cell.wake.notify_all();
    }
}

impl DaemonState {
    /// Every kind has listed once.
    pub(crate) fn all_listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// A change is waiting for the sync loop.
    pub(crate) fn dirty(&self) -> bool {
        self.dirty
    }

    /// The sync loop takes every change so far: clears the flag and the pending counts
    /// and returns the trigger times recorded since the last take.
    pub(crate) fn take_changes(&mut self) -> Vec<(IpFamily, SystemTime)> {
        self.dirty = false;
        self.pending = (0, 0);
        std::mem::take(&mut self.trigger_times)
    }
}

/// Why the daemon stopped (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The async runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No usable API server client.
    #[error("{0}")]
    Client(String),
    /// A server could not bind and bindAddressHardFail is set.
    #[error("{what} server on {addr}: {source}")]
    Bind {
        /// healthz or metrics.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `--write-config-to` failed.
    #[error("writing the configuration to {path}: {source}")]
    WriteConfig {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration could not be serialised.
    #[error("encoding the configuration: {0}")]
    Encode(#[source] serde_yaml_ng::Error),
    /// `--cleanup` failed.
    #[error("cleanup: {0}")]
    Cleanup(String),
}

/// Writes the effective configuration as upstream's v1alpha1 YAML
/// (`--write-config-to`).
pub(crate) fn write_config(cfg: &Config, path: &Path) -> Result<(), DaemonError> {
    let yaml = cfg.document.to_yaml().map_err(DaemonError::Encode)?;
    std::fs::write(path, yaml).map_err(|source| DaemonError::WriteConfig {
        path: path.display().to_string(),
        source,
    })?;
    tracing::info!(file = %path.display(), "Wrote configuration");
    Ok(())
}

/// The privileged start-up work (`--init-only` stops after it): conntrack sysctls, and
/// route_localnet for localhost NodePorts in iptables mode.
pub(crate) fn init_host(cfg: &Config) {
    crate::sysctl::tune_conntrack(&cfg.conntrack);
    if cfg.mode == Mode::Iptables && cfg.localhost_nodeports {
        crate::sysctl::ensure_or_warn("net/ipv4/conf/all/route_localnet", "1");
    }
}

/// Sets this process's oom_score_adj (upstream: -999 by default); a failure is logged.
fn apply_oom_score_adj(value: i32) {
    match std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
        Ok(()) => tracing::debug!(value, "oom_score_adj set"),
        Err(e) => tracing::warn!(value, error = %e, "could not set oom_score_adj"),
    }
}

/// Binds a server; a failure is fatal only with bindAddressHardFail, as upstream.
fn bind_or_warn<T>(
    what: &'static str,
    addr: Option<SocketAddr>,
    hard_fail: bool,
    start: impl FnOnce(SocketAddr) -> std::io::Result<T>,
) -> Result<Option<T>, DaemonError> {
    let Some(addr) = addr else {
        tracing::info!("{what} server disabled");
        return Ok(None);
    };
    match start(addr) {
        Ok(server) => Ok(Some(server)),
        Err(source) if hard_fail => Err(DaemonError::Bind { what, addr, source }),
        Err(e) => {
            tracing::error!(%addr, error = %e, "failed to start the {what} server; continuing (bindAddressHardFail is false)");
            Ok(None)
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. `cfg` comes from the one merge of flags
/// over the config file (`config::resolve`); `master` is `--master`.
/// How the daemon runs beyond its configuration (kproxy's own switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Serve /debug/ruleset and /debug/state on the metrics address.
    pub(crate) debug_endpoints: bool,
    /// Shadow mode: nothing on the node is written (no rules, sysctls, conntrack
    /// entries or health-check ports): see [`shadow`].
    pub shadow: bool,
}

pub fn run(cfg: &Config, master: Option<&str>, opts: RunOptions) -> Result<(), DaemonError> {
    let RunOptions {
        debug_endpoints,
        shadow,
    } = opts;
    apply_oom_score_adj(cfg.oom_score_adj);
    if !shadow {
        init_host(cfg);
    }
    let node_name = cfg
        .hostname_override
        .clone()
        .unwrap_or_else(crate::host::system_hostname);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    // The HTTP servers (healthz, metrics, health-check node ports) run on this runtime;
    // they find it from the calling thread, which is this one for the whole run.
    let _in_runtime = rt.enter();
    let client = rt
        .block_on(watch::client(cfg, master))
        .map_err(DaemonError::Client)?;

    let host = Host::probe();
    // Upstream's platformCleanup: the other mode's rules must not keep routing.
    if !shadow {
        host.remove_other_mode_leftovers(cfg.mode);
        host.remove_other_layout_leftovers(cfg);
    }
    // Dual stack when the node has addresses of both families (upstream's
    // meta-proxier): one dataplane per family.
    let families = host.families();
    tracing::info!(
        mode = cfg.mode.as_str(),
        node = %node_name,
        families = ?families.iter().map(|f| f.label()).collect::<Vec<_>>(),
        "starting"
    );
    let metrics = metrics::Metrics::new();
    metrics.set_configz(configz::body(cfg));
    let health = health::Health::new(&families, cfg.sync_period).with_metrics(metrics.clone());
    // Not eligible for load-balancer traffic until this node's Node object is seen.
    health.set_node_eligible(false);
    let shared = Arc::new(Shared::new(&families, health.clone(), metrics));
    shared
        .lock()
        .cluster
        .set_lb_ip_mode_gate(cfg.feature_gate("LoadBalancerIPMode"));
    let hard = cfg.bind_address_hard_fail;
    let _healthz = bind_or_warn("healthz", cfg.healthz_bind_address, hard, |a| {
        health::serve_healthz(a, health.clone())
    })?;
    let debug_shared = debug_endpoints.then(|| Arc::clone(&shared));
    let _metrics = bind_or_warn("metrics", cfg.metrics_bind_address, hard, |a| {
        let d = debug_shared.clone();
        metrics::serve_with(
            a,
            shared.metrics.clone(),
            cfg.mode,
            Box::new(move |req| d.as_ref()?.debug.handle(d.as_ref()?, req)),
        )
    })?;
    watch::spawn_all(&rt, client, Arc::clone(&shared), node_name.clone());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        let shared = Arc::clone(&shared);
        rt.spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            shared.wake.notify_all();
        });
    }
    let settings = sync::LoopSettings {
        node_name: node_name.clone(),
        prefer_same_node: cfg.feature_gate("PreferSameTrafficDistribution"),
        min_sync_period: cfg.min_sync_period,
        sync_period: cfg.sync_period,
        full_sync_period: sync::FULL_SYNC_PERIOD,
    };
    let factory_cfg = cfg.clone();
    let factory_shared = Arc::clone(&shared);
    sync::SyncLoop::deferred(
        settings,
        Box::new(move |state: &ClusterState| {
            if shadow {
                let m = &factory_shared.metrics;
                return shadow::build_planes(&factory_cfg, &host, &node_name, state, &families, m);
            }
            build_planes(
                &factory_cfg,
                &host,
                &node_name,
                state,
                &families,
                &factory_shared,
            )
        }),
    )
    .with_conntrack(Box::new(move |state: &ProxyState| {
        if shadow {
            return Ok(0);
        }
        crate::conntrack::reconcile(state).map_err(|e| e.to_string())
    }))
    .run(&shared, &stop);
    tracing::info!("stopping; rules stay in place");
    Ok(())
}

/// One dataplane per family in the configured mode (built by [`Host`]), plus the
/// health-check node port servers (bound to the first IPv4 NodePort address, as
/// upstream).
fn build_planes(
    cfg: &Config,
    host: &Host,
    node_name: &str,
    state: &ClusterState,
    families: &[IpFamily],
    shared: &Arc<Shared>,
) -> sync::Planes {
    let node_info = state.node().cloned();
    shared.debug.set_node(crate::model::NodeContext {
        name: node_name.to_string(),
        zone: node_info.as_ref().and_then(|n| n.zone.clone()),
        prefer_same_node: cfg.feature_gate("PreferSameTrafficDistribution"),
    });
    let settings: Vec<FamilySettings> = families
        .iter()
        .map(|f| host.family_settings(cfg, *f, node_name, node_info.as_ref()))
        .collect();
    let hc_bind = settings
        .iter()
        .find(|s| s.family == IpFamily::V4)
        .and_then(|s| match &s.nodeport_addresses {
            NodePortAddresses::Ips(ips) => ips.first().copied(),
            NodePortAddresses::All => None,
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    // Each dataplane's syncs are recorded for /debug/ruleset and /debug/state.
    let dataplanes = host
        .dataplanes(cfg, settings.clone())
        .into_iter()
        .map(
            |dp| match settings.iter().find(|s| s.family == dp.family()) {
                Some(s) => shared.debug.wrap(dp, s.clone()),
                None => dp,
            },
        )
        .collect();
    sync::Planes {
        dataplanes,
        service_health: Some(health::ServiceHealth::new(shared.health.clone(), hc_bind)),
    }
}

//! `kproxy run`: the node daemon. Watches Services, EndpointSlices, this Node and
//! ServiceCIDRs with kube-rs, keeps the compact [`ClusterState`], and syncs the rules
//! through one dataplane per IP family, rate-limited, with retries that force full syncs.
//! Serves `/healthz` + `/livez`, per-service health-check node ports and `/metrics`.

pub mod health;
pub mod http;
pub mod metrics;
pub mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;

use crate::config::{Config, FamilySettings, Mode, NodePortAddresses};
use crate::iptables::apply::{detect_backend, Binaries, RealExec};
use crate::iptables::dataplane::IptablesDataplane;
use crate::model::{ClusterState, IpFamily, NodeContext, ProxyState};
use crate::nftables::netlink::Netlink;
use crate::nftables::render::{NftRenderer, RenderOptions, TABLE};
use crate::nftables::transaction::Family;

/// `kproxy run` flags (upstream kube-proxy's names).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// KubeProxyConfiguration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// kubeconfig (default: in-cluster, then $KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// API server address, overriding the kubeconfig's.
    #[arg(long)]
    pub master: Option<String>,
    /// This node's name.
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// iptables or nftables.
    #[arg(long)]
    pub proxy_mode: Option<String>,
    /// Pod network CIDR(s).
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// Masquerade all service traffic.
    #[arg(long)]
    pub masquerade_all: bool,
    /// NodePort addresses (CIDRs or `primary`).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// /healthz and /livez address.
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// /metrics address.
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Minimum time between syncs (e.g. 1s, 0s).
    #[arg(
        long,
        alias = "iptables-min-sync-period",
        alias = "nftables-min-sync-period"
    )]
    pub min_sync_period: Option<String>,
    /// Retry interval after a failed sync.
    #[arg(long, alias = "iptables-sync-period", alias = "nftables-sync-period")]
    pub sync_period: Option<String>,
    /// Remove kproxy's rules and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// One family's rules, whichever mode.
pub trait Dataplane {
    /// Renders and applies; a failure leaves "applied" unchanged and makes the next
    /// sync full.
    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<bool, String>;

    /// A follow-up sync this dataplane needs even without changes (e.g. to delete
    /// chains it flushed, once the kernel let go of them).
    fn resync_after(&self) -> Option<Duration> {
        None
    }

    /// Whether something outside kproxy removed its rules (then the next sync is full).
    fn rules_flushed(&mut self) -> bool {
        false
    }
}

impl Dataplane for IptablesDataplane {
    /// Upstream's canary: an empty `KUBE-PROXY-CANARY` chain in mangle; when it is gone,
    /// someone flushed the tables and everything must be rewritten.
    fn rules_flushed(&mut self) -> bool {
        !self.needs_full_sync() && self.iptables().canary_missing()
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<bool, String> {
        IptablesDataplane::sync(self, state, full)
            .map(|r| r.full)
            .map_err(|e| e.to_string())
    }
}

/// nftables over netlink for one family.
pub struct NftDataplane {
    renderer: NftRenderer,
    netlink: Option<Netlink>,
    clock: Instant,
    first: bool,
}

impl NftDataplane {
    /// A dataplane that has applied nothing yet (its first sync reads the table back).
    pub fn new(settings: FamilySettings) -> Self {
        NftDataplane {
            renderer: NftRenderer::new(settings),
            netlink: None,
            clock: Instant::now(),
            first: true,
        }
    }
}

impl Dataplane for NftDataplane {
    fn resync_after(&self) -> Option<Duration> {
        (!self.renderer.stale_chains().is_empty())
            .then(|| Duration::from_millis(crate::nftables::render::STALE_CHAIN_DELAY_MS + 100))
    }

    fn sync(&mut self, state: &ProxyState, full: bool) -> Result<bool, String> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::open().map_err(|e| e.to_string())?);
        }
        let Some(nl) = self.netlink.as_mut() else {
            return Err("no netlink socket".into());
        };
        let family = Family::of(self.renderer.settings().family);
        let full = full || self.renderer.needs_full_sync();
        // Full syncs re-read the kernel's table so drift (or a predecessor's table) is
        // corrected; partial syncs trust our record.
        let existing = if full {
            nl.read_table(family, TABLE).map_err(|e| e.to_string())?
        } else {
            None
        };
        let rendered = self.renderer.render(
            state,
            &RenderOptions {
                full,
                now_ms: self.clock.elapsed().as_millis() as u64,
                existing: existing.as_ref(),
            },
        );
        let result = (|| {
            if let Some(c) = &rendered.cleanup {
                nl.apply(c)?;
            }
            if self.first && existing.is_none() {
                for part in rendered
                    .main
                    .clone()
                    .split(crate::nftables::COLD_SYNC_BATCH_OPS)
                {
                    nl.apply(&part)?;
                }
                Ok(())
            } else {
                nl.apply(&rendered.main)
            }
        })();
        match result {
            Ok(()) => {
                self.first = false;
                let was_full = rendered.full;
                self.renderer.commit(rendered);
                Ok(was_full)
            }
            Err(e) => {
                self.renderer.invalidate();
                Err(e.to_string())
            }
        }
    }
}

/// What the watchers share with the sync loop.
pub struct Shared {
    /// The cluster.
    pub state: Mutex<ClusterState>,
    /// Set when something changed; the sync loop waits on it.
    pub dirty: Mutex<bool>,
    /// Wakes the sync loop.
    pub wake: Condvar,
    /// Kinds whose initial list is complete (services, slices, node, cidrs).
    pub synced: Mutex<[bool; 4]>,
    /// Health.
    pub health: health::Health,
    /// Metrics.
    pub metrics: metrics::Metrics,
}

impl Shared {
    /// Marks a change and wakes the sync loop.
    pub fn changed(&self) {
        *self.dirty.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.health.queued();
        self.wake.notify_all();
    }
}

fn build_config(args: &RunArgs) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut problems = Vec::new();
    if let Some(m) = &args.proxy_mode {
        match Mode::parse(m) {
            Some(mode) => cfg.mode = mode,
            None => problems.push(format!("--proxy-mode {m:?} is not iptables or nftables")),
        }
    }
    if let Some(c) = &args.cluster_cidr {
        cfg.set_cluster_cidrs(c, &mut problems);
    }
    cfg.masquerade_all |= args.masquerade_all;
    if !args.nodeport_addresses.is_empty() {
        cfg.nodeport_addresses = args.nodeport_addresses.clone();
    }
    if let Some(h) = &args.hostname_override {
        cfg.hostname_override = Some(h.clone());
    }
    for (flag, val, slot) in [
        (
            "--healthz-bind-address",
            &args.healthz_bind_address,
            &mut cfg.healthz_bind_address,
        ),
        (
            "--metrics-bind-address",
            &args.metrics_bind_address,
            &mut cfg.metrics_bind_address,
        ),
    ] {
        if let Some(v) = val {
            match v.parse::<SocketAddr>() {
                Ok(a) => *slot = a,
                Err(_) => problems.push(format!("{flag} {v:?} is not IP:port")),
            }
        }
    }
    for (flag, val, slot) in [
        (
            "--min-sync-period",
            &args.min_sync_period,
            &mut cfg.min_sync_period,
        ),
        ("--sync-period", &args.sync_period, &mut cfg.sync_period),
    ] {
        if let Some(v) = val {
            match crate::config::parse_duration(v) {
                Some(d) => *slot = d,
                None => problems.push(format!("{flag} {v:?} is not a duration")),
            }
        }
    }
    if let Some(k) = &args.kubeconfig {
        cfg.kubeconfig = Some(k.display().to_string());
    }
    if let Err(e) = cfg.validate() {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(format!("invalid configuration: {}", problems.join("; ")))
    }
}

/// The node's interface addresses (for nodePortAddresses), read from the kernel.
fn local_addresses() -> Vec<ipnet::IpNet> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(t) = w.next() {
                if t == "inet" || t == "inet6" {
                    return w.next()?.parse().ok();
                }
            }
            None
        })
        .collect()
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(args: &RunArgs) -> Result<(), String> {
    let cfg = build_config(args)?;
    if args.cleanup {
        let c = crate::cli::apply::CleanupArgs { mode: None };
        return crate::cli::apply::run_cleanup(&c).map_err(|e| e.to_string());
    }
    crate::sysctl::tune_conntrack(&cfg.conntrack);
    let node_name = cfg
        .hostname_override
        .clone()
        .unwrap_or_else(crate::cli::inputs::system_hostname);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    let client = rt.block_on(watch::client(&cfg, args.master.as_deref()))?;

    let families = [IpFamily::V4, IpFamily::V6];
    let health = health::Health::new(&[IpFamily::V4], cfg.sync_period);
    let shared = Arc::new(Shared {
        state: Mutex::new(ClusterState::new()),
        dirty: Mutex::new(true),
        wake: Condvar::new(),
        synced: Mutex::new([false; 4]),
        health: health.clone(),
        metrics: metrics::Metrics::new(),
    });
    let _healthz = health::serve_healthz(cfg.healthz_bind_address, health.clone())
        .map_err(|e| format!("healthz on {}: {e}", cfg.healthz_bind_address))?;
    let _metrics = metrics::serve(cfg.metrics_bind_address, shared.metrics.clone(), cfg.mode)
        .map_err(|e| format!("metrics on {}: {e}", cfg.metrics_bind_address))?;
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
    sync_loop(&cfg, &node_name, &families, &shared, &stop);
    tracing::info!("stopping; rules stay in place");
    Ok(())
}

fn sync_loop(
    cfg: &Config,
    node_name: &str,
    families: &[IpFamily],
    shared: &Shared,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    // Never touch the rules before every watch has listed: a restart must not flush
    // working rules with a half-known cluster.
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let synced = *shared.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if synced.iter().all(|s| *s) {
            break;
        }
        let guard = shared.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = shared.wake.wait_timeout(guard, Duration::from_millis(200));
    }
    let addrs = local_addresses();
    let mut planes: Vec<(IpFamily, Box<dyn Dataplane>)> = Vec::new();
    let backend = detect_backend(&RealExec);
    let node_info = shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .node()
        .cloned();
    let mut hc_bind = IpAddr::from([0, 0, 0, 0]);
    for f in families {
        let has_family = addrs
            .iter()
            .any(|a| f.contains(&a.addr()) && !a.addr().is_loopback())
            || *f == IpFamily::V4;
        if !has_family {
            continue;
        }
        let mut s = cfg.family_settings(*f, node_name, node_info.as_ref(), &addrs);
        s.nfacct_invalid = false;
        s.nfacct_localhost = false;
        if *f == IpFamily::V4 {
            if let NodePortAddresses::Ips(ips) = &s.nodeport_addresses {
                if let Some(ip) = ips.first() {
                    hc_bind = *ip;
                }
            }
        }
        let dp: Box<dyn Dataplane> = match cfg.mode {
            Mode::Iptables => {
                if *f == IpFamily::V4 && s.localhost_nodeports {
                    crate::sysctl::ensure_or_warn("net/ipv4/conf/all/route_localnet", "1");
                }
                Box::new(IptablesDataplane::new(
                    s,
                    Box::new(RealExec),
                    Binaries::new(*f, backend),
                    cfg.sync_period,
                ))
            }
            Mode::Nftables => Box::new(NftDataplane::new(s)),
        };
        planes.push((*f, dp));
    }
    let mut hc = health::ServiceHealth::new(shared.health.clone(), hc_bind);
    let mut last_sync: Option<Instant> = None;
    let mut last_full = Instant::now();
    let mut force_full = true;
    let mut backoff = Duration::from_millis(500);
    let mut follow_up: Option<Duration> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // Wait for a change, the periodic full resync, or a retry.
        {
            let mut dirty = shared.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            let wait = if force_full {
                backoff
            } else {
                follow_up.unwrap_or(cfg.sync_period).min(cfg.sync_period)
            };
            let deadline = Instant::now() + wait;
            while !*dirty && !stop.load(Ordering::SeqCst) && !force_full {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                dirty = shared
                    .wake
                    .wait_timeout(dirty, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            *dirty = false;
        }
        // minSyncPeriod between the end of one sync and the start of the next; changes
        // arriving meanwhile are coalesced into this sync.
        if let Some(t) = last_sync {
            let since = t.elapsed();
            if since < cfg.min_sync_period {
                std::thread::sleep(cfg.min_sync_period - since);
                *shared.dirty.lock().unwrap_or_else(PoisonError::into_inner) = false;
            }
        }
        let mut flushed = false;
        for (family, dp) in planes.iter_mut() {
            if dp.rules_flushed() {
                tracing::warn!(
                    family = family.label(),
                    "kproxy's rules were flushed; resyncing fully"
                );
                flushed = true;
            }
        }
        let full = force_full || flushed || last_full.elapsed() > Duration::from_secs(3600);
        let (states, eligible) = {
            let st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let node = NodeContext {
                name: node_name.to_string(),
                zone: st.node().and_then(|n| n.zone.clone()),
                prefer_same_node: cfg.feature_gate("PreferSameTrafficDistribution"),
            };
            let eligible = st.node().is_some_and(|n| !n.being_deleted);
            let states: Vec<ProxyState> = planes
                .iter()
                .map(|(f, _)| st.proxy_state(*f, &node))
                .collect();
            (states, eligible)
        };
        shared.health.set_node_eligible(eligible);
        let started = Instant::now();
        let mut ok = true;
        for ((family, dp), state) in planes.iter_mut().zip(&states) {
            match dp.sync(state, full) {
                Ok(was_full) => {
                    shared.health.updated(*family);
                    shared.metrics.synced(*family, was_full, started.elapsed());
                    crate::cli::apply::reconcile_conntrack(state);
                }
                Err(e) => {
                    ok = false;
                    shared.metrics.failed(*family, cfg.mode);
                    tracing::error!(family = family.label(), error = %e, "sync failed; retrying with a full sync");
                }
            }
        }
        if let Some(state) = states.first() {
            hc.update(state);
        }
        follow_up = planes.iter().filter_map(|(_, dp)| dp.resync_after()).min();
        last_sync = Some(Instant::now());
        if ok {
            if full {
                last_full = Instant::now();
                // A full sync builds the whole transaction (and the watchers' initial
                // lists held full objects); hand the freed heap back to the system so
                // the steady-state footprint is the compact model, not the peak.
                // SAFETY: malloc_trim only releases free memory; no pointers change.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
            force_full = false;
            backoff = Duration::from_millis(500);
        } else {
            force_full = true;
            backoff = (backoff * 2).min(cfg.sync_period.max(Duration::from_secs(1)));
        }
    }
}

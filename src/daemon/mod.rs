//! `kproxy run`: the node daemon. Watches Services, EndpointSlices, this Node and
//! ServiceCIDRs with kube-rs, keeps the compact [`ClusterState`], and syncs the rules
//! through one dataplane per IP family, rate-limited, with retries that force full syncs.
//! Serves `/healthz` + `/livez`, per-service health-check node ports and `/metrics`.

pub mod configz;
pub mod health;
pub mod http;
pub mod metrics;
pub mod shadow;
pub mod sync;
pub mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::SystemTime;

use clap::Args;

use crate::config::{Config, Mode, NodePortAddresses};
use crate::dataplane::Dataplane;
use crate::iptables::apply::{detect_backend, Binaries, RealExec};
use crate::iptables::dataplane::IptablesDataplane;
use crate::model::{ClusterState, IpFamily, ProxyState};
use crate::nftables::dataplane::NftDataplane;

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
    /// Shadow mode: never write rules; compare would-be syncs with the live rules
    /// (healthz/metrics ports default to 10266/10269).
    #[arg(long, env = "KPROXY_SHADOW")]
    pub shadow: bool,
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
    /// `last-change-trigger-time` of EndpointSlice changes not yet synced, for the
    /// network-programming latency.
    pub trigger_times: Mutex<Vec<(IpFamily, SystemTime)>>,
    /// Service and EndpointSlice changes since the last sync (the `*_changes_pending`
    /// gauges).
    pending: Mutex<(usize, usize)>,
    families: Vec<IpFamily>,
}

impl Shared {
    /// Fresh shared state: nothing listed yet, a sync pending.
    pub fn new(families: &[IpFamily], health: health::Health, metrics: metrics::Metrics) -> Shared {
        Shared {
            pending: Mutex::new((0, 0)),
            families: families.to_vec(),
            state: Mutex::new(ClusterState::new()),
            dirty: Mutex::new(true),
            wake: Condvar::new(),
            synced: Mutex::new([false; 4]),
            health,
            metrics,
            trigger_times: Mutex::new(Vec::new()),
        }
    }

    /// Marks every watch as listed (tests that drive the state directly).
    pub fn mark_listed(&self) {
        *self.synced.lock().unwrap_or_else(PoisonError::into_inner) = [true; 4];
        self.wake.notify_all();
    }

    /// Counts one Service (or EndpointSlice) event from a watch.
    pub fn note_change(&self, endpoints: bool) {
        self.metrics.change(endpoints);
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if endpoints {
            p.1 += 1;
        } else {
            p.0 += 1;
        }
        self.metrics.changes_pending(p.0, p.1);
    }

    /// The sync loop took every pending change.
    pub fn changes_taken(&self) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = (0, 0);
        self.metrics.changes_pending(0, 0);
    }

    /// Records an EndpointSlice change's trigger time.
    pub fn trigger(&self, family: IpFamily, at: SystemTime) {
        self.trigger_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((family, at));
    }

    /// Trigger times recorded since the last call.
    pub fn take_trigger_times(&self) -> Vec<(IpFamily, SystemTime)> {
        std::mem::take(
            &mut *self
                .trigger_times
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Marks a change and wakes the sync loop.
    pub fn changed(&self) {
        *self.dirty.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.health.queued();
        self.metrics.queued(&self.families);
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
    let mut cfg = build_config(args)?;
    if args.shadow {
        let (h, m) = (
            args.healthz_bind_address.is_some(),
            args.metrics_bind_address.is_some(),
        );
        shadow::shadow_ports(&mut cfg, h, m);
    }
    if args.cleanup {
        let c = crate::cli::apply::CleanupArgs { mode: None };
        return crate::cli::apply::run_cleanup(&c).map_err(|e| e.to_string());
    }
    if !args.shadow {
        crate::sysctl::tune_conntrack(&cfg.conntrack);
    }
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

    // Dual stack when the node has addresses of both families (upstream's
    // meta-proxier): one dataplane per family.
    let addrs = local_addresses();
    let families = node_families(&addrs);
    tracing::info!(
        mode = cfg.mode.as_str(),
        families = ?families.iter().map(|f| f.label()).collect::<Vec<_>>(),
        "starting"
    );
    let metrics = metrics::Metrics::new();
    metrics.set_configz(configz::body(&cfg));
    let health = health::Health::new(&families, cfg.sync_period).with_metrics(metrics.clone());
    // Not eligible for load-balancer traffic until this node's Node object is seen.
    health.set_node_eligible(false);
    let shared = Arc::new(Shared::new(&families, health.clone(), metrics));
    shared
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .set_lb_ip_mode_gate(cfg.feature_gate("LoadBalancerIPMode"));
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
    let settings = sync::LoopSettings {
        node_name: node_name.clone(),
        prefer_same_node: cfg.feature_gate("PreferSameTrafficDistribution"),
        min_sync_period: cfg.min_sync_period,
        sync_period: cfg.sync_period,
        full_sync_period: sync::FULL_SYNC_PERIOD,
    };
    let factory_cfg = cfg.clone();
    let factory_shared = Arc::clone(&shared);
    let shadow = args.shadow;
    sync::SyncLoop::deferred(
        settings,
        Box::new(move |state: &ClusterState| {
            if shadow {
                let m = &factory_shared.metrics;
                return shadow::build_planes(&factory_cfg, &node_name, state, &families, &addrs, m);
            }
            build_planes(
                &factory_cfg,
                &node_name,
                state,
                &families,
                &addrs,
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

/// The IP families this node serves: IPv4 always (upstream's default primary family),
/// IPv6 too when the node has a global IPv6 address.
pub fn node_families(addrs: &[ipnet::IpNet]) -> Vec<IpFamily> {
    let mut families = vec![IpFamily::V4];
    if addrs.iter().any(|a| {
        let ip = a.addr();
        IpFamily::V6.contains(&ip) && !ip.is_loopback() && !is_link_local(&ip)
    }) {
        families.push(IpFamily::V6);
    }
    families
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

/// One dataplane per family in the configured mode, plus the health-check node port
/// servers (bound to the first IPv4 NodePort address, as upstream).
fn build_planes(
    cfg: &Config,
    node_name: &str,
    state: &ClusterState,
    families: &[IpFamily],
    addrs: &[ipnet::IpNet],
    shared: &Arc<Shared>,
) -> sync::Planes {
    let node_info = state.node().cloned();
    let backend = (cfg.mode == Mode::Iptables).then(|| detect_backend(&RealExec));
    let mut dataplanes: Vec<Box<dyn Dataplane>> = Vec::new();
    let mut hc_bind = IpAddr::from([0, 0, 0, 0]);
    for f in families {
        let mut s = cfg.family_settings(*f, node_name, node_info.as_ref(), addrs);
        // nfacct objects are not created by kproxy (no metrics read them yet).
        s.nfacct_invalid = false;
        s.nfacct_localhost = false;
        if *f == IpFamily::V4 {
            if let NodePortAddresses::Ips(ips) = &s.nodeport_addresses {
                if let Some(ip) = ips.first() {
                    hc_bind = *ip;
                }
            }
        }
        let dp: Box<dyn Dataplane> = match (cfg.mode, backend) {
            (Mode::Iptables, Some(backend)) => {
                if *f == IpFamily::V4 && s.localhost_nodeports {
                    crate::sysctl::ensure_or_warn("net/ipv4/conf/all/route_localnet", "1");
                }
                tracing::info!(
                    family = f.label(),
                    backend = ?backend,
                    "iptables backend"
                );
                Box::new(IptablesDataplane::new(
                    s,
                    Box::new(RealExec),
                    Binaries::new(*f, backend),
                    cfg.sync_period,
                ))
            }
            _ => Box::new(NftDataplane::new(s)),
        };
        dataplanes.push(dp);
    }
    sync::Planes {
        dataplanes,
        service_health: Some(health::ServiceHealth::new(shared.health.clone(), hc_bind)),
    }
}

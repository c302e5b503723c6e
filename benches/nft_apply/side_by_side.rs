//! Both nftables layouts side by side, in one run, on the same synthetic clusters
//! (N Services × 10 endpoints, a quarter NodePorts), each variant at each size in its
//! own child process (so its peak RSS is its own) and its own fresh network namespaces:
//!
//! - `upstream-netlink`: upstream's `kube-proxy` table through kproxy's `NftDataplane`
//!   over netlink (the default; the daemon's path: `Dataplane::sync`);
//! - `maps-netlink`: `--nftables-layout=maps` through `MapsDataplane` over netlink
//!   (the daemon's path: `Dataplane::sync`);
//! - `upstream-nft`: upstream's own way: the same renderer's transaction text piped to
//!   `nft -f`, cold and incremental (the partial transaction of each change, as upstream
//!   kube-proxy sends it). A cold `nft -f` above `NFT_FULL_MAX` Services (default 10000)
//!   is killed after `NFT_TIMEOUT` seconds (default 120) and recorded as a timeout;
//! - `maps-nft` (only when named in `VARIANTS`): the maps transactions through `nft -f`.
//!
//! Measured per variant, end to end (derive the state from the cluster, render or diff,
//! encode, kernel ack): the cold sync; `CHANGES` (default 50) one-endpoint changes, p50
//! and p99; `SERVICE_CHANGES` (default 10) pairs of one Service added and removed, p50;
//! the process's peak RSS (and `nft`'s, for the `nft` variants); and for the netlink
//! variants the first-packet latency: from a client namespace through the node's rules to
//! a TCP echo server in an endpoint namespace (which answers for every endpoint
//! address), connect + one exchange + close, p50 and p99 over `CONNECTIONS` (default 1000)
//! new connections to the first and as many to the last Service, taking turns.
//!
//! Knobs: `SIZES` (default 1000,10000,30000), `VARIANTS` (default
//! upstream-netlink,maps-netlink,upstream-nft), `NFT_MAX` (largest size for the `nft`
//! variants, default 30000), `FIRST_PACKET=0`, `BENCH_OUT` (CSV and SVG plots; default
//! `target/bench-maps`, so a plain run never overwrites the committed figures in
//! `docs/bench-maps`), `APPEND=1` (keep the rows of the CSV already
//! there that this run does not measure again, and plot them all; with `SIZES=` empty it
//! only redraws the plots).
//!
//! Namespaces are named `kpdp-<child pid>-…`: the parent removes a child's namespaces
//! when it ends (also when it was killed or interrupted: the parent ignores SIGINT while a
//! child runs), and any later run removes those of dead processes.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kproxy::config::{Config, FamilySettings};
use kproxy::dataplane::Dataplane;
use kproxy::model::{synthetic, ClusterState, IpFamily, NodeContext};
use kproxy::nftables::dataplane::NftDataplane;
use kproxy::nftables::maps::dataplane::MapsDataplane;
use kproxy::nftables::maps::{Desired, MapsRenderer};
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::text::transaction_text;

use super::echo;
use super::netns::{self, Netns};
use super::report::{child_init, env_or, load, opt, out_dir, pct, plot, run_child, Series};

/// The variants run unless `VARIANTS` says otherwise.
const DEFAULT_VARIANTS: [&str; 3] = ["upstream-netlink", "maps-netlink", "upstream-nft"];
/// Every variant, in plot order.
const ALL_VARIANTS: [&str; 4] = [
    "upstream-netlink",
    "maps-netlink",
    "upstream-nft",
    "maps-nft",
];
const ECHO_PORT: u16 = 8080;

fn settings() -> FamilySettings {
    let cfg = Config {
        cluster_cidrs: vec!["10.128.0.0/10".parse().unwrap()],
        ..Config::default()
    };
    cfg.family_settings(
        IpFamily::V4,
        "node-1",
        None,
        &["192.168.0.2/24".parse().unwrap()],
    )
}

fn node() -> NodeContext {
    NodeContext {
        name: "node-1".into(),
        zone: None,
        prefer_same_node: true,
    }
}

/// One variant's figures at one size (`None`: not measured).
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub(crate) variant: String,
    pub(crate) services: usize,
    pub(crate) cold_s: Option<f64>,
    /// The cold sync was stopped after this many seconds.
    pub(crate) cold_timeout_s: Option<f64>,
    pub(crate) cold_ops: usize,
    pub(crate) change_p50_ms: Option<f64>,
    pub(crate) change_p99_ms: Option<f64>,
    pub(crate) change_ops: usize,
    /// Of a change: deriving the state from the cluster (`proxy_state`), p50.
    pub(crate) derive_p50_ms: Option<f64>,
    pub(crate) add_p50_ms: Option<f64>,
    pub(crate) remove_p50_ms: Option<f64>,
    pub(crate) rss_mib: f64,
    pub(crate) nft_rss_mib: Option<f64>,
    pub(crate) fp_first_p50_ms: Option<f64>,
    pub(crate) fp_first_p99_ms: Option<f64>,
    pub(crate) fp_last_p50_ms: Option<f64>,
    pub(crate) fp_last_p99_ms: Option<f64>,
    pub(crate) fp_failed: usize,
    pub(crate) load: String,
}

impl Row {
    const HEADER: &'static str = "variant,services,endpoints_per_service,cold_s,cold_timeout_s,cold_operations,change_p50_ms,change_p99_ms,change_derive_p50_ms,change_operations,service_add_p50_ms,service_remove_p50_ms,peak_rss_mib,nft_peak_rss_mib,first_packet_first_service_p50_ms,first_packet_first_service_p99_ms,first_packet_last_service_p50_ms,first_packet_last_service_p99_ms,first_packet_failures,load_1_5_15";

    fn csv(&self) -> String {
        format!(
            "{},{},10,{},{},{},{},{},{},{},{},{},{:.1},{},{},{},{},{},{},{}",
            self.variant,
            self.services,
            opt(self.cold_s, 3),
            opt(self.cold_timeout_s, 0),
            self.cold_ops,
            opt(self.change_p50_ms, 3),
            opt(self.change_p99_ms, 3),
            opt(self.derive_p50_ms, 3),
            self.change_ops,
            opt(self.add_p50_ms, 3),
            opt(self.remove_p50_ms, 3),
            self.rss_mib,
            opt(self.nft_rss_mib, 1),
            opt(self.fp_first_p50_ms, 3),
            opt(self.fp_first_p99_ms, 3),
            opt(self.fp_last_p50_ms, 3),
            opt(self.fp_last_p99_ms, 3),
            self.fp_failed,
            self.load,
        )
    }

    fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        Some(Row {
            variant: f.first()?.to_string(),
            services: f.get(1)?.parse().ok()?,
            cold_s: num(3),
            cold_timeout_s: num(4),
            cold_ops: f.get(5)?.parse().ok()?,
            change_p50_ms: num(6),
            change_p99_ms: num(7),
            derive_p50_ms: num(8),
            change_ops: f.get(9)?.parse().ok()?,
            add_p50_ms: num(10),
            remove_p50_ms: num(11),
            rss_mib: num(12)?,
            nft_rss_mib: num(13),
            fp_first_p50_ms: num(14),
            fp_first_p99_ms: num(15),
            fp_last_p50_ms: num(16),
            fp_last_p99_ms: num(17),
            fp_failed: f.get(18)?.parse().ok()?,
            load: f.get(19).unwrap_or(&"").to_string(),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct_ms(v: &mut [Duration], p: f64) -> Option<f64> {
    pct(v, p).map(ms)
}

/// A line of /proc/self/status in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The largest peak RSS of any child process waited for so far (the `nft` runs), MiB.
fn children_peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// A change to the cluster: one endpoint of Service `7 + k` moves to a new address.
fn move_endpoint(state: &mut ClusterState, k: usize) {
    let name = format!("svc{}", 7 + k);
    let mut slice = state
        .slices()
        .find(|s| s.service == name)
        .cloned()
        .expect("slice");
    slice.endpoints[3].ip = IpAddr::from([10, 200, (k >> 8) as u8, k as u8]);
    state.insert_slice(slice);
}

/// The extra Service (index `n`) of a cluster of `n` Services, and its slice.
fn extra_service(n: usize) -> (kproxy::model::Service, kproxy::model::EndpointSlice) {
    let bigger = synthetic::cluster(n + 1, 10);
    let name = format!("svc{n}");
    let svc = bigger
        .services()
        .find(|s| s.key.name == name)
        .cloned()
        .expect("service");
    let slice = bigger
        .slices()
        .find(|s| s.service == name)
        .cloned()
        .expect("slice");
    (svc, slice)
}

/// Why a sync did not complete.
#[derive(Debug)]
enum SyncError {
    /// Stopped after this long; the operations it carried.
    Timeout(Duration, usize),
    Failed(String),
}

/// What one sync did: operations written, and how long deriving the family's state
/// from the cluster took (the part every variant shares).
struct Synced {
    ops: usize,
    derive: Duration,
}

/// Derives the IPv4 proxy state, timed.
fn derive(state: &ClusterState, node: &NodeContext) -> (kproxy::model::ProxyState, Duration) {
    let t = Instant::now();
    let ps = state.proxy_state(IpFamily::V4, node);
    (ps, t.elapsed())
}

/// How a variant applies: a full sync of the state, or the change since the last sync.
trait Applier {
    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<Synced, SyncError>;
    /// The bound for a cold sync (`nft -f` only).
    fn set_timeout(&mut self, _t: Option<Duration>) {}
}

/// A `Dataplane` as the daemon drives it: derive the family's state, `sync`.
struct ViaDataplane {
    dp: Box<dyn Dataplane>,
    node: NodeContext,
}

impl Applier for ViaDataplane {
    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<Synced, SyncError> {
        let (ps, derive) = derive(state, &self.node);
        self.dp
            .sync(&ps, full)
            .map(|o| Synced {
                ops: o.operations,
                derive,
            })
            .map_err(|e| SyncError::Failed(e.to_string()))
    }
}

/// `nft -f -` of `text` (in the calling thread's network namespace), killed after
/// `timeout`.
fn nft_f(text: String, timeout: Option<Duration>) -> Result<(), SyncError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SyncError::Failed(format!("nft: {e}")))?;
    let mut stdin = child.stdin.take().expect("stdin");
    // nft reads all of its input before it talks to the kernel; a writer thread keeps a
    // large text from blocking the timeout.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let _ = writer.join();
                if status.success() {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let err: String = err.chars().take(2000).collect();
                return Err(SyncError::Failed(format!("nft -f: {status}: {err}")));
            }
            Ok(None) => {}
            Err(e) => return Err(SyncError::Failed(format!("nft: {e}"))),
        }
        if let Some(t) = timeout {
            if start.elapsed() > t {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writer.join();
                return Err(SyncError::Timeout(t, 0));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn with_ops(e: SyncError, ops: usize) -> SyncError {
    match e {
        SyncError::Timeout(t, _) => SyncError::Timeout(t, ops),
        other => other,
    }
}

/// Upstream's way: the renderer's transaction as text through `nft -f`.
struct UpstreamNft {
    r: NftRenderer,
    node: NodeContext,
    timeout: Option<Duration>,
}

impl Applier for UpstreamNft {
    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<Synced, SyncError> {
        let (ps, derive) = derive(state, &self.node);
        let out = self.r.render(
            &ps,
            &RenderOptions {
                full,
                now_ms: 0,
                existing: None,
            },
        );
        let ops = out.main.len();
        nft_f(transaction_text(&out.main), self.timeout).map_err(|e| with_ops(e, ops))?;
        self.r.commit(out.record);
        Ok(Synced { ops, derive })
    }

    fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }
}

/// The maps layout's transactions through `nft -f`.
struct MapsNft {
    r: MapsRenderer,
    applied: Option<Desired>,
    node: NodeContext,
    timeout: Option<Duration>,
}

impl Applier for MapsNft {
    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<Synced, SyncError> {
        let (ps, derive) = derive(state, &self.node);
        let d = self.r.desired(&ps);
        let tx = match (&self.applied, full) {
            (Some(old), false) => self.r.render_diff(old, &d),
            _ => self.r.full_transaction(&d),
        };
        let ops = tx.len();
        if !tx.is_empty() {
            nft_f(transaction_text(&tx), self.timeout).map_err(|e| with_ops(e, ops))?;
        }
        self.applied = Some(d);
        Ok(Synced { ops, derive })
    }

    fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }
}

/// The node namespace (where the rules go) wired to a client namespace and to an
/// endpoint namespace that answers for every endpoint address (10.128.0.0/10, an AnyIP
/// route) with one echo server.
struct Wiring {
    // Drop order: the server before the namespaces.
    server: Option<echo::EchoServer>,
    endpoints: Netns,
    client: Netns,
    node: Netns,
}

const NODE_UP: &str = "192.168.0.2";
const CLIENT: &str = "192.168.0.10";
const NODE_DOWN: &str = "192.168.1.1";
const ENDPOINTS: &str = "192.168.1.2";

impl Wiring {
    fn new(with_peers: bool) -> Result<Wiring, String> {
        let stem = netns::unique_stem();
        let node = Netns::create(format!("{stem}-node"))?;
        let client = Netns::create(format!("{stem}-cli"))?;
        let endpoints = Netns::create(format!("{stem}-ep"))?;
        let w = Wiring {
            server: None,
            endpoints,
            client,
            node,
        };
        if !with_peers {
            return Ok(w);
        }
        let common = [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ];
        w.node.sysctl(&common)?;
        w.node.sysctl(&["net.ipv4.ip_forward=1"])?;
        w.client.sysctl(&common)?;
        w.endpoints.sysctl(&common)?;
        let link = |peer: &Netns, here: &str, there: &str, a: &str, b: &str| {
            w.node.ip(&[
                "link",
                "add",
                here,
                "type",
                "veth",
                "peer",
                "name",
                there,
                "netns",
                peer.name(),
            ])?;
            w.node
                .ip(&["addr", "add", &format!("{a}/24"), "dev", here])?;
            w.node.ip(&["link", "set", here, "up"])?;
            peer.ip(&["addr", "add", &format!("{b}/24"), "dev", there])?;
            peer.ip(&["link", "set", there, "up"])?;
            peer.ip(&["route", "add", "default", "via", a])
        };
        link(&w.client, "cli0", "eth0", NODE_UP, CLIENT)?;
        link(&w.endpoints, "ep0", "eth0", NODE_DOWN, ENDPOINTS)?;
        w.node
            .ip(&["route", "add", "10.128.0.0/10", "via", ENDPOINTS])?;
        w.node
            .ip(&["route", "add", "10.200.0.0/16", "via", ENDPOINTS])?;
        // Every endpoint address is local in the endpoint namespace.
        w.endpoints
            .ip(&["route", "add", "local", "10.128.0.0/10", "dev", "lo"])?;
        w.endpoints
            .ip(&["route", "add", "local", "10.200.0.0/16", "dev", "lo"])?;
        Ok(w)
    }
}

/// Per destination, p50 and p99 of connect + one exchange + close from the client
/// namespace, and how many of `count` connections got no answer. The destinations take
/// turns (first, last, first, …), so that both see the same conditions.
fn first_packet(client: &Netns, dsts: Vec<SocketAddr>, count: usize) -> Vec<Stats> {
    client.run(move || {
        let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(count); dsts.len()];
        let mut failed = vec![0; dsts.len()];
        for _ in 0..count {
            for (k, dst) in dsts.iter().enumerate() {
                let t = Instant::now();
                match echo::tcp_once(None, *dst, "hello", Duration::from_secs(3)) {
                    echo::Outcome::Reply(_) => times[k].push(t.elapsed()),
                    other => {
                        failed[k] += 1;
                        if failed[k] <= 3 {
                            eprintln!("first packet to {dst}: {other}");
                        }
                    }
                }
            }
        }
        times
            .iter_mut()
            .zip(failed)
            .map(|(t, failed)| Stats {
                p50: pct_ms(t, 0.5),
                p99: pct_ms(t, 0.99),
                failed,
            })
            .collect()
    })
}

/// One destination's first-packet figures.
struct Stats {
    p50: Option<f64>,
    p99: Option<f64>,
    failed: usize,
}

fn service_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(172, 30, (i >> 8) as u8, (i & 255) as u8))
}

/// One variant at one size, in this process (the child).
fn run_one(variant: &str, n: usize) -> Row {
    let changes: usize = env_or("CHANGES", 50);
    let service_changes: usize = env_or("SERVICE_CHANGES", 10);
    let connections: usize = env_or("CONNECTIONS", 1000);
    let netlink = variant.ends_with("-netlink");
    let with_packets = netlink && env_or("FIRST_PACKET", 1) != 0;
    let nft_full_max: usize = env_or("NFT_FULL_MAX", 10_000);
    let cold_timeout = if variant.ends_with("-nft") {
        Some(Duration::from_secs(if n > nft_full_max {
            env_or("NFT_TIMEOUT", 120)
        } else {
            // A bound that should never be reached (upstream's way took 80–216 s at 10k).
            env_or("NFT_FULL_TIMEOUT", 900)
        }))
    } else {
        None
    };
    let mut wiring = Wiring::new(with_packets).unwrap_or_else(|e| panic!("namespaces: {e}"));
    if with_packets {
        wiring.server = Some(
            echo::EchoServer::start(&wiring.endpoints, "endpoint", ECHO_PORT)
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let variant_s = variant.to_string();
    let load = load();
    let mut row = wiring.node.run(move || {
        let mut state = synthetic::cluster(n, 10);
        let mut a: Box<dyn Applier> = match variant_s.as_str() {
            "upstream-netlink" => Box::new(ViaDataplane {
                dp: Box::new(NftDataplane::new(settings())),
                node: node(),
            }),
            "maps-netlink" => Box::new(ViaDataplane {
                dp: Box::new(MapsDataplane::new(settings())),
                node: node(),
            }),
            "upstream-nft" => Box::new(UpstreamNft {
                r: NftRenderer::new(settings()),
                node: node(),
                timeout: None,
            }),
            "maps-nft" => Box::new(MapsNft {
                r: MapsRenderer::new(settings()),
                applied: None,
                node: node(),
                timeout: None,
            }),
            other => panic!("unknown variant {other}"),
        };
        let mut row = Row {
            variant: variant_s.clone(),
            services: n,
            load,
            ..Row::default()
        };
        a.set_timeout(cold_timeout);
        let t = Instant::now();
        match a.sync(&state, true) {
            Ok(done) => {
                row.cold_s = Some(t.elapsed().as_secs_f64());
                row.cold_ops = done.ops;
            }
            Err(SyncError::Timeout(limit, ops)) => {
                eprintln!("{variant_s} at {n}: cold sync stopped after {limit:?}");
                row.cold_timeout_s = Some(limit.as_secs_f64());
                row.cold_ops = ops;
                row.rss_mib = status_mib("VmHWM:");
                return row;
            }
            Err(SyncError::Failed(e)) => panic!("{variant_s} at {n}: cold sync: {e}"),
        }
        a.set_timeout(None);
        eprintln!(
            "{variant_s} at {n}: cold sync {:.2} s, {} operations",
            row.cold_s.unwrap_or(0.0),
            row.cold_ops
        );
        let (mut times, mut derives) = (Vec::new(), Vec::new());
        for k in 0..changes {
            move_endpoint(&mut state, k);
            let t = Instant::now();
            let done = a.sync(&state, false).expect("change");
            times.push(t.elapsed());
            derives.push(done.derive);
            row.change_ops = done.ops;
        }
        row.change_p50_ms = pct_ms(&mut times, 0.5);
        row.change_p99_ms = pct_ms(&mut times, 0.99);
        row.derive_p50_ms = pct_ms(&mut derives, 0.5);
        let (svc, slice) = extra_service(n);
        let (mut adds, mut removes) = (Vec::new(), Vec::new());
        for _ in 0..service_changes {
            state.insert_service(svc.clone());
            state.insert_slice(slice.clone());
            let t = Instant::now();
            a.sync(&state, false).expect("service added");
            adds.push(t.elapsed());
            state.remove_service(&svc.key.namespace, &svc.key.name);
            state.remove_slice(&slice.key.namespace, &slice.key.name);
            let t = Instant::now();
            a.sync(&state, false).expect("service removed");
            removes.push(t.elapsed());
        }
        row.add_p50_ms = pct_ms(&mut adds, 0.5);
        row.remove_p50_ms = pct_ms(&mut removes, 0.5);
        row.rss_mib = status_mib("VmHWM:");
        row
    });
    if variant.ends_with("-nft") {
        row.nft_rss_mib = Some(children_peak_rss_mib());
    }
    if with_packets {
        let first = SocketAddr::new(service_ip(0), 80);
        let last = SocketAddr::new(service_ip(n - 1), 80);
        // Let the kernel's deferred work of the last commits (freeing objects) pass.
        std::thread::sleep(Duration::from_secs(2));
        let st = first_packet(&wiring.client, vec![first, last], connections);
        row.fp_first_p50_ms = st[0].p50;
        row.fp_first_p99_ms = st[0].p99;
        row.fp_last_p50_ms = st[1].p50;
        row.fp_last_p99_ms = st[1].p99;
        row.fp_failed = st[0].failed + st[1].failed;
    }
    drop(wiring);
    row
}

/// A plot's file, title, y axis, log scale, and the metric it shows.
type PlotSpec = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    fn(&Row) -> Option<f64>,
);

fn series_of(rows: &[Row], metric: fn(&Row) -> Option<f64>) -> Vec<Series> {
    ALL_VARIANTS
        .iter()
        .map(|v| Series {
            label: v.to_string(),
            points: rows
                .iter()
                .filter(|r| r.variant == *v)
                .filter_map(|r| metric(r).map(|y| (r.services as f64, y)))
                .collect(),
            timeouts: Vec::new(),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// The parent: every size × variant in a child process, then CSV, plots, a table.
pub fn main() {
    if let Ok(one) = std::env::var("BENCH_ONE") {
        child_init();
        let (variant, n) = one.split_once(':').expect("BENCH_ONE=variant:size");
        let row = run_one(variant, n.parse().expect("size"));
        println!("ROW,{}", row.csv());
        return;
    }
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "1000,10000,30000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let variants: Vec<String> = std::env::var("VARIANTS")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_else(|_| DEFAULT_VARIANTS.iter().map(|s| s.to_string()).collect());
    let nft_max: usize = env_or("NFT_MAX", 30_000);
    let started = jiff::Timestamp::now();
    let mut rows = Vec::new();
    for &n in &sizes {
        for v in &variants {
            if v.ends_with("-nft") && n > nft_max {
                continue;
            }
            let t = Instant::now();
            let (_, out) = run_child(("BENCH_ONE", format!("{v}:{n}")));
            match out
                .lines()
                .find_map(|l| l.strip_prefix("ROW,"))
                .and_then(Row::parse)
            {
                Some(r) => {
                    eprintln!("{} ({:.0} s)", r.csv(), t.elapsed().as_secs_f64());
                    rows.push(r);
                }
                None => eprintln!("{v} at {n}: failed"),
            }
        }
    }
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("output directory");
    if env_or("APPEND", 0) != 0 {
        // Keep the rows of an earlier run that this one did not measure again.
        let old = std::fs::read_to_string(dir.join("nft_apply.csv")).unwrap_or_default();
        let kept: Vec<Row> = old
            .lines()
            .skip(1)
            .filter_map(Row::parse)
            .filter(|o| {
                !rows
                    .iter()
                    .any(|r| r.variant == o.variant && r.services == o.services)
            })
            .collect();
        rows.extend(kept);
        rows.sort_by_key(|r| {
            (
                r.services,
                ALL_VARIANTS.iter().position(|v| *v == r.variant),
            )
        });
    }
    let mut csv = format!("{}\n", Row::HEADER);
    for r in &rows {
        csv.push_str(&r.csv());
        csv.push('\n');
    }
    std::fs::write(dir.join("nft_apply.csv"), &csv).expect("csv");
    let plots: [PlotSpec; 4] = [
        (
            "one-endpoint-change.svg",
            "One endpoint changes: derive + render + apply, p50 (ms, log scale)",
            "milliseconds",
            true,
            |r| r.change_p50_ms,
        ),
        (
            "service-add.svg",
            "One Service added, p50 (ms, log scale)",
            "milliseconds",
            true,
            |r| r.add_p50_ms,
        ),
        (
            "peak-rss.svg",
            "Peak RSS of the process applying (MiB)",
            "MiB",
            true,
            |r| Some(r.rss_mib),
        ),
        (
            "cold-sync.svg",
            "Cold sync: derive + render + apply (s, log scale; triangle: stopped at the timeout)",
            "seconds",
            true,
            |r| r.cold_s,
        ),
    ];
    for (file, title, y, log_y, metric) in plots {
        let mut series = series_of(&rows, metric);
        if file == "cold-sync.svg" {
            for v in ALL_VARIANTS {
                let timeouts: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| r.variant == v)
                    .filter_map(|r| r.cold_timeout_s.map(|t| (r.services as f64, t)))
                    .collect();
                if timeouts.is_empty() {
                    continue;
                }
                match series.iter_mut().find(|s| s.label == v) {
                    Some(s) => s.timeouts = timeouts,
                    None => series.push(Series {
                        label: v.to_string(),
                        points: Vec::new(),
                        timeouts,
                    }),
                }
            }
        }
        if let Err(e) = plot(&dir.join(file), &series, title, y, log_y) {
            eprintln!("plot {file}: {e}");
        }
    }
    // First-packet latency: a line per layout and target Service.
    let mut fp = Vec::new();
    for v in ["upstream-netlink", "maps-netlink"] {
        for (which, metric) in [
            (
                "first Service",
                (|r: &Row| r.fp_first_p50_ms) as fn(&Row) -> Option<f64>,
            ),
            ("last Service", |r: &Row| r.fp_last_p50_ms),
        ] {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.variant == v)
                .filter_map(|r| metric(r).map(|y| (r.services as f64, y)))
                .collect();
            if !points.is_empty() {
                fp.push(Series {
                    label: format!("{} layout, {which}", v.trim_end_matches("-netlink")),
                    points,
                    timeouts: Vec::new(),
                });
            }
        }
    }
    if let Err(e) = plot(
        &dir.join("first-packet.svg"),
        &fp,
        "New TCP connection through the rules: connect + reply + close, p50 (ms)",
        "milliseconds",
        false,
    ) {
        eprintln!("plot first-packet.svg: {e}");
    }
    println!("started {started}, load average (1/5/15 min) before each variant in the CSV");
    println!("| variant | services × 10 | cold sync | cold ops | 1-endpoint change p50 / p99 | of which deriving the state, p50 | ops | Service add / remove p50 | peak RSS | first packet p50, first / last Service | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let cold = match (r.cold_s, r.cold_timeout_s) {
            (Some(s), _) => format!("{s:.2} s"),
            (None, Some(t)) => format!("timeout > {t:.0} s"),
            _ => "–".into(),
        };
        let rss = match r.nft_rss_mib {
            Some(nft) => format!("{:.0} MiB (nft {nft:.0} MiB)", r.rss_mib),
            None => format!("{:.0} MiB", r.rss_mib),
        };
        let fp = if r.fp_first_p50_ms.is_some() {
            format!(
                "{} / {} ms{}",
                fmt_ms(r.fp_first_p50_ms),
                fmt_ms(r.fp_last_p50_ms),
                if r.fp_failed > 0 {
                    format!(" ({} failed)", r.fp_failed)
                } else {
                    String::new()
                }
            )
        } else {
            "–".into()
        };
        println!(
            "| {} | {} | {cold} | {} | {} / {} ms | {} ms | {} | {} / {} ms | {rss} | {fp} | {} |",
            r.variant,
            r.services,
            r.cold_ops,
            fmt_ms(r.change_p50_ms),
            fmt_ms(r.change_p99_ms),
            fmt_ms(r.derive_p50_ms),
            r.change_ops,
            fmt_ms(r.add_p50_ms),
            fmt_ms(r.remove_p50_ms),
            r.load,
        );
    }
    println!("written to {}", dir.display());
}

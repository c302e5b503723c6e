//! The simulated cluster: one "node" namespace running kproxy's rules, an "external
//! client" namespace on its uplink, pods attached to the node by veth pairs, and
//! optionally a second node (a plain router) holding remote pods.
//!
//! ```text
//!  client (192.168.50.100, .101)            node-2 (192.168.51.2)
//!     │ eth0                                  │ n1        pods 10.244.2.x
//!     │ up0  192.168.50.1 ─── node-1 ─── n2 192.168.51.1
//!                              │ vp<i> (169.254.1.1 gateway for every pod)
//!                              pods 10.244.1.x
//! ```
//! Addresses are the same in every bed: each test has its own namespaces, so nothing
//! is shared with other tests or with the host.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::echo::{self, EchoServer, Outcome};
use super::netns::{self, Netns};
use super::snapshot::{Endpoint, NodeObject, Snapshot};

/// The node kproxy runs on.
pub(crate) const NODE: &str = "node-1";
/// The node of remote pods.
pub(crate) const REMOTE_NODE: &str = "node-2";
/// Port every echo server listens on (TCP and UDP).
pub(crate) const ECHO_PORT: u16 = 8080;
/// Timeout for an exchange that should succeed (connect, then read).
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait before calling traffic dropped. SYNs are retransmitted after 1s, so
/// this sees two of them.
pub(crate) const DROP_TIMEOUT: Duration = Duration::from_millis(2500);
/// Traffic budget of one bed: exchanges after it are not tried, so a broken dataplane
/// fails a case in bounded time instead of timing out hundreds of connections.
const CASE_BUDGET: Duration = Duration::from_secs(60);
/// After this many timeouts in a row within one batch, the rest of the batch is skipped.
const MAX_TIMEOUTS_IN_A_ROW: usize = 3;

const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const CLIENT2_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 101);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
const LINK_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 51, 1),
    Ipv4Addr::new(192, 168, 51, 2),
];
const LINK_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x51, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x51, 0, 0, 0, 0, 0, 2),
];
/// Pod-side gateway, configured on every node-side veth (as Calico-like CNIs do).
const GW_V4: &str = "169.254.1.1";
const GW_V6: &str = "fe80::1";
/// Pod network of the whole cluster (kproxy's clusterCIDR).
const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";

/// Which kproxy backend a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `--mode iptables`
    Iptables,
    /// `--mode nftables`
    Nftables,
    /// `--mode nftables --nftables-layout maps` (kproxy's data-map layout, table
    /// `kproxy`).
    NftablesMaps,
}

impl Mode {
    /// The `--mode` value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables | Mode::NftablesMaps => "nftables",
        }
    }

    /// The flags that select the nftables layout (none for upstream's).
    pub fn layout_args(self) -> &'static [&'static str] {
        match self {
            Mode::NftablesMaps => &["--nftables-layout", "maps"],
            _ => &[],
        }
    }

    /// A name for messages (`nftables-maps` for the maps layout).
    pub fn label(self) -> &'static str {
        match self {
            Mode::NftablesMaps => "nftables-maps",
            m => m.as_str(),
        }
    }
}

/// Transport of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// TCP
    Tcp,
    /// UDP
    Udp,
}

/// Where a client sits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum From<'a> {
    /// A pod, using its primary address.
    Pod(&'a str),
    /// A pod, from one of its addresses (see [`BedBuilder::pod_aliases`]).
    PodAddr(&'a str, IpAddr),
    /// The node itself (host network).
    Node,
    /// The external client's first address.
    Client,
    /// The external client from a given address (192.168.50.100 or .101).
    ClientAddr(IpAddr),
}

/// Service VIPs used by the cases (all inside the test namespaces only).
pub(crate) fn service_ip(n: u8, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, n as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, n))
    }
}

/// A LoadBalancer ingress IP, routed to the node by the client.
pub(crate) fn lb_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 70, n))
}

/// An externalIP, routed to the node by the client.
pub(crate) fn external_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 71, n))
}

struct Pod {
    name: String,
    node: &'static str,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    aliases: Vec<Ipv4Addr>,
    server: Option<EchoServer>,
    ns: Netns,
}

/// Builder for a [`Bed`].
pub(crate) struct BedBuilder {
    mode: Mode,
    ipv6: bool,
    local: Vec<String>,
    remote: Vec<String>,
    aliases: Vec<(String, u8)>,
}

impl BedBuilder {
    /// Also give every namespace IPv6 addresses and routes.
    pub(crate) fn ipv6(mut self) -> BedBuilder {
        self.ipv6 = true;
        self
    }

    /// Pods on the kproxy node (10.244.1.10, .11, ... in order).
    pub(crate) fn local_pods(mut self, names: &[&str]) -> BedBuilder {
        self.local = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Pods on the second node (10.244.2.10, .11, ...), reached through the first.
    pub(crate) fn remote_pods(mut self, names: &[&str]) -> BedBuilder {
        self.remote = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Gives a pod `count` extra IPv4 addresses (10.244.1.100 + i), to act as many
    /// clients.
    pub(crate) fn pod_aliases(mut self, pod: &str, count: u8) -> BedBuilder {
        self.aliases.push((pod.to_string(), count));
        self
    }

    /// Creates the namespaces, links, routes and echo servers.
    pub(crate) fn build(self) -> Bed {
        let stem = netns::unique_stem();
        match Bed::create(&stem, self) {
            Ok(bed) => bed,
            Err(e) => panic!("building test bed {stem}: {e}"),
        }
    }
}

/// A running simulated cluster; everything is torn down on drop, also on panic.
pub(crate) struct Bed {
    stem: String,
    mode: Mode,
    ipv6: bool,
    // Drop order matters: pods (servers first) go before the nodes they hang off.
    pods: Vec<Pod>,
    node2: Option<Netns>,
    client: Netns,
    node: Netns,
    transcript: Mutex<Vec<String>>,
    applies: Mutex<Vec<String>>,
    deadline: Instant,
}

impl Bed {
    /// Starts describing a bed for `mode`.
    pub(crate) fn builder(mode: Mode) -> BedBuilder {
        BedBuilder {
            mode,
            ipv6: false,
            local: Vec::new(),
            remote: Vec::new(),
            aliases: Vec::new(),
        }
    }

    fn create(stem: &str, spec: BedBuilder) -> Result<Bed, String> {
        let v6 = spec.ipv6;
        let node = Netns::create(format!("{stem}-node"))?;
        let client = Netns::create(format!("{stem}-cli"))?;
        let node2 = if spec.remote.is_empty() {
            None
        } else {
            Some(Netns::create(format!("{stem}-n2"))?)
        };
        let mut bed = Bed {
            stem: stem.to_string(),
            mode: spec.mode,
            ipv6: v6,
            pods: Vec::new(),
            node2,
            client,
            node,
            transcript: Mutex::new(Vec::new()),
            applies: Mutex::new(Vec::new()),
            deadline: Instant::now() + CASE_BUDGET,
        };

        // Routers forward; rp_filter off because replies of DNATed flows legitimately
        // come back on other interfaces than a naive reverse lookup expects; DAD off so
        // IPv6 addresses are usable at once.
        let common = [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ];
        let routing = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"];
        for ns in [Some(&bed.node), bed.node2.as_ref()].into_iter().flatten() {
            ns.sysctl(&common)?;
            ns.sysctl(&routing)?;
        }
        bed.client.sysctl(&common)?;

        // Uplink: node <-> external client. The client is also the node's default
        // gateway, so the node has a route for any service VIP before DNAT rewrites it.
        bed.node.ip(&[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            bed.client.name(),
        ])?;
        let (node_v4, client_v4, client2_v4) = (
            format!("{NODE_V4}/24"),
            format!("{CLIENT_V4}/24"),
            format!("{CLIENT2_V4}/24"),
        );
        bed.node.ip(&["addr", "add", &node_v4, "dev", "up0"])?;
        bed.node.ip(&["link", "set", "up0", "up"])?;
        bed.client.ip(&["addr", "add", &client_v4, "dev", "eth0"])?;
        bed.client
            .ip(&["addr", "add", &client2_v4, "dev", "eth0"])?;
        bed.client.ip(&["link", "set", "eth0", "up"])?;
        bed.client
            .ip(&["route", "add", "default", "via", &NODE_V4.to_string()])?;
        bed.node
            .ip(&["route", "add", "default", "via", &CLIENT_V4.to_string()])?;
        if v6 {
            bed.node.ip(&[
                "addr",
                "add",
                &format!("{NODE_V6}/64"),
                "dev",
                "up0",
                "nodad",
            ])?;
            bed.client.ip(&[
                "addr",
                "add",
                &format!("{CLIENT_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            bed.client
                .ip(&["-6", "route", "add", "default", "via", &NODE_V6.to_string()])?;
            bed.node.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &CLIENT_V6.to_string(),
            ])?;
        }

        // Second node: a router for the 10.244.2.0/24 pods.
        if let Some(n2) = &bed.node2 {
            bed.node.ip(&[
                "link",
                "add",
                "n2",
                "type",
                "veth",
                "peer",
                "name",
                "n1",
                "netns",
                n2.name(),
            ])?;
            bed.node
                .ip(&["addr", "add", &format!("{}/24", LINK_V4[0]), "dev", "n2"])?;
            bed.node.ip(&["link", "set", "n2", "up"])?;
            n2.ip(&["addr", "add", &format!("{}/24", LINK_V4[1]), "dev", "n1"])?;
            n2.ip(&["link", "set", "n1", "up"])?;
            bed.node.ip(&[
                "route",
                "add",
                "10.244.2.0/24",
                "via",
                &LINK_V4[1].to_string(),
            ])?;
            n2.ip(&["route", "add", "default", "via", &LINK_V4[0].to_string()])?;
            if v6 {
                bed.node.ip(&[
                    "addr",
                    "add",
                    &format!("{}/64", LINK_V6[0]),
                    "dev",
                    "n2",
                    "nodad",
                ])?;
                n2.ip(&[
                    "addr",
                    "add",
                    &format!("{}/64", LINK_V6[1]),
                    "dev",
                    "n1",
                    "nodad",
                ])?;
                bed.node.ip(&[
                    "-6",
                    "route",
                    "add",
                    "fd00:10:244:2::/64",
                    "via",
                    &LINK_V6[1].to_string(),
                ])?;
                n2.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &LINK_V6[0].to_string(),
                ])?;
            }
        }

        for (i, name) in spec.local.iter().enumerate() {
            let aliases = spec
                .aliases
                .iter()
                .find(|(p, _)| p == name)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            bed.add_pod(name, NODE, 1, i, aliases)?;
        }
        for (i, name) in spec.remote.iter().enumerate() {
            bed.add_pod(name, REMOTE_NODE, 2, i, 0)?;
        }
        Ok(bed)
    }

    fn add_pod(
        &mut self,
        name: &str,
        node_name: &'static str,
        subnet: u8,
        index: usize,
        aliases: u8,
    ) -> Result<(), String> {
        let host = 10 + index as u8;
        let v4 = Ipv4Addr::new(10, 244, subnet, host);
        let v6 = self
            .ipv6
            .then(|| Ipv6Addr::new(0xfd00, 0x10, 0x244, subnet as u16, 0, 0, 0, host as u16));
        let ns = Netns::create(format!("{}-{name}", self.stem))?;
        ns.sysctl(&[
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        let host_ns = if subnet == 1 {
            &self.node
        } else {
            self.node2
                .as_ref()
                .ok_or("remote pod without a second node")?
        };
        let veth = format!("vp{index}");
        host_ns.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        host_ns.ip(&["addr", "add", &format!("{GW_V4}/32"), "dev", &veth])?;
        host_ns.ip(&["link", "set", &veth, "up"])?;
        ns.ip(&["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", GW_V4, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", GW_V4, "dev", "eth0"])?;
        host_ns.ip(&["route", "add", &format!("{v4}/32"), "dev", &veth])?;
        let mut alias_ips = Vec::new();
        for a in 0..aliases {
            let ip = Ipv4Addr::new(10, 244, subnet, 100 + a);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            host_ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth])?;
            alias_ips.push(ip);
        }
        if let Some(v6) = v6 {
            host_ns.ip(&["addr", "add", &format!("{GW_V6}/64"), "dev", &veth, "nodad"])?;
            ns.ip(&["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"])?;
            ns.ip(&["-6", "route", "add", "default", "via", GW_V6, "dev", "eth0"])?;
            host_ns.ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &veth])?;
        }
        let server = EchoServer::start(&ns, name, ECHO_PORT)?;
        self.pods.push(Pod {
            name: name.to_string(),
            node: node_name,
            v4,
            v6,
            aliases: alias_ips,
            server: Some(server),
            ns,
        });
        Ok(())
    }

    fn pod(&self, name: &str) -> &Pod {
        match self.pods.iter().find(|p| p.name == name) {
            Some(p) => p,
            None => panic!("test bug: no pod {name:?} in this bed"),
        }
    }

    /// A pod's address of the family of `v6`.
    pub(crate) fn pod_ip(&self, name: &str, v6: bool) -> IpAddr {
        let p = self.pod(name);
        if v6 {
            match p.v6 {
                Some(a) => IpAddr::V6(a),
                None => panic!("test bug: bed built without .ipv6()"),
            }
        } else {
            IpAddr::V4(p.v4)
        }
    }

    /// A pod's alias addresses.
    pub(crate) fn pod_aliases(&self, name: &str) -> Vec<IpAddr> {
        self.pod(name)
            .aliases
            .iter()
            .map(|a| IpAddr::V4(*a))
            .collect()
    }

    /// A ready endpoint for a pod, on the pod's node.
    pub(crate) fn ep(&self, name: &str, v6: bool) -> Endpoint {
        Endpoint::ready(self.pod_ip(name, v6), self.pod(name).node)
    }

    /// The node's uplink address (its InternalIP).
    pub(crate) fn node_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(NODE_V6)
        } else {
            IpAddr::V4(NODE_V4)
        }
    }

    /// The external client's addresses: (inside a /32 source range, outside it).
    pub(crate) fn client_ips(&self) -> (IpAddr, IpAddr) {
        (IpAddr::V4(CLIENT_V4), IpAddr::V4(CLIENT2_V4))
    }

    /// True if `ip` is one of the node's own addresses: what a pod sees after
    /// masquerading by the node.
    pub(crate) fn is_node_addr(&self, ip: IpAddr) -> bool {
        let mut own: Vec<IpAddr> = vec![
            IpAddr::V4(NODE_V4),
            IpAddr::V4(LINK_V4[0]),
            IpAddr::V6(NODE_V6),
            IpAddr::V6(LINK_V6[0]),
        ];
        if let Ok(gw) = GW_V4.parse() {
            own.push(gw);
        }
        own.contains(&ip) || matches!(ip, IpAddr::V6(a) if a.segments()[0] == 0xfe80)
    }

    /// This node as a Node object (InternalIPs, zone label, podCIDRs).
    pub(crate) fn node_object(&self) -> NodeObject {
        let mut internal_ips = vec![IpAddr::V4(NODE_V4)];
        let mut pod_cidrs = vec!["10.244.1.0/24".to_string()];
        if self.ipv6 {
            internal_ips.push(IpAddr::V6(NODE_V6));
            pod_cidrs.push("fd00:10:244:1::/64".to_string());
        }
        NodeObject {
            name: NODE.to_string(),
            zone: "zone-a".to_string(),
            internal_ips,
            pod_cidrs,
        }
    }

    /// An empty snapshot of this cluster.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot::new(self.node_object())
    }

    /// `kproxy apply` of `snap` inside the node namespace; panics with kproxy's output
    /// when it fails.
    pub(crate) fn apply(&self, snap: &Snapshot) {
        if let Err(e) = self.try_apply(snap, &[]) {
            panic!("{e}");
        }
    }

    /// `kproxy apply` with extra flags; the error carries kproxy's exit status and output.
    pub(crate) fn try_apply(&self, snap: &Snapshot, extra: &[&str]) -> Result<(), String> {
        self.try_apply_in(self.mode, snap, extra)
    }

    /// `kproxy apply` in `mode` (which may differ from the bed's, to switch modes).
    pub(crate) fn try_apply_in(
        &self,
        mode: Mode,
        snap: &Snapshot,
        extra: &[&str],
    ) -> Result<(), String> {
        let yaml = snap.to_yaml()?;
        let n = self.applies.lock().map(|a| a.len()).unwrap_or(0);
        let dir = std::env::temp_dir();
        let snap_path = dir.join(format!("{}-snapshot-{n}.yaml", self.stem));
        let cfg_path = dir.join(format!("{}-config.yaml", self.stem));
        let cidrs = if self.ipv6 {
            format!("{CLUSTER_CIDR_V4},{CLUSTER_CIDR_V6}")
        } else {
            CLUSTER_CIDR_V4.to_string()
        };
        let config = format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: {cidrs}\n"
        );
        std::fs::write(&snap_path, &yaml)
            .map_err(|e| format!("write {}: {e}", snap_path.display()))?;
        std::fs::write(&cfg_path, &config)
            .map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let mut cmd = self.node.command(env!("CARGO_BIN_EXE_kproxy"));
        cmd.arg("apply")
            .arg("--snapshot")
            .arg(&snap_path)
            .args(["--mode", mode.as_str()])
            .args(mode.layout_args())
            .arg("--config")
            .arg(&cfg_path)
            .args(["--hostname-override", NODE])
            .args(["--local-address", &format!("{NODE_V4}/24")])
            .args(["--local-address", "127.0.0.1/8"]);
        if self.ipv6 {
            cmd.args(["--local-address", &format!("{NODE_V6}/64")])
                .args(["--local-address", "::1/128"]);
        }
        cmd.args(extra);
        let shown = format!("kproxy apply --mode {} (snapshot #{n})", mode.label());
        let result = netns::run(&mut cmd);
        let _ = std::fs::remove_file(&snap_path);
        let _ = std::fs::remove_file(&cfg_path);
        let out = result?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Ok(mut a) = self.applies.lock() {
            a.push(format!(
                "--- {shown}: {}\n{yaml}--- stdout:\n{stdout}--- stderr:\n{stderr}",
                out.status
            ));
        }
        if out.status.success() {
            if mode == Mode::NftablesMaps {
                // The case must really run on the maps layout's table.
                let tables = self.node_sh("nft list tables").unwrap_or_default();
                if !tables.contains(" kproxy") || tables.contains("kube-proxy") {
                    return Err(format!(
                        "{shown}: expected only the kproxy table(s), got:\n{tables}"
                    ));
                }
            }
            Ok(())
        } else {
            Err(format!(
                "{shown} failed ({}) in namespace {}: {}\n(is `kproxy apply` for {} mode on this branch yet?)",
                out.status,
                self.node.name(),
                stderr.trim(),
                mode.as_str()
            ))
        }
    }

    /// Starts `kproxy run` in the node namespace against a fake API server (also in the
    /// node namespace) that holds `snap`'s objects. The daemon stops when the guard drops.
    pub(crate) fn run_daemon(&self, snap: &Snapshot) -> Result<DaemonGuard, String> {
        let api = self.node.run_in(crate::fake_apiserver::FakeApi::start)?;
        api.apply_all(&snap.to_yaml()?);
        let dir = std::env::temp_dir();
        let kubeconfig = dir.join(format!("{}-kubeconfig", self.stem));
        std::fs::write(&kubeconfig, api.kubeconfig()).map_err(|e| e.to_string())?;
        let log = dir.join(format!("{}-daemon.log", self.stem));
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = self.node.command(env!("CARGO_BIN_EXE_kproxy"));
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--proxy-mode", self.mode.as_str()])
            .args(self.mode.layout_args())
            .args(["--hostname-override", NODE])
            .args(["--cluster-cidr", CLUSTER_CIDR_V4])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--min-sync-period", "0s"])
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().map_err(|e| format!("start kproxy run: {e}"))?;
        Ok(DaemonGuard {
            child,
            log,
            kubeconfig,
            dir: None,
        })
    }

    /// Starts the binary as kubeadm does: a copy named `kube-proxy`, kubeadm's argv
    /// (`--config=/var/lib/kube-proxy/config.conf --hostname-override=$(NODE_NAME)`)
    /// and kubeadm's generated `config.conf` (every field, zeros and nulls), whose
    /// kubeconfig points at a fake API server holding `snap`. Default ports: healthz
    /// 0.0.0.0:10256, metrics 127.0.0.1:10249.
    pub(crate) fn run_kube_proxy(&self, snap: &Snapshot) -> Result<DaemonGuard, String> {
        let api = self.node.run_in(crate::fake_apiserver::FakeApi::start)?;
        api.apply_all(&snap.to_yaml()?);
        let dir = std::env::temp_dir().join(format!("{}-kubeadm", self.stem));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let kubeconfig = dir.join("kubeconfig.conf");
        std::fs::write(&kubeconfig, api.kubeconfig()).map_err(|e| e.to_string())?;
        let kubeadm = include_str!("../../testdata/config/kubeadm-config.conf");
        let mode = match self.mode {
            Mode::Iptables => "\"\"",
            Mode::Nftables | Mode::NftablesMaps => "nftables",
        };
        let config = kubeadm
            .replace(
                "kubeconfig: /var/lib/kube-proxy/kubeconfig.conf",
                &format!("kubeconfig: {}", kubeconfig.display()),
            )
            .replace("mode: \"\"", &format!("mode: {mode}"))
            .replace(
                "clusterCIDR: 10.244.0.0/16",
                &format!("clusterCIDR: {CLUSTER_CIDR_V4}"),
            );
        // The maps layout through the config file's kproxy section (upstream's lenient
        // decoding ignores it).
        let config = if self.mode == Mode::NftablesMaps {
            format!("{config}\nkproxy:\n  nftablesLayout: maps\n")
        } else {
            config
        };
        let config_path = dir.join("config.conf");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let binary = dir.join("kube-proxy");
        std::fs::copy(env!("CARGO_BIN_EXE_kproxy"), &binary).map_err(|e| e.to_string())?;
        let log = dir.join("daemon.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = self.node.command(binary.to_str().unwrap_or_default());
        cmd.arg(format!("--config={}", config_path.display()))
            .arg(format!("--hostname-override={NODE}"))
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().map_err(|e| format!("start kube-proxy: {e}"))?;
        Ok(DaemonGuard {
            child,
            log,
            kubeconfig,
            dir: Some(dir),
        })
    }

    /// An HTTP GET from `from` (status, body); `None` when nothing answered.
    pub(crate) fn http_get(
        &self,
        from: From<'_>,
        dst: SocketAddr,
        path: &str,
    ) -> Option<(u16, String)> {
        let (ns, _, _) = self.origin(from);
        let path = path.to_string();
        ns.run_in(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").ok()?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let code = out.split_whitespace().nth(1)?.parse().ok()?;
            Some((
                code,
                out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
            ))
        })
        .ok()
        .flatten()
    }

    /// Runs a shell command line inside the node namespace (harness self-checks write
    /// rules by hand this way).
    pub(crate) fn node_sh(&self, script: &str) -> Result<String, String> {
        self.node.exec("sh", &["-ec", script])
    }

    fn origin(&self, from: From<'_>) -> (&Netns, Option<IpAddr>, String) {
        match from {
            From::Pod(p) => (&self.pod(p).ns, None, p.to_string()),
            From::PodAddr(p, ip) => (&self.pod(p).ns, Some(ip), format!("{p}[{ip}]")),
            From::Node => (&self.node, None, "node".into()),
            From::Client => (&self.client, None, "client".into()),
            From::ClientAddr(ip) => (&self.client, Some(ip), format!("client[{ip}]")),
        }
    }

    fn note(&self, line: String) {
        if let Ok(mut t) = self.transcript.lock() {
            t.push(line);
        }
    }

    /// `n` fresh exchanges (new connection or new UDP socket each) from `from` to
    /// `dst`, with `timeout` for each.
    pub(crate) fn exchanges(
        &self,
        from: From<'_>,
        proto: Proto,
        dst: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> Vec<Outcome> {
        let (ns, src, who) = self.origin(from);
        let deadline = self.deadline;
        let outcomes = ns.run_in(move || {
            let mut out = Vec::with_capacity(n);
            let mut timeouts = 0;
            for i in 0..n {
                if timeouts >= MAX_TIMEOUTS_IN_A_ROW {
                    out.push(Outcome::Error(format!(
                        "not tried: the {MAX_TIMEOUTS_IN_A_ROW} exchanges before timed out"
                    )));
                    continue;
                }
                if Instant::now() > deadline {
                    out.push(Outcome::Error(format!(
                        "not tried: the case's traffic budget of {CASE_BUDGET:?} is used up"
                    )));
                    continue;
                }
                let msg = format!("hello {i}");
                let o = match proto {
                    Proto::Tcp => echo::tcp_once(src, dst, &msg, timeout),
                    Proto::Udp => echo::udp_once(src, dst, &msg, timeout),
                };
                timeouts = if o == Outcome::TimedOut {
                    timeouts + 1
                } else {
                    0
                };
                out.push(o);
            }
            out
        });
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => panic!("client thread in {who}: {e}"),
        };
        for (i, o) in outcomes.iter().enumerate() {
            self.note(format!("{proto:?} {who} -> {dst} sent \"hello {i}\": {o}"));
        }
        outcomes
    }

    /// One exchange expected to be answered; the answer, or a panic saying what was sent
    /// and what came back.
    pub(crate) fn expect_reply(
        &self,
        from: From<'_>,
        proto: Proto,
        dst: SocketAddr,
    ) -> echo::Reply {
        let o = self.exchanges(from, proto, dst, 1, ANSWER_TIMEOUT);
        let (_, _, who) = self.origin(from);
        match o.first() {
            Some(Outcome::Reply(r)) => r.clone(),
            other => panic!(
                "[{}] {proto:?} from {who} to {dst}: sent \"hello 0\", expected an answer, got {}",
                self.mode.as_str(),
                other.map(|o| o.to_string()).unwrap_or_default()
            ),
        }
    }

    /// One exchange expected to get no answer at all within [`DROP_TIMEOUT`].
    pub(crate) fn expect_dropped(&self, from: From<'_>, proto: Proto, dst: SocketAddr) {
        let o = self.exchanges(from, proto, dst, 1, DROP_TIMEOUT);
        let (_, _, who) = self.origin(from);
        match o.first() {
            Some(Outcome::TimedOut) => {}
            other => panic!(
                "[{}] {proto:?} from {who} to {dst}: sent \"hello 0\", expected the node to drop it (no answer), got {}",
                self.mode.as_str(),
                other.map(|o| o.to_string()).unwrap_or_default()
            ),
        }
    }

    /// One exchange expected to be refused (TCP RST or ICMP unreachable).
    pub(crate) fn expect_refused(&self, from: From<'_>, proto: Proto, dst: SocketAddr) {
        let o = self.exchanges(from, proto, dst, 1, ANSWER_TIMEOUT);
        let (_, _, who) = self.origin(from);
        match o.first() {
            Some(Outcome::Refused) => {}
            other => panic!(
                "[{}] {proto:?} from {who} to {dst}: sent \"hello 0\", expected it to be refused at once, got {}",
                self.mode.as_str(),
                other.map(|o| o.to_string()).unwrap_or_default()
            ),
        }
    }

    /// Opens a TCP connection that later exchanges reuse.
    pub(crate) fn tcp_session(&self, from: From<'_>, dst: SocketAddr) -> Session {
        let (ns, src, who) = self.origin(from);
        let stream = ns.run_in(move || echo::tcp_connect(src, dst, ANSWER_TIMEOUT));
        match stream {
            Ok(Ok(s)) => {
                self.note(format!("TCP {who} -> {dst}: connected (session)"));
                Session {
                    who,
                    dst,
                    sock: SessionSock::Tcp(s),
                    seq: 0,
                }
            }
            Ok(Err(e)) => panic!(
                "[{}] TCP session {who} -> {dst}: connect: {e}",
                self.mode.as_str()
            ),
            Err(e) => panic!("client thread in {who}: {e}"),
        }
    }

    /// Opens a UDP "flow": one socket with a fixed source port, so every datagram is
    /// the same conntrack entry.
    pub(crate) fn udp_flow(&self, from: From<'_>, dst: SocketAddr) -> Session {
        let (ns, src, who) = self.origin(from);
        let sock = ns.run_in(move || echo::udp_socket(src.map(|ip| SocketAddr::new(ip, 0)), dst));
        match sock {
            Ok(Ok(s)) => Session {
                who,
                dst,
                sock: SessionSock::Udp(s),
                seq: 0,
            },
            Ok(Err(e)) => panic!("UDP flow {who} -> {dst}: {e}"),
            Err(e) => panic!("client thread in {who}: {e}"),
        }
    }

    /// One exchange on an open session.
    pub(crate) fn session_exchange(&self, s: &mut Session) -> Outcome {
        s.seq += 1;
        let msg = format!("again {}", s.seq);
        let o = match &mut s.sock {
            SessionSock::Tcp(t) => echo::tcp_exchange_on(t, &msg, ANSWER_TIMEOUT),
            SessionSock::Udp(u) => echo::udp_exchange_on(u, &msg, ANSWER_TIMEOUT),
        };
        let kind = match s.sock {
            SessionSock::Tcp(_) => "TCP session",
            SessionSock::Udp(_) => "UDP flow",
        };
        self.note(format!("{kind} {} -> {} sent {msg:?}: {o}", s.who, s.dst));
        o
    }

    /// The node's ruleset and conntrack table, for failure reports.
    pub(crate) fn node_state(&self) -> String {
        let mut out = String::new();
        let mut dump = |title: &str, program: &str, args: &[&str]| {
            out.push_str(&format!("----- {title} (in {})\n", self.node.name()));
            match self.node.exec(program, args) {
                Ok(s) => out.push_str(&s),
                Err(e) => out.push_str(&format!("<{e}>\n")),
            }
        };
        match self.mode {
            Mode::Iptables => {
                dump("iptables-save", "iptables-save", &[]);
                if self.ipv6 {
                    dump("ip6tables-save", "ip6tables-save", &[]);
                }
            }
            Mode::Nftables | Mode::NftablesMaps => {
                dump("nft list ruleset", "nft", &["list", "ruleset"])
            }
        }
        dump("conntrack -L", "conntrack", &["-L"]);
        out
    }

    fn report_failure(&self) {
        let mut msg = format!(
            "\n===== dataplane failure report: {} mode, bed {}\n",
            self.mode.as_str(),
            self.stem
        );
        if let Ok(a) = self.applies.lock() {
            match a.last() {
                Some(last) => msg.push_str(&format!(
                    "----- {} kproxy apply run(s); the last:\n{last}",
                    a.len()
                )),
                None => msg.push_str("----- kproxy apply was never run\n"),
            }
        }
        if let Ok(t) = self.transcript.lock() {
            // Load tests make hundreds of exchanges: the tail is what matters.
            let skip = t.len().saturating_sub(60);
            msg.push_str(&format!(
                "----- traffic ({} exchanges, last {} shown; what was sent and what came back)\n",
                t.len(),
                t.len() - skip
            ));
            for line in &t[skip..] {
                msg.push_str(line);
                msg.push('\n');
            }
        }
        let state = self.node_state();
        let lines: Vec<&str> = state.lines().collect();
        // Keep reports readable: a conntrack table after 300 connections is long.
        for line in lines.iter().take(400) {
            msg.push_str(line);
            msg.push('\n');
        }
        if lines.len() > 400 {
            msg.push_str(&format!("... {} more lines\n", lines.len() - 400));
        }
        eprintln!("{msg}");
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report_failure();
        }
        for p in &mut self.pods {
            if let Some(mut s) = p.server.take() {
                s.stop();
            }
        }
        // Fields drop next, in declaration order: pods, node2, client, node.
    }
}

/// An open TCP connection or UDP flow.
pub(crate) struct Session {
    who: String,
    dst: SocketAddr,
    sock: SessionSock,
    seq: u32,
}

enum SessionSock {
    Tcp(std::net::TcpStream),
    Udp(std::net::UdpSocket),
}

/// Counts outcomes by answering server (failures as `<refused>`, `<timed out>`, ...).
/// A running `kproxy run`; killed on drop.
pub(crate) struct DaemonGuard {
    child: std::process::Child,
    log: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    dir: Option<std::path::PathBuf>,
}

impl DaemonGuard {
    /// The daemon's process id (`ip netns exec` execs the program in place).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.kubeconfig);
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub(crate) fn tally(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        *m.entry(o.label()).or_insert(0) += 1;
    }
    m
}

/// `ip:port` of a service port.
pub(crate) fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

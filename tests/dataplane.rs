//! Real packets through the rules `kproxy apply` writes, in network namespaces.
//!
//! Each case builds a fresh simulated cluster (see `dataplane/bed.rs`), applies a
//! generated snapshot with kproxy inside the node namespace and checks where real TCP
//! and UDP traffic lands and which client address the pod saw. Every case runs for
//! iptables mode and nftables mode. They need root; without it they skip, except when
//! `CI` is set, where a skip would hide a regression and is a failure instead.
//!
//! A failing case prints what was sent and what came back, the last snapshot applied with
//! kproxy's output, and the node's ruleset and conntrack table.
//!
//! Run: `sudo -E cargo test --test dataplane` (or `scripts/test.sh`, which runs every
//! test). Namespaces are removed by Drop guards, also on panic; leftovers of a killed run
//! are removed by the next run or by `scripts/netns-cleanup.sh`.
//!
//! The echo servers are threads of this test process that entered a pod's namespace
//! (setns is per thread), not child processes: nothing can outlive the test run, and a
//! server is ready before the case sends its first packet.

#[path = "dataplane/bed.rs"]
mod bed;
#[path = "dataplane/echo.rs"]
mod echo;
#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;
#[path = "dataplane/snapshot.rs"]
mod snapshot;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use bed::{
    addr, external_ip, lb_ip, service_ip, tally, Bed, From, Mode, Proto, ANSWER_TIMEOUT, ECHO_PORT,
};
use echo::Outcome;
use snapshot::Service;

/// Service port used by every case (the pods listen on [`ECHO_PORT`]).
const PORT: u16 = 80;

/// True when the case may run; skips without root unless `CI` is set.
fn may_run() -> bool {
    netns::require_root("dataplane")
}

/// Generates `case::iptables` and `case::nftables` tests, each with optional attributes
/// (used for temporary `#[ignore]`s while a mode's `kproxy apply` is not merged).
macro_rules! both_modes {
    ($case:ident $(, iptables: #[$ia:meta])? $(, nftables: #[$na:meta])? $(, maps: #[$ma:meta])?) => {
        mod $case {
            #[test]
            $(#[$ia])?
            fn iptables() {
                if super::may_run() {
                    super::$case(super::Mode::Iptables);
                }
            }
            #[test]
            $(#[$na])?
            fn nftables() {
                if super::may_run() {
                    super::$case(super::Mode::Nftables);
                }
            }
            /// nftables mode with `--nftables-layout=maps`.
            #[test]
            $(#[$ma])?
            fn nftables_maps() {
                if super::may_run() {
                    super::$case(super::Mode::NftablesMaps);
                }
            }
        }
    };
}

fn servers(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .filter_map(|o| o.reply().map(|r| r.server.clone()))
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What `kproxy trace --live` says, inside the node, about a packet like the one the
/// case sends: (result kind, the endpoints as pod names, masquerade).
fn traced(
    bed: &Bed,
    mode: Mode,
    from: From<'_>,
    proto: Proto,
    dst: std::net::SocketAddr,
    pods: &[&str],
) -> (String, BTreeSet<String>, bool) {
    let v6 = dst.is_ipv6();
    let (src, from_node) = match from {
        From::Pod(p) => (bed.pod_ip(p, v6), ""),
        From::PodAddr(_, ip) | From::ClientAddr(ip) => (ip, ""),
        From::Node => (bed.node_ip(v6), "--from-node"),
        From::Client => (bed.client_ips().0, ""),
    };
    let proto = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let out = bed
        .node_sh(&format!(
            "{} trace --live --mode {} --src {src} --dst {} --dport {} --proto {proto} {from_node} -o json",
            env!("CARGO_BIN_EXE_kproxy"),
            mode.as_str(),
            dst.ip(),
            dst.port()
        ))
        .unwrap_or_else(|e| panic!("kproxy trace --live: {e}"));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("trace JSON: {e}: {out}"));
    let r = &v["result"];
    let eps = r["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let d = e["destination"].as_str().unwrap_or_default();
            let ip: IpAddr = d
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(|c| c == '[' || c == ']'))
                .unwrap_or(d)
                .parse()
                .unwrap_or_else(|_| panic!("traced destination {d}"));
            pods.iter()
                .find(|p| bed.pod_ip(p, ip.is_ipv6()) == ip)
                .map_or_else(|| d.to_string(), |p| p.to_string())
        })
        .collect();
    (
        r["kind"].as_str().unwrap_or_default().to_string(),
        eps,
        r["masquerade"].as_bool().unwrap_or(false),
    )
}

/// The tracer agrees with real packets: the endpoints it says a connection can reach
/// are those that answered, and it masquerades exactly when the pod saw the node.
#[allow(clippy::too_many_arguments)]
fn assert_traced(
    bed: &Bed,
    mode: Mode,
    from: From<'_>,
    proto: Proto,
    dst: std::net::SocketAddr,
    pods: &[&str],
    served: &BTreeSet<String>,
    masqueraded: bool,
) {
    let (kind, eps, masq) = traced(bed, mode, from, proto, dst, pods);
    assert_eq!(
        (kind.as_str(), &eps, masq),
        ("delivered", served, masqueraded),
        "trace --live of {proto:?} {from:?} -> {dst} disagrees with the packets"
    );
}

// ---------------------------------------------------------------------------------
// Harness self-check: hand-written rules, no kproxy. If this fails, the test bed (veths,
// routes, forwarding, rp_filter, conntrack) is broken and the kproxy cases mean nothing.

fn harness_self_check(v6: bool) {
    let bed = Bed::builder(Mode::Iptables)
        .local_pods(&["pod-a", "pod-b"])
        .remote_pods(&["pod-r"]);
    let bed = if v6 { bed.ipv6() } else { bed }.build();
    let (tool, cidr) = if v6 {
        ("ip6tables", "fd00:10:244::/56")
    } else {
        ("iptables", "10.244.0.0/16")
    };
    let a = bed.pod_ip("pod-a", v6);
    let r = bed.pod_ip("pod-r", v6);
    let (vip, vip_remote, vip_reject, vip_drop) = (
        service_ip(10, v6),
        service_ip(11, v6),
        service_ip(12, v6),
        service_ip(13, v6),
    );
    let node_ip = bed.node_ip(v6);
    let to = |ip: IpAddr| addr(ip, ECHO_PORT).to_string();
    let script = format!(
        "T={tool}
        $T -t nat -N SELF
        $T -t nat -A PREROUTING -j SELF
        $T -t nat -A OUTPUT -j SELF
        $T -t nat -A SELF -d {vip} -p tcp --dport {PORT} -j DNAT --to-destination {ta}
        $T -t nat -A SELF -d {vip} -p udp --dport {PORT} -j DNAT --to-destination {ta}
        $T -t nat -A SELF -d {vip_remote} -p tcp --dport {PORT} -j DNAT --to-destination {tr}
        $T -t nat -A SELF -d {node_ip} -p tcp --dport 30080 -j DNAT --to-destination {tr}
        $T -t nat -A POSTROUTING -s {a} -d {a} -j MASQUERADE
        $T -t nat -A POSTROUTING ! -s {cidr} -d {cidr} -m conntrack --ctstate DNAT -j MASQUERADE
        $T -A FORWARD -d {vip_reject} -j REJECT
        $T -A OUTPUT -d {vip_reject} -j REJECT
        $T -A FORWARD -d {vip_drop} -j DROP",
        ta = to(a),
        tr = to(r),
    );
    if let Err(e) = bed.node_sh(&script) {
        panic!("hand-written rules: {e}");
    }
    let b = bed.pod_ip("pod-b", v6);
    for proto in [Proto::Tcp, Proto::Udp] {
        let got = bed.expect_reply(From::Pod("pod-b"), proto, addr(vip, PORT));
        assert_eq!(
            (got.server.as_str(), got.peer.ip()),
            ("pod-a", b),
            "{proto:?} pod-b -> vip"
        );
        let got = bed.expect_reply(From::Node, proto, addr(vip, PORT));
        assert_eq!(got.server, "pod-a", "{proto:?} node -> vip");
        let got = bed.expect_reply(From::Pod("pod-a"), proto, addr(vip, PORT));
        assert_eq!(got.server, "pod-a", "{proto:?} hairpin");
        assert!(
            bed.is_node_addr(got.peer.ip()),
            "hairpin must be masqueraded, pod saw {}",
            got.peer
        );
    }
    let got = bed.expect_reply(From::Pod("pod-b"), Proto::Tcp, addr(vip_remote, PORT));
    assert_eq!(
        (got.server.as_str(), got.peer.ip()),
        ("pod-r", b),
        "pod-b -> remote pod"
    );
    if !v6 {
        let got = bed.expect_reply(From::Client, Proto::Tcp, addr(node_ip, 30080));
        assert_eq!(got.server, "pod-r", "client -> NodePort -> remote pod");
        assert!(
            bed.is_node_addr(got.peer.ip()),
            "NodePort masquerade, pod saw {}",
            got.peer
        );
    }
    bed.expect_refused(From::Pod("pod-b"), Proto::Tcp, addr(vip_reject, PORT));
    bed.expect_refused(From::Pod("pod-b"), Proto::Udp, addr(vip_reject, PORT));
    bed.expect_refused(From::Node, Proto::Tcp, addr(vip_reject, PORT));
    bed.expect_dropped(From::Pod("pod-b"), Proto::Tcp, addr(vip_drop, PORT));
}

#[test]
fn harness_self_check_ipv4() {
    if may_run() {
        harness_self_check(false);
    }
}

#[test]
fn harness_self_check_ipv6() {
    if may_run() {
        harness_self_check(true);
    }
}

// ---------------------------------------------------------------------------------
// 1. ClusterIP from a pod, from the node and hairpin; TCP and UDP; IPv4 and IPv6.

fn clusterip(mode: Mode, v6: bool) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-b"])
        .remote_pods(&["pod-r"]);
    let bed = if v6 { bed.ipv6() } else { bed }.build();
    let (solo, remote) = (service_ip(10, v6), service_ip(11, v6));
    bed.apply(
        &bed.snapshot()
            .service(
                Service::new("solo", solo, PORT, ECHO_PORT).endpoints(vec![bed.ep("pod-a", v6)]),
            )
            .service(
                Service::new("remote", remote, PORT, ECHO_PORT)
                    .endpoints(vec![bed.ep("pod-r", v6)]),
            ),
    );
    let b = bed.pod_ip("pod-b", v6);
    for proto in [Proto::Tcp, Proto::Udp] {
        let got = bed.expect_reply(From::Pod("pod-b"), proto, addr(solo, PORT));
        assert_eq!(got.server, "pod-a", "{proto:?} pod-b -> ClusterIP {solo}");
        let pods = ["pod-a", "pod-b", "pod-r"];
        let masq = bed.is_node_addr(got.peer.ip());
        let one = names(&["pod-a"]);
        assert_traced(
            &bed,
            mode,
            From::Pod("pod-b"),
            proto,
            addr(solo, PORT),
            &pods,
            &one,
            masq,
        );
        assert_eq!(
            got.peer.ip(),
            b,
            "{proto:?} pod -> ClusterIP must keep the pod's address (clusterCIDR detector)"
        );

        let got = bed.expect_reply(From::Node, proto, addr(solo, PORT));
        assert_eq!(got.server, "pod-a", "{proto:?} node -> ClusterIP {solo}");

        let got = bed.expect_reply(From::Pod("pod-a"), proto, addr(solo, PORT));
        assert_eq!(
            got.server, "pod-a",
            "{proto:?} hairpin: pod-a -> its own service"
        );
        let masq = bed.is_node_addr(got.peer.ip());
        assert_traced(
            &bed,
            mode,
            From::Pod("pod-a"),
            proto,
            addr(solo, PORT),
            &pods,
            &one,
            masq,
        );
        assert!(
            bed.is_node_addr(got.peer.ip()),
            "{proto:?} hairpin must be masqueraded to the node; pod-a saw client {}",
            got.peer
        );

        let got = bed.expect_reply(From::Pod("pod-b"), proto, addr(remote, PORT));
        assert_eq!(
            got.server, "pod-r",
            "{proto:?} pod-b -> ClusterIP {remote} (endpoint on node-2)"
        );
        assert_eq!(
            got.peer.ip(),
            b,
            "{proto:?} pod -> remote endpoint keeps the pod's address"
        );

        let got = bed.expect_reply(From::Node, proto, addr(remote, PORT));
        assert_eq!(
            got.server, "pod-r",
            "{proto:?} node -> ClusterIP {remote} (endpoint on node-2)"
        );
        let masq = bed.is_node_addr(got.peer.ip());
        let r = names(&["pod-r"]);
        assert_traced(
            &bed,
            mode,
            From::Node,
            proto,
            addr(remote, PORT),
            &pods,
            &r,
            masq,
        );
    }
}

fn clusterip_v4(mode: Mode) {
    clusterip(mode, false)
}

fn clusterip_v6(mode: Mode) {
    clusterip(mode, true)
}

both_modes!(clusterip_v4);
both_modes!(clusterip_v6);

// ---------------------------------------------------------------------------------
// 2. Load spread: 300 new connections over 3 endpoints, each gets 20%..47%.
// With p = 1/3 the mean is 100 and sigma ~8.2: the bounds are ~5 sigma away, so a
// correct implementation fails this about once in a million runs.

fn load_spread(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-b", "pod-c"])
        .remote_pods(&["pod-r"])
        .build();
    let vip = service_ip(20, false);
    bed.apply(
        &bed.snapshot()
            .service(Service::new("spread", vip, PORT, ECHO_PORT).endpoints(vec![
                bed.ep("pod-a", false),
                bed.ep("pod-b", false),
                bed.ep("pod-r", false),
            ])),
    );
    let outcomes = bed.exchanges(
        From::Pod("pod-c"),
        Proto::Tcp,
        addr(vip, PORT),
        300,
        ANSWER_TIMEOUT,
    );
    let t = tally(&outcomes);
    for ep in ["pod-a", "pod-b", "pod-r"] {
        let n = t.get(ep).copied().unwrap_or(0);
        assert!(
            (60..=141).contains(&n),
            "300 connections pod-c -> {vip}:{PORT}: {ep} got {n} (want 60..=141); all: {t:?}"
        );
    }
    let answered: usize = ["pod-a", "pod-b", "pod-r"]
        .iter()
        .filter_map(|e| t.get(*e))
        .sum();
    assert_eq!(
        answered, 300,
        "every connection must be answered by an endpoint: {t:?}"
    );
    let masq = outcomes
        .iter()
        .filter_map(|o| o.reply())
        .any(|r| bed.is_node_addr(r.peer.ip()));
    let pods = ["pod-a", "pod-b", "pod-r"];
    assert_traced(
        &bed,
        mode,
        From::Pod("pod-c"),
        Proto::Tcp,
        addr(vip, PORT),
        &pods,
        &servers(&outcomes),
        masq,
    );
}

both_modes!(load_spread);

// ---------------------------------------------------------------------------------
// 3. Session affinity ClientIP: each client keeps its endpoint; clients differ.

fn session_affinity(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-b", "pod-c", "pod-d"])
        .pod_aliases("pod-d", 12)
        .build();
    let vip = service_ip(30, false);
    bed.apply(
        &bed.snapshot().service(
            Service::new("sticky", vip, PORT, ECHO_PORT)
                .client_ip_affinity(10800)
                .endpoints(vec![
                    bed.ep("pod-a", false),
                    bed.ep("pod-b", false),
                    bed.ep("pod-c", false),
                ]),
        ),
    );
    let mut chosen = BTreeSet::new();
    for ip in bed.pod_aliases("pod-d") {
        let outcomes = bed.exchanges(
            From::PodAddr("pod-d", ip),
            Proto::Tcp,
            addr(vip, PORT),
            5,
            ANSWER_TIMEOUT,
        );
        let t = tally(&outcomes);
        assert_eq!(
            t.len(),
            1,
            "client {ip} must stick to one endpoint over 5 connections: {t:?}"
        );
        let first = outcomes[0]
            .reply()
            .unwrap_or_else(|| panic!("client {ip}: {}", outcomes[0]));
        assert_eq!(
            first.peer.ip(),
            ip,
            "the endpoint must see the client's own address"
        );
        chosen.insert(first.server.clone());
    }
    // 12 independent clients all landing on one of 3 endpoints: p = 3^-11.
    assert!(
        chosen.len() >= 2,
        "12 different clients all got the same endpoint {chosen:?}: affinity is not per client"
    );
}

both_modes!(session_affinity);

// ---------------------------------------------------------------------------------
// 4. NodePort from the external client; localhost NodePorts in iptables mode.

fn nodeport(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a"])
        .remote_pods(&["pod-r"])
        .build();
    let np = 30080;
    bed.apply(
        &bed.snapshot().service(
            Service::new("np", service_ip(40, false), PORT, ECHO_PORT)
                .node_port(np)
                .endpoints(vec![bed.ep("pod-a", false), bed.ep("pod-r", false)]),
        ),
    );
    let dst = addr(bed.node_ip(false), np);
    let outcomes = bed.exchanges(From::Client, Proto::Tcp, dst, 20, ANSWER_TIMEOUT);
    assert_eq!(
        servers(&outcomes),
        names(&["pod-a", "pod-r"]),
        "20 connections client -> NodePort {dst}: {:?}",
        tally(&outcomes)
    );
    for o in &outcomes {
        if let Some(r) = o.reply() {
            assert!(
                bed.is_node_addr(r.peer.ip()),
                "eTP=Cluster NodePort traffic is masqueraded; {} saw {}",
                r.server,
                r.peer
            );
        }
    }
    let got = bed.expect_reply(From::Client, Proto::Udp, dst);
    assert!(
        ["pod-a", "pod-r"].contains(&got.server.as_str()),
        "UDP NodePort: {got:?}"
    );
    let masq = outcomes
        .iter()
        .filter_map(|o| o.reply())
        .all(|r| bed.is_node_addr(r.peer.ip()));
    assert_traced(
        &bed,
        mode,
        From::Client,
        Proto::Tcp,
        dst,
        &["pod-a", "pod-r"],
        &servers(&outcomes),
        masq,
    );

    let localhost = addr(IpAddr::V4(Ipv4Addr::LOCALHOST), np);
    match mode {
        Mode::Iptables => {
            // localhostNodePorts defaults to true in iptables mode.
            let got = bed.expect_reply(From::Node, Proto::Tcp, localhost);
            assert!(
                ["pod-a", "pod-r"].contains(&got.server.as_str()),
                "localhost NodePort: {got:?}"
            );
        }
        Mode::Nftables | Mode::NftablesMaps => {
            // nftables mode never serves NodePorts on loopback.
            let o = bed.exchanges(From::Node, Proto::Tcp, localhost, 1, ANSWER_TIMEOUT);
            assert!(
                o[0].reply().is_none(),
                "nftables mode must not serve {localhost}: got {}",
                o[0]
            );
        }
    }
}

both_modes!(nodeport);

// ---------------------------------------------------------------------------------
// 5. LoadBalancer IP and externalIP from the external client.

fn loadbalancer_external_ip(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a"])
        .remote_pods(&["pod-r"])
        .build();
    let (lb, ext) = (lb_ip(10), external_ip(10));
    bed.apply(
        &bed.snapshot().service(
            Service::new("lb", service_ip(50, false), PORT, ECHO_PORT)
                .load_balancer(30090, lb)
                .external_ip(ext)
                .endpoints(vec![bed.ep("pod-a", false), bed.ep("pod-r", false)]),
        ),
    );
    for dst in [addr(lb, PORT), addr(ext, PORT)] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let got = bed.expect_reply(From::Client, proto, dst);
            assert!(
                ["pod-a", "pod-r"].contains(&got.server.as_str()),
                "{proto:?} client -> {dst}: {got:?}"
            );
            assert!(
                bed.is_node_addr(got.peer.ip()),
                "{proto:?} client -> {dst}: eTP=Cluster traffic is masqueraded, {} saw {}",
                got.server,
                got.peer
            );
        }
    }
}

both_modes!(loadbalancer_external_ip);

// ---------------------------------------------------------------------------------
// 6. externalTrafficPolicy Local: local endpoint only, client IP preserved; no local
// endpoint: dropped.
// The healthCheckNodePorts (200 with a local endpoint, 503 without) are served by
// `kproxy run`, checked at the end against the fake API server.

fn external_local(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a"])
        .remote_pods(&["pod-r"])
        .build();
    let (lb_here, lb_away) = (lb_ip(20), lb_ip(21));
    let (np_here, np_away) = (30100, 30101);
    let snap = bed
        .snapshot()
        .service(
            Service::new("here", service_ip(60, false), PORT, ECHO_PORT)
                .load_balancer(np_here, lb_here)
                .external_local()
                .health_check_node_port(32100)
                .endpoints(vec![bed.ep("pod-a", false), bed.ep("pod-r", false)]),
        )
        .service(
            Service::new("away", service_ip(61, false), PORT, ECHO_PORT)
                .load_balancer(np_away, lb_away)
                .external_local()
                .health_check_node_port(32101)
                .endpoints(vec![bed.ep("pod-r", false)]),
        );
    bed.apply(&snap);
    let (client, _) = bed.client_ips();
    for dst in [addr(bed.node_ip(false), np_here), addr(lb_here, PORT)] {
        let outcomes = bed.exchanges(From::Client, Proto::Tcp, dst, 10, ANSWER_TIMEOUT);
        assert_eq!(
            servers(&outcomes),
            names(&["pod-a"]),
            "eTP=Local: 10 connections client -> {dst} must all reach the local endpoint: {:?}",
            tally(&outcomes)
        );
        for o in &outcomes {
            if let Some(r) = o.reply() {
                assert_eq!(
                    r.peer.ip(),
                    client,
                    "eTP=Local keeps the client address; pod saw {}",
                    r.peer
                );
            }
        }
        let got = bed.expect_reply(From::Client, Proto::Udp, dst);
        assert_eq!(
            (got.server.as_str(), got.peer.ip()),
            ("pod-a", client),
            "UDP client -> {dst}"
        );
        let masq = outcomes
            .iter()
            .filter_map(|o| o.reply())
            .any(|r| r.peer.ip() != client);
        assert_traced(
            &bed,
            mode,
            From::Client,
            Proto::Tcp,
            dst,
            &["pod-a", "pod-r"],
            &servers(&outcomes),
            masq,
        );
    }
    for dst in [addr(bed.node_ip(false), np_away), addr(lb_away, PORT)] {
        let (kind, eps, _) = traced(&bed, mode, From::Client, Proto::Tcp, dst, &["pod-r"]);
        assert_eq!(
            (kind.as_str(), eps.len()),
            ("dropped", 0),
            "trace --live {dst}"
        );
    }
    bed.expect_dropped(From::Client, Proto::Tcp, addr(bed.node_ip(false), np_away));
    bed.expect_dropped(From::Client, Proto::Tcp, addr(lb_away, PORT));

    // Health-check node ports, as the cloud load balancer probes them from outside.
    let daemon = bed.run_daemon(&snap).expect("start kproxy run");
    let probe = |port: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if let Some(r) = bed.http_get(From::Client, addr(bed.node_ip(false), port), "/") {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "healthCheckNodePort {port} never answered; daemon log:\n{}",
                daemon.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let (code, body) = probe(32100);
    assert_eq!(code, 200, "local endpoint present: {body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    let (code, body) = probe(32101);
    assert_eq!(code, 503, "no local endpoint: {body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
}

both_modes!(external_local);

// ---------------------------------------------------------------------------------
// 7. internalTrafficPolicy Local: only node-local endpoints; none local: dropped.

fn internal_local(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-c"])
        .remote_pods(&["pod-r", "pod-s"])
        .build();
    let (vip, vip_remote_only) = (service_ip(70, false), service_ip(71, false));
    bed.apply(
        &bed.snapshot()
            .service(
                Service::new("itp", vip, PORT, ECHO_PORT)
                    .internal_local()
                    .endpoints(vec![
                        bed.ep("pod-a", false),
                        bed.ep("pod-r", false),
                        bed.ep("pod-s", false),
                    ]),
            )
            .service(
                Service::new("itp-away", vip_remote_only, PORT, ECHO_PORT)
                    .internal_local()
                    .endpoints(vec![bed.ep("pod-r", false)]),
            ),
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        let outcomes = bed.exchanges(
            From::Pod("pod-c"),
            proto,
            addr(vip, PORT),
            20,
            ANSWER_TIMEOUT,
        );
        assert_eq!(
            servers(&outcomes),
            names(&["pod-a"]),
            "iTP=Local: 20 {proto:?} exchanges pod-c -> {vip} must all reach the node-local endpoint: {:?}",
            tally(&outcomes)
        );
    }
    bed.expect_dropped(From::Pod("pod-c"), Proto::Tcp, addr(vip_remote_only, PORT));
}

both_modes!(internal_local);

// ---------------------------------------------------------------------------------
// 8. No endpoints: refused at once (REJECT), not left hanging.

fn no_endpoints(mode: Mode) {
    let bed = Bed::builder(mode).local_pods(&["pod-a"]).build();
    let vip = service_ip(80, false);
    let np = 30110;
    bed.apply(
        &bed.snapshot().service(
            Service::new("empty", vip, PORT, ECHO_PORT)
                .node_port(np)
                .endpoints(vec![]),
        ),
    );
    bed.expect_refused(From::Pod("pod-a"), Proto::Tcp, addr(vip, PORT));
    bed.expect_refused(From::Pod("pod-a"), Proto::Udp, addr(vip, PORT));
    bed.expect_refused(From::Node, Proto::Tcp, addr(vip, PORT));
    bed.expect_refused(From::Client, Proto::Tcp, addr(bed.node_ip(false), np));
}

both_modes!(no_endpoints);

// ---------------------------------------------------------------------------------
// 9. loadBalancerSourceRanges: inside the range connects, outside gets nothing.

fn source_ranges(mode: Mode) {
    let bed = Bed::builder(mode).local_pods(&["pod-a"]).build();
    let (allowed, blocked) = bed.client_ips();
    let lb = lb_ip(30);
    let np = 30120;
    bed.apply(
        &bed.snapshot().service(
            Service::new("fw", service_ip(90, false), PORT, ECHO_PORT)
                .load_balancer(np, lb)
                .source_range(&format!("{allowed}/32"))
                .endpoints(vec![bed.ep("pod-a", false)]),
        ),
    );
    let got = bed.expect_reply(From::ClientAddr(allowed), Proto::Tcp, addr(lb, PORT));
    assert_eq!(got.server, "pod-a", "allowed source {allowed} -> LB {lb}");
    bed.expect_dropped(From::ClientAddr(blocked), Proto::Tcp, addr(lb, PORT));
    // Source ranges guard the LB IP only; the NodePort stays open (upstream semantics).
    let got = bed.expect_reply(
        From::ClientAddr(blocked),
        Proto::Tcp,
        addr(bed.node_ip(false), np),
    );
    assert_eq!(
        got.server, "pod-a",
        "blocked source {blocked} -> NodePort {np}"
    );
}

both_modes!(source_ranges);

// ---------------------------------------------------------------------------------
// 10. Live changes with successive applies: 1 -> 3 -> 1 endpoints.

fn live_changes(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-b", "pod-c", "pod-d"])
        .build();
    let vip = service_ip(100, false);
    let dst = addr(vip, PORT);
    let svc = |eps: &[&str]| {
        bed.snapshot().service(
            Service::new("live", vip, PORT, ECHO_PORT)
                .endpoints(eps.iter().map(|p| bed.ep(p, false)).collect()),
        )
    };
    let expect = |o: Outcome, want: &str, what: &str| {
        let ok = o.reply().map(|r| r.server == want).unwrap_or(false);
        assert!(ok, "{what}: expected an answer from {want}, got {o}");
    };

    bed.apply(&svc(&["pod-a"]));
    let mut tcp_a = bed.tcp_session(From::Pod("pod-d"), dst);
    expect(
        bed.session_exchange(&mut tcp_a),
        "pod-a",
        "TCP session, 1 endpoint",
    );
    let mut udp = bed.udp_flow(From::Pod("pod-d"), dst);
    expect(
        bed.session_exchange(&mut udp),
        "pod-a",
        "UDP flow, 1 endpoint",
    );

    bed.apply(&svc(&["pod-a", "pod-b", "pod-c"]));
    expect(
        bed.session_exchange(&mut tcp_a),
        "pod-a",
        "established TCP connection after scaling to 3",
    );
    expect(
        bed.session_exchange(&mut udp),
        "pod-a",
        "UDP flow to a kept endpoint after scaling to 3",
    );
    let outcomes = bed.exchanges(From::Pod("pod-d"), Proto::Tcp, dst, 30, ANSWER_TIMEOUT);
    assert_eq!(
        servers(&outcomes),
        names(&["pod-a", "pod-b", "pod-c"]),
        "after scaling to 3, new connections use all endpoints: {:?}",
        tally(&outcomes)
    );
    // An established connection to pod-b, which will survive the scale-down.
    let mut tcp_b = None;
    for _ in 0..40 {
        let mut s = bed.tcp_session(From::Pod("pod-d"), dst);
        if bed
            .session_exchange(&mut s)
            .reply()
            .map(|r| r.server == "pod-b")
            == Some(true)
        {
            tcp_b = Some(s);
            break;
        }
    }
    let mut tcp_b = tcp_b.expect("40 new connections and none reached pod-b");

    bed.apply(&svc(&["pod-b"]));
    expect(
        bed.session_exchange(&mut tcp_b),
        "pod-b",
        "established TCP connection to the surviving endpoint",
    );
    let outcomes = bed.exchanges(From::Pod("pod-d"), Proto::Tcp, dst, 10, ANSWER_TIMEOUT);
    assert_eq!(
        servers(&outcomes),
        names(&["pod-b"]),
        "after scaling to 1, new connections use only pod-b: {:?}",
        tally(&outcomes)
    );
    // The flow's conntrack entry still points at pod-a, which is no endpoint any more:
    // conntrack cleanup must remove it so the next datagram is balanced anew.
    expect(
        bed.session_exchange(&mut udp),
        "pod-b",
        "UDP flow whose endpoint (pod-a) was removed, after conntrack cleanup",
    );
}

both_modes!(live_changes);

// ---------------------------------------------------------------------------------
// 11. Terminating endpoints: with only terminating ones left, serving ones still work.

fn terminating(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a", "pod-b", "pod-c", "pod-d"])
        .build();
    let vip = service_ip(110, false);
    bed.apply(
        &bed.snapshot().service(
            Service::new("draining", vip, PORT, ECHO_PORT).endpoints(vec![
                bed.ep("pod-a", false).terminating(true),
                bed.ep("pod-b", false).terminating(true),
                bed.ep("pod-c", false).terminating(false),
            ]),
        ),
    );
    let outcomes = bed.exchanges(
        From::Pod("pod-d"),
        Proto::Tcp,
        addr(vip, PORT),
        30,
        ANSWER_TIMEOUT,
    );
    assert_eq!(
        servers(&outcomes),
        names(&["pod-a", "pod-b"]),
        "only serving terminating endpoints (pod-a, pod-b) get traffic, never the non-serving pod-c: {:?}",
        tally(&outcomes)
    );
    assert!(
        outcomes.iter().all(|o| o.reply().is_some()),
        "every connection must be answered: {:?}",
        tally(&outcomes)
    );
}

both_modes!(terminating);

// ---------------------------------------------------------------------------------
// Drop-in for kube-proxy: the binary installed as `kube-proxy`, started with kubeadm's
// command line and kubeadm's generated config.conf, serves rules, /healthz on :10256
// and /metrics on 127.0.0.1:10249; in nftables mode NodePorts only on the node's
// primary address (upstream's nftables default), in iptables mode on every address.

fn kubeadm_dropin(mode: Mode) {
    let bed = Bed::builder(mode)
        .local_pods(&["pod-a"])
        .remote_pods(&["pod-r"])
        .build();
    let np = 30090;
    let cluster_ip = service_ip(60, false);
    let snap = bed.snapshot().service(
        Service::new("web", cluster_ip, PORT, ECHO_PORT)
            .node_port(np)
            .endpoints(vec![bed.ep("pod-a", false)]),
    );
    // A second address on the node's uplink, which is not its primary (Node) IP.
    let secondary: IpAddr = "192.168.50.3".parse().unwrap();
    bed.node_sh(&format!("ip addr add {secondary}/24 dev up0"))
        .expect("secondary node address");
    let daemon = bed.run_kube_proxy(&snap).expect("start kube-proxy");
    let healthz = addr(IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);
    let metrics = addr(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
    // Synced once the daemon reports a successful sync on /metrics.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some((200, body)) = bed.http_get(From::Node, metrics, "/metrics") {
            if body.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{") {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kube-proxy never synced (no /metrics on 127.0.0.1:10249 showing a sync); log:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // kubeadm's config.conf says `oomScoreAdj: null`: upstream's default -999 applies.
    let oom = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", daemon.pid()))
        .unwrap_or_default();
    // Lowering it needs CAP_SYS_RESOURCE; without it (some sandboxes) upstream and
    // kproxy log the failure and go on: then the log shows the value it tried.
    assert!(
        oom.trim() == "-999"
            || daemon
                .log()
                .contains("could not set oom_score_adj value=-999"),
        "oom_score_adj of the daemon is {oom:?} and it did not try -999; log:\n{}",
        daemon.log()
    );
    let (code, body) = bed
        .http_get(From::Node, healthz, "/healthz")
        .unwrap_or_else(|| panic!("no /healthz on :10256; log:\n{}", daemon.log()));
    assert_eq!(code, 200, "{body}");
    // healthz binds every address (0.0.0.0:10256), metrics only loopback.
    assert!(
        bed.http_get(From::Client, addr(bed.node_ip(false), 10256), "/healthz")
            .is_some(),
        "healthz must answer on the node IP"
    );
    assert!(
        bed.http_get(From::Client, addr(bed.node_ip(false), 10249), "/metrics")
            .is_none(),
        "metrics must stay on loopback"
    );

    let got = bed.expect_reply(From::Node, Proto::Tcp, addr(cluster_ip, PORT));
    assert_eq!(got.server, "pod-a", "node -> ClusterIP");
    let got = bed.expect_reply(From::Client, Proto::Tcp, addr(bed.node_ip(false), np));
    assert_eq!(got.server, "pod-a", "client -> NodePort on the primary IP");
    let o = bed.exchanges(
        From::Client,
        Proto::Tcp,
        addr(secondary, np),
        1,
        ANSWER_TIMEOUT,
    );
    match mode {
        Mode::Nftables | Mode::NftablesMaps => assert!(
            o[0].reply().is_none(),
            "nftables mode defaults to nodePortAddresses=primary: {secondary}:{np} must not be served, got {}",
            o[0]
        ),
        Mode::Iptables => assert!(
            o[0].reply().is_some(),
            "iptables mode serves NodePorts on every local address: {secondary}:{np} got {}",
            o[0]
        ),
    }
    drop(daemon);
}

both_modes!(kubeadm_dropin);

// ---------------------------------------------------------------------------------
// Switching modes: rules the other mode left behind (as kube-proxy leaves them) are
// removed, and traffic follows only the new mode's rules. `mode` is the new mode.

fn mode_switch(mode: Mode) {
    // The maps layout switches from upstream's nftables table (a layout switch).
    let old = match mode {
        Mode::Iptables => Mode::Nftables,
        Mode::Nftables => Mode::Iptables,
        Mode::NftablesMaps => Mode::Nftables,
    };
    let bed = Bed::builder(mode).local_pods(&["pod-a", "pod-b"]).build();
    let (gone, web) = (service_ip(61, false), service_ip(62, false));
    let before = bed
        .snapshot()
        .service(
            Service::new("gone", gone, PORT, ECHO_PORT).endpoints(vec![bed.ep("pod-a", false)]),
        )
        .service(Service::new("web", web, PORT, ECHO_PORT).endpoints(vec![bed.ep("pod-a", false)]));
    bed.try_apply_in(old, &before, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let got = bed.expect_reply(From::Node, Proto::Tcp, addr(gone, PORT));
    assert_eq!(got.server, "pod-a", "{} rules in place", old.as_str());

    // The Service "gone" is deleted and "web" moves to pod-b; applied in the new mode.
    let after = bed
        .snapshot()
        .service(Service::new("web", web, PORT, ECHO_PORT).endpoints(vec![bed.ep("pod-b", false)]));
    bed.apply(&after);
    match old {
        Mode::Iptables => {
            for save in ["iptables-nft-save", "iptables-legacy-save"] {
                let dump = bed
                    .node_sh(&format!("{save} 2>/dev/null || true"))
                    .unwrap_or_default();
                let stale: Vec<&str> = dump
                    .lines()
                    .filter(|l| l.contains("KUBE-"))
                    .filter(|l| !l.contains("KUBE-FIREWALL") && !l.contains("KUBE-KUBELET-CANARY"))
                    .collect();
                assert!(
                    stale.is_empty(),
                    "{save} still has kube-proxy rules:\n{}",
                    stale.join("\n")
                );
            }
        }
        Mode::Nftables | Mode::NftablesMaps => {
            let tables = bed.node_sh("nft list tables").unwrap_or_default();
            assert!(
                !tables.contains("kube-proxy"),
                "kube-proxy nftables table left:\n{tables}"
            );
        }
    }
    let o = bed.exchanges(From::Node, Proto::Tcp, addr(gone, PORT), 1, ANSWER_TIMEOUT);
    assert!(
        o[0].reply().is_none(),
        "deleted Service {gone} still answered through stale {} rules: {}",
        old.as_str(),
        o[0]
    );
    let outcomes = bed.exchanges(From::Node, Proto::Tcp, addr(web, PORT), 10, ANSWER_TIMEOUT);
    assert_eq!(
        servers(&outcomes),
        names(&["pod-b"]),
        "web must follow only the new rules: {:?}",
        tally(&outcomes)
    );
}

both_modes!(mode_switch);

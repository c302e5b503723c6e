//! Cluster state -> `iptables-restore` input, full and partial, as upstream writes it.
//!
//! Rendering is pure: the caller passes the family's [`ProxyState`], whether the sync is
//! full, and (optionally) the nat chains that exist in the kernel. The renderer keeps
//! what was last applied successfully; [`Renderer::commit`] is called only after the
//! kernel accepted a payload, and [`Renderer::invalidate`] after a failure forces the
//! next sync to be full.
//!
//! A partial sync rewrites the per-service chains of exactly the Services whose desired
//! content differs from what was last applied (a diff of data, not an event queue), plus
//! everything upstream always rewrites: the whole filter table and nat's fixed chains.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use crate::config::{FamilySettings, LocalDetector, NodePortAddresses};
use crate::model::{Endpoint, IpFamily, ObjectKey, PortPlan, ProxyState};

use super::names::{endpoint_chain, is_service_chain, PortChains};

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const NODEPORTS_TAIL_COMMENT: &str =
    "kubernetes service nodeports; NOTE: this must be the last rule in this chain";

/// Per-sync inputs besides the cluster state.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// Rewrite every service chain (forced anyway when nothing was applied yet).
    pub full: bool,
    /// nat chains present in the kernel (`iptables-save -t nat`); stale per-service
    /// chains among them are deleted. `None`: use the chains we applied last time.
    pub existing_nat_chains: Option<&'a BTreeSet<String>>,
    /// In large-cluster mode upstream deletes stale chains only once per syncPeriod;
    /// the caller says whether that time has come. Ignored outside large-cluster mode.
    pub large_cluster_cleanup_due: bool,
}

/// A rendered payload plus what applying it would make true.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The `iptables-restore --noflush` input (filter then nat).
    pub payload: String,
    /// Whether this is a full sync.
    pub full: bool,
    /// Rule lines in the filter table (metric `iptables_last{table="filter"}`).
    pub filter_rules: usize,
    /// nat rule lines written, `-X` lines excluded (`iptables_last{table="nat"}`).
    pub nat_rules: usize,
    /// nat rules owned in total, unchanged services included (`iptables_total{table="nat"}`).
    pub nat_rules_total: usize,
    /// Stale chains this payload deletes.
    pub deleted_chains: Vec<String>,
    /// Whether large-cluster mode (no per-endpoint comments) was on.
    pub large_cluster: bool,
    /// Service ports with iTP=Local and endpoints elsewhere but none here.
    pub no_local_internal: usize,
    /// Service ports with eTP=Local and endpoints elsewhere but none here.
    pub no_local_external: usize,
    /// Services whose chains this payload rewrites.
    pub services_written: usize,
    next: Applied,
}

/// What the kernel holds after a successful apply, per Service.
#[derive(Debug, Clone, Default)]
struct Applied {
    services: BTreeMap<ObjectKey, AppliedService>,
    /// Stale chains left in place (large-cluster mode defers their deletion).
    leftover: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct AppliedService {
    /// Hash of the desired content (ports, endpoints, selection) it was rendered from.
    fingerprint: u64,
    /// Its per-service chains.
    chains: Vec<String>,
    /// Its nat rule lines (for the rule-count metric when it is not rewritten).
    nat_lines: usize,
}

/// Renders one family's rules and remembers what was last applied.
#[derive(Debug, Clone)]
pub struct Renderer {
    settings: FamilySettings,
    applied: Option<Applied>,
}

impl Renderer {
    /// A renderer that has applied nothing yet (its first sync is full).
    pub fn new(settings: FamilySettings) -> Self {
        Renderer {
            settings,
            applied: None,
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &FamilySettings {
        &self.settings
    }

    /// Replaces the settings; the next sync is full.
    pub fn set_settings(&mut self, settings: FamilySettings) {
        self.settings = settings;
        self.applied = None;
    }

    /// Whether the next sync must be full (nothing applied yet, or a failure since).
    pub fn needs_full_sync(&self) -> bool {
        self.applied.is_none()
    }

    /// Forgets what was applied: call after a failed apply.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Records that `rendered` was accepted by the kernel.
    pub fn commit(&mut self, rendered: Rendered) {
        self.applied = Some(rendered.next);
    }

    /// Per-service chains the renderer believes are in the kernel.
    pub fn applied_chains(&self) -> BTreeSet<String> {
        self.applied
            .iter()
            .flat_map(|a| a.services.values())
            .flat_map(|s| s.chains.iter().cloned())
            .chain(self.applied.iter().flat_map(|a| a.leftover.iter().cloned()))
            .collect()
    }

    /// Renders a sync.
    pub fn render(&self, state: &ProxyState, opts: &RenderOptions<'_>) -> Rendered {
        let full = opts.full || self.applied.is_none();
        let previous = self.applied.as_ref().filter(|_| !full);
        let large = state.total_endpoints() > self.settings.large_cluster_threshold;
        let mut w = Writer::new(&self.settings, large, state.family);

        // Group ports by Service: partial syncs rewrite whole Services, as upstream does.
        let mut next = Applied::default();
        let mut i = 0;
        let ports = &state.ports;
        while i < ports.len() {
            let key = ports[i].service_key();
            let mut j = i + 1;
            while j < ports.len() && ports[j].service_key() == key {
                j += 1;
            }
            let group = &ports[i..j];
            let fingerprint = fingerprint(group);
            let unchanged = previous
                .and_then(|p| p.services.get(&key))
                .filter(|s| s.fingerprint == fingerprint);
            let mut chains = Vec::new();
            let nat_before = w.nat_rule_lines;
            for port in group {
                w.capture_rules(port);
                if unchanged.is_none() {
                    w.service_chains(port, &mut chains);
                }
            }
            let entry = match unchanged {
                Some(prev) => {
                    w.nat_rules_discarded += prev.nat_lines;
                    prev.clone()
                }
                None => {
                    w.services_written += 1;
                    AppliedService {
                        fingerprint,
                        chains,
                        nat_lines: w.nat_rule_lines
                            - nat_before
                            - w.capture_nat_lines_since(nat_before),
                    }
                }
            };
            next.services.insert(key, entry);
            i = j;
        }

        // Stale chains: ours in the kernel (or last applied) that no Service wants now.
        let active: BTreeSet<&str> = next
            .services
            .values()
            .flat_map(|s| s.chains.iter().map(String::as_str))
            .collect();
        let applied_chains;
        let existing: &BTreeSet<String> = match opts.existing_nat_chains {
            Some(e) => e,
            None => {
                applied_chains = self.applied_chains();
                &applied_chains
            }
        };
        let stale: Vec<String> = existing
            .iter()
            .filter(|c| is_service_chain(c) && !active.contains(c.as_str()))
            .cloned()
            .collect();
        let mut deleted = Vec::new();
        if !large || opts.large_cluster_cleanup_due {
            deleted = stale;
        } else {
            next.leftover = stale.into_iter().collect();
        }
        w.finish(&deleted, &state.family, next, full, large)
    }
}

/// A fingerprint of one Service's desired content. Large-cluster mode is deliberately
/// not part of it: upstream does not rewrite unchanged Services when the mode flips.
fn fingerprint(group: &[PortPlan]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    group.hash(&mut h);
    h.finish()
}

/// Quotes a comment the way upstream writes it: literal double quotes only when it
/// contains a space.
fn push_comment(buf: &mut String, text: &str) {
    buf.push_str(" -m comment --comment ");
    if text.contains(' ') {
        buf.push('"');
        buf.push_str(text);
        buf.push('"');
    } else {
        buf.push_str(text);
    }
}

/// `1/n` with ten decimals, as upstream's `%0.10f`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

fn ip_str(ip: &IpAddr) -> String {
    ip.to_string()
}

struct Writer<'s> {
    s: &'s FamilySettings,
    large: bool,
    family: IpFamily,
    filter_chains: String,
    filter_rules: String,
    filter_rule_lines: usize,
    nat_chains: String,
    nat_rules: String,
    nat_rule_lines: usize,
    /// nat capture-rule lines (KUBE-SERVICES / KUBE-NODEPORTS) written so far, so the
    /// per-service count can exclude them.
    capture_nat_lines: Vec<usize>,
    nat_rules_discarded: usize,
    services_written: usize,
    no_local_internal: usize,
    no_local_external: usize,
}

impl<'s> Writer<'s> {
    fn new(s: &'s FamilySettings, large: bool, family: IpFamily) -> Self {
        let mut w = Writer {
            s,
            large,
            family,
            filter_chains: String::new(),
            filter_rules: String::new(),
            filter_rule_lines: 0,
            nat_chains: String::new(),
            nat_rules: String::new(),
            nat_rule_lines: 0,
            capture_nat_lines: Vec::new(),
            nat_rules_discarded: 0,
            services_written: 0,
            no_local_internal: 0,
            no_local_external: 0,
        };
        for c in [
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FORWARD,
            KUBE_NODEPORTS,
            KUBE_PROXY_FIREWALL,
        ] {
            w.filter_chain(c);
        }
        let kube_firewall = family == IpFamily::V4 && s.localhost_nodeports;
        if kube_firewall {
            w.filter_chain(KUBE_FIREWALL);
            w.filter_rule(
                "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".to_string(),
            );
        }
        for c in [
            KUBE_SERVICES,
            KUBE_NODEPORTS,
            KUBE_POSTROUTING,
            KUBE_MARK_MASQ,
        ] {
            w.nat_chain(c);
        }
        let m = &s.mark_text;
        w.nat_rule(format!(
            "-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN"
        ));
        w.nat_rule(format!("-A KUBE-POSTROUTING -j MARK --xor-mark {m}"));
        let mut masq = "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE".to_string();
        if s.random_fully {
            masq.push_str(" --random-fully");
        }
        w.nat_rule(masq);
        w.nat_rule(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {m}"));
        w
    }

    fn filter_chain(&mut self, name: &str) {
        let _ = writeln!(self.filter_chains, ":{name} - [0:0]");
    }

    fn nat_chain(&mut self, name: &str) {
        let _ = writeln!(self.nat_chains, ":{name} - [0:0]");
    }

    fn filter_rule(&mut self, line: String) {
        self.filter_rules.push_str(&line);
        self.filter_rules.push('\n');
        self.filter_rule_lines += 1;
    }

    fn nat_rule(&mut self, line: String) {
        self.nat_rules.push_str(&line);
        self.nat_rules.push('\n');
        self.nat_rule_lines += 1;
    }

    fn capture_rule(&mut self, line: String) {
        self.nat_rule(line);
        self.capture_nat_lines.push(self.nat_rule_lines);
    }

    fn capture_nat_lines_since(&self, since: usize) -> usize {
        self.capture_nat_lines
            .iter()
            .filter(|&&n| n > since)
            .count()
    }

    fn pm(proto: &str) -> String {
        format!(" -m {proto} -p {proto}")
    }

    fn not_local(&self) -> Option<String> {
        match &self.s.local_detector {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(format!("! -s {c}")),
            LocalDetector::Bridge(b) => Some(format!("! -i {b}")),
            LocalDetector::InterfacePrefix(p) => Some(format!("! -i {p}+")),
        }
    }

    fn is_local(&self) -> Option<String> {
        match &self.s.local_detector {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(format!("-s {c}")),
            LocalDetector::Bridge(b) => Some(format!("-i {b}")),
            LocalDetector::InterfacePrefix(p) => Some(format!("-i {p}+")),
        }
    }

    /// Upstream §6.1 steps 1–6: the rules that are written for every service port on
    /// every sync (KUBE-SERVICES, KUBE-NODEPORTS and the filter table).
    fn capture_rules(&mut self, port: &PortPlan) {
        let svc = &port.svc;
        let spn = svc.name.to_string();
        let proto = svc.name.protocol.lower();
        let pm = Self::pm(proto);
        let chains = PortChains::new(&svc.name);
        let f = Flags::of(port);

        let (int_target, int_comment, ext_target, ext_comment) = if !f.has_endpoints {
            let c = format!("{spn} has no endpoints");
            ("REJECT", c.clone(), "REJECT", c)
        } else {
            let c = format!("{spn} has no local endpoints");
            ("DROP", c.clone(), "DROP", c)
        };
        if f.has_endpoints && !f.has_internal {
            self.no_local_internal += 1;
        }
        if f.has_endpoints && !f.has_external {
            self.no_local_external += 1;
        }
        let internal_chain = if svc.internal_policy_local {
            &chains.svl
        } else {
            &chains.svc
        };
        let lb_target = if f.uses_fw { &chains.fw } else { &chains.ext };
        let cip = ip_str(&svc.cluster_ip);
        let p = svc.port;

        // 1. Cluster IP.
        if f.has_internal {
            let mut l = String::from("-A KUBE-SERVICES");
            push_comment(&mut l, &format!("{spn} cluster IP"));
            let _ = write!(l, "{pm} -d {cip} --dport {p} -j {internal_chain}");
            self.capture_rule(l);
        } else {
            let mut l = String::from("-A KUBE-SERVICES");
            push_comment(&mut l, &int_comment);
            let _ = write!(l, "{pm} -d {cip} --dport {p} -j {int_target}");
            self.filter_rule(l);
        }
        // 2. External IPs.
        for x in &svc.external_ips {
            let x = ip_str(x);
            if f.has_endpoints {
                let mut l = String::from("-A KUBE-SERVICES");
                push_comment(&mut l, &format!("{spn} external IP"));
                let _ = write!(l, "{pm} -d {x} --dport {p} -j {}", chains.ext);
                self.capture_rule(l);
            }
            if !f.has_external {
                let mut l = String::from("-A KUBE-EXTERNAL-SERVICES");
                push_comment(&mut l, &ext_comment);
                let _ = write!(l, "{pm} -d {x} --dport {p} -j {ext_target}");
                self.filter_rule(l);
            }
        }
        // 3. Load-balancer VIPs.
        for vip in &svc.lb_ips {
            let vip = ip_str(vip);
            if f.has_endpoints {
                let mut l = String::from("-A KUBE-SERVICES");
                push_comment(&mut l, &format!("{spn} loadbalancer IP"));
                let _ = write!(l, "{pm} -d {vip} --dport {p} -j {lb_target}");
                self.capture_rule(l);
            }
            if f.uses_fw {
                let mut l = String::from("-A KUBE-PROXY-FIREWALL");
                push_comment(
                    &mut l,
                    &format!("{spn} traffic not accepted by {}", chains.fw),
                );
                let _ = write!(l, "{pm} -d {vip} --dport {p} -j DROP");
                self.filter_rule(l);
            }
        }
        // 4. No usable external endpoints: drop/reject at the VIPs.
        if !f.has_external {
            for vip in &svc.lb_ips {
                let mut l = String::from("-A KUBE-EXTERNAL-SERVICES");
                push_comment(&mut l, &ext_comment);
                let _ = write!(l, "{pm} -d {} --dport {p} -j {ext_target}", ip_str(vip));
                self.filter_rule(l);
            }
        }
        // 5. NodePort.
        if svc.node_port != 0 {
            let np = svc.node_port;
            if f.has_endpoints {
                if self.s.localhost_nodeports
                    && self.family == IpFamily::V4
                    && self.s.nfacct_localhost
                {
                    let mut l = String::from("-A KUBE-NODEPORTS");
                    push_comment(&mut l, &spn);
                    let _ = write!(
                        l,
                        "{pm} -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {}",
                        chains.ext
                    );
                    self.capture_rule(l);
                }
                let mut l = String::from("-A KUBE-NODEPORTS");
                push_comment(&mut l, &spn);
                let _ = write!(l, "{pm} --dport {np} -j {}", chains.ext);
                self.capture_rule(l);
            }
            if !f.has_external {
                let mut l = String::from("-A KUBE-EXTERNAL-SERVICES");
                push_comment(&mut l, &ext_comment);
                let _ = write!(
                    l,
                    " -m addrtype --dst-type LOCAL{pm} --dport {np} -j {ext_target}"
                );
                self.filter_rule(l);
            }
        }
        // 6. Health-check node port: always accepted, whatever the endpoints.
        if svc.health_check_node_port != 0 {
            let mut l = String::from("-A KUBE-NODEPORTS");
            push_comment(&mut l, &format!("{spn} health check node port"));
            let _ = write!(
                l,
                " -m tcp -p tcp --dport {} -j ACCEPT",
                svc.health_check_node_port
            );
            self.filter_rule(l);
        }
    }

    /// Upstream §6.1 steps 7–12: the per-service chains, written on full syncs and for
    /// changed Services. Chain names are collected into `chains` either way.
    fn service_chains(&mut self, port: &PortPlan, chains_out: &mut Vec<String>) {
        let svc = &port.svc;
        let spn = svc.name.to_string();
        let proto = svc.name.protocol.lower();
        let pm = Self::pm(proto);
        let chains = PortChains::new(&svc.name);
        let f = Flags::of(port);
        let internal_chain = if svc.internal_policy_local {
            &chains.svl
        } else {
            &chains.svc
        };
        let external_policy_chain = if svc.external_policy_local {
            &chains.svl
        } else {
            &chains.svc
        };
        let cip = ip_str(&svc.cluster_ip);
        let p = svc.port;

        // 7. Internal masquerade.
        if f.has_internal {
            let masq = if self.s.masquerade_all {
                Some(String::new())
            } else {
                self.not_local().map(|n| format!(" {n}"))
            };
            if let Some(extra) = masq {
                let mut l = format!("-A {internal_chain}");
                push_comment(&mut l, &format!("{spn} cluster IP"));
                let _ = write!(l, "{pm} -d {cip} --dport {p}{extra} -j KUBE-MARK-MASQ");
                self.nat_rule(l);
            }
        }
        // 8. External-destination chain.
        if f.uses_ext {
            self.nat_chain(&chains.ext);
            chains_out.push(chains.ext.clone());
            let ext = &chains.ext;
            if !svc.external_policy_local {
                let mut l = format!("-A {ext}");
                push_comment(
                    &mut l,
                    &format!("masquerade traffic for {spn} external destinations"),
                );
                l.push_str(" -j KUBE-MARK-MASQ");
                self.nat_rule(l);
            } else {
                if let Some(local) = self.is_local() {
                    let mut l = format!("-A {ext}");
                    push_comment(
                        &mut l,
                        &format!("pod traffic for {spn} external destinations"),
                    );
                    let _ = write!(l, " {local} -j {}", chains.svc);
                    self.nat_rule(l);
                }
                let mut l = format!("-A {ext}");
                push_comment(
                    &mut l,
                    &format!("masquerade LOCAL traffic for {spn} external destinations"),
                );
                l.push_str(" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ");
                self.nat_rule(l);
                let mut l = format!("-A {ext}");
                push_comment(
                    &mut l,
                    &format!("route LOCAL traffic for {spn} external destinations"),
                );
                let _ = write!(l, " -m addrtype --src-type LOCAL -j {}", chains.svc);
                self.nat_rule(l);
            }
            if f.has_external {
                self.nat_rule(format!("-A {ext} -j {external_policy_chain}"));
            }
        }
        // 9. Source-range firewall chain.
        if f.uses_fw {
            self.nat_chain(&chains.fw);
            chains_out.push(chains.fw.clone());
            let fw = &chains.fw;
            let lb_comment = format!("{spn} loadbalancer IP");
            for r in &svc.source_ranges {
                let mut l = format!("-A {fw}");
                push_comment(&mut l, &lb_comment);
                let _ = write!(l, " -s {r} -j {}", chains.ext);
                self.nat_rule(l);
            }
            // A node that is itself allowed may reach the VIP after being SNATed to it.
            let node_allowed = self
                .s
                .node_ip
                .is_some_and(|ip| svc.source_ranges.iter().any(|r| r.contains(&ip)));
            if node_allowed {
                for vip in &svc.lb_ips {
                    let mut l = format!("-A {fw}");
                    push_comment(&mut l, &lb_comment);
                    let _ = write!(l, " -s {} -j {}", ip_str(vip), chains.ext);
                    self.nat_rule(l);
                }
            }
            let mut l = format!("-A {fw}");
            push_comment(
                &mut l,
                &format!("other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"),
            );
            self.nat_rule(l);
        }
        // 10. / 11. Policy chains.
        if f.uses_cluster_chain {
            self.nat_chain(&chains.svc);
            chains_out.push(chains.svc.clone());
            let eps: Vec<&Endpoint> = port.cluster_endpoints().collect();
            self.endpoint_jumps(&chains.svc, port, &spn, &eps);
        }
        if f.uses_local_chain {
            self.nat_chain(&chains.svl);
            chains_out.push(chains.svl.clone());
            let eps: Vec<&Endpoint> = port.local_endpoints().collect();
            self.endpoint_jumps(&chains.svl, port, &spn, &eps);
        }
        // 12. Endpoint chains.
        for ep in port.reachable_endpoints() {
            let sep = endpoint_chain(&svc.name, ep);
            self.nat_chain(&sep);
            let mut l = format!("-A {sep}");
            if !self.large {
                push_comment(&mut l, &spn);
            }
            let _ = write!(l, " -s {} -j KUBE-MARK-MASQ", ip_str(&ep.ip));
            self.nat_rule(l);
            let mut l = format!("-A {sep}");
            if !self.large {
                push_comment(&mut l, &spn);
            }
            if svc.affinity_timeout.is_some() {
                let _ = write!(l, " -m recent --name {sep} --set");
            }
            let _ = write!(l, "{pm} -j DNAT --to-destination {}", ep.addr_string());
            self.nat_rule(l);
            chains_out.push(sep);
        }
    }

    fn endpoint_jumps(&mut self, chain: &str, port: &PortPlan, spn: &str, eps: &[&Endpoint]) {
        let seps: Vec<String> = eps
            .iter()
            .map(|ep| endpoint_chain(&port.svc.name, ep))
            .collect();
        let comment = |ep: &Endpoint| format!("{spn} -> {}", ep.addr_string());
        if let Some(timeout) = port.svc.affinity_timeout {
            for (ep, sep) in eps.iter().zip(&seps) {
                let mut l = format!("-A {chain}");
                if !self.large {
                    push_comment(&mut l, &comment(ep));
                }
                let _ = write!(
                    l,
                    " -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
                );
                self.nat_rule(l);
            }
        }
        let n = eps.len();
        for (i, (ep, sep)) in eps.iter().zip(&seps).enumerate() {
            let mut l = format!("-A {chain}");
            if !self.large {
                push_comment(&mut l, &comment(ep));
            }
            if i + 1 < n {
                let _ = write!(
                    l,
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                );
            }
            let _ = write!(l, " -j {sep}");
            self.nat_rule(l);
        }
    }

    fn finish(
        mut self,
        deleted: &[String],
        family: &IpFamily,
        next: Applied,
        full: bool,
        large: bool,
    ) -> Rendered {
        // KUBE-FORWARD comes after every per-service filter rule.
        if !self.s.tcp_be_liberal {
            let mut l = String::from("-A KUBE-FORWARD -m conntrack --ctstate INVALID");
            if self.s.nfacct_invalid {
                l.push_str(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts");
            }
            l.push_str(" -j DROP");
            self.filter_rule(l);
        }
        let m = self.s.mark_text.clone();
        self.filter_rule(format!(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT"
        ));
        self.filter_rule(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
        );

        let rules_before_x = self.nat_rule_lines;
        for chain in deleted {
            self.nat_chain(chain);
        }
        let mut x_lines = String::new();
        for chain in deleted {
            let _ = writeln!(x_lines, "-X {chain}");
        }

        // The nodeports jump must stay the last rule of nat KUBE-SERVICES.
        let tail = match &self.s.nodeport_addresses {
            NodePortAddresses::All => {
                let extra = match family {
                    IpFamily::V6 => " ! -d ::1/128",
                    IpFamily::V4 if !self.s.localhost_nodeports => " ! -d 127.0.0.0/8",
                    IpFamily::V4 => "",
                };
                vec![format!(
                    "-A KUBE-SERVICES -m comment --comment \"{NODEPORTS_TAIL_COMMENT}\" -m addrtype --dst-type LOCAL{extra} -j KUBE-NODEPORTS"
                )]
            }
            NodePortAddresses::Ips(ips) => ips
                .iter()
                .filter(|ip| family.contains(ip))
                .filter(|ip| {
                    !ip.is_loopback() || (*family == IpFamily::V4 && self.s.localhost_nodeports)
                })
                .map(|ip| {
                    format!(
                        "-A KUBE-SERVICES -m comment --comment \"{NODEPORTS_TAIL_COMMENT}\" -d {ip} -j KUBE-NODEPORTS"
                    )
                })
                .collect(),
        };
        let tail_count = tail.len();

        let mut payload = String::with_capacity(
            self.filter_chains.len()
                + self.filter_rules.len()
                + self.nat_chains.len()
                + self.nat_rules.len()
                + x_lines.len()
                + 256,
        );
        payload.push_str("*filter\n");
        payload.push_str(&self.filter_chains);
        payload.push_str(&self.filter_rules);
        payload.push_str("COMMIT\n*nat\n");
        payload.push_str(&self.nat_chains);
        payload.push_str(&self.nat_rules);
        payload.push_str(&x_lines);
        for l in &tail {
            payload.push_str(l);
            payload.push('\n');
        }
        payload.push_str("COMMIT\n");

        let nat_rules = rules_before_x + tail_count;
        Rendered {
            payload,
            full,
            filter_rules: self.filter_rule_lines,
            nat_rules,
            nat_rules_total: nat_rules + self.nat_rules_discarded,
            deleted_chains: deleted.to_vec(),
            large_cluster: large,
            no_local_internal: self.no_local_internal,
            no_local_external: self.no_local_external,
            services_written: self.services_written,
            next,
        }
    }
}

/// Upstream's per-port booleans (§6).
struct Flags {
    has_endpoints: bool,
    has_internal: bool,
    has_external: bool,
    uses_cluster_chain: bool,
    uses_local_chain: bool,
    uses_ext: bool,
    uses_fw: bool,
}

impl Flags {
    fn of(port: &PortPlan) -> Flags {
        let svc = &port.svc;
        let sel = &port.selection;
        let has_endpoints = sel.has_any;
        let local_empty = sel.local.is_empty();
        Flags {
            has_endpoints,
            has_internal: has_endpoints && !(svc.internal_policy_local && local_empty),
            has_external: has_endpoints && !(svc.external_policy_local && local_empty),
            uses_cluster_chain: !sel.cluster.is_empty() && svc.uses_cluster_endpoints(),
            uses_local_chain: !local_empty && svc.uses_local_endpoints(),
            uses_ext: has_endpoints && svc.externally_accessible(),
            uses_fw: has_endpoints && !svc.lb_ips.is_empty() && !svc.source_ranges.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_match_upstream() {
        for (n, s) in [
            (1, "1.0000000000"),
            (2, "0.5000000000"),
            (3, "0.3333333333"),
            (6, "0.1666666667"),
            (7, "0.1428571429"),
            (100000, "0.0000100000"),
            (100001, "0.0000099999"),
        ] {
            assert_eq!(probability(n), s, "n={n}");
        }
    }

    #[test]
    fn comments_quoted_only_with_spaces() {
        let mut a = String::new();
        push_comment(&mut a, "ns1/svc1:p80");
        assert_eq!(a, " -m comment --comment ns1/svc1:p80");
        let mut b = String::new();
        push_comment(&mut b, "ns1/svc1:p80 cluster IP");
        assert_eq!(b, " -m comment --comment \"ns1/svc1:p80 cluster IP\"");
    }
}

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

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{FamilySettings, LocalDetector, NodePortAddresses};
use crate::model::{IpFamily, ObjectKey, PortFlags, PortPlan, ProxyState};

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
    pub(crate) filter_rules: usize,
    /// nat rule lines written, `-X` lines excluded (`iptables_last{table="nat"}`).
    pub(crate) nat_rules: usize,
    /// nat rules owned in total, unchanged services included (`iptables_total{table="nat"}`).
    pub(crate) nat_rules_total: usize,
    /// Stale chains this payload deletes.
    pub deleted_chains: Vec<String>,
    /// Whether large-cluster mode (no per-endpoint comments) was on.
    pub large_cluster: bool,
    /// Services whose chains this payload rewrites.
    pub services_written: usize,
    next: Applied,
}

/// What the kernel holds after a successful apply, per Service.
#[derive(Debug, Clone, Default)]
struct Applied {
    /// Sorted by key (the order of `ProxyState::ports`), so a sync walks it in step.
    services: Vec<(Arc<ObjectKey>, Arc<AppliedService>)>,
    /// Stale chains left in place (large-cluster mode defers their deletion).
    leftover: BTreeSet<String>,
}

#[derive(Debug)]
struct AppliedService {
    /// The desired content it was rendered from; a Service is rewritten when this differs.
    /// Large-cluster mode is deliberately not part of it: upstream does not rewrite
    /// unchanged Services when the mode flips.
    ports: Vec<Arc<PortPlan>>,
    /// Its capture rules (KUBE-SERVICES, KUBE-NODEPORTS, filter), which every sync
    /// writes; kept so an unchanged Service costs a copy, not a re-format.
    capture: CaptureText,
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
    pub(crate) fn applied_chains(&self) -> BTreeSet<String> {
        self.applied
            .iter()
            .flat_map(|a| a.services.iter())
            .flat_map(|(_, s)| s.chains.iter().cloned())
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
        // Both the ports and the applied record are sorted by Service, so one forward
        // walk pairs them up.
        let mut next = Applied::default();
        let mut rewritten_chains: HashSet<String> = HashSet::new();
        let mut prev_iter = previous
            .map(|p| p.services.as_slice())
            .unwrap_or_default()
            .iter()
            .peekable();
        for group in state.service_groups() {
            let name = &group[0].svc.name;
            let this = (name.namespace.as_str(), name.name.as_str());
            while prev_iter
                .peek()
                .is_some_and(|(k, _)| (k.namespace.as_str(), k.name.as_str()) < this)
            {
                prev_iter.next();
            }
            let same_key = prev_iter
                .peek()
                .filter(|(k, _)| (k.namespace.as_str(), k.name.as_str()) == this);
            let key = match same_key {
                Some((k, _)) => Arc::clone(k),
                None => Arc::new(group[0].service_key()),
            };
            let unchanged = same_key
                .filter(|(_, s)| s.ports.as_slice() == group)
                .map(|(_, s)| s);
            let entry = match unchanged {
                Some(prev) => {
                    w.push_capture(&prev.capture);
                    w.nat_rules_discarded += prev.nat_lines;
                    Arc::clone(prev)
                }
                None => {
                    w.services_written += 1;
                    let mut chains = Vec::new();
                    let mut capture = CaptureText::default();
                    let mut service_lines = 0;
                    for port in group {
                        let names = PortChains::new(&port.svc.name);
                        w.capture_rules(port, &names, &mut capture);
                        let before = w.nat_rules.lines;
                        w.service_chains(port, &names, &mut chains);
                        service_lines += w.nat_rules.lines - before;
                    }
                    w.push_capture(&capture);
                    if previous.is_some() {
                        rewritten_chains.extend(chains.iter().cloned());
                    }
                    Arc::new(AppliedService {
                        ports: group.to_vec(),
                        capture,
                        chains,
                        nat_lines: service_lines,
                    })
                }
            };
            next.services.push((key, entry));
        }

        let kernel_view: Option<BTreeSet<String>> = match (opts.existing_nat_chains, previous) {
            (Some(e), _) => Some(e.clone()),
            // A full sync without the kernel's view: what we applied before.
            (None, None) if self.applied.is_some() => Some(self.applied_chains()),
            _ => None,
        };
        let stale = match (kernel_view.as_ref(), previous) {
            // The kernel's view (full syncs): ours there that no Service wants now.
            (Some(existing), _) => {
                let active: HashSet<&str> = next
                    .services
                    .iter()
                    .flat_map(|(_, s)| s.chains.iter().map(String::as_str))
                    .collect();
                existing
                    .iter()
                    .filter(|c| is_service_chain(c) && !active.contains(c.as_str()))
                    .cloned()
                    .collect()
            }
            // Our own record: only Services that changed or went away can leave chains
            // behind, which keeps partial syncs proportional to the change.
            (None, Some(known)) => {
                let mut stale: BTreeSet<String> = known.leftover.clone();
                let mut new_iter = next.services.iter().peekable();
                for (key, old) in &known.services {
                    while new_iter.peek().is_some_and(|(k, _)| k < key) {
                        new_iter.next();
                    }
                    match new_iter.peek().filter(|(k, _)| k == key).map(|(_, s)| s) {
                        Some(new) if Arc::ptr_eq(new, old) => {}
                        Some(new) => {
                            let keep: HashSet<&str> =
                                new.chains.iter().map(String::as_str).collect();
                            stale.extend(
                                old.chains
                                    .iter()
                                    .filter(|c| !keep.contains(c.as_str()))
                                    .cloned(),
                            );
                        }
                        None => stale.extend(old.chains.iter().cloned()),
                    }
                }
                stale.retain(|c| !rewritten_chains.contains(c));
                stale
            }
            (None, None) => BTreeSet::new(),
        };
        let mut deleted = Vec::new();
        if !large || opts.large_cluster_cleanup_due {
            deleted = stale.into_iter().collect();
        } else {
            next.leftover = stale;
        }
        w.finish(&deleted, &state.family, next, full, large)
    }
}

/// `1/n` with ten decimals, as upstream's `%0.10f`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Rule text that counts its lines as it is written (one rule per line: names are
/// validated at the model boundary and never contain a newline), so the rule counts
/// upstream reports as metrics are derived from the output, not kept beside it.
#[derive(Debug, Default, Clone)]
struct RuleLines {
    text: String,
    lines: usize,
}

impl std::fmt::Write for RuleLines {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.lines += s.bytes().filter(|b| *b == b'\n').count();
        self.text.push_str(s);
        Ok(())
    }
}

impl RuleLines {
    /// Appends one rule.
    fn line(&mut self, rule: &str) {
        self.text.push_str(rule);
        self.text.push('\n');
        self.lines += 1;
    }

    /// Appends another buffer's rules.
    fn append(&mut self, other: &RuleLines) {
        self.text.push_str(&other.text);
        self.lines += other.lines;
    }
}

/// The capture rules of one Service (what every sync writes for it).
#[derive(Debug, Default)]
struct CaptureText {
    nat: RuleLines,
    filter: RuleLines,
}

/// Probability strings, computed once per endpoint count.
#[derive(Default)]
struct Probabilities(Vec<String>);

impl Probabilities {
    fn get(&mut self, n: usize) -> &str {
        while self.0.len() <= n {
            let k = self.0.len();
            self.0.push(if k == 0 {
                String::new()
            } else {
                probability(k)
            });
        }
        &self.0[n]
    }
}

struct Writer<'s> {
    s: &'s FamilySettings,
    large: bool,
    family: IpFamily,
    filter_chains: String,
    filter_rules: RuleLines,
    nat_chains: String,
    nat_rules: RuleLines,
    nat_rules_discarded: usize,
    services_written: usize,
    probabilities: Probabilities,
}

impl<'s> Writer<'s> {
    fn new(s: &'s FamilySettings, large: bool, family: IpFamily) -> Self {
        let mut w = Writer {
            s,
            large,
            family,
            filter_chains: String::new(),
            filter_rules: RuleLines::default(),
            nat_chains: String::new(),
            nat_rules: RuleLines::default(),
            nat_rules_discarded: 0,
            services_written: 0,
            probabilities: Probabilities::default(),
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
        self.filter_rules.line(&line);
    }

    fn nat_rule(&mut self, line: String) {
        self.nat_rules.line(&line);
    }

    fn push_capture(&mut self, c: &CaptureText) {
        self.nat_rules.append(&c.nat);
        self.filter_rules.append(&c.filter);
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

    // The per-port writers below format straight into the output buffers: at 100k
    // endpoints, per-line temporary strings dominated the render time. Comment templates
    // with spaces are written with their quotes inline (Kubernetes names never contain
    // spaces, so the quoting upstream would choose is known statically).

    /// Upstream §6.1 steps 1–6: the rules that are written for every service port on
    /// every sync (KUBE-SERVICES, KUBE-NODEPORTS and the filter table).
    fn capture_rules(&self, port: &PortPlan, chains: &PortChains, out: &mut CaptureText) {
        let svc = &port.svc;
        let spn = comment_text(&svc.name.to_string()).into_owned();
        let proto = svc.name.protocol.lower();
        let f = PortFlags::of(port).for_iptables();

        let (int_target, ext_target, why) = if !f.has_endpoints {
            ("REJECT", "REJECT", "has no endpoints")
        } else {
            ("DROP", "DROP", "has no local endpoints")
        };
        let internal_chain = if svc.internal_policy_local {
            &chains.svl
        } else {
            &chains.svc
        };
        let lb_target = if f.uses_fw { &chains.fw } else { &chains.ext };
        let cip = svc.cluster_ip;
        let p = svc.port;

        // 1. Cluster IP.
        if f.has_internal {
            let _ = writeln!(
                out.nat,
                "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {p} -j {internal_chain}"
            );
        } else {
            let _ = writeln!(
                out.filter,
                "-A KUBE-SERVICES -m comment --comment \"{spn} {why}\" -m {proto} -p {proto} -d {cip} --dport {p} -j {int_target}"
            );
        }
        // 2. External IPs.
        for x in &svc.external_ips {
            if f.has_endpoints {
                let _ = writeln!(
                    out.nat,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} external IP\" -m {proto} -p {proto} -d {x} --dport {p} -j {}",
                    chains.ext
                );
            }
            if !f.has_external {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {why}\" -m {proto} -p {proto} -d {x} --dport {p} -j {ext_target}"
                );
            }
        }
        // 3. Load-balancer VIPs.
        for vip in &svc.lb_ips {
            if f.has_endpoints {
                let _ = writeln!(
                    out.nat,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} loadbalancer IP\" -m {proto} -p {proto} -d {vip} --dport {p} -j {lb_target}"
                );
            }
            if f.uses_fw {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-PROXY-FIREWALL -m comment --comment \"{spn} traffic not accepted by {}\" -m {proto} -p {proto} -d {vip} --dport {p} -j DROP",
                    chains.fw
                );
            }
        }
        // 4. No usable external endpoints: drop/reject at the VIPs.
        if !f.has_external {
            for vip in &svc.lb_ips {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {why}\" -m {proto} -p {proto} -d {vip} --dport {p} -j {ext_target}"
                );
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
                    let _ = writeln!(
                        out.nat,
                        "-A KUBE-NODEPORTS -m comment --comment {spn} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {}",
                        chains.ext
                    );
                }
                let _ = writeln!(
                    out.nat,
                    "-A KUBE-NODEPORTS -m comment --comment {spn} -m {proto} -p {proto} --dport {np} -j {}",
                    chains.ext
                );
            }
            if !f.has_external {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} {why}\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {ext_target}"
                );
            }
        }
        // 6. Health-check node port: always accepted, whatever the endpoints.
        if svc.health_check_node_port != 0 {
            let _ = writeln!(
                out.filter,
                "-A KUBE-NODEPORTS -m comment --comment \"{spn} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                svc.health_check_node_port
            );
        }
    }

    /// Upstream §6.1 steps 7–12: the per-service chains, written on full syncs and for
    /// changed Services. Chain names are collected into `chains_out`.
    fn service_chains(
        &mut self,
        port: &PortPlan,
        chains: &PortChains,
        chains_out: &mut Vec<String>,
    ) {
        let svc = &port.svc;
        let spn = comment_text(&svc.name.to_string()).into_owned();
        let proto = svc.name.protocol.lower();
        let f = PortFlags::of(port).for_iptables();
        // Endpoint chain names, hashed once per endpoint (cluster and local endpoints are
        // subsets of the reachable ones).
        let mut seps: Vec<Option<String>> = vec![None; port.endpoints.len()];
        for &i in &port.selection.all_reachable {
            seps[i] = Some(endpoint_chain(&svc.name, &port.endpoints[i]));
        }
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
        let cip = svc.cluster_ip;
        let p = svc.port;

        // 7. Internal masquerade.
        if f.has_internal {
            let extra = if self.s.masquerade_all {
                Some(String::new())
            } else {
                self.not_local().map(|n| format!(" {n}"))
            };
            if let Some(extra) = extra {
                let _ = writeln!(
                    self.nat_rules,
                    "-A {internal_chain} -m comment --comment \"{spn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {p}{extra} -j KUBE-MARK-MASQ"
                );
            }
        }
        // 8. External-destination chain.
        if f.uses_ext {
            let ext = &chains.ext;
            self.nat_chain(ext);
            chains_out.push(ext.clone());
            if !svc.external_policy_local {
                let _ = writeln!(
                    self.nat_rules,
                    "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"
                );
            } else {
                if let Some(local) = self.is_local() {
                    let _ = writeln!(
                        self.nat_rules,
                        "-A {ext} -m comment --comment \"pod traffic for {spn} external destinations\" {local} -j {}",
                        chains.svc
                    );
                }
                let _ = writeln!(
                    self.nat_rules,
                    "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(
                    self.nat_rules,
                    "-A {ext} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {}",
                    chains.svc
                );
            }
            if f.has_external {
                let _ = writeln!(self.nat_rules, "-A {ext} -j {external_policy_chain}");
            }
        }
        // 9. Source-range firewall chain.
        if f.uses_fw {
            let fw = &chains.fw;
            self.nat_chain(fw);
            chains_out.push(fw.clone());
            for r in &svc.source_ranges {
                let _ = writeln!(
                    self.nat_rules,
                    "-A {fw} -m comment --comment \"{spn} loadbalancer IP\" -s {r} -j {}",
                    chains.ext
                );
            }
            // A node that is itself allowed may reach the VIP after being SNATed to it.
            let node_allowed = self
                .s
                .node_ip
                .is_some_and(|ip| svc.source_ranges.iter().any(|r| r.contains(&ip)));
            if node_allowed {
                for vip in &svc.lb_ips {
                    let _ = writeln!(
                        self.nat_rules,
                        "-A {fw} -m comment --comment \"{spn} loadbalancer IP\" -s {vip} -j {}",
                        chains.ext
                    );
                }
            }
            let _ = writeln!(
                self.nat_rules,
                "-A {fw} -m comment --comment \"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL\""
            );
        }
        // 10. / 11. Policy chains.
        if f.uses_cluster_chain {
            self.nat_chain(&chains.svc);
            chains_out.push(chains.svc.clone());
            self.endpoint_jumps(&chains.svc, port, &spn, &port.selection.cluster, &seps);
        }
        if f.uses_local_chain {
            self.nat_chain(&chains.svl);
            chains_out.push(chains.svl.clone());
            self.endpoint_jumps(&chains.svl, port, &spn, &port.selection.local, &seps);
        }
        // 12. Endpoint chains.
        let comment = if self.large {
            String::new()
        } else {
            format!(" -m comment --comment {spn}")
        };
        let recent = svc.affinity_timeout.is_some();
        for &i in &port.selection.all_reachable {
            let ep = &port.endpoints[i];
            let Some(sep) = seps[i].take() else {
                continue;
            };
            self.nat_chain(&sep);
            let ip = ep.ip;
            let _ = writeln!(
                self.nat_rules,
                "-A {sep}{comment} -s {ip} -j KUBE-MARK-MASQ"
            );
            if recent {
                let _ = write!(
                    self.nat_rules,
                    "-A {sep}{comment} -m recent --name {sep} --set"
                );
            } else {
                let _ = write!(self.nat_rules, "-A {sep}{comment}");
            }
            let _ = match ip {
                IpAddr::V4(v4) => writeln!(
                    self.nat_rules,
                    " -m {proto} -p {proto} -j DNAT --to-destination {v4}:{}",
                    ep.port
                ),
                IpAddr::V6(v6) => writeln!(
                    self.nat_rules,
                    " -m {proto} -p {proto} -j DNAT --to-destination [{v6}]:{}",
                    ep.port
                ),
            };
            chains_out.push(sep);
        }
    }

    fn endpoint_jumps(
        &mut self,
        chain: &str,
        port: &PortPlan,
        spn: &str,
        which: &[usize],
        seps: &[Option<String>],
    ) {
        let name = |i: usize| -> String {
            seps[i]
                .clone()
                .unwrap_or_else(|| endpoint_chain(&port.svc.name, &port.endpoints[i]))
        };
        let large = self.large;
        let comment = |buf: &mut RuleLines, i: usize| {
            if !large {
                let ep = &port.endpoints[i];
                let _ = match ep.ip {
                    IpAddr::V4(v4) => {
                        write!(buf, " -m comment --comment \"{spn} -> {v4}:{}\"", ep.port)
                    }
                    IpAddr::V6(v6) => {
                        write!(buf, " -m comment --comment \"{spn} -> [{v6}]:{}\"", ep.port)
                    }
                };
            }
        };
        if let Some(timeout) = port.svc.affinity_timeout {
            for &i in which {
                let sep = name(i);
                let _ = write!(self.nat_rules, "-A {chain}");
                comment(&mut self.nat_rules, i);
                let _ = writeln!(
                    self.nat_rules,
                    " -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
                );
            }
        }
        let n = which.len();
        for (k, &i) in which.iter().enumerate() {
            let sep = name(i);
            let _ = write!(self.nat_rules, "-A {chain}");
            comment(&mut self.nat_rules, i);
            if k + 1 < n {
                let _ = write!(
                    self.nat_rules,
                    " -m statistic --mode random --probability {}",
                    self.probabilities.get(n - k)
                );
            }
            let _ = writeln!(self.nat_rules, " -j {sep}");
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

        let rules_before_x = self.nat_rules.lines;
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
                + self.filter_rules.text.len()
                + self.nat_chains.len()
                + self.nat_rules.text.len()
                + x_lines.len()
                + 256,
        );
        payload.push_str("*filter\n");
        payload.push_str(&self.filter_chains);
        payload.push_str(&self.filter_rules.text);
        payload.push_str("COMMIT\n*nat\n");
        payload.push_str(&self.nat_chains);
        payload.push_str(&self.nat_rules.text);
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
            filter_rules: self.filter_rules.lines,
            nat_rules,
            nat_rules_total: nat_rules + self.nat_rules_discarded,
            deleted_chains: deleted.to_vec(),
            large_cluster: large,
            services_written: self.services_written,
            next,
        }
    }
}

/// Longest text xt_comment keeps (256 bytes with the NUL); the longest fixed text
/// around a service port name is under 60 bytes.
const COMMENT_TEXT_MAX: usize = 190;

/// A service port name as it may appear in a `--comment`, quoted or not. Validated
/// names pass unchanged (so the rules stay upstream's byte for byte); anything else is
/// defused — a character that could end the argument, the line or the quote becomes
/// `_`, and the text is cut to what xt_comment holds — so no name can ever inject a
/// rule into `iptables-restore` input.
pub(crate) fn comment_text(s: &str) -> std::borrow::Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | ':');
    if s.len() <= COMMENT_TEXT_MAX && s.chars().all(safe) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out: String = s.chars().map(|c| if safe(c) { c } else { '_' }).collect();
    out.truncate(COMMENT_TEXT_MAX);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `-A` lines of one table's section of a restore payload.
    fn rule_lines(payload: &str, table: &str) -> usize {
        payload
            .split("COMMIT\n")
            .find(|t| t.trim_start().starts_with(&format!("*{table}")))
            .map_or(0, |t| t.lines().filter(|l| l.starts_with("-A ")).count())
    }

    #[test]
    fn rule_counts_are_the_lines_written() {
        use crate::config::Config;
        use crate::model::{synthetic, NodeContext};
        let settings = Config::default().family_settings(IpFamily::V4, "node-1", None, &[]);
        let node = NodeContext {
            name: "node-1".into(),
            zone: None,
            prefer_same_node: false,
        };
        let mut r = Renderer::new(settings);
        let full = r.render(
            &synthetic::cluster(12, 3).proxy_state(IpFamily::V4, &node),
            &RenderOptions::default(),
        );
        assert!(full.full);
        assert_eq!(full.filter_rules, rule_lines(&full.payload, "filter"));
        assert_eq!(full.nat_rules, rule_lines(&full.payload, "nat"));
        assert_eq!(full.nat_rules_total, full.nat_rules);
        r.commit(full.clone());
        // A partial sync writes one Service's chains; the others count towards the
        // total without being written.
        let partial = r.render(
            &synthetic::cluster(13, 3).proxy_state(IpFamily::V4, &node),
            &RenderOptions::default(),
        );
        assert!(!partial.full);
        assert_eq!(partial.nat_rules, rule_lines(&partial.payload, "nat"));
        assert!(partial.nat_rules < full.nat_rules);
        assert!(partial.nat_rules_total > full.nat_rules_total);
    }

    #[test]
    fn comment_text_defuses_what_restore_would_read() {
        assert_eq!(comment_text("ns/svc:http"), "ns/svc:http");
        assert_eq!(
            comment_text("x\n-A KUBE-SERVICES -j ACCEPT\n#\"é"),
            "x_-A_KUBE-SERVICES_-j_ACCEPT____"
        );
        assert_eq!(comment_text(&"a".repeat(1000)).len(), COMMENT_TEXT_MAX);
    }

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
}

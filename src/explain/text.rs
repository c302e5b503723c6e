//! `explain` as text: one block per Service port, or one overview table of every
//! Service port (like `cilium-dbg service list`, with the policies).

use super::{Explanation, PortView};
use crate::trace::core::percent;

/// The detailed form.
pub(crate) fn detailed(e: &Explanation) -> String {
    let mut out = format!(
        "node {}{}, {}; pods are detected by: {}{}\n",
        e.node.name,
        e.node
            .zone
            .as_ref()
            .map(|z| format!(" (zone {z})"))
            .unwrap_or_default(),
        e.family,
        e.local_detector,
        if e.masquerade_all {
            "; masqueradeAll"
        } else {
            ""
        }
    );
    if e.ports.is_empty() {
        out.push_str("no such Service port\n");
    }
    for p in &e.ports {
        out.push('\n');
        port(&mut out, p);
    }
    out
}

fn port(out: &mut String, p: &PortView) {
    out.push_str(&format!(
        "{} ({})  internalTrafficPolicy: {}{}\n",
        p.service,
        p.protocol,
        p.internal_traffic_policy,
        p.external_traffic_policy
            .as_ref()
            .map(|x| format!(", externalTrafficPolicy: {x}"))
            .unwrap_or_default()
    ));
    if let Some(hc) = p.health_check_node_port {
        out.push_str(&format!("  health check node port: {hc}\n"));
    }
    if let Some(t) = p.session_affinity_seconds {
        out.push_str(&format!("  session affinity: ClientIP, {t}s\n"));
    }
    if !p.source_ranges.is_empty() {
        out.push_str(&format!(
            "  source ranges: {}\n",
            p.source_ranges.join(", ")
        ));
    }
    out.push_str("  ways in:\n");
    for f in &p.frontends {
        out.push_str(&format!(
            "    {} {}{}{}\n",
            f.kind.replace('_', " "),
            f.address,
            f.ip_mode
                .as_ref()
                .map(|m| format!(" (ipMode {m})"))
                .unwrap_or_default(),
            if f.programmed {
                ""
            } else {
                " - not programmed"
            }
        ));
        for path in &f.paths {
            let to = match &path.verdict {
                Some(v) => format!("{v}: {}", path.why),
                None => format!(
                    "{} endpoints, {}{}",
                    path.endpoints,
                    if path.masquerade {
                        "masqueraded"
                    } else {
                        "not masqueraded"
                    },
                    format_args!(" ({})", path.why)
                ),
            };
            out.push_str(&format!("      from {:<8} -> {to}\n", path.client.label()));
        }
    }
    out.push_str("  endpoints:\n");
    if p.endpoints.is_empty() {
        out.push_str("    (none)\n");
    }
    for e in &p.endpoints {
        let mut probs = Vec::new();
        if e.cluster_probability > 0.0 {
            probs.push(format!("cluster {}", percent(e.cluster_probability)));
        }
        if e.local_probability > 0.0 {
            probs.push(format!("local {}", percent(e.local_probability)));
        }
        out.push_str(&format!(
            "    {:<22} node {:<10} zone {:<8} {:<22} {}\n",
            e.address,
            e.node.as_deref().unwrap_or("-"),
            e.zone.as_deref().unwrap_or("-"),
            if probs.is_empty() {
                "unused".to_string()
            } else {
                probs.join(", ")
            },
            e.why
        ));
    }
    for n in &p.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out.push_str(&format!(
        "  iptables: {}\n  nftables: {}\n",
        p.rules.iptables.join(" "),
        p.rules.nftables.join(" ")
    ));
}

/// The overview: one line per Service port.
pub fn table(e: &Explanation) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "SERVICE".into(),
        "FRONTENDS".into(),
        "ENDPOINTS".into(),
        "POLICY".into(),
        "NOTES".into(),
    ]];
    for p in &e.ports {
        let fronts: Vec<String> = p
            .frontends
            .iter()
            .map(|f| {
                let tag = match f.kind.as_str() {
                    "cluster_ip" => "",
                    "node_port" => "NodePort ",
                    "load_balancer" => "LB ",
                    _ => "ExtIP ",
                };
                format!("{tag}{}", f.address)
            })
            .collect();
        let used: Vec<String> = p
            .endpoints
            .iter()
            .filter(|x| x.cluster_probability > 0.0 || x.local_probability > 0.0)
            .map(|x| {
                if x.local {
                    format!("{}(local)", x.address)
                } else {
                    x.address.clone()
                }
            })
            .collect();
        let unused = p.endpoints.len() - used.len();
        let mut policy = format!("itp={}", p.internal_traffic_policy);
        if let Some(x) = &p.external_traffic_policy {
            policy.push_str(&format!(" etp={x}"));
        }
        if p.session_affinity_seconds.is_some() {
            policy.push_str(" affinity");
        }
        let mut notes = Vec::new();
        if unused > 0 {
            notes.push(format!("{unused} unused"));
        }
        if used.is_empty() {
            notes.push("no endpoints".into());
        }
        if !p.source_ranges.is_empty() {
            notes.push("source ranges".into());
        }
        rows.push([
            format!("{}/{}", p.service, p.protocol),
            fronts.join(", "),
            if used.is_empty() {
                "-".into()
            } else {
                used.join(", ")
            },
            policy,
            notes.join(", "),
        ]);
    }
    let mut widths = [0usize; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

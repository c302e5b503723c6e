//! `explain -o mermaid`: a flowchart per Service port, client -> frontend -> kproxy
//! rules -> endpoints, with the policy decisions (masquerade, Local policy, drop or
//! reject) on the edges.

use super::{Explanation, PortView};
use crate::trace::core::percent;

/// Mermaid node ids must be plain words.
fn id(prefix: &str, n: usize, m: usize) -> String {
    format!("{prefix}{n}_{m}")
}

/// Text inside `["…"]`: quotes are not allowed there.
fn label(s: &str) -> String {
    s.replace('"', "'")
}

fn mark(masquerade: bool) -> String {
    if masquerade {
        "masquerade".into()
    } else {
        "source kept".into()
    }
}

/// The flowchart.
pub(crate) fn flowchart(e: &Explanation) -> String {
    let mut out = String::from("flowchart LR\n");
    out.push_str(
        "  pod([\"pod\"])\n  node([\"process on the node\"])\n  outside([\"outside client\"])\n",
    );
    for (n, p) in e.ports.iter().enumerate() {
        port(&mut out, n, p);
    }
    out
}

fn port(out: &mut String, n: usize, p: &PortView) {
    out.push_str(&format!(
        "  subgraph S{n}[\"{} ({})\"]\n",
        label(&p.service),
        p.protocol
    ));
    let svc = id("svc", n, 0);
    let local = id("svl", n, 0);
    out.push_str(&format!(
        "    {svc}{{{{\"{}\"}}}}\n",
        label(&format!("{} cluster endpoints", p.rules.iptables[0]))
    ));
    let has_local = p.endpoints.iter().any(|x| x.local_probability > 0.0)
        || p.internal_traffic_policy == "Local"
        || p.external_traffic_policy.as_deref() == Some("Local");
    if has_local {
        out.push_str(&format!("    {local}{{{{\"local endpoints only\"}}}}\n"));
    }
    for (m, f) in p.frontends.iter().enumerate().filter(|(_, f)| f.programmed) {
        out.push_str(&format!(
            "    {}[\"{} {}\"]\n",
            id("fe", n, m),
            f.kind.replace('_', " "),
            label(&f.address)
        ));
    }
    for (k, ep) in p.endpoints.iter().enumerate() {
        out.push_str(&format!(
            "    {}[(\"{} on {}\")]\n",
            id("ep", n, k),
            label(&ep.address),
            label(ep.node.as_deref().unwrap_or("?"))
        ));
    }
    out.push_str("  end\n");
    let mut dead = false;
    for (m, f) in p.frontends.iter().enumerate().filter(|(_, f)| f.programmed) {
        let fe = id("fe", n, m);
        // Clients enter the frontend; edges out of it carry the decision, one edge per
        // distinct next hop and treatment (clients joined).
        let mut edges: Vec<(String, String, Vec<&str>)> = Vec::new();
        for path in &f.paths {
            let client = path.client.label();
            out.push_str(&format!(
                "  {client} --> {fe}
"
            ));
            let (target, what) = match (path.verdict.as_deref(), path.endpoints.as_str()) {
                (Some(v), _) => {
                    dead = true;
                    (format!("X{n}"), v.to_string())
                }
                (None, "local") => (local.clone(), mark(path.masquerade)),
                _ => (svc.clone(), mark(path.masquerade)),
            };
            match edges
                .iter_mut()
                .find(|(t, w, _)| *t == target && *w == what)
            {
                Some(e) => e.2.push(client),
                None => edges.push((target, what, vec![client])),
            }
        }
        for (target, what, clients) in edges {
            out.push_str(&format!(
                "  {fe} -- \"{}: {what}\" --> {target}\n",
                clients.join(", ")
            ));
        }
    }
    if dead {
        out.push_str(&format!("  X{n}[\"REJECT / DROP\"]\n"));
    }
    for (k, ep) in p.endpoints.iter().enumerate() {
        let e = id("ep", n, k);
        if ep.cluster_probability > 0.0 {
            out.push_str(&format!(
                "  {svc} -- \"{}\" --> {e}\n",
                percent(ep.cluster_probability)
            ));
        }
        if ep.local_probability > 0.0 && has_local {
            out.push_str(&format!(
                "  {local} -- \"{}\" --> {e}\n",
                percent(ep.local_probability)
            ));
        }
        if ep.cluster_probability == 0.0 && ep.local_probability == 0.0 {
            out.push_str(&format!("  {svc} -. \"{}\" .-> {e}\n", label(&ep.why)));
        }
    }
}

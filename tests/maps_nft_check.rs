//! The `maps` layout's `nft -f` text is accepted by `nft -c -f` for every golden
//! case's cluster (inside a throw-away network namespace), and its shape holds: only
//! element operations depend on Services.

#[path = "support/golden_cases.rs"]
mod golden_cases;
#[path = "support/netns.rs"]
mod netns;

use std::fs;
use std::path::Path;

use golden_cases::cases;
use kproxy::model::ProxyState;
use kproxy::nftables::maps::MapsRenderer;
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::transaction::Op;

/// Each family's maps-layout transaction text for one golden case.
fn render(dir: &Path) -> Vec<String> {
    render_cluster(dir, &dir.join("cluster.yaml"))
        .into_iter()
        .map(|(r, state)| transaction_text(&r.render_full(&state)))
        .collect()
}

/// Each family's renderer and state for `cluster` with `dir`'s arguments; checks that
/// rules never name a ClusterIP (only the session-affinity ports' own chains name
/// endpoints).
fn render_cluster(dir: &Path, cluster: &Path) -> Vec<(MapsRenderer, ProxyState)> {
    let inputs = golden_cases::inputs_of(dir, cluster, "nftables");
    inputs
        .families
        .iter()
        .map(|settings| {
            let state = inputs.state.proxy_state(settings.family, &inputs.node);
            let r = MapsRenderer::new(settings.clone());
            let tx = r.render_full(&state);
            // Rules never name a Service's address: they are the fixed part.
            for op in &tx.ops {
                if let Op::AddRule(rule) = op {
                    for p in &state.ports {
                        let text = kproxy::nftables::text::rule_body(tx.family, rule);
                        assert!(
                            !text.contains(&format!(" {} ", p.svc.cluster_ip)),
                            "{}: rule names a ClusterIP: {text}",
                            dir.display()
                        );
                    }
                }
            }
            (r, state)
        })
        .collect()
}

#[test]
fn nft_accepts_the_maps_layout_of_every_golden_case() {
    if !netns::require_root("nft_accepts_the_maps_layout_of_every_golden_case") {
        return;
    }
    let ns = netns::Netns::new("maps-check");
    let mut failures = Vec::new();
    let all = cases();
    assert!(all.len() >= 10, "golden cases missing");
    for dir in all {
        for text in render(&dir) {
            // MAPS_DUMP=dir writes each case's text there, for reading.
            if let Some(out) = std::env::var_os("MAPS_DUMP") {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let _ = fs::write(Path::new(&out).join(format!("{name}.nft")), &text);
            }
            let (ok, _out, err) = ns.exec_stdin(&["nft", "-c", "-f", "-"], &text);
            if !ok {
                failures.push(format!("{}:\n{err}\n--- input\n{text}", dir.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The maps layout's text of every golden case equals `maps.nft` beside it
/// (`UPDATE_GOLDEN=1` rewrites them on purpose).
#[test]
fn maps_layout_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for dir in cases() {
        let got = render(&dir).join("");
        let file = dir.join("maps.nft");
        if update {
            fs::write(&file, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", file.display()));
        if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}\n--- got\n{got}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Session affinity through a sequence of incremental syncs in a real kernel: an
/// endpoint removed, the timeout changed, affinity switched off and on again. Every
/// differential transaction is accepted, and the table it leaves equals the one a
/// full sync of the same state builds in a fresh namespace.
#[test]
fn affinity_changes_apply_incrementally_in_the_kernel() {
    if !netns::require_root("affinity_changes_apply_incrementally_in_the_kernel") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/session-affinity");
    let base = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let removed_ep = {
        let cut = base.find("- addresses:\n  - 10.244.3.93").unwrap();
        let end = base[cut..].find("ports:").unwrap() + cut;
        format!("{}{}", &base[..cut], &base[end..])
    };
    let new_timeout = removed_ep.replace("timeoutSeconds: 3600", "timeoutSeconds: 600");
    let no_affinity = new_timeout
        .replace("sessionAffinity: ClientIP", "sessionAffinity: None")
        .replace(
            "  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n",
            "",
        );
    let nodeport = base.replace("type: ClusterIP", "type: NodePort").replace(
        "    targetPort: 8080\n",
        "    targetPort: 8080\n    nodePort: 30080\n",
    );
    let steps = [
        base.clone(),
        removed_ep,
        new_timeout,
        no_affinity,
        nodeport,
        base,
    ];
    let tmp = std::env::temp_dir().join(format!("kproxy-maps-aff-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let states: Vec<(MapsRenderer, ProxyState)> = steps
        .iter()
        .enumerate()
        .map(|(i, yaml)| {
            let f = tmp.join(format!("step{i}.yaml"));
            fs::write(&f, yaml).unwrap();
            render_cluster(&dir, &f).remove(0)
        })
        .collect();
    let _ = fs::remove_dir_all(&tmp);
    let ns = netns::Netns::new("maps-aff");
    let (r0, s0) = &states[0];
    let mut old = r0.desired(s0);
    let text = transaction_text(&r0.full_transaction(&old));
    // Twice: a full resync over an existing table must be accepted too (nft reads the
    // maps' typeof back from the kernel then).
    for round in 0..2 {
        let (ok, _, err) = ns.exec_stdin(&["nft", "-f", "-"], &text);
        assert!(ok, "full sync {round} refused: {err}\n{text}");
    }
    for (i, (r, state)) in states.iter().enumerate().skip(1) {
        let new = r.desired(state);
        let text = transaction_text(&r.render_diff(&old, &new));
        let (ok, _, err) = ns.exec_stdin(&["nft", "-f", "-"], &text);
        assert!(ok, "step {i}: diff refused: {err}\n{text}");
        let fresh = netns::Netns::new("maps-aff-full");
        let full = transaction_text(&r.full_transaction(&new));
        let (ok, _, err) = fresh.exec_stdin(&["nft", "-f", "-"], &full);
        assert!(ok, "step {i}: full refused: {err}");
        let list = |n: &netns::Netns| {
            let (ok, out, err) = n.exec_status(&["nft", "list", "table", "ip", "kproxy"]);
            assert!(ok, "{err}");
            netns::canonical_listing(&out)
        };
        assert_eq!(list(&ns), list(&fresh), "step {i}: incremental != full");
        old = new;
    }
    let (_, out, _) = ns.exec_status(&["nft", "list", "table", "ip", "kproxy"]);
    assert!(
        out.contains("timeout 1h") && out.contains("@affinity-"),
        "affinity restored at the end:\n{out}"
    );
}

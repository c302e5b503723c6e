use std::time::Duration;

use ipnet::IpNet;

use super::*;

/// kubeadm's generated `config.conf` (1.33–1.35), with a pod subnet.
pub(crate) const KUBEADM: &str = include_str!("../../testdata/config/kubeadm-config.conf");

#[test]
fn defaults_are_valid() {
    let mut doc = Document::default();
    doc.apply_defaults();
    let (cfg, notes) = Config::from_document(doc, false).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(cfg.sync_period, Duration::from_secs(30));
    assert_eq!(cfg.min_sync_period, Duration::from_secs(1));
    assert_eq!(cfg.oom_score_adj, -999);
    assert_eq!(
        cfg.healthz_bind_address,
        Some(SocketAddr::from(([0, 0, 0, 0], 10256)))
    );
    assert_eq!(cfg, Config::fallback_defaults());
}

#[test]
fn file_config_and_problems() {
    let cfg = Config::from_yaml(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.0.0.0/8,fd00:10::/64\nnftables:\n  minSyncPeriod: 2s\n  masqueradeBit: 15\nnodePortAddresses: [primary]\n",
        "test",
    )
    .unwrap();
    assert_eq!(cfg.mode, Mode::Nftables);
    assert_eq!(cfg.min_sync_period, Duration::from_secs(2));
    assert_eq!(cfg.masquerade_mark(), 0x8000);
    assert_eq!(cfg.cluster_cidrs.len(), 2);
    let err = Config::from_yaml(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\nclusterCIDR: banana\niptables:\n  masqueradeBit: 40\n",
        "test",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("mode: \"ipvs\" is not supported")
            && err.contains("clusterCIDR: \"banana\"")
            && err.contains("iptables.masqueradeBit: 40"),
        "{err}"
    );
}

#[test]
fn kubeadm_config_loads_with_upstream_defaults() {
    let cfg = Config::from_yaml(KUBEADM, "config.conf").unwrap();
    assert_eq!(cfg.mode, Mode::Iptables);
    assert_eq!(cfg.sync_period, Duration::from_secs(30));
    assert_eq!(cfg.min_sync_period, Duration::from_secs(1));
    assert_eq!(
        cfg.healthz_bind_address,
        Some(SocketAddr::from(([0, 0, 0, 0], 10256)))
    );
    assert_eq!(
        cfg.metrics_bind_address,
        Some(SocketAddr::from(([127, 0, 0, 1], 10249)))
    );
    assert_eq!(cfg.conntrack.max_per_core, 32768);
    assert_eq!(cfg.conntrack.min, 131072);
    assert_eq!(cfg.masquerade_bit, 14);
    assert!(cfg.localhost_nodeports);
    assert_eq!(
        cfg.kubeconfig.as_deref(),
        Some("/var/lib/kube-proxy/kubeconfig.conf")
    );
    assert_eq!(
        cfg.cluster_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    // Without a pod subnet kubeadm writes clusterCIDR: "".
    let no_subnet = KUBEADM.replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: \"\"");
    let cfg = Config::from_yaml(&no_subnet, "config.conf").unwrap();
    assert!(cfg.cluster_cidrs.is_empty());
}

#[test]
fn nftables_defaults_nodeports_to_primary() {
    let cfg = Config::from_yaml(
        &KUBEADM.replace("mode: \"\"", "mode: nftables"),
        "config.conf",
    )
    .unwrap();
    assert_eq!(cfg.nodeport_addresses, vec!["primary".to_string()]);
    let cfg = Config::from_yaml(KUBEADM, "config.conf").unwrap();
    assert!(cfg.nodeport_addresses.is_empty());
}

#[test]
fn errors_name_the_field() {
    let bad = KUBEADM.replace("  syncPeriod: 0s\nipvs", "  syncPeriod: -5s\nipvs");
    assert_ne!(bad, KUBEADM);
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(err.contains("iptables.syncPeriod"), "{err}");
    let bad = KUBEADM.replace("  syncPeriod: 0s\nipvs", "  syncPeriod: 5\nipvs");
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(err.contains("iptables.syncPeriod"), "{err}");
    let bad = KUBEADM.replace("oomScoreAdj: null", "oomScoreAdj: 5000");
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(err.contains("oomScoreAdj: 5000"), "{err}");
    let bad = KUBEADM.replace("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n", "");
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(err.contains("apiVersion is missing"), "{err}");
    let bad = KUBEADM.replace("v1alpha1", "v1beta9");
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(err.contains("v1beta9"), "{err}");
    let bad = format!("{KUBEADM}featureGates: {{NoSuchGate: true}}\n");
    let err = Config::from_yaml(&bad, "c").unwrap_err().to_string();
    assert!(
        err.contains("unrecognized feature gate: NoSuchGate"),
        "{err}"
    );
}

#[test]
fn bom_and_unknown_fields() {
    let text = format!("\u{feff}{KUBEADM}someFutureField: 1\n");
    let (doc, notes) = load_document(&text, "c").unwrap();
    assert_eq!(doc.kind.as_deref(), Some("KubeProxyConfiguration"));
    assert!(
        notes.iter().any(|n| n.contains("someFutureField")),
        "{notes:?}"
    );
}

fn flags(args: &[&str]) -> flags::CommandLine {
    flags::CommandLine::parse(args.iter().copied()).unwrap()
}

#[test]
fn upstream_precedence_with_a_config_file() {
    let dir = std::env::temp_dir().join(format!("kproxy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.conf");
    std::fs::write(&path, KUBEADM).unwrap();
    let cl = flags(&[
        "--hostname-override=Node-A",
        "--proxy-mode=nftables",
        "-v=4",
    ]);
    let r = resolve(&Sources {
        file: Some(&path),
        flags: &cl.settings,
        precedence: Precedence::Upstream,
        healthz_port: None,
        metrics_port: None,
    })
    .unwrap();
    // The file wins over --proxy-mode; hostname and logging flags still apply.
    assert_eq!(r.config.mode, Mode::Iptables);
    assert_eq!(r.config.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(r.config.verbosity, 4);
    assert!(
        r.notes.iter().any(|n| n.contains("--proxy-mode")),
        "{:?}",
        r.notes
    );
    // One-shot commands: flags override the file.
    let r = resolve(&Sources {
        file: Some(&path),
        flags: &cl.settings,
        precedence: Precedence::FlagsOverFile,
        healthz_port: None,
        metrics_port: None,
    })
    .unwrap();
    assert_eq!(r.config.mode, Mode::Nftables);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_without_a_file() {
    let cl = flags(&[
        "--proxy-mode=nftables",
        "--iptables-min-sync-period=0s",
        "--healthz-bind-address=127.0.0.1",
        "--metrics-bind-address=",
        "--bind-address=10.1.2.3",
        "--masquerade-all",
    ]);
    let r = resolve(&Sources::flags(&cl.settings, Precedence::Upstream)).unwrap();
    let c = r.config;
    assert_eq!(c.mode, Mode::Nftables);
    // A flag's zero is kept: flags apply after defaulting, as upstream.
    assert_eq!(c.min_sync_period, Duration::ZERO);
    assert_eq!(
        c.healthz_bind_address,
        Some(SocketAddr::from(([127, 0, 0, 1], 10256)))
    );
    assert_eq!(c.metrics_bind_address, None);
    assert_eq!(c.bind_address, Some("10.1.2.3".parse().unwrap()));
    assert!(c.masquerade_all);
    assert_eq!(c.nodeport_addresses, vec!["primary".to_string()]);
    let cl = flags(&["--healthz-port=0"]);
    let r = resolve(&Sources {
        healthz_port: cl.healthz_port,
        ..Sources::flags(&cl.settings, Precedence::Upstream)
    })
    .unwrap();
    assert_eq!(r.config.healthz_bind_address, None);
    let cl = flags(&["--proxy-mode=ipvs"]);
    let err = resolve(&Sources::flags(&cl.settings, Precedence::Upstream)).unwrap_err();
    assert!(err.to_string().contains("ipvs"), "{err}");
    let cl = flags(&["--hostname-override=  "]);
    assert!(resolve(&Sources::flags(&cl.settings, Precedence::Upstream)).is_err());
}

#[test]
fn every_flag_lands_in_the_written_config() {
    for spec in flags::FLAGS {
        if spec.support == Support::Process {
            continue;
        }
        let value = flags::tests::sample_value(spec);
        let arg = format!("--{}={value}", spec.name);
        let cl = flags(&[&arg]);
        let base = resolve(&Sources::flags(&[], Precedence::Upstream))
            .unwrap()
            .config;
        let got = resolve(&Sources {
            healthz_port: cl.healthz_port,
            metrics_port: cl.metrics_port,
            ..Sources::flags(&cl.settings, Precedence::Upstream)
        })
        .unwrap_or_else(|e| panic!("{arg}: {e}"))
        .config;
        let (a, b) = (
            base.document.to_yaml().unwrap(),
            got.document.to_yaml().unwrap(),
        );
        assert_ne!(a, b, "{arg} does not show in --write-config-to output");
        // And the written file loads back to the same settings.
        let back = Config::from_yaml(&b, "written").unwrap_or_else(|e| panic!("{arg}: {e}\n{b}"));
        assert_eq!(back.document, got.document, "{arg} does not round-trip");
    }
}

#[test]
fn kubeadm_config_round_trips_through_write_config_to() {
    for mode in ["\"\"", "nftables"] {
        let text = KUBEADM.replace("mode: \"\"", &format!("mode: {mode}"));
        let first = Config::from_yaml(&text, "config.conf").unwrap();
        let written = first.document.to_yaml().unwrap();
        let second = Config::from_yaml(&written, "written").unwrap();
        assert_eq!(first, second, "{written}");
        assert!(written.contains("syncPeriod: 30s"), "{written}");
    }
}

#[test]
fn nodeport_addresses_per_family() {
    let mut cfg = Config {
        nodeport_addresses: vec!["192.168.0.0/24".into(), "2001:db8::/64".into()],
        ..Config::default()
    };
    let addrs: Vec<IpNet> = [
        "127.0.0.1/8",
        "192.168.0.2/24",
        "192.168.1.2/24",
        "2001:db8::1/64",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let s = cfg.family_settings(IpFamily::V4, "n", None, &addrs);
    assert_eq!(
        s.nodeport_addresses,
        NodePortAddresses::Ips(vec!["192.168.0.2".parse().unwrap()])
    );
    assert!(!s.localhost_nodeports);
    cfg.nodeport_addresses.clear();
    let s = cfg.family_settings(IpFamily::V4, "n", None, &addrs);
    assert_eq!(s.nodeport_addresses, NodePortAddresses::All);
    assert!(s.localhost_nodeports);
    assert_eq!(s.node_ip, Some("192.168.0.2".parse().unwrap()));
    assert_eq!(s.mark_text, "0x00004000");
    cfg.bind_address = Some("192.168.1.2".parse().unwrap());
    let s = cfg.family_settings(IpFamily::V4, "n", None, &addrs);
    assert_eq!(s.node_ip, Some("192.168.1.2".parse().unwrap()));
}

#[test]
fn compatibility_table_lists_every_flag_and_field() {
    let table = include_str!("../../docs/compatibility.md");
    for f in flags::FLAGS {
        assert!(
            table.contains(&format!("`--{}`", f.name)),
            "docs/compatibility.md does not list --{}",
            f.name
        );
    }
    let mut d = Document::default();
    d.apply_defaults();
    let serde_yaml_ng::Value::Mapping(top) = serde_yaml_ng::to_value(&d).unwrap() else {
        panic!("document is not a mapping");
    };
    for (k, v) in top {
        let k = k.as_str().unwrap().to_string();
        match v {
            serde_yaml_ng::Value::Mapping(inner) if k == "ipvs" || k == "winkernel" => {
                assert!(!inner.is_empty());
                assert!(table.contains(&format!("`{k}.*`")), "{k}.* missing");
            }
            serde_yaml_ng::Value::Mapping(inner) if k != "featureGates" => {
                for (ik, _) in inner {
                    let path = format!("`{k}.{}`", ik.as_str().unwrap());
                    assert!(table.contains(&path), "docs/compatibility.md lacks {path}");
                }
            }
            _ => assert!(
                table.contains(&format!("`{k}`")),
                "docs/compatibility.md lacks `{k}`"
            ),
        }
    }
}

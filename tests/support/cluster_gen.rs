//! A small random-cluster generator shared by the property tests: Services of every
//! type (ETP/ITP Local, session affinity, source ranges on load balancers) with TCP
//! and UDP ports, and EndpointSlices with ready/terminating, local/remote endpoints,
//! changed by random mutations. Deterministic per seed (no external crate).
#![allow(dead_code)]

use kproxy::config::Config;
use kproxy::model::{ClusterState, IpFamily, NodeContext};
use kproxy::snapshot;

/// A tiny deterministic generator (no external crate, reproducible by seed).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

pub fn service_yaml(i: u64, variant: u64) -> String {
    let ty = ["ClusterIP", "NodePort", "LoadBalancer"][(variant % 3) as usize];
    let etp = if variant % 5 == 0 { "Local" } else { "Cluster" };
    let itp = if variant % 7 == 0 { "Local" } else { "Cluster" };
    let affinity = if variant % 4 == 0 { "ClientIP" } else { "None" };
    let np = if ty != "ClusterIP" {
        format!(", nodePort: {}", 30000 + i)
    } else {
        String::new()
    };
    let lb = if ty == "LoadBalancer" {
        format!(
            "\n  loadBalancerSourceRanges: [\"203.0.113.0/25\"]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 1.2.3.{i}}}]"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  type: {ty}\n  clusterIP: 172.30.0.{i}\n  externalTrafficPolicy: {etp}\n  internalTrafficPolicy: {itp}\n  sessionAffinity: {affinity}\n  ports: [{{name: p, port: 80, protocol: TCP{np}}}, {{name: u, port: 53, protocol: UDP}}]{lb}\n"
    )
}

pub fn slice_yaml(i: u64, eps: &[(u64, bool, bool)]) -> String {
    let mut body = String::new();
    for (e, ready, local) in eps {
        body.push_str(&format!(
            "- addresses: [10.0.{i}.{e}]\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n  nodeName: {}\n",
            !ready,
            if *local { "test-node" } else { "other" }
        ));
    }
    if body.is_empty() {
        body = "[]\n".into();
    } else {
        body = format!("\n{body}");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints: {body}ports: [{{name: p, port: 8080, protocol: TCP}}, {{name: u, port: 5353, protocol: UDP}}]\n"
    )
}

pub fn apply_yaml(state: &mut ClusterState, yaml: &str) {
    let snap = snapshot::load_str(yaml, "gen").unwrap();
    assert!(snap.skipped.is_empty(), "{:?}\n{yaml}", snap.skipped);
    for s in snap.state.services() {
        state.insert_service(s.clone());
    }
    for s in snap.state.slices() {
        state.insert_slice(s.clone());
    }
}

pub fn mutate(rng: &mut Lcg, state: &mut ClusterState) {
    let i = 1 + rng.next(12);
    match rng.next(4) {
        0 => apply_yaml(state, &service_yaml(i, rng.next(100))),
        1 => {
            state.remove_service("ns", &format!("s{i}"));
        }
        2 => {
            let n = rng.next(4);
            let eps: Vec<(u64, bool, bool)> = (0..n)
                .map(|e| (1 + e + rng.next(3), rng.next(4) != 0, rng.next(2) == 0))
                .collect();
            apply_yaml(state, &slice_yaml(i, &eps));
        }
        _ => {
            state.remove_slice("ns", &format!("s{i}-1"));
        }
    }
}

pub fn settings(family: IpFamily) -> kproxy::config::FamilySettings {
    let cfg = Config {
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..Config::default()
    };
    cfg.family_settings(
        family,
        "test-node",
        None,
        &["192.168.0.2/24".parse().unwrap()],
    )
}

pub fn node() -> NodeContext {
    NodeContext {
        name: "test-node".into(),
        zone: None,
        prefer_same_node: true,
    }
}

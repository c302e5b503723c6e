//! `kproxy run` inside a network namespace against the fake API server, for the daemon
//! tests and benchmarks: one launcher (health on 127.0.0.1:10256, metrics on
//! 127.0.0.1:10249), a handle that kills the daemon when dropped, and what the tests
//! read back (the rules, the HTTP endpoints). Include it with `#[path]` next to
//! `netns.rs`, under the module name `daemon`.
// Each including crate uses a different part, through a private module.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::netns::Netns;

/// A running `kproxy run`; killed (and reaped) when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// The daemon's pid (as seen from the host).
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

/// How to start `kproxy run`: `--kubeconfig`, `--proxy-mode`, `--hostname-override`,
/// `--cluster-cidr`, `--min-sync-period` and the two bind addresses, then `args`.
pub struct KproxyRun<'a> {
    ns: &'a Netns,
    kubeconfig: PathBuf,
    mode: String,
    node: String,
    cluster_cidr: String,
    min_sync: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
}

impl<'a> KproxyRun<'a> {
    /// node-a, cluster CIDR 10.244.0.0/16, minSyncPeriod 0, stderr discarded.
    pub fn new(ns: &'a Netns, kubeconfig: &Path, mode: &str) -> Self {
        KproxyRun {
            ns,
            kubeconfig: kubeconfig.to_path_buf(),
            mode: mode.to_string(),
            node: "node-a".into(),
            cluster_cidr: "10.244.0.0/16".into(),
            min_sync: "0s".into(),
            args: Vec::new(),
            env: Vec::new(),
            log: None,
        }
    }

    /// `--hostname-override`.
    pub fn node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }

    /// `--cluster-cidr`.
    pub fn cluster_cidr(mut self, cidr: &str) -> Self {
        self.cluster_cidr = cidr.into();
        self
    }

    /// `--min-sync-period`.
    pub fn min_sync(mut self, period: &str) -> Self {
        self.min_sync = period.into();
        self
    }

    /// More flags, after the fixed ones.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes the daemon's stderr (its log) to `path`.
    pub fn log(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    /// Starts the daemon.
    pub fn spawn(self) -> Daemon {
        let stderr = match &self.log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("daemon log")),
            None => Stdio::null(),
        };
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.name,
                env!("CARGO_BIN_EXE_kproxy"),
                "run",
            ])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "--proxy-mode",
                &self.mode,
                "--hostname-override",
                &self.node,
                "--cluster-cidr",
                &self.cluster_cidr,
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--min-sync-period",
                &self.min_sync,
            ])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start kproxy run");
        Daemon(child)
    }
}

/// kproxy's IPv4 rules in `ns`: `nft list table ip kube-proxy` or `iptables-save`
/// (empty when there are none).
pub fn rules(ns: &Netns, mode: &str) -> String {
    let (_, out, _) = if mode == "nftables" {
        ns.exec_status(&["nft", "list", "table", "ip", "kube-proxy"])
    } else {
        ns.exec_status(&["iptables-save"])
    };
    out
}

/// One `GET` to 127.0.0.1:`port` inside `ns`: the whole response (status line, headers
/// and body), or "" when nothing listens.
pub fn http_get_raw(ns: &Netns, port: u16, path: &str) -> String {
    let path = path.to_string();
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

/// One `GET` to 127.0.0.1:`port` inside `ns`: (status, body); status 0 when nothing
/// answered.
pub fn http_get(ns: &Netns, port: u16, path: &str) -> (u16, String) {
    let out = http_get_raw(ns, port, path);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

/// The daemon's whole `/metrics` response (headers included), or "" when it does not
/// answer yet.
pub fn metrics_text(ns: &Netns) -> String {
    http_get_raw(ns, 10249, "/metrics")
}

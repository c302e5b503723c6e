//! The only part of iptables mode that touches the kernel: `iptables-restore`, the jump
//! rules from the built-in chains, canary chains, and the read-back of existing chains.
//!
//! Every call goes through [`Exec`], so tests can fake the binaries; the real executor
//! runs them with upstream's lock-wait flags.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::IpFamily;

use super::names::is_service_chain;

/// An iptables failure, with what was run and what it said.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The binary could not be started.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// Command line.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Another process held the xtables lock for longer than we wait (`-w`).
    #[error("{cmd}: the xtables lock is held by another process (waited {wait_seconds} s; will retry): {stderr}")]
    LockHeld {
        /// Command line.
        cmd: String,
        /// How long it waited for the lock.
        wait_seconds: &'static str,
        /// Its standard error.
        stderr: String,
    },
    /// It ran and failed.
    #[error("{cmd} failed (exit {code}): {stderr}{context}")]
    Failed {
        /// Command line.
        cmd: String,
        /// Exit status.
        code: i32,
        /// Its standard error.
        stderr: String,
        /// The payload lines around the failing line, when it named one.
        context: String,
    },
}

/// Output of a command.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Exit status (-1 when killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs commands; faked in tests.
pub trait Exec: Send + Sync {
    /// Runs `program args…` with `stdin`.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, ApplyError>;
}

/// Runs real processes.
#[derive(Debug, Clone, Default)]
pub(crate) struct RealExec;

impl Exec for RealExec {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, ApplyError> {
        let cmd = format!("{program} {}", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ApplyError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A restore that dies early closes its stdin; its exit status says why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| ApplyError::Spawn { cmd, source })?;
        Ok(Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Which iptables backend the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables-nft (nf_tables kernel API).
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
    /// Whatever `iptables` on PATH is.
    Default,
}

/// The binaries for one family and backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `iptables` / `ip6tables` (+ suffix).
    pub iptables: String,
    /// `iptables-save`.
    pub save: String,
    /// `iptables-restore`.
    pub restore: String,
    /// Large restores go in pieces (`chunk::split_restore`): on iptables-nft, whose
    /// `--noflush` restore is quadratic in its input. iptables-legacy replaces the
    /// whole table on every restore, so there one restore is cheapest.
    pub(crate) split_large_restores: bool,
}

impl Binaries {
    /// Binary names for a family and backend.
    pub(crate) fn new(family: IpFamily, backend: Backend) -> Self {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let suffix = match backend {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
            Backend::Default => "",
        };
        Binaries {
            iptables: format!("{base}{suffix}"),
            save: format!("{base}{suffix}-save"),
            restore: format!("{base}{suffix}-restore"),
            split_large_restores: backend == Backend::Nft,
        }
    }
}

/// Picks the backend the way kubelet's iptables-wrapper does: the one where kubelet's
/// (or a kube-proxy's) hint/canary chains already live; else the one with more rules;
/// else nft. `KPROXY_IPTABLES_BACKEND=nft|legacy` overrides.
pub(crate) fn detect_backend(exec: &dyn Exec) -> Backend {
    match std::env::var("KPROXY_IPTABLES_BACKEND").as_deref() {
        Ok("nft") => return Backend::Nft,
        Ok("legacy") => return Backend::Legacy,
        Ok("default") => return Backend::Default,
        _ => {}
    }
    let has_hint = |save: &str, args: &[&str]| {
        exec.run(save, args, None).is_ok_and(|o| {
            o.code == 0
                && (o.stdout.contains(":KUBE-IPTABLES-HINT")
                    || o.stdout.contains(":KUBE-KUBELET-CANARY")
                    || o.stdout.contains(":KUBE-PROXY-CANARY"))
        })
    };
    if has_hint("iptables-nft-save", &["-t", "mangle"])
        || has_hint("ip6tables-nft-save", &["-t", "mangle"])
    {
        return Backend::Nft;
    }
    if has_hint("iptables-legacy-save", &[]) || has_hint("ip6tables-legacy-save", &[]) {
        return Backend::Legacy;
    }
    let rules = |save: &str| {
        exec.run(save, &[], None)
            .map(|o| o.stdout.lines().filter(|l| l.starts_with("-A ")).count())
            .unwrap_or(0)
    };
    let (legacy, nft) = (rules("iptables-legacy-save"), rules("iptables-nft-save"));
    if legacy > nft {
        return Backend::Legacy;
    }
    if exec
        .run("iptables-nft", &["--version"], None)
        .is_ok_and(|o| o.code == 0)
    {
        Backend::Nft
    } else {
        Backend::Default
    }
}

/// The jump rules kube-proxy keeps in the built-in chains (upstream §3.2), in order:
/// (table, source chain, extra args, comment, target).
pub(crate) const JUMPS: [(&str, &str, &[&str], &str, &str); 14] = [
    (
        "filter",
        "INPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "INPUT",
        &[],
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        &[],
        "kubernetes forwarding rules",
        "KUBE-FORWARD",
    ),
    (
        "filter",
        "INPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "nat",
        "OUTPUT",
        &[],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        &[],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        &[],
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
    ("filter", "INPUT", &[], "", "KUBE-FIREWALL"),
    ("filter", "OUTPUT", &[], "", "KUBE-FIREWALL"),
];

/// The canary chain that reveals a flushed table.
pub const CANARY: &str = "KUBE-PROXY-CANARY";

/// Runs iptables for one family.
pub struct Iptables<'e> {
    exec: &'e dyn Exec,
    bins: Binaries,
}

/// Seconds to wait for the xtables lock (upstream's `-w 5`).
const WAIT_SECONDS: &str = "5";
const WAIT: [&str; 4] = ["-w", WAIT_SECONDS, "-W", "100000"];

/// iptables' exit status for "resource problem", which is what it returns when another
/// process held the xtables lock past `-w`.
const EXIT_RESOURCE_PROBLEM: i32 = 4;

/// The lock error when `out` says another process held the xtables lock.
fn lock_held(cmd: impl FnOnce() -> String, out: &Output) -> Option<ApplyError> {
    (out.code == EXIT_RESOURCE_PROBLEM && out.stderr.contains("xtables lock")).then(|| {
        ApplyError::LockHeld {
            cmd: cmd(),
            wait_seconds: WAIT_SECONDS,
            stderr: out.stderr.trim().to_string(),
        }
    })
}

impl<'e> Iptables<'e> {
    /// An iptables runner.
    pub fn new(exec: &'e dyn Exec, bins: Binaries) -> Self {
        Iptables { exec, bins }
    }

    fn iptables(&self, args: &[&str]) -> Result<Output, ApplyError> {
        let mut full: Vec<&str> = WAIT.to_vec();
        full.extend_from_slice(args);
        let out = self.exec.run(&self.bins.iptables, &full, None)?;
        match lock_held(
            || format!("{} {}", self.bins.iptables, full.join(" ")),
            &out,
        ) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Whether this family's iptables works at all (upstream: `-S POSTROUTING -t nat`).
    pub(crate) fn available(&self) -> bool {
        self.iptables(&["-S", "POSTROUTING", "-t", "nat"])
            .is_ok_and(|o| o.code == 0)
    }

    /// Applies a payload with `iptables-restore --noflush --counters`. On failure the
    /// kernel is unchanged (a restore commits per table only at COMMIT, and filter and
    /// nat are both checked before either commits in the nft backend; in legacy each
    /// table is swapped atomically) and the error quotes the failing payload lines.
    pub fn restore(&self, payload: &str) -> Result<(), ApplyError> {
        let mut args: Vec<&str> = WAIT.to_vec();
        args.extend_from_slice(&["--noflush", "--counters"]);
        let out = self.exec.run(&self.bins.restore, &args, Some(payload))?;
        if out.code == 0 {
            return Ok(());
        }
        if let Some(e) = lock_held(|| format!("{} {}", self.bins.restore, args.join(" ")), &out) {
            return Err(e);
        }
        Err(ApplyError::Failed {
            cmd: format!("{} {}", self.bins.restore, args.join(" ")),
            code: out.code,
            context: failing_context(&out.stderr, payload),
            stderr: out.stderr.trim().to_string(),
        })
    }

    /// The nat chains present now (for stale-chain deletion).
    pub fn nat_chains(&self) -> Result<BTreeSet<String>, ApplyError> {
        let out = self.exec.run(&self.bins.save, &["-t", "nat"], None)?;
        if out.code != 0 {
            return Err(ApplyError::Failed {
                cmd: format!("{} -t nat", self.bins.save),
                code: out.code,
                stderr: out.stderr.trim().to_string(),
                context: String::new(),
            });
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    fn check_or_insert(&self, table: &str, chain: &str, rule: &[&str]) -> Result<(), ApplyError> {
        let mut check = vec!["-C", chain, "-t", table];
        check.extend_from_slice(rule);
        if self.iptables(&check)?.code == 0 {
            return Ok(());
        }
        let mut insert = vec!["-I", chain, "1", "-t", table];
        insert.extend_from_slice(rule);
        let out = self.iptables(&insert)?;
        if out.code != 0 {
            return Err(ApplyError::Failed {
                cmd: format!("{} {}", self.bins.iptables, insert.join(" ")),
                code: out.code,
                stderr: out.stderr.trim().to_string(),
                context: String::new(),
            });
        }
        Ok(())
    }

    /// Creates a chain if missing (exit status 1 means it exists).
    pub(crate) fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), ApplyError> {
        let out = self.iptables(&["-N", chain, "-t", table])?;
        if out.code == 0 || out.code == 1 {
            return Ok(());
        }
        Err(ApplyError::Failed {
            cmd: format!("{} -N {chain} -t {table}", self.bins.iptables),
            code: out.code,
            stderr: out.stderr.trim().to_string(),
            context: String::new(),
        })
    }

    /// Ensures the jump rules from the built-in chains (full syncs only, as upstream).
    pub(crate) fn ensure_jumps(&self) -> Result<(), ApplyError> {
        for (table, src, extra, comment, dst) in JUMPS {
            self.ensure_chain(table, dst)?;
            let mut rule: Vec<&str> = extra.to_vec();
            if !comment.is_empty() {
                rule.extend_from_slice(&["-m", "comment", "--comment", comment]);
            }
            rule.extend_from_slice(&["-j", dst]);
            self.check_or_insert(table, src, &rule)?;
        }
        Ok(())
    }

    /// Ensures the canary chains in mangle, nat and filter.
    pub(crate) fn ensure_canaries(&self) -> Result<(), ApplyError> {
        for table in ["mangle", "nat", "filter"] {
            self.ensure_chain(table, CANARY)?;
        }
        Ok(())
    }

    /// Whether the mangle canary is gone (someone flushed the tables: resync fully).
    pub(crate) fn canary_missing(&self) -> bool {
        self.iptables(&["-S", CANARY, "-t", "mangle"])
            .is_ok_and(|o| o.code != 0 && o.code != 4)
    }

    /// Removes kproxy's (and upstream kube-proxy's) rules and chains, keeping
    /// KUBE-FIREWALL and kubelet's chains (upstream §13.3). Safe to run twice.
    pub fn cleanup(&self) -> Result<(), ApplyError> {
        for (table, src, extra, comment, dst) in JUMPS.iter().take(12) {
            let mut rule: Vec<&str> = vec!["-D", src, "-t", table];
            rule.extend_from_slice(extra);
            rule.extend_from_slice(&["-m", "comment", "--comment", comment, "-j", dst]);
            let mut check = rule.clone();
            check[0] = "-C";
            // Delete every copy, ignoring "not found".
            while self.iptables(&check)?.code == 0 {
                if self.iptables(&rule)?.code != 0 {
                    break;
                }
            }
        }
        for (table, fixed) in [
            (
                "nat",
                &[
                    "KUBE-SERVICES",
                    "KUBE-NODEPORTS",
                    "KUBE-POSTROUTING",
                    "KUBE-MARK-MASQ",
                    CANARY,
                ][..],
            ),
            (
                "filter",
                &[
                    "KUBE-SERVICES",
                    "KUBE-EXTERNAL-SERVICES",
                    "KUBE-FORWARD",
                    "KUBE-NODEPORTS",
                    "KUBE-PROXY-FIREWALL",
                    CANARY,
                ][..],
            ),
        ] {
            let out = self.exec.run(&self.bins.save, &["-t", table], None)?;
            let existing: Vec<String> = out
                .stdout
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect();
            let doomed: Vec<&String> = existing
                .iter()
                .filter(|c| fixed.contains(&c.as_str()) || is_service_chain(c))
                .collect();
            if doomed.is_empty() {
                continue;
            }
            let mut payload = format!("*{table}\n");
            for c in &doomed {
                payload.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &doomed {
                payload.push_str(&format!("-X {c}\n"));
            }
            payload.push_str("COMMIT\n");
            let mut args: Vec<&str> = WAIT.to_vec();
            args.extend_from_slice(&["-T", table, "--noflush", "--counters"]);
            let res = self.exec.run(&self.bins.restore, &args, Some(&payload))?;
            if let Some(e) = lock_held(|| format!("{} {}", self.bins.restore, args.join(" ")), &res)
            {
                return Err(e);
            }
            if res.code != 0 {
                return Err(ApplyError::Failed {
                    cmd: format!("{} {}", self.bins.restore, args.join(" ")),
                    code: res.code,
                    stderr: res.stderr.trim().to_string(),
                    context: failing_context(&res.stderr, &payload),
                });
            }
        }
        let _ = self.iptables(&["-X", CANARY, "-t", "mangle"]);
        Ok(())
    }
}

/// "line N failed" -> the payload lines N-3..N+3, for the error message.
pub(crate) fn failing_context(stderr: &str, payload: &str) -> String {
    let Some(n) = stderr
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return String::new();
    };
    let lines: Vec<&str> = payload.lines().collect();
    let from = n.saturating_sub(4);
    let to = (n + 3).min(lines.len());
    let mut out = String::from("\n  payload around the failing line:");
    for (i, l) in lines.iter().enumerate().take(to).skip(from) {
        let mark = if i + 1 == n { ">" } else { " " };
        out.push_str(&format!("\n  {mark}{:5} {l}", i + 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeExec {
        calls: Mutex<Vec<String>>,
        fail_restore: bool,
    }

    impl Exec for FakeExec {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            _stdin: Option<&str>,
        ) -> Result<Output, ApplyError> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            if program.ends_with("-restore") && self.fail_restore {
                return Ok(Output {
                    code: 1,
                    stdout: String::new(),
                    stderr: "iptables-restore: line 3 failed".into(),
                });
            }
            // "-C" finds nothing, so every jump is inserted.
            let code = if args.contains(&"-C") { 1 } else { 0 };
            Ok(Output {
                code,
                ..Output::default()
            })
        }
    }

    #[test]
    fn restore_uses_upstream_flags_and_reports_context() {
        let exec = FakeExec {
            fail_restore: true,
            ..FakeExec::default()
        };
        let ipt = Iptables::new(&exec, Binaries::new(IpFamily::V4, Backend::Nft));
        let err = ipt
            .restore("*nat\n:A - [0:0]\n-A A -j B\nCOMMIT\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3 failed"), "{err}");
        assert!(err.contains(">    3 -A A -j B"), "{err}");
        assert_eq!(
            exec.calls.lock().unwrap()[0],
            "iptables-nft-restore -w 5 -W 100000 --noflush --counters"
        );
    }

    /// iptables' answer when another process holds the lock past `-w`.
    struct LockedExec;

    impl Exec for LockedExec {
        fn run(&self, _: &str, _: &[&str], _: Option<&str>) -> Result<Output, ApplyError> {
            Ok(Output {
                code: 4,
                stdout: String::new(),
                stderr:
                    "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n"
                        .into(),
            })
        }
    }

    #[test]
    fn a_held_xtables_lock_is_reported_as_such() {
        let ipt = Iptables::new(&LockedExec, Binaries::new(IpFamily::V4, Backend::Legacy));
        for err in [
            ipt.restore("*nat\nCOMMIT\n").unwrap_err(),
            ipt.ensure_jumps().unwrap_err(),
        ] {
            assert!(matches!(err, ApplyError::LockHeld { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains("held by another process (waited 5 s; will retry)"),
                "{text}"
            );
        }
    }

    #[test]
    fn jumps_are_checked_then_inserted_first() {
        let exec = FakeExec::default();
        let ipt = Iptables::new(&exec, Binaries::new(IpFamily::V6, Backend::Legacy));
        ipt.ensure_jumps().unwrap();
        let calls = exec.calls.lock().unwrap();
        assert!(calls.iter().any(|c| c
            == "ip6tables-legacy -w 5 -W 100000 -I INPUT 1 -t filter -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES"));
        assert!(
            calls
                .iter()
                .any(|c| c
                    == "ip6tables-legacy -w 5 -W 100000 -I OUTPUT 1 -t filter -j KUBE-FIREWALL")
        );
    }
}

//! Network namespaces and bounded subprocesses for every kernel test and bench: unique
//! names, always deleted (Drop), commands with a timeout, closures run inside a
//! namespace, and the one root check.
//!
//! Namespaces are named `kpdp-<pid>-<counter>-<role>` (test beds; leftovers of a killed
//! run are recognised by their dead pid and removed) or `kp-<tag>-<pid>-<counter>`
//! (single namespaces), so that parallel tests never collide.
// Each including crate uses a different part, through a private module.
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Once};
use std::thread;
use std::time::Duration;

/// Prefix of every test-bed namespace.
pub const PREFIX: &str = "kpdp-";
/// Prefix of every single namespace ([`Netns::new`]).
pub const SINGLE_PREFIX: &str = "kp-";

/// Upper bound for any helper command (`ip`, `sysctl`, `iptables-save`, `kproxy apply`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static CLEANUP: Once = Once::new();

/// A unique `kpdp-<pid>-<n>` stem for one test bed.
pub fn unique_stem() -> String {
    CLEANUP.call_once(remove_stale);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{PREFIX}{}-{n}", std::process::id())
}

/// Deletes namespaces left behind by earlier runs whose process no longer exists
/// (a run killed with SIGKILL cannot run its Drop guards).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only test beds: `kp-` names are also used by other tools on shared machines.
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &name])) {
                eprintln!("dataplane: could not remove stale namespace {name}: {e}");
            }
        }
    }
}

/// Runs a command with [`COMMAND_TIMEOUT`], capturing its output; killed when it overruns.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    // wait_with_output drains both pipes, so a chatty command cannot block on a full pipe.
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("{shown}: {e}")),
        Err(_) => {
            // The waiter has not reaped the child yet (it would have sent), so the pid
            // still names our child.
            // SAFETY: kill(2) with a pid we spawned; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            Err(format!("{shown}: killed after {COMMAND_TIMEOUT:?}"))
        }
    }
}

/// Like [`run`], but a non-zero exit is an error carrying stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = run(cmd)?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace named `kp-<tag>-<pid>-<n>` with loopback up; panics
    /// when it cannot (a test that needs one cannot go on).
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{SINGLE_PREFIX}{tag}-{}-{n}", std::process::id());
        Netns::create(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a command inside the namespace; returns (status ok, stdout, stderr).
    pub fn exec_status(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        match run(&mut cmd) {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), e),
        }
    }

    /// Runs a command with standard input inside the namespace.
    pub fn exec_stdin(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let _ = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(stdin.as_bytes());
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `f` on a thread that has entered the namespace; panics if it cannot.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.run_in(f).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `nft list table <family> kube-proxy` inside the namespace.
    pub fn nft_list(&self, family: &str) -> String {
        let (ok, out, err) = self.exec_status(&["nft", "list", "table", family, "kube-proxy"]);
        if ok {
            out
        } else {
            format!("(no table: {err})")
        }
    }

    /// Creates the namespace with loopback up.
    pub fn create(name: String) -> Result<Netns, String> {
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, failing on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// A command that will run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace and returns stdout (error on failure).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        run_checked(self.command(program).args(args))
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<(), String> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(|_| ())
    }

    /// Runs `f` on a fresh thread that has entered the namespace; sockets it creates
    /// belong to the namespace for their whole life, wherever they are used later.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let name = self.name.clone();
        let handle = self.spawn_in(f)?;
        match handle.join() {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(format!("thread could not enter {name}")),
            // Keep the original assertion message: re-raise the thread's panic here.
            Err(payload) => {
                eprintln!("dataplane: thread in {name} panicked");
                std::panic::resume_unwind(payload)
            }
        }
    }

    /// Spawns a thread inside the namespace (for servers that outlive the call).
    /// The thread yields `None` only when entering the namespace failed, which this
    /// function already reports as an error.
    pub fn spawn_in<T, F>(&self, f: F) -> Result<thread::JoinHandle<Option<T>>, String>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| format!("open /run/netns/{}: {e}", self.name))?;
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let handle = thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                // setns(CLONE_NEWNET) changes only this thread, which is why every
                // namespace hop gets a thread of its own that is never reused.
                // SAFETY: `file` is an open namespace file for the duration of the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                // The closure must never run in the wrong namespace.
                ok.then(f)
            })
            .map_err(|e| format!("spawn thread for {}: {e}", self.name))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(format!("setns into {}: {e}", self.name)),
            Err(_) => Err(format!("thread for {} died before entering it", self.name)),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("dataplane: cleanup: {e}");
        }
    }
}

/// Whether kernel tests can run here; when they cannot and `CI` is set, that is a
/// failure, not a skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces), and CI must run kernel tests");
    }
    eprintln!("{test}: skipped (needs root)");
    false
}

/// A table listing with object order and element order ignored (nft lists objects in
/// creation order and set elements in kernel order): each top-level block's lines,
/// trimmed and sorted, blocks sorted.
pub fn canonical_listing(listing: &str) -> String {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    for line in listing.lines() {
        let opens_block =
            line.starts_with('\t') && !line.starts_with("\t\t") && line.trim_end().ends_with('{');
        if opens_block && !cur.is_empty() {
            blocks.push(std::mem::take(&mut cur));
        }
        let t = line.trim().trim_end_matches(',').to_string();
        // Closing braces carry no content and land in whichever block is last.
        if !t.is_empty() && t != "}" {
            cur.push(t);
        }
    }
    blocks.push(cur);
    for b in blocks.iter_mut() {
        let head = b.first().cloned();
        let mut rest: Vec<String> = b.iter().skip(1).cloned().collect();
        // Elements may wrap over lines in any order: split them apart.
        rest = rest
            .iter()
            .flat_map(|l| l.split(", ").map(str::to_string).collect::<Vec<_>>())
            .map(|l| {
                l.trim_start_matches("elements = { ")
                    .trim_end_matches(" }")
                    .to_string()
            })
            .collect();
        rest.sort();
        *b = head.into_iter().chain(rest).collect();
    }
    blocks.sort();
    blocks
        .into_iter()
        .map(|b| b.join("\n"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

//! Network namespaces for kernel tests: unique names, always deleted (Drop), and a way
//! to run a closure inside one (on a thread that `setns`es into it).
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether kernel tests can run here; when they cannot and `CI` is set, that is a
/// failure, not a skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI must run kernel tests");
    }
    eprintln!("{test}: skipped (needs root)");
    false
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace named `kp-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("kp-{tag}-{}-{n}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name}");
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status();
        Netns { name }
    }

    /// Runs a command inside the namespace; returns (status ok, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("run ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a command with standard input inside the namespace.
    pub fn exec_stdin(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// `nft list table <family> kube-proxy` inside the namespace.
    pub fn nft_list(&self, family: &str) -> String {
        let (ok, out, err) = self.exec(&["nft", "list", "table", family, "kube-proxy"]);
        if ok {
            out
        } else {
            format!("(no table: {err})")
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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

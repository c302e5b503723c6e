//! The kernel's C interfaces, wrapped: the only `unsafe` code in kproxy lives here.
//!
//! - [`nftnl`]: libnftnl objects (tables, chains, rules, expressions, sets, elements)
//!   as owners that free themselves, with NULL and length checks, serialized into
//!   netlink messages whose buffers grow to fit and refuse to overflow.
//! - [`socket`]: a netfilter netlink socket (libmnl) and the safe reading of netlink
//!   frames and acknowledgements, shared by nftables and conntrack.
//! - [`netns`]: moving a thread into a new or existing network namespace.
//! - [`heap`]: giving free heap memory back to the system after a full sync.
//!
//! Everything above this module is safe Rust.

pub(crate) mod heap;
pub(crate) mod netns;
pub(crate) mod nftnl;
pub(crate) mod socket;

/// A failure at the C boundary.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// libnftnl could not allocate an object (out of memory, or an unknown
    /// expression name).
    #[error("libnftnl could not allocate {0}")]
    Alloc(&'static str),
    /// A string passed to C contained a NUL byte.
    #[error("name with NUL byte: {0:?}")]
    Nul(String),
    /// A value was too long for its netlink attribute.
    #[error("{what} of {len} bytes is too long for netlink")]
    TooLong {
        /// What was being encoded.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// libnftnl refused an attribute.
    #[error("libnftnl refused attribute {attr} of {what}")]
    Attribute {
        /// The object kind.
        what: &'static str,
        /// The attribute number.
        attr: u16,
    },
    /// A message came out longer than its buffer: a bug in the size accounting,
    /// reported instead of sending a truncated message.
    #[error("netlink message of {len} bytes overflowed its {capacity}-byte buffer")]
    Overflow {
        /// The length libnftnl wrote into the header.
        len: usize,
        /// The buffer's size.
        capacity: usize,
    },
}

#[cfg(test)]
mod house_rules {
    //! The layering in docs/design.md, checked on the source: lower layers never reach
    //! up, backends never reach into each other, and `unsafe` stays here.

    use std::fs;
    use std::path::{Path, PathBuf};

    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The code of every source file under `src/<module>` (and `src/<module>.rs`),
    /// comments left out.
    fn code(module: &str) -> Vec<(PathBuf, String)> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        files(&src.join(module), &mut paths);
        let single = src.join(format!("{module}.rs"));
        if single.exists() {
            paths.push(single);
        }
        paths
            .into_iter()
            .map(|p| {
                let text = fs::read_to_string(&p).unwrap();
                // Not this check's own needles.
                let text = text.split("mod house_rules").next().unwrap_or_default();
                let code: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect();
                (p, code.join("\n"))
            })
            .collect()
    }

    fn forbid(module: &str, needles: &[&str]) {
        for (path, text) in code(module) {
            for n in needles {
                assert!(!text.contains(n), "{} uses {n}", path.display());
            }
        }
    }

    #[test]
    fn lower_layers_never_import_the_top() {
        for m in [
            "model",
            "config",
            "snapshot",
            "dataplane",
            "nftables",
            "iptables",
            "conntrack",
            "sys",
        ] {
            forbid(m, &["crate::cli", "crate::daemon"]);
        }
    }

    #[test]
    fn backends_and_foundations_stay_apart() {
        forbid("nftables", &["crate::iptables", "crate::trace"]);
        forbid("iptables", &["crate::nftables", "crate::sys"]);
        forbid("dataplane", &["crate::nftables", "crate::iptables"]);
        forbid(
            "model",
            &[
                "crate::config",
                "crate::nftables",
                "crate::iptables",
                "crate::sys",
            ],
        );
        forbid("sys", &["crate::model", "crate::nftables", "crate::config"]);
    }

    #[test]
    fn unsafe_code_lives_in_sys() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        files(&src, &mut paths);
        for p in paths {
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            // The allocator hook (mimalloc's collect) is the one sanctioned exception.
            if rel.starts_with("sys/") || rel == "memory.rs" {
                continue;
            }
            let text = fs::read_to_string(&p).unwrap();
            for l in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                let forbidden =
                    l.contains("unsafe {") || l.contains("unsafe impl") || l.contains("unsafe fn");
                assert!(!forbidden, "{rel}: unsafe outside src/sys: {l}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every `unsafe` block, fn or impl of the crate is under `src/sys/`.
    #[test]
    fn unsafe_code_lives_only_in_sys() {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    if !path.ends_with("sys") {
                        walk(&path, out);
                    }
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        let code = line.split("//").next().unwrap_or("");
                        if ["unsafe {", "unsafe fn", "unsafe impl", "unsafe extern"]
                            .iter()
                            .any(|k| code.contains(k))
                        {
                            out.push(format!("{}:{}", path.display(), n + 1));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.is_empty(), "unsafe code outside src/sys: {found:?}");
    }
}

//! The only part of `diff` that touches the kernel: reading a network namespace's rules
//! (one small function per mode), and a private scratch network namespace into which the
//! desired rules are applied by the ordinary appliers so that they come back in the
//! kernel's own canonical form. Nothing here writes to the caller's network namespace.

use std::fs::File;
use std::process::Command;

use crate::config::{FamilySettings, Mode, NftablesLayout};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::iptables::apply::{Backend, Binaries, RealExec};
use crate::iptables::dataplane::IptablesDataplane;
use crate::model::{IpFamily, ProxyState};
use crate::nftables::dataplane::NftDataplane;
use crate::nftables::maps::dataplane::MapsDataplane;
use crate::nftables::transaction::Family;

/// Why live or desired rules could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A system call or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A dump command failed.
    #[error("{cmd} exited with {code}: {stderr}")]
    Command {
        /// The command.
        cmd: String,
        /// Exit status.
        code: i32,
        /// Its error output.
        stderr: String,
    },
    /// Applying the desired rules into the scratch namespace failed.
    #[error("applying the desired rules in a scratch network namespace: {0}")]
    Apply(#[source] DataplaneError),
    /// The scratch namespace's worker thread died.
    #[error("scratch network namespace worker panicked")]
    Worker,
}

fn run(program: &str, args: &[&str]) -> Result<std::process::Output, LiveError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LiveError::Io {
            what: format!("running {program}"),
            source,
        })
}

/// `iptables-save` of one family (all tables) in the current network namespace.
pub(crate) fn iptables_save(bins: &Binaries) -> Result<String, LiveError> {
    let out = run(&bins.save, &[])?;
    if !out.status.success() {
        return Err(LiveError::Command {
            cmd: bins.save.clone(),
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nftables table a layout writes: upstream's `kube-proxy`, or the maps layout's
/// `kproxy`.
pub fn table_of(layout: NftablesLayout) -> &'static str {
    match layout {
        NftablesLayout::Upstream => crate::nftables::render::TABLE,
        NftablesLayout::Maps => crate::nftables::maps::TABLE,
    }
}

/// `nft -s list table <family> <table>` in the current network namespace; empty when
/// the table does not exist.
pub fn nft_list(family: Family, table: &str) -> Result<String, LiveError> {
    let out = run("nft", &["-s", "list", "table", family.as_str(), table])?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("No such file or directory") {
        return Ok(String::new());
    }
    Err(LiveError::Command {
        cmd: format!("nft -s list table {} {table}", family.as_str()),
        code: out.status.code().unwrap_or(-1),
        stderr,
    })
}

/// A private network namespace owned by this process (kept alive by a file descriptor,
/// gone when dropped): the desired rules are applied there, never to the node.
#[derive(Debug)]
pub struct Scratch {
    ns: File,
}

impl Scratch {
    /// Creates one (needs CAP_SYS_ADMIN).
    pub fn new() -> Result<Scratch, LiveError> {
        // unshare() moves only the calling thread, so a short-lived thread makes the
        // namespace and hands back a descriptor for it.
        std::thread::spawn(|| {
            crate::sys::netns::unshare_net().map_err(|source| LiveError::Io {
                what: "unshare(CLONE_NEWNET) for a scratch network namespace".into(),
                source,
            })?;
            let ns = File::open("/proc/thread-self/ns/net").map_err(|source| LiveError::Io {
                what: "opening the scratch network namespace".into(),
                source,
            })?;
            Ok(Scratch { ns })
        })
        .join()
        .map_err(|_| LiveError::Worker)?
    }

    /// Runs `f` on a thread inside the scratch namespace (commands it starts run there
    /// too; netlink sockets it opens stay bound there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LiveError> {
        let ns = &self.ns;
        std::thread::scope(|s| {
            s.spawn(move || {
                crate::sys::netns::enter_net(ns).map_err(|source| LiveError::Io {
                    what: "entering the scratch network namespace".into(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| LiveError::Worker)?
        })
    }
}

/// Creates the nfacct counters the rules refer to (upstream kube-proxy creates them when
/// the kernel supports them); only inside the scratch namespace.
fn ensure_nfacct(settings: &FamilySettings) {
    let mut names = Vec::new();
    if settings.nfacct_invalid {
        names.push("ct_state_invalid_dropped_pkts");
    }
    if settings.nfacct_localhost && settings.family == IpFamily::V4 {
        names.push("localhost_nps_accepted_pkts");
    }
    for n in names {
        // Already there, or no nfacct tool: the restore then names what is missing.
        let _ = run("nfacct", &["add", n]);
    }
}

/// One family's dataplane in `mode` (and nftables `layout`), for applying inside a
/// scratch namespace.
pub(crate) fn scratch_plane(
    mode: Mode,
    layout: NftablesLayout,
    settings: FamilySettings,
    backend: Backend,
    sync_period: std::time::Duration,
) -> Box<dyn Dataplane> {
    match mode {
        Mode::Iptables => {
            let bins = Binaries::new(settings.family, backend);
            Box::new(IptablesDataplane::new(
                settings,
                Box::new(RealExec),
                bins,
                sync_period,
            ))
        }
        Mode::Nftables => match layout {
            NftablesLayout::Upstream => Box::new(NftDataplane::new(settings)),
            NftablesLayout::Maps => Box::new(MapsDataplane::new(settings)),
        },
    }
}

/// Reads one family's rules of `mode` (nftables: the `layout`'s table) in the current
/// network namespace.
pub fn read(
    mode: Mode,
    layout: NftablesLayout,
    family: IpFamily,
    backend: Backend,
) -> Result<String, LiveError> {
    match mode {
        Mode::Iptables => iptables_save(&Binaries::new(family, backend)),
        Mode::Nftables => nft_list(Family::of(family), table_of(layout)),
    }
}

/// The desired rules of one family as the kernel lists them: applied (full sync, with
/// jump rules and canaries in iptables mode) into `scratch`, then read back there.
pub fn desired(
    scratch: &Scratch,
    mode: Mode,
    layout: NftablesLayout,
    settings: &FamilySettings,
    state: &ProxyState,
    backend: Backend,
) -> Result<String, LiveError> {
    scratch.run(|| {
        if mode == Mode::Iptables {
            ensure_nfacct(settings);
        }
        let family = settings.family;
        let mut dp = scratch_plane(
            mode,
            layout,
            settings.clone(),
            backend,
            std::time::Duration::from_secs(30),
        );
        dp.sync(state, true).map_err(LiveError::Apply)?;
        read(mode, layout, family, backend)
    })?
}

/// Parses one dump of `mode` into a ruleset (`label` is the family label).
pub fn parse(mode: Mode, label: &str, text: &str) -> Result<super::Ruleset, String> {
    match mode {
        Mode::Iptables => super::iptables::parse_save(text, label).map_err(|e| e.to_string()),
        Mode::Nftables => super::nftables::parse_list(text).map_err(|e| e.to_string()),
    }
}

//! The daemon's command line: `kproxy [flags]`, `kproxy run [flags]` and `kube-proxy
//! [flags]` all mean the same, with kube-proxy's flags and semantics.

use super::logging::{self, Audience};
use super::CliError;
use crate::config::{self, flags::CommandLine, Mode, Precedence, Sources};

/// The Kubernetes release whose kube-proxy kproxy matches.
pub const KUBERNETES_VERSION: &str = "v1.34";

/// What `--version` prints.
pub fn version_line() -> String {
    format!(
        "kproxy {} (kube-proxy compatible: Kubernetes {KUBERNETES_VERSION})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Runs the daemon's command line (arguments after the program name).
pub fn main(args: &[String]) -> Result<(), CliError> {
    let cl = CommandLine::parse(args.iter().cloned())
        .map_err(|e| CliError::usage(format!("{e} (see --help)")))?;
    if cl.help {
        print!("{}", config::flags::help_text());
        return Ok(());
    }
    if let Some(v) = &cl.version {
        if v == "raw" {
            println!(
                "{{\"kproxy\":\"{}\",\"kubernetes\":\"{KUBERNETES_VERSION}\"}}",
                env!("CARGO_PKG_VERSION")
            );
        } else {
            println!("{}", version_line());
        }
        return Ok(());
    }
    let resolved = config::resolve(&Sources {
        file: cl.config_file.as_deref(),
        flags: &cl.settings,
        precedence: Precedence::Upstream,
        healthz_port: cl.healthz_port,
        metrics_port: cl.metrics_port,
    })
    .map_err(|e| CliError::usage(e.to_string()))?;
    let mut cfg = resolved.config;
    // Shadow mode (kproxy's own): --shadow, `kproxy.shadow: true`, or KPROXY_SHADOW.
    let shadow = cl.shadow
        || cfg.document.kproxy.shadow == Some(true)
        || std::env::var("KPROXY_SHADOW")
            .ok()
            .and_then(|v| config::flags::parse_bool(&v))
            .unwrap_or(false);
    if shadow {
        // With --config the file wins over these flags (upstream precedence).
        let given = |name: &str| {
            cl.config_file.is_none() && cl.settings.iter().any(|(spec, _)| spec.name == name)
        };
        crate::daemon::shadow::shadow_ports(
            &mut cfg,
            given("healthz-bind-address") || cl.healthz_port.is_some(),
            given("metrics-bind-address") || cl.metrics_port.is_some(),
        );
    }
    logging::init(cfg.verbosity, cfg.log_format, Audience::Daemon);
    // Each note once, at start-up: what is accepted but has no effect.
    for note in &resolved.notes {
        tracing::warn!("{note}");
    }
    if let Some(path) = &cl.write_config_to {
        return crate::daemon::write_config(&cfg, path)
            .map_err(|e| CliError::failed(e.to_string()));
    }
    if shadow && (cl.cleanup || cl.init_only) {
        return Err(CliError::usage(
            "--shadow writes nothing: it cannot be combined with --cleanup or --init-only",
        ));
    }
    if shadow && cfg.mode == Mode::Nftables && cfg.nftables_layout == config::NftablesLayout::Maps {
        // A shadow compares with the rules of a kube-proxy running on the node, which
        // writes upstream's layout: the maps layout has nothing there to compare with.
        return Err(CliError::usage(
            "--shadow compares with kube-proxy's own rules (upstream's layout): it cannot be combined with --nftables-layout=maps; use `kproxy diff --nftables-layout=maps` after switching",
        ));
    }
    if cl.cleanup {
        // Upstream's --cleanup removes every mode's rules, for both families.
        return super::apply::cleanup_modes(&[Mode::Iptables, Mode::Nftables]);
    }
    if cl.init_only {
        crate::daemon::init_host(&cfg);
        tracing::info!("initialization done (--init-only)");
        return Ok(());
    }
    let opts = crate::daemon::RunOptions {
        debug_endpoints: cl.debug_endpoints.unwrap_or(true),
        shadow,
    };
    crate::daemon::run(&cfg, cl.master.as_deref(), opts)
        .map_err(|e| CliError::failed(e.to_string()))
}

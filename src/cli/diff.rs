//! `kproxy diff`: compares the rules kproxy would write for a cluster with the rules
//! live in the current network namespace. Exit 0 same, 1 different, 2 error.

use clap::Args;

use super::inputs::{InputArgs, Inputs};
use super::CliError;
use crate::config::{FamilySettings, Mode, NftablesLayout};
use crate::diff::live::{self, Scratch};
use crate::diff::{Outcome, Ruleset};
use crate::iptables::apply::{detect_backend, Backend, RealExec};

/// `kproxy diff` flags: the render inputs, with the cluster read from a snapshot or
/// straight from the API server.
#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    /// Cluster and node inputs (as for `render` and `apply`).
    pub inputs: InputArgs,
    /// Read the cluster from the API server with this kubeconfig instead of --snapshot.
    #[arg(long, value_name = "FILE", conflicts_with = "in_cluster")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Read the cluster from the API server with the pod's in-cluster credentials (or
    /// $KUBECONFIG / ~/.kube/config) instead of --snapshot.
    #[arg(long)]
    pub(crate) in_cluster: bool,
}

/// Lists Services, EndpointSlices, Nodes and ServiceCIDRs from the API server (the
/// same label selection the daemon watches) as one `List` JSON snapshot.
fn fetch_cluster(kubeconfig: Option<&std::path::Path>) -> Result<String, CliError> {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    use kube::api::{Api, ListParams};

    let cfg = crate::config::Config {
        kubeconfig: kubeconfig.map(|p| p.display().to_string()),
        ..crate::config::Config::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::usage(format!("starting runtime: {e}")))?;
    rt.block_on(async {
        let client = crate::daemon::watch::client(&cfg, None)
            .await
            .map_err(CliError::usage)?;
        let proxied = ListParams::default().labels(crate::daemon::watch::PROXIED);
        let err = |what: &str, e: kube::Error| CliError::usage(format!("listing {what}: {e}"));
        let mut items: Vec<serde_json::Value> = Vec::new();
        let mut push = |v: Result<serde_json::Value, serde_json::Error>| {
            if let Ok(v) = v {
                items.push(v);
            }
        };
        for o in Api::<Service>::all(client.clone())
            .list(&proxied)
            .await
            .map_err(|e| err("services", e))?
        {
            push(serde_json::to_value(o));
        }
        for o in Api::<EndpointSlice>::all(client.clone())
            .list(&proxied)
            .await
            .map_err(|e| err("endpointslices", e))?
        {
            push(serde_json::to_value(o));
        }
        for o in Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| err("nodes", e))?
        {
            push(serde_json::to_value(o));
        }
        // Older API servers have no ServiceCIDRs: then there are none to know about.
        if let Ok(list) = Api::<ServiceCIDR>::all(client)
            .list(&ListParams::default())
            .await
        {
            for o in list {
                push(serde_json::to_value(o));
            }
        }
        Ok(serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string())
    })
}

/// The settings `kproxy apply` would use on this host (so that "same" means an apply
/// would change nothing).
fn as_apply_would(inputs: &Inputs, settings: &FamilySettings) -> FamilySettings {
    let mut s = settings.clone();
    if !inputs.capabilities_given {
        s.nfacct_invalid = false;
        s.nfacct_localhost = false;
    }
    if inputs.config.mode == Mode::Iptables
        && crate::sysctl::read_int("net/netfilter/nf_conntrack_tcp_be_liberal").unwrap_or(0) != 0
    {
        s.tcp_be_liberal = true;
    }
    s
}

/// Compares every family of `inputs` with the live rules (nftables mode: the table of
/// the configured layout).
pub fn compare(inputs: &Inputs) -> Result<Outcome, CliError> {
    let mode = inputs.config.mode;
    let layout = inputs.config.nftables_layout;
    let backend = match mode {
        Mode::Iptables => detect_backend(&RealExec),
        Mode::Nftables => Backend::Default,
    };
    let err = |e: live::LiveError| CliError::usage(e.to_string());
    let scratch = Scratch::new().map_err(err)?;
    let (mut desired, mut current) = (Ruleset::default(), Ruleset::default());
    let mut states = Vec::new();
    for settings in &inputs.families {
        let s = as_apply_would(inputs, settings);
        let label = s.family.label();
        let state = inputs.state.proxy_state(s.family, &inputs.node);
        let want = live::desired(&scratch, mode, layout, &s, &state, backend).map_err(err)?;
        let have = live::read(mode, layout, s.family, backend).map_err(err)?;
        desired.extend(
            live::parse(mode, label, &want)
                .map_err(|e| CliError::usage(format!("desired rules: {e}")))?,
        );
        current.extend(
            live::parse(mode, label, &have)
                .map_err(|e| CliError::usage(format!("live rules: {e}")))?,
        );
        states.push(state);
    }
    if mode == Mode::Nftables && layout == NftablesLayout::Maps {
        let states: Vec<_> = states.iter().collect();
        return Ok(Outcome::maps(&states, desired, current));
    }
    Ok(Outcome::new(mode, desired, current))
}

/// Runs `kproxy diff`.
pub fn run(args: &DiffArgs) -> Result<(), CliError> {
    let from_api = args.kubeconfig.is_some() || args.in_cluster;
    let empty = args.inputs.snapshot.is_none();
    if from_api != empty {
        return Err(CliError::usage(
            "give exactly one of --snapshot, --kubeconfig or --in-cluster",
        ));
    }
    let mut input_args = args.inputs.clone();
    let _fetched; // keeps the temporary snapshot until the inputs are loaded
    if from_api {
        let text = fetch_cluster(args.kubeconfig.as_deref())?;
        let path = std::env::temp_dir().join(format!("kproxy-diff-{}.json", std::process::id()));
        std::fs::write(&path, text)
            .map_err(|e| CliError::usage(format!("writing {}: {e}", path.display())))?;
        input_args.snapshot = Some(path.clone());
        _fetched = TempFile(path);
    }
    let inputs = Inputs::load(&input_args)?;
    let outcome = compare(&inputs)?;
    print!("{}", outcome.report());
    if outcome.is_same() {
        Ok(())
    } else {
        Err(CliError::failed(
            "the live rules differ from the rules kproxy would write",
        ))
    }
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

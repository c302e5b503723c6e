//! kube-rs watchers feeding the cluster state. A relist (watcher `Init` … `InitDone`)
//! replaces a kind's objects wholesale, so deletions missed while disconnected still
//! take effect; individual events only ever refine that.

use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};

use super::Shared;
use crate::config::Config;
use crate::model::from_k8s::SkipReason;
use crate::model::{ClusterState, IpFamily};

/// A client from `--kubeconfig` (or in-cluster / the default kubeconfig), with
/// `--master` overriding the server address.
pub async fn client(cfg: &Config, master: Option<&str>) -> Result<Client, String> {
    let mut kc = match &cfg.kubeconfig {
        Some(path) => {
            let k = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {path}: {e}"))?;
            kube::Config::from_custom_kubeconfig(k, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {path}: {e}"))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no kubeconfig and not in a cluster: {e}"))?,
    };
    if let Some(m) = master {
        kc.cluster_url = m.parse().map_err(|e| format!("--master {m:?}: {e}"))?;
    }
    Client::try_from(kc).map_err(|e| format!("kubernetes client: {e}"))
}

fn report<K: Resource>(shared: &Shared, obj: &K, kind: &str, r: Result<(), SkipReason>) {
    if let Err(SkipReason::Invalid(reason)) = r {
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let name = obj.meta().name.clone().unwrap_or_default();
        tracing::warn!(object = %format!("{kind} {ns}/{name}"), %reason, "skipping malformed object");
        shared.metrics.skipped_object();
    }
}

/// How one kind feeds the cluster state.
struct Kind<K> {
    /// Slot in `Shared::synced`.
    index: usize,
    /// The first sync may proceed without it (APIs an older server lacks).
    optional: bool,
    apply: fn(&mut ClusterState, &K) -> Result<(), SkipReason>,
    delete: fn(&mut ClusterState, &K),
    /// Replaces this kind's objects with a relist's (staged in a state of its own).
    adopt: fn(&mut ClusterState, ClusterState),
    /// The change's `last-change-trigger-time`, for network-programming latency.
    trigger: fn(&K) -> Option<(IpFamily, SystemTime)>,
    /// Runs after each change of this kind has reached the state (not under its lock).
    after: fn(&Shared),
}

/// Runs one watcher until the process ends.
async fn watch_kind<K>(api: Api<K>, config: watcher::Config, shared: Arc<Shared>, kind_: Kind<K>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let Kind {
        index,
        optional,
        apply,
        delete,
        adopt,
        trigger,
        after,
    } = kind_;
    let kind = K::kind(&()).to_string();
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    // A relist is converted into a staging state as it arrives (compact model only)
    // and replaces this kind's objects when complete, so deletions missed while
    // disconnected take effect and the old objects keep working until then.
    let mut staging = ClusterState::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => staging = ClusterState::new(),
            Ok(Event::InitApply(o)) => {
                let r = apply(&mut staging, &o);
                report(&shared, &o, &kind, r);
            }
            Ok(Event::InitDone) => {
                {
                    let listed = std::mem::take(&mut staging);
                    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    adopt(&mut st, listed);
                }
                shared.synced.lock().unwrap_or_else(PoisonError::into_inner)[index] = true;
                after(&shared);
                shared.changed();
            }
            Ok(Event::Apply(o)) => {
                shared.note_change(index == 1);
                if let Some((family, at)) = trigger(&o) {
                    shared.trigger(family, at);
                }
                let r = {
                    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    apply(&mut st, &o)
                };
                report(&shared, &o, &kind, r);
                after(&shared);
                shared.changed();
            }
            Ok(Event::Delete(o)) => {
                shared.note_change(index == 1);
                if let Some((family, at)) = trigger(&o) {
                    shared.trigger(family, at);
                }
                {
                    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    delete(&mut st, &o);
                }
                after(&shared);
                shared.changed();
            }
            Err(e) => {
                tracing::warn!(kind = %kind, error = %e, "watch error; retrying");
                if optional {
                    // An API the server lacks (e.g. ServiceCIDR before 1.33) must not
                    // hold the first sync back.
                    shared.synced.lock().unwrap_or_else(PoisonError::into_inner)[index] = true;
                    shared.wake.notify_all();
                }
            }
        }
    }
}

/// Upstream's label selector for both Services and EndpointSlices: objects handled by
/// another service proxy, and headless Services' slices, are not ours.
pub const PROXIED: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// An EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` and family.
pub fn slice_trigger_time(slice: &EndpointSlice) -> Option<(IpFamily, SystemTime)> {
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        _ => return None,
    };
    let raw = slice
        .metadata
        .annotations
        .as_ref()?
        .get(crate::model::from_k8s::TRIGGER_TIME_ANNOTATION)?;
    let ts: jiff::Timestamp = raw.parse().ok()?;
    Some((family, SystemTime::from(ts)))
}

/// Starts the four watchers on the runtime.
pub fn spawn_all(rt: &tokio::runtime::Runtime, client: Client, shared: Arc<Shared>, node: String) {
    rt.spawn(watch_kind::<Service>(
        Api::all(client.clone()),
        watcher::Config::default().labels(PROXIED),
        Arc::clone(&shared),
        Kind {
            index: 0,
            optional: false,
            apply: |st, o| st.upsert_service(o),
            delete: |st, o| {
                st.remove_service(&o.namespace().unwrap_or_default(), &o.name_any());
            },
            adopt: ClusterState::adopt_services,
            trigger: |_| None,
            after: |_| {},
        },
    ));
    rt.spawn(watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(PROXIED),
        Arc::clone(&shared),
        Kind {
            index: 1,
            optional: false,
            apply: |st, o| st.upsert_slice(o),
            delete: |st, o| {
                st.remove_slice(&o.namespace().unwrap_or_default(), &o.name_any());
            },
            adopt: ClusterState::adopt_slices,
            trigger: slice_trigger_time,
            after: |_| {},
        },
    ));
    rt.spawn(watch_kind::<Node>(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
        Arc::clone(&shared),
        Kind {
            index: 2,
            optional: true,
            apply: |st, o| st.set_node(o),
            delete: |st, _| st.clear_node(),
            adopt: ClusterState::adopt_node,
            trigger: |_| None,
            // /healthz follows the Node at once, as upstream's node handler does.
            after: |sh| {
                let eligible = sh
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .node()
                    .is_some_and(|n| !n.being_deleted);
                sh.health.set_node_eligible(eligible);
            },
        },
    ));
    rt.spawn(watch_kind::<ServiceCIDR>(
        Api::all(client),
        watcher::Config::default(),
        shared,
        Kind {
            index: 3,
            optional: true,
            apply: |st, o| st.upsert_service_cidr(o),
            delete: |st, o| {
                st.remove_service_cidr(&o.name_any());
            },
            adopt: ClusterState::adopt_service_cidrs,
            trigger: |_| None,
            after: |_| {},
        },
    ));
}

//! kube-rs watchers feeding the cluster state. A relist (watcher `Init` … `InitDone`)
//! replaces a kind's objects wholesale, so deletions missed while disconnected still
//! take effect; individual events only ever refine that.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};

use super::raw::Raw;
use super::Shared;
use crate::config::Config;
use crate::model::decode::{self, Kind};
use crate::model::from_k8s::SkipReason;
use crate::model::{ClusterState, IpFamily};
use crate::snapshot::describe;

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

/// Malformed objects already reported, by namespace/name, with the resourceVersion
/// reported: a relist (or a resync) of the same bad object is not logged or counted
/// again, a new version of it is.
#[derive(Default)]
struct Reported(HashMap<(String, String), String>);

impl Reported {
    fn report(
        &mut self,
        shared: &Shared,
        kind: Kind,
        ns: &str,
        name: &str,
        version: &str,
        r: Result<(), SkipReason>,
    ) {
        let key = (ns.to_string(), name.to_string());
        match r {
            Err(SkipReason::Invalid(invalid)) => {
                if self.0.get(&key).map(String::as_str) == Some(version) {
                    return;
                }
                let object = describe(
                    kind.as_str(),
                    &serde_json::json!({
                        "metadata": {"namespace": ns, "name": name}
                    }),
                );
                tracing::warn!(object = %object, reason = %invalid, "skipping malformed object");
                shared.metrics.skipped_object(kind.as_str(), invalid.reason);
                shared.health.skipped(super::health::Skipped {
                    object,
                    reason: invalid.reason,
                    message: invalid.message.clone(),
                });
                self.0.insert(key, version.to_string());
            }
            _ => {
                self.0.remove(&key);
            }
        }
    }
}

/// How one kind feeds the cluster state.
struct KindOps<K> {
    /// Slot in the listed flags (`Shared::mark_kind_listed`).
    index: usize,
    /// The first sync may proceed without it (APIs an older server lacks).
    optional: bool,
    /// The kind, for log lines and metrics.
    kind: Kind,
    /// Typed decoding of one object (see `model::decode`).
    decode: fn(serde_json::Value) -> Result<K, SkipReason>,
    apply: fn(&mut ClusterState, &K) -> Result<(), SkipReason>,
    /// Removes an object by namespace and name (also when its new version is malformed:
    /// the old version no longer describes the cluster).
    delete: fn(&mut ClusterState, &str, &str),
    /// Replaces this kind's objects with a relist's (staged in a state of its own).
    adopt: fn(&mut ClusterState, ClusterState),
    /// The change's `last-change-trigger-time`, for network-programming latency.
    trigger: fn(&K) -> Option<(IpFamily, SystemTime)>,
    /// Runs after each change of this kind has reached the state (not under its lock).
    after: fn(&Shared),
}

/// Decodes and applies one object, returning its change trigger time; a malformed
/// object is removed from `st` instead.
fn upsert<K>(
    ops: &KindOps<K>,
    st: &mut ClusterState,
    raw: &Raw<K>,
) -> Result<Option<(IpFamily, SystemTime)>, SkipReason> {
    let (ns, name) = raw.key();
    let r = (ops.decode)(raw.value.clone()).and_then(|o| {
        (ops.apply)(st, &o)?;
        Ok((ops.trigger)(&o))
    });
    if r.is_err() {
        (ops.delete)(st, ns, name);
    }
    r
}

/// Runs one watcher until the process ends. Objects arrive as raw JSON and are decoded
/// one by one, so a malformed object is skipped (logged once, counted) and never fails
/// the list or watch it came in.
async fn watch_kind<K>(
    api: Api<Raw<K>>,
    config: watcher::Config,
    shared: Arc<Shared>,
    ops: KindOps<K>,
) where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    let kind = ops.kind;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut reported = Reported::default();
    let mut relisted: HashSet<(String, String)> = HashSet::new();
    // A relist is converted into a staging state as it arrives (compact model only)
    // and replaces this kind's objects when complete, so deletions missed while
    // disconnected take effect and the old objects keep working until then.
    let mut staging = ClusterState::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => {
                staging = ClusterState::new();
                relisted.clear();
            }
            Ok(Event::InitApply(o)) => {
                let r = upsert(&ops, &mut staging, &o).map(|_| ());
                let (ns, name) = o.key();
                relisted.insert((ns.to_string(), name.to_string()));
                reported.report(&shared, kind, ns, name, o.version(), r);
            }
            Ok(Event::InitDone) => {
                // Bad objects deleted while disconnected are forgotten with the relist.
                reported.0.retain(|k, _| relisted.contains(k));
                relisted.clear();
                let listed = std::mem::take(&mut staging);
                (ops.adopt)(&mut shared.lock().cluster, listed);
                shared.mark_kind_listed(ops.index);
                (ops.after)(&shared);
                shared.changed();
            }
            Ok(Event::Apply(o)) => {
                shared.note_change(ops.index == 1);
                let r = { upsert(&ops, &mut shared.lock().cluster, &o) };
                let r = r.map(|trigger| {
                    if let Some((family, at)) = trigger {
                        shared.trigger(family, at);
                    }
                });
                let (ns, name) = o.key();
                reported.report(&shared, kind, ns, name, o.version(), r);
                (ops.after)(&shared);
                shared.changed();
            }
            Ok(Event::Delete(o)) => {
                shared.note_change(ops.index == 1);
                if let Some((family, at)) = (ops.decode)(o.value.clone())
                    .ok()
                    .as_ref()
                    .and_then(ops.trigger)
                {
                    shared.trigger(family, at);
                }
                let (ns, name) = o.key();
                (ops.delete)(&mut shared.lock().cluster, ns, name);
                reported.0.remove(&(ns.to_string(), name.to_string()));
                (ops.after)(&shared);
                shared.changed();
            }
            Err(e) => {
                tracing::warn!(kind = kind.as_str(), error = %e, "watch error; retrying");
                if ops.optional {
                    // An API the server lacks (e.g. ServiceCIDR before 1.33) must not
                    // hold the first sync back.
                    shared.mark_kind_listed(ops.index);
                }
            }
        }
    }
}

/// Upstream's label selector for both Services and EndpointSlices: objects handled by
/// another service proxy, and headless Services' slices, are not ours.
pub(crate) const PROXIED: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// An EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` and family.
pub(crate) fn slice_trigger_time(slice: &EndpointSlice) -> Option<(IpFamily, SystemTime)> {
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
pub(crate) fn spawn_all(
    rt: &tokio::runtime::Runtime,
    client: Client,
    shared: Arc<Shared>,
    node: String,
) {
    rt.spawn(watch_kind::<Service>(
        Api::all(client.clone()),
        watcher::Config::default().labels(PROXIED),
        Arc::clone(&shared),
        KindOps {
            index: 0,
            optional: false,
            kind: Kind::Service,
            decode: decode::service,
            apply: |st, o| st.upsert_service(o),
            delete: |st, ns, name| {
                st.remove_service(ns, name);
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
        KindOps {
            index: 1,
            optional: false,
            kind: Kind::EndpointSlice,
            decode: decode::endpoint_slice,
            apply: |st, o| st.upsert_slice(o),
            delete: |st, ns, name| {
                st.remove_slice(ns, name);
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
        KindOps {
            index: 2,
            optional: true,
            kind: Kind::Node,
            decode: decode::node,
            apply: |st, o| st.set_node(o),
            delete: |st, _, _| st.clear_node(),
            adopt: ClusterState::adopt_node,
            trigger: |_| None,
            // /healthz follows the Node at once, as upstream's node handler does.
            after: |sh| {
                let eligible = sh.lock().cluster.node().is_some_and(|n| !n.being_deleted);
                sh.health.set_node_eligible(eligible);
            },
        },
    ));
    rt.spawn(watch_kind::<ServiceCIDR>(
        Api::all(client),
        watcher::Config::default(),
        shared,
        KindOps {
            index: 3,
            optional: true,
            kind: Kind::ServiceCidr,
            decode: decode::service_cidr,
            apply: |st, o| st.upsert_service_cidr(o),
            delete: |st, _, name| {
                st.remove_service_cidr(name);
            },
            adopt: ClusterState::adopt_service_cidrs,
            trigger: |_| None,
            after: |_| {},
        },
    ));
}

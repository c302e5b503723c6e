//! Loading a cluster snapshot: `kubectl get … -o yaml` output (a `List`), multi-document
//! YAML, or JSON. Objects that do not parse are skipped with a warning naming them.

use std::io::Read;
use std::path::Path;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::Deserialize;
use serde_json::Value;

use crate::model::from_k8s::{self, SkipReason};
use crate::model::{ClusterState, NodeInfo};

/// Why a snapshot could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file (or stdin) could not be read.
    #[error("reading snapshot {origin}: {source}")]
    Read {
        /// File name or `-`.
        origin: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The text is not YAML/JSON.
    #[error("parsing snapshot {origin}: {message}")]
    Syntax {
        /// File name or `-`.
        origin: String,
        /// What the parser said.
        message: String,
    },
    /// The text is YAML but not Kubernetes objects.
    #[error("snapshot {origin}: document {index} is not a Kubernetes object (no apiVersion/kind)")]
    NotKubernetes {
        /// File name or `-`.
        origin: String,
        /// 1-based document index.
        index: usize,
    },
}

/// One object that was skipped, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Kind namespace/name`.
    pub object: String,
    /// The reason.
    pub reason: String,
}

/// A loaded snapshot: the state plus every object that was skipped as malformed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The cluster state.
    pub state: ClusterState,
    /// Every Node in the snapshot; the caller picks its own (see [`Snapshot::select_node`]).
    pub nodes: Vec<NodeInfo>,
    /// Malformed objects that were skipped.
    pub skipped: Vec<Skipped>,
}

/// Reads a snapshot from a file, or from stdin when `path` is `-`.
pub fn load_path(path: &Path) -> Result<Snapshot, SnapshotError> {
    let origin = path.display().to_string();
    let text = if origin == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|source| SnapshotError::Read {
                origin: origin.clone(),
                source,
            })?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|source| SnapshotError::Read {
            origin: origin.clone(),
            source,
        })?
    };
    load_str(&text, &origin)
}

/// Parses snapshot text.
pub fn load_str(text: &str, origin: &str) -> Result<Snapshot, SnapshotError> {
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(de).map_err(|e| SnapshotError::Syntax {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    let mut snap = Snapshot::default();
    for (i, doc) in docs.into_iter().enumerate() {
        let kind = doc.get("kind").and_then(Value::as_str).map(str::to_string);
        let api = doc.get("apiVersion").and_then(Value::as_str);
        let (Some(kind), Some(_)) = (kind, api) else {
            return Err(SnapshotError::NotKubernetes {
                origin: origin.to_string(),
                index: i + 1,
            });
        };
        if kind.ends_with("List") {
            let items = doc
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                let item_kind = item
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                snap.add(&item_kind, item);
            }
        } else {
            snap.add(&kind, doc);
        }
    }
    Ok(snap)
}

fn describe(kind: &str, v: &Value) -> String {
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Fills fields that the API server always sets but hand-written snapshots (and
/// upstream's test vectors) may omit, so that typed decoding does not fail on them.
fn fill_required(kind: &str, v: &mut Value) {
    if let Value::Object(map) = v {
        map.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if kind == "EndpointSlice" {
            map.entry("endpoints")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(Value::Array(eps)) = map.get_mut("endpoints") {
                for ep in eps {
                    if let Value::Object(e) = ep {
                        e.entry("addresses")
                            .or_insert_with(|| Value::Array(Vec::new()));
                    }
                }
            }
        }
    }
}

impl Snapshot {
    /// Makes the Node named `node_name` this node's Node in the state; with no name,
    /// the only Node of a one-node snapshot is taken. Returns the chosen node's name.
    pub fn select_node(&mut self, node_name: Option<&str>) -> Option<String> {
        let chosen = match node_name {
            Some(name) => self.nodes.iter().find(|n| n.name == name).cloned(),
            None if self.nodes.len() == 1 => self.nodes.first().cloned(),
            None => None,
        };
        let name = chosen.as_ref().map(|n| n.name.clone());
        self.state.set_node_info(chosen);
        name
    }

    fn add(&mut self, kind: &str, mut v: Value) {
        let what = describe(kind, &v);
        fill_required(kind, &mut v);
        let result: Result<(), String> = match kind {
            "Service" => serde_json::from_value::<core::Service>(v)
                .map_err(|e| e.to_string())
                .and_then(|s| self.state.upsert_service(&s).map_err(skip_msg)),
            "EndpointSlice" => serde_json::from_value::<discovery::EndpointSlice>(v)
                .map_err(|e| e.to_string())
                .and_then(|s| self.state.upsert_slice(&s).map_err(skip_msg)),
            "Node" => serde_json::from_value::<core::Node>(v)
                .map_err(|e| e.to_string())
                .and_then(|n| from_k8s::node(&n).map_err(skip_msg))
                .map(|n| self.nodes.push(n)),
            "ServiceCIDR" => serde_json::from_value::<networking::ServiceCIDR>(v)
                .map_err(|e| e.to_string())
                .and_then(|c| self.state.upsert_service_cidr(&c).map_err(skip_msg)),
            _ => {
                tracing::debug!(object = %what, "ignoring object of a kind kproxy does not use");
                Ok(())
            }
        };
        if let Err(reason) = result {
            if !reason.is_empty() {
                tracing::warn!(object = %what, %reason, "skipping malformed object");
                self.skipped.push(Skipped {
                    object: what,
                    reason,
                });
            }
        }
    }
}

/// Ignored objects are not errors: map them to an empty message the caller drops.
fn skip_msg(r: SkipReason) -> String {
    match r {
        SkipReason::Ignored(_) => String::new(),
        SkipReason::Invalid(m) => m,
    }
}

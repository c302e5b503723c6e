//! Loading a cluster snapshot: `kubectl get … -o yaml` output (a `List`), multi-document
//! YAML, or JSON. Objects that do not parse are skipped with a warning naming them.

use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::model::decode::{self, Kind};
use crate::model::from_k8s::{self, SkipReason};
use crate::model::validate;

mod lenient;
mod nesting;

use crate::model::{ClusterState, NodeInfo};
use lenient::{Key, Lenient};

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
    /// Its kind (`Service`, `EndpointSlice`, `Node`, `ServiceCIDR`).
    pub kind: &'static str,
    /// `Kind namespace/name`.
    pub object: String,
    /// Short category, as in the `reason` label of `kproxy_skipped_objects_total`.
    pub(crate) category: &'static str,
    /// What is wrong.
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
    /// Services with a non-empty selector seen (valid or not).
    selector_services: usize,
    /// EndpointSlices seen (valid or not).
    slice_count: usize,
    /// Services skipped as malformed.
    skipped_services: usize,
}

/// Largest snapshot accepted (a 10k-Service cluster is ~20 MB of JSON): bounds the
/// memory a stray file on `--snapshot` can cost.
pub(crate) const MAX_SNAPSHOT_BYTES: usize = 512 << 20;
/// Deepest `[`/`{` nesting accepted. Kubernetes objects nest about 10 levels; the YAML
/// parser's cost grows faster than linearly with depth, so hostile input is refused
/// before it is parsed.
pub(crate) const MAX_NESTING: usize = 128;

/// Reads a snapshot from a file, or from stdin when `path` is `-`.
pub(crate) fn load_path(path: &Path) -> Result<Snapshot, SnapshotError> {
    let origin = path.display().to_string();
    let read_err = |source| SnapshotError::Read {
        origin: origin.clone(),
        source,
    };
    let mut bytes = Vec::new();
    // One byte over the limit is enough to know the input is too large.
    let limit = u64::try_from(MAX_SNAPSHOT_BYTES).unwrap_or(u64::MAX) + 1;
    if origin == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(read_err)?;
    }
    check_size(bytes.len(), &origin)?;
    let text = String::from_utf8(bytes).map_err(|e| SnapshotError::Syntax {
        origin: origin.clone(),
        message: format!("not UTF-8: {}", e.utf8_error()),
    })?;
    load_str(&text, &origin)
}

fn check_size(len: usize, origin: &str) -> Result<(), SnapshotError> {
    if len > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::Syntax {
            origin: origin.to_string(),
            message: format!("larger than {} MiB", MAX_SNAPSHOT_BYTES >> 20),
        });
    }
    Ok(())
}

/// Parses snapshot text: JSON, a YAML `List`, or multi-document YAML.
///
/// Each object is decoded on its own as it is read (a `List`'s items are never all held
/// as generic values at once), so one mistyped field costs only its object, and memory
/// stays close to the compact model's.
pub fn load_str(text: &str, origin: &str) -> Result<Snapshot, SnapshotError> {
    check_size(text.len(), origin)?;
    // kubectl and editors on Windows write a byte-order mark; it is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let syntax = |message: String| SnapshotError::Syntax {
        origin: origin.to_string(),
        message,
    };
    if let Err(at) = nesting::check(text, MAX_NESTING) {
        return Err(syntax(format!(
            "nested deeper than {MAX_NESTING} levels (at byte {at})"
        )));
    }
    let mut snap = Snapshot::default();
    let mut index = 0;
    if text.trim_start().starts_with('{') {
        // JSON (`kubectl -o json`): its own parser is several times faster than YAML's.
        let mut de = serde_json::Deserializer::from_str(text);
        index += 1;
        let doc = DocSeed { snap: &mut snap }
            .deserialize(&mut de)
            .map_err(|e| syntax(e.to_string()))?;
        de.end().map_err(|e| syntax(e.to_string()))?;
        doc.finish(&mut snap, origin, index)?;
    } else {
        for de in serde_yaml_ng::Deserializer::from_str(text) {
            index += 1;
            let doc = DocSeed { snap: &mut snap }
                .deserialize(de)
                .map_err(|e| syntax(e.to_string()))?;
            doc.finish(&mut snap, origin, index)?;
        }
    }
    Ok(snap)
}

/// What is left of a top-level document once its `items` (if any) went into the model.
enum Doc {
    /// An empty document (`---`, comments only, `null`).
    Empty,
    /// A mapping: its fields other than `items`, and whether `items` was present.
    Object {
        fields: serde_json::Map<String, Value>,
        had_items: bool,
    },
    /// Anything else (a scalar or a sequence): not a Kubernetes object.
    Other,
}

impl Doc {
    fn finish(self, snap: &mut Snapshot, origin: &str, index: usize) -> Result<(), SnapshotError> {
        let fields = match self {
            Doc::Empty => return Ok(()),
            Doc::Other => {
                return Err(SnapshotError::NotKubernetes {
                    origin: origin.to_string(),
                    index,
                })
            }
            Doc::Object { fields, had_items } => {
                let kind = fields.get("kind").and_then(Value::as_str);
                let api = fields.get("apiVersion").and_then(Value::as_str);
                match (kind, api) {
                    (Some(kind), Some(_)) if kind.ends_with("List") || had_items => return Ok(()),
                    (Some(_), Some(_)) => fields,
                    _ => {
                        return Err(SnapshotError::NotKubernetes {
                            origin: origin.to_string(),
                            index,
                        })
                    }
                }
            }
        };
        let kind = fields
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        snap.add(&kind, Value::Object(fields));
        Ok(())
    }
}

/// Decodes one top-level document, sending each of its `items` to the model as soon as
/// it is read.
struct DocSeed<'a> {
    snap: &'a mut Snapshot,
}

impl<'de> DeserializeSeed<'de> for DocSeed<'_> {
    type Value = Doc;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Doc, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_> {
    type Value = Doc;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object or List")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::Empty)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Doc, E> {
        Ok(Doc::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Doc, E> {
        Ok(Doc::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Doc, E> {
        Ok(Doc::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Doc, E> {
        Ok(Doc::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Doc, E> {
        Ok(Doc::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Doc::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let mut fields = serde_json::Map::new();
        let mut had_items = false;
        while let Some(key) = map.next_key_seed(Key)? {
            if key == "items" {
                had_items = true;
                map.next_value_seed(ItemsSeed {
                    snap: &mut *self.snap,
                })?;
            } else {
                let v = map.next_value_seed(Lenient)?;
                fields.insert(key, v);
            }
        }
        Ok(Doc::Object { fields, had_items })
    }
}

/// A List's `items`: each element decoded generically, then converted and dropped.
struct ItemsSeed<'a> {
    snap: &'a mut Snapshot,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element_seed(Lenient)? {
            let kind = item
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            self.snap.add(&kind, item);
        }
        Ok(())
    }
}

/// `Kind namespace/name` of a generic object, escaped and cut short for log lines.
pub(crate) fn describe(kind: &str, v: &Value) -> String {
    let meta = v.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    let kind = if kind.is_empty() { "<no kind>" } else { kind };
    let name = field("name")
        .map(plain)
        .unwrap_or_else(|| "<unnamed>".into());
    match field("namespace") {
        Some(ns) => format!("{} {}/{name}", plain(kind), plain(ns)),
        None => format!("{} {name}", plain(kind)),
    }
}

/// A name as it appears in a log line: as is when it is plain, escaped and cut when not.
fn plain(s: &str) -> String {
    let simple = s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if simple {
        s.to_string()
    } else {
        validate::shown(s)
    }
}

/// Why the snapshot's Nodes do not say which one is this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSelectError {
    /// `--hostname-override` (or the config's) names no Node of the snapshot.
    #[error("no Node named {wanted:?} in the snapshot (it has: {})", candidates.join(", "))]
    NotFound {
        /// The name asked for.
        wanted: String,
        /// The snapshot's Node names.
        candidates: Vec<String>,
    },
    /// Several Nodes and no name given.
    #[error("the snapshot has {} Nodes and no --hostname-override chooses one (it has: {})", candidates.len(), candidates.join(", "))]
    Ambiguous {
        /// The snapshot's Node names.
        candidates: Vec<String>,
    },
}

impl Snapshot {
    /// Makes the Node named `node_name` this node's Node in the state; with no name,
    /// the only Node of a one-node snapshot is taken. Returns the chosen node's name,
    /// `None` when the snapshot has no Node at all, and an error when it has Nodes but
    /// none is this node (a typo in `--hostname-override` must not silently fall back
    /// to the machine's hostname and its addresses).
    pub fn select_node(
        &mut self,
        node_name: Option<&str>,
    ) -> Result<Option<String>, NodeSelectError> {
        if self.nodes.is_empty() {
            self.state.set_node_info(None);
            return Ok(None);
        }
        let candidates = || {
            let mut c: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
            c.sort();
            c.dedup();
            c
        };
        let chosen = match node_name {
            Some(name) => self
                .nodes
                .iter()
                .find(|n| n.name == name)
                .cloned()
                .ok_or_else(|| NodeSelectError::NotFound {
                    wanted: name.to_string(),
                    candidates: candidates(),
                })?,
            None if self.nodes.len() == 1 => self.nodes[0].clone(),
            None => {
                return Err(NodeSelectError::Ambiguous {
                    candidates: candidates(),
                })
            }
        };
        let name = chosen.name.clone();
        self.state.set_node_info(Some(chosen));
        Ok(Some(name))
    }

    /// Services that have a selector while the snapshot holds not one EndpointSlice
    /// (`kubectl get svc` alone): rendered, every one of them would reject its traffic.
    /// Returns their count, 0 when the snapshot has slices or no such Service.
    pub(crate) fn selector_services_without_any_slice(&self) -> usize {
        if self.slice_count > 0 {
            return 0;
        }
        self.selector_services
    }

    /// The reason `kproxy apply` must refuse this snapshot unless told otherwise: with
    /// no Services it would remove every Service rule of the node.
    pub(crate) fn refuse_for_apply(&self) -> Option<String> {
        let (services, _) = self.state.counts();
        if services > 0 {
            return None;
        }
        let what = match self.skipped_services {
            0 => "no Services kproxy proxies".to_string(),
            n => format!("no valid Services ({n} skipped as malformed)"),
        };
        Some(format!(
            "the snapshot holds {what}; applying it would remove every Service rule (use --allow-empty to do so)"
        ))
    }

    /// Decodes, validates and converts one object; a malformed one is logged once
    /// (kind, namespace/name, reason) and recorded in `skipped`.
    fn add(&mut self, kind: &str, v: Value) {
        let Some(k) = Kind::parse(kind) else {
            tracing::debug!(object = %describe(kind, &v), "ignoring object of a kind kproxy does not use");
            return;
        };
        let what = describe(kind, &v);
        if k == Kind::Service && has_selector(&v) {
            self.selector_services += 1;
        }
        if k == Kind::EndpointSlice {
            self.slice_count += 1;
        }
        let result = match k {
            Kind::Service => decode::service(v).and_then(|s| self.state.upsert_service(&s)),
            Kind::EndpointSlice => {
                decode::endpoint_slice(v).and_then(|s| self.state.upsert_slice(&s))
            }
            Kind::Node => decode::node(v)
                .and_then(|n| from_k8s::node(&n))
                .map(|n| self.nodes.push(n)),
            Kind::ServiceCidr => {
                decode::service_cidr(v).and_then(|c| self.state.upsert_service_cidr(&c))
            }
        };
        if let Err(SkipReason::Invalid(invalid)) = result {
            tracing::warn!(object = %what, reason = %invalid, "skipping malformed object");
            if k == Kind::Service {
                self.skipped_services += 1;
            }
            self.skipped.push(Skipped {
                kind: k.as_str(),
                object: what,
                category: invalid.reason,
                reason: invalid.message,
            });
        }
    }
}

fn has_selector(v: &Value) -> bool {
    v.get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty())
}

//! Generic JSON values -> the k8s-openapi types kproxy converts, one object at a time.
//!
//! Snapshots and the daemon's watchers both decode here, so that a mistyped field
//! affects only its own object. Fields kproxy never reads are dropped before typed
//! decoding: a Node whose `status.nodeInfo.bootID` is a number is still a usable Node,
//! and a relist does not hold `managedFields` or `last-applied-configuration`
//! annotations of 10,000 objects in memory.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::from_k8s::{SkipReason, TRIGGER_TIME_ANNOTATION};

/// Longest decoding message kept: serde quotes the offending value, which may be huge.
const MESSAGE_MAX: usize = 200;

/// Kinds kproxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// core/v1 Service.
    Service,
    /// discovery/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Node.
    Node,
    /// networking/v1 ServiceCIDR.
    ServiceCidr,
}

impl Kind {
    /// The kind of a `kind` field, if kproxy reads it.
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            "ServiceCIDR" => Some(Kind::ServiceCidr),
            _ => None,
        }
    }

    /// The `kind` spelling, for metrics and log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }
}

/// Decodes a Service.
pub fn service(v: Value) -> Result<core::Service, SkipReason> {
    typed(prune(Kind::Service, v))
}

/// Decodes an EndpointSlice.
pub(crate) fn endpoint_slice(v: Value) -> Result<discovery::EndpointSlice, SkipReason> {
    typed(prune(Kind::EndpointSlice, v))
}

/// Decodes a Node.
pub fn node(v: Value) -> Result<core::Node, SkipReason> {
    typed(prune(Kind::Node, v))
}

/// Decodes a ServiceCIDR.
pub(crate) fn service_cidr(v: Value) -> Result<networking::ServiceCIDR, SkipReason> {
    typed(prune(Kind::ServiceCidr, v))
}

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, SkipReason> {
    serde_json::from_value(v).map_err(|e| SkipReason::invalid("decode", cut(e.to_string())))
}

fn cut(mut s: String) -> String {
    if s.len() > MESSAGE_MAX {
        let mut end = MESSAGE_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn keep(map: &mut Map<String, Value>, fields: &[&str]) {
    map.retain(|k, _| fields.contains(&k.as_str()));
}

fn object<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    match map.get_mut(key) {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Drops what kproxy does not read and fills what the API server always sets but
/// hand-written snapshots (and upstream's test vectors) may omit.
pub(crate) fn prune(kind: Kind, mut v: Value) -> Value {
    let Value::Object(map) = &mut v else {
        return v;
    };
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        keep(
            meta,
            &[
                "name",
                "namespace",
                "labels",
                "annotations",
                "deletionTimestamp",
                "resourceVersion",
            ],
        );
        if let Some(ann) = object(meta, "annotations") {
            ann.retain(|k, _| k == TRIGGER_TIME_ANNOTATION);
        }
    }
    match kind {
        Kind::Service => {
            if let Some(status) = object(map, "status") {
                keep(status, &["loadBalancer"]);
            }
        }
        Kind::Node => {
            if let Some(spec) = object(map, "spec") {
                keep(spec, &["podCIDR", "podCIDRs", "taints"]);
            }
            if let Some(status) = object(map, "status") {
                keep(status, &["addresses"]);
            }
        }
        Kind::EndpointSlice => {
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
        Kind::ServiceCidr => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unused_mistyped_node_fields_do_not_matter() {
        let n = node(json!({
            "metadata": {"name": "n1", "managedFields": 7},
            "status": {"nodeInfo": {"bootID": 1}, "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
        }))
        .unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
    }

    #[test]
    fn used_mistyped_fields_are_a_decode_error_with_a_short_message() {
        let long = "e".repeat(1 << 20);
        let err = service(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"ports": [{"port": long}]},
        }))
        .unwrap_err();
        match err {
            SkipReason::Invalid(i) => {
                assert_eq!(i.reason, "decode");
                assert!(i.message.len() < 300, "{}", i.message.len());
            }
            other => panic!("{other:?}"),
        }
    }
}

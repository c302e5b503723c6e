//! A watched object kept as raw JSON until kproxy converts it.
//!
//! kube-rs decodes a whole list page (and every watch event) into the watched type; had
//! that type been `Service`, one Service with `"port": "eighty"` would fail every relist
//! and stall all Services forever. `Raw<K>` accepts any JSON object, reads only the
//! metadata the watcher itself needs (leniently), and leaves typed decoding to
//! [`crate::model::decode`], one object at a time.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A watched object of kind `K`, undecoded.
pub(crate) struct Raw<K> {
    metadata: ObjectMeta,
    /// The object as the API server sent it.
    pub(crate) value: Value,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Raw<K> {
    /// Namespace ("" for cluster-scoped objects) and name.
    pub(crate) fn key(&self) -> (&str, &str) {
        (
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }

    /// resourceVersion, "" when absent.
    pub(crate) fn version(&self) -> &str {
        self.metadata
            .resource_version
            .as_deref()
            .unwrap_or_default()
    }
}

impl<K> Clone for Raw<K> {
    fn clone(&self) -> Self {
        Raw {
            metadata: self.metadata.clone(),
            value: self.value.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for Raw<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the whole object: a hostile one may be megabytes.
        let (ns, name) = self.key();
        write!(f, "Raw({ns}/{name})")
    }
}

fn string(meta: Option<&Value>, field: &str) -> Option<String> {
    meta?.get(field)?.as_str().map(str::to_string)
}

impl<'de, K> Deserialize<'de> for Raw<K> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(de)?;
        let meta = value.get("metadata");
        let metadata = ObjectMeta {
            name: string(meta, "name"),
            namespace: string(meta, "namespace"),
            resource_version: string(meta, "resourceVersion"),
            uid: string(meta, "uid"),
            ..ObjectMeta::default()
        };
        Ok(Raw {
            metadata,
            value,
            _kind: PhantomData,
        })
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Raw<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn any_object_decodes_and_keeps_its_identity() {
        let list: kube::core::ObjectList<Raw<Service>> = serde_json::from_str(
            r#"{"metadata": {"resourceVersion": "9"}, "items": [
                {"metadata": {"name": "bad", "namespace": "ns", "resourceVersion": "3"},
                 "spec": {"ports": [{"port": "eighty"}]}},
                {"metadata": {"name": 7}, "spec": {}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.items[0].key(), ("ns", "bad"));
        assert_eq!(list.items[0].version(), "3");
        assert_eq!(list.items[1].key(), ("", ""));
        assert_eq!(<Raw<Service> as Resource>::plural(&()), "services");
    }
}

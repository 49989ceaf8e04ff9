//! Pieces shared by several kinds: selectors, target references, status, and the
//! schema helpers for fields Ambit recognises without modelling.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// `selector` / `workloadSelector`: `matchLabels`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelectorSpec {
    /// Labels a workload must carry, all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// A policy target reference (`targetRef`, `targetRefs[]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group of the target (`""` for core, `gateway.networking.k8s.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the target: `Service` or `Gateway`.
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target; must be the policy's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The `status` of a resource (conditions, validation messages), kept opaque: Ambit
/// writes its own conditions with server-side apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpaqueStatus(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for OpaqueStatus {
    fn schema_name() -> Cow<'static, str> {
        "OpaqueStatus".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
    }
}

/// A field Ambit recognises but does not model (its presence is reported by
/// validation). Any JSON object is accepted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AnyObject(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for AnyObject {
    fn schema_name() -> Cow<'static, str> {
        "AnyObject".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
    }
}

/// A map key that is a port number, written as a YAML integer (`8080:`) or, as JSON
/// requires, a string (`"8080":`). Kept as written; validation checks the range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey(pub String);

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for PortKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                Ok(PortKey(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for PortKey {
    fn schema_name() -> Cow<'static, str> {
        "PortKey".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string" })
    }
}

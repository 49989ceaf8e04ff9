//! YAML documents to typed resources.
//!
//! A file is split into documents on `---`/`...` lines before any parsing, so a syntax
//! error in one document does not hide the others. Each document is parsed to a YAML
//! value (syntax errors carry the file's line and column), its header (`apiVersion`,
//! `kind`, `metadata.name`) is read, and it is deserialized into the kind's type with
//! the path of any type error recorded (`spec.rules[0].from[0].source.ipBlocks`).

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::{
    AuthorizationPolicy, DestinationRule, GATEWAY_API_GROUP, GRPCRoute, Gateway, HTTPRoute,
    ISTIO_NETWORKING_GROUP, ISTIO_SECURITY_GROUP, IgnoredDocument, ParsedDocument, ParsedResource,
    PeerAuthentication, RejectedDocument, Resource, ResourceKind, VirtualService,
};
use crate::diagnostics::{FieldPath, Origin, Rejection};

/// Parses every document of a YAML file. `source` names the file in messages.
///
/// Empty documents (blank, comments only, or `null`) are skipped; every other document
/// yields exactly one [`ParsedDocument`], in file order.
pub fn parse_documents(source: &str, text: &str) -> Vec<ParsedDocument> {
    split_documents(text)
        .into_iter()
        .enumerate()
        .filter_map(|(i, chunk)| {
            let origin = Origin {
                source: source.to_owned(),
                document: i + 1,
                line: chunk.first_line,
            };
            parse_document(origin, &chunk)
        })
        .collect()
}

/// One document's text and the file line it starts on.
struct Chunk {
    first_line: usize,
    text: String,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

fn split_documents(text: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut current = Chunk {
        first_line: 1,
        text: String::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if is_marker(line, "---") || is_marker(line, "...") {
            chunks.push(std::mem::replace(
                &mut current,
                Chunk {
                    first_line: line_no,
                    text: String::new(),
                },
            ));
            // Content after `--- ` on the same line belongs to the new document; keep
            // its columns by blanking the marker.
            let rest = &line[3..];
            if line.starts_with("---") && !rest.trim().is_empty() {
                current.text.push_str("   ");
                current.text.push_str(rest);
            }
            current.text.push('\n');
        } else {
            current.text.push_str(line);
            current.text.push('\n');
        }
    }
    chunks.push(current);
    chunks
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// What could be read of a document's identity.
#[derive(Default)]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl Header {
    fn reject(&self, origin: &Origin, field: FieldPath, reason: impl Into<String>) -> Rejection {
        Rejection {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field,
            reason: reason.into(),
            origin: Some(origin.clone()),
        }
    }
}

fn parse_document(origin: Origin, chunk: &Chunk) -> Option<ParsedDocument> {
    if is_blank(&chunk.text) {
        return None;
    }
    let rejected = |rejection, raw| {
        Some(ParsedDocument::Rejected(RejectedDocument {
            rejection,
            raw,
        }))
    };
    let mut value: Value = match serde_yaml::from_str(&chunk.text) {
        Ok(v) => v,
        Err(e) => {
            // The chunk's first line is the marker line or line 1; its own line numbers
            // start at 1 on `first_line`.
            let msg = file_positions(&e.to_string(), chunk.first_line);
            let reason = match e.location() {
                Some(loc) if !msg.contains(" at line ") => format!(
                    "YAML syntax error: {msg} at line {} column {}",
                    chunk.first_line + loc.line() - 1,
                    loc.column()
                ),
                _ => format!("YAML syntax error: {msg}"),
            };
            // The header and the policy action are still read line by line, so that
            // a broken security policy keeps its fail-closed stand-in: an ALLOW
            // policy that vanished on a typo would open its namespace.
            let (header, raw) = salvage_header(&chunk.text);
            let r = header.reject(&origin, FieldPath::root(), reason);
            return rejected(r, raw);
        }
    };
    if let Err(e) = value.apply_merge() {
        let r = Header::default().reject(
            &origin,
            FieldPath::root(),
            format!("invalid YAML merge key: {e}"),
        );
        return rejected(r, None);
    }
    if value.is_null() {
        return None;
    }
    Some(parse_tree(origin, value))
}

/// Reads `apiVersion`, `kind`, `metadata.name`, `metadata.namespace` and `spec.action`
/// from a document that is not valid YAML, by lines: top-level keys at column 0 and
/// their first-level children. Returns the header and, when `kind` was found, a
/// minimal tree with just those fields for the fail-closed stand-in. Flow-style or
/// otherwise unusual layouts yield less; never more than the text says.
fn salvage_header(text: &str) -> (Header, Option<Value>) {
    fn scalar(v: &str) -> Option<String> {
        let v = v.split(" #").next().unwrap_or(v).trim();
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        let plain = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/' | '_'));
        plain.then(|| v.to_owned())
    }
    let mut header = Header::default();
    let mut action = None;
    let mut section = "";
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let indented = line.starts_with([' ', '\t']);
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        if !indented {
            section = key;
            match key {
                "apiVersion" => header.api_version = scalar(value),
                "kind" => header.kind = scalar(value),
                _ => {}
            }
            continue;
        }
        match (section, key) {
            ("metadata", "name") => header.name = header.name.take().or(scalar(value)),
            ("metadata", "namespace") => {
                header.namespace = header.namespace.take().or(scalar(value));
            }
            ("spec", "action") => action = action.or(scalar(value)),
            _ => {}
        }
    }
    let raw = header.kind.as_ref().map(|kind| {
        let mut doc = serde_yaml::Mapping::new();
        if let Some(a) = &header.api_version {
            doc.insert("apiVersion".into(), a.as_str().into());
        }
        doc.insert("kind".into(), kind.as_str().into());
        if let Some(action) = &action {
            let mut spec = serde_yaml::Mapping::new();
            spec.insert("action".into(), action.as_str().into());
            doc.insert("spec".into(), Value::Mapping(spec));
        }
        Value::Mapping(doc)
    });
    (header, raw)
}

/// Parses one object already in tree form (a Kubernetes watch event, say), exactly as
/// a YAML document with the same content would be: the same rejections, naming the
/// same fields. `origin` names where it came from in messages.
///
/// Unlike [`parse_documents`], a `null` value is not skipped: it is rejected.
pub fn parse_value(origin: Origin, value: serde_json::Value) -> ParsedDocument {
    match serde_yaml::to_value(value) {
        Ok(value) => parse_tree(origin, value),
        // A JSON value always has a YAML form; keep the message if that ever changes.
        Err(e) => ParsedDocument::Rejected(RejectedDocument {
            rejection: Header::default().reject(
                &origin,
                FieldPath::root(),
                format!("the object cannot be represented as YAML: {e}"),
            ),
            raw: None,
        }),
    }
}

/// Everything after reading the text: header, kind, version and typing.
fn parse_tree(origin: Origin, value: Value) -> ParsedDocument {
    let rejected = |rejection, raw| {
        ParsedDocument::Rejected(RejectedDocument {
            rejection,
            raw: Some(raw),
        })
    };
    let map = match &value {
        Value::Mapping(m) => m,
        other => {
            let r = Header::default().reject(
                &origin,
                FieldPath::root(),
                format!(
                    "the document is {}, expected a mapping with apiVersion, kind and metadata",
                    describe(other)
                ),
            );
            return rejected(r, value);
        }
    };
    let (header, problem) = read_header(map);
    if let Some((field, reason)) = problem {
        let r = header.reject(&origin, field, reason);
        return rejected(r, value);
    }
    // read_header guarantees both on success.
    let (Some(api_version), Some(kind)) = (header.api_version.clone(), header.kind.clone()) else {
        let r = header.reject(&origin, FieldPath::root(), "apiVersion or kind is missing");
        return rejected(r, value);
    };
    let (group, version) = match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version.as_str()),
    };
    let Some(rk) = ResourceKind::lookup(group, &kind) else {
        return unknown_kind(origin, &header, group, &api_version, &kind, value);
    };
    if !rk.versions().contains(&version) {
        let r = header.reject(
            &origin,
            FieldPath::parse("apiVersion"),
            format!(
                "{kind} is not supported in version `{version}` of {} (supported: {})",
                if group.is_empty() {
                    "the core API"
                } else {
                    group
                },
                rk.versions().join(", ")
            ),
        );
        return rejected(r, value);
    }
    let mut header = header;
    if rk.namespaced() && header.namespace.is_none() {
        header.namespace = Some("default".to_owned());
    }
    match typed(rk, map, &header) {
        Ok(resource) => ParsedDocument::Resource(ParsedResource {
            origin,
            api_version,
            resource,
        }),
        Err((field, reason)) => {
            let r = header.reject(&origin, field, reason);
            rejected(r, value)
        }
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Rewrites serde_yaml's "line N" (relative to the document) into lines of the file.
fn file_positions(msg: &str, first_line: usize) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("line ") {
        let (before, after) = rest.split_at(i + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if n > 0 => out.push_str(&(first_line + n - 1).to_string()),
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

type Problem = (FieldPath, String);

fn read_header(map: &Mapping) -> (Header, Option<Problem>) {
    let mut h = Header::default();
    let mut problem: Option<Problem> = None;
    let note = |p: &mut Option<Problem>, field: &str, reason: String| {
        if p.is_none() {
            *p = Some((FieldPath::parse(field), reason));
        }
    };
    for field in ["apiVersion", "kind"] {
        match map.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                let slot = if field == "kind" {
                    &mut h.kind
                } else {
                    &mut h.api_version
                };
                *slot = Some(s.clone());
            }
            None | Some(Value::Null) => {
                note(&mut problem, field, "required field is missing".into())
            }
            Some(Value::String(_)) => note(&mut problem, field, "must not be empty".into()),
            Some(v) => note(
                &mut problem,
                field,
                format!("must be a string, found {}", describe(v)),
            ),
        }
    }
    match map.get("metadata") {
        Some(Value::Mapping(meta)) => {
            if let Some(Value::String(ns)) = meta.get("namespace") {
                h.namespace = Some(ns.clone());
            }
            match meta.get("name") {
                Some(Value::String(n)) if !n.trim().is_empty() => h.name = Some(n.clone()),
                None | Some(Value::Null) => {
                    let reason = if meta.contains_key("generateName") {
                        "required field is missing (generateName is not supported outside the API server)"
                    } else {
                        "required field is missing"
                    };
                    note(&mut problem, "metadata.name", reason.into());
                }
                Some(Value::String(_)) => {
                    note(&mut problem, "metadata.name", "must not be empty".into())
                }
                Some(v) => note(
                    &mut problem,
                    "metadata.name",
                    format!("must be a string, found {}", describe(v)),
                ),
            }
            match meta.get("namespace") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(v) => note(
                    &mut problem,
                    "metadata.namespace",
                    format!("must be a string, found {}", describe(v)),
                ),
            }
        }
        None | Some(Value::Null) => note(
            &mut problem,
            "metadata.name",
            "required field is missing (no metadata)".into(),
        ),
        Some(v) => note(
            &mut problem,
            "metadata",
            format!("must be a mapping, found {}", describe(v)),
        ),
    }
    (h, problem)
}

fn unknown_kind(
    origin: Origin,
    header: &Header,
    group: &str,
    api_version: &str,
    kind: &str,
    value: Value,
) -> ParsedDocument {
    let ours = [
        ISTIO_SECURITY_GROUP,
        ISTIO_NETWORKING_GROUP,
        GATEWAY_API_GROUP,
    ];
    if group == GATEWAY_API_GROUP && kind == "GatewayClass" {
        return ignored(
            origin,
            header,
            api_version,
            kind,
            "GatewayClass objects are not needed: the ambit-waypoint class is built in",
        );
    }
    if ours.contains(&group) {
        // Mesh configuration the operator expects to take effect: saying it does not
        // is better than silently ignoring it (RequestAuthentication, for one, would
        // refuse requests that Ambit would let through).
        let supported: Vec<&str> = ResourceKind::ALL
            .iter()
            .filter(|k| k.group() == group)
            .map(|k| k.kind())
            .collect();
        let r = header.reject(
            &origin,
            FieldPath::parse("kind"),
            format!(
                "{kind} ({group}) is not supported by Ambit (supported in this group: {})",
                supported.join(", ")
            ),
        );
        return ParsedDocument::Rejected(RejectedDocument {
            rejection: r,
            raw: Some(value),
        });
    }
    ignored(origin, header, api_version, kind, "not a kind Ambit reads")
}

fn ignored(
    origin: Origin,
    header: &Header,
    api_version: &str,
    kind: &str,
    note: &str,
) -> ParsedDocument {
    ParsedDocument::Ignored(IgnoredDocument {
        origin,
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        namespace: header.namespace.clone(),
        name: header.name.clone(),
        note: note.to_owned(),
    })
}

/// Deserializes `value` as `T`, reporting a type error at its path under `prefix`.
fn deserialize_at<T: DeserializeOwned>(prefix: &FieldPath, value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = prefix.clone();
        for seg in e.path().iter() {
            path = match seg {
                serde_path_to_error::Segment::Seq { index } => path.index(*index),
                serde_path_to_error::Segment::Map { key } => path.key(key),
                serde_path_to_error::Segment::Enum { variant } => path.field(variant),
                serde_path_to_error::Segment::Unknown => path,
            };
        }
        let msg = e.inner().to_string();
        // "missing field `x`" is reported at the parent; name the field itself.
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            return (path.field(field), "required field is missing".to_owned());
        }
        if msg.starts_with("unknown field") {
            return (
                path,
                format!("{msg}; a field Ambit does not know is refused rather than ignored"),
            );
        }
        (path, msg)
    })
}

const CRD_TOP_LEVEL: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

fn typed(kind: ResourceKind, map: &Mapping, header: &Header) -> Result<Resource, Problem> {
    let root = FieldPath::root();
    let whole = || Value::Mapping(map.clone());
    let with_ns = |mut meta: ObjectMeta| {
        meta.namespace = header.namespace.clone();
        meta
    };
    macro_rules! core {
        ($variant:ident, $ty:ty) => {{
            let mut obj: Box<$ty> = Box::new(deserialize_at(&root, whole())?);
            fix_namespace(&mut obj.metadata, kind, header);
            Ok(Resource::$variant(obj))
        }};
    }
    macro_rules! custom {
        ($variant:ident, $ty:ident) => {{
            let (meta, spec) = crd_parts(map)?;
            let metadata = with_ns(meta);
            Ok(Resource::$variant(Box::new($ty {
                metadata,
                spec: deserialize_at(&FieldPath::parse("spec"), spec)?,
                status: None,
            })))
        }};
    }
    match kind {
        ResourceKind::Namespace => core!(Namespace, Namespace),
        ResourceKind::Node => core!(Node, Node),
        ResourceKind::Pod => core!(Pod, Pod),
        ResourceKind::Service => core!(Service, Service),
        ResourceKind::ServiceAccount => core!(ServiceAccount, ServiceAccount),
        ResourceKind::EndpointSlice => core!(EndpointSlice, EndpointSlice),
        ResourceKind::PeerAuthentication => custom!(PeerAuthentication, PeerAuthentication),
        ResourceKind::AuthorizationPolicy => custom!(AuthorizationPolicy, AuthorizationPolicy),
        ResourceKind::VirtualService => custom!(VirtualService, VirtualService),
        ResourceKind::DestinationRule => custom!(DestinationRule, DestinationRule),
        ResourceKind::HttpRoute => custom!(HttpRoute, HTTPRoute),
        ResourceKind::GrpcRoute => custom!(GrpcRoute, GRPCRoute),
        ResourceKind::Gateway => custom!(Gateway, Gateway),
    }
}

fn fix_namespace(meta: &mut ObjectMeta, kind: ResourceKind, header: &Header) {
    if kind.namespaced() {
        meta.namespace = header.namespace.clone();
    }
}

/// The metadata and the spec (an empty mapping when absent) of a custom resource,
/// refusing unknown top-level fields (a misspelt `spec` must not pass as "no rules").
fn crd_parts(map: &Mapping) -> Result<(ObjectMeta, Value), Problem> {
    for key in map.keys() {
        let name = key.as_str().unwrap_or("<non-string key>");
        if !CRD_TOP_LEVEL.contains(&name) {
            return Err((
                FieldPath::parse(name),
                "unknown top-level field (expected apiVersion, kind, metadata, spec, status)"
                    .to_owned(),
            ));
        }
    }
    let meta = map.get("metadata").cloned().unwrap_or(Value::Null);
    let meta: ObjectMeta = deserialize_at(&FieldPath::parse("metadata"), meta)?;
    let spec = match map.get("spec") {
        None | Some(Value::Null) => Value::Mapping(Mapping::new()),
        Some(v) => v.clone(),
    };
    Ok((meta, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_parsed_like_yaml() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {action: DENY, rules: {from: []}}\n";
        let from_yaml = parse_documents("k", yaml);
        let json: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        let origin = Origin {
            source: "k".into(),
            document: 1,
            line: 1,
        };
        assert_eq!(from_yaml, vec![parse_value(origin.clone(), json)]);
        let ParsedDocument::Rejected(r) = &from_yaml[0] else {
            panic!("accepted: {from_yaml:?}");
        };
        assert_eq!(r.rejection.field.as_str(), "spec.rules");
        assert!(matches!(
            parse_value(origin, serde_json::Value::Null),
            ParsedDocument::Rejected(_)
        ));
    }

    #[test]
    fn splits_documents_and_keeps_lines() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n...\n";
        let chunks = split_documents(text);
        let firsts: Vec<usize> = chunks.iter().map(|c| c.first_line).collect();
        assert_eq!(firsts, vec![1, 2, 4, 6]);
        assert!(is_blank(&chunks[3].text));
        assert!(chunks[2].text.contains("c: 3"));
        assert!(!is_marker("----", "---"));
        assert!(is_marker("---", "---"));
        assert_eq!(
            file_positions("x at line 3 column 1, while y at line 1 column 6", 26),
            "x at line 28 column 1, while y at line 26 column 6"
        );
    }
}

//! What the controller tells operators about their objects: where a document came from,
//! which field is wrong and why ([`Rejection`]), and what is accepted with a caveat
//! ([`Warning`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A path to a field of a document, in the form operators read in `kubectl explain`:
/// `spec.rules[0].from[0].source.ipBlocks[1]`. The empty path is the whole document.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FieldPath(String);

impl FieldPath {
    /// The whole document.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// A path given as text (e.g. `spec.action`).
    pub fn parse(path: &str) -> Self {
        Self(path.to_owned())
    }

    /// This path followed by a field name.
    #[must_use]
    pub fn field(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_owned())
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    /// This path followed by a list index.
    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    /// This path followed by a map key (written like a field: `portLevelMtls.8080`,
    /// or bracketed when the key itself contains dots: `headers[x.y]`).
    #[must_use]
    pub fn key(&self, key: &str) -> Self {
        if key.contains('.') || key.is_empty() {
            Self(format!("{}[{key}]", self.0))
        } else {
            self.field(key)
        }
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the whole document.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("<document>")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// Where a document came from: a file (or watch source) and its position in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The file path (local mode) or another source label (`kubernetes`).
    pub source: String,
    /// Index of the document in the file, from 1.
    pub document: usize,
    /// Line of the file where the document starts, from 1.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (document {})",
            self.source, self.line, self.document
        )
    }
}

/// Why (part of) an object is refused: which object, which field, what is wrong.
///
/// `kind`, `namespace` and `name` are whatever could be read from the document, so
/// even a document that is barely YAML is reported against something recognisable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// `apiVersion`, when readable.
    pub api_version: Option<String>,
    /// `kind`, when readable.
    pub kind: Option<String>,
    /// `metadata.namespace` (defaulted), when readable.
    pub namespace: Option<String>,
    /// `metadata.name`, when readable.
    pub name: Option<String>,
    /// The offending field.
    pub field: FieldPath,
    /// What is wrong with it, in plain words.
    pub reason: String,
    /// The document it was found in.
    pub origin: Option<Origin>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        let kind = self.kind.as_deref().unwrap_or("<unknown kind>");
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => write!(f, "{kind} {ns}/{n}")?,
            (None, Some(n)) => write!(f, "{kind} {n}")?,
            _ => write!(f, "{kind}")?,
        }
        write!(f, ": {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for Rejection {}

/// Something accepted with a caveat the operator should know (an ignored field, a rule
/// that can never match where it is enforced, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    /// The field concerned.
    pub field: FieldPath,
    /// The caveat, in plain words.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

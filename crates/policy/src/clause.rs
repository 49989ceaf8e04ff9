//! Authorization rules in the normalised form the wire protocol carries
//! (`ambit.config.v1.Authorization`, see `proto/ambit/config/v1/security.proto`): a rule
//! is a conjunction of clauses, a clause a disjunction of matches, a match a
//! conjunction of attribute tests.
//!
//! The controller translates [`crate::authz::AuthzRule`]s into this form for each
//! enforcement point, removing the attributes that point cannot evaluate and listing
//! them in [`ClauseRule::unenforceable_fields`]; [`crate::wire`] converts what a proxy
//! receives into these types, and [`crate::authz::authorize`] decides with them. The
//! evaluation uses the model's three-valued logic and attribute tests, so a translated
//! policy decides exactly as the model policy it came from:
//!
//! - an attribute the request does not carry (every HTTP attribute on a plain
//!   connection) is unknown, and an unknown never widens access;
//! - a rule with unenforceable fields never matches in an ALLOW policy, and is decided
//!   on its remaining clauses in DENY and AUDIT policies (it then matches more traffic
//!   than written: fail closed);
//! - at L4 (no request), an ALLOW rule that tests any HTTP attribute never matches.

use std::{fmt, net::IpAddr};

use regex::Regex;

use crate::{
    authz::{
        AuthzAction, AuthzScope, ConnectionAttrs, MatchPolicy, PathPattern, PolicyTarget,
        strip_port,
    },
    tri::{Tri, field},
    types::{Cidr, ObjectId, PortNumber, StringMatch, WorkloadRef},
};

/// An authorization policy as a proxy enforces it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClausePolicy {
    /// The AuthorizationPolicy it was translated from (no creation time).
    pub id: ObjectId,
    /// What it applies to.
    pub scope: AuthzScope,
    /// What it does.
    pub action: AuthzAction,
    /// Its rules; the policy matches when any rule matches. No rules: never matches.
    pub rules: Vec<ClauseRule>,
}

/// One rule: every clause must match; no clauses matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClauseRule {
    /// The clauses (AND).
    pub clauses: Vec<Clause>,
    /// Fields of the source rule the enforcing proxy cannot evaluate (paths into the
    /// Istio object, for logs); non-empty makes an ALLOW rule never match.
    pub unenforceable_fields: Vec<String>,
}

/// A clause: any match must match; no matches never matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Clause {
    /// The alternatives (OR).
    pub matches: Vec<AttrMatch>,
}

/// A conjunction of attribute tests: every non-empty field must hold. A positive field
/// holds when the attribute matches any listed value, a `not_` field when it matches
/// none. Without a peer identity `principals` and `namespaces` are absent: a positive
/// field on them does not hold, a `not_` field does.
#[derive(Clone, Debug, Default, PartialEq)]
#[expect(
    missing_docs,
    reason = "fields mirror the wire protocol's Match one to one"
)]
pub struct AttrMatch {
    pub principals: Vec<TextMatch>,
    pub not_principals: Vec<TextMatch>,
    pub namespaces: Vec<TextMatch>,
    pub not_namespaces: Vec<TextMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<PortNumber>,
    pub not_destination_ports: Vec<PortNumber>,
    // L7: unknown on a connection without a request.
    pub remote_ips: Vec<Cidr>,
    pub not_remote_ips: Vec<Cidr>,
    pub hosts: Vec<TextMatch>,
    pub not_hosts: Vec<TextMatch>,
    pub methods: Vec<TextMatch>,
    pub not_methods: Vec<TextMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
    pub request_headers: Vec<HeaderCondition>,
}

/// A string test of the wire protocol (`ambit.config.v1.StringMatch`).
#[derive(Clone, Debug, PartialEq)]
pub enum TextMatch {
    /// Exact, prefix, suffix or presence (Istio's wildcard forms).
    Pattern {
        /// The pattern.
        pattern: StringMatch,
        /// Compare ASCII case-insensitively.
        ignore_case: bool,
    },
    /// A regular expression that must match the whole value.
    Regex(FullRegex),
    /// A matcher the proxy did not understand (no kind on the wire): never matches.
    Never,
}

/// A regular expression anchored to the whole value; compares by its source text.
#[derive(Clone, Debug)]
pub struct FullRegex {
    source: String,
    ignore_case: bool,
    regex: Regex,
}

/// A `paths` test: a path template, or a string test on the path without its query.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    /// `{*}` / `{**}` template.
    Template(PathPattern),
    /// Any other string test.
    Text(TextMatch),
}

/// A condition on one request header (`when: request.headers[…]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderCondition {
    /// Header name, lower case.
    pub name: String,
    /// Accepted values (any).
    pub values: Vec<TextMatch>,
    /// Refused values (none may match).
    pub not_values: Vec<TextMatch>,
}

impl FullRegex {
    /// Compiles `source` so that it must match an entire value.
    pub fn new(source: &str, ignore_case: bool) -> Result<Self, regex::Error> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .case_insensitive(ignore_case)
            .build()?;
        Ok(Self {
            source: source.to_owned(),
            ignore_case,
            regex,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.ignore_case == other.ignore_case
    }
}

impl fmt::Display for FullRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl TextMatch {
    /// A case-sensitive pattern.
    pub fn pattern(pattern: StringMatch) -> Self {
        Self::Pattern {
            pattern,
            ignore_case: false,
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Pattern {
                pattern,
                ignore_case: false,
            } => pattern.matches(value),
            Self::Pattern {
                pattern,
                ignore_case: true,
            } => pattern.matches_ignore_case(value),
            Self::Regex(r) => r.is_match(value),
            Self::Never => false,
        }
    }
}

impl PathMatch {
    /// Whether a request path matches (its query string and fragment ignored).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Template(t) => t.matches(path),
            Self::Text(m) => m.matches(path.split(['?', '#']).next().unwrap_or(path)),
        }
    }
}

impl HeaderCondition {
    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let Some(req) = conn.request.as_ref() else {
            return Tri::Unknown;
        };
        let mut instances = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(&self.name))
            .map(|(_, v)| v.as_str());
        if self.values.is_empty() && self.not_values.is_empty() {
            // Nothing to compare: the condition asks for the header's presence.
            return Tri::from_bool(instances.next().is_some());
        }
        let values: Vec<&str> = instances.collect();
        field(&self.values, &self.not_values, |m| {
            Tri::from_bool(values.iter().any(|v| m.matches(v)))
        })
    }
}

impl AttrMatch {
    /// Whether any HTTP attribute is tested (unknown on a plain connection).
    pub fn names_l7(&self) -> bool {
        !(self.remote_ips.is_empty()
            && self.not_remote_ips.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.request_headers.is_empty())
    }

    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let principal = conn.source.as_ref().map(|s| s.principal());
        let namespace = conn.source.as_ref().map(|s| s.namespace.as_str());
        let req = conn.request.as_ref();
        let ip = |ip: IpAddr| move |c: &Cidr| Tri::from_bool(c.contains(ip));
        let remote_ip = req.map(|r| r.remote_ip.unwrap_or(conn.source_ip));
        field(&self.principals, &self.not_principals, |m| {
            Tri::from_bool(principal.as_deref().is_some_and(|p| m.matches(p)))
        })
        .and(field(&self.namespaces, &self.not_namespaces, |m| {
            Tri::from_bool(namespace.is_some_and(|n| m.matches(n)))
        }))
        .and(field(
            &self.source_ips,
            &self.not_source_ips,
            ip(conn.source_ip),
        ))
        .and(field(
            &self.destination_ips,
            &self.not_destination_ips,
            ip(conn.destination_ip),
        ))
        .and(field(
            &self.destination_ports,
            &self.not_destination_ports,
            |p| Tri::from_bool(p.get() == conn.destination_port),
        ))
        .and(field(&self.remote_ips, &self.not_remote_ips, |c| {
            remote_ip.map_or(Tri::Unknown, |ip| Tri::from_bool(c.contains(ip)))
        }))
        .and(field(&self.hosts, &self.not_hosts, |m| {
            req.map_or(Tri::Unknown, |r| {
                Tri::from_bool(m.matches(&r.host) || m.matches(strip_port(&r.host)))
            })
        }))
        .and(field(&self.methods, &self.not_methods, |m| {
            req.map_or(Tri::Unknown, |r| Tri::from_bool(m.matches(&r.method)))
        }))
        .and(field(&self.paths, &self.not_paths, |m| {
            req.map_or(Tri::Unknown, |r| Tri::from_bool(m.matches(&r.path)))
        }))
        .and(
            self.request_headers
                .iter()
                .fold(Tri::Yes, |acc, h| acc.and(h.eval(conn))),
        )
    }
}

impl Clause {
    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        self.matches
            .iter()
            .fold(Tri::No, |acc, m| acc.or(m.eval(conn)))
    }
}

impl ClauseRule {
    /// Whether any clause tests an HTTP attribute.
    pub fn names_l7(&self) -> bool {
        self.clauses
            .iter()
            .any(|c| c.matches.iter().any(AttrMatch::names_l7))
    }

    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        self.clauses
            .iter()
            .fold(Tri::Yes, |acc, c| acc.and(c.eval(conn)))
    }
}

impl ClausePolicy {
    /// Whether this policy applies to a workload at the node daemon.
    pub fn selects_workload(&self, workload: &WorkloadRef) -> bool {
        self.scope.selects_workload(workload)
    }

    /// Whether this policy is attached to `target` (waypoint enforcement).
    pub fn targets(&self, target: &PolicyTarget) -> bool {
        self.scope.targets(target)
    }

    /// Whether the policy matches the connection (module docs).
    pub fn matches(&self, conn: &ConnectionAttrs) -> bool {
        let at_l4 = conn.request.is_none();
        self.rules.iter().any(|rule| match self.action {
            AuthzAction::Allow => {
                if !rule.unenforceable_fields.is_empty() || (at_l4 && rule.names_l7()) {
                    return false;
                }
                rule.eval(conn) == Tri::Yes
            }
            // Unenforceable fields were removed: the rest decides, matching more.
            AuthzAction::Deny | AuthzAction::Audit => rule.eval(conn) != Tri::No,
        })
    }
}

impl MatchPolicy for ClausePolicy {
    fn id(&self) -> &ObjectId {
        &self.id
    }

    fn action(&self) -> AuthzAction {
        self.action
    }

    fn matches(&self, conn: &ConnectionAttrs) -> bool {
        ClausePolicy::matches(self, conn)
    }
}

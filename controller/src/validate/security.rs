//! AuthorizationPolicy and PeerAuthentication validation, and their fail-closed
//! stand-ins.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::{Checker, ValidationContext, is_dns_label, is_header_name};
use crate::{
    diagnostics::{FieldPath, Rejection},
    model::{
        Cidr, Enforcement, NamespaceName, ObjectId, PortNumber, StringMatch, WorkloadSelector,
        authz::{
            AuthzAction, AuthzPolicy, AuthzRule, AuthzScope, Condition, ConditionKey,
            ConditionValue, OperationMatch, PathPattern, PolicyTarget, ServiceAccountMatch,
            SourceMatch, TargetKind,
        },
        peer_authn::{MtlsMode, PeerAuthn, PeerAuthnScope},
    },
    resources::{
        GATEWAY_API_GROUP, ResourceKind,
        common::{TargetRef, WorkloadSelectorSpec},
        security::{
            AuthorizationPolicySpec, AuthzActionSpec, ConditionSpec, MtlsModeSpec, Operation,
            PeerAuthenticationSpec, Source,
        },
    },
};

use super::ModelObject;

/// What a rejected AuthorizationPolicy meant to do, as far as it can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IntendedAction {
    Allow,
    Deny,
    Audit,
    Custom,
    Unknown,
}

/// Validates an AuthorizationPolicy. Returns the policy when valid, else the
/// fail-closed stand-in (if any); problems go to `chk`.
pub(super) fn authorization_policy(
    id: &ObjectId,
    spec: &AuthorizationPolicySpec,
    ctx: &ValidationContext,
    chk: &mut Checker,
) -> (Option<AuthzPolicy>, Option<AuthzPolicy>) {
    let root = FieldPath::parse("spec");
    let scope = authz_scope(id, spec, ctx, chk);

    let intended = match spec.action {
        None | Some(AuthzActionSpec::Allow) => IntendedAction::Allow,
        Some(AuthzActionSpec::Deny) => IntendedAction::Deny,
        Some(AuthzActionSpec::Audit) => IntendedAction::Audit,
        Some(AuthzActionSpec::Custom) => IntendedAction::Custom,
    };
    if intended == IntendedAction::Custom {
        chk.error(
            root.field("action"),
            "CUSTOM (external authorization) is not supported by Ambit; the requests its rules match are denied instead",
        );
    } else if spec.provider.is_some() {
        chk.error(root.field("provider"), "only valid with action CUSTOM");
    }

    let errors_before_rules = chk.error_count();
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let path = root.field("rules").index(i);
        rules.push(authz_rule(&path, rule, &id.namespace, chk));
    }
    let rules_valid = chk.error_count() == errors_before_rules;

    let action = match intended {
        IntendedAction::Deny | IntendedAction::Custom => AuthzAction::Deny,
        IntendedAction::Audit => AuthzAction::Audit,
        IntendedAction::Allow | IntendedAction::Unknown => AuthzAction::Allow,
    };
    if let Some(scope) = &scope
        && rules_valid
    {
        l7_caveats(&root, scope, action, &rules, chk);
    }
    if action == AuthzAction::Deny && spec.rules.as_ref().is_none_or(Vec::is_empty) {
        chk.warn(
            root.field("rules"),
            "a DENY policy without rules never matches",
        );
    }

    if chk.error_count() == 0 {
        let scope = scope.unwrap_or_else(|| fallback_authz_scope(id, ctx));
        let policy = AuthzPolicy {
            id: id.clone(),
            scope,
            action,
            rules,
            enforcement: Enforcement::AsWritten,
        };
        return (Some(policy), None);
    }
    let reason = format!("{id} was rejected");
    let valid_rules = (intended == IntendedAction::Custom && rules_valid).then_some(rules);
    (
        None,
        authz_stand_in(id, scope, intended, valid_rules, ctx, reason),
    )
}

fn fallback_authz_scope(id: &ObjectId, ctx: &ValidationContext) -> AuthzScope {
    if id.namespace == ctx.root_namespace {
        AuthzScope::Mesh
    } else {
        AuthzScope::Namespace(id.namespace.clone())
    }
}

/// The stricter policy enforced in place of a rejected one (module docs of
/// [`super`]).
fn authz_stand_in(
    id: &ObjectId,
    scope: Option<AuthzScope>,
    intended: IntendedAction,
    custom_rules: Option<Vec<AuthzRule>>,
    ctx: &ValidationContext,
    reason: String,
) -> Option<AuthzPolicy> {
    let scope = scope.unwrap_or_else(|| fallback_authz_scope(id, ctx));
    let (action, rules) = match intended {
        IntendedAction::Audit => return None,
        IntendedAction::Allow => (AuthzAction::Allow, Vec::new()),
        IntendedAction::Custom => (
            AuthzAction::Deny,
            custom_rules.unwrap_or_else(|| vec![AuthzRule::default()]),
        ),
        IntendedAction::Deny | IntendedAction::Unknown => {
            (AuthzAction::Deny, vec![AuthzRule::default()])
        }
    };
    Some(AuthzPolicy {
        id: id.clone(),
        scope,
        action,
        rules,
        enforcement: Enforcement::FailClosed { reason },
    })
}

/// The scope, or `None` (with errors recorded) when it cannot be determined.
fn authz_scope(
    id: &ObjectId,
    spec: &AuthorizationPolicySpec,
    ctx: &ValidationContext,
    chk: &mut Checker,
) -> Option<AuthzScope> {
    let root = FieldPath::parse("spec");
    let has_refs = spec.target_ref.is_some() || spec.target_refs.is_some();
    if spec.selector.is_some() && has_refs {
        let f = if spec.target_refs.is_some() {
            "targetRefs"
        } else {
            "targetRef"
        };
        chk.error(
            root.field(f),
            "cannot be combined with selector: use one or the other",
        );
        return None;
    }
    if spec.target_ref.is_some() && spec.target_refs.is_some() {
        chk.error(
            root.field("targetRef"),
            "cannot be combined with targetRefs: list every target in targetRefs",
        );
        return None;
    }
    if let Some(sel) = &spec.selector {
        let selector = selector_labels(sel);
        let namespace = (id.namespace != ctx.root_namespace).then(|| id.namespace.clone());
        return Some(AuthzScope::Workloads {
            namespace,
            selector,
        });
    }
    let refs: Vec<(FieldPath, &TargetRef)> = match (&spec.target_ref, &spec.target_refs) {
        (Some(r), _) => vec![(root.field("targetRef"), r)],
        (None, Some(list)) => {
            if list.is_empty() {
                chk.error(
                    root.field("targetRefs"),
                    "must not be empty; remove it to apply the policy to the namespace",
                );
                return None;
            }
            list.iter()
                .enumerate()
                .map(|(i, r)| (root.field("targetRefs").index(i), r))
                .collect()
        }
        (None, None) => return Some(fallback_authz_scope(id, ctx)),
    };
    let before = chk.error_count();
    let mut targets = Vec::new();
    for (path, r) in refs {
        if let Some(t) = policy_target(&path, r, &id.namespace, chk) {
            targets.push(t);
        }
    }
    (chk.error_count() == before).then_some(AuthzScope::Targets(targets))
}

fn selector_labels(sel: &WorkloadSelectorSpec) -> WorkloadSelector {
    WorkloadSelector(sel.match_labels.clone().unwrap_or_default())
}

fn policy_target(
    path: &FieldPath,
    r: &TargetRef,
    ns: &NamespaceName,
    chk: &mut Checker,
) -> Option<PolicyTarget> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = match r.kind.as_str() {
        "Service" => {
            if !matches!(group, "" | "core") {
                chk.error(
                    path.field("group"),
                    format!("a Service target has group \"\" (core), not `{group}`"),
                );
                return None;
            }
            TargetKind::Service
        }
        "Gateway" => {
            if group != GATEWAY_API_GROUP {
                chk.error(
                    path.field("group"),
                    format!("a Gateway target has group {GATEWAY_API_GROUP}, not `{group}`"),
                );
                return None;
            }
            TargetKind::Gateway
        }
        other => {
            chk.error(
                path.field("kind"),
                format!("target kind `{other}` is not supported (supported: Service, Gateway)"),
            );
            return None;
        }
    };
    if let Some(target_ns) = &r.namespace
        && target_ns != ns.as_str()
    {
        chk.error(
            path.field("namespace"),
            format!(
                "a policy can only target objects in its own namespace `{ns}`, not `{target_ns}`"
            ),
        );
        return None;
    }
    if r.name.is_empty() {
        chk.error(path.field("name"), "must not be empty");
        return None;
    }
    Some(PolicyTarget {
        kind,
        namespace: ns.clone(),
        name: r.name.clone(),
    })
}

/// Warnings for attributes that cannot be evaluated where the policy is enforced.
fn l7_caveats(
    root: &FieldPath,
    scope: &AuthzScope,
    action: AuthzAction,
    rules: &[AuthzRule],
    chk: &mut Checker,
) {
    let at_daemon = !matches!(scope, AuthzScope::Targets(_));
    for (i, rule) in rules.iter().enumerate() {
        let l7 = rule.l7_fields();
        if l7.is_empty() || !at_daemon {
            continue;
        }
        let found = l7.join(", ");
        let msg = match action {
            AuthzAction::Allow => format!(
                "uses HTTP attributes ({found}) that the node daemon cannot see: this ALLOW rule never matches (fail closed); attach the policy to a waypoint with targetRefs to enforce it"
            ),
            AuthzAction::Deny => {
                let only_l7 = rule_is_all_l7(rule);
                if only_l7 {
                    format!(
                        "uses only HTTP attributes ({found}), which the node daemon cannot see: this DENY rule is enforced without them and denies ALL traffic to the selected workloads; attach the policy to a waypoint with targetRefs to enforce it as written"
                    )
                } else {
                    format!(
                        "uses HTTP attributes ({found}) that the node daemon cannot see: this DENY rule is enforced without them, denying more than written; attach the policy to a waypoint with targetRefs to enforce it as written"
                    )
                }
            }
            AuthzAction::Audit => format!(
                "uses HTTP attributes ({found}) that the node daemon cannot see: audited without them"
            ),
        };
        chk.warn(root.field("rules").index(i), msg);
    }
}

/// Whether every condition of the rule is L7 (so at L4 it matches everything).
fn rule_is_all_l7(rule: &AuthzRule) -> bool {
    let source_l4 = rule.from.iter().any(|s| {
        !(s.principals.is_empty()
            && s.not_principals.is_empty()
            && s.namespaces.is_empty()
            && s.not_namespaces.is_empty()
            && s.service_accounts.is_empty()
            && s.not_service_accounts.is_empty()
            && s.ip_blocks.is_empty()
            && s.not_ip_blocks.is_empty())
    });
    let op_l4 = rule
        .to
        .iter()
        .any(|o| !(o.ports.is_empty() && o.not_ports.is_empty()));
    let when_l4 = rule.when.iter().any(|c| c.key.is_l4());
    !(source_l4 || op_l4 || when_l4)
}

fn authz_rule(
    path: &FieldPath,
    rule: &crate::resources::security::Rule,
    ns: &NamespaceName,
    chk: &mut Checker,
) -> AuthzRule {
    let mut out = AuthzRule::default();
    let from = chk.list(&path.field("from"), rule.from.as_ref());
    for (j, f) in from.iter().enumerate() {
        let p = path.field("from").index(j).field("source");
        match &f.source {
            None => chk.error(p, "required: each `from` entry needs a source"),
            Some(s) => out.from.push(source(&p, s, ns, chk)),
        }
    }
    let to = chk.list(&path.field("to"), rule.to.as_ref());
    for (j, t) in to.iter().enumerate() {
        let p = path.field("to").index(j).field("operation");
        match &t.operation {
            None => chk.error(p, "required: each `to` entry needs an operation"),
            Some(o) => out.to.push(operation(&p, o, chk)),
        }
    }
    let when = chk.list(&path.field("when"), rule.when.as_ref());
    for (j, c) in when.iter().enumerate() {
        if let Some(c) = condition(&path.field("when").index(j), c, chk) {
            out.when.push(c);
        }
    }
    out
}

/// Applies `parse` to each element of an optional list field, recording errors at
/// `field[i]`.
fn each<T>(
    chk: &mut Checker,
    field: FieldPath,
    list: Option<&Vec<String>>,
    mut parse: impl FnMut(&str) -> Result<T, String>,
) -> Vec<T> {
    let items = chk.list(&field, list);
    let mut out = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        match parse(v) {
            Ok(t) => out.push(t),
            Err(reason) => chk.error(field.index(i), reason),
        }
    }
    out
}

fn source(path: &FieldPath, s: &Source, ns: &NamespaceName, chk: &mut Checker) -> SourceMatch {
    let all_none = s.principals.is_none()
        && s.not_principals.is_none()
        && s.request_principals.is_none()
        && s.not_request_principals.is_none()
        && s.namespaces.is_none()
        && s.not_namespaces.is_none()
        && s.service_accounts.is_none()
        && s.not_service_accounts.is_none()
        && s.ip_blocks.is_none()
        && s.not_ip_blocks.is_none()
        && s.remote_ip_blocks.is_none()
        && s.not_remote_ip_blocks.is_none();
    if all_none {
        chk.error(
            path.clone(),
            "must set at least one field (an empty source would match every source)",
        );
    }
    let m = SourceMatch {
        principals: each(
            chk,
            path.field("principals"),
            s.principals.as_ref(),
            principal,
        ),
        not_principals: each(
            chk,
            path.field("notPrincipals"),
            s.not_principals.as_ref(),
            principal,
        ),
        request_principals: each(
            chk,
            path.field("requestPrincipals"),
            s.request_principals.as_ref(),
            wildcard,
        ),
        not_request_principals: each(
            chk,
            path.field("notRequestPrincipals"),
            s.not_request_principals.as_ref(),
            wildcard,
        ),
        namespaces: each(
            chk,
            path.field("namespaces"),
            s.namespaces.as_ref(),
            namespace_pattern,
        ),
        not_namespaces: each(
            chk,
            path.field("notNamespaces"),
            s.not_namespaces.as_ref(),
            namespace_pattern,
        ),
        service_accounts: each(
            chk,
            path.field("serviceAccounts"),
            s.service_accounts.as_ref(),
            |v| service_account(v, ns),
        ),
        not_service_accounts: each(
            chk,
            path.field("notServiceAccounts"),
            s.not_service_accounts.as_ref(),
            |v| service_account(v, ns),
        ),
        ip_blocks: each(chk, path.field("ipBlocks"), s.ip_blocks.as_ref(), cidr),
        not_ip_blocks: each(
            chk,
            path.field("notIpBlocks"),
            s.not_ip_blocks.as_ref(),
            cidr,
        ),
        remote_ip_blocks: each(
            chk,
            path.field("remoteIpBlocks"),
            s.remote_ip_blocks.as_ref(),
            cidr,
        ),
        not_remote_ip_blocks: each(
            chk,
            path.field("notRemoteIpBlocks"),
            s.not_remote_ip_blocks.as_ref(),
            cidr,
        ),
    };
    for f in ["requestPrincipals", "notRequestPrincipals"] {
        let present = if f == "requestPrincipals" {
            &m.request_principals
        } else {
            &m.not_request_principals
        };
        if !present.is_empty() {
            chk.warn(
                path.field(f),
                "request authentication (JWT) is not supported by Ambit: an ALLOW rule carrying it never matches, and in a DENY rule it counts as matching",
            );
        }
    }
    m
}

fn operation(path: &FieldPath, o: &Operation, chk: &mut Checker) -> OperationMatch {
    let all_none = o.hosts.is_none()
        && o.not_hosts.is_none()
        && o.ports.is_none()
        && o.not_ports.is_none()
        && o.methods.is_none()
        && o.not_methods.is_none()
        && o.paths.is_none()
        && o.not_paths.is_none();
    if all_none {
        chk.error(
            path.clone(),
            "must set at least one field (an empty operation would match every request)",
        );
    }
    OperationMatch {
        hosts: each(chk, path.field("hosts"), o.hosts.as_ref(), host),
        not_hosts: each(chk, path.field("notHosts"), o.not_hosts.as_ref(), host),
        ports: each(chk, path.field("ports"), o.ports.as_ref(), port),
        not_ports: each(chk, path.field("notPorts"), o.not_ports.as_ref(), port),
        methods: each(chk, path.field("methods"), o.methods.as_ref(), method),
        not_methods: each(
            chk,
            path.field("notMethods"),
            o.not_methods.as_ref(),
            method,
        ),
        paths: each(chk, path.field("paths"), o.paths.as_ref(), |v| {
            PathPattern::parse(v).map_err(|e| e.to_string())
        }),
        not_paths: each(chk, path.field("notPaths"), o.not_paths.as_ref(), |v| {
            PathPattern::parse(v).map_err(|e| e.to_string())
        }),
    }
}

fn condition(path: &FieldPath, c: &ConditionSpec, chk: &mut Checker) -> Option<Condition> {
    let key = match parse_condition_key(&c.key) {
        Ok(k) => k,
        Err(reason) => {
            chk.error(path.field("key"), reason);
            return None;
        }
    };
    if c.values.as_ref().is_none_or(Vec::is_empty)
        && c.not_values.as_ref().is_none_or(Vec::is_empty)
    {
        chk.error(
            path.clone(),
            "at least one of values or notValues must be set",
        );
        return None;
    }
    if let ConditionKey::Unevaluable(k) = &key {
        chk.warn(
            path.field("key"),
            format!("`{k}` cannot be evaluated by Ambit (no request authentication or SNI): an ALLOW rule carrying it never matches, and in a DENY rule it counts as matching"),
        );
    }
    let parse_value = |v: &str| -> Result<ConditionValue, String> {
        match &key {
            ConditionKey::SourceIp | ConditionKey::DestinationIp | ConditionKey::RemoteIp => {
                cidr(v).map(ConditionValue::Ip)
            }
            ConditionKey::DestinationPort => port(v).map(ConditionValue::Port),
            ConditionKey::SourcePrincipal => principal(v).map(ConditionValue::String),
            ConditionKey::SourceNamespace => namespace_pattern(v).map(ConditionValue::String),
            ConditionKey::RequestHeader(_) | ConditionKey::Unevaluable(_) => {
                wildcard(v).map(ConditionValue::String)
            }
        }
    };
    // The list-emptiness errors were handled above; empty lists are simply absent.
    let values = each(
        chk,
        path.field("values"),
        c.values.as_ref().filter(|v| !v.is_empty()),
        parse_value,
    );
    let not_values = each(
        chk,
        path.field("notValues"),
        c.not_values.as_ref().filter(|v| !v.is_empty()),
        parse_value,
    );
    Some(Condition {
        key,
        values,
        not_values,
    })
}

fn parse_condition_key(key: &str) -> Result<ConditionKey, String> {
    Ok(match key {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => ConditionKey::Unevaluable(key.to_owned()),
        k if k.starts_with("request.auth.claims[") && k.ends_with(']') => {
            ConditionKey::Unevaluable(key.to_owned())
        }
        k if k.starts_with("experimental.envoy.filters.") => {
            ConditionKey::Unevaluable(key.to_owned())
        }
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            let name = &k["request.headers[".len()..k.len() - 1];
            if !is_header_name(name) {
                return Err(format!("`{name}` is not a valid header name"));
            }
            ConditionKey::RequestHeader(name.to_ascii_lowercase())
        }
        _ => {
            return Err(format!(
                "unknown attribute `{key}` (supported: source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, request.headers[<name>], request.auth.*, connection.sni)"
            ));
        }
    })
}

fn wildcard(v: &str) -> Result<StringMatch, String> {
    if v.is_empty() {
        return Err("must not be empty".into());
    }
    StringMatch::parse_wildcard(v)
        .ok_or_else(|| format!("`{v}`: `*` is only allowed alone, as a prefix or as a suffix"))
}

/// Istio principal: `<trust-domain>/ns/<namespace>/sa/<service-account>`, or a
/// `*` wildcard (alone, prefix or suffix).
fn principal(v: &str) -> Result<StringMatch, String> {
    if let Some(rest) = v.strip_prefix("spiffe://") {
        return Err(format!(
            "write principals without the `spiffe://` prefix: `{rest}`"
        ));
    }
    let m = wildcard(v)?;
    if let StringMatch::Exact(p) = &m {
        let parts: Vec<&str> = p.split('/').collect();
        let ok = matches!(parts.as_slice(), [td, "ns", ns, "sa", sa] if !td.is_empty() && is_dns_label(ns) && !sa.is_empty());
        if !ok {
            return Err(format!(
                "`{v}` is not a principal: expected <trust-domain>/ns/<namespace>/sa/<service-account> (or a `*` prefix/suffix wildcard)"
            ));
        }
    }
    Ok(m)
}

fn namespace_pattern(v: &str) -> Result<StringMatch, String> {
    let m = wildcard(v)?;
    if let StringMatch::Exact(n) = &m
        && !is_dns_label(n)
    {
        return Err(format!("`{v}` is not a valid namespace name"));
    }
    Ok(m)
}

fn service_account(v: &str, policy_ns: &NamespaceName) -> Result<ServiceAccountMatch, String> {
    if v.contains('*') {
        return Err(format!(
            "`{v}`: wildcards are not allowed in serviceAccounts (use principals)"
        ));
    }
    let (ns, name) = match v.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name),
        None => (policy_ns.to_string(), v),
    };
    if !is_dns_label(&ns) || name.is_empty() || name.contains('/') {
        return Err(format!(
            "`{v}` is not a service account: expected <namespace>/<name> or <name>"
        ));
    }
    Ok(ServiceAccountMatch {
        namespace: ns,
        name: name.to_owned(),
    })
}

fn cidr(v: &str) -> Result<Cidr, String> {
    v.parse::<Cidr>().map_err(|e| e.to_string())
}

fn port(v: &str) -> Result<PortNumber, String> {
    v.parse::<PortNumber>().map_err(|e| e.to_string())
}

fn host(v: &str) -> Result<StringMatch, String> {
    wildcard(v)
}

fn method(v: &str) -> Result<String, String> {
    if v.is_empty() || !is_header_name(v) {
        return Err(format!("`{v}` is not an HTTP method"));
    }
    if v.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "HTTP methods are case-sensitive and `{v}` would never match a standard method: write `{}`",
            v.to_ascii_uppercase()
        ));
    }
    Ok(v.to_owned())
}

/// Validates a PeerAuthentication. Returns the policy when valid, else the STRICT
/// stand-in.
pub(super) fn peer_authentication(
    id: &ObjectId,
    spec: &PeerAuthenticationSpec,
    ctx: &ValidationContext,
    chk: &mut Checker,
) -> (Option<PeerAuthn>, Option<PeerAuthn>) {
    let root = FieldPath::parse("spec");
    let scope = peer_authn_scope(id, spec.selector.as_ref(), ctx);
    let mode = spec.mtls.as_ref().and_then(|m| m.mode).and_then(mode_of);
    if mode == Some(MtlsMode::Disable) {
        chk.warn(
            root.field("mtls").field("mode"),
            "Ambit keeps mTLS between meshed workloads; DISABLE only lets plaintext in, like PERMISSIVE",
        );
    }
    let mut port_modes = BTreeMap::new();
    if let Some(ports) = &spec.port_level_mtls {
        let field = root.field("portLevelMtls");
        if !matches!(scope, PeerAuthnScope::Workloads { .. }) {
            chk.error(
                field.clone(),
                "requires a selector with matchLabels (port numbers are workload ports)",
            );
        }
        if ports.is_empty() {
            chk.error(
                field.clone(),
                "must not be empty; remove it if no port needs its own mode",
            );
        }
        for (key, m) in ports {
            match key.0.parse::<PortNumber>() {
                Ok(p) => {
                    port_modes.insert(p, m.mode.and_then(mode_of));
                }
                Err(e) => chk.error(field.key(&key.0), e.to_string()),
            }
        }
    }
    if chk.error_count() == 0 {
        let policy = PeerAuthn {
            id: id.clone(),
            scope,
            mode,
            port_modes,
            enforcement: Enforcement::AsWritten,
        };
        return (Some(policy), None);
    }
    (None, Some(peer_authn_stand_in(id, scope)))
}

fn peer_authn_stand_in(id: &ObjectId, scope: PeerAuthnScope) -> PeerAuthn {
    PeerAuthn {
        id: id.clone(),
        scope,
        mode: Some(MtlsMode::Strict),
        port_modes: BTreeMap::new(),
        enforcement: Enforcement::FailClosed {
            reason: format!("{id} was rejected"),
        },
    }
}

fn mode_of(m: MtlsModeSpec) -> Option<MtlsMode> {
    match m {
        MtlsModeSpec::Unset => None,
        MtlsModeSpec::Disable => Some(MtlsMode::Disable),
        MtlsModeSpec::Permissive => Some(MtlsMode::Permissive),
        MtlsModeSpec::Strict => Some(MtlsMode::Strict),
    }
}

fn peer_authn_scope(
    id: &ObjectId,
    selector: Option<&WorkloadSelectorSpec>,
    ctx: &ValidationContext,
) -> PeerAuthnScope {
    let labels = selector.map(selector_labels).unwrap_or_default();
    if !labels.is_empty() {
        PeerAuthnScope::Workloads {
            namespace: id.namespace.clone(),
            selector: labels,
        }
    } else if id.namespace == ctx.root_namespace {
        PeerAuthnScope::Mesh
    } else {
        PeerAuthnScope::Namespace(id.namespace.clone())
    }
}

/// The stand-in for a security policy that could not even be typed (a bad value type,
/// an unknown action, an unsupported apiVersion…), read from the raw document as far
/// as possible. `None` for other kinds.
pub(super) fn stand_in_for_unparsed(
    rej: &Rejection,
    raw: &Value,
    ctx: &ValidationContext,
) -> Option<ModelObject> {
    let group = rej
        .api_version
        .as_deref()
        .and_then(|a| a.rsplit_once('/'))
        .map(|(g, _)| g)?;
    let kind = ResourceKind::lookup(group, rej.kind.as_deref()?)?;
    let origin = rej
        .origin
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let id = ObjectId {
        kind: kind.kind().to_owned(),
        namespace: NamespaceName::new(rej.namespace.as_deref().unwrap_or("default")),
        name: rej
            .name
            .clone()
            .unwrap_or_else(|| format!("<unnamed at {origin}>")),
        created: None,
    };
    let spec = raw.get("spec");
    let selector: Option<WorkloadSelectorSpec> = spec
        .and_then(|s| s.get("selector"))
        .and_then(|v| serde_yaml::from_value(v.clone()).ok());
    match kind {
        ResourceKind::AuthorizationPolicy => {
            let intended = match spec.and_then(|s| s.get("action")) {
                None | Some(Value::Null) => IntendedAction::Allow,
                Some(Value::String(a)) if a == "ALLOW" => IntendedAction::Allow,
                Some(Value::String(a)) if a == "DENY" => IntendedAction::Deny,
                Some(Value::String(a)) if a == "AUDIT" => IntendedAction::Audit,
                Some(Value::String(a)) if a == "CUSTOM" => IntendedAction::Custom,
                Some(_) => IntendedAction::Unknown,
            };
            // Re-read the scope with a typed spec holding only the scope fields; when
            // that fails too, the stand-in covers the namespace.
            let scope_spec = AuthorizationPolicySpec {
                selector: spec
                    .and_then(|s| s.get("selector"))
                    .map(|_| selector.clone().unwrap_or_default()),
                target_ref: spec
                    .and_then(|s| s.get("targetRef"))
                    .and_then(|v| serde_yaml::from_value(v.clone()).ok()),
                target_refs: spec
                    .and_then(|s| s.get("targetRefs"))
                    .and_then(|v| serde_yaml::from_value(v.clone()).ok()),
                ..Default::default()
            };
            let unreadable_scope = spec.is_some_and(|s| {
                (s.get("selector").is_some() && selector.is_none())
                    || (s.get("targetRef").is_some() && scope_spec.target_ref.is_none())
                    || (s.get("targetRefs").is_some() && scope_spec.target_refs.is_none())
            });
            let scope = if unreadable_scope {
                None
            } else {
                authz_scope(&id, &scope_spec, ctx, &mut Checker::default())
            };
            let reason = format!("{id} was rejected: {}: {}", rej.field, rej.reason);
            authz_stand_in(&id, scope, intended, None, ctx, reason).map(ModelObject::Authz)
        }
        ResourceKind::PeerAuthentication => {
            let unreadable = spec.and_then(|s| s.get("selector")).is_some() && selector.is_none();
            let scope = if unreadable {
                if id.namespace == ctx.root_namespace {
                    PeerAuthnScope::Mesh
                } else {
                    PeerAuthnScope::Namespace(id.namespace.clone())
                }
            } else {
                peer_authn_scope(&id, selector.as_ref(), ctx)
            };
            let mut p = peer_authn_stand_in(&id, scope);
            p.enforcement = Enforcement::FailClosed {
                reason: format!("{id} was rejected: {}: {}", rej.field, rej.reason),
            };
            Some(ModelObject::PeerAuthn(p))
        }
        _ => None,
    }
}

//! L7 authorization: AuthorizationPolicies attached with `targetRefs` to the addressed
//! Service or to the waypoint's own Gateway, decided per request (DESIGN §4).
//!
//! The semantics live in `ambit-policy` (the same code the controller and the node
//! daemon decide with); this module only builds the attributes of a request — method,
//! path, host, headers, the caller's verified identity and address, the original
//! destination — and answers a denial as Envoy does: `403` with the body
//! `RBAC: access denied`.
//!
//! Per request the layer needs two request extensions, inserted by the serving path
//! for every request of a tunnel: [`PeerInfo`] (who is calling, from the HBONE
//! CONNECT) and [`AuthzTargets`] (which Service was addressed, and the Gateway). A
//! request without them is denied: a forgotten extension must not open access.
//!
//! Policies come through an [`AuthzHandle`]. Until the first good set arrives it
//! denies everything; an update that fails conversion is refused (the caller NACKs it)
//! and the last good set stays in force.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
};

use ambit_api::config::v1 as pb;
use ambit_hbone::InboundRequest;
use ambit_identity::SpiffeId;
use ambit_policy::{
    authz::{ConnectionAttrs, Decision, DecisionReason, PeerIdentity, PolicyTarget, RequestAttrs},
    types::ObjectId,
    wire::{ProxyPolicies, WireError, gateway_target, service_target},
};
use http::{Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::body::{ProxyBody, local_response};

/// Body of the `403` a denied request gets (Envoy's wording, which clients and tests
/// match on).
pub const DENIED_BODY: &str = "RBAC: access denied";

/// What the waypoint knows about the caller of a tunnelled request, from the HBONE
/// CONNECT it arrived on. Request extension; also used by telemetry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The caller's identity from its verified client certificate; `None` for a
    /// plaintext caller.
    pub identity: Option<SpiffeId>,
    /// The HBONE connection's source address (the caller's node daemon).
    pub peer_addr: SocketAddr,
    /// The original client's address reported by the source daemon
    /// (`forwarded: for=…` on the CONNECT).
    pub forwarded_for: Option<IpAddr>,
    /// The original destination (the CONNECT `:authority`: a Service VIP and port, or
    /// a pod address).
    pub target: SocketAddr,
}

impl PeerInfo {
    /// The caller's address as policies see it (`source.ip`): the original client
    /// the source daemon reported, else the connection's source. The CONNECT comes
    /// from an authenticated mesh daemon, so its `forwarded` header is trusted; the
    /// tunnelled request's own `forwarded` / `x-forwarded-for` headers are not.
    pub fn source_ip(&self) -> IpAddr {
        self.forwarded_for.unwrap_or(self.peer_addr.ip())
    }

    /// Istio's principal of the caller (`<trust-domain>/ns/<ns>/sa/<sa>`), if known.
    pub fn principal(&self) -> Option<String> {
        self.identity
            .as_ref()
            .map(|id| PeerIdentity::from(id).principal())
    }
}

impl From<&InboundRequest> for PeerInfo {
    fn from(r: &InboundRequest) -> Self {
        Self {
            identity: Some(r.peer.clone()),
            peer_addr: r.peer_addr,
            forwarded_for: r.forwarded_for,
            target: r.target,
        }
    }
}

/// Request extension: the policy targets of a request — the addressed Service (when
/// the target is a Service VIP) and the waypoint's Gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzTargets(pub Arc<[PolicyTarget]>);

impl AuthzTargets {
    /// Targets for a request addressed to `service` (`None`: a pod address, only the
    /// Gateway's policies apply) through the waypoint declared by `gateway`.
    pub fn new(service: Option<&pb::NamespacedName>, gateway: &pb::NamespacedName) -> Self {
        let mut targets = Vec::with_capacity(2);
        if let Some(s) = service {
            targets.push(service_target(&s.namespace, &s.name));
        }
        targets.push(gateway_target(&gateway.namespace, &gateway.name));
        Self(targets.into())
    }
}

/// Response extension on a request the waypoint refused (`403`): the DENY policy that
/// matched, `None` when no ALLOW policy matched or no policies were in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDenied {
    /// The matching DENY policy, if that was the reason.
    pub policy: Option<ObjectId>,
}

impl AuthzDenied {
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for the denial:
    /// `rbac_access_denied_matched_policy[<ns>.<name>]`, `[none]` without a DENY match.
    pub fn details(&self) -> String {
        match &self.policy {
            Some(id) => format!(
                "rbac_access_denied_matched_policy[{}.{}]",
                id.namespace, id.name
            ),
            None => "rbac_access_denied_matched_policy[none]".to_owned(),
        }
    }

    /// The `403 RBAC: access denied` (text/plain) a denied request gets, carrying
    /// this denial as an extension.
    pub fn response(self) -> Response<ProxyBody> {
        let mut response = local_response(StatusCode::FORBIDDEN, DENIED_BODY);
        response.extensions_mut().insert(self);
        response
    }
}

/// The request's attributes for policy evaluation (`request` set: every HTTP
/// attribute is known).
///
/// `host` is the `:authority` (HTTP/2, absolute-form) or else the `Host` header;
/// `path` includes the query (the policy crate ignores it where Istio does); headers
/// are lower-cased and listed once per value, non-UTF-8 values converted lossily,
/// with the pseudo-headers `:authority`, `:method` and `:path` added as Envoy's header
/// matchers see them. `remote.ip` is the source address: like Istio's default
/// (no trusted proxy hops), client-supplied `x-forwarded-for` is not believed.
pub fn connection_attrs<B>(request: &Request<B>, peer: &PeerInfo) -> ConnectionAttrs {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let mut headers: Vec<(String, String)> = Vec::with_capacity(request.headers().len() + 3);
    headers.push((":authority".to_owned(), host.clone()));
    headers.push((":method".to_owned(), method.clone()));
    headers.push((":path".to_owned(), path.clone()));
    headers.extend(request.headers().iter().map(|(name, value)| {
        (
            name.as_str().to_owned(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        )
    }));
    ConnectionAttrs {
        source: peer.identity.as_ref().map(PeerIdentity::from),
        source_ip: peer.source_ip(),
        destination_ip: peer.target.ip(),
        destination_port: peer.target.port(),
        request: Some(RequestAttrs {
            method,
            path,
            host,
            headers,
            remote_ip: None,
        }),
    }
}

/// Decides `request` from `peer` against the policies attached to `targets`.
pub fn authorize<B>(
    policies: &ProxyPolicies,
    targets: &[PolicyTarget],
    request: &Request<B>,
    peer: &PeerInfo,
) -> Decision {
    policies.authorize_targets(targets, &connection_attrs(request, peer))
}

/// Decides a tunnel the waypoint relays as plain TCP (no HTTP detected): only L4
/// attributes are known, so an ALLOW rule on HTTP attributes does not match.
pub fn authorize_tcp(
    policies: &ProxyPolicies,
    targets: &[PolicyTarget],
    peer: &PeerInfo,
) -> Decision {
    let conn = ConnectionAttrs {
        source: peer.identity.as_ref().map(PeerIdentity::from),
        source_ip: peer.source_ip(),
        destination_ip: peer.target.ip(),
        destination_port: peer.target.port(),
        request: None,
    };
    policies.authorize_targets(targets, &conn)
}

/// The authorization policies in force; clones share them. Denies everything until a
/// set is installed.
#[derive(Clone, Debug, Default)]
pub struct AuthzHandle(Arc<RwLock<Option<Arc<ProxyPolicies>>>>);

impl AuthzHandle {
    /// A handle that denies every request until [`AuthzHandle::replace`] or a
    /// successful [`AuthzHandle::update_from_resources`].
    pub fn fail_closed() -> Self {
        Self::default()
    }

    /// A handle with `policies` in force.
    pub fn new(policies: ProxyPolicies) -> Self {
        let handle = Self::default();
        handle.replace(policies);
        handle
    }

    /// Installs `policies`; requests already decided are unaffected.
    pub fn replace(&self, policies: ProxyPolicies) {
        // Replacing an `Arc` cannot leave the value half-written.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(policies));
    }

    /// Converts and installs the `Authorization` resources among `resources`. On a
    /// conversion error nothing changes — the last good set (or deny-all, if there
    /// never was one) stays in force — and the error is returned for the NACK.
    pub fn update_from_resources<'a>(
        &self,
        resources: impl IntoIterator<Item = &'a pb::Resource>,
    ) -> Result<(), WireError> {
        let policies = ProxyPolicies::from_resources(resources)?;
        self.replace(policies);
        Ok(())
    }

    /// The policies in force; `None` means deny everything.
    pub fn current(&self) -> Option<Arc<ProxyPolicies>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Decides `request`: the policies' decision, or a denial when none are in force
    /// or the request lacks [`PeerInfo`] / [`AuthzTargets`]. Answer an `Err` with
    /// [`AuthzDenied::response`].
    pub fn check<B>(&self, request: &Request<B>) -> Result<Decision, AuthzDenied> {
        let Some(policies) = self.current() else {
            tracing::debug!("no authorization policies yet: denied");
            return Err(AuthzDenied { policy: None });
        };
        let ext = request.extensions();
        let (Some(peer), Some(targets)) = (ext.get::<PeerInfo>(), ext.get::<AuthzTargets>()) else {
            tracing::warn!("request without peer or targets: denied");
            return Err(AuthzDenied { policy: None });
        };
        let decision = authorize(&policies, &targets.0, request, peer);
        if !decision.audited_by.is_empty() {
            tracing::info!(
                target: "authz",
                audited_by = ?decision.audited_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
                allowed = decision.is_allowed(),
                method = %request.method(),
                path = %request.uri().path(),
                principal = peer.principal().as_deref().unwrap_or("-"),
                "audit policy matched"
            );
        }
        if decision.is_allowed() {
            Ok(decision)
        } else {
            let policy = match &decision.reason {
                DecisionReason::DeniedBy(id) => Some(id.clone()),
                _ => None,
            };
            tracing::debug!(reason = ?decision.reason, "request denied");
            Err(AuthzDenied { policy })
        }
    }
}

/// Authorizes each request before the inner service (the router) sees it.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policies: AuthzHandle,
}

impl AuthzLayer {
    /// Decide with the policies `policies` holds at the time of each request.
    pub fn new(policies: AuthzHandle) -> Self {
        Self { policies }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            policies: self.policies.clone(),
        }
    }
}

/// See [`AuthzLayer`]; the allowed request carries its [`Decision`] as an extension.
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policies: AuthzHandle,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for Authz<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ProxyBody>, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Each request drives its own clone of `inner` (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.policies.check(&request) {
            Err(denied) => {
                let response = denied.response();
                Box::pin(async move { Ok(response) })
            }
            Ok(decision) => {
                request.extensions_mut().insert(decision);
                Box::pin(self.inner.clone().oneshot(request))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use ambit_api::config::v1::{Resource, policy_scope, resource::Kind, string_match};
    use ambit_policy::authz::Verdict;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::service_fn;

    use super::*;

    const NS: &str = "production";

    fn exact(s: &str) -> pb::StringMatch {
        pb::StringMatch {
            kind: Some(string_match::Kind::Exact(s.into())),
            ignore_case: false,
        }
    }

    fn kind(k: string_match::Kind) -> pb::StringMatch {
        pb::StringMatch {
            kind: Some(k),
            ignore_case: false,
        }
    }

    fn nn(ns: &str, name: &str) -> pb::NamespacedName {
        pb::NamespacedName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// A policy with `targetRefs` to the payment Service.
    fn on_payment(name: &str, action: pb::Action, matches: Vec<pb::Match>) -> Resource {
        on_target(
            name,
            action,
            pb::TargetRefs {
                services: vec![nn(NS, "payment")],
                gateways: vec![],
            },
            matches,
        )
    }

    fn on_target(
        name: &str,
        action: pb::Action,
        refs: pb::TargetRefs,
        matches: Vec<pb::Match>,
    ) -> Resource {
        Resource::new(Kind::Authorization(pb::Authorization {
            name: name.into(),
            namespace: NS.into(),
            scope: Some(pb::PolicyScope {
                kind: Some(policy_scope::Kind::TargetRefs(refs)),
            }),
            action: action as i32,
            rules: matches
                .into_iter()
                .map(|m| pb::Rule {
                    clauses: vec![pb::Clause { matches: vec![m] }],
                    unenforceable_fields: vec![],
                })
                .collect(),
        }))
    }

    fn handle(resources: &[Resource]) -> AuthzHandle {
        let h = AuthzHandle::fail_closed();
        h.update_from_resources(resources).unwrap();
        h
    }

    fn principal(sa: &str) -> String {
        format!("cluster.local/ns/{NS}/sa/{sa}")
    }

    fn peer(sa: Option<&str>) -> PeerInfo {
        PeerInfo {
            identity: sa.map(|sa| SpiffeId::parse(&format!("spiffe://{}", principal(sa))).unwrap()),
            peer_addr: "172.30.0.11:40000".parse().unwrap(),
            forwarded_for: Some("10.244.1.2".parse().unwrap()),
            target: "10.96.0.10:8080".parse().unwrap(),
        }
    }

    fn request(method: &str, path: &str, sa: Option<&str>) -> Request<()> {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "payment.production.svc.cluster.local:8080")
            .body(())
            .unwrap();
        r.extensions_mut().insert(peer(sa));
        r.extensions_mut().insert(AuthzTargets::new(
            Some(&nn(NS, "payment")),
            &nn(NS, "waypoint"),
        ));
        r
    }

    fn verdict(h: &AuthzHandle, r: &Request<()>) -> Verdict {
        match h.check(r) {
            Ok(d) => d.verdict,
            Err(denied) => {
                assert_eq!(denied.response().status(), StatusCode::FORBIDDEN);
                Verdict::Deny
            }
        }
    }

    /// The seed policy: checkout may GET and POST the orders API, inventory
    /// may only GET.
    fn seed_policy() -> Vec<Resource> {
        vec![on_payment(
            "orders",
            pb::Action::Allow,
            vec![
                pb::Match {
                    principals: vec![exact(&principal("checkout"))],
                    methods: vec![exact("GET"), exact("POST")],
                    paths: vec![kind(string_match::Kind::Prefix("/api/v1/".into()))],
                    ..Default::default()
                },
                pb::Match {
                    principals: vec![exact(&principal("inventory"))],
                    methods: vec![exact("GET")],
                    ..Default::default()
                },
            ],
        )]
    }

    #[test]
    fn get_from_checkout_allowed_post_from_inventory_denied() {
        let h = handle(&seed_policy());
        let allowed = h.check(&request("GET", "/api/v1/orders", Some("checkout")));
        assert!(matches!(
            allowed.map(|d| d.reason),
            Ok(DecisionReason::AllowedBy(id)) if id.name == "orders"
        ));
        assert_eq!(
            verdict(&h, &request("POST", "/api/v1/orders", Some("checkout"))),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&h, &request("GET", "/api/v1/orders", Some("inventory"))),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&h, &request("POST", "/api/v1/orders", Some("inventory"))),
            Verdict::Deny
        );
        // No identity (plaintext caller): no principal matches.
        assert_eq!(
            verdict(&h, &request("GET", "/api/v1/orders", None)),
            Verdict::Deny
        );
    }

    #[tokio::test]
    async fn denied_requests_get_envoys_403_and_never_reach_the_router() {
        let h = handle(&seed_policy());
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = reached.clone();
        let inner = service_fn(move |r: Request<()>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(r.extensions().get::<Decision>().is_some());
            async move { Ok::<_, Infallible>(Response::new(ProxyBody::full("ok"))) }
        });
        let svc = AuthzLayer::new(h).layer(inner);

        let denied = svc
            .clone()
            .oneshot(request("POST", "/api/v1/orders", Some("inventory")))
            .await
            .unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        assert_eq!(denied.headers()[http::header::CONTENT_TYPE], "text/plain");
        assert_eq!(
            denied.extensions().get::<AuthzDenied>(),
            Some(&AuthzDenied { policy: None })
        );
        let body: Bytes = denied.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, DENIED_BODY);
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);

        let ok = svc
            .oneshot(request("GET", "/api/v1/orders", Some("checkout")))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut resources = seed_policy();
        resources.push(on_payment(
            "no-admin",
            pb::Action::Deny,
            vec![pb::Match {
                paths: vec![kind(string_match::Kind::Prefix("/api/v1/admin".into()))],
                ..Default::default()
            }],
        ));
        let h = handle(&resources);
        assert_eq!(
            verdict(&h, &request("GET", "/api/v1/orders", Some("checkout"))),
            Verdict::Allow
        );
        let denied = h
            .check(&request("GET", "/api/v1/admin/users", Some("checkout")))
            .unwrap_err();
        let by = &denied;
        assert_eq!(by.policy.as_ref().unwrap().name, "no-admin");
        assert_eq!(
            by.details(),
            "rbac_access_denied_matched_policy[production.no-admin]"
        );
    }

    #[test]
    fn path_templates_and_wildcards() {
        let h = handle(&[on_payment(
            "templates",
            pb::Action::Allow,
            vec![pb::Match {
                paths: vec![
                    kind(string_match::Kind::PathTemplate("/api/{*}/orders".into())),
                    kind(string_match::Kind::PathTemplate("/static/{**}".into())),
                    kind(string_match::Kind::Suffix(".png".into())),
                ],
                ..Default::default()
            }],
        )]);
        let v = |path: &str| verdict(&h, &request("GET", path, Some("checkout")));
        assert_eq!(v("/api/v1/orders"), Verdict::Allow);
        assert_eq!(v("/api/v2/orders?page=2"), Verdict::Allow);
        assert_eq!(v("/api/v1/x/orders"), Verdict::Deny);
        assert_eq!(v("/api/v1/orders/7"), Verdict::Deny);
        assert_eq!(v("/static/css/site/main.css"), Verdict::Allow);
        assert_eq!(v("/img/logo.png"), Verdict::Allow);
        assert_eq!(v("/img/logo.gif"), Verdict::Deny);
    }

    #[test]
    fn when_conditions_on_request_headers() {
        let h = handle(&[on_payment(
            "tenant",
            pb::Action::Allow,
            vec![pb::Match {
                request_headers: vec![pb::HeaderCondition {
                    name: "X-Tenant".into(),
                    values: vec![exact("acme")],
                    not_values: vec![],
                }],
                ..Default::default()
            }],
        )]);
        let with = |value: Option<&str>| {
            let mut r = request("GET", "/", Some("checkout"));
            if let Some(v) = value {
                r.headers_mut().insert("x-tenant", v.parse().unwrap());
            }
            verdict(&h, &r)
        };
        assert_eq!(with(Some("acme")), Verdict::Allow);
        assert_eq!(with(Some("globex")), Verdict::Deny);
        assert_eq!(with(None), Verdict::Deny);
    }

    #[test]
    fn hosts_ports_namespaces_and_ip_blocks() {
        let h = handle(&[on_payment(
            "all-fields",
            pb::Action::Allow,
            vec![pb::Match {
                namespaces: vec![exact(NS)],
                source_ips: vec![pb::IpBlock {
                    address: "10.244.1.0".into(),
                    prefix_len: 24,
                }],
                hosts: vec![exact("payment.production.svc.cluster.local")],
                destination_ports: vec![8080],
                ..Default::default()
            }],
        )]);
        assert_eq!(
            verdict(&h, &request("GET", "/", Some("checkout"))),
            Verdict::Allow
        );
        // The source IP is the forwarded client, not the daemon's address.
        let mut r = request("GET", "/", Some("checkout"));
        r.extensions_mut()
            .get_mut::<PeerInfo>()
            .unwrap()
            .forwarded_for = Some("10.244.2.9".parse().unwrap());
        assert_eq!(verdict(&h, &r), Verdict::Deny);
        let mut r = request("GET", "/", Some("checkout"));
        r.extensions_mut().get_mut::<PeerInfo>().unwrap().target =
            "10.96.0.10:9090".parse().unwrap();
        assert_eq!(verdict(&h, &r), Verdict::Deny);
        let mut r = request("GET", "/", Some("checkout"));
        r.headers_mut()
            .insert("host", "other.production.svc".parse().unwrap());
        assert_eq!(verdict(&h, &r), Verdict::Deny);
        // An HTTP/2 request's :authority is the host.
        let mut r = request(
            "GET",
            "http://payment.production.svc.cluster.local/x",
            Some("checkout"),
        );
        r.headers_mut().remove("host");
        assert_eq!(verdict(&h, &r), Verdict::Allow);
    }

    #[test]
    fn audit_never_denies() {
        let h = handle(&[on_payment(
            "audit-posts",
            pb::Action::Audit,
            vec![pb::Match {
                methods: vec![exact("POST")],
                ..Default::default()
            }],
        )]);
        let d = h
            .check(&request("POST", "/api/v1/orders", Some("inventory")))
            .unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.audited_by.len(), 1);
        assert_eq!(d.audited_by[0].name, "audit-posts");
    }

    #[test]
    fn no_policies_allow_everything() {
        let h = handle(&[]);
        let d = h.check(&request("DELETE", "/anything", None)).unwrap();
        assert_eq!(d.reason, DecisionReason::NoAllowPolicy);
        // Policies on another Service do not apply here.
        let other = on_target(
            "inventory-only",
            pb::Action::Allow,
            pb::TargetRefs {
                services: vec![nn(NS, "inventory")],
                gateways: vec![],
            },
            vec![],
        );
        let h = handle(&[other]);
        assert!(h.check(&request("DELETE", "/anything", None)).is_ok());
    }

    #[test]
    fn gateway_targeted_policies_apply_to_every_service() {
        let h = handle(&[on_target(
            "gw-deny-delete",
            pb::Action::Deny,
            pb::TargetRefs {
                services: vec![],
                gateways: vec![nn(NS, "waypoint")],
            },
            vec![pb::Match {
                methods: vec![exact("DELETE")],
                ..Default::default()
            }],
        )]);
        assert_eq!(
            verdict(&h, &request("DELETE", "/", Some("checkout"))),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&h, &request("GET", "/", Some("checkout"))),
            Verdict::Allow
        );
        // A pod-addressed request: only the Gateway target.
        let mut r = request("DELETE", "/", Some("checkout"));
        r.extensions_mut()
            .insert(AuthzTargets::new(None, &nn(NS, "waypoint")));
        assert_eq!(verdict(&h, &r), Verdict::Deny);
    }

    #[test]
    fn fails_closed() {
        // Nothing installed yet.
        let h = AuthzHandle::fail_closed();
        assert_eq!(
            verdict(&h, &request("GET", "/", Some("checkout"))),
            Verdict::Deny
        );
        // A set that fails conversion is refused and deny-all stays.
        let mut bad = seed_policy();
        let Some(Kind::Authorization(a)) = &mut bad[0].kind else {
            unreachable!()
        };
        a.rules[0].clauses[0].matches[0].source_ips = vec![pb::IpBlock {
            address: "10.0.0.0".into(),
            prefix_len: 99,
        }];
        let err = h.update_from_resources(&bad).unwrap_err();
        assert_eq!(err.resource, "Authorization/production/orders");
        assert_eq!(
            verdict(&h, &request("GET", "/api/v1/orders", Some("checkout"))),
            Verdict::Deny
        );
        // After a good set, a bad update keeps the good one.
        h.update_from_resources(&seed_policy()).unwrap();
        assert!(h.update_from_resources(&bad).is_err());
        assert_eq!(
            verdict(&h, &request("GET", "/api/v1/orders", Some("checkout"))),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&h, &request("POST", "/api/v1/orders", Some("inventory"))),
            Verdict::Deny
        );
        // Missing extensions: denied even with no policies.
        let open = handle(&[]);
        let mut r = request("GET", "/", Some("checkout"));
        r.extensions_mut().remove::<PeerInfo>();
        assert_eq!(verdict(&open, &r), Verdict::Deny);
        let mut r = request("GET", "/", Some("checkout"));
        r.extensions_mut().remove::<AuthzTargets>();
        assert_eq!(verdict(&open, &r), Verdict::Deny);
    }

    #[test]
    fn tcp_tunnels_cannot_match_http_allow_rules() {
        let resources = seed_policy();
        let p = ProxyPolicies::from_resources(&resources).unwrap();
        let targets = AuthzTargets::new(Some(&nn(NS, "payment")), &nn(NS, "waypoint"));
        assert!(!authorize_tcp(&p, &targets.0, &peer(Some("checkout"))).is_allowed());
        let p = ProxyPolicies::default();
        assert!(authorize_tcp(&p, &targets.0, &peer(Some("checkout"))).is_allowed());
    }

    #[test]
    fn request_attributes() {
        let mut r = request("GET", "/a/b?c=d", Some("checkout"));
        r.headers_mut().append("x-multi", "1".parse().unwrap());
        r.headers_mut().append("x-multi", "2".parse().unwrap());
        r.headers_mut().insert(
            "x-bytes",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        let attrs = connection_attrs(&r, r.extensions().get::<PeerInfo>().unwrap());
        assert_eq!(attrs.source_ip, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(attrs.destination_port, 8080);
        assert_eq!(
            attrs.source.unwrap().principal(),
            "cluster.local/ns/production/sa/checkout"
        );
        let req = attrs.request.unwrap();
        assert_eq!(req.path, "/a/b?c=d");
        assert_eq!(req.host, "payment.production.svc.cluster.local:8080");
        let values = |name: &str| -> Vec<&str> {
            req.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("x-multi"), ["1", "2"]);
        assert_eq!(values(":method"), ["GET"]);
        assert_eq!(values("x-bytes"), ["caf\u{fffd}"]);
    }
}

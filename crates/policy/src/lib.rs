//! Ambit's security policy model and its evaluation, shared by the controller and the
//! proxies, so that every component decides with the same code.
//!
//! - [`authz`]: authorization policies (Istio `AuthorizationPolicy`) as validated from
//!   user YAML, and [`authz::authorize`], the decision (DESIGN §4).
//! - [`peer_authn`]: peer authentication (`PeerAuthentication`) and
//!   [`peer_authn::effective_mtls_mode`].
//! - [`clause`]: authorization rules in the normalised form the wire protocol carries,
//!   evaluated with the same three-valued logic.
//! - [`wire`]: conversion of the wire resources (`ambit.config.v1.Authorization`,
//!   `PeerAuthentication`) into the model, and the proxies' entry points
//!   ([`wire::ProxyPolicies`]).
//! - [`types`]: the small value types all of them use.
//!
//! Everything here is plain data and pure functions: no Kubernetes types, no I/O.
//! Building model objects from user YAML, with precise rejections, is the controller's
//! job; translating them to the wire is too.
#![forbid(unsafe_code)]

pub mod authz;
pub mod clause;
pub mod peer_authn;
pub mod types;
pub mod wire;

mod tri;

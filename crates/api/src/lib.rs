//! The controller ⇄ proxy wire protocol.
//!
//! The `.proto` files under `proto/` (workspace root) are the specification; this crate
//! compiles them (protox + tonic's prost generator, see `build.rs`) and adds the
//! small helpers every side needs to agree on:
//!
//! - [`ca::v1`]: the certificate authority service (`CreateCertificate`).
//! - [`config::v1`]: config discovery (`Subscribe`) and the resources it carries.
//! - [`ResourceKey`] / [`ResourceKind`]: the `<Kind>/<…>` keys resources are stored,
//!   resumed and removed by; [`config::v1::Resource::new`] fills key and version.
//! - [`BearerToken`]: the `authorization: Bearer …` credential both services expect,
//!   usable as a tonic client interceptor.
//! - [`time`]: conversions between `google.protobuf.Duration`/`Timestamp` and std.
#![forbid(unsafe_code)]

pub mod auth;
pub mod key;
pub mod time;

mod resource;

pub use auth::{BearerToken, BearerTokenError};
pub use key::{ResourceKey, ResourceKeyError, ResourceKind};
pub use resource::DEFAULT_HBONE_PORT;

/// Maximum gRPC message size both sides accept (config snapshots can exceed tonic's
/// 4 MiB default): pass it to `max_decoding_message_size` on clients and servers.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Generated from `proto/ambit/ca/v1/ca.proto`.
pub mod ca {
    /// Version 1 of the CA protocol (`ambit.ca.v1`).
    pub mod v1 {
        #![allow(
            missing_debug_implementations,
            rust_2018_idioms,
            clippy::all,
            clippy::pedantic,
            reason = "generated code"
        )]
        include!(concat!(env!("OUT_DIR"), "/ambit.ca.v1.rs"));
    }
}

/// Generated from `proto/ambit/config/v1/*.proto`.
pub mod config {
    /// Version 1 of the config protocol (`ambit.config.v1`).
    pub mod v1 {
        #![allow(
            missing_debug_implementations,
            rust_2018_idioms,
            clippy::all,
            clippy::pedantic,
            reason = "generated code"
        )]
        include!(concat!(env!("OUT_DIR"), "/ambit.config.v1.rs"));
    }
}

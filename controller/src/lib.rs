//! Ambit controller library: the resource model operators apply ([`resources`]), its
//! validation ([`validate`]) into the internal model ([`model`]), and what operators are
//! told about it ([`diagnostics`]).
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod ca;
pub mod diagnostics;
pub mod index;
pub mod metrics;
pub mod model;
pub mod push;
pub mod resources;
pub mod source;
pub mod status;
pub mod translate;
pub mod validate;
pub mod view;
pub mod waypoint_deploy;
pub mod world;

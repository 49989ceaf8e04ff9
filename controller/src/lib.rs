//! Ambit controller library: the resource model operators apply ([`resources`]), its
//! validation ([`validate`]) into the internal model ([`model`]), and what operators are
//! told about it ([`diagnostics`]).
#![forbid(unsafe_code)]

pub mod diagnostics;
pub mod model;
pub mod resources;
pub mod source;
pub mod validate;
pub mod view;

//! Ambit's CNI plugin and the enrolment protocol it speaks with the node daemon
//! (DESIGN §2, "Enrollment").
//!
//! The `ambit-cni` binary is chained after the cluster's primary CNI plugin. On ADD it
//! tells the daemon on the node about the pod (namespace, name, uid, container id,
//! netns path, addresses) over a Unix socket and returns only once the daemon answered
//! that capture is ready or that the pod is not meshed, passing the primary plugin's
//! result on unchanged; on DEL it asks the daemon to forget the pod; on CHECK it asks
//! whether the pod is captured. See [`plugin`] for the failure policy.
//!
//! - [`protocol`]: the messages (shared with the daemon's server).
//! - [`client`]: the plugin's side of the socket.
//! - [`cni`]: the CNI specification's environment, configuration and errors.
//! - [`plugin`]: the commands.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0",
//!   "name": "k8s-pod-network",
//!   "plugins": [
//!     { "type": "bridge", "…": "…" },
//!     { "type": "ambit-cni", "ambit": { "socket": "/var/run/ambit/cni.sock", "timeout": "30s" } }
//!   ]
//! }
//! ```
//!
//! Both `ambit` settings are optional (defaults: [`client::DEFAULT_SOCKET`],
//! [`cni::DEFAULT_TIMEOUT`]); an unknown key there is an error (code 2), so that a typo
//! does not silently fall back to a default.
#![forbid(unsafe_code)]

pub mod client;
pub mod cni;
pub mod plugin;
pub mod protocol;

pub use client::{Client, ClientError};
pub use protocol::{
    Command, ContainerId, PROTOCOL_VERSION, PodEnrollment, PodRef, PodRemoval, Request, Response,
    Status,
};

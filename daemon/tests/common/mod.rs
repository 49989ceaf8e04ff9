//! Set-up shared by the daemon's simulated-cluster tests (`mod common;` in each).

use ambit_simcluster::{Cluster, MeshOptions, Options, Topology};

/// The default shop with the real controller, one real daemon per node and pods
/// enrolled through the real `ambit-cni`. Panics (the test fails, never skips) when a
/// workspace binary is missing or the cluster does not come up.
pub fn mesh_shop() -> Cluster {
    for bin in ["ambit-echo", "ambit-controller", "ambit-node", "ambit-cni"] {
        if let Err(e) = ambit_test_support::bin_path(bin) {
            panic!("{e:#}");
        }
    }
    let bin_dir = ambit_test_support::bin_dir().unwrap_or_else(|e| panic!("{e:#}"));
    let opts = Options::for_test(bin_dir).mesh(MeshOptions::with_daemons());
    Cluster::up(opts, &Topology::default_shop()).unwrap_or_else(|e| panic!("mesh shop: {e}"))
}

//! The controller's Prometheus metrics (OpenMetrics text on the admin `/metrics`).
//!
//! One [`Registry`] is made at build time ([`Metrics::new`] registers into it); the
//! push server, the CA and the index watcher each hold a clone of [`Metrics`].
//! Names are given without `_total`; the library adds it to counters.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Prefix of every controller metric.
pub const PREFIX: &str = "ambit_controller";

/// `status` label: `Accepted`, `Rejected` or `Ignored`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The verdict.
    pub status: &'static str,
}

/// `subscriber_type` label: `node` or `waypoint`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriberTypeLabels {
    /// The kind of subscriber.
    pub subscriber_type: &'static str,
}

/// `caller_type` label of the CA: `node` or `waypoint`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerTypeLabels {
    /// The kind of caller.
    pub caller_type: &'static str,
}

/// `reason` label of refused certificate requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `unauthenticated`, `permission_denied`, `invalid_argument`, `unavailable`, `internal`.
    pub reason: &'static str,
}

/// Every metric the controller exports. Cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// `ambit_controller_resources{status}`: objects by validation verdict.
    pub resources: Family<StatusLabels, Gauge>,
    /// `ambit_controller_config_generation`: generation of the config being served.
    pub generation: Gauge,
    /// `ambit_controller_pushes_total{subscriber_type}`: updates sent.
    pub pushes: Family<SubscriberTypeLabels, Counter>,
    /// `ambit_controller_nacks_total{subscriber_type}`: updates rejected by a proxy.
    pub nacks: Family<SubscriberTypeLabels, Counter>,
    /// `ambit_controller_subscribers{subscriber_type}`: connected config streams.
    pub subscribers: Family<SubscriberTypeLabels, Gauge>,
    /// `ambit_controller_certificates_issued_total{caller_type}`.
    pub certificates_issued: Family<CallerTypeLabels, Counter>,
    /// `ambit_controller_certificate_refusals_total{reason}`.
    pub certificate_refusals: Family<RefusalLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` (which should carry the
    /// [`PREFIX`], see [`Metrics::registry`]).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "resources",
            "Configuration objects by validation status",
            m.resources.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the configuration being served",
            m.generation.clone(),
        );
        registry.register(
            "pushes",
            "Configuration updates sent to proxies",
            m.pushes.clone(),
        );
        registry.register(
            "nacks",
            "Configuration updates rejected by proxies",
            m.nacks.clone(),
        );
        registry.register(
            "subscribers",
            "Connected configuration streams",
            m.subscribers.clone(),
        );
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "certificate_refusals",
            "Certificate requests refused",
            m.certificate_refusals.clone(),
        );
        m
    }

    /// A fresh registry with the controller's prefix.
    pub fn registry() -> Registry {
        Registry::with_prefix(PREFIX)
    }

    /// Sets `resources{status}` from a list of verdicts.
    pub fn set_resources<'a>(&self, statuses: impl IntoIterator<Item = &'a str>) {
        let (mut accepted, mut rejected, mut ignored) = (0, 0, 0);
        for s in statuses {
            match s {
                "Accepted" => accepted += 1,
                "Rejected" => rejected += 1,
                _ => ignored += 1,
            }
        }
        for (status, n) in [
            ("Accepted", accepted),
            ("Rejected", rejected),
            ("Ignored", ignored),
        ] {
            self.resources
                .get_or_create(&StatusLabels { status })
                .set(n);
        }
    }
}

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be a bug in an encoder.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prefix_and_labels() {
        let mut registry = Metrics::registry();
        let m = Metrics::new(&mut registry);
        m.set_resources(["Accepted", "Accepted", "Rejected"]);
        m.pushes
            .get_or_create(&SubscriberTypeLabels {
                subscriber_type: "node",
            })
            .inc();
        let text = encode(&registry);
        assert!(
            text.contains("ambit_controller_resources{status=\"Accepted\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ambit_controller_pushes_total{subscriber_type=\"node\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

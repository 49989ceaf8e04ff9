//! Istio's TCP metrics (`istio_tcp_*`), one registry for the daemon.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The labels of every TCP metric (Istio's names).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: String,
    /// The source workload (owner) name, or `unknown`.
    pub source_workload: String,
    /// The source's SPIFFE identity (without `spiffe://`), or `unknown`.
    pub source_principal: String,
    /// The destination workload (owner) name, or `unknown`.
    pub destination_workload: String,
    /// The destination's SPIFFE identity (without `spiffe://`), or `unknown`.
    pub destination_principal: String,
    /// The destination Service's hostname, or `unknown`.
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
}

/// The TCP connection metrics.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response (from the destination to the client)",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request (from the client by the destination)",
            m.received.clone(),
        );
        m
    }

    /// A connection was opened.
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection closed after `to_destination` bytes from the client and
    /// `from_destination` bytes back. Istio's names are the destination's view:
    /// `received` is the request direction, `sent` the response direction.
    pub fn closed(&self, labels: &TcpLabels, to_destination: u64, from_destination: u64) {
        self.closed.get_or_create(labels).inc();
        self.received.get_or_create(labels).inc_by(to_destination);
        self.sent.get_or_create(labels).inc_by(from_destination);
    }
}

/// A principal label value: the identity without `spiffe://`, or `unknown`.
pub fn principal(id: Option<&str>) -> String {
    match id {
        Some(id) if !id.is_empty() => id.strip_prefix("spiffe://").unwrap_or(id).to_owned(),
        _ => "unknown".to_owned(),
    }
}

/// A workload label value: the owner name, else the pod name, else `unknown`.
pub fn workload(w: Option<&ambit_api::config::v1::Workload>) -> String {
    match w {
        Some(w) if !w.workload_name.is_empty() => w.workload_name.clone(),
        Some(w) if !w.name.is_empty() => w.name.clone(),
        _ => "unknown".to_owned(),
    }
}

/// A service label value: the Service's hostname, else `<name>.<namespace>`, else
/// `unknown`.
pub fn service(s: Option<&ambit_api::config::v1::Service>) -> String {
    match s {
        Some(s) if !s.hostname.is_empty() => s.hostname.clone(),
        Some(s) => format!("{}.{}", s.name, s.namespace),
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_line(registry: &Registry, name: &str) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn exposes_istio_names_and_labels() {
        let mut registry = Registry::default();
        let m = TcpMetrics::register(&mut registry);
        let labels = TcpLabels {
            reporter: "destination".into(),
            source_workload: "checkout".into(),
            source_principal: principal(Some("spiffe://cluster.local/ns/production/sa/checkout")),
            destination_workload: "payment".into(),
            destination_principal: principal(None),
            destination_service: "unknown".into(),
            connection_security_policy: "mutual_tls".into(),
        };
        m.opened(&labels);
        m.closed(&labels, 10, 20);
        let line = |name: &str| out_line(&registry, name);
        assert!(line("istio_tcp_received_bytes_total").ends_with(" 10"));
        assert!(line("istio_tcp_sent_bytes_total").ends_with(" 20"));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"checkout\",source_principal=\"cluster.local/ns/production/sa/checkout\""), "{out}");
        assert!(out.contains("istio_tcp_sent_bytes_total{"), "{out}");
        assert!(out.contains("} 20"), "{out}");
        assert!(out.contains("destination_principal=\"unknown\""), "{out}");
    }
}

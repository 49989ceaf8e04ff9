//! HBONE's TLS configs: ambit-identity's TLS 1.3 mutual-auth configs with ALPN `h2`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ambit_identity::tls::TlsConfigError;
use ambit_identity::{SpiffeId, TrustBundle, WorkloadCertificate};

use crate::ALPN_H2;

/// A client config presenting `local` that accepts only a server proving
/// `expected`, chaining to `bundle`. No SNI, no session resumption, ALPN `h2`.
pub fn client_config(
    local: &WorkloadCertificate,
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut config = ambit_identity::tls::client_config(local, bundle, expected)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection is a full handshake against the identity expected now.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A server config presenting `local` that requires a client certificate chaining
/// to `bundle`. ALPN `h2`.
pub fn server_config(
    local: &WorkloadCertificate,
    bundle: Arc<TrustBundle>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let mut config = ambit_identity::tls::server_config(local, bundle)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Server configs by local address, rebuilt only when the certificate or the bundle
/// changed (building one parses the private key).
#[derive(Debug, Default)]
pub(crate) struct ServerConfigCache {
    entries: Mutex<HashMap<SocketAddr, CachedServerConfig>>,
}

#[derive(Debug)]
struct CachedServerConfig {
    cert: Arc<WorkloadCertificate>,
    bundle: Arc<TrustBundle>,
    config: Arc<rustls::ServerConfig>,
}

impl ServerConfigCache {
    pub(crate) fn get(
        &self,
        local: SocketAddr,
        cert: Arc<WorkloadCertificate>,
        bundle: Arc<TrustBundle>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(&local)
            && Arc::ptr_eq(&e.cert, &cert)
            && Arc::ptr_eq(&e.bundle, &bundle)
        {
            return Ok(e.config.clone());
        }
        let config = server_config(&cert, bundle.clone())?;
        entries.insert(
            local,
            CachedServerConfig {
                cert,
                bundle,
                config: config.clone(),
            },
        );
        Ok(config)
    }
}

//! TLS for client connections: the acceptor built from `[tls]`'s PEM files (rustls with the
//! `ring` provider). A client that sends SSLRequest gets `S` and a handshake when it is configured,
//! `N` otherwise; `tls.require` refuses clients that stay in clear text.

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct TlsError(String);

/// The acceptor for `config`, or `None` when TLS is not configured.
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    if config.cert_file.is_empty() {
        return Ok(None);
    }
    let (certs, key) =
        common::tls::load_pem(&config.cert_file, &config.key_file).map_err(|e| TlsError(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("certificate and key do not make a usable pair: {e}")))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

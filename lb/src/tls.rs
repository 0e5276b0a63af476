//! TLS termination with rustls (`ring` provider): one server config per TLS address, whose
//! certificate is chosen by SNI with the same virtual-server policy as Host routing
//! ([`Router::vhost_index`]); ALPN offers `h2` and `http/1.1`; session tickets on, as nginx's
//! default. Certificates are read when the config is built, so a reload re-reads them; a file that
//! no longer loads keeps the certificate loaded before and says why.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::ring as provider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::route::{host_name, Router};

/// TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// The config key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A loaded certificate and the files it came from.
#[derive(Debug)]
struct Loaded {
    files: (String, String, String),
    key: Arc<CertifiedKey>,
}

/// The TLS side of a runtime: an acceptor per TLS address.
#[derive(Default)]
pub struct Tls {
    acceptors: Vec<(SocketAddr, TlsAcceptor)>,
    loaded: Vec<Loaded>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field(
                "addrs",
                &self.acceptors.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Picks a virtual server's certificate by SNI (the default server's without SNI or match).
#[derive(Debug)]
struct Sni {
    router: Arc<Router>,
    listen: SocketAddr,
    /// By virtual-server index; `None` for servers without TLS here.
    keys: Vec<Option<Arc<CertifiedKey>>>,
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for Sni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(host_name).unwrap_or_default();
        let chosen = self
            .router
            .vhost_index(self.listen, &name)
            .and_then(|i| self.keys.get(i).cloned().flatten());
        Some(chosen.unwrap_or_else(|| self.fallback.clone()))
    }
}

fn load(cert: &str, key: &str, ocsp: &str) -> Result<Arc<CertifiedKey>, String> {
    let (chain, der) = common::tls::load_pem(cert, key).map_err(|e| e.to_string())?;
    let mut certified = CertifiedKey::from_der(chain, der, &provider::default_provider())
        .map_err(|e| format!("certificate {cert} and key {key} do not make a usable pair: {e}"))?;
    if !ocsp.is_empty() {
        let response = std::fs::read(ocsp).map_err(|e| format!("cannot read OCSP response {ocsp}: {e}"))?;
        // A DER OCSPResponse is a SEQUENCE; anything else would be stapled as garbage.
        if response.first() != Some(&0x30) || response.len() > 64 * 1024 {
            return Err(format!("{ocsp} is not a DER OCSP response"));
        }
        certified.ocsp = Some(response);
    }
    Ok(Arc::new(certified))
}

impl Tls {
    /// Loads every virtual server's certificate and builds the acceptors. A certificate that
    /// does not load is taken from `old` when it had the same files (and a warning says why);
    /// otherwise the error names the key.
    pub fn build(config: &Config, router: &Arc<Router>, old: Option<&Tls>) -> Result<Tls, TlsError> {
        let mut loaded: Vec<Loaded> = Vec::new();
        let mut keys: Vec<Option<Arc<CertifiedKey>>> = Vec::with_capacity(config.vhosts.len());
        for (i, v) in config.vhosts.iter().enumerate() {
            let Some(t) = &v.tls else {
                keys.push(None);
                continue;
            };
            let files = (t.certificate.clone(), t.key.clone(), t.ocsp_file.clone());
            if let Some(l) = loaded.iter().find(|l| l.files == files) {
                keys.push(Some(l.key.clone()));
                continue;
            }
            let key = match load(&t.certificate, &t.key, &t.ocsp_file) {
                Ok(k) => k,
                Err(message) => match old.and_then(|o| o.loaded.iter().find(|l| l.files == files)) {
                    Some(prev) => {
                        tracing::error!(
                            certificate = %t.certificate,
                            error = %message,
                            "keeping the certificate loaded before"
                        );
                        prev.key.clone()
                    }
                    None => {
                        return Err(TlsError {
                            key: format!("vhosts[{i}].tls.certificate"),
                            message,
                        })
                    }
                },
            };
            loaded.push(Loaded {
                files,
                key: key.clone(),
            });
            keys.push(Some(key));
        }
        let mut acceptors = Vec::new();
        for addr in tls_addrs(config) {
            // The default server of the address decides the protocols and the certificate
            // for clients without (or with an unknown) server name.
            let on = |v: &&crate::config::VhostConfig| {
                v.tls
                    .as_ref()
                    .is_some_and(|t| t.listen.iter().any(|a| a.parse() == Ok(addr)))
            };
            let default = router
                .vhost_index(addr, "")
                .filter(|&i| config.vhosts.get(i).is_some_and(|v| on(&v)))
                .or_else(|| config.vhosts.iter().position(|v| on(&v)))
                .expect("a TLS address belongs to a virtual server");
            let tls = config.vhosts[default].tls.as_ref().expect("checked above");
            let versions: Vec<&'static rustls::SupportedProtocolVersion> = if tls.protocols.is_empty() {
                vec![&rustls::version::TLS13, &rustls::version::TLS12]
            } else {
                tls.protocols
                    .iter()
                    .map(|p| match p.as_str() {
                        "TLSv1.2" => &rustls::version::TLS12,
                        _ => &rustls::version::TLS13,
                    })
                    .collect()
            };
            let fallback = keys[default].clone().expect("a TLS server has a key");
            let sni = Sni {
                router: router.clone(),
                listen: addr,
                keys: keys.clone(),
                fallback,
            };
            let mut server = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_protocol_versions(&versions)
                .map_err(|e| TlsError {
                    key: format!("vhosts[{default}].tls.protocols"),
                    message: e.to_string(),
                })?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(sni));
            server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            server.ticketer = provider::Ticketer::new().map_err(|e| TlsError {
                key: format!("vhosts[{default}].tls"),
                message: format!("cannot make session tickets: {e}"),
            })?;
            acceptors.push((addr, TlsAcceptor::from(Arc::new(server))));
        }
        Ok(Tls { acceptors, loaded })
    }

    /// The acceptor of a TLS address, `None` for a plain-text one.
    pub fn acceptor(&self, listen: SocketAddr) -> Option<&TlsAcceptor> {
        self.acceptors.iter().find(|(a, _)| *a == listen).map(|(_, t)| t)
    }
}

/// The addresses that speak TLS.
pub fn tls_addrs(config: &Config) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in config
        .vhosts
        .iter()
        .filter_map(|v| v.tls.as_ref())
        .flat_map(|t| &t.listen)
        .filter_map(|a| a.parse().ok())
    {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// nginx's `$ssl_protocol` spelling of a negotiated version.
pub fn protocol_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "-",
    }
}

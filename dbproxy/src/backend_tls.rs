//! TLS for dbproxy's own connections to the PostgreSQL servers (libpq's `sslmode`): the rustls
//! client configurations built once from `[tls]`, the SSLRequest exchange on a fresh socket (for
//! dbproxy's own logins and for tokio-postgres' in health checks and failover steps), and the rule
//! that a server's request for a clear-text password is refused on an unencrypted link.

use std::sync::Arc;

use bytes::BytesMut;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::backend::{BackendError, Stream};
use crate::config::{BackendTlsMode, NodeConfig, TlsConfig};
use crate::protocol::startup::{self, SslAnswer};
use crate::protocol::{self, auth as pauth, BackendMessage};

/// Why the backend TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    /// The CA file cannot be read or holds no certificate.
    #[error("cannot use {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The client side of TLS to the servers, built once at start.
#[derive(Debug, Clone)]
pub struct BackendTls {
    /// The mode of nodes without their own `tls`.
    pub mode: BackendTlsMode,
    /// `tls.backend_allow_cleartext_password`.
    pub allow_cleartext: bool,
    /// Encrypts without checking the certificate (`prefer`, `require`).
    encrypt: Result<Arc<ClientConfig>, String>,
    /// Checks the chain against `tls.backend_ca_file` and the host name (`verify-full`).
    verify: Result<Arc<ClientConfig>, String>,
}

impl Default for BackendTls {
    fn default() -> Self {
        BackendTls::new(&TlsConfig::default()).expect("no CA file to read")
    }
}

impl BackendTls {
    /// The configurations for `config` (reads `backend_ca_file` when set).
    pub fn new(config: &TlsConfig) -> Result<BackendTls, BackendTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let encrypt = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider.clone())))
            .with_no_client_auth();
        let verify = if config.backend_ca_file.is_empty() {
            Err("verify-full needs tls.backend_ca_file".to_string())
        } else {
            let path = &config.backend_ca_file;
            let ca_error = |message: String| BackendTlsError::CaFile {
                path: path.clone(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no certificate in it".to_string()));
            }
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots.add(c).map_err(|e| ca_error(e.to_string()))?;
            }
            Ok(Arc::new(
                ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        };
        Ok(BackendTls {
            mode: config.backend,
            allow_cleartext: config.backend_allow_cleartext_password,
            encrypt: Ok(Arc::new(encrypt)),
            verify,
        })
    }

    /// Settings that make every encrypted connection fail with `reason` (the CA file became
    /// unusable between validation and start): never a silent fall-back to clear text.
    pub fn broken(config: &TlsConfig, reason: String) -> BackendTls {
        BackendTls {
            mode: config.backend,
            allow_cleartext: config.backend_allow_cleartext_password,
            encrypt: Err(reason.clone()),
            verify: Err(reason),
        }
    }

    /// The mode for `node`.
    pub fn mode_for(&self, node: &NodeConfig) -> BackendTlsMode {
        node.tls.unwrap_or(self.mode)
    }

    fn client_config(&self, mode: BackendTlsMode) -> Result<Arc<ClientConfig>, BackendError> {
        let c = if mode == BackendTlsMode::VerifyFull {
            &self.verify
        } else {
            &self.encrypt
        };
        c.clone().map_err(BackendError::Tls)
    }

    /// Asks the server on `tcp` (just connected to `host`) for TLS with SSLRequest when `mode`
    /// wants it, and runs the handshake when it agrees.
    pub async fn negotiate(
        &self,
        mode: BackendTlsMode,
        host: &str,
        mut tcp: TcpStream,
    ) -> Result<Stream, BackendError> {
        if mode == BackendTlsMode::Disable {
            return Ok(Stream::Plain(tcp));
        }
        let config = self.client_config(mode)?;
        let mut req = BytesMut::with_capacity(8);
        startup::encode_ssl_request(&mut req);
        tcp.write_all(&req).await?;
        // Exactly one byte: anything the server sent after it, before the handshake, must not be
        // read as part of it (CVE-2021-23222).
        let answer = tcp.read_u8().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => BackendError::Closed,
            _ => e.into(),
        })?;
        match startup::ssl_answer(answer)? {
            SslAnswer::Accepted => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| BackendError::Tls(format!("host name {host:?} cannot be checked: {e}")))?;
                let tls = TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| BackendError::Tls(format!("handshake with {host} failed: {e}")))?;
                Ok(Stream::TlsClient(Box::new(tls)))
            }
            SslAnswer::Refused if mode == BackendTlsMode::Prefer => {
                // The server said N; PostgreSQL expects the startup packet next on this socket.
                Ok(Stream::Plain(tcp))
            }
            SslAnswer::Refused => Err(BackendError::Tls(format!(
                "the server at {host} does not accept TLS (tls.backend or the node's tls is {}; \
                 turn ssl on in its postgresql.conf, or set it to prefer)",
                mode_name(mode)
            ))),
        }
    }

    /// Whether a server's AuthenticationCleartextPassword may be answered on this link.
    pub fn check_cleartext(&self, encrypted: bool) -> Result<(), BackendError> {
        if encrypted || self.allow_cleartext {
            return Ok(());
        }
        Err(BackendError::Auth(BackendTls::refusal().to_string()))
    }

    fn refusal() -> &'static str {
        "the server asks for a clear-text password on an unencrypted connection: refused \
         (use TLS to the servers with tls.backend = \"require\", or allow it with \
         tls.backend_allow_cleartext_password = true)"
    }

    /// Connects tokio-postgres (health checks, failover steps) to `host:port` with `config`,
    /// over the link `mode` gives (the same SSLRequest exchange as the sessions'), and refuses
    /// a clear-text password request on a plain link, which tokio-postgres would answer itself.
    pub async fn connect_postgres(
        &self,
        mode: BackendTlsMode,
        host: &str,
        port: u16,
        config: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, ConnectError> {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(BackendError::from)?;
        let _ = tcp.set_nodelay(true);
        let stream = self.negotiate(mode, host, tcp).await?;
        let guard = CleartextGuard {
            watching: !stream.is_encrypted() && !self.allow_cleartext,
            inner: stream,
            seen: BytesMut::new(),
        };
        let (client, conn) = config.connect_raw(guard, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// Why a tokio-postgres connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting, or TLS (see [`BackendTls::negotiate`]).
    #[error("{0}")]
    Link(#[from] BackendError),
    /// tokio-postgres' login (a refused clear-text password shows here too, as the source).
    #[error("{}", with_source(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// tokio-postgres' message, with its cause ("error communicating with the server" alone says
/// little).
fn with_source(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A server link that fails the read carrying an AuthenticationCleartextPassword (decoded from a
/// copy of the bytes until the login is over), so tokio-postgres never answers it.
struct CleartextGuard {
    inner: Stream,
    /// Login bytes seen so far, not yet decoded.
    seen: BytesMut,
    /// Still inside the login of a plain link where clear text is not allowed.
    watching: bool,
}

impl CleartextGuard {
    fn inspect(&mut self) -> std::io::Result<()> {
        loop {
            let frame = match protocol::decode(&mut self.seen, 64 * 1024) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                // tokio-postgres reports a broken frame itself.
                Err(_) => break,
            };
            match BackendMessage::parse(&frame) {
                Ok(BackendMessage::Authentication {
                    code: pauth::CLEARTEXT,
                    ..
                }) => {
                    let refusal = BackendTls::refusal();
                    return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, refusal));
                }
                Ok(BackendMessage::Authentication { code: pauth::OK, .. }) | Err(_) => break,
                Ok(BackendMessage::ErrorResponse(_)) => break,
                Ok(_) => {}
            }
        }
        self.watching = false;
        self.seen = BytesMut::new();
        Ok(())
    }
}

impl tokio::io::AsyncRead for CleartextGuard {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.watching {
            this.seen.extend_from_slice(&buf.filled()[before..]);
            this.inspect()?;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for CleartextGuard {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The value as written in the configuration.
pub fn mode_name(mode: BackendTlsMode) -> &'static str {
    match mode {
        BackendTlsMode::Disable => "disable",
        BackendTlsMode::Prefer => "prefer",
        BackendTlsMode::Require => "require",
        BackendTlsMode::VerifyFull => "verify-full",
    }
}

/// `require`'s verifier: any certificate, but the handshake signatures are still checked (so the
/// server holds the key of the certificate it shows).
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_is_refused_in_clear_unless_allowed() {
        let mut config = TlsConfig::default();
        let tls = BackendTls::new(&config).unwrap();
        assert!(tls.check_cleartext(true).is_ok());
        let e = tls.check_cleartext(false).unwrap_err().to_string();
        assert!(e.contains("tls.backend_allow_cleartext_password"), "{e}");
        config.backend_allow_cleartext_password = true;
        assert!(BackendTls::new(&config).unwrap().check_cleartext(false).is_ok());
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let config = TlsConfig {
            backend_ca_file: "/nonexistent/ca.pem".into(),
            ..TlsConfig::default()
        };
        let e = BackendTls::new(&config).unwrap_err().to_string();
        assert!(e.starts_with("cannot use /nonexistent/ca.pem"), "{e}");
        let tls = BackendTls::default();
        let e = tls
            .client_config(BackendTlsMode::VerifyFull)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.backend_ca_file"), "{e}");
    }
}

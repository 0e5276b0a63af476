//! PEM files for rustls: the certificate chain and private key lb and dbproxy serve TLS with.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain or key that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The certificate file is unreadable or not PEM.
    #[error("cannot read certificates from {path}: {message}")]
    Certificates {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(String),
    /// The key file is unreadable or holds no private key.
    #[error("cannot read a private key from {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_pem(
    cert_file: &str,
    key_file: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PemError::Certificates {
            path: cert_file.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate(cert_file.to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| PemError::Key {
        path: key_file.to_string(),
        message: e.to_string(),
    })?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("common-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let empty = empty.to_str().unwrap();
        let e = load_pem("/nonexistent/cert.pem", empty).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        let e = load_pem(empty, empty).unwrap_err().to_string();
        assert!(e.contains("no certificate") && e.contains("empty.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

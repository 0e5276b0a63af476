//! Certificates made with `openssl` (a test CA and leaf certificates per host name), a rustls
//! client that trusts the CA, and `curl` as a real TLS and HTTP/2 client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

fn openssl(args: &[&str]) -> Result<()> {
    // Every path given is absolute.
    testkit::openssl(Path::new("/"), args)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a UTF-8 path")
}

/// A test certificate authority in `dir`: (`ca.crt`, `ca.key`).
pub fn ca(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=lb test CA",
        "-keyout",
        path(&key)?,
        "-out",
        path(&crt)?,
    ])?;
    Ok((crt, key))
}

/// A certificate for `name` signed by the CA, written to `stem.crt` and `stem.key` in `dir`.
pub fn leaf(dir: &Path, ca: &(PathBuf, PathBuf), name: &str, stem: &str) -> Result<(PathBuf, PathBuf)> {
    let (crt, key, csr, ext) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}.csr")),
        dir.join(format!("{stem}.ext")),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        path(&key)?,
        "-out",
        path(&csr)?,
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        path(&csr)?,
        "-CA",
        path(&ca.0)?,
        "-CAkey",
        path(&ca.1)?,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        path(&ext)?,
        "-out",
        path(&crt)?,
    ])?;
    Ok((crt, key))
}

/// The DER of the first certificate in a PEM file.
pub fn der(pem: &Path) -> Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_file(pem)?.as_ref().to_vec())
}

/// A rustls client trusting `ca`, offering `alpn`.
pub fn client(ca: &Path, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// A TLS connection to `addr` with server name `sni`.
pub async fn connect(connector: &TlsConnector, addr: SocketAddr, sni: &str) -> Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(super::DEADLINE, TcpStream::connect(addr)).await??;
    let name = ServerName::try_from(sni.to_string())?;
    Ok(tokio::time::timeout(super::DEADLINE, connector.connect(name, tcp)).await??)
}

/// `curl` over TLS to `https://host:port{path}` (resolved to `addr`, trusting `ca`); returns the
/// body followed by a line with the HTTP version curl used.
pub fn curl(ca: &Path, addr: SocketAddr, host: &str, path: &str, extra: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{}:{}", addr.port(), addr.ip())])
        .args(["-w", "\n%{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{}{path}", addr.port()))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A signed "good" OCSP response for `cert` made by openssl's responder, in `dir/stem.ocsp`.
pub fn ocsp_response(dir: &Path, ca: &(PathBuf, PathBuf), cert: &Path, stem: &str) -> Result<PathBuf> {
    let out = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-serial",
            "-subject",
            "-nameopt",
            "compat",
            "-in",
            path(cert)?,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "openssl x509: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let serial = text
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .context("a serial")?;
    let subject = text
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .context("a subject")?
        .trim();
    let index = dir.join(format!("{stem}.index"));
    std::fs::write(
        &index,
        format!("V\t301231000000Z\t\t{serial}\tunknown\t{subject}\n"),
    )?;
    let (req, resp) = (dir.join(format!("{stem}.req")), dir.join(format!("{stem}.ocsp")));
    openssl(&[
        "ocsp",
        "-issuer",
        path(&ca.0)?,
        "-cert",
        path(cert)?,
        "-no_nonce",
        "-reqout",
        path(&req)?,
    ])?;
    openssl(&[
        "ocsp",
        "-index",
        path(&index)?,
        "-rsigner",
        path(&ca.0)?,
        "-rkey",
        path(&ca.1)?,
        "-CA",
        path(&ca.0)?,
        "-reqin",
        path(&req)?,
        "-respout",
        path(&resp)?,
        "-ndays",
        "1",
    ])?;
    Ok(resp)
}

/// What `openssl s_client -status` prints about the stapled OCSP response for `sni` at `addr`.
pub fn s_client_status(addr: SocketAddr, sni: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-status",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running openssl s_client")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Serves `conf` (an nginx.conf) with lb in this process; lb stops when the guard drops.
pub async fn serve(conf: &str) -> Result<tokio_util::sync::DropGuard> {
    let t = lb::nginx_conf::translate(conf)?;
    let mut config: lb::Config = common::ConfigSource::new().base(t.table).load()?;
    config.admin_listen = "127.0.0.1:0".into();
    config.access_log.enabled = false;
    let mut listeners = Vec::new();
    for a in config.listen_addrs() {
        listeners.push(tokio::net::TcpListener::bind(&a).await?);
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let guard = shutdown.clone().drop_guard();
    tokio::spawn(lb::Lb::new(config)?.serve_all(listeners, shutdown));
    Ok(guard)
}

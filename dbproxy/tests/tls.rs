//! TLS for clients: psql with `sslmode=require` talks to dbproxy over TLS (a certificate made
//! with openssl), `tls.require` refuses clear-text clients the way PostgreSQL's hostssl rules do,
//! bytes sent before the handshake are refused, and a dbproxy without TLS answers `N`.

mod support;

use anyhow::{ensure, Context, Result};
use support::{code, config_for, pg_program, Proxy, Raw};
use testkit::PgCluster;
use tokio::io::AsyncReadExt;

/// A self-signed certificate and key for 127.0.0.1 in `dir`.
fn certificate(dir: &std::path::Path) -> Result<(String, String)> {
    testkit::self_signed(dir, "server", "127.0.0.1")?;
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    Ok((cert.display().to_string(), key.display().to_string()))
}

/// psql through the proxy with `sslmode`; stdout, or stderr as the error.
fn psql_ssl(proxy: &Proxy, sslmode: &str, sql: &str) -> Result<String, String> {
    let out = pg_program("psql")
        .map_err(|e| e.to_string())?
        .args(["-X", "-A", "-t", "-c", sql])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres password=pw sslmode={sslmode}",
            proxy.port()
        ))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_can_use_tls_and_may_be_required_to() -> Result<()> {
    support::bounded(body()).await
}

async fn body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let dir = tempfile::tempdir()?;
    let (cert, key) = certificate(dir.path())?;

    // Optional TLS: psql negotiates it when asked to, and still may go without.
    let mut cfg = config_for(&cluster, Some("pw"));
    cfg.tls.cert_file = cert.clone();
    cfg.tls.key_file = key.clone();
    let proxy = Proxy::start(cfg)?;
    tokio::task::block_in_place(|| -> Result<()> {
        let r = psql_ssl(&proxy, "require", "select 41 + 1").map_err(anyhow::Error::msg)?;
        ensure!(r == "42", "{r}");
        let r = psql_ssl(&proxy, "disable", "select 1").map_err(anyhow::Error::msg)?;
        ensure!(r == "1", "{r}");
        Ok(())
    })?;
    // A client that pipelines its startup packet behind the SSLRequest is refused, unencrypted.
    let mut raw = Raw::connect(&proxy).await?;
    let mut both = vec![0, 0, 0, 8, 4, 210, 22, 47];
    both.extend_from_slice(&[0, 0, 0, 8, 0, 3, 0, 0]);
    raw.send(&both).await?;
    assert_eq!(raw.fatal_code().await?, "08P01");

    // Required TLS: clear-text clients get PostgreSQL's hostssl refusal.
    let mut cfg = config_for(&cluster, Some("pw"));
    cfg.tls.cert_file = cert;
    cfg.tls.key_file = key;
    cfg.tls.require = true;
    let required = Proxy::start(cfg)?;
    tokio::task::block_in_place(|| -> Result<()> {
        let r = psql_ssl(&required, "require", "select 'secure'").map_err(anyhow::Error::msg)?;
        ensure!(r == "secure", "{r}");
        let e = psql_ssl(&required, "disable", "select 1").unwrap_err();
        ensure!(
            e.contains("no pg_hba.conf entry") && e.contains("no encryption"),
            "{e}"
        );
        Ok(())
    })?;
    let e = tokio_postgres::connect(&required.conn_string("postgres", "pw"), tokio_postgres::NoTls)
        .await
        .err()
        .context("a clear-text login must fail")?;
    assert_eq!(code(&e), "28000");

    // Without TLS configured, an SSLRequest is answered `N` and the client carries on.
    let plain = Proxy::start(config_for(&cluster, Some("pw")))?;
    let mut raw = Raw::connect(&plain).await?;
    raw.send(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
    let mut answer = [0u8; 1];
    raw.s.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"N");
    tokio::task::block_in_place(|| -> Result<()> {
        let e = psql_ssl(&plain, "require", "select 1").unwrap_err();
        ensure!(e.contains("does not support SSL") || e.contains("SSL"), "{e}");
        Ok(())
    })?;
    Ok(())
}

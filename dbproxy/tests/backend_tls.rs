//! TLS from dbproxy to the PostgreSQL servers (`tls.backend`): real servers with `ssl = on` and a
//! certificate signed by a CA made with openssl. `require` encrypts the pool's, the health
//! checks' and the sessions' connections; `require` against a server without TLS fails with a
//! clear error; `verify-full` refuses a certificate from another CA or for another host name; a
//! server's request for a clear-text password is refused over plain TCP and answered over TLS.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use dbproxy::auth::Credentials;
use dbproxy::backend::{self, BackendError, Target};
use dbproxy::backend_tls::BackendTls;
use dbproxy::config::{BackendTlsMode, TlsConfig};
use support::{config_for, Proxy};
use testkit::PgCluster;

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    testkit::openssl(dir, args)
}

/// In `dir`: `ca.crt` (a CA), `server.crt`/`server.key` (signed by it, for 127.0.0.1 only) and
/// `other-ca.crt` (a CA that signed nothing here).
fn certificates(dir: &Path) -> Result<()> {
    testkit::self_signed(dir, "ca", "ca")?;
    testkit::self_signed(dir, "other-ca", "other-ca")?;
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    )?;
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    )
}

fn tls(mode: BackendTlsMode, ca: &Path, allow_cleartext: bool) -> Result<BackendTls> {
    Ok(BackendTls::new(&TlsConfig {
        backend: mode,
        backend_ca_file: ca.display().to_string(),
        backend_allow_cleartext_password: allow_cleartext,
        ..TlsConfig::default()
    })?)
}

/// One login as `postgres` with password `pw` to `host:port`, then whether the connection is
/// encrypted (the server's own view, pg_stat_ssl).
async fn login(host: &str, port: u16, tls: &BackendTls, mode: BackendTlsMode) -> Result<bool, BackendError> {
    let creds = Credentials {
        plain: Some("pw".into()),
        ..Credentials::default()
    };
    let params = [
        ("user".to_string(), "postgres".to_string()),
        ("database".to_string(), "postgres".to_string()),
    ];
    let target = Target {
        host,
        port,
        tls,
        mode,
    };
    let (b, _) = backend::connect(
        0,
        target,
        &params,
        "postgres",
        Some(&creds),
        1 << 20,
        Duration::from_secs(10),
    )
    .await?;
    Ok(b.conn.stream.is_encrypted())
}

fn set_hba(c: &PgCluster, method: &str) -> Result<()> {
    let text = format!("local all all trust\nhost all all 127.0.0.1/32 {method}\n");
    for n in c.nodes() {
        std::fs::write(n.data_dir().join("pg_hba.conf"), &text)?;
        n.psql("select pg_reload_conf()")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_modes_and_cleartext_passwords() -> Result<()> {
    support::bounded(modes_body()).await
}

async fn modes_body() -> Result<()> {
    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let c = tokio::task::spawn_blocking(move || PgCluster::builder().password("pw").tls(cert, key).start())
        .await??;
    let plain = tokio::task::spawn_blocking(|| PgCluster::builder().password("pw").start()).await??;
    let (ca, other) = (dir.path().join("ca.crt"), dir.path().join("other-ca.crt"));
    let port = c.primary().port();
    use BackendTlsMode::*;

    // require and verify-full encrypt; disable does not; prefer takes TLS when offered.
    assert!(login("127.0.0.1", port, &tls(Require, &ca, false)?, Require).await?);
    assert!(login("127.0.0.1", port, &tls(VerifyFull, &ca, false)?, VerifyFull).await?);
    assert!(login("127.0.0.1", port, &tls(Prefer, &ca, false)?, Prefer).await?);
    assert!(!login("127.0.0.1", port, &tls(Disable, &ca, false)?, Disable).await?);

    // verify-full: a certificate from another CA, or for another name, is refused.
    let e = login("127.0.0.1", port, &tls(VerifyFull, &other, false)?, VerifyFull)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("tls to the server: handshake with 127.0.0.1 failed") && e.contains("UnknownIssuer"),
        "{e}"
    );
    let e = login("localhost", port, &tls(VerifyFull, &ca, false)?, VerifyFull)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("handshake with localhost failed") && e.contains("not valid for name \"localhost\""),
        "{e}"
    );
    // require does not check the certificate (libpq's sslmode=require).
    assert!(login("localhost", port, &tls(Require, &other, false)?, Require).await?);

    // require against a server without TLS: a clear error; prefer falls back to clear text.
    let pport = plain.primary().port();
    let e = login("127.0.0.1", pport, &tls(Require, &ca, false)?, Require)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the server at 127.0.0.1 does not accept TLS"), "{e}");
    assert!(!login("127.0.0.1", pport, &tls(Prefer, &ca, false)?, Prefer).await?);

    // pg_hba.conf method `password`: refused over plain TCP unless allowed, answered over TLS.
    set_hba(&c, "password")?;
    let e = login("127.0.0.1", port, &tls(Disable, &ca, false)?, Disable)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clear-text password on an unencrypted connection")
            && e.contains("tls.backend_allow_cleartext_password"),
        "{e}"
    );
    assert!(login("127.0.0.1", port, &tls(Require, &ca, false)?, Require).await?);
    assert!(!login("127.0.0.1", port, &tls(Disable, &ca, true)?, Disable).await?);
    // The same for tokio-postgres' logins (health checks, failover steps).
    let mut pg = tokio_postgres::Config::new();
    pg.user("postgres").password("pw").dbname("postgres");
    let e = tls(Disable, &ca, false)?
        .connect_postgres(Disable, "127.0.0.1", port, &pg)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clear-text password on an unencrypted connection"),
        "{e}"
    );
    let client = tls(VerifyFull, &ca, false)?
        .connect_postgres(VerifyFull, "127.0.0.1", port, &pg)
        .await?;
    let row = client
        .query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[])
        .await?;
    assert!(row.get::<_, bool>(0));
    tls(Disable, &ca, true)?
        .connect_postgres(Disable, "127.0.0.1", port, &pg)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_connections_to_servers_are_encrypted() -> Result<()> {
    support::bounded(proxy_body()).await
}

async fn proxy_body() -> Result<()> {
    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let c = tokio::task::spawn_blocking(move || {
        PgCluster::builder()
            .standbys(1)
            .password("pw")
            .tls(cert, key)
            .start()
    })
    .await??;
    let mut config = config_for(&c, Some("pw"));
    config.tls.backend = BackendTlsMode::VerifyFull;
    config.tls.backend_ca_file = dir.path().join("ca.crt").display().to_string();
    // Only pg_hba's `password` method on the servers: every login of dbproxy's must be encrypted.
    set_hba(&c, "password")?;
    let proxy = Proxy::start(config)?;
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
            proxy.port()
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    // The session's server connection (a read, balanced to either node) and a write's.
    let row = client
        .query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[])
        .await?;
    assert!(row.get::<_, bool>(0), "the session's connection is encrypted");
    client
        .batch_execute("create table t (i int); insert into t values (1)")
        .await?;
    // The health checks' connections (application_name dbproxy-health) on every node.
    for n in c.nodes() {
        testkit::wait_for("an encrypted health check", Duration::from_secs(30), || {
            let out = n.psql(
                "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
                 where a.application_name = 'dbproxy-health' and s.ssl",
            )?;
            Ok((out.trim() != "0").then_some(()))
        })?;
        let clear = n.psql(
            "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
             where a.backend_type = 'client backend' and not s.ssl and a.client_addr is not null",
        )?;
        assert_eq!(clear.trim(), "0", "{}: a TCP connection in clear text", n.name());
    }
    Ok(())
}

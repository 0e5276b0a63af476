//! Authentication without passwords on disk, through real PostgreSQL servers and real clients
//! (tokio-postgres, psql, psycopg): pass-through to the primary for each pg_hba method the
//! servers use (trust, password, md5, SCRAM-SHA-256), and PgBouncer's `auth_query` with SCRAM
//! and md5 verifiers, its cache and its errors.

mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use dbproxy::config::{AuthMethod, HbaRule, UserConfig};
use dbproxy::protocol::{auth as pauth, startup};
use support::{config_for, Proxy, Raw};
use testkit::{PgCluster, DEADLINE};

/// Rewrites pg_hba.conf on every node (the superuser and replication keep SCRAM) with `lines`
/// for everyone else, and reloads each node.
fn set_hba(c: &PgCluster, lines: &str) -> Result<()> {
    let text = format!(
        "local all all trust\nhost replication all 127.0.0.1/32 scram-sha-256\n\
         host all postgres 127.0.0.1/32 scram-sha-256\n{lines}\n"
    );
    for n in c.nodes() {
        std::fs::write(n.data_dir().join("pg_hba.conf"), &text)?;
        n.psql("select pg_reload_conf()")?;
    }
    Ok(())
}

/// A tokio-postgres login to `port`; the error's SQLSTATE and message on failure.
async fn pg(port: u16, user: &str, password: &str) -> Result<tokio_postgres::Client, (String, String)> {
    let cs = format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres connect_timeout=10"
    );
    match tokio_postgres::connect(&cs, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Ok(client)
        }
        Err(e) => Err(match e.as_db_error() {
            Some(d) => (d.code().code().to_string(), d.message().to_string()),
            None => (String::new(), e.to_string()),
        }),
    }
}

/// Whether a direct login to every node works: the nodes have reloaded pg_hba.conf.
async fn every_node_accepts(c: &PgCluster, user: &str, password: &str) -> bool {
    for n in c.nodes() {
        if pg(n.port(), user, password).await.is_err() {
            return false;
        }
    }
    true
}

/// Polls (async) until `f` holds, for up to the test deadline.
async fn until<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Through tokio-postgres: a read's `pg_is_in_recovery()` (true: a standby ran it), then a write.
async fn read_then_write(proxy: &Proxy, user: &str, password: &str) -> Result<bool> {
    let c = pg(proxy.port(), user, password)
        .await
        .map_err(|e| anyhow::anyhow!("login as {user}: {e:?}"))?;
    let standby: bool = c.query_one("select pg_is_in_recovery()", &[]).await?.get(0);
    c.execute("insert into t values (1)", &[]).await?;
    Ok(standby)
}

/// The same through psql (one `-c` per statement, each its own request): `t` or `f`, or
/// psql's stderr.
fn psql_read_then_write(proxy: &Proxy, user: &str, password: &str) -> Result<String> {
    let out = support::pg_program("psql")?
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(proxy.port().to_string())
        .args(["-U", user, "-d", "postgres"])
        .args([
            "-c",
            "select pg_is_in_recovery()",
            "-c",
            "insert into t values (2)",
        ])
        .env("PGPASSWORD", password)
        .output()?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The same through psycopg 3: `True`/`False`, or `error <libpq's message>` (a failed login
/// carries no SQLSTATE in psycopg, only the server's message).
fn psycopg_read_then_write(proxy: &Proxy, user: &str, password: &str) -> Result<String> {
    let script = r#"
import sys, psycopg
try:
    with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2],
                         password=sys.argv[3], dbname="postgres", connect_timeout=10) as c:
        standby = c.execute("select pg_is_in_recovery()").fetchone()[0]
        c.execute("insert into t values (3)")
        print(standby)
except psycopg.OperationalError as e:
    print("error", str(e).replace("\n", " "))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &proxy.port().to_string(), user, password])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wrong_password(user: &str) -> (String, String) {
    (
        "28P01".to_string(),
        format!("password authentication failed for user \"{user}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_relays_every_method() -> Result<()> {
    support::bounded(pass_through_body()).await
}

async fn pass_through_body() -> Result<()> {
    let c = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    c.primary().psql(
        "create role app login password 'app-pw'; set password_encryption = 'md5'; \
         create role m5 login password 'm5-pw'; create table t (i int); grant all on t to app, m5",
    )?;
    c.wait_replicated()?;
    // Only the superuser (health checks) is configured; nobody else is listed anywhere.
    let mut config = config_for(&c, Some("pw"));
    config.auth.passthrough = true;
    config.limits.startup_timeout = 5.0;
    // The servers' links are plain TCP here: the cleartext step below needs this on purpose.
    let strict_state = tempfile::tempdir()?;
    let strict = Proxy::start(dbproxy::config::Config {
        state_dir: strict_state.path().display().to_string(),
        ..config.clone()
    })?;
    config.tls.backend_allow_cleartext_password = true;
    let proxy = Proxy::start(config)?;

    // SCRAM-SHA-256 (testkit's pg_hba.conf): the primary checks the proof; the session cannot
    // log in elsewhere, so its reads run on the primary.
    assert!(
        !read_then_write(&proxy, "app", "app-pw").await?,
        "read on the primary"
    );
    assert_eq!(
        pg(proxy.port(), "app", "wrong").await.err(),
        Some(wrong_password("app"))
    );
    assert_eq!(
        pg(proxy.port(), "ghost", "x").await.err(),
        Some(wrong_password("ghost"))
    );

    // md5 (m5's password is stored as an md5 hash), through psql.
    set_hba(&c, "host all all 127.0.0.1/32 md5")?;
    until("md5 on every node", || every_node_accepts(&c, "m5", "m5-pw")).await?;
    assert_eq!(psql_read_then_write(&proxy, "m5", "m5-pw")?, "f");
    let e = psql_read_then_write(&proxy, "m5", "wrong")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("password authentication failed for user \"m5\""),
        "{e}"
    );

    // Cleartext password, through psycopg: the password the client sent logs the session in to
    // the standby, which then runs the reads.
    set_hba(&c, "host all all 127.0.0.1/32 password")?;
    until("reads on the standby after a cleartext login", || async {
        psycopg_read_then_write(&proxy, "app", "app-pw").is_ok_and(|s| s == "True")
    })
    .await?;
    // Without tls.backend_allow_cleartext_password the client's password is not relayed over
    // the unencrypted server link.
    let e = psycopg_read_then_write(&strict, "app", "app-pw")?;
    assert!(
        e.contains("clear-text password on an unencrypted connection: refused")
            && e.contains("tls.backend_allow_cleartext_password"),
        "{e}"
    );
    let e = psycopg_read_then_write(&proxy, "app", "wrong")?;
    assert!(
        e.starts_with("error ") && e.ends_with("FATAL:  password authentication failed for user \"app\""),
        "{e}"
    );
    assert_eq!(
        pg(proxy.port(), "app", "wrong").await.err(),
        Some(wrong_password("app"))
    );

    // Trust: no password at all, reads on the standby, writes on the primary.
    set_hba(&c, "host all all 127.0.0.1/32 trust")?;
    until("trust on every node", || {
        every_node_accepts(&c, "app", "anything")
    })
    .await?;
    assert!(
        read_then_write(&proxy, "app", "anything").await?,
        "read on the standby"
    );
    assert_eq!(c.primary().psql("select count(*) > 0 from t")?, "t");
    Ok(())
}

/// The first authentication request dbproxy sends a raw client logging in as `user`.
async fn first_request(proxy: &Proxy, user: &str) -> Result<i32> {
    let mut r = Raw::connect(proxy).await?;
    let mut out = BytesMut::new();
    startup::encode_startup([("user", user), ("database", "postgres")], &mut out);
    r.send(&out).await?;
    let f = r.frame().await?.context("closed before any request")?;
    Ok(pauth::request(f.body())?.0)
}

fn rule(user: &str, method: AuthMethod) -> HbaRule {
    HbaRule {
        user: user.into(),
        method,
        ..HbaRule::default()
    }
}

fn user(name: &str, password: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: Some(password.into()),
        ..UserConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_fetches_scram_and_md5_verifiers() -> Result<()> {
    support::bounded(auth_query_body()).await
}

async fn auth_query_body() -> Result<()> {
    let c = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    c.primary().psql(
        "create role authenticator login superuser password 'auth-pw'; \
         create role sc login password 'sc-pw'; create role rot login password 'rot-pw'; \
         set password_encryption = 'md5'; create role m5 login password 'm5-pw'; \
         create table t (i int); grant all on t to sc, m5",
    )?;
    set_hba(
        &c,
        "host all m5 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256",
    )?;
    c.wait_replicated()?;
    until("md5 for m5 on every node", || {
        every_node_accepts(&c, "m5", "m5-pw")
    })
    .await?;
    let ttl = 3.0;
    let mut config = config_for(&c, Some("pw"));
    config.users.push(user("authenticator", "auth-pw"));
    config.auth.user = "authenticator".into();
    config.auth.cache_ttl = ttl;
    config.hba = vec![rule("m5", AuthMethod::Md5), rule("all", AuthMethod::ScramSha256)];
    config.limits.startup_timeout = 5.0;
    let proxy = Proxy::start(config.clone())?;

    // SCRAM verifier: dbproxy checks the proof itself and logs in to the standby with the
    // ClientKey the client proved.
    assert!(
        read_then_write(&proxy, "sc", "sc-pw").await?,
        "read on the standby"
    );
    assert_eq!(
        pg(proxy.port(), "sc", "wrong").await.err(),
        Some(wrong_password("sc"))
    );
    // md5 verifier: the hash itself answers the servers' md5 requests.
    assert_eq!(psql_read_then_write(&proxy, "m5", "m5-pw")?, "t");
    let e = psql_read_then_write(&proxy, "m5", "wrong")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("password authentication failed for user \"m5\""),
        "{e}"
    );
    // A user auth_query does not find goes through the same SCRAM exchange as a known one and
    // fails like a wrong password: names cannot be probed.
    assert_eq!(first_request(&proxy, "ghost").await?, pauth::SASL);
    assert_eq!(first_request(&proxy, "sc").await?, pauth::SASL);
    assert_eq!(
        pg(proxy.port(), "ghost", "x").await.err(),
        Some(wrong_password("ghost"))
    );

    // The cache: a changed password takes effect once the looked-up verifier is older than
    // auth.cache_ttl, not before.
    let start = Instant::now();
    pg(proxy.port(), "rot", "rot-pw").await.expect("first lookup");
    c.primary().psql("alter role rot password 'rot-new'")?;
    let deadline = Instant::now() + DEADLINE;
    let took = loop {
        if pg(proxy.port(), "rot", "rot-new").await.is_ok() {
            break start.elapsed();
        }
        anyhow::ensure!(Instant::now() < deadline, "the new password never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        took >= Duration::from_secs_f64(ttl),
        "the new password worked after {took:?}, within auth.cache_ttl"
    );

    // auth_user's own password is wrong: a clear error, and nothing is looked up.
    let mut broken = config;
    broken.users.retain(|u| u.name != "authenticator");
    broken.users.push(user("authenticator", "nope"));
    let proxy = Proxy::start(broken)?;
    let Err((code, message)) = pg(proxy.port(), "sc", "sc-pw").await else {
        bail!("logged in although auth_user cannot");
    };
    assert_eq!(code, "08004", "{message}");
    assert!(
        message.contains("auth_user \"authenticator\" cannot log in to the primary")
            && message.contains("password authentication failed"),
        "{message}"
    );
    Ok(())
}

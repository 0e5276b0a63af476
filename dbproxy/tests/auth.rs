//! Client authentication through real PostgreSQL servers: SCRAM-SHA-256, md5, trust and reject
//! rules, wrong passwords, unknown users and databases.

mod support;

use anyhow::Result;
use dbproxy::config::{AuthMethod, HbaRule, UserConfig};
use support::{code, config_for, Proxy};
use testkit::PgCluster;

fn rule(user: &str, method: AuthMethod) -> HbaRule {
    HbaRule {
        user: user.into(),
        method,
        ..HbaRule::default()
    }
}

fn user(name: &str, password: Option<&str>) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: password.map(str::to_string),
        ..UserConfig::default()
    }
}

async fn login(proxy: &Proxy, user: &str, password: &str, db: &str) -> Result<(), String> {
    let cs = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
        proxy.port()
    );
    match tokio_postgres::connect(&cs, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client.simple_query("select 1").await.map_err(|e| code(&e))?;
            Ok(())
        }
        Err(e) => Err(code(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_and_every_refusal() -> Result<()> {
    support::bounded(every_method_and_every_refusal_body()).await
}

async fn every_method_and_every_refusal_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(0).password("pw").start()).await??;
    cluster.primary().psql(
        "create role app login password 'app-secret'; create role md5user login password 'm5'; \
         create role trusty login password 'tt'; create role blocked login password 'bb'",
    )?;
    let mut config = config_for(&cluster, Some("pw"));
    config.users.push(user("app", Some("app-secret")));
    config.users.push(user("md5user", Some("m5")));
    config.users.push(user("blocked", Some("bb")));
    config.hba = vec![
        rule("md5user", AuthMethod::Md5),
        rule("trusty", AuthMethod::Trust),
        rule("blocked", AuthMethod::Reject),
        rule("all", AuthMethod::ScramSha256),
    ];
    let proxy = Proxy::start(config)?;

    login(&proxy, "postgres", "pw", "postgres")
        .await
        .expect("scram superuser");
    login(&proxy, "app", "app-secret", "postgres")
        .await
        .expect("scram user");
    login(&proxy, "md5user", "m5", "postgres")
        .await
        .expect("md5 user");
    assert_eq!(
        login(&proxy, "app", "wrong", "postgres").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "md5user", "wrong", "postgres").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "ghost", "x", "postgres").await,
        Err("28P01".into()),
        "unknown user"
    );
    assert_eq!(
        login(&proxy, "blocked", "bb", "postgres").await,
        Err("28000".into()),
        "reject rule"
    );
    // Trusted by the proxy but not by the server, which wants a password nobody configured.
    assert_eq!(login(&proxy, "trusty", "", "postgres").await, Err("28P01".into()));
    // PostgreSQL's own error for a database that does not exist.
    assert_eq!(
        login(&proxy, "app", "app-secret", "nope").await,
        Err("3D000".into())
    );

    // With a server that trusts its clients, an unconfigured user passes through.
    let open = tokio::task::spawn_blocking(|| PgCluster::builder().standbys(0).start()).await??;
    let mut config = config_for(&open, None);
    config.users.clear();
    config.hba = vec![rule("all", AuthMethod::Trust)];
    let proxy = Proxy::start(config)?;
    login(&proxy, "postgres", "", "postgres")
        .await
        .expect("trust pass-through");
    Ok(())
}

/// The value of `dbproxy_scram_key_derivations_total` on the admin listener.
fn derivations(proxy: &Proxy) -> Result<u64> {
    let metrics = proxy.admin_get("/metrics")?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("dbproxy_scram_key_derivations_total "))
        .ok_or_else(|| anyhow::anyhow!("no derivation counter in {metrics}"))?;
    Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_logins_reuse_scram_keys_until_a_reload_changes_the_password() -> Result<()> {
    support::bounded(backend_logins_reuse_scram_keys_body()).await
}

async fn backend_logins_reuse_scram_keys_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    cluster.primary().psql("create role app login password 'one'")?;
    cluster.wait_replicated()?;
    let mut config = config_for(&cluster, Some("pw"));
    config.users.push(user("app", Some("one")));
    // No pooling: every client makes backend logins, which is what this test counts.
    config.pool.server_reset_query = String::new();
    let proxy = Proxy::start(config.clone())?;
    // The first login opens a SCRAM connection to the primary, and each read one to the standby
    // (which has the primary's pg_authid, so the same salt): the keys are derived once.
    for _ in 0..5 {
        login(&proxy, "app", "one", "postgres")
            .await
            .expect("scram login");
    }
    assert_eq!(derivations(&proxy)?, 1, "one derivation for ten backend logins");

    // A new password, on the servers and in a reload: logins go on, with keys derived once more.
    cluster.primary().psql("alter role app password 'two'")?;
    cluster.wait_replicated()?;
    let mut next = config.clone();
    next.users.retain(|u| u.name != "app");
    next.users.push(user("app", Some("two")));
    proxy.reload(next).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while login(&proxy, "app", "two", "postgres").await.is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the reload never applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        login(&proxy, "app", "two", "postgres")
            .await
            .expect("login after the reload");
    }
    assert_eq!(derivations(&proxy)?, 2, "the new password's keys, derived once");
    assert_eq!(login(&proxy, "app", "one", "postgres").await, Err("28P01".into()));
    Ok(())
}

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

/// What dbproxy sent a real client (tokio-postgres) during one login attempt, recorded by a
/// relay between them: the authentication requests (code and data) and the error's message.
#[derive(Debug)]
struct Exchange {
    requests: Vec<(i32, Vec<u8>)>,
    error: Option<(String, String)>,
}

impl Exchange {
    /// The salt and iteration count of the SCRAM server-first-message.
    fn salt_and_iterations(&self) -> Option<(String, String)> {
        let (_, first) = self.requests.iter().find(|(code, _)| *code == 11)?;
        let first = std::str::from_utf8(first).ok()?;
        let get = |k: &str| {
            first
                .split(',')
                .find_map(|a| a.strip_prefix(k))
                .map(str::to_string)
        };
        Some((get("s=")?, get("i=")?))
    }
}

/// Logs in as `user` with `password` through a recording relay; returns what dbproxy sent.
async fn recorded_login(proxy: &Proxy, user: &str, password: &str) -> Result<Exchange> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_port = relay.local_addr()?.port();
    let upstream = proxy.port();
    let recorder = tokio::spawn(async move {
        let (mut client, _) = relay.accept().await?;
        let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let mut seen = Vec::new();
        let up = async {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
        };
        let down = async {
            let mut buf = [0u8; 4096];
            loop {
                match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen.extend_from_slice(&buf[..n]);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = cw.shutdown().await;
        };
        tokio::join!(up, down);
        anyhow::Ok(seen)
    });
    let cs = format!(
        "host=127.0.0.1 port={relay_port} user={user} password={password} dbname=postgres \
         connect_timeout=10 sslmode=disable"
    );
    let outcome = tokio_postgres::connect(&cs, tokio_postgres::NoTls).await;
    let error = match outcome {
        Ok(_) => None,
        Err(e) => Some(match e.as_db_error() {
            Some(db) => (db.code().code().to_string(), db.message().to_string()),
            None => ("none".into(), e.to_string()),
        }),
    };
    let seen = recorder.await??;
    let mut requests = Vec::new();
    let mut rest = &seen[..];
    while rest.len() >= 5 {
        let len = i32::from_be_bytes(rest[1..5].try_into()?) as usize;
        let (msg, next) = rest.split_at((1 + len).min(rest.len()));
        if msg[0] == b'R' && msg.len() >= 9 {
            let code = i32::from_be_bytes(msg[5..9].try_into()?);
            requests.push((code, msg[9..].to_vec()));
        }
        rest = next;
    }
    Ok(Exchange { requests, error })
}

/// An unknown user gets the same exchange as a known user with a wrong password: a SCRAM offer,
/// a server-first-message with a salt of the same length and the same iteration count (the same
/// salt at every attempt for the same name), and 28P01 with the same message; under an md5 rule,
/// an md5 challenge. Without the mock exchange the unknown user got 28P01 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_get_the_same_exchange_as_wrong_passwords() -> Result<()> {
    support::bounded(unknown_users_body()).await
}

async fn unknown_users_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(0).password("pw").start()).await??;
    cluster
        .primary()
        .psql("create role app login password 'app-secret'; create role legacy login password 'old'")?;
    let mut config = config_for(&cluster, Some("pw"));
    config.users.push(user("app", Some("app-secret")));
    config.users.push(user("legacy", Some("old")));
    config.hba = vec![
        rule("legacy", AuthMethod::Md5),
        rule("ghost_md5", AuthMethod::Md5),
        rule("all", AuthMethod::ScramSha256),
    ];
    let proxy = Proxy::start(config)?;

    let known = recorded_login(&proxy, "app", "wrong").await?;
    let ghost = recorded_login(&proxy, "ghost", "wrong").await?;
    let again = recorded_login(&proxy, "ghost", "other").await?;
    let other = recorded_login(&proxy, "phantom", "wrong").await?;
    let failed = |u: &str| {
        Some((
            "28P01".to_string(),
            format!("password authentication failed for user \"{u}\""),
        ))
    };
    assert_eq!(known.error, failed("app"));
    assert_eq!(ghost.error, failed("ghost"));
    assert_eq!(other.error, failed("phantom"));
    let codes = |e: &Exchange| e.requests.iter().map(|(c, _)| *c).collect::<Vec<_>>();
    assert_eq!(codes(&known), vec![10, 11], "known user: {known:?}");
    assert_eq!(codes(&ghost), codes(&known), "unknown user: {ghost:?}");
    assert_eq!(
        known.requests[0], ghost.requests[0],
        "the same mechanisms offered"
    );
    let (known_salt, known_iter) = known.salt_and_iterations().expect("a server-first-message");
    let (ghost_salt, ghost_iter) = ghost.salt_and_iterations().expect("a server-first-message");
    assert_eq!(ghost_iter, known_iter);
    assert_eq!(ghost_salt.len(), known_salt.len());
    assert_eq!(
        again.salt_and_iterations(),
        Some((ghost_salt.clone(), ghost_iter))
    );
    assert_ne!(other.salt_and_iterations().map(|s| s.0), Some(ghost_salt));

    // Under an md5 rule an unknown user gets an md5 challenge, as a known md5 user does.
    let legacy = recorded_login(&proxy, "legacy", "wrong").await?;
    let ghost_md5 = recorded_login(&proxy, "ghost_md5", "wrong").await?;
    assert_eq!(codes(&legacy), vec![5], "{legacy:?}");
    assert_eq!(codes(&ghost_md5), vec![5], "{ghost_md5:?}");
    assert_eq!(legacy.error, failed("legacy"));
    assert_eq!(ghost_md5.error, failed("ghost_md5"));
    Ok(())
}

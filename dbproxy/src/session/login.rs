//! Login: the startup packet (or an SSLRequest, GSSENCRequest or CancelRequest), TLS, client
//! authentication (trust, md5, SCRAM-SHA-256 by pg_hba-style rules), and the connection to the
//! primary that a login opens at once, so a missing database or role surfaces with PostgreSQL's
//! own error.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BufMut;
use tokio::io::AsyncWriteExt;

use crate::auth::{self, AuthError, Credentials, ScramServer};
use crate::backend::{self, Backend, BackendError, Conn};
use crate::config::{secs, AuthMethod};
use crate::protocol::{self, auth as pauth, status, Frame, FrontendMessage, Startup, TxStatus};

use super::relay::{self, Relayed};
use super::{fatal, CancelSlot, End, Shared};

/// A client that authenticated, before its primary connection is taken.
pub(super) struct Authed {
    user: String,
    database: String,
    params: Vec<(String, String)>,
    encrypted: bool,
    /// What the session's backend logins use.
    creds: Option<Credentials>,
    /// The primary connection a pass-through login opened.
    relayed: Option<Relayed>,
}

/// What a successful startup hands to the session.
pub(super) struct Login {
    pub user: String,
    pub params: Vec<(String, String)>,
    /// The `client_encoding` the server reported at login.
    pub encoding: crate::classify::Encoding,
    /// `None` when the login was answered from the pool's knowledge of the key.
    pub primary: Option<Backend>,
    /// The unlogged relations of the client's database.
    pub unlogged: Arc<crate::unlogged::Db>,
    pub cancel: Arc<CancelSlot>,
    pub key: (i32, i32),
    pub member: Member,
    /// What the session's backend logins use.
    pub creds: Option<Credentials>,
    /// Every request runs on the primary (see `relay`).
    pub primary_only: bool,
    /// The pool keys of the session's connections, made once.
    pub keys: crate::pool::Keys,
}

/// A logged-in client's entry in the pools' client list (SHOW CLIENTS); dropping it removes it.
pub(super) struct Member {
    pools: Arc<crate::pool::Pools>,
    pub id: u64,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.pools.client_left(self.id);
    }
}

/// Reads the client's next message during authentication; it must be a `p` message.
pub(super) async fn read_password(client: &mut Conn) -> Result<Option<Frame>, End> {
    match client.read_frame().await {
        Ok(Some(f)) => match FrontendMessage::parse(&f) {
            Ok(FrontendMessage::Password { .. }) => Ok(Some(f)),
            _ => {
                let msg = format!("expected password response, got message type {}", f.tag());
                fatal(client, "08P01", &msg).await;
                Err(End)
            }
        },
        Ok(None) => Ok(None),
        Err(BackendError::Protocol(e)) => {
            fatal(client, e.sqlstate(), &e.to_string()).await;
            Err(End)
        }
        Err(_) => Ok(None),
    }
}

/// How pg_hba.conf messages name the connection's encryption.
fn encryption(encrypted: bool) -> &'static str {
    if encrypted {
        "SSL encryption"
    } else {
        "no encryption"
    }
}

/// Startup and authentication (bounded by `limits.startup_timeout`); `Ok(None)` when the
/// connection ended without a session (a cancel request, a client that left, or an error
/// already sent).
pub(super) async fn startup(
    client: &mut Conn,
    ip: IpAddr,
    shared: &Arc<Shared>,
) -> Result<Option<Authed>, End> {
    let metrics = &shared.cluster.metrics;
    let mut encrypted = false;
    let params = loop {
        match protocol::decode_startup(&mut client.rbuf) {
            Err(e) => {
                metrics.error("protocol");
                fatal(client, e.sqlstate(), &e.to_string()).await;
                return Err(End);
            }
            Ok(Some(Startup::Ssl)) if shared.tls.is_some() && !encrypted => {
                if !client.rbuf.is_empty() {
                    // Bytes sent before the handshake could be injected by a man in the middle
                    // (CVE-2021-23214): PostgreSQL refuses them too.
                    metrics.error("protocol");
                    fatal(client, "08P01", "received unencrypted data after SSL request").await;
                    return Err(End);
                }
                client.stream.write_all(b"S").await.map_err(|_| End)?;
                let acceptor = shared.tls.as_ref().expect("checked above");
                if let Err(e) = client.accept_tls(acceptor).await {
                    metrics.error("protocol");
                    tracing::info!(%ip, error = %e, "TLS handshake failed");
                    return Err(End);
                }
                encrypted = true;
            }
            Ok(Some(Startup::Ssl | Startup::GssEnc)) => {
                // No TLS configured (or already encrypted), no GSSAPI: refuse; a libpq client then
                // carries on in clear text, or gives up if it requires encryption.
                client.stream.write_all(b"N").await.map_err(|_| End)?;
            }
            Ok(Some(Startup::Cancel { pid, key })) => {
                let slot = shared
                    .cancels
                    .lock()
                    .expect("cancels poisoned")
                    .get(&(pid, key))
                    .cloned();
                let target = slot.and_then(|s| *s.lock().expect("slot poisoned"));
                if let Some((addr, bpid, bkey)) = target {
                    backend::cancel(addr, bpid, bkey, secs(shared.config.limits.connect_timeout)).await;
                }
                return Ok(None);
            }
            Ok(Some(Startup::Params(p))) => break p,
            Ok(None) => match client.fill().await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            },
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(user) = get("user").filter(|u| !u.is_empty()).map(str::to_string) else {
        fatal(
            client,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return Err(End);
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    // `tls.require` acts like hostssl-only rules: a clear-text client matches none.
    let rule = if shared.config.tls.require && !encrypted {
        None
    } else {
        shared.hba.method(&user, &database, ip)
    };
    let method = match rule {
        Some(m) => m,
        None => {
            metrics.error("auth");
            let msg = format!(
                "no pg_hba.conf entry for host \"{ip}\", user \"{user}\", database \"{database}\", {}",
                encryption(encrypted)
            );
            fatal(client, "28000", &msg).await;
            return Err(End);
        }
    };
    if method == AuthMethod::Reject {
        metrics.error("auth");
        let msg = format!(
            "pg_hba.conf rejects connection for host \"{ip}\", user \"{user}\", database \"{database}\", {}",
            encryption(encrypted)
        );
        fatal(client, "28000", &msg).await;
        return Err(End);
    }
    let source = if method == AuthMethod::Trust {
        Source::Stored(shared.users.get(&user).cloned())
    } else {
        source(client, shared, &user).await?
    };
    let creds = match source {
        Source::Stored(c) => c,
        Source::Relay => {
            let Some(r) = relay::relay(client, shared, &params, &user).await? else {
                return Ok(None);
            };
            return Ok(Some(Authed {
                user,
                database,
                params,
                encrypted,
                creds: r.creds.clone(),
                relayed: Some(r),
            }));
        }
    };
    let failed = |user: &str| AuthError::Failed(user.to_string());
    // The ClientKey a SCRAM client proved, when there is no password to log in to backends with.
    let outcome: Result<Option<[u8; 32]>, AuthError> = match method {
        AuthMethod::Reject | AuthMethod::Trust => Ok(None),
        // A user with no secret at all (unknown) gets the md5 exchange too, always failing, as
        // PostgreSQL does, so that an unknown name cannot be told from a wrong password.
        AuthMethod::Md5 if creds.as_ref().is_none_or(|c| c.md5.is_some()) => {
            let secret = creds.as_ref().and_then(|c| c.md5.as_deref()).unwrap_or("");
            let salt: [u8; 4] = rand::random();
            pauth::encode_request(pauth::MD5, &salt, &mut client.wbuf);
            client.flush().await.map_err(|_| End)?;
            let Some(f) = read_password(client).await? else {
                return Ok(None);
            };
            match pauth::password(f.body()) {
                Ok(answer) if creds.is_some() && auth::md5_ok(secret, salt, answer) => Ok(None),
                Ok(_) => Err(failed(&user)),
                Err(_) => Err(AuthError::MalformedScram),
            }
        }
        // md5 with only a SCRAM verifier upgrades to SCRAM, as PostgreSQL does.
        AuthMethod::Md5 | AuthMethod::ScramSha256 => match creds.as_ref().and_then(|c| c.scram.clone()) {
            Some(secret) => scram(client, secret, &user).await?.map(Some),
            // No verifier (an unknown user, or only an md5 secret): the same exchange against a
            // made-up one, which fails like a wrong password, so users cannot be enumerated.
            None => scram(client, auth::ScramSecret::mock(&user), &user)
                .await?
                .and(Err(failed(&user))),
        },
    };
    let client_key = match outcome {
        Ok(k) => k,
        Err(e) => {
            metrics.error("auth");
            // Never log the password or the exchange, only that it failed.
            tracing::info!(%user, %ip, "authentication failed");
            fatal(client, e.sqlstate(), &e.to_string()).await;
            return Err(End);
        }
    };
    // Without a password, the key the client proved logs this session in to the backends
    // (which hold the same verifier), as PgBouncer does.
    let creds = match (creds, client_key) {
        (Some(c), Some(key)) if c.plain.is_none() => {
            Some(c.with_client_key(key, &metrics.scram_key_derivations))
        }
        (c, _) => c,
    };
    Ok(Some(Authed {
        user,
        database,
        params,
        encrypted,
        creds,
        relayed: None,
    }))
}

/// Where a client's credentials come from.
enum Source {
    /// Configured (`[[users]]`) or looked up (`auth_query`); `None`: not found.
    Stored(Option<Credentials>),
    /// Nowhere: the primary authenticates the client (`auth.passthrough`).
    Relay,
}

/// Finds `user`'s credentials: `[[users]]`, then `auth_query`, then pass-through.
async fn source(client: &mut Conn, shared: &Shared, user: &str) -> Result<Source, End> {
    if let Some(c) = shared.users.get(user) {
        return Ok(Source::Stored(Some(c.clone())));
    }
    let auth = &shared.config.auth;
    if !auth.query_on() {
        return Ok(if auth.passthrough {
            Source::Relay
        } else {
            Source::Stored(None)
        });
    }
    let lookup = crate::auth_query::Lookup {
        config: auth,
        cluster: &shared.cluster,
        creds: shared.users.get(&auth.user),
        max_message: shared.config.limits.max_message_size,
        timeout: secs(shared.config.pool.connect_timeout),
    };
    let derivations = &shared.cluster.metrics.scram_key_derivations;
    match lookup.verifier(&shared.verifiers, user).await {
        Ok(Some(secret)) => match Credentials::from_secret(&secret, derivations) {
            Some(c) => Ok(Source::Stored(Some(c))),
            None => {
                tracing::warn!(%user, "auth_query returned something that is neither a SCRAM nor an md5 verifier");
                Ok(Source::Stored(None))
            }
        },
        // Not found: the exchange fails like a wrong password (no user enumeration).
        Ok(None) => Ok(Source::Stored(None)),
        Err(e) => {
            shared.cluster.metrics.error("auth");
            tracing::warn!(%user, error = %e, "auth_query failed");
            let msg = format!("dbproxy cannot look up the password of user \"{user}\": {e}");
            fatal(client, "08004", &msg).await;
            Err(End)
        }
    }
}

/// The rest of the login, bounded by the pool's and failover's own waits rather than the
/// startup timeout: the primary connection (from the pool, or a new login), so that a missing
/// database or role surfaces at login with PostgreSQL's own error (during a failover this waits
/// for the new primary), then AuthenticationOk, the server's parameters and a BackendKeyData.
pub(super) async fn connect(
    client: &mut Conn,
    authed: Authed,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    shared: &Arc<Shared>,
) -> Result<Option<Login>, End> {
    let Authed {
        user,
        database,
        params,
        encrypted,
        creds,
        relayed,
    } = authed;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let metrics = &shared.cluster.metrics;
    let member = Member {
        pools: shared.pools.clone(),
        id: shared.pools.client_joined(crate::pool::ClientInfo {
            user: user.clone(),
            database: database.clone(),
            application_name: get("application_name").unwrap_or("").to_string(),
            addr: peer,
            local,
            tls: encrypted,
            connected: std::time::SystemTime::now(),
        }),
    };
    let unlogged = shared.unlogged.db(&database);
    let cluster = &shared.cluster;
    // In session mode the client is given the process id of its own primary connection (as
    // directly: `pg_terminate_backend` of it ends this session, a NOTIFY it sends names it), so
    // that connection is taken at login, from the pool's idle ones when it has one (no backend
    // round trip). Otherwise, and when the pool is full (waiting here, a client that opens its
    // connections one after another could wait on itself), a key that logged in before needs
    // no server connection at login: the client is told the parameters that login reported, a
    // process id of dbproxy's, and gets a pooled connection with its first request (as
    // PgBouncer does). A relayed (pass-through) login already holds its primary connection.
    let primary_only = relayed.as_ref().is_some_and(|r| r.primary_only);
    let mut keys = crate::pool::Keys::default();
    let session_mode = shared.config.pool.mode == crate::pool::PoolMode::Session;
    let cached = match relayed {
        Some(r) => Err((r.backend, r.greeting.frames)),
        None => Ok(cluster
            .elected()
            .map(|p| keys.get(p, &params))
            .filter(|k| !session_mode || !shared.pools.available(k))
            .and_then(|k| shared.pools.greeting(&k))),
    };
    let (primary, greeting) = match cached {
        Err((b, frames)) => (Some(b), frames),
        Ok(Some(frames)) => (None, frames),
        Ok(None) => {
            let mut watch = cluster.subscribe();
            let ids = (member.id, &mut keys);
            match connect_primary(shared, &params, &user, creds.as_ref(), ids, &mut watch).await {
                Ok((b, g)) => (Some(b), g.frames),
                Err(e) => {
                    metrics.error("backend");
                    report_backend_error(client, &user, e).await;
                    return Err(End);
                }
            }
        }
    };
    pauth::encode_request(pauth::OK, &[], &mut client.wbuf);
    let cancel: Arc<CancelSlot> = Arc::new(Mutex::new(None));
    let mut encoding = crate::classify::Encoding::default();
    for f in &greeting {
        if let Some(e) = client_encoding(f) {
            encoding = e;
        }
        client.wbuf.put_slice(f.raw());
    }
    let key = {
        let mut cancels = shared.cancels.lock().expect("cancels poisoned");
        loop {
            // The real process id, with dbproxy's own secret: a CancelRequest names this
            // session in the cancel map, whichever backend runs its request then. (Another
            // session may hold the same process id, one its lost primary connection had: the
            // secrets tell them apart.)
            let pid = match &primary {
                Some(b) if session_mode => b.key.0,
                // In transaction pooling the server connection changes with every
                // transaction: no one process id is the session's.
                _ => rand::random::<i32>() & 0x7fff_ffff,
            };
            let key = (pid, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(e) = cancels.entry(key) {
                e.insert(cancel.clone());
                break key;
            }
        }
    };
    status::encode_backend_key(key.0, key.1, &mut client.wbuf);
    status::encode_ready(TxStatus::Idle.byte(), &mut client.wbuf);
    if client.flush().await.is_err() {
        shared.cancels.lock().expect("cancels poisoned").remove(&key);
        return Err(End);
    }
    cluster.metrics.connections.inc();
    Ok(Some(Login {
        user,
        params,
        encoding,
        primary,
        unlogged,
        cancel,
        key,
        member,
        creds,
        primary_only,
        keys,
    }))
}

/// The client encoding a backend message reports, if it is a ParameterStatus of
/// `client_encoding`.
pub(super) fn client_encoding(f: &Frame) -> Option<crate::classify::Encoding> {
    if f.tag() != b'S' {
        return None;
    }
    match status::parameter_status(f.body()) {
        Ok(("client_encoding", v)) => Some(crate::classify::Encoding::from_name(v)),
        _ => None,
    }
}

/// Connects to the elected primary. While there is none, or it cannot be reached (it just died
/// and the failover is under way), keeps trying, at once when the elected primary changes,
/// for up to `failover.session_wait`. A login the server refuses is final, except for the
/// refusals of a server starting up or shutting down.
pub(super) async fn connect_primary(
    shared: &Shared,
    params: &[(String, String)],
    user: &str,
    creds: Option<&Credentials>,
    (client, keys): (u64, &mut crate::pool::Keys),
    watch: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(Backend, backend::Greeting), BackendError> {
    let cluster = &shared.cluster;
    let limits = &shared.config.limits;
    let deadline = Instant::now() + secs(shared.config.failover.session_wait);
    let mut last = BackendError::NoPrimary;
    loop {
        watch.borrow_and_update();
        if let Some(p) = cluster.elected() {
            let node = &cluster.nodes[p].config;
            let request = crate::pool::Request {
                key: keys.get(p, params),
                user,
                creds,
                max_message: limits.max_message_size,
                client,
            };
            let attempt = shared.pools.checkout(&request);
            tokio::select! {
                r = attempt => match r {
                    Ok(x) => return Ok(x),
                    Err(e @ BackendError::PoolTimeout(_)) => return Err(e),
                    Err(BackendError::Refused(f))
                        if !backend::sqlstate(&f).is_some_and(|c| c.starts_with("57")) =>
                    {
                        return Err(BackendError::Refused(f));
                    }
                    Err(e @ BackendError::Auth(_)) => return Err(e),
                    Err(e) => {
                        tracing::debug!(node = %node.name, error = %e, "cannot reach the primary");
                        cluster.suspect(p);
                        last = e;
                    }
                },
                // A new primary was elected meanwhile: try it at once.
                Ok(()) = watch.changed() => continue,
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        tokio::select! {
            Ok(()) = watch.changed() => {}
            _ = tokio::time::sleep(left.min(Duration::from_millis(100))) => {}
            // Shutting down: no point waiting for a primary any more.
            _ = shared.shutdown.cancelled() => return Err(last),
        }
    }
}

/// Relays a failed backend login to the client the way PostgreSQL would have reported it.
async fn report_backend_error(client: &mut Conn, user: &str, e: BackendError) {
    match e {
        BackendError::Refused(f) => {
            client.wbuf.put_slice(f.raw());
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        }
        e @ BackendError::PoolTimeout(_) => {
            tracing::warn!(%user, error = %e, "no pooled server connection for a client");
            fatal(client, "53300", &format!("sorry, too many clients already: {e}")).await;
        }
        BackendError::Auth(msg) => {
            tracing::warn!(%user, reason = %msg, "backend login failed");
            fatal(
                client,
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
            )
            .await;
        }
        other => {
            tracing::warn!(error = %other, "cannot connect to the primary");
            fatal(
                client,
                "08006",
                &format!("could not connect to the primary server: {other}"),
            )
            .await;
        }
    }
}

/// Runs a SCRAM-SHA-256 exchange with the client.
async fn scram(
    client: &mut Conn,
    secret: auth::ScramSecret,
    user: &str,
) -> Result<Result<[u8; 32], AuthError>, End> {
    pauth::encode_sasl_offer(&mut client.wbuf);
    client.flush().await.map_err(|_| End)?;
    let Some(f) = read_password(client).await? else {
        return Err(End);
    };
    let Ok((mech, data)) = pauth::sasl_initial(f.body()) else {
        return Ok(Err(AuthError::MalformedScram));
    };
    let (server, first) = match ScramServer::start(secret, mech, data) {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    pauth::encode_request(pauth::SASL_CONTINUE, first.as_bytes(), &mut client.wbuf);
    client.flush().await.map_err(|_| End)?;
    let Some(f) = read_password(client).await? else {
        return Err(End);
    };
    match server.finish_keys(user, f.body()) {
        Ok((fin, client_key)) => {
            pauth::encode_request(pauth::SASL_FINAL, fin.as_bytes(), &mut client.wbuf);
            Ok(Ok(client_key))
        }
        Err(e) => Ok(Err(e)),
    }
}

//! Pass-through authentication (`auth.passthrough`): a client whose user dbproxy has no
//! credentials for authenticates against the elected primary, dbproxy relaying the primary's
//! requests and the client's answers unchanged until AuthenticationOk or the primary's error.
//! The connection that results is the session's primary connection (not pooled: no other
//! client proved anything to it). What other logins can use depends on the exchange:
//!
//! - trust: nothing is needed;
//! - password (cleartext): the client sent the password, kept for this session's logins;
//! - md5: the answer is `md5(md5(password + user) + salt)` for the primary's salt, which does
//!   not give `md5(password + user)`, nor a proof for another salt;
//! - SCRAM-SHA-256: `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)` needs StoredKey,
//!   which only the verifier holds.
//!
//! So after md5 or SCRAM every request of the session runs on the primary; `auth_query` (which
//! fetches the verifier so dbproxy runs the exchange itself) is the way to standbys then.

use bytes::BufMut;

use crate::auth::{self, Credentials, KeyCache};
use crate::backend::{self, Backend, BackendError, Greeting};
use crate::config::secs;
use crate::protocol::{auth as pauth, BackendMessage, Frame};

use super::login::read_password;
use super::{fatal, Conn, End, Shared};

/// What the primary asked the client for.
enum Exchange {
    Trust,
    Password(String),
    Md5,
    Scram,
}

/// A login the primary accepted through the relay.
pub(super) struct Relayed {
    /// The session's primary connection.
    pub backend: Backend,
    /// Its ParameterStatus and notices, for the client.
    pub greeting: Greeting,
    /// What other backend logins of this session use.
    pub creds: Option<Credentials>,
    /// No other login is possible: every request runs on the primary.
    pub primary_only: bool,
}

/// Relays the primary's authentication exchange for `user` (startup `params`) to the client.
/// `Ok(None)`: the client left; `Err(End)`: refused, the error already sent.
pub(super) async fn relay(
    client: &mut Conn,
    shared: &Shared,
    params: &[(String, String)],
    user: &str,
) -> Result<Option<Relayed>, End> {
    let cluster = &shared.cluster;
    let Some(p) = cluster.elected() else {
        cluster.metrics.error("backend");
        fatal(
            client,
            "08006",
            "no primary server is available to authenticate against",
        )
        .await;
        return Err(End);
    };
    let limit = secs(shared.config.pool.connect_timeout);
    let max = shared.config.limits.max_message_size;
    let (mut conn, addr, local) =
        match tokio::time::timeout(limit, backend::open(cluster.target(p), params, max)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(unreachable_primary(client, shared, p, &e.to_string()).await),
            Err(_) => return Err(unreachable_primary(client, shared, p, "timed out").await),
        };
    let mut exchange = Exchange::Trust;
    let mut notices = Vec::new();
    loop {
        let f = match conn.read_frame().await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                return Err(unreachable_primary(client, shared, p, "the connection closed").await);
            }
        };
        let message = match BackendMessage::parse(&f) {
            Ok(m) => m,
            Err(e) => return Err(unreachable_primary(client, shared, p, &e.to_string()).await),
        };
        match message {
            BackendMessage::Authentication { code: pauth::OK, .. } => break,
            BackendMessage::Authentication {
                code: pauth::SASL_FINAL,
                ..
            } => {
                // The client checks the primary's signature; AuthenticationOk follows.
                client.wbuf.put_slice(f.raw());
            }
            BackendMessage::Authentication { code, .. }
                if matches!(
                    code,
                    pauth::CLEARTEXT | pauth::MD5 | pauth::SASL | pauth::SASL_CONTINUE
                ) =>
            {
                if code == pauth::CLEARTEXT {
                    // The client's password would cross the server link in the clear.
                    if let Err(e) = cluster.backend_tls.check_cleartext(conn.stream.is_encrypted()) {
                        cluster.metrics.error("auth");
                        fatal(client, "28000", &e.to_string()).await;
                        return Err(End);
                    }
                }
                client.wbuf.put_slice(f.raw());
                client.flush().await.map_err(|_| End)?;
                let Some(answer) = read_password(client).await? else {
                    return Ok(None);
                };
                exchange = match code {
                    pauth::CLEARTEXT => match pauth::password(answer.body()) {
                        Ok(pw) => Exchange::Password(pw.to_string()),
                        Err(e) => {
                            fatal(client, e.sqlstate(), &e.to_string()).await;
                            return Err(End);
                        }
                    },
                    pauth::MD5 => Exchange::Md5,
                    _ => Exchange::Scram,
                };
                conn.wbuf.put_slice(answer.raw());
                if conn.flush().await.is_err() {
                    return Err(unreachable_primary(client, shared, p, "the connection closed").await);
                }
            }
            BackendMessage::Authentication { code, .. } => {
                cluster.metrics.error("auth");
                let msg =
                    format!("the primary asks for authentication method {code}, which dbproxy cannot relay");
                fatal(client, "28000", &msg).await;
                return Err(End);
            }
            BackendMessage::ErrorResponse(_) => return Err(refused(client, shared, user, &f).await),
            BackendMessage::NoticeResponse(_) => notices.push(f),
            _ => {
                return Err(unreachable_primary(
                    client,
                    shared,
                    p,
                    "unexpected message during authentication",
                )
                .await);
            }
        }
    }
    let greeting = Greeting { frames: notices };
    let (backend, greeting) = match backend::finish_login(conn, p, addr, local, greeting).await {
        Ok(x) => x,
        Err(BackendError::Refused(f)) => return Err(refused(client, shared, user, &f).await),
        Err(e) => return Err(unreachable_primary(client, shared, p, &e.to_string()).await),
    };
    let derivations = &cluster.metrics.scram_key_derivations;
    let (creds, primary_only) = match exchange {
        Exchange::Trust => (None, false),
        Exchange::Password(pw) => (
            Some(Credentials {
                md5: Some(auth::md5_secret(user, &pw)),
                plain: Some(pw),
                keys: std::sync::Arc::new(KeyCache::new(derivations.clone())),
                scram: None,
            }),
            false,
        ),
        Exchange::Md5 | Exchange::Scram => (None, true),
    };
    Ok(Some(Relayed {
        backend,
        greeting,
        creds,
        primary_only,
    }))
}

/// The primary's refusal, passed to the client as it is (a wrong password: 28P01, with
/// PostgreSQL's own message).
async fn refused(client: &mut Conn, shared: &Shared, user: &str, f: &Frame) -> End {
    shared.cluster.metrics.error("auth");
    tracing::info!(%user, "pass-through authentication refused by the primary");
    client.wbuf.put_slice(f.raw());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
    End
}

async fn unreachable_primary(client: &mut Conn, shared: &Shared, p: usize, why: &str) -> End {
    let cluster = &shared.cluster;
    cluster.metrics.error("backend");
    tracing::warn!(node = %cluster.nodes[p].config.name, error = %why, "pass-through authentication: cannot reach the primary");
    cluster.suspect(p);
    fatal(
        client,
        "08006",
        &format!("could not authenticate against the primary server: {why}"),
    )
    .await;
    End
}

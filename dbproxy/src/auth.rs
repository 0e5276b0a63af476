//! Authentication logic without I/O: resolving configured credentials, choosing the method for a
//! connection (pg_hba-style rules), the server side of SCRAM-SHA-256 and the md5 check. The
//! session drives these over its socket; backend logins use the client side in
//! `scram_client.rs` (re-exported here).
//!
//! The server side of SCRAM is written here because postgres-protocol only has the client side;
//! it is RFC 5802/7677 with PostgreSQL's choices (no channel binding without TLS, the user name
//! in the message ignored in favour of the startup packet's). Its `finish_keys` also returns the
//! `ClientKey` the client proved, which logs the session in to backends holding the same
//! verifier when dbproxy has no password (`[[users]].secret`, `auth_query`).

use std::collections::HashMap;
use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::config::{AuthMethod, HbaRule, Network, UserConfig};

pub use crate::scram_client::{derivations_counter, KeyCache, ScramClient};

/// Why credentials or an authentication exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A configured password source could not be read.
    #[error("users.{index}: {what}")]
    Source {
        /// Index of the user in the config.
        index: usize,
        /// What went wrong.
        what: String,
    },
    /// The client sent a SCRAM message that does not follow the mechanism.
    #[error("malformed SCRAM message")]
    MalformedScram,
    /// The client chose a SASL mechanism that was not offered.
    #[error("client selected an invalid SASL authentication mechanism")]
    BadMechanism,
    /// The password (or proof) is wrong.
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    /// A backend asks for SCRAM with a salt no known key was made for, and there is no password
    /// to derive one.
    #[error("no password, and no SCRAM key for the server's salt and iteration count")]
    NoKey,
}

impl AuthError {
    /// The SQLSTATE PostgreSQL reports.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            _ => "08P01",
        }
    }
}

/// A SCRAM-SHA-256 verifier as stored in pg_authid.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub(crate) iterations: u32,
    pub(crate) salt: Vec<u8>,
    pub(crate) stored_key: [u8; 32],
    pub(crate) server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

impl ScramSecret {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations = iter.parse().ok().filter(|&i: &u32| i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A fresh verifier (random salt) for `password`.
    pub fn from_password(password: &str) -> ScramSecret {
        let s = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramSecret::parse(&s).expect("postgres-protocol produces valid verifiers")
    }

    /// The verifier for `password` with this `salt` and iteration count (PBKDF2, as
    /// PostgreSQL derives it; the password is used as given, without SASLprep).
    pub fn from_password_with(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecret {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(hmac(&salted, b"Client Key")).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// The secret mock verifiers are derived from: random, made once per process (PostgreSQL keeps
/// its `mock_auth_nonce` in pg_control; here a restart draws a new one, as it draws new salts
/// for users configured by clear-text password).
fn mock_nonce() -> &'static [u8; 32] {
    static NONCE: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    NONCE.get_or_init(rand::random)
}

impl ScramSecret {
    /// A made-up verifier for a user who has none (unknown, or with only an md5 secret), so
    /// that such a user goes through the same SCRAM exchange as a known one with a wrong
    /// password, and user names cannot be probed: the salt is derived from a server secret and
    /// the name (the same name always gets the same salt), the iterations are the usual 4096,
    /// and no password matches the keys.
    pub fn mock(user: &str) -> ScramSecret {
        let nonce = mock_nonce();
        let salt = hmac(nonce, format!("salt\0{user}").as_bytes());
        ScramSecret {
            iterations: 4096,
            salt: salt[..16].to_vec(),
            stored_key: hmac(nonce, format!("stored\0{user}").as_bytes()),
            server_key: hmac(nonce, format!("server\0{user}").as_bytes()),
        }
    }
}

/// Whether `s` looks like an md5 secret (`md5` and 32 hex digits).
pub fn is_md5_secret(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the proxy knows about one user's password. Never printed.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The clear-text password, when configured (needed for SCRAM logins to backends).
    pub plain: Option<String>,
    /// The SCRAM client keys of `plain` for the salts backends use, derived once per salt.
    pub keys: std::sync::Arc<KeyCache>,
    /// The SCRAM verifier clients are checked against.
    pub scram: Option<ScramSecret>,
    /// The md5 secret (`md5` + hex), for md5 clients and md5 backend logins.
    pub md5: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("plain", &self.plain.as_ref().map(|_| "<redacted>"))
            .field("scram", &self.scram.is_some())
            .field("md5", &self.md5.is_some())
            .finish()
    }
}

impl Credentials {
    /// Credentials from a stored secret (`SCRAM-SHA-256$...` or `md5...`, as `[[users]].secret`
    /// or `auth_query` give it); `None` when it is neither.
    pub fn from_secret(secret: &str, derivations: &prometheus::IntCounter) -> Option<Credentials> {
        let mut c = Credentials {
            keys: std::sync::Arc::new(KeyCache::new(derivations.clone())),
            ..Credentials::default()
        };
        if is_md5_secret(secret) {
            c.md5 = Some(secret.to_string());
        } else {
            c.scram = Some(ScramSecret::parse(secret)?);
        }
        Some(c)
    }

    /// Whether a backend's SCRAM request can be answered: with the password, or with a
    /// `ClientKey` a client proved (kept in `keys`).
    pub fn can_scram(&self) -> bool {
        self.plain.is_some() || self.keys.has_keys()
    }

    /// These credentials for one session whose client proved `client_key` against `scram`:
    /// a fresh key cache holding that key (so each session logs in to backends with what its
    /// own client proved).
    pub fn with_client_key(&self, client_key: [u8; 32], derivations: &prometheus::IntCounter) -> Credentials {
        let keys = KeyCache::new(derivations.clone());
        if let Some(secret) = &self.scram {
            keys.insert_recovered(secret, client_key);
        }
        Credentials {
            keys: std::sync::Arc::new(keys),
            ..self.clone()
        }
    }
}

/// md5 secret of `password` for `user` as PostgreSQL stores it.
pub fn md5_secret(user: &str, password: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

/// Reads every user's password source into [`Credentials`]: the verifier clients are checked
/// against is derived here, once per user and configuration; backend keys are derived on a
/// user's first backend login and counted on `derivations`.
pub fn resolve_users(
    users: &[UserConfig],
    derivations: &prometheus::IntCounter,
) -> Result<HashMap<String, Credentials>, AuthError> {
    let mut out = HashMap::new();
    for (index, u) in users.iter().enumerate() {
        let plain = if let Some(p) = &u.password {
            Some(p.clone())
        } else if let Some(var) = &u.password_env {
            Some(std::env::var(var).map_err(|_| AuthError::Source {
                index,
                what: format!("environment variable {var} is not set"),
            })?)
        } else if let Some(path) = &u.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| AuthError::Source {
                index,
                what: format!("cannot read password file {path}: {e}"),
            })?;
            Some(text.lines().next().unwrap_or("").to_string())
        } else {
            None
        };
        let mut c = Credentials {
            keys: std::sync::Arc::new(KeyCache::new(derivations.clone())),
            ..Credentials::default()
        };
        if let Some(p) = plain {
            c.scram = Some(ScramSecret::from_password(&p));
            c.md5 = Some(md5_secret(&u.name, &p));
            c.plain = Some(p);
        } else if let Some(s) = &u.secret {
            if is_md5_secret(s) {
                c.md5 = Some(s.clone());
            } else {
                c.scram = ScramSecret::parse(s);
            }
        }
        out.insert(u.name.clone(), c);
    }
    Ok(out)
}

/// Client authentication rules, parsed once.
#[derive(Debug, Clone)]
pub struct Hba {
    rules: Vec<(HbaRule, Network)>,
}

impl Hba {
    /// Compiles `rules` (validated by the config).
    pub fn new(rules: &[HbaRule]) -> Hba {
        Hba {
            rules: rules
                .iter()
                .filter_map(|r| Some((r.clone(), Network::parse(&r.network)?)))
                .collect(),
        }
    }

    /// The method for `user` on `database` from `ip`, or `None` when no rule matches.
    pub fn method(&self, user: &str, database: &str, ip: IpAddr) -> Option<AuthMethod> {
        if self.rules.is_empty() {
            return Some(AuthMethod::ScramSha256);
        }
        self.rules
            .iter()
            .find(|(r, n)| {
                (r.user == "all" || r.user == user)
                    && (r.database == "all" || r.database == database)
                    && n.contains(ip)
            })
            .map(|(r, _)| r.method)
    }
}

/// Checks an md5 PasswordMessage against the md5 secret and the salt that was sent.
pub fn md5_ok(secret: &str, salt: [u8; 4], answer: &str) -> bool {
    let mut h = Md5::new();
    h.update(secret.as_bytes().get(3..).unwrap_or_default());
    h.update(salt);
    let expected = format!("md5{:x}", h.finalize());
    constant_eq(expected.as_bytes(), answer.as_bytes())
}

pub(crate) fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The server side of one SCRAM-SHA-256 exchange, between the client's first and final message.
pub struct ScramServer {
    secret: ScramSecret,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Handles the client-first-message; returns the state and the server-first-message.
    pub fn start(
        secret: ScramSecret,
        mechanism: &str,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), AuthError> {
        if mechanism != "SCRAM-SHA-256" {
            return Err(AuthError::BadMechanism);
        }
        let msg = std::str::from_utf8(client_first).map_err(|_| AuthError::MalformedScram)?;
        // gs2-header: channel binding flag, optional authzid, then the bare message.
        let (flag, rest) = msg.split_once(',').ok_or(AuthError::MalformedScram)?;
        if flag != "n" && flag != "y" {
            return Err(AuthError::MalformedScram);
        }
        let (authzid, bare) = rest.split_once(',').ok_or(AuthError::MalformedScram)?;
        if !authzid.is_empty() {
            return Err(AuthError::MalformedScram);
        }
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(r) = attr.strip_prefix("r=") {
                client_nonce = Some(r);
            } else if attr.starts_with("m=") {
                return Err(AuthError::MalformedScram);
            }
        }
        let client_nonce = client_nonce
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(AuthError::MalformedScram)?;
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::thread_rng(), &mut raw[..]);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        Ok((
            ScramServer {
                secret,
                gs2_header: format!("{flag},{authzid},"),
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message on success.
    pub fn finish(&self, user: &str, client_final: &[u8]) -> Result<String, AuthError> {
        self.finish_keys(user, client_final).map(|(fin, _)| fin)
    }

    /// [`ScramServer::finish`], also returning the `ClientKey` the client proved it has
    /// (`ClientProof XOR HMAC(StoredKey, AuthMessage)`, checked against `StoredKey`): with it the
    /// proxy can log in to servers holding the same verifier, as PgBouncer does.
    pub fn finish_keys(&self, user: &str, client_final: &[u8]) -> Result<(String, [u8; 32]), AuthError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| AuthError::MalformedScram)?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(AuthError::MalformedScram)?;
        let mut cbind = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                cbind = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let cbind = B64
            .decode(cbind.ok_or(AuthError::MalformedScram)?)
            .map_err(|_| AuthError::MalformedScram)?;
        if cbind != self.gs2_header.as_bytes() || nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::MalformedScram);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(AuthError::MalformedScram)?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_eq(&stored, &self.secret.stored_key) {
            return Err(AuthError::Failed(user.to_string()));
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(verifier_pw: &str, client_pw: &str) -> Result<(), AuthError> {
        let secret = ScramSecret::from_password(verifier_pw);
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(secret, "SCRAM-SHA-256", client.message())?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.finish("u", client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn scram_against_the_postgres_protocol_client() {
        exchange("secret", "secret").unwrap();
        assert!(matches!(exchange("secret", "wrong"), Err(AuthError::Failed(_))));
    }

    #[test]
    fn malformed_scram_messages() {
        let s = ScramSecret::from_password("x");
        assert!(matches!(
            ScramServer::start(s.clone(), "PLAIN", b"n,,n=,r=a"),
            Err(AuthError::BadMechanism)
        ));
        for bad in [&b"p=tls,,n=,r=a"[..], b"n,,n=", b"n,a,n=,r=x", b"\xff", b"n,,r="] {
            assert!(matches!(
                ScramServer::start(s.clone(), "SCRAM-SHA-256", bad),
                Err(AuthError::MalformedScram)
            ));
        }
        let (server, _) = ScramServer::start(s, "SCRAM-SHA-256", b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            server.finish("u", b"c=biws,r=abc,p=AAAA"),
            Err(AuthError::MalformedScram)
        ));
        assert!(matches!(
            server.finish("u", b"garbage"),
            Err(AuthError::MalformedScram)
        ));
    }

    #[test]
    fn md5_and_secrets() {
        let secret = md5_secret("app", "pw");
        assert!(is_md5_secret(&secret));
        let salt = [1, 2, 3, 4];
        let answer = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(md5_ok(&secret, salt, &answer));
        assert!(!md5_ok(&secret, [0; 4], &answer));
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(ScramSecret::parse(&v).is_some());
        assert!(ScramSecret::parse("SCRAM-SHA-256$0:AA==$AA==:AA==").is_none());
        assert!(format!(
            "{:?}",
            resolve_users(
                &[UserConfig {
                    name: "a".into(),
                    password: Some("hunter2".into()),
                    ..Default::default()
                }],
                &derivations_counter()
            )
            .unwrap()
        )
        .find("hunter2")
        .is_none());
    }

    #[test]
    fn hba_first_match_wins() {
        let rules = vec![
            HbaRule {
                user: "app".into(),
                network: "10.0.0.0/8".into(),
                method: AuthMethod::Md5,
                ..HbaRule::default()
            },
            HbaRule {
                user: "all".into(),
                network: "127.0.0.1/32".into(),
                method: AuthMethod::Trust,
                ..HbaRule::default()
            },
        ];
        let hba = Hba::new(&rules);
        assert_eq!(
            hba.method("app", "db", "10.1.1.1".parse().unwrap()),
            Some(AuthMethod::Md5)
        );
        assert_eq!(
            hba.method("app", "db", "127.0.0.1".parse().unwrap()),
            Some(AuthMethod::Trust)
        );
        assert_eq!(hba.method("app", "db", "192.168.0.1".parse().unwrap()), None);
        assert_eq!(
            Hba::new(&[]).method("x", "y", "1.2.3.4".parse().unwrap()),
            Some(AuthMethod::ScramSha256)
        );
    }
}

//! The client side of SCRAM-SHA-256 (backend logins) and the keys it logs in with.
//!
//! postgres-protocol has a client too, but it derives the salted password (4096 HMACs) at every
//! login and cannot take stored keys: [`KeyCache`] keeps a user's keys per server salt, derived
//! once from a configured password, or recovered from the proof a client sent
//! ([`crate::auth::ScramServer::finish_keys`]) when there is no password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest as _, Sha256};

use crate::auth::{constant_eq, hmac, AuthError, ScramSecret};

/// The most PBKDF2 iterations a server may ask of the proxy's SCRAM client (as postgres-protocol
/// caps it): a server cannot make a login burn unbounded CPU.
const MAX_ITERATIONS: u32 = 100_000;

/// The most (salt, iterations) pairs whose keys are kept per user.
const MAX_CACHED_KEYS: usize = 8;

/// The keys a SCRAM client derives from a password, a salt and an iteration count.
#[derive(Clone)]
struct ClientKeys {
    salt: Vec<u8>,
    iterations: u32,
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

/// A configured password's SCRAM client keys, by the salt and iteration count servers
/// announced. The salted password costs `iterations` HMACs (PBKDF2): computed once per salt and
/// kept for the life of the configuration (a reload starts afresh), a backend login then costs a
/// few HMACs instead. The lock is held only to look up or add keys, never while computing them.
pub struct KeyCache {
    entries: std::sync::Mutex<Vec<ClientKeys>>,
    /// Counts derivations (PBKDF2 runs): `dbproxy_scram_key_derivations_total`.
    derived: prometheus::IntCounter,
}

impl Default for KeyCache {
    fn default() -> KeyCache {
        KeyCache::new(derivations_counter())
    }
}

/// A counter of key derivations, not registered anywhere (the server registers its own).
pub fn derivations_counter() -> prometheus::IntCounter {
    prometheus::IntCounter::new(
        "dbproxy_scram_key_derivations_total",
        "SCRAM client keys derived from configured passwords (PBKDF2 runs)",
    )
    .expect("a valid metric name")
}

impl KeyCache {
    /// An empty cache counting its derivations on `derived`.
    pub fn new(derived: prometheus::IntCounter) -> KeyCache {
        KeyCache {
            entries: std::sync::Mutex::new(Vec::new()),
            derived,
        }
    }

    /// How many times keys were derived so far.
    pub fn derivations(&self) -> u64 {
        self.derived.get()
    }

    /// Keeps the `client_key` a client proved it has for `secret` (see
    /// [`ScramServer::finish_keys`]): backends with the same verifier (same salt and iterations)
    /// then accept logins with it, without any password.
    pub fn insert_recovered(&self, secret: &ScramSecret, client_key: [u8; 32]) {
        let keys = ClientKeys {
            salt: secret.salt.clone(),
            iterations: secret.iterations,
            client_key,
            stored_key: secret.stored_key,
            server_key: secret.server_key,
        };
        let mut entries = self.entries.lock().expect("key cache poisoned");
        entries.retain(|k| k.iterations != keys.iterations || k.salt != keys.salt);
        if entries.len() >= MAX_CACHED_KEYS {
            entries.remove(0);
        }
        entries.push(keys);
    }

    /// Whether any key is kept (a login can then try SCRAM without a password).
    pub fn has_keys(&self) -> bool {
        !self.entries.lock().expect("key cache poisoned").is_empty()
    }

    fn lookup(&self, salt: &[u8], iterations: u32) -> Option<ClientKeys> {
        self.entries
            .lock()
            .expect("key cache poisoned")
            .iter()
            .find(|k| k.iterations == iterations && k.salt == salt)
            .cloned()
    }

    fn keys(&self, password: Option<&str>, salt: &[u8], iterations: u32) -> Result<ClientKeys, AuthError> {
        if let Some(k) = self.lookup(salt, iterations) {
            return Ok(k);
        }
        let password = password.ok_or(AuthError::NoKey)?;
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(&saslprep(password), salt, iterations, &mut salted);
        self.derived.inc();
        let client_key = hmac(&salted, b"Client Key");
        let keys = ClientKeys {
            salt: salt.to_vec(),
            iterations,
            client_key,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        };
        let mut entries = self.entries.lock().expect("key cache poisoned");
        if entries.len() >= MAX_CACHED_KEYS {
            entries.remove(0);
        }
        entries.push(keys.clone());
        Ok(keys)
    }
}

/// A password as SCRAM hashes it: SASLprep-normalized when it can be, as is otherwise (as
/// PostgreSQL and libpq do, since a password need not be valid UTF-8 nor SASLprep-clean).
fn saslprep(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// The client side of one SCRAM-SHA-256 exchange (backend logins), without channel binding.
pub struct ScramClient {
    nonce: String,
    /// Set by [`ScramClient::respond`]: the AuthMessage and the server key to check its signature.
    expect: Option<(String, [u8; 32])>,
}

impl ScramClient {
    /// A new exchange and its client-first-message.
    pub fn start() -> (ScramClient, String) {
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::thread_rng(), &mut raw[..]);
        let nonce = B64.encode(raw);
        let first = format!("n,,n=,r={nonce}");
        (ScramClient { nonce, expect: None }, first)
    }

    /// Answers the server-first-message with the client-final-message (the proof), with keys
    /// from `cache` (derived from `password` only the first time this salt is seen; without a
    /// password only a kept key for the server's salt serves).
    pub fn respond(
        &mut self,
        server_first: &[u8],
        password: Option<&str>,
        cache: &KeyCache,
    ) -> Result<String, AuthError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| AuthError::MalformedScram)?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in msg.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let nonce = nonce
            .filter(|n| n.len() > self.nonce.len() && n.starts_with(&self.nonce))
            .ok_or(AuthError::MalformedScram)?;
        let salt = salt.ok_or(AuthError::MalformedScram)?;
        let iterations = iterations
            .filter(|&i| (1..=MAX_ITERATIONS).contains(&i))
            .ok_or(AuthError::MalformedScram)?;
        let keys = cache.keys(password, &salt, iterations)?;
        // c=biws is base64 of the gs2 header "n,,".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{msg},{without_proof}", self.nonce);
        let signature = hmac(&keys.stored_key, auth_message.as_bytes());
        let mut proof = keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.expect = Some((auth_message, keys.server_key));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server too must know the password.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), AuthError> {
        let (auth_message, server_key) = self.expect.as_ref().ok_or(AuthError::MalformedScram)?;
        let msg = std::str::from_utf8(server_final).map_err(|_| AuthError::MalformedScram)?;
        let verifier = msg
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(AuthError::MalformedScram)?;
        let expected = hmac(server_key, auth_message.as_bytes());
        if constant_eq(&expected, &verifier) {
            Ok(())
        } else {
            Err(AuthError::MalformedScram)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{md5_secret, Credentials, ScramServer};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// One login of our client against our server, with keys from `cache`.
    fn client_login(secret: &ScramSecret, password: &str, cache: &KeyCache) -> Result<(), AuthError> {
        let (mut client, first) = ScramClient::start();
        let (_, bare) = first.split_at(3);
        let (server, server_first) = ScramServer::start(secret.clone(), "SCRAM-SHA-256", first.as_bytes())?;
        assert!(bare.starts_with("n=,r="));
        let fin = client.respond(server_first.as_bytes(), Some(password), cache)?;
        let verdict = server.finish("u", fin.as_bytes())?;
        client.finish(verdict.as_bytes())
    }

    #[test]
    fn the_scram_client_derives_keys_once_per_salt() {
        let cache = KeyCache::default();
        let secret = ScramSecret::from_password("pa\u{00AD}ss");
        client_login(&secret, "pa\u{00AD}ss", &cache).unwrap();
        client_login(&secret, "pa\u{00AD}ss", &cache).unwrap();
        assert_eq!(cache.derivations(), 1, "the second login reused the stored keys");
        let other = ScramSecret::from_password("pa\u{00AD}ss");
        client_login(&other, "pa\u{00AD}ss", &cache).unwrap();
        assert_eq!(cache.derivations(), 2, "another salt, other keys");
        let fresh = KeyCache::default();
        assert!(matches!(
            client_login(&secret, "wrong", &fresh),
            Err(AuthError::Failed(_))
        ));
        // SASLprep: the soft hyphen is mapped to nothing, as libpq and PostgreSQL do.
        client_login(&secret, "pass", &KeyCache::default()).unwrap();
    }

    #[test]
    fn a_proven_client_key_logs_in_without_the_password() {
        let secret = ScramSecret::from_password("s3cret");
        // A client (libpq's algorithm, from postgres-protocol) proves the password to the proxy.
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(secret.clone(), "SCRAM-SHA-256", client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (fin, client_key) = server.finish_keys("u", client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();
        // The proxy logs in to a server holding the same verifier with that key alone.
        let creds = Credentials {
            scram: Some(secret.clone()),
            ..Credentials::default()
        };
        assert!(!creds.can_scram());
        let session = creds.with_client_key(client_key, &derivations_counter());
        assert!(session.can_scram());
        let (mut c, first) = ScramClient::start();
        let (server, server_first) = ScramServer::start(secret, "SCRAM-SHA-256", first.as_bytes()).unwrap();
        let proof = c.respond(server_first.as_bytes(), None, &session.keys).unwrap();
        let verdict = server.finish("u", proof.as_bytes()).unwrap();
        c.finish(verdict.as_bytes()).unwrap();
        assert_eq!(session.keys.derivations(), 0, "no PBKDF2 without a password");
        // A server with another salt (another verifier) cannot be answered.
        let other = ScramSecret::from_password("s3cret");
        let (mut c, first) = ScramClient::start();
        let (_, server_first) = ScramServer::start(other, "SCRAM-SHA-256", first.as_bytes()).unwrap();
        assert!(matches!(
            c.respond(server_first.as_bytes(), None, &session.keys),
            Err(AuthError::NoKey)
        ));
        assert!(Credentials::from_secret("md5", &derivations_counter()).is_none());
        assert!(
            Credentials::from_secret(&md5_secret("u", "p"), &derivations_counter())
                .unwrap()
                .md5
                .is_some()
        );
    }

    #[test]
    fn the_scram_client_refuses_a_bad_server() {
        let cache = KeyCache::default();
        let (mut c, _) = ScramClient::start();
        for bad in [
            "r=other,s=AAAA,i=4096".to_string(),
            format!("r={}x,s=AAAA,i=0", c.nonce),
            format!("r={}x,s=AAAA,i=100000000", c.nonce),
            format!("r={}x,s=!!,i=4096", c.nonce),
            format!("r={},s=AAAA,i=4096", c.nonce),
        ] {
            assert!(
                matches!(
                    c.respond(bad.as_bytes(), Some("pw"), &cache),
                    Err(AuthError::MalformedScram)
                ),
                "{bad}"
            );
        }
        assert_eq!(cache.derivations(), 0, "nothing derived for a refused message");
        assert!(c.finish(b"v=AAAA").is_err(), "no final before the proof");
        let secret = ScramSecret::from_password("pw");
        let (mut client, first) = ScramClient::start();
        let (_, server_first) = ScramServer::start(secret, "SCRAM-SHA-256", first.as_bytes()).unwrap();
        client
            .respond(server_first.as_bytes(), Some("pw"), &cache)
            .unwrap();
        assert!(
            client.finish(b"v=AAAA").is_err(),
            "a server that does not know the password"
        );
        assert!(client.finish(b"e=other-error").is_err());
    }
}

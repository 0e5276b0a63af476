//! The operator login that guards the dashboard's switchover: a configured password, a signed
//! session cookie (`HttpOnly; SameSite=Strict`), a CSRF token derived from the session, and a
//! bound on failed logins.
//!
//! Sessions are signed rather than stored so that every webapp instance behind lb accepts a login
//! made on any of them (lb may balance round-robin): the signing key is derived from the operator
//! password with PBKDF2 at start, the cookie carries its expiry and a random nonce, and the CSRF
//! token is a MAC of that nonce. Nothing about a session is kept in memory; logging out clears the
//! cookie, and a copied cookie stays valid until it expires ([`SESSION_TTL`]).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use hyper::HeaderMap;
use sha2::Sha256;

/// The session cookie's name.
pub const COOKIE: &str = "hastack_operator";
/// The request header a switchover must carry the session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Failed logins allowed in a burst before further attempts are refused unchecked.
pub const FAILURE_BURST: u32 = 5;
/// One more failed login is allowed each time this passes (so 5 a minute at most, per instance).
pub const FAILURE_REFILL: Duration = Duration::from_secs(12);

/// PBKDF2 rounds turning the password into the signing key (once, at start).
const KEY_ROUNDS: u32 = 100_000;

type HmacSha256 = Hmac<Sha256>;

/// What a login attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Login {
    /// The password was right: set this cookie value (the whole `Set-Cookie` header value).
    Accepted(String),
    /// The password was wrong.
    Refused,
    /// Too many failures lately: the password was not even checked; try again after this long.
    Limited(Duration),
    /// No operator password is configured: the dashboard is read-only.
    Disabled,
}

/// Why a request that changes something was not let through.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No operator password is configured.
    #[error("operator login is not configured")]
    Disabled,
    /// No valid, unexpired session cookie.
    #[error("operator login required")]
    NoSession,
    /// A session, but the CSRF token is missing or does not match it.
    #[error("missing or wrong csrf token")]
    Csrf,
}

/// The failed-login budget: a token bucket refilled one per [`FAILURE_REFILL`].
#[derive(Debug)]
struct Budget {
    left: u32,
    since: Instant,
}

/// The operator credential and the login policy of one webapp instance.
pub struct Operator {
    password: String,
    key: [u8; 32],
    secure: bool,
    budget: Mutex<Budget>,
}

impl Operator {
    /// Builds the policy; an empty `password` disables every operator action.
    pub fn new(password: &str, secure_cookie: bool) -> Operator {
        let mut key = [0u8; 32];
        if !password.is_empty() {
            pbkdf2::pbkdf2_hmac::<Sha256>(
                password.as_bytes(),
                b"ha-stack webapp operator session",
                KEY_ROUNDS,
                &mut key,
            );
        }
        Operator {
            password: password.to_string(),
            key,
            secure: secure_cookie,
            budget: Mutex::new(Budget {
                left: FAILURE_BURST,
                since: Instant::now(),
            }),
        }
    }

    /// Whether an operator password is configured.
    pub fn enabled(&self) -> bool {
        !self.password.is_empty()
    }

    /// Checks `given` against the password, within the failed-login budget.
    pub fn login(&self, given: &str, now: Instant, wall: SystemTime) -> Login {
        if !self.enabled() {
            return Login::Disabled;
        }
        {
            // Held for arithmetic only, never across an await.
            let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            let refills = now.saturating_duration_since(b.since).as_millis() / FAILURE_REFILL.as_millis();
            if refills >= u128::from(FAILURE_BURST) {
                b.left = FAILURE_BURST;
                b.since = now;
            } else if refills > 0 {
                let refills = refills as u32;
                b.left = (b.left + refills).min(FAILURE_BURST);
                b.since += FAILURE_REFILL * refills;
            }
            if b.left == 0 {
                return Login::Limited((b.since + FAILURE_REFILL).saturating_duration_since(now));
            }
            if !common::admin::constant_eq(given.as_bytes(), self.password.as_bytes()) {
                if b.left == FAILURE_BURST {
                    // A full bucket starts refilling from the first failure.
                    b.since = now;
                }
                b.left -= 1;
                return Login::Refused;
            }
        }
        Login::Accepted(self.session_cookie(wall))
    }

    /// A fresh signed session cookie (the `Set-Cookie` value).
    fn session_cookie(&self, wall: SystemTime) -> String {
        use rand::RngCore;
        let expires = unix_secs(wall) + SESSION_TTL.as_secs();
        let mut nonce = [0u8; 18];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = URL_SAFE_NO_PAD.encode(nonce);
        let mac = URL_SAFE_NO_PAD.encode(self.mac(&["session", &expires.to_string(), &nonce]));
        format!(
            "{COOKIE}={expires}.{nonce}.{mac}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
            SESSION_TTL.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends a session in the browser.
    pub fn clear_cookie(&self) -> String {
        format!(
            "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
            if self.secure { "; Secure" } else { "" }
        )
    }

    fn mac(&self, parts: &[&str]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("hmac takes any key length");
        for p in parts {
            m.update(p.as_bytes());
            m.update(b"|");
        }
        m.finalize().into_bytes().to_vec()
    }

    /// The CSRF token of the valid session in `headers`' cookies, if there is one.
    pub fn session(&self, headers: &HeaderMap, wall: SystemTime) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let value = cookie(headers, COOKIE)?;
        let mut it = value.splitn(3, '.');
        let (expires, nonce, mac) = (it.next()?, it.next()?, it.next()?);
        let expires_at: u64 = expires.parse().ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let mut m = HmacSha256::new_from_slice(&self.key).expect("hmac takes any key length");
        for p in ["session", expires, nonce] {
            m.update(p.as_bytes());
            m.update(b"|");
        }
        // verify_slice compares in constant time.
        m.verify_slice(&mac).ok()?;
        if expires_at <= unix_secs(wall) {
            return None;
        }
        Some(URL_SAFE_NO_PAD.encode(self.mac(&["csrf", nonce])))
    }

    /// Lets a state-changing request through only with a valid session and its CSRF token, taken
    /// from the [`CSRF_HEADER`] header or, for a plain form, `form_token`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        form_token: Option<&str>,
        wall: SystemTime,
    ) -> Result<(), Refusal> {
        if !self.enabled() {
            return Err(Refusal::Disabled);
        }
        let expected = self.session(headers, wall).ok_or(Refusal::NoSession)?;
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .or(form_token)
            .ok_or(Refusal::Csrf)?;
        if common::admin::constant_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::Csrf)
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderValue, COOKIE as COOKIE_HEADER};

    fn headers(cookie: &str, csrf: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE_HEADER, HeaderValue::from_str(cookie).unwrap());
        if let Some(c) = csrf {
            h.insert(CSRF_HEADER, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    /// The `name=value` part of a `Set-Cookie` value.
    fn pair(set_cookie: &str) -> &str {
        set_cookie.split(';').next().unwrap()
    }

    #[test]
    fn a_login_gives_a_strict_http_only_cookie_and_a_csrf_token() {
        let op = Operator::new("correct horse", false);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let Login::Accepted(set) = op.login("correct horse", now, wall) else {
            panic!("refused")
        };
        assert!(set.contains("; HttpOnly; SameSite=Strict"), "{set}");
        assert!(!set.contains("Secure"), "{set}");
        let h = headers(&format!("other=1; {}", pair(&set)), None);
        let csrf = op.session(&h, wall).expect("a session");
        assert_eq!(op.authorize(&h, None, wall), Err(Refusal::Csrf));
        assert_eq!(op.authorize(&h, Some("nope"), wall), Err(Refusal::Csrf));
        assert_eq!(op.authorize(&h, Some(&csrf), wall), Ok(()));
        let h = headers(pair(&set), Some(&csrf));
        assert_eq!(op.authorize(&h, None, wall), Ok(()));
        // Another instance with the same password accepts it; one with another password does not.
        assert_eq!(
            Operator::new("correct horse", false).authorize(&h, None, wall),
            Ok(())
        );
        assert_eq!(
            Operator::new("another one", false).authorize(&h, None, wall),
            Err(Refusal::NoSession)
        );
        // Expired, tampered with, or absent.
        let later = wall + SESSION_TTL + Duration::from_secs(1);
        assert_eq!(op.authorize(&h, None, later), Err(Refusal::NoSession));
        let forged = pair(&set).replacen('.', "9.", 1);
        assert_eq!(
            op.authorize(&headers(&forged, Some(&csrf)), None, wall),
            Err(Refusal::NoSession)
        );
        assert_eq!(
            op.authorize(&HeaderMap::new(), Some(&csrf), wall),
            Err(Refusal::NoSession)
        );
        assert!(Operator::new("x", true).clear_cookie().ends_with("; Secure"));
    }

    #[test]
    fn without_a_password_nothing_is_allowed() {
        let op = Operator::new("", false);
        assert!(!op.enabled());
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert_eq!(op.login("", now, wall), Login::Disabled);
        assert_eq!(
            op.authorize(&HeaderMap::new(), Some(""), wall),
            Err(Refusal::Disabled)
        );
        // A cookie signed with the all-zero key of a disabled instance is not a session.
        assert_eq!(op.session(&headers("hastack_operator=1.a.b", None), wall), None);
    }

    #[test]
    fn failed_logins_are_rate_limited_and_the_budget_refills() {
        let op = Operator::new("right password", false);
        let (t0, wall) = (Instant::now(), SystemTime::now());
        for _ in 0..FAILURE_BURST {
            assert_eq!(op.login("guess", t0, wall), Login::Refused);
        }
        // Past the burst even the right password is not checked.
        assert_eq!(
            op.login("right password", t0, wall),
            Login::Limited(FAILURE_REFILL)
        );
        let t1 = t0 + FAILURE_REFILL - Duration::from_secs(2);
        assert_eq!(
            op.login("guess", t1, wall),
            Login::Limited(Duration::from_secs(2))
        );
        // One failure more is allowed per refill period.
        let t2 = t0 + FAILURE_REFILL;
        assert_eq!(op.login("guess", t2, wall), Login::Refused);
        assert!(matches!(op.login("right password", t2, wall), Login::Limited(_)));
        let t3 = t0 + 2 * FAILURE_REFILL;
        assert!(matches!(op.login("right password", t3, wall), Login::Accepted(_)));
        // A success costs nothing; a long pause refills the whole burst, no more.
        let t4 = t3 + 100 * FAILURE_REFILL;
        for _ in 0..FAILURE_BURST {
            assert_eq!(op.login("guess", t4, wall), Login::Refused);
        }
        assert!(matches!(op.login("guess", t4, wall), Login::Limited(_)));
    }
}

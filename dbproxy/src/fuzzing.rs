//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz) and for the replay test
//! (`tests/fuzz_replay.rs`) that runs the committed corpora and pseudo-random input through the
//! same functions in every `cargo test`. Each takes arbitrary bytes, drives one parser of input
//! from the network or from files the way the proxy does, and panics only when the parser breaks
//! a rule it promises (a buffer past its limit, a classification that is not conservative).
//! Not an API: hidden from the docs, may change with the parsers.

use std::path::Path;

use bytes::BytesMut;

use crate::auth::{ScramSecret, ScramServer};
use crate::classify::{Classifier, Encoding, Target};
use crate::protocol::{self, auth, decode, extended, simple, status, BackendMessage, FrontendMessage};
use crate::settings::Tracker;

/// The frame limit the targets decode with (small, so that the limit is actually reached).
const MAX: usize = 4096;

/// Regular frames from a client: framing, then every typed view the session reads.
pub fn frontend(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = decode(&mut buf, MAX) {
        assert!(f.raw().len() <= MAX, "a frame past the limit");
        let Ok(m) = FrontendMessage::parse(&f) else {
            continue;
        };
        match m {
            FrontendMessage::Parse { param_types, .. } => {
                assert_eq!(param_types.to_vec().len(), param_types.len());
            }
            FrontendMessage::Bind(b) => {
                let _ = b.params();
            }
            FrontendMessage::Password { body } => {
                let _ = auth::password(body);
                let _ = auth::sasl_initial(body);
            }
            FrontendMessage::Describe(t) | FrontendMessage::Close(t) => {
                let _ = t.statement();
            }
            _ => {}
        }
        let b = f.body();
        let _ = simple::query_text(b);
        let _ = extended::parse(b).map(|_| extended::parse_param_types(b));
        let _ = extended::bind_params(b);
        let _ = extended::execute_portal(b);
        let _ = protocol::frontend::next_ends_batch(buf.as_ref());
    }
    // `decode` only reserves room for a frame it will accept (BytesMut may double what it had).
    assert!(
        buf.capacity() <= 2 * (MAX + data.len()),
        "buffer grew past the limit: {}",
        buf.capacity()
    );
}

/// Regular frames from a server: framing, then every typed view the proxy reads.
pub fn backend(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = decode(&mut buf, MAX) {
        let Ok(m) = BackendMessage::parse(&f) else {
            continue;
        };
        match m {
            BackendMessage::Authentication { data, .. } => {
                let _ = auth::sasl_mechanisms(data);
            }
            BackendMessage::ErrorResponse(e) | BackendMessage::NoticeResponse(e) => {
                let _ = (e.code(), e.severity(), e.message(), e.is_fatal());
            }
            BackendMessage::ParameterDescription(p) => {
                let _ = p.types();
            }
            BackendMessage::DataRow(r) => {
                let _ = r.first_text();
            }
            _ => {}
        }
        let b = f.body();
        let _ = status::parameter_status(b);
        let _ = extended::parameter_description(b);
        let _ = protocol::error::sqlstate(b);
        let _ = m.acknowledges();
    }
    assert!(
        buf.capacity() <= 2 * (MAX + data.len()),
        "buffer grew past the limit: {}",
        buf.capacity()
    );
}

/// The start of a connection as the login reads it: untagged packets (SSLRequest, GSSENCRequest,
/// CancelRequest, StartupMessage) until a StartupMessage, then password messages carrying the
/// SCRAM exchange against a fixed verifier; and the bytes as a stored SCRAM verifier.
pub fn startup(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ScramSecret::parse(text);
    }
    let mut buf = BytesMut::from(data);
    loop {
        match protocol::decode_startup(&mut buf) {
            Ok(Some(protocol::Startup::Params(_))) => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
    assert!(buf.capacity() <= 2 * (protocol::startup::MAX_STARTUP_PACKET + data.len()));
    static SECRET: std::sync::OnceLock<ScramSecret> = std::sync::OnceLock::new();
    let secret = SECRET
        .get_or_init(|| ScramSecret::from_password_with(b"fuzz", b"salt-of-sixteen!", 4096))
        .clone();
    let Ok(Some(first)) = decode(&mut buf, MAX) else {
        return;
    };
    let Ok((mech, msg)) = auth::sasl_initial(first.body()) else {
        return;
    };
    let Ok((server, _)) = ScramServer::start(secret, mech, msg) else {
        return;
    };
    if let Ok(Some(last)) = decode(&mut buf, MAX) {
        // The password is not in the corpus: the proof can never be right.
        assert!(
            server.finish("fuzz", last.body()).is_err(),
            "a forged SCRAM proof passed"
        );
    }
}

/// Words that make a statement a write wherever they stand outside quotes and comments (a
/// writing CTE, `FOR UPDATE`): the classifier must never send a string holding one of them to a
/// standby.
const WRITE_WORDS: [&str; 4] = ["insert", "update", "delete", "merge"];

/// Words that make a statement a write when they start it. Inside a query they may be a column
/// label (`SELECT 1 AS create`) or an unreserved column name (`WHERE drop = 1`), which read.
const LEADING_WRITE_WORDS: [&str; 4] = ["create", "drop", "truncate", "grant"];

/// The classifier (every encoding family), the statement splitter, the session-settings tracker
/// fed with the statements, and parameter inlining, on arbitrary SQL.
pub fn classify(data: &[u8]) {
    static CLASSIFIER: std::sync::OnceLock<Classifier> = std::sync::OnceLock::new();
    let c = CLASSIFIER.get_or_init(|| Classifier::new(&["public.safe_fn".to_string()]));
    let (enc, sql) = match data.split_first() {
        Some((&e, rest)) => (if e & 1 == 0 { "UTF8" } else { "SJIS" }, rest),
        None => ("UTF8", data),
    };
    let encoding = Encoding::from_name(enc);
    let classified = c.classify_bytes(sql, encoding);
    let steps = c.steps_bytes(sql, encoding);
    if let Some(s) = &steps {
        assert!(s.len() <= crate::classify::MAX_STEPS);
    }
    if classified.target == Target::Standby && plain_words(sql) {
        let text = std::str::from_utf8(sql).expect("plain words are ASCII");
        let mut words = text
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .filter(|w| !w.is_empty());
        if let Some(first) = words.clone().next() {
            assert!(
                !LEADING_WRITE_WORDS.iter().any(|k| first.eq_ignore_ascii_case(k)),
                "{text:?} starts with the write keyword {first:?} and went to a standby"
            );
        }
        for w in &mut words {
            assert!(
                !WRITE_WORDS.iter().any(|k| w.eq_ignore_ascii_case(k)),
                "{text:?} holds the write keyword {w:?} and went to a standby"
            );
        }
    }
    let mut t = Tracker::default();
    t.start(b'I', true);
    let n = steps.as_ref().map_or(1, Vec::len);
    t.query(steps);
    for i in 0..n.min(64) {
        let _ = t.complete(if i % 2 == 0 { b"SET" } else { b"BEGIN" });
    }
    let _ = t.ready(b'I');
    if let Ok(text) = std::str::from_utf8(sql) {
        if let Some(out) = crate::classify::inline_params(text, &[Some("x'\\"), None]) {
            assert!(out.len() <= text.len() + 16 * 32 + 64 || text.contains('$'));
        }
    }
}

/// Whether `sql` has nothing but identifiers, numbers, spaces and a few punctuation marks: no
/// quote, comment or dollar sign, so that a word in it is surely a keyword or a name.
fn plain_words(sql: &[u8]) -> bool {
    sql.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b" _,;()*=.\n\t".contains(&b))
}

/// `pgpool.conf` text (its `pool_passwd` is looked up in a directory that does not exist).
pub fn pgpool_conf(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::pgpool_conf::parse(&text, Path::new("/nonexistent/dbproxy-fuzz"));
}

/// `pool_passwd` text.
pub fn pool_passwd(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::pool_passwd::parse(&text, Path::new("pool_passwd"), &mut Vec::new());
}

/// `pool_hba.conf` text.
pub fn pool_hba(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::pool_hba::translate(&text);
}

/// PCP requests: framing, then each request's fields.
pub fn pcp(data: &[u8]) {
    use crate::pcp::protocol::{frame, Request};
    let mut rest = data;
    while let Ok(Some(f)) = frame(rest) {
        assert!(f.len > 0 && f.len <= rest.len());
        let _ = Request::parse(f.tag, f.body);
        rest = &rest[f.len..];
    }
}

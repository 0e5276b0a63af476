//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz) and for the replay test
//! (`tests/fuzz_replay.rs`) that runs the committed corpora and pseudo-random input through the
//! same functions in every `cargo test`. Each takes arbitrary bytes and drives one parser of
//! input from clients, upstream servers or files the way lb does; it panics only when a rule
//! that keeps framing unambiguous is broken (a request or response head written out that would
//! be read differently from how lb read it). Not an API: hidden from the docs.

use std::sync::OnceLock;

use crate::fast::{self, ChunkedEnd, ClientInfo, Framing, Parsed};
use crate::head_check;
use crate::Runtime;

/// Most headers parsed, as on the fast path.
const MAX_HEADERS: usize = 64;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let mut c = crate::Config::default();
        c.upstream.servers = vec![crate::config::ServerConfig {
            addr: "127.0.0.1:1".into(),
            ..Default::default()
        }];
        c.upstream.algorithm = crate::config::Algorithm::Hash;
        c.upstream.hash_key = "$http_x_user".into();
        let client = crate::build_client(&c);
        Runtime::build(c, client, None).expect("a valid fuzzing config")
    })
}

/// The headers of a head that httparse reads completely, as (name, value) pairs.
fn count(headers: &[httparse::Header<'_>], name: &str) -> usize {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .count()
}

/// A client's request head: httparse, lb's own checks (`head_check`: Host, Content-Length,
/// Transfer-Encoding, request line), and the fast path's rewrite of it for the upstream, which
/// must be a well-formed head with one Host and no body framing.
pub fn request_head(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let _ = head_check::check_line(
        req.method.unwrap_or("").as_bytes(),
        req.path.is_some_and(|p| p.starts_with('/')),
    );
    let checked = head_check::check(
        req.version == Some(1),
        req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    );
    if checked.is_err() {
        return;
    }
    let info = ClientInfo::new(
        "192.0.2.7:5000".parse().expect("an address"),
        "127.0.0.1:80".parse().expect("an address"),
        80,
        false,
    );
    let mut out = Vec::new();
    if fast::prepare(data, runtime(), &info, true, &mut out).is_none() {
        return;
    }
    let mut up_headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut up = httparse::Request::new(&mut up_headers);
    match up.parse(&out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "bytes after the head"),
        other => panic!("the upstream head does not parse: {other:?}"),
    }
    assert_eq!(count(up.headers, "host"), 1, "not exactly one Host upstream");
    assert_eq!(count(up.headers, "transfer-encoding"), 0);
    assert!(up
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .all(|h| head_check::content_length(h.value) == Some(0)));
}

/// An upstream response head as the fast path reads it (the first byte picks HEAD or not and
/// whether the client asked to close), and the copy written for the client, which must frame
/// the body as lb does.
pub fn response_head(data: &[u8]) {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    let Ok(Parsed::Final(head)) = fast::parse_response(data, flags & 1 == 1, flags & 2 == 2, &mut out) else {
        return;
    };
    assert!(head.len <= data.len());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "bytes after the head"),
        other => panic!("the client head does not parse: {other:?}"),
    }
    let lengths: Vec<_> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| head_check::content_length(h.value))
        .collect();
    match head.framing {
        Framing::Chunked => assert!(lengths.is_empty(), "Content-Length beside chunked"),
        Framing::Length(n) => assert!(lengths.iter().all(|l| *l == Some(n))),
        Framing::UntilClose => {
            assert!(
                resp.headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close"))
            );
        }
        Framing::Empty => {}
    }
}

/// A chunked body fed to [`ChunkedEnd`] whole and in pieces (sizes from the first bytes): where
/// it ends, or that it is malformed, must not depend on how the bytes arrived.
pub fn chunked(data: &[u8]) {
    let (cuts, body) = data.split_at(data.len().min(4));
    let mut whole = ChunkedEnd::default();
    let expected = whole.feed(body);
    let mut pieces = ChunkedEnd::default();
    let mut at = 0;
    let mut got = Ok(None);
    for &c in cuts.iter().cycle() {
        if at >= body.len() {
            break;
        }
        let end = (at + 1 + c as usize).min(body.len());
        match pieces.feed(&body[at..end]) {
            Ok(Some(n)) => {
                got = Ok(Some(at + n));
                break;
            }
            Ok(None) => at = end,
            Err(e) => {
                got = Err(e);
                break;
            }
        }
    }
    assert_eq!(expected, got, "the end of a chunked body depends on the reads");
}

/// nginx.conf text (`--nginx-conf`).
pub fn nginx_conf(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::nginx_conf::translate(&text);
}

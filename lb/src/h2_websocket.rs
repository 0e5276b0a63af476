//! Websockets over HTTP/2 (RFC 8441): an extended CONNECT with `:protocol websocket` becomes an
//! HTTP/1.1 websocket handshake to the upstream (GET, `Upgrade: websocket`, a fresh
//! `Sec-WebSocket-Key`), and the upstream's 101 becomes the 200 the HTTP/2 client waits for.
//! Pure header work; the relay itself is `proxy::relay_upgrade`'s.

use std::hash::{BuildHasher, Hasher};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};

const SEC_WEBSOCKET_KEY: &str = "sec-websocket-key";
const SEC_WEBSOCKET_ACCEPT: &str = "sec-websocket-accept";

/// Whether `req` is an RFC 8441 websocket request (CONNECT with `:protocol websocket`).
pub(crate) fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req.version() == Version::HTTP_2
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns the request headers of an extended CONNECT into an HTTP/1.1 websocket handshake's
/// (after hop-by-hop headers were stripped): `Upgrade`, `Connection` and a new key. The
/// client's `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` pass as they are.
pub(crate) fn to_http1_handshake(headers: &mut HeaderMap) {
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let key = HeaderValue::from_str(&new_key()).expect("base64 is a valid header value");
    headers.insert(SEC_WEBSOCKET_KEY, key);
    if !headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
}

/// The headers of the upstream's 101 that an HTTP/2 client's 200 must not carry.
pub(crate) fn strip_switching_headers(headers: &mut HeaderMap) {
    headers.remove(header::UPGRADE);
    headers.remove(header::CONNECTION);
    headers.remove(SEC_WEBSOCKET_ACCEPT);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
}

/// A websocket key: 16 bytes, base64 (RFC 6455 section 4.1). It is a nonce for this hop, not a
/// secret: std's per-process random hasher seeds give fresh bytes without a random crate.
fn new_key() -> String {
    let state = std::collections::hash_map::RandomState::new();
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    base64(&bytes)
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn keys_are_16_bytes_and_differ() {
        let (a, b) = (new_key(), new_key());
        assert_eq!(a.len(), 24);
        assert!(a.ends_with("=="));
        assert_ne!(a, b);
    }

    #[test]
    fn the_handshake_gets_upgrade_headers_and_the_answer_loses_them() {
        let mut h = HeaderMap::new();
        h.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        to_http1_handshake(&mut h);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::SEC_WEBSOCKET_VERSION).unwrap(), "13");
        assert_eq!(h.get("sec-websocket-protocol").unwrap(), "chat");
        assert!(h.contains_key(SEC_WEBSOCKET_KEY));
        let mut r = HeaderMap::new();
        r.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        r.insert(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_static("x"));
        r.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        strip_switching_headers(&mut r);
        assert_eq!(r.len(), 1);
    }
}

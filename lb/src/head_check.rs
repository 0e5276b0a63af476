//! The rules a request head must meet before lb forwards it, shared by the fast path and the
//! hyper path: the framing ambiguities request smuggling lives on are refused with a 400, as nginx
//! does, instead of being read one way here and another way upstream.
//!
//! - HTTP/1.1 needs exactly one `Host`; no version may carry two; an empty one is refused.
//! - The method is upper-case letters, `_` and `-` (nginx refuses `get`), never `CONNECT` (lb is
//!   no forward proxy); the target starts with `/` or is absolute (`*` and authority forms are
//!   refused).
//! - `Content-Length` is digits only (`+5`, `-1`, `5 5`, `0x5` are refused) and given once (nginx
//!   refuses a second one even when it repeats the first).
//! - `Transfer-Encoding` is allowed once, as exactly `chunked`, in HTTP/1.1 only, and never
//!   together with `Content-Length` (RFC 9112 section 6.3 lets a proxy reject that, and nginx does).

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadHead {
    /// An HTTP/1.1 request without `Host`.
    #[error("missing host header")]
    MissingHost,
    /// Two `Host` headers.
    #[error("duplicate host header")]
    DuplicateHost,
    /// An empty `Host`, or one with spaces or slashes.
    #[error("invalid host header")]
    BadHost,
    /// A method lb does not forward (`CONNECT`, or not upper-case letters).
    #[error("method not allowed")]
    BadMethod,
    /// A request target that is not a path or an absolute URL.
    #[error("invalid request target")]
    BadTarget,
    /// A `Content-Length` that is not a plain decimal number.
    #[error("invalid content-length")]
    BadLength,
    /// More than one `Content-Length`.
    #[error("duplicate content-length header")]
    DuplicateLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both content-length and transfer-encoding")]
    LengthAndEncoding,
    /// A `Transfer-Encoding` other than one plain `chunked` in HTTP/1.1.
    #[error("unsupported transfer-encoding")]
    BadEncoding,
}

/// The value of a `Content-Length`: ASCII digits only (optional surrounding spaces), at most 18 of
/// them so that it fits in a u64 with room to spare.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Checks a request head given as its version (`http11`: HTTP/1.1, else 1.0 or older) and its
/// headers as (name, value) byte pairs, in order.
pub(crate) fn check<'a>(
    http11: bool,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<(), BadHead> {
    let mut hosts = 0u32;
    let mut length: Option<u64> = None;
    let mut encodings = 0u32;
    let mut chunked = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            let v = value.trim_ascii();
            if v.is_empty() || v.iter().any(|&b| b <= b' ' || b == b'/' || b == b'\\') {
                return Err(BadHead::BadHost);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(value).ok_or(BadHead::BadLength)?;
            if length.is_some() {
                return Err(BadHead::DuplicateLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    if hosts > 1 {
        return Err(BadHead::DuplicateHost);
    }
    if http11 && hosts == 0 {
        return Err(BadHead::MissingHost);
    }
    if encodings > 0 {
        if encodings > 1 || !chunked || !http11 {
            return Err(BadHead::BadEncoding);
        }
        if length.is_some() {
            return Err(BadHead::LengthAndEncoding);
        }
    }
    Ok(())
}

/// Checks a request line: `method` and whether the target is a path (`/...`) or absolute.
pub(crate) fn check_line(method: &[u8], target_ok: bool) -> Result<(), BadHead> {
    if method.is_empty()
        || method == b"CONNECT"
        || !method
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        return Err(BadHead::BadMethod);
    }
    if !target_ok {
        return Err(BadHead::BadTarget);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(http11: bool, headers: &[(&str, &str)]) -> Result<(), BadHead> {
        check(http11, headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn plain_heads_pass() {
        assert_eq!(run(true, &[("Host", "a")]), Ok(()));
        assert_eq!(run(true, &[("host", "a"), ("Content-Length", " 12 ")]), Ok(()));
        assert_eq!(
            run(true, &[("Host", "a"), ("Transfer-Encoding", "Chunked")]),
            Ok(())
        );
        // HTTP/1.0 may leave Host out.
        assert_eq!(run(false, &[]), Ok(()));
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        use BadHead::*;
        type Case<'a> = (bool, &'a [(&'a str, &'a str)], BadHead);
        let cases: [Case<'_>; 15] = [
            (true, &[], MissingHost),
            (true, &[("Host", "a"), ("Host", "b")], DuplicateHost),
            (false, &[("Host", "a"), ("host", "a")], DuplicateHost),
            (true, &[("Host", "a"), ("Content-Length", "+5")], BadLength),
            (true, &[("Host", "a"), ("Content-Length", "-1")], BadLength),
            (true, &[("Host", "a"), ("Content-Length", "5 5")], BadLength),
            (true, &[("Host", "a"), ("Content-Length", "0x5")], BadLength),
            (true, &[("Host", "a"), ("Content-Length", "")], BadLength),
            (
                true,
                &[("Host", "a"), ("Content-Length", "99999999999999999999")],
                BadLength,
            ),
            (
                true,
                &[("Host", "a"), ("Content-Length", "5"), ("Content-Length", "6")],
                DuplicateLength,
            ),
            (
                true,
                &[("Host", "a"), ("Content-Length", "5"), ("content-length", "5")],
                DuplicateLength,
            ),
            (
                true,
                &[
                    ("Host", "a"),
                    ("Content-Length", "5"),
                    ("Transfer-Encoding", "chunked"),
                ],
                LengthAndEncoding,
            ),
            (
                true,
                &[("Host", "a"), ("Transfer-Encoding", "gzip, chunked")],
                BadEncoding,
            ),
            (
                true,
                &[
                    ("Host", "a"),
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "x"),
                ],
                BadEncoding,
            ),
            (false, &[("Transfer-Encoding", "chunked")], BadEncoding),
        ];
        for (http11, headers, want) in cases {
            assert_eq!(run(http11, headers), Err(want), "{headers:?}");
        }
        assert_eq!(run(true, &[("Host", "")]), Err(BadHost));
        assert_eq!(run(true, &[("Host", "a b")]), Err(BadHost));
        assert_eq!(check_line(b"GET", true), Ok(()));
        assert_eq!(check_line(b"PROPFIND", true), Ok(()));
        assert_eq!(check_line(b"get", true), Err(BadMethod));
        assert_eq!(check_line(b"CONNECT", true), Err(BadMethod));
        assert_eq!(check_line(b"OPTIONS", false), Err(BadTarget));
        assert_eq!(content_length(b"007"), Some(7));
        assert_eq!(
            content_length(b"123456789012345678"),
            Some(123_456_789_012_345_678)
        );
    }
}

//! ErrorResponse and NoticeResponse: encoding the proxy's own errors and reading the SQLSTATE of
//! a backend's.

use bytes::{BufMut, BytesMut};

use super::{put_cstr, write_msg};

/// Appends an ErrorResponse with `severity` (`ERROR`, `FATAL`), SQLSTATE `code` and `message`.
pub fn encode_error(severity: &str, code: &str, message: &str, out: &mut BytesMut) {
    write_msg(out, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// The value of field `field` of an ErrorResponse/NoticeResponse body, if present and well formed.
pub fn field(body: &[u8], field: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if t == field {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

/// The SQLSTATE of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> Option<&str> {
    field(body, b'C')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn error_roundtrip() {
        let mut buf = BytesMut::new();
        encode_error(
            "FATAL",
            "28P01",
            "password authentication failed for user \"x\"",
            &mut buf,
        );
        let f = decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'E');
        assert_eq!(sqlstate(f.body()), Some("28P01"));
        assert_eq!(field(f.body(), b'S'), Some("FATAL"));
        assert_eq!(
            field(f.body(), b'M'),
            Some("password authentication failed for user \"x\"")
        );
        assert_eq!(field(f.body(), b'D'), None);
    }

    #[test]
    fn truncated_fields_are_not_read() {
        assert_eq!(sqlstate(b"C25006"), None);
        assert_eq!(sqlstate(b""), None);
        assert_eq!(sqlstate(b"SERROR\0C25006\0\0"), Some("25006"));
    }
}

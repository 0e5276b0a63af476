//! The simple query protocol: Query, and the few response messages the proxy writes itself
//! (RowDescription, DataRow, CommandComplete, EmptyQueryResponse) for `SHOW POOL_NODES`.

use bytes::{BufMut, BytesMut};

use super::{put_cstr, write_msg, ProtocolError};

/// The SQL text of a Query body, as the bytes sent (in the client's encoding).
pub fn query_text(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut b = body;
    let s = super::cbytes(&mut b, "query")?;
    if !b.is_empty() {
        return Err(ProtocolError::Malformed("query"));
    }
    Ok(s)
}

/// Appends a Query message.
pub fn encode_query(sql: &str, out: &mut BytesMut) {
    write_msg(out, b'Q', |b| put_cstr(b, sql));
}

/// Appends a RowDescription of text columns named `names`.
pub fn encode_row_description(names: &[&str], out: &mut BytesMut) {
    write_msg(out, b'T', |b| {
        b.put_i16(names.len() as i16);
        for n in names {
            put_cstr(b, n);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

/// Appends a DataRow of text values.
pub fn encode_data_row<S: AsRef<str>>(values: &[S], out: &mut BytesMut) {
    write_msg(out, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_i32(v.as_ref().len() as i32);
            b.put_slice(v.as_ref().as_bytes());
        }
    });
}

/// Appends a CommandComplete with `tag`.
pub fn encode_command_complete(tag: &str, out: &mut BytesMut) {
    write_msg(out, b'C', |b| put_cstr(b, tag));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn query_roundtrip_and_malformed() {
        let mut buf = BytesMut::new();
        encode_query("select 1", &mut buf);
        let f = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(query_text(f.body()).unwrap(), b"select 1");
        assert!(query_text(b"select 1").is_err());
        assert!(query_text(b"a\0b\0").is_err());
        // Text in a single-byte client encoding (LATIN9 `caf\xe9`) is not UTF-8, and fine.
        assert_eq!(query_text(b"select 'caf\xe9'\0").unwrap(), b"select 'caf\xe9'");
    }

    #[test]
    fn rows() {
        let mut buf = BytesMut::new();
        encode_row_description(&["a", "b"], &mut buf);
        encode_data_row(&["1", "xy"], &mut buf);
        encode_command_complete("SHOW", &mut buf);
        let t = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&t.body()[..2], &[0, 2]);
        let d = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(d.body(), b"\0\x02\0\0\0\x011\0\0\0\x02xy");
        let c = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(c.body(), b"SHOW\0");
    }
}

//! Session status messages: ReadyForQuery, ParameterStatus and BackendKeyData.

use bytes::{BufMut, BytesMut};

use super::{cstr, i32_, put_cstr, write_msg, ProtocolError};

/// Appends a ReadyForQuery with transaction status `status` (`I`, `T` or `E`).
pub fn encode_ready(status: u8, out: &mut BytesMut) {
    write_msg(out, b'Z', |b| b.put_u8(status));
}

/// The transaction status of a ReadyForQuery body.
pub fn ready_status(body: &[u8]) -> Result<u8, ProtocolError> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

/// Appends a BackendKeyData.
pub fn encode_backend_key(pid: i32, key: i32, out: &mut BytesMut) {
    write_msg(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

/// Reads a BackendKeyData body.
pub fn backend_key(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    let mut b = body;
    let pid = i32_(&mut b, "BackendKeyData")?;
    let key = i32_(&mut b, "BackendKeyData")?;
    Ok((pid, key))
}

/// Reads a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut b = body;
    let k = cstr(&mut b, "ParameterStatus")?;
    let v = cstr(&mut b, "ParameterStatus")?;
    Ok((k, v))
}

/// Appends a ParameterStatus.
pub fn encode_parameter_status(k: &str, v: &str, out: &mut BytesMut) {
    write_msg(out, b'S', |b| {
        put_cstr(b, k);
        put_cstr(b, v);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn roundtrips() {
        let mut buf = BytesMut::new();
        encode_ready(b'T', &mut buf);
        encode_backend_key(7, -9, &mut buf);
        encode_parameter_status("TimeZone", "UTC", &mut buf);
        let z = decode(&mut buf, 64).unwrap().unwrap();
        assert_eq!(ready_status(z.body()).unwrap(), b'T');
        let k = decode(&mut buf, 64).unwrap().unwrap();
        assert_eq!(backend_key(k.body()).unwrap(), (7, -9));
        let s = decode(&mut buf, 64).unwrap().unwrap();
        assert_eq!(parameter_status(s.body()).unwrap(), ("TimeZone", "UTC"));
        assert!(ready_status(b"X").is_err());
        assert!(backend_key(b"\0\0").is_err());
    }
}

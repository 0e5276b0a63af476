//! The untagged first message of a connection: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest, told apart by the code where a protocol version would be.

use bytes::{BufMut, BytesMut};

use super::{cstr, i32_, ProtocolError};

/// The protocol version 3.0.
pub const PROTOCOL_3_0: i32 = 196608;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
/// PostgreSQL refuses startup packets longer than this.
pub const MAX_STARTUP_PACKET: usize = 10000;

/// A decoded first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// The client asks for TLS.
    Ssl,
    /// The client asks for GSSAPI encryption.
    GssEnc,
    /// Cancel the query running on the connection with these keys.
    Cancel {
        /// The process id from BackendKeyData.
        pid: i32,
        /// The secret key from BackendKeyData.
        key: i32,
    },
    /// A StartupMessage: its parameters in order (user, database, application_name, ...).
    Params(Vec<(String, String)>),
}

/// Takes the first message of a connection off `buf`; `Ok(None)` means more bytes are needed.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(ProtocolError::BadStartupLength);
    }
    let len = len as usize;
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut body = &packet[4..];
    let code = i32_(&mut body, "startup packet")?;
    match code {
        SSL_REQUEST if body.is_empty() => Ok(Some(Startup::Ssl)),
        GSSENC_REQUEST if body.is_empty() => Ok(Some(Startup::GssEnc)),
        CANCEL_REQUEST => {
            let pid = i32_(&mut body, "cancel request")?;
            let key = i32_(&mut body, "cancel request")?;
            Ok(Some(Startup::Cancel { pid, key }))
        }
        _ if code >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let k = cstr(&mut body, "startup packet")?;
                if k.is_empty() {
                    break;
                }
                let v = cstr(&mut body, "startup packet")?;
                params.push((k.to_string(), v.to_string()));
            }
            Ok(Some(Startup::Params(params)))
        }
        _ => Err(ProtocolError::UnsupportedVersion(
            (code >> 16) as u16,
            (code & 0xffff) as u16,
        )),
    }
}

/// Appends a StartupMessage (protocol 3.0) carrying `params`.
pub fn encode_startup<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>, out: &mut BytesMut) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        super::put_cstr(out, k);
        super::put_cstr(out, v);
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a CancelRequest for the backend with `pid` and `key`.
pub fn encode_cancel(pid: i32, key: i32, out: &mut BytesMut) {
    out.put_i32(16);
    out.put_i32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_i32(key);
}

/// Appends an SSLRequest (sent to servers when TLS is wanted, and by tests).
pub fn encode_ssl_request(out: &mut BytesMut) {
    out.put_i32(8);
    out.put_i32(SSL_REQUEST);
}

/// A server's one-byte answer to SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslAnswer {
    /// `S`: the TLS handshake comes next.
    Accepted,
    /// `N`: the connection stays in clear text.
    Refused,
}

/// Reads a server's answer to SSLRequest; anything but `S` or `N` (an old server's
/// ErrorResponse) breaks the protocol.
pub fn ssl_answer(byte: u8) -> Result<SslAnswer, ProtocolError> {
    match byte {
        b'S' => Ok(SslAnswer::Accepted),
        b'N' => Ok(SslAnswer::Refused),
        _ => Err(ProtocolError::Malformed("answer to SSLRequest")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_roundtrip() {
        let mut buf = BytesMut::new();
        encode_startup([("user", "app"), ("database", "db")], &mut buf);
        let half = buf.split_to(7);
        let mut first = half.clone();
        assert_eq!(decode_startup(&mut first).unwrap(), None);
        let mut all = half;
        all.unsplit(buf);
        let s = decode_startup(&mut all).unwrap().unwrap();
        assert_eq!(
            s,
            Startup::Params(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ])
        );
        assert!(all.is_empty());
    }

    #[test]
    fn ssl_gss_and_cancel() {
        let mut buf = BytesMut::new();
        encode_ssl_request(&mut buf);
        assert_eq!(decode_startup(&mut buf).unwrap(), Some(Startup::Ssl));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
        assert_eq!(decode_startup(&mut buf).unwrap(), Some(Startup::GssEnc));
        let mut buf = BytesMut::new();
        encode_cancel(42, -7, &mut buf);
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(Startup::Cancel { pid: 42, key: -7 })
        );
    }

    #[test]
    fn bad_startup_packets() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 4][..]);
        assert_eq!(decode_startup(&mut buf), Err(ProtocolError::BadStartupLength));
        let mut buf = BytesMut::from(&[0x7fu8, 0, 0, 0][..]);
        assert_eq!(decode_startup(&mut buf), Err(ProtocolError::BadStartupLength));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 0, 2, 0, 0][..]);
        assert_eq!(
            decode_startup(&mut buf),
            Err(ProtocolError::UnsupportedVersion(2, 0))
        );
        // A parameter name without its terminator.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 11, 0, 3, 0, 0, b'u', b's', b'e'][..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(ProtocolError::Malformed(_))
        ));
    }
}

//! The PostgreSQL v3 wire codec. It only turns bytes into frames and frames into bytes: no I/O,
//! so every rule here is unit-tested (and fuzzed) without sockets.
//!
//! Most messages are relayed untouched as raw [`Frame`]s. `frontend` and `backend` parse a frame
//! into a typed view ([`FrontendMessage`], [`BackendMessage`]) that borrows from it, so code
//! above this module matches on variants, never on type bytes; the per-family files read the
//! fields of one message family and encode the messages the proxy writes itself.

pub mod auth;
pub mod backend;
pub mod error;
pub mod extended;
pub mod frame;
pub mod frontend;
pub mod simple;
pub mod startup;
pub mod status;

pub use backend::{BackendMessage, TxStatus};
pub use frame::{decode, Frame};
pub use frontend::FrontendMessage;
pub use startup::{decode_startup, Startup};

/// Why a byte stream is not valid protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A length field below the minimum the protocol allows.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// A message larger than the configured maximum.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the peer announced.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A client message that would take the large messages in flight past
    /// `limits.max_message_memory`.
    #[error("out of memory: a message of {len} bytes would take dbproxy past limits.max_message_memory ({limit} bytes)")]
    OverBudget {
        /// The size of the message.
        len: usize,
        /// The budget.
        limit: usize,
    },
    /// A startup packet with a bad length.
    #[error("invalid length of startup packet")]
    BadStartupLength,
    /// A protocol version the proxy does not speak.
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedVersion(u16, u16),
    /// A message whose fields do not fit its length.
    #[error("invalid {0} message format")]
    Malformed(&'static str),
}

impl ProtocolError {
    /// The SQLSTATE PostgreSQL reports for this violation.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ProtocolError::UnsupportedVersion(..) => "0A000",
            ProtocolError::OverBudget { .. } => "53200",
            _ => "08P01",
        }
    }
}

/// Splits a NUL-terminated string off the front of `buf`, as UTF-8 (names, parameters).
pub(crate) fn cstr<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, ProtocolError> {
    let b = cbytes(buf, what)?;
    std::str::from_utf8(b).map_err(|_| ProtocolError::Malformed(what))
}

/// Splits a NUL-terminated string off the front of `buf`, as the bytes sent: SQL text, which is
/// in the client's `client_encoding` (any encoding PostgreSQL supports, not only UTF-8).
pub(crate) fn cbytes<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
    // `CStr` finds the NUL a word at a time.
    let end = std::ffi::CStr::from_bytes_until_nul(buf)
        .map_err(|_| ProtocolError::Malformed(what))?
        .to_bytes()
        .len();
    let s = &buf[..end];
    *buf = &buf[end + 1..];
    Ok(s)
}

/// Splits a big-endian i32 off the front of `buf`.
pub(crate) fn i32_(buf: &mut &[u8], what: &'static str) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed(what));
    }
    let v = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    *buf = &buf[4..];
    Ok(v)
}

/// Splits a big-endian i16 off the front of `buf`.
pub(crate) fn i16_(buf: &mut &[u8], what: &'static str) -> Result<i16, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed(what));
    }
    let v = i16::from_be_bytes([buf[0], buf[1]]);
    *buf = &buf[2..];
    Ok(v)
}

/// Appends a message with `tag` whose body `body` writes; the length is patched in afterwards.
pub fn write_msg(out: &mut bytes::BytesMut, tag: u8, body: impl FnOnce(&mut bytes::BytesMut)) {
    use bytes::BufMut;
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` and its NUL terminator.
pub fn put_cstr(out: &mut bytes::BytesMut, s: &str) {
    use bytes::BufMut;
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// What the fuzz target does, on a fixed seed, so every test run covers odd input too.
    #[test]
    fn random_bytes_never_panic_nor_overflow_the_limit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len: usize = rng.gen_range(0..64);
            let mut data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Bias towards plausible headers so the field parsers get exercised.
            if len > 5 && rng.gen_bool(0.5) {
                data[1..5].copy_from_slice(&((len - 1) as i32).to_be_bytes());
            }
            let _ = decode_startup(&mut BytesMut::from(&data[..]));
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(f)) = decode(&mut buf, 48) {
                assert!(f.raw().len() <= 48);
                let b = f.body();
                let _ = FrontendMessage::parse(&f);
                let _ = BackendMessage::parse(&f);
                let _ = simple::query_text(b);
                let _ = extended::parse(b);
                let _ = extended::bind_statement(b);
                let _ = extended::target(b, "Close");
                let _ = status::ready_status(b);
                let _ = status::backend_key(b);
                let _ = status::parameter_status(b);
                let _ = auth::request(b).map(|(_, d)| auth::sasl_mechanisms(d));
                let _ = auth::password(b);
                let _ = auth::sasl_initial(b);
                let _ = error::sqlstate(b);
            }
        }
    }
}

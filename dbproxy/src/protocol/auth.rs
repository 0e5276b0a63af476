//! Authentication messages: the server's requests (Ok, cleartext, MD5, SASL) and the client's
//! answers (PasswordMessage, SASLInitialResponse, SASLResponse all share the `p` tag).

use bytes::{BufMut, BytesMut};

use super::{cstr, i32_, put_cstr, write_msg, ProtocolError};

/// AuthenticationOk.
pub const OK: i32 = 0;
/// AuthenticationCleartextPassword.
pub const CLEARTEXT: i32 = 3;
/// AuthenticationMD5Password.
pub const MD5: i32 = 5;
/// AuthenticationSASL.
pub const SASL: i32 = 10;
/// AuthenticationSASLContinue.
pub const SASL_CONTINUE: i32 = 11;
/// AuthenticationSASLFinal.
pub const SASL_FINAL: i32 = 12;

/// Appends an Authentication request of `code` with `data` after the code.
pub fn encode_request(code: i32, data: &[u8], out: &mut BytesMut) {
    write_msg(out, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// Appends an AuthenticationSASL offering SCRAM-SHA-256.
pub fn encode_sasl_offer(out: &mut BytesMut) {
    encode_request(SASL, b"SCRAM-SHA-256\0\0", out);
}

/// Splits an Authentication body into its code and the rest.
pub fn request(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    let mut b = body;
    let code = i32_(&mut b, "authentication request")?;
    Ok((code, b))
}

/// The mechanisms an AuthenticationSASL body offers.
pub fn sasl_mechanisms(mut data: &[u8]) -> Result<Vec<&str>, ProtocolError> {
    let mut out = Vec::new();
    loop {
        let m = cstr(&mut data, "AuthenticationSASL")?;
        if m.is_empty() {
            return Ok(out);
        }
        out.push(m);
    }
}

/// The password of a PasswordMessage body.
pub fn password(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut b = body;
    let p = cstr(&mut b, "password")?;
    if !b.is_empty() {
        return Err(ProtocolError::Malformed("password"));
    }
    Ok(p)
}

/// The mechanism and data of a SASLInitialResponse body.
pub fn sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mut b = body;
    let mech = cstr(&mut b, "SASLInitialResponse")?;
    let len = i32_(&mut b, "SASLInitialResponse")?;
    if len < 0 || b.len() != len as usize {
        return Err(ProtocolError::Malformed("SASLInitialResponse"));
    }
    Ok((mech, b))
}

/// Appends a PasswordMessage.
pub fn encode_password(p: &str, out: &mut BytesMut) {
    write_msg(out, b'p', |b| put_cstr(b, p));
}

/// Appends a SASLInitialResponse.
pub fn encode_sasl_initial(mech: &str, data: &[u8], out: &mut BytesMut) {
    write_msg(out, b'p', |b| {
        put_cstr(b, mech);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// Appends a SASLResponse.
pub fn encode_sasl_response(data: &[u8], out: &mut BytesMut) {
    write_msg(out, b'p', |b| b.put_slice(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode;

    #[test]
    fn requests_and_answers() {
        let mut buf = BytesMut::new();
        encode_sasl_offer(&mut buf);
        let f = decode(&mut buf, 256).unwrap().unwrap();
        let (code, data) = request(f.body()).unwrap();
        assert_eq!(code, SASL);
        assert_eq!(sasl_mechanisms(data).unwrap(), vec!["SCRAM-SHA-256"]);
        encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc", &mut buf);
        let f = decode(&mut buf, 256).unwrap().unwrap();
        assert_eq!(
            sasl_initial(f.body()).unwrap(),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        assert!(sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
        encode_password("md5abc", &mut buf);
        let f = decode(&mut buf, 256).unwrap().unwrap();
        assert_eq!(password(f.body()).unwrap(), "md5abc");
        assert!(password(b"x").is_err());
        assert!(sasl_mechanisms(b"SCRAM").is_err());
    }
}

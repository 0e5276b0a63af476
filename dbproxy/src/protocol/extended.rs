//! The extended query protocol: the fields of Parse, Bind, Describe and Close the proxy needs to
//! move prepared statements between backends.

use bytes::{BufMut, BytesMut};

use super::{cstr, i16_, put_cstr, write_msg, ProtocolError};

/// The fields of a Parse message.
#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    /// The statement name (empty for the unnamed statement).
    pub name: &'a str,
    /// The SQL text.
    pub query: &'a str,
}

/// Reads a Parse body (name, query, parameter type count and oids).
pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut b = body;
    let name = cstr(&mut b, "Parse")?;
    let query = cstr(&mut b, "Parse")?;
    let n = i16_(&mut b, "Parse")?;
    if n < 0 || b.len() != n as usize * 4 {
        return Err(ProtocolError::Malformed("Parse"));
    }
    Ok(Parse { name, query })
}

/// The statement a Bind refers to (its portal name is skipped).
pub fn bind_statement(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut b = body;
    let _portal = cstr(&mut b, "Bind")?;
    cstr(&mut b, "Bind")
}

/// The portal and statement names of a Bind.
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut b = body;
    let portal = cstr(&mut b, "Bind")?;
    Ok((portal, cstr(&mut b, "Bind")?))
}

/// The portal an Execute runs.
pub fn execute_portal(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut b = body;
    let portal = cstr(&mut b, "Execute")?;
    if b.len() != 4 {
        return Err(ProtocolError::Malformed("Execute"));
    }
    Ok(portal)
}

/// The kind (`S` statement or `P` portal) and name of a Describe or Close.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), ProtocolError> {
    let (&kind, mut rest) = body.split_first().ok_or(ProtocolError::Malformed(what))?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(what));
    }
    let name = cstr(&mut rest, what)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(what));
    }
    Ok((kind, name))
}

/// Appends a Close of statement `name`.
pub fn encode_close_statement(name: &str, out: &mut BytesMut) {
    write_msg(out, b'C', |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

/// Appends a Sync.
pub fn encode_sync(out: &mut BytesMut) {
    write_msg(out, b'S', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_and_execute_names() {
        assert_eq!(bind_names(b"p\0s\0\0\0\0\0\0\0"), Ok(("p", "s")));
        assert!(bind_names(b"p").is_err());
        assert_eq!(execute_portal(b"p\0\0\0\0\0"), Ok("p"));
        assert_eq!(execute_portal(b"\0\0\0\0\x05"), Ok(""));
        assert!(execute_portal(b"p\0\0").is_err());
    }

    #[test]
    fn parse_fields() {
        let p = parse(b"s1\0select $1\0\0\x01\0\0\0\x17").unwrap();
        assert_eq!(
            p,
            Parse {
                name: "s1",
                query: "select $1"
            }
        );
        assert!(parse(b"s1\0select $1\0\0\x02\0\0\0\x17").is_err());
        assert!(parse(b"s1\0select $1\0\xff\xff").is_err());
        assert!(parse(b"s1\0select").is_err());
    }

    #[test]
    fn bind_describe_close() {
        assert_eq!(bind_statement(b"\0s1\0\0\0\0\0\0\0").unwrap(), "s1");
        assert!(bind_statement(b"p").is_err());
        assert_eq!(target(b"Ss1\0", "Describe").unwrap(), (b'S', "s1"));
        assert_eq!(target(b"P\0", "Close").unwrap(), (b'P', ""));
        assert!(target(b"Xs\0", "Close").is_err());
        assert!(target(b"", "Close").is_err());
        assert!(target(b"Ss\0junk", "Close").is_err());
    }
}

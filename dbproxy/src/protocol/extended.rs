//! The extended query protocol: the fields of Parse, Bind, Describe and Close the proxy needs to
//! move prepared statements between backends.

use bytes::{BufMut, BytesMut};

use super::{cbytes, cstr, i16_, i32_, put_cstr, write_msg, ProtocolError};

/// The fields of a Parse message.
#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    /// The statement name (empty for the unnamed statement).
    pub name: &'a str,
    /// The SQL text, as sent (in the client's encoding).
    pub query: &'a [u8],
}

/// Reads a Parse body (name, query, parameter type count and oids).
pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut b = body;
    let name = cstr(&mut b, "Parse")?;
    let query = cbytes(&mut b, "Parse")?;
    check_oids(b, "Parse")?;
    Ok(Parse { name, query })
}

/// The parameter type OIDs a Parse declares (0 where it leaves one to the server).
pub fn parse_param_types(body: &[u8]) -> Result<Vec<u32>, ProtocolError> {
    let mut b = body;
    cstr(&mut b, "Parse")?;
    cbytes(&mut b, "Parse")?;
    oids(b, "Parse")
}

/// The parameter type OIDs of a ParameterDescription.
pub fn parameter_description(body: &[u8]) -> Result<Vec<u32>, ProtocolError> {
    oids(body, "ParameterDescription")
}

/// Checks that `b` is a count, then as many OIDs, ending the message; returns the OIDs' bytes.
fn check_oids<'a>(mut b: &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
    let n = i16_(&mut b, what)?;
    if n < 0 || b.len() != n as usize * 4 {
        return Err(ProtocolError::Malformed(what));
    }
    Ok(b)
}

/// A count, then as many OIDs, ending the message.
fn oids(b: &[u8], what: &'static str) -> Result<Vec<u32>, ProtocolError> {
    Ok(check_oids(b, what)?
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A Bind parameter: its format code (0 text, 1 binary) and its value (`None` for NULL).
pub type Param<'a> = (i16, Option<&'a [u8]>);

/// The parameter values of a Bind.
pub fn bind_params(body: &[u8]) -> Result<Vec<Param<'_>>, ProtocolError> {
    const WHAT: &str = "Bind";
    let mut b = body;
    cstr(&mut b, WHAT)?;
    cstr(&mut b, WHAT)?;
    let nf = i16_(&mut b, WHAT)?;
    if nf < 0 || b.len() < nf as usize * 2 {
        return Err(ProtocolError::Malformed(WHAT));
    }
    let (formats, rest) = b.split_at(nf as usize * 2);
    b = rest;
    let format = |i: usize| match formats.len() {
        0 => 0,
        2 => i16::from_be_bytes([formats[0], formats[1]]),
        _ => i16::from_be_bytes([formats[2 * i], formats[2 * i + 1]]),
    };
    let np = i16_(&mut b, WHAT)?;
    if np < 0 || (nf > 1 && nf != np) {
        return Err(ProtocolError::Malformed(WHAT));
    }
    let mut out = Vec::with_capacity(np as usize);
    for i in 0..np as usize {
        let len = i32_(&mut b, WHAT)?;
        let value = match len {
            -1 => None,
            n if n < 0 || b.len() < n as usize => return Err(ProtocolError::Malformed(WHAT)),
            n => {
                let (v, rest) = b.split_at(n as usize);
                b = rest;
                Some(v)
            }
        };
        out.push((format(i), value));
    }
    Ok(out)
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

/// Appends a Parse of `sql` as statement `name`, parameter types left to the server.
pub fn encode_parse(name: &str, sql: &str, out: &mut BytesMut) {
    write_msg(out, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(0);
    });
}

/// Appends a Bind of statement `stmt` to portal `portal` with text `params`, text results.
pub fn encode_bind_text(portal: &str, stmt: &str, params: &[&str], out: &mut BytesMut) {
    write_msg(out, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, stmt);
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p.as_bytes());
        }
        b.put_i16(0);
    });
}

/// Appends an Execute of `portal` with no row limit.
pub fn encode_execute(portal: &str, out: &mut BytesMut) {
    write_msg(out, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    });
}

/// Appends a Sync.
pub fn encode_sync(out: &mut BytesMut) {
    write_msg(out, b'S', |_| {});
}

/// Appends a Terminate.
pub fn encode_terminate(out: &mut BytesMut) {
    write_msg(out, b'X', |_| {});
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
                query: b"select $1"
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

    #[test]
    fn bind_parameters_with_their_formats() {
        let bind = |formats: &[i16], values: &[Option<&[u8]>]| {
            let mut b = b"p\0s\0".to_vec();
            b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
            for f in formats {
                b.extend_from_slice(&f.to_be_bytes());
            }
            b.extend_from_slice(&(values.len() as i16).to_be_bytes());
            for v in values {
                match v {
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
            }
            b.extend_from_slice(&0i16.to_be_bytes());
            b
        };
        let two: [Option<&[u8]>; 2] = [Some(b"a"), None];
        assert_eq!(
            bind_params(&bind(&[], &two)).unwrap(),
            [(0, Some(&b"a"[..])), (0, None)]
        );
        assert_eq!(
            bind_params(&bind(&[1], &two)).unwrap(),
            [(1, Some(&b"a"[..])), (1, None)]
        );
        assert_eq!(
            bind_params(&bind(&[0, 1], &two)).unwrap(),
            [(0, Some(&b"a"[..])), (1, None)]
        );
        assert!(
            bind_params(&bind(&[0, 1, 0], &two)).is_err(),
            "three formats, two values"
        );
        let mut short = bind(&[], &[Some(b"abc")]);
        short.truncate(short.len() - 4);
        assert!(bind_params(&short).is_err(), "a value longer than the message");
        let mut negative = bind(&[], &[]);
        negative.splice(4..6, (-3i16).to_be_bytes());
        assert!(bind_params(&negative).is_err());
        assert!(bind_params(b"p\0").is_err());
    }

    #[test]
    fn parameter_types_of_parse_and_parameter_description() {
        assert_eq!(
            parse_param_types(b"s\0select $1\0\0\x01\0\0\0\x19").unwrap(),
            [25]
        );
        assert_eq!(parse_param_types(b"\0select 1\0\0\0").unwrap(), Vec::<u32>::new());
        assert!(parse_param_types(b"\0select 1\0\0\x01\0").is_err());
        assert_eq!(
            parameter_description(b"\0\x02\0\0\0\x19\0\0\0\x10").unwrap(),
            [25, 16]
        );
        assert!(parameter_description(b"\0\x02\0\0\0\x19").is_err());
    }
}

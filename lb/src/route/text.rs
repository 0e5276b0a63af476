//! The text side of routing: nginx variables in `return` and `rewrite` (parsed once, expanded per
//! request), URI normalization as nginx matches locations, and re-escaping what goes upstream.

use std::borrow::Cow;

use super::RouteRequest;

/// A variable or literal of a `return` text or `rewrite` replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Lit(String),
    Scheme,
    Host,
    RequestUri,
    Uri,
    Args,
    IsArgs,
    ServerPort,
    Capture(usize),
}

/// Parses nginx variables out of `text`: `$name`, `${name}`, `$1`..`$9`.
pub(super) fn template(text: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let (name, after) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or("unclosed `${`")?;
            (&r[..end], &r[end + 1..])
        } else if rest.starts_with(|c: char| c.is_ascii_digit()) {
            (&rest[..1], &rest[1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        let piece = match name {
            "scheme" => Piece::Scheme,
            "host" | "server_name" => Piece::Host,
            "request_uri" => Piece::RequestUri,
            "uri" | "document_uri" => Piece::Uri,
            "args" | "query_string" => Piece::Args,
            "is_args" => Piece::IsArgs,
            "server_port" => Piece::ServerPort,
            n if n.len() == 1 && n.as_bytes()[0].is_ascii_digit() => {
                Piece::Capture(usize::from(n.as_bytes()[0] - b'0'))
            }
            "" => return Err("a `$` without a variable name".into()),
            n => return Err(format!("variable `${n}` is not supported")),
        };
        if !lit.is_empty() {
            out.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        out.push(piece);
        rest = after;
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    Ok(out)
}

/// Values the variables expand to for one request.
pub(super) struct Vars<'a> {
    pub req: &'a RouteRequest<'a>,
    pub host: &'a str,
    pub uri: &'a str,
    pub args: Option<&'a str>,
    pub caps: &'a [String],
}

impl Vars<'_> {
    pub fn expand(&self, pieces: &[Piece], escape_uri: bool, out: &mut String) {
        for p in pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Scheme => out.push_str(if self.req.tls { "https" } else { "http" }),
                Piece::Host => out.push_str(self.host),
                Piece::RequestUri => {
                    out.push_str(self.req.path);
                    if let Some(q) = self.req.query {
                        out.push('?');
                        out.push_str(q);
                    }
                }
                Piece::Uri if escape_uri => escape_into(self.uri, out),
                Piece::Uri => out.push_str(self.uri),
                Piece::Args => out.push_str(self.args.unwrap_or("")),
                Piece::IsArgs => {
                    if self.args.is_some() {
                        out.push('?')
                    }
                }
                Piece::ServerPort => out.push_str(&self.req.port.to_string()),
                Piece::Capture(i) => {
                    if let Some(c) = self.caps.get(*i) {
                        out.push_str(c);
                    }
                }
            }
        }
    }
}

/// Percent-encodes what may not stand in a request path (as nginx's `ngx_escape_uri`).
pub(super) fn escape_into(uri: &str, out: &mut String) {
    for b in uri.bytes() {
        if b <= 0x20 || b >= 0x7f || matches!(b, b'#' | b'%' | b'?') {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        } else {
            out.push(char::from(b));
        }
    }
}

/// The URI locations match against: `%XX` decoded, `//` merged, `.` and `..` resolved, as nginx
/// does. `None` for a path nginx refuses with 400 (bad escape, `%00`, `..` above the root).
pub fn normalize(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.starts_with('/') {
        return None;
    }
    if !raw.contains('%') && !raw.contains("//") && !raw.contains("/.") {
        return Some(Cow::Borrowed(raw));
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut it = raw.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hi = (it.next()? as char).to_digit(16)?;
            let lo = (it.next()? as char).to_digit(16)?;
            let v = (hi * 16 + lo) as u8;
            if v == 0 {
                return None;
            }
            bytes.push(v);
        } else {
            bytes.push(b);
        }
    }
    let decoded = String::from_utf8_lossy(&bytes);
    let mut segs: Vec<&str> = Vec::new();
    let mut trailing = false;
    for s in decoded.split('/').skip(1) {
        trailing = false;
        match s {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segs.pop()?;
                trailing = true;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segs.is_empty() {
        out.push('/');
    }
    Some(Cow::Owned(out))
}

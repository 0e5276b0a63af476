//! pgpool-II's PCP wire format (as its 4.3 clients speak it), without I/O: splitting frames,
//! parsing requests once into typed values, encoding answers, and the md5 salt check.
//!
//! A frame is one type byte, a 4-byte big-endian length that counts itself, then the body.
//! Request bodies are NUL-terminated strings (a node id as decimal text; the login's user name
//! and hash). Answers carry NUL-terminated strings too: a word such as `CommandComplete` or
//! `ArraySize`, then the values; errors use PostgreSQL's ErrorResponse fields.

use bytes::{BufMut, BytesMut};
use md5::{Digest as _, Md5};

/// The longest frame pgpool-II 4.3 accepts (`MAX_PCP_PACKET_LENGTH`); anything longer is refused
/// before it is buffered.
pub const MAX_FRAME: usize = 260;

/// pgpool's `RAND_MAX` scale for node weights on the wire (`pcp_node_info` divides by it).
pub const RAND_MAX: f64 = 2_147_483_647.0;

/// What is wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcpError {
    /// The length field is below 4 or above [`MAX_FRAME`].
    #[error("invalid PCP packet length {0}")]
    Length(i64),
    /// The body does not hold what the type needs.
    #[error("malformed {kind} request: {why}")]
    Malformed {
        /// The request type.
        kind: char,
        /// What is missing or wrong.
        why: &'static str,
    },
}

/// A client request, parsed from one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `M`: send a salt for the md5 login.
    Salt,
    /// `R`: the login, with the user name and the salted md5 hash.
    Login {
        /// The PCP user.
        user: &'a str,
        /// `md5(md5(md5(password) + user) + salt)` in hex.
        hash: &'a str,
    },
    /// `L`: how many nodes there are (`pcp_node_count`).
    NodeCount,
    /// `I`: one node's state, or every node's for -1 (`pcp_node_info`).
    NodeInfo(i64),
    /// `H`: a node's health-check statistics (`pcp_health_check_stats`).
    HealthCheckStats(i64),
    /// `N`: the process ids serving clients (`pcp_proc_count`).
    ProcCount,
    /// `C`: attach a node (`pcp_attach_node`).
    Attach(i64),
    /// `D` / `d`: detach a node (`pcp_detach_node`, `-g` for gracefully).
    Detach(i64),
    /// `J` / `j`: make a node the primary (`pcp_promote_node`; `switchover` is `-s`).
    Promote {
        /// The node.
        id: i64,
        /// Whether the current primary is to be detached and this node promoted for real.
        switchover: bool,
    },
    /// `X`: the client is leaving.
    Disconnect,
    /// Any other type (shutdown, reload, recovery, process info, watchdog, ...).
    Unsupported(u8),
}

/// One request frame, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The type byte.
    pub tag: u8,
    /// What follows the length.
    pub body: &'a [u8],
    /// Bytes the whole frame takes in the buffer.
    pub len: usize,
}

/// Splits one frame off `buf`: `Ok(None)` while it is incomplete. A length outside
/// 4..=[`MAX_FRAME`] is an error before anything is buffered for it.
pub fn frame(buf: &[u8]) -> Result<Option<Frame<'_>>, PcpError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if !(4..=MAX_FRAME as i64).contains(&len) {
        return Err(PcpError::Length(len));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        tag: buf[0],
        body: &buf[5..total],
        len: total,
    }))
}

/// The NUL-terminated strings of a body (a missing final NUL ends the last one too).
fn strings(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = body.strip_suffix(&[0]).unwrap_or(body);
    body.split(|&b| b == 0)
}

impl<'a> Request<'a> {
    /// Parses the body of a frame of type `tag`.
    pub fn parse(tag: u8, body: &'a [u8]) -> Result<Request<'a>, PcpError> {
        let bad = |why| PcpError::Malformed {
            kind: tag as char,
            why,
        };
        let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| bad("not UTF-8"));
        let node_id = |b: &'a [u8]| -> Result<i64, PcpError> {
            let first = strings(b).next().ok_or_else(|| bad("no node id"))?;
            // `pcp_promote_node` sends "N " (a space before the NUL).
            text(first)?
                .trim()
                .parse::<i64>()
                .map_err(|_| bad("the node id is not a number"))
        };
        Ok(match tag {
            b'M' => Request::Salt,
            b'R' => {
                let mut s = strings(body);
                let user = text(s.next().ok_or_else(|| bad("no user name"))?)?;
                let hash = text(s.next().ok_or_else(|| bad("no password hash"))?)?;
                Request::Login { user, hash }
            }
            b'L' => Request::NodeCount,
            b'I' => Request::NodeInfo(node_id(body)?),
            b'H' => Request::HealthCheckStats(node_id(body)?),
            b'N' => Request::ProcCount,
            b'C' => Request::Attach(node_id(body)?),
            b'D' | b'd' => Request::Detach(node_id(body)?),
            b'J' | b'j' => {
                let nul = body
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| bad("no node id"))?;
                let option = body
                    .get(nul + 1)
                    .copied()
                    .ok_or_else(|| bad("no promote option"))?;
                Request::Promote {
                    id: node_id(&body[..nul])?,
                    switchover: option == b's',
                }
            }
            b'X' => Request::Disconnect,
            other => Request::Unsupported(other),
        })
    }
}

/// Appends a frame of type `tag` whose body is `parts`, each NUL-terminated.
fn put_strings(out: &mut BytesMut, tag: u8, parts: &[&str]) {
    let len: usize = 4 + parts.iter().map(|p| p.len() + 1).sum::<usize>();
    out.put_u8(tag);
    out.put_u32(len as u32);
    for p in parts {
        out.put_slice(p.as_bytes());
        out.put_u8(0);
    }
}

/// `m`: the 4-byte salt for the md5 login.
pub fn encode_salt(salt: [u8; 4], out: &mut BytesMut) {
    out.put_u8(b'm');
    out.put_u32(8);
    out.put_slice(&salt);
}

/// `r AuthenticationOK`.
pub fn encode_auth_ok(out: &mut BytesMut) {
    put_strings(out, b'r', &["AuthenticationOK"]);
}

/// An ErrorResponse as pgpool sends it: `severity` (`ERROR` keeps the connection, `FATAL` is
/// followed by closing it), a message and a detail, which `pcp_*` print as
/// `ERROR:  message` / `DETAIL:  detail`.
pub fn encode_error(severity: &str, message: &str, detail: &str, out: &mut BytesMut) {
    let fields = [
        format!("S{severity}"),
        "CXX000".to_string(),
        format!("M{message}"),
        format!("D{detail}"),
    ];
    let len = 4 + fields.iter().map(|f| f.len() + 1).sum::<usize>() + 1;
    out.put_u8(b'E');
    out.put_u32(len as u32);
    for f in &fields {
        out.put_slice(f.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
}

/// `<tag> CommandComplete`: what attach (`c`), detach and promote (`d`) answer.
pub fn encode_complete(tag: u8, out: &mut BytesMut) {
    put_strings(out, tag, &["CommandComplete"]);
}

/// `l`: the node count.
pub fn encode_node_count(n: usize, out: &mut BytesMut) {
    put_strings(out, b'l', &["CommandComplete", &n.to_string()]);
}

/// `n`: the process ids.
pub fn encode_proc_count(pids: &[u32], out: &mut BytesMut) {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut parts = vec!["CommandComplete".to_string(), pids.len().to_string()];
    parts.extend(pids);
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    put_strings(out, b'n', &refs);
}

/// One node as `pcp_node_info` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// pgpool's BACKEND_STATUS: 2 up, 3 down.
    pub status: u8,
    /// `up` or `down`: whether the server answers.
    pub pg_status: String,
    /// Its share of the load-balancing weight (0..=1).
    pub weight: f64,
    /// Whether it is the primary (pgpool's ROLE_PRIMARY 2, else ROLE_STANDBY 3).
    pub primary: bool,
    /// What the server says it is.
    pub pg_role: String,
    /// Replication delay in bytes.
    pub delay: u64,
    /// pg_stat_replication.state.
    pub replication_state: String,
    /// pg_stat_replication.sync_state.
    pub sync_state: String,
    /// When its status last changed, in seconds since the epoch.
    pub status_changed: u64,
}

/// `i ArraySize`, one `i NodeInfo` per node, `i CommandComplete`.
pub fn encode_node_info(nodes: &[NodeInfo], out: &mut BytesMut) {
    put_strings(out, b'i', &["ArraySize", &nodes.len().to_string()]);
    for n in nodes {
        put_strings(
            out,
            b'i',
            &[
                "NodeInfo",
                &n.host,
                &n.port.to_string(),
                &n.status.to_string(),
                "0",
                &n.pg_status,
                &format!("{:.6}", n.weight * RAND_MAX),
                if n.primary { "2" } else { "3" },
                &n.pg_role,
                &n.delay.to_string(),
                &n.replication_state,
                &n.sync_state,
                &n.status_changed.to_string(),
            ],
        );
    }
    put_strings(out, b'i', &["CommandComplete"]);
}

/// `h CommandComplete` and the 20 values of SHOW POOL_HEALTH_CHECK_STATS's row.
pub fn encode_health_check_stats(row: &[String], out: &mut BytesMut) {
    let mut parts: Vec<&str> = vec!["CommandComplete"];
    parts.extend(row.iter().map(String::as_str));
    put_strings(out, b'h', &parts);
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `hash` is what a client knowing the password whose md5 (hex, as pcp.conf stores it)
/// is `stored` sends for `user` and `salt`.
pub fn login_matches(stored: &str, user: &str, salt: [u8; 4], hash: &str) -> bool {
    let inner = md5_hex(&[stored.as_bytes(), user.as_bytes()]);
    let want = md5_hex(&[inner.as_bytes(), &salt]);
    // Constant time over the length of a correct answer.
    want.len() == hash.len()
        && want
            .bytes()
            .zip(hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// What a pcp client sends for `password` (tests, and the pcp.conf line `user:md5(password)`).
pub fn password_md5(password: &str) -> String {
    md5_hex(&[password.as_bytes()])
}

/// The login hash a client sends (for tests).
pub fn client_hash(password: &str, user: &str, salt: [u8; 4]) -> String {
    let inner = md5_hex(&[password_md5(password).as_bytes(), user.as_bytes()]);
    md5_hex(&[inner.as_bytes(), &salt])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_and_bad_lengths_are_refused() {
        let f = raw(b'I', b"1\0");
        assert_eq!(frame(&f[..4]), Ok(None));
        assert_eq!(frame(&f[..6]), Ok(None));
        let f1 = frame(&f).unwrap().unwrap();
        assert_eq!((f1.tag, f1.body, f1.len), (b'I', &b"1\0"[..], 7));
        let mut two = f.clone();
        two.extend(raw(b'X', b""));
        assert_eq!(frame(&two).unwrap().unwrap().len, 7);
        assert_eq!(frame(b"I\0\0\0\x03"), Err(PcpError::Length(3)));
        assert_eq!(frame(b"I\xff\xff\xff\xff"), Err(PcpError::Length(-1)));
        assert_eq!(frame(b"I\0\0\x01\x05"), Err(PcpError::Length(261)));
    }

    #[test]
    fn requests_as_pgpool_clients_send_them() {
        let p = |tag, body: &'static [u8]| Request::parse(tag, body);
        assert_eq!(p(b'M', b""), Ok(Request::Salt));
        assert_eq!(
            p(b'R', b"pcpadmin\0abc\0"),
            Ok(Request::Login {
                user: "pcpadmin",
                hash: "abc"
            })
        );
        assert_eq!(p(b'L', b""), Ok(Request::NodeCount));
        assert_eq!(p(b'I', b"-1\0"), Ok(Request::NodeInfo(-1)));
        assert_eq!(p(b'H', b"3\0"), Ok(Request::HealthCheckStats(3)));
        assert_eq!(p(b'C', b"1\0"), Ok(Request::Attach(1)));
        assert_eq!(p(b'd', b"1\0"), Ok(Request::Detach(1)));
        assert_eq!(
            p(b'J', b"2 \0s"),
            Ok(Request::Promote {
                id: 2,
                switchover: true
            })
        );
        assert_eq!(
            p(b'j', b"2 \0n"),
            Ok(Request::Promote {
                id: 2,
                switchover: false
            })
        );
        assert_eq!(p(b'T', b"s"), Ok(Request::Unsupported(b'T')));
        for (tag, body, want) in [
            (b'I', &b"x\0"[..], "not a number"),
            (b'I', b"", "not a number"),
            (b'R', b"user\0", "no password hash"),
            (b'J', b"1 ", "no node id"),
            (b'J', b"1 \0", "no promote option"),
            (b'C', b"\xff\0", "not UTF-8"),
        ] {
            let e = Request::parse(tag, body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: {e}");
        }
    }

    #[test]
    fn answers_have_pgpool_layout() {
        let mut out = BytesMut::new();
        encode_node_count(3, &mut out);
        assert_eq!(&out[..], &raw(b'l', b"CommandComplete\x003\0")[..]);
        out.clear();
        encode_proc_count(&[12, 34], &mut out);
        assert_eq!(&out[..], &raw(b'n', b"CommandComplete\x002\x0012\x0034\0")[..]);
        out.clear();
        encode_error("ERROR", "m", "d", &mut out);
        assert_eq!(&out[..], &raw(b'E', b"SERROR\0CXX000\0Mm\0Dd\0\0")[..]);
        out.clear();
        encode_salt(*b"abcd", &mut out);
        assert_eq!(&out[..], &raw(b'm', b"abcd")[..]);
        out.clear();
        let n = NodeInfo {
            host: "h".into(),
            port: 5432,
            status: 2,
            pg_status: "up".into(),
            weight: 0.5,
            primary: true,
            pg_role: "primary".into(),
            delay: 0,
            replication_state: String::new(),
            sync_state: String::new(),
            status_changed: 7,
        };
        encode_node_info(&[n], &mut out);
        let mut want = raw(b'i', b"ArraySize\x001\0");
        want.extend(raw(
            b'i',
            b"NodeInfo\0h\x005432\x002\x000\0up\x001073741823.500000\x002\0primary\x000\0\0\x007\0",
        ));
        want.extend(raw(b'i', b"CommandComplete\0"));
        assert_eq!(&out[..], &want[..]);
        // Every frame splits back off what was encoded.
        let mut rest = &out[..];
        let mut n = 0;
        while let Some(f) = frame(rest).unwrap() {
            rest = &rest[f.len..];
            n += 1;
        }
        assert_eq!((n, rest.len()), (3, 0));
    }

    #[test]
    fn md5_login() {
        let salt = *b"\x01\x02\x03\x04";
        let stored = password_md5("secret");
        assert_eq!(stored, "5ebe2294ecd0e0f08eab7690d2a6ee69");
        let hash = client_hash("secret", "pcpadmin", salt);
        assert!(login_matches(&stored, "pcpadmin", salt, &hash));
        assert!(!login_matches(&stored, "other", salt, &hash));
        assert!(!login_matches(&stored, "pcpadmin", *b"xxxx", &hash));
        assert!(!login_matches(&stored, "pcpadmin", salt, &hash[..31]));
        assert!(!login_matches(&password_md5("wrong"), "pcpadmin", salt, &hash));
    }
}

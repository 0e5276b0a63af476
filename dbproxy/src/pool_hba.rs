//! pgpool-II's `pool_hba.conf` (read when `enable_pool_hba = on`) translated into dbproxy's
//! `[[hba]]` rules, first match wins as in pgpool. Pure: text in, rules and notes out.
//!
//! Syntax: `TYPE DATABASE USER [ADDRESS [MASK]] METHOD [OPTIONS]`, `#` comments; DATABASE and USER
//! are `all` or comma-separated names (each combination becomes one rule). `host` and `hostnossl`
//! lines are taken; `local` lines are skipped (dbproxy listens on TCP only); anything dbproxy
//! cannot do the same way (`hostssl`, `sameuser`, `+group`, `@file`, host names, `samehost`,
//! pam/ldap/cert) is an error naming the line, so no rule is silently loosened. Nothing matching
//! means refused, as in pgpool: a final `reject` rule says so.

use std::net::IpAddr;

use toml::{Table, Value};

/// What is wrong with a pool_hba.conf line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pool_hba.conf line {line}: {message}")]
pub struct PoolHbaError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The rules (as `[[hba]]` tables) and notes about how lines were taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    /// dbproxy `hba` rules, in order, ending with a `reject` for anything else.
    pub rules: Vec<Value>,
    /// Lines taken with a difference an operator should know about.
    pub notes: Vec<String>,
}

/// Translates pool_hba.conf text.
pub fn translate(text: &str) -> Result<Translation, PoolHbaError> {
    let mut out = Translation::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| PoolHbaError { line, message };
        let body = raw.split('#').next().unwrap_or("").trim();
        if body.is_empty() {
            continue;
        }
        let words: Vec<&str> = body.split_ascii_whitespace().collect();
        let kind = words[0];
        match kind {
            "local" => {
                out.notes.push(format!(
                    "pool_hba.conf line {line}: a `local` line is skipped (dbproxy listens on TCP only)"
                ));
                continue;
            }
            "host" => {}
            "hostnossl" => out.notes.push(format!(
                "pool_hba.conf line {line}: hostnossl is taken as host (it matches TLS clients too)"
            )),
            "hostssl" => {
                return Err(err(
                    "hostssl is not supported: use host rules and tls.require".into()
                ))
            }
            other => return Err(err(format!("unknown connection type `{other}`"))),
        }
        if words.len() < 5 {
            return Err(err("expected host DATABASE USER ADDRESS METHOD".into()));
        }
        let (databases, users) = (names(words[1], "database", line)?, names(words[2], "user", line)?);
        // ADDRESS is CIDR, or an address followed by a netmask.
        let (network, method_at) = if words[3].contains('/') {
            (
                cidr(words[3]).ok_or_else(|| err(format!("`{}` is not an address/prefix", words[3])))?,
                4,
            )
        } else {
            let mask = words.get(4).copied().unwrap_or("");
            let prefix = netmask_prefix(words[3], mask).ok_or_else(|| {
                err(format!(
                    "`{} {mask}` is not an address and netmask (host names, samehost and samenet are not supported)",
                    words[3]
                ))
            })?;
            (prefix, 5)
        };
        let method = match words.get(method_at).copied() {
            Some("trust") => "trust",
            Some("reject") => "reject",
            Some("md5") => "md5",
            Some("scram-sha-256") => "scram-sha-256",
            Some("password") => {
                out.notes.push(format!(
                    "pool_hba.conf line {line}: `password` asks for SCRAM-SHA-256 instead (dbproxy never \
                     takes clear-text passwords)"
                ));
                "scram-sha-256"
            }
            Some(m) => {
                return Err(err(format!(
                    "method `{m}` is not supported (trust, reject, md5, scram-sha-256, password)"
                )))
            }
            None => return Err(err("no method".into())),
        };
        for db in &databases {
            for user in &users {
                let mut r = Table::new();
                r.insert("database".into(), Value::String(db.clone()));
                r.insert("user".into(), Value::String(user.clone()));
                r.insert("network".into(), Value::String(network.clone()));
                r.insert("method".into(), Value::String(method.into()));
                out.rules.push(Value::Table(r));
            }
        }
    }
    let mut reject = Table::new();
    reject.insert("method".into(), Value::String("reject".into()));
    out.rules.push(Value::Table(reject));
    Ok(out)
}

/// `all` or a comma-separated list of plain names.
fn names(field: &str, what: &str, line: usize) -> Result<Vec<String>, PoolHbaError> {
    field
        .split(',')
        .map(|n| {
            let n = n.trim_matches('"');
            if n.is_empty()
                || n.starts_with('+')
                || n.starts_with('@')
                || matches!(n, "sameuser" | "samerole" | "samegroup")
            {
                Err(PoolHbaError {
                    line,
                    message: format!("{what} `{n}` is not supported (use `all` or names)"),
                })
            } else {
                Ok(n.to_string())
            }
        })
        .collect()
}

/// `addr/prefix`, checked.
fn cidr(s: &str) -> Option<String> {
    let (addr, prefix) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let p: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (p <= max).then(|| format!("{ip}/{p}"))
}

/// `addr` with netmask `mask` as `addr/prefix` (the mask must be contiguous ones).
fn netmask_prefix(addr: &str, mask: &str) -> Option<String> {
    let ip: IpAddr = addr.parse().ok()?;
    let m: IpAddr = mask.parse().ok()?;
    let bits: u128 = match (ip, m) {
        (IpAddr::V4(_), IpAddr::V4(m)) => u128::from(u32::from(m)) << 96,
        (IpAddr::V6(_), IpAddr::V6(m)) => u128::from(m),
        _ => return None,
    };
    let ones = bits.leading_ones();
    if bits.checked_shl(ones).unwrap_or(0) != 0 {
        return None;
    }
    let prefix = if ip.is_ipv4() { ones.min(32) } else { ones };
    Some(format!("{ip}/{prefix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(v: &Value) -> (String, String, String, String) {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("all").to_string();
        (s("database"), s("user"), s("network"), s("method"))
    }

    #[test]
    fn pgpool_lines_become_rules_in_order() {
        let t = translate(
            "# TYPE DATABASE USER ADDRESS METHOD\n\
             local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host app,reports alice,bob 10.0.0.0 255.0.0.0 md5 # comment\n\
             hostnossl all all ::1/128 scram-sha-256\n\
             host all all 0.0.0.0/0 password\n",
        )
        .unwrap();
        let r: Vec<_> = t.rules.iter().map(rule).collect();
        let own = |d: &str, u: &str, n: &str, m: &str| (d.into(), u.into(), n.into(), m.into());
        assert_eq!(r[0], own("all", "postgres", "127.0.0.1/32", "trust"));
        assert_eq!(r[1], own("app", "alice", "10.0.0.0/8", "md5"));
        assert_eq!(r[4], own("reports", "bob", "10.0.0.0/8", "md5"));
        assert_eq!(r[5], own("all", "all", "::1/128", "scram-sha-256"));
        assert_eq!(r[6], own("all", "all", "0.0.0.0/0", "scram-sha-256"));
        assert_eq!(r[7], own("all", "all", "all", "reject"), "nothing else gets in");
        assert_eq!(r.len(), 8);
        assert_eq!(t.notes.len(), 3, "{:?}", t.notes);
        // Only local lines: nobody over TCP.
        let t = translate("local all all trust\n").unwrap();
        assert_eq!(
            t.rules.iter().map(rule).collect::<Vec<_>>(),
            [own("all", "all", "all", "reject")]
        );
    }

    #[test]
    fn what_cannot_be_honoured_names_the_line() {
        for (text, want) in [
            ("hostssl all all 0.0.0.0/0 md5\n", "hostssl"),
            ("\nhost all +admins 0.0.0.0/0 md5\n", "line 2"),
            ("host sameuser all 0.0.0.0/0 md5\n", "sameuser"),
            ("host all @users 0.0.0.0/0 md5\n", "@users"),
            ("host all all db.example.com md5\n", "not an address"),
            ("host all all 10.0.0.0 255.0.255.0 md5\n", "netmask"),
            ("host all all 10.0.0.0/33 md5\n", "10.0.0.0/33"),
            ("host all all 0.0.0.0/0 ldap ldapserver=x\n", "ldap"),
            ("host all all 0.0.0.0/0\n", "expected"),
            ("hots all all 0.0.0.0/0 md5\n", "hots"),
        ] {
            let e = translate(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}

//! Who may log in, from a pgpool-II setup: the users of `pool_passwd`, the `[[hba]]` rules of
//! `pool_hba.conf` (with `enable_pool_hba = on`), and pass-through authentication to the primary
//! (with it off, as pgpool-II then lets the backends authenticate the users it has no entry for).

use std::path::Path;

use toml::{Table, Value};

use crate::pgpool_conf::{PgpoolConfError, PgpoolImport};

/// Adds `users`, `hba` and `auth` to `out`: `pool_passwd` is pgpool.conf's value (`None` when
/// unset), relative to `base_dir`; `pool_hba` is the pool_hba.conf beside pgpool.conf.
pub(crate) fn import(
    pool_passwd: Option<&str>,
    base_dir: &Path,
    hba_on: bool,
    pool_hba: &Path,
    out: &mut PgpoolImport,
) -> Result<(), PgpoolConfError> {
    // Users from pool_passwd, plus hba rules: md5-only secrets need md5 client authentication.
    let passwd = pool_passwd.unwrap_or("pool_passwd");
    if !passwd.is_empty() {
        let path = base_dir.join(passwd);
        if path.exists() {
            let (users, md5_only) = crate::pool_passwd::read(&path, &mut out.notes)?;
            if !users.is_empty() {
                out.table.insert("users".into(), Value::Array(users));
            }
            if !md5_only.is_empty() {
                let mut rules: Vec<Value> = md5_only
                    .into_iter()
                    .map(|u| {
                        let mut r = Table::new();
                        r.insert("user".into(), Value::String(u));
                        r.insert("method".into(), Value::String("md5".into()));
                        Value::Table(r)
                    })
                    .collect();
                let mut rest = Table::new();
                rest.insert("method".into(), Value::String("scram-sha-256".into()));
                rules.push(Value::Table(rest));
                out.table.insert("hba".into(), Value::Array(rules));
            }
        } else if pool_passwd.is_some() {
            return Err(PgpoolConfError::PoolPasswd {
                path,
                message: "file not found".into(),
            });
        }
    }
    if hba_on {
        if pool_hba.exists() {
            // pool_hba.conf decides, first match wins; nothing matching is refused, as in pgpool.
            let text = std::fs::read_to_string(pool_hba).map_err(|e| PgpoolConfError::PoolHba {
                path: pool_hba.to_path_buf(),
                message: e.to_string(),
            })?;
            let t = crate::pool_hba::translate(&text).map_err(|e| PgpoolConfError::PoolHba {
                path: pool_hba.to_path_buf(),
                message: e.to_string(),
            })?;
            out.notes.extend(t.notes);
            out.table.insert("hba".into(), Value::Array(t.rules));
        } else {
            out.notes.push(format!(
                "enable_pool_hba = on but there is no {}: give dbproxy's [[hba]] rules (default: \
                 SCRAM-SHA-256, or md5 for users whose pool_passwd entry is an md5 hash)",
                pool_hba.display()
            ));
        }
    }

    if !hba_on {
        // Without pool_hba, pgpool-II lets the primary authenticate who has no pool_passwd entry.
        let mut auth = Table::new();
        auth.insert("passthrough".into(), Value::Boolean(true));
        out.table.insert("auth".into(), Value::Table(auth));
    }
    Ok(())
}

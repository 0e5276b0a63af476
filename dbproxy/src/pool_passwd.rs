//! pgpool-II's `pool_passwd` (the file pgpool.conf's `pool_passwd` names) as dbproxy `[[users]]`:
//! `user:TEXTpassword`, `user:md5<hash>`, `user:SCRAM-SHA-256$...`, unprefixed plain text; AES
//! entries need pgpool's key and are left out with a note.

use std::path::Path;

use toml::{Table, Value};

use crate::pgpool_conf::PgpoolConfError;

/// Reads pool_passwd: `user:TEXTpassword`, `user:md5<hash>`, `user:SCRAM-SHA-256$...`.
/// Returns the users and the names whose only secret is an md5 hash.
pub fn read(path: &Path, notes: &mut Vec<String>) -> Result<(Vec<Value>, Vec<String>), PgpoolConfError> {
    let text = std::fs::read_to_string(path).map_err(|e| PgpoolConfError::PoolPasswd {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    parse(&text, path, notes)
}

/// Parses pool_passwd text (`path` only names the file in errors); see [`read`].
pub fn parse(
    text: &str,
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<(Vec<Value>, Vec<String>), PgpoolConfError> {
    let err = |message: String| PgpoolConfError::PoolPasswd {
        path: path.to_path_buf(),
        message,
    };
    let mut users = Vec::new();
    let mut md5_only = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, secret) = line
            .split_once(':')
            .ok_or_else(|| err(format!("line {}: expected user:password", i + 1)))?;
        if name.is_empty() {
            return Err(err(format!("line {}: empty user name", i + 1)));
        }
        let mut user = Table::new();
        user.insert("name".into(), Value::String(name.to_string()));
        if let Some(text) = secret.strip_prefix("TEXT") {
            user.insert("password".into(), Value::String(text.to_string()));
        } else if secret.starts_with("md5") && secret.len() == 35 {
            user.insert("secret".into(), Value::String(secret.to_string()));
            md5_only.push(name.to_string());
        } else if secret.starts_with("SCRAM-SHA-256$") {
            user.insert("secret".into(), Value::String(secret.to_string()));
        } else if secret.starts_with("AES") {
            notes.push(format!(
                "pool_passwd line {}: {name}'s password is AES-encrypted with pgpool's key; set it in dbproxy's \
                 config (users.password_env) instead",
                i + 1
            ));
            continue;
        } else {
            // Unprefixed entries are plain text in pgpool-II.
            user.insert("password".into(), Value::String(secret.to_string()));
        }
        users.push(Value::Table(user));
    }
    Ok((users, md5_only))
}

#[cfg(test)]
mod tests {
    use crate::pgpool_conf::parse;

    #[test]
    fn pool_passwd_formats() {
        let dir = std::env::temp_dir().join(format!("pgpool-conf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pool_passwd"),
            "a:TEXTpw\nb:md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nc:SCRAM-SHA-256$4096:c2FsdA==$a:b\nd:AESxyz\ne:plain\n",
        )
        .unwrap();
        let imp = parse("pool_passwd = 'pool_passwd'\n", &dir).unwrap();
        let users = imp.table["users"].as_array().unwrap();
        let names: Vec<_> = users.iter().map(|u| u["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c", "e"]);
        assert_eq!(users[3]["password"].as_str(), Some("plain"));
        assert!(imp.notes.iter().any(|n| n.contains("AES")));
        std::fs::write(dir.join("pool_passwd"), "nocolon\n").unwrap();
        assert!(parse("pool_passwd = 'pool_passwd'\n", &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

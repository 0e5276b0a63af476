//! Locating the PostgreSQL server binaries and the account to run them as; shared by `testkit`
//! (servers for tests) and `stack` (servers for the local topology).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds the PostgreSQL server binaries: `$PG_BINDIR`, then `pg_config --bindir` (when it holds
/// `initdb` and `postgres`), then the newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() && dir.join("postgres").exists() {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p)
}

/// `psql` from `bindir` running `sql` as the superuser `postgres` on 127.0.0.1:`port`: unaligned,
/// tuples only, stopping at the first error, with a 5 s connect timeout and no ~/.psqlrc; the
/// caller runs it (with its own time limit) and reads the trimmed stdout.
pub fn psql_command(bindir: &Path, port: u16, password: Option<&str>, sql: &str) -> Command {
    let mut cmd = Command::new(bindir.join("psql"));
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
    ])
    .args(["-p", &port.to_string(), "-d", "postgres", "-c", sql])
    .env("PGCONNECT_TIMEOUT", "5")
    .env_remove("PGSERVICE")
    .env_remove("PGOPTIONS");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd
}

/// What to tell a user who has no server binaries.
pub const INSTALL_HINT: &str = "no PostgreSQL server binaries found (tried $PG_BINDIR, pg_config --bindir, \
     /usr/lib/postgresql/*/bin): install them with `apt-get install -y postgresql-15`";

/// Reads `(uid, gid)` of `user` from /etc/passwd.
pub fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == user).then_some(())?;
        let _pw = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The account servers must run as: `postgres` when we are root (PostgreSQL refuses root), else
/// ourselves (`None`). Errors when root has no `postgres` user to switch to.
pub fn server_account() -> Result<Option<(u32, u32)>, String> {
    if !is_root() {
        return Ok(None);
    }
    lookup_user("postgres")
        .map(Some)
        .ok_or_else(|| "running as root, but there is no `postgres` user to run PostgreSQL as".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_passwd() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-here"), None);
    }
}

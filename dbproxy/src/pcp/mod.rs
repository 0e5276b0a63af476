//! pgpool-II's PCP operator interface on `pcp.listen`, so Debian's unchanged `pcp_node_info`,
//! `pcp_node_count`, `pcp_attach_node`, `pcp_detach_node`, `pcp_promote_node`,
//! `pcp_health_check_stats` and `pcp_proc_count` work against dbproxy. `protocol` is the wire
//! format (no I/O), `server` the listener; this file reads `pcp.conf`.
//!
//! What each command does in dbproxy: node info, counts and health statistics come from the node
//! table (the same values as SHOW POOL_NODES and SHOW POOL_HEALTH_CHECK_STATS); attach is an
//! attach operation of the failover manager (the node must stream from the primary); detach stops routing to
//! a standby (the primary is refused: pgpool would fail over while it still runs); promote, with
//! or without `-s`, is the manager's switchover operation (dbproxy promotes for real, never only
//! relabels). The PCP client waits for the operation's outcome, as pgpool's do.

pub mod protocol;
pub mod server;

use std::path::{Path, PathBuf};

/// What is wrong with a pcp.conf.
#[derive(Debug, thiserror::Error)]
pub enum PcpConfError {
    /// The file cannot be read.
    #[error("pcp.conf {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `user:md5hex`.
    #[error("pcp.conf {path} line {line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: &'static str,
    },
}

/// The PCP logins: user name and the hex md5 of the password, as pcp.conf stores them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PcpUsers(Vec<(String, String)>);

impl std::fmt::Debug for PcpUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(u, _)| u)).finish()
    }
}

impl PcpUsers {
    /// Reads `path` (pgpool's format: `user:md5hex` per line, `#` comments).
    pub fn load(path: &Path) -> Result<PcpUsers, PcpConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| PcpConfError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PcpUsers::parse(&text).map_err(|(line, message)| PcpConfError::Line {
            path: path.to_path_buf(),
            line,
            message,
        })
    }

    /// Parses pcp.conf text; errors give the 1-based line.
    pub fn parse(text: &str) -> Result<PcpUsers, (usize, &'static str)> {
        let mut users = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or((i + 1, "expected user:md5hash"))?;
            if user.is_empty() || user.len() >= 128 {
                return Err((i + 1, "the user name must have 1 to 127 characters"));
            }
            let hash = hash.trim();
            if hash.len() != 32 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    i + 1,
                    "the password must be its md5 in 32 hex digits (pg_md5 PASSWORD)",
                ));
            }
            users.push((user.to_string(), hash.to_ascii_lowercase()));
        }
        Ok(PcpUsers(users))
    }

    /// The stored md5 of `user`'s password; the first entry wins, as in pgpool.
    pub fn md5_of(&self, user: &str) -> Option<&str> {
        self.0.iter().find(|(u, _)| u == user).map(|(_, h)| h.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcp_conf_lines() {
        let u = PcpUsers::parse(
            "# comment\n\npcpadmin:5EBE2294ECD0E0F08EAB7690D2A6EE69\nops:00000000000000000000000000000000\n",
        )
        .unwrap();
        assert_eq!(u.md5_of("pcpadmin"), Some("5ebe2294ecd0e0f08eab7690d2a6ee69"));
        assert_eq!(u.md5_of("nobody"), None);
        assert!(!format!("{u:?}").contains("5ebe"), "no hashes in debug output");
        assert_eq!(PcpUsers::parse("x\n").unwrap_err().0, 1);
        assert_eq!(PcpUsers::parse("\nu:secret\n").unwrap_err().0, 2);
        assert_eq!(
            PcpUsers::parse(":5ebe2294ecd0e0f08eab7690d2a6ee69")
                .unwrap_err()
                .0,
            1
        );
    }
}

//! SHOW POOLS, SHOW CLIENTS and SHOW SERVERS: PgBouncer's columns (1.18) where they apply,
//! then dbproxy's own (the node each pool and server belongs to, checkouts, pinned clients).
//! Values PgBouncer tracks and dbproxy does not (cancel requests in flight) are 0.

use std::net::SocketAddr;
use std::time::Instant;

use super::{split_secs, PoolMode, Pools, ServerState};

/// SHOW POOLS columns.
pub const POOLS_COLUMNS: [&str; 19] = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
    "node_id",
    "checkouts",
    "cl_pinned",
];

/// SHOW CLIENTS and SHOW SERVERS columns.
pub const CONNECTIONS_COLUMNS: [&str; 19] = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "node_id",
];

fn host(a: Option<SocketAddr>) -> String {
    a.map(|a| a.ip().to_string()).unwrap_or_default()
}

fn port(a: Option<SocketAddr>) -> String {
    a.map(|a| a.port().to_string()).unwrap_or_default()
}

fn ptr(id: Option<u64>) -> String {
    id.map(|i| format!("{i:#x}")).unwrap_or_default()
}

fn mode_name(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

impl Pools {
    /// One SHOW POOLS row per pool (key and node).
    pub fn pools_rows(&self) -> Vec<[String; 19]> {
        let mode = mode_name(self.config.load().mode);
        let st = self.lock();
        let now = Instant::now();
        let mut rows: Vec<[String; 19]> = st
            .pools
            .values()
            .map(|p| {
                let (mut active, mut tested, mut login, mut idle) = (0, 0, 0, 0);
                for s in st.servers.values().filter(|s| s.key == p.key) {
                    match s.state {
                        ServerState::Active => active += 1,
                        ServerState::Tested => tested += 1,
                        ServerState::Login => login += 1,
                        ServerState::Idle => idle += 1,
                    }
                }
                let maxwait = st
                    .clients
                    .values()
                    .filter_map(|c| c.waiting.as_ref())
                    .filter(|(_, k)| *k == p.key)
                    .map(|(since, _)| now.saturating_duration_since(*since))
                    .max()
                    .unwrap_or_default();
                let (w, wus) = split_secs(maxwait);
                [
                    p.key.database().to_string(),
                    p.key.user().to_string(),
                    active.to_string(),
                    p.waiting.to_string(),
                    "0".into(),
                    "0".into(),
                    active.to_string(),
                    "0".into(),
                    "0".into(),
                    idle.to_string(),
                    "0".into(),
                    tested.to_string(),
                    login.to_string(),
                    w.to_string(),
                    wus.to_string(),
                    mode.to_string(),
                    p.key.node.to_string(),
                    p.checkouts.to_string(),
                    super::pinned::pinned_in(&st, &p.key).to_string(),
                ]
            })
            .collect();
        rows.sort();
        rows
    }

    /// One SHOW CLIENTS row per logged-in client.
    pub fn clients_rows(&self) -> Vec<[String; 19]> {
        let st = self.lock();
        let now = Instant::now();
        let mut rows: Vec<(u64, [String; 19])> = st
            .clients
            .iter()
            .map(|(id, c)| {
                let (w, wus) = split_secs(
                    c.waiting
                        .as_ref()
                        .map(|(s, _)| now.saturating_duration_since(*s))
                        .unwrap_or_default(),
                );
                let node = c
                    .link
                    .and_then(|l| st.servers.get(&l))
                    .map(|s| s.key.node.to_string())
                    .unwrap_or_default();
                let link = c.link.filter(|l| st.servers.contains_key(l));
                let time = crate::admin::timestamp(c.info.connected);
                (
                    *id,
                    [
                        "C".into(),
                        c.info.user.clone(),
                        c.info.database.clone(),
                        if c.waiting.is_some() { "waiting" } else { "active" }.into(),
                        c.info.addr.ip().to_string(),
                        c.info.addr.port().to_string(),
                        host(c.info.local),
                        port(c.info.local),
                        time.clone(),
                        time,
                        w.to_string(),
                        wus.to_string(),
                        "0".into(),
                        ptr(Some(*id)),
                        ptr(link),
                        "0".into(),
                        if c.info.tls { "TLS" } else { "" }.into(),
                        c.info.application_name.clone(),
                        node,
                    ],
                )
            })
            .collect();
        rows.sort_by_key(|(id, _)| *id);
        rows.into_iter().map(|(_, r)| r).collect()
    }

    /// One SHOW SERVERS row per server connection the pools count.
    pub fn servers_rows(&self) -> Vec<[String; 19]> {
        let st = self.lock();
        let mut rows: Vec<(u64, [String; 19])> = st
            .servers
            .iter()
            .map(|(id, s)| {
                let time = crate::admin::timestamp(s.connected);
                (
                    *id,
                    [
                        "S".into(),
                        s.key.user().to_string(),
                        s.key.database().to_string(),
                        s.state.as_str().into(),
                        host(s.addr),
                        port(s.addr),
                        host(s.local),
                        port(s.local),
                        time.clone(),
                        time,
                        "0".into(),
                        "0".into(),
                        "0".into(),
                        ptr(Some(*id)),
                        ptr(s.client),
                        s.pid.to_string(),
                        String::new(),
                        s.key.get("application_name").to_string(),
                        s.key.node.to_string(),
                    ],
                )
            })
            .collect();
        rows.sort_by_key(|(id, _)| *id);
        rows.into_iter().map(|(_, r)| r).collect()
    }
}

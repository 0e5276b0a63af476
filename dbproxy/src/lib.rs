//! dbproxy: a PostgreSQL wire proxy in front of one primary and its streaming standbys. It
//! authenticates clients itself, sends writes and transactions to the primary and sure reads to
//! healthy standbys, health-checks every node and answers `SHOW POOL_NODES` (replaces pgpool-II).
//!
//! Map: `protocol/` is the codec and typed message views (no I/O); `session/` runs one client
//! (login, request cycle, routing, replay window, prepared statements, backend side; `settings`
//! follows which of its SET statements hold); `backend` logs into nodes;
//! `auth` checks clients (`scram_client` logs into nodes by SCRAM; `auth_query` looks up verifiers,
//! `session::relay` passes authentication through to the primary); `pool` keeps server connections between clients; `cluster` holds the node table and picks standbys; `health` probes
//! nodes; `admin` serves pgpool's SHOW commands and `/status`; `pcp` speaks pgpool's PCP; `server` accepts (each session then runs
//! on a serving thread, `common::workers`) and shuts down;
//! `reload` decides what a new configuration changes; `record` keeps who is primary durably
//! (`manager` writes it before routing changes).

pub mod admin;
pub mod auth;
pub mod auth_query;
pub mod backend;
pub mod backend_tls;
pub mod classify;
pub mod cluster;
pub mod config;
pub mod coordination;
pub mod etcd_store;
pub mod failover;
pub mod fault;
pub mod fence;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod health_stats;
pub mod manager;
pub mod memory;
pub mod operations;
pub mod pcp;
pub mod pgpool_check;
pub mod pgpool_clients;
pub mod pgpool_conf;
pub mod pool;
pub mod pool_hba;
pub mod pool_passwd;
pub mod protocol;
pub mod record;
pub mod rejoin;
pub mod reload;
pub mod replay_position;
pub mod scram_client;
pub mod server;
pub mod session;
pub mod settings;
pub mod tls;
pub mod unlogged;

pub use config::Config;
pub use server::{run, run_with, run_with_admin, RunError};

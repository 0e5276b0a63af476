//! The accept loop: one task per client, served on one of the serving threads
//! ([`common::workers`]), a cap on concurrent clients, health checkers and the admin listener
//! alongside on the control runtime, and the single shutdown path (stop accepting, drain with a
//! deadline).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use common::Shutdown;
use prometheus::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::auth::{self, Hba};
use crate::classify::Classifier;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::session::{self, Shared};

/// How long sessions get to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A configured password source could not be read.
    #[error("{0}")]
    Credentials(#[from] auth::AuthError),
    /// The TLS certificate or key cannot be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The cluster record cannot be read or written.
    #[error("{0}")]
    Record(#[from] crate::record::RecordError),
    /// pcp.conf could not be read.
    #[error("{0}")]
    PcpUsers(#[from] crate::pcp::PcpConfError),
    /// The serving threads could not be started.
    #[error("cannot start the serving threads: {0}")]
    Workers(std::io::Error),
}

/// Runs dbproxy on `listener`, binding the admin listener from the config, until `shutdown`.
pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let admin = TcpListener::bind(&config.admin_listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.admin_listen.clone(),
            source,
        })?;
    run_with_admin(listener, Some(admin), config, shutdown).await
}

/// Runs dbproxy on `listener` with the admin API on `admin` (none when `None`) until `shutdown`.
pub async fn run_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    run_with(listener, admin, config, shutdown, None).await
}

/// Like [`run_with_admin`], also taking new configurations from `reload` (the binary feeds it on
/// SIGHUP). Node weights, health checks and replication-lag limits change at once and nodes may
/// be appended; users, client authentication, routing and limits apply to connections accepted
/// after the reload (sessions keep the settings they started with). An existing node's address,
/// the listeners, the connection limit, the number of serving threads and failover settings need
/// a restart (a reload that changes them says so and keeps the old); see [`crate::reload`].
pub async fn run_with(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: Shutdown,
    mut reload: Option<mpsc::Receiver<Config>>,
) -> Result<(), RunError> {
    let registry = Registry::new();
    let cluster = Arc::new(Cluster::new(&config, &registry));
    let cancels = Arc::new(Mutex::new(HashMap::new()));
    // One pool set for the process: reloads change its settings, never its connections.
    let pools = Arc::new(crate::pool::Pools::new(
        common::workers::resolve(config.workers),
        config.pool.clone(),
        cluster.clone(),
        &registry,
    ));
    let unlogged = Arc::new(crate::unlogged::Unlogged::default());
    let state = State {
        cluster: &cluster,
        cancels: &cancels,
        pools: &pools,
        unlogged: &unlogged,
        shutdown: &shutdown,
    };
    let shared = ArcSwap::from_pointee(generation(config, &state)?);
    let tasks = TaskTracker::new();
    let first = shared.load_full();
    // The durable record of who is primary (a file, or etcd shared with other instances);
    // unreadable, dbproxy does not guess.
    let opened = crate::coordination::open(&first.config, &cluster, &registry).await?;
    let manager = Arc::new(crate::manager::Manager::new(
        cluster.clone(),
        &first.config,
        &registry,
        opened.store.clone(),
        opened.record.clone(),
    ));
    // The primary comes from the record and the nodes (a follower: the record alone), before
    // the first client is served.
    let lost = crate::coordination::start(&opened, &manager, &tasks, &shutdown).await?;
    tasks.spawn(manager.clone().run(shutdown.clone(), lost));
    for i in 0..cluster.nodes.len() {
        tasks.spawn(crate::health::run(cluster.clone(), i, shutdown.clone()));
        tasks.spawn(crate::replay_position::run(cluster.clone(), i, shutdown.clone()));
    }
    if let Some(admin) = admin {
        let token = &first.config.admin_token;
        if token.is_empty() && !common::admin::is_loopback(&first.config.admin_listen) {
            // Only with admin_allow_open (validation refuses it otherwise): say so at every start.
            tracing::warn!(
                admin_listen = %first.config.admin_listen,
                "the admin listener is reachable from other hosts and admin_token is empty: \
                 anyone who reaches it can promote or attach nodes"
            );
        }
        let routes = Arc::new(crate::admin::Routes {
            cluster: cluster.clone(),
            manager: manager.clone(),
            token: (!token.is_empty()).then(|| token.clone()),
        });
        tasks.spawn(common::admin::serve(admin, registry, routes, shutdown.clone()));
    }
    if !first.config.pcp.listen.is_empty() {
        let pcp = &first.config.pcp;
        let users = crate::pcp::PcpUsers::load(std::path::Path::new(&pcp.users_file))?;
        let l = TcpListener::bind(&pcp.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: pcp.listen.clone(),
                source,
            })?;
        let pcp = Arc::new(crate::pcp::server::Pcp {
            cluster: cluster.clone(),
            manager: manager.clone(),
            users,
        });
        tasks.spawn(crate::pcp::server::serve(l, pcp, shutdown.clone()));
    }
    let slots = Arc::new(Semaphore::new(first.config.limits.max_connections));
    let sessions = TaskTracker::new();
    let workers =
        common::workers::Workers::start("dbproxy-worker", first.config.workers).map_err(RunError::Workers)?;
    tracing::info!(addr = ?listener.local_addr().ok(), workers = workers.len(), "dbproxy listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(new) = recv(&mut reload) => {
                let current = shared.load_full();
                let next = match crate::reload::merge(&current.config, new) {
                    Ok(c) => generation(c, &state).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match next {
                    Ok(g) => {
                        for i in crate::reload::apply(&cluster, &g.config) {
                            tasks.spawn(crate::health::run(cluster.clone(), i, shutdown.clone()));
                            tasks.spawn(crate::replay_position::run(cluster.clone(), i, shutdown.clone()));
                        }
                        pools.set_config(g.config.pool.clone());
                        shared.store(Arc::new(g));
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => tracing::warn!(error = %e, "reload failed; keeping the running configuration"),
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        cluster.metrics.connections_total.inc();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            cluster.metrics.error("limit");
            sessions.spawn(refuse(stream));
            continue;
        };
        let shared = shared.load_full();
        // Counted before the hand-over, so the drain below cannot miss a session in transit.
        let token = sessions.token();
        workers.serve(stream, move |stream| async move {
            session::serve(stream, peer, shared, Some(permit)).await;
            drop(token);
        });
    }
    drop(listener);
    sessions.close();
    if tokio::time::timeout(DRAIN_DEADLINE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open at the drain deadline; closing them");
    }
    pools.close();
    // A switchover under way ends with a primary elected before dbproxy exits.
    manager.close().await;
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// What every configuration generation shares.
struct State<'a> {
    cluster: &'a Arc<Cluster>,
    cancels: &'a Arc<session::CancelMap>,
    pools: &'a Arc<crate::pool::Pools>,
    unlogged: &'a Arc<crate::unlogged::Unlogged>,
    shutdown: &'a Shutdown,
}

/// One configuration generation: everything a session needs from the config.
fn generation(config: Config, state: &State<'_>) -> Result<Shared, RunError> {
    let State {
        cluster,
        cancels,
        pools,
        unlogged,
        shutdown,
    } = *state;
    cluster.message_budget.set_limit(config.limits.max_message_memory);
    Ok(Shared {
        tls: crate::tls::acceptor(&config.tls)?,
        users: auth::resolve_users(&config.users, &cluster.metrics.scram_key_derivations)?,
        hba: Hba::new(&config.hba),
        verifiers: crate::auth_query::VerifierCache::default(),
        classifier: Classifier::new(&config.routing.read_only_functions),
        cluster: cluster.clone(),
        cancels: cancels.clone(),
        pools: pools.clone(),
        unlogged: unlogged.clone(),
        shutdown: shutdown.clone(),
        config,
    })
}

/// The next reload, or pending forever when there is no reload channel.
async fn recv(reload: &mut Option<mpsc::Receiver<Config>>) -> Option<Config> {
    match reload {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Tells a client over the connection limit so, as PostgreSQL does.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let mut buf = BytesMut::new();
    crate::protocol::error::encode_error("FATAL", "53300", "sorry, too many clients already", &mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&buf)).await;
}

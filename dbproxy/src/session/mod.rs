//! One client session: login, then the relay loop that routes each simple query or
//! extended-protocol batch (everything up to Sync or Flush) to the primary or to a lazily opened
//! standby connection, and streams the response back.
//!
//! Map: `login` (startup, TLS, authentication, the first primary connection); `relay`
//! (pass-through authentication against the primary); `cycle` (the
//! request cycle and transaction state); `client` (the relay loop and the client's messages);
//! `route` (the pure choice of a backend); `batch` (the extended batch being gathered);
//! `upstream` (backend connections: opening, losing, sending a request with lazy prepares and
//! settings replay); `answer` (the backends' messages); `window` (the 25006 replay window);
//! `stmt` (prepared statements).
//!
//! The status of each ReadyForQuery is the truth about transactions. A new request is routed
//! only once the previous one has been answered, so responses can never be reordered across
//! backends; the messages of one extended batch always go to one backend.

mod answer;
mod batch;
mod catalog;
mod causal;
mod client;
mod cycle;
mod login;
mod relay;
mod route;
mod stmt;
mod upstream;
mod window;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::auth::{Credentials, Hba};
use crate::backend::{self, Backend, Conn};
use crate::classify::{Classifier, Encoding};
use crate::cluster::Cluster;
use crate::config::{secs, Config};
use crate::protocol::{error as perror, Frame};
use crate::settings::Tracker;

use batch::Batch;
use cycle::{Cycle, Split, Tx, Which};
use login::Login;
use route::Sticky;
use stmt::Statements;
use window::Window;

/// Where a session's current request runs.
pub type CancelSlot = Mutex<Option<(SocketAddr, i32, i32)>>;

/// Proxy BackendKeyData → that session's cancel slot.
pub type CancelMap = Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>;

/// State every session shares. A reload makes a new one; sessions keep the one they started with.
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// Resolved credentials by user name.
    pub users: HashMap<String, Credentials>,
    /// Client authentication rules.
    pub hba: Hba,
    /// What `auth_query` found, by user (emptied by a reload, with the rest of this state).
    pub verifiers: crate::auth_query::VerifierCache,
    /// The node table.
    pub cluster: Arc<Cluster>,
    /// The statement classifier.
    pub classifier: Classifier,
    /// Proxy BackendKeyData → the backend currently running that session's request (shared by
    /// every configuration generation, so a cancel reaches sessions started before a reload).
    pub cancels: Arc<CancelMap>,
    /// Cancelled at shutdown: idle sessions then end, busy ones once their transaction ends.
    pub shutdown: common::Shutdown,
    /// TLS for clients that ask for it (`None`: answered `N`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The server connection pools (shared by every configuration generation).
    pub pools: Arc<crate::pool::Pools>,
    /// The unlogged relations of each database (shared by every configuration generation).
    pub unlogged: Arc<crate::unlogged::Unlogged>,
}

/// Why a session ends (already reported to the client where that makes sense).
#[derive(Debug)]
struct End;

/// The largest message accepted before authentication (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH).
const MAX_AUTH_MESSAGE: usize = 65535;

/// A place under the connection limit, held for as long as the session is served.
pub type Slot = Option<tokio::sync::OwnedSemaphorePermit>;

/// Serves one client connection until it ends.
/// `slot` is the session's place under `max_connections`: it is given back before the client is
/// told its session is over, so a client that saw the end can connect again at once.
pub async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, slot: Slot) {
    // As PostgreSQL and PgBouncer do: a reply is sent when written, not held back by Nagle's
    // algorithm until the client acknowledges the previous one.
    let _ = stream.set_nodelay(true);
    let max = shared.config.limits.max_message_size;
    // Until the client is authenticated, no message may be larger than PostgreSQL's own limit
    // for authentication tokens, whatever the configured maximum.
    let mut client = Conn::new(stream, max.min(MAX_AUTH_MESSAGE));
    let write_timeout = shared.config.limits.client_write_timeout;
    client.write_timeout = (write_timeout > 0.0).then(|| secs(write_timeout));
    let limit = secs(shared.config.limits.startup_timeout);
    let local = match &client.stream {
        backend::Stream::Plain(s) => s.local_addr().ok(),
        _ => None,
    };
    let started = tokio::time::timeout(limit, login::startup(&mut client, peer.ip(), &shared)).await;
    let authed = match started {
        Ok(Ok(Some(a))) => a,
        Ok(_) => return,
        Err(_) => {
            shared.cluster.metrics.error("timeout");
            drop(slot);
            fatal(&mut client, "57014", "canceling authentication due to timeout").await;
            return;
        }
    };
    let Ok(Some(login)) = login::connect(&mut client, authed, peer, local, &shared).await else {
        return;
    };
    client.max = max;
    client.charge = crate::memory::Charge::on(shared.cluster.message_budget.clone());
    Session::new(shared, client, login, slot).run().await;
}

/// Appends a FATAL error and writes everything pending, bounded in time.
async fn fatal(client: &mut Conn, code: &str, message: &str) {
    perror::encode_error("FATAL", code, message, &mut client.wbuf);
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

/// A logged-in client and its backend connections.
struct Session {
    shared: Arc<Shared>,
    client: Conn,
    /// Given back (set to `None`) before a FATAL that ends the session is sent.
    slot: Slot,
    user: String,
    params: Vec<(String, String)>,
    /// What this session's backend logins use: the configured credentials, or what its
    /// client's authentication revealed (`auth_query`, pass-through).
    creds: Option<Credentials>,
    /// The pool keys of this session's server connections (see `pool::Keys`).
    pool_keys: crate::pool::Keys,
    /// Every request runs on the primary: the client authenticated by a relayed md5 or SCRAM
    /// exchange, which leaves nothing to log in to another node with.
    primary_only: bool,
    /// The client's `client_encoding` as the server last reported it (ParameterStatus), which
    /// the SQL text the client sends is in.
    encoding: Encoding,
    /// The connection to the elected primary; `None` after it was lost while idle (reopened,
    /// to whichever node is primary then, when next needed).
    primary: Option<Backend>,
    standby: Option<Backend>,
    /// Changes of the elected primary and of fences.
    watch: tokio::sync::watch::Receiver<u64>,
    /// The request cycle.
    cycle: Cycle,
    /// The transaction, from the last ReadyForQuery.
    tx: Tx,
    /// Whether that transaction's first reads run on the standby.
    split: Split,
    /// What keeps reads on the primary.
    sticky: Sticky,
    stmts: Statements,
    /// Session-level SET statements that hold, in order, applied to each backend before its
    /// next use.
    sets: Vec<String>,
    /// Follows the statements of each request to tell which SETs hold: those that ran outside
    /// a transaction or whose transaction committed, not those rolled back (as PostgreSQL
    /// itself undoes them), nor SET LOCAL.
    settings: Tracker,
    /// The unlogged relations of the session's database (reads naming one go to the primary).
    unlogged: Arc<crate::unlogged::Db>,
    /// A statement that may change which relations are unlogged was sent: they are learned
    /// again once its transaction ends.
    ddl_sent: bool,
    /// The unlogged relations are to be learned before the next statement is routed (see
    /// `catalog`): nobody had learned them when the session started, or it ran DDL.
    unlogged_due: bool,
    /// The extended-protocol batch being gathered.
    batch: Batch,
    /// What was sent to a standby in this cycle and may still be replayed on the primary.
    replay: Option<Window>,
    /// An emptied window kept for the next cycle, so that the common cycle allocates nothing
    /// (with `batch`, which takes back the emptied message list of the last request).
    spare_window: Window,
    /// Responses held back while a replay is still possible (ParseComplete and the like).
    holdback: Vec<Frame>,
    /// The FATAL error the primary connection sent while idle, just before it ended: told to
    /// the client when its own backend was terminated (see `upstream::backend_lost`).
    primary_fatal: Option<Frame>,
    cancel: Arc<CancelSlot>,
    /// The backend key now in `cancel`, so the slot's lock is taken only when it changes.
    cancel_key: Option<(i32, i32)>,
    key: (i32, i32),
    /// The client's entry in SHOW CLIENTS (removed when the session is dropped).
    member: login::Member,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared
            .cancels
            .lock()
            .expect("cancels poisoned")
            .remove(&self.key);
        self.shared.cluster.metrics.connections.dec();
    }
}

impl Session {
    fn new(shared: Arc<Shared>, client: Conn, login: Login, slot: Slot) -> Session {
        let watch = shared.cluster.subscribe();
        let unlogged_due = login.unlogged.generation() == 0;
        Session {
            shared,
            client,
            slot,
            user: login.user,
            params: login.params,
            creds: login.creds,
            pool_keys: login.keys,
            primary_only: login.primary_only,
            encoding: login.encoding,
            primary: login.primary,
            standby: None,
            watch,
            cycle: Cycle::Idle,
            tx: Tx::default(),
            split: Split::default(),
            sticky: Sticky::default(),
            stmts: Statements::default(),
            sets: Vec::new(),
            settings: Tracker::default(),
            unlogged: login.unlogged,
            ddl_sent: false,
            unlogged_due,
            batch: Batch::default(),
            replay: None,
            spare_window: Window::default(),
            holdback: Vec::new(),
            primary_fatal: None,
            cancel: login.cancel,
            cancel_key: None,
            key: login.key,
            member: login.member,
        }
    }

    async fn run(mut self) {
        let _ = self.relay().await;
        // A request still running when the client left is cancelled, so it does not run on.
        if self.cycle.awaiting() {
            if let Some(b) = self.cycle.on().and_then(|w| self.backend(w)) {
                let (addr, (pid, key)) = (b.addr, b.key);
                backend::cancel(addr, pid, key, secs(self.shared.config.limits.connect_timeout)).await;
            }
        }
        self.give_back();
    }

    /// Hands the session's server connections back to the pool: reused (after the reset
    /// query) only when no request runs on them and no transaction is open there; otherwise
    /// closed. The session's cancel key is forgotten first, so a late CancelRequest of this
    /// client cannot reach the next one.
    fn give_back(&mut self) {
        self.shared
            .cancels
            .lock()
            .expect("cancels poisoned")
            .remove(&self.key);
        *self.cancel.lock().expect("slot poisoned") = None;
        let idle = matches!(self.cycle, Cycle::Idle);
        let pools = &self.shared.pools;
        if let Some(b) = self.primary.take() {
            pools.checkin(b, idle && !self.tx.on_primary());
        }
        if let Some(b) = self.standby.take() {
            pools.checkin(b, idle && !self.tx.on_standby());
        }
    }

    fn backend(&mut self, w: Which) -> Option<&mut Backend> {
        match w {
            Which::Standby => self.standby.as_mut().or(self.primary.as_mut()),
            Which::Primary => self.primary.as_mut(),
        }
    }

    /// Whether the primary connection holds the current request or transaction.
    fn primary_busy(&self) -> bool {
        self.cycle.on() == Some(Which::Primary) || self.tx.on_primary()
    }

    /// Ends the session with a FATAL error, its connection slot given back first.
    async fn end(&mut self, code: &str, message: &str) {
        self.slot = None;
        fatal(&mut self.client, code, message).await;
    }

    async fn protocol_violation(&mut self, message: &str) -> End {
        self.shared.cluster.metrics.error("protocol");
        self.end("08P01", message).await;
        End
    }

    /// Tells the client its server connection is gone (08006) and ends the session.
    async fn backend_gone(&mut self) -> End {
        self.shared.cluster.metrics.error("backend");
        self.cycle = Cycle::Idle;
        fatal(
            &mut self.client,
            "08006",
            "server closed the connection unexpectedly",
        )
        .await;
        End
    }
}

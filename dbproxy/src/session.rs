//! One client session: startup and authentication, then the relay loop that routes each simple
//! query or extended-protocol batch (everything up to Sync or Flush) to the primary or to a lazily
//! opened standby connection, and streams the response back.
//!
//! The status byte of each ReadyForQuery is the truth about transactions. A new request is routed
//! only once the previous one has been answered, so responses can never be reordered across
//! backends; the messages of one extended batch always go to one backend.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BufMut;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::{self, AuthError, Credentials, Hba, ScramServer};
use crate::backend::{self, Backend, BackendError, Conn};
use crate::classify::{Classifier, Step, Target, TxCommand};
use crate::cluster::{parse_lsn, Cluster, Decision, Role};
use crate::config::{secs, AuthMethod, Config, WriteStickiness};
use crate::protocol::{self, auth as pauth, error as perror, extended, simple, status, Frame, Startup};
use crate::settings::{Lost, Tracker};

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
}

/// Why a session ends (already reported to the client where that makes sense).
#[derive(Debug)]
struct End;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Primary,
    Standby,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// A Query, Sync or FunctionCall: the cycle ends with ReadyForQuery.
    #[default]
    Sync,
    /// A Flush: the backend answers what it has, the batch goes on.
    Flush,
}

/// Where a request stands with COPY FROM STDIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// No COPY FROM STDIN.
    Off,
    /// The backend sent CopyInResponse: CopyData flows from the client.
    In,
    /// The client sent CopyDone or CopyFail; only a Sync or Flush of the same request may follow.
    Done,
}

/// A client's prepared statement, remembered so it can be prepared on any backend.
#[derive(Debug)]
struct Stmt {
    /// The client's Parse message, replayed as is.
    parse: Frame,
    /// The statement surely only reads.
    read_only: bool,
    /// What executing it does to session settings and the transaction.
    step: Step,
    /// Its parameter types, as declared or as a Describe learned them; kept only for a
    /// `set_config` call, whose bound values are written into the text replayed elsewhere.
    param_types: Vec<u32>,
}

/// The most Describe-statement answers a session waits for at once (see `Session::describing`).
const MAX_DESCRIBING: usize = 4096;

impl Stmt {
    /// What executing this statement with the parameters of `bind` (a Bind body) does: for a
    /// `set_config` call with parameters, the text with the values written in as literals, so
    /// that another connection replays exactly what ran; [`Step::Unknown`] when they cannot be
    /// written out.
    fn bound(&self, bind: &[u8]) -> Step {
        let Step::Set(text) = &self.step else {
            return self.step.clone();
        };
        let Ok(params) = extended::bind_params(bind) else {
            return Step::Unknown;
        };
        if params.is_empty() {
            return self.step.clone();
        }
        let mut values = Vec::with_capacity(params.len());
        for (i, (format, value)) in params.into_iter().enumerate() {
            let oid = self.param_types.get(i).copied().unwrap_or(0);
            match value.map(|v| param_text(format, oid, v)) {
                None => values.push(None),
                Some(Some(v)) => values.push(Some(v)),
                Some(None) => return Step::Unknown,
            }
        }
        let values: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
        crate::classify::inline_params(text, &values).map_or(Step::Unknown, Step::Set)
    }
}

/// A parameter value as SQL text: text format as is; binary format for the types whose binary
/// form is known here (text-like, boolean, integers); `None` otherwise.
fn param_text(format: i16, oid: u32, v: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    const BOOL: u32 = 16;
    const NAME: u32 = 19;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const UNKNOWN: u32 = 705;
    const BPCHAR: u32 = 1042;
    const VARCHAR: u32 = 1043;
    match (format, oid) {
        (0, _) | (1, TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN) => {
            std::str::from_utf8(v).ok().map(Cow::Borrowed)
        }
        (1, BOOL) => match v {
            [0] => Some(Cow::Borrowed("false")),
            [1] => Some(Cow::Borrowed("true")),
            _ => None,
        },
        (1, INT2) => Some(Cow::Owned(i16::from_be_bytes(v.try_into().ok()?).to_string())),
        (1, INT4) => Some(Cow::Owned(i32::from_be_bytes(v.try_into().ok()?).to_string())),
        (1, INT8) => Some(Cow::Owned(i64::from_be_bytes(v.try_into().ok()?).to_string())),
        _ => None,
    }
}

/// The 25006 replay window: the batches of the current cycle sent to a standby whose answers
/// have not reached the client, so that a standby's refusal (25006) can still send them to the
/// primary. Answers are held back until the first one that is not ParseComplete, BindComplete,
/// ParameterDescription, RowDescription, NoData or CloseComplete; that one (rows, a
/// CommandComplete, an error) closes the window for the rest of the cycle. A batch ended by
/// Flush and without Execute is answered by held messages only and the client waits for them:
/// once all have arrived they are passed on and the batch leaves the window, whose later batches
/// stay replayable (nothing executed was passed on).
#[derive(Debug, Default)]
struct Window {
    batches: std::collections::VecDeque<Held>,
}

/// One batch in the replay window.
#[derive(Debug)]
struct Held {
    frames: Vec<Frame>,
    /// Held answers still to come that end a message's answer (all but ParameterDescription).
    answers: usize,
    /// It ends with Flush and holds no Execute (see [`Window`]).
    released_when_answered: bool,
}

impl Window {
    /// A batch was sent to the standby.
    fn push(&mut self, frames: Vec<Frame>) {
        let answers = frames
            .iter()
            .filter(|f| matches!(f.tag(), b'P' | b'B' | b'C' | b'D'))
            .count();
        let flush = frames.last().is_some_and(|f| f.tag() == b'H');
        let execute = frames.iter().any(|f| matches!(f.tag(), b'E' | b'Q' | b'F'));
        let released_when_answered = flush && !execute;
        if !(released_when_answered && answers == 0) {
            self.batches.push_back(Held {
                frames,
                answers,
                released_when_answered,
            });
        }
    }

    /// A held answer with `tag` arrived; true when it completes the answers of a batch the
    /// client waits for, which leaves the window (its held answers are to be passed on).
    fn answered(&mut self, tag: u8) -> bool {
        let Some(front) = self.batches.front_mut() else {
            return false;
        };
        if tag != b't' {
            front.answers = front.answers.saturating_sub(1);
        }
        if front.released_when_answered && front.answers == 0 {
            self.batches.pop_front();
            return true;
        }
        false
    }

    /// The frames to replay on the primary and how their last batch ended; `None` when there
    /// is nothing to replay or it cannot run on its own: an Execute of a portal bound in a batch
    /// whose answers were already passed on exists only on the standby.
    fn replayable(self) -> Option<(Vec<Frame>, Mode)> {
        let frames: Vec<Frame> = self.batches.into_iter().flat_map(|b| b.frames).collect();
        let mut bound: Vec<&str> = Vec::new();
        for f in &frames {
            match f.tag() {
                b'B' => bound.push(extended::bind_names(f.body()).ok()?.0),
                b'E' if !bound.contains(&extended::execute_portal(f.body()).ok()?) => return None,
                _ => {}
            }
        }
        let mode = match frames.last()?.tag() {
            b'H' => Mode::Flush,
            _ => Mode::Sync,
        };
        Some((frames, mode))
    }
}

/// The most messages an extended-protocol batch holds before it is sent on without its Sync.
const MAX_BATCH_MESSAGES: usize = 4096;

/// The most bytes an extended-protocol batch holds before it is sent on without its Sync.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// The largest message accepted before authentication (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH).
const MAX_AUTH_MESSAGE: usize = 65535;

/// Caps the number of remembered SET statements; past it the session stays on the primary.
const MAX_SETS: usize = 256;

/// The largest emptied list (in entries) a session keeps for reuse.
const MAX_SPARE: usize = 64;

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
    let limit = secs(shared.config.limits.startup_timeout);
    let started = tokio::time::timeout(limit, startup(&mut client, peer.ip(), &shared)).await;
    let login = match started {
        Ok(Ok(Some(l))) => l,
        Ok(_) => return,
        Err(_) => {
            shared.cluster.metrics.error("timeout");
            drop(slot);
            fatal(&mut client, "57014", "canceling authentication due to timeout").await;
            return;
        }
    };
    client.max = max;
    Session::new(shared, client, login, slot).run().await;
}

/// A place under the connection limit, held for as long as the session is served.
pub type Slot = Option<tokio::sync::OwnedSemaphorePermit>;

/// Appends a FATAL error and writes everything pending, bounded in time.
async fn fatal(client: &mut Conn, code: &str, message: &str) {
    perror::encode_error("FATAL", code, message, &mut client.wbuf);
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

/// Reads the client's next message during authentication; it must be a `p` message.
async fn read_password(client: &mut Conn) -> Result<Option<Frame>, End> {
    match client.read_frame().await {
        Ok(Some(f)) if f.tag() == b'p' => Ok(Some(f)),
        Ok(Some(f)) => {
            let msg = format!("expected password response, got message type {}", f.tag());
            fatal(client, "08P01", &msg).await;
            Err(End)
        }
        Ok(None) => Ok(None),
        Err(BackendError::Protocol(e)) => {
            fatal(client, e.sqlstate(), &e.to_string()).await;
            Err(End)
        }
        Err(_) => Ok(None),
    }
}

/// Startup and authentication; `Ok(None)` when the connection ended without a session (a
/// cancel request, a client that left, or an error already sent).
async fn startup(client: &mut Conn, ip: IpAddr, shared: &Arc<Shared>) -> Result<Option<Login>, End> {
    let metrics = &shared.cluster.metrics;
    let mut encrypted = false;
    let params = loop {
        match protocol::decode_startup(&mut client.rbuf) {
            Err(e) => {
                metrics.error("protocol");
                fatal(client, e.sqlstate(), &e.to_string()).await;
                return Err(End);
            }
            Ok(Some(Startup::Ssl)) if shared.tls.is_some() && !encrypted => {
                if !client.rbuf.is_empty() {
                    // Bytes sent before the handshake could be injected by a man in the middle
                    // (CVE-2021-23214): PostgreSQL refuses them too.
                    metrics.error("protocol");
                    fatal(client, "08P01", "received unencrypted data after SSL request").await;
                    return Err(End);
                }
                client.stream.write_all(b"S").await.map_err(|_| End)?;
                let acceptor = shared.tls.as_ref().expect("checked above");
                if let Err(e) = client.accept_tls(acceptor).await {
                    metrics.error("protocol");
                    tracing::info!(%ip, error = %e, "TLS handshake failed");
                    return Err(End);
                }
                encrypted = true;
            }
            Ok(Some(Startup::Ssl | Startup::GssEnc)) => {
                // No TLS configured (or already encrypted), no GSSAPI: refuse; a libpq client then
                // carries on in clear text, or gives up if it requires encryption.
                client.stream.write_all(b"N").await.map_err(|_| End)?;
            }
            Ok(Some(Startup::Cancel { pid, key })) => {
                let slot = shared
                    .cancels
                    .lock()
                    .expect("cancels poisoned")
                    .get(&(pid, key))
                    .cloned();
                let target = slot.and_then(|s| *s.lock().expect("slot poisoned"));
                if let Some((addr, bpid, bkey)) = target {
                    backend::cancel(addr, bpid, bkey, secs(shared.config.limits.connect_timeout)).await;
                }
                return Ok(None);
            }
            Ok(Some(Startup::Params(p))) => break p,
            Ok(None) => match client.fill().await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            },
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(user) = get("user").filter(|u| !u.is_empty()).map(str::to_string) else {
        fatal(
            client,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return Err(End);
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let creds = shared.users.get(&user);
    // `tls.require` acts like hostssl-only rules: a clear-text client matches none.
    let rule = if shared.config.tls.require && !encrypted {
        None
    } else {
        shared.hba.method(&user, &database, ip)
    };
    let method = match rule {
        Some(m) => m,
        None => {
            metrics.error("auth");
            let msg = format!(
                "no pg_hba.conf entry for host \"{ip}\", user \"{user}\", database \"{database}\", {}",
                encryption(encrypted)
            );
            fatal(client, "28000", &msg).await;
            return Err(End);
        }
    };
    let failed = |user: &str| AuthError::Failed(user.to_string());
    let outcome: Result<(), AuthError> = match method {
        AuthMethod::Reject => {
            metrics.error("auth");
            let msg = format!(
                "pg_hba.conf rejects connection for host \"{ip}\", user \"{user}\", database \"{database}\", {}", encryption(encrypted)
            );
            fatal(client, "28000", &msg).await;
            return Err(End);
        }
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 if creds.is_some_and(|c| c.md5.is_some()) => {
            let secret = creds.and_then(|c| c.md5.as_deref()).expect("checked above");
            let salt: [u8; 4] = rand::random();
            pauth::encode_request(pauth::MD5, &salt, &mut client.wbuf);
            client.flush().await.map_err(|_| End)?;
            let Some(f) = read_password(client).await? else {
                return Ok(None);
            };
            match pauth::password(f.body()) {
                Ok(answer) if auth::md5_ok(secret, salt, answer) => Ok(()),
                Ok(_) => Err(failed(&user)),
                Err(_) => Err(AuthError::MalformedScram),
            }
        }
        // md5 with only a SCRAM verifier upgrades to SCRAM, as PostgreSQL does.
        AuthMethod::Md5 | AuthMethod::ScramSha256 => match creds.and_then(|c| c.scram.clone()) {
            None => Err(failed(&user)),
            Some(secret) => scram(client, secret, &user).await?,
        },
    };
    if let Err(e) = outcome {
        metrics.error("auth");
        // Never log the password or the exchange, only that it failed.
        tracing::info!(%user, %ip, "authentication failed");
        fatal(client, e.sqlstate(), &e.to_string()).await;
        return Err(End);
    }
    // Open the primary connection now, so that a missing database or role surfaces at login with
    // PostgreSQL's own error. During a failover this waits for the new primary.
    let cluster = &shared.cluster;
    let mut watch = cluster.subscribe();
    let connected = connect_primary(shared, &params, &user, &mut watch).await;
    let (primary, greeting) = match connected {
        Ok(x) => x,
        Err(e) => {
            metrics.error("backend");
            report_backend_error(client, &user, e).await;
            return Err(End);
        }
    };
    pauth::encode_request(pauth::OK, &[], &mut client.wbuf);
    for f in &greeting.frames {
        client.wbuf.put_slice(f.raw());
    }
    let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
    status::encode_backend_key(key.0, key.1, &mut client.wbuf);
    status::encode_ready(b'I', &mut client.wbuf);
    client.flush().await.map_err(|_| End)?;
    let cancel = Arc::new(Mutex::new(None));
    shared
        .cancels
        .lock()
        .expect("cancels poisoned")
        .insert(key, cancel.clone());
    cluster.metrics.connections.inc();
    Ok(Some(Login {
        user,
        params,
        primary,
        cancel,
        key,
    }))
}

/// Connects to the elected primary. While there is none, or it cannot be reached (it just died
/// and the failover is under way), keeps trying, at once when the elected primary changes,
/// for up to `failover.session_wait`. A login the server refuses is final, except for the
/// refusals of a server starting up or shutting down.
async fn connect_primary(
    shared: &Shared,
    params: &[(String, String)],
    user: &str,
    watch: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(Backend, backend::Greeting), BackendError> {
    let cluster = &shared.cluster;
    let limits = &shared.config.limits;
    let creds = shared.users.get(user);
    let deadline = Instant::now() + secs(shared.config.failover.session_wait);
    let mut last = BackendError::NoPrimary;
    loop {
        watch.borrow_and_update();
        if let Some(p) = cluster.elected() {
            let node = &cluster.nodes[p].config;
            let attempt = backend::connect(
                p,
                &node.host,
                node.port,
                params,
                user,
                creds,
                limits.max_message_size,
                secs(limits.connect_timeout),
            );
            tokio::select! {
                r = attempt => match r {
                    Ok(x) => return Ok(x),
                    Err(BackendError::Refused(f))
                        if !backend::sqlstate(&f).is_some_and(|c| c.starts_with("57")) =>
                    {
                        return Err(BackendError::Refused(f));
                    }
                    Err(e @ BackendError::Auth(_)) => return Err(e),
                    Err(e) => {
                        tracing::debug!(node = %node.name, error = %e, "cannot reach the primary");
                        cluster.suspect(p);
                        last = e;
                    }
                },
                // A new primary was elected meanwhile: try it at once.
                Ok(()) = watch.changed() => continue,
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        tokio::select! {
            Ok(()) = watch.changed() => {}
            _ = tokio::time::sleep(left.min(Duration::from_millis(100))) => {}
            // Shutting down: no point waiting for a primary any more.
            _ = shared.shutdown.cancelled() => return Err(last),
        }
    }
}

/// What a successful startup hands to the session.
struct Login {
    user: String,
    params: Vec<(String, String)>,
    primary: Backend,
    cancel: Arc<CancelSlot>,
    key: (i32, i32),
}

/// Relays a failed backend login to the client the way PostgreSQL would have reported it.
async fn report_backend_error(client: &mut Conn, user: &str, e: BackendError) {
    match e {
        BackendError::Refused(f) => {
            client.wbuf.put_slice(f.raw());
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        }
        BackendError::Auth(msg) => {
            tracing::warn!(%user, reason = %msg, "backend login failed");
            fatal(
                client,
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
            )
            .await;
        }
        other => {
            tracing::warn!(error = %other, "cannot connect to the primary");
            fatal(
                client,
                "08006",
                &format!("could not connect to the primary server: {other}"),
            )
            .await;
        }
    }
}

/// Runs a SCRAM-SHA-256 exchange with the client.
async fn scram(
    client: &mut Conn,
    secret: auth::ScramSecret,
    user: &str,
) -> Result<Result<(), AuthError>, End> {
    pauth::encode_sasl_offer(&mut client.wbuf);
    client.flush().await.map_err(|_| End)?;
    let Some(f) = read_password(client).await? else {
        return Err(End);
    };
    let Ok((mech, data)) = pauth::sasl_initial(f.body()) else {
        return Ok(Err(AuthError::MalformedScram));
    };
    let (server, first) = match ScramServer::start(secret, mech, data) {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    pauth::encode_request(pauth::SASL_CONTINUE, first.as_bytes(), &mut client.wbuf);
    client.flush().await.map_err(|_| End)?;
    let Some(f) = read_password(client).await? else {
        return Err(End);
    };
    match server.finish(user, f.body()) {
        Ok(fin) => {
            pauth::encode_request(pauth::SASL_FINAL, fin.as_bytes(), &mut client.wbuf);
            Ok(Ok(()))
        }
        Err(e) => Ok(Err(e)),
    }
}

/// A logged-in client and its backend connections.
struct Session {
    shared: Arc<Shared>,
    client: Conn,
    /// Given back (set to `None`) before a FATAL that ends the session is sent.
    slot: Slot,
    user: String,
    params: Vec<(String, String)>,
    /// The connection to the elected primary; `None` after it was lost while idle (reopened,
    /// to whichever node is primary then, when next needed).
    primary: Option<Backend>,
    standby: Option<Backend>,
    /// Changes of the elected primary and of fences.
    watch: tokio::sync::watch::Receiver<u64>,
    /// Transaction status from the last ReadyForQuery.
    tx: u8,
    /// The open transaction runs on the standby (BEGIN READ ONLY).
    tx_on_standby: bool,
    /// Temporary tables, LISTEN, advisory locks or too many SETs keep the session on the primary.
    pinned: bool,
    /// The session has written (for `disable_load_balance_on_write = always`).
    wrote: bool,
    /// When it last wrote (for read-your-writes).
    last_write: Option<Instant>,
    /// The primary's WAL position after the session's last write (read-your-writes by LSN):
    /// reads go only to standbys that have replayed it.
    write_lsn: Option<u64>,
    /// The request being dispatched wrote: learn the WAL position behind it.
    capture_next: bool,
    stmts: HashMap<String, Stmt>,
    /// Session-level SET statements that hold, in order, applied to each backend before its
    /// next use.
    sets: Vec<String>,
    /// Follows the statements of each request to tell which SETs hold: those that ran outside
    /// a transaction or whose transaction committed, not those rolled back (as PostgreSQL
    /// itself undoes them), nor SET LOCAL.
    settings: Tracker,
    /// Extended-protocol messages waiting for Sync or Flush.
    batch: Vec<Frame>,
    /// Every statement of `batch` surely only reads.
    batch_ok: bool,
    /// The bytes held in `batch`.
    batch_bytes: usize,
    /// The backend holding an unfinished cycle (until ReadyForQuery).
    cur: Option<Which>,
    /// A Query or Sync was sent and its ReadyForQuery has not arrived yet.
    awaiting: bool,
    /// COPY FROM STDIN state of the current request.
    copy: Copy,
    /// What was sent to a standby in this cycle and may still be replayed on the primary.
    replay: Option<Window>,
    /// An emptied window kept for the next cycle, so that the common cycle allocates nothing
    /// (with `batch`, which takes back the emptied message list of the last request).
    spare_window: Window,
    /// Responses held back while a replay is still possible (ParseComplete and the like).
    holdback: Vec<Frame>,
    /// The statements of the Describes sent and not answered yet, in order: each
    /// ParameterDescription answers the first. Only a `set_config` statement's name and Parse are
    /// kept, to learn its parameter types; `None` for the others.
    describing: std::collections::VecDeque<Option<(String, Frame)>>,
    /// More Describes than [`MAX_DESCRIBING`] are in flight: none is queued until the cycle ends.
    describing_full: bool,
    /// A 25006 arrived: swallowing the standby's response until its ReadyForQuery.
    replaying: bool,
    /// What to replay on the primary, once `replay_now`.
    replay_frames: Option<(Vec<Frame>, Mode)>,
    replay_now: bool,
    /// A Sync was queued for the standby (it ends the batch a 25006 interrupted).
    sync_standby: bool,
    cancel: Arc<CancelSlot>,
    /// The backend key now in `cancel`, so the slot's lock is taken only when it changes.
    cancel_key: Option<(i32, i32)>,
    key: (i32, i32),
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

/// What the session needs to know about one statement.
#[derive(Debug, Clone, Copy)]
struct Route {
    /// It may run on a standby (a sure read, or BEGIN READ ONLY).
    standby_ok: bool,
    /// It writes or may write (not a read, not transaction control).
    writes: bool,
    pins: bool,
    /// It changes settings or the transaction (SET, BEGIN/COMMIT/ROLLBACK, savepoints): the
    /// session follows it statement by statement.
    follow: bool,
}

/// Whether `sql` starts with DEALLOCATE or DISCARD.
fn forgets_prepared(sql: &str) -> bool {
    let head = sql.trim_start().as_bytes();
    let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
    starts(b"deallocate") || starts(b"discard")
}

/// The first column of a DataRow as text (`None` when NULL or malformed).
fn first_text_column(body: &[u8]) -> Option<&str> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if n < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(6..6 + len)?).ok()
}

/// How pg_hba.conf messages name the connection's encryption.
fn encryption(encrypted: bool) -> &'static str {
    if encrypted {
        "SSL encryption"
    } else {
        "no encryption"
    }
}

/// Whether an ErrorResponse ends the connection (FATAL or PANIC).
fn is_fatal(f: &Frame) -> bool {
    matches!(perror::field(f.body(), b'S'), Some("FATAL" | "PANIC"))
}

/// Waits for the next change of the elected primary or of fences, handing the receiver back;
/// `None` when the cluster is gone.
fn topology_changed(
    mut rx: tokio::sync::watch::Receiver<u64>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<tokio::sync::watch::Receiver<u64>>> + Send>> {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

/// Reads the next frame of an optional backend; pending forever when there is none.
async fn read_opt(b: &mut Option<Backend>) -> Result<Option<Frame>, BackendError> {
    match b {
        Some(b) => b.conn.read_frame().await,
        None => std::future::pending().await,
    }
}

impl Session {
    fn new(shared: Arc<Shared>, client: Conn, login: Login, slot: Slot) -> Session {
        let watch = shared.cluster.subscribe();
        Session {
            shared,
            client,
            slot,
            user: login.user,
            params: login.params,
            primary: Some(login.primary),
            standby: None,
            watch,
            tx: b'I',
            tx_on_standby: false,
            pinned: false,
            wrote: false,
            last_write: None,
            write_lsn: None,
            capture_next: false,
            stmts: HashMap::new(),
            sets: Vec::new(),
            settings: Tracker::default(),
            batch: Vec::new(),
            batch_ok: true,
            batch_bytes: 0,
            cur: None,
            awaiting: false,
            copy: Copy::Off,
            replay: None,
            spare_window: Window::default(),
            holdback: Vec::new(),
            describing: std::collections::VecDeque::new(),
            describing_full: false,
            replaying: false,
            replay_frames: None,
            replay_now: false,
            sync_standby: false,
            cancel: login.cancel,
            cancel_key: None,
            key: login.key,
        }
    }

    fn route(&self, sql: &str) -> Route {
        let c = self.shared.classifier.classify(sql);
        let begin_ro = matches!(c.tx, TxCommand::Begin { read_only: true });
        let control = !matches!(c.tx, TxCommand::None);
        Route {
            standby_ok: c.target == Target::Standby || begin_ro,
            writes: c.target == Target::Primary && !control && !c.session_set,
            pins: c.pins_session,
            follow: c.session_set || control || c.savepoint,
        }
    }

    async fn run(mut self) {
        let _ = self.relay().await;
        // A request still running when the client left is cancelled, so it does not run on.
        if self.awaiting {
            if let Some(b) = self.cur.and_then(|w| self.backend(w)) {
                let (addr, (pid, key)) = (b.addr, b.key);
                backend::cancel(addr, pid, key, secs(self.shared.config.limits.connect_timeout)).await;
            }
        }
    }

    /// Whether the next buffered client message belongs to the COPY in progress.
    fn copy_accepts_next(&self) -> bool {
        match self.copy {
            Copy::Off => false,
            Copy::In => true,
            Copy::Done => matches!(self.client.rbuf.first(), Some(b'S' | b'H')),
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
        self.cur == Some(Which::Primary) || (self.tx != b'I' && !self.tx_on_standby)
    }

    /// Whether the primary connection goes to a node that is no longer the elected primary.
    fn primary_stale(&self) -> bool {
        let cluster = &self.shared.cluster;
        self.primary
            .as_ref()
            .is_some_and(|b| cluster.is_fenced(b.node) || cluster.elected().is_some_and(|e| e != b.node))
    }

    /// The elected primary changed or a node was fenced: a session whose primary connection is
    /// now stale drops it when idle (and reconnects when next needed); one whose request or
    /// transaction runs there loses it.
    async fn on_topology_change(&mut self) -> Result<(), End> {
        if !self.primary_stale() {
            return Ok(());
        }
        if self.primary_busy() || self.pinned {
            return self.lost_primary().await;
        }
        tracing::info!("primary changed; the session reconnects on its next request");
        self.primary = None;
        Ok(())
    }

    /// The primary connection failed or was fenced while it held the session's request, its
    /// transaction, or state that cannot be rebuilt elsewhere (temporary tables, LISTEN,
    /// advisory locks). An autocommit request gets an ERROR 08006 saying its outcome is unknown and
    /// the session goes on; otherwise the session ends with a FATAL 08006, never a hang.
    async fn lost_primary(&mut self) -> Result<(), End> {
        let metrics = &self.shared.cluster.metrics;
        metrics.error("backend");
        if let Some(b) = self.primary.take() {
            self.shared.cluster.suspect(b.node);
        }
        let autocommit = self.tx == b'I'
            && self.awaiting
            && self.cur == Some(Which::Primary)
            && self.copy == Copy::Off
            && !self.pinned;
        if autocommit {
            perror::encode_error(
                "ERROR",
                "08006",
                "server closed the connection unexpectedly while the request ran; whether it \
                 took effect is unknown (the session goes on, on the primary in place then)",
                &mut self.client.wbuf,
            );
            status::encode_ready(b'I', &mut self.client.wbuf);
            self.awaiting = false;
            self.cur = None;
            self.close_window();
            self.holdback.clear();
            self.settings.abandon();
            *self.cancel.lock().expect("slot poisoned") = None;
            self.cancel_key = None;
            return self.client.flush().await.map_err(|_| End);
        }
        let message = if self.tx != b'I' && !self.tx_on_standby {
            "terminating connection because the primary server was lost during the transaction"
        } else {
            "terminating connection because the primary server was lost and this session's \
             state (temporary tables, LISTEN, advisory locks) cannot be moved"
        };
        self.awaiting = false;
        self.end("08006", message).await;
        Err(End)
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

    async fn relay(&mut self) -> Result<(), End> {
        let idle_limit = secs(self.shared.config.limits.client_idle_timeout);
        let max = self.client.max;
        // The futures that wait for session-wide events live as long as the loop: making and
        // dropping them at every message would register and unregister a waiter (a lock each)
        // or a timer every time.
        let shared = self.shared.clone();
        let mut stop = std::pin::pin!(shared.shutdown.cancelled());
        let mut topology = topology_changed(self.watch.clone());
        // Armed far away while unused; moved to the right deadline when it fires early.
        let mut idle_timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(86400 * 365)));
        let mut idle_since: Option<Instant> = None;
        loop {
            while !self.awaiting || self.copy_accepts_next() {
                match self.client.buffered() {
                    Ok(Some(f)) => self.on_client(f).await?,
                    Ok(None) => break,
                    Err(e) => {
                        let msg = e.to_string();
                        return Err(self.protocol_violation(&msg).await);
                    }
                }
            }
            if self.replay_now {
                self.replay_now = false;
                let (frames, mode) = self.replay_frames.take().unwrap_or_default();
                self.cur = None;
                self.shared.cluster.metrics.decision(Decision::Replay);
                self.dispatch(Which::Primary, frames, mode, true).await?;
                continue;
            }
            let between = !self.awaiting && self.cur.is_none() && self.tx == b'I';
            let idle = between && !idle_limit.is_zero();
            if idle {
                if idle_since.is_none() {
                    let now = Instant::now();
                    idle_since = Some(now);
                    let deadline = idle_timer.deadline().into_std();
                    if deadline < now || deadline > now + idle_limit {
                        idle_timer.as_mut().reset((now + idle_limit).into());
                    }
                }
            } else {
                idle_since = None;
            }
            // Backpressure: a client that pipelines more than one maximal message is not read
            // further until its earlier requests are answered.
            let can_read = self.client.rbuf.len() <= max;
            let has_standby = self.standby.is_some();
            // In a fixed order, sockets first: a wake-up comes from one source, and the ones
            // after it are not polled. None starves another: a backend's answers end, and a
            // client is not read past one maximal message until they do.
            tokio::select! {
                biased;
                r = read_opt(&mut self.standby), if has_standby => self.on_backend(Which::Standby, r).await?,
                r = read_opt(&mut self.primary) => self.on_backend(Which::Primary, r).await?,
                r = self.client.fill(), if can_read => match r {
                    Ok(0) | Err(_) => return Err(End),
                    Ok(_) => {}
                },
                rx = &mut topology => {
                    topology = match rx {
                        Some(rx) => topology_changed(rx),
                        None => Box::pin(std::future::pending()),
                    };
                    self.on_topology_change().await?;
                }
                _ = &mut stop, if between => {
                    self.end("57P01", "terminating connection due to administrator command").await;
                    return Err(End);
                }
                _ = &mut idle_timer, if idle => {
                    let since = idle_since.unwrap_or_else(Instant::now);
                    if since.elapsed() >= idle_limit {
                        self.end("57P05", "terminating connection due to idle-session timeout").await;
                        return Err(End);
                    }
                    idle_timer.as_mut().reset((since + idle_limit).into());
                }
            }
        }
    }

    async fn on_client(&mut self, f: Frame) -> Result<(), End> {
        if self.copy != Copy::Off {
            return self.on_copy(f).await;
        }
        if matches!(f.tag(), b'Q' | b'F') && !self.batch.is_empty() {
            // Sent on ahead of the held batch, it would run before it.
            let what = if f.tag() == b'Q' {
                "simple Query"
            } else {
                "FunctionCall"
            };
            let msg = format!("{what} message in the middle of an extended-protocol batch");
            return Err(self.protocol_violation(&msg).await);
        }
        match f.tag() {
            b'Q' => {
                let sql = match simple::query_text(f.body()) {
                    Ok(s) => s,
                    Err(e) => {
                        let msg = e.to_string();
                        return Err(self.protocol_violation(&msg).await);
                    }
                };
                if let Some(show) = crate::admin::show(sql).filter(|_| self.cur.is_none()) {
                    let lb = self.standby.as_ref().map(|b| b.node);
                    crate::admin::encode_show(show, &self.shared.cluster, lb, &mut self.client.wbuf);
                    status::encode_ready(self.tx, &mut self.client.wbuf);
                    return self.client.flush().await.map_err(|_| End);
                }
                let r = self.route(sql);
                if forgets_prepared(sql) {
                    // DEALLOCATE / DISCARD drop protocol-level statements too; forgetting where
                    // they exist is safe, since a lazy prepare closes any stale copy first.
                    if let Some(b) = self.primary.as_mut() {
                        b.prepared.clear();
                    }
                    if let Some(b) = self.standby.as_mut() {
                        b.prepared.clear();
                    }
                }
                self.note(r);
                let frames = self.alone(f);
                self.dispatch_routed(r.standby_ok, r.writes, frames, Mode::Sync, r.follow)
                    .await
            }
            b'P' => {
                let (name, query) = match extended::parse(f.body()) {
                    Ok(p) => (p.name.to_string(), p.query.to_string()),
                    Err(e) => {
                        let msg = e.to_string();
                        return Err(self.protocol_violation(&msg).await);
                    }
                };
                // Classified once here; every later execution reuses the verdict.
                let r = self.route(&query);
                self.batch_ok &= r.standby_ok;
                self.note(r);
                // One statement per Parse (PostgreSQL refuses more).
                let step = match r.follow.then(|| self.shared.classifier.steps(&query)) {
                    Some(Some(mut steps)) if steps.len() == 1 => steps.pop().unwrap_or(Step::Other),
                    _ => Step::Other,
                };
                let param_types = match step {
                    Step::Set(_) => extended::parse_param_types(f.body()).unwrap_or_default(),
                    _ => Vec::new(),
                };
                self.stmts.insert(
                    name,
                    Stmt {
                        parse: f.clone(),
                        read_only: r.standby_ok,
                        step,
                        param_types,
                    },
                );
                self.push_batch(f).await
            }
            b'B' | b'D' | b'C' => {
                // Borrowed from the frame: no allocation per Bind.
                let named = match f.tag() {
                    b'B' => extended::bind_statement(f.body()).map(Some),
                    t => extended::target(f.body(), if t == b'D' { "Describe" } else { "Close" })
                        .map(|(k, n)| (k == b'S').then_some(n)),
                };
                match named {
                    Ok(Some(name)) if f.tag() == b'C' => {
                        self.stmts.remove(name);
                    }
                    Ok(Some(name)) => {
                        self.batch_ok &= self.stmts.get(name).is_some_and(|s| s.read_only);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        return Err(self.protocol_violation(&msg).await);
                    }
                }
                self.push_batch(f).await
            }
            b'E' => self.push_batch(f).await,
            b'S' | b'H' => {
                self.batch_bytes = 0;
                self.batch.push(f);
                let frames = std::mem::take(&mut self.batch);
                let ok = std::mem::replace(&mut self.batch_ok, true);
                let mode = if frames.last().is_some_and(|f| f.tag() == b'H') {
                    Mode::Flush
                } else {
                    Mode::Sync
                };
                self.dispatch_routed(ok, !ok, frames, mode, true).await
            }
            b'F' => {
                let frames = self.alone(f);
                self.dispatch_routed(false, true, frames, Mode::Sync, true).await
            }
            // Outside COPY, PostgreSQL ignores these too.
            b'd' | b'c' | b'f' => Ok(()),
            b'X' => Err(End),
            t => {
                let msg = format!("invalid frontend message type {t}");
                Err(self.protocol_violation(&msg).await)
            }
        }
    }

    /// A client message while a COPY FROM STDIN is in progress.
    async fn on_copy(&mut self, f: Frame) -> Result<(), End> {
        if !matches!(f.tag(), b'd' | b'c' | b'f' | b'S' | b'H') {
            let msg = format!("unexpected message type 0x{:02X} during COPY from stdin", f.tag());
            return Err(self.protocol_violation(&msg).await);
        }
        // COPY FROM STDIN: data flows straight to the backend running the COPY; the Sync
        // that follows CopyDone in the extended protocol belongs to the same request.
        if matches!(f.tag(), b'c' | b'f') {
            self.copy = Copy::Done;
        }
        let w = self.cur.unwrap_or(Which::Primary);
        let drained = self.client.rbuf.len() < 5;
        let Some(b) = self.backend(w) else {
            return Err(self.backend_gone().await);
        };
        b.conn.wbuf.put_slice(f.raw());
        // Let CopyData accumulate; write once the client's buffer is drained.
        let write = f.tag() != b'd' || b.conn.wbuf.len() > 64 * 1024 || drained;
        if write && b.conn.flush().await.is_err() {
            return Err(self.backend_gone().await);
        }
        Ok(())
    }

    /// Adds an extended-protocol message to the batch waiting for its Sync or Flush. A batch
    /// that outgrows `MAX_BATCH_MESSAGES` or `MAX_BATCH_BYTES` is not held any longer: what it
    /// has goes to the primary now (or to the backend already running this cycle), as if the
    /// client had sent a Flush, and the rest of the batch follows it there. So a client cannot
    /// make dbproxy hold an unbounded batch, and a long JDBC-style batch still runs, unbalanced.
    async fn push_batch(&mut self, f: Frame) -> Result<(), End> {
        self.batch_bytes += f.raw().len();
        self.batch.push(f);
        if self.batch.len() < MAX_BATCH_MESSAGES && self.batch_bytes <= MAX_BATCH_BYTES {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.batch);
        self.batch_ok = true;
        self.batch_bytes = 0;
        self.dispatch_routed(false, true, frames, Mode::Flush, true).await
    }

    /// Session-state effects of a statement the client sent.
    fn note(&mut self, r: Route) {
        if r.pins {
            self.pinned = true;
        }
    }

    /// Chooses a backend for a request and sends it.
    async fn dispatch_routed(
        &mut self,
        standby_ok: bool,
        writes: bool,
        frames: Vec<Frame>,
        mode: Mode,
        follow: bool,
    ) -> Result<(), End> {
        let unreplayed = match self.write_lsn {
            Some(l) if standby_ok && self.cur.is_none() && self.tx == b'I' => !self.some_standby_replayed(l),
            _ => false,
        };
        let routing = &self.shared.config.routing;
        let metrics = &self.shared.cluster.metrics;
        let target = if let Some(c) = self.cur {
            c
        } else if self.tx != b'I' {
            metrics.decision(Decision::PrimaryTransaction);
            if self.tx_on_standby {
                Which::Standby
            } else {
                Which::Primary
            }
        } else if !standby_ok {
            metrics.decision(Decision::PrimaryWrite);
            Which::Primary
        } else if !routing.load_balance
            || self.pinned
            || unreplayed
            || (routing.disable_load_balance_on_write == WriteStickiness::Always && self.wrote)
            || (routing.read_your_writes > 0
                && self
                    .last_write
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(routing.read_your_writes)))
        {
            metrics.decision(Decision::PrimaryPinned);
            Which::Primary
        } else {
            Which::Standby
        };
        if writes && target == Which::Primary {
            self.wrote = true;
            if routing.read_your_writes > 0 {
                self.last_write = Some(Instant::now());
            }
        }
        // A write, or a statement of a transaction that may commit one: learn the WAL position.
        self.capture_next = routing.read_your_writes_by_lsn
            && target == Which::Primary
            && mode == Mode::Sync
            && (writes || self.tx != b'I');
        self.dispatch(target, frames, mode, follow).await
    }

    /// Whether some eligible standby has replayed WAL up to `lsn`; once every eligible one has,
    /// the session stops checking.
    fn some_standby_replayed(&mut self, lsn: u64) -> bool {
        let cluster = &self.shared.cluster;
        let (mut eligible, mut replayed) = (0, 0);
        for i in (0..cluster.nodes.len()).filter(|&i| cluster.eligible(i)) {
            eligible += 1;
            replayed += cluster.replayed(i, lsn) as usize;
        }
        if replayed > 0 && replayed == eligible {
            self.write_lsn = None;
        }
        replayed > 0
    }

    /// Makes sure a usable standby connection exists; false when none can be had.
    async fn ensure_standby(&mut self) -> bool {
        let min_lsn = self.write_lsn;
        if let Some(b) = &self.standby {
            let cluster = &self.shared.cluster;
            if self.tx_on_standby
                || (cluster.eligible(b.node) && min_lsn.is_none_or(|l| cluster.replayed(b.node, l)))
            {
                return true;
            }
            self.standby = None;
        }
        let cluster = self.shared.cluster.clone();
        let Some(i) = cluster.pick_standby(min_lsn) else {
            return false;
        };
        let node = &cluster.nodes[i].config;
        let limits = &self.shared.config.limits;
        let creds = self.shared.users.get(&self.user);
        match backend::connect(
            i,
            &node.host,
            node.port,
            &self.params,
            &self.user,
            creds,
            limits.max_message_size,
            secs(limits.connect_timeout),
        )
        .await
        {
            Ok((b, _greeting)) => {
                self.standby = Some(b);
                true
            }
            Err(e) => {
                cluster.metrics.error("backend");
                tracing::warn!(node = %node.name, error = %e, "cannot open a standby connection");
                false
            }
        }
    }

    /// Sends `frames` to backend `target` (the standby when possible), preparing what it lacks.
    /// `follow`: the request may change settings or the transaction (extended-protocol
    /// batches always are followed; a simple Query when it holds such statements).
    async fn dispatch(
        &mut self,
        mut target: Which,
        frames: Vec<Frame>,
        mode: Mode,
        follow: bool,
    ) -> Result<(), End> {
        if target == Which::Standby && self.cur.is_none() && !self.ensure_standby().await {
            if self.tx_on_standby {
                // The standby holding a transaction is gone.
                return Err(self.backend_gone().await);
            }
            if !self.shared.config.routing.fallback_to_primary {
                perror::encode_error(
                    "ERROR",
                    "08006",
                    "no standby is available for this read",
                    &mut self.client.wbuf,
                );
                if mode == Mode::Sync {
                    status::encode_ready(self.tx, &mut self.client.wbuf);
                }
                return self.client.flush().await.map_err(|_| End);
            }
            self.shared.cluster.metrics.decision(Decision::PrimaryFallback);
            target = Which::Primary;
        } else if target == Which::Standby && self.cur.is_none() && self.tx == b'I' {
            self.shared.cluster.metrics.decision(Decision::Standby);
        }
        let idle = self.tx == b'I' && self.cur.is_none();
        if target == Which::Primary && self.cur.is_none() {
            if self.primary_stale() {
                if self.primary_busy() || self.pinned {
                    return self.lost_primary().await;
                }
                self.primary = None;
            }
            if self.primary.is_none() {
                match connect_primary(&self.shared, &self.params, &self.user, &mut self.watch).await {
                    Ok((b, _greeting)) => self.primary = Some(b),
                    Err(BackendError::Refused(f)) => {
                        self.client.wbuf.put_slice(f.raw());
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
                        return Err(End);
                    }
                    Err(e) => {
                        self.shared.cluster.metrics.error("backend");
                        let msg = format!("could not connect to the primary server: {e}");
                        perror::encode_error("ERROR", "08006", &msg, &mut self.client.wbuf);
                        if mode == Mode::Sync {
                            status::encode_ready(self.tx, &mut self.client.wbuf);
                        }
                        return self.client.flush().await.map_err(|_| End);
                    }
                }
            }
        }
        let (b, other) = match target {
            Which::Primary => match self.primary.as_mut() {
                Some(b) => (b, self.standby.as_mut()),
                None => return Err(self.backend_gone().await),
            },
            Which::Standby => (
                self.standby.as_mut().expect("ensured above"),
                self.primary.as_mut(),
            ),
        };
        let mut other = other;
        let wbuf = &mut b.conn.wbuf;
        if !b.to_close.is_empty() {
            for name in b.to_close.drain(..) {
                extended::encode_close_statement(&name, wbuf);
            }
            extended::encode_sync(wbuf);
            b.swallow_rfq += 1;
        }
        for s in &self.sets[b.sets_applied..] {
            simple::encode_query(s, wbuf);
            b.swallow_rfq += 1;
        }
        b.sets_applied = self.sets.len();
        let settings = &mut self.settings;
        if self.cur.is_none() {
            settings.start(self.tx, follow || settings.needed());
        }
        for f in &frames {
            match f.tag() {
                b'Q' if settings.active() => {
                    let sql = simple::query_text(f.body()).unwrap_or("");
                    settings.query(self.shared.classifier.steps(sql));
                }
                b'E' => settings.execute(extended::execute_portal(f.body()).unwrap_or("")),
                _ => {}
            }
            match f.tag() {
                b'P' => {
                    if let Ok(p) = extended::parse(f.body()) {
                        if p.name.is_empty() {
                            if let Some(o) = other.as_mut() {
                                o.prepared.remove("");
                            }
                        }
                        b.prepared.insert(p.name.to_string());
                    }
                }
                b'B' | b'D' => {
                    let name = if f.tag() == b'B' {
                        extended::bind_statement(f.body()).ok()
                    } else {
                        extended::target(f.body(), "Describe")
                            .ok()
                            .filter(|(k, _)| *k == b'S')
                            .map(|(_, n)| n)
                    };
                    if let Some(name) = name {
                        if let Some(st) = self.stmts.get(name) {
                            if !b.prepared.contains(name) {
                                // Prepared lazily on this backend: close any stale copy, then
                                // replay the client's Parse; both answers are swallowed.
                                if !name.is_empty() {
                                    extended::encode_close_statement(name, wbuf);
                                    b.swallow_close += 1;
                                }
                                wbuf.put_slice(st.parse.raw());
                                b.swallow_parse += 1;
                                b.prepared.insert(name.to_string());
                            }
                        }
                    }
                    if f.tag() == b'B' {
                        if let Ok((portal, stmt)) = extended::bind_names(f.body()) {
                            let step = self.stmts.get(stmt).map_or(Step::Other, |s| s.bound(f.body()));
                            settings.bind(portal, step);
                        }
                    } else if let Some(name) = name {
                        // A Describe of a statement: its ParameterDescription comes back in turn.
                        if self.describing.len() >= MAX_DESCRIBING {
                            self.describing_full = true;
                        }
                        if !self.describing_full {
                            let set = self
                                .stmts
                                .get(name)
                                .filter(|s| matches!(s.step, Step::Set(_)))
                                .map(|s| (name.to_string(), s.parse.clone()));
                            self.describing.push_back(set);
                        }
                    }
                }
                b'C' => {
                    if let Ok((b'S', name)) = extended::target(f.body(), "Close") {
                        b.prepared.remove(name);
                        if let Some(o) = other.as_mut() {
                            if o.prepared.remove(name) {
                                o.to_close.push(name.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
            wbuf.put_slice(f.raw());
        }
        if std::mem::take(&mut self.capture_next) && target == Which::Primary && mode == Mode::Sync {
            simple::encode_query("select pg_current_wal_lsn()::text", wbuf);
            b.capture_lsn += 1;
        }
        let node = b.node;
        if self.cancel_key != Some(b.key) {
            // Left in place after the request ends: a late CancelRequest then reaches a backend
            // with nothing to cancel (PostgreSQL ignores it), as it would without dbproxy.
            *self.cancel.lock().expect("slot poisoned") = Some((b.addr, b.key.0, b.key.1));
            self.cancel_key = Some(b.key);
        }
        let written = b.conn.flush().await;
        self.shared.cluster.count(
            node,
            if target == Which::Standby {
                Role::Standby
            } else {
                Role::Primary
            },
        );
        if self.cur.is_none() {
            self.close_window();
            self.holdback.clear();
        }
        // Outside a transaction, a standby's 25006 is replayed on the primary while nothing
        // executed of the cycle reached the client.
        if target == Which::Standby && (idle || self.replay.is_some()) {
            self.replay
                .get_or_insert_with(|| std::mem::take(&mut self.spare_window))
                .push(frames);
        } else {
            self.close_window();
            self.recycle(frames);
        }
        self.cur = Some(target);
        self.awaiting = mode == Mode::Sync;
        if written.is_err() {
            return Err(self.backend_gone().await);
        }
        Ok(())
    }

    /// Ends the replay window; its emptied buffers are kept for the next cycle.
    fn close_window(&mut self) {
        if let Some(mut w) = self.replay.take() {
            while let Some(h) = w.batches.pop_front() {
                self.recycle(h.frames);
            }
            if w.batches.capacity() <= MAX_SPARE {
                self.spare_window = w;
            }
        }
    }

    /// A message list holding just `f`, made of the batch's emptied list so that a Query or
    /// FunctionCall allocates nothing. Only called with no batch pending.
    fn alone(&mut self, f: Frame) -> Vec<Frame> {
        debug_assert!(self.batch.is_empty());
        let mut frames = std::mem::take(&mut self.batch);
        frames.push(f);
        frames
    }

    /// Keeps an emptied message list as the next batch's, when the batch has none and the list
    /// is small (a long batch's list is freed instead of being held by an idle session).
    fn recycle(&mut self, mut frames: Vec<Frame>) {
        if self.batch.is_empty() && self.batch.capacity() == 0 && frames.capacity() <= MAX_SPARE {
            frames.clear();
            self.batch = frames;
        }
    }

    /// Tells the client its server connection is gone (08006) and ends the session.
    async fn backend_gone(&mut self) -> End {
        self.shared.cluster.metrics.error("backend");
        self.awaiting = false;
        fatal(
            &mut self.client,
            "08006",
            "server closed the connection unexpectedly",
        )
        .await;
        End
    }

    async fn on_backend(&mut self, w: Which, first: Result<Option<Frame>, BackendError>) -> Result<(), End> {
        let mut next = first;
        loop {
            match next {
                Ok(Some(f)) => self.on_backend_frame(w, f),
                Ok(None) | Err(_) => {
                    if w == Which::Primary {
                        if let Some(b) = &self.primary {
                            self.shared.cluster.suspect(b.node);
                        }
                        if self.primary_busy() || self.pinned {
                            return self.lost_primary().await;
                        }
                        // An idle primary connection went away (the node died or restarted):
                        // open one to whichever node is primary when next needed.
                        tracing::info!("idle primary connection lost; reconnecting when next needed");
                        self.primary = None;
                        return self.client.flush().await.map_err(|_| End);
                    }
                    if let Some(b) = &self.standby {
                        self.shared.cluster.suspect(b.node);
                    }
                    if w == Which::Standby && self.cur == Some(Which::Standby) {
                        if self.replay_frames.is_none() {
                            let window = self.replay.take();
                            if window.as_ref().is_some_and(|w| w.batches.is_empty()) {
                                // Everything the standby answered in this cycle was passed on
                                // and nothing was executed: the cycle simply goes on elsewhere
                                // (statements are prepared lazily where the next batch runs).
                                self.standby = None;
                                self.cur = None;
                                return self.client.flush().await.map_err(|_| End);
                            }
                            self.replay_frames = window.and_then(Window::replayable);
                        }
                        if self.replay_frames.is_some() {
                            // The standby went away before any executed answer reached the
                            // client: run the request on the primary instead.
                            tracing::info!("standby connection lost mid-read; replaying on the primary");
                            self.standby = None;
                            self.replaying = false;
                            self.replay_now = true;
                            self.awaiting = true;
                            self.holdback.clear();
                            return Ok(());
                        }
                    }
                    if w == Which::Standby && self.cur != Some(Which::Standby) && !self.tx_on_standby {
                        // An idle standby connection went away: open another when next needed.
                        self.standby = None;
                        return Ok(());
                    }
                    return Err(self.backend_gone().await);
                }
            }
            let Some(b) = self.backend(w) else { break };
            next = match b.conn.buffered() {
                Ok(Some(f)) => Ok(Some(f)),
                Ok(None) => break,
                Err(e) => Err(BackendError::Protocol(e)),
            };
        }
        if std::mem::take(&mut self.sync_standby) {
            if let Some(b) = self.standby.as_mut() {
                // A failed write shows as a failed read next, which replays the request then.
                let _ = b.conn.flush().await;
            }
        }
        self.client.flush().await.map_err(|_| End)
    }

    /// SET statements that now hold, run by backend `w`: remembered for the other connections
    /// (`w` has them already). When the tracker lost track of which hold, the session keeps to
    /// the primary, whose settings are then the session's.
    fn hold_sets(&mut self, w: Which, held: Result<Vec<String>, Lost>) {
        match held {
            // A pinned session never uses another connection again (and ends with its primary
            // connection): nothing to remember.
            Ok(sets) if sets.is_empty() || self.pinned => {}
            Ok(sets) => {
                let before = self.sets.len();
                let applied = self.backend(w).is_some_and(|b| b.sets_applied == before);
                self.sets.extend(sets);
                if self.sets.len() > MAX_SETS {
                    self.pinned = true;
                }
                let n = self.sets.len();
                if let Some(b) = self.backend(w).filter(|_| applied) {
                    b.sets_applied = n;
                }
            }
            Err(Lost) => {
                tracing::warn!(
                    "cannot tell which session settings of a request hold; the session stays on the primary"
                );
                self.pinned = true;
            }
        }
    }

    /// A ParameterDescription answers the first Describe of a statement still unanswered; for
    /// a `set_config` statement (still the one described) its types are kept.
    fn learn_param_types(&mut self, f: &Frame) {
        let Some(Some((name, parse))) = self.describing.pop_front() else {
            return;
        };
        if let Some(st) = self.stmts.get_mut(&name).filter(|s| s.parse == parse) {
            if let Ok(types) = extended::parameter_description(f.body()) {
                st.param_types = types;
            }
        }
    }

    fn on_backend_frame(&mut self, w: Which, f: Frame) {
        let tag = f.tag();
        let in_cycle = self.cur == Some(w);
        if self.backend(w).is_some_and(|b| b.capturing) {
            // The answer to the `pg_current_wal_lsn()` sent behind the client's last write.
            match tag {
                b'D' => {
                    if let Some(lsn) = first_text_column(f.body()).and_then(parse_lsn) {
                        self.write_lsn = Some(self.write_lsn.map_or(lsn, |l| l.max(lsn)));
                    }
                }
                b'Z' => {
                    if let Some(b) = self.backend(w) {
                        b.capturing = false;
                        b.capture_lsn = b.capture_lsn.saturating_sub(1);
                    }
                }
                _ => {}
            }
            return;
        }
        if let Some(b) = self.backend(w) {
            if b.swallow_rfq > 0 {
                match tag {
                    b'Z' => b.swallow_rfq -= 1,
                    b'E' => tracing::warn!(
                        sqlstate = perror::sqlstate(f.body()).unwrap_or(""),
                        "a session setting could not be applied to a backend"
                    ),
                    _ => {}
                }
                return;
            }
            if in_cycle {
                match tag {
                    b'1' if b.swallow_parse > 0 => {
                        b.swallow_parse -= 1;
                        return;
                    }
                    b'3' if b.swallow_close > 0 => {
                        b.swallow_close -= 1;
                        return;
                    }
                    b'E' | b'Z' => {
                        // After an error the rest of the batch is skipped, injected messages included.
                        b.swallow_parse = 0;
                        b.swallow_close = 0;
                    }
                    _ => {}
                }
            }
        }
        match tag {
            _ if !in_cycle => {}
            b't' => self.learn_param_types(&f),
            // An error skips the rest of the batch (its Describes included); a cycle's end
            // leaves none unanswered.
            b'E' | b'Z' => {
                self.describing.clear();
                self.describing_full = false;
            }
            _ => {}
        }
        let shutting_down = || perror::sqlstate(f.body()).is_some_and(|c| c.starts_with("57"));
        if tag == b'E'
            && w == Which::Primary
            && is_fatal(&f)
            && !self.pinned
            && (!self.primary_busy() || (self.tx == b'I' && shutting_down()))
        {
            // The primary is going away (a crash, a shutdown, a terminated backend) while the
            // session does not depend on it: the client never hears of it, the session moves
            // to whichever node is primary at its next request. An autocommit request in flight
            // is answered when the connection ends (see `lost_primary`).
            tracing::info!(
                sqlstate = perror::sqlstate(f.body()).unwrap_or(""),
                "primary connection ended while idle: {}",
                perror::field(f.body(), b'M').unwrap_or("")
            );
            return;
        }
        if !in_cycle {
            // Asynchronous messages outside a request: notifications and notices from the
            // primary reach the client; a standby's are dropped (its state mirrors the primary).
            if w == Which::Primary && matches!(tag, b'A' | b'N' | b'S' | b'E') {
                self.client.wbuf.put_slice(f.raw());
            }
            return;
        }
        if self.replaying {
            if tag == b'Z' {
                self.replaying = false;
                self.replay_now = true;
            }
            return;
        }
        if let Some(window) = self.replay.as_mut() {
            match tag {
                b'1' | b'2' | b't' | b'T' | b'n' | b'3' => {
                    self.holdback.push(f);
                    if window.answered(tag) {
                        // A Flush batch the client waits on is answered in full.
                        for h in self.holdback.drain(..) {
                            self.client.wbuf.put_slice(h.raw());
                        }
                    }
                    return;
                }
                b'E' if perror::sqlstate(f.body()) == Some("25006") => {
                    let window = self.replay.take().unwrap_or_default();
                    if let Some((frames, mode)) = window.replayable() {
                        // Swallow the standby's answers up to its ReadyForQuery, then replay; a
                        // batch ended by Flush gets a Sync to end it. The client's next
                        // messages wait for the replay.
                        if mode == Mode::Flush {
                            if let Some(b) = self.standby.as_mut() {
                                extended::encode_sync(&mut b.conn.wbuf);
                                self.sync_standby = true;
                            }
                        }
                        self.replay_frames = Some((frames, mode));
                        self.replaying = true;
                        self.awaiting = true;
                        self.holdback.clear();
                        return;
                    }
                    for h in self.holdback.drain(..) {
                        self.client.wbuf.put_slice(h.raw());
                    }
                }
                // The standby is shutting down or restarting; its connection ends next, and the
                // request is replayed on the primary then.
                b'E' if w == Which::Standby
                    && matches!(perror::sqlstate(f.body()), Some("57P01" | "57P02" | "57P03")) =>
                {
                    return;
                }
                _ => {
                    for h in self.holdback.drain(..) {
                        self.client.wbuf.put_slice(h.raw());
                    }
                    self.close_window();
                }
            }
        }
        match tag {
            b'C' => {
                let tag = f.body().strip_suffix(b"\0").unwrap_or(f.body());
                let held = self.settings.complete(tag);
                self.hold_sets(w, held);
            }
            b'E' => self.settings.error(),
            b'I' | b's' => self.settings.ended(),
            b'Z' => {
                let s = status::ready_status(f.body()).unwrap_or(b'I');
                let held = self.settings.ready(s);
                self.hold_sets(w, held);
                self.tx = s;
                self.tx_on_standby = w == Which::Standby && s != b'I';
                self.awaiting = false;
                self.cur = None;
                self.copy = Copy::Off;
                if let Some(b) = self.backend(w) {
                    // A WAL-position query sent behind this request answers next.
                    b.capturing = b.capture_lsn > 0;
                }
            }
            b'G' => self.copy = Copy::In,
            _ => {}
        }
        self.client.wbuf.put_slice(f.raw());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = bytes::BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        Frame::from_raw(b.freeze())
    }
    fn parse() -> Frame {
        frame(b'P', b"\0select f()\0\0\0")
    }
    fn bind(portal: &str) -> Frame {
        frame(b'B', format!("{portal}\0\0\0\0\0\0\0\0").as_bytes())
    }
    fn execute(portal: &str) -> Frame {
        frame(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }
    fn describe() -> Frame {
        frame(b'D', b"S\0")
    }
    fn flush() -> Frame {
        frame(b'H', b"")
    }
    fn sync() -> Frame {
        frame(b'S', b"")
    }
    fn tags(r: Option<(Vec<Frame>, Mode)>) -> Option<(Vec<u8>, Mode)> {
        r.map(|(f, m)| (f.iter().map(Frame::tag).collect(), m))
    }

    #[test]
    fn parameter_values_as_sql_text() {
        let text = |f, oid, v: &[u8]| param_text(f, oid, v).map(|c| c.into_owned());
        assert_eq!(text(0, 0, b"abc").as_deref(), Some("abc"));
        assert_eq!(
            text(0, 23, b"12").as_deref(),
            Some("12"),
            "text format whatever the type"
        );
        assert_eq!(text(0, 0, b"\xff"), None, "not UTF-8");
        assert_eq!(text(1, 25, b"abc").as_deref(), Some("abc"));
        assert_eq!(text(1, 16, &[1]).as_deref(), Some("true"));
        assert_eq!(text(1, 16, &[0]).as_deref(), Some("false"));
        assert_eq!(text(1, 16, &[2]), None);
        assert_eq!(text(1, 21, &(-7i16).to_be_bytes()).as_deref(), Some("-7"));
        assert_eq!(text(1, 23, &70000i32.to_be_bytes()).as_deref(), Some("70000"));
        assert_eq!(
            text(1, 20, &(1i64 << 40).to_be_bytes()).as_deref(),
            Some("1099511627776")
        );
        assert_eq!(text(1, 23, &[0, 1]), None, "wrong length");
        assert_eq!(text(1, 0, b"abc"), None, "binary of an unknown type");
        assert_eq!(text(1, 1700, b"abc"), None, "binary numeric");
    }

    #[test]
    fn a_sync_batch_is_replayed_whole() {
        let mut w = Window::default();
        w.push(vec![parse(), bind(""), execute(""), sync()]);
        assert!(!w.answered(b'1'));
        assert!(!w.answered(b'2'));
        assert_eq!(tags(w.replayable()), Some((b"PBES".to_vec(), Mode::Sync)));
    }

    #[test]
    fn a_flush_batch_without_execute_is_passed_on_when_answered() {
        let mut w = Window::default();
        w.push(vec![parse(), describe(), flush()]);
        w.push(vec![bind(""), execute(""), sync()]);
        assert!(!w.answered(b'1'));
        assert!(
            !w.answered(b't'),
            "ParameterDescription is followed by the row description"
        );
        assert!(
            w.answered(b'T'),
            "Parse and Describe answered: the client waits for them"
        );
        assert!(!w.answered(b'2'), "a batch with an Execute waits for its result");
        assert_eq!(tags(w.replayable()), Some((b"BES".to_vec(), Mode::Sync)));
    }

    #[test]
    fn a_flush_batch_with_execute_is_replayed_with_flush() {
        let mut w = Window::default();
        w.push(vec![parse(), bind(""), execute(""), flush()]);
        assert_eq!(tags(w.replayable()), Some((b"PBEH".to_vec(), Mode::Flush)));
        let mut w = Window::default();
        w.push(vec![flush()]);
        assert!(w.batches.is_empty(), "nothing to wait for");
    }

    #[test]
    fn a_portal_bound_in_a_batch_passed_on_cannot_be_replayed() {
        let mut w = Window::default();
        w.push(vec![parse(), bind("p"), flush()]);
        assert!(!w.answered(b'1'));
        assert!(w.answered(b'2'));
        w.push(vec![execute("p"), sync()]);
        assert_eq!(tags(w.replayable()), None);
        let mut w = Window::default();
        w.push(vec![bind("p"), execute("q"), sync()]);
        assert_eq!(tags(w.replayable()), None);
    }
}

//! The HTTP routes: the front page, its JSON twin, health and readiness, metrics, the dashboard with
//! its event stream, the operator login, and the switchover call.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{DefaultBodyLimit, Form, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::dashboard::{valid_node_id, Dashboard};
use crate::db::Db;
use crate::metrics::Metrics;
use crate::operator::{Login, Operator, Refusal};
use crate::render::{self, OperatorView};

/// The largest request body read (the login form is the only one).
const MAX_BODY: usize = 16 * 1024;

/// What every handler shares.
pub struct AppState {
    /// The name shown as "served by".
    pub instance: String,
    /// How many samples of history per host.
    pub history: u32,
    /// The database.
    pub db: Db,
    /// The dashboard's fetcher.
    pub dashboard: Arc<Dashboard>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The operator login that guards the switchover.
    pub operator: Operator,
    /// Fires on shutdown; ends the event streams so the server can drain.
    pub shutdown: CancellationToken,
}

type St = State<Arc<AppState>>;

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/overview", get(api_overview))
        .route("/api/info", get(api_info))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/state", get(dashboard_state))
        .route("/dashboard/events", get(dashboard_events))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/switchover/{id}", post(switchover))
        .route("/static/style.css", get(style))
        .route("/static/dashboard.js", get(script))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts every request by its route pattern (bounded cardinality) and status, and times it.
async fn track(State(st): St, req: Request, next: Next) -> Response {
    // MatchedPath is a shared string: cloning it does not allocate.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    st.metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    st.metrics
        .requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

fn unavailable_html(st: &AppState, reason: &str) -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(render::unavailable(&st.instance, reason)),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

async fn index(State(st): St) -> Response {
    match st.db.overview(st.history).await {
        Ok(o) => Html(render::index(&st.instance, &o)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "front page without database");
            unavailable_html(&st, &e.to_string())
        }
    }
}

async fn api_overview(State(st): St) -> Response {
    match st.db.overview(st.history).await {
        Ok(o) => Json(serde_json::json!({
            "instance": st.instance,
            "node": o.node,
            "hosts": o.hosts,
        }))
        .into_response(),
        Err(e) => {
            let mut resp = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "instance": st.instance,
                    "error": "database unavailable",
                    "detail": e.to_string(),
                })),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
    }
}

async fn api_info(State(st): St) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "instance": st.instance,
        "version": env!("CARGO_PKG_VERSION"),
        "migrations": st.db.migrations(),
        "switchover": st.dashboard.switchover_enabled(),
    }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): St) -> Response {
    match st.db.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn metrics(State(st): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        common::admin::render_metrics(&st.metrics.registry),
    )
        .into_response()
}

async fn dashboard(State(st): St, headers: HeaderMap) -> Response {
    let snapshot = st.dashboard.current().await;
    let csrf = st.operator.session(&headers, SystemTime::now());
    let view = match &csrf {
        _ if !st.dashboard.switchover_enabled() => OperatorView::ReadOnly,
        Some(token) => OperatorView::LoggedIn(token),
        None => OperatorView::LoggedOut,
    };
    let mut resp = Html(render::dashboard(&st.instance, &snapshot, view)).into_response();
    // A logged-in page carries a CSRF token: no cache may keep it.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The login form's fields.
#[derive(serde::Deserialize)]
struct LoginForm {
    #[serde(default)]
    password: String,
}

/// The logout form's fields.
#[derive(serde::Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

fn login_response(st: &AppState, code: StatusCode, problem: Option<&str>) -> Response {
    let mut resp = (code, Html(render::login(&st.instance, problem))).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn login_page(State(st): St) -> Response {
    if !st.dashboard.switchover_enabled() {
        return not_found(State(st)).await;
    }
    login_response(&st, StatusCode::OK, None)
}

async fn login(State(st): St, Form(form): Form<LoginForm>) -> Response {
    if !st.dashboard.switchover_enabled() {
        return not_found(State(st)).await;
    }
    match st
        .operator
        .login(&form.password, Instant::now(), SystemTime::now())
    {
        Login::Accepted(cookie) => {
            tracing::info!("operator logged in");
            st.metrics.logins.with_label_values(&["accepted"]).inc();
            let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Login::Refused => {
            tracing::warn!("operator login refused: wrong password");
            st.metrics.logins.with_label_values(&["refused"]).inc();
            login_response(&st, StatusCode::UNAUTHORIZED, Some("wrong password"))
        }
        Login::Limited(wait) => {
            tracing::warn!("operator login refused: too many failed logins");
            st.metrics.logins.with_label_values(&["limited"]).inc();
            let secs = wait.as_secs().max(1);
            let mut resp = login_response(
                &st,
                StatusCode::TOO_MANY_REQUESTS,
                Some(&format!("too many failed logins: try again in {secs} s")),
            );
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
        Login::Disabled => not_found(State(st)).await,
    }
}

async fn logout(State(st): St, headers: HeaderMap, Form(form): Form<LogoutForm>) -> Response {
    if let Err(e) = st
        .operator
        .authorize(&headers, Some(&form.csrf), SystemTime::now())
    {
        return (StatusCode::FORBIDDEN, format!("{e}\n")).into_response();
    }
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&st.operator.clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn dashboard_state(State(st): St) -> Response {
    let snapshot = st.dashboard.current().await;
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        snapshot.to_string(),
    )
        .into_response()
}

async fn dashboard_events(State(st): St) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = st.dashboard.subscribe();
    let shutdown = st.shutdown.clone();
    // The first item is the snapshot at hand (if any); later ones follow each fetch. The stream ends
    // on shutdown so a graceful drain is not held up by open dashboards.
    let stream = futures_util::stream::unfold((rx, shutdown, true), |(mut rx, shutdown, first)| async move {
        loop {
            if !first || rx.borrow().is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    changed = rx.changed() => if changed.is_err() { return None },
                }
            }
            let snapshot = rx.borrow_and_update().clone();
            if snapshot.is_empty() {
                continue;
            }
            let event = Event::default().event("snapshot").data(&*snapshot);
            return Some((Ok(event), (rx, shutdown, false)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn switchover(State(st): St, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let fail =
        |code: StatusCode, msg: &str| (code, Json(serde_json::json!({ "error": msg }))).into_response();
    if !st.dashboard.switchover_enabled() {
        return fail(StatusCode::NOT_FOUND, "switchover is not configured");
    }
    // The session cookie is SameSite=Strict and the CSRF token is readable only by the
    // dashboard's own page, so neither `curl` without the password nor a page on another site
    // gets past this.
    match st.operator.authorize(&headers, None, SystemTime::now()) {
        Ok(()) => {}
        Err(e @ Refusal::NoSession) => return fail(StatusCode::UNAUTHORIZED, &e.to_string()),
        Err(e) => return fail(StatusCode::FORBIDDEN, &e.to_string()),
    }
    if !valid_node_id(&id) {
        return fail(StatusCode::BAD_REQUEST, "bad node id");
    }
    tracing::info!(node = %id, "switchover requested from the dashboard");
    match st.dashboard.switchover(&id).await {
        Ok((code, body)) => {
            let text = String::from_utf8_lossy(&body);
            let answer: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text.into_owned()));
            // dbproxy's refusal of the request itself (no such node, not a healthy standby,
            // already the primary) is passed on as it is; its own failure is a bad gateway.
            let status = if code.is_success() {
                StatusCode::OK
            } else if code.is_client_error() {
                code
            } else {
                StatusCode::BAD_GATEWAY
            };
            (
                status,
                Json(serde_json::json!({ "node": id, "dbproxy_status": code.as_u16(), "answer": answer })),
            )
                .into_response()
        }
        Err(e) => fail(StatusCode::BAD_GATEWAY, &format!("dbproxy admin: {e}")),
    }
}

async fn style() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/css; charset=utf-8"),
        )],
        render::STYLE_CSS,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        render::DASHBOARD_JS,
    )
        .into_response()
}

async fn not_found(State(st): St) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(render::message(
            &st.instance,
            "not found",
            "there is no such page",
        )),
    )
        .into_response()
}

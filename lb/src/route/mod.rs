//! Request routing like nginx's `server` and `location`: the virtual server chosen by listen
//! address and Host, the location chosen in nginx's order (`=`, longest prefix, `^~`, regular
//! expressions in order, else the longest prefix), `rewrite` and `return`, and the URI sent
//! upstream when `proxy_pass` has a URI part. Pure: no I/O, no clocks; the fast path and the
//! hyper path both ask [`Router::route`], so they cannot disagree.

use std::borrow::Cow;
use std::net::SocketAddr;

use regex::Regex;

use crate::config::{
    Config, LocationConfig, LocationMatch, ReturnConfig, RewriteConfig, RewriteFlag, VhostConfig,
};

/// How many times a request may choose its location again after rewrites (nginx's limit).
const MAX_CYCLES: usize = 10;

/// A routing table that does not build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct RouteError {
    /// The config key, e.g. `vhosts[0].locations[2].path`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn err(key: String, message: impl Into<String>) -> RouteError {
    RouteError {
        key,
        message: message.into(),
    }
}

/// What a request is to get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Proxy to upstream group `upstream` (0 is the main `upstream`, then `upstreams` in order);
    /// `uri` is the target to send, `None` for the client's own unchanged.
    Proxy {
        /// The group's index.
        upstream: usize,
        /// The rewritten request target (path and query), if any.
        uri: Option<String>,
        /// The group speaks HTTP/2 without TLS (h2c; nginx `grpc_pass`).
        grpc: bool,
    },
    /// Serve the first of `candidates` (file-system paths; one ending in `/` means its
    /// `index.html`) that exists, else `fallback`; `uri` is for the redirect of a directory
    /// asked without its slash.
    Files {
        /// Paths to try, in order.
        candidates: Vec<String>,
        /// When none exists.
        fallback: Fallback,
        /// Whether a directory asked without a slash is redirected (no `try_files`).
        redirect_dirs: bool,
        /// The request's absolute URL with a slash added, for that redirect.
        slash_location: String,
    },
    /// Answer directly.
    Respond {
        /// The status.
        status: u16,
        /// The `Location` of a redirect.
        location: Option<String>,
        /// The body (for redirects, a short page as nginx sends).
        body: String,
    },
}

impl Route {
    fn respond(status: u16, body: &str) -> Route {
        Route::Respond {
            status,
            location: None,
            body: body.to_string(),
        }
    }
}

/// The request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The configured address of the listener the connection came in on.
    pub listen: SocketAddr,
    /// The port the connection came in on (for absolute redirects).
    pub port: u16,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The Host header (or `:authority`), as sent; empty when absent.
    pub host: &'a str,
    /// The request target's path, as sent.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
}

#[cfg(test)]
mod tests;
mod text;

pub use text::normalize;
use text::{escape_into, template, Piece, Vars};

#[derive(Debug)]
struct Return {
    status: u16,
    text: Vec<Piece>,
}

#[derive(Debug)]
struct Rewrite {
    regex: Regex,
    replacement: Vec<Piece>,
    /// The replacement starts with `http://`, `https://` or `$scheme`.
    redirect: bool,
    flag: RewriteFlag,
}

/// A rewrite-phase directive, run in order.
#[derive(Debug)]
enum Step {
    Rewrite(Rewrite),
    Return(Return),
}

#[derive(Debug)]
enum Target {
    Proxy {
        upstream: usize,
        uri: Option<String>,
        grpc: bool,
    },
    /// Files under `dir` (`root`: plus the URI; `alias`: plus the URI after the prefix).
    Files {
        dir: String,
        alias: bool,
        /// `try_files` entries before the last; empty means the URI itself.
        tries: Vec<Vec<Piece>>,
        fallback: Fallback,
    },
    /// Nothing to serve (no `proxy_pass`, `return` or `root`): 404, as nginx without files.
    Nothing,
}

/// What a file location answers when no file exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// This status.
    Status(u16),
    /// This file (a path already under the location's directory), e.g. an SPA's index.html.
    File(String),
}

#[derive(Debug)]
struct Location {
    kind: LocationMatch,
    path: String,
    regex: Option<Regex>,
    steps: Vec<Step>,
    target: Target,
}

#[derive(Debug)]
struct Vhost {
    listen: Vec<SocketAddr>,
    exact: Vec<String>,
    /// `*.example.com` and `.example.com` as `.example.com`.
    front: Vec<String>,
    /// `mail.*` as `mail.`.
    back: Vec<String>,
    regexes: Vec<Regex>,
    default_server: bool,
    steps: Vec<Step>,
    locations: Vec<Location>,
}

/// The compiled routing table.
#[derive(Debug, Default)]
pub struct Router {
    vhosts: Vec<Vhost>,
    /// No routing at all: every request goes to the main upstream unchanged.
    trivial: bool,
}

fn compile(key: &str, pattern: &str, caseless: bool) -> Result<Regex, RouteError> {
    regex::RegexBuilder::new(pattern)
        .case_insensitive(caseless)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| err(key.to_string(), format!("bad regular expression: {e}")))
}

fn compile_return(key: &str, r: &ReturnConfig) -> Result<Return, RouteError> {
    if !(200..=599).contains(&r.status) {
        return Err(err(format!("{key}.status"), "must be between 200 and 599"));
    }
    if is_redirect(r.status) && r.text.is_empty() {
        return Err(err(format!("{key}.text"), "a redirect needs a URL"));
    }
    Ok(Return {
        status: r.status,
        text: template(&r.text).map_err(|m| err(format!("{key}.text"), m))?,
    })
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

fn compile_steps(
    key: &str,
    rewrites: &[RewriteConfig],
    ret: Option<&ReturnConfig>,
) -> Result<Vec<Step>, RouteError> {
    let mut steps = Vec::new();
    for (i, r) in rewrites.iter().enumerate() {
        let k = format!("{key}.rewrites[{i}]");
        let redirect = ["http://", "https://", "$scheme"]
            .iter()
            .any(|p| r.replacement.starts_with(p));
        steps.push(Step::Rewrite(Rewrite {
            regex: compile(&format!("{k}.regex"), &r.regex, false)?,
            replacement: template(&r.replacement).map_err(|m| err(format!("{k}.replacement"), m))?,
            redirect,
            flag: r.flag,
        }));
    }
    if let Some(r) = ret {
        steps.push(Step::Return(compile_return(&format!("{key}.return"), r)?));
    }
    Ok(steps)
}

/// Splits `http://NAME[/uri]` into the group index and the URI part; `grpc://NAME` (no URI
/// part, as nginx's `grpc_pass`) names a group spoken to in HTTP/2 cleartext.
fn proxy_target(key: &str, text: &str, groups: &[&str]) -> Result<(usize, Option<String>, bool), RouteError> {
    let (rest, grpc) = match (text.strip_prefix("http://"), text.strip_prefix("grpc://")) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => return Err(err(key.to_string(), "must start with http:// or grpc://")),
    };
    let (name, uri) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_string())),
        None => (rest, None),
    };
    if grpc && uri.is_some() {
        return Err(err(
            key.to_string(),
            "grpc:// takes no URI part (as nginx's grpc_pass)",
        ));
    }
    if uri.as_deref().is_some_and(|u| u.contains('$')) {
        return Err(err(
            key.to_string(),
            "variables in the URI part are not supported",
        ));
    }
    let idx = groups
        .iter()
        .position(|g| *g == name)
        .ok_or_else(|| err(key.to_string(), format!("no upstream named `{name}`")))?;
    Ok((idx, uri, grpc))
}

fn compile_location(
    key: &str,
    l: &LocationConfig,
    groups: &[&str],
    server_root: &str,
) -> Result<Location, RouteError> {
    let regex = match l.match_ {
        LocationMatch::Regex => Some(compile(&format!("{key}.path"), &l.path, false)?),
        LocationMatch::RegexCaseless => Some(compile(&format!("{key}.path"), &l.path, true)?),
        _ => {
            if !l.path.starts_with('/') {
                return Err(err(format!("{key}.path"), "must start with /"));
            }
            None
        }
    };
    let target = if l.proxy_pass.is_empty() {
        let root = if l.root.is_empty() { server_root } else { &l.root };
        if !l.alias.is_empty() && (regex.is_some() || !l.root.is_empty()) {
            return Err(err(
                format!("{key}.alias"),
                "only in a prefix location, and not with `root`",
            ));
        }
        let (dir, alias) = if l.alias.is_empty() {
            (root, false)
        } else {
            (l.alias.as_str(), true)
        };
        if dir.is_empty() {
            if !l.try_files.is_empty() {
                return Err(err(format!("{key}.try_files"), "needs `root` or `alias`"));
            }
            Target::Nothing
        } else {
            let (tries, fallback) =
                match l.try_files.as_slice() {
                    [] => (Vec::new(), Fallback::Status(404)),
                    [_] => return Err(err(format!("{key}.try_files"), "needs at least two entries")),
                    [tries @ .., last] => {
                        let tries = tries
                            .iter()
                            .map(|t| template(t).map_err(|m| err(format!("{key}.try_files"), m)))
                            .collect::<Result<Vec<_>, _>>()?;
                        let fallback =
                            match last.strip_prefix('=') {
                                Some(code) => Fallback::Status(
                                    code.parse().ok().filter(|c| (200..=599).contains(c)).ok_or_else(
                                        || err(format!("{key}.try_files"), format!("`{last}` is not =CODE")),
                                    )?,
                                ),
                                None if last.starts_with('/') && !last.contains('$') => {
                                    Fallback::File(format!("{}{last}", dir.trim_end_matches('/')))
                                }
                                None => {
                                    return Err(err(
                                        format!("{key}.try_files"),
                                        "the last entry must be =CODE or a plain /path",
                                    ))
                                }
                            };
                        (tries, fallback)
                    }
                };
            Target::Files {
                dir: dir.to_string(),
                alias,
                tries,
                fallback,
            }
        }
    } else {
        if !l.root.is_empty() || !l.alias.is_empty() || !l.try_files.is_empty() {
            return Err(err(
                format!("{key}.proxy_pass"),
                "a location either proxies or serves files (root, alias, try_files)",
            ));
        }
        let (upstream, uri, grpc) = proxy_target(&format!("{key}.proxy_pass"), &l.proxy_pass, groups)?;
        if uri.is_some() && regex.is_some() {
            return Err(err(
                format!("{key}.proxy_pass"),
                "cannot have a URI part in a regular-expression location (as in nginx)",
            ));
        }
        Target::Proxy { upstream, uri, grpc }
    };
    Ok(Location {
        kind: l.match_,
        path: l.path.clone(),
        regex,
        steps: compile_steps(key, &l.rewrites, l.return_.as_ref())?,
        target,
    })
}

fn parse_listen(key: &str, a: &str) -> Result<SocketAddr, RouteError> {
    a.parse()
        .map_err(|_| err(key.to_string(), format!("`{a}` is not an address:port")))
}

fn compile_vhost(
    key: &str,
    v: &VhostConfig,
    main_listen: SocketAddr,
    groups: &[&str],
) -> Result<Vhost, RouteError> {
    let main = main_listen.to_string();
    let mut listen = Vec::new();
    for (i, a) in v.plain_listen(&main).into_iter().enumerate() {
        listen.push(parse_listen(&format!("{key}.listen[{i}]"), a)?);
    }
    for (i, a) in v.tls.iter().flat_map(|t| &t.listen).enumerate() {
        listen.push(parse_listen(&format!("{key}.tls.listen[{i}]"), a)?);
    }
    let mut vh = Vhost {
        listen,
        exact: Vec::new(),
        front: Vec::new(),
        back: Vec::new(),
        regexes: Vec::new(),
        default_server: v.default_server,
        steps: compile_steps(key, &v.rewrites, v.return_.as_ref())?,
        locations: Vec::new(),
    };
    for (i, n) in v.names.iter().enumerate() {
        let k = format!("{key}.names[{i}]");
        if let Some(re) = n.strip_prefix('~') {
            vh.regexes.push(compile(&k, re, true)?);
            continue;
        }
        let n = n.to_ascii_lowercase();
        if let Some(rest) = n.strip_prefix("*.") {
            vh.front.push(format!(".{rest}"));
        } else if let Some(rest) = n.strip_prefix('.') {
            vh.exact.push(rest.to_string());
            vh.front.push(n.clone());
        } else if let Some(rest) = n.strip_suffix(".*") {
            vh.back.push(format!("{rest}."));
        } else if n.contains('*') {
            return Err(err(k, "a wildcard may only start or end a name"));
        } else {
            vh.exact.push(n);
        }
    }
    for (i, l) in v.locations.iter().enumerate() {
        vh.locations.push(compile_location(
            &format!("{key}.locations[{i}]"),
            l,
            groups,
            &v.root,
        )?);
    }
    Ok(vh)
}

/// What running rewrite-phase steps ended with.
enum StepEnd {
    /// All ran; go on.
    Done,
    /// `break`: stop rewriting, stay.
    Break,
    /// `last`: choose the location again.
    Last,
    /// Answer this.
    Respond(Route),
}

impl Router {
    /// Compiles the routing table of `config` (regular expressions, variables, upstream names).
    pub fn build(config: &Config) -> Result<Router, RouteError> {
        let main_listen = parse_listen("listen", &config.listen)?;
        let mut groups = vec![config.upstream.name.as_str()];
        groups.extend(config.upstreams.iter().map(|u| u.name.as_str()));
        let mut vhosts = Vec::new();
        for (i, v) in config.vhosts.iter().enumerate() {
            vhosts.push(compile_vhost(&format!("vhosts[{i}]"), v, main_listen, &groups)?);
        }
        let trivial = match vhosts.as_slice() {
            [] => true,
            [v] => {
                v.steps.is_empty()
                    && v.regexes.is_empty()
                    && matches!(v.locations.as_slice(), [l] if l.kind == LocationMatch::Prefix
                    && l.path == "/" && l.steps.is_empty()
                    && matches!(
                        l.target,
                        Target::Proxy {
                            upstream: 0,
                            uri: None,
                            grpc: false
                        }
                    ))
            }
            _ => false,
        };
        Ok(Router { vhosts, trivial })
    }

    /// Whether every request goes to the main upstream unchanged.
    pub fn is_trivial(&self) -> bool {
        self.trivial
    }

    /// The virtual server for a listener and a Host (already lower-case, without port).
    fn vhost(&self, listen: SocketAddr, host: &str) -> Option<&Vhost> {
        self.vhost_index(listen, host).map(|i| &self.vhosts[i])
    }

    /// The index in `vhosts` of the virtual server for a listener and a host name (a Host
    /// header or a TLS server name): exact name, longest `*.` wildcard, longest `.*` wildcard,
    /// first regex, then the address's `default_server` or first server, as nginx chooses.
    pub fn vhost_index(&self, listen: SocketAddr, host: &str) -> Option<usize> {
        let on = || {
            self.vhosts
                .iter()
                .enumerate()
                .filter(move |(_, v)| v.listen.contains(&listen))
        };
        if let Some((i, _)) = on().find(|(_, v)| v.exact.iter().any(|n| n == host)) {
            return Some(i);
        }
        let longest = |names: fn(&Vhost) -> &[String], fits: fn(&str, &str) -> bool| {
            on().filter_map(|(i, v)| {
                names(v)
                    .iter()
                    .filter(|n| fits(host, n))
                    .map(|n| n.len())
                    .max()
                    .map(|len| (len, i))
            })
            .fold(None::<(usize, usize)>, |best, (len, i)| match best {
                Some((b, _)) if b >= len => best,
                _ => Some((len, i)),
            })
            .map(|(_, i)| i)
        };
        if let Some(i) = longest(|v| &v.front, |h, n| h.ends_with(n)) {
            return Some(i);
        }
        if let Some(i) = longest(|v| &v.back, |h, n| h.starts_with(n)) {
            return Some(i);
        }
        if let Some((i, _)) = on().find(|(_, v)| v.regexes.iter().any(|r| r.is_match(host))) {
            return Some(i);
        }
        on().find(|(_, v)| v.default_server)
            .or_else(|| on().next())
            .map(|(i, _)| i)
    }

    /// Decides what a request gets.
    pub fn route(&self, req: &RouteRequest<'_>) -> Route {
        if self.trivial {
            return Route::Proxy {
                upstream: 0,
                uri: None,
                grpc: false,
            };
        }
        let host = host_name(req.host);
        let Some(vh) = self.vhost(req.listen, &host) else {
            return Route::respond(404, "not found\n");
        };
        let Some(mut uri) = normalize(req.path) else {
            return Route::respond(400, "bad request\n");
        };
        let mut args: Option<Cow<'_, str>> = req.query.map(Cow::Borrowed);
        let mut changed = false;
        let mut caps: Vec<String> = Vec::new();
        match run_steps(
            &vh.steps,
            req,
            &host,
            &mut uri,
            &mut args,
            &mut changed,
            &mut caps,
        ) {
            StepEnd::Respond(r) => return r,
            StepEnd::Done | StepEnd::Break | StepEnd::Last => {}
        }
        for _ in 0..MAX_CYCLES {
            let loc = match find_location(vh, &uri, &mut caps) {
                Found::Location(l) => l,
                Found::AddSlash => {
                    return redirect(301, absolute(req, &host, with_slash(&uri, args.as_deref())));
                }
                Found::None => return Route::respond(404, "not found\n"),
            };
            let before = changed;
            let mut changed_here = false;
            let end = run_steps(
                &loc.steps,
                req,
                &host,
                &mut uri,
                &mut args,
                &mut changed_here,
                &mut caps,
            );
            changed = before || changed_here;
            match end {
                StepEnd::Respond(r) => return r,
                StepEnd::Last => continue,
                StepEnd::Done if changed_here => continue,
                StepEnd::Done | StepEnd::Break => {}
            }
            return match &loc.target {
                Target::Nothing => Route::respond(404, "not found\n"),
                Target::Files {
                    dir,
                    alias,
                    tries,
                    fallback,
                } => {
                    let rest = |u: &str| -> String {
                        let tail = if *alias {
                            u.get(loc.path.len()..).unwrap_or("")
                        } else {
                            u
                        };
                        format!(
                            "{}{tail}",
                            if *alias {
                                dir.as_str()
                            } else {
                                dir.trim_end_matches('/')
                            }
                        )
                    };
                    let candidates = if tries.is_empty() {
                        vec![rest(&uri)]
                    } else {
                        tries
                            .iter()
                            .map(|t| {
                                let mut u = String::new();
                                Vars {
                                    req,
                                    host: &host,
                                    uri: &uri,
                                    args: args.as_deref(),
                                    caps: &caps,
                                }
                                .expand(t, false, &mut u);
                                rest(&u)
                            })
                            .collect()
                    };
                    let slash = with_slash(&uri, args.as_deref());
                    Route::Files {
                        candidates,
                        fallback: fallback.clone(),
                        redirect_dirs: tries.is_empty(),
                        slash_location: absolute(req, &host, slash),
                    }
                }
                Target::Proxy {
                    upstream,
                    uri: part,
                    grpc,
                } => {
                    // A `break` that changed the URI here sends it whole; otherwise the URI part
                    // replaces the matched prefix of the current URI (also after `last`).
                    let target = match part {
                        Some(part) if !changed_here => {
                            let rest = uri.get(loc.path.len()..).unwrap_or("");
                            let mut t = String::with_capacity(part.len() + rest.len() + 16);
                            t.push_str(part);
                            escape_into(rest, &mut t);
                            Some(t)
                        }
                        _ if changed => {
                            let mut t = String::with_capacity(uri.len() + 16);
                            escape_into(&uri, &mut t);
                            Some(t)
                        }
                        _ => None,
                    };
                    let target = target.map(|mut t| {
                        if let Some(a) = &args {
                            t.push('?');
                            t.push_str(a);
                        }
                        t
                    });
                    Route::Proxy {
                        upstream: *upstream,
                        uri: target,
                        grpc: *grpc,
                    }
                }
            };
        }
        tracing::warn!(path = req.path, "rewrite cycle: more than 10 location changes");
        Route::respond(500, "rewrite cycle\n")
    }
}

/// The Host's name: lower-case, without port or trailing dot.
pub fn host_name(host: &str) -> Cow<'_, str> {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// The URI with a slash added, escaped, with its arguments: where nginx redirects a directory.
fn with_slash(uri: &str, args: Option<&str>) -> String {
    let mut target = String::with_capacity(uri.len() + 2);
    escape_into(uri, &mut target);
    target.push('/');
    if let Some(a) = args {
        target.push('?');
        target.push_str(a);
    }
    target
}

/// A relative redirect target made absolute as nginx does (`absolute_redirect`, `port_in_redirect`).
fn absolute(req: &RouteRequest<'_>, host: &str, target: String) -> String {
    if !target.starts_with('/') {
        return target;
    }
    let (scheme, default_port) = if req.tls { ("https", 443) } else { ("http", 80) };
    if req.port == default_port {
        format!("{scheme}://{host}{target}")
    } else {
        format!("{scheme}://{host}:{}{target}", req.port)
    }
}

fn redirect(status: u16, location: String) -> Route {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    Route::Respond {
        status,
        body: format!(
            "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} {reason}</h1></center>\r\n</body>\r\n</html>\r\n"
        ),
        location: Some(location),
    }
}

enum Found<'a> {
    Location(&'a Location),
    /// The URI is a proxied prefix location without its trailing slash: 301 to it (nginx).
    AddSlash,
    None,
}

fn find_location<'a>(vh: &'a Vhost, uri: &str, caps: &mut Vec<String>) -> Found<'a> {
    let mut best: Option<&Location> = None;
    let mut add_slash = false;
    for l in &vh.locations {
        match l.kind {
            LocationMatch::Exact if l.path == uri => return Found::Location(l),
            LocationMatch::Prefix | LocationMatch::PrefixNoRegex => {
                if uri.starts_with(l.path.as_str()) {
                    if best.is_none_or(|b| b.path.len() < l.path.len()) {
                        best = Some(l);
                    }
                } else if l.path.len() == uri.len() + 1
                    && l.path.ends_with('/')
                    && l.path.starts_with(uri)
                    && matches!(l.target, Target::Proxy { .. })
                {
                    add_slash = true;
                }
            }
            _ => {}
        }
    }
    if add_slash && best.is_none_or(|b| b.path.len() < uri.len()) {
        return Found::AddSlash;
    }
    if let Some(b) = best {
        if b.kind == LocationMatch::PrefixNoRegex {
            return Found::Location(b);
        }
    }
    for l in &vh.locations {
        if let Some(re) = &l.regex {
            if let Some(c) = re.captures(uri) {
                caps.clear();
                caps.extend(
                    c.iter()
                        .map(|m| m.map_or(String::new(), |m| m.as_str().to_string())),
                );
                return Found::Location(l);
            }
        }
    }
    best.map_or(Found::None, Found::Location)
}

/// Runs rewrite-phase steps in order.
fn run_steps<'u>(
    steps: &[Step],
    req: &RouteRequest<'_>,
    host: &str,
    uri: &mut Cow<'u, str>,
    args: &mut Option<Cow<'u, str>>,
    changed: &mut bool,
    caps: &mut Vec<String>,
) -> StepEnd {
    for step in steps {
        match step {
            Step::Return(r) => {
                let mut text = String::new();
                Vars {
                    req,
                    host,
                    uri: uri.as_ref(),
                    args: args.as_deref(),
                    caps: caps.as_slice(),
                }
                .expand(&r.text, is_redirect(r.status), &mut text);
                return StepEnd::Respond(if is_redirect(r.status) {
                    redirect(r.status, absolute(req, host, text))
                } else {
                    Route::Respond {
                        status: r.status,
                        location: None,
                        body: text,
                    }
                });
            }
            Step::Rewrite(rw) => {
                let Some(c) = rw.regex.captures(uri) else {
                    continue;
                };
                caps.clear();
                caps.extend(
                    c.iter()
                        .map(|m| m.map_or(String::new(), |m| m.as_str().to_string())),
                );
                let mut new = String::new();
                Vars {
                    req,
                    host,
                    uri: uri.as_ref(),
                    args: args.as_deref(),
                    caps: caps.as_slice(),
                }
                .expand(&rw.replacement, false, &mut new);
                let permanent = rw.flag == RewriteFlag::Permanent;
                if rw.redirect || matches!(rw.flag, RewriteFlag::Redirect | RewriteFlag::Permanent) {
                    // A redirect takes the request's arguments along, after any of its own,
                    // unless the replacement ends with `?`.
                    if new.ends_with('?') {
                        new.pop();
                    } else if let Some(a) = args.as_deref() {
                        new.push(if new.contains('?') { '&' } else { '?' });
                        new.push_str(a);
                    }
                    let status = if permanent { 301 } else { 302 };
                    return StepEnd::Respond(redirect(status, absolute(req, host, new)));
                }
                match new.split_once('?') {
                    Some((path, "")) => {
                        *uri = Cow::Owned(path.to_string());
                        *args = None;
                    }
                    Some((path, q)) => {
                        let merged = match args.as_deref() {
                            Some(a) => format!("{q}&{a}"),
                            None => q.to_string(),
                        };
                        *uri = Cow::Owned(path.to_string());
                        *args = Some(Cow::Owned(merged));
                    }
                    None => *uri = Cow::Owned(new),
                }
                *changed = true;
                match rw.flag {
                    RewriteFlag::Last => return StepEnd::Last,
                    RewriteFlag::Break => return StepEnd::Break,
                    _ => {}
                }
            }
        }
    }
    StepEnd::Done
}

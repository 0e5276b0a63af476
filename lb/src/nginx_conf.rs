//! `--nginx-conf`: reads an nginx config (its `upstream` blocks and every `server` with its
//! `listen`, `server_name`, `location`, `proxy_pass`, `rewrite` and `return`) and turns it into an
//! `lb` config table (`upstream`, `upstreams`, `vhosts`). Directives that only matter to nginx
//! internals become warnings with their line numbers; directives that would change what is served
//! and that lb does not implement are errors with their line numbers.

use std::path::Path;

use toml::{Table, Value};

/// What is wrong with an nginx config.
#[derive(Debug, thiserror::Error)]
pub enum NginxConfError {
    /// The file could not be read.
    #[error("cannot read nginx config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not nginx syntax.
    #[error("nginx config line {line}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A directive lb does not support and cannot ignore.
    #[error("nginx config line {line}: unsupported directive `{directive}`: {message}")]
    Unsupported {
        /// 1-based line.
        line: usize,
        /// The directive name.
        directive: String,
        /// Why.
        message: String,
    },
}

/// The translated config and what was ignored.
#[derive(Debug, Clone, Default)]
pub struct Translated {
    /// An `lb` config table, to be used as the base layer below the TOML file, env and flags.
    pub table: Table,
    /// Directives that were ignored, as `line N: ...` messages.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Option<Vec<Directive>>,
}

/// Reads and translates the file at `path`.
pub fn load(path: &Path) -> Result<Translated, NginxConfError> {
    let text = std::fs::read_to_string(path).map_err(|source| NginxConfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    translate(&text)
}

#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Semi,
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, NginxConfError> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '{' => {
                out.push((Tok::Open, line));
                chars.next();
            }
            '}' => {
                out.push((Tok::Close, line));
                chars.next();
            }
            ';' => {
                out.push((Tok::Semi, line));
                chars.next();
            }
            '"' | '\'' => {
                let quote = c;
                let start = line;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(NginxConfError::Syntax {
                                line: start,
                                message: "unclosed quote".into(),
                            })
                        }
                        Some('\\') => match chars.next() {
                            // nginx knows these escapes in quoted strings.
                            Some('n') => word.push('\n'),
                            Some('t') => word.push('\t'),
                            Some('r') => word.push('\r'),
                            Some(n @ ('"' | '\'' | '\\')) => word.push(n),
                            Some(n) => {
                                word.push('\\');
                                word.push(n);
                            }
                            None => {}
                        },
                        Some(ch) if ch == quote => break,
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            word.push(ch);
                        }
                    }
                }
                out.push((Tok::Word(word), start));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || ch == ';' || ch == '}' {
                        break;
                    }
                    if ch == '{' {
                        // `${var}` is part of a word; a bare `{` opens a block.
                        if !word.ends_with('$') {
                            break;
                        }
                        for ch in chars.by_ref() {
                            word.push(ch);
                            if ch == '}' {
                                break;
                            }
                        }
                        continue;
                    }
                    word.push(ch);
                    chars.next();
                }
                out.push((Tok::Word(word), line));
            }
        }
    }
    Ok(out)
}

fn parse_block(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    nested: Option<usize>,
) -> Result<Vec<Directive>, NginxConfError> {
    let mut out = Vec::new();
    loop {
        let Some((tok, line)) = toks.get(*pos) else {
            return match nested {
                Some(open) => Err(NginxConfError::Syntax {
                    line: open,
                    message: "unclosed `{`".into(),
                }),
                None => Ok(out),
            };
        };
        let line = *line;
        match tok {
            Tok::Close => {
                *pos += 1;
                return match nested {
                    Some(_) => Ok(out),
                    None => Err(NginxConfError::Syntax {
                        line,
                        message: "unexpected `}`".into(),
                    }),
                };
            }
            Tok::Open | Tok::Semi => {
                return Err(NginxConfError::Syntax {
                    line,
                    message: "expected a directive name".into(),
                })
            }
            Tok::Word(name) => {
                *pos += 1;
                let mut args = Vec::new();
                loop {
                    match toks.get(*pos) {
                        Some((Tok::Word(w), _)) => {
                            args.push(w.clone());
                            *pos += 1;
                        }
                        Some((Tok::Semi, _)) => {
                            *pos += 1;
                            out.push(Directive {
                                name: name.clone(),
                                args,
                                line,
                                block: None,
                            });
                            break;
                        }
                        Some((Tok::Open, l)) => {
                            let open = *l;
                            *pos += 1;
                            let block = parse_block(toks, pos, Some(open))?;
                            out.push(Directive {
                                name: name.clone(),
                                args,
                                line,
                                block: Some(block),
                            });
                            break;
                        }
                        Some((Tok::Close, l)) => {
                            return Err(NginxConfError::Syntax {
                                line: *l,
                                message: format!("`{name}` is missing its `;`"),
                            })
                        }
                        None => {
                            return Err(NginxConfError::Syntax {
                                line,
                                message: format!("`{name}` is missing its `;`"),
                            })
                        }
                    }
                }
            }
        }
    }
}

/// Directives that only matter to nginx's own workings; lb accepts and reports them.
const INTERNAL: &[&str] = &[
    "user",
    "pid",
    "worker_rlimit_nofile",
    "error_log",
    "include",
    "load_module",
    "daemon",
    "master_process",
    "env",
    "pcre_jit",
    "thread_pool",
    "worker_cpu_affinity",
    "worker_priority",
    "lock_file",
    "timer_resolution",
    "events",
    "default_type",
    "sendfile",
    "tcp_nopush",
    "tcp_nodelay",
    "types_hash_max_size",
    "types_hash_bucket_size",
    "server_tokens",
    "access_log",
    "log_format",
    "types",
    "server_names_hash_bucket_size",
    "server_names_hash_max_size",
    "charset",
    "open_file_cache",
    "gzip",
    "gzip_vary",
    "gzip_proxied",
    "gzip_comp_level",
    "gzip_types",
    "gzip_min_length",
    "gzip_disable",
    "gzip_http_version",
    "gzip_buffers",
    "proxy_http_version",
    "proxy_buffering",
    "proxy_buffer_size",
    "proxy_buffers",
    "proxy_busy_buffers_size",
    "proxy_request_buffering",
    "proxy_send_timeout",
    "proxy_redirect",
    "send_timeout",
    "reset_timedout_connection",
    "keepalive_requests",
    "client_body_buffer_size",
    "client_header_buffer_size",
    "client_body_timeout",
    "proxy_max_temp_file_size",
    "proxy_temp_path",
    "client_body_temp_path",
    "zone",
    "resolver",
    "resolver_timeout",
    "ssl_prefer_server_ciphers",
    "ssl_session_cache",
    "ssl_session_timeout",
    "ssl_session_tickets",
    "ssl_ciphers",
    "ssl_ecdh_curve",
    "ssl_dhparam",
    "ssl_buffer_size",
    "http2",
    "variables_hash_max_size",
];

#[derive(Default)]
struct Out {
    table: Table,
    warnings: Vec<String>,
    /// Upstream blocks some `proxy_pass` names.
    used: Vec<String>,
}

impl Out {
    fn set(&mut self, path: &[&str], value: Value) {
        let mut t = &mut self.table;
        for key in &path[..path.len() - 1] {
            t = t
                .entry(key.to_string())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .expect("lb config sections are tables");
        }
        t.insert(path[path.len() - 1].to_string(), value);
    }

    fn ignore(&mut self, d: &Directive, why: &str) {
        self.warnings
            .push(format!("line {}: `{}` ignored: {why}", d.line, d.name));
    }
}

fn unsupported(d: &Directive, message: impl Into<String>) -> NginxConfError {
    NginxConfError::Unsupported {
        line: d.line,
        directive: d.name.clone(),
        message: message.into(),
    }
}

fn arity(d: &Directive, min: usize, max: usize) -> Result<(), NginxConfError> {
    if d.args.len() < min || d.args.len() > max {
        return Err(NginxConfError::Syntax {
            line: d.line,
            message: format!("`{}` has {} arguments", d.name, d.args.len()),
        });
    }
    Ok(())
}

fn time_arg(d: &Directive, s: &str) -> Result<Value, NginxConfError> {
    crate::config::parse_duration(s).map_err(|e| NginxConfError::Syntax {
        line: d.line,
        message: format!("`{}`: {e}", d.name),
    })?;
    Ok(Value::String(s.to_string()))
}

/// Parses an nginx size (`512`, `8k`, `10m`, `1g`).
fn size_arg(d: &Directive, s: &str) -> Result<i64, NginxConfError> {
    let bad = || NginxConfError::Syntax {
        line: d.line,
        message: format!("`{}`: `{s}` is not a size", d.name),
    };
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1024),
        Some(b'm') => (&lower[..lower.len() - 1], 1024 * 1024),
        Some(b'g') => (&lower[..lower.len() - 1], 1024 * 1024 * 1024),
        _ => (&lower[..], 1),
    };
    let n: i64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Translates nginx config text.
pub fn translate(text: &str) -> Result<Translated, NginxConfError> {
    let toks = tokenize(text)?;
    let mut pos = 0;
    let root = parse_block(&toks, &mut pos, None)?;
    let mut out = Out::default();
    let mut upstreams: Vec<&Directive> = Vec::new();
    let mut servers: Vec<&Directive> = Vec::new();
    let mut ssl = Ssl::default();
    for d in &root {
        match d.name.as_str() {
            "http" => {
                for h in d.block.as_deref().unwrap_or_default() {
                    if ssl.take(h, &mut out)? {
                        continue;
                    }
                    match h.name.as_str() {
                        "upstream" => upstreams.push(h),
                        "server" => servers.push(h),
                        _ => common_directive(h, &mut out)?,
                    }
                }
            }
            "stream" | "mail" => return Err(unsupported(d, "lb proxies HTTP only")),
            _ => common_directive(d, &mut out)?,
        }
    }
    if servers.is_empty() {
        return Err(NginxConfError::Syntax {
            line: 1,
            message: "no `server` block in `http`".into(),
        });
    }
    let mut groups = Groups::default();
    let mut vhosts = Vec::new();
    for server in &servers {
        vhosts.push(Value::Table(server_block(
            server,
            &ssl,
            &upstreams,
            &mut groups,
            &mut out,
        )?));
    }
    let mut groups = groups.tables.into_iter();
    match groups.next() {
        Some(main) => out.set(&["upstream"], Value::Table(main)),
        None => {
            return Err(unsupported(
                servers[0],
                "no `proxy_pass` found: lb needs at least one upstream",
            ))
        }
    }
    let rest: Vec<Value> = groups.map(Value::Table).collect();
    if !rest.is_empty() {
        out.set(&["upstreams"], Value::Array(rest));
    }
    out.set(&["vhosts"], Value::Array(vhosts));
    for u in &upstreams {
        if !out.used.iter().any(|n| Some(n) == u.args.first()) {
            out.ignore(u, "no `proxy_pass` uses this upstream");
        }
    }
    Ok(Translated {
        table: out.table,
        warnings: out.warnings,
    })
}

/// Directives allowed in main, http, server and location context.
fn common_directive(d: &Directive, out: &mut Out) -> Result<(), NginxConfError> {
    match d.name.as_str() {
        "keepalive_timeout" => {
            arity(d, 1, 2)?;
            out.set(&["timeouts", "client_idle"], time_arg(d, &d.args[0])?);
        }
        "client_header_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["timeouts", "header_read"], time_arg(d, &d.args[0])?);
        }
        "client_max_body_size" => {
            arity(d, 1, 1)?;
            out.set(
                &["limits", "max_body_bytes"],
                Value::Integer(size_arg(d, &d.args[0])?),
            );
        }
        "large_client_header_buffers" => {
            arity(d, 2, 2)?;
            let n = size_arg(d, &d.args[0])?;
            let each = size_arg(d, &d.args[1])?;
            out.set(
                &["limits", "max_header_bytes"],
                Value::Integer((n.saturating_mul(each)).max(8192)),
            );
        }
        "worker_processes" => {
            arity(d, 1, 1)?;
            // One serving thread stands for one nginx worker process; `auto` is one per core.
            let n = match d.args[0].as_str() {
                "auto" => 0,
                a => a
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| unsupported(d, format!("worker_processes {a:?}: not `auto` or 1-1024")))?,
            };
            out.set(&["workers"], Value::Integer(n));
        }
        "worker_connections" => {
            arity(d, 1, 1)?;
            out.ignore(d, "lb limits connections with limits.max_connections");
        }
        "proxy_read_timeout" => {
            arity(d, 1, 1)?;
            // nginx applies it between reads of responses and of websocket traffic alike.
            out.set(&["timeouts", "upstream_response"], time_arg(d, &d.args[0])?);
            out.set(&["timeouts", "upgraded_idle"], time_arg(d, &d.args[0])?);
        }
        "proxy_connect_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["timeouts", "upstream_connect"], time_arg(d, &d.args[0])?);
        }
        "proxy_next_upstream" => {
            if d.args.iter().any(|a| a == "off") {
                out.set(&["retry", "tries"], Value::Integer(1));
            }
            let on_status = d
                .args
                .iter()
                .any(|a| matches!(a.as_str(), "http_502" | "http_503" | "http_504"));
            out.set(&["retry", "on_status"], Value::Boolean(on_status));
        }
        "proxy_next_upstream_tries" => {
            arity(d, 1, 1)?;
            let n: i64 = d.args[0].parse().map_err(|_| NginxConfError::Syntax {
                line: d.line,
                message: "`proxy_next_upstream_tries` needs a number".into(),
            })?;
            out.set(&["retry", "tries"], Value::Integer(n));
        }
        "proxy_next_upstream_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["retry", "timeout"], time_arg(d, &d.args[0])?);
        }
        "proxy_set_header" => {
            arity(d, 2, 2)?;
            let (name, value) = (d.args[0].to_ascii_lowercase(), d.args[1].as_str());
            match (name.as_str(), value) {
                ("host", "$host" | "$http_host") => {}
                ("host", v) if !v.contains('$') => {
                    out.set(&["headers", "host"], Value::String(v.to_string()))
                }
                ("x-real-ip", "$remote_addr")
                | ("x-forwarded-for", "$proxy_add_x_forwarded_for")
                | ("x-forwarded-proto", "$scheme")
                | ("upgrade", "$http_upgrade")
                | ("connection", "upgrade" | "$connection_upgrade" | "") => {
                    out.ignore(d, "lb sets this header itself");
                }
                _ => out.ignore(d, "custom upstream headers are not supported"),
            }
        }
        name if INTERNAL.contains(&name) => out.ignore(d, "only matters to nginx internals"),
        _ => return Err(unsupported(d, "not understood by lb")),
    }
    Ok(())
}

/// The upstream groups `proxy_pass` names, in order of first use (the first is `upstream`).
#[derive(Default)]
struct Groups {
    names: Vec<String>,
    tables: Vec<Table>,
}

impl Groups {
    /// Makes sure the group `name` exists: its `upstream` block, or one server `name`.
    fn ensure(&mut self, name: &str, upstreams: &[&Directive], out: &mut Out) -> Result<(), NginxConfError> {
        if self.names.iter().any(|n| n == name) {
            return Ok(());
        }
        let table = match upstreams
            .iter()
            .find(|u| u.args.first().map(String::as_str) == Some(name))
        {
            Some(u) => upstream_block(u, out)?,
            None => {
                // `proxy_pass http://host:port` without an upstream block: one server.
                let mut s = Table::new();
                s.insert("addr".into(), Value::String(name.to_string()));
                let mut t = Table::new();
                t.insert("name".into(), Value::String(name.to_string()));
                t.insert("servers".into(), Value::Array(vec![Value::Table(s)]));
                t
            }
        };
        out.used.push(name.to_string());
        self.names.push(name.to_string());
        self.tables.push(table);
        Ok(())
    }
}

/// `listen ADDR [params]` as an address lb can bind.
fn listen_addr(d: &Directive, out: &mut Out) -> Result<(String, bool, bool), NginxConfError> {
    arity(d, 1, 8)?;
    let mut default_server = false;
    let mut ssl = false;
    for extra in &d.args[1..] {
        match extra.as_str() {
            "ssl" => ssl = true,
            "quic" => return Err(unsupported(d, "lb does not speak HTTP/3")),
            "http2" => {} // lb offers HTTP/2 anyway (ALPN on TLS, h2c in clear).
            "default_server" | "default" => default_server = true,
            _ => out
                .warnings
                .push(format!("line {}: listen parameter `{extra}` ignored", d.line)),
        }
    }
    let a = &d.args[0];
    let addr = if a.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.0.0.0:{a}")
    } else if let Some(port) = a.strip_prefix("*:") {
        format!("0.0.0.0:{port}")
    } else {
        a.clone()
    };
    if addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(NginxConfError::Syntax {
            line: d.line,
            message: format!("`listen {a}`"),
        });
    }
    Ok((addr, default_server, ssl))
}

/// `ssl_certificate`, `ssl_certificate_key` and `ssl_protocols`, from `http` or a `server`.
#[derive(Debug, Clone, Default)]
struct Ssl {
    certificate: Option<String>,
    key: Option<String>,
    protocols: Option<Vec<String>>,
    ocsp_file: Option<String>,
}

impl Ssl {
    /// Takes `d` if it is one of these; other `ssl_*` directives go to `common_directive`.
    fn take(&mut self, d: &Directive, out: &mut Out) -> Result<bool, NginxConfError> {
        match d.name.as_str() {
            "ssl_certificate" => {
                arity(d, 1, 1)?;
                self.certificate = Some(d.args[0].clone());
            }
            "ssl_certificate_key" => {
                arity(d, 1, 1)?;
                self.key = Some(d.args[0].clone());
            }
            "ssl_protocols" => {
                arity(d, 1, 6)?;
                let mut kept = Vec::new();
                for p in &d.args {
                    match p.as_str() {
                        "TLSv1.2" | "TLSv1.3" => kept.push(p.clone()),
                        _ => out.warnings.push(format!(
                            "line {}: ssl_protocols `{p}` ignored: lb speaks TLSv1.2 and TLSv1.3 only",
                            d.line
                        )),
                    }
                }
                if kept.is_empty() {
                    return Err(unsupported(d, "no protocol lb speaks (TLSv1.2, TLSv1.3)"));
                }
                self.protocols = Some(kept);
            }
            "ssl" => return Err(unsupported(d, "use `listen ... ssl`")),
            "ssl_stapling_file" => {
                arity(d, 1, 1)?;
                self.ocsp_file = Some(d.args[0].clone());
            }
            "ssl_stapling" | "ssl_stapling_verify" | "ssl_trusted_certificate" => {
                out.ignore(d, "lb staples only a response from `ssl_stapling_file`")
            }
            "ssl_client_certificate" | "ssl_verify_client" => {
                return Err(unsupported(d, "client certificates are not supported"))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// `return CODE [TEXT]` or `return URL`.
fn return_directive(d: &Directive) -> Result<Value, NginxConfError> {
    arity(d, 1, 2)?;
    let mut t = Table::new();
    let (status, text) = match d.args[0].parse::<u16>() {
        Ok(444) => return Err(unsupported(d, "`return 444` (close without answering)")),
        Ok(code) => (code, d.args.get(1).cloned().unwrap_or_default()),
        Err(_) if d.args.len() == 1 => (302, d.args[0].clone()),
        Err(_) => {
            return Err(NginxConfError::Syntax {
                line: d.line,
                message: format!("`return {}`: not a status code", d.args[0]),
            })
        }
    };
    t.insert("status".into(), Value::Integer(i64::from(status)));
    t.insert("text".into(), Value::String(text));
    Ok(Value::Table(t))
}

/// `rewrite REGEX REPLACEMENT [last|break|redirect|permanent]`.
fn rewrite_directive(d: &Directive) -> Result<Value, NginxConfError> {
    arity(d, 2, 3)?;
    let flag = match d.args.get(2).map(String::as_str) {
        None => "none",
        Some(f @ ("last" | "break" | "redirect" | "permanent")) => f,
        Some(f) => {
            return Err(NginxConfError::Syntax {
                line: d.line,
                message: format!("`rewrite`: unknown flag `{f}`"),
            })
        }
    };
    let mut t = Table::new();
    t.insert("regex".into(), Value::String(d.args[0].clone()));
    t.insert("replacement".into(), Value::String(d.args[1].clone()));
    t.insert("flag".into(), Value::String(flag.into()));
    Ok(Value::Table(t))
}

/// The rewrite-phase directives of one block, in order: rewrites before the first `return`
/// (those after it never run).
#[derive(Default)]
struct Steps {
    rewrites: Vec<Value>,
    ret: Option<Value>,
}

impl Steps {
    fn take(&mut self, d: &Directive, out: &mut Out) -> Result<bool, NginxConfError> {
        match d.name.as_str() {
            "rewrite" => {
                let r = rewrite_directive(d)?;
                if self.ret.is_some() {
                    out.ignore(d, "it follows a `return`, so it never runs");
                } else {
                    self.rewrites.push(r);
                }
            }
            "return" => {
                let r = return_directive(d)?;
                if self.ret.is_some() {
                    out.ignore(d, "it follows a `return`, so it never runs");
                } else {
                    self.ret = Some(r);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn into_table(self, t: &mut Table) {
        if !self.rewrites.is_empty() {
            t.insert("rewrites".into(), Value::Array(self.rewrites));
        }
        if let Some(r) = self.ret {
            t.insert("return".into(), r);
        }
    }
}

/// `index index.html` is what lb does; other index files are not supported.
fn index_directive(d: &Directive, out: &mut Out) -> Result<(), NginxConfError> {
    if d.args.iter().all(|a| a == "index.html" || a == "index.htm") {
        out.ignore(d, "lb serves a directory's index.html");
        Ok(())
    } else {
        Err(unsupported(d, "only `index index.html`"))
    }
}

/// `location [=|^~|~|~*] PATH { ... }`.
fn location_block(
    d: &Directive,
    upstreams: &[&Directive],
    groups: &mut Groups,
    out: &mut Out,
) -> Result<Table, NginxConfError> {
    let (kind, path) = match d.args.as_slice() {
        [m, p] => match m.as_str() {
            "=" => ("exact", p),
            "^~" => ("prefix_no_regex", p),
            "~" => ("regex", p),
            "~*" => ("regex_caseless", p),
            _ => return Err(unsupported(d, format!("location modifier `{m}`"))),
        },
        [p] if p.starts_with('@') => return Err(unsupported(d, "named locations")),
        [p] => ("prefix", p),
        _ => {
            return Err(NginxConfError::Syntax {
                line: d.line,
                message: "`location [modifier] path`".into(),
            })
        }
    };
    let Some(block) = d.block.as_deref() else {
        return Err(NginxConfError::Syntax {
            line: d.line,
            message: "`location` needs a block".into(),
        });
    };
    let mut t = Table::new();
    t.insert("match".into(), Value::String(kind.into()));
    t.insert("path".into(), Value::String(path.clone()));
    let mut steps = Steps::default();
    for l in block {
        if steps.take(l, out)? {
            continue;
        }
        match l.name.as_str() {
            "proxy_pass" => {
                arity(l, 1, 1)?;
                let url = &l.args[0];
                let rest = url
                    .strip_prefix("http://")
                    .ok_or_else(|| unsupported(l, "only http:// upstreams are supported"))?;
                let (name, uri) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                if url.contains('$') {
                    return Err(unsupported(l, "variables in proxy_pass"));
                }
                if !uri.is_empty() && kind.starts_with("regex") {
                    return Err(unsupported(
                        l,
                        "a URI part in a regular-expression location (nginx refuses it too)",
                    ));
                }
                groups.ensure(name, upstreams, out)?;
                t.insert("proxy_pass".into(), Value::String(url.clone()));
            }
            "location" => return Err(unsupported(l, "nested locations")),
            "root" | "alias" => {
                arity(l, 1, 1)?;
                if l.args[0].contains('$') {
                    return Err(unsupported(l, "variables in the path"));
                }
                t.insert(l.name.clone(), Value::String(l.args[0].clone()));
            }
            "try_files" => {
                arity(l, 2, 16)?;
                let files = l.args.iter().map(|a| Value::String(a.clone())).collect();
                t.insert("try_files".into(), Value::Array(files));
            }
            "index" => index_directive(l, out)?,
            _ => common_directive(l, out)?,
        }
    }
    if t.contains_key("proxy_pass") {
        if let Some(f) = block
            .iter()
            .find(|l| matches!(l.name.as_str(), "root" | "alias" | "try_files"))
        {
            return Err(unsupported(
                f,
                "in a location that proxies (lb serves files or proxies)",
            ));
        }
    }
    steps.into_table(&mut t);
    Ok(t)
}

/// Handles `server { ... }` as one virtual server.
fn server_block(
    server: &Directive,
    http_ssl: &Ssl,
    upstreams: &[&Directive],
    groups: &mut Groups,
    out: &mut Out,
) -> Result<Table, NginxConfError> {
    let mut t = Table::new();
    let mut listen = Vec::new();
    let mut tls_listen = Vec::new();
    let mut ssl = http_ssl.clone();
    let mut names = Vec::new();
    let mut default_server = false;
    let mut locations = Vec::new();
    let mut steps = Steps::default();
    for d in server.block.as_deref().unwrap_or_default() {
        if steps.take(d, out)? || ssl.take(d, out)? {
            continue;
        }
        match d.name.as_str() {
            "listen" => {
                let (addr, default, tls) = listen_addr(d, out)?;
                if !out.table.contains_key("listen") {
                    out.set(&["listen"], Value::String(addr.clone()));
                }
                default_server |= default;
                if tls {
                    tls_listen.push(Value::String(addr));
                } else {
                    listen.push(Value::String(addr));
                }
            }
            "server_name" => names.extend(d.args.iter().map(|n| Value::String(n.clone()))),
            "root" => {
                arity(d, 1, 1)?;
                if d.args[0].contains('$') {
                    return Err(unsupported(d, "variables in the path"));
                }
                t.insert("root".into(), Value::String(d.args[0].clone()));
            }
            "index" => index_directive(d, out)?,
            "location" => locations.push(Value::Table(location_block(d, upstreams, groups, out)?)),
            _ => common_directive(d, out)?,
        }
    }
    if !tls_listen.is_empty() {
        let (Some(certificate), Some(key)) = (ssl.certificate, ssl.key) else {
            return Err(unsupported(
                server,
                "`listen ... ssl` needs `ssl_certificate` and `ssl_certificate_key`",
            ));
        };
        let mut tls = Table::new();
        tls.insert("listen".into(), Value::Array(tls_listen));
        tls.insert("certificate".into(), Value::String(certificate));
        tls.insert("key".into(), Value::String(key));
        if let Some(f) = ssl.ocsp_file {
            tls.insert("ocsp_file".into(), Value::String(f));
        }
        if let Some(p) = ssl.protocols {
            tls.insert(
                "protocols".into(),
                Value::Array(p.into_iter().map(Value::String).collect()),
            );
        }
        t.insert("tls".into(), Value::Table(tls));
    } else if listen.is_empty() {
        // nginx's default is *:80 (as root).
        if !out.table.contains_key("listen") {
            out.set(&["listen"], Value::String("0.0.0.0:80".into()));
        }
        listen.push(Value::String("0.0.0.0:80".into()));
    }
    t.insert("listen".into(), Value::Array(listen));
    t.insert("names".into(), Value::Array(names));
    t.insert("default_server".into(), Value::Boolean(default_server));
    t.insert("locations".into(), Value::Array(locations));
    steps.into_table(&mut t);
    Ok(t)
}

/// Handles `upstream NAME { ... }`.
fn upstream_block(u: &Directive, out: &mut Out) -> Result<Table, NginxConfError> {
    let mut t = Table::new();
    t.insert(
        "name".into(),
        Value::String(u.args.first().cloned().unwrap_or_default()),
    );
    let mut servers = Vec::new();
    for d in u.block.as_deref().unwrap_or_default() {
        match d.name.as_str() {
            "ip_hash" => {
                t.insert("algorithm".into(), Value::String("ip_hash".into()));
            }
            "least_conn" => {
                t.insert("algorithm".into(), Value::String("least_conn".into()));
            }
            "hash" => {
                arity(d, 1, 2)?;
                if d.args.get(1).is_some_and(|a| a != "consistent") {
                    return Err(NginxConfError::Syntax {
                        line: d.line,
                        message: "`hash KEY [consistent]`".into(),
                    });
                }
                if d.args.len() == 1 {
                    out.warnings.push(format!(
                        "line {}: `hash` without `consistent` is served as consistent (ketama) hashing",
                        d.line
                    ));
                }
                t.insert("algorithm".into(), Value::String("hash".into()));
                t.insert("hash_key".into(), Value::String(d.args[0].clone()));
            }
            "random" => return Err(unsupported(d, "use round robin or least_conn")),
            "keepalive" => {
                arity(d, 1, 1)?;
                let n = size_arg(d, &d.args[0])?;
                out.set(&["limits", "upstream_keepalive"], Value::Integer(n));
            }
            "keepalive_timeout" => {
                arity(d, 1, 1)?;
                out.set(&["timeouts", "upstream_idle"], time_arg(d, &d.args[0])?);
            }
            "server" => servers.push(Value::Table(server_line(d, out)?)),
            name if INTERNAL.contains(&name) || name == "keepalive_time" => {
                out.ignore(d, "only matters to nginx internals")
            }
            _ => return Err(unsupported(d, "not understood in `upstream`")),
        }
    }
    t.insert("servers".into(), Value::Array(servers));
    Ok(t)
}

/// `server ADDR [weight=N] [max_fails=N] [fail_timeout=T] [backup] [down] [slow_start=T]`.
fn server_line(d: &Directive, out: &mut Out) -> Result<Table, NginxConfError> {
    arity(d, 1, 10)?;
    let mut t = Table::new();
    t.insert("addr".into(), Value::String(d.args[0].clone()));
    for p in &d.args[1..] {
        let bad = || NginxConfError::Syntax {
            line: d.line,
            message: format!("bad server parameter `{p}`"),
        };
        match p.split_once('=') {
            Some(("weight", v)) => {
                t.insert("weight".into(), Value::Integer(v.parse().map_err(|_| bad())?));
            }
            Some(("max_fails", v)) => {
                t.insert("max_fails".into(), Value::Integer(v.parse().map_err(|_| bad())?));
            }
            Some(("fail_timeout", v)) => {
                t.insert("fail_timeout".into(), time_arg(d, v)?);
            }
            Some(("slow_start", v)) => {
                t.insert("slow_start".into(), time_arg(d, v)?);
            }
            Some(("max_conns", _)) => {
                out.warnings
                    .push(format!("line {}: server parameter `{p}` ignored", d.line));
            }
            None if p == "backup" => {
                t.insert("backup".into(), Value::Boolean(true));
            }
            None if p == "down" => {
                t.insert("down".into(), Value::Boolean(true));
            }
            None if p == "resolve" => {
                out.warnings.push(format!(
                    "line {}: `resolve` ignored: lb resolves at start and reload",
                    d.line
                ));
            }
            _ => return Err(bad()),
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Algorithm, Config};
    use common::ConfigSource;

    #[test]
    fn the_shared_example_is_accepted_unchanged() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/examples/nginx.conf"
        ))
        .or_else(|_| std::fs::read_to_string("/work/shared/examples/nginx.conf"))
        .expect("shared example nginx.conf");
        let t = translate(&text).unwrap();
        let c: Config = ConfigSource::new().base(t.table.clone()).load().unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.upstream.name, "flask_app");
        assert_eq!(c.upstream.algorithm, Algorithm::IpHash);
        assert_eq!(c.upstream.servers.len(), 2);
        assert_eq!(c.upstream.servers[0].addr, "web1:5000");
        assert_eq!(c.upstream.servers[1].max_fails, 3);
        assert_eq!(c.upstream.servers[1].fail_timeout.get().as_secs(), 30);
        assert_eq!(c.timeouts.upstream_response.get().as_secs(), 86400);
        assert_eq!(c.timeouts.upgraded_idle.get().as_secs(), 86400);
        assert_eq!(c.timeouts.client_idle.get().as_secs(), 65);
        // `worker_processes auto`: one serving thread per core.
        assert_eq!(c.workers, 0);
        let w = t.warnings.join("\n");
        assert!(w.contains("line 3: `user` ignored"), "{w}");
        assert!(w.contains("line 7: `events` ignored"), "{w}");
        assert!(w.contains("`proxy_http_version` ignored"), "{w}");
    }

    #[test]
    fn upstream_parameters_and_methods() {
        let t = translate(
            "http { upstream u { hash $cookie_sid consistent; keepalive 16;\n\
             server 127.0.0.1:1 weight=5 max_fails=2 fail_timeout=5s;\n\
             server 127.0.0.1:2 down; }\n\
             server { listen 127.0.0.1:9000; location / { proxy_pass http://u/; proxy_next_upstream error timeout http_502; } } }",
        )
        .unwrap();
        let c: Config = ConfigSource::new().base(t.table).load().unwrap();
        assert_eq!(c.upstream.algorithm, Algorithm::Hash);
        assert_eq!(c.upstream.hash_key, "$cookie_sid");
        assert_eq!(c.upstream.servers[0].weight, 5);
        assert!(c.upstream.servers[1].down);
        assert_eq!(c.limits.upstream_keepalive, 16);
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert!(c.retry.on_status);
        let t = translate("http { upstream u { least_conn; server a:1; server b:2 backup; }\n server { listen 80; location / { proxy_pass http://u; } } }").unwrap();
        let c: Config = ConfigSource::new().base(t.table).load().unwrap();
        assert_eq!(c.upstream.algorithm, Algorithm::LeastConn);
        assert!(c.upstream.servers[1].backup);
        let conf = |w: &str| {
            format!("worker_processes {w};\nhttp {{ upstream u {{ server a:1; }}\n server {{ listen 80; location / {{ proxy_pass http://u; }} }} }}")
        };
        let c: Config = ConfigSource::new()
            .base(translate(&conf("2")).unwrap().table)
            .load()
            .unwrap();
        assert_eq!(c.workers, 2);
        let e = translate(&conf("0")).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("worker_processes"), "{e}");
    }

    #[test]
    fn unsupported_directives_name_their_line() {
        let e = translate("http {\n server {\n listen 80;\n location / {\n proxy_pass http://u;\n try_files $uri =404;\n }\n }\n}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 6") && e.contains("try_files"), "{e}");
        let e = translate("http {\n upstream u { server a:1 wieght=2; }\n server { listen 80; location / { proxy_pass http://u; } } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("wieght=2"), "{e}");
        let e = translate("http {\n server { listen 80;\n location @api { proxy_pass http://u; } } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("named locations"), "{e}");
        let e = translate("http {\n server { listen 80;\n location / {\n location /a { } } } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("nested"), "{e}");
        let e = translate("http {\n server { listen 80;\n location ~ ^/a { proxy_pass http://u/x/; } } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("URI part"), "{e}");
        let e = translate("http {\n server { listen 80;\n return 444; } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("444"), "{e}");
        let e = translate("http {\n server { listen 80;\n rewrite ^ /x sideways; } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("sideways"), "{e}");
        let e = translate("http { server { listen 443 ssl; } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssl_certificate"), "{e}");
        let e = translate("http {\n ssl_protocols TLSv1 TLSv1.1;\n server { listen 443 ssl; } }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("TLSv1.2"), "{e}");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let e = translate("http {\n upstream u {\n server a:1\n }\n}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("missing its `;`"), "{e}");
        let e = translate("http {\n server {\n").unwrap_err().to_string();
        assert!(e.contains("unclosed"), "{e}");
        let e = translate("}").unwrap_err().to_string();
        assert!(e.contains("unexpected"), "{e}");
        let e = translate("user \"www;\n").unwrap_err().to_string();
        assert!(e.contains("unclosed quote"), "{e}");
        assert!(translate("http { }").is_err());
    }

    #[test]
    fn proxy_pass_to_an_address_makes_a_one_server_upstream() {
        let t =
            translate("http { server { listen 8081; location / { proxy_pass http://127.0.0.1:5000; } } }")
                .unwrap();
        let c: Config = ConfigSource::new().base(t.table).load().unwrap();
        assert_eq!(c.upstream.servers.len(), 1);
        assert_eq!(c.upstream.servers[0].addr, "127.0.0.1:5000");
    }

    #[test]
    fn servers_locations_rewrites_and_returns() {
        let t = translate(
            "http {\n upstream app { server 127.0.0.1:1; }\n upstream api { least_conn; server 127.0.0.1:2; }\n\
             server { listen 80 default_server; server_name example.com *.example.com;\n\
               rewrite ^/old/(.*)$ /new/$1 last;\n\
               location / { proxy_pass http://app; }\n\
               location ^~ /api/ { proxy_pass http://api/v1/; }\n\
               location ~* \\.png$ { proxy_pass http://127.0.0.1:3; }\n\
               location = /ping { return 200 pong; }\n }\n\
             server { listen 81; return 301 https://$host$request_uri; }\n}",
        )
        .unwrap();
        let c: Config = ConfigSource::new().base(t.table).load().unwrap();
        assert_eq!(c.listen, "0.0.0.0:80");
        assert_eq!(c.listen_addrs(), ["0.0.0.0:80", "0.0.0.0:81"]);
        assert_eq!(c.upstream.name, "app");
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["api", "127.0.0.1:3"]);
        assert_eq!(c.upstreams[0].algorithm, Algorithm::LeastConn);
        let v = &c.vhosts[0];
        assert!(v.default_server);
        assert_eq!(v.names, ["example.com", "*.example.com"]);
        assert_eq!(v.rewrites[0].flag, crate::config::RewriteFlag::Last);
        assert_eq!(v.locations.len(), 4);
        assert_eq!(v.locations[1].match_, crate::config::LocationMatch::PrefixNoRegex);
        assert_eq!(v.locations[1].proxy_pass, "http://api/v1/");
        assert_eq!(v.locations[3].return_.as_ref().unwrap().text, "pong");
        assert_eq!(c.vhosts[1].return_.as_ref().unwrap().status, 301);
        assert_eq!(c.vhosts[1].listen, ["0.0.0.0:81"]);
    }

    #[test]
    fn tls_servers() {
        let t = translate(
            "http {\n upstream app { server 127.0.0.1:1; }\n ssl_protocols TLSv1 TLSv1.2 TLSv1.3;\n\
             ssl_certificate /etc/ssl/default.pem; ssl_certificate_key /etc/ssl/default.key;\n\
             ssl_session_cache shared:SSL:10m;\n\
             server { listen 80; listen 443 ssl http2; server_name a.test;\n\
               location / { proxy_pass http://app; } }\n\
             server { listen 443 ssl; server_name b.test; ssl_certificate /b.pem; ssl_certificate_key /b.key;\n\
               ssl_stapling on; ssl_stapling_file /b.ocsp;\n\
               location / { proxy_pass http://app; } }\n}",
        )
        .unwrap();
        let c: Config = ConfigSource::new().base(t.table).load().unwrap();
        assert_eq!(c.listen_addrs(), ["0.0.0.0:80", "0.0.0.0:443"]);
        let a = c.vhosts[0].tls.as_ref().unwrap();
        assert_eq!(c.vhosts[0].listen, ["0.0.0.0:80"]);
        assert_eq!(a.listen, ["0.0.0.0:443"]);
        assert_eq!(
            (a.certificate.as_str(), a.key.as_str()),
            ("/etc/ssl/default.pem", "/etc/ssl/default.key")
        );
        assert_eq!(a.protocols, ["TLSv1.2", "TLSv1.3"]);
        let b = c.vhosts[1].tls.as_ref().unwrap();
        assert_eq!(b.certificate, "/b.pem");
        assert_eq!(b.ocsp_file, "/b.ocsp");
        assert!(a.ocsp_file.is_empty());
        assert!(c.vhosts[1].listen.is_empty());
        let w = t.warnings.join("\n");
        assert!(w.contains("line 3: ssl_protocols `TLSv1` ignored"), "{w}");
        assert!(w.contains("`ssl_session_cache` ignored"), "{w}");
    }
}

//! `--nginx-conf`: reads an nginx config (its `upstream` blocks and every `server` with its
//! `listen`, `server_name`, `location`, `proxy_pass`, `rewrite` and `return`) and turns it into an
//! `lb` config table (`upstream`, `upstreams`, `vhosts`). Directives that only matter to nginx
//! internals become warnings with their line numbers; directives that would change what is served
//! and that lb does not implement are errors with their line numbers.

mod server;
#[cfg(test)]
mod tests;

use std::path::Path;

use toml::{Table, Value};

use server::{server_block, Groups, Ssl};

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
    "grpc_send_timeout",
    "grpc_buffer_size",
    "grpc_socket_keepalive",
    "proxy_redirect",
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
        "send_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["timeouts", "client_send"], time_arg(d, &d.args[0])?);
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
        // The grpc_* directives are proxy_*'s twins for `grpc_pass` locations; lb keeps one
        // set of upstream timeouts and retries for both, as these files usually set them alike.
        "proxy_read_timeout" | "grpc_read_timeout" => {
            arity(d, 1, 1)?;
            // nginx applies it between reads of responses and of websocket traffic alike.
            out.set(&["timeouts", "upstream_response"], time_arg(d, &d.args[0])?);
            out.set(&["timeouts", "upgraded_idle"], time_arg(d, &d.args[0])?);
        }
        "proxy_connect_timeout" | "grpc_connect_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["timeouts", "upstream_connect"], time_arg(d, &d.args[0])?);
        }
        "proxy_next_upstream" | "grpc_next_upstream" => {
            if d.args.iter().any(|a| a == "off") {
                out.set(&["retry", "tries"], Value::Integer(1));
            }
            let on_status = d
                .args
                .iter()
                .any(|a| matches!(a.as_str(), "http_502" | "http_503" | "http_504"));
            out.set(&["retry", "on_status"], Value::Boolean(on_status));
        }
        "proxy_next_upstream_tries" | "grpc_next_upstream_tries" => {
            arity(d, 1, 1)?;
            let n: i64 = d.args[0].parse().map_err(|_| NginxConfError::Syntax {
                line: d.line,
                message: format!("`{}` needs a number", d.name),
            })?;
            out.set(&["retry", "tries"], Value::Integer(n));
        }
        "proxy_next_upstream_timeout" | "grpc_next_upstream_timeout" => {
            arity(d, 1, 1)?;
            out.set(&["retry", "timeout"], time_arg(d, &d.args[0])?);
        }
        "proxy_set_header" | "grpc_set_header" => {
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

//! `server` and `location` blocks: listen addresses (plain and `ssl`), names, locations with
//! `proxy_pass` or `grpc_pass` (h2c), `root`/`alias`/`try_files`, `rewrite` and `return`, and the `ssl_*` settings,
//! as the `vhosts`, `upstream` and `upstreams` tables.

use toml::{Table, Value};

use super::{arity, common_directive, unsupported, upstream_block, Directive, NginxConfError, Out};

/// The upstream groups `proxy_pass` names, in order of first use (the first is `upstream`).
#[derive(Default)]
pub(super) struct Groups {
    names: Vec<String>,
    pub(super) tables: Vec<Table>,
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
pub(super) struct Ssl {
    certificate: Option<String>,
    key: Option<String>,
    protocols: Option<Vec<String>>,
    ocsp_file: Option<String>,
}

impl Ssl {
    /// Takes `d` if it is one of these; other `ssl_*` directives go to `common_directive`.
    pub(super) fn take(&mut self, d: &Directive, out: &mut Out) -> Result<bool, NginxConfError> {
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
            "grpc_pass" => {
                arity(l, 1, 1)?;
                if t.contains_key("proxy_pass") {
                    return Err(unsupported(l, "beside proxy_pass or another grpc_pass"));
                }
                let url = &l.args[0];
                if url.starts_with("grpcs://") {
                    return Err(unsupported(l, "grpcs:// (TLS to upstreams): lb speaks h2c only"));
                }
                if url.contains('$') {
                    return Err(unsupported(l, "variables in grpc_pass"));
                }
                let name = url.strip_prefix("grpc://").unwrap_or(url);
                if name.contains('/') || name.contains("://") {
                    return Err(unsupported(
                        l,
                        "a URI part or another scheme (nginx refuses them too)",
                    ));
                }
                groups.ensure(name, upstreams, out)?;
                t.insert("proxy_pass".into(), Value::String(format!("grpc://{name}")));
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
pub(super) fn server_block(
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

//! Server-side HTML: the front page, the friendly error page, and the dashboard shell.
//!
//! Written with `format!` and one escaping function: three small pages do not justify a template
//! engine, and everything that comes from the database or a peer goes through [`escape`].

use std::fmt::Write;
use std::time::SystemTime;

use crate::db::{HostSamples, Overview};

/// The shared stylesheet, served at `/static/style.css`.
pub const STYLE_CSS: &str = include_str!("../static/style.css");
/// The dashboard script, served at `/static/dashboard.js`.
pub const DASHBOARD_JS: &str = include_str!("../static/dashboard.js");

/// Escapes text for HTML element content and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn head(title: &str, extra: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{extra}\
         <title>{}</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head><body>",
        escape(title)
    )
}

fn nav(instance: &str) -> String {
    format!(
        "<header><h1>ha-stack</h1><nav><a href=\"/\">hosts</a> <a href=\"/dashboard\">dashboard</a></nav>\
         <p class=\"served\">served by <strong id=\"instance\">{}</strong></p></header>",
        escape(instance)
    )
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {}s", s % 60)
    }
}

fn timestamp(t: SystemTime) -> String {
    format!("{} UTC", common::time::Civil::from(t).iso_seconds())
}

/// A small inline SVG line of CPU utilisation, oldest left.
fn sparkline(h: &HostSamples) -> String {
    let points: Vec<f64> = h
        .history
        .iter()
        .rev()
        .map(|s| s.cpu_percent.unwrap_or(0.0).clamp(0.0, 100.0))
        .collect();
    let (w, ht) = (160.0, 32.0);
    let step = if points.len() > 1 {
        w / (points.len() - 1) as f64
    } else {
        0.0
    };
    let mut path = String::new();
    for (i, p) in points.iter().enumerate() {
        let _ = write!(path, "{:.1},{:.1} ", i as f64 * step, ht - p / 100.0 * ht);
    }
    format!(
        "<svg class=\"spark\" width=\"160\" height=\"32\" viewBox=\"0 0 160 32\" role=\"img\" \
         aria-label=\"cpu history\"><polyline fill=\"none\" stroke=\"#2b6cb0\" stroke-width=\"2\" \
         points=\"{}\"/></svg>",
        path.trim_end()
    )
}

/// The front page.
pub fn index(instance: &str, o: &Overview) -> String {
    let mut html = head("ha-stack: hosts", "<meta http-equiv=\"refresh\" content=\"30\">");
    html.push_str(&nav(instance));
    let port = o.node.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let name = if o.node.name.is_empty() {
        "(no cluster_name)"
    } else {
        &o.node.name
    };
    let _ = write!(
        html,
        "<main><section class=\"node {role}\" id=\"db-node\"><h2>database node</h2>\
         <p>answered by <strong id=\"node-name\">{}</strong> (port {}) as \
         <strong id=\"node-role\" class=\"role\">{role}</strong></p></section>",
        escape(name),
        escape(&port),
        role = o.node.role,
    );
    if o.hosts.is_empty() {
        html.push_str("<p class=\"empty\">no samples yet: start a collector</p>");
    }
    for h in &o.hosts {
        let s = &h.latest;
        let cpu = s
            .cpu_percent
            .map(|c| format!("{c:.1}%"))
            .unwrap_or_else(|| "-".into());
        let _ = write!(
            html,
            "<section class=\"host\"><h2>{host}</h2><p class=\"when\">latest sample {when}</p>\
             <table><tr><th>cpu</th><td>{cpu}</td><th>load</th><td>{:.2} {:.2} {:.2}</td></tr>\
             <tr><th>memory</th><td>{} / {}</td><th>swap</th><td>{} / {}</td></tr>\
             <tr><th>uptime</th><td>{}</td><th>processes</th><td>{}</td></tr></table>",
            s.load1,
            s.load5,
            s.load15,
            bytes(s.mem_used_bytes),
            bytes(s.mem_total_bytes),
            bytes(s.swap_used_bytes),
            bytes(s.swap_total_bytes),
            duration(s.uptime_seconds),
            s.process_count,
            host = escape(&h.host),
            when = timestamp(s.sampled_at),
        );
        if !s.disks.is_empty() {
            html.push_str("<table class=\"disks\"><tr><th>mount</th><th>type</th><th>used</th></tr>");
            for d in &s.disks {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
                    escape(&d.mount),
                    escape(&d.fs_type),
                    bytes(d.used_bytes),
                    bytes(d.total_bytes)
                );
            }
            html.push_str("</table>");
        }
        if !s.net.is_empty() {
            html.push_str("<table class=\"net\"><tr><th>interface</th><th>rx</th><th>tx</th></tr>");
            for n in &s.net {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&n.iface),
                    bytes(n.rx_bytes),
                    bytes(n.tx_bytes)
                );
            }
            html.push_str("</table>");
        }
        let _ = write!(
            html,
            "<details><summary>history ({} samples) {}</summary><table class=\"history\">\
             <tr><th>at</th><th>cpu</th><th>load1</th><th>memory used</th></tr>",
            h.history.len(),
            sparkline(h)
        );
        for s in &h.history {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td></tr>",
                timestamp(s.sampled_at),
                s.cpu_percent
                    .map(|c| format!("{c:.1}%"))
                    .unwrap_or_else(|| "-".into()),
                s.load1,
                bytes(s.mem_used_bytes)
            );
        }
        html.push_str("</table></details></section>");
    }
    html.push_str("</main></body></html>\n");
    html
}

/// The page shown while the database cannot answer (a failover, an outage): no internals beyond a
/// one-line reason, and a refresh so the page recovers by itself.
pub fn unavailable(instance: &str, reason: &str) -> String {
    let mut html = head(
        "ha-stack: database unavailable",
        "<meta http-equiv=\"refresh\" content=\"5\">",
    );
    html.push_str(&nav(instance));
    let _ = writeln!(
        html,
        "<main><section class=\"unavailable\"><h2>The database is not reachable right now</h2>\
         <p>A database failover may be in progress. This page retries by itself in a few seconds.</p>\
         <p class=\"reason\">{}</p></section></main></body></html>",
        escape(reason)
    );
    html
}

/// A plain page for 404 and the like.
pub fn message(instance: &str, title: &str, text: &str) -> String {
    let mut html = head(title, "");
    html.push_str(&nav(instance));
    let _ = writeln!(
        html,
        "<main><section><h2>{}</h2><p>{}</p></section></main></body></html>",
        escape(title),
        escape(text)
    );
    html
}

/// What the dashboard offers the viewer, from their operator session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorView<'a> {
    /// No operator password is configured: read-only, no login link.
    ReadOnly,
    /// Operator actions exist, but this viewer is not logged in.
    LoggedOut,
    /// Logged in: the CSRF token the page's requests must carry.
    LoggedIn(&'a str),
}

/// The dashboard shell; `snapshot` (JSON) is embedded so the first render needs no round trip.
/// A logged-in operator's page carries the session's CSRF token in a `<meta>` for the script, and
/// a logout form.
pub fn dashboard(instance: &str, snapshot: &str, operator: OperatorView<'_>) -> String {
    let meta = match operator {
        OperatorView::LoggedIn(csrf) => {
            format!("<meta name=\"csrf-token\" content=\"{}\">", escape(csrf))
        }
        _ => String::new(),
    };
    let mut html = head("ha-stack: dashboard", &meta);
    html.push_str(&nav(instance));
    match operator {
        OperatorView::ReadOnly => {}
        OperatorView::LoggedOut => html.push_str(
            "<p class=\"operator\"><a id=\"login\" href=\"/dashboard/login\">operator login</a></p>",
        ),
        OperatorView::LoggedIn(csrf) => {
            let _ = write!(
                html,
                "<form class=\"operator\" method=\"post\" action=\"/dashboard/logout\">\
                 <span id=\"operator\">operator</span> \
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button id=\"logout\">log out</button></form>",
                escape(csrf)
            );
        }
    }
    // Inside <script>, only "</script" can end the element early; JSON never needs a raw '<'.
    let embedded = snapshot.replace('<', "\\u003c");
    let _ = writeln!(
        html,
        "<main class=\"dash\"><div class=\"topology\">\
         <p id=\"conn\" class=\"conn\">connecting…</p>\
         <svg id=\"topo\" viewBox=\"0 0 900 540\" role=\"img\" aria-label=\"topology\"></svg></div>\
         <aside><section id=\"details\"><h2>details</h2><p class=\"hint\">click a node</p></section>\
         <section><h2>events</h2><ol id=\"events\"></ol></section></aside></main>\
         <script id=\"snapshot\" type=\"application/json\">{embedded}</script>\
         <script src=\"/static/dashboard.js\"></script></body></html>"
    );
    html
}

/// The operator login form; `problem` says why the last attempt failed.
pub fn login(instance: &str, problem: Option<&str>) -> String {
    let mut html = head("ha-stack: operator login", "");
    html.push_str(&nav(instance));
    let problem = problem
        .map(|p| format!("<p class=\"reason\" id=\"problem\">{}</p>", escape(p)))
        .unwrap_or_default();
    let _ = writeln!(
        html,
        "<main><section class=\"login\"><h2>operator login</h2>\
         <p class=\"hint\">Switching the database over needs the operator password.</p>{problem}\
         <form method=\"post\" action=\"/dashboard/login\">\
         <label>password <input type=\"password\" name=\"password\" autocomplete=\"current-password\" autofocus required></label> \
         <button>log in</button></form></section></main></body></html>"
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn dates_are_utc_civil() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(t), "2000-02-29 00:00:00 UTC");
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(90.0), "1m 30s");
        assert_eq!(duration(90_061.0), "1d 1h 1m");
    }

    #[test]
    fn embedded_snapshot_cannot_close_the_script() {
        let page = dashboard("w", r#"{"x":"</script><b>"}"#, OperatorView::ReadOnly);
        assert!(!page.contains("</script><b>"));
        assert!(page.contains("\\u003c/script>"));
    }

    #[test]
    fn unavailable_page_escapes_the_reason() {
        let page = unavailable("web<1>", "no <db>");
        assert!(page.contains("web&lt;1&gt;"));
        assert!(page.contains("no &lt;db&gt;"));
        assert!(page.contains("not reachable"));
    }
}

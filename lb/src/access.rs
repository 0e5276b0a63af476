//! The access log: one event per request on tracing target `lb::access`, in nginx's `combined`
//! format or as structured fields.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{header, HeaderValue, Method, Request, Response, Uri, Version};

use crate::config::AccessLogFormat;

/// What the log needs from a request, captured before the request is consumed.
#[derive(Debug)]
pub struct RequestLine {
    method: Method,
    uri: Uri,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

impl RequestLine {
    /// Captures the loggable parts of `req`.
    pub fn of<B>(req: &Request<B>) -> RequestLine {
        RequestLine {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: req.headers().get(header::REFERER).cloned(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
        }
    }
}

fn text(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// Logs one request.
pub fn log<B>(
    format: AccessLogFormat,
    peer: SocketAddr,
    line: &RequestLine,
    resp: &Response<B>,
    upstream: Option<&str>,
    elapsed: Duration,
    ssl_protocol: Option<&str>,
) {
    let status = resp.status().as_u16();
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let ip = peer.ip().to_canonical();
    match format {
        AccessLogFormat::Combined => tracing::info!(
            target: "lb::access",
            "{ip} - - [{}] \"{} {} {:?}\" {status} {bytes} \"{}\" \"{}\" upstream={} rt={:.3} tls={}",
            clf_time(SystemTime::now()),
            line.method,
            line.uri,
            line.version,
            text(&line.referer),
            text(&line.user_agent),
            upstream.unwrap_or("-"),
            elapsed.as_secs_f64(),
            ssl_protocol.unwrap_or("-"),
        ),
        AccessLogFormat::Json => tracing::info!(
            target: "lb::access",
            remote_addr = %ip,
            method = %line.method,
            uri = %line.uri,
            protocol = ?line.version,
            status,
            body_bytes = bytes,
            referer = text(&line.referer),
            user_agent = text(&line.user_agent),
            upstream = upstream.unwrap_or("-"),
            request_time = elapsed.as_secs_f64(),
            ssl_protocol = ssl_protocol.unwrap_or("-"),
            "request"
        ),
    }
}

/// `10/Oct/2000:13:55:36 +0000`, the time format of nginx's `$time_local` (in UTC).
pub fn clf_time(t: SystemTime) -> String {
    common::time::Civil::from(t).clf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn common_log_time() {
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(
            clf_time(UNIX_EPOCH + Duration::from_secs(971_185_336)),
            "10/Oct/2000:13:42:16 +0000"
        );
        assert_eq!(
            clf_time(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "29/Feb/2024:12:34:56 +0000"
        );
    }
}

//! Static files for `root`/`alias` locations (the I/O side of [`Route::Files`]): the first
//! candidate that exists (a directory's `index.html` for a path ending in `/`), a directory asked
//! without its slash redirected, `Last-Modified` and `ETag` as nginx makes them, conditional GETs
//! (304, `if_modified_since exact` as nginx's default) and one byte range (206, or 416).
//! Bodies are read in 64 KiB chunks as the client takes them (hyper has no sendfile).
//!
//! [`Route::Files`]: crate::route::Route::Files

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::RespBody;
use crate::route::Fallback;

/// What the route chose.
pub(crate) struct Files {
    pub candidates: Vec<String>,
    pub fallback: Fallback,
    pub redirect_dirs: bool,
    pub slash_location: String,
}

fn plain(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::text(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn status_page(code: u16) -> Response<RespBody> {
    match code {
        404 => plain(StatusCode::NOT_FOUND, "not found\n"),
        403 => plain(StatusCode::FORBIDDEN, "forbidden\n"),
        c => plain(
            StatusCode::from_u16(c).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "",
        ),
    }
}

/// The content type nginx's usual `mime.types` gives the file's extension.
fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e).to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" | "mjs" => "application/javascript",
        "json" => "application/json",
        "map" => "application/json",
        "txt" => "text/plain",
        "xml" => "text/xml",
        "svg" | "svgz" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let c = common::time::Civil::from(t);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[((secs / 86_400) % 7) as usize],
        c.day,
        MONTHS[(c.month as usize).saturating_sub(1).min(11)],
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

/// A single `bytes=` range resolved against `size`: `Ok(None)` for no (usable) range,
/// `Err(())` for one that cannot be satisfied.
fn range(value: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answered whole (allowed by RFC 9110), not as multipart.
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.checked_sub(1).ok_or(())?),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            if e < s {
                return Err(());
            }
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn send(
    path: &str,
    meta: std::fs::Metadata,
    method: &Method,
    headers: &HeaderMap,
) -> Response<RespBody> {
    use tokio::io::AsyncSeekExt;
    let size = meta.len();
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    let mtime = modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let etag = format!("\"{mtime:x}-{size:x}\"");
    let last_modified = http_date(modified);
    let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let not_modified = match get(header::IF_NONE_MATCH) {
        Some(tags) => tags.split(',').any(|t| {
            let t = t.trim();
            t == "*" || t == etag || t.strip_prefix("W/") == Some(etag.as_str())
        }),
        None => get(header::IF_MODIFIED_SINCE) == Some(last_modified.as_str()),
    };
    let mut r = Response::new(RespBody::Full(None));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    for (name, value) in [(header::LAST_MODIFIED, &last_modified), (header::ETAG, &etag)] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
    if not_modified {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return r;
    }
    // If-Range with another validator: the whole file.
    let if_range_ok = get(header::IF_RANGE).is_none_or(|v| v == etag || v == last_modified);
    let wanted = match get(header::RANGE).filter(|_| if_range_ok) {
        Some(v) => range(v, size),
        None => Ok(None),
    };
    let (start, len) = match wanted {
        Err(()) => {
            // nginx answers without the file's validators here.
            r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut().remove(header::CONTENT_TYPE);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            return r;
        }
        Ok(Some((s, e))) => {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{e}/{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (s, e - s + 1)
        }
        Ok(None) => {
            r.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            (0, size)
        }
    };
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if method == Method::HEAD || len == 0 {
        return r;
    }
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return open_error(&e),
    };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return status_page(500);
    }
    *r.body_mut() = RespBody::File { file, remaining: len };
    r
}

fn open_error(e: &std::io::Error) -> Response<RespBody> {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => status_page(403),
        std::io::ErrorKind::NotFound => status_page(404),
        _ => {
            tracing::warn!(error = %e, "cannot open a static file");
            status_page(500)
        }
    }
}

/// Answers a request for files.
pub(crate) async fn serve(method: &Method, headers: &HeaderMap, f: &Files) -> Response<RespBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    for c in &f.candidates {
        let (path, dir_index) = match c.strip_suffix('/') {
            Some(_) => (format!("{c}index.html"), true),
            None => (c.clone(), false),
        };
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => return send(&path, m, method, headers).await,
            Ok(m) if m.is_dir() && !dir_index && f.redirect_dirs => {
                let mut r = plain(StatusCode::MOVED_PERMANENTLY, "moved permanently\n");
                if let Ok(v) = HeaderValue::from_str(&f.slash_location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && f.redirect_dirs => {
                return status_page(403)
            }
            Err(_) => {}
        }
        // A directory asked with its slash but without an index.html: nginx says 403.
        if dir_index && f.redirect_dirs && tokio::fs::metadata(c).await.is_ok_and(|m| m.is_dir()) {
            return status_page(403);
        }
    }
    match &f.fallback {
        Fallback::Status(code) => status_page(*code),
        Fallback::File(path) => match tokio::fs::metadata(path).await {
            Ok(m) if m.is_file() => send(path, m, method, headers).await,
            _ => status_page(404),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn byte_ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=9-2", 100), Err(()));
        assert_eq!(range("bytes=x-2", 100), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=0-0", 0), Err(()));
    }

    #[test]
    fn dates_and_types() {
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(content_type("/a/b.CSS"), "text/css");
        assert_eq!(content_type("/a/b"), "application/octet-stream");
    }
}

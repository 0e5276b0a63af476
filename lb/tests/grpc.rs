//! `grpc_pass`: gRPC calls from an HTTP/2 client (h2c, and h2 over TLS) pass through lb to an
//! HTTP/2 cleartext upstream (a hyper h2c server speaking gRPC's framing), with `te: trailers`
//! forwarded and the response trailers (`grpc-status`, `grpc-message`) delivered; an upstream
//! that is down gives a 502, and the connection goes on.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tls::{ca, client, connect, leaf, serve};
use support::wait_for;

/// One gRPC message: a flag byte (not compressed), a big-endian length, the bytes.
fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// The messages in a gRPC body.
fn messages(mut body: Bytes) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while body.has_remaining() {
        ensure!(body.len() >= 5, "a cut message header");
        let _flag = body.get_u8();
        let n = body.get_u32() as usize;
        ensure!(body.len() >= n, "a cut message");
        out.push(body.split_to(n));
    }
    Ok(out)
}

type RespBody = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A gRPC-style service over h2c: `/greet.Greeter/Hello` answers one message per message
/// received ("hello, NAME"), `/greet.Greeter/Missing` fails with status 5 in the trailers. Every
/// answer says in a header which HTTP version and `te` it got.
async fn grpc_upstream() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let seen = format!(
                        "{:?} te={}",
                        req.version(),
                        req.headers()
                            .get("te")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                    );
                    let path = req.uri().path().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut frames = Vec::new();
                    let mut trailers = HeaderMap::new();
                    if path == "/greet.Greeter/Hello" {
                        for m in messages(body).unwrap_or_default() {
                            let text = format!("hello, {}", String::from_utf8_lossy(&m));
                            frames.push(Ok(Frame::data(message(text.as_bytes()))));
                        }
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    } else {
                        trailers.insert("grpc-status", HeaderValue::from_static("5"));
                        trailers.insert("grpc-message", HeaderValue::from_static("no such method"));
                    }
                    frames.push(Ok(Frame::trailers(trailers)));
                    let mut resp: Response<RespBody> =
                        Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                    resp.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    resp.headers_mut()
                        .insert("x-seen", HeaderValue::from_str(&seen).expect("ascii"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// A gRPC call: status, headers, the messages and the trailers.
async fn call(
    h2: &mut Sender,
    path: &str,
    names: &[&str],
) -> Result<(u16, HeaderMap, Vec<Bytes>, HeaderMap)> {
    let mut body = BytesMut::new();
    for n in names {
        body.put(message(n.as_bytes()));
    }
    let req = Request::post(format!("http://a.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(body.freeze()))?;
    tokio::time::timeout(support::DEADLINE, async {
        h2.ready().await?;
        let resp = h2.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        // lb's own error answers (502) are plain text, not gRPC messages.
        let got = if parts.status == 200 {
            messages(collected.to_bytes())?
        } else {
            Vec::new()
        };
        Ok((parts.status.as_u16(), parts.headers, got, trailers))
    })
    .await
    .context("call timed out")?
}

async fn h2c(addr: SocketAddr) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(h2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_to_an_h2c_upstream_with_their_trailers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = ca(dir.path())?;
    let (crt, key) = leaf(dir.path(), &authority, "a.test", "a")?;
    let rpc = grpc_upstream().await?;
    let web = support::echo("web").await?;
    let dead = support::dead_addr().await;
    let port = || -> Result<SocketAddr> { Ok(SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?))) };
    let (plain, tls) = (port()?, port()?);
    let _lb = serve(&format!(
        "http {{\n upstream rpc {{ server {rpc}; }}\n\
         server {{ listen {plain} http2; listen {tls} ssl http2; server_name a.test;\n\
           ssl_certificate {}; ssl_certificate_key {};\n\
           location / {{ proxy_pass http://{web}; }}\n\
           location /greet.Greeter/ {{ grpc_pass grpc://rpc; }}\n\
           location /down.Service/ {{ grpc_pass {dead}; }} }}\n}}\n",
        crt.display(),
        key.display(),
    ))
    .await?;
    let mut h2 = wait_for("lb to serve h2c", || async move { h2c(plain).await.ok() }).await?;

    // Unary, and several messages in one call, over h2c.
    let (status, headers, got, trailers) = call(&mut h2, "/greet.Greeter/Hello", &["ann"]).await?;
    ensure!(status == 200, "status {status}");
    assert_eq!(headers.get("content-type").unwrap(), "application/grpc");
    // The upstream got HTTP/2 and `te: trailers`.
    assert_eq!(headers.get("x-seen").unwrap(), "HTTP/2.0 te=trailers");
    assert_eq!(got, vec![Bytes::from_static(b"hello, ann")]);
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let (_, _, got, trailers) = call(&mut h2, "/greet.Greeter/Hello", &["a", "b", "c"]).await?;
    let texts: Vec<_> = got
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(texts, ["hello, a", "hello, b", "hello, c"]);
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // An error status travels in the trailers.
    let (status, _, got, trailers) = call(&mut h2, "/greet.Greeter/Missing", &["x"]).await?;
    ensure!(status == 200 && got.is_empty(), "status {status}, {got:?}");
    assert_eq!(trailers.get("grpc-status").unwrap(), "5");
    assert_eq!(trailers.get("grpc-message").unwrap(), "no such method");
    // Calls in parallel on one connection.
    let mut inflight = Vec::new();
    for i in 0..50 {
        let mut h2 = h2.clone();
        inflight.push(tokio::spawn(async move {
            let name = format!("n{i}");
            let (_, _, got, trailers) = call(&mut h2, "/greet.Greeter/Hello", &[&name]).await?;
            ensure!(
                got.len() == 1 && got[0] == format!("hello, {name}").as_bytes(),
                "{got:?}"
            );
            ensure!(
                trailers.get("grpc-status").is_some_and(|v| v == "0"),
                "{trailers:?}"
            );
            Ok(())
        }));
    }
    for t in inflight {
        t.await??;
    }
    // An upstream that is down: 502, and the connection goes on; plain locations still proxy.
    let (status, _, _, _) = call(&mut h2, "/down.Service/Call", &["x"]).await?;
    ensure!(status == 502, "status {status}");
    let (status, _, _, trailers) = call(&mut h2, "/greet.Greeter/Hello", &["again"]).await?;
    ensure!(status == 200 && trailers.get("grpc-status").is_some_and(|v| v == "0"));
    let resp = h2
        .send_request(Request::get("http://a.test/page").body(Full::new(Bytes::new()))?)
        .await?;
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(body, "web GET /page");

    // The same call over TLS (ALPN h2).
    let connector = client(&authority.0, &[b"h2"])?;
    let stream = connect(&connector, tls, "a.test").await?;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let (status, _, got, trailers) = call(&mut h2, "/greet.Greeter/Hello", &["tls"]).await?;
    ensure!(status == 200 && got.len() == 1, "status {status}");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    Ok(())
}

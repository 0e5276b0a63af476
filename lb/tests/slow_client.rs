//! A client that stops reading a large response: `timeouts.client_send` closes its connection
//! and frees the upstream connection, on the fast path (GET) and the hyper path (POST).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use lb::config::{Algorithm, Dur, ServerConfig};
use support::{config, start, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// An upstream that answers every request with a 1 GB body, written until the connection
/// breaks; counts the connections that broke.
async fn endless_upstream() -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let broken = Arc::new(AtomicUsize::new(0));
    let count = broken.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut w = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n")
                    .await;
                while w.is_ok() {
                    w = s.write_all(&chunk).await;
                }
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, broken))
}

/// Sends `request` from a socket with a small receive buffer and never reads.
async fn stalled_client(to: SocketAddr, request: &[u8]) -> Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut s = socket.connect(to).await?;
    s.write_all(request).await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_frees_the_upstream() -> Result<()> {
    let (up, broken) = endless_upstream().await?;
    let mut c = config(&[], Algorithm::RoundRobin);
    c.upstream.servers = vec![ServerConfig {
        addr: up.to_string(),
        ..Default::default()
    }];
    c.timeouts.client_send = Dur(Duration::from_secs(1));
    let lb = start(c).await?;

    // The fast path (a GET) and the hyper path (a POST with a body).
    let get = b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let post = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi".to_vec();
    for (n, request) in [(1, get), (2, post)] {
        let _client = stalled_client(lb.addr, &request).await?;
        wait_for("the upstream connection to be dropped", || {
            let b = broken.load(Ordering::SeqCst);
            async move { (b >= n).then_some(()) }
        })
        .await?;
    }
    Ok(())
}

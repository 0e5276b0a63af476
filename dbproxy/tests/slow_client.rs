//! A client that stops reading: `limits.client_write_timeout` ends its session, which frees the
//! server connection it holds, instead of pinning both forever.

mod support;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use dbproxy::config::{AuthMethod, HbaRule};
use dbproxy::protocol::{self, startup};
use support::{config_for, msg, Proxy};
use testkit::{wait_for, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Backends on the primary serving the application name `app`.
fn backends(cluster: &PgCluster, app: &str) -> Result<Option<u32>> {
    let n = cluster.primary().psql(&format!(
        "select count(*) from pg_stat_activity where application_name = '{app}'"
    ))?;
    Ok(Some(n.trim().parse()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_with_its_server_connection() -> Result<()> {
    support::bounded(slow_client_body()).await
}

async fn slow_client_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(0).password("pw").start()).await??;
    let mut config = config_for(&cluster, Some("pw"));
    config.limits.client_write_timeout = 1.0;
    config.hba = vec![HbaRule {
        method: AuthMethod::Trust,
        ..HbaRule::default()
    }];
    let proxy = Proxy::start(config)?;

    // A client with a small receive buffer, so that its socket fills fast.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut s = socket.connect(proxy.addr).await?;
    let mut out = BytesMut::new();
    startup::encode_startup(
        [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", "stalled"),
        ],
        &mut out,
    );
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed during login");
        }
        let mut ready = false;
        while let Some(f) = protocol::decode(&mut buf, 1 << 20)? {
            match f.tag() {
                b'Z' => ready = true,
                b'E' => bail!("login failed: {:?}", protocol::error::field(f.body(), b'M')),
                _ => {}
            }
        }
        if ready {
            break;
        }
    }
    tokio::task::block_in_place(|| {
        wait_for("the session's server connection", Duration::from_secs(30), || {
            backends(&cluster, "stalled").map(|n| n.filter(|&n| n == 1))
        })
    })?;

    // About 200 MB of result that the client never reads.
    let sql = b"select repeat('x', 1000) from generate_series(1, 200000)\0";
    s.write_all(&msg(b'Q', sql)).await?;
    tokio::task::block_in_place(|| {
        wait_for(
            "the stalled session's server connection to close",
            Duration::from_secs(60),
            || backends(&cluster, "stalled").map(|n| n.filter(|&n| n == 0)),
        )
    })?;

    // The client's connection was closed too: what was in flight drains, then end of stream
    // (or a reset).
    let mut sink = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    ended.context("the stalled client's connection stayed open")?;
    assert!(
        total < 100 * 1024 * 1024,
        "{total} bytes: the whole result was sent"
    );
    Ok(())
}

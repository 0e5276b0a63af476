//! Routing through real PostgreSQL: a primary and a standby from testkit, dbproxy in front, and
//! `inet_server_port()` in the statements to prove which node ran each one.

mod support;

use anyhow::Context;
use anyhow::Result;
use dbproxy::config::{AuthMethod, HbaRule};
use support::{config_for, msg, Proxy, Raw};
use testkit::PgCluster;

async fn port_of(c: &tokio_postgres::Client, sql: &str) -> Result<u16> {
    let rows = c.simple_query(sql).await?;
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("0").parse()?);
        }
    }
    anyhow::bail!("no row from {sql}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_standby_and_everything_else_to_the_primary() -> Result<()> {
    support::bounded(reads_go_to_the_standby_and_everything_else_to_the_primary_body()).await
}

async fn reads_go_to_the_standby_and_everything_else_to_the_primary_body() -> Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::builder().standbys(1).password("pw").start()).await??;
    let (pp, sp) = (cluster.primary().port(), cluster.standby(0).port());
    let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
    let c = proxy.connect("postgres", "pw").await?;

    // Simple protocol.
    assert_eq!(
        port_of(&c, "select inet_server_port()").await?,
        sp,
        "a plain read"
    );
    c.batch_execute("create table t(id int primary key, v text); create sequence s")
        .await?;
    c.batch_execute("insert into t values (1, 'a')").await?;
    cluster
        .standby(0)
        .wait_replayed(&cluster.primary().current_lsn()?)?;
    assert_eq!(
        port_of(&c, "select inet_server_port() from t for update").await?,
        pp,
        "FOR UPDATE"
    );
    assert_eq!(
        port_of(&c, "select nextval('s') * 0 + inet_server_port()").await?,
        pp,
        "nextval"
    );
    assert_eq!(
        port_of(
            &c,
            "with x as (insert into t values (2, 'b') returning id) select inet_server_port() from x"
        )
        .await?,
        pp,
        "writing CTE"
    );

    // A transaction's reads run on the standby until its first write (tests/tx_reads.rs has
    // the rest); BEGIN READ ONLY runs wholly on the standby.
    c.batch_execute("begin").await?;
    assert_eq!(
        port_of(&c, "select inet_server_port()").await?,
        sp,
        "read inside a transaction"
    );
    assert_eq!(
        port_of(&c, "select inet_server_port() from t for update").await?,
        pp,
        "from its first write on, the primary"
    );
    assert_eq!(
        port_of(&c, "select inet_server_port()").await?,
        pp,
        "read after the write"
    );
    c.batch_execute("commit").await?;
    c.batch_execute("begin read only").await?;
    assert_eq!(
        port_of(&c, "select inet_server_port()").await?,
        sp,
        "read-only transaction"
    );
    c.batch_execute("commit").await?;

    // Extended protocol: prepared on the standby, executed on the standby.
    let stmt = c.prepare("select inet_server_port()::int + $1").await?;
    let row = c.query_one(&stmt, &[&0i32]).await?;
    assert_eq!(row.get::<_, i32>(0) as u16, sp, "prepared read");
    let ins = c.prepare("insert into t values ($1, $2)").await?;
    c.execute(&ins, &[&3i32, &"c"]).await?;

    // SET reaches every backend connection of the session.
    c.batch_execute("set work_mem = '7MB'").await?;
    let wm = c.simple_query("show work_mem").await?;
    let wm = wm.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(wm.as_deref(), Some("7MB"));
    let both = c
        .simple_query("select current_setting('work_mem') || ':' || inet_server_port()")
        .await?;
    let text = both.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(
        text,
        Some(format!("7MB:{sp}")),
        "the standby has the session's setting"
    );
    // A SET inside a transaction that rolls back is undone everywhere; one that commits holds.
    let setting = |sql: &'static str| {
        let c = &c;
        async move {
            let rows = c.simple_query(sql).await?;
            anyhow::Ok(rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            }))
        }
    };
    c.batch_execute("begin").await?;
    c.batch_execute("set work_mem = '9MB'").await?;
    c.batch_execute("rollback").await?;
    assert_eq!(
        setting("select current_setting('work_mem') || ':' || inet_server_port()").await?,
        Some(format!("7MB:{sp}")),
        "a rolled-back SET does not reach the standby"
    );
    c.batch_execute("begin").await?;
    c.batch_execute("set work_mem = '11MB'").await?;
    c.batch_execute("commit").await?;
    assert_eq!(
        setting("select current_setting('work_mem') || ':' || inet_server_port()").await?,
        Some(format!("11MB:{sp}")),
        "a committed SET reaches the standby"
    );
    assert_eq!(
        setting("select current_setting('work_mem') || ':' || inet_server_port() from t for update limit 1")
            .await?,
        Some(format!("11MB:{pp}")),
        "and stays on the primary"
    );

    // A temporary table pins the session to the primary; the statement prepared on the standby
    // is then prepared lazily on the primary.
    c.batch_execute("create temp table tmp(x int)").await?;
    assert_eq!(
        port_of(&c, "select inet_server_port()").await?,
        pp,
        "pinned after a temp table"
    );
    let row = c.query_one(&stmt, &[&0i32]).await?;
    assert_eq!(
        row.get::<_, i32>(0) as u16,
        pp,
        "prepared statement moved to the primary"
    );

    // DISCARD ALL drops the backend's statements; they are prepared again when next used.
    c.batch_execute("discard all").await?;
    let row = c.query_one(&stmt, &[&0i32]).await?;
    assert_eq!(row.get::<_, i32>(0) as u16, pp, "re-prepared after DISCARD ALL");

    // Flush: a batch answered before its Sync stays on the backend it started on.
    let mut config = config_for(&cluster, Some("pw"));
    config.hba = vec![HbaRule {
        method: AuthMethod::Trust,
        ..HbaRule::default()
    }];
    let trusting = Proxy::start(config)?;
    for (sql, expected) in [
        ("select inet_server_port()", sp),
        ("select inet_server_port() from t where id = 1 for update", pp),
    ] {
        let mut r = Raw::login(&trusting).await?;
        let mut out = msg(b'P', format!("s1\0{sql}\0\0\0").as_bytes());
        out.extend(msg(b'D', b"Ss1\0"));
        out.extend(msg(b'H', b""));
        r.send(&out).await?;
        let tags = [r.frame().await?, r.frame().await?, r.frame().await?].map(|f| f.map(|f| f.tag()));
        assert_eq!(tags, [Some(b'1'), Some(b't'), Some(b'T')], "answered at Flush");
        let mut out = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        out.extend(msg(b'E', b"\0\0\0\0\0"));
        out.extend(msg(b'S', b""));
        r.send(&out).await?;
        assert_eq!(r.frame().await?.map(|f| f.tag()), Some(b'2'));
        let row = r.frame().await?.context("no row")?;
        assert_eq!(row.tag(), b'D');
        let port: u16 = std::str::from_utf8(&row.body()[6..])?.parse()?;
        assert_eq!(port, expected, "{sql}");
        let rest = [r.frame().await?, r.frame().await?].map(|f| f.map(|f| f.tag()));
        assert_eq!(rest, [Some(b'C'), Some(b'Z')]);
    }

    // What ran where, seen from the nodes themselves.
    let on_primary = cluster.primary().psql("select count(*) from t")?;
    assert_eq!(on_primary, "3");
    Ok(())
}

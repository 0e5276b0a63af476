//! The compatibility suite: client behaviours as real drivers produce them (psycopg 3, psycopg2,
//! asyncpg, SQLAlchemy in `tests/compat/cases.py`; tokio-postgres here), each run once directly
//! against the primary and once through dbproxy in front of the primary and a standby, asserting
//! the same answers.
//!
//! The cluster replicates synchronously with `synchronous_commit = remote_apply`, so a read that
//! dbproxy balances to the standby sees every write acknowledged before it, as a direct client
//! would: any difference is dbproxy's. `COMPAT_CASES=a,b` runs only the named Python cases.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use support::{config_for, Proxy};
use testkit::{wait_for, PgCluster, DEADLINE};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The Python cases that must give the same answers through dbproxy as directly.
const PYTHON_CASES: &[&str] = &[
    "psycopg_prepared",
    "psycopg_prepared_in_transaction",
    "asyncpg_prepared",
    "asyncpg_copy",
    "asyncpg_cancel",
    "psycopg_copy",
    "psycopg2_copy_and_large_objects",
    "psycopg_large_objects_sql",
    "psycopg_notify",
    "asyncpg_notify",
    "psycopg_cancel",
    "psycopg_backend_pid",
    "asyncpg_backend_pid",
    "psycopg_tpc",
    "psycopg_cursor_with_hold",
    "psycopg2_cursor_with_hold",
    "psycopg_startup_parameters",
    "asyncpg_server_settings",
    "psycopg_pipeline_autocommit",
    "psycopg_pipeline_transaction",
    "psycopg_pipeline_error",
    "sql_prepare_execute",
    "psycopg_prepared_statements_view",
    "node_local_state",
    "unlogged_tables",
    "psycopg_encoding_parameters",
    "encoding_query_text_simple",
    "encoding_query_text_extended",
    "sqlalchemy_orm",
];

/// How long one case may take before it counts as hung.
const CASE_LIMIT: Duration = Duration::from_secs(60);

fn cluster() -> Result<PgCluster> {
    PgCluster::builder()
        .standbys(1)
        .synchronous(true)
        .password("pw")
        .setting("synchronous_commit", "remote_apply")
        .setting("max_prepared_transactions", "10")
        .start()
}

/// Runs `cases.py CASE DSN`: its stdout, or an error with its stderr.
fn run_case(name: &str, dsn: &str) -> Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/cases.py");
    testkit::run_limited(Command::new("python3").args([script, name, dsn]), CASE_LIMIT)
        .context("python3 (the compatibility suite needs psycopg, asyncpg, ...: see README)")
}

/// The cases that depend on the client having a backend of its own, which transaction pooling
/// cannot give (README, "Backend PID"): its PID, and `pg_prepared_statements`, which lists the
/// statements of the server connection the transaction runs on, shared by every client.
const SESSION_MODE_ONLY: &[&str] = &[
    "psycopg_backend_pid",
    "asyncpg_backend_pid",
    "psycopg_prepared_statements_view",
];

#[test]
fn python_clients_get_the_same_answers() -> Result<()> {
    python_cases_through(|_| {}, &[])
}

/// The same suite through dbproxy in transaction pooling, with a pool smaller than the cases'
/// connections so that server connections really change hands between transactions.
#[test]
fn python_clients_get_the_same_answers_in_transaction_pooling() -> Result<()> {
    python_cases_through(
        |cfg| {
            cfg.pool.mode = dbproxy::pool::PoolMode::Transaction;
            cfg.pool.size = 4;
        },
        SESSION_MODE_ONLY,
    )
}

fn python_cases_through(tweak: impl FnOnce(&mut dbproxy::config::Config), skip: &[&str]) -> Result<()> {
    let cluster = cluster()?;
    let mut cfg = config_for(&cluster, Some("pw"));
    tweak(&mut cfg);
    let proxy = Proxy::start(cfg)?;
    let direct = cluster.primary().conn_string();
    let proxied = format!(
        "host=127.0.0.1 port={} user=postgres password=pw dbname=postgres",
        proxy.port()
    );
    let only = std::env::var("COMPAT_CASES").ok();
    let selected: Vec<&str> = match &only {
        Some(list) => list.split(',').map(str::trim).collect(),
        None => PYTHON_CASES.to_vec(),
    };
    let mut failures = Vec::new();
    for name in selected.into_iter().filter(|n| !skip.contains(n)) {
        let started = Instant::now();
        let want = run_case(name, &direct).with_context(|| format!("{name} directly against PostgreSQL"))?;
        let direct_took = started.elapsed();
        let got = run_case(name, &proxied);
        eprintln!(
            "{name}: {:.1} s direct, {:.1} s through dbproxy: {want}",
            direct_took.as_secs_f64(),
            (started.elapsed() - direct_took).as_secs_f64()
        );
        match got {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("{name}:\n  direct:  {want}\n  dbproxy: {got}")),
            Err(e) => failures.push(format!("{name}:\n  direct:  {want}\n  dbproxy: {e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} case(s) differ through dbproxy:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Connects with tokio-postgres and drives the connection in the background.
async fn connect(dsn: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The rows of a simple query, as text.
async fn simple(c: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let mut out = Vec::new();
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(out)
}

/// tokio-postgres's behaviours: statements it prepares as `sN`, reused and in transactions,
/// portals, binary parameters and results, COPY, and errors that leave the session usable.
async fn tokio_postgres_behaviours(dsn: &str) -> Result<Vec<String>> {
    use futures_util::{pin_mut, SinkExt, TryStreamExt};
    let mut c = connect(dsn).await?;
    let mut out = Vec::new();
    c.batch_execute("drop table if exists compat_tp; create table compat_tp (id int primary key, v text)")
        .await?;
    let insert = c.prepare("insert into compat_tp values ($1, $2)").await?;
    for i in 0..5 {
        c.execute(&insert, &[&i, &format!("v{i}")]).await?;
    }
    let select = c.prepare("select v from compat_tp where id = $1").await?;
    for i in 0..5 {
        out.push(c.query_one(&select, &[&i]).await?.get::<_, String>(0));
    }
    let arrays: Vec<i64> = c
        .query_one("select $1::int8[]", &[&vec![1i64, 2, 3]])
        .await?
        .get(0);
    out.push(format!("{arrays:?}"));
    let e = c
        .query_one("select v::int from compat_tp where id = $1", &[&1])
        .await;
    out.push(
        e.err()
            .and_then(|e| e.code().map(|c| c.code().to_string()))
            .unwrap_or_default(),
    );
    {
        let tx = c.transaction().await?;
        let portal = tx.bind("select id from compat_tp order by id", &[]).await?;
        for _ in 0..3 {
            let ids: Vec<i32> = tx
                .query_portal(&portal, 2)
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            out.push(format!("{ids:?}"));
        }
        tx.execute(&insert, &[&10, &"in tx"]).await?;
        out.push(format!(
            "{:?}",
            tx.query_one(&select, &[&10]).await?.get::<_, String>(0)
        ));
        tx.rollback().await?;
    }
    out.push(format!("{}", c.query(&select, &[&10]).await?.len()));
    let sink = c.copy_in("copy compat_tp from stdin").await?;
    pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"20\tcopied\n21\tcopied\n"))
        .await?;
    out.push(format!("{}", sink.finish().await?));
    let stream = c
        .copy_out("copy (select * from compat_tp order by id) to stdout")
        .await?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await?;
    out.push(String::from_utf8_lossy(&chunks.concat()).into_owned());
    out.push(format!(
        "{:?}",
        simple(&c, "select count(*), max(v) from compat_tp").await?
    ));
    c.batch_execute("drop table compat_tp").await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_gets_the_same_answers() -> Result<()> {
    support::bounded(async {
        let cluster = tokio::task::spawn_blocking(cluster).await??;
        let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
        let want = tokio_postgres_behaviours(&cluster.primary().conn_string()).await?;
        let got = tokio_postgres_behaviours(&proxy.conn_string("postgres", "pw")).await?;
        assert_eq!(got, want, "tokio-postgres through dbproxy vs directly");
        Ok(())
    })
    .await
}

/// How many statements dbproxy has sent to the standby (node1).
fn standby_queries(proxy: &Proxy) -> Result<f64> {
    queries(proxy, "node1", "standby")
}

/// How many statements dbproxy has sent to the primary (node0).
fn primary_queries(proxy: &Proxy) -> Result<f64> {
    queries(proxy, "node0", "primary")
}

fn queries(proxy: &Proxy, node: &str, role: &str) -> Result<f64> {
    let metrics = proxy.admin_get("/metrics")?;
    let prefix = format!("dbproxy_queries_total{{node=\"{node}\",role=\"{role}\"}}");
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(Ok(0.0), |v| v.trim().parse())?)
}

/// An unlogged table made behind dbproxy's back (straight on the primary): a read of it, which
/// the standby refuses (`cannot access temporary or unlogged relations during recovery`,
/// 0A000), is replayed on the primary, simple and extended; once the session ran DDL of its
/// own it has learned the table from the catalog, and reads of it, in a transaction too, go
/// to the primary without trying the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlogged_tables_are_read_on_the_primary() -> Result<()> {
    support::bounded(async {
        let cluster = tokio::task::spawn_blocking(cluster).await??;
        let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
        let mut c = connect(&proxy.conn_string("postgres", "pw")).await?;
        assert_eq!(simple(&c, "select 1").await?, [[Some("1".to_string())]]);
        // The counter moves once an answer is relayed, which may be after the client has it.
        wait_for("the first read to be counted", DEADLINE, || {
            Ok((standby_queries(&proxy)? >= 1.0).then_some(()))
        })?;
        cluster.primary().psql(
            "create unlogged table compat_behind (id int); insert into compat_behind values (1), (2)",
        )?;
        let count = "select count(*) from compat_behind";
        let before = standby_queries(&proxy)?;
        assert_eq!(simple(&c, count).await?, [[Some("2".to_string())]]);
        let n: i64 = c
            .query_one("select count(*) from compat_behind where id > $1", &[&0])
            .await?
            .get(0);
        assert_eq!(n, 2);
        wait_for(
            "both reads to be tried on the standby first, then replayed",
            DEADLINE,
            || Ok((standby_queries(&proxy)? >= before + 2.0).then_some(())),
        )?;
        c.batch_execute("create table if not exists compat_logged (id int)")
            .await?;
        let before = standby_queries(&proxy)?;
        let on_primary = primary_queries(&proxy)?;
        assert_eq!(simple(&c, count).await?, [[Some("2".to_string())]]);
        assert_eq!(
            simple(&c, &format!("begin; {count}; commit")).await?,
            [[Some("2".to_string())]]
        );
        // Both reads counted on the primary; a session counts its statements in order, so a try
        // on the standby before them would show by then.
        wait_for("both reads to be counted on the primary", DEADLINE, || {
            Ok((primary_queries(&proxy)? >= on_primary + 2.0).then_some(()))
        })?;
        assert_eq!(
            standby_queries(&proxy)?,
            before,
            "learned: nothing tried on the standby"
        );
        // In a transaction a standby's refusal could not be replayed: this read works only
        // because it goes to the primary at once.
        let tx = c.transaction().await?;
        let n: i64 = tx
            .query_one("select count(*) from compat_behind where id > $1", &[&1])
            .await?
            .get(0);
        assert_eq!(n, 1);
        tx.commit().await?;
        c.batch_execute("drop table compat_behind; drop table compat_logged")
            .await?;
        Ok(())
    })
    .await
}

/// A transaction whose reads started on the standby (a plain BEGIN) reads an unlogged table
/// dbproxy has not learned yet (made behind its back): the standby refuses (0A000), nothing of
/// that read reached the client, so the transaction moves to the primary as at a first write
/// (its BEGIN and savepoints replayed there, the standby's half rolled back) and the read is
/// answered there; simple and extended protocol. The table is learned: once the transaction
/// ended, reads of it go to the primary without trying the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlearned_unlogged_table_read_in_a_transaction_moves_it_to_the_primary() -> Result<()> {
    support::bounded(async {
        let cluster = tokio::task::spawn_blocking(cluster).await??;
        let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
        let mut c = connect(&proxy.conn_string("postgres", "pw")).await?;
        let one = |v: &str| vec![vec![Some(v.to_string())]];
        let recovery = "select pg_is_in_recovery()";
        assert_eq!(
            simple(&c, "select 1").await?,
            one("1"),
            "unlogged relations learned once"
        );
        cluster.primary().psql(
            "create unlogged table compat_unlearned (id int); insert into compat_unlearned values (1), (2)",
        )?;
        let count = "select count(*) from compat_unlearned";
        // Simple protocol: reads on the standby, a savepoint, then the unlearned table.
        simple(&c, "begin").await?;
        assert_eq!(
            simple(&c, recovery).await?,
            one("t"),
            "the reads start on the standby"
        );
        simple(&c, "savepoint a").await?;
        let before = standby_queries(&proxy)?;
        assert_eq!(simple(&c, count).await?, one("2"));
        assert!(standby_queries(&proxy)? > before, "tried on the standby first");
        assert_eq!(simple(&c, recovery).await?, one("f"), "the transaction moved");
        simple(&c, "insert into compat_unlearned values (3)").await?;
        simple(&c, "rollback to savepoint a").await?;
        assert_eq!(simple(&c, count).await?, one("2"), "savepoint a replayed there");
        simple(&c, "commit").await?;
        // Extended protocol: the table is made once the transaction read on the standby (the
        // session learns the unlogged relations between transactions, before the next
        // statement, so it would otherwise know this one already).
        let tx = c.transaction().await?;
        let r: bool = tx.query_one(recovery, &[]).await?.get(0);
        assert!(r, "the reads start on the standby");
        cluster.primary().psql(
            "create unlogged table compat_unlearned2 (id int); insert into compat_unlearned2 values (5)",
        )?;
        let before = standby_queries(&proxy)?;
        let n: i64 = tx
            .query_one("select count(*) from compat_unlearned2 where id > $1", &[&0])
            .await?
            .get(0);
        assert_eq!(n, 1);
        assert!(standby_queries(&proxy)? > before, "tried on the standby first");
        let r: bool = tx.query_one(recovery, &[]).await?.get(0);
        assert!(!r, "the transaction moved");
        tx.commit().await?;
        // Learned: no read of either table tries the standby any more.
        assert_eq!(simple(&c, "select 1").await?, one("1"));
        let before = standby_queries(&proxy)?;
        assert_eq!(simple(&c, count).await?, one("2"));
        assert_eq!(
            simple(&c, "select count(*) from compat_unlearned2").await?,
            one("1")
        );
        assert_eq!(
            standby_queries(&proxy)?,
            before,
            "learned: nothing tried on the standby"
        );
        c.batch_execute("drop table compat_unlearned; drop table compat_unlearned2")
            .await?;
        Ok(())
    })
    .await
}

/// Characters tried in every client encoding; each encoding's sample is made of those it can
/// represent both ways (GBK takes `€` from UTF8 as 0x80 but refuses 0x80 coming back). `表`, `ソ` and `許` end in byte 0x5C (a backslash) in SJIS and BIG5, where a
/// byte-wise reading of the text would see an escape inside a literal.
const ENCODING_CANDIDATES: &[&str] = &[
    "é", "ß", "€", "ж", "ї", "α", "ğ", "ą", "ő", "ש", "ا", "ก", "ā", "ŧ", "日", "表", "ソ", "許", "中", "한",
];

/// One run of `psql -f script` with `PGCLIENTENCODING=encoding`: stdout and stderr, as bytes,
/// interleaved as psql wrote them (errors name the script's path and line, the same in both runs).
fn psql_script(port: u16, encoding: &str, script: &std::path::Path) -> Result<Vec<u8>> {
    let psql = testkit::pg_bindir()?.join("psql");
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec timeout 60 \"$0\" -X -A -t -q -h 127.0.0.1 -U postgres -d postgres -p \"$1\" -f \"$2\" 2>&1")
        .arg(&psql)
        .arg(port.to_string())
        .arg(script)
        .env("PGCLIENTENCODING", encoding)
        .env("PGPASSWORD", "pw")
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .stdin(std::process::Stdio::null())
        .output()
        .context("psql")?;
    if out.status.code() == Some(124) {
        bail!("psql with {encoding} did not finish within 60 s");
    }
    Ok(out.stdout)
}

/// Every client encoding this PostgreSQL can convert to from the server's UTF8, with psql (bytes
/// in, bytes out, no driver's codec in between): query text with characters of that encoding in
/// literals, comments, a write, a balanced read, a transaction, SET, SQL PREPARE/EXECUTE and an
/// error quoting the text gives byte for byte the same answer directly and through dbproxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_encoding_gives_the_same_answers_through_psql() -> Result<()> {
    support::bounded(async {
        let cluster = tokio::task::spawn_blocking(cluster).await??;
        let proxy = Proxy::start(config_for(&cluster, Some("pw")))?;
        let mut c = connect(&cluster.primary().conn_string()).await?;
        c.batch_execute(
            "create or replace function compat_enc_hex(s text, e name) returns text language plpgsql as $$ \
             begin if convert_from(convert_to(s, e), e) = s then return encode(convert_to(s, e), 'hex'); end if; \
             return null; exception when others then return null; end $$; \
             create or replace function compat_enc_ok(e name) returns bool language plpgsql as $$ \
             begin perform set_config('client_encoding', e, true); return true; \
             exception when others then return false; end $$",
        )
        .await?;
        // Every encoding PostgreSQL knows that a client may ask for with this server.
        let mut encodings = Vec::new();
        for row in simple(
            &c,
            "select pg_encoding_to_char(i) from generate_series(0, 63) i \
             where pg_encoding_to_char(i) <> '' order by 1",
        )
        .await?
        {
            let name = row[0].clone().context("encoding name")?;
            let probe = c.transaction().await?;
            let ok: bool = probe
                .query_one("select compat_enc_ok($1)", &[&name])
                .await?
                .get(0);
            probe.rollback().await?;
            if ok {
                encodings.push(name);
            }
        }
        assert!(
            encodings.len() >= 30,
            "PostgreSQL 15 converts UTF8 to more than 30 client encodings, found {encodings:?}"
        );
        let dir = tempfile::tempdir()?;
        let before = standby_queries(&proxy)?;
        let mut tested = 0;
        for enc in &encodings {
            let mut sample = Vec::new();
            for ch in ENCODING_CANDIDATES {
                let hex: Option<String> = c
                    .query_one("select compat_enc_hex($1, $2)", &[&ch.to_string(), enc])
                    .await?
                    .get(0);
                if let Some(hex) = hex {
                    sample.extend(hex_bytes(&hex)?);
                    sample.push(b' ');
                }
            }
            let non_ascii = sample.iter().any(|b| *b >= 0x80);
            let script = dir.path().join(format!("{enc}.sql"));
            std::fs::write(&script, encoding_script(enc, &sample))?;
            let direct = tokio::task::block_in_place(|| psql_script(cluster.primary().port(), enc, &script))?;
            let proxied = tokio::task::block_in_place(|| psql_script(proxy.port(), enc, &script))?;
            assert!(
                direct == proxied,
                "{enc}: psql answers differ\n  direct:  {}\n  dbproxy: {}",
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&proxied)
            );
            // Not vacuous: the sample came back in the answers, and the script ran to its end.
            assert!(
                direct.windows(sample.len().max(1)).any(|w| w == &sample[..]) || sample.is_empty(),
                "{enc}: the sample is not in the answers: {}",
                String::from_utf8_lossy(&direct)
            );
            assert!(
                direct.ends_with(b"end\n"),
                "{enc}: the script did not run to its end: {}",
                String::from_utf8_lossy(&direct)
            );
            if non_ascii {
                tested += 1;
            }
        }
        assert!(
            tested >= 30,
            "at least 30 encodings were tried with non-ASCII text, only {tested} were"
        );
        assert!(
            standby_queries(&proxy)? > before,
            "the reads were balanced to the standby as well"
        );
        c.batch_execute("drop function compat_enc_hex(text, name); drop function compat_enc_ok(name)")
            .await?;
        Ok(())
    })
    .await
}

/// The script run in one encoding: `s` is the sample, already in that encoding's bytes.
fn encoding_script(enc: &str, s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = |parts: &[&[u8]]| {
        for p in parts {
            out.extend_from_slice(p);
        }
        out.push(b'\n');
    };
    let e = enc.as_bytes();
    line(&[b"drop table if exists compat_enc_all; create table compat_enc_all (enc text, v text);"]);
    line(&[b"show client_encoding;"]);
    line(&[
        b"select '",
        s,
        b"'::text, length('",
        s,
        b"'), octet_length('",
        s,
        b"'::text) > 0 /* ",
        s,
        b" */;",
    ]);
    line(&[b"insert into compat_enc_all values ('", e, b"', '", s, b"');"]);
    line(&[b"select enc from compat_enc_all where v = '", s, b"';"]);
    line(&[b"select E'", s, b"\\\\', '", s, b"' || '''';"]);
    line(&[b"set application_name = 'app ", s, b"';"]);
    line(&[b"select current_setting('application_name');"]);
    line(&[b"/* ", s, b" */ begin;"]);
    line(&[b"select count(*) from compat_enc_all where v <> '", s, b"';"]);
    line(&[b"commit;"]);
    line(&[b"prepare compat_enc_p(text) as select $1 || ' ", s, b"';"]);
    line(&[b"execute compat_enc_p('", s, b"');"]);
    line(&[b"deallocate compat_enc_p;"]);
    line(&[b"select '", s, b"'::int;"]);
    line(&[b"select v from compat_enc_all;"]);
    line(&[b"drop table compat_enc_all;"]);
    line(&[b"select 'end';"]);
    out
}

fn hex_bytes(hex: &str) -> Result<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).context("hex"))
        .collect()
}

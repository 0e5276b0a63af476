//! The test kit's own tests, against real PostgreSQL servers: replication, crash + promotion,
//! synchronous commit waiting, and a hung (SIGSTOPped) server.

use std::sync::mpsc;
use std::time::Duration;

use testkit::{wait_for, PgCluster, DEADLINE};

#[test]
fn rows_written_on_the_primary_reach_every_standby() {
    let cluster = PgCluster::builder().standbys(2).start().unwrap();
    let p = cluster.primary();
    p.psql("create table t (id int primary key, v text); insert into t values (1, 'one')")
        .unwrap();
    cluster.wait_replicated().unwrap();
    for s in cluster.standbys() {
        assert_eq!(
            s.psql("select v from t where id = 1").unwrap(),
            "one",
            "on {}",
            s.name()
        );
        assert_eq!(s.psql("select pg_is_in_recovery()").unwrap(), "t");
        // A standby refuses writes with SQLSTATE 25006; dbproxy's replay depends on this.
        let err = s.psql("insert into t values (2, 'two')").unwrap_err();
        assert!(format!("{err:#}").contains("read-only transaction"), "{err:#}");
    }
    assert_eq!(p.psql("select pg_is_in_recovery()").unwrap(), "f");
}

#[test]
fn kill9_then_promote_gives_a_writable_primary_that_the_other_standby_follows() {
    let cluster = PgCluster::builder().standbys(2).start().unwrap();
    let old = cluster.node(0);
    old.psql("create table t (id int primary key); insert into t values (1)")
        .unwrap();
    cluster.wait_replicated().unwrap();

    old.kill9().unwrap();
    assert!(!old.is_running());
    assert!(old.psql_timeout("select 1", Duration::from_secs(5)).is_err());

    cluster.promote(1).unwrap();
    let new = cluster.primary();
    assert_eq!(new.name(), "node1");
    new.psql("insert into t values (2)").unwrap();
    assert_eq!(new.psql("select count(*) from t").unwrap(), "2");

    // The remaining standby follows the new primary across the timeline switch.
    let other = cluster.node(2);
    other.follow(new).unwrap();
    cluster.wait_replicated().unwrap();
    assert_eq!(other.psql("select count(*) from t").unwrap(), "2");

    // The crashed node can be started again; it comes back believing it is a primary, which is
    // exactly the split-brain risk dbproxy has to fence.
    old.start().unwrap();
    assert_eq!(old.psql("select pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(old.psql("select count(*) from t").unwrap(), "1");
}

#[test]
fn synchronous_commit_waits_while_the_standby_is_stopped() {
    let cluster = PgCluster::builder()
        .standbys(1)
        .synchronous(true)
        .start()
        .unwrap();
    let p = cluster.primary();
    let s = cluster.standby(0);
    assert_eq!(
        p.psql("select sync_state from pg_stat_replication").unwrap(),
        "sync"
    );
    p.psql("create table t (id int)").unwrap();

    s.stop().unwrap();
    assert!(!s.is_running());

    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let r = p.psql_timeout("insert into t values (1)", DEADLINE);
            tx.send(r.map_err(|e| format!("{e:#}"))).unwrap();
        });
        // The commit is parked waiting for the synchronous standby: the server says so itself.
        wait_for("the commit to wait for the synchronous standby", DEADLINE, || {
            let n = p.psql("select count(*) from pg_stat_activity where wait_event = 'SyncRep'")?;
            Ok((n == "1").then_some(()))
        })
        .unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the commit returned while no synchronous standby was up"
        );

        s.start().unwrap();
        let done = rx
            .recv_timeout(DEADLINE)
            .expect("the commit finished once the standby was back");
        done.unwrap();
    });
    cluster.wait_replicated().unwrap();
    assert_eq!(s.psql("select count(*) from t").unwrap(), "1");
}

#[test]
fn a_sigstopped_server_accepts_but_never_answers() {
    let cluster = PgCluster::builder().start().unwrap();
    let p = cluster.primary();
    p.sigstop().unwrap();
    let err = p.psql_timeout("select 1", Duration::from_secs(2)).unwrap_err();
    assert!(p.is_running(), "a stopped server is still a live process");
    drop(err);
    p.sigcont().unwrap();
    assert_eq!(p.psql("select 1").unwrap(), "1");
    p.stop().unwrap();
    p.start().unwrap();
    assert_eq!(p.psql("select 2").unwrap(), "2");
}

#[test]
fn password_clusters_require_scram_over_tcp() {
    let cluster = PgCluster::builder()
        .standbys(1)
        .password("s3cret")
        .start()
        .unwrap();
    let p = cluster.primary();
    assert!(p.conn_string().contains("password=s3cret"));
    assert_eq!(p.psql("show password_encryption").unwrap(), "scram-sha-256");
    let hba =
        p.psql("select string_agg(distinct auth_method, ',') from pg_hba_file_rules where type = 'host'");
    assert_eq!(hba.unwrap(), "scram-sha-256");
    p.psql("create table t (x int); insert into t values (5)")
        .unwrap();
    cluster.wait_replicated().unwrap();
    assert_eq!(cluster.standby(0).psql("select x from t").unwrap(), "5");
}

//! Debian's unchanged `pcp_*` binaries against pgpool-II and dbproxy started from the same
//! pgpool.conf and pcp.conf, with the answers compared, and bad input on the PCP port.

mod pgpool;
mod support;

use anyhow::Result;
use pgpool::*;
use testkit::{wait_for, PgCluster, DEADLINE};

/// pgpool-II and dbproxy started from the same pgpool.conf and pcp.conf on `c` (only their ports
/// differ), and a `.pcppass` file with the right password for both PCP ports.
struct Pair {
    pg_pcp: u16,
    db_port: u16,
    db_pcp: u16,
    passfile: std::path::PathBuf,
    pgpool: Pgpool,
    proxy: Dbproxy,
}

fn start_pair(c: &PgCluster, dir: &std::path::Path) -> Result<Pair> {
    let (pg_port, pg_pcp, db_port, db_pcp) = (
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
        testkit::free_port()?,
    );
    let (conf, pcp_conf) = shared_files(c, dir, pg_port, pg_pcp, "")?;
    let passfile = dir.join("pcppass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{pg_pcp}:pcpadmin:secret\n127.0.0.1:{db_pcp}:pcpadmin:secret\n"),
    )?;
    private(&passfile)?;
    let pgpool = Pgpool::start(&conf, &pcp_conf, pg_port)?;
    let proxy = Dbproxy::start(
        &conf,
        &[
            format!("listen=\"127.0.0.1:{db_port}\""),
            format!("pcp.listen=\"127.0.0.1:{db_pcp}\""),
        ],
    )?;
    Ok(Pair {
        pg_pcp,
        db_port,
        db_pcp,
        passfile,
        pgpool,
        proxy,
    })
}

/// Mode 0600, as libpq wants of a password file.
fn private(f: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[test]
fn pcp_commands_answer_as_pgpool_does() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    // The same files; only the ports differ, both running at once.
    let Pair {
        pg_pcp,
        db_port,
        db_pcp,
        passfile,
        pgpool,
        proxy,
    } = start_pair(&c, dir.path())?;
    let wrongpass = dir.path().join("wrongpass");
    std::fs::write(&wrongpass, "*:*:pcpadmin:wrong\n")?;
    private(&wrongpass)?;
    let both = |cmd: &str, args: &[&str]| -> Result<[(i32, String, String); 2]> {
        Ok([
            pcp(cmd, args, pg_pcp, &passfile)?,
            pcp(cmd, args, db_pcp, &passfile)?,
        ])
    };
    let [a, b] = both("pcp_node_count", &[])?;
    assert_eq!((a.0, a.1.as_str()), (0, "2"), "{a:?}");
    assert_eq!((b.0, b.1.as_str()), (0, "2"), "{b:?}");
    // Node info: host, port, status, weight, status names and roles as pgpool gives them.
    for args in [&["-n", "0"][..], &["-n", "1"], &[]] {
        let [a, b] = both("pcp_node_info", args)?;
        assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
        let la: Vec<Vec<String>> = a.1.lines().map(|l| fields(l, 8)).collect();
        let lb: Vec<Vec<String>> = b.1.lines().map(|l| fields(l, 8)).collect();
        assert_eq!(la, lb, "pcp_node_info {args:?}:\n{}\n{}", a.1, b.1);
        for l in b.1.lines() {
            let time = l.rsplit(' ').next().unwrap_or("");
            assert_eq!(
                time.len(),
                8,
                "the last field is the time of the last change: {l}"
            );
        }
    }
    let [a, b] = both("pcp_node_info", &["-v", "-n", "1"])?;
    let titles = |s: &str| {
        s.lines()
            .map(|l| l.split(':').next().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(titles(&a.1), titles(&b.1));
    let [a, b] = both("pcp_health_check_stats", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(fields(&a.1, 5), fields(&b.1, 5));
    assert_eq!(a.1.split(' ').count(), b.1.split(' ').count(), "{}\n{}", a.1, b.1);
    let [a, b] = both("pcp_health_check_stats", &["-v", "-n", "0"])?;
    assert_eq!(titles(&a.1), titles(&b.1));
    let [a, b] = both("pcp_proc_count", &[])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(b.1.trim(), proxy.pid().to_string());
    // Errors: the same message from both.
    let [a, b] = both("pcp_node_info", &["-n", "7"])?;
    assert!(a.2.starts_with("ERROR:  informing node info failed"), "{a:?}");
    assert!(b.2.starts_with("ERROR:  informing node info failed"), "{b:?}");
    let [a, b] = both("pcp_health_check_stats", &["-n", "9"])?;
    assert!(
        a.2.starts_with("ERROR:  informing health check stats info failed"),
        "{a:?}"
    );
    assert!(
        b.2.starts_with("ERROR:  informing health check stats info failed"),
        "{b:?}"
    );
    for port in [pg_pcp, db_pcp] {
        let (code, _, err) = pcp("pcp_node_count", &[], port, &wrongpass)?;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.starts_with("FATAL:  authentication failed for user \"pcpadmin\""),
            "{err}"
        );
    }
    // Detach a standby: down in both, and dbproxy routes reads to the primary only.
    let [a, b] = both("pcp_detach_node", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    let status = |port| -> Result<String> {
        let (_, out, _) = pcp("pcp_node_info", &["-n", "1"], port, &passfile)?;
        Ok(fields(&out, 5).get(4).cloned().unwrap_or_default())
    };
    wait_for("node 1 detached in both", DEADLINE, || {
        Ok((status(pg_pcp)? == "down" && status(db_pcp)? == "down").then_some(()))
    })?;
    let p0 = c.node(0).port().to_string();
    for _ in 0..5 {
        assert_eq!(psql(db_port, "select inet_server_port()")?, p0);
    }
    // Detaching the primary is refused: it would fail over while the primary runs.
    let (_, _, err) = pcp("pcp_detach_node", &["-n", "0"], db_pcp, &passfile)?;
    assert!(
        err.starts_with("ERROR:  detaching the primary is not supported"),
        "{err}"
    );
    // Attach it again: dbproxy checks it streams from the primary, then routes to it.
    let [a, b] = both("pcp_attach_node", &["-n", "1"])?;
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(status(db_pcp)?, "up");
    drop(pgpool);

    // pcp_promote_node -s: dbproxy switches over for real; the old primary is detached.
    let (code, out, err) = pcp("pcp_promote_node", &["-s", "-n", "1"], db_pcp, &passfile)?;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    let (_, out, _) = pcp("pcp_node_info", &["-n", "1"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[6], "primary", "{out}");
    let (_, out, _) = pcp("pcp_node_info", &["-n", "0"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[4], "down", "{out}");
    assert_eq!(
        psql(db_port, "select inet_server_port()")?,
        c.node(1).port().to_string()
    );
    let (_, _, err) = pcp("pcp_promote_node", &["-s", "-n", "1"], db_pcp, &passfile)?;
    assert!(err.contains("already primary"), "{err}");
    Ok(())
}

/// Bad input on the PCP port: each gets pgpool's FATAL error and the connection is closed.
#[test]
fn pcp_bad_input_gets_a_clean_error() -> Result<()> {
    use std::io::{Read, Write};
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let port = testkit::free_port()?;
    let conf = dir.path().join("pgpool.conf");
    std::fs::write(
        &conf,
        pgpool_conf(
            &c,
            &[false, false],
            &format!("pcp_listen_addresses = '127.0.0.1'\npcp_port = {port}\n"),
        ),
    )?;
    std::fs::write(
        dir.path().join("pcp.conf"),
        format!("pcpadmin:{}\n", dbproxy::pcp::protocol::password_md5("secret")),
    )?;
    let _proxy = Dbproxy::start(&conf, &[])?;
    let exchange = |bytes: &[u8]| -> Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(bytes)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?; // the server closes: read_to_end ends
        Ok(out)
    };
    let fatal = |out: &[u8], what: &str| {
        let text = String::from_utf8_lossy(out);
        assert_eq!(out.first(), Some(&b'E'), "{text}");
        assert!(text.contains("SFATAL") && text.contains(what), "{text}");
    };
    // A command before logging in.
    fatal(
        &exchange(b"L\0\0\0\x04")?,
        "authentication failed for new PCP connection",
    );
    // A length that is too large, and one that is too small.
    fatal(&exchange(b"I\0\x01\0\0")?, "invalid PCP packet length 65536");
    fatal(&exchange(b"I\0\0\0\x02")?, "invalid PCP packet length 2");
    // A login without a salt first, and a malformed login.
    fatal(&exchange(b"R\0\0\0\x0apcp\0x\0")?, "authentication failed");
    let mut salted = b"M\0\0\0\x04".to_vec();
    salted.extend_from_slice(b"R\0\0\0\x08pcp\0");
    let out = exchange(&salted)?;
    assert_eq!(out[0], b'm', "the salt comes first");
    fatal(&out[9..], "no password hash");
    // A client that says nothing, or trickles a login, is not a problem for the next one, and
    // is closed once the login time is up.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port))?;
    slow.write_all(b"M\0")?;
    fatal(&exchange(b"L\0\0\0\x04")?, "authentication failed");
    let started = std::time::Instant::now();
    for s in [&mut idle, &mut slow] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        assert!(rest.is_empty(), "{rest:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(25),
        "closed after {waited:?}"
    );
    Ok(())
}

/// `pcp_promote_node` without `-s`: pgpool-II only relabels its own idea of the primary and
/// leaves the real promotion to the operator's scripts; dbproxy answers the same command line the
/// same way and switches over for real, so the node it names primary is one that takes writes.
#[test]
fn pcp_promote_node_without_switchover_promotes_for_real() -> Result<()> {
    let c = PgCluster::builder().standbys(1).start()?;
    let dir = tempdir()?;
    let Pair {
        pg_pcp,
        db_port,
        db_pcp,
        passfile,
        pgpool,
        proxy,
    } = start_pair(&c, dir.path())?;
    // An unknown node: the same words from both, detail included (pgpool words it differently
    // per command). Attach and detach are the exception: pgpool-II answers "Command Successful"
    // and does nothing, dbproxy says the id is wrong.
    for cmd in ["pcp_node_info", "pcp_health_check_stats", "pcp_promote_node"] {
        let a = pcp(cmd, &["-n", "7"], pg_pcp, &passfile)?;
        let b = pcp(cmd, &["-n", "7"], db_pcp, &passfile)?;
        assert_eq!(a, b, "{cmd}");
        assert!(a.2.starts_with("ERROR:  "), "{cmd}: {a:?}");
    }
    for cmd in ["pcp_attach_node", "pcp_detach_node"] {
        let b = pcp(cmd, &["-n", "7"], db_pcp, &passfile)?;
        assert!(b.2.ends_with("DETAIL:  invalid node ID 7"), "{cmd}: {b:?}");
    }
    // Promoting the primary itself: the same refusal (pgpool-II says FATAL).
    let a = pcp("pcp_promote_node", &["-n", "0"], pg_pcp, &passfile)?;
    let b = pcp("pcp_promote_node", &["-n", "0"], db_pcp, &passfile)?;
    assert_eq!(a, b);
    assert!(a.2.starts_with("FATAL:  invalid promote request"), "{a:?}");
    // pgpool-II takes the request and answers success; its node 1 is still a standby.
    let a = pcp("pcp_promote_node", &["-n", "1"], pg_pcp, &passfile)?;
    drop(pgpool);
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "t");
    // dbproxy: the same command line, the same answer, and a real switchover behind it.
    let b = pcp("pcp_promote_node", &["-n", "1"], db_pcp, &passfile)?;
    assert_eq!((a.0, a.1.as_str()), (b.0, b.1.as_str()), "{a:?} {b:?}");
    assert_eq!(b.0, 0, "{b:?}");
    assert_eq!(c.node(1).psql("select pg_is_in_recovery()")?, "f");
    let (_, out, _) = pcp("pcp_node_info", &["-n", "1"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[6], "primary", "{out}");
    let wrote = psql(
        db_port,
        "create table promoted_by_pcp(x int); insert into promoted_by_pcp values (1); select inet_server_port()",
    )?;
    assert_eq!(wrote.lines().last(), Some(c.node(1).port().to_string().as_str()));
    // The old primary takes no writes: dbproxy fenced it and made it read-only.
    let (_, out, _) = pcp("pcp_node_info", &["-n", "0"], db_pcp, &passfile)?;
    assert_eq!(fields(&out, 7)[4], "down", "{out}");
    assert!(c.node(0).psql("create table on_old_primary(x int)").is_err());
    let status = proxy.status()?;
    assert_eq!(status["history"][0]["kind"], "switchover", "{status}");
    Ok(())
}

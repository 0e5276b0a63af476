//! A collector restarted while samples wait in its spool file loses none of them, even when the
//! previous run died in the middle of writing a line.

mod support;

use std::io::Write;

use anyhow::Result;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_non_empty_spool_file_loses_nothing() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "restart-host";
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().stop()).await??;

    // First run: the database is down from the start, so every sample goes to the spool file.
    let first = spawn(config(cluster.primary(), &spool, host));
    let stats = first.stats.clone();
    wait_for("three spooled samples", move || {
        Ok((stats.produced() >= 3).then_some(()))
    })
    .await?;
    let first = first.stop().await?;
    assert_eq!(first.written(), 0);
    let text = std::fs::read_to_string(&spool)?;
    let spooled: Vec<schema::Sample> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(spooled.len() as u64, first.produced(), "every sample was saved");
    // A crash mid-append leaves a torn line behind; it must not cost the others.
    let mut f = std::fs::OpenOptions::new().append(true).open(&spool)?;
    f.write_all(br#"{"host":"restart-host","sampled_at":"2026-"#)?;
    drop(f);

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.primary().start()).await??;
    let second = spawn(config(cluster.primary(), &spool, host));
    let (cl, stats) = (cluster.clone(), second.stats.clone());
    let want = first.produced();
    wait_for("old and new samples in the database", move || {
        let total = want + stats.produced();
        Ok(
            (stats.produced() >= 2 && stats.pending() == 0 && count(cl.primary(), host)? == total)
                .then_some(()),
        )
    })
    .await?;
    let second = second.stop().await?;
    assert_eq!(second.recovered(), first.produced());

    let rows = rows(cluster.primary(), host)?;
    assert_eq!(rows.len() as u64, first.produced() + second.produced());
    assert_in_order_once(&rows);
    // The spooled samples are the first ones stored, exactly as they were taken.
    for (row, s) in rows.iter().zip(&spooled) {
        let micros = s.sampled_at.duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
        assert_eq!(row.1, micros);
    }
    assert_eq!(std::fs::metadata(&spool)?.len(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_the_database_refuses_does_not_block_the_rest() -> Result<()> {
    let cluster = start_db().await?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let host = "poison-host";
    // A hand-edited (or foreign) spool file: the first sample breaks a table constraint.
    let good: schema::Sample = {
        let mut s = collector::sample::Sampler::new("/proc", host.into());
        s.prime()?;
        s.sample()?
    };
    let mut bad = good.clone();
    bad.sampled_at -= std::time::Duration::from_secs(1);
    bad.cpu_percent = Some(1000.0);
    std::fs::write(
        &spool,
        format!(
            "{}\n{}\n",
            serde_json::to_string(&bad)?,
            serde_json::to_string(&good)?
        ),
    )?;

    let c = spawn(config(cluster.primary(), &spool, host));
    let (cl, stats) = (cluster.clone(), c.stats.clone());
    wait_for("the good samples past the bad one", move || {
        let want = 1 + stats.produced();
        Ok((stats.produced() >= 2 && count(cl.primary(), host)? == want).then_some(()))
    })
    .await?;
    let stats = c.stop().await?;
    assert_eq!(stats.rejected(), 1);
    assert_eq!(stats.recovered(), 2);
    let rows = rows(cluster.primary(), host)?;
    assert_in_order_once(&rows);
    let first = good.sampled_at.duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    assert_eq!(rows[0].1, first, "the valid spooled sample is stored first");
    Ok(())
}

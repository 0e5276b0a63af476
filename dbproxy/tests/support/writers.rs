//! Clients writing unique ids through dbproxy, each on its own connection, reconnecting after a
//! lost session: the failover and rejoin drills' load. Every acknowledged id is kept with when it
//! was sent and when it was acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use testkit::DEADLINE;

use super::Proxy;

/// One acknowledged write: its id, when it was sent, when it was acknowledged.
type Ack = (i64, Instant, Instant);

pub struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<BTreeMap<String, usize>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `n` writers inserting into table `t` through `proxy` as `postgres`.
    pub fn start(proxy: &Proxy, n: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let next = Arc::new(AtomicI64::new(1_000_000));
        let conn = proxy.conn_string("postgres", "pw");
        let tasks = (0..n)
            .map(|_| {
                let (stop, acked, errors, next, conn) = (
                    stop.clone(),
                    acked.clone(),
                    errors.clone(),
                    next.clone(),
                    conn.clone(),
                );
                tokio::spawn(async move {
                    let mut client: Option<tokio_postgres::Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match &client {
                            Some(c) if !c.is_closed() => c,
                            _ => {
                                match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                                    Ok((c, driver)) => {
                                        tokio::spawn(driver);
                                        client = Some(c);
                                    }
                                    Err(e) => {
                                        *errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                    }
                                }
                                continue;
                            }
                        };
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        let sent = Instant::now();
                        match c.execute("insert into t (id) values ($1)", &[&id]).await {
                            Ok(_) => acked.lock().unwrap().push((id, sent, Instant::now())),
                            Err(e) => {
                                *errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            errors,
            tasks,
        }
    }

    /// Writes acknowledged after `t`.
    pub fn acked_after(&self, t: Instant) -> usize {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, at)| *at > t)
            .count()
    }

    /// Waits until some write was acknowledged after `t`.
    pub async fn wait_acked_after(&self, t: Instant) -> Result<()> {
        self.wait_acked(t, 1).await
    }

    /// Waits until `n` writes were acknowledged after `t`.
    pub async fn wait_acked(&self, t: Instant, n: usize) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while self.acked_after(t) < n {
            if Instant::now() > deadline {
                bail!("no write acknowledged; errors: {:?}", self.errors.lock().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until a write sent after `t` is acknowledged; returns when it was.
    pub async fn first_ack_after(&self, t: Instant) -> Result<Instant> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let first = self
                .acked
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, sent, _)| *sent > t)
                .map(|(_, _, at)| *at)
                .min();
            if let Some(at) = first {
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!("no write acknowledged; errors: {:?}", self.errors.lock().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writers; the acknowledged ids and the errors seen, by kind.
    pub async fn stop(self) -> (Vec<i64>, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
        let ids = self.acked.lock().unwrap().iter().map(|(id, _, _)| *id).collect();
        let errors = self.errors.lock().unwrap().clone();
        (ids, errors)
    }
}

/// An error's SQLSTATE, or `closed` / `other`.
pub fn kind(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None if e.is_closed() => "closed".into(),
        None => "other".into(),
    }
}

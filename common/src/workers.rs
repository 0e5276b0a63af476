//! Serving threads: one single-threaded tokio runtime per thread, each accepted connection handed
//! whole to the least loaded one.
//!
//! A proxy's work is a chain of small reads and writes on sockets; on tokio's work-stealing
//! scheduler every readiness event can wake another worker thread, and on a busy 2-core machine
//! those futex wake-ups and the cache lines that bounce between cores cost more than the proxying
//! itself. A connection here lives and dies on one thread, as in nginx's or PgBouncer's event
//! loops: its socket, timers and tasks belong to that thread's runtime, and crossing threads
//! happens once, when the connection is handed over.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

thread_local! {
    static INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the serving thread this runs on (0 outside serving threads), for state kept
/// per thread, such as pools of upstream connections registered with that thread's runtime.
pub fn current_index() -> usize {
    INDEX.with(|i| i.get())
}

/// How many threads `Workers::start(_, n)` starts: `n`, or one per available core for 0.
pub fn resolve(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A set of serving threads. Dropping it stops them once their runtime's tasks are dropped.
pub struct Workers {
    threads: Vec<Worker>,
    next: AtomicUsize,
    stop: CancellationToken,
}

struct Worker {
    handle: tokio::runtime::Handle,
    live: Arc<AtomicUsize>,
}

/// Counts a connection on its worker until the connection's future ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` threads named `name-N`; 0 means one per available core.
    pub fn start(name: &str, n: usize) -> io::Result<Workers> {
        let n = resolve(n);
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("{name}-{i}"))
                .build()?;
            let handle = rt.handle().clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    INDEX.with(|x| x.set(i));
                    rt.block_on(stop.cancelled())
                })?;
            threads.push(Worker {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Workers {
            threads,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// How many threads serve.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Always false: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Connections now served, per thread.
    pub fn load(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }

    /// Moves `stream` to the thread serving the fewest connections (ties taken in turn) and runs
    /// `serve(stream)` there. If the socket cannot be moved, it is closed and the error logged.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.threads.len();
        let worker = (0..n)
            .map(|k| &self.threads[(start + k) % n])
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
            .expect("at least one worker");
        // Deregistered from this runtime's reactor here, registered with the worker's there.
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        worker.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(worker.live.clone());
        worker.handle.spawn(async move {
            let _live = live;
            match TcpStream::from_std(std) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!(error = %e, "cannot register a connection on a worker"),
            }
        });
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_are_spread_and_served_on_worker_threads() {
        let workers = Workers::start("t", 2).unwrap();
        assert_eq!(workers.len(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let c = TcpStream::connect(addr).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            workers.serve(s, |mut s| async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                assert_eq!(name, format!("t-{}", current_index()));
                let mut b = [0u8; 1];
                // Hold the connection until the client speaks, then say which thread served it.
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(name.as_bytes()).await;
                }
            });
            clients.push(c);
        }
        // Two connections on each thread: the least loaded one gets the next.
        assert_eq!(workers.load(), vec![2, 2]);
        let mut names = Vec::new();
        for mut c in clients {
            c.write_all(b"?").await.unwrap();
            let mut name = String::new();
            c.read_to_string(&mut name).await.unwrap();
            names.push(name);
        }
        names.sort();
        assert_eq!(names, ["t-0", "t-0", "t-1", "t-1"]);
        // Finished connections are no longer counted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.load() != vec![0, 0] {
            assert!(std::time::Instant::now() < deadline, "load {:?}", workers.load());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

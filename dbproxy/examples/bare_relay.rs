//! A relay that only copies bytes, the reference `bench/db.sh` measures proxies against.
//!
//! Each accepted client gets one connection to a fixed backend, and the bytes go both ways
//! untouched, on one thread, with mio and no async runtime. Nothing is parsed, routed or counted,
//! so no proxy that reads the protocol can be faster on the same machine. Like PgBouncer's
//! event loop, a socket is registered for reading only, and for writing only while bytes wait
//! to be written to it. The backend connection is made with a blocking connect (5 s at most)
//! while the loop waits: fine for a benchmark whose clients all connect before they start.
//!
//! Usage: `bare_relay LISTEN=BACKEND [LISTEN=BACKEND ...]`, for example
//! `cargo run --release -p dbproxy --example bare_relay -- 127.0.0.1:7000=127.0.0.1:5432`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

/// One socket of a pair.
struct Side {
    sock: TcpStream,
    /// The index of the other socket of the pair.
    peer: usize,
    /// Bytes read from the peer that this socket did not take yet.
    pending: Vec<u8>,
    /// Registered for writability (`pending` is not empty).
    writing: bool,
    /// Reading from this socket stopped because the peer's `pending` is not empty.
    paused: bool,
}

struct Relay {
    registry: Registry,
    /// Indexed by token minus the number of listeners; a closed pair's places are not reused
    /// (a benchmark opens a few hundred connections).
    sides: Vec<Option<Side>>,
    buf: Vec<u8>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        eprintln!("usage: bare_relay LISTEN=BACKEND [LISTEN=BACKEND ...]");
        std::process::exit(if args.is_empty() { 2 } else { 0 });
    }
    if let Err(e) = run(&args) {
        eprintln!("bare_relay: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> io::Result<()> {
    let bad = |a: &str| {
        io::Error::new(
            ErrorKind::InvalidInput,
            format!("expected LISTEN=BACKEND, got {a:?}"),
        )
    };
    let mut poll = Poll::new()?;
    let mut listeners = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let (l, b) = a.split_once('=').ok_or_else(|| bad(a))?;
        let listen: SocketAddr = l.parse().map_err(|_| bad(a))?;
        let backend: SocketAddr = b.parse().map_err(|_| bad(a))?;
        let mut listener = TcpListener::bind(listen)?;
        poll.registry()
            .register(&mut listener, Token(i), Interest::READABLE)?;
        listeners.push((listener, backend));
    }
    let base = listeners.len();
    let mut relay = Relay {
        registry: poll.registry().try_clone()?,
        sides: Vec::new(),
        buf: vec![0; 16 * 1024],
    };
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            let t = ev.token().0;
            if t < base {
                let (listener, backend) = &listeners[t];
                while let Ok((client, _)) = listener.accept() {
                    if let Err(e) = relay.pair(client, *backend, base) {
                        eprintln!("bare_relay: cannot reach {backend}: {e}");
                    }
                }
                continue;
            }
            let i = t - base;
            if ev.is_writable() {
                relay.flush(i, base);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                relay.pump(i, base);
            }
        }
    }
}

impl Relay {
    fn pair(&mut self, client: TcpStream, backend: SocketAddr, base: usize) -> io::Result<()> {
        let server = std::net::TcpStream::connect_timeout(&backend, Duration::from_secs(5))?;
        server.set_nonblocking(true)?;
        let server = TcpStream::from_std(server);
        let (c, s) = (self.sides.len(), self.sides.len() + 1);
        for (i, mut sock, peer) in [(c, client, s), (s, server, c)] {
            sock.set_nodelay(true)?;
            self.registry
                .register(&mut sock, Token(base + i), Interest::READABLE)?;
            self.sides.push(Some(Side {
                sock,
                peer,
                pending: Vec::new(),
                writing: false,
                paused: false,
            }));
        }
        Ok(())
    }

    /// Copies what socket `i` has to its peer, until it has no more, the peer stops taking it
    /// or either side ends.
    fn pump(&mut self, i: usize, base: usize) {
        loop {
            let Some(p) = self.sides.get(i).and_then(Option::as_ref).map(|s| s.peer) else {
                return;
            };
            let peer_blocked = self.sides[p].as_ref().is_some_and(|s| !s.pending.is_empty());
            let Some(me) = self.sides[i].as_mut() else { return };
            if peer_blocked {
                me.paused = true;
                return;
            }
            let n = match me.sock.read(&mut self.buf) {
                Ok(0) => return self.close(i),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(i),
            };
            let Some(peer) = self.sides[p].as_mut() else {
                return self.close(i);
            };
            let written = match peer.sock.write(&self.buf[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(_) => return self.close(i),
            };
            if written < n {
                peer.pending.extend_from_slice(&self.buf[written..n]);
                peer.writing = true;
                let both = Interest::READABLE | Interest::WRITABLE;
                if self
                    .registry
                    .reregister(&mut peer.sock, Token(base + p), both)
                    .is_err()
                {
                    return self.close(i);
                }
            }
            // A short read emptied the socket: the next bytes come with a new readiness edge.
            if n < self.buf.len() {
                return;
            }
        }
    }

    /// Writes what waits for socket `i`; once it is all written, reads its peer again.
    fn flush(&mut self, i: usize, base: usize) {
        let Some(me) = self.sides.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if !me.writing {
            return;
        }
        while !me.pending.is_empty() {
            match me.sock.write(&me.pending) {
                Ok(w) => {
                    me.pending.drain(..w);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close(i),
            }
        }
        me.writing = false;
        if self
            .registry
            .reregister(&mut me.sock, Token(base + i), Interest::READABLE)
            .is_err()
        {
            return self.close(i);
        }
        let p = me.peer;
        if self.sides[p]
            .as_mut()
            .is_some_and(|s| std::mem::take(&mut s.paused))
        {
            self.pump(p, base);
        }
    }

    /// Closes socket `i` and its peer.
    fn close(&mut self, i: usize) {
        let Some(mut me) = self.sides.get_mut(i).and_then(Option::take) else {
            return;
        };
        let _ = self.registry.deregister(&mut me.sock);
        if let Some(mut peer) = self.sides.get_mut(me.peer).and_then(Option::take) {
            let _ = self.registry.deregister(&mut peer.sock);
        }
    }
}

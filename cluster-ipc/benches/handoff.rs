//! Codec cost and connection hand-off round trips, with the bare syscalls beside them.
//!
//! Run with `cargo bench -p cluster-ipc`. A small harness rather than criterion: each case is
//! warmed up, timed over several repetitions, and the median per operation is printed.
//!
//! A round trip is what the master and a worker do per connection: the master sends
//! `NewConn` with the connection's fd, the worker receives it and replies `Accepted`, the
//! master receives that. The bare version does the same with one `sendmsg` + `SCM_RIGHTS`,
//! one `recvmsg`, and a small reply each way, over a raw socketpair, using the crate's own
//! syscall wrappers (its `sys.rs` is compiled into this bench, so the comparison isolates what
//! `Channel` adds on top of the system calls and all unsafe code stays in that one file).

#[path = "../src/sys.rs"]
#[allow(dead_code, unused_imports)]
mod sys;

use std::collections::VecDeque;
use std::error::Error;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use cluster_core::{ConnId, ListenAddr, ListenSpec, Message, Peer, Seq, ServerId};
use cluster_ipc::frame::{self, DEFAULT_MAX_FRAME};
use cluster_ipc::{Channel, IpcError};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const REPS: usize = 7;
const WAIT: Option<Duration> = Some(Duration::from_secs(30));

/// Median nanoseconds per iteration of `run(iters)` over `REPS` timed repetitions, after one
/// untimed warm-up of a tenth of the work.
fn median_ns(iters: u64, mut run: impl FnMut(u64) -> Result<()>) -> Result<f64> {
    run((iters / 10).max(1))?;
    let mut per_iter = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let t = Instant::now();
        run(iters)?;
        per_iter.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    per_iter.sort_by(f64::total_cmp);
    Ok(per_iter[REPS / 2])
}

fn new_conn(c: u64) -> Message {
    Message::new_conn(ServerId(1), ConnId(c), Peer::Unix)
}

fn codec(name: &str, msg: &Message, n_fds: usize) -> Result<()> {
    let mut buf = Vec::with_capacity(256);
    let ns = median_ns(1_000_000, |iters| {
        for _ in 0..iters {
            buf.clear();
            frame::encode_into(black_box(msg), n_fds, &mut buf);
            let f = frame::decode(black_box(&buf), DEFAULT_MAX_FRAME)?;
            black_box(f);
        }
        Ok(())
    })?;
    println!(
        "codec  {name:<12} {:>3} B  encode+decode {ns:>8.1} ns",
        buf.len()
    );
    Ok(())
}

/// Channel, both ends driven by one thread: every receive finds its frame already queued.
fn channel_ping_pong(iters: u64) -> Result<f64> {
    let (mut master, mut worker) = Channel::pair()?;
    let (conn, _twin) = UnixStream::pair()?;
    median_ns(iters, |n| {
        for i in 0..n {
            master.send(&new_conn(i), &[conn.as_fd()])?;
            let got = worker.recv()?.ok_or("newconn not there")?;
            worker.send(&Message::Accepted { conn: ConnId(i) }, &[])?;
            drop(got);
            let ack = master.recv()?.ok_or("accepted not there")?;
            black_box(ack);
        }
        Ok(())
    })
}

/// Channel, worker in its own thread blocking in `recv_blocking`.
fn channel_threads(iters: u64) -> Result<f64> {
    let (mut master, mut worker) = Channel::pair()?;
    let (conn, _twin) = UnixStream::pair()?;
    let worker_thread = thread::spawn(move || -> std::result::Result<(), IpcError> {
        loop {
            let got = match worker.recv_blocking(WAIT) {
                Ok(got) => got,
                Err(IpcError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            let Message::NewConn { conns, .. } = got.msg else {
                return Ok(());
            };
            drop(got.fds);
            for c in conns {
                worker.send_blocking(&Message::Accepted { conn: c.conn }, &[], WAIT)?;
            }
        }
    });
    let ns = median_ns(iters, |n| {
        for i in 0..n {
            master.send_blocking(&new_conn(i), &[conn.as_fd()], WAIT)?;
            black_box(master.recv_blocking(WAIT)?);
        }
        Ok(())
    })?;
    drop(master);
    worker_thread.join().map_err(|_| "worker panicked")??;
    Ok(ns)
}

/// One raw end: socket, receive buffer, control buffer and landing fds, all reused.
struct Bare {
    sock: UnixStream,
    buf: [u8; 64],
    cmsg: Box<sys::CmsgBuf>,
    fds: VecDeque<OwnedFd>,
}

impl Bare {
    fn new(sock: UnixStream) -> Self {
        Bare {
            sock,
            buf: [0; 64],
            cmsg: Box::new(sys::new_cmsg_buf()),
            fds: VecDeque::new(),
        }
    }

    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let n = sys::send_with_fds(self.sock.as_fd(), bytes, fds)?;
        if n != bytes.len() {
            return Err("short send".into());
        }
        Ok(())
    }

    /// Receives `len` bytes (one frame's worth), waiting for readability first when `wait`.
    /// `Ok(false)` at end of stream.
    fn recv(&mut self, len: usize, wait: bool) -> Result<bool> {
        if wait {
            sys::poll_one(self.sock.as_fd(), sys::POLLIN, 30_000)?;
        }
        let r = sys::recv_with_fds(
            self.sock.as_fd(),
            &mut self.buf[..len],
            &mut self.cmsg,
            &mut self.fds,
        )?;
        if r.bytes == 0 {
            return Ok(false);
        }
        if r.bytes != len || r.truncated {
            return Err("short or truncated receive".into());
        }
        // Close what arrived, as the channel's user does with the conn fd.
        self.fds.clear();
        Ok(true)
    }
}

/// Frames of the same sizes the channel sends, so both move the same bytes.
fn frames() -> (Vec<u8>, Vec<u8>) {
    (
        frame::encode(&new_conn(1), 1),
        frame::encode(&Message::Accepted { conn: ConnId(1) }, 0),
    )
}

fn bare_ping_pong(iters: u64) -> Result<f64> {
    let (a, b) = UnixStream::pair()?;
    let (mut master, mut worker) = (Bare::new(a), Bare::new(b));
    let (conn, _twin) = UnixStream::pair()?;
    let (nc, ack) = frames();
    median_ns(iters, |n| {
        for _ in 0..n {
            master.send(&nc, &[conn.as_fd()])?;
            worker.recv(nc.len(), false)?;
            worker.send(&ack, &[])?;
            master.recv(ack.len(), false)?;
        }
        Ok(())
    })
}

fn bare_threads(iters: u64) -> Result<f64> {
    let (a, b) = UnixStream::pair()?;
    let mut master = Bare::new(a);
    let (conn, _twin) = UnixStream::pair()?;
    let (nc, ack) = frames();
    let worker_thread = {
        let (nc_len, ack) = (nc.len(), ack.clone());
        thread::spawn(move || -> Result<()> {
            let mut worker = Bare::new(b);
            // Ends when the master's end closes.
            while worker.recv(nc_len, true)? {
                worker.send(&ack, &[])?;
            }
            Ok(())
        })
    };
    let ns = median_ns(iters, |n| {
        for _ in 0..n {
            master.send(&nc, &[conn.as_fd()])?;
            master.recv(ack.len(), true)?;
        }
        Ok(())
    })?;
    drop(master);
    worker_thread.join().map_err(|_| "worker panicked")??;
    Ok(ns)
}

fn main() -> Result<()> {
    println!("# cluster-ipc handoff bench (median of {REPS} runs, after warm-up)");
    codec("newconn", &new_conn(42), 1)?;
    codec("accepted", &Message::Accepted { conn: ConnId(42) }, 0)?;
    let query = Message::QueryServer {
        seq: Seq(9),
        spec: ListenSpec {
            addr: ListenAddr::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080)),
            ipv6_only: false,
            backlog: Some(511),
            exclusive: false,
            defer_accept: false,
        },
        index: 0,
    };
    codec("queryServer", &query, 0)?;

    let rows = [
        (
            "one thread (ping-pong)",
            channel_ping_pong(100_000)?,
            bare_ping_pong(100_000)?,
        ),
        (
            "two threads (blocking)",
            channel_threads(20_000)?,
            bare_threads(20_000)?,
        ),
    ];
    for (name, channel, bare) in rows {
        println!(
            "handoff {name:<24} channel {channel:>8.0} ns/rt ({:>7.0} rt/s)   bare {bare:>8.0} ns/rt ({:>7.0} rt/s)   channel/bare {:.2}",
            1e9 / channel,
            1e9 / bare,
            channel / bare
        );
    }
    Ok(())
}

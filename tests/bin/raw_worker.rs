//! A test worker that speaks the master protocol by hand (cluster-ipc only, no worker runtime),
//! so tests can make it misbehave on purpose.
//!
//! Usage: `raw-worker LISTEN [MODE]` where LISTEN is `tcp:ADDR`, `udp:ADDR` or `unix:PATH` and
//! MODE is one of:
//! - `serve` (default): take every connection; write `worker <id> pid <pid>\n` and close.
//! - `refuse`: refuse every hand-off as `MaxConnections`.
//! - `close-listener`: announce listening, then `Close` the server and refuse hand-offs as
//!   `ListenerClosed`.
//! - `hold`: never answer hand-offs (a stuck worker).
//! - `garbage-after-N`: serve N connections, then write garbage on the channel.
//! - `fail-if-exists:PATH`: exit 4 before listening when PATH exists, serve otherwise.
//! - `send-fd`: after listening, send a user message carrying an fd (forbidden).
//! - `flood`: after listening, send 5000 user messages in one burst, then nothing.
//! - `oversize`: after listening, send a 64 KiB user message.
//! - `wait-for-absent:PATH`: before listening, wait (up to 20 s) until PATH does not exist.
//! - `crash-after-N`: serve N connections, then abort on the next hand-off without answering.
//! - `hold-while-exists:PATH`: after listening, read nothing from the channel while PATH exists
//!   (up to 20 s), so hand-offs pile up unanswered in the master; then serve.
//! - `answer-then-fd`: on the first hand-off, write `held by worker <id>\n` to the client and
//!   keep it, then send `Accepted` and a user frame with an fd attached in ONE `sendmsg` (so the
//!   master reads both in one go), then wait to be killed. A master that loses the answer
//!   along with the violation hands the connection to a second worker.
//!
//! - `withhold-first`: never answer the first hand-off (keep its fd open), refuse every other
//!   one as `MaxConnections`: a worker that keeps answering while it holds one client back.
//!
//! - `flood-after-absent:PATH`: never listen; once PATH does not exist, send small user
//!   messages as fast as the channel takes them, until it breaks.
//! - `grant-cycle-N`: after listening, N times ask for a UDP port-0 server and close the
//!   server it will get (ids are dealt in order), all without reading a reply: grants, each
//!   with a socket, pile up in the master.
//! - `retry-listen`: while the listen fails, ask again every 25 ms (up to 10 s); then serve.
//! - `forge`: refuse every hand-off, and with each refusal send 40 forged answers for the
//!   connection ids around it (hand-offs the master gave other workers, or none at all).
//! - `query-flood-N`: after listening, ask for N more port-0 servers (index 1..=N, all asked
//!   before any reply is read), then exit with the number granted (at most 250) as its code.
//!
//! `MODE@SLOT` applies MODE in that worker slot only; the others serve.
//!
//! It prints `LISTEN_ERROR <errno>` and exits 3 when the master refuses the listen.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::Duration;

use cluster_core::{ConnId, ListenSpec, Message, RefuseReason, Seq, ServerGrant, ServerReply, env};
use cluster_ipc::{Channel, Limits, frame};

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("raw-worker: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("{a}: {e}"));
    match s.split_once(':') {
        Some(("tcp", a)) => Ok(ListenSpec::tcp(addr(a)?)),
        Some(("udp", a)) => Ok(ListenSpec::udp(addr(a)?)),
        Some(("unix", p)) => Ok(ListenSpec::unix(p)),
        _ => Err(format!("bad listen spec {s}")),
    }
}

/// Waits until `path` is gone, at most 20 s: the test removing a file is the only signal a
/// worker that must not read its channel can get.
fn wait_while_exists(path: &str) {
    for _ in 0..2000 {
        if !std::path::Path::new(path).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn identity(id: &str) -> String {
    format!("worker {id} pid {}\n", std::process::id())
}

fn serve_stream(mut s: impl Read + Write, id: &str) {
    let _ = s.write_all(identity(id).as_bytes());
    // Read until the client closes, so the client decides when the exchange ends.
    let mut sink = [0u8; 256];
    let _ = s.read(&mut sink);
}

fn run() -> Result<u8, String> {
    let args: Vec<String> = std::env::args().collect();
    let spec = parse_listen(args.get(1).map(String::as_str).unwrap_or("tcp:127.0.0.1:0"))?;
    let mode = args.get(2).cloned().unwrap_or_else(|| "serve".into());
    // `MODE@SLOT` applies MODE only in that slot; the other slots serve normally.
    let mode = match mode.split_once('@') {
        Some((m, slot)) if std::env::var(env::WORKER_SLOT).ok().as_deref() == Some(slot) => {
            m.to_owned()
        }
        Some(_) => "serve".to_owned(),
        None => mode,
    };
    let id = std::env::var(env::WORKER_ID).map_err(|_| "not under a master".to_string())?;
    let fd = std::env::var(env::CHANNEL_FD).map_err(|_| "no channel fd".to_string())?;
    let fd = env::parse_channel_fd(&fd).map_err(|e| e.to_string())?;
    let mut ch = Channel::from_inherited_fd(fd, Limits::default()).map_err(|e| e.to_string())?;
    if let Some(path) = mode.strip_prefix("fail-if-exists:")
        && std::path::Path::new(path).exists()
    {
        return Ok(4);
    }
    if let Some(path) = mode.strip_prefix("wait-for-absent:") {
        // Lets a test hold this worker between spawn and listen.
        wait_while_exists(path);
    }
    let t = Some(Duration::from_secs(10));
    let send =
        |ch: &mut Channel, m: &Message| ch.send_blocking(m, &[], t).map_err(|e| e.to_string());
    send(&mut ch, &Message::Online)?;
    if let Some(path) = mode.strip_prefix("flood-after-absent:") {
        wait_while_exists(path);
        let payload = b"flood-message-16".to_vec();
        loop {
            if ch
                .send_blocking(
                    &Message::User {
                        payload: payload.clone(),
                    },
                    &[],
                    None,
                )
                .is_err()
            {
                return Ok(0);
            }
        }
    }
    // `retry-listen` asks again every 25 ms (up to 10 s) while the listen fails.
    let mut tries = 0u64;
    let reply = loop {
        tries += 1;
        send(
            &mut ch,
            &Message::QueryServer {
                seq: Seq(tries),
                spec: spec.clone(),
                index: 0,
            },
        )?;
        let reply = ch.recv_blocking(t).map_err(|e| e.to_string())?;
        let failed = matches!(
            reply.msg,
            Message::QueryServerReply {
                reply: ServerReply::Failed(_),
                ..
            }
        );
        if failed && mode == "retry-listen" && tries < 400 {
            if tries == 1 {
                println!("LISTEN_RETRYING");
            }
            std::thread::sleep(Duration::from_millis(25));
            continue;
        }
        break reply;
    };
    let (server, addr, grant, mut fds) = match reply.msg {
        Message::QueryServerReply {
            reply:
                ServerReply::Granted {
                    server,
                    addr,
                    grant,
                },
            ..
        } => (server, addr, grant, reply.fds),
        Message::QueryServerReply {
            reply: ServerReply::Failed(e),
            ..
        } => {
            println!("LISTEN_ERROR {}", e.errno);
            return Ok(3);
        }
        other => return Err(format!("unexpected {other:?}")),
    };
    send(&mut ch, &Message::Listening { server, addr })?;
    let limit = |prefix: &str| {
        mode.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
    };
    match mode.as_str() {
        // Workers may not send fds: the master must drop this channel.
        "send-fd" => {
            let (a, _b) = UnixStream::pair().map_err(|e| e.to_string())?;
            use std::os::fd::AsFd;
            ch.send_blocking(
                &Message::User {
                    payload: b"fd".to_vec(),
                },
                &[a.as_fd()],
                t,
            )
            .map_err(|e| e.to_string())?;
        }
        // More frames in one burst than the master reads per pass, then silence.
        "flood" => {
            // Queued, so the burst leaves in a few large writes and sits in the master's
            // socket buffer all at once.
            for i in 0..5000u32 {
                let payload = i.to_le_bytes().to_vec();
                ch.queue(&Message::User { payload })
                    .map_err(|e| e.to_string())?;
            }
            ch.flush_blocking(t).map_err(|e| e.to_string())?;
        }
        // Far over any sane cap the master sets.
        "oversize" => send(
            &mut ch,
            &Message::User {
                payload: vec![7; 64 * 1024],
            },
        )?,
        _ => {}
    }
    if let Some(n) = limit("query-flood-") {
        return query_flood(&mut ch, &spec, n);
    }
    if let Some(n) = limit("grant-cycle-") {
        for i in 1..=n {
            let next = u32::try_from(i).map_err(|e| e.to_string())?;
            ch.queue(&Message::QueryServer {
                seq: Seq(u64::from(next) + 1),
                spec: ListenSpec::udp(SocketAddr::from(([127, 0, 0, 1], 0))),
                index: 0,
            })
            .map_err(|e| e.to_string())?;
            ch.queue(&Message::Close {
                server: cluster_core::ServerId(server.0 + next),
            })
            .map_err(|e| e.to_string())?;
        }
        ch.flush_blocking(t).map_err(|e| e.to_string())?;
        // Read nothing; wait for the master to give up on us.
        std::thread::sleep(Duration::from_secs(30));
        return Ok(0);
    }
    if mode == "close-listener" {
        send(&mut ch, &Message::Close { server })?;
    }
    if grant != ServerGrant::RoundRobin {
        let socket: OwnedFd = fds.pop().ok_or("shared grant without a socket")?;
        if mode == "report-defer" {
            use std::os::fd::AsFd;
            let secs = cluster_ipc::tcp_defer_accept(socket.as_fd()).map_err(|e| e.to_string())?;
            println!("DEFER_ACCEPT {secs}");
        }
        return serve_shared(socket, &spec, &id, &mut ch);
    }
    // `hold-then-echo`: reads nothing until the gate goes, then answers each user message
    // with its length (the test checks that all of it came through).
    let echo = mode.starts_with("hold-then-echo:");
    if let Some(path) = mode
        .strip_prefix("hold-while-exists:")
        .or_else(|| mode.strip_prefix("hold-then-echo:"))
    {
        wait_while_exists(path);
    }
    let mut served = 0usize;
    let mut withheld: Option<Vec<OwnedFd>> = None;
    let mut in_fours: Vec<(cluster_core::ConnId, OwnedFd)> = Vec::new();
    let mut forged = false;
    loop {
        let r = match ch.recv_blocking(None) {
            Ok(r) => r,
            Err(_) => return Ok(0),
        };
        match r.msg {
            Message::NewConn { conns, .. } => {
                // A frame may carry several connections, one fd each, in order.
                for (handed, fd) in conns.iter().zip(r.fds) {
                    let conn = handed.conn;
                    // `answer-in-fours[-forging]:GATE`: the first answers wait until GATE is
                    // gone, so that the test has every client queued in the master first.
                    if let Some(rest) = mode
                        .strip_prefix("answer-in-fours-forging:")
                        .or_else(|| mode.strip_prefix("answer-in-fours:"))
                    {
                        let forging = mode.starts_with("answer-in-fours-forging:");
                        // Answers only once four wait, all in one write: the master reads the
                        // four answers in one go and refills the window in one frame.
                        in_fours.push((conn, fd));
                        if in_fours.len() == 4 {
                            wait_while_exists(rest);
                            for (conn, _) in &in_fours {
                                ch.queue(&Message::Accepted { conn: *conn })
                                    .map_err(|e| e.to_string())?;
                            }
                            if forging && !forged {
                                // In the same write, an answer for the next connection, which
                                // the master has only just dealt to us and not sent yet.
                                forged = true;
                                ch.queue(&Message::Accepted {
                                    conn: cluster_core::ConnId(conn.0 + 1),
                                })
                                .map_err(|e| e.to_string())?;
                            }
                            ch.flush_blocking(Some(Duration::from_secs(10)))
                                .map_err(|e| e.to_string())?;
                            for (_, fd) in in_fours.drain(..) {
                                let stream = std::net::TcpStream::from(fd);
                                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                                let id = id.clone();
                                std::thread::spawn(move || serve_stream(stream, &id));
                            }
                        }
                        continue;
                    }
                    if mode == "close-and-go-quiet" {
                        // Closes the server instead of answering, then reads nothing more, as
                        // an application that drops its last blocking listener does.
                        send(&mut ch, &Message::Close { server })?;
                        std::thread::sleep(Duration::from_secs(30));
                        return Ok(0);
                    }
                    let answer = match mode.as_str() {
                        "refuse" => Some(Message::Refused {
                            conn,
                            reason: RefuseReason::MaxConnections,
                        }),
                        "close-listener" => Some(Message::Refused {
                            conn,
                            reason: RefuseReason::ListenerClosed,
                        }),
                        "hold" => None,
                        "unblock-and-refuse" => {
                            // Clears O_NONBLOCK on the open file every holder shares, then
                            // gives the connection back.
                            let stream = std::net::TcpStream::from(fd);
                            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                            send(
                                &mut ch,
                                &Message::Refused {
                                    conn,
                                    reason: RefuseReason::MaxConnections,
                                },
                            )?;
                            continue;
                        }
                        "withhold-first" if withheld.is_none() => {
                            withheld = Some(vec![fd]);
                            continue;
                        }
                        "withhold-first" => Some(Message::Refused {
                            conn,
                            reason: RefuseReason::MaxConnections,
                        }),
                        "forge" => {
                            for d in 1..=20u64 {
                                let around = [conn.0 + d, conn.0.wrapping_sub(d)];
                                for forged in around.into_iter().filter(|f| *f != conn.0) {
                                    ch.queue(&Message::Accepted {
                                        conn: cluster_core::ConnId(forged),
                                    })
                                    .map_err(|e| e.to_string())?;
                                }
                            }
                            Some(Message::Refused {
                                conn,
                                reason: RefuseReason::MaxConnections,
                            })
                        }
                        _ if limit("crash-after-").is_some_and(|n| served >= n) => {
                            std::process::abort()
                        }
                        "answer-then-fd" => {
                            let client = fd;
                            return answer_then_fd(&mut ch, conn, client, &id);
                        }
                        _ if limit("garbage-after-").is_some_and(|n| served >= n) => {
                            use std::os::fd::AsFd;
                            let mut raw = UnixStream::from(
                                ch.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?,
                            );
                            let _ = raw.write_all(&[0xff; 64]);
                            None
                        }
                        _ => Some(Message::Accepted { conn }),
                    };
                    let Some(answer) = answer else { continue };
                    let accepted = matches!(answer, Message::Accepted { .. });
                    send(&mut ch, &answer)?;
                    if accepted {
                        served += 1;
                        // Handed-off streams must arrive non-blocking (the protocol says so);
                        // a client of one that did not is told, so that the test sees it.
                        let arrived_nonblocking =
                            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).is_ok_and(|f| {
                                nix::fcntl::OFlag::from_bits_truncate(f)
                                    .contains(nix::fcntl::OFlag::O_NONBLOCK)
                            });
                        // This server blocks.
                        let mut stream = std::net::TcpStream::from(fd);
                        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                        if !arrived_nonblocking {
                            let _ = stream.write_all(b"arrived blocking\n");
                            continue;
                        }
                        let id = id.clone();
                        std::thread::spawn(move || serve_stream(stream, &id));
                    }
                }
            }
            Message::User { payload } if echo => send(
                &mut ch,
                &Message::User {
                    payload: payload.len().to_string().into_bytes(),
                },
            )?,
            Message::Disconnect => return Ok(0),
            _ => {}
        }
    }
}

/// Asks for `n` more servers on `spec`'s address with port 0, each a new key (a new index),
/// all before reading any reply; returns how many were granted.
fn query_flood(ch: &mut Channel, spec: &ListenSpec, n: usize) -> Result<u8, String> {
    let mut port0 = spec.clone();
    if let cluster_core::ListenAddr::Tcp(a) = &mut port0.addr {
        a.set_port(0);
    }
    for i in 1..=n {
        let index = u32::try_from(i).map_err(|e| e.to_string())?;
        ch.queue(&Message::QueryServer {
            seq: Seq(u64::from(index) + 1),
            spec: port0.clone(),
            index,
        })
        .map_err(|e| e.to_string())?;
    }
    ch.flush_blocking(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let (mut granted, mut refused) = (0usize, 0usize);
    while granted + refused < n {
        let r = ch
            .recv_blocking(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        match r.msg {
            Message::QueryServerReply {
                reply: ServerReply::Granted { .. },
                ..
            } => granted += 1,
            Message::QueryServerReply {
                reply: ServerReply::Failed(e),
                ..
            } if e.errno == libc_emfile() => refused += 1,
            Message::QueryServerReply { reply, .. } => {
                return Err(format!("unexpected reply {reply:?}"));
            }
            // Hand-offs meanwhile are refused so the master re-routes them.
            Message::NewConn { conns, .. } => {
                for handed in conns {
                    ch.send_blocking(
                        &Message::Refused {
                            conn: handed.conn,
                            reason: RefuseReason::MaxConnections,
                        },
                        &[],
                        Some(Duration::from_secs(10)),
                    )
                    .map_err(|e| e.to_string())?;
                }
            }
            _ => {}
        }
    }
    println!("QUERY_FLOOD granted={granted} refused={refused}");
    Ok(u8::try_from(granted.min(250)).unwrap_or(250))
}

/// `EMFILE` on Linux (errno 24), the master's answer past its per-worker server limit.
fn libc_emfile() -> i32 {
    24
}

/// Takes the connection, then breaks the protocol in the same write as the answer.
fn answer_then_fd(ch: &mut Channel, conn: ConnId, client: OwnedFd, id: &str) -> Result<u8, String> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::{AsFd, AsRawFd};
    let mut client = std::net::TcpStream::from(client);
    client
        .write_all(format!("held by worker {id}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut bytes = frame::encode(&Message::Accepted { conn }, 0);
    frame::encode_into(
        &Message::User {
            payload: b"fd".to_vec(),
        },
        1,
        &mut bytes,
    );
    let (smuggled, _twin) = UnixStream::pair().map_err(|e| e.to_string())?;
    // Attached to the whole buffer: the only way to make sure both frames reach the master in
    // one read, whatever its timing.
    let fds = [smuggled.as_raw_fd()];
    let sent = sendmsg(
        ch.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None::<&UnixAddr>,
    )
    .map_err(|e| e.to_string())?;
    if sent != bytes.len() {
        return Err(format!("short write: {sent} of {}", bytes.len()));
    }
    // Hold the client until the master kills us (or the channel ends).
    while ch.recv_blocking(None).is_ok() {}
    drop(client);
    Ok(0)
}

/// One call on a socket shared with the other workers, as a worker must make it: the socket is
/// their open file too, so it stays non-blocking (a blocking one would stall every event loop
/// that shares it); wait until it is readable, and take `WouldBlock` as another worker having
/// won it (`None`).
fn when_ready<T>(
    sock: &impl std::os::fd::AsFd,
    mut call: impl FnMut() -> std::io::Result<T>,
) -> Result<Option<T>, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(e.to_string()),
    }
    match call() {
        Ok(got) => Ok(Some(got)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn serve_shared(
    socket: OwnedFd,
    spec: &ListenSpec,
    id: &str,
    ch: &mut Channel,
) -> Result<u8, String> {
    // Watch the channel on a thread: its EOF or a Disconnect ends the worker.
    let mut watcher = std::mem::replace(ch, Channel::pair().map_err(|e| e.to_string())?.0);
    std::thread::spawn(move || {
        while let Ok(r) = watcher.recv_blocking(None) {
            if matches!(r.msg, Message::Disconnect) {
                break;
            }
        }
        std::process::exit(0);
    });
    match &spec.addr {
        cluster_core::ListenAddr::Udp(_) => {
            let sock = UdpSocket::from(socket);
            let mut buf = [0u8; 1500];
            loop {
                let Some((n, from)) = when_ready(&sock, || sock.recv_from(&mut buf))? else {
                    continue;
                };
                let mut reply = identity(id).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, from);
            }
        }
        cluster_core::ListenAddr::Unix(_) => {
            let l = UnixListener::from(socket);
            loop {
                let Some((s, _)) = when_ready(&l, || l.accept())? else {
                    continue;
                };
                let id = id.to_owned();
                std::thread::spawn(move || serve_stream(s, &id));
            }
        }
        _ => {
            let l = TcpListener::from(socket);
            loop {
                let Some((s, _)) = when_ready(&l, || l.accept())? else {
                    continue;
                };
                let id = id.to_owned();
                std::thread::spawn(move || serve_stream(s, &id));
            }
        }
    }
}

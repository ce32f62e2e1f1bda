//! End-to-end tests of the `cluster-cli` binary: real master, real workers, real sockets on
//! 127.0.0.1. Every wait is on an event (a log line, a response, stdout EOF) with a deadline;
//! every loop is bounded in count and time. A test that fails SIGKILLs and reaps the master it
//! started (by its PID, through `Child`); its workers then see their channel close and exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_cluster-cli");
/// Deadline for any single awaited log line.
const LINE_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket timeouts of the test client: a hung request is a failure, not a hung test.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------------------- the master

/// A running `cluster-cli spawn`, its stdout lines arriving on a channel.
struct Cluster {
    child: Option<Child>,
    lines: Receiver<String>,
    /// Every stdout line seen so far, for the failure report and later searches.
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    eof: bool,
}

impl Cluster {
    fn start(args: &[&str]) -> Cluster {
        Cluster::start_with(args, |_| {})
    }

    /// Like `start`, with `prepare` adjusting the command first (process group, environment).
    fn start_with(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Cluster {
        let mut cmd = Command::new(BIN);
        cmd.arg("spawn")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        Cluster::from_child(cmd.spawn().expect("spawn cluster-cli"))
    }

    /// Reads the stdout and stderr of a started master (or of something that runs one).
    fn from_child(mut child: Child) -> Cluster {
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Cluster {
            child: Some(child),
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
            eof: false,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Waits for the next line (after those already seen) that satisfies `pred`.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
                Err(RecvTimeoutError::Disconnected) => {
                    self.eof = true;
                    panic!("master's stdout closed while waiting for {what}")
                }
            }
        }
    }

    /// A line already seen that satisfies `pred`, or else the next one that does.
    fn find_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        match self.seen.iter().find(|l| pred(l)) {
            Some(l) => l.clone(),
            None => self.wait_line(what, pred),
        }
    }

    /// Waits for `n` `listening on` lines; returns the port and the (worker id, pid) pairs.
    fn wait_listening(&mut self, n: usize) -> (u16, Vec<(u32, u32)>) {
        let mut port = 0;
        let mut workers = Vec::new();
        for _ in 0..n {
            let line = self.wait_line("a listening line", |l| l.contains(" listening on "));
            let (id, pid) = worker_of(&line).unwrap();
            let addr = line.rsplit(' ').next().unwrap();
            port = addr.rsplit(':').next().unwrap().parse().unwrap();
            workers.push((id, pid));
        }
        (port, workers)
    }

    /// Waits for the master to exit (stdout EOF, then reap) within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => panic!("master did not exit in {timeout:?}"),
            }
        }
        // Stdout is closed: the master is exiting (its workers' stdout are pipes to it, not
        // ours, so they cannot hold it open).
        let status = self.child.take().unwrap().wait().unwrap();
        // The master is gone, so its stderr is at EOF: collect the last lines.
        if let Some(t) = self.stderr_reader.take() {
            t.join().unwrap();
        }
        status
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Still running: the test failed before it stopped the master. SIGKILL it (by the
            // PID we own through `Child`) and reap it; the workers exit on channel EOF.
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            eprintln!("--- master stdout ---\n{}", self.seen.join("\n"));
            eprintln!("--- master stderr ---\n{}", self.stderr_lines().join("\n"));
        }
    }
}

/// `(worker id, pid)` from a `[master] worker W (pid P) ...` line.
fn worker_of(line: &str) -> Option<(u32, u32)> {
    let rest = line.strip_prefix("[master] worker ")?;
    let (id, rest) = rest.split_once(" (pid ")?;
    let (pid, _) = rest.split_once(')')?;
    Some((id.parse().ok()?, pid.parse().ok()?))
}

// ------------------------------------------------------------------------------- HTTP client

#[derive(Debug)]
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Response {
    fn worker_id(&self) -> Option<u32> {
        self.headers.get("x-worker-id")?.parse().ok()
    }
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads one response (head, then a `content-length` body).
fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("closed in the head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a new connection with `Connection: close`.
fn get(port: u16, path: &str) -> io::Result<Response> {
    let mut s = connect(port)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut BufReader::new(s))
}

/// `get` that must succeed with 200.
fn get_ok(port: u16, path: &str) -> Response {
    let r = get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {r:?}");
    r
}

// ------------------------------------------------------------------------------- load

/// Connection-per-request load from a few threads until told to stop, then a fixed tail.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadResult>>,
}

#[derive(Debug, Default)]
struct LoadResult {
    ok: usize,
    failed: Vec<String>,
}

/// Requests per thread after the stop flag, so that the time right after the event is loaded.
const LOAD_TAIL: usize = 30;
/// Client threads of the load.
const LOAD_THREADS: usize = 3;
/// Hard caps per thread, whatever happens.
const LOAD_MAX_REQUESTS: usize = 20_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(25);

impl Load {
    /// Starts `n` threads and returns once each has had some requests answered.
    fn start(port: u16, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (warm_tx, warm_rx) = mpsc::channel();
        let threads = (0..n)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let warm = warm_tx.clone();
                thread::spawn(move || {
                    let mut res = LoadResult::default();
                    let started = Instant::now();
                    let mut tail = 0;
                    for i in 0..LOAD_MAX_REQUESTS {
                        if stop.load(Ordering::Acquire) {
                            tail += 1;
                            if tail > LOAD_TAIL {
                                break;
                            }
                        }
                        if started.elapsed() > LOAD_MAX_TIME {
                            res.failed.push("load ran out of time".into());
                            break;
                        }
                        match get(port, "/") {
                            Ok(r) if r.status == 200 => res.ok += 1,
                            Ok(r) => res.failed.push(format!("status {}", r.status)),
                            Err(e) => res.failed.push(format!("{:?}: {e}", e.kind())),
                        }
                        if i == 5 {
                            let _ = warm.send(());
                        }
                    }
                    res
                })
            })
            .collect();
        for _ in 0..n {
            warm_rx
                .recv_timeout(LINE_TIMEOUT)
                .expect("load threads got going");
        }
        Load { stop, threads }
    }

    fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Release);
        let mut all = LoadResult::default();
        for t in self.threads {
            let r = t.join().unwrap();
            all.ok += r.ok;
            all.failed.extend(r.failed);
        }
        all
    }
}

fn assert_clean_exit(c: &mut Cluster) {
    let status = c.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "exit {status:?}, stderr {:?}",
        c.stderr_lines()
    );
    assert!(c.seen.iter().any(|l| l == "[master] stopped (clean)"));
}

// ------------------------------------------------------------------------------- tests

#[test]
fn four_workers_share_the_requests_and_stop_cleanly() {
    let mut c = Cluster::start(&["-n", "4", "--port", "0"]);
    let (port, workers) = c.wait_listening(4);
    let expected: BTreeSet<u32> = workers.iter().map(|w| w.0).collect();
    assert_eq!(expected.len(), 4);
    let mut served = BTreeSet::new();
    let mut order = Vec::new();
    for _ in 0..400 {
        let r = get_ok(port, "/");
        let id = r.worker_id().unwrap();
        assert_eq!(r.body, format!("hello from worker {id}\n"));
        served.insert(id);
        order.push(id);
    }
    assert_eq!(served, expected);
    // Dealt one at a time (whatever the window): `curl` in a loop sees 1, 2, 3, 4, 1, ...
    for (i, id) in order.iter().enumerate() {
        assert_eq!(
            *id,
            order[i % 4],
            "request {i} broke the rotation: {order:?}"
        );
    }
    // A burst of 4 connections to the idle cluster reaches 4 different workers.
    let mut burst: Vec<TcpStream> = (0..4).map(|_| connect(port).expect("connect")).collect();
    let mut burst_ids = BTreeSet::new();
    for s in &mut burst {
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
    }
    for s in burst {
        let r = read_response(&mut BufReader::new(s)).expect("response");
        burst_ids.insert(r.worker_id().unwrap());
    }
    assert_eq!(burst_ids, expected, "a burst of 4 reaches all 4 workers");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
    for (id, pid) in workers {
        let want = format!("[master] worker {id} (pid {pid}) exited with code 0, after disconnect");
        assert!(c.seen.contains(&want), "missing: {want}");
    }
}

#[test]
fn reload_under_load_fails_nothing_and_replaces_every_worker() {
    let mut c = Cluster::start(&["-n", "2", "--port", "0"]);
    let (port, old) = c.wait_listening(2);
    let load = Load::start(port, LOAD_THREADS);
    c.signal(Signal::SIGHUP);
    let start = c.seen.len();
    c.wait_line("reload done", |l| l == "[master] reload done");
    let new: BTreeSet<u32> = c.seen[start..]
        .iter()
        .filter(|l| l.contains(" forked in slot "))
        .filter_map(|l| worker_of(l))
        .map(|w| w.0)
        .collect();
    assert_eq!(new.len(), 2, "two new workers forked");
    let res = load.finish();
    assert!(res.failed.is_empty(), "failed requests: {:?}", res.failed);
    assert!(res.ok > LOAD_THREADS * LOAD_TAIL);
    // Only the new workers serve now; the old ones left after disconnect.
    for _ in 0..40 {
        let id = get_ok(port, "/").worker_id().unwrap();
        assert!(new.contains(&id), "old worker {id} still serving");
    }
    for (id, pid) in old {
        let want = format!("[master] worker {id} (pid {pid}) exited with code 0, after disconnect");
        c.find_line(&want, |l| l == want);
    }
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn killed_worker_loses_only_what_it_held_and_its_slot_comes_back() {
    let mut c = Cluster::start(&["-n", "2", "--port", "0", "--restart-delay", "50"]);
    let (port, workers) = c.wait_listening(2);
    let load = Load::start(port, LOAD_THREADS);
    let (victim, pid) = workers[0];
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let exit =
        format!("[master] worker {victim} (pid {pid}) exited on signal 9 (SIGKILL), crashed");
    c.wait_line(&exit, |l| l == exit);
    let fork = c.wait_line("a replacement fork", |l| l.contains(" forked in slot "));
    let (new_id, _) = worker_of(&fork).unwrap();
    c.wait_line("the replacement listening", |l| {
        worker_of(l).is_some_and(|w| w.0 == new_id) && l.contains(" listening on ")
    });
    let res = load.finish();
    // What the master holds survives the kill: hand-offs in flight to the victim are
    // re-queued, none hangs (Node leaks that connection: its client waits forever). A request
    // the victim had already *taken* is its own socket and dies with it (reset), so at most
    // one per client thread can fail, and only with a reset, never a timeout.
    assert!(
        res.failed.len() <= LOAD_THREADS,
        "failed requests: {:?}",
        res.failed
    );
    for f in &res.failed {
        assert!(
            ["ConnectionReset", "UnexpectedEof", "BrokenPipe"]
                .iter()
                .any(|k| f.starts_with(k)),
            "a request failed otherwise than by the victim's death: {f}"
        );
    }
    // And the cluster serves on: every request after the replacement listens succeeds.
    for _ in 0..50 {
        get_ok(port, "/");
    }
    eprintln!(
        "kill under load: {} ok, {} reset with the victim",
        res.ok,
        res.failed.len()
    );
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

/// Four clients each send a quick request and a `/delay/MS` one in one write (so the worker
/// holds the slow one when the quick answer arrives), then the master gets SIGTERM: every slow
/// request must be answered, after its full delay, and the stop be clean.
fn sigterm_with_slow_requests_in_flight(c: &mut Cluster, port: u16, delay_ms: u64) {
    let (sent_tx, sent_rx) = mpsc::channel();
    let clients: Vec<JoinHandle<io::Result<(Response, Duration)>>> = (0..4)
        .map(|_| {
            let sent = sent_tx.clone();
            thread::spawn(move || {
                let s = connect(port)?;
                let mut w = s.try_clone()?;
                let mut r = BufReader::new(s);
                let t0 = Instant::now();
                write!(
                    w,
                    "GET / HTTP/1.1\r\nHost: x\r\n\r\n\
                     GET /delay/{delay_ms} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let first = read_response(&mut r)?;
                assert_eq!(first.status, 200);
                let _ = sent.send(());
                let delayed = read_response(&mut r)?;
                Ok((delayed, t0.elapsed()))
            })
        })
        .collect();
    for _ in 0..4 {
        sent_rx
            .recv_timeout(LINE_TIMEOUT)
            .expect("request in flight");
    }
    c.signal(Signal::SIGTERM);
    for t in clients {
        let (r, took) = t.join().unwrap().expect("delayed request answered");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(took >= Duration::from_millis(delay_ms), "{took:?}");
    }
    assert_clean_exit(c);
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let mut c = Cluster::start(&["-n", "2", "--port", "0"]);
    let (port, _) = c.wait_listening(2);
    sigterm_with_slow_requests_in_flight(&mut c, port, 500);
}

#[test]
fn ttin_adds_and_ttou_removes_a_worker() {
    let mut c = Cluster::start(&["-n", "2", "--port", "0"]);
    c.wait_listening(2);
    c.signal(Signal::SIGTTIN);
    let fork = c.wait_line("fork in slot 2", |l| l.ends_with(" forked in slot 2"));
    let (id, pid) = worker_of(&fork).unwrap();
    c.wait_line("the new worker listening", |l| {
        worker_of(l) == Some((id, pid)) && l.contains(" listening on ")
    });
    c.signal(Signal::SIGTTOU);
    let want = format!("[master] worker {id} (pid {pid}) exited with code 0, after disconnect");
    c.wait_line(&want, |l| l == want);
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn program_that_exits_at_once_errors_the_slots_and_fails() {
    let started = Instant::now();
    let mut c = Cluster::start(&[
        "-n",
        "2",
        "--restart-delay",
        "10",
        "--max-restarts",
        "3",
        "--",
        "/bin/false",
    ]);
    let status = c.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    let errored = c
        .seen
        .iter()
        .filter(|l| l.starts_with("[master] slot ") && l.contains(" errored: "))
        .count();
    assert_eq!(errored, 2, "{:?}", c.seen);
    let err = c.stderr_lines();
    assert_eq!(err.len(), 1, "one-line reason: {err:?}");
    assert!(
        err[0].starts_with("cluster-cli: workers cannot start: "),
        "{err:?}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["spawn", "-n", "0"][..],
        &["spawn", "--policy", "fastest"],
        &["spawn", "--listen", "127.0.0.1:1"],
        &["spawn", "--listen", "8000", "--", "/bin/true"],
        &["spawn", "--env", "NOEQUALS"],
        &["hello", "--port", "70000"],
        &["frobnicate"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    // A name is an inherited socket's: without one, a runtime error that says so.
    let out = Command::new(BIN)
        .args(["spawn", "--listen", "nowhere", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no inherited socket named nowhere"), "{err}");
}

/// A program that knows nothing of cluster-rs, only systemd's socket passing: it serves the
/// socket at fd 3 and leaves when the master writes to (or closes) its channel.
const LISTEN_FDS_PROGRAM: &str = r#"
import os, select, socket, sys
pid = os.getpid()
assert os.environ["LISTEN_PID"] == str(pid), "LISTEN_PID is not mine"
assert os.environ["LISTEN_FDS"] == "1"
chan = int(os.environ["CLUSTER_RS_CHANNEL_FD"])
sock = socket.socket(fileno=3)
sock.setblocking(False)
print("ready pid", pid, flush=True)
while True:
    ready, _, _ = select.select([sock, chan], [], [], 30)
    if chan in ready or not ready:
        sys.exit(0)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    body = b"pid %d\n" % pid
    conn.sendall(b"HTTP/1.1 200 OK\r\nx-pid: %d\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (pid, len(body)) + body)
    conn.close()
"#;

#[test]
fn listen_fds_reach_a_program_that_knows_only_systemd() {
    if Command::new("python3")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let mut c = Cluster::start(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "-n",
        "2",
        "--shutdown-timeout",
        "5000",
        "--",
        "python3",
        "-c",
        LISTEN_FDS_PROGRAM,
    ]);
    // Port 0: the master's log names the port it got.
    let line = c.wait_line("the pre-bound line", |l| {
        l.starts_with("[master] pre-bound 127.0.0.1:")
    });
    let port: u16 = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert_ne!(port, 0);
    assert!(
        line.ends_with(" as fd 3 (LISTEN_FDNAMES name listen0)"),
        "{line}"
    );
    let mut pids = BTreeSet::new();
    for _ in 0..2 {
        let line = c.wait_line("a worker's ready line", |l| {
            l.starts_with("[worker ") && l.contains("] ready pid ")
        });
        pids.insert(line.rsplit(' ').next().unwrap().parse::<u32>().unwrap());
    }
    assert_eq!(pids.len(), 2);
    // Both instances wait on one shared socket, so which one the kernel wakes first is up to
    // the scheduler: sequential requests may all land on one of them (CI saw 300 in a row).
    // The accept queue is FIFO, so the first accept takes the idle connection and pins that
    // instance in its blocking `recv` until the idle connection's request is written, after
    // the other request has been answered: the other instance must serve that one. The
    // bounded retry only guards against an instance that restarts in between.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let mut idle = connect(port).unwrap();
        seen.insert(get_ok(port, "/").headers["x-pid"].parse::<u32>().unwrap());
        write!(
            idle,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let r = read_response(&mut BufReader::new(idle)).unwrap();
        assert_eq!(r.status, 200);
        seen.insert(r.headers["x-pid"].parse::<u32>().unwrap());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, pids, "both instances served");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

/// Whether `pid` is running (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_listen_fds_worker_that_never_reads_its_channel_dies_with_a_sigkilled_master() {
    // `sleep` knows nothing of channels or sockets: only the kernel's parent-death signal can
    // tell it that the master is gone.
    let mut c = Cluster::start(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "-n",
        "1",
        "--",
        "sleep",
        "60",
    ]);
    let fork = c.wait_line("the fork line", |l| l.contains(" forked in slot "));
    let (_, pid) = worker_of(&fork).unwrap();
    assert!(running(pid));
    c.signal(Signal::SIGKILL);
    let _ = c.wait_exit(Duration::from_secs(5));
    // The workers are not our children, so there is no event to wait on: look (bounded).
    let deadline = Instant::now() + Duration::from_secs(2);
    while running(pid) {
        assert!(
            Instant::now() < deadline,
            "the worker outlived its master by 2 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn second_sigint_forces_the_stop() {
    let mut c = Cluster::start(&["-n", "1", "--port", "0"]);
    let (port, workers) = c.wait_listening(1);
    let s = connect(port).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    // As above: once the first answer is back, the long request is in the worker's hands,
    // so the graceful stop has to wait for it.
    w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /delay/20000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    c.signal(Signal::SIGINT);
    c.wait_line("graceful stop", |l| {
        l.starts_with("[master] SIGINT: graceful shutdown")
    });
    c.signal(Signal::SIGINT);
    c.wait_line("forced stop", |l| {
        l.starts_with("[master] SIGINT again: forced shutdown")
    });
    let (id, pid) = workers[0];
    let want =
        format!("[master] worker {id} (pid {pid}) exited on signal 9 (SIGKILL), after disconnect");
    c.wait_line(&want, |l| l == want);
    let status = c.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let err = c.stderr_lines();
    assert_eq!(err, ["cluster-cli: stopped by force: workers were killed"]);
    // The delayed request died with its worker.
    assert!(read_response(&mut r).is_err());
}

/// Kills and reaps a child by its PID (through `Child`) if a test leaves it running.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// CPU ticks (1/100 s) the process has used, user and system.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    rest.split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

#[test]
fn hello_alone_sleeps_while_idle() {
    // Sessions inline (the default on this machine): the serve loop must block in poll when
    // nothing happens, not spin.
    let mut child = Reap(
        Command::new(BIN)
            .args(["hello", "--port", "0", "--threads", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("hello worker listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    get_ok(port, "/");
    let pid = child.0.id();
    let before = cpu_ticks(pid);
    // The measurement itself: how much CPU one idle second costs.
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "hello used {used} ticks of 100 in an idle second: it spins"
    );
}

#[test]
fn hello_runs_standalone_and_stops_on_sigterm() {
    let mut child = Reap(
        Command::new(BIN)
            .args(["hello", "--port", "0", "--threads", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = lines.recv_timeout(LINE_TIMEOUT).expect("a listening line");
    let port: u16 = line
        .strip_prefix("hello worker listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let r = get_ok(port, "/");
    assert_eq!(r.worker_id(), Some(0));
    assert_eq!(r.body, "hello from worker 0\n");
    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).unwrap();
    // Stdout EOF means the process is exiting.
    loop {
        match lines.recv_timeout(LINE_TIMEOUT) {
            Ok(_) => {}
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("hello did not stop on SIGTERM"),
        }
    }
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn an_unclean_stop_has_one_verdict() {
    // A worker that ignores the stop and is killed at the shutdown timeout.
    let mut c = Cluster::start(&[
        "-n",
        "1",
        "--shutdown-timeout",
        "300",
        "--",
        "python3",
        "-c",
        "import signal, time\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         signal.signal(signal.SIGINT, signal.SIG_IGN)\n\
         print('up', flush=True)\n\
         time.sleep(60)",
    ]);
    c.wait_line("the worker running", |l| l.ends_with("] up"));
    c.signal(Signal::SIGTERM);
    let status = c.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    let stopped: Vec<&String> = c
        .seen
        .iter()
        .filter(|l| l.starts_with("[master] stopped"))
        .collect();
    assert_eq!(stopped.len(), 1, "{:?}", c.seen);
    assert!(
        stopped[0].starts_with("[master] stopped (not clean: shutdown was not clean: worker "),
        "{stopped:?}"
    );
    let err = c.stderr_lines();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].starts_with("cluster-cli: shutdown was not clean: "),
        "{err:?}"
    );
}

#[test]
fn a_port_in_use_is_reported_once_with_its_cause_and_not_retried() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let started = Instant::now();
    let mut c = Cluster::start(&["-n", "2", "--port", &port]);
    let status = c.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let took = started.elapsed();
    let err = c.stderr_lines();
    let reason = format!("127.0.0.1:{port}: address already in use");
    let fatal: Vec<&String> = err
        .iter()
        .filter(|l| l.starts_with("cluster-cli: "))
        .collect();
    assert_eq!(fatal.len(), 1, "{err:?}");
    assert!(fatal[0].contains(&reason), "{fatal:?}");
    assert!(
        !c.seen.iter().any(|l| l.contains(" restarting in ")),
        "restarted for an error a restart cannot fix: {:?}",
        c.seen
    );
    eprintln!("port in use: exit 1 after {took:?}: {}", fatal[0]);
}

// ------------------------------------------------------------- programs that know no channel

fn have_python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: python3 is not installed");
    }
    ok
}

/// The port of the first `pre-bound` line.
fn prebound_port(c: &mut Cluster) -> u16 {
    let line = c.wait_line("the pre-bound line", |l| {
        l.starts_with("[master] pre-bound ")
    });
    line.split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Pids of the workers forked so far (from the lines already seen).
fn forked_pids(c: &Cluster) -> Vec<u32> {
    c.seen
        .iter()
        .filter(|l| l.contains(" forked in slot "))
        .filter_map(|l| worker_of(l))
        .map(|w| w.1)
        .collect()
}

#[test]
fn ctrl_c_reaches_the_master_alone_and_stops_a_program_that_does_not_handle_it() {
    if !have_python() {
        return;
    }
    // Started in a process group of its own, as a shell starts a foreground job: the terminal's
    // SIGINT goes to that whole group.
    let mut c = Cluster::start_with(
        &[
            "-n",
            "2",
            "--shutdown-timeout",
            "10000",
            "--",
            "python3",
            "-c",
            "import time; print('up', flush=True); time.sleep(60)",
        ],
        |cmd| {
            std::os::unix::process::CommandExt::process_group(cmd, 0);
        },
    );
    for _ in 0..2 {
        c.wait_line("a worker up", |l| {
            l.starts_with("[worker ") && l.ends_with("] up")
        });
    }
    let pids = forked_pids(&c);
    assert_eq!(pids.len(), 2);
    nix::sys::signal::killpg(c.pid(), Signal::SIGINT).unwrap();
    assert_clean_exit(&mut c);
    // Stopped by the master's SIGTERM, not the terminal's SIGINT.
    for pid in pids {
        assert!(
            c.seen.iter().any(|l| l.contains(&format!(
                "(pid {pid}) exited on signal 15 (SIGTERM), after disconnect"
            ))),
            "worker {pid} was not stopped by the stop signal"
        );
        assert!(!running(pid));
    }
}

/// A `LISTEN_FDS` program that never reads its channel and stops gracefully on SIGTERM: it
/// finishes the request in hand and exits 0, leaving queued connections to the others.
const GRACEFUL_LISTEN_PROGRAM: &str = r#"
import os, select, signal, socket, sys
r, w = os.pipe()
os.set_blocking(w, False)
signal.set_wakeup_fd(w)
signal.signal(signal.SIGTERM, lambda *a: None)
pid = os.getpid()
sock = socket.socket(fileno=3)
sock.setblocking(False)
print("ready pid", pid, flush=True)
while True:
    ready, _, _ = select.select([sock, r], [], [])
    if r in ready:
        sys.exit(0)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    body = b"pid %d\n" % pid
    conn.sendall(b"HTTP/1.1 200 OK\r\nx-pid: %d\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (pid, len(body)) + body)
    conn.close()
"#;

#[test]
fn a_listen_worker_is_stopped_by_signal_and_reloads_without_a_failed_request() {
    if !have_python() {
        return;
    }
    let mut c = Cluster::start(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "-n",
        "2",
        "--shutdown-timeout",
        "20000",
        "--",
        "python3",
        "-c",
        GRACEFUL_LISTEN_PROGRAM,
    ]);
    let port = prebound_port(&mut c);
    for _ in 0..2 {
        c.wait_line("a worker's ready line", |l| l.contains("] ready pid "));
    }
    let old = forked_pids(&c);
    let load = Load::start(port, LOAD_THREADS);
    c.signal(Signal::SIGHUP);
    c.wait_line("reload done", |l| l == "[master] reload done");
    let res = load.finish();
    assert!(res.failed.is_empty(), "failed requests: {:?}", res.failed);
    // "reload done" comes after every old worker has exited (cleanly, by the stop signal).
    let done = c
        .seen
        .iter()
        .position(|l| l == "[master] reload done")
        .unwrap();
    for pid in &old {
        let exit = c
            .seen
            .iter()
            .position(|l| l.contains(&format!("(pid {pid}) exited with code 0, after disconnect")))
            .unwrap_or_else(|| panic!("old worker {pid} did not exit cleanly before reload done"));
        assert!(exit < done);
    }
    let new: Vec<u32> = forked_pids(&c)
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(new.len(), 2);
    let started = Instant::now();
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the stop took {:?}",
        started.elapsed()
    );
}

/// sd_notify in a few lines, for Python workers.
const PY_SD_NOTIFY: &str = r#"
import os, socket, sys, time
def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(addr)
    s.send(msg.encode())
    s.close()
me = os.environ["CLUSTER_RS_WORKER_ID"]
"#;

/// A unique path under the temp dir for a test's files.
fn temp_path(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cluster-rs-{what}-{}", std::process::id()))
}

#[test]
fn a_late_ready_holds_the_reload_until_it_comes() {
    if !have_python() {
        return;
    }
    let trigger = temp_path("late-ready");
    let _ = std::fs::remove_file(&trigger);
    // Worker 1 is ready at once; its replacement waits for the test's go before READY=1.
    let program = format!(
        "{PY_SD_NOTIFY}
if me != '1':
    for _ in range(600):
        if os.path.exists({trigger:?}):
            break
        time.sleep(0.05)
notify('STATUS=about to be ready\\nREADY=1')
time.sleep(60)
"
    );
    let mut c = Cluster::start(&[
        "-n",
        "1",
        "--ready-delay",
        "60000",
        "--shutdown-timeout",
        "10000",
        "--",
        "python3",
        "-c",
        &program,
    ]);
    c.wait_line("worker 1 ready", |l| {
        l.starts_with("[master] worker 1 ") && l.ends_with(" ready (READY=1)")
    });
    c.signal(Signal::SIGHUP);
    c.wait_line("the new worker", |l| {
        l.starts_with("[master] worker 2 ") && l.contains(" forked in slot 0")
    });
    std::fs::write(&trigger, b"go").unwrap();
    c.wait_line("reload done", |l| l == "[master] reload done");
    let _ = std::fs::remove_file(&trigger);
    let at = |c: &Cluster, pred: &dyn Fn(&str) -> bool| c.seen.iter().position(|l| pred(l));
    let status = at(&c, &|l| {
        l.starts_with("[master] worker 2 ") && l.ends_with(" status: about to be ready")
    });
    let ready = at(&c, &|l| {
        l.starts_with("[master] worker 2 ") && l.ends_with(" ready (READY=1)")
    });
    let old_exit = at(&c, &|l| {
        l.starts_with("[master] worker 1 ") && l.contains(" exited ")
    });
    let done = at(&c, &|l| l == "[master] reload done");
    assert!(status.is_some() && status < ready, "status before ready");
    assert!(
        ready.is_some() && ready < old_exit,
        "the old worker left only after READY=1"
    );
    assert!(old_exit < done, "reload done after the old worker's exit");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn a_worker_that_stops_pinging_the_watchdog_is_restarted() {
    if !have_python() {
        return;
    }
    // Worker 1 pings five times and then hangs; its replacement pings for ever. Pings 100 ms
    // apart against a 2 s period leave a loaded machine ample slack.
    let program = format!(
        "{PY_SD_NOTIFY}
notify('READY=1')
assert int(os.environ['WATCHDOG_USEC']) == 2000000
n = 0
while True:
    if me != '1':
        notify('WATCHDOG=1\\nSTATUS=ping %d' % n)
    elif n < 5:
        notify('WATCHDOG=1')
    n += 1
    time.sleep(0.1)
"
    );
    let mut c = Cluster::start(&[
        "-n",
        "1",
        "--watchdog",
        "2000",
        // It notifies: a slow start under load must not be taken for ready.
        "--ready-delay",
        "60000",
        "--restart-delay",
        "50",
        "--shutdown-timeout",
        "10000",
        "--",
        "python3",
        "-c",
        &program,
    ]);
    c.wait_line("worker 1 declared hung", |l| {
        l.starts_with("[master] worker 1 ")
            && l.ends_with(" dropped: sent no WATCHDOG=1 for 2000ms: hung")
    });
    c.wait_line("worker 1 killed", |l| {
        l.starts_with("[master] worker 1 ") && l.ends_with(" exited on signal 9 (SIGKILL), crashed")
    });
    c.wait_line("its replacement ready", |l| {
        l.starts_with("[master] worker 2 ") && l.ends_with(" ready (READY=1)")
    });
    // The replacement keeps pinging: it outlives two periods (45 pings, 100 ms apart).
    c.wait_line("worker 2's 45th ping", |l| {
        l.starts_with("[master] worker 2 ") && l.ends_with(" status: ping 45")
    });
    assert!(
        !c.seen
            .iter()
            .any(|l| l.starts_with("[master] worker 2 ") && l.contains(" dropped"))
    );
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn a_slow_native_worker_behind_a_program_reloads_without_a_refused_connection() {
    // A PROGRAM gets the ready delay (1 s by default), but this one turns out to speak the
    // channel, and only after the delay: it is ready when it listens, and until then clients
    // wait for it rather than being refused.
    let port = free_port();
    let script = format!("sleep 2; exec {BIN} hello --port {port}");
    let mut c = Cluster::start(&["-n", "1", "--", "sh", "-c", &script]);
    c.wait_listening(1);
    let load = Load::start(port, LOAD_THREADS);
    c.signal(Signal::SIGHUP);
    c.wait_line("the new worker listening", |l| {
        l.starts_with("[master] worker 2 ") && l.contains(" listening on ")
    });
    c.find_line("reload done", |l| l == "[master] reload done");
    let res = load.finish();
    assert!(
        res.failed.is_empty(),
        "{} failed requests, first: {:?}",
        res.failed.len(),
        &res.failed[..res.failed.len().min(5)]
    );
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn repeated_ready_and_status_notices_are_logged_once() {
    if !have_python() {
        return;
    }
    let program = format!(
        "{PY_SD_NOTIFY}
for _ in range(20):
    notify('READY=1\\n' * 200)
for _ in range(20):
    notify('STATUS=same\\nSTATUS=same')
notify('STATUS=done')
time.sleep(60)
"
    );
    let mut c = Cluster::start(&["-n", "1", "--", "python3", "-c", &program]);
    c.wait_line("the last status", |l| l.ends_with(" status: done"));
    let count = |c: &Cluster, suffix: &str| c.seen.iter().filter(|l| l.ends_with(suffix)).count();
    assert_eq!(count(&c, " ready (READY=1)"), 1);
    assert_eq!(count(&c, " status: same"), 1);
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn a_worker_that_said_stopping_still_gets_the_stop_signal() {
    if !have_python() {
        return;
    }
    // It says it is stopping but stays; only the stop signal (SIGTERM) ends it in time.
    let program = format!(
        "{PY_SD_NOTIFY}
notify('READY=1')
notify('STOPPING=1\\nSTATUS=stopping')
time.sleep(60)
"
    );
    let mut c = Cluster::start(&[
        "-n",
        "1",
        "--shutdown-timeout",
        "60000",
        "--",
        "python3",
        "-c",
        &program,
    ]);
    c.wait_line("its stopping", |l| l.ends_with(" status: stopping"));
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
    assert!(
        c.seen
            .iter()
            .any(|l| l.starts_with("[master] worker 1 ") && l.contains(" exited on signal 15 ")),
        "stopped by SIGTERM"
    );
}

// ------------------------------------------------------------------------ the master under systemd

/// A fake service manager's `NOTIFY_SOCKET`: every datagram arrives on a channel.
struct FakeManager {
    path: std::path::PathBuf,
    messages: Receiver<String>,
}

impl FakeManager {
    fn bind(what: &str) -> FakeManager {
        let path = temp_path(what);
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (tx, messages) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        FakeManager { path, messages }
    }

    /// The next message (skipping watchdog pings and bare status updates) that has `key`.
    fn expect(&self, key: &str, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {key} from the master; got {seen:?}"));
            seen.push(m.clone());
            if m.lines().any(|l| l == key) {
                return m;
            }
            assert!(
                m.lines()
                    .all(|l| l.starts_with("WATCHDOG=") || l.starts_with("STATUS=")),
                "unexpected {m:?} while waiting for {key}; got {seen:?}"
            );
        }
    }
}

impl Drop for FakeManager {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn the_master_tells_its_service_manager_ready_reloading_and_stopping_in_order() {
    let manager = FakeManager::bind("sd-notify");
    let path = manager.path.clone();
    let mut c = Cluster::start_with(&["-n", "2", "--port", "0"], |cmd| {
        cmd.env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "200000");
    });
    let mut seen = Vec::new();
    let ready = manager.expect("READY=1", &mut seen);
    assert!(ready.contains("STATUS=2 of 2 workers ready"), "{ready}");
    // Ready means serving.
    let (port, _) = c.wait_listening(2);
    get_ok(port, "/");
    c.signal(Signal::SIGHUP);
    let reloading = manager.expect("RELOADING=1", &mut seen);
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    manager.expect("READY=1", &mut seen);
    c.wait_line("reload done", |l| l == "[master] reload done");
    // The watchdog pings come from the loop at half the period (100 ms): wait for one.
    manager.expect("WATCHDOG=1", &mut seen);
    c.signal(Signal::SIGTERM);
    manager.expect("STOPPING=1", &mut seen);
    assert_clean_exit(&mut c);
}

#[test]
fn a_second_reload_request_during_a_reload_tells_the_manager_nothing() {
    if !have_python() {
        return;
    }
    let trigger = temp_path("second-hup");
    let _ = std::fs::remove_file(&trigger);
    // Worker 1 is ready at once; every later one waits for the test's go before READY=1.
    let program = format!(
        "{PY_SD_NOTIFY}
if me != '1':
    for _ in range(600):
        if os.path.exists({trigger:?}):
            break
        time.sleep(0.05)
notify('READY=1')
time.sleep(60)
"
    );
    let manager = FakeManager::bind("second-hup-manager");
    let path = manager.path.clone();
    let mut c = Cluster::start_with(
        &[
            "-n",
            "1",
            "--ready-delay",
            "60000",
            "--",
            "python3",
            "-c",
            &program,
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path);
        },
    );
    let mut seen = Vec::new();
    manager.expect("READY=1", &mut seen);
    c.signal(Signal::SIGHUP);
    manager.expect("RELOADING=1", &mut seen);
    c.wait_line("the new worker", |l| {
        l.starts_with("[master] worker 2 ") && l.contains(" forked in slot 0")
    });
    c.signal(Signal::SIGHUP);
    // Commands reach the loop in order: once the worker SIGTTIN adds is forked, the second
    // SIGHUP has been handled.
    c.signal(Signal::SIGTTIN);
    c.wait_line("the added worker", |l| {
        l.starts_with("[master] worker 3 ") && l.contains(" forked in slot 1")
    });
    std::fs::write(&trigger, b"go").unwrap();
    // Anything but status and pings before READY=1 (a second RELOADING=1) fails here.
    manager.expect("READY=1", &mut seen);
    c.wait_line("reload done", |l| l == "[master] reload done");
    let _ = std::fs::remove_file(&trigger);
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

// ------------------------------------------------------------------------ socket activation

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// A port that was free a moment ago (for tools that take a port, not a socket).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn under_systemd_socket_activate_the_master_serves_the_inherited_socket() {
    if !std::path::Path::new(SOCKET_ACTIVATE).exists() {
        eprintln!("SKIPPED: {SOCKET_ACTIVATE} is not installed");
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let port_arg = port.to_string();
    // Its stderr joins stdout, so that its `Listening on` line can be awaited in order.
    let child = Command::new("/bin/sh")
        .args(["-c", "exec 2>&1; exec \"$0\" \"$@\"", SOCKET_ACTIVATE])
        .args([
            "-l",
            &addr,
            "--fdname=web",
            BIN,
            "spawn",
            "-n",
            "2",
            "--port",
            &port_arg,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    // The shell and systemd-socket-activate exec in place: the child's pid is the master's.
    let mut c = Cluster::from_child(child);
    c.wait_line("the socket bound", |l| l.starts_with("Listening on "));
    // systemd-socket-activate starts the master on the first connection, which waits in the
    // socket's queue meanwhile, as under systemd.
    let r = get_ok(port, "/");
    assert!(r.body.starts_with("hello from worker "), "{:?}", r.body);
    let want = format!("[master] inherited {addr} as web (socket activation)");
    c.find_line(&want, |l| l == want);
    // Had the master bound the port itself, the workers' listen would have failed with
    // EADDRINUSE against the inherited socket.
    for l in &c.seen {
        assert!(!l.contains("errored"), "{l}");
    }
    c.wait_listening(2);
    for _ in 0..20 {
        get_ok(port, "/");
    }
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

/// Holds a listening socket as systemd does and runs the master on it, once per `start` read
/// from stdin, stopping it (SIGTERM, then wait) on `stop`.
const ACTIVATION_HARNESS: &str = r#"
import os, signal, socket, subprocess, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(128)
port = s.getsockname()[1]
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
print("harness: port", port, flush=True)
master = None
for line in sys.stdin:
    if line.strip() == "start":
        master = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec "$0" "$@"',
             sys.argv[1], "spawn", "-n", "2", "--port", str(port)],
            pass_fds=(3,))
        print("harness: started", flush=True)
    elif line.strip() == "stop":
        master.send_signal(signal.SIGTERM)
        print("harness: stopped rc=%d" % master.wait(), flush=True)
"#;

#[test]
fn a_socket_held_across_master_restarts_refuses_no_connection() {
    if !have_python() {
        return;
    }
    let mut child = Command::new("python3")
        .args(["-c", ACTIVATION_HARNESS, BIN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the harness");
    let mut to_harness = child.stdin.take().unwrap();
    let mut c = Cluster::from_child(child);
    let line = c.wait_line("the harness's port", |l| l.starts_with("harness: port "));
    let port: u16 = line.rsplit(' ').next().unwrap().parse().unwrap();
    writeln!(to_harness, "start").unwrap();
    c.wait_listening(2);
    get_ok(port, "/");
    writeln!(to_harness, "stop").unwrap();
    let stopped = c.wait_line("the first master's stop", |l| {
        l.starts_with("harness: stopped")
    });
    assert_eq!(stopped, "harness: stopped rc=0");
    // No master runs now: these wait in the held socket's queue.
    let mut waiting: Vec<TcpStream> = (0..20).map(|_| connect(port).expect("connect")).collect();
    for s in &mut waiting {
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    }
    writeln!(to_harness, "start").unwrap();
    for s in waiting {
        let r = read_response(&mut BufReader::new(s)).expect("a queued connection was served");
        assert_eq!(r.status, 200);
    }
    // One worker may have served them all: let the other finish starting before the stop (a
    // hello worker stopped before it listens exits 1).
    c.wait_listening(2);
    writeln!(to_harness, "stop").unwrap();
    let stopped = c.wait_line("the second master's stop", |l| {
        l.starts_with("harness: stopped")
    });
    assert_eq!(stopped, "harness: stopped rc=0");
    drop(to_harness);
    let status = c.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "harness: {status:?}");
}

#[test]
fn listen_name_passes_an_inherited_socket_to_listen_workers() {
    if !std::path::Path::new(SOCKET_ACTIVATE).exists() || !have_python() {
        eprintln!("SKIPPED: needs {SOCKET_ACTIVATE} and python3");
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new("/bin/sh")
        .args(["-c", "exec 2>&1; exec \"$0\" \"$@\"", SOCKET_ACTIVATE])
        .args([
            "-l",
            &addr,
            "--fdname=web",
            BIN,
            "spawn",
            "-n",
            "2",
            "--listen",
            "web",
        ])
        .args(["--", "python3", "-c", GRACEFUL_LISTEN_PROGRAM])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let mut c = Cluster::from_child(child);
    c.wait_line("the socket bound", |l| l.starts_with("Listening on "));
    let r = get_ok(port, "/");
    assert!(r.body.starts_with("pid "), "{:?}", r.body);
    let want = format!("[master] pre-bound {addr} as fd 3 (LISTEN_FDNAMES name web)");
    c.find_line(&want, |l| l == want);
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

/// Pids of the live processes (zombies have no command line) that have `arg` as an argument.
fn pids_with_arg(arg: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

#[test]
fn a_stop_reaches_what_a_worker_started() {
    // A wrapper that runs its program as a child (no exec): the stop signal must reach the
    // child too, or it outlives the master.
    let arg = format!("300.{}", std::process::id());
    let script = format!("sleep {arg}; true");
    let mut c = Cluster::start(&["-n", "1", "--", "sh", "-c", &script]);
    c.wait_line("the worker", |l| l.contains(" forked in slot 0"));
    let deadline = Instant::now() + LINE_TIMEOUT;
    while pids_with_arg(&arg).is_empty() {
        assert!(Instant::now() < deadline, "the worker's sleep never ran");
        thread::sleep(Duration::from_millis(20));
    }
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
    // The master signalled the group before it exited; the kernel may still be delivering.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = pids_with_arg(&arg);
    while !left.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        left = pids_with_arg(&arg);
    }
    for pid in &left {
        // Ours (started by this test's worker, found by its unique argument): do not leave it.
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    assert!(
        left.is_empty(),
        "the worker's child outlived the stop: {left:?}"
    );
}

// ------------------------------------------------------------------------ the master as PID 1

/// Pids of the processes whose parent is `ppid`, with their state letter.
fn children_of(ppid: u32) -> Vec<(u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut rest = stat.rsplit(')').next()?.split_whitespace();
            let state = rest.next()?.chars().next()?;
            let parent: u32 = rest.next()?.parse().ok()?;
            (parent == ppid).then_some((pid, state))
        })
        .collect()
}

#[test]
fn as_pid_1_the_master_reaps_the_orphans_a_worker_leaves() {
    let usable = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        eprintln!("SKIPPED: `unshare --pid --fork` is missing or not permitted here");
        return;
    }
    // The worker's subshell starts `sleep` in the background and exits: the sleep is orphaned
    // and reparented to the namespace's init, the master. Then the worker says so and waits.
    let worker = "(sleep 2 &); echo orphaned; exec sleep 60";
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            // If the test fails and SIGKILLs unshare, the master goes too.
            "--kill-child",
            BIN,
            "spawn",
            "-n",
            "1",
            "--shutdown-timeout",
            "5000",
        ])
        .args(["--", "/bin/sh", "-c", worker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let unshare = child.id();
    let mut c = Cluster::from_child(child);
    c.wait_line("the worker's orphan", |l| l.ends_with("] orphaned"));
    let master = children_of(unshare)
        .first()
        .map(|(pid, _)| *pid)
        .expect("unshare's child, the master");
    // The worker is the master's child; the orphan is too, now. Bounded look (no event
    // tells an outsider about reparenting).
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let kids = children_of(master);
        if kids.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no orphan reparented to the master: {kids:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Once the orphan's sleep ends, it must be reaped, not left a zombie: within the sweep
    // period after it exits, the master has only its worker left.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let kids = children_of(master);
        if kids.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the orphan was not reaped: children of the master {kids:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // And as PID 1 it stops gracefully on SIGTERM.
    kill(Pid::from_raw(master as i32), Signal::SIGTERM).unwrap();
    assert_clean_exit(&mut c);
}

// ------------------------------------------------------------------------ docs/systemd.md

/// The `ini` blocks of docs/systemd.md.
fn doc_units() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/systemd.md"))
        .expect("docs/systemd.md");
    doc.split("```ini\n")
        .skip(1)
        .filter_map(|b| b.split("```").next().map(str::to_owned))
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {unit}"))
        .to_owned()
}

#[test]
fn the_units_in_docs_systemd_md_work_as_written() {
    let units = doc_units();
    let socket = units
        .iter()
        .find(|u| u.contains("[Socket]"))
        .expect("a socket unit");
    let service = units
        .iter()
        .find(|u| u.contains("[Service]"))
        .expect("a service unit");
    let exec = unit_value(service, "ExecStart");
    let listen = unit_value(socket, "ListenStream");
    let fdname = unit_value(socket, "FileDescriptorName");
    let (_, doc_port) = listen.rsplit_once(':').expect("HOST:PORT");
    // The installed path stands for the binary under test; nothing else is changed.
    let exec = exec.replace("/usr/local/bin/cluster-cli", BIN);

    if Path::new("/usr/bin/systemd-analyze").exists() {
        let dir = temp_path("units");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let service_file = dir.join("cluster-web.service");
        std::fs::write(dir.join("cluster-web.socket"), socket).unwrap();
        std::fs::write(
            &service_file,
            service.replace(&unit_value(service, "ExecStart"), &exec),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join("cluster-web.socket"))
            .arg(&service_file)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify: {err}");
        for line in err.lines().filter(|l| !l.trim().is_empty()) {
            // systemd before 253 does not know Type=notify-reload (the page says what to use
            // there instead); anything else is a mistake in the units.
            assert!(
                line.contains("notify-reload"),
                "systemd-analyze verify: {line}"
            );
        }
    } else {
        eprintln!("SKIPPED (part): systemd-analyze is not installed");
    }

    if !Path::new(SOCKET_ACTIVATE).exists() {
        eprintln!("SKIPPED (part): {SOCKET_ACTIVATE} is not installed");
        return;
    }
    // The socket unit's address on a free port, and ExecStart with that port.
    let port = free_port();
    let addr = listen.replace(doc_port, &port.to_string());
    let argv: Vec<String> = exec
        .split_whitespace()
        .map(|a| {
            if a == doc_port {
                port.to_string()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let manager = FakeManager::bind("doc-units");
    let usec = unit_value(service, "WatchdogSec").parse::<u64>().unwrap() * 1_000_000;
    let child = Command::new("/bin/sh")
        .args(["-c", "exec 2>&1; exec \"$0\" \"$@\"", SOCKET_ACTIVATE])
        .args(["-l", &addr, &format!("--fdname={fdname}")])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", manager.path.display()))
        .arg(format!("--setenv=WATCHDOG_USEC={usec}"))
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let mut c = Cluster::from_child(child);
    c.wait_line("the socket bound", |l| l.starts_with("Listening on "));
    let r = get_ok(port, "/");
    assert_eq!(r.status, 200);
    let mut seen = Vec::new();
    manager.expect("READY=1", &mut seen);
    let want = format!("[master] inherited {addr} as {fdname} (socket activation)");
    c.find_line(&want, |l| l == want);
    // `systemctl reload` under Type=notify-reload: SIGHUP, then RELOADING=1 and READY=1.
    c.signal(Signal::SIGHUP);
    manager.expect("RELOADING=1", &mut seen);
    manager.expect("READY=1", &mut seen);
    get_ok(port, "/");
    c.signal(Signal::SIGTERM);
    manager.expect("STOPPING=1", &mut seen);
    assert_clean_exit(&mut c);
}

#[test]
fn workers_see_none_of_the_masters_systemd_environment() {
    if !Path::new(SOCKET_ACTIVATE).exists() {
        eprintln!("SKIPPED: {SOCKET_ACTIVATE} is not installed");
        return;
    }
    let manager = FakeManager::bind("worker-env");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // The worker reports what it got, and whether fd 4 (the inherited socket would be
    // there if it leaked past the channel at fd 3) is open.
    let report = "echo \"env: ${LISTEN_FDS-none} ${LISTEN_PID-none} ${LISTEN_FDNAMES-none} \
                  ${WATCHDOG_USEC-none} ${WATCHDOG_PID-none} ${NOTIFY_SOCKET}\"; \
                  if [ -e /proc/self/fd/4 ]; then echo fd4: open; else echo fd4: closed; fi; \
                  exec sleep 60";
    let child = Command::new("/bin/sh")
        .args(["-c", "exec 2>&1; exec \"$0\" \"$@\"", SOCKET_ACTIVATE])
        .args(["-l", &addr, "--fdname=web"])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", manager.path.display()))
        .args(["--setenv=WATCHDOG_USEC=10000000", BIN, "spawn", "-n", "1"])
        .args(["--", "/bin/sh", "-c", report])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let mut c = Cluster::from_child(child);
    c.wait_line("the socket bound", |l| l.starts_with("Listening on "));
    // systemd-socket-activate starts the master on the first connection.
    let _first = connect(port).expect("connect");
    let env = c.wait_line("the worker's environment", |l| l.contains("] env: "));
    let env = env.split("] env: ").nth(1).unwrap();
    assert!(
        env.starts_with("none none none none none @cluster-rs/notify/"),
        "the worker got the master's systemd environment: {env}"
    );
    let fd4 = c.wait_line("the worker's fd 4", |l| l.contains("] fd4: "));
    assert!(fd4.ends_with("fd4: closed"), "{fd4}");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[path = "cli/node.rs"]
mod node;

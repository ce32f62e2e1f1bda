//! The fixture: a master in this process, events awaited against deadlines, children killed
//! and reaped by the master on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use std::time::{Duration, Instant};

use cluster_core::{BoundAddr, WorkerId};
use cluster_master::{Event, Master, MasterBuilder};

/// Tests that count this process's fds take the write side; every other test the read side,
/// so no test opens fds while a count is being compared.
static FD_LOCK: RwLock<()> = RwLock::new(());

pub fn shared_fds() -> RwLockReadGuard<'static, ()> {
    FD_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive_fds() -> RwLockWriteGuard<'static, ()> {
    FD_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

pub fn fd_count() -> usize {
    // The directory handle itself is one entry.
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

/// This process's open fds, each with what it refers to (`socket:[inode]`, a path...).
pub fn fd_snapshot() -> std::collections::BTreeMap<u32, String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let fd = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((fd, target.display().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The fds open now that were not open at `before`: what a test leaked. Fds that closed
/// meanwhile (a finished test's reader thread, say) do not count, so this holds even when a
/// thread of another test closes an fd after the baseline.
pub fn fds_opened_since(before: &std::collections::BTreeMap<u32, String>) -> Vec<(u32, String)> {
    fd_snapshot()
        .into_iter()
        .filter(|(fd, target)| before.get(fd) != Some(target) && !target.contains("/proc/"))
        .collect()
}

pub fn raw_worker() -> &'static str {
    env!("CARGO_BIN_EXE_raw-worker")
}

pub fn hello_worker() -> &'static str {
    env!("CARGO_BIN_EXE_hello-worker")
}

pub fn mini_master() -> &'static str {
    env!("CARGO_BIN_EXE_mini-master")
}

/// One HTTP/1.1 request on a fresh connection; returns (status, x-worker-id, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, u32, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let worker = text
        .lines()
        .find_map(|l| l.strip_prefix("x-worker-id: "))
        .and_then(|v| v.trim().parse().ok());
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    match (status, worker) {
        (Some(st), Some(w)) => Ok((st, w, body)),
        _ => Err(std::io::Error::other(format!("bad response {text:?}"))),
    }
}

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub master: Option<Master>,
    pub seen: Vec<Event>,
}

impl Cluster {
    pub fn start(builder: MasterBuilder) -> Cluster {
        Cluster {
            master: Some(builder.start().expect("master starts")),
            seen: Vec::new(),
        }
    }

    pub fn master(&self) -> &Master {
        self.master.as_ref().expect("master running")
    }

    /// The next event matching `pred`, within `timeout`; every event seen is kept in `seen`.
    pub fn wait_for(&mut self, timeout: Duration, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out; events so far: {:#?}",
                self.seen
            );
            match self.master().events().recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => panic!(
                    "no matching event in {timeout:?}; events so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits until `n` distinct workers announced listening; returns the address.
    pub fn wait_listening(&mut self, n: usize) -> BoundAddr {
        let mut workers = std::collections::HashSet::new();
        let mut addr = None;
        for e in &self.seen {
            if let Event::Listening {
                worker, addr: a, ..
            } = e
            {
                workers.insert(*worker);
                addr = Some(a.clone());
            }
        }
        let mut guard = 0;
        while workers.len() < n {
            guard += 1;
            assert!(guard < 1000, "too many events");
            if let Event::Listening {
                worker, addr: a, ..
            } = self.wait_for(WAIT, |e| matches!(e, Event::Listening { .. }))
            {
                workers.insert(worker);
                addr = Some(a);
            }
        }
        addr.expect("listening address")
    }

    pub fn stop(mut self) {
        if let Some(m) = self.master.take() {
            m.shutdown().expect("shutdown");
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                match m.events().recv_timeout(Duration::from_millis(100)) {
                    Ok(Event::Stopped { .. }) => break,
                    Ok(e) => self.seen.push(e),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(_) => {}
                }
            }
            m.wait().expect("master stops cleanly");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(m) = self.master.take() {
            let _ = m.force_shutdown();
            drop(m);
        }
    }
}

pub fn inet(addr: &BoundAddr) -> SocketAddr {
    match addr {
        BoundAddr::Inet(a) => *a,
        other => panic!("not an inet address: {other:?}"),
    }
}

/// Connects, reads the raw worker's identity line (`worker <id> pid <pid>`), returns the id.
pub fn ask_worker(addr: SocketAddr) -> std::io::Result<WorkerId> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    let _ = s.write_all(b"bye");
    let text = String::from_utf8_lossy(&line);
    text.split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .map(WorkerId)
        .ok_or_else(|| std::io::Error::other(format!("unexpected reply {text:?}")))
}

/// A child process (a master in its own process, say) killed and reaped however the test
/// ends, so a failing test leaves no process behind holding its pipes.
pub struct KillOnDrop(pub std::process::Child);

/// A file in the temp dir whose presence holds a test worker back; removed when dropped, so
/// that a failing test leaves none behind.
pub struct Gate(std::path::PathBuf);

impl Gate {
    /// Named after `name` and this test process; not there yet (open).
    pub fn new(name: &str) -> Gate {
        Gate(std::env::temp_dir().join(format!("cluster-rs-{name}-{}", std::process::id())))
    }

    /// [`Gate::new`], closed.
    pub fn closed(name: &str) -> Gate {
        let gate = Gate::new(name);
        gate.close();
        gate
    }

    pub fn close(&self) {
        std::fs::write(&self.0, b"").expect("close the gate");
    }

    pub fn open(&self) {
        std::fs::remove_file(&self.0).expect("open the gate");
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a mini-master's stdout, each with when it was read. Join the thread after the
/// master is gone, so its pipe is closed before the test's fd lock is released.
pub fn master_lines(
    child: &mut std::process::Child,
) -> (
    mpsc::Receiver<(Instant, String)>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}

pub fn next_line(lines: &mpsc::Receiver<(Instant, String)>, prefix: &str) -> (Instant, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `{prefix}` line from the master"));
        if line.starts_with(prefix) {
            return (at, line);
        }
    }
}

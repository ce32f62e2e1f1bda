//! The master at its open-file limit: accept fails with EMFILE while connections pile up
//! unanswered. The reserve fd lets it shed the backlog one connection at a time, without
//! spinning, and it serves again as soon as fds come back.

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// The master's fd limit in this test: far below the connections thrown at it.
const NOFILE: usize = 64;
const CLIENTS: usize = 300;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit(')').next().expect("stat fields");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// What became of one client: served by the worker, or shed (closed or reset) by the master.
fn outcome(mut c: TcpStream) -> &'static str {
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Ok(0) => "shed",
        Ok(n) if buf[..n].starts_with(b"worker ") => "served",
        Ok(n) => panic!("unexpected reply {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "shed",
        Err(e) => panic!("a client hung or failed: {e}"),
    }
}

/// A mini-master at its fd limit: its one worker answers nothing while `marker` exists, and
/// `CLIENTS` connections wait on it.
struct Saturated {
    master: KillOnDrop,
    pid: u32,
    addr: SocketAddr,
    baseline: usize,
    clients: Vec<TcpStream>,
    marker: std::path::PathBuf,
    /// Worker pids from the master's `fork` lines, read on a thread so waits are bounded.
    forks: std::sync::mpsc::Receiver<u32>,
}

impl Saturated {
    /// `None` (the test skips) where `prlimit` is missing.
    fn start(name: &str) -> Option<Saturated> {
        if Command::new("prlimit").arg("--version").output().is_err() {
            eprintln!("SKIPPED: prlimit (util-linux) is not installed");
            return None;
        }
        let marker = std::env::temp_dir().join(format!("cluster-rs-{name}-{}", std::process::id()));
        std::fs::write(&marker, b"hold").expect("marker");
        let mode = format!("hold-while-exists:{}", marker.display());
        let mut master = KillOnDrop(
            Command::new(mini_master())
                .args(["1", raw_worker(), "tcp:127.0.0.1:0", &mode])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn master"),
        );
        let pid = master.0.id();
        let (forks_tx, forks) = std::sync::mpsc::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = master.0.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let sent = match words.as_slice() {
                    ["fork", _, pid] => pid.parse().map_or(Ok(()), |p| forks_tx.send(p)),
                    ["listening", _, a] => a.parse().map_or(Ok(()), |a| {
                        addr_tx.send(a).map_err(|_| std::sync::mpsc::SendError(0))
                    }),
                    _ => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let addr: SocketAddr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the worker listening");
        // Only the master gets the low limit: its worker was forked with the normal one.
        let limit = format!("--nofile={NOFILE}:{NOFILE}");
        let status = Command::new("prlimit")
            .args([&limit, "--pid", &pid.to_string()])
            .status()
            .expect("prlimit");
        assert!(status.success(), "prlimit failed");
        let baseline = open_fds(pid);
        assert!(baseline < NOFILE / 2, "master starts with {baseline} fds");

        // The kernel completes every handshake into the backlog (4096) whatever the master
        // does.
        let clients: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
            .collect();
        // The master accepts until it runs out of fds: the window's hand-offs and the queue
        // hold them all, since the worker answers nothing yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_fds(pid) < NOFILE - 1 {
            assert!(
                Instant::now() < deadline,
                "the master never reached its fd limit ({} of {NOFILE})",
                open_fds(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Saturated {
            master,
            pid,
            addr,
            baseline,
            clients,
            marker,
            forks,
        })
    }

    fn next_fork(&self) -> u32 {
        self.forks
            .recv_timeout(Duration::from_secs(15))
            .expect("a fork within 15 s")
    }
}

impl Drop for Saturated {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.marker);
    }
}

#[test]
fn at_emfile_the_master_sheds_without_spinning_and_recovers() {
    let _fds = shared_fds();
    let Some(mut sat) = Saturated::start("emfile") else {
        return;
    };
    let (pid, addr, baseline) = (sat.pid, sat.addr, sat.baseline);
    // At the limit, with hundreds of connections still in the backlog: a loop that retried
    // accept at once would burn a whole core here.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "the master used {used} ticks of 100 in one second at EMFILE: it spins"
    );

    std::fs::remove_file(&sat.marker).expect("release the worker");
    let (mut served, mut shed) = (0, 0);
    for c in std::mem::take(&mut sat.clients) {
        match outcome(c) {
            "served" => served += 1,
            _ => shed += 1,
        }
    }
    assert!(shed >= 1, "nothing was shed: EMFILE never happened");
    assert!(
        served >= NOFILE / 2,
        "the connections the master held were lost: {served} served, {shed} shed"
    );
    // Fds came back: it accepts and serves again, and holds no more than it started with.
    ask_worker(addr).expect("served after the limit was hit");
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > baseline {
        assert!(
            Instant::now() < deadline,
            "the master kept {} fds, {baseline} at the start",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A worker that dies while the master has no fd to spare cannot be replaced at once: the
/// master must wait for fds, not count each failed spawn as a crash (five of those error the
/// only slot, and the master stops).
#[test]
fn a_worker_lost_at_emfile_is_replaced_once_fds_return() {
    let _fds = shared_fds();
    let Some(mut sat) = Saturated::start("emfile-restart") else {
        return;
    };
    let worker = sat.next_fork();
    // The worker's death frees a few of the master's fds (its channel, its pidfd, ...): lower
    // the limit well under what the master holds, so that only the queued connections'
    // expiry (after 5 s) makes room for a spawn.
    let tight = open_fds(sat.pid).saturating_sub(16);
    let limit = format!("--nofile={tight}:{tight}");
    let status = Command::new("prlimit")
        .args([&limit, "--pid", &sat.pid.to_string()])
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit failed");
    std::fs::remove_file(&sat.marker).expect("the replacement will serve");
    let killed = Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Spawning needs fds the master has not got until its queued connections expire (5 s);
    // the spawns that fail meanwhile must not count as crashes.
    let replacement = sat.next_fork();
    assert_ne!(replacement, worker);
    drop(std::mem::take(&mut sat.clients));
    ask_worker(sat.addr).expect("served by the replacement");
    assert!(
        sat.master.0.try_wait().expect("master status").is_none(),
        "the master stopped"
    );
}

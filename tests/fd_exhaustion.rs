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

#[test]
fn at_emfile_the_master_sheds_without_spinning_and_recovers() {
    let _fds = shared_fds();
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    let marker = std::env::temp_dir().join(format!("cluster-rs-emfile-{}", std::process::id()));
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
    let mut lines = BufReader::new(master.0.stdout.take().expect("stdout")).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("master output").expect("line");
        if let Some(a) = line.strip_prefix("listening 1 ") {
            break a.parse().expect("addr");
        }
    };
    // Only the master gets the low limit: its worker was forked with the normal one.
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let status = Command::new("prlimit")
        .args([&limit, "--pid", &pid.to_string()])
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit failed");
    let baseline = open_fds(pid);
    assert!(baseline < NOFILE / 2, "master starts with {baseline} fds");

    // The kernel completes every handshake into the backlog (4096) whatever the master does.
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
        .collect();
    // The master accepts until it runs out of fds: the window's hand-offs and the queue hold
    // them all, since the worker answers nothing yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) < NOFILE - 1 {
        assert!(
            Instant::now() < deadline,
            "the master never reached its fd limit ({} of {NOFILE})",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // At the limit, with hundreds of connections still in the backlog: a loop that retried
    // accept at once would burn a whole core here.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "the master used {used} ticks of 100 in one second at EMFILE: it spins"
    );

    std::fs::remove_file(&marker).expect("release the worker");
    let (mut served, mut shed) = (0, 0);
    for c in clients {
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

//! Unmodified Node.js programs (tests/node/*.js) as workers of `cluster-cli spawn -- node
//! app.js`: the master speaks Node's own cluster protocol. These need a real `node`; CI
//! installs it, and a missing one fails here rather than skipping.

use std::net::UdpSocket;
use std::path::PathBuf;

use super::*;

fn app(name: &str) -> String {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "tests", "node", name]
        .iter()
        .collect();
    p.to_str().unwrap().to_owned()
}

fn node_available() {
    let out = Command::new("node").arg("--version").output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "these tests need `node` on PATH (.ci/run installs Debian's nodejs): {out:?}"
    );
}

/// `cluster-cli spawn ARGS -- node tests/node/APP`.
fn node_cluster(args: &[&str], app_name: &str) -> Cluster {
    node_available();
    let path = app(app_name);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "node", path.as_str()]);
    Cluster::start(&all)
}

/// The port the workers print as `listening PORT` / `bound PORT`, once `n` have.
fn wait_printed_ports(c: &mut Cluster, n: usize, word: &str) -> BTreeSet<u16> {
    let tag = format!("] {word} ");
    let is_print = |l: &str| l.starts_with("[worker ") && l.contains(&tag);
    let mut lines: Vec<String> = c.seen.iter().filter(|l| is_print(l)).cloned().collect();
    while lines.len() < n {
        lines.push(c.wait_line(word, is_print));
    }
    lines
        .iter()
        .map(|l| {
            let port = l.split(&tag).nth(1).unwrap().split(' ').next().unwrap();
            port.parse().unwrap()
        })
        .collect()
}

#[test]
fn node_http_workers_share_one_listen0_port_and_say_their_id() {
    let mut c = node_cluster(&["-n", "2"], "http_id.js");
    c.find_line("the protocol line", |l| {
        l == "[master] workers speak Node's cluster protocol (auto: the program is node)"
    });
    let (port, workers) = c.wait_listening(2);
    // Both workers' listen(0) got the same port: the one the master bound once.
    let printed = wait_printed_ports(&mut c, 2, "listening");
    assert_eq!(printed, BTreeSet::from([port]));
    assert!(c.seen.iter().all(|l| !l.contains("isWorker=false")));
    let ids: BTreeSet<u32> = workers.iter().map(|w| w.0).collect();
    let mut served = BTreeSet::new();
    for _ in 0..20 {
        let r = get_ok(port, "/");
        let id = r.worker_id().expect("x-worker-id (cluster.worker.id)");
        assert_eq!(r.body, format!("hello from {id}\n"));
        served.insert(id);
    }
    assert_eq!(served, ids, "round-robin reaches both Node workers");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_net_echo() {
    let mut c = node_cluster(&["-n", "2"], "net_echo.js");
    let (port, _) = c.wait_listening(2);
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        let s = connect(port).unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(format!("ping{i}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let (id, rest) = line.split_once(':').unwrap();
        assert_eq!(rest, format!("ping{i}\n"));
        ids.insert(id.to_owned());
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_dgram_two_workers_bind_one_shared_port() {
    let mut c = node_cluster(&["-n", "2"], "dgram.js");
    let (port, _) = c.wait_listening(2);
    let printed = wait_printed_ports(&mut c, 2, "bound");
    assert_eq!(
        printed,
        BTreeSet::from([port]),
        "both workers share the port"
    );
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut by = BTreeSet::new();
    for i in 0..20 {
        client
            .send_to(format!("d{i}").as_bytes(), ("127.0.0.1", port))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = client.recv(&mut buf).expect("every datagram is answered");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut parts = text.splitn(3, ':');
        assert_eq!(parts.next(), Some("pong"));
        by.insert(parts.next().unwrap().to_owned());
        assert_eq!(parts.next(), Some(format!("d{i}").as_str()));
    }
    // Which worker the kernel wakes for a shared UDP socket is its choice (as in Node).
    eprintln!("datagrams answered by workers {by:?}");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_program_that_throws_at_start_errors_its_slots_and_the_master_fails() {
    let mut c = node_cluster(
        &["-n", "2", "--restart-delay", "10", "--max-restarts", "2"],
        "throws.js",
    );
    let status = c.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    let errored = c
        .seen
        .iter()
        .filter(|l| l.starts_with("[master] slot ") && l.contains(" errored: "))
        .count();
    assert_eq!(errored, 2, "{:?}", c.seen);
    assert!(
        c.stderr_lines().iter().any(|l| l.contains("boom at start")),
        "the worker's stack reaches stderr"
    );
}

#[test]
fn node_app_sees_eaddrinuse_for_a_port_held_elsewhere() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let mut c = node_cluster(&["-n", "1", "--env", &format!("PORT={port}")], "http_id.js");
    c.wait_line("the app's error handler", |l| {
        l.starts_with("[worker ") && l.ends_with("] server error EADDRINUSE")
    });
    let status = c.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    drop(holder);
}

#[test]
fn node_sigterm_lets_slow_requests_finish() {
    let mut c = node_cluster(&["-n", "2"], "http_id.js");
    let (port, _) = c.wait_listening(2);
    sigterm_with_slow_requests_in_flight(&mut c, port, 700);
}

#[test]
fn node_sigkill_under_load_loses_nothing_the_master_held() {
    let mut c = node_cluster(&["-n", "2", "--restart-delay", "50"], "http_id.js");
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
    // Hand-offs in flight to the victim are re-queued; only a request it had already taken
    // dies with it (a reset), at most one per client thread.
    assert!(res.failed.len() <= LOAD_THREADS, "failed: {:?}", res.failed);
    for f in &res.failed {
        assert!(
            ["ConnectionReset", "UnexpectedEof", "BrokenPipe"]
                .iter()
                .any(|k| f.starts_with(k)),
            "failed otherwise than by the victim's death: {f}"
        );
    }
    let mut served = BTreeSet::new();
    for _ in 0..20 {
        served.insert(get_ok(port, "/").worker_id().unwrap());
    }
    assert!(served.contains(&new_id), "the slot came back and serves");
    eprintln!(
        "node kill under load: {} ok, {} reset",
        res.ok,
        res.failed.len()
    );
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_hup_under_load_fails_nothing_and_replaces_every_pid() {
    let mut c = node_cluster(&["-n", "2"], "http_id.js");
    let (port, old) = c.wait_listening(2);
    let load = Load::start(port, LOAD_THREADS);
    c.signal(Signal::SIGHUP);
    let start = c.seen.len();
    c.wait_line("reload done", |l| l == "[master] reload done");
    let new: BTreeSet<u32> = c.seen[start..]
        .iter()
        .filter(|l| l.contains(" forked in slot "))
        .filter_map(|l| worker_of(l))
        .map(|w| w.1)
        .collect();
    assert_eq!(new.len(), 2);
    let res = load.finish();
    assert!(res.failed.is_empty(), "failed requests: {:?}", res.failed);
    assert!(res.ok > LOAD_THREADS * LOAD_TAIL);
    for _ in 0..20 {
        let r = get_ok(port, "/");
        let pid: u32 = r.headers["x-worker-pid"].parse().unwrap();
        assert!(new.contains(&pid), "old pid {pid} still serving");
    }
    for (id, pid) in old {
        let want = format!("[master] worker {id} (pid {pid}) exited with code 0, after disconnect");
        c.find_line(&want, |l| l == want);
    }
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_ttin_and_ttou() {
    let mut c = node_cluster(&["-n", "1"], "http_id.js");
    c.wait_listening(1);
    c.signal(Signal::SIGTTIN);
    let fork = c.wait_line("fork in slot 1", |l| l.ends_with(" forked in slot 1"));
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
fn node_worker_sending_malformed_json_is_dropped_while_the_other_serves() {
    let mut c = node_cluster(&["-n", "2", "--restart-delay", "50"], "malformed.js");
    let dropped = c.wait_line("worker 1 dropped", |l| {
        l.starts_with("[master] worker 1 (pid ") && l.contains(") dropped: ")
    });
    assert!(dropped.contains("malformed JSON"), "{dropped}");
    let (port, _) = c.wait_listening(1);
    for _ in 0..20 {
        let r = get_ok(port, "/");
        assert_ne!(r.worker_id(), Some(1));
    }
    c.signal(Signal::SIGTERM);
    // Worker 1's replacements misbehave the same way; the stop is still orderly.
    let status = c.wait_exit(Duration::from_secs(30));
    assert!(status.code().is_some(), "{status:?}");
}

#[test]
fn node_shared_policy_hands_each_worker_the_bound_socket() {
    let mut c = node_cluster(&["-n", "2", "--policy", "shared"], "http_id.js");
    let (port, _) = c.wait_listening(2);
    let printed = wait_printed_ports(&mut c, 2, "listening");
    assert_eq!(printed, BTreeSet::from([port]));
    for _ in 0..10 {
        assert!(get_ok(port, "/").worker_id().is_some());
    }
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_http_on_a_unix_socket_path() {
    use std::os::unix::net::UnixStream;
    let dir = std::env::temp_dir().join(format!("cluster-node-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("app.sock");
    let env = format!("SOCK={}", sock.display());
    let mut c = node_cluster(&["-n", "2", "--env", &env], "http_unix.js");
    for _ in 0..2 {
        c.wait_line("a listening line", |l| l.contains(" listening on "));
    }
    let mut ids = BTreeSet::new();
    for _ in 0..10 {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let r = read_response(&mut BufReader::new(s)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "unix hello\n"));
        ids.insert(r.worker_id().unwrap());
    }
    assert_eq!(ids.len(), 2, "both workers take connections from the path");
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn node_worker_that_disconnects_itself_leaves_cleanly_and_is_not_replaced() {
    let mut c = node_cluster(&["-n", "2"], "self_disconnect.js");
    let left = c.wait_line("worker 1 exits after disconnect", |l| {
        l.starts_with("[master] worker 1 (pid ")
            && l.ends_with(" exited with code 0, after disconnect")
    });
    let listening = c.find_line("worker 2 listening", |l| {
        l.starts_with("[master] worker 2 (pid ") && l.contains(" listening on ")
    });
    let port: u16 = listening.rsplit(':').next().unwrap().parse().unwrap();
    for _ in 0..10 {
        assert_eq!(get_ok(port, "/").worker_id(), Some(2), "after {left}");
    }
    assert!(
        !c.seen.iter().any(|l| l.contains(" restarting in ")),
        "a planned leave is not a crash: {:?}",
        c.seen
    );
    c.signal(Signal::SIGTERM);
    assert_clean_exit(&mut c);
}

#[test]
fn node_sigint_stops_node_workers_gracefully() {
    let mut c = node_cluster(&["-n", "2"], "http_id.js");
    let (port, workers) = c.wait_listening(2);
    get_ok(port, "/");
    c.signal(Signal::SIGINT);
    assert_clean_exit(&mut c);
    for (id, pid) in workers {
        let want = format!("[master] worker {id} (pid {pid}) exited with code 0, after disconnect");
        assert!(c.seen.contains(&want), "missing: {want}");
    }
}

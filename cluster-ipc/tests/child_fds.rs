//! A child started with `spawn_with_channel` holds its channel at the advertised fd and
//! nothing else of ours (hazards D5/E6). The child is this test binary re-executed: it lists
//! its own `/proc/self/fd` and reports over the channel.

// The helpers below are test code too: like the tests, they fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster_core::Message;
use cluster_ipc::{Channel, IpcError, Limits, spawn_with_channel};

mod common;
use common::open_fds;

const CHILD_ENV: &str = "CLUSTER_IPC_TEST_FD_CHILD";
const CHANNEL_FD: i32 = 3;
const WAIT: Option<Duration> = Some(Duration::from_secs(30));

/// Fds this process holds without close-on-exec, which every exec'd child gets whatever
/// `spawn_with_channel` does. A test runner may hand such fds down to us (seen here: a
/// `/dev/null` at 10 and a pipe at 251 from the sandbox's shell); they are not ours to police,
/// so they are reported and allowed, and everything else must be absent.
fn ambient_inheritable_fds() -> BTreeSet<i32> {
    open_fds()
        .into_iter()
        .filter(|fd| *fd > 2)
        .filter(|fd| {
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
            // O_CLOEXEC shows in fdinfo's octal flags as 02000000.
            matches!(flags, Some(f) if f & 0o2000000 == 0)
        })
        .collect()
}

#[test]
fn child_inherits_only_its_channel() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    // A close-on-exec socket open in the parent: it must not reach the child.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_inherits_only_its_channel",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut ch = spawn_with_channel(&mut cmd, CHANNEL_FD, Limits::default()).unwrap();
    let ambient = ambient_inheritable_fds();
    if !ambient.is_empty() {
        eprintln!("note: the test process itself holds inheritable fds {ambient:?}");
    }
    let mut proc = cmd.spawn().unwrap();
    // The child's end lives in `cmd` until dropped; keep it and EOF would never come.
    drop(cmd);

    let report = ch.recv_blocking(WAIT).unwrap();
    let Message::User { payload } = report.msg else {
        panic!("unexpected {:?}", report.msg);
    };
    let report = String::from_utf8(payload).unwrap();
    let mut parts = report.split(';');
    let (list, kind, ino3) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let fds: BTreeSet<i32> = list.split(',').map(|s| s.parse().unwrap()).collect();
    let mut want = BTreeSet::from([0, 1, 2, CHANNEL_FD]);
    want.extend(&ambient);
    assert_eq!(fds, want, "child has {report}");
    assert_eq!(kind, "socket", "fd {CHANNEL_FD} in the child");
    // The listener may well have number 3 here; what matters is that the child's fd 3 is
    // a different socket.
    let listener_ino = fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
        .unwrap()
        .ino();
    assert_ne!(ino3, listener_ino.to_string(), "the listener leaked");

    // The child exits after reporting; its end closing is the channel's EOF.
    let err = ch.recv_blocking(WAIT).unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(proc.wait().unwrap().success());
}

fn child() {
    // Listed before anything else opens fds; the channel is adopted afterwards.
    let fds = open_fds();
    let (kind, ino) = match fs::metadata(format!("/proc/self/fd/{CHANNEL_FD}")) {
        Ok(m) if m.file_type().is_socket() => ("socket", m.ino()),
        Ok(m) => ("not-a-socket", m.ino()),
        Err(_) => ("missing", 0),
    };
    let list: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
    let mut ch = Channel::from_inherited_fd(CHANNEL_FD, Limits::default()).unwrap();
    // A second adoption would make a second owner of the same fd: it must fail untouched.
    let again = Channel::from_inherited_fd(CHANNEL_FD, Limits::default()).unwrap_err();
    assert!(
        matches!(&again, IpcError::Io(e) if e.kind() == std::io::ErrorKind::AlreadyExists),
        "{again:?}"
    );
    let payload = format!("{};{kind};{ino}", list.join(",")).into_bytes();
    ch.send_blocking(&Message::User { payload }, &[], WAIT)
        .unwrap();
}

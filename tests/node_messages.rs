//! The library API with an unmodified Node worker (tests/node/messages.js): `process.send`
//! reaches [`Event::Message`] as JSON, and [`cluster_master::MasterControl::send`] with JSON
//! reaches `process.on('message')`; a handle sent with a message is closed
//! (tests/node/send_handle.js). Needs a real `node` (CI installs it; never skipped).

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;

use cluster_core::WorkerId;
use cluster_master::{Coalesce, Event, MasterBuilder, MasterError, Protocol};

use crate::util::{Cluster, WAIT};

fn script() -> PathBuf {
    node_script("messages.js")
}

fn node_script(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "node", name].iter().collect()
}

fn json(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// One Node worker running `script`, whose first message is `{"port":N}`.
fn one_worker_saying_its_port(script: &str) -> (Cluster, u16) {
    one_worker_saying_its_port_under(
        MasterBuilder::new("node")
            .arg(node_script(script))
            .protocol(Protocol::Node),
    )
}

fn one_worker_saying_its_port_under(builder: MasterBuilder) -> (Cluster, u16) {
    let mut c = Cluster::start(builder.workers(1));
    let Event::Message { payload, .. } = c.wait_for(WAIT, |e| matches!(e, Event::Message { .. }))
    else {
        unreachable!()
    };
    let port = json(&payload)
        .trim_start_matches("{\"port\":")
        .trim_end_matches('}')
        .parse()
        .unwrap();
    (c, port)
}

#[test]
fn process_send_both_ways_with_node_workers() {
    let _fds = crate::util::shared_fds();
    let builder = MasterBuilder::new("node")
        .arg(script())
        .protocol(Protocol::Node)
        .workers(2);
    let mut c = Cluster::start(builder);
    let mut greeted = Vec::new();
    for _ in 0..2 {
        let Event::Message { worker, payload } =
            c.wait_for(WAIT, |e| matches!(e, Event::Message { .. }))
        else {
            unreachable!()
        };
        assert_eq!(
            json(&payload),
            format!("{{\"hello\":{},\"isWorker\":true}}", worker.0)
        );
        greeted.push(worker);
    }
    greeted.sort();
    assert_eq!(greeted, vec![WorkerId(1), WorkerId(2)]);
    let control = c.master().control();
    for w in &greeted {
        // Pretty-printed on purpose: the channel re-encodes it as one line.
        let msg = format!(
            "{{\n  \"to\": {},\n  \"text\": \"hi \\\"there\\\"\"\n}}",
            w.0
        );
        control.send(*w, msg.into_bytes()).unwrap();
        let Event::Message { worker, payload } = c.wait_for(
            WAIT,
            |e| matches!(e, Event::Message { worker, .. } if worker == w),
        ) else {
            unreachable!()
        };
        assert_eq!(worker, *w);
        assert_eq!(
            json(&payload),
            format!(
                "{{\"echo\":{{\"to\":{},\"text\":\"hi \\\"there\\\"\"}},\"id\":{}}}",
                w.0, w.0
            )
        );
    }
    // Not JSON, or dressed as one of Node's internal messages: refused, the worker untouched.
    for bad in [
        &b"not json"[..],
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\"}",
    ] {
        let e = control.send(WorkerId(1), bad.to_vec()).unwrap_err();
        assert!(matches!(e, MasterError::Io { .. }), "{e}");
    }
    control.send(WorkerId(1), b"[1,2]".to_vec()).unwrap();
    c.wait_for(WAIT, |e| {
        matches!(e, Event::Message { payload, .. } if payload.as_slice() == b"{\"echo\":[1,2],\"id\":1}")
    });
    c.stop();
}

/// A Node worker's lines are read while the master accepts connections without being woken
/// by each of them (`answers_one_by_one`), so they must still be read once the connections
/// stop coming: here one connection, then nothing that would wake the master but the
/// worker's own writes (its answer, then a message).
#[test]
fn what_a_node_worker_writes_after_the_last_connection_is_read() {
    let _fds = crate::util::shared_fds();
    let (mut c, port) = one_worker_saying_its_port("conn_note.js");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "bye\n");
    // Closed on our side too, or the worker's server would not close at the stop.
    drop(s);
    // No command to the master before this: one would wake it and read the channel anyway.
    c.wait_for(WAIT, |e| {
        matches!(e, Event::Message { payload, .. } if payload.as_slice() == b"{\"served\":1,\"id\":1}")
    });
    let stats = c.master().stats().unwrap();
    assert_eq!((stats.accepted, stats.taken), (1, 1), "{stats:?}");
    c.stop();
}

/// `process.send(msg, socket)`: the message arrives, the socket is ACKed and closed (said
/// once, by [`Event::HandleClosed`]), and the worker's server, whose close waits until the
/// primary says it holds none of the sockets it was sent, still closes.
#[test]
fn a_socket_a_node_worker_sends_is_closed_and_its_server_still_closes() {
    let _fds = crate::util::shared_fds();
    let (mut c, port) = one_worker_saying_its_port("send_handle.js");
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::HandleClosed { worker } if worker.0 == 1),
    );
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Message { payload, .. } if payload.as_slice() == b"{\"sending\":1}"),
    );
    c.wait_for(
        WAIT,
        |e| matches!(e, Event::Message { payload, .. } if payload.as_slice() == b"{\"closed\":1}"),
    );
    // Neither side kept the connection.
    client.set_read_timeout(Some(WAIT)).unwrap();
    let end = client.read(&mut [0u8; 16]);
    assert!(
        matches!(&end, Ok(0))
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    c.stop();
}

/// A Node worker whose event loop is blocked leaves what it is handed unread: with one worker
/// that is every worker behind, so the master pauses before its waits ([`Coalesce`]); off, it
/// never does. Either way every client is served once the worker runs again.
#[test]
fn the_master_pauses_while_a_node_worker_leaves_its_hand_offs_unread() {
    let _fds = crate::util::shared_fds();
    for coalesce in [Some(Coalesce::default()), None] {
        let gate = crate::util::Gate::closed(&format!("blocks-first-{}", coalesce.is_some()));
        let (mut c, port) = one_worker_saying_its_port_under(
            MasterBuilder::new("node")
                .arg(node_script("blocks_first.js"))
                .arg(gate.path())
                .protocol(Protocol::Node)
                .coalesce(coalesce),
        );
        let connect = || {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        };
        let first = connect();
        c.wait_for(WAIT, |e| {
            matches!(e, Event::Message { payload, .. } if payload.as_slice() == b"{\"blocked\":true}")
        });
        let more: Vec<TcpStream> = (0..8).map(|_| connect()).collect();
        // The pause comes at the end of the pass that dealt the ninth, which may be after
        // that pass answered a stats request: wait for both.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let s = c.master().stats().unwrap();
            if s.handed_off == 9 && (coalesce.is_none() || s.coalesced_pauses > 0) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never all handed off (and a pause taken, if on): {s:?}"
            );
            std::thread::yield_now();
        }
        gate.open();
        for mut s in std::iter::once(first).chain(more) {
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "bye\n");
        }
        let stats = c.master().stats().unwrap();
        if coalesce.is_none() {
            assert_eq!(stats.coalesced_pauses, 0, "{stats:?}");
        }
        assert_eq!(stats.closed_unserved, 0, "{stats:?}");
        c.stop();
    }
}

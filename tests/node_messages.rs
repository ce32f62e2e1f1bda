//! The library API with an unmodified Node worker (tests/node/messages.js): `process.send`
//! reaches [`Event::Message`] as JSON, and [`cluster_master::MasterControl::send`] with JSON
//! reaches `process.on('message')`. Needs a real `node` (CI installs it; never skipped).

use std::path::PathBuf;

use cluster_core::WorkerId;
use cluster_master::{Event, MasterBuilder, MasterError, Protocol};

use crate::util::{Cluster, WAIT};

fn script() -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "node", "messages.js"]
        .iter()
        .collect()
}

fn json(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
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

use proptest::prelude::*;

use super::*;
use cluster_core::Peer;

fn line(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn decode(c: &mut NodeCodec, s: &str) -> Result<Decoded, NodeError> {
    c.decode(&line(s), false, &mut Vec::new())
}

/// Encodes and commits, as the channel does once the line is written; true for a handle line.
fn sent(
    c: &mut NodeCodec,
    msg: &Message,
    n_fds: usize,
    out: &mut Vec<u8>,
) -> Result<bool, NodeError> {
    let pending = c.encode(msg, n_fds, out)?;
    let handle = matches!(pending, Pending::NewConn { .. }) || pending.is_server_handle();
    c.commit(pending);
    Ok(handle)
}

fn query(c: &mut NodeCodec, seq: u64, port: u16, index: u32) -> Message {
    let q = format!(
        "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":{index},\"data\":{{\"t\":\"k\"}},\"address\":\"127.0.0.1\",\"port\":{port},\"addressType\":4,\"flags\":0,\"backlog\":0,\"seq\":{seq}}}"
    );
    decode(c, &q).unwrap().msg.unwrap()
}

fn grant_rr(c: &mut NodeCodec, seq: u64, server: u32, port: u16) -> String {
    let mut out = Vec::new();
    let handle = sent(
        c,
        &Message::QueryServerReply {
            seq: Seq(seq),
            reply: ServerReply::Granted {
                server: ServerId(server),
                addr: BoundAddr::Inet(SocketAddr::from(([127, 0, 0, 1], port))),
                grant: ServerGrant::RoundRobin,
            },
        },
        0,
        &mut out,
    )
    .unwrap();
    assert!(!handle);
    String::from_utf8(out).unwrap()
}

#[test]
fn query_server_becomes_a_listen_spec_and_the_reply_echoes_key_and_data() {
    let mut c = NodeCodec::new(SharedServerData::default());
    let m = query(&mut c, 1, 0, 2);
    assert_eq!(
        m,
        Message::QueryServer {
            seq: Seq(1),
            spec: ListenSpec::tcp("127.0.0.1:0".parse().unwrap()),
            index: 2,
        }
    );
    let reply = grant_rr(&mut c, 1, 4, 40000);
    assert_eq!(
        reply,
        "{\"cmd\":\"NODE_CLUSTER\",\"errno\":null,\"key\":\"127.0.0.1:0:4:undefined:2\",\"ack\":1,\"data\":{\"t\":\"k\"},\"sockname\":{\"address\":\"127.0.0.1\",\"family\":\"IPv4\",\"port\":40000},\"seq\":0}\n"
    );
    // `listening` repeats the query with the bound port.
    let l = decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"listening\",\"index\":2,\"data\":null,\"address\":\"127.0.0.1\",\"port\":40000,\"addressType\":4,\"flags\":0,\"backlog\":0,\"seq\":2}").unwrap();
    assert_eq!(
        l.msg,
        Some(Message::Listening {
            server: ServerId(4),
            addr: BoundAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 40000))),
        })
    );
    let close = decode(
        &mut c,
        "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"close\",\"key\":\"127.0.0.1:0:4:undefined:2\",\"seq\":3}",
    )
    .unwrap();
    assert_eq!(
        close.msg,
        Some(Message::Close {
            server: ServerId(4)
        })
    );
}

#[test]
fn a_failed_bind_travels_as_a_negative_errno() {
    let mut c = NodeCodec::new(SharedServerData::default());
    query(&mut c, 5, 8000, 0);
    let mut out = Vec::new();
    sent(
        &mut c,
        &Message::QueryServerReply {
            seq: Seq(5),
            reply: ServerReply::Failed(cluster_core::ListenError {
                errno: libc::EADDRINUSE,
                context: String::new(),
            }),
        },
        0,
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("\"errno\":-98,"), "{text}");
}

#[test]
fn udp_and_shared_grants_go_in_a_handle() {
    let mut c = NodeCodec::new(SharedServerData::default());
    let m = decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":\"127.0.0.1\",\"port\":41234,\"addressType\":\"udp4\",\"fd\":-1,\"flags\":0,\"seq\":1}").unwrap().msg.unwrap();
    assert!(
        matches!(&m, Message::QueryServer { spec, .. } if spec.addr.is_udp()),
        "{m:?}"
    );
    let mut out = Vec::new();
    let handle = sent(
        &mut c,
        &Message::QueryServerReply {
            seq: Seq(1),
            reply: ServerReply::Granted {
                server: ServerId(1),
                addr: BoundAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 41234))),
                grant: ServerGrant::Shared,
            },
        },
        1,
        &mut out,
    )
    .unwrap();
    assert!(handle);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("{\"cmd\":\"NODE_HANDLE\",\"type\":\"dgram.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"errno\":0,"), "{text}");
    // The channel sends a NACKed server handle again; the codec says which handle it was.
    let nack = decode(&mut c, "{\"cmd\":\"NODE_HANDLE_NACK\"}").unwrap();
    assert_eq!(nack.server_handle, Some(HandleFate::Nacked));
    c.server_handle_resent();
    let ack = decode(&mut c, "{\"cmd\":\"NODE_HANDLE_ACK\"}").unwrap();
    assert_eq!(ack.server_handle, Some(HandleFate::Acked));
}

#[test]
fn newconn_answers_map_to_accepted_and_refused() {
    let mut c = NodeCodec::new(SharedServerData::default());
    query(&mut c, 1, 8000, 0);
    grant_rr(&mut c, 1, 1, 8000);
    let mut seqs = Vec::new();
    for n in 0..3u64 {
        let mut out = Vec::new();
        assert!(
            sent(
                &mut c,
                &Message::new_conn(ServerId(1), ConnId(n), Peer::Unix),
                1,
                &mut out,
            )
            .unwrap()
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        seqs.push(v["msg"]["seq"].as_u64().unwrap());
    }
    let ans = |c: &mut NodeCodec, seq: u64, ok: bool| {
        decode(
            c,
            &format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq},\"accepted\":{ok},\"seq\":9}}"),
        )
        .unwrap()
        .msg
    };
    assert_eq!(
        ans(&mut c, seqs[1], true),
        Some(Message::Accepted { conn: ConnId(1) })
    );
    assert_eq!(
        ans(&mut c, seqs[0], false),
        Some(Message::Refused {
            conn: ConnId(0),
            reason: RefuseReason::MaxConnections
        })
    );
    // Answered twice, or never sent: ignored, as Node does.
    assert_eq!(ans(&mut c, seqs[1], true), None);
    assert_eq!(
        decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"ack\":-1}")
            .unwrap()
            .msg,
        None
    );
    // The third hand-off's fd was lost on the way.
    decode(&mut c, "{\"cmd\":\"NODE_HANDLE_ACK\"}").unwrap();
    decode(&mut c, "{\"cmd\":\"NODE_HANDLE_ACK\"}").unwrap();
    assert_eq!(
        decode(&mut c, "{\"cmd\":\"NODE_HANDLE_NACK\"}")
            .unwrap()
            .msg,
        Some(Message::Refused {
            conn: ConnId(2),
            reason: RefuseReason::FdLost
        })
    );
    assert_eq!(c.unanswered(), 0);
}

#[test]
fn exited_after_disconnect_is_acked() {
    let mut c = NodeCodec::new(SharedServerData::default());
    let mut replies = Vec::new();
    let d = c
        .decode(
            b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"exitedAfterDisconnect\",\"seq\":4}",
            false,
            &mut replies,
        )
        .unwrap();
    assert_eq!(d.msg, Some(Message::ExitedAfterDisconnect));
    assert_eq!(replies, b"{\"cmd\":\"NODE_CLUSTER\",\"ack\":4,\"seq\":0}\n");
}

#[test]
fn user_messages_pass_as_json_both_ways() {
    let mut c = NodeCodec::new(SharedServerData::default());
    for s in [
        "{\"hello\":\"w\\\"orld\"}",
        "[\"NODE_CLUSTER\",\"online\"]",
        "42",
        "\"NODE_X\"",
        "null",
        "{\"cmd\":\"NODE\"}",
    ] {
        assert_eq!(
            decode(&mut c, s).unwrap().msg,
            Some(Message::User { payload: line(s) }),
            "{s}"
        );
    }
    let mut out = Vec::new();
    sent(
        &mut c,
        &Message::User {
            payload: b"{\n \"a\": [1, 2]\n}".to_vec(),
        },
        0,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, b"{  \"a\": [1, 2] }\n");
    for bad in [
        &b"not json"[..],
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\"}",
    ] {
        let e = sent(
            &mut c,
            &Message::User {
                payload: bad.to_vec(),
            },
            0,
            &mut Vec::new(),
        );
        assert!(matches!(e, Err(NodeError::Unsupported(_))), "{e:?}");
    }
}

#[test]
fn violations_are_named() {
    let mut c = NodeCodec::new(SharedServerData::default());
    assert!(
        matches!(decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"dance\",\"seq\":1}"), Err(NodeError::UnknownAct(a)) if a == "dance")
    );
    assert!(matches!(
        decode(&mut c, "{oops"),
        Err(NodeError::Malformed(_))
    ));
    assert!(matches!(
        decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"act\":1}"),
        Err(NodeError::Malformed(_))
    ));
    assert!(matches!(
        decode(&mut c, "{\"cmd\":\"NODE_CLUSTER\",\"seq\":1}"),
        Err(NodeError::BadField { .. })
    ));
    assert!(matches!(
        decode(
            &mut c,
            "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"seq\":1,\"addressType\":\"sctp\"}"
        ),
        Err(NodeError::BadField { .. })
    ));
}

#[test]
fn the_splitter_caps_lines() {
    let mut s = LineSplitter::new(4);
    let buf = s.read_buf(16);
    buf[..8].copy_from_slice(b"abcd\nabc");
    s.commit(8);
    assert_eq!(s.next_line().unwrap(), Some(&b"abcd"[..]));
    assert_eq!(s.next_line().unwrap(), None);
    let buf = s.read_buf(16);
    buf[..3].copy_from_slice(b"de\n");
    s.commit(3);
    assert_eq!(s.next_line(), Err(NodeError::LineTooLong { max: 4 }));
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), fd in any::<bool>()) {
        let mut c = NodeCodec::new(SharedServerData::default());
        let _ = c.decode(&bytes, fd, &mut Vec::new());
    }

    #[test]
    fn json_shaped_garbage_never_panics(
        fields in proptest::collection::vec(
            (prop::sample::select(vec!["cmd", "act", "seq", "ack", "accepted", "key", "index", "data", "address", "port", "addressType", "fd", "flags", "backlog", "msg"]),
             prop::sample::select(vec!["\"NODE_CLUSTER\"", "\"NODE_HANDLE\"", "\"queryServer\"", "\"listening\"", "\"close\"", "\"online\"", "\"udp4\"", "-1", "0", "4", "6", "65536", "null", "true", "\"x\"", "{}", "[]", "1e400", "18446744073709551616"])),
            0..8),
        fd in any::<bool>(),
    ) {
        let mut c = NodeCodec::new(SharedServerData::default());
        query(&mut c, 1, 8000, 0);
        grant_rr(&mut c, 1, 1, 8000);
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let text = format!("{{{}}}", body.join(","));
        let _ = c.decode(text.as_bytes(), fd, &mut Vec::new());
    }

    /// However the stream is cut into reads, the same lines come out.
    #[test]
    fn any_chunking_gives_the_same_lines(
        lines in proptest::collection::vec("[a-z{}\":,0-9]{0,40}", 0..20),
        cuts in proptest::collection::vec(1usize..50, 1..40),
    ) {
        let stream: Vec<u8> = lines.iter().flat_map(|l| l.bytes().chain(std::iter::once(b'\n'))).collect();
        let mut s = LineSplitter::new(64);
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            let n = cuts[i % cuts.len()].min(stream.len() - pos);
            i += 1;
            let buf = s.read_buf(64);
            buf[..n].copy_from_slice(&stream[pos..pos + n]);
            s.commit(n);
            pos += n;
            while let Some(l) = s.next_line().unwrap() {
                got.push(String::from_utf8(l.to_vec()).unwrap());
            }
        }
        prop_assert_eq!(got, lines);
        prop_assert_eq!(s.buffered(), 0);
    }

    /// Every hand-off gets exactly one answer back, whichever order the worker answers in.
    #[test]
    fn newconn_round_trip(order in Just((0u64..20).collect::<Vec<_>>()).prop_shuffle(), accept in proptest::collection::vec(any::<bool>(), 20)) {
        let mut c = NodeCodec::new(SharedServerData::default());
        query(&mut c, 1, 8000, 0);
        grant_rr(&mut c, 1, 1, 8000);
        let mut seq_of = Vec::new();
        for n in 0..20u64 {
            let mut out = Vec::new();
            sent(&mut c, &Message::new_conn(ServerId(1), ConnId(n), Peer::Unix), 1, &mut out).unwrap();
            prop_assert_eq!(out.last(), Some(&b'\n'));
            prop_assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            seq_of.push(v["msg"]["seq"].as_u64().unwrap());
        }
        for &n in &order {
            let ok = accept[n as usize];
            let d = decode(&mut c, &format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{},\"accepted\":{ok},\"seq\":1}}", seq_of[n as usize])).unwrap();
            let want = if ok { Message::Accepted { conn: ConnId(n) } } else { Message::Refused { conn: ConnId(n), reason: RefuseReason::MaxConnections } };
            prop_assert_eq!(d.msg, Some(want));
        }
        prop_assert_eq!(c.unanswered(), 0);
    }

    /// The quick reading of a `newconn` answer agrees with the general parse, and takes only
    /// Node's exact spelling.
    #[test]
    fn quick_answers_agree_with_the_parse(ack in 0..=i64::MAX as u64, seq in any::<u64>(), accepted in any::<bool>(), space in any::<bool>()) {
        let sp = if space { " " } else { "" };
        let text = format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{sp}{ack},\"accepted\":{accepted},\"seq\":{seq}}}");
        let wire: Wire<'_> = serde_json::from_str(&text).unwrap();
        let parsed = (u64::try_from(wire.ack.unwrap_or(-1)).ok(), wire.accepted);
        match quick_answer(text.as_bytes()) {
            Some((a, ok)) => {
                prop_assert!(!space);
                prop_assert_eq!((Some(a), Some(ok)), parsed);
            }
            None => prop_assert!(space),
        }
    }

    /// User payloads the master sends come out as one line that parses back to the same value.
    #[test]
    fn user_payload_round_trip(s in ".{0,40}", n in any::<i64>()) {
        let value = serde_json::json!({"text": s, "n": n, "nested": [s.clone()]});
        let payload = serde_json::to_vec_pretty(&value).unwrap();
        let mut c = NodeCodec::new(SharedServerData::default());
        let mut out = Vec::new();
        sent(&mut c, &Message::User { payload }, 0, &mut out).unwrap();
        prop_assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let back = decode(&mut c, std::str::from_utf8(&out[..out.len() - 1]).unwrap()).unwrap();
        let Some(Message::User { payload }) = back.msg else { panic!("not a user message") };
        let got: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        prop_assert_eq!(got, value);
    }
}

fn tls_query(data: &str, port: u16) -> String {
    format!(
        "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":{data},\"address\":\"127.0.0.1\",\"port\":{port},\"addressType\":4,\"seq\":1}}"
    )
}

#[test]
fn every_worker_gets_the_first_workers_data_for_a_key() {
    let shared = SharedServerData::default();
    let mut workers = Vec::new();
    for (sent, echoed) in [
        ("null", "null"),
        ("{\"ticketKeys\":\"aa\"}", "{\"ticketKeys\":\"aa\"}"),
        ("{\"ticketKeys\":\"bb\"}", "{\"ticketKeys\":\"aa\"}"),
    ] {
        let mut c = NodeCodec::new(shared.clone());
        decode(&mut c, &tls_query(sent, 8443)).unwrap();
        let reply = grant_rr(&mut c, 1, 1, 8443);
        assert!(reply.contains(&format!(",\"data\":{echoed},")), "{reply}");
        workers.push(c);
    }
}

/// The data of a key lives while a worker holds or asks for it, as on Node's primary, where
/// it lives on the server handle: released by `close`, a failed bind and the worker's end.
#[test]
fn shared_data_goes_with_the_last_holder_of_its_key() {
    let shared = SharedServerData::default();
    let close = "{\"cmd\":\"NODE_CLUSTER\",\"act\":\"close\",\"key\":\"127.0.0.1:8443:4:undefined:0\",\"seq\":3}";
    let mut a = NodeCodec::new(shared.clone());
    let mut b = NodeCodec::new(shared.clone());
    decode(&mut a, &tls_query("{\"k\":\"aa\"}", 8443)).unwrap();
    grant_rr(&mut a, 1, 1, 8443);
    decode(&mut b, &tls_query("{\"k\":\"bb\"}", 8443)).unwrap();
    grant_rr(&mut b, 1, 1, 8443);
    assert_eq!(shared.keys(), 1);
    decode(&mut a, close).unwrap();
    assert_eq!(shared.keys(), 1, "b still holds the key");
    drop(b);
    assert_eq!(shared.keys(), 0);
    // A new holder's data is the key's data now.
    decode(&mut a, &tls_query("{\"k\":\"cc\"}", 8443)).unwrap();
    assert!(grant_rr(&mut a, 1, 1, 8443).contains("\"data\":{\"k\":\"cc\"}"));
    // A failed bind releases the query's reference; so does a query the worker never got
    // an answer to, when the worker goes.
    let mut c = NodeCodec::new(shared.clone());
    decode(&mut c, &tls_query("null", 9000)).unwrap();
    assert_eq!(shared.keys(), 2);
    sent(
        &mut c,
        &Message::QueryServerReply {
            seq: Seq(1),
            reply: ServerReply::Failed(cluster_core::ListenError {
                errno: 98,
                context: String::new(),
            }),
        },
        0,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(shared.keys(), 1);
    decode(&mut c, &tls_query("null", 9001)).unwrap();
    assert_eq!(shared.keys(), 2);
    drop(c);
    drop(a);
    assert_eq!(shared.keys(), 0);
}

/// Workers cannot make the master keep `data` without bound: past the caps on keys and bytes
/// a worker gets its own data back and nothing is stored.
#[test]
fn shared_data_is_bounded() {
    let shared = SharedServerData::default();
    let mut c = NodeCodec::new(shared.clone());
    let big = format!("\"{}\"", "x".repeat(600 * 1024));
    for port in 1..=(MAX_SHARED_KEYS as u16 + 10) {
        let data = if port <= 10 { big.as_str() } else { "null" };
        decode(&mut c, &tls_query(data, port)).unwrap();
    }
    let entries = shared.entries();
    assert!(entries.by_key.len() <= MAX_SHARED_KEYS);
    assert!(entries.bytes <= MAX_SHARED_BYTES);
    let big_kept = entries
        .by_key
        .values()
        .filter(|e| e.data.len() > 1000)
        .count();
    assert!(big_kept < 10, "{big_kept} large entries kept");
    drop(entries);
    // Past the byte cap the worker's own data is echoed, unshared.
    decode(&mut c, &tls_query(&big, 9)).unwrap();
    let mut out = Vec::new();
    sent(
        &mut c,
        &Message::QueryServerReply {
            seq: Seq(1),
            reply: ServerReply::Granted {
                server: ServerId(1),
                addr: BoundAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 9))),
                grant: ServerGrant::RoundRobin,
            },
        },
        0,
        &mut out,
    )
    .unwrap();
    assert!(String::from_utf8(out).unwrap().contains(&big));
    drop(c);
    assert_eq!(shared.keys(), 0);
}

/// A worker that sent us sockets of its server asks, when that server closes, whether we
/// closed them all; it waits for the answer (and its disconnect waits for that close).
#[test]
fn socket_list_questions_are_answered_with_none_held() {
    let mut c = NodeCodec::new(SharedServerData::default());
    let mut replies = Vec::new();
    for line in [
        "{\"cmd\":\"NODE_SOCKET_NOTIFY_CLOSE\",\"key\":\"4:127.0.0.1:8000\"}",
        "{\"cmd\":\"NODE_SOCKET_GET_COUNT\",\"key\":\"4:127.0.0.1:8000\"}",
        "{\"cmd\":\"NODE_SOCKET_GET_COUNT\"}",
    ] {
        assert_eq!(
            c.decode(line.as_bytes(), false, &mut replies).unwrap(),
            Decoded::default()
        );
    }
    assert_eq!(
        String::from_utf8(replies).unwrap(),
        "{\"cmd\":\"NODE_SOCKET_ALL_CLOSED\",\"key\":\"4:127.0.0.1:8000\"}\n{\"cmd\":\"NODE_SOCKET_COUNT\",\"key\":\"4:127.0.0.1:8000\",\"count\":0}\n"
    );
}

use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::Duration;

use cluster_core::Policy;
use cluster_master::{Event, MasterBuilder};

use crate::util::*;

#[test]
fn udp_four_workers_bound_through_the_master_all_receive() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["udp:127.0.0.1:0"])
            .workers(4),
    );
    let addr = inet(&c.wait_listening(4));
    let mut seen = HashSet::new();
    // Each worker polls and then reads, so every datagram wakes all four and the first to read
    // wins: one at a time, the two that run first on this 2-core machine took all 400 in a CI
    // run. Bursts of eight in flight keep the winners busy, so the others get some.
    let deadline = std::time::Instant::now() + WAIT;
    for burst in 0..2_000 {
        if seen.len() == 4 || std::time::Instant::now() > deadline {
            break;
        }
        let clients: Vec<UdpSocket> = (0..8)
            .map(|i| {
                let client = UdpSocket::bind("127.0.0.1:0").expect("client");
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                client
                    .send_to(format!("ping {burst}.{i}").as_bytes(), addr)
                    .expect("send");
                client
            })
            .collect();
        for client in clients {
            let mut buf = [0u8; 256];
            let (n, _) = client.recv_from(&mut buf).expect("reply");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let id = text
                .split_whitespace()
                .nth(1)
                .map(str::to_owned)
                .expect("id");
            seen.insert(id);
        }
    }
    assert_eq!(seen.len(), 4, "every worker received datagrams: {seen:?}");
    c.stop();
}

#[test]
fn shared_policy_tcp_every_worker_accepts() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2)
            .policy(Policy::Shared),
    );
    let addr = inet(&c.wait_listening(2));
    for _ in 0..50 {
        ask_worker(addr).expect("served");
    }
    c.stop();
}

#[test]
fn reuseport_policy_serves() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2)
            .policy(Policy::ReusePort),
    );
    let addr = inet(&c.wait_listening(2));
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(ask_worker(addr).expect("served"));
    }
    assert_eq!(
        seen.len(),
        2,
        "the kernel spreads reuse-port connections: {seen:?}"
    );
    c.stop();
}

#[test]
fn reuseport_socket_of_a_removed_slot_is_closed_so_no_client_waits_on_it() {
    let _fds = shared_fds();
    let mut c = Cluster::start(
        MasterBuilder::new(raw_worker())
            .args(["tcp:127.0.0.1:0"])
            .workers(2)
            .policy(Policy::ReusePort),
    );
    let addr = inet(&c.wait_listening(2));
    c.master().remove_one().expect("scale down");
    c.wait_for(Duration::from_secs(10), |e| matches!(e, Event::Exit { .. }));
    // The kernel hashes each client to one socket of the group: had the master kept the
    // removed slot's socket, about half of these would wait in a queue nobody accepts from.
    let mut seen = HashSet::new();
    for _ in 0..100 {
        seen.insert(ask_worker(addr).expect("served by the remaining worker"));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    c.stop();
}

/// The master's `defer_accept` setting (`spawn --defer-accept`, the only way for workers that
/// cannot ask, such as Node apps) reaches the socket it shares; without it the socket has none.
#[test]
fn the_masters_defer_accept_reaches_the_shared_socket() {
    let _fds = shared_fds();
    for on in [true, false] {
        let mut c = Cluster::start(
            MasterBuilder::new(raw_worker())
                .args(["tcp:127.0.0.1:0", "report-defer"])
                .policy(Policy::Shared)
                .defer_accept(on)
                .capture_output(true)
                .workers(1),
        );
        let Event::Output { line, .. } = c.wait_for(
            Duration::from_secs(10),
            |e| matches!(e, Event::Output { line, .. } if line.starts_with("DEFER_ACCEPT ")),
        ) else {
            unreachable!()
        };
        let secs: u32 = line["DEFER_ACCEPT ".len()..].parse().expect("a number");
        assert_eq!(secs > 0, on, "{line}");
        c.stop();
    }
}

//! Two cluster nodes over a redis-server that this test kills and starts again (empty) on the
//! same port: the nodes stay up, peers on one node carry on, cross-node events sent during
//! the outage arrive afterwards complete and in order, uids and service names are claimed
//! again, and a node that cannot reach Redis at start fails with a clear error.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use socketio_p2p::{Error, P2p, PeerEvent, Service, ServiceError};
use socketio_p2p_signaling::{P2pSignaling, RedisCluster, SignalingOptions, redis};
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

fn numbers(p: &P2p, event: &str) -> mpsc::UnboundedReceiver<(u64, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    p.on(event, move |ev| {
        let _ = tx.send((ev.decode_json::<u64>().unwrap(), Instant::now()));
    });
    rx
}

/// Receives `range` in order (and nothing else), at most `secs` seconds; the arrival times.
async fn expect_in_order(
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    range: std::ops::Range<u64>,
    secs: u64,
) -> Vec<Instant> {
    let mut at = Vec::new();
    for i in range {
        let (n, t) = recv(rx, secs).await;
        assert_eq!(n, i, "lost, duplicated or reordered");
        at.push(t);
    }
    at
}

fn key_exists(url: &str, key: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
        .and_then(|mut c| redis::cmd("EXISTS").arg(key).query::<i64>(&mut c))
        .is_ok_and(|n| n == 1)
}

fn disconnects(pe: &mut socketio_p2p::PeerEventStream) -> Vec<PeerEvent> {
    let mut seen = Vec::new();
    while let Some(Some(ev)) = futures_util::FutureExt::now_or_never(pe.next()) {
        if matches!(ev, PeerEvent::Disconnected { .. }) {
            seen.push(ev);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_and_restart() {
    let mut redis = RedisServer::start_own();
    let cluster = redis.cluster("outage");
    let prefix = format!("test-{}-outage", std::process::id());
    let n1 = spawn_node(cluster.clone()).await;
    let n2 = spawn_node(cluster).await;
    let a = peer(&n1, relay_opts().uid("alice").room("r")).await;
    let c = peer(&n1, relay_opts().room("r")).await;
    let b = peer(&n2, relay_opts().uid("bob").room("r")).await;
    a.provide(
        "calc",
        Service::new().method("add", |(x, y): (i64, i64)| async move {
            Ok::<_, ServiceError>(x + y)
        }),
    )
    .await
    .unwrap();
    for p in [&a, &b, &c] {
        wait_peers(p, 2).await;
    }
    let mut a_events = a.peer_events();
    let mut b_events = b.peer_events();
    let mut c_events = c.peer_events();
    let mut at_b = numbers(&b, "n");
    let mut at_a = numbers(&a, "n");
    let mut at_c = numbers(&c, "n");
    c.on("echo", |ev| {
        let n: u64 = ev.decode_json().unwrap();
        ev.reply(json!(n));
    });
    // Before: cross-node traffic flows.
    a.to(b.id()).emit("n", json!(0)).await.unwrap();
    expect_in_order(&mut at_b, 0..1, 10).await;
    let key = |kind: &str, name: &str| format!("{prefix}:{kind}:{name}");
    assert!(key_exists(&redis.url, &key("uid", "alice")));
    assert!(key_exists(&redis.url, &key("svc", "calc")));

    // Redis dies.
    redis.kill();
    let down = Instant::now();
    // Events to the other node during the outage, both ways (the links queue them).
    const DURING: u64 = 300;
    let (a2, b2) = (a.clone(), b.clone());
    let (aid, bid) = (a.id().to_owned(), b.id().to_owned());
    let senders = tokio::spawn(async move {
        for i in 1..=DURING {
            a2.to(&bid).emit("n", json!(i)).await.unwrap();
            b2.to(&aid).emit("n", json!(i)).await.unwrap();
        }
    });
    // Peers on one node carry on: events and acks between a and c, unaffected.
    let t = Instant::now();
    for i in 0..200u64 {
        a.to(c.id()).emit("n", json!(i)).await.unwrap();
    }
    expect_in_order(&mut at_c, 0..200, 10).await;
    for i in 0..50u64 {
        let r = a.to(c.id()).emit_with_ack("echo", json!(i)).await.unwrap();
        assert_eq!(r, socketio_p2p::Payload::Json(json!(i)));
    }
    eprintln!(
        "same node during the outage: 200 events + 50 acks in {:?}",
        t.elapsed()
    );
    // A new peer cannot claim a uid while Redis is away (nobody can tell it is free), but
    // one without a uid registers.
    let e = P2p::connect(&n1.url(), relay_opts().uid("carol").reconnect(false))
        .await
        .unwrap_err();
    eprintln!("uid claim during the outage: {e}");
    assert!(
        matches!(&e, Error::UidTaken(m) if m.contains("unreachable")),
        "{e:?}"
    );
    let d = peer(&n1, relay_opts().room("r")).await;
    // The outage lasts longer than node_timeout (2 s): the nodes must not take each other
    // for dead.
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let listed = n1
                .signaling
                .peers()
                .iter()
                .any(|p| p.uid.as_deref() == Some("bob"))
                && n2
                    .signaling
                    .peers()
                    .iter()
                    .any(|p| p.uid.as_deref() == Some("alice"));
            if !listed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "a node forgot the other node's peers during the outage"
    );

    // Redis comes back, empty.
    redis.restart();
    let back = Instant::now();
    let outage = back.duration_since(down);
    // How soon the names are in the new Redis again.
    let (url, keys) = (
        redis.url.clone(),
        [key("uid", "alice"), key("uid", "bob"), key("svc", "calc")],
    );
    let reclaimed = tokio::task::spawn_blocking(move || {
        while !keys.iter().all(|k| key_exists(&url, k)) {
            if back.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(back.elapsed())
    });
    let got_b = expect_in_order(&mut at_b, 1..DURING + 1, 20).await;
    let got_a = expect_in_order(&mut at_a, 1..DURING + 1, 20).await;
    tokio::time::timeout(Duration::from_secs(20), senders)
        .await
        .expect("senders stuck")
        .unwrap();
    let first = got_b[0].min(got_a[0]).saturating_duration_since(back);
    let last = got_b[got_b.len() - 1]
        .max(got_a[got_a.len() - 1])
        .saturating_duration_since(back);
    // New cross-node traffic, and the peer that joined node 1 during the outage is known on
    // node 2.
    let t = Instant::now();
    a.to(b.id()).emit("n", json!(DURING + 1)).await.unwrap();
    expect_in_order(&mut at_b, DURING + 1..DURING + 2, 10).await;
    let fresh = t.elapsed();
    let did = d.id().to_owned();
    assert!(
        wait_until(10, || async {
            n2.signaling.peers().iter().any(|p| p.id == did)
        })
        .await,
        "node 2 never heard of the peer that joined during the outage"
    );
    // The names are claimed again in the new Redis.
    let reclaimed = reclaimed
        .await
        .unwrap()
        .expect("names not claimed again after the restart");
    // Refused because they are held, not because Redis cannot be asked.
    let e = P2p::connect(&n2.url(), relay_opts().uid("alice").reconnect(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UidTaken(m) if m.contains("held")),
        "{e:?}"
    );
    let e = P2p::connect(&n1.url(), relay_opts().uid("bob").reconnect(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UidTaken(m) if m.contains("held")),
        "{e:?}"
    );
    let e = b
        .provide("calc", Service::new())
        .await
        .expect_err("the service name is still taken");
    assert!(
        matches!(&e, Error::ServiceTaken(m) if !m.contains("unreachable")),
        "{e:?}"
    );
    // And a free uid is granted at once.
    let e2 = peer(&n2, relay_opts().uid("erin").room("r")).await;
    assert_eq!(e2.uid(), Some("erin"));
    let sum: i64 = b.service("calc").call("add", (2, 3)).await.unwrap();
    assert_eq!(sum, 5);
    // Nobody was told anyone left.
    for pe in [&mut a_events, &mut b_events, &mut c_events] {
        let seen = disconnects(pe);
        assert!(seen.is_empty(), "{seen:?}");
    }
    eprintln!(
        "{}",
        json!({"redis_outage": {
            "outage_ms": outage.as_millis() as u64,
            "first_event_after_restart_ms": first.as_millis() as u64,
            "all_events_after_restart_ms": last.as_millis() as u64,
            "events_queued_each_way": DURING,
            "new_event_after_recovery_ms": fresh.as_millis() as u64,
            "names_claimed_again_within_ms": reclaimed.as_millis() as u64,
        }})
    );
}

#[tokio::test]
async fn node_without_redis_fails_at_start_with_a_clear_error() {
    init_tracing();
    // Nothing listens on this port.
    let port = free_port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let t = Instant::now();
    let r = P2pSignaling::with_redis(SignalingOptions::default(), RedisCluster::new(client)).await;
    let took = t.elapsed();
    let Err(e) = r else {
        panic!("a node started without Redis");
    };
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    eprintln!("start without Redis: {text} (after {took:?})");
    assert!(text.contains("Redis"), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// The names of the cluster's nodes, read from their heartbeats on the cluster channel (a
/// cluster message is a kind byte, then the sender node as a u16-length string).
fn node_names(url: &str, channel: &str, want: usize) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    let mut ps = con.as_pubsub();
    ps.subscribe(channel).unwrap();
    ps.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut names = Vec::new();
    while names.len() < want {
        let msg = ps
            .get_message()
            .expect("no heartbeat on the cluster channel");
        let bytes: Vec<u8> = msg.get_payload().unwrap();
        let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
        let name = String::from_utf8(bytes[3..3 + len].to_vec()).unwrap();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A cluster message as the nodes encode it: kind, sender, target (none), JSON.
fn cluster_message(node: &str, json: &serde_json::Value) -> Vec<u8> {
    let mut v = vec![b'c'];
    v.extend_from_slice(&u16::try_from(node.len()).unwrap().to_be_bytes());
    v.extend_from_slice(node.as_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&serde_json::to_vec(json).unwrap());
    v
}

/// A message between nodes that is lost for good (no outage, nothing to resend) leaves one
/// node's mirror wrong: here a forged `down` makes node 2 forget a peer of node 1 that is
/// still there. The heartbeats' digests disagree, node 2 asks node 1 for all its peers, and
/// its peers see the lost peer again, in its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_drifted_is_repaired_from_the_heartbeats() {
    let redis = RedisServer::start_own();
    let cluster = redis.cluster("drift");
    let channel = format!("test-{}-drift:all", std::process::id());
    let n1 = spawn_node(cluster.clone()).await;
    let n2 = spawn_node(cluster).await;
    let d = peer(&n1, relay_opts().room("r")).await;
    let b = peer(&n2, relay_opts().room("r")).await;
    wait_peers(&b, 1).await;
    wait_peers(&d, 1).await;
    let mut b_events = b.peer_events();
    let (url, ch) = (redis.url.clone(), channel.clone());
    let names = tokio::task::spawn_blocking(move || node_names(&url, &ch, 2))
        .await
        .unwrap();
    // `down` from each node's name: the node that holds `d` ignores it (`d` is its own),
    // the other forgets `d`.
    let forged = json!({"t": "down", "id": d.id()});
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut con = client.get_connection().unwrap();
    for name in &names {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(cluster_message(name, &forged))
            .query(&mut con)
            .unwrap();
    }
    let t = Instant::now();
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match b_events.next().await {
                Some(PeerEvent::Disconnected { peer }) if peer.id == d.id() => return,
                Some(_) => {}
                None => panic!("peer events ended"),
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "the forged down did not reach node 2");
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match b_events.next().await {
                Some(PeerEvent::Joined { room, peer }) if peer.id == d.id() => return room,
                Some(_) => {}
                None => panic!("peer events ended"),
            }
        }
    })
    .await
    .expect("node 2 never repaired its mirror of node 1");
    assert_eq!(back, "r");
    eprintln!("mirror repaired in {:?}", t.elapsed());
    assert!(n2.signaling.room_peers("r").iter().any(|p| p.id == d.id()));
    // And it is a real peer again for node 2's peers: events reach it.
    let mut at_d = numbers(&d, "n");
    b.to(d.id()).emit("n", json!(7)).await.unwrap();
    expect_in_order(&mut at_d, 7..8, 10).await;
    // Node 1 never lost it.
    assert!(n1.signaling.peers().iter().any(|p| p.id == d.id()));
}

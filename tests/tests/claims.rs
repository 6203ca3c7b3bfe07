//! Names claimed in Redis (uids, service names) wait for Redis without holding up the
//! node: while Redis is slow, only the requests that need it wait (and the requests of the
//! same socket behind them, in order); relay traffic and other requests on the node go on.
//! A claim whose socket leaves before Redis answers is released.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use socketio_p2p_signaling::{SignalingOptions, redis};
use socketio_p2p_tests::*;

/// The tests pause the one redis-server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Redis holds every write (scripts and publishes included) for `ms` milliseconds.
fn pause_redis(server: &RedisServer, ms: u64) {
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query::<()>(&mut c)
        .unwrap();
}

fn hello(rid: u64, uid: &str) -> Value {
    json!({"rid": rid, "op": "hello", "version": 2, "uid": uid, "rooms": [], "frames": "base64"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_claim_holds_up_only_the_requests_that_need_it() {
    let _one = SERIAL.lock().await;
    let redis = RedisServer::start();
    let cluster = redis.cluster("slow").io_timeout(Duration::from_secs(5));
    let n = spawn_node_with(cluster, SignalingOptions::default()).await;
    let a = peer(&n, relay_opts()).await;
    let b = peer(&n, relay_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    b.on("ping", |ev| {
        let n: u64 = ev.decode_json().unwrap_or(0);
        ev.reply(json!(n));
    });
    a.to(b.id()).emit_with_ack("ping", json!(0)).await.unwrap();
    let mut c = Raw::connect(&n).await;
    let mut d = Raw::connect(&n).await;

    pause_redis(&redis, 1500);
    let t0 = Instant::now();
    // c claims a uid (Redis must answer) and, right behind it, joins a room.
    c.emit("p2p:req", hello(1, "slowpoke")).await;
    c.emit("p2p:req", json!({"rid": 2, "op": "join", "room": "later"}))
        .await;

    // Meanwhile the relay between a and b on the same node goes on at full speed.
    let mut worst = Duration::ZERO;
    let mut rounds = 0u64;
    while t0.elapsed() < Duration::from_millis(1000) {
        let t = Instant::now();
        let r = a.to(b.id()).emit_with_ack("ping", json!(rounds)).await;
        assert!(r.is_ok(), "{r:?}");
        worst = worst.max(t.elapsed());
        rounds += 1;
    }
    eprintln!("{rounds} round trips while Redis was paused, the slowest {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "relay stalled: {worst:?}"
    );
    // A hello that claims nothing is answered at once.
    let t = Instant::now();
    d.hello(None, &["x"]).await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1400),
        "the test was too slow"
    );

    // c's welcome comes once Redis answers, and its join after it.
    let welcome = c.expect("p2p:res").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(welcome["rid"], 1, "{welcome}");
    assert_eq!(welcome["ok"]["uid"], "slowpoke", "{welcome}");
    let joined = c.expect("p2p:res").await;
    assert_eq!(joined["rid"], 2, "{joined}");
    assert!(joined.get("ok").is_some(), "{joined}");
    let held = n.signaling.peers();
    assert!(
        held.iter().any(|p| p.uid.as_deref() == Some("slowpoke")),
        "{held:?}"
    );

    // A service name is claimed the same way.
    pause_redis(&redis, 800);
    let t0 = Instant::now();
    c.emit(
        "p2p:req",
        json!({"rid": 3, "op": "provide", "service": "clock"}),
    )
    .await;
    let t = Instant::now();
    a.to(b.id()).emit_with_ack("ping", json!(1)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let provided = c.expect("p2p:res").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(provided["rid"], 3, "{provided}");
    assert!(provided.get("ok").is_some(), "{provided}");
    assert_eq!(n.signaling.services(), vec!["clock".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_socket_left_meanwhile_is_released() {
    let _one = SERIAL.lock().await;
    let redis = RedisServer::start();
    let cluster = redis.cluster("gone").io_timeout(Duration::from_secs(5));
    let n = spawn_node_with(cluster, SignalingOptions::default()).await;
    let c = Raw::connect(&n).await;

    pause_redis(&redis, 800);
    c.emit("p2p:req", hello(1, "ghost")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.client.disconnect().await.unwrap();
    assert!(wait_until(5, || async { n.signaling.peers().is_empty() }).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Redis granted the claim after c had left: the node gave it back, so the uid is free.
    let mut e = Raw::connect(&n).await;
    let welcome = e.hello(Some("ghost"), &[]).await;
    assert_eq!(welcome["uid"], "ghost", "{welcome}");
    let peers = n.signaling.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].uid.as_deref(), Some("ghost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_behind_a_waiting_hello_wait_with_it() {
    use socketio_p2p_signaling::protocol::{Frame, batch_from_base64, split_batch};
    let _one = SERIAL.lock().await;
    let redis = RedisServer::start();
    let cluster = redis.cluster("behind").io_timeout(Duration::from_secs(5));
    let n = spawn_node_with(cluster, SignalingOptions::default()).await;
    let mut r = Raw::connect(&n).await;
    let r_id = r.hello(None, &["side"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut c = Raw::connect(&n).await;

    pause_redis(&redis, 800);
    let mut h = hello(1, "early");
    h["rooms"] = json!(["side"]);
    c.emit("p2p:req", h).await;
    // Sent before the welcome, as a client that does not wait for it would.
    c.send_frames(&[chat_frame(&r_id, "", "right behind the hello")])
        .await;

    let welcome = c.expect("p2p:res").await;
    assert_eq!(welcome["ok"]["uid"], "early", "{welcome}");
    let c_id = welcome["ok"]["id"].as_str().unwrap().to_owned();
    let batch = r.expect("p2p:f").await;
    let bytes = batch_from_base64(batch.as_str().unwrap()).unwrap();
    let frames = split_batch(&bytes).unwrap();
    assert_eq!(Frame::decode(&frames[0]).unwrap().from, c_id);
    // c's frame was relayed, not refused.
    while let Some((ev, p)) = c.next_within(Duration::from_millis(300)).await {
        assert_ne!(ev, "p2p:error", "{p:?}");
    }
}

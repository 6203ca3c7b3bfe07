//! A peer inside `resume_grace` (its connection broke, its place is kept): what the server
//! has for it meanwhile waits and goes out when it comes back, after its welcome; what did
//! not fit is announced with a typed `Dropped` error, never lost silently.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use socketio_p2p_signaling::SignalingOptions;
use socketio_p2p_signaling::protocol::{Body, Frame};
use socketio_p2p_tests::*;

async fn hello(raw: &mut Raw, rooms: &[&str], resume: Option<(&str, &str)>) -> Value {
    let resume = resume.map(|(id, token)| json!({"id": id, "token": token}));
    raw.emit(
        "p2p:req",
        json!({"rid": 1, "op": "hello", "version": 2, "rooms": rooms, "frames": "base64", "resume": resume}),
    )
    .await;
    let res = raw.expect("p2p:res").await;
    assert!(res.get("ok").is_some(), "hello failed: {res}");
    res["ok"].clone()
}

/// Connects `y` through a cutter, breaks its connection (as a network would) and waits
/// until the server keeps its place (`x` pings `y` meanwhile: the server notices a dead
/// connection when it writes to it).
async fn away_peer(s: &Server, x: &Raw) -> (String, String) {
    let cutter = Cutter::start(s.addr).await;
    let mut y = Raw::connect_to(&cutter.url()).await;
    let w = hello(&mut y, &["r"], None).await;
    let id = w["id"].as_str().unwrap().to_owned();
    let token = w["token"].as_str().unwrap().to_owned();
    cutter.cut();
    let ping = Frame {
        to: id.clone(),
        from: String::new(),
        body: Body::Ping {
            nonce: 1,
            pong: false,
        },
    }
    .encode()
    .unwrap()
    .to_vec();
    let seen = wait_until(30, || async {
        x.send_frames(std::slice::from_ref(&ping)).await;
        s.signaling.stats().away == 1
    })
    .await;
    assert!(
        seen,
        "the server never saw the peer go: {:?}",
        s.signaling.stats()
    );
    (id, token)
}

async fn signal(x: &Raw, rid: u64, to: &str) {
    x.emit(
        "p2p:req",
        json!({"rid": rid, "op": "signal", "to": to, "signal": {"type": "request"}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_presence_wait_for_a_peer_that_comes_back() {
    let s = spawn_server().await;
    let mut x = Raw::connect(&s).await;
    let xid = hello(&mut x, &["r"], None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (yid, token) = away_peer(&s, &x).await;
    // Meanwhile: x signals y, and z joins the room.
    signal(&x, 2, &yid).await;
    let res = x.expect("p2p:res").await;
    assert!(res.get("error").is_none(), "{res}");
    let mut z = Raw::connect(&s).await;
    let zid = hello(&mut z, &["r"], None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // y comes back: the welcome first, then what waited, in order.
    let mut y = Raw::connect(&s).await;
    let w = hello(&mut y, &["r"], Some((&yid, &token))).await;
    assert_eq!(w["id"], json!(yid));
    assert_eq!(w["continued"], json!(true));
    let sig = y.expect("p2p:sig").await;
    assert_eq!(sig["from"], json!(xid));
    assert_eq!(sig["signal"]["type"], json!("request"));
    let p = y.expect("p2p:presence").await;
    assert!(p.to_string().contains(&zid), "{p}");
    assert_eq!(s.signaling.stats().away, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_fit_is_announced_as_dropped() {
    let s = spawn_server_with(SignalingOptions::default().away_queue(2)).await;
    let mut x = Raw::connect(&s).await;
    hello(&mut x, &["r"], None).await;
    let (yid, token) = away_peer(&s, &x).await;
    for rid in 2..7 {
        signal(&x, rid, &yid).await;
        x.expect("p2p:res").await;
    }
    let mut y = Raw::connect(&s).await;
    hello(&mut y, &["r"], Some((&yid, &token))).await;
    y.expect("p2p:sig").await;
    y.expect("p2p:sig").await;
    let e = y.expect("p2p:error").await;
    assert_eq!(e["code"], json!("Dropped"), "{e}");
    assert!(e["message"].as_str().unwrap().starts_with("3 "), "{e}");
}

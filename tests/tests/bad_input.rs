//! Every malformed message gets a typed error back to its sender, and the server and the other
//! peers keep working. Each case uses a raw Socket.IO client that speaks the protocol by hand.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use socketio_p2p::P2p;
use socketio_p2p_signaling::SignalingOptions;
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

/// Two well-behaved peers; checks they still talk after the garbage.
async fn healthy_pair(s: &Server) -> (P2p, P2p) {
    let a = peer(s, relay_opts().room("ok")).await;
    let b = peer(s, relay_opts().room("ok")).await;
    wait_peers(&a, 1).await;
    (a, b)
}

async fn still_works(a: &P2p, b: &P2p) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.once("alive", move |ev| {
        let _ = tx.send(ev.decode_json::<String>().unwrap());
    });
    a.emit("alive", "yes").await.unwrap();
    assert_eq!(recv(&mut rx, 10).await, "yes");
}

fn code(v: &Value) -> &str {
    v.get("error")
        .and_then(|e| e.get("code"))
        .or_else(|| v.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shapes_and_types_get_bad_request() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let mut raw = Raw::connect(&s).await;
    for garbage in [
        json!("just a string"),
        json!({"rid": 5, "op": "no_such_op"}),
        json!({"rid": 6, "op": "hello", "version": "one"}),
        json!([1, 2, 3]),
    ] {
        raw.emit("p2p:req", garbage.clone()).await;
        let res = raw.expect("p2p:res").await;
        assert_eq!(code(&res), "BadRequest", "{garbage} -> {res}");
    }
    // The rid is echoed when it could be read.
    raw.emit("p2p:req", json!({"rid": 77, "op": "join"})).await;
    let res = raw.expect("p2p:res").await;
    assert_eq!((res["rid"].as_u64(), code(&res)), (Some(77), "BadRequest"));
    // A frame that is not binary.
    raw.emit("p2p:f", json!({"not": "binary"})).await;
    assert_eq!(code(&raw.expect("p2p:error").await), "BadRequest");
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_and_duplicate_hello() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let mut raw = Raw::connect(&s).await;
    raw.emit("p2p:req", json!({"rid": 1, "op": "join", "room": "ok"}))
        .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "NotRegistered");
    raw.send_frames(&[chat_frame(a.id(), "", "hi")]).await;
    assert_eq!(code(&raw.expect("p2p:error").await), "NotRegistered");
    raw.hello(None, &["ok"]).await;
    raw.emit("p2p:req", json!({"rid": 2, "op": "hello", "version": 2}))
        .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "AlreadyRegistered");
    raw.emit("p2p:req", json!({"rid": 3, "op": "hello", "version": 99}))
        .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "AlreadyRegistered");
    let mut raw2 = Raw::connect(&s).await;
    raw2.emit("p2p:req", json!({"rid": 1, "op": "hello", "version": 99}))
        .await;
    assert_eq!(code(&raw2.expect("p2p:res").await), "Unsupported");
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_uid_is_refused() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let mut r1 = Raw::connect(&s).await;
    r1.hello(Some("same"), &[]).await;
    let mut r2 = Raw::connect(&s).await;
    r2.emit(
        "p2p:req",
        json!({"rid": 1, "op": "hello", "version": 2, "uid": "same"}),
    )
    .await;
    assert_eq!(code(&r2.expect("p2p:res").await), "UidTaken");
    // r2 can retry with another uid.
    r2.emit(
        "p2p:req",
        json!({"rid": 2, "op": "hello", "version": 2, "uid": "other"}),
    )
    .await;
    assert!(r2.expect("p2p:res").await.get("ok").is_some());
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_targets_and_rooms() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let outsider = peer(&s, relay_opts().room("elsewhere")).await;
    let mut raw = Raw::connect(&s).await;
    raw.hello(None, &["r"]).await;
    // A peer that does not exist, and one that exists but shares no room.
    for target in ["no-such-peer", outsider.id()] {
        raw.send_frames(&[chat_frame(target, "", "hi")]).await;
        let e = raw.expect("p2p:error").await;
        assert_eq!(code(&e), "UnknownPeer", "{e}");
        assert_eq!(e["to"].as_str(), Some(target));
        assert_eq!(e["seq"].as_u64(), Some(1));
    }
    raw.emit(
        "p2p:req",
        json!({"rid": 9, "op": "leave", "room": "never-joined"}),
    )
    .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "UnknownRoom");
    raw.emit(
        "p2p:req",
        json!({"rid": 10, "op": "peers", "room": "never-joined"}),
    )
    .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "UnknownRoom");
    raw.emit("p2p:req", json!({"rid": 11, "op": "join", "room": ""}))
        .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "BadRequest");
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_and_oversized_frames() {
    let s = spawn_server_with(SignalingOptions::default().max_frame(64 * 1024)).await;
    let (a, b) = healthy_pair(&s).await;
    let mut raw = Raw::connect(&s).await;
    raw.hello(None, &["ok"]).await;
    // Garbage as a whole batch (binary or base64 text): the batch is refused.
    for garbage in [
        vec![],
        vec![0xff; 10],
        vec![1, 9, 0, 0, 0, 0],
        vec![1, 1, 0, 200, b'x'],
        vec![0x1e, 1, 2],
    ] {
        raw.emit_bin("p2p:f", garbage.clone()).await;
        let e = raw.expect("p2p:error").await;
        assert_eq!(code(&e), "BadRequest", "{garbage:?} -> {e}");
    }
    raw.emit("p2p:f", json!("not base64 at all!")).await;
    assert_eq!(code(&raw.expect("p2p:error").await), "BadRequest");
    // Garbage frames inside a well-formed batch: each refused frame gets its error, and a
    // good frame of the same batch still goes through.
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.on("chat", move |ev| {
        let _ = tx.send(ev.decode_json::<String>().unwrap_or_default());
    });
    let garbage = [
        vec![0xff; 10],
        vec![1, 9, 0, 0, 0, 0],
        vec![1, 1, 0, 200, b'x'],
        vec![0x1e, 1, 2],
    ];
    let mut batch: Vec<Vec<u8>> = garbage.to_vec();
    batch.push(chat_frame(b.id(), "", "still here"));
    raw.send_frames(&batch).await;
    for g in &garbage {
        let e = raw.expect("p2p:error").await;
        assert_eq!(code(&e), "BadRequest", "{g:?} -> {e}");
    }
    assert_eq!(recv(&mut rx, 10).await, "still here");
    let big = chat_frame(a.id(), "", &"x".repeat(100 * 1024));
    raw.send_frames(&[big]).await;
    let e = raw.expect("p2p:error").await;
    assert_eq!(code(&e), "PayloadTooLarge", "{e}");
    assert_eq!(e["to"].as_str(), Some(a.id()));
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sender_is_overwritten_by_the_server() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.on("chat", move |ev| {
        let _ = tx.send((ev.from().to_owned(), ev.decode_json::<String>().unwrap()));
    });
    let mut raw = Raw::connect(&s).await;
    let welcome = raw.hello(None, &["ok"]).await;
    let raw_id = welcome["id"].as_str().unwrap().to_owned();
    raw.send_frames(&[chat_frame(b.id(), a.id(), "i am a")])
        .await;
    let (from, text) = recv(&mut rx, 10).await;
    assert_eq!(text, "i am a");
    assert_eq!(from, raw_id, "the server must stamp the real sender");
    assert_ne!(from, a.id());
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signals_are_refused() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let mut raw = Raw::connect(&s).await;
    raw.hello(None, &["ok"]).await;
    let cases = [
        (json!({"type": "offer", "sdp": "garbage"}), "BadSignal"),
        (json!({"type": "answer", "sdp": "v=0\r\n"}), "BadSignal"),
        (
            json!({"type": "candidate", "candidate": "rm -rf /"}),
            "BadSignal",
        ),
        (
            json!({"type": "offer", "sdp": format!("v=0\r\n{}", "a".repeat(70_000))}),
            "BadSignal",
        ),
        (json!({"type": "dance"}), "BadRequest"),
    ];
    for (i, (signal, want)) in cases.into_iter().enumerate() {
        raw.emit(
            "p2p:req",
            json!({"rid": 100 + i, "op": "signal", "to": a.id(), "signal": signal}),
        )
        .await;
        let res = raw.expect("p2p:res").await;
        assert_eq!(code(&res), want, "{res}");
    }
    // To a peer outside our rooms.
    let outsider = peer(&s, relay_opts().room("elsewhere")).await;
    raw.emit(
        "p2p:req",
        json!({"rid": 200, "op": "signal", "to": outsider.id(), "signal": {"type": "request"}}),
    )
    .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "UnknownPeer");
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_events_and_request_floods() {
    let s = spawn_server_with(SignalingOptions::default().request_rate(50, 100)).await;
    let (a, b) = healthy_pair(&s).await;
    let mut raw = Raw::connect(&s).await;
    raw.emit("chat", json!("apps cannot use the server directly"))
        .await;
    let e = raw.expect("p2p:error").await;
    assert_eq!(code(&e), "UnknownEvent");
    assert_eq!(e["event"].as_str(), Some("chat"));
    raw.hello(None, &["ok"]).await;
    for i in 0..400 {
        raw.emit(
            "p2p:req",
            json!({"rid": 1000 + i, "op": "peers", "room": "ok"}),
        )
        .await;
    }
    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..400 {
        let res = raw.expect("p2p:res").await;
        match code(&res) {
            "RateLimited" => limited += 1,
            "" => ok += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(limited > 0, "a flood must be limited");
    assert!(
        ok >= 90,
        "the burst allowance (100, hello included) must be served ({ok})"
    );
    // The flooder recovers once it slows down.
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.emit("p2p:req", json!({"rid": 5000, "op": "peers", "room": "ok"}))
        .await;
    assert_eq!(code(&raw.expect("p2p:res").await), "");
    still_works(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_when_a_sender_misbehaves() {
    let s = spawn_server().await;
    let (a, b) = healthy_pair(&s).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    b.on("n", move |ev| {
        let _ = tx.send(ev.decode_json::<u64>().unwrap());
    });
    let mut raw = Raw::connect(&s).await;
    raw.hello(None, &["ok"]).await;
    for i in 0..200u64 {
        a.emit("n", json!(i)).await.unwrap();
        if i % 10 == 0 {
            raw.emit_bin("p2p:f", vec![0xde, 0xad]).await;
            raw.emit("p2p:req", json!({"rid": i, "op": "signal", "to": b.id(), "signal": {"type": "offer", "sdp": "x"}})).await;
        }
    }
    for i in 0..200u64 {
        assert_eq!(recv(&mut rx, 10).await, i);
    }
}

/// An error for a refused frame goes out behind the presences the server holds for the
/// sender (PROTOCOL.md section 3.3: nothing overtakes presence), even while they wait to be
/// batched: a joiner's `joined` reaches the sender before the error of a frame it sent after
/// the join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_frame_does_not_overtake_presence() {
    let s = spawn_server().await;
    let mut a = Raw::connect(&s).await;
    a.emit(
        "p2p:req",
        json!({"rid": 1, "op": "hello", "version": 2, "rooms": ["storm"], "frames": "base64", "batch_presence": true}),
    )
    .await;
    let me = a.expect("p2p:res").await["ok"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..5 {
        let mut b = Raw::connect(&s).await;
        let joiner = b.hello(None, &["storm"]).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // At once, while `joined` may still wait in the sender's presence batch.
        a.send_frames(&[chat_frame("nobody-here", "", &format!("x{i}"))])
            .await;
        let mut seen_join = false;
        loop {
            let (ev, p) = tokio::time::timeout(Duration::from_secs(10), a.rx.recv())
                .await
                .expect("timed out")
                .expect("closed");
            let v = match p {
                rust_socketio::Payload::Text(mut v) if !v.is_empty() => v.swap_remove(0),
                _ => Value::Null,
            };
            match ev.as_str() {
                "p2p:presence" => {
                    let list = match v {
                        Value::Array(list) => list,
                        one => vec![one],
                    };
                    seen_join |= list
                        .iter()
                        .any(|p| p["type"] == "joined" && p["peer"]["id"] == joiner.as_str());
                }
                "p2p:error" => {
                    assert_eq!(code(&v), "UnknownPeer", "{v}");
                    assert!(
                        seen_join,
                        "the error of round {i} overtook {joiner}'s join ({me})"
                    );
                    break;
                }
                _ => {}
            }
        }
    }
}

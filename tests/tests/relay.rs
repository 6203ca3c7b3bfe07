//! The relay transport: events, targeting, acks, binary, pairing, rooms, burst.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use socketio_p2p::{Error, P2p, Payload, PeerEvent, Transport};
use socketio_p2p_signaling::SignalingOptions;
use socketio_p2p_tests::*;
use tokio::sync::mpsc;

type Rx<T> = mpsc::UnboundedReceiver<T>;

fn collect(p: &P2p, event: &str) -> Rx<socketio_p2p::Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    p.on(event, move |ev| {
        let _ = tx.send(ev);
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_chat_json_and_binary() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    wait_peers(&a, 1).await;
    wait_peers(&b, 1).await;
    let mut got = collect(&b, "chat");
    let mut bin = collect(&b, "blob");
    a.emit("chat", json!({"text": "hi", "n": 1})).await.unwrap();
    a.emit("blob", Bytes::from_static(b"\x00\x01\x02"))
        .await
        .unwrap();
    let ev = recv(&mut got, 10).await;
    assert_eq!(ev.from(), a.id());
    assert_eq!(ev.transport(), Transport::Relay);
    assert_eq!(
        ev.decode_json::<serde_json::Value>().unwrap(),
        json!({"text": "hi", "n": 1})
    );
    let ev = recv(&mut bin, 10).await;
    assert_eq!(ev.bytes().unwrap().as_ref(), b"\x00\x01\x02");
    assert_eq!(a.transport(b.id()).await.unwrap(), Transport::Relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_send_reaches_only_its_target() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    let c = peer(&s, relay_opts()).await;
    wait_peers(&a, 2).await;
    let mut at_b = collect(&b, "x");
    let mut at_c = collect(&c, "x");
    a.to(c.id()).emit("x", "for c").await.unwrap();
    a.emit("x", "for all").await.unwrap();
    assert_eq!(
        recv(&mut at_c, 10).await.decode_json::<String>().unwrap(),
        "for c"
    );
    assert_eq!(
        recv(&mut at_c, 10).await.decode_json::<String>().unwrap(),
        "for all"
    );
    assert_eq!(
        recv(&mut at_b, 10).await.decode_json::<String>().unwrap(),
        "for all"
    );
    assert!(at_b.try_recv().is_err(), "b got c's message");
    let err = a.to("nobody").emit("x", 1.to_string()).await.unwrap_err();
    assert!(matches!(err, Error::PeerOffline(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reply_timeout_no_handler_and_peer_offline() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().ack_timeout(Duration::from_millis(500))).await;
    let b = peer(&s, relay_opts()).await;
    wait_peers(&a, 1).await;
    b.on("double", |ev| {
        let n: i64 = ev.decode_json().unwrap_or(0);
        ev.reply(json!(n * 2));
    });
    let r = a
        .to(b.id())
        .emit_with_ack("double", json!(21))
        .await
        .unwrap();
    assert_eq!(r, Payload::Json(json!(42)));
    // Binary reply.
    b.on("bin", |ev| {
        let mut v = ev.bytes().unwrap().to_vec();
        v.reverse();
        ev.reply(Bytes::from(v));
    });
    let r = a
        .to(b.id())
        .emit_with_ack("bin", Bytes::from_static(b"abc"))
        .await
        .unwrap();
    assert_eq!(r.as_bytes().unwrap().as_ref(), b"cba");
    // No handler: a typed remote error at once.
    let e = a
        .to(b.id())
        .emit_with_ack("nobody-listens", ())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Remote { code, .. } if code == "NoHandler"),
        "{e:?}"
    );
    // A handler that keeps the event and never replies: timeout.
    let (keep_tx, mut keep_rx) = mpsc::unbounded_channel();
    b.on("slow", move |ev| {
        let _ = keep_tx.send(ev);
    });
    let e = a.to(b.id()).emit_with_ack("slow", ()).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    let _held = recv(&mut keep_rx, 5).await;
    // A handler that drops the event without replying: NoReply at once.
    b.on("drop", |_ev| {});
    let e = a.to(b.id()).emit_with_ack("drop", ()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Remote { code, .. } if code == "NoReply"),
        "{e:?}"
    );
    // Pending ack to a peer that disconnects fails with PeerOffline well before its timeout.
    let a2 = peer(&s, relay_opts().ack_timeout(Duration::from_secs(30))).await;
    wait_peers(&a2, 2).await;
    let bid = b.id().to_owned();
    let pending = tokio::spawn({
        let a2 = a2.clone();
        async move {
            let t = std::time::Instant::now();
            (a2.to(&bid).emit_with_ack("slow", ()).await, t.elapsed())
        }
    });
    let _held2 = recv(&mut keep_rx, 5).await;
    b.close().await;
    let (r, took) = pending.await.unwrap();
    assert!(matches!(r, Err(Error::PeerOffline(_))), "{r:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_binary_is_split_and_reassembled() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    wait_peers(&a, 1).await;
    let mut got = collect(&b, "big");
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 123)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    a.emit("big", Bytes::from(data.clone())).await.unwrap();
    let ev = recv(&mut got, 30).await;
    assert_eq!(ev.bytes().unwrap().len(), data.len());
    assert!(ev.bytes().unwrap().as_ref() == data.as_slice());
    // Larger than the sender's limit: typed error, nothing sent.
    let small = peer(&s, relay_opts().max_message_size(1000)).await;
    let e = small
        .emit("big", Bytes::from(vec![0u8; 2000]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::PayloadTooLarge {
                size: 2000,
                max: 1000
            }
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_on_any_once_off_and_streams() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    let c = peer(&s, relay_opts()).await;
    wait_peers(&c, 2).await;
    wait_peers(&a, 2).await;
    wait_peers(&b, 2).await;
    let (tx, mut from_a) = mpsc::unbounded_channel();
    c.from(a.id()).on("m", move |ev| {
        let _ = tx.send(ev.decode_json::<String>().unwrap());
    });
    let any = Arc::new(AtomicUsize::new(0));
    let any2 = any.clone();
    c.on_any(move |_| {
        any2.fetch_add(1, Ordering::SeqCst);
    });
    let once = Arc::new(AtomicUsize::new(0));
    let once2 = once.clone();
    c.once("m", move |_| {
        once2.fetch_add(1, Ordering::SeqCst);
    });
    let mut stream = c.events_named("m");
    b.emit("m", "from b").await.unwrap();
    a.emit("m", "from a").await.unwrap();
    a.emit("other", "x").await.unwrap();
    assert_eq!(recv(&mut from_a, 10).await, "from a");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(ev.decode_json::<String>().unwrap());
    }
    seen.sort();
    assert_eq!(seen, vec!["from a", "from b"]);
    assert!(wait_until(10, || async { any.load(Ordering::SeqCst) == 3 }).await);
    assert_eq!(once.load(Ordering::SeqCst), 1);
    c.from(a.id()).off("m");
    c.off("m");
    drop(stream);
    a.emit("m", "again").await.unwrap();
    assert!(wait_until(10, || async { any.load(Ordering::SeqCst) == 4 }).await);
    assert!(from_a.try_recv().is_err());
    assert_eq!(once.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_is_unique_and_freed_on_disconnect() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().uid("alice")).await;
    assert_eq!(a.uid(), Some("alice"));
    let e = P2p::connect(&s.url(), relay_opts().uid("alice"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UidTaken(_)), "{e:?}");
    a.close().await;
    assert!(
        wait_until(10, || async { s.signaling.peers().is_empty() }).await,
        "server still lists the peer"
    );
    let again = peer(&s, relay_opts().uid("alice")).await;
    assert_eq!(again.uid(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_by_uid_like_socket_io_bridge() {
    let s = spawn_server().await;
    // The side with peer_uid starts first and waits for the other.
    let url = s.url();
    let a = tokio::spawn(
        async move { P2p::connect(&url, relay_opts().uid("c1").peer_uid("c2")).await },
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // let c1 wait for real (not a sync wait)
    let b = peer(&s, relay_opts().uid("c2")).await;
    let a = a.await.unwrap().unwrap();
    let peers = a.peers().await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].uid.as_deref(), Some("c2"));
    let mut got = collect(&b, "event1");
    a.emit("event1", "hello").await.unwrap();
    let ev = recv(&mut got, 10).await;
    assert_eq!(ev.from_uid(), Some("c1"));
    b.on("event2", |ev| {
        ev.reply("confirmed");
    });
    let r = a
        .to(&peers[0].id)
        .emit_with_ack("event2", "hello")
        .await
        .unwrap();
    assert_eq!(r, Payload::from("confirmed"));
    // A pair is private: a third peer in the default room cannot reach them.
    let c = peer(&s, relay_opts()).await;
    assert!(c.peers().await.unwrap().is_empty());
    // One side disconnects: the other gets an event and closes.
    let mut pe = a.peer_events();
    b.close().await;
    let mut saw_disconnect = false;
    let mut saw_closed = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), pe.next()).await {
        match ev {
            PeerEvent::Disconnected { .. } => saw_disconnect = true,
            PeerEvent::Closed { .. } => {
                saw_closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(saw_disconnect && saw_closed);
    assert!(matches!(a.emit("x", "y").await, Err(Error::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_with_an_absent_peer_fails_with_peer_offline() {
    let s = spawn_server().await;
    let t = std::time::Instant::now();
    let e = P2p::connect(
        &s.url(),
        relay_opts()
            .uid("lonely")
            .peer_uid("ghost")
            .pair_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::PeerOffline(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The uid is free again.
    assert!(wait_until(10, || async { s.signaling.peers().is_empty() }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_scope_events_and_presence() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().room("r1")).await;
    let mut pe = a.peer_events();
    let b = peer(&s, relay_opts().room("r1")).await;
    let c = peer(&s, relay_opts().room("r2")).await;
    // a sees b join r1.
    match tokio::time::timeout(Duration::from_secs(10), pe.next())
        .await
        .unwrap()
        .unwrap()
    {
        PeerEvent::Joined { room, peer } => {
            assert_eq!(room, "r1");
            assert_eq!(peer.id, b.id());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.room_peers("r1").await.unwrap().len(), 1);
    assert!(matches!(
        a.room_peers("r2").await,
        Err(Error::Rejected { .. })
    ));
    let mut at_c = collect(&c, "m");
    a.emit("m", "r1 only").await.unwrap();
    // c joins r1 and then gets a's messages.
    let others = c.join("r1").await.unwrap();
    assert_eq!(others.len(), 2);
    loop {
        if let PeerEvent::Joined { peer, .. } =
            tokio::time::timeout(Duration::from_secs(10), pe.next())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!(peer.id, c.id());
            break;
        }
    }
    a.emit("m", "now c too").await.unwrap();
    assert_eq!(
        recv(&mut at_c, 10).await.decode_json::<String>().unwrap(),
        "now c too"
    );
    // b leaves: a is told; b no longer reachable.
    b.leave("r1").await.unwrap();
    loop {
        if let PeerEvent::Left { peer, room } =
            tokio::time::timeout(Duration::from_secs(10), pe.next())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!((peer.id.as_str(), room.as_str()), (b.id(), "r1"));
            break;
        }
    }
    assert!(matches!(
        a.to(b.id()).emit("m", "x").await,
        Err(Error::PeerOffline(_))
    ));
    let e = b.leave("r1").await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                code: socketio_p2p::ErrorCode::UnknownRoom,
                ..
            }
        ),
        "{e:?}"
    );
    // c disconnects deliberately: a is told at once (no resume grace period).
    let t = std::time::Instant::now();
    c.close().await;
    loop {
        if let PeerEvent::Disconnected { peer } =
            tokio::time::timeout(Duration::from_secs(10), pe.next())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!(peer.id, c.id());
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_100k_arrives_complete_and_in_order() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    wait_peers(&a, 1).await;
    const N: u64 = 100_000;
    let next = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let (n2, b2) = (next.clone(), bad.clone());
    b.on("n", move |ev| {
        let v: u64 = ev.decode_json().unwrap_or(u64::MAX);
        if v != n2.load(Ordering::SeqCst) as u64 {
            b2.fetch_add(1, Ordering::SeqCst);
        }
        n2.fetch_add(1, Ordering::SeqCst);
    });
    for i in 0..N {
        a.to(b.id()).emit("n", json!(i)).await.unwrap();
    }
    assert!(
        wait_until(120, || async { next.load(Ordering::SeqCst) as u64 >= N }).await,
        "only {} of {N} arrived",
        next.load(Ordering::SeqCst)
    );
    assert_eq!(bad.load(Ordering::SeqCst), 0, "events out of order");
    // And nothing more (no duplicates) shortly after: one more marker event must come next.
    a.to(b.id()).emit("n", json!(N)).await.unwrap();
    assert!(wait_until(10, || async { next.load(Ordering::SeqCst) as u64 == N + 1 }).await);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_slows_the_sender_without_loss() {
    let s = spawn_server().await;
    let a = peer(&s, relay_opts().window(32)).await;
    let b = peer(&s, relay_opts().events_capacity(8)).await;
    wait_peers(&a, 1).await;
    let mut stream = b.events_named("n");
    const N: u64 = 2_000;
    let sender = tokio::spawn({
        let a = a.clone();
        let bid = b.id().to_owned();
        async move {
            for i in 0..N {
                a.to(&bid).emit("n", json!(i)).await.unwrap();
            }
        }
    });
    for i in 0..N {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.decode_json::<u64>().unwrap(), i);
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // a slow reader, on purpose
        }
    }
    sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_hook_rejects_with_a_reason() {
    let s = spawn_server_with(SignalingOptions::default().auth(|auth| {
        if auth.get("token").and_then(|t| t.as_str()) == Some("secret") {
            Ok(())
        } else {
            Err("bad token".into())
        }
    }))
    .await;
    let e = P2p::connect(&s.url(), relay_opts().auth(json!({"token": "nope"})))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Rejected { message, .. } if message.contains("bad token")),
        "{e:?}"
    );
    let ok = peer(&s, relay_opts().auth(json!({"token": "secret"}))).await;
    assert!(!ok.id().is_empty());
}

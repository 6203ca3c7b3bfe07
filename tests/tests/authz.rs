//! Authorization: the server's hook decides, per peer and per action (join, pair, provide,
//! subscribe, publish), from what the connection's auth payload was; a refusal reaches the
//! peer as a typed `Forbidden` error, and everything else keeps working.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use socketio_p2p::{Error, P2p, Service, ServiceError};
use socketio_p2p_signaling::{Action, SignalingOptions};
use socketio_p2p_tests::*;

/// Peers may only use names that start with their user name (from the connect payload).
fn per_user(asked: Arc<Mutex<Vec<Action>>>) -> SignalingOptions {
    SignalingOptions::default()
        .auth_async(|auth| async move {
            // An asynchronous connect hook: as a session store would.
            tokio::time::sleep(Duration::from_millis(5)).await;
            match auth.get("user").and_then(|u| u.as_str()) {
                Some(_) => Ok(()),
                None => Err("who are you?".to_owned()),
            }
        })
        .authorize(move |a| {
            let asked = asked.clone();
            async move {
                asked.lock().unwrap().push(a.action.clone());
                tokio::time::sleep(Duration::from_millis(5)).await;
                let user = a.auth["user"].as_str().unwrap_or("").to_owned();
                let name = match &a.action {
                    Action::Join { room } => room,
                    Action::Pair { peer_uid } => peer_uid,
                    Action::Provide { service } => service,
                    Action::Subscribe { topic } | Action::Publish { topic } => topic,
                    _ => return Err("unknown action".to_owned()),
                };
                if name.starts_with(&user) || name.starts_with("public") {
                    Ok(())
                } else {
                    Err(format!("{user} may not use {name}"))
                }
            }
        })
}

fn as_user(user: &str) -> socketio_p2p::P2pOptions {
    relay_opts()
        .auth(json!({ "user": user }))
        .room(format!("{user}-home"))
}

fn forbidden(r: Result<impl std::fmt::Debug, Error>, what: &str) {
    match r {
        Err(Error::Forbidden(reason)) => assert!(reason.contains("may not"), "{what}: {reason}"),
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_is_allowed_or_refused_by_the_hook() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let s = spawn_server_with(per_user(asked.clone())).await;
    let alice = peer(&s, as_user("alice")).await;
    let bob = peer(&s, as_user("bob")).await;

    // join
    alice.join("public-lobby").await.unwrap();
    bob.join("public-lobby").await.unwrap();
    forbidden(alice.join("bob-room").await, "join");
    // provide
    let svc = || Service::new().method("id", |x: i64| async move { Ok::<_, ServiceError>(x) });
    alice.provide("alice-calc", svc()).await.unwrap();
    forbidden(alice.provide("bob-calc", svc()).await, "provide");
    // subscribe and publish
    let mut sub = bob.subscribe("public-news").await.unwrap();
    forbidden(bob.subscribe("alice-diary").await, "subscribe");
    alice.publish("public-news", json!(1)).await.unwrap();
    forbidden(bob.publish("alice-diary", json!(2)).await, "publish");
    let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.data, json!(1));
    // Refusals broke nothing: the lobby still carries events, the allowed service answers.
    wait_until(10, || async { alice.peers().await.unwrap().len() == 1 }).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bob.on("hi", move |ev| {
        let _ = tx.send(ev.decode_json::<String>().unwrap());
    });
    alice.to(bob.id()).emit("hi", "still here").await.unwrap();
    assert_eq!(recv(&mut rx, 10).await, "still here");
    let v: i64 = bob.service("alice-calc").call("id", 7).await.unwrap();
    assert_eq!(v, 7);
    // The hook saw each action once, with the names asked for.
    let asked = asked.lock().unwrap().clone();
    for a in [
        Action::Join {
            room: "bob-room".into(),
        },
        Action::Provide {
            service: "bob-calc".into(),
        },
        Action::Subscribe {
            topic: "alice-diary".into(),
        },
        Action::Publish {
            topic: "alice-diary".into(),
        },
    ] {
        assert!(asked.contains(&a), "{a:?} not in {asked:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_in_hello_and_pairing_go_through_the_hook() {
    let s = spawn_server_with(per_user(Default::default())).await;
    // The rooms of a hello are joins: a room of someone else makes `connect` fail.
    let r = P2p::connect(
        &s.url(),
        relay_opts().auth(json!({"user": "eve"})).room("bob-home"),
    )
    .await;
    forbidden(r, "hello rooms");
    // Pairing with a uid of someone else is refused; with one's own, allowed.
    let r = P2p::connect(
        &s.url(),
        relay_opts()
            .auth(json!({"user": "eve"}))
            .uid("eve-1")
            .peer_uid("bob-1")
            .pair_timeout(Duration::from_secs(2)),
    )
    .await;
    forbidden(r, "pair");
    let url = s.url();
    let a = P2p::connect(&url, relay_opts().auth(json!({"user": "eve"})).uid("eve-2"));
    let b = P2p::connect(
        &url,
        relay_opts()
            .auth(json!({"user": "eve"}))
            .uid("eve-3")
            .peer_uid("eve-2"),
    );
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(b.peers().await.unwrap()[0].id, a.id());
    // The asynchronous connect hook refuses a connection without a user.
    let r = P2p::connect(&s.url(), relay_opts()).await;
    assert!(matches!(r, Err(Error::Rejected { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hook_delays_only_the_peer_that_asks() {
    let opts = SignalingOptions::default().authorize(|a| async move {
        if matches!(&a.action, Action::Join { room } if room == "slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(())
    });
    let s = spawn_server_with(opts).await;
    let a = peer(&s, relay_opts()).await;
    let b = peer(&s, relay_opts()).await;
    let c = peer(&s, relay_opts()).await;
    wait_peers(&b, 2).await;
    c.on("ping", |ev| {
        ev.reply("pong");
    });
    let started = tokio::time::Instant::now();
    let joining = {
        let a = a.clone();
        tokio::spawn(async move { a.join("slow").await })
    };
    // While a's join waits for the hook (a's later requests and frames wait behind it, in
    // order), the other peers carry on: b and c talk, b joins a room.
    let r = b.to(c.id()).emit_with_ack("ping", ()).await.unwrap();
    assert_eq!(r.decode_json::<String>().unwrap(), "pong");
    b.join("fast").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    joining.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
}

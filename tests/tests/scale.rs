//! Big rooms and storms of joins: a peer gets a complete, correct view, and misses nothing.
//! The crowd is made of light raw Socket.IO clients (a websocket each, speaking Engine.IO v4 /
//! Socket.IO v5 and `hello` with presence batches); the observer is a real `P2p`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use socketio_p2p::PeerEvent;
use socketio_p2p_tests::*;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// A registered light client: its peer id, and the task that keeps its connection (answers
/// pings, drains what the server sends) until aborted.
struct Light {
    id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Light {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn light(addr: SocketAddr, room: &str) -> Light {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let hello =
        json!({"rid": 1, "op": "hello", "version": 2, "rooms": [room], "batch_presence": true});
    let id = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no welcome in time")
            .expect("closed")
            .expect("websocket error");
        let Message::Text(t) = msg else { continue };
        let t = t.as_str();
        if t == "2" {
            ws.send(Message::text("3")).await.expect("pong");
        } else if t.starts_with('0') {
            ws.send(Message::text("40")).await.expect("connect");
        } else if t.starts_with("40") {
            let req = format!("42{}", json!(["p2p:req", hello]));
            ws.send(Message::text(req)).await.expect("hello");
        } else if let Some(body) = t.strip_prefix("42") {
            let v: Value = serde_json::from_str(body).expect("event");
            if v[0] == "p2p:res" && v[1]["rid"] == 1 {
                break v[1]["ok"]["id"].as_str().expect("welcome id").to_owned();
            }
        }
    };
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if matches!(&msg, Message::Text(t) if t.as_str() == "2")
                && ws.send(Message::text("3")).await.is_err()
            {
                return;
            }
        }
    });
    Light { id, task }
}

/// `n` light clients in `room`, at most `at_once` connecting at a time.
async fn crowd(addr: SocketAddr, room: &str, n: usize, at_once: usize) -> Vec<Light> {
    let gate = Arc::new(Semaphore::new(at_once));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (gate, room) = (gate.clone(), room.to_owned());
            tokio::spawn(async move {
                let _p = gate.acquire_owned().await.expect("gate");
                light(addr, &room).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("light client"));
    }
    out
}

async fn peer_ids(p: &socketio_p2p::P2p) -> HashSet<String> {
    p.peers()
        .await
        .expect("peers")
        .into_iter()
        .map(|i| i.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_room_of_2000_gives_a_complete_view() {
    const N: usize = 2000;
    let server = spawn_server().await;
    let lights = crowd(server.addr, "big", N, 64).await;
    let want: HashSet<String> = lights.iter().map(|l| l.id.clone()).collect();
    assert_eq!(want.len(), N);
    let me = peer(&server, relay_opts().room("big")).await;
    assert!(
        wait_until(20, || async { peer_ids(&me).await.len() == N }).await,
        "the observer sees {} of {N} peers",
        peer_ids(&me).await.len()
    );
    assert_eq!(peer_ids(&me).await, want);
    assert_eq!(server.signaling.room_peers("big").len(), N + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_missed_in_a_storm_of_joins() {
    const N: usize = 300;
    let server = spawn_server().await;
    let me = peer(&server, relay_opts().room("storm").events_capacity(4 * N)).await;
    let mut events = me.peer_events();
    // Everyone at once.
    let lights = crowd(server.addr, "storm", N, N).await;
    let want: HashSet<String> = lights.iter().map(|l| l.id.clone()).collect();
    let mut joined = HashSet::new();
    while joined.len() < N {
        let id = wait_event(&mut events, 20, |ev| match ev {
            PeerEvent::Joined { room, peer } if room == "storm" => Some(peer.id),
            _ => None,
        })
        .await;
        assert!(joined.insert(id.clone()), "joined twice: {id}");
    }
    assert_eq!(joined, want);
    assert_eq!(peer_ids(&me).await, want);
    // And they leave: every departure is seen.
    drop(lights);
    let mut gone = HashSet::new();
    while gone.len() < N {
        let id = wait_event(&mut events, 20, |ev| match ev {
            PeerEvent::Disconnected { peer } => Some(peer.id),
            _ => None,
        })
        .await;
        gone.insert(id);
    }
    assert_eq!(gone, want);
    assert!(wait_until(10, || async { peer_ids(&me).await.is_empty() }).await);
}

/// With a `Welcome` that lists 1 member and pages of 3, the observer pages through a room
/// of 150 while 40 others join and 40 members leave (at once: no grace for broken
/// connections): its view ends up exactly the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_during_paging_are_not_missed() {
    const N: usize = 150;
    const CHURN: usize = 40;
    let opts = socketio_p2p_signaling::SignalingOptions::default()
        .welcome_members(1)
        .members_page(3)
        .resume_grace(Duration::ZERO);
    let server = spawn_server_with(opts).await;
    let mut lights = crowd(server.addr, "paged", N, 64).await;
    // The observer registers while the room changes under it.
    let addr = server.addr;
    let churn = tokio::spawn(async move { crowd(addr, "paged", CHURN, CHURN).await });
    let leaving: Vec<Light> = lights.drain(..CHURN).collect();
    let me = peer(&server, relay_opts().room("paged")).await;
    drop(leaving);
    let newcomers = churn.await.expect("churn");
    let want: HashSet<String> = lights
        .iter()
        .chain(newcomers.iter())
        .map(|l| l.id.clone())
        .collect();
    assert_eq!(want.len(), N);
    assert!(
        wait_until(20, || async { peer_ids(&me).await == want }).await,
        "the observer sees {} peers, {} of them wrong",
        peer_ids(&me).await.len(),
        peer_ids(&me).await.difference(&want).count()
    );
    // What the server holds agrees.
    let server_view: HashSet<String> = server
        .signaling
        .room_peers("paged")
        .into_iter()
        .map(|p| p.id)
        .filter(|id| *id != me.id())
        .collect();
    assert_eq!(server_view, want);
}

/// `members` pages: the rest of a capped Welcome, in order; bad requests get typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_pages_and_bad_page_requests() {
    let opts = socketio_p2p_signaling::SignalingOptions::default()
        .welcome_members(2)
        .members_page(4);
    let server = spawn_server_with(opts).await;
    let lights = crowd(server.addr, "r", 9, 9).await;
    let mut want: Vec<String> = lights.iter().map(|l| l.id.clone()).collect();
    want.sort();
    let mut raw = Raw::connect(&server).await;
    let welcome = raw.hello(None, &["r", "other"]).await;
    let room = &welcome["rooms"][0];
    assert_eq!(room["more"], json!(true), "{welcome}");
    let mut seen: Vec<String> = room["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        welcome["rooms"][1]["more"],
        Value::Null,
        "a small room says nothing"
    );
    let mut rid = 10;
    loop {
        rid += 1;
        let last = seen.last().cloned().unwrap();
        // Asks for more than a page: gets a full page.
        raw.emit(
            "p2p:req",
            json!({"rid": rid, "op": "members", "room": "r", "after": last, "limit": 100}),
        )
        .await;
        let res = raw.expect("p2p:res").await;
        assert_eq!(res["rid"], json!(rid));
        let page = &res["ok"];
        let ids: Vec<String> = page["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.len() <= 4);
        seen.extend(ids);
        if page["more"] != json!(true) {
            break;
        }
    }
    assert_eq!(seen, want);
    // From the start, with a limit.
    raw.emit(
        "p2p:req",
        json!({"rid": 50, "op": "members", "room": "r", "limit": 3}),
    )
    .await;
    let res = raw.expect("p2p:res").await;
    let ids: Vec<&str> = res["ok"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        want[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(res["ok"]["more"], json!(true));
    let bad = [
        (
            json!({"rid": 60, "op": "members", "room": "r", "limit": 0}),
            "BadRequest",
        ),
        (
            json!({"rid": 61, "op": "members", "room": "r", "limit": "all"}),
            "BadRequest",
        ),
        (
            json!({"rid": 62, "op": "members", "room": "r", "after": ""}),
            "BadRequest",
        ),
        (
            json!({"rid": 63, "op": "members", "room": "r", "after": "x".repeat(129)}),
            "BadRequest",
        ),
        (json!({"rid": 64, "op": "members"}), "BadRequest"),
        (
            json!({"rid": 65, "op": "members", "room": "not-mine"}),
            "UnknownRoom",
        ),
    ];
    for (req, code) in bad {
        raw.emit("p2p:req", req.clone()).await;
        let res = raw.expect("p2p:res").await;
        assert_eq!(res["rid"], req["rid"], "{res}");
        assert_eq!(res["error"]["code"], json!(code), "{req} -> {res}");
    }
    // Not registered yet: NotRegistered.
    let mut fresh = Raw::connect(&server).await;
    fresh
        .emit("p2p:req", json!({"rid": 1, "op": "members", "room": "r"}))
        .await;
    let res = fresh.expect("p2p:res").await;
    assert_eq!(res["error"]["code"], json!("NotRegistered"));
}

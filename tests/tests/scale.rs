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

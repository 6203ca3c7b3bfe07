//! The signaling as a connect middleware on the app's own namespace (socket.io-p2p's
//! `io.use(p2p)`), with the chat server of socket.io-p2p's article: the app relays its own
//! `peer-msg` and `go-private` events with `socket.broadcast()`, while the same connections
//! carry peer events through the signaling's relay. Also the one-line server.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rust_socketio::Payload as SioPayload;
use serde_json::{Value, json};
use socketio_p2p::P2p;
use socketio_p2p_signaling::protocol::{
    Body, Frame, Msg, WirePayload, batch_from_base64, split_batch,
};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use socketio_p2p_tests::*;
use socketioxide::SocketIo;
use socketioxide::extract::{Data, Event, SocketRef};
use socketioxide::handler::ConnectHandler;
use tokio::sync::mpsc;

/// The app's own events, which the raw clients listen to.
const APP_EVENTS: &[&str] = &["app-hello", "peer-msg", "go-private", "app-fallback"];

/// The article's server: `io.use(p2p)`, then its own connection handler broadcasting
/// `peer-msg` and `go-private`. It also greets every socket and answers unknown events.
fn chat_app(io: &SocketIo, signaling: &P2pSignaling) {
    let chat = async |socket: SocketRef| {
        let _ = socket.emit("app-hello", &socket.id.to_string());
        socket.on("peer-msg", async |s: SocketRef, Data(d): Data<Value>| {
            let _ = s.broadcast().emit("peer-msg", &d).await;
        });
        socket.on("go-private", async |s: SocketRef, Data(d): Data<Value>| {
            let _ = s.broadcast().emit("go-private", &d).await;
        });
        socket.on_fallback(async |s: SocketRef, Event(event): Event| {
            let _ = s.emit("app-fallback", &event);
        });
    };
    io.ns("/", chat.with(signaling.middleware()));
}

fn frame(to: &str, event: &str, text: &str) -> Vec<u8> {
    let f = Frame {
        to: to.into(),
        from: String::new(),
        body: Body::Data {
            seq: 1,
            more: false,
            msg: Msg::Event {
                event: event.into(),
                ack_id: None,
                payload: WirePayload::Json(serde_json::to_vec(text).unwrap().into()),
            },
        },
    };
    f.encode().unwrap().to_vec()
}

/// The frames of one `p2p:f` batch (base64 text, what raw clients asked for).
fn frames_of(batch: &Value) -> Vec<Frame> {
    let bytes = batch_from_base64(batch.as_str().expect("a base64 batch")).unwrap();
    split_batch(&bytes)
        .unwrap()
        .iter()
        .map(|f| Frame::decode(f).unwrap())
        .collect()
}

/// Every event `raw` receives until `event` comes (its data), or panics after 10 s.
async fn until(raw: &mut Raw, event: &str) -> (Value, Vec<String>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (ev, p) = raw
            .next_within(left)
            .await
            .unwrap_or_else(|| panic!("no {event} (saw {seen:?})"));
        if ev == event {
            let data = match p {
                SioPayload::Text(mut v) if !v.is_empty() => v.swap_remove(0),
                _ => Value::Null,
            };
            return (data, seen);
        }
        seen.push(ev);
    }
}

async fn chat_client(s: &Server) -> (Raw, String) {
    let mut raw = Raw::connect_with(s, APP_EVENTS).await;
    // The app's own connect handler ran.
    let (sid, _) = until(&mut raw, "app-hello").await;
    assert!(sid.as_str().is_some_and(|s| !s.is_empty()), "{sid}");
    let welcome = raw.hello(None, &["chat"]).await;
    let id = welcome["id"].as_str().unwrap().to_owned();
    (raw, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_events_and_peer_events_share_the_connection() {
    let s = spawn_app(SignalingOptions::default(), chat_app).await;
    let (mut a, a_id) = chat_client(&s).await;
    let (mut b, b_id) = chat_client(&s).await;
    let (mut c, _c_id) = chat_client(&s).await;
    assert_eq!(s.signaling.peers().len(), 3);

    // The app's events, broadcast by the app to the others.
    a.emit("peer-msg", json!({"textVal": "hello, all"})).await;
    for other in [&mut b, &mut c] {
        let (msg, _) = until(other, "peer-msg").await;
        assert_eq!(msg, json!({"textVal": "hello, all"}));
    }
    a.emit("go-private", json!(true)).await;
    for other in [&mut b, &mut c] {
        let (msg, _) = until(other, "go-private").await;
        assert_eq!(msg, json!(true));
    }

    // Peer events on the same connections, through the signaling's relay.
    a.send_frames(&[frame(&b_id, "peer-msg", "just for b")])
        .await;
    let (batch, _) = until(&mut b, "p2p:f").await;
    let got = frames_of(&batch);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, a_id);
    match &got[0].body {
        Body::Data {
            msg: Msg::Event { event, payload, .. },
            ..
        } => {
            assert_eq!(event, "peer-msg");
            assert_eq!(
                payload,
                &WirePayload::Json(b"\"just for b\"".to_vec().into())
            );
        }
        other => panic!("unexpected frame {other:?}"),
    }
    // ... and only to b.
    if let Some((ev, _)) = c.next_within(Duration::from_millis(300)).await {
        assert_ne!(ev, "p2p:f", "c got b's frame");
    }

    // An event neither the app's handlers nor the signaling know reaches the app's
    // fallback; the signaling says nothing about it.
    a.emit("mystery", json!(1)).await;
    let (name, seen) = until(&mut a, "app-fallback").await;
    assert_eq!(name, json!("mystery"));
    assert!(!seen.iter().any(|e| e == "p2p:error"), "{seen:?}");
    while let Some((ev, _)) = a.next_within(Duration::from_millis(300)).await {
        assert_ne!(ev, "p2p:error");
    }

    // The signaling still sees sockets go: b hears that a disconnected.
    a.client.disconnect().await.unwrap();
    loop {
        let (p, _) = until(&mut b, "p2p:presence").await;
        let list = match p {
            Value::Array(v) => v,
            one => vec![one],
        };
        if list
            .iter()
            .any(|p| p["type"] == "disconnected" && p["peer"]["id"] == a_id.as_str())
        {
            break;
        }
    }
    assert!(wait_until(10, || async { s.signaling.peers().len() == 2 }).await);
}

fn collect(p: &P2p, event: &str) -> mpsc::UnboundedReceiver<socketio_p2p::Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    p.on(event, move |ev| {
        let _ = tx.send(ev);
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_peers_on_the_apps_namespace() {
    let s = spawn_app(SignalingOptions::default(), chat_app).await;
    let x = peer(&s, relay_opts()).await;
    let y = peer(&s, relay_opts()).await;
    wait_peers(&x, 1).await;
    wait_peers(&y, 1).await;
    let (r1, _) = chat_client(&s).await;
    let (mut r2, _) = chat_client(&s).await;

    let mut at_y = collect(&y, "peer-msg");
    x.emit("peer-msg", json!({"textVal": "p2p"})).await.unwrap();
    let ev = recv(&mut at_y, 10).await;
    assert_eq!(ev.from(), x.id());
    assert_eq!(
        ev.decode_json::<Value>().unwrap(),
        json!({"textVal": "p2p"})
    );

    // The app's own broadcast goes on beside them (the peers get it too, as plain
    // Socket.IO events they do not listen to).
    r1.emit("go-private", json!({"from": "r1"})).await;
    let (msg, _) = until(&mut r2, "go-private").await;
    assert_eq!(msg, json!({"from": "r1"}));
    let _ = r1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_line_server() {
    let s = spawn_layer(SignalingOptions::default()).await;
    let x = peer(&s, relay_opts()).await;
    let y = peer(&s, relay_opts()).await;
    wait_peers(&x, 1).await;
    let mut at_y = collect(&y, "chat");
    x.emit("chat", "hi").await.unwrap();
    assert_eq!(
        recv(&mut at_y, 10).await.decode_json::<String>().unwrap(),
        "hi"
    );
    // The namespace is the signaling's alone there: unknown events get `UnknownEvent`.
    let mut raw = Raw::connect(&s).await;
    raw.emit("mystery", json!(1)).await;
    let err = raw.expect("p2p:error").await;
    assert_eq!(err["code"], "UnknownEvent", "{err}");
}

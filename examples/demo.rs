//! Self-running demo: a server and two peers in one process. They chat over the relay, one
//! says `/private`, both move onto a WebRTC data channel, and they chat directly. Every
//! line says which transport carried it. Loopback only: no STUN, no mDNS.
//!
//! Run: `cargo run -p socketio-p2p-examples --example demo`
use std::time::{Duration, Instant};

use socketio_p2p::{P2p, P2pOptions, PeerEvent};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // 1. The server: socketioxide + P2pSignaling, on a free loopback port.
    let (layer, io) = socketioxide::SocketIo::builder()
        .max_buffer_size(4096)
        .build_layer();
    P2pSignaling::new(SignalingOptions::default()).attach(&io);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    // Small signaling messages should not wait for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().layer(layer)).await });
    println!("server  listening on {url}");

    // 2. Two peers in the room "chat". Upgrade only when someone goes private (as in the
    //    socket.io-p2p chat), WebRTC restricted to loopback for this demo.
    let opts = || {
        P2pOptions::default()
            .room("chat")
            .auto_upgrade(false)
            .loopback_only()
    };
    let alice = P2p::connect(&url, opts().uid("alice")).await?;
    let bob = P2p::connect(&url, opts().uid("bob")).await?;
    println!("alice   connected as {}", alice.id());
    println!("bob     connected as {}", bob.id());

    // Everyone prints what they receive, with the transport that carried it.
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    for (name, p) in [("alice", &alice), ("bob", &bob)] {
        let tx = lines_tx.clone();
        p.on("peer-msg", move |ev| {
            let text: String = ev.decode_json().unwrap_or_default();
            let from = ev.from_uid().unwrap_or("?").to_owned();
            let _ = tx.send(format!(
                "{name:<7} got from {from:<5} via {:<12} | {text}",
                ev.transport().to_string()
            ));
        });
        // `go-private` is an application event like any other: the receiver upgrades.
        let me = p.clone();
        p.on("go-private", move |ev| {
            let me = me.clone();
            let from = ev.from().to_owned();
            tokio::spawn(async move {
                let _ = me.upgrade_peer(&from).await;
            });
        });
    }
    let (up_tx, mut upgraded) = mpsc::unbounded_channel();
    alice.on_peer_event(move |ev| {
        if let PeerEvent::Upgraded { peer } = ev {
            let _ = up_tx.send(peer);
        }
    });

    let say = async |who: &P2p,
                     text: &str,
                     lines: &mut mpsc::UnboundedReceiver<String>|
           -> Result<(), BoxError> {
        who.emit("peer-msg", text).await?;
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await?
            .ok_or("closed")?;
        println!("{line}");
        Ok(())
    };

    wait_for_peer(&alice).await?;
    wait_for_peer(&bob).await?;
    say(&alice, "hi bob, this goes through the server", &mut lines).await?;
    say(&bob, "hi alice, same here", &mut lines).await?;

    // 3. Go private: alice tells everyone, and upgrades herself.
    println!("alice   types /private");
    let started = Instant::now();
    alice.emit("go-private", ()).await?;
    let peer = tokio::time::timeout(Duration::from_secs(10), upgraded.recv())
        .await?
        .ok_or("closed")?;
    println!(
        "upgrade alice <-> bob ({}) now on a WebRTC data channel, in {} ms",
        peer.id,
        started.elapsed().as_millis()
    );

    say(&alice, "now we talk peer to peer", &mut lines).await?;
    say(&bob, "the server only sees our signaling", &mut lines).await?;
    bob.on("ping", |ev| {
        ev.reply(format!("pong (your ping came via {})", ev.transport()));
    });
    let reply = alice
        .to(bob.id())
        .emit_with_ack("ping", "are you there?")
        .await?;
    println!("alice   ack reply: {}", reply.decode_json::<String>()?);

    alice.close().await;
    bob.close().await;
    println!("done");
    Ok(())
}

async fn wait_for_peer(p: &P2p) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.peers().await?.is_empty() {
        if Instant::now() > deadline {
            return Err("peer never showed up".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

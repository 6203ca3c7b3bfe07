//! Interactive chat, one process per person (the socket.io-p2p chat).
//!
//! ```text
//! cargo run -p socketio-p2p-examples --example chat -- serve 127.0.0.1:3030
//! cargo run -p socketio-p2p-examples --example chat -- join http://127.0.0.1:3030 alice
//! cargo run -p socketio-p2p-examples --example chat -- join http://127.0.0.1:3030 bob
//! ```
//!
//! Type a line to send it to everyone in the room; `/private` makes everyone upgrade to
//! WebRTC data channels; `/peers` lists peers and transports; `/quit` leaves. WebRTC uses
//! loopback candidates only unless you pass `--stun stun:host:port` after the name.
//!
//! `serve` also serves a chat page at `/` for browsers (it needs the JavaScript bundle:
//! `(cd js && npm ci && npm run build)`), whose people chat with the `join` peers.
use std::time::Duration;

use socketio_p2p::{IceServer, P2p, P2pOptions, PeerEvent};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:3030")).await,
        Some("join") if args.len() >= 3 => {
            let stun = args
                .iter()
                .position(|a| a == "--stun")
                .and_then(|i| args.get(i + 1))
                .cloned();
            join(&args[1], &args[2], stun).await
        }
        _ => {
            eprintln!("usage: chat serve [ADDR] | chat join URL NAME [--stun stun:host:port]");
            Ok(())
        }
    }
}

async fn serve(addr: &str) -> Result<(), BoxError> {
    let (layer, io) = socketioxide::SocketIo::builder()
        .max_buffer_size(4096)
        .build_layer();
    let signaling = P2pSignaling::new(
        SignalingOptions::default()
            .on_peer_joined(|p| println!("+ {} ({})", p.uid.as_deref().unwrap_or("?"), p.id))
            .on_peer_left(|p| println!("- {} ({})", p.uid.as_deref().unwrap_or("?"), p.id)),
    );
    signaling.attach(&io);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("chat server on http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/socketio-p2p.browser.js", axum::routing::get(bundle))
        .layer(layer);
    axum::serve(listener, app).await?;
    Ok(())
}

/// The browser chat page (`js/examples/chat.html`).
async fn page() -> axum::response::Response {
    js_file("examples/chat.html", "text/html; charset=utf-8").await
}

/// The JavaScript client's single-file bundle, built by `npm run build` in `js/`.
async fn bundle() -> axum::response::Response {
    js_file("dist/socketio-p2p.browser.js", "text/javascript").await
}

async fn js_file(path: &str, content_type: &'static str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let full = format!("{}/../js/{path}", env!("CARGO_MANIFEST_DIR"));
    match tokio::fs::read(&full).await {
        Ok(body) => ([("content-type", content_type)], body).into_response(),
        Err(_) => (
            axum::http::StatusCode::NOT_FOUND,
            format!("{full} is missing: build the JavaScript client with (cd js && npm ci && npm run build)"),
        )
            .into_response(),
    }
}

async fn join(url: &str, name: &str, stun: Option<String>) -> Result<(), BoxError> {
    let mut opts = P2pOptions::default()
        .room("chat")
        .uid(name)
        .auto_upgrade(false)
        .num_clients(10);
    opts = match stun {
        Some(url) => opts.ice_servers(vec![IceServer::stun(url)]),
        None => opts.loopback_only(),
    };
    let p2p = P2p::connect(url, opts).await?;
    println!(
        "joined as {name} ({}); type a message, /private, /peers or /quit",
        p2p.id()
    );
    p2p.on("peer-msg", |ev| {
        let text: String = ev.decode_json().unwrap_or_default();
        println!(
            "[{} via {}] {text}",
            ev.from_uid().unwrap_or(ev.from()),
            ev.transport()
        );
    });
    let me = p2p.clone();
    p2p.on("go-private", move |ev| {
        println!(
            "* {} went private: upgrading",
            ev.from_uid().unwrap_or(ev.from())
        );
        let me = me.clone();
        tokio::spawn(async move { me.upgrade().await });
    });
    p2p.on_peer_event(|ev| match ev {
        PeerEvent::Joined { peer, .. } => {
            println!("* {} joined", peer.uid.as_deref().unwrap_or(&peer.id))
        }
        PeerEvent::Disconnected { peer } => {
            println!("* {} left", peer.uid.as_deref().unwrap_or(&peer.id))
        }
        PeerEvent::Upgraded { peer } => println!("* data channel open with {}", peer.id),
        PeerEvent::Downgraded { peer, reason } => {
            println!("* back on the relay with {}: {reason}", peer.id)
        }
        PeerEvent::UpgradeFailed { peer, reason } => {
            println!("* upgrade with {} failed: {reason}", peer.id)
        }
        PeerEvent::Closed { reason } => println!("* closed: {reason}"),
        _ => {}
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "" => {}
            "/quit" => break,
            "/private" => {
                p2p.emit("go-private", ()).await?;
                p2p.upgrade().await?;
            }
            "/peers" => {
                for peer in p2p.peers().await? {
                    let t = p2p.transport(&peer.id).await?;
                    println!(
                        "  {} ({}) via {t}",
                        peer.uid.as_deref().unwrap_or("?"),
                        peer.id
                    );
                }
            }
            text => p2p.emit("peer-msg", text).await?,
        }
    }
    p2p.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

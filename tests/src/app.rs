//! Servers whose app builds its own namespaces (the signaling as a middleware, or the
//! one-line layer), and raw clients that listen to the app's own events too.
use std::time::Duration;

use rust_socketio::Payload as SioPayload;
use rust_socketio::asynchronous::ClientBuilder;
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use socketioxide::SocketIo;

use crate::{Raw, Server, init_tracing};

/// Serves an app on 127.0.0.1 (any free port), with TCP_NODELAY (`socketio_p2p_signaling::serve`):
/// `build` sets up the namespaces of a `SocketIo` built with the relay's settings
/// (`P2pSignaling::socketio`), and of the signaling server made with `opts`.
pub async fn spawn_app(
    opts: SignalingOptions,
    build: impl FnOnce(&SocketIo, &P2pSignaling),
) -> Server {
    init_tracing();
    let signaling = P2pSignaling::new(opts);
    let (layer, io) = P2pSignaling::socketio().build_layer();
    build(&io, &signaling);
    serve_layer(layer, io, signaling).await
}

/// Serves the one-line server of `P2pSignaling::layer`.
pub async fn spawn_layer(opts: SignalingOptions) -> Server {
    init_tracing();
    let (layer, signaling) = P2pSignaling::layer(opts);
    // The layer's own `SocketIo` is not handed out; a second one stands in for the field.
    let (_, io) = SocketIo::new_layer();
    serve_layer(layer, io, signaling).await
}

async fn serve_layer(
    layer: socketioxide::layer::SocketIoLayer,
    io: SocketIo,
    signaling: P2pSignaling,
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().layer(layer);
    let task = tokio::spawn(async move {
        let _ = socketio_p2p_signaling::serve(listener, app).await;
    });
    Server {
        addr,
        signaling,
        io,
        task,
    }
}

impl Raw {
    /// Like [`Raw::connect`], and also listens to the app's events `extra`.
    pub async fn connect_with(server: &Server, extra: &[&str]) -> Raw {
        Raw::connect_builder(ClientBuilder::new(server.url()), extra).await
    }

    /// The next message of any event, if one comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<(String, SioPayload)> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

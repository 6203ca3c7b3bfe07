//! # socketio-p2p-signaling
//!
//! The server half of socketio-p2p: a [`P2pSignaling`] middleware that a
//! [socketioxide](https://docs.rs/socketioxide) server attaches in one line. It registers
//! peers, scopes them in rooms and pairs, relays their events and WebRTC signaling, and tells
//! them when others join, leave or disconnect. It never needs to know application event names.
//!
//! The [`protocol`] module (always compiled, no socketioxide) holds the wire types and the
//! envelope codec that the peer crate shares.
//!
//! ```no_run
//! use socketio_p2p_signaling::{P2pSignaling, SignalingOptions, serve};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (layer, _signaling) = P2pSignaling::layer(SignalingOptions::default()); // the one line
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! serve(listener, axum::Router::new().layer(layer)).await?; // with TCP_NODELAY
//! # Ok(()) }
//! ```
//!
//! An app that builds its own `SocketIo` attaches the signaling to it
//! ([`P2pSignaling::attach`]), or shares a namespace with its own handlers through
//! [`P2pSignaling::middleware`] (like socket.io-p2p's `io.use(p2p)`):
//!
//! ```
//! use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
//! use socketioxide::extract::SocketRef;
//! use socketioxide::handler::ConnectHandler;
//! let (_layer, io) = P2pSignaling::socketio().build_layer();
//! let signaling = P2pSignaling::new(SignalingOptions::default());
//! io.ns("/", (async |_socket: SocketRef| { /* the app's own events */ }).with(signaling.middleware()));
//! ```
mod error;
pub mod protocol;
mod service;
pub use error::Error;
pub use service::{Service, ServiceError};

#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
pub use server::*;

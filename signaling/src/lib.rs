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
//! use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (layer, io) = socketioxide::SocketIo::builder().max_buffer_size(4096).build_layer();
//! P2pSignaling::new(SignalingOptions::default()).attach(&io); // the one line
//! let app = axum::Router::new().layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
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

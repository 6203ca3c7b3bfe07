//! Carriers: they move bytes and report back; they decide nothing.
//!
//! - [`relay`]: the Socket.IO client (frames through the server, requests, server events);
//! - [`webrtc`]: the peer connections and their data channels.
pub(crate) mod relay;
pub(crate) mod webrtc;

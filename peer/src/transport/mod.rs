//! Carriers: they move bytes and report back; they decide nothing.
//!
//! - [`relay`]: the Socket.IO client (frames through the server, requests, server events);
//! - [`webrtc`]: the peer connections and their data channels (without the `webrtc`
//!   feature, a stand-in that refuses every upgrade).
pub(crate) mod relay;
#[cfg(feature = "webrtc")]
pub(crate) mod webrtc;
#[cfg(not(feature = "webrtc"))]
#[path = "no_webrtc.rs"]
pub(crate) mod webrtc;

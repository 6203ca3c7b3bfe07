//! `P2pOptions`: every knob of a [`crate::P2p`], with defaults that work.
use std::time::Duration;

/// One ICE server (STUN or TURN).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IceServer {
    /// URLs, e.g. `stun:stun.example.org:3478` or `turn:turn.example.org:3478`.
    pub urls: Vec<String>,
    /// TURN username.
    pub username: Option<String>,
    /// TURN credential.
    pub credential: Option<String>,
}

impl IceServer {
    /// A STUN server.
    pub fn stun(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            username: None,
            credential: None,
        }
    }
    /// A TURN server with credentials.
    pub fn turn(
        url: impl Into<String>,
        username: impl Into<String>,
        credential: impl Into<String>,
    ) -> Self {
        Self {
            urls: vec![url.into()],
            username: Some(username.into()),
            credential: Some(credential.into()),
        }
    }
}

/// Options for [`crate::P2p::new`]. Start from `P2pOptions::default()` and chain setters.
///
/// ```
/// use socketio_p2p::P2pOptions;
/// let opts = P2pOptions::default().room("lobby").auto_upgrade(false).num_clients(10);
/// ```
#[derive(Debug, Clone)]
#[must_use = "options do nothing until passed to `P2p::new` or `P2p::connect`"]
#[cfg_attr(not(feature = "webrtc"), allow(dead_code))]
pub struct P2pOptions {
    pub(crate) uid: Option<String>,
    pub(crate) peer_uid: Option<String>,
    pub(crate) rooms: Vec<String>,
    pub(crate) auth: Option<serde_json::Value>,
    pub(crate) request_timeout: Duration,
    pub(crate) pair_timeout: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) window: usize,
    pub(crate) auto_upgrade: bool,
    pub(crate) num_clients: usize,
    pub(crate) upgrade_timeout: Duration,
    pub(crate) dc_timeout: Duration,
    pub(crate) reconnect: bool,
    pub(crate) reconnect_delay: (Duration, Duration),
    pub(crate) reconnect_timeout: Duration,
    pub(crate) retry_backoff: (Duration, Duration),
    pub(crate) ice_servers: Vec<IceServer>,
    pub(crate) turn_tls_roots: Vec<Vec<u8>>,
    pub(crate) trickle: bool,
    pub(crate) loopback_only: bool,
    pub(crate) disable_mdns: bool,
    pub(crate) block_all_candidates: bool,
    pub(crate) events_capacity: usize,
    pub(crate) stream_window: usize,
    pub(crate) rtc_hang: Duration,
}

/// The room joined when no uid, peer uid or room is given.
pub const DEFAULT_ROOM: &str = "default";

impl Default for P2pOptions {
    fn default() -> Self {
        Self {
            uid: None,
            peer_uid: None,
            rooms: Vec::new(),
            auth: None,
            request_timeout: Duration::from_secs(10),
            pair_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024 * 1024,
            window: 256,
            auto_upgrade: cfg!(feature = "webrtc"),
            num_clients: 5,
            upgrade_timeout: Duration::from_secs(5),
            dc_timeout: Duration::from_secs(3),
            reconnect: true,
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            reconnect_timeout: Duration::from_secs(60),
            retry_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            ice_servers: vec![IceServer::stun("stun:stun.l.google.com:19302")],
            turn_tls_roots: Vec::new(),
            trickle: true,
            loopback_only: false,
            disable_mdns: true,
            block_all_candidates: false,
            events_capacity: 1024,
            stream_window: 1024 * 1024,
            rtc_hang: Duration::ZERO,
        }
    }
}

impl P2pOptions {
    /// Claims a unique uid on the server (`UidTaken` if someone holds it).
    pub fn uid(mut self, uid: impl Into<String>) -> Self {
        self.uid = Some(uid.into());
        self
    }
    /// Pairs with the peer holding this uid (socket.io-bridge style): `P2p::new` returns once
    /// the pair is up and an echo went both ways, or fails with `PeerOffline` after
    /// [`P2pOptions::pair_timeout`]. Only one side of a pair sets it.
    pub fn peer_uid(mut self, uid: impl Into<String>) -> Self {
        self.peer_uid = Some(uid.into());
        self
    }
    /// Joins a room at start (call again for more rooms). With no uid, peer uid or room,
    /// the peer joins the room `"default"`, so that everyone connected meets everyone.
    pub fn room(mut self, room: impl Into<String>) -> Self {
        self.rooms.push(room.into());
        self
    }
    /// Socket.IO connect `auth` payload (checked by the server's auth hook).
    pub fn auth(mut self, auth: serde_json::Value) -> Self {
        self.auth = Some(auth);
        self
    }
    /// How long to wait for the server's reply to a request (default 10 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// How long pairing waits for the peer (default 10 s).
    pub fn pair_timeout(mut self, d: Duration) -> Self {
        self.pair_timeout = d;
        self
    }
    /// Default time to wait for an ack reply (default 10 s).
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }
    /// Largest payload sent or accepted (default 64 MiB). Larger messages are split into
    /// frames and reassembled.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
    /// Reliable frames in flight per peer before waiting for acknowledgements (default 256).
    pub fn window(mut self, frames: usize) -> Self {
        self.window = frames.max(2);
        self
    }
    /// Upgrade to WebRTC as soon as peers meet (default true).
    pub fn auto_upgrade(mut self, on: bool) -> Self {
        self.auto_upgrade = on;
        self
    }
    /// Most peers connected over WebRTC at once (default 5); others stay on the relay.
    pub fn num_clients(mut self, n: usize) -> Self {
        self.num_clients = n;
        self
    }
    /// How long an upgrade may take before the peer stays on the relay (default 5 s). ICE
    /// gives up after about 4 s of checks without a working pair (`IceFailed`); a shorter
    /// timeout reports `Timeout` instead.
    pub fn upgrade_timeout(mut self, d: Duration) -> Self {
        self.upgrade_timeout = d;
        self
    }
    /// A data channel on which nothing arrived for this long is declared dead and its
    /// traffic moves to the relay (default 3 s). Idle channels are kept alive by pings sent
    /// every third of this.
    pub fn dc_timeout(mut self, d: Duration) -> Self {
        self.dc_timeout = d.max(Duration::from_millis(300));
        self
    }
    /// With `auto_upgrade`, a peer whose upgrade failed or whose channel died is tried again
    /// after `min`, doubling up to `max` (default 1 s to 60 s).
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_backoff = (min, max.max(min));
        self
    }
    /// Reconnect to the server after a connection loss (default true), waiting from `min`
    /// up to `max` between attempts (default 100 ms to 5 s). The peer takes its id back;
    /// events sent meanwhile wait (bounded) and go out once it is back, and peers on data
    /// channels keep talking all along. Off: a lost connection closes the `P2p`.
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }
    /// Delays between reconnection attempts (exponential from `min` to `max`).
    pub fn reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_delay = (min, max.max(min));
        self
    }
    /// Gives up reconnecting after this long (default 60 s): the `P2p` then closes with
    /// [`crate::PeerEvent::Closed`].
    pub fn reconnect_timeout(mut self, d: Duration) -> Self {
        self.reconnect_timeout = d;
        self
    }
    /// ICE servers (STUN/TURN). Default: one public STUN server.
    pub fn ice_servers(mut self, servers: Vec<IceServer>) -> Self {
        self.ice_servers = servers;
        self
    }
    /// Trusts this root certificate (PEM) for `turns:` servers, beside the system's roots:
    /// for a TURN server whose certificate comes from a private CA.
    pub fn turn_tls_root(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.turn_tls_roots.push(pem.into());
        self
    }
    /// Trickle ICE candidates (default true); off puts them all in the SDP.
    pub fn trickle(mut self, on: bool) -> Self {
        self.trickle = on;
        self
    }
    /// Local-only WebRTC: loopback candidates only, no ICE servers, no mDNS. For tests and
    /// demos on one machine.
    pub fn loopback_only(mut self) -> Self {
        self.loopback_only = true;
        self.ice_servers.clear();
        self.disable_mdns = true;
        self
    }
    /// mDNS candidates off (default true: off).
    pub fn disable_mdns(mut self, on: bool) -> Self {
        self.disable_mdns = on;
        self
    }
    /// Gathers no ICE candidate at all, so every upgrade fails (to exercise the fallback).
    #[cfg(feature = "test-hooks")]
    pub fn block_all_candidates(mut self) -> Self {
        self.block_all_candidates = true;
        self
    }
    /// Capacity of the queue of received events waiting for handlers and streams
    /// (default 1024); when full, senders are slowed down.
    pub fn events_capacity(mut self, n: usize) -> Self {
        self.events_capacity = n.max(1);
        self
    }

    /// How many bytes of each [`crate::P2pStream`] may be in flight or waiting to be read
    /// (default 1 MiB, at least 16 KiB). Each side buffers at most this much per stream; a
    /// larger window is faster on a slow round trip.
    pub fn stream_window(mut self, bytes: usize) -> Self {
        self.stream_window = bytes.max(16 * 1024);
        self
    }

    /// Test hook: every WebRTC offer and answer of this peer waits `d` before it starts,
    /// as a hung WebRTC stack would (the relay and other peers must carry on meanwhile).
    #[cfg(feature = "test-hooks")]
    pub fn hang_webrtc(mut self, d: Duration) -> Self {
        self.rtc_hang = d;
        self
    }

    pub(crate) fn effective_rooms(&self) -> Vec<String> {
        if self.rooms.is_empty() && self.uid.is_none() && self.peer_uid.is_none() {
            vec![DEFAULT_ROOM.to_owned()]
        } else {
            self.rooms.clone()
        }
    }
}

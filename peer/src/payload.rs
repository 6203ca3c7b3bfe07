//! Payloads, received events and lifecycle events.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use socketio_p2p_signaling::protocol::{PeerInfo, WirePayload};

use crate::error::{Cause, Error, Result};

/// What an event carries: JSON or raw bytes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Payload {
    /// A JSON value.
    Json(serde_json::Value),
    /// Raw bytes, sent as they are.
    Binary(Bytes),
}

impl Payload {
    /// Serializes any serde value into a JSON payload.
    pub fn encode_json<T: Serialize + ?Sized>(v: &T) -> Result<Self> {
        serde_json::to_value(v)
            .map(Payload::Json)
            .map_err(Error::from)
    }
    /// Deserializes a JSON payload into `T`.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        match self {
            Payload::Json(v) => T::deserialize(v).map_err(Error::from),
            Payload::Binary(_) => Err(Error::Serde(Cause::msg("payload is binary, not JSON"))),
        }
    }
    /// The bytes of a binary payload.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Payload::Binary(b) => Some(b),
            Payload::Json(_) => None,
        }
    }
    pub(crate) fn to_wire(&self) -> Result<WirePayload> {
        Ok(match self {
            Payload::Json(v) => {
                WirePayload::Json(Bytes::from(serde_json::to_vec(v).map_err(Error::from)?))
            }
            Payload::Binary(b) => WirePayload::Binary(b.clone()),
        })
    }
    pub(crate) fn from_wire(w: WirePayload) -> Result<Self> {
        Ok(match w {
            WirePayload::Json(b) if b.is_empty() => Payload::Json(serde_json::Value::Null),
            WirePayload::Json(b) => Payload::Json(serde_json::from_slice(&b).map_err(Error::from)?),
            WirePayload::Binary(b) => Payload::Binary(b),
        })
    }
}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        Payload::Json(v)
    }
}
impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Binary(b)
    }
}
impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Binary(Bytes::from(b))
    }
}
impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Payload::Json(serde_json::Value::String(s.to_owned()))
    }
}
impl From<String> for Payload {
    fn from(s: String) -> Self {
        Payload::Json(serde_json::Value::String(s))
    }
}
impl From<()> for Payload {
    fn from(_: ()) -> Self {
        Payload::Json(serde_json::Value::Null)
    }
}

/// Which path carries messages to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Through the Socket.IO server.
    Relay,
    /// A direct WebRTC data channel.
    DataChannel,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Relay => "relay",
            Transport::DataChannel => "data channel",
        })
    }
}

/// Sends the application's answer to an event (peer, ack id, result); false once the
/// `P2p` is gone.
pub(crate) type ReplySender =
    Arc<dyn Fn(String, u64, std::result::Result<Payload, (String, String)>) -> bool + Send + Sync>;

pub(crate) struct Responder {
    pub(crate) send: ReplySender,
    pub(crate) peer: String,
    pub(crate) ack_id: u64,
    pub(crate) done: AtomicBool,
}

impl Responder {
    fn send(&self, result: std::result::Result<Payload, (String, String)>) -> bool {
        if self.done.swap(true, Ordering::AcqRel) {
            return false;
        }
        (self.send)(self.peer.clone(), self.ack_id, result)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.send(Err((
            "NoReply".into(),
            "the receiver dropped the event without replying".into(),
        )));
    }
}

/// An event received from a peer.
///
/// If the sender waits for a reply ([`crate::P2p::emit_with_ack`]), answer with
/// [`Event::reply`]; when every clone of the event is dropped without a reply, the sender
/// gets a `Remote { code: "NoReply" }` error at once instead of waiting for its timeout.
#[derive(Clone)]
pub struct Event {
    pub(crate) name: Arc<str>,
    pub(crate) from: Arc<PeerInfo>,
    pub(crate) payload: Payload,
    pub(crate) transport: Transport,
    pub(crate) responder: Option<Arc<Responder>>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("name", &self.name)
            .field("from", &self.from.id)
            .field("transport", &self.transport)
            .field("wants_reply", &self.wants_reply())
            .finish_non_exhaustive()
    }
}

impl Event {
    /// The event name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The sender's id (set by the server or the data channel, never by the sender itself).
    pub fn from(&self) -> &str {
        &self.from.id
    }
    /// The sender's uid, if it claimed one.
    pub fn from_uid(&self) -> Option<&str> {
        self.from.uid.as_deref()
    }
    /// The payload.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
    /// Deserializes a JSON payload into `T`.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        self.payload.decode_json()
    }
    /// The bytes of a binary payload.
    pub fn bytes(&self) -> Option<&Bytes> {
        self.payload.as_bytes()
    }
    /// Which transport carried this event.
    pub fn transport(&self) -> Transport {
        self.transport
    }
    /// True if the sender waits for a reply.
    pub fn wants_reply(&self) -> bool {
        self.responder.is_some()
    }
    /// Replies to an event sent with `emit_with_ack`. Returns false if the sender did not ask
    /// for a reply or a reply was already sent.
    pub fn reply(&self, payload: impl Into<Payload>) -> bool {
        self.responder
            .as_ref()
            .is_some_and(|r| r.send(Ok(payload.into())))
    }
    /// Replies with an error the sender receives as [`Error::Remote`].
    pub fn reply_error(&self, code: &str, message: &str) -> bool {
        self.responder
            .as_ref()
            .is_some_and(|r| r.send(Err((code.to_owned(), message.to_owned()))))
    }
}

/// Lifecycle events: peers coming and going, transports changing.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A peer joined a room we are in (or we joined its room).
    Joined {
        /// Room.
        room: String,
        /// Who.
        peer: PeerInfo,
    },
    /// A peer left a room we are in (it may still share other rooms with us).
    Left {
        /// Room.
        room: String,
        /// Who.
        peer: PeerInfo,
    },
    /// We were paired with a peer.
    Paired {
        /// Who.
        peer: PeerInfo,
    },
    /// A peer we could reach disconnected from the server.
    Disconnected {
        /// Who.
        peer: PeerInfo,
    },
    /// Messages to this peer now go over a WebRTC data channel.
    Upgraded {
        /// The peer.
        peer: PeerInfo,
    },
    /// The data channel to this peer is gone; messages go over the relay again.
    Downgraded {
        /// The peer.
        peer: PeerInfo,
        /// Why.
        reason: String,
    },
    /// The upgrade to WebRTC failed; the peer stays on the relay.
    UpgradeFailed {
        /// The peer.
        peer: PeerInfo,
        /// Why.
        reason: String,
    },
    /// The path to a peer changed: a data channel opened (direct or through TURN, once
    /// its candidates are known) or closed (back to the relay).
    PathChanged {
        /// The peer.
        peer: PeerInfo,
        /// The new path.
        path: crate::stats::Path,
    },
    /// The server connection broke; the client is reconnecting. Peers on data channels
    /// keep talking meanwhile; what goes through the relay waits (and is sent again once
    /// the connection is back). [`PeerEvent::Reconnected`] or [`PeerEvent::Closed`] follows.
    Reconnecting,
    /// The server connection came back after a loss. `continued`: our id and every
    /// per-peer delivery state carried on; otherwise we came back as a new peer.
    Reconnected {
        /// Whether the session carried on.
        continued: bool,
    },
    /// This P2p lost its server connection or its pair and is closed.
    Closed {
        /// Why.
        reason: String,
    },
}

//! JSON control messages: registration, rooms, pairing, signaling, presence and errors.
use serde::{Deserialize, Serialize};

/// Socket.IO event names used by the protocol. Application events never appear here:
/// they travel inside [`crate::protocol::Frame`]s on [`events::FRAME`].
pub mod events {
    /// Client → server request ([`super::Request`]); server → client reply is [`RESPONSE`].
    pub const REQUEST: &str = "p2p:req";
    /// Server → client reply ([`super::Response`]).
    pub const RESPONSE: &str = "p2p:res";
    /// Binary envelope frame, both directions.
    pub const FRAME: &str = "p2p:f";
    /// Server → client WebRTC signal from another peer ([`super::SignalFrom`]).
    pub const SIGNAL: &str = "p2p:sig";
    /// Server → client presence change ([`super::Presence`]).
    pub const PRESENCE: &str = "p2p:presence";
    /// Server → client error not tied to a request ([`super::ErrorMsg`]).
    pub const ERROR: &str = "p2p:error";
    /// Server → provider: a call of one of its services ([`super::CallFor`]); the provider
    /// answers with the `call_result` request.
    pub const CALL: &str = "p2p:call";
    /// Server → subscriber: a publication on a topic ([`super::Publication`]).
    pub const TOPIC: &str = "p2p:topic";
}

/// Protocol version spoken by this crate (sent in `hello`).
pub const PROTOCOL_VERSION: u32 = 2;

/// How a client wants the `p2p:f` batches it receives: one binary attachment (the default,
/// for socket.io-client), or one base64 text argument (for clients whose binary path is
/// slow or splits messages, like rust_socketio 0.6). The server accepts both from anyone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameEncoding {
    /// One binary argument holding the batch.
    #[default]
    Binary,
    /// One string argument: the batch in standard base64 with padding.
    Base64,
}

/// Identity of a peer as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Server-assigned id (the Socket.IO socket id).
    pub id: String,
    /// The uid the peer claimed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A client request: `p2p:req` with `{"rid": n, "op": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Request id chosen by the client, echoed in the response.
    pub rid: u64,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// Operations a client can ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Register: must be the first request. Replies [`Welcome`].
    Hello {
        /// Protocol version of the client.
        version: u32,
        /// Claim a unique uid.
        #[serde(default)]
        uid: Option<String>,
        /// Rooms to join right away.
        #[serde(default)]
        rooms: Vec<String>,
        /// After a reconnection: take back this peer id (see [`Resume`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
        /// How this client wants `p2p:f` batches delivered (default binary).
        #[serde(default)]
        frames: FrameEncoding,
        /// Ask for `p2p:presence` events that may carry an array of presences (one event
        /// per burst instead of one per presence).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch_presence: bool,
    },
    /// Join a room. Replies the room's other peers (`[PeerInfo]`).
    Join {
        /// Room name.
        room: String,
    },
    /// Leave a room. Replies `null`.
    Leave {
        /// Room name.
        room: String,
    },
    /// List the other peers of a room. Replies `[PeerInfo]`.
    Peers {
        /// Room name.
        room: String,
    },
    /// One page of a room's other members, sorted by id, starting after `after` (from the
    /// start when absent). Replies a [`MembersPage`]. A `Welcome` whose room says `more`
    /// is completed with these pages.
    Members {
        /// Room name (the sender must be in it).
        room: String,
        /// Return members whose id sorts after this one (the last id already seen).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Most members in the page (default and most: the server's `members_page`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Pair with the peer holding `peer_uid` (waits up to `timeout_ms` for it to register).
    /// Replies the peer's [`PeerInfo`].
    Pair {
        /// The uid of the peer to pair with.
        peer_uid: String,
        /// How long the server waits for that peer to show up.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Relay a WebRTC signal to a peer that shares a room or a pair with the sender. Replies `null`.
    Signal {
        /// Target peer id.
        to: String,
        /// The signal.
        signal: Signal,
    },
    /// Become the provider of a service (names are unique on the server). Replies `null`;
    /// `ServiceTaken` if someone else provides it.
    Provide {
        /// Service name.
        service: String,
    },
    /// Stop providing a service; calls in flight fail with `ServiceGone`. Replies `null`.
    Unprovide {
        /// Service name.
        service: String,
    },
    /// Call a method of a service, wherever it runs (a peer or the server). Replies a
    /// [`CallOutcome`]; `NoSuchService`, `ServiceGone` or `Timeout` when there is no answer.
    Call {
        /// Service name.
        service: String,
        /// Method name.
        method: String,
        /// Arguments (any JSON).
        #[serde(default)]
        args: serde_json::Value,
        /// How long the server waits for the provider (default 30 s, at most 10 min).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// A provider's answer to a [`CallFor`]. Replies `null`.
    CallResult {
        /// The call id from [`CallFor`].
        cid: u64,
        /// The answer.
        outcome: CallOutcome,
    },
    /// Receive the publications of a topic ([`events::TOPIC`]). Replies `null`.
    Subscribe {
        /// Topic name.
        topic: String,
    },
    /// Stop receiving a topic. Replies `null`.
    Unsubscribe {
        /// Topic name.
        topic: String,
    },
    /// Publish to every subscriber of a topic (the publisher too, if subscribed), each once.
    /// Replies the number of subscribers reached.
    Publish {
        /// Topic name.
        topic: String,
        /// What to publish (any JSON).
        #[serde(default)]
        data: serde_json::Value,
    },
}

/// The answer of a service method: `{"ok": value}` or `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The method's result.
    Ok(serde_json::Value),
    /// The method failed (or does not exist, or its arguments did not fit).
    Error(CallError),
}

/// An error returned by a service method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError {
    /// Machine-readable code (`UnknownMethod` and `BadArgs` are used by the library).
    pub code: String,
    /// Human-readable text.
    pub message: String,
}

/// Server → provider `p2p:call`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallFor {
    /// Call id, echoed in the `call_result` request.
    pub cid: u64,
    /// The caller.
    pub from: PeerInfo,
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Arguments.
    #[serde(default)]
    pub args: serde_json::Value,
}

/// Server → subscriber `p2p:topic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// Topic name.
    pub topic: String,
    /// The publishing peer; `None` when the server published.
    #[serde(default)]
    pub from: Option<PeerInfo>,
    /// What was published.
    #[serde(default)]
    pub data: serde_json::Value,
    /// Publications of this topic the subscriber missed just before this one, because it
    /// did not read them in time (its queue on the server or in the client was full).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub missed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A reconnecting peer asks for its previous id back.
///
/// The server grants it when no connected peer holds that id and either the token is the
/// one it issued with that id, or it never issued that id (it restarted): then nobody was
/// told that the peer left, and its links to other peers carry on where they were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The previous peer id.
    pub id: String,
    /// The token received in the previous [`Welcome`].
    pub token: String,
}

/// A WebRTC negotiation message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Signal {
    /// SDP offer.
    Offer {
        /// Session description.
        sdp: String,
    },
    /// SDP answer.
    Answer {
        /// Session description.
        sdp: String,
    },
    /// Trickled ICE candidate (RTCIceCandidateInit); `null` candidate = end of candidates.
    Candidate {
        /// The candidate line, as in RTCIceCandidateInit.candidate.
        candidate: String,
        /// Media id.
        #[serde(default, rename = "sdpMid")]
        sdp_mid: Option<String>,
        /// Media line index.
        #[serde(default, rename = "sdpMLineIndex")]
        sdp_m_line_index: Option<u16>,
        /// ICE username fragment.
        #[serde(default, rename = "usernameFragment")]
        username_fragment: Option<String>,
    },
    /// Ask the other side to send an offer (used by the side that must not offer first).
    Request,
    /// Tear down the WebRTC connection (the peer stays reachable over the relay).
    Bye {
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Longest SDP accepted by the server.
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Longest candidate line accepted by the server.
pub const MAX_CANDIDATE_LEN: usize = 1024;

impl Signal {
    /// Checks the shape of a signal (the server runs this before relaying).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Signal::Offer { sdp } | Signal::Answer { sdp } => {
                if sdp.len() > MAX_SDP_LEN {
                    return Err(format!("sdp longer than {MAX_SDP_LEN} bytes"));
                }
                if !sdp.starts_with("v=0") {
                    return Err("sdp must start with \"v=0\"".into());
                }
                if !sdp.contains("\nm=") {
                    return Err("sdp has no media section".into());
                }
                Ok(())
            }
            Signal::Candidate { candidate, .. } => {
                if candidate.len() > MAX_CANDIDATE_LEN {
                    return Err("candidate too long".into());
                }
                if !(candidate.is_empty()
                    || candidate.starts_with("candidate:")
                    || candidate.starts_with("a=candidate:"))
                {
                    return Err("candidate must start with \"candidate:\"".into());
                }
                Ok(())
            }
            Signal::Request | Signal::Bye { .. } => Ok(()),
        }
    }
}

/// Server → client `p2p:sig`: a signal from another peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalFrom {
    /// Sender id (set by the server).
    pub from: String,
    /// The signal.
    pub signal: Signal,
}

/// Reply to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// This peer's server-assigned id.
    pub id: String,
    /// The uid it holds, if any.
    #[serde(default)]
    pub uid: Option<String>,
    /// The other peers of each room joined.
    #[serde(default)]
    pub rooms: Vec<RoomPeers>,
    /// Largest frame the server relays, in bytes.
    pub max_frame: usize,
    /// Secret that lets this peer take its id back after a reconnection.
    #[serde(default)]
    pub token: String,
    /// True when a resume was granted and no peer was told that this one had left (the
    /// server restarted, or never saw it go): per-peer delivery state carries on. False
    /// after a resume of an id whose departure was announced: start afresh.
    #[serde(default)]
    pub continued: bool,
    /// STUN/TURN servers the server hands out (with short-lived TURN credentials), to use
    /// beside the peer's own. Absent when the server gives none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServerInfo>,
}

/// One ICE server in a [`Welcome`] (the shape of WebRTC's `RTCIceServer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServerInfo {
    /// URLs, e.g. `turn:turn.example.org:3478?transport=udp`.
    pub urls: Vec<String>,
    /// TURN username (coturn REST scheme: `<expiry unix time>:<peer>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The peers of one room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomPeers {
    /// Room name.
    pub room: String,
    /// Peers in it, without the receiver, sorted by id. In a `Welcome`, at most the
    /// server's `welcome_members` of them: the first ones.
    pub peers: Vec<PeerInfo>,
    /// The room has more members than listed: ask for them with `members` pages, starting
    /// after the last id listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Reply to `members`: one page of a room's other members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembersPage {
    /// Members, sorted by id, all after the request's `after`.
    pub peers: Vec<PeerInfo>,
    /// More members follow the last one of this page.
    #[serde(default)]
    pub more: bool,
}

/// Server → client `p2p:res`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request id answered.
    pub rid: u64,
    /// Result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    /// Error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Presence change, server → client `p2p:presence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Presence {
    /// A peer joined a room the receiver is in.
    Joined {
        /// Room.
        room: String,
        /// Who.
        peer: PeerInfo,
    },
    /// A peer left a room the receiver is in (it may still be connected).
    Left {
        /// Room.
        room: String,
        /// Who.
        peer: PeerInfo,
    },
    /// The receiver was paired with `peer` (both sides get this).
    Paired {
        /// Who.
        peer: PeerInfo,
    },
    /// A peer sharing a room or a pair with the receiver disconnected from the server.
    Disconnected {
        /// Who.
        peer: PeerInfo,
    },
}

/// Typed error codes. Serialized as their name, e.g. `"UidTaken"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The message did not have the expected shape or types.
    BadRequest,
    /// `hello` was not sent first.
    NotRegistered,
    /// `hello` was sent twice.
    AlreadyRegistered,
    /// The uid is held by another connected peer.
    UidTaken,
    /// The target peer is not connected, or shares no room or pair with the sender.
    UnknownPeer,
    /// The peer did not show up in time (pairing).
    PeerOffline,
    /// The sender is not in that room.
    UnknownRoom,
    /// Larger than the server accepts.
    PayloadTooLarge,
    /// The target's buffer is full: the frame was dropped, send it again later.
    Busy,
    /// Too many requests per second.
    RateLimited,
    /// Refused by the server's auth hook.
    Unauthorized,
    /// The Socket.IO event is not part of the protocol.
    UnknownEvent,
    /// A WebRTC signal failed validation.
    BadSignal,
    /// The protocol versions do not match.
    Unsupported,
    /// Another provider already provides that service.
    ServiceTaken,
    /// Nobody provides that service.
    NoSuchService,
    /// The provider went away (or stopped providing) before it answered.
    ServiceGone,
    /// The provider did not answer in time.
    Timeout,
    /// The server's authorization hook refused this action (the message says why).
    Forbidden,
    /// Messages for this peer were dropped while it was away (reconnecting): more than the
    /// server holds for an away peer. Presence may have been missed.
    Dropped,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// An error as carried on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable text.
    pub message: String,
}

/// Server → client `p2p:error`: an error not tied to a request (bad frame, unknown event, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// What went wrong.
    #[serde(flatten)]
    pub error: ErrorBody,
    /// The Socket.IO event that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// For frames: their target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// For data frames: their sequence number (so the sender can resend from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r = Request {
            rid: 3,
            op: Op::Join {
                room: "lobby".into(),
            },
        };
        let v = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"rid": 3, "op": "join", "room": "lobby"})
        );
        let sig: Request = serde_json::from_value(serde_json::json!({
            "rid": 1, "op": "signal", "to": "abc",
            "signal": {"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
        }))
        .map_err(|e| e.to_string())
        .unwrap_or(Request { rid: 0, op: Op::Leave { room: String::new() } });
        assert_eq!(sig.rid, 1);
        assert!(matches!(sig.op, Op::Signal { .. }));
    }

    #[test]
    fn validates_signals() {
        assert!(
            Signal::Offer {
                sdp: "garbage".into()
            }
            .validate()
            .is_err()
        );
        assert!(Signal::Offer { sdp: "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n".into() }.validate().is_ok());
        assert!(
            Signal::Candidate {
                candidate: "hello".into(),
                sdp_mid: None,
                sdp_m_line_index: None,
                username_fragment: None
            }
            .validate()
            .is_err()
        );
    }
}

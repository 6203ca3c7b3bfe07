//! Errors of the peer crate.
use std::sync::Arc;

use socketio_p2p_signaling::protocol::ErrorCode;

/// Everything that can go wrong for a [`crate::P2p`] call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No answer within the configured time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer is not connected (or left every room shared with us, or disconnected while
    /// we were waiting for it).
    #[error("peer offline: {0}")]
    PeerOffline(String),
    /// The server's authorization hook refused this action (join, pair, provide,
    /// subscribe or publish); the text is its reason.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The uid is held by another connected peer.
    #[error("uid taken: {0}")]
    UidTaken(String),
    /// The server refused the connection or request (auth hook, rate limit, bad request...).
    #[error("rejected by the server ({code}): {message}")]
    Rejected {
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The remote peer answered an ack request with an error (no handler, handler dropped
    /// the request without replying, payload too large...).
    #[error("remote error ({code}): {message}")]
    Remote {
        /// Machine-readable code sent by the remote peer.
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// The payload is larger than `max_message_size`.
    #[error("payload of {size} bytes is larger than the limit of {max}")]
    PayloadTooLarge {
        /// Size of the payload.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A payload could not be (de)serialized as the requested type.
    #[error("serialization: {0}")]
    Serde(#[source] Cause),
    /// The Socket.IO connection could not be made or failed.
    #[error("connection: {0}")]
    Connection(#[source] Cause),
    /// The [`crate::P2p`] is closed (its actor stopped).
    #[error("closed")]
    Closed,
    /// WebRTC could not be set up with this peer (the relay keeps working).
    #[error("webrtc: {0}")]
    WebRtc(String),
    /// Another peer (or the server) already provides that service.
    #[error("service taken: {0}")]
    ServiceTaken(String),
    /// Nobody provides that service.
    #[error("no such service: {0}")]
    NoSuchService(String),
    /// The service's provider went away (or stopped providing it) before it answered.
    #[error("service gone: {0}")]
    ServiceGone(String),
    /// The peer refused (or could not take) the stream.
    #[error("stream refused ({code}): {message}")]
    StreamRefused {
        /// Machine-readable code: `Refused` (the application said no), `Busy` (too many
        /// streams waiting to be accepted), `Dropped`...
        code: String,
        /// The peer's explanation.
        message: String,
    },
    /// A wait was bounded by the reconnect queue, a window or a limit and the bound was hit.
    #[error("queue full: {0}")]
    QueueFull(String),
}

impl Error {
    pub(crate) fn from_server(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::UidTaken => Error::UidTaken(message),
            ErrorCode::PeerOffline | ErrorCode::UnknownPeer => Error::PeerOffline(message),
            ErrorCode::ServiceTaken => Error::ServiceTaken(message),
            ErrorCode::NoSuchService => Error::NoSuchService(message),
            ErrorCode::ServiceGone => Error::ServiceGone(message),
            ErrorCode::Timeout => Error::Timeout(message),
            ErrorCode::Forbidden => Error::Forbidden(message),
            code => Error::Rejected { code, message },
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cause of an [`Error`]: the underlying error, kept as a source (cheap to clone;
/// two causes are equal when they read the same).
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// Keeps `e` as the cause.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }

    /// A cause that is only a message.
    pub fn msg(text: impl Into<String>) -> Self {
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Message(String);
        Cause::new(Message(text.into()))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serde(Cause::new(e))
    }
}

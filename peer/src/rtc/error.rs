//! Errors of link operations and their mapping from webrtc-rs errors.

use super::MAX_FRAME_SIZE;
#[cfg(doc)]
use super::RtcLink;

/// Errors of [`RtcLink`] operations.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RtcError {
    /// Any other error reported by webrtc-rs.
    #[error("webrtc: {0}")]
    Webrtc(String),
    /// The SDP could not be parsed or applied.
    #[error("bad SDP: {0}")]
    BadSdp(String),
    /// The remote ICE candidate could not be parsed or applied.
    #[error("bad ICE candidate: {0}")]
    BadCandidate(String),
    /// The operation is not allowed in the current signaling state
    /// (e.g. an answer without a pending offer, rollback in stable state).
    #[error("invalid signaling state: {0}")]
    InvalidState(String),
    /// The frame is larger than [`MAX_FRAME_SIZE`] (or the negotiated SCTP limit).
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Size of the rejected frame.
        len: usize,
        /// Largest frame allowed.
        max: usize,
    },
    /// The data channel is not open (yet, or any more).
    #[error("data channel not open")]
    NotOpen,
    /// The link was closed.
    #[error("connection closed")]
    Closed,
}

/// Maps a webrtc-rs error to an [`RtcError`], `other` choosing the category of
/// errors that are not about the connection/signaling state.
pub(super) fn map_err(e: webrtc::Error, other: fn(String) -> RtcError) -> RtcError {
    use webrtc::Error as E;
    match e {
        E::ErrConnectionClosed => RtcError::Closed,
        E::ErrClosedPipe => RtcError::NotOpen,
        E::ErrIncorrectSignalingState
        | E::ErrSignalingStateCannotRollback
        | E::ErrSignalingStateProposedTransitionInvalid { .. }
        | E::ErrNoRemoteDescription => RtcError::InvalidState(e.to_string()),
        E::Sctp(webrtc::sctp::Error::ErrOutboundPacketTooLarge)
        | E::Data(webrtc::data::Error::Sctp(webrtc::sctp::Error::ErrOutboundPacketTooLarge)) => {
            RtcError::TooLarge {
                len: 0,
                max: MAX_FRAME_SIZE,
            }
        }
        other_err => other(other_err.to_string()),
    }
}

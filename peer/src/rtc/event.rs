//! What a link reports to its owner, and the trickled-candidate shape shared
//! with the signaling layer.

use bytes::Bytes;

#[cfg(doc)]
use super::RtcLink;

/// A trickled ICE candidate, as in the browser's RTCIceCandidateInit
/// (camelCase JSON: candidate, sdpMid, sdpMLineIndex, usernameFragment).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CandidateInit {
    /// `candidate:...` attribute value; empty means end of candidates.
    pub candidate: String,
    /// Media stream id of the m-line the candidate belongs to.
    pub sdp_mid: Option<String>,
    /// Index of the m-line the candidate belongs to.
    pub sdp_m_line_index: Option<u16>,
    /// ICE username fragment of the generation the candidate belongs to.
    pub username_fragment: Option<String>,
}

/// What a link reports to its owner (delivered on the tokio mpsc::UnboundedSender
/// given at creation, tagged with the link's `key: u64`).
#[derive(Debug)]
pub(crate) enum RtcEvent {
    /// A local ICE candidate to send to the remote (only when trickle is on). None = end of candidates.
    LocalCandidate(Option<CandidateInit>),
    /// The reliable data channel is open in both directions: frames can be sent.
    Open,
    /// A message arrived on the reliable (ordered) channel.
    Message(Bytes),
    /// A message arrived on the unreliable channel (unordered, maxRetransmits 0).
    VolatileMessage(Bytes),
    /// The connection is gone (ICE failed/disconnected/closed, DTLS/SCTP closed,
    /// channel closed). Reported at most once, never after the owner called
    /// [`RtcLink::close`]; reason is human readable.
    Closed(String),
}

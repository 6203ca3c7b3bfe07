//! SDP and ICE candidate helpers.

use webrtc::ice::candidate::candidate_base::unmarshal_candidate;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;

use super::{CandidateInit, RtcError};

/// Value of the first `name` attribute line (e.g. `"a=mid:"`) of an SDP, trimmed.
pub(super) fn sdp_attr(sdp: &str, name: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
}

/// Validates a remote trickled candidate and turns it into what webrtc-rs takes.
///
/// The value may come with or without an `a=` / `candidate:` prefix. An empty
/// candidate (end of candidates) gives `Ok(None)`; a bad one `BadCandidate`.
pub(super) fn parse_remote_candidate(
    c: CandidateInit,
) -> Result<Option<RTCIceCandidateInit>, RtcError> {
    let value = c.candidate.trim();
    let value = value.strip_prefix("a=").unwrap_or(value);
    let value = value.strip_prefix("candidate:").unwrap_or(value);
    if value.is_empty() {
        return Ok(None);
    }
    unmarshal_candidate(value).map_err(|e| RtcError::BadCandidate(e.to_string()))?;
    Ok(Some(RTCIceCandidateInit {
        candidate: format!("candidate:{value}"),
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_m_line_index,
        username_fragment: c.username_fragment,
    }))
}

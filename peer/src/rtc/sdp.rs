//! SDP and ICE candidate helpers.

use webrtc::ice::candidate::Candidate;
use webrtc::ice::candidate::candidate_base::unmarshal_candidate;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;

use super::{CandidateInit, RtcError};

/// Value of the first `name` attribute line (e.g. `"a=mid:"`) of an SDP, trimmed.
pub(super) fn sdp_attr(sdp: &str, name: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
}

/// Where a candidate the peer signaled is (address, port) and what kind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Signaled {
    pub(super) address: String,
    pub(super) port: u16,
    pub(super) typ: RTCIceCandidateType,
}

impl Signaled {
    fn of(c: &impl Candidate) -> Self {
        Self {
            address: c.address(),
            port: c.port(),
            typ: c.candidate_type().into(),
        }
    }
}

/// The candidate value without its `a=` / `candidate:` prefixes.
fn candidate_value(line: &str) -> &str {
    let value = line.trim();
    let value = value.strip_prefix("a=").unwrap_or(value);
    value.strip_prefix("candidate:").unwrap_or(value)
}

/// Validates a remote trickled candidate and turns it into what webrtc-rs takes, with
/// where it is.
///
/// The value may come with or without an `a=` / `candidate:` prefix. An empty
/// candidate (end of candidates) gives `Ok(None)`; a bad one `BadCandidate`.
pub(super) fn parse_remote_candidate(
    c: CandidateInit,
) -> Result<Option<(RTCIceCandidateInit, Signaled)>, RtcError> {
    let value = candidate_value(&c.candidate);
    if value.is_empty() {
        return Ok(None);
    }
    let parsed = unmarshal_candidate(value).map_err(|e| RtcError::BadCandidate(e.to_string()))?;
    let init = RTCIceCandidateInit {
        candidate: format!("candidate:{value}"),
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_m_line_index,
        username_fragment: c.username_fragment,
    };
    Ok(Some((init, Signaled::of(&parsed))))
}

/// The candidates an SDP lists (`a=candidate:` lines); lines that do not parse are
/// skipped (webrtc-rs judges the SDP itself).
pub(super) fn sdp_candidates(sdp: &str) -> impl Iterator<Item = Signaled> + '_ {
    sdp.lines()
        .filter(|l| l.trim_start().starts_with("a=candidate:"))
        .filter_map(|l| unmarshal_candidate(candidate_value(l)).ok())
        .map(|c| Signaled::of(&c))
}

/// The kind of the remote end of a selected pair. webrtc-rs keeps the type
/// peer-reflexive for a remote it heard from (a connectivity check) before the peer's
/// candidate for the same address arrived by trickle, and never updates it: when a signaled
/// candidate has that address, its type is the real one.
pub(super) fn remote_kind(
    typ: RTCIceCandidateType,
    address: &str,
    port: u16,
    signaled: &[Signaled],
) -> RTCIceCandidateType {
    if typ != RTCIceCandidateType::Prflx {
        return typ;
    }
    signaled
        .iter()
        .find(|s| s.address == address && s.port == port)
        .map_or(typ, |s| s.typ)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host";

    #[test]
    fn a_peer_reflexive_remote_takes_the_type_the_peer_signaled() {
        let sdp = format!("v=0\r\na=mid:0\r\na={HOST}\r\na=candidate:garbage\r\n");
        let signaled: Vec<_> = sdp_candidates(&sdp).collect();
        assert_eq!(signaled.len(), 1);
        assert_eq!(
            (
                signaled[0].address.as_str(),
                signaled[0].port,
                signaled[0].typ
            ),
            ("127.0.0.1", 50000, RTCIceCandidateType::Host)
        );
        let prflx = RTCIceCandidateType::Prflx;
        assert_eq!(
            remote_kind(prflx, "127.0.0.1", 50000, &signaled),
            RTCIceCandidateType::Host
        );
        // Another port, or a remote nobody signaled: peer-reflexive it is.
        assert_eq!(remote_kind(prflx, "127.0.0.1", 50001, &signaled), prflx);
        assert_eq!(remote_kind(prflx, "127.0.0.1", 50000, &[]), prflx);
        // A type webrtc-rs knows already is kept.
        let relay = RTCIceCandidateType::Relay;
        assert_eq!(remote_kind(relay, "127.0.0.1", 50000, &signaled), relay);
    }

    #[test]
    fn a_trickled_candidate_says_where_it_is() -> Result<(), RtcError> {
        let c = CandidateInit {
            candidate: format!("a={HOST}"),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
            username_fragment: None,
        };
        let (init, at) = parse_remote_candidate(c)?.ok_or(RtcError::Closed)?;
        assert_eq!(init.candidate, HOST);
        assert_eq!((at.port, at.typ), (50000, RTCIceCandidateType::Host));
        Ok(())
    }
}

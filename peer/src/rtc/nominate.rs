//! Prompt nomination when we are the ICE controlling side (the offerer).
//!
//! webrtc-ice 0.17's controlling agent nominates a candidate pair only during a "contact":
//! its periodic check round, every 200 ms (`check_interval`, which webrtc 0.17 gives no way
//! to set), or one forced by a new candidate. The first round pings every pair; the answer to
//! that ping makes the pair valid, but the nomination waits for the next round. Against a
//! browser, whose answer and candidates arrive after our first round, an upgrade therefore
//! took about 20 ms or about 220 ms depending on where the tick fell.
//!
//! The agent forces a round whenever a remote candidate is added, even one that pairs with
//! nothing. So after the answer is applied we add, on a short doubling schedule and only
//! while ICE is still checking, a remote TCP candidate on a discard address: we gather no TCP
//! candidate, so it forms no pair and no packet is ever sent to it; its only effect is the
//! extra round, in which a pair that became valid is nominated at once.

use std::sync::Weak;
use std::time::Duration;

use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_connection_state::RTCIceConnectionState;
use webrtc::peer_connection::RTCPeerConnection;

/// Delays between rounds: every 2 ms for the first 10 ms after the answer (a loopback or LAN
/// round trip), then doubling up to the agent's own 200 ms tick. Ten rounds at most.
const KICKS: [Duration; 10] = [
    Duration::from_millis(2),
    Duration::from_millis(2),
    Duration::from_millis(2),
    Duration::from_millis(2),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
];

/// A remote candidate that pairs with nothing (TCP, while we gather only UDP), distinct for
/// each `n` (the agent ignores a candidate equal to one it has).
fn pairless_candidate(n: u16) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate: format!(
            "candidate:{} 1 tcp 1 0.0.0.0 {} typ host tcptype passive",
            9000 + n,
            9 + n
        ),
        sdp_mid: None,
        sdp_mline_index: Some(0),
        username_fragment: None,
    }
}

/// Starts the rounds for `pc` (just given the remote answer) once `started` resolves (our
/// ICE transport left `new`: a nomination before that can keep DTLS from ever starting, see
/// `Shared::ice_started`). Ends early when ICE is no longer checking, or when the
/// connection is gone.
pub(super) fn spawn_kicks(
    pc: Weak<RTCPeerConnection>,
    key: u64,
    started: impl Future<Output = bool> + Send + 'static,
) {
    tokio::spawn(async move {
        if !started.await {
            tracing::debug!(key, "ICE not started; no nomination rounds");
            return;
        }
        for (n, wait) in (0u16..).zip(KICKS) {
            tokio::time::sleep(wait).await;
            let Some(pc) = pc.upgrade() else { return };
            match pc.ice_connection_state() {
                RTCIceConnectionState::New | RTCIceConnectionState::Checking => {}
                _ => return,
            }
            if let Err(e) = pc.add_ice_candidate(pairless_candidate(n)).await {
                tracing::debug!(key, error = %e, "nomination round not forced");
                return;
            }
        }
    });
}

//! Creation of the underlying `RTCPeerConnection` and its connection-level callbacks.

use std::sync::{Arc, Weak};

use webrtc::data_channel::RTCDataChannel;
use webrtc::ice_transport::ice_candidate::RTCIceCandidate;
use webrtc::ice_transport::ice_connection_state::RTCIceConnectionState;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;

use super::RtcConfig;
use super::channel::adopt_remote_channel;
use super::config::{IceTimeouts, build_api, ice_servers};
use super::error::{RtcError, map_err};
use super::shared::Shared;
use super::turn_tcp::TcpTurnBridge;

/// Creates a peer connection whose callbacks only reach the link state through `weak`,
/// with the TURN/TCP bridges it needs (keep them as long as the connection).
pub(super) async fn new_peer_connection(
    cfg: &RtcConfig,
    timeouts: IceTimeouts,
    weak: &Weak<Shared>,
) -> Result<(Arc<RTCPeerConnection>, Vec<TcpTurnBridge>), RtcError> {
    let api = build_api(cfg, timeouts);
    let (ice_servers, bridges) = ice_servers(cfg).await;
    let pc = api
        .new_peer_connection(RTCConfiguration {
            ice_servers,
            ..Default::default()
        })
        .await
        .map_err(|e| map_err(e, RtcError::Webrtc))?;

    let w = weak.clone();
    pc.on_ice_candidate(Box::new(move |c: Option<RTCIceCandidate>| {
        if let Some(sh) = w.upgrade() {
            sh.emit_local_candidate(c);
        }
        Box::pin(async {})
    }));

    let w = weak.clone();
    pc.on_ice_connection_state_change(Box::new(move |s: RTCIceConnectionState| {
        if let Some(sh) = w.upgrade() {
            if s != RTCIceConnectionState::New && s != RTCIceConnectionState::Unspecified {
                sh.mark_ice_started();
            }
            // Reported before the peer connection state follows, so the reason says ICE.
            if s == RTCIceConnectionState::Failed {
                sh.report_closed(crate::core::negotiate::ICE_FAILED.to_owned());
            }
        }
        Box::pin(async {})
    }));

    let w = weak.clone();
    pc.on_peer_connection_state_change(Box::new(move |s: RTCPeerConnectionState| {
        if let Some(sh) = w.upgrade() {
            on_state_change(&sh, s);
        }
        Box::pin(async {})
    }));

    let w = weak.clone();
    pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        // Runs before webrtc-rs starts the channel's read loop, so the
        // callbacks registered here see every message.
        if let Some(sh) = w.upgrade() {
            adopt_remote_channel(&sh, dc, &w);
        }
        Box::pin(async {})
    }));
    Ok((Arc::new(pc), bridges))
}

/// Reports `Closed` when the peer connection failed, disconnected or closed.
fn on_state_change(sh: &Shared, s: RTCPeerConnectionState) {
    tracing::debug!(key = sh.key, state = %s, "peer connection state");
    match s {
        RTCPeerConnectionState::Failed
        | RTCPeerConnectionState::Disconnected
        | RTCPeerConnectionState::Closed => {
            sh.report_closed(format!("peer connection {s}"));
        }
        _ => {}
    }
}

//! The WebRTC carrier of a build without the `webrtc` feature: every offer and answer
//! fails at once, so upgrades end as `UpgradeFailed` and every peer stays on the relay.
use tokio::sync::mpsc;

use crate::core::{RtcOp, RtcReport};

/// No configuration: there is no WebRTC stack.
#[derive(Debug, Clone)]
pub(crate) struct RtcConfig;

/// Nothing is ever reported by connections that never exist.
#[derive(Debug)]
pub(crate) enum RtcEvent {}

/// No settings to take from the options.
pub(crate) fn config_of(_opts: &crate::options::P2pOptions) -> RtcConfig {
    RtcConfig
}

/// Reports of the carrier: (connection key, report).
pub(crate) type Reports = mpsc::UnboundedSender<(u64, RtcReport)>;

/// No peer connection is ever alive.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) fn live_links() -> usize {
    0
}

pub(crate) struct WebRtc {
    reports: Reports,
}

impl WebRtc {
    pub(crate) fn new(
        _cfg: RtcConfig,
        reports: Reports,
        _events: mpsc::UnboundedSender<(u64, RtcEvent)>,
        _hang: std::time::Duration,
    ) -> Self {
        Self { reports }
    }

    pub(crate) fn apply(&mut self, key: u64, op: RtcOp) {
        if matches!(op, RtcOp::Offer | RtcOp::Accept(_)) {
            let why = "this peer was built without WebRTC (the `webrtc` feature)".to_owned();
            let _ = self.reports.send((key, RtcReport::Failed(why)));
        }
    }

    pub(crate) fn close_all(&mut self) {}

    pub(crate) fn set_server_ice(
        &mut self,
        _servers: Vec<socketio_p2p_signaling::protocol::IceServerInfo>,
    ) {
    }
}

pub(crate) fn report_of(ev: RtcEvent) -> Option<RtcReport> {
    match ev {}
}

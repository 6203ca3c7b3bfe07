//! Data-channel handling: wiring our two channels' callbacks to the link state,
//! adopting the remote's channels, and silencing everything on close.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::peer_connection::RTCPeerConnection;

use super::shared::Shared;
use super::{RELIABLE_LABEL, VOLATILE_LABEL, lock};

/// Registers the message/open/close callbacks of one of our data channels.
pub(super) fn wire_channel(dc: &Arc<RTCDataChannel>, reliable: bool, weak: &Weak<Shared>) {
    if reliable {
        let w = weak.clone();
        dc.on_open(Box::new(move || {
            if let Some(sh) = w.upgrade() {
                sh.emit_open();
            }
            Box::pin(async {})
        }));
        let w = weak.clone();
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            if let Some(sh) = w.upgrade() {
                sh.emit_message(msg.data);
            }
            Box::pin(async {})
        }));
        let w = weak.clone();
        dc.on_close(Box::new(move || {
            if let Some(sh) = w.upgrade() {
                sh.report_closed("reliable data channel closed".to_owned());
            }
            Box::pin(async {})
        }));
    } else {
        let w = weak.clone();
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            if let Some(sh) = w.upgrade() {
                sh.emit_volatile(msg.data);
            }
            Box::pin(async {})
        }));
    }
}

/// Replaces every callback of a data channel with a no-op.
pub(super) fn unwire_channel(dc: &RTCDataChannel) {
    dc.on_open(Box::new(|| Box::pin(async {})));
    dc.on_message(Box::new(|_| Box::pin(async {})));
    dc.on_close(Box::new(|| Box::pin(async {})));
    dc.on_error(Box::new(|_| Box::pin(async {})));
}

/// Replaces every callback of the peer connection (and our channels) with a no-op,
/// so that nothing inside webrtc-rs references the link state or the event sender.
pub(super) fn unwire_all(pc: &RTCPeerConnection, shared: &Shared) {
    pc.on_ice_candidate(Box::new(|_| Box::pin(async {})));
    pc.on_peer_connection_state_change(Box::new(|_| Box::pin(async {})));
    pc.on_data_channel(Box::new(|_| Box::pin(async {})));
    for slot in [&shared.reliable, &shared.volatile] {
        if let Some(dc) = lock(slot).as_ref() {
            unwire_channel(dc);
        }
    }
}

/// Takes over a data channel opened by the remote (`on_data_channel`): ours are
/// wired and stored (replacing, and silencing, any previous one), others ignored.
pub(super) fn adopt_remote_channel(sh: &Shared, dc: Arc<RTCDataChannel>, weak: &Weak<Shared>) {
    let reliable = match dc.label() {
        RELIABLE_LABEL => Some(true),
        VOLATILE_LABEL => Some(false),
        _ => None,
    };
    match reliable {
        Some(reliable) if !sh.owner_closed.load(Ordering::SeqCst) => {
            tracing::debug!(key = sh.key, label = dc.label(), "remote data channel");
            wire_channel(&dc, reliable, weak);
            let slot = if reliable { &sh.reliable } else { &sh.volatile };
            if let Some(old) = lock(slot).replace(dc) {
                unwire_channel(&old);
            }
        }
        _ => {
            tracing::warn!(
                key = sh.key,
                label = dc.label(),
                "unexpected data channel ignored"
            );
        }
    }
}

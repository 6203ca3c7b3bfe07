//! Link state shared between the [`super::RtcLink`] and (weakly) the webrtc
//! callbacks, and the event gate that orders what is reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_state::RTCDataChannelState;
use webrtc::ice_transport::ice_candidate::RTCIceCandidate;

use super::sdp::sdp_attr;
use super::{CandidateInit, LIVE_LINKS, RtcEvent, lock};

/// Decrements [`LIVE_LINKS`] when dropped.
struct LiveGuard;

impl LiveGuard {
    fn new() -> Self {
        LIVE_LINKS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        LIVE_LINKS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Event gate: orders `Open` before messages, nothing after `Closed` or after
/// the owner closed the link (checked under the same lock as the send).
#[derive(Default)]
struct Gate {
    opened: bool,
    closed: bool,
    owner_closed: bool,
}

impl Gate {
    /// True if nothing may be reported any more.
    pub(super) fn silenced(&self) -> bool {
        self.closed || self.owner_closed
    }
}

/// State shared between the link and (weakly) the webrtc callbacks.
pub(super) struct Shared {
    pub(super) key: u64,
    pub(super) trickle: bool,
    events: UnboundedSender<(u64, RtcEvent)>,
    gate: StdMutex<Gate>,
    /// Set once the owner called `close()` (or dropped the link): report nothing more.
    pub(super) owner_closed: AtomicBool,
    pub(super) reliable: StdMutex<Option<Arc<RTCDataChannel>>>,
    pub(super) volatile: StdMutex<Option<Arc<RTCDataChannel>>>,
    /// `a=mid:` and `a=ice-ufrag:` of our local description, for trickled candidates.
    local_mid: StdMutex<Option<String>>,
    local_ufrag: StdMutex<Option<String>>,
    /// Set once our ICE transport has left `new` (its state is stored before the peer
    /// connection's handler runs, which is what sets this).
    ice_started: tokio::sync::watch::Sender<bool>,
    _live: LiveGuard,
}

impl Shared {
    /// Fresh state for link `key` (counted in [`super::live_links`] while alive).
    pub(super) fn new(key: u64, trickle: bool, events: UnboundedSender<(u64, RtcEvent)>) -> Self {
        Self {
            key,
            trickle,
            events,
            gate: StdMutex::new(Gate::default()),
            owner_closed: AtomicBool::new(false),
            reliable: StdMutex::new(None),
            volatile: StdMutex::new(None),
            local_mid: StdMutex::new(None),
            local_ufrag: StdMutex::new(None),
            ice_started: tokio::sync::watch::Sender::new(false),
            _live: LiveGuard::new(),
        }
    }

    /// Our ICE transport left `new` (checking, connected, ...).
    pub(super) fn mark_ice_started(&self) {
        self.ice_started.send_replace(true);
    }

    /// Something that resolves once our ICE transport has left `new`, or after `within`.
    ///
    /// webrtc 0.17 starts DTLS as soon as ICE connects, and refuses to (for good: the
    /// connection never opens) while the ICE transport's state still reads `new`. That state
    /// is stored by a task of the ICE agent, and a peer nominated at once (our own
    /// nomination rounds, or a browser) can connect the agent before that task has run. So
    /// an answer is sent, and our nomination rounds start, only once the state has moved.
    pub(super) fn ice_started(&self, within: Duration) -> impl Future<Output = bool> + use<> {
        let mut rx = self.ice_started.subscribe();
        async move {
            tokio::time::timeout(within, rx.wait_for(|started| *started))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    }

    /// The owner closed (or dropped) the link: report nothing from now on.
    pub(super) fn silence(&self) {
        self.owner_closed.store(true, Ordering::SeqCst);
        lock(&self.gate).owner_closed = true;
    }

    fn send(&self, ev: RtcEvent) {
        // The owner may have dropped the receiver: nothing to do then.
        let _ = self.events.send((self.key, ev));
    }

    /// Reports `Open` once, if the reliable channel is open.
    pub(super) fn emit_open(&self) {
        if self.owner_closed.load(Ordering::SeqCst) {
            return;
        }
        let mut gate = lock(&self.gate);
        if gate.opened || gate.silenced() {
            return;
        }
        gate.opened = true;
        tracing::debug!(key = self.key, "data channel open");
        self.send(RtcEvent::Open);
    }

    /// Reports a message on the reliable channel (reporting `Open` first if needed:
    /// webrtc-rs runs the channel read loop and the on_open callback concurrently).
    pub(super) fn emit_message(&self, data: Bytes) {
        if self.owner_closed.load(Ordering::SeqCst) {
            return;
        }
        let mut gate = lock(&self.gate);
        if gate.silenced() {
            return;
        }
        if !gate.opened {
            gate.opened = true;
            tracing::debug!(key = self.key, "data channel open (first message)");
            self.send(RtcEvent::Open);
        }
        self.send(RtcEvent::Message(data));
    }

    /// Reports a volatile message; dropped if the reliable channel is not open yet.
    pub(super) fn emit_volatile(&self, data: Bytes) {
        if self.owner_closed.load(Ordering::SeqCst) {
            return;
        }
        let reliable_open = lock(&self.reliable)
            .as_ref()
            .is_some_and(|dc| dc.ready_state() == RTCDataChannelState::Open);
        let mut gate = lock(&self.gate);
        if gate.silenced() {
            return;
        }
        if !gate.opened {
            if !reliable_open {
                tracing::debug!(key = self.key, "volatile message before open: dropped");
                return;
            }
            gate.opened = true;
            self.send(RtcEvent::Open);
        }
        self.send(RtcEvent::VolatileMessage(data));
    }

    /// Reports `Closed(reason)` once, unless the owner closed the link.
    pub(super) fn report_closed(&self, reason: String) {
        if self.owner_closed.load(Ordering::SeqCst) {
            return;
        }
        let mut gate = lock(&self.gate);
        if gate.silenced() {
            return;
        }
        gate.closed = true;
        tracing::debug!(key = self.key, %reason, "link closed");
        self.send(RtcEvent::Closed(reason));
    }

    pub(super) fn emit_local_candidate(&self, c: Option<RTCIceCandidate>) {
        if !self.trickle || self.owner_closed.load(Ordering::SeqCst) {
            return;
        }
        let init = match c {
            None => None,
            Some(c) => match c.to_json() {
                Ok(j) => Some(CandidateInit {
                    candidate: j.candidate,
                    sdp_mid: lock(&self.local_mid).clone(),
                    sdp_m_line_index: Some(0),
                    username_fragment: lock(&self.local_ufrag).clone(),
                }),
                Err(e) => {
                    tracing::warn!(key = self.key, error = %e, "cannot serialize local candidate");
                    return;
                }
            },
        };
        let gate = lock(&self.gate);
        if !gate.silenced() {
            self.send(RtcEvent::LocalCandidate(init));
        }
    }

    /// Remembers mid and ufrag of our local SDP for trickled candidates.
    pub(super) fn record_local_sdp(&self, sdp: &str) {
        *lock(&self.local_mid) = sdp_attr(sdp, "a=mid:");
        *lock(&self.local_ufrag) = sdp_attr(sdp, "a=ice-ufrag:");
    }
}

//! [`RtcLink`]: one peer connection with its two data channels, and the
//! offer/answer, candidate, send and close operations on it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::sync::mpsc::UnboundedSender;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::data_channel::data_channel_state::RTCDataChannelState;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_protocol::RTCIceProtocol;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::sdp::sdp_type::RTCSdpType;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

use super::channel::{unwire_all, wire_channel};
use super::config::{IceTimeouts, OUR_ICE_TIMEOUTS};
use super::error::map_err;
use super::nominate::spawn_kicks;
use super::peer::new_peer_connection;
use super::sdp::{Signaled, parse_remote_candidate, remote_kind, sdp_candidates};
use super::shared::Shared;
use super::turn_tcp::TcpTurnBridge;
use super::{
    CandidateInit, GATHER_TIMEOUT, MAX_FRAME_SIZE, MAX_PENDING_CANDIDATES, RELIABLE_LABEL,
    RtcConfig, RtcError, RtcEvent, VOLATILE_LABEL, lock,
};

/// How long an answer (or our nomination rounds) may wait for our ICE transport to start.
const ICE_START_WAIT: Duration = Duration::from_secs(1);

/// Remote-description state and candidates received before it was set.
#[derive(Default)]
struct RemoteState {
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    /// Every candidate the peer signaled (in its SDP or trickled), at most
    /// `MAX_PENDING_CANDIDATES`: what the selected pair's remote really is.
    signaled: Vec<Signaled>,
}

impl RemoteState {
    fn remember(&mut self, s: Signaled) {
        if self.signaled.len() < MAX_PENDING_CANDIDATES {
            self.signaled.push(s);
        }
    }
}

/// One peer connection with its two data channels.
pub(crate) struct RtcLink {
    /// Current peer connection (replaced by [`RtcLink::rollback`]).
    pc: StdMutex<Arc<RTCPeerConnection>>,
    shared: Arc<Shared>,
    // Only used by `rollback`, which the negotiation does not need between our own peers
    // (roles prevent glare) but which is kept, tested, for foreign clients.
    #[allow(dead_code)]
    cfg: RtcConfig,
    #[allow(dead_code)]
    timeouts: IceTimeouts,
    /// Remote description set? + candidates buffered until it is.
    remote: Mutex<RemoteState>,
    /// `close()` completed (also serializes concurrent `close()` calls).
    closed: Mutex<bool>,
    /// TURN/TCP bridges of the current peer connection.
    bridges: StdMutex<Vec<TcpTurnBridge>>,
}

impl std::fmt::Debug for RtcLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcLink")
            .field("key", &self.shared.key)
            .field("state", &self.pc().connection_state())
            .finish_non_exhaustive()
    }
}

impl RtcLink {
    /// New peer connection (no channel yet). `key` tags every event sent on `events`.
    pub(crate) async fn new(
        cfg: &RtcConfig,
        key: u64,
        events: UnboundedSender<(u64, RtcEvent)>,
    ) -> Result<Self, RtcError> {
        Self::with_timeouts(cfg, key, events, OUR_ICE_TIMEOUTS).await
    }

    /// [`RtcLink::new`] with explicit ICE timeouts.
    pub(super) async fn with_timeouts(
        cfg: &RtcConfig,
        key: u64,
        events: UnboundedSender<(u64, RtcEvent)>,
        timeouts: IceTimeouts,
    ) -> Result<Self, RtcError> {
        let shared = Arc::new(Shared::new(key, cfg.trickle, events));
        let (pc, bridges) = new_peer_connection(cfg, timeouts, &Arc::downgrade(&shared)).await?;
        Ok(Self {
            pc: StdMutex::new(pc),
            bridges: StdMutex::new(bridges),
            shared,
            cfg: cfg.clone(),
            timeouts,
            remote: Mutex::new(RemoteState::default()),
            closed: Mutex::new(false),
        })
    }

    /// The current peer connection.
    pub(super) fn pc(&self) -> Arc<RTCPeerConnection> {
        Arc::clone(&lock(&self.pc))
    }

    /// The candidate pair ICE selected, once connected: (local, remote).
    pub(crate) async fn selected_pair(
        &self,
    ) -> Option<(
        webrtc::ice_transport::ice_candidate::RTCIceCandidate,
        webrtc::ice_transport::ice_candidate::RTCIceCandidate,
    )> {
        let pc = self.pc();
        let pair = pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await?;
        let mut local = pair.local;
        if local.typ == RTCIceCandidateType::Relay
            && lock(&self.bridges)
                .iter()
                .any(|b| b.serves(local.related_port))
        {
            // Relayed by a TURN server we reach over TCP (see `turn_tcp`).
            local.protocol = RTCIceProtocol::Tcp;
        }
        let mut remote = pair.remote;
        remote.typ = remote_kind(
            remote.typ,
            &remote.address,
            remote.port,
            &self.remote.lock().await.signaled,
        );
        Some((local, remote))
    }

    /// Offerer side: create the two data channels ("p2p" reliable ordered;
    /// "p2p-volatile" ordered:false, max_retransmits:0) unless they already exist,
    /// create the offer, set it as local description, and return the SDP string
    /// (with all candidates in it if trickle is off).
    pub(crate) async fn create_offer(&self) -> Result<String, RtcError> {
        self.ensure_channels().await?;
        let offer = self
            .pc()
            .create_offer(None)
            .await
            .map_err(|e| map_err(e, RtcError::Webrtc))?;
        self.set_local(offer).await
    }

    /// Creates and wires our two data channels unless they already exist.
    async fn ensure_channels(&self) -> Result<(), RtcError> {
        let we = |e: webrtc::Error| map_err(e, RtcError::Webrtc);
        if lock(&self.shared.reliable).is_none() {
            let weak = Arc::downgrade(&self.shared);
            let reliable = self
                .pc()
                .create_data_channel(RELIABLE_LABEL, None)
                .await
                .map_err(we)?;
            wire_channel(&reliable, true, &weak);
            let volatile = self
                .pc()
                .create_data_channel(
                    VOLATILE_LABEL,
                    Some(RTCDataChannelInit {
                        ordered: Some(false),
                        max_retransmits: Some(0),
                        ..Default::default()
                    }),
                )
                .await
                .map_err(we)?;
            wire_channel(&volatile, false, &weak);
            *lock(&self.shared.reliable) = Some(reliable);
            *lock(&self.shared.volatile) = Some(volatile);
        }
        Ok(())
    }

    /// Sets our local description; returns the SDP to send (after gathering if
    /// trickle is off).
    async fn set_local(&self, desc: RTCSessionDescription) -> Result<String, RtcError> {
        let we = |e: webrtc::Error| map_err(e, RtcError::Webrtc);
        self.shared.record_local_sdp(&desc.sdp);
        let gathered = if self.shared.trickle {
            None
        } else {
            Some(self.pc().gathering_complete_promise().await)
        };
        let sdp = desc.sdp.clone();
        self.pc().set_local_description(desc).await.map_err(we)?;
        let Some(mut gathered) = gathered else {
            return Ok(sdp);
        };
        if tokio::time::timeout(GATHER_TIMEOUT, gathered.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                key = self.shared.key,
                "ICE gathering timed out; sending what we have"
            );
        }
        Ok(self
            .pc()
            .local_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or(sdp))
    }

    /// Sets the remote description, then applies the buffered remote candidates.
    async fn set_remote(&self, desc: RTCSessionDescription) -> Result<(), RtcError> {
        let mut remote = self.remote.lock().await;
        for c in sdp_candidates(&desc.sdp) {
            remote.remember(c);
        }
        self.pc()
            .set_remote_description(desc)
            .await
            .map_err(|e| map_err(e, RtcError::BadSdp))?;
        remote.remote_set = true;
        for c in std::mem::take(&mut remote.pending) {
            if let Err(e) = self.pc().add_ice_candidate(c).await {
                tracing::warn!(key = self.shared.key, error = %e, "buffered remote candidate rejected");
            }
        }
        Ok(())
    }

    /// Answerer side: set remote offer, create+set answer, return answer SDP. Remote
    /// channels are picked up via on_data_channel. Garbage SDP -> RtcError::BadSdp.
    pub(crate) async fn accept_offer(&self, sdp: &str) -> Result<String, RtcError> {
        let desc = RTCSessionDescription::offer(sdp.to_owned())
            .map_err(|e| RtcError::BadSdp(e.to_string()))?;
        self.set_remote(desc).await?;
        let answer = self
            .pc()
            .create_answer(None)
            .await
            .map_err(|e| map_err(e, RtcError::Webrtc))?;
        let sdp = self.set_local(answer).await?;
        // Not before our ICE transport has left `new`: nominated at once, it could connect
        // while webrtc 0.17 still reads `new`, and then never start DTLS (see
        // `Shared::ice_started`).
        if !self.shared.ice_started(ICE_START_WAIT).await {
            tracing::debug!(
                key = self.shared.key,
                "ICE not started yet; answering anyway"
            );
        }
        Ok(sdp)
    }

    /// Offerer side: apply the remote answer. Garbage -> BadSdp.
    pub(crate) async fn accept_answer(&self, sdp: &str) -> Result<(), RtcError> {
        let desc = RTCSessionDescription::answer(sdp.to_owned())
            .map_err(|e| RtcError::BadSdp(e.to_string()))?;
        self.set_remote(desc).await?;
        // We are the controlling side: see that a valid pair is nominated without waiting
        // for the ICE agent's 200 ms tick.
        let started = self.shared.ice_started(ICE_START_WAIT);
        spawn_kicks(Arc::downgrade(&self.pc()), self.shared.key, started);
        Ok(())
    }

    /// Perfect-negotiation rollback for glare: drop our pending local offer so that a
    /// remote offer can be accepted next with [`RtcLink::accept_offer`].
    ///
    /// webrtc-rs 0.17.2 rejects `set_local_description(rollback)` in
    /// `have-local-offer` ("invalid proposed signaling state transition"), so the
    /// equivalent is done here: the peer connection (which never had a remote
    /// description, hence never connected) is closed and replaced by a fresh one
    /// with the same config, key and event sender. Remote candidates buffered so
    /// far are kept (they belong to the remote offer to be accepted). Candidates we
    /// trickled for the dropped offer are stale: the remote may get errors adding
    /// them (webrtc-rs peers just get pairs that never succeed).
    /// Err(InvalidState) if there is no pending local offer, Err(Closed) after close.
    #[allow(dead_code)]
    pub(crate) async fn rollback(&self) -> Result<(), RtcError> {
        let closed = self.closed.lock().await;
        if *closed || self.shared.owner_closed.load(Ordering::SeqCst) {
            return Err(RtcError::Closed);
        }
        let old = self.pc();
        let pending_offer = old
            .pending_local_description()
            .await
            .is_some_and(|d| d.sdp_type == RTCSdpType::Offer);
        if !pending_offer || old.remote_description().await.is_some() {
            return Err(RtcError::InvalidState(format!(
                "no pending local offer to roll back (signaling state {})",
                old.signaling_state()
            )));
        }
        let (fresh, bridges) =
            new_peer_connection(&self.cfg, self.timeouts, &Arc::downgrade(&self.shared)).await?;
        // Silence the old connection before closing it: its channels were never
        // opened and its state changes must not be reported.
        unwire_all(&old, &self.shared);
        lock(&self.shared.reliable).take();
        lock(&self.shared.volatile).take();
        *lock(&self.pc) = fresh;
        *lock(&self.bridges) = bridges;
        drop(closed);
        if let Err(e) = old.close().await {
            tracing::debug!(key = self.shared.key, error = %e, "closing rolled-back connection");
        }
        tracing::debug!(
            key = self.shared.key,
            "local offer rolled back (fresh peer connection)"
        );
        Ok(())
    }

    /// Remote trickled candidate: if the remote description is not set yet, it is
    /// buffered and applied once it is. An empty candidate (end of candidates) is
    /// accepted and ignored. Bad candidate -> BadCandidate.
    pub(crate) async fn add_remote_candidate(&self, c: CandidateInit) -> Result<(), RtcError> {
        let Some((init, signaled)) = parse_remote_candidate(c)? else {
            return Ok(());
        };
        if self.shared.owner_closed.load(Ordering::SeqCst) {
            return Err(RtcError::Closed);
        }
        let mut remote = self.remote.lock().await;
        remote.remember(signaled);
        if !remote.remote_set {
            if remote.pending.len() >= MAX_PENDING_CANDIDATES {
                return Err(RtcError::BadCandidate(format!(
                    "more than {MAX_PENDING_CANDIDATES} candidates before the remote description"
                )));
            }
            remote.pending.push(init);
            return Ok(());
        }
        self.pc()
            .add_ice_candidate(init)
            .await
            .map_err(|e| map_err(e, RtcError::BadCandidate))
    }

    /// True when that channel (reliable or volatile) is open.
    pub(crate) fn channel_open(&self, reliable: bool) -> bool {
        self.open_channel(reliable).is_ok()
    }

    /// Returns the channel in `slot` if it is open.
    fn open_channel(&self, reliable: bool) -> Result<Arc<RTCDataChannel>, RtcError> {
        if self.shared.owner_closed.load(Ordering::SeqCst) {
            return Err(RtcError::Closed);
        }
        let slot = if reliable {
            &self.shared.reliable
        } else {
            &self.shared.volatile
        };
        match lock(slot).as_ref() {
            Some(dc) if dc.ready_state() == RTCDataChannelState::Open => Ok(Arc::clone(dc)),
            _ => Err(RtcError::NotOpen),
        }
    }

    async fn send_on(&self, reliable: bool, frame: Bytes) -> Result<(), RtcError> {
        if frame.len() > MAX_FRAME_SIZE {
            return Err(RtcError::TooLarge {
                len: frame.len(),
                max: MAX_FRAME_SIZE,
            });
        }
        let dc = self.open_channel(reliable)?;
        match dc.send(&frame).await {
            Ok(_) => Ok(()),
            Err(e) => Err(match map_err(e, RtcError::Webrtc) {
                RtcError::TooLarge { max, .. } => RtcError::TooLarge {
                    len: frame.len(),
                    max,
                },
                other => other,
            }),
        }
    }

    /// Send one frame on the reliable channel. Err(NotOpen) before Open,
    /// Err(TooLarge) above [`MAX_FRAME_SIZE`]. Waits while the SCTP send queue is full.
    pub(crate) async fn send(&self, frame: Bytes) -> Result<(), RtcError> {
        self.send_on(true, frame).await
    }

    /// Send one frame on the volatile channel (best effort). Err(NotOpen) while
    /// that channel is not open (it opens right after the reliable one).
    pub(crate) async fn send_volatile(&self, frame: Bytes) -> Result<(), RtcError> {
        self.send_on(false, frame).await
    }

    /// Bytes queued in the reliable channel not yet sent (for flow control).
    #[allow(dead_code)] // flow control uses the link window today; kept for diagnostics
    pub(crate) async fn buffered_amount(&self) -> usize {
        let dc = lock(&self.shared.reliable).clone();
        match dc {
            Some(dc) => dc.buffered_amount().await,
            None => 0,
        }
    }

    /// Close everything (channels, peer connection). Every webrtc callback is
    /// replaced by a no-op first, so no webrtc task keeps this link alive and no
    /// event (not even `Closed`) is reported after this call. Idempotent;
    /// concurrent calls wait for the first one to finish.
    pub(crate) async fn close(&self) {
        let mut closed = self.closed.lock().await;
        if *closed {
            return;
        }
        self.shared.silence();
        unwire_all(&self.pc(), &self.shared);
        // Our references go; pc.close() closes every channel it knows (ours and
        // the remote's) before SCTP, DTLS and ICE.
        lock(&self.shared.reliable).take();
        lock(&self.shared.volatile).take();
        if let Err(e) = close_pc(self.pc()).await {
            tracing::debug!(key = self.shared.key, error = %e, "closing peer connection");
        }
        self.remote.lock().await.pending.clear();
        *closed = true;
        tracing::debug!(key = self.shared.key, "link closed by owner");
    }
}

/// Closes `pc`, then stops its SCTP transport again, twice, a little later.
///
/// webrtc-rs's SCTP accept loop (one task per connection) ends only when the transport's
/// `stop()` wakes it with `Notify::notify_waiters`, which wakes a loop only if it is waiting at
/// that moment. A loop still busy with a channel it just accepted misses it, and then holds the
/// SCTP association and the DTLS connection (and its writer task) for the life of the process:
/// the churn example found 29 such pairs of tasks after 10,000 cycles. Another `stop()` once the
/// loop waits again ends it (the association is already closed; a second `stop()` only wakes
/// the loop).
async fn close_pc(pc: Arc<RTCPeerConnection>) -> Result<(), webrtc::Error> {
    let closed = pc.close().await;
    let sctp = pc.sctp();
    tokio::spawn(async move {
        for wait in [Duration::from_millis(20), Duration::from_millis(200)] {
            tokio::time::sleep(wait).await;
            if let Err(e) = sctp.stop().await {
                tracing::debug!(error = %e, "stopping a closed SCTP transport again");
            }
        }
    });
    closed
}

impl Drop for RtcLink {
    /// A link dropped without `close()` is closed in the background (needs a tokio
    /// runtime; without one the callbacks are still cleared).
    fn drop(&mut self) {
        let already = self
            .closed
            .try_lock()
            .map(|closed| *closed)
            .unwrap_or(false);
        if already {
            return;
        }
        self.shared.silence();
        unwire_all(&self.pc(), &self.shared);
        lock(&self.shared.reliable).take();
        lock(&self.shared.volatile).take();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pc = self.pc();
            let key = self.shared.key;
            handle.spawn(async move {
                if let Err(e) = close_pc(pc).await {
                    tracing::debug!(key, error = %e, "closing dropped peer connection");
                }
            });
        } else {
            tracing::warn!(
                key = self.shared.key,
                "RtcLink dropped outside a tokio runtime without close()"
            );
        }
    }
}

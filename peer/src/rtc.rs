//! WebRTC data-channel transport built on webrtc-rs (`webrtc` 0.17.2).
//!
//! An [`RtcLink`] wraps one `RTCPeerConnection` carrying two data channels:
//! `"p2p"` (reliable, ordered) and `"p2p-volatile"` (unordered, `maxRetransmits: 0`).
//! Everything the link observes is reported as an [`RtcEvent`] on the
//! `mpsc::UnboundedSender` given at creation, tagged with the link's `key`.
//!
//! Event order guarantees, per link:
//! * `Open` is reported at most once and always before any `Message` /
//!   `VolatileMessage`;
//! * `Closed` is reported at most once and nothing is reported after it;
//! * after the owner calls [`RtcLink::close`] (or drops the link) nothing at all
//!   is reported any more, in particular no `Closed`.
//!
//! No webrtc callback holds a strong reference to the link state: callbacks
//! only hold a `Weak`, and [`RtcLink::close`] (or `Drop`) replaces every
//! handler with a no-op, so the connection and its tasks go away once closed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::sync::mpsc::UnboundedSender;
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::data_channel::data_channel_state::RTCDataChannelState;
use webrtc::ice::candidate::candidate_base::unmarshal_candidate;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice_transport::ice_candidate::{RTCIceCandidate, RTCIceCandidateInit};
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::sdp_type::RTCSdpType;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

/// Label of the reliable, ordered data channel.
const RELIABLE_LABEL: &str = "p2p";
/// Label of the unreliable, unordered data channel.
const VOLATILE_LABEL: &str = "p2p-volatile";

/// Largest frame that can be sent on either channel.
///
/// webrtc-rs 0.17.2 reads incoming data-channel messages into a fixed
/// `u16::MAX`-byte buffer: a bigger message makes the *receiving* webrtc-rs
/// peer fail the read and close the channel. SCTP itself would accept 64 KiB.
pub(crate) const MAX_FRAME_SIZE: usize = u16::MAX as usize;

/// ICE: time without any inbound traffic before the agent goes `disconnected`
/// (webrtc-rs default: 5 s). A `disconnected` connection is reported as `Closed`.
const ICE_DISCONNECTED_TIMEOUT: Duration = Duration::from_secs(5);
/// ICE: extra time after `disconnected` before `failed` (webrtc-rs default: 25 s).
/// While still checking (never connected) ICE fails after
/// `ICE_DISCONNECTED_TIMEOUT + ICE_FAILED_TIMEOUT`.
const ICE_FAILED_TIMEOUT: Duration = Duration::from_secs(3);
/// ICE keepalive interval when no other traffic flows (webrtc-rs default: 2 s).
const ICE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Upper bound for waiting on candidate gathering when trickle is off.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);
/// Remote candidates buffered at most before the remote description is set.
const MAX_PENDING_CANDIDATES: usize = 256;

/// Number of link states alive (see [`live_links`]).
static LIVE_LINKS: AtomicUsize = AtomicUsize::new(0);

/// Number of `RtcLink` objects alive in this process — used by a leak test.
///
/// The counter is held by the link's shared state, which webrtc callbacks can
/// only reach through `Weak` references: it drops back once the `RtcLink` is
/// dropped, and would stay up if some callback leaked a strong reference.
pub(crate) fn live_links() -> usize {
    LIVE_LINKS.load(Ordering::SeqCst)
}

/// Settings for peer connections (from user options).
#[derive(Clone, Debug)]
pub(crate) struct RtcConfig {
    /// ICE servers: urls + optional username/credential.
    pub ice_servers: Vec<IceServerConfig>,
    /// Only gather loopback candidates (127.0.0.1 / ::1): used by tests, demo and benchmark.
    /// ICE servers are ignored in this mode (their candidates could not be loopback).
    pub loopback_only: bool,
    /// Disable mDNS candidates (always true in our tests; default true).
    pub disable_mdns: bool,
    /// Trickle ICE: send candidates as found. If false, wait for gathering to complete and put all candidates in the SDP.
    pub trickle: bool,
    /// If set, no candidate at all is gathered (every interface/IP filtered out, ICE
    /// servers ignored): ICE can never succeed. Used to test failure fallback for real.
    pub block_all_candidates: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            loopback_only: false,
            disable_mdns: true,
            trickle: true,
            block_all_candidates: false,
        }
    }
}

/// One ICE (STUN/TURN) server.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct IceServerConfig {
    /// Server URLs, e.g. `stun:stun.example.org:3478`.
    pub urls: Vec<String>,
    /// TURN username.
    pub username: Option<String>,
    /// TURN credential.
    pub credential: Option<String>,
}

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
fn map_err(e: webrtc::Error, other: fn(String) -> RtcError) -> RtcError {
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

/// Locks a std mutex, ignoring poisoning (the protected data stays consistent:
/// every critical section is a plain assignment or a channel send).
fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
    fn silenced(&self) -> bool {
        self.closed || self.owner_closed
    }
}

/// Remote-description state and candidates received before it was set.
#[derive(Default)]
struct RemoteState {
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
}

/// State shared between the link and (weakly) the webrtc callbacks.
struct Shared {
    key: u64,
    trickle: bool,
    events: UnboundedSender<(u64, RtcEvent)>,
    gate: StdMutex<Gate>,
    /// Set once the owner called `close()` (or dropped the link): report nothing more.
    owner_closed: AtomicBool,
    reliable: StdMutex<Option<Arc<RTCDataChannel>>>,
    volatile: StdMutex<Option<Arc<RTCDataChannel>>>,
    /// `a=mid:` and `a=ice-ufrag:` of our local description, for trickled candidates.
    local_mid: StdMutex<Option<String>>,
    local_ufrag: StdMutex<Option<String>>,
    _live: LiveGuard,
}

impl Shared {
    /// The owner closed (or dropped) the link: report nothing from now on.
    fn silence(&self) {
        self.owner_closed.store(true, Ordering::SeqCst);
        lock(&self.gate).owner_closed = true;
    }

    fn send(&self, ev: RtcEvent) {
        // The owner may have dropped the receiver: nothing to do then.
        let _ = self.events.send((self.key, ev));
    }

    /// Reports `Open` once, if the reliable channel is open.
    fn emit_open(&self) {
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
    fn emit_message(&self, data: Bytes) {
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
    fn emit_volatile(&self, data: Bytes) {
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
    fn report_closed(&self, reason: String) {
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

    fn emit_local_candidate(&self, c: Option<RTCIceCandidate>) {
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
    fn record_local_sdp(&self, sdp: &str) {
        let attr = |name: &str| {
            sdp.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        *lock(&self.local_mid) = attr("a=mid:");
        *lock(&self.local_ufrag) = attr("a=ice-ufrag:");
    }
}

/// Registers the message/open/close callbacks of one of our data channels.
fn wire_channel(dc: &Arc<RTCDataChannel>, reliable: bool, weak: &Weak<Shared>) {
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
fn unwire_channel(dc: &RTCDataChannel) {
    dc.on_open(Box::new(|| Box::pin(async {})));
    dc.on_message(Box::new(|_| Box::pin(async {})));
    dc.on_close(Box::new(|| Box::pin(async {})));
    dc.on_error(Box::new(|_| Box::pin(async {})));
}

/// Replaces every callback of the peer connection (and our channels) with a no-op,
/// so that nothing inside webrtc-rs references the link state or the event sender.
fn unwire_all(pc: &RTCPeerConnection, shared: &Shared) {
    pc.on_ice_candidate(Box::new(|_| Box::pin(async {})));
    pc.on_peer_connection_state_change(Box::new(|_| Box::pin(async {})));
    pc.on_data_channel(Box::new(|_| Box::pin(async {})));
    for slot in [&shared.reliable, &shared.volatile] {
        if let Some(dc) = lock(slot).as_ref() {
            unwire_channel(dc);
        }
    }
}

/// Timeouts given to the ICE agent (overridable in tests to measure defaults).
#[derive(Clone, Copy, Debug)]
struct IceTimeouts {
    disconnected: Option<Duration>,
    failed: Option<Duration>,
    keepalive: Option<Duration>,
}

const OUR_ICE_TIMEOUTS: IceTimeouts = IceTimeouts {
    disconnected: Some(ICE_DISCONNECTED_TIMEOUT),
    failed: Some(ICE_FAILED_TIMEOUT),
    keepalive: Some(ICE_KEEPALIVE_INTERVAL),
};

/// Builds the webrtc `API` object for a config.
fn build_api(cfg: &RtcConfig, timeouts: IceTimeouts) -> webrtc::api::API {
    let mut se = SettingEngine::default();
    if cfg.disable_mdns {
        se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    }
    se.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
    se.set_ice_timeouts(timeouts.disconnected, timeouts.failed, timeouts.keepalive);
    // Host candidates are accepted immediately (this is also the default).
    se.set_host_acceptance_min_wait(Some(Duration::ZERO));
    // A check from the remote often arrives before its trickled candidate: the
    // pair is then peer-reflexive, which webrtc-rs would only nominate after 1 s.
    se.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
    if cfg.block_all_candidates {
        se.set_interface_filter(Box::new(|_: &str| false));
        se.set_ip_filter(Box::new(|_: IpAddr| false));
    } else if cfg.loopback_only {
        se.set_include_loopback_candidate(true);
        // "lo" on Linux, "lo0" on BSD/macOS; the IP filter is the real guard.
        se.set_interface_filter(Box::new(|name: &str| name.starts_with("lo")));
        se.set_ip_filter(Box::new(|ip: IpAddr| ip.is_loopback()));
    }
    APIBuilder::new().with_setting_engine(se).build()
}

/// ICE servers for a config (none when only loopback/no candidates are wanted).
fn ice_servers(cfg: &RtcConfig) -> Vec<RTCIceServer> {
    if cfg.loopback_only || cfg.block_all_candidates {
        if !cfg.ice_servers.is_empty() {
            tracing::debug!("loopback-only/blocked candidates: ICE servers ignored");
        }
        return Vec::new();
    }
    cfg.ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect()
}

/// Creates a peer connection whose callbacks only reach the link state through `weak`.
async fn new_peer_connection(
    cfg: &RtcConfig,
    timeouts: IceTimeouts,
    weak: &Weak<Shared>,
) -> Result<Arc<RTCPeerConnection>, RtcError> {
    let api = build_api(cfg, timeouts);
    let pc = api
        .new_peer_connection(RTCConfiguration {
            ice_servers: ice_servers(cfg),
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
    pc.on_peer_connection_state_change(Box::new(move |s: RTCPeerConnectionState| {
        if let Some(sh) = w.upgrade() {
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
        Box::pin(async {})
    }));

    let w = weak.clone();
    pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        // Runs before webrtc-rs starts the channel's read loop, so the
        // callbacks registered here see every message.
        if let Some(sh) = w.upgrade() {
            let reliable = match dc.label() {
                RELIABLE_LABEL => Some(true),
                VOLATILE_LABEL => Some(false),
                _ => None,
            };
            match reliable {
                Some(reliable) if !sh.owner_closed.load(Ordering::SeqCst) => {
                    tracing::debug!(key = sh.key, label = dc.label(), "remote data channel");
                    wire_channel(&dc, reliable, &w);
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
        Box::pin(async {})
    }));
    Ok(Arc::new(pc))
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

    async fn with_timeouts(
        cfg: &RtcConfig,
        key: u64,
        events: UnboundedSender<(u64, RtcEvent)>,
        timeouts: IceTimeouts,
    ) -> Result<Self, RtcError> {
        let shared = Arc::new(Shared {
            key,
            trickle: cfg.trickle,
            events,
            gate: StdMutex::new(Gate::default()),
            owner_closed: AtomicBool::new(false),
            reliable: StdMutex::new(None),
            volatile: StdMutex::new(None),
            local_mid: StdMutex::new(None),
            local_ufrag: StdMutex::new(None),
            _live: LiveGuard::new(),
        });
        let pc = new_peer_connection(cfg, timeouts, &Arc::downgrade(&shared)).await?;
        Ok(Self {
            pc: StdMutex::new(pc),
            shared,
            cfg: cfg.clone(),
            timeouts,
            remote: Mutex::new(RemoteState::default()),
            closed: Mutex::new(false),
        })
    }

    /// The current peer connection.
    fn pc(&self) -> Arc<RTCPeerConnection> {
        Arc::clone(&lock(&self.pc))
    }

    /// Offerer side: create the two data channels ("p2p" reliable ordered;
    /// "p2p-volatile" ordered:false, max_retransmits:0) unless they already exist,
    /// create the offer, set it as local description, and return the SDP string
    /// (with all candidates in it if trickle is off).
    pub(crate) async fn create_offer(&self) -> Result<String, RtcError> {
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
        let offer = self.pc().create_offer(None).await.map_err(we)?;
        self.set_local(offer).await
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
        self.set_local(answer).await
    }

    /// Offerer side: apply the remote answer. Garbage -> BadSdp.
    pub(crate) async fn accept_answer(&self, sdp: &str) -> Result<(), RtcError> {
        let desc = RTCSessionDescription::answer(sdp.to_owned())
            .map_err(|e| RtcError::BadSdp(e.to_string()))?;
        self.set_remote(desc).await
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
        let fresh =
            new_peer_connection(&self.cfg, self.timeouts, &Arc::downgrade(&self.shared)).await?;
        // Silence the old connection before closing it: its channels were never
        // opened and its state changes must not be reported.
        unwire_all(&old, &self.shared);
        lock(&self.shared.reliable).take();
        lock(&self.shared.volatile).take();
        *lock(&self.pc) = fresh;
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
        let value = c.candidate.trim();
        let value = value.strip_prefix("a=").unwrap_or(value);
        let value = value.strip_prefix("candidate:").unwrap_or(value);
        if value.is_empty() {
            return Ok(());
        }
        unmarshal_candidate(value).map_err(|e| RtcError::BadCandidate(e.to_string()))?;
        let init = RTCIceCandidateInit {
            candidate: format!("candidate:{value}"),
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_m_line_index,
            username_fragment: c.username_fragment,
        };
        if self.shared.owner_closed.load(Ordering::SeqCst) {
            return Err(RtcError::Closed);
        }
        let mut remote = self.remote.lock().await;
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
        if let Err(e) = self.pc().close().await {
            tracing::debug!(key = self.shared.key, error = %e, "closing peer connection");
        }
        self.remote.lock().await.pending.clear();
        *closed = true;
        tracing::debug!(key = self.shared.key, "link closed by owner");
    }
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
                if let Err(e) = pc.close().await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::sync::mpsc::{self, UnboundedReceiver};
    use tokio::time::timeout;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
    type Rx = UnboundedReceiver<(u64, RtcEvent)>;

    /// Every test creating links holds this: `live_links()` is process-wide.
    static SERIAL: Mutex<()> = Mutex::const_new(());

    const A: u64 = 1;
    const B: u64 = 2;

    fn cfg(trickle: bool) -> RtcConfig {
        RtcConfig {
            ice_servers: Vec::new(),
            loopback_only: true,
            disable_mdns: true,
            trickle,
            block_all_candidates: false,
        }
    }

    async fn pair(ca: &RtcConfig, cb: &RtcConfig) -> Result<(RtcLink, RtcLink, Rx), RtcError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let a = RtcLink::new(ca, A, tx.clone()).await?;
        let b = RtcLink::new(cb, B, tx).await?;
        Ok((a, b, rx))
    }

    /// What happened while pumping events.
    #[derive(Debug, Default)]
    struct Seen {
        open: [Option<Duration>; 2],
        closed: [Option<(Duration, String)>; 2],
        candidates: usize,
    }

    fn idx(key: u64) -> usize {
        if key == A { 0 } else { 1 }
    }

    /// Forwards trickled candidates between `a` and `b` until `done` or `limit`.
    async fn pump(
        a: &RtcLink,
        b: &RtcLink,
        rx: &mut Rx,
        start: Instant,
        limit: Duration,
        done: impl Fn(&Seen) -> bool,
    ) -> Result<Seen, RtcError> {
        let mut seen = Seen::default();
        let deadline = tokio::time::Instant::now() + limit;
        while !done(&seen) {
            let Ok(Some((key, ev))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                break;
            };
            match ev {
                RtcEvent::LocalCandidate(Some(c)) => {
                    seen.candidates += 1;
                    assert!(c.candidate.starts_with("candidate:"), "{c:?}");
                    assert!(
                        c.sdp_mid.is_some() && c.username_fragment.is_some(),
                        "{c:?}"
                    );
                    let other = if key == A { b } else { a };
                    other.add_remote_candidate(c).await?;
                }
                RtcEvent::LocalCandidate(None) => {}
                RtcEvent::Open => {
                    assert!(seen.open[idx(key)].is_none(), "Open reported twice");
                    seen.open[idx(key)] = Some(start.elapsed());
                }
                RtcEvent::Closed(reason) => {
                    assert!(seen.closed[idx(key)].is_none(), "Closed reported twice");
                    seen.closed[idx(key)] = Some((start.elapsed(), reason));
                }
                other => panic!("unexpected event before open: {other:?}"),
            }
        }
        Ok(seen)
    }

    fn both_open(s: &Seen) -> bool {
        s.open.iter().all(Option::is_some)
    }

    /// Offer/answer + candidates until both sides are open; returns the time it took.
    async fn connect(
        a: &RtcLink,
        b: &RtcLink,
        rx: &mut Rx,
    ) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
        let start = Instant::now();
        let offer = a.create_offer().await?;
        let answer = b.accept_offer(&offer).await?;
        a.accept_answer(&answer).await?;
        let seen = pump(a, b, rx, start, Duration::from_secs(10), both_open).await?;
        assert!(both_open(&seen), "not open within 10 s: {seen:?}");
        Ok(start.elapsed())
    }

    fn frame(dir: u8, i: u32, len: usize) -> Bytes {
        let mut v = vec![dir; len.max(5)];
        v[1..5].copy_from_slice(&i.to_be_bytes());
        Bytes::from(v)
    }

    fn frame_index(f: &Bytes) -> Option<u32> {
        let b: [u8; 4] = f.get(1..5)?.try_into().ok()?;
        Some(u32::from_be_bytes(b))
    }

    async fn send_frames(link: &RtcLink, dir: u8, n: u32) -> Result<(), RtcError> {
        for i in 0..n {
            let len = if i == n / 2 { 16 * 1024 } else { 100 };
            link.send(frame(dir, i, len)).await?;
        }
        Ok(())
    }

    /// Exchanges `n` frames each way and checks they all arrive, in order.
    async fn exchange(a: &RtcLink, b: &RtcLink, rx: &mut Rx, n: u32) -> TestResult {
        let (ra, rb) = tokio::join!(send_frames(a, b'a', n), send_frames(b, b'b', n));
        ra?;
        rb?;
        let mut next = [0u32; 2];
        timeout(Duration::from_secs(20), async {
            while next.iter().any(|&c| c < n) {
                match rx.recv().await {
                    Some((key, RtcEvent::Message(f))) => {
                        let k = idx(key);
                        // Key A receives what B sent.
                        let dir = if key == A { b'b' } else { b'a' };
                        assert_eq!(f.first(), Some(&dir));
                        assert_eq!(frame_index(&f), Some(next[k]), "out of order");
                        let want = if next[k] == n / 2 { 16 * 1024 } else { 100 };
                        assert_eq!(f.len(), want);
                        next[k] += 1;
                    }
                    Some((_, RtcEvent::LocalCandidate(_))) => {}
                    Some(other) => panic!("unexpected event {other:?}"),
                    None => panic!("event channel closed"),
                }
            }
        })
        .await?;
        Ok(())
    }

    /// Sends volatile frames both ways until one arrives on each side.
    async fn volatile_roundtrip(a: &RtcLink, b: &RtcLink, rx: &mut Rx) -> TestResult {
        let mut got = [false; 2];
        timeout(Duration::from_secs(5), async {
            while !got.iter().all(|g| *g) {
                for (link, dir) in [(a, b'a'), (b, b'b')] {
                    match link.send_volatile(frame(dir, 7, 50)).await {
                        Ok(()) | Err(RtcError::NotOpen) => {}
                        Err(e) => panic!("send_volatile: {e}"),
                    }
                }
                // Bounded wait for the echo; resend on loss/not-open.
                if let Ok(Some((key, ev))) = timeout(Duration::from_millis(100), rx.recv()).await {
                    match ev {
                        RtcEvent::VolatileMessage(f) => {
                            assert_eq!(frame_index(&f), Some(7));
                            got[idx(key)] = true;
                        }
                        RtcEvent::LocalCandidate(_) => {}
                        other => panic!("unexpected event {other:?}"),
                    }
                }
            }
        })
        .await?;
        Ok(())
    }

    async fn wait_no_live_links(limit: Duration) -> bool {
        timeout(limit, async {
            while live_links() != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok()
    }

    /// The link and its futures can be used from spawned tasks.
    #[test]
    fn link_and_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<RtcLink>();
        send_sync::<RtcError>();
        let check = |l: &RtcLink| {
            send(&l.create_offer());
            send(&l.accept_offer(""));
            send(&l.accept_answer(""));
            send(&l.rollback());
            send(&l.add_remote_candidate(CandidateInit {
                candidate: String::new(),
                sdp_mid: None,
                sdp_m_line_index: None,
                username_fragment: None,
            }));
            send(&l.send(Bytes::new()));
            send(&l.send_volatile(Bytes::new()));
            send(&l.buffered_amount());
            send(&l.close());
        };
        let _ = check;
    }

    #[test]
    fn candidate_json_is_browser_shaped() -> TestResult {
        let c = CandidateInit {
            candidate: "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host".to_owned(),
            sdp_mid: Some("0".to_owned()),
            sdp_m_line_index: Some(0),
            username_fragment: Some("abcd".to_owned()),
        };
        let j = serde_json::to_value(&c)?;
        assert_eq!(
            j,
            serde_json::json!({
                "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "usernameFragment": "abcd"
            })
        );
        let back: CandidateInit = serde_json::from_value(j)?;
        assert_eq!(back, c);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trickle_open_and_exchange() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
        assert!(matches!(
            a.send(Bytes::from_static(b"x")).await,
            Err(RtcError::NotOpen)
        ));
        let took = connect(&a, &b, &mut rx).await?;
        eprintln!("trickle: offer -> both open in {took:?}");
        let big = Bytes::from(vec![0u8; MAX_FRAME_SIZE + 1]);
        assert!(matches!(a.send(big).await, Err(RtcError::TooLarge { .. })));
        // The largest allowed frame goes through.
        a.send(Bytes::from(vec![b'b'; MAX_FRAME_SIZE])).await?;
        match timeout(Duration::from_secs(5), rx.recv()).await? {
            Some((B, RtcEvent::Message(f))) => assert_eq!(f.len(), MAX_FRAME_SIZE),
            other => panic!("unexpected {other:?}"),
        }
        exchange(&a, &b, &mut rx, 1000).await?;
        volatile_roundtrip(&a, &b, &mut rx).await?;
        // Everything was delivered: the send queues drain (SACKs may lag a bit).
        let drained = timeout(Duration::from_secs(5), async {
            while a.buffered_amount().await + b.buffered_amount().await > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(drained.is_ok(), "buffered_amount stuck");
        a.close().await;
        b.close().await;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_trickle_open_and_exchange() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, mut rx) = pair(&cfg(false), &cfg(false)).await?;
        let start = Instant::now();
        let offer = a.create_offer().await?;
        assert!(offer.contains("a=candidate:"), "offer without candidates");
        let answer = b.accept_offer(&offer).await?;
        assert!(answer.contains("a=candidate:"), "answer without candidates");
        a.accept_answer(&answer).await?;
        let seen = pump(&a, &b, &mut rx, start, Duration::from_secs(10), both_open).await?;
        assert!(both_open(&seen), "not open: {seen:?}");
        assert_eq!(seen.candidates, 0, "no trickled candidate expected");
        eprintln!("non-trickle: offer -> both open in {:?}", start.elapsed());
        exchange(&a, &b, &mut rx, 100).await?;
        volatile_roundtrip(&a, &b, &mut rx).await?;
        a.close().await;
        b.close().await;

        // Mixed: trickling offerer, non-trickling answerer.
        let (a, b, mut rx) = pair(&cfg(true), &cfg(false)).await?;
        connect(&a, &b, &mut rx).await?;
        exchange(&a, &b, &mut rx, 10).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_rejected() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, _rx) = pair(&cfg(true), &cfg(true)).await?;
        for junk in ["", "garbage", "v=0\r\nnonsense", "\u{0}\u{1}\u{ff}"] {
            let r = a.accept_offer(junk).await;
            assert!(matches!(r, Err(RtcError::BadSdp(_))), "{junk:?}: {r:?}");
        }
        let bad = |s: &str| CandidateInit {
            candidate: s.to_owned(),
            sdp_mid: Some("0".to_owned()),
            sdp_m_line_index: Some(0),
            username_fragment: None,
        };
        for junk in [
            "candidate:garbage",
            "candidate:1 1 udp notanumber 127.0.0.1 5000 typ host",
            "candidate:1 1 udp 2130706431 not-an-ip 5000 typ host",
            "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ martian",
        ] {
            // Before any remote description (would be buffered) ...
            let r = a.add_remote_candidate(bad(junk)).await;
            assert!(
                matches!(r, Err(RtcError::BadCandidate(_))),
                "{junk:?}: {r:?}"
            );
        }
        // End of candidates is fine.
        a.add_remote_candidate(bad("")).await?;
        // Rollback without pending offer.
        assert!(matches!(a.rollback().await, Err(RtcError::InvalidState(_))));

        let offer = a.create_offer().await?;
        let r = a.accept_answer("definitely not sdp").await;
        assert!(matches!(r, Err(RtcError::BadSdp(_))), "{r:?}");
        let answer = b.accept_offer(&offer).await?;
        // ... and after the remote description is set.
        let r = b.add_remote_candidate(bad("candidate:x y z")).await;
        assert!(matches!(r, Err(RtcError::BadCandidate(_))), "{r:?}");
        // An answer in the wrong state.
        let (c, _d, _rx2) = pair(&cfg(true), &cfg(true)).await?;
        let r = c.accept_answer(&answer).await;
        assert!(matches!(r, Err(RtcError::InvalidState(_))), "{r:?}");
        a.accept_answer(&answer).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn glare_rollback() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
        let start = Instant::now();
        let offer_a = a.create_offer().await?;
        let _offer_b = b.create_offer().await?;
        // Glare: b is polite, drops its offer and answers a's; a ignores b's offer.
        b.rollback().await?;
        let answer = b.accept_offer(&offer_a).await?;
        a.accept_answer(&answer).await?;
        let seen = pump(&a, &b, &mut rx, start, Duration::from_secs(10), both_open).await?;
        assert!(both_open(&seen), "not open after rollback: {seen:?}");
        exchange(&a, &b, &mut rx, 20).await?;
        volatile_roundtrip(&a, &b, &mut rx).await?;
        Ok(())
    }

    /// Runs a negotiation where `b` gathers no candidate; returns (time to Closed on a, on b).
    async fn blocked_run(
        timeouts: IceTimeouts,
        limit: Duration,
    ) -> Result<Seen, Box<dyn std::error::Error + Send + Sync>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = RtcLink::with_timeouts(&cfg(true), A, tx.clone(), timeouts).await?;
        let blocked = RtcConfig {
            block_all_candidates: true,
            ..cfg(true)
        };
        let b = RtcLink::with_timeouts(&blocked, B, tx, timeouts).await?;
        let start = Instant::now();
        let offer = a.create_offer().await?;
        let answer = b.accept_offer(&offer).await?;
        assert!(!answer.contains("a=candidate:"));
        a.accept_answer(&answer).await?;
        let seen = pump(&a, &b, &mut rx, start, limit, |s| {
            s.closed.iter().all(Option::is_some)
        })
        .await?;
        assert!(
            seen.open.iter().all(Option::is_none),
            "opened without candidates: {seen:?}"
        );
        Ok(seen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocked_candidates_never_open_and_fail() -> TestResult {
        let _serial = SERIAL.lock().await;
        let expected = ICE_DISCONNECTED_TIMEOUT + ICE_FAILED_TIMEOUT;
        let seen = blocked_run(OUR_ICE_TIMEOUTS, expected + Duration::from_secs(5)).await?;
        eprintln!("blocked candidates: {seen:?}");
        for c in &seen.closed {
            let Some((t, reason)) = c else {
                panic!("no Closed event: {seen:?}");
            };
            assert!(reason.contains("failed"), "{reason}");
            assert!(
                *t >= expected.saturating_sub(Duration::from_secs(1)),
                "{t:?}"
            );
        }
        Ok(())
    }

    /// Measures webrtc-rs' default time to ICE failure (about 30 s). Run with --ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "slow measurement (~30 s)"]
    async fn measure_default_ice_failure() -> TestResult {
        let _serial = SERIAL.lock().await;
        let defaults = IceTimeouts {
            disconnected: None,
            failed: None,
            keepalive: None,
        };
        let seen = blocked_run(defaults, Duration::from_secs(45)).await?;
        eprintln!("default timeouts, blocked candidates: {seen:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_is_seen_by_peer_and_nothing_leaks() -> TestResult {
        let _serial = SERIAL.lock().await;
        assert!(
            wait_no_live_links(Duration::from_secs(5)).await,
            "links left by earlier tests"
        );
        let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
        connect(&a, &b, &mut rx).await?;
        assert_eq!(live_links(), 2);
        let start = Instant::now();
        a.close().await;
        a.close().await; // idempotent
        assert!(matches!(
            a.send(Bytes::from_static(b"x")).await,
            Err(RtcError::Closed)
        ));
        assert!(matches!(a.create_offer().await, Err(RtcError::Closed)));
        assert!(matches!(a.rollback().await, Err(RtcError::Closed)));
        let reason = timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await {
                    Some((B, RtcEvent::Closed(r))) => return Some(r),
                    Some((A, ev)) if !matches!(ev, RtcEvent::LocalCandidate(_)) => {
                        panic!("event after close(): {ev:?}")
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await?;
        eprintln!(
            "peer saw Closed({reason:?}) {:?} after close()",
            start.elapsed()
        );
        assert!(reason.is_some());
        b.close().await;
        let weak_pc = Arc::downgrade(&a.pc());
        drop(a);
        drop(b);
        assert!(
            weak_pc.upgrade().is_none(),
            "peer connection still referenced"
        );
        assert!(
            wait_no_live_links(Duration::from_secs(5)).await,
            "live_links = {}",
            live_links()
        );
        // Every sender clone held by webrtc callbacks is gone: the channel ends.
        let ended = timeout(Duration::from_secs(5), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "event sender still held by webrtc");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_without_close_cleans_up() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
        connect(&a, &b, &mut rx).await?;
        drop(a);
        let closed = timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await {
                    Some((B, RtcEvent::Closed(_))) => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        })
        .await?;
        assert!(closed);
        drop(b);
        assert!(wait_no_live_links(Duration::from_secs(5)).await);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_close_cycles_leave_nothing_behind() -> TestResult {
        let _serial = SERIAL.lock().await;
        assert!(wait_no_live_links(Duration::from_secs(5)).await);
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let mut peak = before;
        for i in 0..50u32 {
            let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
            connect(&a, &b, &mut rx).await?;
            a.send(frame(b'a', i, 10)).await?;
            peak = peak.max(metrics.num_alive_tasks());
            a.close().await;
            b.close().await;
        }
        assert!(
            wait_no_live_links(Duration::from_secs(5)).await,
            "live_links = {}",
            live_links()
        );
        let right_after = metrics.num_alive_tasks();
        let settled = timeout(Duration::from_secs(5), async {
            while metrics.num_alive_tasks() > before {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        let after = metrics.num_alive_tasks();
        eprintln!(
            "alive tasks: before {before}, peak {peak}, right after 50 cycles {right_after}, settled {after} (settled back: {settled})"
        );
        // A leak from this module would be per link (dozens of tasks). webrtc-rs
        // itself occasionally (roughly one link in a few hundred) leaves two tasks
        // (and the link's two UDP sockets) behind after close: tolerate a few.
        assert!(after <= before + 8, "tasks leaked: {before} -> {after}");
        Ok(())
    }

    /// Offer -> Open latency over 20 runs. Run with --ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement"]
    async fn measure_open_latency() -> TestResult {
        let _serial = SERIAL.lock().await;
        for trickle in [true, false] {
            let mut times = Vec::new();
            for _ in 0..20 {
                let (a, b, mut rx) = pair(&cfg(trickle), &cfg(trickle)).await?;
                times.push(connect(&a, &b, &mut rx).await?);
                a.close().await;
                b.close().await;
            }
            times.sort();
            eprintln!(
                "trickle={trickle}: offer->open min {:?} median {:?} max {:?}",
                times[0],
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
        Ok(())
    }

    /// 64 MiB in 16 KiB frames over loopback. Run with --ignored (ideally --release).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement"]
    async fn measure_throughput() -> TestResult {
        let _serial = SERIAL.lock().await;
        let (a, b, mut rx) = pair(&cfg(true), &cfg(true)).await?;
        connect(&a, &b, &mut rx).await?;
        const TOTAL: usize = 64 << 20;
        const FRAME: usize = 16 << 10;
        let payload = Bytes::from(vec![7u8; FRAME]);
        let start = Instant::now();
        let sender = async {
            let mut max_buffered = 0;
            for _ in 0..TOTAL / FRAME {
                a.send(payload.clone()).await?;
                max_buffered = max_buffered.max(a.buffered_amount().await);
            }
            Ok::<usize, RtcError>(max_buffered)
        };
        let receiver = async {
            let mut got = 0usize;
            while got < TOTAL {
                match rx.recv().await {
                    Some((B, RtcEvent::Message(f))) => got += f.len(),
                    Some((_, RtcEvent::LocalCandidate(_))) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        let (sent, ()) = timeout(Duration::from_secs(120), async {
            tokio::join!(sender, receiver)
        })
        .await?;
        let max_buffered = sent?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "throughput: 64 MiB in {secs:.2} s = {:.1} MiB/s (max buffered {max_buffered} B)",
            64.0 / secs
        );
        a.close().await;
        b.close().await;
        Ok(())
    }
}

//! The WebRTC carrier: one task per peer connection runs its `RtcLink` calls in order
//! (create, offer, answer, candidates) and a second one writes its frames, so a slow
//! call (ICE gathering without trickle, a send blocked on a full SCTP queue) holds up
//! that connection only. Outcomes come back to the driver as reports.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use socketio_p2p_signaling::protocol::Signal;
use tokio::sync::{mpsc, oneshot};

use crate::core::{RtcOp, RtcReport};
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_protocol::RTCIceProtocol;

use crate::options::P2pOptions;
use crate::rtc::{CandidateInit, IceServerConfig, RtcLink};
pub(crate) use crate::rtc::{RtcConfig, RtcEvent};
use crate::stats::{CandidateKind, CandidatePair};

/// Peer connections alive in this process (all `P2p`s).
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) fn live_links() -> usize {
    crate::rtc::live_links()
}

/// The peer connections' settings, from the options.
pub(crate) fn config_of(opts: &P2pOptions) -> RtcConfig {
    RtcConfig {
        ice_servers: opts
            .ice_servers
            .iter()
            .map(|s| IceServerConfig {
                urls: s.urls.clone(),
                username: s.username.clone(),
                credential: s.credential.clone(),
            })
            .collect(),
        turn_tls_roots: opts.turn_tls_roots.clone(),
        loopback_only: opts.loopback_only,
        disable_mdns: opts.disable_mdns,
        trickle: opts.trickle,
        block_all_candidates: opts.block_all_candidates,
    }
}

/// Reports of the carrier: (connection key, report).
pub(crate) type Reports = mpsc::UnboundedSender<(u64, RtcReport)>;

struct Conn {
    ctl: mpsc::UnboundedSender<RtcOp>,
    writer: mpsc::UnboundedSender<(bool, Bytes)>,
    /// Dropping it stops both tasks, even in the middle of a blocked call, and closes
    /// the connection.
    _stop: oneshot::Sender<()>,
}

/// Every peer connection of one `P2p`.
pub(crate) struct WebRtc {
    cfg: RtcConfig,
    conns: HashMap<u64, Conn>,
    reports: Reports,
    /// What the connections themselves report (channel open, frames, candidates, closed).
    events: mpsc::UnboundedSender<(u64, RtcEvent)>,
    /// Test hook: offers and answers wait this long before they start.
    hang: Duration,
    /// ICE servers from the server's welcome (short-lived TURN credentials).
    server_ice: Vec<IceServerConfig>,
}

impl WebRtc {
    pub(crate) fn new(
        cfg: RtcConfig,
        reports: Reports,
        events: mpsc::UnboundedSender<(u64, RtcEvent)>,
        hang: Duration,
    ) -> Self {
        Self {
            cfg,
            conns: HashMap::new(),
            reports,
            events,
            hang,
            server_ice: Vec::new(),
        }
    }

    /// Performs one operation of the core.
    pub(crate) fn apply(&mut self, key: u64, op: RtcOp) {
        match op {
            RtcOp::Close => {
                self.conns.remove(&key);
            }
            RtcOp::Send { reliable, frame } => {
                if let Some(c) = self.conns.get(&key) {
                    let _ = c.writer.send((reliable, frame));
                }
            }
            op @ (RtcOp::Offer | RtcOp::Accept(_)) => {
                let conn = self.spawn(key);
                let _ = conn.ctl.send(op);
                // A connection replaced under the same key closes as it is dropped.
                self.conns.insert(key, conn);
            }
            op => {
                if let Some(c) = self.conns.get(&key) {
                    let _ = c.ctl.send(op);
                }
            }
        }
    }

    /// ICE servers from the server's welcome: used beside our own by connections made
    /// from now on.
    pub(crate) fn set_server_ice(
        &mut self,
        servers: Vec<socketio_p2p_signaling::protocol::IceServerInfo>,
    ) {
        self.server_ice = servers
            .into_iter()
            .map(|s| IceServerConfig {
                urls: s.urls,
                username: s.username,
                credential: s.credential,
            })
            .collect();
    }

    /// Drops every connection (each closes in its own task).
    pub(crate) fn close_all(&mut self) {
        self.conns.clear();
    }

    fn spawn(&self, key: u64) -> Conn {
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let (writer, writer_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let task = ConnTask {
            key,
            cfg: {
                let mut cfg = self.cfg.clone();
                cfg.ice_servers.extend(self.server_ice.iter().cloned());
                cfg
            },
            reports: self.reports.clone(),
            events: self.events.clone(),
            hang: self.hang,
        };
        tokio::spawn(task.run(ctl_rx, writer_rx, stop_rx));
        Conn {
            ctl,
            writer,
            _stop: stop,
        }
    }
}

fn kind_of(t: RTCIceCandidateType) -> Option<CandidateKind> {
    Some(match t {
        RTCIceCandidateType::Host => CandidateKind::Host,
        RTCIceCandidateType::Srflx => CandidateKind::ServerReflexive,
        RTCIceCandidateType::Prflx => CandidateKind::PeerReflexive,
        RTCIceCandidateType::Relay => CandidateKind::Relay,
        RTCIceCandidateType::Unspecified => return None,
    })
}

/// Translates what a connection reports.
pub(crate) fn report_of(ev: RtcEvent) -> Option<RtcReport> {
    Some(match ev {
        RtcEvent::LocalCandidate(Some(c)) => RtcReport::Candidate(Signal::Candidate {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_m_line_index: c.sdp_m_line_index,
            username_fragment: c.username_fragment,
        }),
        RtcEvent::LocalCandidate(None) => return None,
        RtcEvent::Open => RtcReport::Open,
        RtcEvent::Message(b) | RtcEvent::VolatileMessage(b) => RtcReport::Frame(b),
        RtcEvent::Closed(reason) => RtcReport::Closed(reason),
    })
}

struct ConnTask {
    key: u64,
    cfg: RtcConfig,
    reports: Reports,
    events: mpsc::UnboundedSender<(u64, RtcEvent)>,
    hang: Duration,
}

impl ConnTask {
    async fn run(
        self,
        mut ctl: mpsc::UnboundedReceiver<RtcOp>,
        writer: mpsc::UnboundedReceiver<(bool, Bytes)>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let link = tokio::select! {
            _ = &mut stop => return,
            l = RtcLink::new(&self.cfg, self.key, self.events.clone()) => l,
        };
        let link = match link {
            Ok(l) => Arc::new(l),
            Err(e) => return self.report(RtcReport::Failed(e.to_string())),
        };
        let (writer_stop, writer_stopped) = oneshot::channel::<()>();
        tokio::spawn(write_frames(
            link.clone(),
            self.key,
            writer,
            self.reports.clone(),
            writer_stopped,
        ));
        loop {
            let op = tokio::select! {
                _ = &mut stop => break,
                op = ctl.recv() => match op {
                    Some(op) => op,
                    None => break,
                },
            };
            tokio::select! {
                _ = &mut stop => break,
                r = self.perform(&link, op) => if let Some(r) = r {
                    self.report(r);
                },
            }
        }
        // A send blocked on a full queue is cancelled before the connection closes.
        drop(writer_stop);
        link.close().await;
    }

    fn report(&self, r: RtcReport) {
        let _ = self.reports.send((self.key, r));
    }

    async fn perform(&self, link: &RtcLink, op: RtcOp) -> Option<RtcReport> {
        let failed = |e: crate::rtc::RtcError| Some(RtcReport::Failed(e.to_string()));
        match op {
            RtcOp::Offer => {
                tokio::time::sleep(self.hang).await;
                match link.create_offer().await {
                    Ok(sdp) => Some(RtcReport::Offer(sdp)),
                    Err(e) => failed(e),
                }
            }
            RtcOp::Accept(sdp) => {
                tokio::time::sleep(self.hang).await;
                match link.accept_offer(&sdp).await {
                    Ok(answer) => Some(RtcReport::Answer(answer)),
                    Err(e) => failed(e),
                }
            }
            RtcOp::Answer(sdp) => link.accept_answer(&sdp).await.err().and_then(failed),
            RtcOp::Candidate(Signal::Candidate {
                candidate,
                sdp_mid,
                sdp_m_line_index,
                username_fragment,
            }) => {
                let c = CandidateInit {
                    candidate,
                    sdp_mid,
                    sdp_m_line_index,
                    username_fragment,
                };
                if let Err(e) = link.add_remote_candidate(c).await {
                    tracing::debug!(%e, key = self.key, "remote candidate refused");
                }
                None
            }
            RtcOp::Path => {
                let (local, remote) = link.selected_pair().await?;
                Some(RtcReport::Path(CandidatePair {
                    local: kind_of(local.typ)?,
                    remote: kind_of(remote.typ)?,
                    tcp: local.protocol == RTCIceProtocol::Tcp,
                }))
            }
            RtcOp::Candidate(_) | RtcOp::Send { .. } | RtcOp::Close => None,
        }
    }
}

/// Sends frames in order; a failed reliable send is reported as the connection closing
/// (the core then moves the traffic to the relay). A volatile frame that finds no open
/// volatile channel goes back to the core for the relay.
async fn write_frames(
    link: Arc<RtcLink>,
    key: u64,
    mut rx: mpsc::UnboundedReceiver<(bool, Bytes)>,
    reports: Reports,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let (reliable, frame) = tokio::select! {
            biased;
            _ = &mut stop => break,
            next = rx.recv() => match next {
                Some(x) => x,
                None => break,
            },
        };
        if !reliable && !link.channel_open(false) {
            let _ = reports.send((key, RtcReport::Unsent(frame)));
            continue;
        }
        let sent = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = async {
                if reliable {
                    link.send(frame).await
                } else {
                    link.send_volatile(frame).await
                }
            } => r,
        };
        if let Err(e) = sent
            && reliable
        {
            let _ = reports.send((key, RtcReport::Closed(format!("send failed: {e}"))));
            break;
        }
    }
}

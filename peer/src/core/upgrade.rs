//! Upgrades: the glue between each peer's negotiation and its peer connection. The core
//! never waits for WebRTC: it asks the carrier for an operation ([`RtcOp`]) and goes on;
//! the outcome comes back later as an [`RtcReport`].
use socketio_p2p_signaling::protocol::{Frame, Op, PeerInfo, Signal, SignalFrom};

use super::negotiate::{Action, Reason};
use super::{Core, CreditOp, Output, ReqKind, RtcOp, RtcReport, Timer};
use crate::error::Error;
use crate::payload::{PeerEvent, Transport};

impl Core {
    fn info_of(&self, id: &str) -> Option<PeerInfo> {
        self.peers.get(id).map(|p| p.info.clone())
    }

    fn active_channels(&self) -> usize {
        self.peers.values().filter(|p| p.neg.active()).count()
    }

    /// Starts upgrades with one peer (`done` answers when it is up) or with every peer.
    pub(super) fn start_upgrades(&mut self, only: Option<String>, done: Option<super::Reply<()>>) {
        let mut ids: Vec<String> = match &only {
            Some(id) => vec![id.clone()],
            None => self.peers.keys().cloned().collect(),
        };
        ids.sort();
        if let (Some(id), Some(done)) = (&only, done) {
            match self.peers.get_mut(id) {
                None => return done(Err(Error::PeerOffline(id.clone()))),
                Some(p) if p.transport() == Transport::DataChannel => return done(Ok(())),
                Some(p) => p.upgrade_waiters.push(done),
            }
        }
        for id in ids {
            let active = self.active_channels();
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.neg.active() {
                continue;
            }
            if active >= self.opts.num_clients {
                p.last_failure = Some(crate::stats::UpgradeFailure::CapReached);
                for w in p.upgrade_waiters.drain(..) {
                    w(Err(Error::WebRtc("num_clients reached".into())));
                }
                continue;
            }
            let acts = p.neg.start(self.now);
            self.run_actions(&id, acts);
        }
    }

    pub(super) fn on_signal(&mut self, s: SignalFrom) {
        if !self.registered() {
            // Our id decides the roles: nothing to negotiate before we have one.
            return;
        }
        if !self.peers.contains_key(&s.from) {
            self.ensure_peer(&PeerInfo {
                id: s.from.clone(),
                uid: None,
            });
        }
        let accept = self.active_channels() < self.opts.num_clients;
        let acts = match self.peers.get_mut(&s.from) {
            Some(p) => {
                let accept = accept || p.neg.active();
                p.neg.on_signal(s.signal, accept, self.now)
            }
            None => vec![],
        };
        self.run_actions(&s.from, acts);
    }

    /// A report of the peer connection `key` (ignored once that connection is replaced).
    pub(super) fn on_rtc(&mut self, key: u64, report: RtcReport) {
        let Some(id) = self.rtc_keys.get(&key).cloned() else {
            return;
        };
        let now = self.now;
        if let Some(p) = self.peers.get_mut(&id) {
            p.live.seen = now;
        }
        match report {
            RtcReport::Offer(sdp) => self.send_sdp(&id, key, Signal::Offer { sdp }),
            RtcReport::Answer(sdp) => self.send_sdp(&id, key, Signal::Answer { sdp }),
            // The stack finds candidates while it sets our description, before it reports
            // the SDP: they wait for it (the remote ignores candidates before the SDP).
            RtcReport::Candidate(c) => match self.held_candidates.get_mut(&key) {
                Some(held) => held.push(c),
                None => self.send_signal(&id, c),
            },
            RtcReport::Open => {
                let acts = self
                    .peers
                    .get_mut(&id)
                    .map(|p| p.neg.on_open(now))
                    .unwrap_or_default();
                self.run_actions(&id, acts);
            }
            // The data channel tells who sent it; the `from` field is not trusted.
            RtcReport::Frame(b) => match Frame::decode(&b) {
                Ok(frame) => {
                    self.on_frame(&id, frame.body, Transport::DataChannel);
                    self.count_in(&id, b.len());
                }
                Err(e) => tracing::warn!(%e, peer = %id, "undecodable frame on the data channel"),
            },
            RtcReport::Unsent(frame) => self.relay(&frame),
            RtcReport::Path(pair) => {
                let changed = match self.peers.get_mut(&id) {
                    Some(p) if p.transport() == Transport::DataChannel => {
                        p.candidates = Some(pair);
                        true
                    }
                    _ => false,
                };
                if changed && let Some(peer) = self.info_of(&id) {
                    let path = pair.path();
                    self.peer_event(PeerEvent::PathChanged { peer, path });
                }
            }
            RtcReport::Failed(e) => {
                tracing::debug!(%e, peer = %id, "webrtc step failed");
                let acts = self
                    .peers
                    .get_mut(&id)
                    .map(|p| p.neg.on_error(Reason::Closed(e)))
                    .unwrap_or_default();
                self.run_actions(&id, acts);
            }
            RtcReport::Closed(reason) => {
                let acts = self
                    .peers
                    .get_mut(&id)
                    .map(|p| p.neg.on_closed(Reason::Closed(reason)))
                    .unwrap_or_default();
                self.run_actions(&id, acts);
            }
        }
    }

    pub(super) fn send_signal(&mut self, to: &str, signal: Signal) {
        let op = Op::Signal {
            to: to.to_owned(),
            signal,
        };
        self.request(op, ReqKind::Signal);
    }

    /// Our offer or answer for connection `key`, then the candidates found before it.
    fn send_sdp(&mut self, id: &str, key: u64, sdp: Signal) {
        self.send_signal(id, sdp);
        for c in self.held_candidates.remove(&key).unwrap_or_default() {
            self.send_signal(id, c);
        }
    }

    pub(super) fn close_rtc(&mut self, key: u64) {
        self.rtc_keys.remove(&key);
        self.held_candidates.remove(&key);
        self.emit(Output::Rtc {
            key,
            op: RtcOp::Close,
        });
    }

    /// A fresh peer connection for `id` (closing the one it had): its key.
    fn new_rtc(&mut self, id: &str) -> u64 {
        if let Some(old) = self.peers.get_mut(id).and_then(|p| p.rtc.take()) {
            self.close_rtc(old);
        }
        self.next_key += 1;
        let key = self.next_key;
        self.rtc_keys.insert(key, id.to_owned());
        self.held_candidates.insert(key, Vec::new());
        if let Some(p) = self.peers.get_mut(id) {
            p.rtc = Some(key);
        }
        key
    }

    fn rtc_op(&mut self, id: &str, op: RtcOp) {
        if let Some(key) = self.peers.get(id).and_then(|p| p.rtc) {
            self.emit(Output::Rtc { key, op });
        }
    }

    pub(super) fn run_actions(&mut self, id: &str, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::CreateOffer => {
                    let key = self.new_rtc(id);
                    self.emit(Output::Rtc {
                        key,
                        op: RtcOp::Offer,
                    });
                }
                Action::AcceptOffer(sdp) => {
                    let key = self.new_rtc(id);
                    self.emit(Output::Rtc {
                        key,
                        op: RtcOp::Accept(sdp),
                    });
                }
                Action::AcceptAnswer(sdp) => self.rtc_op(id, RtcOp::Answer(sdp)),
                Action::AddCandidate(c) => self.rtc_op(id, RtcOp::Candidate(c)),
                Action::Send(signal) => self.send_signal(id, signal),
                Action::CloseLink => {
                    if let Some(key) = self.peers.get_mut(id).and_then(|p| p.rtc.take()) {
                        self.close_rtc(key);
                    }
                }
                Action::Upgraded => self.upgraded(id),
                Action::Downgraded(reason) => self.downgraded(id, reason),
                Action::Failed(reason) => self.failed(id, reason),
            }
        }
    }

    fn upgraded(&mut self, id: &str) {
        let now = self.now;
        let backoff = self.opts.retry_backoff.0;
        self.deadlines.clear(&Timer::Retry(id.to_owned()));
        if let Some(p) = self.peers.get_mut(id) {
            p.link.on_transport_change(now);
            p.live.seen = now;
            p.live.pinged = now;
            p.backoff = backoff;
            p.counters.upgrades += 1;
            p.last_failure = None;
            for w in p.upgrade_waiters.drain(..) {
                w(Ok(()));
            }
            self.dirty.insert(id.to_owned());
        }
        self.rtc_op(id, RtcOp::Path);
        self.credit(CreditOp::SetRelay(id.to_owned(), false));
        if let Some(peer) = self.info_of(id) {
            self.peer_event(PeerEvent::Upgraded { peer });
        }
    }

    fn downgraded(&mut self, id: &str, reason: Reason) {
        tracing::debug!(peer = id, %reason, "downgraded to the relay");
        if let Some(p) = self.peers.get_mut(id) {
            p.link.on_transport_change(self.now);
            p.candidates = None;
            p.last_failure = Some(reason.failure());
            self.dirty.insert(id.to_owned());
        }
        self.schedule_retry(id, &reason);
        if let Some(peer) = self.info_of(id) {
            let path = crate::stats::Path::Relay;
            self.peer_event(PeerEvent::PathChanged { peer, path });
        }
        self.credit(CreditOp::SetRelay(id.to_owned(), true));
        if let Some(peer) = self.info_of(id) {
            let reason = reason.to_string();
            self.peer_event(PeerEvent::Downgraded { peer, reason });
        }
    }

    fn failed(&mut self, id: &str, reason: Reason) {
        self.schedule_retry(id, &reason);
        if let Some(p) = self.peers.get_mut(id) {
            p.last_failure = Some(reason.failure());
            for w in p.upgrade_waiters.drain(..) {
                w(Err(Error::WebRtc(reason.to_string())));
            }
        }
        if let Some(peer) = self.info_of(id) {
            let reason = reason.to_string();
            self.peer_event(PeerEvent::UpgradeFailed { peer, reason });
        }
    }

    /// With auto-upgrade, tries again after the peer's backoff (unless someone said no).
    fn schedule_retry(&mut self, id: &str, reason: &Reason) -> Option<()> {
        if !self.opts.auto_upgrade || !reason.retry() {
            return None;
        }
        let max = self.opts.retry_backoff.1;
        let wait = self.peers.get_mut(id)?.next_backoff(max);
        self.deadlines
            .set(Timer::Retry(id.to_owned()), self.now + wait);
        Some(())
    }

    /// A retry is due: upgrade again unless an attempt is already under way.
    pub(super) fn retry_due(&mut self, id: String) {
        let idle = self.peers.get(&id).is_some_and(|p| !p.neg.active());
        if idle && self.registered() {
            self.start_upgrades(Some(id), None);
        }
    }
}

//! WebRTC negotiation with one peer as a state machine: inputs (a wish to upgrade, signals
//! from the peer, channel open/closed, time) go in, actions come out. No sockets, no webrtc:
//! the core turns the actions into carrier operations. Tested deterministically below.
//!
//! Roles are fixed so that glare cannot happen between two of our peers: the peer with the
//! smaller id offers; the other asks for an offer with a `request` signal. If an offer still
//! crosses ours (a foreign client), the smaller id wins: its offer stands and the other side
//! drops its own and answers.
use std::time::{Duration, Instant};

use socketio_p2p_signaling::protocol::Signal;

/// Why a data channel closed or an attempt failed. Decisions (retry or not) are made on
/// the variant; the text is only for people.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reason {
    /// This application asked to go back to the relay.
    Application,
    /// The peer's application asked to go back to the relay.
    PeerApplication,
    /// The peer refused: it has `num_clients` channels already.
    PeerBusy,
    /// The peer hung up, asked for a new connection or renegotiated.
    Peer(String),
    /// No data channel within the upgrade timeout.
    Timeout(Duration),
    /// The connection failed or died on our side (ICE, a send, a dead channel, ...).
    Closed(String),
    /// We are shutting down or the peer left.
    Local(String),
}

/// Why a connection closed when ICE gave up: no candidate pair worked (or, once
/// connected, none works any more).
pub(crate) const ICE_FAILED: &str = "ICE failed: no candidate pair works";

/// The `bye` reason a refusal carries on the wire (PROTOCOL.md section 9).
pub(crate) const BYE_BUSY: &str = "busy: num_clients reached";
/// The `bye` reason an application downgrade carries on the wire.
pub(crate) const BYE_APPLICATION: &str = "downgrade requested by the application";

impl Reason {
    /// Reads the reason of a peer's `bye`.
    pub(crate) fn from_bye(text: Option<String>) -> Self {
        match text {
            None => Reason::Peer("peer hung up".into()),
            Some(t) if t.starts_with("busy") => Reason::PeerBusy,
            Some(t) if t.contains("application") => Reason::PeerApplication,
            Some(t) => Reason::Peer(t),
        }
    }

    /// The failure as the application sees it in the peer's stats.
    pub(crate) fn failure(&self) -> crate::stats::UpgradeFailure {
        use crate::stats::UpgradeFailure as F;
        match self {
            Reason::Application | Reason::PeerApplication => F::Application,
            Reason::PeerBusy => F::Refused,
            Reason::Peer(_) => F::PeerHungUp,
            Reason::Timeout(_) => F::Timeout,
            Reason::Closed(s) if s == ICE_FAILED => F::IceFailed,
            Reason::Closed(s) | Reason::Local(s) => F::Failed(s.clone()),
        }
    }

    /// Whether auto-upgrade should try again later.
    pub(crate) fn retry(&self) -> bool {
        !matches!(
            self,
            Reason::Application | Reason::PeerApplication | Reason::PeerBusy
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Application | Reason::PeerApplication => f.write_str(BYE_APPLICATION),
            Reason::PeerBusy => f.write_str(BYE_BUSY),
            Reason::Timeout(t) => write!(f, "no data channel within {t:?}"),
            Reason::Peer(s) | Reason::Closed(s) | Reason::Local(s) => f.write_str(s),
        }
    }
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Create a fresh peer connection and an offer, then send it.
    CreateOffer,
    /// Create a fresh peer connection, apply this offer, send the answer.
    AcceptOffer(String),
    /// Apply the answer to our offer.
    AcceptAnswer(String),
    /// Add a remote ICE candidate (the signal as received).
    AddCandidate(Signal),
    /// Send this signal to the peer.
    Send(Signal),
    /// Close the peer connection, if any.
    CloseLink,
    /// The data channel is open: move traffic onto it.
    Upgraded,
    /// The data channel that carried traffic is gone: move traffic back to the relay.
    Downgraded(Reason),
    /// The attempt failed; traffic stays on the relay.
    Failed(Reason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing going on (relay only).
    Idle,
    /// We asked the peer (the offerer) for an offer.
    Requested,
    /// Our offer is out.
    Offering,
    /// Our answer is out.
    Answering,
    /// The data channel is open.
    Open,
}

#[derive(Debug)]
pub(crate) struct Negotiation {
    offerer: bool,
    phase: Phase,
    since: Instant,
    timeout: Duration,
}

impl Negotiation {
    pub(crate) fn new(me: &str, peer: &str, timeout: Duration, now: Instant) -> Self {
        Self {
            offerer: me < peer,
            phase: Phase::Idle,
            since: now,
            timeout,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// True while an attempt is under way or the channel is open (counts toward num_clients).
    pub(crate) fn active(&self) -> bool {
        self.phase != Phase::Idle
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.since = now;
    }

    /// The application (or auto-upgrade) wants a data channel with this peer.
    pub(crate) fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.phase != Phase::Idle {
            return vec![];
        }
        if self.offerer {
            self.enter(Phase::Offering, now);
            vec![Action::CreateOffer]
        } else {
            self.enter(Phase::Requested, now);
            vec![Action::Send(Signal::Request)]
        }
    }

    /// A signal from the peer. `accept` says whether we may take one more data channel
    /// (num_clients); a refused attempt gets a `bye`.
    pub(crate) fn on_signal(&mut self, signal: Signal, accept: bool, now: Instant) -> Vec<Action> {
        match signal {
            Signal::Request => {
                if !self.offerer {
                    // Two answerers cannot happen between our peers; tell the peer to offer.
                    return vec![Action::Send(Signal::Request)];
                }
                match self.phase {
                    Phase::Offering => vec![],
                    Phase::Open => {
                        // The peer lost its channel and wants a new one.
                        self.enter(Phase::Offering, now);
                        vec![
                            Action::CloseLink,
                            Action::Downgraded(Reason::Peer(
                                "peer asked for a new connection".into(),
                            )),
                            Action::CreateOffer,
                        ]
                    }
                    _ if !accept => vec![Action::Send(Signal::Bye {
                        reason: Some(BYE_BUSY.into()),
                    })],
                    _ => {
                        self.enter(Phase::Offering, now);
                        vec![Action::CreateOffer]
                    }
                }
            }
            Signal::Offer { sdp } => {
                if self.phase == Phase::Offering && self.offerer {
                    // Glare: our offer stands, theirs is dropped.
                    return vec![];
                }
                if !accept && self.phase == Phase::Idle {
                    return vec![Action::Send(Signal::Bye {
                        reason: Some(BYE_BUSY.into()),
                    })];
                }
                let was_open = self.phase == Phase::Open;
                self.enter(Phase::Answering, now);
                let mut out = vec![Action::CloseLink];
                if was_open {
                    out.push(Action::Downgraded(Reason::Peer("peer renegotiated".into())));
                }
                out.push(Action::AcceptOffer(sdp));
                out
            }
            Signal::Answer { sdp } => {
                if self.phase == Phase::Offering {
                    vec![Action::AcceptAnswer(sdp)]
                } else {
                    vec![]
                }
            }
            c @ Signal::Candidate { .. } => match self.phase {
                Phase::Offering | Phase::Answering | Phase::Open => vec![Action::AddCandidate(c)],
                _ => vec![],
            },
            Signal::Bye { reason } => self.closed_with(Reason::from_bye(reason), false),
        }
    }

    /// The data channel opened.
    pub(crate) fn on_open(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Offering | Phase::Answering => {
                self.enter(Phase::Open, now);
                vec![Action::Upgraded]
            }
            _ => vec![],
        }
    }

    /// The peer connection closed or failed by itself.
    pub(crate) fn on_closed(&mut self, reason: Reason) -> Vec<Action> {
        self.closed_with(reason, true)
    }

    /// A local WebRTC operation failed (bad remote SDP, ...).
    pub(crate) fn on_error(&mut self, reason: Reason) -> Vec<Action> {
        self.closed_with(reason, true)
    }

    /// Local request to go back to the relay (application or peer left).
    pub(crate) fn hang_up(&mut self, reason: Reason) -> Vec<Action> {
        self.closed_with(reason, true)
    }

    fn closed_with(&mut self, reason: Reason, tell_peer: bool) -> Vec<Action> {
        let phase = self.phase;
        self.phase = Phase::Idle;
        let mut out = Vec::new();
        match phase {
            Phase::Idle => return out,
            Phase::Open => {
                out.push(Action::CloseLink);
                out.push(Action::Downgraded(reason.clone()));
            }
            Phase::Requested | Phase::Offering | Phase::Answering => {
                out.push(Action::CloseLink);
                out.push(Action::Failed(reason.clone()));
            }
        }
        if tell_peer {
            out.push(Action::Send(Signal::Bye {
                reason: Some(reason.to_string()),
            }));
        }
        out
    }

    /// Timer: an attempt that takes longer than the upgrade timeout fails.
    /// When [`Negotiation::on_tick`] next has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        matches!(
            self.phase,
            Phase::Requested | Phase::Offering | Phase::Answering
        )
        .then(|| self.since + self.timeout)
    }

    pub(crate) fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Requested | Phase::Offering | Phase::Answering
                if now.duration_since(self.since) >= self.timeout =>
            {
                self.closed_with(Reason::Timeout(self.timeout), true)
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn pair(now: Instant) -> (Negotiation, Negotiation) {
        (
            Negotiation::new("a", "b", T, now),
            Negotiation::new("b", "a", T, now),
        )
    }

    #[test]
    fn smaller_id_offers_larger_requests() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        assert_eq!(a.start(now), vec![Action::CreateOffer]);
        assert_eq!(b.start(now), vec![Action::Send(Signal::Request)]);
        // b's request reaches a, which is already offering: nothing more.
        assert_eq!(a.on_signal(Signal::Request, true, now), vec![]);
        // a's offer reaches b (Requested): b answers.
        let acts = b.on_signal(Signal::Offer { sdp: "o".into() }, true, now);
        assert_eq!(
            acts,
            vec![Action::CloseLink, Action::AcceptOffer("o".into())]
        );
        assert_eq!(
            a.on_signal(Signal::Answer { sdp: "x".into() }, true, now),
            vec![Action::AcceptAnswer("x".into())]
        );
        assert_eq!(a.on_open(now), vec![Action::Upgraded]);
        assert_eq!(b.on_open(now), vec![Action::Upgraded]);
        assert_eq!(a.phase(), Phase::Open);
    }

    #[test]
    fn glare_is_won_by_the_smaller_id() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        a.start(now);
        // A foreign client "b" offers at the same time: a ignores it.
        assert_eq!(
            a.on_signal(
                Signal::Offer {
                    sdp: "from-b".into()
                },
                true,
                now
            ),
            vec![]
        );
        // b (not the offerer) always takes a's offer, whatever it was doing.
        b.phase = Phase::Offering;
        let acts = b.on_signal(
            Signal::Offer {
                sdp: "from-a".into(),
            },
            true,
            now,
        );
        assert!(acts.contains(&Action::AcceptOffer("from-a".into())));
        assert_eq!(b.phase(), Phase::Answering);
    }

    #[test]
    fn timeout_fails_and_says_bye() {
        let now = Instant::now();
        let (mut a, _) = pair(now);
        a.start(now);
        assert!(a.on_tick(now + Duration::from_secs(1)).is_empty());
        let acts = a.on_tick(now + T);
        assert_eq!(acts[0], Action::CloseLink);
        assert!(matches!(acts[1], Action::Failed(_)));
        assert!(matches!(acts[2], Action::Send(Signal::Bye { .. })));
        assert_eq!(a.phase(), Phase::Idle);
    }

    #[test]
    fn close_after_open_downgrades_and_busy_is_refused() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        a.start(now);
        a.on_open(now);
        let acts = a.on_closed(Reason::Closed("ice failed".into()));
        assert_eq!(acts[0], Action::CloseLink);
        assert_eq!(
            acts[1],
            Action::Downgraded(Reason::Closed("ice failed".into()))
        );
        // b at its num_clients limit refuses an offer.
        let acts = b.on_signal(Signal::Offer { sdp: "o".into() }, false, now);
        assert!(matches!(acts[0], Action::Send(Signal::Bye { .. })));
        assert_eq!(b.phase(), Phase::Idle);
        // a gets the bye while offering: failed, no bye back.
        a.start(now);
        let acts = a.on_signal(
            Signal::Bye {
                reason: Some("busy".into()),
            },
            true,
            now,
        );
        assert_eq!(
            acts,
            vec![Action::CloseLink, Action::Failed(Reason::PeerBusy)]
        );
    }
}

//! One peer as the core sees it: its reliable link, its WebRTC negotiation, the liveness
//! of its data channel and the retry backoff.
use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use socketio_p2p_signaling::protocol::PeerInfo;

use super::Delivery;
use super::command::Reply;
use super::link::Link;
use super::negotiate::{Negotiation, Phase};
use crate::payload::Transport;
use crate::stats::{CandidatePair, Path, PeerStats, UpgradeFailure};

/// The liveness rule of an open data channel: silent for `dc_timeout` is dead; silent for a
/// third of it, we ping.
pub(super) struct Liveness {
    /// Last time anything arrived on the data channel.
    pub(super) seen: Instant,
    /// Last time we pinged over the data channel.
    pub(super) pinged: Instant,
}

pub(super) struct Peer {
    pub(super) info: PeerInfo,
    pub(super) rooms: HashSet<String>,
    pub(super) link: Link,
    pub(super) neg: Negotiation,
    /// The key of our peer connection with it, if any.
    pub(super) rtc: Option<u64>,
    pub(super) upgrade_waiters: Vec<Reply<()>>,
    pub(super) live: Liveness,
    pub(super) backoff: Duration,
    /// Received messages waiting for room in the application's queue (`None`: nothing to
    /// hand over, only the sequence number to acknowledge in order).
    pub(super) held: VecDeque<(u64, Option<Delivery>)>,
    pub(super) counters: Counters,
    /// The candidates of the open data channel, once known.
    pub(super) candidates: Option<CandidatePair>,
    pub(super) last_failure: Option<UpgradeFailure>,
}

/// Traffic with one peer, both ways, on any transport.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counters {
    pub(super) frames_sent: u64,
    pub(super) bytes_sent: u64,
    pub(super) frames_received: u64,
    pub(super) bytes_received: u64,
    pub(super) upgrades: u64,
}

impl Peer {
    pub(super) fn new(info: &PeerInfo, me: &str, opts: &crate::P2pOptions, now: Instant) -> Self {
        Peer {
            info: info.clone(),
            rooms: HashSet::new(),
            link: Link::new(&info.id, opts.window, opts.max_message_size, now),
            neg: Negotiation::new(me, &info.id, opts.upgrade_timeout, now),
            rtc: None,
            upgrade_waiters: Vec::new(),
            live: Liveness {
                seen: now,
                pinged: now,
            },
            backoff: opts.retry_backoff.0,
            held: VecDeque::new(),
            counters: Counters::default(),
            candidates: None,
            last_failure: None,
        }
    }

    /// The data channel is open (the negotiation says so; the connection key is ours).
    pub(super) fn transport(&self) -> Transport {
        if self.rtc.is_some() && self.neg.phase() == Phase::Open {
            Transport::DataChannel
        } else {
            Transport::Relay
        }
    }

    /// The path messages take now.
    pub(super) fn path(&self) -> Path {
        match (self.transport(), self.candidates) {
            (Transport::Relay, _) => Path::Relay,
            (Transport::DataChannel, Some(c)) => c.path(),
            // Open, candidates not known yet: without TURN servers it is direct.
            (_, None) => Path::Direct,
        }
    }

    pub(super) fn stats(&self) -> PeerStats {
        let c = self.counters;
        PeerStats {
            transport: self.transport(),
            path: self.path(),
            candidates: self.candidates,
            rtt: self.link.rtt(),
            frames_sent: c.frames_sent,
            bytes_sent: c.bytes_sent,
            frames_received: c.frames_received,
            bytes_received: c.bytes_received,
            resends: self.link.resends(),
            upgrades: c.upgrades,
            last_upgrade_failure: self.last_failure.clone(),
        }
    }

    /// The next backoff step for a retry, doubling up to `max`.
    pub(super) fn next_backoff(&mut self, max: Duration) -> Duration {
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(max);
        d
    }

    /// When the link, the negotiation or the channel's liveness next needs the time.
    pub(super) fn poll_timeout(&self, dc_timeout: Duration) -> Option<Instant> {
        let mut t = [self.link.poll_timeout(), self.neg.poll_timeout(), None];
        if self.transport() == Transport::DataChannel {
            let dead = self.live.seen + dc_timeout;
            let ping = self.live.seen.max(self.live.pinged) + dc_timeout / 3;
            t[2] = Some(dead.min(ping));
        }
        t.into_iter().flatten().min()
    }
}

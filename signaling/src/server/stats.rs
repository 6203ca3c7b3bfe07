//! What a node is doing: [`P2pSignaling::stats`].
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::P2pSignaling;
use crate::protocol::{ErrorCode, Signal};

/// A snapshot of one node, from [`P2pSignaling::stats`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SignalingStats {
    /// Registered peers of this node (away ones included).
    pub peers: usize,
    /// Peers inside `resume_grace`: their connection broke, their place is kept.
    pub away: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// Topics with at least one subscriber.
    pub topics: usize,
    /// Frames relayed to their targets (counted once per target batch sent).
    pub frames_relayed: u64,
    /// Bytes of those frames.
    pub bytes_relayed: u64,
    /// Upgrades started: offers relayed.
    pub offers: u64,
    /// Answers relayed.
    pub answers: u64,
    /// Upgrades ended by a `bye` (failed, refused or closed).
    pub byes: u64,
    /// Errors sent to clients, by code.
    pub errors: BTreeMap<String, u64>,
}

/// The counters behind [`SignalingStats`].
#[derive(Default)]
pub(super) struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    offers: AtomicU64,
    answers: AtomicU64,
    byes: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    pub(super) fn relayed(&self, frames: usize, bytes: usize) {
        self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn signal(&self, s: &Signal) {
        let c = match s {
            Signal::Offer { .. } => &self.offers,
            Signal::Answer { .. } => &self.answers,
            Signal::Bye { .. } => &self.byes,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn error(&self, code: ErrorCode) {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *e.entry(code.to_string()).or_insert(0) += 1;
    }
}

impl P2pSignaling {
    /// A snapshot of this node: peers, rooms, topics, relayed frames and bytes, upgrades
    /// signaled, errors by code.
    pub fn stats(&self) -> SignalingStats {
        let c = &self.inner.counters;
        let (peers, away, rooms, topics) = {
            let st = self.lock();
            let local = st.conns.values().filter(|c| c.info.is_some());
            let (peers, away) = local.fold((0, 0), |(p, a), c| {
                (p + 1, a + usize::from(c.away.is_some()))
            });
            (peers, away, st.rooms.len(), st.services.topics.len())
        };
        SignalingStats {
            peers,
            away,
            rooms,
            topics,
            frames_relayed: c.frames.load(Ordering::Relaxed),
            bytes_relayed: c.bytes.load(Ordering::Relaxed),
            offers: c.offers.load(Ordering::Relaxed),
            answers: c.answers.load(Ordering::Relaxed),
            byes: c.byes.load(Ordering::Relaxed),
            errors: c.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

//! What a peer is on, and how it is doing: [`PeerStats`] from [`crate::P2p::stats`].
use std::time::Duration;

use crate::payload::Transport;

/// The path messages to a peer take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Path {
    /// Through the Socket.IO server.
    Relay,
    /// A data channel straight between the two peers (host, server-reflexive or
    /// peer-reflexive candidates on both sides).
    Direct,
    /// A data channel through a TURN server (a relay candidate on one side at least).
    Turn,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Relay => "relay",
            Path::Direct => "direct",
            Path::Turn => "turn",
        })
    }
}

/// The type of an ICE candidate (RFC 8445).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CandidateKind {
    /// An address of the host itself.
    Host,
    /// The address a STUN server saw (behind a NAT).
    ServerReflexive,
    /// An address the other peer saw.
    PeerReflexive,
    /// An address on a TURN server.
    Relay,
}

/// The candidates a data channel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct CandidatePair {
    /// Ours.
    pub local: CandidateKind,
    /// The peer's.
    pub remote: CandidateKind,
    /// Over TCP rather than UDP.
    pub tcp: bool,
}

impl CandidatePair {
    /// A pair with a TURN candidate on either side goes through TURN.
    pub fn path(&self) -> Path {
        if self.local == CandidateKind::Relay || self.remote == CandidateKind::Relay {
            Path::Turn
        } else {
            Path::Direct
        }
    }
}

/// Why the last upgrade with a peer did not give a data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeFailure {
    /// No data channel within `upgrade_timeout`.
    Timeout,
    /// The peer refused: it has `num_clients` channels already.
    Refused,
    /// We have `num_clients` channels already.
    CapReached,
    /// The peer hung up or asked for a new connection.
    PeerHungUp,
    /// An application asked to go back to the relay (ours or the peer's).
    Application,
    /// ICE found no candidate pair that works (both peers behind NATs that do not let a
    /// direct path through, and no usable TURN server). Reported when ICE gives up (after
    /// about 8 s of checks) within `upgrade_timeout`; a shorter `upgrade_timeout` reports
    /// `Timeout`.
    IceFailed,
    /// The connection failed otherwise (DTLS, a bad description...): the text says how.
    Failed(String),
}

/// Counters and state of one peer, from [`crate::P2p::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PeerStats {
    /// What carries messages now.
    pub transport: Transport,
    /// The path: relay, direct or TURN.
    pub path: Path,
    /// The data channel's candidates, once known.
    pub candidates: Option<CandidatePair>,
    /// Smoothed time from sending a frame to its acknowledgement (the receiver may delay
    /// acknowledgements by a few milliseconds).
    pub rtt: Option<Duration>,
    /// Frames sent to the peer (data, acknowledgements, pings), on any transport.
    pub frames_sent: u64,
    /// Bytes of those frames.
    pub bytes_sent: u64,
    /// Frames received from the peer.
    pub frames_received: u64,
    /// Bytes of those frames.
    pub bytes_received: u64,
    /// Data frames sent again (lost, dropped by a busy server, or moved to a new transport).
    pub resends: u64,
    /// Upgrades that gave a data channel.
    pub upgrades: u64,
    /// Why the last upgrade failed, if it did.
    pub last_upgrade_failure: Option<UpgradeFailure>,
}

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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex as StdMutex, MutexGuard};
use std::time::Duration;

mod channel;
mod config;
mod error;
mod event;
mod link;
mod nominate;
mod peer;
mod sdp;
mod shared;
#[cfg(test)]
mod tests;
mod turn_tcp;

pub(crate) use config::{IceServerConfig, RtcConfig};
pub(crate) use error::RtcError;
pub(crate) use event::{CandidateInit, RtcEvent};
pub(crate) use link::RtcLink;

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
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) fn live_links() -> usize {
    LIVE_LINKS.load(Ordering::SeqCst)
}

/// Locks a std mutex, ignoring poisoning (the protected data stays consistent:
/// every critical section is a plain assignment or a channel send).
fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

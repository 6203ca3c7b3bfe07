//! The reliable layer between two peers, independent of the transport: sequence numbers,
//! cumulative acknowledgements, a send window, go-back-N retransmission and reassembly of
//! fragmented messages. Pure logic: it takes inputs and returns frames to send, so it is
//! tested without sockets.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use socketio_p2p_signaling::protocol::{Body, CodecError, Frame, Msg, WirePayload};

/// Largest payload chunk in one frame (data channels take 16 KiB messages everywhere).
pub(crate) const CHUNK: usize = 16 * 1024;
const MIN_RTO: Duration = Duration::from_millis(200);
/// The shortest first retransmission timeout after a transport change.
const SWITCH_RTO_MIN: Duration = Duration::from_millis(20);
/// The first retransmission timeout after a transport change when no round trip was measured.
const SWITCH_RTO_UNMEASURED: Duration = Duration::from_millis(40);
const MAX_RTO: Duration = Duration::from_secs(2);
const ACK_DELAY: Duration = Duration::from_millis(5);

/// Frames a message with this payload takes on a link.
pub(crate) fn frames_of(payload: &WirePayload) -> usize {
    payload.bytes().len().div_ceil(CHUNK).max(1)
}

/// A complete message delivered by [`Link::on_data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// A whole message.
    Msg(Msg),
    /// A message that grew past the size limit and was dropped.
    TooLarge {
        /// An event that asked for a reply: answer it with an error.
        reply_to: Option<u64>,
        /// A reply to one of our own requests: fail that request locally.
        failed_reply: Option<u64>,
        size: usize,
    },
}

#[derive(Debug)]
struct Partial {
    first: Msg,
    data: BytesMut,
    /// Payload bytes so far, the first frame's included.
    size: usize,
    too_large: bool,
}

/// Reliable, ordered delivery to one peer.
#[derive(Debug)]
pub(crate) struct Link {
    to: String,
    window: u64,
    // send side
    next_seq: u64,
    /// Frames not yet acknowledged, oldest first, with contiguous seqs: (seq, encoded
    /// frame, counted against the sender's credit).
    unacked: VecDeque<(u64, Bytes, bool)>,
    /// Highest seq handed to the transport since the last go-back.
    sent_upto: u64,
    acked: u64,
    rto: Duration,
    last_progress: Instant,
    // receive side
    expected: u64,
    partial: Option<Partial>,
    /// Highest seq whose message the application has taken: what we acknowledge. Frames
    /// received but not yet taken are not acknowledged, so a slow application holds its
    /// senders to one window.
    consumed: u64,
    ack_sent: u64,
    first_unacked_at: Option<Instant>,
    nacked_at: u64,
    max_message: usize,
    /// After a go-back for a frame the server dropped (`Busy`): its seq. Reports for later
    /// frames are about the transmission that go-back already repeats, so they are ignored
    /// until the acknowledgements pass this point (the retransmission timer still covers
    /// frames dropped again).
    dropped_goback: Option<u64>,
    // statistics
    /// Highest seq ever handed to a transport (anything at or below it again is a resend).
    highest_sent: u64,
    resends: u64,
    /// The frame being timed for the round trip, and when it was sent.
    rtt_probe: Option<(u64, Instant)>,
    srtt: Option<Duration>,
}

impl Link {
    pub(crate) fn new(to: &str, window: usize, max_message: usize, now: Instant) -> Self {
        Self {
            to: to.to_owned(),
            window: window.max(2) as u64,
            next_seq: 1,
            unacked: VecDeque::new(),
            sent_upto: 0,
            acked: 0,
            rto: MIN_RTO,
            last_progress: now,
            expected: 1,
            partial: None,
            consumed: 0,
            ack_sent: 0,
            first_unacked_at: None,
            nacked_at: 0,
            dropped_goback: None,
            max_message,
            highest_sent: 0,
            resends: 0,
            rtt_probe: None,
            srtt: None,
        }
    }

    /// Queues a message, split into frames of at most [`CHUNK`] payload bytes. `counted`:
    /// its frames hold the sender's credit until acknowledged ([`Link::on_ack`] tells how
    /// many were released).
    pub(crate) fn push(&mut self, msg: Msg, counted: bool) -> Result<(), CodecError> {
        let (head, rest) = split_payload(msg);
        let mut frames = vec![head];
        let mut rest = rest;
        while !rest.is_empty() {
            let n = rest.len().min(CHUNK);
            frames.push(Msg::Continuation {
                data: rest.split_to(n),
            });
        }
        let last = frames.len() - 1;
        for (i, msg) in frames.into_iter().enumerate() {
            let seq = self.next_seq;
            self.next_seq += 1;
            let frame = Frame {
                to: self.to.clone(),
                from: String::new(),
                body: Body::Data {
                    seq,
                    more: i != last,
                    msg,
                },
            }
            .encode()?;
            self.unacked.push_back((seq, frame, counted));
        }
        Ok(())
    }

    /// Frames the transport should send now (within the window).
    pub(crate) fn poll_transmit(&mut self, out: &mut Vec<Bytes>, now: Instant) {
        let limit = self.acked + self.window;
        let Some(&(front, _, _)) = self.unacked.front() else {
            return;
        };
        // Seqs are contiguous: the next frame to send is at a known index.
        let mut i =
            usize::try_from((self.sent_upto + 1).saturating_sub(front)).unwrap_or(usize::MAX);
        while let Some((seq, frame, _)) = self.unacked.get(i) {
            if *seq > limit {
                break;
            }
            out.push(frame.clone());
            if *seq <= self.highest_sent {
                self.resends += 1;
            } else {
                self.highest_sent = *seq;
                // One frame at a time is timed, and never a resent one (Karn).
                if self.rtt_probe.is_none() {
                    self.rtt_probe = Some((*seq, now));
                }
            }
            self.sent_upto = *seq;
            i += 1;
        }
    }

    /// Frames sent more than once so far.
    pub(crate) fn resends(&self) -> u64 {
        self.resends
    }

    /// The smoothed round trip: from sending a frame to its acknowledgement (which the
    /// receiver may delay by a few milliseconds).
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// An acknowledgement arrived. Returns how many counted frames it released.
    pub(crate) fn on_ack(&mut self, upto: u64, nack: bool, now: Instant) -> usize {
        let mut released = 0;
        if upto > self.acked && upto < self.next_seq {
            self.acked = upto;
            if let Some((seq, sent)) = self.rtt_probe
                && upto >= seq
            {
                self.rtt_probe = None;
                let sample = now.saturating_duration_since(sent);
                self.srtt = Some(match self.srtt {
                    Some(s) => (s * 7 + sample) / 8,
                    None => sample,
                });
            }
            while self.unacked.front().is_some_and(|(s, _, _)| *s <= upto) {
                if let Some((_, _, true)) = self.unacked.pop_front() {
                    released += 1;
                }
            }
            self.last_progress = now;
            self.rto = MIN_RTO;
        }
        if self.sent_upto < self.acked {
            self.sent_upto = self.acked;
        }
        if nack && upto >= self.acked && self.sent_upto > upto {
            // The receiver saw a gap: send everything after `upto` again.
            self.sent_upto = upto;
            self.last_progress = now;
        }
        released
    }

    /// The relay dropped frame `seq` (the server said Busy): resend from it.
    pub(crate) fn on_dropped(&mut self, seq: u64, now: Instant) {
        if self.dropped_goback.is_some_and(|g| g <= self.acked) {
            self.dropped_goback = None;
        }
        if self.dropped_goback.is_some_and(|g| seq >= g) {
            return;
        }
        if seq > self.acked && seq <= self.sent_upto {
            self.rtt_probe = None;
            self.sent_upto = seq - 1;
            self.dropped_goback = Some(seq);
            self.last_progress = now;
        }
    }

    /// The transport changed: everything unacknowledged goes again on the new one.
    pub(crate) fn on_transport_change(&mut self, now: Instant) {
        self.rtt_probe = None;
        self.sent_upto = self.acked;
        self.last_progress = now;
        self.rto = self.switch_rto();
    }

    /// The first retransmission timeout on a new transport: twice the round trip seen so
    /// far plus the receiver's ack delay, within [`SWITCH_RTO_MIN`, `MIN_RTO`]. A new data
    /// channel now and then loses the first message sent right after it opened.
    fn switch_rto(&self) -> Duration {
        self.srtt.map_or(SWITCH_RTO_UNMEASURED, |s| {
            (s * 2 + ACK_DELAY).clamp(SWITCH_RTO_MIN, MIN_RTO)
        })
    }

    /// Timer: go back N when nothing was acknowledged for a retransmission timeout.
    pub(crate) fn on_tick(&mut self, now: Instant) {
        if self.sent_upto > self.acked && now.duration_since(self.last_progress) >= self.rto {
            self.rtt_probe = None;
            self.sent_upto = self.acked;
            self.last_progress = now;
            self.rto = (self.rto * 2).min(MAX_RTO);
        }
    }

    /// When [`Link::on_tick`] or [`Link::ack_due`] next has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<std::time::Instant> {
        let resend = (self.sent_upto > self.acked).then(|| self.last_progress + self.rto);
        let ack = self.first_unacked_at.map(|t| t + ACK_DELAY);
        match (resend, ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Frames queued and not yet acknowledged.
    pub(crate) fn backlog(&self) -> usize {
        self.unacked.len()
    }

    /// A data frame arrived. Returns the complete message, if this frame completed one, and
    /// an acknowledgement to send now (`Some((upto, nack))`). A returned message is not
    /// acknowledged until the caller passes its `seq` to [`Link::consume`].
    pub(crate) fn on_data(
        &mut self,
        seq: u64,
        more: bool,
        msg: Msg,
        now: Instant,
    ) -> (Option<Delivered>, Option<(u64, bool)>) {
        if seq < self.expected {
            // Duplicate (a retransmission after a lost or withheld ack): acknowledge again.
            return (None, Some((self.consumed, false)));
        }
        if seq > self.expected {
            // Gap: ask for a resend once per gap position.
            if self.nacked_at != self.expected {
                self.nacked_at = self.expected;
                return (None, Some((self.consumed, true)));
            }
            return (None, None);
        }
        self.expected += 1;
        match self.reassemble(more, msg) {
            Some(d) => (Some(d), None),
            // A fragment kept for reassembly (bounded by max_message) counts as taken.
            None => (None, self.consume(seq, now)),
        }
    }

    /// The application took the message that ended at `seq`. Returns an acknowledgement to
    /// send now, if one is due.
    pub(crate) fn consume(&mut self, seq: u64, now: Instant) -> Option<(u64, bool)> {
        if seq <= self.consumed || seq >= self.expected {
            return None;
        }
        self.consumed = seq;
        self.first_unacked_at.get_or_insert(now);
        if self.consumed - self.ack_sent >= (self.window / 4).max(1) {
            self.take_ack()
        } else {
            None
        }
    }

    /// Timer: a delayed acknowledgement is due.
    pub(crate) fn ack_due(&mut self, now: Instant) -> Option<(u64, bool)> {
        match self.first_unacked_at {
            Some(t) if now.duration_since(t) >= ACK_DELAY => self.take_ack(),
            _ => None,
        }
    }

    /// Acknowledges everything taken so far.
    pub(crate) fn take_ack(&mut self) -> Option<(u64, bool)> {
        self.first_unacked_at = None;
        if self.consumed <= self.ack_sent {
            return None;
        }
        self.ack_sent = self.consumed;
        Some((self.consumed, false))
    }

    fn reassemble(&mut self, more: bool, msg: Msg) -> Option<Delivered> {
        match (self.partial.take(), msg) {
            (None, Msg::Continuation { .. }) => None, // stray continuation: ignore
            (None, msg) if !more => Some(Delivered::Msg(msg)),
            (None, first) => {
                let size = payload_len(&first);
                self.partial = Some(Partial {
                    first,
                    data: BytesMut::new(),
                    size,
                    too_large: size > self.max_message,
                });
                None
            }
            (Some(mut p), Msg::Continuation { data }) => {
                p.size += data.len();
                if !p.too_large {
                    if p.size > self.max_message {
                        p.too_large = true;
                        p.data = BytesMut::new();
                    } else {
                        p.data.extend_from_slice(&data);
                    }
                }
                if more {
                    self.partial = Some(p);
                    None
                } else if p.too_large {
                    Some(Delivered::TooLarge {
                        reply_to: match p.first {
                            Msg::Event { ack_id, .. } => ack_id.map(std::num::NonZeroU64::get),
                            _ => None,
                        },
                        failed_reply: match p.first {
                            Msg::Reply { ack_id, .. } => Some(ack_id),
                            _ => None,
                        },
                        size: p.size,
                    })
                } else {
                    Some(Delivered::Msg(join_payload(p.first, p.data.freeze())))
                }
            }
            (Some(_), msg) => {
                // A new message started before the old one ended: keep the new one.
                self.reassemble(more, msg)
            }
        }
    }
}

fn payload_len(msg: &Msg) -> usize {
    match msg {
        Msg::Event { payload, .. } | Msg::Reply { payload, .. } => payload.bytes().len(),
        _ => 0,
    }
}

/// Splits a message into its head (with the first chunk of payload) and the rest.
fn split_payload(msg: Msg) -> (Msg, Bytes) {
    let cut = |p: WirePayload| -> (WirePayload, Bytes) {
        let (mut b, binary) = match p {
            WirePayload::Json(b) => (b, false),
            WirePayload::Binary(b) => (b, true),
        };
        let rest = if b.len() > CHUNK {
            b.split_off(CHUNK)
        } else {
            Bytes::new()
        };
        (
            if binary {
                WirePayload::Binary(b)
            } else {
                WirePayload::Json(b)
            },
            rest,
        )
    };
    match msg {
        Msg::Event {
            event,
            ack_id,
            payload,
        } => {
            let (payload, rest) = cut(payload);
            (
                Msg::Event {
                    event,
                    ack_id,
                    payload,
                },
                rest,
            )
        }
        Msg::Reply { ack_id, payload } => {
            let (payload, rest) = cut(payload);
            (Msg::Reply { ack_id, payload }, rest)
        }
        other => (other, Bytes::new()),
    }
}

fn join_payload(first: Msg, rest: Bytes) -> Msg {
    let join = |p: WirePayload| {
        let (head, binary) = match p {
            WirePayload::Json(b) => (b, false),
            WirePayload::Binary(b) => (b, true),
        };
        let mut all = BytesMut::with_capacity(head.len() + rest.len());
        all.extend_from_slice(&head);
        all.extend_from_slice(&rest);
        let all = all.freeze();
        if binary {
            WirePayload::Binary(all)
        } else {
            WirePayload::Json(all)
        }
    };
    match first {
        Msg::Event {
            event,
            ack_id,
            payload,
        } => Msg::Event {
            event,
            ack_id,
            payload: join(payload),
        },
        Msg::Reply { ack_id, payload } => Msg::Reply {
            ack_id,
            payload: join(payload),
        },
        other => other,
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;

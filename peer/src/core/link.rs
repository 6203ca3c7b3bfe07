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
    pub(crate) fn poll_transmit(&mut self, out: &mut Vec<Bytes>) {
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
            self.sent_upto = *seq;
            i += 1;
        }
    }

    /// An acknowledgement arrived. Returns how many counted frames it released.
    pub(crate) fn on_ack(&mut self, upto: u64, nack: bool, now: Instant) -> usize {
        let mut released = 0;
        if upto > self.acked && upto < self.next_seq {
            self.acked = upto;
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
            self.sent_upto = seq - 1;
            self.dropped_goback = Some(seq);
            self.last_progress = now;
        }
    }

    /// The transport changed: everything unacknowledged goes again on the new one.
    pub(crate) fn on_transport_change(&mut self, now: Instant) {
        self.sent_upto = self.acked;
        self.last_progress = now;
        self.rto = MIN_RTO;
    }

    /// Timer: go back N when nothing was acknowledged for a retransmission timeout.
    pub(crate) fn on_tick(&mut self, now: Instant) {
        if self.sent_upto > self.acked && now.duration_since(self.last_progress) >= self.rto {
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
                            Msg::Event { ack_id, .. } => ack_id,
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
mod tests {
    use super::*;

    fn ev(i: u64) -> Msg {
        Msg::Event {
            event: "n".into(),
            ack_id: None,
            payload: WirePayload::Json(Bytes::from(i.to_string())),
        }
    }

    fn data_of(frame: &Bytes) -> (u64, bool, Msg) {
        match Frame::decode(frame) {
            Ok(Frame {
                body: Body::Data { seq, more, msg },
                ..
            }) => (seq, more, msg),
            other => panic!("not a data frame: {other:?}"),
        }
    }

    /// Runs two links over a lossy, reordering "wire" and checks exactly-once in-order delivery.
    fn run(n: u64, drop_every: usize, window: usize) -> Vec<Msg> {
        let t0 = Instant::now();
        let mut a = Link::new("b", window, 1 << 20, t0);
        let mut b = Link::new("a", window, 1 << 20, t0);
        for i in 0..n {
            a.push(ev(i), true).ok();
        }
        let mut got = Vec::new();
        let mut now = t0;
        // Pseudo-random loss (a fixed pattern could line up with the retransmit batches).
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        for _round in 0..100_000 {
            let mut out = Vec::new();
            a.poll_transmit(&mut out);
            let mut acks = Vec::new();
            for f in out {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if drop_every > 0 && (rng >> 33).is_multiple_of(drop_every as u64) {
                    continue;
                }
                let (seq, more, msg) = data_of(&f);
                let (d, ack) = b.on_data(seq, more, msg, now);
                if let Some(Delivered::Msg(m)) = d {
                    got.push(m);
                    acks.extend(b.consume(seq, now));
                }
                acks.extend(ack);
            }
            now += Duration::from_millis(10);
            acks.extend(b.ack_due(now));
            for (upto, nack) in acks {
                a.on_ack(upto, nack, now);
            }
            a.on_tick(now);
            if a.backlog() == 0 {
                break;
            }
        }
        got
    }

    #[test]
    fn delivers_in_order_without_loss() {
        let got = run(1000, 0, 16);
        assert_eq!(got.len(), 1000);
        assert_eq!(got, (0..1000).map(ev).collect::<Vec<_>>());
    }

    #[test]
    fn recovers_from_drops() {
        for drop_every in [2, 3, 7, 50] {
            let got = run(500, drop_every, 8);
            let want: Vec<Msg> = (0..500).map(ev).collect();
            assert_eq!(got.len(), want.len(), "drop_every={drop_every}");
            assert!(
                got == want,
                "drop_every={drop_every}: wrong order or content"
            );
        }
    }

    #[test]
    fn fragments_and_reassembles() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 1000, 1 << 20, t0);
        let mut b = Link::new("a", 1000, 1 << 20, t0);
        let big: Vec<u8> = (0..(CHUNK * 3 + 17)).map(|i| (i % 251) as u8).collect();
        let msg = Msg::Event {
            event: "f".into(),
            ack_id: Some(4),
            payload: WirePayload::Binary(Bytes::from(big)),
        };
        a.push(msg.clone(), false).ok();
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        assert_eq!(out.len(), 4);
        let mut got = None;
        for f in out {
            let (seq, more, m) = data_of(&f);
            if let (Some(d), _) = b.on_data(seq, more, m, t0) {
                b.consume(seq, t0);
                got = Some(d);
            }
        }
        assert_eq!(got, Some(Delivered::Msg(msg)));
    }

    #[test]
    fn oversized_reassembly_is_refused() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 1000, 1 << 20, t0);
        let mut b = Link::new("a", 1000, CHUNK * 2, t0);
        let big = vec![7u8; CHUNK * 3];
        a.push(
            Msg::Event {
                event: "f".into(),
                ack_id: Some(9),
                payload: WirePayload::Binary(Bytes::from(big)),
            },
            false,
        )
        .ok();
        a.push(ev(1), false).ok();
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        let mut got = Vec::new();
        for f in out {
            let (seq, more, m) = data_of(&f);
            if let (Some(d), _) = b.on_data(seq, more, m, t0) {
                got.push(d);
            }
        }
        assert!(matches!(
            got[0],
            Delivered::TooLarge {
                reply_to: Some(9),
                failed_reply: None,
                ..
            }
        ));
        assert_eq!(got[1], Delivered::Msg(ev(1)));
    }

    #[test]
    fn unconsumed_messages_are_not_acknowledged() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 8, 1 << 20, t0);
        let mut b = Link::new("a", 8, 1 << 20, t0);
        for i in 0..3 {
            a.push(ev(i), true).ok();
        }
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        let mut seqs = Vec::new();
        for f in &out {
            let (seq, more, m) = data_of(f);
            let (d, ack) = b.on_data(seq, more, m, t0);
            assert!(d.is_some() && ack.is_none());
            seqs.push(seq);
        }
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            b.ack_due(later),
            None,
            "nothing taken, nothing acknowledged"
        );
        // A retransmission of a held frame is acknowledged only up to what was taken.
        let (seq, more, m) = data_of(&out[0]);
        assert_eq!(b.on_data(seq, more, m, later).1, Some((0, false)));
        assert_eq!(
            b.consume(seqs[0], later),
            None,
            "delayed: below a quarter window"
        );
        assert_eq!(b.ack_due(later + Duration::from_secs(1)), Some((1, false)));
        assert_eq!(b.consume(seqs[1], later), None);
        assert_eq!(
            b.consume(seqs[2], later),
            Some((3, false)),
            "a quarter window: at once"
        );
    }

    #[test]
    fn a_burst_of_drop_reports_goes_back_once() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 100, 1 << 20, t0);
        for i in 0..100 {
            a.push(ev(i), true).ok();
        }
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        assert_eq!(out.len(), 100);
        // The server dropped frames 10..=100 of that transmission: one go-back, not 91.
        let mut resent = 0;
        for seq in 10..=100 {
            a.on_dropped(seq, t0);
            out.clear();
            a.poll_transmit(&mut out);
            resent += out.len();
        }
        assert_eq!(resent, 91);
        // Once acknowledged past that point, a new drop report counts again.
        a.on_ack(50, false, t0);
        a.on_dropped(60, t0);
        out.clear();
        a.poll_transmit(&mut out);
        assert_eq!(out.first().map(|f| data_of(f).0), Some(60));
    }

    #[test]
    fn acks_release_only_counted_frames() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 64, 1 << 20, t0);
        let big = Msg::Event {
            event: "f".into(),
            ack_id: None,
            payload: WirePayload::Binary(Bytes::from(vec![1u8; CHUNK * 2 + 1])),
        };
        assert_eq!(
            frames_of(&WirePayload::Binary(Bytes::from(vec![0u8; CHUNK * 2 + 1]))),
            3
        );
        a.push(big, true).ok(); // seqs 1..=3, counted
        a.push(ev(1), false).ok(); // seq 4, a reply or stream message: not counted
        a.push(ev(2), true).ok(); // seq 5
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        assert_eq!(out.len(), 5);
        assert_eq!(a.on_ack(2, false, t0), 2);
        assert_eq!(a.on_ack(2, false, t0), 0, "a repeated ack releases nothing");
        assert_eq!(a.on_ack(5, false, t0), 2);
        assert_eq!(a.backlog(), 0);
    }

    #[test]
    fn window_limits_in_flight_and_transport_change_resends() {
        let t0 = Instant::now();
        let mut a = Link::new("b", 4, 1 << 20, t0);
        for i in 0..10 {
            a.push(ev(i), true).ok();
        }
        let mut out = Vec::new();
        a.poll_transmit(&mut out);
        assert_eq!(out.len(), 4);
        out.clear();
        a.poll_transmit(&mut out);
        assert!(out.is_empty());
        a.on_ack(2, false, t0);
        a.poll_transmit(&mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        a.on_transport_change(t0);
        a.poll_transmit(&mut out);
        let seqs: Vec<u64> = out.iter().map(|f| data_of(f).0).collect();
        assert_eq!(seqs, vec![3, 4, 5, 6]);
    }
}

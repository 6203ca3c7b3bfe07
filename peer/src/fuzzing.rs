//! A driver of the reliable link for fuzzers and property tests (cargo feature `fuzzing`).
//! Not part of the API: it may change in any release.
//!
//! [`link`] reads its input as a script: two links (a sender and a receiver) joined by a
//! "wire" that the script drops, duplicates, reorders and delays frames on, plus frames of
//! the script's own making (any bytes, decoded as frames) thrown at both ends. It panics
//! when an invariant breaks:
//! - the receiver delivers messages in the order they were sent, each at most once, and
//!   every delivered message is exactly what was sent;
//! - once the script ends and the wire turns perfect, the sender's queue drains and
//!   everything sent is delivered.
//!
//! Forged frames are another matter: a link trusts its transport, so a forged data frame
//! takes the place of the real one with its seq, and a forged acknowledgement releases
//! frames nobody received (the link then stalls, as it should with a lying receiver). A script
//! that forges keeps only the first invariant (for forged acknowledgements) or none but
//! "no panic" (for forged data).
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use socketio_p2p_signaling::protocol::{Body, Frame, Msg, WirePayload};

use crate::core::link::{CHUNK, Delivered, Link};

/// A message of the script: its number in the first 8 bytes, then `len - 8` bytes of filler
/// that depend on the number.
fn message(n: u64, len: usize) -> Msg {
    let mut b = BytesMut::with_capacity(len.max(8));
    b.extend_from_slice(&n.to_be_bytes());
    b.extend((8..len).map(|i| (i as u64 ^ n) as u8));
    Msg::Event {
        event: "f".into(),
        ack_id: None,
        payload: WirePayload::Binary(b.freeze()),
    }
}

/// The number of a script message, or why `msg` is not one that was sent.
fn number_of(msg: &Msg, lens: &[usize]) -> Result<u64, String> {
    let Msg::Event {
        payload: WirePayload::Binary(b),
        ..
    } = msg
    else {
        return Err(format!("delivered a message that was never sent: {msg:?}"));
    };
    let Some(head) = b.get(..8) else {
        return Err("delivered a truncated message".into());
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(head);
    let n = u64::from_be_bytes(n);
    let Some(len) = usize::try_from(n).ok().and_then(|i| lens.get(i)) else {
        return Err(format!("delivered message {n}, never sent"));
    };
    if msg != &message(n, *len) {
        return Err(format!("message {n} delivered with wrong bytes"));
    }
    Ok(n)
}

struct Script<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let end = (self.pos + n).min(self.data.len());
        let s = &self.data[self.pos..end];
        self.pos = end;
        s
    }
}

struct Run {
    now: Instant,
    a: Link,
    b: Link,
    /// Frames from a to b, and acknowledgements from b to a.
    wire: VecDeque<Bytes>,
    acks: VecDeque<(u64, bool)>,
    lens: Vec<usize>,
    delivered: Vec<u64>,
    forged_acks: bool,
    forged_data: bool,
}

impl Run {
    fn transmit(&mut self) {
        let mut out = Vec::new();
        self.a.poll_transmit(&mut out, self.now);
        self.wire.extend(out);
    }

    /// A frame reaches b (from the wire, or made up by the script: `forged`).
    fn at_b(&mut self, frame: &Bytes, forged: bool) {
        let Ok(Frame {
            body: Body::Data { seq, more, msg },
            ..
        }) = Frame::decode(frame)
        else {
            return;
        };
        self.forged_data |= forged;
        let (delivered, ack) = self.b.on_data(seq, more, msg, self.now);
        self.acks.extend(ack);
        match delivered {
            Some(Delivered::Msg(m)) => {
                self.acks.extend(self.b.consume(seq, self.now));
                if self.forged_data {
                    return;
                }
                let n = number_of(&m, &self.lens).unwrap_or_else(|e| panic!("{e}"));
                if let Some(&last) = self.delivered.last() {
                    assert!(
                        n > last,
                        "message {n} delivered after {last}: {:?}",
                        self.delivered
                    );
                }
                self.delivered.push(n);
            }
            Some(Delivered::TooLarge { .. }) => {
                assert!(self.forged_data, "a message within the limit was refused");
            }
            None => {}
        }
    }

    fn ack_at_a(&mut self) {
        if let Some((upto, nack)) = self.acks.pop_front() {
            self.a.on_ack(upto, nack, self.now);
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.a.on_tick(self.now);
        self.acks.extend(self.b.ack_due(self.now));
    }
}

/// Runs the script `data` (see the module documentation); panics if an invariant breaks.
pub fn link(data: &[u8]) {
    let now = Instant::now();
    let window = 2 + usize::from(data.first().copied().unwrap_or(0) % 64);
    let mut s = Script {
        data: data.get(1..).unwrap_or_default(),
        pos: 0,
    };
    let mut r = Run {
        now,
        a: Link::new("b", window, 1 << 20, now),
        b: Link::new("a", window, 1 << 20, now),
        wire: VecDeque::new(),
        acks: VecDeque::new(),
        lens: Vec::new(),
        delivered: Vec::new(),
        forged_acks: false,
        forged_data: false,
    };
    while let Some(op) = s.byte() {
        match op % 14 {
            // Send a message: small mostly, now and then several frames long.
            0 | 1 => {
                let k = usize::from(s.byte().unwrap_or(0));
                // At most 4 messages of several frames and 512 in all: scripts stay cheap.
                let big = r.lens.iter().filter(|&&l| l > CHUNK).count();
                if r.lens.len() >= 512 {
                    continue;
                }
                let len = if k >= 250 && big < 4 {
                    CHUNK * (k - 248) + k
                } else {
                    8 + k % 250
                };
                let n = r.lens.len() as u64;
                r.lens.push(len);
                if r.a.push(message(n, len), n.is_multiple_of(2)).is_err() {
                    return;
                }
                r.transmit();
            }
            2 | 3 => {
                if let Some(f) = r.wire.pop_front() {
                    r.at_b(&f, false);
                }
            }
            4 => {
                r.wire.pop_front();
            }
            5 => {
                if let Some(f) = r.wire.front().cloned() {
                    r.wire.push_back(f);
                }
            }
            6 => {
                let i = usize::from(s.byte().unwrap_or(0));
                if r.wire.len() > 1 {
                    let i = i % r.wire.len();
                    r.wire.swap(0, i);
                }
            }
            7 | 8 => r.ack_at_a(),
            9 => {
                r.acks.pop_front();
            }
            10 => {
                let ms = u64::from(s.byte().unwrap_or(0)) * 8;
                r.advance(ms);
                r.transmit();
            }
            11 => {
                // Transport change, or the relay dropping a frame that was sent.
                if s.byte().unwrap_or(0).is_multiple_of(2) {
                    r.a.on_transport_change(r.now);
                } else if let Some(seq) = r
                    .wire
                    .front()
                    .and_then(|f| Frame::decode(f).ok())
                    .and_then(|f| match f.body {
                        Body::Data { seq, .. } => Some(seq),
                        _ => None,
                    })
                {
                    r.a.on_dropped(seq, r.now);
                }
                r.transmit();
            }
            // Frames of the script's making: any bytes, at b; a forged ack at a.
            12 => {
                let len = usize::from(s.byte().unwrap_or(0));
                let f = Bytes::copy_from_slice(s.bytes(len));
                r.at_b(&f, true);
            }
            _ => {
                let upto = u64::from(s.byte().unwrap_or(0));
                let nack = upto % 2 == 1;
                r.forged_acks = true;
                r.a.on_ack(upto / 2, nack, r.now);
                r.transmit();
            }
        }
    }
    // The wire turns perfect: everything must get through.
    r.wire.clear();
    r.acks.clear();
    let rounds = if r.forged_acks || r.forged_data {
        20
    } else {
        10_000
    };
    for _ in 0..rounds {
        if r.a.backlog() == 0 {
            break;
        }
        r.advance(2_000);
        r.transmit();
        while let Some(f) = r.wire.pop_front() {
            r.at_b(&f, false);
            while !r.acks.is_empty() {
                r.ack_at_a();
            }
            r.transmit();
        }
        r.advance(10);
        while !r.acks.is_empty() {
            r.ack_at_a();
        }
    }
    if !r.forged_acks && !r.forged_data {
        assert_eq!(r.a.backlog(), 0, "the link never drained");
        let all: Vec<u64> = (0..r.lens.len() as u64).collect();
        assert_eq!(r.delivered, all, "not everything sent was delivered");
    }
}

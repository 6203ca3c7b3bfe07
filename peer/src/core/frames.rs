//! Frames: what arrives from peers (delivery to the application, in order and with back
//! pressure), and the one routing rule for what leaves (data channel while it is open,
//! else the relay, batched per turn).
use std::sync::Arc;

use bytes::Bytes;
use socketio_p2p_signaling::protocol::{Body, Frame, Msg, PeerInfo};

use super::link::Delivered;
use super::{Core, Delivery, Output, RELAY_BATCH, RtcOp, Timer};
use crate::error::Error;
use crate::payload::{Payload, Transport};

impl Core {
    /// A frame from `from`, on the relay or its data channel.
    pub(super) fn on_frame(&mut self, from: &str, body: Body, via: Transport) {
        if !self.peers.contains_key(from) {
            if from.is_empty() || !self.registered() {
                return;
            }
            // The server only relays between peers that share a scope; presence may lag.
            self.ensure_peer(&PeerInfo {
                id: from.to_owned(),
                uid: None,
            });
        }
        match body {
            Body::Data { seq, more, msg } => self.on_data(from, seq, more, msg, via),
            Body::Volatile { msg } => {
                // Best effort: dropped when the application is behind.
                if let Some(ev) = self.deliver(from, Delivered::Msg(msg), via)
                    && self.app_room > 0
                {
                    self.app_room -= 1;
                    self.emit(Output::Event(ev));
                }
            }
            Body::LinkAck { upto, nack } => {
                if let Some(peer) = self.peers.get_mut(from) {
                    let released = peer.link.on_ack(upto, nack, self.now);
                    self.dirty.insert(from.to_owned());
                    if released > 0 {
                        self.credit(super::CreditOp::Release(from.to_owned(), released));
                    }
                }
            }
            Body::Ping { nonce, pong: false } => {
                self.send_now(from, Body::Ping { nonce, pong: true });
            }
            Body::Ping { nonce, pong: true } => self.pair_echoed(from, nonce),
        }
    }

    fn on_data(&mut self, from: &str, seq: u64, more: bool, msg: Msg, via: Transport) {
        let Some(peer) = self.peers.get_mut(from) else {
            return;
        };
        let (delivered, ack) = peer.link.on_data(seq, more, msg, self.now);
        if let Some((upto, nack)) = ack {
            self.send_ack(from, upto, nack);
        }
        match delivered {
            Some(Delivered::Msg(Msg::Stream { id, opener, op })) => {
                let out = self.streams.on_msg(from, id, opener, op);
                self.push_out(out);
                self.hand_over(from, seq, None);
            }
            Some(d) => {
                let ev = self.deliver(from, d, via);
                self.hand_over(from, seq, ev);
            }
            None => {}
        }
    }

    /// Hands a message that ended at `seq` to the application, in order: events wait in
    /// the peer's `held` queue while the application's queue is full, and frames are only
    /// acknowledged once taken, so a slow application holds its senders to one window.
    fn hand_over(&mut self, from: &str, seq: u64, ev: Option<Delivery>) {
        let Some(peer) = self.peers.get_mut(from) else {
            return;
        };
        let mut ack = None;
        if !peer.held.is_empty() || (ev.is_some() && self.app_room == 0) {
            peer.held.push_back((seq, ev));
            self.held_total += 1;
        } else {
            if let Some(ev) = ev {
                self.app_room -= 1;
                self.out.push_back(Output::Event(ev));
            }
            ack = peer.link.consume(seq, self.now);
        }
        if let Some((upto, nack)) = ack {
            self.send_ack(from, upto, nack);
        }
    }

    /// The application's queue has room again: release held events, peer by peer.
    pub(super) fn release_held(&mut self) {
        let ids: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.held.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            let mut ack = None;
            while let Some((seq, ev)) = peer.held.pop_front() {
                if let Some(ev) = ev {
                    if self.app_room == 0 {
                        peer.held.push_front((seq, Some(ev)));
                        break;
                    }
                    self.app_room -= 1;
                    self.out.push_back(Output::Event(ev));
                }
                self.held_total -= 1;
                ack = peer.link.consume(seq, self.now).or(ack);
            }
            if let Some((upto, nack)) = ack.or_else(|| peer.link.take_ack()) {
                self.send_ack(&id, upto, nack);
            }
        }
    }

    fn deliver(&mut self, from: &str, d: Delivered, via: Transport) -> Option<Delivery> {
        let msg = match d {
            Delivered::Msg(m) => m,
            Delivered::TooLarge {
                reply_to,
                failed_reply,
                size,
            } => {
                tracing::warn!(from, size, "dropped a message larger than max_message_size");
                let max = self.opts.max_message_size;
                if let Some(ack_id) = reply_to {
                    self.reply_error(
                        from,
                        ack_id,
                        "PayloadTooLarge",
                        &format!("message larger than {max} bytes"),
                    );
                }
                if let Some(a) = failed_reply.and_then(|id| self.take_ack(id)) {
                    (a.reply)(Err(Error::PayloadTooLarge { size, max }));
                }
                return None;
            }
        };
        match msg {
            Msg::Event {
                event,
                ack_id,
                payload,
            } => {
                let payload = match Payload::from_wire(payload) {
                    Ok(p) => p,
                    Err(e) => {
                        if let Some(ack_id) = ack_id {
                            self.reply_error(from, ack_id.get(), "BadPayload", &e.to_string());
                        }
                        return None;
                    }
                };
                let peer = self.peers.get(from)?;
                return Some(Delivery {
                    name: event,
                    from: Arc::new(peer.info.clone()),
                    payload,
                    transport: via,
                    ack_id: ack_id.map(std::num::NonZeroU64::get),
                });
            }
            Msg::Reply { ack_id, payload } => {
                if self.acks.get(&ack_id).is_some_and(|a| a.peer == from)
                    && let Some(a) = self.take_ack(ack_id)
                {
                    (a.reply)(Payload::from_wire(payload));
                }
            }
            Msg::ReplyError {
                ack_id,
                code,
                message,
            } => {
                if self.acks.get(&ack_id).is_some_and(|a| a.peer == from)
                    && let Some(a) = self.take_ack(ack_id)
                {
                    (a.reply)(Err(Error::Remote { code, message }));
                }
            }
            // Streams are taken off the link before `deliver`; a volatile one is nonsense.
            Msg::Continuation { .. } | Msg::Stream { .. } => {}
        }
        None
    }

    fn take_ack(&mut self, ack_id: u64) -> Option<super::PendingAck> {
        self.deadlines.clear(&Timer::Ack(ack_id));
        self.acks.remove(&ack_id)
    }

    pub(super) fn reply_error(&mut self, to: &str, ack_id: u64, code: &str, message: &str) {
        self.push_msg(
            to,
            Msg::ReplyError {
                ack_id,
                code: code.into(),
                message: message.into(),
            },
        );
    }

    pub(super) fn push_out(&mut self, out: super::streams::Out) {
        for (to, msg) in out {
            self.push_msg(&to, msg);
        }
        for parts in std::mem::take(&mut self.streams.incoming) {
            self.emit(Output::IncomingStream(parts));
        }
    }

    /// Queues a message on the peer's reliable link (a reply or a stream message: it holds
    /// no send credit).
    pub(super) fn push_msg(&mut self, to: &str, msg: Msg) {
        if let Some(peer) = self.peers.get_mut(to) {
            if let Err(e) = peer.link.push(msg, false) {
                tracing::warn!(%e, "could not encode a message");
            }
            self.dirty.insert(to.to_owned());
        }
    }

    /// Queues an emitted message whose credit the handle took.
    pub(super) fn push_counted(&mut self, to: &str, msg: Msg, frames: usize) {
        let Some(peer) = self.peers.get_mut(to) else {
            self.credit(super::CreditOp::Release(to.to_owned(), frames));
            return;
        };
        if let Err(e) = peer.link.push(msg, true) {
            tracing::warn!(%e, "could not encode a message");
            self.credit(super::CreditOp::Release(to.to_owned(), frames));
        }
        self.dirty.insert(to.to_owned());
    }

    pub(super) fn send_ack(&mut self, to: &str, upto: u64, nack: bool) {
        self.send_now(to, Body::LinkAck { upto, nack });
    }

    /// Sends an unsequenced frame (ack, ping, volatile) on the peer's current transport.
    pub(super) fn send_now(&mut self, to: &str, body: Body) {
        let reliable = !matches!(body, Body::Volatile { .. });
        let frame = match (Frame {
            to: to.to_owned(),
            from: String::new(),
            body,
        })
        .encode()
        {
            Ok(f) => f,
            Err(e) => return tracing::warn!(%e, "could not encode a frame"),
        };
        self.count_out(to, 1, frame.len());
        match self.channel_of(to) {
            Some(key) => self.emit(Output::Rtc {
                key,
                op: RtcOp::Send { reliable, frame },
            }),
            None => self.relay(&frame),
        }
    }

    fn count_out(&mut self, to: &str, frames: usize, bytes: usize) {
        if let Some(p) = self.peers.get_mut(to) {
            p.counters.frames_sent += frames as u64;
            p.counters.bytes_sent += bytes as u64;
        }
    }

    /// A frame of `len` bytes came from `from` (counted once `on_frame` knows the peer).
    pub(super) fn count_in(&mut self, from: &str, len: usize) {
        if let Some(p) = self.peers.get_mut(from) {
            p.counters.frames_received += 1;
            p.counters.bytes_received += len as u64;
        }
    }

    /// The open data channel's connection key, if the peer has one.
    fn channel_of(&self, to: &str) -> Option<u64> {
        let p = self.peers.get(to)?;
        (p.transport() == Transport::DataChannel)
            .then_some(p.rtc)
            .flatten()
    }

    /// Queues a frame for the relay batch of this turn.
    pub(super) fn relay(&mut self, frame: &Bytes) {
        if !self.relay_out.is_empty() && self.relay_out.len() + frame.len() > RELAY_BATCH {
            let batch = self.relay_out.take();
            self.emit(Output::Relay(batch));
        }
        self.relay_out.push(frame);
    }

    /// Sends the relay frames of this turn.
    pub(super) fn flush_relay(&mut self) {
        if !self.relay_out.is_empty() {
            let batch = self.relay_out.take();
            self.emit(Output::Relay(batch));
        }
    }

    /// Sends what the reliable links of dirty peers may send now.
    pub(super) fn flush(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty: Vec<String> = self.dirty.drain().collect();
        let mut frames = Vec::new();
        for id in dirty {
            frames.clear();
            let channel = self.channel_of(&id);
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            peer.link.poll_transmit(&mut frames, self.now);
            // On the relay, a delayed acknowledgement rides along with data going to the
            // same peer: it costs no write of its own.
            let ack = if frames.is_empty() || channel.is_some() {
                None
            } else {
                peer.link.take_ack()
            };
            if let Some((upto, nack)) = ack {
                self.send_ack(&id, upto, nack);
            }
            let bytes = frames.iter().map(Bytes::len).sum();
            self.count_out(&id, frames.len(), bytes);
            match channel {
                Some(key) => {
                    for frame in frames.drain(..) {
                        self.emit(Output::Rtc {
                            key,
                            op: RtcOp::Send {
                                reliable: true,
                                frame,
                            },
                        });
                    }
                }
                None => {
                    for f in &frames {
                        self.relay(f);
                    }
                }
            }
        }
    }
}

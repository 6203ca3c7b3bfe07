//! Time: when the core next needs it, and what is due then.
use std::time::Instant;

use socketio_p2p_signaling::protocol::Body;

use super::negotiate::Reason;
use super::{Core, Phase, ReqKind, Timer};
use crate::error::Error;
use crate::payload::{PeerEvent, Transport};

impl Core {
    /// When the core next needs [`super::Input::Timeout`]; `None`: only inputs wake it.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        let dc = self.opts.dc_timeout;
        let peers = self.peers.values().filter_map(|p| p.poll_timeout(dc));
        [self.deadlines.next(), self.streams.poll_timeout()]
            .into_iter()
            .flatten()
            .chain(peers)
            .min()
    }

    pub(super) fn on_timeout(&mut self) {
        let out = self.streams.on_tick(self.now);
        self.push_out(out);
        self.peer_timers();
        for t in self.deadlines.expired(self.now) {
            if self.phase == Phase::Closed {
                return;
            }
            self.on_deadline(t);
        }
    }

    /// Links (resends, delayed acks), negotiations (timeouts) and data channel liveness.
    fn peer_timers(&mut self) {
        let now = self.now;
        let dc = self.opts.dc_timeout;
        let due: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.poll_timeout(dc).is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.link.backlog() > 0 {
                p.link.on_tick(now);
                self.dirty.insert(id.clone());
            }
            let ack = p.link.ack_due(now);
            let mut acts = p.neg.on_tick(now);
            let mut ping = false;
            if p.transport() == Transport::DataChannel {
                let silent = now.duration_since(p.live.seen);
                if silent >= dc {
                    let why = format!("nothing received on the data channel for {silent:?}");
                    acts.extend(p.neg.on_closed(Reason::Closed(why)));
                } else if now.duration_since(p.live.pinged) >= dc / 3 && silent >= dc / 3 {
                    p.live.pinged = now;
                    ping = true;
                }
            }
            if let Some((upto, nack)) = ack {
                self.send_ack(&id, upto, nack);
            }
            if ping {
                self.send_now(
                    &id,
                    Body::Ping {
                        nonce: 0,
                        pong: false,
                    },
                );
            }
            self.run_actions(&id, acts);
        }
    }

    fn on_deadline(&mut self, t: Timer) {
        match t {
            Timer::Request(rid) => {
                if let Some(kind) = self.reqs.remove(&rid) {
                    self.request_expired(kind);
                }
            }
            Timer::Ack(id) => {
                if let Some(a) = self.acks.remove(&id) {
                    let why = format!("no reply from {} in time", a.peer);
                    (a.reply)(Err(Error::Timeout(why)));
                }
            }
            Timer::Retry(id) => self.retry_due(id),
            Timer::Confirm(id) => {
                // After a reconnection: a peer the server did not list again, and that did
                // not come back in time, is gone.
                let info = self.peers.get(&id).map(|p| p.info.clone());
                self.remove_peer(&id, "the peer did not come back after a reconnection");
                if let Some(peer) = info {
                    self.peer_event(PeerEvent::Disconnected { peer });
                }
            }
            Timer::Ready => self.finish_ready(Err(Error::Timeout("not ready in time".into()))),
            Timer::Reconnect => {
                let d = self.opts.reconnect_timeout;
                self.shutdown(&format!("could not reconnect to the server within {d:?}"));
            }
            Timer::Linger => self.finish_closing(),
        }
    }

    fn request_expired(&mut self, kind: ReqKind) {
        let e = Error::Timeout("no answer from the server".into());
        match kind {
            ReqKind::User(r) | ReqKind::Join(_, r) | ReqKind::Leave(_, r) => r(Err(e)),
            // Not if another hello was welcomed meanwhile.
            ReqKind::Hello if self.phase == Phase::Ready => {}
            ReqKind::Hello if self.registered() && self.connected() => self.send_hello(),
            ReqKind::Hello => self.finish_ready(Err(e)),
            ReqKind::Pair => self.finish_ready(Err(Error::PeerOffline("pairing timed out".into()))),
            ReqKind::Signal | ReqKind::Quiet => {}
            ReqKind::Members {
                room,
                after,
                welcome,
            } => {
                // Lost with a connection (the next Welcome pages afresh), or just late.
                if welcome == self.welcomes && self.connected() {
                    tracing::debug!(%room, "no answer to a members page; asking again");
                    self.request_members(room, after);
                }
            }
            ReqKind::Provide(_, _, r) => r(Err(e)),
            ReqKind::Subscribe(topic, id, r) => {
                self.services.remove_sub(&topic, id);
                r(Err(e));
            }
        }
    }
}

//! What the application asks for.
use std::time::Duration;

use socketio_p2p_signaling::protocol::{Body, Msg, Op, PeerInfo};

use super::negotiate::{Action, Reason};
use super::streams::StreamCmd;
use super::{Command, Core, CreditOp, PendingAck, ReqKind, Timer};
use crate::error::Error;

impl Core {
    pub(super) fn on_command(&mut self, c: Command) {
        match c {
            Command::Emit {
                targets,
                event,
                payload,
                frames,
            } => {
                let msg = Msg::Event {
                    event,
                    ack_id: None,
                    payload,
                };
                for t in targets {
                    self.push_counted(&t, msg.clone(), frames);
                }
            }
            Command::Volatile {
                target,
                event,
                payload,
            } => {
                let targets: Vec<String> = match target {
                    Some(t) => vec![t],
                    None => self.peers.keys().cloned().collect(),
                };
                let msg = Msg::Event {
                    event,
                    ack_id: None,
                    payload,
                };
                for t in targets {
                    if self.peers.contains_key(&t) {
                        self.send_now(&t, Body::Volatile { msg: msg.clone() });
                    }
                }
            }
            Command::EmitAck {
                peer,
                event,
                payload,
                frames,
                timeout,
                reply,
            } => {
                if !self.peers.contains_key(&peer) {
                    self.credit(CreditOp::Release(peer.clone(), frames));
                    return reply(Err(Error::PeerOffline(peer)));
                }
                // Ids start at 1: on the wire, 0 means "no reply wanted".
                let wire_id = std::num::NonZeroU64::MIN.saturating_add(self.next_ack);
                self.next_ack += 1;
                let ack_id = wire_id.get();
                self.deadlines.set(Timer::Ack(ack_id), self.now + timeout);
                self.acks.insert(
                    ack_id,
                    PendingAck {
                        peer: peer.clone(),
                        reply,
                    },
                );
                let msg = Msg::Event {
                    event,
                    ack_id: Some(wire_id),
                    payload,
                };
                self.push_counted(&peer, msg, frames);
            }
            Command::Reply {
                peer,
                ack_id,
                result,
            } => {
                let msg = match result.map(|p| p.to_wire()) {
                    Ok(Ok(payload)) => Msg::Reply { ack_id, payload },
                    Ok(Err(e)) => Msg::ReplyError {
                        ack_id,
                        code: "BadPayload".into(),
                        message: e.to_string(),
                    },
                    Err((code, message)) => Msg::ReplyError {
                        ack_id,
                        code,
                        message,
                    },
                };
                self.push_msg(&peer, msg);
            }
            Command::Stream(c) => self.on_stream_cmd(c),
            c => self.on_server_command(c),
        }
    }

    /// Commands about the server session, services and peer connections.
    fn on_server_command(&mut self, c: Command) {
        match c {
            Command::Request { op, reply } => {
                if !self.registered() {
                    return reply(Err(Error::Closed));
                }
                // Keep our own view of rooms in step with the server's answer.
                let kind = match &op {
                    Op::Join { room } => ReqKind::Join(room.clone(), reply),
                    Op::Leave { room } => ReqKind::Leave(room.clone(), reply),
                    _ => ReqKind::User(reply),
                };
                self.request(op, kind);
            }
            Command::Provide {
                name,
                service,
                reply,
            } => {
                let op = Op::Provide {
                    service: name.clone(),
                };
                self.request(op, ReqKind::Provide(name, service, reply));
            }
            Command::Unprovide { name, reply } => {
                self.services.provided.remove(&name);
                self.request(Op::Unprovide { service: name }, ReqKind::User(reply));
            }
            Command::Call { op, timeout, reply } => {
                // The server answers `Timeout` at `timeout`; this deadline only matters
                // when the server itself does not answer.
                let deadline = self.now + timeout + Duration::from_millis(500);
                self.request_until(op, ReqKind::User(reply), deadline);
            }
            Command::CallDone { cid, outcome } => {
                self.request(Op::CallResult { cid, outcome }, ReqKind::Quiet);
            }
            Command::Subscribe { topic, sink, reply } => {
                let (id, first) = self.services.add_sub(&topic, sink);
                if first {
                    let op = Op::Subscribe {
                        topic: topic.clone(),
                    };
                    self.request(op, ReqKind::Subscribe(topic, id, reply));
                } else {
                    reply(Ok(id));
                }
            }
            Command::Unsubscribe { topic, id } => {
                if self.services.remove_sub(&topic, id) {
                    self.request(Op::Unsubscribe { topic }, ReqKind::Quiet);
                }
            }
            c => self.on_peer_command(c),
        }
    }

    /// Commands about peers and their connections.
    fn on_peer_command(&mut self, c: Command) {
        match c {
            Command::Upgrade { peer, done } => self.start_upgrades(peer, done),
            Command::Downgrade { peer, done } => {
                let acts = match self.peers.get_mut(&peer) {
                    Some(p) => p.neg.hang_up(Reason::Application),
                    None => return done(Err(Error::PeerOffline(peer))),
                };
                self.run_actions(&peer, acts);
                done(Ok(()));
            }
            Command::Kill { peer } => {
                let acts = match self.peers.get_mut(&peer) {
                    Some(p) => p
                        .neg
                        .on_closed(Reason::Closed("data channel killed".into())),
                    None => vec![],
                };
                let silent: Vec<Action> = acts
                    .into_iter()
                    .filter(|a| !matches!(a, Action::Send(_)))
                    .collect();
                self.run_actions(&peer, silent);
            }
            Command::Transport { peer, reply } => {
                let r = self
                    .peers
                    .get(&peer)
                    .map(|p| p.transport())
                    .ok_or(Error::PeerOffline(peer));
                reply(r);
            }
            Command::Stats { peer, reply } => {
                let r = self
                    .peers
                    .get(&peer)
                    .map(|p| p.stats())
                    .ok_or(Error::PeerOffline(peer));
                reply(r);
            }
            Command::Peers { reply } => {
                let mut v: Vec<PeerInfo> = self.peers.values().map(|p| p.info.clone()).collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                reply(Ok(v));
            }
            Command::LiveConnections { reply } => {
                reply(Ok(self.peers.values().filter(|p| p.rtc.is_some()).count()));
            }
            Command::Close { done } => self.begin_close("closed by the application", Some(done)),
            // Handled in `on_command` and `on_server_command`.
            c => self.refuse_command(c),
        }
    }

    fn on_stream_cmd(&mut self, c: StreamCmd) {
        let out = match c {
            StreamCmd::Open { peer, name, reply } => {
                if !self.registered() || !self.peers.contains_key(&peer) {
                    return reply(Err(Error::PeerOffline(format!(
                        "{peer} is not a peer of this one"
                    ))));
                }
                let deadline = self.now + self.opts.request_timeout;
                self.streams.open(peer, name, reply, deadline)
            }
            c => self.streams.on_cmd(c),
        };
        self.push_out(out);
    }
}

//! The session with the server: connection, hello and welcome, resuming after a
//! reconnection, pairing, presence, server errors, and closing.
use serde_json::Value as Json;
use socketio_p2p_signaling::protocol::{
    Body, CallFor, ErrorCode, ErrorMsg, Frame, FrameEncoding, MembersPage, Op, PROTOCOL_VERSION,
    PeerInfo, Presence, Publication, Request, Response, Resume, SignalFrom, Welcome, split_batch,
};

use super::negotiate::{Action, Reason};
use super::peer::Peer;
use super::{Core, CreditOp, NetIn, Output, Phase, ReqKind, Timer};
use crate::error::{Cause, Error, Result};
use crate::payload::{PeerEvent, Transport};

/// Members asked for in one page (the rest of a capped `Welcome`): as many as the server
/// lists in a `Welcome` by default, so that no message grows the socket buffers beyond it.
const MEMBERS_PAGE: usize = 256;

/// Parses a JSON message of the server, logging what does not parse.
fn parse<T: serde::de::DeserializeOwned>(v: Json, what: &str) -> Option<T> {
    match serde_json::from_value(v) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(%e, "bad {what} from the server");
            None
        }
    }
}

impl Core {
    pub(super) fn on_net(&mut self, n: NetIn) {
        match n {
            NetIn::Connected => {
                tracing::debug!(registered = self.registered(), "socket.io connected");
                self.phase = if self.registered() {
                    Phase::Resuming
                } else {
                    Phase::Hello
                };
                self.credit(CreditOp::SetConnected(true));
                // A hello sent on an earlier connection that died gets no answer: send it
                // again. The earlier one stays pending: the client's callbacks run as
                // separate tasks, so this `Connected` may be a late or second report of the
                // connection that hello went on, and then its welcome is the one that counts
                // (the new hello is answered `AlreadyRegistered`, see `on_response`).
                self.send_hello();
            }
            NetIn::Batch(batch) => self.on_batch(&batch),
            NetIn::Response(v) => {
                if let Some(r) = parse::<Response>(v, "response") {
                    self.on_response(r);
                }
            }
            NetIn::Signal(v) => {
                if let Some(s) = parse::<SignalFrom>(v, "signal") {
                    self.on_signal(s);
                }
            }
            NetIn::Presence(v) => {
                // One presence, or a batch of them (we ask for batches in `hello`).
                let list = match v {
                    Json::Array(list) => list,
                    one => vec![one],
                };
                for v in list {
                    if let Some(p) = parse::<Presence>(v, "presence") {
                        self.on_presence(p);
                    }
                }
            }
            NetIn::Error(v) => {
                if let Some(e) = parse::<ErrorMsg>(v, "error message") {
                    self.on_server_error(e);
                }
            }
            NetIn::Call(v) => {
                if let Some(call) = parse::<CallFor>(v, "call") {
                    let service = self.services.provided.get(&call.service).cloned();
                    self.emit(Output::RunCall { service, call });
                }
            }
            NetIn::Topic(v) => {
                if let Some(p) = parse::<Publication>(v, "publication") {
                    self.services.deliver(p);
                }
            }
            NetIn::Broken(msg) if self.registered() => {
                tracing::debug!(%msg, "server connection broken");
                self.lost();
            }
            NetIn::Broken(msg) => tracing::debug!(%msg, "socket.io error"),
            NetIn::Refused(reason) => {
                self.finish_ready(Err(Error::Rejected {
                    code: ErrorCode::Unauthorized,
                    message: reason.clone(),
                }));
                self.shutdown(&format!("connection refused: {reason}"));
            }
            NetIn::Closed if self.opts.reconnect && self.announced => {
                // The client reconnects by itself; peers on data channels keep talking.
                tracing::info!("server connection lost; reconnecting");
                self.lost();
            }
            NetIn::Closed => self.shutdown("server connection lost"),
        }
    }

    fn lost(&mut self) {
        if self.phase != Phase::Lost {
            self.phase = Phase::Lost;
            self.credit(CreditOp::SetConnected(false));
            if !self.deadlines.contains(&Timer::Reconnect) {
                let at = self.now + self.opts.reconnect_timeout;
                self.deadlines.set(Timer::Reconnect, at);
            }
            self.peer_event(PeerEvent::Reconnecting);
        }
    }

    fn on_batch(&mut self, batch: &bytes::Bytes) {
        let frames = match split_batch(batch) {
            Ok(f) => f,
            Err(e) => return tracing::warn!(%e, "undecodable batch from the server"),
        };
        for bytes in frames {
            match Frame::decode(&bytes) {
                Ok(frame) => {
                    self.on_frame(&frame.from, frame.body, Transport::Relay);
                    self.count_in(&frame.from, bytes.len());
                }
                Err(e) => {
                    tracing::warn!(%e, len = bytes.len(), "undecodable frame from the server")
                }
            }
        }
    }

    /// Sends a request to the server; its answer (or its deadline) completes `kind`.
    pub(super) fn request(&mut self, op: Op, kind: ReqKind) {
        let wait = match kind {
            ReqKind::Pair => self.opts.pair_timeout + self.opts.request_timeout,
            _ => self.opts.request_timeout,
        };
        let deadline = self.now + wait;
        self.request_until(op, kind, deadline);
    }

    pub(super) fn request_until(&mut self, op: Op, kind: ReqKind, deadline: std::time::Instant) {
        self.next_rid += 1;
        let rid = self.next_rid;
        self.reqs.insert(rid, kind);
        self.deadlines.set(Timer::Request(rid), deadline);
        self.emit(Output::Request(Request { rid, op }));
    }

    pub(super) fn send_hello(&mut self) {
        // First connection, or a reconnection: then ask for our id back.
        let resume = self.registered().then(|| Resume {
            id: self.me.id.clone(),
            token: self.token.clone(),
        });
        if resume.is_some() {
            tracing::info!(id = %self.me.id, "reconnected to the server; resuming");
        }
        let op = Op::Hello {
            version: PROTOCOL_VERSION,
            uid: self.me.uid.clone().or_else(|| self.opts.uid.clone()),
            rooms: self.my_rooms.iter().cloned().collect(),
            resume,
            // The Rust Socket.IO client sends a binary event as two websocket messages and
            // splits binary messages on 0x1e: text is one message and needs no escaping.
            frames: FrameEncoding::Base64,
            batch_presence: true,
        };
        self.request(op, ReqKind::Hello);
    }

    fn on_response(&mut self, r: Response) {
        let Some(kind) = self.reqs.remove(&r.rid) else {
            return;
        };
        self.deadlines.clear(&Timer::Request(r.rid));
        let code = r.error.as_ref().map(|e| e.code);
        let result = match (r.ok, r.error) {
            (_, Some(e)) => Err(Error::from_server(e.code, e.message)),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Json::Null),
        };
        match kind {
            ReqKind::User(reply) => reply(result),
            ReqKind::Join(room, reply) => {
                if let Ok(v) = &result {
                    self.joined_room(&room, v);
                }
                reply(result);
            }
            ReqKind::Leave(room, reply) => {
                if result.is_ok() {
                    self.left_room(&room);
                }
                reply(result);
            }
            ReqKind::Signal => {
                if let Err(e) = result {
                    tracing::debug!(%e, "signal refused by the server");
                }
            }
            ReqKind::Quiet => {
                if let Err(e) = result {
                    tracing::warn!(%e, "request refused by the server");
                }
            }
            ReqKind::Provide(name, service, reply) => {
                if result.is_ok() {
                    self.services.provided.insert(name, service);
                }
                reply(result);
            }
            ReqKind::Subscribe(topic, id, reply) => match result {
                Err(e) => {
                    self.services.remove_sub(&topic, id);
                    reply(Err(e));
                }
                Ok(_) => reply(Ok(id)),
            },
            ReqKind::Members { room, welcome, .. } => {
                if welcome != self.welcomes {
                    return;
                }
                match result.and_then(from_json::<MembersPage>) {
                    Ok(page) => self.on_members_page(room, page),
                    // We left the room meanwhile, or the server refused: the view stays
                    // what the Welcome and the presences since made it.
                    Err(e) => tracing::warn!(%room, %e, "members page refused"),
                }
            }
            ReqKind::Hello => match result.and_then(from_json::<Welcome>) {
                Ok(w) => self.on_welcome(w),
                // Another hello of ours on this connection was (or will be) welcomed.
                Err(e) if self.registered() && code == Some(ErrorCode::AlreadyRegistered) => {
                    tracing::debug!(%e, "hello sent twice on one connection");
                }
                Err(e) if self.registered() => {
                    tracing::warn!(%e, "could not register again after a reconnection");
                    self.shutdown(&format!(
                        "could not register again after a reconnection: {e}"
                    ));
                }
                Err(e) => self.finish_ready(Err(e)),
            },
            ReqKind::Pair => match result.and_then(from_json::<PeerInfo>) {
                Ok(info) => {
                    self.add_pair(&info);
                    let nonce = rand_nonce();
                    self.pair_echo = Some(nonce);
                    self.send_now(&info.id, Body::Ping { nonce, pong: false });
                }
                Err(e) => self.finish_ready(Err(e)),
            },
        }
    }

    fn joined_room(&mut self, room: &str, members: &Json) {
        self.my_rooms.insert(room.to_owned());
        let peers: Vec<PeerInfo> = serde_json::from_value(members.clone()).unwrap_or_default();
        for p in peers {
            let new = self.ensure_peer(&p);
            if let Some(peer) = self.peers.get_mut(&p.id) {
                peer.rooms.insert(room.to_owned());
            }
            let id = p.id.clone();
            self.peer_event(PeerEvent::Joined {
                room: room.to_owned(),
                peer: p,
            });
            if new && self.opts.auto_upgrade {
                self.start_upgrades(Some(id), None);
            }
        }
    }

    fn left_room(&mut self, room: &str) {
        self.my_rooms.remove(room);
        let pair = self.pair_peer.clone();
        let gone: Vec<String> = self
            .peers
            .iter_mut()
            .filter_map(|(id, p)| {
                p.rooms.remove(room);
                (p.rooms.is_empty() && pair.as_ref() != Some(id)).then(|| id.clone())
            })
            .collect();
        for id in gone {
            self.remove_peer(&id, "we left every room we shared");
        }
    }

    /// Asks for the members of `room` after `after` (the rest of a capped `Welcome`).
    pub(super) fn request_members(&mut self, room: String, after: Option<String>) {
        let op = Op::Members {
            room: room.clone(),
            after: after.clone(),
            limit: Some(MEMBERS_PAGE),
        };
        let welcome = self.welcomes;
        self.request(
            op,
            ReqKind::Members {
                room,
                after,
                welcome,
            },
        );
    }

    /// A page of members: they count as listed in the `Welcome`. Presences that came in
    /// meanwhile were applied already: the page is the room as the server saw it after
    /// them, and the ones after it come after the page.
    fn on_members_page(&mut self, room: String, page: MembersPage) {
        if !self.my_rooms.contains(&room) {
            return;
        }
        let last = page.peers.last().map(|p| p.id.clone());
        for p in page.peers {
            self.listed(&room, p);
        }
        if page.more {
            if last.is_none() {
                tracing::warn!(%room, "empty members page that says more; stopping");
                return;
            }
            self.request_members(room, last);
        } else {
            tracing::debug!(%room, "member list complete");
        }
    }

    /// A member of `room` the server listed (in a `Welcome` or a page): known from now on,
    /// announced as joined when it is new to us or to us in this room.
    fn listed(&mut self, room: &str, p: PeerInfo) {
        let new = self.ensure_peer(&p);
        let fresh = match self.peers.get_mut(&p.id) {
            Some(peer) => peer.rooms.insert(room.to_owned()),
            None => false,
        };
        self.deadlines.clear(&Timer::Confirm(p.id.clone()));
        if new || fresh {
            let id = p.id.clone();
            self.peer_event(PeerEvent::Joined {
                room: room.to_owned(),
                peer: p,
            });
            if new && self.opts.auto_upgrade && self.announced {
                self.start_upgrades(Some(id), None);
            }
        }
    }

    fn on_welcome(&mut self, w: Welcome) {
        self.welcomes += 1;
        self.deadlines.clear(&Timer::Reconnect);
        tracing::debug!(id = %w.id, continued = w.continued, rooms = ?w.rooms, "welcome");
        let again = self.registered();
        if again {
            self.resumed(w.continued && w.id == self.me.id);
        }
        self.me = PeerInfo {
            id: w.id,
            uid: w.uid,
        };
        self.token = w.token;
        self.emit(Output::IceServers(w.ice_servers));
        self.phase = if self.opts.peer_uid.is_some() && !self.announced {
            Phase::Pairing
        } else {
            Phase::Ready
        };
        for room in w.rooms {
            let last = room.peers.last().map(|p| p.id.clone());
            for p in room.peers {
                let new = self.ensure_peer(&p);
                if let Some(peer) = self.peers.get_mut(&p.id) {
                    peer.rooms.insert(room.room.clone());
                }
                self.deadlines.clear(&Timer::Confirm(p.id.clone()));
                if new || !again {
                    self.peer_event(PeerEvent::Joined {
                        room: room.room.clone(),
                        peer: p,
                    });
                }
            }
            if room.more {
                // The rest comes in pages; presences meanwhile apply on top.
                self.request_members(room.room, last);
            }
        }
        if again {
            // Services and subscriptions are ours: claim them again (the server may have
            // restarted, or given us a new id).
            let names: Vec<String> = self.services.provided.keys().cloned().collect();
            for service in names {
                self.request(Op::Provide { service }, ReqKind::Quiet);
            }
            for topic in self.services.topics() {
                self.request(Op::Subscribe { topic }, ReqKind::Quiet);
            }
            self.request_pair();
            return;
        }
        if self.opts.peer_uid.is_some() {
            self.request_pair();
        } else {
            let me = self.me.clone();
            self.finish_ready(Ok(me));
        }
        if self.opts.auto_upgrade {
            self.start_upgrades(None, None);
        }
    }

    /// Back on the server after a reconnection, as the same peer (`continued`) or a new one.
    fn resumed(&mut self, continued: bool) {
        if continued {
            // Nobody was told we left: links carry on. What was sent on the relay while we
            // were away goes again now; peers the server no longer lists get a while to
            // come back (they may be reconnecting too).
            let confirm_by = self.now + self.opts.pair_timeout;
            let ids: Vec<String> = self.peers.keys().cloned().collect();
            for id in ids {
                if let Some(p) = self.peers.get_mut(&id)
                    && p.transport() == Transport::Relay
                {
                    p.link.on_transport_change(self.now);
                    self.dirty.insert(id.clone());
                }
                self.deadlines.set(Timer::Confirm(id), confirm_by);
            }
        } else {
            let ids: Vec<String> = self.peers.keys().cloned().collect();
            for id in ids {
                let info = self.peers.get(&id).map(|p| p.info.clone());
                self.remove_peer(&id, "we reconnected as a new peer");
                if let Some(peer) = info {
                    self.peer_event(PeerEvent::Disconnected { peer });
                }
            }
            self.pair_peer = None;
        }
        self.peer_event(PeerEvent::Reconnected { continued });
    }

    fn request_pair(&mut self) {
        if let Some(peer_uid) = self.opts.peer_uid.clone() {
            let op = Op::Pair {
                peer_uid,
                timeout_ms: Some(self.opts.pair_timeout.as_millis() as u64),
            };
            self.request(op, ReqKind::Pair);
        }
    }

    fn add_pair(&mut self, info: &PeerInfo) {
        self.deadlines.clear(&Timer::Confirm(info.id.clone()));
        if self.paired_with(&info.id) {
            return;
        }
        self.ensure_peer(info);
        self.pair_peer = Some(info.id.clone());
        self.peer_event(PeerEvent::Paired { peer: info.clone() });
        if self.opts.auto_upgrade {
            self.start_upgrades(Some(info.id.clone()), None);
        }
    }

    /// The echo that completes pairing came back.
    pub(super) fn pair_echoed(&mut self, from: &str, nonce: u64) {
        if self.pair_echo == Some(nonce) && self.paired_with(from) {
            self.pair_echo = None;
            if self.phase == Phase::Pairing {
                self.phase = Phase::Ready;
            }
            let me = self.me.clone();
            self.finish_ready(Ok(me));
        }
    }

    fn on_presence(&mut self, p: Presence) {
        match p {
            Presence::Joined { room, peer } => {
                self.ensure_peer(&peer);
                if let Some(p) = self.peers.get_mut(&peer.id) {
                    p.rooms.insert(room.clone());
                }
                self.deadlines.clear(&Timer::Confirm(peer.id.clone()));
                let id = peer.id.clone();
                self.peer_event(PeerEvent::Joined { room, peer });
                if self.opts.auto_upgrade && self.announced {
                    self.start_upgrades(Some(id), None);
                }
            }
            Presence::Left { room, peer } => {
                let paired = self.paired_with(&peer.id);
                let gone = match self.peers.get_mut(&peer.id) {
                    Some(p) => {
                        p.rooms.remove(&room);
                        p.rooms.is_empty() && !paired
                    }
                    None => false,
                };
                self.peer_event(PeerEvent::Left {
                    room,
                    peer: peer.clone(),
                });
                if gone {
                    self.remove_peer(&peer.id, "the peer left every room we share");
                }
            }
            Presence::Paired { peer } => self.add_pair(&peer),
            Presence::Disconnected { peer } => {
                self.remove_peer(&peer.id, "the peer disconnected");
                self.peer_event(PeerEvent::Disconnected { peer: peer.clone() });
                if self.paired_with(&peer.id) {
                    self.finish_ready(Err(Error::PeerOffline(
                        "the peer disconnected during pairing".into(),
                    )));
                    self.shutdown("the paired peer disconnected");
                }
            }
        }
    }

    fn on_server_error(&mut self, e: ErrorMsg) {
        match (e.error.code, &e.to, e.seq) {
            (ErrorCode::Busy, Some(to), Some(seq)) => {
                if let Some(p) = self.peers.get_mut(to) {
                    p.link.on_dropped(seq, self.now);
                    self.dirty.insert(to.clone());
                }
            }
            (ErrorCode::Busy, _, _) => {}
            // A peer that is reconnecting (or just left): the link keeps the frames and
            // sends them again later, or drops them when the peer is reported gone.
            (ErrorCode::UnknownPeer | ErrorCode::NotRegistered, Some(_), _) => {
                tracing::debug!(code = %e.error.code, to = ?e.to, "frame not relayed");
            }
            _ => {
                tracing::warn!(code = %e.error.code, message = %e.error.message, event = ?e.event, to = ?e.to, "error from the server")
            }
        }
    }

    /// Adds a peer we did not know; false if we knew it (or it is us).
    pub(super) fn ensure_peer(&mut self, info: &PeerInfo) -> bool {
        if info.id == self.me.id {
            return false;
        }
        if let Some(known) = self.peers.get_mut(&info.id) {
            // First met through a frame or a signal (no uid), then through the server.
            if known.info.uid.is_none() && info.uid.is_some() {
                known.info.uid.clone_from(&info.uid);
            }
            return false;
        }
        let peer = Peer::new(info, &self.me.id, &self.opts, self.now);
        self.peers.insert(info.id.clone(), peer);
        self.credit(CreditOp::AddPeer(info.id.clone()));
        true
    }

    pub(super) fn remove_peer(&mut self, id: &str, why: &str) {
        let Some(mut peer) = self.peers.remove(id) else {
            return;
        };
        self.held_total -= peer.held.len();
        self.streams.peer_gone(id, why);
        if let Some(key) = peer.rtc.take() {
            self.close_rtc(key);
        }
        for w in peer.upgrade_waiters.drain(..) {
            w(Err(Error::PeerOffline(why.to_owned())));
        }
        let failed: Vec<u64> = self
            .acks
            .iter()
            .filter(|(_, a)| a.peer == id)
            .map(|(k, _)| *k)
            .collect();
        for k in failed {
            if let Some(a) = self.acks.remove(&k) {
                self.deadlines.clear(&Timer::Ack(k));
                (a.reply)(Err(Error::PeerOffline(format!("{id}: {why}"))));
            }
        }
        self.deadlines.clear(&Timer::Retry(id.to_owned()));
        self.deadlines.clear(&Timer::Confirm(id.to_owned()));
        self.dirty.remove(id);
        self.credit(CreditOp::RemovePeer(id.to_owned()));
    }

    /// Tells `P2p::new` how startup went; a failure stops the core.
    pub(super) fn finish_ready(&mut self, r: Result<PeerInfo>) {
        if self.announced {
            return;
        }
        self.announced = true;
        self.deadlines.clear(&Timer::Ready);
        let failed = r.is_err();
        self.emit(Output::Ready(r));
        if failed {
            self.shutdown("startup failed");
        }
    }

    /// Starts closing: what is already queued to peers still goes out (for at most
    /// `LINGER`), then everything shuts down.
    pub(super) fn begin_close(&mut self, reason: &str, done: Option<super::Reply<()>>) {
        // Emits from now on fail with `Closed`; what was emitted before still goes out.
        self.credit(CreditOp::Close);
        if self.closing.is_none() {
            self.closing = Some((reason.to_owned(), Vec::new()));
            self.deadlines.set(Timer::Linger, self.now + super::LINGER);
        }
        if let (Some((_, waiters)), Some(d)) = (self.closing.as_mut(), done) {
            waiters.push(d);
        }
    }

    /// Closing, and everything was delivered (or the linger is over): shut down.
    pub(super) fn check_closing(&mut self) {
        if self.closing.is_none() {
            return;
        }
        let drained = self.peers.values().all(|p| p.link.backlog() == 0);
        if drained || !self.deadlines.contains(&Timer::Linger) {
            self.finish_closing();
        }
    }

    pub(super) fn finish_closing(&mut self) {
        if let Some((reason, done)) = self.closing.take() {
            self.shutdown(&reason);
            for d in done {
                d(Ok(()));
            }
        }
    }

    pub(super) fn shutdown(&mut self, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        // First, so that emits waiting for credit fail with `Closed`, not `PeerOffline`.
        self.credit(CreditOp::Close);
        if !self.announced {
            self.announced = true;
            self.emit(Output::Ready(Err(Error::Connection(Cause::msg(reason)))));
        }
        // What is queued for the relay still goes (acks, replies of this turn).
        self.flush_relay();
        let ids: Vec<String> = self.peers.keys().cloned().collect();
        for id in ids {
            let acts = self
                .peers
                .get_mut(&id)
                .map(|p| p.neg.hang_up(Reason::Local(reason.to_owned())))
                .unwrap_or_default();
            // Only close links here: no signals to a server we are leaving.
            if acts.contains(&Action::CloseLink)
                && let Some(key) = self.peers.get_mut(&id).and_then(|p| p.rtc.take())
            {
                self.close_rtc(key);
            }
            self.remove_peer(&id, reason);
        }
        self.streams.close_all(reason);
        for (_, kind) in self.reqs.drain() {
            match kind {
                ReqKind::User(r) | ReqKind::Join(_, r) | ReqKind::Leave(_, r) => {
                    r(Err(Error::Closed))
                }
                ReqKind::Provide(_, _, r) => r(Err(Error::Closed)),
                ReqKind::Subscribe(_, _, r) => r(Err(Error::Closed)),
                _ => {}
            }
        }
        self.peer_event(PeerEvent::Closed {
            reason: reason.to_owned(),
        });
        self.phase = Phase::Closed;
        self.emit(Output::Stopped);
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: Json) -> Result<T> {
    serde_json::from_value(v).map_err(Error::from)
}

pub(super) fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish() | 1
}

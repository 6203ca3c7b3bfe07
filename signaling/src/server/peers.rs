//! Membership: rooms, pairs, and peers that go away (for a moment or for good).
use std::time::Duration;

use crate::protocol::{PeerInfo, Presence, Response, events};

use super::P2pSignaling;
use super::cluster::Name;
use super::outbox::{Outbox, presence_text, to_json};
use super::state::State;

impl P2pSignaling {
    pub(super) fn disconnected(&self, sid: &str, deliberate: bool) {
        tracing::debug!(sid, deliberate, "socket disconnected");
        let grace = self.inner.opts.resume_grace;
        let id = {
            let mut st = self.lock();
            let id = st.peer_of.remove(sid).unwrap_or_else(|| sid.to_owned());
            // Requests waiting behind a claim go with the socket.
            st.waiting.remove(sid);
            if !deliberate && !grace.is_zero() {
                st.next_token += 1;
                let n = st.next_token;
                let cap = self.inner.opts.away_queue;
                if let Some(conn) = st.conns.get_mut(&id).filter(|c| c.info.is_some()) {
                    conn.away = Some(n);
                    // What comes for it meanwhile waits (bounded) for its return.
                    conn.socket = super::away::AwaySocket::new(cap);
                    let mut out = Outbox::default();
                    self.services_away(&mut st, &id, &mut out);
                    self.forget_if_still_away(id.clone(), n, grace);
                    drop(st);
                    out.flush();
                    return;
                }
            }
            id
        };
        self.remove_now(&id);
    }

    /// Forgets `id` once `grace` is over, unless its absence `n` ended meanwhile.
    pub(super) fn forget_if_still_away(&self, id: String, n: u64, grace: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still_away = this
                .lock()
                .conns
                .get(&id)
                .is_some_and(|c| c.away == Some(n));
            if still_away {
                this.remove_now(&id);
            }
        });
    }

    /// Forgets a peer and tells the others.
    pub(super) fn remove_now(&self, id: &str) {
        let mut out = Outbox::default();
        let info = {
            let mut st = self.lock();
            let neighbours = st.neighbours(id);
            if !st.conns.contains_key(id) {
                return;
            }
            self.services_gone(&mut st, id, &mut out);
            let Some(conn) = st.conns.remove(id) else {
                return;
            };
            if st.remote.remove(id).is_none() {
                // Local peers are announced; remote ones only leave the mirror.
                self.inner.cluster.down(id);
                // Its token is ours (every Welcome issues one of ours): a resume with it
                // now gets a new id whether or not the token is still known.
                st.issued.remove(id);
            }
            for room in &conn.rooms {
                if let Some(members) = st.rooms.get_mut(room) {
                    members.remove(id);
                    if members.is_empty() {
                        st.rooms.remove(room);
                    }
                }
            }
            for p in &conn.pairs {
                if let Some(c) = st.conns.get_mut(p) {
                    c.pairs.remove(id);
                }
            }
            for waiting in st.pending_pairs.values_mut() {
                waiting.retain(|w| w.requester != *id);
            }
            st.pending_pairs.retain(|_, w| !w.is_empty());
            st.shrink();
            if let Some(info) = &conn.info {
                if let Some(uid) = &info.uid {
                    self.inner.cluster.release(Name::Uid, uid, id);
                }
                let msg = presence_text(&Presence::Disconnected { peer: info.clone() });
                for n in neighbours {
                    if let Some(sock) = st.socket(&n) {
                        out.presence(sock, &msg);
                    }
                }
            }
            conn.info
        };
        out.flush();
        if let (Some(info), Some(hook)) = (info, &self.inner.opts.on_peer_left) {
            hook(&info);
        }
    }

    /// Takes `id` out of `room` and tells the room's other peers; false if it was not in it.
    pub(super) fn leave_room(
        st: &mut State,
        id: &str,
        info: &PeerInfo,
        room: &str,
        out: &mut Outbox,
    ) -> bool {
        if !st.conns.get_mut(id).is_some_and(|c| c.rooms.remove(room)) {
            return false;
        }
        if let Some(members) = st.rooms.get_mut(room) {
            members.remove(id);
            if members.is_empty() {
                st.rooms.remove(room);
            }
        }
        let msg = presence_text(&Presence::Left {
            room: room.to_owned(),
            peer: info.clone(),
        });
        for p in st.room_members(room, id) {
            out.presence(p, &msg);
        }
        true
    }

    /// Puts `id` in `room` and tells the room's other peers (if it was not in it yet).
    pub(super) fn join_room(
        &self,
        st: &mut State,
        id: &str,
        info: &PeerInfo,
        room: &str,
        out: &mut Outbox,
    ) {
        let newly = st
            .conns
            .get_mut(id)
            .is_some_and(|c| c.rooms.insert(room.to_owned()));
        st.rooms
            .entry(room.to_owned())
            .or_default()
            .insert(id.to_owned());
        if newly {
            let msg = presence_text(&Presence::Joined {
                room: room.to_owned(),
                peer: info.clone(),
            });
            for p in st.room_members(room, id) {
                out.presence(p, &msg);
            }
        }
    }

    pub(super) fn make_pair(&self, st: &mut State, a: &str, rid: u64, b: &str, out: &mut Outbox) {
        let (Some(ia), Some(ib)) = (
            st.conns.get(a).and_then(|c| c.info.clone()),
            st.conns.get(b).and_then(|c| c.info.clone()),
        ) else {
            return;
        };
        if let Some(c) = st.conns.get_mut(a) {
            c.pairs.insert(b.to_owned());
        }
        self.inner.cluster.paired(a, b);
        if let Some(c) = st.conns.get_mut(b) {
            c.pairs.insert(a.to_owned());
        }
        // `b` hears of the pair before `a` does: `a` may send to `b` the moment it has its
        // answer, and nothing may overtake a presence.
        if let Some(sb) = st.socket(b) {
            out.push(
                &sb,
                events::PRESENCE,
                to_json(&Presence::Paired { peer: ia }),
            );
        }
        if let Some(sa) = st.socket(a) {
            out.push(
                &sa,
                events::RESPONSE,
                to_json(&Response {
                    rid,
                    ok: Some(to_json(&ib)),
                    error: None,
                }),
            );
            out.push(
                &sa,
                events::PRESENCE,
                to_json(&Presence::Paired { peer: ib }),
            );
        }
    }
}

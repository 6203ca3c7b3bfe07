//! The mirror of the other nodes' peers: what their messages change in our state.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::link::{Ctl, CtlKind, Link, RemoteSocket, SyncPeer};
use super::names::RELEASE;
use super::queue::Out;
use crate::protocol::{PeerInfo, Presence, events};
use crate::server::P2pSignaling;
use crate::server::book::Provider;
use crate::server::outbox::{Outbox, to_json};
use crate::server::services::fail_calls;
use crate::server::state::{Budget, Conn, State, TokenBucket};

impl P2pSignaling {
    /// Our peer `id` resumed on `node`: it becomes a peer of that node, silently.
    fn moved_away(&self, link: &Arc<Link>, st: &mut State, id: &str, node: &str) {
        let Some(conn) = st.conns.get_mut(id) else {
            return;
        };
        conn.socket = Arc::new(RemoteSocket {
            peer: id.to_owned(),
            node: node.to_owned(),
            cluster: link.clone(),
        });
        conn.away = None;
        if let Some(uid) = conn.info.as_ref().and_then(|i| i.uid.as_deref()) {
            link.uids.forget_local(uid);
        }
        st.remote.insert(id.to_owned(), node.to_owned());
        // The old connection (whatever socket id it has) must not act for the peer any more:
        // map it to an id nobody has.
        for v in st.peer_of.values_mut() {
            if v == id {
                v.clear();
            }
        }
        st.peer_of.insert(id.to_owned(), String::new());
        // Its pairing requests start again over there.
        for waiting in st.pending_pairs.values_mut() {
            waiting.retain(|w| w.requester != id);
        }
        st.pending_pairs.retain(|_, w| !w.is_empty());
        tracing::debug!(%id, %node, "peer resumed on another node");
    }

    /// A peer of `node` registered, or was listed in its sync.
    pub(super) fn apply_up(
        &self,
        link: &Arc<Link>,
        node: &str,
        info: PeerInfo,
        rooms: Vec<String>,
        token: Option<String>,
    ) {
        let mut out = Outbox::default();
        let id = info.id.clone();
        let newly = {
            let mut st = self.lock();
            let st = &mut *st;
            if let Some(token) = token {
                st.issued.insert(id.clone(), (token, Instant::now()));
            }
            let newly = match st.remote.get(&id) {
                Some(n) if n == node => false,
                // Our peer resumed on `node` (with the token we issued): it lives there now.
                // Nobody is told anything; its old connection here no longer speaks for it.
                None if st.conns.contains_key(&id) => {
                    self.moved_away(link, st, &id, node);
                    false
                }
                // It moved from another node to `node`.
                Some(_) => {
                    st.remote.insert(id.clone(), node.to_owned());
                    if let Some(c) = st.conns.get_mut(&id) {
                        c.socket = Arc::new(RemoteSocket {
                            peer: id.clone(),
                            node: node.to_owned(),
                            cluster: link.clone(),
                        });
                    }
                    false
                }
                None => true,
            };
            if newly {
                let socket = Arc::new(RemoteSocket {
                    peer: id.clone(),
                    node: node.to_owned(),
                    cluster: link.clone(),
                });
                st.conns.insert(
                    id.clone(),
                    Conn {
                        socket,
                        info: Some(info.clone()),
                        rooms: HashSet::new(),
                        pairs: HashSet::new(),
                        bucket: TokenBucket::new(1),
                        budget: Budget::new(&self.inner.opts.limits()),
                        away: None,
                        auth: serde_json::Value::Null,
                    },
                );
                st.remote.insert(id.clone(), node.to_owned());
            }
            if let Some(uid) = &info.uid {
                link.uids.note(uid, &id);
            }
            for room in rooms {
                self.join_room(st, &id, &info, &room, &mut out);
            }
            if let Some(uid) = &info.uid
                && let Some(waiting) = st.pending_pairs.remove(uid)
            {
                for w in waiting {
                    self.make_pair(st, &w.requester, w.rid, &id, &mut out);
                }
            }
            newly
        };
        out.flush();
        if newly && let Some(hook) = &self.inner.opts.on_peer_joined {
            hook(&info);
        }
    }

    fn is_from(&self, id: &str, node: &str) -> bool {
        self.lock().remote.get(id).is_some_and(|n| n == node)
    }

    pub(super) fn apply_ctl(&self, link: &Arc<Link>, node: &str, ctl: Ctl) {
        tracing::trace!(?ctl, %node, "cluster message");
        let ctl_kind = match ctl {
            Ctl::Unprovide { .. } | Ctl::Unsub { .. } => CtlKind::Off,
            _ => CtlKind::On,
        };
        match ctl {
            Ctl::Heartbeat { digest: Some(d) } => self.check_digest(link, node, d),
            Ctl::Heartbeat { digest: None } => {}
            Ctl::SyncRequest => self.sync_reply(link, node),
            Ctl::Resync => link.send_ctl(link.node_channel(node), &Ctl::SyncRequest),
            Ctl::Sync { peers } => self.apply_sync(link, node, peers),
            Ctl::Up { peer, rooms, token } => self.apply_up(link, node, peer, rooms, token),
            Ctl::Join { id, room } => {
                let mut out = Outbox::default();
                {
                    let mut st = self.lock();
                    let info = st.conns.get(&id).and_then(|c| c.info.clone());
                    if let Some(info) = info
                        && st.remote.get(&id).is_some_and(|n| n == node)
                    {
                        self.join_room(&mut st, &id, &info, &room, &mut out);
                    }
                }
                out.flush();
            }
            Ctl::Leave { id, room } => {
                let mut out = Outbox::default();
                {
                    let mut st = self.lock();
                    let st = &mut *st;
                    if st.remote.get(&id).is_none_or(|n| n != node) {
                        return;
                    }
                    if let Some(info) = st.conns.get(&id).and_then(|c| c.info.clone()) {
                        P2pSignaling::leave_room(st, &id, &info, &room, &mut out);
                    }
                }
                out.flush();
            }
            Ctl::Pair { a, b } => self.apply_pair(node, &a, &b),
            Ctl::Down { id } => {
                if self.is_from(&id, node) {
                    self.remove_now(&id);
                }
            }
            Ctl::Provide { id, service } | Ctl::Unprovide { id, service } => {
                let on = matches!(ctl_kind, CtlKind::On);
                if self.is_from(&id, node) {
                    self.mirror_provide(&id, &service, on);
                }
            }
            Ctl::Sub { id, topic } | Ctl::Unsub { id, topic } => {
                let on = matches!(ctl_kind, CtlKind::On);
                if self.is_from(&id, node) {
                    self.mirror_topic(&id, &topic, on);
                }
            }
        }
    }

    /// `node` asked for all our peers.
    fn sync_reply(&self, link: &Arc<Link>, node: &str) {
        let peers = {
            let st = self.lock();
            st.conns
                .iter()
                .filter(|(id, _)| !st.remote.contains_key(*id))
                .filter_map(|(_, c)| {
                    let mut rooms: Vec<String> = c.rooms.iter().cloned().collect();
                    rooms.sort();
                    let peer = c.info.clone()?;
                    let services = provided_by(&st, &peer.id);
                    let topics = topics_of(&st, &peer.id);
                    Some(SyncPeer {
                        token: st.issued.get(&peer.id).map(|(t, _)| t.clone()),
                        peer,
                        rooms,
                        pairs: c.pairs.iter().cloned().collect(),
                        services,
                        topics,
                    })
                })
                .collect()
        };
        link.send_ctl(link.node_channel(node), &Ctl::Sync { peers });
    }

    /// A heartbeat of `node` with the digest of its peers: ask it for all of them when our
    /// mirror disagrees (a message lost while Redis failed one of us, a subscription that
    /// came back after the other node's `Resync`). Once may be a message still in flight.
    fn check_digest(&self, link: &Arc<Link>, node: &str, theirs: u64) {
        let ours = digest(&self.lock(), Some(node));
        let ask = {
            let mut drift = link.drift.lock().unwrap_or_else(|e| e.into_inner());
            drift
                .entry(node.to_owned())
                .or_default()
                .heard(ours == theirs)
        };
        if ask {
            tracing::info!(%node, "our mirror of a node drifted from its heartbeat: asking it for all its peers");
            link.send_ctl(link.node_channel(node), &Ctl::SyncRequest);
        }
    }

    /// All peers of `node`: the ones we knew of and it no longer lists are gone.
    fn apply_sync(&self, link: &Arc<Link>, node: &str, peers: Vec<SyncPeer>) {
        let listed: HashSet<&str> = peers.iter().map(|p| p.peer.id.as_str()).collect();
        let gone: Vec<String> = {
            let st = self.lock();
            st.remote
                .iter()
                .filter(|(id, n)| *n == node && !listed.contains(id.as_str()))
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in gone {
            self.remove_now(&id);
        }
        let mut pairs = Vec::new();
        for p in peers {
            pairs.extend(p.pairs.into_iter().map(|b| (p.peer.id.clone(), b)));
            let id = p.peer.id.clone();
            self.leave_unlisted(node, &id, &p.rooms);
            self.apply_up(link, node, p.peer, p.rooms, p.token);
            if self.is_from(&id, node) {
                for s in p.services {
                    self.mirror_provide(&id, &s, true);
                }
                for t in p.topics {
                    self.mirror_topic(&id, &t, true);
                }
            }
        }
        for (a, b) in pairs {
            self.apply_pair(node, &a, &b);
        }
    }

    /// `id`, a peer of `node`, is in none of the rooms it is in here but `rooms` lists
    /// (a `Leave` was lost).
    fn leave_unlisted(&self, node: &str, id: &str, rooms: &[String]) {
        let mut out = Outbox::default();
        {
            let mut st = self.lock();
            let st = &mut *st;
            if st.remote.get(id).is_none_or(|n| n != node) {
                return;
            }
            let Some(c) = st.conns.get(id) else {
                return;
            };
            let Some(info) = c.info.clone() else {
                return;
            };
            let stale: Vec<String> = c
                .rooms
                .iter()
                .filter(|r| !rooms.contains(r))
                .cloned()
                .collect();
            for room in stale {
                P2pSignaling::leave_room(st, id, &info, &room, &mut out);
            }
        }
        out.flush();
    }

    /// `a` (a peer of `node`) paired with `b`: `b` hears of it if it is ours.
    fn apply_pair(&self, node: &str, a: &str, b: &str) {
        let mut out = Outbox::default();
        {
            let mut st = self.lock();
            if st.remote.get(a).is_none_or(|n| n != node) {
                return;
            }
            let Some(ia) = st.conns.get(a).and_then(|c| c.info.clone()) else {
                return;
            };
            let Some(cb) = st.conns.get_mut(b).filter(|c| c.info.is_some()) else {
                return;
            };
            let newly = cb.pairs.insert(a.to_owned());
            let sock = cb.socket.clone();
            if let Some(ca) = st.conns.get_mut(a) {
                ca.pairs.insert(b.to_owned());
            }
            if newly {
                out.push(
                    &sock,
                    events::PRESENCE,
                    to_json(&Presence::Paired { peer: ia }),
                );
            }
        }
        out.flush();
    }

    /// `node` stopped talking: its peers are gone, its uids are freed.
    pub(super) fn node_dead(&self, link: &Link, node: &str) {
        let (ids, uids): (Vec<String>, Vec<(&'static str, String, String)>) = {
            let st = self.lock();
            let ids: Vec<String> = st
                .remote
                .iter()
                .filter(|(_, n)| *n == node)
                .map(|(id, _)| id.clone())
                .collect();
            let uids = ids
                .iter()
                .filter_map(|id| {
                    let uid = st.conns.get(id)?.info.as_ref()?.uid.clone()?;
                    Some((RELEASE, link.uids.key(&uid), id.clone()))
                })
                .collect();
            (ids, uids)
        };
        tracing::warn!(%node, peers = ids.len(), "cluster node silent: its peers are gone");
        for id in &ids {
            self.remove_now(id);
        }
        if !uids.is_empty() {
            let _ = link.tx.send(Out::Eval(uids));
        }
    }

    /// `id`, a peer of another node, provides `service` (or no longer does).
    fn mirror_provide(&self, id: &str, service: &str, on: bool) {
        let mut out = Outbox::default();
        {
            let mut st = self.lock();
            if on {
                st.services
                    .providers
                    .insert(service.to_owned(), Provider::Peer(id.to_owned()));
            } else if matches!(st.services.providers.get(service), Some(Provider::Peer(p)) if p == id)
            {
                st.services.providers.remove(service);
                fail_calls(&mut st, id, Some(service), &mut out);
            }
        }
        out.flush();
    }

    /// `id`, a peer of another node, subscribed to `topic` (or unsubscribed).
    fn mirror_topic(&self, id: &str, topic: &str, on: bool) {
        let mut st = self.lock();
        if on {
            st.services.subscribe(id, topic);
        } else {
            st.services.unsubscribe(id, topic);
        }
    }
}

/// Services provided by our peer `id`.
fn provided_by(st: &State, id: &str) -> Vec<String> {
    st.services
        .providers
        .iter()
        .filter(|(_, p)| matches!(p, Provider::Peer(x) if x == id))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Topics our peer `id` is subscribed to.
fn topics_of(st: &State, id: &str) -> Vec<String> {
    st.services
        .subscriptions
        .get(id)
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default()
}

/// A digest of the peers `st` holds for `node` (ours when `None`) and of their rooms: a sum
/// of hashes, so it does not depend on the order of anything. Heartbeats carry ours; the
/// other nodes compare it with their mirror of us.
pub(super) fn digest(st: &State, node: Option<&str>) -> u64 {
    let mut sum = 0u64;
    for (id, c) in &st.conns {
        if c.info.is_none() || st.remote.get(id).map(String::as_str) != node {
            continue;
        }
        sum = sum.wrapping_add(fnv1a(&[id.as_bytes()]));
        for room in &c.rooms {
            sum = sum.wrapping_add(fnv1a(&[id.as_bytes(), &[0], room.as_bytes()]));
        }
    }
    sum
}

/// FNV-1a over the concatenation of `parts`: the same on every node and every build.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::super::link::Drift;

    #[test]
    fn drift_asks_after_two_misses_then_backs_off_until_it_agrees() {
        let mut d = Drift::default();
        assert!(!d.heard(false));
        assert!(d.heard(false));
        // The sync did not repair it: 4 more, then 8.
        assert_eq!((0..4).filter(|_| d.heard(false)).count(), 1);
        assert!(!d.heard(true));
        assert!(!d.heard(false));
        assert!(d.heard(false));
    }
}

//! The peer and scope operations: `hello`, `join`, `leave`, `peers`, `pair`, `signal`.
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::cluster::{Claim, ClaimFail, Name};
use super::outbox::{error_response, to_json};
use super::requests::{Claimed, Ctx, Deferred, Flow, Hello, Retry, wait_claim};
use super::state::{PendingPair, State};
use super::{P2pSignaling, new_token};
use crate::protocol::{
    ErrorCode, MembersPage, PROTOCOL_VERSION, PeerInfo, Resume, Signal, SignalFrom, Welcome, events,
};

/// Which id a `hello` registers (see `protocol::Resume`).
enum Plan {
    Fresh,
    /// The peer is away (its connection broke a moment ago): it takes its place back as if
    /// nothing happened.
    Back(String),
    /// An id this server instance never issued (it restarted): granted, and nobody was told
    /// the peer left.
    Restart(String),
}

impl P2pSignaling {
    /// Register. Decides on the resume first, claims the uid for the id the peer will have
    /// (waiting for the cluster if need be, without the lock), and only then moves anything.
    pub(super) fn hello(&self, cx: &mut Ctx<'_>, h: Hello, claimed: Option<Claimed>) -> Flow {
        if h.version != PROTOCOL_VERSION {
            return Flow::error(
                ErrorCode::Unsupported,
                format!(
                    "protocol version {} is not supported (server speaks {PROTOCOL_VERSION})",
                    h.version
                ),
            );
        }
        let names = h.uid.iter().map(|u| ("uid", u));
        for (what, name) in names.chain(h.rooms.iter().map(|r| ("room", r))) {
            if let Err(e) = self.check_name(what, name) {
                return Flow::Reply(Err(e));
            }
        }
        if h.rooms.len() > self.inner.opts.max_rooms_per_peer {
            return Flow::error(ErrorCode::BadRequest, "too many rooms");
        }
        self.inner.cluster.take_over(self, cx.st, h.resume.as_ref());
        let plan = self.resume_plan(cx.st, &cx.id, h.resume.as_ref());
        let target = match &plan {
            Plan::Fresh => cx.id.clone(),
            Plan::Back(r) | Plan::Restart(r) => r.clone(),
        };
        if let Some(uid) = h.uid.clone() {
            let result = match claimed {
                Some(c) if c.uid == uid && c.target == target => c.result,
                earlier => {
                    // The plan changed while the claim was in flight: claim again.
                    if let Some(c) = earlier
                        && c.result.is_ok()
                    {
                        self.inner.cluster.release(Name::Uid, &c.uid, &c.target);
                    }
                    match self.inner.cluster.claim(Name::Uid, &uid, &target) {
                        Claim::Done(r) => r,
                        Claim::Pending(claim) => {
                            let retry = Retry::Hello {
                                hello: h,
                                uid,
                                target,
                            };
                            return Flow::Wait(Deferred {
                                wait: wait_claim(claim),
                                rid: cx.rid,
                                retry,
                            });
                        }
                    }
                }
            };
            match result {
                Ok(()) => {}
                Err(ClaimFail::Taken) => {
                    return Flow::error(
                        ErrorCode::UidTaken,
                        format!("uid {uid:?} is held by another peer"),
                    );
                }
                Err(ClaimFail::Unreachable) => {
                    return Flow::error(
                        ErrorCode::UidTaken,
                        format!("cannot check that uid {uid:?} is free (redis unreachable)"),
                    );
                }
            }
        }
        self.hello_commit(cx, h, plan, target)
    }

    fn resume_plan(&self, st: &State, id: &str, resume: Option<&Resume>) -> Plan {
        let Some(r) = resume.filter(|r| {
            r.id != id && r.id.len() <= self.inner.opts.max_name_len && !r.id.is_empty()
        }) else {
            return Plan::Fresh;
        };
        match (st.conns.get(&r.id), st.issued.get(&r.id)) {
            (Some(c), Some((token, _))) if c.away.is_some() && *token == r.token => {
                Plan::Back(r.id.clone())
            }
            (None, None) if !r.token.starts_with(&self.inner.instance) => {
                Plan::Restart(r.id.clone())
            }
            // Held by a live peer, a wrong token, or an id of ours whose departure was
            // announced: a new id.
            _ => Plan::Fresh,
        }
    }

    /// Registers the peer under `target` once its uid is its own.
    fn hello_commit(&self, cx: &mut Ctx<'_>, h: Hello, plan: Plan, target: String) -> Flow {
        let st = &mut *cx.st;
        let sid = cx.id.as_str();
        let continued = !matches!(plan, Plan::Fresh);
        // The queue the peer's place kept while it was away (sent after the welcome).
        let mut held: Option<std::sync::Arc<dyn super::state::PeerSocket>> = None;
        match plan {
            Plan::Fresh => {}
            Plan::Back(r) => {
                if let Some(fresh) = st.conns.remove(sid)
                    && let Some(conn) = st.conns.get_mut(&r)
                {
                    held = Some(std::mem::replace(&mut conn.socket, fresh.socket));
                    conn.away = None;
                }
                st.peer_of.insert(sid.to_owned(), r);
            }
            Plan::Restart(r) => {
                if let Some(conn) = st.conns.remove(sid) {
                    st.conns.insert(r.clone(), conn);
                }
                st.peer_of.insert(sid.to_owned(), r);
            }
        }
        let id = target.as_str();
        let info = PeerInfo {
            id: id.to_owned(),
            uid: h.uid.clone(),
        };
        if let Some(c) = st.conns.get_mut(id) {
            c.info = Some(info.clone());
            c.socket.set_encoding(h.frames);
            c.socket.set_batch_presence(h.batch_presence);
        }
        for room in &h.rooms {
            self.join_room(st, id, &info, room, cx.out);
        }
        *cx.joined = Some(info);
        // The welcome goes out before any `paired` it triggers: the peer must know its own
        // id before it meets anyone.
        let token = self.issue_token(st, id);
        self.inner.cluster.up(st, id);
        tracing::debug!(%id, continued, "peer registered");
        let welcome = Welcome {
            id: id.to_owned(),
            uid: h.uid.clone(),
            rooms: Vec::new(),
            max_frame: self.inner.opts.max_frame,
            token,
            continued,
            ice_servers: (self.inner.opts.turn.as_ref())
                .map(|t| t.issue(h.uid.as_deref().unwrap_or(id)))
                .into_iter()
                .collect(),
        };
        let cap = self.inner.opts.welcome_members;
        let text = welcome_response(st, cx.rid, &welcome, id, &h.rooms, cap);
        cx.out.push_raw(&cx.me, events::RESPONSE, text);
        if let Some(away) = held.as_ref().and_then(|s| s.away()) {
            away.hand_over(&cx.me, cx.out);
        }
        if let Some(uid) = &h.uid
            && let Some(waiting) = st.pending_pairs.remove(uid)
        {
            for w in waiting {
                self.make_pair(st, &w.requester, w.rid, id, cx.out);
            }
        }
        Flow::Later
    }

    /// A new resume token for `id`.
    fn issue_token(&self, st: &mut State, id: &str) -> String {
        let now = Instant::now();
        // Forget tokens older than a day, at most once a minute (not at every hello).
        if st
            .issued_pruned
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
        {
            st.issued_pruned = Some(now);
            st.issued
                .retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(24 * 3600));
        }
        let token = format!("{}.{}", self.inner.instance, new_token(id));
        st.issued.insert(id.to_owned(), (token.clone(), now));
        token
    }

    /// Join a room.
    pub(super) fn join(&self, cx: &mut Ctx<'_>, me: &PeerInfo, room: String) -> Flow {
        if let Err(e) = self.check_name("room", &room) {
            return Flow::Reply(Err(e));
        }
        let conn = cx.st.conns.get(&cx.id);
        let n = conn.map_or(0, |c| c.rooms.len());
        let already = conn.is_some_and(|c| c.rooms.contains(&room));
        if !already && n >= self.inner.opts.max_rooms_per_peer {
            return Flow::error(ErrorCode::BadRequest, "too many rooms");
        }
        self.inner.cluster.joined(&cx.id, &room);
        self.join_room(cx.st, &cx.id, me, &room, cx.out);
        Flow::ok(to_json(&cx.st.room_peers(&room, &cx.id)))
    }

    /// Leave a room.
    pub(super) fn leave(&self, cx: &mut Ctx<'_>, me: &PeerInfo, room: String) -> Flow {
        if !Self::leave_room(cx.st, &cx.id, me, &room, cx.out) {
            return Flow::error(ErrorCode::UnknownRoom, format!("not in room {room:?}"));
        }
        self.inner.cluster.left(&cx.id, &room);
        Flow::ok(Json::Null)
    }

    /// The other peers of a room.
    pub(super) fn peers_of(&self, cx: &mut Ctx<'_>, room: String) -> Flow {
        if let Some(refused) = not_in_room(cx, &room) {
            return refused;
        }
        Flow::ok(to_json(&cx.st.room_peers(&room, &cx.id)))
    }

    /// One page of a room's other members (see `protocol::Op::Members`).
    pub(super) fn members_page(
        &self,
        cx: &mut Ctx<'_>,
        room: String,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Flow {
        let most = self.inner.opts.members_page;
        if limit == Some(0) {
            return Flow::error(ErrorCode::BadRequest, "limit must be at least 1");
        }
        // More than the server gives in one page: a full page (the client asks again).
        let limit = limit.unwrap_or(most).min(most);
        if let Some(a) = &after
            && let Err(e) = self.check_name("after", a)
        {
            return Flow::Reply(Err(e));
        }
        if let Some(refused) = not_in_room(cx, &room) {
            return refused;
        }
        let (page, more) = cx.st.room_page(&room, &cx.id, after.as_deref(), limit);
        let page = MembersPage {
            peers: page.into_iter().cloned().collect(),
            more,
        };
        Flow::ok(to_json(&page))
    }

    /// Pair with the peer holding `peer_uid`, now or once it registers.
    pub(super) fn pair(
        &self,
        cx: &mut Ctx<'_>,
        me: &PeerInfo,
        peer_uid: String,
        timeout_ms: Option<u64>,
    ) -> Flow {
        if let Err(e) = self.check_name("peer_uid", &peer_uid) {
            return Flow::Reply(Err(e));
        }
        if me.uid.as_deref() == Some(peer_uid.as_str()) {
            return Flow::error(ErrorCode::BadRequest, "cannot pair with yourself");
        }
        let st = &mut *cx.st;
        if let Some(target) = self
            .inner
            .cluster
            .holder(&peer_uid)
            .filter(|h| st.conns.contains_key(h))
        {
            self.make_pair(st, &cx.id, cx.rid, &target, cx.out);
            return Flow::Later;
        }
        let wait = timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.inner.opts.default_pair_timeout)
            .min(self.inner.opts.max_pair_timeout);
        st.next_token += 1;
        let token = st.next_token;
        let rid = cx.rid;
        st.pending_pairs
            .entry(peer_uid.clone())
            .or_default()
            .push(PendingPair {
                requester: cx.id.clone(),
                rid,
                token,
            });
        let this = self.clone();
        let me = cx.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let expired = {
                let mut st = this.lock();
                let mut found = false;
                if let Some(w) = st.pending_pairs.get_mut(&peer_uid) {
                    let before = w.len();
                    w.retain(|p| p.token != token);
                    found = w.len() != before;
                    if w.is_empty() {
                        st.pending_pairs.remove(&peer_uid);
                    }
                }
                found
            };
            if expired {
                let msg = error_response(
                    rid,
                    ErrorCode::PeerOffline,
                    format!("no peer with uid {peer_uid:?} showed up in {wait:?}"),
                );
                let _ = me.emit_json(events::RESPONSE, &msg);
            }
        });
        Flow::Later
    }

    /// Relay a WebRTC signal to a peer sharing a scope.
    pub(super) fn signal(&self, cx: &mut Ctx<'_>, to: String, signal: Signal) -> Flow {
        if let Err(e) = signal.validate() {
            return Flow::error(ErrorCode::BadSignal, e);
        }
        if to == cx.id || !cx.st.share_scope(&cx.id, &to) {
            return Flow::error(
                ErrorCode::UnknownPeer,
                format!("no peer {to:?} in your rooms or pairs"),
            );
        }
        self.inner.counters.signal(&signal);
        if let Some(sock) = cx.st.socket(&to) {
            let msg = to_json(&SignalFrom {
                from: cx.id.clone(),
                signal,
            });
            cx.out.push(&sock, events::SIGNAL, msg);
        }
        Flow::ok(Json::Null)
    }
}

/// `UnknownRoom` unless the asking peer is in `room`.
fn not_in_room(cx: &Ctx<'_>, room: &str) -> Option<Flow> {
    let member = cx
        .st
        .conns
        .get(&cx.id)
        .is_some_and(|c| c.rooms.contains(room));
    (!member).then(|| Flow::error(ErrorCode::UnknownRoom, format!("not in room {room:?}")))
}

/// The response to a `hello`, as text: `welcome` with the member lists of `rooms` written
/// straight from the state (a room of thousands is one pass over it, no JSON tree).
/// Every other field of `welcome` is serialized as usual.
/// Each room lists at most `cap` members, with `"more":true` when it has others.
fn welcome_response(
    st: &State,
    rid: u64,
    welcome: &Welcome,
    id: &str,
    rooms: &[String],
    cap: usize,
) -> String {
    let mut out = String::with_capacity(256 + 32 * rooms.len());
    out.push_str("{\"rid\":");
    out.push_str(&rid.to_string());
    out.push_str(",\"ok\":{");
    let mut first = true;
    if let Json::Object(fields) = to_json(welcome) {
        for (k, v) in fields {
            if k == "rooms" {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            super::state::write_str(&k, &mut out);
            out.push(':');
            out.push_str(&v.to_string());
        }
    }
    if !first {
        out.push(',');
    }
    out.push_str("\"rooms\":[");
    for (i, room) in rooms.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"room\":");
        super::state::write_str(room, &mut out);
        out.push_str(",\"peers\":");
        if st.write_room_peers(room, id, cap, &mut out) {
            out.push_str(",\"more\":true");
        }
        out.push('}');
    }
    out.push_str("]}}");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::protocol::RoomPeers;
    use crate::server::away::AwaySocket;
    use crate::server::state::{Budget, Conn, TokenBucket};

    fn add(st: &mut State, id: &str, uid: Option<&str>, rooms: &[&str]) {
        let conn = Conn {
            socket: AwaySocket::new(4),
            info: Some(PeerInfo {
                id: id.to_owned(),
                uid: uid.map(str::to_owned),
            }),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            pairs: HashSet::new(),
            bucket: TokenBucket::new(1),
            budget: Budget::new(&crate::server::SignalingOptions::default().limits()),
            away: None,
            auth: Json::Null,
        };
        st.conns.insert(id.to_owned(), conn);
        for r in rooms {
            st.rooms
                .entry((*r).to_owned())
                .or_default()
                .insert(id.to_owned());
        }
    }

    /// The `Welcome` written as text is the one serde would write, member lists included
    /// (sorted, without the peer itself, uids escaped).
    #[test]
    fn welcome_text_is_the_serialized_welcome() {
        let mut st = State::default();
        add(&mut st, "me", Some("m"), &["a", "b \"q\""]);
        add(&mut st, "z9", None, &["a"]);
        add(
            &mut st,
            "b1",
            Some("quote \" and \\ and é\n"),
            &["a", "b \"q\""],
        );
        add(&mut st, "c2", None, &["other"]);
        let rooms = vec!["a".to_owned(), "b \"q\"".to_owned(), "none".to_owned()];
        let welcome = Welcome {
            id: "me".into(),
            uid: Some("m".into()),
            rooms: rooms
                .iter()
                .map(|r| RoomPeers {
                    room: r.clone(),
                    peers: st.room_peers(r, "me"),
                    more: false,
                })
                .collect(),
            max_frame: 1234,
            token: "tok".into(),
            continued: true,
            ice_servers: vec![crate::protocol::IceServerInfo {
                urls: vec!["turn:127.0.0.1:3478".into()],
                username: Some("1700000000:me".into()),
                credential: Some("c\"d".into()),
            }],
        };
        let want = to_json(&crate::protocol::Response {
            rid: 7,
            ok: Some(to_json(&welcome)),
            error: None,
        });
        let text = welcome_response(&st, 7, &welcome, "me", &rooms, usize::MAX);
        let got: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(got, want);
        assert_eq!(
            got["ok"]["rooms"][0]["peers"],
            serde_json::json!([{"id": "b1", "uid": "quote \" and \\ and é\n"}, {"id": "z9"}])
        );
        let back: Welcome = serde_json::from_value(got["ok"].clone()).unwrap();
        assert_eq!(back.rooms.len(), 3);
    }

    /// A capped `Welcome` lists the first members and says `more`; pages after the last
    /// id listed give the rest, each once, and the last page says no more.
    #[test]
    fn capped_welcome_and_pages_cover_the_room() {
        let mut st = State::default();
        add(&mut st, "m5", None, &["r"]);
        let ids: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        for id in &ids {
            add(&mut st, id, None, &["r"]);
        }
        let welcome = Welcome {
            id: "m5".into(),
            uid: None,
            rooms: Vec::new(),
            max_frame: 1,
            token: String::new(),
            continued: false,
            ice_servers: Vec::new(),
        };
        let rooms = vec!["r".to_owned()];
        let text = welcome_response(&st, 1, &welcome, "m5", &rooms, 4);
        let got: Json = serde_json::from_str(&text).unwrap();
        let back: Welcome = serde_json::from_value(got["ok"].clone()).unwrap();
        let first: Vec<String> = back.rooms[0].peers.iter().map(|p| p.id.clone()).collect();
        assert_eq!(first, ids[..4]);
        assert!(back.rooms[0].more);
        let mut seen = first;
        loop {
            let last = seen.last().cloned();
            let (page, more) = st.room_page("r", "m5", last.as_deref(), 3);
            seen.extend(page.iter().map(|p| p.id.clone()));
            if !more {
                break;
            }
            assert_eq!(page.len(), 3);
        }
        assert_eq!(seen, ids);
        // A cap the room fits in says nothing of more.
        let text = welcome_response(&st, 1, &welcome, "m5", &rooms, 10);
        assert!(!text.contains("more"));
        let (page, more) = st.room_page("r", "m5", Some("p9"), 3);
        assert!(page.is_empty() && !more);
    }
}

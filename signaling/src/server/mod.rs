//! `P2pSignaling`: the socketioxide middleware.
#[cfg(feature = "redis")]
mod cluster;
mod services;
mod state;

#[cfg(feature = "redis")]
pub use cluster::RedisCluster;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value as Json;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{Event, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts};
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide_core::Value;
use socketioxide_core::adapter::DefinedAdapter;

use crate::protocol::{
    BatchWriter, ErrorBody, ErrorCode, ErrorMsg, FrameEncoding, Op, PROTOCOL_VERSION, PeerInfo,
    Presence, Request, Response, RoomPeers, SignalFrom, Welcome, batch_from_base64,
    batch_to_base64, events, peek_route, split_batch, stamp_from,
};
use services::ServiceOp;
use state::{
    Conn, EmitFail, LocalUidRegistry, PeerSocket, PendingPair, State, TokenBucket, UidRegistry,
};

/// Decides whether a connection may join, from its Socket.IO connect `auth` payload
/// (`null` when none was sent). `Err(reason)` refuses it: the client gets a Socket.IO
/// `connect_error` whose message is `reason`.
pub type AuthHook = Arc<dyn Fn(&Json) -> Result<(), String> + Send + Sync>;
/// Called with a peer's identity when it registers or disconnects.
pub type PeerHook = Arc<dyn Fn(&PeerInfo) + Send + Sync>;

/// Options of [`P2pSignaling`]. Every field has a default that works.
#[derive(Clone)]
pub struct SignalingOptions {
    max_frame: usize,
    max_pair_timeout: Duration,
    default_pair_timeout: Duration,
    request_rate: u32,
    request_burst: u32,
    max_rooms_per_peer: usize,
    max_name_len: usize,
    resume_grace: Duration,
    auth: Option<AuthHook>,
    on_peer_joined: Option<PeerHook>,
    on_peer_left: Option<PeerHook>,
}

impl Default for SignalingOptions {
    fn default() -> Self {
        Self {
            max_frame: 256 * 1024,
            max_pair_timeout: Duration::from_secs(60),
            default_pair_timeout: Duration::from_secs(10),
            request_rate: 500,
            request_burst: 1000,
            max_rooms_per_peer: 64,
            max_name_len: 128,
            resume_grace: Duration::from_secs(5),
            auth: None,
            on_peer_joined: None,
            on_peer_left: None,
        }
    }
}

impl std::fmt::Debug for SignalingOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalingOptions")
            .field("max_frame", &self.max_frame)
            .field("max_pair_timeout", &self.max_pair_timeout)
            .field("request_rate", &self.request_rate)
            .field("request_burst", &self.request_burst)
            .field("auth", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl SignalingOptions {
    /// Largest relayed frame in bytes (default 256 KiB). Larger frames get `PayloadTooLarge`.
    /// Peers split bigger messages into frames well below this.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }
    /// Longest a pairing request may wait for its peer (default 60 s; the default wait is 10 s).
    pub fn max_pair_timeout(mut self, d: Duration) -> Self {
        self.max_pair_timeout = d;
        self
    }
    /// Control requests allowed per socket: `rate` per second, bursts of `burst`
    /// (default 500/s, 1000). Beyond that, requests get `RateLimited`.
    pub fn request_rate(mut self, rate: u32, burst: u32) -> Self {
        self.request_rate = rate;
        self.request_burst = burst.max(1);
        self
    }
    /// How long a peer whose connection broke (rather than closed) keeps its id, rooms,
    /// pairs and uid, so that it can reconnect and carry on with nobody noticing (default
    /// 5 s; zero: tell the others at once). A deliberate disconnect is always final at once.
    pub fn resume_grace(mut self, d: Duration) -> Self {
        self.resume_grace = d;
        self
    }
    /// Most rooms one peer may be in (default 64).
    pub fn max_rooms_per_peer(mut self, n: usize) -> Self {
        self.max_rooms_per_peer = n;
        self
    }
    /// Accept or refuse connections from their connect `auth` payload.
    pub fn auth(
        mut self,
        hook: impl Fn(&Json) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.auth = Some(Arc::new(hook));
        self
    }
    /// Called when a peer registers.
    pub fn on_peer_joined(mut self, hook: impl Fn(&PeerInfo) + Send + Sync + 'static) -> Self {
        self.on_peer_joined = Some(Arc::new(hook));
        self
    }
    /// Called when a registered peer disconnects.
    pub fn on_peer_left(mut self, hook: impl Fn(&PeerInfo) + Send + Sync + 'static) -> Self {
        self.on_peer_left = Some(Arc::new(hook));
        self
    }
}

struct Inner {
    opts: SignalingOptions,
    /// Random name of this server instance, the prefix of every resume token it issues: a
    /// token of ours for an id we no longer know means "expired", not "we restarted".
    instance: String,
    state: Mutex<State>,
    uids: Box<dyn UidRegistry>,
    /// Set when this server is one node of a Redis cluster.
    #[cfg(feature = "redis")]
    cluster: Option<Arc<cluster::Cluster>>,
}

/// The signaling and relay middleware. Cheap to clone; every clone is the same server.
///
/// Attach it to a namespace with [`P2pSignaling::attach`] (or [`P2pSignaling::attach_to`]),
/// or call [`P2pSignaling::register`] from a connect handler of your own.
#[derive(Clone)]
pub struct P2pSignaling {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for P2pSignaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pSignaling")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// Outgoing messages collected under the lock and sent after it.
#[derive(Default)]
struct Outbox {
    msgs: Vec<(Arc<dyn PeerSocket>, Outgoing)>,
}

/// One outgoing control message.
enum Outgoing {
    Json(&'static str, Json),
    /// A presence, serialized once for all its recipients.
    Presence(Arc<str>),
}

/// A presence, serialized once for every recipient.
fn presence_text(p: &Presence) -> Arc<str> {
    serde_json::to_string(p).unwrap_or_default().into()
}

impl Outbox {
    fn push(&mut self, to: &Arc<dyn PeerSocket>, event: &'static str, data: Json) {
        let msg = if event == events::PRESENCE {
            Outgoing::Presence(data.to_string().into())
        } else {
            Outgoing::Json(event, data)
        };
        self.msgs.push((to.clone(), msg));
    }
    fn presence(&mut self, to: Arc<dyn PeerSocket>, text: &Arc<str>) {
        self.msgs.push((to, Outgoing::Presence(text.clone())));
    }
    fn flush(self) {
        for (socket, msg) in self.msgs {
            let (event, sent) = match msg {
                Outgoing::Presence(text) => (events::PRESENCE, socket.emit_presence(text)),
                Outgoing::Json(event, data) => (event, socket.emit_json(event, &data)),
            };
            if let Err(e) = sent {
                tracing::debug!(?e, event, "could not deliver control message");
            }
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

fn error_response(rid: u64, code: ErrorCode, message: impl Into<String>) -> Json {
    to_json(&Response {
        rid,
        ok: None,
        error: Some(ErrorBody {
            code,
            message: message.into(),
        }),
    })
}

fn error_event(code: ErrorCode, message: impl Into<String>, event: &str) -> ErrorMsg {
    ErrorMsg {
        error: ErrorBody {
            code,
            message: message.into(),
        },
        event: Some(event.to_owned()),
        to: None,
        seq: None,
    }
}

#[derive(Debug)]
struct AuthRejected(String);
impl std::fmt::Display for AuthRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for AuthRejected {}

/// A socket of this node, with the batch encoding its client asked for in `hello`.
struct LocalSocket<A: Adapter> {
    socket: SocketRef<A>,
    base64: AtomicBool,
    /// Presence waiting to go out as one batch, when the client asked for batches.
    presence: Option<Arc<PresenceQueue>>,
}

/// Presences queued for one socket (see [`PeerSocket::emit_presence`]).
#[derive(Default)]
struct PresenceQueue {
    on: AtomicBool,
    queue: Mutex<Vec<Arc<str>>>,
}

/// Most presences in one batch, so that no message grows big (socket buffers keep the size
/// of the biggest message they carried).
const PRESENCE_BATCH: usize = 64;

impl PresenceQueue {
    fn take(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sends what is queued, in batches of at most `PRESENCE_BATCH`.
    fn flush<A: Adapter>(&self, socket: &SocketRef<A>) -> Result<(), EmitFail> {
        let queued = self.take();
        let mut result = Ok(());
        for chunk in queued.chunks(PRESENCE_BATCH) {
            let text = if let [one] = chunk {
                one.to_string()
            } else {
                let len = chunk.iter().map(|p| p.len() + 1).sum::<usize>() + 1;
                let mut t = String::with_capacity(len);
                for p in chunk {
                    t.push(if t.is_empty() { '[' } else { ',' });
                    t.push_str(p);
                }
                t.push(']');
                t
            };
            let Ok(raw) = serde_json::value::RawValue::from_string(text) else {
                continue;
            };
            if let Err(e) = socket.emit(events::PRESENCE, &raw) {
                result = Err(map_send_error(e));
            }
        }
        result
    }
}

impl<A: Adapter> LocalSocket<A> {
    /// Sends queued presence first: nothing may overtake it.
    fn flush_presence(&self) {
        if let Some(q) = &self.presence
            && q.on.load(Ordering::Relaxed)
        {
            let _ = q.flush(&self.socket);
        }
    }
}

impl<A: Adapter> PeerSocket for LocalSocket<A> {
    fn emit_presence(&self, data: Arc<str>) -> Result<(), EmitFail> {
        let Some(q) = self
            .presence
            .as_ref()
            .filter(|q| q.on.load(Ordering::Relaxed))
        else {
            return match serde_json::value::RawValue::from_string(data.to_string()) {
                Ok(raw) => self
                    .socket
                    .emit(events::PRESENCE, &raw)
                    .map_err(map_send_error),
                Err(_) => Ok(()),
            };
        };
        let first = {
            let mut queue = q.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.push(data);
            queue.len() == 1
        };
        if first {
            // Send the queue once the current burst of requests had a chance to add to it.
            let (q, socket) = (q.clone(), self.socket.clone());
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = q.flush(&socket);
            });
        }
        Ok(())
    }
    fn set_batch_presence(&self, on: bool) {
        if let Some(q) = &self.presence {
            q.on.store(on, Ordering::Relaxed);
        }
    }
    fn emit_frames(&self, batch: Bytes, _frames: usize) -> Result<(), EmitFail> {
        self.flush_presence();
        if self.base64.load(Ordering::Relaxed) {
            self.socket
                .emit(events::FRAME, &batch_to_base64(&batch))
                .map_err(map_send_error)
        } else {
            self.socket
                .emit(events::FRAME, &batch)
                .map_err(map_send_error)
        }
    }
    fn emit_json(&self, event: &'static str, data: &Json) -> Result<(), EmitFail> {
        self.flush_presence();
        self.socket.emit(event, data).map_err(map_send_error)
    }
    fn set_encoding(&self, encoding: FrameEncoding) {
        self.base64
            .store(encoding == FrameEncoding::Base64, Ordering::Relaxed);
    }
}

fn map_send_error(e: socketioxide::SendError) -> EmitFail {
    match e {
        socketioxide::SendError::Socket(socketioxide::SocketError::InternalChannelFull) => {
            EmitFail::Full
        }
        _ => EmitFail::Closed,
    }
}

impl P2pSignaling {
    /// A new signaling server with these options.
    pub fn new(opts: SignalingOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                instance: new_token("instance")[..12].to_owned(),
                opts,
                state: Mutex::new(State::default()),
                uids: Box::new(LocalUidRegistry::default()),
                #[cfg(feature = "redis")]
                cluster: None,
            }),
        }
    }

    /// Serves peers on the root namespace `/`. Returns what socketioxide's `ns` returns:
    /// `()` for the default in-memory adapter, a future to await for remote adapters.
    pub fn attach<A: Adapter + DefinedAdapter>(&self, io: &SocketIo<A>) -> A::InitRes {
        self.attach_to(io, "/")
    }

    /// Serves peers on namespace `path` (runs the auth hook, if any, at connect).
    pub fn attach_to<A: Adapter + DefinedAdapter>(
        &self,
        io: &SocketIo<A>,
        path: &str,
    ) -> A::InitRes {
        // Registration runs in a connect middleware: middlewares finish before socketioxide
        // sends the CONNECT packet, so the protocol handlers exist before the client can send
        // anything (the connect handler itself runs in a task of its own, too late for that).
        let this = self.clone();
        let handler = async |_: SocketRef<A>| {};
        let middleware = async move |s: SocketRef<A>,
                                     TryData(data): TryData<Json>|
                    -> Result<(), AuthRejected> {
            if let Some(hook) = &this.inner.opts.auth {
                let auth = data.unwrap_or(Json::Null);
                hook(&auth).map_err(AuthRejected)?;
            }
            this.register(&s);
            Ok(())
        };
        io.ns(path.to_owned(), handler.with(middleware))
    }

    /// Serves one socket, when you do not use [`P2pSignaling::attach`]. Call it from a
    /// connect *middleware* (`handler.with(middleware)`), not from the connect handler:
    /// socketioxide runs connect handlers in a task of their own, after the client may already
    /// have sent its first request. The protocol takes the `p2p:*` events and the fallback
    /// handler of this socket.
    pub fn register<A: Adapter>(&self, socket: &SocketRef<A>) {
        let s: &Socket<A> = socket;
        s.extensions.insert(self.clone());
        let conn = Conn {
            socket: arc_of(socket),
            info: None,
            rooms: HashSet::new(),
            pairs: HashSet::new(),
            bucket: TokenBucket::new(self.inner.opts.request_burst),
            away: None,
        };
        self.lock().conns.insert(socket.id.to_string(), conn);
        socket.on(events::REQUEST, async |_: RequestDone| {});
        socket.on(events::FRAME, async |_: FrameDone| {});
        socket.on_fallback(async |s: SocketRef<A>, Event(event): Event| {
            let msg = error_event(
                ErrorCode::UnknownEvent,
                format!("unknown event {event:?}"),
                &event,
            );
            let _ = s.emit(events::ERROR, &to_json(&msg));
        });
        let this = self.clone();
        socket.on_disconnect(async move |s: SocketRef<A>, reason: DisconnectReason| {
            // A deliberate disconnect is final at once; a broken connection gets a grace
            // period to come back (resume) before the others are told.
            let deliberate = matches!(
                reason,
                DisconnectReason::ClientNSDisconnect
                    | DisconnectReason::ServerNSDisconnect
                    | DisconnectReason::ClosingServer
            );
            this.disconnected(&s.id.to_string(), deliberate)
        });
    }

    /// Registered peers, sorted by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let st = self.lock();
        let mut v: Vec<PeerInfo> = st.conns.values().filter_map(|c| c.info.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Registered peers of a room, sorted by id.
    pub fn room_peers(&self, room: &str) -> Vec<PeerInfo> {
        self.lock().room_peers(room, "")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disconnected(&self, sid: &str, deliberate: bool) {
        tracing::debug!(sid, deliberate, "socket disconnected");
        let grace = self.inner.opts.resume_grace;
        let id = {
            let mut st = self.lock();
            let id = st.peer_of.remove(sid).unwrap_or_else(|| sid.to_owned());
            if !deliberate && !grace.is_zero() {
                st.next_token += 1;
                let n = st.next_token;
                if let Some(conn) = st.conns.get_mut(&id).filter(|c| c.info.is_some()) {
                    conn.away = Some(n);
                    let mut out = Outbox::default();
                    self.services_away(&mut st, &id, &mut out);
                    let this = self.clone();
                    let away_id = id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        let still_away = this
                            .lock()
                            .conns
                            .get(&away_id)
                            .is_some_and(|c| c.away == Some(n));
                        if still_away {
                            this.remove_now(&away_id);
                        }
                    });
                    drop(st);
                    out.flush();
                    return;
                }
            }
            id
        };
        self.remove_now(&id);
    }

    /// Forgets a peer and tells the others.
    fn remove_now(&self, id: &str) {
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
            #[cfg(feature = "redis")]
            self.cluster_down(&mut st, id);
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
            if let Some(info) = &conn.info {
                if let Some(uid) = &info.uid {
                    self.inner.uids.release(uid, id);
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

    fn handle_request(&self, sid: &str, raw: Result<Json, String>) {
        let mut out = Outbox::default();
        let mut joined = None;
        {
            let mut st = self.lock();
            let id = &st.peer_id(sid);
            let Some(conn) = st.conns.get_mut(id) else {
                return;
            };
            let me = conn.socket.clone();
            let opts = &self.inner.opts;
            let rid = raw
                .as_ref()
                .ok()
                .and_then(|v| v.get("rid"))
                .and_then(Json::as_u64)
                .unwrap_or(0);
            if !conn.bucket.take(opts.request_rate, opts.request_burst) {
                out.push(
                    &me,
                    events::RESPONSE,
                    error_response(rid, ErrorCode::RateLimited, "too many requests"),
                );
            } else {
                let req = raw
                    .and_then(|v| serde_json::from_value::<Request>(v).map_err(|e| e.to_string()));
                match req {
                    Err(e) => out.push(
                        &me,
                        events::RESPONSE,
                        error_response(rid, ErrorCode::BadRequest, e),
                    ),
                    Ok(req) => {
                        let reply =
                            self.apply(&mut st, id, &me, req.rid, req.op, &mut out, &mut joined);
                        if let Some(reply) = reply {
                            let resp = match reply {
                                Ok(ok) => to_json(&Response {
                                    rid: req.rid,
                                    ok: Some(ok),
                                    error: None,
                                }),
                                Err((code, msg)) => error_response(req.rid, code, msg),
                            };
                            out.push(&me, events::RESPONSE, resp);
                        }
                    }
                }
            }
        }
        out.flush();
        if let (Some(info), Some(hook)) = (joined, &self.inner.opts.on_peer_joined) {
            hook(&info);
        }
    }

    fn check_name(&self, what: &str, name: &str) -> Result<(), (ErrorCode, String)> {
        if name.is_empty() || name.len() > self.inner.opts.max_name_len {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "{what} must be 1 to {} bytes long",
                    self.inner.opts.max_name_len
                ),
            ));
        }
        Ok(())
    }

    /// Applies one request. `None` means the reply comes later (pairing that waits).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        st: &mut State,
        id: &str,
        me: &Arc<dyn PeerSocket>,
        rid: u64,
        op: Op,
        out: &mut Outbox,
        joined: &mut Option<PeerInfo>,
    ) -> Option<Result<Json, (ErrorCode, String)>> {
        let registered = st.conns.get(id).and_then(|c| c.info.clone());
        let my_info = match (&op, registered) {
            (Op::Hello { .. }, Some(_)) => {
                return Some(Err((
                    ErrorCode::AlreadyRegistered,
                    "hello was already sent".into(),
                )));
            }
            (Op::Hello { .. }, None) => PeerInfo {
                id: id.to_owned(),
                uid: None,
            },
            (_, None) => return Some(Err((ErrorCode::NotRegistered, "send hello first".into()))),
            (_, Some(info)) => info,
        };
        Some(match op {
            Op::Hello {
                version,
                uid,
                rooms,
                resume,
                frames,
                batch_presence,
            } => {
                if version != PROTOCOL_VERSION {
                    return Some(Err((
                        ErrorCode::Unsupported,
                        format!(
                            "protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})"
                        ),
                    )));
                }
                if let Some(uid) = &uid
                    && let Err(e) = self.check_name("uid", uid)
                {
                    return Some(Err(e));
                }
                for r in &rooms {
                    if let Err(e) = self.check_name("room", r) {
                        return Some(Err(e));
                    }
                }
                if rooms.len() > self.inner.opts.max_rooms_per_peer {
                    return Some(Err((ErrorCode::BadRequest, "too many rooms".into())));
                }
                // Resume: take back an earlier id (see protocol::Resume).
                // Resume: take back an earlier id (see protocol::Resume). Decide first, check
                // the uid against the id it will have, and only then move anything.
                enum Plan {
                    Fresh,
                    /// The peer is away (its connection broke a moment ago): it takes its
                    /// place back as if nothing happened.
                    Back(String),
                    /// An id this server instance never issued (it restarted): granted, and
                    /// nobody was told the peer left.
                    Restart(String),
                }
                #[cfg(feature = "redis")]
                self.cluster_take_over(st, resume.as_ref());
                let plan = match resume {
                    Some(r)
                        if r.id != id
                            && r.id.len() <= self.inner.opts.max_name_len
                            && !r.id.is_empty() =>
                    {
                        match (st.conns.get(&r.id), st.issued.get(&r.id)) {
                            (Some(c), Some((token, _)))
                                if c.away.is_some() && *token == r.token =>
                            {
                                Plan::Back(r.id)
                            }
                            (None, None) if !r.token.starts_with(&self.inner.instance) => {
                                Plan::Restart(r.id)
                            }
                            // Held by a live peer, a wrong token, or an id of ours whose
                            // departure was announced: a new id.
                            _ => Plan::Fresh,
                        }
                    }
                    _ => Plan::Fresh,
                };
                let (target, continued) = match &plan {
                    Plan::Fresh => (id.to_owned(), false),
                    Plan::Back(r) | Plan::Restart(r) => (r.clone(), true),
                };
                if let Some(uid) = &uid
                    && let Err(code) = self.inner.uids.claim(uid, &target)
                {
                    return Some(Err((code, format!("uid {uid:?} is held by another peer"))));
                }
                match plan {
                    Plan::Fresh => {}
                    Plan::Back(r) => {
                        if let Some(fresh) = st.conns.remove(id)
                            && let Some(conn) = st.conns.get_mut(&r)
                        {
                            conn.socket = fresh.socket;
                            conn.away = None;
                        }
                        st.peer_of.insert(id.to_owned(), r);
                    }
                    Plan::Restart(r) => {
                        if let Some(conn) = st.conns.remove(id) {
                            st.conns.insert(r.clone(), conn);
                        }
                        st.peer_of.insert(id.to_owned(), r);
                    }
                }
                let id = target.as_str();
                let info = PeerInfo {
                    id: id.to_owned(),
                    uid: uid.clone(),
                };
                if let Some(c) = st.conns.get_mut(id) {
                    c.info = Some(info.clone());
                    c.socket.set_encoding(frames);
                    c.socket.set_batch_presence(batch_presence);
                }
                let mut room_peers = Vec::new();
                for room in rooms {
                    let peers = self.join_room(st, id, &info, &room, out);
                    room_peers.push(RoomPeers { room, peers });
                }
                *joined = Some(info.clone());
                // The welcome goes out before any `paired` it triggers: the peer must know its
                // own id before it meets anyone.
                let now = std::time::Instant::now();
                // Forget tokens older than a day, at most once a minute (not at every hello).
                if st
                    .issued_pruned
                    .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
                {
                    st.issued_pruned = Some(now);
                    st.issued.retain(|_, (_, at)| {
                        now.duration_since(*at) < Duration::from_secs(24 * 3600)
                    });
                }
                let token = format!("{}.{}", self.inner.instance, new_token(id));
                st.issued.insert(id.to_owned(), (token.clone(), now));
                #[cfg(feature = "redis")]
                self.cluster_up(st, id);
                tracing::debug!(%id, continued, "peer registered");
                let welcome = Welcome {
                    id: id.to_owned(),
                    uid: uid.clone(),
                    rooms: room_peers,
                    max_frame: self.inner.opts.max_frame,
                    token,
                    continued,
                };
                out.push(
                    me,
                    events::RESPONSE,
                    to_json(&Response {
                        rid,
                        ok: Some(to_json(&welcome)),
                        error: None,
                    }),
                );
                if let Some(uid) = &uid
                    && let Some(waiting) = st.pending_pairs.remove(uid)
                {
                    for w in waiting {
                        self.make_pair(st, &w.requester, w.rid, id, out);
                    }
                }
                return None;
            }
            Op::Join { room } => {
                if let Err(e) = self.check_name("room", &room) {
                    return Some(Err(e));
                }
                let n = st.conns.get(id).map_or(0, |c| c.rooms.len());
                let already = st.conns.get(id).is_some_and(|c| c.rooms.contains(&room));
                if !already && n >= self.inner.opts.max_rooms_per_peer {
                    return Some(Err((ErrorCode::BadRequest, "too many rooms".into())));
                }
                #[cfg(feature = "redis")]
                self.cluster_join(id, &room);
                Ok(to_json(&self.join_room(st, id, &my_info, &room, out)))
            }
            Op::Leave { room } => {
                if !Self::leave_room(st, id, &my_info, &room, out) {
                    return Some(Err((
                        ErrorCode::UnknownRoom,
                        format!("not in room {room:?}"),
                    )));
                }
                #[cfg(feature = "redis")]
                self.cluster_leave(id, &room);
                Ok(Json::Null)
            }
            Op::Peers { room } => {
                if !st.conns.get(id).is_some_and(|c| c.rooms.contains(&room)) {
                    return Some(Err((
                        ErrorCode::UnknownRoom,
                        format!("not in room {room:?}"),
                    )));
                }
                Ok(to_json(&st.room_peers(&room, id)))
            }
            Op::Pair {
                peer_uid,
                timeout_ms,
            } => {
                if let Err(e) = self.check_name("peer_uid", &peer_uid) {
                    return Some(Err(e));
                }
                if my_info.uid.as_deref() == Some(peer_uid.as_str()) {
                    return Some(Err((
                        ErrorCode::BadRequest,
                        "cannot pair with yourself".into(),
                    )));
                }
                match self
                    .inner
                    .uids
                    .holder(&peer_uid)
                    .filter(|h| st.conns.contains_key(h))
                {
                    Some(target) => {
                        self.make_pair(st, id, rid, &target, out);
                        return None;
                    }
                    None => {
                        let wait = timeout_ms
                            .map(Duration::from_millis)
                            .unwrap_or(self.inner.opts.default_pair_timeout)
                            .min(self.inner.opts.max_pair_timeout);
                        st.next_token += 1;
                        let token = st.next_token;
                        st.pending_pairs
                            .entry(peer_uid.clone())
                            .or_default()
                            .push(PendingPair {
                                requester: id.to_owned(),
                                rid,
                                token,
                            });
                        let this = self.clone();
                        let me = me.clone();
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
                        return None;
                    }
                }
            }
            Op::Provide { service } => {
                return self.apply_service(st, &my_info, rid, ServiceOp::Provide(service), out);
            }
            Op::Unprovide { service } => {
                return self.apply_service(st, &my_info, rid, ServiceOp::Unprovide(service), out);
            }
            Op::Call {
                service,
                method,
                args,
                timeout_ms,
            } => {
                let op = ServiceOp::Call {
                    service,
                    method,
                    args,
                    timeout_ms,
                };
                return self.apply_service(st, &my_info, rid, op, out);
            }
            Op::CallResult { cid, outcome } => {
                let op = ServiceOp::Result { cid, outcome };
                return self.apply_service(st, &my_info, rid, op, out);
            }
            Op::Subscribe { topic } => {
                return self.apply_service(st, &my_info, rid, ServiceOp::Subscribe(topic), out);
            }
            Op::Unsubscribe { topic } => {
                return self.apply_service(st, &my_info, rid, ServiceOp::Unsubscribe(topic), out);
            }
            Op::Publish { topic, data } => {
                let op = ServiceOp::Publish { topic, data };
                return self.apply_service(st, &my_info, rid, op, out);
            }
            Op::Signal { to, signal } => {
                if let Err(e) = signal.validate() {
                    return Some(Err((ErrorCode::BadSignal, e)));
                }
                if to == id || !st.share_scope(id, &to) {
                    return Some(Err((
                        ErrorCode::UnknownPeer,
                        format!("no peer {to:?} in your rooms or pairs"),
                    )));
                }
                if let Some(sock) = st.socket(&to) {
                    out.push(
                        &sock,
                        events::SIGNAL,
                        to_json(&SignalFrom {
                            from: id.to_owned(),
                            signal,
                        }),
                    );
                }
                Ok(Json::Null)
            }
        })
    }

    /// Takes `id` out of `room` and tells the room's other peers; false if it was not in it.
    fn leave_room(st: &mut State, id: &str, info: &PeerInfo, room: &str, out: &mut Outbox) -> bool {
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

    fn join_room(
        &self,
        st: &mut State,
        id: &str,
        info: &PeerInfo,
        room: &str,
        out: &mut Outbox,
    ) -> Vec<PeerInfo> {
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
        st.room_peers(room, id)
    }

    fn make_pair(&self, st: &mut State, a: &str, rid: u64, b: &str, out: &mut Outbox) {
        let (Some(ia), Some(ib)) = (
            st.conns.get(a).and_then(|c| c.info.clone()),
            st.conns.get(b).and_then(|c| c.info.clone()),
        ) else {
            return;
        };
        if let Some(c) = st.conns.get_mut(a) {
            c.pairs.insert(b.to_owned());
        }
        #[cfg(feature = "redis")]
        self.cluster_pair(a, b);
        if let Some(c) = st.conns.get_mut(b) {
            c.pairs.insert(a.to_owned());
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
        if let Some(sb) = st.socket(b) {
            out.push(
                &sb,
                events::PRESENCE,
                to_json(&Presence::Paired { peer: ia }),
            );
        }
    }

    /// Relays one `p2p:f` batch: every frame in order, frames to the same target in one
    /// outgoing batch. Errors go back to the sender in `p2p:error`, one per refused frame,
    /// and one per outgoing batch the target's buffer could not take.
    fn relay_batch(&self, me: &dyn PeerSocket, sid: &str, data: Result<Bytes, String>) {
        let batch_error = |code: ErrorCode, message: String| {
            let msg = error_event(code, message, events::FRAME);
            let _ = me.emit_json(events::ERROR, &to_json(&msg));
        };
        let batch = match data {
            Ok(b) => b,
            Err(e) => {
                return batch_error(
                    ErrorCode::BadRequest,
                    format!("p2p:f takes one batch (binary or base64 text): {e}"),
                );
            }
        };
        let max_batch = self.inner.opts.max_frame.saturating_mul(4);
        if batch.len() > max_batch {
            return batch_error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "batch of {} bytes, the server takes at most {max_batch}",
                    batch.len()
                ),
            );
        }
        let frames = match split_batch(&batch) {
            Ok(f) => f,
            Err(e) => return batch_error(ErrorCode::BadRequest, format!("bad batch: {e}")),
        };
        let mut errors: Vec<ErrorMsg> = Vec::new();
        let mut outgoing: Vec<OutBatch> = Vec::new();
        {
            let st = self.lock();
            let id = st.peer_id(sid);
            let registered = st.conns.get(&id).is_some_and(|c| c.info.is_some());
            for frame in &frames {
                match self.route_frame(&st, &id, registered, frame) {
                    Ok(Routed {
                        to,
                        socket,
                        frame: stamped,
                        seq,
                    }) => {
                        let i = match outgoing.iter().position(|o| o.to == to) {
                            Some(i) => i,
                            None => {
                                outgoing.push(OutBatch {
                                    to,
                                    socket,
                                    writer: BatchWriter::new(),
                                    first_seq: None,
                                });
                                outgoing.len() - 1
                            }
                        };
                        let out = &mut outgoing[i];
                        out.first_seq = out.first_seq.or(seq);
                        out.writer.push(&stamped);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        for mut out in outgoing {
            let n = out.writer.count();
            let failed = match out.socket.emit_frames(out.writer.take(), n) {
                Ok(()) => None,
                Err(EmitFail::Full) => {
                    Some((ErrorCode::Busy, "the target's buffer is full; resend later"))
                }
                Err(EmitFail::Closed) => Some((ErrorCode::UnknownPeer, "the target is gone")),
            };
            if let Some((code, message)) = failed {
                errors.push(frame_error(
                    code,
                    message.into(),
                    Some(out.to),
                    out.first_seq,
                ));
            }
        }
        for e in errors {
            let _ = me.emit_json(events::ERROR, &to_json(&e));
        }
    }

    /// Checks one frame of a batch from peer `id`: its target, and the frame with `from`
    /// stamped (and its seq, for Data frames), or the error for the sender.
    fn route_frame(
        &self,
        st: &State,
        id: &str,
        registered: bool,
        frame: &Bytes,
    ) -> Result<Routed, ErrorMsg> {
        if frame.len() > self.inner.opts.max_frame {
            let route = peek_route(frame).ok();
            return Err(frame_error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "frame of {} bytes, the server relays at most {}",
                    frame.len(),
                    self.inner.opts.max_frame
                ),
                route.as_ref().map(|r| r.to.to_owned()),
                route.and_then(|r| r.seq()),
            ));
        }
        let route = peek_route(frame).map_err(|e| {
            frame_error(ErrorCode::BadRequest, format!("bad frame: {e}"), None, None)
        })?;
        let to = route.to.to_owned();
        if !registered {
            return Err(frame_error(
                ErrorCode::NotRegistered,
                "send hello first".into(),
                Some(to),
                route.seq(),
            ));
        }
        let target = if route.to == id || !st.share_scope(id, route.to) {
            None
        } else {
            st.socket(route.to)
        };
        let Some(target) = target else {
            return Err(frame_error(
                ErrorCode::UnknownPeer,
                format!("no peer {:?} in your rooms or pairs", route.to),
                Some(to),
                route.seq(),
            ));
        };
        let stamped = stamp_from(&route, id).map_err(|e| {
            frame_error(ErrorCode::BadRequest, format!("bad frame: {e}"), None, None)
        })?;
        let seq = route.seq();
        Ok(Routed {
            to,
            socket: target,
            frame: stamped,
            seq,
        })
    }
}

/// A frame ready to go: its target, the target's socket, the frame with `from` stamped,
/// and its seq if it is a Data frame.
struct Routed {
    to: String,
    socket: Arc<dyn PeerSocket>,
    frame: Bytes,
    seq: Option<u64>,
}

/// Frames of one incoming batch for one target.
struct OutBatch {
    to: String,
    socket: Arc<dyn PeerSocket>,
    writer: BatchWriter,
    /// Seq of the first Data frame, reported if the target cannot take the batch.
    first_seq: Option<u64>,
}

fn frame_error(code: ErrorCode, message: String, to: Option<String>, seq: Option<u64>) -> ErrorMsg {
    ErrorMsg {
        error: ErrorBody { code, message },
        event: Some(events::FRAME.to_owned()),
        to,
        seq,
    }
}

/// A hard-to-guess token (std only: hashes seeded by the OS's randomness, time and a counter).
fn new_token(id: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut parts = [0u64; 2];
    for (i, part) in parts.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(id.as_bytes());
        h.write_u128(t);
        h.write_u64(n);
        h.write_usize(i);
        *part = h.finish();
    }
    format!("{:016x}{:016x}", parts[0], parts[1])
}

fn arc_of<A: Adapter>(s: &SocketRef<A>) -> Arc<dyn PeerSocket> {
    Arc::new(LocalSocket {
        socket: s.clone(),
        base64: AtomicBool::new(false),
        presence: Some(Arc::default()),
    })
}

fn signaling_of<A: Adapter>(s: &Arc<Socket<A>>) -> Option<P2pSignaling> {
    s.extensions.get::<P2pSignaling>()
}

/// socketioxide sends the Socket.IO CONNECT packet a moment before it marks the socket
/// connected (on another thread), and refuses emits to it until then: a client that
/// answers the CONNECT at once (socket.io-client sends `hello` on `connect`) could lose the
/// response to its first request. That moment is a few instructions with no await, so a
/// short spin waits it out.
fn wait_connected<A: Adapter>(s: &Socket<A>) {
    for _ in 0..10_000 {
        if s.connected() {
            return;
        }
        std::thread::yield_now();
    }
}

/// Extractor that handles a `p2p:req` synchronously, in the socket's receive order.
struct RequestDone;
impl<A: Adapter> FromMessageParts<A> for RequestDone {
    type Error = Infallible;
    fn from_message_parts(
        s: &Arc<Socket<A>>,
        v: &mut Value,
        ack: &Option<i64>,
    ) -> Result<Self, Infallible> {
        if let Some(sig) = signaling_of(s) {
            wait_connected(s);
            let TryData(data) = TryData::<Json>::from_message_parts(s, v, ack)?;
            sig.handle_request(&s.id.to_string(), data.map_err(|e| e.to_string()));
        }
        Ok(RequestDone)
    }
}

/// Extractor that relays a `p2p:f` batch synchronously, so frames keep their order. The
/// batch is one binary attachment, or one base64 string.
struct FrameDone;
impl<A: Adapter> FromMessageParts<A> for FrameDone {
    type Error = Infallible;
    fn from_message_parts(
        s: &Arc<Socket<A>>,
        v: &mut Value,
        ack: &Option<i64>,
    ) -> Result<Self, Infallible> {
        if let Some(sig) = signaling_of(s) {
            wait_connected(s);
            let binary = matches!(v, Value::Str(_, Some(bins)) if !bins.is_empty());
            let data = if binary {
                TryData::<Bytes>::from_message_parts(s, v, ack)?
                    .0
                    .map_err(|e| e.to_string())
            } else {
                match TryData::<String>::from_message_parts(s, v, ack)?.0 {
                    Ok(text) => batch_from_base64(&text).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let me = SocketRef::from_message_parts(s, v, ack)?;
            let me = LocalSocket {
                socket: me,
                base64: AtomicBool::new(false),
                presence: None,
            };
            sig.relay_batch(&me, &s.id.to_string(), data);
        }
        Ok(FrameDone)
    }
}

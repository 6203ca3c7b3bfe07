//! Several nodes sharing one redis-server (cargo feature `redis`).
//!
//! Every node keeps, in its own [`State`], a mirror of the peers of the other nodes: they are
//! ordinary `Conn`s whose socket is a [`RemoteSocket`], so that scoping, presence, pairing and
//! relaying work on them unchanged. A node owns its own peers: it publishes every change about
//! them (registered, joined, left, paired, gone) on the cluster channel, and every node tells its
//! own peers about the changes of others (presence and responses never cross nodes). Frames and
//! WebRTC signals for a remote peer go to that peer's node channel.
//!
//! Everything a node publishes goes through one unbounded queue drained by one task that sends
//! batches as pipelines on one connection, and every node reads both of its channels on one
//! subscriber connection: Redis keeps the publish order, so a peer on another node sees
//! changes and frames in the order its node made them, without a Redis round trip per frame.
//! Frames waiting in the queue are counted and bounded: beyond the bound the sender gets `Busy`.
//!
//! uids are keys `<prefix>:uid:<uid>` holding the peer id, claimed by a compare-and-set script,
//! refreshed by the holder node's heartbeat and expiring after `node_timeout`: a dead node's uids
//! free themselves. A node that sends nothing (not even its heartbeat) for `node_timeout` is
//! dead: the others forget its peers and tell their own peers that they disconnected.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::services::RELAYED_RESULT;
use super::state::{Conn, EmitFail, PeerSocket, State, TokenBucket, UidRegistry};
use super::{Inner, Outbox, P2pSignaling, SignalingOptions, new_token, to_json};
use crate::protocol::{
    Body, CallOutcome, ErrorBody, ErrorCode, ErrorMsg, Frame, PeerInfo, Presence, Resume, events,
    split_batch,
};

/// How a [`P2pSignaling`] joins a cluster of nodes sharing one redis-server; give it to
/// [`P2pSignaling::with_redis`]. Every node of a cluster must use the same prefix.
#[derive(Clone, Debug)]
pub struct RedisCluster {
    client: redis::Client,
    prefix: String,
    heartbeat: Duration,
    node_timeout: Duration,
    max_queue: usize,
    io_timeout: Duration,
}

impl RedisCluster {
    /// A cluster on this Redis client (`redis::Client::open("redis://127.0.0.1:6379/")`).
    pub fn new(client: redis::Client) -> Self {
        Self {
            client,
            prefix: "p2p".to_owned(),
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(3),
            max_queue: 8192,
            io_timeout: Duration::from_secs(1),
        }
    }
    /// Prefix of every Redis key and channel this cluster uses (default `p2p`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// How often a node tells the others it is alive and refreshes its peers' uids
    /// (default 1 s).
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d.max(Duration::from_millis(10));
        self
    }
    /// How long a silent node stays alive for the others, and how long a uid of a dead node
    /// stays taken (default 3 s). At least twice the heartbeat.
    pub fn node_timeout(mut self, d: Duration) -> Self {
        self.node_timeout = d;
        self
    }
    /// Most frames waiting to be published to other nodes (default 8192). Beyond it, frames
    /// to peers of other nodes are refused with `Busy`.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n.max(1);
        self
    }
    /// Longest wait for Redis when a `hello` claims a uid (default 1 s). The claim blocks the
    /// request handler for one round trip.
    pub fn io_timeout(mut self, d: Duration) -> Self {
        self.io_timeout = d;
        self
    }
    fn timeout(&self) -> Duration {
        self.node_timeout.max(self.heartbeat * 2)
    }
}

/// Takes a uid if it is free or already ours; refreshes its expiry either way.
const CLAIM: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
    return 0";
/// Deletes a uid if `ARGV[1]` still holds it.
const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
/// Extends a uid if `ARGV[1]` still holds it.
const REFRESH: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0";

/// The uid registry shared by the cluster: Redis decides, the mirror answers `holder`.
pub(crate) struct ClusterUids {
    client: redis::Client,
    key_prefix: String,
    ttl_ms: u64,
    io_timeout: Duration,
    conn: Mutex<Option<redis::Connection>>,
    /// uid -> peer id, for every peer of the cluster this node knows of.
    known: Mutex<HashMap<String, String>>,
    /// uid -> peer id, for this node's own peers (refreshed by the heartbeat).
    local: Mutex<HashMap<String, String>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClusterUids {
    /// Names of one kind (`uid`, `svc`): keys `<prefix>:<kind>:<name>`.
    fn new(cluster: &RedisCluster, kind: &str, ttl_ms: u64) -> Self {
        Self {
            client: cluster.client.clone(),
            key_prefix: format!("{}:{kind}:", cluster.prefix),
            ttl_ms,
            io_timeout: cluster.io_timeout,
            conn: Mutex::new(None),
            known: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, uid: &str) -> String {
        format!("{}{uid}", self.key_prefix)
    }

    /// Runs one script on the blocking connection (reconnecting once if it broke).
    fn eval(&self, script: &str, uid: &str, peer: &str) -> redis::RedisResult<i64> {
        let mut slot = guard(&self.conn);
        let mut last = None;
        for _ in 0..2 {
            if slot.is_none() {
                let c = self.client.get_connection_with_timeout(self.io_timeout)?;
                c.set_read_timeout(Some(self.io_timeout))?;
                c.set_write_timeout(Some(self.io_timeout))?;
                *slot = Some(c);
            }
            let Some(c) = slot.as_mut() else { break };
            match redis::cmd("EVAL")
                .arg(script)
                .arg(1)
                .arg(self.key(uid))
                .arg(peer)
                .arg(self.ttl_ms)
                .query::<i64>(c)
            {
                Ok(v) => return Ok(v),
                Err(e) => {
                    *slot = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "no redis connection"))
        }))
    }

    /// A peer of another node registered (or left) with this uid.
    fn note(&self, uid: &str, peer: &str) {
        guard(&self.known).insert(uid.to_owned(), peer.to_owned());
    }

    fn local_uids(&self) -> Vec<(String, String)> {
        guard(&self.local)
            .iter()
            .map(|(u, p)| (self.key(u), p.clone()))
            .collect()
    }
}

/// The registry as `Inner` holds it.
struct SharedUids(Arc<ClusterUids>);

impl UidRegistry for SharedUids {
    fn claim(&self, uid: &str, peer: &str) -> Result<(), ErrorCode> {
        match self.0.eval(CLAIM, uid, peer) {
            Ok(1) => {
                guard(&self.0.local).insert(uid.to_owned(), peer.to_owned());
                self.0.note(uid, peer);
                Ok(())
            }
            Ok(_) => Err(ErrorCode::UidTaken),
            Err(e) => {
                // Fail closed: without Redis nobody can tell whether the uid is free.
                tracing::warn!(%e, uid, "redis unreachable: uid refused");
                Err(ErrorCode::UidTaken)
            }
        }
    }
    fn release(&self, uid: &str, peer: &str) {
        {
            let mut known = guard(&self.0.known);
            if known.get(uid).is_some_and(|p| p == peer) {
                known.remove(uid);
            }
        }
        let mine = {
            let mut local = guard(&self.0.local);
            let mine = local.get(uid).is_some_and(|p| p == peer);
            if mine {
                local.remove(uid);
            }
            mine
        };
        if mine && let Err(e) = self.0.eval(RELEASE, uid, peer) {
            tracing::warn!(%e, uid, "redis unreachable: uid left to expire");
        }
    }
    fn holder(&self, uid: &str) -> Option<String> {
        guard(&self.0.known).get(uid).cloned()
    }
}

#[derive(Clone, Copy)]
enum CtlKind {
    On,
    Off,
}

/// Kinds of cluster messages (first byte).
const K_CTL: u8 = b'c';
const K_FRAME: u8 = b'f';
const K_EVENT: u8 = b'e';

/// Membership and liveness messages.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Ctl {
    /// The node is alive.
    Heartbeat,
    /// "Send me all your peers" (to one node's channel, or to all).
    SyncRequest,
    /// All peers of the sending node.
    Sync {
        peers: Vec<SyncPeer>,
    },
    /// A peer registered (or resumed) with these rooms; `token` lets it resume on any node.
    Up {
        peer: PeerInfo,
        rooms: Vec<String>,
        #[serde(default)]
        token: Option<String>,
    },
    Join {
        id: String,
        room: String,
    },
    Leave {
        id: String,
        room: String,
    },
    Pair {
        a: String,
        b: String,
    },
    Down {
        id: String,
    },
    /// A peer of the sending node provides a service (the name is claimed in Redis).
    Provide {
        id: String,
        service: String,
    },
    Unprovide {
        id: String,
        service: String,
    },
    /// A peer of the sending node subscribed to a topic.
    Sub {
        id: String,
        topic: String,
    },
    Unsub {
        id: String,
        topic: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct SyncPeer {
    peer: PeerInfo,
    rooms: Vec<String>,
    pairs: Vec<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
}

/// A message for the publishing task.
enum Out {
    Publish {
        channel: String,
        payload: Vec<u8>,
        /// Frames in it (counted against `max_queue`).
        frames: usize,
    },
    /// Scripts to run (uid refresh and release), `(script, key, peer)`.
    Eval(Vec<(&'static str, String, String)>),
}

/// `kind`, sender node, target peer (may be empty), rest.
fn encode(kind: u8, node: &str, to: &str, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + node.len() + to.len() + rest.len());
    v.push(kind);
    for s in [node, to] {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
    }
    v.extend_from_slice(rest);
    v
}

fn decode(msg: &[u8]) -> Option<(u8, &str, &str, &[u8])> {
    let (&kind, mut rest) = msg.split_first()?;
    let mut strs = ["", ""];
    for s in &mut strs {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let bytes = rest.get(2..2 + len)?;
        *s = std::str::from_utf8(bytes).ok()?;
        rest = rest.get(2 + len..)?;
    }
    Some((kind, strs[0], strs[1], rest))
}

/// What a node needs to publish.
pub(crate) struct Cluster {
    node: String,
    prefix: String,
    tx: mpsc::UnboundedSender<Out>,
    queued_frames: Arc<AtomicUsize>,
    max_queue: usize,
    uids: Arc<ClusterUids>,
    /// Service names, claimed like uids (keys `<prefix>:svc:<name>`).
    svcs: Arc<ClusterUids>,
}

impl Cluster {
    fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }
    fn node_channel(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
    fn send(&self, channel: String, payload: Vec<u8>) {
        let _ = self.tx.send(Out::Publish {
            channel,
            payload,
            frames: 0,
        });
    }
    fn publish(&self, ctl: &Ctl) {
        self.send_ctl(self.all_channel(), ctl);
    }
    fn send_ctl(&self, channel: String, ctl: &Ctl) {
        match serde_json::to_vec(ctl) {
            Ok(json) => self.send(channel, encode(K_CTL, &self.node, "", &json)),
            Err(e) => tracing::error!(%e, "cannot encode a cluster message"),
        }
    }
    fn send_event(&self, node: &str, to: &str, event: &str, data: &Json) {
        match serde_json::to_vec(&(event, data)) {
            Ok(json) => self.send(
                self.node_channel(node),
                encode(K_EVENT, &self.node, to, &json),
            ),
            Err(e) => tracing::error!(%e, "cannot encode a cluster message"),
        }
    }
}

/// A peer of another node, as the local state sees it: frames and signals go to its node;
/// presence and responses are dropped (its own node tells it).
struct RemoteSocket {
    peer: String,
    node: String,
    cluster: Arc<Cluster>,
}

impl PeerSocket for RemoteSocket {
    fn emit_frames(&self, batch: Bytes, frames: usize) -> Result<(), EmitFail> {
        let c = &self.cluster;
        if c.queued_frames.fetch_add(frames, Ordering::AcqRel) >= c.max_queue {
            c.queued_frames.fetch_sub(frames, Ordering::AcqRel);
            return Err(EmitFail::Full);
        }
        let payload = encode(K_FRAME, &c.node, &self.peer, &batch);
        let sent = c.tx.send(Out::Publish {
            channel: c.node_channel(&self.node),
            payload,
            frames,
        });
        if sent.is_err() {
            c.queued_frames.fetch_sub(frames, Ordering::AcqRel);
            return Err(EmitFail::Closed);
        }
        Ok(())
    }
    fn emit_json(&self, event: &'static str, data: &Json) -> Result<(), EmitFail> {
        if [
            events::SIGNAL,
            events::ERROR,
            events::CALL,
            events::TOPIC,
            RELAYED_RESULT,
        ]
        .contains(&event)
        {
            self.cluster.send_event(&self.node, &self.peer, event, data);
        }
        Ok(())
    }
}

impl P2pSignaling {
    /// A signaling server that is one node of a cluster sharing a redis-server: peers on
    /// different nodes see each other as if they were on one server. Waits until this node
    /// listens to the cluster; fails if Redis cannot be reached.
    ///
    /// Build the `SocketIo` with socketioxide-redis's adapter too if your own handlers
    /// broadcast (`io.to(room).emit`); the signaling itself does not need it.
    pub async fn with_redis(
        opts: SignalingOptions,
        cluster: RedisCluster,
    ) -> Result<P2pSignaling, redis::RedisError> {
        let timeout = cluster.timeout();
        let ttl_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let node = new_token("node")[..16].to_owned();
        let uids = Arc::new(ClusterUids::new(&cluster, "uid", ttl_ms));
        let svcs = Arc::new(ClusterUids::new(&cluster, "svc", ttl_ms));
        let wait = cluster.io_timeout.max(Duration::from_secs(1)) * 5;
        let manager = in_time(
            wait,
            redis::aio::ConnectionManager::new(cluster.client.clone()),
        )
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Cluster {
            node: node.clone(),
            prefix: cluster.prefix.clone(),
            tx,
            queued_frames: Arc::new(AtomicUsize::new(0)),
            max_queue: cluster.max_queue,
            uids: uids.clone(),
            svcs,
        });
        let channels = [link.all_channel(), link.node_channel(&node)];
        let pubsub = in_time(wait, subscribe(&cluster.client, &channels)).await?;
        let mut sig = P2pSignaling::new(opts);
        let Some(inner) = Arc::get_mut(&mut sig.inner) else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "signaling server shared before it was set up",
            )));
        };
        inner.uids = Box::new(SharedUids(uids));
        inner.cluster = Some(link.clone());
        tokio::spawn(publisher(manager, rx, link.queued_frames.clone(), ttl_ms));
        link.publish(&Ctl::Heartbeat);
        link.publish(&Ctl::SyncRequest);
        let inbound = Inbound {
            sig: Arc::downgrade(&sig.inner),
            link,
            client: cluster.client.clone(),
            channels,
            heartbeat: cluster.heartbeat,
            timeout,
            last_seen: HashMap::new(),
        };
        tokio::spawn(inbound.run(pubsub));
        tracing::info!(%node, prefix = %cluster.prefix, "cluster node up");
        Ok(sig)
    }

    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// Hook: a local peer provides `name`: claimed in Redis (one round trip), then announced.
    pub(super) fn cluster_claim_service(
        &self,
        name: &str,
        id: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(c) = self.cluster() else {
            return Ok(());
        };
        match c.svcs.eval(CLAIM, name, id) {
            Ok(1) => {
                guard(&c.svcs.local).insert(name.to_owned(), id.to_owned());
                c.publish(&Ctl::Provide {
                    id: id.to_owned(),
                    service: name.to_owned(),
                });
                Ok(())
            }
            Ok(_) => Err((
                ErrorCode::ServiceTaken,
                format!("service {name:?} is provided on another node"),
            )),
            Err(e) => {
                tracing::warn!(%e, name, "redis unreachable: service refused");
                Err((
                    ErrorCode::ServiceTaken,
                    format!("cannot check that {name:?} is free (redis unreachable)"),
                ))
            }
        }
    }

    /// Hook: a local peer no longer provides `name` (no-op for names it did not claim here).
    pub(super) fn cluster_release_service(&self, name: &str, id: &str) {
        let Some(c) = self.cluster() else {
            return;
        };
        let mine = {
            let mut local = guard(&c.svcs.local);
            let mine = local.get(name).is_some_and(|p| p == id);
            if mine {
                local.remove(name);
            }
            mine
        };
        if mine {
            let _ =
                c.tx.send(Out::Eval(vec![(RELEASE, c.svcs.key(name), id.to_owned())]));
            c.publish(&Ctl::Unprovide {
                id: id.to_owned(),
                service: name.to_owned(),
            });
        }
    }

    /// Hook: a local peer subscribed to (or unsubscribed from) a topic.
    pub(super) fn cluster_topic(&self, id: &str, topic: &str, on: bool) {
        if let Some(c) = self.cluster() {
            let (id, topic) = (id.to_owned(), topic.to_owned());
            c.publish(&if on {
                Ctl::Sub { id, topic }
            } else {
                Ctl::Unsub { id, topic }
            });
        }
    }

    /// Hook: our provider answered a call relayed by `node` for its peer `caller`.
    pub(super) fn cluster_call_result(
        &self,
        node: &str,
        caller: &str,
        cid: u64,
        outcome: &CallOutcome,
    ) {
        if let Some(c) = self.cluster() {
            let data = serde_json::json!({ "cid": cid, "outcome": outcome });
            c.send_event(node, caller, RELAYED_RESULT, &data);
        }
    }

    /// Hook: a local peer registered (or resumed).
    pub(super) fn cluster_up(&self, st: &State, id: &str) {
        if let Some(c) = self.cluster()
            && let Some(conn) = st.conns.get(id)
            && let Some(info) = &conn.info
        {
            let mut rooms: Vec<String> = conn.rooms.iter().cloned().collect();
            rooms.sort();
            c.publish(&Ctl::Up {
                peer: info.clone(),
                rooms,
                token: st.issued.get(id).map(|(t, _)| t.clone()),
            });
        }
    }

    /// Hook: a local peer joined a room.
    pub(super) fn cluster_join(&self, id: &str, room: &str) {
        if let Some(c) = self.cluster() {
            c.publish(&Ctl::Join {
                id: id.to_owned(),
                room: room.to_owned(),
            });
        }
    }

    /// Hook: a local peer left a room.
    pub(super) fn cluster_leave(&self, id: &str, room: &str) {
        if let Some(c) = self.cluster() {
            c.publish(&Ctl::Leave {
                id: id.to_owned(),
                room: room.to_owned(),
            });
        }
    }

    /// Hook: a local peer `a` paired with `b`.
    pub(super) fn cluster_pair(&self, a: &str, b: &str) {
        if let Some(c) = self.cluster() {
            c.publish(&Ctl::Pair {
                a: a.to_owned(),
                b: b.to_owned(),
            });
        }
    }

    /// Hook: a peer was removed from the state. Local peers are announced; remote ones only
    /// leave the mirror.
    pub(super) fn cluster_down(&self, st: &mut State, id: &str) {
        if let Some(c) = self.cluster()
            && st.remote.remove(id).is_none()
        {
            c.publish(&Ctl::Down { id: id.to_owned() });
        }
    }

    /// Hook, before a `hello` decides on its resume: a peer of another node that resumes
    /// here with its token becomes an away peer of ours, so that the ordinary resume takes it
    /// (same id, rooms, pairs and uid; the other node hears of it from our `Up`).
    pub(super) fn cluster_take_over(&self, st: &mut State, resume: Option<&Resume>) {
        let Some(r) = resume else { return };
        if !st.remote.contains_key(&r.id) || st.issued.get(&r.id).is_none_or(|(t, _)| *t != r.token)
        {
            return;
        }
        st.next_token += 1;
        let n = st.next_token;
        let Some(conn) = st.conns.get_mut(&r.id) else {
            return;
        };
        conn.away = Some(n);
        st.remote.remove(&r.id);
        tracing::debug!(id = %r.id, "peer of another node resumes here");
        // Should the resume fail after all, the peer is gone once the grace period ends.
        let this = self.clone();
        let id = r.id.clone();
        let grace = self.inner.opts.resume_grace;
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

    /// Our peer `id` resumed on `node`: it becomes a peer of that node, silently.
    fn moved_away(&self, link: &Arc<Cluster>, st: &mut State, id: &str, node: &str) {
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
            guard(&link.uids.local).remove(uid);
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
    fn apply_up(
        &self,
        link: &Arc<Cluster>,
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
                        away: None,
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

    fn apply_ctl(&self, link: &Arc<Cluster>, node: &str, ctl: Ctl) {
        tracing::trace!(?ctl, %node, "cluster message");
        let ctl_kind = match ctl {
            Ctl::Unprovide { .. } | Ctl::Unsub { .. } => CtlKind::Off,
            _ => CtlKind::On,
        };
        match ctl {
            Ctl::Heartbeat => {}
            Ctl::SyncRequest => {
                let peers = {
                    let st = self.lock();
                    st.conns
                        .iter()
                        .filter(|(id, _)| !st.remote.contains_key(*id))
                        .filter_map(|(_, c)| {
                            let mut rooms: Vec<String> = c.rooms.iter().cloned().collect();
                            rooms.sort();
                            let peer = c.info.clone()?;
                            let (services, topics) = P2pSignaling::peer_services(&st, &peer.id);
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
            Ctl::Sync { peers } => {
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

    /// The socket of `to` if it is a peer of this node.
    fn local_socket(&self, to: &str) -> Option<Arc<dyn PeerSocket>> {
        let st = self.lock();
        if st.remote.contains_key(to) {
            None
        } else {
            st.socket(to)
        }
    }

    /// A batch of frames from a peer of `node` for our peer `to` (`from` already stamped).
    fn deliver_frame(&self, link: &Cluster, node: &str, to: &str, data: &[u8]) {
        let data = Bytes::copy_from_slice(data);
        let Ok(frames) = split_batch(&data) else {
            return;
        };
        let target = self.local_socket(to);
        let failed = match target {
            None => Some((ErrorCode::UnknownPeer, "the target is gone")),
            Some(t) => match t.emit_frames(data.clone(), frames.len()) {
                Ok(()) => None,
                Err(EmitFail::Full) => {
                    Some((ErrorCode::Busy, "the target's buffer is full; resend later"))
                }
                Err(EmitFail::Closed) => Some((ErrorCode::UnknownPeer, "the target is gone")),
            },
        };
        let Some((code, message)) = failed else {
            return;
        };
        // Tell the sender, as its own node would have (one error for the batch, with the
        // seq of its first Data frame: the sender's link goes back to it).
        let decoded: Vec<Frame> = frames
            .iter()
            .filter_map(|f| Frame::decode(f).ok())
            .collect();
        let Some(frame) = decoded.first() else {
            return;
        };
        let seq = decoded.iter().find_map(|f| match f.body {
            Body::Data { seq, .. } => Some(seq),
            _ => None,
        });
        let msg = ErrorMsg {
            error: ErrorBody {
                code,
                message: message.to_owned(),
            },
            event: Some(events::FRAME.to_owned()),
            to: Some(to.to_owned()),
            seq,
        };
        link.send_event(node, &frame.from, events::ERROR, &to_json(&msg));
    }

    /// A signal or an error from another node for our peer `to`.
    fn deliver_event(&self, node: &str, to: &str, rest: &[u8]) {
        let Ok((event, data)) = serde_json::from_slice::<(String, Json)>(rest) else {
            return;
        };
        let event = match event.as_str() {
            events::SIGNAL => events::SIGNAL,
            events::ERROR => events::ERROR,
            events::TOPIC => events::TOPIC,
            events::CALL => return self.relayed_call(node, to, data),
            RELAYED_RESULT => return self.relayed_result(node, data),
            _ => return,
        };
        let target = self.local_socket(to);
        if let Some(t) = target
            && let Err(e) = t.emit_json(event, &data)
        {
            tracing::debug!(?e, event, "could not deliver a message from another node");
        }
    }

    /// `node` stopped talking: its peers are gone, its uids are freed.
    fn node_dead(&self, link: &Cluster, node: &str) {
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
}

async fn in_time<T>(
    wait: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(wait, f).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "redis did not answer in time",
        )))
    })
}

async fn subscribe(
    client: &redis::Client,
    channels: &[String],
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    for ch in channels {
        pubsub.subscribe(ch).await?;
    }
    Ok(pubsub)
}

/// Drains the queue in order, in pipelines of up to 256 commands.
async fn publisher(
    mut con: redis::aio::ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued_frames: Arc<AtomicUsize>,
    ttl_ms: u64,
) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut pipe = redis::pipe();
        let mut frames = 0;
        for out in batch.drain(..) {
            match out {
                Out::Publish {
                    channel,
                    payload,
                    frames: n,
                } => {
                    frames += n;
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Out::Eval(list) => {
                    for (script, key, peer) in list {
                        pipe.cmd("EVAL")
                            .arg(script)
                            .arg(1)
                            .arg(key)
                            .arg(peer)
                            .arg(ttl_ms)
                            .ignore();
                    }
                }
            }
        }
        if let Err(e) = pipe.query_async::<()>(&mut con).await {
            tracing::warn!(%e, "cluster publish failed; messages lost");
        }
        queued_frames.fetch_sub(frames, Ordering::AcqRel);
    }
}

/// Reads the node's channels, sends heartbeats, notices dead nodes.
struct Inbound {
    sig: Weak<Inner>,
    link: Arc<Cluster>,
    client: redis::Client,
    channels: [String; 2],
    heartbeat: Duration,
    timeout: Duration,
    last_seen: HashMap<String, Instant>,
}

impl Inbound {
    async fn run(mut self, first: redis::aio::PubSub) {
        let mut pubsub = Some(first);
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(ps) = pubsub.take() else {
                // Lost the subscription: resubscribe, then ask everyone for a full picture.
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick() { return },
                    r = subscribe(&self.client, &self.channels) => match r {
                        Ok(ps) => {
                            pubsub = Some(ps);
                            self.link.publish(&Ctl::SyncRequest);
                        }
                        Err(e) => {
                            tracing::warn!(%e, "cluster resubscribe failed");
                            tokio::time::sleep(self.heartbeat).await;
                        }
                    },
                }
                continue;
            };
            let mut stream = ps.into_on_message();
            loop {
                tokio::select! {
                    _ = tick.tick() => if !self.on_tick() { return },
                    msg = stream.next() => match msg {
                        Some(msg) => if !self.on_message(msg.get_payload_bytes()) { return },
                        None => {
                            tracing::warn!("cluster subscription lost");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Heartbeat, uid refresh, dead nodes. False once the server is gone.
    fn on_tick(&mut self) -> bool {
        let Some(inner) = self.sig.upgrade() else {
            return false;
        };
        let sig = P2pSignaling { inner };
        self.link.publish(&Ctl::Heartbeat);
        let refresh: Vec<_> = self
            .link
            .uids
            .local_uids()
            .into_iter()
            .chain(self.link.svcs.local_uids())
            .map(|(k, p)| (REFRESH, k, p))
            .collect();
        if !refresh.is_empty() {
            let _ = self.link.tx.send(Out::Eval(refresh));
        }
        let now = Instant::now();
        let dead: Vec<String> = self
            .last_seen
            .iter()
            .filter(|(_, t)| now.duration_since(**t) > self.timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for node in dead {
            self.last_seen.remove(&node);
            sig.node_dead(&self.link, &node);
        }
        true
    }

    fn on_message(&mut self, msg: &[u8]) -> bool {
        let Some(inner) = self.sig.upgrade() else {
            return false;
        };
        let sig = P2pSignaling { inner };
        let Some((kind, node, to, rest)) = decode(msg) else {
            tracing::debug!("undecodable cluster message");
            return true;
        };
        if node == self.link.node {
            return true;
        }
        if self
            .last_seen
            .insert(node.to_owned(), Instant::now())
            .is_none()
        {
            tracing::info!(%node, "cluster node seen");
            self.link
                .send_ctl(self.link.node_channel(node), &Ctl::SyncRequest);
        }
        match kind {
            K_CTL => match serde_json::from_slice::<Ctl>(rest) {
                Ok(ctl) => sig.apply_ctl(&self.link, node, ctl),
                Err(e) => tracing::debug!(%e, "bad cluster message"),
            },
            K_FRAME => sig.deliver_frame(&self.link, node, to, rest),
            K_EVENT => sig.deliver_event(node, to, rest),
            _ => tracing::debug!(kind, "unknown cluster message"),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let v = encode(K_FRAME, "node1", "peer", b"\x00rest");
        assert_eq!(
            decode(&v),
            Some((K_FRAME, "node1", "peer", &b"\x00rest"[..]))
        );
        assert_eq!(decode(&v[..4]), None);
        assert_eq!(decode(b""), None);
    }
}

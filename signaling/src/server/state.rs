//! Server-side state: registered peers, rooms, pairs, and the uid registry.
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::book::Services;
use crate::protocol::PeerInfo;

/// Why an emit to a socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EmitFail {
    /// The socket's outgoing buffer is full.
    Full,
    /// The socket is gone.
    Closed,
}

/// What the state needs from a connected socket: lets the state stay independent of the
/// socketioxide adapter type.
pub(crate) trait PeerSocket: Send + Sync {
    /// Sends a batch of `frames` frames (see `protocol::BatchWriter`) on `p2p:f`, in the
    /// encoding the client asked for.
    fn emit_frames(&self, batch: Bytes, frames: usize) -> Result<(), EmitFail>;
    fn emit_json(&self, event: &'static str, data: &serde_json::Value) -> Result<(), EmitFail>;
    /// Sends an event whose one argument is already serialized (a big `Welcome`: written
    /// once as text rather than built as a JSON tree).
    fn emit_raw(
        &self,
        event: &'static str,
        data: &serde_json::value::RawValue,
    ) -> Result<(), EmitFail> {
        match serde_json::from_str(data.get()) {
            Ok(v) => self.emit_json(event, &v),
            Err(_) => Ok(()),
        }
    }
    /// The client's `hello` said how it wants batches (local sockets only).
    fn set_encoding(&self, _encoding: crate::protocol::FrameEncoding) {}
    /// Sends one presence on `p2p:presence`. A local socket whose client asked for presence
    /// batches queues it and sends the queue a moment later as one event (or sooner, before
    /// anything else it sends to that client, so that nothing overtakes it).
    /// `data` is one presence object, serialized.
    fn emit_presence(&self, data: Arc<str>) -> Result<(), EmitFail> {
        match serde_json::from_str(&data) {
            Ok(v) => self.emit_json(crate::protocol::events::PRESENCE, &v),
            Err(_) => Ok(()),
        }
    }
    /// Sends one publication of `topic` on `p2p:topic`. A local socket that could not take
    /// some (its buffer was full) counts them and tells the client in the next one's
    /// `missed`.
    fn emit_publication(&self, _topic: &str, data: &serde_json::Value) -> Result<(), EmitFail> {
        self.emit_json(crate::protocol::events::TOPIC, data)
    }
    /// The client's `hello` asked for presence batches (local sockets only).
    fn set_batch_presence(&self, _on: bool) {}
    /// The queue of an away peer (see `away.rs`).
    fn away(&self) -> Option<&super::away::AwaySocket> {
        None
    }
    /// Queues `msg` on this socket, in the order of the calls (made under the state lock),
    /// for [`PeerSocket::send_queued`] after the lock; gives it back if this socket does
    /// not queue (then the outbox sends it itself).
    fn enqueue(&self, msg: super::outbox::Outgoing) -> Result<(), super::outbox::Outgoing> {
        Err(msg)
    }
    /// Sends what [`PeerSocket::enqueue`] queued (presences alone may wait for company).
    fn send_queued(&self) {}
    /// Closes the connection (a flooding client): local sockets only.
    fn disconnect(&self) {}
    /// A handle on this socket that can be kept for later (local sockets only).
    fn detached(&self) -> Option<Arc<dyn PeerSocket>> {
        None
    }
}

/// Token bucket used to limit control requests per socket.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Adds what `rate` per second gave since the last time, up to `burst`.
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
    }
    pub(crate) fn new(burst: u32) -> Self {
        Self::holding(f64::from(burst), Instant::now())
    }
    /// A bucket that holds `tokens` at `now`.
    fn holding(tokens: f64, last: Instant) -> Self {
        Self { tokens, last }
    }
    pub(crate) fn take(&mut self, rate: u32, burst: u32) -> bool {
        self.take_n(1.0, f64::from(rate), f64::from(burst))
    }
    /// Takes `n` tokens at once (refilled at `rate` per second up to `burst`).
    pub(crate) fn take_n(&mut self, n: f64, rate: f64, burst: f64) -> bool {
        self.refill(Instant::now(), rate, burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// What one socket may relay (from `SignalingOptions`): frames and bytes per second with
/// their bursts, and how many refused batches within a second make it a flooder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) frames: (f64, f64),
    pub(crate) bytes: (f64, f64),
    pub(crate) max_strikes: u32,
}

/// What a batch's budget check decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Spent {
    Ok,
    /// Over budget: refused.
    Refused,
    /// Over budget again and again: the socket floods.
    Flooding,
}

/// A socket's budget for what it relays.
///
/// - A new connection starts with a fiftieth of a second's rate, not a whole burst: a
///   flooder that is disconnected and comes straight back has no fresh burst to spend.
/// - A refused batch costs what it would have if accepted, down to a tenth of a second's
///   rate of debt: a socket that keeps sending over its budget gets nothing through until
///   it sends below it (before, it got its full rate through, however much it sent).
/// - Refused batches are counted per second, not in a row: batches accepted in between do
///   not wipe the count, so a socket at twice its budget is disconnected too.
pub(crate) struct Budget {
    frames: TokenBucket,
    bytes: TokenBucket,
    /// Batches refused since `window` began.
    strikes: u32,
    window: Instant,
}

impl Budget {
    pub(crate) fn new(limits: &Limits) -> Self {
        let start = |(rate, burst): (f64, f64)| (rate / 50.0).min(burst).max(1.0);
        let now = Instant::now();
        Budget {
            frames: TokenBucket::holding(start(limits.frames), now),
            bytes: TokenBucket::holding(start(limits.bytes), now),
            strikes: 0,
            window: now,
        }
    }

    /// Takes a batch of `frames` frames and `bytes` bytes at `now`.
    pub(crate) fn spend(&mut self, frames: f64, bytes: f64, now: Instant, l: &Limits) -> Spent {
        let ((fr, fb), (br, bb)) = (l.frames, l.bytes);
        // A batch larger than a whole burst could never pass: it counts as one burst.
        let (nf, nb) = (frames.min(fb), bytes.min(bb));
        self.frames.refill(now, fr, fb);
        self.bytes.refill(now, br, bb);
        if self.frames.tokens >= nf && self.bytes.tokens >= nb {
            self.frames.tokens -= nf;
            self.bytes.tokens -= nb;
            return Spent::Ok;
        }
        self.frames.tokens = (self.frames.tokens - nf).max(-fr / 10.0);
        self.bytes.tokens = (self.bytes.tokens - nb).max(-br / 10.0);
        if now.duration_since(self.window).as_secs_f64() >= 1.0 {
            self.window = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes >= l.max_strikes {
            Spent::Flooding
        } else {
            Spent::Refused
        }
    }
}

/// A connected socket, registered or not.
pub(crate) struct Conn {
    pub(crate) socket: Arc<dyn PeerSocket>,
    /// Set once `hello` succeeded.
    pub(crate) info: Option<PeerInfo>,
    pub(crate) rooms: HashSet<String>,
    pub(crate) pairs: HashSet<String>,
    pub(crate) bucket: TokenBucket,
    /// What it may relay (frames and bytes per second).
    pub(crate) budget: Budget,
    /// The connection broke (not a deliberate disconnect): the peer keeps its id, rooms,
    /// pairs and uid for a grace period, to resume. The number tells one absence from the next.
    pub(crate) away: Option<u64>,
    /// The `auth` payload the connection was accepted with (`null` if none).
    pub(crate) auth: serde_json::Value,
}

/// A request or a batch of frames that waits for an earlier request of its socket.
pub(crate) enum Queued {
    /// A `p2p:req`.
    Request {
        /// The request, or why it could not be read.
        raw: Result<serde_json::Value, String>,
        /// It came in beyond the socket's request rate.
        limited: bool,
    },
    /// A `p2p:f` batch, and the socket to tell about refused frames.
    Frames {
        me: Arc<dyn PeerSocket>,
        data: Bytes,
    },
}

/// A pairing request waiting for its peer to register.
pub(crate) struct PendingPair {
    pub(crate) requester: String,
    pub(crate) rid: u64,
    pub(crate) token: u64,
}

/// Everything the server knows, behind one mutex (critical sections are short and never await).
#[derive(Default)]
pub(crate) struct State {
    pub(crate) conns: HashMap<String, Conn>,
    /// Room -> its members, sorted by id (a member list is written in order, never sorted).
    pub(crate) rooms: HashMap<String, BTreeSet<String>>,
    /// uid awaited -> requests waiting for it.
    pub(crate) pending_pairs: HashMap<String, Vec<PendingPair>>,
    pub(crate) next_token: u64,
    /// Socket id -> peer id, for peers that resumed an earlier id.
    pub(crate) peer_of: HashMap<String, String>,
    /// Peer ids this server handed out, with their resume token and when.
    pub(crate) issued: HashMap<String, (String, Instant)>,
    /// When `issued` was last pruned.
    pub(crate) issued_pruned: Option<Instant>,
    /// Services and topics.
    pub(crate) services: Services,
    /// Peers of other nodes (peer id -> node), mirrored from the cluster (always empty on a
    /// single node).
    pub(crate) remote: HashMap<String, String>,
    /// Socket id -> requests and frames that arrived while an earlier request of that
    /// socket waits for the cluster (see `requests`); they run in order once it is done.
    pub(crate) waiting: HashMap<String, VecDeque<Queued>>,
}

impl State {
    /// The peer id of a socket (its own id unless it resumed another one).
    pub(crate) fn peer_id(&self, sid: &str) -> String {
        self.peer_of
            .get(sid)
            .cloned()
            .unwrap_or_else(|| sid.to_owned())
    }

    /// True when `a` and `b` share a room or a pair.
    pub(crate) fn share_scope(&self, a: &str, b: &str) -> bool {
        let (Some(ca), Some(cb)) = (self.conns.get(a), self.conns.get(b)) else {
            return false;
        };
        if ca.info.is_none() || cb.info.is_none() {
            return false;
        }
        if ca.pairs.contains(b) {
            return true;
        }
        let (small, big) = if ca.rooms.len() <= cb.rooms.len() {
            (&ca.rooms, &cb.rooms)
        } else {
            (&cb.rooms, &ca.rooms)
        };
        small.iter().any(|r| big.contains(r))
    }

    /// Other registered peers of `room`, without `except`, sorted by id.
    pub(crate) fn room_peers(&self, room: &str, except: &str) -> Vec<PeerInfo> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter(|id| id.as_str() != except)
            .filter_map(|id| self.conns.get(id).and_then(|c| c.info.clone()))
            .collect()
    }

    /// One page of [`State::room_peers`]: at most `limit` members whose id sorts after
    /// `after` (all when `None`), and whether more follow the last one.
    pub(crate) fn room_page(
        &self,
        room: &str,
        except: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<&PeerInfo>, bool) {
        use std::ops::Bound;
        let Some(members) = self.rooms.get(room) else {
            return (Vec::new(), false);
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::with_capacity(limit.min(members.len()));
        for id in members.range::<str, _>((from, Bound::Unbounded)) {
            if id.as_str() == except {
                continue;
            }
            let Some(info) = self.conns.get(id).and_then(|c| c.info.as_ref()) else {
                continue;
            };
            if page.len() == limit {
                return (page, true);
            }
            page.push(info);
        }
        (page, false)
    }

    /// The first `limit` members of [`State::room_peers`], written as a JSON array onto
    /// `out` (no copies of the members, no JSON tree); true when more follow.
    pub(crate) fn write_room_peers(
        &self,
        room: &str,
        except: &str,
        limit: usize,
        out: &mut String,
    ) -> bool {
        let (page, more) = self.room_page(room, except, None, limit);
        out.push('[');
        for (i, info) in page.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_peer(info, out);
        }
        out.push(']');
        more
    }

    /// Sockets of the other registered peers of `room`, without `except`.
    pub(crate) fn room_members(&self, room: &str, except: &str) -> Vec<Arc<dyn PeerSocket>> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter(|id| id.as_str() != except)
            .filter_map(|id| self.conns.get(id))
            .filter(|c| c.info.is_some())
            .map(|c| c.socket.clone())
            .collect()
    }

    /// Every peer sharing a scope with `id` (each once).
    pub(crate) fn neighbours(&self, id: &str) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Some(c) = self.conns.get(id) {
            for room in &c.rooms {
                if let Some(members) = self.rooms.get(room) {
                    out.extend(members.iter().filter(|m| m.as_str() != id).cloned());
                }
            }
            out.extend(c.pairs.iter().cloned());
        }
        out
    }

    /// Gives memory back once the maps are mostly empty (after a crowd left): a map keeps
    /// its biggest size otherwise. Amortized: a map shrinks only to twice its length, once
    /// it is below a quarter of its capacity.
    pub(crate) fn shrink(&mut self) {
        fn shrink<K: Eq + std::hash::Hash, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 64 && m.len() * 4 < m.capacity() {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink(&mut self.conns);
        shrink(&mut self.rooms);
        shrink(&mut self.peer_of);
        shrink(&mut self.issued);
        shrink(&mut self.remote);
        shrink(&mut self.waiting);
        shrink(&mut self.pending_pairs);
    }

    pub(crate) fn socket(&self, id: &str) -> Option<Arc<dyn PeerSocket>> {
        self.conns.get(id).map(|c| c.socket.clone())
    }
}

/// Writes `info` as JSON (as `PeerInfo` serializes: `uid` omitted when none).
pub(crate) fn write_peer(info: &PeerInfo, out: &mut String) {
    out.push_str("{\"id\":");
    write_str(&info.id, out);
    if let Some(uid) = &info.uid {
        out.push_str(",\"uid\":");
        write_str(uid, out);
    }
    out.push('}');
}

/// Writes `s` as a JSON string.
pub(crate) fn write_str(s: &str, out: &mut String) {
    // Ids are plain; anything that needs escaping goes through serde_json.
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod budget_tests {
    use std::time::{Duration, Instant};

    use super::{Budget, Limits, Spent};

    const L: Limits = Limits {
        frames: (10_000.0, 20_000.0),
        bytes: (1e9, 2e9),
        max_strikes: 20,
    };

    /// Batches of `n` frames every `every` for `secs`: (accepted frames, refusals, when it
    /// was found flooding).
    fn run(
        b: &mut Budget,
        t0: Instant,
        n: f64,
        every: Duration,
        secs: f64,
    ) -> (f64, u32, Option<f64>) {
        let (mut ok, mut refused) = (0.0, 0);
        let mut t = t0;
        while t.duration_since(t0).as_secs_f64() < secs {
            match b.spend(n, n * 10.0, t, &L) {
                Spent::Ok => ok += n,
                Spent::Refused => refused += 1,
                Spent::Flooding => return (ok, refused, Some(t.duration_since(t0).as_secs_f64())),
            }
            t += every;
        }
        (ok, refused, None)
    }

    #[test]
    fn a_sender_within_its_budget_is_never_refused() {
        let mut b = Budget::new(&L);
        let t0 = Instant::now();
        // 9,000 frames/s in batches of 90, for 10 s.
        let (ok, refused, flood) = run(&mut b, t0, 90.0, Duration::from_millis(10), 10.0);
        assert_eq!((refused, flood), (0, None));
        assert!(ok > 89_000.0, "{ok}");
    }

    #[test]
    fn a_sender_at_twice_its_budget_gets_almost_nothing_through_and_is_disconnected() {
        let mut b = Budget::new(&L);
        let t0 = Instant::now();
        // 20,000 frames/s in batches of 100.
        let (ok, _, flood) = run(&mut b, t0, 100.0, Duration::from_millis(5), 10.0);
        let at = flood.expect("never found flooding");
        assert!(at < 1.0, "found flooding after {at} s");
        // Its start (a fiftieth of a second's rate) and little more.
        assert!(ok <= 400.0, "{ok} frames through");
    }

    #[test]
    fn a_new_connection_has_no_burst_to_spend() {
        let mut b = Budget::new(&L);
        let t = Instant::now();
        assert_eq!(b.spend(200.0, 1.0, t, &L), Spent::Ok);
        assert_eq!(b.spend(1.0, 1.0, t, &L), Spent::Refused);
    }

    #[test]
    fn a_sender_that_slows_down_gets_through_again() {
        let mut b = Budget::new(&L);
        let t0 = Instant::now();
        let (_, refused, flood) = run(&mut b, t0, 100.0, Duration::from_millis(5), 0.05);
        assert!(refused > 0 && flood.is_none());
        // At most a tenth of a second of debt: after 0.2 s of quiet, a batch passes.
        let t = t0 + Duration::from_millis(250);
        assert_eq!(b.spend(100.0, 1.0, t, &L), Spent::Ok);
        // And then its whole rate, for good.
        let (ok, refused, _) = run(&mut b, t, 50.0, Duration::from_millis(5), 5.0);
        assert_eq!(refused, 0);
        assert!(ok >= 49_000.0, "{ok}");
    }

    #[test]
    fn refusals_are_counted_per_second_not_in_a_row() {
        let mut b = Budget::new(&L);
        let t0 = Instant::now();
        // 19 refusals a second, forever: never flooding.
        let mut t = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            for i in 0..19 {
                assert_ne!(
                    b.spend(1e6, 1.0, t + Duration::from_millis(i), &L),
                    Spent::Flooding
                );
            }
            t += Duration::from_secs(2);
        }
    }
}

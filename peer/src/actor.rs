//! The actor: one task per `P2p` that owns the Socket.IO client, every peer connection and
//! every per-peer reliable link, and decides which transport carries each frame.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rust_socketio::Payload as SioPayload;
use rust_socketio::asynchronous::Client;
use serde_json::Value as Json;
use socketio_p2p_signaling::protocol::{
    BatchWriter, Body, CallFor, ErrorCode, ErrorMsg, Frame, FrameEncoding, Msg, Op,
    PROTOCOL_VERSION, PeerInfo, Presence, Publication, Request, Response, Resume, Signal,
    SignalFrom, Welcome, WirePayload, batch_from_base64, batch_to_base64, events, split_batch,
};
use tokio::sync::{mpsc, oneshot};

use crate::credit::Credits;
use crate::error::{Error, Result};
use crate::link::{Delivered, Link};
use crate::negotiate::{Action, Negotiation};
use crate::options::P2pOptions;
use crate::payload::{Event, Payload, PeerEvent, Responder, Transport};
use crate::rtc::{CandidateInit, RtcConfig, RtcEvent, RtcLink};
use crate::services::ServiceTable;
use crate::stream::{IncomingStream, StreamCmd, StreamTable};

const TICK: Duration = Duration::from_millis(5);
/// On close, how long the actor keeps going to deliver what is already queued.
const LINGER: Duration = Duration::from_secs(2);
/// Inputs of one kind handled in one turn of the loop (what one flush then batches).
const DRAIN: usize = 255;
/// Relay frames are sent in batches of about this many bytes (one frame may be larger).
const RELAY_BATCH: usize = 64 * 1024;

/// Commands from `P2p` handles.
pub(crate) enum Cmd {
    /// A reliable event; the handle already took `frames` of credit on each target.
    Emit {
        targets: Vec<String>,
        event: String,
        payload: WirePayload,
        frames: usize,
    },
    /// A best-effort event, to one peer or to all.
    Volatile {
        target: Option<String>,
        event: String,
        payload: WirePayload,
    },
    /// An event that waits for a reply (credit taken like `Emit`).
    EmitAck {
        peer: String,
        event: String,
        payload: WirePayload,
        frames: usize,
        timeout: Duration,
        reply: oneshot::Sender<Result<Payload>>,
    },
    Reply {
        peer: String,
        ack_id: u64,
        result: std::result::Result<Payload, (String, String)>,
    },
    Request {
        op: Op,
        reply: oneshot::Sender<Result<Json>>,
    },
    Upgrade {
        peer: Option<String>,
        done: Option<oneshot::Sender<Result<()>>>,
    },
    Downgrade {
        peer: String,
    },
    /// Test hook: the data channel dies without a word to the peer.
    Kill {
        peer: String,
    },
    Transport {
        peer: String,
        reply: oneshot::Sender<Result<Transport>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    LiveConnections {
        reply: oneshot::Sender<usize>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
    Provide {
        name: String,
        service: Arc<socketio_p2p_signaling::Service>,
        reply: oneshot::Sender<Result<Json>>,
    },
    Unprovide {
        name: String,
        reply: oneshot::Sender<Result<Json>>,
    },
    /// A service call: a request whose deadline is the caller's timeout.
    Call {
        op: Op,
        timeout: Duration,
        reply: oneshot::Sender<Result<Json>>,
    },
    /// A call of one of our services finished: send the outcome to the server.
    CallDone {
        cid: u64,
        outcome: socketio_p2p_signaling::protocol::CallOutcome,
    },
    Subscribe {
        topic: String,
        tx: mpsc::UnboundedSender<socketio_p2p_signaling::protocol::Publication>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Unsubscribe {
        topic: String,
        id: u64,
    },
}

/// What the Socket.IO callbacks hand to the actor.
#[derive(Debug)]
pub(crate) enum NetIn {
    Connected,
    /// A `p2p:f` batch (decoded from base64).
    Batch(Bytes),
    Response(Json),
    Signal(Json),
    Presence(Json),
    Error(Json),
    Call(Json),
    Topic(Json),
    SocketError(String),
    Closed,
}

impl NetIn {
    pub(crate) fn from_event(event: &str, payload: SioPayload) -> Option<NetIn> {
        let first_json = |p: SioPayload| match p {
            SioPayload::Text(mut v) if !v.is_empty() => Some(v.swap_remove(0)),
            _ => None,
        };
        Some(match event {
            events::FRAME => match payload {
                SioPayload::Binary(b) => NetIn::Batch(b),
                SioPayload::Text(v) => {
                    match v.first().and_then(Json::as_str).map(batch_from_base64) {
                        Some(Ok(b)) => NetIn::Batch(b),
                        _ => {
                            tracing::warn!("undecodable p2p:f batch from the server");
                            return None;
                        }
                    }
                }
                #[allow(deprecated)]
                SioPayload::String(_) => return None,
            },
            events::RESPONSE => NetIn::Response(first_json(payload)?),
            events::SIGNAL => NetIn::Signal(first_json(payload)?),
            events::PRESENCE => NetIn::Presence(first_json(payload)?),
            events::ERROR => NetIn::Error(first_json(payload)?),
            events::CALL => NetIn::Call(first_json(payload)?),
            events::TOPIC => NetIn::Topic(first_json(payload)?),
            _ => return None,
        })
    }
}

struct RtcSlot {
    link: Arc<RtcLink>,
    key: u64,
    open: bool,
    /// Frames for the link's writer task: the actor never waits on a data channel send
    /// (a send blocks while SCTP's queue is full, forever once the peer is gone).
    writer: mpsc::UnboundedSender<(bool, Bytes)>,
    /// Dropping it stops the writer task, even in the middle of a blocked send.
    _stop: oneshot::Sender<()>,
}

impl RtcSlot {
    /// Queues a frame on the reliable channel (`true`) or the volatile one.
    fn send(&self, reliable: bool, frame: Bytes) {
        let _ = self.writer.send((reliable, frame));
    }
}

/// The writer task of one peer connection: sends frames in order; a failed reliable send
/// is reported as the connection closing (the actor then moves the traffic to the relay).
fn spawn_writer(
    link: Arc<RtcLink>,
    key: u64,
    events: mpsc::UnboundedSender<(u64, RtcEvent)>,
) -> (mpsc::UnboundedSender<(bool, Bytes)>, oneshot::Sender<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, Bytes)>();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (reliable, frame) = tokio::select! {
                biased;
                _ = &mut stop_rx => break,
                next = rx.recv() => match next {
                    Some(x) => x,
                    None => break,
                },
            };
            let sent = tokio::select! {
                biased;
                _ = &mut stop_rx => break,
                r = async {
                    if reliable {
                        link.send(frame).await
                    } else {
                        link.send_volatile(frame).await
                    }
                } => r,
            };
            if let Err(e) = sent
                && reliable
            {
                let _ = events.send((key, RtcEvent::Closed(format!("send failed: {e}"))));
                break;
            }
        }
    });
    (tx, stop_tx)
}

struct Peer {
    info: PeerInfo,
    rooms: HashSet<String>,
    paired: bool,
    link: Link,
    neg: Negotiation,
    rtc: Option<RtcSlot>,
    upgrade_waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Last time anything arrived on the data channel (liveness).
    dc_seen: Instant,
    /// Last time we pinged over the data channel.
    dc_pinged: Instant,
    /// When to try the upgrade again (auto_upgrade after a failure or a dead channel).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Received messages waiting for room in the application's queue (`None`: nothing to
    /// hand over, only the sequence number to acknowledge in order).
    held: std::collections::VecDeque<(u64, Option<Event>)>,
    /// After a reconnection: forget this peer unless the server lists it again by then.
    confirm_by: Option<Instant>,
}

impl Peer {
    fn schedule_retry(&mut self, now: Instant, max: Duration) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(max);
    }

    fn transport(&self) -> Transport {
        match &self.rtc {
            Some(s) if s.open => Transport::DataChannel,
            _ => Transport::Relay,
        }
    }
}

enum ReqKind {
    Hello,
    Pair,
    Signal,
    /// Nobody waits for the answer (logged when it is an error).
    Quiet,
    Provide(
        String,
        Arc<socketio_p2p_signaling::Service>,
        oneshot::Sender<Result<Json>>,
    ),
    Subscribe(String, u64, oneshot::Sender<Result<u64>>),
    Join(String, oneshot::Sender<Result<Json>>),
    Leave(String, oneshot::Sender<Result<Json>>),
    User(oneshot::Sender<Result<Json>>),
}

struct PendingReq {
    kind: ReqKind,
    deadline: Instant,
}

struct PendingAck {
    peer: String,
    deadline: Instant,
    tx: oneshot::Sender<Result<Payload>>,
}

/// Startup progress, reported to `P2p::new`.
pub(crate) type Ready = oneshot::Sender<Result<PeerInfo>>;

pub(crate) struct Actor {
    opts: P2pOptions,
    rtc_cfg: RtcConfig,
    client: Client,
    me: PeerInfo,
    registered: bool,
    /// The Socket.IO connection is up (false while rust_socketio reconnects).
    connected: bool,
    /// Resume token from the last welcome.
    token: String,
    /// When the server connection broke (None while registered on a live connection).
    disconnected_since: Option<Instant>,
    /// Rooms we are in (sent again after a reconnection).
    my_rooms: HashSet<String>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    replies_tx: mpsc::UnboundedSender<Cmd>,
    replies: mpsc::UnboundedReceiver<Cmd>,
    net: mpsc::UnboundedReceiver<NetIn>,
    rtc_tx: mpsc::UnboundedSender<(u64, RtcEvent)>,
    rtc_rx: mpsc::UnboundedReceiver<(u64, RtcEvent)>,
    events: mpsc::Sender<Event>,
    peer_events: mpsc::UnboundedSender<PeerEvent>,
    stream_rx: mpsc::UnboundedReceiver<StreamCmd>,
    streams: StreamTable,
    services: ServiceTable,
    peers: HashMap<String, Peer>,
    rtc_keys: HashMap<u64, String>,
    next_key: u64,
    reqs: HashMap<u64, PendingReq>,
    next_rid: u64,
    acks: HashMap<u64, PendingAck>,
    next_ack: u64,
    credits: Arc<Credits>,
    /// Relay frames of this turn of the loop, sent as one `p2p:f` batch (or a few).
    relay_out: BatchWriter,
    relay_full: Vec<Bytes>,
    dirty: HashSet<String>,
    /// Messages held in all peers' `held` queues.
    held_total: usize,
    ready: Option<Ready>,
    ready_deadline: Instant,
    /// The peer we paired with (socket.io-bridge mode); its disconnect closes us.
    pair_peer: Option<String>,
    /// Nonce of the echo that completes pairing.
    pair_echo: Option<u64>,
    /// Closing: delivering what is queued until this deadline, then shutting down.
    closing: Option<(Instant, String, Vec<oneshot::Sender<()>>)>,
    stop: bool,
    /// Every `P2p` handle was dropped (the command channel is closed).
    handles_gone: bool,
}

pub(crate) struct Channels {
    pub(crate) cmds: mpsc::UnboundedReceiver<Cmd>,
    pub(crate) net: mpsc::UnboundedReceiver<NetIn>,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) peer_events: mpsc::UnboundedSender<PeerEvent>,
    pub(crate) stream_tx: mpsc::UnboundedSender<StreamCmd>,
    pub(crate) stream_rx: mpsc::UnboundedReceiver<StreamCmd>,
    pub(crate) incoming: mpsc::Sender<IncomingStream>,
    pub(crate) credits: Arc<Credits>,
}

impl Actor {
    pub(crate) fn new(opts: P2pOptions, client: Client, ch: Channels, ready: Ready) -> Self {
        let (rtc_tx, rtc_rx) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let rtc_cfg = RtcConfig {
            ice_servers: opts.ice_servers.iter().cloned().map(Into::into).collect(),
            loopback_only: opts.loopback_only,
            disable_mdns: opts.disable_mdns,
            trickle: opts.trickle,
            block_all_candidates: opts.block_all_candidates,
        };
        let now = Instant::now();
        let ready_deadline = now
            + opts.request_timeout
            + if opts.peer_uid.is_some() {
                opts.pair_timeout
            } else {
                Duration::ZERO
            };
        Self {
            rtc_cfg,
            client,
            me: PeerInfo {
                id: String::new(),
                uid: None,
            },
            registered: false,
            connected: false,
            token: String::new(),
            disconnected_since: None,
            my_rooms: opts.effective_rooms().into_iter().collect(),
            cmds: ch.cmds,
            replies_tx,
            replies,
            net: ch.net,
            rtc_tx,
            rtc_rx,
            events: ch.events,
            peer_events: ch.peer_events,
            stream_rx: ch.stream_rx,
            streams: StreamTable::new(opts.stream_window as u64, ch.incoming, ch.stream_tx),
            services: ServiceTable::default(),
            peers: HashMap::new(),
            rtc_keys: HashMap::new(),
            next_key: 0,
            reqs: HashMap::new(),
            next_rid: 0,
            acks: HashMap::new(),
            next_ack: 0,
            credits: ch.credits,
            relay_out: BatchWriter::new(),
            relay_full: Vec::new(),
            dirty: HashSet::new(),
            held_total: 0,
            ready: Some(ready),
            ready_deadline,
            pair_peer: None,
            pair_echo: None,
            closing: None,
            stop: false,
            handles_gone: false,
            opts,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop {
            let room = async {
                if self.held_total > 0 {
                    self.events.clone().reserve_owned().await.ok()
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                biased;
                Some(permit) = room => self.release_held(permit).await,
                Some(n) = self.net.recv() => {
                    self.on_net(n).await;
                    // What else already arrived goes into the same flush (one batch).
                    for _ in 0..DRAIN {
                        match self.net.try_recv() {
                            Ok(n) => self.on_net(n).await,
                            Err(_) => break,
                        }
                    }
                }
                Some((key, ev)) = self.rtc_rx.recv() => self.on_rtc(key, ev).await,
                Some(c) = self.replies.recv() => self.on_cmd(c).await,
                Some(c) = self.stream_rx.recv() => self.on_stream_cmd(c),
                // Commands are read while closing too: an emit that took its credit just
                // before `close()` is still delivered.
                c = self.cmds.recv(), if !self.handles_gone => match c {
                    Some(c) => {
                        self.on_cmd(c).await;
                        for _ in 0..DRAIN {
                            match self.cmds.try_recv() {
                                Ok(c) => self.on_cmd(c).await,
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone.
                    None => {
                        self.handles_gone = true;
                        self.begin_close("every P2p handle was dropped", None);
                    }
                },
                _ = tick.tick() => self.on_tick().await,
            }
            self.flush().await;
            self.flush_relay().await;
            self.check_closing().await;
        }
        tracing::debug!(id = %self.me.id, "actor stopped; disconnecting from the server");
        self.flush_relay().await;
        let _ = self.client.disconnect().await;
        tracing::debug!(id = %self.me.id, "disconnected from the server");
    }

    // ---------- helpers ----------

    fn peer_event(&self, ev: PeerEvent) {
        let _ = self.peer_events.send(ev);
    }

    async fn emit_sio(&self, event: &str, payload: SioPayload) {
        if let Err(e) = self.client.emit(event, payload).await {
            tracing::debug!(%e, event, "socket.io emit failed");
        }
    }

    async fn request(&mut self, op: Op, kind: ReqKind) {
        let deadline = Instant::now()
            + match kind {
                ReqKind::Pair => self.opts.pair_timeout + self.opts.request_timeout,
                _ => self.opts.request_timeout,
            };
        self.request_until(op, kind, deadline).await;
    }

    async fn request_until(&mut self, op: Op, kind: ReqKind, deadline: Instant) {
        self.next_rid += 1;
        let rid = self.next_rid;
        self.reqs.insert(rid, PendingReq { kind, deadline });
        let json = serde_json::to_value(Request { rid, op }).unwrap_or(Json::Null);
        self.emit_sio(events::REQUEST, SioPayload::Text(vec![json]))
            .await;
    }

    fn ensure_peer(&mut self, info: &PeerInfo) -> bool {
        if self.peers.contains_key(&info.id) || info.id == self.me.id {
            return false;
        }
        let now = Instant::now();
        self.peers.insert(
            info.id.clone(),
            Peer {
                info: info.clone(),
                rooms: HashSet::new(),
                paired: false,
                link: Link::new(&info.id, self.opts.window, self.opts.max_message_size, now),
                neg: Negotiation::new(&self.me.id, &info.id, self.opts.upgrade_timeout, now),
                rtc: None,
                upgrade_waiters: Vec::new(),
                dc_seen: now,
                dc_pinged: now,
                retry_at: None,
                backoff: self.opts.retry_backoff.0,
                held: Default::default(),
                confirm_by: None,
            },
        );
        self.credits.add_peer(&info.id);
        true
    }

    fn active_channels(&self) -> usize {
        self.peers.values().filter(|p| p.neg.active()).count()
    }

    fn finish_ready(&mut self, r: Result<PeerInfo>) {
        if let Some(tx) = self.ready.take() {
            let failed = r.is_err();
            let _ = tx.send(r);
            if failed {
                self.stop = true;
            }
        }
    }

    // ---------- network input ----------

    async fn on_net(&mut self, n: NetIn) {
        match n {
            NetIn::Connected => {
                tracing::debug!(registered = self.registered, "socket.io connected");
                self.connected = true;
                self.credits.set_connected(true);
                // A hello sent on an earlier connection that died is void: send it again here.
                self.reqs.retain(|_, r| !matches!(r.kind, ReqKind::Hello));
                self.send_hello().await;
            }

            NetIn::Batch(batch) => match split_batch(&batch) {
                Ok(frames) => {
                    for bytes in frames {
                        match Frame::decode(&bytes) {
                            Ok(frame) => {
                                let from = frame.from.clone();
                                self.on_frame(&from, frame.body, Transport::Relay).await;
                            }
                            Err(e) => {
                                tracing::warn!(%e, len = bytes.len(), head = ?&bytes[..bytes.len().min(48)], "undecodable frame from the server")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(%e, "undecodable batch from the server"),
            },
            NetIn::Response(v) => match serde_json::from_value::<Response>(v) {
                Ok(r) => self.on_response(r).await,
                Err(e) => tracing::warn!(%e, "bad response from the server"),
            },
            NetIn::Signal(v) => match serde_json::from_value::<SignalFrom>(v) {
                Ok(s) => self.on_signal(s).await,
                Err(e) => tracing::warn!(%e, "bad signal from the server"),
            },
            NetIn::Presence(v) => {
                // One presence, or a batch of them (we ask for batches in `hello`).
                let list = match v {
                    serde_json::Value::Array(list) => list,
                    one => vec![one],
                };
                for v in list {
                    match serde_json::from_value::<Presence>(v) {
                        Ok(p) => self.on_presence(p).await,
                        Err(e) => tracing::warn!(%e, "bad presence from the server"),
                    }
                }
            }
            NetIn::Error(v) => match serde_json::from_value::<ErrorMsg>(v) {
                Ok(e) => self.on_server_error(e),
                Err(e) => tracing::warn!(%e, "bad error message from the server"),
            },
            NetIn::Call(v) => match serde_json::from_value::<CallFor>(v) {
                Ok(c) => {
                    let service = self.services.provided.get(&c.service).cloned();
                    let back = self.replies_tx.clone();
                    tokio::spawn(async move {
                        let outcome =
                            crate::services::run_call(service, c.from, c.method, c.args).await;
                        let _ = back.send(Cmd::CallDone {
                            cid: c.cid,
                            outcome,
                        });
                    });
                }
                Err(e) => tracing::warn!(%e, "bad call from the server"),
            },
            NetIn::Topic(v) => match serde_json::from_value::<Publication>(v) {
                Ok(p) => self.services.deliver(p),
                Err(e) => tracing::warn!(%e, "bad publication from the server"),
            },
            NetIn::SocketError(msg) if msg.contains("EngineIO") && self.registered => {
                // The transport broke: rust_socketio reconnects by itself.
                tracing::debug!(%msg, "server connection broken");
                self.connected = false;
                self.credits.set_connected(false);
                self.disconnected_since.get_or_insert_with(Instant::now);
            }
            NetIn::SocketError(msg) => {
                if msg.contains("ConnectError") {
                    let reason = msg
                        .split_once(':')
                        .map(|(_, r)| r.trim().to_owned())
                        .unwrap_or(msg.clone());
                    self.finish_ready(Err(Error::Rejected {
                        code: ErrorCode::Unauthorized,
                        message: reason.clone(),
                    }));
                    self.shutdown(&format!("connection refused: {reason}"))
                        .await;
                } else {
                    tracing::debug!(%msg, "socket.io error");
                }
            }
            NetIn::Closed if self.opts.reconnect && self.ready.is_none() => {
                // rust_socketio reconnects by itself; peers on data channels keep talking.
                self.connected = false;
                self.credits.set_connected(false);
                self.disconnected_since.get_or_insert_with(Instant::now);
                tracing::info!("server connection lost; reconnecting");
            }
            NetIn::Closed => self.shutdown("server connection lost").await,
        }
    }

    async fn send_hello(&mut self) {
        // First connection, or a reconnection: then ask for our id back.
        let resume = self.registered.then(|| Resume {
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
            // rust_socketio sends a binary event as two websocket messages (two writes, and
            // Nagle's algorithm on its socket) and splits binary messages on 0x1e: text is
            // one message and needs no escaping.
            frames: FrameEncoding::Base64,
            batch_presence: true,
        };
        self.request(op, ReqKind::Hello).await;
    }

    async fn on_response(&mut self, r: Response) {
        let Some(req) = self.reqs.remove(&r.rid) else {
            return;
        };
        let result = match (r.ok, r.error) {
            (_, Some(e)) => Err(Error::from_server(e.code, e.message)),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Json::Null),
        };
        match req.kind {
            ReqKind::User(tx) => {
                let _ = tx.send(result);
            }
            ReqKind::Join(room, tx) => {
                if let Ok(v) = &result {
                    self.my_rooms.insert(room.clone());
                    let peers: Vec<PeerInfo> =
                        serde_json::from_value(v.clone()).unwrap_or_default();
                    for p in peers {
                        let new = self.ensure_peer(&p);
                        if let Some(peer) = self.peers.get_mut(&p.id) {
                            peer.rooms.insert(room.clone());
                        }
                        let id = p.id.clone();
                        self.peer_event(PeerEvent::Joined {
                            room: room.clone(),
                            peer: p,
                        });
                        if new && self.opts.auto_upgrade {
                            self.start_upgrades(Some(id), None).await;
                        }
                    }
                }
                let _ = tx.send(result);
            }
            ReqKind::Leave(room, tx) => {
                if result.is_ok() {
                    self.my_rooms.remove(&room);
                    let gone: Vec<String> = self
                        .peers
                        .iter_mut()
                        .filter_map(|(id, p)| {
                            p.rooms.remove(&room);
                            (p.rooms.is_empty() && !p.paired).then(|| id.clone())
                        })
                        .collect();
                    for id in gone {
                        self.remove_peer(&id, "we left every room we shared").await;
                    }
                }
                let _ = tx.send(result);
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
            ReqKind::Provide(name, service, tx) => {
                if result.is_ok() {
                    self.services.provided.insert(name, service);
                }
                let _ = tx.send(result);
            }
            ReqKind::Subscribe(topic, id, tx) => {
                if let Err(e) = result {
                    self.services.remove_sub(&topic, id);
                    let _ = tx.send(Err(e));
                } else {
                    let _ = tx.send(Ok(id));
                }
            }
            ReqKind::Hello => match result.and_then(|v| {
                serde_json::from_value::<Welcome>(v).map_err(|e| Error::Serde(e.to_string()))
            }) {
                Ok(w) => self.on_welcome(w).await,
                Err(e) if self.registered => {
                    tracing::warn!(%e, "could not register again after a reconnection");
                    self.shutdown(&format!(
                        "could not register again after a reconnection: {e}"
                    ))
                    .await;
                }
                Err(e) => self.finish_ready(Err(e)),
            },
            ReqKind::Pair => match result.and_then(|v| {
                serde_json::from_value::<PeerInfo>(v).map_err(|e| Error::Serde(e.to_string()))
            }) {
                Ok(info) => {
                    self.add_pair(&info).await;
                    let nonce = rand_nonce();
                    self.pair_echo = Some(nonce);
                    self.send_now(&info.id, Body::Ping { nonce, pong: false })
                        .await;
                }
                Err(e) => self.finish_ready(Err(e)),
            },
        }
    }

    async fn on_welcome(&mut self, w: Welcome) {
        self.disconnected_since = None;
        tracing::debug!(id = %w.id, continued = w.continued, rooms = ?w.rooms, "welcome");
        let now = Instant::now();
        let again = self.registered;
        if again {
            let continued = w.continued && w.id == self.me.id;
            if continued {
                // Nobody was told we left: links carry on. What was sent on the relay while
                // we were away goes again now; peers the server no longer lists get a while
                // to come back (they may be reconnecting too).
                for (id, p) in self.peers.iter_mut() {
                    if p.transport() == Transport::Relay {
                        p.link.on_transport_change(now);
                        self.dirty.insert(id.clone());
                    }
                    p.confirm_by = Some(now + self.opts.pair_timeout);
                }
            } else {
                let ids: Vec<String> = self.peers.keys().cloned().collect();
                for id in ids {
                    let info = self.peers.get(&id).map(|p| p.info.clone());
                    self.remove_peer(&id, "we reconnected as a new peer").await;
                    if let Some(peer) = info {
                        self.peer_event(PeerEvent::Disconnected { peer });
                    }
                }
                self.pair_peer = None;
            }
            self.peer_event(PeerEvent::Reconnected { continued });
        }
        self.me = PeerInfo {
            id: w.id,
            uid: w.uid,
        };
        self.token = w.token;
        self.registered = true;
        for room in w.rooms {
            for p in room.peers {
                let new = self.ensure_peer(&p);
                if let Some(peer) = self.peers.get_mut(&p.id) {
                    peer.rooms.insert(room.room.clone());
                    peer.confirm_by = None;
                }
                if new || !again {
                    self.peer_event(PeerEvent::Joined {
                        room: room.room.clone(),
                        peer: p,
                    });
                }
            }
        }
        if again {
            // Services and subscriptions are ours: claim them again (the server may have
            // restarted, or given us a new id).
            let names: Vec<String> = self.services.provided.keys().cloned().collect();
            for service in names {
                self.request(Op::Provide { service }, ReqKind::Quiet).await;
            }
            for topic in self.services.topics() {
                self.request(Op::Subscribe { topic }, ReqKind::Quiet).await;
            }
            if let Some(peer_uid) = self.opts.peer_uid.clone() {
                let op = Op::Pair {
                    peer_uid,
                    timeout_ms: Some(self.opts.pair_timeout.as_millis() as u64),
                };
                self.request(op, ReqKind::Pair).await;
            }
            return;
        }
        match self.opts.peer_uid.clone() {
            Some(peer_uid) => {
                let op = Op::Pair {
                    peer_uid,
                    timeout_ms: Some(self.opts.pair_timeout.as_millis() as u64),
                };
                self.request(op, ReqKind::Pair).await;
            }
            None => {
                let me = self.me.clone();
                self.finish_ready(Ok(me));
            }
        }
        if self.opts.auto_upgrade {
            self.start_upgrades(None, None).await;
        }
    }

    async fn add_pair(&mut self, info: &PeerInfo) {
        if let Some(p) = self.peers.get_mut(&info.id) {
            p.confirm_by = None;
        }
        if self.pair_peer.as_deref() == Some(info.id.as_str()) {
            return;
        }
        self.ensure_peer(info);
        if let Some(p) = self.peers.get_mut(&info.id) {
            p.paired = true;
        }
        self.pair_peer = Some(info.id.clone());
        self.peer_event(PeerEvent::Paired { peer: info.clone() });
        if self.opts.auto_upgrade {
            self.start_upgrades(Some(info.id.clone()), None).await;
        }
    }

    async fn on_presence(&mut self, p: Presence) {
        match p {
            Presence::Joined { room, peer } => {
                self.ensure_peer(&peer);
                if let Some(p) = self.peers.get_mut(&peer.id) {
                    p.rooms.insert(room.clone());
                    p.confirm_by = None;
                }
                let id = peer.id.clone();
                self.peer_event(PeerEvent::Joined { room, peer });
                if self.opts.auto_upgrade && self.ready.is_none() {
                    self.start_upgrades(Some(id), None).await;
                }
            }
            Presence::Left { room, peer } => {
                let gone = match self.peers.get_mut(&peer.id) {
                    Some(p) => {
                        p.rooms.remove(&room);
                        p.rooms.is_empty() && !p.paired
                    }
                    None => false,
                };
                self.peer_event(PeerEvent::Left {
                    room,
                    peer: peer.clone(),
                });
                if gone {
                    self.remove_peer(&peer.id, "the peer left every room we share")
                        .await;
                }
            }
            Presence::Paired { peer } => self.add_pair(&peer).await,
            Presence::Disconnected { peer } => {
                self.remove_peer(&peer.id, "the peer disconnected").await;
                self.peer_event(PeerEvent::Disconnected { peer: peer.clone() });
                if self.pair_peer.as_deref() == Some(peer.id.as_str()) {
                    self.finish_ready(Err(Error::PeerOffline(
                        "the peer disconnected during pairing".into(),
                    )));
                    self.shutdown("the paired peer disconnected").await;
                }
            }
        }
    }

    fn on_server_error(&mut self, e: ErrorMsg) {
        let now = Instant::now();
        match (e.error.code, &e.to, e.seq) {
            (ErrorCode::Busy, Some(to), Some(seq)) => {
                if let Some(p) = self.peers.get_mut(to) {
                    p.link.on_dropped(seq, now);
                    self.dirty.insert(to.clone());
                }
            }
            (ErrorCode::Busy, _, _) => {}
            // A peer that is reconnecting (or just left): the link keeps the frames and sends
            // them again later, or drops them when the peer is reported gone.
            (ErrorCode::UnknownPeer | ErrorCode::NotRegistered, Some(_), _) => {
                tracing::debug!(code = %e.error.code, to = ?e.to, "frame not relayed");
            }
            _ => {
                tracing::warn!(code = %e.error.code, message = %e.error.message, event = ?e.event, to = ?e.to, "error from the server")
            }
        }
    }

    async fn remove_peer(&mut self, id: &str, why: &str) {
        let Some(mut peer) = self.peers.remove(id) else {
            return;
        };
        self.held_total -= peer.held.len();
        self.streams.peer_gone(id, why);
        if let Some(slot) = peer.rtc.take() {
            self.close_rtc(slot);
        }
        for w in peer.upgrade_waiters.drain(..) {
            let _ = w.send(Err(Error::PeerOffline(why.to_owned())));
        }
        let failed: Vec<u64> = self
            .acks
            .iter()
            .filter(|(_, a)| a.peer == id)
            .map(|(k, _)| *k)
            .collect();
        for k in failed {
            if let Some(a) = self.acks.remove(&k) {
                let _ = a.tx.send(Err(Error::PeerOffline(format!("{id}: {why}"))));
            }
        }
        self.dirty.remove(id);
        self.credits.remove_peer(id);
    }

    // ---------- frames ----------

    async fn on_frame(&mut self, from: &str, body: Body, via: Transport) {
        let now = Instant::now();
        if !self.peers.contains_key(from) {
            if from.is_empty() || !self.registered {
                return;
            }
            // The server only relays between peers that share a scope; presence may lag.
            self.ensure_peer(&PeerInfo {
                id: from.to_owned(),
                uid: None,
            });
        }
        match body {
            Body::Data { seq, more, msg } => {
                let Some(peer) = self.peers.get_mut(from) else {
                    return;
                };
                let (delivered, ack) = peer.link.on_data(seq, more, msg, now);
                if let Some((upto, nack)) = ack {
                    self.send_ack(from, upto, nack).await;
                }
                match delivered {
                    Some(Delivered::Msg(Msg::Stream { id, opener, op })) => {
                        let out = self.streams.on_msg(from, id, opener, op);
                        self.push_out(out);
                        self.hand_over(from, seq, None).await;
                    }
                    Some(d) => {
                        let ev = self.deliver(from, d, via);
                        self.hand_over(from, seq, ev).await;
                    }
                    None => {}
                }
            }
            Body::Volatile { msg } => {
                // Best effort: dropped when the application is behind.
                if let Some(ev) = self.deliver(from, Delivered::Msg(msg), via) {
                    let _ = self.events.try_send(ev);
                }
            }
            Body::LinkAck { upto, nack } => {
                if let Some(peer) = self.peers.get_mut(from) {
                    let released = peer.link.on_ack(upto, nack, now);
                    self.credits.release(from, released);
                    self.dirty.insert(from.to_owned());
                }
            }
            Body::Ping { nonce, pong: false } => {
                self.send_now(from, Body::Ping { nonce, pong: true }).await;
            }
            Body::Ping { nonce, pong: true } => {
                if self.pair_echo == Some(nonce) && self.pair_peer.as_deref() == Some(from) {
                    self.pair_echo = None;
                    let me = self.me.clone();
                    self.finish_ready(Ok(me));
                }
            }
        }
    }

    /// Hands a message that ended at `seq` to the application, in order: events wait in
    /// the peer's `held` queue while the application's queue is full, and frames are only
    /// acknowledged once taken, so a slow application holds its senders to one window.
    async fn hand_over(&mut self, from: &str, seq: u64, ev: Option<Event>) {
        let now = Instant::now();
        let Some(peer) = self.peers.get_mut(from) else {
            return;
        };
        let mut ack = None;
        if peer.held.is_empty() {
            match ev.map(|ev| self.events.try_send(ev)) {
                None | Some(Ok(())) | Some(Err(mpsc::error::TrySendError::Closed(_))) => {
                    ack = peer.link.consume(seq, now);
                }
                Some(Err(mpsc::error::TrySendError::Full(ev))) => {
                    peer.held.push_back((seq, Some(ev)));
                    self.held_total += 1;
                }
            }
        } else {
            peer.held.push_back((seq, ev));
            self.held_total += 1;
        }
        if let Some((upto, nack)) = ack {
            self.send_ack(from, upto, nack).await;
        }
    }

    /// The application's queue has room again: release held events, oldest peer first.
    async fn release_held(&mut self, permit: mpsc::OwnedPermit<Event>) {
        let now = Instant::now();
        let Some(id) = self
            .peers
            .iter()
            .find(|(_, p)| !p.held.is_empty())
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut permit = Some(permit);
        let mut ack = None;
        while let Some((seq, ev)) = peer.held.pop_front() {
            if let Some(ev) = ev {
                let sent = match permit.take() {
                    Some(p) => {
                        p.send(ev);
                        Ok(())
                    }
                    None => self.events.try_send(ev),
                };
                if let Err(mpsc::error::TrySendError::Full(ev)) = sent {
                    peer.held.push_front((seq, Some(ev)));
                    break;
                }
            }
            self.held_total -= 1;
            ack = peer.link.consume(seq, now).or(ack);
        }
        if let Some((upto, nack)) = ack.or_else(|| peer.link.take_ack()) {
            self.send_ack(&id, upto, nack).await;
        }
    }

    fn deliver(&mut self, from: &str, d: Delivered, via: Transport) -> Option<Event> {
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
                    self.push_msg(
                        from,
                        Msg::ReplyError {
                            ack_id,
                            code: "PayloadTooLarge".into(),
                            message: format!("message larger than {max} bytes"),
                        },
                    );
                }
                if let Some(a) = failed_reply.and_then(|id| self.acks.remove(&id)) {
                    let _ = a.tx.send(Err(Error::PayloadTooLarge { size, max }));
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
                            self.push_msg(
                                from,
                                Msg::ReplyError {
                                    ack_id,
                                    code: "BadPayload".into(),
                                    message: e.to_string(),
                                },
                            );
                        }
                        return None;
                    }
                };
                let peer = self.peers.get(from)?;
                let responder = ack_id.map(|ack_id| {
                    Arc::new(Responder {
                        cmds: self.replies_tx.clone(),
                        peer: from.to_owned(),
                        ack_id,
                        done: Default::default(),
                    })
                });
                let ev = Event {
                    name: Arc::from(event.as_str()),
                    from: Arc::new(peer.info.clone()),
                    payload,
                    transport: via,
                    responder,
                };
                return Some(ev);
            }
            Msg::Reply { ack_id, payload } => {
                if self.acks.get(&ack_id).is_some_and(|a| a.peer == from)
                    && let Some(a) = self.acks.remove(&ack_id)
                {
                    let _ = a.tx.send(Payload::from_wire(payload));
                }
            }
            Msg::ReplyError {
                ack_id,
                code,
                message,
            } => {
                if self.acks.get(&ack_id).is_some_and(|a| a.peer == from)
                    && let Some(a) = self.acks.remove(&ack_id)
                {
                    let _ = a.tx.send(Err(Error::Remote { code, message }));
                }
            }
            // Streams are taken off the link before `deliver`; a volatile one is nonsense.
            Msg::Continuation { .. } | Msg::Stream { .. } => {}
        }
        None
    }

    fn push_out(&mut self, out: crate::stream::Out) {
        for (to, msg) in out {
            self.push_msg(&to, msg);
        }
    }

    fn on_stream_cmd(&mut self, c: StreamCmd) {
        let out = match c {
            StreamCmd::Open { peer, name, reply } => {
                if !self.registered || !self.peers.contains_key(&peer) {
                    let _ = reply.send(Err(Error::PeerOffline(format!(
                        "{peer} is not a peer of this one"
                    ))));
                    return;
                }
                let deadline = Instant::now() + self.opts.request_timeout;
                self.streams.open(peer, name, reply, deadline)
            }
            c => self.streams.on_cmd(c),
        };
        self.push_out(out);
    }

    fn push_msg(&mut self, to: &str, msg: Msg) {
        if let Some(peer) = self.peers.get_mut(to) {
            if let Err(e) = peer.link.push(msg, false) {
                tracing::warn!(%e, "could not encode a message");
            }
            self.dirty.insert(to.to_owned());
        }
    }

    async fn send_ack(&mut self, to: &str, upto: u64, nack: bool) {
        self.send_now(to, Body::LinkAck { upto, nack }).await;
    }

    /// Sends an unsequenced frame (ack, ping, volatile) on the peer's current transport.
    async fn send_now(&mut self, to: &str, body: Body) {
        let volatile = matches!(body, Body::Volatile { .. });
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
        if let Some(slot) = self
            .peers
            .get(to)
            .and_then(|p| p.rtc.as_ref())
            .filter(|s| s.open)
        {
            // Best effort: the volatile channel may open a moment after the reliable one.
            if !volatile || slot.link.channel_open(false) {
                slot.send(!volatile, frame);
                return;
            }
        }
        self.relay(&frame);
    }

    /// Queues a frame for the relay batch of this turn of the loop.
    fn relay(&mut self, frame: &Bytes) {
        if !self.relay_out.is_empty() && self.relay_out.len() + frame.len() > RELAY_BATCH {
            self.relay_full.push(self.relay_out.take());
        }
        self.relay_out.push(frame);
    }

    /// Sends the relay frames of this turn: one `p2p:f` event per batch.
    async fn flush_relay(&mut self) {
        if !self.relay_out.is_empty() {
            self.relay_full.push(self.relay_out.take());
        }
        for batch in std::mem::take(&mut self.relay_full) {
            let text = batch_to_base64(&batch);
            self.emit_sio(events::FRAME, SioPayload::Text(vec![Json::String(text)]))
                .await;
        }
    }

    /// Sends what the reliable links of dirty peers may send now.
    async fn flush(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty: Vec<String> = self.dirty.drain().collect();
        let mut frames = Vec::new();
        for id in dirty {
            frames.clear();
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            peer.link.poll_transmit(&mut frames);
            // On the relay, a delayed acknowledgement rides along with data going to the
            // same peer: it costs no write of its own (a lone small write can wait for
            // Nagle's algorithm on rust_socketio's socket before the next one goes).
            let on_relay = peer.transport() == Transport::Relay;
            let ack = if frames.is_empty() || !on_relay {
                None
            } else {
                peer.link.take_ack()
            };
            if let Some((upto, nack)) = ack {
                self.send_ack(&id, upto, nack).await;
            }
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if let Some(slot) = peer.rtc.as_ref().filter(|s| s.open) {
                for f in frames.drain(..) {
                    slot.send(true, f);
                }
                continue;
            }
            for f in &frames {
                self.relay(f);
            }
        }
    }

    // ---------- commands ----------

    async fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Provide {
                name,
                service,
                reply,
            } => {
                let op = Op::Provide {
                    service: name.clone(),
                };
                self.request(op, ReqKind::Provide(name, service, reply))
                    .await;
            }
            Cmd::Unprovide { name, reply } => {
                self.services.provided.remove(&name);
                self.request(Op::Unprovide { service: name }, ReqKind::User(reply))
                    .await;
            }
            Cmd::Call { op, timeout, reply } => {
                // The server answers `Timeout` at `timeout`; this deadline only matters
                // when the server itself does not answer.
                let deadline = Instant::now() + timeout + Duration::from_millis(500);
                self.request_until(op, ReqKind::User(reply), deadline).await;
            }
            Cmd::CallDone { cid, outcome } => {
                self.request(Op::CallResult { cid, outcome }, ReqKind::Quiet)
                    .await;
            }
            Cmd::Subscribe { topic, tx, reply } => {
                let (id, first) = self.services.add_sub(&topic, tx);
                if first {
                    let op = Op::Subscribe {
                        topic: topic.clone(),
                    };
                    self.request(op, ReqKind::Subscribe(topic, id, reply)).await;
                } else {
                    let _ = reply.send(Ok(id));
                }
            }
            Cmd::Unsubscribe { topic, id } => {
                if self.services.remove_sub(&topic, id) && !self.stop {
                    self.request(Op::Unsubscribe { topic }, ReqKind::Quiet)
                        .await;
                }
            }
            Cmd::Emit {
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
            Cmd::Volatile {
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
                        self.send_now(&t, Body::Volatile { msg: msg.clone() }).await;
                    }
                }
            }
            Cmd::EmitAck {
                peer,
                event,
                payload,
                frames,
                timeout,
                reply,
            } => {
                if !self.peers.contains_key(&peer) {
                    self.credits.release(&peer, frames);
                    let _ = reply.send(Err(Error::PeerOffline(peer)));
                    return;
                }
                self.next_ack += 1;
                let ack_id = self.next_ack;
                self.acks.insert(
                    ack_id,
                    PendingAck {
                        peer: peer.clone(),
                        deadline: Instant::now() + timeout,
                        tx: reply,
                    },
                );
                let msg = Msg::Event {
                    event,
                    ack_id: Some(ack_id),
                    payload,
                };
                self.push_counted(&peer, msg, frames);
            }
            Cmd::Reply {
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
            Cmd::Request { op, reply } => {
                if !self.registered {
                    let _ = reply.send(Err(Error::Closed));
                    return;
                }
                // Keep our own view of rooms in step with the server's answer.
                let kind = match &op {
                    Op::Join { room } => ReqKind::Join(room.clone(), reply),
                    Op::Leave { room } => ReqKind::Leave(room.clone(), reply),
                    _ => ReqKind::User(reply),
                };
                self.request(op, kind).await;
            }
            Cmd::Upgrade { peer, done } => self.start_upgrades(peer, done).await,
            Cmd::Downgrade { peer } => {
                let acts = match self.peers.get_mut(&peer) {
                    Some(p) => p.neg.hang_up("downgrade requested by the application"),
                    None => vec![],
                };
                self.run_actions(&peer, acts).await;
            }
            Cmd::Kill { peer } => {
                let acts = match self.peers.get_mut(&peer) {
                    Some(p) => p.neg.on_closed("data channel killed".into()),
                    None => vec![],
                };
                let silent: Vec<Action> = acts
                    .into_iter()
                    .filter(|a| !matches!(a, Action::Send(_)))
                    .collect();
                self.run_actions(&peer, silent).await;
            }
            Cmd::Transport { peer, reply } => {
                let r = self
                    .peers
                    .get(&peer)
                    .map(Peer::transport)
                    .ok_or(Error::PeerOffline(peer));
                let _ = reply.send(r);
            }
            Cmd::Peers { reply } => {
                let mut v: Vec<PeerInfo> = self.peers.values().map(|p| p.info.clone()).collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(v);
            }
            Cmd::LiveConnections { reply } => {
                let _ = reply.send(self.peers.values().filter(|p| p.rtc.is_some()).count());
            }
            Cmd::Close { done } => self.begin_close("closed by the application", Some(done)),
        }
    }

    /// Queues an emitted message whose credit the handle took.
    fn push_counted(&mut self, to: &str, msg: Msg, frames: usize) {
        let Some(peer) = self.peers.get_mut(to) else {
            self.credits.release(to, frames);
            return;
        };
        if let Err(e) = peer.link.push(msg, true) {
            tracing::warn!(%e, "could not encode a message");
            self.credits.release(to, frames);
        }
        self.dirty.insert(to.to_owned());
    }

    // ---------- WebRTC ----------

    async fn start_upgrades(
        &mut self,
        only: Option<String>,
        done: Option<oneshot::Sender<Result<()>>>,
    ) {
        let now = Instant::now();
        let mut ids: Vec<String> = match &only {
            Some(id) => vec![id.clone()],
            None => self.peers.keys().cloned().collect(),
        };
        ids.sort();
        if let (Some(id), Some(done)) = (&only, done) {
            match self.peers.get_mut(id) {
                None => {
                    let _ = done.send(Err(Error::PeerOffline(id.clone())));
                    return;
                }
                Some(p) if p.transport() == Transport::DataChannel => {
                    let _ = done.send(Ok(()));
                    return;
                }
                Some(p) => p.upgrade_waiters.push(done),
            }
        }
        for id in ids {
            let active = self.active_channels();
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.neg.active() {
                continue;
            }
            if active >= self.opts.num_clients {
                for w in p.upgrade_waiters.drain(..) {
                    let _ = w.send(Err(Error::WebRtc("num_clients reached".into())));
                }
                continue;
            }
            let acts = p.neg.start(now);
            self.run_actions(&id, acts).await;
        }
    }

    async fn on_signal(&mut self, s: SignalFrom) {
        let now = Instant::now();
        if !self.peers.contains_key(&s.from) {
            self.ensure_peer(&PeerInfo {
                id: s.from.clone(),
                uid: None,
            });
        }
        let accept = self.active_channels() < self.opts.num_clients;
        let acts = match self.peers.get_mut(&s.from) {
            Some(p) => {
                let accept = accept || p.neg.active();
                p.neg.on_signal(s.signal, accept, now)
            }
            None => vec![],
        };
        self.run_actions(&s.from, acts).await;
    }

    async fn on_rtc(&mut self, key: u64, ev: RtcEvent) {
        let Some(id) = self.rtc_keys.get(&key).cloned() else {
            return; // an old connection
        };
        let now = Instant::now();
        if let Some(p) = self.peers.get_mut(&id) {
            p.dc_seen = now;
        }
        match ev {
            RtcEvent::LocalCandidate(Some(c)) => {
                let signal = Signal::Candidate {
                    candidate: c.candidate,
                    sdp_mid: c.sdp_mid,
                    sdp_m_line_index: c.sdp_m_line_index,
                    username_fragment: c.username_fragment,
                };
                self.send_signal(&id, signal).await;
            }
            RtcEvent::LocalCandidate(None) => {}
            RtcEvent::Open => {
                let acts = self
                    .peers
                    .get_mut(&id)
                    .map(|p| p.neg.on_open(now))
                    .unwrap_or_default();
                self.run_actions(&id, acts).await;
            }
            RtcEvent::Message(b) | RtcEvent::VolatileMessage(b) => match Frame::decode(&b) {
                // The data channel tells who sent it; the `from` field is not trusted.
                Ok(frame) => self.on_frame(&id, frame.body, Transport::DataChannel).await,
                Err(e) => tracing::warn!(%e, peer = %id, "undecodable frame on the data channel"),
            },
            RtcEvent::Closed(reason) => {
                let acts = self
                    .peers
                    .get_mut(&id)
                    .map(|p| p.neg.on_closed(reason))
                    .unwrap_or_default();
                self.run_actions(&id, acts).await;
            }
        }
    }

    async fn send_signal(&mut self, to: &str, signal: Signal) {
        self.request(
            Op::Signal {
                to: to.to_owned(),
                signal,
            },
            ReqKind::Signal,
        )
        .await;
    }

    fn close_rtc(&mut self, slot: RtcSlot) {
        self.rtc_keys.remove(&slot.key);
        tokio::spawn(async move { slot.link.close().await });
    }

    async fn new_rtc(&mut self, id: &str) -> Result<Arc<RtcLink>> {
        if let Some(slot) = self.peers.get_mut(id).and_then(|p| p.rtc.take()) {
            self.close_rtc(slot);
        }
        self.next_key += 1;
        let key = self.next_key;
        let link = Arc::new(
            RtcLink::new(&self.rtc_cfg, key, self.rtc_tx.clone())
                .await
                .map_err(|e| Error::WebRtc(e.to_string()))?,
        );
        self.rtc_keys.insert(key, id.to_owned());
        if let Some(p) = self.peers.get_mut(id) {
            let (writer, stop) = spawn_writer(link.clone(), key, self.rtc_tx.clone());
            p.rtc = Some(RtcSlot {
                link: link.clone(),
                key,
                open: false,
                writer,
                _stop: stop,
            });
        }
        Ok(link)
    }

    async fn run_actions(&mut self, id: &str, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let now = Instant::now();
            let result: Result<()> = match a {
                Action::CreateOffer => match self.new_rtc(id).await {
                    Ok(link) => match link.create_offer().await {
                        Ok(sdp) => {
                            self.send_signal(id, Signal::Offer { sdp }).await;
                            Ok(())
                        }
                        Err(e) => Err(Error::WebRtc(e.to_string())),
                    },
                    Err(e) => Err(e),
                },
                Action::AcceptOffer(sdp) => match self.new_rtc(id).await {
                    Ok(link) => match link.accept_offer(&sdp).await {
                        Ok(answer) => {
                            self.send_signal(id, Signal::Answer { sdp: answer }).await;
                            Ok(())
                        }
                        Err(e) => Err(Error::WebRtc(e.to_string())),
                    },
                    Err(e) => Err(e),
                },
                Action::AcceptAnswer(sdp) => match self
                    .peers
                    .get(id)
                    .and_then(|p| p.rtc.as_ref())
                    .map(|s| s.link.clone())
                {
                    Some(link) => link
                        .accept_answer(&sdp)
                        .await
                        .map_err(|e| Error::WebRtc(e.to_string())),
                    None => Ok(()),
                },
                Action::AddCandidate(Signal::Candidate {
                    candidate,
                    sdp_mid,
                    sdp_m_line_index,
                    username_fragment,
                }) => {
                    if let Some(link) = self
                        .peers
                        .get(id)
                        .and_then(|p| p.rtc.as_ref())
                        .map(|s| s.link.clone())
                    {
                        let c = CandidateInit {
                            candidate,
                            sdp_mid,
                            sdp_m_line_index,
                            username_fragment,
                        };
                        if let Err(e) = link.add_remote_candidate(c).await {
                            tracing::debug!(%e, peer = id, "remote candidate refused");
                        }
                    }
                    Ok(())
                }
                Action::AddCandidate(_) => Ok(()),
                Action::Send(signal) => {
                    self.send_signal(id, signal).await;
                    Ok(())
                }
                Action::CloseLink => {
                    if let Some(slot) = self.peers.get_mut(id).and_then(|p| p.rtc.take()) {
                        self.close_rtc(slot);
                    }
                    Ok(())
                }
                Action::Upgraded => {
                    if let Some(p) = self.peers.get_mut(id) {
                        if let Some(slot) = p.rtc.as_mut() {
                            slot.open = true;
                        }
                        p.link.on_transport_change(now);
                        p.dc_seen = now;
                        p.dc_pinged = now;
                        p.retry_at = None;
                        p.backoff = self.opts.retry_backoff.0;
                        for w in p.upgrade_waiters.drain(..) {
                            let _ = w.send(Ok(()));
                        }
                        self.dirty.insert(id.to_owned());
                    }
                    self.credits.set_relay(id, false);
                    self.peer_event(PeerEvent::Upgraded {
                        peer: id.to_owned(),
                    });
                    Ok(())
                }
                Action::Downgraded(reason) => {
                    tracing::debug!(peer = id, %reason, "downgraded to the relay");
                    let retry = self.opts.auto_upgrade && !reason.contains("application");
                    if let Some(p) = self.peers.get_mut(id) {
                        p.link.on_transport_change(now);
                        if retry {
                            p.schedule_retry(now, self.opts.retry_backoff.1);
                        }
                        self.dirty.insert(id.to_owned());
                    }
                    self.credits.set_relay(id, true);
                    self.peer_event(PeerEvent::Downgraded {
                        peer: id.to_owned(),
                        reason,
                    });
                    Ok(())
                }
                Action::Failed(reason) => {
                    let retry = self.opts.auto_upgrade && !reason.starts_with("busy");
                    if let Some(p) = self.peers.get_mut(id) {
                        if retry {
                            p.schedule_retry(now, self.opts.retry_backoff.1);
                        }
                        for w in p.upgrade_waiters.drain(..) {
                            let _ = w.send(Err(Error::WebRtc(reason.clone())));
                        }
                    }
                    self.peer_event(PeerEvent::UpgradeFailed {
                        peer: id.to_owned(),
                        reason,
                    });
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(%e, peer = id, "webrtc step failed");
                let more = self
                    .peers
                    .get_mut(id)
                    .map(|p| p.neg.on_error(e.to_string()))
                    .unwrap_or_default();
                queue.extend(more);
            }
        }
    }

    // ---------- time ----------

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let out = self.streams.on_tick(now);
        self.push_out(out);
        let mut acks = Vec::new();
        let mut neg_actions = Vec::new();
        let mut pings = Vec::new();
        let mut retries = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let before = p.link.backlog();
            p.link.on_tick(now);
            if before > 0 {
                self.dirty.insert(id.clone());
            }
            if let Some((upto, nack)) = p.link.ack_due(now) {
                acks.push((id.clone(), upto, nack));
            }
            let mut acts = p.neg.on_tick(now);
            if p.transport() == Transport::DataChannel {
                let silent = now.duration_since(p.dc_seen);
                if silent >= self.opts.dc_timeout {
                    acts.extend(p.neg.on_closed(format!(
                        "nothing received on the data channel for {silent:?}"
                    )));
                } else if now.duration_since(p.dc_pinged) >= self.opts.dc_timeout / 3
                    && silent >= self.opts.dc_timeout / 3
                {
                    p.dc_pinged = now;
                    pings.push(id.clone());
                }
            }
            if p.retry_at.is_some_and(|t| t <= now) && !p.neg.active() {
                p.retry_at = None;
                retries.push(id.clone());
            }
            if !acts.is_empty() {
                neg_actions.push((id.clone(), acts));
            }
        }
        for id in pings {
            self.send_now(
                &id,
                Body::Ping {
                    nonce: 0,
                    pong: false,
                },
            )
            .await;
        }
        // After a reconnection: peers the server did not list again, and that did not
        // come back in time, are gone.
        let stale: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.confirm_by.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let info = self.peers.get(&id).map(|p| p.info.clone());
            self.remove_peer(&id, "the peer did not come back after a reconnection")
                .await;
            if let Some(peer) = info {
                self.peer_event(PeerEvent::Disconnected { peer });
            }
        }
        if !retries.is_empty() && self.registered {
            for id in retries {
                self.start_upgrades(Some(id), None).await;
            }
        }
        for (id, upto, nack) in acks {
            self.send_ack(&id, upto, nack).await;
        }
        for (id, acts) in neg_actions {
            self.run_actions(&id, acts).await;
        }
        let expired: Vec<u64> = self
            .acks
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(a) = self.acks.remove(&k) {
                let _ = a.tx.send(Err(Error::Timeout(format!(
                    "no reply from {} in time",
                    a.peer
                ))));
            }
        }
        let expired: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(r) = self.reqs.remove(&k) {
                let e = Error::Timeout("no answer from the server".into());
                match r.kind {
                    ReqKind::User(tx) | ReqKind::Join(_, tx) | ReqKind::Leave(_, tx) => {
                        let _ = tx.send(Err(e));
                    }
                    ReqKind::Hello if self.registered && self.connected => self.send_hello().await,
                    ReqKind::Hello => self.finish_ready(Err(e)),
                    ReqKind::Pair => {
                        self.finish_ready(Err(Error::PeerOffline("pairing timed out".into())))
                    }
                    ReqKind::Signal | ReqKind::Quiet => {}
                    ReqKind::Provide(_, _, tx) => {
                        let _ = tx.send(Err(e));
                    }
                    ReqKind::Subscribe(topic, id, tx) => {
                        self.services.remove_sub(&topic, id);
                        let _ = tx.send(Err(e));
                    }
                }
            }
        }
        if let Some(t) = self.disconnected_since
            && now.duration_since(t) >= self.opts.reconnect_timeout
        {
            let d = self.opts.reconnect_timeout;
            self.shutdown(&format!("could not reconnect to the server within {d:?}"))
                .await;
            return;
        }
        if self.ready.is_some() && now >= self.ready_deadline {
            self.finish_ready(Err(Error::Timeout("not ready in time".into())));
        }
    }

    /// Starts closing: what is already queued to peers still goes out (for at most
    /// [`LINGER`]), then everything shuts down.
    fn begin_close(&mut self, reason: &str, done: Option<oneshot::Sender<()>>) {
        // Emits from now on fail with `Closed`; what was emitted before still goes out.
        self.credits.close();
        let closing = self
            .closing
            .get_or_insert_with(|| (Instant::now() + LINGER, reason.to_owned(), Vec::new()));
        closing.2.extend(done);
    }

    async fn check_closing(&mut self) {
        let Some((deadline, _, _)) = &self.closing else {
            return;
        };
        let drained = self.peers.values().all(|p| p.link.backlog() == 0);
        if (drained || Instant::now() >= *deadline || self.stop)
            && let Some((_, reason, done)) = self.closing.take()
        {
            self.shutdown(&reason).await;
            for d in done {
                let _ = d.send(());
            }
        }
    }

    async fn shutdown(&mut self, reason: &str) {
        if self.stop {
            return;
        }
        self.stop = true;
        // First, so that emits waiting for credit fail with `Closed`, not `PeerOffline`.
        self.credits.close();
        self.finish_ready(Err(Error::Connection(reason.to_owned())));
        let ids: Vec<String> = self.peers.keys().cloned().collect();
        for id in ids {
            let acts = self
                .peers
                .get_mut(&id)
                .map(|p| p.neg.hang_up(reason))
                .unwrap_or_default();
            // Only close links here: no signals to a server we are leaving.
            for a in acts {
                if a == Action::CloseLink
                    && let Some(slot) = self.peers.get_mut(&id).and_then(|p| p.rtc.take())
                {
                    self.close_rtc(slot);
                }
            }
            self.remove_peer(&id, reason).await;
        }
        self.streams.close_all(reason);
        for (_, r) in self.reqs.drain() {
            match r.kind {
                ReqKind::User(tx)
                | ReqKind::Join(_, tx)
                | ReqKind::Leave(_, tx)
                | ReqKind::Provide(_, _, tx) => {
                    let _ = tx.send(Err(Error::Closed));
                }
                ReqKind::Subscribe(_, _, tx) => {
                    let _ = tx.send(Err(Error::Closed));
                }
                _ => {}
            }
        }
        self.peer_event(PeerEvent::Closed {
            reason: reason.to_owned(),
        });
    }
}

fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() | 1
}

//! The peer as a state machine: every decision of a `P2p`, and no I/O.
//!
//! [`Core`] never awaits, never reads the clock and never touches a socket. The driver
//! (`crate::driver`) feeds it [`Input`]s with the time, drains its [`Output`]s into the
//! carriers (`crate::transport`), and sleeps until [`Core::poll_timeout`]:
//!
//! ```text
//! core.handle_input(Input::Net(..), now);
//! while let Some(out) = core.poll_output() { /* relay, peer connection, application */ }
//! sleep_until(core.poll_timeout());
//! ```
//!
//! Inside:
//! - a session machine ([`Phase`]): connecting → hello → pairing → ready; lost → resuming
//!   → ready; closed (closing is a linger on top of any of them);
//! - one machine per peer (`peer.rs`): the reliable link, the WebRTC negotiation, the
//!   data channel's liveness and the retry backoff;
//! - one [`Deadlines`] table for every pending request, ack, retry and confirmation;
//! - one routing rule: a peer's frames go on its data channel while it is open, else on
//!   the relay, batched per turn;
//! - streams and services as sub-machines.
pub(crate) mod command;
mod commands;
pub(crate) mod deadline;
mod frames;
pub(crate) mod link;
pub(crate) mod negotiate;
mod peer;
pub(crate) mod reply;
pub(crate) mod services;
mod session;
pub(crate) mod streams;
#[cfg(test)]
mod tests;
mod timers;
mod upgrade;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value as Json;
use socketio_p2p_signaling::Service;
use socketio_p2p_signaling::protocol::{BatchWriter, CallFor, PeerInfo, Request, Signal};

pub(crate) use command::{Command, Reply, TopicSink};
use deadline::Deadlines;
pub(crate) use link::{CHUNK, frames_of};
use peer::Peer;
use services::ServiceTable;
use streams::{StreamParts, StreamTable};

use crate::error::{Error, Result};
use crate::options::P2pOptions;
use crate::payload::{Payload, PeerEvent, Transport};
use crate::stats::CandidatePair;

/// On close, how long the core keeps going to deliver what is already queued.
const LINGER: Duration = Duration::from_secs(2);
/// Relay frames are sent in batches of about this many bytes (one frame may be larger).
const RELAY_BATCH: usize = 64 * 1024;

/// What the server sent, as the relay carrier read it.
#[derive(Debug)]
pub(crate) enum NetIn {
    /// The Socket.IO connection is up (first time, or again after a reconnection).
    Connected,
    /// A `p2p:f` batch.
    Batch(Bytes),
    Response(Json),
    Signal(Json),
    Presence(Json),
    Error(Json),
    Call(Json),
    Topic(Json),
    /// The transport broke; the Socket.IO client reconnects by itself.
    Broken(String),
    /// The server refused the connection (its auth hook said no).
    Refused(String),
    /// The connection closed.
    Closed,
}

/// An operation on one peer connection, for the WebRTC carrier.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RtcOp {
    /// Create the connection and an offer (reported as [`RtcReport::Offer`]).
    Offer,
    /// Create the connection, apply this offer and answer ([`RtcReport::Answer`]).
    Accept(String),
    /// Apply the answer to our offer.
    Answer(String),
    /// Add a remote candidate (a `Signal::Candidate`).
    Candidate(Signal),
    /// Send a frame on the reliable channel (`true`) or the volatile one.
    Send { reliable: bool, frame: Bytes },
    /// Find out which candidates the open channel runs on ([`RtcReport::Path`]).
    Path,
    /// Close the connection.
    Close,
}

/// What a peer connection reports.
#[derive(Debug)]
#[cfg_attr(not(feature = "webrtc"), allow(dead_code))]
pub(crate) enum RtcReport {
    /// Our offer, to send.
    Offer(String),
    /// Our answer, to send.
    Answer(String),
    /// A local candidate, to send (a `Signal::Candidate`).
    Candidate(Signal),
    /// The reliable data channel opened.
    Open,
    /// A frame arrived on a data channel.
    Frame(Bytes),
    /// A volatile frame found no open volatile channel: it goes on the relay.
    Unsent(Bytes),
    /// An operation failed (bad SDP, ...).
    Failed(String),
    /// The connection closed or failed by itself.
    Closed(String),
    /// The candidates the open channel runs on.
    Path(CandidatePair),
}

/// Changes to the send credit the `P2p` handles share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CreditOp {
    AddPeer(String),
    RemovePeer(String),
    Release(String, usize),
    SetRelay(String, bool),
    SetConnected(bool),
    Close,
}

/// An event for the application.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) name: String,
    pub(crate) from: Arc<PeerInfo>,
    pub(crate) payload: Payload,
    pub(crate) transport: Transport,
    /// The sender waits for a reply with this ack id.
    pub(crate) ack_id: Option<u64>,
}

/// Inputs to the core.
pub(crate) enum Input {
    Net(NetIn),
    Command(Command),
    Rtc {
        key: u64,
        report: RtcReport,
    },
    /// The application's queues have room again (see [`Core::set_room`]).
    Room,
    /// Time passed (see [`Core::poll_timeout`]).
    Timeout,
    /// Every `P2p` handle was dropped.
    HandlesGone,
}

/// Outputs of the core, in order.
pub(crate) enum Output {
    /// One `p2p:f` batch for the relay.
    Relay(Bytes),
    /// A request to the server.
    Request(Request),
    /// An operation on the peer connection `key`.
    Rtc {
        key: u64,
        op: RtcOp,
    },
    Event(Delivery),
    PeerEvent(PeerEvent),
    Credit(CreditOp),
    IncomingStream(StreamParts),
    /// Run a call of one of our services; its outcome comes back as `Command::CallDone`.
    RunCall {
        service: Option<Arc<Service>>,
        call: CallFor,
    },
    /// What `P2p::new` returns.
    Ready(Result<PeerInfo>),
    /// ICE servers the server handed out in its welcome (replacing earlier ones).
    IceServers(Vec<socketio_p2p_signaling::protocol::IceServerInfo>),
    /// The core stopped: disconnect from the server.
    Stopped,
}

/// The session with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the Socket.IO connection.
    Connecting,
    /// Our first hello is out.
    Hello,
    /// Registered; waiting for the pair and its echo (socket.io-bridge mode).
    Pairing,
    Ready,
    /// The connection broke after we registered; the client reconnects.
    Lost,
    /// Reconnected; our hello (with the resume token) is out.
    Resuming,
    Closed,
}

/// What a server request is for.
enum ReqKind {
    Hello,
    Pair,
    Signal,
    /// Nobody waits for the answer (logged when it is an error).
    Quiet,
    Provide(String, Arc<Service>, Reply<Json>),
    Subscribe(String, u64, Reply<u64>),
    Join(String, Reply<Json>),
    Leave(String, Reply<Json>),
    /// A page of a room's members, after a `Welcome` (number `welcome`) that listed only
    /// some of them: asked for after `after`.
    Members {
        room: String,
        after: Option<String>,
        welcome: u64,
    },
    User(Reply<Json>),
}

struct PendingAck {
    peer: String,
    reply: Reply<Payload>,
}

/// What a deadline in the table is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Timer {
    Request(u64),
    Ack(u64),
    /// Try the upgrade with this peer again.
    Retry(String),
    /// After a reconnection: forget this peer unless the server lists it again by then.
    Confirm(String),
    /// `P2p::new` gives up.
    Ready,
    /// Give up reconnecting.
    Reconnect,
    /// Stop lingering and shut down.
    Linger,
}

/// The peer's state machine (see the module docs).
pub(crate) struct Core {
    opts: P2pOptions,
    me: PeerInfo,
    phase: Phase,
    /// `Output::Ready` went out.
    announced: bool,
    /// Resume token from the last welcome.
    token: String,
    /// Counts `Welcome`s: member pages asked for before the last one are ignored.
    welcomes: u64,
    /// Rooms we are in (sent again after a reconnection).
    my_rooms: HashSet<String>,
    peers: HashMap<String, Peer>,
    /// Peer connection keys and whose they are.
    rtc_keys: HashMap<u64, String>,
    /// Local candidates of connections whose offer or answer has not gone out yet.
    held_candidates: HashMap<u64, Vec<Signal>>,
    next_key: u64,
    reqs: HashMap<u64, ReqKind>,
    next_rid: u64,
    acks: HashMap<u64, PendingAck>,
    next_ack: u64,
    deadlines: Deadlines<Timer>,
    streams: StreamTable,
    services: ServiceTable,
    /// Relay frames of this turn, sent as one `p2p:f` batch (or a few).
    relay_out: BatchWriter,
    /// Peers whose links may have frames to send.
    dirty: HashSet<String>,
    /// Messages held in all peers' `held` queues.
    held_total: usize,
    /// Room left in the application's event queue.
    app_room: usize,
    /// The peer we paired with (socket.io-bridge mode); its disconnect closes us.
    pair_peer: Option<String>,
    /// Nonce of the echo that completes pairing.
    pair_echo: Option<u64>,
    /// Closing: why, and who waits for the end.
    closing: Option<(String, Vec<Reply<()>>)>,
    /// Every `P2p` handle was dropped.
    handles_gone: bool,
    out: VecDeque<Output>,
    now: Instant,
}

impl Core {
    pub(crate) fn new(opts: P2pOptions, now: Instant) -> Self {
        let mut deadlines = Deadlines::default();
        let pairing = if opts.peer_uid.is_some() {
            opts.pair_timeout
        } else {
            Duration::ZERO
        };
        deadlines.set(Timer::Ready, now + opts.request_timeout + pairing);
        Self {
            me: PeerInfo {
                id: String::new(),
                uid: None,
            },
            phase: Phase::Connecting,
            announced: false,
            token: String::new(),
            welcomes: 0,
            my_rooms: opts.effective_rooms().into_iter().collect(),
            peers: HashMap::new(),
            rtc_keys: HashMap::new(),
            held_candidates: HashMap::new(),
            next_key: 0,
            reqs: HashMap::new(),
            next_rid: 0,
            acks: HashMap::new(),
            next_ack: 0,
            deadlines,
            streams: StreamTable::new(opts.stream_window as u64),
            services: ServiceTable::default(),
            relay_out: BatchWriter::new(),
            dirty: HashSet::new(),
            held_total: 0,
            app_room: opts.events_capacity,
            pair_peer: None,
            pair_echo: None,
            closing: None,
            handles_gone: false,
            out: VecDeque::new(),
            now,
            opts,
        }
    }

    /// Feeds one input.
    pub(crate) fn handle_input(&mut self, input: Input, now: Instant) {
        self.now = now;
        if self.phase == Phase::Closed {
            if let Input::Command(c) = input {
                self.refuse_command(c);
            }
            return;
        }
        match input {
            Input::Net(n) => self.on_net(n),
            Input::Command(c) => self.on_command(c),
            Input::Rtc { key, report } => self.on_rtc(key, report),
            Input::Room => self.release_held(),
            Input::Timeout => self.on_timeout(),
            Input::HandlesGone => {
                self.handles_gone = true;
                self.begin_close("every P2p handle was dropped", None);
            }
        }
    }

    /// The next output. Frames queued on links go out (batched) once the outputs queued
    /// before them are taken.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        if self.out.is_empty() && self.phase != Phase::Closed {
            self.flush();
            self.flush_relay();
            self.check_closing();
        }
        self.out.pop_front()
    }

    /// Tells the core how much room the application's queues have: events, and incoming
    /// streams waiting to be accepted.
    pub(crate) fn set_room(&mut self, events: usize, streams: usize) {
        self.app_room = events;
        self.streams.incoming_room = streams;
    }

    /// Events wait for room in the application's queue.
    pub(crate) fn has_held(&self) -> bool {
        self.held_total > 0
    }

    /// The core stopped (after [`Output::Stopped`]).
    pub(crate) fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Still reading commands (false once every handle is gone).
    pub(crate) fn wants_commands(&self) -> bool {
        !self.handles_gone
    }

    // ---------- small helpers shared by the submodules ----------

    fn emit(&mut self, o: Output) {
        self.out.push_back(o);
    }

    fn peer_event(&mut self, ev: PeerEvent) {
        self.emit(Output::PeerEvent(ev));
    }

    fn credit(&mut self, op: CreditOp) {
        self.emit(Output::Credit(op));
    }

    fn registered(&self) -> bool {
        matches!(
            self.phase,
            Phase::Pairing | Phase::Ready | Phase::Lost | Phase::Resuming
        )
    }

    fn connected(&self) -> bool {
        !matches!(self.phase, Phase::Connecting | Phase::Lost | Phase::Closed)
    }

    fn paired_with(&self, id: &str) -> bool {
        self.pair_peer.as_deref() == Some(id)
    }

    /// A command that arrived after the core stopped.
    fn refuse_command(&mut self, c: Command) {
        match c {
            Command::Emit {
                targets, frames, ..
            } => {
                for t in targets {
                    self.credit(CreditOp::Release(t, frames));
                }
            }
            Command::EmitAck { reply, .. } => reply(Err(Error::Closed)),
            Command::Request { reply, .. }
            | Command::Provide { reply, .. }
            | Command::Unprovide { reply, .. }
            | Command::Call { reply, .. } => reply(Err(Error::Closed)),
            Command::Upgrade { done: Some(d), .. } => d(Err(Error::Closed)),
            Command::Transport { reply, .. } => reply(Err(Error::Closed)),
            Command::Peers { reply } => reply(Ok(Vec::new())),
            Command::LiveConnections { reply } => reply(Ok(0)),
            Command::Stats { reply, .. } => reply(Err(Error::Closed)),
            Command::Close { done } => done(Ok(())),
            Command::Downgrade { done, .. } => done(Err(Error::Closed)),
            Command::Subscribe { reply, .. } => reply(Err(Error::Closed)),
            Command::Stream(streams::StreamCmd::Open { reply, .. }) => reply(Err(Error::Closed)),
            Command::Stream(streams::StreamCmd::Count(reply)) => reply(Ok(0)),
            _ => {}
        }
    }
}

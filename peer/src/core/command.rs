//! What the application asks of the core (through `P2p` handles), and how answers go back.
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use socketio_p2p_signaling::Service;
use socketio_p2p_signaling::protocol::{CallOutcome, Op, PeerInfo, WirePayload};

use super::streams::StreamCmd;
use crate::payload::{Payload, Transport};

pub(crate) use super::reply::{Reply, TopicSink};

/// Commands from `P2p` handles.
pub(crate) enum Command {
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
        reply: Reply<Payload>,
    },
    /// The application's answer to an event that asked for one.
    Reply {
        peer: String,
        ack_id: u64,
        result: std::result::Result<Payload, (String, String)>,
    },
    /// A request to the server (join, leave, room members, publish, ...).
    Request { op: Op, reply: Reply<Json> },
    /// Upgrade one peer (and report when done) or every peer.
    Upgrade {
        peer: Option<String>,
        done: Option<Reply<()>>,
    },
    /// Back to the relay with this peer.
    Downgrade { peer: String, done: Reply<()> },
    /// Test hook: the data channel dies without a word to the peer.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    Kill { peer: String },
    /// Which transport carries messages to this peer.
    Transport {
        peer: String,
        reply: Reply<Transport>,
    },
    /// Counters and state of one peer.
    Stats {
        peer: String,
        reply: Reply<crate::stats::PeerStats>,
    },
    /// The peers we know, sorted by id.
    Peers { reply: Reply<Vec<PeerInfo>> },
    /// How many peer connections this `P2p` holds (test hook).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    LiveConnections { reply: Reply<usize> },
    /// Close, delivering what is queued first.
    Close { done: Reply<()> },
    /// Provide a service under this name.
    Provide {
        name: String,
        service: Arc<Service>,
        reply: Reply<Json>,
    },
    /// Stop providing a service.
    Unprovide { name: String, reply: Reply<Json> },
    /// A service call: a request whose deadline is the caller's timeout.
    Call {
        op: Op,
        timeout: Duration,
        reply: Reply<Json>,
    },
    /// A call of one of our services finished: send the outcome to the server.
    CallDone { cid: u64, outcome: CallOutcome },
    /// Subscribe to a topic; the reply is the subscription's id.
    Subscribe {
        topic: String,
        sink: TopicSink,
        reply: Reply<u64>,
    },
    /// A subscription was dropped.
    Unsubscribe { topic: String, id: u64 },
    /// A stream handle's command.
    Stream(StreamCmd),
}

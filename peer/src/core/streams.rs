//! The streams sub-machine: every byte stream of one `P2p`, owned by the core. Pure
//! bookkeeping: it returns the messages to push on the peers' links, and hands the
//! application's side of a stream over as [`StreamParts`] (the handles live in
//! `crate::stream`).
//!
//! Stream messages ride the peer's reliable link (so they are ordered, lossless and survive
//! transport switches) but are taken off the link as soon as they arrive: each stream has
//! its own credit-based flow control instead. The receiver grants `window` bytes when the
//! stream opens and grants more as the application reads, so one stream's slow reader
//! never holds up another stream or the events, and each side buffers at most one window
//! per stream.
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use socketio_p2p_signaling::protocol::{Msg, StreamOp};

use super::link::CHUNK;
use super::reply::Reply;
use crate::error::Error;

/// How many incoming streams may wait for [`crate::P2p::accept_stream`] before new ones
/// are refused with `Busy`.
pub(crate) const INCOMING_QUEUE: usize = 64;

/// Identifies a stream on this side: the peer, who opened it and the opener's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) peer: String,
    /// We opened it.
    pub(crate) mine: bool,
    pub(crate) id: u64,
}

/// Commands from stream handles to the core.
pub(crate) enum StreamCmd {
    Open {
        peer: String,
        name: String,
        reply: Reply<StreamParts>,
    },
    Accept(Key),
    Refuse(Key, String),
    Write(Key, Bytes),
    Credit(Key, u64),
    Fin(Key),
    /// The handle was dropped: reset the stream unless both directions had ended.
    Dropped(Key),
    /// How many streams the table holds.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    Count(Reply<usize>),
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) recv: VecDeque<Bytes>,
    pub(crate) recv_bytes: usize,
    /// The peer half-closed: reads return EOF once `recv` is drained.
    pub(crate) eof: bool,
    /// Bytes read since the last credit sent to the peer.
    pub(crate) unreported: u64,
    pub(crate) read_waker: Option<Waker>,
    /// Bytes we may still send.
    pub(crate) credit: u64,
    pub(crate) write_waker: Option<Waker>,
    /// We half-closed (shutdown).
    pub(crate) fin_sent: bool,
    /// The stream was reset or its peer went away.
    pub(crate) error: Option<(io::ErrorKind, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct Shared(Mutex<State>);

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, kind: io::ErrorKind, why: String) {
        let mut s = self.lock();
        if s.error.is_none() {
            s.error = Some((kind, why));
        }
        wake(&mut s);
    }
}

pub(crate) fn wake(s: &mut State) {
    if let Some(w) = s.read_waker.take() {
        w.wake();
    }
    if let Some(w) = s.write_waker.take() {
        w.wake();
    }
}

/// What a stream handle is made of: the core keeps the entry, the handle gets this.
#[derive(Debug)]
pub(crate) struct StreamParts {
    pub(crate) key: Key,
    pub(crate) name: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) window: u64,
}

struct Entry {
    shared: Arc<Shared>,
    /// We opened it and wait for the answer.
    opening: Option<(Reply<StreamParts>, String, Instant)>,
    /// Bytes the peer may still send us (we granted them).
    allowed: u64,
    fin_recv: bool,
    fin_sent: bool,
}

/// Messages to push on a peer's link.
pub(crate) type Out = Vec<(String, Msg)>;

/// All streams of one `P2p`, owned by its actor. Pure bookkeeping: it returns the messages
/// to send.
pub(crate) struct StreamTable {
    entries: HashMap<Key, Entry>,
    next_id: u64,
    window: u64,
    /// Room left in the application's queue of incoming streams (set by the driver).
    pub(crate) incoming_room: usize,
    /// Incoming streams for the application, taken by the core as outputs.
    pub(crate) incoming: Vec<StreamParts>,
}

fn msg(key: &Key, op: StreamOp) -> (String, Msg) {
    (
        key.peer.clone(),
        Msg::Stream {
            id: key.id,
            opener: key.mine,
            op,
        },
    )
}

fn reset(key: &Key, code: &str, message: &str) -> (String, Msg) {
    msg(
        key,
        StreamOp::Reset {
            code: code.into(),
            message: message.into(),
        },
    )
}

impl StreamTable {
    pub(crate) fn new(window: u64) -> Self {
        Self {
            entries: HashMap::new(),
            next_id: 0,
            window: window.max(CHUNK as u64),
            incoming_room: INCOMING_QUEUE,
            incoming: Vec::new(),
        }
    }

    fn parts(&self, key: Key, name: String, shared: Arc<Shared>) -> StreamParts {
        StreamParts {
            key,
            name,
            shared,
            window: self.window,
        }
    }

    fn new_entry(&self, shared: Arc<Shared>) -> Entry {
        Entry {
            shared,
            opening: None,
            allowed: self.window,
            fin_recv: false,
            fin_sent: false,
        }
    }

    /// Opens a stream to a known peer; the reply comes when the peer answers or `deadline`.
    pub(crate) fn open(
        &mut self,
        peer: String,
        name: String,
        reply: Reply<StreamParts>,
        deadline: Instant,
    ) -> Out {
        self.next_id += 1;
        let key = Key {
            peer,
            mine: true,
            id: self.next_id,
        };
        let shared = Arc::new(Shared::default());
        let mut e = self.new_entry(shared);
        e.opening = Some((reply, name.clone(), deadline));
        self.entries.insert(key.clone(), e);
        vec![
            msg(&key, StreamOp::Open { name }),
            msg(&key, StreamOp::Credit(self.window)),
        ]
    }

    /// A stream message from `from`.
    pub(crate) fn on_msg(&mut self, from: &str, id: u64, opener: bool, op: StreamOp) -> Out {
        let key = Key {
            peer: from.to_owned(),
            mine: !opener,
            id,
        };
        if let StreamOp::Open { name } = op {
            if !opener || self.entries.contains_key(&key) {
                return vec![reset(&key, "Protocol", "duplicate stream id")];
            }
            let shared = Arc::new(Shared::default());
            if self.incoming_room == 0 {
                return vec![msg(
                    &key,
                    StreamOp::Refuse {
                        code: "Busy".into(),
                        message: "too many streams waiting to be accepted".into(),
                    },
                )];
            }
            self.incoming_room -= 1;
            let parts = self.parts(key.clone(), name, shared.clone());
            self.entries.insert(key, self.new_entry(shared));
            self.incoming.push(parts);
            return Vec::new();
        }
        let Some(e) = self.entries.get_mut(&key) else {
            return match op {
                StreamOp::Reset { .. } | StreamOp::Refuse { .. } => Vec::new(),
                _ => vec![reset(&key, "UnknownStream", "no such stream")],
            };
        };
        match op {
            StreamOp::Open { .. } => Vec::new(),
            StreamOp::Accept => {
                // If the opener stopped waiting, the handle made from these parts is
                // dropped at once, and its drop notice resets the stream.
                if let Some((reply, name, _)) = e.opening.take() {
                    let parts = StreamParts {
                        key: key.clone(),
                        name,
                        shared: e.shared.clone(),
                        window: self.window,
                    };
                    reply(Ok(parts));
                }
                Vec::new()
            }
            StreamOp::Refuse { code, message } => {
                if let Some((reply, _, _)) = e.opening.take() {
                    reply(Err(Error::StreamRefused { code, message }));
                }
                self.entries.remove(&key);
                Vec::new()
            }
            StreamOp::Data(data) => {
                let n = data.len() as u64;
                if n > e.allowed {
                    e.shared.fail(
                        io::ErrorKind::InvalidData,
                        "the peer sent more than its window".into(),
                    );
                    self.forget(&key);
                    return vec![reset(&key, "FlowControl", "sent more than the window")];
                }
                e.allowed -= n;
                if !data.is_empty() {
                    let mut s = e.shared.lock();
                    s.recv_bytes += data.len();
                    s.recv.push_back(data);
                    if let Some(w) = s.read_waker.take() {
                        w.wake();
                    }
                }
                Vec::new()
            }
            StreamOp::Credit(n) => {
                let mut s = e.shared.lock();
                s.credit = s.credit.saturating_add(n);
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
                Vec::new()
            }
            StreamOp::Fin => {
                e.fin_recv = true;
                {
                    let mut s = e.shared.lock();
                    s.eof = true;
                    wake(&mut s);
                }
                Vec::new()
            }
            StreamOp::Reset { code, message } => {
                if let Some((reply, _, _)) = e.opening.take() {
                    reply(Err(Error::StreamRefused { code, message }));
                } else {
                    e.shared.fail(
                        io::ErrorKind::ConnectionReset,
                        format!("stream reset by the peer ({code}): {message}"),
                    );
                }
                self.entries.remove(&key);
                Vec::new()
            }
        }
    }

    fn forget(&mut self, key: &Key) {
        self.entries.remove(key);
    }

    /// A command from a handle.
    pub(crate) fn on_cmd(&mut self, c: StreamCmd) -> Out {
        match c {
            StreamCmd::Open { .. } => Vec::new(), // handled by the core (it checks the peer)
            StreamCmd::Count(reply) => {
                reply(Ok(self.entries.len()));
                Vec::new()
            }
            StreamCmd::Accept(key) => {
                if self.entries.contains_key(&key) {
                    vec![
                        msg(&key, StreamOp::Accept),
                        msg(&key, StreamOp::Credit(self.window)),
                    ]
                } else {
                    Vec::new()
                }
            }
            StreamCmd::Refuse(key, reason) => {
                if self.entries.remove(&key).is_some() {
                    vec![msg(
                        &key,
                        StreamOp::Refuse {
                            code: "Refused".into(),
                            message: reason,
                        },
                    )]
                } else {
                    Vec::new()
                }
            }
            StreamCmd::Write(key, data) => match self.entries.get(&key) {
                Some(e) if !e.fin_sent => vec![msg(&key, StreamOp::Data(data))],
                _ => Vec::new(),
            },
            StreamCmd::Credit(key, n) => match self.entries.get_mut(&key) {
                Some(e) if !e.fin_recv => {
                    e.allowed += n;
                    vec![msg(&key, StreamOp::Credit(n))]
                }
                _ => Vec::new(),
            },
            StreamCmd::Fin(key) => match self.entries.get_mut(&key) {
                Some(e) if !e.fin_sent => {
                    e.fin_sent = true;
                    vec![msg(&key, StreamOp::Fin)]
                }
                _ => Vec::new(),
            },
            StreamCmd::Dropped(key) => {
                let Some(e) = self.entries.get_mut(&key) else {
                    return Vec::new();
                };
                if e.fin_sent && e.fin_recv {
                    self.entries.remove(&key);
                    return Vec::new();
                }
                e.shared
                    .fail(io::ErrorKind::ConnectionAborted, "stream dropped".into());
                self.entries.remove(&key);
                vec![reset(
                    &key,
                    "Dropped",
                    "the stream was dropped before it ended",
                )]
            }
        }
    }

    /// The earliest deadline of an open waiting for its answer.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| e.opening.as_ref().map(|(_, _, d)| *d))
            .min()
    }

    /// Opens that got no answer by their deadline.
    pub(crate) fn on_tick(&mut self, now: Instant) -> Out {
        let late: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| e.opening.as_ref().is_some_and(|(_, _, d)| *d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in late {
            if let Some(mut e) = self.entries.remove(&key)
                && let Some((reply, _, _)) = e.opening.take()
            {
                reply(Err(Error::Timeout(format!(
                    "{} did not answer the stream request",
                    key.peer
                ))));
                out.push(reset(&key, "Timeout", "no answer to the stream request"));
            }
        }
        out
    }

    /// The peer is gone: its streams fail and are forgotten.
    pub(crate) fn peer_gone(&mut self, peer: &str, why: &str) {
        let keys: Vec<Key> = self
            .entries
            .keys()
            .filter(|k| k.peer == peer)
            .cloned()
            .collect();
        for key in keys {
            if let Some(mut e) = self.entries.remove(&key) {
                if let Some((reply, _, _)) = e.opening.take() {
                    reply(Err(Error::PeerOffline(format!("{peer}: {why}"))));
                }
                e.shared.fail(
                    io::ErrorKind::ConnectionReset,
                    format!("peer {peer} is gone: {why}"),
                );
            }
        }
    }

    /// Every stream fails (the `P2p` closes).
    pub(crate) fn close_all(&mut self, why: &str) {
        let peers: Vec<String> = self.entries.keys().map(|k| k.peer.clone()).collect();
        for p in peers {
            self.peer_gone(&p, why);
        }
    }
}

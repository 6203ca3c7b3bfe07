//! The sockets of this node: how the state sends to them, and the extractors that hand the
//! `p2p:*` events to the signaling server in each socket's receive order.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::Value as Json;
use serde_json::value::RawValue;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide_core::Value;

use super::P2pSignaling;
use super::outbox::Outgoing;
use super::state::{EmitFail, PeerSocket};
use crate::protocol::{FrameEncoding, batch_from_base64, batch_to_base64, events};

/// A socket of this node, with the batch encoding its client asked for in `hello`.
pub(super) struct LocalSocket<A: Adapter> {
    socket: SocketRef<A>,
    base64: AtomicBool,
    /// Control messages the state queued for this client (see [`SendQueue`]).
    queue: Arc<SendQueue>,
    /// Publications per topic this client missed since its last one (its buffer was full).
    missed: Arc<Mutex<HashMap<String, u64>>>,
}

/// The control messages for one client, in the order the state decided them.
///
/// The state queues them under its lock ([`PeerSocket::enqueue`]) and they are sent after
/// it is released. Whoever sends (the outbox after the lock, the presence timer, a frame
/// batch or an error for this client from another thread) holds the queue while it emits,
/// so nothing overtakes what was queued before it: a member page computed before a peer
/// left goes out before that peer's `disconnected`, even when the leave is handled on
/// another thread and sent first.
#[derive(Default)]
struct SendQueue {
    /// The client asked for presence batches (`batch_presence` in `hello`).
    batch_presence: AtomicBool,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    msgs: Vec<Outgoing>,
    /// How many of `msgs` are not presences: presences alone may wait for company.
    others: usize,
}

/// Most presences in one batch, so that no message grows big (socket buffers keep the size
/// of the biggest message they carried).
const PRESENCE_BATCH: usize = 64;

/// How long a presence may wait for others to go out with it (anything else sent to the
/// client sends it first).
const PRESENCE_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

impl<A: Adapter> LocalSocket<A> {
    /// Another handle on the same client, sharing its queue.
    fn twin(&self) -> Self {
        LocalSocket {
            socket: self.socket.clone(),
            base64: AtomicBool::new(self.base64.load(Ordering::Relaxed)),
            queue: self.queue.clone(),
            missed: self.missed.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.queue.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends everything queued, and keeps the queue locked for the caller's own emit.
    fn drained(&self) -> MutexGuard<'_, Held> {
        let mut held = self.lock();
        if !held.msgs.is_empty() {
            held.others = 0;
            let msgs = std::mem::take(&mut held.msgs);
            self.emit_all(msgs);
        }
        held
    }

    /// Emits `msgs` in order; runs of presences go as batches when the client asked.
    fn emit_all(&self, msgs: Vec<Outgoing>) {
        let mut run: Vec<Arc<str>> = Vec::new();
        for m in msgs {
            let (event, sent) = match m {
                Outgoing::Presence(text) => {
                    run.push(text);
                    continue;
                }
                Outgoing::Json(event, data) => {
                    self.emit_presences(&mut run);
                    (
                        event,
                        self.socket.emit(event, &data).map_err(map_send_error),
                    )
                }
                Outgoing::Raw(event, data) => {
                    self.emit_presences(&mut run);
                    (
                        event,
                        self.socket.emit(event, &data).map_err(map_send_error),
                    )
                }
                Outgoing::Publication(topic, data) => {
                    self.emit_presences(&mut run);
                    (events::TOPIC, self.publish_now(&topic, &data))
                }
            };
            if let Err(e) = sent {
                tracing::debug!(?e, event, "could not deliver control message");
            }
        }
        self.emit_presences(&mut run);
    }

    /// Emits a run of presences: batches of at most `PRESENCE_BATCH` for a client that
    /// asked for them, one event each otherwise.
    fn emit_presences(&self, run: &mut Vec<Arc<str>>) {
        if run.is_empty() {
            return;
        }
        let size = if self.queue.batch_presence.load(Ordering::Relaxed) {
            PRESENCE_BATCH
        } else {
            1
        };
        for chunk in run.chunks(size) {
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
            let Ok(raw) = RawValue::from_string(text) else {
                continue;
            };
            if let Err(e) = self.socket.emit(events::PRESENCE, &raw) {
                tracing::debug!(?e, "could not deliver presence");
            }
        }
        run.clear();
    }

    /// Emits one publication, with the count of those this client missed before it.
    fn publish_now(&self, topic: &str, data: &Json) -> Result<(), EmitFail> {
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        let before = missed.get(topic).copied().unwrap_or(0);
        let sent = if before == 0 {
            self.socket.emit(events::TOPIC, data)
        } else {
            let mut d = data.clone();
            d["missed"] = Json::from(before);
            self.socket.emit(events::TOPIC, &d)
        }
        .map_err(map_send_error);
        match sent {
            Ok(()) => {
                missed.remove(topic);
            }
            Err(_) => {
                missed.insert(topic.to_owned(), before + 1);
            }
        }
        sent
    }
}

impl<A: Adapter> PeerSocket for LocalSocket<A> {
    fn disconnect(&self) {
        let _ = self.socket.clone().disconnect();
    }
    fn enqueue(&self, msg: Outgoing) -> Result<(), Outgoing> {
        let presence = matches!(msg, Outgoing::Presence(_));
        let mut held = self.lock();
        let first = held.msgs.is_empty();
        held.others += usize::from(!presence);
        held.msgs.push(msg);
        drop(held);
        if first && presence && self.queue.batch_presence.load(Ordering::Relaxed) {
            // Send the queue once the current burst of requests had a chance to add to it
            // (a burst of joins to one room: each member gets a few batches, not one
            // event per joiner).
            let me = self.twin();
            tokio::spawn(async move {
                tokio::time::sleep(PRESENCE_DELAY).await;
                drop(me.drained());
            });
        }
        Ok(())
    }
    fn send_queued(&self) {
        let mut held = self.lock();
        if held.others == 0 && self.queue.batch_presence.load(Ordering::Relaxed) {
            // Presences alone: the timer sends them with whatever joins them meanwhile.
            return;
        }
        held.others = 0;
        let msgs = std::mem::take(&mut held.msgs);
        self.emit_all(msgs);
    }
    fn emit_publication(&self, topic: &str, data: &Json) -> Result<(), EmitFail> {
        let _held = self.drained();
        self.publish_now(topic, data)
    }
    fn emit_presence(&self, data: Arc<str>) -> Result<(), EmitFail> {
        let _ = self.enqueue(Outgoing::Presence(data));
        self.send_queued();
        Ok(())
    }
    fn set_batch_presence(&self, on: bool) {
        self.queue.batch_presence.store(on, Ordering::Relaxed);
    }
    fn emit_frames(&self, batch: Bytes, _frames: usize) -> Result<(), EmitFail> {
        let _held = self.drained();
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
        let _held = self.drained();
        self.socket.emit(event, data).map_err(map_send_error)
    }
    fn emit_raw(&self, event: &'static str, data: &RawValue) -> Result<(), EmitFail> {
        let _held = self.drained();
        self.socket.emit(event, data).map_err(map_send_error)
    }
    fn detached(&self) -> Option<Arc<dyn PeerSocket>> {
        Some(Arc::new(self.twin()))
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

pub(super) fn arc_of<A: Adapter>(s: &SocketRef<A>) -> Arc<dyn PeerSocket> {
    Arc::new(LocalSocket {
        socket: s.clone(),
        base64: AtomicBool::new(false),
        queue: Arc::default(),
        missed: Arc::default(),
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
pub(super) struct RequestDone;
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
pub(super) struct FrameDone;
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
                queue: Arc::default(),
                missed: Arc::default(),
            };
            sig.relay_batch(&me, &s.id.to_string(), data, true);
        }
        Ok(FrameDone)
    }
}

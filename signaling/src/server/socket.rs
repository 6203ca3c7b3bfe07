//! The sockets of this node: how the state sends to them, and the extractors that hand the
//! `p2p:*` events to the signaling server in each socket's receive order.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value as Json;
use serde_json::value::RawValue;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide_core::Value;

use super::P2pSignaling;
use super::state::{EmitFail, PeerSocket};
use crate::protocol::{FrameEncoding, batch_from_base64, batch_to_base64, events};

/// A socket of this node, with the batch encoding its client asked for in `hello`.
pub(super) struct LocalSocket<A: Adapter> {
    socket: SocketRef<A>,
    base64: AtomicBool,
    /// Presence waiting to go out as one batch, when the client asked for batches.
    presence: Option<Arc<PresenceQueue>>,
    /// Publications per topic this client missed since its last one (its buffer was full).
    missed: Arc<Mutex<HashMap<String, u64>>>,
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

/// How long a presence may wait for others to go out with it (anything else sent to the
/// client sends it first).
const PRESENCE_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

impl PresenceQueue {
    /// Sends what is queued, in batches of at most `PRESENCE_BATCH`. The queue stays locked
    /// until they are handed to the socket: an emit on another thread (the delayed flush,
    /// or a frame for this client) waits for them, so nothing overtakes a presence.
    fn flush<A: Adapter>(&self, socket: &SocketRef<A>) -> Result<(), EmitFail> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let queued = std::mem::take(&mut *queue);
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
            let Ok(raw) = RawValue::from_string(text) else {
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
    fn disconnect(&self) {
        let _ = self.socket.clone().disconnect();
    }
    fn emit_publication(&self, topic: &str, data: &Json) -> Result<(), EmitFail> {
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        let before = missed.get(topic).copied().unwrap_or(0);
        let sent = if before == 0 {
            self.emit_json(events::TOPIC, data)
        } else {
            let mut d = data.clone();
            d["missed"] = Json::from(before);
            self.emit_json(events::TOPIC, &d)
        };
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
    fn emit_presence(&self, data: Arc<str>) -> Result<(), EmitFail> {
        let Some(q) = self
            .presence
            .as_ref()
            .filter(|q| q.on.load(Ordering::Relaxed))
        else {
            return match RawValue::from_string(data.to_string()) {
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
            // Send the queue once the current burst of requests had a chance to add to it
            // (a burst of joins to one room: each member gets a few batches, not one
            // event per joiner).
            let (q, socket) = (q.clone(), self.socket.clone());
            tokio::spawn(async move {
                tokio::time::sleep(PRESENCE_DELAY).await;
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
    fn emit_raw(&self, event: &'static str, data: &RawValue) -> Result<(), EmitFail> {
        self.flush_presence();
        self.socket.emit(event, data).map_err(map_send_error)
    }
    fn detached(&self) -> Option<Arc<dyn PeerSocket>> {
        Some(Arc::new(LocalSocket {
            socket: self.socket.clone(),
            base64: AtomicBool::new(self.base64.load(Ordering::Relaxed)),
            presence: self.presence.clone(),
            missed: self.missed.clone(),
        }))
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
        presence: Some(Arc::default()),
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
                presence: None,
                missed: Arc::default(),
            };
            sig.relay_batch(&me, &s.id.to_string(), data, true);
        }
        Ok(FrameDone)
    }
}

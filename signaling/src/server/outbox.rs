//! Control messages collected under the state lock and sent after it, and the JSON helpers
//! that build them.
use std::sync::Arc;

use serde_json::Value as Json;

use super::state::PeerSocket;
use crate::protocol::{ErrorBody, ErrorCode, ErrorMsg, Presence, Response, events};

/// Outgoing messages collected under the lock and sent after it.
#[derive(Default)]
pub(super) struct Outbox {
    /// For sockets that do not queue (away peers, other nodes): sent at `flush`.
    msgs: Vec<(Arc<dyn PeerSocket>, Outgoing)>,
    /// Sockets that queued something (see [`PeerSocket::enqueue`]), to send at `flush`.
    queued: Vec<Arc<dyn PeerSocket>>,
}

/// One outgoing control message.
pub(crate) enum Outgoing {
    Json(&'static str, Json),
    /// A presence, serialized once for all its recipients.
    Presence(Arc<str>),
    /// A publication of a topic.
    Publication(Arc<str>, Json),
    /// An event whose argument is already serialized.
    Raw(&'static str, Box<serde_json::value::RawValue>),
}

/// A presence, serialized once for every recipient.
pub(super) fn presence_text(p: &Presence) -> Arc<str> {
    serde_json::to_string(p).unwrap_or_default().into()
}

impl Outbox {
    pub(super) fn push(&mut self, to: &Arc<dyn PeerSocket>, event: &'static str, data: Json) {
        let msg = if event == events::PRESENCE {
            Outgoing::Presence(data.to_string().into())
        } else {
            Outgoing::Json(event, data)
        };
        self.add(to.clone(), msg);
    }
    /// Queues `msg` on `to` now (the order the state decided it in), or keeps it for
    /// `flush` when `to` does not queue.
    fn add(&mut self, to: Arc<dyn PeerSocket>, msg: Outgoing) {
        match to.enqueue(msg) {
            Ok(()) => {
                let same = self
                    .queued
                    .last()
                    .is_some_and(|l| std::ptr::addr_eq(Arc::as_ptr(l), Arc::as_ptr(&to)));
                if !same {
                    self.queued.push(to);
                }
            }
            Err(msg) => self.msgs.push((to, msg)),
        }
    }
    /// Queues `text` (serialized JSON) for `to` on `event`; dropped if it is not JSON.
    pub(super) fn push_raw(&mut self, to: &Arc<dyn PeerSocket>, event: &'static str, text: String) {
        match serde_json::value::RawValue::from_string(text) {
            Ok(raw) => self.add(to.clone(), Outgoing::Raw(event, raw)),
            Err(e) => tracing::warn!(%e, event, "not sent: bad JSON"),
        }
    }
    pub(super) fn publication(&mut self, to: Arc<dyn PeerSocket>, topic: &Arc<str>, data: Json) {
        self.add(to, Outgoing::Publication(topic.clone(), data));
    }
    pub(super) fn presence(&mut self, to: Arc<dyn PeerSocket>, text: &Arc<str>) {
        self.add(to, Outgoing::Presence(text.clone()));
    }
    pub(super) fn flush(self) {
        for socket in self.queued {
            socket.send_queued();
        }
        for (socket, msg) in self.msgs {
            let (event, sent) = match msg {
                Outgoing::Presence(text) => (events::PRESENCE, socket.emit_presence(text)),
                Outgoing::Json(event, data) => (event, socket.emit_json(event, &data)),
                Outgoing::Raw(event, data) => (event, socket.emit_raw(event, &data)),
                Outgoing::Publication(topic, data) => {
                    (events::TOPIC, socket.emit_publication(&topic, &data))
                }
            };
            if let Err(e) = sent {
                tracing::debug!(?e, event, "could not deliver control message");
            }
        }
    }
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

pub(super) fn error_response(rid: u64, code: ErrorCode, message: impl Into<String>) -> Json {
    to_json(&Response {
        rid,
        ok: None,
        error: Some(ErrorBody {
            code,
            message: message.into(),
        }),
    })
}

pub(super) fn error_event(code: ErrorCode, message: impl Into<String>, event: &str) -> ErrorMsg {
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

//! A peer whose connection broke keeps its place for `resume_grace`; what the server has
//! for it meanwhile (signals, presence, call results, publications) waits in a bounded
//! queue and goes out when it comes back, after its welcome. What did not fit is counted,
//! and the peer is told (`Dropped`) instead of losing it silently.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value as Json;

use super::outbox::{Outbox, error_event};
use super::state::{EmitFail, PeerSocket};
use crate::protocol::{ErrorCode, events};

/// Control messages held for one away peer.
pub(super) struct AwaySocket {
    cap: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    msgs: VecDeque<Msg>,
    dropped: u64,
}

enum Msg {
    Json(&'static str, Json),
    Presence(Arc<str>),
    Publication(String, Json),
}

impl AwaySocket {
    pub(super) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            held: Mutex::default(),
        })
    }

    fn hold(&self, m: Msg) -> Result<(), EmitFail> {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if h.msgs.len() >= self.cap {
            h.dropped += 1;
            return Err(EmitFail::Full);
        }
        h.msgs.push_back(m);
        Ok(())
    }

    /// Queues what was held for `to` (the peer's new socket), in order, and a `Dropped`
    /// error if some did not fit.
    pub(super) fn hand_over(&self, to: &Arc<dyn PeerSocket>, out: &mut Outbox) {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        for m in held.msgs {
            match m {
                Msg::Json(event, data) => out.push(to, event, data),
                Msg::Presence(text) => out.presence(to.clone(), &text),
                Msg::Publication(topic, data) => out.publication(to.clone(), &topic.into(), data),
            }
        }
        if held.dropped > 0 {
            let msg = error_event(
                ErrorCode::Dropped,
                format!(
                    "{} messages for you (signals, presence, results) were dropped while you were away",
                    held.dropped
                ),
                events::REQUEST,
            );
            out.push(to, events::ERROR, super::outbox::to_json(&msg));
        }
    }
}

impl PeerSocket for AwaySocket {
    fn emit_frames(&self, _batch: Bytes, _frames: usize) -> Result<(), EmitFail> {
        // Frames are not held: the sender's link keeps them and sends them again.
        Err(EmitFail::Closed)
    }
    fn emit_json(&self, event: &'static str, data: &Json) -> Result<(), EmitFail> {
        self.hold(Msg::Json(event, data.clone()))
    }
    fn emit_presence(&self, data: Arc<str>) -> Result<(), EmitFail> {
        self.hold(Msg::Presence(data))
    }
    fn emit_publication(&self, topic: &str, data: &Json) -> Result<(), EmitFail> {
        self.hold(Msg::Publication(topic.to_owned(), data.clone()))
    }
    fn away(&self) -> Option<&AwaySocket> {
        Some(self)
    }
}

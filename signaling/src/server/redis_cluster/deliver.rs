//! Frames, signals and calls that other nodes send to our peers.
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value as Json;

use super::link::{Link, RELAYED_RESULT};
use crate::protocol::{
    Body, CallFor, CallOutcome, ErrorBody, ErrorCode, ErrorMsg, Frame, events, split_batch,
};
use crate::server::P2pSignaling;
use crate::server::book::InFlight;
use crate::server::outbox::to_json;
use crate::server::services::{MAX_CALL_TIMEOUT, answer};
use crate::server::state::{EmitFail, PeerSocket};

impl P2pSignaling {
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
    pub(super) fn deliver_frame(&self, link: &Link, node: &str, to: &str, data: &[u8]) {
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
    pub(super) fn deliver_event(&self, node: &str, to: &str, rest: &[u8]) {
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

    /// Another node relays a call to our peer `to`: it gets it under a call id of ours.
    fn relayed_call(&self, node: &str, to: &str, data: Json) {
        let Ok(mut call) = serde_json::from_value::<CallFor>(data) else {
            return;
        };
        let sock = {
            let mut st = self.lock();
            let Some(sock) = st.conns.get(to).map(|c| c.socket.clone()) else {
                return;
            };
            st.services.next_cid += 1;
            let cid = st.services.next_cid;
            st.services.calls.insert(
                cid,
                InFlight {
                    caller: call.from.id.clone(),
                    rid: 0,
                    provider: to.to_owned(),
                    service: call.service.clone(),
                    relay: Some((node.to_owned(), call.cid)),
                },
            );
            call.cid = cid;
            // The caller's node times the call out; forget it here too, eventually.
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MAX_CALL_TIMEOUT).await;
                this.lock().services.calls.remove(&cid);
            });
            sock
        };
        let _ = sock.emit_json(events::CALL, &to_json(&call));
    }

    /// The provider (a peer of `node`) answered a call of one of our peers.
    fn relayed_result(&self, node: &str, data: Json) {
        let Some(cid) = data.get("cid").and_then(Json::as_u64) else {
            return;
        };
        let Some(outcome) = data
            .get("outcome")
            .and_then(|o| serde_json::from_value::<CallOutcome>(o.clone()).ok())
        else {
            return;
        };
        let target = {
            let mut st = self.lock();
            let from_there = st
                .services
                .calls
                .get(&cid)
                .is_some_and(|c| st.remote.get(&c.provider).is_some_and(|n| n == node));
            if !from_there {
                return;
            }
            st.services
                .calls
                .remove(&cid)
                .and_then(|c| st.socket(&c.caller).map(|s| (s, c.rid)))
        };
        if let Some((sock, rid)) = target {
            let _ = sock.emit_json(events::RESPONSE, &answer(rid, &outcome));
        }
    }
}

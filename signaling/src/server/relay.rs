//! The relay: `p2p:f` batches routed frame by frame to peers sharing a scope.
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::P2pSignaling;
use super::outbox::{error_event, to_json};
use super::state::{EmitFail, PeerSocket, Queued, Spent, State};
use crate::protocol::{
    BatchWriter, ErrorBody, ErrorCode, ErrorMsg, events, peek_route, split_batch, stamp_from,
};

impl P2pSignaling {
    /// Relays one `p2p:f` batch: every frame in order, frames to the same target in one
    /// outgoing batch. Errors go back to the sender in `p2p:error`, one per refused frame,
    /// and one per outgoing batch the target's buffer could not take.
    ///
    /// While a request of the socket waits for the cluster (`may_wait`: this batch did not
    /// already wait), the batch waits behind it, as the socket's requests do.
    pub(super) fn relay_batch(
        &self,
        me: &dyn PeerSocket,
        sid: &str,
        data: Result<Bytes, String>,
        may_wait: bool,
    ) {
        // Errors go to the sender through its registered socket when it has one: that one
        // sends the presences queued for it first, and nothing may overtake them.
        let batch_error = |own: Option<Arc<dyn PeerSocket>>, code: ErrorCode, message: String| {
            self.inner.counters.error(code);
            let msg = error_event(code, message, events::FRAME);
            let to: &dyn PeerSocket = own.as_deref().unwrap_or(me);
            let _ = to.emit_json(events::ERROR, &to_json(&msg));
        };
        let own_socket = || {
            let st = self.lock();
            let id = st.peer_id(sid);
            st.conns.get(&id).map(|c| Arc::clone(&c.socket))
        };
        let batch = match data {
            Ok(b) => b,
            Err(e) => {
                return batch_error(
                    own_socket(),
                    ErrorCode::BadRequest,
                    format!("p2p:f takes one batch (binary or base64 text): {e}"),
                );
            }
        };
        let max_batch = self.inner.opts.max_frame.saturating_mul(4);
        if batch.len() > max_batch {
            return batch_error(
                own_socket(),
                ErrorCode::PayloadTooLarge,
                format!(
                    "batch of {} bytes, the server takes at most {max_batch}",
                    batch.len()
                ),
            );
        }
        let frames = match split_batch(&batch) {
            Ok(f) => f,
            Err(e) => {
                return batch_error(
                    own_socket(),
                    ErrorCode::BadRequest,
                    format!("bad batch: {e}"),
                );
            }
        };
        let mut errors: Vec<ErrorMsg> = Vec::new();
        let mut outgoing: Vec<OutBatch> = Vec::new();
        let own: Option<Arc<dyn PeerSocket>>;
        {
            let mut st = self.lock();
            if may_wait
                && !st.waiting.is_empty()
                && let Some(waiting) = st.waiting.get_mut(sid)
                && let Some(me) = me.detached()
            {
                waiting.push_back(Queued::Frames { me, data: batch });
                return;
            }
            let id = st.peer_id(sid);
            own = st.conns.get(&id).map(|c| Arc::clone(&c.socket));
            match self.spend(&mut st, &id, frames.len(), batch.len()) {
                Spent::Ok => {}
                Spent::Refused => {
                    drop(st);
                    return batch_error(
                        own,
                        ErrorCode::RateLimited,
                        "over this connection's frame or byte budget; send it again later".into(),
                    );
                }
                Spent::Flooding => {
                    drop(st);
                    batch_error(
                        own,
                        ErrorCode::RateLimited,
                        "disconnected: this connection keeps sending over its budget".into(),
                    );
                    tracing::warn!(sid, "disconnecting a socket that floods");
                    return me.disconnect();
                }
            }
            let registered = st.conns.get(&id).is_some_and(|c| c.info.is_some());
            for frame in &frames {
                match self.route_frame(&st, &id, registered, frame) {
                    Ok(Routed {
                        to,
                        socket,
                        frame: stamped,
                        seq,
                    }) => {
                        let i = match outgoing.iter().position(|o| o.to == to) {
                            Some(i) => i,
                            None => {
                                outgoing.push(OutBatch {
                                    to,
                                    socket,
                                    writer: BatchWriter::new(),
                                    first_seq: None,
                                });
                                outgoing.len() - 1
                            }
                        };
                        let out = &mut outgoing[i];
                        out.first_seq = out.first_seq.or(seq);
                        out.writer.push(&stamped);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        for mut out in outgoing {
            let n = out.writer.count();
            let batch = out.writer.take();
            let len = batch.len();
            let failed = match out.socket.emit_frames(batch, n) {
                Ok(()) => {
                    self.inner.counters.relayed(n, len);
                    None
                }
                Err(EmitFail::Full) => {
                    Some((ErrorCode::Busy, "the target's buffer is full; resend later"))
                }
                Err(EmitFail::Closed) => Some((ErrorCode::UnknownPeer, "the target is gone")),
            };
            if let Some((code, message)) = failed {
                errors.push(frame_error(
                    code,
                    message.into(),
                    Some(out.to),
                    out.first_seq,
                ));
            }
        }
        let to: &dyn PeerSocket = own.as_deref().unwrap_or(me);
        for e in errors {
            self.inner.counters.error(e.error.code);
            let _ = to.emit_json(events::ERROR, &to_json(&e));
        }
    }

    /// Checks one frame of a batch from peer `id`: its target, and the frame with `from`
    /// stamped (and its seq, for Data frames), or the error for the sender.
    fn route_frame(
        &self,
        st: &State,
        id: &str,
        registered: bool,
        frame: &Bytes,
    ) -> Result<Routed, ErrorMsg> {
        if frame.len() > self.inner.opts.max_frame {
            let route = peek_route(frame).ok();
            return Err(frame_error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "frame of {} bytes, the server relays at most {}",
                    frame.len(),
                    self.inner.opts.max_frame
                ),
                route.as_ref().map(|r| r.to.to_owned()),
                route.and_then(|r| r.seq()),
            ));
        }
        let route = peek_route(frame).map_err(|e| {
            frame_error(ErrorCode::BadRequest, format!("bad frame: {e}"), None, None)
        })?;
        let to = route.to.to_owned();
        if !registered {
            return Err(frame_error(
                ErrorCode::NotRegistered,
                "send hello first".into(),
                Some(to),
                route.seq(),
            ));
        }
        let target = if route.to == id || !st.share_scope(id, route.to) {
            None
        } else {
            st.socket(route.to)
        };
        let Some(target) = target else {
            return Err(frame_error(
                ErrorCode::UnknownPeer,
                format!("no peer {:?} in your rooms or pairs", route.to),
                Some(to),
                route.seq(),
            ));
        };
        let stamped = stamp_from(&route, id).map_err(|e| {
            frame_error(ErrorCode::BadRequest, format!("bad frame: {e}"), None, None)
        })?;
        let seq = route.seq();
        Ok(Routed {
            to,
            socket: target,
            frame: stamped,
            seq,
        })
    }
}

/// A frame ready to go: its target, the target's socket, the frame with `from` stamped,
/// and its seq if it is a Data frame.
struct Routed {
    to: String,
    socket: Arc<dyn PeerSocket>,
    frame: Bytes,
    seq: Option<u64>,
}

/// Frames of one incoming batch for one target.
struct OutBatch {
    to: String,
    socket: Arc<dyn PeerSocket>,
    writer: BatchWriter,
    /// Seq of the first Data frame, reported if the target cannot take the batch.
    first_seq: Option<u64>,
}

fn frame_error(code: ErrorCode, message: String, to: Option<String>, seq: Option<u64>) -> ErrorMsg {
    ErrorMsg {
        error: ErrorBody { code, message },
        event: Some(events::FRAME.to_owned()),
        to,
        seq,
    }
}

impl P2pSignaling {
    /// Takes a batch's frames and bytes from the sender's budget.
    fn spend(&self, st: &mut State, id: &str, frames: usize, bytes: usize) -> Spent {
        let Some(b) = st.conns.get_mut(id).map(|c| &mut c.budget) else {
            return Spent::Ok;
        };
        b.spend(
            frames as f64,
            bytes as f64,
            Instant::now(),
            &self.inner.opts.limits(),
        )
    }
}

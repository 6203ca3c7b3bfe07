//! `p2p:req`: control requests, one function per operation.
//!
//! A socket's requests run in the order they arrive, under the state lock. A request that
//! must wait for the cluster (a uid or a service name to claim) gives back a [`Deferred`]:
//! the claim is awaited without the lock, in a task of its own, and later requests of the
//! same socket wait behind it (in `State::waiting`) so that their order holds.
use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::Value as Json;

use super::P2pSignaling;
use super::cluster::{ClaimFail, ClaimFuture, Name};
use super::outbox::{Outbox, error_response, to_json};
use super::state::{PeerSocket, Queued, State};
use crate::protocol::{ErrorCode, FrameEncoding, Op, PeerInfo, Request, Response, Resume, events};

/// What a request handler works with: the state (locked), the outbox, and who asks.
pub(super) struct Ctx<'a> {
    /// The state, locked.
    pub(super) st: &'a mut State,
    /// Messages to send once the lock is released.
    pub(super) out: &'a mut Outbox,
    /// The peer id of the asking socket.
    pub(super) id: String,
    /// The asking socket.
    pub(super) me: Arc<dyn PeerSocket>,
    /// The request id, for the response.
    pub(super) rid: u64,
    /// Set by a `hello` that registered the peer (for the `on_peer_joined` hook).
    pub(super) joined: &'a mut Option<PeerInfo>,
}

/// What requests leave for after the lock: messages, and a peer that registered.
#[derive(Default)]
struct Effects {
    out: Outbox,
    joined: Option<PeerInfo>,
}

/// An answer now, or an error.
pub(super) type Reply = Result<Json, (ErrorCode, String)>;

/// What a request handler decided.
pub(super) enum Flow {
    /// Answer now.
    Reply(Reply),
    /// The answer goes out later, or was already queued in the outbox.
    Later,
    /// Wait for the cluster, then run the request again.
    Wait(Deferred),
}

impl Flow {
    pub(super) fn ok(v: Json) -> Flow {
        Flow::Reply(Ok(v))
    }
    pub(super) fn error(code: ErrorCode, message: impl Into<String>) -> Flow {
        Flow::Reply(Err((code, message.into())))
    }
}

/// The arguments of a `hello` ([`crate::protocol::Op::Hello`]).
pub(super) struct Hello {
    pub(super) version: u32,
    pub(super) uid: Option<String>,
    pub(super) rooms: Vec<String>,
    pub(super) resume: Option<Resume>,
    pub(super) frames: FrameEncoding,
    pub(super) batch_presence: bool,
}

/// A uid claimed (or refused) while the `hello` waited.
pub(super) struct Claimed {
    pub(super) uid: String,
    pub(super) target: String,
    pub(super) result: Result<(), ClaimFail>,
}

/// What a waiting request waited for.
pub(super) enum Decided {
    /// A name claimed in the cluster (or refused).
    Claim(Result<(), ClaimFail>),
    /// The authorization hook's answer.
    Authorized(Result<(), String>),
}

/// What a request waits for, awaited without the state lock.
pub(super) type WaitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Decided> + Send>>;

/// Waits for a claim.
pub(super) fn wait_claim(claim: ClaimFuture) -> WaitFuture {
    Box::pin(async move { Decided::Claim(claim.await) })
}

/// A request waiting for a claim or an authorization.
pub(super) struct Deferred {
    pub(super) wait: WaitFuture,
    pub(super) rid: u64,
    pub(super) retry: Retry,
}

/// How a waiting request goes on once its claim is decided.
pub(super) enum Retry {
    /// A `hello` that claimed `uid` for peer id `target`.
    Hello {
        hello: Hello,
        uid: String,
        target: String,
    },
    /// A `provide` that claimed `service` for peer `id`.
    Provide { service: String, id: String },
    /// An operation of peer `peer` that the authorization hook was asked about.
    Authorized { op: Box<Op>, peer: String },
    /// A `hello` whose rooms the authorization hook was asked about.
    AuthorizedHello { hello: Box<Hello> },
}

impl Retry {
    /// The name claimed and its holder, if the request claimed one.
    fn claimed(&self) -> Option<(Name, &str, &str)> {
        match self {
            Retry::Hello { uid, target, .. } => Some((Name::Uid, uid, target)),
            Retry::Provide { service, id } => Some((Name::Service, service, id)),
            Retry::Authorized { .. } | Retry::AuthorizedHello { .. } => None,
        }
    }
}

impl P2pSignaling {
    /// One `p2p:req` from socket `sid` (in the socket's receive order).
    pub(super) fn handle_request(&self, sid: &str, raw: Result<Json, String>) {
        let mut fx = Effects::default();
        let wait = {
            let mut st = self.lock();
            let id = st.peer_id(sid);
            let opts = &self.inner.opts;
            let Some(conn) = st.conns.get_mut(&id) else {
                return;
            };
            let limited = !conn.bucket.take(opts.request_rate, opts.request_burst);
            if let Some(waiting) = st.waiting.get_mut(sid) {
                waiting.push_back(Queued::Request { raw, limited });
                return;
            }
            let wait = self.serve_one(&mut st, sid, raw, limited, &mut fx);
            if wait.is_some() {
                st.waiting.insert(sid.to_owned(), VecDeque::new());
            }
            wait
        };
        self.after_lock(fx);
        if let Some(d) = wait {
            self.spawn_wait(sid.to_owned(), d);
        }
    }

    /// Sends what the requests produced and runs the `on_peer_joined` hook.
    fn after_lock(&self, fx: Effects) {
        fx.out.flush();
        if let (Some(info), Some(hook)) = (fx.joined, &self.inner.opts.on_peer_joined) {
            hook(&info);
        }
    }

    /// Awaits the claim of a waiting request (no lock held), commits it, then runs the
    /// requests and frames that queued up behind it, in order, until none is left or a
    /// request waits again.
    fn spawn_wait(&self, sid: String, first: Deferred) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut next = Some(first);
            loop {
                let decided = match next.take() {
                    Some(Deferred { wait, rid, retry }) => Some((rid, retry, wait.await)),
                    None => None,
                };
                let mut fx = Effects::default();
                let mut frames = None;
                {
                    let mut st = this.lock();
                    next = decided.and_then(|(rid, retry, result)| {
                        this.retry(&mut st, &sid, rid, retry, result, &mut fx)
                    });
                    while next.is_none() {
                        match st.waiting.get_mut(&sid).and_then(VecDeque::pop_front) {
                            Some(Queued::Request { raw, limited }) => {
                                next = this.serve_one(&mut st, &sid, raw, limited, &mut fx);
                            }
                            Some(Queued::Frames { me, data }) => {
                                frames = Some((me, data));
                                break;
                            }
                            None => {
                                st.waiting.remove(&sid);
                                break;
                            }
                        }
                    }
                }
                this.after_lock(fx);
                match frames {
                    // Relayed without the lock held here; what is queued behind goes next.
                    Some((me, data)) => this.relay_batch(&*me, &sid, Ok(data), false),
                    None if next.is_none() => break,
                    None => {}
                }
            }
        });
    }

    /// Runs a request again once its claim is decided. If the socket went away meanwhile
    /// (or no longer speaks for the peer the name was claimed for), the name is released.
    fn retry(
        &self,
        st: &mut State,
        sid: &str,
        rid: u64,
        retry: Retry,
        decided: Decided,
        fx: &mut Effects,
    ) -> Option<Deferred> {
        let id = st.peer_id(sid);
        let conn = st.conns.get(&id);
        let info = conn.and_then(|c| c.info.clone());
        let still = match &retry {
            Retry::Hello { .. } | Retry::AuthorizedHello { .. } => conn.is_some() && info.is_none(),
            Retry::Provide { id: holder, .. } | Retry::Authorized { peer: holder, .. } => {
                info.as_ref().is_some_and(|i| i.id == *holder)
            }
        };
        let Some(me) = conn.map(|c| c.socket.clone()).filter(|_| still) else {
            tracing::debug!(sid, "request dropped while it waited");
            if let (Some((kind, name, holder)), Decided::Claim(Ok(()))) =
                (retry.claimed(), &decided)
            {
                self.inner.cluster.release(kind, name, holder);
            }
            return None;
        };
        let mut cx = Ctx {
            st,
            out: &mut fx.out,
            id,
            me,
            rid,
            joined: &mut fx.joined,
        };
        let flow = match (retry, decided) {
            (Retry::Hello { hello, uid, target }, Decided::Claim(result)) => {
                let claimed = Claimed {
                    uid,
                    target,
                    result,
                };
                self.hello(&mut cx, hello, Some(claimed))
            }
            (Retry::Provide { service, .. }, Decided::Claim(result)) => match info {
                Some(info) => self.provide_op(&mut cx, &info, service, Some(result)),
                None => Flow::Later,
            },
            (Retry::Authorized { op, .. }, Decided::Authorized(Ok(()))) => match info {
                Some(info) => self.run_op(&mut cx, &info, *op),
                None => Flow::Later,
            },
            (Retry::AuthorizedHello { hello }, Decided::Authorized(Ok(()))) => {
                self.hello(&mut cx, *hello, None)
            }
            (_, Decided::Authorized(Err(reason))) => Flow::error(ErrorCode::Forbidden, reason),
            (_, Decided::Claim(_)) | (_, Decided::Authorized(Ok(()))) => {
                tracing::warn!(sid, "a waiting request got an answer it did not wait for");
                Flow::Later
            }
        };
        if let Flow::Reply(Err((code, _))) = &flow {
            self.inner.counters.error(*code);
        }
        cx.finish(flow)
    }

    /// Reads and runs one request of socket `sid`.
    fn serve_one(
        &self,
        st: &mut State,
        sid: &str,
        raw: Result<Json, String>,
        limited: bool,
        fx: &mut Effects,
    ) -> Option<Deferred> {
        let id = st.peer_id(sid);
        let me = st.conns.get(&id)?.socket.clone();
        let rid = raw
            .as_ref()
            .ok()
            .and_then(|v| v.get("rid"))
            .and_then(Json::as_u64)
            .unwrap_or(0);
        if limited {
            let msg = error_response(rid, ErrorCode::RateLimited, "too many requests");
            fx.out.push(&me, events::RESPONSE, msg);
            return None;
        }
        let req = raw.and_then(|v| serde_json::from_value::<Request>(v).map_err(|e| e.to_string()));
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                let msg = error_response(rid, ErrorCode::BadRequest, e);
                fx.out.push(&me, events::RESPONSE, msg);
                return None;
            }
        };
        let mut cx = Ctx {
            st,
            out: &mut fx.out,
            id,
            me,
            rid: req.rid,
            joined: &mut fx.joined,
        };
        let flow = self.dispatch(&mut cx, req.op);
        if let Flow::Reply(Err((code, _))) = &flow {
            self.inner.counters.error(*code);
        }
        cx.finish(flow)
    }

    /// Hands one request to the function of its operation.
    fn dispatch(&self, cx: &mut Ctx<'_>, op: Op) -> Flow {
        let info = cx.st.conns.get(&cx.id).and_then(|c| c.info.clone());
        let op = match (op, &info) {
            (
                Op::Hello {
                    version,
                    uid,
                    rooms,
                    resume,
                    frames,
                    batch_presence,
                },
                None,
            ) => {
                let hello = Hello {
                    version,
                    uid,
                    rooms,
                    resume,
                    frames,
                    batch_presence,
                };
                return match self.authorize_hello(cx, hello) {
                    Ok(wait) => wait,
                    Err(hello) => self.hello(cx, hello, None),
                };
            }
            (op, _) => op,
        };
        let Some(me) = info else {
            return Flow::error(ErrorCode::NotRegistered, "send hello first");
        };
        match self.authorize_op(cx, &me, op) {
            Ok(wait) => wait,
            Err(op) => self.run_op(cx, &me, op),
        }
    }

    /// Runs one operation of a registered peer (authorized, if the hook is set).
    fn run_op(&self, cx: &mut Ctx<'_>, me: &PeerInfo, op: Op) -> Flow {
        let me = me.clone();
        match op {
            Op::Hello { .. } => Flow::error(ErrorCode::AlreadyRegistered, "hello was already sent"),
            Op::Join { room } => self.join(cx, &me, room),
            Op::Leave { room } => self.leave(cx, &me, room),
            Op::Peers { room } => self.peers_of(cx, room),
            Op::Members { room, after, limit } => self.members_page(cx, room, after, limit),
            Op::Pair {
                peer_uid,
                timeout_ms,
            } => self.pair(cx, &me, peer_uid, timeout_ms),
            Op::Signal { to, signal } => self.signal(cx, to, signal),
            Op::Provide { service } => self.provide_op(cx, &me, service, None),
            Op::Unprovide { service } => self.unprovide_op(cx, &me, service),
            Op::Call {
                service,
                method,
                args,
                timeout_ms,
            } => self.call(cx, &me, service, method, args, timeout_ms),
            Op::CallResult { cid, outcome } => self.call_result(cx, &me, cid, outcome),
            Op::Subscribe { topic } => self.subscribe(cx, &me, topic),
            Op::Unsubscribe { topic } => self.unsubscribe(cx, &me, topic),
            Op::Publish { topic, data } => self.publish_op(cx, &me, topic, data),
        }
    }

    /// Checks a room, uid, service or topic name.
    pub(super) fn check_name(&self, what: &str, name: &str) -> Result<(), (ErrorCode, String)> {
        if name.is_empty() || name.len() > self.inner.opts.max_name_len {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "{what} must be 1 to {} bytes long",
                    self.inner.opts.max_name_len
                ),
            ));
        }
        Ok(())
    }
}

impl Ctx<'_> {
    /// Queues the response a handler decided on; gives back a request that waits.
    fn finish(self, flow: Flow) -> Option<Deferred> {
        let reply = match flow {
            Flow::Reply(reply) => reply,
            Flow::Later => return None,
            Flow::Wait(d) => return Some(d),
        };
        let resp = match reply {
            Ok(ok) => to_json(&Response {
                rid: self.rid,
                ok: Some(ok),
                error: None,
            }),
            Err((code, msg)) => error_response(self.rid, code, msg),
        };
        self.out.push(&self.me, events::RESPONSE, resp);
        None
    }
}

//! Services (calls routed by the server to a peer provider or run by the server itself) and
//! topics (publish/subscribe), on top of the signaling state.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use super::P2pSignaling;
use super::book::{InFlight, Provider};
use super::cluster::{Claim, ClaimFail, Name};
use super::outbox::{Outbox, error_response, to_json};
use super::requests::{Ctx, Deferred, Flow, Retry, wait_claim};
use super::state::State;
use crate::protocol::{CallFor, CallOutcome, ErrorCode, PeerInfo, Publication, Response, events};
use crate::service::Service;

/// Default time the server waits for a provider's answer.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a caller may ask for.
pub(super) const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The response carrying a call's outcome.
pub(super) fn answer(rid: u64, outcome: &CallOutcome) -> Json {
    to_json(&Response {
        rid,
        ok: Some(to_json(outcome)),
        error: None,
    })
}

/// Calls in flight to `provider` (optionally only for `service`) fail with `ServiceGone`.
pub(super) fn fail_calls(st: &mut State, provider: &str, service: Option<&str>, out: &mut Outbox) {
    let mut gone = Vec::new();
    st.services.calls.retain(|_, c| {
        let hit = c.provider == provider && service.is_none_or(|s| s == c.service);
        if hit {
            gone.push((c.caller.clone(), c.rid, c.service.clone()));
        }
        !hit
    });
    for (caller, rid, service) in gone {
        if let Some(sock) = st.socket(&caller) {
            out.push(
                &sock,
                events::RESPONSE,
                error_response(
                    rid,
                    ErrorCode::ServiceGone,
                    format!("the provider of {service:?} went away before it answered"),
                ),
            );
        }
    }
}

impl P2pSignaling {
    /// The server itself provides `name` (callers cannot tell it from a peer provider).
    /// Fails with [`ErrorCode::ServiceTaken`] if a peer or the server already provides it.
    pub fn provide(&self, name: &str, service: Service) -> Result<(), ErrorCode> {
        let mut st = self.lock();
        if st.services.providers.contains_key(name) {
            return Err(ErrorCode::ServiceTaken);
        }
        st.services
            .providers
            .insert(name.to_owned(), Provider::Server(Arc::new(service)));
        Ok(())
    }

    /// Stops providing a server service; returns false if the server did not provide it.
    pub fn unprovide(&self, name: &str) -> bool {
        let mut st = self.lock();
        if matches!(st.services.providers.get(name), Some(Provider::Server(_))) {
            st.services.providers.remove(name);
            true
        } else {
            false
        }
    }

    /// Publishes `data` on `topic` from the server: every subscriber gets it once. Returns
    /// how many subscribers it reached.
    pub fn publish(&self, topic: &str, data: impl serde::Serialize) -> usize {
        let mut out = Outbox::default();
        let n = {
            let st = self.lock();
            publish_locked(&st, topic, None, to_json(&data), &mut out)
        };
        out.flush();
        n
    }

    /// How many peers are subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.lock()
            .services
            .topics
            .get(topic)
            .map_or(0, HashSet::len)
    }

    /// Names of the services provided, by peers or by the server, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().services.providers.keys().cloned().collect();
        v.sort();
        v
    }

    /// Become the provider of `name`. On a cluster the name is claimed first (without the
    /// lock: `claimed` is the outcome when the request runs again).
    pub(super) fn provide_op(
        &self,
        cx: &mut Ctx<'_>,
        me: &PeerInfo,
        name: String,
        claimed: Option<Result<(), ClaimFail>>,
    ) -> Flow {
        if let Err(e) = self.check_name("service", &name) {
            return Flow::Reply(Err(e));
        }
        let id = me.id.as_str();
        match cx.st.services.providers.get(&name) {
            Some(Provider::Peer(p)) if p == id => return Flow::ok(Json::Null),
            Some(_) => {
                if claimed.is_some_and(|r| r.is_ok()) {
                    self.inner.cluster.release(Name::Service, &name, id);
                }
                return Flow::error(
                    ErrorCode::ServiceTaken,
                    format!("service {name:?} is already provided"),
                );
            }
            None => {}
        }
        let result = match claimed {
            Some(r) => r,
            None => match self.inner.cluster.claim(Name::Service, &name, id) {
                Claim::Done(r) => r,
                Claim::Pending(claim) => {
                    let retry = Retry::Provide {
                        service: name,
                        id: id.to_owned(),
                    };
                    return Flow::Wait(Deferred {
                        wait: wait_claim(claim),
                        rid: cx.rid,
                        retry,
                    });
                }
            },
        };
        match result {
            Ok(()) => {}
            Err(ClaimFail::Taken) => {
                return Flow::error(
                    ErrorCode::ServiceTaken,
                    format!("service {name:?} is provided on another node"),
                );
            }
            Err(ClaimFail::Unreachable) => {
                return Flow::error(
                    ErrorCode::ServiceTaken,
                    format!("cannot check that {name:?} is free (redis unreachable)"),
                );
            }
        }
        self.inner.cluster.provided(id, &name);
        cx.st
            .services
            .providers
            .insert(name, Provider::Peer(id.to_owned()));
        Flow::ok(Json::Null)
    }

    /// Stop providing `name`; its calls in flight fail.
    pub(super) fn unprovide_op(&self, cx: &mut Ctx<'_>, me: &PeerInfo, name: String) -> Flow {
        let id = me.id.as_str();
        let providers = &mut cx.st.services.providers;
        if !matches!(providers.get(&name), Some(Provider::Peer(p)) if p == id) {
            return Flow::error(
                ErrorCode::NoSuchService,
                format!("you do not provide {name:?}"),
            );
        }
        providers.remove(&name);
        self.inner.cluster.release(Name::Service, &name, id);
        fail_calls(cx.st, id, Some(&name), cx.out);
        Flow::ok(Json::Null)
    }

    /// Call a method of a service, wherever it runs.
    pub(super) fn call(
        &self,
        cx: &mut Ctx<'_>,
        me: &PeerInfo,
        service: String,
        method: String,
        args: Json,
        timeout_ms: Option<u64>,
    ) -> Flow {
        let wait = timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_CALL_TIMEOUT)
            .min(MAX_CALL_TIMEOUT);
        let call = CallFor {
            cid: 0,
            from: me.clone(),
            service,
            method,
            args,
        };
        match cx.st.services.providers.get(&call.service) {
            None => Flow::error(
                ErrorCode::NoSuchService,
                format!("nobody provides {:?}", call.service),
            ),
            Some(Provider::Server(svc)) => {
                self.call_server(svc.clone(), cx.rid, call, wait);
                Flow::Later
            }
            Some(Provider::Peer(p)) => {
                let p = p.clone();
                self.call_peer(cx, p, call, wait)
            }
        }
    }

    /// A call of a service the server provides: runs in a task of its own.
    fn call_server(&self, svc: Arc<Service>, rid: u64, call: CallFor, wait: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let CallFor {
                from: caller,
                service,
                method,
                args,
                ..
            } = call;
            let outcome = tokio::time::timeout(wait, svc.call(caller.clone(), &method, args)).await;
            let msg = match outcome {
                Ok(o) => answer(rid, &o),
                Err(_) => error_response(
                    rid,
                    ErrorCode::Timeout,
                    format!("{service:?} did not answer in {wait:?}"),
                ),
            };
            let sock = this.lock().socket(&caller.id);
            if let Some(sock) = sock {
                let _ = sock.emit_json(events::RESPONSE, &msg);
            }
        });
    }

    /// A call of a service a peer provides: goes to the provider, times out on its own.
    fn call_peer(
        &self,
        cx: &mut Ctx<'_>,
        provider: String,
        mut call: CallFor,
        wait: Duration,
    ) -> Flow {
        let st = &mut *cx.st;
        let Some(sock) = st
            .conns
            .get(&provider)
            .filter(|c| c.away.is_none())
            .map(|c| c.socket.clone())
        else {
            return Flow::error(
                ErrorCode::ServiceGone,
                format!("the provider of {:?} is reconnecting", call.service),
            );
        };
        st.services.next_cid += 1;
        let cid = st.services.next_cid;
        call.cid = cid;
        let service = call.service.clone();
        cx.out.push(&sock, events::CALL, to_json(&call));
        st.services.calls.insert(
            cid,
            InFlight {
                caller: cx.id.clone(),
                rid: cx.rid,
                provider,
                service: service.clone(),
                relay: None,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut st = this.lock();
            if let Some(c) = st.services.calls.remove(&cid)
                && let Some(sock) = st.socket(&c.caller)
            {
                drop(st);
                let _ = sock.emit_json(
                    events::RESPONSE,
                    &error_response(
                        c.rid,
                        ErrorCode::Timeout,
                        format!("{service:?} did not answer in {wait:?}"),
                    ),
                );
            }
        });
        Flow::Later
    }

    /// A provider's answer to a call.
    pub(super) fn call_result(
        &self,
        cx: &mut Ctx<'_>,
        me: &PeerInfo,
        cid: u64,
        outcome: CallOutcome,
    ) -> Flow {
        let st = &mut *cx.st;
        let mine = st
            .services
            .calls
            .get(&cid)
            .is_some_and(|c| c.provider == me.id);
        let Some(c) = mine.then(|| st.services.calls.remove(&cid)).flatten() else {
            // Late (timed out) or not ours: nothing to deliver.
            return Flow::error(
                ErrorCode::BadRequest,
                format!("no call {cid} in flight for you"),
            );
        };
        if let Some((node, origin)) = &c.relay {
            self.inner
                .cluster
                .call_result(node, &c.caller, *origin, &outcome);
        } else if let Some(sock) = st.socket(&c.caller) {
            cx.out
                .push(&sock, events::RESPONSE, answer(c.rid, &outcome));
        }
        Flow::ok(Json::Null)
    }

    /// Receive the publications of a topic.
    pub(super) fn subscribe(&self, cx: &mut Ctx<'_>, me: &PeerInfo, topic: String) -> Flow {
        if let Err(e) = self.check_name("topic", &topic) {
            return Flow::Reply(Err(e));
        }
        let id = me.id.as_str();
        let subs = cx.st.services.subscriptions.get(id);
        let n = subs.map_or(0, HashSet::len);
        let already = subs.is_some_and(|t| t.contains(&topic));
        if !already && n >= self.inner.opts.max_rooms_per_peer {
            return Flow::error(ErrorCode::BadRequest, "too many topics");
        }
        cx.st.services.subscribe(id, &topic);
        if !already {
            self.inner.cluster.topic(id, &topic, true);
        }
        Flow::ok(Json::Null)
    }

    /// Stop receiving a topic.
    pub(super) fn unsubscribe(&self, cx: &mut Ctx<'_>, me: &PeerInfo, topic: String) -> Flow {
        cx.st.services.unsubscribe(&me.id, &topic);
        self.inner.cluster.topic(&me.id, &topic, false);
        Flow::ok(Json::Null)
    }

    /// Publish to every subscriber of a topic.
    pub(super) fn publish_op(
        &self,
        cx: &mut Ctx<'_>,
        me: &PeerInfo,
        topic: String,
        data: Json,
    ) -> Flow {
        if let Err(e) = self.check_name("topic", &topic) {
            return Flow::Reply(Err(e));
        }
        let n = publish_locked(cx.st, &topic, Some(me.clone()), data, cx.out);
        Flow::ok(Json::from(n))
    }

    /// The peer's connection broke: calls it was answering fail now (its answers would be
    /// lost with the connection), even if it comes back within the grace period.
    pub(super) fn services_away(&self, st: &mut State, id: &str, out: &mut Outbox) {
        fail_calls(st, id, None, out);
    }

    /// The peer is gone: its services, calls and subscriptions go with it.
    pub(super) fn services_gone(&self, st: &mut State, id: &str, out: &mut Outbox) {
        let cluster = &self.inner.cluster;
        st.services.providers.retain(|name, p| {
            let gone = matches!(p, Provider::Peer(x) if x == id);
            if gone {
                // Only releases names this node claimed for `id`.
                cluster.release(Name::Service, name, id);
            }
            !gone
        });
        fail_calls(st, id, None, out);
        st.services.calls.retain(|_, c| c.caller != id);
        for topic in st.services.subscriptions.remove(id).unwrap_or_default() {
            st.services.unsubscribe(id, &topic);
        }
    }
}

/// Sends a publication to every subscriber of `topic`; returns how many it reached.
pub(super) fn publish_locked(
    st: &State,
    topic: &str,
    from: Option<PeerInfo>,
    data: Json,
    out: &mut Outbox,
) -> usize {
    let Some(subs) = st.services.topics.get(topic) else {
        return 0;
    };
    let msg = to_json(&Publication {
        topic: topic.to_owned(),
        from,
        data,
        missed: 0,
    });
    let name: std::sync::Arc<str> = topic.into();
    let mut n = 0;
    for id in subs {
        if let Some(sock) = st.socket(id) {
            out.publication(sock, &name, msg.clone());
            n += 1;
        }
    }
    n
}

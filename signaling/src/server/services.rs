//! Services (calls routed by the server to a peer provider or run by the server itself) and
//! topics (publish/subscribe), on top of the signaling state.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use super::state::State;
use super::{Outbox, P2pSignaling, error_response, to_json};
use crate::protocol::{CallFor, CallOutcome, ErrorCode, PeerInfo, Publication, Response, events};
use crate::service::Service;

/// Default time the server waits for a provider's answer.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a caller may ask for.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) enum Provider {
    Peer(String),
    Server(Arc<Service>),
}

struct InFlight {
    caller: String,
    rid: u64,
    provider: String,
    service: String,
    /// A call relayed by another node (cluster): that node and its call id.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    relay: Option<(String, u64)>,
}

/// Service and topic bookkeeping (part of [`State`]).
#[derive(Default)]
pub(crate) struct Services {
    providers: HashMap<String, Provider>,
    calls: HashMap<u64, InFlight>,
    next_cid: u64,
    topics: HashMap<String, HashSet<String>>,
    subscriptions: HashMap<String, HashSet<String>>,
}

type Reply = Option<Result<Json, (ErrorCode, String)>>;

fn answer(rid: u64, outcome: &CallOutcome) -> Json {
    to_json(&Response {
        rid,
        ok: Some(to_json(outcome)),
        error: None,
    })
}

/// Calls in flight to `provider` (optionally only for `service`) fail with `ServiceGone`.
fn fail_calls(st: &mut State, provider: &str, service: Option<&str>, out: &mut Outbox) {
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

    /// Service and topic requests. `None`: the answer comes later.
    pub(super) fn apply_service(
        &self,
        st: &mut State,
        me: &PeerInfo,
        rid: u64,
        op: ServiceOp,
        out: &mut Outbox,
    ) -> Reply {
        let id = me.id.as_str();
        Some(match op {
            ServiceOp::Provide(name) => {
                if let Err(e) = self.check_name("service", &name) {
                    return Some(Err(e));
                }
                match st.services.providers.get(&name) {
                    Some(Provider::Peer(p)) if p == id => Ok(Json::Null),
                    Some(_) => Err((
                        ErrorCode::ServiceTaken,
                        format!("service {name:?} is already provided"),
                    )),
                    None => {
                        #[cfg(feature = "redis")]
                        if let Err(e) = self.cluster_claim_service(&name, id) {
                            return Some(Err(e));
                        }
                        st.services
                            .providers
                            .insert(name, Provider::Peer(id.to_owned()));
                        Ok(Json::Null)
                    }
                }
            }
            ServiceOp::Unprovide(name) => {
                if matches!(st.services.providers.get(&name), Some(Provider::Peer(p)) if p == id) {
                    st.services.providers.remove(&name);
                    #[cfg(feature = "redis")]
                    self.cluster_release_service(&name, id);
                    fail_calls(st, id, Some(&name), out);
                    Ok(Json::Null)
                } else {
                    Err((
                        ErrorCode::NoSuchService,
                        format!("you do not provide {name:?}"),
                    ))
                }
            }
            ServiceOp::Call {
                service,
                method,
                args,
                timeout_ms,
            } => {
                let wait = timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_CALL_TIMEOUT)
                    .min(MAX_CALL_TIMEOUT);
                match st.services.providers.get(&service) {
                    None => Err((
                        ErrorCode::NoSuchService,
                        format!("nobody provides {service:?}"),
                    )),
                    Some(Provider::Server(svc)) => {
                        let svc = svc.clone();
                        let this = self.clone();
                        let caller = me.clone();
                        tokio::spawn(async move {
                            let outcome =
                                tokio::time::timeout(wait, svc.call(caller.clone(), &method, args))
                                    .await;
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
                        return None;
                    }
                    Some(Provider::Peer(p)) => {
                        let p = p.clone();
                        let Some(sock) = st
                            .conns
                            .get(&p)
                            .filter(|c| c.away.is_none())
                            .map(|c| c.socket.clone())
                        else {
                            return Some(Err((
                                ErrorCode::ServiceGone,
                                format!("the provider of {service:?} is reconnecting"),
                            )));
                        };
                        st.services.next_cid += 1;
                        let cid = st.services.next_cid;
                        out.push(
                            &sock,
                            events::CALL,
                            to_json(&CallFor {
                                cid,
                                from: me.clone(),
                                service: service.clone(),
                                method,
                                args,
                            }),
                        );
                        st.services.calls.insert(
                            cid,
                            InFlight {
                                caller: id.to_owned(),
                                rid,
                                provider: p,
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
                        return None;
                    }
                }
            }
            ServiceOp::Result { cid, outcome } => {
                let mine = st
                    .services
                    .calls
                    .get(&cid)
                    .is_some_and(|c| c.provider == id);
                if mine && let Some(c) = st.services.calls.remove(&cid) {
                    #[cfg(feature = "redis")]
                    if let Some((node, origin)) = &c.relay {
                        self.cluster_call_result(node, &c.caller, *origin, &outcome);
                        return Some(Ok(Json::Null));
                    }
                    if let Some(sock) = st.socket(&c.caller) {
                        out.push(&sock, events::RESPONSE, answer(c.rid, &outcome));
                    }
                    Ok(Json::Null)
                } else {
                    // Late (timed out) or not ours: nothing to deliver.
                    Err((
                        ErrorCode::BadRequest,
                        format!("no call {cid} in flight for you"),
                    ))
                }
            }
            ServiceOp::Subscribe(topic) => {
                if let Err(e) = self.check_name("topic", &topic) {
                    return Some(Err(e));
                }
                let n = st.services.subscriptions.get(id).map_or(0, HashSet::len);
                let already = st
                    .services
                    .subscriptions
                    .get(id)
                    .is_some_and(|t| t.contains(&topic));
                if !already && n >= self.inner.opts.max_rooms_per_peer {
                    return Some(Err((ErrorCode::BadRequest, "too many topics".into())));
                }
                st.services.subscribe(id, &topic);
                #[cfg(feature = "redis")]
                if !already {
                    self.cluster_topic(id, &topic, true);
                }
                Ok(Json::Null)
            }
            ServiceOp::Unsubscribe(topic) => {
                st.services.unsubscribe(id, &topic);
                #[cfg(feature = "redis")]
                self.cluster_topic(id, &topic, false);
                Ok(Json::Null)
            }
            ServiceOp::Publish { topic, data } => {
                if let Err(e) = self.check_name("topic", &topic) {
                    return Some(Err(e));
                }
                let n = publish_locked(st, &topic, Some(me.clone()), data, out);
                Ok(Json::from(n))
            }
        })
    }

    /// The peer's connection broke: calls it was answering fail now (its answers would be
    /// lost with the connection), even if it comes back within the grace period.
    pub(super) fn services_away(&self, st: &mut State, id: &str, out: &mut Outbox) {
        fail_calls(st, id, None, out);
    }

    /// The peer is gone: its services, calls and subscriptions go with it.
    pub(super) fn services_gone(&self, st: &mut State, id: &str, out: &mut Outbox) {
        st.services.providers.retain(|_name, p| {
            let gone = matches!(p, Provider::Peer(x) if x == id);
            #[cfg(feature = "redis")]
            if gone {
                // Only releases names this node claimed for `id`.
                self.cluster_release_service(_name, id);
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

impl Services {
    fn subscribe(&mut self, id: &str, topic: &str) {
        self.topics
            .entry(topic.to_owned())
            .or_default()
            .insert(id.to_owned());
        self.subscriptions
            .entry(id.to_owned())
            .or_default()
            .insert(topic.to_owned());
    }

    fn unsubscribe(&mut self, id: &str, topic: &str) {
        if let Some(t) = self.subscriptions.get_mut(id) {
            t.remove(topic);
            if t.is_empty() {
                self.subscriptions.remove(id);
            }
        }
        if let Some(subs) = self.topics.get_mut(topic) {
            subs.remove(id);
            if subs.is_empty() {
                self.topics.remove(topic);
            }
        }
    }
}

fn publish_locked(
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
    });
    let mut n = 0;
    for id in subs {
        if let Some(sock) = st.socket(id) {
            out.push(&sock, events::TOPIC, msg.clone());
            n += 1;
        }
    }
    n
}

/// The service and topic operations, split off [`crate::protocol::Op`].
pub(super) enum ServiceOp {
    Provide(String),
    Unprovide(String),
    Call {
        service: String,
        method: String,
        args: Json,
        timeout_ms: Option<u64>,
    },
    Result {
        cid: u64,
        outcome: CallOutcome,
    },
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        topic: String,
        data: Json,
    },
}

/// Internal event between cluster nodes: a provider's answer to a relayed call.
#[cfg(feature = "redis")]
pub(super) const RELAYED_RESULT: &str = "p2p:cres";

/// What the cluster mirrors of other nodes' services and topics.
#[cfg(feature = "redis")]
impl P2pSignaling {
    /// Services provided by and topics subscribed to by `id` (for a sync).
    pub(super) fn peer_services(st: &State, id: &str) -> (Vec<String>, Vec<String>) {
        let services = st
            .services
            .providers
            .iter()
            .filter(|(_, p)| matches!(p, Provider::Peer(x) if x == id))
            .map(|(n, _)| n.clone())
            .collect();
        let topics = st
            .services
            .subscriptions
            .get(id)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        (services, topics)
    }

    /// `id`, a peer of another node, provides `service` (or no longer does).
    pub(super) fn mirror_provide(&self, id: &str, service: &str, on: bool) {
        let mut out = Outbox::default();
        {
            let mut st = self.lock();
            if on {
                st.services
                    .providers
                    .insert(service.to_owned(), Provider::Peer(id.to_owned()));
            } else if matches!(st.services.providers.get(service), Some(Provider::Peer(p)) if p == id)
            {
                st.services.providers.remove(service);
                fail_calls(&mut st, id, Some(service), &mut out);
            }
        }
        out.flush();
    }

    /// `id`, a peer of another node, subscribed to `topic` (or unsubscribed).
    pub(super) fn mirror_topic(&self, id: &str, topic: &str, on: bool) {
        let mut st = self.lock();
        if on {
            st.services.subscribe(id, topic);
        } else {
            st.services.unsubscribe(id, topic);
        }
    }

    /// Another node relays a call to our peer `to`: it gets it under a call id of ours.
    pub(super) fn relayed_call(&self, node: &str, to: &str, data: Json) {
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
    pub(super) fn relayed_result(&self, node: &str, data: Json) {
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

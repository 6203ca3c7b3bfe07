//! Service and topic bookkeeping: the data the state holds and the service requests change.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::service::Service;

/// Who answers the calls of a service.
pub(crate) enum Provider {
    /// A peer (of this node or of another one).
    Peer(String),
    /// The server itself.
    Server(Arc<Service>),
}

/// A call waiting for its provider's answer.
pub(crate) struct InFlight {
    pub(crate) caller: String,
    pub(crate) rid: u64,
    pub(crate) provider: String,
    pub(crate) service: String,
    /// A call relayed by another node (cluster): that node and its call id.
    pub(crate) relay: Option<(String, u64)>,
}

/// Service and topic bookkeeping (part of the state).
#[derive(Default)]
pub(crate) struct Services {
    pub(crate) providers: HashMap<String, Provider>,
    pub(crate) calls: HashMap<u64, InFlight>,
    pub(crate) next_cid: u64,
    pub(crate) topics: HashMap<String, HashSet<String>>,
    pub(crate) subscriptions: HashMap<String, HashSet<String>>,
}

impl Services {
    /// `id` receives `topic`.
    pub(crate) fn subscribe(&mut self, id: &str, topic: &str) {
        self.topics
            .entry(topic.to_owned())
            .or_default()
            .insert(id.to_owned());
        self.subscriptions
            .entry(id.to_owned())
            .or_default()
            .insert(topic.to_owned());
    }

    /// `id` no longer receives `topic`.
    pub(crate) fn unsubscribe(&mut self, id: &str, topic: &str) {
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

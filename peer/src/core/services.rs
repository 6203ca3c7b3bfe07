//! Services this peer provides and the topics it subscribes to: the core's bookkeeping.
use std::collections::HashMap;
use std::sync::Arc;

use socketio_p2p_signaling::Service;
use socketio_p2p_signaling::protocol::Publication;

use super::reply::TopicSink;

/// Services this peer provides and topics it is subscribed to (owned by the core).
#[derive(Default)]
pub(crate) struct ServiceTable {
    pub(crate) provided: HashMap<String, Arc<Service>>,
    topics: HashMap<String, Vec<(u64, TopicSink)>>,
    next_sub: u64,
}

impl ServiceTable {
    /// Adds a local subscriber; returns its id and whether it is the topic's first one
    /// (then the server must be told).
    pub(crate) fn add_sub(&mut self, topic: &str, tx: TopicSink) -> (u64, bool) {
        self.next_sub += 1;
        let subs = self.topics.entry(topic.to_owned()).or_default();
        subs.push((self.next_sub, tx));
        (self.next_sub, subs.len() == 1)
    }

    /// Removes a local subscriber; true if it was the topic's last one.
    pub(crate) fn remove_sub(&mut self, topic: &str, id: u64) -> bool {
        let Some(subs) = self.topics.get_mut(topic) else {
            return false;
        };
        subs.retain(|(i, _)| *i != id);
        if subs.is_empty() {
            self.topics.remove(topic);
            true
        } else {
            false
        }
    }

    /// Hands a publication to every local subscriber of its topic.
    pub(crate) fn deliver(&mut self, p: Publication) {
        if let Some(subs) = self.topics.get_mut(&p.topic) {
            subs.retain_mut(|(_, tx)| tx(p.clone()));
        }
    }

    /// Topics with local subscribers (sent again after a reconnection).
    pub(crate) fn topics(&self) -> Vec<String> {
        self.topics.keys().cloned().collect()
    }
}

//! What nodes say to each other: the cluster messages, their envelope, the publishing
//! queue, and the [`Cluster`] hooks of a Redis node.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::names::Names;
use super::queue::Out;
use crate::protocol::{CallOutcome, PeerInfo, Resume, events};
use crate::server::P2pSignaling;
use crate::server::cluster::{Claim, Cluster, Name};
use crate::server::state::{EmitFail, PeerSocket, State};

/// Internal event between cluster nodes: a provider's answer to a relayed call.
pub(super) const RELAYED_RESULT: &str = "p2p:cres";

#[derive(Clone, Copy)]
pub(super) enum CtlKind {
    On,
    Off,
}

/// Kinds of cluster messages (first byte).
pub(super) const K_CTL: u8 = b'c';
pub(super) const K_FRAME: u8 = b'f';
pub(super) const K_EVENT: u8 = b'e';

/// Membership and liveness messages.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Ctl {
    /// The node is alive; `digest` sums its peers and their rooms (see `mirror::digest`), so
    /// that a node whose mirror of it drifted (a message lost while Redis failed) notices.
    Heartbeat {
        #[serde(default)]
        digest: Option<u64>,
    },
    /// "Send me all your peers" (to one node's channel, or to all).
    SyncRequest,
    /// "I lost messages (Redis failed me): ask me for my peers" (to all).
    Resync,
    /// All peers of the sending node.
    Sync {
        peers: Vec<SyncPeer>,
    },
    /// A peer registered (or resumed) with these rooms; `token` lets it resume on any node.
    Up {
        peer: PeerInfo,
        rooms: Vec<String>,
        #[serde(default)]
        token: Option<String>,
    },
    Join {
        id: String,
        room: String,
    },
    Leave {
        id: String,
        room: String,
    },
    Pair {
        a: String,
        b: String,
    },
    Down {
        id: String,
    },
    /// A peer of the sending node provides a service (the name is claimed in Redis).
    Provide {
        id: String,
        service: String,
    },
    Unprovide {
        id: String,
        service: String,
    },
    /// A peer of the sending node subscribed to a topic.
    Sub {
        id: String,
        topic: String,
    },
    Unsub {
        id: String,
        topic: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SyncPeer {
    pub(super) peer: PeerInfo,
    pub(super) rooms: Vec<String>,
    pub(super) pairs: Vec<String>,
    #[serde(default)]
    pub(super) token: Option<String>,
    #[serde(default)]
    pub(super) services: Vec<String>,
    #[serde(default)]
    pub(super) topics: Vec<String>,
}

/// `kind`, sender node, target peer (may be empty), rest.
pub(super) fn encode(kind: u8, node: &str, to: &str, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + node.len() + to.len() + rest.len());
    v.push(kind);
    for s in [node, to] {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
    }
    v.extend_from_slice(rest);
    v
}

pub(super) fn decode(msg: &[u8]) -> Option<(u8, &str, &str, &[u8])> {
    let (&kind, mut rest) = msg.split_first()?;
    let mut strs = ["", ""];
    for s in &mut strs {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let bytes = rest.get(2..2 + len)?;
        *s = std::str::from_utf8(bytes).ok()?;
        rest = rest.get(2 + len..)?;
    }
    Some((kind, strs[0], strs[1], rest))
}

/// A node's link to the others: what it needs to publish, and its names.
pub(super) struct Link {
    pub(super) node: String,
    pub(super) prefix: String,
    pub(super) tx: mpsc::UnboundedSender<Out>,
    pub(super) queued_frames: Arc<AtomicUsize>,
    pub(super) max_queue: usize,
    /// False while Redis fails the publisher: frames for other nodes are dropped at once
    /// (the peers' links send them again, at their own pace, once it is back).
    pub(super) up: Arc<AtomicBool>,
    /// Longest wait for a claim.
    pub(super) io_timeout: Duration,
    pub(super) uids: Arc<Names>,
    /// Service names, claimed like uids (keys `<prefix>:svc:<name>`).
    pub(super) svcs: Arc<Names>,
    /// Per node, how its heartbeats' digests disagreed with our mirror of it.
    pub(super) drift: Mutex<HashMap<String, Drift>>,
}

/// Heartbeats of one node whose digest disagreed with our mirror of it, in a row.
#[derive(Debug)]
pub(super) struct Drift {
    misses: u32,
    /// Misses in a row before we ask for a sync: 2 (one may be a message in flight), then
    /// doubling up to 32 while the sync does not repair it.
    wait: u32,
}

impl Default for Drift {
    fn default() -> Self {
        Self { misses: 0, wait: 2 }
    }
}

impl Drift {
    /// One more heartbeat: true when it is time to ask for a full sync.
    pub(super) fn heard(&mut self, agrees: bool) -> bool {
        if agrees {
            *self = Self::default();
            return false;
        }
        self.misses += 1;
        if self.misses < self.wait {
            return false;
        }
        self.misses = 0;
        self.wait = (self.wait * 2).min(32);
        true
    }
}

impl Link {
    pub(super) fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }
    pub(super) fn node_channel(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
    pub(super) fn send(&self, channel: String, payload: Vec<u8>) {
        let _ = self.tx.send(Out::Publish {
            channel,
            payload,
            frames: 0,
        });
    }
    pub(super) fn publish(&self, ctl: &Ctl) {
        self.send_ctl(self.all_channel(), ctl);
    }
    pub(super) fn send_ctl(&self, channel: String, ctl: &Ctl) {
        match serde_json::to_vec(ctl) {
            Ok(json) => self.send(channel, encode(K_CTL, &self.node, "", &json)),
            Err(e) => tracing::error!(%e, "cannot encode a cluster message"),
        }
    }
    pub(super) fn send_event(&self, node: &str, to: &str, event: &str, data: &Json) {
        match serde_json::to_vec(&(event, data)) {
            Ok(json) => self.send(
                self.node_channel(node),
                encode(K_EVENT, &self.node, to, &json),
            ),
            Err(e) => tracing::error!(%e, "cannot encode a cluster message"),
        }
    }
}

impl Link {
    fn names(&self, kind: Name) -> &Arc<Names> {
        match kind {
            Name::Uid => &self.uids,
            Name::Service => &self.svcs,
        }
    }
}

/// A peer of another node, as the local state sees it: frames and signals go to its node;
/// presence and responses are dropped (its own node tells it).
pub(super) struct RemoteSocket {
    pub(super) peer: String,
    pub(super) node: String,
    pub(super) cluster: Arc<Link>,
}

impl PeerSocket for RemoteSocket {
    fn emit_frames(&self, batch: Bytes, frames: usize) -> Result<(), EmitFail> {
        let c = &self.cluster;
        if !c.up.load(Ordering::Acquire) {
            tracing::trace!(frames, "redis unreachable: frames to another node dropped");
            return Ok(());
        }
        if c.queued_frames.fetch_add(frames, Ordering::AcqRel) >= c.max_queue {
            c.queued_frames.fetch_sub(frames, Ordering::AcqRel);
            return Err(EmitFail::Full);
        }
        let payload = encode(K_FRAME, &c.node, &self.peer, &batch);
        let sent = c.tx.send(Out::Publish {
            channel: c.node_channel(&self.node),
            payload,
            frames,
        });
        if sent.is_err() {
            c.queued_frames.fetch_sub(frames, Ordering::AcqRel);
            return Err(EmitFail::Closed);
        }
        Ok(())
    }
    fn emit_json(&self, event: &'static str, data: &Json) -> Result<(), EmitFail> {
        if [
            events::SIGNAL,
            events::ERROR,
            events::CALL,
            events::TOPIC,
            RELAYED_RESULT,
        ]
        .contains(&event)
        {
            self.cluster.send_event(&self.node, &self.peer, event, data);
        }
        Ok(())
    }
}

impl Cluster for Link {
    fn claim(&self, kind: Name, name: &str, peer: &str) -> Claim {
        Claim::Pending(
            self.names(kind)
                .claim(&self.tx, self.io_timeout, name, peer),
        )
    }

    fn release(&self, kind: Name, name: &str, peer: &str) {
        let mine = self.names(kind).release(&self.tx, name, peer);
        if mine && kind == Name::Service {
            self.publish(&Ctl::Unprovide {
                id: peer.to_owned(),
                service: name.to_owned(),
            });
        }
    }

    fn holder(&self, uid: &str) -> Option<String> {
        self.uids.holder(uid)
    }

    fn up(&self, st: &State, id: &str) {
        if let Some(conn) = st.conns.get(id)
            && let Some(info) = &conn.info
        {
            if let Some(uid) = &info.uid {
                self.uids.note(uid, id);
            }
            let mut rooms: Vec<String> = conn.rooms.iter().cloned().collect();
            rooms.sort();
            self.publish(&Ctl::Up {
                peer: info.clone(),
                rooms,
                token: st.issued.get(id).map(|(t, _)| t.clone()),
            });
        }
    }

    fn joined(&self, id: &str, room: &str) {
        self.publish(&Ctl::Join {
            id: id.to_owned(),
            room: room.to_owned(),
        });
    }

    fn left(&self, id: &str, room: &str) {
        self.publish(&Ctl::Leave {
            id: id.to_owned(),
            room: room.to_owned(),
        });
    }

    fn paired(&self, a: &str, b: &str) {
        self.publish(&Ctl::Pair {
            a: a.to_owned(),
            b: b.to_owned(),
        });
    }

    fn down(&self, id: &str) {
        self.publish(&Ctl::Down { id: id.to_owned() });
    }

    fn provided(&self, id: &str, service: &str) {
        self.publish(&Ctl::Provide {
            id: id.to_owned(),
            service: service.to_owned(),
        });
    }

    fn topic(&self, id: &str, topic: &str, on: bool) {
        let (id, topic) = (id.to_owned(), topic.to_owned());
        self.publish(&if on {
            Ctl::Sub { id, topic }
        } else {
            Ctl::Unsub { id, topic }
        });
    }

    fn call_result(&self, node: &str, caller: &str, cid: u64, outcome: &CallOutcome) {
        let data = serde_json::json!({ "cid": cid, "outcome": outcome });
        self.send_event(node, caller, RELAYED_RESULT, &data);
    }

    /// A peer of another node that resumes here with its token becomes an away peer of
    /// ours, so that the ordinary resume takes it (same id, rooms, pairs and uid; the other
    /// node hears of it from our `Up`).
    fn take_over(&self, sig: &P2pSignaling, st: &mut State, resume: Option<&Resume>) {
        let Some(r) = resume else { return };
        if !st.remote.contains_key(&r.id) || st.issued.get(&r.id).is_none_or(|(t, _)| *t != r.token)
        {
            return;
        }
        st.next_token += 1;
        let n = st.next_token;
        let Some(conn) = st.conns.get_mut(&r.id) else {
            return;
        };
        conn.away = Some(n);
        st.remote.remove(&r.id);
        tracing::debug!(id = %r.id, "peer of another node resumes here");
        // Should the resume fail after all, the peer is gone once the grace period ends.
        sig.forget_if_still_away(r.id.clone(), n, sig.inner.opts.resume_grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let v = encode(K_FRAME, "node1", "peer", b"\x00rest");
        assert_eq!(
            decode(&v),
            Some((K_FRAME, "node1", "peer", &b"\x00rest"[..]))
        );
        assert_eq!(decode(&v[..4]), None);
        assert_eq!(decode(b""), None);
    }
}

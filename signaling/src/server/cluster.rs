//! What a signaling server tells the other nodes of its cluster, and the names (uids,
//! service names) that must be unique across the cluster.
//!
//! A single node uses [`LocalCluster`]: names are unique in this process and nobody else is
//! told anything. The Redis cluster (cargo feature `redis`) implements the same trait.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use super::P2pSignaling;
use super::state::State;
use crate::protocol::{CallOutcome, Resume};

/// The kinds of names a cluster keeps unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    /// A peer's uid (`hello`).
    Uid,
    /// A service name (`provide`).
    Service,
}

/// Why a claim failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimFail {
    /// Another peer holds the name.
    Taken,
    /// Nobody can tell whether the name is free (the store is unreachable): refused.
    #[allow(dead_code, reason = "only a cluster store can be unreachable")]
    Unreachable,
}

/// A claim that completes later, without the state lock.
pub(crate) type ClaimFuture = Pin<Box<dyn Future<Output = Result<(), ClaimFail>> + Send>>;

/// The answer to a claim: at once (the caller holds the state lock), or later.
pub(crate) enum Claim {
    /// Decided now.
    Done(Result<(), ClaimFail>),
    /// Await it without holding the state lock, then take the lock to commit (or release the
    /// name if the request cannot be committed any more).
    #[allow(dead_code, reason = "only a cluster store answers later")]
    Pending(ClaimFuture),
}

/// The cluster a node belongs to. Every method but `claim` is called with the state lock
/// held and must not block.
pub(crate) trait Cluster: Send + Sync {
    /// Claims `name` for `peer` (succeeds if `peer` already holds it).
    fn claim(&self, kind: Name, name: &str, peer: &str) -> Claim;
    /// Releases `name` if `peer` holds it (for a service: the others hear it is gone).
    fn release(&self, kind: Name, name: &str, peer: &str);
    /// Who holds uid `uid`, as far as this node knows.
    fn holder(&self, uid: &str) -> Option<String>;
    /// A local peer registered (or resumed).
    fn up(&self, _st: &State, _id: &str) {}
    /// A local peer joined a room.
    fn joined(&self, _id: &str, _room: &str) {}
    /// A local peer left a room.
    fn left(&self, _id: &str, _room: &str) {}
    /// Local peer `a` paired with `b`.
    fn paired(&self, _a: &str, _b: &str) {}
    /// A local peer is gone.
    fn down(&self, _id: &str) {}
    /// A local peer provides `service` (whose name it claimed).
    fn provided(&self, _id: &str, _service: &str) {}
    /// A local peer subscribed to (or unsubscribed from) `topic`.
    fn topic(&self, _id: &str, _topic: &str, _on: bool) {}
    /// Our provider answered call `cid` that `node` relayed for its peer `caller`.
    fn call_result(&self, _node: &str, _caller: &str, _cid: u64, _outcome: &CallOutcome) {}
    /// Before a `hello` decides on its resume: a peer of another node that resumes here
    /// becomes an away peer of ours, so that the ordinary resume takes it.
    fn take_over(&self, _sig: &P2pSignaling, _st: &mut State, _resume: Option<&Resume>) {}
}

/// A server on its own: uids are unique in this process, service names in the state.
#[derive(Default)]
pub(crate) struct LocalCluster {
    uids: Mutex<HashMap<String, String>>,
}

impl Cluster for LocalCluster {
    fn claim(&self, kind: Name, name: &str, peer: &str) -> Claim {
        if kind == Name::Service {
            // The state's provider table is the only authority on one node.
            return Claim::Done(Ok(()));
        }
        let mut map = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        Claim::Done(match map.get(name) {
            Some(holder) if holder != peer => Err(ClaimFail::Taken),
            _ => {
                map.insert(name.to_owned(), peer.to_owned());
                Ok(())
            }
        })
    }
    fn release(&self, kind: Name, name: &str, peer: &str) {
        if kind == Name::Service {
            return;
        }
        let mut map = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|h| h == peer) {
            map.remove(name);
        }
    }
    fn holder(&self, uid: &str) -> Option<String> {
        let map = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        map.get(uid).cloned()
    }
}

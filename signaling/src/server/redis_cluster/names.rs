//! Names unique across the cluster (uids, service names): keys `<prefix>:<kind>:<name>`
//! holding the peer id, claimed by a compare-and-set script, refreshed by the holder node's
//! heartbeat and expiring after `node_timeout`.
//!
//! Claims, releases and refreshes all go through the node's one publishing queue, so Redis
//! sees them in the order the node made them (a uid released and claimed again right after
//! is free for the second claim).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::queue::Out;
use crate::server::cluster::{ClaimFail, ClaimFuture};

/// Takes a uid if it is free or already ours; refreshes its expiry either way.
pub(super) const CLAIM: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
    return 0";
/// Deletes a uid if `ARGV[1]` still holds it.
pub(super) const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
/// Extends a name if `ARGV[1]` still holds it, and takes it back if it is gone (a Redis
/// that restarted has lost every key): the same script as a claim.
pub(super) const REFRESH: &str = CLAIM;

/// Names of one kind: Redis decides who holds them; the mirror answers `holder`.
pub(super) struct Names {
    key_prefix: String,
    /// name -> peer id, for every peer of the cluster this node knows of.
    known: Mutex<HashMap<String, String>>,
    /// name -> peer id, for this node's own peers (refreshed by the heartbeat).
    local: Mutex<HashMap<String, String>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Names {
    /// Names of one kind (`uid`, `svc`): keys `<prefix>:<kind>:<name>`.
    pub(super) fn new(prefix: &str, kind: &str) -> Self {
        Self {
            key_prefix: format!("{prefix}:{kind}:"),
            known: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.key_prefix)
    }

    /// A peer (of any node) holds `name`.
    pub(super) fn note(&self, name: &str, peer: &str) {
        guard(&self.known).insert(name.to_owned(), peer.to_owned());
    }

    /// Who holds `name`, as far as this node knows.
    pub(super) fn holder(&self, name: &str) -> Option<String> {
        guard(&self.known).get(name).cloned()
    }

    /// Our peer `peer` no longer holds `name` here (it lives on another node now).
    pub(super) fn forget_local(&self, name: &str) {
        guard(&self.local).remove(name);
    }

    /// Refreshes (or claims again) every name of this node's peers. The lock is held while
    /// the refresh is queued, so that it cannot overtake a release of one of them (which
    /// would claim the released name back).
    pub(super) fn refresh(&self, tx: &mpsc::UnboundedSender<Out>) {
        let local = guard(&self.local);
        if local.is_empty() {
            return;
        }
        let list = local
            .iter()
            .map(|(u, p)| (REFRESH, self.key(u), p.clone()))
            .collect();
        let _ = tx.send(Out::Eval(list));
    }

    /// Claims `name` for our peer `peer`, through the publishing queue, waiting at most
    /// `wait` for the answer. Fails closed: without Redis nobody can tell whether the name
    /// is free.
    pub(super) fn claim(
        self: &Arc<Self>,
        tx: &mpsc::UnboundedSender<Out>,
        wait: Duration,
        name: &str,
        peer: &str,
    ) -> ClaimFuture {
        let (names, tx) = (self.clone(), tx.clone());
        let (name, peer) = (name.to_owned(), peer.to_owned());
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let key = names.key(&name);
            let asked = tx.send(Out::Claim {
                key: key.clone(),
                peer: peer.clone(),
                reply,
            });
            let result = match asked {
                Err(_) => Err(ClaimFail::Unreachable),
                Ok(()) => match tokio::time::timeout(wait, answer).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) | Err(_) => Err(ClaimFail::Unreachable),
                },
            };
            match result {
                // Others learn who holds it once the request commits (`Link::up`).
                Ok(()) => {
                    guard(&names.local).insert(name.clone(), peer.clone());
                }
                Err(ClaimFail::Unreachable) => {
                    tracing::warn!(name, "redis unreachable or too slow: name refused");
                    // Should the claim still land, undo it (the queue keeps the order),
                    // unless the peer held the name already.
                    let held = guard(&names.local).get(&name).is_some_and(|p| *p == peer);
                    if !held {
                        let _ = tx.send(Out::Eval(vec![(RELEASE, key, peer)]));
                    }
                }
                Err(ClaimFail::Taken) => {}
            }
            result
        })
    }

    /// Releases `name` if `peer` holds it; true if it was ours to release (a claim of this
    /// node), and then the release is queued.
    pub(super) fn release(&self, tx: &mpsc::UnboundedSender<Out>, name: &str, peer: &str) -> bool {
        {
            let mut known = guard(&self.known);
            if known.get(name).is_some_and(|p| p == peer) {
                known.remove(name);
            }
        }
        let mut local = guard(&self.local);
        let mine = local.get(name).is_some_and(|p| p == peer);
        if mine {
            local.remove(name);
            let _ = tx.send(Out::Eval(vec![(RELEASE, self.key(name), peer.to_owned())]));
        }
        mine
    }
}

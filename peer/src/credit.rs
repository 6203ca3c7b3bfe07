//! Send credit, shared by the `P2p` handles and the actor, so that `emit` needs no round
//! trip to the actor: a handle takes credit for the frames of its message and queues it; the
//! actor gives the credit back as the peer acknowledges them. `emit` waits only while a
//! target already has its bound of frames queued or in flight (flow control end to end),
//! and fails at once for an unknown peer.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::Notify;

use crate::error::{Error, Result};

/// One peer's credit.
#[derive(Debug, Default)]
struct PeerCredit {
    /// Frames taken by emits and not yet acknowledged.
    queued: AtomicUsize,
    /// Messages to this peer go through the server (not a data channel).
    on_relay: AtomicBool,
}

#[derive(Debug, Default)]
struct Table {
    peers: HashMap<String, Arc<PeerCredit>>,
    closed: bool,
}

/// The credit of every peer this `P2p` can reach.
#[derive(Debug)]
pub(crate) struct Credits {
    table: RwLock<Table>,
    /// Frames a peer may have queued before `emit` waits.
    limit: usize,
    /// The server connection is up (while it is down, a full relay backlog is an error).
    connected: AtomicBool,
    released: Notify,
}

impl Credits {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            table: RwLock::default(),
            limit: limit.max(1),
            connected: AtomicBool::new(true),
            released: Notify::new(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `frames` of credit on `target` (or on every peer), waiting while a target is
    /// at its limit. Returns the targets the message goes to. While the server connection
    /// is down, a relay target at its limit is `QueueFull` at once (an emit that was
    /// already waiting goes on waiting: its messages are queued behind the others).
    pub(crate) async fn acquire(&self, target: Option<&str>, frames: usize) -> Result<Vec<String>> {
        let mut first = true;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let t = self.read();
                if t.closed {
                    return Err(Error::Closed);
                }
                let targets: Vec<(&String, &Arc<PeerCredit>)> = match target {
                    Some(id) => match t.peers.get_key_value(id) {
                        Some(entry) => vec![entry],
                        None => return Err(Error::PeerOffline(id.to_owned())),
                    },
                    None => t.peers.iter().collect(),
                };
                let full: Vec<&Arc<PeerCredit>> = targets
                    .iter()
                    .map(|(_, c)| *c)
                    .filter(|c| c.queued.load(Ordering::Acquire) >= self.limit)
                    .collect();
                if full.is_empty() {
                    for (_, c) in &targets {
                        c.queued.fetch_add(frames, Ordering::AcqRel);
                    }
                    return Ok(targets.into_iter().map(|(id, _)| id.clone()).collect());
                }
                if first
                    && !self.connected.load(Ordering::Acquire)
                    && full.iter().any(|c| c.on_relay.load(Ordering::Acquire))
                {
                    return Err(Error::QueueFull(
                        "reconnecting to the server and the backlog is full".into(),
                    ));
                }
            }
            first = false;
            released.await;
        }
    }

    /// Fails like `acquire` for a peer this `P2p` cannot reach (volatile sends take no credit).
    pub(crate) fn check(&self, target: Option<&str>) -> Result<()> {
        let t = self.read();
        if t.closed {
            return Err(Error::Closed);
        }
        match target {
            Some(id) if !t.peers.contains_key(id) => Err(Error::PeerOffline(id.to_owned())),
            _ => Ok(()),
        }
    }

    /// Gives back `frames` of credit: the peer acknowledged them, or the actor could not
    /// queue the message (the target was gone).
    pub(crate) fn release(&self, peer: &str, frames: usize) {
        if frames == 0 {
            return;
        }
        if let Some(c) = self.read().peers.get(peer) {
            let _ = c
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    Some(q.saturating_sub(frames))
                });
        }
        self.released.notify_waiters();
    }

    /// A peer became reachable (fresh credit).
    pub(crate) fn add_peer(&self, peer: &str) {
        let credit = PeerCredit {
            queued: AtomicUsize::new(0),
            on_relay: AtomicBool::new(true),
        };
        self.write().peers.insert(peer.to_owned(), Arc::new(credit));
    }

    /// A peer is gone: emits waiting for it fail or go on without it.
    pub(crate) fn remove_peer(&self, peer: &str) {
        self.write().peers.remove(peer);
        self.released.notify_waiters();
    }

    /// Which transport carries messages to `peer` now.
    pub(crate) fn set_relay(&self, peer: &str, on_relay: bool) {
        if let Some(c) = self.read().peers.get(peer) {
            c.on_relay.store(on_relay, Ordering::Release);
        }
        self.released.notify_waiters();
    }

    /// The server connection went down or came back.
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.released.notify_waiters();
    }

    /// The `P2p` closed: every emit fails from now on.
    pub(crate) fn close(&self) {
        let mut t = self.write();
        t.closed = true;
        t.peers.clear();
        drop(t);
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_at_the_limit_and_goes_on_when_released() {
        let c = Arc::new(Credits::new(4));
        c.add_peer("b");
        assert!(matches!(
            c.acquire(Some("x"), 1).await,
            Err(Error::PeerOffline(_))
        ));
        assert_eq!(
            c.acquire(Some("b"), 4).await.ok(),
            Some(vec!["b".to_owned()])
        );
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.acquire(None, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a full peer makes emit wait");
        c.release("b", 1);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(got, Ok(Ok(Ok(ref v))) if v == &["b".to_owned()]));
    }

    #[tokio::test]
    async fn full_relay_backlog_while_disconnected_is_an_error() {
        let c = Credits::new(2);
        c.add_peer("b");
        assert!(c.acquire(Some("b"), 2).await.is_ok());
        c.set_connected(false);
        assert!(matches!(
            c.acquire(Some("b"), 1).await,
            Err(Error::QueueFull(_))
        ));
        c.close();
        assert!(matches!(c.acquire(None, 1).await, Err(Error::Closed)));
    }
}

//! Delivery of received events to handlers and streams, in a task of its own so that slow
//! handlers never stall the actor (a full queue slows the senders down instead).
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::payload::{Event, PeerEvent};

pub(crate) type EventHandler = Arc<dyn Fn(Event) + Send + Sync>;
pub(crate) type PeerHandler = Arc<dyn Fn(PeerEvent) + Send + Sync>;

struct Entry {
    id: u64,
    event: Option<String>,
    from: Option<String>,
    once: bool,
    f: EventHandler,
}

struct StreamEntry {
    event: Option<String>,
    from: Option<String>,
    tx: mpsc::Sender<Event>,
}

#[derive(Default)]
pub(crate) struct Handlers {
    next_id: u64,
    entries: Vec<Entry>,
    streams: Vec<StreamEntry>,
    peer_handlers: Vec<(u64, PeerHandler)>,
    peer_streams: Vec<mpsc::Sender<PeerEvent>>,
}

/// Shared registry of handlers (written by `P2p` handles, read by the dispatcher).
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<Handlers>>);

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Handlers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn add(
        &self,
        event: Option<String>,
        from: Option<String>,
        once: bool,
        f: EventHandler,
    ) -> u64 {
        let mut h = self.lock();
        h.next_id += 1;
        let id = h.next_id;
        h.entries.push(Entry {
            id,
            event,
            from,
            once,
            f,
        });
        id
    }
    /// Removes the handlers of `event` (all events' handlers registered with `on_any` when
    /// `event` is None), limited to those of `from` when given.
    pub(crate) fn remove(&self, event: Option<&str>, from: Option<&str>) {
        self.lock().entries.retain(|e| {
            !(e.event.as_deref() == event && (from.is_none() || e.from.as_deref() == from))
        });
    }
    pub(crate) fn remove_id(&self, id: u64) {
        let mut h = self.lock();
        h.entries.retain(|e| e.id != id);
        h.peer_handlers.retain(|(i, _)| *i != id);
    }
    pub(crate) fn stream(
        &self,
        event: Option<String>,
        from: Option<String>,
        cap: usize,
    ) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(cap);
        self.lock().streams.push(StreamEntry { event, from, tx });
        rx
    }
    pub(crate) fn on_peer_event(&self, f: PeerHandler) -> u64 {
        let mut h = self.lock();
        h.next_id += 1;
        let id = h.next_id;
        h.peer_handlers.push((id, f));
        id
    }
    pub(crate) fn peer_stream(&self, cap: usize) -> mpsc::Receiver<PeerEvent> {
        let (tx, rx) = mpsc::channel(cap);
        self.lock().peer_streams.push(tx);
        rx
    }
    /// Drops every handler whose `from` filter names this peer (it is gone).
    pub(crate) fn forget_peer(&self, peer: &str) {
        let mut h = self.lock();
        h.entries.retain(|e| e.from.as_deref() != Some(peer));
        h.streams.retain(|s| s.from.as_deref() != Some(peer));
    }
}

/// The dispatcher task: runs until the actor drops its senders.
pub(crate) async fn run(
    registry: Registry,
    mut events: mpsc::Receiver<Event>,
    mut peer_events: mpsc::UnboundedReceiver<PeerEvent>,
) {
    loop {
        tokio::select! {
            biased;
            Some(pe) = peer_events.recv() => dispatch_peer_event(&registry, pe).await,
            ev = events.recv() => match ev {
                Some(ev) => dispatch_event(&registry, ev).await,
                None => break,
            },
        }
    }
    while let Ok(pe) = peer_events.try_recv() {
        dispatch_peer_event(&registry, pe).await;
    }
}

async fn dispatch_event(registry: &Registry, ev: Event) {
    let (handlers, streams) = {
        let mut h = registry.lock();
        let matches = |event: &Option<String>, from: &Option<String>| {
            event.as_deref().is_none_or(|e| e == ev.name())
                && from.as_deref().is_none_or(|f| f == ev.from())
        };
        let handlers: Vec<EventHandler> = h
            .entries
            .iter()
            .filter(|e| matches(&e.event, &e.from))
            .map(|e| e.f.clone())
            .collect();
        h.entries
            .retain(|e| !(e.once && matches(&e.event, &e.from)));
        h.streams.retain(|s| !s.tx.is_closed());
        let streams: Vec<mpsc::Sender<Event>> = h
            .streams
            .iter()
            .filter(|s| matches(&s.event, &s.from))
            .map(|s| s.tx.clone())
            .collect();
        (handlers, streams)
    };
    if handlers.is_empty() && streams.is_empty() {
        if ev.wants_reply() {
            ev.reply_error(
                "NoHandler",
                &format!("no handler for event {:?}", ev.name()),
            );
        }
        tracing::debug!(
            event = ev.name(),
            from = ev.from(),
            "event without handler dropped"
        );
        return;
    }
    for f in handlers {
        f(ev.clone());
    }
    for tx in streams {
        let _ = tx.send(ev.clone()).await;
    }
}

async fn dispatch_peer_event(registry: &Registry, pe: PeerEvent) {
    if let PeerEvent::Disconnected { peer } | PeerEvent::Left { peer, .. } = &pe
        && matches!(pe, PeerEvent::Disconnected { .. })
    {
        registry.forget_peer(&peer.id);
    }
    let (handlers, streams) = {
        let mut h = registry.lock();
        h.peer_streams.retain(|s| !s.is_closed());
        (h.peer_handlers.clone(), h.peer_streams.clone())
    };
    for (_, f) in handlers {
        f(pe.clone());
    }
    for tx in streams {
        let _ = tx.send(pe.clone()).await;
    }
}

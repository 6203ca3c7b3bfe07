//! The small handles a `P2p` gives out: targeted sends ([`To`]), per-sender handlers
//! ([`FromPeer`]) and event streams.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::core::Command as Cmd;
use crate::error::Result;
use crate::payload::{Event, Payload, PeerEvent};
use crate::{HandlerId, P2p};

/// Sends to one peer; see [`P2p::to`].
#[derive(Debug)]
#[must_use = "`to` only targets a peer: call `emit` or `emit_with_ack` on it"]
pub struct To<'a> {
    pub(crate) p2p: &'a P2p,
    pub(crate) peer: String,
    pub(crate) timeout: Duration,
}

impl To<'_> {
    /// How long [`To::emit_with_ack`] waits for the reply (default
    /// [`P2pOptions::ack_timeout`](crate::P2pOptions::ack_timeout)).
    ///
    /// ```no_run
    /// # async fn run(p2p: socketio_p2p::P2p) -> Result<(), socketio_p2p::Error> {
    /// use std::time::Duration;
    /// let answer = p2p.to("peer-id").timeout(Duration::from_secs(2)).emit_with_ack("ask", "?").await?;
    /// # Ok(()) }
    /// ```
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Sends an event to this peer (reliable, ordered).
    pub async fn emit(&self, event: &str, payload: impl Into<Payload>) -> Result<()> {
        self.p2p
            .emit_inner(Some(self.peer.clone()), event, payload.into(), false)
            .await
    }
    /// Sends a best-effort event to this peer.
    pub async fn emit_volatile(&self, event: &str, payload: impl Into<Payload>) -> Result<()> {
        self.p2p
            .emit_inner(Some(self.peer.clone()), event, payload.into(), true)
            .await
    }
    /// Sends an event and waits for the reply, at most the timeout ([`To::timeout`]).
    pub async fn emit_with_ack(&self, event: &str, payload: impl Into<Payload>) -> Result<Payload> {
        let timeout = self.timeout;
        let payload = self.p2p.wire(&payload.into())?;
        let frames = crate::core::frames_of(&payload);
        self.p2p
            .inner
            .credits
            .acquire(Some(&self.peer), frames)
            .await?;
        self.p2p
            .call(|reply| Cmd::EmitAck {
                peer: self.peer.clone(),
                event: event.to_owned(),
                payload,
                frames,
                timeout,
                reply,
            })
            .await
    }
}

/// Listens to one peer; see [`P2p::from`].
#[derive(Debug)]
#[must_use = "`from` only selects a peer: call `on` or `events` on it"]
pub struct FromPeer<'a> {
    pub(crate) p2p: &'a P2p,
    pub(crate) peer: String,
}

impl FromPeer<'_> {
    /// Handles `event` from this peer only.
    pub fn on(&self, event: &str, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(self.p2p.inner.registry.add(
            Some(event.to_owned()),
            Some(self.peer.clone()),
            false,
            Arc::new(handler),
        ))
    }
    /// Handles the next `event` from this peer only.
    pub fn once(&self, event: &str, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(self.p2p.inner.registry.add(
            Some(event.to_owned()),
            Some(self.peer.clone()),
            true,
            Arc::new(handler),
        ))
    }
    /// Handles every event from this peer.
    pub fn on_any(&self, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(self.p2p.inner.registry.add(
            None,
            Some(self.peer.clone()),
            false,
            Arc::new(handler),
        ))
    }
    /// Removes this peer's handlers of `event`.
    pub fn off(&self, event: &str) {
        self.p2p
            .inner
            .registry
            .remove(Some(event), Some(&self.peer));
    }
    /// This peer's events as a stream.
    pub fn events(&self) -> EventStream {
        EventStream(self.p2p.inner.registry.stream(
            None,
            Some(self.peer.clone()),
            self.p2p.inner.events_capacity,
        ))
    }
}

/// A stream of received events (see [`P2p::events`]). A slow reader slows the senders down.
#[derive(Debug)]
pub struct EventStream(pub(crate) mpsc::Receiver<Event>);

impl EventStream {
    /// The next event (`None` once the `P2p` is closed).
    pub async fn next(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

impl Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.0.poll_recv(cx)
    }
}

/// A stream of lifecycle events (see [`P2p::peer_events`]).
#[derive(Debug)]
pub struct PeerEventStream(pub(crate) mpsc::Receiver<PeerEvent>);

impl PeerEventStream {
    /// The next lifecycle event.
    pub async fn next(&mut self) -> Option<PeerEvent> {
        self.0.recv().await
    }
}

impl Stream for PeerEventStream {
    type Item = PeerEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PeerEvent>> {
        self.0.poll_recv(cx)
    }
}

//! # socketio-p2p
//!
//! Peer-to-peer events over Socket.IO that upgrade to WebRTC data channels.
//!
//! A [`P2p`] wraps a [rust_socketio](https://docs.rs/rust_socketio) client connected to a
//! server running [`socketio_p2p_signaling::P2pSignaling`]. Events go to the other peers of
//! your rooms through the server first; once WebRTC is up (automatically, or on
//! [`P2p::upgrade`]), they go over direct data channels. The API is the same on both
//! transports, acks and binary included, and a peer whose data channel dies goes back to
//! the relay by itself.
//!
//! ```no_run
//! use socketio_p2p::{P2p, P2pOptions};
//! # async fn run() -> Result<(), socketio_p2p::Error> {
//! let p2p = P2p::connect("http://127.0.0.1:3000", P2pOptions::default().room("chat")).await?;
//! p2p.on("peer-msg", |ev| println!("{} says {:?}", ev.from(), ev.payload()));
//! p2p.emit("peer-msg", "hello").await?;
//! let answer = p2p.to("some-peer-id").emit_with_ack("ping", ()).await;
//! # Ok(()) }
//! ```
mod core;
mod credit;
mod dispatch;
mod driver;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handles;
mod options;
mod payload;
#[cfg(feature = "webrtc")]
mod rtc;
mod services;
mod stats;
mod stream;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use rust_socketio::asynchronous::ClientBuilder;
use socketio_p2p_signaling::protocol::Op;
use tokio::sync::{mpsc, oneshot};

pub use error::{Cause, Error, Result};
pub use handles::{EventStream, FromPeer, PeerEventStream, To};
pub use options::{DEFAULT_ROOM, IceServer, P2pOptions};
pub use payload::{Event, Payload, PeerEvent, Transport};
pub use rust_socketio;
pub use services::{ServiceRef, Subscription};
pub use socketio_p2p_signaling::protocol::Publication;
use socketio_p2p_signaling::protocol::WirePayload;
pub use socketio_p2p_signaling::protocol::{ErrorCode, PeerInfo};
pub use socketio_p2p_signaling::{Service, ServiceError};
pub use stats::{CandidateKind, CandidatePair, Path, PeerStats, UpgradeFailure};
pub use stream::{IncomingStream, P2pStream};

use crate::core::streams::StreamCmd;
use crate::core::{Command as Cmd, NetIn, Reply};
use dispatch::Registry;

/// Publications a [`Subscription`] holds before it misses some.
const SUBSCRIPTION_QUEUE: usize = 1024;

/// A reply that goes to a oneshot channel.
fn reply_to<T: Send + 'static>(tx: oneshot::Sender<Result<T>>) -> Reply<T> {
    Box::new(move |r| {
        let _ = tx.send(r);
    })
}

/// Identifies a handler registered with [`P2p::on`] and friends, for [`P2p::off_handler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

pub(crate) struct Inner {
    pub(crate) cmds: mpsc::UnboundedSender<Cmd>,
    pub(crate) credits: Arc<credit::Credits>,
    pub(crate) max_message_size: usize,
    pub(crate) registry: Registry,
    pub(crate) me: PeerInfo,
    pub(crate) ack_timeout: Duration,
    pub(crate) events_capacity: usize,
    pub(crate) streams: mpsc::UnboundedSender<StreamCmd>,
    pub(crate) incoming: tokio::sync::Mutex<mpsc::Receiver<IncomingStream>>,
}

/// A peer: the handle to one connection to a `P2pSignaling` server and to every peer met
/// there. Cheap to clone; the connection closes when the last clone is dropped or on
/// [`P2p::close`].
#[derive(Clone)]
pub struct P2p {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for P2p {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2p")
            .field("id", &self.inner.me.id)
            .field("uid", &self.inner.me.uid)
            .finish()
    }
}

impl P2p {
    /// Connects to `url` (e.g. `http://127.0.0.1:3000`, root namespace) and registers.
    ///
    /// The connection is a websocket from the start (no HTTP long-polling phase): a
    /// reconnection then takes one handshake, and what was queued meanwhile cannot break
    /// a polling session (its packets would go as concurrent POSTs).
    pub async fn connect(url: &str, opts: P2pOptions) -> Result<P2p> {
        let builder =
            ClientBuilder::new(url).transport_type(rust_socketio::TransportType::Websocket);
        Self::new(builder, opts).await
    }

    /// Builds the peer on a rust_socketio [`ClientBuilder`] (set the address, namespace,
    /// TLS or headers on it first).
    ///
    /// It takes the builder rather than a connected client because rust_socketio only
    /// accepts event handlers before `connect()`: `P2p` adds its own for the `p2p:*`
    /// events, connects, waits for the server's CONNECT (so nothing is sent before the
    /// server listens), registers, and, with [`P2pOptions::peer_uid`], waits until the pair
    /// is up and an echo went both ways.
    pub async fn new(builder: ClientBuilder, opts: P2pOptions) -> Result<P2p> {
        let (net_tx, net_rx) = mpsc::unbounded_channel::<NetIn>();
        let (min, max) = opts.reconnect_delay;
        let mut builder = builder
            .reconnect(opts.reconnect)
            .reconnect_on_disconnect(opts.reconnect)
            .reconnect_delay(min.as_millis() as u64, max.as_millis() as u64);
        if let Some(auth) = &opts.auth {
            builder = builder.auth(auth.clone());
        }
        let builder = transport::relay::wire(builder, net_tx);
        let client = builder
            .connect()
            .await
            .map_err(|e| Error::Connection(Cause::new(e)))?;

        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(opts.events_capacity);
        let (pe_tx, pe_rx) = mpsc::unbounded_channel();
        let (stream_tx, stream_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(core::streams::INCOMING_QUEUE);
        let registry = Registry::default();
        tokio::spawn(dispatch::run(registry.clone(), ev_rx, pe_rx));
        let credits = Arc::new(credit::Credits::new(opts.window * 4));
        let max_message_size = opts.max_message_size;
        let (ready_tx, ready_rx) = oneshot::channel();
        let ack_timeout = opts.ack_timeout;
        let events_capacity = opts.events_capacity;
        let rtc = driver::RtcSetup {
            cfg: transport::webrtc::config_of(&opts),
            hang: opts.rtc_hang,
        };
        let core = core::Core::new(opts, tokio::time::Instant::now().into_std());
        let driver = driver::Driver::new(
            core,
            transport::relay::Relay::spawn(client),
            rtc,
            driver::Inbox {
                cmds: cmd_rx,
                net: net_rx,
                streams: stream_rx,
            },
            driver::Outbox {
                events: ev_tx,
                peer_events: pe_tx,
                incoming: incoming_tx,
                stream_tx: stream_tx.clone(),
                credits: credits.clone(),
            },
            ready_tx,
        );
        tokio::spawn(driver.run());
        let me = ready_rx.await.map_err(|_| Error::Closed)??;
        Ok(P2p {
            inner: Arc::new(Inner {
                cmds: cmd_tx,
                credits,
                max_message_size,
                registry,
                me,
                ack_timeout,
                events_capacity,
                streams: stream_tx,
                incoming: tokio::sync::Mutex::new(incoming_rx),
            }),
        })
    }

    /// This peer's server-assigned id.
    pub fn id(&self) -> &str {
        &self.inner.me.id
    }

    /// The uid this peer holds, if it claimed one.
    pub fn uid(&self) -> Option<&str> {
        self.inner.me.uid.as_deref()
    }

    pub(crate) fn send(&self, cmd: Cmd) -> Result<()> {
        self.inner.cmds.send(cmd).map_err(|_| Error::Closed)
    }

    pub(crate) async fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Cmd,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(reply_to(tx)))?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Serializes a payload here, in the caller's task, and checks its size.
    pub(crate) fn wire(&self, payload: &Payload) -> Result<WirePayload> {
        let wire = payload.to_wire()?;
        let size = wire.bytes().len();
        let max = self.inner.max_message_size;
        if size > max {
            return Err(Error::PayloadTooLarge { size, max });
        }
        Ok(wire)
    }

    pub(crate) async fn emit_inner(
        &self,
        target: Option<String>,
        event: &str,
        payload: Payload,
        volatile: bool,
    ) -> Result<()> {
        let payload = self.wire(&payload)?;
        if volatile {
            if payload.bytes().len() > core::CHUNK {
                return Err(Error::PayloadTooLarge {
                    size: payload.bytes().len(),
                    max: core::CHUNK,
                });
            }
            self.inner.credits.check(target.as_deref())?;
            return self.send(Cmd::Volatile {
                target,
                event: event.to_owned(),
                payload,
            });
        }
        // No round trip to the actor: take credit (waiting only while a target is too far
        // behind) and queue the message.
        let frames = core::frames_of(&payload);
        let targets = self
            .inner
            .credits
            .acquire(target.as_deref(), frames)
            .await?;
        if targets.is_empty() {
            return Ok(());
        }
        self.send(Cmd::Emit {
            targets,
            event: event.to_owned(),
            payload,
            frames,
        })
    }

    /// Sends an event to every peer of this peer's rooms and pair. Returns once the event is
    /// queued on every link (it waits while a receiver is too far behind: flow control).
    /// Delivery is reliable and in order per peer, over whichever transport is up.
    pub async fn emit(&self, event: &str, payload: impl Into<Payload>) -> Result<()> {
        self.emit_inner(None, event, payload.into(), false).await
    }

    /// Sends an event to every peer and waits for each one's reply.
    pub async fn emit_with_ack(
        &self,
        event: &str,
        payload: impl Into<Payload>,
    ) -> Result<Vec<(String, Result<Payload>)>> {
        let payload = payload.into();
        let peers = self.peers().await?;
        let calls = peers.into_iter().map(|p| {
            let payload = payload.clone();
            async move {
                let r = self.to(&p.id).emit_with_ack(event, payload).await;
                (p.id, r)
            }
        });
        Ok(futures_util::future::join_all(calls).await)
    }

    /// Opens a byte stream to `peer` (any peer of this one's rooms or pair), named `name`
    /// for the other side. Returns once the peer accepted it ([`P2p::accept_stream`]);
    /// [`Error::StreamRefused`] if it refused, [`Error::Timeout`] after `request_timeout`.
    ///
    /// ```no_run
    /// # async fn run(p2p: socketio_p2p::P2p) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::AsyncWriteExt;
    /// let mut stream = p2p.open_stream("peer-id", "photo.jpg").await?;
    /// stream.write_all(b"...bytes...").await?;
    /// stream.shutdown().await?; // the other side reads to the end
    /// # Ok(()) }
    /// ```
    pub async fn open_stream(&self, peer: &str, name: &str) -> Result<P2pStream> {
        let (tx, rx) = oneshot::channel();
        // If this future is dropped before the answer, the handle is dropped at once, and
        // its drop notice resets the stream.
        let cmds = self.inner.streams.clone();
        let reply: Reply<core::streams::StreamParts> = Box::new(move |r| {
            let _ = tx.send(r.map(|parts| P2pStream::from_parts(parts, cmds)));
        });
        self.inner
            .streams
            .send(StreamCmd::Open {
                peer: peer.to_owned(),
                name: name.to_owned(),
                reply,
            })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Provides a service under a name unique on the server: any peer (whatever its rooms)
    /// can then call it with [`P2p::service`]. [`Error::ServiceTaken`] if a peer or the
    /// server already provides that name. The service goes away with this peer.
    ///
    /// ```no_run
    /// # async fn run(p2p: socketio_p2p::P2p) -> Result<(), socketio_p2p::Error> {
    /// use socketio_p2p::{Service, ServiceError};
    /// p2p.provide(
    ///     "calc",
    ///     Service::new().method("add", |(a, b): (i64, i64)| async move {
    ///         Ok::<_, ServiceError>(a + b)
    ///     }),
    /// )
    /// .await?;
    /// // On any peer:
    /// let sum: i64 = p2p.service("calc").call("add", (2, 3)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn provide(&self, name: &str, service: Service) -> Result<()> {
        self.call(|reply| Cmd::Provide {
            name: name.to_owned(),
            service: Arc::new(service),
            reply,
        })
        .await?;
        Ok(())
    }

    /// Stops providing a service; calls in flight fail with [`Error::ServiceGone`].
    pub async fn unprovide(&self, name: &str) -> Result<()> {
        self.call(|reply| Cmd::Unprovide {
            name: name.to_owned(),
            reply,
        })
        .await?;
        Ok(())
    }

    /// A service to call, provided by a peer or by the server (see [`ServiceRef::call`]).
    pub fn service(&self, name: &str) -> ServiceRef<'_> {
        ServiceRef {
            p2p: self,
            name: name.to_owned(),
            timeout: self.inner.ack_timeout,
        }
    }

    /// Subscribes to a topic: the [`Subscription`] yields every publication on it, once,
    /// until it is dropped. Publications come through the server.
    ///
    /// ```no_run
    /// # async fn run(p2p: socketio_p2p::P2p) -> Result<(), socketio_p2p::Error> {
    /// let mut news = p2p.subscribe("news").await?;
    /// p2p.publish("news", serde_json::json!({"title": "hello"})).await?;
    /// while let Some(p) = news.next().await {
    ///     println!("{:?} from {:?}", p.data, p.from);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        // A bounded queue: a subscriber that does not read misses publications (and the
        // next one it gets says how many), instead of holding them all in memory.
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let mut missed = 0u64;
        let sink: core::TopicSink = Box::new(move |mut p: Publication| {
            p.missed += missed;
            match tx.try_send(p) {
                Ok(()) => {
                    missed = 0;
                    true
                }
                Err(mpsc::error::TrySendError::Full(p)) => {
                    missed = p.missed + 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let id = self
            .call(|reply| Cmd::Subscribe {
                topic: topic.to_owned(),
                sink,
                reply,
            })
            .await?;
        Ok(Subscription {
            topic: topic.to_owned(),
            id,
            rx,
            cmds: self.inner.cmds.clone(),
        })
    }

    /// Publishes `data` to every subscriber of `topic` (this peer too, if subscribed), each
    /// once. Returns how many subscribers it reached.
    pub async fn publish(&self, topic: &str, data: impl serde::Serialize) -> Result<usize> {
        let data = serde_json::to_value(data).map_err(Error::from)?;
        let v = self
            .request(Op::Publish {
                topic: topic.to_owned(),
                data,
            })
            .await?;
        Ok(v.as_u64().unwrap_or(0) as usize)
    }

    /// Streams this peer still keeps state for (diagnostics: 0 once every stream ended).
    #[cfg(feature = "test-hooks")]
    pub async fn stream_count(&self) -> Result<usize> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .streams
            .send(StreamCmd::Count(reply_to(tx)))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Waits for the next stream another peer opens to this one; `None` once closed.
    /// Streams not accepted or refused within the opener's `request_timeout` fail on its
    /// side; more than 64 waiting at once are refused with `Busy`.
    ///
    /// ```no_run
    /// # async fn run(p2p: socketio_p2p::P2p) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::AsyncReadExt;
    /// while let Some(incoming) = p2p.accept_stream().await {
    ///     if incoming.name().ends_with(".jpg") {
    ///         let mut stream = incoming.accept()?;
    ///         let mut data = Vec::new();
    ///         stream.read_to_end(&mut data).await?;
    ///     } else {
    ///         incoming.refuse("only photos here");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn accept_stream(&self) -> Option<IncomingStream> {
        self.inner.incoming.lock().await.recv().await
    }

    /// Sends a best-effort event to every peer: never retransmitted, may be lost, never
    /// delays reliable events (for game state and the like). At most 16 KiB.
    pub async fn emit_volatile(&self, event: &str, payload: impl Into<Payload>) -> Result<()> {
        self.emit_inner(None, event, payload.into(), true).await
    }

    /// Targets one peer: `p2p.to(id).emit(...)`.
    pub fn to(&self, peer: &str) -> To<'_> {
        To {
            p2p: self,
            peer: peer.to_owned(),
            timeout: self.inner.ack_timeout,
        }
    }

    /// Handles an event from any peer. Handlers run on the dispatcher task, one event at a
    /// time: keep them short and spawn tasks for long work.
    pub fn on(&self, event: &str, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(
            self.inner
                .registry
                .add(Some(event.to_owned()), None, false, Arc::new(handler)),
        )
    }

    /// Like [`P2p::on`], for the next matching event only.
    pub fn once(&self, event: &str, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(
            self.inner
                .registry
                .add(Some(event.to_owned()), None, true, Arc::new(handler)),
        )
    }

    /// Handles every event, whatever its name.
    pub fn on_any(&self, handler: impl Fn(Event) + Send + Sync + 'static) -> HandlerId {
        HandlerId(
            self.inner
                .registry
                .add(None, None, false, Arc::new(handler)),
        )
    }

    /// Removes every handler of `event` registered with `on`/`once` (not those of `from(..)`).
    pub fn off(&self, event: &str) {
        self.inner.registry.remove(Some(event), None);
    }

    /// Removes one handler.
    pub fn off_handler(&self, id: HandlerId) {
        self.inner.registry.remove_id(id.0);
    }

    /// Filters on one sender: `p2p.from(id).on(...)`. Its handlers go away when that peer
    /// disconnects.
    pub fn from(&self, peer: &str) -> FromPeer<'_> {
        FromPeer {
            p2p: self,
            peer: peer.to_owned(),
        }
    }

    /// Every event as a stream (for `while let Some(ev) = events.next().await`).
    pub fn events(&self) -> EventStream {
        EventStream(
            self.inner
                .registry
                .stream(None, None, self.inner.events_capacity),
        )
    }

    /// The events named `event` as a stream.
    pub fn events_named(&self, event: &str) -> EventStream {
        EventStream(self.inner.registry.stream(
            Some(event.to_owned()),
            None,
            self.inner.events_capacity,
        ))
    }

    /// Lifecycle events (peers joining, leaving, upgrades...) as a stream. Only events after
    /// this call are seen.
    pub fn peer_events(&self) -> PeerEventStream {
        PeerEventStream(self.inner.registry.peer_stream(self.inner.events_capacity))
    }

    /// Handles lifecycle events.
    pub fn on_peer_event(&self, handler: impl Fn(PeerEvent) + Send + Sync + 'static) -> HandlerId {
        HandlerId(self.inner.registry.on_peer_event(Arc::new(handler)))
    }

    /// The peers this peer can reach (rooms and pair), sorted by id.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.call(|reply| Cmd::Peers { reply }).await
    }

    async fn request(&self, op: Op) -> Result<serde_json::Value> {
        self.call(|reply| Cmd::Request { op, reply }).await
    }

    /// Joins a room; returns its other peers.
    pub async fn join(&self, room: &str) -> Result<Vec<PeerInfo>> {
        let v = self
            .request(Op::Join {
                room: room.to_owned(),
            })
            .await?;
        serde_json::from_value(v).map_err(Error::from)
    }

    /// Leaves a room.
    pub async fn leave(&self, room: &str) -> Result<()> {
        self.request(Op::Leave {
            room: room.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// The other peers of a room this peer is in.
    pub async fn room_peers(&self, room: &str) -> Result<Vec<PeerInfo>> {
        let v = self
            .request(Op::Peers {
                room: room.to_owned(),
            })
            .await?;
        serde_json::from_value(v).map_err(Error::from)
    }

    /// Moves every reachable peer onto WebRTC (up to `num_clients`) and waits for each
    /// outcome, like [`P2p::upgrade_peer`] for each peer. A peer whose upgrade fails stays
    /// on the relay and keeps working. To start upgrades without waiting, spawn it, or
    /// watch [`PeerEvent::Upgraded`] / [`PeerEvent::UpgradeFailed`].
    pub async fn upgrade(&self) -> Result<Vec<(String, Result<()>)>> {
        let peers = self.peers().await?;
        let ups = peers.into_iter().map(|p| async move {
            let r = self.upgrade_peer(&p.id).await;
            (p.id, r)
        });
        Ok(futures_util::future::join_all(ups).await)
    }

    /// Moves one peer onto WebRTC and waits for the outcome. On failure the peer stays on
    /// the relay and keeps working.
    pub async fn upgrade_peer(&self, peer: &str) -> Result<()> {
        self.call(|done| Cmd::Upgrade {
            peer: Some(peer.to_owned()),
            done: Some(done),
        })
        .await
    }

    /// Closes the data channel to a peer; traffic goes back to the relay (nothing is lost).
    /// Returns once the peer is on the relay; [`Error::PeerOffline`] for an unknown peer.
    /// Auto-upgrade does not undo it: call [`P2p::upgrade_peer`] to go direct again.
    pub async fn downgrade_peer(&self, peer: &str) -> Result<()> {
        self.call(|done| Cmd::Downgrade {
            peer: peer.to_owned(),
            done,
        })
        .await
    }

    /// Test hook: closes the data channel to `peer` abruptly, without telling the peer (as if
    /// the path died). This side falls back to the relay at once; the peer notices by itself.
    #[cfg(feature = "test-hooks")]
    pub fn kill_data_channel(&self, peer: &str) -> Result<()> {
        self.send(Cmd::Kill {
            peer: peer.to_owned(),
        })
    }

    /// Counters and state of one peer: transport and path (relay, direct, TURN), the data
    /// channel's candidates, round trip, frames and bytes each way, resends, and why the
    /// last upgrade failed. [`Error::PeerOffline`] for an unknown peer.
    pub async fn stats(&self, peer: &str) -> Result<PeerStats> {
        self.call(|reply| Cmd::Stats {
            peer: peer.to_owned(),
            reply,
        })
        .await
    }

    /// The transport currently used with a peer.
    pub async fn transport(&self, peer: &str) -> Result<Transport> {
        self.call(|reply| Cmd::Transport {
            peer: peer.to_owned(),
            reply,
        })
        .await
    }

    /// Number of WebRTC peer connections this peer holds (open or being set up).
    #[cfg(feature = "test-hooks")]
    pub async fn webrtc_connections(&self) -> Result<usize> {
        self.call(|reply| Cmd::LiveConnections { reply }).await
    }

    /// Closes every connection. Pending calls fail with [`Error::Closed`] or
    /// [`Error::PeerOffline`].
    pub async fn close(&self) {
        let _ = self.call(|done| Cmd::Close { done }).await;
    }
}

/// Number of WebRTC peer connections alive in this process (all `P2p`s), for leak checks.
#[cfg(feature = "test-hooks")]
pub fn live_webrtc_connections() -> usize {
    transport::webrtc::live_links()
}

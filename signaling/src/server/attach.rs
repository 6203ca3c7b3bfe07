//! How the signaling server meets socketioxide: a namespace of its own, a connect
//! middleware beside the application's handlers, or the whole Socket.IO layer in one line.
use std::collections::HashSet;
use std::fmt::Display;
use std::sync::Arc;

use serde_json::Value as Json;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{Event, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, ConnectMiddleware, FromConnectParts};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide::{SocketIo, SocketIoBuilder};
use socketioxide_core::Value;
use socketioxide_core::adapter::DefinedAdapter;

use super::outbox::{error_event, to_json};
use super::socket::{FrameDone, RequestDone, arc_of};
use super::state::{Budget, Conn, TokenBucket};
use super::{P2pSignaling, SignalingOptions};
use crate::protocol::{ErrorCode, events};

/// Largest number of packets socketioxide buffers for one socket in the settings of
/// [`P2pSignaling::socketio`]: the relay sends bursts of batches, and a full buffer means
/// `Busy` errors for the senders.
const MAX_BUFFER: usize = 4096;

/// Size of each websocket's read buffer in the settings of [`P2pSignaling::socketio`]
/// (socketioxide's default is 4 KiB). Every connected peer holds one; what peers send is
/// small but for relay batches, which are read in several calls instead.
const WS_READ_BUFFER: usize = 1024;

#[derive(Debug)]
struct AuthRejected(String);
impl Display for AuthRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for AuthRejected {}

/// The connect middleware of [`P2pSignaling::middleware`]: put it on your own connect
/// handler with socketioxide's `.with(...)`.
///
/// It runs the auth hook (if any) and registers the socket before socketioxide sends the
/// CONNECT packet, so the `p2p:*` handlers exist before the client can send anything. It
/// takes the `p2p:*` events and the socket's disconnect handler, nothing else: your handler
/// registers its own events (and its own fallback) beside them.
#[derive(Clone, Debug)]
pub struct SignalingMiddleware {
    sig: P2pSignaling,
    /// Answer unknown events with `UnknownEvent` (only when the namespace is ours alone).
    fallback: bool,
}

impl<A: Adapter> ConnectMiddleware<A, SignalingMiddleware> for SignalingMiddleware {
    async fn call<'a>(
        &'a self,
        s: Arc<Socket<A>>,
        auth: &'a Option<Value>,
    ) -> Result<(), Box<dyn Display + Send>> {
        let data = TryData::<Json>::from_connect_parts(&s, auth)
            .map(|TryData(d)| d.unwrap_or(Json::Null))
            .unwrap_or(Json::Null);
        if let Some(hook) = &self.sig.inner.opts.auth
            && let Err(reason) = hook(data.clone()).await
        {
            return Err(Box::new(AuthRejected(reason)));
        }
        self.sig
            .register_socket(&SocketRef::from(s), self.fallback, data);
        Ok(())
    }
}

impl P2pSignaling {
    /// The Socket.IO builder with the settings the relay needs (a socket buffer of 4096
    /// packets) and a 1 KiB websocket read buffer (3 KiB less per idle peer than
    /// socketioxide's default), for apps that build their own `SocketIo`.
    ///
    /// ```
    /// use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
    /// let (layer, io) = P2pSignaling::socketio().build_layer();
    /// P2pSignaling::new(SignalingOptions::default()).attach(&io);
    /// let app: axum::Router = axum::Router::new().layer(layer);
    /// # drop(app);
    /// ```
    pub fn socketio() -> SocketIoBuilder {
        SocketIo::builder()
            .max_buffer_size(MAX_BUFFER)
            .ws_read_buffer_size(WS_READ_BUFFER)
    }

    /// The server in one line: a Socket.IO layer built with [`P2pSignaling::socketio`]'s
    /// settings, with a new signaling server attached to its root namespace `/`.
    ///
    /// ```no_run
    /// use socketio_p2p_signaling::{P2pSignaling, SignalingOptions, serve};
    /// # async fn run() -> std::io::Result<()> {
    /// let (layer, _signaling) = P2pSignaling::layer(SignalingOptions::default());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// serve(listener, axum::Router::new().layer(layer)).await
    /// # }
    /// ```
    pub fn layer(opts: SignalingOptions) -> (SocketIoLayer, P2pSignaling) {
        let (layer, io) = Self::socketio().build_layer();
        let signaling = P2pSignaling::new(opts);
        signaling.attach(&io);
        (layer, signaling)
    }

    /// Serves peers on the root namespace `/`. Returns what socketioxide's `ns` returns:
    /// `()` for the default in-memory adapter, a future to await for remote adapters.
    pub fn attach<A: Adapter + DefinedAdapter>(&self, io: &SocketIo<A>) -> A::InitRes {
        self.attach_to(io, "/")
    }

    /// Serves peers on namespace `path` (runs the auth hook, if any, at connect). The
    /// namespace is the signaling's alone: other events get an `UnknownEvent` error. To
    /// share it with handlers of your own, use [`P2pSignaling::middleware`].
    pub fn attach_to<A: Adapter + DefinedAdapter>(
        &self,
        io: &SocketIo<A>,
        path: &str,
    ) -> A::InitRes {
        let handler = async |_: SocketRef<A>| {};
        let middleware = SignalingMiddleware {
            sig: self.clone(),
            fallback: true,
        };
        io.ns(path.to_owned(), handler.with(middleware))
    }

    /// A connect middleware that serves peers on a namespace your own connect handler
    /// serves too, like socket.io-p2p's `io.use(p2p)`: the client's `p2p:*` events go to
    /// the signaling, every other event to your handlers (or your fallback).
    ///
    /// Leave the `p2p:*` events to the signaling. It also sets the socket's disconnect
    /// handler: if your handler sets its own, call [`P2pSignaling::socket_closed`] from it.
    ///
    /// ```
    /// use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
    /// use socketioxide::extract::{Data, SocketRef};
    /// use socketioxide::handler::ConnectHandler;
    ///
    /// let signaling = P2pSignaling::new(SignalingOptions::default());
    /// let (_layer, io) = P2pSignaling::socketio().build_layer();
    /// let chat = async |socket: SocketRef| {
    ///     socket.on("go-private", async |s: SocketRef, Data(d): Data<serde_json::Value>| {
    ///         let _ = s.broadcast().emit("go-private", &d).await;
    ///     });
    /// };
    /// io.ns("/", chat.with(signaling.middleware()));
    /// ```
    pub fn middleware(&self) -> SignalingMiddleware {
        SignalingMiddleware {
            sig: self.clone(),
            fallback: false,
        }
    }

    /// Serves one socket, when you do not use [`P2pSignaling::attach`]. Call it from a
    /// connect *middleware* (`handler.with(middleware)`), not from the connect handler:
    /// socketioxide runs connect handlers in a task of their own, after the client may already
    /// have sent its first request. The protocol takes the `p2p:*` events and the fallback
    /// handler of this socket.
    pub fn register<A: Adapter>(&self, socket: &SocketRef<A>) {
        self.register_socket(socket, true, Json::Null);
    }

    fn register_socket<A: Adapter>(&self, socket: &SocketRef<A>, fallback: bool, auth: Json) {
        let s: &Socket<A> = socket;
        s.extensions.insert(self.clone());
        let conn = Conn {
            socket: arc_of(socket),
            info: None,
            rooms: HashSet::new(),
            pairs: HashSet::new(),
            bucket: TokenBucket::new(self.inner.opts.request_burst),
            budget: Budget::new(&self.inner.opts.limits()),
            away: None,
            auth,
        };
        self.lock().conns.insert(socket.id.to_string(), conn);
        socket.on(events::REQUEST, async |_: RequestDone| {});
        socket.on(events::FRAME, async |_: FrameDone| {});
        if fallback {
            socket.on_fallback(async |s: SocketRef<A>, Event(event): Event| {
                let msg = error_event(
                    ErrorCode::UnknownEvent,
                    format!("unknown event {event:?}"),
                    &event,
                );
                let _ = s.emit(events::ERROR, &to_json(&msg));
            });
        }
        let this = self.clone();
        socket.on_disconnect(async move |s: SocketRef<A>, reason: DisconnectReason| {
            this.socket_closed(&s, reason);
        });
    }

    /// A socket served by this signaling server disconnected. The signaling's own
    /// disconnect handler calls it; call it from yours if you replace that handler (see
    /// [`P2pSignaling::middleware`]).
    pub fn socket_closed<A: Adapter>(&self, socket: &SocketRef<A>, reason: DisconnectReason) {
        // A deliberate disconnect is final at once; a broken connection gets a grace
        // period to come back (resume) before the others are told.
        let deliberate = matches!(
            reason,
            DisconnectReason::ClientNSDisconnect
                | DisconnectReason::ServerNSDisconnect
                | DisconnectReason::ClosingServer
        );
        self.disconnected(&socket.id.to_string(), deliberate);
    }
}

/// Serves `router` on `listener` with TCP_NODELAY on every connection (the relay sends many
/// small messages; Nagle's algorithm would hold them back).
///
/// ```no_run
/// use socketio_p2p_signaling::{P2pSignaling, SignalingOptions, serve};
/// # async fn run() -> std::io::Result<()> {
/// let (layer, _signaling) = P2pSignaling::layer(SignalingOptions::default());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// serve(listener, axum::Router::new().layer(layer)).await
/// # }
/// ```
pub async fn serve(listener: tokio::net::TcpListener, router: axum::Router) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router).await
}

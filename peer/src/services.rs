//! Client side of services (calls routed by the server) and topics (publish/subscribe).
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use socketio_p2p_signaling::Service;
use socketio_p2p_signaling::protocol::{CallOutcome, Op, PeerInfo, Publication};
use tokio::sync::mpsc;

use crate::core::Command as Cmd;
use crate::error::{Error, Result};

/// A service as seen by a caller, from [`crate::P2p::service`].
#[derive(Debug, Clone)]
#[must_use = "`service` only names a service: call `call` on it"]
pub struct ServiceRef<'a> {
    pub(crate) p2p: &'a crate::P2p,
    pub(crate) name: String,
    pub(crate) timeout: Duration,
}

impl ServiceRef<'_> {
    /// How long to wait for the answer (default: the `ack_timeout` option).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Calls `method` with `args` and deserializes the result into `R`.
    ///
    /// Errors: [`Error::NoSuchService`] (nobody provides it), [`Error::ServiceGone`] (the
    /// provider went away before it answered), [`Error::Timeout`], [`Error::Remote`] (the
    /// method failed, does not exist (`UnknownMethod`) or its arguments did not fit
    /// (`BadArgs`)), [`Error::Serde`] (the result is not an `R`).
    pub async fn call<R: DeserializeOwned>(&self, method: &str, args: impl Serialize) -> Result<R> {
        let args = serde_json::to_value(args).map_err(Error::from)?;
        let op = Op::Call {
            service: self.name.clone(),
            method: method.to_owned(),
            args,
            timeout_ms: Some(self.timeout.as_millis() as u64),
        };
        let timeout = self.timeout;
        let v = self
            .p2p
            .call(|reply| Cmd::Call { op, timeout, reply })
            .await?;
        match serde_json::from_value::<CallOutcome>(v) {
            Ok(CallOutcome::Ok(v)) => serde_json::from_value(v).map_err(Error::from),
            Ok(CallOutcome::Error(e)) => Err(Error::Remote {
                code: e.code,
                message: e.message,
            }),
            Err(e) => Err(Error::from(e)),
        }
    }
}

/// The publications of one topic, from [`crate::P2p::subscribe`]. A [`Stream`] of
/// [`Publication`]s; dropping it unsubscribes.
///
/// It holds up to 1024 publications (and the server up to its socket buffer): a subscriber
/// that does not keep up misses some, and the next publication it gets tells how many in
/// [`Publication::missed`], like a lagging receiver of a broadcast channel.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) topic: String,
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<Publication>,
    pub(crate) cmds: mpsc::UnboundedSender<Cmd>,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next publication; `None` once the `P2p` is closed.
    pub async fn next(&mut self) -> Option<Publication> {
        self.rx.recv().await
    }
}

impl Stream for Subscription {
    type Item = Publication;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Publication>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Unsubscribe {
            topic: std::mem::take(&mut self.topic),
            id: self.id,
        });
    }
}

/// Runs a call for a service this peer provides.
pub(crate) async fn run_call(
    service: Option<Arc<Service>>,
    from: PeerInfo,
    method: String,
    args: serde_json::Value,
) -> CallOutcome {
    match service {
        Some(s) => s.call(from, &method, args).await,
        None => CallOutcome::Error(socketio_p2p_signaling::protocol::CallError {
            code: "NoSuchService".into(),
            message: "this peer no longer provides that service".into(),
        }),
    }
}

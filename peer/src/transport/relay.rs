//! The relay carrier: the Socket.IO client. It wires the client's callbacks into
//! [`NetIn`]s, and one task owns the client and sends what the core hands it, in order
//! (frame batches as base64 text, requests as JSON), so the core never waits on a write.
use futures_util::FutureExt;
use rust_socketio::asynchronous::{Client, ClientBuilder};
use rust_socketio::{Event as SioEvent, Payload as SioPayload};
use serde_json::Value as Json;
use socketio_p2p_signaling::protocol::{Request, batch_from_base64, batch_to_base64, events};
use tokio::sync::{mpsc, oneshot};

use bytes::Bytes;

use crate::core::NetIn;

/// The server's events we listen to.
const EVENTS: [&str; 7] = [
    events::FRAME,
    events::RESPONSE,
    events::SIGNAL,
    events::PRESENCE,
    events::ERROR,
    events::CALL,
    events::TOPIC,
];

/// Reads one server event.
fn from_event(event: &str, payload: SioPayload) -> Option<NetIn> {
    let first_json = |p: SioPayload| match p {
        SioPayload::Text(mut v) if !v.is_empty() => Some(v.swap_remove(0)),
        _ => None,
    };
    Some(match event {
        events::FRAME => match payload {
            SioPayload::Binary(b) => NetIn::Batch(b),
            SioPayload::Text(v) => match v.first().and_then(Json::as_str).map(batch_from_base64) {
                Some(Ok(b)) => NetIn::Batch(b),
                _ => {
                    tracing::warn!("undecodable p2p:f batch from the server");
                    return None;
                }
            },
            #[allow(deprecated)]
            SioPayload::String(_) => return None,
        },
        events::RESPONSE => NetIn::Response(first_json(payload)?),
        events::SIGNAL => NetIn::Signal(first_json(payload)?),
        events::PRESENCE => NetIn::Presence(first_json(payload)?),
        events::ERROR => NetIn::Error(first_json(payload)?),
        events::CALL => NetIn::Call(first_json(payload)?),
        events::TOPIC => NetIn::Topic(first_json(payload)?),
        _ => return None,
    })
}

/// Reads the client's error callback. The client reports errors as text only: a broken
/// transport names Engine.IO, a refused connection is a `ConnectError` with the server's
/// reason after the colon.
fn from_error(payload: SioPayload) -> Option<NetIn> {
    let text = match payload {
        SioPayload::Text(v) => v
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(" "),
        #[allow(deprecated)]
        SioPayload::String(s) => s,
        SioPayload::Binary(_) => String::from("binary error"),
    };
    if text.contains("ConnectError") {
        let reason = text
            .split_once(':')
            .map(|(_, r)| r.trim().to_owned())
            .unwrap_or(text.clone());
        Some(NetIn::Refused(reason))
    } else if text.contains("EngineIO") {
        Some(NetIn::Broken(text))
    } else {
        tracing::debug!(%text, "socket.io error");
        None
    }
}

/// Adds our handlers to the client's builder: everything the server sends goes to `net`.
pub(crate) fn wire(mut builder: ClientBuilder, net: mpsc::UnboundedSender<NetIn>) -> ClientBuilder {
    for event in EVENTS {
        let tx = net.clone();
        builder = builder.on(event, move |payload: SioPayload, _| {
            if let Some(n) = from_event(event, payload) {
                let _ = tx.send(n);
            }
            async {}.boxed()
        });
    }
    let tx = net.clone();
    builder = builder.on(SioEvent::Connect, move |_, _| {
        let _ = tx.send(NetIn::Connected);
        async {}.boxed()
    });
    let tx = net.clone();
    builder = builder.on(SioEvent::Close, move |_, _| {
        let _ = tx.send(NetIn::Closed);
        async {}.boxed()
    });
    builder.on(SioEvent::Error, move |payload: SioPayload, _| {
        if let Some(n) = from_error(payload) {
            let _ = net.send(n);
        }
        async {}.boxed()
    })
}

enum Out {
    Batch(Bytes),
    Request(Request),
    Disconnect(oneshot::Sender<()>),
}

/// The sending side of the relay.
pub(crate) struct Relay {
    tx: mpsc::UnboundedSender<Out>,
}

impl Relay {
    /// Starts the task that owns `client`.
    pub(crate) fn spawn(client: Client) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let (event, payload) = match out {
                    Out::Batch(batch) => (
                        events::FRAME,
                        SioPayload::Text(vec![Json::String(batch_to_base64(&batch))]),
                    ),
                    Out::Request(r) => {
                        let json = serde_json::to_value(r).unwrap_or(Json::Null);
                        (events::REQUEST, SioPayload::Text(vec![json]))
                    }
                    Out::Disconnect(done) => {
                        let _ = client.disconnect().await;
                        let _ = done.send(());
                        break;
                    }
                };
                if let Err(e) = client.emit(event, payload).await {
                    tracing::debug!(%e, event, "socket.io emit failed");
                }
            }
        });
        Self { tx }
    }

    /// Queues one `p2p:f` batch.
    pub(crate) fn batch(&self, batch: Bytes) {
        let _ = self.tx.send(Out::Batch(batch));
    }

    /// Queues one request.
    pub(crate) fn request(&self, r: Request) {
        let _ = self.tx.send(Out::Request(r));
    }

    /// Sends what is queued, then disconnects.
    pub(crate) async fn disconnect(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Out::Disconnect(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

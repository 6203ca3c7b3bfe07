//! A minimal Socket.IO v5 / Engine.IO v4 client over a websocket, shaped like socket.io-client:
//! binary arguments travel as attachments (a `45x-` text packet, then binary messages) and
//! are never split or escaped. The tests use it as a "browser-style" peer that asks for
//! binary batches, beside rust_socketio peers that ask for base64.
use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One Socket.IO event: its name and arguments (attachments put back in their place as
/// `Arg::Binary`).
#[derive(Debug, Clone)]
pub enum Arg {
    Json(Value),
    Binary(Bytes),
}

pub struct BinaryClient {
    ws: Ws,
    /// Events received while waiting for another one.
    queue: VecDeque<(String, Vec<Arg>)>,
}

impl BinaryClient {
    /// Connects to the root namespace of the server at `addr` (`127.0.0.1:port`).
    pub async fn connect(addr: std::net::SocketAddr) -> BinaryClient {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        let mut c = BinaryClient {
            ws,
            queue: VecDeque::new(),
        };
        // Engine.IO open packet, then the Socket.IO CONNECT to "/".
        let open = c.next_text().await;
        assert!(open.starts_with('0'), "engine.io open: {open}");
        c.ws.send(Message::text("40")).await.expect("send connect");
        loop {
            let t = c.next_text().await;
            if t.starts_with("40") {
                break;
            }
        }
        c
    }

    async fn next_message(&mut self) -> Message {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("timed out waiting for a websocket message")
                .expect("websocket closed")
                .expect("websocket error");
            match &m {
                Message::Text(t) if t.as_str() == "2" => {
                    self.ws.send(Message::text("3")).await.expect("pong");
                }
                Message::Ping(_) | Message::Pong(_) => {}
                _ => return m,
            }
        }
    }

    async fn next_text(&mut self) -> String {
        match self.next_message().await {
            Message::Text(t) => t.as_str().to_owned(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Reads one Socket.IO event (with its attachments) from the socket.
    async fn read_event(&mut self) -> (String, Vec<Arg>) {
        loop {
            let text = self.next_text().await;
            let Some(packet) = text.strip_prefix('4') else {
                continue;
            };
            let (attachments, body) = if let Some(rest) = packet.strip_prefix('5') {
                let (n, body) = rest.split_once('-').expect("binary event header");
                (
                    n.parse::<usize>().expect("attachment count"),
                    body.to_owned(),
                )
            } else if let Some(body) = packet.strip_prefix('2') {
                (0, body.to_owned())
            } else {
                continue;
            };
            let mut bins = Vec::new();
            for _ in 0..attachments {
                match self.next_message().await {
                    Message::Binary(b) => bins.push(b),
                    other => panic!("expected an attachment, got {other:?}"),
                }
            }
            let arr: Vec<Value> = serde_json::from_str(&body).expect("event json");
            let name = arr
                .first()
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let args = arr[1..]
                .iter()
                .map(|v| match v.get("_placeholder") {
                    Some(Value::Bool(true)) => {
                        let n = v["num"].as_u64().unwrap_or(0) as usize;
                        Arg::Binary(bins.get(n).cloned().unwrap_or_default())
                    }
                    _ => Arg::Json(v.clone()),
                })
                .collect();
            return (name, args);
        }
    }

    /// The next event named `name` (earlier other events are kept for later).
    pub async fn expect(&mut self, name: &str) -> Vec<Arg> {
        if let Some(i) = self.queue.iter().position(|(n, _)| n == name) {
            return self.queue.remove(i).map(|(_, a)| a).unwrap_or_default();
        }
        loop {
            let (n, args) = self.read_event().await;
            if n == name {
                return args;
            }
            self.queue.push_back((n, args));
        }
    }

    /// Emits an event with JSON arguments.
    pub async fn emit(&mut self, name: &str, args: &[Value]) {
        let mut arr = vec![json!(name)];
        arr.extend(args.iter().cloned());
        let text = format!("42{}", Value::Array(arr));
        self.ws.send(Message::text(text)).await.expect("emit");
    }

    /// Emits an event with one binary argument, as socket.io-client does.
    pub async fn emit_binary(&mut self, name: &str, data: Bytes) {
        let header = format!("451-{}", json!([name, {"_placeholder": true, "num": 0}]));
        self.ws.send(Message::text(header)).await.expect("emit");
        self.ws
            .send(Message::Binary(data))
            .await
            .expect("attachment");
    }
}

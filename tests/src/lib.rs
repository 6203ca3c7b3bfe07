//! Test harness: a real socketioxide server on 127.0.0.1:0, real rust_socketio clients.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::FutureExt;
use rust_socketio::asynchronous::{Client, ClientBuilder};
use rust_socketio::{Event as SioEvent, Payload as SioPayload};
use serde_json::Value;
use socketio_p2p::{P2p, P2pOptions};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use socketioxide::SocketIo;
use tokio::sync::mpsc;

mod app;
pub mod impair;
pub mod lab;
mod redis;
pub mod sio;
pub use self::app::*;
pub use self::redis::*;

pub struct Server {
    pub addr: SocketAddr,
    pub signaling: P2pSignaling,
    pub io: SocketIo,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// TCP_NODELAY on every accepted connection, as the README recommends.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn set(tcp: &mut tokio::net::TcpStream) {
        let _ = tcp.set_nodelay(true);
    }
    axum::serve::ListenerExt::tap_io(listener, set as fn(&mut tokio::net::TcpStream))
}

pub async fn spawn_server() -> Server {
    spawn_server_with(SignalingOptions::default()).await
}

pub async fn spawn_server_with(opts: SignalingOptions) -> Server {
    init_tracing();
    serve(P2pSignaling::new(opts), 0).await
}

/// Serves `signaling` on 127.0.0.1:`port` (0: any free port; a given port is retried while
/// a killed server still holds it), with TCP_NODELAY, in a task of the current runtime.
pub async fn serve(signaling: P2pSignaling, port: u16) -> Server {
    let (layer, io) = SocketIo::builder().max_buffer_size(4096).build_layer();
    signaling.attach(&io);
    let app = axum::Router::new().layer(layer);
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind: {e}"),
        }
    };
    let addr = listener.local_addr().expect("addr");
    let listener = nodelay(listener);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        addr,
        signaling,
        io,
        task,
    }
}

/// Options for a relay-only test peer (no WebRTC, loopback only anyway).
pub fn relay_opts() -> P2pOptions {
    P2pOptions::default().loopback_only().auto_upgrade(false)
}

/// Options for a WebRTC test peer: loopback candidates only, no STUN, no mDNS.
pub fn rtc_opts() -> P2pOptions {
    P2pOptions::default().loopback_only().auto_upgrade(false)
}

pub async fn peer(server: &Server, opts: P2pOptions) -> P2p {
    tokio::time::timeout(Duration::from_secs(20), P2p::connect(&server.url(), opts))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

/// Waits until `f` returns true, polling every 10 ms, at most `secs` seconds.
pub async fn wait_until<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the peer to see `n` peers.
pub async fn wait_peers(p: &P2p, n: usize) {
    assert!(
        wait_until(10, || async {
            p.peers().await.map(|v| v.len()).unwrap_or(0) == n
        })
        .await,
        "peer {} never saw {n} peers",
        p.id()
    );
}

/// Receives with a timeout.
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, secs: u64) -> T {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("channel closed")
}

/// A raw Socket.IO client speaking the protocol by hand (to send garbage).
pub struct Raw {
    pub client: Client,
    pub rx: mpsc::UnboundedReceiver<(String, SioPayload)>,
}

impl Raw {
    pub async fn connect(server: &Server) -> Raw {
        Self::connect_builder(ClientBuilder::new(server.url()), &[]).await
    }

    /// Connects to `url` (a server, or a [`Cutter`] in front of one), over a websocket
    /// only (so that cutting it is seen by the server at once).
    pub async fn connect_to(url: &str) -> Raw {
        Self::connect_builder(
            ClientBuilder::new(url).transport_type(rust_socketio::TransportType::Websocket),
            &[],
        )
        .await
    }

    /// Connects with `b`, listening to the protocol's events and to `extra` ones.
    pub(crate) async fn connect_builder(b: ClientBuilder, extra: &[&str]) -> Raw {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut b = b.reconnect(false);
        let events = ["p2p:res", "p2p:error", "p2p:f", "p2p:sig", "p2p:presence"];
        for ev in events.iter().chain(extra) {
            let tx = tx.clone();
            let name = (*ev).to_owned();
            b = b.on(*ev, move |p, _| {
                let _ = tx.send((name.clone(), p));
                async {}.boxed()
            });
        }
        let t = tx.clone();
        b = b.on(SioEvent::Connect, move |p, _| {
            let _ = t.send(("connect".to_owned(), p));
            async {}.boxed()
        });
        let client = b.connect().await.expect("raw connect");
        let mut raw = Raw { client, rx };
        raw.expect("connect").await;
        raw
    }

    pub async fn emit(&self, event: &str, v: Value) {
        self.client.emit(event, v).await.expect("emit");
    }

    pub async fn emit_bin(&self, event: &str, b: Vec<u8>) {
        self.client
            .emit(event, SioPayload::Binary(b.into()))
            .await
            .expect("emit");
    }

    /// Sends frames as one `p2p:f` batch in base64 text (what Rust peers send).
    pub async fn send_frames(&self, frames: &[Vec<u8>]) {
        let mut w = socketio_p2p_signaling::protocol::BatchWriter::new();
        for f in frames {
            w.push(f);
        }
        let text = socketio_p2p_signaling::protocol::batch_to_base64(&w.take());
        self.emit("p2p:f", Value::String(text)).await;
    }

    /// Next message of this event name (others are skipped), as JSON (binary as bytes array).
    pub async fn expect(&mut self, event: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (ev, p) = tokio::time::timeout(left, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {event}"))
                .expect("raw closed");
            if ev == event {
                return match p {
                    SioPayload::Text(mut v) if !v.is_empty() => v.swap_remove(0),
                    SioPayload::Binary(b) => Value::from(b.to_vec()),
                    _ => Value::Null,
                };
            }
        }
    }

    /// Sends `hello` and returns the welcome.
    pub async fn hello(&mut self, uid: Option<&str>, rooms: &[&str]) -> Value {
        self.emit(
            "p2p:req",
            serde_json::json!({"rid": 1, "op": "hello", "version": 2, "uid": uid, "rooms": rooms, "frames": "base64"}),
        )
        .await;
        let res = self.expect("p2p:res").await;
        assert!(res.get("ok").is_some(), "hello failed: {res}");
        res["ok"].clone()
    }
}

/// The README's code, compiled as doc tests so that the quick start matches the code.
#[doc = include_str!("../../README.md")]
pub mod readme {}

/// A server in a runtime of its own on its own thread, so that it can be killed like a
/// crashed process: every task and socket dropped at once, no disconnect handler run.
pub struct CrashableServer {
    pub addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CrashableServer {
    /// Starts on `port` (0: any free port), retrying while the port is still held.
    pub fn start(port: u16) -> CrashableServer {
        Self::start_with(port, || async {
            P2pSignaling::new(SignalingOptions::default())
        })
    }

    /// Starts the server that `make` builds (in the server's own runtime).
    pub fn start_with<F, Fut>(port: u16, make: F) -> CrashableServer
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = P2pSignaling>,
    {
        init_tracing();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let server = rt.block_on(async move { serve(make().await, port).await });
            let _ = addr_tx.send(server.addr);
            let _ = stop_rx.recv();
            rt.shutdown_background();
            drop(server);
        });
        let addr = addr_rx.recv().expect("server thread died");
        CrashableServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server at once.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CrashableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder whose connections can be cut, to break a client's connection while the
/// server stays up (as a flaky network would), or sent elsewhere (as a load balancer would).
pub struct Cutter {
    pub addr: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    pub async fn start(target: SocketAddr) -> Cutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target = std::sync::Arc::new(std::sync::Mutex::new(target));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let (to, list) = (target.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let dest = *to.lock().unwrap_or_else(|e| e.into_inner());
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(dest).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(h.abort_handle());
            }
        });
        Cutter {
            addr,
            target,
            conns,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection made so far; new ones go through.
    pub fn cut(&self) {
        for h in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }

    /// New connections go to `target`; the current ones are cut.
    pub fn switch(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        self.cut();
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Waits at most `secs` for the first lifecycle event that `f` maps to `Some`.
pub async fn wait_event<T>(
    events: &mut socketio_p2p::PeerEventStream,
    secs: u64,
    mut f: impl FnMut(socketio_p2p::PeerEvent) -> Option<T>,
) -> T {
    let found = async {
        while let Some(ev) = events.next().await {
            if let Some(t) = f(ev) {
                return Some(t);
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(secs), found)
        .await
        .expect("timed out waiting for a peer event")
        .expect("peer event stream closed")
}

/// An encoded data frame (seq 1) carrying the event `chat` with `text`, from `from` (the
/// server stamps it; a client leaves it empty) to `to`.
pub fn chat_frame(to: &str, from: &str, text: &str) -> Vec<u8> {
    use socketio_p2p_signaling::protocol::{Body, Frame, Msg, WirePayload};
    let f = Frame {
        to: to.into(),
        from: from.into(),
        body: Body::Data {
            seq: 1,
            more: false,
            msg: Msg::Event {
                event: "chat".into(),
                ack_id: None,
                payload: WirePayload::Json(serde_json::to_vec(text).unwrap_or_default().into()),
            },
        },
    };
    f.encode().map(|b| b.to_vec()).unwrap_or_default()
}

/// Resident memory of this process now (VmRSS), in KiB; 0 if it cannot be read.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Events `"n"` (numbered from 0) from one peer, counted as they come: `next` is how many
/// arrived, `bad` how many were not the number expected (lost, duplicated or reordered).
pub struct Counter {
    pub next: std::sync::atomic::AtomicU64,
    pub bad: std::sync::atomic::AtomicU64,
}

/// Counts events "n" from `from` at `p`, checking they come in order, once.
pub fn count(p: &P2p, from: &str) -> std::sync::Arc<Counter> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let c = std::sync::Arc::new(Counter {
        next: AtomicU64::new(0),
        bad: AtomicU64::new(0),
    });
    let c2 = c.clone();
    p.from(from).on("n", move |ev| {
        let v: u64 = ev.decode_json().unwrap_or(u64::MAX);
        if v != c2.next.load(Ordering::SeqCst) {
            c2.bad.fetch_add(1, Ordering::SeqCst);
        }
        c2.next.fetch_add(1, Ordering::SeqCst);
    });
    c
}

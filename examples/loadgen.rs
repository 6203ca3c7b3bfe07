//! Load generator for the signaling server: thousands of light raw Socket.IO clients
//! (a websocket speaking Engine.IO v4 / Socket.IO v5 and our `hello`), so that the server sees
//! real connections without a full peer per client. Each server under test is a child process
//! of this one, so that its RSS is its own. Everything runs on 127.0.0.1.
//!
//! Run: `cargo run --release -p socketio-p2p-examples --example loadgen -- [--json]
//! [--only server_scale,signaling_rate,presence_storm,cluster]` (one JSON object per scenario on
//! stdout, progress on stderr). The `cluster` scenario starts a `redis-server` of its own on a
//! free loopback port.
//!
//! `loadgen serve [--bare] [--redis URL --prefix P] [--unlimited-requests]` is the server
//! child: it prints its port, then answers each `stat` line on stdin with
//! `<rss KiB> <sockets>`, and exits when stdin closes. `--bare` is a plain socketioxide
//! server that answers `hello` and keeps nothing. Ours is built as the README builds it
//! (`P2pSignaling::socketio()`), with default options except that `signaling_rate` lifts
//! the per-socket request budget (its raw clients send ~2,000 signals/s each).
//! `LOADGEN_SERVER_MALLOC` in the environment is passed to the server children only, as
//! `GLIBC_TUNABLES` (to try glibc malloc settings on the server's memory).
use std::collections::HashSet;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use socketio_p2p_signaling::protocol::{
    BatchWriter, Body, Frame, batch_from_base64, batch_to_base64, split_batch,
};
use socketio_p2p_signaling::{P2pSignaling, RedisCluster, SignalingOptions, redis};
use socketioxide::SocketIo;
use socketioxide::extract::{Data, SocketRef};
use socketioxide::handler::ConnectHandler;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Res<T> = Result<T, BoxError>;

/// Connections being opened at once (the listen backlog is finite).
const CONNECTING: usize = 256;

// ---------- server child ----------

fn self_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn serve_child(args: &[String]) -> Res<()> {
    let bare = args.iter().any(|a| a == "--bare");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // Ours with the settings the signaling crate gives; the bare one with socketioxide's.
    let (layer, io) = if bare {
        SocketIo::builder().max_buffer_size(4096).build_layer()
    } else {
        P2pSignaling::socketio().build_layer()
    };
    if bare {
        // The handler is registered in a connect middleware, as `P2pSignaling` does, so that
        // it exists before the client can send its hello.
        let handler = async |_: SocketRef| {};
        let middleware = async |s: SocketRef| -> Result<(), std::convert::Infallible> {
            s.on("p2p:req", async |s: SocketRef, Data(v): Data<Value>| {
                let id = s.id.to_string();
                let _ = s.emit(
                    "p2p:res",
                    &json!({"rid": v["rid"], "ok": {"id": id, "uid": null, "rooms": []}}),
                );
            });
            Ok(())
        };
        io.ns("/", handler.with(middleware));
    } else if let Some(url) = value("--redis") {
        let cluster = RedisCluster::new(redis::Client::open(url.as_str())?)
            .prefix(value("--prefix").unwrap_or_else(|| "loadgen".into()));
        P2pSignaling::with_redis(SignalingOptions::default(), cluster)
            .await?
            .attach(&io);
    } else {
        let mut opts = SignalingOptions::default();
        if args.iter().any(|a| a == "--unlimited-requests") {
            // `signaling_rate`: each raw client sends far more control requests per second
            // than a peer would (the default budget is 500/s per socket).
            opts = opts.request_rate(1_000_000, 1_000_000);
        }
        P2pSignaling::new(opts).attach(&io);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    fn nodelay(tcp: &mut tokio::net::TcpStream) {
        let _ = tcp.set_nodelay(true);
    }
    let listener =
        axum::serve::ListenerExt::tap_io(listener, nodelay as fn(&mut tokio::net::TcpStream));
    let app = axum::Router::new().layer(layer);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut out = std::io::stdout();
    writeln!(out, "{port}")?;
    out.flush()?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "stat" {
            writeln!(out, "{} {}", self_rss_kib(), io.sockets().len())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// A server child process and its stat channel.
struct Child {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    addr: String,
}

impl Child {
    async fn start(args: &[&str]) -> Res<Child> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        // glibc malloc settings for the server child only (not the load generator):
        // `LOADGEN_SERVER_MALLOC=glibc.malloc.mmap_threshold=8192` and the like.
        if let Some(t) = std::env::var_os("LOADGEN_SERVER_MALLOC") {
            cmd.env("GLIBC_TUNABLES", t);
        }
        let mut child = cmd
            .arg("serve")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no child stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no child stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
            .await??
            .ok_or("server child exited")?;
        let port: u16 = line.trim().parse()?;
        Ok(Child {
            child,
            stdin,
            stdout,
            addr: format!("127.0.0.1:{port}"),
        })
    }

    /// The server's RSS (KiB) and number of connected sockets.
    async fn stat(&mut self) -> Res<(u64, usize)> {
        self.stdin.write_all(b"stat\n").await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await??
            .ok_or("server child exited")?;
        let mut it = line.split_whitespace();
        let rss = it.next().ok_or("bad stat")?.parse()?;
        let sockets = it.next().ok_or("bad stat")?.parse()?;
        Ok((rss, sockets))
    }

    /// Waits until the server holds `n` sockets and its RSS stopped moving (three samples
    /// 200 ms apart within 1%), at most `secs`; returns the RSS.
    async fn settle(&mut self, n: usize, secs: u64) -> Res<u64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last: Vec<u64> = Vec::new();
        loop {
            let (rss, sockets) = self.stat().await?;
            if sockets == n {
                last.push(rss);
                if last.len() >= 3 {
                    let w = &last[last.len() - 3..];
                    let (lo, hi) = (*w.iter().min().unwrap_or(&0), *w.iter().max().unwrap_or(&0));
                    if hi as f64 <= lo as f64 * 1.01 {
                        return Ok(rss);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("server never settled at {n} sockets (has {sockets})").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

// ---------- raw client ----------

/// What a client task is told to do.
enum Cmd {
    Send(String),
    Close,
}

/// An event a client received: its name and its one argument.
struct Ev {
    event: String,
    data: Value,
}

/// How a client task reports.
#[derive(Clone, Default)]
struct Watch {
    /// Events are forwarded here (else only views are tracked).
    events: Option<mpsc::UnboundedSender<Ev>>,
    /// Track the peers this client knows; when it knows `.0` of them, bump `.1`.
    view: Option<(usize, Arc<AtomicUsize>)>,
}

/// A connected, registered raw client.
struct Client {
    id: String,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Client {
    fn send(&self, text: String) {
        let _ = self.tx.send(Cmd::Send(text));
    }
    fn emit(&self, event: &str, data: &Value) {
        self.send(format!("42{}", json!([event, data])));
    }
    fn close(&self) {
        let _ = self.tx.send(Cmd::Close);
    }
}

/// A presence, as much of it as the clients look at (borrowed from the message).
#[derive(serde::Deserialize)]
struct PresenceIds<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    peer: Option<IdOf<'a>>,
    #[serde(default, borrow)]
    peers: Option<Vec<IdOf<'a>>>,
}

#[derive(serde::Deserialize)]
struct IdOf<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// The response to a `hello`: its rid and its `ok` (or none), left unparsed.
#[derive(serde::Deserialize)]
struct ResponseOf<'a> {
    #[serde(default)]
    rid: u64,
    #[serde(default, borrow)]
    ok: Option<&'a RawValue>,
}

/// The member lists of a `Welcome`.
#[derive(serde::Deserialize)]
struct WelcomeIds<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    rooms: Vec<RoomIds<'a>>,
}

#[derive(serde::Deserialize)]
struct RoomIds<'a> {
    #[serde(default, borrow)]
    room: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    peers: Vec<IdOf<'a>>,
    /// The `Welcome` listed only the first members: the rest comes in `members` pages.
    #[serde(default)]
    more: bool,
}

/// A `members` page.
#[derive(serde::Deserialize)]
struct PageIds<'a> {
    #[serde(default, borrow)]
    peers: Vec<IdOf<'a>>,
    #[serde(default)]
    more: bool,
}

/// Members asked for per page, as our peers do.
const MEMBERS_PAGE: usize = 256;

fn members_request(rid: u64, room: &str, after: Option<&str>) -> String {
    let req =
        json!({"rid": rid, "op": "members", "room": room, "after": after, "limit": MEMBERS_PAGE});
    format!("42{}", json!(["p2p:req", req]))
}

/// Peers in a presence message (one object or an array of them, as text), with true for
/// joined, false for left or disconnected. Typed and borrowed, so that a storm of 1,000
/// clients does not spend the generator's CPU on JSON trees.
fn presence_changes(data: &str, mut f: impl FnMut(&str, bool)) {
    let mut one = |p: &PresenceIds<'_>| {
        let joined = match p.kind {
            "joined" => true,
            "left" | "disconnected" => false,
            _ => return,
        };
        if let Some(peers) = &p.peers {
            for q in peers {
                f(&q.id, joined);
            }
        } else if let Some(q) = &p.peer {
            f(&q.id, joined);
        }
    };
    if data.trim_start().starts_with('[') {
        if let Ok(list) = serde_json::from_str::<Vec<PresenceIds<'_>>>(data) {
            list.iter().for_each(&mut one);
        }
    } else if let Ok(p) = serde_json::from_str::<PresenceIds<'_>>(data) {
        one(&p);
    }
}

/// Connects to `addr`, sends `hello`, and returns once the welcome came; the connection then
/// lives in a task of its own that answers pings and reports to `watch`.
async fn connect(addr: &str, hello: Value, watch: Watch) -> Res<Client> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let _ = ws.get_ref().get_ref_tcp().map(|t| t.set_nodelay(true));
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(run_client(ws, hello, watch, rx, ready_tx));
    let id = tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .map_err(|_| "no welcome within 30 s")?
        .map_err(|_| "client task ended before its welcome")??;
    Ok(Client { id, tx })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

trait TcpOf {
    fn get_ref_tcp(&self) -> Option<&tokio::net::TcpStream>;
}
impl TcpOf for tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream> {
    fn get_ref_tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            tokio_tungstenite::MaybeTlsStream::Plain(t) => Some(t),
            _ => None,
        }
    }
}

/// One client's connection: handshake, hello, then pings answered, events reported.
async fn run_client(
    mut ws: Ws,
    hello: Value,
    watch: Watch,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ready: oneshot::Sender<Res<String>>,
) {
    let mut ready = Some(ready);
    let fail = |ready: &mut Option<oneshot::Sender<Res<String>>>, e: String| {
        if let Some(r) = ready.take() {
            let _ = r.send(Err(e.into()));
        }
    };
    let mut view: HashSet<String> = HashSet::new();
    let mut counted = false;
    // Member pages in flight: request id -> room (every client pages, as a real peer does).
    let mut paging: std::collections::HashMap<u64, String> = Default::default();
    let mut next_rid = 1u64;
    let check_view = |view: &HashSet<String>, counted: &mut bool| {
        if let Some((n, done)) = &watch.view
            && !*counted
            && view.len() >= *n
        {
            *counted = true;
            done.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Send(text)) => {
                    if ws.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                Some(Cmd::Close) | None => {
                    let _ = ws.send(Message::text("41")).await;
                    let _ = ws.close(None).await;
                    // Drain until the server closes, so that it sees a clean disconnect.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    return;
                }
            },
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return fail(&mut ready, e.to_string()),
                    None => return fail(&mut ready, "closed".into()),
                };
                let t = text.as_str();
                if t == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        return;
                    }
                } else if t.starts_with('0') {
                    if ws.send(Message::text("40")).await.is_err() {
                        return;
                    }
                } else if t.starts_with("40") {
                    let req = format!("42{}", json!(["p2p:req", hello]));
                    if ws.send(Message::text(req)).await.is_err() {
                        return;
                    }
                } else if let Some(body) = t.strip_prefix("42") {
                    // Idle clients skip everything but their welcome.
                    if ready.is_none()
                        && paging.is_empty()
                        && watch.events.is_none()
                        && (watch.view.is_none() || counted)
                    {
                        continue;
                    }
                    let Ok(parts) = serde_json::from_str::<Vec<&RawValue>>(body) else {
                        continue;
                    };
                    let event: String = parts
                        .first()
                        .and_then(|e| serde_json::from_str(e.get()).ok())
                        .unwrap_or_default();
                    let raw = parts.get(1).map_or("null", |d| d.get());
                    if ready.is_some() && event == "p2p:res" {
                        let Ok(res) = serde_json::from_str::<ResponseOf<'_>>(raw) else {
                            continue;
                        };
                        if res.rid != 1 {
                            continue;
                        }
                        let Some(r) = ready.take() else { continue };
                        let Some(welcome) = res
                            .ok
                            .and_then(|ok| serde_json::from_str::<WelcomeIds<'_>>(ok.get()).ok())
                        else {
                            let _ = r.send(Err(format!("hello failed: {raw}").into()));
                            return;
                        };
                        for room in &welcome.rooms {
                            for p in &room.peers {
                                view.insert(p.id.to_string());
                            }
                            if room.more {
                                next_rid += 1;
                                let last = room.peers.last().map(|p| p.id.as_ref());
                                if ws.send(Message::text(members_request(next_rid, &room.room, last))).await.is_err() {
                                    return;
                                }
                                paging.insert(next_rid, room.room.to_string());
                            }
                        }
                        check_view(&view, &mut counted);
                        let _ = r.send(Ok(welcome.id.to_string()));
                        continue;
                    }
                    if !paging.is_empty() && event == "p2p:res" {
                        let Ok(res) = serde_json::from_str::<ResponseOf<'_>>(raw) else {
                            continue;
                        };
                        let Some(room) = paging.remove(&res.rid) else { continue };
                        let Some(page) = res
                            .ok
                            .and_then(|ok| serde_json::from_str::<PageIds<'_>>(ok.get()).ok())
                        else {
                            eprintln!("members page refused: {raw}");
                            continue;
                        };
                        for p in &page.peers {
                            view.insert(p.id.to_string());
                        }
                        if page.more && let Some(last) = page.peers.last() {
                            next_rid += 1;
                            if ws.send(Message::text(members_request(next_rid, &room, Some(&last.id)))).await.is_err() {
                                return;
                            }
                            paging.insert(next_rid, room);
                        }
                        check_view(&view, &mut counted);
                        continue;
                    }
                    if watch.view.is_some() && event == "p2p:presence" {
                        presence_changes(raw, |id, joined| {
                            if joined {
                                view.insert(id.to_owned());
                            } else {
                                view.remove(id);
                            }
                        });
                        check_view(&view, &mut counted);
                    }
                    if let Some(events) = &watch.events {
                        let data = serde_json::from_str(raw).unwrap_or(Value::Null);
                        let _ = events.send(Ev { event, data });
                    }
                }
            }
        }
    }
}

/// Connects `n` clients (at most `at_once` at a time); `make(i)` gives the i-th client's
/// address, hello and watch. Returns them in order, and the time it took.
async fn connect_many(
    n: usize,
    at_once: usize,
    make: impl Fn(usize) -> (String, Value, Watch),
) -> Res<(Vec<Client>, Duration)> {
    let gate = Arc::new(Semaphore::new(at_once));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, hello, watch) = make(i);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            connect(&addr, hello, watch).await
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for t in tasks {
        clients.push(t.await??);
    }
    Ok((clients, t0.elapsed()))
}

fn hello(rooms: &[String], uid: Option<String>) -> Value {
    json!({"rid": 1, "op": "hello", "version": 2, "uid": uid, "rooms": rooms, "frames": "base64", "batch_presence": true})
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

// ---------- scenarios ----------

/// One scenario's result, printed as one JSON object.
struct Outcome {
    scenario: &'static str,
    fields: Vec<(&'static str, Value)>,
}

impl Outcome {
    fn json_line(&self) -> String {
        let mut obj = serde_json::Map::new();
        obj.insert("scenario".into(), json!(self.scenario));
        for (k, v) in &self.fields {
            obj.insert((*k).into(), v.clone());
        }
        Value::Object(obj).to_string()
    }
}

/// Memory of `n` idle clients in rooms of `room_size` on one server child: RSS per client,
/// hellos per second, and RSS after they all left over RSS before they came.
struct Memory {
    kib_per_peer: f64,
    hellos_per_s: f64,
    after_leave_ratio: f64,
    /// RSS after a second crowd left, over the RSS after the first one left.
    second_round_ratio: Option<f64>,
}

async fn memory(bare: bool, n: usize, room_size: usize, second_round: bool) -> Res<Memory> {
    let mut child = Child::start(if bare { &["--bare"] } else { &[] }).await?;
    // Warm up (lazy statics, first allocations), then the baseline.
    let (warm, _) = connect_many(10, CONNECTING, |i| {
        (
            child.addr.clone(),
            hello(&[format!("w{i}")], None),
            Watch::default(),
        )
    })
    .await?;
    warm.iter().for_each(Client::close);
    let before = child.settle(0, 20).await?;
    let addr = child.addr.clone();
    let (clients, took) = connect_many(n, CONNECTING, |i| {
        (
            addr.clone(),
            hello(&[format!("room-{}", i / room_size)], None),
            Watch::default(),
        )
    })
    .await?;
    let full = child.settle(n, 30).await?;
    clients.iter().for_each(Client::close);
    let after = child.settle(0, 30).await?;
    drop(clients);
    // The same crowd again: a leak grows the RSS a second time, while memory the allocator
    // kept for itself after the first crowd left is reused.
    let mut second_round_ratio = None;
    if second_round {
        let (clients, _) = connect_many(n, CONNECTING, |i| {
            (
                addr.clone(),
                hello(&[format!("room-{}", i / room_size)], None),
                Watch::default(),
            )
        })
        .await?;
        child.settle(n, 30).await?;
        clients.iter().for_each(Client::close);
        let again = child.settle(0, 30).await?;
        second_round_ratio = Some(again as f64 / after as f64);
    }
    child.stop().await;
    Ok(Memory {
        kib_per_peer: (full as f64 - before as f64) / n as f64,
        hellos_per_s: n as f64 / took.as_secs_f64(),
        after_leave_ratio: after as f64 / before as f64,
        second_round_ratio,
    })
}

async fn server_scale() -> Res<Outcome> {
    const N: usize = 10_000;
    let ours = memory(false, N, 100, true).await?;
    eprintln!(
        "server_scale: ours {:.1} KiB/peer, {:.0} hellos/s",
        ours.kib_per_peer, ours.hellos_per_s
    );
    let bare = memory(true, N, 100, false).await?;
    eprintln!("server_scale: bare {:.1} KiB/peer", bare.kib_per_peer);
    let big = memory(false, 2000, 2000, false).await?;
    eprintln!(
        "server_scale: room of 2000 {:.1} KiB/peer",
        big.kib_per_peer
    );
    Ok(Outcome {
        scenario: "server_scale",
        fields: vec![
            ("peers", json!(N)),
            ("kib_per_peer", json!(round(ours.kib_per_peer, 1))),
            ("baseline_kib_per_peer", json!(round(bare.kib_per_peer, 1))),
            (
                "ratio",
                json!(round(ours.kib_per_peer / bare.kib_per_peer, 2)),
            ),
            ("hellos_per_s", json!(ours.hellos_per_s.round())),
            ("baseline_hellos_per_s", json!(bare.hellos_per_s.round())),
            (
                "rss_after_leave_ratio",
                json!(round(ours.after_leave_ratio, 3)),
            ),
            (
                "rss_after_second_round_ratio",
                json!(ours.second_round_ratio.map(|r| round(r, 3))),
            ),
            ("room2000_kib_per_peer", json!(round(big.kib_per_peer, 1))),
            ("room2000_hellos_per_s", json!(big.hellos_per_s.round())),
            (
                "room2000_rss_after_leave_ratio",
                json!(round(big.after_leave_ratio, 3)),
            ),
        ],
    })
}

/// Nanoseconds since the start of this process, carried in signals to time them.
fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// The time stamp a signal carries (in the SDP's origin line or the candidate's foundation).
fn stamp_of(signal: &Value) -> Option<u64> {
    if let Some(sdp) = signal["sdp"].as_str() {
        return sdp
            .lines()
            .find_map(|l| l.strip_prefix("o=- "))?
            .split(' ')
            .next()?
            .parse()
            .ok();
    }
    signal["candidate"]
        .as_str()?
        .strip_prefix("candidate:")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn sdp(t: u64) -> String {
    format!(
        "v=0\r\no=- {t} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n"
    )
}

async fn signaling_rate() -> Res<Outcome> {
    const PAIRS: usize = 20;
    const RUN: Duration = Duration::from_secs(5);
    let mut child = Child::start(&["--unlimited-requests"]).await?;
    let epoch = Instant::now();
    let addr = child.addr.clone();
    let mut rxs = Vec::new();
    let mut watches = Vec::new();
    for _ in 0..2 * PAIRS {
        let (tx, rx) = mpsc::unbounded_channel();
        rxs.push(rx);
        watches.push(Watch {
            events: Some(tx),
            view: None,
        });
    }
    // The first of each pair registers first, so that the second's welcome lists it.
    let (firsts, _) = connect_many(PAIRS, CONNECTING, |i| {
        (
            addr.clone(),
            hello(&[format!("pair-{i}")], None),
            watches[2 * i].clone(),
        )
    })
    .await?;
    let (seconds, _) = connect_many(PAIRS, CONNECTING, |i| {
        (
            addr.clone(),
            hello(&[format!("pair-{i}")], None),
            watches[2 * i + 1].clone(),
        )
    })
    .await?;
    drop(watches);
    let mut drivers = Vec::new();
    let mut rxs = rxs.into_iter();
    for (a, b) in firsts.into_iter().zip(seconds) {
        let (mut arx, mut brx) = (rxs.next().ok_or("rx")?, rxs.next().ok_or("rx")?);
        drivers.push(tokio::spawn(async move {
            let mut lat: Vec<u64> = Vec::new();
            let mut upgrades = 0u64;
            let signal = |c: &Client, to: &str, s: Value| {
                c.emit("p2p:req", &json!({"rid": 2, "op": "signal", "to": to, "signal": s}));
            };
            async fn sig(rx: &mut mpsc::UnboundedReceiver<Ev>, epoch: Instant, lat: &mut Vec<u64>) -> Res<Value> {
                loop {
                    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.map_err(|_| "no signal within 10 s (a refused request goes to its sender)")?.ok_or("closed")?;
                    if ev.event == "p2p:res" && ev.data.get("error").is_some() {
                        return Err(format!("signal refused: {}", ev.data).into());
                    }
                    if ev.event == "p2p:sig" {
                        let s = ev.data["signal"].clone();
                        if let Some(t) = stamp_of(&s) {
                            lat.push(now_ns(epoch).saturating_sub(t));
                        }
                        return Ok(s);
                    }
                }
            }
            let t0 = Instant::now();
            while t0.elapsed() < RUN {
                signal(&b, &a.id, json!({"type": "offer", "sdp": sdp(now_ns(epoch))}));
                sig(&mut arx, epoch, &mut lat).await?;
                signal(&a, &b.id, json!({"type": "answer", "sdp": sdp(now_ns(epoch))}));
                sig(&mut brx, epoch, &mut lat).await?;
                for port in [50000, 50001] {
                    let c = format!("candidate:{} 1 udp 2130706431 127.0.0.1 {port} typ host", now_ns(epoch));
                    signal(&b, &a.id, json!({"type": "candidate", "candidate": c, "sdpMid": "0", "sdpMLineIndex": 0}));
                }
                sig(&mut arx, epoch, &mut lat).await?;
                sig(&mut arx, epoch, &mut lat).await?;
                upgrades += 1;
            }
            a.close();
            b.close();
            Ok::<_, BoxError>((upgrades, lat, t0.elapsed()))
        }));
    }
    let mut upgrades = 0;
    let mut lat = Vec::new();
    let mut secs: f64 = 0.0;
    for d in drivers {
        let (u, l, t) = d.await??;
        upgrades += u;
        lat.extend(l);
        secs = secs.max(t.as_secs_f64());
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    let _ = child.settle(0, 20).await;
    child.stop().await;
    Ok(Outcome {
        scenario: "signaling_rate",
        fields: vec![
            ("pairs", json!(PAIRS)),
            ("upgrades_per_s", json!((upgrades as f64 / secs).round())),
            ("p50_signal_ms", json!(round(pct(0.50), 2))),
            ("p99_signal_ms", json!(round(pct(0.99), 2))),
            ("signals", json!(lat.len())),
        ],
    })
}

async fn presence_storm() -> Res<Outcome> {
    const N: usize = 1000;
    let mut child = Child::start(&[]).await?;
    let addr = child.addr.clone();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let t0 = Instant::now();
    let storm = tokio::spawn(async move {
        let gate = Arc::new(Semaphore::new(N));
        let mut tasks = Vec::new();
        for _ in 0..N {
            let (addr, gate) = (addr.clone(), gate.clone());
            let watch = Watch {
                events: None,
                view: Some((N - 1, d.clone())),
            };
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire_owned().await?;
                connect(&addr, hello(&["storm".to_owned()], None), watch)
                    .await
                    .map_err(|e| BoxError::from(format!("storm client: {e}")))
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await??);
        }
        Ok::<_, BoxError>(clients)
    });
    let mut peak = 0;
    let deadline = t0 + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < N {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {N} views complete after 30 s",
                done.load(Ordering::Relaxed)
            )
            .into());
        }
        peak = peak.max(child.stat().await?.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let complete = t0.elapsed();
    let clients = storm.await??;
    peak = peak.max(child.stat().await?.0);
    clients.iter().for_each(Client::close);
    let _ = child.settle(0, 30).await;
    child.stop().await;
    drop(clients);
    // The steady state: the same room on a fresh server, its members joining one by one.
    let mut child = Child::start(&[]).await?;
    let addr = child.addr.clone();
    let (clients, _) = connect_many(N, 8, |_| {
        let hello = hello(&["storm".to_owned()], None);
        (addr.clone(), hello, Watch::default())
    })
    .await?;
    let steady = child.settle(N, 30).await?;
    clients.iter().for_each(Client::close);
    let _ = child.settle(0, 30).await;
    child.stop().await;
    Ok(Outcome {
        scenario: "presence_storm",
        fields: vec![
            ("peers", json!(N)),
            ("complete_s", json!(round(complete.as_secs_f64(), 3))),
            ("peak_rss_kib", json!(peak)),
            ("steady_rss_kib", json!(steady)),
            (
                "peak_rss_ratio",
                json!(round(peak as f64 / steady as f64, 2)),
            ),
        ],
    })
}

/// A redis-server child on a free loopback port.
struct Redis(std::process::Child, String);

impl Redis {
    async fn start() -> Res<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return Ok(Redis(child, url));
            }
            if Instant::now() > deadline {
                return Err("redis-server never answered PING".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Ping frame to `to` (the smallest frame the server relays).
fn ping_frame(to: &str, nonce: u64) -> Res<Vec<u8>> {
    let f = Frame {
        to: to.to_owned(),
        from: String::new(),
        body: Body::Ping { nonce, pong: false },
    };
    Ok(f.encode()?.to_vec())
}

async fn cluster() -> Res<Outcome> {
    const N: usize = 2000;
    const PAIRS: usize = 20;
    const FRAMES: usize = 4000;
    const WINDOW: usize = 20;
    let redis = Redis::start().await?;
    let prefix = format!("loadgen-{}", std::process::id());
    let args = ["--redis", redis.1.as_str(), "--prefix", prefix.as_str()];
    let mut a = Child::start(&args).await?;
    let mut b = Child::start(&args).await?;
    let addrs = [a.addr.clone(), b.addr.clone()];
    // Hellos with uids, alternating nodes, in rooms of two that span them.
    let (clients, took) = connect_many(N, CONNECTING, |i| {
        (
            addrs[i % 2].clone(),
            hello(&[format!("r{}", i / 2)], Some(format!("user-{i}"))),
            Watch::default(),
        )
    })
    .await?;
    let hellos_per_s = N as f64 / took.as_secs_f64();
    eprintln!("cluster: {N} uid hellos at {hellos_per_s:.0}/s");
    clients.iter().for_each(Client::close);
    a.settle(0, 20).await?;
    b.settle(0, 20).await?;
    drop(clients);
    // Relay across nodes: pairs (one client on each node) send windows of Ping frames.
    let mut rxs = Vec::new();
    let mut watches = Vec::new();
    for _ in 0..2 * PAIRS {
        let (tx, rx) = mpsc::unbounded_channel();
        rxs.push(rx);
        watches.push(Watch {
            events: Some(tx),
            view: None,
        });
    }
    let (senders, _) = connect_many(PAIRS, CONNECTING, |i| {
        (
            addrs[0].clone(),
            hello(&[format!("x{i}")], None),
            watches[2 * i].clone(),
        )
    })
    .await?;
    let (receivers, _) = connect_many(PAIRS, CONNECTING, |i| {
        (
            addrs[1].clone(),
            hello(&[format!("x{i}")], None),
            watches[2 * i + 1].clone(),
        )
    })
    .await?;
    drop(watches);
    // Wait until each sender knows its receiver (presence crosses nodes).
    let mut rxs = rxs.into_iter();
    let mut drivers = Vec::new();
    let t0 = Instant::now();
    for (s, r) in senders.into_iter().zip(receivers) {
        let (mut srx, mut rrx) = (rxs.next().ok_or("rx")?, rxs.next().ok_or("rx")?);
        drivers.push(tokio::spawn(async move {
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(10), srx.recv())
                    .await?
                    .ok_or("closed")?;
                if ev.event == "p2p:presence" {
                    break;
                }
            }
            let mut got = 0;
            let mut nonce = 0;
            while got < FRAMES {
                let mut w = BatchWriter::new();
                for _ in 0..WINDOW.min(FRAMES - got) {
                    nonce += 1;
                    w.push(&ping_frame(&r.id, nonce)?);
                }
                let want = got + w.count();
                // One frame per event: the receiver counts frames, however they are batched.
                let batch = w.take();
                for f in split_batch(&batch)? {
                    let mut one = BatchWriter::new();
                    one.push(&f);
                    s.emit("p2p:f", &json!(batch_to_base64(&one.take())));
                }
                while got < want {
                    while let Ok(ev) = srx.try_recv() {
                        if ev.event == "p2p:error" {
                            return Err(format!("relay refused: {}", ev.data).into());
                        }
                    }
                    let ev = tokio::time::timeout(Duration::from_secs(10), rrx.recv())
                        .await
                        .map_err(|_| format!("{got} of {want} frames came"))?
                        .ok_or("closed")?;
                    if ev.event == "p2p:f" {
                        let text = ev.data.as_str().ok_or("p2p:f not text")?;
                        got += split_batch(&batch_from_base64(text)?)?.len();
                    }
                }
            }
            s.close();
            r.close();
            Ok::<_, BoxError>(got)
        }));
    }
    let mut frames = 0;
    for d in drivers {
        frames += d.await??;
    }
    let relay_secs = t0.elapsed().as_secs_f64();
    a.settle(0, 20).await?;
    b.settle(0, 20).await?;
    a.stop().await;
    b.stop().await;
    drop(redis);
    Ok(Outcome {
        scenario: "cluster",
        fields: vec![
            ("nodes", json!(2)),
            ("cluster_hellos_per_s", json!(hellos_per_s.round())),
            (
                "relay_frames_per_s",
                json!((frames as f64 / relay_secs).round()),
            ),
            ("relay_pairs", json!(PAIRS)),
        ],
    })
}

const SCENARIOS: [&str; 4] = [
    "server_scale",
    "signaling_rate",
    "presence_storm",
    "cluster",
];

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.first().is_some_and(|a| a == "serve") {
        return rt.block_on(serve_child(&args[1..]));
    }
    let json_out = args.iter().any(|a| a == "--json");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|l| l.split(',').map(str::to_owned).collect());
    rt.block_on(async move {
        let mut failed = Vec::new();
        for name in SCENARIOS {
            if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
                continue;
            }
            let t = Instant::now();
            let result = match name {
                "server_scale" => server_scale().await,
                "signaling_rate" => signaling_rate().await,
                "presence_storm" => presence_storm().await,
                _ => cluster().await,
            };
            eprintln!("{name}: done in {:.1} s", t.elapsed().as_secs_f64());
            match result {
                Ok(o) => {
                    if json_out {
                        println!("{}", o.json_line());
                    } else {
                        eprintln!("{}", o.json_line());
                    }
                }
                Err(e) => {
                    eprintln!("{name} FAILED: {e}");
                    failed.push(name);
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("scenarios failed: {}", failed.join(", ")).into())
        }
    })
}

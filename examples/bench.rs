//! Benchmark: relay throughput, ack round trips, upgrade latency, data-channel throughput
//! and server memory per idle peer, each against a baseline measured in the same run.
//! Everything runs on 127.0.0.1: no STUN/TURN, no mDNS.
//!
//! Run: `cargo build --release -p socketio-p2p-examples --examples`, then
//! `./target/release/examples/bench --json` (the scale scenarios run the `loadgen` example)
//! (`--json`: one JSON object per scenario on stdout, the table on stderr; without it,
//! only the table, on stdout).
//!
//! Options for diagnosis (the default is the configuration of the README: servers with
//! TCP_NODELAY, peers with `loopback_only()`, which trickles ICE candidates):
//! `--nagle` leaves Nagle's algorithm on on the servers' sockets, `--no-trickle` puts the
//! candidates in the SDP instead, `--only relay,upgrade` runs some scenarios. `RUST_LOG=...` prints logs on
//! stderr.
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use rust_socketio::TransportType;
use rust_socketio::asynchronous::{Client, ClientBuilder};
use serde_json::{Value, json};
use socketio_p2p::{P2p, P2pOptions, Transport};
use socketio_p2p_signaling::{P2pSignaling, SignalingOptions};
use socketioxide::SocketIo;
use socketioxide::extract::{Data, Event, SocketRef};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Notify;
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;

#[path = "bench_flood.rs"]
mod bench_flood;
#[path = "bench_impaired.rs"]
mod bench_impaired;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// One scenario's result: its name and its fields, in output order.
struct Outcome {
    scenario: &'static str,
    fields: Vec<(&'static str, Value)>,
}

impl Outcome {
    fn json_line(&self) -> String {
        let mut line = format!("{{\"scenario\":{}", json!(self.scenario));
        for (k, v) in &self.fields {
            let _ = write!(line, ",{}:{}", json!(k), v);
        }
        line.push('}');
        line
    }
}

/// Targets to compare against (printed, never asserted).
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

const TARGETS: &[(&str, &str, Goal)] = &[
    ("relay", "ratio", Goal::AtLeast(0.9)),
    ("relay", "lost", Goal::AtMost(0.0)),
    ("relay", "events_per_s", Goal::AtLeast(60_000.0)),
    ("relay", "fanout_ratio", Goal::AtLeast(0.8)),
    ("relay", "fanout_lost", Goal::AtMost(0.0)),
    ("relay", "pairs_lost", Goal::AtMost(0.0)),
    ("ack_rtt", "relay_p50_us", Goal::AtMost(500.0)),
    ("ack_rtt", "relay_p99_us", Goal::AtMost(2000.0)),
    ("upgrade", "p50_ms", Goal::AtMost(20.0)),
    ("upgrade", "p99_ms", Goal::AtMost(100.0)),
    ("dc_throughput", "ratio", Goal::AtLeast(0.9)),
    ("dc_throughput", "mb_per_s", Goal::AtLeast(50.0)),
    ("server_memory", "kib_per_peer", Goal::AtMost(64.0)),
    ("server_scale", "kib_per_peer", Goal::AtMost(32.0)),
    ("server_scale", "ratio", Goal::AtMost(1.5)),
    ("server_scale", "hellos_per_s", Goal::AtLeast(2000.0)),
    ("server_scale", "rss_after_leave_ratio", Goal::AtMost(1.1)),
    ("signaling_rate", "upgrades_per_s", Goal::AtLeast(500.0)),
    ("signaling_rate", "p99_signal_ms", Goal::AtMost(10.0)),
    ("presence_storm", "complete_s", Goal::AtMost(2.0)),
    ("presence_storm", "peak_rss_ratio", Goal::AtMost(2.0)),
    ("cluster", "cluster_hellos_per_s", Goal::AtLeast(1000.0)),
    ("flood_isolation", "rate_ratio", Goal::AtLeast(0.8)),
    ("flood_isolation", "ack_p50_ratio", Goal::AtMost(1.2)),
];

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts received events (or bytes) and remembers when the last one arrived.
struct Counter {
    base: Instant,
    target: usize,
    count: AtomicUsize,
    last_ns: AtomicU64,
    done: Notify,
}

impl Counter {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            target,
            count: AtomicUsize::new(0),
            last_ns: AtomicU64::new(0),
            done: Notify::new(),
        })
    }

    fn add(&self, n: usize) {
        let total = self.count.fetch_add(n, Ordering::Relaxed) + n;
        self.last_ns
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if total >= self.target && total - n < self.target {
            self.done.notify_one();
        }
    }

    /// Waits until the target is reached, or until nothing arrived for `idle`; returns the count.
    async fn wait(&self, idle: Duration) -> usize {
        loop {
            let before = self.count.load(Ordering::Relaxed);
            if before >= self.target {
                return before;
            }
            let woke = tokio::time::timeout(idle, self.done.notified()).await;
            if woke.is_err() && self.count.load(Ordering::Relaxed) == before {
                return before;
            }
        }
    }

    /// Time from `t0` to the last arrival.
    fn elapsed_since(&self, t0: Instant) -> Duration {
        (self.base + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)))
            .saturating_duration_since(t0)
    }
}

// ---------- servers and clients ----------

/// Settings shared by the scenarios.
#[derive(Clone, Copy)]
struct Settings {
    /// TCP_NODELAY on the servers' sockets.
    nodelay: bool,
    /// Trickle ICE (the default) or candidates in the SDP.
    trickle: bool,
    /// Peers in the impaired network's namespaces: real host candidates, not loopback.
    impaired: bool,
    /// The peers' send window in frames (`None`: the default).
    window: Option<usize>,
}

/// Serves `layer` on a free port of `ip`; returns the port.
async fn serve_at(
    ip: IpAddr,
    layer: socketioxide::layer::SocketIoLayer,
    nodelay: bool,
) -> Res<u16> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().layer(layer);
    if nodelay {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
    } else {
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    Ok(port)
}

/// A socketioxide server with `P2pSignaling` (as in the README); returns its port.
async fn start_signaling(nodelay: bool) -> Res<u16> {
    start_signaling_at(IpAddr::from([127, 0, 0, 1]), nodelay).await
}

/// The same on `ip`.
async fn start_signaling_at(ip: IpAddr, nodelay: bool) -> Res<u16> {
    let (layer, io) = P2pSignaling::socketio().build_layer();
    P2pSignaling::new(SignalingOptions::default()).attach(&io);
    serve_at(ip, layer, nodelay).await
}

/// The baseline: a bare socketioxide server that re-emits every event to the other sockets
/// of the sender's room (the room comes in the connect `auth`), with the same clients.
struct Forwarder {
    url: String,
    connected: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

type Rooms = Arc<Mutex<std::collections::HashMap<String, Vec<SocketRef>>>>;

async fn start_forwarder(nodelay: bool) -> Res<Forwarder> {
    start_forwarder_at(IpAddr::from([127, 0, 0, 1]), nodelay).await
}

/// The same on `ip`.
async fn start_forwarder_at(ip: IpAddr, nodelay: bool) -> Res<Forwarder> {
    let (layer, io) = SocketIo::builder().max_buffer_size(4096).build_layer();
    let rooms: Rooms = Arc::default();
    let connected = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (list, lost, count) = (rooms.clone(), dropped.clone(), connected.clone());
    io.ns(
        "/",
        async move |socket: SocketRef, Data(auth): Data<Value>| {
            let room = auth["room"].as_str().unwrap_or("all").to_owned();
            let (others, lost) = (list.clone(), lost.clone());
            let r = room.clone();
            socket.on_fallback(
                async move |me: SocketRef, Event(event): Event, Data(data): Data<Value>| {
                    let targets: Vec<SocketRef> = lock(&others)
                        .get(&r)
                        .into_iter()
                        .flatten()
                        .filter(|s| s.id != me.id)
                        .cloned()
                        .collect();
                    for s in targets {
                        if s.emit(&event, &data).is_err() {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
            );
            let others = list.clone();
            let r = room.clone();
            socket.on_disconnect(async move |me: SocketRef| {
                if let Some(v) = lock(&others).get_mut(&r) {
                    v.retain(|s| s.id != me.id);
                }
            });
            lock(&list).entry(room).or_default().push(socket);
            count.fetch_add(1, Ordering::Relaxed);
        },
    );
    let port = serve_at(ip, layer, nodelay).await?;
    Ok(Forwarder {
        url: format!("http://{ip}:{port}"),
        connected,
        dropped,
    })
}

/// A raw rust_socketio client (websocket transport) in `room` of the forwarder, counting
/// the events it receives.
async fn raw_client(url: &str, room: &str, counter: Option<Arc<Counter>>) -> Res<Client> {
    let mut builder = ClientBuilder::new(url)
        .transport_type(TransportType::Websocket)
        .auth(json!({ "room": room }))
        .reconnect(false);
    if let Some(c) = counter {
        builder = builder.on("n", move |_, _| {
            c.add(1);
            async {}.boxed()
        });
    }
    builder.connect().await.map_err(|e| e.to_string().into())
}

/// CPU time of this process (user + system), from getrusage.
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// A `P2p` peer in `room`: websocket transport, no auto-upgrade, WebRTC on loopback only.
async fn peer(url: &str, room: &str, set: Settings) -> Res<P2p> {
    let builder = ClientBuilder::new(url).transport_type(TransportType::Websocket);
    let opts = P2pOptions::default()
        .room(room)
        .auto_upgrade(false)
        .disable_mdns(true)
        .trickle(set.trickle);
    let opts = if set.impaired {
        opts
    } else {
        opts.loopback_only()
    };
    let opts = match set.window {
        Some(frames) => opts.window(frames),
        None => opts,
    };
    Ok(P2p::new(builder, opts).await?)
}

/// Two peers in a fresh room, each seeing the other.
async fn pair(url: &str, room: &str, set: Settings) -> Res<(P2p, P2p)> {
    let a = peer(url, room, set).await?;
    let b = peer(url, room, set).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for (me, other) in [(&a, b.id()), (&b, a.id())] {
        while !me.peers().await?.iter().any(|p| p.id == other) {
            if Instant::now() > deadline {
                return Err("peers never saw each other".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok((a, b))
}

// ---------- scenarios ----------

/// One relay run: deliveries per second, deliveries lost, CPU seconds per 100k deliveries.
struct Run {
    rate: f64,
    lost: usize,
    cpu_per_100k: f64,
}

impl Run {
    fn measure(counter: &Counter, got: usize, t0: Instant, cpu0: Duration) -> Run {
        let secs = counter.elapsed_since(t0).as_secs_f64().max(1e-9);
        let cpu = cpu_time().saturating_sub(cpu0).as_secs_f64();
        Run {
            rate: got as f64 / secs,
            lost: counter.target - got,
            cpu_per_100k: cpu * 100_000.0 / got.max(1) as f64,
        }
    }
}

const IDLE: Duration = Duration::from_secs(3);

/// `groups` rooms of one sender and `receivers` receivers each; every sender emits
/// `per_sender` events to its room (to its one receiver, targeted, when there is one),
/// all groups at once, through `P2pSignaling`.
async fn relay_ours(
    url: &str,
    set: Settings,
    groups: usize,
    receivers: usize,
    per_sender: usize,
) -> Res<Run> {
    let counter = Counter::new(groups * receivers * per_sender);
    let mut senders = Vec::new();
    let mut all = Vec::new();
    for g in 0..groups {
        let room = format!("relay-{groups}-{receivers}-{g}");
        let a = peer(url, &room, set).await?;
        let mut ids = Vec::new();
        for _ in 0..receivers {
            let b = peer(url, &room, set).await?;
            let c = counter.clone();
            b.on("n", move |_| c.add(1));
            ids.push(b.id().to_owned());
            all.push(b);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.peers().await?.len() < receivers {
            if Instant::now() > deadline {
                return Err("relay: peers never met".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        senders.push((a, (receivers == 1).then(|| ids[0].clone())));
    }
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let tasks: Vec<_> = senders
        .iter()
        .map(|(a, target)| {
            let (a, target) = (a.clone(), target.clone());
            tokio::spawn(async move {
                for i in 0..per_sender {
                    let r = match &target {
                        Some(t) => a.to(t).emit("n", json!(i)).await,
                        None => a.emit("n", json!(i)).await,
                    };
                    r?;
                }
                Ok::<(), socketio_p2p::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let got = counter.wait(IDLE).await;
    let run = Run::measure(&counter, got, t0, cpu0);
    for (a, _) in senders {
        a.close().await;
    }
    for b in all {
        b.close().await;
    }
    Ok(run)
}

/// The same run through the bare forwarder, with raw rust_socketio clients.
async fn relay_bare(set: Settings, groups: usize, receivers: usize, per_sender: usize) -> Res<Run> {
    relay_bare_via(
        start_forwarder(set.nodelay).await?,
        groups,
        receivers,
        per_sender,
    )
    .await
}

/// The same through the fresh forwarder `fwd`.
async fn relay_bare_via(
    fwd: Forwarder,
    groups: usize,
    receivers: usize,
    per_sender: usize,
) -> Res<Run> {
    let counter = Counter::new(groups * receivers * per_sender);
    let mut senders = Vec::new();
    let mut all = Vec::new();
    for g in 0..groups {
        let room = format!("g{g}");
        for _ in 0..receivers {
            all.push(raw_client(&fwd.url, &room, Some(counter.clone())).await?);
        }
        senders.push(raw_client(&fwd.url, &room, None).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while fwd.connected.load(Ordering::Relaxed) < groups * (receivers + 1) {
        if Instant::now() > deadline {
            return Err("forwarder clients never connected".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let tasks: Vec<_> = senders
        .iter()
        .map(|ra| {
            let ra = ra.clone();
            tokio::spawn(async move {
                for i in 0..per_sender {
                    ra.emit("n", json!(i)).await?;
                }
                Ok::<(), rust_socketio::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await?.map_err(|e| format!("baseline emit: {e}"))?;
    }
    let got = counter.wait(IDLE).await;
    let run = Run::measure(&counter, got, t0, cpu0);
    if fwd.dropped.load(Ordering::Relaxed) > 0 {
        eprintln!(
            "relay: baseline forwarder dropped {} emits (buffer full)",
            fwd.dropped.load(Ordering::Relaxed)
        );
    }
    for c in senders.into_iter().chain(all) {
        let _ = c.disconnect().await;
    }
    Ok(run)
}

/// 100k small JSON events A→B, then a fan-out to a room of 50 and 20 pairs at once, each
/// through `P2pSignaling` and through the bare forwarder with the same clients.
async fn relay(url: &str, set: Settings) -> Res<Outcome> {
    const N: usize = 100_000;
    let ours = relay_ours(url, set, 1, 1, N).await?;
    let base = relay_bare(set, 1, 1, N).await?;
    let fan_ours = relay_ours(url, set, 1, 50, N / 50).await?;
    let fan_base = relay_bare(set, 1, 50, N / 50).await?;
    let pairs_ours = relay_ours(url, set, 20, 1, N / 20).await?;
    let pairs_base = relay_bare(set, 20, 1, N / 20).await?;
    Ok(Outcome {
        scenario: "relay",
        fields: vec![
            ("events_per_s", json!(ours.rate.round())),
            ("baseline_events_per_s", json!(base.rate.round())),
            ("ratio", json!(round(ours.rate / base.rate, 3))),
            ("lost", json!(ours.lost)),
            ("baseline_lost", json!(base.lost)),
            ("cpu_s_per_100k", json!(round(ours.cpu_per_100k, 3))),
            (
                "baseline_cpu_s_per_100k",
                json!(round(base.cpu_per_100k, 3)),
            ),
            ("fanout_deliveries_per_s", json!(fan_ours.rate.round())),
            ("fanout_baseline_per_s", json!(fan_base.rate.round())),
            (
                "fanout_ratio",
                json!(round(fan_ours.rate / fan_base.rate, 3)),
            ),
            ("fanout_lost", json!(fan_ours.lost)),
            ("pairs_events_per_s", json!(pairs_ours.rate.round())),
            ("pairs_baseline_per_s", json!(pairs_base.rate.round())),
            (
                "pairs_ratio",
                json!(round(pairs_ours.rate / pairs_base.rate, 3)),
            ),
            ("pairs_lost", json!(pairs_ours.lost)),
        ],
    })
}

/// Sequential ack round trips, in microseconds, sorted.
async fn ack_rtts(a: &P2p, b: &str, n: usize) -> Res<Vec<f64>> {
    let to = a.to(b);
    for i in 0..20 {
        to.emit_with_ack("ping", json!(i)).await?;
    }
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        to.emit_with_ack("ping", json!(i)).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(sorted(rtts))
}

/// 2000 `emit_with_ack` round trips over the relay, then over the data channel.
async fn ack_rtt(url: &str, set: Settings) -> Res<Outcome> {
    const N: usize = 2000;
    let (a, b) = pair(url, "ack", set).await?;
    b.on("ping", |ev| {
        ev.reply(ev.payload().clone());
    });
    let relay = ack_rtts(&a, b.id(), N).await?;
    a.upgrade_peer(b.id()).await?;
    if a.transport(b.id()).await? != Transport::DataChannel {
        return Err("ack_rtt: upgrade did not switch to the data channel".into());
    }
    let dc = ack_rtts(&a, b.id(), N).await?;
    a.close().await;
    b.close().await;
    Ok(Outcome {
        scenario: "ack_rtt",
        fields: vec![
            ("relay_p50_us", json!(round(percentile(&relay, 50.0), 1))),
            ("relay_p99_us", json!(round(percentile(&relay, 99.0), 1))),
            ("dc_p50_us", json!(round(percentile(&dc, 50.0), 1))),
            ("dc_p99_us", json!(round(percentile(&dc, 99.0), 1))),
        ],
    })
}

/// 100 upgrades of a fresh pair: `upgrade_peer` call → first data-channel event at B.
async fn upgrade(url: &str, set: Settings) -> Res<Outcome> {
    const RUNS: usize = 100;
    let mut ms = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let (a, b) = pair(url, &format!("upgrade-{i}"), set).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        b.on("hello", move |ev| {
            if ev.transport() == Transport::DataChannel {
                let _ = tx.send(Instant::now());
            }
        });
        let t0 = Instant::now();
        a.upgrade_peer(b.id()).await?;
        a.to(b.id()).emit("hello", ()).await?;
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .ok_or("upgrade: no data-channel event")?;
        ms.push(got.saturating_duration_since(t0).as_secs_f64() * 1e3);
        a.close().await;
        b.close().await;
    }
    let ms = sorted(ms);
    Ok(Outcome {
        scenario: "upgrade",
        fields: vec![
            ("p50_ms", json!(round(percentile(&ms, 50.0), 2))),
            ("p99_ms", json!(round(percentile(&ms, 99.0), 2))),
            (
                "max_ms",
                json!(round(ms.last().copied().unwrap_or(f64::NAN), 2)),
            ),
        ],
    })
}

/// Sends `total` bytes on a bare data channel in `DC_CHUNK` messages, keeping at most 1 MiB
/// buffered (it waits for the 256 KiB low-water mark; `poll`, if given, bounds each wait).
/// Returns when the sending started.
async fn paced_send(dc: &RTCDataChannel, total: usize, poll: Option<Duration>) -> Res<Instant> {
    const HIGH: usize = 1 << 20;
    const LOW: usize = 256 << 10;
    let low = Arc::new(Notify::new());
    let l = low.clone();
    dc.set_buffered_amount_low_threshold(LOW).await;
    dc.on_buffered_amount_low(Box::new(move || {
        l.notify_one();
        Box::pin(async {})
    }))
    .await;
    let chunk = Bytes::from(vec![0xa5u8; DC_CHUNK]);
    let t0 = Instant::now();
    for _ in 0..total / DC_CHUNK {
        while dc.buffered_amount().await > HIGH {
            match poll {
                Some(d) => {
                    let _ = tokio::time::timeout(d, low.notified()).await;
                }
                None => low.notified().await,
            }
        }
        dc.send(&chunk).await?;
    }
    Ok(t0)
}

const DC_TOTAL: usize = 64 << 20;
const DC_CHUNK: usize = 16 << 10;

/// Sends `count` binary events of `size` bytes A→B; returns (events, seconds until B had all).
async fn p2p_binary(a: &P2p, b: &P2p, name: &str, count: usize, size: usize) -> Res<f64> {
    let counter = Counter::new(count);
    let relayed = Arc::new(AtomicUsize::new(0));
    let (c, r) = (counter.clone(), relayed.clone());
    b.on(name, move |ev| {
        if ev.transport() != Transport::DataChannel {
            r.fetch_add(1, Ordering::Relaxed);
        }
        if ev.bytes().is_some_and(|x| x.len() == size) {
            c.add(1);
        }
    });
    let payload = Bytes::from(vec![0xa5u8; size]);
    let to = a.to(b.id());
    let t0 = Instant::now();
    for _ in 0..count {
        to.emit(name, payload.clone()).await?;
    }
    let got = counter.wait(Duration::from_secs(10)).await;
    b.off(name);
    if got < count {
        return Err(format!("{name}: only {got} of {count} events arrived").into());
    }
    if relayed.load(Ordering::Relaxed) > 0 {
        eprintln!(
            "dc_throughput: {} {name} events came via the relay",
            relayed.load(Ordering::Relaxed)
        );
    }
    Ok(counter.elapsed_since(t0).as_secs_f64())
}

/// The SettingEngine of `peer/src/rtc.rs` with `loopback_only()`: loopback host candidates
/// only, interface and IP filters, mDNS disabled, no ICE servers.
fn loopback_api() -> webrtc::api::API {
    let mut se = SettingEngine::default();
    se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    se.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
    se.set_ice_timeouts(
        Some(Duration::from_secs(5)),
        Some(Duration::from_secs(3)),
        Some(Duration::from_secs(2)),
    );
    se.set_host_acceptance_min_wait(Some(Duration::ZERO));
    se.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
    se.set_include_loopback_candidate(true);
    se.set_interface_filter(Box::new(|name: &str| name.starts_with("lo")));
    se.set_ip_filter(Box::new(|ip: IpAddr| ip.is_loopback()));
    APIBuilder::new().with_setting_engine(se).build()
}

/// Offer/answer between two in-process peer connections, candidates in the SDP.
async fn direct_signaling(pa: &RTCPeerConnection, pb: &RTCPeerConnection) -> Res<()> {
    let offer = pa.create_offer(None).await?;
    let mut gathered = pa.gathering_complete_promise().await;
    pa.set_local_description(offer).await?;
    let _ = gathered.recv().await;
    let offer = pa.local_description().await.ok_or("no local offer")?;
    pb.set_remote_description(offer).await?;
    let answer = pb.create_answer(None).await?;
    let mut gathered = pb.gathering_complete_promise().await;
    pb.set_local_description(answer).await?;
    let _ = gathered.recv().await;
    let answer = pb.local_description().await.ok_or("no local answer")?;
    pa.set_remote_description(answer).await?;
    Ok(())
}

/// 64 MiB in 16 KiB messages over a bare webrtc-rs reliable ordered channel, with
/// `buffered_amount` backpressure; returns seconds until the receiver had every byte.
async fn bare_webrtc_throughput() -> Res<f64> {
    let api = loopback_api();
    let pa = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);
    let pb = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);
    let counter = Counter::new(DC_TOTAL);
    let c = counter.clone();
    pb.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        let c = c.clone();
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            c.add(msg.data.len());
            Box::pin(async {})
        }));
        Box::pin(async {})
    }));
    let dc = pa.create_data_channel("bench", None).await?;
    let open = Arc::new(Notify::new());
    let o = open.clone();
    dc.on_open(Box::new(move || {
        o.notify_one();
        Box::pin(async {})
    }));
    direct_signaling(&pa, &pb).await?;
    tokio::time::timeout(Duration::from_secs(10), open.notified()).await?;

    let t0 = paced_send(&dc, DC_TOTAL, None).await?;
    let got = counter.wait(Duration::from_secs(10)).await;
    let secs = counter.elapsed_since(t0).as_secs_f64();
    pa.close().await?;
    pb.close().await?;
    if got < DC_TOTAL {
        return Err(format!("bare webrtc: only {got} of {DC_TOTAL} bytes arrived").into());
    }
    Ok(secs)
}

/// 64 MiB in 16 KiB binary events over an upgraded pair vs bare webrtc-rs; then 100k × 32 B.
async fn dc_throughput(url: &str, set: Settings) -> Res<Outcome> {
    const SMALL: usize = 100_000;
    let (a, b) = pair(url, "dc", set).await?;
    a.upgrade_peer(b.id()).await?;
    let secs = p2p_binary(&a, &b, "chunk", DC_TOTAL / DC_CHUNK, DC_CHUNK).await?;
    let small_secs = p2p_binary(&a, &b, "small", SMALL, 32).await?;
    a.close().await;
    b.close().await;
    let base_secs = bare_webrtc_throughput().await?;
    let mb = DC_TOTAL as f64 / 1e6;
    let (ours, base) = (mb / secs, mb / base_secs);
    Ok(Outcome {
        scenario: "dc_throughput",
        fields: vec![
            ("mb_per_s", json!(round(ours, 1))),
            ("baseline_mb_per_s", json!(round(base, 1))),
            ("ratio", json!(round(ours / base, 3))),
            ("msgs_per_s", json!((SMALL as f64 / small_secs).round())),
        ],
    })
}

fn vm_rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS line")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// RSS growth of a server process (this binary with `--serve-only`) per idle peer.
async fn server_memory(set: Settings) -> Res<Outcome> {
    const PEERS: usize = 1000;
    const BATCH: usize = 50;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve-only")
        .args(set.nodelay.then_some("--nodelay"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("server child has no pid")?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).lines().next_line(),
    )
    .await??
    .ok_or("server child exited")?;
    let url = format!("http://127.0.0.1:{}", line.trim().parse::<u16>()?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = vm_rss_kib(pid)?;

    let t0 = Instant::now();
    let mut peers = Vec::with_capacity(PEERS);
    while peers.len() < PEERS {
        let n = BATCH.min(PEERS - peers.len());
        let batch = (0..n).map(|_| peer(&url, "idle", set));
        for p in futures_util::future::join_all(batch).await {
            peers.push(p?);
        }
    }
    eprintln!(
        "server_memory: {} peers registered in {:.1} s",
        peers.len(),
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = vm_rss_kib(pid)?;
    child.kill().await?;
    drop(peers);
    Ok(Outcome {
        scenario: "server_memory",
        fields: vec![
            (
                "kib_per_peer",
                json!(round((after as f64 - before as f64) / PEERS as f64, 1)),
            ),
            ("peers", json!(PEERS)),
            ("rss_before_kib", json!(before)),
            ("rss_after_kib", json!(after)),
        ],
    })
}

/// A scenario of the `loadgen` example (built beside this one), which runs its servers as
/// child processes of its own.
async fn loadgen(name: &'static str) -> Res<Outcome> {
    let exe = std::env::current_exe()?.with_file_name("loadgen");
    let out = tokio::process::Command::new(&exe)
        .args(["--json", "--only", name])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(|e| {
            format!(
                "{}: {e} (cargo build --release -p socketio-p2p-examples --examples)",
                exe.display()
            )
        })?;
    let line = String::from_utf8_lossy(&out.stdout);
    let Value::Object(obj) = serde_json::from_str(line.trim())? else {
        return Err(format!("loadgen {name}: no result").into());
    };
    let fields = obj
        .into_iter()
        .filter(|(k, _)| k != "scenario")
        .map(|(k, v)| (&*Box::leak(k.into_boxed_str()), v))
        .collect();
    Ok(Outcome {
        scenario: name,
        fields,
    })
}

/// `--serve-only`: a signaling server; prints its port, runs until stdin closes.
async fn serve_only(nodelay: bool) -> Res<()> {
    let port = start_signaling(nodelay).await?;
    let mut out = std::io::stdout();
    writeln!(out, "{port}")?;
    out.flush()?;
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    Ok(())
}

// ---------- report ----------

fn table(outcomes: &[Outcome]) -> String {
    let mut t = format!(
        "{:<14} {:<22} {:>14}  {:<10} {}\n",
        "scenario", "metric", "value", "target", "status"
    );
    for o in outcomes {
        for (k, v) in &o.fields {
            let goal = TARGETS
                .iter()
                .find(|(s, f, _)| *s == o.scenario && f == k)
                .map(|(_, _, g)| *g);
            let x = v.as_f64().unwrap_or(f64::NAN);
            let (target, status) = match goal {
                Some(Goal::AtLeast(g)) => (format!(">= {g}"), if x >= g { "ok" } else { "MISS" }),
                Some(Goal::AtMost(g)) => (format!("<= {g}"), if x <= g { "ok" } else { "MISS" }),
                None => (String::new(), ""),
            };
            let _ = writeln!(
                t,
                "{:<14} {:<22} {:>14}  {:<10} {}",
                o.scenario,
                k,
                v.to_string(),
                target,
                status
            );
        }
    }
    t
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let set = Settings {
        nodelay: !flag("--nagle"),
        trickle: !flag("--no-trickle"),
        impaired: false,
        window: None,
    };
    if flag("--serve-only") {
        return serve_only(set.nodelay).await;
    }
    if flag("--flood-only") {
        return bench_flood::flood_only(&args).await;
    }
    let json_out = flag("--json");
    let only: Option<Vec<&str>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').collect());
    let started = Instant::now();
    let url = format!("http://127.0.0.1:{}", start_signaling(set.nodelay).await?);

    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for name in [
        "relay",
        "ack_rtt",
        "upgrade",
        "dc_throughput",
        "server_memory",
        "server_scale",
        "signaling_rate",
        "presence_storm",
        "cluster",
        "flood_isolation",
        "impaired",
    ] {
        if only.as_ref().is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let t = Instant::now();
        let result = match name {
            "relay" => relay(&url, set).await,
            "ack_rtt" => ack_rtt(&url, set).await,
            "upgrade" => upgrade(&url, set).await,
            "dc_throughput" => dc_throughput(&url, set).await,
            "server_memory" => server_memory(set).await,
            "flood_isolation" => bench_flood::flood_isolation(&url, set).await,
            "impaired" => bench_impaired::impaired(set).await,
            _ => loadgen(name).await,
        };
        eprintln!("{name}: done in {:.1} s", t.elapsed().as_secs_f64());
        match result {
            Ok(o) => {
                if json_out {
                    println!("{}", o.json_line());
                }
                outcomes.push(o);
            }
            Err(e) => {
                eprintln!("{name} FAILED: {e}");
                failed.push(name);
            }
        }
    }

    let report = format!(
        "{}total {:.1} s{}",
        table(&outcomes),
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(", failed: {}", failed.join(", "))
        }
    );
    if json_out {
        eprintln!("{report}");
    } else {
        println!("{report}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("scenarios failed: {}", failed.join(", ")).into())
    }
}
